"""FP8 KV cache on the GPU: write and attention kernels against the torch reference at real sizes (bf16),
error flat in the cache length (V with a channel offset), no recompilation per length, and a prepared model
generating from the cache."""

from __future__ import annotations

import math
import time

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a CUDA GPU with fp8 (SM 8.9+)", allow_module_level=True)

import hf_fp8_attention as hfa  # noqa: E402
from hf_fp8_attention.kv_cache import FP8CacheLayer, kernels  # noqa: E402
from hf_fp8_attention.transformers.model import _cache_kwarg  # noqa: E402

DEV = "cuda"


def _rope(n, offset, dim, dtype=torch.bfloat16):
    pos = torch.arange(offset, offset + n, device=DEV).float()
    inv = 500000.0 ** (-torch.arange(0, dim, 2, device=DEV).float() / dim)
    emb = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _sqnr(x, ref):
    x, ref = x.double(), ref.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((x - ref).pow(2).sum().item(), 1e-300))


def _exact_last(query, cos, sin, layer, scale):
    """float32 attention of rotated queries (the last S_q positions) against the dequantized cache."""
    from hf_fp8_attention.quantization.reference import apply_rope_reference

    q = apply_rope_reference(query.float().transpose(1, 2), cos, sin)
    k, v = (t.float() for t in layer.dequantize())
    g = q.shape[1] // k.shape[1]
    L, S_q = k.shape[2], q.shape[2]
    mask = torch.ones(S_q, L, dtype=torch.bool, device=DEV).tril(L - S_q)
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("hadamard", [None, False])  # None: K rotated (D=128)
def test_write_kernel_equals_reference_bf16(hadamard):
    B, H, D = 2, 8, 128
    kernel, ref = FP8CacheLayer(impl="triton", hadamard=hadamard), FP8CacheLayer(impl="torch", hadamard=hadamard)
    gen = torch.Generator(device=DEV).manual_seed(0)
    length = 0
    for n in (1000, 1, 1, 63, 64, 129, 1):
        k = torch.randn(B, H, n, D, device=DEV, generator=gen).bfloat16() * 4
        v = torch.randn(B, H, n, D, device=DEV, generator=gen).bfloat16() + 3
        cos, sin = _rope(n, length, D)
        kernel.append(k, v, cos, sin)
        ref.append(k, v, cos, sin)
        length += n
    nb = math.ceil(length / 64)
    assert torch.equal(kernel.k_desc[:, :, :nb], ref.k_desc[:, :, :nb])
    assert torch.equal(kernel.v_desc[:, :, :nb], ref.v_desc[:, :, :nb])
    assert torch.equal(kernel.k8[:, :, :length].view(torch.uint8), ref.k8[:, :, :length].view(torch.uint8))
    assert torch.equal(kernel.v8[:, :, :length].view(torch.uint8), ref.v8[:, :, :length].view(torch.uint8))


