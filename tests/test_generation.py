"""generate / generate_stream: padded batches equal rows alone and an uncached reference, greedy
equals HF transformers' generate (tiny models and SmolLM2), stop ids, streaming, seeds, compile
hygiene, and host-side validation."""

import jax
import jax.monitoring
import numpy as np
import pytest
import torch

import realm_jax
from realm_jax import generation
from realm_jax.errors import RealmError
from realm_jax.generation import generate, generate_stream
from realm_jax.loading import Model
from realm_jax.reference import forward_reference_jit

from hf_reference import make_hf_model
from compile_counter import CompileCounter


def tiny_model(arch="llama", seed=0, **kw):
    cfg = realm_jax.ModelConfig(arch=arch, vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2,
                                num_heads=6, num_kv_heads=2, head_dim=8, eos_token_ids=(2,),
                                max_position_embeddings=512, **kw)
    params = realm_jax.init_params(cfg, jax.random.PRNGKey(seed))
    return Model(cfg, params, None)


def random_prompts(rng, vocab, lengths):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def greedy_uncached(model, prompt, n_new, width=48):
    """The plain version: re-run the reference forward (canonical params, no cache) over the
    whole sequence each step."""
    seq = list(prompt)
    for _ in range(n_new):
        toks = np.zeros((1, width), np.int32)
        toks[0, :len(seq)] = seq
        logits = np.asarray(forward_reference_jit(model.params, model.config, toks, np.array([len(seq)], np.int32)))
        seq.append(int(logits[0, len(seq) - 1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def llama():
    return tiny_model()


# ------------------------------------------------------------------------------ padded vs alone


# Most tests share one compiled program: 3-4 prompts (batch bucket 4), cache length 64.


def test_padded_batch_equals_rows_alone_and_uncached(llama):
    model = llama
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, model.config.vocab_size, [5, 1, 13])  # 3 rows -> 4 (1 padding row)
    n_new = 12
    res = generate(model, prompts, n_new, stop_ids=[])
    assert res.prompt_lengths == [5, 1, 13]
    assert res.finish_reasons == ["length"] * 3
    for i, p in enumerate(prompts):
        alone = generate(model, [p], n_new, stop_ids=[])
        assert alone.tokens[0] == res.tokens[i], f"row {i}"
        assert res.tokens[i] == greedy_uncached(model, p, n_new), f"row {i}"


# --------------------------------------------------------------------------- HF generate parity


def test_greedy_matches_hf_generate_tiny(tmp_path):
    case = "llama_gqa_llama3_untied"
    directory, hf = make_hf_model(case, tmp_path / case)
    # the per-layer runtime (the GPU decode layout; the CPU default, stacked, runs the SmolLM2 test)
    model = realm_jax.load(directory, dtype="float32", layout="per_layer")
    assert not model.runtime.stacked
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, model.config.vocab_size, [7, 3, 12])
    res = generate(model, prompts, 20)  # default stop ids: the config's eos (2)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=20, eos_token_id=2, pad_token_id=0)
        ref = out[0, len(p):].tolist()
        assert res.tokens[i] == ref, f"row {i}"
        assert res.finish_reasons[i] == ("stop" if ref[-1] == 2 else "length")


SMOL_PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]
SMOL_CHATS = ["Write a haiku about the sea.", "What is 17 times 23? Explain step by step."]


