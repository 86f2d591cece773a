#!/usr/bin/env python3
"""The first call of `fp8_sdpa` at a new shape, compilation included, as on a fresh machine: each shape runs
in its own child process with an empty Triton cache (a new TRITON_CACHE_DIR), which times its first call (the
quantizer's and the attention kernel's compiles, autotuning, CUDA-side setup after the inputs exist) and then
its second call, both synchronized. The issue's line: the first call of a new shape class within 5 s.

    python scripts/first_call.py --seqlens 4096 16384 65536 --causal both --heads 32/8 --backend triton

Prints one row per (S, causal): first-call s, second-call ms, and the child's wall time (interpreter start and
imports included). Without CUDA it runs the reference backend on the CPU (a smoke run of the script itself).

--compile-ahead off|on|both: the child's HF_FP8_ATTENTION_COMPILE_AHEAD (on: the default, the Gluon kernel's
compile beside the quantizer's, `gluon_attention.compile_ahead`); both: each shape twice, off then on, side by
side (--rounds N: N children each, the order alternating, medians). --breakdown: where the first call's time went, per Triton kernel: its compile (`triton.compile`, in
whichever thread ran it) and its load with the launcher build (`CompiledKernel._init_handles`: the module load
and the launcher's C build on an empty cache), and the rest of the call.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    p.add_argument("--heads", default="32/8", help="H_q/H_kv")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backend", default=None, help="fp8_sdpa's backend (default: auto from the device)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a child may take")
    p.add_argument("--compile-ahead", choices=("off", "on", "both"), default="on",
                   help="HF_FP8_ATTENTION_COMPILE_AHEAD in the child (both: off, then on)")
    p.add_argument("--breakdown", action="store_true", help="time each kernel's compile and load in the first call")
    p.add_argument("--rounds", type=int, default=1,
                   help="children per shape and flag, the flags' order alternating (with --compile-ahead both: medians)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one shape, run by the parent
    a = p.parse_args(argv)
    try:
        a.h_q, a.h_kv = (int(x) for x in a.heads.split("/"))
    except ValueError:
        p.error(f"--heads: H_q/H_kv, got {a.heads!r}")
    if a.h_q % a.h_kv or min(a.seqlens) < 1 or a.timeout <= 0 or a.rounds < 1:
        p.error("H_q must be a multiple of H_kv; --seqlens, --timeout and --rounds positive")
    return a


def _instrument(events: list) -> None:
    """Times every Triton compile and kernel load (with its launcher build) in this process into ``events``:
    (what, kernel name, seconds, thread name). Before any kernel is compiled (the JIT picks `compile` up from
    triton.compiler when it first builds its binder)."""
    import threading

    import triton.compiler
    import triton.compiler.compiler as compiler

    real_compile, real_init = compiler.compile, compiler.CompiledKernel._init_handles

    def compile(src, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_compile(src, *args, **kwargs)
        finally:
            name = getattr(getattr(src, "fn", None), "__name__", None) or getattr(src, "name", "?")
            events.append(("compile", name, time.perf_counter() - t0, threading.current_thread().name))

    def init_handles(self):
        if self.module is not None:
            return real_init(self)
        t0 = time.perf_counter()
        try:
            return real_init(self)
        finally:
            events.append(("load", self.name, time.perf_counter() - t0, threading.current_thread().name))

    compiler.compile = triton.compiler.compile = compile
    compiler.CompiledKernel._init_handles = init_handles


def child(spec: dict) -> dict:
    """One shape's first and second call (in this fresh process)."""
    import torch

    events = []
    if spec.get("breakdown") and torch.cuda.is_available():
        _instrument(events)
    from hf_fp8_attention import fp8_sdpa

    device = "cuda" if torch.cuda.is_available() else "cpu"
    S, D, causal = spec["S"], spec["D"], spec["causal"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, S, h, D, device=device, generator=g).bfloat16().transpose(1, 2)
               for h in (spec["h_q"], spec["h_kv"], spec["h_kv"]))
    backend = spec["backend"] if device == "cuda" else "reference"

    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fp8_sdpa(q, k, v, is_causal=causal, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("non-finite output")
        return time.perf_counter() - t0

    first = timed()
    first_events = list(events)
    second = timed()
    return dict(spec, backend=backend, device=device, first_s=first, second_ms=second * 1e3, events=first_events)


def _medians(rows: list[dict]) -> list[list]:
    """Per (S, causal) with first calls both with compile-ahead off and on: their medians and ratio."""
    import statistics

    times: dict = {}
    for r in rows:
        if "error" not in r:
            times.setdefault((r["S"], r["causal"]), {}).setdefault(r["compile_ahead"], []).append(r["first_s"])
    out = []
    for (S, causal), by_flag in times.items():
        if False in by_flag and True in by_flag:
            off, on = statistics.median(by_flag[False]), statistics.median(by_flag[True])
            out.append([S, "yes" if causal else "no", f"{off:.2f}", f"{on:.2f}", f"{off / on:.2f}x"])
    return out


def _breakdown(result: dict, flag: str) -> list[str]:
    """The first call's events as lines: each compile and load (seconds, thread), then their sums and the rest."""
    events = result.get("events") or []
    head = (f"## first call at S={result['S']}, causal {'yes' if result['causal'] else 'no'}, compile ahead {flag}: "
            f"{result['first_s']:.2f} s")
    if not events:
        return [head, "(no Triton compile or load recorded: cached, or no CUDA)"]
    lines = [head] + [f"- {what} {name}: {sec:.2f} s ({thread})" for what, name, sec, thread in events]
    main_thread = sum(sec for what, _, sec, thread in events if thread == "MainThread")
    compiles = sum(sec for what, _, sec, _ in events if what == "compile")
    loads = sum(sec for what, _, sec, _ in events if what == "load")
    lines.append(f"- compiles {compiles:.2f} s, loads {loads:.2f} s; in the main thread {main_thread:.2f} s, the "
                 f"rest of the call {result['first_s'] - main_thread:.2f} s (waiting on a worker's compile included)")
    return lines


def main(argv=None):
    a = parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child))), flush=True)
        return 0
    import _common
    import torch

    causals = {"yes": [True], "no": [False], "both": [False, True]}[a.causal]
    device = _common.device_name("cuda") if torch.cuda.is_available() else "CPU (reference backend)"
    vers = ", ".join(f"{k} {v}" for k, v in _common.versions().items())
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {device}, {vers}, {when}; B=1, H {a.heads}, D={a.head_dim}, backend {a.backend or 'auto'}; each "
          "shape in a fresh process with an empty Triton cache", flush=True)
    aheads = {"off": ["0"], "on": ["1"], "both": ["0", "1"]}[a.compile_ahead]
    rows, table, breakdowns = [], [], []
    # rounds alternate the order of the flags (the first child of a run also warms the OS's file cache)
    runs = [(S, c, r, h) for S in a.seqlens for c in causals for r in range(a.rounds)
            for h in (aheads if r % 2 == 0 else aheads[::-1])]
    for S, causal, round_, ahead in runs:
        spec = dict(S=S, D=a.head_dim, causal=causal, h_q=a.h_q, h_kv=a.h_kv, backend=a.backend,
                    compile_ahead=ahead == "1", breakdown=a.breakdown, round=round_)
        t0 = time.perf_counter()
        result, why = _common.run_fresh_child(os.path.abspath(__file__), spec,
                                              {"HF_FP8_ATTENTION_COMPILE_AHEAD": ahead}, a.timeout)
        wall = time.perf_counter() - t0
        flag = "on" if ahead == "1" else "off"
        if result is None:
            table.append([S, "yes" if causal else "no", flag, round_ + 1, "-", "-", f"{wall:.1f}", f"failed: {why}"])
            rows.append(dict(spec, error=why, wall_s=wall))
            continue
        result["wall_s"] = wall
        rows.append(result)
        table.append([S, "yes" if causal else "no", flag, round_ + 1, f"{result['first_s']:.2f}",
                      f"{result['second_ms']:.2f}", f"{wall:.1f}", result["backend"]])
        if a.breakdown:
            breakdowns.append(_breakdown(result, flag))
    print(_common.markdown_table(["S", "causal", "compile ahead", "round", "first call s", "second call ms",
                                  "child wall s", "backend"], table))
    summary = _medians(rows)
    if summary:
        print(f"\nmedians over {a.rounds} round(s), compile-ahead off / on in alternating order")
        print(_common.markdown_table(["S", "causal", "first call s, off", "first call s, on", "off / on"], summary))
    for lines in breakdowns:
        print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
