"""Triton kernel of the FP8 Q/K/V quantization: input BHSD (any strides), output BSHD fp8, one launch.

Work is cut into tiles of BLOCK_S positions of one head of one tensor (t = 0, 1, 2 for q, k, v). Tile `i`
is ordered q, k, v and, within a tensor, by ((b * H + h) * N_TILES + s), so the tiles of one scale group
(the G = H_q / H_kv query heads of a KV head, or one k / v head) are contiguous. Each tile is read for two
steps: P1 (max |x| of the tile, atomically merged into the group's amax) and P2 (once every P1 of the
group is done: quantize the tile with the group's scale). A persistent grid takes tickets from an atomic
counter; ticket `t` does P1(t) (if t < n_tiles) and then P2(t - LAG) (if t >= LAG), so a tile's second
read comes LAG tiles after its first and finds it in L2 as long as LAG tiles fit there.

Deadlock freedom: with LAG >= the tiles of the largest group, every P1 that P2(t - LAG) waits on belongs
to a smaller ticket. A program publishes its P1 before it waits, and it only ever holds its current
ticket and the next one (taken early to hide the atomic's latency); by induction on the ticket, the
smallest ticket whose P1 is unpublished is held by a program that reaches it, so every wait ends. The
grid need not be co-resident. Under the interpreter programs run one after another and the ticket order
alone makes every wait succeed at once.

The kernel takes pointers, strides and constexprs only; the launcher is `qkv.py`. Launch it with
`enable_fp_fusion=False` so that the RoPE mul/mul/add rounds like the torch reference (no FMA
contraction), which keeps the amax, and so the descales, bit-identical.
"""

import triton
import triton.language as tl

# Workspace (int32, zeroed by the launcher): [0] ticket counter, then WS_PAD ints so that the ticket's
# cache line is its own, then amax bits per group, then finished-P1 count per group. Groups are indexed
# like the descales: (t * B + b) * H_KV + kv_head.
WS_PAD = tl.constexpr(32)


