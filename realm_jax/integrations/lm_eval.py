"""realm_jax as a model of lm-evaluation-harness (``pip install lm-eval``; optional).

The harness (0.4.x) finds models in its registry only; it does not scan installed packages.
Importing this module registers ``RealmJaxLM`` under the name ``realm_jax`` when the harness
is installed, so either run the harness through this module::

    python -m realm_jax.integrations.lm_eval --model realm_jax \\
        --model_args source=smollm2-135m-instruct,dtype=float32 --tasks hellaswag --batch_size 16

(the same arguments as ``lm_eval``), or, from Python::

    import lm_eval, realm_jax.integrations.lm_eval  # registers "realm_jax"
    lm_eval.simple_evaluate(model="realm_jax", model_args="source=...", tasks=[...])

or pass an instance: ``lm_eval.simple_evaluate(model=RealmJaxLM(model=loaded_model), ...)``.

Requests are objects with ``.args`` (the harness's ``Instance``): ``(context, continuation)``
for ``loglikelihood``, ``(text,)`` for ``loglikelihood_rolling``, ``(context, gen_kwargs)``
for ``generate_until``. Tokenization follows the harness (see ``scoring.encode_pair``).
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import RealmError

try:  # the harness is optional: without it the class still works on any objects with .args
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register_model
except ImportError:  # pragma: no cover - depends on the environment
    _Base, _register_model = object, None

NAME = "realm_jax"


class _NoCache:
    """Stands in for the harness's cache hook when the harness is not installed."""

    def add_partial(self, attr, req, res):
        pass


def _to_int(value, name: str, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, str):
        if value.startswith("auto"):
            return default
        try:
            value = int(value)
        except ValueError:
            raise RealmError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RealmError(f"{name}: expected a positive integer, got {value!r}")
    return value


class RealmJaxLM(_Base):
    """An lm-evaluation-harness model backed by realm_jax.

    source: what ``realm_jax.load`` takes (HF directory, .gguf file, built-in name); or
    model: an already loaded ``realm_jax.Model``.
    dtype: params dtype for ``load`` ('auto': float32 on CPU, bfloat16 on accelerators).
    batch_size: rows per device batch ('auto' = 8). max_length: longest model input
    (default: the model's max_position_embeddings). max_gen_toks: default generation budget.
    seed: base seed for sampled generation (request i uses seed + i).
    Other harness settings (``device``, ``max_batch_size``) are accepted and ignored: JAX
    places the computation on its default device.
    """

    def __init__(self, source: str | None = None, *, model=None, dtype: str = "auto", batch_size=8,
                 max_length=None, max_gen_toks=256, seed=1234, **ignored: Any):
        if _Base is not object:
            super().__init__()
        else:
            self._rank, self._world_size, self.cache_hook = 0, 1, _NoCache()
        if (source is None) == (model is None):
            raise RealmError("RealmJaxLM: pass exactly one of source= (a checkpoint to load) or model= "
                             f"(a loaded realm_jax.Model), got source={source!r}, model={type(model).__name__}")
        if model is None:
            import realm_jax

            model = realm_jax.load(source, dtype=dtype)
        if model.tokenizer is None:
            raise RealmError("RealmJaxLM: the model has no tokenizer; the harness sends text")
        self.model = model
        self.source = str(source if source is not None else getattr(model, "source", ""))
        self.batch_size = _to_int(batch_size, "batch_size", 8)
        self.max_length = _to_int(max_length, "max_length", int(model.config.max_position_embeddings))
        self.max_gen_toks = _to_int(max_gen_toks, "max_gen_toks", 256)
        self.seed = int(seed)
        self._device = "jax"

    # -------------------------------------------------------------------- harness API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) -> (summed log-prob of the continuation, is it greedy)."""
        from ..scoring import score

        pairs = [tuple(r.args) for r in requests]
        todo = [i for i, (_, cont) in enumerate(pairs) if cont != ""]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation: log 1
        scores = score(self.model, [pairs[i] for i in todo], batch_size=self.batch_size,
                       max_length=self.max_length) if todo else []
        for i, s in zip(todo, scores):
            out[i] = (s.logprob, s.is_greedy)
        for args, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """(text,) -> summed log-prob of every token of the text, the prefix token (BOS, else EOS)
        in front, in disjoint windows of max_length predictions (as the harness does)."""
        from ..scoring import perplexity, prefix_token_id

        tok = self.model.tokenizer
        docs = [[prefix_token_id(tok)] + tok.encode(r.args[0]) for r in requests]
        todo = [i for i, d in enumerate(docs) if len(d) > 1]
        out = [0.0] * len(docs)
        if todo:
            ppl = perplexity(self.model, [docs[i] for i in todo], max_length=self.max_length + 1,
                             stride=self.max_length, batch_size=self.batch_size)
            for i, (nll, _) in zip(todo, ppl.documents):
                out[i] = -nll
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(r.args), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """(context, gen_kwargs) -> generated text, cut before the first ``until`` string.

        gen_kwargs: until (str or list; the EOS text is always a stop), max_gen_toks,
        do_sample (False = greedy), temperature, top_k, top_p. Contexts are left-truncated to
        max_length - max_gen_toks tokens.
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
            ids = tok.encode(context)[-(self.max_length - max_new):]
            rows.append(dict(ids=ids, until=until, max_new=max_new, seed=self.seed + i, **sampling))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["ids"]))
        out = [""] * len(rows)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = [rows[i] for i in idx]
            res = generate(self.model, [b["ids"] for b in batch], [b["max_new"] for b in batch],
                           temperature=[b["temperature"] for b in batch], top_k=[b["top_k"] for b in batch],
                           top_p=[b["top_p"] for b in batch], seed=[b["seed"] for b in batch],
                           stop_ids=[self._stop_ids(b["until"]) for b in batch])
            for i, b, text in zip(idx, batch, res.texts):
                out[i] = cut_at_stop(text, b["until"])
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

    # -------------------------------------------------------------------- chat templates
    @property
    def tokenizer_name(self) -> str:
        return self.source

    def chat_template(self, chat_template=False) -> str | None:
        return self.model.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.model.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


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


def main(argv: list[str] | None = None) -> int:
    """``python -m realm_jax.integrations.lm_eval ARGS``: the harness's command line with
    ``realm_jax`` registered."""
    if not register():
        print("lm-evaluation-harness is not installed: pip install lm-eval", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":  # run the registered module's main, not a second copy of the class
    from realm_jax.integrations.lm_eval import main as _main

    sys.exit(_main())
