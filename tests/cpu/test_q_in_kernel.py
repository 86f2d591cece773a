"""Q quantized by the attention kernel (session 29, `QuantizedQKV.q_in_kernel`): the Gluon kernel converts each
query row to e4m3 with its own scale as its tile loads (`gluon_attention._quantize_q`), so the quantizer reads and
writes K and V only. What the CPU checks: the Triton quantizer (interpreted) then quantizes K and V exactly as
without it and leaves Q as the input; the reference quantizer agrees; the per-row emulation
(`quantize_q_rows_reference`) has the kernel's scales and rounding; a bundle that reaches any other kernel gets
Q quantized per head first, equal to the quantizer's (the triton backend's fallback, the reference backend);
what the bundle refuses; and where the pipeline asks for it. The kernel itself runs on the GPU
(tests/gpu/test_gluon_gpu.py) and builds offline here (test_gluon_attention.py)."""

import dataclasses

import pytest
import torch

from hf_fp8_attention import attention, backends
from hf_fp8_attention._constants import FP8_MAX
from hf_fp8_attention.backends.reference import reference_fp8_attention
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import QuantizedQKV, quantize_qkv_fp8, quantize_qkv_fp8_reference
from hf_fp8_attention.quantization.hadamard import hadamard_matrix
from hf_fp8_attention.quantization.reference import quantize_q_per_head, quantize_q_rows_reference


def _inputs(B=2, H=4, H_kv=2, S=64, D=64, dtype=torch.bfloat16, seed=0):
    """BHSD views of BSHD memory (what Transformers hands over)."""
    g = torch.Generator().manual_seed(seed)
    q = (3 * torch.randn(B, S, H, D, generator=g)).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, S, H_kv, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    return q, k, v


