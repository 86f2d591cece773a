#!/usr/bin/env python3
"""Decode with the FP8 KV cache vs FA3 bf16: one attention step, then end-to-end ``generate``.

    python scripts/bench_decode.py --out-json decode.json --out-png decode.png   # both parts (H200: ~6-7 min)
    python scripts/bench_decode.py --part attention   (or --part generate)       # one part: under 10 min each
    python scripts/bench_decode.py --quick                                       # smaller grids
    python scripts/bench_decode.py --part attention --sdpa-backends fa3          # no fp8_sdpa triton rows
    python scripts/bench_decode.py --cpu-smoke --out-json smoke.json             # CPU, tiny shapes, seconds
    python scripts/bench_decode.py --sweep --out sweep.json                      # fp8 cache kernel configs (< 3 min)

Part 1 also times ``fp8 cache attend [NAME]`` rows: the same attend through ``ops.cache_attention`` with
each config of ``kv_cache.ops.DECODE_PRESETS`` (``--cache-configs``; default all of them, none with
--cpu-smoke, ``none`` skips; also each with fused_combine, "NAME fused", and "fused": the default with it),
next to the default config's row, each with its ratio to FA3 bf16 ("s4 default": the default before
session 5, measured side by side); ``same_bits`` in the JSON says whether that config's output equals, bit
for bit, the same config without its bit-neutral keys (prefetch_desc: the descale prefetch must not move a
bit).

``--sweep``: the fp8 cache attention step only (`ops.cache_attention`, GQA 32/8, D 128, S_q = 1, bf16
queries) at B x S_kv 1x4k 1x32k 1x128k 8x32k over a grid of kernel configs (block_n 64/128/256, one-block or
tile softmax steps, num_warps 2/4/8, num_stages 2/3/4, programs_per_sm 4/8/16; short do_bench windows), then
the 3 best per shape plus the default re-timed with longer windows, with and without ``fused_combine``, and (not with --cpu-smoke) every ``DECODE_PRESETS``
config, next to FA3 bf16. Grid configs set programs_per_sm (the split count from programs per SM, not the
default's one wave at the kernel's residency) and, without "fast", widen_v, wide_combine and prefetch_desc
off. ``--sweep-fast`` (default both, off with --cpu-smoke): every grid config also with the speed keys
(widen_v, exact_waves, wide_combine; prefetch_desc at block_n 64), tagged "fast" (twice the configs:
narrow the grid or raise --sweep-budget-s). A config that fails to compile or
run is recorded with its error; one whose SQNR vs the float32 reference is > 3 dB below the default's is
reported and never picked. Table: per shape the best config, its ms, the default's, FA3's, the ratios and
TB/s on the fp8 cache's bytes (K + V codes and descales); the config best over all shapes (geometric mean
of ms / the shape's best).

Part 1 took 210 s on the H200 (2026-12-01, first version of this script, one timing round), ~100 s of it the
first calls of ``fp8_sdpa(backend="triton")`` at S_kv = 32k (20-27 s each, once per GQA/head_dim).

Part 1, attention only (S_q = 1, one layer's step), for each GQA (H_q/H_kv), head_dim and B x S_kv, side by
side in one process, on the same random data (keys rotated by RoPE at their positions):
- ``FA3 bf16``: ``flash_attn_interface.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=S_kv)`` on a
  bf16 BSHD cache: the baseline of every ratio. ``FA3 bf16 append+attend``: the same call given the new
  token's k/v (written into the cache by the kernel) and, when the wheel takes them, the rotary tables
  (RoPE of q and k in the kernel).
- ``fp8_sdpa fa3|triton (bf16 cache)``: today's fp8 path with a bf16 cache, ``fp8_sdpa(q, k, v,
  is_causal=True, backend=...)`` with K/V as a DynamicCache hands them (contiguous (B, H_kv, S_kv, D)):
  the whole cache is quantized on every call.
- ``fp8 cache attend``: an `FP8CacheLayer` filled once by ``append`` (un-rotated keys + cos/sin), timed
  the attention launch of a decode step, ``ops.cache_attention`` on the query as the step hands it over
  (with the default Hadamard-rotated cache: the fp16 operand and row descales that the write launch of
  `append_attend` prepares; else un-rotated with RoPE in the kernel). ``fp8 cache append+attend``:
  what a decode step of the model does, ``append_attend`` of one token (write launch, which also prepares
  the query, then attention over S_kv + 1), then ``crop(-1)`` back to S_kv (host-only when S_kv is a
  multiple of 64, as in the default grid; its few microseconds of Python are in the row).
Each ms is a median of CUDA-event timings (triton.testing.do_bench, L2 flushed between calls), the best of
``--rounds`` (2) rounds over all rows of a shape (in a one-round H200 run the row timed first after a shape's
setup, FA3 attend-only, was at times 2x slower than FA3 append+attend: probably clocks still ramping); the
ratio is
FA3 bf16 ms / ms of the row (> 1: faster than FA3 bf16), append+attend rows against FA3's append+attend.
``--timing graph``: each ms is instead the GPU time of one call from CUDA-graph replays (`_common.graph_ms`: 20
calls captured in one graph, each after a 256 MB memset that flushes L2; the memsets' own replay time,
measured alone, subtracted), so the host's launch cost (Python, argument binding: 90-190 us per call on
the H200 host, for FA3 and the fp8 cache alike) is excluded; a row that cannot be captured falls back to
eager timing and is named in the notes. Eager timings of steps whose GPU time is below the host cost
measure the host: on the H200 (2026-12-01) FA3 bf16 at 1x4k took 0.055 ms in one run and 0.163 ms in
another.
SQNR (dB) of every output against float32 attention on the same (bf16) data. First calls: the wall time of
the fp8 cache's first ``attend`` at each new (B, S_kv) (the issue asks <= 5 s), then of ``attend`` at a
second new length S_kv + 1 (after one append): if that is far above the steady time, the kernel recompiled
for the new length. By default Triton compiles into a fresh cache directory (``--triton-cache fresh``), so the
first call of each kernel variant includes its compilation, as on a new machine.

Part 2, end-to-end ``generate`` of a Llama-3-8B-shaped model (random bf16 weights built on the GPU, as
`benchmark_model.py` builds it), B x prompt length, greedy, ``min_new_tokens = max_new_tokens`` (EOS cannot
stop early), three modes on the same weights and prompts:
- ``bf16``: bf16 attention with transformers' DynamicCache. ``--bf16-attn fa3`` (default when
  ``flash_attn_interface`` imports): the FA3 kernel through an AttentionInterface function
  (``flash_attn_func`` for the prefill, ``flash_attn_with_kvcache`` on BSHD views of the DynamicCache for
  decode, split-KV heuristic on); transformers' own ``flash_attention_3`` refuses the tokenspeed FA3 wheel
  (it wants a distribution named flash-attn-3), ``--bf16-attn flash_attention_3`` still asks for it. Without
  FA3 it falls back to ``sdpa`` and says so.
- ``fp8 + bf16 cache``: ``prepare_model(model, kv_cache="bf16")``: fp8 attention, transformers' cache.
- ``fp8 + fp8 cache``: ``prepare_model(model, kv_cache="fp8")``: generate gets an `FP8Cache`.
Per run: prefill s (generate's start to the first logits processor call, synchronized), decode ms/token
((end - first call) / (new tokens - 1) forwards), total s, peak GiB (torch.cuda.max_memory_allocated,
reset per run), cache GiB (`FP8Cache.memory_bytes()`, or the K/V bytes of a DynamicCache);
``--generate-rounds N`` times each mode N times, round-robin over the modes (every other round in reverse
order), and reports the medians (the lent H200's host speed drifts within minutes, and eager decode is
host-bound); a mode that fails in any round reports its error only. Each mode first
runs one untimed generate of 3 tokens at the same batch (``--warmup full``, the default: on the timed prompt
itself, so that every kernel variant the timed run takes is compiled; in the first round only;
``short``: on its first 256 tokens,
cheaper, but kernels whose variants depend on the length still compile inside the timed prefill: in
session 7 the FP8-cache mode's prefill at B=8 x 32k took 13.5 s that way vs 10.9 s when an earlier fp8
mode had compiled them). The fp8
cache row also counts its layers' calls: ``attend`` (the fast path) and ``update`` (transformers' generic
path: the whole cache dequantized per call, correct but slow); a nonzero ``update`` count is reported.

Output: markdown tables at the end, ``--out-json`` (every row, versions, notes), ``--out-png`` (speedup vs
FA3 bf16 per GQA/head_dim, decode ms/token per mode; skipped with a note without matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import benchmark_model as bm  # noqa: E402  (the 8B-shaped model, FA3 bf16 as an AttentionInterface function)

K = 1024
# (B, S_kv) grids, (H_q, H_kv) pairs and head dims of part 1.
ATTN_GRID = [(1, 4 * K), (1, 32 * K), (1, 128 * K), (8, 4 * K), (8, 32 * K), (32, 8 * K)]
ATTN_GRID_QUICK = [(1, 4 * K), (1, 32 * K), (8, 8 * K)]
GQA = [(32, 8), (8, 1)]
HEAD_DIMS = [64, 128]
# Part 2: batch sizes, prompt lengths, new tokens.
GEN_BATCHES = [1, 8]
GEN_PROMPTS = [4 * K, 32 * K]
GEN_PROMPTS_QUICK = [4 * K]
NEW_TOKENS = 128
NEW_TOKENS_QUICK = 64
WARMUP_PROMPT = 256
# --sweep: shapes and config grid (GQA 32/8, D 128); fused_combine only in the re-timing of the best.
SWEEP_SHAPES = [(1, 4 * K), (1, 32 * K), (1, 128 * K), (8, 32 * K)]
SWEEP_GRID = dict(block_n=[64, 128, 256], num_warps=[2, 4, 8], num_stages=[2, 3, 4], programs_per_sm=[4, 8, 16])
SWEEP_SMOKE = dict(shapes=[(1, 512), (2, 384)], gqa=(4, 2), head_dim=64,
                   grid=dict(block_n=[64, 128], num_warps=[4], num_stages=[2], programs_per_sm=[4]))
SWEEP_TOP = 3  # configs per shape re-timed with longer windows
# --cpu-smoke: tiny shapes, the torch reference of the fp8 cache, the tiny Llama of benchmark_model.
SMOKE = dict(grid=[(1, 256), (2, 128)], gqa=[(4, 2), (4, 1)], head_dims=[64], batches=[1, 2], prompts=[48],
             new_tokens=4)

MODES = ("bf16", "fp8_bf16_cache", "fp8_cache")
KV_CACHE_OF_MODE = {"fp8_bf16_cache": "bf16", "fp8_cache": "fp8"}
BF16_ATTN = ("auto", "fa3", "flash_attention_3", "sdpa")
FA3_DECODE = "fa3_bf16_kvcache"  # the AttentionInterface name registered here
ROPE_THETA = 500000.0  # Llama 3

FA3_ROW = "FA3 bf16"
FA3_STEP_ROW = "FA3 bf16 append+attend"
CACHE_ROW = "fp8 cache attend"
CACHE_STEP_ROW = "fp8 cache append+attend"
# --static: the FP8StaticCacheLayer's rows (length on the device; its default config, and with "tma")
STATIC_ROW = "fp8 static cache attend"
STATIC_TMA_ROW = "fp8 static cache attend [tma]"
STATIC_STEP_ROW = "fp8 static cache append+attend"
STEP_ROWS = (FA3_STEP_ROW, CACHE_STEP_ROW, STATIC_STEP_ROW)  # outputs at another position: no SQNR


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int]:
    """"8x32k" / "8x32768" -> (8, 32768)."""
    b, sep, s = text.lower().partition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not BxS (e.g. 8x32k or 8x32768)")
    try:
        batch = int(b)
        seq = int(s[:-1]) * K if s.endswith("k") else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BxS (e.g. 8x32k or 8x32768)") from None
    if batch < 1 or seq < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: B and S must be positive")
    return batch, seq


def _gqa(text: str) -> tuple[int, int]:
    """"32/8" -> (32, 8)."""
    q, sep, kv = text.partition("/")
    try:
        hq, hkv = int(q), int(kv)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not H_q/H_kv (e.g. 32/8)") from None
    if not sep or hq < 1 or hkv < 1 or hq % hkv:
        raise argparse.ArgumentTypeError(f"{text!r}: H_q/H_kv with H_q a multiple of H_kv (e.g. 32/8)")
    return hq, hkv


def _tokens(text: str) -> int:
    try:
        n = int(text[:-1]) * K if text.lower().endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 4096 or 4k)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_decode.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "attention", "generate"), default="all")
    p.add_argument("--quick", action="store_true", help="smaller grids: 3 B x S_kv at H 32/8 D 128; prompts 4k, "
                   f"{NEW_TOKENS_QUICK} new tokens")
    p.add_argument("--cpu-smoke", action="store_true", help="CPU run on tiny shapes (torch reference of the fp8 "
                   "cache, reference fp8 backend, tiny Llama, FA3 skipped): checks the script, not speed")
    g = p.add_argument_group("part 1: attention step")
    g.add_argument("--shapes", type=_shape, nargs="+", default=None, help="B x S_kv, e.g. 1x4k 8x32768")
    g.add_argument("--gqa", type=_gqa, nargs="+", default=None, help="H_q/H_kv pairs (default: 32/8 8/1)")
    g.add_argument("--head-dims", type=int, nargs="+", default=None, help="default: 64 128")
    g.add_argument("--rep-ms", type=int, default=100, help="timing window per measurement (ms)")
    g.add_argument("--rounds", type=int, default=2,
                   help="timing rounds over all implementations of a shape; the best round's median is kept")
    g.add_argument("--timing", choices=("eager", "graph"), default="eager",
                   help="eager: do_bench of each call (host cost included where it exceeds the GPU time); "
                   "graph: GPU time from CUDA-graph replays, L2 flushed (GPU only)")
    g.add_argument("--cache-configs", nargs="+", default=None,
                   help="kv_cache.ops.DECODE_PRESETS configs timed as extra 'fp8 cache attend [NAME]' rows (default: "
                   "all, none with --cpu-smoke; 'none': no extra rows)")
    g.add_argument("--sdpa-backends", nargs="*", choices=("fa3", "triton"), default=["fa3", "triton"],
                   help="fp8_sdpa backends timed on the bf16 cache (none: skip these rows; the triton one "
                   "compiles ~25 s at each new S_kv bucket)")
    g = p.add_argument_group("part 2: generate")
    g.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8")
    g.add_argument("--prompts", type=_tokens, nargs="+", default=None, help="prompt lengths (default: 4k 32k)")
    g.add_argument("--new-tokens", type=int, default=None, help=f"default: {NEW_TOKENS} ({NEW_TOKENS_QUICK} with --quick)")
    g.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    g.add_argument("--generate-cache-presets", nargs="*", default=[], metavar="NAME",
                   help="extra 'fp8 attention + fp8 cache [NAME]' rows: the fp8_cache mode with the cache attention's "
                        "default config replaced by kv_cache.ops.DECODE_PRESETS[NAME] (e.g. tma: its eager host cost "
                        "shows here, not in the graph-timed attention part), or 'jit launches': the default with "
                        "the decode kernels launched through Triton's JIT instead of directly (_launch)")
    g.add_argument("--static", nargs="?", const="also", choices=("also", "only"), default=None,
                   help="generate: also (or 'only') time bf16 and fp8_cache with cache_implementation='static': "
                        "transformers compiles the decode step (torch.compile, CUDA graphs; GPU only); fp8_cache "
                        "gets an FP8StaticCache. Attention step: adds the FP8StaticCacheLayer's rows (its "
                        "attention with the length on the device, by default and with tma, and its "
                        "append+attend step)")
    g.add_argument("--static-bf16-attn", choices=("sdpa", "flash_attention_3", "eager"), default="sdpa",
                   help="bf16 attention of the static bf16 row (default sdpa: transformers' compiled recipe)")
    g.add_argument("--bf16-attn", choices=BF16_ATTN, default="auto",
                   help="attention of the bf16 mode; auto: fa3 when flash_attn_interface imports, else sdpa")
    g.add_argument("--fp8-backend", default=None, help="prepare_model's backend (default: picked from the GPU)")
    g.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, the 8B shape)")
    g.add_argument("--generate-rounds", type=int, default=1,
                   help="timed generates per mode, interleaved round-robin over the modes of a (B, prompt); the "
                        "table reports each quantity's median over the rounds (the lent H200's host speed "
                        "drifts: one mode's decode went from 25.8 to 46.7 ms/token between two rounds)")
    g.add_argument("--warmup", choices=("full", "short"), default="full",
                   help="untimed 3-token generate per mode before the timed one: on the timed prompt (full, "
                        "default: every kernel variant compiled first) or on its first 256 tokens (short)")
    g = p.add_argument_group("--sweep: fp8 cache kernel configs (attention step only)")
    g.add_argument("--sweep", action="store_true", help="time a grid of cache_attention configs vs FA3 bf16 "
                   "(with --cpu-smoke: tiny shapes in the Triton interpreter)")
    g.add_argument("--sweep-block-n", type=int, nargs="+", default=None, help="default: 64 128 256")
    g.add_argument("--sweep-warps", type=int, nargs="+", default=None, help="default: 2 4 8")
    g.add_argument("--sweep-stages", type=int, nargs="+", default=None, help="default: 2 3 4")
    g.add_argument("--sweep-per-sm", type=int, nargs="+", default=None, help="programs per SM, default: 4 8 16")
    g.add_argument("--sweep-fast", choices=("off", "on", "both"), default=None,
                   help="grid configs without (off), only with (on) or both without and with the "
                   "speed keys (default both; off with --cpu-smoke)")
    g.add_argument("--sweep-rep-ms", type=int, default=15, help="do_bench window of the grid pass (ms)")
    g.add_argument("--sweep-budget-s", type=float, default=140.0,
                   help="stop starting grid configs after this many seconds (the re-timing still runs)")
    p.add_argument("--triton-cache", choices=("fresh", "default"), default="fresh",
                   help="fresh: compile into a new TRITON_CACHE_DIR (first calls include compilation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", "--out", dest="out_json", default=None,
                   help="write every row, versions and notes here")
    p.add_argument("--out-png", default=None, help="write the plot here (needs matplotlib; skipped with a note)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timing == "graph" and args.cpu_smoke:
        parser.error("--timing graph needs a GPU (CUDA graphs); --cpu-smoke times eagerly")
    if args.cpu_smoke and args.quick:
        parser.error("pass --cpu-smoke or --quick, not both")
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (this machine has none); --cpu-smoke runs tiny shapes on the CPU")
    args.device = "cpu" if args.cpu_smoke else "cuda"
    # (the JIT preset is the generate part's: the attention part times configs, not how they launch)
    presets = {n: c for n, c in cache_config_presets().items() if n != JIT_PRESET}
    if args.cache_configs is None:  # the CPU smoke run's cache is the torch reference: configs change nothing
        args.cache_configs = [] if args.cpu_smoke else list(presets)
    elif args.cache_configs == ["none"]:
        args.cache_configs = []
    bad = [n for n in args.cache_configs if n not in presets]
    if bad:
        parser.error(f"--cache-configs {bad}: expected some of {list(presets)} or none")
    if args.sweep:
        _sweep_args(parser, args)
        return args
    if args.cpu_smoke:
        defaults = SMOKE
    else:
        defaults = dict(grid=ATTN_GRID_QUICK if args.quick else ATTN_GRID, gqa=GQA[:1] if args.quick else GQA,
                        head_dims=[128] if args.quick else HEAD_DIMS, batches=GEN_BATCHES,
                        prompts=GEN_PROMPTS_QUICK if args.quick else GEN_PROMPTS,
                        new_tokens=NEW_TOKENS_QUICK if args.quick else NEW_TOKENS)
    args.shapes = args.shapes or defaults["grid"]
    args.gqa = args.gqa or defaults["gqa"]
    args.head_dims = args.head_dims or defaults["head_dims"]
    args.batches = args.batches or defaults["batches"]
    args.prompts = args.prompts or defaults["prompts"]
    args.new_tokens = args.new_tokens if args.new_tokens is not None else defaults["new_tokens"]
    from hf_fp8_attention._constants import SUPPORTED_HEAD_DIMS

    bad = [d for d in args.head_dims if d not in SUPPORTED_HEAD_DIMS]
    if bad:
        parser.error(f"--head-dims {bad}: the fp8 kernels take head_dim {SUPPORTED_HEAD_DIMS}")
    if any(b < 1 for b in args.batches):
        parser.error("--batches must be positive")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (one prefill token, then decode steps)")
    if args.rep_ms < 1 or args.rounds < 1 or args.generate_rounds < 1:
        parser.error("--rep-ms, --rounds and --generate-rounds must be >= 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    bad = [n for n in args.generate_cache_presets if n not in cache_config_presets()]
    if bad:
        parser.error(f"--generate-cache-presets {bad}: expected some of {list(cache_config_presets())}")
    if len(set(args.modes)) != len(args.modes):
        parser.error("--modes: a mode is listed twice")
    if args.fp8_backend is not None:
        from hf_fp8_attention import BACKENDS

        if args.fp8_backend not in BACKENDS:
            parser.error(f"--fp8-backend {args.fp8_backend!r}: expected one of {', '.join(BACKENDS)}")
    return args


def _sweep_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Shapes, GQA, head_dim and config grid of --sweep (one GQA and head_dim: the decode shape of the issue)."""
    from hf_fp8_attention.kv_cache.ops import BLOCK_N_CHOICES

    smoke = args.cpu_smoke
    args.shapes = args.shapes or (SWEEP_SMOKE["shapes"] if smoke else SWEEP_SHAPES)
    if args.gqa and len(args.gqa) > 1 or args.head_dims and len(args.head_dims) > 1:
        parser.error("--sweep takes one --gqa pair and one --head-dims value")
    args.gqa = args.gqa or [SWEEP_SMOKE["gqa"] if smoke else (32, 8)]
    args.head_dims = args.head_dims or [SWEEP_SMOKE["head_dim"] if smoke else 128]
    grid = SWEEP_SMOKE["grid"] if smoke else SWEEP_GRID
    args.sweep_fast = args.sweep_fast or ("off" if smoke else "both")
    args.sweep_grid = {
        "block_n": args.sweep_block_n or grid["block_n"],
        "num_warps": args.sweep_warps or grid["num_warps"],
        "num_stages": args.sweep_stages or grid["num_stages"],
        "programs_per_sm": args.sweep_per_sm or grid["programs_per_sm"],
    }
    bad = [b for b in args.sweep_grid["block_n"] if b not in BLOCK_N_CHOICES]
    if bad:
        parser.error(f"--sweep-block-n {bad}: expected some of {list(BLOCK_N_CHOICES)}")
    for key, values in args.sweep_grid.items():
        if any(v < 1 for v in values):
            parser.error(f"--sweep {key} values must be positive, got {values}")
    if args.sweep_rep_ms < 1 or args.sweep_budget_s <= 0:
        parser.error("--sweep-rep-ms and --sweep-budget-s must be positive")
    args.part = "sweep"


