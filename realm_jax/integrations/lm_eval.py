"""realm_jax as a model of lm-evaluation-harness (``pip install lm-eval``; optional).

The harness (0.4.13) finds models in its own registry only: it has no plugin hook (no entry
points are scanned), so ``lm_eval --model realm_jax`` cannot find this model by itself. Run the
harness through realm_jax instead, which registers ``realm_jax`` first and then hands the
harness's own command line to it unchanged::

    realm-jax eval --model realm_jax --model_args pretrained=smollm2-135m-instruct \\
        --tasks hellaswag --batch_size auto

(``python -m realm_jax.integrations.lm_eval ARGS`` is the same), or, from Python::

    import lm_eval, realm_jax.integrations.lm_eval  # registers "realm_jax"
    lm_eval.simple_evaluate(model="realm_jax", model_args="pretrained=...", tasks=[...])

or pass an instance: ``lm_eval.simple_evaluate(model=RealmJaxLM(model=loaded_model), ...)``.

It follows the ``hf`` backend request by request: the same tokenization (``tok_encode``: the
tokenizer's special tokens unless the text already starts with the prefix token, or as
``add_bos_token`` says), the same context/continuation split, the same rolling windows
(``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window``, the harness's own
functions), the same left truncation to ``max_length`` and the same stop-string handling, so
its metrics equal ``hf``'s on the same model (tests/test_lm_eval_adapter.py).

Requests are objects with ``.args`` (the harness's ``Instance``): ``(context, continuation)``
for ``loglikelihood``, ``(text,)`` for ``loglikelihood_rolling``, ``(context, gen_kwargs)``
for ``generate_until``.
"""

from __future__ import annotations

import sys
from typing import Any

from .. import progress
from ..errors import RealmError

try:  # the harness is optional: without it the class still works on any objects with .args
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register_model
except ImportError:  # pragma: no cover - depends on the environment
    _Base, _register_model = object, None

NAME = "realm_jax"

# Settings the harness (or a habit from the hf backend) may pass that mean nothing here: JAX
# places the computation on its default device(s), and checkpoints are local files or built-ins.
IGNORED = ("device", "revision", "trust_remote_code", "use_fast_tokenizer", "parallelize", "backend",
           "logits_cache", "truncation", "softmax_dtype")


class _NoCache:
    """Stands in for the harness's cache hook when the harness is not installed."""

    def add_partial(self, attr, req, res):
        pass


def _to_int(value, name: str, default: int | None, low: int = 1) -> int | None:
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise RealmError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RealmError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def parse_batch_size(value) -> int | None:
    """The harness's batch_size: an integer (or its text), or 'auto' / 'auto:N' (None: find it)."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return None
    return _to_int(value, "batch_size", 8)


class TokenizerInfo:
    """The realm_jax tokenizer seen with the attribute names the harness reads for its results
    (``pad_token``/``pad_token_id``, ``eos_token``/``eos_token_id``, ``bos_token``/``bos_token_id``,
    ``chat_template``); everything else is the realm_jax tokenizer's."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def _id(self, token):
        return None if token is None else self._tok.token_to_id(token)

    @property
    def pad_token(self):
        return self._tok.pad_token if self._tok.pad_token is not None else self._tok.eos_token

    @property
    def pad_token_id(self):
        return self._id(self.pad_token)

    @property
    def eos_token_id(self):
        return self._tok.eos_id

    @property
    def bos_token_id(self):
        return self._tok.bos_id


