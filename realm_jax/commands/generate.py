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
    p.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop tokens less likely than P times the most likely one (default: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="X",
                   help="HF repetition penalty over prompt and output tokens, > 0 (default: off = 1)")
    p.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help="OpenAI frequency penalty in [-2, 2] over output tokens (default: off = 0)")
    p.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help="OpenAI presence penalty in [-2, 2] over output tokens (default: off = 0)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit (repeatable; default: none)")
    p.add_argument("--min-tokens", type=int, default=None, metavar="N",
                   help="no end-of-sequence before N new tokens (default: 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop at this string; the text is cut before it (repeatable; default: none)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each token's log-prob and N top alternatives, 0..20 (default: none)")
    p.add_argument("--json-schema", default=None, metavar="SCHEMA|@FILE",
                   help="constrain the output to JSON matching this schema (JSON text, or @ and a file; needs "
                        "the 'constrained' extra; default: none)")
    p.add_argument("--regex", default=None, metavar="PATTERN",
                   help="constrain the whole output to match this regular expression (default: none)")
    p.add_argument("--choice", action="append", default=[], metavar="TEXT",
                   help="constrain the output to one of these strings (repeatable; default: none)")
    p.add_argument("--grammar", default=None, metavar="FILE",
                   help="constrain the output to a Lark grammar read from FILE (llguidance's dialect; default: none)")
    p.add_argument("--n", type=int, default=1, metavar="N", help="samples per prompt, seeds seed..seed+N-1 (default: 1)")
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


def _parse_bias(items: list[str]) -> dict[int, float]:
    from ..errors import RealmError

    out = {}
    for item in items:
        tid, sep, val = item.partition("=")
        try:
            out[int(tid)] = float(val)
        except ValueError:
            raise RealmError(f"--logit-bias: expected ID=BIAS (an integer id, a number), got {item!r}") from None
        if not sep:
            raise RealmError(f"--logit-bias: expected ID=BIAS, got {item!r}")
    return out


def _read(path: str, flag: str) -> str:
    from ..errors import RealmError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RealmError(f"{flag}: cannot read {path!r} ({e})") from None


def _constraint(args):
    """The one constraint flag given (or None), as a ``Constraint``."""
    from ..constraints import Constraint
    from ..errors import RealmError

    given = [f for f, v in (("--json-schema", args.json_schema), ("--regex", args.regex), ("--choice", args.choice),
                            ("--grammar", args.grammar)) if v]
    if len(given) > 1:
        raise RealmError(f"give at most one of --json-schema, --regex, --choice, --grammar; got {', '.join(given)}")
    if args.json_schema:
        text = args.json_schema
        text = _read(text[1:], "--json-schema") if text.startswith("@") else text
        return Constraint.of(Constraint.json_schema(text), "--json-schema")
    if args.regex:
        return Constraint.of(Constraint.regex(args.regex), "--regex")
    if args.choice:
        return Constraint.of(Constraint.choice(args.choice), "--choice")
    if args.grammar:
        return Constraint.of(Constraint.grammar(_read(args.grammar, "--grammar")), "--grammar")
    return None


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
    _constraint(args)  # likewise
    with loading(args.model or DEFAULT_MODEL):
        model = load(args.model or DEFAULT_MODEL, dtype=args.dtype)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              max_len=args.max_len, chat=args.chat)
    extra = dict(min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                 presence_penalty=args.presence_penalty, logit_bias=_parse_bias(args.logit_bias) or None,
                 min_tokens=args.min_tokens, stop=args.stop or None, logprobs=args.logprobs, n=args.n,
                 constraint=_constraint(args))
    extra = {k: v for k, v in extra.items() if v is not None and not (k == "n" and v == 1)}
    unserved = [k for k in extra if k != "constraint"]  # a draft serves constraints, not the others yet
    if unserved and args.draft:
        raise RealmError(f"--draft: not available with {', '.join('--' + k.replace('_', '-') for k in unserved)} yet")
    kw.update(extra)
    if plan is not None:
        kw.update(adapters=lora.load_adapters(plan.dirs, model), adapter_ids=plan.ids)
    labels = list(args.prompt) + list(args.prompt_ids)

    if len(prompts) == 1 and not args.json and model.tokenizer is not None and not args.draft and args.n == 1:
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
    m = len(res) // len(prompts)  # rows per prompt (--n)
    for i in range(len(res)):
        label = labels[i // m]
        if args.json:
            row = {"prompt": label, "prompt_tokens": res.prompt_lengths[i], "tokens": res.tokens[i],
                   "text": res.texts[i], "finish_reason": res.finish_reasons[i]}
            if m > 1:
                row["sample"] = i % m
            if res.logprobs is not None:
                row["logprobs"] = [{"token": t.token, "logprob": t.logprob, "sampled_logprob": t.sampled,
                                    "top": [[tid, lp] for tid, lp in t.top]} for t in res.logprobs[i]]
                row["cumulative_logprob"] = res.cumulative_logprobs[i]
            print(json.dumps(row, ensure_ascii=False))
        else:
            body = res.texts[i] if res.texts[i] is not None else " ".join(map(str, res.tokens[i]))
            if len(res) > 1:
                print(f"--- [{i // m}{f'.{i % m}' if m > 1 else ''}] {label}")
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
