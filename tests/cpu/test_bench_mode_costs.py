"""scripts/bench_sdpa.py's mode-cost table (the GPU measurement of what each accuracy mode adds to one fp8
attention layer): argument handling, the table from synthetic rows, and the quantize-only / add-back parts
run on CPU (interpreter) with tiny shapes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load_bench_sdpa():
    spec = importlib.util.spec_from_file_location("hfa_scripts_bench_sdpa_mode_costs", SCRIPTS / "bench_sdpa.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench_sdpa()


def test_rounds_argument(capsys):
    assert bench.parse_args([]).rounds == 1
    assert bench.parse_args(["--rounds", "5"]).rounds == 5
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
    assert "--rounds must be positive" in capsys.readouterr().err


def _row(impl, ms, mode, causal=True, S=16384):
    return {"S": S, "causal": causal, "impl": impl, "ms": ms, "tflops": None, "vs_fa3_bf16": None, "D": 128,
            "mode": mode, "sqnr_db": None}


def test_mode_cost_table():
    rows = [
        _row("FA3 bf16", 3.3, None),
        _row("fp8_fa3 (quant incl.)", 2.700, "none"),
        _row("fp8_fa3 [smooth_k+smooth_v] (quant incl.)", 2.781, "smooth_k+smooth_v"),
        _row("fp8_triton (quant incl.)", 3.500, "none"),
        _row("fp8_triton [smooth_k+smooth_v] (quant incl.)", 3.605, "smooth_k+smooth_v"),
        _row("fp8 quantize only", 0.250, "none"),
        _row("fp8 quantize only [smooth_k+smooth_v]", 0.275, "smooth_k+smooth_v"),
        _row(bench.ADD_BACK, 0.054, None),
        _row("fp8_fa3 (quant incl.)", 9.0, "none", causal=False),  # no other mode at this shape: no line
    ]
    lines = bench.mode_cost_lines(rows)
    assert lines[2] == ("| D | S | causal | mode | fp8_fa3 ms | fp8_fa3 vs none | fp8_triton ms | fp8_triton vs none "
                        "| quantize only ms | quantize only vs none |")
    assert lines[4] == ("| 128 | 16384 | yes | smooth_k+smooth_v | 2.781 | 1.030x (+81 us) | 3.605 | 1.030x (+105 us) "
                        "| 0.275 | 1.100x (+25 us) |")
    assert len([line for line in lines if line.startswith("| 128")]) == 1
    assert lines[-1] == f"- D=128 S=16384 causal=yes: {bench.ADD_BACK} 0.054 ms (2.0% of the fp8 layer's mode none)"
    assert bench.mode_cost_lines([_row("fp8_fa3 (quant incl.)", 2.7, "none")]) == []


def test_mode_cost_parts_run_on_cpu():
    """The timed callables themselves: quantize per mode (triton kernel, interpreted) and the add-back."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, h, 64, generator=g).to(torch.bfloat16).transpose(1, 2) for h in (4, 2, 2))
    modes = {"none": {}, "smooth_k+smooth_v": {"smooth_k": True, "smooth_v": True}}
    parts = {c.name: c for c in bench._mode_cost_parts(q, k, v, modes)}
    assert set(parts) == {"fp8 quantize only", "fp8 quantize only [smooth_k+smooth_v]", bench.ADD_BACK}
    assert parts["fp8 quantize only [smooth_k+smooth_v]"].fn().v_mean.shape == (1, 2, 64)
    assert parts["fp8 quantize only"].fn().v_mean is None
    out = parts[bench.ADD_BACK].fn()
    assert out.shape == (1, 32, 4, 64) and torch.isfinite(out.float()).all()
    assert bench._mode_cost_parts(q, k, v, {"none": {}})[0].mode == "none"
