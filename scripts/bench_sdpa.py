#!/usr/bin/env python3
"""One attention layer: fp8 SDPA (quantization included) vs FA3 bf16 vs torch SDPA, on one GPU.

Inputs are laid out as Transformers hands them over: (B, H, S, D) views of (B, S, H, D) memory.
Times are medians of CUDA-event timings (triton.testing.do_bench); TFLOPS = 4*B*H*S_q*S_kv*D / t, halved
for causal. Prints a markdown table; `--json` writes the rows, `--plot` a PNG (TFLOPS vs S, one line per
implementation, non-causal and causal panels).

Accuracy: each row with an attention output gets its SQNR (dB) against torch SDPA on the same inputs, in
bf16 (default) or float32 (``--sqnr-ref fp32``). fp8 rows run once per accuracy mode
(`hf_fp8_attention.accuracy.MODES` whose keywords `fp8_sdpa` takes; "none" only before that exists);
``--modes`` picks some.

Mode cost: with more than one mode, a second table gives each mode's time relative to mode none of the same
implementation, measured in the same run (fp8_fa3, fp8_triton, and the quantize kernel alone), plus the
V-mean add-back of smooth_v (`attention.restore_output`) timed alone. ``--rounds N`` times every candidate
N times, round-robin, and reports the median, so that slow drifts (clocks, temperature) hit all modes alike:

    python scripts/bench_sdpa.py --seqlens 4096 16384 32768
    python scripts/bench_sdpa.py --head-dims 64 128 256 --seqlens 1024 4096 --modes none qkv --plot sdpa.png
    python scripts/bench_sdpa.py --seqlens 16384 --modes none smooth_k smooth_k+smooth_v --rounds 5 \
        --impls fp8_fa3 fp8_triton "quantize only" "add-back"      # mode-cost table at S=16k, both causal

Where the triton backend's Gluon kernel reads V in wgmma key order (Hopper, D=128), a further table times that
kernel against the same build on V in key order (route ``gluon-pp-persistent-key-order``) and the quantizer
writing each V layout, all in the same run.

``--host``: per implementation and shape, the host cost of one call (30 calls launched back to back after a
synchronize, timed before the closing one: the host alone) and the GPU time of one call from CUDA-graph
replays (`_common.graph_ms`, L2 flushed; "not capturable" with the reason otherwise), next to the eager ms:

    python scripts/bench_sdpa.py --seqlens 4096 --causal yes --modes none qk --impls "FA3 bf16" fp8_fa3 --host

``--host-profile FILE`` (with ``--host``): a cProfile of each implementation's host loop, written to FILE (the
`HOST_PROFILE_TOP` functions with the most own time, µs per call own and cumulative), to see where a call's host
time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def available_modes() -> dict[str, dict]:
    """Accuracy mode name -> fp8_sdpa kwargs, for the modes this fp8_sdpa accepts ("none" always first)."""
    modes = {"none": {}}
    try:
        from hf_fp8_attention import fp8_sdpa
        from hf_fp8_attention.accuracy import MODES
    except ImportError:
        return modes
    params = inspect.signature(fp8_sdpa).parameters
    modes.update({name: dict(kw) for name, kw in MODES.items() if all(k in params for k in kw)})
    return modes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="head dims to sweep (default: 128)")
    p.add_argument("--head-dim", type=int, default=None, help="one head dim (same as --head-dims D)")
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--modes", nargs="+", default=None, help="fp8 accuracy modes to run (default: all available)")
    p.add_argument("--sqnr-ref", choices=["bf16", "fp32", "off"], default="bf16", help="SQNR reference: torch SDPA in bf16 or float32")
    p.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement (ms)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every candidate this many times, round-robin, and report the median")
    p.add_argument("--impls", nargs="+", default=None,
                   help="run only the implementations whose name contains one of these (e.g. 'FA3' fp8_triton)")
    p.add_argument("--json", type=str, default=None, help="write the rows to this file")
    p.add_argument("--plot", type=str, default=None, help="write a PNG of TFLOPS vs S (needs matplotlib)")
    p.add_argument("--host", action="store_true",
                   help="also the host cost of one call (HOST_CALLS calls launched back to back, no sync) and its "
                   "GPU time from CUDA-graph replays, per implementation, at each shape")
    p.add_argument("--host-profile", type=str, default=None, metavar="FILE",
                   help="with --host: write a cProfile of each implementation's host loop to FILE")
    args = p.parse_args(argv)
    if args.host_profile and not args.host:
        p.error("--host-profile needs --host")
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if args.head_dim is not None and args.head_dims is not None:
        p.error("pass --head-dims or --head-dim, not both")
    args.head_dims = args.head_dims or [args.head_dim or 128]
    args.head_dim = args.head_dims[0]
    if any(d < 1 for d in args.head_dims) or any(s < 1 for s in args.seqlens):
        p.error("--head-dims and --seqlens must be positive")
    if args.rounds < 1:
        p.error("--rounds must be positive")
    modes = available_modes()
    if args.modes is None:
        args.modes = list(modes)
    unknown = [m for m in args.modes if m not in modes]
    if unknown:
        p.error(f"--modes: unknown or unsupported {unknown}; available: {', '.join(modes)}")
    args.mode_kwargs = {m: modes[m] for m in args.modes}
    if args.plot and not _common.have_matplotlib():
        p.error("--plot needs matplotlib (pip install matplotlib)")
    return args


HOST_CALLS = 30  # few enough that the launch queue never fills: the loop measures the host alone


def host_us(fn) -> float:
    """Microseconds of host time per call: HOST_CALLS calls launched back to back after a synchronize (the
    GPU drains the queue behind them), timed before the closing synchronize."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / HOST_CALLS * 1e6