def test_smollm2_greedy_matches_hf_generate(smollm2, smollm2_hf, smollm2_hf_tokenizer):
    """Plain and chat-templated prompts in one padded batch; 36 new tokens; float32. Then the
    same request streamed."""
    hf_tok = smollm2_hf_tokenizer
    n_new = 36
    ids_plain = generation.prepare_prompts(smollm2, SMOL_PROMPTS)
    ids_chat = generation.prepare_prompts(smollm2, SMOL_CHATS, chat=True)
    for p, ids in zip(SMOL_PROMPTS, ids_plain):
        assert ids == hf_tok(p)["input_ids"]
    for p, ids in zip(SMOL_CHATS, ids_chat):
        ref = hf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        assert ids == list(ref)
    prompts = ids_plain + ids_chat
    res = generate(smollm2, prompts, n_new)
    eos = list(generation.default_stop_ids(smollm2))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = smollm2_hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      do_sample=False, max_new_tokens=n_new, eos_token_id=eos,
                                      pad_token_id=hf_tok.pad_token_id or 0)
        ref = out[0, len(p):].tolist()
        assert res.tokens[i] == ref, f"row {i}: ours {res.tokens[i]}, HF {ref}"
        assert res.texts[i] == hf_tok.decode(ref[:-1] if ref[-1] in eos else ref, skip_special_tokens=True)
    assert min(len(t) for t in res.tokens) >= 32  # long continuations were compared
    # streaming the same request: the chunks' tokens and text deltas add up to the same result
    chunks = list(generate_stream(smollm2, prompts, n_new, chunk=8))
    for i in range(len(prompts)):
        assert sum((c.tokens[i] for c in chunks), []) == res.tokens[i]
        assert "".join(c.texts[i] for c in chunks) == res.texts[i]
        assert chunks[-1].finish_reasons[i] == res.finish_reasons[i]


# ------------------------------------------------------------------------------ stops, streaming


def test_stop_ids_end_a_row_and_others_continue(llama):
    rng = np.random.default_rng(2)
    prompts = random_prompts(rng, llama.config.vocab_size, [4, 6, 9])
    ref = generate(llama, prompts, 12, stop_ids=[])
    row0 = ref.tokens[0]
    j = next(j for j in range(2, 12) if row0[j] not in row0[:j])
    stop = row0[j]
    res = generate(llama, prompts, 12, stop_ids=[[stop], [], []])  # per-row stop lists
    assert res.tokens[0] == row0[:j + 1] and res.finish_reasons[0] == "stop"
    assert res.tokens[1:] == ref.tokens[1:] and res.finish_reasons[1:] == ["length", "length"]
    shared = generate(llama, prompts, 12, stop_ids=[stop])  # one list for all rows
    for i, toks in enumerate(ref.tokens):
        end = toks.index(stop) + 1 if stop in toks else len(toks)
        assert shared.tokens[i] == toks[:end]
        assert shared.finish_reasons[i] == ("stop" if stop in toks else "length")
    # per-row max_new_tokens: rows end at their own limits
    lim = generate(llama, prompts, [3, 12, 7], stop_ids=[])
    assert [len(t) for t in lim.tokens] == [3, 12, 7]
    assert [t == r[:len(t)] for t, r in zip(lim.tokens, ref.tokens)] == [True] * 3


@pytest.mark.parametrize("settings", [dict(), dict(temperature=[1.0, 0.0, 0.7], top_k=[0, 0, 5], top_p=0.9,
                                                   seed=[4, 5, 6])])
def test_stream_concatenated_equals_generate(llama, settings):
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, llama.config.vocab_size, [5, 2, 7])
    res = generate(llama, prompts, [11, 4, 9], stop_ids=[5, 9], **settings)
    chunks = list(generate_stream(llama, prompts, [11, 4, 9], stop_ids=[5, 9], chunk=3, **settings))
    assert all(len(t) <= 1 for t in chunks[0].tokens)  # right after prefill: the first token
    assert all(len(t) <= 3 for c in chunks[1:] for t in c.tokens)
    for i in range(3):
        assert sum((c.tokens[i] for c in chunks), []) == res.tokens[i]
        assert chunks[-1].finish_reasons[i] == res.finish_reasons[i]
        ends = [k for k, c in enumerate(chunks) if c.finish_reasons[i] is not None]
        assert sum(len(c.tokens[i]) for c in chunks[:ends[0] + 1]) == len(res.tokens[i])


