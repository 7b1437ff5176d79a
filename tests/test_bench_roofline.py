"""The copy ceiling and the roofline of ``realm-jax bench``: the best-of selection, the Pallas copy
kernels (run in interpret mode on the CPU), the kernel counter, the profile readers, bytes per
step against a hand count, and the printed roofline fields against each other."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import bench
from realm_jax.cli import main
from realm_jax.config import ModelConfig
from realm_jax.runtime import prepare


def test_best_copy_is_the_fastest_measured_candidate():
    bw = {"bytes": 1 << 30, "xla_copy_bytes_per_s": 3.3e12, "xla_loop_bytes_per_s": 4.1e12,
          "pallas_tma_device_bytes_per_s": 4.3e12, "torch_copy_bytes_per_s": 4.2e12,
          "datasheet_bytes_per_s": 4.8e12, "xla_best_bytes_per_s": 9e12, "bytes_per_s": 9e12}
    rates = bench.copy_candidates(bw)
    # the datasheet and the summary keys are no candidates, however large
    assert rates == {"xla_copy": 3.3e12, "xla_loop": 4.1e12, "pallas_tma_device": 4.3e12, "torch_copy": 4.2e12}
    assert bench.best_copy(rates) == ("pallas_tma_device", 4.3e12)
    with pytest.raises(ValueError):
        bench.best_copy({})


def test_datasheet_picks_the_longest_matching_name():
    assert bench.datasheet_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.datasheet_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert bench.datasheet_bandwidth("NVIDIA A100 80GB PCIe") == 1.935e12
    assert bench.datasheet_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert bench.datasheet_bandwidth("cpu") is None


def test_copy_bandwidth_reports_the_max_of_its_candidates_on_cpu():
    bw = bench.copy_bandwidth(nbytes=8 << 20, repeats=2, torch_check=False)
    rates = bench.copy_candidates(bw)
    assert {"xla_copy", "xla_add_one", "xla_donated", "xla_loop"} <= set(rates)
    assert set(rates) <= set(bench.COPY_KERNELS)
    assert bw["bytes_per_s"] == max(rates.values()) and rates[bw["best"]] == bw["bytes_per_s"]
    assert bw["best_kernel"] == bench.COPY_KERNELS[bw["best"]]
    assert bw["xla_best_bytes_per_s"] == max(v for k, v in rates.items() if k.startswith("xla_"))
    assert bw["errors"] == {} and bw["meaningful"] is False
    # the CPU has no Pallas compiler and no device streams: no Pallas or device-timed candidate,
    # by backend choice (the kernels themselves are checked in interpret mode below)
    assert bench.pallas_copy_kernel(jax.devices()[0]) is None
    assert not any(k.startswith("pallas") or k.endswith("_device") for k in rates)


def test_pallas_copy_kernels_copy_every_element():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    x = jnp.asarray(np.random.default_rng(1).standard_normal((96, 256)), jnp.float32)
    tma = jax.jit(lambda a: bench._pallas_tma_copy(a, rows=32, interpret=InterpretGPUParams()))(x)
    block = jax.jit(lambda a: bench._pallas_block_copy(a, rows=32, interpret=True))(x)
    np.testing.assert_array_equal(np.asarray(tma), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(block), np.asarray(x))
    with pytest.raises(ValueError, match="multiple"):
        bench._pallas_block_copy(x, rows=64, interpret=True)


def test_pallas_tma_copy_lowers_for_cuda():
    """The Mosaic GPU kernel builds in this JAX version: lowered for CUDA from the CPU, it is one
    Mosaic GPU custom call (the GPU's compiler runs at the first call on a device)."""
    x = jax.ShapeDtypeStruct((1 << 12, 256), jnp.float32)
    text = jax.jit(bench._pallas_tma_copy).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"stablehlo.custom_call @mosaic_gpu", text)) == 1


