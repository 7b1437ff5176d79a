"""The ``Engine`` class: its settings, request validation and submission, and the host loop that
wires the scheduler (``scheduler``), the device (``state``) and delivery (``delivery``) together.

B = ``max_slots``, P = rows per prefill call, T = a prompt bucket, E = the stop-id table width,
W = tokens a decode call hands back per slot. The loop moves host tables of an admission (int32
[P, T + E + L + 9], float32 [P, 6 + L]) and kill flags (bool [B]) to the device, and its answers ([P, 2]
per admission, [B, W + 6] per decode call) back; see the package doc for the order of a step.

Locks: ``_lock`` guards the scheduler's and the statistics' bookkeeping (``_wake`` is its
condition); ``_drive`` is held by whoever runs steps (the device's calls and their timings).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from ..errors import RealmError
from ..buckets import bucket_table
from ..generation import GenerationResult, default_stop_ids, prepare_prompts, validate_request
from . import delivery
from . import state as es
from .adapters import AdapterSlots
from .blocks import BlockPool
from .delivery import CANCELLED, EngineStats, RequestGroup, RequestHandle, Stats
from .scheduler import Call, Scheduler, _check_pos_int, check_pages, context, filling, prefix_start


# ``Sampling`` settings a request may set: all of them per row on the device, the same programs
# whatever the values; with a draft only the draw (speculative rounds verify the warped
# distribution, not the penalties).
_SERVED = ("temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty", "frequency_penalty",
           "presence_penalty", "logit_bias", "min_tokens", "stop", "n")
_SERVED_WITH_DRAFT = ("temperature", "top_k", "top_p", "seed", "stop")  # stop strings: matched on the host


class EngineClosedError(RealmError):
    """The engine was closed (``Engine.close()``): it takes no more requests."""


class Engine:
    """A continuous-batching engine over ``max_slots`` fixed slots (see the ``realm_jax.engine`` doc).

    model: a loaded ``Model`` (config, params in the stacked or decode layout, tokenizer or None).
    max_slots (B): sequences decoded together. max_seq_len (S): prompt + new tokens of any one
    request (default: min(1024, the model's max_position_embeddings)). prefill_buckets: prompt
    lengths compiled for (default: powers of two from 16, and S; the largest bounds prompts).
    prefill_batch: rows per prefill call (P), an int or several sizes (default (1, min(B, 8))):
    each admission uses the smallest size that holds the free slots' worth of waiting prompts
    with at most half of its rows padding (else smaller calls); every (rows, bucket) pair is one
    compiled program. Prefill is about a quarter of the device's time on a mixed workload, and
    its padding is set by these two: finer buckets and more row sizes waste less but compile more
    programs (H100, 1B shape: buckets 128/256/384/512 with rows 1/2/4/8 gave 2.08x static
    batching, 128/256/512 with rows 1/8 1.97x). decode_steps_per_call:
    decode steps (or speculative rounds) per device call: enough that a call outlasts the host's
    bookkeeping of one step (so the device never waits), few enough that a row ending by a stop id
    (its slot idles until the end of the next call) wastes little. Default 16: on an H100 (1B shape,
    32 slots, mixed workload) 16 gave 1.99x static batching and 8 gave 1.88x (on the GPU a call
    with a decode loop returns from dispatch only once its last step is launched, so the host's
    bookkeeping, ~0.5 ms per call there, overlaps only the call's last steps). max_stop_ids (E):
    stop ids per request. max_logit_bias (L): logit-bias entries per request.
    adapters: {name: single LoRA adapter}, stacked once; requests pick one by name.
    fold_adapters: serve the adapters folded (``runtime.prepare(..., fold=True)`` with
    ``model.runtime``'s choices): their A factors appended to the base weights, one matmul fewer
    per projection and step (H100, 4 adapters, rank 16: +9.5% over the base model on the 8B shape
    instead of +16.5%). The engine then holds a folded copy of the weights besides
    ``model.runtime``.
    draft: a draft for speculative decoding (a loaded Model, "self:N", "lookup" or a
    ``drafts.Draft``), k tokens per round.
    constrained: serve requests with a ``constraint`` (JSON schema, regex, choice, grammar;
    ``realm_jax.constraints``). The programs then ask the host for the grammar masks once per
    step (with a draft: once per round, for every verified position) whenever a live slot has a
    constraint (needs the ``constrained`` extra).
    max_logprobs (N): serve ``logprobs=n`` (n <= N) on requests: every step then computes each
    slot's log-softmax and its N best alternatives on the device, as ``generate`` does (the same
    values: model and sampled log-probs, ``TokenLogprob``), and each token brings 2 + 2N values
    back (None, the default: no log-probs, no cost; no draft yet). It also serves ``best_of``
    (0 is enough): the samples are ranked by their cumulative log-prob.

    Samples: ``submit(..., n=k)`` (k <= B; no draft yet) queues k samples of one prompt as a
    ``RequestGroup``. They are admitted together or not at all (first come, first served: a
    group waits, and the requests behind it, until k slots are free), into rows of the same
    prefill call(s): the first row of the group in a call holds the prompt, the others have no
    tokens and take that row's cache rows and first-token logits; then sample j draws with its
    own key (seed + j), as ``generate(..., n=k)``. The copies still occupy rows of the call
    (``prefill_batch`` counts slots, not prompts), so the call costs what k separate requests
    admitted together cost; what is shared is the one prompt's prefill, exactly (the samples see
    the same cache, as ``generate``'s), and a group larger than the largest ``prefill_batch`` is
    prefilled once per call it spans. ``best_of=m`` runs m samples and returns the ``n`` best.

    block_size: positions per block of a paged KV cache (None, the default: every slot holds
    max_seq_len dense rows). num_blocks: blocks in its pool (default: max_slots x
    ceil(max_seq_len / block_size), the dense cache's memory, so nothing is ever preempted; at
    least one request of max_seq_len). Paged, admission is limited by free blocks rather than
    slots x max_seq_len, and a request that does not fit mid-decode is preempted and recomputed
    (the package doc); a group's samples each hold their own blocks (the prompt's are not shared
    yet). It is an option, not the default, because its attention gathers every slot's blocks
    into a dense view each step (the same bytes read as the dense cache, plus the gather; no
    paged kernel yet), so its gain is memory, which matters when requests are much shorter than
    max_seq_len; and it does not serve a draft yet. It serves constraints (a request back from a
    preemption skips its admission's draw without asking its grammar matcher) and a model on a
    mesh: the pool's K axis on ``model`` (replicated when the axis does not divide K), its block
    axis on no mesh axis (blocks are shared across sequences, so they cannot follow the batch's
    ``data`` split: every data replica holds the whole pool and every write), the block table and
    slot state with B on ``data`` (``sharding.paged_cache_specs``).
    prefix_caching: with block_size, share the cached full blocks of earlier prompts (and
    answers) by reference: a request prefills only what follows the longest cached run of its
    context's blocks under its adapter, and a finished request's blocks stay cached until the
    pool needs them (the package doc). Outputs are unchanged (each still equals ``generate``
    alone); ``stats()`` reports the hit rate.
    prefill_chunk: with block_size, prefill a long context at most this many tokens per step,
    between the decode calls of the running requests, so a long prompt does not stall them for
    a whole prefill (the package doc; ``n`` samples are prefilled whole). Each chunk is one
    prefill call (``stats().prefill_calls``); pick a size among ``prefill_buckets``.
    """

    def __init__(self, model, *, max_slots: int = 8, max_seq_len: int | None = None,
                 prefill_buckets: Sequence[int] | None = None, prefill_batch: int | None = None,
                 decode_steps_per_call: int = 16, max_stop_ids: int = 8, max_logit_bias: int = 8,
                 adapters: Mapping[str, Any] | None = None, fold_adapters: bool = False, draft=None,
                 k: int = 4, constrained: bool = False, adapter_slots: int | None = None,
                 adapter_rank: int | None = None, adapter_targets: Sequence[str] | None = None,
                 max_logprobs: int | None = None, block_size: int | None = None, num_blocks: int | None = None,
                 prefix_caching: bool = False, prefill_chunk: int | None = None):
        cfg = model.config
        self.model = model
        self.max_slots = _check_pos_int("max_slots", max_slots)
        if max_seq_len is None:
            max_seq_len = min(1024, cfg.max_position_embeddings)
        self.max_seq_len = _check_pos_int("max_seq_len", max_seq_len, 2)
        if self.max_seq_len > cfg.max_position_embeddings:
            raise RealmError(f"max_seq_len: expected at most the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}, got {max_seq_len}")
        paging = check_pages(block_size, num_blocks, self.max_slots, self.max_seq_len)
        self.block_size, self.num_blocks = paging or (None, None)
        if paging is not None:
            if draft is not None:
                raise RealmError("block_size: the paged KV cache does not serve a draft yet (use block_size=None)")
        if not isinstance(prefix_caching, bool):
            raise RealmError(f"prefix_caching: expected True or False, got {prefix_caching!r}")
        if prefix_caching and paging is None:
            raise RealmError("prefix_caching: needs the paged KV cache (set block_size, e.g. block_size=16); "
                             "cached prompt blocks are shared between requests by reference")
        self.prefix_caching = prefix_caching
        if prefill_chunk is not None:
            prefill_chunk = _check_pos_int("prefill_chunk", prefill_chunk)
            if paging is None:
                raise RealmError("prefill_chunk: needs the paged KV cache (set block_size, e.g. block_size=16); "
                                 "a chunk is prefilled at an offset into the request's blocks")
        self.prefill_chunk = prefill_chunk
        pages = None if paging is None else BlockPool(self.num_blocks, self.block_size, self.max_slots,
                                                      self.max_seq_len, prefix_caching)
        self._sched = Scheduler(self.max_slots, self.max_seq_len, prefill_buckets, prefill_batch,
                                decode_steps_per_call, pages, prefill_chunk)
        self.prefill_buckets = self._sched.prefill_buckets
        self.max_prompt_len = self._sched.max_prompt_len
        self.prefill_rows = self._sched.prefill_rows
        self.decode_steps_per_call = self._sched.decode_steps_per_call
        self.max_stop_ids = _check_pos_int("max_stop_ids", max_stop_ids)
        self.stop_width = bucket_table(self.max_stop_ids)
        self.bias_width = bucket_table(_check_pos_int("max_logit_bias", max_logit_bias))

        if not isinstance(constrained, bool):
            raise RealmError(f"constrained: expected True or False, got {constrained!r}")
        if constrained:
            from ..constraints import _llguidance

            _llguidance()
        self.constrained = constrained
        if max_logprobs is not None:
            from ..settings import MAX_LOGPROBS

            bad = isinstance(max_logprobs, bool) or not isinstance(max_logprobs, int)
            if bad or not 0 <= max_logprobs <= MAX_LOGPROBS:
                raise RealmError(f"max_logprobs: expected None or an integer in [0, {MAX_LOGPROBS}], "
                                 f"got {max_logprobs!r}")
            if draft is not None:
                raise RealmError("max_logprobs: not available with a draft yet (speculative rounds keep no log-probs)")
        self.max_logprobs = max_logprobs
        self._folded_names: tuple[str, ...] | None = None  # fold_adapters: the fixed names
        self._adapters: AdapterSlots | None = None  # else: the slots (load_adapter / unload_adapter)
        params = model.runtime  # the target's runtime as served (with the adapters, folded or not)
        if fold_adapters and (adapters is None or draft is not None or adapter_slots is not None):
            raise RealmError("fold_adapters: needs adapters, no draft (a draft runs the unfolded weights) and no "
                             "adapter_slots (folded adapters are fixed)")
        if fold_adapters:
            self._folded_names = es.check_adapters(model, adapters)
            params = es.prepare_adapters(model, [adapters[n] for n in self._folded_names], True)
        elif adapters is not None or adapter_slots is not None:
            self._adapters = AdapterSlots(model, adapters, adapter_slots, adapter_rank, adapter_targets)
            params = self._served_with_adapters()
        self.draft = None
        self.k = 0
        if draft is not None:
            from ..drafts import check_k, make_draft

            self.k = check_k(k, self.max_seq_len)
            self.draft = make_draft(model, draft)
        self._device = es.Device(params, cfg, slots=self.max_slots, max_len=self.max_seq_len,
                                 stop_width=self.stop_width, bias_width=self.bias_width,
                                 steps=self.decode_steps_per_call,
                                 draft=self.draft, k=self.k, constrained=constrained, top_logprobs=max_logprobs,
                                 pages=None if paging is None else (self.num_blocks, self.block_size),
                                 offset_prefill=prefix_caching or prefill_chunk is not None)
        self.window = self._device.window

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._drive = threading.Lock()  # whoever holds it runs steps
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed: str | None = None  # the reason, once close() was called
        self._error: BaseException | None = None
        self._stats = Stats()
        self._adapter_loads: dict[int, int] = {}  # adapter slot -> adapters loaded into it (prefix-cache tags)

    # white-box views of the parts (tests read them)
    @property
    def _params(self):
        return self._device.params

    @property
    def _state(self) -> es.EngineState:
        return self._device.state

    @property
    def _queue(self):
        return self._sched.queue

    def _plan(self):
        """Under the lock: ``Scheduler.plan``."""
        return self._sched.plan()

    # ------------------------------------------------------------------ submission
    def _validate(self, prompt, max_new_tokens, *, stop_ids=None, adapter=None, chat=False, sampling=None,
                  **settings) -> list[RequestHandle]:
        """All host checks; the request's handles (one per sample: ``n``, or ``best_of``), not
        yet queued."""
        from ..settings import Sampling

        st = Sampling.of(sampling, **settings)
        served = _SERVED if self.draft is None else _SERVED_WITH_DRAFT
        served += ("constraint",) if self.constrained else ()
        served += ("logprobs", "best_of") if self.max_logprobs is not None else ()
        other = [f for f in st.non_default() if f not in served]
        if other == ["constraint"]:
            raise RealmError("constraint: this engine was built without constrained=True")
        if other == ["logprobs"] and self.draft is None:
            raise RealmError("logprobs: this engine was built without max_logprobs (Engine(..., max_logprobs=N))")
        if other == ["best_of"] and self.draft is None:
            raise RealmError("best_of: needs an engine built with max_logprobs (the samples are ranked by their "
                             "cumulative log-prob; Engine(..., max_logprobs=0) is enough)")
        if st.n != 1 or st.best_of is not None:
            st.check_counts()
            if st.samples > self.max_slots:
                field = "n" if st.best_of is None else "best_of"
                raise RealmError(f"{field}: expected at most the engine's max_slots={self.max_slots} (a prompt's "
                                 f"samples decode together, one slot each), got {st.samples}")
        if st.logprobs is not None and self.max_logprobs is not None:
            st.check_counts()
            if st.logprobs > self.max_logprobs:
                raise RealmError(f"logprobs: expected at most the engine's max_logprobs={self.max_logprobs}, "
                                 f"got {st.logprobs}")
        if other:
            raise RealmError(f"{', '.join(other)}: not served by the engine"
                             + (" with a draft" if self.draft is not None else "") + " yet (use generate)")
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        strings = st.stop_strings(1)[0]
        if strings and getattr(self.model, "tokenizer", None) is None:
            raise RealmError("stop: stop strings need the model's tokenizer (this model has none); use stop_ids")
        ids = prepare_prompts(self.model, [prompt], chat)
        if stop_ids is None:
            stop_ids = default_stop_ids(self.model)
        req = validate_request(self.model.config, ids, max_new_tokens, max_len=self.max_seq_len, stop_ids=stop_ids,
                               sampling=st)
        n = int(req.prompt_lengths[0])
        if n > self.max_prompt_len:
            raise RealmError(f"prompt has {n} tokens, over the engine's longest prompt bucket "
                             f"{self.max_prompt_len} (prefill_buckets={list(self.prefill_buckets)})")
        stops = req.stop_ids[0]
        if len(stops) > self.max_stop_ids:
            raise RealmError(f"stop_ids: expected at most max_stop_ids={self.max_stop_ids} ids, got {len(stops)}")
        aid = self._adapter_slot(adapter)
        limit = int(req.max_new_tokens[0])
        rows = req.rows  # R = samples; sample j draws with seed + j (validate_request)
        pages = self._sched.pages
        if pages is not None and rows > 1:  # admitted together: their first blocks at once
            need = rows * pages.need(n + self.decode_steps_per_call, n + limit - 1)
            if need > pages.num_blocks:
                field = "n" if st.best_of is None else "best_of"
                raise RealmError(f"{field}: {rows} samples of this prompt need {need} blocks to start together, "
                                 f"over the engine's num_blocks={pages.num_blocks}")
        keys = [-1] * rows
        if req.constraints[0] is not None:  # last: nothing can refuse the request after this
            from ..constraints import compile_rows, register

            matchers = compile_rows(self.model, req.constraints, req.stop_ids, default_stop_ids(self.model))
            keys = [int(k) for k in register(matchers)]
        # best_of ranks the samples by cumulative log-prob: they keep their log-probs (dropped
        # from the results unless asked for)
        lps = 0 if st.best_of is not None and st.logprobs is None else st.logprobs
        handles = []
        for j in range(rows):
            sp = jax.tree.map(lambda a: a[j:j + 1], req.sampling)
            ints, floats = es.request_settings(stops, self.stop_width, self.bias_width, limit, aid, sp, keys[j])
            h = RequestHandle(self, -1, req.prompt_ids[0], limit, adapter, ints, floats, keys[j], strings, lps)
            h.adapter_slot = aid
            handles.append(h)
        if rows > 1 or st.best_of is not None:
            RequestGroup(handles, st.n, st.best_of, st.logprobs is not None)
        return handles

    def submit(self, prompt, max_new_tokens: int, *, stop_ids=None, adapter: str | None = None, chat: bool = False,
               sampling=None, **settings) -> RequestHandle | RequestGroup:
        """Queue one request; returns its handle at once (thread-safe).

        prompt: a string (needs the model's tokenizer; ``chat=True`` applies the chat template),
        chat messages (with ``chat=True``) or token ids. max_new_tokens >= 1; prompt +
        max_new_tokens <= max_seq_len. sampling / settings: a ``Sampling`` and/or its fields
        (temperature, top_k, top_p, min_p, seed, penalties, logit_bias, min_tokens, stop
        strings, n, constraint when built ``constrained``, logprobs and best_of when built with
        ``max_logprobs``; with a draft only the first four and stop strings; prompt log-probs
        are not served yet), as ``generate`` takes them. stop_ids: None = the model's
        eos ids; [] = none. adapter: a name given at construction, or None for the base model.
        Returns a ``RequestHandle``; with ``n`` > 1 or ``best_of``, a ``RequestGroup`` of one
        handle per sample (n <= best_of <= max_slots): the prompt is prefilled once, its cache
        and first-token logits copied into the samples' slots (admitted together, all or none),
        and sample j draws with seed + j, as ``generate(..., n=...)`` does; ``best_of`` runs
        every sample and its ``results()`` are the ``n`` of the highest cumulative log-prob.
        Raises ``RealmError`` for bad input (nothing is queued; other requests are unaffected),
        and ``EngineClosedError`` after ``close()``.
        """
        with self._lock:
            self._check_alive()
        try:
            hs = self._validate(prompt, max_new_tokens, stop_ids=stop_ids, adapter=adapter, chat=chat,
                                sampling=sampling, **settings)
        except RealmError:
            with self._lock:
                self._stats.n["rejected"] += 1
            raise
        self._enqueue(hs)
        return hs[0] if hs[0].group is None else hs[0].group

    def _check_alive(self) -> None:
        if self._closed is not None:
            raise EngineClosedError(f"the engine is closed ({self._closed}); build a new Engine to serve more requests")
        if self._error is not None:
            raise RuntimeError(f"the engine stopped after a device error: {self._error}") from self._error

    def _enqueue(self, handles: list[RequestHandle]) -> None:
        with self._lock:
            self._check_alive()
            for h in handles:  # an adapter unloaded (or replaced) since the request was checked
                if h.adapter is not None and self._adapter_slot(h.adapter) != h.adapter_slot:
                    raise RealmError(f"adapter {h.adapter!r} was unloaded while the request was being checked")
                h.cache_tag = self._cache_tag(h.adapter_slot)
            self._sched.enqueue(handles)
            self._stats.n["submitted"] += len(handles)
            self._wake.notify_all()

    def generate_many(self, requests: Sequence, **defaults) -> GenerationResult:
        """Run many requests to completion; a ``GenerationResult`` in request order.

        Each request is a dict of ``submit`` arguments (``prompt``, ``max_new_tokens``, ...) or
        just a prompt; ``defaults`` fill in what a request leaves out. All are validated before
        any is queued.
        """
        with self._lock:
            self._check_alive()
        if isinstance(requests, (str, dict)) or not isinstance(requests, (list, tuple)):
            raise RealmError(f"requests: expected a list of prompts or dicts of submit arguments, "
                             f"got {type(requests).__name__}")
        handles: list[RequestHandle] = []
        for i, r in enumerate(requests):
            kw = dict(defaults)
            kw.update(r if isinstance(r, Mapping) else {"prompt": r})
            if "prompt" not in kw or "max_new_tokens" not in kw:
                raise RealmError(f"requests[{i}]: needs 'prompt' and 'max_new_tokens' (in the request or as defaults)")
            try:
                handles += self._validate(kw.pop("prompt"), kw.pop("max_new_tokens"), **kw)
            except RealmError as e:
                raise type(e)(f"requests[{i}]: {e}") from None
            except TypeError as e:
                raise RealmError(f"requests[{i}]: {e}") from None
        self._enqueue(handles)
        rows = []
        for h in handles:  # a group's samples (its n best, with best_of) in sample order, as generate
            if h.group is None:
                rows.append(h.result())
            elif h is h.group.handles[0]:
                rows += h.group.results()
        return GenerationResult([r.tokens for r in rows], [r.text for r in rows], [r.finish_reason for r in rows],
                                [r.prompt_length for r in rows])

    def _cancel(self, handles: list[RequestHandle]) -> bool:
        """Cancel ``handles`` at once (a group: every sample); False if all had already ended."""
        ok = False
        with self._lock:
            for h in handles:
                if h.done:
                    continue
                self._sched.cancel(h)
                h.cancel_reason = h.cancel_reason or "cancelled by the caller (cancel())"
                if h._push([], CANCELLED):
                    self._stats.n["cancelled"] += 1
                    ok = True
            self._wake.notify_all()
        return ok

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters requests may name now."""
        if self._folded_names is not None:
            return self._folded_names
        return () if self._adapters is None else self._adapters.loaded

    def _adapter_slot(self, adapter) -> int:
        """A request's adapter name -> its index in the served stack (-1 = the base model)."""
        if adapter is None:
            return -1
        if self._folded_names is not None and adapter in self._folded_names:
            return self._folded_names.index(adapter)
        if self._adapters is None or self._folded_names is not None:
            known = list(self._folded_names or ()) or "none (the engine was built without adapters)"
            raise RealmError(f"adapter: unknown name {adapter!r}; expected one of {known} or None (base model)")
        return self._adapters.index(adapter)

    def _cache_tag(self, slot: int) -> bytes:
        """The adapter's part of a prefix-cache key: its slot and how many adapters were loaded
        into that slot, so an adapter replaced under the same name or slot never matches."""
        return f"{slot}:{self._adapter_loads.get(slot, 0)};".encode()

    def _served_with_adapters(self):
        from ..runtime import with_adapters

        return with_adapters(self.model.runtime, self.model.config, self._adapters.stack())

    def _swap_adapters(self, change) -> int:
        """Apply ``change(slots)`` and serve the new stack between two steps (same shapes: no
        recompile); undone if building it fails."""
        if self._adapters is None:
            raise RealmError("adapters: this engine serves no adapter slots (build it with adapters= or "
                             "adapter_slots=, without fold_adapters)")
        with self._drive:
            with self._lock:
                self._check_alive()
                names, weights = list(self._adapters.names), list(self._adapters.weights)
                i = change(self._adapters)
            try:
                self._device.params = self._served_with_adapters()
            except BaseException:
                with self._lock:
                    self._adapters.names, self._adapters.weights = names, weights
                raise
        return i

    def load_adapter(self, name: str, adapter) -> int:
        """Serve a single adapter under ``name`` from the next step on (thread-safe); its slot.
        Refused (``RealmError``) for an adapter of another model, a rank over ``adapter_rank``,
        targets outside ``adapter_targets``, a name in use, or no free slot."""
        def change(slots):
            i = slots.place(name, adapter)
            self._adapter_loads[i] = self._adapter_loads.get(i, 0) + 1
            return i

        return self._swap_adapters(change)

    def unload_adapter(self, name: str) -> int:
        """Stop serving ``name`` (thread-safe); its slot is free again. Refused while a queued or
        running request uses it."""
        def change(slots):
            users = [h for h in self._sched.pending() if h.adapter == name]
            if users:
                raise RealmError(f"adapter {name!r} is in use by {len(users)} queued or running request(s); "
                                 f"cancel them or wait")
            return slots.remove(name)

        return self._swap_adapters(change)

    # ------------------------------------------------------------------ the loop
    @property
    def _background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _drive_once(self) -> None:
        self._check_alive()
        with self._drive:
            self._step()

    def step(self) -> bool:
        """One round (from the calling thread): admit into free slots, dispatch a decode call, and
        deliver the previous call's tokens and the admitted rows' first tokens. False if there was
        nothing to do."""
        if self._background:
            raise RealmError("step: the background loop is running (engine.start()); stop() it first")
        with self._lock:
            self._check_alive()
        with self._drive:
            return self._step()

    def _admission(self, p: int, slots: list[int], hs: list[RequestHandle],
                   tables: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The host tables of one prefill call (``state.admission``) in the scheduler's bucket;
        paged, with the slots' rows of the block ``tables`` [B, M] and a preempted request's
        tokens (``RequestHandle._resume``) after its prompt."""
        if tables is None and self._sched.pages is not None:
            tables = self._sched.pages.table
        fill = []
        for s, h, src in zip(slots, hs, self._sched.sources(hs)):
            row = (s, h.prompt_ids, h._settings, h._floats, src)
            if tables is not None:  # its context from where this call starts, to where it ends
                made, ctx = h._tokens[:h._resume], context(h)
                to = self.max_slots if filling(h) else s  # a chunk before the last: nothing to insert
                row = (to, ctx[h._start:h._filled]) + row[2:] + ((h._resume, made[-1] if made else 0, h._start,
                                                                 tables[s], ctx),)
            fill.append(row)
        return es.admission(p, self._sched.bucket_for(hs), self.stop_width, self.bias_width, self.max_slots, fill,
                            self._device.page_cols)

    def _step(self) -> bool:
        """Caller holds ``_drive``. Admit, dispatch decode N, then (while it runs) deliver decode
        N - 1 and the admitted rows' first tokens."""
        t0 = time.perf_counter()
        dev, sched = self._device, self._sched
        with self._lock:
            if not sched.has_work():
                return False
            groups, kill = sched.plan()
            # the admissions write the blocks planned for them, even for a request that the
            # reserve below preempts at once (its prompt blocks are cached: they must be written)
            planned = None if sched.pages is None else sched.pages.table.copy()
            preempted = sched.reserve(kill)  # paged: the blocks of this decode call
            owners = [None if filling(h) else h for h in sched.slots]  # a chunked prefill is not decoding
            run = sched.needs_decode(kill, owners)
            # the rows whose prefill ends in this step's calls (the others get no first token yet)
            ends = [[None if filling(h) else s for s, h in zip(slots, hs)] for _, slots, hs in groups]
            tables = None if sched.pages is None else sched.pages.table.copy()
            self._stats.n["preemptions"] += len(preempted)
            for _, _, hs in groups:  # the contexts prefilled, and how much of them came from the cache
                for i, (h, src) in enumerate(zip(hs, sched.sources(hs))):
                    if src == i and h._start == prefix_start(h, self.block_size):  # its first call
                        self._stats.n["prompt_tokens"] += len(context(h))
                        self._stats.n["cached_prompt_tokens"] += prefix_start(h, self.block_size)
        try:
            admitted = [(to, hs, dev.admit(*self._admission(rows, slots, hs, planned)))
                        for (rows, slots, hs), to in zip(groups, ends)]
            call = None
            if run:  # dispatched on the device's thread while this one delivers the last call
                call = Call(dev.decode_async(kill if kill.any() else dev.no_kill, tables), owners)
            try:
                if sched.inflight is not None:
                    self._deliver_decode(sched.inflight.owners, dev.fetch(sched.inflight.out))
                sched.inflight = call
                for slots, hs, out in admitted:
                    self._deliver(delivery.admit_items(slots, hs, dev.fetch(out), self.max_logprobs))
            finally:
                if call is not None:  # the state is the dispatched call's once its dispatch returns
                    sched.inflight = call._replace(out=call.out.result())
        except BaseException as e:  # the donated state is gone: fail everything in flight
            self._crash(e)
            raise
        with self._lock:
            self._stats.n["prefill_calls"] += len(groups)
            self._stats.busy += time.perf_counter() - t0
            self._wake.notify_all()
        return True

    def _deliver_decode(self, owners: list, out: np.ndarray) -> None:
        """Hand a decode call's results [B, W + 6] to the handles that owned the slots when it was
        dispatched; count the call."""
        items, passes, drafted, accepted, live = delivery.decode_items(owners, out, self.window, self.max_logprobs)
        self._deliver(items)
        with self._lock:
            self._stats.decoded(passes, drafted, accepted, live / self.max_slots)
        if self.draft is not None and drafted:
            self.draft.record(drafted, accepted)

    def _deliver(self, items: list) -> None:
        """Hand (slot, handle, new tokens, status, log-probs) to the handles (``delivery.push``); a finished
        one resolves and frees its slot (unless the slot was already given to a new request)."""
        delivered = delivery.push(items)
        with self._lock:
            for s, h, _, done in delivered:
                if done and h.ended_on_host:  # a stop string: the device row still runs, kill it
                    self._sched.cancel(h)
                elif done:
                    self._sched.release(s, h)
            self._stats.delivered(delivered)

    def _crash(self, err: BaseException) -> None:
        with self._lock:
            self._error = err
            pending = self._sched.drain()
            self._wake.notify_all()
        for h in pending:
            h._fail(err)

    def run_until_idle(self, timeout: float | None = None) -> None:
        """Drive the loop until no request is queued or running (with a background loop: wait)."""
        deadline = None if timeout is None else time.perf_counter() + timeout

        def timeout_error():
            return TimeoutError(f"run_until_idle: still busy after {timeout} s")

        if self._background:
            with self._lock:
                while self._sched.has_work() and self._error is None:
                    delivery.wait_a_while(self._wake, deadline, timeout_error)
            return
        with self._drive:
            while self._step():
                if delivery.past(deadline):
                    raise timeout_error()

    def start(self) -> "Engine":
        """Run the loop on a background thread (``stop()`` ends it). Returns the engine."""
        with self._lock:
            self._check_alive()
            if self._background:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="realm-jax-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """End the background loop after its current step. Queued and running requests stay;
        ``start()`` or ``run_until_idle()`` continues them."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            t = self._thread
        if t is not None:
            t.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._sched.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                with self._drive:
                    self._step()
            except BaseException:
                return  # handles were failed by _crash

    def close(self, reason: str = "engine closed", timeout: float | None = None) -> None:
        """Shut the engine down for good: end the background loop (after its current step),
        cancel every queued and running request (``finish_reason`` "cancelled", the tokens so far,
        and ``cancel_reason`` = ``reason`` on the handle and its result), and drop the device
        state. Afterwards ``submit``, ``generate_many``, ``step``, ``start`` and ``warmup`` raise
        ``EngineClosedError``. Idempotent."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = str(reason)
        self.stop(timeout)
        with self._drive:  # no step is running once this is held
            with self._lock:
                pending = self._sched.drain()
                for h in dict.fromkeys(pending):  # a handle may be both in a slot and in flight
                    if h.done:
                        continue
                    h.cancel_reason = self._closed
                    if h._push([], CANCELLED):
                        self._stats.n["cancelled"] += 1
                self._wake.notify_all()
            self._device.close()  # the cache and slot buffers can be freed

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def alive(self) -> bool:
        """Serving: not closed, no device error, and the background loop (``start()``) running."""
        return self._closed is None and self._error is None and self._background

    def __enter__(self) -> "Engine":
        """``with Engine(...) as engine:`` runs the loop in the background and ``close()``s the
        engine on exit (what is still queued or running is cancelled)."""
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ warm-up and statistics
    def warmup(self) -> None:
        """Compile every device program now (one prefill per bucket, one decode) so that no
        request waits for a compilation. Only while idle."""
        with self._drive:
            with self._lock:
                self._check_alive()
                if self._sched.has_work():
                    raise RealmError("warmup: the engine is busy; call it before submitting requests")
            pages = self._sched.pages
            self._device.warmup(self.prefill_rows, self._sched.buckets, self._sched.kill.copy(),
                                None if pages is None else pages.table.copy())

    @property
    def queue_length(self) -> int:
        """Requests submitted and not yet admitted (cheap: what a server checks per request)."""
        with self._lock:
            return len(self._sched.queue)

    def stats(self) -> EngineStats:
        """A snapshot of the counters; the percentiles are computed after the engine's lock is let go."""
        with self._lock:
            pages = self._sched.pages
            counters = self._stats.copy()
            now = dict(queue_length=len(self._sched.queue), active=self._sched.active(), max_slots=self.max_slots,
                       wait_s=self._device.wait_s, dispatch_s=self._device.dispatch_s,
                       blocks=(0, 0, 0) if pages is None else (pages.in_use, pages.available, len(pages.cached)))
        return counters.snapshot(**now)
