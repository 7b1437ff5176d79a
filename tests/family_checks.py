"""The checks every model family's parity tests run against HF transformers (``test_gemma``,
``test_moe``): logits alone and in a padded batch, cached decode against the full forward,
greedy tokens against HF ``generate``, int8 against its reference twin, and a checkpoint
written back and read by transformers. Each takes the tiny HF model and our ``Model`` of it.
``check_bad_gguf_refused``: a malformed GGUF is refused naming the problem and the file."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax import runtime
from realm_jax.checkpoint import write_hf_checkpoint
from realm_jax.generation import generate, new_cache
from realm_jax.model import forward_cached_hidden, forward_jit, lm_head
from realm_jax.reference import forward_reference_jit

from hf_reference import (dequantized, hf_load_kwargs, hf_logits, hf_logits_alone, make_hf_model, random_batch,
                          realm_logits)

LENGTHS = [11, 4, 9]  # the tiny windows (4, 5) cut the longer prompts, not the short one


def family_case(case: str, tmp_path_factory):
    """A family test module's model: (case, checkpoint dir, HF model, our Model loaded from the
    dir, float32)."""
    directory, hf = make_hf_model(case, tmp_path_factory.mktemp(case))
    return case, directory, hf, realm_jax.load(directory, dtype="float32")


def batch(cfg, seed=1, lengths=LENGTHS):
    return random_batch(np.random.default_rng(seed), cfg.vocab_size, lengths)


def rows_max_diff(a, b, lengths) -> float:
    return max(float(np.abs(a[i, :n] - b[i, :n]).max()) for i, n in enumerate(lengths))


def check_logits_alone_and_padded(case, hf, model, tol: float, alone_form: str = "stacked",
                                  hf_padded: bool = True) -> None:
    """Every form's logits on a padded batch within ``tol`` of HF's; each row alone too.
    ``hf_padded=False``: the padded batch is checked against HF on each row alone, as HF's own
    padded batch is not its answer for every row (Phi-3's longrope picks its factors per call
    from the batch's longest row)."""
    cfg = model.config
    tokens, lengths = batch(cfg)
    ref = hf_logits(hf, tokens, lengths) if hf_padded else hf_logits_alone(hf, tokens, lengths)
    for form, got in realm_logits(model.params, cfg, tokens, lengths).items():
        worst = rows_max_diff(got, ref, lengths)
        print(f"{case} {form}: max |dlogit| {worst:.1e}, max |logit| {np.abs(ref).max():.1f}")
        assert worst <= tol, form
    for b, n in enumerate(lengths):
        alone_ref = hf_logits(hf, tokens[b:b + 1, :n], lengths[b:b + 1])
        alone = realm_logits(model.params, cfg, tokens[b:b + 1, :n], lengths[b:b + 1], forms=(alone_form,))
        np.testing.assert_allclose(alone[alone_form][0], alone_ref[0], atol=tol, rtol=0)
        np.testing.assert_allclose(alone_ref[0], ref[b, :n], atol=tol if hf_padded else 0, rtol=0)  # clean padding


@partial(jax.jit, static_argnums=1)
def _prefill(rt, cfg, tokens, lengths, cache):
    hidden, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache, empty_cache=True)
    return lm_head(rt, cfg, hidden), cache


@partial(jax.jit, static_argnums=1)
def _append(rt, cfg, tokens, lengths, cache):
    hidden, cache = forward_cached_hidden(rt, cfg, tokens, lengths, cache)
    return lm_head(rt, cfg, hidden), cache


DECODE_PROMPTS, DECODE_STEPS = np.array([6, 2, 4], np.int32), 9  # rows reach 15, past the tiny windows


def cached_decode(model, layout: str, attention: str, seq, prompt=DECODE_PROMPTS, steps: int = DECODE_STEPS):
    """Rows ``seq`` [B, S]: the first ``prompt`` [B] tokens prefilled, then ``steps`` tokens one
    at a time through the cache. Returns (prefill logits [B, max prompt, V], [steps of [B, V]])."""
    cfg = model.config
    rt = runtime.prepare(model.params, cfg, layout=layout, attention=attention)
    b, t = len(prompt), int(prompt.max())
    tokens = np.where(np.arange(t)[None] < prompt[:, None], seq[:, :t], 0).astype(np.int32)
    logits, cache = _prefill(rt, cfg, tokens, prompt, new_cache(cfg, rt, b, 32))
    out = []
    for j in range(steps):
        step, cache = _append(rt, cfg, seq[np.arange(b), prompt + j][:, None], np.ones(b, np.int32), cache)
        out.append(np.asarray(step)[:, 0])
    return np.asarray(logits), out


