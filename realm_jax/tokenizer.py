"""Tokenizer wrapper over the ``tokenizers`` library, with the chat template (jinja2).

Built from an HF directory (tokenizer.json + tokenizer_config.json) or from GGUF metadata
(``Tokenizer.from_gguf``), and written back as an HF directory's files (``to_hf_files``).

GGUF tokenizers: ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) and ``"llama"`` (a
SentencePiece vocabulary with scores: Llama 2, Gemma). gpt2: the text is split before BPE the way
llama.cpp splits it for the file's ``tokenizer.ggml.pre`` (``PRE_TOKENIZER_SPLITS``). llama:
llama.cpp's SPM tokenizer (spaces as U+2581, a leading one when ``tokenizer.ggml.add_space_prefix``,
true when absent; adjacent pieces merged highest score first; a piece not in the vocabulary as its
UTF-8 bytes ``<0xXX>``), as a BPE whose merges rank every pair of NORMAL pieces forming a NORMAL
piece by that piece's score (``_sentencepiece_bpe``). Both: tokens the file marks CONTROL become
special added tokens and USER_DEFINED ones plain added tokens, each keeping its id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import CheckpointError, RealmError, UnsupportedModelError

# Pre-tokenizer regexes (applied in order, each match isolated) per GGUF ``tokenizer.ggml.pre``.
# None stands for GPT-2's own split, which the byte-level pre-tokenizer applies itself.
_GPT2 = None
_DIGIT = r"\p{N}"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "default": (_GPT2,), "gpt2": (_GPT2,), "gpt-2": (_GPT2,),
    "smollm": (_DIGIT, _GPT2), "starcoder": (_DIGIT, _GPT2), "refact": (_DIGIT, _GPT2),
    "codeshell": (_DIGIT, _GPT2),
    "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,), "llama-v3": (_LLAMA3,), "smaug-bpe": (_LLAMA3,),
    "dbrx": (_LLAMA3,), "falcon3": (_LLAMA3,),
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,), "stablelm2": (_QWEN2,),
}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # GGUF token types
_SPACE = "\u2581"  # SentencePiece's space


class Tokenizer:
    """encode / decode / apply_chat_template, plus bos/eos ids."""

    def __init__(self, tok, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, add_bos: bool | None = None,
                 extra_eos_ids: Sequence[int] = (), pad_token: str | None = None):
        self._tok = tok
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        ids = [self.eos_id] if self.eos_id is not None else []
        self.eos_ids = tuple(dict.fromkeys(ids + [int(i) for i in extra_eos_ids]))
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise RealmError(f"encode: expected a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the model's chat template."""
        if not self.chat_template:
            raise RealmError("chat: this tokenizer has no chat template (its tokenizer_config.json, "
                             "chat_template.jinja or GGUF tokenizer.chat_template has none)")
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise RealmError(f"chat messages: expected a list of {{'role': str, 'content': str}}, got {messages!r:.80}")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:  # incl. the sandbox's SecurityError and raise_exception
            raise RealmError(f"chat template: {type(e).__name__}: {e}") from None

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        try:
            tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{directory / 'tokenizer.json'}: cannot be read ({e})") from None
        from .config import read_json

        conf = {}
        conf_path = directory / "tokenizer_config.json"
        if conf_path.exists():
            conf = read_json(conf_path)
            if not isinstance(conf, dict):
                raise CheckpointError(f"{conf_path}: expected a JSON object, got {type(conf).__name__}")

        def tok_str(key):
            v = conf.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if v is None:
                return None
            if not isinstance(v, str):
                raise CheckpointError(f"{conf_path}: key {key!r}: expected a token string, got {v!r:.60}")
            if tok.token_to_id(v) is None:
                raise CheckpointError(f"{conf_path}: key {key!r}: token {v!r} is not in the vocabulary of "
                                      f"{directory / 'tokenizer.json'}")
            return v

        template = conf.get("chat_template")
        jinja = directory / "chat_template.jinja"
        if template is None and jinja.exists():
            try:
                template = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{jinja}: cannot be read as UTF-8 text ({e})") from None
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{conf_path}: key 'chat_template': expected a string (or a list of "
                                  f"{{'name', 'template'}}), got {template!r:.60}")
        add_bos = conf.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise CheckpointError(f"{conf_path}: key 'add_bos_token': expected true or false, got {add_bos!r:.60}")
        return cls(tok, bos_token=tok_str("bos_token"), eos_token=tok_str("eos_token"),
                   chat_template=template, add_bos=add_bos, pad_token=tok_str("pad_token"))

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, reader_or_metadata: Any) -> "Tokenizer":
        """Build from GGUF metadata: a ``realm_jax.gguf.GGUFFile``, a ``gguf.GGUFReader``, or a
        {key: value} dict (``GGUFFile.metadata``)."""
        meta = reader_or_metadata
        if hasattr(meta, "metadata"):  # GGUFFile
            meta = meta.metadata
        elif hasattr(meta, "fields"):  # gguf.GGUFReader
            meta = {k: f.contents() for k, f in meta.fields.items() if k.startswith("tokenizer.")}
        if not isinstance(meta, Mapping):
            raise RealmError(f"from_gguf expects a GGUFFile, a gguf.GGUFReader or a dict, got {type(meta).__name__}")
        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"GGUF tokenizer.ggml.model {model!r} is not supported; supported: 'gpt2' (byte-level BPE), "
                f"'llama' (SentencePiece)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if model == "gpt2" and pre not in PRE_TOKENIZER_SPLITS:
            raise UnsupportedModelError(
                f"GGUF tokenizer.ggml.pre {pre!r} is not supported; "
                f"supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(f"GGUF key 'tokenizer.ggml.tokens': expected a non-empty list of strings, "
                                  f"got {type(tokens).__name__}")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if not isinstance(types, list) or len(types) != len(tokens):
            raise CheckpointError(f"GGUF key 'tokenizer.ggml.token_type': expected one type per token "
                                  f"({len(tokens)}), got {len(types) if isinstance(types, list) else types!r}")
        if model == "llama":
            scores = meta.get("tokenizer.ggml.scores")
            if not isinstance(scores, list) or len(scores) != len(tokens) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
                raise CheckpointError(f"GGUF key 'tokenizer.ggml.scores': expected one number per token "
                                      f"({len(tokens)}) for a SentencePiece ('llama') vocabulary, got "
                                      f"{len(scores) if isinstance(scores, list) else scores!r}")
            prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            if not isinstance(prefix, bool):
                raise CheckpointError(f"GGUF key 'tokenizer.ggml.add_space_prefix': expected a bool, got {prefix!r}")
            tok = _sentencepiece_bpe(tokens, scores, types, prefix)
        else:
            merges = meta.get("tokenizer.ggml.merges")
            if not merges:
                raise CheckpointError("GGUF tokenizer has no tokenizer.ggml.merges (needed for byte-level BPE)")
            if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
                raise CheckpointError("GGUF key 'tokenizer.ggml.merges': expected a list of strings")
            tok = _byte_level_bpe(tokens, merges, types, PRE_TOKENIZER_SPLITS[pre])

        def token(key):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if i is None:
                return None
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens):
                raise CheckpointError(f"GGUF tokenizer.ggml.{key}_token_id={i} is outside the vocabulary "
                                      f"(0..{len(tokens) - 1})")
            return tokens[int(i)]

        bos, add_bos = token("bos"), bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
        if meta.get("tokenizer.ggml.add_eos_token"):
            raise UnsupportedModelError("GGUF tokenizer.ggml.add_eos_token=True is not supported")
        if add_bos and bos is not None:
            from tokenizers import processors

            bid = int(meta["tokenizer.ggml.bos_token_id"])
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bid)])
        extra = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                 if k in meta and token(k.split(".")[-1][:-len("_token_id")]) is not None]
        return cls(tok, bos_token=bos, eos_token=token("eos"), pad_token=token("padding"),
                   chat_template=meta.get("tokenizer.chat_template"), add_bos=add_bos, extra_eos_ids=extra)

    def to_hf_files(self) -> dict[str, str]:
        """``tokenizer.json`` and ``tokenizer_config.json`` contents for an HF checkpoint directory."""
        conf = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "add_bos_token": bool(self.add_bos), "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        return {"tokenizer.json": self._tok.to_str(pretty=True),
                "tokenizer_config.json": json.dumps(conf, indent=2, ensure_ascii=False)}


