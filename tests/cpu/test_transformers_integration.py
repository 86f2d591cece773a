"""HF integration on CPU with the reference backend: registration, masks/padding, fallbacks, errors,
prepare_model (fused RoPE, cache off) on tiny random Llama / Qwen2 / Mistral / Qwen3 models.

Tiny models use initializer_range=0.1 instead of the default 0.02: at 0.02 the q.k scores of a random
model are so small that attention is almost uniform (mean entropy 2.89 nats vs 2.93 for uniform at S=48),
so causal masks, padding and RoPE would barely change the logits and a wiring bug could pass. At 0.1 the
mean entropy is ~2.3 nats. Random tiny models have near-tied logits (bf16 vs fp32 *eager* already
disagrees on 2-4% of argmaxes), so argmax agreement is counted where eager's top-1 margin exceeds 0.1 x
the logits' std ("decisive" positions, ~75% of them); cosine similarity is over all logits.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import logging as hf_logging

import hf_fp8_attention as hfa
from hf_fp8_attention import sdpa as hf_sdpa
from hf_fp8_attention import transformers as hft
from hf_fp8_attention.transformers import attention as hf_attention
from hf_fp8_attention.transformers import fallback, fused_rope, masks, model as hf_model, unpad

# Every module of the integration, for spies that must replace a name wherever it was imported.
INTEGRATION_MODULES = (hf_attention, fallback, fused_rope, masks, hf_model, unpad)

NAMES = ("fp8", "fp8_fa3", "fp8_fa4", "fp8_triton", "fp8_reference")
SEQ = 48
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v projections with bias
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),  # window > SEQ: full attention
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),  # q_norm / k_norm before RoPE
}


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.bfloat16, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA 4/2
        head_dim=64,
        vocab_size=128,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).to(dtype).eval()


def logits(model, ids, impl=None, **kwargs):
    if impl is not None:
        model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits.float()


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def decisive_argmax_agreement(ref, got, margin_frac=0.1) -> float:
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > margin_frac * ref.std()
    assert decisive.float().mean() > 0.5, "too few decisive positions to judge argmax agreement"
    return (ref.argmax(-1) == got.argmax(-1))[decisive].float().mean().item()


@pytest.fixture(autouse=True)
def _reset_warnings():
    hf_logging.warning_once.cache_clear()
    yield
    hf_logging.warning_once.cache_clear()


def patch_everywhere(monkeypatch, name: str, replacement) -> list:
    """Replace ``name`` in every integration module that imported it; returns those modules."""
    patched = [m for m in INTEGRATION_MODULES if hasattr(m, name)]
    for module in patched:
        monkeypatch.setattr(module, name, replacement)
    return patched


def test_spies_reach_every_caller(monkeypatch):
    """The modules that call fp8_sdpa / fp8_sdpa_varlen: a spy patched there sees every call."""
    assert patch_everywhere(monkeypatch, "fp8_sdpa", hf_sdpa.fp8_sdpa) == [hf_attention, fused_rope, unpad]
    assert patch_everywhere(monkeypatch, "fp8_sdpa_varlen", hf_sdpa.fp8_sdpa_varlen) == [hf_attention, unpad]


@pytest.fixture
def spy_fp8_sdpa(monkeypatch):
    """Records (S_q, S_kv, fused_rope) of every fp8_sdpa call made by the integration."""
    calls = []
    real = hf_sdpa.fp8_sdpa

    def spy(query, key, value, **kwargs):
        calls.append((query.shape[2], key.shape[2], kwargs.get("cos") is not None))
        return real(query, key, value, **kwargs)

    patch_everywhere(monkeypatch, "fp8_sdpa", spy)
    return calls


def ids_for(batch=2, seq=SEQ, seed=1):
    # No token 0: it is the pad token in the generate tests, and generate masks pad tokens it finds.
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- registration


def test_register_names_and_masks():
    hfa.register()
    hfa.register()  # idempotent
    for name in NAMES:
        assert name in AttentionInterface._global_mapping
        assert name in AttentionInterface().valid_keys()
        assert AttentionMaskInterface._global_mapping[name] is hft.fp8_attention_mask


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="fp8_reference", dtype=torch.bfloat16)
    assert model.config._attn_implementation == "fp8_reference"
    ids = ids_for()
    a = logits(model, ids)
    model.set_attn_implementation("fp8")  # auto backend: reference on CPU
    assert model.config._attn_implementation == "fp8"
    b = logits(model, ids)
    assert torch.equal(a, b)
    assert "reference" in hfa.describe_backend(model)


# ------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_eager(family, spy_fp8_sdpa):
    model = tiny_model(family)
    ids = ids_for()
    ref = logits(model, ids, "eager")
    unfused = logits(model, ids, "fp8_reference")
    assert spy_fp8_sdpa and not any(fused for *_, fused in spy_fp8_sdpa)
    # Measured: cosine 0.996-0.998, decisive argmax agreement 0.94-1.0 over seeds 0-3 (Llama).
    assert cosine(ref, unfused) >= 0.99
    assert decisive_argmax_agreement(ref, unfused) >= 0.9

    spy_fp8_sdpa.clear()
    hfa.prepare_model(model, backend="reference")
    # the fused-RoPE self-check on a 16-token input: the class forward and the fused forward's steps with
    # RoPE done in torch, so both hand fp8_sdpa rotated q/k and no tables
    assert spy_fp8_sdpa == [(16, 16, False), (16, 16, False)]
    spy_fp8_sdpa.clear()
    assert hfa.describe_backend(model).endswith("fused RoPE on 2/2 layers")
    fused = logits(model, ids)
    assert len(spy_fp8_sdpa) == 2 and all(fused for *_, fused in spy_fp8_sdpa)
    assert cosine(ref, fused) >= 0.99
    assert decisive_argmax_agreement(ref, fused) >= 0.9
    # Same fp8 math; the unfused path rounds rotated q/k to bf16 before the e4m3 cast, which moves a few
    # percent of elements by one e4m3 step. Measured logits cosine 0.9983-0.9990.
    assert cosine(unfused, fused) >= 0.997


def test_fused_rope_attention_output_matches_unfused():
    """One attention layer on identical inputs: fused vs unfused differ only by the bf16 rounding of q/k."""
    model = tiny_model("qwen3")
    attn = model.model.layers[1].self_attn
    captured = []
    hook = attn.register_forward_hook(lambda m, a, kw, out: captured.append((a, kw, out[0])), with_kwargs=True)
    logits(model, ids_for(), "fp8_reference")
    hook.remove()
    args, kwargs, unfused = captured[0]
    hfa.prepare_model(model, backend="reference")
    with torch.no_grad():
        fused = attn(*args, **kwargs)[0]
    assert cosine(unfused, fused) >= 0.9995  # measured 0.99981-0.99988


# ------------------------------------------------------------------------------------------- prepare_model


def test_prepare_model_cache_off_and_unprepare_restores():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    assert model.config.use_cache and model.generation_config.use_cache
    ids = ids_for()
    before = logits(model, ids)
    hfa.prepare_model(model, backend="reference")
    assert model.config._attn_implementation == "fp8_reference"
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    hfa.unprepare_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is True and model.generation_config.use_cache is True
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(logits(model, ids), before)
    assert "not enabled" in hfa.describe_backend(model)
    hfa.unprepare_model(model)  # no-op when not prepared


def test_fused_rope_does_not_leak_to_other_models():
    attention_cls = type(tiny_model().model.layers[0].self_attn)
    class_forward = attention_cls.forward
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    first.set_attn_implementation("fp8_reference")
    second.set_attn_implementation("fp8_reference")
    ids = ids_for()
    second_before = logits(second, ids)
    hfa.prepare_model(first, backend="reference")
    assert all("forward" in layer.self_attn.__dict__ for layer in first.model.layers)
    assert not any("forward" in m.__dict__ for m in second.modules())
    assert attention_cls.forward is class_forward
    assert torch.equal(logits(second, ids), second_before)
    hfa.unprepare_model(first)
    assert attention_cls.forward is class_forward


def test_fused_rope_under_accelerate_device_hooks():
    """device_map="auto" wraps each placed module's forward in an accelerate hook that calls `_old_forward`:
    prepare_model fuses RoPE there (inside the hook), and unprepare / hook removal leave the class forward."""
    hooks = pytest.importorskip("accelerate.hooks")
    plain, hooked = tiny_model(seed=0), tiny_model(seed=0)
    for layer in hooked.model.layers:
        hooks.add_hook_to_module(layer.self_attn, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    ids = ids_for()
    unfused = logits(hooked, ids, "fp8_reference")
    hfa.prepare_model(plain, backend="reference")
    hfa.prepare_model(hooked, backend="reference")
    assert "fused RoPE on 2/2 layers" in hfa.describe_backend(hooked)
    assert all("_hf_hook" in layer.self_attn.__dict__ for layer in hooked.model.layers)  # hook still first
    assert torch.equal(logits(hooked, ids), logits(plain, ids))
    hfa.unprepare_model(hooked)
    assert torch.equal(logits(hooked, ids, "fp8_reference"), unfused)
    hfa.prepare_model(hooked, backend="reference")
    for layer in hooked.model.layers:  # hooks removed while prepared: forward becomes the fused one...
        hooks.remove_hook_from_module(layer.self_attn)
    assert torch.equal(logits(hooked, ids), logits(plain, ids))
    hfa.unprepare_model(hooked)  # ...and unprepare still finds it
    assert not any("forward" in m.__dict__ or "_old_forward" in m.__dict__ for m in hooked.modules())


def test_fused_forward_defers_to_class_forward_when_not_fp8(spy_fp8_sdpa):
    model = tiny_model()
    ids = ids_for()
    ref = logits(model, ids, "sdpa")
    hfa.prepare_model(model, backend="reference")
    spy_fp8_sdpa.clear()  # the fused-RoPE self-check's calls
    model.set_attn_implementation("sdpa")  # fused forwards still installed, but the name is not ours
    assert torch.equal(logits(model, ids), ref)
    assert not spy_fp8_sdpa


# ------------------------------------------------------------------------------------------- padding


def _padded_batch(lengths, seq, left: bool):
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        if left:
            mask[row, seq - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


@pytest.mark.parametrize("side,prepared", [("left", False), ("right", False), ("left", True)])
def test_padded_batch_matches_each_prompt_alone(side, prepared, caplog):
    model = tiny_model()
    model.set_attn_implementation("fp8_reference")
    if prepared:  # padded batches leave the fused-RoPE forward for the class forward + padding-aware adapter
        hfa.prepare_model(model, backend="reference")
    lengths = (SEQ, 29)
    mask = _padded_batch(lengths, SEQ, left=side == "left")
    ids = ids_for()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        batched = logits(model, ids, attention_mask=mask, position_ids=position_ids)
    assert not [r for r in caplog.records if r.name.startswith("hf_fp8_attention.transformers")]
    for row, n in enumerate(lengths):
        valid = mask[row].bool()
        alone = logits(model, ids[row : row + 1, valid])[0]
        # Same fp8 math on the same rows: measured cosine 1.0 (bf16 GEMM blocking may differ by batch shape).
        # Prepared: the prompt alone runs fused RoPE, the padded batch does not (see the fused-vs-unfused test).
        assert cosine(batched[row, valid], alone) >= (0.997 if prepared else 0.999)


def test_noncontiguous_mask_falls_back_to_sdpa(caplog):
    model = tiny_model()
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 10:14] = 0  # a hole: not one run of keys
    ids = ids_for()
    ref = logits(model, ids, "sdpa", attention_mask=mask)
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        got = logits(model, ids, "fp8_reference", attention_mask=mask)
    warnings = [r for r in caplog.records if "not one contiguous run" in r.getMessage()]
    assert len(warnings) == 1  # two layers, one warning
    valid = mask.bool()
    assert cosine(ref[valid], got[valid]) >= 0.9999


def test_packed_sequences_get_a_4d_mask_and_fall_back(caplog):
    """position_ids that restart mean packed sequences: transformers builds a block mask, we must not drop it."""
    model = tiny_model()
    ids = ids_for(batch=1)
    position_ids = torch.cat([torch.arange(20), torch.arange(SEQ - 20)])[None]
    ref = logits(model, ids, "sdpa", position_ids=position_ids)
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        got = logits(model, ids, "fp8_reference", position_ids=position_ids)
    assert any("4-D attention mask" in r.getMessage() for r in caplog.records)
    assert cosine(ref, got) >= 0.9999


# ------------------------------------------------------------------------------------------- decode


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


def test_decode_steps_with_cache_match_eager(spy_fp8_sdpa):
    """KV cache on, no prepare_model: prefill then S_q == 1 steps, teacher-forced on eager's greedy tokens.

    Free-running greedy token agreement is not a usable criterion on random tiny models: one near-tied
    token sends the continuations apart (bf16 sdpa vs fp32 eager alone agree on 81-100% of 16 tokens).
    Teacher forcing compares every step on the same prefix.
    """
    model = tiny_model()
    prompt, new = ids_for(batch=2, seq=32), 12
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model.generate(
            prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True,
        )
    ref_steps = torch.stack(eager.logits, dim=1).float()  # (B, new, V): step i predicts token 32 + i
    model.set_attn_implementation("fp8_reference")
    steps = []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        steps.append(out.logits[:, -1])
        for t in range(32, 32 + new - 1):
            out = model(eager.sequences[:, t : t + 1], use_cache=True, **{_cache_kwarg(model): _cache_of(out)})
            steps.append(out.logits[:, -1])
    assert sum(s_q == 1 for s_q, *_ in spy_fp8_sdpa) == 2 * (new - 1), "the S_q == 1 decode path did not run"
    got_steps = torch.stack(steps, dim=1).float()
    # Measured over seeds 0-3: all steps 0.9956-0.9975, single steps (2 x 128 logits) 0.988-0.9986.
    assert cosine(ref_steps, got_steps) >= 0.99
    for step in range(new):
        assert cosine(ref_steps[:, step], got_steps[:, step]) >= 0.98, step
    assert decisive_argmax_agreement(ref_steps, got_steps) >= 0.9
    # Free-running fp8 greedy decode runs end to end.
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert tokens.shape == (2, 32 + new)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_generate_matches_each_prompt_alone(cache, spy_fp8_sdpa):
    """Prefill and S_q == 1 decode steps over a padded KV cache (a StaticCache has more slots than the mask)."""
    model = tiny_model()
    model.set_attn_implementation("fp8_reference")
    ids = ids_for(batch=2, seq=24)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kwargs)[:, -6:]
        alone = [model.generate(ids[row : row + 1, mask[row].bool()], **kwargs)[0, -6:] for row in range(2)]
    assert any(s_q == 1 for s_q, *_ in spy_fp8_sdpa)
    # Each row is attended on its own key slice, so it gets the same fp8 scales as when run alone.
    for row in range(2):
        assert torch.equal(batched[row], alone[row]), (batched, alone)


# ------------------------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("prepared", [False, True])
def test_sliding_window_falls_back_to_sdpa(prepared, caplog, spy_fp8_sdpa):
    model = tiny_model("mistral", sliding_window=16)
    ids = ids_for()
    ref = logits(model, ids, "sdpa")
    if prepared:
        hfa.prepare_model(model, backend="reference")
        assert len(spy_fp8_sdpa) == 2  # the fused-RoPE self-check (16 tokens: within the window)
        spy_fp8_sdpa.clear()
    else:
        model.set_attn_implementation("fp8_reference")
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        got = logits(model, ids)
    warnings = [r for r in caplog.records if "sliding window" in r.getMessage()]
    assert len(warnings) == 1
    assert not spy_fp8_sdpa
    assert cosine(ref, got) >= 0.9999
    # Short inputs fit in the window and run in fp8 again (fused when prepared).
    short = ids[:, :16]
    assert cosine(logits(model, short), logits(tiny_model("mistral", sliding_window=16), short, "eager")) >= 0.99
    assert len(spy_fp8_sdpa) == 2 and all(fused == prepared for *_, fused in spy_fp8_sdpa)


def test_unsupported_head_dim_falls_back(caplog):
    model = tiny_model(head_dim=32)
    ids = ids_for()
    ref = logits(model, ids, "sdpa")
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        got = logits(model, ids, "fp8_reference")
    assert sum("head_dim 32" in r.getMessage() for r in caplog.records) == 1
    assert cosine(ref, got) >= 0.9999


def test_softcap_falls_back_to_math_attention(caplog):
    """Gemma2-style logit softcapping (the `softcap` kwarg) is not in the fp8 kernels: math fallback."""
    attn = tiny_model().model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, SEQ, 64, generator=gen).bfloat16()
    k = torch.randn(2, 2, SEQ, 64, generator=gen).bfloat16()
    v = torch.randn(2, 2, SEQ, 64, generator=gen).bfloat16()
    forward = AttentionInterface._global_mapping["fp8_reference"]
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        out, weights = forward(attn, q, k, v, None, scaling=0.125, softcap=5.0)
    assert weights is None and out.shape == (2, SEQ, 4, 64) and out.is_contiguous()
    assert any("softcapping" in r.getMessage() for r in caplog.records)
    kr, vr = k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1)
    scores = torch.tanh(q.float() @ kr.transpose(-1, -2) * 0.125 / 5.0) * 5.0
    scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ vr).transpose(1, 2)
    assert cosine(out, expected) >= 0.9999


# ------------------------------------------------------------------------------------------- errors


def test_dropout_in_training_raises():
    model = tiny_model(attention_dropout=0.1)
    model.set_attn_implementation("fp8_reference")
    model.train()
    with pytest.raises(ValueError, match="no attention dropout.*attn_implementation='sdpa'"):
        model(ids_for(), use_cache=False)


def test_output_attentions_raises():
    model = tiny_model()
    model.set_attn_implementation("fp8_reference")
    with pytest.raises(ValueError, match="output_attentions.*eager"):
        with torch.no_grad():
            model(ids_for(), use_cache=False, output_attentions=True)


def test_float32_model_raises():
    model = tiny_model(dtype=torch.float32)
    with pytest.raises(TypeError, match="bfloat16"):
        hfa.prepare_model(model, backend="reference")
    model.set_attn_implementation("fp8_reference")
    with pytest.raises(TypeError, match="bfloat16"):
        logits(model, ids_for())


def test_bad_backend_and_hadamard():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown fp8 attention backend 'fa5'"):
        hfa.prepare_model(model, backend="fa5")
    with pytest.raises(ValueError, match="accepted values: None, 'auto', 'none'"):
        hfa.prepare_model(model, backend="reference", hadamard="random")
    with pytest.raises(ValueError, match="needs CUDA"):
        hfa.prepare_model(model, backend="fa3")  # CPU model
    assert model.config._attn_implementation != "fp8_fa3"
    hfa.prepare_model(model, backend="reference", hadamard="none")
    assert model.config._attn_implementation == "fp8_reference"


def test_accuracy_options_reach_every_fp8_call(monkeypatch):
    """prepare_model(hadamard=, smooth_k=, smooth_v=) reach fp8_sdpa (fused, unfused and padded calls);
    defaults are not passed."""
    seen = []
    real = hf_sdpa.fp8_sdpa

    def spy(query, key, value, **kwargs):
        seen.append({k: kwargs[k] for k in ("hadamard", "smooth_k", "smooth_v") if k in kwargs})
        return real(query, key, value, **kwargs)

    patch_everywhere(monkeypatch, "fp8_sdpa", spy)
    model = tiny_model()
    hfa.prepare_model(model, backend="reference")
    assert seen == [{}, {}]  # the fused-RoPE self-check, with the model's options
    seen.clear()
    logits(model, ids_for())
    assert seen == [{}, {}] and model.config.fp8_attention_options["hadamard"] == "auto"
    seen.clear()
    hfa.prepare_model(model, backend="reference", hadamard="qkv", smooth_k=True)
    mask = _padded_batch((SEQ, 29), SEQ, left=True)
    logits(model, ids_for())  # fused RoPE
    logits(model, ids_for(), attention_mask=mask)  # padded rows, unfused
    assert seen and all(opts == {"hadamard": "qkv", "smooth_k": True} for opts in seen)
    assert "hadamard=qkv, smooth_k=True" in hfa.describe_backend(model)
    hfa.unprepare_model(model)
    assert not hasattr(model.config, "fp8_attention_options")


def test_non_causal_cross_attention_with_padded_keys():
    """A 2-D key-padding mask on non-causal attention with S_q < S_kv (cross-attention): every query is
    valid and attends to its row's valid keys (a key span once leaked into the query range)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 4, 64, generator=g).bfloat16()
    k = torch.randn(2, 2, 6, 64, generator=g).bfloat16()
    v = torch.randn(2, 2, 6, 64, generator=g).bfloat16()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = hf_attention._fp8_attention_forward(module, q, k, v, mask, scaling=0.125, backend="reference")
    bias = torch.zeros(2, 1, 1, 6).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=bias, scale=0.125, enable_gqa=True
    ).transpose(1, 2)
    assert torch.isfinite(out).all()
    assert cosine(out[1], ref[1]) > 0.998 and cosine(out, ref) > 0.998