HLO = """HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_add (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  %constant.1 = f32[] constant(1)
  %broadcast.1 = f32[8]{0} broadcast(%constant.1), dimensions={}
  ROOT %add.1 = f32[8]{0} add(%param_0, %broadcast.1)
}

%command_buffer (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %fusion.2 = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused_add
  ROOT %fusion.3 = f32[8]{0} fusion(%fusion.2), kind=kLoop, calls=%fused_add
}

%cond (c: (s32[], f32[8])) -> pred[] {
  %c = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (b: (s32[], f32[8])) -> (s32[], f32[8]) {
  %b = (s32[], f32[8]{0}) parameter(0)
  %v = f32[8]{0} get-tuple-element(%b), index=1
  %f = f32[8]{0} fusion(%v), kind=kLoop, calls=%fused_add
  %j = s32[] get-tuple-element(%b), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%j, %f)
}

ENTRY %main (Arg_0: f32[8]) -> f32[8] {
  %Arg_0 = f32[8]{0} parameter(0)
  %bitcast.1 = f32[8]{0} bitcast(%Arg_0)
  %call.1 = f32[8]{0} call(%bitcast.1), to_apply=%command_buffer
  %gemm = (f32[8]{0}, s8[64]{0}) custom-call(%call.1), custom_call_target="__cublas$gemm"
  %g = f32[8]{0} get-tuple-element(%gemm), index=0
  %cs = (f32[8]{0}, f32[8]{0}, u32[]) copy-start(%g)
  %cd = f32[8]{0} copy-done(%cs)
  %z = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%z, %cd)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_count_kernels_against_a_hand_count():
    # entry: custom-call 1 + copy-start 1; the command buffer's two fusions; one loop iteration:
    # the condition's compare 1 and the body's fusion 1. Nothing inside a fusion body counts.
    assert bench.count_kernels(HLO) == 6
    with pytest.raises(ValueError):
        bench.count_kernels("HloModule empty")


def test_busy_seconds_counts_overlaps_once():
    ev = [{"ts": 0.0, "dur": 10.0}, {"ts": 5.0, "dur": 10.0}, {"ts": 30.0, "dur": 5.0}, {"ts": 31.0, "dur": 1.0}]
    assert bench.busy_seconds(ev) == pytest.approx(20e-6)  # [0, 15] and [30, 35]
    assert bench.busy_seconds([]) == 0.0


def test_device_events_keep_device_streams_only():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "tf_XLAPjRtCpuClient"}}]
    kernel = {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "ts": 1.0, "dur": 2.0}
    host = {"ph": "X", "pid": 2, "tid": 1, "name": "fusion.1", "ts": 0.0, "dur": 1.0}
    assert bench.device_events({"traceEvents": meta + [kernel, host]}) == [kernel]
    assert bench.device_events(meta + [host], host_fallback=False) == []
    # no device streams: the fallback gives XLA's host-thunk events, less the containers of others
    loop = {"ph": "X", "pid": 2, "tid": 1, "name": "while.3", "ts": 0.0, "dur": 5.0}
    assert bench.device_events(meta + [host, loop]) == [host]


def _hand_count_bytes(cfg: ModelConfig, item: int) -> int:
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d  # q, k, v, o; gate, up, down; 2 norms
    head = cfg.vocab_size * d  # the tied embedding is the head; untied, the head (the table is gathered)
    return (head + cfg.num_layers * layer + d) * item


@pytest.mark.parametrize("tied", [True, False])
def test_bytes_per_step_against_a_hand_count(tied):
    cfg = ModelConfig(**{**bench.SHAPES["tiny"], "tie_word_embeddings": tied})
    rt = prepare(bench.random_params(cfg, jnp.float32), cfg, layout="per_layer")
    p, kv = bench.bytes_per_step(cfg, rt, 3, 40, 4)
    assert p == _hand_count_bytes(cfg, 4)
    assert kv == 2 * cfg.num_layers * 3 * 40 * cfg.num_kv_heads * cfg.head_dim * 4


def test_roofline_math():
    bw = {"bytes_per_s": 4e12, "best": "torch_copy", "meaningful": True}
    r = bench.roofline(3_000_000_000, 1_000_000_000, 2e-3, bw)
    assert r["bytes_per_step"] == 4_000_000_000
    assert r["floor_ms"] == pytest.approx(1.0) and r["achieved_gb_s"] == pytest.approx(2000)
    assert r["mbu_pct"] == pytest.approx(50) and r["ceiling"] == "torch_copy"
    assert bench.roofline(1, 1, 1.0, {**bw, "meaningful": False})["mbu_pct"] is None


def test_bench_prints_a_consistent_roofline_line_per_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "tiny", "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "3",
                 "--repeats", "1", "--dtype", "float32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    bw, rows = res["bandwidth"], res["rows"]
    assert bw["bytes_per_s"] == max(bench.copy_candidates(bw).values())
    lines = [line for line in text.splitlines() if line.startswith("roofline ")]
    assert len(lines) == len(rows) == 2
    cfg = ModelConfig(**bench.SHAPES["tiny"])
    for r, line in zip(rows, lines):
        assert r["param_bytes_per_step"] == _hand_count_bytes(cfg, 4)
        assert r["bytes_per_step"] == r["param_bytes_per_step"] + r["kv_bytes_per_step"]
        assert r["floor_ms"] == pytest.approx(r["bytes_per_step"] / bw["bytes_per_s"] * 1e3)
        assert r["achieved_gb_s"] == pytest.approx(r["bytes_per_step"] / r["decode_ms_per_step"] / 1e6)
        assert r["ceiling"] == bw["best"] and isinstance(r["kernels"], int) and r["kernels"] > 0
        m = re.match(r"roofline tiny B=(\d+): ([\d.e+-]+) GB/step, floor ([\d.e+-]+) ms at ([\d,.]+) GB/s \((\w+)\), "
                     r"achieved [\d,]+ GB/s, MBU n/a \(CPU\); (\d+) kernels/step", line)
        assert m, line
        assert int(m.group(1)) == r["batch"] and m.group(5) == bw["best"] and int(m.group(6)) == r["kernels"]
        gb, floor, ceiling = float(m.group(2)), float(m.group(3)), float(m.group(4).replace(",", ""))
        assert floor == pytest.approx(gb * 1e9 / (ceiling * 1e9) * 1e3, rel=0.01)  # printed to 4 digits


def test_a_broken_copy_kernel_is_reported_and_cannot_win(monkeypatch):
    """A candidate that raises, or that copies wrongly (here: fast and wrong), is left out of the
    best-of with its error named; the other candidates still decide the ceiling."""
    def unbuildable(a):
        raise NotImplementedError("no lowering for this backend")

    monkeypatch.setattr(bench, "pallas_copy_kernel", lambda dev: ("pallas_tma", unbuildable))
    bw = bench.copy_bandwidth(nbytes=4 << 20, repeats=2, torch_check=False)
    assert "pallas_tma" not in bench.copy_candidates(bw) and bw["best"].startswith("xla_")
    assert bw["errors"] == {"pallas_tma": "NotImplementedError: no lowering for this backend"}
    monkeypatch.setattr(bench, "pallas_copy_kernel", lambda dev: ("pallas_tma", lambda a: a + 1.0))
    bw = bench.copy_bandwidth(nbytes=4 << 20, repeats=2, torch_check=False)
    assert "pallas_tma" not in bench.copy_candidates(bw)
    assert bw["errors"]["pallas_tma"] == "AssertionError: the Pallas copy did not reproduce its input"
