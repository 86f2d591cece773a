"""qk_scales='block': one Q/K scale per SCALE_BLOCK (16) tokens of one head (int8 K: per 128, test_int8_qk.py).

The quantize kernel (interpreted on CPU) equals the reference bit for bit (fp8 bytes and every block
descale), the triton attention kernel with block descales tracks the reference backend, block scales beat
per-head scales where K has outliers, and the option is refused where the kernel cannot take it."""

import itertools
import os

import pytest
import torch
from test_quantize import _interpreter_bf16_dot, assert_close_modes, assert_identical, make_qkv, make_rope  # noqa: F401

from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention import fp8_sdpa
from hf_fp8_attention._constants import SCALE_BLOCK
from hf_fp8_attention.accuracy import make_inputs
from hf_fp8_attention.backends.reference import reference_fp8_attention
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.quantization import (
    quantize_qkv_fp8,
    quantize_qkv_fp8_reference,
    quantize_qkv_fp8_varlen,
    quantize_qkv_fp8_varlen_reference,
)

BLOCK = FP8AttentionOptions(qk_scales="block")

ON_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(ON_CUDA or not INTERPRET, reason="interpreted Triton on CPU")


def _assert_blocks_equal(got, ref):
    assert got.block_scales and ref.block_scales
    for n in ("q", "k"):
        g, r = getattr(got, f"{n}_block_descale"), getattr(ref, f"{n}_block_descale")
        assert g.shape == r.shape and torch.equal(g, r), n