HOST_PROFILE_TOP = 40  # functions listed per implementation in --host-profile's file


def host_profile(fn, title: str) -> str:
    """A cProfile over `host_us`'s loop (its first call and the synchronizes included), as a table of the top
    `HOST_PROFILE_TOP` functions by own time: calls and microseconds per profiled call (own and cumulative;
    the profiler's overhead included, so the sum exceeds `host_us`)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    host_us(fn)
    prof.disable()
    n = HOST_CALLS + 1
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:HOST_PROFILE_TOP]
    lines = [f"## {title}: {n} calls; us per call", "| own us | cumulative us | calls per call | function |",
             "|---|---|---|---|"]
    for (path, line, name), (_, calls, own, cum, _) in top:
        where = f"{os.path.basename(path)}:{line}" if line else path
        lines.append(f"| {own / n * 1e6:.1f} | {cum / n * 1e6:.1f} | {calls / n:.2f} | {where} {name} |")
    return "\n".join(lines) + "\n"


def host_rows(cands: dict, shape: dict, profile: list[str] | None = None) -> list[dict]:
    """Per implementation: host us per call, GPU ms from CUDA-graph replays (None when not capturable: the
    error is kept), and eager ms as measured by the main table. `profile`: a list that gets each
    implementation's `host_profile` text."""
    rows = []
    for name, (cand, eager_ms) in cands.items():
        row = dict(shape, impl=name, host_us=host_us(cand.fn), graph_ms=None, eager_ms=eager_ms, graph_error=None)
        if profile is not None:
            profile.append(host_profile(cand.fn, f"{name} {shape}"))
        try:
            row["graph_ms"] = _common.graph_ms(cand.fn, "cuda")
        except _common.GraphCaptureError as err:  # not capturable: say why
            row["graph_error"] = str(err)[:120]
        rows.append(row)
    return rows


def _median_ms(fn, rep_ms):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


@dataclass
class Candidate:
    """A timed callable. ``output``: it returns an attention output (BSHD if ``bshd``), scored by SQNR."""

    name: str
    fn: Callable
    output: bool = True
    bshd: bool = False
    mode: str | None = None