# ------------------------------------------------------------------------------------------------------
# Timing and small helpers
# ------------------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable, device, rep_ms: int, warmup_ms: int = 25) -> float:
    """Median ms of ``fn()``: CUDA-event timings via triton.testing.do_bench on a GPU (L2 flushed between
    calls), a few perf_counter runs on the CPU (smoke runs only)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def wall_s(fn: Callable, device):
    """(seconds, result) of one synchronized call: first-call times, compilation included."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def rope_tables(positions: torch.Tensor, head_dim: int, dtype, theta: float = ROPE_THETA):
    """cos, sin (1, n, D) in ``dtype`` as Llama's rotary embedding gives them (rotate-half convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None].to(dtype), emb.sin()[None].to(dtype)


def reference_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 attention of one query per head against all keys: q (B, H_q, D) rotated, k/v (B, H_kv, S, D)
    -> (B, H_q, D). GQA by grouping the queries (no repeated K/V)."""
    B, H_q, D = q.shape
    H_kv = k.shape[1]
    qg = q.float().view(B, H_kv, H_q // H_kv, D)
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k.float()) * scale
    out = torch.einsum("bhgs,bhsd->bhgd", scores.softmax(dim=-1), v.float())
    return out.reshape(B, H_q, D)


def _gib(n_bytes) -> float | None:
    return None if n_bytes is None else n_bytes / 2**30


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _finite(obj):
    """JSON-safe copy: non-finite floats (an exact SQNR is inf) become None, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _k(n: int) -> str:
    return f"{n // K}k" if n % K == 0 else str(n)


# ------------------------------------------------------------------------------------------------------
# Part 1: one attention step
# ------------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    fn: Callable  # returns (B, H_q, D) output of the step, or None
    baseline: str  # the FA3 row this one is compared with
    note: str = ""


def fp8_sdpa_backends(device, smoke: bool, notes: list[str], wanted=("fa3", "triton")) -> list[str]:
    """Those of ``wanted`` that run here; the reference emulation only in the CPU smoke run."""
    if smoke:
        return ["reference"] if wanted else []
    from hf_fp8_attention.dispatch import check_backend

    usable = []
    for backend in wanted:
        try:
            check_backend(backend, device)
        except (ValueError, RuntimeError, ImportError) as err:
            notes.append(f"fp8_sdpa {backend}: not benchmarked ({type(err).__name__}: {err})")
            continue
        usable.append(backend)
    return usable


def fa3_available(device) -> bool:
    if torch.device(device).type != "cuda":
        return False
    from hf_fp8_attention.dispatch import kernel_available

    return kernel_available("fa3")


class AttentionShape:
    """Random decode data for one (B, S_kv, H_q, H_kv, D), every layout built once: q and the new token's
    k/v un-rotated (fp8 cache, FA3 with in-kernel RoPE) and rotated (FA3, fp8_sdpa); the rotated bf16 cache
    as a DynamicCache holds it (B, H_kv, S_kv, D) and as FA3 wants it ((B, S_kv + 1, H_kv, D), one free
    slot for the appended token); an FP8CacheLayer filled by ``append``."""

    def __init__(self, B, S, H_q, H_kv, D, device, seed, cache_impl, static=False):
        from hf_fp8_attention import FP8CacheLayer, FP8StaticCacheLayer
        from hf_fp8_attention.quantization.reference import apply_rope_reference

        self.B, self.S, self.H_q, self.H_kv, self.D, self.device = B, S, H_q, H_kv, D, device
        self.scale = D**-0.5
        dt = torch.bfloat16
        g = torch.Generator(device=device).manual_seed(seed)
        cos, sin = rope_tables(torch.arange(S + 1, device=device), D, dt)  # positions 0..S (S: the new token)
        self.cos_all, self.sin_all = cos, sin
        self.cos_q, self.sin_q = cos[:, S - 1 : S], sin[:, S - 1 : S]  # attend-only: the query is the last cached
        self.cos_new, self.sin_new = cos[:, S : S + 1], sin[:, S : S + 1]
        # q for both uses (positions S-1 and S), BSHD memory as a model's projection gives it
        self.q_raw = torch.randn(B, 1, H_q, D, device=device, dtype=dt, generator=g)
        self.q_rot = apply_rope_reference(self.q_raw.transpose(1, 2).float(), self.cos_q, self.sin_q).to(dt)  # (B,H,1,D)
        self.q_rot_new = apply_rope_reference(self.q_raw.transpose(1, 2).float(), self.cos_new, self.sin_new).to(dt)
        k_raw = torch.randn(B, H_kv, S, D, device=device, dtype=dt, generator=g)
        self.v = torch.randn(B, H_kv, S, D, device=device, dtype=dt, generator=g)
        self.k_new = torch.randn(B, H_kv, 1, D, device=device, dtype=dt, generator=g)
        self.v_new = torch.randn(B, H_kv, 1, D, device=device, dtype=dt, generator=g)
        self.k_new_rot = apply_rope_reference(self.k_new.float(), self.cos_new, self.sin_new).to(dt)
        # the bf16 cache (rotated keys) in the DynamicCache layout
        self.k = apply_rope_reference(k_raw.float(), cos[:, :S], sin[:, :S]).to(dt).contiguous()
        self.ref = reference_decode(self.q_rot[:, :, 0], self.k, self.v, self.scale)
        self.fa3_k = self.fa3_v = None
        self.layer = FP8CacheLayer(impl=cache_impl)
        self.fill_s, _ = wall_s(lambda: self.layer.append(k_raw, self.v, cos[:, :S], sin[:, :S]), device)
        self.static = None
        if static:  # the same tokens in a static layer with room for the step's token (same blocks, same codes)
            self.static = FP8StaticCacheLayer(S + 1, impl=cache_impl)
            self.static.append(k_raw, self.v, cos[:, :S], sin[:, :S])
            self.static_before = self.static.cumulative_length - 1  # attend-only: the query is the last cached
        # the attention launch's query as a decode step hands it over: with a rotating cache, the fp16 operand
        # and row descales the write launch prepares (RoPE, rotation, row scale; here by the torch
        # reference, the same values), else un-rotated with the rotary tables (RoPE in the attention kernel)
        # and, with a rotating cache, the length as the write launch stores it for the attention launch
        # (`FP8CacheLayer.append_attend`: the DEVICE_LEN build reads it; attend-only: the query is the last
        # cached, so the tokens before it are S - 1)
        self.dynamic_before = None
        if self.layer.rotate:
            from hf_fp8_attention.kv_cache import reference as cache_reference

            q_op, q_desc = cache_reference.prepare_queries(self.q_raw, self.cos_q, self.sin_q, rotate=True)
            self.attend_args, self.attend_descale = (q_op, None, None), q_desc
            self.dynamic_before = torch.full((), S - 1, dtype=torch.int64, device=device)
        else:
            self.attend_args, self.attend_descale = (self.q_raw, self.cos_q, self.sin_q), None

    def make_fa3_cache(self) -> None:
        B, S, H_kv, D = self.B, self.S, self.H_kv, self.D
        self.fa3_k = torch.zeros(B, S + 1, H_kv, D, device=self.device, dtype=torch.bfloat16)
        self.fa3_v = torch.zeros_like(self.fa3_k)
        self.fa3_k[:, :S] = self.k.transpose(1, 2)
        self.fa3_v[:, :S] = self.v.transpose(1, 2)
        self.seqlens = torch.full((B,), S, dtype=torch.int32, device=self.device)
        half = D // 2
        self.rot_cos = self.cos_all[0, :, :half].contiguous()  # (S + 1, D/2): FA3's rotary tables
        self.rot_sin = self.sin_all[0, :, :half].contiguous()


def _out(res) -> torch.Tensor:
    """FA3 builds differ in whether they return (out, softmax_lse) or out."""
    return res[0] if isinstance(res, tuple) else res


def attention_candidates(x: AttentionShape, backends: list[str], with_fa3: bool, notes: list[str],
                         cache_configs: list[str] = ()) -> list[Candidate]:
    from hf_fp8_attention import fp8_sdpa

    cands = []
    if with_fa3:
        from flash_attn_interface import flash_attn_with_kvcache

        x.make_fa3_cache()
        q_bshd = x.q_rot.transpose(1, 2)  # (B, 1, H_q, D)

        def fa3():
            return _out(flash_attn_with_kvcache(q_bshd, x.fa3_k, x.fa3_v, cache_seqlens=x.seqlens,
                                                softmax_scale=x.scale, causal=True))[:, 0]

        cands.append(Candidate(FA3_ROW, fa3, FA3_ROW))
        k_new_raw, v_new = x.k_new.transpose(1, 2), x.v_new.transpose(1, 2)  # (B, 1, H_kv, D)

        def fa3_step_rope():  # q, k un-rotated: the kernel rotates both at position cache_seqlens
            return _out(flash_attn_with_kvcache(x.q_raw, x.fa3_k, x.fa3_v, k=k_new_raw, v=v_new, rotary_cos=x.rot_cos,
                                                rotary_sin=x.rot_sin, rotary_interleaved=False,
                                                cache_seqlens=x.seqlens, softmax_scale=x.scale, causal=True))[:, 0]

        k_new_rot, q_new_rot = x.k_new_rot.transpose(1, 2), x.q_rot_new.transpose(1, 2)

        def fa3_step_plain():  # rotated outside (not timed), as transformers does it
            return _out(flash_attn_with_kvcache(q_new_rot, x.fa3_k, x.fa3_v, k=k_new_rot, v=v_new,
                                                cache_seqlens=x.seqlens, softmax_scale=x.scale, causal=True))[:, 0]

        try:
            fa3_step_rope()
            cands.append(Candidate(FA3_STEP_ROW, fa3_step_rope, FA3_STEP_ROW, "RoPE in the kernel"))
        except Exception as err:  # a wheel built without rotary/append-KV support
            notes.append(f"FA3 append+attend with rotary tables failed ({type(err).__name__}: {err}); "
                         "timed without RoPE (q and k rotated outside the timing)")
            cands.append(Candidate(FA3_STEP_ROW, fa3_step_plain, FA3_STEP_ROW, "RoPE outside, not timed"))
    for backend in backends:
        def run(backend=backend):
            return fp8_sdpa(x.q_rot, x.k, x.v, is_causal=True, backend=backend)[:, :, 0]

        cands.append(Candidate(f"fp8_sdpa {backend} (bf16 cache)", run, FA3_ROW))
    layer = x.layer
    q = x.q_raw

    def attend():
        return cache_attend(x)

    def step():
        out = layer.append_attend(q, x.k_new, x.v_new, x.cos_new, x.sin_new, scale=x.scale)
        layer.crop(-1)
        return out[:, 0]

    cands.append(Candidate(CACHE_ROW, attend, FA3_ROW))
    cands.append(Candidate(CACHE_STEP_ROW, step, FA3_STEP_ROW))
    if x.static is not None:
        st = x.static

        def static_step():  # the length put back on the device (capturable), not by crop (a host read)
            out = st.append_attend(q, x.k_new, x.v_new, x.cos_new, x.sin_new, scale=x.scale)
            st.cumulative_length.sub_(1)
            return out[:, 0]

        cands.append(Candidate(STATIC_ROW, lambda: cache_attend(x, static=True), FA3_ROW,
                               "the static layer's default"))
        cands.append(Candidate(STATIC_TMA_ROW, lambda: cache_attend(x, {"tma": True}, static=True), FA3_ROW,
                               "K/V by TMA where the GPU has it (sm_90+)"))
        cands.append(Candidate(STATIC_STEP_ROW, static_step, FA3_STEP_ROW,
                               "write + attend + length update, then one length decrement (a 1-thread kernel)"))
    presets = cache_config_presets()
    for name in cache_configs:
        cands.append(Candidate(f"{CACHE_ROW} [{name}]", cache_config_fn(x, presets[name]), FA3_ROW,
                               config_name(presets[name])))
    return cands


def cache_config_presets() -> dict:
    """`kv_cache.ops.DECODE_PRESETS`, plus each with fused_combine ("NAME fused") and the default with it
    ("fused": one launch, the last split program of a row tile merges the splits)."""
    from hf_fp8_attention.kv_cache.ops import DECODE_PRESETS

    presets = dict(DECODE_PRESETS)
    presets.update({f"{n} fused": {**c, "fused_combine": True} for n, c in DECODE_PRESETS.items()
                    if "fused_combine" not in c})
    presets["fused"] = {"fused_combine": True}
    presets[JIT_PRESET] = {}  # the default config, every kernel launched through Triton's JIT (`direct_launches`)
    return presets


# The preset that turns the decode kernels' direct launches off (`hf_fp8_attention._launch`): the host time
# those save shows as the difference to the default row.
JIT_PRESET = "jit launches"


direct_launches = _common.direct_launches


# the config keys that must not change a bit of the output (kv_cache.ops.cache_attention's docstring; widen_v
# keeps the operand values but the H200's P.V dot may sum them differently in the last bit)
BIT_NEUTRAL_KEYS = ("prefetch_desc",)


def cache_config_fn(x: AttentionShape, config: dict, num_splits: int | None = None) -> Callable:
    """The fp8 cache attend of ``x`` (its layer's cache, q un-rotated + RoPE tables) with a kernel config
    (and a forced split count)."""
    return lambda: cache_attend(x, config, num_splits)


def cache_attend(x, config=None, num_splits=None, static=False):
    """The attention launch of a decode step from the FP8 cache (`AttentionShape.attend_args`), -> (B, H_q, D),
    as `FP8CacheLayer.append_attend` launches it (with a rotating cache: the length read on the device, its
    split count planned from the host length). ``static``: from the static layer of ``x`` (`FP8StaticCacheLayer`'s
    launch, its split count planned from the capacity)."""
    from hf_fp8_attention.kv_cache import ops

    layer = x.static if static else x.layer
    if static:
        length, device_length = layer.k8.shape[2], x.static_before
    else:  # as the decode step: the device length where `FP8CacheLayer.DEVICE_LENGTH` has it read
        length, device_length = layer.length, (x.dynamic_before if type(layer).DEVICE_LENGTH else None)
    return ops.cache_attention(*x.attend_args, layer.k8, layer.k_desc, layer.v8, layer.v_desc, length,
                               scale=x.scale, impl=layer.impl, config=config, num_splits=num_splits, rotate=False,
                               out_dtype=torch.bfloat16, q_descale=x.attend_descale,
                               device_length=device_length, static=static)[:, 0]


def same_bits_without_neutral_keys(x: AttentionShape, config: dict) -> bool | None:
    """Whether ``config``'s output equals that of ``config`` less `BIT_NEUTRAL_KEYS` (None: none to drop)."""
    plain = {k: v for k, v in config.items() if k not in BIT_NEUTRAL_KEYS}
    if plain == config:
        return None
    # one split count for both (the default's follows each compiled variant's residency)
    return bool(torch.equal(cache_config_fn(x, config, 8)(), cache_config_fn(x, plain, 8)()))


def first_calls(x: AttentionShape) -> dict:
    """Wall times of the fp8 cache's first decode step at this length (``append_attend``, S_kv -> S_kv + 1:
    its first call compiles), the step at a second new length (S_kv + 2), and a plain one-token append; the
    layer is cropped back to S_kv after."""
    layer, dev = x.layer, x.device

    def step():
        return layer.append_attend(x.q_raw, x.k_new, x.v_new, x.cos_new, x.sin_new, scale=x.scale)

    first, _ = wall_s(step, dev)
    second, _ = wall_s(step, dev)
    append, _ = wall_s(lambda: layer.append(x.k_new, x.v_new, x.cos_new, x.sin_new), dev)
    layer.crop(-3)
    return {"fill_s": x.fill_s, "first_attend_s": first, "first_append_s": append, "second_length_attend_s": second}


def time_row(row: dict, fn: Callable, device, graph: bool, rep_ms: int, notes: list[str], label: str) -> float:
    """One timing of a row's call: GPU time from CUDA-graph replays when ``graph`` and the call captures
    (row["timing"] "graph"), else eager do_bench. A row that fails to capture is timed eagerly from then
    on, its graph timings dropped, and the notes say why."""
    if graph and row.get("timing") != "eager":
        try:
            ms = _common.graph_ms(fn, device)
            row["timing"] = "graph"
            return ms
        except _common.GraphCaptureError as err:
            row["ms_rounds"].clear()  # in place: the caller appends to this list
            notes.append(f"{label}: not capturable in a CUDA graph ({str(err)[:160]}): eager timing")
    row["timing"] = "eager"
    return time_ms(fn, device, rep_ms)


def run_attention(args, notes: list[str]) -> list[dict]:
    from hf_fp8_attention.metrics import sqnr_db

    device = torch.device(args.device)
    backends = fp8_sdpa_backends(device, args.cpu_smoke, notes, args.sdpa_backends)
    with_fa3 = fa3_available(device)
    if not with_fa3:
        notes.append("FA3 bf16: flash_attn_interface (tokenspeed-fa3 wheel) not importable or no CUDA: column "
                     "skipped, no ratios")
    cache_impl = "torch" if args.cpu_smoke else None  # None: the layer picks (triton on SM 8.9+)
    rows = []
    total = len(args.gqa) * len(args.head_dims) * len(args.shapes)
    done = 0
    for H_q, H_kv in args.gqa:
        for D in args.head_dims:
            for B, S in args.shapes:
                done += 1
                tag = f"H {H_q}/{H_kv} D {D} {B}x{_k(S)}"
                print(f"# [{done}/{total}] attention {tag} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                x = None
                try:
                    x = AttentionShape(B, S, H_q, H_kv, D, device, args.seed + S + B, cache_impl,
                                       static=args.static is not None)
                    firsts = first_calls(x)
                    cands = attention_candidates(x, backends, with_fa3, notes, args.cache_configs)
                except Exception as err:  # OOM, or the fp8 cache failing at this shape: say so, next shape
                    why = "OOM" if isinstance(err, torch.OutOfMemoryError) else f"{type(err).__name__}: {err}"
                    notes.append(f"{tag}: not measured (setting up the inputs / the fp8 cache's first calls: {why})")
                    print(f"# {tag}: {why}", file=sys.stderr)
                    x = None  # frees the inputs
                    _free(device)
                    continue
                shape_rows = {}
                for cand in cands:  # first calls and accuracy
                    row = dict(H_q=H_q, H_kv=H_kv, D=D, B=B, S_kv=S, impl=cand.name, baseline=cand.baseline,
                               note=cand.note, ms=None, ms_rounds=[], first_call_ms=None, sqnr_db=None, vs_fa3=None,
                               error=None)
                    try:
                        first, out = wall_s(cand.fn, device)
                        row["first_call_ms"] = first * 1e3
                        if out is not None and cand.name not in STEP_ROWS:
                            row["sqnr_db"] = sqnr_db(out.float(), x.ref)
                    except Exception as err:  # one implementation failing at one shape: report, keep going
                        row["error"] = f"{type(err).__name__}: {err}"
                        print(f"# {tag} {cand.name}: {row['error']}", file=sys.stderr)
                    if cand.name == CACHE_ROW:
                        row.update(firsts)
                    if cand.name.startswith(CACHE_ROW + " [") and row["error"] is None:
                        cfg = cache_config_presets()[cand.name[len(CACHE_ROW) + 2 : -1]]
                        try:
                            row["same_bits"] = same_bits_without_neutral_keys(x, cfg)
                        except Exception as err:
                            row["same_bits"] = f"{type(err).__name__}: {err}"
                        if row["same_bits"] is False:
                            notes.append(f"{tag} {cand.name}: output differs from the same config without "
                                         f"{BIT_NEUTRAL_KEYS}: a kernel bug (they must not move a bit)")
                    shape_rows[cand.name] = row
                # Every implementation timed in each round, the best round's median kept: a row timed first
                # after the shape's setup (GPU clocks still ramping) is not penalised.
                graph = args.timing == "graph" and device.type == "cuda"
                for _ in range(args.rounds):
                    for cand in cands:
                        row = shape_rows[cand.name]
                        if row["error"] is None:
                            try:
                                row["ms_rounds"].append(time_row(row, cand.fn, device, graph, args.rep_ms, notes,
                                                                 f"{tag} {cand.name}"))
                            except Exception as err:
                                row["error"] = f"{type(err).__name__}: {err}"
                                print(f"# {tag} {cand.name}: {row['error']}", file=sys.stderr)
                times = {}
                for name, row in shape_rows.items():
                    if row["error"] is None and row["ms_rounds"]:
                        row["ms"] = times[name] = min(row["ms_rounds"])
                for row in shape_rows.values():
                    base = times.get(row["baseline"])
                    row["vs_fa3"] = base / row["ms"] if base and row["ms"] else None
                rows.extend(shape_rows.values())
                steady = times.get(CACHE_ROW)
                second = firsts["second_length_attend_s"] * 1e3
                # CPU smoke timings are noise: the flag is for GPU runs
                flag = device.type == "cuda" and steady is not None and second > max(50.0, 20 * steady)
                cache_row = shape_rows[CACHE_ROW]
                cache_row["recompiled_at_second_length"] = flag
                if flag:
                    notes.append(f"{tag}: fp8 cache attend at a second new length took {second:.1f} ms vs "
                                 f"{steady:.3f} ms steady: recompiled for the new length?")
                print(f"#   done in {time.perf_counter() - t0:.1f} s: " + ", ".join(
                    f"{n} {_common.fmt(t, '.3f')} ms" for n, t in times.items()), file=sys.stderr, flush=True)
                del x, cands
                _free(device)
    return rows


def _cell(ms, ratio) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" + ("" if ratio is None else f" ({ratio:.2f}x)")


def attention_table(rows: list[dict]) -> str:
    """One line per shape: FA3 bf16 ms, each fp8 row's ms (ratio vs its FA3 row), first calls, SQNR."""
    shapes: dict = {}
    for r in rows:
        shapes.setdefault((r["H_q"], r["H_kv"], r["D"], r["B"], r["S_kv"]), {})[r["impl"]] = r
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    headers = ["H_q/H_kv", "D", "B x S_kv", *(f"{i} ms" for i in impls), "fp8 cache first call s",
               "2nd new length ms", "SQNR dB fp8 cache / fp8_sdpa / FA3"]
    out = []
    for (hq, hkv, d, b, s), by in shapes.items():
        cells = [_cell(by[i]["ms"], by[i]["vs_fa3"] if i not in (FA3_ROW, FA3_STEP_ROW) else None) if i in by
                 else "-" for i in impls]
        c = by.get(CACHE_ROW, {})
        sq = [by.get(n, {}).get("sqnr_db") for n in
              (CACHE_ROW, next((i for i in impls if i.startswith("fp8_sdpa")), None), FA3_ROW)]
        out.append([f"{hq}/{hkv}", d, f"{b}x{_k(s)}", *cells, _common.fmt(c.get("first_attend_s"), ".2f"),
                    _common.fmt(None if c.get("second_length_attend_s") is None else c["second_length_attend_s"] * 1e3,
                                ".2f") + (" (recompiled?)" if c.get("recompiled_at_second_length") else ""),
                    " / ".join(_common.fmt(v, ".1f") for v in sq)])
    return _common.markdown_table(headers, out)


# ------------------------------------------------------------------------------------------------------
# --sweep: fp8 cache kernel configs
# ------------------------------------------------------------------------------------------------------


def fast_keys(block_n: int) -> dict:
    """The speed keys for a grid config (prefetch_desc needs block_n 64)."""
    keys = dict(widen_v=True, exact_waves=True, wide_combine=True)
    if block_n == 64:
        keys["prefetch_desc"] = True
    return keys


def sweep_configs(grid: dict, fast: str = "off") -> list[dict]:
    """The grid's configs; block_n > 64 both with one-block softmax steps and with tile_softmax. Those
    sharing a compiled variant are adjacent (programs_per_sm innermost), num_warps outermost: a run cut by
    the time budget loses the last warps value for every block_n, not a whole block_n. fast: "off", "on"
    (each config with `fast_keys`) or "both" (each without, then with)."""
    configs = []
    for warps in grid["num_warps"]:
        for stages in grid["num_stages"]:
            for block_n in grid["block_n"]:
                for tile in ([False, True] if block_n > 64 else [False]):
                    for per_sm in grid["programs_per_sm"]:
                        base = dict(block_n=block_n, tile_softmax=tile, num_warps=warps, num_stages=stages,
                                    programs_per_sm=per_sm, widen_v=False, wide_combine=False,
                                    prefetch_desc=False, fused_combine=False)
                        if fast in ("off", "both"):
                            configs.append(base)
                        if fast in ("on", "both"):
                            configs.append({**base, **fast_keys(block_n)})
    return configs


def config_name(config: dict) -> str:
    """{} -> "default"; else e.g. "n128 tile w4 s3 p8 fused" (block_n, softmax per tile, warps, stages,
    programs per SM, combine: "fused" (True) / "unfused" (False) / nothing for the default "auto"; "tma",
    "pdl" or "no-tma", "no-pdl" where they differ from the launcher's defaults), the keys left out taking
    cache_attention's defaults."""
    parts = [] if "block_n" not in config else [f"n{config['block_n']}"]
    if config.get("tile_softmax"):
        parts.append("tile")
    parts += [f"{tag}{config[key]}" for tag, key in (("w", "num_warps"), ("s", "num_stages"),
                                                      ("p", "programs_per_sm")) if key in config]
    if not parts:
        parts.append("default")
    from hf_fp8_attention.kv_cache.ops import PDL_DEFAULT, TMA_DEFAULT

    fused = config.get("fused_combine", "auto")  # the launcher's default: "auto", untagged
    if fused is True:
        parts.append("fused")
    elif fused is False:
        parts.append("unfused")
    for key, default in (("tma", TMA_DEFAULT), ("pdl", PDL_DEFAULT)):  # tagged where they differ from it
        if key in config and bool(config[key]) != default:
            parts.append(key if config[key] else f"no-{key}")
    speed = [tag for tag, key in (("widen", "widen_v"), ("pf", "prefetch_desc"), ("waves", "exact_waves"),
                                  ("wide", "wide_combine")) if config.get(key)]
    if speed:
        parts.append("fast" if len(speed) == 4 or (len(speed) == 3 and "pf" not in speed) else "+".join(speed))
    return " ".join(parts)


def cache_bytes_read(B: int, S: int, H_kv: int, D: int) -> int:
    """Bytes of the fp8 cache one decode step reads: K and V codes and their block descales."""
    from hf_fp8_attention._constants import KV_BLOCK

    return 2 * B * H_kv * (S * D + math.ceil(S / KV_BLOCK) * 4)


def _error_text(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 300 else text[:297] + "..."


def run_sweep(args, notes: list[str]) -> dict:
    """Grid pass (every config at every shape, short windows), then the best per shape re-timed."""
    from hf_fp8_attention.kv_cache import ops
    from hf_fp8_attention.metrics import sqnr_db

    device = torch.device(args.device)
    (H_q, H_kv), D = args.gqa[0], args.head_dims[0]
    with_fa3 = fa3_available(device)
    if not with_fa3:
        notes.append("FA3 bf16: flash_attn_interface not importable or no CUDA: no FA3 column, no ratios")
    shapes = []
    for B, S in args.shapes:
        x = AttentionShape(B, S, H_q, H_kv, D, device, args.seed + S + B, "torch" if args.cpu_smoke else None)
        fa3 = None
        if with_fa3:
            fa3 = next(c.fn for c in attention_candidates(x, [], True, notes) if c.name == FA3_ROW)
        shapes.append(dict(B=B, S=S, x=x, fa3=fa3, tag=f"{B}x{_k(S)}"))

    def step(x, config):
        return lambda: cache_attend(x, config)

    def measure(sh, config, rep_ms, warmup_ms):
        """(ms, sqnr) of one config at one shape; raises what the kernel raises."""
        fn = step(sh["x"], config)
        out = fn()
        _sync(device)
        return time_ms(fn, device, rep_ms, warmup_ms), sqnr_db(out.float(), sh["x"].ref)

    rows: list[dict] = []
    failed: dict = {}  # compiled variant -> error: not retried at other shapes
    t0 = time.perf_counter()
    configs = [{}] + sweep_configs(args.sweep_grid, args.sweep_fast)
    skipped = 0
    for i, config in enumerate(configs):
        if i and time.perf_counter() - t0 > args.sweep_budget_s:
            skipped = len(configs) - i
            notes.append(f"sweep budget of {args.sweep_budget_s:.0f} s reached: {skipped} of {len(configs)} "
                         f"configs not timed (from {config_name(config)} on)")
            break
        variant = tuple(config.get(k) for k in ("block_n", "tile_softmax", "num_warps", "num_stages", "widen_v",
                                                 "prefetch_desc"))
        for sh in shapes:
            row = dict(shape=sh["tag"], B=sh["B"], S_kv=sh["S"], config=config, name=config_name(config), ms=None,
                       sqnr_db=None, error=failed.get(variant))
            if row["error"] is None:
                try:
                    row["ms"], row["sqnr_db"] = measure(sh, config, args.sweep_rep_ms, 5)
                except Exception as err:  # a config that does not compile or run: recorded, skipped
                    row["error"] = _error_text(err)
                    if config:
                        failed[variant] = row["error"]
                    print(f"# sweep {sh['tag']} {row['name']}: {row['error']}", file=sys.stderr, flush=True)
            rows.append(row)
        if i % 10 == 0:
            print(f"# sweep [{i + 1}/{len(configs)}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    grid_s = time.perf_counter() - t0

    # re-timing: per shape the SWEEP_TOP best accurate configs and the default, each with and without
    # fused_combine, and FA3, in two interleaved rounds with longer windows; the best round kept
    final = []
    for sh in shapes:
        mine = [r for r in rows if r["shape"] == sh["tag"]]
        default = next(r for r in mine if not r["config"])
        floor = default["sqnr_db"] - 3.0 if default["sqnr_db"] is not None else -math.inf
        for r in mine:
            r["accurate"] = r["ms"] is not None and r["sqnr_db"] is not None and r["sqnr_db"] >= floor
        ranked = sorted((r for r in mine if r["accurate"] and r["config"]), key=lambda r: r["ms"])
        candidates = [{}] + [r["config"] for r in ranked[:SWEEP_TOP]]
        candidates += [{**c, "fused_combine": True} for c in list(candidates)]
        names = {config_name(c) for c in candidates}
        if not args.cpu_smoke:  # the presets' own rows (the smoke run checks the script, not speed)
            candidates += [c for c in ops.DECODE_PRESETS.values() if config_name(c) not in names]
        timed = {config_name(c): dict(config=c, ms_rounds=[], sqnr_db=None, error=None) for c in candidates}
        fa3_rounds = []
        for _ in range(1 if args.cpu_smoke else 2):
            if sh["fa3"] is not None:
                fa3_rounds.append(time_ms(sh["fa3"], device, 4 * args.sweep_rep_ms, 10))
            for name, t in timed.items():
                if t["error"] is None:
                    try:
                        ms, t["sqnr_db"] = measure(sh, t["config"], 4 * args.sweep_rep_ms, 10)
                        t["ms_rounds"].append(ms)
                    except Exception as err:
                        t["error"] = _error_text(err)
        for name, t in timed.items():
            t["ms"] = min(t["ms_rounds"]) if t["ms_rounds"] else None
            t["accurate"] = t["ms"] is not None and t["sqnr_db"] is not None and t["sqnr_db"] >= floor
        ok = {n: t for n, t in timed.items() if t["accurate"]}
        best_name = min(ok, key=lambda n: ok[n]["ms"]) if ok else None
        fa3_ms = min(fa3_rounds) if fa3_rounds else None
        nbytes = cache_bytes_read(sh["B"], sh["S"], H_kv, D)
        best, dflt = timed.get(best_name), timed["default"]

        def tbps(ms):
            return nbytes / (ms * 1e-3) / 1e12 if ms else None

        final.append(dict(
            shape=sh["tag"], B=sh["B"], S_kv=sh["S"], bytes=nbytes, fa3_ms=fa3_ms,
            best=best_name, best_config=best["config"] if best else None, best_ms=best["ms"] if best else None,
            default_ms=dflt["ms"], best_tbps=tbps(best["ms"] if best else None), default_tbps=tbps(dflt["ms"]),
            best_vs_fa3=best["ms"] / fa3_ms if best and fa3_ms else None,
            default_vs_fa3=dflt["ms"] / fa3_ms if dflt["ms"] and fa3_ms else None,
            best_sqnr_db=best["sqnr_db"] if best else None, default_sqnr_db=dflt["sqnr_db"],
            inaccurate=sorted(r["name"] for r in mine if r["ms"] is not None and not r["accurate"]),
            retimed={n: {k: v for k, v in t.items() if k != "config"} for n, t in timed.items()},
        ))

    # one config for every shape: the smallest geometric mean of ms / the shape's best in the grid pass
    by_name: dict = {}
    for r in rows:
        if r["config"] and r.get("accurate"):
            by_name.setdefault(r["name"], {})[r["shape"]] = r["ms"]
    best_ms = {sh["tag"]: min((v[sh["tag"]] for v in by_name.values() if sh["tag"] in v), default=None)
               for sh in shapes}
    overall = None
    complete = {n: v for n, v in by_name.items() if len(v) == len(shapes)}
    if complete:
        def score(n):
            return math.exp(statistics.fmean(math.log(complete[n][t] / best_ms[t]) for t in complete[n]))

        name = min(complete, key=score)
        overall = dict(name=name, geomean_vs_best=score(name), ms=complete[name])
    return dict(gqa=[H_q, H_kv], head_dim=D, grid=args.sweep_grid, configs=len(configs), skipped=skipped,
                grid_seconds=grid_s, seconds=time.perf_counter() - t0, best=final, overall=overall,
                failed={" ".join(map(str, k)): v for k, v in failed.items()}, rows=rows)


def sweep_table(result: dict) -> str:
    headers = ["B x S_kv", "best config", "best ms", "default ms", "FA3 bf16 ms", "best / FA3", "default / FA3",
               "best TB/s", "default TB/s", "SQNR dB best / default"]
    out = []
    for r in result["best"]:
        ratio = [None if v is None else f"{v:.2f}x" for v in (r["best_vs_fa3"], r["default_vs_fa3"])]
        out.append([r["shape"], r["best"] or "-", _common.fmt(r["best_ms"], ".4f"), _common.fmt(r["default_ms"], ".4f"),
                    _common.fmt(r["fa3_ms"], ".4f"), ratio[0] or "-", ratio[1] or "-",
                    _common.fmt(r["best_tbps"], ".2f"), _common.fmt(r["default_tbps"], ".2f"),
                    f"{_common.fmt(r['best_sqnr_db'], '.1f')} / {_common.fmt(r['default_sqnr_db'], '.1f')}"])
    return _common.markdown_table(headers, out)


# ------------------------------------------------------------------------------------------------------
# Part 2: generate
# ------------------------------------------------------------------------------------------------------


def fa3_kvcache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """AttentionInterface function: FA3 bf16 with a DynamicCache. A first chunk (as many keys as queries) runs
    `benchmark_model.fa3_bf16_attention` (``flash_attn_func``, causal); later calls (decode: fewer queries
    than keys) ``flash_attn_with_kvcache`` on BSHD views of the cache's (B, H_kv, S_kv, D) tensors (no copy;
    FA3 takes any strides with a unit last one), bottom-right causal, FA3's split-KV heuristic on."""
    if query.shape[2] == key.shape[2]:
        return bm.fa3_bf16_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    from flash_attn_interface import flash_attn_with_kvcache

    if attention_mask is not None:
        raise ValueError(f"{FA3_DECODE} (benchmark only) takes no padding mask")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = flash_attn_with_kvcache(q, k, v, softmax_scale=scaling, causal=True)
    return (out[0] if isinstance(out, tuple) else out), None


def register_fa3_kvcache() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(FA3_DECODE, fa3_kvcache_attention)
    AttentionMaskInterface.register(FA3_DECODE, flash_attention_mask)


def bf16_attention(choice: str, device, notes: list[str]) -> tuple[str, str]:
    """(attn_implementation, label) of the bf16 mode."""
    if choice in ("auto", "fa3"):
        if fa3_available(device):
            register_fa3_kvcache()
            return FA3_DECODE, "bf16 FA3 + bf16 cache"
        why = "flash_attn_interface (tokenspeed-fa3) not importable" if device.type == "cuda" else "no CUDA"
        notes.append(f"bf16 mode: FA3 unavailable ({why}); runs transformers' sdpa instead")
        return "sdpa", "bf16 sdpa + bf16 cache"
    if choice == "flash_attention_3":
        from transformers.utils import is_flash_attn_3_available

        if not is_flash_attn_3_available():
            notes.append("bf16 mode: transformers' flash_attention_3 refuses this FA3 install "
                         "(is_flash_attn_3_available() is False); runs sdpa instead")
            return "sdpa", "bf16 sdpa + bf16 cache"
        return "flash_attention_3", "bf16 flash_attention_3 + bf16 cache"
    return "sdpa", "bf16 sdpa + bf16 cache"


def switch_mode(model, mode: str, bf16_name: str, fp8_backend: str | None) -> str:
    import hf_fp8_attention as hfa

    if mode == "bf16":
        hfa.unprepare_model(model)
        model.set_attn_implementation(bf16_name)
        return f"{bf16_name} (no fp8)"
    hfa.prepare_model(model, backend=fp8_backend, kv_cache=KV_CACHE_OF_MODE[mode])
    return hfa.describe_backend(model)


def cache_of(output):
    """The cache generate returned (``cache`` in transformers 5.24, ``past_key_values`` before)."""
    keys = output.keys()
    return output["cache"] if "cache" in keys else output.get("past_key_values")


def cache_bytes(cache) -> int | None:
    """`FP8Cache.memory_bytes()`, or the bytes of a DynamicCache's keys and values."""
    if cache is None:
        return None
    if hasattr(cache, "memory_bytes"):
        return cache.memory_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def cache_config_override(config: dict | None):
    """Inside: every `kv_cache.ops.cache_attention` call (the FP8 cache's) runs with ``config`` under the
    call's own config keys (None: unchanged)."""
    if config is None:
        yield
        return
    from hf_fp8_attention.kv_cache import ops

    real = ops.cache_attention

    def with_config(*args, **kwargs):
        kwargs["config"] = {**config, **(kwargs.get("config") or {})}
        return real(*args, **kwargs)

    ops.cache_attention = with_config
    try:
        yield
    finally:
        ops.cache_attention = real


@contextlib.contextmanager
def count_cache_calls():
    """Counts `FP8CacheLayer.attend` (the fused fast path) and `FP8CacheLayer.update` (transformers' generic
    path, the whole cache dequantized per call) while the block runs; the methods are restored after."""
    from hf_fp8_attention import FP8CacheLayer

    counts = {"attend": 0, "update": 0}
    saved = {name: FP8CacheLayer.__dict__[name] for name in counts}

    def counting(name):
        def wrapper(self, *a, **kw):
            counts[name] += 1
            return saved[name](self, *a, **kw)

        return wrapper

    for name in counts:
        setattr(FP8CacheLayer, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(FP8CacheLayer, name, fn)


def _step_clock(device):
    """A logits processor recording when generate reaches each sampling step; the first call (the prefill's
    logits) synchronizes the device, so the prefill time is the GPU's."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            if not self.times:
                _sync(device)
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


@torch.inference_mode()
def timed_generate(model, ids: torch.Tensor, new_tokens: int, *, measure: bool = True, static: bool = False) -> dict:
    """One greedy generate of ``new_tokens``; static: with cache_implementation="static" (on a GPU,
    transformers compiles the decode step: torch.compile, mode "reduce-overhead", CUDA graphs)."""
    from transformers import LogitsProcessorList

    device = ids.device
    clock = _step_clock(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, use_cache=True, pad_token_id=0, return_dict_in_generate=True,
                  logits_processor=LogitsProcessorList([clock]))
    if static:
        kwargs["cache_implementation"] = "static"
    if device.type == "cuda" and measure:
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    _sync(device)
    end = time.perf_counter()
    cache = cache_of(out)
    steps = len(clock.times) - 1
    result = {
        "new_tokens": out["sequences"].shape[1] - ids.shape[1],
        "prefill_s": clock.times[0] - start,
        "decode_steps": steps,
        "decode_ms_per_token": (end - clock.times[0]) / steps * 1e3 if steps > 0 else None,
        # the median step: a one-off stall (a CUDA-graph recording) moves the mean, not this
        "decode_ms_median": statistics.median(b - a for a, b in zip(clock.times, clock.times[1:])) * 1e3
        if steps > 1 else None,
        "total_s": end - start,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "cache_gib": _gib(cache_bytes(cache)),
        "cache_type": type(cache).__name__,
        "cache_tokens": int(cache.get_seq_length()) if cache is not None else None,  # a tensor for static caches
    }
    del out, cache
    return result


def timed_mode(model, row: dict, ids, warm_ids, rnd: int, args, bf16_name: str, notes: list[str], device) -> None:
    """One timed generate of ``row``'s mode (its untimed warm-up generate first in round 0), appended to
    row["rounds"]; an error (OOM, anything else) is kept in the row, which later rounds then skip."""
    B, P, mode, preset, static = row["B"], row["prompt"], row["mode"], row["cache_preset"], row.get("static", False)
    tag = f" round {rnd + 1}/{args.generate_rounds}" if args.generate_rounds > 1 else ""
    print(f"# generate B={B} prompt={_k(P)} {row['label']}{tag} ...", file=sys.stderr, flush=True)
    try:
        row["attention"] = switch_mode(model, mode, args.static_bf16_attn if static else bf16_name, args.fp8_backend)
        with count_cache_calls() as calls, cache_config_override(cache_config_presets().get(preset)), \
                direct_launches(preset != JIT_PRESET):
            if rnd == 0:
                # static: the timed shapes (the cache length is the prompt plus the new tokens, and generate
                # compiles the decode step for it; the warm-up takes the compile and the graph recording)
                t_warm = time.perf_counter()
                if static:
                    timed_generate(model, ids, args.new_tokens, measure=False, static=True)
                else:
                    timed_generate(model, warm_ids, 3, measure=False)
                row["warmup_s"] = time.perf_counter() - t_warm
                _free(device)
            calls.update(attend=0, update=0)
            run = timed_generate(model, ids, args.new_tokens, static=static)
        if mode == "fp8_cache":
            run["fp8_cache_calls"] = dict(calls)
            if calls["update"] and rnd == 0:
                notes.append(f"B={B} prompt={_k(P)} fp8 cache: {calls['update']} calls took "
                             "transformers' generic path (whole cache dequantized per call)")
        row["rounds"].append(run)
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as err:  # one mode failing at one shape: report and keep going
        row["error"] = f"{type(err).__name__}: {err}"
        print(f"# {row['error']}", file=sys.stderr)
    _free(device)
    if row["error"] is None:
        run = row["rounds"][-1]
        print(f"#   prefill {run['prefill_s']:.3f} s, decode {run['decode_ms_per_token']:.2f} ms/token "
              f"(median step {_common.fmt(run.get('decode_ms_median'), '.2f')}), "
              f"peak {_common.fmt(run['peak_gib'], '.1f')} GiB, cache {_common.fmt(run['cache_gib'], '.3g')} GiB "
              f"({run['cache_type']})", file=sys.stderr, flush=True)


_ROUND_MEDIANS = ("prefill_s", "decode_ms_per_token", "decode_ms_median", "total_s")


def summarize_rounds(row: dict) -> None:
    """The row's reported values from its rounds: the median of each timed quantity (each on its own), the
    largest peak memory, the rest (cache size, type, counts) from the last round. A row with an error (in
    any round) reports only the error; the rounds before it stay in row["rounds"]."""
    runs = row["rounds"]
    if not runs or row["error"] is not None:
        return
    row.update({k: v for k, v in runs[-1].items()})
    for key in _ROUND_MEDIANS:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    peaks = [r["peak_gib"] for r in runs if r.get("peak_gib") is not None]
    row["peak_gib"] = max(peaks) if peaks else None


def run_generate(args, notes: list[str]) -> list[dict]:
    from transformers.utils import logging as hf_logging

    import hf_fp8_attention as hfa

    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    bf16_name, bf16_label = bf16_attention(args.bf16_attn, device, notes)
    labels = {"bf16": bf16_label, "fp8_bf16_cache": "fp8 attention + bf16 cache",
              "fp8_cache": "fp8 attention + fp8 cache"}
    from hf_fp8_attention import dispatch

    describe_dispatch = getattr(dispatch, "describe_dispatch", None)  # the speed table's one-line summary
    if describe_dispatch is not None and args.fp8_backend is None:
        notes.append(f"fp8 modes, auto backend: {describe_dispatch(device)}")
    config = bm.build_config(tiny=args.cpu_smoke, layers=args.layers)
    config.use_cache = True
    t0 = time.perf_counter()
    model = bm.build_model(config, device, torch.bfloat16, seed=args.seed)  # allocated and filled on the device
    model.generation_config.use_cache = True
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# generate: Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, heads "
          f"{config.num_attention_heads}/{config.num_key_value_heads}, head_dim {config.head_dim}, "
          f"{n_params / 1e9:.2f} B params, built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for B in args.batches:
        for P in args.prompts:
            gen = torch.Generator(device=device).manual_seed(args.seed + B * P)
            ids = torch.randint(3, config.vocab_size, (B, P), device=device, generator=gen)
            warm_ids = ids if args.warmup == "full" else ids[:, : min(P, WARMUP_PROMPT)]
            runs = [(m, None, False) for m in args.modes] + [("fp8_cache", n, False) for n in args.generate_cache_presets]
            if args.static == "only":
                runs = []
            if args.static:  # transformers' compiled recipe: its StaticCache (bf16) vs the FP8StaticCache
                runs += [(m, None, True) for m in ("bf16", "fp8_cache") if m in args.modes]
            shape_rows = []
            for mode, preset, static in runs:
                label = (f"{args.static_bf16_attn} (no fp8)" if static and mode == "bf16" else labels[mode])
                label += (f" [{preset}]" if preset else "") + (", static cache, compiled" if static else "")
                shape_rows.append({"B": B, "prompt": P, "mode": mode, "label": label, "attention": None,
                                   "error": None, "cache_preset": preset, "static": static, "rounds": []})
            for rnd in range(args.generate_rounds):
                # every other round in reverse (a b, b a, a b, ...): a drift within a round does not favour
                # one mode every time
                for row in shape_rows if rnd % 2 == 0 else shape_rows[::-1]:
                    if row["error"] is None:
                        timed_mode(model, row, ids, warm_ids, rnd, args, bf16_name, notes, device)
            for row in shape_rows:
                summarize_rounds(row)
                rows.append(row)
            del ids, warm_ids
            _free(device)
    if args.generate_rounds > 1:
        notes.append(f"generate: each mode timed {args.generate_rounds} times, interleaved round-robin; the table "
                     "gives each quantity's median (every round in the JSON rows' \"rounds\")")
    hfa.unprepare_model(model)
    del model
    _free(device)
    for r in rows:
        # each row against the bf16 row of its kind (eager vs eager, static compiled vs static compiled)
        base = next((x for x in rows if x["B"] == r["B"] and x["prompt"] == r["prompt"] and x["mode"] == "bf16"
                     and x.get("static", False) == r.get("static", False)), None)
        ok = (base is not None and base["error"] is None and r["error"] is None and base.get("decode_ms_per_token")
              and r.get("decode_ms_per_token"))
        r["decode_vs_bf16"] = base["decode_ms_per_token"] / r["decode_ms_per_token"] if ok else None
    return rows


def generate_table(rows: list[dict]) -> str:
    headers = ["B", "prompt", "mode", "prefill s", "decode ms/token", "median step ms", "decode vs bf16", "total s",
               "peak GiB", "cache GiB", "cache"]
    out = []
    for r in rows:
        if r.get("error"):
            out.append([r["B"], _k(r["prompt"]), r["label"], r["error"], *["-"] * 7])
            continue
        ratio = r.get("decode_vs_bf16")
        out.append([r["B"], _k(r["prompt"]), r["label"], _common.fmt(r["prefill_s"], ".3f"),
                    _common.fmt(r["decode_ms_per_token"], ".2f"), _common.fmt(r.get("decode_ms_median"), ".2f"),
                    "-" if ratio is None else f"{ratio:.2f}x",
                    _common.fmt(r["total_s"], ".2f"), _common.fmt(r["peak_gib"], ".1f"),
                    _common.fmt(r["cache_gib"], ".3g"), r["cache_type"]])
    return _common.markdown_table(headers, out)


# ------------------------------------------------------------------------------------------------------
# Plot
# ------------------------------------------------------------------------------------------------------


def plot(path: str, attn_rows: list[dict], gen_rows: list[dict], title: str) -> None:
    """Grouped bars: per (GQA, D) the speedup vs FA3 bf16 of each fp8 row per B x S_kv; decode ms/token per
    generate mode per B x prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for key in dict.fromkeys((r["H_q"], r["H_kv"], r["D"]) for r in attn_rows):
        rows = [r for r in attn_rows if (r["H_q"], r["H_kv"], r["D"]) == key and r["vs_fa3"] is not None
                and r["impl"] not in (FA3_ROW, FA3_STEP_ROW)]
        if rows:
            bars = {}
            for r in rows:
                bars.setdefault(r["impl"], {})[f"{r['B']}x{_k(r['S_kv'])}"] = r["vs_fa3"]
            panels.append((f"H {key[0]}/{key[1]} D {key[2]}: speedup vs FA3 bf16", bars, 1.0))
    ok = [r for r in gen_rows if not r.get("error")]
    if ok:
        bars = {}
        for r in ok:
            bars.setdefault(r["label"], {})[f"B{r['B']} {_k(r['prompt'])}"] = r["decode_ms_per_token"]
        panels.append(("generate: decode ms/token", bars, None))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, bars, hline) in zip(axes[0], panels):
        groups = list(dict.fromkeys(g for series in bars.values() for g in series))
        width = 0.8 / len(bars)
        for i, (label, series) in enumerate(bars.items()):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j, g in enumerate(groups) if g in series]
            ax.bar(xs, [series[g] for g in groups if g in series], width, label=label)
        if hline is not None:
            ax.axhline(hline, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)), groups, rotation=30)
        ax.set_title(name, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    notes: list[str] = []
    if args.device == "cuda" and args.triton_cache == "fresh":
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_decode_triton_")
        notes.append(f"Triton compiled into a fresh cache ({os.environ['TRITON_CACHE_DIR']}): first calls include "
                     "compilation")
    started = datetime.datetime.now(datetime.timezone.utc)
    device = torch.device(args.device)
    vers = _common.versions()
    header = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "device": _common.device_name(device), "versions": vers,
              "mode": ("sweep " if args.sweep else "") + ("cpu-smoke" if args.cpu_smoke
                                                            else ("quick" if args.quick else "default")),
              "timing": args.timing}
    print(f"# bench_decode {header['date']}; device: {header['device']}; "
          + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    if args.sweep:
        return _main_sweep(args, header, notes)
    attn_rows: list[dict] = []
    gen_rows: list[dict] = []
    t0 = time.perf_counter()
    if args.part in ("all", "attention"):
        attn_rows = run_attention(args, notes)
    t1 = time.perf_counter()
    if args.part in ("all", "generate"):
        gen_rows = run_generate(args, notes)
    t2 = time.perf_counter()
    header["seconds"] = {"attention": t1 - t0, "generate": t2 - t1}

    title = f"decode on {header['device']}, {header['date']}"
    if attn_rows:
        how = ("GPU time from CUDA-graph replays, host excluded" if args.timing == "graph"
               else "eager do_bench, host cost included where it exceeds the GPU time")
        print(f"\n## Attention step (S_q = 1, bf16 inputs), {header['device']}: ms (FA3 bf16 ms / ms); {how}")
        print(attention_table(attn_rows))
    if gen_rows:
        layers = args.layers or (2 if args.cpu_smoke else 32)
        model_name = "tiny Llama" if args.cpu_smoke else "Llama-3-8B shape, random bf16 weights"
        print(f"\n## generate, {model_name}, {layers} layers, {args.new_tokens} new tokens (greedy), "
              f"{header['device']}")
        print(generate_table(gen_rows))
        for r in gen_rows:
            if r.get("attention"):
                print(f"# B={r['B']} prompt={_k(r['prompt'])} {r['label']}: {r['attention']}")
    if args.out_png:
        if _common.have_matplotlib():
            plot(args.out_png, attn_rows, gen_rows, title)
        else:
            notes.append(f"--out-png {args.out_png}: matplotlib not installed, no plot written")
    if notes:
        print("\nNotes:")
        for n in dict.fromkeys(notes):
            print(f"- {n}")
    report = {**header, "args": {k: v for k, v in vars(args).items()}, "notes": list(dict.fromkeys(notes)),
              "attention": attn_rows, "generate": gen_rows}
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(_finite(report), f, indent=1, default=str, allow_nan=False)
    print(f"# total {t2 - t0:.0f} s (attention {t1 - t0:.0f} s, generate {t2 - t1:.0f} s)", flush=True)
    return report


def _main_sweep(args, header: dict, notes: list[str]) -> dict:
    result = run_sweep(args, notes)
    H_q, H_kv = result["gqa"]
    print(f"\n## fp8 cache attention step, config sweep (H {H_q}/{H_kv}, D {result['head_dim']}, S_q = 1, bf16 "
          f"queries), {header['device']}: ms, ratio = ms / FA3 bf16 ms (target <= 0.60x)")
    print(sweep_table(result))
    if result["overall"]:
        o = result["overall"]
        print(f"# best single config over all shapes: {o['name']} (geomean {o['geomean_vs_best']:.3f}x of each "
              "shape's grid best): " + ", ".join(f"{t} {ms:.4f} ms" for t, ms in o["ms"].items()))
    for r in result["best"]:
        if r["inaccurate"]:
            notes.append(f"{r['shape']}: {len(r['inaccurate'])} configs > 3 dB below the default's SQNR, never picked: "
                         + ", ".join(r["inaccurate"][:8]))
    for variant, err in result["failed"].items():
        notes.append(f"(block_n, tile_softmax, num_warps, num_stages, widen_v, prefetch_desc) {variant}: {err}")
    if notes:
        print("\nNotes:")
        for n in dict.fromkeys(notes):
            print(f"- {n}")
    report = {**header, "args": {k: v for k, v in vars(args).items()}, "notes": list(dict.fromkeys(notes)),
              "sweep": result}
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(_finite(report), f, indent=1, default=str, allow_nan=False)
    print(f"# sweep {result['seconds']:.0f} s (grid pass {result['grid_seconds']:.0f} s, {result['configs']} configs "
          f"x {len(result['best'])} shapes)", flush=True)
    return report


if __name__ == "__main__":
    main()
