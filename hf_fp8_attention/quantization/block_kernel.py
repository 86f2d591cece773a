"""Single-pass Triton kernel of the FP8 Q/K/V quantization, for options whose every scale is per block
(``v_scales="block"``, which needs ``qk_scales="block"`` or ``qk_format="int8"``).

Each program owns one tile of ROWS (= V_SCALE_BLOCK, 128) rows of one head of q, k or v, a multiple of every
scale block (q 16, k 16 or 128 (int8), v 128). It reads the tile once, applies RoPE (q, k), K's centring
(smooth_k, means from `centring_sums_kernel` launched before) and the Hadamard rotation as switched on, takes
each block's exact amax from the registers, and writes the codes and the block descales. No program waits on
another: no workspace, atomics or persistent grid. The two-pass kernel (`kernels.qkv_quantize_kernel`) must
read every element twice, because a per-head scale needs the whole head's amax before its first code is
written; here every byte is read once and written once.

Same math as `reference.quantize_qkv_fp8_reference` with v_scales="block" (bit for bit without Hadamard; with
it, up to the rotation's summation order, as the two-pass kernel). Launch with ``enable_fp_fusion=False`` (RoPE's
mul/mul/add rounded as the reference).

PASS (a constexpr of both kernels) also makes them the two launches of the per-(batch, KV head) scales
("split" path, `qkv._launch_split`), instead of the persistent two-pass kernel: PASS_AMAX reads every tile
once and merges its amax into its group's (`kernels._group_amax`: the same value as that kernel's P1, atomic
max of the int32 bits, a zeroed buffer); PASS_CODES, a second launch, reads every tile again and writes its
codes with the group's scale, and the group's first tile writes the group's descale. Same codes and descales as
the persistent kernel (`kernels.qkv_quantize_kernel`), bit for bit but for the rotation's summation order with
Hadamard. Each tile is then read twice from memory (the persistent kernel's second read comes partly from L2),
but both launches stream at close to the copy bandwidth, where the persistent kernel's programs wait on each
other's groups.
"""

import triton
import triton.language as tl

from .kernels import (_block_row_scales, _centre, _group_amax, _group_scale_of, _item_setup, _load_tile, _rotate,
                      _store_codes)
from .tile_math import _amax_scales, _block_amax, _hadamard

