"""`FP8StaticCache` on the GPU: the static layer (length on the device) against `FP8CacheLayer` at real
sizes, one CUDA graph replayed across lengths, and transformers' compiled generate with it."""

from __future__ import annotations

import math

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a CUDA GPU with fp8 (SM 8.9+)", allow_module_level=True)

import hf_fp8_attention as hfa  # noqa: E402
from hf_fp8_attention.kv_cache import FP8CacheLayer, FP8StaticCacheLayer  # noqa: E402
from cache_steps import static_and_dynamic_step  # noqa: E402

DEV = "cuda"
H_Q, H_KV, D = 32, 8, 128


def _rope(n, offset, dim, dtype=torch.bfloat16):
    pos = torch.arange(offset, offset + n, device=DEV).float()
    inv = 500000.0 ** (-torch.arange(0, dim, 2, device=DEV).float() / dim)
    emb = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _tokens(B, n, gen):
    q = torch.randn(B, n, H_Q, D, device=DEV, generator=gen).bfloat16() * 2
    k = torch.randn(B, H_KV, n, D, device=DEV, generator=gen).bfloat16()
    v = (torch.randn(B, H_KV, n, D, device=DEV, generator=gen) + 1).bfloat16()
    return q, k, v


def _same_storage(a: FP8CacheLayer, b: FP8StaticCacheLayer, n: int) -> None:
    nb = math.ceil(n / 64)
    for x, y in ((a.k8, b.k8), (a.v8, b.v8)):
        assert torch.equal(x[:, :, :n].view(torch.uint8), y[:, :, :n].view(torch.uint8))
    assert torch.equal(a.k_desc[:, :, :nb], b.k_desc[:, :, :nb])
    assert torch.equal(a.v_desc[:, :, :nb], b.v_desc[:, :, :nb])


def _close(got, want):
    """The static launch plans its splits from the capacity and sizes them from the length as the dynamic
    launcher does (the same split boundaries); its wide combine may take the 128-split variant where the
    dynamic one takes 16 (tree sums in another order): equal up to the output's bf16 rounding."""
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=2e-3)


@pytest.mark.parametrize("B", [1, 8])
def test_static_layer_tracks_the_dynamic_layer(B):
    """Prefill 700, 70 decode steps (across block boundaries), a 100-token chunk (> one block: tails read from
    a copy), 5 more steps, in a static layer of 20000 tokens: storage bit for bit, outputs as the dynamic
    layer's, and the device length follows."""
    gen = torch.Generator(device=DEV).manual_seed(B)
    dyn, st = FP8CacheLayer(impl="triton"), FP8StaticCacheLayer(20000, impl="triton")
    length = 0
    for n in [700] + [1] * 70 + [100] + [1] * 5:
        q, k, v = _tokens(B, n, gen)
        cos, sin = _rope(n, length, D)
        got, want = static_and_dynamic_step(dyn, st, q, k, v, cos, sin, scale=D**-0.5)
        length += n
        _close(got, want)
    assert int(st.cumulative_length) == length
    _same_storage(dyn, st, length)


