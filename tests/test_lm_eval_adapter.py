"""The lm-evaluation-harness adapter.

The main test runs the harness's own ``simple_evaluate`` on the small local tasks shipped in
examples/lm_eval (multiple choice, generate_until, loglikelihood_rolling over documents longer
than max_length), with and without ``apply_chat_template``, through the ``realm_jax`` backend and
through the harness's ``hf`` backend on the same tiny HF checkpoint: every metric agrees within
1e-4 relative and every generated text is identical. Unit tests check the pieces against HF
transformers and against the harness's own window and tokenization functions; one runs README's
harness command through a subprocess exactly as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import realm_jax
from realm_jax.errors import RealmError
from realm_jax.integrations import lm_eval as adapter

from hf_reference import make_hf_model
from test_scoring import TEXTS, hf_continuation_logprobs, write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
TASKS = ["realm_tiny_mc", "realm_tiny_gen", "realm_tiny_ppl"]
MAX_LENGTH = 32  # below every document of realm_tiny_ppl (52-100 tokens with the tiny tokenizer)
# a ChatML-like template in the tiny tokenizer's vocabulary; both backends render it
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")

lm_eval = pytest.importorskip("lm_eval")


def req(*args):
    return SimpleNamespace(args=tuple(args))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random llama with a 97-token BPE tokenizer and a chat template, as an HF directory
    that both realm_jax.load and the harness's hf backend (transformers) read."""
    directory = tmp_path_factory.mktemp("lm_eval") / "m"
    make_hf_model("llama_gqa_llama3_untied", directory, seed=0)
    write_tiny_tokenizer(directory)
    conf = json.loads((directory / "tokenizer_config.json").read_text())
    conf.update(tokenizer_class="PreTrainedTokenizerFast", pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    (directory / "tokenizer_config.json").write_text(json.dumps(conf))
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return realm_jax.load(tiny_dir, dtype="float32"), hf


@pytest.fixture(scope="module")
def lm(tiny):
    model, _ = tiny
    return adapter.RealmJaxLM(model=model, batch_size=4, max_length=8)


# ------------------------------------------------------------------ the harness, both backends
def _evaluate(model: str, model_args: str, chat: bool):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(REPO / "examples" / "lm_eval"), include_defaults=False)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=tm, batch_size=8,
                                  bootstrap_iters=0, apply_chat_template=chat, log_samples=True)
    return out, time.perf_counter() - start


def _metrics(results: dict) -> dict:
    return {(task, k): v for task, d in results["results"].items() for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"}


def _flat(resps) -> list[tuple]:
    """A sample's responses as (log-likelihood, is_greedy...) tuples (rolling ones are bare floats)."""
    out = []
    for r in resps:
        for x in (r if isinstance(r, list) else [r]):
            out.append((float(x),) if isinstance(x, (int, float)) else (float(x[0]), *x[1:]))
    return out


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_harness_metrics_equal_the_hf_backend(tiny_dir, tiny, chat, monkeypatch):
    monkeypatch.chdir(REPO)  # the tasks name their data files relative to the repository
    model, _ = tiny
    for line in (REPO / "examples/lm_eval/ppl.jsonl").read_text().splitlines():
        assert len(model.tokenizer.encode(json.loads(line)["text"])) > 1.5 * MAX_LENGTH  # several windows each
    args = f"pretrained={tiny_dir},max_length={MAX_LENGTH},dtype=float32"
    ours, t_ours = _evaluate("realm_jax", args, chat)
    ref, t_ref = _evaluate("hf", args + ",device=cpu", chat)
    print(f"\nharness on {TASKS} (chat={chat}): realm_jax {t_ours:.1f} s, hf {t_ref:.1f} s")

    got, want = _metrics(ours), _metrics(ref)
    assert set(got) == set(want) and len(want) == 6  # acc, acc_norm, exact_match, 3 perplexities
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=0), key
    for task in TASKS:  # request by request: the same prompts, the same texts, close log-likelihoods
        for a, b in zip(ours["samples"][task], ref["samples"][task], strict=True):
            assert a["arguments"] == b["arguments"]
            if task == "realm_tiny_gen":
                assert a["resps"] == b["resps"]
            else:
                for r, ref_r in zip(_flat(a["resps"]), _flat(b["resps"]), strict=True):
                    assert r[0] == pytest.approx(ref_r[0], rel=1e-4, abs=1e-4) and r[1:] == ref_r[1:]
    if chat:
        assert ours["samples"]["realm_tiny_gen"][0]["arguments"][0][0].startswith("<s>user: ")
    # the metadata the hf backend fills
    for key in ("tokenizer_pad_token", "tokenizer_eos_token", "tokenizer_bos_token", "eot_token_id", "max_length"):
        assert ours[key] == ref[key], key
    assert ours["config"]["model_num_parameters"] == ref["config"]["model_num_parameters"]
    assert ours["config"]["model_source"] == str(tiny_dir)


