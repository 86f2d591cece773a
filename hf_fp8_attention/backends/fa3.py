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
from ..quantization.quantized import channels_contiguous, key_ordered_v
from ..quantization.reference import quantize_q_per_head


@functools.lru_cache(maxsize=1)
def _load_kernel():
    import flash_attn_interface  # noqa: F401  (loads flash_attn_3._C, which registers torch.ops.flash_attn_3)

    return torch.ops.flash_attn_3.fwd.default


PACK_GQA_MIN_QUERIES = 8192  # pack_gqa_choice: from this many query rows per sequence (4k lost 1.6-3.4%)


def pack_gqa_choice(qkv: QuantizedQKV, is_causal: bool) -> bool | None:
    """FA3's pack_gqa for this call (the query heads of one KV head share a tile): True for non-causal GQA at
    head_dim 128 with at least PACK_GQA_MIN_QUERIES query rows per sequence, else None (FA3's own heuristic,
    which packs packed sequences and query counts far from a multiple of its tile, and otherwise does not).
    Measured on the H200 with `scripts/probe_fa3.py`, one run per length (README, session 23): non-causal GQA
    32/8 at D=128 packed +1.6% to +3.6% from 8k to 128k (8k marginal: +1.2% against the unpacked kernel timed
    twice, whose two timings differed by 0.1-3.8%, once 8%), -1.6% at 4k; causal without a consistent sign;
    D=256 -1.1%, D=64 within the noise; output bit-identical."""
    if qkv.is_varlen or is_causal or qkv.q.shape[-2] == qkv.k.shape[-2] or qkv.q.shape[-1] != 128:
        return None
    return True if qkv.q.shape[1] >= PACK_GQA_MIN_QUERIES else None  # BSHD: shape[1] is S_q


def fa3_fp8_attention(qkv: QuantizedQKV, *, is_causal: bool, scale: float, out_dtype: torch.dtype,
                      pack_gqa: bool | None | str = "auto") -> torch.Tensor:
    """q (B, S_q, H_q, D), k/v (B, S_kv, H_kv, D) e4m3 -> (B, S_q, H_q, D) ``out_dtype``; varlen `qkv`:
    FA3's own varlen path (cu_seqlens), output (1, total_q, H_q, D). pack_gqa: FA3's option; "auto":
    `pack_gqa_choice`; None: FA3's heuristic (`scripts/probe_fa3.py` times the choices)."""
    qkv = quantize_q_per_head(qkv)  # (a bundle that left Q to the Gluon kernel)
    if pack_gqa == "auto":
        pack_gqa = pack_gqa_choice(qkv, is_causal)
    elif pack_gqa is not None and not isinstance(pack_gqa, bool):
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
        q, k, v = qkv.q, qkv.k, channels_contiguous(key_ordered_v(qkv))  # (a keys-contiguous V: FA3 reads BSHD)
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
