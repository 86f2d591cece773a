"""FP8 Q/K/V quantization: Triton kernels (interpreted on CPU) vs the torch reference, bit for bit, and
properties of the reference. Shapes are tiny because the Triton interpreter is slow."""

import os

import pytest
import torch

from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention._constants import FP8_DTYPE, FP8_MAX
from hf_fp8_attention.quantization import (
    QuantizedQKV,
    apply_rope_reference,
    quantize_qkv_fp8,
    quantize_qkv_fp8_reference,
)
from hf_fp8_attention.quantization import qkv as qkv_launcher

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
NAMES = ("q", "k", "v")


def _fp8_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 bytes with every NaN encoding (0x7F, 0xFF) mapped to 0x7F: NaN sign is not part of the contract."""
    b = t.view(torch.uint8)
    return torch.where((b & 0x7F) == 0x7F, torch.full_like(b, 0x7F), b)


def assert_identical(got: QuantizedQKV, ref: QuantizedQKV) -> None:
    for n in NAMES:
        g, r = getattr(got, n), getattr(ref, n)
        assert g.dtype == FP8_DTYPE and g.shape == r.shape and g.is_contiguous(), n
        mismatch = (_fp8_bytes(g) != _fp8_bytes(r)).sum().item()
        assert mismatch == 0, f"{n}: {mismatch} of {g.numel()} fp8 bytes differ"
        gd, rd = getattr(got, f"{n}_descale"), getattr(ref, f"{n}_descale")
        assert gd.dtype == torch.float32 and gd.shape == rd.shape, n
        assert torch.equal(gd, rd), f"{n}_descale: {gd} vs {rd}"


def make_qkv(B, H_q, H_kv, S_q, S_kv, D, dtype, layout="bshd", seed=0):
    """BHSD tensors. layout 'bshd': memory (B, S, H, D) viewed as BHSD (what Transformers hands over);
    'bhsd': contiguous; 'strided_d': stride(-1) == 2."""
    g = torch.Generator().manual_seed(seed)

    def one(H, S, mult):
        if layout == "bshd":
            x = torch.randn(B, S, H, D, generator=g).transpose(1, 2)
        elif layout == "bhsd":
            x = torch.randn(B, H, S, D, generator=g)
        else:
            x = torch.randn(B, H, S, 2 * D, generator=g)
        x = (x * mult).to(dtype)
        return x[..., ::2] if layout == "strided_d" else x

    return one(H_q, S_q, 3.0), one(H_kv, S_kv, 1.0), one(H_kv, S_kv, 0.5)


def make_rope(B_c, S, D, dtype, seed=1):
    """HF-style cos/sin (B_c, S, D): the frequencies repeated over the two halves."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(S, dtype=torch.float32)[None, :, None] + torch.randint(0, 1000, (B_c, 1, 1), generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _patch_interpreter_bf16_dot():
    """The interpreter's tl.dot (`InterpreterBuilder.create_dot`, triton 3.9) multiplies bf16 operands as
    their uint16 bit patterns; widen them to float32 first (exact) so that the Hadamard dot runs like the
    GPU's. Returns the function that undoes the patch (None if nothing was patched)."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None:
        return None

    def widen(h):
        if h.dtype == tl.bfloat16:  # a TensorHandle's dtype is the scalar type
            bits = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(bits, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    return lambda: setattr(builder, "create_dot", original)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    undo = _patch_interpreter_bf16_dot() if os.environ.get("TRITON_INTERPRET") == "1" else None
    yield
    if undo is not None:
        undo()


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


# ---------------------------------------------------------------- kernel == reference

KERNEL_CASES = [
    # B, H_q, H_kv, S_q, S_kv, D, dtype, layout, rope (B_c, cos dtype) or None
    pytest.param(2, 2, 2, 37, 37, 64, torch.bfloat16, "bshd", None, id="mha-d64-bf16-bshd"),
    pytest.param(1, 4, 2, 5, 70, 96, torch.float16, "bhsd", None, id="gqa-d96-fp16-bhsd-sq!=skv"),
    pytest.param(2, 4, 1, 1, 33, 128, torch.bfloat16, "bshd", None, id="mqa-d128-bf16-decode"),
    pytest.param(1, 4, 2, 20, 20, 256, torch.bfloat16, "bshd", None, id="gqa-d256-bf16"),
    pytest.param(1, 4, 2, 9, 9, 64, torch.float16, "strided_d", None, id="gqa-d64-fp16-stride_d2"),
    pytest.param(2, 4, 2, 19, 19, 64, torch.bfloat16, "bshd", (1, torch.float32), id="rope-bc1-fp32-gqa-d64"),
    pytest.param(2, 4, 1, 17, 17, 96, torch.float16, "bhsd", (2, torch.bfloat16), id="rope-bcB-bf16-mqa-d96"),
    pytest.param(2, 2, 2, 13, 13, 128, torch.float16, "bshd", (2, torch.float32), id="rope-bcB-fp32-mha-d128"),
    pytest.param(1, 4, 2, 11, 11, 96, torch.bfloat16, "bshd", (1, torch.bfloat16), id="rope-bc1-bf16-gqa-d96"),
    pytest.param(1, 9, 3, 21, 21, 64, torch.bfloat16, "bshd", (1, torch.bfloat16), id="rope-gqa3-odd-groups-d64"),
]


def _run_case(B, H_q, H_kv, S_q, S_kv, D, dtype, layout, rope, device):
    q, k, v = make_qkv(B, H_q, H_kv, S_q, S_kv, D, dtype, layout)
    cos, sin = make_rope(rope[0], S_q, D, rope[1]) if rope else (None, None)
    q, k, v, cos, sin = _to(device, q, k, v, cos, sin)
    return quantize_qkv_fp8(q, k, v, cos, sin), quantize_qkv_fp8_reference(q, k, v, cos, sin)


@pytest.mark.skipif(ON_CUDA, reason="GPU equality lives in tests/gpu/test_quantize_gpu.py")
@pytest.mark.usefixtures("quantize_path")
@pytest.mark.parametrize("B,H_q,H_kv,S_q,S_kv,D,dtype,layout,rope", KERNEL_CASES)
def test_kernel_matches_reference(B, H_q, H_kv, S_q, S_kv, D, dtype, layout, rope):
    got, ref = _run_case(B, H_q, H_kv, S_q, S_kv, D, dtype, layout, rope, DEVICE)
    assert_identical(got, ref)


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
@pytest.mark.parametrize("rope", [None, (1, torch.float32)], ids=["plain", "rope"])
@pytest.mark.parametrize("chunk,interleave", [(1, False), (2, False), (1, True), (2, True)],
                         ids=["tile-items", "chunk2", "interleaved", "chunk2-interleaved"])
def test_kernel_multi_tile_min_lag(monkeypatch, persistent_path, rope, chunk, interleave):
    """Several tiles per head with a ragged last one (and, in chunks of 2 tiles, a ragged last item), GQA
    groups spanning heads, both item orders, and the smallest legal lag (the largest group's item count,
    a KV head's q and k items when interleaved), so tickets with a P1 only, with a P1 and a P2, and with a
    P2 only all occur."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    monkeypatch.setattr(qkv_launcher, "_CHUNK_SHORT", chunk)
    monkeypatch.setattr(qkv_launcher, "_INTERLEAVE", interleave)
    _, block_s, _, _ = qkv_launcher._tile_config(64, rope is not None)
    S = 2 * block_s + 20  # 3 tiles per head
    n_chunks = -(-3 // chunk)
    lag = qkv_launcher._schedule(1, 4, 2, S, S, block_s, 1, chunk, interleave)[1]
    assert lag == (3 if interleave else 2) * n_chunks  # G = 2 q heads (+ the k head) x the chunks
    got, ref = _run_case(1, 4, 2, S, S, 64, torch.bfloat16, "bshd", rope, DEVICE)
    assert_identical(got, ref)


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
@pytest.mark.parametrize("S_q,S_kv", [(20, 150), (150, 20)], ids=["short-q", "short-kv"])
@pytest.mark.parametrize("interleave", [False, True], ids=["tensor-major", "interleaved"])
def test_item_orders_unequal_lengths(monkeypatch, persistent_path, S_q, S_kv, interleave):
    """q and k/v of different lengths (no RoPE), chunks of 2 tiles: q and k chunk counts differ, so in the
    interleaved order the shorter tensor's chunks past its end are empty items that still count for their
    group, at the smallest lag."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    monkeypatch.setattr(qkv_launcher, "_CHUNK_SHORT", 2)
    monkeypatch.setattr(qkv_launcher, "_INTERLEAVE", interleave)
    got, ref = _run_case(2, 4, 2, S_q, S_kv, 64, torch.bfloat16, "bshd", None, DEVICE)
    assert_identical(got, ref)


def test_split_wanted():
    """The split path takes per-(batch, KV head) e4m3 scales from `_SPLIT_MIN_ELEMENTS` elements on, and RoPE only where
    q and k go through the RoPE kernel: not with block scales (int8 included), nor packed sequences whose q and
    k offsets are separate tensors."""
    rows = qkv_launcher._SPLIT_MIN_ELEMENTS  # the elements of q, k and v together
    plain, rope = FP8AttentionOptions(hadamard="none", smooth_v=False), ("cos", "sin", (0, 0, 0), (0, 0, 0))
    cu = torch.zeros(3, dtype=torch.int32)
    assert qkv_launcher._split_wanted(plain, None, None, 128, rows)
    assert qkv_launcher._split_wanted(plain, rope, None, 128, rows)
    assert qkv_launcher._split_wanted(plain, rope, (cu, cu, 5, 5), 128, rows)
    assert not qkv_launcher._split_wanted(plain, rope, (cu, cu.clone(), 5, 5), 128, rows)
    assert qkv_launcher._split_wanted(plain, None, (cu, cu.clone(), 5, 5), 128, rows)
    if rows > 0:
        assert not qkv_launcher._split_wanted(plain, None, None, 128, rows - 1)
    for block in ({"qk_scales": "block"}, {"qk_format": "int8"}):
        assert not qkv_launcher._split_wanted(FP8AttentionOptions(**block, smooth_v=False), None, None, 128, rows)


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
@pytest.mark.parametrize("rope", [None, (1, torch.float32)], ids=["plain", "rope"])
def test_split_path_multi_tile_gqa(monkeypatch, rope):
    """The split path over several 128-row tiles per head with a ragged last one, GQA groups whose q heads
    span two programs of the RoPE kernel (G = 3, 4 heads per program: its in-register group merge flushes
    mid-program, and two programs merge into one group), two batches: the reference's codes and descales."""
    monkeypatch.setattr(qkv_launcher, "_SPLIT_MIN_ELEMENTS", 0)
    monkeypatch.setitem(qkv_launcher._SPLIT_ROPE_TILES, 32, (16, 4, 4))
    got, ref = _run_case(2, 6, 2, 300, 300, 64, torch.bfloat16, "bshd", rope, DEVICE)
    assert_identical(got, ref)


def test_schedule_items_and_lag():
    """The launcher's item count matches the kernel's orders (programs = items when there are fewer items than
    slots), and its LAG covers the largest group: GQA 32/8 at 64k, 32-row tiles, 8 per item."""
    # B=2, H 4/2, S_q 100, S_kv 300, 32-row tiles in items of 2: 2 and 5 chunks per head
    assert qkv_launcher._schedule(2, 4, 2, 100, 300, 32, 100, 2, False)[0] == 2 * 4 * 2 + 2 * 2 * 2 * 5
    assert qkv_launcher._schedule(2, 4, 2, 100, 300, 32, 100, 2, True)[0] == 2 * 2 * ((2 + 1) * 5 + 5)
    n_programs, lag = qkv_launcher._schedule(1, 32, 8, 65536, 65536, 32, 132, 8, False)
    assert n_programs == 132 * qkv_launcher._PROGRAMS_PER_SM
    assert lag == 4 * 256 + int(qkv_launcher._LAG_PER_PROGRAM * n_programs)  # a q group: 4 heads x 256 items
    _, lag_i = qkv_launcher._schedule(1, 32, 8, 65536, 65536, 32, 132, 8, True)
    assert lag_i == 5 * 256 + int(qkv_launcher._LAG_PER_PROGRAM * n_programs)  # + the k head


# ---------------------------------------------------------------- fused accuracy modes ~= reference

# Hadamard and smoothing change summation orders (the rotation's sums; the rows' norms; chunked float64 means), so a
# result near an e4m3 rounding boundary may land one ulp away. Tolerances: at most this fraction of the fp8
# values of a tensor one ulp off (none further), and descales to 1e-6 relative; rotated tensors' descales
# (powers of two / 448 from the norm bound, equal unless a norm sits within an ulp of a power of two) keep
# the looser ROPE_HADAMARD_DESCALE_RTOL they had when RoPE'd rows went through the dot as bf16 hi + lo.
MAX_ULP_FRACTION = 5e-3
DESCALE_RTOL = 1e-6
ROPE_HADAMARD_DESCALE_RTOL = 1e-4
V_MEAN_ATOL = 1e-6  # relative to the max |v| of the head; the mean's summation order differs


def _ordinal(t: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3fn bytes -> integers ordered like the values (sign-magnitude to two's complement)."""
    b = t.view(torch.uint8).to(torch.int16)
    mag = b & 0x7F
    return torch.where(b >= 0x80, -mag, mag)


def assert_close_modes(got: QuantizedQKV, ref: QuantizedQKV, rope: bool, hadamard: str) -> None:
    for n in NAMES:
        g, r = getattr(got, n), getattr(ref, n)
        assert g.dtype == FP8_DTYPE and g.shape == r.shape and g.is_contiguous(), n
        assert torch.equal((_fp8_bytes(g) == 0x7F), (_fp8_bytes(r) == 0x7F)), f"{n}: NaN positions differ"
        ulp = (_ordinal(g) - _ordinal(r)).abs()
        n_diff = int((ulp > 0).sum())
        assert int(ulp.max()) <= 1, f"{n}: {int(ulp.max())} ulp"
        assert n_diff <= MAX_ULP_FRACTION * ulp.numel(), f"{n}: {n_diff} of {ulp.numel()} differ by 1 ulp"
        gd, rd = getattr(got, f"{n}_descale"), getattr(ref, f"{n}_descale")
        rotated = rope and hadamard in ("qk", "qkv") and n != "v"
        rtol = ROPE_HADAMARD_DESCALE_RTOL if rotated else DESCALE_RTOL
        torch.testing.assert_close(gd, rd, rtol=rtol, atol=0, msg=f"{n}_descale")
    assert (got.v_mean is None) == (ref.v_mean is None)
    if ref.v_mean is not None:
        assert got.v_mean.shape == ref.v_mean.shape and got.v_mean.dtype == torch.float32
        scale = ref.v_descale[..., None] * FP8_MAX  # the head's max |v - mean|
        assert ((got.v_mean - ref.v_mean).abs() <= V_MEAN_ATOL * scale).all()


MODE_CASES = [
    # B, H_q, H_kv, S, D, dtype, rope (B_c, cos dtype) or None, hadamard, smooth_k, smooth_v
    pytest.param(1, 4, 2, 150, 64, torch.bfloat16, None, "qkv", False, False, id="qkv-d64-bf16"),
    pytest.param(1, 4, 2, 150, 128, torch.float16, None, "qkv", False, False, id="qkv-d128-fp16"),
    pytest.param(1, 4, 2, 150, 128, torch.bfloat16, (1, torch.float32), "qk", False, True, id="rope-qk-smooth_v-d128"),
    pytest.param(2, 2, 2, 70, 128, torch.bfloat16, None, "v_only", False, False, id="v_only-d128"),
    pytest.param(1, 4, 1, 200, 64, torch.bfloat16, None, "none", True, False, id="smooth_k-mqa-d64"),
    pytest.param(2, 4, 2, 77, 96, torch.float16, None, "none", True, True, id="smooth_kv-d96-fp16"),
    pytest.param(1, 4, 2, 150, 128, torch.bfloat16, None, "qkv", True, False, id="qkv-smooth_k-d128"),
    pytest.param(2, 4, 2, 90, 128, torch.bfloat16, (1, torch.float32), "qkv", False, False, id="rope-qkv-d128"),
    pytest.param(1, 4, 2, 150, 128, torch.bfloat16, (1, torch.bfloat16), "qkv", True, False,
                 id="rope-qkv-smooth_k-d128"),
    pytest.param(1, 2, 1, 40, 256, torch.bfloat16, (1, torch.float32), "v_only", False, True,
                 id="rope-v_only-smooth_v-d256"),
]


@pytest.mark.skipif(ON_CUDA, reason="GPU version in tests/gpu/test_quantize_gpu.py")
@pytest.mark.usefixtures("quantize_path")
@pytest.mark.parametrize("B,H_q,H_kv,S,D,dtype,rope,hadamard,smooth_k,smooth_v", MODE_CASES)
def test_kernel_modes_match_reference(B, H_q, H_kv, S, D, dtype, rope, hadamard, smooth_k, smooth_v):
    q, k, v = make_qkv(B, H_q, H_kv, S, S, D, dtype, "bshd")
    cos, sin = make_rope(rope[0], S, D, rope[1]) if rope else (None, None)
    kw = dict(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v)
    got, ref = quantize_qkv_fp8(q, k, v, cos, sin, options=FP8AttentionOptions(**kw)), quantize_qkv_fp8_reference(q, k, v, cos, sin, options=FP8AttentionOptions(**kw))
    assert_close_modes(got, ref, rope is not None, hadamard)


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
def test_kernel_smooth_min_lag_multi_tile(monkeypatch, persistent_path):
    """Smoothed groups of several tiles at the smallest lag (P2s start while their group's P1s still run):
    the means come from the kernel launched before, every P2 waits for its group's P1s."""
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    _, block_s, _, _ = qkv_launcher._tile_config(64, False)
    S = 3 * block_s + 5
    q, k, v = make_qkv(1, 4, 2, S, S, 64, torch.bfloat16, "bshd", seed=2)
    kw = dict(hadamard="qkv", smooth_k=True, smooth_v=True)
    got, ref = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(**kw)), quantize_qkv_fp8_reference(q, k, v, options=FP8AttentionOptions(**kw))
    assert_close_modes(got, ref, False, "qkv")


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
def test_launcher_rejects_bad_modes():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 96, torch.bfloat16, "bshd")
    with pytest.raises(ValueError, match="power-of-two"):
        quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="qkv"))
    with pytest.raises(ValueError, match="hadamard='all' is not supported"):
        quantize_qkv_fp8(q, k, v, options={"hadamard": "all"})
    with pytest.raises(ValueError, match=r"unknown fp8 attention option\(s\) \['block_scales'\]"):
        quantize_qkv_fp8(q, k, v, options={"block_scales": True})


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf * 0 and x / 0 in the interpreter
@pytest.mark.parametrize("options", [{}, {"smooth_k": True, "smooth_v": True}, {"qk_scales": "block"}],
                         ids=["plain", "smooth", "block"])
