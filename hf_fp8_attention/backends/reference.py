"""Pure-torch FP8 attention that emulates the FA3 fp8 kernel's rounding. Input/output layout: BSHD.

It computes in float32 from the same e4m3 Q/K/V and descales the GPU backends get, and casts the softmax
probabilities to e4m3 before the P.V product as FA3 does: FA3 keeps the row max offset by 8 in log2
space (``Max_offset = 8`` in hopper/softmax.h), so P is scaled by 2**8 into [0, 256] before the cast,
and the row sum comes from the float32 P. Runs on CPU and GPU; it is what CPU users and CI run, and its
error against a float32 reference tracks fa3's on the same inputs up to a few thousand keys. It accumulates
P.V in float32 and so does not model the reduced precision of Hopper's fp8 MMA accumulator, which costs
FA3 accuracy on long rows (V with a channel offset: 16.8 dB at 8k, 3.6 dB at 128k on the H200, while this
reference keeps ~54 dB); only a GPU test can show that (tests/gpu/test_long_context_gpu.py).
"""

from __future__ import annotations

import torch

from .._constants import FP8_DTYPE, SCALE_BLOCK, V_SCALE_BLOCK
from ..quantization import QuantizedQKV
from ..quantization.quantized import key_ordered_v
from ..quantization.reference import quantize_q_per_head

# P is multiplied by 2**P_LOG2_OFFSET before its e4m3 cast (FA3's Max_offset for 8-bit inputs).
P_LOG2_OFFSET = 8
# Bound on the float32 score block materialised per step (elements), so long sequences fit in memory.
_MAX_SCORE_ELEMENTS = 1 << 26


def reference_fp8_attention(
    qkv: QuantizedQKV, *, is_causal: bool, scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """Attention over e4m3 Q/K/V with per-(batch, KV head) descales.

    Args:
        qkv: q (B, S_q, H_q, D), k/v (B, S_kv, H_kv, D) float8_e4m3fn; descales (B, H_kv) float32, or
            per-block Q/K descales (`QuantizedQKV.block_scales`) and optionally V ones (`v_block_scales`).
        is_causal: causal mask aligned to the bottom right (query i sees keys j <= i + S_kv - S_q).
        scale: softmax scale applied to Q.K^T.
        out_dtype: dtype of the result.
    Returns:
        (B, S_q, H_q, D) tensor of ``out_dtype``, contiguous.
    """
    qkv = quantize_q_per_head(qkv)  # (a bundle that left Q to the Gluon kernel)
    q8, k8, v8 = qkv.q, qkv.k, key_ordered_v(qkv)
    batch, s_q, h_q, dim = q8.shape
    s_kv, h_kv = k8.shape[1], k8.shape[2]
    group = h_q // h_kv

    # (B, H_kv, G, S_q, D) and (B, H_kv, 1, S_kv, D): GQA by broadcasting, never repeating K/V.
    q = q8.float().view(batch, s_q, h_kv, group, dim).permute(0, 2, 3, 1, 4)
    k = k8.float().permute(0, 2, 1, 3).unsqueeze(2)
    v = v8.float().permute(0, 2, 1, 3).unsqueeze(2)
    per_token = lambda d, block, n: d.repeat_interleave(block, dim=-1)[..., :n]  # noqa: E731
    if qkv.block_scales:  # a descale per SCALE_BLOCK (Q) / k_scale_block (K) tokens: dequantize Q and K with them
        q = q * per_token(qkv.q_block_descale, SCALE_BLOCK, s_q).view(batch, h_kv, group, s_q, 1)
        k = k * per_token(qkv.k_block_descale, qkv.k_scale_block, s_kv).view(batch, h_kv, 1, s_kv, 1)
        qk_scale = torch.full((batch, h_kv, 1, 1, 1), scale, device=q8.device)
    else:
        qk_scale = (qkv.q_descale * qkv.k_descale * scale).view(batch, h_kv, 1, 1, 1)
    if qkv.v_block_scales:  # a descale per V_SCALE_BLOCK keys: dequantize V with them (the triton kernel
        # multiplies each key tile's float32 P.V product by its descale, the same sum in another order)
        v = v * per_token(qkv.v_block_descale, V_SCALE_BLOCK, s_kv).view(batch, h_kv, 1, s_kv, 1)
        v_descale = torch.ones((batch, h_kv, 1, 1, 1), device=q8.device)
    else:
        v_descale = qkv.v_descale.view(batch, h_kv, 1, 1, 1)
    p_scale = float(2**P_LOG2_OFFSET)

    out = torch.empty(batch, h_kv, group, s_q, dim, dtype=torch.float32, device=q8.device)
    rows_per_step = max(1, _MAX_SCORE_ELEMENTS // max(1, batch * h_q * s_kv))
    key_pos = torch.arange(s_kv, device=q8.device)
    for start in range(0, s_q, rows_per_step):
        stop = min(s_q, start + rows_per_step)
        scores = torch.matmul(q[:, :, :, start:stop], k.transpose(-1, -2)) * qk_scale
        if is_causal:
            query_pos = torch.arange(start, stop, device=q8.device) + (s_kv - s_q)
            masked = key_pos[None, :] > query_pos[:, None]
            scores = scores.masked_fill(masked, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores - row_max)
        row_sum = p.sum(dim=-1, keepdim=True)
        p8 = (p * p_scale).to(FP8_DTYPE).float()
        out[:, :, :, start:stop] = torch.matmul(p8, v) * (v_descale / (row_sum * p_scale))
    # (B, H_kv, G, S_q, D) -> (B, S_q, H_q, D)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, s_q, h_q, dim).to(out_dtype, memory_format=torch.contiguous_format)
