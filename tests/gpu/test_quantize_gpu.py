"""FP8 Q/K/V quantization on the GPU: compiled Triton kernels vs the torch reference on the same device.

The kernels are compiled with enable_fp_fusion=False, so the RoPE mul/mul/add should round exactly like the
torch reference; still, at most one fp8 ulp is tolerated on a tiny fraction of RoPE elements in case the
backend contracts anyway. Descales must be identical, and inputs without RoPE bit-identical.

Fused accuracy modes (hadamard, smooth_k, smooth_v) change the fp32 summation order (the rotation's sums, tile-wise
means): at most MODES_ULP_FRACTION of a tensor's fp8 values one ulp off, descales to 1e-6 relative (1e-4
for RoPE-rotated Hadamard tensors, whose fp32 values enter the dot as bf16 hi + lo), as in the CPU tests.

Timings: scripts/bench_quantize.py (--modes for the accuracy modes).
"""

import os

import pytest
import torch

from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention._constants import FP8_DTYPE, FP8_MAX
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


def _ulp_diffs(got, ref, n: str) -> tuple[torch.Tensor, int]:
    """Checks layout and NaN positions of fp8 tensor ``n``; returns |ulp| of the finite values and how many differ."""
    g, r = getattr(got, n), getattr(ref, n)
    assert g.dtype == FP8_DTYPE and g.shape == r.shape and g.is_contiguous(), n
    assert torch.equal(_is_nan(g), _is_nan(r)), f"{n}: NaN positions differ"
    ulp = (_ordinal(g) - _ordinal(r)).abs()[~_is_nan(r)]
    return ulp, int((ulp > 0).sum())


def assert_close_fp8(got, ref, rope: bool) -> None:
    for n in NAMES:
        ulp, n_diff = _ulp_diffs(got, ref, n)
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


@pytest.mark.usefixtures("quantize_path")
@pytest.mark.parametrize("B,H_q,H_kv,S_q,S_kv,D,dtype,layout,rope", CASES)
def test_kernel_matches_reference_gpu(B, H_q, H_kv, S_q, S_kv, D, dtype, layout, rope):
    q, k, v = make_qkv(B, H_q, H_kv, S_q, S_kv, D, dtype, layout)
    cos, sin = make_rope(rope[0], S_q, D, rope[1]) if rope else (None, None)
    got = quantize_qkv_fp8(q, k, v, cos, sin)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin)
    assert_close_fp8(got, ref, rope is not None)


@pytest.mark.parametrize("rope", [None, (1, torch.float32)], ids=["plain", "rope"])
@pytest.mark.parametrize("lag_per_program", [0.5, 0.0], ids=["default-lag", "min-lag"])
def test_kernel_min_lag_gpu(monkeypatch, persistent_path, rope, lag_per_program):
    """With the smallest legal lag, P2s start while their group's P1s are still running, so the spin-wait
    and the acquire/release pairing are exercised. Repeated: a race would show as a result that changes
    between runs."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", lag_per_program)
    q, k, v = make_qkv(2, 8, 2, 1000, 1000, 128, torch.bfloat16, "bshd")
    cos, sin = make_rope(rope[0], 1000, 128, rope[1]) if rope else (None, None)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin)
    for _ in range(3):
        assert_close_fp8(quantize_qkv_fp8(q, k, v, cos, sin), ref, rope is not None)


def test_single_launch_many_chunks_min_lag_gpu(monkeypatch, persistent_path):
    """Thousands of tiles per launch at the smallest legal lag (a Llama-8B-like prefill), several times:
    the ticket schedule must neither deadlock nor race."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    q, k, v = make_qkv(1, 32, 8, 8192, 8192, 128, torch.bfloat16, "bshd", seed=3)
    ref = quantize_qkv_fp8_reference(q, k, v)
    for _ in range(5):
        assert_close_fp8(quantize_qkv_fp8(q, k, v), ref, rope=False)


def test_special_values_gpu(quantize_path):
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


# ---------------------------------------------------------------- fused accuracy modes

MODES_ULP_FRACTION = 5e-3
DESCALE_RTOL = 1e-6
ROPE_HADAMARD_DESCALE_RTOL = 1e-4
V_MEAN_ATOL = 1e-6  # relative to the head's max |v - mean|