# PASS: every scale per block (one launch), or the amax / codes launch of per-(batch, KV head) scales
PASS_BLOCK, PASS_AMAX, PASS_CODES = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def qkv_block_quantize_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,
    q_out_ptr, k_out_ptr, v_out_ptr, mean_ptr, cu_q_ptr, cu_k_ptr,
    q_blk_ptr, k_blk_ptr, v_blk_ptr, amax_ptr, descale_ptr, N_BLK_Q, N_BLK_K, N_BLK_V,
    B, H_Q, H_KV, S_Q, S_KV, V_ROWS, ITEM0,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    FP8_MAX: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    D_CONTIG: tl.constexpr, APPLY_ROPE: tl.constexpr,
    HADAMARD_QK: tl.constexpr, HADAMARD_V: tl.constexpr, INV_SQRT_D: tl.constexpr,
    SMOOTH_K: tl.constexpr, VARLEN: tl.constexpr,
    SCALE_BLOCK: tl.constexpr, K_SCALE_BLOCK: tl.constexpr, V_SCALE_BLOCK: tl.constexpr,
    QK_INT8: tl.constexpr, QK_MAX: tl.constexpr, V_KEYS_CONTIG: tl.constexpr, HEADS_FASTEST: tl.constexpr,
    SMOOTH_V: tl.constexpr = False, PASS: tl.constexpr = PASS_BLOCK,
):
    """Grid: (B * H_Q * cdiv(S_Q, ROWS) + 2 * B * H_KV * cdiv(S_KV, ROWS),): the q tiles, then k's, then v's
    (`kernels._item_setup`'s order with items of one tile; HEADS_FASTEST: its order within a tensor); program
    i does tile i + ITEM0, so a launch of the v tiles alone (`qk_rope_block_kernel` doing q and k) has ITEM0 =
    the q and k tiles and a grid of the rest. Inputs, outputs, VARLEN, V_KEYS_CONTIG / V_ROWS and QK_INT8 /
    QK_MAX as in `kernels.qkv_quantize_kernel`, except that v_out_ptr is e4m3 with int8 Q/K too. Block
    descales: q_blk_ptr (B, H_Q, N_BLK_Q) per SCALE_BLOCK rows, k_blk_ptr (B, H_KV, N_BLK_K) per K_SCALE_BLOCK
    rows, v_blk_ptr (B, H_KV, N_BLK_V) per V_SCALE_BLOCK rows, float32 (N_BLK_*: blocks of the longest
    sequence). SMOOTH_K / SMOOTH_V: mean_ptr (2, B, H_KV, HEAD_DIM) float32 holds K's / V's means (SMOOTH_V only
    with PASS_AMAX / PASS_CODES: V's block scales exclude it). HADAMARD_* needs HALF_BLOCK == HEAD_DIM // 2.
    PASS_AMAX / PASS_CODES (module docstring): amax_ptr the (3, B, H_KV) int32 group amax bits (zeroed before
    the amax launch), descale_ptr the (3, B, H_KV) float32 descales (written by the codes launch), groups indexed
    as `kernels._item_setup`'s; the block pointers unread, and QK_INT8 off."""
    if PASS == PASS_BLOCK:
        tl.static_assert(ROWS % SCALE_BLOCK == 0 and ROWS % K_SCALE_BLOCK == 0 and ROWS == V_SCALE_BLOCK,
                         "a tile holds whole q/k scale blocks and is one V block")
    else:
        tl.static_assert(not QK_INT8, "per-head scales are e4m3")
    (t, b, h, row0, n_heads, x_ptr, x_base, stride_s, stride_d, seq_len, cos_base, sin_base, grp, _, first,
     out_start) = _item_setup(
        tl.program_id(0) + ITEM0, B, H_Q, H_KV, S_Q, S_KV, tl.cdiv(S_Q, ROWS), tl.cdiv(S_KV, ROWS), q_ptr, k_ptr, v_ptr,
        stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd, stride_cb, stride_cs, stride_sb, stride_ss,
        cu_q_ptr, cu_k_ptr, ROWS, VARLEN, False, HEADS_FASTEST)
    if row0 < seq_len:  # (VARLEN: a shorter sequence's tiles past its end have nothing to do)
        lo, hi, c_lo, c_hi, s_lo, s_hi = _load_tile(
            x_ptr, x_base, row0, seq_len, stride_s, stride_d, cos_ptr, cos_base, stride_cs, stride_cd,
            sin_ptr, sin_base, stride_ss, stride_sd, t < 2, HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG, APPLY_ROPE,
            "evict_first")
        x1, x2 = _rotate(lo, hi, c_lo, c_hi, s_lo, s_hi, t < 2, APPLY_ROPE)
        HALF = HEAD_DIM // 2  # constexpr
        offs_d = tl.arange(0, HALF_BLOCK)
        valid = (row0 + tl.arange(0, ROWS)) < seq_len
        if SMOOTH_K or SMOOTH_V:  # a k or v group index less B * H_KV is its mean's slot
            x1, x2 = _centre(x1, x2, mean_ptr, grp - B * H_KV,
                             tl.where(t == 1, SMOOTH_K, tl.where(t == 2, SMOOTH_V, False)), valid, offs_d,
                             offs_d < HALF, HALF, HEAD_DIM)
        if PASS == PASS_AMAX:  # the tile's share of its group's amax; no code written
            m = _group_amax(x1, x2, t, HADAMARD_QK, HADAMARD_V, INV_SQRT_D)
            tl.atomic_max(amax_ptr + grp, m.to(tl.int32, bitcast=True), sem="relaxed")
        else:
            if HADAMARD_QK or HADAMARD_V:
                dtype: tl.constexpr = q_ptr.dtype.element_ty
                if HADAMARD_QK and HADAMARD_V:
                    x1, x2 = _hadamard(x1, x2, dtype, INV_SQRT_D)
                elif (t < 2) == HADAMARD_QK:  # a branch, not a select: the rotation runs only where it applies
                    x1, x2 = _hadamard(x1, x2, dtype, INV_SQRT_D)
            if PASS == PASS_CODES:
                row_scale = _group_scale_of(amax_ptr, descale_ptr, grp, first, FP8_MAX)
            else:
                head = (b * n_heads + h).to(tl.int64)
                if t == 0:
                    row_scale = _block_row_scales(x1, x2, valid, row0, seq_len, q_blk_ptr + head * N_BLK_Q,
                                                  ROWS, SCALE_BLOCK, QK_MAX, QK_INT8)
                elif t == 1:
                    row_scale = _block_row_scales(x1, x2, valid, row0, seq_len, k_blk_ptr + head * N_BLK_K,
                                                  ROWS, K_SCALE_BLOCK, QK_MAX, QK_INT8)
                else:
                    row_scale = _block_row_scales(x1, x2, valid, row0, seq_len, v_blk_ptr + head * N_BLK_V,
                                                  ROWS, V_SCALE_BLOCK, FP8_MAX, False)
                row_scale = row_scale[:, None]
            if t == 2:  # v through its own e4m3 pointer, as the e4m3 build stores it (QK_INT8 off: no byte cast)
                _store_codes(x1, x2, row_scale, t, b, h, row0, seq_len, out_start, n_heads, H_KV, V_ROWS,
                             v_out_ptr, v_out_ptr, v_out_ptr, HEAD_DIM, HALF_BLOCK, ROWS, FP8_MAX, FP8_MAX, False,
                             V_KEYS_CONTIG, VARLEN)
            else:  # (k's pointer stands in for v's: q/k pointers share a type, v's is e4m3)
                _store_codes(x1, x2, row_scale, t, b, h, row0, seq_len, out_start, n_heads, H_KV, V_ROWS,
                             q_out_ptr, k_out_ptr, k_out_ptr, HEAD_DIM, HALF_BLOCK, ROWS, FP8_MAX, QK_MAX, QK_INT8,
                             False, VARLEN)


