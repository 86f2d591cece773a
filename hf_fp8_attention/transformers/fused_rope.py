"""Fused RoPE: a Llama-family attention forward that hands un-rotated q/k and cos/sin to `fp8_sdpa`, so the
rotation happens inside the fp8 quantize kernel (one bf16 rounding of the rotated q/k less).

`_fused_rope_forward` re-implements the class forward of the attention classes in `_FUSED_ROPE_CLASSES`,
so it is contained three ways:
- matched by module path and class name, never by shape alone (`_supports_fused_rope`);
- only on the transformers versions it was checked against (`FUSED_ROPE_CHECKED`, patch releases
  included); on another version nothing is fused and a one-time warning says why;
- a self-check per attention class at `prepare_model` (`self_check`): the fused and the class forward on
  the same tiny random input, with the same fp8 backend, must agree (`SELF_CHECK_MIN_COSINE`,
  `SELF_CHECK_MAX_REL_L2`); a class that does not is not fused, with a one-time warning naming it.
Not fusing never changes results beyond that rounding: the class forward runs, fp8 attention unfused.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from transformers.utils import logging as hf_logging

from .._constants import SUPPORTED_HEAD_DIMS, SUPPORTED_INPUT_DTYPES
from ..backends import ATTN_IMPLEMENTATIONS
from ..kv_cache import FP8Cache, FP8StaticCache, FP8StaticCacheLayer
from ..kv_cache.static import PADDED_BATCH_ERROR
from ..quantization.reference import rotate_half
from ..sdpa import fp8_sdpa
from .attention import module_options
from .bound import BoundMethod

logger = hf_logging.get_logger(__name__)

# Attention classes whose forward is "project, optional per-head q/k RMSNorm, rotate-half RoPE on the
# full head_dim, cache update, attention, o_proj" in transformers 5.17, 5.24 and 5.25 (whose four
# modeling files equal 5.24's), so the fused-RoPE forward
# below computes exactly what they compute. Matched by module path and class name, never by shape alone.
_FUSED_ROPE_CLASSES = {
    "transformers.models.llama.modeling_llama": "LlamaAttention",
    "transformers.models.mistral.modeling_mistral": "MistralAttention",
    "transformers.models.qwen2.modeling_qwen2": "Qwen2Attention",
    "transformers.models.qwen3.modeling_qwen3": "Qwen3Attention",
}
# The transformers minor releases whose attention forwards `_fused_rope_forward` was checked against
# (inclusive, any patch release: >=5.17,<5.26).
FUSED_ROPE_CHECKED = ("5.17", "5.25")
TRANSFORMERS_VERSION = transformers.__version__  # read by `version_checked` (tests patch it)

# Self-check: the fused forward's steps with RoPE done in torch the way Transformers does it
# (`_fp8_rope_in_torch`) hand fp8_sdpa the very tensors the class forward hands the fp8 adapter, so a class
# that still computes what the fused forward assumes gives the same output to rounding (0 on the tiny test
# models and the embedded SmolLM2: same fp8 inputs, same kernels); a forward that diverged (other RoPE
# convention, a missing norm or bias, another scale or mask) lands far outside. Comparing the kernel-RoPE
# path itself would not do: its one bf16 rounding less moves fp8 roundings, and on a real checkpoint's
# peaked attention that alone reached relative L2 0.09 (SmolLM2-135M, reference backend).
SELF_CHECK_MIN_COSINE = 0.9999
SELF_CHECK_MAX_REL_L2 = 0.01
SELF_CHECK_TOKENS = 16
_SELF_CHECK_SEED = 0
_SELF_CHECK_MAX_POSITION = 4096
_SELF_CHECK_ROPE_BASE = 10000.0


def version_checked(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed transformers) is in the `FUSED_ROPE_CHECKED` range."""
    minor = Version(version or TRANSFORMERS_VERSION).release[:2]
    low, high = (Version(v).release[:2] for v in FUSED_ROPE_CHECKED)
    return low <= minor <= high


