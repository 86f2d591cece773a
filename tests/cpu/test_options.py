"""FP8AttentionOptions: validated once (values and types), derived flags, dict round trip; the public
keyword arguments build it and reject what it rejects."""

import pytest
import torch

from hf_fp8_attention import FP8AttentionOptions, fp8_sdpa, fp8_sdpa_varlen


def test_defaults_and_derived_flags():
    o = FP8AttentionOptions()
    assert (o.hadamard, o.smooth_k, o.smooth_v, o.qk_scales) == ("auto", False, "auto", "head")
    assert not o.block_scales and o.changed() == {}
    with pytest.raises(ValueError, match="for_keys"):
        o.smooths  # smooth_v="auto" means nothing before the backend and the key length are known
    assert not o.for_head_dim(128).smooths  # the quantizers called directly: off
    with pytest.raises(ValueError, match="for_head_dim"):
        o.rotates_qk  # "auto" means nothing before the head dim is known
    # "auto": "qk" on power-of-two head dims <= 256 with per-head e4m3 Q/K scales, else "none"
    assert [o.for_head_dim(d).hadamard for d in (64, 96, 128, 256, 512)] == ["qk", "none", "qk", "qk", "none"]
    assert FP8AttentionOptions(qk_format="int8").for_head_dim(128).hadamard == "none"
    assert FP8AttentionOptions(qk_scales="block").for_head_dim(128).hadamard == "none"
    assert FP8AttentionOptions(hadamard="none").for_head_dim(128).hadamard == "none"
    assert FP8AttentionOptions(hadamard="none").changed() == {"hadamard": "none"}
    o = FP8AttentionOptions(hadamard="qkv", smooth_v=True, qk_scales="block")
    assert o.rotates_qk and o.rotates_v and o.block_scales and o.smooths
    assert o.changed() == {"hadamard": "qkv", "smooth_v": True, "qk_scales": "block"}
    v = FP8AttentionOptions(hadamard="v_only")
    assert v.rotates_v and not v.rotates_qk
    qk = FP8AttentionOptions(hadamard="qk")
    assert qk.rotates_qk and not qk.rotates_v
    assert FP8AttentionOptions(hadamard=None).hadamard == "auto"  # prepare_model's None means the default
    with pytest.raises(Exception):
        o.smooth_k = True  # frozen


def test_smooth_v_auto_resolves_per_call(monkeypatch):
    """smooth_v="auto": on for the backends whose fp8 P.V accumulates over the whole key loop (fa3, fa4, and the
    reference that emulates them) from AUTO_SMOOTH_V_MIN_KEYS keys on; off for triton; explicit values kept."""
    from hf_fp8_attention import options as opts

    o = FP8AttentionOptions()
    n = opts.AUTO_SMOOTH_V_MIN_KEYS
    assert [o.for_keys(b, n).smooth_v for b in ("fa3", "fa4", "reference", "triton")] == [True, True, True, False]
    assert [o.for_keys("fa3", k).smooth_v for k in (n - 1, n, 4 * n)] == [False, True, True]
    assert FP8AttentionOptions(smooth_v=False).for_keys("fa3", 4 * n).smooth_v is False
    assert FP8AttentionOptions(smooth_v=True).for_keys("triton", 1).smooth_v is True
    assert FP8AttentionOptions(smooth_v=None).smooth_v == "auto"
    assert FP8AttentionOptions(smooth_v=False).changed() == {"smooth_v": False}
    # through fp8_sdpa (reference backend, threshold lowered): the default equals explicit smooth_v at and
    # above the threshold and explicit no smooth_v below it, bit for bit
    monkeypatch.setattr(opts, "AUTO_SMOOTH_V_MIN_KEYS", 48)
    g = torch.Generator().manual_seed(0)
    for s_kv, centred in ((32, False), (48, True), (80, True)):
        q = torch.randn(1, 2, 16, 64, generator=g).bfloat16()
        k, v = (torch.randn(1, 2, s_kv, 64, generator=g).bfloat16() for _ in range(2))
        v = v + 3.0
        out = fp8_sdpa(q, k, v, backend="reference")
        assert torch.equal(out, fp8_sdpa(q, k, v, backend="reference", smooth_v=centred)), s_kv
        assert not torch.equal(out, fp8_sdpa(q, k, v, backend="reference", smooth_v=not centred)), s_kv


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"smooth_k": "no"}, TypeError, "smooth_k must be True or False, got 'no'"),
        ({"smooth_v": 1}, TypeError, "smooth_v must be True, False or .auto., got 1"),
        ({"hadamard": "all"}, ValueError, "hadamard='all' is not supported"),
        ({"hadamard": True}, ValueError, "hadamard=True is not supported"),
        ({"qk_scales": "tile"}, ValueError, "qk_scales='tile' is not supported"),
    ],
)
def test_bad_values_and_types(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FP8AttentionOptions(**kwargs)
    q = torch.randn(1, 2, 8, 64).bfloat16()
    with pytest.raises(exc, match=match):  # the public keywords build the same object
        fp8_sdpa(q, q, q, backend="reference", **kwargs)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(exc, match=match):
        fp8_sdpa_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu,
                        backend="reference", **kwargs)


