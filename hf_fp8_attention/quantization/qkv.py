"""Launcher of the Triton FP8 Q/K/V quantization. Input BHSD (any strides), output BSHD contiguous fp8 (V
optionally keys-contiguous: a BSHD view of (B, H, D, S) memory).

One launch whatever the shapes: a persistent grid of `qkv_quantize_kernel` (see kernels.py for the ticket
schedule) plus one small zero-fill of its counters; or, when every scale is per block (v_scales="block"),
a plain grid of `block_kernel.qkv_block_quantize_kernel`, which reads every element once. This is the only
module that reads strides, allocates and builds grids; the math is the one of `reference.py`, bit for bit but for summation orders (see
`quantize_qkv_fp8`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch

from .. import _launch as direct
from .._constants import FP8_DTYPE, FP8_MAX, INT8_MAX, SCALE_BLOCK, V_SCALE_BLOCK, k_scale_block
from .._intmath import cdiv, next_power_of_2
from ..options import NO_MODES, FP8AttentionOptions
from .block_kernel import PASS_AMAX, PASS_BLOCK, PASS_CODES, qk_rope_block_kernel, qkv_block_quantize_kernel
from .kernels import WS_PAD, add_v_mean_kernel, centring_sums_kernel, qkv_quantize_kernel
from .quantized import (QuantizedQKV, check_cu_seqlens, check_dtypes, check_q_in_kernel, check_rope_args,
                        check_wgmma_order)
from .reference import v_code_drift
from ..backends.triton import _interpreting

# Elements of one (BLOCK_S, D) tile, the two half tiles together (8 KiB of bf16): a program has two tiles in
# flight (the P1 of one item and the P2 of another), 4 warps (8 for D=256).
_TILE_ELEMS = 4096
# With RoPE: (tile elements, num_warps, ONE_TILE), ONE_TILE = one tile in flight (kernels.py).
# Registers per thread, D=128, offline sm_90 compile with triton 3.6 (the H200's) with the unit channel
# strides Triton specializes at run time (docs/results/quantize_registers_sm90_s8.log; the session-4 counts
# of 241-255 with spills had them as plain ints, i.e. gathers): plain 4096-element tiles 128 (qk 167), 8192
# 239; RoPE with ONE_TILE (the config below) 149-152, + qk 168; RoPE with two tiles in flight 255 + spills.
# So 3 programs per SM with RoPE (4 warps).
# `scripts/bench_quantize.py --configs` times the alternatives.
_ONE_TILE_CONFIG = (4096, 4, True)  # H100 sweep (bench_quantize --modes): rope 0.56 ms vs 0.78 at (8192, 8)
# Persistent programs per SM (fewer are resident: see the register counts above).
_PROGRAMS_PER_SM = 8
# P2 runs LAG items behind P1: LAG = the largest group's item count + this many items per program, so that
# the P1s a P2 waits on are usually published when it starts (tickets in flight ~ the grid size) while
# the items between a P1 read and its P2 read stay inside L2 where they can (a GQA 32/8 q group at 64k
# is 64 MiB: they cannot). Both values from the sweep of
# scripts/bench_quantize.py on the H100 (S=16k, H 32/32 and 32/8), when items were single tiles: not re-tuned
# since items hold 4-8 tiles (session 8), so the slack alone is now ~0.5 x 1056 items of up to 64 KiB
# (~33 MiB with RoPE at >= 16k): `bench_quantize.py --sweep` re-times it.
_LAG_PER_PROGRAM = 0.5
# Tiles per work item (kernels.py: one set of atomics and one wait per item, instead of per tile): `_CHUNK`
# from `_CHUNK_LONG_ROWS` rows on, else `_CHUNK_SHORT` (a runtime argument: no recompilation). The q/k
# interleaved item order (kernels.py) with RoPE from `_INTERLEAVE_ROWS` rows on (`_INTERLEAVE` None; True/
# False: always/never whatever the length). H200, session 8 of 2026-12-02: a sweep (docs/results/
# quantize_chunks_sweep_h200_s8.*; 4k: chunks of 4 tiles 0.073 ms vs 0.082 with 8; at 16k the interleaved
# order 9% slower, at 64k 3% faster), then `bench_quantize.py --rope --compare` vs the previous kernel
# (quant_compare_rope_h200_s8.log, RoPE, no accuracy mode): GQA 32/8 16k 0.266 -> 0.209 ms, 64k 1.184 ->
# 0.899; MHA 16k 0.491 -> 0.397, 64k 2.229 -> 1.786; at 4k MHA it was slower (0.264 vs 0.131 ms; the old
# kernel itself took 0.188 in the next run).
_CHUNK, _CHUNK_SHORT, _CHUNK_LONG_ROWS = 8, 4, 16384
_INTERLEAVE: bool | None = None
_INTERLEAVE_ROWS = 32768
# The single-pass kernel (v_scales="block"): warps per program, whose tile is V_SCALE_BLOCK rows x D, keyed by
# (padded half head dim, RoPE). H200, session 15 (`bench_quantize.py --block-configs`, docs/results/
# quantize_block_warps_h200_s15.log), D=128, 16k and 64k, H 32/32 and 32/8: without RoPE 4 warps 81-84% of
# copy vs 56-68% with 8 and 47-67% with 16; with RoPE 16 warps 39-40% vs 32-39% with 8 (its cos/sin half
# tiles need the registers; since session 16 RoPE comes here only with int8 Q/K, or packed sequences whose q
# and k offsets are separate tensors). D=64 / D=256: warps scaled with the tile (not measured); other head
# dims: 8.
_BLOCK_WARPS = {(32, False): 4, (32, True): 8, (64, False): 4, (64, True): 16, (128, False): 8, (128, True): 16}
# With RoPE and e4m3 Q/K (every scale per block), q and k go through `block_kernel.qk_rope_block_kernel`
# (cos/sin once per tile of rows, a loop over heads) and v either in the same launch (each V block of 128 rows
# in two passes over its tiles, the second from L2) or through the single-pass kernel without RoPE (a second
# launch): (rows per tile, heads per program, num_warps, prefetch, heads fastest, v: 0 in its own launch, 1 in
# the same launch after the q/k programs, 2 in the same launch first) per padded half head dim; None keeps the
# one-kernel path. Other head dims: `_ROPE_TILE_DEFAULT`.
# H200, `bench_quantize.py --rope-configs` at 64k (docs/results/quantize_rope_tiles*_h200_s16.log, _s17.log):
# the one-kernel path 35-42% of copy. D=128 (session 16, 32/32 and 32/8): (16, 8, 4, True, True) 75-79% (89
# registers, 5 programs per SM; 16- to 64-row tiles within 1-3% of it; without prefetch 62-65%, with 8 warps
# 59-65%), 77-81% once the v tiles ran heads fastest; session 17: v in the same launch 77.9% / 77.7% vs
# 80.5% / 78.3% in its own (kept apart). D=64 (32/8, session 17): (32, 8, 4) 73.5% with v in the launch vs
# 72.2%, 16-row tiles 62%. D=256 (32/8): (32, 8, 4) 79.6% with v vs 78.2%, but it spills (offline sm_90: 255
# registers, 80 bytes of stack; docs/results/rope_v_kernel_registers_sm90_s17.log), so (16, 8, 4) with v:
# 78.7%, 153 registers. At 16k (~0.1-0.2 ms) eager timings swing (32/8: 40-73% across runs); graph-timed,
# 74-75%.
# The last entry's values: V_APART (0 / False), V_AFTER (1 / True), V_FIRST (2), V_SIDE (3: apart, its launch
# on a second CUDA stream that runs beside the q/k launch, so that neither launch's tail nor the gap between
# them leaves the memory bus idle; CPU tensors, and inputs of fewer than `_V_SIDE_MIN_ROWS` rows of q, k and v
# together, B * (S_q * H_q + 2 * S_kv * H_kv), take V_APART's order on one stream). The heads per program are
# a maximum: the q and k heads (H_q + H_kv) are cut into the fewest chunks of at most that many, all of one
# size but the last (`_heads_per_program`).
# Session 21 (docs/results/quantize_rope_side_stream*_h200_s21.log, 3 rounds in turns, medians), D=128:
# - 64k, eager: V_SIDE 80.2% / 81.5% of copy (32/8 / 32/32) vs V_APART 78.4% / 80.6%; with 20 heads at 32/8
#   (two chunks of 20) 82.1%, 16 at 32/32 (four of 16) 82.6%: a maximum of 20 takes both. A second run: the
#   kept tile 82.0% / 82.7% (graph-timed 82.1% / 83.0%), the same tile with v apart 79.5% / 81.5%, session
#   17's (16, 8, 4, v apart) 78.4% / 80.7%.
# - GPU time (graph-timed) V_SIDE is faster at every size: 4k 69.7% / 75.8% vs 60.6% / 64.1% apart, 16k
#   79.4% / 81.1% vs 73.9% / 77.2%. But the second stream costs host time (events, stream switches): eager
#   calls at 4k and 16k, bound by the host, took 0.29-0.30 ms with it vs 0.21-0.23 without. Hence the
#   threshold: from 3 Mi rows (32/8 at 64k, 32/32 at 32k; ~0.35 ms of GPU work) the GPU time covers the host's.
V_APART, V_AFTER, V_FIRST, V_SIDE = 0, 1, 2, 3
_ROPE_TILES: dict[int, tuple[int, int, int, bool, bool, int] | None] = {
    32: (32, 8, 4, True, True, True), 64: (16, 20, 4, True, True, V_SIDE), 128: (16, 8, 4, True, True, True)}
_V_SIDE_MIN_ROWS = 3 << 20
# Per-(batch, KV head) scales take `_launch_split` (two launches of single-pass kernels) instead of the
# persistent two-pass kernel from this many elements of q, k and v together, B * (S_q * H_q + 2 * S_kv * H_kv) * D.
# H200, session 22 (`bench_quantize.py --split`, eager, 2 rounds in turns, docs/results/quantize_split*_h200_s22.log),
# the split path against the persistent kernel, same codes and descales:
# - D=128, with RoPE and the Q/K rotation (the default prefill): 1.24-1.25x at 8k-16k (32/8), 1.24-1.28x at 8k-16k
#   (32/32), 1.30-1.32x at 64k; RoPE alone 1.12-1.46x but 0.88x at 8k 32/8; the rotation alone 1.20-1.41x; plain
#   1.01-1.07x. At 4k its four launches lose with RoPE (0.45-0.86x).
# - D=64 (32/8): 0.77-0.81x at 16k, 1.11-1.26x at 32k, 1.10-1.18x at 64k. D=256 (32/8): 1.40-2.03x at 16k, 64k.
# - Graph-timed (GPU time alone, 32/8), the split path is faster at every size: D=128 1.07-1.13x at 4k, 1.05-1.28x
#   at 8k-16k; D=64 1.13-1.18x at 16k. Its losses above are the host's: four launches instead of one.
# 96 Mi elements: D=128 from 16k at 32/8 (8k at 32/32), D=64 from 32k, D=256 from 8k.
_SPLIT_MIN_ELEMENTS = 96 << 20
# The split path's single-pass kernel tiles, (rows, num_warps) per padded half head dim (other head dims:
# `_SPLIT_TILE_DEFAULT`). Offline sm_90 compile (triton 3.6), D=128 with Hadamard on q/k, registers of the
# amax / codes pass: (128 rows, 4 warps) 255 + 352 bytes of stack / 255; (128, 8) 215 / 177; (64, 8) 122 / 103;
# (32, 4) 117 / 94. `bench_quantize.py --split --split-tiles` times them.
_SPLIT_TILES: dict[int, tuple[int, int]] = {32: (128, 8), 64: (64, 8), 128: (32, 8)}
_SPLIT_TILE_DEFAULT = (64, 8)
# With RoPE, q and k go through `qk_rope_block_kernel` in both passes: (rows per tile, heads per program at most,
# num_warps) per padded half head dim (prefetch on, heads fastest; `_ROPE_TILES`' entries for every scale per
# block); None: no split path with RoPE for that head dim.
_SPLIT_ROPE_TILES: dict[int, tuple[int, int, int] | None] = {32: (32, 8, 4), 64: (16, 20, 4), 128: (16, 8, 4)}
_SPLIT_ROPE_TILE_DEFAULT = (16, 8, 4)
# With RoPE the split path makes four launches (q/k by the RoPE kernel, v by the single-pass kernel, per pass).
# v's heads in the RoPE kernel's list instead (two launches; commit d825b8a, reverted) measured slower in GPU time
# on the H200 (session 25, docs/results/split_v_with_qk_h200_s25.log, GQA 32/8): graph-timed 0.86-0.97x the four
# launches at 4k-16k; eagerly, where the host's launches count, 1.0-1.6x at 4k-8k (below the split path's
# threshold) but 0.86-0.97x at 64k and at 16k without centring (1.14x with it).
_ROPE_TILE_DEFAULT = (16, 8, 4, True, True, False)
# The single-pass kernel's item order within a tensor: heads of a row tile first (True) or row tiles of a head
# first (False; `kernels._item_setup`). H200, session 16 (`bench_quantize.py --block-configs`,
# docs/results/quantize_block_order_h200_s16.log), 64k at 4 warps: without RoPE 81-82% of copy vs 76%; the
# v tiles after the q/k RoPE kernel 79-81% vs 78-79%.
_BLOCK_HEADS_FASTEST = True


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _tile_config(head_dim: int, apply_rope: bool) -> tuple[int, int, int, bool]:
    """(HALF_BLOCK, BLOCK_S, num_warps, ONE_TILE) for a head dim; D=96 pads its 48-wide halves to 64.
    BLOCK_S with 4096-element tiles (both configs today): 64 for D=64, 32 for D=96/128, 16 for D=256. RoPE
    keeps one tile in flight (`_ONE_TILE_CONFIG`): its tiles carry cos/sin."""
    half_block = next_power_of_2(head_dim // 2)
    tile_elems, num_warps, one_tile = _ONE_TILE_CONFIG if apply_rope else (_TILE_ELEMS, 4, False)
    block_s = max(16, min(128, tile_elems // (2 * half_block)))
    num_warps = max(num_warps, 8 if head_dim > 128 else 4)
    return half_block, block_s, num_warps, one_tile


def _schedule(B: int, H_q: int, H_kv: int, S_q: int, S_kv: int, block_s: int, n_sms: int,
              chunk: int = 1, interleave: bool = False) -> tuple[int, int]:
    """(number of programs, LAG in work items) of the persistent grid; an item is `chunk` tiles of one head
    (kernels.py's item order; `interleave`: a KV head's q and k heads interleaved chunk by chunk)."""
    rows = block_s * chunk
    nc_q, nc_kv = cdiv(S_q, rows), cdiv(S_kv, rows)
    group = H_q // H_kv
    if interleave:
        span = (group + 1) * max(nc_q, nc_kv)  # a KV head's q and k items
        n_items, largest_group = B * H_kv * (span + nc_kv), max(span, nc_kv)
    else:
        n_items, largest_group = B * H_q * nc_q + 2 * B * H_kv * nc_kv, max(group * nc_q, nc_kv)
    n_programs = max(1, min(n_sms * _PROGRAMS_PER_SM, n_items))
    return n_programs, largest_group + int(_LAG_PER_PROGRAM * n_programs)


def quantize_qkv_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None, *,
    options: FP8AttentionOptions = NO_MODES, v_keys_contiguous: bool = False, v_wgmma_order: bool = False,
    q_in_kernel: bool = False,
) -> QuantizedQKV:
    """FP8 quantization of Q, K, V with per-(batch, KV head) scales, optional RoPE on Q and K, optional
    Hadamard rotation and K / V mean subtraction (Triton, one launch).

    Args:
        q: (B, H_q, S_q, D) bf16/fp16, any strides (HF hands BSHD memory viewed as BHSD; no copy is made).
        k, v: (B, H_kv, S_kv, D), same dtype as q, any strides; H_q % H_kv == 0; D in (64, 96, 128, 256).
        cos, sin: optional (B_c, S_q, D), B_c in {1, B}, any float dtype and strides; only with
            S_q == S_kv (prefill).
        options: `FP8AttentionOptions`, as in `quantize_qkv_fp8_reference` (hadamard needs a power-of-two D).
        v_keys_contiguous: store V's codes keys-contiguous, (B, H_kv, D, S_kv) memory, and return v as its
            BSHD view (unit stride over keys): the layout the Triton backend reads V in for long prefills
            (`backends.triton_reads_v_keys_contiguous`), written by this launch instead of a copy afterwards.
            The same codes.
        v_wgmma_order: with v_keys_contiguous, V's keys in wgmma order within every 16
            (`quantized.wgmma_key_order`, recorded as ``QuantizedQKV.v_wgmma_order``): the layout the Gluon
            kernel reads without moving P between threads (`backends.triton_reads_v_wgmma_order`). Needs
            S_kv a multiple of 16 and per-head V scales. The same codes, reordered.
        q_in_kernel: leave Q to the attention kernel (`QuantizedQKV.q_in_kernel`: the Gluon kernel quantizes each
            query row as it loads it): only K and V are quantized (the split path's kernels over their tiles),
            q is returned as the input's (B, S_q, H_q, D) view (a contiguous copy where the input's memory is
            not BSHD), q_descale NaN. Needs v_wgmma_order, per-head e4m3 scales and no RoPE
            (`quantized.check_q_in_kernel`).

    Returns:
        QuantizedQKV: q (B, S_q, H_q, D), k and v (B, S_kv, H_kv, D) float8_e4m3fn contiguous (v keys-contiguous
        with v_keys_contiguous); q_descale,
        k_descale, v_descale (B, H_kv) float32 (views of one (3, B, H_kv) buffer); v_mean (B, H_kv, D)
        float32 with smooth_v (V's centring offset, before any rotation). Identical to
        `quantize_qkv_fp8_reference` but for summation orders: the float64 sums of the offsets and, with
        hadamard, the rotation's sums and the rows' squared norms. These change bits only for rows whose values
        span more than ~16 binades or a squared norm within an ulp of a power of two: then a few fp8 values may
        be one ulp apart.

    Raises:
        ValueError: cos/sin given with mismatched shapes or with S_q != S_kv; q, k, v dtypes differ;
            unknown hadamard mode or one the head dim does not allow; v_wgmma_order without what it needs.
    """
    options = FP8AttentionOptions.coerce(options)
    options = options.for_head_dim(q.shape[-1])
    check_rope_args(q, k, cos, sin)
    options.check_head_dim(q.shape[-1])
    check_dtypes(q, k, v)
    B, H_q, S_q, D = q.shape
    H_kv, S_kv = k.shape[1], k.shape[2]
    v_layout = int(bool(v_keys_contiguous))
    if v_wgmma_order:
        check_wgmma_order(options, S_kv, v_keys_contiguous)
        v_layout = V_WGMMA
    if q_in_kernel:
        check_q_in_kernel(options, cos, v_wgmma_order)
    device = q.device
    outs = _outputs(((B, S_q, H_q, D), (B, S_kv, H_kv, D), (B, S_kv, H_kv, D)), options, device, v_keys_contiguous,
                    q_in_kernel)
    rope = None
    if cos is not None:
        # A batch-1 cos/sin is broadcast over the batch by a zero batch stride.
        rope = (cos, sin, *((0 if t.shape[0] == 1 else t.stride(0), t.stride(1), t.stride(2)) for t in (cos, sin)))
    qkv = _launch(q, k, v, outs, rope, B, S_q, S_kv, None, options, v_layout, q_in_kernel)
    if q_in_kernel:  # (q_descale NaN, as the reference's: no tile of q set it)
        qkv = dataclasses.replace(qkv, q=q.transpose(1, 2).contiguous(), q_in_kernel=True, q_rotate=options.rotates_qk,
                                  q_descale=torch.full_like(qkv.q_descale, float("nan")))
    return qkv


# `_launch`'s V layouts (the kernels' V_KEYS_CONTIG): BSHD, keys-contiguous, keys-contiguous in wgmma order
V_BSHD, V_KEYS, V_WGMMA = 0, 1, 2


def quantize_qkv_fp8_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
    cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None, *,
    options: FP8AttentionOptions = NO_MODES, check: bool = True, v_keys_contiguous: bool = False,
) -> QuantizedQKV:
    """`quantize_qkv_fp8` for N sequences packed along the tokens (FlashAttention's varlen layout).

    Args:
        q: (total_q, H_q, D), k/v (total_kv, H_kv, D) bf16/fp16, any strides; sequence i is rows
            [cu_seqlens_q[i], cu_seqlens_q[i + 1]) of q and [cu_seqlens_k[i], cu_seqlens_k[i + 1]) of k/v.
        cu_seqlens_q, cu_seqlens_k: int32 (N + 1,) offsets on q's device; every sequence has >= 1 token.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (they size the tile grid).
        cos, sin: optional (total_q, D) or (1, total_q, D) rotary tables per packed token; needs
            cu_seqlens_q == cu_seqlens_k. With every scale per block, passing one tensor for both (the same
            object) lets q and k take the faster RoPE kernel (`_launch_blocks`); equal separate tensors
            take the single-pass kernel's RoPE path, same results.
        check: validate the offsets (one host sync); callers that built them on the host pass False.
        v_keys_contiguous: v's codes in (1, H_kv, D, total_kv) memory, returned as its BSHD view (see
            `quantize_qkv_fp8`).
    Returns:
        QuantizedQKV with q (1, total_q, H_q, D), k/v (1, total_kv, H_kv, D) e4m3 and (N, H_kv) descales,
        one scale per (sequence, KV head): equal to `quantize_qkv_fp8_varlen_reference` (each sequence
        quantized alone), bit for bit without the accuracy modes.
    """
    options = FP8AttentionOptions.coerce(options)
    options = options.for_head_dim(q.shape[-1])
    if check:
        check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    options.check_head_dim(q.shape[-1])
    check_dtypes(q, k, v)
    total_q, H_q, D = q.shape
    total_k, H_kv = k.shape[0], k.shape[1]
    n_seqs = cu_seqlens_q.numel() - 1
    device = q.device
    rope = None
    if cos is not None:
        if cos.shape != sin.shape or cos.shape[-2:] != (total_q, D) or cos.dim() not in (2, 3):
            raise ValueError(f"varlen cos/sin must have shape (total_q, D) = ({total_q}, {D}) or (1, {total_q}, "
                             f"{D}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if total_q != total_k:
            raise ValueError("fused RoPE needs the same packed sequences for queries and keys (prefill)")
        rope = (cos, sin, (0, cos.stride(-2), cos.stride(-1)), (0, sin.stride(-2), sin.stride(-1)))
    outs = _outputs(((1, total_q, H_q, D), (1, total_k, H_kv, D), (1, total_k, H_kv, D)), options, device,
                    v_keys_contiguous)
    # (1, H, total, D) views: the kernel reads rows through the head/token/channel strides only
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    varlen = (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    return _launch(qb, kb, vb, outs, rope, n_seqs, int(max_seqlen_q), int(max_seqlen_k), varlen, options,
                   v_keys_contiguous)


def _outputs(shapes, options: FP8AttentionOptions, device, v_keys_contiguous: bool,
             q_in_kernel: bool = False) -> tuple[torch.Tensor, ...]:
    """Empty BSHD q, k, v outputs: e4m3, q and k int8 with qk_format="int8"; v_keys_contiguous: v a BSHD view
    of (B, H, D, S) memory; q_in_kernel: q an empty stand-in (never written: no Q tiles are launched)."""
    qk_dtype = torch.int8 if options.int8_qk else FP8_DTYPE
    q_shape = (shapes[0][0], 0, *shapes[0][2:]) if q_in_kernel else shapes[0]
    q_out, k_out = (torch.empty(shape, dtype=qk_dtype, device=device) for shape in (q_shape, shapes[1]))
    b, s, h, d = shapes[2]
    if v_keys_contiguous:
        v_out = torch.empty((b, h, d, s), dtype=FP8_DTYPE, device=device).permute(0, 3, 1, 2)
    else:
        v_out = torch.empty(shapes[2], dtype=FP8_DTYPE, device=device)
    return q_out, k_out, v_out


@functools.lru_cache(maxsize=256)
def _constexprs(options: FP8AttentionOptions, D: int, tile: tuple, d_contig: bool, apply_rope: bool, varlen: bool,
                chunk: int, interleave: bool, interp: bool, v_keys_contiguous: int) -> dict:
    """`qkv_quantize_kernel`'s constexprs and compile options for one launch (built once per configuration:
    host time; the caller must not modify the dict). ``tile``: the launch's `_tile_config` (part of the key:
    benchmarks and tests change the tile configs at run time)."""
    half_block, block_s, num_warps, one_tile = tile
    int8 = options.int8_qk
    return dict(
        FP8_MAX=FP8_MAX, HEAD_DIM=D, HALF_BLOCK=half_block, BLOCK_S=block_s,
        D_CONTIG=d_contig, APPLY_ROPE=apply_rope, ONE_TILE=one_tile,
        HADAMARD_QK=options.rotates_qk, HADAMARD_V=options.rotates_v, INV_SQRT_D=D**-0.5,
        SMOOTH_K=options.smooth_k, SMOOTH_V=options.smooth_v, VARLEN=varlen,
        BLOCK_SCALES=options.block_scales, SCALE_BLOCK=SCALE_BLOCK, K_SCALE_BLOCK=k_scale_block(int8),
        QK_INT8=int8, QK_MAX=INT8_MAX if int8 else FP8_MAX, CHUNK=chunk, INTERLEAVE=interleave, NO_SPIN=interp,
        V_KEYS_CONTIG=v_keys_contiguous, num_warps=num_warps, enable_fp_fusion=False,
    )


def _launch(q, k, v, outs, rope, B, S_q, S_kv, varlen, options: FP8AttentionOptions,
            v_keys_contiguous: int = V_BSHD, skip_q: bool = False) -> QuantizedQKV:
    """The quantize launches: every scale per block `_launch_blocks`, else the persistent two-pass kernel
    (`_launch_persistent`) or the split path (`_launch_split`, `_split_wanted`). q/k/v (B or 1, H, S, D), any
    strides; outs the fp8 BSHD outputs; v_keys_contiguous V's layout (V_BSHD, V_KEYS or V_WGMMA; a bool
    reads as the first two); rope None or
    (cos, sin, cos strides (batch, token, channel), sin strides); varlen None or (cu_q, cu_k, max_q, max_k),
    then B is the number of sequences and S_q / S_kv the longest lengths. skip_q (q_in_kernel; per-head scales,
    no RoPE, fixed length): only K's and V's tiles, always through the split path."""
    if v_keys_contiguous == V_WGMMA and varlen is not None:  # (quantize_qkv_fp8 checks the rest)
        raise ValueError("v_wgmma_order: not for packed sequences")
    if options.v_block_scales:
        return _launch_blocks(q, k, v, outs, rope, B, S_q, S_kv, varlen, options, v_keys_contiguous)
    H_q, D = q.shape[1], q.shape[3]
    H_kv = k.shape[1]
    device = q.device
    q_out, k_out, v_out = outs
    k_block = k_scale_block(options.int8_qk)
    n_blk_q, n_blk_kv = cdiv(S_q, SCALE_BLOCK), cdiv(S_kv, k_block)
    block_scales = options.block_scales
    if block_scales:  # every block a sequence reaches is written; longest-length padding is never read
        blocks = (torch.empty((B, H_q, n_blk_q), dtype=torch.float32, device=device),
                  torch.empty((B, H_kv, n_blk_kv), dtype=torch.float32, device=device))
    else:
        blocks = (None, None)
    smooth_k, smooth_v = options.smooth_k, options.smooth_v

    # One zero-filled int32 buffer: the kernel's workspace (ticket, amax bits, P1 counters, with block scales
    # the K blocks' amax bits and non-finite flags) and the (3, B, H_kv) float32 descales (overwritten).
    n_groups, pad = 3 * B * H_kv, WS_PAD.value
    n_ws = pad + 2 * n_groups + (2 * B * H_kv * n_blk_kv if block_scales and k_block > SCALE_BLOCK else 0)
    n_ws = cdiv(n_ws, 4) * 4  # the descales start 16-byte aligned (B * H_kv odd: SmolLM2's 3 KV heads at B=1),
    # as the direct launch's key wants (`_launch.aligned`; a misaligned pointer takes the JIT every call)
    buf = torch.zeros((n_ws + n_groups,), dtype=torch.int32, device=device)
    means = buf  # never read: SMOOTH_K = SMOOTH_V = False removes the accesses
    if options.smooths:
        means = (_centring_means(k, v, rope, B, S_kv, varlen, smooth_k, smooth_v) if S_kv > 0 and B > 0
                 else torch.zeros((2, B, H_kv, D), dtype=torch.float32, device=device))
    v_mean = means[1] if smooth_v else None

    def bundle(descale: torch.Tensor, v_add=None) -> QuantizedQKV:
        extra = {}
        if varlen is not None:
            extra = dict(zip(("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"), varlen))
        return QuantizedQKV(q_out, k_out, v_out, descale[0], descale[1], descale[2], v_mean=v_mean,
                            v_rotated=options.rotates_v, v_add=v_add, q_block_descale=blocks[0],
                            k_block_descale=blocks[1], v_wgmma_order=v_keys_contiguous == V_WGMMA, **extra)

    if S_q == 0 or S_kv == 0 or B == 0:
        return bundle(torch.ones((3, B, H_kv), dtype=torch.float32, device=device))
    workspace = buf[:n_ws]
    descale = buf[n_ws : n_ws + n_groups].view(torch.float32).view(3, B, H_kv)
    d_contig = q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
    if skip_q or _split_wanted(options, rope, varlen, D, B * (S_q * H_q + 2 * S_kv * H_kv) * D):
        _launch_split(q, k, v, outs, rope, B, S_q, S_kv, varlen, options, v_keys_contiguous, means,
                      buf[pad : pad + n_groups], descale, d_contig, skip_q)
    else:
        _launch_persistent(q, k, v, outs, rope, B, S_q, S_kv, varlen, options, v_keys_contiguous, means, buf,
                           workspace, descale, blocks, (n_blk_q, n_blk_kv), d_contig)
    v_add = None
    if smooth_v:  # smooth_v's add-back: v_mean minus the mean of the dequantized centred V (QuantizedQKV.v_add)
        codes = v_out.permute(0, 2, 1, 3)  # (B or 1, H_kv, S, D) view of the e4m3 codes
        code_mean = _centring_means(codes, codes, None, B, S_kv, varlen, False, True)[1]
        v_add = v_mean - v_code_drift(code_mean, descale[2], options.rotates_v)
    return bundle(descale, v_add)


def _launch_persistent(q, k, v, outs, rope, B, S_q, S_kv, varlen, options: FP8AttentionOptions,
                       v_keys_contiguous: int, means, buf, workspace, descale, blocks, n_blks, d_contig: bool) -> None:
    """`_launch`'s persistent two-pass kernel (`kernels.qkv_quantize_kernel`), one launch; its arguments are
    `_launch`'s (buf: the zeroed int32 buffer, workspace its head sized for n_blks, blocks the block descales or
    Nones, n_blks their (q, k) block counts)."""
    H_q, D, H_kv = q.shape[1], q.shape[3], k.shape[1]
    device = q.device
    block_scales = options.block_scales
    n_blk_q, n_blk_kv = n_blks
    apply_rope = rope is not None
    tile = _tile_config(D, apply_rope)
    longest = max(S_q, S_kv)
    chunk = _CHUNK if longest >= _CHUNK_LONG_ROWS else _CHUNK_SHORT
    interleave = (apply_rope and longest >= _INTERLEAVE_ROWS) if _INTERLEAVE is None else _INTERLEAVE
    n_programs, lag = _schedule(B, H_q, H_kv, S_q, S_kv, tile[1], _num_sms(device), chunk, interleave)
    interp = _interpreting()
    if apply_rope:
        cos, sin, cos_strides, sin_strides = rope
    else:
        cos = sin = buf  # never read: APPLY_ROPE=False removes the loads
        cos_strides = sin_strides = (0, 0, 0)
    cu_q, cu_k = (varlen[0], varlen[1]) if varlen is not None else (buf, buf)  # never read without VARLEN

    # int8 Q/K: the kernel stores every tile as bytes (one pointer type for its q/k/v select)
    out_ptrs = tuple(t.view(torch.uint8) for t in outs) if options.int8_qk else outs
    const_key = (options, D, tile, d_contig, apply_rope, varlen is not None, chunk, interleave, interp,
                 int(v_keys_contiguous))
    tensors = (q, k, v, cos, sin, *out_ptrs, descale, workspace, means, cu_q, cu_k,
               blocks[0] if block_scales else buf, blocks[1] if block_scales else buf)
    # keys-contiguous V's row count (S_kv, or the packed total); 0 otherwise (unread: no specialization, key
    # or recompile follows a packed total that only it would carry)
    v_rows = outs[2].shape[1] if v_keys_contiguous else 0
    ints = (n_blk_q, n_blk_kv, B, H_q, H_kv, S_q, S_kv, lag, v_rows,
            *q.stride(), *k.stride(), *v.stride(), *cos_strides, *sin_strides)
    # The direct launch's key (`hf_fp8_attention._launch`; the kernel specializes every int, so their exact
    # values are in it: a new shape takes the JIT once, then its repeats launch directly)
    key = None
    if direct.wanted(q) and direct.aligned(*tensors):
        key = (device, tuple(t.dtype for t in tensors), ints, const_key)
    direct.launch(qkv_quantize_kernel, key, (n_programs,), (*tensors, *ints), _constexprs(*const_key))
    if interp and int(buf[1]) != 0:  # kernels.py NO_SPIN: a P2 came before its group's P1s
        raise RuntimeError(f"quantize schedule: a P2 step came before its group's P1 steps (LAG {lag} too small "
                           f"for {n_programs} programs): a launcher bug")


def _split_wanted(options: FP8AttentionOptions, rope, varlen, D: int, elements: int) -> bool:
    """Whether `_launch` takes the split path (`_launch_split`) for per-(batch, KV head) scales: e4m3 Q/K with
    per-head scales (with block scales the persistent kernel's P2 sets them from the tile), from
    `_SPLIT_MIN_ELEMENTS` elements of q, k and v together, and with RoPE only where q and
    k take `qk_rope_block_kernel` (a rotary tile for the head dim, and packed sequences sharing one offsets
    tensor): the single-pass kernel's own RoPE path streams at half the copy bandwidth (`_BLOCK_WARPS`)."""
    if options.block_scales or elements < _SPLIT_MIN_ELEMENTS:
        return False
    if rope is None:
        return True
    return (_SPLIT_ROPE_TILES.get(next_power_of_2(D // 2), _SPLIT_ROPE_TILE_DEFAULT) is not None
            and (varlen is None or varlen[0] is varlen[1]))


def _launch_split(q, k, v, outs, rope, B, S_q, S_kv, varlen, options: FP8AttentionOptions, v_keys_contiguous: int,
                  means, amax, descale, d_contig: bool, skip_q: bool = False) -> None:
    """Per-(batch, KV head) scales in two passes of separate launches (`block_kernel`'s PASS_AMAX, then
    PASS_CODES): the amax launch merges every tile's amax into `amax` ((3, B, H_kv) int32, zeroed), the codes
    launch writes the codes and `descale` ((3, B, H_kv) float32). With RoPE, q and k go through
    `qk_rope_block_kernel` (`_SPLIT_ROPE_TILES`) and v through the single-pass kernel's v tiles,
    else every tile through the single-pass kernel, in tiles of `_SPLIT_TILES` (rows, warps). skip_q (no RoPE):
    K's and V's tiles only (q's group descales then come from no tile: left as the zeroed buffer has them)."""
    H_q, D, H_kv = q.shape[1], q.shape[3], k.shape[1]
    half_block = next_power_of_2(D // 2)
    if rope is not None:
        cos, sin, cos_strides, sin_strides = rope
    else:
        cos = sin = amax  # never read: APPLY_ROPE=False removes the loads
        cos_strides = sin_strides = (0, 0, 0)
    cu_q, cu_k = (varlen[0], varlen[1]) if varlen is not None else (amax, amax)  # read only with VARLEN
    v_rows = outs[2].shape[1] if v_keys_contiguous else 0
    rows, warps = _SPLIT_TILES.get(half_block, _SPLIT_TILE_DEFAULT)
    n_q, n_kv = B * H_q * cdiv(S_q, rows), B * H_kv * cdiv(S_kv, rows)
    item0 = (n_q if skip_q else 0) if rope is None else n_q + n_kv  # with RoPE the v tiles alone
    no_blocks = (descale, descale, descale)  # the block pointers, never read
    tensors = (q, k, v, cos, sin, *outs, means, cu_q, cu_k, *no_blocks, amax, descale)
    ints = (1, 1, 1, B, H_q, H_kv, S_q, S_kv, v_rows, item0, *q.stride(), *k.stride(), *v.stride(), *cos_strides,
            *sin_strides)
    use_direct = direct.wanted(q) and direct.aligned(*tensors)
    rope_tile = None
    if rope is not None:
        rope_tile = (*_SPLIT_ROPE_TILES.get(half_block, _SPLIT_ROPE_TILE_DEFAULT), True, True, V_APART)

    def block_launch(pass_: int) -> None:
        const_key = (options, D, half_block, d_contig, False, varlen is not None, int(v_keys_contiguous), warps,
                     _BLOCK_HEADS_FASTEST, pass_, rows)
        key = (q.device, tuple(t.dtype for t in tensors), ints, const_key) if use_direct else None
        direct.launch(qkv_block_quantize_kernel, key, (n_q + 2 * n_kv - item0,), (*tensors, *ints),
                      _block_constexprs(*const_key))

    def rope_launch(pass_: int) -> None:
        _launch_qk_rope(q, k, v, outs, cos, sin, cos_strides, sin_strides, means, cu_q, no_blocks, (1, 1, 1), B,
                        S_q, 0, varlen is not None, options, D, half_block, d_contig, rope_tile,
                        group=(amax, descale, pass_))

    block_launch(PASS_AMAX.value)
    if rope is not None:
        rope_launch(PASS_AMAX.value)
    block_launch(PASS_CODES.value)
    if rope is not None:
        rope_launch(PASS_CODES.value)


def _launch_blocks(q, k, v, outs, rope, B, S_q, S_kv, varlen, options: FP8AttentionOptions,
                   v_keys_contiguous: int) -> QuantizedQKV:
    """`_launch` when every scale is per block: one launch of `qkv_block_quantize_kernel` (one program per
    V_SCALE_BLOCK rows of one head, every element read once), after `centring_sums_kernel` with smooth_k.
    With RoPE and e4m3 Q/K (and packed sequences sharing one offsets tensor), q and k through
    `qk_rope_block_kernel` (`_ROPE_TILES`) and v in that launch or in the single-pass kernel's v tiles alone:
    after it, or (V_SIDE, from `_V_SIDE_MIN_ROWS`) on a second stream beside it, joined before the return.
    The per-(batch, KV head) descales are not computed: NaN (`QuantizedQKV.v_block_descale`)."""
    if v_keys_contiguous == V_WGMMA:  # (its kernels store keys-contiguous V in key order only)
        raise ValueError('v_wgmma_order: needs per-head V scales (not v_scales="block")')
    H_q, D = q.shape[1], q.shape[3]
    H_kv = k.shape[1]
    device = q.device
    int8 = options.int8_qk
    k_block = k_scale_block(int8)
    n_blk = (cdiv(S_q, SCALE_BLOCK), cdiv(S_kv, k_block), cdiv(S_kv, V_SCALE_BLOCK))
    # every block a sequence reaches is written; longest-length padding is never read
    blocks = tuple(torch.empty((B, h, n), dtype=torch.float32, device=device)
                   for h, n in zip((H_q, H_kv, H_kv), n_blk))
    descale = torch.full((3, B, H_kv), float("nan"), dtype=torch.float32, device=device)
    extra = {}
    if varlen is not None:
        extra = dict(zip(("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"), varlen))
    qkv = QuantizedQKV(*outs, descale[0], descale[1], descale[2], v_rotated=options.rotates_v,
                       q_block_descale=blocks[0], k_block_descale=blocks[1], v_block_descale=blocks[2], **extra)
    if S_q == 0 or S_kv == 0 or B == 0:
        return qkv
    means = blocks[2]  # never read without SMOOTH_K
    if options.smooth_k:
        means = _centring_means(k, v, rope, B, S_kv, varlen, True, False)
    if rope is not None:
        cos, sin, cos_strides, sin_strides = rope
    else:
        cos = sin = blocks[2]  # never read: APPLY_ROPE=False removes the loads
        cos_strides = sin_strides = (0, 0, 0)
    cu_q, cu_k = (varlen[0], varlen[1]) if varlen is not None else (blocks[2], blocks[2])  # read only with VARLEN
    half_block = next_power_of_2(D // 2)
    d_contig = q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
    n_q, n_kv = B * H_q * cdiv(S_q, V_SCALE_BLOCK), B * H_kv * cdiv(S_kv, V_SCALE_BLOCK)
    item0, apply_rope, side = 0, rope is not None, None
    rope_tile = _ROPE_TILES.get(half_block, _ROPE_TILE_DEFAULT) if apply_rope and not int8 else None
    if rope_tile is not None and (varlen is None or varlen[0] is varlen[1]):  # q, k share RoPE's rows
        v_rows = outs[2].shape[1] if v_keys_contiguous else 0
        if (rope_tile[5] == V_SIDE and device.type == "cuda"
                and B * (S_q * H_q + 2 * S_kv * H_kv) >= _V_SIDE_MIN_ROWS):
            # v's launch below, beside this one
            main, side = torch.cuda.current_stream(device), _side_stream(device)
            side.wait_stream(main)  # the inputs and the outputs' allocations are ready on main
        try:
            _launch_qk_rope(q, k, v, outs, cos, sin, cos_strides, sin_strides, means, cu_q, blocks, n_blk, B, S_q,
                            v_rows, varlen is not None, options, D, half_block, d_contig, rope_tile)
        except BaseException:
            if side is not None:  # joined again: a CUDA-graph capture then reports this error, not an unjoined stream
                main.wait_stream(side)
            raise
        if rope_tile[5] in (V_AFTER, V_FIRST):  # v was in that launch
            return qkv
        item0, apply_rope = n_q + n_kv, False  # v alone below
    # int8 q/k stored as bytes (one pointer type for their select); v always through its e4m3 pointer
    out_ptrs = (*(t.view(torch.uint8) for t in outs[:2]), outs[2]) if int8 else outs
    tensors = (q, k, v, cos, sin, *out_ptrs, means, cu_q, cu_k, *blocks, blocks[2], blocks[2])
    ints = (*n_blk, B, H_q, H_kv, S_q, S_kv, outs[2].shape[1] if v_keys_contiguous else 0, item0,
            *q.stride(), *k.stride(), *v.stride(), *cos_strides, *sin_strides)
    const_key = (options, D, half_block, d_contig, apply_rope, varlen is not None, bool(v_keys_contiguous),
                 _BLOCK_WARPS.get((half_block, apply_rope), 8), _BLOCK_HEADS_FASTEST)
    key = None
    if direct.wanted(q) and direct.aligned(*tensors):  # as `_launch`: every specialized int is in the key
        key = (device, tuple(t.dtype for t in tensors), ints, const_key)
    try:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            direct.launch(qkv_block_quantize_kernel, key, (n_q + 2 * n_kv - item0,), (*tensors, *ints),
                          _block_constexprs(*const_key))
    finally:
        if side is not None:  # every later use on main (the caller's reads, the allocator's reuse of v) waits for it
            main.wait_stream(side)
    return qkv


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The second stream of V_SIDE (one per device, made once). It comes from torch's pool of streams, which
    hands the same few streams out in turn, so it may be a stream other code also uses: the results stay right
    (v's launch only waits for more), but the overlap can be lost. A CUDA-graph capture in one thread while
    another thread quantizes eagerly on the same device shares this stream: capture such calls in one thread."""
    return torch.cuda.Stream(device)


def _launch_qk_rope(q, k, v, outs, cos, sin, cos_strides, sin_strides, means, cu, blocks, n_blk, B, S, v_rows: int,
                    varlen: bool, options: FP8AttentionOptions, D: int, half_block: int, d_contig: bool,
                    rope_tile: tuple[int, int, int, bool, bool, int], group=None) -> None:
    """`qk_rope_block_kernel` over q and k (RoPE, e4m3 block scales) and, when the tile's last entry is 1 or 2,
    v in the same launch (its programs after the q/k ones, or first; 0: `_launch_blocks` then does v).
    v_rows: V's keys-contiguous row count, else 0. group: None, or (amax bits, descales, PASS_AMAX or
    PASS_CODES) for one pass of the per-(batch, KV head) scales (`_launch_split`; v never in the launch)."""
    H_q, H_kv = q.shape[1], k.shape[1]
    rows, heads = rope_tile[0], _heads_per_program(H_q + H_kv, rope_tile[1])
    rope_tile = (rows, heads, *rope_tile[2:])
    amax, descale, pass_ = group if group is not None else (blocks[2], blocks[2], PASS_BLOCK.value)
    tensors = (q, k, v, cos, sin, outs[0], outs[1], outs[2], means, cu, *blocks, amax, descale)
    n_qk = B * cdiv(S, rows) * cdiv(H_q + H_kv, heads)
    n_v = B * H_kv * cdiv(S, V_SCALE_BLOCK) if rope_tile[5] in (V_AFTER, V_FIRST) and group is None else 0
    ints = (*n_blk, B, H_q, H_kv, S, v_rows, n_qk, n_v if rope_tile[5] == V_FIRST else 0, *q.stride(), *k.stride(),
            *v.stride(), *cos_strides, *sin_strides)
    const_key = (options, D, half_block, d_contig, varlen, bool(v_rows), rope_tile, pass_)
    key = None
    if direct.wanted(q) and direct.aligned(*tensors):
        key = (q.device, tuple(t.dtype for t in tensors), ints, const_key)
    direct.launch(qk_rope_block_kernel, key, (n_qk + n_v,), (*tensors, *ints), _rope_constexprs(*const_key))


def _heads_per_program(n_heads: int, most: int) -> int:
    """Heads per program of `qk_rope_block_kernel`: n_heads (q's and k's) in the fewest chunks of at most
    `most`, of equal size but the last (40 heads at most 20: 20 + 20; 64: 16 x 4; 9 at most 8: 5 + 4)."""
    return cdiv(n_heads, cdiv(n_heads, most))


@functools.lru_cache(maxsize=256)
def _rope_constexprs(options: FP8AttentionOptions, D: int, half_block: int, d_contig: bool, varlen: bool,
                     v_keys_contiguous: bool, rope_tile: tuple[int, int, int, bool, bool, int], pass_: int) -> dict:
    """`qk_rope_block_kernel`'s constexprs and compile options (the caller must not modify the dict)."""
    rows, heads, warps, prefetch, heads_fastest, _ = rope_tile
    return dict(
        FP8_MAX=FP8_MAX, HEAD_DIM=D, HALF_BLOCK=half_block, ROWS=rows, HEADS=heads, D_CONTIG=d_contig,
        HADAMARD_QK=options.rotates_qk, HADAMARD_V=options.rotates_v, INV_SQRT_D=D**-0.5,
        SMOOTH_K=options.smooth_k, VARLEN=varlen, SCALE_BLOCK=SCALE_BLOCK, K_SCALE_BLOCK=k_scale_block(False),
        V_SCALE_BLOCK=V_SCALE_BLOCK, V_KEYS_CONTIG=v_keys_contiguous, PREFETCH=prefetch,
        HEADS_FASTEST=heads_fastest, PASS=pass_, num_warps=warps, enable_fp_fusion=False,
    )


@functools.lru_cache(maxsize=256)
def _block_constexprs(options: FP8AttentionOptions, D: int, half_block: int, d_contig: bool, apply_rope: bool,
                      varlen: bool, v_keys_contiguous: int, num_warps: int, heads_fastest: bool,
                      pass_: int = PASS_BLOCK.value, rows: int = V_SCALE_BLOCK) -> dict:
    """`qkv_block_quantize_kernel`'s constexprs and compile options for one configuration (the caller must not
    modify the dict); `rows` per tile (a V block, but in the split path's passes)."""
    int8 = options.int8_qk
    return dict(
        FP8_MAX=FP8_MAX, HEAD_DIM=D, HALF_BLOCK=half_block, ROWS=rows, D_CONTIG=d_contig,
        APPLY_ROPE=apply_rope, HADAMARD_QK=options.rotates_qk, HADAMARD_V=options.rotates_v, INV_SQRT_D=D**-0.5,
        SMOOTH_K=options.smooth_k, VARLEN=varlen, SCALE_BLOCK=SCALE_BLOCK, K_SCALE_BLOCK=k_scale_block(int8),
        V_SCALE_BLOCK=V_SCALE_BLOCK, QK_INT8=int8, QK_MAX=INT8_MAX if int8 else FP8_MAX,
        V_KEYS_CONTIG=v_keys_contiguous, HEADS_FASTEST=heads_fastest, SMOOTH_V=options.smooth_v is True,
        PASS=pass_, num_warps=num_warps, enable_fp_fusion=False,
    )


# Rows of one K / V head per program of `centring_sums_kernel` (256: 2048 programs at S=16k, H_kv=32, each
# loop short; 2048 rows gave 256 programs of 64 serial loads: smooth_v quantize 0.53 vs 0.26 ms, H200).
_CENTRING_CHUNK = 256


def _centring_means(k, v, rope, B, S_kv, varlen, smooth_k: bool, smooth_v: bool) -> torch.Tensor:
    """(2, B, H_kv, D) float32 K and V means over each sequence (K after RoPE; non-finite elements as 0): the
    float64 chunk sums of `centring_sums_kernel` added in float64, rounded to float32 and divided by the
    length in float32, as `reference._finite_mean`. Only the smoothed halves are written (the other is 0)."""
    H_kv, D = k.shape[1], k.shape[3]
    device = k.device
    first, n_kinds = (1 if smooth_k else 2), int(smooth_k) + int(smooth_v)
    n_chunks = cdiv(S_kv, _CENTRING_CHUNK)
    sums = torch.empty((n_kinds, B, H_kv, n_chunks, D), dtype=torch.float64, device=device)
    if rope is not None:
        cos, sin, cos_strides, sin_strides = rope
    else:
        cos = sin = sums  # never read
        cos_strides = sin_strides = (0, 0, 0)
    cu_k = varlen[1] if varlen is not None else sums
    centring_sums_kernel[(n_kinds * B * H_kv, n_chunks)](
        k, v, cos, sin, sums, cu_k, B, H_kv, S_kv, _CENTRING_CHUNK,
        *k.stride(), *v.stride(), *cos_strides, *sin_strides,
        HEAD_DIM=D, HALF_BLOCK=next_power_of_2(D // 2), ROWS=32 if D <= 128 else 16,  # float64 accumulators
        D_CONTIG=k.stride(3) == 1 and v.stride(3) == 1, APPLY_ROPE=rope is not None, FIRST_KIND=first,
        VARLEN=varlen is not None, num_warps=4, enable_fp_fusion=False,
    )
    means = torch.zeros((2, B, H_kv, D), dtype=torch.float32, device=device)
    total = sums.sum(dim=3).float()  # (n_kinds, B, H_kv, D)
    if varlen is not None:
        lengths = varlen[1].diff().float()[None, :, None, None]
    else:
        lengths = torch.full((1, 1, 1, 1), float(S_kv), dtype=torch.float32, device=device)
    means[first - 1 : first - 1 + n_kinds] = torch.div(total, lengths.clamp(min=1.0))
    return means


def add_v_mean(out: torch.Tensor, v_mean: torch.Tensor) -> torch.Tensor:
    """smooth_v's add-back on a CUDA output, in place: out (B, S, H_q, D) with unit strides over heads and
    channels, v_mean (B, H_kv, D) float32 -> out + v_mean of each query head's KV head, one Triton pass
    (torch's broadcast add took 0.19 ms for 128 MiB at S=16k, H=32 on the H200, ~1.3 TB/s)."""
    B, S, H_q, D = out.shape
    H_kv = v_mean.shape[1]
    block_t = 16
    add_v_mean_kernel[(cdiv(S, block_t), B)](
        out, v_mean.contiguous(), S, H_kv, out.stride(0), out.stride(1),
        GROUP=H_q // H_kv, HEAD_DIM=D, BLOCK_T=block_t, BLOCK_C=min(1024, next_power_of_2(H_q * D)), num_warps=4,
    )
    return out