def _forward_slot(module: torch.nn.Module) -> str | None:
    """The instance attribute that holds the forward to replace with the fused-RoPE one.

    "forward" on a plain module; "_old_forward" under an accelerate device hook (device_map="auto" puts
    one on each module it places: the hook's forward moves the inputs, then calls `_old_forward`); None
    when someone else already replaced the forward (leave theirs alone).
    """
    attrs = module.__dict__
    if "_hf_hook" in attrs and "_old_forward" in attrs:
        inner = attrs["_old_forward"]
        is_class_forward = getattr(inner, "__func__", None) is type(module).forward
        return "_old_forward" if is_class_forward and getattr(inner, "__self__", None) is module else None
    return None if "forward" in attrs else "forward"


def _supports_fused_rope(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of `_FUSED_ROPE_CLASSES`, in a shape the fused forward covers."""
    cls = type(module)
    if _FUSED_ROPE_CLASSES.get(cls.__module__) != cls.__name__:
        return False
    if _forward_slot(module) is None:
        return False
    config = getattr(module, "config", None)
    if getattr(config, "partial_rotary_factor", None) not in (None, 1, 1.0):
        return False
    if not all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
        return False
    return module.head_dim in SUPPORTED_HEAD_DIMS  # else the forward always defers to the class one


def fuse(module: torch.nn.Module) -> None:
    # a `BoundMethod`, not a types.MethodType: the module still pickles and deep-copies (see `bound`)
    setattr(module, _forward_slot(module), BoundMethod(_fused_rope_forward, module))


def is_fused(module: torch.nn.Module, slot: str = "forward") -> bool:
    bound = module.__dict__.get(slot)
    return getattr(bound, "__func__", None) is _fused_rope_forward and bound.__self__ is module


def unfuse(module: torch.nn.Module) -> None:
    """Put the class forward back (an accelerate hook may have come or gone since `fuse`)."""
    for slot in ("forward", "_old_forward"):
        if is_fused(module, slot):
            if slot == "forward":
                del module.forward
            else:
                module._old_forward = types.MethodType(type(module).forward, module)


def _window(self) -> int | None:
    return getattr(self, "sliding_window", None) or (
        getattr(self.config, "sliding_window", None) if type(self).__name__ == "MistralAttention" else None
    )


def cache_arg(kwargs):
    """The cache a forward call brings, under either of transformers' names for it."""
    cache = kwargs.get("cache")  # transformers 5.24 name
    return kwargs.get("past_key_values") if cache is None else cache  # 5.17 name


def _takes_fused_path(self, hidden_states, position_embeddings, attention_mask, args, kwargs,
                      with_cache: bool = False, static: bool = False) -> bool:
    """Whether the fused forward computes this call. with_cache: the call's cache is an `FP8Cache` (checked
    by the caller), which the fused forward writes and reads itself; any other cache goes to the class one.
    static: an `FP8StaticCache` layer, whose mask the fused forward takes and ignores (it attends the filled
    slots): the 2-D one of eager calls (`_check_static_mask` refuses padding there) or, while compiling, the
    4-D one `masks.fp8_attention_mask` builds for a static cache (a 4-D mask of the caller's own in eager
    goes to the class forward)."""
    window = _window(self)
    return (
        not args
        and getattr(self.config, "_attn_implementation", None) in ATTN_IMPLEMENTATIONS
        and (with_cache or cache_arg(kwargs) is None)
        and (attention_mask is None
             or (static and (attention_mask.dim() == 2 or torch.compiler.is_compiling())))
        and kwargs.get("cu_seq_lens_q") is None  # packed sequences: the adapter runs them as varlen
        and not self.training
        and not kwargs.get("output_attentions", False)
        and position_embeddings is not None
        and hidden_states.dtype in SUPPORTED_INPUT_DTYPES
        and self.head_dim in SUPPORTED_HEAD_DIMS
        and (window is None or hidden_states.shape[-2] <= window)
        and position_embeddings[0].dim() == 3
        and position_embeddings[0].shape[-1] == self.head_dim
    )


def _fused_rope_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """Llama-family attention forward with RoPE fused into fp8_sdpa's quantize step.

    Same result as the class forward, minus one bf16 rounding of the rotated q/k. With an `FP8Cache` whose
    layer for this module stores fp8 (`prepare_model(kv_cache="fp8")`), the new un-rotated keys/values are
    written into it (RoPE in the write kernel) and the queries attend from it (`_fp8_with_cache`).
    Anything else goes to the class forward: another KV cache (it stores rotated keys), a padding mask,
    training mode, a name that is not fp8 anymore, a window shorter than the sequence, unsupported
    dtype/head_dim.
    """
    layer = _fp8_cache_layer(self, kwargs)
    static = isinstance(layer, FP8StaticCacheLayer)
    if layer is not None and _takes_fused_path(self, hidden_states, position_embeddings, attention_mask, args,
                                               kwargs, with_cache=True, static=static):
        if static:
            _check_static_mask(attention_mask, layer, hidden_states.shape[-2])
        return _attention_forward(self, hidden_states, position_embeddings, kwargs,
                                  functools.partial(_fp8_with_cache, layer=layer))
    if not _takes_fused_path(self, hidden_states, position_embeddings, attention_mask, args, kwargs):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    return _attention_forward(self, hidden_states, position_embeddings, kwargs, _fp8_rope_in_kernel)


def _check_static_mask(attention_mask, layer, n_new: int) -> None:
    """An `FP8StaticCache` step attends causally over the filled slots and ignores the mask: refuse a padded
    batch. Checked where a chunk (n_new > 1, a prefill) runs outside a compiled step (a host sync there);
    decode steps extend an unpadded batch with unpadded tokens."""
    if attention_mask is None or n_new == 1 or torch.compiler.is_compiling():
        return
    filled = layer.cumulative_length + n_new
    if not bool((attention_mask.sum(-1) == filled).all()):
        raise ValueError(PADDED_BATCH_ERROR)


def _fp8_cache_layer(self, kwargs):
    """This module's `FP8CacheLayer` in the call's cache, or None (no FP8Cache, or a bf16 layer there)."""
    cache = cache_arg(kwargs)
    if not isinstance(cache, (FP8Cache, FP8StaticCache)) or not isinstance(getattr(self, "layer_idx", None), int):
        return None
    return cache.fp8_layer(self.layer_idx)


def _fp8_with_cache(self, query, key, value, cos, sin, *, is_causal, scale, layer):
    """The new keys/values go into the fp8 cache (rotated and quantized once, by the write kernel). A first
    chunk (empty cache) then runs the plain fused fp8 attention on its own keys, which are all it sees;
    later chunks and decode steps write and read the cached fp8 blocks in one step
    (`FP8CacheLayer.append_attend`: in a decode step the write launch also prepares the queries). BHSD
    views in, BHSD out. A static layer (`FP8StaticCacheLayer`, length on the device) does the same where it
    can read its length: a first chunk outside a compiled step (one host sync; generate's prefill); inside
    one, and in decode steps, it writes and reads the cache in one step (`append_attend`)."""
    if isinstance(layer, FP8StaticCacheLayer):  # its length is read on the host only where that is allowed
        first = query.shape[2] > 1 and not torch.compiler.is_compiling() and layer.length == 0
    else:
        first = layer.get_seq_length() == 0
    if first:
        layer.append(key, value, cos, sin)
        return _fp8_rope_in_kernel(self, query, key, value, cos, sin, is_causal=is_causal, scale=scale)
    return layer.append_attend(query.transpose(1, 2), key, value, cos, sin, scale=scale).transpose(1, 2)


def _attention_forward(self, hidden_states, position_embeddings, kwargs, attend):
    """The class forward's steps (projections, Qwen3's q/k norm, attention, o_proj) with ``attend(self, q, k,
    v, cos, sin, is_causal=, scale=)`` (BHSD views in, BHSD out) doing RoPE and attention."""
    s = hidden_states.shape[-2]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape)
    key = self.k_proj(hidden_states).view(hidden_shape)
    value = self.v_proj(hidden_states).view(hidden_shape)
    if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
        query = self.q_norm(query)
        key = self.k_norm(key)
    cos, sin = position_embeddings
    is_causal = kwargs.get("is_causal")
    is_causal = self.is_causal if is_causal is None else is_causal
    out = attend(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cos, sin,
                 is_causal=bool(is_causal) and s > 1, scale=self.scaling)
    attn_output = out.transpose(1, 2).reshape(*input_shape, -1)
    return self.o_proj(attn_output), None