@pytest.mark.parametrize("s_q", [1, 4, 512])
@pytest.mark.parametrize("shape,hadamard", [((2, 32, 8, 128), None), ((1, 8, 1, 64), None), ((2, 32, 8, 128), False)])
def test_attention_kernel_tracks_reference(s_q, shape, hadamard):
    B, H_q, H_kv, D = shape
    layer = FP8CacheLayer(impl="triton", hadamard=hadamard)
    gen = torch.Generator(device=DEV).manual_seed(1)
    L = 5000
    k = torch.randn(B, H_kv, L, D, device=DEV, generator=gen).bfloat16()
    v = torch.randn(B, H_kv, L, D, device=DEV, generator=gen).bfloat16()
    layer.append(k, v, *_rope(L, 0, D))
    q = torch.randn(B, s_q, H_q, D, device=DEV, generator=gen).bfloat16() * 2
    cos, sin = _rope(s_q, L - s_q, D)
    exact = _exact_last(q, cos, sin, layer, D**-0.5)
    got = layer.attend(q, cos, sin, scale=D**-0.5)
    layer.impl = "torch"
    ref = layer.attend(q, cos, sin, scale=D**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert _sqnr(ref, exact) > 20
    assert _sqnr(got, exact) > _sqnr(ref, exact) - 1.5


def _offset_layer(B, H_kv, L, D, seed):
    """A triton cache layer holding L tokens (K ~ N(0, 1) with RoPE, V ~ N(0, 1) + 3, bf16) and the generator
    that made them (for the queries)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    layer = FP8CacheLayer(impl="triton")
    layer.append(torch.randn(B, H_kv, L, D, device=DEV, generator=gen).bfloat16(),
                 (torch.randn(B, H_kv, L, D, device=DEV, generator=gen) + 3).bfloat16(), *_rope(L, 0, D))
    return layer, gen


def _attend_args(q, layer, L):
    """`ops.cache_attention`'s positional arguments for queries q (B, S_q, H_q, D), the last S_q of the L
    tokens of ``layer`` (un-rotated: RoPE tables for their positions)."""
    s_q, D = q.shape[1], q.shape[3]
    return (q, *_rope(s_q, L - s_q, D), layer.k8, layer.k_desc, layer.v8, layer.v_desc, L)


def test_fused_combine_equals_split_by_split_combine():
    """The fused combine (the last split program of a row tile merges, one launch) gives the split-by-split
    combine kernel's output bit for bit (both without FMA contraction), at 5 and the default splits, and
    leaves its arrival counters at zero."""
    from hf_fp8_attention.kv_cache import ops

    B, H_q, H_kv, D, L = 2, 32, 8, 128, 5000
    layer, gen = _offset_layer(B, H_kv, L, D, seed=4)
    for s_q in (1, 4, 40):
        q = torch.randn(B, s_q, H_q, D, device=DEV, generator=gen).bfloat16() * 2
        args = _attend_args(q, layer, L)
        for splits in (5, None):
            fused = ops.cache_attention(*args, scale=D**-0.5, impl="triton", num_splits=splits,
                                        config={"fused_combine": True}, rotate=layer.rotate)
            two = ops.cache_attention(*args, scale=D**-0.5, impl="triton", num_splits=splits,
                                      config={"wide_combine": False, "fused_combine": False}, rotate=layer.rotate)
            assert torch.equal(fused, two), (s_q, splits)
    counters = ops._COUNTERS.get(torch.device(DEV, torch.cuda.current_device()))
    assert counters is not None and not counters.any()


def test_pdl_combine_equals_plain_launch():
    """config "pdl" (the wide combine launched with programmatic dependent launch, waiting on the GPU for the
    attention grid): the plain launch's output bit for bit, eagerly and replayed from a CUDA graph, at 5
    and the default splits (the GPU's; 1x and 8x lengths of decode shapes), S_q 1/4/40, also with
    block_n 128."""
    from hf_fp8_attention.kv_cache import ops

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90+")
    B, H_q, H_kv, D, L = 2, 32, 8, 128, 20000
    layer, gen = _offset_layer(B, H_kv, L, D, seed=7)
    for s_q in (1, 4, 40):
        q = torch.randn(B, s_q, H_q, D, device=DEV, generator=gen).bfloat16() * 2
        args = _attend_args(q, layer, L)
        for splits in (5, None):
            for extra in ({}, {"block_n": 128, "num_stages": 2, "prefetch_desc": False}):
                def run(**config):  # the wide combine (PDL applies to it only)
                    return ops.cache_attention(*args, scale=D**-0.5, impl="triton", num_splits=splits,
                                               config={**extra, "fused_combine": False, **config},
                                               rotate=layer.rotate)

                plain = run()
                _poison_free_memory()  # a combine reading before the partials are stored would read NaN
                assert torch.equal(run(pdl=True), plain), (s_q, splits, extra)
    # CUDA-graph capture and replay of the PDL launches (decode shape, default splits)
    q = torch.randn(B, 1, H_q, D, device=DEV, generator=gen).bfloat16()
    args = _attend_args(q, layer, L)
    pdl = {"pdl": True, "fused_combine": False}
    eager = ops.cache_attention(*args, scale=D**-0.5, impl="triton", config=pdl, rotate=layer.rotate)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.cache_attention(*args, scale=D**-0.5, impl="triton", config=pdl, rotate=layer.rotate)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.cache_attention(*args, scale=D**-0.5, impl="triton", config=pdl, rotate=layer.rotate)
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


def _poison_free_memory(mib: int = 256):
    """Fill a large block with NaN and free it: the caching allocator hands (parts of) it to the next
    allocations, so a workspace read before it is written reads NaN instead of a previous call's values."""
    block = torch.full((mib << 18,), float("nan"), device=DEV)
    del block


def test_tma_loads_track_plain_loads():
    """config "tma" (K/V tiles by TMA through tensor descriptors): the pointer loads' output to the last bit
    of the P.V sums (the operands are the same values; at most 1% of outputs differ, by <= 1e-2), the same
    SQNR against the float32 attention to 0.05 dB, at 5 and the default splits, S_q 1/4, a length that
    ends inside a block (masked last tiles) with NaN codes past it, with block_n 128, the fused combine and
    tile_softmax (the descriptor's block then 256 keys)."""
    from hf_fp8_attention.kv_cache import ops

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90+")
    B, H_q, H_kv, D, L = 2, 32, 8, 128, 20011
    layer, gen = _offset_layer(B, H_kv, L, D, seed=8)
    for codes in (layer.k8, layer.v8):  # past the cache's end: NaN codes, which the masked tiles must not let in
        codes[:, :, L:].view(torch.uint8).fill_(0x7F)
    for s_q in (1, 4):
        q = torch.randn(B, s_q, H_q, D, device=DEV, generator=gen).bfloat16() * 2
        cos, sin = _rope(s_q, L - s_q, D)
        exact = _exact_last(q, cos, sin, layer, D**-0.5)
        args = (q, cos, sin, layer.k8, layer.k_desc, layer.v8, layer.v_desc, L)
        for splits in (5, None):
            for extra in ({"fused_combine": False}, {"block_n": 128, "num_stages": 2, "prefetch_desc": False},
                          {"fused_combine": True}, {"block_n": 256, "tile_softmax": True, "num_stages": 2}):
                def run(**config):
                    return ops.cache_attention(*args, scale=D**-0.5, impl="triton", num_splits=splits,
                                               config={**extra, **config}, rotate=layer.rotate)

                plain, tma = run(), run(tma=True)
                where = (s_q, splits, extra)
                assert torch.isfinite(tma).all(), where
                assert (tma != plain).float().mean().item() <= 0.01, where
                torch.testing.assert_close(tma, plain, rtol=1e-2, atol=1e-2, msg=str(where))
                assert abs(_sqnr(tma, exact) - _sqnr(plain, exact)) < 0.05, where


@pytest.mark.parametrize("config", [dict(block_n=128), dict(block_n=256, num_warps=4, num_stages=2),
                                    dict(block_n=256, tile_softmax=True),
                                    dict(block_n=128, tile_softmax=True, programs_per_sm=16)])
def test_attention_configs_track_reference(config):
    """The sweep's variants (bench_decode.py --sweep) at decode and chunk sizes, GQA 32/8, 5000 keys (not a
    multiple of 256): one-block steps and the fused combine give the default's output bit for bit (same
    launch settings and split count), every variant within 3 dB of the default's SQNR; the fused combine leaves its counters at zero."""
    from hf_fp8_attention.kv_cache import ops

    B, H_q, H_kv, D, L = 2, 32, 8, 128, 5000
    layer, gen = _offset_layer(B, H_kv, L, D, seed=4)
    for s_q in (1, 4, 40):
        q = torch.randn(B, s_q, H_q, D, device=DEV, generator=gen).bfloat16() * 2
        cos, sin = _rope(s_q, L - s_q, D)
        exact = _exact_last(q, cos, sin, layer, D**-0.5)
        args = (q, cos, sin, layer.k8, layer.k_desc, layer.v8, layer.v_desc, L)
        default = ops.cache_attention(*args, scale=D**-0.5, impl="triton", rotate=layer.rotate)
        got = ops.cache_attention(*args, scale=D**-0.5, impl="triton", config=config, rotate=layer.rotate)
        if not config.get("tile_softmax") and not {"programs_per_sm", "num_warps", "num_stages"} & set(config):
            # the same split count (the default's follows each compiled variant's residency)
            same = [ops.cache_attention(*args, scale=D**-0.5, impl="triton", num_splits=5, config=c,
                                        rotate=layer.rotate)
                    for c in (config, {})]
            assert torch.equal(*same), s_q
        assert _sqnr(got, exact) > _sqnr(default, exact) - 3.0, s_q
    counters = ops._COUNTERS.get(torch.device(DEV, torch.cuda.current_device()))
    assert counters is None or not counters.any()


def test_long_cache_error_flat_with_v_offset():
    """Decode from 8k and 64k cached tokens, V = N(0,1) + 3: the output's error against float32 attention
    on the cached values stays within 1 dB (two-level accumulation of P.V in the cache kernel)."""
    B, H_q, H_kv, D = 1, 8, 8, 128
    scores = {}
    for L in (8192, 65536):
        gen = torch.Generator(device=DEV).manual_seed(2)
        layer = FP8CacheLayer(impl="triton")
        k = torch.randn(B, H_kv, L, D, device=DEV, generator=gen).bfloat16()
        v = (torch.randn(B, H_kv, L, D, device=DEV, generator=gen) + 3).bfloat16()
        layer.append(k, v)
        q = torch.randn(B, 16, H_q, D, device=DEV, generator=gen).bfloat16()
        cos, sin = _rope(16, L - 16, D)
        ex = _exact_last(q, cos, sin, layer, D**-0.5)
        scores[L] = _sqnr(layer.attend(q, cos, sin, scale=D**-0.5), ex)
    assert scores[65536] >= scores[8192] - 1.0, scores


def _compiled_variants(fn) -> int:
    if not hasattr(fn, "device_caches"):
        pytest.skip("this triton has no JITFunction.device_caches to count compiled variants")
    return sum(len(entry[0]) for entry in fn.device_caches.values())


def _cache_kernels():
    return (kernels.cache_write_kernel, kernels.cache_attn_kernel, kernels.cache_combine_wide_kernel,
            kernels.cache_combine_kernel)


@pytest.mark.parametrize("config", [None, dict(block_n=256)])
def test_new_lengths_do_not_recompile(config):
    from hf_fp8_attention.kv_cache import ops

    # GQA group 2: no other test of this module compiles the cache kernels for it, so the first call below is
    # the first of this shape class and must build every variant the later lengths need
    B, H_q, H_kv, D = 1, 16, 8, 128
    layer = FP8CacheLayer(impl="triton")
    if config is not None:
        layer.attend = lambda q, cos, sin, scale: ops.cache_attention(
            q, cos, sin, layer.k8, layer.k_desc, layer.v8, layer.v_desc, layer.length, scale=scale, impl="triton",
            config=config, rotate=layer.rotate)
    gen = torch.Generator(device=DEV).manual_seed(3)
    layer.append(torch.randn(B, H_kv, 4000, D, device=DEV, generator=gen).bfloat16(),
                 torch.randn(B, H_kv, 4000, D, device=DEV, generator=gen).bfloat16())
    q = torch.randn(B, 1, H_q, D, device=DEV, generator=gen).bfloat16()
    # the first split call (16 splits at 4000 keys) builds every variant: the split kernel and both wide
    # combines (<= 16 and > 16 splits), so that crossing 16 splits later compiles nothing
    layer.attend(q, None, None, scale=0.1)
    torch.cuda.synchronize()
    before = [_compiled_variants(fn) for fn in _cache_kernels()]
    for extra in (1, 17, 3000, 40000):
        t0 = time.perf_counter()
        layer.append(torch.randn(B, H_kv, extra, D, device=DEV).bfloat16(), torch.randn(B, H_kv, extra, D, device=DEV).bfloat16())
        layer.attend(q, None, None, scale=0.1)
        torch.cuda.synchronize()
        assert time.perf_counter() - t0 < 5.0
    after = [_compiled_variants(fn) for fn in _cache_kernels()]
    assert after == before and before[0] > 0 and before[1] > 0


def test_first_call_builds_wide_combine_in_background(monkeypatch):
    """The first call of a decode geometry that takes the wide combine compiles its two builds in the warm-up
    thread while the attention build compiles, and launches only after them: both variants (<= 16 and > 16
    splits) are built by that call, nothing is left pending, the output equals the one of the serial
    warm-up (CONCURRENT_WARMUP False), and the variants are filed under the cache's device: a later length
    past 16 splits compiles nothing."""
    import threading

    from hf_fp8_attention.kv_cache import ops

    # GQA 3: a geometry no other test of this module builds; 4000 keys: 16 splits (the <= 16 variant), the
    # later 7000: more (the other one)
    B, H_q, H_kv, D, L = 1, 24, 8, 128, 4000
    layer, gen = _offset_layer(B, H_kv, L, D, seed=9)
    q = torch.randn(B, 1, H_q, D, device=DEV, generator=gen).bfloat16()
    cos, sin = _rope(1, L - 1, D)
    threads = []
    real_warm = ops._warm_wide

    def recording(*args):
        threads.append(threading.current_thread().name)
        return real_warm(*args)

    monkeypatch.setattr(ops, "_warm_wide", recording)
    outs = {}
    wide_before = _compiled_variants(kernels.cache_combine_wide_kernel)
    for concurrent in (True, False):
        monkeypatch.setattr(ops, "CONCURRENT_WARMUP", concurrent)
        monkeypatch.setattr(ops, "_RESIDENCY", {})  # a first call again: the warm-up branch runs
        monkeypatch.setattr(ops, "_WIDE_WARMED", set())
        monkeypatch.setattr(ops, "_WIDE_PENDING", {})
        outs[concurrent] = layer.attend(q, cos, sin, scale=D**-0.5)
        assert not ops._WIDE_PENDING
        if concurrent:
            assert _compiled_variants(kernels.cache_combine_wide_kernel) == wide_before + 2
    assert threads[0].startswith("fp8-cache-warmup") and not threads[1].startswith("fp8-cache-warmup"), threads
    assert torch.equal(outs[True], outs[False])
    before = [_compiled_variants(fn) for fn in _cache_kernels()]
    layer.append(torch.randn(B, H_kv, 3000, D, device=DEV, generator=gen).bfloat16(),
                 torch.randn(B, H_kv, 3000, D, device=DEV, generator=gen).bfloat16(), *_rope(3000, L, D))
    layer.attend(q, *_rope(1, L + 2999, D), scale=D**-0.5)  # > 16 splits: the other wide variant
    torch.cuda.synchronize()
    assert [_compiled_variants(fn) for fn in _cache_kernels()] == before


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("backend", ["triton", "fa3"])
def test_prepared_model_generates_from_fp8_cache(backend):
    """Prefill 1200 tokens, a 200-token chunk, 99 decode steps through the FP8 cache: the logits' distance to
    bf16 attention is that of fp8 attention without a cache (the cache adds no visible error), with the
    kernels and with their torch reference on the same GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fp8_attention.kv_cache import FP8Cache

    if backend == "fa3" and not hfa.dispatch.kernel_available("fa3"):
        pytest.skip("FA3 not installed")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 1500), device=DEV)

    name = _cache_kwarg(model)  # "cache" (transformers 5.24) or "past_key_values" (5.17)

    def through(cache):
        first = model(ids[:, :1200], use_cache=True, **{name: cache}).logits[:, -1:]
        chunk = model(ids[:, 1200:1400], use_cache=True, **{name: cache}).logits  # a chunk: fp8 products
        steps = [model(ids[:, t : t + 1], use_cache=True, **{name: cache}).logits for t in range(1400, 1499)]
        return torch.cat([first, chunk, *steps], 1)

    with torch.no_grad():
        eager = model(ids).logits[:, 1199:1499]
        hfa.prepare_model(model, backend=backend)
        no_cache = model(ids).logits[:, 1199:1499]
        hfa.prepare_model(model, backend=backend, kv_cache="fp8")
        kernels_out = through(hfa.new_cache(model))
        torch_out = through(FP8Cache(config=model.config, impl="torch"))
    seg = {"first": slice(0, 1), "chunk": slice(1, 201), "steps": slice(201, 300)}
    report = {f"{name} {part}": round(_cos(x[:, s], eager[:, s]), 6)
              for name, x in (("no-cache", no_cache), ("kernels", kernels_out), ("torch", torch_out))
              for part, s in seg.items()}
    base = _cos(no_cache, eager)
    assert _cos(kernels_out, eager) >= base - 2e-4, report
    assert _cos(torch_out, eager) >= base - 2e-4, report
    out = model.generate(ids[:, :100], max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 108)


@pytest.mark.parametrize("s_q", [1, 4])
def test_append_attend_tracks_append_then_attend(s_q):
    """The model's decode step (`append_attend`: the write launch prepares the queries as the fp16 operand with
    row descales) against `append` then `attend` (the attention kernel prepares them itself): the same
    operations (`_query_halves`) in two kernels whose rotation dots may sum in another order, so equal to the
    output's bf16 rounding; storage (codes, descales) bit for bit."""
    B, H_q, H_kv, D, L = 2, 32, 8, 128, 3000
    gen = torch.Generator(device=DEV).manual_seed(8)
    fused, plain = FP8CacheLayer(impl="triton"), FP8CacheLayer(impl="triton")
    k = torch.randn(B, H_kv, L, D, device=DEV, generator=gen).bfloat16()
    v = torch.randn(B, H_kv, L, D, device=DEV, generator=gen).bfloat16()
    for layer in (fused, plain):
        layer.append(k, v, *_rope(L, 0, D))
    assert fused.rotate
    for step in range(3):
        q = torch.randn(B, s_q, H_q, D, device=DEV, generator=gen).bfloat16() * 2
        k_new = torch.randn(B, H_kv, s_q, D, device=DEV, generator=gen).bfloat16()
        v_new = torch.randn(B, H_kv, s_q, D, device=DEV, generator=gen).bfloat16()
        cos, sin = _rope(s_q, fused.length, D)
        got = fused.append_attend(q, k_new, v_new, cos, sin, scale=D**-0.5)
        plain.append(k_new, v_new, cos, sin)
        want = plain.attend(q, cos, sin, scale=D**-0.5)
        assert got.dtype == torch.bfloat16 and got.shape == q.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)
        n, nb = fused.length, math.ceil(fused.length / 64)
        for a, b in ((fused.k8, plain.k8), (fused.v8, plain.v8)):
            assert torch.equal(a[:, :, :n].view(torch.uint8), b[:, :, :n].view(torch.uint8))
        assert torch.equal(fused.k_desc[:, :, :nb], plain.k_desc[:, :, :nb])
        assert torch.equal(fused.v_desc[:, :, :nb], plain.v_desc[:, :, :nb])