def test_kernel_special_values_match_reference(options, quantize_path):
    """All-zero head, NaN in one head, inf in another: same bytes and descales as the reference (which
    keeps them local: see test_reference_non_finite_stay_local)."""
    q, k, v = make_qkv(1, 4, 2, 6, 6, 64, torch.bfloat16, "bshd")
    q[:, 0:2] = 0.0  # KV group 0 of q all zero
    k[0, 1, 3, 5] = float("nan")
    v[0, 0, 2, 7] = float("inf")
    v[0, 1, 1, 1] = float("-inf")
    options = FP8AttentionOptions(**{"hadamard": "none", "smooth_v": False, **options})  # a rotation would spread the NaN
    got, ref = quantize_qkv_fp8(q, k, v, options=options), quantize_qkv_fp8_reference(q, k, v, options=options)
    if options.smooths:  # summation order: within an fp8 ulp, as for finite inputs
        assert_close_modes(got, ref, False, "none")
    else:
        assert_identical(got, ref)


def test_interpreter_fp8_patch_in_effect():
    """The conftest patch makes the interpreter's float32 -> e4m3 cast round like torch (shared/README.md:
    -31.92 used to become -16 instead of -32)."""
    if ON_CUDA:
        pytest.skip("hardware cast on CUDA; the interpreter patch is for CPU runs")
    status = os.environ.get("HF_FP8_INTERPRETER_FP8_PATCH", "conftest did not run")
    assert status == "applied", f"interpreter fp8 cast patch not applied: {status}"
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.float8e4nv))

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([-31.92, -124.27, 31.92, 15.9, 0.0, -0.0, 448.0, 1e-4, 2.0**-9, 3 * 2.0**-10]),
                   torch.randn(246, generator=g) * 40]).float()
    y = torch.empty(256, dtype=FP8_DTYPE)
    cast_kernel[(1,)](x, y, N=256)
    assert y[0].float().item() == -32.0 and y[1].float().item() == -128.0
    assert torch.equal(y.view(torch.uint8), x.to(FP8_DTYPE).view(torch.uint8))


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
def test_launcher_rejects_bad_rope_shapes():
    q, k, v = make_qkv(2, 4, 2, 8, 8, 64, torch.bfloat16, "bshd")
    cos, sin = make_rope(1, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="cos must have shape"):
        quantize_qkv_fp8(q, k, v, cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="cos must have shape"):
        quantize_qkv_fp8(q, k, v, cos.expand(3, 8, 64), sin.expand(3, 8, 64))
    with pytest.raises(ValueError, match="together"):
        quantize_qkv_fp8(q, k, v, cos, None)
    q2, k2, v2 = make_qkv(2, 4, 2, 8, 9, 64, torch.bfloat16, "bshd")
    with pytest.raises(ValueError, match="S_q == S_kv"):
        quantize_qkv_fp8(q2, k2, v2, cos, sin)


