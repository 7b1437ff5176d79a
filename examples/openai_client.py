"""Talk to ``realm-jax serve`` with the official ``openai`` client.

    realm-jax serve smollm2-135m-instruct --port 8000          # in one shell
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1   # in another

Lists the models, streams a chat answer, asks for JSON that matches a schema, and prints the
log-probs of a completion. ``--api-key`` is needed when the server has a tenants file.
"""

from __future__ import annotations

import argparse
import json

import openai


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="a model name from /v1/models (default: the first)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json-max-tokens", type=int, default=64, help="token budget of the JSON answer")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)

    models = [m.id for m in client.models.list().data]
    print("models:", models)
    model = args.model or models[0]

    print("chat (streamed): ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=args.max_tokens, temperature=0.7, seed=1, stream=True)
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=args.json_max_tokens, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    print("json:", json.loads(out.choices[0].message.content))

    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0,
                                    logprobs=2)
    lp = out.choices[0].logprobs
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        print(f"  {token!r:>12} {value:8.3f}  top: {top}")


if __name__ == "__main__":
    main()
