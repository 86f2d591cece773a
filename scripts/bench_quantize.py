#!/usr/bin/env python3
"""Timings of `quantize_qkv_fp8` (Triton FP8 Q/K/V quantization) on one GPU.

Inputs are laid out as Transformers hands them over: bf16 (B, H, S, D) views of (B, S, H, D) memory,
random normal. Device time is the median of CUDA-event timings (triton.testing.do_bench); GB/s counts one
bf16 read of q, k, v and one fp8 write, the least traffic a quantizer can move. Host time is the Python
cost of one call (argument checks, allocations, launch) on a tiny shape: 200 calls timed with
time.perf_counter before the closing synchronize (so GPU time is not included), and with it.

    python scripts/bench_quantize.py                      # S = 4k, 16k, 32k, 128k; H 32/32 and 32/8
    python scripts/bench_quantize.py --rope --seqlens 16384
    python scripts/bench_quantize.py --sweep              # launcher constants at S = 16k (tuning)
    python scripts/bench_quantize.py --impl some.module   # another module's quantize_qkv_fp8, same table
    python scripts/bench_quantize.py --modes              # accuracy modes (fused RoPE / Hadamard / smoothing)
                                                          # at S = 4k, 16k, 32k, and the ONE_TILE configs

--modes (about 40 s on the H100, compiles included) prints ms per mode and the ratio to plain
quantization, then the `qkv._ONE_TILE_CONFIG` alternatives for the RoPE and smoothing modes at S=16k.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    p.add_argument("--heads", type=str, nargs="+", default=["32/32", "32/8"], help="H_q/H_kv pairs")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rope", action="store_true", help="also pass HF-style bf16 cos/sin (B_c = 1)")
    p.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement (ms)")
    p.add_argument("--impl", type=str, default="hf_fp8_attention.quantization",
                   help="module whose quantize_qkv_fp8 is timed")
    p.add_argument("--sweep", action="store_true",
                   help="time the launcher constants (_PROGRAMS_PER_SM, _LAG_PER_PROGRAM) at S=16k")
    p.add_argument("--profile-host", action="store_true", help="cProfile of the host-time loop (top 20)")
    p.add_argument("--modes", action="store_true",
                   help="ms per accuracy mode (S 4k/16k/32k unless --seqlens is given) and the ONE_TILE sweep")
    return p.parse_args(argv)


def make_inputs(S, H_q, H_kv, D, rope, B=1):
    def one(H):
        return torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    q, k, v = one(H_q), one(H_kv), one(H_kv)
    cos = sin = None
    if rope:
        pos = torch.arange(S, device="cuda", dtype=torch.float32)[None, :, None]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
        emb = torch.cat([pos * inv_freq, pos * inv_freq], dim=-1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    return q, k, v, cos, sin


def device_ms(fn, inputs, rep_ms):
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=rep_ms, return_mode="median")


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


def table(fn, args):
    print(f"| H_q/H_kv | S | rope | ms | GB/s (1 read + 1 write) |")
    print("|---|---|---|---|---|")
    for heads in args.heads:
        H_q, H_kv = map(int, heads.split("/"))
        for S in args.seqlens:
            inputs = make_inputs(S, H_q, H_kv, args.head_dim, args.rope)
            ms = device_ms(fn, inputs, args.rep_ms)
            n = sum(x.numel() for x in inputs[:3])
            print(f"| {H_q}/{H_kv} | {S} | {args.rope} | {ms:.3f} | {n * 3 / ms / 1e6:.0f} |", flush=True)
            del inputs
            torch.cuda.empty_cache()
    for heads in args.heads:
        H_q, H_kv = map(int, heads.split("/"))
        launch, synced = host_us(fn, H_q, H_kv, args.head_dim, args.rope)
        print(f"host, H {heads}, S=128: {launch:.1f} us/call launched, {synced:.1f} us/call synchronized")


def sweep(args):
    """Times the launcher's tuning constants at S=16k for each head configuration."""
    from hf_fp8_attention.quantization import qkv

    fn = qkv.quantize_qkv_fp8
    names = ("_PROGRAMS_PER_SM", "_LAG_PER_PROGRAM")
    saved = {n: getattr(qkv, n) for n in names}
    print("| H_q/H_kv | programs/SM | lag/program | ms | GB/s |")
    print("|---|---|---|---|---|")
    try:
        for heads in args.heads:
            H_q, H_kv = map(int, heads.split("/"))
            inputs = make_inputs(16384, H_q, H_kv, args.head_dim, args.rope)
            n = sum(x.numel() for x in inputs[:3])
            for config in itertools.product((2, 4, 8), (0.25, 0.5, 1.0)):
                for name, value in zip(names, config):
                    setattr(qkv, name, value)
                ms = device_ms(fn, inputs, 50)
                print(f"| {heads} | {' | '.join(map(str, config))} | {ms:.3f} | {n * 3 / ms / 1e6:.0f} |", flush=True)
    finally:
        for name, value in saved.items():
            setattr(qkv, name, value)