@pytest.mark.parametrize("config", [None, {"tma": True}, {"fused_combine": True}])
def test_direct_launches_equal_the_jit(config, monkeypatch):
    """Decode steps (append_attend, 1x and 2x GQA 32/8, D=128) through the compiled kernels' own launchers
    (`_launch`, after each key's first call) give the outputs and cache bytes of the JIT's launches bit for
    bit, across lengths that cross block and split boundaries; the binder re-checks every direct launch's
    specialization (VERIFY, on in the GPU tests); a query view at an odd offset takes the JIT."""
    from hf_fp8_attention import _launch
    from hf_fp8_attention.kv_cache import ops

    assert _launch.VERIFY
    if config:
        real = ops.cache_attention
        monkeypatch.setattr(ops, "cache_attention", lambda *a, **kw: real(*a, **{**kw, "config": config}))
    H_q, H_kv, D = 32, 8, 128
    for B in (1, 2):
        runs = {}
        for enabled in (False, True):
            monkeypatch.setattr(_launch, "ENABLED", enabled)
            for fn in (kernels.cache_write_kernel, kernels.cache_attn_kernel, kernels.cache_combine_wide_kernel):
                _launch.direct(fn).plans.clear()
            layer, gen = _offset_layer(B, H_kv, 4030, D, seed=21)
            outs = []
            for step in range(70):  # 4030 -> 4100: crosses a 64-key block and a split size
                q = torch.randn(B, 1, H_q, D, device=DEV, generator=gen).bfloat16()
                k = torch.randn(B, H_kv, 1, D, device=DEV, generator=gen).bfloat16()
                v = torch.randn(B, H_kv, 1, D, device=DEV, generator=gen).bfloat16()
                cos, sin = _rope(1, layer.length, D)
                outs.append(layer.append_attend(q, k, v, cos, sin, scale=D**-0.5))
            runs[enabled] = (torch.stack(outs), layer.k8[:, :, : layer.length].clone(),
                             layer.v8[:, :, : layer.length].clone(), layer.k_desc[:, :, : math.ceil(layer.length / 64)],
                             layer.v_desc[:, :, : math.ceil(layer.length / 64)])
            if enabled:
                plans = [len(_launch.direct(fn).plans)
                         for fn in (kernels.cache_write_kernel, kernels.cache_attn_kernel)]
                assert all(p >= 1 for p in plans), plans  # the fast path ran
        for a, b in zip(runs[False], runs[True]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn \
                else torch.equal(a, b)
    # a misaligned query (a view 2 bytes into its storage) is not keyed: the JIT launches it, correctly
    monkeypatch.setattr(_launch, "ENABLED", True)
    layer, gen = _offset_layer(1, H_kv, 4030, D, seed=22)
    buf = torch.randn(H_q * D + 1, device=DEV, generator=gen).bfloat16()
    q = buf[1:].view(1, 1, H_q, D)
    assert q.data_ptr() % 16
    cos, sin = _rope(1, layer.length - 1, D)
    out = layer.attend(q, cos, sin, scale=D**-0.5)
    ref = layer.attend(q.clone(), cos, sin, scale=D**-0.5)
    assert torch.equal(out, ref)
