"""`prepare_model` / `unprepare_model` / `describe_backend`: switching a loaded model to fp8 attention.

`prepare_model` validates everything first (options, head_dims, dtype, backend plan), then runs `_STEPS`
in order, each an (apply, undo) pair over one `PreparedState` kept on the model; `unprepare_model` runs
the undos in reverse order, and so does `prepare_model` when a step fails half-way.

A prepared model stays a plain object: everything prepare puts on it (the state, the fused forwards, the
``save_pretrained`` below) pickles and deep-copies, the copy's state referring to the copy's modules and
configs (`bound.BoundMethod`). Its ``save_pretrained`` writes the model as it was before `prepare_model`:
the cache setting and the options are runtime state (transformers reads ``config.use_cache`` at every
forward and ``generation_config.use_cache`` in generate, so they stay on the configs), and only the save
sees the values from before (`_configs_as_before`).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.masking_utils import create_masks_for_generate
from transformers.utils import logging as hf_logging

from .._constants import SUPPORTED_INPUT_DTYPES
from ..backends import ATTN_IMPLEMENTATIONS, TRITON_KERNEL_ENV
from ..dispatch import describe_dispatch, device_arch, plan_attention, speed_table_for
from ..kv_cache import FP8Cache, FP8StaticCache, FP8StaticCacheLayer
from ..kv_cache.ops import rotatable
from ..kv_cache.static import PADDED_BATCH_ERROR
from ..options import AUTO_SMOOTH_V_MIN_KEYS, FP8AttentionOptions
from . import fused_rope
from .attention import OPTIONS_ATTR, register
from .bound import BoundMethod
from .fallback import attention_modules, static_fallback_reason, static_sliding_window

logger = hf_logging.get_logger(__name__)

_STATE_ATTR = "_fp8_attention_state"
_MISSING = object()


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
    kv_cache: str = "off"  # "off" (no cache), "bf16" (transformers' cache), "fp8" (`FP8Cache`)
    fp8_cache_layers: tuple[int, ...] = ()  # layer indices whose cache stores fp8 (kv_cache="fp8")
    cache_hook_id: int | None = None  # the forward pre-hook that hands forward calls an FP8Cache


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
    if state.kv_cache != "off":
        return
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


# --- step: save_pretrained writes the model as before prepare ----------------------------------------------


@contextmanager
def _configs_as_before(model, state: PreparedState):
    """Within: the configs' use_cache and options as they were before `prepare_model`; after: as they are now."""
    configs = _configs_with_cache(model)
    now = [(config, "use_cache", config.use_cache) for config, _ in state.previous_use_cache]
    now += [(config, OPTIONS_ATTR, config.__dict__.get(OPTIONS_ATTR, _MISSING)) for config in configs]
    _undo_use_cache(model, state)
    _undo_options(model, state)
    try:
        yield
    finally:
        for config, name, value in now:
            if value is _MISSING:
                config.__dict__.pop(name, None)
            else:
                setattr(config, name, value)