def _fp8_rope_in_kernel(self, query, key, value, cos, sin, *, is_causal, scale):
    """Un-rotated q/k and the tables go to fp8_sdpa: the quantize kernel applies RoPE."""
    return fp8_sdpa(query, key, value, is_causal=is_causal, scale=scale, cos=cos, sin=sin,
                    backend=ATTN_IMPLEMENTATIONS[self.config._attn_implementation], **module_options(self).changed())


def _fp8_rope_in_torch(self, query, key, value, cos, sin, *, is_causal, scale):
    """The self-check's stand-in for `_fp8_rope_in_kernel`: rotate-half RoPE applied in the input dtype the way
    Transformers' apply_rotary_pos_emb does, then the same fp8_sdpa call without the tables, i.e. exactly
    what the class forward hands the fp8 adapter if it computes what the fused forward assumes. (The
    kernel's own RoPE equals this rotation up to that rounding; the quantize tests check it bit for bit
    against the torch reference.)"""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    query, key = ((t * c) + (rotate_half(t) * s) for t in (query, key))
    return _fp8_rope_in_kernel(self, query, key, value, None, None, is_causal=is_causal, scale=scale)


# ---------------------------------------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCheck:
    """Fused vs class forward of one attention module on a tiny random input."""

    cosine: float = float("nan")
    rel_l2: float = float("nan")
    error: str | None = None  # why the comparison could not be made

    @property
    def passed(self) -> bool:
        return self.error is None and self.cosine >= SELF_CHECK_MIN_COSINE and self.rel_l2 <= SELF_CHECK_MAX_REL_L2

    def describe(self) -> str:
        if self.error is not None:
            return self.error
        return (f"cosine {self.cosine:.5f} (needs >= {SELF_CHECK_MIN_COSINE}), relative L2 {self.rel_l2:.4f} "
                f"(needs <= {SELF_CHECK_MAX_REL_L2})")


