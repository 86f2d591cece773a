"""Launcher of the Triton FP8 Q/K/V quantization. Input BHSD (any strides), output BSHD contiguous fp8.

Two launches whatever the shapes: phase 1 (partial amax per chunk) and phase 2 (group amax, scale,
quantize, descale), each over one flat grid that covers q, k and v. This is the only module that reads
strides, allocates and builds grids; the math is the one of `reference.py`, bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from .._constants import FP8_DTYPE, FP8_MAX
from .kernels import qkv_amax_kernel, qkv_quantize_kernel
from .reference import QuantizedQKV, _check_rope_args

# Elements of one (BLOCK_S, D) tile, the two half tiles together: 16 KiB of bf16 in flight per program.
# Registers (sm_90, triton 3.9 ptxas): ~50 per thread at 4 warps without RoPE; with RoPE the cos/sin
# tiles raise it to ~155 (bf16 cos) / ~230 (fp32 cos) at 4 warps, so RoPE runs 8 warps (~80-120).
_TILE_ELEMS = 8192
# Partials one phase-2 program reduces: at most this many (G heads x chunks). The chunk length grows with
# S so that this redundant (L2-resident) read stays small next to the chunk's own data.
_MAX_GROUP_PARTIALS = 512
_MAX_CHUNKS_PER_HEAD = 128
_R_BLOCK = 128


def _tile_config(head_dim: int, apply_rope: bool) -> tuple[int, int, int]:
    """(HALF_BLOCK, BLOCK_S, num_warps) for a head dim; D=96 pads its 48-wide halves to 64.
    BLOCK_S: 128 for D=64, 64 for D=96/128, 32 for D=256."""
    half_block = triton.next_power_of_2(head_dim // 2)
    block_s = max(16, min(128, _TILE_ELEMS // (2 * half_block)))
    num_warps = 8 if (apply_rope or head_dim > 128) else 4
    return half_block, block_s, num_warps


def _chunking(seq_len: int, group: int, block_s: int) -> tuple[int, int]:
    """(chunk length, number of chunks) of one head: a multiple of BLOCK_S, and few enough chunks that a
    phase-2 program reduces at most _MAX_GROUP_PARTIALS partials of its group."""
    max_chunks = max(1, min(_MAX_CHUNKS_PER_HEAD, _MAX_GROUP_PARTIALS // group))
    tiles = triton.cdiv(max(seq_len, 1), block_s)
    chunk = triton.cdiv(tiles, max_chunks) * block_s
    return chunk, triton.cdiv(seq_len, chunk)


def quantize_qkv_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
) -> QuantizedQKV:
    """FP8 quantization of Q, K, V with per-(batch, KV head) scales, optional RoPE on Q and K (Triton).

    Args:
        q: (B, H_q, S_q, D) bf16/fp16, any strides (HF hands BSHD memory viewed as BHSD; no copy is made).
        k, v: (B, H_kv, S_kv, D), same dtype as q, any strides; H_q % H_kv == 0; D in (64, 96, 128, 256).
        cos, sin: optional (B_c, S_q, D), B_c in {1, B}, any float dtype and strides; only with
            S_q == S_kv (prefill).

    Returns:
        QuantizedQKV: q (B, S_q, H_q, D), k and v (B, S_kv, H_kv, D) float8_e4m3fn contiguous; q_descale,
        k_descale, v_descale (B, H_kv) float32 (views of one (3, B, H_kv) buffer). Identical to
        `quantize_qkv_fp8_reference`.

    Raises:
        ValueError: cos/sin given with mismatched shapes or with S_q != S_kv; q, k, v dtypes differ.
    """
    _check_rope_args(q, k, cos, sin)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H_q, S_q, D = q.shape
    H_kv, S_kv = k.shape[1], k.shape[2]
    group = H_q // H_kv
    device = q.device

    apply_rope = cos is not None
    half_block, block_s, num_warps = _tile_config(D, apply_rope)
    chunk_q, n_chunks_q = _chunking(S_q, group, block_s)
    chunk_kv, n_chunks_kv = _chunking(S_kv, 1, block_s)
    n_programs = B * H_q * n_chunks_q + 2 * B * H_kv * n_chunks_kv

    q_out = torch.empty((B, S_q, H_q, D), dtype=FP8_DTYPE, device=device)
    k_out = torch.empty((B, S_kv, H_kv, D), dtype=FP8_DTYPE, device=device)
    v_out = torch.empty((B, S_kv, H_kv, D), dtype=FP8_DTYPE, device=device)
    if S_q == 0 or S_kv == 0 or B == 0:
        descale = torch.ones((3, B, H_kv), dtype=torch.float32, device=device)
        return QuantizedQKV(q_out, k_out, v_out, descale[0], descale[1], descale[2])
    descale = torch.empty((3, B, H_kv), dtype=torch.float32, device=device)
    partial = torch.empty((n_programs,), dtype=torch.float32, device=device)

    if apply_rope:
        # A batch-1 cos/sin is broadcast over the batch by a zero batch stride.
        cos_strides = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2))
        sin_strides = (0 if sin.shape[0] == 1 else sin.stride(0), sin.stride(1), sin.stride(2))
    else:
        cos = sin = partial  # never read: APPLY_ROPE=False removes the loads
        cos_strides = sin_strides = (0, 0, 0)
    d_contig = q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1

    common = (
        B, H_q, H_kv, S_q, S_kv, n_chunks_q, n_chunks_kv, chunk_q, chunk_kv,
        *q.stride(), *k.stride(), *v.stride(), *cos_strides, *sin_strides,
    )
    grid = (n_programs,)
    # ---- Phase 1: partial amax per (tensor, b, head, chunk) ----
    qkv_amax_kernel[grid](
        q, k, v, cos, sin, partial, *common,
        HEAD_DIM=D, HALF_BLOCK=half_block, BLOCK_S=block_s, D_CONTIG=d_contig, APPLY_ROPE=apply_rope,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    # ---- Phase 2: group amax -> scale, quantize into BSHD, descales ----
    qkv_quantize_kernel[grid](
        q, k, v, cos, sin, partial, q_out, k_out, v_out, descale, *common,
        FP8_MAX=FP8_MAX, HEAD_DIM=D, HALF_BLOCK=half_block, BLOCK_S=block_s, R_BLOCK=_R_BLOCK,
        D_CONTIG=d_contig, APPLY_ROPE=apply_rope,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return QuantizedQKV(q_out, k_out, v_out, descale[0], descale[1], descale[2])