@triton.jit
def qk_rope_block_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr, mean_ptr, cu_ptr,
    q_blk_ptr, k_blk_ptr, v_blk_ptr, amax_ptr, descale_ptr, N_BLK_Q, N_BLK_K, N_BLK_V, B, H_Q, H_KV, S, V_ROWS, N_QK,
    N_V_FIRST,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    FP8_MAX: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    HEADS: tl.constexpr, D_CONTIG: tl.constexpr, HADAMARD_QK: tl.constexpr, HADAMARD_V: tl.constexpr,
    INV_SQRT_D: tl.constexpr, SMOOTH_K: tl.constexpr, VARLEN: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    K_SCALE_BLOCK: tl.constexpr, V_SCALE_BLOCK: tl.constexpr, V_KEYS_CONTIG: tl.constexpr,
    PREFETCH: tl.constexpr, HEADS_FASTEST: tl.constexpr, PASS: tl.constexpr = PASS_BLOCK,
):
    """Q and K with RoPE and e4m3 per-block scales: the q/k half of `qkv_block_quantize_kernel`'s work, with
    cos/sin read once per tile of rows instead of once per head. Program (r, b, c) loads the cos/sin rows
    [r * ROWS, (r + 1) * ROWS) of sequence b once and then, one head after another, quantizes those rows of
    HEADS heads of the concatenated list (q's H_Q heads, then k's H_KV). ROWS (16-64) is a multiple of both
    scale blocks, so every block's amax is in the tile: RoPE's x plus cos/sin half tiles then fit the registers
    that a 128-row tile overflowed (RoPE at 4 warps: 255 registers and spills; session 15). PREFETCH: the
    next head's tile is loaded before the current one is processed (two tiles of x in flight). HEADS_FASTEST:
    program ids run over the head chunks of one row tile before the next row tile (programs in flight then
    read whole token rows, all heads, as a copy does), else over the row tiles of one head chunk first.

    Same math, per element, as the single-pass kernel (RoPE -> K centring -> Hadamard -> block amax), so the
    same bit-exact match with the reference. VARLEN: q and k share one cu_seqlens (cu_ptr), RoPE's rows
    being the same tokens; S is the longest sequence. Grid: (B * cdiv(S, ROWS) * cdiv(H_Q + H_KV, HEADS),), b
    slowest (one axis: a packed batch may hold more sequences than a grid's second axis, 65535).

    V in the same launch: programs from N_QK on (the q/k programs' count) each quantize one V block
    (V_SCALE_BLOCK rows of one KV head; order (b, block, head), heads fastest) in tiles of ROWS rows: a
    first pass over the block's tiles takes its amax, a second re-reads them (from L2) and writes the codes,
    e4m3, BSHD or, with V_KEYS_CONTIG, keys-contiguous (V_ROWS rows per head; `kernels._store_codes`);
    HADAMARD_V rotates them. The block's descale goes to v_blk_ptr (B, H_KV, N_BLK_V). A grid of N_QK
    programs leaves V to another launch (the single-pass kernel's v tiles). N_V_FIRST > 0: the V programs
    come first instead (programs [0, N_V_FIRST) are V blocks, the q/k ones follow), so that the longer
    two-pass V programs do not form the launch's tail.

    PASS_AMAX / PASS_CODES (module docstring; amax_ptr, descale_ptr as in `qkv_block_quantize_kernel`): q and
    k with their per-(batch, KV head) scales, in the same programs and order; the grid is N_QK (v goes through
    `qkv_block_quantize_kernel`). PASS_AMAX merges a program's consecutive heads of one group in registers
    first: one atomic per group it touches, not per head."""
    tl.static_assert(ROWS % SCALE_BLOCK == 0 and ROWS % K_SCALE_BLOCK == 0, "a tile holds whole scale blocks")
    tl.static_assert(V_SCALE_BLOCK % ROWS == 0, "a V block is whole tiles")
    pid = tl.program_id(0)
    if N_V_FIRST > 0:
        is_v = pid < N_V_FIRST
        v_item = pid
    else:
        is_v = pid >= N_QK
        v_item = pid - N_QK
    if is_v:
        _v_block_program(v_item, v_ptr, v_out_ptr, v_blk_ptr, cu_ptr, N_BLK_V, B, H_KV, S, V_ROWS,
                         stride_vb, stride_vh, stride_vs, stride_vd, FP8_MAX, HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG,
                         HADAMARD_V, INV_SQRT_D, VARLEN, V_SCALE_BLOCK, V_KEYS_CONTIG)
    else:
        _qk_rope_program(pid - N_V_FIRST, q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, mean_ptr, cu_ptr,
                         q_blk_ptr, k_blk_ptr, N_BLK_Q, N_BLK_K, B, H_Q, H_KV, S,
                         stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                         stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
                         FP8_MAX, HEAD_DIM, HALF_BLOCK, ROWS, HEADS, D_CONTIG, HADAMARD_QK, INV_SQRT_D, SMOOTH_K,
                         VARLEN, SCALE_BLOCK, K_SCALE_BLOCK, PREFETCH, HEADS_FASTEST, amax_ptr, descale_ptr, PASS)


