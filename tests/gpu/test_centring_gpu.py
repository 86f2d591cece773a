"""K / V centring (`smooth_k` / `smooth_v`) and the Hadamard modes in the compiled quantize kernel, on
realistic shapes.

`centring_sums_kernel` computes each smoothed head's exact mean over the sequence (float64 chunk sums) before
the quantize kernel, which subtracts it in both passes. The reference sums the elements in float64: means
agree bit for bit in practice (float64 sums of float32 values are exact unless magnitudes span ~29
binades), v_mean is compared to 1e-6 of the head's centred amax, fp8 values to 1 ulp on at most 0.5% of a
tensor, descales to 1e-6 relative. Given the kernel's own mean the V scale and bytes are exact
(`test_v_scale_is_the_amax_of_its_centred_values_gpu`); v_add (the add-back) equals the reference's.

Cost is not a test here (a benchmark measures it): `scripts/bench_sdpa.py --seqlens 16384 --modes none
smooth_k smooth_k+smooth_v --rounds 5`.
"""

import pytest
import torch

from hf_fp8_attention._constants import FP8_DTYPE, FP8_MAX
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import (
    quantize_qkv_fp8,
    quantize_qkv_fp8_reference,
    quantize_qkv_fp8_varlen,
    quantize_qkv_fp8_varlen_reference,
)
from hf_fp8_attention.quantization import qkv as qkv_launcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")

NAMES = ("q", "k", "v")
MAX_ULP_FRACTION = 5e-3
DESCALE_RTOL = 1e-6
V_MEAN_ATOL = 1e-6  # relative to the head's max |v - mean|


def _ordinal(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.uint8).to(torch.int16)
    mag = b & 0x7F
    return torch.where(b >= 0x80, -mag, mag)


def _is_nan(t: torch.Tensor) -> torch.Tensor:
    return (t.view(torch.uint8) & 0x7F) == 0x7F


def assert_close_centred(got, ref) -> None:
    for n in NAMES:
        g, r = getattr(got, n), getattr(ref, n)
        assert g.dtype == FP8_DTYPE and g.shape == r.shape and g.is_contiguous(), n
        assert torch.equal(_is_nan(g), _is_nan(r)), f"{n}: NaN positions differ"
        ulp = (_ordinal(g) - _ordinal(r)).abs()[~_is_nan(r)]
        n_diff = int((ulp > 0).sum())
        assert ulp.numel() == 0 or int(ulp.max()) <= 1, f"{n}: {int(ulp.max())} ulp"
        assert n_diff <= MAX_ULP_FRACTION * ulp.numel(), f"{n}: {n_diff} of {ulp.numel()} differ by 1 ulp"
        gd, rd = getattr(got, f"{n}_descale"), getattr(ref, f"{n}_descale")
        torch.testing.assert_close(gd, rd, rtol=DESCALE_RTOL, atol=0, msg=f"{n}_descale")
    assert (got.v_mean is None) == (ref.v_mean is None)
    if ref.v_mean is not None:
        scale = ref.v_descale[..., None] * FP8_MAX
        assert ((got.v_mean - ref.v_mean).abs() <= V_MEAN_ATOL * scale).all(), "v_mean"