# ------------------------------------------------------------------ the pieces
def test_loglikelihood_matches_hf(tiny, lm):
    model, hf = tiny
    pairs = [("question: what is the answer? answer:", " yes"), ("the quick brown ", "fox"),
             ("", "hello world"), ("a cat sat", " on the mat"), ("she sells", "")]
    got = lm.loglikelihood([req(c, k) for c, k in pairs])
    assert len(got) == len(pairs)
    tok = model.tokenizer
    for (c, k), (lp, greedy) in zip(pairs, got):
        assert isinstance(lp, float) and isinstance(greedy, bool)
        if k == "":
            assert (lp, greedy) == (0.0, True)
            continue
        ctx, cont = realm_jax.scoring.encode_pair(tok, c, k)
        assert lm.encode_pair(c, k) == (ctx, cont)
        full = (ctx + cont)[-(lm.max_length + 1):]  # the adapter's max_length=8 truncates the context
        ref, ref_greedy = hf_continuation_logprobs(hf, full[:-len(cont)], cont)
        assert lp == pytest.approx(float(ref.sum()), abs=1e-4 * len(cont))
        assert greedy == ref_greedy


def test_loglikelihood_rolling_uses_the_harness_windows(tiny, lm):
    """The reference: the harness's own window functions, scored by HF transformers."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, hf = tiny
    texts = [TEXTS[0], TEXTS[2] + " " + TEXTS[3], "hello", TEXTS[1] * 3]
    got = lm.loglikelihood_rolling([req(t) for t in texts])
    L = lm.max_length
    partial = 0
    for text, lp in zip(texts, got):
        ids = model.tokenizer.encode(text)
        ref, n = 0.0, 0
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_token_id, L, 1)):
            inp = (ctx + cont)[:-1]
            assert len(inp) <= L
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([inp])).logits[0].float()
            lsm = torch.log_softmax(logits, -1)[len(inp) - len(cont):]
            ref += float(lsm[torch.arange(len(cont)), torch.tensor(cont)].sum())
            n += len(cont)
            partial += len(cont) < L and n > L  # a short last window, its context filled back up
        assert n == len(ids)
        assert lp == pytest.approx(ref, abs=1e-4 * n)
    assert partial  # the case the previous rule got wrong is exercised


def test_generate_until_matches_hf_greedy_cut_at_stop(tiny):
    model, hf = tiny
    tok = model.tokenizer
    contexts = ["the quick brown", "she sells sea", "a cat"]
    n_new = 12
    refs = []
    for c in contexts:
        ids = tok.encode(c)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = out[0, len(ids):].tolist()
        if new and new[-1] == tok.eos_id:
            new = new[:-1]
        refs.append(tok.decode(new))
    assert any(len(r) > 4 for r in refs)
    # stop strings taken from the reference text itself, so the cut is exercised
    untils = [[refs[0][3:5]] if len(refs[0]) > 5 else ["zzz"], "zzz", ["qq", refs[2][-2:] or "zzz"]]
    lm_long = adapter.RealmJaxLM(model=model, batch_size=2, max_length=64)
    got = lm_long.generate_until([req(c, {"until": u, "max_gen_toks": n_new, "do_sample": False})
                                  for c, u in zip(contexts, untils)], disable_tqdm=True)
    for r, u, g in zip(refs, untils, got):
        u = [u] if isinstance(u, str) else u
        cut = min([r.find(s) for s in u if s in r] + [len(r)])
        assert g == r[:cut]


def test_stop_strings_and_settings():
    assert adapter.cut_at_stop("abc\n\ndef", ["\n\n", "c"]) == "ab"
    assert adapter.cut_at_stop("abc", ["x", ""]) == "abc"
    until, n, s = adapter.gen_settings({"until": "\n", "max_new_tokens": 7, "temperature": 0.5}, 256)
    assert (until, n, s["temperature"]) == (["\n"], 7, 0.5)  # no do_sample, temperature > 0: sample
    until, n, s = adapter.gen_settings({"do_sample": False, "temperature": 0.7}, 32)
    assert (until, n, s["temperature"]) == ([], 32, 0.0)  # do_sample=False wins: greedy
    with pytest.raises(RealmError, match="max_gen_toks"):
        adapter.gen_settings({"max_gen_toks": "many"}, 32)


def test_chat_template_continues_the_final_message_as_transformers_does(tiny_dir, lm):
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    chats = [[{"role": "user", "content": "what is the answer?"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
              {"role": "assistant", "content": "answer: "}]]
    for chat in chats:
        for gen_prompt in (True, False):
            want = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen_prompt,
                                              continue_final_message=not gen_prompt)
            assert lm.apply_chat_template(chat, add_generation_prompt=gen_prompt) == want
    assert lm.chat_template(True) == CHAT_TEMPLATE and lm.chat_template(False) is None
    assert lm.tokenizer_name == lm.source.replace("/", "__")


def test_construction_from_harness_arguments(tiny, tiny_dir, capsys):
    model, _ = tiny
    # the harness passes model_args (strings parsed to ints where possible) plus its own settings
    lm = adapter.RealmJaxLM(pretrained=str(tiny_dir), dtype="float32", batch_size="auto", max_length="32",
                            device="cuda:0", max_batch_size=16)
    assert lm.max_length == 32 and lm.batch_sizes == {}
    assert lm.loglikelihood([req("the cat", " sat")], disable_tqdm=True)[0][0] < 0
    # 'auto' was resolved once, on first use, reported, and recorded for the results
    assert lm.batch_size in (1, 2, 4, 8, 16) and lm.batch_sizes == {0: lm.batch_size}
    assert f"batch_size=auto -> {lm.batch_size}" in capsys.readouterr().err
    assert lm.get_model_info()["model_source"] == str(tiny_dir)
    info = lm.tokenizer
    assert (info.eos_token, info.eos_token_id, info.bos_token_id, info.pad_token_id) == ("</s>", 2, 1, 0)
    assert adapter.RealmJaxLM(source=str(tiny_dir), batch_size="auto:4").batch_size >= 1  # the schedule form
    assert adapter.RealmJaxLM(pretrained=model).model is model  # a loaded Model as pretrained
    with pytest.raises(RealmError, match="exactly one of pretrained"):
        adapter.RealmJaxLM()
    with pytest.raises(RealmError, match="synonyms"):
        adapter.RealmJaxLM(pretrained="a", source="b")
    with pytest.raises(RealmError, match="batch_size"):
        adapter.RealmJaxLM(model=model, batch_size=0)
    with pytest.raises(RealmError, match="unknown model_args max_lenght"):
        adapter.RealmJaxLM(model=model, max_lenght=16)


def test_fitting_batch_size_on_the_cpu(tiny):
    model, _ = tiny
    b, how = realm_jax.scoring.fitting_batch_size(model, 32, limit=48)
    assert b == 32 and "at most max_batch_size=48" in how  # a power of two <= the limit; the tiny model fits
    need = realm_jax.scoring.row_bytes(model.config, 2 ** 20)
    b, _ = realm_jax.scoring.fitting_batch_size(model, 2 ** 20, limit=64)
    assert b == 1 or b * need <= realm_jax.scoring._host_memory_available() // 2


def test_model_args_source_becomes_pretrained_for_the_harness():
    argv = ["--model", "realm_jax", "--model_args", "source=x,dtype=float32", "--tasks", "t"]
    assert adapter.harness_argv(argv)[3] == "pretrained=x,dtype=float32"
    assert adapter.harness_argv(["--model_args=source=y"]) == ["--model_args=pretrained=y"]
    assert adapter.harness_argv(["-a", "pretrained=z,max_length=8"])[1] == "pretrained=z,max_length=8"


def test_registered_with_the_harness():
    assert adapter.register() is True
    from lm_eval.api.registry import get_model

    assert get_model("realm_jax") is adapter.RealmJaxLM
    assert get_model("hf") is not None  # the harness's own models are still there


def readme_harness_command() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Evaluate with lm-evaluation-harness", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()


def test_readme_harness_command_runs_as_written():
    command = readme_harness_command()
    assert command.startswith("realm-jax eval ") and "--model realm_jax" in command
    from realm_jax import cli

    assert "eval" in cli.COMMANDS, "realm_jax/cli.py: COMMANDS must list 'eval' (realm_jax/commands/eval.py)"
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("REALM_JAX_COMPILATION_CACHE", None)  # as a user runs it
    res = subprocess.run(command.replace("\\\n", " "), shell=True, cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for task in TASKS:
        assert task in res.stdout
    assert re.search(r"realm_tiny_mc\s*\|.*\|acc\s*\|", res.stdout)
    assert shlex.split(command.replace("\\\n", " "))[0] == "realm-jax"
