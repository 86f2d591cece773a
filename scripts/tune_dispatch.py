#!/usr/bin/env python3
"""Measure the auto fp8 path against bf16 attention per shape and write the speed table the auto path reads.

For every shape of the grid, side by side in one run (interleaved samples, the same inputs): the bf16
attention the auto path falls back to (`hf_fp8_attention.speed_table.bf16_attention`: FA3 bf16 on Hopper
when installed, else torch SDPA) and ``fp8_sdpa(backend=None)`` with the table off (the auto fp8 path,
quantization included). Inputs are (B, H, S, D) views of (B, S, H, D) memory, as Transformers hands them
over, rotated between copies so that small shapes do not run from a warm L2. A sample is the CUDA-event
time of a burst of calls (launch overhead included, as in a model), the result the median of the samples.

Grid (defaults): prefill S_q = S_kv in --seqlens (1k..128k), causal and not; decode S_q = 1 from a bf16
cache of S_kv in --seqlens; head_dim 64/128/256; H_q 32 with H_kv 32 (MHA) and 8 (GQA 4); batch 1 and 8,
batch x S capped by --max-tokens / --max-decode-tokens. Shapes run from the cheapest up, with progress;
past --budget-s no new shape starts (the table then lacks the largest ones, and says so).

Writes the table (`hf_fp8_attention.speed_table` format; default ``hf_fp8_attention/tables/<sm>.json``,
the file the package loads for this GPU) and prints a markdown table of fp8's speedup over bf16 per shape
(< 0.98: the auto path runs bf16 there).

    python scripts/tune_dispatch.py                       # this GPU, default grid (~3 min on an H200)
    python scripts/tune_dispatch.py --out /tmp/sm90.json --markdown /tmp/sm90.md
    python scripts/tune_dispatch.py --dry-run --out /tmp/cpu.json   # tiny grid on CPU: reference vs SDPA
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

KIB = 1024
DEFAULT_SEQLENS = [1024 * 2**i for i in range(8)]  # 1k .. 128k
DRY_RUN = {"seqlens": [16, 64], "head_dims": [64], "batches": [1, 2], "heads": 4, "kv_heads": [4, 2],
           "target_ms": 2.0, "budget_s": None}
# Rotate between input copies until they span this many bytes (H200 L2: 50 MiB): each call reads cold data.
ROTATE_BYTES = 256 * KIB * KIB
MIN_BURST_MS = 0.5  # a sample times a burst of calls at least this long (event resolution, launch overhead)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="S (prefill) and S_kv (decode) values")
    p.add_argument("--head-dims", type=int, nargs="+", default=None, help="default: 64 128 256")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8")
    p.add_argument("--heads", type=int, default=None, help="H_q (default 32)")
    p.add_argument("--kv-heads", type=int, nargs="+", default=None, help="H_kv values (default: 32 8)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both", help="prefill rows")
    p.add_argument("--kinds", nargs="+", choices=["prefill", "decode"], default=["prefill", "decode"])
    p.add_argument("--max-tokens", type=int, default=131072, help="prefill: largest batch x S")
    p.add_argument("--max-decode-tokens", type=int, default=262144, help="decode: largest batch x S_kv")
    p.add_argument("--target-ms", type=float, default=None, help="time per implementation per shape (default 30)")
    p.add_argument("--min-samples", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=15)
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new shape after this many seconds (default 210 on a GPU, none on CPU)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="table file (default on a GPU: the package's tables/<sm>.json)")
    p.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny grid on CPU (the reference backend against torch SDPA): checks the script, not a GPU")
    args = p.parse_args(argv)
    if args.dry_run:
        if args.device not in (None, "cpu"):
            p.error("--dry-run runs on the CPU")
        args.device = "cpu"
        for name, value in DRY_RUN.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here (--dry-run runs a tiny grid on the CPU)")
    args.seqlens = args.seqlens or DEFAULT_SEQLENS
    args.head_dims = args.head_dims or [64, 128, 256]
    args.batches = args.batches or [1, 8]
    args.heads = args.heads or 32
    args.kv_heads = args.kv_heads or [32, 8]
    args.target_ms = args.target_ms if args.target_ms is not None else 30.0
    if args.budget_s is None and args.device.type == "cuda" and not args.dry_run:
        args.budget_s = 210.0
    positive = {"--seqlens": args.seqlens, "--head-dims": args.head_dims, "--batches": args.batches,
                "--kv-heads": args.kv_heads, "--heads": [args.heads], "--max-tokens": [args.max_tokens],
                "--max-decode-tokens": [args.max_decode_tokens], "--min-samples": [args.min_samples]}
    for flag, values in positive.items():
        if any(v < 1 for v in values):
            p.error(f"{flag} must be positive, got {values}")
    if args.target_ms <= 0 or args.max_samples < args.min_samples:
        p.error("--target-ms must be positive and --max-samples >= --min-samples")
    for h in args.kv_heads:
        if args.heads % h:
            p.error(f"--heads {args.heads} must be a multiple of every --kv-heads value, got {h}")
    from hf_fp8_attention._constants import SUPPORTED_HEAD_DIMS

    bad = [d for d in args.head_dims if d not in SUPPORTED_HEAD_DIMS]
    if bad:
        p.error(f"--head-dims {bad}: fp8 attention supports {SUPPORTED_HEAD_DIMS}")
    if args.out is None and args.device.type != "cuda":
        p.error("pass --out on the CPU (a CPU table is for checking the script; the package never loads one)")
    return args


@dataclass(frozen=True)
class Shape:
    s_q: int
    s_kv: int
    causal: bool
    head_dim: int
    kv_heads: int
    batch: int

    def cost(self, heads: int) -> float:
        """Rough work, to run the cheap shapes first: attention FLOPs plus the bytes every call reads."""
        flops = 4 * self.batch * heads * self.s_q * self.s_kv * self.head_dim / (2 if self.causal else 1)
        return flops + 2000 * self.batch * self.s_kv * self.kv_heads * self.head_dim

    def describe(self, heads: int) -> str:
        kind = f"S={self.s_q}" if self.s_q == self.s_kv else f"S_q={self.s_q} S_kv={self.s_kv}"
        return (f"{kind} {'causal' if self.causal else 'non-causal'} D={self.head_dim} H={heads}/{self.kv_heads} "
                f"B={self.batch}")


def grid(args) -> list[Shape]:
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    shapes = []
    for d in args.head_dims:
        for h_kv in args.kv_heads:
            for b in args.batches:
                for s in args.seqlens:
                    if "prefill" in args.kinds and b * s <= args.max_tokens:
                        shapes += [Shape(s, s, c, d, h_kv, b) for c in causals]
                    if "decode" in args.kinds and b * s <= args.max_decode_tokens:
                        shapes.append(Shape(1, s, False, d, h_kv, b))
    return sorted(shapes, key=lambda sh: sh.cost(args.heads))


class Timer:
    """Milliseconds per call of a burst of calls: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def per_call_ms(self, fn, calls: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls


def measure(fns: dict, timer: Timer, target_ms: float, min_samples: int, max_samples: int) -> dict[str, float]:
    """Median ms per call of each function, sampled side by side (alternating order)."""
    for fn in fns.values():  # warm-up: kernel compilation, allocator growth
        fn()
    timer.sync()
    first = {name: timer.per_call_ms(fn, 1) for name, fn in fns.items()}
    burst = max(1, math.ceil(MIN_BURST_MS / max(min(first.values()), 1e-6)))
    per_round = burst * sum(first.values())
    samples = min(max_samples, max(min_samples, int(target_ms * len(fns) / max(per_round, 1e-6))))
    times = {name: [first[name]] if burst == 1 else [] for name in fns}
    names = list(fns)
    for i in range(samples - (1 if burst == 1 else 0)):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timer.per_call_ms(fns[name], burst))
    return {name: statistics.median(t) for name, t in times.items()}


