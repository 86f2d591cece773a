"""The Gluon FP8 attention kernel (`backends/gluon_attention.py`, experimental, not yet run on a GPU): it
builds for sm_90 with the installed triton (an offline compile through ptxas: layouts, shared memory,
the warp-specialized partitions, the asynchronous wgmma), and its launcher refuses what it cannot run.
Whether it computes the right thing is a GPU question (`scripts/probe_ws.py --gluon`)."""

import os
import re

import pytest
import torch

from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import quantize_qkv_fp8

gluon_attention = pytest.importorskip("hf_fp8_attention.backends.gluon_attention")


_COMPILE = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from hf_fp8_attention.backends import gluon_attention as G

D, causal, consumers = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
fn = G.fp8_attn_fwd_gluon_kernel
block_m, block_n, warps, stages = G.GLUON_CONFIG_DEFAULT
warps = warps // consumers  # two consumers of half the rows: 4 warps each
cx = dict(GROUP=4, HEAD_DIM=D, IS_CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, NUM_WARPS=warps,
          CONSUMERS=consumers)
layout = lambda block: repr(gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv))
sig = {n: ("constexpr" if n in cx else "i32") for n in fn.arg_names}
sig.update(desc_q=f"tensordesc<fp8e4nv[{block_m}, {D}],{layout([block_m, D])}>",
           desc_k=f"tensordesc<fp8e4nv[{block_n}, {D}],{layout([block_n, D])}>",
           desc_vt=f"tensordesc<fp8e4nv[{D}, {block_n}],{layout([D, block_n])}>", Out="*bf16",
           sm_scale="fp32", Q_descale="*fp32", K_descale="*fp32", V_descale="*fp32")
src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in cx.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps})
print(json.dumps(dict(ptx=k.asm["ptx"], shared=k.metadata.shared)))
"""


def _compile_sm90(D, causal, consumers):
    """Compiles in a child process: under TRITON_INTERPRET (set for the CPU tests) @gluon.jit helpers are
    interpreter objects that the compiler refuses."""
    import json
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(D), "1" if causal else "0", str(consumers)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ptxas_ok():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.access(path, os.X_OK)


@pytest.mark.skipif(not _ptxas_ok(), reason="triton's bundled ptxas is missing or not executable")
@pytest.mark.parametrize("D,causal,consumers", [(128, False, 1), (64, True, 1), (128, True, 2)])
def test_gluon_kernel_builds_for_sm90(D, causal, consumers):
    kernel = _compile_sm90(D, causal, consumers)
    assert "wgmma.mma_async" in kernel["ptx"]
    # each consumer partition syncs its own warps before it releases a slot: one named barrier per consumer
    syncs = set(re.findall(r"bar\.sync\s+(\d+), (\d+)", kernel["ptx"]))
    warps = gluon_attention.GLUON_CONFIG_DEFAULT[2] // consumers
    assert len({n for n, t in syncs if int(t) == 32 * warps}) == consumers, syncs
    assert kernel["shared"] <= 227 * 1024  # the ring of K/V slots, Q and the layout scratch fit an SM


def test_gluon_launcher_refuses_what_it_cannot_run():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 64, generator=g).bfloat16() for h in (2, 1, 1))
    cases = [
        (FP8AttentionOptions(hadamard="none", qk_scales="block"), True, False, "block scales"),
        (FP8AttentionOptions(hadamard="none"), False, False, "keys-contiguous V"),
    ]
    for options, v_keys, causal, message in cases:
        qkv = quantize_qkv_fp8(q, k, v, options=options, v_keys_contiguous=v_keys)
        with pytest.raises(ValueError, match=message):
            gluon_attention.gluon_fp8_attention(qkv, is_causal=causal, scale=0.125, out_dtype=torch.bfloat16)
    qkv = quantize_qkv_fp8(q, k[:, :, :48], v[:, :, :48], options=FP8AttentionOptions(hadamard="none"),
                           v_keys_contiguous=True)
    with pytest.raises(ValueError, match="causal needs S_q == S_kv"):
        gluon_attention.gluon_fp8_attention(qkv, is_causal=True, scale=0.125, out_dtype=torch.bfloat16)
