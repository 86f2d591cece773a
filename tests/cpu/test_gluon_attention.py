"""The Gluon FP8 attention kernel (`backends/gluon_attention.py`, the Triton backend's default prefill kernel on
Hopper at head_dim 128): it builds for sm_90 with the installed triton (an offline compile through ptxas:
layouts, shared memory, the warp-specialized partitions, the asynchronous wgmma), its launcher refuses what it
cannot run, and the backend routes to it as `HF_FP8_ATTENTION_TRITON_KERNEL` says. Gluon kernels do not run
under TRITON_INTERPRET: whether it computes the right thing is checked on the GPU (`scripts/probe_ws.py
--gluon`, and the backend's GPU tests through it: `scripts/gpu_check.sh --ws`)."""

import dataclasses
import os
import re
import sys

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

D, causal, consumers, persistent = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4] == "1"
pingpong, v_order, rowsum = sys.argv[5] == "1", sys.argv[6] == "1", sys.argv[7] == "1"
tma_store = sys.argv[8] == "1"
q_in = int(sys.argv[9])  # 0: e4m3 Q; 1: bf16 Q quantized in the kernel; 2: that, rotated
exp2_emu = int(sys.argv[10]) if len(sys.argv) > 10 else 0
fn = G.fp8_attn_fwd_gluon_persistent_kernel if persistent else G.fp8_attn_fwd_gluon_kernel
block_m, block_n, warps, stages = G.GLUON_CONFIG_DEFAULT
warps = warps // consumers  # two consumers of half the rows: 4 warps each
cx = dict(GROUP=4, HEAD_DIM=D, IS_CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, NUM_WARPS=warps,
          CONSUMERS=consumers, PINGPONG=pingpong, V_WGMMA_ORDER=v_order,
          **({"ROWSUM_MMA": rowsum, "TMA_STORE": tma_store, "Q_IN_KERNEL": q_in > 0, "Q_ROTATE": q_in == 2,
              "Q_BUFFERS": 1 if q_in else 2, "EXP2_EMU": exp2_emu} if persistent else {}))
layout = lambda block, dtype=gl.float8e4nv: repr(gl.NVMMASharedLayout.get_default_for(block, dtype))
sig = {n: ("constexpr" if n in cx else "i32") for n in fn.arg_names}
q_type = "bf16" if q_in else "fp8e4nv"
sig.update(desc_q=f"tensordesc<{q_type}[{block_m}, {D}],{layout([block_m, D], gl.bfloat16 if q_in else gl.float8e4nv)}>",
           desc_k=f"tensordesc<fp8e4nv[{block_n}, {D}],{layout([block_n, D])}>",
           desc_vt=f"tensordesc<fp8e4nv[{D}, {block_n}],{layout([D, block_n])}>", Out="*bf16",
           sm_scale="fp32", Q_descale="*fp32", K_descale="*fp32", V_descale="*fp32")
if tma_store:  # the output's descriptor: (B * S_q, H_q * D) bf16, a consumer's rows per block
    rows = block_m // consumers
    sig["desc_o"] = f"tensordesc<bf16[{rows}, {D}],{repr(gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16))}>"
elif persistent:
    sig["desc_o"], cx["desc_o"] = "constexpr", None
