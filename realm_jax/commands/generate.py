"""``realm-jax generate``: prompts in, text out (streamed for a single prompt)."""

from __future__ import annotations

import argparse
import json
import sys

from . import add_quiet, loading, show_defaults

HELP = "generate text from one or more prompts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, .gguf file or built-in name (default: smollm2-135m-instruct)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeat for a batch; default: none, give this or --prompt-ids)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt given as comma-separated token ids (repeatable; default: none)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per prompt at most; a prompt stops earlier at an end-of-sequence "
                        "token (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample from the K most likely tokens only (default: no limit)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P (default: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (prompt i uses its own key from it)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="params dtype (default: auto = float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--max-len", type=int, default=None, help="KV cache length (default: what the request needs)")
    p.add_argument("--lora", action="append", default=[], metavar="[NAME=]DIR",
                   help="a PEFT LoRA adapter directory (repeatable; NAME defaults to the directory name; "
                        "default: none)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME",
                   help="adapter per prompt, in prompt order ('base' = none; once = all prompts; default: the one "
                        "--lora for all prompts)")
    p.add_argument("--draft", default=None, metavar="SOURCE|self:N|lookup|paired",
                   help="speculative decoding with this draft (paired: from realm_jax/drafts.json); prints statistics "
                        "(default: none, plain decoding)")
    p.add_argument("--k", default=None, metavar="K|auto",
                   help="tokens drafted per round (default: the pairing's, else 4)")
    add_quiet(p)
    show_defaults(p)


def _parse_ids(text: str, i: int) -> list[int]:
    from ..errors import RealmError

    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise RealmError(f"--prompt-ids #{i}: expected comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from .. import progress

    with progress.quieted(args.quiet):
        return _run(args)


def _run(args) -> int:
    from .. import lora
    from .adapters import plan_adapters
    from ..errors import RealmError
    from ..generation import generate, generate_stream
    from ..loading import DEFAULT_MODEL, load

    prompts: list = list(args.prompt) + [_parse_ids(t, i) for i, t in enumerate(args.prompt_ids)]
    if not prompts:
        raise RealmError("give at least one --prompt TEXT (or --prompt-ids IDS)")
    plan = plan_adapters(args.lora, args.adapter, len(prompts))  # checked before loading anything
    with loading(args.model or DEFAULT_MODEL):
        model = load(args.model or DEFAULT_MODEL, dtype=args.dtype)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              max_len=args.max_len, chat=args.chat)
    if plan is not None:
        kw.update(adapters=lora.load_adapters(plan.dirs, model), adapter_ids=plan.ids)
    labels = list(args.prompt) + list(args.prompt_ids)

    if len(prompts) == 1 and not args.json and model.tokenizer is not None and not args.draft:
        for chunk in generate_stream(model, prompts, args.max_new_tokens, **kw):
            sys.stdout.write(chunk.texts[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0

    if args.draft:

        res = speculative_from_cli(model, prompts, args.max_new_tokens, draft=args.draft, k=args.k, **kw)
        print(f"speculative: {res.stats.summary()}", file=sys.stderr)
    else:
        res = generate(model, prompts, args.max_new_tokens, **kw)
    for i in range(len(res)):
        if args.json:
            print(json.dumps({"prompt": labels[i], "prompt_tokens": res.prompt_lengths[i], "tokens": res.tokens[i],
                              "text": res.texts[i], "finish_reason": res.finish_reasons[i]}, ensure_ascii=False))
        else:
            body = res.texts[i] if res.texts[i] is not None else " ".join(map(str, res.tokens[i]))
            if len(res) > 1:
                print(f"--- [{i}] {labels[i]}")
            print(body)
    return 0


def speculative_from_cli(target, prompts, max_new_tokens, *, draft: str, k: str | None = None,
                         **kw):
    """``realm-jax generate --draft SOURCE|self:N|lookup|paired --k K|auto``: resolve the draft
    (``drafts.resolve_draft``), parse k (default: the pairing's, else 4), run."""
    from ..drafts import resolve_draft
    from ..errors import RealmError
    from ..speculative import speculative_generate

    d, paired_k = resolve_draft(target, draft)
    if k is None:
        k = paired_k if paired_k is not None else 4
    if isinstance(k, str) and k != "auto":
        try:
            k = int(k)
        except ValueError:
            raise RealmError(f"--k: expected an integer >= 0 or 'auto', got {k!r}") from None
    return speculative_generate(target, d, prompts, max_new_tokens, k=k, **kw)