# ---------------------------------------------------------------- reference properties


def _dequant(x8: torch.Tensor, descale: torch.Tensor, group: int) -> torch.Tensor:
    """(B, S, H, D) fp8 + (B, H_kv) descale -> (B, H, S, D) float32."""
    per_head = descale.repeat_interleave(group, dim=1)  # (B, H)
    return (x8.float() * per_head[:, None, :, None]).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_dequant_error_bound(dtype):
    """e4m3 keeps 3 mantissa bits: round-to-nearest is off by at most 2^-4 relative for normal values, and by
    half the subnormal step 2^-9, i.e. 2^-10 in scaled units, below the smallest normal 2^-6. So
    |x - dequant(x)| <= 2^-4 |x| + 2^-10 descale, plus ~1e-6 relative for the fp32 roundings of x * scale
    and of fp8 * descale (scale * descale is not exactly 1)."""
    q, k, v = make_qkv(2, 4, 2, 16, 12, 64, dtype, "bshd")
    q[0, 0, 0, :4] = torch.tensor([1e-3, -2e-4, 5e-6, 0.0], dtype=dtype)  # reach the subnormal range
    out = quantize_qkv_fp8_reference(q, k, v)
    for n, x, group in (("q", q, 2), ("k", k, 1), ("v", v, 1)):
        x = x.float()
        descale = getattr(out, f"{n}_descale")
        deq = _dequant(getattr(out, n), descale, group)
        d = descale.repeat_interleave(group, dim=1)[:, :, None, None]
        bound = (2.0**-4 + 1e-6) * x.abs() + 2.0**-10 * d * (1 + 1e-6)
        assert ((x - deq).abs() <= bound).all(), n
        # every group's largest |x| maps to +-448 exactly
        assert torch.allclose(getattr(out, n).float().abs().amax(dim=(1, 3)).reshape(2, -1, group).amax(-1),
                              torch.full_like(descale, FP8_MAX))