src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(n),): v for n, v in cx.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps})
print(json.dumps(dict(ptx=k.asm["ptx"], shared=k.metadata.shared)))
"""


def _compile_sm90(D, causal, consumers, persistent=False, pingpong=None, v_order=False, rowsum_mma=False,
                  tma_store=False, q_in=0, exp2_emu=0):
    """Compiles in a child process: under TRITON_INTERPRET (set for the CPU tests) @gluon.jit helpers are
    interpreter objects that the compiler refuses."""
    import json
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    pingpong = consumers == 2 if pingpong is None else pingpong
    flags = ["1" if causal else "0", str(consumers), "1" if persistent else "0", "1" if pingpong else "0",
             "1" if v_order else "0", "1" if rowsum_mma else "0", "1" if tma_store else "0", str(q_in), str(exp2_emu)]
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(D), *flags], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ptxas_ok():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.access(path, os.X_OK)


@pytest.mark.skipif(not _ptxas_ok(), reason="triton's bundled ptxas is missing or not executable")
@pytest.mark.parametrize("D,causal,consumers,persistent,pingpong", [
    (128, False, 1, False, False), (64, True, 1, False, False), (128, True, 2, False, True),
    (128, False, 2, False, False), (128, False, 2, True, True), (64, True, 1, True, False)])
def test_gluon_kernel_builds_for_sm90(D, causal, consumers, persistent, pingpong):
    kernel = _compile_sm90(D, causal, consumers, persistent, pingpong)
    assert "wgmma.mma_async" in kernel["ptx"]
    # each consumer partition syncs its own warps before it releases a slot: one named barrier per consumer
    syncs = set(re.findall(r"bar\.sync\s+(\d+), (\d+)", kernel["ptx"]))
    warps = gluon_attention.GLUON_CONFIG_DEFAULT[2] // consumers
    assert len({n for n, t in syncs if int(t) == 32 * warps}) == consumers, syncs
    assert kernel["shared"] <= 227 * 1024  # the ring of K/V slots, Q and the layout scratch fit an SM


@pytest.mark.skipif(not _ptxas_ok(), reason="triton's bundled ptxas is missing or not executable")
@pytest.mark.parametrize("causal,persistent", [(False, False), (True, True)])
def test_wgmma_key_order_moves_no_p_between_threads(causal, persistent):
    """With V in wgmma key order the kernel relabels P instead of converting its layout: the build has fewer
    warp shuffles (those left are the row max / sum reductions) than the build on V in key order."""
    natural = _compile_sm90(128, causal, 2, persistent, True)
    relabelled = _compile_sm90(128, causal, 2, persistent, True, v_order=True)
    shuffles = [k["ptx"].count("shfl.sync") for k in (natural, relabelled)]
    assert shuffles[1] < shuffles[0], shuffles


@pytest.mark.skipif(not _ptxas_ok(), reason="triton's bundled ptxas is missing or not executable")
@pytest.mark.parametrize("causal", [False, True])
def test_rowsum_mma_build_sums_rows_on_the_tensor_cores(causal):
    """ROWSUM_MMA (the default persistent build): P's row sums come from an m64n8k32 wgmma against the ones
    tile, so the build has those MMAs, fewer warp shuffles (the row-sum reduction is gone; the row max's stays)
    and fewer float additions than the build that sums in the softmax, and its shared memory still fits an SM."""
    alu = _compile_sm90(128, causal, 2, True, True)
    mma = _compile_sm90(128, causal, 2, True, True, rowsum_mma=True)
    assert "m64n8k32" in mma["ptx"] and "m64n8k32" not in alu["ptx"]
    for op in ("shfl.sync", "add.f32"):
        assert mma["ptx"].count(op) < alu["ptx"].count(op), op
    assert mma["shared"] <= 227 * 1024


@pytest.mark.skipif(not _ptxas_ok(), reason="triton's bundled ptxas is missing or not executable")
def test_tma_store_build_writes_the_output_by_tma():
    """TMA_STORE (the default persistent route since session 28; gluon-pp-persistent-plain-store without): the
    output goes through shared memory (a stmatrix-friendly NVMMA layout) and a 2-D TMA store (one instruction per
    consumer partition), waited for (reads of the buffer done) before the buffer is reused, instead of each
    thread's global stores;
    the extra two (64, 128) bf16 buffers still fit an SM's shared memory."""
    plain = _compile_sm90(128, True, 2, True, True, v_order=True, rowsum_mma=True)
    tma = _compile_sm90(128, True, 2, True, True, v_order=True, rowsum_mma=True, tma_store=True)
    store = "cp.async.bulk.tensor.2d.global.shared::cta"
    assert plain["ptx"].count(store) == 0 and tma["ptx"].count(store) == 2  # one per consumer partition
    assert tma["ptx"].count("cp.async.bulk.wait_group.read") >= 2  # before reuse, and the last store at the end
    assert tma["ptx"].count("st.global") < plain["ptx"].count("st.global")
    assert tma["shared"] - plain["shared"] >= 2 * 64 * 128 * 2 and tma["shared"] <= 227 * 1024


@pytest.mark.skipif(not _ptxas_ok(), reason="triton's bundled ptxas is missing or not executable")
@pytest.mark.parametrize("D", [128, 64])
def test_q_in_kernel_build_quantizes_q_rows(D):
    """Q_IN_KERNEL (session 29, opt-in: the default route's build where the quantizer leaves Q, `QuantizedQKV.q_in_kernel`):
    the tile's bf16 Q arrives by TMA into one buffer, each consumer converts its rows to e4m3 (the row maxima by
    shuffles, the scales by correctly rounded divisions) into its own shared buffer; Q_ROTATE adds the bf16 MMA
    with the +-1 Hadamard matrix (m64nDk16). Shared memory: the consumers' e4m3 rows and the matrix on top,
    still within an SM's 227 KiB."""
    base = _compile_sm90(D, True, 2, True, True, v_order=True, rowsum_mma=True, tma_store=True)
    rows = _compile_sm90(D, True, 2, True, True, v_order=True, rowsum_mma=True, tma_store=True, q_in=1)
    rotated = _compile_sm90(D, True, 2, True, True, v_order=True, rowsum_mma=True, tma_store=True, q_in=2)
    bf16_mma = f"m64n{D}k16.f32.bf16.bf16"
    assert bf16_mma in rotated["ptx"] and bf16_mma not in rows["ptx"] and bf16_mma not in base["ptx"]
    assert "div.rn.f32" in rows["ptx"] and "div.rn.f32" not in base["ptx"]
    cvt = "cvt.rn.satfinite.e4m3x2.f32"  # (P's cast has them too: Q's rows add theirs)
    assert rows["ptx"].count(cvt) > base["ptx"].count(cvt)
    # Q: one bf16 buffer (the consumers release it once converted) in place of two e4m3 ones: the same bytes
    rows_fp8, h = 128 * D, D * D * 2
    assert rows["shared"] - base["shared"] >= rows_fp8
    assert rotated["shared"] - rows["shared"] >= h and rotated["shared"] <= 227 * 1024


def _accumulator_cols(q):
    """Columns of one 32-column chunk of a wgmma m64nNk32 float32 accumulator that thread q (lane % 4) of a
    quad holds, in register order, for one of its two rows (PTX ISA, wgmma D fragment): 8 i + 2 q + {0, 1}."""
    return [8 * i + 2 * q + e for i in range(4) for e in range(2)]


def _a_operand_ks(q):
    """k indices of one k32 step of an e4m3 wgmma A operand from registers that thread q holds for one row,
    in register/byte order (PTX ISA, wgmma A fragment for 8-bit types): 4 q + {0..3}, then 16 + 4 q + {0..3}."""
    return [16 * a + 4 * q + byte for a in range(2) for byte in range(4)]


def test_wgmma_key_order_is_the_fragment_relabelling():
    """`wgmma_key_order` stores key sigma(k) at position k of every 16, where sigma is the column relabelling of
    the kernel's reshape/permute (bits (k3 k2 k1 k0) -> (k1 k3 k2 k0)); with it, the k that thread q's A operand
    holds name exactly the score columns its accumulator holds, so P needs no data movement; the keys come
    back with the inverse order, and a key count that is not a multiple of 16 is refused."""
    sigma = torch.arange(16).reshape(2, 2, 2, 2).permute(1, 2, 0, 3).reshape(16)  # P'[k] = P[sigma[k]]
    for q in range(4):
        held = set(_accumulator_cols(q))
        wanted = {16 * (k // 16) + int(sigma[k % 16]) for k in _a_operand_ks(q)}
        assert wanted == held, (q, sorted(wanted), sorted(held))
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, 48, 3, 8, generator=g).to(torch.float8_e4m3fn)
    from hf_fp8_attention.quantization.quantized import (keys_contiguous, keys_contiguous_rows, natural_key_order,
                                                         wgmma_key_order)

    kc = keys_contiguous(v)
    perm = wgmma_key_order(kc)
    assert keys_contiguous_rows(perm) == 48 and perm.shape == v.shape
    key = (torch.arange(0, 48, 16)[:, None] + sigma).reshape(-1)
    assert torch.equal(perm.float(), v[:, key].float())
    assert torch.equal(perm[:, torch.argsort(key)].float(), v.float())
    assert torch.equal(natural_key_order(perm).float(), v.float()) and keys_contiguous_rows(natural_key_order(perm))
    with pytest.raises(ValueError, match="multiple of 16"):
        wgmma_key_order(keys_contiguous(v[:, :40]))


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
    ok = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True)
    assert gluon_attention.refusal(ok, True) is None
    for kw, message in ((dict(consumers=2), "16 x the warps per consumer"),  # 8 warps on 64 rows
                        (dict(config=(128, 128, 8, 1)), "needs at least 2 stages"),
                        (dict(pingpong=True), "pingpong needs 2 consumers"),
                        (dict(rowsum_mma=True), "persistent kernel only"),
                        (dict(rowsum_mma=True, persistent=True, config=(128, 64, 8, 2)), "rowsum_mma needs BLOCK_N 128"),
                        (dict(consumers=3), "consumers is 1 or 2"),
                        (dict(exp2_emu=3, persistent=True), r"exp2_emu is one of \(0, 1, 2, 4\)"),
                        (dict(exp2_emu=True, persistent=True), "exp2_emu is one of"),
                        (dict(exp2_emu=2), "exp2_emu is built into the persistent kernel only")):
        with pytest.raises(ValueError, match=message):
            gluon_attention.gluon_fp8_attention(ok, is_causal=False, scale=0.125, out_dtype=torch.bfloat16, **kw)
    no_keys = quantize_qkv_fp8(q, k[:, :, :0], v[:, :, :0], options=FP8AttentionOptions(hadamard="none"),
                               v_keys_contiguous=True)
    assert "at least one key" in gluon_attention.refusal(no_keys, False)
    # V as a keys-contiguous view whose head stride is not D rows apart: refused, not read wrongly
    wide = torch.zeros(1, 1, 64 + 8, 64, dtype=ok.v.dtype)[:, :, :64].permute(0, 3, 1, 2)  # 8 spare rows per head
    assert wide.shape == ok.v.shape and wide.stride(1) == 1 and wide.stride(2) != 64 * wide.stride(3)
    assert "keys-contiguous V" in gluon_attention.refusal(dataclasses.replace(ok, v=wide), False)
    from hf_fp8_attention.quantization.quantized import keys_contiguous_rows

    bshd = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none")).v
    assert keys_contiguous_rows(ok.v) == 64 and keys_contiguous_rows(wide) is None
    assert keys_contiguous_rows(bshd) is None
    # Q at an address TMA cannot take (1 byte into its buffer): refused
    shifted = torch.empty(ok.q.numel() + 1, dtype=ok.q.dtype)[1:].view(ok.q.shape)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16
    assert "16-byte aligned" in gluon_attention.refusal(dataclasses.replace(ok, q=shifted), False)


def test_gluon_needs_the_list_form_of_warp_specialize(monkeypatch):
    """triton 3.5's gl.warp_specialize (default partition and workers as separate arguments) cannot build the
    kernel: the launcher says so instead of failing inside the compile."""

    def old_form(default_args, default_partition, worker_args, worker_partitions, worker_num_warps,
                 worker_num_regs):
        raise AssertionError("not called")

    gluon_attention.triton_problem.cache_clear()
    assert gluon_attention.triton_problem() is None  # the installed triton (>= 3.6)
    monkeypatch.setattr(gluon_attention.gl, "warp_specialize", old_form)
    assert gluon_attention.triton_problem() is None  # cached: asked once per process
    gluon_attention.triton_problem.cache_clear()
    assert "needs triton >= 3.6" in gluon_attention.triton_problem()
    monkeypatch.delattr(gluon_attention.gl, "warp_specialize")
    gluon_attention.triton_problem.cache_clear()
    assert "lacks" in gluon_attention.triton_problem()
    monkeypatch.setattr(gluon_attention.gl, "warp_specialize", old_form, raising=False)
    gluon_attention.triton_problem.cache_clear()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 64, 64, generator=g).bfloat16() for h in (2, 1, 1))
    ok = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True)
    try:
        with pytest.raises(ValueError, match="needs triton >= 3.6"):
            gluon_attention.gluon_fp8_attention(ok, is_causal=False, scale=0.125, out_dtype=torch.bfloat16)
    finally:
        monkeypatch.undo()
        gluon_attention.triton_problem.cache_clear()  # later tests see the installed triton again