def test_seeded_rows_are_batch_invariant(llama):
    rng = np.random.default_rng(4)
    mine = rng.integers(3, 61, 6).tolist()
    settings = dict(temperature=1.0, top_p=0.95, seed=1234)
    alone = generate(llama, [mine], 14, stop_ids=[], **settings).tokens[0]
    others = random_prompts(rng, 61, [20, 2, 9])
    batch = generate(llama, others[:1] + [mine] + others[1:], 14, stop_ids=[], max_len=128,
                     temperature=[0.7, 1.0, 0.0, 1.5], top_p=[1.0, 0.95, 1.0, 0.5], seed=[1, 1234, 9, 77])
    assert batch.tokens[1] == alone
    assert len(set(map(tuple, batch.tokens))) == 4
    differently_seeded = generate(llama, [mine], 14, stop_ids=[], temperature=1.0, top_p=0.95, seed=1235)
    assert differently_seeded.tokens[0] != alone


def test_small_temperature_equals_greedy(llama):
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, 61, [3, 8, 5])
    greedy = generate(llama, prompts, 10, stop_ids=[])
    cold = generate(llama, prompts, 10, stop_ids=[], temperature=1e-6, seed=[3, 4, 5])
    assert cold.tokens == greedy.tokens


def test_per_row_adapters_equal_merged_models_alone(llama):
    """adapters/adapter_ids reach the model unchanged: each row matches its adapter merged in."""
    from realm_jax import lora

    ads = [lora.init_adapter(llama.config, jax.random.PRNGKey(10 + i), rank=4, b_std=0.5) for i in range(2)]
    stack = lora.stack_adapters(ads)
    rng = np.random.default_rng(7)
    prompts = random_prompts(rng, 61, [4, 7, 5])
    res = generate(llama, prompts, 10, stop_ids=[], adapters=stack, adapter_ids=[1, -1, 0])
    base = generate(llama, prompts, 10, stop_ids=[])
    assert res.tokens[1] == base.tokens[1]
    for row, a in ((0, 1), (2, 0)):
        merged = Model(llama.config, lora.merge(llama.params, ads[a]), None)
        assert res.tokens[row] == generate(merged, [prompts[row]], 10, stop_ids=[]).tokens[0]
        assert res.tokens[row] != base.tokens[row]  # the adapter changed the continuation
    # the same adapters prepared into the model's runtime (plain, and folded into the weights):
    # then only adapter_ids are passed
    for fold in (False, True):
        served = Model(llama.config, llama.params, None)
        rt = served.prepare(adapters=stack, fold=fold)
        assert rt.num_adapters == 2 and rt.folded == fold
        assert generate(served, prompts, 10, stop_ids=[], adapter_ids=[1, -1, 0]).tokens == res.tokens, fold


# ----------------------------------------------------------------------------- compile hygiene


def test_no_retrace_for_new_prompts_of_similar_length(llama):
    from realm_jax import lora

    rng = np.random.default_rng(6)
    stack = lora.stack_adapters([lora.init_adapter(llama.config, jax.random.PRNGKey(20 + i), rank=4)
                                 for i in range(2)])
    generate(llama, random_prompts(rng, 61, [5, 9, 3]), 12, temperature=0.5, seed=1)
    list(generate_stream(llama, random_prompts(rng, 61, [5, 9, 3]), 12, chunk=4))
    generate(llama, random_prompts(rng, 61, [5, 9, 3]), 12, adapters=stack, adapter_ids=[0, 1, -1])
    other = jax.tree_util.tree_map(lambda x: x * 1.5, stack)  # new adapter values, same shapes
    size = generation.generate_jit._cache_size()
    rt = llama.runtime
    with CompileCounter() as cc:
        generate(llama, random_prompts(rng, 61, [7, 2, 11]), 20, temperature=[0.0, 1.0, 0.3], top_k=[0, 4, 0],
                 top_p=0.8, seed=[5, 6, 7])
        generate(llama, random_prompts(rng, 61, [12, 4, 1]), 30, stop_ids=[7, 8, 9])
        list(generate_stream(llama, random_prompts(rng, 61, [6, 6, 6, 6]), 15, chunk=4, temperature=0.9))
        # per-call adapters (the runtime's base weights with this call's adapters): new prompts
        # and new adapter values of the same shapes compile nothing either
        generate(llama, random_prompts(rng, 61, [2, 8, 10]), 9, adapters=stack, adapter_ids=[1, -1, 0])
        generate(llama, random_prompts(rng, 61, [4, 4, 13]), 9, adapters=other, adapter_ids=[0, 0, 1])
    assert cc.count == 0
    assert generation.generate_jit._cache_size() == size
    assert llama.runtime is rt  # per-call adapters do not replace the model's runtime


