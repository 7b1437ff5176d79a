"""``realm-jax serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client
and raw HTTP: outputs token-for-token equal to ``generate`` on the same request (greedy and
seeded, streamed and not, chat and completions, stop strings, n choices, log-probs), JSON-schema
output, tenant isolation over every key x model pair, errors, adapters loaded at run time,
lm-eval's ``local-completions`` against the library's own lm-eval adapter, and /metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import realm_jax
from realm_jax import lora
from realm_jax.lora_peft import load_peft, save_peft

from grammar_model import make_grammar_model

pytestmark = pytest.mark.slow  # a server process: load, warm-up, then HTTP

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
KEYS = {"alice": "sk-alice-0001", "bob": "sk-bob-000002", "carol": "sk-carol-0003"}
ADMIN = "admin-key-123"
SEQ = 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, adapter dirs, tenants file) and the loaded model with its adapters."""
    root = tmp_path_factory.mktemp("serve")
    d = make_grammar_model(root / "m")
    conf = json.loads((d / "tokenizer_config.json").read_text())
    conf.update(chat_template=CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    model = realm_jax.load(d, dtype="float32")
    dirs = {}
    for i, name in enumerate(("ada", "bea", "late")):
        dirs[name] = save_peft(root / name, lora.init_adapter(model.config, 10 + i, rank=4, b_std=0.6), model.config)
    tenants = {"admin_key": ADMIN, "adapters": {"ada": str(dirs["ada"])},
               "tenants": {"alice": {"api_keys": [KEYS["alice"]], "models": ["m", "ada"]},
                           "bob": {"api_keys": [KEYS["bob"]], "models": ["*"]},
                           "carol": {"api_keys": [KEYS["carol"]], "models": ["m"], "max_concurrent": 64,
                                     "tokens_per_minute": 400}}}
    tf = root / "tenants.json"
    tf.write_text(json.dumps(tenants))
    ads = {n: load_peft(p, model.config) for n, p in dirs.items()}
    return SimpleNamespace(dir=d, dirs=dirs, tenants=tf, model=model, adapters=ads)


def start_server(setup, *extra):
    port = _free_port()
    cmd = [sys.executable, "-m", "realm_jax.cli", "serve", str(setup.dir), "--port", str(port), "--dtype", "float32",
           "--tenants", str(setup.tenants), "--adapter", f"bea={setup.dirs['bea']}", "--adapter-slots", "3",
           "--max-seq-len", str(SEQ), "--max-slots", "4", "--log-level", "warning", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server did not become healthy")


@pytest.fixture(scope="module")
def server(setup):
    proc, url = start_server(setup)
    yield url
    proc.terminate()
    proc.wait(60)


def client(url, who="bob"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEYS[who], max_retries=0, timeout=120)


def ref(setup, prompt, max_new, adapter=None, chat=False, **sampling):
    ad = None if adapter is None else setup.adapters[adapter]
    return realm_jax.generate(setup.model, [prompt], max_new, adapters=ad, chat=chat, max_len=SEQ, **sampling)


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("adapter", [None, "bea"])
def test_completions_equal_generate(setup, server, adapter):
    c = client(server)
    model = "m" if adapter is None else adapter
    for prompt, sampling in (('{"name": "', dict(temperature=0.0)), ("The quick", dict(temperature=0.9, seed=7))):
        want = ref(setup, prompt, 12, adapter, **sampling)
        got = c.completions.create(model=model, prompt=prompt, max_tokens=12, **sampling)
        assert got.choices[0].text == want.texts[0] and got.choices[0].finish_reason == want.finish_reasons[0]
        assert got.usage.completion_tokens == len(want.tokens[0])
        assert got.usage.prompt_tokens == len(setup.model.tokenizer.encode(prompt))
        chunks = list(c.completions.create(model=model, prompt=prompt, max_tokens=12, stream=True, **sampling))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.texts[0]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reasons[0]


def test_chat_equals_generate_with_the_template(setup, server):
    c = client(server, "alice")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yes or no?"}]
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        want = ref(setup, msgs, 10, chat=True, **sampling)
        got = c.chat.completions.create(model="m", messages=msgs, max_tokens=10, **sampling)
        assert got.choices[0].message.content == want.texts[0]
        assert got.choices[0].message.role == "assistant"
        chunks = list(c.chat.completions.create(model="ada", messages=msgs, max_tokens=10, stream=True,
                                                stream_options={"include_usage": True}, **sampling))
        want_ada = ref(setup, msgs, 10, "ada", chat=True, **sampling)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want_ada.texts[0]
        assert chunks[-1].usage.completion_tokens == len(want_ada.tokens[0])


def test_stop_strings_and_n_choices_equal_generate(setup, server):
    c = client(server)
    free = ref(setup, "yes no", 16, temperature=0.8, seed=11, stop_ids=[]).texts[0]
    stop = [free[3:5]]
    got = c.completions.create(model="m", prompt="yes no", max_tokens=16, temperature=0.8, seed=11, n=3, stop=stop)
    assert len(got.choices) == 3
    for ch in got.choices:
        want = ref(setup, "yes no", 16, temperature=0.8, seed=11 + ch.index, stop=stop)
        assert ch.text == want.texts[0] and ch.finish_reason == want.finish_reasons[0]
    assert got.choices[0].finish_reason == "stop"


def test_n_and_best_of_go_through_the_engine_from_one_prefill(setup, server):
    """n choices and best_of are one engine group per prompt (one prefill call, no generate):
    the choices equal ``generate(..., n=..., best_of=...)`` on the prompt, streamed or not."""
    c = client(server)
    sampling = dict(temperature=0.9, seed=5)
    before = httpx.get(server + "/metrics").text
    for best_of in (None, 3):
        want = ref(setup, "red green", 10, n=2, best_of=best_of, **sampling)
        got = c.completions.create(model="m", prompt="red green", max_tokens=10, n=2, best_of=best_of, **sampling)
        assert [ch.text for ch in got.choices] == want.texts
        assert [ch.finish_reason for ch in got.choices] == want.finish_reasons
        chunks = list(c.completions.create(model="m", prompt="red green", max_tokens=10, n=2, best_of=best_of,
                                           stream=True, **sampling))
        assert ["".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i)
                for i in range(2)] == want.texts
    after = httpx.get(server + "/metrics").text
    assert _metric(after, "realm_direct_requests_total") == _metric(before, "realm_direct_requests_total")
    assert _metric(after, "realm_engine_prefill_calls_total") == _metric(before, "realm_engine_prefill_calls_total") + 4
    assert _metric(after, "realm_engine_requests_total") == _metric(before, "realm_engine_requests_total") + 10


def test_logprobs_equal_the_library(setup, server):
    c = client(server)
    want = ref(setup, "The quick", 6, temperature=0.0, logprobs=3)
    got = c.completions.create(model="m", prompt="The quick", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs[0]], abs=1e-5)
    assert [len(t) for t in lp.top_logprobs] == [3] * 6
    msgs = [{"role": "user", "content": "red?"}]
    want = ref(setup, msgs, 5, chat=True, temperature=0.0, logprobs=2)
    got = c.chat.completions.create(model="m", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                    top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([t.logprob for t in want.logprobs[0]], abs=1e-5)
    assert [x.logprob for e in content for x in e.top_logprobs] == pytest.approx(
        [v for t in want.logprobs[0] for _, v in t.top], abs=1e-5)
    assert [len(e.top_logprobs) for e in content] == [2] * 5


def test_streamed_and_sampled_logprobs_come_from_the_engine_and_equal_the_library(setup, server):
    """logprobs <= the server's --max-logprobs (5) are the engine's, streamed with their tokens;
    more alternatives (8) go through generate: both equal the library."""
    c = client(server)
    before = httpx.get(server + "/metrics").text
    sampling = dict(temperature=0.9, seed=21)
    want = ref(setup, "red green", 40, logprobs=2, **sampling)
    whole = c.completions.create(model="m", prompt="red green", max_tokens=40, logprobs=2, **sampling)
    chunks = [ch for ch in c.completions.create(model="m", prompt="red green", max_tokens=40, logprobs=2, stream=True,
                                                **sampling) if ch.choices and ch.choices[0].logprobs]
    assert len(chunks) > 1
    streamed = [v for ch in chunks for v in ch.choices[0].logprobs.token_logprobs]
    offsets = [v for ch in chunks for v in ch.choices[0].logprobs.text_offset]
    for got in (whole.choices[0].logprobs.token_logprobs, streamed):
        assert got == pytest.approx([t.logprob for t in want.logprobs[0]], abs=1e-5)
    assert offsets == whole.choices[0].logprobs.text_offset
    after = httpx.get(server + "/metrics").text
    assert _metric(after, "realm_direct_requests_total") == _metric(before, "realm_direct_requests_total")
    assert _metric(after, "realm_engine_requests_total") == _metric(before, "realm_engine_requests_total") + 2
    msgs = [{"role": "user", "content": "yes or no?"}]
    want = ref(setup, msgs, 4, chat=True, temperature=0.0, logprobs=8)
    got = c.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                    top_logprobs=8)
    content = got.choices[0].logprobs.content
    assert [len(e.top_logprobs) for e in content] == [8] * 4
    assert [x.logprob for e in content for x in e.top_logprobs] == pytest.approx(
        [v for t in want.logprobs[0] for _, v in t.top], abs=1e-5)
    assert _metric(httpx.get(server + "/metrics").text, "realm_direct_requests_total") == \
        _metric(after, "realm_direct_requests_total") + 1


