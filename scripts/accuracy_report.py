#!/usr/bin/env python3
"""Accuracy of each FP8 mode on outlier-heavy, long-context and real inputs, against a float32 reference.

For each input family (Gaussian; K with 4 outlier channels at 20x / 100x; a massive first token) and each
mode (none, smooth_k, qkv, v_only, combinations), prints SQNR (dB), cosine and relative L2 of the fp8
output against float32 attention on the same bf16 inputs, with plain bf16 SDPA as a yardstick. Markdown
table; --json; --plot PNG.

Long context (``--seqlens``): the families are then v_offset (V = N(0,1) + 3), needle (diffuse keys and one
needle key the last queries attend to) and gaussian (`hf_fp8_attention.accuracy.make_long_context`). The
kernels run on the whole sequence; only the output rows of the last ``--last`` queries are scored, against
float32 attention of those queries alone, so 128k stays cheap. One row per (family, S, mode).

Real activations (``--families real`` with ``--model``): post-RoPE Q/K/V of every layer, captured in one
forward on each of ``--windows`` windows of ``--seq`` tokens of a text (default: Wikipedia's wiki.utf8 from
the exllamav2 PyPI package, located as scripts/eval_perplexity.py does; ``--text-file`` for another),
scored per layer; the table gives per mode the SQNR mean and min over layers and windows. ``--model``
without ``real`` keeps the older single row: one layer (``--layer``) on a repeated paragraph.

    python scripts/accuracy_report.py                        # CPU: reference backend, small shapes
    python scripts/accuracy_report.py --seq 4096 --heads 32  # GPU: fa3 picked from the device
    python scripts/accuracy_report.py --seqlens 8192 32768 131072 --modes none smooth_k+smooth_v
    python scripts/accuracy_report.py --model default --families real --seq 512 --windows 2 --modes none qkv
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REAL = "real"


def parse_args(argv=None):
    from hf_fp8_attention.accuracy import FAMILIES, LONG_FAMILIES, MODES, needle_position

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=1024, help="S of the short families; tokens per window of the real one")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--families", nargs="+", default=None,
                   choices=list(dict.fromkeys((*FAMILIES, *LONG_FAMILIES, REAL))),
                   help=f"default: {' '.join(FAMILIES)}; with --seqlens {' '.join(LONG_FAMILIES)}; "
                   f"'{REAL}' (needs --model) with either")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--backend", default=None, help="fp8 backend (default: picked from the device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seqlens", type=int, nargs="+", default=None,
                   help="long-context families at these S, scored on the last --last queries")
    p.add_argument("--last", type=int, default=256, help="queries scored per sequence with --seqlens")
    p.add_argument("--model", default=None,
                   help="HF model dir, .gguf path or 'default' (embedded SmolLM2) for real activations")
    p.add_argument("--layer", type=int, default=0,
                   help="layer whose Q/K/V are captured with --model (without the real family)")
    p.add_argument("--windows", type=int, default=1, help="text windows of --seq tokens for the real family")
    p.add_argument("--text-file", default=None, help="text of the real family (plain, or <doc>-wrapped like wiki.utf8)")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of SQNR here")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    allowed = LONG_FAMILIES if args.seqlens else FAMILIES
    if args.families is None:
        args.families = list(allowed)
    wrong = [f for f in args.families if f not in (*allowed, REAL)]
    if wrong:
        p.error(f"--families {' '.join(wrong)}: {'with' if args.seqlens else 'without'} --seqlens, "
                f"expected {', '.join((*allowed, REAL))}")
    if REAL in args.families and not args.model:
        p.error(f"--families {REAL} needs --model (a HF dir, a .gguf or 'default')")
    if args.seqlens and args.model and REAL not in args.families:
        p.error(f"with --seqlens, --model is used by the {REAL} family: add {REAL} to --families")
    if args.seqlens:
        shortest = min(args.seqlens)
        if shortest < 1 or not 1 <= args.last <= shortest:
            p.error(f"--seqlens must be positive and --last in [1, min(--seqlens)], got --last {args.last}")
        if "needle" in args.families and args.last >= shortest - needle_position(shortest):
            p.error(f"--last {args.last}: the needle family needs every scored query after its needle, at S/16 "
                    f"(--last < {shortest - needle_position(shortest)} for S={shortest})")
    if args.seq < 1 or args.windows < 1:
        p.error("--seq and --windows must be >= 1")
    if args.text_file is not None and not os.path.isfile(args.text_file):
        p.error(f"--text-file {args.text_file}: no such file")
    return args


def _load_model(args):
    from hf_fp8_attention.demo import load_model_and_tokenizer, resolve_model_source  # embedded GGUF, HF dir or .gguf

    source = resolve_model_source(None if args.model == "default" else args.model)
    model, tokenizer = load_model_and_tokenizer(source, torch.bfloat16, args.device, "sdpa")
    return source, model, tokenizer


def _real_inputs(args, model, tokenizer):
    """One layer's Q/K/V on a repeated paragraph (--model without the real family)."""
    from hf_fp8_attention.accuracy import capture_qkv

    text = "The history of the city begins in the early middle ages, when a small settlement grew around " * 64
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.seq].to(args.device)
    return capture_qkv(model, ids, layer=args.layer)


