"""The OpenAI wire format: request bodies (validated with pydantic), their translation into the
library's generation settings, and the response and error objects.

Sampling follows the OpenAI API: ``temperature`` defaults to 1 (0 = greedy), ``top_p`` to 1;
``seed`` None draws a fresh seed per request. Extensions that vLLM also takes: ``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``. ``logit_bias`` keys are token ids (as
strings). ``n`` choices of one prompt use seeds ``seed .. seed + n - 1`` (the library's ``n``
rule), so choice i equals ``generate`` with ``seed + i``.

Log-probs are the model's own distribution (``TokenLogprob.logprob``), as the library reports
them; ``top_logprobs`` are the model's most likely tokens.
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import RealmError

MAX_TOP_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields (user, metadata, ...) are ignored, as OpenAI's SDKs send some

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)


class CompletionRequest(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict]]


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list | None = None
    tool_choice: Any = None


# ------------------------------------------------------------------------------ requests -> settings
def sampling_settings(body: _Body) -> dict:
    """The ``Sampling`` fields a body sets (the library checks their values once more)."""
    out: dict[str, Any] = {"temperature": 1.0 if body.temperature is None else body.temperature,
                           "seed": secrets.randbits(31) if body.seed is None else body.seed}
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
                 "min_tokens"):
        v = getattr(body, name)
        if v is not None:
            out[name] = v
    if out.get("top_p") == 1.0:
        del out["top_p"]
    if out.get("top_k") == 0:
        del out["top_k"]
    if body.logit_bias:
        bias = {}
        for k, v in body.logit_bias.items():
            try:
                bias[int(k)] = v
            except ValueError:
                raise RealmError(f"logit_bias: keys must be token ids, got {k!r}") from None
        out["logit_bias"] = bias
    if body.stop:
        out["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    return out


def completion_prompts(body: CompletionRequest) -> list:
    """The prompts of a completion request: strings or token-id lists (one per prompt)."""
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise RealmError("prompt: expected a string, a list of strings, a list of token ids or a list of lists")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as the chat template takes them (text parts of a content list joined)."""
    if body.tools:
        raise RealmError("tools: tool calling is not supported by this server")
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RealmError(f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}")
                parts.append(part["text"])
            content = "".join(parts)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def chat_constraint(body: ChatRequest):
    """``response_format`` -> a ``Constraint`` (or None for text)."""
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    from ..constraints import Constraint

    if rf.type == "json_object":
        return Constraint.json_object()
    schema = (rf.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise RealmError("response_format.json_schema.schema: expected a JSON schema object")
    return Constraint.json_schema(schema)


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tok, token_id: int) -> str:
    return tok.decode([int(token_id)], skip_special_tokens=False)


def completion_logprobs(tok, entries: list, offset: int = 0) -> dict:
    """Legacy completions ``logprobs``: entries are ``TokenLogprob`` or (token id, None) for a
    token nothing predicts (the first prompt token)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        tid = e[0]
        s = token_text(tok, tid)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        if e[1] is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(float(e.logprob))
            tops.append(_top_map(tok, e.top))
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _top_map(tok, top) -> dict:
    """{token text: log-prob} of the top alternatives; tokens whose text repeats an earlier key
    (e.g. two partial UTF-8 byte tokens, both shown as U+FFFD) are keyed by their vocabulary
    entry instead, so every alternative is there."""
    out = {}
    for i, v in top:
        s = token_text(tok, i)
        if s in out:
            s = tok._tok.id_to_token(int(i)) or f"<id:{int(i)}>"
        out[s] = float(v)
    return out


def chat_logprobs(tok, entries: list) -> dict:
    """Chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def one(tid, lp):
        s = token_text(tok, tid)
        return {"token": s, "logprob": float(lp), "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(i, v) for i, v in e.top])
                        for e in entries]}


def error_body(message: str, kind: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or str(status)}}
