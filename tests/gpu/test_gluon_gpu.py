"""The Gluon kernel's default persistent build (the Triton backend's route "gluon-pp-persistent": row sums by MMA,
`gluon_attention._attend_block`'s ROWSUM_MMA) against the build that sums P in the softmax
("gluon-pp-persistent-alu-sums"), on the GPU: the same attention to fp8 rounding, no worse against
float32 attention, with and without a V channel offset (where the sums' consistency with the e4m3 P matters),
causal and not, GQA with a key tail inside the last block."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import quantize_qkv_fp8


def _hopper_gluon() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    from hf_fp8_attention.backends import triton as triton_backend

    return triton_backend.gluon_unavailable() is None


pytestmark = pytest.mark.skipif(not _hopper_gluon(), reason="needs a Hopper GPU and a triton that builds Gluon")


@pytest.mark.parametrize("S", [1040, 4096])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("v_offset", [0.0, 4.0])
def test_default_build_matches_softmax_sums(S, causal, v_offset):
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    torch.manual_seed(7)
    B, H, H_kv, D = 1, 8, 2, 128
    q, k = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv))
    v = torch.randn(B, H_kv, S, D, device="cuda", dtype=torch.bfloat16) + v_offset
    qkv = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True)
    kw = dict(is_causal=causal, scale=D**-0.5, out_dtype=torch.float32)
    default = triton_backend._KERNELS["gluon-pp-persistent"]
    assert default.get("rowsum_mma") and default.get("persistent")
    by_mma = gluon_attention.gluon_fp8_attention(qkv, **default, **kw)
    in_softmax = gluon_attention.gluon_fp8_attention(qkv, **triton_backend._KERNELS["gluon-pp-persistent-alu-sums"], **kw)
    exact = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(H // H_kv, 1),
                                           v.float().repeat_interleave(H // H_kv, 1), is_causal=causal,
                                           scale=D**-0.5).transpose(1, 2)
    assert torch.isfinite(by_mma).all()
    assert sqnr_db(by_mma, in_softmax) > 40.0
    # per row too: a row whose sum lost keys (half the ones tile zero) shows as a norm ratio far from 1
    ratio = by_mma.norm(dim=-1) / in_softmax.norm(dim=-1)
    assert (ratio - 1).abs().max() < 0.05, (ratio.min().item(), ratio.max().item())
    assert sqnr_db(by_mma, exact) > sqnr_db(in_softmax, exact) - 0.5
    assert sqnr_db(by_mma, exact) > 25.0


@pytest.mark.parametrize("S,causal,v_offset", [(4096, True, 0.0), (4096, False, 4.0), (1040, True, 4.0)])
def test_v_in_wgmma_key_order_matches_key_order(S, causal, v_offset, monkeypatch):
    """The default route on V in wgmma key order (session 26: the quantizer writes it, the kernel relabels P)
    against the same build on V in key order: the same products summed in another order inside the P.V MMA
    (> 80 dB); the Triton kernel gets V back in key order (bit-equal); fp8_sdpa's triton path asks the quantizer
    for that order and hands it to the Gluon kernel."""
    from hf_fp8_attention import fp8_sdpa
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    torch.manual_seed(11)
    B, H, H_kv, D = 1, 8, 2, 128
    q, k = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv))
    v = torch.randn(B, H_kv, S, D, device="cuda", dtype=torch.bfloat16) + v_offset
    opts = FP8AttentionOptions(hadamard="none")
    keys = quantize_qkv_fp8(q, k, v, options=opts, v_keys_contiguous=True)
    wgmma = quantize_qkv_fp8(q, k, v, options=opts, v_keys_contiguous=True, v_wgmma_order=True)
    assert wgmma.v_wgmma_order and not torch.equal(wgmma.v.view(torch.uint8), keys.v.view(torch.uint8))
    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    kw = dict(is_causal=causal, scale=D**-0.5, out_dtype=torch.float32)
    got = triton_backend.triton_fp8_attention(wgmma, **kw)
    want = triton_backend.triton_fp8_attention(keys, **kw)
    assert torch.isfinite(got).all() and sqnr_db(got, want) > 80.0
    monkeypatch.setenv(triton_backend.KERNEL_ENV, "triton")  # the Triton kernel: V back in key order, bit-equal
    assert torch.equal(triton_backend.triton_fp8_attention(wgmma, **kw), triton_backend.triton_fp8_attention(keys, **kw))
    monkeypatch.delenv(triton_backend.KERNEL_ENV)
    seen = []
    launch = gluon_attention.attend
    monkeypatch.setattr(gluon_attention, "attend", lambda qkv, **a: seen.append(a["v_wgmma_order"]) or launch(qkv, **a))
    out = fp8_sdpa(q, k, v, is_causal=causal, backend="triton", hadamard="none")
    from hf_fp8_attention.backends import TRITON_V_KEYS_MIN_KEYS_X_DIM

    # (below 2k keys at D=128 the backend reads BSHD V: the Triton kernel, no Gluon call)
    assert seen == ([True] if S * D >= TRITON_V_KEYS_MIN_KEYS_X_DIM else []) and torch.isfinite(out).all()


def _forget_compiled():
    """Empty the in-process JIT caches of every Triton and Gluon kernel of the package, and the direct launches'
    plans: the next call compiles (or loads from the Triton cache directory) whatever it runs."""
    import sys

    from triton.runtime.jit import JITFunction

    for name, module in list(sys.modules.items()):
        if not name.startswith("hf_fp8_attention"):
            continue
        for obj in list(vars(module).values()):
            fn = obj if isinstance(obj, JITFunction) else getattr(obj, "fn", None)
            if isinstance(fn, JITFunction):
                for cache in fn.device_caches.values():
                    cache[0].clear()
                launcher = getattr(fn, "_hf_fp8_direct", None)
                if launcher is not None:
                    launcher.plans.clear()


def test_compile_ahead_compiles_the_kernel_the_first_call_runs(monkeypatch, tmp_path):
    """fp8_sdpa's first call at a new shape, as in a fresh process (every kernel of the package forgotten, an empty
    Triton cache directory per run): with compile-ahead the Gluon kernel compiles beside the quantizer's compile
    (`gluon_attention.compile_ahead`) and the launch then runs that kernel: one warmup, exactly one Gluon kernel
    compiled (a launch whose specialization differed would compile a second); the output equals the one with
    compile-ahead off (the same kernels, compiled in turn, in another cache directory)."""
    from hf_fp8_attention import fp8_sdpa
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    kernel = gluon_attention.fp8_attn_fwd_gluon_persistent_kernel
    device = torch.cuda.current_device()
    torch.manual_seed(3)
    B, H, H_kv, S, D = 1, 6, 3, 2064, 128  # B * H_kv odd: the descales' rows sit off 16-byte boundaries; V
    # keys-contiguous from S_kv * D >= 256k (the route)
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, H_kv, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    outs = []
    for ahead in ("1", "0"):
        monkeypatch.setenv(gluon_attention.COMPILE_AHEAD_ENV, ahead)
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / f"ahead{ahead}"))
        monkeypatch.setattr(gluon_attention, "_AHEAD_SEEN", set())
        _forget_compiled()
        warmups, calls = gluon_attention.AHEAD_WARMUPS, gluon_attention.CALLS
        outs.append(fp8_sdpa(q, k, v, is_causal=True, backend="triton"))
        assert gluon_attention.CALLS == calls + 1, "the call did not reach the Gluon kernel"
        assert gluon_attention.AHEAD_WARMUPS == warmups + (ahead == "1")
        assert len(kernel.device_caches[device][0]) == 1
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("B,S,causal,out_dtype", [(1, 1040, True, torch.bfloat16), (2, 1024, False, torch.bfloat16),
                                                  (2, 1040, True, torch.bfloat16), (1, 2048, True, torch.float32),
                                                  (3, 4096, True, torch.float16)])
def test_tma_store_equals_the_plain_store_build(B, S, causal, out_dtype):
    """The default persistent build (since session 28 the output through shared memory and TMA stores left in
    flight) writes the same bytes as route gluon-pp-persistent-plain-store (each thread's plain stores): the same
    float32 tile, rounded once to the output dtype; a query tail clipped by the TMA unit (B = 1), several sequences with S_q a multiple
    of 128, and B > 1 with a tail (the launcher keeps the plain stores there)."""
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    torch.manual_seed(5)
    H, H_kv, D = 8, 2, 128
    q, k, v = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv, H_kv))
    qkv = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True,
                           v_wgmma_order=True)
    kw = dict(is_causal=causal, scale=D**-0.5, out_dtype=out_dtype)
    want = gluon_attention.gluon_fp8_attention(qkv, **triton_backend._KERNELS["gluon-pp-persistent-plain-store"],
                                               **kw)
    got = gluon_attention.gluon_fp8_attention(qkv, **triton_backend._KERNELS["gluon-pp-persistent"], **kw)
    assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.parametrize("B,S,causal,route", [(1, 4096, True, "gluon-pp-persistent"),
                                              (2, 1024, False, "gluon-pp-persistent"),
                                              (2, 1040, True, "gluon-pp-persistent"),
                                              (1, 2048, True, "gluon-pp-persistent-plain-store"),
                                              (1, 1024, False, "gluon-2c")])
def test_direct_launch_equals_the_jit_launch(B, S, causal, route, monkeypatch):
    """Session 28: `attend`'s repeat of a known specialization goes through `_launch`'s direct launcher with
    `_LaunchDesc` records instead of TensorDescriptors (VERIFY off, as outside the tests): the same bytes as
    the JIT's launch of the first call, with TMA stores (B = 1; S_q a multiple of 128) and without (B > 1 with a
    tail; the plain-store route; the one-tile build)."""
    from hf_fp8_attention import _launch
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    monkeypatch.setattr(_launch, "VERIFY", False)
    torch.manual_seed(6)
    H, H_kv, D = 8, 2, 128
    q, k, v = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv, H_kv))
    persistent = triton_backend._KERNELS[route].get("persistent", False)
    qkv = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True,
                           v_wgmma_order=persistent)
    kernel = (gluon_attention.fp8_attn_fwd_gluon_persistent_kernel if persistent
              else gluon_attention.fp8_attn_fwd_gluon_kernel)
    plans = _launch.direct(kernel).plans
    kw = dict(is_causal=causal, scale=D**-0.5, out_dtype=torch.bfloat16, v_wgmma_order=persistent,
              **triton_backend._KERNELS[route])
    plans.clear()
    first = gluon_attention.attend(qkv, **kw)  # the JIT's launch, which records the key's plan
    assert len(plans) == 1
    repeats = [gluon_attention.attend(qkv, **kw) for _ in range(3)]  # direct, plain descriptors
    torch.cuda.synchronize()
    assert len(plans) == 1 and torch.isfinite(first).all()
    assert all(torch.equal(r, first) for r in repeats)


@pytest.mark.parametrize("causal", [False, True])
def test_direct_launch_serves_other_lengths_of_its_class(causal, monkeypatch):
    """`attend`'s direct-launch key holds the class of each int Triton specializes, not the lengths: after a
    2k prefill the 4k and 1040-token ones (whole 16s, B = 1) launch directly through its plan, with their own
    grid and descriptors; each equals the JIT's launch of that length (its plans cleared)."""
    from hf_fp8_attention import _launch
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    monkeypatch.setattr(_launch, "VERIFY", False)
    torch.manual_seed(8)
    H, H_kv, D = 8, 2, 128
    route = dict(triton_backend._KERNELS["gluon-pp-persistent"], is_causal=causal, scale=D**-0.5,
                 out_dtype=torch.bfloat16, v_wgmma_order=True)
    plans = _launch.direct(gluon_attention.fp8_attn_fwd_gluon_persistent_kernel).plans

    def bundle(S):
        q, k, v = (torch.randn(1, h, S, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv, H_kv))
        return quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True,
                                v_wgmma_order=True)

    plans.clear()
    gluon_attention.attend(bundle(2048), **route)
    assert len(plans) == 1
    for S in (4096, 1040):
        qkv = bundle(S)
        direct = gluon_attention.attend(qkv, **route)
        assert len(plans) == 1  # no new plan: the 2k call's served it
        plans.clear()
        jit = gluon_attention.attend(qkv, **route)
        torch.cuda.synchronize()
        assert torch.isfinite(jit).all() and torch.equal(direct, jit)


