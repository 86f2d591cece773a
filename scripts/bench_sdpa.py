#!/usr/bin/env python3
"""One attention layer: fp8 SDPA (quantization included) vs FA3 bf16 vs torch SDPA, on one GPU.

Inputs are laid out as Transformers hands them over: (B, H, S, D) views of (B, S, H, D) memory.
Times are medians of CUDA-event timings (triton.testing.do_bench); TFLOPS = 4*B*H*S_q*S_kv*D / t, halved
for causal. Prints a markdown table; `--json` writes the rows.

    python scripts/bench_sdpa.py --seqlens 4096 16384 32768
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement (ms)")
    p.add_argument("--json", type=str, default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def _median_ms(fn, rep_ms):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def _candidates(q, k, v, causal):
    """name -> zero-arg callable. Only what is installed/usable on this GPU is listed."""
    from hf_fp8_attention import fp8_sdpa, quantize_qkv_fp8
    from hf_fp8_attention.dispatch import kernel_available

    gqa = q.shape[1] != k.shape[1]
    out = {}

    def torch_sdpa(backend):
        def run():
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        return run

    out["torch sdpa flash bf16"] = torch_sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    out["torch sdpa cudnn bf16"] = torch_sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    if kernel_available("fa3"):
        from flash_attn_interface import flash_attn_func

        qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # BSHD, no copy
        out["FA3 bf16"] = lambda: flash_attn_func(qb, kb, vb, causal=causal)
        out["fp8 quantize only"] = lambda: quantize_qkv_fp8(q, k, v)
        qkv = quantize_qkv_fp8(q, k, v)
        from hf_fp8_attention.backends.fa3 import fa3_fp8_attention

        out["FA3 fp8 kernel only"] = lambda: fa3_fp8_attention(
            qkv, is_causal=causal, scale=q.shape[-1] ** -0.5, out_dtype=q.dtype
        )
        out["fp8_fa3 (quant incl.)"] = lambda: fp8_sdpa(q, k, v, is_causal=causal, backend="fa3")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sdpa: needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    import triton

    dev = torch.cuda.get_device_name()
    print(f"# device: {dev}; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")
    print(f"# B={args.batch} H={args.heads}/{args.kv_heads} D={args.head_dim}, bf16 inputs as BHSD views of BSHD")
    rows = []
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    for s in args.seqlens:
        for causal in causals:
            g = torch.Generator(device="cuda").manual_seed(s)
            shape_q = (args.batch, s, args.heads, args.head_dim)
            shape_kv = (args.batch, s, args.kv_heads, args.head_dim)
            q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            flops = 4 * args.batch * args.heads * s * s * args.head_dim / (2 if causal else 1)
            times = {}
            for name, fn in _candidates(q, k, v, causal).items():
                try:
                    times[name] = _median_ms(fn, args.rep_ms)
                except Exception as e:  # a backend unavailable for this shape: report, keep going
                    print(f"# {name} S={s} causal={causal}: {type(e).__name__}: {e}", file=sys.stderr)
            base = times.get("FA3 bf16")
            for name, ms in times.items():
                rows.append(
                    {
                        "S": s,
                        "causal": causal,
                        "impl": name,
                        "ms": ms,
                        "tflops": None if "quantize" in name else flops / ms / 1e9,
                        "vs_fa3_bf16": None if base is None or "quantize" in name else base / ms,
                    }
                )
            del q, k, v
            torch.cuda.empty_cache()
    print("\n| S | causal | implementation | ms | TFLOPS | speedup vs FA3 bf16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
        sp = "-" if r["vs_fa3_bf16"] is None else f"{r['vs_fa3_bf16']:.2f}x"
        print(f"| {r['S']} | {'yes' if r['causal'] else 'no'} | {r['impl']} | {r['ms']:.3f} | {tf} | {sp} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
