"""`prepare_model` / `unprepare_model` / `describe_backend`: switching a loaded model to fp8 attention.

`prepare_model` validates everything first (options, head_dims, dtype, backend plan), then runs `_STEPS`
in order, each an (apply, undo) pair over one `PreparedState` kept on the model; `unprepare_model` runs
the undos in reverse order, and so does `prepare_model` when a step fails half-way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._constants import SUPPORTED_INPUT_DTYPES
from ..backends import ATTN_IMPLEMENTATIONS
from ..dispatch import device_arch, plan_attention, resolve_backend
from ..options import FP8AttentionOptions
from . import fused_rope
from .attention import OPTIONS_ATTR, register

_STATE_ATTR = "_fp8_attention_state"


@dataclass
class PreparedState:
    """What `prepare_model` did to one model, enough to undo it."""

    attn_implementation: str  # the fp8 name set, "fp8_<backend>"
    options: FP8AttentionOptions
    fuse_rope: bool
    previous_attn_implementation: Any = None  # a name, or {sub-config key: name} ("" for the top config)
    previous_use_cache: list[tuple[Any, Any]] = field(default_factory=list)  # (config, value)
    previous_options: list[tuple[Any, Any]] = field(default_factory=list)  # (config, user's value)
    fused: list[torch.nn.Module] = field(default_factory=list)  # attention modules with fused RoPE


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _configs_with_cache(model) -> list:
    """The model config and its text sub-config (multimodal models keep use_cache there)."""
    configs = [model.config]
    get_text_config = getattr(model.config, "get_text_config", None)
    if get_text_config is not None:
        text_config = get_text_config()
        if text_config is not None and text_config is not model.config:
            configs.append(text_config)
    return configs


# --- step: attention implementation ------------------------------------------------------------------------


def _attn_implementation_snapshot(model):
    config = model.config
    sub_keys = [k for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None]
    if not sub_keys:
        return config._attn_implementation
    snapshot = {"": config._attn_implementation}
    snapshot.update({k: getattr(config, k)._attn_implementation for k in sub_keys})
    return snapshot


def _apply_attn_implementation(model, state: PreparedState) -> None:
    state.previous_attn_implementation = _attn_implementation_snapshot(model)
    model.set_attn_implementation(state.attn_implementation)
    if model.config._attn_implementation != state.attn_implementation:
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation (it does not dispatch through "
            "transformers' AttentionInterface), so fp8 attention cannot be enabled on it"
        )


def _undo_attn_implementation(model, state: PreparedState) -> None:
    model.set_attn_implementation(state.previous_attn_implementation)


# --- step: KV cache off (the fused-RoPE path needs un-rotated keys, a cache stores rotated ones) ----------


def _apply_use_cache(model, state: PreparedState) -> None:
    generation_config = getattr(model, "generation_config", None)
    for config in [*_configs_with_cache(model), generation_config]:
        if config is not None and hasattr(config, "use_cache"):
            state.previous_use_cache.append((config, config.use_cache))
            config.use_cache = False


def _undo_use_cache(model, state: PreparedState) -> None:
    for config, value in state.previous_use_cache:
        config.use_cache = value


# --- step: accuracy options on the configs (a plain dict: config.json stays serialisable) ----------------


def _apply_options(model, state: PreparedState) -> None:
    for config in _configs_with_cache(model):
        if OPTIONS_ATTR in config.__dict__:
            state.previous_options.append((config, config.__dict__[OPTIONS_ATTR]))
        setattr(config, OPTIONS_ATTR, state.options.as_dict())


def _undo_options(model, state: PreparedState) -> None:
    for config in _configs_with_cache(model):
        config.__dict__.pop(OPTIONS_ATTR, None)
    for config, previous in state.previous_options:
        setattr(config, OPTIONS_ATTR, previous)


# --- step: fused RoPE (after the others: its self-check runs the model's fp8 name and options) -----------


def _apply_fused_rope(model, state: PreparedState) -> None:
    if not state.fuse_rope:
        return
    for module in fused_rope.fusable_modules(model):
        fused_rope.fuse(module)
        state.fused.append(module)


def _undo_fused_rope(model, state: PreparedState) -> None:
    for module in state.fused:
        fused_rope.unfuse(module)


_STEPS = (
    (_apply_attn_implementation, _undo_attn_implementation),
    (_apply_use_cache, _undo_use_cache),
    (_apply_options, _undo_options),
    (_apply_fused_rope, _undo_fused_rope),
)


def prepare_model(
    model,
    backend: str | None = None,
    hadamard: str | None = None,
    fuse_rope: bool = True,
    smooth_k: bool = False,
    smooth_v: bool = False,
    qk_scales: str = "head",
):
    """Switch a loaded model to fp8 attention for prefill-style inference. Returns the same model.

    Args:
        model: a transformers PreTrainedModel in bfloat16/float16.
        backend: "fa3", "fa4", "triton", "reference", or None to pick from the model's device.
        hadamard: None/"none", "qkv" or "v_only" (`fp8_sdpa`'s accuracy modes for outlier-heavy inputs).
        smooth_k, smooth_v: subtract K's / V's per-channel mean before quantizing (see `fp8_sdpa`).
        qk_scales: "head" or "block" (a Q/K scale per 16 tokens; runs on the triton backend, which
            backend=None then picks on a GPU).
            The four options are validated once as an `FP8AttentionOptions`, stored on the model's configs
            as the dict ``fp8_attention_options`` and passed to every fp8_sdpa call of this model.
        fuse_rope: on Llama/Mistral/Qwen2/Qwen3 attention, fuse RoPE into the fp8 quantize kernel (on the
            transformers versions it was checked against, for classes that pass a self-check; see
            `fused_rope`).

    It turns the KV cache off (config and generation_config): the fused-RoPE path needs un-rotated keys,
    a cache stores rotated ones. `unprepare_model` undoes everything.
    """
    options = FP8AttentionOptions(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v, qk_scales=qk_scales)
    # fail here, not at the first forward: the Hadamard rotation needs a power-of-two head_dim
    for head_dim in sorted({m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)}):
        options.check_head_dim(head_dim)
    dtype = getattr(model, "dtype", None)
    if dtype is not None and dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(
            f"fp8 attention needs a bfloat16/float16 model, this one is {dtype}: load it with "
            "from_pretrained(..., dtype=torch.bfloat16) or call model.to(torch.bfloat16) first"
        )
    plan = plan_attention(_model_device(model), backend, options)
    register()
    if _STATE_ATTR in model.__dict__:
        unprepare_model(model)

    state = PreparedState(attn_implementation=f"fp8_{plan.backend}", options=options, fuse_rope=bool(fuse_rope))
    done = []
    try:
        for apply, undo in _STEPS:
            done.append(undo)  # a step that fails half-way undoes its own part too
            apply(model, state)
    except BaseException:
        for undo in reversed(done):
            undo(model, state)
        raise
    setattr(model, _STATE_ATTR, state)
    return model


def unprepare_model(model):
    """Undo `prepare_model`: original forwards, previous attention implementation, use_cache, options.
    No-op on a model that is not prepared."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    for _, undo in reversed(_STEPS):
        undo(model, state)
    return model


def _count_attention_modules(model) -> int:
    return sum(all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) for m in model.modules())


def describe_backend(model) -> str:
    """One line on what attention the model runs, e.g. "fp8 attention: fa3 (SM 9.0), fused RoPE on 30/30 layers"."""
    impl = model.config._attn_implementation
    if impl not in ATTN_IMPLEMENTATIONS:
        return f"fp8 attention: not enabled (attn_implementation={impl!r}); call hf_fp8_attention.prepare_model(model)"
    device = _model_device(model)
    backend = ATTN_IMPLEMENTATIONS[impl] or resolve_backend(device)
    arch = device_arch(device)
    where = f"SM {arch // 10}.{arch % 10}" if arch is not None else device.type.upper()
    if backend == "reference":
        text = f"fp8 attention: reference ({where}; pure-torch emulation of the fp8 math, no speedup)"
    else:
        text = f"fp8 attention: {backend} ({where})"
    if impl == "fp8":
        text += ", backend picked per call from the device"
    state: PreparedState | None = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        extra = [f"{k}={v}" for k, v in state.options.changed().items()]
        if extra:
            text += ", " + ", ".join(extra)
    total = _count_attention_modules(model)
    if state is None or not state.fuse_rope:
        return text + ", fused RoPE off"
    return text + f", fused RoPE on {len(state.fused)}/{total} layers"