def _save_pretrained_as_before(model, *args, **kwargs):
    """The prepared model's ``save_pretrained``: the class one, seeing the configs as before `prepare_model`
    (so config.json / generation_config.json are those of the unprepared model)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return type(model).save_pretrained(model, *args, **kwargs)
    with _configs_as_before(model, state):
        return type(model).save_pretrained(model, *args, **kwargs)


def _is_our_save(model) -> bool:
    return getattr(model.__dict__.get("save_pretrained"), "__func__", None) is _save_pretrained_as_before


def _apply_save(model, state: PreparedState) -> None:
    # per instance (other models of the class keep theirs), a BoundMethod so the model still pickles; one
    # already set on the instance by someone else is left alone
    if hasattr(type(model), "save_pretrained") and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = BoundMethod(_save_pretrained_as_before, model)


def _undo_save(model, state: PreparedState) -> None:
    if _is_our_save(model):
        del model.__dict__["save_pretrained"]


# --- step: the FP8 cache (kv_cache="fp8"; after fused RoPE: only fused layers can attend from fp8) --------


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its cache by: "cache" (transformers 5.24) or "past_key_values"."""
    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    """A fresh `FP8Cache` for a model prepared with kv_cache="fp8": fp8 layers where the fused forward
    attends from it, transformers' bf16 layers elsewhere (sliding windows, unfused layers)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None or state.kv_cache != "fp8":
        raise ValueError("new_cache needs a model prepared with prepare_model(model, kv_cache='fp8')")
    return FP8Cache(config=model.config, fp8_layers=set(state.fp8_cache_layers),
                    hadamard=_cache_hadamard(state.options))


def _cache_hadamard(options: FP8AttentionOptions) -> bool | None:
    """The FP8 cache's K/Q rotation for the model's options: it follows their Q/K rotation ("auto": None,
    where the head_dim allows it, as the per-call default; else `rotates_qk`). The cache never rotates V
    (its V blocks have their own scales)."""
    return None if options.hadamard == "auto" else options.rotates_qk


def _fp8_cache_pre_hook(module, args, kwargs):
    """Forward pre-hook: a call that will cache (use_cache, from the call or the config) and brings no cache
    gets a fresh FP8Cache, as transformers would give it a DynamicCache."""
    state = module.__dict__.get(_STATE_ATTR)
    if state is None or state.kv_cache != "fp8" or not state.fp8_cache_layers:
        return None
    if fused_rope.cache_arg(kwargs) is not None:
        return None
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    if not use_cache:
        return None
    kwargs[_cache_kwarg(module)] = new_cache(module)
    return args, kwargs


def new_static_cache(model, max_cache_len: int):
    """A fresh `FP8StaticCache` of ``max_cache_len`` tokens for a model prepared with kv_cache="fp8": fp8
    layers where the fused forward attends from them, transformers' static layers elsewhere."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None or state.kv_cache != "fp8":
        raise ValueError("new_static_cache needs a model prepared with prepare_model(model, kv_cache='fp8')")
    return FP8StaticCache(config=model.config, max_cache_len=max_cache_len, fp8_layers=set(state.fp8_cache_layers),
                          hadamard=_cache_hadamard(state.options))


def _prepare_fp8_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs):
    """generate's cache preparation, then its fresh default caches (not one the user passed) swapped: a
    DynamicCache for an FP8Cache, a StaticCache (cache_implementation="static") for an FP8StaticCache of
    the same length (generate then compiles the decode step on a GPU, as for its own static cache)."""
    result = type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is None or getattr(cache, "_is_user_defined", False):
            continue
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            model_kwargs[name] = new_cache(model)
        elif type(cache) is StaticCache and not cache.is_initialized and not getattr(cache, "offloading", False):
            # its full layers' length (transformers 5.17 also names it cache.max_cache_len; 5.24 does not)
            if not _static_kernels(model):
                continue
            fp8 = new_static_cache(model, max(layer.max_cache_len for layer in cache.layers))
            if any(isinstance(layer, FP8StaticCacheLayer) for layer in fp8.layers):
                model_kwargs[name] = fp8
    return result


def _static_kernels(model) -> bool:
    """Whether an FP8StaticCache on the model's device runs the Triton kernels (CUDA SM 8.9+): its torch
    implementation reads the length on the host, which a compiled step's CUDA graph cannot capture. On a CPU
    generate does not compile (the swap is kept: eager, correct)."""
    from ..kv_cache.layer import _impl_for

    device = _model_device(model)
    return device.type != "cuda" or _impl_for(device) == "triton"


