#!/usr/bin/env python3
"""fp8 attention across GPUs: tensor parallelism (tp_plan="auto") and device_map="auto", against one GPU.

    torchrun --nproc-per-node 2 scripts/multi_gpu_check.py --mode tp
    python scripts/multi_gpu_check.py --mode device_map          # one process, layers over all GPUs
    torchrun --nproc-per-node 2 scripts/multi_gpu_check.py --mode tp --kv-cache fp8 --qk-format int8

A Llama-shaped model with random weights is built from a config and saved to --workdir (rank 0), then
loaded twice: split (tp_plan="auto" or device_map="auto") and whole on one GPU. NCCL's NVLink multicast
stays off (NCCL_NVLS_ENABLE=0), as the lent machines require.

Prefill check (no --kv-cache / --qk-format): both models loaded with attn_implementation=--attn; the split
model's logits are compared with the single-GPU fp8 run (cosine >= --min-cosine passes) and prefill time
per sequence length is printed, next to the same comparison with bf16 SDPA (the split's own noise).

Decode check (--kv-cache fp8 and/or --qk-format int8; two separate modes, since kv_cache="fp8" runs only the
default numerics; giving both runs both, one after the other): for each prompt length S, the single-GPU
bf16 SDPA model generates --decode-steps greedy tokens after the prompt; then every run (bf16 SDPA split,
and per mode split and single GPU) prefills the prompt and teacher-forces those tokens one decode step at
a time through its KV cache, so all runs see the same inputs and their per-step logits compare directly.
  fp8-cache: prepare_model(model, kv_cache="fp8"): the prefill call gets an FP8Cache by itself, decode
             steps read the fp8 blocks (FP8CacheLayer.attend); the script reports the KV heads each rank's
             cache layers hold (H_kv / world under TP) and counts attend / update calls.
  int8:      prepare_model(model, qk_format="int8", kv_cache="bf16"): int8 Q.K^T (triton backend on GPU,
             reference emulation on CPU) over transformers' own cache.
A mode passes when 1 - cos(split, single) <= 1 - cos of the bf16 pair + --cos-margin, on the prefill
logits (last 64 prompt positions) and on the decode logits (all steps). Prefill and decode ms/token of
each run are printed. On a machine without GPUs, --mode tp runs on gloo CPU ranks with the reference
backend (the CPU test does this).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402


# The decode modes: their prepare_model keywords (kv_cache="fp8" refuses other numerics options, so int8 Q/K
# decodes over transformers' bf16 cache).
DECODE_MODES = {
    "fp8-cache": dict(kv_cache="fp8"),
    "int8": dict(qk_format="int8", kv_cache="bf16"),
}
PREFILL_LOGITS = 64  # prompt positions whose logits are compared (logits_to_keep)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["tp", "device_map"], required=True)
    p.add_argument("--attn", default="fp8_fa3", help="attention name of the prefill check")
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384], help="prompt lengths")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/hfa_multi_gpu_model")
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range of the random model")
    p.add_argument("--min-cosine", type=float, default=0.999, help="prefill check's pass bar")
    p.add_argument("--prepare", action="store_true", help="prefill check: also call prepare_model (fused RoPE)")
    p.add_argument("--kv-cache", choices=["off", "fp8"], default="off",
                   help="fp8: decode check of prepare_model(kv_cache='fp8') (the FP8Cache)")
    p.add_argument("--qk-format", choices=["e4m3", "int8"], default="e4m3",
                   help="int8: decode check of prepare_model(qk_format='int8') over transformers' cache")
    p.add_argument("--backend", default=None,
                   help="decode check: fp8 backend named to prepare_model (default: planned from the device "
                        "for each mode's options, then named, so every call runs fp8)")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="decode check: an untimed prefill + this many decode steps before each timed run")
    p.add_argument("--cos-margin", type=float, default=1e-4,
                   help="decode check: 1 - cos(split, single) may exceed the bf16 pair's by this much")
    p.add_argument("--pin-device", action="store_true",
                   help="device_map only, a diagnostic: make each decoder layer's GPU the current CUDA device while "
                        "it runs. Triton launches on the current device, so this separates the numerics from a "
                        "kernel launcher that does not follow its tensors' device")
    args = p.parse_args(argv)
    if args.pin_device and args.mode != "device_map":
        p.error("--pin-device is for --mode device_map (under TP each rank's current device is its GPU)")
    if args.decode_steps < 1:
        p.error("--decode-steps must be >= 1")
    if min(args.seqlens) < PREFILL_LOGITS:
        p.error(f"--seqlens must be >= {PREFILL_LOGITS} (the prefill logits compared)")
    return args


def decode_modes(args) -> list[str]:
    """The decode-check modes the flags ask for, in a fixed order ([] = the prefill check)."""
    return [m for m, on in (("fp8-cache", args.kv_cache == "fp8"), ("int8", args.qk_format == "int8")) if on]


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        vocab_size=32000, max_position_embeddings=max(args.seqlens) + args.decode_steps + args.warmup_steps,
        initializer_range=args.init_std, use_cache=False,
    )


def _same_shape(saved, wanted) -> bool:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "initializer_range")
    return all(getattr(saved, k, None) == getattr(wanted, k) for k in keys)


def _build_model(args) -> None:
    """Save the random model to --workdir unless one of the same shape is there already."""
    from transformers import LlamaConfig, LlamaForCausalLM

    wanted = _config(args)
    if os.path.exists(os.path.join(args.workdir, "config.json")):
        if _same_shape(LlamaConfig.from_pretrained(args.workdir), wanted):
            return
        print(f"multi_gpu_check: {args.workdir} holds a model of another shape; rebuilding it")
    torch.manual_seed(0)
    LlamaForCausalLM(wanted).to(torch.bfloat16).save_pretrained(args.workdir)


def _sync():
    # every GPU: under device_map the last layers (and the logits) are on another device than the current one
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def _timed_logits(model, ids, device):
    with torch.no_grad():
        model(ids[:, :128].to(device))  # warm-up: compile/autotune outside the timing
        _sync()
        t0 = time.perf_counter()
        logits = model(ids.to(device), logits_to_keep=64).logits.float()
        _sync()
    return logits, time.perf_counter() - t0


def _cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double().cpu(), b.flatten().double().cpu(), dim=0).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    import hf_fp8_attention  # registers the attention names

    tp = args.mode == "tp"
    cuda = torch.cuda.is_available()
    if tp:
        # gloo on a machine without GPUs: a CPU dry run of the same code (reference backend)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank = dist.get_rank()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank = 0
        if torch.cuda.device_count() < 2:
            print("multi_gpu_check: device_map mode needs >= 2 GPUs", file=sys.stderr)
            return 2
    if rank == 0:
        _build_model(args)
    if tp:
        dist.barrier()

    modes = decode_modes(args)
    load = dict(dtype=torch.bfloat16, attn_implementation="sdpa" if modes else args.attn)
    multi = (
        LlamaForCausalLM.from_pretrained(args.workdir, tp_plan="auto", **load)
        if tp
        else LlamaForCausalLM.from_pretrained(args.workdir, device_map="auto", **load)
    ).eval()
    here = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    single = LlamaForCausalLM.from_pretrained(args.workdir, **load).to(here).eval()
    devices = {p.device for p in multi.parameters()}
    ok = True
    if not tp and len(devices) < 2:
        print(f"multi_gpu_check: device_map='auto' put the whole model on {devices}: nothing was split")
        ok = False
    if args.pin_device:
        _pin_current_device(multi)
    run = _decode_check if modes else _prefill_check
    ok &= run(args, modes, multi, single, tp=tp, rank=rank, devices=devices)
    if tp:
        dist.destroy_process_group()
    return 0 if ok else 1


def _pin_current_device(model) -> None:
    """--pin-device: each decoder layer runs with its GPU as the current CUDA device; the model's call leaves
    the current device as it found it."""
    before = {}

    def enter(layer, args):
        torch.cuda.set_device(layer.input_layernorm.weight.device)

    def model_enter(module, args):
        before["device"] = torch.cuda.current_device()

    def model_exit(module, args, output):
        torch.cuda.set_device(before["device"])

    for layer in model.model.layers:
        layer.register_forward_pre_hook(enter)
    model.register_forward_pre_hook(model_enter)
    model.register_forward_hook(model_exit)


def _header(args, tp: bool, what: str) -> str:
    import torch.distributed as dist

    world = dist.get_world_size() if tp else torch.cuda.device_count()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"\n# {args.mode} over {world} ranks/GPUs ({name}), {what}, {args.layers} layers, hidden {args.hidden}, "
            f"heads {args.heads}/{args.kv_heads}, B=1")


# --- prefill check ---------------------------------------------------------------------------------------


def _prefill_check(args, modes, multi, single, *, tp: bool, rank: int, devices) -> bool:
    import hf_fp8_attention

    if args.prepare:
        hf_fp8_attention.prepare_model(multi)
        hf_fp8_attention.prepare_model(single)
    seen = {}  # what the attention of layer 0 gets on this rank: local heads under TP

    def _record(module, inputs, output):
        seen.setdefault("heads", (output.shape[-1] // module_head_dim))

    attn0 = multi.model.layers[0].self_attn
    module_head_dim = attn0.head_dim
    hook = attn0.q_proj.register_forward_hook(_record)
    first_device = next(multi.parameters()).device
    described = hf_fp8_attention.describe_backend(multi)
    ok = True
    inputs = {s: torch.randint(0, 32000, (1, s), generator=torch.Generator().manual_seed(s)) for s in args.seqlens}
    single_device = next(single.parameters()).device
    rows = {}
    for s, ids in inputs.items():
        got, t_multi = _timed_logits(multi, ids, first_device)
        ref, t_single = _timed_logits(single, ids, single_device)
        rows[s] = [t_multi, t_single, _cosine(got, ref), ref]
        ok &= rows[s][2] >= args.min_cosine
    hook.remove()
    # The noise floor of the split itself: the same comparison with bf16 SDPA attention (TP changes the
    # order of the bf16 sums in o_proj/down_proj), and how far fp8 is from bf16 on one GPU.
    for model in (multi, single):
        hf_fp8_attention.unprepare_model(model)
        model.set_attn_implementation("sdpa")
    for s, ids in inputs.items():
        got, _ = _timed_logits(multi, ids, first_device)
        ref, _ = _timed_logits(single, ids, single_device)
        rows[s] += [_cosine(got, ref), _cosine(rows[s][3], ref)]
    if rank == 0:
        print(_header(args, tp, f"attn={args.attn}, prepare_model={args.prepare}"))
        print(f"layer-0 attention on rank 0 saw {seen.get('heads')} of {args.heads} query heads; "
              f"devices of the layers: {sorted(map(str, devices))}; {described}")
        print("| S | multi-GPU prefill s | single-GPU prefill s | fp8 logits cosine multi vs single "
              "| bf16 SDPA cosine multi vs single | fp8 vs bf16 cosine, single GPU |")
        print("|---|---|---|---|---|---|")
        for s, (tm, ts, cos, _, cos_bf16, cos_fp8_bf16) in rows.items():
            print(f"| {s} | {tm:.3f} | {ts:.3f} | {cos:.5f} | {cos_bf16:.5f} | {cos_fp8_bf16:.5f} |")
        print("multi_gpu_check:", "PASS" if ok else "FAIL", f"(fp8 multi vs single cosine >= {args.min_cosine})")
    return ok


# --- decode check ----------------------------------------------------------------------------------------


def _cache_kwarg(model) -> str:
    """The name forward takes the cache by: "cache" (transformers 5.24) or "past_key_values" (5.17)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def _count_cache_calls(cache) -> dict | None:
    """Count the calls of ``attend`` (fp8 fast path) and ``update`` (transformers' generic path, which
    dequantizes the whole cache) on this cache's FP8CacheLayers from now on (instance wrappers); None when
    the cache has no FP8CacheLayer."""
    from hf_fp8_attention import FP8CacheLayer

    counts = {"attend": 0, "update": 0}
    layers = [layer for layer in cache.layers if isinstance(layer, FP8CacheLayer)]
    for layer in layers:
        for name in counts:
            def counted(*a, _method=getattr(layer, name), _name=name, **k):
                counts[_name] += 1
                return _method(*a, **k)

            setattr(layer, name, counted)
    return counts if layers else None


