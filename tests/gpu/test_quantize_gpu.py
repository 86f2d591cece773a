"""FP8 Q/K/V quantization on the GPU: compiled Triton kernels vs the torch reference on the same device.

The kernels are compiled with enable_fp_fusion=False, so the RoPE mul/mul/add should round exactly like the
torch reference; still, at most one fp8 ulp is tolerated on a tiny fraction of RoPE elements in case the
backend contracts anyway. Descales must be identical, and inputs without RoPE bit-identical.

Timings: scripts/bench_quantize.py.
"""

import pytest
import torch

from hf_fp8_attention._constants import FP8_DTYPE
from hf_fp8_attention.quantization import quantize_qkv_fp8, quantize_qkv_fp8_reference
from hf_fp8_attention.quantization import qkv as qkv_launcher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")

NAMES = ("q", "k", "v")
MAX_ULP_FRACTION = 1e-3  # RoPE cases only


def _ordinal(t: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3fn bytes -> integers ordered like the values (sign-magnitude to two's complement)."""
    b = t.view(torch.uint8).to(torch.int16)
    mag = b & 0x7F
    return torch.where(b >= 0x80, -mag, mag)


def _is_nan(t: torch.Tensor) -> torch.Tensor:
    return (t.view(torch.uint8) & 0x7F) == 0x7F


def assert_close_fp8(got, ref, rope: bool) -> None:
    for n in NAMES:
        g, r = getattr(got, n), getattr(ref, n)
        assert g.dtype == FP8_DTYPE and g.shape == r.shape and g.is_contiguous(), n
        assert torch.equal(_is_nan(g), _is_nan(r)), f"{n}: NaN positions differ"
        finite = ~_is_nan(r)
        ulp = (_ordinal(g) - _ordinal(r)).abs()[finite]
        n_diff = int((ulp > 0).sum())
        if rope and n != "v":
            assert ulp.numel() == 0 or int(ulp.max()) <= 1, f"{n}: {int(ulp.max())} ulp"
            assert n_diff <= MAX_ULP_FRACTION * ulp.numel(), f"{n}: {n_diff} of {ulp.numel()} differ by 1 ulp"
        else:
            assert n_diff == 0, f"{n}: {n_diff} of {ulp.numel()} fp8 values differ"
        gd, rd = getattr(got, f"{n}_descale"), getattr(ref, f"{n}_descale")
        assert torch.equal(gd, rd), f"{n}_descale differs: max abs diff {(gd - rd).abs().max().item()}"


def make_qkv(B, H_q, H_kv, S_q, S_kv, D, dtype, layout="bshd", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def one(H, S, mult):
        if layout == "bshd":
            x = torch.randn(B, S, H, D, generator=g, device="cuda").transpose(1, 2)
        elif layout == "bhsd":
            x = torch.randn(B, H, S, D, generator=g, device="cuda")
        else:
            x = torch.randn(B, H, S, 2 * D, generator=g, device="cuda")
        x = (x * mult).to(dtype)
        return x[..., ::2] if layout == "strided_d" else x

    return one(H_q, S_q, 3.0), one(H_kv, S_kv, 1.0), one(H_kv, S_kv, 0.5)


def make_rope(B_c, S, D, dtype):
    pos = torch.arange(S, dtype=torch.float32, device="cuda")[None, :, None] + 17.0 * torch.arange(
        B_c, device="cuda")[:, None, None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


CASES = [
    # B, H_q, H_kv, S_q, S_kv, D, dtype, layout, rope (B_c, cos dtype) or None
    (2, 4, 4, 37, 37, 64, torch.bfloat16, "bshd", None),
    (1, 4, 2, 5, 70, 96, torch.float16, "bhsd", None),
    (2, 4, 1, 1, 333, 128, torch.bfloat16, "bshd", None),
    (1, 4, 2, 200, 200, 256, torch.bfloat16, "bshd", None),
    (1, 4, 2, 90, 90, 64, torch.float16, "strided_d", None),
    (2, 32, 8, 1000, 1000, 128, torch.bfloat16, "bshd", None),
    (1, 32, 8, 9000, 9000, 128, torch.bfloat16, "bshd", None),  # several tiles per chunk
    (2, 4, 2, 190, 190, 64, torch.bfloat16, "bshd", (1, torch.float32)),
    (2, 4, 1, 170, 170, 96, torch.float16, "bhsd", (2, torch.bfloat16)),
    (2, 8, 8, 130, 130, 128, torch.float16, "bshd", (2, torch.float32)),
    (1, 32, 8, 4100, 4100, 128, torch.bfloat16, "bshd", (1, torch.bfloat16)),
    (1, 8, 2, 600, 600, 256, torch.bfloat16, "bshd", (1, torch.float32)),
]


@pytest.mark.parametrize("B,H_q,H_kv,S_q,S_kv,D,dtype,layout,rope", CASES)
def test_kernel_matches_reference_gpu(B, H_q, H_kv, S_q, S_kv, D, dtype, layout, rope):
    q, k, v = make_qkv(B, H_q, H_kv, S_q, S_kv, D, dtype, layout)
    cos, sin = make_rope(rope[0], S_q, D, rope[1]) if rope else (None, None)
    got = quantize_qkv_fp8(q, k, v, cos, sin)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin)
    assert_close_fp8(got, ref, rope is not None)


@pytest.mark.parametrize("rope", [None, (1, torch.float32)], ids=["plain", "rope"])
@pytest.mark.parametrize("lag_per_program", [0.5, 0.0], ids=["default-lag", "min-lag"])
def test_kernel_min_lag_gpu(monkeypatch, rope, lag_per_program):
    """With the smallest legal lag, P2s start while their group's P1s are still running, so the spin-wait
    and the acquire/release pairing are exercised. Repeated: a race would show as a result that changes
    between runs."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", lag_per_program)
    q, k, v = make_qkv(2, 8, 2, 1000, 1000, 128, torch.bfloat16, "bshd")
    cos, sin = make_rope(rope[0], 1000, 128, rope[1]) if rope else (None, None)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin)
    for _ in range(3):
        assert_close_fp8(quantize_qkv_fp8(q, k, v, cos, sin), ref, rope is not None)


def test_single_launch_many_chunks_min_lag_gpu(monkeypatch):
    """Thousands of tiles per launch at the smallest legal lag (a Llama-8B-like prefill), several times:
    the ticket schedule must neither deadlock nor race."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    q, k, v = make_qkv(1, 32, 8, 8192, 8192, 128, torch.bfloat16, "bshd", seed=3)
    ref = quantize_qkv_fp8_reference(q, k, v)
    for _ in range(5):
        assert_close_fp8(quantize_qkv_fp8(q, k, v), ref, rope=False)


def test_special_values_gpu():
    """All-zero group, NaN and +-inf: NaN stays NaN (the clamp must propagate it), inf gives NaN."""
    q, k, v = make_qkv(1, 4, 2, 66, 66, 64, torch.bfloat16, "bshd")
    q[:, 0:2] = 0.0
    k[0, 1, 3, 5] = float("nan")
    k[0, 0, 60, 2] = -float("nan")
    v[0, 0, 2, 7] = float("inf")
    v[0, 1, 1, 1] = float("-inf")
    got, ref = quantize_qkv_fp8(q, k, v), quantize_qkv_fp8_reference(q, k, v)
    assert_close_fp8(got, ref, rope=False)
    assert _is_nan(got.k[0, 3, 1, 5]) and _is_nan(got.k[0, 60, 0, 2])
    assert _is_nan(got.v[0, 2, 0, 7]) and _is_nan(got.v[0, 1, 1, 1])
    assert torch.all(got.q[:, :, 0:2].float() == 0) and torch.all(got.q_descale[:, 0] == 1.0)
