"""The shared FP8 SDPA on CPU: reference backend accuracy, validation errors, custom op, FA4 wiring.

Accuracy thresholds: SQNR > 25 dB against a float32 SDPA on Gaussian inputs (torchao's per-call bar);
the fp8 error itself is measured, and must also stay under the bar that bf16-vs-fp8 comparisons use.
"""

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

import hf_fp8_attention.backends.fa4 as fa4_module
from hf_fp8_attention import fp8_sdpa, quantize_qkv_fp8_reference
from hf_fp8_attention.backends.reference import reference_fp8_attention
from hf_fp8_attention.custom_ops import fp8_sdpa_op
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.dispatch import ARCH_ENV, check_backend, resolve_backend
from hf_fp8_attention.metrics import cosine, rel_l2, sqnr_db


def _qkv(b, h_q, h_kv, s_q, s_kv, d, dtype=torch.bfloat16, bshd=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bshd:
        mk = lambda h, s: torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda h, s: torch.randn(b, h, s, d, generator=g).to(dtype)  # noqa: E731
    return mk(h_q, s_q), mk(h_kv, s_kv), mk(h_kv, s_kv)


def _sdpa32(q, k, v, is_causal, scale=None):
    q, k, v = q.float(), k.float(), v.float()
    s_q, s_kv = q.shape[2], k.shape[2]
    mask = None
    if is_causal and s_q != s_kv:
        mask = torch.ones(s_q, s_kv, dtype=torch.bool).tril(s_kv - s_q)
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@pytest.mark.parametrize(
    "b,h_q,h_kv,s_q,s_kv,d",
    [
        (2, 4, 4, 64, 64, 64),  # MHA
        (1, 8, 2, 96, 96, 128),  # GQA
        (2, 4, 1, 33, 33, 96),  # MQA, odd length, D=96
        (1, 2, 2, 16, 40, 256),  # S_q < S_kv, D=256
        (3, 4, 2, 1, 50, 64),  # decode step
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_accuracy(b, h_q, h_kv, s_q, s_kv, d, causal):
    q, k, v = _qkv(b, h_q, h_kv, s_q, s_kv, d)
    out = fp8_sdpa(q, k, v, is_causal=causal, backend="reference")
    ref = _sdpa32(q, k, v, causal)
    assert out.shape == (b, h_q, s_q, d) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # BSHD memory, what the HF adapter returns without a copy
    assert sqnr_db(out, ref) > 25.0
    assert cosine(out, ref) > 0.998


def test_auto_backend_on_cpu_is_reference_with_notice(caplog):
    from transformers.utils.logging import warning_once

    warning_once.cache_clear()  # transformers' once-only warnings: forget earlier tests' notices
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        assert resolve_backend(torch.device("cpu")) == "reference"
        assert resolve_backend(torch.device("cpu")) == "reference"
    notices = [r for r in caplog.records if "reference" in r.getMessage()]
    assert len(notices) == 1  # one-time


def test_fp16_scale_and_contiguous_layout():
    q, k, v = _qkv(2, 4, 2, 48, 48, 64, dtype=torch.float16, bshd=False, seed=1)
    out = fp8_sdpa(q, k, v, is_causal=True, scale=0.3)
    assert out.dtype == torch.float16
    assert sqnr_db(out, _sdpa32(q, k, v, True, scale=0.3)) > 25.0
    # the scale really is used: the default scale gives a different result
    assert rel_l2(out, fp8_sdpa(q, k, v, is_causal=True)) > 1e-2


def test_emulates_p_rounding():
    """The reference casts P to e4m3 (as FA3): its output differs from exact-P attention on the same fp8
    Q/K/V by a small, non-zero amount."""
    q, k, v = _qkv(1, 2, 2, 64, 64, 64, seed=2)
    qkv = quantize_qkv_fp8_reference(q, k, v)
    out = reference_fp8_attention(qkv, is_causal=False, scale=0.125, out_dtype=torch.float32)
    deq = lambda t, s: (t.float() * s[:, None, :, None]).transpose(1, 2)  # noqa: E731
    exact_p = F.scaled_dot_product_attention(
        deq(qkv.q, qkv.q_descale), deq(qkv.k, qkv.k_descale), deq(qkv.v, qkv.v_descale), scale=0.125
    ).transpose(1, 2)
    err = rel_l2(out, exact_p)
    assert 1e-4 < err < 3e-2, err


def test_zero_head_and_non_finite():
    q, k, v = _qkv(1, 4, 4, 32, 32, 64, seed=3)
    v0 = v.clone()
    v0[:, 1] = 0
    out = fp8_sdpa(q, k, v0, is_causal=True)
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all()
    k0 = k.clone()
    k0[:, 2] = 0
    out0 = fp8_sdpa(q, k0, v)
    assert torch.isfinite(out0).all()
    # all-zero keys: uniform attention, every query gets the mean of V (up to V's e4m3 rounding)
    mean_v = v[:, 2].float().mean(dim=1, keepdim=True).expand(-1, q.shape[2], -1)
    assert cosine(out0[:, 2], mean_v) > 0.995
    # A non-finite input damages only what it touches, as in bf16 SDPA: a query its row, a value its output
    # column, a key the rows that see it (all of them here: not causal); the other heads stay finite.
    for bad in (float("nan"), float("inf"), float("-inf")):
        for which in range(3):
            t = [q.clone(), k.clone(), v.clone()]
            t[which][0, 3, 5, 7] = bad
            out = fp8_sdpa(*t)
            assert torch.isfinite(out[:, :3]).all(), (bad, which)
            damaged = ~torch.isfinite(out[0, 3])  # (S, D)
            if which == 0:
                assert damaged[5].all() and not damaged[torch.arange(32) != 5].any(), bad
            elif which == 1:
                assert damaged.any(dim=1).all(), bad
            else:
                assert damaged[:, 7].all() and not damaged[:, torch.arange(64) != 7].any(), bad


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), TypeError, "bfloat16 or float16"),
        (lambda q, k, v: (q.to(torch.float8_e4m3fn), k, v), TypeError, "already FP8"),
        (lambda q, k, v: (q, k.half(), v.half()), TypeError, "dtypes differ"),
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), ValueError, "head_dim 48"),
        (lambda q, k, v: (q, k[..., :32], v[..., :32]), ValueError, "head_dim differs"),
        (lambda q, k, v: (q[:1], k, v), ValueError, "batch sizes differ"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of key/value heads"),
        (lambda q, k, v: (q, k, v[:, :, :10]), ValueError, "key and value shapes differ"),
        (lambda q, k, v: (q[0], k[0], v[0]), ValueError, "4-D"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "zero-size"),
        (lambda q, k, v: ("q", k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(mutate, exc, match):
    q, k, v = _qkv(2, 4, 2, 16, 16, 64)
    with pytest.raises(exc, match=match):
        fp8_sdpa(*mutate(q, k, v))


def test_bad_arguments():
    q, k, v = _qkv(1, 2, 2, 16, 8, 64)
    with pytest.raises(ValueError, match="more queries than keys"):
        fp8_sdpa(q, k, v, is_causal=True)
    q, k, v = _qkv(1, 2, 2, 16, 16, 64)
    with pytest.raises(ValueError, match="scale"):
        fp8_sdpa(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="unknown fp8 attention backend 'fa5'"):
        fp8_sdpa(q, k, v, backend="fa5")
    cos = torch.ones(1, 16, 64)
    with pytest.raises(ValueError, match="both cos and sin"):
        fp8_sdpa(q, k, v, cos=cos)
    with pytest.raises(ValueError, match="cos and sin shapes differ"):
        fp8_sdpa(q, k, v, cos=cos, sin=cos.expand(2, 16, 64))
    with pytest.raises(ValueError, match="cos must have shape"):
        fp8_sdpa(q, k, v, cos=cos[:, :8], sin=cos[:, :8])
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fp8_sdpa(q, k, v, backend="fa3")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fp8_sdpa(q, k, v, backend="fa4")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fp8_sdpa(q, k, v, backend="triton")


def test_fa4_on_sm90_names_fa3(monkeypatch):
    monkeypatch.setenv(ARCH_ENV, "90")
    with pytest.raises(RuntimeError, match="fp8_fa3"):
        check_backend("fa4", torch.device("cuda"))
    monkeypatch.setenv(ARCH_ENV, "80")
    with pytest.raises(RuntimeError, match="SM 9.x"):
        check_backend("fa3", torch.device("cuda"))


def test_explicit_backend_without_its_kernel(monkeypatch):
    import hf_fp8_attention.dispatch as dispatch

    monkeypatch.setattr(dispatch, "kernel_available", lambda name: name == "reference")
    monkeypatch.setenv(ARCH_ENV, "90")
    with pytest.raises(ImportError, match=r"hf_fp8_attention\[fa3\]"):
        check_backend("fa3", torch.device("cuda"))


def test_triton_quantizer_only_where_fp8_casts_compile(monkeypatch):
    """GPUs older than SM 8.9 (or without triton) quantize with the torch reference, so fp8_reference
    really runs on any device."""
    import hf_fp8_attention.dispatch as dispatch

    monkeypatch.setattr(dispatch, "kernel_available", lambda name: True)
    monkeypatch.setenv(ARCH_ENV, "80")
    assert dispatch.quantizer_for(torch.device("cuda")) == "reference"
    assert dispatch.plan_attention(torch.device("cuda"), "reference").quantizer == "reference"
    monkeypatch.setenv(ARCH_ENV, "90")
    assert dispatch.quantizer_for(torch.device("cuda")) == "triton"
    assert dispatch.plan_attention(torch.device("cuda"), "reference").quantizer == "triton"
    assert dispatch.quantizer_for(torch.device("cpu")) == "reference"  # CPU tensors: the torch reference
    monkeypatch.setattr(dispatch, "kernel_available", lambda name: name != "triton")
    assert dispatch.quantizer_for(torch.device("cuda")) == "reference"


def test_auto_pick_table(monkeypatch):
    import hf_fp8_attention.dispatch as dispatch

    monkeypatch.setattr(dispatch, "kernel_available", lambda name: True)
    for arch, want in (("90", "fa3"), ("100", "fa4"), ("89", "triton"), ("120", "triton"), ("80", "reference")):
        monkeypatch.setenv(ARCH_ENV, arch)
        assert resolve_backend(torch.device("cpu")) == want
    monkeypatch.setattr(dispatch, "kernel_available", lambda name: name in ("reference", "triton"))
    monkeypatch.setenv(ARCH_ENV, "90")
    assert resolve_backend(torch.device("cpu")) == "triton"  # FA3 wheel missing: portable Triton kernel
    monkeypatch.setattr(dispatch, "kernel_available", lambda name: name == "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"  # no triton either: notice + reference
    monkeypatch.setenv(ARCH_ENV, "80")
    with pytest.raises(RuntimeError, match="SM 8.9"):
        check_backend("triton", torch.device("cuda"))


class _RecordingFA4:
    """Stands in for flash_attn.cute.flash_attn_func: records its arguments and computes attention from
    the e4m3 inputs and the descales it was given (so dropped descales give a wrong answer)."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None, **unused):
        self.calls.append(dict(q=q, k=k, v=v, scale=softmax_scale, causal=causal, qd=q_descale, kd=k_descale, vd=v_descale))
        one = lambda t: torch.ones(t.shape[0], t.shape[2])  # noqa: E731
        deq = lambda t, s: (t.float() * (one(t) if s is None else s)[:, None, :, None]).transpose(1, 2)  # noqa: E731
        kf, vf = deq(k, k_descale), deq(v, v_descale)
        group = q.shape[2] // k.shape[2]
        # FA4 descales are per KV head; Q's are shared by each group of query heads
        qf = (q.float() * (one(k) if q_descale is None else q_descale).repeat_interleave(group, 1)[:, None, :, None]).transpose(1, 2)
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal, scale=softmax_scale, enable_gqa=group > 1)
        return out.transpose(1, 2).to(torch.bfloat16), None


def test_fa4_wiring_passes_descales(monkeypatch):
    import hf_fp8_attention.dispatch as dispatch

    fake = _RecordingFA4()
    monkeypatch.setattr(fa4_module, "_load_kernel", lambda: fake)
    monkeypatch.setattr(dispatch, "kernel_available", lambda name: True)
    monkeypatch.setenv(ARCH_ENV, "100")
    q, k, v = _qkv(2, 4, 2, 32, 32, 64, seed=4)
    out = fp8_sdpa(q, k, v, is_causal=True, backend="fa4")
    call = fake.calls[-1]
    assert call["q"].dtype == torch.float8_e4m3fn and call["q"].shape == (2, 32, 4, 64)  # BSHD e4m3
    for key in ("qd", "kd", "vd"):
        assert call[key] is not None and call[key].shape == (2, 2) and call[key].dtype == torch.float32
    assert call["causal"] is True and call["scale"] == pytest.approx(64**-0.5)
    ref = _sdpa32(q, k, v, True)
    assert sqnr_db(out, ref) > 25.0
    # inputs scaled by 1e3 / 1e-3 give the same attention output up to fp8 rounding (scale-invariant scores
    # need the scale folded into `scale`, so scale only V here; Q/K scaled with a compensating softmax scale)
    # (hadamard="none": the default rotation takes power-of-two scales, so a factor of 1e3 moves its roundings)
    out = fp8_sdpa(q, k, v, is_causal=True, backend="fa4", hadamard="none")
    for factor in (1e3, 1e-3):
        out_v = fp8_sdpa(q, k, (v.float() * factor).bfloat16(), is_causal=True, backend="fa4", hadamard="none")
        assert sqnr_db(out_v.float() / factor, out.float()) > 30.0
        out_qk = fp8_sdpa(
            (q.float() * factor).bfloat16(), (k.float() * factor).bfloat16(), v,
            is_causal=True, scale=64**-0.5 / factor**2, backend="fa4", hadamard="none",
        )
        assert sqnr_db(out_qk, out) > 30.0


def test_fa4_takes_a_keys_contiguous_v_as_bshd(monkeypatch):
    """A QuantizedQKV whose V is keys-contiguous (`quantize_qkv_fp8(v_keys_contiguous=True)`, the triton
    backend's layout) reaches FA4 with unit channel stride, the same values: its answer is the BSHD one's."""
    from hf_fp8_attention import quantize_qkv_fp8_reference

    fake = _RecordingFA4()
    monkeypatch.setattr(fa4_module, "_load_kernel", lambda: fake)
    q, k, v = _qkv(2, 4, 2, 32, 32, 64, seed=6)
    bshd = quantize_qkv_fp8_reference(q, k, v)
    keys = quantize_qkv_fp8_reference(q, k, v, v_keys_contiguous=True)
    assert keys.v.stride(-1) != 1
    want = fa4_module.fa4_fp8_attention(bshd, is_causal=True, scale=0.125, out_dtype=torch.bfloat16)
    got = fa4_module.fa4_fp8_attention(keys, is_causal=True, scale=0.125, out_dtype=torch.bfloat16)
    assert fake.calls[-1]["v"].stride(-1) == 1
    assert torch.equal(got, want)


def test_custom_op_opcheck_and_compile():
    q, k, v = _qkv(1, 4, 2, 16, 16, 64, seed=5)
    options = ("none", False, False, "head", "e4m3", "head")
    torch.library.opcheck(fp8_sdpa_op, (q, k, v, None, None, None, None, None, None, True, 0.125, "reference",
                                        "reference", *options))

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, v):
        return fp8_sdpa(q, k, v, is_causal=True, backend="reference") + 1

    assert torch.equal(f(q, k, v), fp8_sdpa(q, k, v, is_causal=True, backend="reference") + 1)


def test_fa3_wiring_pack_gqa(monkeypatch):
    """fa3_fp8_attention's call of FA3's op: pack_gqa (the 33rd positional argument of flash_attn_3::fwd) is
    True for non-causal GQA at head_dim 128 from PACK_GQA_MIN_QUERIES query rows per sequence, None (FA3's
    heuristic) for causal, MHA, other head dims, fewer rows per sequence or packed sequences, and what the caller passes otherwise; descales in their slots."""
    from hf_fp8_attention.backends import fa3 as fa3_module

    calls = []

    def fake_fwd(*args):
        calls.append(args)
        return (torch.zeros(args[0].shape, dtype=torch.bfloat16),)

    monkeypatch.setattr(fa3_module, "_load_kernel", lambda: fake_fwd)
    monkeypatch.setattr(fa3_module, "PACK_GQA_MIN_QUERIES", 32)
    gqa = quantize_qkv_fp8_reference(*_qkv(1, 4, 2, 32, 32, 128, seed=7))
    short = quantize_qkv_fp8_reference(*_qkv(1, 4, 2, 31, 31, 128, seed=7))  # below PACK_GQA_MIN_QUERIES
    mha = quantize_qkv_fp8_reference(*_qkv(1, 2, 2, 32, 32, 128, seed=7))
    d64 = quantize_qkv_fp8_reference(*_qkv(1, 4, 2, 32, 32, 64, seed=7))  # head_dim 64: not measured faster
    batch = quantize_qkv_fp8_reference(*_qkv(2, 4, 2, 31, 31, 128, seed=7))  # 62 rows, but 31 per sequence
    for qkv, causal, pack, want in ((gqa, False, "auto", True), (gqa, True, "auto", None),
                                    (short, False, "auto", None), (mha, False, "auto", None),
                                    (d64, False, "auto", None), (batch, False, "auto", None),
                                    (gqa, False, None, None), (gqa, True, True, True), (gqa, False, False, False)):
        out = fa3_module.fa3_fp8_attention(qkv, is_causal=causal, scale=0.125, out_dtype=torch.bfloat16,
                                           pack_gqa=pack)
        args = calls[-1]
        assert len(args) == 35 and args[32] is want, (causal, pack, args[32])
        assert args[20] is qkv.q_descale and args[22] is qkv.v_descale and args[24] is causal
        assert out.shape == qkv.q.shape
    # packed sequences: FA3's heuristic (it packs them itself)
    cu = torch.tensor([0, 32], dtype=torch.int32)
    packed = dataclasses.replace(gqa, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=32, max_seqlen_k=32)
    fa3_module.fa3_fp8_attention(packed, is_causal=False, scale=0.125, out_dtype=torch.bfloat16)
    assert calls[-1][32] is None and calls[-1][7] is cu
    for bad in ("yes", 1, 0.0):  # (1 == True: refused, not passed on as an int)
        with pytest.raises(ValueError, match="pack_gqa"):
            fa3_module.fa3_fp8_attention(gqa, is_causal=False, scale=0.125, out_dtype=torch.bfloat16, pack_gqa=bad)
