"""Triton FP8 (e4m3) attention forward kernels. Input/output layout: BSHD. Supports GQA/MQA.

Math (the FA3 fp8 kernel's, as `backends/reference.py` emulates it): scores = (q8 . k8) * scale *
q_descale * k_descale in float32, online softmax in base 2 with the row max offset by 8 (FA3's
``Max_offset``) so that P lies in [0, 256], P cast to e4m3 before the fp8 P.V dot, row sum from the
float32 P, out = acc * v_descale / row_sum. Unlike FA3, each key block's P.V product is added to the
accumulator in float32 (two-level accumulation), so long rows keep their precision.

GQA is packed into the rows of a tile (FA3's ``pack_gqa``): one program serves the G = H_q / H_kv query
heads of one KV head, row r = s * G + g is query position s of head kv * G + g. K/V are read once per
tile for the whole group and never repeated. Causal masks are bottom-right aligned: row position s sees
keys j <= s + S_kv - S_q; only the key blocks that straddle that diagonal (or the end of the keys) run
the masked loop.

Decode (few rows per KV head, many keys) splits the keys over ``NUM_SPLITS`` programs that write float32
partials; `_fp8_attn_combine_kernel` merges them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(scale, PER_ROW: tl.constexpr):
    """A score scale as a (BLOCK_M, 1) column when it is per row, else the scalar."""
    if PER_ROW:
        return scale[:, None]
    else:
        return scale


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_ptr, V_ptr, Kb_ptr, Vb_ptr, stride_kn, stride_vn, stride_vd,
    offs_d, mask_d, row_limit,
    lo, hi, S_kv, qk_scale,
    BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_SCALES: tl.constexpr, K_SCALE_BLOCK: tl.constexpr, QK_INT8: tl.constexpr,
    V_BLOCK_SCALES: tl.constexpr, V_SCALE_BLOCK: tl.constexpr,
):
    """Key blocks [lo, hi) in steps of BLOCK_N. MASKED: apply the causal limit and the end of the keys.

    K_ptr/V_ptr point at key 0 of this (batch, KV head); row_limit (BLOCK_M,) is the last key each row
    may see (S_kv - 1 when not causal). qk_scale: the scalar score scale (base 2), or with BLOCK_SCALES
    the (BLOCK_M,) per-row one (the row's q block descale folded in); key j's block descale is then
    Kb_ptr[j // K_SCALE_BLOCK] (K_SCALE_BLOCK a multiple of BLOCK_N (int8): one per key tile, folded into
    the row scales; or a divisor (e4m3 blocks of 16): widened to one per key). QK_INT8: q/k int8,
    the dot gives int32 scores (exact), converted to float32. V_BLOCK_SCALES: key j's V descale is
    Vb_ptr[j // V_SCALE_BLOCK] (a multiple of BLOCK_N: one per key tile), multiplying the tile's float32 P.V
    product before it is added.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = K_ptr + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V_ptr + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            kv_mask = cols[:, None] < S_kv
            if not EVEN_D:
                kv_mask = kv_mask & mask_d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k))  # int8 q/k: an int32 dot, exact; e4m3: already float32
        if QK_INT8:  # sm_90: one full-rate I2FP per score
            qk = qk.to(tl.float32)
        if BLOCK_SCALES and K_SCALE_BLOCK >= BLOCK_N:
            # One K descale per key tile, folded into the per-row scale: no per-score multiply (sm_90, int8,
            # 64x128 tile, 4 warps: 626 instructions per key block; with a descale per 16 keys 695).
            score_scale = qk_scale * tl.load(Kb_ptr + start_n // K_SCALE_BLOCK)
        elif BLOCK_SCALES:
            # The tile's BLOCK_N // K_SCALE_BLOCK key block descales, widened to one per key on chip (a gather
            # of Kb_ptr + cols // K_SCALE_BLOCK made every thread copy each of its columns' descale).
            kb_idx = start_n // K_SCALE_BLOCK + tl.arange(0, BLOCK_N // K_SCALE_BLOCK)
            if MASKED:
                kb = tl.load(Kb_ptr + kb_idx, mask=kb_idx * K_SCALE_BLOCK < S_kv, other=1.0)
            else:  # key blocks below full_hi <= S_kv // BLOCK_N * BLOCK_N: all in range
                kb = tl.load(Kb_ptr + kb_idx)
            k_blk = tl.reshape(tl.broadcast_to(kb[:, None], (BLOCK_N // K_SCALE_BLOCK, K_SCALE_BLOCK)), (BLOCK_N,))
            qk = qk * k_blk[None, :]
            score_scale = qk_scale
        else:
            score_scale = qk_scale
        if MASKED:
            visible = cols[None, :] <= row_limit[:, None]
            qk = tl.where(visible, qk * _rows(score_scale, BLOCK_SCALES), float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # A row may see no key of this block (causal, or a split's range): keep its max finite
            # so that exp2 gives 0 instead of NaN.
            m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            # FA3's Max_offset: P = exp2(s - (max - 8)) lies in [0, 256] before its e4m3 cast.
            p = tl.math.exp2(qk - (m_ij[:, None] - 8.0))
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * score_scale)
            p = tl.math.exp2(qk * _rows(score_scale, BLOCK_SCALES) - (m_ij[:, None] - 8.0))
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        # Two-level accumulation: a fresh fp8 MMA per key block, added in float32. Hopper's fp8 MMA adds into
        # its accumulator with reduced precision, so one accumulator over a long key loop truncates the
        # small P.V terms of long rows (V with a channel offset: 16.8 dB at 8k, 3.6 dB at 128k on the H200);
        # this keeps the error flat in S for a few % of speed. tests/gpu/test_long_context_gpu.py guards it
        # against a compiler folding the add back into the MMA.
        if V_BLOCK_SCALES:  # start_n < hi <= S_kv: the tile's block exists
            acc += tl.dot(p.to(tl.float8e4nv), v) * tl.load(Vb_ptr + start_n // V_SCALE_BLOCK)
        else:
            acc += tl.dot(p.to(tl.float8e4nv), v)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _sequence(Cu_q, Cu_k, b, S_q, S_kv, stride_qb, stride_kb, stride_vb, stride_vn, stride_ob, stride_os,
              VARLEN: tl.constexpr):
    """Lengths and 64-bit base offsets of batch entry (or packed sequence) b: (s_q, s_kv, q_base, k_base,
    v_base, o_base). VARLEN: rows [Cu[b], Cu[b + 1]) of batch-1 tensors, whose token strides the launcher
    passes as stride_qb (Q) and stride_kb (K); V's is stride_vn, Out's stride_os."""
    if VARLEN:
        q_start = tl.load(Cu_q + b)
        k_start = tl.load(Cu_k + b)
        s_q = tl.load(Cu_q + b + 1) - q_start
        s_kv = tl.load(Cu_k + b + 1) - k_start
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
        return s_q, s_kv, q_start * stride_qb, k_start * stride_kb, k_start * stride_vn, q_start * stride_os
    else:
        b64 = b.to(tl.int64)
        return S_q, S_kv, b64 * stride_qb, b64 * stride_kb, b64 * stride_vb, b64 * stride_ob


@triton.jit
def _fp8_attn_fwd_kernel(
    Q, K, V, Out, Q_descale, K_descale, V_descale, O_part, ML_part, Cu_q, Cu_k, Q_blk, K_blk, V_blk,
    n_blk_q, n_blk_k, n_blk_v,
    stride_qb, stride_qs, stride_kb, stride_kn, stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_os,
    H_kv, S_q, S_kv, sm_scale, keys_per_split, kv_len_bucket,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    IS_CAUSAL: tl.constexpr, NUM_SPLITS: tl.constexpr, V_KEYS_CONTIGUOUS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_SCALES: tl.constexpr, SCALE_BLOCK: tl.constexpr, K_SCALE_BLOCK: tl.constexpr, QK_INT8: tl.constexpr,
    V_BLOCK_SCALES: tl.constexpr, V_SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid: (cdiv(S_q * GROUP, BLOCK_M), B * H_kv, NUM_SPLITS).

    Q (B, S_q, H_q, D), K (B, S_kv, H_kv, D) e4m3 with unit stride over D and heads D apart; V e4m3 of
    any strides; Out (B, S_q, H_q, D). Descales (B, H_kv) float32, contiguous. V_KEYS_CONTIGUOUS (V's
    stride over keys is 1: the K-major B operand Hopper's fp8 wgmma reads; with BSHD V Triton transposes
    every V tile on chip, about half the speed) and kv_len_bucket only key the autotuning.
    NUM_SPLITS > 1: keys [split * keys_per_split, ...) only, and the unnormalised float32 acc goes to
    O_part (NUM_SPLITS, B * H_kv, S_q * GROUP, HEAD_DIM_PAD) and (max, sum) to ML_part (NUM_SPLITS,
    B * H_kv, S_q * GROUP, 2) instead of Out.
    VARLEN: b indexes packed sequences, rows [Cu_q[b], Cu_q[b + 1]) of Q/Out and [Cu_k[b], Cu_k[b + 1]) of
    K/V (batch-1 tensors, int32 offsets); S_q / S_kv are the longest lengths (grid and partials' size),
    stride_qb / stride_kb the token strides of Q / K; a tile past its sequence's end returns at once.
    BLOCK_SCALES: Q descales per SCALE_BLOCK tokens and K descales per K_SCALE_BLOCK tokens of one head,
    Q_blk (B, H_q, n_blk_q) and K_blk (B, H_kv, n_blk_k) float32 (Q_descale / K_descale unused);
    K_SCALE_BLOCK a multiple or a divisor of BLOCK_N. QK_INT8:
    Q and K are int8 (with BLOCK_SCALES). V_BLOCK_SCALES: V descales per V_SCALE_BLOCK keys (a multiple of
    BLOCK_N), V_blk (B, H_kv, n_blk_v) float32 (V_descale unused); partials are then already descaled.
    """
    if V_BLOCK_SCALES:
        tl.static_assert(V_SCALE_BLOCK % BLOCK_N == 0, "a key tile lies inside one V scale block")
    if BLOCK_SCALES:
        tl.static_assert(K_SCALE_BLOCK % BLOCK_N == 0 or BLOCK_N % K_SCALE_BLOCK == 0,
                         "a key tile lies inside one K scale block or holds whole ones")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_split = tl.program_id(2)
    max_rows = S_q * GROUP  # the partials' row count
    if IS_CAUSAL:
        # Heaviest tiles (the last rows see the most keys) first: better tail balance.
        pid_m = tl.num_programs(0) - 1 - pid_m
    b = pid_bh // H_kv
    h_kv = pid_bh % H_kv
    S_q, S_kv, q_base, k_base, v_base, o_base = _sequence(
        Cu_q, Cu_k, b, S_q, S_kv, stride_qb, stride_kb, stride_vb, stride_vn, stride_ob, stride_os, VARLEN)
    n_rows = S_q * GROUP
    if VARLEN:
        if pid_m * BLOCK_M >= n_rows:
            return

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = offs_r // GROUP  # query position of each row
    head = h_kv * GROUP + offs_r % GROUP  # query head of each row
    row_ok = offs_r < n_rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD

    q_rows = q_base + pos.to(tl.int64) * stride_qs + head * HEAD_DIM
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    K_ptr = K + k_base + h_kv * HEAD_DIM
    V_ptr = V + v_base + h_kv.to(tl.int64) * stride_vh

    desc_idx = b * H_kv + h_kv
    # Scores in base 2 (exp2 is one MUFU instruction): fold log2(e) into the scale.
    if BLOCK_SCALES:
        q_blk = (b * (H_kv * GROUP) + head).to(tl.int64) * n_blk_q + pos // SCALE_BLOCK
        qk_scale = tl.load(Q_blk + q_blk, mask=row_ok, other=1.0) * (sm_scale * 1.4426950408889634)
        Kb_ptr = K_blk + desc_idx.to(tl.int64) * n_blk_k
    else:
        qk_scale = sm_scale * tl.load(Q_descale + desc_idx) * tl.load(K_descale + desc_idx) * 1.4426950408889634
        Kb_ptr = K_blk
    Vb_ptr = V_blk + desc_idx.to(tl.int64) * n_blk_v  # read only with V_BLOCK_SCALES

    # Key ranges: [lo, full_hi) needs no mask, [max(lo, full_hi), mask_hi) does.
    diag = S_kv - S_q
    first_pos = (pid_m * BLOCK_M) // GROUP
    last_pos = (tl.minimum((pid_m + 1) * BLOCK_M, n_rows) - 1) // GROUP
    lo = 0
    hi = S_kv
    if NUM_SPLITS > 1:
        lo = pid_split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, S_kv)
    if IS_CAUSAL:
        full_hi = tl.minimum((first_pos + diag + 1) // BLOCK_N * BLOCK_N, S_kv // BLOCK_N * BLOCK_N)
        mask_hi = tl.minimum(last_pos + diag + 1, hi)
        row_limit = pos + diag
    else:
        full_hi = S_kv // BLOCK_N * BLOCK_N
        mask_hi = hi
        row_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + (S_kv - 1)
    full_hi = tl.minimum(full_hi, hi)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_ptr, V_ptr, Kb_ptr, Vb_ptr, stride_kn, stride_vn, stride_vd,
        offs_d, mask_d, row_limit, lo, full_hi, S_kv, qk_scale,
        BLOCK_N, EVEN_D, False, BLOCK_SCALES, K_SCALE_BLOCK, QK_INT8, V_BLOCK_SCALES, V_SCALE_BLOCK,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_ptr, V_ptr, Kb_ptr, Vb_ptr, stride_kn, stride_vn, stride_vd,
        offs_d, mask_d, row_limit, tl.maximum(lo, full_hi), mask_hi, S_kv, qk_scale,
        BLOCK_N, EVEN_D, True, BLOCK_SCALES, K_SCALE_BLOCK, QK_INT8, V_BLOCK_SCALES, V_SCALE_BLOCK,
    )

    if NUM_SPLITS == 1:
        if V_BLOCK_SCALES:
            out = acc / l_i[:, None]
        else:
            out = acc * (tl.load(V_descale + desc_idx) / l_i)[:, None]
        o_rows = o_base + pos.to(tl.int64) * stride_os + head * HEAD_DIM
        tl.store(Out + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & mask_d[None, :])
    else:
        part_row = ((pid_split * tl.num_programs(1) + pid_bh).to(tl.int64) * max_rows + offs_r)
        tl.store(O_part + part_row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        # A row that saw no key of this split kept a placeholder max of 0 (finite exp2 inputs); store -inf
        # so the combine ignores it instead of taking it as the row's max.
        tl.store(ML_part + part_row * 2, tl.where(l_i > 0, m_i, float("-inf")), mask=row_ok)
        tl.store(ML_part + part_row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _fp8_attn_combine_kernel(
    Out, V_descale, O_part, ML_part, Cu_q,
    stride_ob, stride_os,
    H_kv, S_q, BH,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, VARLEN: tl.constexpr, V_BLOCK_SCALES: tl.constexpr = False,
):
    """Grid: (cdiv(S_q * GROUP, BLOCK_R), B * H_kv). Merges the split partials of `_fp8_attn_fwd_kernel`.

    Each split's acc and sum are rescaled by exp2(its max - the overall max) (0 for a split in which the
    row saw no key), summed, divided by the summed row sum and multiplied by v_descale (not with
    V_BLOCK_SCALES: the partials are descaled). VARLEN: as in `_fp8_attn_fwd_kernel` (S_q is the longest length).
    """
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    max_rows = S_q * GROUP
    b = pid_bh // H_kv
    h_kv = pid_bh % H_kv
    if VARLEN:
        q_start = tl.load(Cu_q + b)
        n_rows = (tl.load(Cu_q + b + 1) - q_start) * GROUP
        o_base = q_start.to(tl.int64) * stride_os
    else:
        n_rows = max_rows
        o_base = b.to(tl.int64) * stride_ob
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < n_rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM

    m_max = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
    for s in tl.static_range(NUM_SPLITS):
        part_row = (s * BH + pid_bh).to(tl.int64) * max_rows + offs_r
        m_max = tl.maximum(m_max, tl.load(ML_part + part_row * 2, mask=row_ok, other=float("-inf")))
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PAD], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        part_row = (s * BH + pid_bh).to(tl.int64) * max_rows + offs_r
        m_s = tl.load(ML_part + part_row * 2, mask=row_ok, other=float("-inf"))
        l_s = tl.load(ML_part + part_row * 2 + 1, mask=row_ok, other=0.0)
        o_s = tl.load(O_part + part_row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        w = tl.math.exp2(m_s - m_max)
        l_sum += w * l_s
        acc += o_s * w[:, None]
    if V_BLOCK_SCALES:
        v_descale = 1.0
    else:
        v_descale = tl.load(V_descale + pid_bh)
    out = acc * (v_descale / tl.where(row_ok, l_sum, 1.0))[:, None]
    pos = offs_r // GROUP
    head = h_kv * GROUP + offs_r % GROUP
    o_rows = o_base + pos.to(tl.int64) * stride_os + head * HEAD_DIM
    tl.store(Out + o_rows[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & mask_d[None, :])


def _prefill_configs():
    # The best four of a sweep on an H100 (D=128, S=4k/16k, causal and not, keys-contiguous V).
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3)]
    ]


def _prune_prefill(configs, named_args, **kwargs):
    # Triton passes the constexpr arguments in kwargs (3.6) or in named_args (later versions).
    def arg(name, default):
        return kwargs.get(name, named_args.get(name, default))

    # 256-wide heads: a 128x128 fp32 score tile plus a 128x256 accumulator exceed the registers of
    # 8 warps; keep BLOCK_N 64 there.
    if arg("HEAD_DIM_PAD", 0) >= 256:
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
        return kept or configs
    return configs


# Prefill: autotuned once per (head_dim, causal, V layout, short/long keys), results kept per process.
fp8_attn_fwd_prefill = triton.autotune(
    configs=_prefill_configs(),
    key=["HEAD_DIM_PAD", "IS_CAUSAL", "V_KEYS_CONTIGUOUS", "VARLEN", "BLOCK_SCALES", "QK_INT8", "V_BLOCK_SCALES",
         "kv_len_bucket"],
    prune_configs_by={"early_config_prune": _prune_prefill},
    do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
)(_fp8_attn_fwd_kernel)