@kernel_test
@pytest.mark.parametrize(
    "H_q,H_kv,S,D,rope",
    [(4, 2, 150, 64, False), (2, 2, 77, 96, True), (4, 1, 50, 128, True), (2, 2, 40, 256, False)],
    ids=["gqa-d64", "rope-d96", "rope-mqa-d128", "d256"],
)
def test_kernel_block_scales_match_reference(H_q, H_kv, S, D, rope):
    q, k, v = make_qkv(2, H_q, H_kv, S, S, D, torch.bfloat16)
    q[:, :, 3] *= 60  # one loud token: its block's scale must not leak into the others
    k[:, :, 3] *= 60
    cos, sin = make_rope(1, S, D, torch.float32) if rope else (None, None)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=BLOCK)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=BLOCK)
    assert_identical(got, ref)
    _assert_blocks_equal(got, ref)
    assert ref.q_block_descale.shape == (2, H_q, -(-S // SCALE_BLOCK))
    assert ref.k_block_descale.shape == (2, H_kv, -(-S // SCALE_BLOCK))
    # the loud token's block has the largest scale; the others are untouched by it
    for blocks in (ref.q_block_descale, ref.k_block_descale):
        assert (blocks[:, :, 0] > 10 * blocks[:, :, 1:].amax(-1)).all()


@kernel_test
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kernel_block_scales_with_modes_and_varlen():
    q, k, v = make_qkv(1, 4, 2, 150, 150, 128, torch.bfloat16, seed=4)
    kw = dict(hadamard="qkv", smooth_k=True, qk_scales="block")
    got, ref = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(**kw)), quantize_qkv_fp8_reference(q, k, v, options=FP8AttentionOptions(**kw))
    assert_close_modes(got, ref, False, "qkv")
    for n in ("q", "k"):
        torch.testing.assert_close(getattr(got, f"{n}_block_descale"), getattr(ref, f"{n}_block_descale"),
                                   rtol=1e-5, atol=0)
    lengths = [37, 5, 64]
    qp, kp, vp, cu = packed_gqa(lengths, 0)
    args = (qp, kp, vp, cu, cu, 64, 64)
    got = quantize_qkv_fp8_varlen(*args, options=BLOCK)
    ref = quantize_qkv_fp8_varlen_reference(*args, options=BLOCK)
    assert_identical(got, ref)
    for i, n in enumerate(lengths):  # blocks a sequence reaches; the rest of the row is never read
        nq = nk = -(-n // SCALE_BLOCK)
        assert torch.equal(got.q_block_descale[i, :, :nq], ref.q_block_descale[i, :, :nq])
        assert torch.equal(got.k_block_descale[i, :, :nk], ref.k_block_descale[i, :, :nk])


@kernel_test
@pytest.mark.parametrize("options", [BLOCK, FP8AttentionOptions(qk_format="int8")], ids=["e4m3", "int8"])
@pytest.mark.parametrize("s_q,s_kv,causal,config", [
    (40, 40, True, {"BLOCK_M": 16, "BLOCK_N": 32}),
    (24, 70, False, {"BLOCK_M": 32, "BLOCK_N": 16}),
    (1, 100, True, {"BLOCK_M": 16, "BLOCK_N": 16, "num_splits": 3}),
    # int8's 128-token K blocks over several key tiles, and split boundaries inside them (96-key splits)
    (24, 300, True, {"BLOCK_M": 32, "BLOCK_N": 32}),
    (1, 300, True, {"BLOCK_M": 16, "BLOCK_N": 32, "num_splits": 4}),
])
def test_triton_attention_block_scales_track_reference(s_q, s_kv, causal, config, options):
    q, k, v = small_gqa(s_q, s_kv)
    k[:, :, 7] *= 40
    got, ref = triton_and_reference(q, k, v, options, causal, config)
    assert sqnr_db(got, ref) > 30


def small_gqa(s_q: int, s_kv: int, seed: int = 1):
    """bf16 q (1, 4, s_q, 64), k/v (1, 2, s_kv, 64), BHSD views of BSHD memory."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: torch.randn(1, s, h, 64, generator=g).bfloat16().transpose(1, 2)  # noqa: E731
    return mk(4, s_q), mk(2, s_kv), mk(2, s_kv)


def packed_gqa(lengths: list[int], seed: int):
    """bf16 packed sequences of `lengths` tokens: q (total, 4, 64), k/v (total, 2, 64), and their int32
    offsets."""
    g = torch.Generator().manual_seed(seed)
    qp, kp, vp = (torch.randn(sum(lengths), h, 64, generator=g).bfloat16() for h in (4, 2, 2))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return qp, kp, vp, cu


def triton_and_reference(q, k, v, options, causal: bool, config: dict):
    """The triton kernel (interpreted, explicit config) and the reference backend on the reference quantizer's
    codes, float32 outputs, scale 0.125."""
    from hf_fp8_attention.backends.triton import _launch

    qkv = quantize_qkv_fp8_reference(q, k, v, options=options)
    return (_launch(qkv, causal, 0.125, torch.float32, config=config),
            reference_fp8_attention(qkv, is_causal=causal, scale=0.125, out_dtype=torch.float32))


def test_block_scales_gain_on_k_outliers():
    """k_outlier_100x (4 channels of K 100x): per-block Q/K scales beat per-head ones (reference backend;
    measured +2.2 dB at S=1024, H=8, D=128 with scripts/accuracy_report.py). Gaussian: no loss."""
    gains = {}
    for family in ("k_outlier_100x", "gaussian"):
        q, k, v = make_inputs(family, 1, 4, 4, 256, 128, seed=0)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        head = fp8_sdpa(q, k, v, is_causal=True, backend="reference")
        block = fp8_sdpa(q, k, v, is_causal=True, backend="reference", qk_scales="block")
        gains[family] = sqnr_db(block.double(), ref) - sqnr_db(head.double(), ref)
    assert gains["k_outlier_100x"] > 1.0, gains
    assert gains["gaussian"] > -0.5, gains


def test_block_scales_errors_and_backend_choice(monkeypatch):
    q = torch.randn(1, 2, 8, 64).bfloat16()
    with pytest.raises(ValueError, match="qk_scales='block'.*triton"):
        fp8_sdpa(q, q, q, backend="fa3", qk_scales="block")
    with pytest.raises(ValueError, match="accepted values"):
        fp8_sdpa(q, q, q, qk_scales="tile")
    import hf_fp8_attention.dispatch as dispatch

    monkeypatch.setattr(dispatch, "kernel_available", lambda name: True)
    monkeypatch.setenv(dispatch.ARCH_ENV, "90")
    device = torch.device("cuda")
    assert dispatch.plan_attention(device, None, BLOCK).backend == "triton"  # auto on a GPU: the kernel that takes blocks
    assert dispatch.plan_attention(device, None, FP8AttentionOptions()).backend == "fa3"
    assert dispatch.plan_attention(device, "reference", BLOCK).backend == "reference"
    monkeypatch.setattr(dispatch, "kernel_available", lambda name: name != "triton")
    assert dispatch.plan_attention(device, None, BLOCK).backend == "reference"  # no triton: the reference takes blocks
