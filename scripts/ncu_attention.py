#!/usr/bin/env python3
"""Hardware counters of one attention layer's kernels (Nsight Compute), to see where the fp8 kernels' time goes.

Two halves:

``--drive``: the program ncu runs. For each shape it builds bench_sdpa's inputs (GQA, bf16 BHSD views of BSHD)
and candidates (`bench_sdpa._candidates`), keeps those named exactly as one of ``--impls``, runs each twice
unprofiled (compiles, autotuning), then once between ``cudaProfilerStart`` / ``cudaProfilerStop``: run it under
``ncu --profile-from-start off`` and only those calls' kernels are profiled, in the order the driver prints
("# profiled: ..." lines, one per candidate), each candidate's kernels after a marker kernel (`torch.cuda._sleep`'s
spin kernel).

``--summary CSV``: reads ``ncu --csv --page raw`` output and prints one table row per profiled kernel: duration,
the SM clock, the tensor, special-function (MUFU, "xu"), FMA and ALU pipes' activity, issue-slot use, the
largest warp-stall reasons, registers, shared memory, and DRAM throughput. The candidate's name is taken from the
driver's log (``--log``): the n-th marker's kernels are the n-th "# profiled:" line's.

``--source CSV``: reads ``ncu --csv --page source --print-source sass`` output (SourceCounters' warp-state samples
per SASS instruction) and prints, per kernel, the samples by stall reason and the ``--top`` most-sampled
instructions. Warps parked for the whole kernel (a warp-specialized kernel's unused warps, waiting at a barrier
on a NOP executed a few times per program) are left out of the totals and counted apart: their "barrier" samples
are not time any working warp lost.

    ncu --profile-from-start off --clock-control none --section ... -o attn \\
        python scripts/ncu_attention.py --drive --seqlens 16384 --causal both 2> drive.log
    ncu --import attn.ncu-rep --csv --page raw --print-units base > ncu.csv
    python scripts/ncu_attention.py --summary ncu.csv --log drive.log

`scripts/gpu_check.sh --ncu` runs both on the lent GPU.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_IMPLS = ("FA3 bf16", "FA3 fp8 kernel only", "triton fp8 kernel only",
                 "triton fp8 kernel only, Q quantized in the kernel", "fp8 quantize only, V wgmma order")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--drive", action="store_true", help="run the kernels (under ncu)")
    what.add_argument("--summary", metavar="CSV", help="summarize ncu's --csv --page raw output")
    what.add_argument("--source", metavar="CSV", help="ncu's --csv --page source --print-source sass output: per "
                      "kernel, warp-stall samples by reason and the most-sampled instructions")
    p.add_argument("--top", type=int, default=12, help="with --source: instructions listed per kernel")
    p.add_argument("--log", help="with --summary: the driver's stderr (its '# profiled:' lines name the kernels)")
    p.add_argument("--seqlens", type=int, nargs="+", default=[16384])
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS),
                   help="candidate names (exact, as bench_sdpa prints them)")
    args = p.parse_args(argv)
    if args.seqlens and min(args.seqlens) < 1:
        p.error("--seqlens must be positive")
    return args


def drive(args) -> int:
    import torch

    import bench_sdpa

    if not torch.cuda.is_available():
        print("ncu_attention: --drive needs a CUDA GPU", file=sys.stderr)
        return 2
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    wanted = list(args.impls)
    for s in args.seqlens:
        for causal in causals:
            g = torch.Generator(device="cuda").manual_seed(s)
            d = args.head_dim
            q = torch.randn((1, s, args.heads, d), device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            k = torch.randn((1, s, args.kv_heads, d), device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            v = torch.randn((1, s, args.kv_heads, d), device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            cands = {c.name: c for c in bench_sdpa._candidates(q, k, v, causal) if c.name in wanted}
            missing = [name for name in wanted if name not in cands]
            if missing:
                print(f"# S={s} causal={causal}: not available here: {missing}", file=sys.stderr)
            for name in wanted:
                if name not in cands:
                    continue
                fn = cands[name].fn
                fn(), fn()  # compile, autotune, first-call work: outside the profile
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                torch.cuda._sleep(1000)  # the marker: the kernels after it (up to the next) are this candidate's
                fn()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                print(f"# profiled: S={s} causal={'yes' if causal else 'no'} | {name}", file=sys.stderr, flush=True)
            del q, k, v, cands
            torch.cuda.empty_cache()
    return 0


# (column label, metric name pattern: the first raw metric that matches, in this order)
_COLUMNS = (
    ("ms", (r"^gpu__time_duration\.sum$",)),
    ("SM GHz", (r"^gpc__cycles_elapsed\.avg\.per_second$", r"^smsp__cycles_elapsed\.avg\.per_second$",
                r"^sm__cycles_elapsed\.avg\.per_second$")),
    ("tensor %", (r"^sm__pipe_tensor_cycles_active\.avg\.pct_of_peak_sustained_active$",
                  r"^sm__pipe_tensor_op_gmma_cycles_active\.avg\.pct_of_peak_sustained_active$")),
    ("xu %", (r"^sm__inst_executed_pipe_xu\.avg\.pct_of_peak_sustained_active$",
              r"^sm__pipe_xu_cycles_active\.avg\.pct_of_peak_sustained_active$")),
    ("fma %", (r"^sm__inst_executed_pipe_fma\.avg\.pct_of_peak_sustained_active$",
               r"^sm__pipe_fma_cycles_active\.avg\.pct_of_peak_sustained_active$")),
    ("alu %", (r"^sm__inst_executed_pipe_alu\.avg\.pct_of_peak_sustained_active$",
               r"^sm__pipe_alu_cycles_active\.avg\.pct_of_peak_sustained_active$")),
    ("inst M", (r"^smsp__inst_executed\.sum$",)),
    ("issue %", (r"^smsp__issue_active\.avg\.pct_of_peak_sustained_active$",
                 r"^sm__instruction_throughput\.avg\.pct_of_peak_sustained_active$")),
    ("regs", (r"^launch__registers_per_thread$",)),
    ("smem KiB", (r"^launch__shared_mem_per_block_dynamic$",)),
    ("DRAM %", (r"^dram__throughput\.avg\.pct_of_peak_sustained_elapsed$",
                r"^gpu__dram_throughput\.avg\.pct_of_peak_sustained_elapsed$")),
)
_STALL = re.compile(r"^smsp__average_warp_latency_issue_stalled_(\w+)\.ratio$|"
                    r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def read_raw_csv(text: str) -> list[dict]:
    """ncu's ``--csv --page raw`` output (header row, units row, one row per kernel; lines before the header,
    such as ncu's own '==PROF==' messages, skipped): one dict per kernel, metric name -> (value text, unit)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu raw CSV header (a line starting with \"ID\") in the input")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, units, data = rows[0], rows[1], rows[2:]
    return [{name: (value, unit) for name, value, unit in zip(header, row, units)} for row in data if row]


