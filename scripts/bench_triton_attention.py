#!/usr/bin/env python3
"""Triton fp8 attention kernel alone vs FA3 fp8 / FA3 bf16, on one GPU.

Quantized inputs are prepared once (the kernels alone are timed, no quantization). Columns: `triton` is
the backend as dispatched (long prefills copy V to keys-contiguous), `bshd_v` reads BSHD V in place
(on-chip transpose), `vt_no_copy` gets V already keys-contiguous. Times are medians of CUDA-event
timings (triton.testing.do_bench, return_mode="median"); TFLOPS = 4*B*H*S*S*D / t, halved for causal. SQNR is against bf16 SDPA on the bf16 inputs. The first call per (head_dim, causal) includes
autotuning and compilation and is printed once. `--sweep` times explicit tile configs; `--decode` times
S_q = 1 over long key ranges.

    python scripts/bench_triton_attention.py --head-dims 128 64 256 --decode [--sweep]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dims", type=int, nargs="+", default=[128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--sweep", action="store_true", help="time explicit tile configs at D=128, S=4k/16k")
    p.add_argument("--decode", action="store_true", help="time S_q=1 decode (GQA 32/8)")
    return p.parse_args(argv)


def _ms(fn, rep_ms):
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def _sqnr(out, ref):
    from hf_fp8_attention.metrics import sqnr_db

    return sqnr_db(out, ref)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hf_fp8_attention.backends.triton import _launch, triton_fp8_attention
    from hf_fp8_attention.quantization.quantized import keys_contiguous
    from hf_fp8_attention.quantization import QuantizedQKV, quantize_qkv_fp8

    has_fa3 = importlib.util.find_spec("flash_attn_interface") is not None
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"FA3: {has_fa3}")
    torch.ones(1, device="cuda").sum().item()
    rows = []
    first_call = {}
    b, h = args.batch, args.heads
    for d in args.head_dims:
        for causal in (False, True):
            for s in args.seqlens:
                g = torch.Generator(device="cuda").manual_seed(s)
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                           for _ in range(3))
                qkv = quantize_qkv_fp8(q, k, v)
                scale = d**-0.5
                run = lambda: triton_fp8_attention(qkv, is_causal=causal, scale=scale, out_dtype=torch.bfloat16)  # noqa: E731
                if (d, causal) not in first_call:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run()
                    torch.cuda.synchronize()
                    first_call[(d, causal)] = (s, time.perf_counter() - t0)
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                tf = lambda ms: flops / ms / 1e9  # noqa: E731
                row = {"D": d, "causal": causal, "S": s}
                out = run()
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)
                row["sqnr"] = _sqnr(out, ref)
                del ref
                row["triton"] = tf(_ms(run, args.rep_ms))
                row["bshd_v"] = tf(_ms(lambda: _launch(qkv, causal, scale, torch.bfloat16, v_keys_contiguous=False),
                                       args.rep_ms))
                # V written keys-contiguous by the quantizer (prepared once here): no copy in the timing.
                v_t = keys_contiguous(qkv.v)
                qkv_t = QuantizedQKV(qkv.q, qkv.k, v_t, qkv.q_descale, qkv.k_descale, qkv.v_descale)
                row["vt_no_copy"] = tf(_ms(lambda: _launch(qkv_t, causal, scale, torch.bfloat16), args.rep_ms))
                if has_fa3:
                    from flash_attn_interface import flash_attn_func

                    from hf_fp8_attention.backends.fa3 import fa3_fp8_attention

                    row["fa3_fp8"] = tf(_ms(lambda: fa3_fp8_attention(qkv, is_causal=causal, scale=scale,
                                                                      out_dtype=torch.bfloat16), args.rep_ms))
                    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
                    row["fa3_bf16"] = tf(_ms(lambda: flash_attn_func(qb, kb, vb, causal=causal), args.rep_ms))
                rows.append(row)
                print(row, flush=True)
                del q, k, v, qkv, out

    if args.sweep:
        print("\n## tile sweep, D=128 (TFLOPS, kernel only)")
        configs = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4),
                   (64, 64, 4, 3), (128, 128, 4, 2), (64, 128, 4, 3)]
        for causal in (False, True):
            for s in (4096, 16384):
                q, k, v = (torch.randn(b, s, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                           for _ in range(3))
                qkv = quantize_qkv_fp8(q, k, v)
                flops = 4 * b * h * s * s * 128 / (2 if causal else 1)
                res = []
                for bm, bn, w, st in configs:
                    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                    for vt in (False, True):
                        try:
                            ms = _ms(lambda: _launch(qkv, causal, 0.1, torch.bfloat16, config=cfg,
                                                     v_keys_contiguous=vt), args.rep_ms)
                            res.append(f"{bm}/{bn}/w{w}/s{st}{'/vt' if vt else ''}={flops / ms / 1e9:.0f}")
                        except Exception as e:  # out of shared memory / registers: report, go on
                            res.append(f"{bm}/{bn}/w{w}/s{st}{'/vt' if vt else ''}=ERR({type(e).__name__})")
                print(f"causal={causal} S={s}: " + "  ".join(res), flush=True)

    if args.decode:
        print("\n## decode S_q=1, B=1, H_q=32, H_kv=8, D=128 (us; GB/s of K+V read)")
        for s_kv in (1024, 4096, 16384, 32768, 131072):
            q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(1, s_kv, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
            qkv = quantize_qkv_fp8(q, k, v)
            ms = _ms(lambda: triton_fp8_attention(qkv, is_causal=True, scale=0.1, out_dtype=torch.bfloat16), args.rep_ms)
            ms1 = _ms(lambda: _launch(qkv, True, 0.1, torch.bfloat16,
                                      config={"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}),
                      args.rep_ms)
            line = f"S_kv={s_kv}: split {ms * 1e3:.1f} us ({2 * s_kv * 8 * 128 / ms / 1e6:.0f} GB/s), " \
                   f"no split {ms1 * 1e3:.1f} us"
            if has_fa3:
                from hf_fp8_attention.backends.fa3 import fa3_fp8_attention

                ms3 = _ms(lambda: fa3_fp8_attention(qkv, is_causal=True, scale=0.1, out_dtype=torch.bfloat16),
                          args.rep_ms)
                line += f", FA3 fp8 {ms3 * 1e3:.1f} us"
            print(line, flush=True)

    print("\n## first call (autotune + compile), per (D, causal): " + ", ".join(
        f"D={d} causal={c} S={s}: {t:.1f} s" for (d, c), (s, t) in first_call.items()))
    print(f"\n## TFLOPS, B={b}, H={h}, kernel only (quantized inputs prepared once); SQNR vs bf16 SDPA")
    cols = ["triton", "bshd_v", "vt_no_copy"] + (["fa3_fp8", "fa3_bf16"] if has_fa3 else [])
    print("| D | causal | S | " + " | ".join(cols) + " | triton/fa3_fp8 | SQNR dB |")
    print("|---" * (len(cols) + 5) + "|")
    for r in rows:
        ratio = f"{r['triton'] / r['fa3_fp8']:.2f}" if has_fa3 else "-"
        print(f"| {r['D']} | {'yes' if r['causal'] else 'no'} | {r['S']} | "
              + " | ".join(f"{r[c]:.0f}" for c in cols) + f" | {ratio} | {r['sqnr']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
