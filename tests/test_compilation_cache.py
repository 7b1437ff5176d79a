"""The persistent compilation cache: on by default, opt-out honoured, user settings kept.
Each case runs in a fresh interpreter (the setting is process-global)."""

import subprocess
import sys

CODE = """
import os, jax
from realm_jax.compilation_cache import enable_compilation_cache
print(enable_compilation_cache())
print(jax.config.jax_compilation_cache_dir)
"""


def _run(env_extra, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("REALM_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update({"REALM_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}, **env_extra)
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:2]


def test_on_by_default_under_the_realm_jax_cache(tmp_path):
    used, configured = _run({}, tmp_path)
    assert used == configured == str(tmp_path / "cache" / "xla")
    assert (tmp_path / "cache" / "xla").is_dir()


def test_opt_out(tmp_path):
    used, configured = _run({"REALM_JAX_COMPILATION_CACHE": "0"}, tmp_path)
    assert used == "None" and configured in ("None", "")


def test_user_setting_is_kept(tmp_path):
    mine = str(tmp_path / "mine")
    used, configured = _run({"JAX_COMPILATION_CACHE_DIR": mine}, tmp_path)
    assert used == configured == mine
