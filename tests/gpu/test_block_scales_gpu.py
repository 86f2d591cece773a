"""qk_scales='block' on the GPU: the quantize kernel equals the reference bit for bit at real sizes, and
the triton backend with block scales stays > 25 dB from bf16 SDPA and gains on K outliers."""

import pytest
import torch
import torch.nn.functional as F

from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention import fp8_sdpa
from hf_fp8_attention.accuracy import float32_reference, make_inputs
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.quantization import quantize_qkv_fp8, quantize_qkv_fp8_reference

_fp8_gpu = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = pytest.mark.skipif(not _fp8_gpu, reason="needs a CUDA GPU with fp8 tensor cores (SM 8.9+)")


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("rope", [False, True])
def test_block_quantize_kernel_matches_reference_gpu(d, rope):
    g = torch.Generator(device="cuda").manual_seed(d)
    s = 4096 + 7
    q, k, v = (torch.randn(2, s, h, d, device="cuda", generator=g).bfloat16().transpose(1, 2) for h in (32, 8, 8))
    k[:, :, 100] *= 80
    cos = sin = None
    if rope:
        pos = torch.arange(s, device="cuda", dtype=torch.float32)[None, :, None]
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
        emb = torch.cat([pos * inv, pos * inv], dim=-1)
        cos, sin = emb.cos(), emb.sin()
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=FP8AttentionOptions(qk_scales="block"))
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=FP8AttentionOptions(qk_scales="block"))
    for n in ("q", "k", "v"):
        assert torch.equal(getattr(got, n).view(torch.uint8), getattr(ref, n).view(torch.uint8)), n
    assert torch.equal(got.q_block_descale, ref.q_block_descale)
    assert torch.equal(got.k_block_descale, ref.k_block_descale)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_triton_block_scales_vs_bf16_gpu(causal, d):
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 4096, h, d, device="cuda", generator=g).bfloat16().transpose(1, 2) for h in (32, 8, 8))
    out = fp8_sdpa(q, k, v, is_causal=causal, backend="triton", qk_scales="block")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert sqnr_db(out.float(), ref.float()) > 25


def test_block_scales_gain_on_k_outliers_gpu():
    q, k, v = make_inputs("k_outlier_100x", 1, 32, 32, 4096, 128, device="cuda")
    ref = float32_reference(q, k, v, is_causal=True)
    head = fp8_sdpa(q, k, v, is_causal=True, backend="triton")
    block = fp8_sdpa(q, k, v, is_causal=True, backend="triton", qk_scales="block")
    assert sqnr_db(block.float(), ref) > sqnr_db(head.float(), ref) + 1.0
