"""GPU checks of the Triton fp8 attention backend against bf16 SDPA and the reference backend.

Accuracy bar (torchao's): SQNR > 25 dB per call against bf16 SDPA. Needs a CUDA GPU with fp8 dots
(SM 8.9+); the skip names what is missing.
"""

import pytest
import torch
import torch.nn.functional as F

from hf_fp8_attention.backends.reference import reference_fp8_attention
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.quantization import QuantizedQKV, quantize_qkv_fp8

_fp8_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = pytest.mark.skipif(not _fp8_gpu, reason="needs a CUDA GPU with fp8 tensor cores (SM 8.9+)")

if _fp8_gpu:
    from hf_fp8_attention.backends.triton import _launch, triton_fp8_attention


def _inputs(b, h_q, h_kv, s_q, s_kv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, s: torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)  # noqa: E731
    return mk(h_q, s_q), mk(h_kv, s_kv), mk(h_kv, s_kv)


def _sdpa(q, k, v, is_causal):
    s_q, s_kv = q.shape[2], k.shape[2]
    mask = None
    if is_causal and s_q != s_kv:
        mask = torch.ones(s_q, s_kv, dtype=torch.bool, device=q.device).tril(s_kv - s_q)
        is_causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)  # BSHD


def _run(q, k, v, causal, **kw):
    qkv = quantize_qkv_fp8(q, k, v)
    out = _launch(qkv, causal, q.shape[-1] ** -0.5, torch.bfloat16, **kw)
    return qkv, out


@pytest.mark.parametrize("s", [1024, 4096, 16384])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_q,h_kv,d", [(16, 16, 128), (32, 8, 128), (16, 4, 64), (8, 8, 256), (8, 2, 96)])
def test_vs_bf16_sdpa(s, causal, h_q, h_kv, d):
    q, k, v = _inputs(1, h_q, h_kv, s, s, d)
    _, out = _run(q, k, v, causal)
    assert out.dtype == torch.bfloat16 and out.shape == (1, s, h_q, d) and out.is_contiguous()
    assert sqnr_db(out, _sdpa(q, k, v, causal)) > 25.0


@pytest.mark.parametrize("causal", [False, True])
def test_tracks_reference(causal):
    """Online (running max) vs final-max P scaling: close, not identical; same error vs bf16 SDPA."""
    q, k, v = _inputs(2, 8, 2, 1000, 1000, 128, seed=1)
    qkv, out = _run(q, k, v, causal)
    ref = reference_fp8_attention(qkv, is_causal=causal, scale=128**-0.5, out_dtype=torch.bfloat16)
    assert sqnr_db(out, ref) > 30.0
    exact = _sdpa(q, k, v, causal)
    assert abs(sqnr_db(out, exact) - sqnr_db(ref, exact)) < 1.5


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv(causal):
    q, k, v = _inputs(1, 32, 8, 2048, 2048, 128, seed=2)
    qkv = quantize_qkv_fp8(q, k, v)
    rep = lambda t: t.repeat_interleave(4, dim=2).contiguous()  # noqa: E731
    rep_d = lambda t: t.repeat_interleave(4, dim=1).contiguous()  # noqa: E731
    mha = QuantizedQKV(qkv.q, rep(qkv.k), rep(qkv.v), rep_d(qkv.q_descale), rep_d(qkv.k_descale),
                       rep_d(qkv.v_descale))
    out = triton_fp8_attention(qkv, is_causal=causal, scale=0.1, out_dtype=torch.float32)
    out_mha = triton_fp8_attention(mha, is_causal=causal, scale=0.1, out_dtype=torch.float32)
    # Same rows, same key blocks: equal up to FMA contraction differences between compiled variants.
    assert sqnr_db(out, out_mha) > 60.0


@pytest.mark.parametrize("s_q,s_kv,h_q,h_kv", [(1, 1000, 32, 8), (1, 1000, 32, 32), (1, 32768, 32, 8),
                                               (4, 4097, 16, 4), (64, 1000, 8, 2), (300, 300, 8, 2)])
def test_decode_and_bottom_right_causal(s_q, s_kv, h_q, h_kv):
    q, k, v = _inputs(2, h_q, h_kv, s_q, s_kv, 128, seed=3)
    for causal in (False, True):
        qkv, out = _run(q, k, v, causal)
        assert torch.isfinite(out).all()
        exact = _sdpa(q, k, v, causal)
        assert sqnr_db(out, exact) > 25.0
        # Split keys rescale P per split: roundings differ from the reference's, the error does not.
        ref = reference_fp8_attention(qkv, is_causal=causal, scale=128**-0.5, out_dtype=torch.bfloat16)
        assert abs(sqnr_db(out, exact) - sqnr_db(ref, exact)) < 1.5


def test_keys_contiguous_v_matches():
    q, k, v = _inputs(1, 8, 2, 1500, 1500, 128, seed=4)
    qkv, out = _run(q, k, v, True)
    cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}  # same tiles: same P roundings
    out = _launch(qkv, True, 128**-0.5, torch.bfloat16, v_keys_contiguous=False, config=cfg)
    out_t = _launch(qkv, True, 128**-0.5, torch.bfloat16, v_keys_contiguous=True, config=cfg)
    assert sqnr_db(out_t, out) > 50.0


def test_non_finite_head_and_zero_head():
    q, k, v = _inputs(1, 4, 4, 256, 256, 128, seed=5)
    v[:, 1] = 0
    k[0, 3, 10, 5] = float("nan")
    _, out = _run(q, k, v, False)
    assert (out[:, :, 1] == 0).all()
    assert not torch.isfinite(out[:, :, 3]).all()
    assert torch.isfinite(out[:, :, :3]).all()
