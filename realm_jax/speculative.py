"""Speculative decoding: a draft proposes k tokens, the target checks them in one pass.

The whole loop runs inside one ``jit`` (``lax.while_loop``). Each round, per row:

1. the draft (see ``drafts.py``) proposes ``d_1..d_k`` with their distributions ``q_i``;
2. the target runs ``forward_cached`` once on ``[x_0, d_1, ..., d_k]`` (``x_0`` = the last
   committed token), giving ``p_1..p_{k+1}``;
3. ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``, left to right; at the
   first rejection a token is drawn from ``norm(max(0, p_i - q_i))``; if all k are accepted a
   bonus token is drawn from ``p_{k+1}`` (Leviathan et al. 2023; Chen et al. 2023). So every
   round commits ``a + 1`` tokens (``a`` accepted) distributed exactly as the target's sampler;
4. both caches roll back to the committed text (lowering lengths; nothing is recomputed).

p and q are both the distributions the sampling settings ask for (``processed_logits``:
temperature, top-k, top-p; greedy rows are one-hot, which makes greedy speculative decoding
token-identical to greedy decoding). Rows advance by different amounts; finished rows stop
advancing. Randomness: row b's round that starts after its g-th generated token uses
``fold_in(key(seed_b), g)`` split into the draft, acceptance and resampling keys, so a row's
output depends only on its own seed and text.

Adaptive k (``k="auto"``): with step costs ``c_draft`` (one draft step), ``c_verify(k)`` (one
target pass over k+1 tokens), ``c_plain`` (one plain decode step) and acceptance rate α, a round
commits ``(1 - α^(k+1)) / (1 - α)`` tokens in ``k c_draft + c_verify(k)`` seconds; ``choose_k``
picks the k in ``0..k_max`` with the most tokens per second, where k = 0 is plain decoding.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .drafts import MAX_K, Draft, check_k, make_draft
from .errors import RealmError
from .generation import (Controls, DecodeState, GenerationResult, bucket_cache, generate, new_cache, result_of, runtime_for,
                         prepare_request, register_constraints, release_constraint_keys, start)
from .kv_cache import KVCache, rollback
from .model import forward_cached
from .sampling import SamplingParams, processed_logits, sample


# ----------------------------------------------------------------------------- acceptance rule
def accept_tokens(p_logits, q_logits, drafts, uniforms, key_resample):
    """The rejection rule, per row.

    p_logits [B, k+1, V] (target, processed), q_logits [B, k, V] (draft, processed),
    drafts [B, k] int32, uniforms [B, k] in [0, 1), key_resample [B] keys
    -> (accepted [B] int32 in 0..k, next_token [B] int32).
    """
    k = drafts.shape[1]
    p = jax.nn.softmax(p_logits, axis=-1)
    q = jax.nn.softmax(q_logits, axis=-1)
    p_x = jnp.take_along_axis(p[:, :k], drafts[:, :, None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, drafts[:, :, None], axis=-1)[..., 0]
    ok = uniforms * q_x < p_x  # u < min(1, p/q), q_x > 0 since x was drawn from q
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    p_a = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # bonus: q = 0, residual = p
    q_a = jnp.take_along_axis(q_pad, accepted[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
    nxt = jax.vmap(jax.random.categorical)(key_resample, jnp.log(residual)).astype(jnp.int32)
    return accepted, nxt


def accept_greedy(logits, drafts):
    """The rule for greedy rows (p and q one-hot), with argmax alone: logits [B, k+1, V] (raw
    target logits), drafts [B, k] -> (accepted [B], next_token [B]); equals ``accept_tokens``
    on the one-hot distributions."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k+1]
    ok = drafts == best[:, :-1]
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return accepted, jnp.take_along_axis(best, accepted[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- the jitted loop
def _round_keys(seed, num_new, k, all_greedy):
    """seed [B] uint32, num_new [B] -> draft keys [B, k], uniforms [B, k], resample keys [B].
    An all-greedy batch uses no randomness: placeholder keys, no hashing."""
    def real(_):
        def one(s, g):
            ks = jax.random.split(jax.random.fold_in(jax.random.key(s), g), 3)
            return (jax.random.key_data(jax.random.split(ks[0], k)), jax.random.uniform(ks[1], (k,)),
                    jax.random.key_data(ks[2]))
        return jax.vmap(one)(seed, num_new)

    shapes = jax.eval_shape(real, None)
    placeholder = lambda _: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)  # noqa: E731
    dkeys, uniforms, rkeys = jax.lax.cond(all_greedy, placeholder, real, None)
    return jax.random.wrap_key_data(dkeys), uniforms, jax.random.wrap_key_data(rkeys)


class SpecState(NamedTuple):
    """Loop carry: generation's ``DecodeState`` (target cache, emitted tokens, done/stopped),
    the committed text ``seq`` [B, S + 1] (prompt then generated), the draft's state, and
    per-row counts [B]: target passes, drafted and accepted tokens."""

    dec: DecodeState
    seq: jax.Array
    draft: Any
    passes: jax.Array
    drafted: jax.Array
    accepted: jax.Array


def speculative_round(tparams, dparams, tcfg, spec, k: int, lengths, ctl: Controls, s: SpecState, *,
                      adapter_ids=None) -> SpecState:
    """One draft -> verify -> accept round for every live row (k >= 1).

    tparams / dparams: the target's and the draft's runtimes; adapter_ids [B]: per-row LoRA of
    the target's runtime (the verify pass). The draft proposes from its own runtime; the
    rejection rule keeps the output exact whatever the draft proposes."""
    dec, seq = s.dec, s.seq
    b = seq.shape[0]
    v = tcfg.vocab_size
    rows = jnp.arange(b)
    active = ~dec.done
    n = lengths + dec.num_new  # committed length; seq[n - 1] = dec.last
    all_greedy = jnp.all(ctl.sampling.temperature <= 0)
    dkeys, uniforms, rkey = _round_keys(ctl.sampling.seed, dec.num_new, k, all_greedy)
    drafts, q_logits, dstate = spec.propose(dparams, s.draft, seq, n, active, dkeys, ctl.sampling, k)
    verify = jnp.concatenate([dec.last[:, None], drafts], axis=1)
    t_logits, cache = forward_cached(tparams, tcfg, verify, jnp.where(active, k + 1, 0), dec.cache,
                                     adapter_ids=adapter_ids)
    grammar_end = None
    if ctl.constraint is not None:  # each verified position under its grammar mask (``emit``'s order)
        allowed, grammar_end = _grammar_masks(ctl.constraint, seq, n, dec, drafts, v)
        t_logits = jnp.where(allowed, t_logits, -jnp.inf)

    def sampled(_):
        sp_rows = jax.tree_util.tree_map(lambda a: jnp.repeat(a, k + 1), ctl.sampling)
        p_logits = processed_logits(t_logits.reshape(b * (k + 1), v), sp_rows).reshape(b, k + 1, v)
        return accept_tokens(p_logits, q_logits, drafts, uniforms, rkey)

    acc, nxt = jax.lax.cond(all_greedy, lambda _: accept_greedy(t_logits, drafts), sampled, None)

    i = jnp.arange(k + 1)[None, :]
    emitted = jnp.where(i < acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    hit = jnp.any(emitted[:, :, None] == ctl.stop_ids[:, None, :], axis=-1) & (i <= acc[:, None])
    stop_at = jnp.where(hit, i, k + 1).min(axis=1)
    count = jnp.minimum(jnp.minimum(acc + 1, stop_at + 1), ctl.limits - dec.num_new)
    count = jnp.where(active, count, 0)
    ends = jnp.zeros_like(active)
    if grammar_end is not None:  # the grammar allows nothing at a reached position: the row ends there
        end_at = jnp.where(grammar_end, i, k + 1).min(axis=1)
        ends = active & (end_at <= acc) & (end_at < count)
        count = jnp.where(ends, end_at, count)
    stopped = (active & (stop_at < count)) | ends
    keep = i < count[:, None]
    out = dec.out.at[rows[:, None], jnp.where(keep, dec.num_new[:, None] + i, dec.out.shape[1])].set(
        emitted, mode="drop")
    seq = seq.at[rows[:, None], jnp.where(keep, n[:, None] + i, seq.shape[1])].set(emitted, mode="drop")
    num_new = dec.num_new + count
    last = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    last = jnp.where(count > 0, last, dec.last)
    done = dec.done | stopped | (active & (num_new >= ctl.limits))
    # keep the KV of the committed text except its last token (the next round's first input)
    keep_len = jnp.maximum(lengths + num_new - 1, 0)
    cache = rollback(cache, keep_len)
    dstate = spec.rollback(dstate, keep_len)
    dec = dec._replace(cache=cache, last=jnp.where(active, last, dec.last), num_new=num_new, done=done,
                       stopped=dec.stopped | stopped, out=out)
    a_int = active.astype(jnp.int32)
    return SpecState(dec, seq, dstate, s.passes + a_int, s.drafted + k * a_int,
                     s.accepted + jnp.where(active, acc, 0))


def _grammar_masks(keys, seq, n, dec, drafts, vocab: int):
    """The grammar masks of a round's k + 1 verified positions ([B, k + 1, V] allowed, [B, k + 1]
    ends) from the rows' last k + 1 committed tokens (``seq`` [B, S + 1], ``n`` [B] committed
    lengths). A position where the grammar allows nothing keeps every logit (no row of -inf):
    the round ends the row before it."""
    from .constraints import draft_masks

    k1 = drafts.shape[1] + 1
    at = jnp.clip(n[:, None] - k1 + jnp.arange(k1)[None, :], 0, seq.shape[1] - 1)
    allowed, ends = draft_masks(keys, jnp.take_along_axis(seq, at, axis=1), dec.num_new, drafts, dec.done, vocab)
    return allowed | ends[..., None], ends


def speculative_on_device(tparams, dparams, tokens, lengths, cache: KVCache, ctl: Controls, *,
                          tcfg, spec, k: int, out_len: int, adapter_ids=None) -> SpecState:
    """Prompt pass + first token (generation's ``start``), the draft's prompt pass, then
    ``speculative_round`` in a ``lax.while_loop`` until every row is done.

    tokens [B, P] right-padded, lengths [B] (0 = padding row, born done), cache: the target's
    empty cache [L, B, S, K, H] (S >= P + max new tokens + k + 1 keeps every verified logit valid).
    """
    b, plen = tokens.shape
    lengths = lengths.astype(jnp.int32)
    dec = start(tparams, tcfg, tokens, lengths, cache, ctl, out_len=out_len, adapter_ids=adapter_ids)
    seq = jnp.zeros((b, cache.max_len + 1), jnp.int32).at[:, :plen].set(tokens)
    seq = seq.at[jnp.arange(b), lengths].set(dec.last)
    dstate = spec.init(dparams, tokens, lengths, cache.max_len)
    zeros = jnp.zeros((b,), jnp.int32)
    state = SpecState(dec, seq, dstate, zeros, zeros, zeros)
    return jax.lax.while_loop(lambda s: jnp.any(~s.dec.done),
                              partial(speculative_round, tparams, dparams, tcfg, spec, k, lengths, ctl,
                                      adapter_ids=adapter_ids),
                              state)


speculative_jit = jax.jit(speculative_on_device, static_argnames=("tcfg", "spec", "k", "out_len"),
                          donate_argnames=("cache",))


# ----------------------------------------------------------------------------- adaptive k
@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Seconds per step: ``draft`` (one draft step), ``verify[k]`` (one target pass over k+1
    tokens, k = 0..k_max) and ``plain`` (one plain decode step)."""

    draft: float
    verify: tuple[float, ...]
    plain: float

    @property
    def k_max(self) -> int:
        return len(self.verify) - 1


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens committed per round: (1 - α^(k+1)) / (1 - α) (k + 1 when α = 1)."""
    alpha = min(max(float(alpha), 0.0), 1.0)
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Speedup over plain decoding when verify costs one plain step and a draft step costs
    ``cost_ratio`` of it: (1 - α^(k+1)) / ((1 - α)(k c + 1))."""
    return expected_tokens(alpha, k) / (k * cost_ratio + 1.0)


def choose_k(alpha: float, costs: StepCosts, k_max: int | None = None) -> tuple[int, list[float]]:
    """k in 0..k_max maximizing expected tokens per second; returns (k, tokens/s for each k).

    k = 0 is plain decoding, 1 / c_plain tokens per second; it wins ties."""
    k_max = costs.k_max if k_max is None else min(k_max, costs.k_max)
    rates = [1.0 / costs.plain]
    for k in range(1, k_max + 1):
        rates.append(expected_tokens(alpha, k) / (k * costs.draft + costs.verify[k]))
    best = int(np.argmax(rates))
    return best, rates


_MEASURED: dict = {}  # (target cfg, dtype, draft spec, batch, cache_len, k_max, backend) -> StepCosts


def measure_costs(target, draft: Draft, batch: int, cache_len: int, k_max: int, *,
                  ks: Sequence[int] | None = None, context: int = 64, repeats: int = 8,
                  trials: int = 3, max_repeats: int = 2048) -> StepCosts:
    """Time one draft step, a target pass over k+1 tokens (k = 0..k_max; k = 0 is the plain
    decode step) at this batch and cache size, each inside a jitted loop (caches update in place,
    as in decoding); memoized per shape for the process.

    ``ks``: measure only these k (0 and k_max are always added; one compilation each) and
    interpolate the others linearly; None = all.
    """
    ks = sorted(set(range(k_max + 1) if ks is None else [0, k_max] + [int(x) for x in ks if 0 <= x <= k_max]))
    tcfg, tparams = target.config, target.runtime
    key = (tcfg, tparams.options, str(tparams.dtype), draft.spec, batch, cache_len, k_max, tuple(ks),
           jax.default_backend())
    if key in _MEASURED:
        return _MEASURED[key]
    ctx = max(1, min(context, cache_len - k_max - 2))
    tokens = jnp.ones((batch, ctx), jnp.int32)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    sp = SamplingParams.make(batch)

    @partial(jax.jit, static_argnames=("t",))
    def target_steps(params, reps, t):
        cache = new_cache(tcfg, params, batch, cache_len)
        _, cache = forward_cached(params, tcfg, tokens, lengths, cache)

        def step(_, c):
            cache, acc = c
            logits, cache = forward_cached(params, tcfg, jnp.ones((batch, t), jnp.int32),
                                           jnp.full((batch,), t, jnp.int32), cache)
            tok = sample(logits[:, -1], sp, jnp.zeros((batch,), jnp.int32))
            return rollback(cache, lengths), acc + tok.sum()
        return jax.lax.fori_loop(0, reps, step, (cache, jnp.int32(0)))[1]

    @jax.jit
    def draft_steps(params, reps):
        st = draft.spec.init(params, tokens, lengths, cache_len)
        seq = jnp.ones((batch, cache_len + 1), jnp.int32)
        n = lengths + 1
        keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 1))(sp.seed)

        def step(_, c):
            st, acc = c
            d, _, st = draft.spec.propose(params, st, seq, n, jnp.ones((batch,), bool), keys, sp, 1)
            return draft.spec.rollback(st, lengths), acc + d.sum()
        return jax.lax.fori_loop(0, reps, step, (st, jnp.int32(0)))[1]

    def per_step(fn, *a, **kw):
        """(time of 2R steps - time of R steps) / R, each the fastest of ``trials`` runs, so the
        prompt pass and the dispatch cancel out; R grows until the steps dominate the noise."""
        jax.block_until_ready(fn(*a, jnp.int32(1), **kw))  # compile + warm up

        def best(reps):
            ts = []
            for _ in range(trials):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*a, jnp.int32(reps), **kw))
                ts.append(time.perf_counter() - t0)
            return min(ts)

        reps = repeats
        while True:
            t1, t2 = best(reps), best(2 * reps)
            if t2 - t1 > 0.25 * t1 or reps >= max_repeats:
                return max(t2 - t1, 1e-9) / reps
            reps *= 4

    measured = [per_step(target_steps, tparams, t=kk + 1) for kk in ks]
    verify = tuple(float(x) for x in np.interp(np.arange(k_max + 1), ks, measured))
    d = per_step(draft_steps, draft.params)
    costs = StepCosts(draft=d, verify=verify, plain=verify[0])
    _MEASURED[key] = costs
    return costs


# ----------------------------------------------------------------------------- statistics
@dataclasses.dataclass
class SpeculativeStats:
    """What one speculative call did. Counts are totals over rows (per-row arrays alongside).

    ``tokens_per_pass`` counts tokens committed by the decode rounds (the first token, from the
    prompt pass, is not a round) per target pass; ``acceptance_rate`` = accepted / drafted."""

    k: int
    draft: str
    drafted: int
    accepted: int
    target_passes: int
    decode_tokens: int
    acceptance_rate: float
    tokens_per_pass: float
    drafted_per_row: np.ndarray
    accepted_per_row: np.ndarray
    passes_per_row: np.ndarray
    alpha_used: float | None = None  # the acceptance estimate adaptive k decided with
    predicted_speedup: float | None = None  # expected tokens/s of the chosen k over plain decoding
    costs: StepCosts | None = None

    def summary(self) -> str:
        s = (f"draft={self.draft} k={self.k} drafted={self.drafted} accepted={self.accepted} "
             f"acceptance={self.acceptance_rate:.3f} tokens/pass={self.tokens_per_pass:.2f}")
        if self.predicted_speedup is not None:
            s += f" predicted_speedup={self.predicted_speedup:.2f} (alpha={self.alpha_used:.3f})"
        return s


def _stats(k, draft_name, raw, alpha=None, speedup=None, costs=None) -> SpeculativeStats:
    passes, drafted, accepted = (np.asarray(raw[n]) for n in ("passes", "drafted", "accepted"))
    decode_tokens = int(np.sum(np.asarray(raw["gen"]) - 1))
    return SpeculativeStats(
        k=k, draft=draft_name, drafted=int(drafted.sum()), accepted=int(accepted.sum()),
        target_passes=int(passes.sum()), decode_tokens=decode_tokens,
        acceptance_rate=float(accepted.sum() / drafted.sum()) if drafted.sum() else 0.0,
        tokens_per_pass=float(decode_tokens / passes.sum()) if passes.sum() else 0.0,
        drafted_per_row=drafted, accepted_per_row=accepted, passes_per_row=passes,
        alpha_used=alpha, predicted_speedup=speedup, costs=costs)


# ----------------------------------------------------------------------------- entry point
@dataclasses.dataclass
class SpeculativeResult(GenerationResult):
    """``GenerationResult`` plus ``stats`` (a ``SpeculativeStats``)."""

    stats: SpeculativeStats | None = None


# ``Sampling`` settings that speculative decoding does not serve yet (refused when not default).
_NOT_SPECULATIVE = ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias",
                    "min_tokens", "stop", "logprobs", "prompt_logprobs", "n", "best_of")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise RealmError(f"{name}: expected an integer >= {low}, got {value!r}")


def speculative_generate(target, draft, prompts, max_new_tokens, *, k: int | str = 4, temperature=0.0,
                         top_k=None, top_p=None, seed=0, stop_ids=None, max_len: int | None = None,
                         chat: bool = False, k_max: int = 8, costs: StepCosts | None = None,
                         acceptance: float | None = None, adapters=None, adapter_ids=None,
                         sampling=None, constraint=None) -> SpeculativeResult:
    """``generate`` with speculative decoding; the same output distribution (greedy: the same
    tokens), fewer target passes.

    target: a loaded Model. draft: a loaded Model with the target's vocabulary and special
    tokens, ``"self:N"`` (the target's first N layers + final norm + head), ``"lookup"``
    (n-gram prompt lookup) or a ``drafts.Draft`` (keeps its running acceptance across calls).
    prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, max_len, chat: as
    ``generate``. k: tokens drafted per round (0 = plain decoding), or ``"auto"``: chosen in
    ``0..k_max`` by ``choose_k`` from ``costs`` (measured once per shape when None) and the
    acceptance rate (``acceptance``, else the draft's running rate).
    adapters / adapter_ids: per-row LoRA of the target, as ``generate`` (the draft runs without).
    sampling: a ``Sampling`` with only the draw settings (temperature, top_k, top_p, seed) and
    ``constraint``; the others are refused for now. constraint: one ``Constraint`` for every row
    or one (or None) per prompt, as ``generate``'s: the target verifies each drafted position
    under its grammar mask, so a draft that breaks the grammar is rejected and the output
    distribution is ``generate``'s with that constraint (greedy: the same tokens).
    Returns a ``SpeculativeResult`` (a ``GenerationResult`` with ``stats``).
    """
    if k != "auto":
        _check_int("k", k, 0)
        if k:
            check_k(k)
    _check_int("k_max", k_max, 0)
    if k_max > MAX_K:
        raise RealmError(f"k_max: expected at most drafts.MAX_K={MAX_K} (tokens drafted per round), got {k_max}")
    if acceptance is not None:
        try:
            ok = 0.0 <= float(acceptance) <= 1.0 and not isinstance(acceptance, bool)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise RealmError(f"acceptance: expected a rate in [0, 1], got {acceptance!r}")
    dr = make_draft(target, draft)
    if sampling is not None:
        unsupported = [f for f in sampling.non_default() if f in _NOT_SPECULATIVE]
        if unsupported:
            raise RealmError(f"speculative_generate: {', '.join(unsupported)} not supported yet (use generate)")
        temperature, top_k, top_p, seed = sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed
        constraint = sampling.constraint if constraint is None else constraint
    req, pad = prepare_request(target, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop_ids=stop_ids, max_len=max_len, adapters=adapters,
                               adapter_ids=adapter_ids, chat=chat, constraint=constraint)
    aid = None if pad.adapter_ids is None else jnp.asarray(pad.adapter_ids)
    b = pad.tokens.shape[0]
    k_room = k_max if k == "auto" else k
    cache_len = pad.cache_len if max_len is not None else bucket_cache(
        int((req.prompt_lengths + req.max_new_tokens).max()) + k_room + 1)

    alpha = speedup = None
    chosen = k
    if k == "auto":
        if costs is None:
            costs = measure_costs(target, dr, b, cache_len, k_max)
        alpha = dr.acceptance if acceptance is None else float(acceptance)
        chosen, rates = choose_k(alpha, costs, k_max)
        speedup = rates[chosen] / rates[0]
    if chosen == 0:  # plain decoding is the faster choice (or was asked for)
        res = generate(target, req.prompt_ids, req.max_new_tokens.tolist(), temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stop_ids=stop_ids, max_len=max_len, adapters=adapters,
                       adapter_ids=adapter_ids, constraint=constraint)
        passes = np.asarray([max(len(t) - 1, 0) for t in res.tokens])
        zero = np.zeros_like(passes)
        stats = _stats(0, dr.name, dict(passes=passes, drafted=zero, accepted=zero, gen=passes + 1),
                       alpha, speedup, costs)
        return SpeculativeResult(res.tokens, res.texts, res.finish_reasons, res.prompt_lengths, stats=stats)

    check_k(chosen, cache_len)
    rt = runtime_for(target, adapters)
    cache = new_cache(target.config, rt, b, cache_len)
    keys = register_constraints(req)
    try:
        final = speculative_jit(rt, dr.params, jnp.asarray(pad.tokens), jnp.asarray(pad.lengths), cache,
                                Controls.of(pad, keys), tcfg=target.config, spec=dr.spec, k=int(chosen),
                                out_len=cache_len, adapter_ids=aid)
        out, num_new, stopped, passes, drafted, accepted = jax.device_get(
            (final.dec.out, final.dec.num_new, final.dec.stopped, final.passes, final.drafted, final.accepted))
    finally:
        release_constraint_keys(keys)
    rb = req.batch
    stats = _stats(int(chosen), dr.name, dict(passes=passes[:rb], drafted=drafted[:rb], accepted=accepted[:rb],
                                              gen=num_new[:rb]), alpha, speedup, costs)
    dr.record(stats.drafted, stats.accepted)
    res = result_of(target, req, out, num_new, stopped)
    return SpeculativeResult(res.tokens, res.texts, res.finish_reasons, res.prompt_lengths, stats=stats)
