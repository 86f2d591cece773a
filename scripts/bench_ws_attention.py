#!/usr/bin/env python3
"""The warp-specialized Triton fp8 attention kernel (`backends/triton_ws.py`) against the FA3 fp8 kernel and
the current Triton kernel, kernels alone, on one Hopper GPU.

Inputs are quantized once per shape (every kernel reads the same codes; FA3 gets V in BSHD, the Triton
kernels keys-contiguous V). Times are medians of CUDA-event timings (triton.testing.do_bench); TFLOPS =
4*B*H_q*S*S*D / t, halved for causal. Ratios are to FA3 fp8 in the same run. `ws` columns: one per
config (BLOCK_M, BLOCK_N, num_warps, num_stages); "ws?" says whether the compiled kernel's loop was warp
specialized (a `ttg.warp_specialize` op in its TTGIR). SQNR (dB): the WS kernel's output against the
current Triton kernel's (the same math: differences are accumulation order) and against bf16 SDPA.

    python scripts/bench_ws_attention.py --seqlens 16384 32768 65536 --heads 32/32 32/8 --causal both
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

CONFIGS = [(128, 128, 4, 2), (128, 128, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", nargs="+", default=["32/32", "32/8"], help="H_q/H_kv")
    p.add_argument("--head-dims", type=int, nargs="+", default=[128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[16384, 32768, 65536])
    p.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    p.add_argument("--modes", nargs="+", default=["none"], choices=["none", "block+block_v"],
                   help="scale modes: per-(batch, KV head) descales, or every scale per block")
    p.add_argument("--configs", nargs="+", default=None,
                   help="WS configs as BM,BN,warps,stages (default: %s)" % " ".join(",".join(map(str, c)) for c in CONFIGS))
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _ms(fn, rep_ms):
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def _options(mode: str):
    from hf_fp8_attention.options import FP8AttentionOptions

    extra = dict(qk_scales="block", v_scales="block") if mode == "block+block_v" else {}
    return FP8AttentionOptions(hadamard="none", **extra)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hf_fp8_attention.backends import triton_ws
    from hf_fp8_attention.backends.triton import _launch
    from hf_fp8_attention.metrics import sqnr_db
    from hf_fp8_attention.quantization import quantize_qkv_fp8

    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs] if args.configs else CONFIGS
    has_fa3 = importlib.util.find_spec("flash_attn_interface") is not None
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"FA3: {has_fa3}  date: {time.strftime('%Y-%m-%d')}")
    if has_fa3:
        from hf_fp8_attention.backends.fa3 import fa3_fp8_attention
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    rows = []
    cfg_names = [",".join(map(str, c)) for c in configs]
    print(f"\nB={args.batch}, kernels alone; TFLOPS (x FA3 fp8)")
    print("| mode | D | H_q/H_kv | S | causal | FA3 fp8 | triton | " + " | ".join(f"ws {n}" for n in cfg_names)
          + " | ws? | SQNR ws vs triton | SQNR ws vs bf16 |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(configs) + "---|---|---|")
    for mode, D, heads, S, causal in itertools.product(args.modes, args.head_dims, args.heads, args.seqlens, causals):
        H_q, H_kv = (int(x) for x in heads.split("/"))
        B = args.batch
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H_q, H_kv, H_kv))
        options = _options(mode)
        qkv = quantize_qkv_fp8(q, k, v, options=options, v_keys_contiguous=True)
        scale = D**-0.5
        flops = 4 * B * H_q * S * S * D / (2 if causal else 1)
        tf = lambda ms: flops / ms / 1e9  # noqa: E731
        row = dict(mode=mode, D=D, heads=heads, S=S, causal=causal)
        fa3_ms = None
        if has_fa3 and mode == "none":
            qkv_bshd = quantize_qkv_fp8(q, k, v, options=options)
            fa3_ms = _ms(lambda: fa3_fp8_attention(qkv_bshd, is_causal=causal, scale=scale, out_dtype=torch.bfloat16),
                         args.rep_ms)
            del qkv_bshd
        tri = lambda: _launch(qkv, causal, scale, torch.bfloat16)  # noqa: E731
        tri_out = tri()
        tri_ms = _ms(tri, args.rep_ms)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H_q != H_kv).transpose(1, 2)
        cells, ws_flags, ws_ms, sq_tri, sq_ref = [], [], {}, None, None
        for cfg, name in zip(configs, cfg_names):
            reason = triton_ws.ws_supported(qkv, causal)
            if reason is not None:
                cells.append(f"({reason})")
                continue
            try:
                t0 = time.perf_counter()
                out = triton_ws.ws_fp8_attention(qkv, is_causal=causal, scale=scale, out_dtype=torch.bfloat16, config=cfg)
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                ms = _ms(lambda: triton_ws.ws_fp8_attention(qkv, is_causal=causal, scale=scale,
                                                              out_dtype=torch.bfloat16, config=cfg), args.rep_ms)
            except Exception as err:  # a config that fails to compile or launch is reported, not fatal
                cells.append(f"FAILED {type(err).__name__}")
                print(f"# {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            ws_ms[name] = ms
            ws_flags.append("y" if triton_ws.last_compiled_is_warp_specialized() else "n")
            if sq_tri is None:
                sq_tri, sq_ref = sqnr_db(out, tri_out), sqnr_db(out, ref)
            cells.append(f"{tf(ms):.0f}" + (f" ({fa3_ms / ms:.2f})" if fa3_ms else "") + f" [{first_s:.1f} s]")
            del out
        row.update(fa3_ms=fa3_ms, triton_ms=tri_ms, ws_ms=ws_ms, sqnr_ws_vs_triton=sq_tri, sqnr_ws_vs_bf16=sq_ref)
        rows.append(row)
        fa3_cell = f"{tf(fa3_ms):.0f}" if fa3_ms else "-"
        tri_cell = f"{tf(tri_ms):.0f}" + (f" ({fa3_ms / tri_ms:.2f})" if fa3_ms else "")
        print(f"| {mode} | {D} | {heads} | {S} | {causal} | {fa3_cell} | {tri_cell} | " + " | ".join(cells)
              + f" | {''.join(ws_flags) or '-'} | {sq_tri if sq_tri is None else f'{sq_tri:.1f}'} | "
              f"{sq_ref if sq_ref is None else f'{sq_ref:.1f}'} |", flush=True)
        del q, k, v, qkv, ref, tri_out
        torch.cuda.empty_cache()
    print("\n[s]: the config's first call (compile) at that shape")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, configs=cfg_names, device=torch.cuda.get_device_name(),
                           torch=torch.__version__, triton=triton.__version__), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