def _rows_emulated(qkv, causal, scale):
    """float32 attention on the dequantized operands of a `QuantizedQKV.q_in_kernel` bundle, Q's rows quantized as
    the Gluon kernel quantizes them (`quantize_q_rows_reference`): what the kernel computes but for its e4m3 P and
    online softmax."""
    from hf_fp8_attention.quantization.quantized import key_ordered_v
    from hf_fp8_attention.quantization.reference import quantize_q_rows_reference

    codes, descale = quantize_q_rows_reference(qkv.q, qkv.q_rotate)
    q = (codes.float() * descale[..., None]).transpose(1, 2)
    k = (qkv.k.float() * qkv.k_descale[:, None, :, None]).transpose(1, 2)
    v = (key_ordered_v(qkv).float() * qkv.v_descale[:, None, :, None]).transpose(1, 2)
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          is_causal=causal, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("B,S,causal,hadamard,dtype", [(1, 4096, True, "qk", torch.bfloat16),
                                                       (2, 1040, False, "none", torch.bfloat16),
                                                       (1, 1040, True, "qk", torch.float16),
                                                       (2, 2048, True, "none", torch.bfloat16)])
def test_q_quantized_in_the_kernel(B, S, causal, hadamard, dtype, monkeypatch):
    """Q_IN_KERNEL (session 29): the Gluon kernel quantizes each query row itself (rotated with hadamard="qk"),
    from the quantizer's K and V (byte-equal to the per-head call's). Its output is much closer to the emulation
    of that quantization (float32 attention on the dequantized rows) than to exact attention, i.e. it has the
    emulation's row scales; and it is at least as close to exact attention as the kernel on Q quantized per head;
    an outlier query row (x10000) then spoils only its own row's precision."""
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    torch.manual_seed(29)
    H, H_kv, D = 8, 2, 128
    q = torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(B, S, H_kv, D, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
    q[0, 1, 5] *= 10000  # (x1000 costs a per-head scale little: e4m3's exponent keeps the other rows' precision)
    opts = FP8AttentionOptions(hadamard=hadamard)
    kw = dict(options=opts, v_keys_contiguous=True, v_wgmma_order=True)
    left = quantize_qkv_fp8(q, k, v, q_in_kernel=True, **kw)
    full = quantize_qkv_fp8(q, k, v, **kw)
    assert left.q_in_kernel and left.q_rotate == (hadamard == "qk")
    for name in ("k", "v"):
        assert torch.equal(getattr(left, name).view(torch.uint8), getattr(full, name).view(torch.uint8))
    call = dict(is_causal=causal, scale=D**-0.5, out_dtype=torch.float32)
    calls = gluon_attention.CALLS
    got = triton_backend.triton_fp8_attention(left, **call)
    assert gluon_attention.CALLS == calls + 1  # the Gluon route took it
    old = triton_backend.triton_fp8_attention(full, **call)
    group = H // H_kv
    exact = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                           v.float().repeat_interleave(group, 1), is_causal=causal,
                                           scale=D**-0.5).transpose(1, 2)
    emulated = _rows_emulated(left, causal, D**-0.5)
    assert torch.isfinite(got).all()

    def rest(t):  # all but the outlier's head (its row attends to one key: a near tie could pick another)
        t = t.clone()
        t[0, :, 1] = 0
        return t

    got, old, exact, emulated = map(rest, (got, old, exact, emulated))
    to_exact, to_emulated = sqnr_db(got, exact), sqnr_db(got, emulated)
    # (H200, session 29: 32.5-34.2 dB to the emulation against 25.6-26.6 to exact attention; e4m3 P bounds both)
    assert to_emulated > 30.0 and to_emulated > to_exact + 5.0, (to_emulated, to_exact)
    assert to_exact > sqnr_db(old, exact) - 0.2, (to_exact, sqnr_db(old, exact))
    # the outlier's KV group: with one scale per (batch, KV head) its other heads lose precision, per row not (H200,
    # session 29: +0.6-0.7 dB on the group's output unrotated, where e4m3's exponent absorbs most of the scale, and
    # more than 3 dB rotated, where the per-head bound is the outlier row's norm)
    others = [h for h in range(H) if h // group == 1 // group and h != 1]
    gain = sqnr_db(got[0, :, others], exact[0, :, others]) - sqnr_db(old[0, :, others], exact[0, :, others])
    assert gain > (3.0 if hadamard == "qk" else 0.3), gain


def test_fp8_sdpa_quantizes_q_in_the_kernel(monkeypatch):
    """fp8_sdpa's triton path at a Gluon-routed shape leaves Q to the kernel with HF_FP8_ATTENTION_Q_IN_KERNEL=1
    (its output differs from the default path's, and is as close to exact attention), keeps Q in the quantizer with
    fused RoPE (byte-equal to the switch off), and captures and replays in a CUDA graph."""
    from hf_fp8_attention import fp8_sdpa
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    monkeypatch.delenv(triton_backend.KERNEL_ENV, raising=False)
    monkeypatch.setenv(triton_backend.Q_IN_KERNEL_ENV, "1")
    torch.manual_seed(30)
    B, S, H, H_kv, D = 1, 4096, 8, 2, 128
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(B, S, H_kv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    cos = torch.randn(1, S, D, device="cuda").cos()
    sin = (1 - cos * cos).sqrt()
    group = H // H_kv
    exact = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                           v.float().repeat_interleave(group, 1), is_causal=True)
    calls = gluon_attention.CALLS
    inside = fp8_sdpa(q, k, v, is_causal=True, backend="triton")
    rope_inside = fp8_sdpa(q, k, v, is_causal=True, backend="triton", cos=cos, sin=sin)
    monkeypatch.setenv(triton_backend.Q_IN_KERNEL_ENV, "0")
    quantizer = fp8_sdpa(q, k, v, is_causal=True, backend="triton")
    rope_quantizer = fp8_sdpa(q, k, v, is_causal=True, backend="triton", cos=cos, sin=sin)
    monkeypatch.setenv(triton_backend.Q_IN_KERNEL_ENV, "1")
    assert gluon_attention.CALLS == calls + 4
    assert not torch.equal(inside, quantizer) and torch.equal(rope_inside, rope_quantizer)
    assert sqnr_db(inside, exact) > sqnr_db(quantizer, exact) - 0.2 > 20.0
    graph = torch.cuda.CUDAGraph()
    fp8_sdpa(q, k, v, is_causal=True, backend="triton")  # (warm: compiled, direct-launch plans made)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        replayed = fp8_sdpa(q, k, v, is_causal=True, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, inside)


@pytest.mark.parametrize("B,S,causal,emu", [(1, 4096, True, 1), (1, 4096, False, 2), (2, 1040, True, 4),
                                            (1, 1040, False, 4)])
def test_exp2_by_polynomial_matches_the_default_build(B, S, causal, emu):
    """Routes gluon-pp-persistent-exp2-k (session 30): k of every 8 of the softmax's exponentials by the degree-3
    polynomial on the FMA pipe (`gluon_attention._exp2`, relative error 7.5e-5) instead of MUFU. Against the default
    build: the same attention up to a few e4m3 roundings of P (SQNR > 40 dB), no worse against float32 attention
    (0.1 dB), finite where keys are masked (causal, the key tail: the polynomial's clamp gives 2^-126, an e4m3 zero),
    and NaN in a query row stays in that row (max.NaN keeps it through the polynomial)."""
    from hf_fp8_attention.backends import gluon_attention
    from hf_fp8_attention.backends import triton as triton_backend

    torch.manual_seed(11)
    H, H_kv, D = 8, 2, 128
    q, k, v = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16) for h in (H, H_kv, H_kv))
    qkv = quantize_qkv_fp8(q, k, v, options=FP8AttentionOptions(hadamard="none"), v_keys_contiguous=True,
                           v_wgmma_order=True)
    kw = dict(is_causal=causal, scale=D**-0.5, out_dtype=torch.float32)
    route = triton_backend._KERNELS[f"gluon-pp-persistent-exp2-{emu}"]
    assert route.get("exp2_emu") == emu
    base = gluon_attention.gluon_fp8_attention(qkv, **triton_backend._KERNELS["gluon-pp-persistent"], **kw)
    got = gluon_attention.gluon_fp8_attention(qkv, **route, **kw)
    exact = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(H // H_kv, 1),
                                           v.float().repeat_interleave(H // H_kv, 1), is_causal=causal,
                                           scale=D**-0.5).transpose(1, 2)
    assert torch.isfinite(got).all()
    assert not torch.equal(got, base)  # (the polynomial ran: its values differ from MUFU's in the last bits)
    assert sqnr_db(got, base) > 40.0
    assert sqnr_db(got, exact) > sqnr_db(base, exact) - 0.1
    # a NaN in one query row's codes: NaN where the default build has NaN (that row), every other row as before
    bad = qkv.q.clone()
    bad[0, S // 2, 3, 5] = float("nan")
    nan_qkv = dataclasses.replace(qkv, q=bad)
    got_nan = gluon_attention.gluon_fp8_attention(nan_qkv, **route, **kw)
    base_nan = gluon_attention.gluon_fp8_attention(nan_qkv, **triton_backend._KERNELS["gluon-pp-persistent"], **kw)
    assert torch.isnan(base_nan[0, S // 2, 3]).any()
    assert torch.equal(torch.isnan(got_nan), torch.isnan(base_nan))
    keep = torch.ones(got.shape[:3], dtype=torch.bool, device="cuda")
    keep[0, S // 2, 3] = False
    assert torch.equal(got_nan[keep], got[keep])