def assert_close_modes(got, ref, rope: bool, hadamard: str) -> None:
    for n in NAMES:
        ulp, n_diff = _ulp_diffs(got, ref, n)
        assert ulp.numel() == 0 or int(ulp.max()) <= 1, f"{n}: {int(ulp.max())} ulp"
        assert n_diff <= MODES_ULP_FRACTION * ulp.numel(), f"{n}: {n_diff} of {ulp.numel()} differ by 1 ulp"
        gd, rd = getattr(got, f"{n}_descale"), getattr(ref, f"{n}_descale")
        rtol = ROPE_HADAMARD_DESCALE_RTOL if (rope and hadamard in ("qk", "qkv") and n != "v") else DESCALE_RTOL
        torch.testing.assert_close(gd, rd, rtol=rtol, atol=0, msg=f"{n}_descale")
    assert (got.v_mean is None) == (ref.v_mean is None)
    if ref.v_mean is not None:
        scale = ref.v_descale[..., None] * FP8_MAX
        assert ((got.v_mean - ref.v_mean).abs() <= V_MEAN_ATOL * scale).all(), "v_mean"


MODE_CASES = [
    # B, H_q, H_kv, S, D, dtype, rope (B_c, cos dtype) or None, hadamard, smooth_k, smooth_v
    (2, 4, 2, 190, 64, torch.bfloat16, None, "qkv", False, False),
    (1, 8, 8, 300, 128, torch.float16, None, "qkv", False, False),
    (1, 4, 2, 200, 256, torch.bfloat16, None, "v_only", False, True),
    (2, 4, 1, 333, 96, torch.bfloat16, None, "none", True, True),
    (1, 32, 8, 4096, 128, torch.bfloat16, None, "qkv", True, False),
    (1, 32, 8, 4096, 128, torch.bfloat16, None, "v_only", False, False),
    (1, 32, 8, 4096, 128, torch.bfloat16, None, "none", True, False),
    (1, 32, 8, 4096, 128, torch.bfloat16, (1, torch.bfloat16), "qkv", True, False),
    (2, 8, 2, 1000, 128, torch.float16, (2, torch.float32), "qkv", True, True),
    (1, 8, 2, 600, 64, torch.bfloat16, (1, torch.float32), "v_only", False, True),
    (1, 32, 8, 4096, 128, torch.bfloat16, (1, torch.bfloat16), "qk", False, True),
]


@pytest.mark.usefixtures("quantize_path")
@pytest.mark.parametrize("B,H_q,H_kv,S,D,dtype,rope,hadamard,smooth_k,smooth_v", MODE_CASES)
def test_kernel_modes_match_reference_gpu(B, H_q, H_kv, S, D, dtype, rope, hadamard, smooth_k, smooth_v):
    q, k, v = make_qkv(B, H_q, H_kv, S, S, D, dtype)
    cos, sin = make_rope(rope[0], S, D, rope[1]) if rope else (None, None)
    kw = dict(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=FP8AttentionOptions(**kw))
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=FP8AttentionOptions(**kw))
    assert_close_modes(got, ref, rope is not None, hadamard)


@pytest.mark.parametrize("one_tile_config", [(8192, 8, True), (4096, 4, True), (8192, 8, False)],
                         ids=lambda c: "x".join(map(str, c)))