def _call(module, forward, *args, **kwargs):
    """``forward(module, ...)``, through the module's accelerate hook if it has one (it moves the inputs to
    the execution device and loads offloaded weights), as the module's own call would run it."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return forward(module, *args, **kwargs)
    args, kwargs = hook.pre_forward(module, *args, **kwargs)
    return hook.post_forward(module, forward(module, *args, **kwargs))


def _self_check_inputs(module, dtype: torch.dtype):
    """Hidden states (1, S, hidden) ~ N(0, 1) and rotate-half cos/sin (1, S, head_dim) for random positions
    (standard RoPE frequencies, base 10000), from a local seeded generator (the global RNG is untouched)."""
    window = _window(module)
    tokens = min(SELF_CHECK_TOKENS, window) if window else SELF_CHECK_TOKENS
    gen = torch.Generator().manual_seed(_SELF_CHECK_SEED)
    hidden = torch.randn(1, tokens, module.config.hidden_size, generator=gen)
    positions = torch.randint(0, _SELF_CHECK_MAX_POSITION, (tokens,), generator=gen).float()
    d = module.head_dim
    inv_freq = _SELF_CHECK_ROPE_BASE ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions[:, None] * inv_freq[None]
    emb = torch.cat([angles, angles], dim=-1)[None]
    weight = module.q_proj.weight
    device = weight.device if weight.device.type != "meta" else torch.device("cpu")  # offloaded: the hook moves
    return tuple(t.to(device, dtype) for t in (hidden, emb.cos(), emb.sin()))


def _checked_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    return _attention_forward(self, hidden_states, position_embeddings, kwargs, _fp8_rope_in_torch)


def self_check(module: torch.nn.Module, dtype: torch.dtype) -> SelfCheck:
    """Run the fused forward's steps (`_checked_forward`: RoPE in torch, see SELF_CHECK_MIN_COSINE) and the
    class forward on one tiny random input and compare the outputs.

    The model's attention implementation must already be the fp8 one, so both run the same fp8 backend and
    options (the class forward's attention goes through the fp8 adapter, unfused). Leaves no state behind:
    no attributes set, no global RNG drawn, no autograd graph.
    """
    hidden, cos, sin = _self_check_inputs(module, dtype)
    kwargs = dict(position_embeddings=(cos, sin), attention_mask=None)
    if not _takes_fused_path(module, hidden, (cos, sin), None, (), {}):
        return SelfCheck(error="the fused path does not apply to this module (attention name, dtype or head_dim)")
    try:
        with torch.no_grad():
            ref = _call(module, type(module).forward, hidden, **kwargs)[0].float()
            got = _call(module, _checked_forward, hidden, **kwargs)[0].float()
    except Exception as e:  # a forward whose signature or internals changed: do not fuse, say why
        return SelfCheck(error=f"the self-check raised {type(e).__name__}: {e}")
    if ref.shape != got.shape:
        return SelfCheck(error=f"output shapes differ: class {tuple(ref.shape)}, fused {tuple(got.shape)}")
    ref, got = ref.flatten().to(got.device), got.flatten()
    cosine = torch.nn.functional.cosine_similarity(ref, got, dim=0).item()
    rel_l2 = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return SelfCheck(cosine=cosine, rel_l2=rel_l2)


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def fusable_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of ``model`` whose RoPE can be fused: a supported class on a checked
    transformers version, in eval mode, whose class passed `self_check` on its first module. Warns once
    for each reason a supported module is left unfused."""
    candidates = [m for m in model.modules() if _supports_fused_rope(m)]
    if not candidates:
        return []
    if not version_checked():
        low, high = FUSED_ROPE_CHECKED
        logger.warning_once(
            f"hf_fp8_attention: fused RoPE is off: it re-implements the Llama/Mistral/Qwen2/Qwen3 attention "
            f"forward as of transformers {low} to {high}.x, and this is transformers {TRANSFORMERS_VERSION}; "
            "fp8 attention still runs, with RoPE applied by the model (unfused)"
        )
        return []
    dtype = getattr(model, "dtype", None)
    verdicts: dict[type, SelfCheck] = {}
    fusable = []
    for module in candidates:
        cls = type(module)
        if module.training:
            logger.warning_once(
                f"hf_fp8_attention: fused RoPE is off for {_class_name(cls)} modules in training mode; call "
                "model.eval() before prepare_model to fuse it"
            )
            continue
        if cls not in verdicts:
            verdicts[cls] = self_check(module, dtype if dtype in SUPPORTED_INPUT_DTYPES else module.q_proj.weight.dtype)
            if not verdicts[cls].passed:
                logger.warning_once(
                    f"hf_fp8_attention: fused RoPE is off for {_class_name(cls)}: its fused forward does not "
                    f"match the class forward on the self-check ({verdicts[cls].describe()}); fp8 attention "
                    "still runs, with RoPE applied by the model (unfused)"
                )
        if verdicts[cls].passed:
            fusable.append(module)
    return fusable
