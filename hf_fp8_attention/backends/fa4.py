"""FA4 (CuTe DSL, Blackwell SM 10.x) FP8 attention. Input/output layout: BSHD. Supports GQA/MQA.

FA4 runs FP8 only on SM 10.x; `dispatch.check_backend` rejects other GPUs with an error naming fp8_fa3.
The descales must reach the kernel: without them it would attend over the raw e4m3 codes (a peer's FA4
path once dropped them and produced garbage); tests replace `_load_kernel` with a recording fake.
"""

from __future__ import annotations

import torch

from ..quantization import QuantizedQKV
from ..quantization.quantized import channels_contiguous, key_ordered_v
from ..quantization.reference import quantize_q_per_head


def _load_kernel():
    # The public flash_attn.cute.flash_attn_func (4.0.0b36) takes no descales; the forward it wraps does:
    # _flash_attn_fwd(q, k, v, ..., q_descale=, k_descale=, v_descale=) with (B, H_kv) float32 descales,
    # returning a tuple whose first item is the BSHD bf16 output.
    from flash_attn.cute.interface import _flash_attn_fwd

    return _flash_attn_fwd


def fa4_fp8_attention(qkv: QuantizedQKV, *, is_causal: bool, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """q (B, S_q, H_q, D), k/v (B, S_kv, H_kv, D) e4m3 -> (B, S_q, H_q, D) ``out_dtype``."""
    qkv = quantize_q_per_head(qkv)  # (a bundle that left Q to the Gluon kernel)
    kernel = _load_kernel()
    result = kernel(
        qkv.q,
        qkv.k,
        channels_contiguous(key_ordered_v(qkv)),  # (a keys-contiguous V: FA4 reads BSHD)
        softmax_scale=scale,
        causal=is_causal,
        q_descale=qkv.q_descale,
        k_descale=qkv.k_descale,
        v_descale=qkv.v_descale,
    )
    out = result[0] if isinstance(result, (tuple, list)) else result
    return out if out.dtype == out_dtype else out.to(out_dtype)