def _cache_layout(cache, n_heads_total: int) -> dict:
    """What this rank's cache holds: layer classes, KV heads of each layer, cached length."""
    from hf_fp8_attention import FP8CacheLayer

    kinds, heads = [], []
    for layer in cache.layers:
        kinds.append(type(layer).__name__)
        store = layer.k8 if isinstance(layer, FP8CacheLayer) else getattr(layer, "keys", None)
        heads.append(None if store is None else int(store.shape[1]))
    return {"cache": type(cache).__name__, "layers": kinds, "kv_heads": heads, "of": n_heads_total,
            "length": cache.get_seq_length()}


def _decode_run(model, prompt, tokens, steps: int, warmup: int, *, count_calls: bool = False):
    """Prefill ``prompt`` (1, S) with use_cache=True (the model brings its own cache), then ``steps`` decode
    steps of one token each: ``tokens`` (steps,) teacher-forced, or None for greedy (each step feeds the
    argmax of the previous logits). An untimed prefill + ``warmup`` steps run first (kernel compilation).

    Returns prefill logits (PREFILL_LOGITS, V), step logits (steps, V) (step i: after feeding token i), the
    fed tokens (steps,), prefill and decode seconds, the cache and the fp8 cache call counts.
    """
    device = next(model.parameters()).device
    name = _cache_kwarg(model)
    prompt = prompt.to(device)

    def steps_from(out, n, feed, timed):
        cache, logits = _returned_cache(out), out.logits[:, -1]
        counts = _count_cache_calls(cache) if timed and count_calls else None
        fed, per_step = [], []
        for i in range(n):
            tok = (logits.argmax(-1) if feed is None else feed[i : i + 1]).reshape(1, 1).to(device)
            fed.append(tok)
            logits = model(tok, use_cache=True, **{name: cache}).logits[:, -1]
            per_step.append(logits)
        return cache, fed, per_step, counts

    with torch.no_grad():
        if warmup:
            steps_from(model(prompt, use_cache=True, logits_to_keep=1), warmup, None, False)
            _sync()
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=PREFILL_LOGITS)
        _sync()
        t1 = time.perf_counter()
        cache, fed, per_step, counts = steps_from(out, steps, tokens, True)
        _sync()
        t2 = time.perf_counter()
    return dict(prefill=out.logits[0].float().cpu(), steps=torch.cat(per_step).float().cpu(),
                tokens=torch.cat(fed).flatten(), prefill_s=t1 - t0, decode_s=t2 - t1, cache=cache, counts=counts)