def _inputs(shape: Shape, heads: int, dtype, device, seed: int):
    """Copies of (q, k, v) BHSD views of BSHD memory, enough of them to span ROTATE_BYTES (at most 8)."""
    g = torch.Generator(device=device).manual_seed(seed)
    bshd = lambda s, h: (shape.batch, s, h, shape.head_dim)  # noqa: E731
    one = 2 * shape.batch * shape.head_dim * (shape.s_q * heads + 2 * shape.s_kv * shape.kv_heads)
    copies = max(1, min(8, math.ceil(ROTATE_BYTES / one))) if device.type == "cuda" else 1
    return [tuple(torch.randn(bshd(s, h), generator=g, device=device, dtype=dtype).transpose(1, 2)
                  for s, h in ((shape.s_q, heads), (shape.s_kv, shape.kv_heads), (shape.s_kv, shape.kv_heads)))
            for _ in range(copies)]


def _rotating(fn, inputs):
    state = {"i": 0}

    def call():
        q, k, v = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(q, k, v)

    return call


def time_shape(shape: Shape, args, timer: Timer, bf16: str) -> tuple[float, float]:
    """(bf16 ms, fp8 ms) for one shape."""
    from hf_fp8_attention import fp8_sdpa
    from hf_fp8_attention.speed_table import bf16_attention

    inputs = _inputs(shape, args.heads, getattr(torch, args.dtype), args.device, seed=shape.s_kv + shape.head_dim)
    fns = {
        "bf16": _rotating(lambda q, k, v: bf16_attention(q, k, v, is_causal=shape.causal, scale=None, impl=bf16), inputs),
        "fp8": _rotating(lambda q, k, v: fp8_sdpa(q, k, v, is_causal=shape.causal), inputs),
    }
    ms = measure(fns, timer, args.target_ms, args.min_samples, args.max_samples)
    return ms["bf16"], ms["fp8"]