# ------------------------------------------------------------------------------------ bad input


BAD_INPUTS = [
    (lambda m: generate(m, [[3, 4], []], 4), r"prompt 1 is empty"),
    (lambda m: generate(m, [[3, 61]], 4), r"prompt 0: token id 61 at position 1 is outside the vocabulary \[0, 61\)"),
    (lambda m: generate(m, [[3, -1]], 4), r"token id -1 .*outside the vocabulary"),
    (lambda m: generate(m, [[3] * 20], 50, max_len=64), r"20 tokens \+ max_new_tokens 50 = 70 .*max_len=64"),
    (lambda m: generate(m, [[3] * 500], 20), r"500 tokens \+ max_new_tokens 20 = 520 .*max_position_embeddings=512"),
    (lambda m: generate(m, [[3]], 4, temperature=-1.0), r"temperature must be finite and >= 0"),
    (lambda m: generate(m, [[3]], 4, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda m: generate(m, [[3], [4]], 4, top_p=[0.5, 1.2]), r"top_p must be in \(0, 1\].*1.2 \(row 1\)"),
    (lambda m: generate(m, [[3]], 4, top_k=-2), r"top_k must be a non-negative integer"),
    (lambda m: generate(m, [[3]], 4, top_k=1.5), r"top_k must be a non-negative integer"),
    (lambda m: generate(m, [[3]], 0), r"max_new_tokens must be an integer >= 1, got 0"),
    (lambda m: generate(m, [[3], [4]], [4]), r"max_new_tokens: expected an int or 2 values"),
    (lambda m: generate(m, [[3]], 4, stop_ids=[70]), r"stop_ids: 70 is not a token id in \[0, 61\)"),
    (lambda m: generate(m, [], 4), r"prompts: expected at least one prompt"),
    (lambda m: generate(m, "hello", 4), r"prompts: expected a list .*wrap a single prompt"),
    (lambda m: generate(m, ["hello"], 4), r"prompt 0: the model has no tokenizer"),
    (lambda m: generate(m, [[3, 4.5]], 4), r"prompt 0: expected a string or a list of int token ids"),
    (lambda m: generate(m, [[3]], 4, adapter_ids=[0]), r"adapter_ids given without adapters"),
    (lambda m: generate(m, [[3]], 4, adapters={"layers": {"wq": {}}}), r"adapters\['layers'\]\['wq'\]: expected keys"),
    (lambda m: generate_stream(m, [[3]], 4, chunk=0), r"chunk must be an integer >= 1"),  # at the call
    (lambda m: generate_stream(m, [[3]], 4, temperature=float("inf")), r"temperature must be finite"),
]


@pytest.mark.parametrize("call,match", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_before_device_work(llama, monkeypatch, call, match):
    def no_device(*a, **k):
        raise AssertionError("device work started before validation finished")

    for name in ("new_cache", "runtime_for", "generate_jit", "start_jit", "decode_loop_jit"):
        monkeypatch.setattr(generation, name, no_device)
    with pytest.raises(RealmError, match=match):
        call(llama)