def _compare(split, one) -> dict:
    per_step = torch.nn.functional.cosine_similarity(split["steps"].double(), one["steps"].double(), dim=-1)
    return dict(prefill=_cosine(split["prefill"], one["prefill"]), decode=_cosine(split["steps"], one["steps"]),
                worst=per_step.min().item())


def _mode_backend(args, mode: str, device) -> str:
    """The fp8 backend named to prepare_model for a mode: --backend, or the device's plan for its options
    (named, so every attention call of the run is fp8 whatever the auto path would pick per shape)."""
    from hf_fp8_attention import FP8AttentionOptions, plan_attention

    if args.backend is not None:
        return args.backend
    kw = {k: v for k, v in DECODE_MODES[mode].items() if k != "kv_cache"}
    return plan_attention(device, None, FP8AttentionOptions(**kw)).backend


def _decode_check(args, modes, multi, single, *, tp: bool, rank: int, devices) -> bool:
    import torch.distributed as dist

    import hf_fp8_attention

    world = dist.get_world_size() if tp else 1
    single_device = next(single.parameters()).device
    prompts = {s: torch.randint(0, 32000, (1, s), generator=torch.Generator().manual_seed(s)) for s in args.seqlens}
    n, w = args.decode_steps, args.warmup_steps
    runs = {}  # (mode, S) -> {"split": run, "single": run}
    tokens = {}
    for s, prompt in prompts.items():  # bf16 SDPA: the single GPU's greedy tokens are every run's inputs
        one = _decode_run(single, prompt, None, n, w)
        tokens[s] = one["tokens"].to(single_device)
        if tp:  # every rank must feed the same tokens: rank 0's
            dist.broadcast(tokens[s], src=0)
        split = _decode_run(multi, prompt, tokens[s], n, w)
        del one["cache"], split["cache"]
        runs["bf16", s] = {"split": split, "single": one}
    layouts, described = {}, {}
    for mode in modes:
        kw = dict(DECODE_MODES[mode], backend=_mode_backend(args, mode, single_device))
        for model in (multi, single):
            hf_fp8_attention.prepare_model(model, **kw)
        described[mode] = hf_fp8_attention.describe_backend(multi)
        for s, prompt in prompts.items():
            split = _decode_run(multi, prompt, tokens[s], n, w, count_calls=True)
            one = _decode_run(single, prompt, tokens[s], n, w)
            runs[mode, s] = {"split": split, "single": one}
            if s == args.seqlens[0]:
                layout = dict(_cache_layout(split["cache"], args.kv_heads), calls=split["counts"])
                layouts[mode] = [None] * world
                if tp:
                    dist.all_gather_object(layouts[mode], layout)
                else:
                    layouts[mode] = [layout]
            for run in (split, one):
                del run["cache"]  # not compared: free them (a bf16 cache of the default model at S=32k is 0.5 GB)
        for model in (multi, single):
            hf_fp8_attention.unprepare_model(model)
    return _report(args, modes, runs, layouts, described, tp=tp, rank=rank, devices=devices, world=world)