def make_inputs(B, H_q, H_kv, S, D, dtype=torch.bfloat16, seed=0):
    """BHSD views of BSHD memory; K with per-channel offsets up to +-20 (outlier channels), V with offsets
    up to +-3 (the long-context case smooth_v protects)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def one(H, mult, offset):
        x = torch.randn(B, S, H, D, generator=g, device="cuda") * mult
        x += (torch.rand(B, 1, H, D, generator=g, device="cuda") * 2 - 1) * offset
        return x.to(dtype).transpose(1, 2)

    return one(H_q, 3.0, 0.0), one(H_kv, 1.0, 20.0), one(H_kv, 0.5, 3.0)


def make_rope(S, D, dtype=torch.bfloat16):
    pos = torch.arange(S, dtype=torch.float32, device="cuda")[None, :, None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


CASES = [
    # B, H_q, H_kv, S, D, dtype, rope, smooth_k, smooth_v
    (1, 32, 8, 4096, 128, torch.bfloat16, False, True, True),
    (1, 32, 8, 4096, 128, torch.bfloat16, True, True, True),
    (1, 32, 32, 16384, 128, torch.bfloat16, False, True, True),
    (1, 32, 32, 16384, 128, torch.bfloat16, True, True, True),
    (2, 8, 2, 1000, 64, torch.float16, False, True, False),
    (2, 8, 2, 1000, 96, torch.bfloat16, True, False, True),
    (1, 8, 2, 600, 256, torch.bfloat16, True, True, True),
]
HADAMARD_CASES = [
    # B, H_q, H_kv, S, D, rope, hadamard, smooth_k, smooth_v
    (1, 32, 8, 4096, 128, True, "qk", False, True),
    (1, 32, 8, 4096, 128, False, "qk", True, True),
    (1, 32, 32, 16384, 128, True, "qkv", True, True),
    (2, 8, 2, 1000, 64, True, "v_only", False, False),
]


@pytest.mark.parametrize("B,H_q,H_kv,S,D,dtype,rope,smooth_k,smooth_v", CASES)
def test_kernel_matches_reference_gpu(B, H_q, H_kv, S, D, dtype, rope, smooth_k, smooth_v):
    q, k, v = make_inputs(B, H_q, H_kv, S, D, dtype)
    cos, sin = make_rope(S, D) if rope else (None, None)
    options = FP8AttentionOptions(hadamard="none", smooth_k=smooth_k, smooth_v=smooth_v)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
    assert torch.equal(got.v_add, ref.v_add) if smooth_v else got.v_add is None
    assert_close_centred(got, ref)
    if smooth_v:
        assert torch.equal(got.v_mean, ref.v_mean)


@pytest.mark.parametrize("B,H_q,H_kv,S,D,rope,hadamard,smooth_k,smooth_v", HADAMARD_CASES)
def test_hadamard_matches_reference_gpu(B, H_q, H_kv, S, D, rope, hadamard, smooth_k, smooth_v):
    """The rotation in P2 only (rows rounded to bf16, exact +-1 products), the group amax as the power-of-two
    norm bound from P1: within the tolerance of the reference, the rotated descales powers of two / 448."""
    q, k, v = make_inputs(B, H_q, H_kv, S, D)
    cos, sin = make_rope(S, D) if rope else (None, None)
    options = FP8AttentionOptions(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
    assert_close_centred(got, quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options))
    for n in ("q", "k") if hadamard != "v_only" else ("v",):
        amax = getattr(got, f"{n}_descale") * FP8_MAX
        torch.testing.assert_close(amax, torch.exp2(torch.log2(amax).round()), rtol=1e-6, atol=0, msg=n)


def test_v_scale_is_the_amax_of_its_centred_values_gpu():
    """Given the kernel's own mean m: v_descale = max |fl(v - m)| / 448 and v = e4m3(fl(v - m) * scale),
    bit for bit, for every head (every P2 of a head derived the same mean and amax)."""
    q, k, v = make_inputs(1, 32, 8, 8192, 128)
    got = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(smooth_k=True, smooth_v=True))
    centred = v.float() - got.v_mean[:, :, None, :]
    amax = centred.abs().amax(dim=(2, 3))
    fp8_max = torch.full_like(amax, FP8_MAX)
    assert torch.equal(got.v_descale, torch.div(amax, fp8_max))
    want = (centred * torch.div(fp8_max, amax)[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(got.v.view(torch.uint8), want.transpose(1, 2).contiguous().view(torch.uint8))


@pytest.mark.parametrize("one_tile_config", [None, (4096, 4, True), (8192, 8, True), (8192, 8, False)],
                         ids=lambda c: "default" if c is None else "x".join(map(str, c)))
def test_min_lag_repeated_gpu(monkeypatch, one_tile_config):
    """The smallest legal lag (P2s start while their head's P1s still run, so they wait and then read the
    statistics), each `_ONE_TILE_CONFIG` that scripts/bench_quantize.py --modes compares, with and without
    RoPE, five runs each: every run within the tolerance and equal to the first (a missing release/acquire
    or barrier would show as a run with a wrong mean or scale)."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    if one_tile_config is not None:
        monkeypatch.setattr(qkv_launcher, "_ONE_TILE_CONFIG", one_tile_config)
    q, k, v = make_inputs(1, 32, 8, 8192, 128, seed=1)
    options = FP8AttentionOptions(smooth_k=True, smooth_v=True)
    for rope in (False, True):
        cos, sin = make_rope(8192, 128) if rope else (None, None)
        ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options)
        runs = [quantize_qkv_fp8(q, k, v, cos, sin, options=options) for _ in range(5)]
        for got in runs:
            assert_close_centred(got, ref)
            for n in NAMES:
                assert torch.equal(getattr(got, n).view(torch.uint8), getattr(runs[0], n).view(torch.uint8)), n
                assert torch.equal(getattr(got, f"{n}_descale"), getattr(runs[0], f"{n}_descale")), n
            assert torch.equal(got.v_mean, runs[0].v_mean)


