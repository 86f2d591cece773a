"""The FP8 attention forward for Hopper written in Gluon (`triton.experimental.gluon`), with the warp
specialization spelled out instead of left to triton's pass (which hangs or returns NaN on this loop with
triton 3.6: `triton_ws.py`). The Triton backend's default prefill kernel on Hopper at head_dim 128
(`triton.py`'s KERNEL_ENV); the autotuned Triton kernel takes everything else.

One program per BLOCK_M query rows of one query head. Partitions (`gl.warp_specialize`):
- a loader (one warp): TMA copies of K tiles (BLOCK_N keys x D) and keys-contiguous V tiles (D x BLOCK_N)
  into a ring of STAGES shared-memory slots, each slot with a "ready" mbarrier per tensor (TMA byte count)
  and one "empty" mbarrier the consumers arrive on once both tiles are used;
- one consumer of the kernel's num_warps, or two of half the rows each (CONSUMERS=2, FA3's two warp groups):
  S = Q K^T with an asynchronous `warpgroup_mma` (Q from shared memory, loaded once), the online softmax in
  registers, P cast to e4m3 and fed from registers to the P.V `warpgroup_mma`, issued together with the next
  block's scores, whose result is added to the float32 accumulator (two-level accumulation, as the Triton
  kernel). PINGPONG: the two consumers' MMA groups in turn.

The math is `triton_attention._fp8_attn_fwd_kernel`'s (FA3's fp8 numerics: base-2 softmax with the row
max offset by 8, P in [0, 256] before its e4m3 cast): per-(batch, KV head) descales; e4m3 Q/K/V; D 64 or
128; causal bottom-right aligned (the blocks below the tile's first row's diagonal unmasked, the rest and
the key tail masked). K and Q are read through 2-D descriptors over (B * S, H * D): rows past a sequence's
end belong to the next sequence (their scores are masked, those query rows never stored); V's descriptor
is bounded by S_kv, so its padding reads as zeros.

Measured on the H200 (triton 3.6, session 18, `docs/results/gluon_probe2_h200_s18.log`): equal to the Triton
kernel (SQNR inf, or 90-105 dB where the last key block takes the masked path), including GQA with two
sequences and a key tail. H=32, D=128, TFLOPS against FA3 fp8 in the same run, non-causal / causal: two
consumers 0.93x / 0.93x at 16k (832 / 813); with ping-pong (the backend's default) 0.89x / 0.92x at 16k, 0.94x /
0.92x at 64k (847 / 844); one 8-warp consumer 0.80x / 0.76x; the Triton kernel 0.73-0.86x. The persistent
build (`docs/results/gluon_persistent_h200_s18.log`): bit-equal to the one-tile build, 848 / 806 TFLOPS at 16k
against its 831 / 799 and FA3 fp8's 925 / 887 in the same run (0.92x / 0.91x). Session 19
(`docs/results/gluon_persistent_snake_h200_s19.log`): with the snake schedule the persistent build ran 689 TFLOPS
at 4k causal against the one-tile build's 588 (FA3 fp8 777-780), equal at 16k; `bench_sdpa` timed it slower at
4k in a later run (not seen again in session 20: 0.200 vs 0.235 ms at 4k causal). Session 20
(`docs/results/gluon_persistent_order_h200_s20.log`): with the causal order picked by the K/V bytes
(`persistent_heads_fastest`) it ran 1.02-1.18x the one-tile build causal (16k, 8 x 4k, 4k, 8k MHA and GQA) and
1.00x non-causal, timed in the same processes: the backend's default since. Half the exponentials
by a polynomial on the FMA pipe (FA4's split) was 6-11% slower (`gluon_exp2_h200_s19.log`). Session 23, two
builds measured and not kept (their code: commit e1ec818 and the one after): FA3's loop order (block j's
softmax under P.V_{j-1}) ran 0.52-0.69x FA3 fp8 with two-level accumulation and 0.71-0.78x with one-level
(`gluon_fa3_order_h200_s23.log`); one-level accumulation in this order (P.V accumulated by the MMA, FA3's
numerics) +0.8% non-causal and -3% causal against two-level, at 11.7 dB SQNR against float32 with a V channel
offset of 4 at 16k where two-level keeps 51 dB (`gluon_acc_in_mma_h200_s23.log`).

Session 25: the persistent build's ROWSUM_MMA (the backend's default since) takes P's row sums from a third
MMA, P times an (8, BLOCK_N) tile of e4m3 ones, instead of 64 additions and two shuffle rounds per key block in
the softmax (offline sm_90: the unmasked loop 499 -> 436 instructions, `gluon_rowsum_sass_sm90_s25.log`). The
sums are then those of the e4m3 P that P.V multiplies, consistent with it up to the MMA's accumulation (a V
channel offset of 4 at 4k: 52.2 dB against float32 vs 50.4). A/B on the H200 (`gluon_rowsum_mma_h200_s25.log`,
`gluon_rowsum_sdpa_h200_s25.log`): non-causal 1.01-1.08x, causal 0.98-1.00x. Measured and not kept (commit be62c3c): the row maxima as a tree over each thread's
registers instead of the chain the reduction compiles to, bit-identical but 0.93-0.96x
(`gluon_tree_max_h200_s25.log`).

Session 26: the default route reads V in wgmma key order (V_WGMMA_ORDER), which the quantizer now writes for
the calls that route takes (`triton.reads_v_wgmma_order`): 1.04-1.07x at 16k and 1.01-1.02x at 64k against the
same build on V in key order, 93-96% of FA3's fp8 kernel (`bench_sdpa`, GQA 32/8, two runs,
`vorder_sdpa_h200_s26_run*.log`).

Session 30 (Nsight Compute, `ncu_summary_h200_s30.md`): the fp8 kernels keep the tensor pipe 48-55% busy (FA3's
53-55%, this one 48-52.5%) with no unit full (MUFU 48-56%, issue slots 38-47%): a consumer's softmax outlasts the
other's MMAs.
Part of the exponentials by a polynomial on the FMA pipe (EXP2_EMU, routes gluon-pp-persistent-exp2-k, floor by
a rounded-down addition, not the conversion unit) was slower at every split, 1/8 0.93-0.96x
(`exp2_sdpa_h200_s30.log`): kept as an A/B build.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)

from .. import _constants
from .. import _launch as direct

LOG2E = gl.constexpr(1.4426950408889634)
# the TMA global -> shared copy: `async_copy_global_to_shared` in triton 3.6 (the H200's), renamed `async_load`
# later (3.9 raises on the old name)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global  # (the same renaming)


@gluon.jit
def _load_blocks(desc_k, desc_vt, k_smem, v_smem, k_ready, v_ready, kv_empty, it0, k_row0, k_col, v_row, n_blocks,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA producer of one tile: its key block j is the ring's use it0 + j, into slot (it0 + j) % STAGES once
    the consumers released the slot's previous use."""
    for j in range(n_blocks):
        it = it0 + j
        slot = it % STAGES
        mbarrier.wait(kv_empty.index(slot), ((it // STAGES) & 1) ^ 1)  # a fresh slot passes (parity 1)
        mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
        _tma_load(desc_k, [k_row0 + j * BLOCK_N, k_col], k_ready.index(slot), k_smem.index(slot))
        mbarrier.expect(v_ready.index(slot), desc_vt.block_type.nbytes)
        _tma_load(desc_vt, [v_row, j * BLOCK_N], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _load_partition(desc_k, desc_vt, k_smem, v_smem, k_ready, v_ready, kv_empty, k_row0, k_col, v_row, n_blocks,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    _load_blocks(desc_k, desc_vt, k_smem, v_smem, k_ready, v_ready, kv_empty, 0, k_row0, k_col, v_row, n_blocks,
                 BLOCK_N, STAGES)


# EXP2_EMU: part of the softmax's exponentials by a polynomial on the FMA pipe instead of the special-function unit
# (MUFU, 16 results per clock per SM: at D=128 in fp8 as many cycles per score as the tensor cores take; Nsight
# Compute on the H200 put the consumers' exponentials in one block of MUFU instructions each iteration). 2^x for
# x <= 8 (the scores less the max offset by 8): x clamped to >= -126 (max.NaN keeps a NaN), floor(x) from one
# addition rounded down onto 1.5 * 2^23 (the FMA pipe; floor by cvt/frnd would use the conversion unit, whose
# rate is MUFU's), 2^f for the fraction by a degree-3 fit (relative error 7.5e-5, far inside e4m3's 2^-4), and
# 2^floor(x) as float bits from the same sum. In pack=8 groups of a thread's scores, EXP2_EMU (1, 2 or 4) of the
# eight so; the rest by ex2.approx.ftz.f32, what gl.exp2 compiles to. Measured slower at every split on the H200
# (session 30, docs/results/exp2_sdpa_h200_s30.log: 1/8 0.93-0.96x, 4/8 0.70-0.78x): the softmax phase is bound
# by its warp's instruction issue, not by the MUFU's rate. Opt-in A/B builds only (triton's exp2 routes).
_EXP2_POLY = ("{{ .reg .f32 x, t, j, f, p; .reg .b32 e; "
              "max.NaN.f32 x, {src}, 0fC2FC0000; add.rm.f32 t, x, 0f4B400000; sub.f32 j, t, 0f4B400000; "
              "sub.f32 f, x, j; fma.rn.f32 p, f, 0f3D9FCD28, 0f3E677F2A; fma.rn.f32 p, p, f, 0f3F3221BB; "
              "fma.rn.f32 p, p, f, 0f3F7FFB2B; mov.b32 e, t; shl.b32 e, e, 23; add.s32 e, e, 1065353216; "
              "mov.b32 t, e; mul.f32 {dst}, p, t; }}")


def _exp2_asm(emulated: tuple) -> str:
    """The PTX of one pack of eight: outputs $0..$7, inputs $8..$15; elements in ``emulated`` by the polynomial."""
    parts = []
    for i in range(8):
        if i in emulated:
            parts.append(_EXP2_POLY.format(src=f"${i + 8}", dst=f"${i}"))
        else:
            parts.append(f"ex2.approx.ftz.f32 ${i}, ${i + 8};")
    return " ".join(parts)


_EXP2_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 8))
EXP2_EMU_ASM_1 = gl.constexpr(_exp2_asm((7,)))
EXP2_EMU_ASM_2 = gl.constexpr(_exp2_asm((3, 7)))
EXP2_EMU_ASM_4 = gl.constexpr(_exp2_asm((1, 3, 5, 7)))
EXP2_EMU_CHOICES = (0, 1, 2, 4)


@gluon.jit
def _exp2(x, EXP2_EMU: gl.constexpr):
    """exp2 of a score tile, EXP2_EMU (0, 1, 2 or 4) of every eight elements by the polynomial (`_EXP2_POLY`)."""
    gl.static_assert(EXP2_EMU == 0 or EXP2_EMU == 1 or EXP2_EMU == 2 or EXP2_EMU == 4, "EXP2_EMU is 0, 1, 2 or 4")
    if EXP2_EMU == 0:
        return gl.exp2(x)
    elif EXP2_EMU == 1:
        return gl.inline_asm_elementwise(EXP2_EMU_ASM_1, _EXP2_CONSTRAINTS, [x], gl.float32, True, 8)
    elif EXP2_EMU == 2:
        return gl.inline_asm_elementwise(EXP2_EMU_ASM_2, _EXP2_CONSTRAINTS, [x], gl.float32, True, 8)
    else:
        return gl.inline_asm_elementwise(EXP2_EMU_ASM_4, _EXP2_CONSTRAINTS, [x], gl.float32, True, 8)


@gluon.jit
def _softmax(j, qk, l_i, m_i, qk_scale, row_limit, BLOCK_N: gl.constexpr, MASKED: gl.constexpr,
             s_layout: gl.constexpr, o_layout: gl.constexpr, V_WGMMA_ORDER: gl.constexpr,
             ROWSUM_MMA: gl.constexpr = False, ROW_SCALES: gl.constexpr = False, EXP2_EMU: gl.constexpr = 0):
    """Block j's online softmax (base 2, max offset by 8) on its scores qk: (P as the e4m3 wgmma A operand
    in registers, alpha, l_i, the new max). V_WGMMA_ORDER: V's keys are stored in wgmma order within
    every 16 (`quantized.wgmma_key_order`, written by the quantizer for the Triton backend's default route since
    session 26), so P's columns are relabelled to match: the score accumulator's registers then already sit where the A operand wants them (a register
    renaming; otherwise the layout conversion moves them between threads with shuffles and selects).
    ROWSUM_MMA: l_i is returned as it came (the caller adds the row sums of the e4m3 P, from an MMA).
    ROW_SCALES: qk_scale is one positive factor per row (Q quantized per row in the kernel, `_quantize_q`), in
    the rows' slice of s_layout; else one scalar. EXP2_EMU: that many of every eight exponentials by a polynomial
    (`_exp2`)."""
    if ROW_SCALES:
        scale2 = qk_scale[:, None]
    else:
        scale2 = qk_scale
    if MASKED:
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        qk = gl.where(cols[None, :] <= row_limit[:, None], qk * scale2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1))
        m_new = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key: exp2 gives 0 (EXP2_EMU's
        # polynomial 2^-126, an e4m3 zero)
        p = _exp2(qk - (m_new - 8.0)[:, None], EXP2_EMU)
    else:
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)  # (a positive factor per row commutes with the max)
        p = _exp2(qk * scale2 - (m_new - 8.0)[:, None], EXP2_EMU)
    alpha = gl.exp2(m_i - m_new)
    if not ROWSUM_MMA:
        l_i = l_i * alpha + gl.sum(p, 1)
    p8 = p.to(gl.float8e4nv)
    if V_WGMMA_ORDER:  # column bits (b3 b2 b1 b0) -> (b2 b1 b3 b0): the key at position k of V's 16-key group
        R: gl.constexpr = p8.shape[0]
        p8 = gl.reshape(gl.permute(gl.reshape(p8, [R, BLOCK_N // 16, 2, 2, 2, 2]), [0, 1, 3, 4, 2, 5]), [R, BLOCK_N])
    p8 = gl.convert_layout(p8, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4))
    return p8, alpha, l_i, m_new


@gluon.jit
def _turn_wait(turn, g, C: gl.constexpr, PINGPONG: gl.constexpr):
    """Ping-pong (two consumers): consumer C's MMA group g waits until the other consumer issued its group
    g - 1 + C, so that the tensor cores take the two consumers' groups in turn and one consumer's softmax runs
    under the other's MMAs (FA3's warp-group scheduler barrier, here one mbarrier per consumer)."""
    if PINGPONG:
        mbarrier.wait(turn.index(C), (g + 1 + C) & 1)  # consumer 0's first group passes (a fresh barrier)


@gluon.jit
def _turn_pass(turn, C: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - C), count=1)


@gluon.jit
def _attend_block(j, it0, g0, qk, acc, l_i, m_i, q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, qk_scale,
                  row_limit, s_zero, o_zero, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr,
                  NEXT: gl.constexpr, C: gl.constexpr, PINGPONG: gl.constexpr, s_layout: gl.constexpr,
                  o_layout: gl.constexpr, V_WGMMA_ORDER: gl.constexpr, ones_smem=None, r_zero=None,
                  ROWSUM_MMA: gl.constexpr = False, ROW_SCALES: gl.constexpr = False, EXP2_EMU: gl.constexpr = 0):
    """Key block j of the tile (the ring's use it0 + j, MMA group g0 + j + 1), its scores qk in registers: the
    softmax, then P.V_j and (NEXT) the scores of block j + 1 issued back to back as two asynchronous MMA
    groups (the tensor cores run both while the softmax of block j is already done: FA3's intra-warpgroup
    overlap with one score tile less in flight, the registers that two-level accumulation needs), P.V_j's
    group waited for alone (groups complete in order; with ROWSUM_MMA the row sums' group, issued between the
    two, with it), its result added to the float32 accumulator
    (two-level accumulation) and the slot released while block j + 1's scores are still computing:
    (acc, l_i, the new max, block j + 1's scores). ROWSUM_MMA: the row sums of P come from a third MMA, P times
    a column block of ones (`ones_smem`, (8, BLOCK_N) e4m3, read as (BLOCK_N, 8)), issued after P.V and waited
    for with it: l_i is then (rows, 8), every column the row's sum, and the softmax has no additions and no
    shuffles for it."""
    p8, alpha, l_i, m_new = _softmax(j, qk, l_i, m_i, qk_scale, row_limit, BLOCK_N, MASKED, s_layout, o_layout,
                                     V_WGMMA_ORDER, ROWSUM_MMA, ROW_SCALES, EXP2_EMU)
    it = it0 + j
    slot = it % STAGES
    mbarrier.wait(v_ready.index(slot), (it // STAGES) & 1)
    if NEXT:
        mbarrier.wait(k_ready.index((it + 1) % STAGES), ((it + 1) // STAGES) & 1)
    _turn_wait(turn, g0 + j + 1, C, PINGPONG)
    pv = warpgroup_mma(p8, v_smem.index(slot).permute((1, 0)), o_zero, use_acc=False, is_async=True)
    if ROWSUM_MMA:
        # (P as the A operand of this MMA's own layout: the same registers, no data moves)
        p8_r = gl.convert_layout(p8, gl.DotOperandLayout(operand_index=0, parent=r_zero.type.layout, k_width=4))
        rs = warpgroup_mma(p8_r, ones_smem.permute((1, 0)), r_zero, use_acc=False, is_async=True)
    if NEXT:
        qk_next = warpgroup_mma(q_smem, k_smem.index((it + 1) % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                is_async=True)
    else:
        qk_next = qk
    _turn_pass(turn, C, PINGPONG)
    # groups finish in order: P.V_j (and its row sums) are done while block j + 1's scores may still run
    OUTSTANDING: gl.constexpr = 1 if NEXT else 0
    if ROWSUM_MMA:
        pv, rs = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(pv, rs))
    else:
        pv = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(pv, ))
    mbarrier.arrive(kv_empty.index(slot), count=1)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None] + pv
    if ROWSUM_MMA:
        l_i = l_i * gl.convert_layout(alpha, gl.SliceLayout(1, r_zero.type.layout))[:, None] + rs
    if NEXT:
        qk_next = warpgroup_mma_wait(num_outstanding=0, deps=(qk_next, ))
    return acc, l_i, m_new, qk_next


@gluon.jit
def _consume_tile(q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, it0, g0, Out, o_base, stride_os, h_col,
                  m0, S_q, S_kv, n_full, n_blocks, qk_scale, v_descale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, NUM_WARPS: gl.constexpr,
                  C: gl.constexpr, PINGPONG: gl.constexpr, V_WGMMA_ORDER: gl.constexpr, ones_smem=None,
                  ROWSUM_MMA: gl.constexpr = False, desc_o=None, o_smem=None, o_row0=0,
                  TMA_STORE: gl.constexpr = False, ROW_SCALES: gl.constexpr = False, EXP2_EMU: gl.constexpr = 0):
    """Consumer C on one tile (BLOCK_M rows from m0; its key blocks are the ring's uses it0.., its MMA groups
    g0..g0 + n_blocks): every key block, then the normalised output stored (rows below S_q). Block 0's scores
    first; then each block's softmax and P.V with the next block's scores (`_attend_block`): the blocks before
    n_full unmasked, the rest masked, the last one without a next (masked: exact for a full block).
    TMA_STORE: the output goes through o_smem (this consumer's (BLOCK_M, HEAD_DIM) buffer) and a TMA store over
    desc_o at row o_row0 + m0, left in flight: the next tile's store waits for it before reusing the buffer,
    and the caller waits for the last one (rows past the descriptor's end are clipped by the TMA unit)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 32])
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    if IS_CAUSAL:
        row_limit = rows + (S_kv - S_q)
    else:
        row_limit = gl.zeros([BLOCK_M], gl.int32, gl.SliceLayout(1, s_layout)) + (S_kv - 1)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    o_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    if ROWSUM_MMA:  # the row sums as the (BLOCK_M, 8) accumulator of P times ones (`_attend_block`)
        r_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                           instr_shape=[16, 8, 32])
        r_zero = gl.zeros([BLOCK_M, 8], gl.float32, r_layout)
        l_i = r_zero
    else:
        r_zero = s_zero  # unused
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(k_ready.index(it0 % STAGES), (it0 // STAGES) & 1)  # n_blocks >= 1: every row sees a key
    _turn_wait(turn, g0, C, PINGPONG)
    qk = warpgroup_mma(q_smem, k_smem.index(it0 % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _turn_pass(turn, C, PINGPONG)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk, ))
    last = n_blocks - 1
    n_unmasked = gl.minimum(n_full, last)
    for j in range(0, n_unmasked):
        acc, l_i, m_i, qk = _attend_block(j, it0, g0, qk, acc, l_i, m_i, q_smem, k_smem, v_smem, k_ready, v_ready,
                                          kv_empty, turn, qk_scale, row_limit, s_zero, o_zero, BLOCK_N, STAGES,
                                          False, True, C, PINGPONG, s_layout, o_layout, V_WGMMA_ORDER, ones_smem,
                                          r_zero, ROWSUM_MMA, ROW_SCALES, EXP2_EMU)
    for j in range(n_unmasked, last):
        acc, l_i, m_i, qk = _attend_block(j, it0, g0, qk, acc, l_i, m_i, q_smem, k_smem, v_smem, k_ready, v_ready,
                                          kv_empty, turn, qk_scale, row_limit, s_zero, o_zero, BLOCK_N, STAGES,
                                          True, True, C, PINGPONG, s_layout, o_layout, V_WGMMA_ORDER, ones_smem,
                                          r_zero, ROWSUM_MMA, ROW_SCALES, EXP2_EMU)
    acc, l_i, m_i, qk = _attend_block(last, it0, g0, qk, acc, l_i, m_i, q_smem, k_smem, v_smem, k_ready, v_ready,
                                      kv_empty, turn, qk_scale, row_limit, s_zero, o_zero, BLOCK_N, STAGES, True,
                                      False, C, PINGPONG, s_layout, o_layout, V_WGMMA_ORDER, ones_smem, r_zero,
                                      ROWSUM_MMA, ROW_SCALES, EXP2_EMU)
    if ROWSUM_MMA:
        l_i = gl.max(l_i, 1)  # (its 8 columns are equal)
    out = acc * gl.convert_layout(v_descale / l_i, gl.SliceLayout(1, o_layout))[:, None]
    if TMA_STORE:
        tma.store_wait(0)  # this consumer's previous tile's store has read the buffer
        o_smem.store(out.to(desc_o.dtype))
        fence_async_shared()
        _tma_store(desc_o, [o_row0 + m0, h_col], o_smem)
    else:
        o_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = Out + o_base + o_rows.to(gl.int64)[:, None] * stride_os + h_col + o_cols[None, :]
        gl.store(ptrs, out.to(Out.dtype.element_ty), mask=(o_rows < S_q)[:, None])


FP8_MAX = gl.constexpr(_constants.FP8_MAX)


@gluon.jit
def _quantize_q(q_in, q8_smem, h_smem, qk_scale, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_WARPS: gl.constexpr,
                Q_ROTATE: gl.constexpr, INV_SQRT_D: gl.constexpr, s_layout: gl.constexpr):
    """Q_IN_KERNEL: this consumer's rows of the tile's bf16/fp16 Q (q_in, shared memory) as e4m3 codes in
    q8_smem, one scale per row, first rotated by the +-1 Hadamard matrix h_smem (Q_ROTATE: one MMA, exact
    products and float32 sums; the 1/sqrt(D) that normalises it is folded into the descale, K having been rotated
    by the normalised matrix in the quantizer). Returns qk_scale (the softmax scale times K's descale and log2 e)
    times each row's descale, in the rows' slice of s_layout. A row's scale comes from its finite elements (as
    the quantizer's `_finite_abs`): scale FP8_MAX / amax and descale amax / FP8_MAX, both by correctly rounded
    divisions, both 1 for a row of zeros (`reference._scales`; its scores are 0: a uniform softmax, as exact
    attention gives). Non-finite elements are stored as NaN and reach only their row's scores."""
    q_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    if Q_ROTATE:
        q = warpgroup_mma(q_in, h_smem.permute((1, 0)), gl.zeros([ROWS, HEAD_DIM], gl.float32, q_layout),
                          use_acc=False, is_async=True)
        q = warpgroup_mma_wait(num_outstanding=0, deps=(q, ))
    else:
        q = q_in.load(q_layout).to(gl.float32)
    a = gl.abs(q)
    finite = a < float("inf")  # (False for NaN)
    amax = gl.max(gl.where(finite, a, 0.0), 1)
    positive = amax > 0.0
    inv = gl.where(positive, gl.div_rn(gl.full_like(amax, FP8_MAX), amax), 1.0)
    # non-finite elements become NaN (the cast would saturate an inf), as the quantizer's `reference._to_fp8`
    q8_smem.store(gl.where(finite, q * inv[:, None], float("nan")).to(gl.float8e4nv))
    fence_async_shared()
    descale = gl.where(positive, gl.div_rn(amax, gl.full_like(amax, FP8_MAX)), 1.0)
    if Q_ROTATE:
        descale = descale * INV_SQRT_D
    return gl.convert_layout(descale, gl.SliceLayout(1, s_layout)) * qk_scale


@gluon.jit
def _softmax_partition(q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, Out, o_base, stride_os,
                       h_col, m0, S_q, S_kv, n_full, n_blocks, qk_scale, v_descale, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr,
                       NUM_WARPS: gl.constexpr, C: gl.constexpr, PINGPONG: gl.constexpr,
                       V_WGMMA_ORDER: gl.constexpr):
    """Consumer C of the one-tile kernel."""
    mbarrier.wait(q_bar, 0)  # Q's tile landed (a completed phase: returns at once; explicit for each partition)
    _consume_tile(q_smem, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, 0, 0, Out, o_base, stride_os, h_col, m0,
                  S_q, S_kv, n_full, n_blocks, qk_scale, v_descale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, IS_CAUSAL,
                  NUM_WARPS, C, PINGPONG, V_WGMMA_ORDER)


@gluon.jit
def fp8_attn_fwd_gluon_kernel(desc_q, desc_k, desc_vt, Out, Q_descale, K_descale, V_descale, stride_ob, stride_os,
                              H_q, H_kv, S_q, S_kv, sm_scale, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                              IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, CONSUMERS: gl.constexpr = 1,
                              PINGPONG: gl.constexpr = False, V_WGMMA_ORDER: gl.constexpr = False):
    """Grid (cdiv(S_q, BLOCK_M), B * H_q); num_warps = NUM_WARPS. desc_q over Q (B * S_q, H_q * D), block
    (BLOCK_M, D); desc_k over K (B * S_kv, H_kv * D), block (BLOCK_N, D); desc_vt over keys-contiguous V
    (B * H_kv * D, S_kv) with the buffer's row stride, block (D, BLOCK_N). Out (B, S_q, H_q, D).
    CONSUMERS 2: two consumer partitions of NUM_WARPS warps (the default one and a worker), each with half of
    the tile's rows and its own arrive on a slot's "empty" barrier (count 2), so that neither waits for the
    other between key blocks (one consumer's softmax can overlap the other's MMAs, as FA3's two warp groups
    do); every consumer goes through all of the tile's key blocks (masking is per row). PINGPONG (two
    consumers): their MMA groups issued in turn (`_turn_wait`)."""
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    if IS_CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m  # heaviest tiles first
    b = pid_bh // H_q
    h = pid_bh % H_q
    h_kv = h // GROUP
    m0 = pid_m * BLOCK_M
    desc_idx = b * H_kv + h_kv
    qk_scale = sm_scale * gl.load(Q_descale + desc_idx) * gl.load(K_descale + desc_idx) * LOG2E
    v_descale = gl.load(V_descale + desc_idx)
    if IS_CAUSAL:
        hi = gl.minimum(m0 + BLOCK_M + S_kv - S_q, S_kv)
        full_hi = gl.maximum(gl.minimum(m0 + S_kv - S_q + 1, S_kv), 0)
    else:
        hi = S_kv
        full_hi = S_kv
    n_blocks = (hi + BLOCK_N - 1) // BLOCK_N
    n_full = full_hi // BLOCK_N

    q_smem = gl.allocate_shared_memory(desc_q.dtype, desc_q.block_type.shape, desc_q.layout)
    k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(desc_vt.dtype, [STAGES] + desc_vt.block_type.shape, desc_vt.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        if CONSUMERS == 2:  # (a literal count: triton 3.9's init takes no constexpr)
            mbarrier.init(kv_empty.index(i), count=2)
        else:
            mbarrier.init(kv_empty.index(i), count=1)
    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    _tma_load(desc_q, [b * S_q + m0, h * HEAD_DIM], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)

    o_base = b.to(gl.int64) * stride_ob
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_softmax_partition, (q_smem, q_bar, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, Out, o_base,
                                  stride_os, h * HEAD_DIM, m0, S_q, S_kv, n_full, n_blocks, qk_scale, v_descale,
                                  BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, IS_CAUSAL, NUM_WARPS, 0, False, V_WGMMA_ORDER)),
            (_load_partition, (desc_k, desc_vt, k_smem, v_smem, k_ready, v_ready, kv_empty, b * S_kv,
                               h_kv * HEAD_DIM, desc_idx * HEAD_DIM, n_blocks, BLOCK_N, STAGES)),
        ], [1], [24])
    else:
        HALF_M: gl.constexpr = BLOCK_M // 2
        gl.warp_specialize([
            (_softmax_partition, (q_smem.slice(0, HALF_M), q_bar, k_smem, v_smem, k_ready, v_ready, kv_empty,
                                  turn, Out, o_base, stride_os, h * HEAD_DIM, m0, S_q, S_kv, n_full, n_blocks,
                                  qk_scale, v_descale, HALF_M, BLOCK_N, HEAD_DIM, STAGES, IS_CAUSAL, NUM_WARPS, 0,
                                  PINGPONG, V_WGMMA_ORDER)),
            (_load_partition, (desc_k, desc_vt, k_smem, v_smem, k_ready, v_ready, kv_empty, b * S_kv,
                               h_kv * HEAD_DIM, desc_idx * HEAD_DIM, n_blocks, BLOCK_N, STAGES)),
            (_softmax_partition, (q_smem.slice(HALF_M, HALF_M), q_bar, k_smem, v_smem, k_ready, v_ready,
                                  kv_empty, turn, Out, o_base, stride_os, h * HEAD_DIM, m0 + HALF_M, S_q, S_kv,
                                  n_full, n_blocks, qk_scale, v_descale, HALF_M, BLOCK_N, HEAD_DIM, STAGES,
                                  IS_CAUSAL, NUM_WARPS, 1, PINGPONG, V_WGMMA_ORDER)),
        ], [1, NUM_WARPS], [24, 240])

    mbarrier.invalidate(q_bar)
    mbarrier.invalidate(turn.index(0))
    mbarrier.invalidate(turn.index(1))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(kv_empty.index(i))


@gluon.jit
def _num_my_tiles(n_tiles):
    """How many tiles this program of the persistent grid takes: one per round of num_programs tiles, and one
    of the last, partial round if its place there (`_my_tile`) is below the round's size."""
    p = gl.program_id(0)
    grid = gl.num_programs(0)
    rounds = n_tiles // grid
    last = p + (rounds % 2) * (grid - 1 - 2 * p)
    return rounds + (last < n_tiles - rounds * grid).to(gl.int32)


@gluon.jit
def _my_tile(k):
    """The tile this program takes in round k: place p of the round in even rounds, num_programs - 1 - p in odd
    ones (a snake: the program that took a round's heaviest causal tile takes the next round's lightest)."""
    p = gl.program_id(0)
    grid = gl.num_programs(0)
    return k * grid + p + (k % 2) * (grid - 1 - 2 * p)


@gluon.jit
def _tile(t, n_tiles, n_m, heads_fastest, H_q, H_kv, S_q, S_kv, GROUP: gl.constexpr, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """Tile t of the persistent kernel: (b, h, h_kv, m0, n_full, n_blocks) as in the one-tile kernel.
    Non-causal: query blocks fastest (the programs working at one time share a head's K and V in L2, as the
    one-tile kernel's grid). Causal: heaviest first, with heads_fastest (nonzero) over all heads, so that with
    the snake of `_my_tile` every program's blocks add up to nearly the same count (modelled at 16k x 32 heads
    on 132 SMs: the busiest program 0.5% over the mean, against 6% with query blocks fastest and plain rounds),
    but with every head's K and V in use at once; with heads_fastest 0 head by head (query blocks fastest,
    heaviest first within a head: the one-tile grid's L2 reuse, 3% over the mean once there are a few rounds
    of tiles). The launcher picks (`persistent_heads_fastest`)."""
    if IS_CAUSAL:
        if heads_fastest != 0:
            n_bh = n_tiles // n_m
            pid_m = n_m - 1 - t // n_bh
            bh = t % n_bh
        else:
            pid_m = n_m - 1 - t % n_m
            bh = t // n_m
    else:
        pid_m = t % n_m
        bh = t // n_m
    b = bh // H_q
    h = bh % H_q
    m0 = pid_m * BLOCK_M
    if IS_CAUSAL:
        hi = gl.minimum(m0 + BLOCK_M + S_kv - S_q, S_kv)
        full_hi = gl.maximum(gl.minimum(m0 + S_kv - S_q + 1, S_kv), 0)
    else:
        hi = S_kv
        full_hi = S_kv
    return b, h, h // GROUP, m0, full_hi // BLOCK_N, (hi + BLOCK_N - 1) // BLOCK_N


@gluon.jit
def _load_partition_persistent(desc_q, desc_k, desc_vt, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                               kv_empty, n_tiles, n_m, heads_fastest, H_q, H_kv, S_q, S_kv, GROUP: gl.constexpr,
                               HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_BUFFERS: gl.constexpr = 2):
    """The persistent kernel's TMA producer: per tile, Q into one of Q_BUFFERS buffers once the consumers released
    its use Q_BUFFERS tiles back (one buffer where they release it as soon as they have converted it: Q_IN_KERNEL), then the tile's key blocks through the ring, whose uses run on across tiles (so
    the next tile's first blocks load under this tile's last ones and its output store)."""
    it = 0
    i = 0
    for k in range(_num_my_tiles(n_tiles)):
        b, h, h_kv, m0, n_full, n_blocks = _tile(_my_tile(k), n_tiles, n_m, heads_fastest, H_q, H_kv, S_q, S_kv,
                                                 GROUP, BLOCK_M, BLOCK_N, IS_CAUSAL)
        buf = i % Q_BUFFERS
        mbarrier.wait(q_empty.index(buf), ((i // Q_BUFFERS) & 1) ^ 1)
        mbarrier.expect(q_ready.index(buf), desc_q.block_type.nbytes)
        _tma_load(desc_q, [b * S_q + m0, h * HEAD_DIM], q_ready.index(buf), q_smem.index(buf))
        _load_blocks(desc_k, desc_vt, k_smem, v_smem, k_ready, v_ready, kv_empty, it, b * S_kv, h_kv * HEAD_DIM,
                     (b * H_kv + h_kv) * HEAD_DIM, n_blocks, BLOCK_N, STAGES)
        it += n_blocks
        i += 1


@gluon.jit
def _consumer_persistent(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, kv_empty, turn, Out, Q_descale,
                         K_descale, V_descale, stride_ob, stride_os, n_tiles, n_m, heads_fastest, H_q, H_kv, S_q,
                         S_kv, sm_scale, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr,
                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         NUM_WARPS: gl.constexpr, CONSUMERS: gl.constexpr, C: gl.constexpr,
                         PINGPONG: gl.constexpr, V_WGMMA_ORDER: gl.constexpr, ones_smem=None,
                         ROWSUM_MMA: gl.constexpr = False, desc_o=None, o_smem=None, TMA_STORE: gl.constexpr = False,
                         q8_smem=None, h_smem=None, Q_IN_KERNEL: gl.constexpr = False, Q_ROTATE: gl.constexpr = False,
                         INV_SQRT_D: gl.constexpr = 1.0, Q_BUFFERS: gl.constexpr = 2, EXP2_EMU: gl.constexpr = 0):
    """Consumer C of the persistent kernel: its rows of each tile (`_consume_tile`), the ring's uses and the
    MMA groups counted on across tiles, then its arrive on the Q buffer's "empty" barrier. TMA_STORE: its
    output tiles through o_smem's buffer C and TMA stores, the last one waited for at the end. Q_IN_KERNEL: Q's
    buffers hold the bf16/fp16 input; the consumer quantizes its rows per row into q8_smem's buffer C
    (`_quantize_q`, rotated with Q_ROTATE), releases the Q buffer at once and runs the tile on the codes with
    one score scale per row. EXP2_EMU: `_exp2`'s split of the exponentials."""
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    it = 0
    g = 0
    i = 0
    for k in range(_num_my_tiles(n_tiles)):
        b, h, h_kv, m0, n_full, n_blocks = _tile(_my_tile(k), n_tiles, n_m, heads_fastest, H_q, H_kv, S_q, S_kv,
                                                 GROUP, BLOCK_M, BLOCK_N, IS_CAUSAL)
        desc_idx = b * H_kv + h_kv
        v_descale = gl.load(V_descale + desc_idx)
        buf = i % Q_BUFFERS
        mbarrier.wait(q_ready.index(buf), (i // Q_BUFFERS) & 1)
        if Q_IN_KERNEL:
            qk_scale = _quantize_q(q_smem.index(buf).slice(C * ROWS, ROWS), q8_smem.index(C), h_smem,
                                   sm_scale * gl.load(K_descale + desc_idx) * LOG2E, ROWS, HEAD_DIM, NUM_WARPS,
                                   Q_ROTATE, INV_SQRT_D, s_layout)
            mbarrier.arrive(q_empty.index(buf), count=1)  # (its rows are read: the loader may refill it)
            q_tile = q8_smem.index(C)
        else:
            qk_scale = sm_scale * gl.load(Q_descale + desc_idx) * gl.load(K_descale + desc_idx) * LOG2E
            q_tile = q_smem.index(buf).slice(C * ROWS, ROWS)
        _consume_tile(q_tile, k_smem, v_smem, k_ready, v_ready, kv_empty, turn,
                      it, g, Out, b.to(gl.int64) * stride_ob, stride_os, h * HEAD_DIM, m0 + C * ROWS, S_q, S_kv,
                      n_full, n_blocks, qk_scale, v_descale, ROWS, BLOCK_N, HEAD_DIM, STAGES, IS_CAUSAL, NUM_WARPS, C,
                      PINGPONG, V_WGMMA_ORDER, ones_smem, ROWSUM_MMA, desc_o,
                      o_smem.index(C) if TMA_STORE else o_smem, b * S_q, TMA_STORE, Q_IN_KERNEL, EXP2_EMU)
        if not Q_IN_KERNEL:
            mbarrier.arrive(q_empty.index(buf), count=1)  # its last MMA on Q finished inside _consume_tile
        it += n_blocks
        g += n_blocks + 1
        i += 1
    if TMA_STORE:
        tma.store_wait(0)


# The tile counts and the order flag vary with the sequence length (n_m % 16, heads_fastest at the L2 bound) but
# steer scalar work only: not specialized on, so that one compile serves every length of a shape class (with them
# specialized, causal B=1 GQA 32/8 over S = 2k..64k took four compiles of 2-4 s each).
@gluon.jit(do_not_specialize=["n_tiles", "n_m", "heads_fastest"])
def fp8_attn_fwd_gluon_persistent_kernel(desc_q, desc_k, desc_vt, Out, Q_descale, K_descale, V_descale, stride_ob,
                                         stride_os, H_q, H_kv, S_q, S_kv, sm_scale, n_tiles, n_m, heads_fastest,
                                         GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, IS_CAUSAL: gl.constexpr,
                                         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                                         NUM_WARPS: gl.constexpr, CONSUMERS: gl.constexpr = 1,
                                         PINGPONG: gl.constexpr = False, V_WGMMA_ORDER: gl.constexpr = False,
                                         ROWSUM_MMA: gl.constexpr = False, desc_o=None,
                                         TMA_STORE: gl.constexpr = False, Q_IN_KERNEL: gl.constexpr = False,
                                         Q_ROTATE: gl.constexpr = False, Q_BUFFERS: gl.constexpr = 2,
                                         EXP2_EMU: gl.constexpr = 0):
    """The persistent form of `fp8_attn_fwd_gluon_kernel` (same arguments, plus n_tiles = n_m * B * H_q,
    n_m = cdiv(S_q, BLOCK_M) and heads_fastest, the causal tile order): grid (min(n_tiles, SMs),), each program
    one tile per round of grid tiles (`_my_tile`, `_tile`). TMA_STORE (session 27; the default since 28): the
    output through shared memory and TMA stores over desc_o (Out as (B * S_q, H_q * D), block (BLOCK_M /
    CONSUMERS, D)), each left in flight under the next tile; only where no tile's rows run past S_q into the next sequence (B = 1,
    or S_q a multiple of BLOCK_M: `_launch_arguments`).
    Q is double-buffered (a "ready" and an "empty" mbarrier per buffer, the latter with one arrive per
    consumer); the K/V ring and the ping-pong turns carry their phases across tiles. What it saves over the
    one-tile kernel: the launch of each tile's program, and the wait for its first K/V blocks, which now load
    during the previous tile. ROWSUM_MMA: the consumers take the row sums of P from an MMA with a block of ones
    (`_attend_block`), written to shared memory here once."""
    q_smem = gl.allocate_shared_memory(desc_q.dtype, [Q_BUFFERS] + desc_q.block_type.shape, desc_q.layout)
    k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(desc_vt.dtype, [STAGES] + desc_vt.block_type.shape, desc_vt.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    if ROWSUM_MMA:  # P.V's B operand shape for the row sums: (8, BLOCK_N) ones, keys contiguous like V's tiles
        gl.static_assert(BLOCK_N == 128, "the ones tile's 128-byte swizzle needs 128 keys per block")
        ones_smem = gl.allocate_shared_memory(gl.float8e4nv, [8, BLOCK_N],
                                              gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2))
        ones_layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [NUM_WARPS, 1], [1, 0])
        # e4m3 1.0 is the byte 0x38, bitcast: a cast of a float32 splat gave zeros in half the bytes (H200,
        # triton 3.6)
        ones_smem.store(gl.full([8, BLOCK_N], 0x38, gl.uint8, ones_layout).to(gl.float8e4nv, bitcast=True))
        fence_async_shared()
    else:
        ones_smem = turn  # unused
    if TMA_STORE:  # one output buffer per consumer
        o_smem = gl.allocate_shared_memory(desc_o.dtype, [CONSUMERS] + desc_o.block_type.shape, desc_o.layout)
    else:
        o_smem = turn  # unused
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    INV_SQRT_D: gl.constexpr = 0.125 if HEAD_DIM == 64 else 0.08838834764831845  # (D**-0.5: D 64 or 128)
    if Q_IN_KERNEL:  # each consumer's e4m3 rows of the tile (`_quantize_q`), and the +-1 Hadamard matrix
        q8_smem = gl.allocate_shared_memory(gl.float8e4nv, [CONSUMERS, ROWS, HEAD_DIM], gl.NVMMASharedLayout(
            swizzle_byte_width=128 if HEAD_DIM >= 128 else HEAD_DIM, element_bitwidth=8, rank=2))
        if Q_ROTATE:
            h_smem = gl.allocate_shared_memory(desc_q.dtype, [HEAD_DIM, HEAD_DIM], gl.NVMMASharedLayout(
                swizzle_byte_width=128, element_bitwidth=16, rank=2))
            h_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
            r = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, h_layout))
            c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, h_layout))
            x = r[:, None] & c[None, :]  # Sylvester's matrix: (-1) ** popcount(row & column)
            x = x ^ (x >> 4)
            x = x ^ (x >> 2)
            x = x ^ (x >> 1)
            h_smem.store((1 - 2 * (x & 1)).to(gl.float32).to(desc_q.dtype))
            fence_async_shared()
        else:
            h_smem = turn  # unused
    else:
        q8_smem = turn  # unused
        h_smem = turn
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
        if CONSUMERS == 2:  # (a literal count: triton 3.9's init takes no constexpr)
            mbarrier.init(q_empty.index(i), count=2)
        else:
            mbarrier.init(q_empty.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        if CONSUMERS == 2:
            mbarrier.init(kv_empty.index(i), count=2)
        else:
            mbarrier.init(kv_empty.index(i), count=1)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_consumer_persistent, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, kv_empty, turn, Out,
                                    Q_descale, K_descale, V_descale, stride_ob, stride_os, n_tiles, n_m,
                                    heads_fastest, H_q, H_kv, S_q, S_kv, sm_scale, GROUP, HEAD_DIM, IS_CAUSAL,
                                    BLOCK_M, BLOCK_N, STAGES, NUM_WARPS, CONSUMERS, 0, False, V_WGMMA_ORDER, ones_smem,
                                    ROWSUM_MMA, desc_o, o_smem, TMA_STORE, q8_smem, h_smem, Q_IN_KERNEL, Q_ROTATE,
                                    INV_SQRT_D, Q_BUFFERS, EXP2_EMU)),
            (_load_partition_persistent, (desc_q, desc_k, desc_vt, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                                          v_ready, kv_empty, n_tiles, n_m, heads_fastest, H_q, H_kv, S_q, S_kv, GROUP,
                                          HEAD_DIM, IS_CAUSAL, BLOCK_M, BLOCK_N, STAGES, Q_BUFFERS)),
        ], [1], [24])
    else:
        gl.warp_specialize([
            (_consumer_persistent, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, kv_empty, turn, Out,
                                    Q_descale, K_descale, V_descale, stride_ob, stride_os, n_tiles, n_m,
                                    heads_fastest, H_q, H_kv, S_q, S_kv, sm_scale, GROUP, HEAD_DIM, IS_CAUSAL,
                                    BLOCK_M, BLOCK_N, STAGES, NUM_WARPS, CONSUMERS, 0, PINGPONG, V_WGMMA_ORDER, ones_smem,
                                    ROWSUM_MMA, desc_o, o_smem, TMA_STORE, q8_smem, h_smem, Q_IN_KERNEL, Q_ROTATE,
                                    INV_SQRT_D, Q_BUFFERS, EXP2_EMU)),
            (_load_partition_persistent, (desc_q, desc_k, desc_vt, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                                          v_ready, kv_empty, n_tiles, n_m, heads_fastest, H_q, H_kv, S_q, S_kv, GROUP,
                                          HEAD_DIM, IS_CAUSAL, BLOCK_M, BLOCK_N, STAGES, Q_BUFFERS)),
            (_consumer_persistent, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, kv_empty, turn, Out,
                                    Q_descale, K_descale, V_descale, stride_ob, stride_os, n_tiles, n_m,
                                    heads_fastest, H_q, H_kv, S_q, S_kv, sm_scale, GROUP, HEAD_DIM, IS_CAUSAL,
                                    BLOCK_M, BLOCK_N, STAGES, NUM_WARPS, CONSUMERS, 1, PINGPONG, V_WGMMA_ORDER, ones_smem,
                                    ROWSUM_MMA, desc_o, o_smem, TMA_STORE, q8_smem, h_smem, Q_IN_KERNEL, Q_ROTATE,
                                    INV_SQRT_D, Q_BUFFERS, EXP2_EMU)),
        ], [1, NUM_WARPS], [24, 240])
    for i in gl.static_range(2):
        mbarrier.invalidate(q_ready.index(i))
        mbarrier.invalidate(q_empty.index(i))
        mbarrier.invalidate(turn.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(kv_empty.index(i))


@functools.lru_cache(maxsize=1)
def triton_problem() -> str | None:
    """Why the installed triton cannot build these kernels, or None: they need the list form of
    `gl.warp_specialize` ([(function, args), ...], worker warps, worker registers), which triton 3.6 has and
    3.5 does not (it takes the default partition and the workers as separate arguments). Cached: the launcher
    asks on every call (a test that patches `gl` clears it)."""
    import inspect

    warp_specialize = getattr(gl, "warp_specialize", None)
    if warp_specialize is None:
        return f"the Gluon kernel needs gl.warp_specialize, which triton {triton.__version__} lacks"
    try:
        params = inspect.signature(warp_specialize).parameters
    except (TypeError, ValueError):  # not introspectable: let the compile decide
        return None
    if "functions_and_args" not in params:
        return (f"the Gluon kernel needs triton >= 3.6 (gl.warp_specialize's list form); triton {triton.__version__} "
                "is installed")
    return None


GLUON_HEAD_DIMS = (64, 128)  # (`refusal`)


@functools.lru_cache(maxsize=1)
def _gl_dtypes() -> dict:
    """torch output dtype -> Gluon dtype (the TMA-store build's output descriptor)."""
    import torch

    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


GLUON_CONFIG_DEFAULT = (128, 128, 8, 2)  # (BLOCK_M, BLOCK_N, num_warps of the consumer, STAGES)
CALLS = 0  # launches so far (gpu_check checks that routed tests reached the kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def refusal(qkv, is_causal: bool) -> str | None:
    """Why `gluon_fp8_attention` cannot take this call ("; "-joined), or None."""
    import torch

    from .._constants import FP8_DTYPE
    from ..quantization.quantized import keys_contiguous_rows

    q, k, v = qkv.q, qkv.k, qkv.v
    S_q, D, S_kv = q.shape[1], q.shape[-1], k.shape[1]
    problems = []
    if qkv.is_varlen or qkv.block_scales or qkv.v_block_scales:
        problems.append("packed sequences and block scales are not supported")
    q_dtypes = (torch.bfloat16, torch.float16) if qkv.q_in_kernel else (FP8_DTYPE, )  # (Q quantized here)
    if q.dtype not in q_dtypes or k.dtype != FP8_DTYPE or D not in GLUON_HEAD_DIMS:
        problems.append(f"needs e4m3 Q/K (bf16/fp16 Q that the kernel quantizes) and head_dim 64 or 128, got "
                        f"{q.dtype}, {k.dtype}, {D}")
    if qkv.q_in_kernel and not qkv.v_wgmma_order:
        problems.append("Q quantized in the kernel is built for V in wgmma order")
    # keys-contiguous V: packed (B, H_kv, D, rows) memory, rows >= S_kv a multiple of 16 (TMA strides)
    v_rows = keys_contiguous_rows(v)
    v_packed = v_rows is not None and v_rows % 16 == 0 and v_rows >= S_kv
    if not (q.is_contiguous() and k.is_contiguous()) or not v_packed or S_kv % 16:
        problems.append("needs contiguous BSHD Q/K, keys-contiguous V and a key count that is a multiple of 16")
    if S_kv == 0:
        problems.append("needs at least one key")
    if is_causal and S_q != S_kv:
        problems.append("causal needs S_q == S_kv")
    if any(t.data_ptr() % 16 for t in (q, k, v)):  # TMA descriptors take 16-byte aligned global addresses
        problems.append("needs Q, K and V at 16-byte aligned addresses")
    return "; ".join(problems) or None


PERSISTENT_HEADS_FASTEST_MAX_KV_BYTES = 32 << 20  # half the H200's 60 MB L2


def persistent_heads_fastest(k_elements: int, is_causal: bool) -> bool:
    """The persistent kernel's causal tile order: heads fastest (best balanced) while every head's K and V
    together fit well in L2 (PERSISTENT_HEADS_FASTEST_MAX_KV_BYTES), else head by head (L2 reuse as the one-tile
    grid's). e4m3 K and V: 2 bytes per element of K (k_elements: K's element count, B * S_kv * H_kv * D)."""
    return bool(is_causal) and 2 * k_elements <= PERSISTENT_HEADS_FASTEST_MAX_KV_BYTES


def gluon_fp8_attention(qkv, *, is_causal: bool, scale: float, out_dtype, config: tuple | None = None,
                        consumers: int = 1, pingpong: bool = False, persistent: bool = False,
                        v_wgmma_order: bool | None = None, heads_fastest: bool | None = None,
                        rowsum_mma: bool = False, tma_store: bool = False, q_buffers: int = 1, exp2_emu: int = 0):
    """`fp8_attn_fwd_gluon_kernel` on a `QuantizedQKV` with per-(batch, KV head) descales, e4m3 Q/K,
    contiguous BSHD Q/K and keys-contiguous V, key count a multiple of 16: (B, S_q, H_q, D) out_dtype.
    config: (BLOCK_M, BLOCK_N, warps per consumer, STAGES); consumers: 1, or 2 partitions of half the rows
    each (then BLOCK_M 128 and 4 warps per consumer, e.g. (128, 128, 4, 2)); pingpong (two consumers): their
    MMA groups issued in turn; persistent: one program per SM looping over the tiles
    (`fp8_attn_fwd_gluon_persistent_kernel`); v_wgmma_order: qkv.v's keys are in `quantized.wgmma_key_order`
    (the kernel then relabels P instead of moving it between threads), None: as ``qkv.v_wgmma_order`` says
    (a value other than the bundle's is refused); heads_fastest (persistent, causal): the tile
    order (`_tile`), None: `persistent_heads_fastest`; rowsum_mma (persistent): the row sums of P by an MMA
    (`_attend_block`'s ROWSUM_MMA); tma_store (persistent): the output through shared memory and TMA stores
    left in flight (TMA_STORE; where a tile could run past a sequence's end into the next, B > 1 with S_q not a
    multiple of BLOCK_M, the plain stores); q_buffers (a bundle whose Q the kernel quantizes, `QuantizedQKV.q_in_kernel`):
    the bf16/fp16 Q tiles' buffers, 1 (the consumers release it once they have their rows in e4m3) or 2;
    exp2_emu (persistent): 0, 1, 2 or 4 of every eight of the softmax's exponentials by a polynomial on the FMA
    pipe (`_exp2`)."""
    block_m, block_n, warps, stages = config or GLUON_CONFIG_DEFAULT
    problems = [p for p in (triton_problem(), refusal(qkv, is_causal)) if p]
    if consumers not in (1, 2):
        problems.append(f"consumers is 1 or 2, got {consumers}")
    elif block_m // consumers != 16 * warps:  # each warp of a consumer owns 16 rows of the wgmma tile
        problems.append(f"BLOCK_M / consumers must be 16 x the warps per consumer, got BLOCK_M={block_m}, "
                        f"consumers={consumers}, warps={warps}")
    if stages < 2:  # block j + 1's scores are issued while block j still holds its slot
        problems.append(f"needs at least 2 stages, got {stages}")
    if pingpong and consumers != 2:
        problems.append("pingpong needs 2 consumers")
    if v_wgmma_order is None:
        v_wgmma_order = qkv.v_wgmma_order
    elif bool(v_wgmma_order) != qkv.v_wgmma_order:  # the bundle says which order its V is in
        problems.append(f"v_wgmma_order={v_wgmma_order} but qkv.v_wgmma_order={qkv.v_wgmma_order}")
    if rowsum_mma and not persistent:
        problems.append("rowsum_mma is built into the persistent kernel only")
    if tma_store and not persistent:
        problems.append("tma_store is built into the persistent kernel only")
    if qkv.q_in_kernel and not persistent:
        problems.append("Q quantized in the kernel (qkv.q_in_kernel) is built into the persistent kernel only")
    if tma_store and out_dtype not in _gl_dtypes():
        problems.append(f"tma_store writes {tuple(_gl_dtypes())}, got out_dtype={out_dtype}")
    if rowsum_mma and block_n != 128:  # the ones tile's 128-byte swizzle wants 128 keys (measured there only)
        problems.append(f"rowsum_mma needs BLOCK_N 128, got {block_n}")
    if q_buffers not in (1, 2):
        problems.append(f"q_buffers is 1 or 2, got {q_buffers}")
    if exp2_emu not in EXP2_EMU_CHOICES or isinstance(exp2_emu, bool):
        problems.append(f"exp2_emu is one of {EXP2_EMU_CHOICES}, got {exp2_emu!r}")
    elif exp2_emu and not persistent:
        problems.append("exp2_emu is built into the persistent kernel only")
    if problems:
        raise ValueError("gluon fp8 attention: " + "; ".join(problems))
    return attend(qkv, is_causal=is_causal, scale=scale, out_dtype=out_dtype, config=(block_m, block_n, warps, stages),
                  consumers=consumers, pingpong=pingpong, persistent=persistent, v_wgmma_order=v_wgmma_order,
                  heads_fastest=heads_fastest, rowsum_mma=rowsum_mma, tma_store=tma_store, q_buffers=q_buffers,
                  exp2_emu=exp2_emu)


def attend(qkv, *, is_causal: bool, scale: float, out_dtype, config: tuple, v_wgmma_order: bool, consumers: int = 1,
           pingpong: bool = False, persistent: bool = False, heads_fastest: bool | None = None,
           rowsum_mma: bool = False, tma_store: bool = False, q_buffers: int = 1, exp2_emu: int = 0):
    """`gluon_fp8_attention` without its checks: for a caller that has them from elsewhere (the triton backend's
    route: `refusal` said yes, and the route's own arguments are fixed and checked by tests), v_wgmma_order the
    bundle's. One call's host time on the H200 at 4k went to the JIT's dispatch and to building the TMA
    descriptors (session 28, docs/results/host_profile_h200_s28.txt); a repeat of a launch's specialization goes
    through `_launch`'s direct launcher instead, its descriptors the launcher's plain records (`_LaunchDesc`)."""
    import torch

    q, k, v = qkv.q, qkv.k, qkv.v
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    global CALLS
    CALLS += 1
    if out.numel() == 0:  # (before the descriptors: a TMA descriptor takes no empty dimension)
        return out
    dims = (*q.shape[:3], k.shape[1], k.shape[2], q.shape[3], v.stride(3))
    descales = (qkv.q_descale, qkv.k_descale, qkv.v_descale)
    route = dict(config=config, consumers=consumers, pingpong=pingpong, persistent=persistent,
                 v_wgmma_order=v_wgmma_order, heads_fastest=heads_fastest, rowsum_mma=rowsum_mma, tma_store=tma_store)
    if qkv.q_in_kernel:  # (the bundle says: Q is the input, its rows quantized by the kernel, rotated or not)
        route.update(q_in_kernel=True, q_rotate=qkv.q_rotate, q_buffers=q_buffers)
    if exp2_emu:  # (absent when 0: the default build's key and compile-ahead arguments as before)
        route["exp2_emu"] = exp2_emu
    kernel = fp8_attn_fwd_gluon_persistent_kernel if persistent else fp8_attn_fwd_gluon_kernel
    key = _direct_key(dims, descales, out, is_causal, route, q.dtype) if direct.wanted(out) else None
    if key is not None and not direct.VERIFY and key in direct.direct(kernel).plans:
        kernel, grid, args, meta = _launch_arguments((q, k, v), out, descales, dims, is_causal=is_causal,
                                                     scale=scale, light=True, **route)
        if direct.try_launch(kernel, key, grid, args, meta) is not None:
            return out
        # (the direct path did not apply after all: launch hooks, another current device, the plan dropped;
        # the JIT takes the call with real descriptors)
    kernel, grid, args, meta = _launch_arguments((q, k, v), out, descales, dims, is_causal=is_causal, scale=scale,
                                                 **route)
    direct.launch(kernel, key, grid, args, meta)
    return out


def _direct_key(dims: tuple, descales: tuple, out, is_causal: bool, route: dict, q_dtype) -> tuple:
    """`attend`'s direct-launch key: everything its launch specializes on (`_launch`'s contract). The route
    (constexprs), head dim and group (constexprs), causal, the output's dtype and device; the class of each int
    argument Triton specializes (`_launch.int_class`: the lengths vary freely within it, so prompts of any
    length share a handful of keys); whether the output is stored by TMA (B = 1 or S_q a multiple of BLOCK_M:
    `_launch_arguments`); each descale's dtype and 16-byte alignment (rows of the quantizer's (3, B, H_kv)
    block) and the output's alignment. Q, K, V are 16-byte aligned (`refusal`); descriptors specialize on their
    dtype, block and layout (fixed by the route and the output dtype); the scale, a float, is not specialized."""
    B, S_q, H_q, S_kv, H_kv, D, _ = dims
    ints = (S_q * H_q * D, H_q * D, H_q, H_kv, S_q, S_kv)
    block_m = (route["config"] or GLUON_CONFIG_DEFAULT)[0]
    return (tuple(map(direct.int_class, ints)), H_q // H_kv, D, bool(is_causal), q_dtype, out.dtype, out.device.index,
            tuple(sorted(route.items())), B == 1 or S_q % block_m == 0, out.data_ptr() % 16 == 0,
            *((t.dtype, t.data_ptr() % 16 == 0) for t in descales))


class _LaunchDesc:
    """A host TMA descriptor as the compiled kernel's launcher reads it (`make_tensordesc_arg`: base, shape,
    strides, padding in triton 3.6, also round_f32_to_tf32 in 3.9), for direct launches: `TensorDescriptor`
    validates its fields on every construction (the JIT's binder needs its block and layout; a direct launch of
    a specialization already compiled does not). Built only for a key that `_launch` has seen, whose block,
    layout and dtype the compiled kernel has fixed; the base's alignment `refusal` checks."""

    __slots__ = ("base", "shape", "strides", "padding", "round_f32_to_tf32")

    def __init__(self, base, shape, strides):
        self.base, self.shape, self.strides = base, shape, strides
        self.padding, self.round_f32_to_tf32 = "zero", False  # (TensorDescriptor's defaults)


@functools.lru_cache(maxsize=None)
def _nvmma_layout(block: tuple, dtype):
    """The shared-memory layout of a TMA block (`NVMMASharedLayout.get_default_for`, cached: it builds and
    validates a dataclass on every call)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def _launch_arguments(codes, out, descales, dims, *, is_causal: bool, scale: float, config: tuple | None = None,
                      consumers: int = 1, pingpong: bool = False, persistent: bool = False,
                      v_wgmma_order: bool = False, heads_fastest: bool | None = None, rowsum_mma: bool = False,
                      tma_store: bool = False, q_in_kernel: bool = False, q_rotate: bool = False, q_buffers: int = 1,
                      exp2_emu: int = 0, light: bool = False):
    """(kernel, grid, positional arguments, keyword arguments) of one launch, for `attend` and `compile_ahead` alike
    (what makes the two specialize the same); light: the descriptors as `_LaunchDesc` (a direct launch). codes: the
    descriptors' base tensors, (q, k, v) e4m3 (the quantizer's outputs, or stand-ins of the same dtype: a descriptor
    specializes on its dtype, block and layout, not on its base's size); out: the output (only its pointer and dtype
    are read: its strides are those of a contiguous (B, S_q, H_q, D) tensor); descales: the (B, H_kv) q, k, v
    descales; dims: (B, S_q, H_q, S_kv, H_kv, D, V's row stride); the rest as `gluon_fp8_attention` (checked there;
    for `attend`, by the backend's route and `refusal`)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .._intmath import cdiv

    B, S_q, H_q, S_kv, H_kv, D, v_rows = dims
    block_m, block_n, warps, stages = config or GLUON_CONFIG_DEFAULT

    def desc(t, shape, strides, block, dtype=gl.float8e4nv):
        if light:
            return _LaunchDesc(t, shape, strides)
        return TensorDescriptor(t, shape, strides, block, _nvmma_layout(tuple(block), dtype))

    # (q_in_kernel: Q is the bf16/fp16 input, quantized by the consumers)
    desc_q = desc(codes[0], [B * S_q, H_q * D], [H_q * D, 1], [block_m, D],
                  _gl_dtypes()[codes[0].dtype] if q_in_kernel else gl.float8e4nv)
    desc_k = desc(codes[1], [B * S_kv, H_kv * D], [H_kv * D, 1], [block_n, D])
    desc_vt = desc(codes[2], [B * H_kv * D, S_kv], [v_rows, 1], [D, block_n])
    args = (desc_q, desc_k, desc_vt, out, *descales, S_q * H_q * D, H_q * D, H_q, H_kv, S_q, S_kv, float(scale))
    meta = dict(GROUP=H_q // H_kv, HEAD_DIM=D, IS_CAUSAL=bool(is_causal), BLOCK_M=block_m, BLOCK_N=block_n,
                STAGES=stages, NUM_WARPS=warps, CONSUMERS=consumers, PINGPONG=bool(pingpong),
                V_WGMMA_ORDER=bool(v_wgmma_order), num_warps=warps)
    n_m = cdiv(S_q, block_m)
    if not persistent:
        return fp8_attn_fwd_gluon_kernel, (n_m, B * H_q), args, meta
    n_tiles = n_m * B * H_q
    if heads_fastest is None:
        heads_fastest = persistent_heads_fastest(B * S_kv * H_kv * D, is_causal)
    meta["ROWSUM_MMA"] = bool(rowsum_mma)
    if q_in_kernel:  # (the consumers release Q's buffer once converted: one buffer serves, q_buffers)
        meta.update(Q_IN_KERNEL=True, Q_ROTATE=bool(q_rotate), Q_BUFFERS=int(q_buffers))
    if exp2_emu:
        meta["EXP2_EMU"] = int(exp2_emu)
    if tma_store and (B == 1 or S_q % block_m == 0):  # (else a tile's tail rows would land in the next sequence)
        meta.update(desc_o=desc(out, [B * S_q, H_q * D], [H_q * D, 1], [block_m // consumers, D],
                                _gl_dtypes()[out.dtype]), TMA_STORE=True)
    grid = (min(n_tiles, _num_sms(out.device.index or 0)),)
    return fp8_attn_fwd_gluon_persistent_kernel, grid, (*args, n_tiles, n_m, int(heads_fastest)), meta


# --- compiling ahead: the kernel's first compile beside the quantizer's ---------------------------------------
# The first call of a new shape compiles the quantizer's kernel, then this one, one after the other (session
# 26, H200 host, 16k causal: 1.82 s then 3.77 s of a 7 s first call, docs/results/first_call_h200_s26.log).
# `compile_ahead` starts this kernel's compile in a worker thread before the quantizer launches, through
# triton's own asynchronous compile (`triton.runtime._async_compile.AsyncCompileMode`, triton >= 3.6): inside
# it every JIT compile runs on the executor and a launch waits for its own kernel only, so the quantizer's
# compile and this one overlap. Offline (2-core CPU, triton 3.6, sm_90, scripts/compile_ahead_offline.py):
# 2.25-2.53 s for the two against 2.81-3.06 s in turn, 0.43-0.60 s saved at 4k-64k (half the quantizer's
# compile; Python's lock serializes the rest; docs/results/compile_ahead_offline_s27.log). On the H200 host
# (session 28, scripts/first_call.py, B=1, GQA 32/8, causal, fresh processes): 3.98-4.59 s at 4k and 16k against
# 5.13-7.03 s in turn (docs/results/first_call_h200_s28.log).
COMPILE_AHEAD_ENV = "HF_FP8_ATTENTION_COMPILE_AHEAD"  # "0": never (the kernels compile in turn, as before)
_AHEAD_SEEN_MAX = 1024  # exact call shapes remembered (beyond it the set restarts: a repeat costs one warmup)
_AHEAD_SEEN: set = set()
_NO_CONTEXT = contextlib.nullcontext()  # (reusable)
AHEAD_WARMUPS = 0  # warmups issued inside an asynchronous compile so far (tests read it)


@functools.lru_cache(maxsize=1)
def _async_compile_mode():
    """triton's AsyncCompileMode class, or None where this triton has none (older than 3.6)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:
        return None, None
    return AsyncCompileMode, active_mode


# two workers: this kernel and the quantizer's, at once (a pool starts its threads on its first task)
_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="hf_fp8_attention_compile")


def compile_ahead_wanted() -> bool:
    import os

    value = os.environ.get(COMPILE_AHEAD_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{COMPILE_AHEAD_ENV}={value!r}: expected 0 or 1")
    return value == "1"


def compile_ahead(device, dims: tuple, *, is_causal: bool, scale: float, out_dtype, **route):
    """A context manager for the quantization of a call that `attend` will then run with ``route``
    (its keyword arguments, config included): on the first call of these exact arguments it starts compiling
    the kernel in the background (`AsyncCompileMode` on `_EXECUTOR`: the kernel's `warmup` with the launch's own
    arguments from `_launch_arguments`, on stand-in tensors), and on exit waits for that compile, so that the
    launch after it finds the kernel compiled. dims: (B, S_q, H_q, S_kv, H_kv, D, V's row stride). The
    stand-in descales are laid out as the Triton quantizer's (3, B, H_kv) block (`quantization.qkv._launch`),
    whose rows' 16-byte alignment is part of the specialization.

    Nothing is started (a plain context) where it cannot help or could disturb: COMPILE_AHEAD_ENV "0", a
    triton without `AsyncCompileMode` or `gl.warp_specialize`'s list form, another asynchronous compile
    already active, CUDA-graph capture on the current stream, an empty problem, or arguments seen before. A
    compile that fails in the background is dropped (ignore_errors): the launch then compiles in turn and
    raises as it always did; so does any problem building the stand-ins. If the body raises, the context
    leaves without waiting for the background compile. Measured offline and on the GPU host (above):
    scripts/first_call.py --compile-ahead both."""
    # (first: a repeat call's whole cost, a few microseconds of host time)
    key = (device, dims, is_causal, out_dtype, tuple(route.items()))  # (the scale, a float, is not specialized on)
    if key in _AHEAD_SEEN:
        return _NO_CONTEXT
    import torch

    mode_class, active_mode = _async_compile_mode()
    B, S_q, H_q, S_kv, H_kv, D, _ = dims
    if (mode_class is None or not compile_ahead_wanted() or triton_problem() is not None
            or active_mode.get() is not None or min(B, S_q, S_kv) == 0
            or (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing())):
        return _NO_CONTEXT
    if len(_AHEAD_SEEN) >= _AHEAD_SEEN_MAX:
        _AHEAD_SEEN.clear()
    _AHEAD_SEEN.add(key)
    try:
        from .._constants import FP8_DTYPE

        codes = tuple(torch.empty(16, dtype=FP8_DTYPE, device=device) for _ in range(3))  # 16-byte aligned
        if route.get("q_in_kernel"):  # Q is the input (its dtype the output's: `attention.fp8_attention`)
            codes = (torch.empty(16, dtype=out_dtype, device=device), *codes[1:])
        out = torch.empty(1, dtype=out_dtype, device=device)
        descales = tuple(torch.empty((3, B, H_kv), dtype=torch.float32, device=device))
        launch = _launch_arguments(codes, out, descales, dims, is_causal=is_causal, scale=scale, **route)
    except Exception:  # noqa: BLE001 (the launch builds the same arguments and reports what is wrong)
        return _NO_CONTEXT
    return _compiling(mode_class(_EXECUTOR, ignore_errors=True), *launch)


@contextlib.contextmanager
def _compiling(mode, kernel, grid, args, meta):
    """`compile_ahead`'s context: ``mode`` (an AsyncCompileMode) active around the body, the kernel's warmup
    submitted first; leaving it waits for every compile submitted inside (the kernel's included)."""
    global AHEAD_WARMUPS
    with mode:
        try:
            kernel.warmup(*args, grid=grid, **meta)
            AHEAD_WARMUPS += 1
        except Exception:  # noqa: BLE001 (the launch compiles in turn and reports it)
            pass
        try:
            yield
        except BaseException:
            # the error comes out at once: the mode's exit waits only for what it still lists (the background
            # compile then runs to its end unclaimed; a later launch compiles in turn)
            mode.raw_futures = []
            raise