def test_built_and_resolved_options_are_memoized():
    """`FP8AttentionOptions.of` (what fp8_sdpa builds from its keywords on every call) and the per-call
    resolutions return one object per distinct input, equal to what the constructor / an unmemoized
    resolution gives; the memo keys by type too, so 1 (refused) never hits True's entry, and unhashable
    values get the constructor's message."""
    import dataclasses

    from hf_fp8_attention import options as opts

    a = FP8AttentionOptions.of("qk", True, "auto", "head", "e4m3")
    assert a == FP8AttentionOptions("qk", True, "auto", "head", "e4m3")
    assert FP8AttentionOptions.of("qk", True, "auto", "head", "e4m3") is a
    assert FP8AttentionOptions.of() == FP8AttentionOptions()
    with pytest.raises(TypeError, match="smooth_k must be True or False, got 1"):
        FP8AttentionOptions.of("qk", 1, "auto", "head", "e4m3")
    with pytest.raises(ValueError, match=r"hadamard=\['qk'\] is not supported"):
        FP8AttentionOptions.of(["qk"])
    for o in (FP8AttentionOptions(), FP8AttentionOptions(smooth_v=True), FP8AttentionOptions(qk_format="int8")):
        for d in (64, 96, 128):
            r = o.for_head_dim(d)
            assert r is o.for_head_dim(d)
            expect = o if o.smooth_v != "auto" else dataclasses.replace(o, smooth_v=False)
            if expect.hadamard == "auto":
                rot = d in (64, 128) and not o.block_scales
                expect = dataclasses.replace(expect, hadamard=opts.AUTO_HADAMARD if rot else "none")
            assert r == expect, (o, d)
        for backend, n in (("fa3", 1), ("fa3", opts.AUTO_SMOOTH_V_MIN_KEYS), ("triton", 10**6)):
            assert o.for_keys(backend, n) is o.for_keys(backend, n)
    resolved = FP8AttentionOptions().for_head_dim(128).for_keys("fa3", 1)
    assert resolved.for_head_dim(128) is resolved and resolved.for_keys("fa3", 10**6) is resolved
    assert FP8AttentionOptions().for_keys("fa3", opts.AUTO_SMOOTH_V_MIN_KEYS).smooth_v is True
    assert FP8AttentionOptions().for_keys("fa3", opts.AUTO_SMOOTH_V_MIN_KEYS - 1).smooth_v is False


def test_options_memo_follows_the_module_constants(monkeypatch):
    """The resolutions read AUTO_HADAMARD / MAX_HADAMARD_DIM / AUTO_SMOOTH_V_MIN_KEYS: a changed constant is
    not answered from an entry made under the old one."""
    from hf_fp8_attention import options as opts

    o = FP8AttentionOptions()
    assert o.for_head_dim(128).hadamard == "qk" and o.for_keys("fa3", 100).smooth_v is False
    monkeypatch.setattr(opts, "AUTO_HADAMARD", "qkv")
    assert o.for_head_dim(128).hadamard == "qkv"
    monkeypatch.setattr(opts, "MAX_HADAMARD_DIM", 64)
    assert o.for_head_dim(128).hadamard == "none"
    monkeypatch.setattr(opts, "AUTO_SMOOTH_V_MIN_KEYS", 100)
    assert o.for_keys("fa3", 100).smooth_v is True


