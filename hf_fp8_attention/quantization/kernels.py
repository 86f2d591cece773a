"""Triton kernel of the FP8 Q/K/V quantization: input BHSD (any strides), output BSHD fp8, one launch.

Work is cut into tiles of BLOCK_S positions of one head of one tensor (t = 0, 1, 2 for q, k, v), and
tiles into work items: CHUNK consecutive tiles of one head (a runtime argument). Each item is read for
two steps: P1 (its contribution to the group's amax, atomically merged once per item) and P2 (once every
P1 of the group is done: quantize the item's tiles with the group's scale). A persistent grid takes
tickets from an atomic counter; ticket `t` does P2(t - LAG) (if t >= LAG) and P1(t) (if t < n_items) tile
by tile, side by side, and then publishes P1(t), so an item's second read comes LAG items after its first
and finds it in L2 as long as LAG items fit there. Chunks cut the atomics and the waits to one set per item
(session 8, H200, GQA 32/8: RoPE at 64k 1.18 -> 0.90 ms).
Item order: q, k, v and, within a tensor, ((b * H + h) * N_CHUNKS + c), so the items of one scale group
(the G = H_q / H_kv query heads of a KV head, or one k / v head) are contiguous. INTERLEAVE (with RoPE):
per (b, KV head) a super-group of the G q heads and the k head, chunk-major ((c * (G + 1)) + member), so
that consecutive items read the same cos/sin rows (L2 hits instead of one cos/sin read per head), then the
v items as before; a q or k group then completes with its super-group.

Deadlock freedom: with LAG >= the items of the largest group (super-group with INTERLEAVE), every P1 that
P2(t - LAG) waits on belongs to a smaller ticket. A program waits for P2's group before its own P1 is
published, but it only ever holds its current ticket and the next one (taken early to hide the atomic's
latency): by induction on the ticket, the smallest ticket whose P1 is unpublished is held by a running
program that waits on smaller (published) tickets only, so every wait ends (if that ticket is a program's
early-taken next one, the program's current ticket is smaller, hence published, and the program moves on
to it). The grid need not be
co-resident. Under the interpreter programs run one after another and the ticket order alone makes every
wait succeed.

ONE_TILE (the launcher sets it with RoPE): a program holds one tile at a time, P1's tile is loaded and
reduced before P2's is loaded, instead of issuing both loads up front. It gives up the overlap of the
two reads for about half the registers (x plus fp32 cos/sin per tile), so that several programs fit per SM.

Accuracy modes, in the reference's order RoPE -> centring -> Hadamard -> amax:
- Centring (SMOOTH_K / SMOOTH_V) subtracts the per-(batch, head, channel) mean over the sequence (K after
  RoPE), computed before this kernel by `centring_sums_kernel` (one read of K / V in chunks, float64 sums);
  P1 and P2 subtract it, so the amax is exactly that of the centred values. The exact mean, not a sample:
  FA3's fp8 P.V accumulates imprecisely over long rows, and the residual channel offset a 256-row sample
  leaves (~1/16 of the noise) cost fa3 2.4 dB at 64k keys on the H200 (V = N(0,1) + 3) and took a
  Gaussian V's output from 23 dB at 8k to 0.4 dB at 64k.
- Hadamard (HADAMARD_QK / HADAMARD_V) multiplies the tile by the normalised Sylvester matrix in P2 only
  (`tile_math._hadamard`: a fast Walsh-Hadamard transform per half tile, then the stage joining the halves),
  the (centred) rows rounded to the input dtype first so that the products with +-1 are exact. P1 does not
  rotate for the group amax: that of a rotated tensor is the power-of-two ceiling of
  max_row min(||x||_2, ||x||_1 / sqrt(D)) >= max |x H| (`tile_math._pow2_norm_bound`),
  so P1 costs two row reductions, not a matmul. For near-Gaussian rows this is ~3-6x the true amax of the
  rotated row (~2^2-2^3); e4m3 is a float format, so that moves the values' exponents, not their relative
  precision, and the smallest elements that become subnormal carry ~1e-4 of the energy. (||x||_2 alone was
  up to 2 sqrt(D) too large for a one-channel spike, which made the rotation worse than none on massive
  activations in a CPU check.)
  Per-block scales (BLOCK_SCALES) are the exact amax of each rotated block: q's (and e4m3 k's, 16 rows) from
  P2's tile; int8 k's 128-row blocks span tiles, so P1 merges each K tile's exact amax into its block's
  workspace slot, rotating the K tile (one more dot per K tile) when k is rotated.

The kernel takes pointers, strides and constexprs only; the launcher is `qkv.py`. Launch it with
`enable_fp_fusion=False` so that the RoPE mul/mul/add rounds like the torch reference (no FMA
contraction), which keeps the amax, and so the descales, bit-identical.
"""

import triton
import triton.language as tl

from .tile_math import (_amax_scales, _block_amax, _block_nonfinite, _finite_abs, _hadamard, _pow2_norm_bound,
                        _to_fp8, _to_int8)

