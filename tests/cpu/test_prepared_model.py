"""A prepared model as an object: saved, pickled, copied and described (tiny random models built from
configs, reference backend, nothing downloaded).

- `save_pretrained` of a prepared model writes the model as it was before `prepare_model`: the KV cache
  setting and the fp8 options are prepare's runtime state, not part of the checkpoint.
- `torch.save` / `torch.load` and `copy.deepcopy` give an independent prepared model (fused RoPE included):
  same logits, and `unprepare_model` on the copy leaves the original prepared.
- `describe_backend` says when attention calls run in bf16 instead of fp8 and why, and `prepare_model`
  warns about it.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from transformers.utils import logging as hf_logging

import hf_fp8_attention as hfa
from hf_fp8_attention.transformers import attention, fused_rope, unpad

OPTIONS = "fp8_attention_options"
SEQ = 24
REFERENCE = "fp8 attention: reference (CPU; pure-torch emulation of the fp8 math, no speedup)"
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, vocab_size=128, max_position_embeddings=256, initializer_range=0.1)


def tiny(config_cls=LlamaConfig, model_cls=LlamaForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY, **overrides})).to(torch.bfloat16).eval()


def ids(batch=2, seq=SEQ):
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()  # the configs' use_cache: prepared means off, fused RoPE runs


def fused(model) -> list:
    """The attention modules whose forward is the fused-RoPE one, bound to that very module."""
    out = []
    for layer in model.model.layers:
        forward = layer.self_attn.__dict__.get("forward")
        if forward is not None:
            assert forward.__self__ is layer.self_attn
            out.append(layer.self_attn)
    return out


@pytest.fixture(autouse=True)
def _reset_warnings():
    hf_logging.warning_once.cache_clear()
    yield
    hf_logging.warning_once.cache_clear()


# ------------------------------------------------------------------------------------------- save_pretrained


def saved(path) -> tuple[dict, dict]:
    return tuple(json.loads((path / name).read_text()) for name in ("config.json", "generation_config.json"))


@pytest.mark.parametrize("user_options", [None, {"smooth_k": True}])
def test_save_pretrained_writes_the_model_as_before_prepare(tmp_path, user_options):
    model = tiny()
    if user_options is not None:  # set by the user: part of the checkpoint, prepare's options are not
        setattr(model.config, OPTIONS, user_options)
    model.save_pretrained(tmp_path / "before")
    hfa.prepare_model(model, backend="reference", hadamard="qkv")
    input_ids = ids()
    prepared = logits(model, input_ids)
    model.save_pretrained(tmp_path / "prepared")
    assert saved(tmp_path / "prepared") == saved(tmp_path / "before")
    # the model itself is still prepared, unchanged by the save
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    assert getattr(model.config, OPTIONS)["hadamard"] == "qkv"
    assert len(fused(model)) == 2 and torch.equal(logits(model, input_ids), prepared)

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "prepared", attn_implementation="fp8_reference",
                                                dtype=torch.bfloat16)
    assert reloaded.config.use_cache is True and reloaded.generation_config.use_cache is True
    assert getattr(reloaded.config, OPTIONS, None) == user_options
    hfa.unprepare_model(model)
    assert getattr(model.config, OPTIONS, None) == user_options and "save_pretrained" not in model.__dict__


# ------------------------------------------------------------------------------------------- pickle / deepcopy


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [_pickled, copy.deepcopy], ids=["torch_save_load", "deepcopy"])
def test_copy_of_prepared_model_is_prepared_and_independent(tmp_path, make_copy):
    model = tiny()
    model.set_attn_implementation("sdpa")
    input_ids = ids()
    before = logits(model, input_ids)
    hfa.prepare_model(model, backend="reference", smooth_k=True)
    prepared = logits(model, input_ids)
    description = hfa.describe_backend(model)

    twin = make_copy(model)
    assert len(fused(twin)) == 2  # fused, each forward bound to the copy's own module
    assert torch.equal(logits(twin, input_ids), prepared)
    assert hfa.describe_backend(twin) == description
    twin.save_pretrained(tmp_path / "twin")
    model.save_pretrained(tmp_path / "model")
    assert saved(tmp_path / "twin") == saved(tmp_path / "model")
    assert saved(tmp_path / "twin")[0]["use_cache"] is True

    hfa.unprepare_model(twin)
    assert twin.config._attn_implementation == "sdpa" and twin.config.use_cache is True
    assert twin.generation_config.use_cache is True and not hasattr(twin.config, OPTIONS)
    assert not fused(twin) and "save_pretrained" not in twin.__dict__
    assert torch.equal(logits(twin, input_ids), before)
    # the original: still prepared, untouched by the copy's unprepare
    assert model.config._attn_implementation == "fp8_reference" and model.config.use_cache is False
    assert model.generation_config.use_cache is False and getattr(model.config, OPTIONS)["smooth_k"] is True
    assert len(fused(model)) == 2 and torch.equal(logits(model, input_ids), prepared)
    hfa.unprepare_model(model)
    assert torch.equal(logits(model, input_ids), before)


def test_pickled_prepared_model_runs_in_a_fresh_process(tmp_path):
    """torch.load in another process: importing the package for the pickled functions registers the fp8
    names, so the model runs there as it ran here (fused, same logits)."""
    model = tiny()
    hfa.prepare_model(model, backend="reference")
    torch.save(model, tmp_path / "model.pt")
    torch.save(logits(model, ids()), tmp_path / "logits.pt")
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "from test_prepared_model import fused, ids, logits\n"
        f"assert torch.equal(logits(model, ids()), torch.load({str(tmp_path / 'logits.pt')!r}))\n"
        "assert len(fused(model)) == 2\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_prepared_model_traces_with_dynamo():
    """The fused forward stored on each attention module (a picklable callable, not a bound method) traces
    under torch.compile. (Under tracing, transformers 5.24 cannot rule out packed sequences from position_ids
    and hands the fp8 mask function a packed-sequence pattern: the calls get a 4-D mask and run in bf16,
    the class forward's path, so the logits are close to the eager fp8 ones, not equal.)"""
    model = tiny()
    hfa.prepare_model(model, backend="reference")
    input_ids = ids(batch=1, seq=16)
    expected = logits(model, input_ids)
    torch._dynamo.reset()
    try:
        got = logits(torch.compile(model, backend="eager"), input_ids)
    finally:
        torch._dynamo.reset()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.99


# ------------------------------------------------------------------------------------------- describe_backend


def _prepare_warnings(caplog, model) -> list[str]:
    with caplog.at_level(logging.WARNING, logger="hf_fp8_attention"):
        hfa.prepare_model(model, backend="reference")
    return [r.getMessage() for r in caplog.records if r.name == "hf_fp8_attention.transformers.model"]


def test_describe_and_prepare_on_a_head_dim_without_fp8_kernel(caplog, monkeypatch):
    model = tiny(hidden_size=160, num_attention_heads=2, num_key_value_heads=1, head_dim=80)
    warnings = _prepare_warnings(caplog, model)
    assert len(warnings) == 1 and "head_dim 80 has no fp8 kernel" in warnings[0], warnings
    assert "2/2 attention layers" in warnings[0] and "bfloat16" in warnings[0]
    text = hfa.describe_backend(model)
    assert text.startswith(REFERENCE)
    assert "no attention call runs in fp8" in text and "head_dim 80 has no fp8 kernel" in text, text
    assert "fused RoPE" not in text  # nothing runs fused either
    calls = []  # what really runs: not one fp8 call
    for module in (attention, fused_rope, unpad):
        monkeypatch.setattr(module, "fp8_sdpa", lambda *a, **k: calls.append(1))
    logits(model, ids())
    assert not calls


def test_describe_and_prepare_on_softcapping(caplog):
    model = tiny(Gemma2Config, Gemma2ForCausalLM, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 sliding_window=4096)
    warnings = _prepare_warnings(caplog, model)
    assert len(warnings) == 1 and "softcapping" in warnings[0] and "2/2 attention layers" in warnings[0], warnings
    text = hfa.describe_backend(model)
    assert "no attention call runs in fp8" in text and "softcapping" in text, text
    # final_logit_softcapping alone is on the logits, not in attention: fp8 runs
    model = tiny(Gemma2Config, Gemma2ForCausalLM, attn_logit_softcapping=None, final_logit_softcapping=30.0,
                 sliding_window=4096)
    caplog.clear()
    assert not _prepare_warnings(caplog, model)
    text = hfa.describe_backend(model)
    assert "softcapping" not in text and "no attention call" not in text, text


def test_describe_sliding_window_depends_on_length(caplog):
    model = tiny(MistralConfig, MistralForCausalLM, sliding_window=16)
    assert not _prepare_warnings(caplog, model)  # per call: inputs within the window run in fp8
    text = hfa.describe_backend(model)
    assert "inputs longer than the sliding window (16 tokens) run in bfloat16 on 2/2 layers" in text, text
    assert text.endswith("fused RoPE on 2/2 layers")


def test_describe_names_the_triton_prefill_kernel(monkeypatch):
    """HF_FP8_ATTENTION_TRITON_KERNEL picks the triton backend's prefill kernel: auto (unset) takes the Gluon
    kernel on Hopper at head_dim 128, which is said there and not elsewhere; any other value is said."""
    from hf_fp8_attention.transformers import model as model_module

    model = tiny()
    hfa.prepare_model(model, backend="reference")
    model.config._attn_implementation = "fp8_triton"  # (prepare_model refuses triton on CPU tensors)
    monkeypatch.delenv("HF_FP8_ATTENTION_TRITON_KERNEL", raising=False)
    assert hfa.describe_backend(model).startswith("fp8 attention: triton")
    assert "prefill" not in hfa.describe_backend(model)  # not Hopper: the Triton kernel, nothing to say
    monkeypatch.setattr(model_module, "device_arch", lambda device: 90)
    assert "prefill at head_dim 128 through the Gluon kernel where it applies" in hfa.describe_backend(model)
    monkeypatch.setenv("HF_FP8_ATTENTION_TRITON_KERNEL", "triton")
    assert "prefill kernel triton (HF_FP8_ATTENTION_TRITON_KERNEL)" in hfa.describe_backend(model)
    monkeypatch.setenv("HF_FP8_ATTENTION_TRITON_KERNEL", "gluon-2c")
    assert "prefill kernel gluon-2c" in hfa.describe_backend(model)
    # a triton that cannot build the Gluon kernel: auto says the Triton kernel runs, a gluon* value that it fails
    from hf_fp8_attention.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "gluon_unavailable", lambda: "the Gluon kernel needs triton >= 3.6")
    assert "prefill kernel gluon-2c (HF_FP8_ATTENTION_TRITON_KERNEL) cannot run: the Gluon kernel needs triton >= 3.6" \
        in hfa.describe_backend(model)
    monkeypatch.delenv("HF_FP8_ATTENTION_TRITON_KERNEL")
    assert "prefill through the Triton kernel (the Gluon kernel needs triton >= 3.6)" in hfa.describe_backend(model)
    monkeypatch.setenv("HF_FP8_ATTENTION_TRITON_KERNEL", "fastest")  # unknown: the error a call would raise
    with pytest.raises(ValueError, match="HF_FP8_ATTENTION_TRITON_KERNEL='fastest'"):
        hfa.describe_backend(model)
    model.config._attn_implementation = "fp8_reference"
    assert "prefill" not in hfa.describe_backend(model)


def test_describe_unchanged_on_a_supported_model(caplog):
    model = tiny()
    assert not _prepare_warnings(caplog, model)
    assert hfa.describe_backend(model) == (REFERENCE + ", hadamard=auto (qk), smooth_v=auto (on from 32768 keys), "
                                           "fused RoPE on 2/2 layers")
    hfa.prepare_model(model, backend="reference", fuse_rope=False, hadamard="qkv")
    assert hfa.describe_backend(model) == REFERENCE + ", hadamard=qkv, smooth_v=auto (on from 32768 keys), fused RoPE off"
