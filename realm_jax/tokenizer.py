"""Tokenizer wrapper over the ``tokenizers`` library, with the chat template (jinja2).

Built from an HF directory (tokenizer.json + tokenizer_config.json) or from GGUF metadata
(see ``gguf.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .errors import CheckpointError


class Tokenizer:
    """encode / decode / apply_chat_template, plus bos/eos ids."""

    def __init__(self, tok, *, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, add_bos: bool | None = None,
                 extra_eos_ids: Sequence[int] = ()):
        self._tok = tok
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
            raise ValueError("this tokenizer has no chat template")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        try:
            tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{directory / 'tokenizer.json'}: cannot be read ({e})") from None
        conf = {}
        conf_path = directory / "tokenizer_config.json"
        if conf_path.exists():
            conf = json.loads(conf_path.read_text(encoding="utf-8"))

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        template = conf.get("chat_template")
        jinja = directory / "chat_template.jinja"
        if template is None and jinja.exists():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, bos_token=tok_str(conf.get("bos_token")), eos_token=tok_str(conf.get("eos_token")),
                   chat_template=template, add_bos=conf.get("add_bos_token"))
