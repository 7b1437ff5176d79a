"""Continuous batching: a fixed set of slots that admits waiting requests as others finish.

    engine = Engine(model, max_slots=8, max_seq_len=1024)
    h = engine.submit("Hello", 32, temperature=0.7, seed=1)      # from any thread
    engine.run_until_idle()                                        # or engine.start() ... stop()
    h.result().tokens, h.result().text, h.result().finish_reason

A static batch runs until its longest row ends; the engine instead keeps every slot busy. Each
``step`` of the host loop:

1. **admit**: waiting requests (first come, first served) take free slots, several per prefill
   call (``prefill_batch`` rows; the admitted are grouped by prompt length, and each group's
   prompts are right-padded to the smallest of ``prefill_buckets`` that fits its longest); the
   prefill also samples each row's first token and **inserts** the rows' cache, counters and
   settings into their slots (one jitted, donated call);
2. **decode**: dispatch ``decode_steps_per_call`` steps over all slots as one jitted call (empty
   and finished slots idle); with a ``draft``, speculative rounds instead (up to k+1 tokens each);
3. **evict**: while that call runs, fetch the *previous* decode call's tokens and hand them to
   their requests' handles (``stream``); finished rows resolve their handles (``result``) and free
   their slots for the next step's admission. Then the admitted rows' first tokens.

JAX dispatch is asynchronous and the state stays on the device, so the host's bookkeeping overlaps
the device's work: the device always has the next call queued. One exception: XLA runs a decode
call's ``while_loop`` from the host (it reads the loop predicate every iteration), so its
dispatch returns only when the call is nearly done. The decode call is therefore dispatched from
a thread of its own (``Device.decode_async``) while the engine's thread delivers the previous
call's tokens, which reach readers as that call ends rather than as the next one does (on an
H200, 1B shape, 32 slots: +17% tokens/s, latency p50 295 -> 248 ms; docs/benchmarks.md). The price: a row that ends by a
stop id is seen one call late, and its slot idles through that call (the device's done flag stops
it making tokens). A row that runs out of its token budget costs nothing: the host knows a slot
whose budget ends within the call in flight is free once that call is done, and admits into it
right away (the admission runs after that call on the device).

Every device call has a fixed shape (see ``state``): after ``warmup()`` (or once every bucket was
used) nothing recompiles. Requests are validated on the host at ``submit`` with generation's own
checks (a bad request raises there; others are unaffected). Per-request sampling settings, stop
ids and LoRA adapters (``adapters={name: adapter}``, stacked once) live in per-slot arrays; a
request's output equals ``generate`` on it alone (greedy: the same tokens; sampled: the same tokens
for the same seed).

``submit(..., n=4)`` (and ``best_of``) serves several samples of one prompt from one prefill: a
``RequestGroup`` of one handle per sample, admitted together (all or none, in arrival order) into
rows of one prefill call, where only the first row holds the prompt and the others take its
cache and first-token logits; sample j draws with seed + j, so the group equals
``generate(model, [prompt], ..., n=4)``. Same programs for any n: nothing compiles per n.

**Paged KV cache** (``Engine(..., block_size=16, num_blocks=N)``; the default ``block_size=None``
keeps B x S dense rows): the cache is one pool of N blocks of ``block_size`` positions and each
slot a row of a block table [B, M] (M = ceil(S / block_size)), so memory is held per token
written. The host keeps the free list (``blocks``) and the table: admission takes a request only
while the pool holds its prefill and first decode call besides the next call of every request
already running, and each decode call's blocks (W positions per running slot) are taken before
it is dispatched. When they do not fit, the youngest running request is **preempted by
recompute**: its blocks go back, it returns to the front of the queue, and once re-admitted it is
prefilled with its prompt and the tokens it had made (all delivered by then) and continues where
it was: the same token count, so the same ``fold_in(key(seed), t)`` draws, and the same
penalties' history; nothing is delivered twice. Its output still equals ``generate`` alone.
A preempted sample of an ``n`` group comes back alone, prefilling its own tokens.
Attention gathers each slot's blocks into the dense view [B, M * block_size] and runs the
existing attention over it (the fused kernel on GPU too; no paged kernel yet). ``stats()`` has
``blocks_in_use``, ``blocks_free`` and ``preemptions``. It serves constraints and a mesh (the pool's
K axis on ``model``, its blocks on no axis: any row may hold any block, so the pool cannot
follow the ``data`` split of the slots; ``sharding.paged_cache_specs``); not yet a draft.

**Prefix caching** (``Engine(..., block_size=16, prefix_caching=True)``): a full block is known
by a chain key of its tokens, the tokens before it and the request's adapter (``blocks``), and
blocks are shared by reference count. An admission looks the longest cached run of its
context's full blocks up, shares it (those blocks are never written again: a request's own
tokens start in blocks of its own, and a partly filled block is never shared), and prefills
only the rest, at offset ``start``, straight into its blocks, attending over the shared ones
(``kv_cache.rows_view``: the same paged forward as decode; the offset is data and the bucket is
chosen by the tokens left, so nothing compiles per offset). At least one token is always
prefilled: a prompt cached whole prefills its last block again. Its prompt's full blocks are
cached once its prefill is dispatched (requests admitted in the same step do not share them
yet), and when a request ends, is cancelled or preempted, its fully written blocks (prompt and
tokens made but the last) stay cached, unreferenced, in an LRU, evicted only when the pool
needs blocks, before anyone is preempted; a preempted request may come back to its own blocks.
A group's samples share the cached blocks and copy the rest of the prompt's from the row that
prefills it (``kv_cache.copy_pages``). ``stats()`` adds ``blocks_cached``, ``prompt_tokens``,
``cached_prompt_tokens`` and ``prefix_hit_rate``; cached blocks no request holds count in
``blocks_free`` (they are reclaimable), so ``blocks_in_use + blocks_free = num_blocks``.
Cost: the prefill attends over the gathered view of the row's blocks with the einsum attention
(not the fused prompt kernel), and the admission table carries each row's whole context (the
penalties' history needs the cached tokens too).

**Chunked prefill** (``Engine(..., block_size=16, prefill_chunk=N)``): a request's context is
prefilled at most N tokens per step, with the same prefill at an offset: it holds its slot and
blocks from its first chunk, each step's plan gives it its next chunk (in a prefill call with
other admissions; a chunk before the last goes to no slot, so nothing is inserted and no token
is drawn), the decode calls of the running requests go on between the chunks (its own slot
idles, it is no decode call's owner and cannot be preempted while its prefill goes on), and its
last chunk samples the first token and inserts its row as any admission. Its blocks are cached
as its chunks are dispatched. A group's samples are prefilled whole.

Threads: ``submit``/``cancel`` are safe from any thread. Requests advance when someone drives
the loop: ``start()`` runs it on a background thread; otherwise ``run_until_idle()``,
``generate_many``, ``handle.result()`` and ``handle.stream()`` drive it from the caller.
``close()`` (or leaving ``with Engine(...) as engine:``) shuts it down: what is still queued or
running is cancelled (``cancel_reason`` says so) and later submissions raise ``EngineClosedError``.

The parts, B = slots, P = rows per prefill call, T = a prompt bucket, E = stop-id table width,
W = tokens per slot a decode call hands back:

- ``core``: the ``Engine`` (settings, submission, the loop wiring the three below);
- ``scheduler``: the queue, slot owners, kill flags [B], admission policy and bucket choice,
  preemption;
- ``blocks``: the paged cache's free list, the blocks of each slot and the block table [B, M],
  reference counts and the prefix cache (keys, LRU);
- ``state``: the device state [B, ...], its jitted ``admit`` ([P, T + E + L + 9] + [P, 6 + L] -> [P, 2];
  paged, the ints also carry [3 + M], and [S] more with prefix caching or chunked prefill) and
  ``decode`` ([B] kill flags (+ paged, the table [B, M]) -> [B, W + 6]), and ``Device``, which
  makes those calls;
- ``delivery``: request handles and results, handing device results to them, statistics.
"""

from .core import Engine, EngineClosedError
from .delivery import CANCELLED, Chunk, EngineStats, RequestGroup, RequestHandle, RequestResult
from .scheduler import default_buckets

__all__ = ["CANCELLED", "Chunk", "Engine", "EngineClosedError", "EngineStats", "RequestGroup", "RequestHandle",
           "RequestResult", "default_buckets"]