def _passes(cos: dict, ref: dict, margin: float) -> bool:
    return all(1 - cos[k] <= 1 - ref[k] + margin for k in ("prefill", "decode"))


def _report(args, modes, runs, layouts, described, *, tp, rank, devices, world) -> bool:
    n = args.decode_steps
    ok = True
    lines = ["| mode | S | split prefill ms/token | single prefill ms/token | split decode ms/token "
             "| single decode ms/token | prefill cos split vs single | decode cos split vs single (all steps) "
             "| worst step | decode cos vs bf16, single GPU | 1-cos minus the bf16 pair's (decode) | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for mode in ("bf16", *modes):
        for s in args.seqlens:
            r = runs[mode, s]
            cos = _compare(r["split"], r["single"])
            ref = _compare(runs["bf16", s]["split"], runs["bf16", s]["single"])
            vs_bf16 = _cosine(r["single"]["steps"], runs["bf16", s]["single"]["steps"])
            ms = [1e3 * r[k]["prefill_s"] / s for k in ("split", "single")]
            ms += [1e3 * r[k]["decode_s"] / n for k in ("split", "single")]
            if mode == "bf16":
                excess, result = "", "reference"
            else:
                good = _passes(cos, ref, args.cos_margin)
                ok &= good
                excess = f"{(1 - cos['decode']) - (1 - ref['decode']):+.2e}"
                result = "PASS" if good else "FAIL"
                verdicts.append(f"{mode} S={s}: 1-cos prefill {1 - cos['prefill']:.2e} (bf16 pair "
                                f"{1 - ref['prefill']:.2e}), decode {1 - cos['decode']:.2e} (bf16 pair "
                                f"{1 - ref['decode']:.2e}): {result}")
            lines.append(f"| {mode} | {s} | {ms[0]:.5f} | {ms[1]:.5f} | {ms[2]:.3f} | {ms[3]:.3f} "
                         f"| {cos['prefill']:.6f} | {cos['decode']:.6f} | {cos['worst']:.6f} | {vs_bf16:.5f} "
                         f"| {excess} | {result} |")
    # the cache layout rules must hold on every rank (each rank holds its local KV heads)
    for mode in modes:
        for r, layout in enumerate(layouts[mode]):
            want = args.kv_heads // world
            if any(h != want for h in layout["kv_heads"]):
                ok = False
                verdicts.append(f"{mode}: rank {r}'s cache holds {layout['kv_heads']} KV heads per layer, "
                                f"expected {want}: FAIL")
            if mode == "fp8-cache" and (layout["cache"] != "FP8Cache" or layout["calls"]["update"]
                                        or layout["calls"]["attend"] != n * args.layers):
                ok = False
                verdicts.append(f"{mode}: rank {r} did not decode from the fp8 cache ({layout}): FAIL")
    if rank == 0:
        split = "tp_plan='auto'" if tp else "device_map='auto'"
        print(_header(args, tp, f"decode check ({split}): prefill + {n} decode steps, teacher-forced with the "
                                f"single-GPU bf16 greedy tokens"))
        pinned = "; --pin-device: each layer's GPU is the current device while it runs" if args.pin_device else ""
        print(f"devices of the split model's parameters: {sorted(map(str, devices))}{pinned}")
        for mode in modes:
            print(f"{mode}: prepare_model({', '.join(f'{k}={v!r}' for k, v in DECODE_MODES[mode].items())}); "
                  f"{described[mode]}")
            for r, layout in enumerate(layouts[mode]):
                calls = (f"; decode steps: attend {layout['calls']['attend']} calls, update {layout['calls']['update']}"
                         if layout["calls"] is not None else "")
                print(f"  rank {r}: {layout['cache']} {'/'.join(sorted(set(layout['layers'])))}, KV heads per layer "
                      f"{layout['kv_heads']} of {layout['of']}, length {layout['length']}{calls}")
        print("\n".join(lines))
        print("\n".join(verdicts))
        print("multi_gpu_check:", "PASS" if ok else "FAIL",
              f"(decode modes {', '.join(modes)}: 1 - cos(split, single) <= 1 - cos of the bf16 pair + "
              f"{args.cos_margin:g}, prefill and decode; caches hold H_kv / {world} heads per rank)")
    return ok


if __name__ == "__main__":
    sys.exit(main())