def test_reference_all_zero_head_gives_zeros_and_unit_descale():
    q, k, v = make_qkv(2, 4, 2, 5, 5, 64, torch.bfloat16, "bshd")
    q[1, 2:4] = 0.0  # batch 1, KV group 1 of q
    k[0, 1] = 0.0
    v.zero_()
    out = quantize_qkv_fp8_reference(q, k, v)
    assert out.q_descale[1, 1].item() == 1.0 and out.k_descale[0, 1].item() == 1.0
    assert torch.all(out.v_descale == 1.0)
    for t in (out.q_descale, out.k_descale, out.v_descale):
        assert torch.isfinite(t).all()
    assert torch.all(out.q[1, :, 2:4].float() == 0) and torch.all(out.k[0, :, 1].float() == 0)
    assert torch.all(out.v.float() == 0)


def test_reference_gqa_q_descale_is_group_max():
    q, k, v = make_qkv(2, 8, 2, 7, 7, 64, torch.float16, "bshd")
    q[:, 5] *= 10  # one head of group 1 dominates its group
    out = quantize_qkv_fp8_reference(q, k, v)
    head_amax = q.float().abs().amax(dim=(2, 3))  # (B, H_q)
    group_amax = head_amax.reshape(2, 2, 4).amax(-1)
    assert torch.equal(out.q_descale, torch.div(group_amax, torch.full_like(group_amax, FP8_MAX)))
    kv_amax = k.float().abs().amax(dim=(2, 3))
    assert torch.equal(out.k_descale, torch.div(kv_amax, torch.full_like(kv_amax, FP8_MAX)))
    assert out.q_descale.shape == (2, 2) and out.q.shape == (2, 7, 8, 64)


