"""GPU checks of the speed table: the bf16 attention a bf16 decision runs (FA3 bf16 on Hopper, else torch SDPA)
against torch SDPA, the auto path's choice with a fake table for this GPU (and under torch.compile), the
committed table for this GPU (if any) against this process's plan, and scripts/tune_dispatch.py on a tiny
grid. Skips name the missing requirement."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf_fp8_attention as hfa
from hf_fp8_attention import dispatch, speed_table
from hf_fp8_attention.metrics import sqnr_db

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_fp8_gpu = torch.cuda.is_available() and dispatch.device_arch(torch.device("cuda")) >= 89
fp8_gpu = pytest.mark.skipif(not _fp8_gpu, reason="needs an fp8 GPU (SM 8.9+) for the auto fp8 path")
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _qkv(b, h_q, h_kv, s_q, s_kv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((b, s_q, h_q, d), (b, s_kv, h_kv, d), (b, s_kv, h_kv, d))
    return tuple(torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for s in shapes)


def _sdpa(q, k, v, causal):
    s_q, s_kv = q.shape[2], k.shape[2]
    mask = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device).tril(s_kv - s_q) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@cuda
@pytest.mark.parametrize("s_q, s_kv, causal", [(1024, 1024, True), (1024, 1024, False), (1, 4096, False),
                                               (256, 2048, True)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bf16_attention_matches_torch_sdpa(s_q, s_kv, causal, d):
    impl = dispatch.bf16_impl(torch.device("cuda"))
    q, k, v = _qkv(2, 8, 2, s_q, s_kv, d)
    out = speed_table.bf16_attention(q, k, v, is_causal=causal, scale=None, impl=impl)
    assert out.shape == (2, s_q, 8, d) and out.is_contiguous() and out.dtype == torch.bfloat16
    assert sqnr_db(out.transpose(1, 2), _sdpa(q, k, v, causal)) > 40, impl


@cuda
def test_fa3_bf16_varlen_matches_each_sequence():
    if dispatch.bf16_impl(torch.device("cuda")) != "fa3":
        pytest.skip("needs Hopper (SM 9.x) and the FA3 wheel (flash_attn_interface)")
    q, k, v = (t[0].transpose(0, 1) for t in _qkv(1, 8, 2, 3000, 3000, 128))  # packed (total, H, D)
    cu = torch.tensor([0, 1000, 3000], dtype=torch.int32, device="cuda")
    out = speed_table.bf16_attention_varlen(q, k, v, cu, cu, 2000, 2000, is_causal=True, scale=None)
    for a, b in ((0, 1000), (1000, 3000)):
        ref = _sdpa(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), True)[0].transpose(0, 1)
        assert sqnr_db(out[a:b], ref) > 40


def _fake_table(speedup: float, fp8_backend: str, **shape):
    device = torch.device("cuda")
    row = {"s_q": 2048, "s_kv": 2048, "causal": True, "head_dim": 128, "group": 4, "batch": 1, **shape,
           "bf16_ms": 1.0, "fp8_ms": 1.0 / speedup}
    return speed_table.parse_table({
        "version": 1, "device": dispatch.device_key(device), "device_name": "fake", "fp8_backend": fp8_backend,
        "bf16": dispatch.bf16_impl(device), "heads": 32, "rows": [row]}, "fake")


@fp8_gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_auto_path_follows_a_fake_table(monkeypatch, compiled):
    monkeypatch.delenv(speed_table.ENV, raising=False)
    device = torch.device("cuda")
    backend = dispatch.plan_attention(device, None).backend
    q, k, v = _qkv(1, 32, 8, 2048, 2048, 128)
    run = lambda q, k, v: hfa.fp8_sdpa(q, k, v, is_causal=True)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, fullgraph=True, backend="aot_eager")  # eager kernels: bitwise comparable
    impl = dispatch.bf16_impl(device)
    bf16 = speed_table.bf16_attention(q, k, v, is_causal=True, scale=None, impl=impl).transpose(1, 2)
    fp8 = hfa.fp8_sdpa(q, k, v, is_causal=True, backend=backend)
    table = _fake_table(0.5, backend)
    monkeypatch.setattr(speed_table, "PACKAGED", {table.device: table})
    assert torch.equal(run(q, k, v), bf16)
    assert torch.equal(hfa.fp8_sdpa(q, k, v, is_causal=True, backend=backend), fp8)  # named: fp8 always
    table = _fake_table(1.5, backend)
    monkeypatch.setattr(speed_table, "PACKAGED", {table.device: table})
    if compiled:
        torch._dynamo.reset()
    assert torch.equal(run(q, k, v), fp8)
    if compiled:
        torch._dynamo.reset()


@cuda
def test_committed_table_for_this_gpu():
    device = torch.device("cuda")
    key = dispatch.device_key(device)
    path = speed_table.TABLE_DIR / f"{key}.json"
    if not path.exists():
        assert dispatch.describe_dispatch(device).startswith(f"no speed table for {key}")
        pytest.skip(f"no committed speed table for {key}: the auto path runs fp8 everywhere")
    table = speed_table.load_table(path)
    backend, impl = dispatch.plan_attention(device, None).backend, dispatch.bf16_impl(device)
    assert (table.fp8_backend, table.bf16) == (backend, impl), (
        f"{path} measured {table.fp8_backend} fp8 vs {table.bf16}, this environment runs {backend} / {impl}: "
        "the table is not used here")
    print(dispatch.describe_dispatch(device))
    decode = [r for r in table.rows if r.s_q == 1 and r.fp8_speedup < speed_table.BF16_MARGIN]
    if decode:  # a measured bf16 shape runs bf16 through the public entry point
        r = decode[0]
        q, k, v = _qkv(r.batch, table.heads, table.heads // r.group, 1, r.s_kv, r.head_dim)
        out = hfa.fp8_sdpa(q, k, v)
        assert torch.equal(out.transpose(1, 2), speed_table.bf16_attention(q, k, v, is_causal=False, scale=None,
                                                                           impl=impl))


@fp8_gpu
def test_tune_dispatch_tiny_grid(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("hfa_scripts_tune_dispatch_gpu", SCRIPTS / "tune_dispatch.py")
    tune = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tune
    spec.loader.exec_module(tune)
    out = tmp_path / "table.json"
    assert tune.main(["--seqlens", "1024", "4096", "--head-dims", "128", "--batches", "1", "--kv-heads", "8",
                      "--target-ms", "5", "--out", str(out)]) == 0
    table = speed_table.load_table(out)
    device = torch.device("cuda")
    assert table.device == dispatch.device_key(device) and table.bf16 == dispatch.bf16_impl(device)
    assert table.fp8_backend == dispatch.plan_attention(device, None).backend
    assert len(table.rows) == 6 and all(0.05 < r.fp8_speedup < 20 for r in table.rows)
    print(capsys.readouterr().out)
