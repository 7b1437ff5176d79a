"""``realm-jax serve``: the OpenAI-compatible server (``realm_jax.server``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import loading, show_defaults

HELP = "serve a model over an OpenAI-compatible HTTP API (multi-tenant, LoRA adapters per tenant)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF checkpoint directory, .gguf file or built-in name (default: smollm2-135m-instruct)")
    p.add_argument("--name", default=None, help="the base model's name in requests (default: the model's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PEFT_DIR",
                   help="serve a PEFT LoRA adapter as the model NAME (repeatable)")
    p.add_argument("--adapter-slots", type=int, default=None, metavar="N",
                   help="adapter slots, for adapters loaded at run time through /admin/adapters "
                        "(default: the adapters given)")
    p.add_argument("--adapter-rank", type=int, default=None, metavar="R",
                   help="the largest rank a slot takes (default: the given adapters' largest, else 16)")
    p.add_argument("--draft", default=None,
                   help="a draft for speculative decoding: a model, self:N or lookup (default: none)")
    p.add_argument("--tenants", default=None, metavar="FILE",
                   help="a tenants JSON file: API keys, models per tenant, limits, admin key (default: open, no keys)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-slots", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + new tokens of one request (default: min(1024, the model's context))")
    p.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="a paged KV cache of N positions per block: memory per used token, admission by free "
                        "blocks, preemption by recompute (default: none, every slot holds --max-seq-len; "
                        "paging takes no --draft yet)")
    p.add_argument("--num-blocks", type=int, default=None, metavar="N",
                   help="blocks in the paged pool (default: the dense cache's memory)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="share the KV blocks of prompt prefixes seen before (needs --block-size)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill long prompts N tokens per engine step, between decode calls (needs --block-size)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--no-constrained", action="store_true",
                   help="no response_format (JSON schema) decoding (default: on when llguidance is installed)")
    p.add_argument("--max-logprobs", type=int, default=5, metavar="N",
                   help="log-prob alternatives the engine computes per token (requests may ask up to N through "
                        "the engine; more, echo and best_of go through generate); -1 = none, for the last bit "
                        "of decode speed")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="params dtype (default: auto = float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    show_defaults(p)


def _adapters(specs) -> dict:
    from ..errors import RealmError

    out = {}
    for spec in specs:
        name, sep, d = spec.partition("=")
        if not sep or not name or not d:
            raise RealmError(f"--adapter: expected NAME=PEFT_DIR, got {spec!r}")
        if name in out:
            raise RealmError(f"--adapter: the name {name!r} is given twice")
        out[name] = d
    return out


def run(args) -> int:
    from .. import load
    from ..loading import DEFAULT_MODEL
    from ..errors import RealmError
    from ..server.run import serve
    from ..server.tenants import Tenants

    try:
        import fastapi, sse_starlette, uvicorn, prometheus_client  # noqa: E401, F401
    except ImportError as e:
        raise RealmError(f"realm-jax serve needs the 'serve' extra (pip install 'realm_jax[serve]'): {e}") from None
    adapters = _adapters(args.adapter)
    tenants = Tenants.from_file(args.tenants) if args.tenants else None
    source = args.model or DEFAULT_MODEL
    constrained = not args.no_constrained
    if constrained:
        try:
            import llguidance  # noqa: F401
        except ImportError:
            constrained = False
    with loading(source):
        model = load(source, dtype=args.dtype)
    name = args.name or Path(str(source).rstrip("/")).name
    if args.max_logprobs < -1:
        raise RealmError(f"--max-logprobs: expected -1 (none) or an integer in [0, 20], got {args.max_logprobs}")
    max_logprobs = None if args.max_logprobs == -1 or args.draft is not None else args.max_logprobs
    opts = dict(max_slots=args.max_slots, max_seq_len=args.max_seq_len, constrained=constrained,
                adapter_slots=args.adapter_slots, adapter_rank=args.adapter_rank, max_logprobs=max_logprobs,
                block_size=args.block_size, num_blocks=args.num_blocks, prefix_caching=args.prefix_caching,
                prefill_chunk=args.prefill_chunk)
    if args.draft is not None:
        opts["draft"] = args.draft if args.draft in ("lookup",) or args.draft.startswith("self:") else load(
            args.draft, dtype=args.dtype)
    return serve(model, name=name, host=args.host, port=args.port, tenants=tenants, adapters=adapters,
                 engine_options=opts, max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout,
                 log_level=args.log_level)
