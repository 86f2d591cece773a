#!/usr/bin/env python3
"""End-to-end prefill time of a Llama-3-8B-shaped model (random weights) per attention implementation.

    python scripts/benchmark_model.py                                  # S = 4k..128k, 32 layers, H100
    python scripts/benchmark_model.py --layers 4 --seqlens 8192 32768  # quick
    python scripts/benchmark_model.py --impls sdpa fa3_bf16 fp8_fa3 fp8_fa3:hadamard=qkv --plot prefill.png
    python scripts/benchmark_model.py --layers 2 --seqlens 131072 --impls fa3_bf16 fp8_fa3 --profile  # time per kind

The model is built from a LlamaConfig (32 layers, hidden 4096, 32/8 heads, head_dim 128, MLP 14336, vocab
128256) directly on the GPU in bf16 with N(0, 0.02) weights (transformers' init skipped); speed does not
depend on the weights. One forward per run: batch 1, ``use_cache=False``, ``logits_to_keep=1`` (logits of
the last position only: 128256 values, not S x 128256). Time = median of ``--repeats`` runs after
``--warmup`` runs (CUDA synchronize + perf_counter); peak memory = torch.cuda.max_memory_allocated per run.

Implementations (``--impls``):
- ``sdpa``: transformers' SDPA attention (torch picks flash/cuDNN/efficient).
- ``fa3_bf16`` ("FA3 bf16"): ``flash_attn_interface.flash_attn_func`` on the bf16 BSHD tensors, registered
  here as an AttentionInterface function, because transformers' own ``flash_attention_3`` refuses the
  tokenspeed-fa3 wheel (it looks for a distribution named flash-attn-3).
- ``flash_attention_3``: transformers' own, when ``is_flash_attn_3_available()``.
- ``fp8``, ``fp8_fa3``, ``fp8_triton`` (if the package has that backend), ... via
  ``hf_fp8_attention.prepare_model``; ``name:key=value`` passes prepare_model kwargs (e.g. hadamard=qkv).
``--profile``: after the timed runs, one more forward under torch.profiler; its CUDA kernels' time summed per
category (attention, quantize, matmul, other: `kernel_category`) is printed as a second table, so that the
share a faster attention can change is visible (it does not change the timed rows). The fp8 paths' fused RoPE
counts as quantize; the bf16 paths' RoPE (Transformers' elementwise kernels) as other, so "attention +
quantize" slightly understates fp8's gain over bf16.
Unavailable implementations are skipped with a note. Memory at 128k: weights 15 GiB, the hidden states
1 GiB per tensor, one MLP intermediate 3.5 GiB per tensor; ~30 GiB peak, fine on 80 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time

import torch

from hf_fp8_attention.backends import ATTN_IMPLEMENTATIONS
from hf_fp8_attention.demo import DTYPES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
# For tests: the same structure at toy size (head_dim 64 has fp8 kernels).
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1024,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
DEFAULT_SEQLENS = [4096, 8192, 16384, 32768, 65536, 131072]
FA3_BF16 = "fa3_bf16"
LABELS = {"sdpa": "sdpa", FA3_BF16: "FA3 bf16", "flash_attention_3": "transformers flash_attention_3"}
EXTRA_IMPLS = (FA3_BF16, "flash_attention_3")
# --profile: a CUDA kernel's category, the first pattern its name matches (case-insensitive); else "other".
# Quantize first (this package's quantize / RoPE / centring kernels), then attention (FA3's flash::, torch's
# flash / efficient / cuDNN SDPA kernels, this package's fp8_attn kernels), then the matmuls (cuBLAS / CUTLASS).
KERNEL_CATEGORIES = (
    ("quantize", r"quantize|rope_block|centring_sums|add_v_mean"),
    ("attention", r"flash|fmha|attn|attention|sdpa"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|wgmma"),
)
PROFILE_COLUMNS = tuple(c for c, _ in KERNEL_CATEGORIES) + ("other",)


# ------------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------------


def default_impls() -> list[str]:
    impls = ["sdpa", FA3_BF16, "fp8_fa3"]
    if "fp8_triton" in ATTN_IMPLEMENTATIONS:
        impls.append("fp8_triton")
    return impls


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmark_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seqlens", type=int, nargs="+", default=DEFAULT_SEQLENS)
    p.add_argument("--impls", nargs="+", default=None, help=f"default: {' '.join(default_impls())}")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: 32, the 8B model)")
    p.add_argument("--tiny", action="store_true", help="toy-sized Llama (hidden 256, 2 layers) for tests / CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per (S, implementation)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per (S, implementation); the median is reported")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only makes sense with --tiny")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--profile", action="store_true",
                   help="one more forward per (S, implementation) under torch.profiler: CUDA kernel ms per category")
    p.add_argument("--plot", default=None, help="write a PNG: seconds vs S and speedup vs sdpa (needs matplotlib)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.seqlens):
        parser.error("--seqlens must be positive")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (this machine has none); for a CPU smoke run use --device cpu --tiny")
    if device.type != "cuda" and not args.tiny:
        parser.error(f"--device {args.device}: the 8B-shaped model only makes sense on a GPU; add --tiny")
    if args.profile and device.type != "cuda":
        parser.error("--profile sums CUDA kernel times: it needs --device cuda")
    if args.plot and not _common.have_matplotlib():
        parser.error("--plot needs matplotlib (pip install matplotlib)")
    if args.impls is None:
        args.impls = default_impls()
    specs = []
    for spec in args.impls:
        try:
            name, options = _common.check_attn_spec(spec, extra_names=EXTRA_IMPLS)
        except ValueError as err:
            parser.error(f"--impls: {err}")
        specs.append((spec, name, options))
    if len(set(args.impls)) != len(args.impls):
        parser.error("--impls: the same implementation is listed twice")
    args.specs = specs
    return args


# ------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------


def build_config(*, tiny: bool = False, layers: int | None = None):
    from transformers import LlamaConfig

    shape = dict(TINY if tiny else LLAMA3_8B)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    max_pos = 4096 if tiny else 131072
    return LlamaConfig(**shape, max_position_embeddings=max_pos, initializer_range=0.02, use_cache=False)


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


@torch.no_grad()
def build_model(config, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """LlamaForCausalLM allocated on ``device`` in ``dtype``; weights N(0, initializer_range), norms 1.

    transformers' own init is skipped (it would run per module); one normal_ per tensor on the device is
    fast and gives finite activations.
    """
    from transformers import LlamaForCausalLM

    with torch.device(device), _no_init_weights():
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # RMSNorm weights (Llama has no biases)
            p.fill_(1.0)
        else:
            p.normal_(0.0, config.initializer_range, generator=gen)
    return model.eval()


# ------------------------------------------------------------------------------------------------------
# FA3 bf16 through AttentionInterface
# ------------------------------------------------------------------------------------------------------


def fa3_bf16_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """AttentionInterface function: FA3 (flash_attn_interface) on bf16. q (B, H_q, S, D), k/v (B, H_kv, S, D)
    BHSD views in; (B, S, H_q, D) out. No padding masks (batches here are unpadded)."""
    from flash_attn_interface import flash_attn_func

    if attention_mask is not None:
        raise ValueError("fa3_bf16 (benchmark only) takes no padding mask")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # BSHD; FA3 needs only the last dim contiguous
    out = flash_attn_func(q, k, v, softmax_scale=scaling, causal=bool(is_causal) and q.shape[1] > 1)
    if isinstance(out, tuple):  # older FA3 builds return (out, softmax_lse)
        out = out[0]
    return out, None


def register_fa3_bf16() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(FA3_BF16, fa3_bf16_attention)
    AttentionMaskInterface.register(FA3_BF16, flash_attention_mask)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why an implementation cannot run here, or None."""
    import importlib.util

    if name == FA3_BF16:
        if device.type != "cuda":
            return "needs CUDA"
        if importlib.util.find_spec("flash_attn_interface") is None:
            return "flash_attn_interface (FA3 wheel, tokenspeed-fa3) not installed"
    if name == "flash_attention_3":
        from transformers.utils import is_flash_attn_3_available

        if not is_flash_attn_3_available():
            return "transformers' is_flash_attn_3_available() is False (use fa3_bf16)"
    backend = ATTN_IMPLEMENTATIONS.get(name)
    if backend is not None:
        from hf_fp8_attention.dispatch import check_backend

        try:
            check_backend(backend, device)
        except Exception as err:  # wrong GPU, kernel not installed, or a backend dispatch does not know yet
            return f"{type(err).__name__}: {err}"
    return None