def test_quantize_constexprs_follow_the_tile_config(monkeypatch):
    """The quantize launch's memoized constexprs take the tile config of the launch (benchmarks and tests
    change `_ONE_TILE_CONFIG` / `_TILE_ELEMS` at run time): BLOCK_S / HALF_BLOCK / num_warps / ONE_TILE are
    those of `_tile_config` now, not of the first launch."""
    from hf_fp8_attention.quantization import qkv

    o = FP8AttentionOptions(hadamard="none", smooth_v=False)
    seen = []
    monkeypatch.setattr(qkv, "qkv_quantize_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        lambda *a, **kw: seen.append(kw))})())
    monkeypatch.setattr(qkv, "_interpreting", lambda: False)
    x = torch.randn(1, 2, 64, 128).bfloat16()
    cos = torch.ones(1, 64, 128)
    for config in (qkv._ONE_TILE_CONFIG, (8192, 8, True)):
        monkeypatch.setattr(qkv, "_ONE_TILE_CONFIG", config)
        qkv.quantize_qkv_fp8(x, x, x, cos, cos, options=o)
        half_block, block_s, num_warps, one_tile = qkv._tile_config(128, True)
        kw = seen[-1]
        assert (kw["HALF_BLOCK"], kw["BLOCK_S"], kw["num_warps"], kw["ONE_TILE"]) == (
            half_block, block_s, num_warps, one_tile), config
    assert seen[0]["BLOCK_S"] != seen[1]["BLOCK_S"]


def test_scale_must_be_a_number_not_a_bool():
    q = torch.randn(1, 2, 8, 64).bfloat16()
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        fp8_sdpa(q, q, q, scale=True, backend="reference")
    out = fp8_sdpa(q, q, q, scale=1, backend="reference")  # an int is a number
    assert torch.isfinite(out).all()


def test_coerce():
    assert FP8AttentionOptions.coerce(None) == FP8AttentionOptions()
    o = FP8AttentionOptions(smooth_k=True)
    assert FP8AttentionOptions.coerce(o) is o
    assert FP8AttentionOptions.coerce(o.as_dict()) == o
    with pytest.raises(ValueError, match=r"unknown fp8 attention option\(s\) \['smoothk'\]"):
        FP8AttentionOptions.coerce({"smoothk": True})
    with pytest.raises(TypeError, match="FP8AttentionOptions or a dict"):
        FP8AttentionOptions.coerce("qkv")


def test_head_dim_check():
    FP8AttentionOptions(hadamard="qkv").check_head_dim(128)
    FP8AttentionOptions(smooth_k=True).check_head_dim(96)
    with pytest.raises(ValueError, match="power-of-two head_dim <= 256, got 96"):
        FP8AttentionOptions(hadamard="v_only").check_head_dim(96)


def test_meta_tensors_get_shapes_without_running():
    """Meta tensors (shape propagation, e.g. accelerate's init_empty_weights tracing) take the op's fake:
    shapes and dtypes, no data access, no notice about the missing GPU."""
    import logging

    m = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    out = fp8_sdpa(m(2, 8, 16, 64), m(2, 2, 16, 64), m(2, 2, 16, 64), is_causal=True, hadamard="qkv")
    assert out.shape == (2, 8, 16, 64) and out.device.type == "meta" and out.dtype == torch.bfloat16
    cu = torch.empty(3, device="meta", dtype=torch.int32)
    out = fp8_sdpa_varlen(m(30, 8, 64), m(30, 2, 64), m(30, 2, 64), cu, cu, is_causal=True)
    assert out.shape == (30, 8, 64) and out.device.type == "meta"
    with pytest.raises(ValueError, match="head_dim 80 is not supported"):
        fp8_sdpa(m(1, 2, 4, 80), m(1, 2, 4, 80), m(1, 2, 4, 80))


def test_unsupported_head_dim_under_compile_names_the_problem():
    """Under torch.compile the validation runs while tracing. Without fullgraph Dynamo falls back to eager at
    the raise, so the caller gets the ValueError itself; with fullgraph=True Dynamo cannot, and its error
    carries the ValueError's message (it used to be worth checking that it does)."""
    q = torch.randn(1, 2, 16, 80).bfloat16()
    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def f(q):
        return fp8_sdpa(q, q, q, backend="reference")

    with pytest.raises(ValueError, match="head_dim 80 is not supported"):
        f(q)

    @torch.compile(backend="eager", fullgraph=True)
    def g(q):
        return fp8_sdpa(q, q, q, backend="reference")

    with pytest.raises(Exception, match="head_dim 80 is not supported by fp8 attention"):
        g(q)