def _bytes(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("hadamard", ["none", "qk"])
@pytest.mark.parametrize("quantize", [quantize_qkv_fp8, quantize_qkv_fp8_reference])
def test_quantizers_leave_q_and_quantize_k_v_as_before(hadamard, quantize):
    """With q_in_kernel the Triton quantizer (its split path over K's and V's tiles only) and the reference return
    K, V and their descales byte for byte as without it, q as the input's BSHD tensor (no copy for BSHD memory),
    and say whether the kernel must rotate Q (the Hadamard modes that rotate Q and K)."""
    q, k, v = _inputs()
    opts = FP8AttentionOptions(hadamard=hadamard)
    kw = dict(options=opts, v_keys_contiguous=True, v_wgmma_order=True)
    left, full = quantize(q, k, v, q_in_kernel=True, **kw), quantize(q, k, v, **kw)
    assert left.q_in_kernel and left.q_rotate == (hadamard == "qk") and not full.q_in_kernel
    assert left.q.data_ptr() == q.data_ptr() and left.q.shape == (2, 64, 4, 64) and left.q.is_contiguous()
    assert torch.isnan(left.q_descale).all()  # (not a scale of q: nothing may read it as one)
    for name in ("k", "v"):
        assert torch.equal(_bytes(getattr(left, name)), _bytes(getattr(full, name))), name
        assert torch.equal(getattr(left, f"{name}_descale"), getattr(full, f"{name}_descale")), name
    assert left.v.stride() == full.v.stride() and left.v_wgmma_order


def test_q_in_kernel_needs_the_gluon_layout_and_no_rope():
    q, k, v = _inputs()
    cos = sin = torch.ones(1, 64, 64)
    with pytest.raises(ValueError, match="V in wgmma order"):
        quantize_qkv_fp8(q, k, v, q_in_kernel=True)
    with pytest.raises(ValueError, match="no fused RoPE"):
        quantize_qkv_fp8(q, k, v, cos, sin, v_keys_contiguous=True, v_wgmma_order=True, q_in_kernel=True)
    with pytest.raises(ValueError, match="per-head e4m3 scales"):
        quantize_qkv_fp8_reference(q, k, v, options=FP8AttentionOptions(qk_scales="block"), q_in_kernel=True)
    full = quantize_qkv_fp8_reference(q, k, v, v_keys_contiguous=True, v_wgmma_order=True)
    with pytest.raises(ValueError, match="bf16/fp16 q"):
        dataclasses.replace(full, q_in_kernel=True)  # (an e4m3 q is not the kernel's input)
    with pytest.raises(ValueError, match="q_rotate is for"):
        dataclasses.replace(full, q_rotate=True)


@pytest.mark.parametrize("rotate", [False, True])
def test_row_emulation_has_one_scale_per_row(rotate):
    """`quantize_q_rows_reference`: every row's largest finite element (after the +-1 rotation) lands on
    +-FP8_MAX, codes times descale give the (normalised) row back within e4m3's half ulp, a zero row has codes 0
    and descale 1 (times 1/sqrt(D) rotated), a non-finite element is NaN and spoils only its row."""
    q, _, _ = _inputs(B=1, H=2, S=8, D=64)
    q = q.transpose(1, 2).contiguous()  # (B, S, H, D)
    q[0, 3, 1] = 0
    q[0, 5, 0, 7] = float("inf")
    codes, descale = quantize_q_rows_reference(q, rotate)
    x = q.float() @ hadamard_matrix(64, normalized=False) if rotate else q.float()
    norm = 64**-0.5 if rotate else 1.0
    finite = torch.isfinite(x).all(-1)
    assert finite.sum() == 15 and torch.isnan(codes[0, 5, 0].float()).any()
    nonzero = finite & (x.abs().amax(-1) > 0)
    assert nonzero.sum() == 14 and (codes.float().abs().amax(-1)[nonzero] == FP8_MAX).all()
    back = codes.float() * descale[..., None]
    err = (back - x * norm).abs()[finite]
    assert (err <= (x * norm).abs()[finite] * 2**-4 + 1e-12).all()  # e4m3: 3 mantissa bits, half an ulp
    assert (codes[0, 3, 1].float() == 0).all() and descale[0, 3, 1] == torch.tensor(norm, dtype=torch.float32)
    assert torch.isfinite(codes.float()[finite]).all()


@pytest.mark.parametrize("hadamard", ["none", "qk"])
def test_other_kernels_get_q_per_head(hadamard, monkeypatch):
    """A bundle that left Q to the Gluon kernel but reaches another kernel gets Q quantized per (batch, KV head)
    in torch (`quantize_q_per_head`), byte-equal to the reference quantizer's; the triton backend's Triton kernel
    (interpreted; the CPU is no Hopper, so no Gluon route) and the reference backend then give the output of the
    bundle with Q from the quantizer (the Triton quantizer's, its rotation's sums in another order: within an
    e4m3 ulp on a few elements)."""
    from hf_fp8_attention.backends import triton as triton_backend

    q, k, v = _inputs(S=256)
    opts = FP8AttentionOptions(hadamard=hadamard)
    kw = dict(options=opts, v_keys_contiguous=True, v_wgmma_order=True)
    left, full = quantize_qkv_fp8_reference(q, k, v, q_in_kernel=True, **kw), quantize_qkv_fp8_reference(q, k, v, **kw)
    per_head = quantize_q_per_head(left)
    assert not per_head.q_in_kernel and not per_head.q_rotate and quantize_q_per_head(full) is full
    assert torch.equal(_bytes(per_head.q), _bytes(full.q)) and torch.equal(per_head.q_descale, full.q_descale)
    call = dict(is_causal=True, scale=0.125, out_dtype=torch.float32)
    assert torch.equal(reference_fp8_attention(left, **call), reference_fp8_attention(full, **call))
    triton_left = quantize_qkv_fp8(q, k, v, q_in_kernel=True, **kw)
    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    got = triton_backend.triton_fp8_attention(triton_left, **call)
    want = triton_backend.triton_fp8_attention(quantize_qkv_fp8(q, k, v, **kw), **call)
    if hadamard == "none":
        assert torch.equal(got, want)
    else:
        assert sqnr_db(got, want) > 40.0


def test_the_pipeline_asks_where_the_backend_quantizes_q(monkeypatch):
    """`attention.fp8_attention` has the quantizer leave Q exactly where the backend reads V in wgmma order and its
    ``q_in_kernel`` says yes for the call (the triton backend's: `Q_IN_KERNEL_ENV` "1", off by default, and no
    fused RoPE)."""
    from hf_fp8_attention.backends import triton as triton_backend

    asked = []
    real_quantize = attention.quantize

    def quantize(*args):
        asked.append(args[-1])  # q_in_kernel
        return real_quantize(*args)

    monkeypatch.setattr(attention, "quantize", quantize)
    reference = backends.REGISTRY["reference"]
    routed = dataclasses.replace(reference, v_keys_contiguous=lambda *a: True, v_wgmma_order=lambda *a, **kw: True,
                                 q_in_kernel=backends.triton_q_in_kernel)
    monkeypatch.setitem(backends.REGISTRY, "reference", routed)
    q, k, v = _inputs(S=64, D=64)
    cos = sin = torch.ones(1, 64, 64)
    monkeypatch.delenv(triton_backend.Q_IN_KERNEL_ENV, raising=False)
    assert not triton_backend.q_in_kernel(FP8AttentionOptions(), False)  # (the default)
    monkeypatch.setenv(triton_backend.Q_IN_KERNEL_ENV, "1")

    def run(cos=None, sin=None, quantizer="triton"):
        return attention.fp8_attention(q, k, v, None, None, None, None, cos, sin, True, 0.125, "reference",
                                       quantizer, FP8AttentionOptions())

    run()
    run(cos, sin)
    run(quantizer="reference")
    monkeypatch.setenv(triton_backend.Q_IN_KERNEL_ENV, "0")
    run()
    assert asked == [True, False, False, False]
    monkeypatch.setenv(triton_backend.Q_IN_KERNEL_ENV, "yes")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        run()
    monkeypatch.setenv(triton_backend.Q_IN_KERNEL_ENV, "1")
    assert triton_backend.q_in_kernel(FP8AttentionOptions(), False)
    assert not triton_backend.q_in_kernel(FP8AttentionOptions(qk_scales="block"), False)


def test_bundle_fields_default_off():
    q, k, v = _inputs()
    qkv = quantize_qkv_fp8_reference(q, k, v)
    assert isinstance(qkv, QuantizedQKV) and not qkv.q_in_kernel and not qkv.q_rotate