# Workspace (int32, zeroed by the launcher): [0] ticket counter, [1] the NO_SPIN failure flag, the rest of
# WS_PAD ints so that the ticket's cache line is its own, then amax bits per group, then finished-P1 count per group. Groups are indexed
# like the descales: (t * B + b) * H_KV + kv_head; a K/V head's mean is at its group index minus B * H_KV.
# With BLOCK_SCALES and K_SCALE_BLOCK > SCALE_BLOCK, then per K scale block ((b * H_KV + kv_head) * N_BLK_KV +
# block) its finite amax bits, then (QK_INT8) whether it holds a non-finite element.
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
def _item_setup(
    item, B, H_Q, H_KV, S_Q, S_KV, NC_Q, NC_KV,
    q_ptr, k_ptr, v_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_sb, stride_ss, cu_q_ptr, cu_k_ptr,
    CHUNK_ROWS, VARLEN: tl.constexpr, INTERLEAVE: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):
    """Work item `item` (a chunk of CHUNK_ROWS rows of one head of q, k or v; the order is the module
    docstring's) -> its tensor t, batch b, head h, first row, the tensor's head count, pointer, base offset and
    strides, its sequence length, cos/sin base offsets, its scale group, the group's item count, whether it
    is the group's first item, and the row of its sequence's first token in the output. NC_Q / NC_KV: chunks
    per head of q and of k / v.

    VARLEN: b is a sequence of packed tokens, rows [cu[b], cu[b + 1]) of the (1, total, H, D) input
    (cu_q_ptr for q, cu_k_ptr for k and v); S_Q / S_KV are the longest sequence's length, so a shorter
    sequence's tail chunks are empty (masked, amax 0).

    HEADS_FASTEST (the single-pass kernel, whose items wait on nothing): within a tensor, the heads of a chunk
    before the next chunk, so that the items in flight read whole token rows, as a copy does; the two-pass
    kernel keeps a group's items contiguous."""
    G = H_Q // H_KV
    if INTERLEAVE:
        nc = tl.maximum(NC_Q, NC_KV)
        span = (G + 1) * nc  # items of one (b, kv head) super-group
        n_a = B * H_KV * span
        in_a = item < n_a
        r = item % span
        member = r % (G + 1)  # 0..G-1: the group's q heads, G: its k head
        t = tl.where(in_a, (member == G).to(tl.int32), 2)
        bkv = tl.where(in_a, item // span, (item - n_a) // NC_KV)  # b * H_KV + kv head
        chunk = tl.where(in_a, r // (G + 1), (item - n_a) % NC_KV)
        b = bkv // H_KV
        h = tl.where(t == 0, (bkv % H_KV) * G + member, bkv % H_KV)
        n_heads = tl.where(t == 0, H_Q, H_KV)
        group_items = tl.where(t == 0, G * nc, tl.where(t == 1, nc, NC_KV))
        first_of_group = (chunk == 0) & ((t > 0) | (member == 0))
    else:
        n_q = B * H_Q * NC_Q
        n_kv = B * H_KV * NC_KV
        t = (item >= n_q).to(tl.int32) + (item >= n_q + n_kv).to(tl.int32)
        local = item - _select3(t, 0, n_q, n_q + n_kv)
        n_heads = tl.where(t == 0, H_Q, H_KV)
        n_chunks = tl.where(t == 0, NC_Q, NC_KV)
        group = tl.where(t == 0, G, 1)
        if HEADS_FASTEST:
            bh = local % (B * n_heads)
            chunk = local // (B * n_heads)
        else:
            bh = local // n_chunks
            chunk = local % n_chunks
        b = bh // n_heads
        h = bh % n_heads
        group_items = group * n_chunks
        first_of_group = (chunk == 0) & (h % group == 0)
    x_ptr = _select3(t, q_ptr, k_ptr, v_ptr)
    stride_b = _select3(t, stride_qb, stride_kb, stride_vb)
    stride_h = _select3(t, stride_qh, stride_kh, stride_vh)
    stride_s = _select3(t, stride_qs, stride_ks, stride_vs)
    stride_d = _select3(t, stride_qd, stride_kd, stride_vd)
    b64 = b.to(tl.int64)
    if VARLEN:
        cu_ptr = tl.where(t == 0, cu_q_ptr, cu_k_ptr)
        start = tl.load(cu_ptr + b).to(tl.int64)
        seq_len = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
        x_base = start * stride_s + h.to(tl.int64) * stride_h
        cos_base = start * stride_cs
        sin_base = start * stride_ss
        out_start = start
    else:
        seq_len = tl.where(t == 0, S_Q, S_KV)
        x_base = b64 * stride_b + h.to(tl.int64) * stride_h
        cos_base = b64 * stride_cb
        sin_base = b64 * stride_sb
        out_start = b64 * seq_len
    grp = (t * B + b) * H_KV + tl.where(t == 0, h // G, h)
    return (t, b, h, chunk * CHUNK_ROWS, n_heads, x_ptr, x_base, stride_s, stride_d,
            seq_len, cos_base, sin_base, grp, group_items, first_of_group, out_start)


@triton.jit
def centring_sums_kernel(
    k_ptr, v_ptr, cos_ptr, sin_ptr, sums_ptr, cu_k_ptr,
    B, H_KV, S_KV, CHUNK,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, ROWS: tl.constexpr, D_CONTIG: tl.constexpr,
    APPLY_ROPE: tl.constexpr, FIRST_KIND: tl.constexpr, VARLEN: tl.constexpr,
):
    """Per-channel float64 sums of one chunk of CHUNK rows of one K or V head, K after RoPE (the centring
    means' first step; `qkv._centring_means` adds the chunks). Grid: (n_kinds * B * H_KV, n_chunks); axis 0
    is (kind - FIRST_KIND, b, h), kind 1 = K, 2 = V. Non-finite elements count as 0. sums_ptr
    (n_kinds, B, H_KV, n_chunks, HEAD_DIM) float64. The float32 values are summed in float64: exact for
    values within ~29 binades of each other, so the summation order does not matter and the total equals
    the reference's float64 sum over the elements."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    kind = FIRST_KIND + pid // (B * H_KV)
    bh = pid % (B * H_KV)
    b = bh // H_KV
    h = bh % H_KV
    x_ptr = tl.where(kind == 1, k_ptr, v_ptr)
    stride_s = tl.where(kind == 1, stride_ks, stride_vs)
    stride_d = tl.where(kind == 1, stride_kd, stride_vd)
    stride_h = tl.where(kind == 1, stride_kh, stride_vh)
    if VARLEN:
        start = tl.load(cu_k_ptr + b).to(tl.int64)
        seq_len = (tl.load(cu_k_ptr + b + 1) - start).to(tl.int32)
        x_base = start * stride_s + h.to(tl.int64) * stride_h
        cos_base = start * stride_cs
        sin_base = start * stride_ss
    else:
        seq_len = S_KV
        x_base = b.to(tl.int64) * tl.where(kind == 1, stride_kb, stride_vb) + h.to(tl.int64) * stride_h
        cos_base = b.to(tl.int64) * stride_cb
        sin_base = b.to(tl.int64) * stride_sb
    HALF = HEAD_DIM // 2  # constexpr
    offs_d = tl.arange(0, HALF_BLOCK)
    d_mask = offs_d < HALF
    # float64 accumulators of the tile's shape, reduced over rows once at the end: a row reduction per
    # iteration made this pass ~4x slower than its read (H200, S=16k, H_kv=32: 156 us for V's 128 MiB)
    acc1 = tl.zeros((ROWS, HALF_BLOCK), tl.float64)
    acc2 = tl.zeros((ROWS, HALF_BLOCK), tl.float64)
    r0 = chunk * CHUNK
    r1 = tl.minimum(r0 + CHUNK, seq_len)
    for i in tl.range(0, tl.cdiv(r1 - r0, ROWS)):
        start_r = r0 + i * ROWS
        # rows [start_r, start_r + ROWS) below r1, loaded as the quantize tiles are (e4m3 codes too: smooth_v's
        # add-back takes the mean of the quantized V; `_rotate` widens them to float32 exactly)
        lo, hi, c_lo, c_hi, s_lo, s_hi = _load_tile(
            x_ptr, x_base, start_r, r1, stride_s, stride_d, cos_ptr, cos_base, stride_cs, stride_cd,
            sin_ptr, sin_base, stride_ss, stride_sd, kind == 1, HEAD_DIM, HALF_BLOCK, ROWS, D_CONTIG, APPLY_ROPE, "")
        x1, x2 = _rotate(lo, hi, c_lo, c_hi, s_lo, s_hi, kind == 1, APPLY_ROPE)  # rows past r1: 0
        acc1 += tl.where(tl.abs(x1) < float("inf"), x1, 0.0).to(tl.float64)
        acc2 += tl.where(tl.abs(x2) < float("inf"), x2, 0.0).to(tl.float64)
    sum1 = tl.sum(acc1, axis=0)
    sum2 = tl.sum(acc2, axis=0)
    out = sums_ptr + (pid.to(tl.int64) * n_chunks + chunk) * HEAD_DIM + offs_d
    tl.store(out, sum1, mask=d_mask)
    tl.store(out + HALF, sum2, mask=d_mask)


@triton.jit
def _centre(x1, x2, mean_ptr, slot, on, valid, offs_d, d_mask, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """x - mean of K/V head `slot` when `on`; x - 0 == x exactly. Rows past the sequence (`valid` False,
    loaded as 0) stay 0, so they never count in an amax."""
    m_ptr = mean_ptr + slot.to(tl.int64) * HEAD_DIM + offs_d
    m1 = tl.load(m_ptr, mask=d_mask & on, other=0.0)
    m2 = tl.load(m_ptr + HALF, mask=d_mask & on, other=0.0)
    return tl.where(valid[:, None], x1 - m1[None, :], 0.0), tl.where(valid[:, None], x2 - m2[None, :], 0.0)


@triton.jit
def _publish(amax_ptr, done_ptr, grp, m, on):
    """P1's end: the item's amax into its group's (the int32 max of the bit patterns orders non-negative
    finite floats like the floats), then (release) one more finished item of the group."""
    if on:
        tl.atomic_max(amax_ptr + grp, m.to(tl.int32, bitcast=True), sem="relaxed")
        tl.atomic_add(done_ptr + grp, 1, sem="release")


@triton.jit
def _group_scale(done_ptr, amax_ptr, descale_ptr, grp, grp_items, on, first, FP8_MAX: tl.constexpr,
                 flag_ptr, NO_SPIN: tl.constexpr):
    """P2's start: waits until the group's `grp_items` P1s are published (with LAG usually at the first look;
    atomics, not loads, so that no stale L1 line is read, the acquire ordering the amax read after the
    release of every P1 it counted), stores the group's descale once (`first`) and returns its scale.
    NO_SPIN (the interpreter, whose programs run one after another: such a wait could never end): no wait;
    an unfinished group sets `flag_ptr`, which the launcher turns into an error, so that a schedule bug
    fails a CPU test instead of hanging it."""
    n_done = tl.atomic_add(done_ptr + grp, 0, mask=on, sem="acquire")
    if NO_SPIN:
        tl.atomic_max(flag_ptr, 1, mask=on & (n_done < grp_items), sem="relaxed")
    elif on:
        while n_done < grp_items:
            n_done = tl.atomic_add(done_ptr + grp, 0, sem="acquire")
    amax_bits = tl.atomic_max(amax_ptr + grp, 0, mask=on, sem="relaxed")
    return _scale_of_bits(amax_bits, descale_ptr, grp, on & first, FP8_MAX)


@triton.jit
def _group_amax(x1, x2, t, HADAMARD_QK: tl.constexpr, HADAMARD_V: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """A tile's share of its per-group scale's amax (half tiles x1, x2 of tensor t after RoPE and centring, rows
    past the sequence 0): max |x| over its finite elements, or, where the tensor is rotated (HADAMARD_QK for q
    and k, HADAMARD_V for v), the power-of-two bound of its rows' norms, which needs no rotation."""
    if HADAMARD_QK and HADAMARD_V:
        m = _pow2_norm_bound(x1, x2, INV_SQRT_D)
    elif HADAMARD_QK or HADAMARD_V:
        if (t < 2) == HADAMARD_QK:  # a branch, not a select: one of the two runs
            m = _pow2_norm_bound(x1, x2, INV_SQRT_D)
        else:
            m = tl.max(tl.maximum(_finite_abs(x1), _finite_abs(x2)))
    else:
        m = tl.max(tl.maximum(_finite_abs(x1), _finite_abs(x2)))
    return m


@triton.jit
def _scale_of_bits(amax_bits, descale_ptr, grp, store, FP8_MAX: tl.constexpr):
    """Group grp's scale from its merged amax bits (int32 bit pattern of the float amax); where `store`, its
    descale goes to descale_ptr[grp] (one tile of the group stores it)."""
    scale, descale = _amax_scales(amax_bits.to(tl.float32, bitcast=True), FP8_MAX)
    tl.store(descale_ptr + grp, descale, mask=store)
    return scale


@triton.jit
def _group_scale_of(amax_ptr, descale_ptr, grp, first, FP8_MAX: tl.constexpr):
    """The split path's codes launch (`block_kernel`, PASS_CODES): group grp's scale from the amax bits the
    amax launch merged (a launch before: a plain load sees them); the group's first tile (`first`) stores its
    descale."""
    return _scale_of_bits(tl.load(amax_ptr + grp), descale_ptr, grp, first, FP8_MAX)


@triton.jit
def _block_row_scales(x1, x2, valid, row0, seq_len, blk_ptr, BLOCK_S: tl.constexpr, BLK: tl.constexpr,
                      MAX: tl.constexpr, INT8: tl.constexpr):
    """Per-block scales of a tile (half tiles x1, x2 of rows [row0, row0 + BLOCK_S); rows past the sequence
    are 0 and `valid` False): the exact amax of each BLK rows (BLK divides BLOCK_S) over the finite
    elements gives scale MAX / amax and descale amax / MAX (1 and 1 for amax 0); the descales of the blocks
    the sequence reaches go to blk_ptr[row0 // BLK + i] (blk_ptr: the head's first block). INT8: int8 has
    no NaN, so a block holding a non-finite element gets a NaN descale. Returns the (BLOCK_S,) row scales."""
    blk_amax = _block_amax(x1, x2, valid, BLOCK_S, BLK)  # (BLOCK_S // BLK,)
    blk_scale, blk_descale = _amax_scales(blk_amax, MAX)
    if INT8:
        blk_descale = tl.where(_block_nonfinite(x1, x2, BLOCK_S, BLK), float("nan"), blk_descale)
    blk_idx = row0 // BLK + tl.arange(0, BLOCK_S // BLK)
    tl.store(blk_ptr + blk_idx, blk_descale, mask=blk_idx * BLK < seq_len)
    return tl.reshape(tl.broadcast_to(blk_scale[:, None], (BLOCK_S // BLK, BLK)), (BLOCK_S,))


@triton.jit
def _wgmma_key_order(y, BLOCK_S: tl.constexpr, N: tl.constexpr):
    """The (BLOCK_S, N) tile's rows in wgmma order within every 16 (`quantized.WGMMA_KEY_AT`): key bits
    (k3 k2 k1 k0) of a row go to position (k2 k1 k3 k0). Exact for a tile whose masked rows come in whole 16s
    (row0 and seq_len multiples of 16: the launchers refuse anything else)."""
    tl.static_assert(BLOCK_S % 16 == 0, "the wgmma key order permutes whole 16s of rows")
    y = tl.reshape(y, (BLOCK_S // 16, 2, 2, 2, 2, N))
    return tl.reshape(tl.permute(y, (0, 2, 3, 1, 4, 5)), (BLOCK_S, N))


@triton.jit
def _store_codes(x1, x2, row_scale, t, b, h, row0, seq_len, out_start, n_heads, H_KV, V_ROWS,
                 q_out_ptr, k_out_ptr, v_out_ptr, HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr,
                 BLOCK_S: tl.constexpr, FP8_MAX: tl.constexpr, QK_MAX: tl.constexpr, QK_INT8: tl.constexpr,
                 V_KEYS_CONTIG: tl.constexpr, VARLEN: tl.constexpr):
    """Quantizes rows [row0, row0 + BLOCK_S) of head h of tensor t (0 q, 1 k, 2 v) with `row_scale` (a scalar or
    a (BLOCK_S, 1) column) and stores the rows below seq_len: BSHD at token out_start + row (out_start: the
    sequence's first output token), or, for v with V_KEYS_CONTIG, keys-contiguous (see `qkv_quantize_kernel`;
    V_KEYS_CONTIG 2: its keys in wgmma order within every 16, `_wgmma_key_order`).
    QK_INT8: q and k as int8, v as e4m3, all stored as bytes (the outputs passed as uint8)."""
    HALF = HEAD_DIM // 2  # constexpr
    offs_d = tl.arange(0, HALF_BLOCK)
    out_rows = tl.arange(0, BLOCK_S)
    if QK_INT8:  # a branch, not a select: one cast runs
        if t < 2:
            y1 = _to_int8(x1 * row_scale, QK_MAX).to(tl.uint8, bitcast=True)
            y2 = _to_int8(x2 * row_scale, QK_MAX).to(tl.uint8, bitcast=True)
        else:
            y1 = _to_fp8(x1 * row_scale, FP8_MAX).to(tl.uint8, bitcast=True)
            y2 = _to_fp8(x2 * row_scale, FP8_MAX).to(tl.uint8, bitcast=True)
    else:
        y1 = _to_fp8(x1 * row_scale, FP8_MAX)
        y2 = _to_fp8(x2 * row_scale, FP8_MAX)
    mask = _tile_mask(row0, seq_len, BLOCK_S, HALF, HALF_BLOCK)
    if V_KEYS_CONTIG:
        transposed = t == 2
    else:
        transposed = False
    if transposed:  # v, keys-contiguous: channel c of row r at c * V_ROWS + r of its head
        if V_KEYS_CONTIG == 2:  # (the rows moved, not the addresses: the stores stay contiguous over keys)
            y1 = _wgmma_key_order(y1, BLOCK_S, HALF_BLOCK)
            y2 = _wgmma_key_order(y2, BLOCK_S, HALF_BLOCK)
        if VARLEN:
            v_head = h.to(tl.int64) * HEAD_DIM * V_ROWS + out_start + row0
        else:
            v_head = (b * H_KV + h).to(tl.int64) * HEAD_DIM * V_ROWS + row0
        cols1 = offs_d.to(tl.int64)[None, :] * V_ROWS
        cols2 = (offs_d + HALF).to(tl.int64)[None, :] * V_ROWS
        tl.store(v_out_ptr + v_head + cols1 + out_rows[:, None], y1, mask=mask)
        tl.store(v_out_ptr + v_head + cols2 + out_rows[:, None], y2, mask=mask)
    else:
        out_ptr = _select3(t, q_out_ptr, k_out_ptr, v_out_ptr)
        out_stride_s = n_heads * HEAD_DIM
        out_tile = out_ptr + ((out_start + row0) * n_heads + h) * HEAD_DIM
        rows = out_rows[:, None] * out_stride_s
        tl.store(out_tile + rows + offs_d[None, :], y1, mask=mask)
        tl.store(out_tile + rows + (offs_d + HALF)[None, :], y2, mask=mask)


@triton.jit
def qkv_quantize_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,
    q_out_ptr, k_out_ptr, v_out_ptr, descale_ptr, ws_ptr, mean_ptr, cu_q_ptr, cu_k_ptr,
    q_blk_ptr, k_blk_ptr, N_BLK_Q, N_BLK_KV,
    B, H_Q, H_KV, S_Q, S_KV, LAG, V_ROWS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    FP8_MAX: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    D_CONTIG: tl.constexpr, APPLY_ROPE: tl.constexpr, ONE_TILE: tl.constexpr,
    HADAMARD_QK: tl.constexpr, HADAMARD_V: tl.constexpr, INV_SQRT_D: tl.constexpr,
    SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_SCALES: tl.constexpr, SCALE_BLOCK: tl.constexpr, K_SCALE_BLOCK: tl.constexpr, QK_INT8: tl.constexpr,
    QK_MAX: tl.constexpr, CHUNK, INTERLEAVE: tl.constexpr, NO_SPIN: tl.constexpr = False,
    V_KEYS_CONTIG: tl.constexpr = False,
):
    """Per group: x is the tile after RoPE (q, k), the centring (k, v) and the Hadamard rotation (as
    switched on); amax = max |x| over its finite elements (a rotated tensor: the power-of-two bound of its
    rows' norms, see the module docstring), scale = FP8_MAX / amax (1 if amax is 0); every element is
    quantized with round-to-nearest-even into the BSHD fp8 output (NaN and +-inf as NaN), and
    descale = amax / FP8_MAX (1 if amax is 0) goes to descale[t, b, kv_head] of a (3, B, H_KV) buffer. `ws_ptr` is the
    zeroed int32 workspace described at WS_PAD; LAG (in items) is at least the item count of the largest
    group (super-group with INTERLEAVE). CHUNK: tiles per item. With SMOOTH_K / SMOOTH_V: mean_ptr (2, B, H_KV, HEAD_DIM) float32 holds the K / V means
    (`centring_sums_kernel`, launched before).
    HADAMARD_* needs HALF_BLOCK == HEAD_DIM // 2 (power-of-two head dims).
    VARLEN: B sequences packed along the rows of a batch-1 input, int32 offsets cu_q_ptr / cu_k_ptr (B + 1,)
    (see `_item_setup`), S_Q / S_KV the longest lengths; outputs packed the same way, scales and offsets per
    (sequence, KV head), cos/sin rows indexed by the packed token.
    BLOCK_SCALES: q is quantized with one scale per SCALE_BLOCK rows of one head (from the P2 tile itself:
    no extra read), k with one per K_SCALE_BLOCK rows: SCALE_BLOCK (like q) or a multiple of BLOCK_S (a K
    tile's P1 merges its exact amax, of the rotated tile if k is rotated, into its block's workspace slot;
    P2, after the group's P1s, reads it). The descales go to q_blk_ptr (B, H_Q, N_BLK_Q) and k_blk_ptr
    (B, H_KV, N_BLK_KV) float32 (N_BLK_Q = cdiv(longest q length, SCALE_BLOCK), N_BLK_KV = cdiv(longest kv
    length, K_SCALE_BLOCK); SCALE_BLOCK divides BLOCK_S); v keeps its per-group scale, and descale_ptr still
    gets every group's descale.
    QK_MAX: the largest q/k code under BLOCK_SCALES, FP8_MAX or, with QK_INT8, 127: q and k then become int8,
    floor(x * QK_MAX / block amax + 0.5) clamped to +-QK_MAX (non-finite elements 0, their block's descale
    NaN), and the outputs are passed as uint8.

    V_KEYS_CONTIG: v's codes go to keys-contiguous (B, H_KV, HEAD_DIM, V_ROWS) memory (VARLEN: batch 1, rows
    packed), the layout the Triton attention reads V in for long prefills, instead of BSHD; V_ROWS is S_KV
    (VARLEN: the packed total), 0 (unread) without V_KEYS_CONTIG. The same codes. V_KEYS_CONTIG 2 (not with
    VARLEN; S_KV a multiple of 16): those keys in wgmma order within every 16 (`_wgmma_key_order`), the layout
    the Gluon attention kernel reads.

    Grid: (n_programs,), persistent: each program takes tickets until n_items + LAG are taken.
    """
    chunk_rows = BLOCK_S * CHUNK
    nc_q = tl.cdiv(S_Q, chunk_rows)
    nc_kv = tl.cdiv(S_KV, chunk_rows)
    if INTERLEAVE:
        n_items = B * H_KV * ((H_Q // H_KV + 1) * tl.maximum(nc_q, nc_kv) + nc_kv)
    else:
        n_items = B * H_Q * nc_q + 2 * B * H_KV * nc_kv
    lag = tl.minimum(LAG, n_items)
    amax_ptr = ws_ptr + WS_PAD
    done_ptr = amax_ptr + 3 * B * H_KV
    kblk_ptr = done_ptr + 3 * B * H_KV  # BLOCK_SCALES: K block amax bits, then non-finite flags
    n_kblk = B * H_KV * N_BLK_KV
    K_LIKE_Q: tl.constexpr = K_SCALE_BLOCK == SCALE_BLOCK  # k's block scales from its P2 tile, like q's
    if BLOCK_SCALES:
        tl.static_assert(BLOCK_S % SCALE_BLOCK == 0, "a tile holds whole SCALE_BLOCK blocks")
        tl.static_assert(K_LIKE_Q or K_SCALE_BLOCK % BLOCK_S == 0, "a K tile lies inside one K scale block")
    HALF = HEAD_DIM // 2  # constexpr
    offs_d = tl.arange(0, HALF_BLOCK)
    d_mask = offs_d < HALF
    out_rows = tl.arange(0, BLOCK_S)
    ROTATES: tl.constexpr = HADAMARD_QK or HADAMARD_V
    rot_dtype: tl.constexpr = q_ptr.dtype.element_ty  # the rotation's inputs: rows rounded to the input dtype

    ticket = tl.atomic_add(ws_ptr, 1, sem="relaxed")
    while ticket < n_items + lag:
        item = ticket
        has_p1 = item < n_items
        has_p2 = item >= lag
        (t1, b1, h1, row1, _, x1_ptr, x1_base, stride1_s, stride1_d, seq1, cos1_base, sin1_base, grp1, _,
         _, _) = _item_setup(
            tl.minimum(item, n_items - 1), B, H_Q, H_KV, S_Q, S_KV, nc_q, nc_kv, q_ptr,
            k_ptr, v_ptr, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd, stride_cb, stride_cs, stride_sb, stride_ss,
            cu_q_ptr, cu_k_ptr, chunk_rows, VARLEN, INTERLEAVE, False)
        (t2, b2, h2, row2, n_heads2, x2_ptr, x2_base, stride2_s, stride2_d, seq2, cos2_base, sin2_base, grp2,
         grp2_items, first2, out_start2) = _item_setup(
            tl.maximum(item - lag, 0), B, H_Q, H_KV, S_Q, S_KV, nc_q, nc_kv, q_ptr, k_ptr,
            v_ptr, stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
            stride_vb, stride_vh, stride_vs, stride_vd, stride_cb, stride_cs, stride_sb, stride_ss,
            cu_q_ptr, cu_k_ptr, chunk_rows, VARLEN, INTERLEAVE, False)
        if not ONE_TILE:
            # the first tiles' loads go out before the atomics below (see the loop for the others)
            lo1, hi1, cos_lo1, cos_hi1, sin_lo1, sin_hi1 = _load_tile(
                x1_ptr, x1_base, row1, tl.where(has_p1, seq1, 0), stride1_s, stride1_d,
                cos_ptr, cos1_base, stride_cs, stride_cd, sin_ptr, sin1_base, stride_ss, stride_sd, t1 < 2,
                HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_last")
            lo2, hi2, cos_lo2, cos_hi2, sin_lo2, sin_hi2 = _load_tile(
                x2_ptr, x2_base, row2, tl.where(has_p2, seq2, 0), stride2_s, stride2_d,
                cos_ptr, cos2_base, stride_cs, stride_cd, sin_ptr, sin2_base, stride_ss, stride_sd, t2 < 2,
                HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_first")
        # ---- the next ticket early, then P2's group, before this item's P1 is published (deadlock-free
        # all the same: module docstring) ----
        next_ticket = tl.atomic_add(ws_ptr, 1, sem="relaxed")
        scale = _group_scale(done_ptr, amax_ptr, descale_ptr, grp2, grp2_items, has_p2, first2, FP8_MAX,
                             ws_ptr + 1, NO_SPIN)
        if SMOOTH_K or SMOOTH_V:
            smooth1 = tl.where(t1 == 1, SMOOTH_K, tl.where(t1 == 2, SMOOTH_V, False))
            smooth2 = tl.where(t2 == 1, SMOOTH_K, tl.where(t2 == 2, SMOOTH_V, False))
        else:
            smooth1 = False
            smooth2 = False
        m = tl.zeros((BLOCK_S,), dtype=tl.float32).max(axis=0)  # P1's running max over the chunk
        # One step per tile: its P1 and its P2 (P2's group was waited for above; a session-8 variant that
        # published the P1 tiles before waiting, with RoPE, was 8-17% slower at 16k-64k on the H200, another run).
        for j in tl.range(0, CHUNK):
            r1 = row1 + j * BLOCK_S
            r2 = row2 + j * BLOCK_S
            if not ONE_TILE:
                if j > 0:
                    lo1, hi1, cos_lo1, cos_hi1, sin_lo1, sin_hi1 = _load_tile(
                        x1_ptr, x1_base, r1, tl.where(has_p1, seq1, 0), stride1_s, stride1_d,
                        cos_ptr, cos1_base, stride_cs, stride_cd, sin_ptr, sin1_base, stride_ss, stride_sd, t1 < 2,
                        HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_last")
                    lo2, hi2, cos_lo2, cos_hi2, sin_lo2, sin_hi2 = _load_tile(
                        x2_ptr, x2_base, r2, tl.where(has_p2, seq2, 0), stride2_s, stride2_d,
                        cos_ptr, cos2_base, stride_cs, stride_cd, sin_ptr, sin2_base, stride_ss, stride_sd, t2 < 2,
                        HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_first")
            # ---- P1: the tile's contribution to its group's amax (published after the chunk) ----
            if has_p1:
                if ONE_TILE:
                    lo1, hi1, cos_lo1, cos_hi1, sin_lo1, sin_hi1 = _load_tile(
                        x1_ptr, x1_base, r1, seq1, stride1_s, stride1_d,
                        cos_ptr, cos1_base, stride_cs, stride_cd, sin_ptr, sin1_base, stride_ss, stride_sd, t1 < 2,
                        HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_last")
                x1, x2 = _rotate(lo1, hi1, cos_lo1, cos_hi1, sin_lo1, sin_hi1, t1 < 2, APPLY_ROPE)
                if SMOOTH_K or SMOOTH_V:
                    x1, x2 = _centre(x1, x2, mean_ptr, grp1 - B * H_KV, smooth1, (r1 + out_rows) < seq1, offs_d,
                                     d_mask, HALF, HEAD_DIM)
                m_j = _group_amax(x1, x2, t1, HADAMARD_QK, HADAMARD_V, INV_SQRT_D)
                m = tl.maximum(m, m_j)
                if BLOCK_SCALES and not K_LIKE_Q:
                    if t1 == 1:  # k: the tile's exact amax (of the rotated tile if k is rotated) for its K block
                        if HADAMARD_QK:
                            kx1, kx2 = _hadamard(x1, x2, rot_dtype, INV_SQRT_D)
                            k_m = tl.max(_block_amax(kx1, kx2, (r1 + out_rows) < seq1, BLOCK_S, BLOCK_S))
                        else:  # m_j: the same max over the same (finite, in-sequence) values
                            kx1, kx2 = x1, x2
                            k_m = m_j
                        # (a chunk's tiles past the sequence touch no slot: past the longest one there is none)
                        slot = (b1 * H_KV + h1).to(tl.int64) * N_BLK_KV + r1 // K_SCALE_BLOCK
                        tl.atomic_max(kblk_ptr + slot, k_m.to(tl.int32, bitcast=True), mask=r1 < seq1, sem="relaxed")
                        if QK_INT8:  # flag a non-finite element (an atomic only where there is one)
                            bad = tl.max(_block_nonfinite(kx1, kx2, BLOCK_S, BLOCK_S).to(tl.int32))
                            tl.atomic_max(kblk_ptr + n_kblk + slot, 1, mask=(bad > 0) & (r1 < seq1), sem="relaxed")
            # ---- P2: scale, quantize into BSHD ----
            if has_p2:
                if ONE_TILE:
                    lo2, hi2, cos_lo2, cos_hi2, sin_lo2, sin_hi2 = _load_tile(
                        x2_ptr, x2_base, r2, seq2, stride2_s, stride2_d,
                        cos_ptr, cos2_base, stride_cs, stride_cd, sin_ptr, sin2_base, stride_ss, stride_sd, t2 < 2,
                        HEAD_DIM, HALF_BLOCK, BLOCK_S, D_CONTIG, APPLY_ROPE, "evict_first")
                x1, x2 = _rotate(lo2, hi2, cos_lo2, cos_hi2, sin_lo2, sin_hi2, t2 < 2, APPLY_ROPE)
                if SMOOTH_K or SMOOTH_V:
                    x1, x2 = _centre(x1, x2, mean_ptr, grp2 - B * H_KV, smooth2, (r2 + out_rows) < seq2, offs_d,
                                     d_mask, HALF, HEAD_DIM)
                if HADAMARD_QK and HADAMARD_V:
                    x1, x2 = _hadamard(x1, x2, rot_dtype, INV_SQRT_D)
                elif ROTATES:
                    if (t2 < 2) == HADAMARD_QK:
                        x1, x2 = _hadamard(x1, x2, rot_dtype, INV_SQRT_D)
                if BLOCK_SCALES:
                    if t2 == 0 or (K_LIKE_Q and t2 == 1):  # a scale per SCALE_BLOCK rows, from this tile alone
                        n_blk = tl.where(t2 == 0, N_BLK_Q, N_BLK_KV)
                        blk_ptr = tl.where(t2 == 0, q_blk_ptr, k_blk_ptr) + (b2 * n_heads2 + h2).to(tl.int64) * n_blk
                        row_scale = _block_row_scales(x1, x2, (r2 + out_rows) < seq2, r2, seq2, blk_ptr,
                                                      BLOCK_S, SCALE_BLOCK, QK_MAX, QK_INT8)
                    elif t2 == 1:  # k: its K block's scale, from the amax every tile of the block merged in P1
                        k_slot2 = (b2 * H_KV + h2).to(tl.int64) * N_BLK_KV + r2 // K_SCALE_BLOCK
                        in_seq = r2 < seq2
                        kb_bits = tl.atomic_max(kblk_ptr + k_slot2, 0, mask=in_seq, sem="relaxed")
                        k_scale, k_descale = _amax_scales(kb_bits.to(tl.float32, bitcast=True), QK_MAX)
                        if QK_INT8:
                            kb_bad = tl.atomic_max(kblk_ptr + n_kblk + k_slot2, 0, mask=in_seq, sem="relaxed")
                            k_descale = tl.where(kb_bad > 0, float("nan"), k_descale)
                        tl.store(k_blk_ptr + k_slot2, k_descale, mask=in_seq & (r2 % K_SCALE_BLOCK == 0))
                        row_scale = tl.zeros((BLOCK_S,), dtype=tl.float32) + k_scale
                    else:  # v: the group's
                        row_scale = tl.zeros((BLOCK_S,), dtype=tl.float32) + scale
                    row_scale = row_scale[:, None]
                else:
                    row_scale = scale
                _store_codes(x1, x2, row_scale, t2, b2, h2, r2, seq2, out_start2, n_heads2, H_KV, V_ROWS,
                             q_out_ptr, k_out_ptr, v_out_ptr, HEAD_DIM, HALF_BLOCK, BLOCK_S, FP8_MAX, QK_MAX,
                             QK_INT8, V_KEYS_CONTIG, VARLEN)
        _publish(amax_ptr, done_ptr, grp1, m, has_p1)
        ticket = next_ticket


@triton.jit
def add_v_mean_kernel(
    out_ptr, mean_ptr, S, H_KV, stride_ob, stride_os,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """smooth_v's add-back in place: out[b, s, h, :] += mean[b, h // GROUP, :] for out (B, S, H_q, D) with unit
    strides over heads and channels, mean (B, H_kv, D) float32 added in float32 and rounded once to out's
    dtype (what `out.add_(mean)` computes). Grid: (cdiv(S, BLOCK_T), B)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < S
    n_cols = H_KV * GROUP * HEAD_DIM
    base = out_ptr + b.to(tl.int64) * stride_ob + rows.to(tl.int64)[:, None] * stride_os
    for c0 in tl.range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        m_col = (cols // (GROUP * HEAD_DIM)) * HEAD_DIM + cols % HEAD_DIM
        m = tl.load(mean_ptr + (b * H_KV) * HEAD_DIM + m_col, mask=col_ok, other=0.0)
        mask = row_ok[:, None] & col_ok[None, :]
        o = tl.load(base + cols[None, :], mask=mask, other=0.0)
        tl.store(base + cols[None, :], (o.to(tl.float32) + m[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
