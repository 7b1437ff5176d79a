"""``realm-jax bench`` runs end to end on a tiny shape and counts the bytes it claims to."""

import re

from realm_jax.cli import main


def _gb_per_step(out: str) -> list[float]:
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    return [float(re.split(r"\s*\|\s*", r)[9]) for r in rows]


def test_bench_tiny_float_and_int8(capsys):
    args = ["bench", "--shape", "tiny", "--batch", "1", "--prompt-len", "8", "--new-tokens", "3",
            "--repeats", "1", "--dtype", "float32"]
    assert main(args) == 0
    f32 = _gb_per_step(capsys.readouterr().out)
    assert main(args + ["--int8"]) == 0
    i8 = _gb_per_step(capsys.readouterr().out)
    assert len(f32) == len(i8) == 1
    # projections go from 4 bytes to 1 byte per weight: the bytes read per step must drop
    assert i8[0] < 0.7 * f32[0]


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "--shape", "tiny", "--new-tokens", "1"]) == 2
    assert "new-tokens" in capsys.readouterr().err


def test_results_json_names_no_directory(tmp_path):
    """``write_json`` keeps the output path's file name only, and writes the file where asked."""
    import json

    from realm_jax.bench import write_json

    out = tmp_path / "sub" / "r.json"
    write_json(str(out), {"args": {"out": str(out), "repeats": 3}, "rows": [1.5]})
    assert json.loads(out.read_text()) == {"args": {"out": "r.json", "repeats": 3}, "rows": [1.5]}
