#!/usr/bin/env python3
"""fp8 attention across GPUs: tensor parallelism (tp_plan="auto") and device_map="auto", against one GPU.

    torchrun --nproc-per-node 2 scripts/multi_gpu_check.py --mode tp
    python scripts/multi_gpu_check.py --mode device_map          # one process, layers over all GPUs

A Llama-shaped model with random weights is built from a config and saved to --workdir (rank 0), then
loaded with attn_implementation=--attn. The multi-GPU logits are compared with the single-GPU fp8 run
(cosine >= 0.999 passes) and prefill time per sequence length is printed. NCCL's NVLink multicast stays
off (NCCL_NVLS_ENABLE=0), as the lent machines require.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["tp", "device_map"], required=True)
    p.add_argument("--attn", default="fp8_fa3")
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/hfa_multi_gpu_model")
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range of the random model")
    p.add_argument("--min-cosine", type=float, default=0.999)
    p.add_argument("--prepare", action="store_true", help="also call prepare_model (fused RoPE) on both models")
    return p.parse_args(argv)


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        vocab_size=32000, max_position_embeddings=max(args.seqlens), initializer_range=args.init_std, use_cache=False,
    )


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_logits(model, ids, device):
    with torch.no_grad():
        model(ids[:, :128].to(device))  # warm-up: compile/autotune outside the timing
        _sync()
        t0 = time.perf_counter()
        logits = model(ids.to(device), logits_to_keep=64).logits.float()
        _sync()
    return logits, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    import hf_fp8_attention  # registers the attention names

    tp = args.mode == "tp"
    cuda = torch.cuda.is_available()
    if tp:
        # gloo on a machine without GPUs: a CPU dry run of the same code (with --attn fp8_reference)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank = dist.get_rank()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        rank = 0
        if torch.cuda.device_count() < 2:
            print("multi_gpu_check: device_map mode needs >= 2 GPUs", file=sys.stderr)
            return 2
    if rank == 0 and not os.path.exists(os.path.join(args.workdir, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(_config(args)).to(torch.bfloat16).save_pretrained(args.workdir)
    if tp:
        dist.barrier()

    load = dict(dtype=torch.bfloat16, attn_implementation=args.attn)
    multi = (
        LlamaForCausalLM.from_pretrained(args.workdir, tp_plan="auto", **load)
        if tp
        else LlamaForCausalLM.from_pretrained(args.workdir, device_map="auto", **load)
    ).eval()
    here = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    single = LlamaForCausalLM.from_pretrained(args.workdir, **load).to(here).eval()
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
    devices = {p.device for p in multi.parameters()}
    if not tp and len(devices) < 2:
        print(f"multi_gpu_check: device_map='auto' put the whole model on {devices}: nothing was split")
        ok = False
    cosine = lambda a, b: torch.nn.functional.cosine_similarity(  # noqa: E731
        a.flatten().cpu(), b.flatten().cpu(), dim=0
    ).item()
    inputs = {s: torch.randint(0, 32000, (1, s), generator=torch.Generator().manual_seed(s)) for s in args.seqlens}
    single_device = next(single.parameters()).device
    rows = {}
    for s, ids in inputs.items():
        got, t_multi = _timed_logits(multi, ids, first_device)
        ref, t_single = _timed_logits(single, ids, single_device)
        rows[s] = [t_multi, t_single, cosine(got, ref), ref]
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
        rows[s] += [cosine(got, ref), cosine(rows[s][3], ref)]
    if rank == 0:
        world = dist.get_world_size() if tp else torch.cuda.device_count()
        name = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"\n# {args.mode} over {world} ranks/GPUs ({name}), attn={args.attn}, prepare_model={args.prepare}, "
              f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, B=1")
        print(f"layer-0 attention on rank 0 saw {seen.get('heads')} of {args.heads} query heads; "
              f"devices of the layers: {sorted(map(str, devices))}; {described}")
        print("| S | multi-GPU prefill s | single-GPU prefill s | fp8 logits cosine multi vs single "
              "| bf16 SDPA cosine multi vs single | fp8 vs bf16 cosine, single GPU |")
        print("|---|---|---|---|---|---|")
        for s, (tm, ts, cos, _, cos_bf16, cos_fp8_bf16) in rows.items():
            print(f"| {s} | {tm:.3f} | {ts:.3f} | {cos:.5f} | {cos_bf16:.5f} | {cos_fp8_bf16:.5f} |")
        print("multi_gpu_check:", "PASS" if ok else "FAIL", f"(fp8 multi vs single cosine >= {args.min_cosine})")
    if tp:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
