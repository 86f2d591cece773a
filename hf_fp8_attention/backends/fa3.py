"""FA3 (Hopper, SM 9.x) FP8 attention. Input/output layout: BSHD. Supports GQA/MQA.

Calls ``flash_attn_interface._flash_attn_forward`` (a torch custom op shipped by the FA3 wheel, extra
``[fa3]``) with e4m3 Q/K/V and (B, H_kv) float32 descales. FA3's fp8 kernel always writes bf16; an fp16
caller gets one cast of the output.
"""

from __future__ import annotations

import torch

from ..quantization import QuantizedQKV


def _load_kernel():
    from flash_attn_interface import _flash_attn_forward

    return _flash_attn_forward


def fa3_fp8_attention(qkv: QuantizedQKV, *, is_causal: bool, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """q (B, S_q, H_q, D), k/v (B, S_kv, H_kv, D) e4m3 -> (B, S_q, H_q, D) ``out_dtype``."""
    kernel = _load_kernel()
    out = kernel(
        qkv.q,
        qkv.k,
        qkv.v,
        q_descale=qkv.q_descale,
        k_descale=qkv.k_descale,
        v_descale=qkv.v_descale,
        softmax_scale=scale,
        causal=is_causal,
    )[0]
    return out if out.dtype == out_dtype else out.to(out_dtype)