@pytest.mark.parametrize("options", [{}, {"smooth_k": True, "smooth_v": True}, {"qk_scales": "block"}],
                         ids=["plain", "smooth", "block"])
def test_reference_non_finite_stay_local(options):
    """NaN / +-inf become NaN in place and do not set scales or means: every other element and every
    descale is what the same input with that element zeroed gives (they used to zero the whole head)."""
    q, k, v = make_qkv(1, 2, 2, 20, 20, 64, torch.bfloat16, "bshd")
    options = FP8AttentionOptions(**{"hadamard": "none", "smooth_v": False, **options})  # a rotation spreads a NaN over its row
    bad = [(q, (0, 0, 1, 3), float("nan")), (k, (0, 1, 2, 5), float("inf")), (v, (0, 0, 7, 9), float("-inf"))]
    for t, idx, value in bad:
        t[idx] = 0.0
    clean = quantize_qkv_fp8_reference(q, k, v, options=options)
    for t, idx, value in bad:
        t[idx] = value
    out = quantize_qkv_fp8_reference(q, k, v, options=options)
    for name, (_, (b, h, s, d), _) in zip(NAMES, bad):
        got, want = getattr(out, name).float(), getattr(clean, name).float()
        assert torch.isnan(got[b, s, h, d]) and torch.isnan(got).sum() == 1, name  # BSHD
        got[b, s, h, d] = want[b, s, h, d]
        assert torch.equal(got, want), name
        assert torch.equal(getattr(out, f"{name}_descale"), getattr(clean, f"{name}_descale")), name
    if options.smooth_v:
        assert torch.isfinite(out.v_mean).all()


