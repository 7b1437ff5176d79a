"""Paged KV cache benchmark (issue 16): the paged engine against the dense one on decode speed,
concurrency in a fixed memory budget, prefix caching and chunked prefill.

    python benchmarks/paged.py                          # GPU: Llama-3.2-1B shape (random bf16), all four parts
    python benchmarks/paged.py --parts decode prefix    # some of them
    python benchmarks/paged.py --tiny                   # the tiny config, small sizes (CPU smoke test)

Random weights, greedy, no stop ids (every request runs to its budget), random prompt ids drawn
from a seeded generator. Block size ``--block-size`` (16). Parts 1-3 share one max_seq_len S
(1088 by default: the chat of part 3 fits, see there); engines whose settings are the same are
built once and serve every part that uses them (their prompt buckets and prefill sizes are the
union of what those parts need). Each engine is given only the prompt buckets (``prefill_buckets``)
and prefill sizes (``prefill_batch``) its parts use, since every (rows, bucket) pair is one
compiled program; a paged engine also compiles a bucket of S (for preempted requests). JAX's
persistent compilation cache is on. Each engine's ``warmup()`` is timed and its compilations
counted (``engines`` in the JSON), and every part checks that its timed runs compiled nothing.

1. **decode** (target: paged ms/step within 10% of dense): for each batch B in
   ``--decode-batches`` (1 and 64), a dense ``Engine(max_slots=B, max_seq_len=S)`` and a paged one
   (``block_size``, default pool = the dense cache's memory) each get B requests of
   ``--decode-prompt`` (128) tokens and ``--decode-new`` (512) new tokens, all submitted at once,
   ``--steps-per-call`` (16) steps per decode call, prompt bucket 256, prefill calls of
   min(B, ``--decode-prefill-batch`` (8)) rows. The loop is driven with ``step()`` and timed
   after every step; ms/step = the median duration of the steps that delivered exactly one decode
   call and ran no prefill (the first two and last two such steps dropped), divided by the steps
   per call. While the device is the bottleneck, a step lasts one decode call (the host's
   bookkeeping of call N-1 overlaps call N). Median over ``--decode-repeats`` (3) passes.

2. **memory** (target: paged >= 2x concurrent sequences and >= 1.3x tokens/s, same memory): the
   dense engine has ``--memory-slots`` (64) slots of S rows; the paged one ``--memory-paged-slots``
   (4x as many) and ``num_blocks = dense slots x S / block size`` (the same KV rows). Both get the
   same ``--memory-requests`` (1024) requests at t = 0: prompts uniform in ``[--memory-prompt-min,
   --memory-prompt-max]`` (32..256), budgets mostly short (1 + an exponential of mean
   ``--memory-short-mean`` (64), clipped to ``--memory-short-max`` (256)) with a long tail: a
   fraction ``--memory-tail`` (0.1) uniform in ``[--memory-tail-min, S - prompt max]``
   (512..832). Prompt bucket 256, prefill calls of 1 or 8 rows (``--memory-prefill-batch``); the
   dense engine is the decode part's B = 64 one. Driven with ``step()``, sampling ``stats()``
   after every step. The **saturated** window runs from the submission to the step after which
   the queue is first empty (every request admitted); the target is judged on it: concurrency =
   running slots per decode call (``mean_occupancy`` x slots over the window's calls), tokens/s =
   tokens delivered in the window / its length. The whole run (through the drain of the long
   tail, where a finite workload no longer fills either engine) is reported too: tokens/s = all
   tokens / wall, mean running slots over all calls, the largest number of occupied slots after
   any step, preemptions.

3. **prefix** (target: >= 5x lower TTFT with ``prefix_caching=True``): ``--prefix-conversations``
   (4) independent chats of ``--prefix-turns`` (8) turns. Turn 1's prompt is
   ``--prefix-first`` (128) random tokens; turn t + 1's prompt = turn t's prompt + the answer the
   engine generated to it (``--prefix-answer``, 64 tokens) + a new user message
   (``--prefix-user``, 64 random tokens), so prompts are 128, 256, ..., 1024 tokens and S = 1024 +
   64 = 1088. Turns go round-robin over the chats (turn 1 of every chat, then turn 2, ...), one
   request at a time on an idle engine (one slot), so TTFT (submit to the first token on the
   host) is the admission alone. Without caching: the paged engine of part 1 (B = 1), prompt
   buckets ``--prefix-buckets`` (default 256, 512, 768, S: at most 25% padding past turn 1); with
   caching: the same engine with ``prefix_caching=True``, a pool of (chats + 2) x S positions (every
   chat's history stays cached) and buckets of the longest uncached part (turn 1's prompt, or the
   partial block + answer + user message after the cached blocks: 128) and S (the largest bucket
   bounds whole prompts; a paged engine compiles it anyway). An untimed 2-turn chat
   warms each engine first. Judged on the mean TTFT over turns 2..8 (turn 1 has nothing cached);
   the JSON has every turn's TTFTs and the hit rate.

4. **chunked** (the issue's figure is the running requests' inter-token latency p99 during a long
   prefill, with ``prefill_chunk`` against without; no numeric target is given here): a paged
   engine of ``--chunked-running`` (32) + 1 slots, max_seq_len = the long prompt + its budget
   rounded up to 64 (8256), prompt buckets 128 and 8256 (chunked: and 512), prefill calls of one
   row, ``--chunked-steps-per-call`` (4) steps per decode call (fewer than the other parts, so
   that a decode call is short next to the long prefill and a stall shows). The 32 requests
   (``--chunked-prompt``, 128 tokens, budgets to the end of the run: they are cancelled after)
   are admitted and decode ``--chunked-calls`` (4) calls; then one ``--chunked-long`` (8192)
   token prompt (``--chunked-long-new``, 8 new tokens) arrives; once it has its first token and
   ended, ``--chunked-calls`` more calls run, and the next long prompt arrives
   (``--chunked-repeats``, 2, in all). Without chunking the long prompt is one prefill call; with
   ``--chunked-size`` (512) it is prefilled 512 tokens per step between the decode calls. The
   running requests' token arrivals are logged with ``on_update``: tokens reach the host once
   per decode call (up to ``decode_steps_per_call`` at a time), so the figure reported is the
   **delivery gap** (time between two successive deliveries to one request) over the gaps that
   overlap a long prompt's prefill window (its submit to its first token); ``itl_*`` divides
   each gap by the tokens it delivered (an even spread: a client sees the gap, then a burst).
   ``baseline_gap_p50_ms`` is the gap before the first long prompt.

Prints a markdown summary (device, date, versions) and writes every raw number, the targets and
whether they are met to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from realm_jax.bench import SHAPES, random_params  # noqa: E402
from realm_jax.compilation_cache import enable_compilation_cache  # noqa: E402
from realm_jax.config import ModelConfig  # noqa: E402
from realm_jax.engine import Engine  # noqa: E402
from realm_jax.loading import Model  # noqa: E402

PARTS = ("decode", "memory", "prefix", "chunked")

# name: (GPU default, --tiny default); None = derived from other sizes (see resolve)
DEFAULTS = {
    "block_size": (16, 16), "steps_per_call": (16, 16),
    "decode_batches": ([1, 64], [1, 8]), "decode_prompt": (128, 32), "decode_new": (512, 64),
    "decode_repeats": (3, 1), "decode_prefill_batch": (8, 4),
    "memory_slots": (None, None), "memory_paged_slots": (None, None), "memory_requests": (1024, 96),
    "memory_prompt_min": (32, 8), "memory_prompt_max": (256, 64), "memory_short_mean": (64.0, 16.0),
    "memory_short_max": (256, 64), "memory_tail": (0.1, 0.1), "memory_tail_min": (512, 128),
    "memory_tail_max": (None, None), "memory_prefill_batch": ([1, 8], [1, 4]),
    "prefix_turns": (8, 8), "prefix_first": (128, 32), "prefix_answer": (64, 16), "prefix_user": (64, 16),
    "prefix_conversations": (4, 2),
    "chunked_running": (32, 8), "chunked_prompt": (128, 32), "chunked_long": (8192, 1024),
    "chunked_long_new": (8, 8), "chunked_size": (512, 128), "chunked_steps_per_call": (4, 4),
    "chunked_repeats": (2, 2), "chunked_calls": (4, 4),
}


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ------------------------------------------------------------------------------ sizes
def resolve(args) -> argparse.Namespace:
    """Every size: the command line's, else the GPU or --tiny default, else derived."""
    tiny = args.tiny or args.config == "tiny"
    z = argparse.Namespace(tiny=tiny, config=args.config or ("tiny" if tiny else "llama-1b"),
                           prefix_buckets=args.prefix_buckets)
    for name, (big, small) in DEFAULTS.items():
        v = getattr(args, name)
        setattr(z, name, v if v is not None else (small if tiny else big))
    bs = z.block_size
    # parts 1-3: one max_seq_len, the last chat turn's prompt and answer
    chat = z.prefix_first + (z.prefix_turns - 1) * (z.prefix_answer + z.prefix_user) + z.prefix_answer
    z.max_seq_len = args.max_seq_len or round_up(chat, bs)
    z.short_bucket = round_up(max(z.decode_prompt, z.memory_prompt_max), 16)  # parts 1 and 2's prompts
    z.memory_slots = z.memory_slots or max(z.decode_batches)  # the decode part's dense engine, reused
    z.memory_paged_slots = z.memory_paged_slots or 4 * z.memory_slots
    z.memory_tail_max = z.memory_tail_max or z.max_seq_len - z.memory_prompt_max
    z.memory_blocks = z.memory_slots * z.max_seq_len // bs
    if z.prefix_buckets is None:
        step, last = 2 * z.prefix_first, chat_lengths(z)[-1]
        z.prefix_buckets = [b for b in range(step, z.max_seq_len, step) if b < last] + [z.max_seq_len]
    z.prefix_cached_bucket = round_up(max(uncached_parts(z)), 16)
    z.prefix_blocks = (z.prefix_conversations + 2) * z.max_seq_len // bs
    z.chunked_seq_len = round_up(z.chunked_long + z.chunked_long_new, max(64, bs))
    return z