def _fake_gluon_on_hopper(monkeypatch, triton_backend) -> list:
    """The Triton backend as on Hopper, with the Gluon launcher (`attend`, which the backend calls after
    `refusal`) replaced by a recorder: the list of its (qkv, keyword arguments) calls (each returns zeros)."""
    calls = []

    def fake(qkv, **kw):
        calls.append((qkv, kw))
        return torch.zeros(qkv.q.shape, dtype=kw["out_dtype"])

    monkeypatch.setattr(gluon_attention, "attend", fake)
    monkeypatch.setattr(triton_backend, "_on_hopper", lambda t: True)
    return calls


def test_triton_backend_routes_prefill_to_gluon(monkeypatch):
    """HF_FP8_ATTENTION_TRITON_KERNEL unset (auto) sends the Triton backend's prefill calls that the Gluon
    kernel takes to its persistent two-consumer ping-pong build (row sums by MMA) on Hopper at head_dim 128 only;
    triton keeps the Triton kernel; gluon / gluon-2c / gluon-pp / gluon-pp-persistent(-alu-sums) send them at D=64
    too; for decode, block scales or off Hopper the Triton kernel runs; a value it does not know is an error."""
    from hf_fp8_attention.backends import triton as triton_backend

    calls = _fake_gluon_on_hopper(monkeypatch, triton_backend)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 128, 64, generator=g).bfloat16() for h in (4, 2, 2))
    plain = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True)
    block = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none", qk_scales="block"),
                             v_keys_contiguous=True)
    decode = quantize_qkv_fp8(q[:, :, :1], k, v, options=FP8AttentionOptions(hadamard="none"),
                              v_keys_contiguous=True)

    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    want = triton_backend._launch(plain, True, 0.125, torch.bfloat16)
    assert not calls and torch.isfinite(want).all()  # auto: D=64 keeps the Triton kernel
    q128, k128, v128 = (torch.randn(1, h, 128, 128, generator=g).bfloat16() for h in (4, 2, 2))
    plain128 = quantize_qkv_fp8(q128, k128, v128, options=FP8AttentionOptions(hadamard="none"),
                                v_keys_contiguous=True)
    triton_backend._launch(plain128, False, 0.125, torch.bfloat16)
    assert len(calls) == 1 and calls[0][1]["consumers"] == 2 and calls[0][1]["config"] == (128, 128, 4, 2)
    assert calls[0][1]["pingpong"] is True and calls[0][1]["persistent"] is True  # auto: the persistent build
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "triton")
    assert torch.isfinite(triton_backend._launch(plain128, False, 0.125, torch.bfloat16)).all()
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon-2c")
    triton_backend._launch(plain, True, 0.125, torch.bfloat16)
    assert len(calls) == 1 and calls[0][1]["consumers"] == 2 and calls[0][1]["config"] == (128, 128, 4, 2)
    assert not calls[0][1].get("pingpong")
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon-pp")
    triton_backend._launch(plain, True, 0.125, torch.bfloat16)
    assert len(calls) == 2 and calls[1][1]["pingpong"] is True and calls[1][1]["consumers"] == 2
    calls.pop()
    assert calls[0][0].v.stride(1) == 1 and calls[0][1]["is_causal"] is True
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon")
    for qkv in (block, decode):
        triton_backend._launch(qkv, False, 0.125, torch.bfloat16)
    triton_backend._launch(plain, False, 0.125, torch.bfloat16, config={"BLOCK_M": 64, "BLOCK_N": 32})
    assert len(calls) == 1  # block scales, decode and an explicit config keep the Triton kernel
    triton_backend._launch(plain, False, 0.125, torch.float32)
    assert len(calls) == 2 and calls[1][1]["consumers"] == 1 and calls[1][1]["out_dtype"] == torch.float32
    monkeypatch.setattr(triton_backend, "_on_hopper", lambda t: False)
    triton_backend._launch(plain, False, 0.125, torch.bfloat16)
    assert len(calls) == 2
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="HF_FP8_ATTENTION_TRITON_KERNEL='fastest'"):
        triton_backend._launch(plain, False, 0.125, torch.bfloat16)
    monkeypatch.setattr(triton_backend, "_on_hopper", lambda t: True)
    calls.clear()
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon-pp-persistent")
    triton_backend._launch(plain128, True, 0.125, torch.bfloat16)
    assert len(calls) == 1 and calls[0][1]["persistent"] is True and calls[0][1]["pingpong"] is True
    assert calls[0][1]["rowsum_mma"] is True
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon-pp-persistent-alu-sums")
    triton_backend._launch(plain128, True, 0.125, torch.bfloat16)
    assert len(calls) == 2 and calls[1][1]["persistent"] is True and "rowsum_mma" not in calls[1][1]
    calls.pop()
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon-pp")
    triton_backend._launch(plain128, True, 0.125, torch.bfloat16)
    assert len(calls) == 2 and "persistent" not in calls[1][1]
    monkeypatch.delenv(triton_backend.KERNEL_ENV)
    # auto: fewer query rows than one Gluon tile (128) keep the Triton kernel
    short = quantize_qkv_fp8(q128[:, :, :64], k128, v128, options=FP8AttentionOptions(hadamard="none"),
                             v_keys_contiguous=True)
    triton_backend._launch(short, False, 0.125, torch.bfloat16)
    assert len(calls) == 2
    # a triton that cannot build the Gluon kernel: auto keeps the Triton kernel, a gluon* value is an error
    monkeypatch.setattr(triton_backend, "gluon_unavailable", lambda: "the Gluon kernel needs triton >= 3.6")
    assert torch.isfinite(triton_backend._launch(plain128, False, 0.125, torch.bfloat16)).all()
    assert len(calls) == 2
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon-pp")
    with pytest.raises(ValueError, match="'gluon-pp': the Gluon kernel needs triton >= 3.6; unset it"):
        triton_backend._launch(plain128, False, 0.125, torch.bfloat16)