def test_prepare_model_checks_hadamard_head_dim_and_restores_user_options():
    model = tiny_model(head_dim=96, hidden_size=192)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        hfa.prepare_model(model, backend="reference", hadamard="qkv")
    model = tiny_model()
    mine = {"hadamard": "none", "smooth_k": True, "smooth_v": False}
    model.config.fp8_attention_options = dict(mine)
    hfa.prepare_model(model, backend="reference", hadamard="qkv")
    assert model.config.fp8_attention_options["hadamard"] == "qkv"
    hfa.unprepare_model(model)
    assert model.config.fp8_attention_options == mine


def test_padding_spans_computed_once_per_mask(monkeypatch):
    calls = []
    real = unpad._compute_padding_spans
    monkeypatch.setattr(unpad, "_compute_padding_spans", lambda m: calls.append(1) or real(m))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert unpad._padding_spans(mask) == [(2, 5), (0, 5)]
    assert unpad._padding_spans(mask) == [(2, 5), (0, 5)] and len(calls) == 1  # every layer, one sync
    mask[0, 1] = 1  # modified in place: recomputed
    assert unpad._padding_spans(mask) == [(1, 5), (0, 5)] and len(calls) == 2
    other = mask.clone()
    assert unpad._padding_spans(other) == [(1, 5), (0, 5)] and len(calls) == 3
    with torch.inference_mode():
        frozen = mask.clone()
    assert unpad._padding_spans(frozen) == [(1, 5), (0, 5)] and unpad._padding_spans(frozen) == [(1, 5), (0, 5)]
    assert len(calls) == 5  # not cached: no version counter


