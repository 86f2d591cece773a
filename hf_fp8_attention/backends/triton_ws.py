"""Experimental, not dispatched: a Triton FP8 attention forward for Hopper prefill over TMA tensor
descriptors, written for triton's automatic warp specialization of its key loop.

Status (session 17, H200, triton 3.6.0; `scripts/probe_ws.py`, docs/results/ws_probe_h200_s17.log): the
warp-specialized build does not work. Offline sm_90 compiles: the Hopper pass specializes the loop only at
num_warps=4, and crashes (NVGPUWarpSpecialization) on any vector load through pointers in the kernel (the
per-row Q block descales, the per-key K block descales: here scalar loads instead), on a TMA store of the
output, and on one accumulator through the MMA with two loops. On the GPU, the builds that compile hang at
BLOCK_M=128 (every variant tried) and return NaN at BLOCK_M=64 (331 TFLOPS, 0.36x FA3 fp8 at 16k). Built
without warp specialization (WS=False) it gives the current kernel's bits (H200: SQNR inf at 4k). Kept
with its probe so that a later triton can be checked in one call; `gluon_attention.py` is the same loop
with the warp specialization written out in Gluon.

The math is `triton_attention._fp8_attn_fwd_kernel`'s (FA3's fp8 numerics: base-2 online softmax with the
row max offset by 8, P cast to e4m3, each key block's P.V added in float32): one program per BLOCK_M query
rows of one query head (no GQA row packing: a KV head's K/V tiles are read by its G query heads' programs,
mostly from L2), K and keys-contiguous V read through TMA descriptors whose bounds zero-fill past the keys.
Causal: bottom-right aligned; the key blocks below the tile's first row's diagonal run unmasked, the rest
masked. Scales: per-(batch, KV head) descales, or with BLOCK_SCALES a Q descale per SCALE_BLOCK rows and a
K descale per K_SCALE_BLOCK keys (a divisor of BLOCK_N), with V_BLOCK_SCALES a V descale per
V_SCALE_BLOCK keys (a multiple of BLOCK_N). e4m3 Q/K only.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _scalars_to_rows(ptr, n_valid, N: tl.constexpr, BLK: tl.constexpr):
    """(N,) vector whose element i is ptr[min(i // BLK, n_valid - 1)], from N // BLK scalar loads (a vector
    load through pointers anywhere in the kernel crashes triton 3.6's Hopper warp specialization pass:
    WSLowerToken's processProducerCommitOp). Past n_valid (rows or keys beyond the sequence, never stored or
    masked) the last valid entry stands in: no read past the descales."""
    idx = tl.arange(0, N) // BLK
    out = tl.zeros([N], dtype=tl.float32)
    for j in tl.static_range(N // BLK):
        out = tl.where(idx == j, tl.load(ptr + tl.minimum(j, n_valid - 1)), out)
    return out


@triton.jit
def _ws_block(acc, l_i, m_i, q, desc_k, desc_vt, Kb_ptr, Vb_ptr, kb_row, h_kv_col, vt_row, start_n, qk_scale,
              row_limit, S_kv, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, BLOCK_SCALES: tl.constexpr, K_SCALE_BLOCK: tl.constexpr,
              V_BLOCK_SCALES: tl.constexpr, V_SCALE_BLOCK: tl.constexpr, VARIANT: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N): scores, online softmax, the block's P.V added in float32."""
    if VARIANT & 1:  # 2-D descriptor over (B * S_kv, H_kv * D): kb_row is the batch's first row
        k = desc_k.load([kb_row + start_n, h_kv_col])
    else:
        k = desc_k.load([kb_row, start_n, h_kv_col]).reshape(BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, tl.trans(k))
    if BLOCK_SCALES:
        k_blk = _scalars_to_rows(Kb_ptr + start_n // K_SCALE_BLOCK, tl.cdiv(S_kv - start_n, K_SCALE_BLOCK),
                                 BLOCK_N, K_SCALE_BLOCK)
        qk = qk * k_blk[None, :]
        scale = qk_scale[:, None]  # (BLOCK_M, 1): the row's q block descale folded in
    else:
        scale = qk_scale
    if MASKED:
        cols = start_n + tl.arange(0, BLOCK_N)
        qk = tl.where(cols[None, :] <= row_limit[:, None], qk * scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - (m_ij[:, None] - 8.0))
    else:
        if BLOCK_SCALES:
            qk = qk * scale
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - (m_ij[:, None] - 8.0))
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * scale)
            p = tl.math.exp2(qk * scale - (m_ij[:, None] - 8.0))
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    vt = desc_vt.load([vt_row, start_n])  # (HEAD_DIM, BLOCK_N): V's rows of this block, keys contiguous
    if VARIANT & 2:  # one accumulator through the MMA (FA3's; loses long rows' small terms: a probe only)
        acc = tl.dot(p.to(tl.float8e4nv), tl.trans(vt), acc)
    else:
        pv = tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
        if V_BLOCK_SCALES:
            pv = pv * tl.load(Vb_ptr + start_n // V_SCALE_BLOCK)
        acc += pv
    return acc, l_i, m_ij


@triton.jit
def fp8_attn_fwd_ws_kernel(
    desc_q, desc_k, desc_vt, desc_o, Out, Q_descale, K_descale, V_descale, Q_blk, K_blk, V_blk,
    n_blk_q, n_blk_k, n_blk_v, stride_ob, stride_os,
    H_q, H_kv, S_q, S_kv, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_SCALES: tl.constexpr, SCALE_BLOCK: tl.constexpr, K_SCALE_BLOCK: tl.constexpr,
    V_BLOCK_SCALES: tl.constexpr, V_SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr, SPLIT_LOOPS: tl.constexpr,
    VARIANT: tl.constexpr = 0,
):
    """Grid: (cdiv(S_q, BLOCK_M), B * H_q). desc_q over Q (B, S_q, H_q * D), block (1, BLOCK_M, D); desc_k
    over K (B, S_kv, H_kv * D), block (1, BLOCK_N, D); desc_vt over keys-contiguous V (B * H_kv * D, S_kv)
    (its row stride the V buffer's padded key count), block (D, BLOCK_N). Out (B, S_q, H_q, D) with unit
    strides over D and heads D apart. SPLIT_LOOPS (causal): an unmasked loop below the diagonal, then a
    masked one; else one loop masking every block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest tiles first
    b = pid_bh // H_q
    h = pid_bh % H_q
    h_kv = h // GROUP
    m0 = pid_m * BLOCK_M
    if VARIANT & 1:
        q = desc_q.load([b * S_q + m0, h * HEAD_DIM])
    else:
        q = desc_q.load([b, m0, h * HEAD_DIM]).reshape(BLOCK_M, HEAD_DIM)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    desc_idx = b * H_kv + h_kv
    if BLOCK_SCALES:
        qk_scale = _scalars_to_rows(Q_blk + (b * H_q + h).to(tl.int64) * n_blk_q + m0 // SCALE_BLOCK,
                                    tl.cdiv(S_q - m0, SCALE_BLOCK), BLOCK_M, SCALE_BLOCK)
        qk_scale = qk_scale * (sm_scale * 1.4426950408889634)
        Kb_ptr = K_blk + desc_idx.to(tl.int64) * n_blk_k
    else:
        qk_scale = sm_scale * tl.load(Q_descale + desc_idx) * tl.load(K_descale + desc_idx) * 1.4426950408889634
        Kb_ptr = K_blk
    Vb_ptr = V_blk + desc_idx.to(tl.int64) * n_blk_v
    diag = S_kv - S_q
    if IS_CAUSAL:
        row_limit = offs_m + diag
        hi = tl.minimum(m0 + BLOCK_M + diag, S_kv)
        full_hi = tl.maximum(tl.minimum(m0 + diag + 1, S_kv), 0) // BLOCK_N * BLOCK_N
    else:
        row_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + (S_kv - 1)
        hi = S_kv
        full_hi = S_kv // BLOCK_N * BLOCK_N
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    h_kv_col = h_kv * HEAD_DIM
    vt_row = desc_idx * HEAD_DIM
    if VARIANT & 1:  # the K descriptor's first coordinate for key 0
        kb_row = b * S_kv
    else:
        kb_row = b
    if SPLIT_LOOPS:
        for start_n in tl.range(0, full_hi, BLOCK_N, warp_specialize=WS):
            acc, l_i, m_i = _ws_block(acc, l_i, m_i, q, desc_k, desc_vt, Kb_ptr, Vb_ptr, kb_row, h_kv_col, vt_row,
                                      start_n, qk_scale, row_limit, S_kv, HEAD_DIM, BLOCK_M, BLOCK_N, False,
                                      BLOCK_SCALES, K_SCALE_BLOCK, V_BLOCK_SCALES, V_SCALE_BLOCK, VARIANT)
        for start_n in tl.range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i = _ws_block(acc, l_i, m_i, q, desc_k, desc_vt, Kb_ptr, Vb_ptr, kb_row, h_kv_col, vt_row,
                                      start_n, qk_scale, row_limit, S_kv, HEAD_DIM, BLOCK_M, BLOCK_N, True,
                                      BLOCK_SCALES, K_SCALE_BLOCK, V_BLOCK_SCALES, V_SCALE_BLOCK, VARIANT)
    else:
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
            acc, l_i, m_i = _ws_block(acc, l_i, m_i, q, desc_k, desc_vt, Kb_ptr, Vb_ptr, kb_row, h_kv_col, vt_row,
                                      start_n, qk_scale, row_limit, S_kv, HEAD_DIM, BLOCK_M, BLOCK_N, True,
                                      BLOCK_SCALES, K_SCALE_BLOCK, V_BLOCK_SCALES, V_SCALE_BLOCK, VARIANT)
    if V_BLOCK_SCALES:
        out = acc / l_i[:, None]
    else:
        out = acc * (tl.load(V_descale + desc_idx) / l_i)[:, None]
    if VARIANT & 4:  # through a TMA descriptor over Out (B, S_q, H_q * D), block (1, BLOCK_M, D)
        desc_o.store([b, m0, h * HEAD_DIM], out.to(Out.dtype.element_ty).reshape(1, BLOCK_M, HEAD_DIM))
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        o_rows = b.to(tl.int64) * stride_ob + offs_m.to(tl.int64) * stride_os + h * HEAD_DIM
        tl.store(Out + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=(offs_m < S_q)[:, None])


# (BLOCK_M, BLOCK_N, num_warps, num_stages). num_warps 4: triton 3.6's Hopper pass warp-specializes the loop
# only then (offline sm_90 compiles, session 17: with 8 warps the loop stays one partition); the pass adds
# the producer warps itself. This config's warp-specialized build hangs on the H200 (module docstring).
WS_CONFIG_DEFAULT = (128, 128, 4, 2)
WS_HEAD_DIMS = (64, 128)  # D=256 spills at BLOCK_N 64 (offline sm_90: 280 bytes of stack)
_LAST_COMPILED = None  # the CompiledKernel of the last launch (None in the interpreter)


def last_compiled_is_warp_specialized() -> bool | None:
    """Whether the last launched `fp8_attn_fwd_ws_kernel` binary has its key loop warp specialized (a
    ``ttg.warp_specialize`` op in its TTGIR); None when nothing compiled was launched (interpreter)."""
    asm = getattr(_LAST_COMPILED, "asm", None)
    return None if asm is None else "ttg.warp_specialize" in asm.get("ttgir", "")


def ws_supported(qkv, is_causal: bool) -> str | None:
    """None when `fp8_attn_fwd_ws_kernel` can run this call, else why not (a short reason)."""
    import torch

    from .._constants import FP8_DTYPE
    from ..quantization.quantized import keys_contiguous_rows

    q, k, v = qkv.q, qkv.k, qkv.v
    v_rows = keys_contiguous_rows(v)
    if qkv.is_varlen:
        return "packed sequences"
    if q.dtype != FP8_DTYPE or k.dtype != FP8_DTYPE:
        return "int8 Q/K"
    if q.shape[-1] not in WS_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (takes {WS_HEAD_DIMS})"
    if not (q.is_contiguous() and k.is_contiguous()) or v_rows is None:
        return "layout (contiguous BSHD Q/K and keys-contiguous V, packed (B, H_kv, D, rows), needed)"
    if is_causal and q.shape[1] != k.shape[1]:
        return "causal with S_q != S_kv"
    if k.shape[1] % 16 or v_rows % 16:
        return "key count not a multiple of 16 (TMA strides)"
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not Hopper"
    return None


def ws_fp8_attention(qkv, *, is_causal: bool, scale: float, out_dtype, config: tuple | None = None,
                     warp_specialize: bool = True, split_loops: bool = True, variant: int = 0):
    """`fp8_attn_fwd_ws_kernel` on a `QuantizedQKV` that `ws_supported` accepts: (B, S_q, H_q, D) out_dtype.
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages), default WS_CONFIG_DEFAULT; WS False in the
    interpreter (no warps to specialize). Probe knobs (`scripts/probe_ws.py`): warp_specialize, split_loops
    (causal: an unmasked loop then a masked one), variant bits: 1 two-dimensional Q/K descriptors over
    (B * S, H * D) as triton's tutorial has them (instead of 3-D with a reshape), 2 one accumulator through
    the MMA (FA3's accumulation, not two-level: loses long rows' small terms), 4 the output through a TMA
    descriptor store."""
    import os

    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .._constants import SCALE_BLOCK, V_SCALE_BLOCK
    from .._intmath import cdiv
    from ..quantization.quantized import key_ordered_v

    reason = ws_supported(qkv, is_causal)
    if reason is not None:
        raise ValueError(f"the warp-specialized kernel does not take this call: {reason}")
    block_m, block_n, warps, stages = config or WS_CONFIG_DEFAULT
    q, k, v = qkv.q, qkv.k, key_ordered_v(qkv)
    B, S_q, H_q, D = q.shape
    S_kv, H_kv = k.shape[1], k.shape[2]
    v_rows = v.stride(3)  # keys-contiguous V: (B, H_kv, D, v_rows) memory
    if variant & 1:
        desc_q = TensorDescriptor(q, [B * S_q, H_q * D], [H_q * D, 1], [block_m, D])
        desc_k = TensorDescriptor(k, [B * S_kv, H_kv * D], [H_kv * D, 1], [block_n, D])
    else:
        desc_q = TensorDescriptor(q, [B, S_q, H_q * D], [S_q * H_q * D, H_q * D, 1], [1, block_m, D])
        desc_k = TensorDescriptor(k, [B, S_kv, H_kv * D], [S_kv * H_kv * D, H_kv * D, 1], [1, block_n, D])
    desc_vt = TensorDescriptor(v, [B * H_kv * D, S_kv], [v_rows, 1], [D, block_n])
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    desc_o = TensorDescriptor(out, [B, S_q, H_q * D], [S_q * H_q * D, H_q * D, 1], [1, block_m, D])
    blocks = qkv.block_scales
    global _LAST_COMPILED
    _LAST_COMPILED = fp8_attn_fwd_ws_kernel[(cdiv(S_q, block_m), B * H_q)](
        desc_q, desc_k, desc_vt, desc_o, out, qkv.q_descale, qkv.k_descale, qkv.v_descale,
        qkv.q_block_descale if blocks else out, qkv.k_block_descale if blocks else out,
        qkv.v_block_descale if qkv.v_block_scales else out,
        cdiv(S_q, SCALE_BLOCK), cdiv(S_kv, qkv.k_scale_block), cdiv(S_kv, V_SCALE_BLOCK),
        out.stride(0), out.stride(1), H_q, H_kv, S_q, S_kv, float(scale),
        GROUP=H_q // H_kv, HEAD_DIM=D, IS_CAUSAL=bool(is_causal), BLOCK_SCALES=blocks, SCALE_BLOCK=SCALE_BLOCK,
        K_SCALE_BLOCK=qkv.k_scale_block, V_BLOCK_SCALES=qkv.v_block_scales, V_SCALE_BLOCK=V_SCALE_BLOCK,
        BLOCK_M=block_m, BLOCK_N=block_n, WS=warp_specialize and os.environ.get("TRITON_INTERPRET") != "1",
        SPLIT_LOOPS=split_loops, VARIANT=variant,
        num_warps=warps, num_stages=stages,
    )
    return out