def _fp8_backends(device) -> list[str]:
    """fp8_sdpa backends with a kernel usable on ``device`` (the reference emulation is not benchmarked)."""
    from hf_fp8_attention import BACKENDS
    from hf_fp8_attention.dispatch import check_backend

    usable = []
    for b in BACKENDS:
        if b == "reference":
            continue
        try:
            check_backend(b, device)
        except Exception as e:  # not for this GPU / kernel not installed: say why once per shape
            print(f"# fp8_{b}: not benchmarked ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        usable.append(b)
    return usable


def _candidates(q, k, v, causal, modes: dict[str, dict] | None = None, exp2_rows: bool = False) -> list[Candidate]:
    """Only what is installed/usable on this GPU is listed. exp2_rows: the Gluon kernel's exponentials A/B rows
    (`EXP2_ROW`) too."""
    from hf_fp8_attention import fp8_sdpa, quantize_qkv_fp8
    from hf_fp8_attention.dispatch import kernel_available

    modes = {"none": {}} if modes is None else modes
    gqa = q.shape[1] != k.shape[1]
    out = []

    def torch_sdpa(backend):
        def run():
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        return run

    def kernel_only(name, backend_fn, v_keys_contiguous=False, v_wgmma_order=False, env=None, direct=True,
                    q_in_kernel=False, options=None):
        """An fp8 kernel alone on inputs quantized once, outside the timing (V in the layout fp8_sdpa's
        quantizer writes for that backend: no per-call copy inside the timing). env: environment variables
        set around each call (the triton backend's kernel route); direct False: every launch through Triton's
        JIT (`_common.direct_launches`); q_in_kernel: Q left to the kernel (`QuantizedQKV.q_in_kernel`)."""
        extra = dict(q_in_kernel=True) if q_in_kernel else {}
        if options is not None:  # (an accuracy mode; default: NO_MODES)
            extra["options"] = options
        qkv = quantize_qkv_fp8(q, k, v, v_keys_contiguous=v_keys_contiguous, v_wgmma_order=v_wgmma_order, **extra)
        scale = q.shape[-1] ** -0.5
        # (the JIT switch only where asked for: the other rows' host time carries no extra context)
        launches = contextlib.nullcontext if direct else lambda: _common.direct_launches(False)

        def run():
            with _common.environment(env or {}), launches():
                return backend_fn(qkv, is_causal=causal, scale=scale, out_dtype=q.dtype)

        return Candidate(name, run, bshd=True, mode="none")

    out.append(Candidate("torch sdpa flash bf16", torch_sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION)))
    out.append(Candidate("torch sdpa cudnn bf16", torch_sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)))
    if kernel_available("fa3"):
        from flash_attn_interface import flash_attn_func

        from hf_fp8_attention.backends.fa3 import fa3_fp8_attention

        qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))  # BSHD, no copy

        def fa3_bf16():
            res = flash_attn_func(qb, kb, vb, causal=causal)
            return res[0] if isinstance(res, tuple) else res

        out.append(Candidate("FA3 bf16", fa3_bf16, bshd=True))
        out.append(kernel_only("FA3 fp8 kernel only", fa3_fp8_attention))
    backends = _fp8_backends(q.device)
    if "triton" in backends:
        from hf_fp8_attention.backends.triton import triton_fp8_attention

        from hf_fp8_attention.backends import TRITON_KERNEL_ENV, triton_reads_v_keys_contiguous, triton_reads_v_wgmma_order
        from hf_fp8_attention.options import NO_MODES, FP8AttentionOptions

        B_, H_q, S_q, D_ = q.shape
        keys = triton_reads_v_keys_contiguous(S_q, H_q, k.shape[1], k.shape[2], D_)
        wgmma = keys and triton_reads_v_wgmma_order(q.device, S_q, H_q, k.shape[1], k.shape[2], D_, is_causal=causal,
                                                    options=NO_MODES, varlen=False)
        out.append(kernel_only("triton fp8 kernel only", triton_fp8_attention, v_keys_contiguous=keys,
                               v_wgmma_order=wgmma))
        if wgmma:  # A/B: the same Gluon build on V in key order (its layout before session 26), and the quantizer
            # writing each layout
            out.append(kernel_only("triton fp8 kernel only, V key order", triton_fp8_attention,
                                   v_keys_contiguous=True,
                                   env={TRITON_KERNEL_ENV: "gluon-pp-persistent-key-order"}))
            # the same build with its output by each thread's plain stores (the default until session 28; route
            # gluon-pp-persistent-plain-store) against the default's TMA stores
            out.append(kernel_only(PLAIN_STORE_ROW, triton_fp8_attention, v_keys_contiguous=True, v_wgmma_order=True,
                                   env={TRITON_KERNEL_ENV: "gluon-pp-persistent-plain-store"}))
            # the same build quantizing Q's rows itself (session 29: what fp8_sdpa runs with HF_FP8_ATTENTION_Q_IN_KERNEL=1)
            out.append(kernel_only(Q_IN_KERNEL_ROW, triton_fp8_attention, v_keys_contiguous=True, v_wgmma_order=True,
                                   q_in_kernel=True))
            out.append(kernel_only(f"{Q_IN_KERNEL_ROW}, 2 Q buffers", triton_fp8_attention, v_keys_contiguous=True,
                                   v_wgmma_order=True, q_in_kernel=True,
                                   env={TRITON_KERNEL_ENV: "gluon-pp-persistent-q2"}))
            out.append(kernel_only(f"{Q_IN_KERNEL_ROW}, rotated", triton_fp8_attention, v_keys_contiguous=True,
                                   v_wgmma_order=True, q_in_kernel=True, options=FP8AttentionOptions(hadamard="qk")))
            # the same build with 1, 2 or 4 of every 8 exponentials by a polynomial on the FMA pipe (session 30; measured
            # slower: only where --impls names these rows, "exp2")
            for emu in (1, 2, 4) if exp2_rows else ():
                out.append(kernel_only(f"{EXP2_ROW}{emu}/8", triton_fp8_attention, v_keys_contiguous=True,
                                       v_wgmma_order=True, env={TRITON_KERNEL_ENV: f"gluon-pp-persistent-exp2-{emu}"}))
            # the same build launched through Triton's JIT every call (session 28: the direct launch's A/B)
            out.append(kernel_only(JIT_ROW, triton_fp8_attention, v_keys_contiguous=True, v_wgmma_order=True,
                                   direct=False))
            for tag, order in (("V keys-contiguous", False), ("V wgmma order", True)):
                out.append(Candidate(f"fp8 quantize only, {tag}", lambda order=order: quantize_qkv_fp8(
                    q, k, v, v_keys_contiguous=True, v_wgmma_order=order), output=False, mode="none"))
    for backend in backends:
        for mode, kwargs in modes.items():
            if (kwargs.get("qk_scales") == "block" or kwargs.get("qk_format") == "int8") and backend != "triton":
                continue  # per-block Q/K (and V) scales: the triton kernel only
            tag = "" if mode == "none" else f" [{mode}]"

            def run(backend=backend, kwargs=kwargs):
                return fp8_sdpa(q, k, v, is_causal=causal, backend=backend, **kwargs)

            out.append(Candidate(f"fp8_{backend}{tag} (quant incl.)", run, mode=mode))
            if backend == "triton":  # the same with Q's rows quantized by the Gluon kernel (session 29, opt-in)
                from hf_fp8_attention.backends.triton import Q_IN_KERNEL_ENV

                def q_rows(run=run):
                    with _common.environment({Q_IN_KERNEL_ENV: "1"}):
                        return run()

                out.append(Candidate(f"fp8_{backend}{tag} (quant incl.), {Q_IN_KERNEL_TAG}", q_rows, mode=mode))
            if backend == "triton":  # the same, every launch through Triton's JIT (the direct launches' A/B)
                def jit(run=run):
                    with _common.direct_launches(False):
                        return run()

                out.append(Candidate(f"fp8_{backend}{tag} (quant incl.), {JIT_TAG}", jit, mode=mode))
    out.extend(_mode_cost_parts(q, k, v, modes))
    return out


