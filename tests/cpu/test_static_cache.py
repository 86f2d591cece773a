"""`FP8StaticCache` on CPU: the static layer (its length a device tensor, read by the kernels) against
`FP8CacheLayer` on the torch implementation and the Triton interpreter, its Cache operations, and a prepared
model: eager, `torch.compile(fullgraph=True)` and generate(cache_implementation="static")."""

from __future__ import annotations

import math

import pytest
import torch
from cache_steps import static_and_dynamic_step
from transformers import LlamaConfig, MistralConfig, StaticCache

import hf_fp8_attention as hfa
from hf_fp8_attention._constants import KV_BLOCK
from hf_fp8_attention.kv_cache import FP8CacheLayer, FP8StaticCache, FP8StaticCacheLayer, ops
from hf_fp8_attention.transformers.masks import _static_causal_mask
from hf_fp8_attention.transformers.model import _cache_kwarg

D = 64


def _rope(n: int, offset: int, dtype=torch.float16):
    pos = torch.arange(offset, offset + n).float()
    inv = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
    emb = torch.cat([pos[:, None] * inv[None]] * 2, dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _same_storage(a: FP8CacheLayer, b: FP8StaticCacheLayer) -> None:
    n, nb = a.length, math.ceil(a.length / KV_BLOCK)
    assert int(b.cumulative_length) == n
    for x, y in ((a.k8, b.k8), (a.v8, b.v8)):
        assert torch.equal(x[:, :, :n].view(torch.uint8), y[:, :, :n].view(torch.uint8))
    assert torch.equal(a.k_desc[:, :, :nb], b.k_desc[:, :, :nb])
    assert torch.equal(a.v_desc[:, :, :nb], b.v_desc[:, :, :nb])


def _run(dyn, st, chunks, seed=3, B=2):
    """The same appends and attention through both layers; the static one always in one step (its first
    chunk included: the cache kernel over the chunk's own keys, what `attend` computes)."""
    gen = torch.Generator().manual_seed(seed)
    length = 0
    for n in chunks:
        k = torch.randn(B, 2, n, D, generator=gen).half()
        v = (torch.randn(B, 2, n, D, generator=gen) + 2).half()
        q = torch.randn(B, n, 8, D, generator=gen).half()
        cos, sin = _rope(n, length)
        got, want = static_and_dynamic_step(dyn, st, q, k, v, cos, sin, scale=D**-0.5)
        length += n
        assert torch.equal(got, want), (n, length, (got.float() - want.float()).abs().max().item())
        _same_storage(dyn, st)


# lengths that cross blocks by one token, land on a block's end, and a chunk of more than one block (its tails
# read from a copy); a capacity of 2000 plans more splits than the short lengths use (empty splits)
CHUNKS = [150, 1, 1, 70, 1, 13, 64, 1, 41, 2]


@pytest.mark.parametrize("impl,capacity", [("torch", 400), ("triton", 400), ("triton", 2000)])
def test_static_layer_equals_the_dynamic_layer(impl, capacity):
    """Outputs and storage bit for bit against `FP8CacheLayer` at every step; the device length follows."""
    _run(FP8CacheLayer(impl=impl), FP8StaticCacheLayer(capacity, impl=impl), CHUNKS)


def test_static_layer_without_rotation():
    _run(FP8CacheLayer(impl="triton", hadamard=False), FP8StaticCacheLayer(300, impl="triton", hadamard=False),
         [100, 1, 30])


def test_write_validation():
    """A long device-length write must read its tails from a copy; too many tokens for the capacity are refused
    (the torch path also refuses an append past the end)."""
    layer = FP8StaticCacheLayer(128, impl="torch")
    layer.append(torch.randn(1, 2, 100, D).half(), torch.randn(1, 2, 100, D).half())
    with pytest.raises(ValueError, match="exceed"):
        layer.append(torch.randn(1, 2, 200, D).half(), torch.randn(1, 2, 200, D).half())
    with pytest.raises(ValueError, match="100 cached"):  # a chunk past the end, checked outside compiled steps
        layer.append(torch.randn(1, 2, 60, D).half(), torch.randn(1, 2, 60, D).half())
    tails = torch.zeros(2, 2, 1, 2, KV_BLOCK, D)
    with pytest.raises(ValueError, match="copy"):
        ops.write_blocks(torch.randn(1, 2, 65, D).half(), torch.randn(1, 2, 65, D).half(), None, None,
                         layer.k8, layer.v8, layer.k_desc, layer.v_desc, tails, tails, 0, impl="triton",
                         rotate=True, device_length=torch.tensor(0))
    with pytest.raises(ValueError, match="max_cache_len"):
        FP8StaticCacheLayer(0)
    with pytest.raises(ValueError, match="do not fit"):
        layer.append_attend(torch.randn(1, 2, 8, D).half(), torch.randn(1, 2, 1, D).half(),
                            torch.randn(1, 2, 1, D).half(), None, None, scale=0.1)


def test_cache_operations():
    """reorder_cache in place (the addresses stay), crop as `FP8CacheLayer.crop` (then appends equal), reset;
    what transformers reads (keys / values: the whole storage, mask sizes, lengths); batch changes refused."""
    dyn, st = FP8CacheLayer(impl="triton"), FP8StaticCacheLayer(300, impl="triton")
    _run(dyn, st, [100, 1, 1])
    ptr = st.k8.data_ptr()
    index = torch.tensor([1, 0])
    st.reorder_cache(index)
    dyn.reorder_cache(index)
    assert st.k8.data_ptr() == ptr
    _same_storage(dyn, st)
    st.crop(-5)
    dyn.crop(-5)
    _same_storage(dyn, st)
    gen = torch.Generator().manual_seed(9)
    k, v = torch.randn(2, 2, 3, D, generator=gen).half(), torch.randn(2, 2, 3, D, generator=gen).half()
    dyn.append(k, v)
    st.append(k, v)
    _same_storage(dyn, st)
    assert st.is_compileable and st.keys is st.k8 and st.keys.shape[2] == 320  # 300 rounded up to a block
    assert st.get_mask_sizes(1) == (300, 0) and st.get_max_length() == 300
    assert int(st.get_seq_length()) == 100  # 102 - 5 + 3
    with pytest.raises(RuntimeError, match="negative"):
        st.crop(10)
    for op in (lambda: st.batch_select_indices(torch.tensor([0])), lambda: st.batch_repeat_interleave(2)):
        with pytest.raises(NotImplementedError, match="batch size"):
            op()
    with pytest.raises(ValueError, match="batch size"):
        st.reorder_cache(torch.tensor([0, 1, 1]))
    with pytest.raises(AttributeError):
        st.keys = torch.zeros(1)
    st.reset()
    assert int(st.get_seq_length()) == 0


def test_static_cache_layers_from_config():
    llama = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=2, intermediate_size=64)
    cache = FP8StaticCache(config=llama, max_cache_len=100)
    assert all(isinstance(layer, FP8StaticCacheLayer) for layer in cache.layers) and cache.is_compileable
    only = FP8StaticCache(config=llama, max_cache_len=100, fp8_layers={1})
    assert [type(layer).__name__ for layer in only.layers] == ["StaticLayer", "FP8StaticCacheLayer", "StaticLayer"]
    mistral = MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=64,
                            sliding_window=32)
    assert not any(isinstance(layer, FP8StaticCacheLayer) for layer in FP8StaticCache(config=mistral,
                                                                                     max_cache_len=100).layers)
    with pytest.raises(ValueError, match="offload"):
        FP8StaticCache(config=llama, max_cache_len=100, offloading=True)