def _added_tokens(tok, tokens: list[str], types: Sequence[int], vocab: Mapping[str, int]) -> None:
    """CONTROL tokens as special added tokens, USER_DEFINED ones as plain ones, each keeping its id."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    plain = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    for t in special + plain:
        if tok.token_to_id(t.content) != vocab[t.content]:
            raise CheckpointError(f"GGUF token {t.content!r} could not keep its id {vocab[t.content]}")


def _sentencepiece_bpe(tokens: list[str], scores: Sequence[float], types: Sequence[int], add_space_prefix: bool):
    """A ``tokenizers`` BPE that tokenizes as llama.cpp's SPM tokenizer does, ids unchanged.

    llama.cpp merges, among adjacent pieces, the pair whose concatenation is the vocabulary's
    highest-scoring piece; a BPE ranking each such pair (two NORMAL pieces forming a NORMAL one)
    by the score of what it forms (then by the ids, as transformers ranks them) merges in the same
    order. Pieces left outside the vocabulary fall back to their bytes (``<0xXX>`` tokens)."""
    from tokenizers import decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t: i for t, i in vocab.items() if types[i] == _NORMAL}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in normal and b in normal:
                ranked.append((-float(scores[i]), normal[a], normal[b], a, b))
    ranked.sort()
    unk = next((t for t, k in zip(tokens, types) if k == 2), None)  # UNKNOWN
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend(_SPACE)] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    _added_tokens(tok, tokens, types, vocab)
    return tok


def _byte_level_bpe(tokens: list[str], merges: Sequence[str], types: Sequence[int], splits):
    """A ``tokenizers`` byte-level BPE over the GGUF vocabulary, ids unchanged."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"GGUF merge {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits if r is not None]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=splits[-1] is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    _added_tokens(tok, tokens, types, vocab)
    return tok