def test_prepare_model_block_scales(monkeypatch):
    model = tiny_model()
    ids = ids_for()
    ref = logits(model, ids, "sdpa")
    with pytest.raises(ValueError, match="qk_scales='block' needs backend 'triton'"):
        hfa.prepare_model(model, backend="fa3", qk_scales="block")
    with pytest.raises(ValueError, match="accepted values"):
        hfa.prepare_model(model, qk_scales="token")
    hfa.prepare_model(model, qk_scales="block")  # CPU: the reference backend takes block scales
    assert "qk_scales=block" in hfa.describe_backend(model)
    seen = []
    real = hf_sdpa.fp8_sdpa
    patch_everywhere(monkeypatch, "fp8_sdpa", lambda *a, **kw: seen.append(kw.get("qk_scales")) or real(*a, **kw))
    got = logits(model, ids)
    assert seen and set(seen) == {"block"}
    # tiny random model, prepared (fused RoPE): measured 0.9966-0.9972 for block scales, 0.9965-0.9971 for
    # per-head scales over three seeds
    assert cosine(got, ref) >= 0.995


@pytest.mark.parametrize("prepared", [False, True])
def test_packed_sequences_with_flash_kwargs_run_varlen(monkeypatch, prepared):
    """Two prompts packed in one row with FlashAttention's kwargs (what DataCollatorWithFlattening(
    return_flash_attn_kwargs=True) hands the model): fp8 runs them as varlen, no bf16 fallback, and each
    prompt's logits match the prompt run alone. Prepared (fused RoPE) models defer such calls to the
    adapter, also when no position_ids come (then no packed mask either)."""
    model = tiny_model()
    model.set_attn_implementation("fp8_reference")
    if prepared:
        hfa.prepare_model(model, backend="reference")
    lengths = [13, 20]
    ids = [ids_for(1, n, seed=i + 3) for i, n in enumerate(lengths)]
    packed = torch.cat(ids, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 13, 33], dtype=torch.int32)
    calls = []
    real = hf_sdpa.fp8_sdpa_varlen
    patch_everywhere(monkeypatch, "fp8_sdpa_varlen", lambda *a, **kw: calls.append(a[3].tolist()) or real(*a, **kw))
    assert patch_everywhere(monkeypatch, "_fallback_attention", None)  # any fallback would raise
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=20,
                    max_length_k=20).logits.float()
    assert calls == [[0, 13, 33]] * model.config.num_hidden_layers
    for i, one in enumerate(ids):
        a, b = (0, 13) if i == 0 else (13, 33)
        with torch.no_grad():
            alone = model(one).logits.float()[0]
        # prepared: the prompt alone takes the fused-RoPE path (one bf16 rounding of q/k less): 0.9993 measured
        assert cosine(out[0, a:b], alone) > (0.998 if prepared else 0.9999)
    calls.clear()
    with torch.no_grad():
        model(packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=20, max_length_k=20)
    assert calls == [[0, 13, 33]] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="end at the packed length 30"):
        with torch.no_grad():
            model(packed[:, :30], position_ids=position_ids[:, :30], cu_seq_lens_q=cu, cu_seq_lens_k=cu)


