"""The speculative program's size and compile time grow about linearly in k (tokens drafted per
round), for prompt lookup and for a model draft: the proposers run over fixed shapes (one gather
for lookup, a scan for models), not Python loops unrolled over k. ``drafts.MAX_K`` bounds k.

Two measures: the lowered program's operation count (deterministic, the sharp test: an
unrolled k * k loop makes it quadratic), and the wall-clock compile time at k = 4, 16, 32
(noisy, so compared with generous slack)."""

from __future__ import annotations

import re
import time

import jax.numpy as jnp
import pytest

from realm_jax.config import ModelConfig
from realm_jax.drafts import MAX_K, make_draft
from realm_jax.errors import RealmError
from realm_jax.generation import Controls, new_cache, pad_request, validate_request
from realm_jax.loading import Model
from realm_jax.params import init_params
from realm_jax.speculative import speculative_jit

CFG = ModelConfig(arch="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8, max_position_embeddings=256, eos_token_ids=(2,))
S = 128  # cache length


@pytest.fixture(scope="module")
def target():
    return Model(CFG, init_params(CFG, 0), None)


def _lowered(target, draft, k: int):
    req = validate_request(CFG, [[1, 2, 3, 1, 2]], 8, max_len=S, stop_ids=[])
    pad = pad_request(req)
    rt = target.runtime
    cache = new_cache(CFG, rt, pad.tokens.shape[0], S)
    return speculative_jit.lower(rt, draft.params, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths), cache,
                                 Controls.of(pad), tcfg=CFG, spec=draft.spec, k=k, out_len=S)


def _ops(lowered) -> int:
    """Operations in the lowered StableHLO program (one per ``%x = op`` line)."""
    return len(re.findall(r"^\s*%\S+ = ", lowered.as_text(), flags=re.M))


@pytest.mark.parametrize("kind", ["lookup", "self:1"])
def test_program_size_and_compile_time_grow_linearly_in_k(target, kind):
    draft = make_draft(target, kind)
    ks = (4, 8, 16, 32)
    lowered = {k: _lowered(target, draft, k) for k in ks}
    ops = {k: _ops(lowered[k]) for k in ks}
    # linear growth a + b k doubles the step from (8 -> 16) to (16 -> 32); quadratic quadruples it
    assert ops[32] - ops[16] <= 2.5 * (ops[16] - ops[8]) + 40, ops
    assert ops[32] <= 2 * ops[4] + 200, ops  # and what grows is small beside the whole program

    seconds = {}
    for k in (4, 16, 32):
        t0 = time.perf_counter()
        lowered[k].compile()
        seconds[k] = time.perf_counter() - t0
    # about linear: from 16 to 32 at most ~2.5x the time of 16 (a quadratic program: ~4x), with
    # slack for a busy machine
    assert seconds[32] <= 2.5 * seconds[16] + 3.0, seconds
    assert seconds[16] <= 4.0 * seconds[4] + 3.0, seconds


def test_k_is_bounded(target):
    """k beyond ``MAX_K`` or beyond what the cache holds is refused when the program is built,
    naming the bound (no compile of a huge program)."""
    draft = make_draft(target, "lookup")
    with pytest.raises(RealmError, match=rf"k: expected an integer in \[1, {MAX_K}\].*got {MAX_K + 1}"):
        _lowered(target, draft, MAX_K + 1)
    small = Model(CFG.replace(max_position_embeddings=256), target.params, None)
    req = validate_request(CFG, [[1, 2]], 2, max_len=16, stop_ids=[])
    pad = pad_request(req)
    with pytest.raises(RealmError, match=r"k: 16 drafted tokens .* do not fit in a cache of 16 positions"):
        speculative_jit.lower(small.runtime, None, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths),
                              new_cache(CFG, small.runtime, 1, 16), Controls.of(pad), tcfg=CFG, spec=draft.spec, k=16,
                              out_len=16)
