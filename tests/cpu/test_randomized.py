"""Randomized checks (hypothesis, bounded example counts so CI stays fast; reference backend on CPU):
random batch, GQA ratio, S_q <= S_kv, head_dim, causal, dtype, memory layout, accuracy modes and padding
masks, each compared with float32 SDPA at the documented bar (SQNR > 25 dB: torchao's per-call bar, which
test_sdpa.py uses too; padded rows compared only where they are valid); invalid combinations raise the
documented errors."""

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import AttentionInterface  # noqa: E402

import hf_fp8_attention  # noqa: E402,F401  (registers the attention names)
from hf_fp8_attention import fp8_sdpa  # noqa: E402
from hf_fp8_attention.metrics import sqnr_db  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
MODES = [{}, {"smooth_k": True}, {"smooth_v": True}, {"hadamard": "qkv"}, {"hadamard": "qk"}, {"hadamard": "v_only"},
         {"qk_scales": "block"}, {"hadamard": "qkv", "smooth_k": True, "smooth_v": True, "qk_scales": "block"}]


def _tensor(g, b, h, s, d, dtype, layout):
    """(B, H, S, D) with the memory layout asked for: BHSD contiguous, BSHD viewed as BHSD (Transformers),
    or every other token of a longer buffer (a non-unit token stride)."""
    if layout == "bhsd":
        return torch.randn(b, h, s, d, generator=g).to(dtype)
    if layout == "bshd":
        return torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(b, h, 2 * s, d, generator=g).to(dtype)[:, :, ::2]


def _float32_sdpa(q, k, v, causal, scale=None):
    s_q, s_kv = q.shape[2], k.shape[2]
    mask = torch.ones(s_q, s_kv, dtype=torch.bool).tril(s_kv - s_q) if causal else None
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                          enable_gqa=True)


@st.composite
def cases(draw):
    h_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    s_kv = draw(st.integers(1, 96))
    return dict(
        b=draw(st.integers(1, 3)), h_q=h_kv * group, h_kv=h_kv, s_q=draw(st.integers(1, s_kv)), s_kv=s_kv,
        d=draw(st.sampled_from([64, 96, 128, 256])), causal=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        layout=draw(st.sampled_from(["bhsd", "bshd", "strided"])), mode=draw(st.sampled_from(MODES)),
        scale=draw(st.sampled_from([None, 0.05])), seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(cases())
def test_random_shapes_layouts_and_modes_match_float32(c):
    mode = dict(c["mode"])
    if mode.get("hadamard") and c["d"] == 96:
        mode.pop("hadamard")  # needs a power-of-two head_dim (checked in test_random_invalid_inputs_raise)
    g = torch.Generator().manual_seed(c["seed"])
    q = _tensor(g, c["b"], c["h_q"], c["s_q"], c["d"], c["dtype"], c["layout"])
    k, v = (_tensor(g, c["b"], c["h_kv"], c["s_kv"], c["d"], c["dtype"], c["layout"]) for _ in range(2))
    out = fp8_sdpa(q, k, v, is_causal=c["causal"], scale=c["scale"], backend="reference", **mode)
    assert out.shape == q.shape and out.dtype == c["dtype"] and torch.isfinite(out).all()
    ref = _float32_sdpa(q, k, v, c["causal"], c["scale"])
    assert sqnr_db(out.float(), ref) > 25.0, (c, sqnr_db(out.float(), ref))


@SETTINGS
@given(b=st.integers(1, 3), s=st.integers(2, 40), h_kv=st.sampled_from([1, 2]), left=st.booleans(),
       causal=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_random_padding_masks_match_float32(b, s, h_kv, left, causal, seed, data):
    """The registered attention function with a 2-D padding mask (left or right padding, random lengths):
    valid rows match float32 SDPA over each row's valid keys; padded query rows are zero."""
    lengths = [data.draw(st.integers(1, s)) for _ in range(b)]
    g = torch.Generator().manual_seed(seed)
    q = _tensor(g, b, 2 * h_kv, s, 64, torch.bfloat16, "bshd")
    k, v = (_tensor(g, b, h_kv, s, 64, torch.bfloat16, "bshd") for _ in range(2))
    mask = torch.zeros(b, s, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, slice(s - n, s) if left else slice(0, n)] = True
    module = torch.nn.Module()
    module.is_causal = causal
    forward = AttentionInterface()["fp8_reference"]
    out, _ = forward(module, q, k, v, mask, scaling=64**-0.5, is_causal=causal)  # (B, S, H, D)
    for row, n in enumerate(lengths):
        rows = slice(s - n, s) if left else slice(0, n)
        ref = _float32_sdpa(q[row:row + 1, :, rows], k[row:row + 1, :, rows], v[row:row + 1, :, rows], causal)
        got = out[row:row + 1, rows].transpose(1, 2).float()
        assert sqnr_db(got, ref) > 25.0, (row, n, sqnr_db(got, ref))
        pad = slice(0, s - n) if left else slice(n, s)
        if causal:  # padded queries (bottom-right alignment: they precede/follow every valid key) are zero
            assert (out[row, pad] == 0).all()


@SETTINGS
@given(kind=st.sampled_from(["gqa", "causal", "head_dim", "hadamard", "dtype", "batch"]), seed=st.integers(0, 99))
def test_random_invalid_inputs_raise(kind, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).bfloat16()  # noqa: E731
    q, k, v, kw = mk(1, 4, 8, 64), mk(1, 2, 8, 64), mk(1, 2, 8, 64), {}
    expected = {
        "gqa": (ValueError, "multiple of key/value heads"), "causal": (ValueError, "more queries than keys"),
        "head_dim": (ValueError, "head_dim 80 is not supported"), "hadamard": (ValueError, "power-of-two"),
        "dtype": (TypeError, "bfloat16 or float16"), "batch": (ValueError, "batch sizes differ"),
    }[kind]
    if kind == "gqa":
        q = mk(1, 3, 8, 64)
    elif kind == "causal":
        q, kw = mk(1, 4, 9, 64), {"is_causal": True}
    elif kind == "head_dim":
        q, k, v = mk(1, 4, 8, 80), mk(1, 2, 8, 80), mk(1, 2, 8, 80)
    elif kind == "hadamard":
        q, k, v, kw = mk(1, 4, 8, 96), mk(1, 2, 8, 96), mk(1, 2, 8, 96), {"hadamard": "qkv"}
    elif kind == "dtype":
        q, k, v = q.float(), k.float(), v.float()
    else:
        q = mk(2, 4, 8, 64)
    with pytest.raises(expected[0], match=expected[1]):
        fp8_sdpa(q, k, v, backend="reference", **kw)
