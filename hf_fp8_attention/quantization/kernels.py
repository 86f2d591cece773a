"""Triton kernels of the FP8 Q/K/V quantization: input BHSD (any strides), output BSHD fp8.

Both phases share one flat grid that covers q, k and v in one launch. Program `pid` owns chunk `c` of head
`h` of batch `b` of tensor `t` (0 = q, 1 = k, 2 = v); programs are ordered q, k, v and, within a tensor,
by ((b * H + h) * N_CHUNKS + c), so the partial amax of program `pid` is stored at `partial[pid]` and the
partials of one KV group are contiguous. Kernels take pointers, strides and constexprs only; the launcher
is `qkv.py`. Launch them with `enable_fp_fusion=False` so that the RoPE mul/mul/add rounds like the torch
reference (no FMA contraction), which keeps the amax, and so the descales, bit-identical.
"""

import triton
import triton.language as tl


@triton.jit
def _select3(t, a, b, c):
    return tl.where(t == 0, a, tl.where(t == 1, b, c))


@triton.jit
def _program_coords(pid, B, H_Q, H_KV, N_CHUNKS_Q, N_CHUNKS_KV):
    """Maps a flat program id to (t, first program of t, b, h, chunk, H_t, N_CHUNKS_t, G_t)."""
    n_q = B * H_Q * N_CHUNKS_Q
    n_kv = B * H_KV * N_CHUNKS_KV
    t = (pid >= n_q).to(tl.int32) + (pid >= n_q + n_kv).to(tl.int32)
    first = _select3(t, 0, n_q, n_q + n_kv)
    local = pid - first
    n_heads = tl.where(t == 0, H_Q, H_KV)
    n_chunks = tl.where(t == 0, N_CHUNKS_Q, N_CHUNKS_KV)
    group = tl.where(t == 0, H_Q // H_KV, 1)
    chunk = local % n_chunks
    bh = local // n_chunks
    return t, first, bh // n_heads, bh % n_heads, chunk, n_heads, n_chunks, group


@triton.jit
def _tile_mask(row0, seq_len, BLOCK_S: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr):
    """(BLOCK_S, HALF_BLOCK) mask of a half tile; the channel test only exists when D/2 is padded (D=96)."""
    s_mask = (row0 + tl.arange(0, BLOCK_S)) < seq_len
    if HALF_BLOCK == HALF:
        mask = s_mask[:, None] & tl.full((1, HALF_BLOCK), 1, tl.int1)
    else:
        mask = s_mask[:, None] & (tl.arange(0, HALF_BLOCK) < HALF)[None, :]
    return mask


@triton.jit
def _load_rotated_tile(
    x_ptr, x_base, row0, seq_len, stride_s, stride_d,
    cos_ptr, cos_base, stride_cs, stride_cd,
    sin_ptr, sin_base, stride_ss, stride_sd,
    rope_on,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    D_CONTIG: tl.constexpr, APPLY_ROPE: tl.constexpr,
):
    """Loads rows [row0, row0 + BLOCK_S) of one head as two float32 half tiles (BLOCK_S, HALF_BLOCK):
    channels [0, D/2) and [D/2, D). With APPLY_ROPE and `rope_on` (q and k, not v) returns the rotated
    halves x1 * cos1 - x2 * sin1 and x2 * cos2 + x1 * sin2 (rotate_half convention, no gather needed).
    Masked-out elements are 0. 64-bit scalar bases, 32-bit offsets inside the tile."""
    HALF = HEAD_DIM // 2  # constexpr
    mask = _tile_mask(row0, seq_len, BLOCK_S, HALF, HALF_BLOCK)
    offs_d = tl.arange(0, HALF_BLOCK)
    if D_CONTIG:
        col1 = offs_d
        col2 = offs_d + HALF
    else:
        col1 = offs_d * stride_d
        col2 = (offs_d + HALF) * stride_d
    rows = tl.arange(0, BLOCK_S) * stride_s
    x_tile = x_ptr + (x_base + row0.to(tl.int64) * stride_s)
    x1 = tl.load(x_tile + rows[:, None] + col1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_tile + rows[:, None] + col2[None, :], mask=mask, other=0.0).to(tl.float32)
    if APPLY_ROPE:
        # rows past rope_len are not loaded: rope_len is S for q and k, 0 for v
        rope_mask = _tile_mask(row0, tl.where(rope_on, seq_len, 0), BLOCK_S, HALF, HALF_BLOCK)
        c_tile = cos_ptr + (cos_base + row0.to(tl.int64) * stride_cs)
        s_tile = sin_ptr + (sin_base + row0.to(tl.int64) * stride_ss)
        c_rows = tl.arange(0, BLOCK_S) * stride_cs
        s_rows = tl.arange(0, BLOCK_S) * stride_ss
        c1 = tl.load(c_tile + c_rows[:, None] + (offs_d * stride_cd)[None, :], mask=rope_mask, other=0.0)
        c2 = tl.load(c_tile + c_rows[:, None] + ((offs_d + HALF) * stride_cd)[None, :], mask=rope_mask, other=0.0)
        s1 = tl.load(s_tile + s_rows[:, None] + (offs_d * stride_sd)[None, :], mask=rope_mask, other=0.0)
        s2 = tl.load(s_tile + s_rows[:, None] + ((offs_d + HALF) * stride_sd)[None, :], mask=rope_mask, other=0.0)
        c1 = c1.to(tl.float32)
        c2 = c2.to(tl.float32)
        s1 = s1.to(tl.float32)
        s2 = s2.to(tl.float32)
        # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); a + (-b) == a - b exactly.
        r1 = x1 * c1 - x2 * s1
        r2 = x2 * c2 + x1 * s2
        x1 = tl.where(rope_on, r1, x1)
        x2 = tl.where(rope_on, r2, x2)
    return x1, x2


@triton.jit
def _nan_aware_max(x):
    """Max of a tile of non-negative values that is NaN when any element is NaN (like torch.amax).
    tl.max alone may drop NaN on the GPU (maxnum semantics)."""
    m = tl.max(x)
    n_nan = tl.sum((x != x).to(tl.int32))
    return tl.where(n_nan > 0, float("nan"), m)


@triton.jit
def _tile_setup(
    pid, B, H_Q, H_KV, S_Q, S_KV, N_CHUNKS_Q, N_CHUNKS_KV, CHUNK_Q, CHUNK_KV,
    q_ptr, k_ptr, v_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_sb,
):
    """Per-program selection of the tensor and its strides; shared by both phases."""
    t, first, b, h, chunk, n_heads, n_chunks, group = _program_coords(pid, B, H_Q, H_KV, N_CHUNKS_Q, N_CHUNKS_KV)
    x_ptr = _select3(t, q_ptr, k_ptr, v_ptr)
    stride_b = _select3(t, stride_qb, stride_kb, stride_vb)
    stride_h = _select3(t, stride_qh, stride_kh, stride_vh)
    stride_s = _select3(t, stride_qs, stride_ks, stride_vs)
    stride_d = _select3(t, stride_qd, stride_kd, stride_vd)
    seq_len = tl.where(t == 0, S_Q, S_KV)
    chunk_len = tl.where(t == 0, CHUNK_Q, CHUNK_KV)
    b64 = b.to(tl.int64)
    x_base = b64 * stride_b + h.to(tl.int64) * stride_h
    cos_base = b64 * stride_cb
    sin_base = b64 * stride_sb
    return (t, first, b, h, chunk, n_heads, n_chunks, group, x_ptr, x_base, stride_s, stride_d, seq_len,
            chunk_len, cos_base, sin_base)


@triton.jit
def qkv_amax_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, partial_ptr,
    B, H_Q, H_KV, S_Q, S_KV, N_CHUNKS_Q, N_CHUNKS_KV, CHUNK_Q, CHUNK_KV,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    D_CONTIG: tl.constexpr, APPLY_ROPE: tl.constexpr,
):
    """Phase 1: partial[pid] = max |x| (after RoPE for q, k) over the CHUNK_t positions of one
    (tensor, b, h, chunk), all channels; NaN if any element is NaN.

    Grid: (B * H_Q * N_CHUNKS_Q + 2 * B * H_KV * N_CHUNKS_KV,). CHUNK_* are multiples of BLOCK_S.
    """
    pid = tl.program_id(0)
    (t, first, b, h, chunk, n_heads, n_chunks, group, x_ptr, x_base, stride_s, stride_d, seq_len,
     chunk_len, cos_base, sin_base) = _tile_setup(
        pid, B, H_Q, H_KV, S_Q, S_KV, N_CHUNKS_Q, N_CHUNKS_KV, CHUNK_Q, CHUNK_KV, q_ptr, k_ptr, v_ptr,
        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd, stride_cb, stride_sb)
    rope_on = t < 2
    acc = tl.zeros((BLOCK_S, HALF_BLOCK), dtype=tl.float32)
    start = chunk * chunk_len
    for s0 in range(0, chunk_len, BLOCK_S):
        x1, x2 = _load_rotated_tile(
            x_ptr, x_base, start + s0, seq_len, stride_s, stride_d, cos_ptr, cos_base, stride_cs, stride_cd,
            sin_ptr, sin_base, stride_ss, stride_sd, rope_on,
            HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE)
        acc = tl.maximum(acc, tl.abs(x1), propagate_nan=tl.PropagateNan.ALL)
        acc = tl.maximum(acc, tl.abs(x2), propagate_nan=tl.PropagateNan.ALL)
    tl.store(partial_ptr + pid, _nan_aware_max(acc))