def _fp8_masks_for_generate(model, *args, **kwargs):
    """generate's mask for a compileable cache (built outside the compiled step), with an `FP8StaticCache`:
    none (its fused forward attends the filled slots; a mask growing by one column per token would make the
    compiled step recompile), after refusing a padded batch at the first step (one host sync). Any other
    cache: the model's or transformers' function."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, FP8StaticCache):
        mask = kwargs.get("attention_mask")
        if mask is not None and kwargs.get("is_first_iteration", True) and not bool(mask.all()):
            raise ValueError(PADDED_BATCH_ERROR)
        return None
    try:  # a model's own (a method or a staticmethod: bound as the class binds it)
        own = inspect.getattr_static(type(model), "create_masks_for_generate")
    except AttributeError:
        return create_masks_for_generate(*args, **kwargs)
    return own.__get__(model, type(model))(*args, **kwargs)


def _apply_kv_cache(model, state: PreparedState) -> None:
    if state.kv_cache != "fp8":
        return
    state.fp8_cache_layers = tuple(sorted(m.layer_idx for m in state.fused if isinstance(getattr(m, "layer_idx", None), int)))
    if not state.fp8_cache_layers:
        logger.warning_once(
            "hf_fp8_attention: kv_cache='fp8' needs the fused forward (Llama/Mistral/Qwen2/Qwen3 attention with "
            f"fused RoPE); no layer of {type(model).__name__} has it, so it keeps transformers' bf16 cache with "
            "fp8 attention (correct, generation not faster)"
        )
        return
    handle = model.register_forward_pre_hook(_fp8_cache_pre_hook, with_kwargs=True)
    state.cache_hook_id = handle.id
    if hasattr(type(model), "_prepare_cache_for_generation") and "_prepare_cache_for_generation" not in model.__dict__:
        model.__dict__["_prepare_cache_for_generation"] = BoundMethod(_prepare_fp8_cache_for_generation, model)
    if hasattr(type(model), "generate") and "create_masks_for_generate" not in model.__dict__:
        model.__dict__["create_masks_for_generate"] = BoundMethod(_fp8_masks_for_generate, model)


def _undo_kv_cache(model, state: PreparedState) -> None:
    if state.cache_hook_id is not None:
        model._forward_pre_hooks.pop(state.cache_hook_id, None)
        model._forward_pre_hooks_with_kwargs.pop(state.cache_hook_id, None)
        state.cache_hook_id = None
    bound = model.__dict__.get("_prepare_cache_for_generation")
    if getattr(bound, "__func__", None) is _prepare_fp8_cache_for_generation:
        del model.__dict__["_prepare_cache_for_generation"]
    bound = model.__dict__.get("create_masks_for_generate")
    if getattr(bound, "__func__", None) is _fp8_masks_for_generate:
        del model.__dict__["create_masks_for_generate"]


_STEPS = (
    (_apply_attn_implementation, _undo_attn_implementation),
    (_apply_use_cache, _undo_use_cache),
    (_apply_options, _undo_options),
    (_apply_save, _undo_save),
    (_apply_fused_rope, _undo_fused_rope),
    (_apply_kv_cache, _undo_kv_cache),
)
KV_CACHE_MODES = ("off", "bf16", "fp8")


def prepare_model(
    model,
    backend: str | None = None,
    hadamard: str | None = None,
    fuse_rope: bool = True,
    smooth_k: bool = False,
    smooth_v: bool | str = "auto",
    qk_scales: str = "head",
    qk_format: str = "e4m3",
    kv_cache: str = "off",
    v_scales: str = "head",
):
    """Switch a loaded model to fp8 attention. Returns the same model.

    Args:
        model: a transformers PreTrainedModel in bfloat16/float16.
        backend: "fa3", "fa4", "triton", "reference", or None to pick from the model's device; with None on a
            GPU that has a measured speed table (`hf_fp8_attention/tables/`, made by scripts/tune_dispatch.py)
            the model gets the auto name ``fp8``, which runs bf16 attention on the shapes where the table
            measured fp8 slower (short prefills on the H200); a named backend always runs fp8.
        hadamard: None/"auto" (default: "qk" on power-of-two head dims with per-head e4m3 Q/K scales, else
            "none"), "none", "qk", "qkv" or "v_only" (`fp8_sdpa`'s accuracy modes).
        smooth_k, smooth_v: subtract K's / V's per-channel mean before quantizing (see `fp8_sdpa`; smooth_v
            "auto", the default: on for fa3/fa4/reference calls with >= 32k keys).
        qk_scales: "head" or "block" (a Q/K scale per 16 tokens; runs on the triton backend, which
            backend=None then picks on a GPU).
        qk_format: "e4m3" or "int8" (int8 Q/K with per-block scales; the triton backend, as for "block").
        v_scales: "head" or "block" (a V scale per 128 tokens; with per-block Q/K scales, so that the quantize
            kernel reads Q/K/V once; the triton backend, as for "block").
            The options are validated once as an `FP8AttentionOptions`, stored on the model's configs
            as the dict ``fp8_attention_options`` and passed to every fp8_sdpa call of this model.
        fuse_rope: on Llama/Mistral/Qwen2/Qwen3 attention, fuse RoPE into the fp8 quantize kernel (on the
            transformers versions it was checked against, for classes that pass a self-check; see
            `fused_rope`).

        kv_cache: "off" (default; for prefill workloads: perplexity, scoring, classification) turns the KV
            cache off (config and generation_config), as torchao does: the fused-RoPE path needs un-rotated
            keys, a bf16 cache stores rotated ones. "fp8" (for generation) keeps caching on with an
            `FP8Cache`: K/V stored in e4m3 with a scale per 64 tokens per KV head, written once by the
            RoPE + quantize write kernel and read directly by the decode kernel; ``model(ids,
            use_cache=True)`` and ``model.generate(...)`` create it with no other argument
            (`hf_fp8_attention.new_cache(model)` makes one to pass yourself). Takes any ``hadamard``: it
            shapes the first chunk's fp8 attention, and the cache stores K rotated (queries rotated to
            match) where it rotates Q and K ("auto" where the head_dim allows, "qk", "qkv"; never V); no
            other accuracy option, and needs fused RoPE;
            layers without the fused forward keep a bf16 cache. "bf16" keeps
            transformers' own cache (fp8 attention, RoPE unfused when a cache is used).

    `unprepare_model` undoes everything. ``model.save_pretrained`` writes the
    model as it was before (cache setting, options; ``model.config.save_pretrained`` on its own writes the
    live config). Warns when attention layers of this model will run in bf16/fp16 instead of fp8, and why
    (see `describe_backend`).
    """
    options = FP8AttentionOptions(hadamard=hadamard, smooth_k=smooth_k, smooth_v=smooth_v, qk_scales=qk_scales,
                                  qk_format=qk_format, v_scales=v_scales)
    if kv_cache not in KV_CACHE_MODES:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_MODES}, got {kv_cache!r}")
    # hadamard shapes the first chunk's fp8_sdpa and the cache's K/Q rotation (`_cache_hadamard`); the cache's
    # kernels keep their own numerics otherwise (per-block K/V scales); other options would have to be
    # carried into them
    unsupported = {k: v for k, v in options.changed().items() if k not in ("hadamard", "smooth_v")}
    if kv_cache == "fp8" and unsupported:
        raise ValueError(
            f"kv_cache='fp8' runs the cache's own fp8 numerics (per-block K/V scales); the options "
            f"{unsupported} are not supported with it: drop them, or use kv_cache='off' / 'bf16'"
        )
    if kv_cache == "fp8" and not fuse_rope:
        raise ValueError("kv_cache='fp8' writes un-rotated keys through the fused-RoPE forward: it needs fuse_rope=True")
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

    # backend=None on a GPU with a measured speed table: the auto name, so each call takes the faster of fp8
    # and bf16 attention for its shape (`dispatch.runs_bf16`); a named backend always runs fp8
    auto = backend is None and speed_table_for(_model_device(model), plan.backend) is not None
    state = PreparedState(attn_implementation="fp8" if auto else f"fp8_{plan.backend}", options=options,
                          fuse_rope=bool(fuse_rope), kv_cache=kv_cache)
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
    _warn_static_fallbacks(model)
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


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype in SUPPORTED_INPUT_DTYPES else "bfloat16/float16"


def _static_fallbacks(modules) -> dict[str, int]:
    """{reason: number of attention layers} for layers whose every call will run in bf16/fp16 attention."""
    reasons: dict[str, int] = {}
    for module in modules:
        reason = static_fallback_reason(module)
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _warn_static_fallbacks(model) -> None:
    modules = attention_modules(model)
    for reason, count in _static_fallbacks(modules).items():
        logger.warning_once(
            f"hf_fp8_attention: {reason}, so {count}/{len(modules)} attention layers of this model will run in "
            f"{_dtype_name(model)} attention instead of fp8 (correct, not faster); describe_backend(model) "
            "says what runs"
        )


def _what_runs(model, text: str) -> tuple[str, bool]:
    """``text`` plus what the attention layers will really run (bf16/fp16 fallbacks known from the model's
    attributes and configs), and whether any layer runs fp8 at all."""
    modules = attention_modules(model)
    total, dtype = len(modules), _dtype_name(model)
    reasons = _static_fallbacks(modules)
    if total and sum(reasons.values()) == total:
        return (f"{text}, but no attention call runs in fp8: {'; '.join(reasons)}; all {total} attention layers "
                f"run in {dtype} attention"), False
    for reason, count in reasons.items():
        text += f", {count}/{total} layers run in {dtype} attention ({reason})"
    windows: dict[int, int] = {}
    for module in modules:
        window = static_sliding_window(module) if static_fallback_reason(module) is None else None
        if window is not None:
            windows[window] = windows.get(window, 0) + 1
    for window, count in sorted(windows.items()):
        text += f", inputs longer than the sliding window ({window} tokens) run in {dtype} on {count}/{total} layers"
    return text, True


def describe_backend(model) -> str:
    """One line on what attention the model runs, e.g. "fp8 attention: fa3 (SM 9.0), fused RoPE on 30/30 layers";
    it also says which layers run in bf16/fp16 instead of fp8 and why, when the model's attributes and configs
    tell (a head_dim without an fp8 kernel, attention logit softcapping, attention sinks, a sliding window)."""
    impl = model.config._attn_implementation
    if impl not in ATTN_IMPLEMENTATIONS:
        return f"fp8 attention: not enabled (attn_implementation={impl!r}); call hf_fp8_attention.prepare_model(model)"
    device = _model_device(model)
    state: PreparedState | None = model.__dict__.get(_STATE_ATTR)
    options = state.options if state is not None else FP8AttentionOptions()
    # the name "fp8" runs the backend its options plan (block / int8 Q.K: triton)
    backend = ATTN_IMPLEMENTATIONS[impl] or plan_attention(device, None, options).backend
    arch = device_arch(device)
    where = f"SM {arch // 10}.{arch % 10}" if arch is not None else device.type.upper()
    if backend == "reference":
        text = f"fp8 attention: reference ({where}; pure-torch emulation of the fp8 math, no speedup)"
    else:
        text = f"fp8 attention: {backend} ({where})"
    if backend == "triton":  # which prefill kernel (`backends/triton.py`'s KERNEL_ENV)
        from ..backends import triton as triton_backend

        kernel = triton_backend.kernel_choice()  # (an unknown value: the error the first call would raise)
        hopper = arch is not None and arch // 10 == 9  # where the Gluon route applies (`_on_hopper`)
        unavailable = triton_backend.gluon_unavailable() if hopper and kernel != "triton" else None
        if unavailable is not None:
            text += f", prefill through the Triton kernel ({unavailable})" if kernel == "auto" else \
                f", prefill kernel {kernel} ({TRITON_KERNEL_ENV}) cannot run: {unavailable}"
        elif kernel == "auto" and hopper:
            text += (", prefill at head_dim 128 through the Gluon kernel where it applies "
                     f"({TRITON_KERNEL_ENV}=triton: the Triton kernel)")
        elif kernel != "auto":
            text += f", prefill kernel {kernel} ({TRITON_KERNEL_ENV})"
    if impl == "fp8":
        text += ", backend picked per call from the device; " + describe_dispatch(device, None, options)
    if state is not None:
        extra = [f"{k}={v}" for k, v in state.options.changed().items()]
        if state.options.hadamard == "auto":  # say what the default runs at this model's head dims
            dims = sorted({m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)})
            modes = sorted({state.options.for_head_dim(d).hadamard for d in dims})
            extra.insert(0, f"hadamard=auto ({'/'.join(modes)})" if modes else "hadamard=auto")
        if state.options.smooth_v == "auto":  # the rule of FP8AttentionOptions.for_keys, at its threshold
            on = state.options.for_keys(backend, AUTO_SMOOTH_V_MIN_KEYS).smooth_v
            extra.append(f"smooth_v=auto (on from {AUTO_SMOOTH_V_MIN_KEYS} keys)" if on else "smooth_v=auto (off)")
        if extra:
            text += ", " + ", ".join(extra)
    text, runs_fp8 = _what_runs(model, text)
    if not runs_fp8:
        return text
    if state is None or not state.fuse_rope:
        return text + ", fused RoPE off"
    text += f", fused RoPE on {len(state.fused)}/{len(attention_modules(model))} layers"
    if state.kv_cache == "fp8":
        text += f", fp8 KV cache on {len(state.fp8_cache_layers)}/{len(attention_modules(model))} layers"
        rotate = _cache_hadamard(state.options)
        dims = {m.head_dim for m in state.fused if isinstance(getattr(m, "head_dim", None), int)}
        if rotate is None:
            rotate = bool(dims) and all(rotatable(d) for d in dims)
        text += " (K Hadamard-rotated)" if rotate else ""
    elif state.kv_cache == "bf16":
        text += ", transformers' KV cache (bf16)"
    return text
