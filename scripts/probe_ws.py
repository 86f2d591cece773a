#!/usr/bin/env python3
"""One build of an experimental attention kernel in its own process (a hung kernel is killed by the caller's
timeout): the TMA kernel of `backends/triton_ws.py` (warp specialized by triton or not), or with --gluon 1
the Gluon kernel of `backends/gluon_attention.py`. B=1, H=8, S=4096, D=128 by default; prints whether it
finished, whether the triton build's loop was warp specialized, SQNR against the current Triton kernel,
and with --bench 1 TFLOPS next to that kernel and FA3 fp8.

    timeout 60 python scripts/probe_ws.py --ws 1 --split 1 --config 128,128,4,2 --seq 4096 --causal 0
    timeout 60 python scripts/probe_ws.py --gluon 1 --config 128,128,8,2 --causal 1

Where the scores fit in 8 GiB it also prints the SQNR of the probed kernel and of the Triton kernel against
float32 attention of the same bf16 inputs.
"""
import argparse
import dataclasses
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
p.add_argument("--kv-heads", type=int, default=0, help="KV heads (default: --heads)")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--causal", type=int, default=0)
p.add_argument("--bench", type=int, default=0)
p.add_argument("--variant", type=int, default=0, help="triton_ws.ws_fp8_attention's variant bits")
p.add_argument("--gluon", type=int, default=0, help="the Gluon kernel (--config: BM,BN,warps,stages)")
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--consumers", type=int, default=1, help="the Gluon kernel's consumer partitions (1 or 2)")
p.add_argument("--pingpong", type=int, default=0, help="the Gluon kernel: two consumers' MMAs issued in turn")
p.add_argument("--persistent", type=int, default=0, help="the Gluon kernel: one program per SM over the tiles")
p.add_argument("--order", type=int, default=-1, help="the persistent Gluon kernel's causal tile order: 1 heads "
               "fastest, 0 head by head, -1 the launcher's pick")
p.add_argument("--v-order", type=int, default=0, help="the Gluon kernel: V's keys in wgmma order (reordered here)")
p.add_argument("--rowsum-mma", type=int, default=0, help="the persistent Gluon kernel: P's row sums by an MMA with "
               "ones (A/B against the same build without)")
p.add_argument("--v-offset", type=float, default=0.0, help="added to every V (a channel offset: the case where "
               "one-level fp8 P.V accumulation, FA3's, loses accuracy)")
a = p.parse_args()
import os

from hf_fp8_attention.backends import triton as triton_backend

os.environ[triton_backend.KERNEL_ENV] = "triton"  # the reference column is the Triton kernel, not the default route
from hf_fp8_attention.backends import gluon_attention, triton_ws
from hf_fp8_attention.backends.triton import _launch
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import quantize_qkv_fp8
from hf_fp8_attention.quantization.quantized import wgmma_key_order

cfg = tuple(int(x) for x in a.config.split(","))
S, H, D, B, H_kv = a.seq, a.heads, a.head_dim, a.batch, a.kv_heads or a.heads
q, k, v = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv, H_kv))
v = v + a.v_offset
opts = FP8AttentionOptions(hadamard="none")
qkv = quantize_qkv_fp8(q, k, v, options=opts, v_keys_contiguous=True)
exact = None
if S * S * B * H <= 2**31:  # float32 attention of the same bf16 inputs (up to 8 GiB of scores)
    g = H // H_kv
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1), is_causal=bool(a.causal),
        scale=D**-0.5).transpose(1, 2)
ref_qkv = qkv  # the Triton kernel's input (V in key order)
old = _launch(ref_qkv, bool(a.causal), D**-0.5, torch.bfloat16)
vs_exact = lambda out: (  # noqa: E731
    f", SQNR vs float32 {sqnr_db(out.float(), exact):.1f} dB" if exact is not None else "")
gluon_name = (f"gluon consumers={a.consumers} pingpong={a.pingpong} persistent={a.persistent} config={cfg}"
              + (f" v_order={a.v_order}" if a.v_order else "") + (f" order={a.order}" if a.order >= 0 else "")
              + (" rowsum_mma=1" if a.rowsum_mma else ""))
name = (gluon_name if a.gluon else f"ws={a.ws} split={a.split} variant={a.variant} config={cfg}") + \
    f" S={a.seq} H={a.heads} D={a.head_dim} causal={a.causal} B={a.batch} H_kv={a.kv_heads or a.heads}" + \
    (f" v_offset={a.v_offset:g}" if a.v_offset else "")
gluon_args = dict(is_causal=bool(a.causal), scale=D**-0.5, out_dtype=torch.bfloat16, config=cfg,
                  consumers=a.consumers, pingpong=bool(a.pingpong))
