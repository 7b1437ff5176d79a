"""``realm-jax generate`` through ``realm_jax.cli.main``: a tiny checkpoint directory with a
word-level tokenizer (JSON batch, streamed single prompt, token-id prompts, clean errors), and
the built-in model once."""

import json

import numpy as np
import pytest

import realm_jax
from realm_jax import cli
from realm_jax.generation import generate

from hf_reference import make_hf_model

WORDS = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 97)]


def write_word_tokenizer(directory):
    """A word-level tokenizer over the tiny model's 97 ids: "w5 w17" <-> [5, 17]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False}))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory, _ = make_hf_model("llama_gqa_llama3_untied", tmp_path_factory.mktemp("cli") / "tiny")
    write_word_tokenizer(directory)
    return directory


PROMPTS = ["w5 w17 w33 w8", "w60 w61", "w90 w4 w4 w70 w12 w19"]


def test_json_batch_matches_generate(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "9", "--json", "--dtype", "float32"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = realm_jax.load(tiny_dir, dtype="float32")
    ref = generate(model, PROMPTS, 9)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == ref.tokens
    assert [r["text"] for r in rows] == ref.texts
    assert [r["finish_reason"] for r in rows] == ref.finish_reasons
    assert [r["prompt_tokens"] for r in rows] == [4, 2, 6]
    assert all(t.startswith("w") for r in rows for t in r["text"].split())


def test_json_with_sampling_surface_flags_matches_generate(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "9", "--json", "--dtype", "float32",
            "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--temperature", "0.9", "--seed", "5", "--n", "2",
            "--logprobs", "3", "--repetition-penalty", "1.3", "--frequency-penalty", "0.5", "--min-p", "0.02",
            "--logit-bias", "7=2.5", "--min-tokens", "2", "--stop", "w7 w7"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = realm_jax.load(tiny_dir, dtype="float32")
    ref = generate(model, PROMPTS[:2], 9, temperature=0.9, seed=5, n=2, logprobs=3, repetition_penalty=1.3,
                   frequency_penalty=0.5, min_p=0.02, logit_bias={7: 2.5}, min_tokens=2, stop=["w7 w7"])
    assert [(r["prompt"], r["sample"]) for r in rows] == [(PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[1], 0),
                                                         (PROMPTS[1], 1)]
    assert [r["tokens"] for r in rows] == ref.tokens and [r["text"] for r in rows] == ref.texts
    assert [[t["logprob"] for t in r["logprobs"]] for r in rows] == [[t.logprob for t in row] for row in ref.logprobs]
    assert all(len(t["top"]) == 3 for r in rows for t in r["logprobs"])


def test_constraint_flags_match_generate(tmp_path, capsys):
    from realm_jax import Constraint

    from grammar_model import make_grammar_model

    d = make_grammar_model(tmp_path / "g")
    base = ["generate", "--model", str(d), "--max-new-tokens", "30", "--json", "--dtype", "float32",
            "--prompt", "cat", "--prompt", "a b", "--temperature", "1"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    model = realm_jax.load(d, dtype="float32")
    for flags, c in [(["--choice", "red", "--choice", "blue"], Constraint.choice(["red", "blue"])),
                     (["--regex", "[a-c]{2}x"], Constraint.regex("[a-c]{2}x")),
                     (["--json-schema", json.dumps(schema)], Constraint.json_schema(schema))]:
        assert cli.main(base + flags) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        ref = generate(model, ["cat", "a b"], 30, temperature=1.0, constraint=c)
        assert [r["tokens"] for r in rows] == ref.tokens and [r["text"] for r in rows] == ref.texts
    # with a draft (greedy): the verified tokens are generate's under the same constraint
    greedy = base[:-2] + ["--draft", "self:1", "--k", "3", "--regex", "[a-c]{2}x"]
    assert cli.main(greedy) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref = generate(model, ["cat", "a b"], 30, constraint=Constraint.regex("[a-c]{2}x"))
    assert [r["tokens"] for r in rows] == ref.tokens and [r["text"] for r in rows] == ref.texts


def test_single_prompt_streams_text(tiny_dir, capsys):
    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "9",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "11", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    model = realm_jax.load(tiny_dir, dtype="float32")
    ref = generate(model, [PROMPTS[0]], 9, temperature=0.8, top_p=0.9, seed=11)
    assert out == ref.texts[0] + "\n"


def test_token_id_prompts(tiny_dir, capsys):
    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt-ids", "5,17,33,8", "--max-new-tokens", "5",
                     "--json", "--dtype", "float32"]) == 0
    row = json.loads(capsys.readouterr().out)
    model = realm_jax.load(tiny_dir, dtype="float32")
    assert row["tokens"] == generate(model, [[5, 17, 33, 8]], 5).tokens[0]


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "w5", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["--prompt", "", "--max-new-tokens", "4"], "prompt 0 is empty"),
    (["--prompt", "w5", "--temperature", "-1"], "temperature must be finite and >= 0"),
    (["--prompt", "w5", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt-ids", "5,x"], "--prompt-ids #0: expected comma-separated integers"),
    (["--prompt", "w5", "--logit-bias", "5"], "--logit-bias: expected ID=BIAS"),
    (["--prompt", "w5", "--min-p", "2"], "min_p must be in [0, 1]"),
    (["--prompt", "w5", "--n", "0"], "n: expected an integer >= 1"),
    (["--prompt", "w5", "--logprobs", "30"], "logprobs: expected None or an integer in [0, 20]"),
    (["--prompt", "w5", "--draft", "lookup", "--stop", "x"], "--draft: not available with --stop yet"),
    (["--prompt-ids", "5,400"], "token id 400 at position 1 is outside the vocabulary [0, 97)"),
    (["--prompt", "w5", "--max-new-tokens", "300"], "max_new_tokens 300 = 301 tokens, over the model's max_position_embeddings=256"),
    ([], "give at least one --prompt"),
    (["--prompt", "w5", "--regex", "w5", "--choice", "w7"], "give at most one of --json-schema, --regex"),
    (["--prompt", "w5", "--json-schema", "{bad"], "--json-schema: the JSON schema is not valid JSON"),
    (["--prompt", "w5", "--grammar", "/nonexistent/g.lark"], "--grammar: cannot read"),
    (["--prompt", "w5", "--choice", "w7"], "the grammar engine cannot read this model's tokenizer"),
])
def test_bad_input_exits_2_with_message(tiny_dir, capsys, extra, message):
    assert cli.main(["generate", "--model", str(tiny_dir), "--dtype", "float32"] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("realm-jax generate: error: ") and message in err, err


def test_builtin_model_readme_command(capsys):
    """README's first command, with the default (built-in) model."""
    assert cli.main(["generate", "--prompt", "Write a haiku about the sea.", "--max-new-tokens", "8",
                     "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert 1 <= len(row["tokens"]) <= 8 and isinstance(row["text"], str) and row["text"].strip()
    assert row["finish_reason"] in ("stop", "length")
    assert np.all(np.asarray(row["tokens"]) < 49152)