def _mode_cost_parts(q, k, v, modes: dict[str, dict]) -> list[Candidate]:
    """What a mode adds, timed alone: the quantize kernel per mode, and (when a mode has smooth_v) the
    V-mean add-back on the output (`attention.restore_output`: one read and one write of O)."""
    from hf_fp8_attention import quantize_qkv_fp8
    from hf_fp8_attention.attention import restore_output

    out = []
    for mode, kwargs in modes.items():
        tag = "" if mode == "none" else f" [{mode}]"
        out.append(Candidate(f"fp8 quantize only{tag}", lambda kwargs=kwargs: quantize_qkv_fp8(q, k, v, options=kwargs),
                             output=False, mode=mode))
    if any(kwargs.get("smooth_v") for kwargs in modes.values()):
        qkv = quantize_qkv_fp8(q, k, v, options={"smooth_v": True})
        o = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)  # BSHD
        out.append(Candidate("smooth_v add-back alone (restore_output)", lambda: restore_output(o, qkv), output=False))
    return out


def _reference(q, k, v, causal, ref: str) -> torch.Tensor | None:
    """torch SDPA output (BHSD) in bf16 or float32; k/v expanded for GQA (efficient attention takes fp32)."""
    if ref == "off":
        return None
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    if ref == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    backends = [torch.nn.attention.SDPBackend.FLASH_ATTENTION, torch.nn.attention.SDPBackend.CUDNN_ATTENTION,
                torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]  # never the O(S^2)-memory math path
    with torch.nn.attention.sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sqnr(cand: Candidate, ref: torch.Tensor | None) -> float | None:
    if ref is None or not cand.output:
        return None
    from hf_fp8_attention.metrics import sqnr_db

    res = cand.fn()
    if cand.bshd:
        res = res.transpose(1, 2)
    return sqnr_db(res, ref)


def _plot(path: str, rows: list[dict], title: str) -> None:
    multi_d = len({r["D"] for r in rows}) > 1
    panels = {"non-causal": {}, "causal": {}}
    for r in rows:
        if r["tflops"] is None:
            continue
        label = f"{r['impl']} D={r['D']}" if multi_d else r["impl"]
        xs, ys = panels["causal" if r["causal"] else "non-causal"].setdefault(label, ([], []))
        xs.append(r["S"])
        ys.append(r["tflops"])
    panels = {k: v for k, v in panels.items() if v}
    _common.plot_panels(path, panels, xlabel="S", ylabel="TFLOPS", title=title)


