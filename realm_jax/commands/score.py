"""``realm-jax score``: log-likelihood of (context, continuation) pairs from a JSONL file.

Input, one JSON object a line (blank lines are skipped)::

    {"context": "The capital of France is", "continuation": " Paris"}
    {"context_ids": [1, 415, 5565], "continuation_ids": [3681]}

(an optional "id" is copied to the output). Output, one line per request in input order::

    {"index": 0, "logprob": -1.23, "is_greedy": true, "num_tokens": 1, "token_logprobs": [-1.23],
     "digest": "..."}

With ``--out`` the results are appended chunk by chunk (flushed and fsynced), and a rerun with
the same arguments resumes after the last complete line: it recomputes the chunk that was cut
short (same grouping, so the same numbers) and writes only what is missing, so the final file is
the same as an uninterrupted run's. Requests of one chunk that share a token prefix (the choices
of a question, the questions of a few-shot prompt) compute it once (``scoring.iter_scores``);
put such requests on adjacent lines, as evaluation sets come, so they fall in one chunk. ``digest`` ties each line to its input line, so a rerun on
different data refuses to mix them.

Several processes (``--coordinator-address/--num-processes/--process-id``, the usual
``jax.distributed`` settings): each process scores its share of every chunk on its own devices
(``--mesh`` lays them out), the results are gathered in input order and process 0 writes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np

from . import add_quiet, loading, show_defaults

HELP = "score (context, continuation) pairs from a JSONL file: summed and per-token log-probs"

FORMAT = ('{"context": str, "continuation": str} or {"context_ids": [int, ...], "continuation_ids": [int, ...]}')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF checkpoint directory, .gguf file or built-in name (default: smollm2-135m-instruct)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help=f"one request a line (required): {FORMAT}")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="results file, written incrementally; a rerun with the same arguments resumes it "
                        "(default: stdout)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="requests per device batch at most; fewer run as a smaller batch (default: 8)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="requests per written chunk, sorted by length within it (default: 16 x batch size)")
    p.add_argument("--max-length", type=int, default=None, metavar="T",
                   help="longest model input; longer requests lose context from the left (default: no limit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="params dtype (default: auto = float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--no-share-prefixes", dest="share_prefixes", action="store_false",
                   help="score every request whole, even where requests of a chunk share a token prefix "
                        "(default: a shared prefix is computed once per chunk; same numbers to float rounding)")
    add_quiet(p)
    p.add_argument("--mesh", default=None, metavar="DATA,MODEL",
                   help="run on a mesh of this process's devices, e.g. 4,2 (default: one device)")
    from ..cli import add_distributed_arguments

    add_distributed_arguments(p)
    show_defaults(p)


def parse_mesh(text: str | None):
    """'DATA,MODEL' -> a mesh over this process's devices (None: no mesh)."""
    from ..errors import RealmError

    if text is None:
        return None
    try:
        data, model = (int(x) for x in text.split(","))
    except ValueError:
        raise RealmError(f"--mesh: expected DATA,MODEL (two integers), got {text!r}") from None
    import jax

    from ..sharding import make_mesh

    return make_mesh(data, model, devices=jax.local_devices())


def read_requests(path: str) -> tuple[list[tuple], list[int], list[str], list]:
    """Parse and check the JSONL file -> (requests, line numbers, digests, ids). Every error names
    the line."""
    from ..errors import RealmError

    with open(path, "rb") as f:
        raw = f.read()
    requests, lines, digests, ids = [], [], [], []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RealmError(f"{where}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RealmError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected {FORMAT}") from None
        if not isinstance(obj, dict):
            raise RealmError(f"{where}: expected a JSON object {FORMAT}, got {type(obj).__name__}")
        if "context_ids" in obj or "continuation_ids" in obj:
            keys, kind = ("context_ids", "continuation_ids"), "a list of token ids"
            ok = lambda v: isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)  # noqa: E731
        else:
            keys, kind = ("context", "continuation"), "a string"
            ok = lambda v: isinstance(v, str)  # noqa: E731
        for k in keys:
            if k not in obj:
                raise RealmError(f"{where}: missing key {k!r}; expected {FORMAT}")
            if not ok(obj[k]):
                raise RealmError(f"{where}: {k!r} must be {kind}, got {json.dumps(obj[k])[:60]}")
        if len(obj[keys[1]]) == 0:
            raise RealmError(f"{where}: {keys[1]!r} is empty (nothing to score)")
        requests.append((obj[keys[0]], obj[keys[1]]))
        lines.append(n)
        digests.append(hashlib.sha256(line.strip()).hexdigest()[:16])
        ids.append(obj.get("id"))
    if not requests:
        raise RealmError(f"{path}: no requests (the file is empty); expected one {FORMAT} a line")
    return requests, lines, digests, ids