def switch(model, name: str, options: dict) -> str:
    if name == FA3_BF16:
        import hf_fp8_attention as hfa

        hfa.unprepare_model(model)
        model.set_attn_implementation(FA3_BF16)
        return LABELS[FA3_BF16]
    return _common.apply_attention(model, name, options)


# ------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


def time_prefill(model, ids: torch.Tensor, *, warmup: int, repeats: int) -> dict:
    """{"s": median seconds, "runs": [...], "peak_gib": max over the timed runs, "finite": bool}."""
    device = ids.device
    for _ in range(warmup):
        prefill(model, ids)
    _sync(device)
    runs, peaks, finite = [], [], True
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        logits = prefill(model, ids)
        _sync(device)
        runs.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)
        finite = finite and bool(torch.isfinite(logits).all())
        del logits
    return {
        "s": statistics.median(runs),
        "runs": runs,
        "peak_gib": max(peaks) if peaks else None,
        "finite": finite,
    }


def kernel_category(name: str) -> str:
    """The --profile category of a CUDA kernel name (`KERNEL_CATEGORIES`)."""
    for category, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return category
    return "other"


def kernel_ms_by_category(kernels) -> dict:
    """{category: ms, ..., "total": ms} from (name, microseconds) pairs of CUDA kernels."""
    ms = dict.fromkeys(PROFILE_COLUMNS, 0.0)
    for name, us in kernels:
        ms[kernel_category(name)] += us / 1e3
    ms["total"] = sum(ms[c] for c in PROFILE_COLUMNS)
    return ms