# ------------------------------------------------------------------------------------------- options, caches


def test_prepare_model_validates_options_once():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    with pytest.raises(TypeError, match="smooth_k must be True or False, got 'no'"):
        hfa.prepare_model(model, backend="reference", smooth_k="no")
    with pytest.raises(TypeError, match="smooth_v must be True, False or .auto."):
        hfa.prepare_model(model, backend="reference", smooth_v=1)
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is True
    assert not hasattr(model.config, "fp8_attention_options")
    hfa.prepare_model(model, backend="reference", smooth_v=True)
    assert model.config.fp8_attention_options == {
        "hadamard": "auto", "smooth_k": False, "smooth_v": True, "qk_scales": "head", "qk_format": "e4m3",
        "v_scales": "head"}


def test_unknown_option_on_the_config_is_an_error():
    """The config's dict is read through FP8AttentionOptions.coerce: a typo is an error, not dropped."""
    model = tiny_model()
    model.set_attn_implementation("fp8_reference")
    model.config.fp8_attention_options = {"hadamard": "none", "smoothk": True}
    with pytest.raises(ValueError, match=r"unknown fp8 attention option\(s\) \['smoothk'\]"):
        logits(model, ids_for())
    model.config.fp8_attention_options = {"smooth_k": "yes"}
    with pytest.raises(TypeError, match="smooth_k must be True or False"):
        logits(model, ids_for())
    model.config.fp8_attention_options = {"smooth_k": True}
    logits(model, ids_for())