def _metric(row: dict, patterns) -> tuple[str, float | None, str]:
    for pattern in patterns:
        rx = re.compile(pattern)
        for name, (value, unit) in row.items():
            if rx.match(name):
                return name, _number(value), unit
    return "", None, ""


# unit -> its value in the column's unit (ms, GHz, KiB); ncu writes "ns", "hz", "byte/block" with --print-units
# base, other prefixes with its automatic units
_PER_UNIT = {
    "ms": {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3,
           "second": 1e3},
    "SM GHz": {"hz": 1e-9, "khz": 1e-6, "mhz": 1e-3, "ghz": 1.0, "cycle/second": 1e-9, "cycle/nsecond": 1.0,
               "cycle/usecond": 1e-3, "cycle/msecond": 1e-6},
    "smem KiB": {"byte": 1 / 1024, "kbyte": 1000 / 1024, "mbyte": 1e6 / 1024, "kibyte": 1.0},
}


def _scaled(label: str, value: float | None, unit: str) -> str:
    """A metric's value in its column's unit; "?" for a unit this table does not know (rather than a guess)."""
    if value is None:
        return "-"
    if label in _PER_UNIT:
        factor = _PER_UNIT[label].get(unit.lower().removesuffix("/block"))
        if factor is None:
            return "?"
        value *= factor
        return f"{value:.3f}" if label == "ms" else f"{value:.2f}" if label == "SM GHz" else f"{value:.0f}"
    if label == "inst M":
        return f"{value / 1e6:.0f}"
    return f"{value:.0f}" if label == "regs" else f"{value:.1f}"


def stalls(row: dict, top: int = 4) -> str:
    """The `top` largest warp-stall reasons (cycles per issued instruction, ncu's WarpStateStats)."""
    found = []
    for name, (value, _) in row.items():
        m = _STALL.match(name)
        number = _number(value)
        reason = m and (m.group(1) or m.group(2))
        if m and number is not None and not name.endswith("_not_issued.ratio") and reason != "selected":
            found.append((number, reason))  # ("selected": issuing, 1 per issue by definition; not a stall)
    found.sort(reverse=True)
    return ", ".join(f"{reason} {value:.2f}" for value, reason in found[:top]) or "-"


