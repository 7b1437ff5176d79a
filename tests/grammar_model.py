"""A tiny random HF llama with a real byte-level BPE tokenizer (trained here on a small corpus
of JSON-like text), saved as an HF directory: the model of the constrained-decoding tests."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    '{"name": "Ada", "age": 36, "tags": ["math", "code"], "ok": true}',
    '{"id": 7, "items": [1, 2, 3], "price": 12.5, "note": null}',
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "yes no maybe red green blue cat dog bird",
    "[true, false, null, -1, 2.0e3, \"x\\n\\\"y\"]",
]
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: BASE's pad, bos and eos


def make_grammar_model(directory: Path, vocab: int = 320, seed: int = 0):
    """Save (HF llama, tokenizer.json, tokenizer_config.json) in ``directory``; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hf_reference import make_hf_model

    directory = Path(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 8, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    make_hf_model("llama_gqa_llama3_untied", directory, seed=seed, vocab_size=vocab)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False}))
    return directory