def text_windows(args, tokenizer) -> tuple[list[torch.Tensor], str]:
    """--windows disjoint (1, --seq) token windows from the start of the text, and the text's description.
    The text is eval_perplexity's corpus (--text-file, else exllamav2's wiki.utf8)."""
    import eval_perplexity  # beside this script, on sys.path like _common

    try:
        text, corpus = eval_perplexity.load_corpus(argparse.Namespace(dataset=None, text_file=args.text_file))
    except FileNotFoundError as err:
        raise SystemExit(f"error: the {REAL} family's text: {err}")
    need = args.seq * args.windows
    ids = tokenizer(text[: 16 * need], return_tensors="pt").input_ids  # ~4 characters a token: ample
    if ids.shape[1] < need:
        ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < need:
        raise SystemExit(
            f"error: {corpus} has {ids.shape[1]} tokens, fewer than --windows {args.windows} x --seq {args.seq}")
    return [ids[:, i * args.seq : (i + 1) * args.seq] for i in range(args.windows)], corpus


def score_real(args, model, tokenizer, modes, backend) -> dict:
    """Every layer of every window scored (`score_modes`); per mode: SQNR mean / min, where the min is."""
    from hf_fp8_attention.accuracy import capture_layers_qkv, score_modes

    windows, corpus = text_windows(args, tokenizer)
    rows, shape = [], None
    for w, ids in enumerate(windows):
        for layer, (q, k, v) in capture_layers_qkv(model, ids.to(args.device)).items():
            shape = f"H={q.shape[1]}/{k.shape[1]} D={q.shape[-1]}"
            for r in score_modes(q, k, v, family=REAL, modes=modes, backend=backend, is_causal=not args.no_causal):
                rows.append({"window": w, "layer": layer, **r.__dict__})
    summary = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        worst = min(mine, key=lambda r: r["sqnr_db"])
        summary.append({
            "mode": mode, "n": len(mine),
            "sqnr_mean": sum(r["sqnr_db"] for r in mine) / len(mine), "sqnr_min": worst["sqnr_db"],
            "worst_layer": worst["layer"], "worst_window": worst["window"],
            "cosine_mean": sum(r["cosine"] for r in mine) / len(mine), "cosine_min": min(r["cosine"] for r in mine),
            "rel_l2_max": max(r["rel_l2"] for r in mine),
        })
    return {"corpus": corpus, "windows": len(windows), "seq": args.seq, "layers": len({r["layer"] for r in rows}),
            "shape": shape, "summary": summary, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    from hf_fp8_attention.accuracy import MODES, make_inputs, make_long_context, score_long_context, score_modes
    from hf_fp8_attention.dispatch import resolve_backend

    backend = resolve_backend(torch.device(args.device), args.backend)
    modes = {m: MODES[m] for m in args.modes}
    causal = not args.no_causal
    synthetic = [f for f in args.families if f != REAL]
    source = model = None
    if args.model:
        source, model, tokenizer = _load_model(args)
    rows = []  # dicts: family, mode, sqnr_db, cosine, rel_l2 (and S with --seqlens)
    if args.seqlens:
        for s in args.seqlens:
            for family in synthetic:
                q, k, v = make_long_context(family, s, b=args.batch, h=args.heads, h_kv=args.kv_heads, d=args.head_dim,
                                            device=args.device, last=args.last)
                scores = score_long_context(q, k, v, family=family, modes=modes, backend=backend, last=args.last,
                                            is_causal=causal)
                rows += [{"S": s, **r.__dict__} for r in scores]
                del q, k, v
    else:
        shape = (args.batch, args.heads, args.kv_heads, args.seq, args.head_dim)
        inputs = [(f, lambda f=f: make_inputs(f, *shape, device=args.device)) for f in synthetic]
        if model is not None and REAL not in args.families:
            inputs.append((f"real (layer {args.layer})", lambda: _real_inputs(args, model, tokenizer)))
        for family, make in inputs:
            q, k, v = make()
            scores = score_modes(q, k, v, family=family, modes=modes, backend=backend, is_causal=causal)
            rows += [r.__dict__ for r in scores]
    real = score_real(args, model, tokenizer, modes, backend) if REAL in args.families else None

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# backend {backend} on {dev}; torch {torch.__version__}; causal={causal}")
    if rows:
        if args.seqlens:
            print(f"# long context: B={args.batch} H={args.heads}/{args.kv_heads} D={args.head_dim}; "
                  f"scored on the last {args.last} queries of each sequence")
        else:
            print(f"# B={args.batch} H={args.heads}/{args.kv_heads} D={args.head_dim} S={args.seq}")
        size = ["S"] if args.seqlens else []
        print(_common.markdown_table(
            ["inputs", *size, "mode", "SQNR dB", "cosine", "rel L2"],
            [[r["family"], *(r[c] for c in size), r["mode"], _common.fmt(r["sqnr_db"], ".2f"),
              _common.fmt(r["cosine"], ".5f"), _common.fmt(r["rel_l2"], ".4f")] for r in rows]))
    if real is not None:
        print(f"\n# real: {source}, {real['shape']}; {real['layers']} layers x {real['windows']} "
              f"windows of {real['seq']} tokens of {real['corpus']}")
        print(_common.markdown_table(
            ["mode", "SQNR dB mean", "SQNR dB min", "min at", "cosine mean", "cosine min", "rel L2 max"],
            [[r["mode"], _common.fmt(r["sqnr_mean"], ".2f"), _common.fmt(r["sqnr_min"], ".2f"),
              f"layer {r['worst_layer']} window {r['worst_window']}", _common.fmt(r["cosine_mean"], ".5f"),
              _common.fmt(r["cosine_min"], ".5f"), _common.fmt(r["rel_l2_max"], ".4f")] for r in real["summary"]]))
    if args.json:
        report = {"backend": backend, "device": dev, "causal": causal, "rows": rows}
        if args.seqlens:
            report.update(seqlens=args.seqlens, last=args.last)
        if real is not None:
            report["real"] = {"model": str(source), **real}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        bars = [(r["family"] + (f" S={r['S']}" if "S" in r else ""), r["mode"], r["sqnr_db"]) for r in rows]
        bars += [(f"{REAL} (mean)", r["mode"], r["sqnr_mean"]) for r in (real or {}).get("summary", [])]
        _plot(bars, args.plot)
    return 0


def _plot(bars, path):
    """bars: (inputs, mode, SQNR dB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(b[0] for b in bars))
    modes = list(dict.fromkeys(b[1] for b in bars))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families)), 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        vals = [next((b[2] for b in bars if b[0] == f and b[1] == mode), 0) for f in families]
        ax.bar([j + i * width for j in range(len(families))], vals, width, label=mode)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families, rotation=15)
    ax.set_ylabel("SQNR vs float32 (dB)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    sys.exit(main())