def _package_versions() -> dict[str, str]:
    out = _common.versions()
    for dist in ("tokenspeed-fa3", "flash-attn-3", "flash_attn_3"):
        try:
            out[dist] = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def markdown(table, shapes_skipped: int = 0) -> str:
    """fp8 speedup over bf16 (bf16 ms / fp8 ms) per shape: one line per (kind, causal, D, H_kv, B), one
    column per S; cells where the auto path runs bf16 (below the margin) in bold with "bf16"."""
    from hf_fp8_attention.speed_table import BF16_MARGIN, _fmt_len

    lengths = sorted({r.s_kv for r in table.rows})
    lines: dict[tuple, dict[int, str]] = {}
    for r in table.rows:
        kind = "decode" if r.s_q == 1 else "prefill"
        line = lines.setdefault((kind != "prefill", kind, r.causal, r.head_dim, r.group, r.batch), {})
        x = r.fp8_speedup
        line[r.s_kv] = f"**{x:.2f} bf16**" if x < BF16_MARGIN else f"{x:.2f}"
    headers = ["kind", "causal", "D", "H_q/H_kv", "B", *(f"S={_fmt_len(s)}" for s in lengths)]
    rows = [[kind, "yes" if causal else "no", d, f"{table.heads}/{table.heads // g}", b,
             *(cells.get(s, "-") for s in lengths)]
            for (_, kind, causal, d, g, b), cells in sorted(lines.items())]
    note = (f"fp8 speedup over {table.bf16} bf16 (bf16 ms / fp8 ms, fp8 = auto path {table.fp8_backend} with "
            f"quantization), {table.device_name}; **bold**: < {BF16_MARGIN}, the auto path runs bf16; "
            "decode: S_q=1, S = S_kv")
    if shapes_skipped:
        note += f"; {shapes_skipped} shapes not measured (see 'skipped' in the table file)"
    return note + "\n\n" + _common.markdown_table(headers, rows)


