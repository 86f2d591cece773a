"""Torch reference of the FP8 KV cache kernels (`kernels.py`): the spec they are tested against, and what runs
on CPU. Block quantization follows `quantization.reference` (amax over finite elements, scale = FP8_MAX /
amax by tensor division, RNE e4m3, NaN where the input is not finite)."""

from __future__ import annotations

import math

import torch

from .._constants import FP8_DTYPE, KV_BLOCK
from .._intmath import cdiv
from ..quantization.reference import _finite_abs, _rotate, _scales, _to_fp8, apply_rope_reference, quantize_blocks_bhsd


def rotate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., D) float32 @ (H_D / sqrt(D)) as the cache kernels rotate K (write) and Q (attention): rows rounded to
    ``dtype`` (the input's) first, float32 sums (the quantize kernel's rotation, `quantization.reference`)."""
    return _rotate(x, dtype)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, S, D) float32 -> (e4m3 (B, H, S, D), descale (B, H, cdiv(S, KV_BLOCK)) float32): one scale per
    KV_BLOCK tokens of one head, the rules of the per-block Q/K scales."""
    return quantize_blocks_bhsd(x, KV_BLOCK)


def dequantize(codes: torch.Tensor, descale: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens as float32 (B, H, length, D): codes times their block's descale."""
    per_token = descale[:, :, : cdiv(length, KV_BLOCK)].repeat_interleave(KV_BLOCK, dim=2)[:, :, :length]
    return codes[:, :, :length].float() * per_token[..., None]


def _scaled_queries(query, cos, sin, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """query (B, S_q, H_q, D) un-rotated -> RoPE (cos/sin), rotation (``rotate``), each row scaled to an amax
    of 448: (the scaled rows (B, H_q, S_q, D) float32, not yet rounded; their descales (B, H_q, S_q))."""
    q = query.float().transpose(1, 2)
    if cos is not None:
        q = apply_rope_reference(q, cos, sin)
    if rotate:
        q = _rotate(q, query.dtype)
    q_scale, q_descale = _scales(_finite_abs(q).amax(dim=-1))
    return q * q_scale[..., None], q_descale


def prepare_queries(query, cos, sin, *, rotate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode build's Q operand as `cache_write_kernel`'s PREP_Q stores it: query (B, S_q, H_q, D)
    un-rotated -> RoPE (cos/sin), rotation (``rotate``), a scale per row -> (fp16 operand (B, S_q, H_q, D),
    row descale (B, S_q, H_q) float32)."""
    q, q_descale = _scaled_queries(query, cos, sin, rotate)
    return q.half().transpose(1, 2).contiguous(), q_descale.transpose(1, 2).contiguous()


def cache_attention_reference(query, cos, sin, k8, k_desc, v8, v_desc, length: int, *, scale: float,
                              qk_fp8: bool, rotate: bool = False, q_descale=None,
                              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """What `cache_attn_kernel` computes, with one softmax max per row instead of the online one.

    query (B, S_q, H_q, D) un-rotated when cos/sin (B or 1, S_q, D) are given; the queries are the last S_q
    of the ``length`` cached keys (bottom-right causal). Each query row (position, head) is scaled to an amax of
    448; qk_fp8: Q and P rounded to e4m3, else to fp16. Scores in base 2 with FA3's max offset
    8 (P in [0, 256]), the row sum of the unrounded P. rotate: the cache holds Hadamard-rotated keys; the
    queries are rotated the same way after RoPE (`rotate`). q_descale (B, S_q, H_q): query is the prepared
    fp16 operand with these row descales (`prepare_queries`; fp16 products). Returns (B, S_q, H_q, D) in
    ``out_dtype`` (default: query's), rounded once from float32 as the kernel stores it.
    """
    B, S_q, H_q, D = query.shape
    H_kv = k8.shape[1]
    log2_scale = scale * math.log2(math.e)
    if q_descale is not None:
        q_op, q_descale = query.float().transpose(1, 2), q_descale.transpose(1, 2)
    else:
        q, q_descale = _scaled_queries(query, cos, sin, rotate)  # (B, H_q, S_q, D)
        q_op = _to_fp8(q).float() if qk_fp8 else q.half().float()
    row_scale = q_descale * log2_scale
    group = H_q // H_kv
    k_codes = k8[:, :, :length].float().repeat_interleave(group, dim=1)
    k_blk = k_desc[:, :, : cdiv(length, KV_BLOCK)].repeat_interleave(KV_BLOCK, dim=2)[:, :, :length]
    scores = (q_op @ k_codes.transpose(-1, -2)) * (row_scale[..., None] * k_blk.repeat_interleave(group, dim=1)[:, :, None])
    visible = torch.ones(S_q, length, dtype=torch.bool, device=query.device).tril(length - S_q)
    scores = scores.masked_fill(~visible, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp2(scores - (m - 8.0))
    row_sum = p.sum(dim=-1, keepdim=True)
    p_r = p.to(FP8_DTYPE if qk_fp8 else torch.float16).float()
    v = dequantize(v8, v_desc, length).repeat_interleave(group, dim=1)
    out = (p_r @ v) / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return out.transpose(1, 2).to(out_dtype or query.dtype)

