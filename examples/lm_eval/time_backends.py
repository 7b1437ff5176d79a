"""CPU time of lm-evaluation-harness on the realm_tiny tasks: the realm_jax backend against the
harness's hf backend on the same checkpoint (the numbers in docs/benchmarks.md).

Each (backend, model) runs in a fresh process: the model is built, then ``simple_evaluate`` runs
the three tasks twice. "first" includes everything a first run pays (for realm_jax the XLA
compilations, with the persistent compilation cache off); "again" is the second evaluation in
the same process (compiled programs reused); the last column is a new process whose persistent
compilation cache (on by default) an earlier run filled. Run from the repository root:

    python examples/lm_eval/time_backends.py            # SmolLM2-135M and a tiny random llama
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS = ["realm_tiny_mc", "realm_tiny_gen", "realm_tiny_ppl"]
MAX_LENGTH = 32


def child(backend: str, model_args: str) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import realm_jax.integrations.lm_eval  # noqa: F401  (registers realm_jax)

    start = time.perf_counter()
    lm = lm_eval.api.registry.get_model(backend).create_from_arg_string(model_args, {"batch_size": 8})
    built = time.perf_counter() - start
    tm = TaskManager(include_path=str(REPO / "examples" / "lm_eval"), include_defaults=False)
    times, metrics = [], None
    for _ in range(2):
        start = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, bootstrap_iters=0)
        times.append(time.perf_counter() - start)
        metrics = {f"{t}/{k}": v for t, d in res["results"].items() for k, v in d.items()
                   if isinstance(v, float)}
    print(json.dumps({"load_s": built, "first_s": times[0], "again_s": times[1], "metrics": metrics}))


def main() -> None:
    from realm_jax import builtin

    tiny = Path(tempfile.mkdtemp()) / "tiny"
    sys.path.insert(0, str(REPO / "tests"))
    from hf_reference import make_hf_model  # the same tiny checkpoint as tests/test_lm_eval_adapter.py
    from test_scoring import write_tiny_tokenizer

    make_hf_model("llama_gqa_llama3_untied", tiny, seed=0)
    write_tiny_tokenizer(tiny)
    conf = json.loads((tiny / "tokenizer_config.json").read_text())
    conf.update(tokenizer_class="PreTrainedTokenizerFast", pad_token="<pad>")
    (tiny / "tokenizer_config.json").write_text(json.dumps(conf))
    smollm2 = builtin.ensure_builtin("smollm2-135m-instruct")
    env = dict(os.environ, JAX_PLATFORMS="cpu", REALM_JAX_COMPILATION_CACHE="0", REALM_JAX_QUIET="1")
    cached = dict(env, REALM_JAX_COMPILATION_CACHE="1", REALM_JAX_CACHE=tempfile.mkdtemp())

    def run(backend, args, env):
        out = subprocess.run([sys.executable, __file__, "--child", backend, args], env=env, cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print("| model | backend | load s | first evaluation s | second evaluation s | first evaluation, "
          "compilation cache filled by an earlier process s |")
    print("|---|---|---|---|---|---|")
    for label, path in (("SmolLM2-135M (float32)", smollm2), ("tiny random llama (3 layers, D=30)", tiny)):
        for backend, extra in (("realm_jax", ""), ("hf", ",device=cpu")):
            args = f"pretrained={path},max_length={MAX_LENGTH},dtype=float32{extra}"
            r = run(backend, args, env)
            warm = "-"
            if backend == "realm_jax":
                run(backend, args, cached)  # fills the persistent compilation cache
                warm = f"{run(backend, args, cached)['first_s']:.1f}"
            print(f"| {label} | {backend} | {r['load_s']:.1f} | {r['first_s']:.1f} | {r['again_s']:.1f} | {warm} |",
                  flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