def test_kernel_modes_min_lag_gpu(monkeypatch, persistent_path, one_tile_config):
    """Smoothing at the smallest legal lag, repeated: P2s reach groups whose statistics are not out yet, and
    the reducer (the group's last P1) must publish them; a race or a deadlock would show here. Also runs
    each `_ONE_TILE_CONFIG` that scripts/bench_quantize.py --modes compares."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    monkeypatch.setattr(qkv_launcher, "_ONE_TILE_CONFIG", one_tile_config)
    q, k, v = make_qkv(1, 32, 8, 8192, 8192, 128, torch.bfloat16, "bshd", seed=5)
    cos, sin = make_rope(1, 8192, 128, torch.bfloat16)
    for rope in (False, True):
        rc = (cos, sin) if rope else (None, None)
        kw = dict(hadamard="qkv", smooth_k=True, smooth_v=True)
        ref = quantize_qkv_fp8_reference(q, k, v, *rc, options=FP8AttentionOptions(**kw))
        for _ in range(3):
            assert_close_modes(quantize_qkv_fp8(q, k, v, *rc, options=FP8AttentionOptions(**kw)), ref, rope, "qkv")
        # plain RoPE stays bit-exact up to the documented 1-ulp tolerance under every config
        if rope:
            assert_close_fp8(quantize_qkv_fp8(q, k, v, cos, sin), quantize_qkv_fp8_reference(q, k, v, cos, sin), True)


def test_fp8_sdpa_fused_modes_gpu(monkeypatch):
    """The pipeline quantizes CUDA calls with accuracy modes with the kernel (through the reference attention
    backend here): the output is as close to float32 SDPA as with reference-quantized Q/K/V."""
    import torch.nn.functional as F

    from hf_fp8_attention.attention import fp8_attention
    from hf_fp8_attention.dispatch import plan_attention

    q, k, v = make_qkv(1, 8, 2, 512, 512, 128, torch.bfloat16)
    exact = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1),
                                           v.float().repeat_interleave(4, 1), is_causal=True).transpose(1, 2)
    for hadamard, smooth_k, smooth_v in (("qkv", True, True), ("v_only", False, True), ("none", True, False)):
        options = FP8AttentionOptions(hadamard, smooth_k, smooth_v)
        assert plan_attention(q.device, "reference", options).quantizer == "triton"
        args = (q, k, v, None, None, None, None, None, None, True, 128**-0.5, "reference")
        out = fp8_attention(*args, "triton", options)
        out_ref = fp8_attention(*args, "reference", options)
        err = ((out.float() - exact).norm() / exact.norm()).item()
        err_ref = ((out_ref.float() - exact).norm() / exact.norm()).item()
        assert err <= 1.05 * err_ref + 1e-4, f"{hadamard}, smooth_k={smooth_k}, smooth_v={smooth_v}: {err} vs {err_ref}"


@pytest.mark.parametrize("S,rope", [(4096, True), (1000, False)], ids=["4k-rope", "1000-plain"])
def test_keys_contiguous_v_gpu(S, rope, quantize_path):
    """v_keys_contiguous on the GPU: V's codes in (B, H_kv, D, S) memory equal the BSHD launch's byte for byte
    (GQA 32/8, D 128, B 2), and fp8_sdpa's triton path gives the output the backend's own copy of a BSHD V
    gives (at 4k the pipeline asks the quantizer for keys-contiguous V; at 1000 keys neither path does)."""
    import dataclasses

    import hf_fp8_attention.attention as attention
    import hf_fp8_attention.backends as backends
    from hf_fp8_attention import fp8_sdpa
    from hf_fp8_attention.backends import triton as triton_backend
    from hf_fp8_attention.metrics import sqnr_db

    g = torch.Generator(device="cuda").manual_seed(S)
    q = torch.randn(2, S, 32, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(2, S, 8, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
    v = (torch.randn(2, S, 8, 128, device="cuda", generator=g) + 1).bfloat16().transpose(1, 2)
    cos = sin = None
    if rope:
        ang = torch.arange(S, device="cuda")[:, None] * 0.01 * torch.arange(1, 129, device="cuda")[None]
        cos, sin = ang.cos()[None].bfloat16(), ang.sin()[None].bfloat16()
    bshd = quantize_qkv_fp8(q, k, v, cos, sin)
    got = quantize_qkv_fp8(q, k, v, cos, sin, v_keys_contiguous=True)
    assert got.v.stride(1) == 1 and got.v.shape == bshd.v.shape
    assert torch.equal(got.v.view(torch.uint8), bshd.v.view(torch.uint8))
    assert torch.equal(got.v_descale, bshd.v_descale)
    asked = []
    quantize = attention.quantize
    record = backends.REGISTRY["triton"]
    try:
        attention.quantize = lambda *a: asked.append(tuple(a[8:])) or quantize(*a)
        fused = fp8_sdpa(q, k, v, is_causal=True, backend="triton", cos=cos, sin=sin)
        # the triton record without its V layout: BSHD V from the quantizer, copied by the backend
        backends.REGISTRY["triton"] = dataclasses.replace(record, v_keys_contiguous=None)
        copied = fp8_sdpa(q, k, v, is_causal=True, backend="triton", cos=cos, sin=sin)
    finally:
        attention.quantize, backends.REGISTRY["triton"] = quantize, record
    # what the pipeline asked the quantizer for: (keys-contiguous V, in wgmma key order); the wgmma order where
    # the call runs the Gluon kernel's default route (Hopper, 4k keys); the record without its V layout: neither
    keys = S * 128 >= 2048 * 128
    hopper_gluon = torch.cuda.get_device_capability()[0] == 9 and triton_backend.gluon_unavailable() is None
    routed = os.environ.get(triton_backend.KERNEL_ENV, "auto") in triton_backend._V_WGMMA_ROUTES
    wgmma = keys and hopper_gluon and routed
    assert asked == [(keys, wgmma), (False, False)]
    if wgmma:  # the same products, summed in another order inside the P.V MMA
        assert sqnr_db(fused.float(), copied.float()) > 80.0
    else:
        assert torch.equal(fused, copied)


@pytest.mark.parametrize("S,rope", [(4096, True), (1040, False)], ids=["4k-rope", "1040-plain"])
def test_v_wgmma_order_gpu(S, rope, quantize_path):
    """v_wgmma_order on the GPU (both quantize paths): V's codes are the keys-contiguous launch's with the keys
    reordered as `wgmma_key_order` does, byte for byte, and `natural_key_order` gives them back (GQA 32/8,
    D 128, B 2; 1040 keys: a tail tile with whole 16s of keys)."""
    from hf_fp8_attention.quantization.quantized import natural_key_order, wgmma_key_order

    q, k, v = make_qkv(2, 32, 8, S, S, 128, torch.bfloat16, seed=S)
    cos, sin = make_rope(1, S, 128, torch.bfloat16) if rope else (None, None)
    keys = quantize_qkv_fp8(q, k, v, cos, sin, v_keys_contiguous=True)
    got = quantize_qkv_fp8(q, k, v, cos, sin, v_keys_contiguous=True, v_wgmma_order=True)
    assert got.v_wgmma_order and got.v.stride() == keys.v.stride()
    assert torch.equal(got.v.view(torch.uint8), wgmma_key_order(keys.v).view(torch.uint8))
    assert torch.equal(natural_key_order(got.v).view(torch.uint8), keys.v.view(torch.uint8))
    assert torch.equal(got.v_descale, keys.v_descale) and torch.equal(got.q.view(torch.uint8), keys.q.view(torch.uint8))


@pytest.mark.parametrize("mode", ["rope+qk", "rope", "none", "qk+smooth_v"])
def test_split_path_equals_persistent_gpu(monkeypatch, mode):
    """The split path (two launches) against the persistent two-pass kernel on a Llama-8B-like prefill (GQA 32/8,
    16k): the same descales and codes, bit for bit but for the rotation's summation order with Hadamard (then at most
    one ulp on MODES_ULP_FRACTION of a tensor's codes) and smooth_v's add-back; twice (a race in the amax
    merge would show as a difference between calls)."""
    q, k, v = make_qkv(1, 32, 8, 16384, 16384, 128, torch.bfloat16, seed=7)
    cos, sin = make_rope(1, 16384, 128, torch.bfloat16) if mode.startswith("rope") else (None, None)
    options = FP8AttentionOptions(hadamard="qk" if "qk" in mode else "none", smooth_v="smooth_v" in mode)
    monkeypatch.setattr(qkv_launcher, "_SPLIT_MIN_ELEMENTS", 1 << 62)
    persistent = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
    monkeypatch.setattr(qkv_launcher, "_SPLIT_MIN_ELEMENTS", 0)
    for _ in range(2):
        split = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
        if "qk" in mode:
            assert_close_modes(split, persistent, False, "qk")
        else:
            assert_close_fp8(split, persistent, False)
        assert (split.v_add is None) == (persistent.v_add is None)
        if persistent.v_add is not None:  # V is not rotated here: its codes, hence the add-back, are identical
            assert torch.equal(split.v_add, persistent.v_add)