def test_prepare_model_failing_step_undoes_the_others(monkeypatch):
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    ids = ids_for()
    before = logits(model, ids)

    def broken(model):
        raise RuntimeError("broken step")

    monkeypatch.setattr(fused_rope, "fusable_modules", broken)
    with pytest.raises(RuntimeError, match="broken step"):
        hfa.prepare_model(model, backend="reference")
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is True and model.generation_config.use_cache is True
    assert not hasattr(model.config, "fp8_attention_options")
    assert "_fp8_attention_state" not in model.__dict__
    assert torch.equal(logits(model, ids), before)


def test_packing_plan_cached_per_key(monkeypatch):
    calls = []
    real = unpad._compute_packing_plan
    monkeypatch.setattr(unpad, "_compute_packing_plan", lambda *a: calls.append(1) or real(*a))
    runs = [(0, 2, 8, 2, 8), (1, 0, 8, 0, 8)]
    plan = unpad._packing_plan(runs, 8, 8, torch.device("cpu"))
    assert unpad._packing_plan(list(runs), 8, 8, "cpu") is plan and len(calls) == 1  # every layer, one plan
    assert plan[2].tolist() == [0, 6, 14] and plan[0].tolist() == [*range(2, 8), *range(8, 16)]
    other = unpad._packing_plan(runs[:1], 8, 8, "cpu")
    assert other is not plan and len(calls) == 2
    assert unpad._packing_plan(runs, 8, 8, "cpu") is not plan and len(calls) == 3


def test_fallback_warning_once_per_reason_as_keys_grow(caplog):
    """The fallback message does not carry the key count: a decode loop warns once, not once per step."""
    attn = tiny_model("mistral", sliding_window=16).model.layers[0].self_attn
    forward = AttentionInterface._global_mapping["fp8_reference"]
    gen = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        for s_kv in (20, 21, 22):
            q = torch.randn(1, 4, 1, 64, generator=gen).bfloat16()
            k = torch.randn(1, 2, s_kv, 64, generator=gen).bfloat16()
            forward(attn, q, k, k.clone(), None, scaling=0.125, sliding_window=16)
    warnings = [r for r in caplog.records if "sliding window of 16" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name == "hf_fp8_attention.transformers.attention"
