#!/usr/bin/env python3
"""The compiles of `fp8_sdpa`'s first triton call at a new shape, timed without a GPU: triton's JIT on a
stand-in sm_90 driver (the real compiler, ptxas included, targeting Hopper), each measurement in a fresh process
with an empty Triton cache. The call's kernels are found by running the pipeline with every JIT launch
captured (CPU tensors of the shape; nothing runs), then compiled through their own JIT `warmup`:

- serial: the quantizer's kernels, then the Gluon kernel (how a first call compiled before compile-ahead);
- ahead:  the quantizer's kernels inside `triton.compile_ahead` (the Gluon kernel compiling beside them), until
          the context has joined it (what `attention.fp8_attention` does now).

    python scripts/compile_ahead_offline.py --seqlens 4096 16384 --rounds 3

Options are fp8_sdpa's defaults resolved for the shape (`FP8AttentionOptions.for_keys("triton", S)`,
`for_head_dim(D)`), V keys-contiguous in wgmma order, causal, GQA H_q/H_kv. Needs a triton that builds the
Gluon kernel (>= 3.6) and AsyncCompileMode. Times are this machine's CPU (a GPU host's is faster, and the first
call there also loads the kernels and builds their launchers: scripts/first_call.py measures that whole call).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--heads", default="32/8", help="H_q/H_kv")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="serial and ahead runs per shape, alternating")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a child may take")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        a.h_q, a.h_kv = (int(x) for x in a.heads.split("/"))
    except ValueError:
        p.error(f"--heads: H_q/H_kv, got {a.heads!r}")
    if a.h_q % a.h_kv or min(a.seqlens) < 128 or a.rounds < 1 or a.batch < 1:
        p.error("H_q a multiple of H_kv, --seqlens >= 128 (one Gluon query tile), --rounds and --batch >= 1")
    if any(s % 16 for s in a.seqlens) or a.head_dim != 128:
        p.error("the Gluon route wants key counts in whole 16s and D=128 (auto's head dim)")
    return a


def _stand_in_driver():
    """triton's JIT on a machine without a GPU: the active driver answers device 0, stream 0, target sm_90."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class StandIn:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 128)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(StandIn())


def _captured_launches(spec: dict) -> list:
    """The (JIT function, grid, args, kwargs) of every kernel launch the pipeline's quantization makes for this
    shape, captured (nothing compiles or runs)."""
    import torch
    from triton.runtime.jit import JITFunction

    from hf_fp8_attention import attention
    from hf_fp8_attention.options import FP8AttentionOptions
    from hf_fp8_attention.quantization import qkv as quantize_module

    quantize_module._num_sms = lambda device: 132  # (the H200's)
    B, S, D, h_q, h_kv = spec["B"], spec["S"], spec["D"], spec["h_q"], spec["h_kv"]
    captured = []
    real_run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: captured.append((self, grid, args, kwargs))
    try:
        q, k, v = (torch.zeros(B, S, h, D, dtype=torch.bfloat16).transpose(1, 2) for h in (h_q, h_kv, h_kv))
        options = FP8AttentionOptions().for_keys("triton", S).for_head_dim(D)
        try:
            attention.quantize(q, k, v, None, None, None, "triton", options, True, True)
        except Exception:  # noqa: BLE001 (what comes after a captured launch may read its outputs)
            pass
    finally:
        JITFunction.run = real_run
    if not captured:
        raise RuntimeError("the quantization made no kernel launch")
    return captured


def child(spec: dict) -> dict:
    """One measurement in this fresh process (empty TRITON_CACHE_DIR)."""
    os.environ.pop("TRITON_INTERPRET", None)
    _stand_in_driver()
    import torch

    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    gluon_attention._num_sms = lambda index: 132
    launches = _captured_launches(spec)
    B, S, D, h_q, h_kv = spec["B"], spec["S"], spec["D"], spec["h_q"], spec["h_kv"]

    def quantizer():
        for fn, grid, args, kwargs in launches:
            kernel = fn.warmup(*args, grid=grid, **kwargs)
            if hasattr(kernel, "result"):
                kernel.result()

    ahead = triton_backend.compile_ahead(torch.device("cpu"), B, S, h_q, h_kv, S, D, is_causal=True,
                                         scale=D ** -0.5, out_dtype=torch.bfloat16, v_wgmma_order=True)
    t0 = time.perf_counter()
    if spec["mode"] == "serial":
        quantizer()
        t1 = time.perf_counter()
        with ahead:  # (the same warmup, nothing else inside: it compiles alone, then the context joins it)
            pass
    else:
        with ahead:
            quantizer()
            t1 = time.perf_counter()
    total = time.perf_counter() - t0
    kernel = gluon_attention.fp8_attn_fwd_gluon_persistent_kernel
    compiled = len(kernel.device_caches[0][0]) if 0 in kernel.device_caches else 0
    if compiled != 1 or gluon_attention.AHEAD_WARMUPS != 1:
        raise RuntimeError(f"the Gluon kernel did not compile once ({compiled} compiled, "
                           f"{gluon_attention.AHEAD_WARMUPS} warmups)")
    return dict(spec, quantizer_s=t1 - t0, total_s=total, quantizer_kernels=len(launches))


def main(argv=None):
    a = parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child))), flush=True)
        return 0
    import _common

    vers = ", ".join(f"{k} {v}" for k, v in _common.versions().items())
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# offline (no GPU; target sm_90 through a stand-in driver; {os.cpu_count()} CPUs), {vers}, {when}; "
          f"B={a.batch}, H {a.heads}, D={a.head_dim}, causal; each run in a fresh process with an empty Triton "
          "cache", flush=True)
    table, failed = [], False
    for S in a.seqlens:
        times = {"serial": [], "ahead": []}
        quant = []
        for _ in range(a.rounds):
            for mode in ("serial", "ahead"):
                spec = dict(S=S, D=a.head_dim, B=a.batch, h_q=a.h_q, h_kv=a.h_kv, mode=mode)
                result, why = _common.run_fresh_child(os.path.abspath(__file__), spec, {"TRITON_INTERPRET": None},
                                                      a.timeout)
                if result is None:
                    print(f"S={S} {mode}: failed: {why}", flush=True)
                    failed = True
                    continue
                times[mode].append(result["total_s"])
                if mode == "serial":
                    quant.append(result["quantizer_s"])
                print(f"S={S} {mode}: {result['total_s']:.2f} s (quantizer's {result['quantizer_kernels']} "
                      f"kernel(s) {result['quantizer_s']:.2f} s)", flush=True)
        if times["serial"] and times["ahead"]:
            s, h = statistics.median(times["serial"]), statistics.median(times["ahead"])
            table.append([S, f"{statistics.median(quant):.2f}", f"{s - statistics.median(quant):.2f}", f"{s:.2f}",
                          f"{h:.2f}", f"{s / h:.2f}x", f"{s - h:.2f}"])
    print(_common.markdown_table(["S", "quantizer s", "gluon s", "serial s", "ahead s", "serial / ahead",
                                  "saved s"], table) + f"\n(medians of {a.rounds} runs each)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