def test_static_causal_mask():
    """A compiled static step's mask: query i sees the slots up to the device length + i that the padding mask
    keeps (4-D, as sdpa takes it), one shape at every length."""
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    got = _static_causal_mask(2, 1, 8, torch.tensor(4), pad)
    want = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)[:, None, None]
    assert torch.equal(got, want)
    two = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(_static_causal_mask(1, 2, 6, torch.tensor(1), None), two[None, None])


def _tiny_llama(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def test_prepared_model_with_the_static_cache():
    """Prefill 90 then 6 decode steps: the static cache gives the dynamic FP8 cache's logits bit for bit
    (reference backend), eagerly and through `torch.compile(fullgraph=True)` (aot_eager: CPU); generate with
    cache_implementation="static" gets an FP8StaticCache and the dynamic cache's tokens, also with the
    decode step compiled and with beam search; a padded batch is refused; unprepare_model removes the mask override."""
    from transformers.generation import CompileConfig

    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 90), generator=torch.Generator().manual_seed(0))
    hfa.prepare_model(model, backend="reference", kv_cache="fp8")
    name = _cache_kwarg(model)

    def steps(cache, forward):
        with torch.no_grad():
            out = [model(ids, use_cache=True, **{name: cache}).logits[:, -1]]
            for t in range(6):
                out.append(forward(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}).logits[:, -1])
        return torch.stack(out, 1)

    dynamic = steps(hfa.FP8Cache(config=model.config), model)
    static = steps(FP8StaticCache(config=model.config, max_cache_len=128), model)
    assert torch.equal(static, dynamic)
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    assert torch.equal(steps(FP8StaticCache(config=model.config, max_cache_len=128), compiled), dynamic)

    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True)
    want = model.generate(ids, **kw)["sequences"]
    out = model.generate(ids, cache_implementation="static", **kw)
    assert isinstance(out.get("cache", out.get("past_key_values")), FP8StaticCache)
    assert torch.equal(out["sequences"], want)
    config = CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True  # generate compiles on GPUs only unless told
    assert torch.equal(model.generate(ids, cache_implementation="static", compile_config=config, **kw)["sequences"],
                       want)
    beams = {**kw, "num_beams": 3, "return_dict_in_generate": False}  # reorder_cache in place, batch 2 x 3
    assert torch.equal(model.generate(ids, cache_implementation="static", **beams), model.generate(ids, **beams))
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, cache_implementation="static", **{**kw, "attention_mask": padded})
    hfa.unprepare_model(model)
    assert "create_masks_for_generate" not in model.__dict__
    out = model.generate(ids, cache_implementation="static", **kw)
    assert type(out.get("cache", out.get("past_key_values"))) is StaticCache


