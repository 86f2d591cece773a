"""The TMA-descriptor Triton fp8 attention kernel (`backends/triton_ws.py`) on a Hopper GPU, built without
warp specialization (with it, triton 3.6 hangs or returns NaN on the H200: `scripts/probe_ws.py` probes that
build in its own process, never pytest): its output matches the current Triton kernel's (the same math)
and stays as close to bf16 SDPA, causal and not, GQA, both scale modes, sequence tails, and it never reads
past the end of the keys (NaN bytes in V's padding stay out)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hf_fp8_attention.backends import triton_ws
from hf_fp8_attention.backends.triton import _launch
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import quantize_qkv_fp8

_hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = pytest.mark.skipif(not _hopper, reason="needs a Hopper GPU (SM 9.x)")


@pytest.mark.parametrize("config", [triton_ws.WS_CONFIG_DEFAULT, (64, 128, 4, 3)], ids=str)
@pytest.mark.parametrize("mode", ["none", "block"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,h_q,h_kv,s,d", [(1, 8, 2, 4096, 128), (2, 4, 4, 1008, 64),
                                            (1, 4, 1, 2064, 128)])
def test_ws_kernel_matches_the_triton_kernel_gpu(config, mode, causal, b, h_q, h_kv, s, d):
    g = torch.Generator(device="cuda").manual_seed(s)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (h_q, h_kv, h_kv))
    v = v + 0.5  # a channel offset: the long-row P.V terms two-level accumulation keeps
    extra = dict(qk_scales="block", v_scales="block") if mode == "block" else {}
    qkv = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none", **extra), v_keys_contiguous=True)
    assert triton_ws.ws_supported(qkv, causal) is None
    got = triton_ws.ws_fp8_attention(qkv, is_causal=causal, scale=d**-0.5, out_dtype=torch.bfloat16, config=config,
                                     warp_specialize=False)
    assert triton_ws.last_compiled_is_warp_specialized() is False
    old = _launch(qkv, causal, d**-0.5, torch.bfloat16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h_q != h_kv).transpose(1, 2)
    assert torch.isfinite(got).all()
    assert sqnr_db(got, old) > 35, sqnr_db(got, old)
    assert sqnr_db(got, ref) > sqnr_db(old, ref) - 0.5


def test_ws_kernel_ignores_v_padding_and_rows_past_the_end_gpu():
    """Keys past S_kv come from TMA's zero fill, not the buffer: NaN bytes in V's padded rows change nothing."""
    s, d = 1040, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 2, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    qkv = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True)
    padded = torch.full((1, 2, d, s + 48), float("nan"), device="cuda").to(qkv.v.dtype)
    padded[..., :s] = qkv.v.permute(0, 2, 3, 1)
    qkv_pad = dataclasses.replace(qkv, v=padded[..., :s].permute(0, 3, 1, 2))
    assert qkv_pad.v.stride(3) == s + 48
    for causal in (False, True):
        a, b = (triton_ws.ws_fp8_attention(x, is_causal=causal, scale=d**-0.5, out_dtype=torch.bfloat16,
                                           warp_specialize=False) for x in (qkv, qkv_pad))
        assert torch.equal(a, b)