def _by_shape(rows: list[dict], value: str = "ms", keep=None) -> dict:
    """{(D, S, causal): {impl: row[value]}} over the rows ``keep`` accepts (all when None), in row order."""
    out: dict = {}
    for r in rows:
        if keep is None or keep(r):
            out.setdefault((r["D"], r["S"], r["causal"]), {})[r["impl"]] = r[value]
    return out


def _of_fa3_kernel(ms: dict, t: float) -> str:
    """t as the share of the FA3 fp8 kernel's speed in the same run ("-" where it did not run)."""
    fa3 = ms.get("FA3 fp8 kernel only")
    return "-" if fa3 is None else f"{fa3 / t:.1%}"


def _print_table(lines: list[str], title: str | None, columns: str) -> None:
    """A summary table: a blank line, ``title`` (None: none), the header row of ``columns`` ("a | b | c") and its
    rule, then ``lines``; nothing when there are no lines."""
    if not lines:
        return
    print("\n" + title if title else "")
    print(f"| {columns} |")
    print("|" + "---|" * (columns.count("|") + 1))
    print("\n".join(lines))


def _print_triton_summary(rows: list[dict]) -> None:
    """fp8_triton against FA3 fp8 (both with quantization, and kernel to kernel) and FA3 bf16, per shape."""
    by_shape = _by_shape(rows, "tflops", lambda r: r["mode"] in (None, "none") and r["tflops"] is not None)
    lines = []
    for (d, s, causal), tf in by_shape.items():
        tri, fa3 = tf.get("fp8_triton (quant incl.)"), tf.get("fp8_fa3 (quant incl.)")
        tri_k, fa3_k, bf16 = tf.get("triton fp8 kernel only"), tf.get("FA3 fp8 kernel only"), tf.get("FA3 bf16")
        if tri is None or (fa3 is None and bf16 is None):
            continue
        ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.0%}"  # noqa: E731
        lines.append(f"| {d} | {s} | {'yes' if causal else 'no'} | {tri:.0f} | {ratio(tri, fa3)} | "
                     f"{ratio(tri_k, fa3_k)} | {'-' if bf16 is None else f'{tri / bf16:.2f}x'} |")
    _print_table(lines, None, "D | S | causal | fp8_triton TFLOPS (quant incl.) | of fp8_fa3 (quant incl.) "
                 "| kernel alone: of FA3 fp8 kernel | vs FA3 bf16")


PLAIN_STORE_ROW = "triton fp8 kernel only, plain stores"
EXP2_ROW = "triton fp8 kernel only, exp2 by polynomial "  # + "k/8" (session 30)
JIT_TAG = "JIT launches"  # rows whose every launch goes through Triton's JIT (`_common.direct_launches(False)`)
JIT_ROW = f"triton fp8 kernel only, {JIT_TAG}"


def tma_store_lines(rows: list[dict]) -> list[str]:
    """Rows of the TMA-store A/B table: the Gluon build with its output by plain stores (`PLAIN_STORE_ROW`, the
    default until session 28) against the default's TMA stores ("triton fp8 kernel only"), same run, each also as %
    of the FA3 fp8 kernel."""
    lines = []
    for (d, s, causal), ms in _by_shape(rows).items():
        plain, tma = ms.get(PLAIN_STORE_ROW), ms.get("triton fp8 kernel only")
        if plain is None or tma is None:
            continue
        lines.append(f"| {d} | {s} | {'yes' if causal else 'no'} | {plain:.3f} ({_of_fa3_kernel(ms, plain)}) | "
                     f"{tma:.3f} ({_of_fa3_kernel(ms, tma)}) | {plain / tma:.3f}x |")
    return lines


def direct_launch_lines(host: list[dict]) -> list[str]:
    """Rows of the direct-launch A/B: per shape, each implementation that has a twin row launched through the
    JIT (its name with ", JIT launches"): both host times, the saving and both eager times."""
    by = {(r["S"], r["causal"], r["D"], r["impl"]): r for r in host}
    lines = []
    for (s, causal, d, name), jit in by.items():
        if not name.endswith(f", {JIT_TAG}"):
            continue
        base = by.get((s, causal, d, name[:-len(f", {JIT_TAG}")]))
        if base is None:
            continue
        lines.append(f"| {s} | {'yes' if causal else 'no'} | {d} | {base['impl']} | {jit['host_us']:.1f} | "
                     f"{base['host_us']:.1f} | {jit['host_us'] - base['host_us']:.1f} | "
                     f"{jit['eager_ms']:.3f} / {base['eager_ms']:.3f} |")
    return lines


