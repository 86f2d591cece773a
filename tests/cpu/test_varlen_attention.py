"""Varlen fp8 attention (packed sequences, cu_seqlens): the packed result equals fp8 attention on every
sequence alone. CPU: the reference backend (exact: it loops over the sequences) and the Triton kernel
under the interpreter (one launch over all sequences; its online softmax vs the per-sequence reference
run: SQNR > 30 dB, as in test_triton_attention.py). On a GPU the same tests run fa3 and triton."""

import os

import pytest
import torch

from hf_fp8_attention import fp8_sdpa, fp8_sdpa_varlen
from hf_fp8_attention.dispatch import ARCH_ENV
from hf_fp8_attention.metrics import sqnr_db

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _packed(lengths_q, lengths_k, h_q, h_kv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n, h: torch.randn(n, h, d, generator=g).to(torch.bfloat16).to(DEVICE)  # noqa: E731
    q, k, v = mk(sum(lengths_q), h_q), mk(sum(lengths_k), h_kv), mk(sum(lengths_k), h_kv)
    for i in range(1, len(lengths_k), 2):  # every other sequence 20x larger keys: per-sequence scales matter
        a = sum(lengths_k[:i])
        k[a : a + lengths_k[i]] *= 20
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


def _each_alone(q, k, v, cu_q, cu_k, **kw):
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        one = lambda x, a, b: x[a:b].transpose(0, 1)[None]  # noqa: E731
        res = fp8_sdpa(one(q, cq[i], cq[i + 1]), one(k, ck[i], ck[i + 1]), one(v, ck[i], ck[i + 1]), **kw)
        outs.append(res[0].transpose(0, 1))
    return torch.cat(outs)


def _backends():
    names = ["reference"]
    if INTERPRET or ON_CUDA:
        names.append("triton")
    if ON_CUDA:
        names.append("fa3")
    return names


CASES = [
    # lengths_q, lengths_k, h_q, h_kv, d, causal
    pytest.param([17, 40, 5], [17, 40, 5], 4, 2, 64, True, id="prefill-causal-gqa"),
    pytest.param([3, 1, 8], [20, 45, 8], 2, 2, 128, True, id="chunked-causal-sq<skv"),
    pytest.param([9, 30], [50, 12], 4, 1, 96, False, id="cross-mqa-d96"),
    pytest.param([1, 1, 1], [70, 9, 33], 8, 2, 128, True, id="decode-rows"),
    pytest.param([1, 2, 1], [600, 90, 300], 8, 2, 64, True, id="decode-split-keys"),  # triton: 2 key splits
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("lq,lk,h_q,h_kv,d,causal", CASES)
def test_varlen_equals_each_sequence_alone(backend, lq, lk, h_q, h_kv, d, causal, monkeypatch):
    if backend == "fa3":
        pytest.importorskip("flash_attn_interface")
    if backend == "triton" and not ON_CUDA:
        monkeypatch.setenv(ARCH_ENV, "90")  # lets the interpreted kernel take CPU tensors
    q, k, v, cu_q, cu_k = _packed(lq, lk, h_q, h_kv, d)
    got = fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=causal, backend=backend)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    ref = _each_alone(q, k, v, cu_q, cu_k, is_causal=causal, backend=backend)
    if backend == "reference":
        assert torch.equal(got, ref)
    else:  # same math, different launch shapes and (triton) key-split/online-softmax order
        assert sqnr_db(got.float(), ref.float()) > 30


def test_varlen_modes_and_rope_equal_each_sequence_alone():
    """hadamard + smooth_k + smooth_v and fused RoPE: the per-sequence means and the V fix-up follow the
    sequences (reference backend, exact)."""
    lq = [13, 30, 6]
    q, k, v, cu_q, _ = _packed(lq, lq, 4, 2, 64, seed=3)
    v += torch.linspace(-3, 3, 64, device=DEVICE).to(v.dtype)  # a per-channel offset for smooth_v to remove
    pos = torch.cat([torch.arange(n) for n in lq]).float()[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    emb = torch.cat([pos * inv, pos * inv], dim=-1).to(DEVICE)
    cos, sin = emb.cos(), emb.sin()
    kw = dict(is_causal=True, backend="reference", hadamard="qkv", smooth_k=True, smooth_v=True)
    got = fp8_sdpa_varlen(q, k, v, cu_q, cu_q, cos=cos, sin=sin, **kw)
    cq = cu_q.tolist()
    for i in range(len(lq)):
        a, b = cq[i], cq[i + 1]
        one = lambda x: x[a:b].transpose(0, 1)[None]  # noqa: E731
        alone = fp8_sdpa(one(q), one(k), one(v), cos=cos[None, a:b], sin=sin[None, a:b], **kw)
        assert torch.equal(got[a:b], alone[0].transpose(0, 1)), f"sequence {i}"


def test_varlen_errors():
    q, k, v, cu_q, cu_k = _packed([4, 6], [4, 6], 2, 2, 64)
    with pytest.raises(ValueError, match="3-D"):
        fp8_sdpa_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="sequence 1"):
        fp8_sdpa_varlen(q, k, v, cu_q, torch.tensor([0, 6, 10], dtype=torch.int32), is_causal=True)
    with pytest.raises(ValueError, match="int32"):
        fp8_sdpa_varlen(q, k, v, cu_q.long(), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_k"):
        cos = torch.ones(10, 64, device=DEVICE)
        fp8_sdpa_varlen(q, k, v, cu_q, torch.tensor([0, 5, 10], dtype=torch.int32), cos=cos, sin=cos)


@pytest.mark.parametrize("options", [{}, {"hadamard": "qkv", "smooth_v": True}], ids=["none", "qkv+smooth_v"])
def test_varlen_compiles_fullgraph(options):
    """fp8_sdpa_varlen is one custom-op node under torch.compile(fullgraph=True): the offsets, which cannot be
    read while tracing, are validated and measured inside the op; same result as eager."""
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = _packed([17, 40, 5], [17, 40, 5], 4, 2, 64)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, v, cu_q, cu_k):
        return fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend="reference", **options) * 2

    eager = fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend="reference", **options) * 2
    assert torch.equal(f(q, k, v, cu_q, cu_k), eager)
    with pytest.raises(ValueError, match="sequence 1"):  # still validated: inside the op at run time
        f(q, k, v, cu_q, torch.tensor([0, 17, 20, 62], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("threshold,centred", [(48, False), (40, True)])
def test_varlen_smooth_v_auto_by_longest_sequence(monkeypatch, threshold, centred):
    """smooth_v="auto" on a packed batch is decided by its longest sequence (40 keys; 62 packed), in eager
    calls and compiled ones alike (inside the op, where the offsets are read): equal to the explicit value."""
    from hf_fp8_attention import options as opts

    monkeypatch.setattr(opts, "AUTO_SMOOTH_V_MIN_KEYS", threshold)
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = _packed([17, 40, 5], [17, 40, 5], 4, 2, 64)
    v = v + 3.0  # a channel offset, so that centring changes the output

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, v, cu_q, cu_k):
        return fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend="reference")

    explicit = fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend="reference", smooth_v=centred)
    assert torch.equal(fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend="reference"), explicit)
    assert torch.equal(f(q, k, v, cu_q, cu_k), explicit)
    other = fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend="reference", smooth_v=not centred)
    assert not torch.equal(other, explicit)


def test_varlen_compiled_rope_needs_equal_offsets():
    """Under compile the offsets are checked inside the op, the RoPE rule included."""
    torch._dynamo.reset()
    q, k, v, cu_q, _ = _packed([4, 6], [4, 6], 2, 2, 64)
    cos = torch.ones(10, 64, device=DEVICE)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, k, v, cu_q, cu_k):
        return fp8_sdpa_varlen(q, k, v, cu_q, cu_k, cos=cos, sin=cos, backend="reference")

    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_k"):
        f(q, k, v, cu_q, torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE))
