#!/usr/bin/env python3
"""Accuracy of each FP8 mode on outlier-heavy inputs, against a float32 reference.

For each input family (Gaussian; K with 4 outlier channels at 20x / 100x; a massive first token; and,
with --model, real Q/K/V captured from one layer of a model's forward) and each mode (none, smooth_k,
qkv, v_only, combinations), prints SQNR (dB), cosine and relative L2 of the fp8 output against float32
attention on the same bf16 inputs, with plain bf16 SDPA as a yardstick. Markdown table; --plot PNG.

    python scripts/accuracy_report.py                        # CPU: reference backend, small shapes
    python scripts/accuracy_report.py --seq 4096 --heads 32  # GPU: fa3 picked from the device
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def parse_args(argv=None):
    from hf_fp8_attention.accuracy import FAMILIES, MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--backend", default=None, help="fp8 backend (default: picked from the device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="HF model dir, .gguf path or 'default' (embedded SmolLM2) for real activations")
    p.add_argument("--layer", type=int, default=0, help="layer whose Q/K/V are captured with --model")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of SQNR here")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def _real_inputs(args):
    from hf_fp8_attention.demo import load_model_and_tokenizer, resolve_model_source  # embedded GGUF, HF dir or .gguf

    source = resolve_model_source(None if args.model == "default" else args.model)
    model, tokenizer = load_model_and_tokenizer(source, torch.bfloat16, args.device, "sdpa")
    text = "The history of the city begins in the early middle ages, when a small settlement grew around " * 64
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.seq].to(args.device)
    from hf_fp8_attention.accuracy import capture_qkv

    return capture_qkv(model, ids, layer=args.layer)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hf_fp8_attention.accuracy import MODES, make_inputs, score_modes
    from hf_fp8_attention.dispatch import resolve_backend

    backend = resolve_backend(torch.device(args.device), args.backend)
    modes = {m: MODES[m] for m in args.modes}
    rows = []
    inputs = [(f, lambda f=f: make_inputs(f, args.batch, args.heads, args.kv_heads, args.seq, args.head_dim, device=args.device)) for f in args.families]
    if args.model:
        inputs.append((f"real (layer {args.layer})", lambda: _real_inputs(args)))
    for family, make in inputs:
        q, k, v = make()
        rows += score_modes(q, k, v, family=family, modes=modes, backend=backend, is_causal=not args.no_causal)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# backend {backend} on {dev}; torch {torch.__version__}; B={args.batch} H={args.heads}/{args.kv_heads} "
          f"D={args.head_dim} S={args.seq} causal={not args.no_causal}")
    print("| inputs | mode | SQNR dB | cosine | rel L2 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.family} | {r.mode} | {r.sqnr_db:.2f} | {r.cosine:.5f} | {r.rel_l2:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": backend, "device": dev, "rows": [r.__dict__ for r in rows]}, f, indent=1)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r.family for r in rows))
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families)), 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        vals = [next((r.sqnr_db for r in rows if r.family == f and r.mode == mode), 0) for f in families]
        ax.bar([j + i * width for j in range(len(families))], vals, width, label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families, rotation=15)
    ax.set_ylabel("SQNR vs float32 (dB)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    sys.exit(main())