@contextlib.contextmanager
def _table_off():
    """The fp8 side is the auto path without the table, whatever the environment says."""
    from hf_fp8_attention.speed_table import ENV

    with _common.environment({ENV: "off"}):
        yield


def main(argv=None) -> int:
    args = parse_args(argv)
    with _table_off():
        return _tune(args, argv)


def _tune(args, argv) -> int:
    from hf_fp8_attention import speed_table
    from hf_fp8_attention.dispatch import bf16_impl, device_key, plan_attention

    device = args.device
    key, bf16 = device_key(device), bf16_impl(device)
    fp8_backend = plan_attention(device, None).backend
    device_name = _common.device_name(device)
    out = Path(args.out) if args.out else speed_table.TABLE_DIR / f"{key}.json"
    shapes = grid(args)
    timer = Timer(device)
    versions = _package_versions()
    print(f"# tune_dispatch: {device_name} ({key}); auto fp8 path: {fp8_backend}; bf16: {bf16}; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"# {len(shapes)} shapes, H_q={args.heads}, {args.dtype}, ~{args.target_ms:g} ms per implementation "
          f"per shape{'' if args.budget_s is None else f', budget {args.budget_s:g} s'}; writing {out}", flush=True)
    rows, skipped = [], []
    t0 = time.perf_counter()
    for i, shape in enumerate(shapes, 1):
        desc = shape.describe(args.heads)
        elapsed = time.perf_counter() - t0
        if args.budget_s is not None and elapsed > args.budget_s:
            skipped += [{**vars(s), "reason": "time budget"} for s in shapes[i - 1:]]
            print(f"# budget of {args.budget_s:g} s spent: {len(shapes) - i + 1} largest shapes not measured",
                  flush=True)
            break
        try:
            bf16_ms, fp8_ms = time_shape(shape, args, timer, bf16)
        except Exception as e:  # e.g. out of memory: say so, keep the rest of the grid
            skipped.append({**vars(shape), "reason": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"[{i}/{len(shapes)}] {desc}: skipped ({type(e).__name__}: {str(e)[:200]})", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        speedup = bf16_ms / fp8_ms
        pick = "bf16" if speedup < speed_table.BF16_MARGIN else "fp8"
        print(f"[{i}/{len(shapes)}] {desc}: bf16 {bf16_ms:.4f} ms, fp8 {fp8_ms:.4f} ms, fp8 {speedup:.2f}x -> "
              f"{pick} ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows.append({"s_q": shape.s_q, "s_kv": shape.s_kv, "causal": shape.causal, "head_dim": shape.head_dim,
                     "group": args.heads // shape.kv_heads, "batch": shape.batch,
                     "bf16_ms": round(bf16_ms, 5), "fp8_ms": round(fp8_ms, 5)})
    if not rows:
        print("tune_dispatch: no shape could be measured; no table written", file=sys.stderr)
        return 1
    data = {
        "version": speed_table.FORMAT_VERSION, "device": key, "device_name": device_name,
        "fp8_backend": fp8_backend, "bf16": bf16, "heads": args.heads, "dtype": args.dtype,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python scripts/tune_dispatch.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions,
        "timing": {"target_ms": args.target_ms, "min_samples": args.min_samples, "max_samples": args.max_samples,
                   "rotate_bytes": ROTATE_BYTES, "min_burst_ms": MIN_BURST_MS},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    if skipped:
        data["skipped"] = skipped
    table = speed_table.parse_table(data, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(speed_table.dumps(table))
    speed_table.load_table(out)  # what the package will read back
    text = markdown(table, len(skipped))
    print("\n" + text + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(f"# {key}: {table.summary()}")
    print(f"# wrote {out} ({len(rows)} rows{f', {len(skipped)} shapes skipped' if skipped else ''}) in "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
