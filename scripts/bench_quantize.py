#!/usr/bin/env python3
"""Timings of `quantize_qkv_fp8` (Triton FP8 Q/K/V quantization) on one GPU, against a device copy.

Inputs are laid out as Transformers hands them over: bf16 (B, H, S, D) views of (B, S, H, D) memory,
random normal; RoPE takes HF-style bf16 cos/sin (B_c = 1, S, D). Device time is the median of CUDA-event
timings (triton.testing.do_bench, L2 flushed before each call).

Traffic (`traffic`): the bytes one pass of a quantizer must move, read + written: q, k, v read once (bf16),
q, k, v written once (1 byte per element, e4m3 or int8), with RoPE cos and sin read once (B_c * S * D bf16
each: the kernel re-reads them for every head, but those re-reads hit L2 and are not counted), with per-block
scales (int8) their float32 descales written. Not counted: the per-head descales and the kernel's counters
(bytes), and the extra passes of the smoothing modes (centring statistics over K / V, smooth_v's mean of the
V codes): their GB/s is an effective rate, not DRAM traffic.
Copy baseline, measured in the same run for each shape: `dst.copy_(src)`, one bf16 CUDA tensor of q+k+v's
bytes; copy GB/s = 2 * bytes / time. "% of copy" = quantizer GB/s / copy GB/s.
Host time is the Python cost of one call (argument checks, allocations, launch) on a tiny shape: 200 calls
timed with time.perf_counter before the closing synchronize (so GPU time is not included), and with it.

    python scripts/bench_quantize.py                      # S = 4k, 16k, 32k, 128k; H 32/32 and 32/8
    python scripts/bench_quantize.py --rope --seqlens 16384
    python scripts/bench_quantize.py --sweep              # scheduling constants at S = 16k, 64k (tuning)
    python scripts/bench_quantize.py --impl some.module   # another module's quantize_qkv_fp8, same table
    python scripts/bench_quantize.py --rope --compare old.qkv --rounds 5   # side by side with another copy, in turns
    python scripts/bench_quantize.py --modes              # accuracy modes (S 4k/16k/32k), then --configs
    python scripts/bench_quantize.py --configs            # tile configs x programs/SM alone (S 16k/64k)
    python scripts/bench_quantize.py --modes --seqlens 16384 65536 --heads 32/8   # issue 14's check
    python scripts/bench_quantize.py --modes --skip-configs                       # the modes table alone
    python scripts/bench_quantize.py --modes --skip-configs --only-modes rope rope+qk rope+block+block_v
    python scripts/bench_quantize.py --block-configs      # the single-pass kernel's num_warps alone
    python scripts/bench_quantize.py --rope-configs       # RoPE + every scale per block: q/k kernel tiles
    python scripts/bench_quantize.py --split --rounds 3   # per-head scales: persistent kernel vs split path
    python scripts/bench_quantize.py --kernel-times --only-modes none qk rope rope+qk --seqlens 16384

--split times each per-head-scale mode (SPLIT_MODES, or --only-modes) both ways, the persistent two-pass
kernel and the split path (`qkv._SPLIT_MIN_ELEMENTS` huge / 0, restored), in turns for --rounds (medians), checks
that both give the same codes and descales (bit for bit; with Hadamard the rotation's summation order may move an
fp8 code: then the row says how many bytes differ), at --seqlens (else 4k, 16k, 64k).

--kernel-times: per mode (--only-modes, else none, qk, rope, rope+qk) and shape, each CUDA kernel of one call
(`KERNEL_CALLS` calls under torch.profiler, us per call; L2 not flushed between them), to see which launch of a
path costs what.

--modes prints per mode ms, the ratio to mode none, GB/s and % of copy (issue 14's line, quantize with RoPE
>= 80% of copy at S=64k: rows rope and rope+qk, the default prefill path, at S=65536), then --configs. --configs times the launcher's tile configs
(`qkv._ONE_TILE_CONFIG` for RoPE, `qkv._TILE_ELEMS` and num_warps otherwise) with `qkv._PROGRAMS_PER_SM`
4 / 8 / 16 for modes rope+qk, rope, qk, int8 (* marks today's config), at --seqlens if given (else 16k and
64k), and restores the module afterwards; its last table times the single-pass kernel (modes with every scale
per block: `block+block_v`, v_scales="block") with 4 / 8 / 16 warps (`qkv._BLOCK_WARPS`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import os
import statistics
import sys
import time

import torch

from hf_fp8_attention._constants import SCALE_BLOCK, V_SCALE_BLOCK, k_scale_block
from hf_fp8_attention._intmath import cdiv, next_power_of_2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _rope_tile(text: str) -> tuple[int, int, int, bool, bool, int]:
    parts = text.split(",")
    if len(parts) != 6 or not all(x.strip().isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"a tile is 6 comma-separated integers R,H,W,P,F,V, got {text!r}")
    rows, heads, warps, prefetch, fastest, v = (int(x) for x in parts)
    if v not in (0, 1, 2, 3) or prefetch > 1 or fastest > 1 or min(rows, heads, warps) < 1:
        raise argparse.ArgumentTypeError(f"tile {text!r}: P and F are 0/1, V is 0-3, R, H, W >= 1")
    return rows, heads, warps, bool(prefetch), bool(fastest), v


def _split_tile(text: str) -> tuple[tuple[int, int], tuple[int, int, int] | None]:
    """'R,W' (the single-pass kernel's rows and warps) or 'R,W:r,h,w' (and the RoPE kernel's rows, heads per
    program, warps)."""
    block, _, rope = text.partition(":")
    parts, rope_parts = block.split(","), rope.split(",") if rope else []
    if (len(parts) != 2 or len(rope_parts) not in (0, 3)
            or not all(x.strip().isdigit() and int(x) > 0 for x in parts + rope_parts)):
        raise argparse.ArgumentTypeError(f"a split tile is R,W or R,W:r,h,w (positive integers), got {text!r}")
    (rows, warps), rope_tile = (int(x) for x in parts), tuple(int(x) for x in rope_parts) or None
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    # the kernels' shapes: power-of-two tiles and warps; the RoPE kernel's rows whole q/k scale blocks (16) and
    # a divisor of a V block (128)
    if not (pow2(rows) and pow2(warps) and (rope_tile is None or (rope_tile[0] in (16, 32, 64, 128)
                                                                    and pow2(rope_tile[2])))):
        raise argparse.ArgumentTypeError(f"split tile {text!r}: rows and warps are powers of two, RoPE rows 16-128")
    return (rows, warps), rope_tile


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=None,
                   help="default: 4k 16k 32k 128k (table), 4k 16k 32k (--modes), 16k 64k (--configs)")
    p.add_argument("--heads", type=str, nargs="+", default=["32/32", "32/8"], help="H_q/H_kv pairs")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rope", action="store_true", help="also pass HF-style bf16 cos/sin (B_c = 1)")
    p.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement (ms)")
    p.add_argument("--timing", choices=("eager", "graph"), default="eager",
                   help="eager: do_bench (includes host time where it exceeds the GPU's, ~0.1 ms shapes); graph: "
                   "GPU time from CUDA-graph replays, L2 flushed (scripts/_common.graph_ms)")
    p.add_argument("--rounds", type=int, default=1, help="table: time each module this many times in turns and "
                   "report the medians (small shapes are noisy: 4k took 0.131 and 0.188 ms in two runs)")
    p.add_argument("--impl", type=str, default="hf_fp8_attention.quantization",
                   help="module whose quantize_qkv_fp8 is timed")
    p.add_argument("--compare", type=str, default=None, metavar="MODULE",
                   help="table: also time this module's quantize_qkv_fp8 on the same inputs (e.g. an older copy "
                        "of hf_fp8_attention.quantization.qkv), print the speedup and whether the outputs are equal")
    p.add_argument("--sweep", action="store_true",
                   help="time the launcher's scheduling constants (SWEEP_GRID) at --seqlens (default 16k, 64k)")
    p.add_argument("--profile-host", action="store_true", help="cProfile of the host-time loop (top 20)")
    p.add_argument("--kernel-times", action="store_true",
                   help="CUDA kernel us per call, by kernel, per mode (torch.profiler)")
    p.add_argument("--modes", action="store_true", help="ms, GB/s and %% of copy per accuracy mode, then --configs")
    p.add_argument("--configs", action="store_true", help="only the tile configs x programs/SM of modes rope+qk, "
                   "rope, qk, int8")
    p.add_argument("--skip-configs", action="store_true", help="--modes without the --configs tables that follow")
    p.add_argument("--block-configs", action="store_true",
                   help="only the single-pass kernel's num_warps table (the last table of --configs)")
    p.add_argument("--rope-configs", action="store_true",
                   help="only the table of qkv._ROPE_TILES alternatives (RoPE with every scale per block)")
    p.add_argument("--rope-tiles", nargs="+", default=None, metavar="R,H,W,P,F,V", type=_rope_tile,
                   help="--rope-configs: time these tiles instead of ROPE_TILES (rows, heads per program, warps, "
                   "prefetch 0/1, heads fastest 0/1, v: 0 apart, 1 in the launch, 2 there first, 3 apart on a "
                   "second stream); --rounds: each tile that many times, in turns (median)")
    p.add_argument("--split", action="store_true",
                   help="per-head-scale modes: the persistent kernel vs the split path, in turns (--rounds)")
    p.add_argument("--split-tiles", nargs="+", default=None, metavar="R,W[:r,h,w]", type=_split_tile,
                   help="--split: time the split path with these tiles instead of today's, each a column: the "
                   "single-pass kernel's (rows, num_warps; qkv._SPLIT_TILES), and after ':' the RoPE kernel's (rows, "
                   "heads per program, num_warps; qkv._SPLIT_ROPE_TILES; default today's)")
    p.add_argument("--only-modes", nargs="+", default=None, choices=sorted(MODES), metavar="MODE",
                   help="--modes / --split: time these modes only (--modes: the first is the 'x none' column's "
                   "base)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rope_tiles and not args.rope_configs:
        p.error("--rope-tiles goes with --rope-configs")
    if args.split_tiles and not args.split:
        p.error("--split-tiles goes with --split")
    per_block = [m for m in args.only_modes or () if {"qk_scales", "qk_format", "v_scales"} & set(MODES[m][1])]
    if args.split and per_block:
        p.error(f"--split times per-(batch, KV head) scales; {per_block} have per-block scales (one path only)")
    if args.compare and (args.modes or args.configs or args.sweep or args.profile_host):
        p.error("--compare applies to the table only, not to --modes/--configs/--sweep/--profile-host")
    return args


def header(impl: str) -> str:
    import triton

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), "
            f"torch {torch.__version__}, triton {triton.__version__}, {date}, impl {impl}")


def make_inputs(S, H_q, H_kv, D, rope, B=1, device="cuda"):
    def one(H):
        return torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16).transpose(1, 2)

    q, k, v = one(H_q), one(H_kv), one(H_kv)
    cos = sin = None
    if rope:
        pos = torch.arange(S, device=device, dtype=torch.float32)[None, :, None]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
        emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    return q, k, v, cos, sin


def traffic(q, k, v, cos=None, sin=None, block_scales=False, int8=False, v_blocks=False) -> tuple[int, int]:
    """(bytes read, bytes written) of one quantize pass, as the module docstring counts them (int8: int8 Q/K,
    whose block scales count K's per `k_scale_block`; v_blocks: V's descales per V_SCALE_BLOCK too)."""
    read = sum(t.numel() * t.element_size() for t in (q, k, v) + ((cos, sin) if cos is not None else ()))
    written = q.numel() + k.numel() + v.numel()
    if block_scales:  # float32 descales, (B, H, cdiv(S, block)) for q and for k
        written += 4 * sum(t.shape[0] * t.shape[1] * cdiv(t.shape[2], block)
                           for t, block in ((q, SCALE_BLOCK), (k, k_scale_block(int8))))
    if v_blocks:
        written += 4 * v.shape[0] * v.shape[1] * cdiv(v.shape[2], V_SCALE_BLOCK)
    return read, written


# --timing: "eager" (do_bench: an event pair around each call, so a call whose host work outlasts the GPU's
# head start, the L2 flush, is timed with the gap) or "graph" (`_common.graph_ms`: CUDA-graph replays, GPU
# time alone)
TIMING = "eager"


def device_ms(fn, inputs, rep_ms):
    if TIMING == "graph":
        return _common.graph_ms(lambda: fn(*inputs), inputs[0].device)
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=rep_ms, return_mode="median")


def copy_gbs(q, k, v, rep_ms) -> float:
    """GB/s (2 * bytes / time) of a CUDA device-to-device bf16 copy of q+k+v's bytes. With graph timing, the
    faster of the graph-timed and the eager copy (one graph-timed 32/32 64k copy read 2716 GB/s against
    4150-4225 eagerly, session 17: the % of copy then read 122%); the higher bandwidth keeps every % an
    under- rather than an over-statement."""
    n = q.numel() + k.numel() + v.numel()
    src = torch.empty(n, dtype=q.dtype, device=q.device)
    dst = torch.empty_like(src)
    ms = device_ms(dst.copy_, (src,), rep_ms)
    if TIMING == "graph":
        import triton.testing

        ms = min(ms, triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=rep_ms, return_mode="median"))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * q.element_size() / ms / 1e6


def rate(ms, nbytes, copy) -> str:
    """'GB/s | % of copy' cells for ``nbytes`` (read + written) moved in ``ms``."""
    gbs = sum(nbytes) / ms / 1e6
    return f"{gbs:.0f} | {100 * gbs / copy:.0f}%"


def host_us(fn, H_q, H_kv, D, rope, calls=200):
    """(us per call before the closing synchronize, us per call with it) on S=128."""
    inputs = make_inputs(128, H_q, H_kv, D, rope)
    for _ in range(20):
        fn(*inputs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*inputs)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def _heads(text):
    return tuple(map(int, text.split("/")))


def same_output(fn, other, inputs) -> bool:
    """Whether two quantizers give the same codes and descales on `inputs` (a --compare row whose modules
    differ in numerics is flagged, not hidden)."""
    a, b = fn(*inputs), other(*inputs)
    return all(torch.equal(getattr(a, n).view(torch.uint8), getattr(b, n).view(torch.uint8))
               and torch.equal(getattr(a, f"{n}_descale"), getattr(b, f"{n}_descale")) for n in ("q", "k", "v"))


def table(fn, args, other=None):
    """ms, GB/s and % of copy of `fn` per shape; with `other` (--compare), its ms and fn's speedup over it,
    timed in the same process on the same inputs."""
    extra = f" {args.compare} ms | speedup | same output |" if other else ""
    print("| H_q/H_kv | S | rope | ms | GB/s (read + written) | % of copy | copy GB/s |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if other else ""))
    for heads in args.heads:
        H_q, H_kv = _heads(heads)
        for S in args.seqlens or [4096, 16384, 32768, 131072]:
            inputs = make_inputs(S, H_q, H_kv, args.head_dim, args.rope)
            copy = copy_gbs(*inputs[:3], args.rep_ms)
            inputs = inputs if args.rope else inputs[:3]
            # --rounds: fn and other timed in turns, which goes first alternating, the median of each (slow
            # drifts hit both alike)
            times, times_other = [], []
            for i in range(args.rounds):
                for which in ((0, 1) if i % 2 == 0 else (1, 0)) if other else (0,):
                    (times, times_other)[which].append(device_ms((fn, other)[which], inputs, args.rep_ms))
            ms = statistics.median(times)
            row = f"| {heads} | {S} | {args.rope} | {ms:.3f} | {rate(ms, traffic(*inputs), copy)} | {copy:.0f} |"
            if other:
                ms_other = statistics.median(times_other)
                row += f" {ms_other:.3f} | {ms_other / ms:.2f}x | {'yes' if same_output(fn, other, inputs) else 'NO'} |"
            print(row, flush=True)
            del inputs
            torch.cuda.empty_cache()
    for heads in args.heads:
        launch, synced = host_us(fn, *_heads(heads), args.head_dim, args.rope)
        print(f"host, H {heads}, S=128: {launch:.1f} us/call launched, {synced:.1f} us/call synchronized")


# --sweep: the launcher's scheduling constants (qkv.py), each list's first value is not necessarily today's
SWEEP_GRID = {
    "_PROGRAMS_PER_SM": (3, 8),
    "_LAG_PER_PROGRAM": (0.05, 0.15, 0.5),
    "_CHUNK": (2, 4, 8),
    "_INTERLEAVE": (None, False),
}
SWEEP_MODES = ("rope", "rope+qk")


def sweep(args):
    """Times the launcher's scheduling constants (`SWEEP_GRID`: programs per SM, LAG slack per program, tiles
    per item from 16k rows, the interleaved q/k order) for modes `SWEEP_MODES` (both with RoPE, whatever
    --rope says) at --seqlens (default 16k and 64k) for each head configuration; prints each config's P1 -> P2
    window (LAG items x item bytes, bf16) and, per shape and mode, the fastest config next to today's. Below
    `qkv._CHUNK_LONG_ROWS` (16k) rows `_CHUNK` is not used and below `qkv._INTERLEAVE_ROWS` (32k) the
    interleave's None means False: those rows repeat a configuration. The module is restored afterwards."""
    from hf_fp8_attention.quantization import qkv

    names = tuple(SWEEP_GRID)
    saved = {n: getattr(qkv, n) for n in names}
    best = {}
    print("| H_q/H_kv | S | mode | " + " | ".join(n.strip("_").lower() for n in names)
          + " | window MiB | ms | % of copy |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|---|")
    try:
        for heads in args.heads:
            H_q, H_kv = _heads(heads)
            for S in args.seqlens or [16384, 65536]:
                q, k, v, cos, sin = make_inputs(S, H_q, H_kv, args.head_dim, rope=True)
                copy = copy_gbs(q, k, v, 50)
                for config in itertools.product(*SWEEP_GRID.values()):
                    for name, value in zip(names, config):
                        setattr(qkv, name, value)
                    chunk = qkv._CHUNK if S >= qkv._CHUNK_LONG_ROWS else qkv._CHUNK_SHORT
                    interleave = (S >= qkv._INTERLEAVE_ROWS) if qkv._INTERLEAVE is None else qkv._INTERLEAVE
                    _, block_s, _, _ = qkv._tile_config(args.head_dim, True)
                    n_prog, lag = qkv._schedule(1, H_q, H_kv, S, S, block_s, qkv._num_sms(q.device), chunk,
                                                interleave)
                    window = lag * chunk * block_s * args.head_dim * 2 / 2**20
                    for mode in SWEEP_MODES:
                        ms, nbytes = _timed(qkv.quantize_qkv_fp8, q, k, v, cos, sin, mode, 50)
                        pct = 100 * sum(nbytes) / ms / 1e6 / copy
                        today = config == tuple(saved.values())
                        key = (heads, S, mode)
                        if key not in best or ms < best[key][0]:
                            best[key] = (ms, pct, config)
                        if today:
                            best[key + ("today",)] = (ms, pct, config)
                        print(f"| {heads} | {S} | {mode} | {' | '.join(map(str, config))}{' *' if today else ''} "
                              f"| {window:.0f} | {ms:.3f} | {pct:.0f}% |", flush=True)
                del q, k, v, cos, sin
                torch.cuda.empty_cache()
    finally:
        for name, value in saved.items():
            setattr(qkv, name, value)
    print("\nfastest config per shape and mode (" + ", ".join(names) + "), against today's:")
    print("| H_q/H_kv | S | mode | fastest | ms | % of copy | today ms | today % of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for key, (ms, pct, config) in best.items():
        if key[-1] == "today":
            continue
        t = best.get(key + ("today",))
        today = f"{t[0]:.3f} | {t[1]:.0f}%" if t else "- | -"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {config} | {ms:.3f} | {pct:.0f}% | {today} |")


# name -> (rope, quantize_qkv_fp8 options). Each mode names everything it switches on (the defaults are
# hadamard="auto", smooth_v="auto"), as accuracy.MODES. rope+qk is the default prefill path with fused RoPE
# (auto -> qk at D=128); with fa3 from 32k keys smooth_v="auto" adds V centring: rope+qk+smooth_v.
MODES = {
    "none": (False, {}),
    "rope": (True, {}),
    "qk": (False, {"hadamard": "qk"}),
    "rope+qk": (True, {"hadamard": "qk"}),
    "smooth_v": (False, {"smooth_v": True}),
    "rope+qk+smooth_v": (True, {"hadamard": "qk", "smooth_v": True}),
    "int8": (False, {"qk_format": "int8"}),
    "rope+int8": (True, {"qk_format": "int8"}),
    "int8+smooth_k": (False, {"qk_format": "int8", "smooth_k": True}),
    # every scale per block: the single-pass kernel (qkv._launch_blocks)
    "block+block_v": (False, {"qk_scales": "block", "v_scales": "block"}),
    "rope+block+block_v": (True, {"qk_scales": "block", "v_scales": "block"}),
}
MODES = {name: (rope, {"hadamard": "none", "smooth_v": False, **kw}) for name, (rope, kw) in MODES.items()}
# --configs: (tile elements, num_warps, ONE_TILE) alternatives, today's first. RoPE: qkv._ONE_TILE_CONFIG;
# otherwise qkv._TILE_ELEMS and the warps (ONE_TILE is off without RoPE). Registers: see qkv.py.
ROPE_CONFIGS = [(4096, 4, True), (4096, 8, True), (2048, 4, True), (8192, 8, True), (8192, 8, False)]
PLAIN_CONFIGS = [(4096, 4, False), (8192, 4, False), (8192, 8, False)]
PROGRAMS_PER_SM = (4, 8, 16)
CONFIG_MODES = {True: ("rope+qk", "rope"), False: ("qk", "int8")}
# --configs, the single-pass kernel (every scale per block): num_warps per 128-row tile (qkv._BLOCK_WARPS)
BLOCK_WARPS = (4, 8)
BLOCK_MODES = ("rope+block+block_v", "block+block_v")


def _timed(fn, q, k, v, cos, sin, name, rep_ms):
    """(ms, (bytes read, bytes written)) of mode ``name``."""
    rope, kw = MODES[name]
    inputs = (q, k, v, cos, sin) if rope else (q, k, v)
    ms = device_ms(lambda *a: fn(*a, options=kw), inputs, rep_ms)
    int8 = kw.get("qk_format") == "int8"
    return ms, traffic(*inputs, block_scales=int8 or kw.get("qk_scales") == "block", int8=int8,
                       v_blocks=kw.get("v_scales") == "block")


def modes(args):
    """ms, GB/s and % of copy of each accuracy mode, and its ratio to mode none."""
    from hf_fp8_attention.quantization import qkv

    rep = min(args.rep_ms, 100)
    print("| H_q/H_kv | S | mode | ms | x none | GB/s (read + written) | % of copy | copy GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for heads in args.heads:
        for S in args.seqlens or [4096, 16384, 32768]:
            q, k, v, cos, sin = make_inputs(S, *_heads(heads), args.head_dim, rope=True)
            copy = copy_gbs(q, k, v, rep)
            base = None
            for name in args.only_modes or MODES:
                ms, nbytes = _timed(qkv.quantize_qkv_fp8, q, k, v, cos, sin, name, rep)
                base = base or ms
                print(f"| {heads} | {S} | {name} | {ms:.3f} | {ms / base:.2f} | {rate(ms, nbytes, copy)} "
                      f"| {copy:.0f} |", flush=True)
            del q, k, v, cos, sin
            torch.cuda.empty_cache()


def configs(args):
    """ms and % of copy of the tile configs x programs per SM for CONFIG_MODES; the module is restored."""
    from hf_fp8_attention.quantization import qkv

    saved = qkv._ONE_TILE_CONFIG, qkv._TILE_ELEMS, qkv._PROGRAMS_PER_SM, qkv._tile_config

    def plain_warps(warps):  # qkv._tile_config with `warps` warps without RoPE
        def patched(head_dim, apply_rope):
            half_block, block_s, num_warps, one_tile = saved[3](head_dim, apply_rope)
            return half_block, block_s, num_warps if apply_rope else max(warps, 8 if head_dim > 128 else 4), one_tile
        return patched

    try:
        for rope, candidates in ((True, ROPE_CONFIGS), (False, PLAIN_CONFIGS)):
            names = CONFIG_MODES[rope]
            print(f"\n{'RoPE: qkv._ONE_TILE_CONFIG' if rope else 'no RoPE: qkv._TILE_ELEMS, num_warps'} "
                  "(tile elements, num_warps, ONE_TILE); ms (% of copy); * today's")
            print(f"| H_q/H_kv | S | copy GB/s | config | programs/SM | {' | '.join(names)} |")
            print(f"|---|---|---|---|---|{'---|' * len(names)}")
            for heads, S in itertools.product(args.heads, args.seqlens or [16384, 65536]):
                q, k, v, cos, sin = make_inputs(S, *_heads(heads), args.head_dim, rope=True)
                copy = copy_gbs(q, k, v, 50)
                for config, pps in itertools.product(candidates, PROGRAMS_PER_SM):
                    qkv._ONE_TILE_CONFIG, qkv._TILE_ELEMS, qkv._PROGRAMS_PER_SM, qkv._tile_config = saved
                    if rope:
                        qkv._ONE_TILE_CONFIG = config
                    else:
                        qkv._TILE_ELEMS, qkv._tile_config = config[0], plain_warps(config[1])
                    qkv._PROGRAMS_PER_SM = pps
                    cells = []
                    for name in names:
                        ms, nbytes = _timed(qkv.quantize_qkv_fp8, q, k, v, cos, sin, name, 50)
                        cells.append(f"{ms:.3f} ({100 * sum(nbytes) / ms / 1e6 / copy:.1f}%)")
                    today = saved[0] if rope else (saved[1], 4, False)
                    mark = "*" if config == today and pps == saved[2] else ""
                    print(f"| {heads} | {S} | {copy:.0f} | {config}{mark} | {pps} | {' | '.join(cells)} |",
                          flush=True)
                del q, k, v, cos, sin
                torch.cuda.empty_cache()
    finally:
        qkv._ONE_TILE_CONFIG, qkv._TILE_ELEMS, qkv._PROGRAMS_PER_SM, qkv._tile_config = saved
    block_configs(args)


def block_configs(args):
    """ms and % of copy of the single-pass kernel's num_warps alternatives (`qkv._BLOCK_WARPS`, restored)."""
    from hf_fp8_attention.quantization import qkv

    saved = dict(qkv._BLOCK_WARPS), qkv._BLOCK_HEADS_FASTEST
    half = next_power_of_2(args.head_dim // 2)
    print(f"\nsingle-pass kernel (every scale per block): num_warps per program; ms (% of copy); today's: "
          f"{saved[0].get((half, True))} with RoPE, {saved[0].get((half, False))} without; heads fastest: {saved[1]} "
          f"(with RoPE and e4m3 Q/K it does v alone, without RoPE; q/k then: --rope-configs)")
    print(f"| H_q/H_kv | S | copy GB/s | num_warps | heads fastest | {' | '.join(BLOCK_MODES)} |")
    print(f"|---|---|---|---|---|{'---|' * len(BLOCK_MODES)}")
    try:
        for heads, S in itertools.product(args.heads, args.seqlens or [16384, 65536]):
            q, k, v, cos, sin = make_inputs(S, *_heads(heads), args.head_dim, rope=True)
            copy = copy_gbs(q, k, v, 50)
            for warps, order in itertools.product(BLOCK_WARPS, (True, False)):
                qkv._BLOCK_WARPS.update({(half, False): warps, (half, True): warps})
                qkv._BLOCK_HEADS_FASTEST = order
                cells = []
                for name in BLOCK_MODES:
                    ms, nbytes = _timed(qkv.quantize_qkv_fp8, q, k, v, cos, sin, name, 50)
                    cells.append(f"{ms:.3f} ({100 * sum(nbytes) / ms / 1e6 / copy:.1f}%)")
                print(f"| {heads} | {S} | {copy:.0f} | {warps} | {order} | {' | '.join(cells)} |", flush=True)
            del q, k, v, cos, sin
            torch.cuda.empty_cache()
    finally:
        qkv._BLOCK_WARPS.clear()
        qkv._BLOCK_WARPS.update(saved[0])
        qkv._BLOCK_HEADS_FASTEST = saved[1]


# --rope-configs: (rows, heads per program, num_warps, prefetch, heads fastest, v: 1 in the same launch after
# q/k, 2 in it first, 0 apart) of `block_kernel.qk_rope_block_kernel`; None: the single-pass kernel alone
ROPE_TILES = (None, *((*t, fused) for fused in (True, False) for t in (
    (16, 8, 4, True, True), (32, 8, 4, True, True), (32, 8, 8, True, True), (16, 8, 4, True, False))),
    (16, 8, 4, True, True, 2), (32, 8, 4, True, True, 2))


def rope_configs(args):
    """ms and % of copy of mode rope+block+block_v per q/k RoPE tile (`qkv._ROPE_TILES`, restored); a V_SIDE
    tile (v: 3) takes the second stream at every size (`qkv._V_SIDE_MIN_ROWS` 0 here, restored)."""
    from hf_fp8_attention.quantization import qkv

    saved = (dict(qkv._ROPE_TILES), qkv._ROPE_TILE_DEFAULT, qkv._V_SIDE_MIN_ROWS)
    half = next_power_of_2(args.head_dim // 2)
    today = saved[0].get(half, saved[1])
    print(f"\nRoPE with every scale per block (rope+block+block_v), D={args.head_dim}: q/k tile (rows, heads per "
          f"program, warps, prefetch, heads fastest, v: 1 in the same launch, 2 there first, 0/False apart), "
          f"None = one launch of the single-pass kernel; ms (% of copy); today's: {today}")
    shapes = list(itertools.product(args.heads, args.seqlens or [16384, 65536]))
    print(f"| tile | {' | '.join(f'{h} {S}' for h, S in shapes)} |")
    print(f"|---|{'---|' * len(shapes)}")
    # today's tile (D=64/256's) timed even if not listed
    rows = {tile: [] for tile in (*(args.rope_tiles or ROPE_TILES), today)}
    rounds = args.rounds if args.rope_tiles else 1
    try:
        qkv._V_SIDE_MIN_ROWS = 0  # a V_SIDE tile takes the second stream at every size here
        for heads, S in shapes:
            q, k, v, cos, sin = make_inputs(S, *_heads(heads), args.head_dim, rope=True)
            copy = copy_gbs(q, k, v, 50)
            times = {tile: [] for tile in rows}
            for _ in range(rounds):  # the tiles in turns, each round
                for tile in rows:
                    qkv._ROPE_TILES[half] = tile
                    ms, nbytes = _timed(qkv.quantize_qkv_fp8, q, k, v, cos, sin, "rope+block+block_v", 50)
                    times[tile].append(ms)
            for tile, t in times.items():
                ms = statistics.median(t)
                rows[tile].append(f"{ms:.3f} ({100 * sum(nbytes) / ms / 1e6 / copy:.1f}%)")
            del q, k, v, cos, sin
            torch.cuda.empty_cache()
    finally:
        qkv._ROPE_TILES.clear()
        qkv._ROPE_TILES.update(saved[0])
        qkv._V_SIDE_MIN_ROWS = saved[2]
    for tile, cells in rows.items():
        mark = "*" if tile == today else ""
        print(f"| {tile}{mark} | {' | '.join(cells)} |", flush=True)


# --split: modes with per-(batch, KV head) scales (the fa3/fa4 path), the default prefill path (rope+qk) first
SPLIT_MODES = ("rope+qk", "rope", "none", "qk", "rope+qk+smooth_v")


def _byte_diff(a, b) -> int:
    """Entries that differ between two QuantizedQKV: the fp8 bytes of q, k, v, the descales, and smooth_v's
    V mean and add-back."""
    n = sum(int((getattr(a, x).view(torch.uint8) != getattr(b, x).view(torch.uint8)).sum()) for x in "qkv")
    n += sum(int((getattr(a, f"{x}_descale") != getattr(b, f"{x}_descale")).sum()) for x in "qkv")
    for name in ("v_mean", "v_add"):
        x, y = getattr(a, name), getattr(b, name)
        n += (x is None) != (y is None) or (x is not None and int((x != y).sum()))
    return int(n)


def split_paths(args):
    """ms and % of copy of the per-head-scale modes through the persistent kernel and through the split path
    (`qkv._SPLIT_MIN_ELEMENTS`; --split-tiles: each of those tiles, `qkv._SPLIT_TILES`; both restored), in turns;
    the best split column's speedup and how many output bytes differ from the persistent kernel's."""
    from hf_fp8_attention.quantization import qkv

    saved = (qkv._SPLIT_MIN_ELEMENTS, dict(qkv._SPLIT_TILES), dict(qkv._SPLIT_ROPE_TILES))
    half = next_power_of_2(args.head_dim // 2)
    today = (saved[1].get(half, qkv._SPLIT_TILE_DEFAULT), saved[2].get(half, qkv._SPLIT_ROPE_TILE_DEFAULT))
    tiles = [(block, rope or today[1]) for block, rope in args.split_tiles or [today]]
    paths = {"persistent": None,
             **{f"split {','.join(map(str, b))}:{','.join(map(str, r))}": (b, r) for b, r in tiles}}
    print(f"\nPer-(batch, KV head) scales, D={args.head_dim}: persistent two-pass kernel vs the split path (two "
          f"launches; tiles rows,warps:RoPE rows,heads,warps; today's {today}, from {saved[0]} elements), ms (% of "
          f"copy), median of {args.rounds} round(s) in turns")
    print(f"| H_q/H_kv | S | mode | {' | '.join(paths)} | best split speedup | bytes differ |")
    print(f"|---|---|---|{'---|' * len(paths)}---|---|")

    def use(tile):
        qkv._SPLIT_MIN_ELEMENTS = 1 << 62 if tile is None else 0
        if tile is not None:
            qkv._SPLIT_TILES[half], qkv._SPLIT_ROPE_TILES[half] = tile

    try:
        for heads in args.heads:
            for S in args.seqlens or [4096, 16384, 65536]:
                q, k, v, cos, sin = make_inputs(S, *_heads(heads), args.head_dim, rope=True)
                copy = copy_gbs(q, k, v, 50)
                for name in args.only_modes or SPLIT_MODES:
                    rope, kw = MODES[name]
                    inputs = (q, k, v, cos, sin) if rope else (q, k, v)
                    times = {p: [] for p in paths}
                    for _ in range(args.rounds):
                        for path, tile in paths.items():
                            use(tile)
                            ms, nbytes = _timed(qkv.quantize_qkv_fp8, q, k, v, cos, sin, name, 50)
                            times[path].append(ms)
                    ms = {p: statistics.median(t) for p, t in times.items()}
                    best = min((p for p in paths if paths[p] is not None), key=ms.get)
                    use(None)
                    persistent = qkv.quantize_qkv_fp8(*inputs, options=kw)
                    use(paths[best])
                    differ = _byte_diff(persistent, qkv.quantize_qkv_fp8(*inputs, options=kw))
                    cells = [f"{ms[p]:.3f} ({100 * sum(nbytes) / ms[p] / 1e6 / copy:.1f}%)" for p in paths]
                    print(f"| {heads} | {S} | {name} | {' | '.join(cells)} | {ms['persistent'] / ms[best]:.2f}x "
                          f"({best}) | {differ} |", flush=True)
                    del persistent
                del q, k, v, cos, sin
                torch.cuda.empty_cache()
    finally:
        qkv._SPLIT_MIN_ELEMENTS = saved[0]
        for d, old in ((qkv._SPLIT_TILES, saved[1]), (qkv._SPLIT_ROPE_TILES, saved[2])):
            d.clear()
            d.update(old)


KERNEL_CALLS = 20


def kernel_times(args):
    """Per mode and shape: each CUDA kernel's microseconds per call (`KERNEL_CALLS` calls after a warm-up under
    torch.profiler), by kernel name, and their sum."""
    from torch.profiler import ProfilerActivity, profile

    from hf_fp8_attention.quantization import qkv

    print("| H_q/H_kv | S | mode | kernel | launches per call | us per call |")
    print("|---|---|---|---|---|---|")
    for heads in args.heads:
        for S in args.seqlens or [16384, 65536]:
            q, k, v, cos, sin = make_inputs(S, *_heads(heads), args.head_dim, rope=True)
            for name in args.only_modes or ("none", "qk", "rope", "rope+qk"):
                rope, kw = MODES[name]
                inputs = (q, k, v, cos, sin) if rope else (q, k, v)
                qkv.quantize_qkv_fp8(*inputs, options=kw)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(KERNEL_CALLS):
                        qkv.quantize_qkv_fp8(*inputs, options=kw)
                    torch.cuda.synchronize()
                per_kernel: dict = {}
                for kname, us in _common.cuda_kernel_times(prof):
                    n_us = per_kernel.setdefault(kname, [0, 0.0])
                    n_us[0] += 1
                    n_us[1] += us
                for kname, (n, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
                    print(f"| {heads} | {S} | {name} | {kname[:60]} | {n / KERNEL_CALLS:.0f} "
                          f"| {us / KERNEL_CALLS:.1f} |")
                total = sum(us for _, us in per_kernel.values()) / KERNEL_CALLS
                print(f"| {heads} | {S} | {name} | all | {sum(n for n, _ in per_kernel.values()) / KERNEL_CALLS:.0f} "
                      f"| {total:.1f} |", flush=True)
            del q, k, v, cos, sin
            torch.cuda.empty_cache()


def profile_host(fn, args):
    import cProfile
    import pstats

    H_q, H_kv = _heads(args.heads[0])
    host_us(fn, H_q, H_kv, args.head_dim, args.rope)  # compiles and warms the caches
    with cProfile.Profile() as prof:
        host_us(fn, H_q, H_kv, args.head_dim, args.rope)
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def main(argv=None) -> int:
    global TIMING
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quantize: needs a CUDA GPU", file=sys.stderr)
        return 2
    TIMING = args.timing
    print(header(args.impl) + (", timing: CUDA-graph replays" if TIMING == "graph" else ""), flush=True)
    if args.split:
        split_paths(args)
    elif args.kernel_times:
        kernel_times(args)
    elif args.block_configs:
        block_configs(args)
    elif args.rope_configs:
        rope_configs(args)
    elif args.sweep:
        sweep(args)
    elif args.modes or args.configs:
        if args.modes:
            modes(args)
        if args.configs or not args.skip_configs:
            configs(args)
    elif args.profile_host:
        profile_host(importlib.import_module(args.impl).quantize_qkv_fp8, args)
    else:
        other = importlib.import_module(args.compare).quantize_qkv_fp8 if args.compare else None
        table(importlib.import_module(args.impl).quantize_qkv_fp8, args, other)
    return 0


if __name__ == "__main__":
    sys.exit(main())
