"""Varlen (packed sequences, cu_seqlens) quantization: the Triton kernel (interpreted on CPU) equals the
reference, and the reference equals quantizing every sequence on its own (scales per (sequence, KV head))."""

import pytest
import torch
from test_quantize import _interpreter_bf16_dot, assert_close_modes, assert_identical, make_rope  # noqa: F401 (fixture)

from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import (
    check_cu_seqlens,
    quantize_qkv_fp8_reference,
    quantize_qkv_fp8_varlen,
    quantize_qkv_fp8_varlen_reference,
)
from hf_fp8_attention.quantization import qkv as qkv_launcher

ON_CUDA = torch.cuda.is_available()


def packed(lengths_q, lengths_k, H_q, H_kv, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = (torch.randn(tq, H_q, D, generator=g) * 3).to(dtype)
    k = torch.randn(tk, H_kv, D, generator=g).to(dtype)
    v = (torch.randn(tk, H_kv, D, generator=g) * 0.5).to(dtype)
    # sequences with very different ranges: a shared scale would show
    for i, (a, b) in enumerate(zip([0, *torch.tensor(lengths_k).cumsum(0).tolist()], torch.tensor(lengths_k).cumsum(0).tolist())):
        k[a:b] *= 1 + 20 * (i % 2)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


def test_reference_is_each_sequence_alone():
    q, k, v, cu_q, cu_k = packed([5, 1, 9], [7, 3, 9], 4, 2, 64)
    got = quantize_qkv_fp8_varlen_reference(q, k, v, cu_q, cu_k, 9, 9)
    assert got.is_varlen and got.q.shape == (1, 15, 4, 64) and got.k_descale.shape == (3, 2)
    for i, part in enumerate(got.sequences()):
        (q0, q1), (k0, k1) = cu_q[i : i + 2].tolist(), cu_k[i : i + 2].tolist()
        alone = quantize_qkv_fp8_reference(*(x[a:b].transpose(0, 1)[None] for x, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))))
        assert_identical(part, alone)


VARLEN_CASES = [
    # lengths_q, lengths_k, H_q, H_kv, D, rope, mode (hadamard, smooth_k, smooth_v)
    pytest.param([37, 5, 64], [37, 5, 64], 2, 2, 64, False, ("none", False, False), id="mha-d64"),
    pytest.param([3, 1, 2], [40, 70, 2], 4, 1, 128, False, ("none", False, False), id="mqa-d128-decode-like"),
    pytest.param([33, 9], [33, 9], 4, 2, 96, True, ("none", False, False), id="rope-gqa-d96"),
    pytest.param([70, 13, 1], [70, 13, 1], 4, 2, 128, True, ("qkv", True, True), id="rope-qkv-smooth_kv-d128"),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: x / 0 in the untaken branch of a where
@pytest.mark.usefixtures("quantize_path")
@pytest.mark.parametrize("lq,lk,H_q,H_kv,D,rope,mode", VARLEN_CASES)
def test_kernel_matches_reference(lq, lk, H_q, H_kv, D, rope, mode, monkeypatch, quantize_path):
    # the split path's RoPE needs one offsets tensor for q and k; the persistent kernel keeps two equal ones
    _check_varlen(lq, lk, H_q, H_kv, D, rope, mode, monkeypatch, share_offsets=quantize_path == "split")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("lq,lk,H_q,H_kv,D,rope,mode", [c for c in VARLEN_CASES if c.values[5]])
def test_kernel_matches_reference_interleaved(lq, lk, H_q, H_kv, D, rope, mode, monkeypatch, persistent_path):
    """The interleaved q/k item order (long RoPE prefills) on packed sequences, one tile per item."""
    monkeypatch.setattr(qkv_launcher, "_INTERLEAVE", True)
    monkeypatch.setattr(qkv_launcher, "_CHUNK_SHORT", 1)
    _check_varlen(lq, lk, H_q, H_kv, D, rope, mode, monkeypatch)


def _check_varlen(lq, lk, H_q, H_kv, D, rope, mode, monkeypatch, share_offsets=False):
    monkeypatch.setattr(qkv_launcher, "_LAG_PER_PROGRAM", 0.0)  # smallest lag: waits across sequences
    device = "cuda" if ON_CUDA else "cpu"
    q, k, v, cu_q, cu_k = (t.to(device) for t in packed(lq, lk, H_q, H_kv, D))
    if share_offsets and lq == lk:  # one offsets tensor: RoPE can take the split path's RoPE kernel
        cu_k = cu_q
    cos = sin = None
    if rope:
        cos, sin = (t.to(device) for t in make_rope(1, sum(lq), D, torch.float32))
        cos = cos[0] if D == 96 else cos  # (total, D) and (1, total, D) both accepted
        sin = sin[0] if D == 96 else sin
    hadamard, smooth_k, smooth_v = mode
    kw = dict(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v)
    args = (q, k, v, cu_q, cu_k, max(lq), max(lk), cos, sin)
    got, ref = quantize_qkv_fp8_varlen(*args, options=FP8AttentionOptions(**kw)), quantize_qkv_fp8_varlen_reference(*args, options=FP8AttentionOptions(**kw))
    assert got.is_varlen and got.max_seqlen_q == max(lq)
    if mode == ("none", False, False):
        assert_identical(got, ref)
    else:
        assert_close_modes(got, ref, rope, hadamard)


@pytest.mark.parametrize(
    "cu_q,cu_k,causal,match",
    [
        ([0, 6, 6], [0, 3, 6], False, "strictly increasing"),
        ([0, 3, 6], [0, 3, 5], False, "end at the packed length 6"),
        ([1, 3, 6], [0, 3, 6], False, "start at 0"),
        ([0, 3, 6], [0, 6], False, "hold 2 and 1 sequences"),
        ([0, 4, 6], [0, 3, 6], True, "sequence 0"),
    ],
)
def test_check_cu_seqlens_errors(cu_q, cu_k, causal, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32), 6, 6,
                         is_causal=causal)
    with pytest.raises(ValueError, match="int32"):
        check_cu_seqlens(torch.tensor([0, 6]), torch.tensor([0, 6]), 6, 6)


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kernel_writes_keys_contiguous_v_packed(quantize_path):
    """v_keys_contiguous on packed sequences: V's codes in (1, H_kv, D, total) memory, byte for byte the BSHD
    launch's and the reference's (each sequence at its packed rows)."""
    from test_quantize import _fp8_bytes

    q, k, v, cu_q, cu_k = packed([37, 5, 20], [37, 5, 20], 4, 2, 64)
    bshd = quantize_qkv_fp8_varlen(q, k, v, cu_q, cu_k, 37, 37)
    got = quantize_qkv_fp8_varlen(q, k, v, cu_q, cu_k, 37, 37, v_keys_contiguous=True)
    ref = quantize_qkv_fp8_varlen_reference(q, k, v, cu_q, cu_k, 37, 37, v_keys_contiguous=True)
    assert got.v.shape == (1, 62, 2, 64) and got.v.stride() == (2 * 64 * 62, 1, 64 * 62, 62)
    assert ref.v.stride() == got.v.stride()
    assert torch.equal(_fp8_bytes(got.v), _fp8_bytes(bshd.v))
    assert torch.equal(_fp8_bytes(got.v), _fp8_bytes(ref.v))
    assert torch.equal(got.v_descale, bshd.v_descale)