def test_json_schema_output_validates(setup, server):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    c = client(server)
    for seed in range(3):
        got = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "json"}], max_tokens=40,
                                        temperature=1.0, seed=seed,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": schema}})
        assert got.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(got.choices[0].message.content), schema)


# ------------------------------------------------------------------ tenants and errors
def test_every_key_and_model_pair_gets_the_right_status(server):
    allowed = {"alice": {"m", "ada"}, "bob": {"m", "ada", "bea"}, "carol": {"m"}}
    keys = {None: None, "wrong": "sk-wrong-99999", **KEYS}
    for who, key in keys.items():
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        listed = httpx.get(server + "/v1/models", headers=headers)
        if who in allowed:
            assert {m["id"] for m in listed.json()["data"]} == allowed[who]
        else:
            assert listed.status_code == 401
        for model in ("m", "ada", "bea", "nope"):
            r = httpx.post(server + "/v1/completions", headers=headers, timeout=60,
                           json={"model": model, "prompt": "yes", "max_tokens": 2, "temperature": 0})
            if who not in allowed:
                want = 401
            elif model == "nope":
                want = 404
            else:
                want = 200 if model in allowed[who] else 403
            assert r.status_code == want, (who, model, r.text)
            if want != 200:
                err = r.json()["error"]
                assert err["message"] and err["type"]


