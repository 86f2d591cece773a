"""K / V centring (`smooth_k` / `smooth_v`) in the quantize kernel, interpreted on CPU.

Before the quantize kernel, `centring_sums_kernel` sums each K / V head (K after RoPE) per chunk of rows in
float64, and the launcher adds the chunks and divides by the length (`qkv._centring_means`); P1 and P2 of
the quantize kernel subtract that mean, so the scale is exactly the amax of the centred values (of a rotated
tensor: the norm bound of its centred rows). The
reference (`reference._finite_mean`) sums the elements in float64: float64 sums of float32 values are
exact unless magnitudes span ~29 binades, so the means agree bit for bit in practice, and the documented
tolerance of tests/cpu/test_quantize.py covers the rest.
"""

import pytest
import torch
import torch.nn.functional as F
from test_quantize import (  # noqa: F401 (fixture)
    _fp8_bytes,
    _interpreter_bf16_dot,
    assert_close_modes,
    make_qkv,
    make_rope,
)

from hf_fp8_attention._constants import FP8_DTYPE, FP8_MAX
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import (
    quantize_qkv_fp8,
    quantize_qkv_fp8_reference,
    quantize_qkv_fp8_varlen,
    quantize_qkv_fp8_varlen_reference,
)
from hf_fp8_attention.quantization import qkv as qkv_launcher
from hf_fp8_attention.quantization import hadamard_matrix
from hf_fp8_attention.quantization.reference import _scales

ON_CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(ON_CUDA, reason="CPU interpreter tests; the GPU versions are in tests/gpu/test_centring_gpu.py"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy on inf - inf and x / 0 in untaken branches
]


def _offsets(x: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """x (B, H, S, D) plus a per-(batch, head, channel) offset of up to +-scale: what centring removes."""
    g = torch.Generator().manual_seed(seed)
    off = (torch.rand(x.shape[0], x.shape[1], 1, x.shape[3], generator=g) * 2 - 1) * scale
    return (x.float() + off).to(x.dtype)


def _inputs(B, H_q, H_kv, S, D, dtype, seed=0):
    q, k, v = make_qkv(B, H_q, H_kv, S, S, D, dtype, "bshd", seed=seed)
    # in place on the BSHD memory, so the strides stay what Transformers hands over
    k.copy_(_offsets(k, 20.0, seed + 1))
    v.copy_(_offsets(v, 3.0, seed + 2))
    return q, k, v


def _options(smooth_k, smooth_v, hadamard="none"):
    return FP8AttentionOptions(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v)


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(_fp8_bytes(a), _fp8_bytes(b))


# ---------------------------------------------------------------- kernel vs reference

CASES = [
    # B, H_q, H_kv, S, D, dtype, rope (B_c, cos dtype) or None, smooth_k, smooth_v, hadamard
    pytest.param(1, 4, 2, 150, 64, torch.bfloat16, None, True, True, "none", id="kv-gqa-d64-3tiles"),
    pytest.param(2, 4, 1, 150, 128, torch.float16, None, True, False, "none", id="k-mqa-d128-fp16"),
    pytest.param(1, 2, 2, 100, 128, torch.bfloat16, None, False, True, "none", id="v-mha-d128"),
    pytest.param(1, 4, 2, 150, 128, torch.bfloat16, (1, torch.bfloat16), True, True, "none", id="rope-kv-d128"),
    pytest.param(2, 2, 2, 77, 96, torch.bfloat16, (2, torch.float32), True, True, "none", id="rope-kv-d96-bcB"),
    pytest.param(1, 4, 2, 90, 64, torch.bfloat16, (1, torch.float32), True, True, "qkv", id="rope-qkv-kv-d64"),
    # K rotated, V not (the default accuracy mode "qk" with centring)
    pytest.param(1, 4, 2, 150, 128, torch.bfloat16, (1, torch.bfloat16), True, True, "qk", id="rope-qk-kv-d128"),
    pytest.param(2, 4, 1, 130, 64, torch.float16, None, False, True, "qk", id="qk-v-mqa-d64"),
]


@pytest.mark.parametrize("B,H_q,H_kv,S,D,dtype,rope,smooth_k,smooth_v,hadamard", CASES)
def test_kernel_matches_reference(B, H_q, H_kv, S, D, dtype, rope, smooth_k, smooth_v, hadamard):
    """Several tiles per head, GQA/MQA, D=96 (padded half tiles), fused RoPE (the statistics are those of
    the rotated K), Hadamard: within the documented tolerance of the reference, and the centring really
    shrank the scales of the offset tensors (not K's under RoPE: rotation spreads a constant offset over
    the positions, so the rotated K's channel means are small)."""
    q, k, v = _inputs(B, H_q, H_kv, S, D, dtype)
    cos, sin = make_rope(rope[0], S, D, rope[1]) if rope else (None, None)
    options = _options(smooth_k, smooth_v, hadamard)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options)
    assert_close_modes(got, ref, rope is not None, hadamard)
    if smooth_v:  # the sequence mean, to float32 rounding
        assert torch.equal(got.v_mean, ref.v_mean)
        torch.testing.assert_close(got.v_mean, v.double().mean(dim=2).float(), rtol=0, atol=1e-5)
    plain = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=_options(False, False, hadamard))
    if smooth_k and rope is None:
        assert (got.k_descale < 0.5 * plain.k_descale).all()
    if smooth_v:
        assert (got.v_descale < 0.8 * plain.v_descale).all()


