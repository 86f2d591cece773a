"""Tensor-parallel bookkeeping: a rank that holds H_q/tp query heads and H_kv/tp KV heads must compute
exactly the heads' slice of the single-device result (scales are per (batch, KV head) or KV group, so a
head split never mixes groups), with the interpreted Triton kernel and the reference alike."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fp8_attention import fp8_sdpa, quantize_qkv_fp8, quantize_qkv_fp8_reference


def _qkv(h_q=8, h_kv=4, s=24, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, s, h_q, d, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(2, s, h_kv, d, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(2, s, h_kv, d, generator=g).bfloat16().transpose(1, 2)
    k[:, 1] *= 30  # heads with different ranges, so a wrong head/scale mapping shows
    return q, k, v


def _rank_slice(q, k, v, rank, tp):
    hq, hkv = q.shape[1] // tp, k.shape[1] // tp
    return (
        q[:, rank * hq : (rank + 1) * hq],
        k[:, rank * hkv : (rank + 1) * hkv],
        v[:, rank * hkv : (rank + 1) * hkv],
    )


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("quantize", [quantize_qkv_fp8_reference, quantize_qkv_fp8], ids=["reference", "triton"])
def test_head_split_quantization_matches_slices(tp, quantize):
    q, k, v = _qkv()
    full = quantize(q, k, v)
    hq, hkv = q.shape[1] // tp, k.shape[1] // tp
    for rank in range(tp):
        part = quantize(*_rank_slice(q, k, v, rank, tp))
        kv = slice(rank * hkv, (rank + 1) * hkv)
        assert torch.equal(part.q_descale, full.q_descale[:, kv])
        assert torch.equal(part.k_descale, full.k_descale[:, kv])
        assert torch.equal(part.v_descale, full.v_descale[:, kv])
        assert torch.equal(part.q.view(torch.uint8), full.q[:, :, rank * hq : (rank + 1) * hq].view(torch.uint8))
        assert torch.equal(part.k.view(torch.uint8), full.k[:, :, kv].view(torch.uint8))


def test_head_split_attention_matches_slices():
    q, k, v = _qkv(seed=1)
    full = fp8_sdpa(q, k, v, is_causal=True, backend="reference")
    tp = 2
    parts = [fp8_sdpa(*_rank_slice(q, k, v, r, tp), is_causal=True, backend="reference") for r in range(tp)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=0)


SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "multi_gpu_check.py"
TINY = ["--layers", "2", "--hidden", "256", "--heads", "4", "--kv-heads", "2"]  # 2 KV heads: 1 per rank


def _torchrun_cpu(*args: str, timeout: int = 240) -> str:
    """scripts/multi_gpu_check.py under torchrun with 2 CPU ranks (gloo); returns stdout + stderr."""
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run (gloo); the GPU run is scripts/gpu_check.sh --multi")
def test_multi_gpu_script_tp_dry_run_on_cpu(tmp_path):
    """scripts/multi_gpu_check.py --mode tp under torchrun with 2 CPU ranks (gloo): transformers shards a
    tiny Llama over the ranks, attention sees the local heads, logits match the one-process run."""
    out = _torchrun_cpu(
        "--mode", "tp", "--attn", "fp8_reference", "--prepare", "--seqlens", "64", "160", *TINY,
        "--workdir", str(tmp_path / "m"),
    )
    assert "saw 2 of 4 query heads" in out, out[-4000:]
    assert "fused RoPE on 2/2 layers" in out, out[-4000:]
    rows = [line for line in out.splitlines() if line.startswith("| 64 ") or line.startswith("| 160 ")]
    assert len(rows) == 2, out[-4000:]
    assert all(float(r.split("|")[4]) >= 0.999 for r in rows), rows
    assert "multi_gpu_check: PASS" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run (gloo); the GPU run is scripts/multi_gpu_run.sh")
def test_multi_gpu_script_tp_decode_fp8_cache_and_int8_on_cpu(tmp_path):
    """--kv-cache fp8 --qk-format int8 under TP on 2 gloo ranks (reference backend): prefill 100 tokens (a
    partial 64-token cache block, partial 16-token int8 blocks) and 64 teacher-forced decode steps. Each
    rank's FP8Cache layers are sized lazily from the local keys (1 of the 2 KV heads), every decode step
    reads them through attend (never the dequantizing update), and both modes' split-vs-single cosine is
    within the script's margin of the bf16 pair's."""
    out = _torchrun_cpu(
        "--mode", "tp", "--kv-cache", "fp8", "--qk-format", "int8", "--seqlens", "100", *TINY,
        "--workdir", str(tmp_path / "m"),
    )
    tail = out[-6000:]
    for rank in (0, 1):
        assert (f"rank {rank}: FP8Cache FP8CacheLayer, KV heads per layer [1, 1] of 2, length 164; "
                "decode steps: attend 128 calls, update 0") in out, tail
        assert f"rank {rank}: DynamicCache DynamicLayer, KV heads per layer [1, 1] of 2, length 164" in out, tail
    assert "fp8 KV cache on 2/2 layers" in out and "qk_format=int8" in out, tail
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")
            and line.split("|")[2].strip() == "100"}
    assert set(rows) == {"bf16", "fp8-cache", "int8"}, tail
    bf16_decode = float(rows["bf16"][9])
    assert bf16_decode > 0.999, tail  # the split's own noise is small on this model
    for mode in ("fp8-cache", "int8"):
        assert rows[mode][12].strip() == "PASS", tail
        assert 1 - float(rows[mode][9]) <= 1 - bf16_decode + 1e-4, tail
        assert 0.99 < float(rows[mode][10]) < 1.0, tail  # fp8 numerics really ran (not bf16), close to bf16
    assert "multi_gpu_check: PASS" in out, tail