class RealmJaxLM(_Base):
    """An lm-evaluation-harness model backed by realm_jax.

    pretrained (or its synonym source): what ``realm_jax.load`` takes (HF directory, .gguf
    file, built-in name), or a loaded ``realm_jax.Model``; or model=: a loaded Model.
    dtype: params dtype for ``load`` ('auto': float32 on CPU, bfloat16 on accelerators).
    batch_size: requests per device batch, or 'auto' ('auto:N' too): the largest batch of
    max_length-token rows that fits, at most max_batch_size (default 64), found once on first
    use and reported (``scoring.fitting_batch_size``; recorded in the results' ``batch_sizes``).
    max_length: longest model input, also the rolling window (default: the model's
    max_position_embeddings). max_gen_toks: default generation budget (256, as hf).
    add_bos_token: as hf's (None: the tokenizer's own rule). prefix_token_id: the token in
    front of an empty context and of rolling documents (default BOS, else EOS).
    seed: base seed for sampled generation (request i uses seed + i).
    share_prefixes: loglikelihood requests sharing a token prefix (a question's choices, a
    few-shot prompt's questions) compute it once (``scoring.score``); False: each request whole.
    ``device`` and the other hf-only settings in ``IGNORED`` are accepted and ignored.
    """

    def __init__(self, pretrained=None, source=None, *, model=None, dtype: str = "auto", batch_size=8,
                 max_batch_size=64, max_length=None, max_gen_toks=256, add_bos_token=None, prefix_token_id=None,
                 seed=1234, share_prefixes=True, **settings: Any):
        if _Base is not object:
            super().__init__()
        else:
            self._rank, self._world_size, self.cache_hook = 0, 1, _NoCache()
        unknown = sorted(k for k in settings if k not in IGNORED)
        if unknown:
            raise RealmError(f"RealmJaxLM: unknown model_args {', '.join(unknown)}; expected pretrained (or source), "
                             "dtype, batch_size, max_batch_size, max_length, max_gen_toks, add_bos_token, "
                             f"prefix_token_id, seed, share_prefixes (ignored: {', '.join(IGNORED)})")
        if pretrained is not None and source is not None and pretrained != source:
            raise RealmError(f"RealmJaxLM: pretrained={pretrained!r} and source={source!r} are synonyms; give one")
        source = pretrained if pretrained is not None else source
        if source is not None and not isinstance(source, str):  # a loaded Model passed as pretrained
            if model is not None:
                raise RealmError("RealmJaxLM: pass exactly one of pretrained=/source= or model=")
            source, model = None, source
        if (source is None) == (model is None):
            raise RealmError("RealmJaxLM: pass exactly one of pretrained= (or source=: a checkpoint to load) or "
                             f"model= (a loaded realm_jax.Model), got pretrained={source!r}, "
                             f"model={type(model).__name__}")
        if model is None:
            import realm_jax

            with progress.status(f"loading {source}"):
                model = realm_jax.load(source, dtype=dtype)
        if model.tokenizer is None:
            raise RealmError("RealmJaxLM: the model has no tokenizer; the harness sends text")
        self.model = model
        self.source = str(source if source is not None else getattr(model, "source", ""))
        self.tokenizer = TokenizerInfo(model.tokenizer)
        self._batch_size = parse_batch_size(batch_size)
        self.max_batch_size = _to_int(max_batch_size, "max_batch_size", 64)
        self.batch_sizes: dict = {}  # filled when 'auto' chose one (the harness reports it)
        self.max_length = _to_int(max_length, "max_length", int(model.config.max_position_embeddings))
        self.max_gen_toks = _to_int(max_gen_toks, "max_gen_toks", 256)
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise RealmError(f"add_bos_token: expected True or False, got {add_bos_token!r}")
        self.add_bos_token = add_bos_token
        if not isinstance(share_prefixes, bool):
            raise RealmError(f"share_prefixes: expected True or False, got {share_prefixes!r}")
        self.share_prefixes = share_prefixes
        self._prefix = None if prefix_token_id is None else _to_int(prefix_token_id, "prefix_token_id", None, low=0)
        self.seed = int(seed)
        self._device = "jax"

    # -------------------------------------------------------------------- settings
    @property
    def batch_size(self) -> int:
        """Requests per device batch; for 'auto', found on first use (once) and reported."""
        if self._batch_size is None:
            from ..scoring import fitting_batch_size

            b, how = fitting_batch_size(self.model, self.max_length, limit=self.max_batch_size)
            progress.note(f"realm_jax: batch_size=auto -> {b} ({how})")
            self._batch_size = b
            self.batch_sizes[0] = b
        return self._batch_size

    @property
    def eot_token_id(self) -> int | None:
        return self.model.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        from ..scoring import prefix_token_id

        return prefix_token_id(self.model.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """Text -> ids as the hf backend encodes: the tokenizer's special tokens by default (or as
        ``add_bos_token`` says), none when the text already starts with the prefix token's text."""
        tok = self.model.tokenizer
        add = add_special_tokens
        if add is None:
            add = True if self.add_bos_token is None else self.add_bos_token
            if string.startswith(tok.decode([self.prefix_token_id], skip_special_tokens=False)):
                add = False
        ids = tok.encode(string, add_special_tokens=add)
        if add and add_special_tokens is None and self.add_bos_token and tok.bos_id is not None \
                and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id] + ids
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's split: trailing spaces of the context go to the continuation; the joint
        text is encoded once and cut after the context's own tokens. An empty context is the
        prefix token (or the continuation's first token, when that is the prefix token)."""
        from ..scoring import encode_pair

        return encode_pair(self.model.tokenizer, context, continuation, encode=self.tok_encode,
                           prefix=self.prefix_token_id)

    def _bar(self, total: int, desc: str, disable_tqdm: bool):
        return progress.bar(total, f"realm_jax {desc}", unit="request", disable=disable_tqdm or self.rank != 0)

    # -------------------------------------------------------------------- harness API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) -> (summed log-prob of the continuation, is it greedy)."""
        pairs = [tuple(r.args) for r in requests]
        enc = [self.encode_pair(c, k) for c, k in pairs]
        todo = [i for i, (_, cont) in enumerate(enc) if cont]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # nothing to score: log 1
        if todo:
            from ..scoring import score

            scores = score(self.model, [enc[i] for i in todo], batch_size=self.batch_size, max_length=self.max_length,
                           share_prefixes=self.share_prefixes,
                           progress=False if disable_tqdm else "realm_jax loglikelihood")
            for i, s in zip(todo, scores):
                out[i] = (s.logprob, s.is_greedy)
        for args, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """(text,) -> summed log-prob of every token of the text, in the harness's windows
        (``get_rolling_token_windows`` with context_len=1, made disjoint): the first window
        predicts up to max_length tokens after the prefix token; each later one predicts the next
        max_length tokens, the last one with its context filled back up to max_length."""
        try:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        except ImportError:
            raise RealmError("loglikelihood_rolling: needs lm-evaluation-harness (pip install lm-eval), "
                             "whose window rule it uses") from None
        from ..scoring import score

        windows, owner = [], []
        for d, r in enumerate(requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(r.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx), list(cont)))
                owner.append(d)
        out = [0.0] * len(requests)
        if windows:
            scores = score(self.model, windows, batch_size=self.batch_size, max_length=self.max_length,
                           progress=False if disable_tqdm else "realm_jax loglikelihood_rolling", unit="window")
            for d, s in zip(owner, scores):
                out[d] += s.logprob
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(r.args), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """(context, gen_kwargs) -> generated text, cut before the first ``until`` string.

        gen_kwargs: until (str or list; the EOS text is always a stop), max_gen_toks (or
        max_new_tokens, max_tokens, max_completion_tokens), do_sample (False = greedy),
        temperature, top_k, top_p. Contexts are left-truncated to max_length - max_gen_toks
        tokens (as hf).
        """
        from ..generation import generate

        tok = self.model.tokenizer
        eos_text = tok.decode([tok.eos_id], skip_special_tokens=False) if tok.eos_id is not None else None
        rows = []
        for i, r in enumerate(requests):
            context = r.args[0]
            until, max_new, sampling = gen_settings(r.args[1] if len(r.args) > 1 else None, self.max_gen_toks)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            if max_new >= self.max_length:
                raise RealmError(f"max_gen_toks: {max_new} leaves no room for the context within "
                                 f"max_length={self.max_length}")
            add = False if (tok.bos_token and context.startswith(tok.bos_token)) else \
                (True if self.add_bos_token is None else self.add_bos_token)
            ids = tok.encode(context, add_special_tokens=add)[-(self.max_length - max_new):]
            rows.append(dict(ids=ids, until=until, max_new=max_new, seed=self.seed + i, **sampling))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["ids"]))
        out = [""] * len(rows)
        with self._bar(len(rows), "generate_until", disable_tqdm) as bar:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = [rows[i] for i in idx]
                res = generate(self.model, [b["ids"] for b in batch], [b["max_new"] for b in batch],
                               temperature=[b["temperature"] for b in batch], top_k=[b["top_k"] for b in batch],
                               top_p=[b["top_p"] for b in batch], seed=[b["seed"] for b in batch],
                               stop_ids=[self._stop_ids(b["until"]) for b in batch])
                for i, b, text in zip(idx, batch, res.texts):
                    out[i] = cut_at_stop(text, b["until"])
                bar.update(len(idx))
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("generate_until", tuple(r.args), res)
        return out

    def _stop_ids(self, until: list[str]) -> list[int]:
        """EOS ids, plus the id of every stop string that is one token by itself (generating it
        puts the string in the text, so stopping there changes nothing after the cut)."""
        from ..generation import default_stop_ids

        ids = list(default_stop_ids(self.model))
        tok = self.model.tokenizer
        for s in until:
            enc = tok.encode(s, add_special_tokens=False)
            if len(enc) == 1 and tok.decode(enc, skip_special_tokens=False) == s and enc[0] not in ids:
                ids.append(enc[0])
        return ids

    # -------------------------------------------------------------------- chat templates, metadata
    @property
    def tokenizer_name(self) -> str:
        return self.source.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self.model.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied as hf does: with the generation prompt, or (when the harness
        puts a prefix of the answer in a final assistant message) continuing that message; a
        template that rejects the system role gets the history without it."""
        import jinja2

        def render(history):
            if add_generation_prompt or not history:
                return self.model.tokenizer.apply_chat_template(history, add_generation_prompt=add_generation_prompt)
            return continue_final_message(self.model.tokenizer, history)

        try:
            return render(chat_history)
        except jinja2.TemplateError:
            return render([m for m in chat_history if m["role"] != "system"])

    def get_model_info(self) -> dict:
        """What the hf backend records about its model, for the results' config."""
        import jax

        from .. import builtin

        spec = builtin.BUILTIN_MODELS.get(self.source)
        params = self.model.params
        return {
            "model_num_parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
            "model_dtype": str(self.model.dtype),
            "model_revision": spec.version if spec else None,
            "model_sha": spec.sha256 if spec else "",
            "model_source": self.source,
            "realm_jax_batch_size": self._batch_size,
        }


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def continue_final_message(tok, history: list[dict]) -> str:
    """The chat rendered so that the model continues its final message (transformers'
    ``continue_final_message=True``): a tag is appended to that message, the chat rendered
    without a generation prompt and cut at the tag (and right-stripped where the template
    trimmed the tag's trailing space)."""
    history = [dict(m) for m in history]
    final = history[-1]["content"]
    history[-1]["content"] = final + _CONTINUE_TAG
    text = tok.apply_chat_template(history, add_generation_prompt=False)
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise RealmError("apply_chat_template: the chat template drops part of the final message, so it "
                         "cannot be continued")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def gen_settings(gen_kwargs, default_max: int) -> tuple[list[str], int, dict]:
    """The harness's generation kwargs -> (until list, max new tokens, sampling settings).

    The budget is the first of max_gen_toks, max_new_tokens, max_tokens, max_completion_tokens.
    Sampling happens when do_sample is true, or when it is absent and temperature > 0;
    otherwise decoding is greedy.
    """
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    budget = next((kw[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
                   if kw.get(k) is not None), None)
    max_new = _to_int(budget, "max_gen_toks", default_max)
    temperature = float(kw.get("temperature") or 0.0)
    sample = kw.get("do_sample")
    if sample is None:
        sample = temperature > 0
    if not sample:
        return until, max_new, dict(temperature=0.0, top_k=None, top_p=None)
    return until, max_new, dict(temperature=temperature, top_k=kw.get("top_k"), top_p=kw.get("top_p"))


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            j = text.find(s)
            if j != -1:
                cut = min(cut, j)
    return text[:cut]


def register() -> bool:
    """Register ``RealmJaxLM`` as ``realm_jax`` in the harness; False if it is not installed."""
    if _register_model is None:
        return False
    import lm_eval.models  # noqa: F401  (fills the registry first, or the harness skips its own models)
    from lm_eval.api.registry import model_registry

    if model_registry.get(NAME, None) is not RealmJaxLM:
        _register_model(NAME)(RealmJaxLM)
    return True


if __name__ != "__main__":
    register()


def harness_argv(argv: list[str]) -> list[str]:
    """The harness's arguments with realm_jax's own spellings made the harness's: ``source=`` in
    ``--model_args`` becomes ``pretrained=`` (so the results name the model, as for hf)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("--model_args", "-a") and i + 1 < len(out):
            out[i + 1] = _source_to_pretrained(out[i + 1])
        elif a.startswith("--model_args="):
            out[i] = "--model_args=" + _source_to_pretrained(a[len("--model_args="):])
    return out


def _source_to_pretrained(text: str) -> str:
    if text.lstrip().startswith("{"):
        return text
    parts = text.split(",")
    if any(p.strip().startswith("pretrained=") for p in parts):
        return text
    return ",".join("pretrained=" + p.strip()[len("source="):] if p.strip().startswith("source=") else p
                    for p in parts)


def main(argv: list[str] | None = None) -> int:
    """``realm-jax eval ARGS`` / ``python -m realm_jax.integrations.lm_eval ARGS``: the harness's
    command line (``lm_eval ARGS``) with ``realm_jax`` registered first."""
    if not register():
        print("lm-evaluation-harness is not installed: pip install lm-eval", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    args = harness_argv(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm_eval"] + args
    try:
        cli_evaluate()
    except SystemExit as e:  # the harness's argparse exits (--help, bad arguments)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":  # run the registered module's main, not a second copy of the class
    from realm_jax.integrations.lm_eval import main as _main

    sys.exit(_main())