def resume_point(out: str, digests: list[str]) -> int:
    """How many results ``out`` already holds (0 if absent). A trailing partial line (cut short
    by an interruption) is removed; any other mismatch with the data is an error."""
    from ..errors import RealmError

    if not os.path.exists(out):
        return 0
    with open(out, "rb") as f:
        raw = f.read()
    complete = raw[:raw.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    if len(lines) > len(digests):
        raise RealmError(f"--out {out}: holds {len(lines)} results but the data has {len(digests)} requests "
                         "(a different data file?); remove it or choose another --out")
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
            good = obj.get("index") == i and obj.get("digest") == digests[i]
        except (ValueError, AttributeError):
            good = False
        if not good:
            raise RealmError(f"--out {out}: line {i + 1} is not the result of request {i} of this data file "
                             "(different data or a damaged file); remove it or choose another --out")
    if len(complete) != len(raw):
        with open(out, "r+b") as f:
            f.truncate(len(complete))
    return len(lines)


class Progress:
    """A bar on stderr (``realm_jax.progress``: only on a terminal, not with --quiet): requests
    done, with tokens per second."""

    def __init__(self, total: int, total_tokens: int, done: int, quiet: bool):
        from .. import progress

        self.tokens = 0
        self.start = time.perf_counter()
        self.bar = progress.bar(total, "score", unit="request", disable=quiet, initial=done)

    def update(self, requests: int, tokens: int, final: bool = False) -> None:
        self.tokens += tokens
        if requests:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate:.0f} tokens/s", refresh=False)
            self.bar.update(requests)
        if final:
            self.bar.close()


def result_line(i: int, s, digest: str, rid) -> str:
    obj = {"index": i}
    if rid is not None:
        obj["id"] = rid
    obj.update(logprob=s.logprob, is_greedy=s.is_greedy, num_tokens=s.num_tokens,
               token_logprobs=list(s.token_logprobs), digest=digest)
    return json.dumps(obj, ensure_ascii=False) + "\n"


def run(args) -> int:
    from .. import progress

    with progress.quieted(args.quiet):
        return _run(args)


def _run(args) -> int:
    from ..errors import RealmError
    from ..loading import DEFAULT_MODEL, load
    from ..scoring import iter_scores, tokenize_requests

    if args.batch_size < 1:
        raise RealmError(f"--batch-size: expected a positive int, got {args.batch_size}")
    chunk = args.chunk_size if args.chunk_size is not None else 16 * args.batch_size
    if chunk < 1:
        raise RealmError(f"--chunk-size: expected a positive int, got {chunk}")
    if args.max_length is not None and args.max_length < 1:
        raise RealmError(f"--max-length: expected a positive int, got {args.max_length}")
    from ..cli import initialize_from_args
    from ..sharding import gather_in_order, process_shard

    initialize_from_args(args)  # multi-host: every process runs this command; process 0 writes
    import jax

    nproc, pid = jax.process_count(), jax.process_index()
    requests, lines, digests, rids = read_requests(args.data)
    done = resume_point(args.out, digests) if (args.out and pid == 0) else 0
    if nproc > 1:  # every process resumes where process 0's file says (no shared disk needed)
        from jax.experimental import multihost_utils

        done = int(multihost_utils.broadcast_one_to_all(np.int32(done)))
    n = len(requests)
    if done == n:
        if not args.quiet and pid == 0:
            print(f"score: {args.out} already holds all {n} results", file=sys.stderr)
        return 0

    with loading(args.model or DEFAULT_MODEL):
        model = load(args.model or DEFAULT_MODEL, dtype=args.dtype, mesh=parse_mesh(args.mesh))
    pairs = []
    for i, r in enumerate(requests):  # tokenize (and check) everything before any device work
        try:
            pairs.append(tuple(tokenize_requests(model, [r])[0]))
        except RealmError as e:
            detail = re.sub(r"^requests\[0\]:? ?", "", str(e))
            raise RealmError(f"{args.data}: line {lines[i]}: {detail}") from None
    first = (done // chunk) * chunk  # recompute a chunk cut short with the same grouping
    progress = Progress(n, sum(len(c) + len(k) for c, k in pairs[first:]), first, args.quiet or pid != 0)
    out = (open(args.out, "a", encoding="utf-8") if args.out else sys.stdout) if pid == 0 else None
    try:
        for start in range(first, n, chunk):
            part = pairs[start:start + chunk]
            mine = process_shard(part) if nproc > 1 else part  # this process's share of the chunk
            results = [None] * len(mine)
            for idx, scores in iter_scores(model, mine, batch_size=args.batch_size, max_length=args.max_length,
                                           share_prefixes=args.share_prefixes):
                for j, s in zip(idx, scores):
                    results[j] = s
                progress.update(len(idx) * nproc, sum(len(mine[j][0]) + len(mine[j][1]) for j in idx) * nproc)
            if nproc > 1:
                results = gather_in_order(results, len(part))
            if out is None:
                continue
            text = "".join(result_line(start + j, s, digests[start + j], rids[start + j])
                           for j, s in enumerate(results) if start + j >= done)
            out.write(text)
            out.flush()
            if out is not sys.stdout:
                os.fsync(out.fileno())
        progress.update(0, 0, final=True)
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
    return 0
