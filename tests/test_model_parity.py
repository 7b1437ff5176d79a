"""Logit parity with HF transformers (torch CPU, float32) on tiny random models of every arch:
the fast runtime in both layouts and the plain reference forward."""

import numpy as np
import pytest

import realm_jax
from realm_jax.model import forward_jit

from hf_reference import (ARCH_CASES, FORMS, PHI3_CASES, hf_logits, hf_logits_alone, make_hf_model, random_batch,
                          realm_logits)


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_logits_match_hf_on_padded_batch(case, tmp_path):
    directory, hf = make_hf_model(case, tmp_path / case, classic_dialect=(case.startswith("llama_gqa")))
    model = realm_jax.load(directory, dtype="float32")
    rng = np.random.default_rng(1)
    tokens, lengths = random_batch(rng, model.config.vocab_size, [11, 4, 9])
    # Phi-3's longrope: HF picks the factors once per call from the batch's longest row, so each
    # row's HF answer is that row alone (ours is per row in the batch)
    ref = (hf_logits_alone if case in PHI3_CASES else hf_logits)(hf, tokens, lengths)
    ours = realm_logits(model.params, model.config, tokens, lengths)
    assert set(ours) == set(FORMS)
    for form, got in ours.items():
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(got[b, :n], ref[b, :n], atol=1e-4, rtol=0, err_msg=form)
        worst = max(np.abs(got[b, :n] - ref[b, :n]).max() for b, n in enumerate(lengths))
        print(f"{case} ({form}): max |dlogit| = {worst:.2e}")


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_padded_batch_equals_rows_alone(tmp_path, layout):
    directory, _ = make_hf_model("mistral_window", tmp_path / "m")
    model = realm_jax.load(directory, dtype="float32", layout=layout)
    assert model.runtime.stacked == (layout == "stacked")
    rng = np.random.default_rng(2)
    tokens, lengths = random_batch(rng, model.config.vocab_size, [3, 12, 7, 1])
    batch = np.asarray(forward_jit(model.runtime, model.config, tokens, lengths))
    for b, n in enumerate(lengths):
        alone = np.asarray(forward_jit(model.runtime, model.config, tokens[b:b + 1, :n], lengths[b:b + 1]))
        np.testing.assert_allclose(batch[b, :n], alone[0], atol=1e-5, rtol=0)
