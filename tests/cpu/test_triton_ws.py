"""The TMA-descriptor Triton fp8 attention kernel (`backends/triton_ws.py`, experimental: not dispatched),
interpreted on CPU (conftest sets TRITON_INTERPRET=1; the interpreter runs tensor descriptors and ignores
warp specialization). Each query row goes through the same key blocks in the same order as in the current
Triton kernel, so with the same BLOCK_N both give the same bits: checked for GQA and MHA, causal and not,
sequence tails (queries not a multiple of BLOCK_M, keys a multiple of 16 but not of BLOCK_N), both scale
modes, the 2-D descriptor variant and the TMA store. Also: what the kernel refuses, and why."""

import dataclasses
import os

import pytest
import torch

from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import quantize_qkv_fp8

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreted Triton on CPU (the GPU run is tests/gpu/test_triton_ws_gpu.py)",
)
triton_ws = pytest.importorskip("hf_fp8_attention.backends.triton_ws")
from hf_fp8_attention.backends.triton import _launch  # noqa: E402

BLOCK = dict(qk_scales="block", v_scales="block")


def _qkv(b, h_q, h_kv, s, d, options, seed=0, v_keys=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).bfloat16() for h in (h_q, h_kv, h_kv))
    v[:, :, s // 3] *= 20  # a loud V token
    return quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none", **options), v_keys_contiguous=v_keys)


@pytest.mark.parametrize("variant", [0, 1, 4], ids=["3d-desc", "2d-desc", "tma-store"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,h_q,h_kv,s,d,options", [
    (1, 4, 2, 160, 64, {}),  # GQA; 160 queries: two full 64-row tiles and a partial one
    (2, 2, 2, 112, 128, BLOCK),  # every scale per block, two sequences; a key tail (2-D descriptors: next rows)
    (1, 3, 1, 48, 64, BLOCK),  # MQA, fewer rows than one query tile
], ids=["gqa-d64", "block-d128-b2-tail", "mqa-block-short"])
def test_ws_kernel_equals_the_triton_kernel(variant, causal, b, h_q, h_kv, s, d, options):
    qkv = _qkv(b, h_q, h_kv, s, d, options)
    assert triton_ws.ws_supported(qkv, causal) is None
    got = triton_ws.ws_fp8_attention(qkv, is_causal=causal, scale=d**-0.5, out_dtype=torch.bfloat16,
                                     config=(64, 32, 4, 2), variant=variant)
    want = _launch(qkv, causal, d**-0.5, torch.bfloat16, config={"BLOCK_M": 64, "BLOCK_N": 32})
    assert got.shape == want.shape == (b, s, h_q, d)
    assert torch.equal(got, want), sqnr_db(got, want)


def test_ws_kernel_one_accumulator_variant_is_close():
    """Variant 2 (one accumulator through the MMA, FA3's) differs only by float32 addition order here."""
    qkv = _qkv(1, 2, 1, 128, 64, {})
    got = triton_ws.ws_fp8_attention(qkv, is_causal=False, scale=0.125, out_dtype=torch.float32,
                                     config=(64, 32, 4, 2), variant=2)
    want = _launch(qkv, False, 0.125, torch.float32, config={"BLOCK_M": 64, "BLOCK_N": 32})
    assert sqnr_db(got, want) > 60


def test_ws_supported_reasons_and_refusal():
    ok = _qkv(1, 2, 1, 64, 64, {})
    assert triton_ws.ws_supported(ok, True) is None
    cases = {
        "int8 Q/K": _qkv(1, 2, 1, 64, 64, dict(qk_format="int8")),
        "head_dim 256": _qkv(1, 2, 1, 32, 256, {}),
        "layout": _qkv(1, 2, 1, 64, 64, {}, v_keys=False),
        "key count not a multiple of 16": _qkv(1, 2, 1, 40, 64, {}),
    }
    for reason, qkv in cases.items():
        assert reason in triton_ws.ws_supported(qkv, False), reason
        with pytest.raises(ValueError, match="warp-specialized kernel does not take this call"):
            triton_ws.ws_fp8_attention(qkv, is_causal=False, scale=0.125, out_dtype=torch.bfloat16)
    short_q = dataclasses.replace(ok, q=ok.q[:, :32].contiguous())
    assert "causal with S_q != S_kv" in triton_ws.ws_supported(short_q, True)
    assert triton_ws.ws_supported(short_q, False) is None
    varlen = dataclasses.replace(ok, cu_seqlens_q=torch.tensor([0, 64], dtype=torch.int32),
                                 cu_seqlens_k=torch.tensor([0, 64], dtype=torch.int32), max_seqlen_q=64,
                                 max_seqlen_k=64)
    assert triton_ws.ws_supported(varlen, False) == "packed sequences"
    assert triton_ws.last_compiled_is_warp_specialized() is None  # nothing compiled in the interpreter
