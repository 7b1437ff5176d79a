"""``realm-jax score`` / ``realm-jax perplexity``: same numbers as the API, resumable output,
bad input named by line before any device work."""

from __future__ import annotations

import json

import numpy as np
import pytest

import realm_jax
from realm_jax import cli, scoring

from test_scoring import TEXTS, make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, _ = make_tiny(tmp_path_factory.mktemp("cli") / "m")
    return model


def write_data(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def requests_rows(n=19, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if i % 3 == 0:
            rows.append({"context_ids": rng.integers(3, 97, int(rng.integers(1, 20))).tolist(),
                         "continuation_ids": rng.integers(3, 97, int(rng.integers(1, 5))).tolist(), "id": f"r{i}"})
        else:
            words = TEXTS[i % len(TEXTS)].split()
            k = int(rng.integers(1, len(words)))
            rows.append({"context": " ".join(words[:k]), "continuation": " " + " ".join(words[k:k + 2])})
    return rows


def run_score(tiny, data, out=None, *extra):
    argv = ["score", "--model", tiny.source, "--data", str(data), "--batch-size", "4", "--chunk-size", "8",
            "--dtype", "float32", "--quiet"] + (["--out", str(out)] if out else []) + list(extra)
    return cli.main(argv)


def test_score_cli_matches_the_api(tiny, tmp_path, capsys):
    rows = requests_rows()
    data = write_data(tmp_path / "data.jsonl", rows)
    assert run_score(tiny, data, tmp_path / "out.jsonl") == 0
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    reqs = [(r["context_ids"], r["continuation_ids"]) if "context_ids" in r else (r["context"], r["continuation"])
            for r in rows]
    ref = realm_jax.score(tiny, reqs, batch_size=4)
    assert [g["index"] for g in got] == list(range(len(rows)))
    for g, r, row in zip(got, ref, rows):
        assert g.get("id") == row.get("id")
        assert g["num_tokens"] == r.num_tokens and g["is_greedy"] == r.is_greedy
        np.testing.assert_allclose(g["token_logprobs"], r.token_logprobs, atol=1e-5, rtol=0)
        assert g["logprob"] == pytest.approx(r.logprob, abs=1e-4)
    # without --out the same lines go to stdout; progress goes to stderr, and only to a terminal
    # (tests/test_progress.py), so none here
    capsys.readouterr()
    argv = ["score", "--model", tiny.source, "--data", str(data), "--batch-size", "4", "--dtype", "float32"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == (tmp_path / "out.jsonl").read_text()
    assert "score" not in captured.err and "loading" not in captured.err


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_file(tiny, tmp_path, monkeypatch):
    data = write_data(tmp_path / "data.jsonl", requests_rows(27, seed=1))
    full = tmp_path / "full.jsonl"
    assert run_score(tiny, data, full) == 0
    expected = full.read_bytes()

    # 1) an exception after 3 batches (one whole chunk of 8 and one batch of the next were scored)
    real = scoring.iter_scores
    batches = {"n": 0}

    def flaky(*a, **k):
        for item in real(*a, **k):
            batches["n"] += 1
            if batches["n"] > 3:
                raise Interrupted()
            yield item

    monkeypatch.setattr(scoring, "iter_scores", flaky)
    out = tmp_path / "out.jsonl"
    with pytest.raises(Interrupted):
        run_score(tiny, data, out)
    assert out.read_bytes() == expected[:len(out.read_bytes())]
    assert out.read_text().count("\n") == 8  # the first chunk, durable
    monkeypatch.setattr(scoring, "iter_scores", real)
    assert run_score(tiny, data, out) == 0
    assert out.read_bytes() == expected

    # 2) a file cut in the middle of a line, inside a chunk (a crash mid-write)
    cut = expected.index(b"\n", len(expected) // 2) - 7
    out.write_bytes(expected[:cut])
    assert run_score(tiny, data, out) == 0
    assert out.read_bytes() == expected

    # 3) only what is missing is computed again
    lines = expected.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-3]))
    counted = {"n": 0}

    def counting(model, part, **k):
        counted["n"] += len(part)
        return real(model, part, **k)

    monkeypatch.setattr(scoring, "iter_scores", counting)
    assert run_score(tiny, data, out) == 0
    assert out.read_bytes() == expected and counted["n"] == 27 - 24  # the last chunk (3 requests)
    # a complete file: nothing to do
    counted["n"] = 0
    assert run_score(tiny, data, out) == 0
    assert out.read_bytes() == expected and counted["n"] == 0


def test_resume_refuses_results_of_other_data(tiny, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run_score(tiny, write_data(tmp_path / "a.jsonl", requests_rows(5, seed=2)), out) == 0
    before = out.read_bytes()
    assert run_score(tiny, write_data(tmp_path / "b.jsonl", requests_rows(6, seed=3)), out) == 2
    assert "line 1 is not the result of request 0" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    (b'{"context": "a", "continuation": " b"}\n{"context": "a", "continuation": "\xff b"}\n',
     "line 2: not valid UTF-8"),
    (b'{"context": "a", "continuation": " b"}\n\n{"context": "a" "continuation": " b"}\n',
     "line 3: not valid JSON"),
    (b'{"context": "a"}\n', "line 1: missing key 'continuation'"),
    (b'{"context": "a", "continuation": ""}\n', "line 1: 'continuation' is empty"),
    (b'{"context_ids": [1, 2], "continuation_ids": []}\n', "line 1: 'continuation_ids' is empty"),
    (b'{"context_ids": [1, "x"], "continuation_ids": [3]}\n', "line 1: 'context_ids' must be a list of token ids"),
    (b'[1, 2]\n', "line 1: expected a JSON object"),
    (b'\n  \n', "no requests"),
])
def test_bad_data_is_named_by_line_before_loading(tiny, tmp_path, capsys, monkeypatch, content, message):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(realm_jax.loading, "load", no_load)
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    assert run_score(tiny, data, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert message in err and str(data) in err
    assert not (tmp_path / "out.jsonl").exists()


def test_token_ids_outside_the_vocab_are_named_by_line(tiny, tmp_path, capsys):
    data = write_data(tmp_path / "d.jsonl", [{"context_ids": [5], "continuation_ids": [6]},
                                             {"context_ids": [5], "continuation_ids": [600]}])
    assert run_score(tiny, data, tmp_path / "out.jsonl") == 2
    assert "line 2: continuation: token ids must be in [0, 97)" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_perplexity_cli_matches_the_api(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(TEXTS), encoding="utf-8")
    argv = ["perplexity", "--model", tiny.source, "--text", str(text), "--max-length", "16", "--stride", "5",
            "--batch-size", "4", "--dtype", "float32"]
    assert cli.main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    ref = realm_jax.perplexity(tiny, "\n".join(TEXTS), max_length=16, stride=5, batch_size=4)
    assert got["num_tokens"] == ref.num_tokens and got["nll"] == pytest.approx(ref.nll, rel=1e-6)
    assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-6)

    text.write_bytes("the cat\nsat on\xe9".encode("latin-1"))
    assert cli.main(argv) == 2
    assert "line 2: not valid UTF-8 (byte 0xe9 at column 7)" in capsys.readouterr().err
    text.write_text("the cat", encoding="utf-8")
    assert cli.main(argv[:-2] + ["--stride", "16"]) == 2
    assert "--stride" in capsys.readouterr().err