@pytest.mark.parametrize("body,status,match", [
    ({"model": "m", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "m"}, 400, "prompt"),
    ({"model": "m", "prompt": "x" * 400, "max_tokens": 4}, 400, "context of 96 tokens"),
    ({"model": "m", "prompt": [5, 99999], "max_tokens": 4}, 400, "outside the vocabulary"),
    ({"model": "m", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, 400, "echo"),
])
def test_bad_requests_get_openai_errors(server, body, status, match):
    r = httpx.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEYS['bob']}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"


def test_tokens_per_minute_limit_answers_429(server):
    r = None
    for _ in range(10):
        r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEYS['carol']}"},
                       json={"model": "m", "prompt": "yes", "max_tokens": 60, "temperature": 0}, timeout=60)
        if r.status_code == 429:
            break
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "tokens_per_minute=400" in r.json()["error"]["message"]


def test_adapters_load_and_unload_at_run_time(setup, server):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(server + "/admin/adapters", json={"name": "late", "path": str(setup.dirs["late"])},
                      headers={"Authorization": f"Bearer {KEYS['bob']}"}).status_code == 401
    r = httpx.post(server + "/admin/adapters", json={"name": "late", "path": str(setup.dirs["late"])},
                   headers=admin, timeout=120)
    assert r.status_code == 200, r.text
    want = ref(setup, "red green", 8, "late", temperature=0.0)
    got = client(server).completions.create(model="late", prompt="red green", max_tokens=8, temperature=0)
    assert got.choices[0].text == want.texts[0]
    assert want.texts[0] != ref(setup, "red green", 8, temperature=0.0).texts[0]
    assert httpx.delete(server + "/admin/adapters/late", headers=admin, timeout=120).status_code == 200
    r = httpx.post(server + "/v1/completions", headers={"Authorization": f"Bearer {KEYS['bob']}"},
                   json={"model": "late", "prompt": "yes", "max_tokens": 2})
    assert r.status_code == 404
    bad = httpx.post(server + "/admin/adapters", json={"name": "x", "path": str(setup.dir)}, headers=admin)
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]