if a.gluon:
    if a.v_order:  # the same codes, keys reordered (the reference column reads ref_qkv)
        qkv = dataclasses.replace(qkv, v=wgmma_key_order(qkv.v), v_wgmma_order=True)

    def gluon_build(rowsum_mma: bool):
        """This build (--persistent, --v-order, --order), with or without the row sums by MMA."""
        return lambda: gluon_attention.gluon_fp8_attention(
            qkv, persistent=bool(a.persistent), v_wgmma_order=bool(a.v_order),
            heads_fastest=None if a.order < 0 else bool(a.order), rowsum_mma=rowsum_mma, **gluon_args)

    run = gluon_build(bool(a.rowsum_mma))
else:
    run = lambda: triton_ws.ws_fp8_attention(qkv, is_causal=bool(a.causal), scale=D**-0.5,  # noqa: E731
                                             out_dtype=torch.bfloat16, config=cfg, warp_specialize=bool(a.ws),
                                             split_loops=bool(a.split), variant=a.variant)
t0 = time.perf_counter()
out = run()
torch.cuda.synchronize()
first_s = time.perf_counter() - t0  # this kernel's first call alone (compile + run)
ws = "gluon partitions" if a.gluon else triton_ws.last_compiled_is_warp_specialized()
print(f"{name}: finished in {first_s:.1f} s, warp specialized: {ws}, "
      f"SQNR vs triton kernel {sqnr_db(out, old):.1f} dB, finite: {bool(torch.isfinite(out).all())}"
      f"{vs_exact(out)}{' (triton kernel' + vs_exact(old) + ')' if exact is not None else ''}", flush=True)
if a.bench:
    flops = 4 * B * H * S * S * D / (2 if a.causal else 1)
    ms = triton.testing.do_bench(run, warmup=10, rep=100, return_mode="median")
    ms_old = triton.testing.do_bench(lambda: _launch(ref_qkv, bool(a.causal), D**-0.5, torch.bfloat16), warmup=10,
                                     rep=100, return_mode="median")
    line = f"{name}: ws {flops / ms / 1e9:.0f} TFLOPS, triton kernel {flops / ms_old / 1e9:.0f}"
    if importlib.util.find_spec("flash_attn_interface"):
        from hf_fp8_attention.backends.fa3 import fa3_fp8_attention
        qb = quantize_qkv_fp8(q, k, v, options=opts)
        ms_fa3 = triton.testing.do_bench(lambda: fa3_fp8_attention(qb, is_causal=bool(a.causal), scale=D**-0.5,
                                                                   out_dtype=torch.bfloat16), warmup=10, rep=100,
                                         return_mode="median")
        line += f", FA3 fp8 {flops / ms_fa3 / 1e9:.0f} (ws / FA3 {ms_fa3 / ms:.2f})"
        if exact is not None:
            fa3_out = fa3_fp8_attention(qb, is_causal=bool(a.causal), scale=D**-0.5, out_dtype=torch.bfloat16)
            line += f", FA3 fp8{vs_exact(fa3_out)}"

    def against(other, other_name, this_name, ratio_name):
        """other timed between two more runs of this build (alternating), as TFLOPS and the time ratio."""
        other()
        torch.cuda.synchronize()
        ab = [triton.testing.do_bench(f, warmup=10, rep=100, return_mode="median") for f in (other, run) * 2]
        return (f"; A/B {other_name} {flops / ab[0] / 1e9:.0f} / {flops / ab[2] / 1e9:.0f}, {this_name} "
                f"{flops / ab[1] / 1e9:.0f} / {flops / ab[3] / 1e9:.0f} TFLOPS ({ratio_name} "
                f"{(ab[0] + ab[2]) / (ab[1] + ab[3]):.3f})")

    if a.gluon and a.v_order:  # the same build with V in key order
        line += against(lambda: gluon_attention.gluon_fp8_attention(ref_qkv, persistent=bool(a.persistent),
                                                                    rowsum_mma=bool(a.rowsum_mma), **gluon_args),
                        "natural order", "wgmma order", "wgmma / natural")
    if a.gluon and a.rowsum_mma:  # the same build with the row sums in the softmax
        base = gluon_build(False)
        base_out = base()
        line += f"; without rowsum_mma SQNR vs it {sqnr_db(out, base_out):.1f} dB{vs_exact(base_out)}"
        line += against(base, "row sums in the softmax", "row sums by MMA", "MMA / softmax")
    elif a.gluon and a.persistent:  # the one-tile build of the same config
        line += against(lambda: gluon_attention.gluon_fp8_attention(qkv, v_wgmma_order=bool(a.v_order),
                                                                    **gluon_args),
                        "one-tile", "persistent", "persistent / one-tile")
    print(line, flush=True)
sys.exit(0)