MARKER = "spin_kernel"  # torch.cuda._sleep's kernel: the driver launches one before each candidate


def labels_from_log(text: str) -> list[str]:
    """The driver's '# profiled:' lines, in order: "S=... causal=... name"."""
    out = []
    for line in text.splitlines():
        m = re.match(r"# profiled: (S=\d+ causal=\w+) \| (.+)$", line.strip())
        if m:
            out.append(f"{m.group(1)} {m.group(2)}")
    return out


def summary_lines(rows: list[dict], labels: list[str]) -> list[str]:
    """One table row per profiled kernel but the markers; a kernel takes the label of the marker before it (the
    n-th marker: labels[n]; "?" where the log names fewer)."""
    head = ["candidate", "kernel"] + [label for label, _ in _COLUMNS] + ["largest stalls (cycles/issue)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_markers = 0
    for row in rows:
        kernel = row.get("Kernel Name", ("?", ""))[0]
        if MARKER in kernel:
            n_markers += 1
            continue
        label = labels[n_markers - 1] if 0 < n_markers <= len(labels) else "?"
        kernel = kernel if len(kernel) <= 48 else kernel[:45] + "..."
        cells = [_scaled(lbl, *_metric(row, patterns)[1:]) for lbl, patterns in _COLUMNS]
        lines.append("| " + " | ".join([label, kernel, *cells, stalls(row)]) + " |")
    if labels and len(labels) != n_markers:
        lines.append(f"(the driver's log names {len(labels)} candidates, ncu profiled {n_markers} markers: labels may "
                     "be off)")
    return lines


PARKED_MAX_EXECUTIONS = 1000  # a NOP executed at most this often (warp-level) holds parked warps, not a loop


def read_source_csv(text: str) -> list[tuple[str, list[dict]]]:
    """ncu's source page as CSV: one ("Kernel Name" line, rows) per kernel, each row a dict by column name."""
    out, header, rows, name = [], None, None, None
    for line in text.splitlines():
        if line.startswith('"Kernel Name"'):
            name = next(csv.reader([line]))[1]
            header, rows = None, []
            out.append((name, rows))
        elif name is not None and line.strip():
            cells = next(csv.reader([line]))
            if header is None:
                header = cells
            else:
                rows.append(dict(zip(header, cells)))
    return out


def _int(text) -> int:
    value = _number(text or "")
    return int(value) if value is not None else 0


def source_lines(kernels: list[tuple[str, list[dict]]], top: int = 12) -> list[str]:
    """Per kernel (markers skipped, a kernel listed twice in a row shown once): warp-stall samples by reason, and
    the `top` most-sampled SASS instructions with their share of the samples and their executions."""
    lines, last = [], None
    for name, rows in kernels:
        if MARKER in name or not rows:
            continue
        key = (name, len(rows), sum(_int(r.get("Warp Stall Sampling (All Samples)")) for r in rows))
        if key == last:  # (ncu prints a kernel's page once per view of the same code)
            continue
        last = key
        reasons, parked, total = {}, 0, 0
        for r in rows:
            samples = _int(r.get("Warp Stall Sampling (All Samples)"))
            if r.get("Source", "").strip() == "NOP" and _int(r.get("Instructions Executed")) <= PARKED_MAX_EXECUTIONS:
                parked += samples
                continue
            total += samples
            for col, value in r.items():
                if col.startswith("stall_") and "Not Issued" not in col:
                    reasons[col[6:]] = reasons.get(col[6:], 0) + _int(value)
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"### {short}")
        lines.append(f"samples {total:,} (parked warps apart: {parked:,}); by reason: " + ", ".join(
            f"{k} {100 * v / max(total, 1):.1f}%" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]))
        lines.append("| samples % | executions | instruction |")
        lines.append("|---|---|---|")
        ranked = sorted(rows, key=lambda r: -_int(r.get("Warp Stall Sampling (All Samples)")))
        for r in ranked[:top]:
            samples = _int(r.get("Warp Stall Sampling (All Samples)"))
            lines.append(f"| {100 * samples / max(total + parked, 1):.1f} | {_int(r.get('Instructions Executed')):,} | "
                         f"`{r.get('Source', '').strip()[:80]}` |")
        lines.append("")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.drive:
        return drive(args)
    if args.source:
        with open(args.source) as f:
            print("\n".join(source_lines(read_source_csv(f.read()), args.top)))
        return 0
    with open(args.summary) as f:
        rows = read_raw_csv(f.read())
    labels = []
    if args.log:
        with open(args.log) as f:
            labels = labels_from_log(f.read())
    print("\n".join(summary_lines(rows, labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