def test_v_in_wgmma_key_order_reaches_the_gluon_kernel_only(monkeypatch):
    """The quantizer writes V in wgmma key order exactly where the call runs the Gluon kernel's default route
    (`triton.reads_v_wgmma_order`: Hopper, D=128, a full query tile, whole 16s of keys, per-head scales, causal
    only with S_q == S_kv, not packed, not the key-order route or "triton"); the launcher hands that V to the
    Gluon kernel with v_wgmma_order=True, and any other kernel gets V back in key order: the Triton kernel's
    output on it equals its output on the key-order bundle bit for bit."""
    from hf_fp8_attention.backends import triton as triton_backend

    calls = _fake_gluon_on_hopper(monkeypatch, triton_backend)
    monkeypatch.setattr(triton_backend, "_hopper_device", lambda d: True)
    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    opts = FP8AttentionOptions(hadamard="none")
    reads = triton_backend.reads_v_wgmma_order
    kw = dict(is_causal=True, options=opts, varlen=False)
    cuda = torch.device("cuda", 0)
    assert reads(cuda, 4096, 32, 8, 4096, 128, **kw)
    assert not reads(cuda, 4096, 32, 8, 4096, 64, **kw)  # auto: D=128 only
    assert not reads(cuda, 4096, 32, 8, 4088, 128, **dict(kw, is_causal=False))  # keys not in whole 16s
    assert not reads(cuda, 100, 32, 8, 4096, 128, **kw)  # causal with S_q != S_kv
    assert not reads(cuda, 4096, 32, 8, 4096, 128, **dict(kw, varlen=True))
    assert not reads(cuda, 4096, 32, 8, 4096, 128, **dict(kw, options=FP8AttentionOptions(qk_scales="block")))
    assert not reads(cuda, 1, 32, 8, 4096, 128, **kw)  # decode
    monkeypatch.setattr(triton_backend, "_hopper_device", lambda d: False)
    assert not reads(cuda, 4096, 32, 8, 4096, 128, **kw)
    monkeypatch.setattr(triton_backend, "_hopper_device", lambda d: True)
    for route, wanted in (("gluon-pp-persistent", True), ("gluon-pp-persistent-key-order", False),
                          ("triton", False), ("gluon-pp", False)):
        monkeypatch.setenv(triton_backend.KERNEL_ENV, route)
        assert reads(cuda, 4096, 32, 8, 4096, 128, **kw) is wanted, route
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "gluon-pp-persistent")
    assert reads(cuda, 4096, 32, 8, 4096, 64, **kw)  # a named route: D=64 too
    with monkeypatch.context() as m:  # a triton that cannot build (or import) the Gluon kernel: no, not an error
        m.setattr(triton_backend, "gluon_unavailable", lambda: "the Gluon kernel needs triton >= 3.6")
        m.setitem(sys.modules, "hf_fp8_attention.backends.gluon_attention", None)
        for route in ("gluon-pp-persistent", "auto"):
            m.setenv(triton_backend.KERNEL_ENV, route)
            assert reads(cuda, 4096, 32, 8, 4096, 128, **kw) is False, route

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 128, 128, generator=g).bfloat16() for h in (4, 2, 2))
    keys = quantize_qkv_fp8(q, k, v, options=opts, v_keys_contiguous=True)
    wgmma = quantize_qkv_fp8(q, k, v, options=opts, v_keys_contiguous=True, v_wgmma_order=True)
    monkeypatch.delenv(triton_backend.KERNEL_ENV)
    triton_backend._launch(wgmma, True, 0.125, torch.bfloat16)
    assert len(calls) == 1 and calls[0][1]["v_wgmma_order"] is True and calls[0][0].v is wgmma.v
    triton_backend._launch(keys, True, 0.125, torch.bfloat16)
    assert len(calls) == 2 and calls[1][1]["v_wgmma_order"] is False
    # an explicit config keeps the Triton kernel (the interpreter's tile)
    want = triton_backend._launch(keys, True, 0.125, torch.float32, config={"BLOCK_M": 64, "BLOCK_N": 32})
    got = triton_backend._launch(wgmma, True, 0.125, torch.float32, config={"BLOCK_M": 64, "BLOCK_N": 32})
    assert len(calls) == 2 and torch.isfinite(want).all() and torch.equal(got, want)
    monkeypatch.undo()  # the real launcher: an order other than the bundle's is refused, either way
    for bundle, order in ((wgmma, False), (keys, True)):
        with pytest.raises(ValueError, match="v_wgmma_order="):
            gluon_attention.gluon_fp8_attention(bundle, is_causal=True, scale=0.125, out_dtype=torch.bfloat16,
                                                v_wgmma_order=order)


