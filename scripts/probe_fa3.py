#!/usr/bin/env python3
"""FA3's own knobs, timed: its fp8 forward (`backends/fa3.fa3_fp8_attention`) and its bf16 forward
(`flash_attn_interface.flash_attn_func`) with pack_gqa None (FA3's heuristic), True and False, side by side
in one process, in turns (--rounds), medians of triton's do_bench. B=1, D=128, GQA --heads (default 32/8).

    python scripts/probe_fa3.py --seqlens 16384 65536 131072 --causal both

Prints TFLOPS per (S, causal, dtype, pack_gqa) and each fp8 choice against FA3 bf16 with the heuristic (the
baseline of bench_sdpa), plus the largest difference of each fp8 choice's output from the heuristic's.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    p.add_argument("--heads", default="32/8", help="H_q/H_kv")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rep-ms", type=int, default=100)
    a = p.parse_args(argv)
    try:
        a.h_q, a.h_kv = (int(x) for x in a.heads.split("/"))
    except ValueError:
        p.error(f"--heads: H_q/H_kv, got {a.heads!r}")
    if a.h_q % a.h_kv or min(a.seqlens) < 1 or a.rounds < 1:
        p.error("H_q must be a multiple of H_kv; --seqlens and --rounds positive")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    return a


def main(argv=None):
    a = parse_args(argv)
    import triton.testing
    from flash_attn_interface import flash_attn_func

    from hf_fp8_attention.backends.fa3 import fa3_fp8_attention
    from hf_fp8_attention.options import FP8AttentionOptions
    from hf_fp8_attention.quantization import quantize_qkv_fp8

    D = a.head_dim
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    vers = ", ".join(f"{k} {v}" for k, v in _common.versions().items())
    print(f"# {_common.device_name('cuda')}, {vers}, {when}; B=1, H {a.heads}, D={D}, median of {a.rounds} "
          "round(s) in turns", flush=True)
    print("| S | causal | FA3 bf16 TFLOPS (pack None / True) | FA3 fp8 TFLOPS (None / True / False) | "
          "fp8 vs bf16 (None / True / False) | max |out - out(None)| (True / False) |")
    print("|---|---|---|---|---|---|")
    choices = (None, True, False)
    for S in a.seqlens:
        g = torch.Generator(device="cuda").manual_seed(S)
        q, k, v = (torch.randn(1, S, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for h in (a.h_q, a.h_kv, a.h_kv))
        qkv = quantize_qkv_fp8(*(t.transpose(1, 2) for t in (q, k, v)), options=FP8AttentionOptions(hadamard="none"))
        for causal in {"yes": (True,), "no": (False,), "both": (False, True)}[a.causal]:
            flops = 4 * a.h_q * S * S * D / (2 if causal else 1)
            runs = {}
            for pack in (None, True):
                runs[("bf16", pack)] = functools.partial(flash_attn_func, q, k, v, causal=causal, pack_gqa=pack)
            for pack in choices:
                runs[("fp8", pack)] = functools.partial(fa3_fp8_attention, qkv, is_causal=causal, scale=D**-0.5,
                                                        out_dtype=torch.bfloat16, pack_gqa=pack)
            outs = {key: fn() for key, fn in runs.items()}  # warm (and build) every choice first
            times = {key: [] for key in runs}
            for _ in range(a.rounds):
                for key, fn in runs.items():
                    times[key].append(triton.testing.do_bench(fn, warmup=10, rep=a.rep_ms, return_mode="median"))
            ms = {key: statistics.median(t) for key, t in times.items()}
            tf = {key: flops / m / 1e9 for key, m in ms.items()}
            out0 = outs[("fp8", None)]
            diff = []
            for pack in (True, False):
                o = outs[("fp8", pack)]
                diff.append(f"{(o.float() - out0.float()).abs().max().item():.2g}")
            base = ms[("bf16", None)]
            print(f"| {S} | {'yes' if causal else 'no'} | {tf[('bf16', None)]:.0f} / {tf[('bf16', True)]:.0f} | "
                  + " / ".join(f"{tf[('fp8', p)]:.0f}" for p in choices) + " | "
                  + " / ".join(f"{base / ms[('fp8', p)]:.2f}x" for p in choices) + f" | {' / '.join(diff)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
