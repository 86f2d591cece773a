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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run (gloo); the GPU run is scripts/gpu_check.sh --multi")
def test_multi_gpu_script_tp_dry_run_on_cpu(tmp_path):
    """scripts/multi_gpu_check.py --mode tp under torchrun with 2 CPU ranks (gloo): transformers shards a
    tiny Llama over the ranks, attention sees the local heads, logits match the one-process run."""
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(SCRIPT), "--mode", "tp", "--attn", "fp8_reference", "--prepare", "--seqlens", "64", "160",
        "--layers", "2", "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--workdir", str(tmp_path / "m"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "saw 2 of 4 query heads" in out, out[-4000:]
    assert "fused RoPE on 2/2 layers" in out, out[-4000:]
    rows = [line for line in out.splitlines() if line.startswith("| 64 ") or line.startswith("| 160 ")]
    assert len(rows) == 2, out[-4000:]
    assert all(float(r.split("|")[4]) >= 0.999 for r in rows), rows
    assert "multi_gpu_check: PASS" in out
