import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests count compilations: a persistent cache filled by an earlier run would hide them.
os.environ["REALM_JAX_COMPILATION_CACHE"] = "0"
# 8 simulated CPU devices for the sharding tests; single-device code uses device 0 as usual.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------- the real model (session-wide)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (fetched into the user cache on first use)."""
    from realm_jax import builtin

    return builtin.gguf_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """realm_jax Model loaded from the GGUF, float32."""
    import realm_jax

    return realm_jax.load(smollm2_gguf, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """HF transformers model loaded from the same GGUF, float32, eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """HF transformers tokenizer built from the same GGUF."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable keeps memory
    mappings alive; the whole suite compiles thousands of programs, and the process would pass
    the kernel's per-process mapping limit (vm.max_map_count, 65530 by default) about 75% of the
    way through and crash inside the compiler."""
    yield
    import gc

    from realm_jax import runtime

    runtime._BUILDERS.clear()
    jax.clear_caches()
    gc.collect()


# ---------------------------------------------------------------- the slow set (-m "not slow" skips it)
SLOW_MODULES = {"test_notebooks.py", "test_lm_eval_adapter.py", "test_cli_multihost.py", "test_draft_compile.py",
                "test_cli_bench.py"}
SLOW_FIXTURES = {"smollm2", "smollm2_hf", "smollm2_hf_tokenizer", "smollm2_gguf"}


def pytest_collection_modifyitems(config, items):
    """Mark as ``slow`` every test of the modules above and every test that uses the real model."""
    for item in items:
        if item.path.name in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
