"""Fused RoPE is contained: a version gate and a self-check per attention class at prepare_model.

`_fused_rope_forward` re-implements the Llama-family attention forward; these tests show that a class
whose forward no longer matches it (simulated by wrapping `LlamaAttention.forward`), or a transformers
version it was not checked against, is left unfused with a warning, and the model still runs (its class
forward, fp8 attention unfused). Tiny Llama from `tests/tiny_models.py`, reference backend.

Measured self-check numbers on this tiny Llama (reference backend, both layers; thresholds cosine >= 0.9999,
relative L2 <= 0.01; the check runs the fused forward's steps with RoPE done in torch, so a class that
still computes what the fused forward assumes hands fp8_sdpa identical tensors):
- the real class: relative L2 0.0 with q/k projections x1, x2, x8 and x16 (the old comparison of the
  kernel-RoPE path failed from x16 on, and on the real SmolLM2-135M: 0.996 / 0.09);
- output scaled by 1.5: cosine 0.999999 (a scale does not move it), relative L2 0.333;
- RoPE sign flipped: relative L2 0.047-0.067 unsharpened (this model's random attention is near-uniform at
  its init scale 0.02, so RoPE barely matters), 0.17-0.23 with q/k x2, ~1.0 with x8.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama
from transformers.utils import logging as hf_logging

import hf_fp8_attention as hfa
from hf_fp8_attention.transformers import fused_rope
from tiny_models import save_tiny_llama

WORDS = ["the quick brown fox jumps over the lazy dog", "a tiny model for the fused rope self check"]


@pytest.fixture(autouse=True)
def _reset_warnings():
    hf_logging.warning_once.cache_clear()
    yield
    hf_logging.warning_once.cache_clear()


@pytest.fixture(scope="module")
def tiny_llama_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), WORDS)


def load(path, sharpen: float = 1.0):
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    if sharpen != 1.0:  # scores x sharpen**2: attention far enough from uniform that RoPE matters
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(sharpen)
                layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def ids(seq=24):
    return torch.randint(4, len(" ".join(WORDS).split()), (2, seq), generator=torch.Generator().manual_seed(3))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits.float()


def refusals(caplog):
    return [r.getMessage() for r in caplog.records if "fused RoPE is off" in r.getMessage()]


def fused_layers(model) -> int:
    return sum("forward" in layer.self_attn.__dict__ for layer in model.model.layers)


def test_version_range():
    assert fused_rope.FUSED_ROPE_CHECKED == ("5.17", "5.25")
    for version in ("5.17.0", "5.17.3", "5.20.1", "5.24.0", "5.24.9", "5.25.0", "5.25.0.dev0"):
        assert fused_rope.version_checked(version), version
    for version in ("5.16.2", "5.26.0", "5.26.0.dev0", "6.0.0", "4.57.1"):
        assert not fused_rope.version_checked(version), version


def test_real_class_passes_and_is_fused(tiny_llama_path, caplog):
    model = load(tiny_llama_path)
    model.set_attn_implementation("fp8_reference")
    for layer in model.model.layers:
        check = fused_rope.self_check(layer.self_attn, torch.bfloat16)
        assert check.passed, check.describe()
        assert check.cosine >= 0.9999 and check.rel_l2 <= 1e-6, check.describe()  # measured above: 0.0
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        hfa.prepare_model(model, backend="reference")
    assert not refusals(caplog)
    assert fused_layers(model) == 2
    assert hfa.describe_backend(model).endswith("fused RoPE on 2/2 layers")


@pytest.mark.parametrize("sharpen", [8.0, 16.0])
def test_real_class_passes_with_peaked_attention(tiny_llama_path, sharpen):
    """Peaked attention (q/k projections x8, x16, as trained checkpoints have) does not refuse the real
    class: the check compares identical fp8 inputs, not two fp8 roundings."""
    model = load(tiny_llama_path, sharpen)
    model.set_attn_implementation("fp8_reference")
    for layer in model.model.layers:
        check = fused_rope.self_check(layer.self_attn, torch.bfloat16)
        assert check.passed and check.rel_l2 <= 1e-6, check.describe()


def test_self_check_leaves_no_state(tiny_llama_path):
    model = load(tiny_llama_path)
    model.set_attn_implementation("fp8_reference")
    attn = model.model.layers[0].self_attn
    attrs = {m: dict(m.__dict__) for m in attn.modules()}
    rng = torch.get_rng_state()
    check = fused_rope.self_check(attn, torch.bfloat16)
    again = fused_rope.self_check(attn, torch.bfloat16)
    assert check == again  # seeded: the same input every time
    assert torch.equal(torch.get_rng_state(), rng)  # a local generator, the global RNG is not drawn
    assert all(m.__dict__.keys() == before.keys() for m, before in attrs.items())
    assert all(m.__dict__[k] is v for m, before in attrs.items() for k, v in before.items())
    assert all(p.grad is None for p in attn.parameters())
    rng = torch.get_rng_state()
    hfa.prepare_model(model, backend="reference")
    assert torch.equal(torch.get_rng_state(), rng)


def _scaled_output(real):
    def forward(self, *args, **kwargs):
        out, weights = real(self, *args, **kwargs)
        return out * 1.5, weights

    return forward


def _flipped_rope(real):
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        cos, sin = position_embeddings
        return real(self, hidden_states, (cos, -sin), attention_mask, *args, **kwargs)

    return forward


@pytest.mark.parametrize("alter,sharpen", [(_scaled_output, 1.0), (_flipped_rope, 2.0)], ids=["scaled", "rope_flipped"])
def test_altered_class_is_refused(tiny_llama_path, monkeypatch, caplog, alter, sharpen):
    """A class forward that no longer computes what `_fused_rope_forward` computes: not fused, a warning
    naming the class and the numbers, and the model runs its class forward."""
    model = load(tiny_llama_path, sharpen)
    model.set_attn_implementation("fp8_reference")
    assert fused_rope.self_check(model.model.layers[0].self_attn, torch.bfloat16).passed  # the real class
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", alter(modeling_llama.LlamaAttention.forward))
    check = fused_rope.self_check(model.model.layers[0].self_attn, torch.bfloat16)
    assert not check.passed
    expected = logits(model, ids())  # the altered class forward, fp8 attention unfused
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        hfa.prepare_model(model, backend="reference")
    messages = refusals(caplog)
    assert len(messages) == 1, messages  # one class, two layers: checked and warned once
    assert "transformers.models.llama.modeling_llama.LlamaAttention" in messages[0]
    assert f"cosine {check.cosine:.5f}" in messages[0] and f"relative L2 {check.rel_l2:.4f}" in messages[0]
    assert fused_layers(model) == 0
    assert hfa.describe_backend(model).endswith("fused RoPE on 0/2 layers")
    assert model.config._attn_implementation == "fp8_reference"
    assert torch.equal(logits(model, ids()), expected)


def test_class_forward_that_raises_is_refused(tiny_llama_path, monkeypatch, caplog):
    """A future forward with another signature: the self-check's call fails, nothing is fused."""
    model = load(tiny_llama_path)
    real = modeling_llama.LlamaAttention.forward

    def forward(self, hidden_states, position_embeddings, attention_mask, new_argument, **kwargs):
        return real(self, hidden_states, position_embeddings, attention_mask, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        hfa.prepare_model(model, backend="reference")
    messages = refusals(caplog)
    assert len(messages) == 1 and "raised TypeError" in messages[0] and "LlamaAttention" in messages[0]
    assert fused_layers(model) == 0
    assert hfa.describe_backend(model).endswith("fused RoPE on 0/2 layers")


@pytest.mark.parametrize("version", ["5.26.0", "5.16.1"])
def test_outside_version_gate_nothing_is_fused(tiny_llama_path, monkeypatch, caplog, version):
    model = load(tiny_llama_path)
    model.set_attn_implementation("fp8_reference")
    expected = logits(model, ids())
    monkeypatch.setattr(fused_rope, "TRANSFORMERS_VERSION", version)
    checks = []
    monkeypatch.setattr(fused_rope, "self_check", lambda *a: checks.append(a))
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        hfa.prepare_model(model, backend="reference")
    messages = refusals(caplog)
    assert len(messages) == 1 and f"this is transformers {version}" in messages[0], messages
    assert "5.17 to 5.25.x" in messages[0]
    assert not checks  # no self-check either
    assert fused_layers(model) == 0
    assert hfa.describe_backend(model).endswith("fused RoPE on 0/2 layers")
    assert torch.equal(logits(model, ids()), expected)  # fp8 attention still runs, unfused
    hfa.unprepare_model(model)
    monkeypatch.undo()  # the installed version (inside the range): fused again
    hfa.prepare_model(model, backend="reference")
    assert fused_layers(model) == 2


def test_training_mode_is_not_fused(tiny_llama_path, monkeypatch, caplog):
    model = load(tiny_llama_path).train()
    checks = []
    monkeypatch.setattr(fused_rope, "self_check", lambda *a: checks.append(a))
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        hfa.prepare_model(model, backend="reference")
    messages = refusals(caplog)
    assert len(messages) == 1 and "training mode" in messages[0] and "model.eval()" in messages[0]
    assert not checks and fused_layers(model) == 0
    assert hfa.describe_backend(model).endswith("fused RoPE on 0/2 layers")


def test_one_check_per_class_per_prepare(tiny_llama_path, monkeypatch):
    model = load(tiny_llama_path)
    real = fused_rope.self_check
    checked = []
    monkeypatch.setattr(fused_rope, "self_check", lambda module, dtype: checked.append(module) or real(module, dtype))
    hfa.prepare_model(model, backend="reference")
    assert checked == [model.model.layers[0].self_attn]  # the first instance of the class
    hfa.prepare_model(model, backend="reference")  # prepared again: checked again
    assert len(checked) == 2
    hfa.prepare_model(model, backend="reference", fuse_rope=False)
    assert len(checked) == 2 and fused_layers(model) == 0
    assert hfa.describe_backend(model).endswith("fused RoPE off")
