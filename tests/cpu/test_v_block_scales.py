"""v_scales='block': one V scale per V_SCALE_BLOCK (128) tokens of one KV head, with per-block Q/K scales.

The single-pass quantize kernel (interpreted on CPU) equals the reference bit for bit (codes and every block
descale; up to the rotation's summation order with Hadamard), the triton attention kernel with V block
descales tracks the reference backend (one descale per key tile, splits included), V block scales gain where one token of V is
huge and lose nothing on Gaussian inputs (float64 exact attention, short and long context), and the option is
refused where it cannot run."""

import os

import pytest
import torch
from test_block_scales import packed_gqa, small_gqa, triton_and_reference
from test_quantize import _interpreter_bf16_dot, _fp8_bytes, _ordinal, make_qkv, make_rope  # noqa: F401

from hf_fp8_attention import fp8_sdpa
from hf_fp8_attention._constants import SCALE_BLOCK, V_SCALE_BLOCK
from hf_fp8_attention.metrics import sqnr_db
from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import (
    quantize_qkv_fp8,
    quantize_qkv_fp8_reference,
    quantize_qkv_fp8_varlen,
    quantize_qkv_fp8_varlen_reference,
)

BLOCK_QKV = FP8AttentionOptions(qk_scales="block", v_scales="block")
INT8_BLOCK_V = FP8AttentionOptions(qk_format="int8", v_scales="block")