def _snake(n_tiles, grid):
    """A Python mirror of the persistent kernel's schedule (`_num_my_tiles`, `_my_tile`): program p's tiles."""
    out = []
    for p in range(grid):
        rounds = n_tiles // grid
        last = p + (rounds % 2) * (grid - 1 - 2 * p)
        count = rounds + int(last < n_tiles - rounds * grid)
        out.append([k * grid + p + (k % 2) * (grid - 1 - 2 * p) for k in range(count)])
    return out


@pytest.mark.parametrize("n_tiles,grid", [(4096, 132), (1024, 132), (132, 132), (133, 132), (7, 7), (300, 132),
                                          (265, 132), (1, 1)])
def test_persistent_schedule_takes_every_tile_once(n_tiles, grid):
    """Every tile goes to exactly one program, and with the causal order (heaviest first over all heads, tile t
    of work n_m - t // heads) the busiest program's blocks are within a few percent of the mean at 4k-64k
    (the order the kernel's `_tile` uses; plain rounds left 6-14% at 4k-16k)."""
    tiles = _snake(n_tiles, grid)
    flat = sorted(t for ts in tiles for t in ts)
    assert flat == list(range(n_tiles))
    for s in (4096, 16384, 65536):
        n_m, heads, sms = s // 128, 32, 132
        work = [n_m - t // heads for t in range(n_m * heads)]
        loads = [sum(work[t] for t in ts) for ts in _snake(len(work), sms)]
        plain = [sum(work[t] for t in range(p, len(work), sms)) for p in range(sms)]
        mean = sum(work) / sms
        assert max(loads) / mean < 1.03, (s, max(loads) / mean)
        assert max(loads) < max(plain)
    # head by head (the order above K/V that outgrow L2: query blocks fastest, heaviest first in each head):
    # within 4% once there are a few rounds of tiles (16k x 32 heads, 4k x 8 x 32 heads, 64k x 32)
    for s, heads in ((16384, 32), (4096, 256), (65536, 32)):
        n_m = s // 128
        work = [n_m - t % n_m for t in range(n_m * heads)]
        loads = [sum(work[t] for t in ts) for ts in _snake(len(work), 132)]
        assert max(loads) / (sum(work) / 132) < 1.04, (s, heads)


def test_persistent_causal_order_follows_the_kv_bytes():
    """Heads fastest while all heads' e4m3 K and V fit in half the L2, head by head beyond; non-causal tiles
    keep their order (the flag is for causal only)."""
    def k(b, s, h_kv):  # K's element count
        return b * s * h_kv * 128

    limit = gluon_attention.PERSISTENT_HEADS_FASTEST_MAX_KV_BYTES
    assert gluon_attention.persistent_heads_fastest(k(1, 4096, 32), True)  # 32 MiB: fits
    assert gluon_attention.persistent_heads_fastest(k(1, 8192, 8), True)
    assert not gluon_attention.persistent_heads_fastest(k(1, 16384, 32), True)
    assert not gluon_attention.persistent_heads_fastest(k(8, 4096, 32), True)
    assert not gluon_attention.persistent_heads_fastest(k(1, 4096, 32), False)
    assert 2 * k(1, 8192, 32) > limit


def _f32(bits: str) -> float:
    import struct

    return struct.unpack("<f", struct.pack("<I", int(bits, 16)))[0]


def test_exp2_polynomial_constants_give_2_to_the_x():
    """`gluon_attention._EXP2_POLY`'s arithmetic, replayed in float32 from the PTX's own constants: the clamp at
    -126, floor(x) from the sum rounded down onto 1.5 * 2^23, the degree-3 fit of 2^f and the exponent from the
    sum's bits give 2^x within 8e-5 relative over the softmax's range (x <= 8), 2^-126 or less below it (-inf:
    an e4m3 zero), and NaN for NaN (max.NaN)."""
    import numpy as np

    ptx = gluon_attention._EXP2_POLY
    clamp, magic = (_f32(h) for h in re.findall(r"max\.NaN\.f32 x, \{src\}, 0f([0-9A-F]{8}); add\.rm\.f32 t, x, "
                                                  r"0f([0-9A-F]{8})", ptx)[0])
    c3, c2 = (_f32(h) for h in re.findall(r"fma\.rn\.f32 p, f, 0f([0-9A-F]{8}), 0f([0-9A-F]{8})", ptx)[0])
    c1, c0 = (_f32(h) for h in re.findall(r"fma\.rn\.f32 p, p, f, 0f([0-9A-F]{8})", ptx))
    assert (clamp, magic) == (-126.0, 1.5 * 2**23) and "shl.b32 e, e, 23" in ptx and "1065353216" in ptx

    def emulate(x):
        x = np.asarray(x, dtype=np.float32)
        x = np.where(np.isnan(x), x, np.maximum(x, np.float32(clamp)))
        t = (np.float32(magic) + np.floor(x.astype(np.float64))).astype(np.float32)  # add.rm: exact integers here
        j = t - np.float32(magic)
        f = x - j
        p = ((np.float32(c3) * f + np.float32(c2)) * f + np.float32(c1)) * f + np.float32(c0)
        e = (t.view(np.uint32) << np.uint32(23)) + np.uint32(1065353216)
        return p * e.view(np.float32)

    x = np.concatenate([np.linspace(-126, 8, 200001, dtype=np.float32), np.arange(-126, 9, dtype=np.float32)])
    got = emulate(x).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    assert np.abs(got / want - 1).max() < 8e-5
    low = emulate(np.array([-127.5, -300.0, -np.inf], dtype=np.float32))
    assert np.all(low >= 0) and np.all(low <= 2.0**-125)
    assert np.isnan(emulate(np.array([np.nan], dtype=np.float32))).all()


def test_exp2_asm_packs_eight_with_k_by_polynomial():
    """Each EXP2_EMU's asm: eight outputs and inputs, k of them by the polynomial, the rest by ex2.approx.ftz.f32
    (what gl.exp2 compiles to), so those elements are bit-equal to the default build's."""
    for k, asm in ((1, gluon_attention.EXP2_EMU_ASM_1), (2, gluon_attention.EXP2_EMU_ASM_2),
                   (4, gluon_attention.EXP2_EMU_ASM_4)):
        asm = getattr(asm, "value", asm)
        assert asm.count("add.rm.f32") == k and asm.count("ex2.approx.ftz.f32") == 8 - k
        assert all(f"${i}" in asm for i in range(16))
    assert getattr(gluon_attention._EXP2_CONSTRAINTS, "value", gluon_attention._EXP2_CONSTRAINTS).count("=r") == 8


@pytest.mark.skipif(not _ptxas_ok(), reason="triton's bundled ptxas is missing or not executable")
def test_exp2_emu_build_moves_exponentials_off_the_special_function_unit():
    """EXP2_EMU=2 (route gluon-pp-persistent-exp2-2): a quarter fewer ex2.approx in the build, the polynomial's
    rounded-down addition instead, and no float-to-integer conversion (cvt.rmi / cvt.rzi: the conversion unit runs at
    the special-function unit's rate) in either build's PTX."""
    base = _compile_sm90(128, True, 2, True, True, v_order=True, rowsum_mma=True, tma_store=True)
    emu = _compile_sm90(128, True, 2, True, True, v_order=True, rowsum_mma=True, tma_store=True, exp2_emu=2)
    n_base, n_emu = (k["ptx"].count("ex2.approx") for k in (base, emu))
    assert n_emu == n_base - emu["ptx"].count("add.rm.f32") and n_emu * 8 >= n_base * 6 - 16, (n_base, n_emu)
    assert emu["ptx"].count("add.rm.f32") > 0 and "cvt.rmi.f32.f32" not in emu["ptx"]
    assert emu["shared"] == base["shared"]
