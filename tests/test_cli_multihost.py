"""``realm-jax score`` across two real processes (jax.distributed on CPU): each scores its share,
process 0 writes everything in input order — the same results as one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from hf_reference import make_hf_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(model_dir, data, out, *extra):
    return [sys.executable, "-m", "realm_jax.cli", "score", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--batch-size", "2", "--chunk-size", "5", "--dtype", "float32", "--quiet", *extra]


def test_two_process_score_equals_one_process(tmp_path):
    model_dir, _ = make_hf_model("qwen2_bias", tmp_path / "m")
    rng = np.random.default_rng(5)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(11):  # 11 requests, chunks of 5: shares are uneven and padded
            f.write(json.dumps({"context_ids": rng.integers(3, 97, 2 + i % 4).tolist(),
                                "continuation_ids": rng.integers(3, 97, 1 + i % 3).tolist()}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "XLA_FLAGS": ""}
    one = tmp_path / "one.jsonl"
    subprocess.run(_cmd(model_dir, data, one), env=env, check=True, timeout=600)

    port = _free_port()
    two = tmp_path / "two.jsonl"
    procs = [subprocess.Popen(_cmd(model_dir, data, two, "--coordinator-address", f"localhost:{port}",
                                   "--num-processes", "2", "--process-id", str(i)),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    a = [json.loads(line) for line in one.read_text().splitlines()]
    b = [json.loads(line) for line in two.read_text().splitlines()]
    assert [r["index"] for r in b] == list(range(11))
    assert [r["digest"] for r in a] == [r["digest"] for r in b]
    np.testing.assert_allclose([r["logprob"] for r in b], [r["logprob"] for r in a], atol=1e-5, rtol=0)
    assert [r["is_greedy"] for r in a] == [r["is_greedy"] for r in b]