def test_unsmoothed_tensors_are_untouched():
    """smooth_k alone leaves Q and V bit-identical to mode none (their P2 loads no statistics: mean 0), and
    smooth_v alone leaves Q and K so."""
    q, k, v = _inputs(1, 4, 2, 150, 64, torch.bfloat16)
    none = quantize_qkv_fp8(q, k, v)
    for smooth_k, smooth_v, same in ((True, False, ("q", "v")), (False, True, ("q", "k"))):
        got = quantize_qkv_fp8(q, k, v, options=_options(smooth_k, smooth_v))
        for n in same:
            assert _bytes_equal(getattr(got, n), getattr(none, n)), n
            assert torch.equal(getattr(got, f"{n}_descale"), getattr(none, f"{n}_descale")), n


@pytest.mark.parametrize("S", [1, 63, 64, 65, 150])
def test_v_scale_is_the_amax_of_its_centred_values(S):
    """The spec, bit for bit given the kernel's own mean m: v_descale = max |fl(v - m)| / 448 per head and
    v = e4m3(fl(v - m) * 448 / amax) (S = 1: everything centres to 0, scale 1). K through the same
    statistics: with k = v (no RoPE) the kernel merges identical tiles in the same order, so K's bytes and
    descale equal V's. Tile edges included (BLOCK_S = 64 at D = 64)."""
    _, block_s, _, _ = qkv_launcher._tile_config(64, False)
    assert block_s == 64
    q, _, v = _inputs(2, 4, 2, S, 64, torch.bfloat16, seed=3)
    got = quantize_qkv_fp8(q, v, v, options=_options(True, True))
    centred = v.float() - got.v_mean[:, :, None, :]  # (B, H, S, D) float32, one rounding as in the kernel
    scale, descale = _scales(centred.abs().amax(dim=(2, 3)))  # the reference's rule (an all-zero head: 1)
    assert torch.equal(got.v_descale, descale)
    want = (centred * scale[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert _bytes_equal(got.v, want.transpose(1, 2).contiguous())
    assert _bytes_equal(got.k, got.v) and torch.equal(got.k_descale, got.v_descale)
    # and the mean is the sequence mean to float32 rounding
    torch.testing.assert_close(got.v_mean, v.double().mean(dim=2).float(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- varlen

def _packed(lengths, H_q, H_kv, D, seed=0):
    """Packed q (total, H_q, D), k/v (total, H_kv, D) bf16; each sequence gets its own channel offsets, so a
    mean shared across sequences (or a sequence's tail tiles counted in another's) would show."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, H_q, D, generator=g) * 3
    k = torch.randn(total, H_kv, D, generator=g)
    v = torch.randn(total, H_kv, D, generator=g) * 0.5
    start = 0
    for i, n in enumerate(lengths):
        k[start : start + n] += (torch.rand(1, H_kv, D, generator=g) * 2 - 1) * 10 * (i + 1)
        v[start : start + n] += (torch.rand(1, H_kv, D, generator=g) * 2 - 1) * 4 - 2 * i
        start += n
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), cu


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_varlen_per_sequence_statistics(monkeypatch, rope):
    """Packed sequences of 150, 7 and 70 tokens (several tiles, one short, ragged tails) at the smallest lag:
    per-sequence means and scales, as quantizing each sequence alone; v_mean per sequence."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    lengths = [150, 7, 70]
    q, k, v, cu = _packed(lengths, 4, 2, 64)
    cos = sin = None
    if rope:
        cos, sin = make_rope(1, sum(lengths), 64, torch.float32)
    args = (q, k, v, cu, cu, max(lengths), max(lengths), cos, sin)
    options = _options(True, True)
    got = quantize_qkv_fp8_varlen(*args, options=options)
    ref = quantize_qkv_fp8_varlen_reference(*args, options=options)
    assert_close_modes(got, ref, rope, "none")
    assert got.v_mean.shape == (3, 2, 64)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        torch.testing.assert_close(got.v_mean[i], v[a:b].double().mean(0).float(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- non-finite inputs

BAD = [  # (tensor, (b, h, s, d), value) in BHSD indices
    ("k", (0, 1, 3, 5), float("nan")),
    ("k", (0, 0, 140, 2), float("inf")),
    ("v", (0, 0, 2, 7), float("-inf")),
    ("v", (0, 1, 70, 1), float("nan")),
]


def test_non_finite_stay_local():
    """NaN / +-inf count in no statistic (sum, min, max): the result equals the same input with those
    elements zeroed (whose zeros add nothing to the sums and, here, are no channel's extreme), bit for bit,
    except that the bad elements are NaN. A channel with no finite element at all (v head 1, channel 9)
    gets mean 0 and sets no scale."""
    q, k, v = make_qkv(1, 4, 2, 150, 150, 64, torch.bfloat16, "bshd", seed=5)
    v += 0.5  # an offset small enough that 0 stays inside every channel's range
    tensors = {"k": k, "v": v}
    for name, idx, _ in BAD:
        tensors[name][idx] = 0.0
        b, h, _, d = idx
        channel = tensors[name][b, h, :, d]
        assert channel.min() < 0 < channel.max(), "the zeroed element must be no extreme of its channel"
    v[0, 1, :, 9] = 0.0
    options = _options(True, True)
    clean = quantize_qkv_fp8(q, k, v, options=options)
    for name, idx, value in BAD:
        tensors[name][idx] = value
    v[0, 1, :, 9] = float("nan")
    got = quantize_qkv_fp8(q, k, v, options=options)
    for name in ("k", "v"):
        g, c = _fp8_bytes(getattr(got, name)).clone(), _fp8_bytes(getattr(clean, name)).clone()
        bad = [idx for n, idx, _ in BAD if n == name]
        for b, h, s, d in bad:
            assert g[b, s, h, d] == 0x7F, (name, (b, h, s, d))
            g[b, s, h, d] = c[b, s, h, d]
        if name == "v":
            assert (g[0, :, 1, 9] == 0x7F).all()
            g[0, :, 1, 9] = c[0, :, 1, 9]
        assert torch.equal(g, c), name
        assert torch.equal(getattr(got, f"{name}_descale"), getattr(clean, f"{name}_descale")), name
    assert torch.isfinite(got.v_mean).all() and got.v_mean[0, 1, 9] == 0.0
    mean = got.v_mean.clone()
    mean[0, 1, 9] = clean.v_mean[0, 1, 9]
    assert torch.equal(mean, clean.v_mean)
    assert_close_modes(got, quantize_qkv_fp8_reference(q, k, v, options=options), False, "none")


def test_non_finite_with_rope_match_reference():
    """With fused RoPE a bad K element spoils its rotation partner too (channel c +- D/2, same row): NaN
    positions and everything else as the reference."""
    q, k, v = _inputs(1, 4, 2, 150, 64, torch.bfloat16, seed=6)
    for name, idx, value in BAD:
        {"k": k, "v": v}[name][idx] = value
    cos, sin = make_rope(1, 150, 64, torch.bfloat16)
    options = _options(True, True)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
    assert _fp8_bytes(got.k)[0, 3, 1, 5 + 32] == 0x7F  # the partner of k[0, 1, 3, 5]
    assert_close_modes(got, quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options), True, "none")


# ---------------------------------------------------------------- means over several chunks


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_means_over_several_chunks(monkeypatch, rope):
    """Sequences longer than one chunk of `centring_sums_kernel` (chunk shrunk to 64 rows: 3 chunks and a
    ragged one), rotated K and V: the reference's means bit for bit, its fp8 values and scales."""
    monkeypatch.setattr(qkv_launcher, "_CENTRING_CHUNK", 64)
    S = 3 * 64 + 37
    q, k, v = _inputs(1, 2, 1, S, 64, torch.bfloat16, seed=7)
    cos, sin = make_rope(1, S, 64, torch.float32) if rope else (None, None)
    options = _options(True, True, "qkv")
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=options)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options)
    assert_close_modes(got, ref, rope, "qkv")
    assert torch.equal(got.v_mean, ref.v_mean)


# ---------------------------------------------------------------- why centring is exact

def test_centring_by_any_channel_constant_is_exact_in_float64():
    """Centring needs no particular constant: softmax(q (k - c)^T) = softmax(q k^T) for any per-channel c
    (a per-row shift of the scores), and P (v - c) + c = P v (rows of P sum to 1). So a mean that differs
    from the reference's in its last bits (summation order) or that leaves non-finite elements out still
    centres exactly; only the fp8 rounding sees the difference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 96, 64, generator=g, dtype=torch.float64) for _ in range(3))
    k = k + 7.0 * torch.randn(2, 4, 1, 64, generator=g, dtype=torch.float64)
    v = v + 3.0
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for c_k, c_v in ((k.mean(2, keepdim=True), v.mean(2, keepdim=True)),
                     (torch.randn(2, 4, 1, 64, generator=g, dtype=torch.float64) * 5,
                      torch.randn(2, 4, 1, 64, generator=g, dtype=torch.float64) * 5)):
        out = F.scaled_dot_product_attention(q, k - c_k, v - c_v, is_causal=True) + c_v
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_v_mean_kernel_equals_torch_add(dtype):
    """The CUDA add-back (`qkv.add_v_mean`, interpreted here) equals torch's broadcast add of the float32 mean
    (one rounding to the output dtype), bit for bit: GQA 3 query heads per KV head, S not a multiple of its row block,
    H_q * D not a multiple of its column block."""
    g = torch.Generator().manual_seed(0)
    B, S, H_kv, G, D = 2, 37, 2, 3, 96
    out = (torch.randn(B, S, H_kv * G, D, generator=g) * 2).to(dtype)
    mean = torch.randn(B, H_kv, D, generator=g) * 5
    want = out.clone().add_(mean.repeat_interleave(G, dim=1)[:, None])
    got = qkv_launcher.add_v_mean(out.clone(), mean)
    assert torch.equal(got, want)


@pytest.mark.parametrize("hadamard", ["none", "qkv"])
def test_add_back_removes_the_mean_quantization_error(hadamard):
    """smooth_v's add-back (`QuantizedQKV.v_add`) is V's mean less the mean of the dequantized centred V (in
    V's basis): the kernel path's equals the reference's bit for bit, and an output that averages over every
    key (uniform attention, where the add-back matters most) comes out closer to the exact mean of V than
    with v_mean added back (which leaves the mean e4m3 error of the centred bf16 V in every row)."""
    q, k, v = _inputs(2, 4, 2, 300, 64, torch.bfloat16, seed=9)
    options = _options(False, True, hadamard)
    got = quantize_qkv_fp8(q, k, v, options=options)
    ref = quantize_qkv_fp8_reference(q, k, v, options=options)
    assert torch.equal(got.v_add, ref.v_add) and torch.equal(got.v_mean, ref.v_mean)
    h = torch.eye(64) if hadamard == "none" else hadamard_matrix(64)
    deq = (got.v.float() * got.v_descale[:, None, :, None]).transpose(1, 2)  # (B, H, S, D), V's centred basis
    uniform = deq.mean(dim=2) @ h  # attention that weighs every key alike, rotated back
    exact = v.double().mean(dim=2).float()
    err_add = (uniform + got.v_add - exact).abs().max()
    err_mean = (uniform + got.v_mean - exact).abs().max()
    assert err_add < 1e-5 and err_add < 0.1 * err_mean, (err_add, err_mean)