def check_cached_decode(case, model, layout: str, attention: str, tol: float) -> None:
    """Prompts of 6, 2 and 4 tokens, then 9 tokens one at a time (rows reach 15, past the tiny
    windows): every position's logits equal the uncached forward's over the whole sequence."""
    cfg = model.config
    rt = runtime.prepare(model.params, cfg, layout=layout, attention=attention)
    prompt = DECODE_PROMPTS
    seq, _ = batch(cfg, seed=3, lengths=[15, 15, 15])
    full = np.asarray(forward_jit(rt, cfg, seq, prompt + DECODE_STEPS))
    logits, steps = cached_decode(model, layout, attention, seq)
    for b, n in enumerate(prompt):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=tol, rtol=0, err_msg=f"prefill row {b}")
    for j, step in enumerate(steps):
        np.testing.assert_allclose(step, full[np.arange(3), prompt + j], atol=tol, rtol=0,
                                   err_msg=f"{case} decode step {j}")


def check_greedy_matches_hf(case, hf, model, new_tokens: int = 14, lengths=(7, 3, 12)) -> None:
    """Greedy tokens of ``generate`` (stopping at id 2, the tiny configs' eos) equal HF's, for
    prompts of ``lengths`` tokens."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in lengths]
    res = generate(model, prompts, new_tokens, stop_ids=[2])
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=new_tokens, eos_token_id=2, pad_token_id=0)
        assert res.tokens[i] == out[0, len(p):].tolist(), f"{case} row {i}"


def check_int8_twin(model, tol: float, rt=None) -> None:
    """``prepare(quantize="int8")`` equals the reference forward on the int8 round trip of the weights."""
    cfg = model.config
    rt = runtime.prepare(model.params, cfg, quantize="int8") if rt is None else rt
    tokens, lengths = batch(cfg)
    got = np.asarray(forward_jit(rt, cfg, tokens, lengths))
    want = np.asarray(forward_reference_jit(dequantized(model.params), cfg, tokens, lengths))
    assert rows_max_diff(got, want, lengths) <= tol


def check_written_checkpoint(hf, model, directory) -> None:
    """config.json (to_hf_dict) and tensor names written back: transformers loads them to the same logits."""
    import transformers

    out = write_hf_checkpoint(directory, model.config, model.params)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, **hf_load_kwargs(model.config.arch)).eval()
    assert type(again) is type(hf)
    tokens, lengths = batch(model.config)
    assert rows_max_diff(hf_logits(again, tokens, lengths), hf_logits(hf, tokens, lengths), lengths) <= 1e-5


def check_mesh_speculative_and_engine(model) -> None:
    """Greedy tokens of ``generate`` (one device) equal: a (2, 2) mesh (a (4, 1) one when the
    query heads are odd), the self-speculative draft (its first 2 layers) and the engine."""
    from realm_jax import sharding
    from realm_jax.engine import Engine
    from realm_jax.loading import Model
    from realm_jax.speculative import speculative_generate

    cfg = model.config
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (9, 2, 6)]
    ref = generate(model, prompts, 10, stop_ids=[]).tokens
    meshed = Model(cfg, model.params)
    split = 2 if cfg.num_heads % 2 == 0 else 1
    meshed.prepare(mesh=sharding.make_mesh(4 // split, split))
    assert generate(meshed, prompts, 10, stop_ids=[]).tokens == ref, "mesh"
    assert speculative_generate(model, "self:2", prompts, 10, stop_ids=[], k=3).tokens == ref, "self-speculative"
    eng = Engine(model, max_slots=2, max_seq_len=32, prefill_buckets=(16,), prefill_batch=1)
    handles = [eng.submit(p, 10, stop_ids=[]) for p in prompts]
    eng.run_until_idle()
    assert [h.result().tokens for h in handles] == ref, "engine"


def bad_gguf_cases(cases, change: str = "edit"):
    """``pytest.mark.parametrize`` over rows (id, change, meta, exc, match) of bad-file cases for
    ``check_bad_gguf_refused`` (``change``: the name of the row's tensor change argument)."""
    return pytest.mark.parametrize(f"{change},meta,exc,match", [c[1:] for c in cases], ids=[c[0] for c in cases])


def check_bad_gguf_refused(path, arch: str, hf_cfg, tensors: dict, meta: dict | None, exc, match: str) -> None:
    """``tensors`` (HF names) written as a GGUF of ``arch`` at ``path`` (``meta``: keys changed or,
    as None, left out) is refused with ``exc`` matching ``match`` and naming the file."""
    from gguf_reference import write_gguf

    write_gguf(path, arch, hf_cfg, tensors, extra_meta=meta)
    with pytest.raises(exc, match=match) as e:
        realm_jax.load(path, dtype="float32")
    assert path.name in str(e.value)