@pytest.mark.parametrize("B_c", [1, 2])
def test_reference_rope_matches_transformers(B_c):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k, _ = make_qkv(2, 4, 2, 9, 9, 128, torch.float32, "bshd")
    cos, sin = make_rope(B_c, 9, 128, torch.float32)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope_reference(q, cos, sin), hf_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope_reference(k, cos, sin), hf_k, atol=1e-6, rtol=0)


def test_reference_output_layout_and_dtypes():
    q, k, v = make_qkv(2, 4, 2, 3, 6, 96, torch.bfloat16, "bhsd")
    out = quantize_qkv_fp8_reference(q, k, v)
    assert out.q.shape == (2, 3, 4, 96) and out.k.shape == (2, 6, 2, 96) and out.v.shape == (2, 6, 2, 96)
    for n in NAMES:
        assert getattr(out, n).dtype == FP8_DTYPE and getattr(out, n).is_contiguous()
        assert getattr(out, f"{n}_descale").shape == (2, 2)
        assert getattr(out, f"{n}_descale").dtype == torch.float32


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
def test_too_small_lag_fails_instead_of_hanging(monkeypatch, persistent_path):
    """Under the interpreter (programs run one after another) a P2 scheduled before its group's P1s could
    never be served: the kernel's NO_SPIN check fails the call instead of spinning forever."""
    schedule = qkv_launcher._schedule
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)
    monkeypatch.setattr(qkv_launcher, "_schedule", lambda *a, **k: (schedule(*a, **k)[0], schedule(*a, **k)[1] - 1))
    with pytest.raises(RuntimeError, match="too small"):
        _run_case(1, 4, 2, 70, 70, 64, torch.bfloat16, "bshd", None, DEVICE)