@triton.jit
def _qk_rope_program(
    pid, q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, mean_ptr, cu_ptr, q_blk_ptr, k_blk_ptr,
    N_BLK_Q, N_BLK_K, B, H_Q, H_KV, S,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    FP8_MAX: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    HEADS: tl.constexpr, D_CONTIG: tl.constexpr, HADAMARD_QK: tl.constexpr, INV_SQRT_D: tl.constexpr,
    SMOOTH_K: tl.constexpr, VARLEN: tl.constexpr, SCALE_BLOCK: tl.constexpr, K_SCALE_BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr, HEADS_FASTEST: tl.constexpr, amax_ptr, descale_ptr, PASS: tl.constexpr,
):
    """Program `pid` of `qk_rope_block_kernel`'s q/k part (its docstring)."""
    n_chunks = tl.cdiv(H_Q + H_KV, HEADS)
    n_tiles = tl.cdiv(S, ROWS)
    b = pid // (n_tiles * n_chunks)
    local = pid % (n_tiles * n_chunks)
    if HEADS_FASTEST:
        row0 = (local // n_chunks) * ROWS
        hh0 = (local % n_chunks) * HEADS
    else:
        row0 = (local % n_tiles) * ROWS
        hh0 = (local // n_tiles) * HEADS
    if VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        seq_len = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
        q_base0 = start * stride_qs
        k_base0 = start * stride_ks
        cos_base = start * stride_cs
        sin_base = start * stride_ss
        out_start = start
    else:
        seq_len = S
        b64 = b.to(tl.int64)
        q_base0 = b64 * stride_qb
        k_base0 = b64 * stride_kb
        cos_base = b64 * stride_cb
        sin_base = b64 * stride_sb
        out_start = b64 * S
    if row0 < seq_len:
        # cos / sin of the tile's rows, once (rows past the sequence 0)
        c1, c2, _, _, _, _ = _load_tile(cos_ptr, cos_base, row0, seq_len, stride_cs, stride_cd, cos_ptr, 0, 0, 0,
                                        cos_ptr, 0, 0, 0, False, HEAD_DIM, HALF_BLOCK, ROWS, False, False,
                                        "evict_last")
        s1, s2, _, _, _, _ = _load_tile(sin_ptr, sin_base, row0, seq_len, stride_ss, stride_sd, sin_ptr, 0, 0, 0,
                                        sin_ptr, 0, 0, 0, False, HEAD_DIM, HALF_BLOCK, ROWS, False, False,
                                        "evict_last")
        HALF = HEAD_DIM // 2  # constexpr
        offs_d = tl.arange(0, HALF_BLOCK)
        valid = (row0 + tl.arange(0, ROWS)) < seq_len
        n_total = H_Q + H_KV
        G = H_Q // H_KV
        m_run = tl.zeros((ROWS,), dtype=tl.float32).max(axis=0)  # PASS_AMAX: the amax of group g_run so far
        g_run = pid * 0 - 1
        hh = hh0
        t = (hh >= H_Q).to(tl.int32)
        h = hh - t * H_Q
        lo, hi = _qk_tile(q_ptr, k_ptr, q_base0, k_base0, t, h, row0, tl.where(hh < n_total, seq_len, 0),
                          stride_qh, stride_qs, stride_qd, stride_kh, stride_ks, stride_kd,
                          HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG)
        for j in tl.range(0, HEADS):
            cur_lo, cur_hi, cur_t, cur_h = lo, hi, t, h
            if PREFETCH:  # the next head's tile (seq_len 0 past the list: nothing loaded)
                hh = hh0 + j + 1
                t = (hh >= H_Q).to(tl.int32)
                h = hh - t * H_Q
                lo, hi = _qk_tile(q_ptr, k_ptr, q_base0, k_base0, t, h, row0,
                                  tl.where((hh < n_total) & (j + 1 < HEADS), seq_len, 0),
                                  stride_qh, stride_qs, stride_qd, stride_kh, stride_ks, stride_kd,
                                  HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG)
            if hh0 + j < n_total:
                if not PREFETCH and j > 0:
                    cur_t = ((hh0 + j) >= H_Q).to(tl.int32)
                    cur_h = hh0 + j - cur_t * H_Q
                    cur_lo, cur_hi = _qk_tile(q_ptr, k_ptr, q_base0, k_base0, cur_t, cur_h, row0, seq_len,
                                              stride_qh, stride_qs, stride_qd, stride_kh, stride_ks, stride_kd,
                                              HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG)
                x1, x2 = _rotate(cur_lo, cur_hi, c1, c2, s1, s2, True, True)
                if SMOOTH_K:  # k head h's mean is at slot b * H_KV + h
                    x1, x2 = _centre(x1, x2, mean_ptr, b * H_KV + cur_h, tl.where(cur_t == 1, True, False), valid,
                                     offs_d, offs_d < HALF, HALF, HEAD_DIM)
                grp = (cur_t * B + b) * H_KV + tl.where(cur_t == 0, cur_h // G, cur_h)  # `_item_setup`'s
                if PASS == PASS_AMAX:  # the previous group's amax out when the group changes (heads in order)
                    # q and k only: HADAMARD_QK stands for both flags, so the rotated case is picked at compile time
                    m = _group_amax(x1, x2, cur_t, HADAMARD_QK, HADAMARD_QK, INV_SQRT_D)
                    tl.atomic_max(amax_ptr + g_run, m_run.to(tl.int32, bitcast=True),
                                  mask=(grp != g_run) & (g_run >= 0), sem="relaxed")
                    m_run = tl.where(grp != g_run, m, tl.maximum(m_run, m))
                    g_run = grp
                else:
                    if HADAMARD_QK:
                        x1, x2 = _hadamard(x1, x2, q_ptr.dtype.element_ty, INV_SQRT_D)
                    if PASS == PASS_CODES:
                        first = (row0 == 0) & ((cur_t == 1) | (cur_h % G == 0))
                        row_scale = _group_scale_of(amax_ptr, descale_ptr, grp, first, FP8_MAX)
                    elif cur_t == 0:
                        row_scale = _block_row_scales(x1, x2, valid, row0, seq_len,
                                                      q_blk_ptr + (b * H_Q + cur_h).to(tl.int64) * N_BLK_Q,
                                                      ROWS, SCALE_BLOCK, FP8_MAX, False)[:, None]
                    else:
                        row_scale = _block_row_scales(x1, x2, valid, row0, seq_len,
                                                      k_blk_ptr + (b * H_KV + cur_h).to(tl.int64) * N_BLK_K,
                                                      ROWS, K_SCALE_BLOCK, FP8_MAX, False)[:, None]
                    _store_codes(x1, x2, row_scale, cur_t, b, cur_h, row0, seq_len, out_start,
                                 tl.where(cur_t == 0, H_Q, H_KV), H_KV, 0, q_out_ptr, k_out_ptr, k_out_ptr,
                                 HEAD_DIM, HALF_BLOCK, ROWS, FP8_MAX, FP8_MAX, False, False, VARLEN)
        if PASS == PASS_AMAX:  # the last group's
            tl.atomic_max(amax_ptr + g_run, m_run.to(tl.int32, bitcast=True), mask=g_run >= 0, sem="relaxed")


@triton.jit
def _qk_tile(q_ptr, k_ptr, q_base0, k_base0, t, h, row0, seq_len,
             stride_qh, stride_qs, stride_qd, stride_kh, stride_ks, stride_kd,
             HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, ROWS: tl.constexpr, D_CONTIG: tl.constexpr):
    """The two input half tiles of rows [row0, row0 + ROWS) of head h of q (t = 0) or k (t = 1); seq_len 0
    loads nothing."""
    is_q = t == 0
    x_ptr = tl.where(is_q, q_ptr, k_ptr)
    base = tl.where(is_q, q_base0 + h.to(tl.int64) * stride_qh, k_base0 + h.to(tl.int64) * stride_kh)
    lo, hi, _, _, _, _ = _load_tile(x_ptr, base, row0, seq_len, tl.where(is_q, stride_qs, stride_ks),
                                    tl.where(is_q, stride_qd, stride_kd), x_ptr, 0, 0, 0, x_ptr, 0, 0, 0, False,
                                    HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG, False, "evict_first")
    return lo, hi


@triton.jit
def _v_block_program(
    item, v_ptr, v_out_ptr, v_blk_ptr, cu_ptr, N_BLK_V, B, H_KV, S, V_ROWS,
    stride_vb, stride_vh, stride_vs, stride_vd,
    FP8_MAX: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, ROWS: tl.constexpr,
    D_CONTIG: tl.constexpr, HADAMARD_V: tl.constexpr, INV_SQRT_D: tl.constexpr, VARLEN: tl.constexpr,
    V_SCALE_BLOCK: tl.constexpr, V_KEYS_CONTIG: tl.constexpr,
):
    """V block `item` of `qk_rope_block_kernel` (its docstring): the same codes and descale as the
    single-pass kernel's v tile (one exact amax over the block's valid elements, then x * (FP8_MAX / amax)),
    from two passes over ROWS-row tiles; the second pass's loads hit L2."""
    n_blocks = tl.cdiv(S, V_SCALE_BLOCK)
    b = item // (n_blocks * H_KV)
    local = item % (n_blocks * H_KV)
    blk = local // H_KV
    h = local % H_KV
    if VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        seq_len = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
        base = start * stride_vs + h.to(tl.int64) * stride_vh
        out_start = start
    else:
        seq_len = S
        b64 = b.to(tl.int64)
        base = b64 * stride_vb + h.to(tl.int64) * stride_vh
        out_start = b64 * S
    row_base = blk * V_SCALE_BLOCK
    if row_base < seq_len:
        N_SUB: tl.constexpr = V_SCALE_BLOCK // ROWS
        amax = tl.zeros((1,), dtype=tl.float32)
        lo, hi = _v_tile(v_ptr, base, row_base, seq_len, stride_vs, stride_vd, HEAD_DIM, HALF_BLOCK, ROWS,
                         D_CONTIG, "evict_last")
        for i in tl.range(0, N_SUB):  # amax; the next tile's loads issued before this one is reduced
            x1, x2 = lo.to(tl.float32), hi.to(tl.float32)
            row0 = row_base + i * ROWS
            lo, hi = _v_tile(v_ptr, base, row0 + ROWS, tl.where(i + 1 < N_SUB, seq_len, 0), stride_vs,
                             stride_vd, HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG, "evict_last")
            if HADAMARD_V:
                x1, x2 = _hadamard(x1, x2, v_ptr.dtype.element_ty, INV_SQRT_D)
            valid = (row0 + tl.arange(0, ROWS)) < seq_len
            amax = tl.maximum(amax, _block_amax(x1, x2, valid, ROWS, ROWS))
        scale, descale = _amax_scales(amax, FP8_MAX)
        tl.store(v_blk_ptr + (b * H_KV + h).to(tl.int64) * N_BLK_V + blk + tl.arange(0, 1), descale)
        lo, hi = _v_tile(v_ptr, base, row_base, seq_len, stride_vs, stride_vd, HEAD_DIM, HALF_BLOCK, ROWS,
                         D_CONTIG, "evict_first")
        for i in tl.range(0, N_SUB):  # codes
            x1, x2 = lo.to(tl.float32), hi.to(tl.float32)
            row0 = row_base + i * ROWS
            lo, hi = _v_tile(v_ptr, base, row0 + ROWS, tl.where(i + 1 < N_SUB, seq_len, 0), stride_vs,
                             stride_vd, HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG, "evict_first")
            if HADAMARD_V:
                x1, x2 = _hadamard(x1, x2, v_ptr.dtype.element_ty, INV_SQRT_D)
            _store_codes(x1, x2, scale[:, None], 2, b, h, row0, seq_len, out_start, H_KV, H_KV, V_ROWS,
                         v_out_ptr, v_out_ptr, v_out_ptr, HEAD_DIM, HALF_BLOCK, ROWS, FP8_MAX, FP8_MAX, False,
                         V_KEYS_CONTIG, VARLEN)


@triton.jit
def _v_tile(v_ptr, base, row0, seq_len, stride_vs, stride_vd, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr,
            ROWS: tl.constexpr, D_CONTIG: tl.constexpr, EVICT: tl.constexpr):
    """The two input half tiles of rows [row0, row0 + ROWS) of one V head (rows >= seq_len 0)."""
    lo, hi, _, _, _, _ = _load_tile(v_ptr, base, row0, seq_len, stride_vs, stride_vd, v_ptr, 0, 0, 0, v_ptr, 0, 0,
                                    0, False, HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG, False, EVICT)
    return lo, hi