def _steps(model, cache, forward, ids, n=3):
    name = _cache_kwarg(model)
    with torch.no_grad():
        out = [model(ids, use_cache=True, **{name: cache}).logits[:, -1]]
        for t in range(n):
            out.append(forward(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}).logits[:, -1])
    return torch.stack(out, 1).float()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_compiled_steps_of_layers_off_the_fused_path():
    """While compiling, a static cache's mask is the 4-D causal one over the filled slots: layers that are not
    the FP8 static cache's fused ones (a bf16 StaticLayer next to fp8 layers, or transformers' own
    StaticCache under fp8 attention) run it in bf16 and stay right (they once got a 2-D mask that the
    adapter aligned at the cache's last slot: zero attention). Compiled tokens equal eager ones."""
    from transformers.generation import CompileConfig

    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    model = _tiny_llama()
    hfa.prepare_model(model, backend="reference", kv_cache="fp8")
    compiled = torch.compile(model.forward, backend="aot_eager")
    eager = _steps(model, FP8StaticCache(config=model.config, max_cache_len=128, fp8_layers={1}), model, ids)
    got = _steps(model, FP8StaticCache(config=model.config, max_cache_len=128, fp8_layers={1}), compiled, ids)
    assert _cos(got, eager) > 0.999, _cos(got, eager)  # fp8 (eager adapter) vs bf16 (compiled) in layer 0
    torch._dynamo.reset()
    model = _tiny_llama()
    hfa.prepare_model(model, backend="reference", kv_cache="bf16")  # transformers' caches, fp8 attention
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    config = CompileConfig(backend="aot_eager")
    config._compile_all_devices = True
    assert torch.equal(model.generate(ids, compile_config=config, **kw), model.generate(ids, **kw))


def test_generic_path_and_padding():
    """An unprepared sdpa model with an FP8StaticCache of a length that is not a multiple of a block: the
    generic `update` hands back max_cache_len slots (what the mask announces), logits close to transformers'
    StaticCache. A prepared model refuses a padded batch at its first chunk, called directly."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    want = _steps(model, StaticCache(config=config, max_cache_len=100), model, ids)
    got = _steps(model, FP8StaticCache(config=config, max_cache_len=100, impl="torch"), model, ids)
    assert _cos(got, want) > 0.999, _cos(got, want)
    model = _tiny_llama()
    hfa.prepare_model(model, backend="reference", kv_cache="fp8")
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask, use_cache=True,
              **{_cache_kwarg(model): FP8StaticCache(config=model.config, max_cache_len=64)})
