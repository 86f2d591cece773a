#!/usr/bin/env python3
"""One variant of the warp-specialized kernel in its own process (a hung kernel is killed by the caller's
timeout): B=1, H=8, D=128, non-causal/causal; prints whether it finished, whether its loop was warp
specialized, SQNR against the current Triton kernel and TFLOPS next to FA3 fp8 and that kernel.

    timeout 60 python scripts/probe_ws.py --ws 1 --split 1 --config 128,128,4,2 --seq 4096 --causal 0
"""
import argparse
import importlib.util
import sys
import time

import torch
import triton.testing

p = argparse.ArgumentParser()
p.add_argument("--ws", type=int, default=1)
p.add_argument("--split", type=int, default=1)
p.add_argument("--config", default="128,128,4,2")
p.add_argument("--seq", type=int, default=4096)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--causal", type=int, default=0)
p.add_argument("--bench", type=int, default=0)
p.add_argument("--variant", type=int, default=0, help="triton_ws.ws_fp8_attention's variant bits")
a = p.parse_args()
from hf_fp8_attention.backends import triton_ws
from hf_fp8_attention.backends.triton import _launch
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import quantize_qkv_fp8

cfg = tuple(int(x) for x in a.config.split(","))
name = f"ws={a.ws} split={a.split} variant={a.variant} config={cfg} S={a.seq} H={a.heads} causal={a.causal}"
S, H, D = a.seq, a.heads, 128
q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
opts = FP8AttentionOptions(hadamard="none")
qkv = quantize_qkv_fp8(q, k, v, options=opts, v_keys_contiguous=True)
run = lambda: triton_ws.ws_fp8_attention(qkv, is_causal=bool(a.causal), scale=D**-0.5, out_dtype=torch.bfloat16,  # noqa: E731
                                         config=cfg, warp_specialize=bool(a.ws), split_loops=bool(a.split),
                                         variant=a.variant)
t0 = time.perf_counter()
out = run()
torch.cuda.synchronize()
old = _launch(qkv, bool(a.causal), D**-0.5, torch.bfloat16)
print(f"{name}: finished in {time.perf_counter() - t0:.1f} s, warp specialized: "
      f"{triton_ws.last_compiled_is_warp_specialized()}, SQNR vs triton kernel {sqnr_db(out, old):.1f} dB", flush=True)
if a.bench:
    flops = 4 * H * S * S * D / (2 if a.causal else 1)
    ms = triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")
    ms_old = triton.testing.do_bench(lambda: _launch(qkv, bool(a.causal), D**-0.5, torch.bfloat16), warmup=10,
                                     rep=100, return_mode="median")
    line = f"{name}: ws {flops / ms / 1e9:.0f} TFLOPS, triton kernel {flops / ms_old / 1e9:.0f}"
    if importlib.util.find_spec("flash_attn_interface"):
        from hf_fp8_attention.backends.fa3 import fa3_fp8_attention
        qb = quantize_qkv_fp8(q, k, v, options=opts)
        ms_fa3 = triton.testing.do_bench(lambda: fa3_fp8_attention(qb, is_causal=bool(a.causal), scale=D**-0.5,
                                                                   out_dtype=torch.bfloat16), warmup=10, rep=100,
                                         return_mode="median")
        line += f", FA3 fp8 {flops / ms_fa3 / 1e9:.0f} (ws / FA3 {ms_fa3 / ms:.2f})"
    print(line, flush=True)
sys.exit(0)
