"""The Triton fp8 attention kernels, interpreted on CPU (conftest sets TRITON_INTERPRET=1), vs the reference.

Tolerances: the kernel rescales P with a running row max (online softmax, as FA3), the reference with the
final max, so P's e4m3 roundings differ: SQNR > 30 dB between them with 16-key blocks (more blocks, more
max updates; > 35 dB typical), > 60 dB when one key block covers all keys (same max, same roundings), and
both > 25 dB against a float32 SDPA on the dequantized inputs.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from hf_fp8_attention import quantize_qkv_fp8_reference
from hf_fp8_attention.backends.reference import reference_fp8_attention
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.quantization import QuantizedQKV
from hf_fp8_attention.quantization.quantized import keys_contiguous

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreted Triton on CPU (the GPU run is tests/gpu/test_triton_attention_gpu.py)",
)
triton_backend = pytest.importorskip("hf_fp8_attention.backends.triton")
_launch = triton_backend._launch
triton_fp8_attention = triton_backend.triton_fp8_attention


def _quantized(b, h_q, h_kv, s_q, s_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: torch.randn(b, s, h, d, generator=g).to(torch.bfloat16).transpose(1, 2)  # noqa: E731
    return quantize_qkv_fp8_reference(mk(h_q, s_q), mk(h_kv, s_kv), mk(h_kv, s_kv))


def _dequantized_sdpa32(qkv, is_causal, scale):
    """float32 SDPA on the dequantized e4m3 inputs (BSHD in, BSHD out)."""
    h_kv = qkv.k.shape[2]
    group = qkv.q.shape[2] // h_kv

    def deq(t, descale, rep):
        return (t.float() * descale.repeat_interleave(rep, dim=1)[:, None, :, None]).transpose(1, 2)

    q, k, v = deq(qkv.q, qkv.q_descale, group), deq(qkv.k, qkv.k_descale, 1), deq(qkv.v, qkv.v_descale, 1)
    s_q, s_kv = q.shape[2], k.shape[2]
    mask = torch.ones(s_q, s_kv, dtype=torch.bool).tril(s_kv - s_q) if is_causal else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    return out.transpose(1, 2)


CASES = [
    # b, h_q, h_kv, s_q, s_kv, d, config
    (1, 2, 2, 40, 40, 64, {"BLOCK_M": 16, "BLOCK_N": 16}),  # MHA, several tiles, tails
    (2, 4, 2, 33, 70, 96, {"BLOCK_M": 32, "BLOCK_N": 16}),  # GQA packed rows, D=96 padded, S_q < S_kv
    (1, 4, 1, 24, 24, 128, {"BLOCK_M": 32, "BLOCK_N": 32}),  # MQA
    (1, 2, 2, 20, 52, 256, {"BLOCK_M": 16, "BLOCK_N": 16}),  # D=256
    (2, 8, 2, 1, 100, 128, None),  # decode: heuristic tiles, GQA rows packed
    (1, 2, 2, 20, 100, 64, {"BLOCK_M": 16, "BLOCK_N": 16, "num_splits": 4}),  # split keys, empty splits
]


@pytest.mark.parametrize("b,h_q,h_kv,s_q,s_kv,d,config", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(b, h_q, h_kv, s_q, s_kv, d, config, causal):
    qkv = _quantized(b, h_q, h_kv, s_q, s_kv, d)
    scale = d**-0.5
    out = _launch(qkv, causal, scale, torch.float32, config=config)
    ref = reference_fp8_attention(qkv, is_causal=causal, scale=scale, out_dtype=torch.float32)
    exact = _dequantized_sdpa32(qkv, causal, scale)
    assert out.shape == (b, s_q, h_q, d) and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert sqnr_db(out, ref) > 30.0
    assert sqnr_db(out, exact) > 25.0 and sqnr_db(ref, exact) > 25.0


@pytest.mark.parametrize("causal", [False, True])
def test_one_key_block_equals_reference(causal):
    """With all keys in one block the running max is the final max: same P roundings as the reference."""
    qkv = _quantized(2, 4, 2, 24, 30, 64, seed=1)
    out = _launch(qkv, causal, 0.125, torch.float32, config={"BLOCK_M": 16, "BLOCK_N": 32})
    ref = reference_fp8_attention(qkv, is_causal=causal, scale=0.125, out_dtype=torch.float32)
    assert sqnr_db(out, ref) > 60.0


def test_gqa_equals_repeated_kv():
    qkv = _quantized(1, 8, 2, 20, 36, 64, seed=2)
    rep = lambda t: t.repeat_interleave(4, dim=2).contiguous()  # noqa: E731
    rep_d = lambda t: t.repeat_interleave(4, dim=1).contiguous()  # noqa: E731
    mha = QuantizedQKV(qkv.q, rep(qkv.k), rep(qkv.v), rep_d(qkv.q_descale), rep_d(qkv.k_descale),
                       rep_d(qkv.v_descale))
    config = {"BLOCK_M": 16, "BLOCK_N": 16}
    for causal in (False, True):
        out = _launch(qkv, causal, 0.125, torch.float32, config=config)
        out_mha = _launch(mha, causal, 0.125, torch.float32, config=config)
        torch.testing.assert_close(out, out_mha, rtol=1e-6, atol=1e-6)


def test_split_keys_match_one_pass():
    qkv = _quantized(1, 4, 1, 3, 90, 128, seed=3)
    one = _launch(qkv, True, 0.1, torch.float32, config={"BLOCK_M": 16, "BLOCK_N": 16, "num_splits": 1})
    split = _launch(qkv, True, 0.1, torch.float32, config={"BLOCK_M": 16, "BLOCK_N": 16, "num_splits": 8})
    assert sqnr_db(split, one) > 35.0


def test_split_keys_with_very_negative_scores():
    """Rows that see no key of a split must not set the combine's max (strongly negative scores: the
    real maxima sit ~300 below zero in log2 units, where a stored 0 would underflow every weight)."""
    g = torch.Generator().manual_seed(5)
    b, h, s_q, s_kv, d = 1, 1, 3, 97, 128
    q = (-4.0 + 0.01 * torch.randn(b, s_q, h, d, generator=g)).bfloat16().transpose(1, 2)
    k = (4.0 + 0.01 * torch.randn(b, s_kv, h, d, generator=g)).bfloat16().transpose(1, 2)
    v = torch.randn(b, s_kv, h, d, generator=g).bfloat16().transpose(1, 2)
    qkv = quantize_qkv_fp8_reference(q, k, v)
    ref = reference_fp8_attention(qkv, is_causal=True, scale=0.1, out_dtype=torch.float32)
    split = _launch(qkv, True, 0.1, torch.float32, config={"BLOCK_M": 16, "BLOCK_N": 16, "num_splits": 8})
    assert torch.isfinite(split).all()
    assert sqnr_db(split, ref) > 30.0


def test_keys_contiguous_v_and_out_dtypes():
    qkv = _quantized(1, 2, 2, 16, 48, 64, seed=4)
    config = {"BLOCK_M": 16, "BLOCK_N": 16}
    base = _launch(qkv, True, 0.125, torch.float32, config=config)
    vt = _launch(qkv, True, 0.125, torch.float32, config=config, v_keys_contiguous=True)
    torch.testing.assert_close(vt, base, rtol=0, atol=0)
    # A BSHD view of keys-contiguous V memory is read in place.
    v_view = keys_contiguous(qkv.v)
    view_qkv = QuantizedQKV(qkv.q, qkv.k, v_view, qkv.q_descale, qkv.k_descale, qkv.v_descale)
    torch.testing.assert_close(_launch(view_qkv, True, 0.125, torch.float32, config=config), base, rtol=0, atol=0)
    for dtype in (torch.bfloat16, torch.float16):
        out = triton_fp8_attention(qkv, is_causal=True, scale=0.125, out_dtype=dtype)
        assert out.dtype == dtype and out.shape == base.shape
        assert sqnr_db(out, base) > 30.0


def test_rejects_bad_inputs():
    qkv = _quantized(1, 2, 2, 8, 8, 64)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        bad = QuantizedQKV(qkv.q.float(), qkv.k, qkv.v, qkv.q_descale, qkv.k_descale, qkv.v_descale)
        triton_fp8_attention(bad, is_causal=False, scale=0.1, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        odd = _quantized(1, 2, 2, 8, 8, 80)
        triton_fp8_attention(odd, is_causal=False, scale=0.1, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        triton_fp8_attention(qkv, is_causal=False, scale=0.1, out_dtype=torch.int8)


def test_quantizer_writes_the_v_layout_the_backend_reads(monkeypatch):
    """A prefill the triton backend reads V keys-contiguous for (thresholds lowered to a tiny shape): the
    fused pipeline has the quantizer write V so, and the backend gets a unit key stride (no copy of its own);
    the output equals the pipeline whose quantizer writes BSHD V (then copied by the backend) bit for bit."""
    import dataclasses

    import hf_fp8_attention.attention as attention
    import hf_fp8_attention.backends as backends
    from hf_fp8_attention.options import FP8AttentionOptions

    monkeypatch.setattr(backends, "TRITON_V_KEYS_MIN_KEYS_X_DIM", 48 * 64)
    seen = []
    real = triton_backend._launch

    def spy(qkv, *args, **kwargs):
        seen.append(qkv.v.stride(1))
        return real(qkv, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "_launch", spy)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 48, 4, 64, generator=g).bfloat16().transpose(1, 2)  # 96 rows per KV head: prefill path
    k = torch.randn(1, 48, 2, 64, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(1, 48, 2, 64, generator=g).bfloat16().transpose(1, 2)
    opts = FP8AttentionOptions()

    def run():
        return attention.fp8_attention(q, k, v, None, None, None, None, None, None, True, 0.125, "triton", "triton",
                                       opts)

    assert backends.triton_reads_v_keys_contiguous(48, 4, 2, 48, 64)
    fused = run()
    # the triton record without its V layout: the quantizer writes BSHD V, the backend copies it
    monkeypatch.setitem(backends.REGISTRY, "triton",
                        dataclasses.replace(backends.REGISTRY["triton"], v_keys_contiguous=None))
    copied = run()
    assert seen == [1, 2 * 64]  # keys-contiguous from the quantizer, then BSHD (the backend copies it)
    assert torch.equal(fused, copied)