def test_varlen_gpu(monkeypatch):
    """Packed sequences with their own offsets (one of 5 tokens), fused RoPE, smallest lag: per-sequence
    statistics as the per-sequence reference."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    lengths = [4000, 1000, 3000, 5]
    H_q, H_kv, D = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(2)
    total = sum(lengths)
    q = torch.randn(total, H_q, D, generator=g, device="cuda") * 3
    k = torch.randn(total, H_kv, D, generator=g, device="cuda")
    v = torch.randn(total, H_kv, D, generator=g, device="cuda") * 0.5
    start = 0
    for i, n in enumerate(lengths):
        k[start : start + n] += (torch.rand(1, H_kv, D, generator=g, device="cuda") * 2 - 1) * 10 * (i + 1)
        v[start : start + n] += (torch.rand(1, H_kv, D, generator=g, device="cuda") * 2 - 1) * 4 - 2 * i
        start += n
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cos, sin = make_rope(total, D)
    args = (q, k, v, cu, cu, max(lengths), max(lengths), cos[0], sin[0])
    options = FP8AttentionOptions(smooth_k=True, smooth_v=True)
    got = quantize_qkv_fp8_varlen(*args, options=options)
    assert_close_centred(got, quantize_qkv_fp8_varlen_reference(*args, options=options))


def test_non_finite_gpu():
    """NaN / +-inf in K and V, and a V channel with no finite element: NaN exactly where the reference has
    it (the bad elements, and with RoPE their rotation partners), everything else within the tolerance."""
    q, k, v = make_inputs(1, 8, 2, 3000, 128, seed=3)
    k[0, 1, 3, 5] = float("nan")
    k[0, 0, 2900, 2] = float("inf")
    v[0, 0, 2, 7] = float("-inf")
    v[0, 1, 1500, 1] = float("nan")
    v[0, 1, :, 9] = float("nan")
    options = FP8AttentionOptions(smooth_k=True, smooth_v=True)
    for cos, sin in ((None, None), make_rope(3000, 128)):
        got = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
        assert_close_centred(got, quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options))
        assert torch.isfinite(got.v_mean).all() and got.v_mean[0, 1, 9] == 0.0
        assert torch.isfinite(got.k_descale).all() and torch.isfinite(got.v_descale).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_back_on_cuda_equals_torch_path(dtype):
    """restore_output's CUDA branch (`qkv.add_v_mean`, one Triton pass) equals the torch broadcast add of the
    float32 v_add, GQA 4, for a contiguous output."""
    from hf_fp8_attention.attention import restore_output
    from hf_fp8_attention.quantization import qkv as qkv_mod

    q, k, v = make_inputs(2, 8, 2, 1000, 128, dtype)
    got = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none", smooth_v=True))
    out = torch.randn(2, 1000, 8, 128, device="cuda").to(dtype)
    want = out.clone().add_(got.v_add.repeat_interleave(4, dim=1)[:, None])
    assert torch.equal(restore_output(out.clone(), got), want)
    assert torch.equal(qkv_mod.add_v_mean(out.clone(), got.v_add), want)