# name -> (rope, quantize_qkv_fp8 keyword arguments)
MODES = {
    "none": (False, {}),
    "rope": (True, {}),
    "qkv": (False, {"hadamard": "qkv"}),
    "v_only": (False, {"hadamard": "v_only"}),
    "smooth_k": (False, {"smooth_k": True}),
    "qkv+smooth_k": (False, {"hadamard": "qkv", "smooth_k": True}),
    "rope+qkv+smooth_k": (True, {"hadamard": "qkv", "smooth_k": True}),
}
# qkv._ONE_TILE_CONFIG alternatives, (tile elements, num_warps, ONE_TILE); the first is the default
ONE_TILE_CONFIGS = [(8192, 8, True), (4096, 8, True), (4096, 4, True), (8192, 8, False)]


def modes(args):
    """ms of each accuracy mode and its ratio to "none", then the ONE_TILE configs at S=16k."""
    from hf_fp8_attention.quantization import qkv

    fn = qkv.quantize_qkv_fp8
    seqlens = args.seqlens if args.seqlens != parse_args([]).seqlens else [4096, 16384, 32768]
    rep = min(args.rep_ms, 100)
    print(f"| H_q/H_kv | S | {' | '.join(MODES)} |")
    print(f"|---|---|{'---|' * len(MODES)}")
    for heads in args.heads:
        H_q, H_kv = map(int, heads.split("/"))
        for S in seqlens:
            q, k, v, cos, sin = make_inputs(S, H_q, H_kv, args.head_dim, rope=True)
            cells, base = [], None
            for rope, kw in MODES.values():
                inputs = (q, k, v, cos, sin) if rope else (q, k, v)
                ms = device_ms(lambda *a: fn(*a, options={"hadamard": "none", **kw}), inputs, rep)
                base = ms if base is None else base
                cells.append(f"{ms:.3f} ({ms / base:.2f}x)")
            print(f"| {heads} | {S} | {' | '.join(cells)} |", flush=True)
            del q, k, v, cos, sin
            torch.cuda.empty_cache()
    print("\nONE_TILE configs (tile elements, num_warps, ONE_TILE) for RoPE / smoothing, S=16384, ms:")
    swept = ("rope", "smooth_k", "rope+qkv+smooth_k")
    print(f"| H_q/H_kv | config | {' | '.join(swept)} |")
    print(f"|---|---|{'---|' * len(swept)}")
    saved = qkv._ONE_TILE_CONFIG
    try:
        for heads in args.heads:
            H_q, H_kv = map(int, heads.split("/"))
            q, k, v, cos, sin = make_inputs(16384, H_q, H_kv, args.head_dim, rope=True)
            for config in ONE_TILE_CONFIGS:
                qkv._ONE_TILE_CONFIG = config
                cells = []
                for name in swept:
                    rope, kw = MODES[name]
                    inputs = (q, k, v, cos, sin) if rope else (q, k, v)
                    cells.append(f"{device_ms(lambda *a: fn(*a, **kw), inputs, 50):.3f}")
                print(f"| {heads} | {config} | {' | '.join(cells)} |", flush=True)
            del q, k, v, cos, sin
            torch.cuda.empty_cache()
    finally:
        qkv._ONE_TILE_CONFIG = saved


def profile_host(fn, args):
    import cProfile
    import pstats

    H_q, H_kv = map(int, args.heads[0].split("/"))
    host_us(fn, H_q, H_kv, args.head_dim, args.rope)  # compiles and warms the caches
    with cProfile.Profile() as prof:
        host_us(fn, H_q, H_kv, args.head_dim, args.rope)
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def main(argv=None):
    args = parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, impl {args.impl}")
    if args.sweep:
        sweep(args)
    elif args.modes:
        modes(args)
    elif args.profile_host:
        profile_host(importlib.import_module(args.impl).quantize_qkv_fp8, args)
    else:
        table(importlib.import_module(args.impl).quantize_qkv_fp8, args)


if __name__ == "__main__":
    main()