def test_descales_start_16_byte_aligned(quantize_path):
    """The (3, B, H_kv) descales follow the kernel's workspace in one buffer: they start on a 16-byte boundary
    for every B * H_kv (odd ones included, e.g. SmolLM2's 3 KV heads at B=1), so that the launch can take the
    direct path (`hf_fp8_attention._launch.aligned`)."""
    for B, H_q, H_kv in ((1, 9, 3), (1, 4, 1), (3, 2, 1), (2, 4, 2)):
        q, k, v = make_qkv(B, H_q, H_kv, 8, 8, 64, torch.bfloat16, "bshd")
        got = quantize_qkv_fp8(*_to(DEVICE, q, k, v))
        assert got.q_descale.data_ptr() % 16 == 0, (B, H_kv)  # the start of the kernel's descale pointer


# ---------------------------------------------------------------- keys-contiguous V


@pytest.mark.skipif(ON_CUDA, reason="GPU version in tests/gpu/test_quantize_gpu.py")
@pytest.mark.parametrize("B,H_kv,S,D,rope,options", [
    pytest.param(2, 2, 37, 64, None, {}, id="plain-d64"),
    pytest.param(1, 2, 70, 128, (1, torch.float32), {"hadamard": "qk", "smooth_v": True}, id="rope-qk-smooth_v-d128"),
    pytest.param(2, 1, 40, 96, None, {"qk_format": "int8"}, id="int8-d96"),
])
def test_kernel_writes_keys_contiguous_v(B, H_kv, S, D, rope, options, quantize_path):
    """v_keys_contiguous: V's codes land in (B, H_kv, D, S) memory (a BSHD view with unit stride over keys),
    equal byte for byte to the BSHD launch's and to the reference's; q, k and the descales are unchanged."""
    q, k, v = make_qkv(B, 2 * H_kv, H_kv, S, S, D, torch.bfloat16, "bshd", seed=3)
    cos, sin = make_rope(rope[0], S, D, rope[1]) if rope else (None, None)
    opts = FP8AttentionOptions(**options)
    bshd = quantize_qkv_fp8(q, k, v, cos, sin, options=opts)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=opts, v_keys_contiguous=True)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=opts, v_keys_contiguous=True)
    for t in (got.v, ref.v):
        assert t.shape == (B, S, H_kv, D) and t.stride() == (H_kv * D * S, 1, D * S, S)
    assert torch.equal(_fp8_bytes(got.v), _fp8_bytes(bshd.v))
    for name in ("q", "k", "q_descale", "k_descale", "v_descale"):
        a, b = getattr(got, name), getattr(bshd, name)
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b), name
    if options.get("smooth_v"):
        assert torch.equal(got.v_add, bshd.v_add)
    else:
        assert torch.equal(_fp8_bytes(got.v), _fp8_bytes(ref.v))