def profile_prefill(model, ids: torch.Tensor) -> dict:
    """One forward under torch.profiler (CUDA activity): `kernel_ms_by_category` of its kernels. Called after
    `time_prefill` on the same model and ids, whose runs left nothing to compile or tune."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill(model, ids)
        _sync(ids.device)
    kernels = _common.cuda_kernel_times(prof)
    if not kernels:
        raise RuntimeError("the profiler recorded no CUDA kernel")
    return kernel_ms_by_category(kernels)


def format_profile_table(rows: list[dict]) -> str:
    """--profile's table: kernel ms per category, and attention + quantize against FA3 bf16's attention."""
    headers = ["S", "implementation", *(f"{c} ms" for c in PROFILE_COLUMNS), "kernels ms",
               "attn+quantize vs FA3 bf16"]
    out = []
    for r in rows:
        p = r.get("profile")
        if not p:
            continue
        fa3 = next((x["profile"] for x in rows if x["S"] == r["S"] and x["impl"] == FA3_BF16 and x.get("profile")),
                   None)
        mine = p["attention"] + p["quantize"]
        ratio = fa3["attention"] / mine if fa3 and mine else None
        out.append([r["S"], r["label"], *(_common.fmt(p[c], ".1f") for c in PROFILE_COLUMNS),
                    _common.fmt(p["total"], ".1f"), _common.fmt(ratio, ".2f") + ("x" if ratio else "")])
    return _common.markdown_table(headers, out)


def format_table(rows: list[dict]) -> str:
    headers = ["S", "implementation", "s (median)", "tokens/s", "peak GiB", "vs sdpa", "vs FA3 bf16"]
    out = []
    for r in rows:
        if r.get("error"):
            out.append([r["S"], r["label"], r["error"], "-", "-", "-", "-"])
            continue
        out.append(
            [
                r["S"],
                r["label"],
                _common.fmt(r["s"], ".3f"),
                _common.fmt(r["tokens_per_s"], ",.0f"),
                _common.fmt(r["peak_gib"], ".1f"),
                _common.fmt(r["vs_sdpa"], ".2f") + ("x" if r["vs_sdpa"] is not None else ""),
                _common.fmt(r["vs_fa3_bf16"], ".2f") + ("x" if r["vs_fa3_bf16"] is not None else ""),
            ]
        )
    return _common.markdown_table(headers, out)


def plot(path: str, rows: list[dict], title: str) -> None:
    seconds, speedup = {}, {}
    for r in rows:
        if r.get("s") is None:
            continue
        xs, ys = seconds.setdefault(r["label"], ([], []))
        xs.append(r["S"])
        ys.append(r["s"])
        if r.get("vs_sdpa") is not None:
            xs, ys = speedup.setdefault(r["label"], ([], []))
            xs.append(r["S"])
            ys.append(r["vs_sdpa"])
    panels = {"prefill seconds": seconds, "speedup vs sdpa": speedup}
    _common.plot_panels(path, panels, xlabel="sequence length", ylabel="", logy=("prefill seconds",), title=title)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import hf_fp8_attention  # noqa: F401  (registers the fp8 names)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    register_fa3_bf16()
    specs = []
    for spec, name, options in args.specs:
        reason = unavailable_reason(name, device)
        if reason:
            print(f"# skipping {spec}: {reason}", file=sys.stderr)
        else:
            specs.append((spec, name, options))

    config = build_config(tiny=args.tiny, layers=args.layers)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype, seed=args.seed)
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# built Llama ({config.num_hidden_layers} layers, hidden {config.hidden_size}, heads "
        f"{config.num_attention_heads}/{config.num_key_value_heads}, head_dim {config.head_dim}, MLP "
        f"{config.intermediate_size}, vocab {config.vocab_size}; {n_params / 1e9:.2f} B params) in "
        f"{time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    labels = {}
    for spec, name, options in specs:  # fail fast: an implementation prepare_model refuses stops here
        try:
            description = switch(model, name, options)
        except (ValueError, TypeError, RuntimeError, ImportError) as err:
            raise SystemExit(f"error: --impls {spec}: {type(err).__name__}: {err}")
        labels[spec] = LABELS.get(spec, spec)
        print(f"# {spec}: {description}", file=sys.stderr)

    rows = []
    for s in args.seqlens:
        gen = torch.Generator(device=device).manual_seed(args.seed + s)
        ids = torch.randint(0, config.vocab_size, (args.batch, s), device=device, generator=gen)
        for spec, name, options in specs:
            switch(model, name, options)
            row = {"S": s, "impl": spec, "label": labels[spec], "s": None, "peak_gib": None}
            try:
                row.update(time_prefill(model, ids, warmup=args.warmup, repeats=args.repeats))
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
            except Exception as err:  # one implementation failing at one S: report and keep going
                row["error"] = f"{type(err).__name__}"
                print(f"# {spec} S={s}: {type(err).__name__}: {err}", file=sys.stderr)
            if args.profile and row["s"] is not None:  # its own failure does not void the timed row
                try:
                    row["profile"] = profile_prefill(model, ids)
                except Exception as err:
                    row["profile_error"] = f"{type(err).__name__}: {err}"
                    print(f"# {spec} S={s} --profile: {row['profile_error']}", file=sys.stderr)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row["tokens_per_s"] = args.batch * s / row["s"] if row["s"] else None
            rows.append(row)
            status = row.get("error") or f"{row['s']:.3f} s"
            print(f"# S={s} {labels[spec]}: {status}", file=sys.stderr, flush=True)
        del ids
    _common.apply_attention(model, "sdpa")

    for r in rows:
        same_s = {x["impl"]: x["s"] for x in rows if x["S"] == r["S"]}
        base, fa3 = same_s.get("sdpa"), same_s.get(FA3_BF16)
        r["vs_sdpa"] = base / r["s"] if base and r["s"] else None
        r["vs_fa3_bf16"] = fa3 / r["s"] if fa3 and r["s"] else None

    vers = _common.versions()
    header = {
        "device": _common.device_name(device),
        "model": "tiny Llama" if args.tiny else "Llama-3-8B shape, random weights",
        "layers": config.num_hidden_layers,
        "batch": args.batch,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "versions": vers,
    }
    title = (
        f"{header['model']}, {config.num_hidden_layers} layers, B={args.batch}, {args.dtype}, prefill "
        f"(use_cache=False, last logits only) on {header['device']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "rows": rows}, f, indent=1)
    if args.plot:
        plot(args.plot, rows, title)
    print(f"\n# {title}")
    print(f"# median of {args.repeats} runs after {args.warmup} warmup; " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(format_table(rows))
    if args.profile:
        print("\n# CUDA kernel time of one profiled forward, per category (KERNEL_CATEGORIES)")
        print(format_profile_table(rows))
    return {**header, "rows": rows}


if __name__ == "__main__":
    main()