Q_IN_KERNEL_ROW = "triton fp8 kernel only, Q quantized in the kernel"
Q_IN_KERNEL_TAG = "Q rows in the kernel"


def q_in_kernel_lines(rows: list[dict]) -> list[str]:
    """Rows of the Q-in-kernel A/B (session 29): per shape and mode, fp8_triton with the Gluon kernel quantizing
    Q's rows itself (HF_FP8_ATTENTION_Q_IN_KERNEL=1, the rows tagged `Q_IN_KERNEL_TAG`) against the default (the
    quantizer quantizing Q per head), same run: both ms and their ratio, each against FA3 bf16; and the kernel alone
    with and without Q's quantization inside."""
    lines = []
    for (d, s, causal), ms in _by_shape(rows).items():
        bf16 = ms.get("FA3 bf16")
        for name, t in ms.items():
            if not (name.startswith("fp8_triton") and name.endswith(" (quant incl.)")):
                continue
            old, t = t, ms.get(f"{name}, {Q_IN_KERNEL_TAG}")
            if t is None:
                continue
            mode = name[len("fp8_triton"):-len(" (quant incl.)")].strip(" []") or "none"
            vs = lambda x: "-" if bf16 is None else f"{bf16 / x:.2f}x"  # noqa: E731
            k_in, k_out = ms.get(Q_IN_KERNEL_ROW), ms.get("triton fp8 kernel only")
            kern = "- | -" if k_in is None or k_out is None or mode != "none" else \
                f"{k_out:.3f} ({_of_fa3_kernel(ms, k_out)}) | {k_in:.3f} ({_of_fa3_kernel(ms, k_in)})"
            lines.append(f"| {d} | {s} | {'yes' if causal else 'no'} | {mode} | {old:.3f} ({vs(old)}) | "
                         f"{t:.3f} ({vs(t)}) | {old / t:.3f}x | {kern} |")
    return lines


def _print_q_in_kernel_summary(rows: list[dict]) -> None:
    _print_table(q_in_kernel_lines(rows), "fp8_triton with Q quantized per row inside the Gluon kernel "
                 "(HF_FP8_ATTENTION_Q_IN_KERNEL=1) against Q quantized per head by the quantizer, same run; ms (vs FA3 bf16); kernel "
                 "alone (% of the FA3 fp8 kernel's speed)", "D | S | causal | mode | Q in the quantizer ms | Q in the "
                 "kernel ms | speedup | kernel alone, Q in e4m3 | kernel alone, Q quantized inside")


def exp2_lines(rows: list[dict]) -> list[str]:
    """Rows of the exponentials A/B (session 30): per shape, the Gluon kernel alone with all of the softmax's
    exponentials on the special-function unit ("triton fp8 kernel only") and with 1, 2 or 4 of every 8 by a
    polynomial (`EXP2_ROW`), same run, each as % of the FA3 fp8 kernel, and each split's speedup."""
    lines = []
    for (d, s, causal), ms in _by_shape(rows).items():
        base = ms.get("triton fp8 kernel only")
        split = [(emu, ms.get(f"{EXP2_ROW}{emu}/8")) for emu in (1, 2, 4)]
        if base is None or all(t is None for _, t in split):
            continue
        cells = " | ".join("-" if t is None else f"{t:.3f} ({_of_fa3_kernel(ms, t)}, {base / t:.3f}x)" for _, t in split)
        lines.append(f"| {d} | {s} | {'yes' if causal else 'no'} | {base:.3f} ({_of_fa3_kernel(ms, base)}) | {cells} |")
    return lines


EXP2_TABLE = ("The Gluon kernel alone with part of the softmax's exponentials by a polynomial on the FMA pipe (routes "
              "gluon-pp-persistent-exp2-k) against all on the special-function unit, same run; ms (% of the FA3 fp8 "
              "kernel's speed, speedup)", "D | S | causal | all by MUFU | 1/8 by polynomial | 2/8 | 4/8")


def _print_tma_store_summary(rows: list[dict]) -> None:
    _print_table(tma_store_lines(rows), "The Gluon kernel's output by TMA stores (the default since session 28) "
                 "against its plain stores (route gluon-pp-persistent-plain-store), same run; (% of the FA3 fp8 "
                 "kernel's speed)", "D | S | causal | plain stores ms | TMA stores ms | speedup")