ON_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(ON_CUDA or not INTERPRET, reason="interpreted Triton on CPU")


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_blocks(got, ref, lengths=None):
    """Codes equal bit for bit; every block descale a sequence reaches equal; the per-head descales NaN."""
    for n in "qkv":
        g, r = getattr(got, n), getattr(ref, n)
        assert g.shape == r.shape and g.dtype == r.dtype, n
        assert torch.equal(_codes(g), _codes(r)), f"{n}: {int((_codes(g) != _codes(r)).sum())} bytes differ"
    for n, block in (("q", SCALE_BLOCK), ("k", got.k_scale_block), ("v", V_SCALE_BLOCK)):
        g, r = getattr(got, f"{n}_block_descale"), getattr(ref, f"{n}_block_descale")
        assert g.shape == r.shape, n
        same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
        if lengths is None:
            same(g, r)
        else:  # varlen: the blocks each sequence reaches (the rest of the row is never read)
            for i, length in enumerate(lengths):
                nb = -(-length // block)
                same(g[i, :, :nb], r[i, :, :nb])
        assert torch.isnan(getattr(got, f"{n}_descale")).all() and torch.isnan(getattr(ref, f"{n}_descale")).all()


@kernel_test
@pytest.mark.parametrize("B,H_q,H_kv,S,D,rope,options,v_keys", [
    (2, 4, 2, 150, 64, False, BLOCK_QKV, False),
    (1, 4, 2, 130, 128, True, BLOCK_QKV, True),
    (1, 2, 1, 200, 128, False, INT8_BLOCK_V, False),
    (1, 2, 2, 40, 96, True, FP8AttentionOptions(qk_format="int8", smooth_k=True, v_scales="block"), False),
    (1, 2, 2, 40, 256, False, BLOCK_QKV, True),
], ids=["gqa-d64", "rope-d128-vkeys", "int8-mqa-d128", "int8-smooth_k-rope-d96", "d256-vkeys"])
def test_single_pass_kernel_matches_reference(B, H_q, H_kv, S, D, rope, options, v_keys):
    q, k, v = make_qkv(B, H_q, H_kv, S, S, D, torch.bfloat16)
    v[:, :, 3] *= 50  # a loud V token: its block's scale must not leak into the next block
    q[:, :, 140 % S] *= 40
    cos, sin = make_rope(1, S, D, torch.float32) if rope else (None, None)
    got = quantize_qkv_fp8(q, k, v, cos, sin, options=options, v_keys_contiguous=v_keys)
    ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options, v_keys_contiguous=v_keys)
    assert_same_blocks(got, ref)
    assert ref.v_block_descale.shape == (B, H_kv, -(-S // V_SCALE_BLOCK))
    assert got.v.stride(1) == (1 if v_keys else H_kv * D)
    if S > V_SCALE_BLOCK:  # the loud token's V block against the next one
        assert (ref.v_block_descale[:, :, 0] > 10 * ref.v_block_descale[:, :, 1]).all()


@kernel_test
@pytest.mark.parametrize("tile", [(16, 8, 4, True, True, True), (32, 4, 4, False, False, 3),
                                  (64, 16, 8, True, True, True), (16, 8, 4, True, True, 2)], ids=str)
@pytest.mark.parametrize("B,H_q,H_kv,S,D,extra", [
    (2, 6, 3, 150, 64, {}),  # 9 heads: chunks of 5 + 4 (at most 8), 3 x 3 (at most 4); S not a multiple of the rows
    (1, 4, 4, 70, 128, {"smooth_k": True}),
    (1, 4, 2, 48, 128, {"hadamard": "qk"}),
    (1, 2, 2, 300, 128, {"hadamard": "qkv"}),  # V blocks of 128 rows over several tiles, the last partial
    (1, 3, 1, 40, 96, {}),  # padded half tile
    (1, 2, 1, 33, 256, {}),
], ids=["gqa-d64", "smooth_k-d128", "hadamard-d128", "hadamard-qkv-d128", "mqa-d96", "d256"])
def test_qk_rope_kernel_matches_reference(tile, B, H_q, H_kv, S, D, extra, monkeypatch):
    """RoPE with e4m3 block scales: q/k through `qk_rope_block_kernel` (cos/sin once per row tile, a loop over
    heads; with and without prefetch), v in the same launch (each V block in two passes over the tile's rows)
    or through the single-pass kernel's v tiles alone (V_SIDE, 3: on CPU tensors in order on one stream): the
    same codes and block descales as the reference. cos/sin per batch, with halves that differ (the kernel
    reads both)."""
    import hf_fp8_attention.quantization.qkv as qkv

    monkeypatch.setattr(qkv, "_ROPE_TILES", {})
    monkeypatch.setattr(qkv, "_ROPE_TILE_DEFAULT", tile)
    calls = []
    real = qkv._launch_qk_rope
    monkeypatch.setattr(qkv, "_launch_qk_rope", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(B, H_q, H_kv, S, S, D, torch.bfloat16, seed=D)
    q[:, :, S // 2] *= 40
    k[:, :, 3] *= 30
    v[:, :, S - 1] *= 50  # the last V block's amax from its last tile
    g = torch.Generator().manual_seed(2)
    cos, sin = (torch.randn(B, S, D, generator=g) for _ in range(2))
    options = FP8AttentionOptions(qk_scales="block", v_scales="block", **{"hadamard": "none", **extra})
    for v_keys in (False, True):
        got = quantize_qkv_fp8(q, k, v, cos, sin, options=options, v_keys_contiguous=v_keys)
        ref = quantize_qkv_fp8_reference(q, k, v, cos, sin, options=options, v_keys_contiguous=v_keys)
        if options.rotates_qk:  # the rotation's summation order: at most one e4m3 ulp, as the single-pass kernel
            for n in "qkv" if options.rotates_v else "qk":
                ulp = (_ordinal(getattr(got, n)) - _ordinal(getattr(ref, n))).abs()
                assert int(ulp.max()) <= 1 and int((ulp > 0).sum()) <= 0.01 * ulp.numel(), n
            if not options.rotates_v:
                assert torch.equal(_codes(got.v), _codes(ref.v))
            torch.testing.assert_close(got.v_block_descale, ref.v_block_descale, rtol=1e-6, atol=0)
        else:
            assert_same_blocks(got, ref)
    assert len(calls) == 2


@kernel_test
@pytest.mark.parametrize("heads_fastest", [True, False])
def test_single_pass_kernel_item_orders(heads_fastest, monkeypatch):
    """Both item orders of the single-pass kernel (heads of a row tile first, or row tiles of a head first)
    write the same codes and block descales as the reference, packed sequences of unequal lengths included."""
    import hf_fp8_attention.quantization.qkv as qkv

    monkeypatch.setattr(qkv, "_BLOCK_HEADS_FASTEST", heads_fastest)
    q, k, v = make_qkv(2, 4, 2, 300, 300, 64, torch.bfloat16, seed=7)
    v[:, :, 200] *= 60
    got = quantize_qkv_fp8(q, k, v, options=BLOCK_QKV, v_keys_contiguous=True)
    assert_same_blocks(got, quantize_qkv_fp8_reference(q, k, v, options=BLOCK_QKV, v_keys_contiguous=True))
    lengths = [130, 7, 260]
    qp, kp, vp, cu = packed_gqa(lengths, 1)
    args = (qp, kp, vp, cu, cu, 260, 260)
    got = quantize_qkv_fp8_varlen(*args, options=BLOCK_QKV)
    assert_same_blocks(got, quantize_qkv_fp8_varlen_reference(*args, options=BLOCK_QKV), lengths)


def test_qk_rope_heads_per_program():
    """The tile's heads per program is a maximum: the fewest chunks of at most that many heads, equal but the
    last, covering every head once."""
    from hf_fp8_attention.quantization.qkv import _heads_per_program

    assert [_heads_per_program(n, 20) for n in (40, 64, 72, 24, 16, 9, 1)] == [20, 16, 18, 12, 16, 9, 1]
    assert [_heads_per_program(n, 8) for n in (40, 64, 9, 3)] == [8, 8, 5, 3]
    for n in range(1, 130):
        for most in (1, 4, 8, 16, 20):
            h = _heads_per_program(n, most)
            chunks = -(-n // h)
            assert h <= most and chunks == -(-n // most) and (chunks - 1) * h < n <= chunks * h


@kernel_test
@pytest.mark.parametrize("D", [128, 64], ids=["d128-v-apart", "d64-v-in-launch"])
def test_qk_rope_kernel_varlen(D):
    """Packed sequences sharing one cu_seqlens tensor take the q/k RoPE kernel (D=64's tile quantizes V in the
    same launch, D=128's apart); two equal but distinct tensors take the single-pass kernel's RoPE path; both
    equal the reference."""
    import hf_fp8_attention.quantization.qkv as qkv

    assert (qkv._ROPE_TILES[D // 2][5] in (qkv.V_AFTER, qkv.V_FIRST)) == (D == 64)  # which V path each case covers
    lengths = [37, 5, 90]
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    qp, kp, vp = (torch.randn(total, h, D, generator=g).bfloat16() for h in (4, 2, 2))
    cos, sin = (torch.randn(1, total, D, generator=g) for _ in range(2))
    cu = torch.tensor([0, 37, 42, 132], dtype=torch.int32)
    calls = []
    real = qkv._launch_qk_rope
    qkv_launch = qkv._launch_qk_rope
    try:
        qkv._launch_qk_rope = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        for cu_k, n_calls in ((cu, 1), (cu.clone(), 1)):
            args = (qp, kp, vp, cu, cu_k, 90, 90)
            got = quantize_qkv_fp8_varlen(*args, cos, sin, options=BLOCK_QKV, v_keys_contiguous=True)
            ref = quantize_qkv_fp8_varlen_reference(*args, cos, sin, options=BLOCK_QKV, v_keys_contiguous=True)
            assert_same_blocks(got, ref, lengths)
            assert len(calls) == n_calls
    finally:
        qkv._launch_qk_rope = qkv_launch


@kernel_test
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_single_pass_kernel_hadamard_varlen_and_nonfinite():
    # Hadamard on q/k/v: the same codes up to the rotation's summation order (at most one e4m3 ulp)
    q, k, v = make_qkv(1, 4, 2, 150, 150, 128, torch.bfloat16, seed=4)
    options = FP8AttentionOptions(hadamard="qkv", qk_scales="block", v_scales="block")
    got, ref = (f(q, k, v, options=options) for f in (quantize_qkv_fp8, quantize_qkv_fp8_reference))
    for n in "qkv":
        ulp = (_ordinal(getattr(got, n)) - _ordinal(getattr(ref, n))).abs()
        assert int(ulp.max()) <= 1 and int((ulp > 0).sum()) <= 0.01 * ulp.numel(), n
    assert got.v_rotated and ref.v_rotated
    for n in ("q", "k", "v"):
        torch.testing.assert_close(getattr(got, f"{n}_block_descale"), getattr(ref, f"{n}_block_descale"),
                                   rtol=1e-5, atol=0)
    # packed sequences, one longer than a V block; int8 Q/K
    lengths = [37, 5, 140]
    qp, kp, vp, cu = packed_gqa(lengths, 0)
    args = (qp, kp, vp, cu, cu, 140, 140)
    for v_keys in (False, True):
        got = quantize_qkv_fp8_varlen(*args, options=INT8_BLOCK_V, v_keys_contiguous=v_keys)
        ref = quantize_qkv_fp8_varlen_reference(*args, options=INT8_BLOCK_V, v_keys_contiguous=v_keys)
        assert_same_blocks(got, ref, lengths)
    # non-finite inputs stay in their rows: NaN codes (e4m3) / a NaN block descale (int8 Q), finite other blocks
    q, k, v = make_qkv(1, 2, 2, 140, 140, 64, torch.bfloat16, seed=5)
    v[0, 0, 5, 3] = float("inf")
    q[0, 1, 130, 0] = float("nan")
    got = quantize_qkv_fp8(q, k, v, options=INT8_BLOCK_V)
    ref = quantize_qkv_fp8_reference(q, k, v, options=INT8_BLOCK_V)
    assert_same_blocks(got, ref)
    assert _fp8_bytes(got.v)[0, 5, 0, 3] == 0x7F and torch.isfinite(got.v_block_descale).all()
    assert torch.isnan(got.q_block_descale[0, 1, 130 // SCALE_BLOCK])
    assert int(torch.isnan(got.q_block_descale).sum()) == 1


@kernel_test
@pytest.mark.parametrize("options", [BLOCK_QKV, INT8_BLOCK_V], ids=["e4m3", "int8"])
@pytest.mark.parametrize("s_q,s_kv,causal,config", [
    (40, 40, True, {"BLOCK_M": 16, "BLOCK_N": 32}),
    # several key tiles per V block, masked and unmasked, and a tile of the next block
    (24, 300, False, {"BLOCK_M": 32, "BLOCK_N": 64}),
    (24, 300, True, {"BLOCK_M": 32, "BLOCK_N": 128}),
    # decode: split boundaries inside V blocks, partials combined without a per-head descale
    (1, 300, True, {"BLOCK_M": 16, "BLOCK_N": 32, "num_splits": 4}),
])
def test_triton_attention_v_block_scales_track_reference(s_q, s_kv, causal, config, options):
    q, k, v = small_gqa(s_q, s_kv)
    v[:, :, 130:200] *= 300  # a loud stretch: per-block V descales that differ 300x between tiles
    got, ref = triton_and_reference(q, k, v, options, causal, config)
    assert sqnr_db(got, ref) > 30
    # the reference itself against float64 attention on the bf16 inputs (bottom-right causal mask)
    mask = torch.ones(s_q, s_kv, dtype=torch.bool).tril(s_kv - s_q) if causal else None
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=0.125, enable_gqa=True).transpose(1, 2)
    assert sqnr_db(ref.double(), exact) > 25


@kernel_test
@pytest.mark.parametrize("options", [BLOCK_QKV, INT8_BLOCK_V], ids=["e4m3", "int8"])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_attention_v_block_scales_varlen(options, causal):
    """Packed sequences (one longer than a V block) in one launch, keys-contiguous V: each sequence's output
    equals the reference backend's on that sequence alone (`QuantizedQKV.sequences`)."""
    from hf_fp8_attention.backends.reference import reference_fp8_attention
    from hf_fp8_attention.backends.triton import _launch

    lengths = [37, 200, 140]
    qp, kp, vp, cu = packed_gqa(lengths, 2)
    vp[150:170] *= 300
    qkv = quantize_qkv_fp8_varlen(qp, kp, vp, cu, cu, 200, 200, options=options, v_keys_contiguous=True)
    got = _launch(qkv, causal, 0.125, torch.float32, config={"BLOCK_M": 32, "BLOCK_N": 64})
    for i, part in enumerate(qkv.sequences()):
        ref = reference_fp8_attention(part, is_causal=causal, scale=0.125, out_dtype=torch.float32)
        assert sqnr_db(got[:, cu[i]:cu[i + 1]], ref) > 30, i


@pytest.mark.parametrize("s", [256, 4096], ids=["short", "long"])
def test_v_block_scales_gain_on_a_huge_v_token(s):
    """The last token's V x10^4 (a massive activation): with causal attention no earlier query sees it, but a
    per-head V scale pushes every earlier token's V into e4m3's subnormals; per-block V scales keep them.
    Gaussian inputs: no loss. Reference backend (the GPU kernels' rounding), SQNR of the rows before the loud
    token against float64 attention."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, s, 2, 128, generator=g).transpose(1, 2) for _ in range(3))
    scores = {}
    for family in ("huge_v_token", "gaussian"):
        vv = v.clone()
        if family == "huge_v_token":
            vv[:, :, -1] *= 1e4
        qb, kb, vb = (t.bfloat16() for t in (q, k, vv))
        exact = torch.nn.functional.scaled_dot_product_attention(qb.double(), kb.double(), vb.double(),
                                                                 is_causal=True)[:, :, :-1]
        kw = dict(is_causal=True, backend="reference", hadamard="none", qk_scales="block")
        head, block = (fp8_sdpa(qb, kb, vb, v_scales=vs, **kw)[:, :, :-1].double() for vs in ("head", "block"))
        scores[family] = (sqnr_db(block, exact), sqnr_db(head, exact))
    assert scores["huge_v_token"][0] > scores["huge_v_token"][1] + 1.0, scores  # measured +1.7 dB at S=256
    assert scores["huge_v_token"][0] > 20.0, scores
    assert scores["gaussian"][0] > scores["gaussian"][1] - 0.3, scores
    assert scores["gaussian"][0] > 20.0, scores


def test_v_block_scales_options_and_backend_choice(monkeypatch):
    q = torch.randn(1, 2, 8, 64).bfloat16()
    with pytest.raises(ValueError, match="accepted values"):
        FP8AttentionOptions(qk_scales="block", v_scales="token")
    with pytest.raises(ValueError, match="needs per-block Q/K scales"):
        fp8_sdpa(q, q, q, v_scales="block")
    with pytest.raises(ValueError, match="smooth_v=True cannot be combined"):
        fp8_sdpa(q, q, q, qk_scales="block", v_scales="block", smooth_v=True)
    with pytest.raises(ValueError, match="v_scales='block'.*triton"):
        fp8_sdpa(q, q, q, backend="fa3", qk_format="int8", v_scales="block")
    # smooth_v="auto" stays off (the reference backend would centre V from 32k keys)
    assert BLOCK_QKV.for_keys("reference", 1 << 16).smooth_v is False
    assert FP8AttentionOptions(qk_scales="block").for_keys("reference", 1 << 16).smooth_v is True
    assert FP8AttentionOptions.of(qk_scales="block", v_scales="block") == BLOCK_QKV
    import hf_fp8_attention.dispatch as dispatch

    monkeypatch.setattr(dispatch, "kernel_available", lambda name: True)
    monkeypatch.setenv(dispatch.ARCH_ENV, "90")
    assert dispatch.plan_attention(torch.device("cuda"), None, BLOCK_QKV).backend == "triton"
    # int8 Q/K with V block scales (refused on CUDA in session 15 until its V store was checked there)
    assert dispatch.plan_attention(torch.device("cuda"), "triton", INT8_BLOCK_V).backend == "triton"
    # end to end on CPU (reference backend): the output is attention
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 200, 64, generator=g).bfloat16() for _ in range(3))
    out = fp8_sdpa(q, k, v, is_causal=True, qk_format="int8", v_scales="block")
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert out.shape == q.shape and sqnr_db(out.double(), exact) > 25


def test_prepare_model_takes_v_scales():
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_fp8_attention as hfa

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)).bfloat16().eval()
    ids = torch.randint(0, 64, (1, 150))  # more than one V block
    with torch.no_grad():
        ref = model(ids).logits.float()
    with pytest.raises(ValueError, match="kv_cache"):
        hfa.prepare_model(model, qk_format="int8", v_scales="block", kv_cache="fp8")
    hfa.prepare_model(model, qk_format="int8", v_scales="block")
    assert "v_scales=block" in hfa.describe_backend(model)
    with torch.no_grad():
        out = model(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    hfa.unprepare_model(model)


def test_varlen_rope_passes_one_offsets_tensor(monkeypatch):
    """fp8_sdpa_varlen with fused RoPE checks the query and key offsets equal and then hands one tensor for both
    to the pipeline (what lets the quantizer take its q/k RoPE kernel); without RoPE each keeps its own."""
    import hf_fp8_attention.sdpa as sdpa_module
    from hf_fp8_attention import fp8_sdpa_varlen

    seen = []
    real = sdpa_module._run
    monkeypatch.setattr(sdpa_module, "_run", lambda q, k, v, varlen, *a: seen.append(varlen) or real(q, k, v, varlen, *a))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(50, h, 64, generator=g).bfloat16() for h in (4, 2, 2))
    cos, sin = (t[0] for t in make_rope(1, 50, 64, torch.bfloat16))
    cu_q, cu_k = torch.tensor([0, 20, 50], dtype=torch.int32), torch.tensor([0, 20, 50], dtype=torch.int32)
    with_rope = fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, cos=cos[None], sin=sin[None],
                                backend="reference", qk_scales="block", v_scales="block")
    fp8_sdpa_varlen(q, k, v, cu_q, cu_k, is_causal=True, backend="reference", qk_scales="block", v_scales="block")
    assert seen[0][0] is seen[0][1] and seen[1][0] is not seen[1][1]
    assert torch.isfinite(with_rope).all()