def test_one_cuda_graph_serves_every_length():
    """One decode step of the static layer captured in a CUDA graph at length 4000, replayed for 150 steps
    (new tokens copied into the captured inputs; RoPE tables too): each replay's output tracks the dynamic
    layer's eager step at that length, and the storage equals its bit for bit."""
    B = 2
    gen = torch.Generator(device=DEV).manual_seed(5)
    dyn, st = FP8CacheLayer(impl="triton"), FP8StaticCacheLayer(8192, impl="triton")
    warm = FP8StaticCacheLayer(8192, impl="triton")  # the same geometry: compiles the kernels before capture
    q, k, v = _tokens(B, 4000, gen)
    cos, sin = _rope(4000, 0, D)
    for layer in (dyn, st, warm):
        layer.append(k, v, cos, sin)
    q_in, k_in, v_in = _tokens(B, 1, gen)
    cos_in, sin_in = _rope(1, 4000, D)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm.append_attend(q_in, k_in, v_in, cos_in, sin_in, scale=D**-0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run: the layer still holds 4000 tokens
        out = st.append_attend(q_in, k_in, v_in, cos_in, sin_in, scale=D**-0.5)
    assert int(st.cumulative_length) == 4000
    for step in range(150):
        q, k, v = _tokens(B, 1, gen)
        cos, sin = _rope(1, 4000 + step, D)
        for dst, src in ((q_in, q), (k_in, k), (v_in, v), (cos_in, cos), (sin_in, sin)):
            dst.copy_(src)
        graph.replay()
        want = dyn.append_attend(q, k, v, cos, sin, scale=D**-0.5)
        _close(out, want)
    torch.cuda.synchronize()
    assert int(st.cumulative_length) == dyn.length == 4150
    _same_storage(dyn, st, dyn.length)


@pytest.mark.parametrize("B, n", [(1, 5000), (2, 777)])
def test_static_attention_tma_opt_in(B, n, monkeypatch):
    """The static cache's attention (device length) with config "tma": K/V tensor descriptors are built
    (never by default, `ops.STATIC_TMA_DEFAULT`), and the output tracks the pointer loads' (the same operands:
    at most 1% of outputs differ, by <= 1e-2, as `test_tma_loads_track_plain_loads` allows) and the dynamic
    layer's at the same length."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from hf_fp8_attention.kv_cache import ops

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90+")
    gen = torch.Generator(device=DEV).manual_seed(n)
    dyn, st = FP8CacheLayer(impl="triton"), FP8StaticCacheLayer(n + 64, impl="triton")
    q, k, v = _tokens(B, n, gen)
    cos, sin = _rope(n, 0, D)
    dyn.append(k, v, cos, sin)
    st.append(k, v, cos, sin)
    q1 = q[:, -1:]
    c1, s1 = cos[:, -1:], sin[:, -1:]
    before = st.cumulative_length - 1  # the query is the last cached token
    built = []
    real = TensorDescriptor.from_tensor  # (a staticmethod in Triton 3.6)
    monkeypatch.setattr(TensorDescriptor, "from_tensor",
                        staticmethod(lambda *a, **kw: built.append(1) or real(*a, **kw)))

    def attend(config):
        return ops.cache_attention(q1, c1, s1, st.k8, st.k_desc, st.v8, st.v_desc, st.k8.shape[2],
                                   scale=D**-0.5, impl="triton", rotate=st.rotate, config=config,
                                   device_length=before)

    pointer = attend(None)
    assert not built, "the static attention built tensor descriptors by default"
    tma = attend({"tma": True})
    assert len(built) == 2, "config tma did not build the K/V tensor descriptors"
    assert torch.isfinite(tma).all()
    assert (tma != pointer).float().mean().item() <= 0.01
    torch.testing.assert_close(tma, pointer, rtol=1e-2, atol=1e-2)
    _close(pointer, dyn.attend(q1, c1, s1, scale=D**-0.5))


def test_compiled_generate_with_the_static_fp8_cache():
    """generate(cache_implementation="static") on a model prepared with kv_cache="fp8": the cache is an
    FP8StaticCache, the decode step is compiled (fullgraph; transformers' default mode: reduce-overhead, CUDA
    graphs), and its 40 tokens' logits are as close to bf16 attention's (teacher-forced over the same tokens)
    as fp8 attention without a cache gets (cosine, within 2e-4); a padded batch is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 300), device=DEV)
    hfa.prepare_model(model, backend="triton", kv_cache="fp8")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40, do_sample=False,
              return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    dyn = model.generate(ids, **kw)
    from transformers.generation import CompileConfig

    static = model.generate(ids, cache_implementation="static", compile_config=CompileConfig(fullgraph=True), **kw)
    cache = static.get("cache", static.get("past_key_values"))
    assert isinstance(cache, hfa.FP8StaticCache), type(cache)
    assert getattr(model, "_compiled_call", None) is not None  # generate compiled the decode step
    # teacher-forced over the static run's tokens: bf16 attention (the reference) and fp8 without a cache
    full = static["sequences"]
    got = torch.stack(static["logits"], 1).float()
    with torch.no_grad():
        hfa.unprepare_model(model)
        bf16 = model(full[:, :-1]).logits[:, 299:].float()
        hfa.prepare_model(model, backend="triton")
        no_cache = model(full[:, :-1]).logits[:, 299:].float()
        hfa.prepare_model(model, backend="triton", kv_cache="fp8")
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()  # noqa: E731
    assert cos(got, bf16) >= cos(no_cache, bf16) - 2e-4, (cos(got, bf16), cos(no_cache, bf16))
    assert dyn["sequences"].shape == full.shape
    with pytest.raises(ValueError, match="padded"):
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        model.generate(ids, **{**kw, "attention_mask": mask, "max_new_tokens": 2, "min_new_tokens": 2},
                       cache_implementation="static")