def _print_v_order_summary(rows: list[dict]) -> None:
    """Where the Gluon kernel reads V in wgmma key order: that kernel against the same build on V in key order,
    and the quantizer writing each layout (same run)."""
    lines = []
    for (d, s, causal), ms in _by_shape(rows).items():
        k_w, k_k = ms.get("triton fp8 kernel only"), ms.get("triton fp8 kernel only, V key order")
        q_k, q_w = ms.get("fp8 quantize only, V keys-contiguous"), ms.get("fp8 quantize only, V wgmma order")
        if k_w is None or k_k is None:
            continue
        quant = "- | - | -" if q_k is None or q_w is None else f"{q_k:.3f} | {q_w:.3f} | {q_w / q_k:.3f}x"
        lines.append(f"| {d} | {s} | {'yes' if causal else 'no'} | {k_k:.3f} ({_of_fa3_kernel(ms, k_k)}) | "
                     f"{k_w:.3f} ({_of_fa3_kernel(ms, k_w)}) | {k_k / k_w:.3f}x | {quant} |")
    _print_table(lines, "V in wgmma key order (the Gluon kernel's default route) against V in key order, same run; "
                 "(% of the FA3 fp8 kernel's speed)", "D | S | causal | kernel, V key order ms | kernel, V wgmma "
                 "order ms | speedup | quantize, keys ms | quantize, wgmma ms | wgmma / keys")


# mode-cost table columns: (row name of mode none, header); other modes' rows add " [mode]" before " (quant"
MODE_COST_COLUMNS = (("fp8_fa3 (quant incl.)", "fp8_fa3"), ("fp8_triton (quant incl.)", "fp8_triton"),
                     ("fp8 quantize only", "quantize only"))
ADD_BACK = "smooth_v add-back alone (restore_output)"


def _mode_row_name(base: str, mode: str) -> str:
    if mode == "none":
        return base
    head, paren, tail = base.partition(" (")
    return f"{head} [{mode}]{paren}{tail}"


def mode_cost_lines(rows: list[dict]) -> list[str]:
    """The mode-cost table: per shape and mode, each implementation's ms and its ratio to mode none of the
    same implementation (same run), for the modes other than none; then the smooth_v add-back alone."""
    by_shape = _by_shape(rows)
    modes = []
    for r in rows:
        if r["mode"] not in (None, "none") and r["mode"] not in modes:
            modes.append(r["mode"])
    columns = [(base, header) for base, header in MODE_COST_COLUMNS
               if any(base in ms for ms in by_shape.values())]
    lines = []
    for (d, s, causal), ms in by_shape.items():
        for mode in modes:
            cells = []
            for base, _ in columns:
                t, t0 = ms.get(_mode_row_name(base, mode)), ms.get(base)
                cells.append("-" if t is None else f"{t:.3f}")
                cells.append("-" if t is None or t0 is None else f"{t / t0:.3f}x ({(t - t0) * 1e3:+.0f} us)")
            if any(c != "-" for c in cells):
                lines.append(f"| {d} | {s} | {'yes' if causal else 'no'} | {mode} | {' | '.join(cells)} |")
    if not lines:
        return []
    head = " | ".join(f"{h} ms | {h} vs none" for _, h in columns)
    out = ["", "Mode cost (same run; vs none: ms / ms of mode none of the same implementation, and the difference)",
           f"| D | S | causal | mode | {head} |", "|---|---|---|---|" + "---|" * (2 * len(columns)), *lines]
    for (d, s, causal), ms in by_shape.items():
        if ADD_BACK in ms:
            base = ms.get("fp8_fa3 (quant incl.)") or ms.get("fp8_triton (quant incl.)")
            share = "" if base is None else f" ({ms[ADD_BACK] / base:.1%} of the fp8 layer's mode none)"
            out.append(f"- D={d} S={s} causal={'yes' if causal else 'no'}: {ADD_BACK} {ms[ADD_BACK]:.3f} ms{share}")
    return out


