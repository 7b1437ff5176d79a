"""Security: the compilation cache directory is private and refused when others could plant code
in it; a pickle planted wherever files are read (HF checkpoint directory, GGUF folder, PEFT
adapter directory, compilation cache, data sent between processes) is never unpickled."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import realm_jax
from realm_jax.compilation_cache import CacheDirError, check_private_dir, enable_compilation_cache

from test_bad_input import CFG, files  # noqa: F401  (the module fixture: tiny HF dir, GGUF, PEFT dir)


class Planted:
    """Unpickling this creates ``marker``: proof that someone unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder: Path, marker: Path, names=("pytorch_model.bin", "model.pkl", "training_args.bin", "optimizer.pt",
                                             "adapter_model.bin", "rng_state.pth", "model.safetensors.pkl")) -> None:
    payload = pickle.dumps(Planted(marker))
    assert not marker.exists()
    for n in names:
        (folder / n).write_bytes(payload)


def test_the_planted_pickle_works(tmp_path):
    """The payload is live: unpickling it does create the marker (so its absence means something)."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Planted(marker))).close()
    assert marker.exists()


@pytest.fixture
def no_unpickling(monkeypatch):
    """Within the test, any unpickling in this process fails loudly."""
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


# ---------------------------------------------------------------- the compilation cache directory
def test_a_new_cache_directory_is_private(tmp_path):
    d = check_private_dir(tmp_path / "a" / "xla")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o720])
def test_a_cache_writable_by_others_is_refused(tmp_path, mode):
    d = tmp_path / "xla"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(CacheDirError, match=rf"{d}.*mode {mode:04o} lets the group or others write into it.*chmod 700"):
        check_private_dir(d)
    with pytest.raises(CacheDirError, match=r"lets the group or others write"):
        enable_compilation_cache(d)  # refused before the cache is turned on
    import jax

    assert not jax.config.jax_compilation_cache_dir


def test_a_private_existing_cache_is_accepted(tmp_path):
    d = tmp_path / "xla"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o755)  # readable by others is fine: only writing plants code
    assert check_private_dir(d) == str(d)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_a_cache_owned_by_someone_else_is_refused(tmp_path):
    d = tmp_path / "xla"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(CacheDirError, match=rf"{d}.*owned by user id 12345, not by this user"):
        check_private_dir(d)


def test_a_cache_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "xla"
    f.write_text("x")
    with pytest.raises(CacheDirError, match=r"exists and is not a directory"):
        check_private_dir(f)


def test_a_symlink_is_judged_by_its_target(tmp_path):
    target = tmp_path / "shared"
    target.mkdir()
    os.chmod(target, 0o777)
    (tmp_path / "xla").symlink_to(target)
    with pytest.raises(CacheDirError, match=r"mode 0777"):
        check_private_dir(tmp_path / "xla")


CODE = """
import os, sys, jax, jax.numpy as jnp
import realm_jax
from realm_jax.compilation_cache import enable_compilation_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
m = realm_jax.load(sys.argv[1], dtype="float32")   # turns the cache on (the default)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(jax.config.jax_compilation_cache_dir)
r = realm_jax.generate(m, [[1, 2, 3]], 2)
print(len(r.tokens[0]))
"""


def _env(cache_root):
    env = {k: v for k, v in os.environ.items() if k not in ("REALM_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(REALM_JAX_CACHE=str(cache_root), JAX_PLATFORMS="cpu")
    return env


def test_default_cache_is_created_private_and_planted_pickles_are_not_run(files, tmp_path):  # noqa: F811
    """The default cache (on in a fresh process) is made 0700; pickles planted in it, run twice
    (writing, then reading the cache), are never unpickled."""
    root = tmp_path / "cache"
    xla = root / "xla"
    xla.mkdir(parents=True, mode=0o700)
    marker = tmp_path / "PWNED"
    plant(xla, marker, names=("jit_forward-planted", "planted.pkl", "index.pickle"))
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", CODE, str(files["hf"])], env=_env(root), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.split() == [str(xla), "2"]
    assert stat.S_IMODE(os.stat(xla).st_mode) == 0o700
    assert len(list(xla.iterdir())) > 3  # the cache was written and used
    assert not marker.exists()


def test_load_refuses_a_world_writable_default_cache(files, tmp_path):  # noqa: F811
    root = tmp_path / "cache"
    (root / "xla").mkdir(parents=True)
    os.chmod(root / "xla", 0o777)
    p = subprocess.run([sys.executable, "-m", "realm_jax.cli", "generate", "--model", str(files["hf"]), "--prompt-ids",
                        "1,2"], env=_env(root), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "compilation cache" in p.stderr and "mode 0777" in p.stderr and p.stderr.count("\n") == 1


# ---------------------------------------------------------------- planted pickles where files are read
def test_hf_directory_pickles_are_never_unpickled(files, tmp_path, no_unpickling):  # noqa: F811
    import shutil

    d = Path(shutil.copytree(files["hf"], tmp_path / "m"))
    marker = tmp_path / "PWNED"
    plant(d, marker)
    m = realm_jax.load(d, dtype="float32")
    assert m.config == CFG and not marker.exists()


def test_a_directory_with_only_pickled_weights_is_refused(files, tmp_path, no_unpickling):  # noqa: F811
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_bytes((files["hf"] / "config.json").read_bytes())
    marker = tmp_path / "PWNED"
    plant(d, marker)
    with pytest.raises(realm_jax.errors.CheckpointError, match=r"no \*\.safetensors files"):
        realm_jax.load(d, dtype="float32")
    assert not marker.exists()


def test_gguf_folder_pickles_are_never_unpickled(files, tmp_path, no_unpickling):  # noqa: F811
    import shutil

    folder = tmp_path / "g"
    folder.mkdir()
    shutil.copy(files["root"] / "m.gguf", folder / "m.gguf")
    marker = tmp_path / "PWNED"
    plant(folder, marker)
    realm_jax.load(folder / "m.gguf", dtype="float32")
    assert not marker.exists()


def test_peft_directory_pickles_are_never_unpickled(files, tmp_path, no_unpickling):  # noqa: F811
    import shutil

    d = Path(shutil.copytree(files["peft"], tmp_path / "adapter"))
    marker = tmp_path / "PWNED"
    plant(d, marker)
    realm_jax.load_peft(d, CFG)  # the safetensors file is read; adapter_model.bin is not
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(realm_jax.errors.CheckpointError, match=r"adapter_model\.bin, a pickle, is not read"):
        realm_jax.load_peft(d, CFG)
    assert not marker.exists()


def test_cli_generate_with_planted_pickles(files, tmp_path, capsys, no_unpickling):  # noqa: F811
    import shutil

    from realm_jax import cli

    d = Path(shutil.copytree(files["hf"], tmp_path / "m"))
    a = Path(shutil.copytree(files["peft"], tmp_path / "adapter"))
    marker = tmp_path / "PWNED"
    plant(d, marker)
    plant(a, marker)
    assert cli.main(["generate", "--model", str(d), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--lora",
                     str(a)]) == 0
    assert not marker.exists()


# ---------------------------------------------------------------- data between processes
def _fake_processes(monkeypatch, peers: list[bytes]):
    """multihost_utils.process_allgather as if further processes sent ``peers`` (raw bytes)."""
    from jax.experimental import multihost_utils

    calls = []

    def allgather(x, tiled=False):
        x = np.asarray(x)
        calls.append(x)
        if len(calls) == 1:  # the sizes
            return np.concatenate([x, np.array([len(p) for p in peers], np.int32)])
        rows = [x[0]]
        for p in peers:
            row = np.zeros(x.shape[1], np.uint8)
            row[:len(p)] = np.frombuffer(p, np.uint8)
            rows.append(row)
        return np.stack(rows)

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)


@pytest.mark.parametrize("peer", ["pickle", "pickle-cut-short", "not-utf8"])
def test_gathered_results_are_json_not_pickle(monkeypatch, tmp_path, peer):
    """A peer sending a pickle (whose unpickling would create a file) gets a ShardingError."""
    from realm_jax import sharding
    from realm_jax.scoring import Score

    marker = tmp_path / "PWNED"
    evil = pickle.dumps([Planted(marker)])
    sent = {"pickle": evil, "pickle-cut-short": evil[:40], "not-utf8": b"\xff" * 60}[peer]
    _fake_processes(monkeypatch, [sent])
    with pytest.raises(sharding.ShardingError, match=r"process 1 sent results that are not valid JSON"):
        sharding._allgather_objects([Score(-1.5, (-1.0, -0.5), True, (3, 4))])
    assert not marker.exists()


def test_gathered_results_round_trip_exactly(monkeypatch):
    """Scores (floats exact, NaN and infinities too), tuples, dicts, numpy values: what one process
    sends is what the others get back."""
    from realm_jax import sharding
    from realm_jax.scoring import Score

    mine = [Score(-1.2345678901234567, (-1.0, -0.2345678901234567), True, (3, 4)),
            Score(float("nan"), (float("-inf"), 1e-310), False, (7,)),
            {"a": (1, 2.5, None, "x"), "b": [np.float32(0.1), np.arange(3, dtype=np.int16)]}]
    from jax.experimental import multihost_utils

    def echo(x, tiled=False):  # two processes that sent the same thing
        x = np.asarray(x)
        return np.concatenate([x, x], axis=0)

    monkeypatch.setattr(multihost_utils, "process_allgather", echo)
    out = sharding._allgather_objects(mine)
    assert len(out) == 2
    for got in out:
        a, b, c = got
        assert a == mine[0] and isinstance(a, Score) and isinstance(a.token_ids, tuple)
        assert math.isnan(b.logprob) and b.token_logprobs == mine[1].token_logprobs
        assert c["a"] == mine[2]["a"] and c["b"][0] == np.float32(0.1) and c["b"][0].dtype == np.float32
        assert c["b"][1].dtype == np.int16 and (c["b"][1] == np.arange(3)).all()


@dataclasses.dataclass
class NotOurs:
    x: int


def test_only_plain_data_and_realm_jax_dataclasses_travel(monkeypatch):
    from realm_jax import sharding

    _fake_processes(monkeypatch, [])
    with pytest.raises(sharding.ShardingError, match=r"a test_security\.NotOurs cannot be sent between processes"):
        sharding._allgather_objects([NotOurs(1)])
    with pytest.raises(sharding.ShardingError, match=r"a builtins\.set cannot be sent"):
        sharding._allgather_objects([{1, 2}])
    forged = b'[{"__dataclass__": ["os", "system"], "fields": {"command": "touch /tmp/x"}}]'
    _fake_processes(monkeypatch, [forged])
    with pytest.raises(sharding.ShardingError, match=r"received an unknown type os\.system"):
        sharding._allgather_objects([1])