@triton.jit
def qkv_quantize_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, partial_ptr,
    q_out_ptr, k_out_ptr, v_out_ptr, descale_ptr,
    B, H_Q, H_KV, S_Q, S_KV, N_CHUNKS_Q, N_CHUNKS_KV, CHUNK_Q, CHUNK_KV,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    FP8_MAX: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, R_BLOCK: tl.constexpr,
    D_CONTIG: tl.constexpr, APPLY_ROPE: tl.constexpr,
):
    """Phase 2: reduce the phase-1 partials of this program's KV group (G_t heads x N_CHUNKS_t chunks,
    contiguous in `partial`), scale = FP8_MAX / amax (1 if amax is not > 0), quantize the chunk with
    round-to-nearest-even into the BSHD fp8 output. The program of chunk 0 of the group's first head writes
    descale = amax / FP8_MAX (1 if amax is not > 0) to descale[t, b, h // G_t] of a (3, B, H_KV) buffer.

    Grid: the same as qkv_amax_kernel, (B * H_Q * N_CHUNKS_Q + 2 * B * H_KV * N_CHUNKS_KV,).
    """
    pid = tl.program_id(0)
    (t, first, b, h, chunk, n_heads, n_chunks, group, x_ptr, x_base, stride_s, stride_d, seq_len,
     chunk_len, cos_base, sin_base) = _tile_setup(
        pid, B, H_Q, H_KV, S_Q, S_KV, N_CHUNKS_Q, N_CHUNKS_KV, CHUNK_Q, CHUNK_KV, q_ptr, k_ptr, v_ptr,
        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd, stride_cb, stride_sb)
    rope_on = t < 2
    g = h // group

    # ---- amax of the KV group from the partials ----
    part_start = first + (b * n_heads + g * group) * n_chunks
    n_parts = group * n_chunks
    offs_r = tl.arange(0, R_BLOCK)
    racc = tl.zeros((R_BLOCK,), dtype=tl.float32)
    for r0 in range(0, n_parts, R_BLOCK):
        vals = tl.load(partial_ptr + part_start + r0 + offs_r, mask=r0 + offs_r < n_parts, other=0.0)
        racc = tl.maximum(racc, vals, propagate_nan=tl.PropagateNan.ALL)
    amax = _nan_aware_max(racc)
    positive = amax > 0.0  # False for NaN too: scale 1 keeps NaN as NaN and clamps the rest
    scale = tl.where(positive, tl.math.div_rn(FP8_MAX, amax), 1.0)
    descale = tl.where(positive, tl.math.div_rn(amax, FP8_MAX), 1.0)
    tl.store(descale_ptr + (t * B + b) * H_KV + g, descale, mask=(chunk == 0) & (h % group == 0))

    # ---- quantize the chunk, write BSHD ----
    out_ptr = _select3(t, q_out_ptr, k_out_ptr, v_out_ptr)
    HALF = HEAD_DIM // 2  # constexpr
    offs_d = tl.arange(0, HALF_BLOCK)
    out_stride_s = n_heads * HEAD_DIM
    out_rows = tl.arange(0, BLOCK_S) * out_stride_s
    out_base = (b.to(tl.int64) * seq_len * n_heads + h) * HEAD_DIM
    start = chunk * chunk_len
    for s0 in range(0, chunk_len, BLOCK_S):
        row0 = start + s0
        x1, x2 = _load_rotated_tile(
            x_ptr, x_base, row0, seq_len, stride_s, stride_d, cos_ptr, cos_base, stride_cs, stride_cd,
            sin_ptr, sin_base, stride_ss, stride_sd, rope_on,
            HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE)
        # tl.clamp with PropagateNan.ALL keeps NaN as NaN (torch.clamp semantics); the fp8 cast is RNE.
        y1 = tl.clamp(x1 * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv)
        y2 = tl.clamp(x2 * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv)
        mask = _tile_mask(row0, seq_len, BLOCK_S, HALF, HALF_BLOCK)
        out_tile = out_ptr + (out_base + row0.to(tl.int64) * out_stride_s)
        tl.store(out_tile + out_rows[:, None] + offs_d[None, :], y1, mask=mask)
        tl.store(out_tile + out_rows[:, None] + (offs_d + HALF)[None, :], y2, mask=mask)