def _print_mode_costs(rows: list[dict]) -> None:
    lines = mode_cost_lines(rows)
    if lines:
        print("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_sdpa: needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers
    import triton

    dev = torch.cuda.get_device_name()
    print(f"# device: {dev}; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")
    dims = " ".join(map(str, args.head_dims))
    print(f"# B={args.batch} H={args.heads}/{args.kv_heads} D={dims}, bf16 inputs as BHSD views of BSHD")
    print(f"# SQNR vs torch SDPA {args.sqnr_ref}; fp8 accuracy modes: {', '.join(args.modes)}")
    rows, host = [], []
    profiles = [] if args.host_profile else None
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    exp2 = any("exp2" in sub for sub in args.impls or ())  # (the exponentials A/B rows: only where named)
    for d in args.head_dims:
        for s in args.seqlens:
            for causal in causals:
                g = torch.Generator(device="cuda").manual_seed(s)
                shape_q = (args.batch, s, args.heads, d)
                shape_kv = (args.batch, s, args.kv_heads, d)
                q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                flops = 4 * args.batch * args.heads * s * s * d / (2 if causal else 1)
                ref = _reference(q, k, v, causal, args.sqnr_ref)
                times, sqnrs, cands = {}, {}, {}
                for cand in _candidates(q, k, v, causal, args.mode_kwargs, exp2_rows=exp2):
                    if args.impls and not any(sub in cand.name for sub in args.impls):
                        continue
                    try:
                        ms, sq = _median_ms(cand.fn, args.rep_ms), _sqnr(cand, ref)
                        times[cand.name], sqnrs[cand.name], cands[cand.name] = [ms], sq, cand
                    except Exception as e:  # a backend unavailable for this shape: report, keep going
                        print(f"# {cand.name} D={d} S={s} causal={causal}: {type(e).__name__}: {e}", file=sys.stderr)
                for _ in range(args.rounds - 1):  # round-robin: every candidate once per round
                    for name, cand in cands.items():
                        times[name].append(_median_ms(cand.fn, args.rep_ms))
                times = {name: statistics.median(ts) for name, ts in times.items()}
                if args.host:
                    host.extend(host_rows({n: (cands[n], times[n]) for n in cands},
                                          dict(S=s, causal=causal, D=d), profiles))
                base = times.get("FA3 bf16")
                for name, ms in times.items():
                    timing_only = not cands[name].output
                    rows.append(
                        {
                            "S": s,
                            "causal": causal,
                            "impl": name,
                            "ms": ms,
                            "tflops": None if timing_only else flops / ms / 1e9,
                            "vs_fa3_bf16": None if base is None or timing_only else base / ms,
                            "D": d,
                            "mode": cands[name].mode,
                            "sqnr_db": sqnrs[name],
                        }
                    )
                del q, k, v, ref
                torch.cuda.empty_cache()
    print("\n| S | causal | implementation | ms | TFLOPS | speedup vs FA3 bf16 | D | SQNR dB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
        sp = "-" if r["vs_fa3_bf16"] is None else f"{r['vs_fa3_bf16']:.2f}x"
        sq = _common.fmt(r["sqnr_db"], ".1f")
        print(f"| {r['S']} | {'yes' if r['causal'] else 'no'} | {r['impl']} | {r['ms']:.3f} | {tf} | {sp} | {r['D']} | {sq} |")
    _print_triton_summary(rows)
    _print_v_order_summary(rows)
    _print_tma_store_summary(rows)
    _print_table(exp2_lines(rows), *EXP2_TABLE)
    _print_mode_costs(rows)
    _print_q_in_kernel_summary(rows)
    if host:
        print(f"\nHost cost per call ({HOST_CALLS} calls launched back to back, no sync) and GPU time from CUDA-graph "
              "replays (L2 flushed before each call); eager ms from the table above")
        print("| S | causal | D | implementation | host us/call | GPU ms (graph) | eager ms |")
        print("|---|---|---|---|---|---|---|")
        for r in host:
            gpu = _common.fmt(r["graph_ms"], ".3f") if r["graph_error"] is None else f"not capturable ({r['graph_error']})"
            print(f"| {r['S']} | {'yes' if r['causal'] else 'no'} | {r['D']} | {r['impl']} | {r['host_us']:.1f} | {gpu} "
                  f"| {r['eager_ms']:.3f} |")
        _print_table(direct_launch_lines(host), "Direct launches (`hf_fp8_attention._launch`) against every launch "
                     "through Triton's JIT, same run: host us per call", "S | causal | D | implementation | JIT "
                     "launches us | direct us | saved us | eager ms, JIT / direct")
    if profiles:
        with open(args.host_profile, "w") as f:
            f.write("\n".join(profiles))
        print(f"# host profiles: {args.host_profile}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": dev, "torch": torch.__version__, "sqnr_ref": args.sqnr_ref, "modes": args.modes,
                 "rounds": args.rounds, "rows": rows, "host": host},
                f,
                indent=1,
            )
    if args.plot:
        title = f"{dev}, B={args.batch} H={args.heads}/{args.kv_heads} D={dims}, bf16 inputs"
        _plot(args.plot, rows, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