# ------------------------------------------------------------------ lm-eval and metrics
def test_lm_eval_local_completions_equals_the_library_adapter(setup, server):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from realm_jax.integrations.lm_eval import RealmJaxLM

    pairs = [("the quick brown", " fox"), ("yes no maybe", " red"), ('{"id": 7', ', "items"')]
    reqs = [Instance("loglikelihood", {}, (c, k), i) for i, (c, k) in enumerate(pairs)]
    os.environ["OPENAI_API_KEY"] = KEYS["bob"]
    api = LocalCompletionsAPI(base_url=server + "/v1/completions", model="m", tokenizer_backend="huggingface",
                              tokenizer=str(setup.dir), num_concurrent=1, max_retries=1, batch_size=2,
                              tokenized_requests=True)
    got = api.loglikelihood(reqs)
    want = RealmJaxLM(model=setup.model, batch_size=2).loglikelihood(reqs)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)


def test_metrics_count_the_answers(server):
    text = httpx.get(server + "/metrics").text
    assert "realm_requests_total" in text and "realm_time_to_first_token_seconds_bucket" in text
    assert "realm_running_requests" in text and "realm_queue_length" in text
    assert httpx.get(server + "/health").json() == {"status": "ok"}


# ------------------------------------------------------------------ load, shutdown, a dead engine
def _metric(text: str, name: str, **labels) -> float:
    """The value of one sample of the Prometheus text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


def test_load_with_disconnects_loses_nothing_and_leaks_nothing(setup, server):
    import asyncio

    import openai

    prompts = ["The quick", "yes no", '{"id": ', "red green", "[true, ", "0123"]
    kinds = [(p, s) for p in prompts for s in (None, 5, 6)]
    want = {(p, s): ref(setup, p, 6, **({"temperature": 0.0} if s is None else dict(temperature=0.9, seed=s))).texts[0]
            for p, s in kinds}
    before = httpx.get(server + "/metrics").text
    total, drop_every = 1000, 10

    async def main():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEYS["bob"], max_retries=0, timeout=300)
        gate = asyncio.Semaphore(64)
        results = {}

        async def one(i):
            p, s = kinds[i % len(kinds)]
            sampling = {"temperature": 0.0} if s is None else dict(temperature=0.9, seed=s)
            async with gate:
                stream = await c.completions.create(model="m", prompt=p, max_tokens=6, stream=True, **sampling)
                text, finish = "", None
                async for ch in stream:
                    if i % drop_every == 3:  # this client goes away after its first chunk
                        await stream.close()
                        return
                    text += ch.choices[0].text
                    finish = ch.choices[0].finish_reason or finish
                results[i] = (text, finish)

        await asyncio.gather(*(one(i) for i in range(total)))
        await c.close()
        return results

    results = asyncio.run(asyncio.wait_for(main(), 900))
    assert len(results) == total - total // drop_every
    for i, (text, finish) in results.items():
        assert text == want[kinds[i % len(kinds)]] and finish is not None, i
    time.sleep(1.0)
    after = httpx.get(server + "/metrics").text
    ok = _metric(after, "realm_requests_total", endpoint="completions", status="200") - \
        _metric(before, "realm_requests_total", endpoint="completions", status="200")
    gone = _metric(after, "realm_requests_total", endpoint="completions", status="499") - \
        _metric(before, "realm_requests_total", endpoint="completions", status="499")
    assert ok + gone == total and ok >= len(results)
    assert _metric(after, "realm_running_requests") == 0 and _metric(after, "realm_queue_length") == 0
    assert _metric(after, "realm_tenant_running_requests", tenant="bob") == 0
    assert _metric(after, "realm_http_requests_in_progress") == 0


def test_a_paged_server_preempts_caches_prefixes_and_still_equals_generate(setup):
    """``--block-size 8 --num-blocks 8 --prefix-caching``: a pool of one 64-token request under 8
    concurrent streams on 4 slots must preempt, and prompts that share a 16-token start share
    its blocks; every answer still equals ``generate`` alone, and /metrics shows the pool whole
    again, the preemptions and the prefix hits."""
    import concurrent.futures

    proc, url = start_server(setup, "--max-seq-len", "64", "--block-size", "8", "--num-blocks", "8",
                             "--prefix-caching")
    try:
        c = client(url)
        tok = setup.model.tokenizer
        start = "the cat sat on a mat "  # 16 tokens: two full blocks shared by every prompt
        assert len(tok.encode(start)) >= 16
        jobs = [(start + p, s) for p in ("The quick", "yes no", "red green", "0123") for s in (None, 3)]
        budget = 60 - max(len(tok.encode(p)) for p, _ in jobs)
        assert budget >= 24

        def sampling(s):
            return {"temperature": 0.0} if s is None else dict(temperature=0.9, seed=s)

        def one(job):
            p, s = job
            chunks = c.completions.create(model="m", prompt=p, max_tokens=budget, stream=True, **sampling(s))
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, jobs))
        for (p, s), text in zip(jobs, got):
            assert text == ref(setup, p, budget, **sampling(s)).texts[0], (p, s)
        time.sleep(0.5)
        m = httpx.get(url + "/metrics").text
        assert _metric(m, "realm_kv_blocks_free") == 8 and _metric(m, "realm_kv_blocks_in_use") == 0
        assert _metric(m, "realm_engine_preemptions_total") > 0
        assert _metric(m, "realm_prefix_cache_hit_rate") > 0
    finally:
        proc.terminate()
        proc.wait(60)


def test_sigterm_finishes_running_streams_and_exits_0(setup):
    import signal
    import threading

    proc, url = start_server(setup, "--shutdown-timeout", "120")
    prompts = ["The quick", "yes no", "red green", "0123"]
    c = client(url)
    got, started = {}, threading.Barrier(len(prompts) + 1)

    def run(p):
        stream = c.completions.create(model="m", prompt=p, max_tokens=40, temperature=0, stream=True)
        parts = []
        for k, ch in enumerate(stream):
            parts.append(ch.choices[0].text)
            if k == 0:
                started.wait(60)
        got[p] = "".join(parts)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    started.wait(120)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(300)
    assert proc.wait(120) == 0
    for p in prompts:
        assert got[p] == ref(setup, p, 40, temperature=0.0).texts[0]
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


def test_a_dead_engine_fails_health_and_requests_instead_of_hanging(setup):
    from fastapi.testclient import TestClient

    from realm_jax.engine import Engine
    from realm_jax.server import Server, build_app

    eng = Engine(setup.model, max_slots=2, max_seq_len=32)
    app = build_app(Server(setup.model, eng, name="m"))
    with TestClient(app, raise_server_exceptions=False) as http:
        assert http.get("/health").status_code == 503  # not started
        eng.start()
        assert http.get("/health").status_code == 200

        def broken(*a, **k):
            raise RuntimeError("device lost")

        eng._device.decode = broken
        r = http.post("/v1/completions", json={"model": "m", "prompt": "yes", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        deadline = time.time() + 30
        while eng.alive and time.time() < deadline:
            time.sleep(0.05)
        h = http.get("/health")
        assert h.status_code == 503 and h.json()["reason"] == "the engine is not running"
        r = http.post("/v1/completions", json={"model": "m", "prompt": "yes", "max_tokens": 5})
        assert r.status_code == 503


def test_the_openai_client_example_runs_against_the_server(server):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "openai_client.py"), "--base-url", server + "/v1",
                          "--api-key", KEYS["bob"], "--model", "m", "--json-max-tokens", "56"],
                          capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "models: ['m', 'ada', 'bea']" in out.stdout and "json: {" in out.stdout


def test_a_full_queue_answers_429_with_retry_after(setup):
    from fastapi.testclient import TestClient

    from realm_jax.engine import Engine
    from realm_jax.server import Server, build_app

    with Engine(setup.model, max_slots=1, max_seq_len=32) as eng:
        http = TestClient(build_app(Server(setup.model, eng, name="m", max_queue=0)))
        r = http.post("/v1/completions", json={"model": "m", "prompt": "yes", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert "the queue is full" in r.json()["error"]["message"] and eng.stats().submitted == 0