@triton.jit
def _select3(t, a, b, c):
    return tl.where(t == 0, a, tl.where(t == 1, b, c))


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
def _load_tile(
    x_ptr, x_base, row0, seq_len, stride_s, stride_d,
    cos_ptr, cos_base, stride_cs, stride_cd,
    sin_ptr, sin_base, stride_ss, stride_sd,
    rope_on,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    D_CONTIG: tl.constexpr, APPLY_ROPE: tl.constexpr, EVICT: tl.constexpr,
):
    """Issues the loads of rows [row0, row0 + BLOCK_S) of one head as two half tiles (BLOCK_S, HALF_BLOCK),
    channels [0, D/2) and [D/2, D), in the input dtype, plus the matching cos/sin half tiles with APPLY_ROPE
    and `rope_on` (q and k, not v; else the x halves stand in for them). Rows >= seq_len are masked to 0,
    so seq_len = 0 loads nothing. Kept apart from `_rotate` so that a caller can have several tiles in
    flight before it uses any. 64-bit scalar bases, 32-bit offsets inside the tile."""
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
    x1 = tl.load(x_tile + rows[:, None] + col1[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    x2 = tl.load(x_tile + rows[:, None] + col2[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    if APPLY_ROPE:
        # rows past rope_len are not loaded: rope_len is seq_len for q and k, 0 for v
        rope_mask = _tile_mask(row0, tl.where(rope_on, seq_len, 0), BLOCK_S, HALF, HALF_BLOCK)
        c_tile = cos_ptr + (cos_base + row0.to(tl.int64) * stride_cs)
        s_tile = sin_ptr + (sin_base + row0.to(tl.int64) * stride_ss)
        c_rows = tl.arange(0, BLOCK_S) * stride_cs
        s_rows = tl.arange(0, BLOCK_S) * stride_ss
        c1 = tl.load(c_tile + c_rows[:, None] + (offs_d * stride_cd)[None, :], mask=rope_mask, other=0.0)
        c2 = tl.load(c_tile + c_rows[:, None] + ((offs_d + HALF) * stride_cd)[None, :], mask=rope_mask, other=0.0)
        s1 = tl.load(s_tile + s_rows[:, None] + (offs_d * stride_sd)[None, :], mask=rope_mask, other=0.0)
        s2 = tl.load(s_tile + s_rows[:, None] + ((offs_d + HALF) * stride_sd)[None, :], mask=rope_mask, other=0.0)
        return x1, x2, c1, c2, s1, s2
    else:
        return x1, x2, x1, x2, x1, x2


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, rope_on, APPLY_ROPE: tl.constexpr):
    """float32 half tiles of `_load_tile`'s output; with APPLY_ROPE and `rope_on` the rotated halves
    x1 * cos1 - x2 * sin1 and x2 * cos2 + x1 * sin2 (rotate_half convention, no gather needed)."""
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if APPLY_ROPE:
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
    item, B, H_Q, H_KV, S_Q, S_KV, N_TILES_Q, N_TILES_KV,
    q_ptr, k_ptr, v_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_sb,
    BLOCK_S: tl.constexpr,
):
    """Tile `item` -> its tensor t, batch b, head h, first row, the tensor's head count, pointer, base
    offset and strides, its scale group and the group's tile count."""
    n_q = B * H_Q * N_TILES_Q
    n_kv = B * H_KV * N_TILES_KV
    t = (item >= n_q).to(tl.int32) + (item >= n_q + n_kv).to(tl.int32)
    local = item - _select3(t, 0, n_q, n_q + n_kv)
    n_heads = tl.where(t == 0, H_Q, H_KV)
    n_tiles = tl.where(t == 0, N_TILES_Q, N_TILES_KV)
    group = tl.where(t == 0, H_Q // H_KV, 1)
    bh = local // n_tiles
    b = bh // n_heads
    h = bh % n_heads
    x_ptr = _select3(t, q_ptr, k_ptr, v_ptr)
    stride_b = _select3(t, stride_qb, stride_kb, stride_vb)
    stride_h = _select3(t, stride_qh, stride_kh, stride_vh)
    stride_s = _select3(t, stride_qs, stride_ks, stride_vs)
    stride_d = _select3(t, stride_qd, stride_kd, stride_vd)
    b64 = b.to(tl.int64)
    x_base = b64 * stride_b + h.to(tl.int64) * stride_h
    grp = (t * B + b) * H_KV + h // group
    first_of_group = (local % n_tiles == 0) & (h % group == 0)
    return (t, b, h, (local % n_tiles) * BLOCK_S, n_heads, x_ptr, x_base, stride_s, stride_d,
            tl.where(t == 0, S_Q, S_KV), b64 * stride_cb, b64 * stride_sb, grp, group * n_tiles, first_of_group)


@triton.jit
def qkv_quantize_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,
    q_out_ptr, k_out_ptr, v_out_ptr, descale_ptr, ws_ptr,
    B, H_Q, H_KV, S_Q, S_KV, LAG,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    FP8_MAX: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    D_CONTIG: tl.constexpr, APPLY_ROPE: tl.constexpr,
):
    """Per group: amax = max |x| (after RoPE for q, k; NaN if any element is NaN), scale = FP8_MAX / amax
    (1 if amax is not > 0); every element is quantized with round-to-nearest-even into the BSHD fp8 output,
    and descale = amax / FP8_MAX (1 if amax is not > 0) goes to descale[t, b, kv_head] of a (3, B, H_KV)
    buffer. `ws_ptr` is the zeroed int32 workspace described at WS_PAD; LAG (in tiles) is at least the
    tile count of the largest group.

    Grid: (n_programs,), persistent: each program takes tickets until n_tiles + LAG are taken.
    """
    n_tiles_q = tl.cdiv(S_Q, BLOCK_S)
    n_tiles_kv = tl.cdiv(S_KV, BLOCK_S)
    n_items = B * H_Q * n_tiles_q + 2 * B * H_KV * n_tiles_kv
    lag = tl.minimum(LAG, n_items)
    amax_ptr = ws_ptr + WS_PAD
    done_ptr = amax_ptr + 3 * B * H_KV
    HALF = HEAD_DIM // 2  # constexpr
    offs_d = tl.arange(0, HALF_BLOCK)
    out_rows = tl.arange(0, BLOCK_S)

    ticket = tl.atomic_add(ws_ptr, 1, sem="relaxed")
    while ticket < n_items + lag:
        has_p1 = ticket < n_items
        has_p2 = ticket >= lag
        # ---- issue the loads of both tiles (nothing is read for a missing step: seq_len 0). The P1 read
        # marks its lines evict_last so they wait in L2 for the P2 read, which marks them evict_first
        # (H100, S=16k: 0.289 -> 0.271 ms MHA, 0.180 -> 0.169 ms GQA 32/8). ----
        (t1, _, _, row1, _, x1_ptr, x1_base, stride1_s, stride1_d, seq1, cos1_base, sin1_base, grp1, _,
         _) = _tile_setup(
            tl.minimum(ticket, n_items - 1), B, H_Q, H_KV, S_Q, S_KV, n_tiles_q, n_tiles_kv, q_ptr, k_ptr,
            v_ptr, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd, stride_cb, stride_sb, BLOCK_S)
        lo1, hi1, cos_lo1, cos_hi1, sin_lo1, sin_hi1 = _load_tile(
            x1_ptr, x1_base, row1, tl.where(has_p1, seq1, 0), stride1_s, stride1_d,
            cos_ptr, cos1_base, stride_cs, stride_cd, sin_ptr, sin1_base, stride_ss, stride_sd, t1 < 2,
            HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_last")
        (t2, b2, h2, row2, n_heads2, x2_ptr, x2_base, stride2_s, stride2_d, seq2, cos2_base, sin2_base, grp2,
         grp2_tiles, first2) = _tile_setup(
            tl.maximum(ticket - lag, 0), B, H_Q, H_KV, S_Q, S_KV, n_tiles_q, n_tiles_kv, q_ptr, k_ptr,
            v_ptr, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd, stride_cb, stride_sb, BLOCK_S)
        lo2, hi2, cos_lo2, cos_hi2, sin_lo2, sin_hi2 = _load_tile(
            x2_ptr, x2_base, row2, tl.where(has_p2, seq2, 0), stride2_s, stride2_d,
            cos_ptr, cos2_base, stride_cs, stride_cd, sin_ptr, sin2_base, stride_ss, stride_sd, t2 < 2,
            HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_first")
        # ---- atomics while the tiles are in flight: the next ticket, and a first look at P2's group.
        # Atomics, not loads, so that no stale L1 line is read; the acquire orders the amax read after
        # the release of every P1 it counted.
        next_ticket = tl.atomic_add(ws_ptr, 1, sem="relaxed")
        n_done = tl.atomic_add(done_ptr + grp2, 0, mask=has_p2, sem="acquire")
        amax_bits = tl.atomic_max(amax_ptr + grp2, 0, mask=has_p2, sem="relaxed")
        # ---- P1: publish max |x| of the tile, before any wait ----
        if has_p1:
            x1, x2 = _rotate(lo1, hi1, cos_lo1, cos_hi1, sin_lo1, sin_hi1, t1 < 2, APPLY_ROPE)
            m = _nan_aware_max(tl.maximum(tl.abs(x1), tl.abs(x2), propagate_nan=tl.PropagateNan.ALL))
            # The int32 max of the bit patterns orders non-negative floats, +inf and NaN (0x7F8..., 0x7FC...,
            # sign bit clear after abs) like torch.amax does: NaN wins.
            tl.atomic_max(amax_ptr + grp1, m.to(tl.int32, bitcast=True), sem="relaxed")
            tl.atomic_add(done_ptr + grp1, 1, sem="release")
        # ---- P2: wait for the group if needed, scale, quantize into BSHD ----
        if has_p2:
            if n_done < grp2_tiles:
                while n_done < grp2_tiles:
                    n_done = tl.atomic_add(done_ptr + grp2, 0, sem="acquire")
                amax_bits = tl.atomic_max(amax_ptr + grp2, 0, sem="relaxed")
            amax = amax_bits.to(tl.float32, bitcast=True)
            positive = amax > 0.0  # False for NaN too: scale 1 keeps NaN as NaN and clamps the rest
            scale = tl.where(positive, tl.math.div_rn(FP8_MAX, amax), 1.0)
            descale = tl.where(positive, tl.math.div_rn(amax, FP8_MAX), 1.0)
            tl.store(descale_ptr + grp2, descale, mask=first2)
            x1, x2 = _rotate(lo2, hi2, cos_lo2, cos_hi2, sin_lo2, sin_hi2, t2 < 2, APPLY_ROPE)
            # tl.clamp with PropagateNan.ALL keeps NaN as NaN (torch.clamp semantics); the cast is RNE.
            y1 = tl.clamp(x1 * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv)
            y2 = tl.clamp(x2 * scale, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL).to(tl.float8e4nv)
            mask = _tile_mask(row2, seq2, BLOCK_S, HALF, HALF_BLOCK)
            out_ptr = _select3(t2, q_out_ptr, k_out_ptr, v_out_ptr)
            out_stride_s = n_heads2 * HEAD_DIM
            out_tile = out_ptr + ((b2.to(tl.int64) * seq2 + row2) * n_heads2 + h2) * HEAD_DIM
            rows = out_rows[:, None] * out_stride_s
            tl.store(out_tile + rows + offs_d[None, :], y1, mask=mask)
            tl.store(out_tile + rows + (offs_d + HALF)[None, :], y2, mask=mask)
        ticket = next_ticket
