"""FA3 (Hopper, SM 9.x) FP8 attention. Input/output layout: BSHD. Supports GQA/MQA.

Calls the FA3 wheel's forward op (extra ``[fa3]``: ``flash_attn_interface`` registers
``torch.ops.flash_attn_3``) with e4m3 Q/K/V and (B, H_kv) float32 descales. The op is called directly:
the Python wrapper ``flash_attn_interface._flash_attn_forward`` is a second custom op that also allocates
two empty tensors per call, tens of microseconds that show at short sequences. FA3's fp8 kernel always
writes bf16; an fp16 caller gets one cast of the output.
"""

from __future__ import annotations

import functools

import torch

from ..quantization import QuantizedQKV
from ..quantization.quantized import channels_contiguous


@functools.lru_cache(maxsize=1)
def _load_kernel():
    import flash_attn_interface  # noqa: F401  (loads flash_attn_3._C, which registers torch.ops.flash_attn_3)

    return torch.ops.flash_attn_3.fwd.default


PACK_GQA_MIN_QUERIES = 8192  # pack_gqa_choice: from this many query rows on (measured: 4k lost 1.6-3.4%)


def pack_gqa_choice(qkv: QuantizedQKV, is_causal: bool) -> bool | None:
    """FA3's pack_gqa for this call (the query heads of one KV head share a tile): True for non-causal GQA at
    head_dim 128 with at least PACK_GQA_MIN_QUERIES query rows, else None (FA3's own heuristic, which packs packed sequences and
    query counts far from a multiple of its tile, and otherwise does not).
    Measured on the H200 (`scripts/probe_fa3.py`, GQA 32/8, D=128, fp8, two runs:
    docs/results/fa3_pack_gqa_h200_s23.log, fa3_pack_gqa2_h200_s23.log; there the heuristic does not pack, so
    heuristic vs pack_gqa=False is the same kernel and shows the noise, 0.1-2.4% but 8% once at 8k causal):
    - non-causal, packed vs heuristic: 4k -1.6%; 8k +3.6%, 16k +2.5%, 32k +2.5%, 64k +3.4%, 128k +1.6%;
    - causal: -3.2% at 4k, +5.6% at 8k, +1.5% at 16k, +1.1% at 32k, -1.2% at 64k, +0.1% at 128k: no
      consistent gain, left to FA3;
    - output bit-identical in every case;
    - head_dim 256 and 64, non-causal, side by side (fa3_pack_gqa_dims_h200_s23.log): D=256 -1.1% at 16k and
      64k; D=64 +1.6% / +0.9% against the heuristic but +0.6% / +0.1% against pack_gqa=False, the same kernel:
      noise. The speed table's run with packing at every head_dim (tune_dispatch_h200_s23.md, quantization
      included, against the table before it) had D=256 3-5% slower in five of seven shapes. Left to FA3."""
    if qkv.is_varlen or is_causal or qkv.q.shape[-2] == qkv.k.shape[-2] or qkv.q.shape[-1] != 128:
        return None
    return True if qkv.q.shape[1] >= PACK_GQA_MIN_QUERIES else None


def fa3_fp8_attention(qkv: QuantizedQKV, *, is_causal: bool, scale: float, out_dtype: torch.dtype,
                      pack_gqa: bool | None | str = "auto") -> torch.Tensor:
    """q (B, S_q, H_q, D), k/v (B, S_kv, H_kv, D) e4m3 -> (B, S_q, H_q, D) ``out_dtype``; varlen `qkv`:
    FA3's own varlen path (cu_seqlens), output (1, total_q, H_q, D). pack_gqa: FA3's option; "auto":
    `pack_gqa_choice`; None: FA3's heuristic (`scripts/probe_fa3.py` times the choices)."""
    if pack_gqa == "auto":
        pack_gqa = pack_gqa_choice(qkv, is_causal)
    elif pack_gqa not in (None, True, False):
        raise ValueError(f"pack_gqa is 'auto', None, True or False, got {pack_gqa!r}")
    fwd = _load_kernel()
    # Positional schema of flash_attn_3::fwd (tokenspeed-fa3 3.0.0): q, k, v, k_new, v_new, qv, out,
    # cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
    # page_table, kv_batch_idx, leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale,
    # v_descale, softmax_scale, causal, window_size_left, window_size_right, attention_chunk, softcap,
    # rotary_interleaved, scheduler_metadata, num_splits, pack_gqa, sm_margin, sinks.
    if qkv.is_varlen:  # packed sequences: (total, H, D) tensors, offsets and longest lengths, (N, H_kv) descales
        q, k, v = qkv.q[0], qkv.k[0], channels_contiguous(qkv.v[0])
        varlen = (qkv.cu_seqlens_q, qkv.cu_seqlens_k, None, None, None, qkv.max_seqlen_q, qkv.max_seqlen_k)
    else:
        q, k, v = qkv.q, qkv.k, channels_contiguous(qkv.v)  # (a keys-contiguous V: FA3 reads BSHD)
        varlen = (None,) * 7
    out = fwd(
        q, k, v, None, None, None, None,
        *varlen,
        None, None, None, None, None, None,
        qkv.q_descale, qkv.k_descale, qkv.v_descale,
        scale, is_causal, -1, -1, 0, 0.0,
        True, None, 1, pack_gqa, 0, None,
    )[0]
    if qkv.is_varlen:
        out = out.unsqueeze(0)
    return out if out.dtype == out_dtype else out.to(out_dtype)