@pytest.mark.skipif(ON_CUDA, reason="GPU version in tests/gpu/test_quantize_gpu.py")
@pytest.mark.parametrize("B,H_kv,S,D,rope,options", [
    pytest.param(2, 2, 48, 64, None, {}, id="plain-d64"),
    pytest.param(1, 2, 80, 128, (1, torch.float32), {"hadamard": "qk", "smooth_v": True}, id="rope-qk-smooth_v-d128"),
    pytest.param(1, 1, 32, 128, None, {"hadamard": "qkv"}, id="qkv-d128"),
    pytest.param(1, 2, 48, 128, None, {"qk_format": "int8"}, id="int8-d128"),
])
def test_kernel_writes_v_in_wgmma_key_order(B, H_kv, S, D, rope, options, quantize_path):
    """v_wgmma_order: V's codes are the keys-contiguous launch's, their keys reordered within every 16 as
    `wgmma_key_order` does (byte for byte, both quantize paths, the reference too), the bundle says so, and q, k
    and the descales do not change."""
    from hf_fp8_attention.quantization.quantized import keys_contiguous_rows, natural_key_order, wgmma_key_order

    q, k, v = make_qkv(B, 2 * H_kv, H_kv, S, S, D, torch.bfloat16, "bshd", seed=5)
    cos, sin = make_rope(rope[0], S, D, rope[1]) if rope else (None, None)
    opts = FP8AttentionOptions(**options)
    keys = quantize_qkv_fp8(q, k, v, cos, sin, options=opts, v_keys_contiguous=True)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=opts, v_keys_contiguous=True, v_wgmma_order=True)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=opts, v_keys_contiguous=True, v_wgmma_order=True)
    assert got.v_wgmma_order and ref.v_wgmma_order and not keys.v_wgmma_order
    assert keys_contiguous_rows(got.v) == S and got.v.shape == keys.v.shape
    assert torch.equal(_fp8_bytes(got.v), _fp8_bytes(wgmma_key_order(keys.v)))
    assert not torch.equal(_fp8_bytes(got.v), _fp8_bytes(keys.v))  # (the order changed something)
    assert torch.equal(_fp8_bytes(natural_key_order(got.v)), _fp8_bytes(keys.v))
    for name in ("q", "k", "q_descale", "k_descale", "v_descale"):
        a, b = getattr(got, name), getattr(keys, name)
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                           b.view(torch.uint8) if b.element_size() == 1 else b), name
    if options.get("smooth_v"):  # (the add-back averages V's codes over the keys: their order does not matter)
        assert torch.equal(got.v_add, keys.v_add)
    else:
        assert torch.equal(_fp8_bytes(got.v), _fp8_bytes(ref.v))


def test_v_wgmma_order_reaches_no_backend_as_key_order():
    """A bundle with V in wgmma key order gives every backend but the Gluon kernel V back in key order
    (`quantized.key_ordered_v`): the reference backend's output on it equals its output on the key-order bundle;
    a bundle that claims the order for a V that cannot have it is refused."""
    import dataclasses

    from hf_fp8_attention.backends.reference import reference_fp8_attention

    q, k, v = make_qkv(1, 4, 2, 48, 48, 64, torch.bfloat16, "bshd", seed=9)
    keys = quantize_qkv_fp8_reference(q, k, v, v_keys_contiguous=True)
    wgmma = quantize_qkv_fp8_reference(q, k, v, v_keys_contiguous=True, v_wgmma_order=True)
    kw = dict(is_causal=True, scale=0.125, out_dtype=torch.float32)
    want = reference_fp8_attention(keys, **kw)
    assert torch.equal(reference_fp8_attention(wgmma, **kw), want)
    assert not torch.equal(reference_fp8_attention(dataclasses.replace(wgmma, v_wgmma_order=False), **kw), want)
    bshd = quantize_qkv_fp8_reference(q, k, v)
    with pytest.raises(ValueError, match="keys-contiguous V over whole 16s"):
        dataclasses.replace(bshd, v_wgmma_order=True)


def test_v_wgmma_order_refuses_what_it_cannot_write():
    """The wgmma key order is a layout of keys-contiguous V over whole 16s of keys with a per-head V scale:
    anything else is a ValueError naming the reason (the kernel and the reference alike), not a wrong order."""
    q, k, v = make_qkv(1, 2, 1, 40, 40, 64, torch.bfloat16, "bshd")
    q, k, v = _to(DEVICE, q, k, v)
    cases = [(dict(v_keys_contiguous=True), "multiple of 16"), (dict(), "v_keys_contiguous")]
    for fn in (quantize_qkv_fp8, quantize_qkv_fp8_reference):
        for kwargs, match in cases:
            with pytest.raises(ValueError, match=match):
                fn(q, k, v, v_wgmma_order=True, **kwargs)
    q, k, v = (t[:, :, :32] for t in (q, k, v))
    with pytest.raises(ValueError, match="per-head V scales"):
        quantize_qkv_fp8(q, k, v, options=dict(qk_scales="block", v_scales="block"), v_keys_contiguous=True,
                         v_wgmma_order=True)
