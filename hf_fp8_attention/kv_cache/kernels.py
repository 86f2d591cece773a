"""Triton kernels of the FP8 KV cache: writing K/V blocks into it, and attention that reads it.

Cache layout (per layer): K8, V8 (B, H_kv, capacity, D) float8_e4m3fn, contiguous; K_desc, V_desc
(B, H_kv, capacity // KV_BLOCK) float32: the descale of each block of KV_BLOCK tokens of one KV head.

`cache_write_kernel` quantizes whole blocks: a block that already holds tokens (the last, partial one) is
re-quantized from the float32 values kept in a tail buffer, so a late token with a larger value never
saturates an earlier scale, and blocks written across appends equal quantizing everything at once.

`cache_attn_kernel` is the FA-style forward over the cached keys for new queries (the last S_q positions,
bottom-right causal), BLOCK_N keys (1, 2 or 4 cache blocks) per loop iteration, in one-block softmax steps
by default: K's block descale scales the block's scores and V's scales its P.V product, which is added to
the accumulator in float32 (two-level accumulation); TILE_SOFTMAX: one step per BLOCK_N keys
(`_attend_keys`). Q arrives un-rotated in the model dtype; RoPE is applied here in float32 (then, for a
cache written with ROTATE_K, the same Hadamard rotation as K: ROTATE_Q), then each query row gets its own
scale; or, in a decode step, the write launch has already made that operand (PREP_Q, `_prepare_queries`)
and the attention reads it (Q_PREPARED). QK_FP8: Q and P are rounded to e4m3 and both products run in fp8 (chunked
prefill); otherwise (decode: few rows, memory-bound) Q and P are rounded to fp16 and the fp8 K/V tiles are
widened to fp16 in registers, exactly (every e4m3 value is an fp16 value; P lies in [0, 256]). Long caches
split the keys over programs (`num_splits`, a runtime value: no recompilation per length) merged by
`cache_combine_wide_kernel`, `cache_combine_kernel`, or (FUSED_COMBINE) by the split program of each row
tile that finishes last (an atomic counter per tile); the launcher's default fuses decode where the batch's
geometry takes at most 8 splits, else the wide combine (`ops.FUSED_AUTO_MAX_SPLITS`). Inside a split, the key tiles that
every row of the tile sees run unmasked (`_key_range` with MASKED False), the rest masked.

Decode speed (sm_90 SASS of the 2-warp, 16-row decode build, triton 3.6): per 64 keys and thread the default
loop runs 1137 instructions, 128 of them one-byte shared loads of V (LDS.U8: the fp8 V operand of P.V is
not K-contiguous in memory, so no ldmatrix) and V's global copies are 8-byte; 255 registers hold it to 4
programs per SM. WIDEN_V widens V to fp16 before the dot (`_e4m3_to_f16_opaque`): 811 instructions, 16-byte
copies, 183 registers; PREFETCH_DESC takes the block descales' loads out of the softmax step;
`cache_combine_wide_kernel` merges a row's splits with their loads in flight together. WIDEN_V, PREFETCH_DESC
and the wide combine are the launcher's defaults since session 5; with the interior/last split of the key
loop the default build takes 242 registers (offline sm_90 compile, triton 3.6), still 4 programs per SM
(bound by shared memory). H200, 1x128k GQA 32/8: 0.146 ms (the session-4 default) -> 0.085 ms.
Two launch options, off by default (`ops.TMA_DEFAULT`, `ops.PDL_DEFAULT`): TMA (K/V tiles by tensor
descriptors: 168 registers, 1x128k 0.084 ms graph-timed, but more host time per eager call) and PDL (the wide
combine placed while the last splits run: no gain measured).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..quantization.tile_math import _amax_scales, _finite_abs, _hadamard, _to_fp8

LOG2E = 1.4426950408889634


@triton.jit
def _write_one(
    Src, Tail_in, Tail_out, Dst, Desc, Cos, Sin,
    src_rows, tail_rows, dst_rows, cos_rows, desc_off, from_tail, from_src, valid, keep_tail, offs_d, d_ok, block_ok,
    HALF: tl.constexpr, APPLY_ROPE: tl.constexpr, FP8_MAX: tl.constexpr, ROTATE: tl.constexpr = False,
    INV_SQRT_D: tl.constexpr = 1.0, ROT_F32: tl.constexpr = False,
):
    """One KV_BLOCK-token block of one head of K or V: gather it (tail rows + new rows, the new ones rotated
    with APPLY_ROPE, then by the normalised Hadamard matrix with ROTATE), quantize with one scale, store codes
    and descale (where ``block_ok``: the block holds tokens), and the float32 values into Tail_out where
    `keep_tail` (rotated: the tail holds the values as stored). Half tiles (x1 = channels [0, HALF), x2 = [HALF, D)): RoPE needs no gather, and the rotation
    is two half-size dots (`_hadamard`'s tl.dot form; HALF a power of two)."""
    src_mask = from_src[:, None] & d_ok[None, :]
    s1 = tl.load(Src + src_rows[:, None] + offs_d[None, :], mask=src_mask, other=0.0).to(tl.float32)
    s2 = tl.load(Src + src_rows[:, None] + (offs_d + HALF)[None, :], mask=src_mask, other=0.0).to(tl.float32)
    if APPLY_ROPE:
        c1 = tl.load(Cos + cos_rows[:, None] + offs_d[None, :], mask=src_mask, other=0.0).to(tl.float32)
        c2 = tl.load(Cos + cos_rows[:, None] + (offs_d + HALF)[None, :], mask=src_mask, other=0.0).to(tl.float32)
        n1 = tl.load(Sin + cos_rows[:, None] + offs_d[None, :], mask=src_mask, other=0.0).to(tl.float32)
        n2 = tl.load(Sin + cos_rows[:, None] + (offs_d + HALF)[None, :], mask=src_mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), three roundings (no FMA: the
        # launcher turns fp fusion off) as `reference.apply_rope_reference`
        r1 = s1 * c1 - s2 * n1
        r2 = s2 * c2 + s1 * n2
        s1 = r1
        s2 = r2
    if ROTATE:  # rows not from Src are 0 here and stay 0 (the tail's rows were rotated when written)
        s1, s2 = _rotate_halves(s1, s2, Src.dtype.element_ty, INV_SQRT_D, ROT_F32)
    tail_mask = from_tail[:, None] & d_ok[None, :]
    t1 = tl.load(Tail_in + tail_rows[:, None] + offs_d[None, :], mask=tail_mask, other=0.0)
    t2 = tl.load(Tail_in + tail_rows[:, None] + (offs_d + HALF)[None, :], mask=tail_mask, other=0.0)
    x1 = tl.where(from_tail[:, None], t1, s1)
    x2 = tl.where(from_tail[:, None], t2, s2)
    ok = valid[:, None] & d_ok[None, :]
    amax = tl.max(tl.max(tl.where(ok, tl.maximum(_finite_abs(x1), _finite_abs(x2)), 0.0), 1), 0)
    scale, descale = _amax_scales(amax, FP8_MAX)
    tl.store(Dst + dst_rows[:, None] + offs_d[None, :], _to_fp8(x1 * scale, FP8_MAX), mask=ok)
    tl.store(Dst + dst_rows[:, None] + (offs_d + HALF)[None, :], _to_fp8(x2 * scale, FP8_MAX), mask=ok)
    tl.store(Desc + desc_off, descale, mask=block_ok)
    keep = keep_tail[:, None] & d_ok[None, :]
    tl.store(Tail_out + tail_rows[:, None] + offs_d[None, :], x1, mask=keep)
    tl.store(Tail_out + tail_rows[:, None] + (offs_d + HALF)[None, :], x2, mask=keep)


@triton.jit
def _rotate_halves(x1, x2, dtype: tl.constexpr, INV_SQRT_D: tl.constexpr, ROT_F32: tl.constexpr):
    """(x1, x2) @ (H_D / sqrt(D)) by `_hadamard` in its tl.dot form (the cache kept it when the quantizers
    took the fast transform in session 24: offline, the transform took the decode kernel from 185 to 254
    registers; neither form was timed in the cache), x rounded to the input ``dtype`` (exact products with the
    +-1 signs: what `reference.rotate` computes), or in float32 with ROT_F32: the CPU interpreter's bf16
    dots are wrong, so its bf16 runs rotate in float32 (no bf16 rounding of x: close to the reference, not
    bit for bit)."""
    if ROT_F32:
        r1, r2 = _hadamard(x1, x2, tl.float32, INV_SQRT_D, True)
    else:
        r1, r2 = _hadamard(x1, x2, dtype, INV_SQRT_D, True)
    return r1, r2


@triton.jit
def _query_halves(Q, q_rows, Cos, Sin, c_rows, row_ok, HALF: tl.constexpr, APPLY_ROPE: tl.constexpr,
                  ROTATE: tl.constexpr, INV_SQRT_D: tl.constexpr, ROT_F32: tl.constexpr):
    """Query rows ``q_rows`` (element offsets, D contiguous) as float32 half tiles (channels [0, HALF) and
    [HALF, 2 HALF)): RoPE with the Cos/Sin rows ``c_rows`` (x1 c1 - x2 s1, x2 c2 + x1 s2: the full-tile
    formula x c + rotate_half(x) s exactly), then the Hadamard rotation with ROTATE. Shared by the write
    launch's query preparation and the attention kernel's own prologue: the same operations in both."""
    offs_h = tl.arange(0, HALF)
    q1 = tl.load(Q + q_rows[:, None] + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(Q + q_rows[:, None] + (offs_h + HALF)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if APPLY_ROPE:
        c1 = tl.load(Cos + c_rows[:, None] + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        c2 = tl.load(Cos + c_rows[:, None] + (offs_h + HALF)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        n1 = tl.load(Sin + c_rows[:, None] + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        n2 = tl.load(Sin + c_rows[:, None] + (offs_h + HALF)[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        r1 = q1 * c1 - q2 * n1
        r2 = q2 * c2 + q1 * n2
        q1 = r1
        q2 = r2
    if ROTATE:
        q1, q2 = _rotate_halves(q1, q2, Q.dtype.element_ty, INV_SQRT_D, ROT_F32)
    return q1, q2


@triton.jit
def _prepare_queries(
    Q_src, Q_out, Q_desc, Cos, Sin, b64, h, H, n_new, stride_qb, stride_qs, stride_qh, stride_cb, stride_cs,
    GROUP: tl.constexpr, Q_ROWS: tl.constexpr, HALF: tl.constexpr, APPLY_ROPE: tl.constexpr,
    ROTATE: tl.constexpr, INV_SQRT_D: tl.constexpr, ROT_F32: tl.constexpr, FP8_MAX: tl.constexpr,
):
    """The new queries of KV head h (n_new positions x GROUP heads, <= Q_ROWS rows) as `cache_attn_kernel`'s
    decode build (fp16 products) makes its Q operand: RoPE, the Hadamard rotation with ROTATE, a scale per row
    (amax -> FP8_MAX), rounded to fp16 -> Q_out (B, n_new, H * GROUP, 2 * HALF) float16 contiguous, and the
    row's descale -> Q_desc (B, n_new, H * GROUP) float32: the same operations in the same order as that
    kernel's prologue, done once per decode step instead of once per split program (Q_PREPARED there)."""
    offs_r = tl.arange(0, Q_ROWS)
    pos = offs_r // GROUP
    head = h * GROUP + offs_r % GROUP
    row_ok = offs_r < n_new * GROUP
    offs_h = tl.arange(0, HALF)
    q1, q2 = _query_halves(Q_src, b64 * stride_qb + pos.to(tl.int64) * stride_qs + head * stride_qh, Cos, Sin,
                           b64 * stride_cb + pos.to(tl.int64) * stride_cs, row_ok, HALF, APPLY_ROPE, ROTATE,
                           INV_SQRT_D, ROT_F32)
    q_amax = tl.maximum(tl.max(_finite_abs(q1), 1), tl.max(_finite_abs(q2), 1))
    q_scale, q_descale = _amax_scales(q_amax, FP8_MAX)
    row = (b64 * n_new + pos.to(tl.int64)) * (H * GROUP) + head
    o = row * (2 * HALF)
    tl.store(Q_out + o[:, None] + offs_h[None, :], (q1 * q_scale[:, None]).to(tl.float16), mask=row_ok[:, None])
    tl.store(Q_out + o[:, None] + (offs_h + HALF)[None, :], (q2 * q_scale[:, None]).to(tl.float16),
             mask=row_ok[:, None])
    tl.store(Q_desc + row, q_descale, mask=row_ok)


@triton.jit(do_not_specialize=["length", "n_new", "stride_desc_b", "stride_desc_h", "capacity", "tail_slot_stride"])
def cache_write_kernel(
    K_src, V_src, Cos, Sin, K8, V8, K_desc, V_desc, K_tail_in, V_tail_in, K_tail_out, V_tail_out,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_cb, stride_cs,
    stride_cache_b, stride_cache_h, stride_desc_b, stride_desc_h,
    H, length, n_new,
    HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr, APPLY_ROPE: tl.constexpr, FP8_MAX: tl.constexpr,
    KV_BLOCK: tl.constexpr, ROTATE_K: tl.constexpr = False, INV_SQRT_D: tl.constexpr = 1.0,
    ROT_F32: tl.constexpr = False,
    Q_src=None, Q_out=None, Q_desc=None, stride_qb=0, stride_qs=0, stride_qh=0,
    PREP_Q: tl.constexpr = False, GROUP: tl.constexpr = 1, Q_ROWS: tl.constexpr = 16,
    Len=None, capacity=0, tail_slot_stride=0, DEVICE_LEN: tl.constexpr = False,
    Len_out=None, LEN_OUT: tl.constexpr = False,
):
    """Grid: (number of blocks touched, B * H).

    Appends n_new tokens after the `length` cached ones. Block i of the grid covers cache positions
    [b0 + i * KV_BLOCK, ...) with b0 = length rounded down to a block; a position below `length` comes from
    the tail buffer (its float32 value), one in [length, length + n_new) from K_src/V_src (B, n_new, H, D)
    strided views with unit stride over D (K rotated with Cos/Sin (B or 1, n_new, D) when APPLY_ROPE).
    Tail buffers: (B, H, KV_BLOCK, D) float32 contiguous, Tail_in read, Tail_out written with the partial
    last block (two buffers: another program may still read Tail_in). ROTATE_K (power-of-two HEAD_DIM): K is
    stored rotated by the normalised Hadamard matrix after RoPE (`cache_attn_kernel` rotates Q with
    ROTATE_Q: the scores are unchanged, K's outlier channels are spread before the e4m3 rounding).
    PREP_Q (a decode step: the n_new queries are the new tokens, Q_src (B, n_new, H * GROUP, D) with unit
    stride over D, n_new * GROUP <= Q_ROWS): the first block's program of each (batch, KV head) also writes
    its queries as the attention's fp16 operand with their row descales to Q_out / Q_desc
    (`_prepare_queries`), for `cache_attn_kernel` to read with Q_PREPARED: no per-split-program RoPE,
    rotation and row scaling.
    DEVICE_LEN (the static cache: a CUDA graph replays one launch at every length): ``length`` is read from
    Len (an int64 scalar tensor) instead; the grid covers the most blocks n_new tokens can touch
    (cdiv(KV_BLOCK - 1 + n_new, KV_BLOCK)), programs past the last one store nothing, and no position at or
    past ``capacity`` is written. The tails are two parity slots, tail_slot_stride elements apart: a
    block's partial values live in slot (block index) % 2, so the block-0 program reads slot
    (length // KV_BLOCK) % 2 of the Tail_in pointers and the program of the new last block writes slot
    ((length + n_new) // KV_BLOCK) % 2 of the Tail_out ones. With n_new <= KV_BLOCK those are one program
    (it loads the tail before the block's amax reduction and stores it after) or two programs on two
    slots; a longer write must read from a copy of the tails (the launcher's job).
    LEN_OUT (the dynamic cache's decode step, not with DEVICE_LEN): the first program also stores ``length``
    (the tokens cached before these) into Len_out, an int64 scalar tensor, for the `cache_attn_kernel`
    launch that follows on the stream to read as its DEVICE_LEN length (that build is faster on the H200).
    """
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    HALF: tl.constexpr = HEAD_DIM // 2
    if LEN_OUT:
        tl.static_assert(not DEVICE_LEN)
        tl.store(Len_out, length.to(tl.int64), mask=(blk == 0) & (bh == 0))
    if DEVICE_LEN:
        length = tl.load(Len).to(tl.int32)
        slot_in = ((length // KV_BLOCK) % 2).to(tl.int64) * tail_slot_stride
        slot_out = (((length + n_new) // KV_BLOCK) % 2).to(tl.int64) * tail_slot_stride
        K_tail_in += slot_in
        V_tail_in += slot_in
        K_tail_out += slot_out
        V_tail_out += slot_out
    start = (length // KV_BLOCK + blk) * KV_BLOCK
    offs_t = tl.arange(0, KV_BLOCK)
    offs_d = tl.arange(0, HALF_PAD)
    d_ok = offs_d < HALF
    pos = start + offs_t
    end = length + n_new
    from_tail = pos < length
    from_src = (pos >= length) & (pos < end)
    valid = pos < end
    block_ok = start < end
    if DEVICE_LEN:
        valid = valid & (pos < capacity)
        block_ok = block_ok & (start < capacity)
    keep_tail = valid & (pos >= end // KV_BLOCK * KV_BLOCK)  # the partial last block
    j = tl.where(from_src, pos - length, 0).to(tl.int64)
    b64 = b.to(tl.int64)
    tail_rows = bh.to(tl.int64) * (KV_BLOCK * HEAD_DIM) + offs_t * HEAD_DIM
    dst_rows = b64 * stride_cache_b + h.to(tl.int64) * stride_cache_h + pos.to(tl.int64) * HEAD_DIM
    desc_off = b64 * stride_desc_b + h * stride_desc_h + start // KV_BLOCK
    cos_rows = b64 * stride_cb + j * stride_cs
    _write_one(K_src, K_tail_in, K_tail_out, K8, K_desc, Cos, Sin,
               b64 * stride_kb + j * stride_ks + h * stride_kh, tail_rows, dst_rows, cos_rows, desc_off,
               from_tail, from_src, valid, keep_tail, offs_d, d_ok, block_ok, HALF, APPLY_ROPE, FP8_MAX, ROTATE_K,
               INV_SQRT_D, ROT_F32)
    _write_one(V_src, V_tail_in, V_tail_out, V8, V_desc, Cos, Sin,
               b64 * stride_vb + j * stride_vs + h * stride_vh, tail_rows, dst_rows, cos_rows, desc_off,
               from_tail, from_src, valid, keep_tail, offs_d, d_ok, block_ok, HALF, False, FP8_MAX)
    if PREP_Q:
        if blk == 0:
            _prepare_queries(Q_src, Q_out, Q_desc, Cos, Sin, b64, h, H, n_new, stride_qb, stride_qs, stride_qh,
                             stride_cb, stride_cs, GROUP, Q_ROWS, HALF, APPLY_ROPE, ROTATE_K, INV_SQRT_D, ROT_F32,
                             FP8_MAX)


@triton.jit
def _e4m3_to_f16_opaque(x):
    """e4m3 -> fp16 (exact) through inline PTX, which Triton cannot move past a layout conversion: the V tile is
    widened in its coalesced load layout, then reaches the P.V dot operand layout as fp16 (16-byte shared
    stores, ldmatrix.trans), instead of as fp8 bytes (a plain `.to(fp16)` gets hoisted into the dot operand:
    on sm_90 that reads V from shared memory one byte at a time, 128 LDS.U8 per thread per 64 keys at 2
    warps, and Triton's async-copy pass narrows V's global->shared copies to 8 bytes). is_pure=False: a pure
    asm op is hoisted like the cast. Four codes per call (two cvt.rn.f16x2.e4m3x2 on the halves of one
    32-bit register). Not for the interpreter (`WIDEN_V` False there: the plain cast, same values)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _masked_load(ptrs, mask, other, MASKED: tl.constexpr):
    """tl.load under `mask` (MASKED), or unpredicated (an interior step: every address is valid)."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=other)
    else:
        return tl.load(ptrs)


@triton.jit
def _load_kv(ptrs, col_ok, d_ok, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """A [keys, HEAD_DIM_PAD] tile of fp8 codes: keys past `col_ok` (MASKED) and padded channels read as 0."""
    if MASKED:
        return tl.load(ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    elif HEAD_DIM == d_ok.shape[0]:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _attend_keys(
    K8, V8, K_desc, V_desc, kv_base, desc_base, start_n, hi, q_op, row_scale, row_limit, m_i, l_i, acc, offs_d,
    d_ok, HEAD_DIM: tl.constexpr, QK_FP8: tl.constexpr, TILE_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    k_given=1.0, v_given=1.0, GIVEN_DESC: tl.constexpr = False, WIDEN_V: tl.constexpr = False,
    MASKED: tl.constexpr = True, TMA: tl.constexpr = False, kv_row=0,
):
    """One online-softmax step over keys [start_n, start_n + TILE_N) (those below `hi`), start_n a multiple of
    KV_BLOCK -> updated (m_i, l_i, acc). TILE_N == KV_BLOCK: one K and one V descale (scalars). Larger: each
    score column gets its block's K descale (the same two roundings), and V's descales are folded into P
    relative to the tile's largest (P' = P * v_desc / v_max stays in [0, 256]; its rounding to fp16/e4m3
    replaces that of P), the product scaled by v_max. GIVEN_DESC (TILE_N == KV_BLOCK): the block's K and V
    descales are k_given / v_given (loaded one iteration ahead by the caller), the same values.
    MASKED False: the caller guarantees every key of the step lies below `hi` and is visible to every row
    (`_key_range`'s interior): no key masks, no causal select, unpredicated loads; the same values.
    TMA (fp16 products, HEAD_DIM a power of two): K8 / V8 are tensor descriptors over the caches as
    (B * H_kv * capacity, HEAD_DIM) rows with [TILE_N, HEAD_DIM] blocks, this head's first row ``kv_row``:
    the tiles arrive by TMA; keys past ``hi`` (read whole, or zero past the tensor's end) are masked in
    the scores as before and zeroed in V (their codes may be anything, NaN included)."""
    cols = start_n + tl.arange(0, TILE_N)
    col_ok = cols < hi  # the cache's end, the split's end, the tile's last causal key
    if TMA:
        tl.static_assert(not QK_FP8 and HEAD_DIM == d_ok.shape[0])
        k = K8.load([kv_row + start_n, 0])
    else:
        kv_rows = kv_base + cols.to(tl.int64) * HEAD_DIM
        k = _load_kv(K8 + kv_rows[:, None] + offs_d[None, :], col_ok, d_ok, HEAD_DIM, MASKED)
    if QK_FP8:
        qk = tl.dot(q_op, tl.trans(k))
    else:
        qk = tl.dot(q_op, tl.trans(k.to(tl.float16)))
    if TILE_N == KV_BLOCK:
        if GIVEN_DESC:
            k_desc = k_given
        else:  # masked: an unrolled sub-block past `hi` may lie past the descale buffer's end
            k_desc = _masked_load(K_desc + desc_base + start_n // KV_BLOCK, start_n < hi, 1.0, MASKED)
        qk = qk * (row_scale[:, None] * k_desc)
    else:
        k_desc = _masked_load(K_desc + desc_base + cols // KV_BLOCK, col_ok, 0.0, MASKED)
        qk = qk * (row_scale[:, None] * k_desc[None, :])
    if MASKED:
        visible = col_ok[None, :] & (cols[None, :] <= row_limit[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # a row that sees no key here: exp2 gives 0, not NaN
    p = tl.math.exp2(qk - (m_ij[:, None] - 8.0))  # FA3's Max_offset: P in [0, 256] before its e4m3 cast
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = V8.load([kv_row + start_n, 0])
    else:
        v = _load_kv(V8 + kv_rows[:, None] + offs_d[None, :], col_ok, d_ok, HEAD_DIM, MASKED)
    if WIDEN_V and not QK_FP8:
        v = _e4m3_to_f16_opaque(v)
    if TMA and MASKED:
        v = tl.where(col_ok[:, None], v.to(tl.float16), 0.0)
    if TILE_N == KV_BLOCK:
        if GIVEN_DESC:
            v_scale = v_given
        else:
            v_scale = _masked_load(V_desc + desc_base + start_n // KV_BLOCK, start_n < hi, 1.0, MASKED)
        p_v = p
    else:
        v_desc = _masked_load(V_desc + desc_base + cols // KV_BLOCK, col_ok, 0.0, MASKED)
        v_scale = tl.max(v_desc, 0)  # > 0: a block's descale is 1.0 when all its values are 0
        p_v = p * tl.math.div_rn(v_desc, v_scale)[None, :]
    if QK_FP8:
        pv = tl.dot(p_v.to(tl.float8e4nv), v)
    else:
        pv = tl.dot(p_v.to(tl.float16), v.to(tl.float16))
    acc = acc * alpha[:, None] + pv * v_scale
    return m_ij, l_i, acc


@triton.jit
def _key_range(
    K8, V8, K_desc, V_desc, kv_base, desc_base, lo, hi, q_op, row_scale, row_limit, m_i, l_i, acc, offs_d, d_ok,
    HEAD_DIM: tl.constexpr, QK_FP8: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    TILE_SOFTMAX: tl.constexpr, PREFETCH_DESC: tl.constexpr, WIDEN_V: tl.constexpr, MASKED: tl.constexpr,
    TMA: tl.constexpr = False, kv_row=0,
):
    """The online softmax over keys [lo, hi), BLOCK_N per iteration (lo a multiple of KV_BLOCK); MASKED False
    only for an interior range: hi - lo a multiple of BLOCK_N, every key visible to every row."""
    if PREFETCH_DESC:
        tl.static_assert(BLOCK_N == KV_BLOCK)
        k_next = tl.load(K_desc + desc_base + lo // KV_BLOCK, mask=lo < hi, other=1.0)
        v_next = tl.load(V_desc + desc_base + lo // KV_BLOCK, mask=lo < hi, other=1.0)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, KV_BLOCK)  # a split starts on a block, not always on a BLOCK_N tile
        if PREFETCH_DESC:
            k_cur = k_next
            v_cur = v_next
            nxt = start_n + KV_BLOCK
            k_next = tl.load(K_desc + desc_base + nxt // KV_BLOCK, mask=nxt < hi, other=1.0)
            v_next = tl.load(V_desc + desc_base + nxt // KV_BLOCK, mask=nxt < hi, other=1.0)
            m_i, l_i, acc = _attend_keys(K8, V8, K_desc, V_desc, kv_base, desc_base, start_n, hi, q_op, row_scale,
                                         row_limit, m_i, l_i, acc, offs_d, d_ok, HEAD_DIM, QK_FP8, KV_BLOCK, KV_BLOCK,
                                         k_cur, v_cur, True, WIDEN_V, MASKED, TMA, kv_row)
        elif TILE_SOFTMAX and not QK_FP8:
            m_i, l_i, acc = _attend_keys(K8, V8, K_desc, V_desc, kv_base, desc_base, start_n, hi, q_op, row_scale,
                                         row_limit, m_i, l_i, acc, offs_d, d_ok, HEAD_DIM, QK_FP8, BLOCK_N, KV_BLOCK,
                                         WIDEN_V=WIDEN_V, MASKED=MASKED, TMA=TMA, kv_row=kv_row)
        else:
            for j in tl.static_range(BLOCK_N // KV_BLOCK):
                m_i, l_i, acc = _attend_keys(K8, V8, K_desc, V_desc, kv_base, desc_base, start_n + j * KV_BLOCK, hi,
                                             q_op, row_scale, row_limit, m_i, l_i, acc, offs_d, d_ok, HEAD_DIM,
                                             QK_FP8, KV_BLOCK, KV_BLOCK, WIDEN_V=WIDEN_V, MASKED=MASKED, TMA=TMA,
                                             kv_row=kv_row)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["S_q", "S_kv", "keys_per_split", "stride_desc_b", "stride_desc_h", "capacity"])
def cache_attn_kernel(
    Q, Cos, Sin, K8, V8, K_desc, V_desc, Out, O_part, ML_part, Counter,
    stride_qb, stride_qs, stride_qh, stride_cb, stride_cs,
    stride_cache_b, stride_cache_h, stride_desc_b, stride_desc_h,
    stride_ob, stride_os,
    H_kv, S_q, S_kv, sm_scale, keys_per_split,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    APPLY_ROPE: tl.constexpr, QK_FP8: tl.constexpr, SPLIT: tl.constexpr, FP8_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, TILE_SOFTMAX: tl.constexpr,
    FUSED_COMBINE: tl.constexpr, PREFETCH_DESC: tl.constexpr = False, WIDEN_V: tl.constexpr = False,
    ROTATE_Q: tl.constexpr = False, INV_SQRT_D: tl.constexpr = 1.0, ROT_F32: tl.constexpr = False,
    Q_desc=None, Q_PREPARED: tl.constexpr = False, PDL: tl.constexpr = False, TMA: tl.constexpr = False,
    Len=None, capacity=0, DEVICE_LEN: tl.constexpr = False,
):
    """Grid: (cdiv(S_q * GROUP, BLOCK_M), B * H_kv, num_splits). BLOCK_N: keys per loop iteration, a multiple
    of the cache's KV_BLOCK; keys_per_split a multiple of KV_BLOCK (not necessarily of BLOCK_N: the last tile
    of a split is masked at the split's end). TILE_SOFTMAX (fp16 products only): one softmax step per BLOCK_N
    keys (`_attend_keys` with V's descales folded into P); else BLOCK_N // KV_BLOCK unrolled steps of one
    block each, the math of BLOCK_N == KV_BLOCK bit for bit, with more loads per iteration. Not with QK_FP8:
    the e4m3 rounding of the folded P (a step of 16 near 256) costs its largest term ~4 dB of SQNR.

    Q (B, S_q, H_q, D) with unit stride over D, un-rotated when APPLY_ROPE (Cos/Sin (B or 1, S_q, D));
    the queries are positions S_kv - S_q .. S_kv - 1 of the cached keys. Out (B, S_q, H_q, D) contiguous.
    GQA rows as in the triton backend: row r = s * GROUP + g is position s of query head kv * GROUP + g.
    SPLIT: keys [split * keys_per_split, ...) only; unnormalised float32 acc to O_part (splits, B * H_kv,
    S_q * GROUP, HEAD_DIM_PAD) and (max, sum) to ML_part (splits, B * H_kv, S_q * GROUP, 2).
    FUSED_COMBINE (with SPLIT): Counter (B * H_kv * row tiles,) int32, zero at launch and left zero: each
    program bumps its tile's count after storing its partials; the one that sees num_splits - 1 merges them
    into Out (no `cache_combine_kernel` launch) and resets the count.
    PREFETCH_DESC (BLOCK_N == KV_BLOCK): the next block's K and V descales are loaded at the top of each
    iteration and carried to it (registers), so no descale load is waited on inside the softmax step (the
    V descale was a plain global load in the loop, its latency exposed once per block); same values.
    ROTATE_Q (a cache written with ROTATE_K; power-of-two HEAD_DIM): the queries are rotated by the same
    normalised Hadamard matrix after RoPE, as half tiles (`_hadamard`), then joined back into one tile.
    INV_SQRT_D: HEAD_DIM ** -0.5 (with ROTATE_K / ROTATE_Q); ROT_F32: see `_rotate_halves` (interpreter).
    Q_PREPARED (fp16 products only): Q is the fp16 operand and Q_desc (B, S_q, H_q) float32 its row
    descales, as `cache_write_kernel`'s PREP_Q stores them (no APPLY_ROPE / ROTATE_Q here).
    PDL (SPLIT without FUSED_COMBINE, sm_90+): each program lets the combine launched after it with
    programmatic dependent launch (`cache_combine_wide_kernel` with PDL) start as soon as every program has
    begun: the combine's programs are placed while the last splits run and wait (griddepcontrol.wait) for
    this grid's completion and its memory, instead of being launched after it.
    TMA (decode builds: fp16 products, power-of-two HEAD_DIM, contiguous caches): K8 and V8 are tensor
    descriptors over the caches as (B * H_kv * capacity, HEAD_DIM) rows with [BLOCK_N or KV_BLOCK, HEAD_DIM]
    blocks (`_attend_keys`): K/V tiles arrive by TMA instead of per-thread copies.
    DEVICE_LEN (the static cache; the dynamic cache's decode step): S_kv is the length read from Len (an
    int64 scalar tensor: the cached tokens before the queries' own) plus S_q, at most ``capacity``; with
    SPLIT the split size is what the launcher would pick at this length (at most num_programs(2) splits of
    >= 4 blocks, `ops.pick_num_splits`). The static cache's grid has the split count the most a cache of
    ``capacity`` keys takes (the splits past the keys store empty partials (max -inf, sum 0), which every
    combine adds as zeros); the dynamic step's grid is planned from its host length, the same plan.
    """
    if PDL:
        gdc_launch_dependents()
    if DEVICE_LEN:
        S_kv = tl.minimum(tl.load(Len).to(tl.int32) + S_q, capacity)
        if SPLIT:
            n_used = tl.minimum(tl.num_programs(2), tl.cdiv(S_kv, 4 * KV_BLOCK))
            keys_per_split = tl.cdiv(tl.cdiv(S_kv, n_used), KV_BLOCK) * KV_BLOCK
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    b = pid_bh // H_kv
    h_kv = pid_bh % H_kv
    b64 = b.to(tl.int64)
    n_rows = S_q * GROUP
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = offs_r // GROUP
    head = h_kv * GROUP + offs_r % GROUP
    row_ok = offs_r < n_rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    HALF: tl.constexpr = HEAD_DIM // 2

    # ---- the query tile: RoPE in float32, then e4m3 per row (QK_FP8) or bf16 ----
    q_rows = b64 * stride_qb + pos.to(tl.int64) * stride_qs + head * stride_qh
    q_mask = row_ok[:, None] & d_ok[None, :]
    if Q_PREPARED:
        tl.static_assert(not QK_FP8 and not APPLY_ROPE and not ROTATE_Q)
        q_op = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
        q_row = (b64 * S_q + pos.to(tl.int64)) * (H_kv * GROUP) + head
        q_descale = tl.load(Q_desc + q_row, mask=row_ok, other=1.0)
        row_scale = q_descale * (sm_scale * 1.4426950408889634)
    else:
        if ROTATE_Q:
            tl.static_assert(HEAD_DIM == HEAD_DIM_PAD)
            q1, q2 = _query_halves(Q, q_rows, Cos, Sin, b64 * stride_cb + pos.to(tl.int64) * stride_cs, row_ok, HALF,
                                   APPLY_ROPE, True, INV_SQRT_D, ROT_F32)
            q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_M, HEAD_DIM))  # [q1 | q2]
        else:
            q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        if APPLY_ROPE and not ROTATE_Q:
            first = offs_d < HALF
            partner = tl.where(first, offs_d + HALF, offs_d - HALF)
            qp = tl.load(Q + q_rows[:, None] + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
            c_rows = b64 * stride_cb + pos.to(tl.int64) * stride_cs
            c = tl.load(Cos + c_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
            s = tl.load(Sin + c_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
            q = q * c + tl.where(first[None, :], -qp, qp) * s
        # one scale per row in both modes (fp16 has range to spare, but a row of huge activations would not)
        q_amax = tl.max(_finite_abs(q), 1)
        q_scale, q_descale = _amax_scales(q_amax, FP8_MAX)
        row_scale = q_descale * (sm_scale * 1.4426950408889634)
        if QK_FP8:
            q_op = _to_fp8(q * q_scale[:, None], FP8_MAX)
        else:
            q_op = (q * q_scale[:, None]).to(tl.float16)

    # ---- key range: this split's, cut at the last key the tile's last row may see ----
    diag = S_kv - S_q
    last_pos = (tl.minimum((pid_m + 1) * BLOCK_M, n_rows) - 1) // GROUP
    row_limit = pos + diag
    lo = 0
    hi = S_kv
    if SPLIT:
        lo = pid_split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, S_kv)
    hi = tl.minimum(hi, last_pos + diag + 1)

    kv_base = b64 * stride_cache_b + h_kv.to(tl.int64) * stride_cache_h
    kv_row = (kv_base // HEAD_DIM).to(tl.int32)  # TMA: this head's first row of the (rows, HEAD_DIM) view
    desc_base = b64 * stride_desc_b + h_kv * stride_desc_h
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # interior [lo, mid): whole BLOCK_N tiles below hi that every row of the tile sees (keys up to the first
    # row's causal limit): unmasked steps; then [mid, hi) masked (decode: at most the split's last tile)
    first_limit = (pid_m * BLOCK_M) // GROUP + diag + 1
    mid = lo + tl.maximum(tl.minimum(hi, first_limit) - lo, 0) // BLOCK_N * BLOCK_N
    m_i, l_i, acc = _key_range(K8, V8, K_desc, V_desc, kv_base, desc_base, lo, mid, q_op, row_scale, row_limit,
                               m_i, l_i, acc, offs_d, d_ok, HEAD_DIM, QK_FP8, BLOCK_N, KV_BLOCK, TILE_SOFTMAX,
                               PREFETCH_DESC, WIDEN_V, False, TMA, kv_row)
    m_i, l_i, acc = _key_range(K8, V8, K_desc, V_desc, kv_base, desc_base, mid, hi, q_op, row_scale, row_limit,
                               m_i, l_i, acc, offs_d, d_ok, HEAD_DIM, QK_FP8, BLOCK_N, KV_BLOCK, TILE_SOFTMAX,
                               PREFETCH_DESC, WIDEN_V, True, TMA, kv_row)

    if SPLIT:
        part_row = (pid_split * tl.num_programs(1) + pid_bh).to(tl.int64) * n_rows + offs_r
        tl.store(O_part + part_row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(ML_part + part_row * 2, tl.where(l_i > 0, m_i, float("-inf")), mask=row_ok)
        tl.store(ML_part + part_row * 2 + 1, l_i, mask=row_ok)
        if FUSED_COMBINE:
            # every thread's partials stored before the release; the last arrival (acquire) reads them all
            # past L1 (.cg), then leaves the count at zero for the next launch
            num_splits = tl.num_programs(2)
            counter = Counter + pid_bh * tl.num_programs(0) + pid_m
            tl.debug_barrier()
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                tl.debug_barrier()
                _combine_rows(Out, O_part, ML_part, stride_ob, stride_os, H_kv, pid_bh, tl.num_programs(1), n_rows,
                              num_splits, offs_r, GROUP, HEAD_DIM, HEAD_DIM_PAD, ".cg")
                tl.store(counter, 0)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_rows = b64 * stride_ob + pos.to(tl.int64) * stride_os + head * HEAD_DIM
        tl.store(Out + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)


@triton.jit
def _combine_rows(
    Out, O_part, ML_part, stride_ob, stride_os, H_kv, pid_bh, bh_total, n_rows, num_splits, offs_r,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CACHE: tl.constexpr,
):
    """Rows offs_r of (batch, KV head) pid_bh: each split's acc and sum rescaled by exp2(its max - the overall
    max), summed, divided by the summed row sum, stored to Out (B, S_q, H_q, D)."""
    row_ok = offs_r < n_rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_max = tl.zeros(offs_r.shape, dtype=tl.float32) - float("inf")
    for s in tl.range(0, num_splits):
        part_row = (s * bh_total + pid_bh).to(tl.int64) * n_rows + offs_r
        m_max = tl.maximum(m_max, tl.load(ML_part + part_row * 2, mask=row_ok, other=float("-inf"),
                                          cache_modifier=CACHE))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros(offs_r.shape, dtype=tl.float32)
    acc = tl.zeros([offs_r.shape[0], HEAD_DIM_PAD], dtype=tl.float32)
    for s in tl.range(0, num_splits):
        part_row = (s * bh_total + pid_bh).to(tl.int64) * n_rows + offs_r
        w = tl.math.exp2(tl.load(ML_part + part_row * 2, mask=row_ok, other=float("-inf"), cache_modifier=CACHE)
                         - m_max)
        l_sum += w * tl.load(ML_part + part_row * 2 + 1, mask=row_ok, other=0.0, cache_modifier=CACHE)
        acc += tl.load(O_part + part_row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=row_ok[:, None],
                       other=0.0, cache_modifier=CACHE) * w[:, None]
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    b = pid_bh // H_kv
    h_kv = pid_bh % H_kv
    pos = offs_r // GROUP
    head = h_kv * GROUP + offs_r % GROUP
    o_rows = b.to(tl.int64) * stride_ob + pos.to(tl.int64) * stride_os + head * HEAD_DIM
    tl.store(Out + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["S_q", "num_splits"])
def cache_combine_kernel(
    Out, O_part, ML_part, stride_ob, stride_os, H_kv, S_q, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Grid: (cdiv(S_q * GROUP, BLOCK_R), B * H_kv). Merges `cache_attn_kernel`'s split partials
    (`_combine_rows`). The split count is a runtime loop bound: one compiled variant serves every length."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    _combine_rows(Out, O_part, ML_part, stride_ob, stride_os, H_kv, pid_bh, tl.num_programs(1), S_q * GROUP,
                  num_splits, offs_r, GROUP, HEAD_DIM, HEAD_DIM_PAD, "")


@triton.jit(do_not_specialize=["S_q", "num_splits"])
def cache_combine_wide_kernel(
    Out, O_part, ML_part, stride_ob, stride_os, H_kv, S_q, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHUNK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid: (S_q * GROUP, B * H_kv): one query row per program, its splits' partials loaded CHUNK at a time
    as [CHUNK, HEAD_DIM_PAD] tiles (a pipelined loop: the loads of the next chunks in flight while one is
    summed, where `cache_combine_kernel` walks the splits one by one: a chain of num_splits dependent L2
    round trips with only B * H_kv programs at B = 1), merged with a running max. Same formula as
    `_combine_rows`; the sums run as a tree within a chunk (tl.sum) and chunk by chunk, so the result may
    differ from `cache_combine_kernel` in the last bits. One compiled variant for every split count.
    PDL: launched with programmatic dependent launch after `cache_attn_kernel` (PDL): waits for it before
    reading its partials (griddepcontrol.wait: the attention grid complete, its stores visible)."""
    if PDL:
        gdc_wait()
    r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh_total = tl.num_programs(1)
    n_rows = S_q * GROUP
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m_run = tl.max(tl.zeros([CHUNK], dtype=tl.float32), 0) - float("inf")
    l_run = tl.sum(tl.zeros([CHUNK], dtype=tl.float32), 0)
    acc = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for c in tl.range(0, num_splits, CHUNK):
        offs_s = c + offs_c
        s_ok = offs_s < num_splits
        part_row = (offs_s * bh_total + pid_bh).to(tl.int64) * n_rows + r
        m = tl.load(ML_part + part_row * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(ML_part + part_row * 2 + 1, mask=s_ok, other=0.0)
        o = tl.load(O_part + part_row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: exp2 gives 0, not NaN
        keep = tl.math.exp2(m_run - m_ref)
        w = tl.math.exp2(m - m_ref)
        l_run = l_run * keep + tl.sum(w * l, 0)
        acc = acc * keep + tl.sum(o * w[:, None], 0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    b = pid_bh // H_kv
    h_kv = pid_bh % H_kv
    pos = r // GROUP
    head = h_kv * GROUP + r % GROUP
    o_row = b.to(tl.int64) * stride_ob + pos.to(tl.int64) * stride_os + head * HEAD_DIM
    tl.store(Out + o_row + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
