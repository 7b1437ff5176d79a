"""Stop strings in the engine: matched on the host as tokens arrive, each request's tokens, text
and finish reason equal ``generate`` with the same ``stop`` alone, its streamed text chunks
concatenate to that text and never show what the match removes, and the matched row's slot is
freed for the next request."""

from __future__ import annotations

import numpy as np
import pytest

import realm_jax
from realm_jax.engine import Engine
from realm_jax.errors import RealmError

from grammar_model import make_grammar_model

PROMPTS = ["The quick", '{"name": "', "yes no", "[true, ", "0123", "red green"]


@pytest.fixture(scope="module")
def gm(tmp_path_factory):
    return realm_jax.load(make_grammar_model(tmp_path_factory.mktemp("stop") / "m"), dtype="float32")


def _stops_from(model, prompt, rng, **sampling):
    """Stop strings taken from the text the prompt produces without them (so they match), and one
    that never occurs."""
    text = realm_jax.generate(model, [prompt], 16, stop_ids=[], **sampling).texts[0]
    i = int(rng.integers(1, max(2, len(text) - 3)))
    return [text[i:i + int(rng.integers(1, 4))] or "x", "\u2603never"]


def test_engine_stop_strings_equal_generate_alone(gm):
    rng = np.random.default_rng(0)
    reqs = []
    for j, p in enumerate(PROMPTS * 2):
        sampling = {} if j % 2 == 0 else dict(temperature=0.9, top_p=0.95, seed=j)
        reqs.append((p, _stops_from(gm, p, rng, **sampling), sampling))
    with Engine(gm, max_slots=3, max_seq_len=64, decode_steps_per_call=3) as eng:
        hs = [eng.submit(p, 16, stop_ids=[], stop=stops, **s) for p, stops, s in reqs]
        streamed = [list(h.chunks(timeout=120)) for h in hs]
        results = [h.result() for h in hs]
        stats = eng.stats()
    assert stats.active_slots == 0 and stats.queue_length == 0 and stats.completed == len(reqs)
    matched = 0
    for (p, stops, s), r, chunks in zip(reqs, results, streamed):
        ref = realm_jax.generate(gm, [p], 16, stop_ids=[], stop=stops, **s)
        assert (r.tokens, r.text, r.finish_reason) == (ref.tokens[0], ref.texts[0], ref.finish_reasons[0])
        matched += r.finish_reason == "stop"
        assert "".join(c[1] for c in chunks) == r.text
        assert sum((c[0] for c in chunks), []) == r.tokens
        assert [c[2] for c in chunks[:-1]] == [None] * (len(chunks) - 1) and chunks[-1][2] == r.finish_reason
        for st in stops:  # nothing streamed ever held a stop string
            shown = ""
            for c in chunks:
                shown += c[1]
                assert st not in shown
    assert matched >= len(reqs) - 2  # the strings were taken from the outputs: nearly all match


def test_a_stop_string_frees_the_slot_for_the_next_request(gm):
    free = realm_jax.generate(gm, [PROMPTS[0]], 30, stop_ids=[]).texts[0]
    eng = Engine(gm, max_slots=1, max_seq_len=64, decode_steps_per_call=2)
    h1 = eng.submit(PROMPTS[0], 30, stop_ids=[], stop=[free[2:4]])
    h2 = eng.submit(PROMPTS[1], 5, stop_ids=[])
    eng.run_until_idle(timeout=120)
    assert h1.result().finish_reason == "stop" and len(h1.result().tokens) < 30
    ref = realm_jax.generate(gm, [PROMPTS[1]], 5, stop_ids=[])
    assert h2.result().tokens == ref.tokens[0]


def test_stop_strings_without_a_tokenizer_are_refused(gm):
    bare = realm_jax.loading.Model(gm.config, gm.params, None)
    eng = Engine(bare, max_slots=1, max_seq_len=32)
    with pytest.raises(RealmError, match="stop strings need the model's tokenizer"):
        eng.submit([5, 6], 4, stop=["x"])
    with pytest.raises(RealmError, match="stop: expected non-empty strings"):
        eng.submit([5, 6], 4, stop=[""])