def chat_lengths(z) -> list[int]:
    """The prompt length of each chat turn."""
    return [z.prefix_first + t * (z.prefix_answer + z.prefix_user) for t in range(z.prefix_turns)]


def uncached_parts(z) -> list[int]:
    """Tokens each turn prefills with prefix caching: its prompt after the full blocks of the
    previous turn's prompt and answer (all but the answer's last token are in the cache)."""
    lens, bs = chat_lengths(z), z.block_size
    return [lens[0]] + [n - bs * ((prev + z.prefix_answer - 1) // bs) for prev, n in zip(lens, lens[1:])]


def check_sizes(z) -> None:
    """Refuse sizes the engines would refuse, before anything is compiled."""
    s, bs = z.max_seq_len, z.block_size
    problems = []
    if s % bs or z.chunked_seq_len % bs:
        problems.append(f"max_seq_len {s} / {z.chunked_seq_len}: not multiples of --block-size {bs}")
    if z.decode_prompt + z.decode_new > s:
        problems.append(f"--decode-prompt + --decode-new > max_seq_len {s}")
    if z.memory_prompt_max + max(z.memory_tail_max, z.memory_short_max) > s:
        problems.append(f"--memory-prompt-max + the longest budget > max_seq_len {s}")
    if z.memory_tail_min > z.memory_tail_max or z.memory_prompt_min > z.memory_prompt_max:
        problems.append("a --memory-*-min above its max")
    if chat_lengths(z)[-1] + z.prefix_answer > s or max(z.prefix_buckets) > s:
        problems.append(f"the last chat turn or a --prefix-buckets entry exceeds max_seq_len {s}")
    if chat_lengths(z)[-1] > max(z.prefix_buckets):
        problems.append("the last chat turn's prompt is over the largest --prefix-buckets entry")
    if z.chunked_size > z.chunked_long or z.chunked_prompt >= z.chunked_seq_len:
        problems.append("--chunked-size over --chunked-long, or --chunked-prompt over its max_seq_len")
    if problems:
        raise SystemExit("paged.py: " + "; ".join(problems))


# ------------------------------------------------------------------------------ engines
class EngineKey(NamedTuple):
    """The settings that make an engine's programs: engines with the same key are shared."""

    slots: int
    max_seq_len: int
    block_size: int | None = None
    num_blocks: int | None = None  # None: the default (the dense cache's memory)
    prefix_caching: bool = False
    prefill_chunk: int | None = None
    steps: int = 16

    @property
    def name(self) -> str:
        s = f"{'paged' if self.block_size else 'dense'} B={self.slots} S={self.max_seq_len} W={self.steps}"
        if self.num_blocks:
            s += f" blocks={self.num_blocks}"
        if self.prefix_caching:
            s += " prefix-cache"
        if self.prefill_chunk:
            s += f" chunk={self.prefill_chunk}"
        return s


class Use(NamedTuple):
    """What a part needs of an engine: its key, prompt buckets and prefill sizes."""

    key: EngineKey
    buckets: tuple
    rows: tuple


def plans(z) -> dict[str, dict]:
    """Each part's engines by role."""
    s, bs, w = z.max_seq_len, z.block_size, z.steps_per_call
    out = {"decode": {}, "memory": {}, "prefix": {}, "chunked": {}}
    for b in z.decode_batches:
        rows = (min(b, z.decode_prefill_batch),)
        out["decode"][("dense", b)] = Use(EngineKey(b, s, steps=w), (z.short_bucket,), rows)
        out["decode"][("paged", b)] = Use(EngineKey(b, s, bs, steps=w), (z.short_bucket,), rows)
    rows = tuple(r for r in z.memory_prefill_batch)
    out["memory"]["dense"] = Use(EngineKey(z.memory_slots, s, steps=w), (z.short_bucket,), rows)
    out["memory"]["paged"] = Use(EngineKey(z.memory_paged_slots, s, bs, z.memory_blocks, steps=w),
                                 (z.short_bucket,), rows)
    out["prefix"]["plain"] = Use(EngineKey(1, s, bs, steps=w), tuple(z.prefix_buckets), (1,))
    # the largest bucket bounds whole prompts, cached or not; the uncached parts fit the small one
    out["prefix"]["cached"] = Use(EngineKey(1, s, bs, z.prefix_blocks, True, steps=w), (z.prefix_cached_bucket, s),
                                  (1,))
    cs, cw, short = z.chunked_seq_len, z.chunked_steps_per_call, round_up(z.chunked_prompt, 16)
    out["chunked"]["plain"] = Use(EngineKey(z.chunked_running + 1, cs, bs, steps=cw), (short, cs), (1,))
    out["chunked"]["chunked"] = Use(EngineKey(z.chunked_running + 1, cs, bs, prefill_chunk=z.chunked_size, steps=cw),
                                    (short, z.chunked_size, cs), (1,))
    return out


class Compiles:
    """Counts XLA compilations (persistent-cache hits included) and their seconds, process-wide."""

    def __init__(self):
        self.n, self.seconds, self.hits = 0, 0.0, 0
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, name, secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            self.n += 1
            self.seconds += secs

    def _event(self, name, **_):
        if name == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def snapshot(self) -> tuple[int, float, int]:
        return self.n, self.seconds, self.hits


def programs(eng: Engine) -> int:
    """The programs ``warmup()`` compiles: one admission per (rows, bucket; paged: plus a bucket
    of max_seq_len) and the decode call (the empty state is compiled when the engine is built)."""
    buckets = len(eng.prefill_buckets) + bool(eng.block_size and eng.prefill_buckets[-1] < eng.max_seq_len)
    return len(eng.prefill_rows) * buckets + 1


class Engines:
    """The engines of the selected parts, built and warmed up on first use, closed after the
    last part that uses them."""

    def __init__(self, model, uses: dict[str, dict], parts: list[str], compiles: Compiles):
        self.model, self.compiles = model, compiles
        self.buckets, self.rows, self.last = collections.defaultdict(set), collections.defaultdict(set), {}
        for part in parts:
            for use in uses[part].values():
                self.buckets[use.key] |= set(use.buckets)
                self.rows[use.key] |= set(use.rows)
                self.last[use.key] = part
        self.live: dict[EngineKey, Engine] = {}
        self.records: list[dict] = []

    def get(self, key: EngineKey) -> Engine:
        if key not in self.live:
            self.live[key] = self._build(key)
        return self.live[key]

    def _build(self, key: EngineKey) -> Engine:
        c0, t = self.compiles.snapshot(), time.perf_counter()
        eng = Engine(self.model, max_slots=key.slots, max_seq_len=key.max_seq_len,
                     prefill_buckets=sorted(self.buckets[key]), prefill_batch=sorted(self.rows[key]),
                     decode_steps_per_call=key.steps, block_size=key.block_size, num_blocks=key.num_blocks,
                     prefix_caching=key.prefix_caching, prefill_chunk=key.prefill_chunk)
        build, t = time.perf_counter() - t, time.perf_counter()
        c1 = self.compiles.snapshot()
        eng.warmup()
        warm = time.perf_counter() - t
        c2 = self.compiles.snapshot()
        rec = {"name": key.name, **key._asdict(), "num_blocks": eng.num_blocks,
               "prefill_buckets": list(eng.prefill_buckets), "prefill_rows": list(eng.prefill_rows),
               "build_s": build, "build_compiles": c1[0] - c0[0], "programs_expected": programs(eng),
               "warmup_s": warm, "compiles": c2[0] - c1[0], "compile_s": c2[1] - c1[1], "cache_hits": c2[2] - c1[2]}
        self.records.append(rec)
        print(f"engine {key.name}: buckets {rec['prefill_buckets']} rows {rec['prefill_rows']}, warm-up {warm:.1f} s "
              f"({rec['compiles']} compilations, {rec['cache_hits']} from the persistent cache)", flush=True)
        return eng

    def done(self, part: str) -> None:
        for key in [k for k, p in self.last.items() if p == part and k in self.live]:
            self.live.pop(key).close()


# ------------------------------------------------------------------------------ driving
class Sample(NamedTuple):
    """The engine after one ``step()``: seconds since t0 and ``stats()`` counters."""

    t: float
    decode_calls: int
    prefill_calls: int
    active: int
    queued: int
    tokens: int
    occupancy_sum: float  # running slots / slots, summed over decode calls


def sample(eng: Engine, t0: float) -> Sample:
    st = eng.stats()
    return Sample(time.perf_counter() - t0, st.decode_calls, st.prefill_calls, st.active_slots, st.queue_length,
                  st.generated_tokens, st.mean_occupancy * st.decode_calls)


def drive(eng: Engine, t0: float, until=None) -> list[Sample]:
    """Step the engine (from this thread) until ``until()`` holds or it is idle; a sample before
    the first step and after every step."""
    out = [sample(eng, t0)]
    while (until is None or not until()) and eng.step():
        out.append(sample(eng, t0))
    return out


def random_ids(rng, n: int, vocab: int) -> list[int]:
    return rng.integers(3, vocab, n).tolist()


def fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def pct(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


# ------------------------------------------------------------------------------ 1. decode
def decode_pass(eng: Engine, prompts: list, new: int) -> dict:
    t0 = time.perf_counter()
    hs = [eng.submit(p, new, stop_ids=[]) for p in prompts]
    samples = drive(eng, t0)
    assert all(len(h.result().tokens) == new for h in hs)
    gaps = [b.t - a.t for a, b in zip(samples, samples[1:])
            if b.decode_calls == a.decode_calls + 1 and b.prefill_calls == a.prefill_calls]
    steady = gaps[2:-2] if len(gaps) > 6 else gaps
    w = eng.decode_steps_per_call
    return {"ms_per_step": 1e3 * statistics.median(steady) / w, "ms_per_step_mean": 1e3 * np.mean(steady) / w,
            "calls_timed": len(steady), "wall_s": samples[-1].t,
            "ttft_mean_s": float(np.mean([h.ttft for h in hs]))}


def part_decode(z, engs: dict, vocab: int, rng) -> dict:
    rows = []
    for b in z.decode_batches:
        prompts = [random_ids(rng, z.decode_prompt, vocab) for _ in range(b)]
        row = {"batch": b}
        for kind in ("dense", "paged"):
            passes = [decode_pass(engs[kind, b], prompts, z.decode_new) for _ in range(z.decode_repeats)]
            row[kind] = {"ms_per_step": statistics.median(p["ms_per_step"] for p in passes), "passes": passes}
            print(f"decode B={b} {kind}: {row[kind]['ms_per_step']:.3f} ms/step", flush=True)
        row["paged_over_dense"] = row["paged"]["ms_per_step"] / row["dense"]["ms_per_step"]
        rows.append(row)
    targets = [target("decode", f"paged / dense ms per step, batch {r['batch']}", "<= 1.10", r["paged_over_dense"],
                      r["paged_over_dense"] <= 1.10) for r in rows]
    return {"rows": rows, "targets": targets}


# ------------------------------------------------------------------------------ 2. memory
def mixed_workload(z, vocab: int, rng) -> tuple[list, list]:
    n = z.memory_requests
    lens = rng.integers(z.memory_prompt_min, z.memory_prompt_max + 1, n)
    short = np.clip(1 + rng.exponential(z.memory_short_mean - 1, n).astype(int), 1, z.memory_short_max)
    tail = rng.integers(z.memory_tail_min, z.memory_tail_max + 1, n)
    news = np.where(rng.random(n) < z.memory_tail, tail, short)
    return [random_ids(rng, int(p), vocab) for p in lens], [int(x) for x in news]


def window(samples: list[Sample], i: int, j: int, slots: int) -> dict:
    """Throughput and concurrency between samples i and j."""
    a, b = samples[i], samples[j]
    calls = b.decode_calls - a.decode_calls
    span = b.t - a.t
    busy = sum(s.active * (s.t - r.t) for r, s in zip(samples[i:j], samples[i + 1:j + 1]))
    return {"seconds": span, "tokens": b.tokens - a.tokens, "tokens_per_s": (b.tokens - a.tokens) / span,
            "decode_calls": calls, "running_per_call": slots * (b.occupancy_sum - a.occupancy_sum) / max(calls, 1),
            "occupied_time_mean": busy / span}


def memory_run(eng: Engine, prompts: list, news: list) -> dict:
    before = eng.stats()
    t0 = time.perf_counter()
    hs = [eng.submit(p, n, stop_ids=[]) for p, n in zip(prompts, news)]
    samples = drive(eng, t0)
    assert sum(len(h.result().tokens) for h in hs) == sum(news)
    after = eng.stats()
    full = next(i for i, s in enumerate(samples) if i and s.queued == 0)
    return {"slots": eng.max_slots, "kv_rows": eng.num_blocks * eng.block_size if eng.block_size else
            eng.max_slots * eng.max_seq_len, "saturated": window(samples, 0, full, eng.max_slots),
            "run": window(samples, 0, len(samples) - 1, eng.max_slots),
            "max_occupied": max(s.active for s in samples), "preemptions": after.preemptions - before.preemptions,
            "prefill_calls": after.prefill_calls - before.prefill_calls,
            "ttft_p50_s": pct([h.ttft for h in hs], 50), "ttft_p90_s": pct([h.ttft for h in hs], 90),
            "latency_p50_s": pct([h.latency for h in hs], 50), "latency_p90_s": pct([h.latency for h in hs], 90)}


def part_memory(z, engs: dict, vocab: int, rng) -> dict:
    prompts, news = mixed_workload(z, vocab, rng)
    res = {"requests": len(news), "new_tokens": sum(news), "new_mean": float(np.mean(news)), "new_max": max(news),
           "prompt_mean": float(np.mean([len(p) for p in prompts]))}
    for kind in ("dense", "paged"):
        res[kind] = memory_run(engs[kind], prompts, news)
        r = res[kind]
        print(f"memory {kind}: {r['saturated']['running_per_call']:.1f} running, "
              f"{r['saturated']['tokens_per_s']:.0f} tok/s saturated, {r['run']['tokens_per_s']:.0f} tok/s run, "
              f"{r['preemptions']} preemptions", flush=True)
    d, p = res["dense"], res["paged"]
    res["concurrency_ratio"] = p["saturated"]["running_per_call"] / d["saturated"]["running_per_call"]
    res["tokens_per_s_ratio"] = p["saturated"]["tokens_per_s"] / d["saturated"]["tokens_per_s"]
    res["run_tokens_per_s_ratio"] = p["run"]["tokens_per_s"] / d["run"]["tokens_per_s"]
    res["targets"] = [
        target("memory", "paged / dense running sequences (saturated)", ">= 2", res["concurrency_ratio"],
               res["concurrency_ratio"] >= 2),
        target("memory", "paged / dense tokens/s (saturated)", ">= 1.3", res["tokens_per_s_ratio"],
               res["tokens_per_s_ratio"] >= 1.3)]
    return res


# ------------------------------------------------------------------------------ 3. prefix
def chat(eng: Engine, z, conversations: list, turns: int) -> list[list[float]]:
    """Run the chats round-robin, one request at a time; each turn's TTFTs (one per chat)."""
    history = [c[0] for c in conversations]
    ttfts = []
    for t in range(turns):
        ttfts.append([])
        for c, conv in enumerate(conversations):
            h = eng.submit(history[c], z.prefix_answer, stop_ids=[])
            answer = h.result().tokens
            eng.run_until_idle()
            ttfts[-1].append(h.ttft)
            if t + 1 < turns:
                history[c] = history[c] + answer + conv[t + 1]
    return ttfts


def conversation(z, vocab: int, rng) -> list[list[int]]:
    """The first prompt, then each later turn's user message."""
    return [random_ids(rng, z.prefix_first, vocab)] + [random_ids(rng, z.prefix_user, vocab)
                                                       for _ in range(z.prefix_turns - 1)]


def part_prefix(z, engs: dict, vocab: int, rng) -> dict:
    convs = [conversation(z, vocab, rng) for _ in range(z.prefix_conversations)]
    warm = [conversation(z, vocab, rng)]
    res = {"turn_prompt_lengths": chat_lengths(z), "uncached_tokens": uncached_parts(z)}
    for kind in ("plain", "cached"):
        eng = engs[kind]
        chat(eng, z, warm, 2)  # untimed
        before = eng.stats()
        res[kind] = {"ttft_s": chat(eng, z, convs, z.prefix_turns)}
        after = eng.stats()
        cached = after.cached_prompt_tokens - before.cached_prompt_tokens
        res[kind]["hit_rate"] = cached / max(after.prompt_tokens - before.prompt_tokens, 1)
        res[kind]["ttft_mean_s"] = [float(np.mean(x)) for x in res[kind]["ttft_s"]]
        print(f"prefix {kind}: TTFT per turn (ms) " + " ".join(f"{1e3 * x:.1f}" for x in res[kind]["ttft_mean_s"])
              + f", hit rate {res[kind]['hit_rate']:.2f}", flush=True)
    plain, cached = res["plain"]["ttft_mean_s"], res["cached"]["ttft_mean_s"]
    res["ratio_per_turn"] = [a / b for a, b in zip(plain, cached)]
    res["ratio_turns_2_on"] = float(np.mean(plain[1:]) / np.mean(cached[1:]))
    res["ratio_last_turn"] = plain[-1] / cached[-1]
    res["targets"] = [target("prefix", f"TTFT without / with prefix caching (mean, turns 2..{z.prefix_turns})",
                             ">= 5", res["ratio_turns_2_on"], res["ratio_turns_2_on"] >= 5)]
    return res


# ------------------------------------------------------------------------------ 4. chunked
def log_arrivals(h) -> list:
    """(time, tokens so far) at every delivery to ``h``."""
    log = []
    h.on_update(lambda: log.append((time.perf_counter(), len(h.tokens))))
    return log


def gaps(log: list, windows: list[tuple[float, float]] | None = None, span=None) -> list[tuple[float, int]]:
    """(gap seconds, tokens it delivered) between successive deliveries: those overlapping one of
    ``windows``, or those inside ``span`` (start, end)."""
    out = []
    arrivals = [(t, n) for i, (t, n) in enumerate(log) if i == 0 or n > log[i - 1][1]]
    for (ta, na), (tb, nb) in zip(arrivals, arrivals[1:]):
        if windows is not None and any(tb > s and ta < f for s, f in windows):
            out.append((tb - ta, nb - na))
        elif span is not None and ta >= span[0] and tb <= span[1]:
            out.append((tb - ta, nb - na))
    return out


def chunked_run(z, eng: Engine, vocab: int, rng) -> dict:
    seq_len, calls = eng.max_seq_len, z.chunked_calls
    budget = seq_len - z.chunked_prompt
    shorts = [eng.submit(random_ids(rng, z.chunked_prompt, vocab), budget, stop_ids=[])
              for _ in range(z.chunked_running)]
    logs = [log_arrivals(h) for h in shorts]
    t0 = time.perf_counter()
    drive(eng, t0, lambda: all(h.first_token_at for h in shorts))
    started, c = time.perf_counter(), eng.stats().decode_calls
    drive(eng, t0, lambda: eng.stats().decode_calls >= c + calls)
    windows, longs, prefills = [], [], []
    for _ in range(z.chunked_repeats):
        p0 = eng.stats().prefill_calls
        t_s = time.perf_counter()
        long = eng.submit(random_ids(rng, z.chunked_long, vocab), z.chunked_long_new, stop_ids=[])
        drive(eng, t0, lambda: long.first_token_at is not None)
        prefills.append(eng.stats().prefill_calls - p0)
        windows.append((t_s, long.first_token_at))
        drive(eng, t0, lambda: long.done)
        c = eng.stats().decode_calls
        drive(eng, t0, lambda: eng.stats().decode_calls >= c + calls)
        longs.append(long)
    ended_early = sum(h.done for h in shorts)
    for h in shorts:
        h.cancel()
    eng.run_until_idle()
    inside = [g for log in logs for g in gaps(log, windows)]
    base = [g for log in logs for g in gaps(log, span=(started, windows[0][0]))]
    return summarize_gaps(inside, base) | {
        "long_ttft_s": [h.ttft for h in longs], "prefill_calls_per_long": prefills,
        "windows_s": [f - s for s, f in windows], "running_ended_early": ended_early}


def summarize_gaps(inside: list, base: list) -> dict:
    ms = [1e3 * g for g, _ in inside]
    per_token = [1e3 * g / k for g, k in inside]
    return {"gaps": len(ms), "gap_p50_ms": pct(ms, 50), "gap_p99_ms": pct(ms, 99), "gap_max_ms": max(ms, default=None),
            "itl_p50_ms": pct(per_token, 50), "itl_p99_ms": pct(per_token, 99),
            "baseline_gap_p50_ms": pct([1e3 * g for g, _ in base], 50), "baseline_gaps": len(base)}


def part_chunked(z, engs: dict, vocab: int, rng) -> dict:
    res, seed = {}, int(rng.integers(1 << 30))
    for kind in ("plain", "chunked"):  # the same prompts for both
        res[kind] = chunked_run(z, engs[kind], vocab, np.random.default_rng(seed))
        r = res[kind]
        print(f"chunked {kind}: delivery gap p50 {fmt(r['gap_p50_ms'])} p99 {fmt(r['gap_p99_ms'])} ms during the long "
              f"prefill (before it: p50 {fmt(r['baseline_gap_p50_ms'])} ms), long TTFT "
              f"{np.mean(r['long_ttft_s']):.3f} s", flush=True)
    ratio = res["plain"]["gap_p99_ms"] / res["chunked"]["gap_p99_ms"] if res["chunked"]["gaps"] else None
    res["p99_gap_ratio"] = ratio
    res["targets"] = [target("chunked", "delivery gap p99 during the long prefill, without / with chunking",
                             "no numeric target given (higher = chunking helps more)", ratio, None)]
    return res


# ------------------------------------------------------------------------------ report
def target(part: str, metric: str, goal: str, value: float, met: bool | None) -> dict:
    return {"part": part, "metric": metric, "target": goal, "value": value, "met": met}


def report(z, results: dict, records: list) -> str:
    out = ["## engines\n", common.markdown_table(records, [
        ("name", "engine"), ("prefill_buckets", "buckets"), ("prefill_rows", "rows"),
        ("build_s", "build s"), ("programs_expected", "programs"), ("compiles", "compiled or loaded"),
        ("cache_hits", "cache hits"), ("warmup_s", "warm-up s")])]
    if "decode" in results:
        rows = [{"batch": r["batch"], "dense": r["dense"]["ms_per_step"], "paged": r["paged"]["ms_per_step"],
                 "ratio": r["paged_over_dense"]} for r in results["decode"]["rows"]]
        out += [f"\n## decode (prompt {z.decode_prompt}, {z.decode_new} new, S {z.max_seq_len})\n",
                common.markdown_table(rows, [("batch", "batch"), ("dense", "dense ms/step"),
                                             ("paged", "paged ms/step"), ("ratio", "paged / dense")])]
    if "memory" in results:
        m = results["memory"]
        rows = [{"engine": k, "slots": m[k]["slots"], "rows": m[k]["kv_rows"],
                 "run_sat": m[k]["saturated"]["running_per_call"], "tps_sat": m[k]["saturated"]["tokens_per_s"],
                 "run_all": m[k]["run"]["running_per_call"], "tps_all": m[k]["run"]["tokens_per_s"],
                 "max": m[k]["max_occupied"], "pre": m[k]["preemptions"]} for k in ("dense", "paged")]
        out += [f"\n## memory ({m['requests']} requests, {m['new_tokens']} new tokens)\n",
                common.markdown_table(rows, [("engine", "engine"), ("slots", "slots"), ("rows", "KV rows"),
                                             ("run_sat", "running (saturated)"), ("tps_sat", "tok/s (saturated)"),
                                             ("run_all", "running (run)"), ("tps_all", "tok/s (run)"),
                                             ("max", "max occupied"), ("pre", "preemptions")])]
    if "prefix" in results:
        p = results["prefix"]
        rows = [{"turn": i + 1, "len": n, "plain": 1e3 * a, "cached": 1e3 * b, "ratio": r}
                for i, (n, a, b, r) in enumerate(zip(p["turn_prompt_lengths"], p["plain"]["ttft_mean_s"],
                                                     p["cached"]["ttft_mean_s"], p["ratio_per_turn"]))]
        out += [f"\n## prefix ({z.prefix_conversations} chats, hit rate {p['cached']['hit_rate']:.2f})\n",
                common.markdown_table(rows, [("turn", "turn"), ("len", "prompt"), ("plain", "TTFT ms"),
                                             ("cached", "TTFT ms cached"), ("ratio", "ratio")])]
    if "chunked" in results:
        c = results["chunked"]
        rows = [{"engine": k, **c[k], "long_ttft": float(np.mean(c[k]["long_ttft_s"]))} for k in ("plain", "chunked")]
        out += [f"\n## chunked ({z.chunked_running} running, {z.chunked_long}-token prompt, chunk {z.chunked_size}, "
                f"{z.chunked_steps_per_call} steps per call)\n",
                common.markdown_table(rows, [("engine", "engine"), ("gaps", "gaps"), ("gap_p50_ms", "gap p50 ms"),
                                             ("gap_p99_ms", "gap p99 ms"), ("gap_max_ms", "gap max ms"),
                                             ("itl_p99_ms", "ITL p99 ms (gap / tokens)"),
                                             ("baseline_gap_p50_ms", "gap p50 ms before"),
                                             ("long_ttft", "long TTFT s")])]
    targets = [t for r in results.values() for t in r["targets"]]
    out += ["\n## targets\n", common.markdown_table(targets, [("part", "part"), ("metric", "metric"),
                                                             ("target", "target"), ("value", "value"),
                                                             ("met", "met")])]
    return "\n".join(out)


# ------------------------------------------------------------------------------ main
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="tiny config and sizes (CPU smoke test)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bf16 (f32 with --tiny)")
    ap.add_argument("--layout", default="per_layer", choices=["per_layer", "stacked"])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--max-seq-len", type=int, default=None, help="parts 1-3 (default: the last chat turn + answer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    for name, (big, small) in DEFAULTS.items():
        kind = type(big if big is not None else 0)
        flag = "--" + name.replace("_", "-")
        if isinstance(big, list):
            ap.add_argument(flag, type=int, nargs="+", default=None, help=f"default {big} ({small} with --tiny)")
        else:
            ap.add_argument(flag, type=float if kind is float else int, default=None,
                            help="default: derived (the module doc)" if big is None else
                            f"default {big} ({small} with --tiny)")
    ap.add_argument("--prefix-buckets", type=int, nargs="+", default=None,
                    help="prompt buckets of the engine without prefix caching (default: the multiples of 2x "
                         "--prefix-first below the last turn's prompt, and max_seq_len)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cache = enable_compilation_cache()
    compiles = Compiles()
    z = resolve(args)
    check_sizes(z)
    parts = [p for p in PARTS if p in args.parts]
    dtype = jnp.dtype(args.dtype or ("float32" if z.tiny else "bfloat16"))
    cfg = ModelConfig(**SHAPES[z.config])
    t = time.perf_counter()
    model = Model(cfg, random_params(cfg, dtype, args.seed), None)
    model.prepare(layout=args.layout)
    model_s = time.perf_counter() - t

    env = common.environment()
    print(f"# paged KV cache benchmark\n\n{common.environment_line(env)}\n", flush=True)
    print(f"{z.config} {args.layout} {dtype.name}: parts {' '.join(parts)}; max_seq_len {z.max_seq_len}, "
          f"block size {z.block_size}; model built in {model_s:.1f} s; compilation cache "
          f"{'on' if cache else 'off'}", flush=True)
    uses = plans(z)
    engines = Engines(model, uses, parts, compiles)
    rng = np.random.default_rng(args.seed)
    run = {"decode": part_decode, "memory": part_memory, "prefix": part_prefix, "chunked": part_chunked}
    results, t_all = {}, time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        engs = {role: engines.get(use.key) for role, use in uses[part].items()}
        c0 = compiles.snapshot()[0]
        results[part] = run[part](z, engs, cfg.vocab_size, rng)
        results[part]["compiles_during_run"] = compiles.snapshot()[0] - c0
        results[part]["engines"] = {role if isinstance(role, str) else f"{role[0]} B={role[1]}": use.key.name
                                    for role, use in uses[part].items()}
        results[part]["seconds"] = time.perf_counter() - t
        engines.done(part)
        print(f"part {part}: {results[part]['seconds']:.1f} s (compilations during the timed runs: "
              f"{results[part]['compiles_during_run']})", flush=True)
    total = time.perf_counter() - t_all + model_s

    print("\n" + report(z, results, engines.records))
    warm = sum(r["warmup_s"] for r in engines.records)
    print(f"\n{common.environment_line(env)}; {z.config}; {len(engines.records)} engines, warm-up {warm:.1f} s, "
          f"total {total:.1f} s")
    out = common.results_path(args.out, f"paged-{z.config}", env)
    common.write_json(out, {"environment": env, "args": vars(args), "sizes": vars(z), "model_s": model_s,
                            "total_s": total, "warmup_s": warm, "engines": engines.records, "parts": results,
                            "targets": [t for r in results.values() for t in r["targets"]]})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
