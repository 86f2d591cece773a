"""The only module that knows about HuggingFace Transformers: attention names, masks and `prepare_model`.

Attention layout follows `transformers.integrations.sdpa_attention.sdpa_attention_forward`: query
(B, H_q, S_q, D), key/value (B, H_kv, S_kv, D) in; (B, S_q, H_q, D) contiguous out. Works with
transformers 5.17 (attention modules take ``past_key_values``) and 5.24 (renamed to ``cache``).

What runs where:
- ``fp8_fa3`` / ``fp8_fa4`` / ``fp8_triton`` / ``fp8_reference`` / ``fp8`` (backend from the query's device at call time) are
  registered in `AttentionInterface`, each with a flash-style mask in `AttentionMaskInterface`: a 2-D
  (B, S_kv) padding mask, or None when nothing is padded.
- Padded batches stay exact in fp8: every row whose valid keys are one contiguous run (left or right
  padding) is attended over that run (rows packed into one `fp8_sdpa_varlen` call when they differ);
  padded query rows are zeros (as FlashAttention-2 returns them). Packed sequences that come with
  FlashAttention's ``cu_seq_lens_q/k`` kwargs run as varlen, as flash_attention_2 runs them.
- What fp8_sdpa cannot express (a non-contiguous or prepared 4-D mask, packing known only from position_ids or other custom
  mask patterns, a sliding window shorter than the keys, logit softcapping, attention sinks, a head_dim
  without an fp8 kernel) runs that call in bf16/fp16 attention after a one-time warning. Never silently
  wrong: fp8 runs only when its result is the one the model asked for.
- Errors instead of fallbacks: dropout (training), ``output_attentions=True``, and float32 activations
  (a silent per-call fallback would hide that nothing runs in fp8; load the model in bf16 instead).
"""

from __future__ import annotations

import itertools
import logging
import types
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    flash_attention_mask,
    sdpa_mask,
)

from ._constants import SUPPORTED_HEAD_DIMS, SUPPORTED_INPUT_DTYPES
from .backends import ATTN_IMPLEMENTATIONS, BACKENDS
from .dispatch import device_arch, plan_attention, resolve_backend
from .options import HADAMARD_MODES, FP8AttentionOptions
from .sdpa import fp8_sdpa, fp8_sdpa_varlen

logger = logging.getLogger(__name__)


# Attention classes whose forward is "project, optional per-head q/k RMSNorm, rotate-half RoPE on the
# full head_dim, cache update, attention, o_proj" in transformers 5.17 and 5.24, so the fused-RoPE forward
# below computes exactly what they compute. Matched by module path and class name, never by shape alone.
_FUSED_ROPE_CLASSES = {
    "transformers.models.llama.modeling_llama": "LlamaAttention",
    "transformers.models.mistral.modeling_mistral": "MistralAttention",
    "transformers.models.qwen2.modeling_qwen2": "Qwen2Attention",
    "transformers.models.qwen3.modeling_qwen3": "Qwen3Attention",
}

_STATE_ATTR = "_fp8_attention_state"
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# prepare_model(hadamard=..., smooth_k=..., smooth_v=...) stores the accuracy options on the model's
# configs (a config attribute, so a model given attn_implementation= directly can set it too); every
# fp8_sdpa call of that model passes them on.
_OPTIONS_ATTR = "fp8_attention_options"
_DEFAULT_OPTIONS = {"hadamard": "none", "smooth_k": False, "smooth_v": False, "qk_scales": "head"}


def _sdpa_options(module: torch.nn.Module) -> dict:
    options = getattr(getattr(module, "config", None), _OPTIONS_ATTR, None) or {}
    return {k: v for k, v in options.items() if k in _DEFAULT_OPTIONS and v != _DEFAULT_OPTIONS[k]}


# ---------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------


def _is_sliding_causal(mask_function) -> bool:
    """Whether ``mask_function`` is masking_utils' ``sliding_window_causal_mask_function(w)``.

    That function returns ``and_masks(sliding_window_overlay(w), causal_mask_function)``, a closure; it is
    recognised by its parts. Anything not recognised gets a materialised 4-D mask (correct, bf16 fallback).
    """
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return False
    for cell in mask_function.__closure__ or ():
        parts = cell.cell_contents
        if isinstance(parts, tuple) and len(parts) == 2:
            names = {getattr(p, "__qualname__", "") for p in parts if p is not causal_mask_function}
            return causal_mask_function in parts and names == {"sliding_window_overlay.<locals>.inner_mask"}
    return False


def fp8_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask function registered for the fp8 names in `AttentionMaskInterface`.

    Plain causal, bidirectional and sliding-window-causal patterns get the flash-style mask: the (B, S_kv)
    bool padding mask, or None without padding (the adapter handles causality and the window itself).
    Every other pattern (packed sequences found from position_ids, or/and overlays such as image tokens,
    chunked attention) is materialised as the 4-D bool mask sdpa would get, which the adapter runs in
    bf16: transformers gives no mask at all to names without a mask function, which would drop padding.
    """
    plain = mask_function in (causal_mask_function, bidirectional_mask_function)
    if plain or _is_sliding_causal(mask_function):
        # The adapter assumes the queries are the last q_length of the keys (bottom-right), true for no
        # cache and for dynamic caches. A StaticCache has empty slots after the queries: pass a mask that
        # stops at the last query (the adapter drops the keys past it), as flash_attention_mask does when
        # it is given a padding mask shorter than the cache.
        q_end = int(q_offset) + q_length
        kv_end = int(kv_offset) + kv_length
        mask = flash_attention_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs
        )
        if q_end == kv_end:
            return mask
        if plain and mask_function is causal_mask_function and int(kv_offset) == 0 and q_end < kv_length:
            if mask is None:
                return torch.ones(batch_size, q_end, dtype=torch.bool, device=kwargs.get("device", "cpu"))
            return mask[:, :q_end]
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Attention adapter
# ---------------------------------------------------------------------------------------------------------


def _check_inference_only(query: torch.Tensor, dropout: float, kwargs: dict) -> None:
    if dropout and dropout > 0.0:
        raise ValueError(
            f"fp8 attention is inference-only (no backward, no dropout), got dropout={dropout} because the model "
            "is in training mode with attention_dropout > 0; call model.eval(), or train with "
            "attn_implementation='sdpa'"
        )
    if kwargs.get("output_attentions", False):
        raise ValueError(
            "fp8 attention never materialises attention weights, so output_attentions=True cannot be served; "
            "use attn_implementation='eager' (model.set_attn_implementation('eager')) to get them"
        )
    if query.dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(
            f"fp8 attention takes bfloat16/float16 activations, got {query.dtype}: load the model in bf16 "
            "(from_pretrained(..., dtype=torch.bfloat16) or model.to(torch.bfloat16)), or use "
            "attn_implementation='sdpa' for a float32 model"
        )


def _sliding_window(module: torch.nn.Module, kwargs: dict) -> int | None:
    # Models pass the per-layer window as a kwarg (Mistral: config.sliding_window; Qwen2/3: None on full
    # layers). The module attribute covers models that only store it. config.sliding_window is not read on
    # its own: hybrid models set it while most layers are full attention.
    if "sliding_window" in kwargs:
        window = kwargs["sliding_window"]
    else:
        window = getattr(module, "sliding_window", None)
    return int(window) if window else None


class _PerForwardCache:
    """One value computed from some tensors, kept while those very tensors, unmodified, come back: the
    same mask / offsets objects reach every layer of one forward, so their host sync happens once per
    forward. Weak references (a freed tensor whose address is reused can never hit) and version counters
    (in-place edits recompute); inference tensors have no version counter, so they are never cached."""

    def __init__(self):
        self._refs, self._versions, self._value = None, None, None

    def get(self, tensors: tuple[torch.Tensor, ...], compute):
        if any(t.is_inference() for t in tensors):
            return compute()
        versions = tuple(t._version for t in tensors)
        if (self._refs is not None and all(r() is t for r, t in zip(self._refs, tensors))
                and self._versions == versions):
            return self._value
        value = compute()
        self._refs, self._versions, self._value = tuple(weakref.ref(t) for t in tensors), versions, value
        return value


_offsets_cache = _PerForwardCache()


def _packed_offsets(query, key, kwargs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cu_seqlens_q, cu_seqlens_k) as int32 CPU tensors when FlashAttention's packed-sequence kwargs came
    with this call (batch 1); None otherwise."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or query.shape[0] != 1:
        return None
    cu_k = cu_q if cu_k is None else cu_k
    # the one host sync; fp8_sdpa_varlen validates them against the tokens of every call
    return _offsets_cache.get((cu_q, cu_k), lambda: tuple(t.detach().to("cpu", torch.int32) for t in (cu_q, cu_k)))


def _fallback_reason(module, query, key, value, attention_mask, kwargs) -> tuple[str, str] | None:
    """(key, message) when this call cannot run in fp8 exactly, None when it can."""
    name = type(module).__name__
    if kwargs.get("softcap") is not None:
        return "softcap", f"{name} uses attention logit softcapping, which the fp8 kernels do not implement"
    if kwargs.get("s_aux") is not None:
        return "sinks", f"{name} uses attention sinks (s_aux), which the fp8 kernels do not implement"
    if kwargs.get("position_bias") is not None:
        return "position_bias", f"{name} adds a position bias to the scores, which the fp8 kernels do not take"
    d, d_v = query.shape[-1], value.shape[-1]
    if d != d_v or key.shape[-1] != d:
        return f"head_dim-{d}-{d_v}", f"{name} has query/key head_dim {d} but value head_dim {d_v}"
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head_dim-{d}", f"head_dim {d} has no fp8 kernel (supported: {SUPPORTED_HEAD_DIMS})"
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return (
                "mask-4d",
                f"a prepared {attention_mask.dim()}-D attention mask (custom mask pattern, packed sequences or a "
                "user-built mask) cannot be expressed as fp8 causal attention over contiguous keys",
            )
        if attention_mask.shape[0] not in (1, query.shape[0]) or attention_mask.shape[1] != key.shape[2]:
            raise ValueError(
                f"2-D attention mask of shape {tuple(attention_mask.shape)} does not match batch {query.shape[0]} "
                f"and {key.shape[2]} keys"
            )
    window = _sliding_window(module, kwargs)
    if window is not None and key.shape[2] > window:
        return (
            "sliding_window",
            f"{name} uses a sliding window of {window} < {key.shape[2]} keys, which fp8_sdpa does not mask",
        )
    return None


_spans_cache = _PerForwardCache()


def _padding_spans(mask2d: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per batch row, the [start, end) run of valid keys ((0, 0) if none); None if some row is not one run.
    One host sync per mask object (`_PerForwardCache`)."""
    return _spans_cache.get((mask2d,), lambda: _compute_padding_spans(mask2d))


def _compute_padding_spans(mask2d: torch.Tensor) -> list[tuple[int, int]] | None:
    valid = mask2d.to(torch.bool)
    length = valid.shape[1]
    counts = valid.sum(dim=1)
    first = valid.int().argmax(dim=1)
    end = length - valid.flip(1).int().argmax(dim=1)
    rows = torch.stack([counts, first, end], dim=1).tolist()  # the host sync
    spans = []
    for count, start, stop in rows:
        if count == 0:
            spans.append((0, 0))
        elif stop - start != count:
            return None
        else:
            spans.append((start, stop))
    return spans


def _fp8_padded(query, key, value, spans, *, is_causal, scaling, backend, options) -> torch.Tensor:
    """fp8 attention of each row over its valid keys. Returns (B, S_q, H_q, D), padded queries zero.

    Query i sits at key position S_kv - S_q + i (bottom-right alignment, as with a KV cache); it is valid
    when that position is inside the row's run [start, end). The valid queries then end at key end - 1, so
    bottom-right causal attention on the (queries, keys[start:end]) slice is exactly the masked attention.
    When every row has the same run, one `fp8_sdpa` call on the slices; otherwise the valid tokens are
    packed and go through `fp8_sdpa_varlen` (one quantize launch, one attention launch on triton/fa3).
    """
    batch, heads, s_q, dim = query.shape
    s_kv = key.shape[2]
    out = query.new_zeros(batch, s_q, heads, dim)
    runs = _query_runs(spans, s_q, s_kv, is_causal)
    if not runs:
        return out
    if len(runs) == batch and len(set(r[1:] for r in runs)) == 1:
        _, start, end, q_start, q_end = runs[0]
        causal = is_causal and q_end - q_start > 1
        res = fp8_sdpa(query[:, :, q_start:q_end], key[:, :, start:end], value[:, :, start:end],
                       is_causal=causal, scale=scaling, backend=backend, **options)
        out[:, q_start:q_end] = res.transpose(1, 2)
        return out
    plan = _packing_plan(runs, s_q, s_kv, query.device)
    idx_q, idx_k, cu_q, cu_k = plan
    pack = lambda x, idx: x.transpose(1, 2).reshape(-1, x.shape[1], dim).index_select(0, idx)  # noqa: E731
    res = fp8_sdpa_varlen(pack(query, idx_q), pack(key, idx_k), pack(value, idx_k), cu_q, cu_k,
                          is_causal=is_causal, scale=scaling, backend=backend, **options)
    out.view(batch * s_q, heads, dim).index_copy_(0, idx_q, res)
    return out


def _query_runs(spans, s_q, s_kv, is_causal) -> list[tuple[int, int, int, int, int]]:
    """(row, key start, key end, query start, query end) of every row with >= 1 valid query and key."""
    offset = s_kv - s_q
    runs = []
    for row, (start, end) in enumerate(spans):
        if is_causal and offset >= 0:
            q_start, q_end = max(0, start - offset), min(s_q, end - offset)
        else:  # non-causal (e.g. cross-attention): the key mask says nothing about which queries are valid
            q_start, q_end = 0, s_q
        if q_end > q_start and end > start:
            runs.append((row, start, end, q_start, q_end))
    return runs


# Every layer of one forward packs the same way: the last plan is kept (index tensors on the device).
_plan_cache: dict = {"key": None, "plan": None}


def _packing_plan(runs, s_q, s_kv, device):
    """Row indices of the valid queries / keys in the flattened (B * S, H, D) tensors (on `device`) and
    the int32 offsets of the packed sequences (on the host: `fp8_sdpa_varlen` checks them without a sync)."""
    key = (tuple(runs), s_q, s_kv, device)
    if _plan_cache["key"] == key:
        return _plan_cache["plan"]
    idx_q = torch.cat([torch.arange(row * s_q + a, row * s_q + b) for row, _, _, a, b in runs])
    idx_k = torch.cat([torch.arange(row * s_kv + a, row * s_kv + b) for row, a, b, _, _ in runs])
    cu = lambda lengths: torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)  # noqa: E731
    plan = (idx_q.to(device), idx_k.to(device), cu([b - a for *_, a, b in runs]), cu([b - a for _, a, b, _, _ in runs]))
    _plan_cache.update(key=key, plan=plan)
    return plan


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _fallback_attention(
    query, key, value, attention_mask, *, is_causal, scaling, window, softcap=None, sinks=None, position_bias=None
) -> torch.Tensor:
    """Attention in the input dtype (bf16/fp16) for calls fp8 cannot express. Returns (B, S_q, H_q, D).

    ``attention_mask``: None, a (B, L <= S_kv) bool padding mask (flash-style), or a prepared 3-D/4-D
    mask (bool, True = attend, or additive float) that already encodes causality and windows.
    """
    batch, h_q, s_q, _ = query.shape
    s_kv = key.shape[2]
    mask = None
    if attention_mask is not None and attention_mask.dim() >= 3:
        mask = attention_mask if attention_mask.dim() == 4 else attention_mask.unsqueeze(1)
    else:
        q_pos = torch.arange(s_kv - s_q, s_kv, device=query.device)[:, None]
        k_pos = torch.arange(s_kv, device=query.device)[None, :]
        allowed = None
        if is_causal:
            allowed = k_pos <= q_pos
        if window is not None:
            in_window = k_pos > q_pos - window
            allowed = in_window if allowed is None else allowed & in_window
        if allowed is not None:
            mask = allowed[None, None]
        if attention_mask is not None:
            padding = attention_mask.to(torch.bool)[:, None, None, :]
            mask = padding if mask is None else mask & padding
    key = _repeat_kv(key, h_q // key.shape[1])
    value = _repeat_kv(value, h_q // value.shape[1])
    if softcap is None and sinks is None and position_bias is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    else:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if position_bias is not None:
            scores = scores + position_bias.float()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        if sinks is not None:
            sink = sinks.float().reshape(1, -1, 1, 1).expand(batch, -1, s_q, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs.nan_to_num(0.0), value.float()).to(query.dtype)
    if mask is not None and mask.dtype == torch.bool:
        # Rows with no visible key: zeros, not NaN (padded queries), as the fp8 path returns them.
        out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return out.transpose(1, 2).contiguous()


def _fp8_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: str | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    _check_inference_only(query, dropout, kwargs)
    # As sdpa_attention_forward: the kwarg wins over the module attribute.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    s_q = query.shape[2]

    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == 1:
        attention_mask = attention_mask.expand(query.shape[0], -1)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] < key.shape[2]:
        # A StaticCache allocates more key slots than the mask covers (flash-style masks): those are empty.
        key = key[:, :, : attention_mask.shape[1]]
        value = value[:, :, : attention_mask.shape[1]]
    packed = _packed_offsets(query, key, kwargs)
    if packed is not None:
        # Packed sequences with FlashAttention's kwargs (e.g. DataCollatorWithFlattening(
        # return_flash_attn_kwargs=True)): as flash_attention_2 does, the offsets define the sequences and
        # the (block-diagonal) mask built from position_ids is not needed.
        reason = _fallback_reason(module, query, key, value, None, kwargs)
        if reason is None:
            cu_q, cu_k = packed
            out = fp8_sdpa_varlen(
                query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                is_causal=bool(is_causal), scale=scaling, backend=backend, **_sdpa_options(module),
            )
            return out[None], None
    reason = _fallback_reason(module, query, key, value, attention_mask, kwargs)
    if reason is None and attention_mask is not None:
        spans = _padding_spans(attention_mask)
        if spans is not None:
            out = _fp8_padded(
                query, key, value, spans, is_causal=is_causal, scaling=scaling, backend=backend,
                options=_sdpa_options(module),
            )
            return out, None
        reason = "mask-noncontiguous", "the padding mask of some batch row is not one contiguous run of keys"
    if reason is not None:
        key_, message = reason
        _warn_once(
            key_,
            f"hf_fp8_attention: {message}; running such calls in {query.dtype} attention instead of fp8 "
            "(correct, not faster). This warning is shown once.",
        )
        out = _fallback_attention(
            query,
            key,
            value,
            attention_mask,
            is_causal=is_causal,
            scaling=scaling,
            window=_sliding_window(module, kwargs),
            softcap=kwargs.get("softcap"),
            sinks=kwargs.get("s_aux"),
            position_bias=kwargs.get("position_bias"),
        )
        return out, None

    # No mask: all keys valid. Bottom-right causal also covers chunked prefill after a DynamicCache; one
    # decode query (S_q == 1) sees every key, so it needs no mask at all.
    causal = bool(is_causal) and s_q > 1
    out = fp8_sdpa(query, key, value, is_causal=causal, scale=scaling, backend=backend, **_sdpa_options(module))
    # fp8_sdpa returns a BHSD view of contiguous BSHD memory: this transpose is that memory, no copy.
    return out.transpose(1, 2), None


def _make_attention_forward(name: str, backend: str | None):
    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        return _fp8_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, backend=backend, **kwargs
        )

    attention_forward.__name__ = attention_forward.__qualname__ = f"{name}_attention_forward"
    attention_forward.__doc__ = (
        f"`{name}` attention for transformers' AttentionInterface (backend: {backend or 'auto from device'})."
    )
    return attention_forward


_ATTENTION_FORWARDS = {name: _make_attention_forward(name, backend) for name, backend in ATTN_IMPLEMENTATIONS.items()}


def register() -> None:
    """Register ``fp8``, ``fp8_fa3``, ``fp8_fa4``, ``fp8_triton`` and ``fp8_reference`` with transformers (idempotent)."""
    for name, forward in _ATTENTION_FORWARDS.items():
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, fp8_attention_mask)


# ---------------------------------------------------------------------------------------------------------
# Fused RoPE (per attention module instance)
# ---------------------------------------------------------------------------------------------------------


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
    cls = type(module)
    if _FUSED_ROPE_CLASSES.get(cls.__module__) != cls.__name__:
        return False
    if _forward_slot(module) is None:
        return False
    config = getattr(module, "config", None)
    if getattr(config, "partial_rotary_factor", None) not in (None, 1, 1.0):
        return False
    return all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


def _fused_rope_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """Llama-family attention forward with RoPE fused into fp8_sdpa's quantize step.

    Same result as the class forward, minus one bf16 rounding of the rotated q/k. Anything it does not
    cover goes to the class forward: a KV cache (it must store rotated keys), a padding mask, training
    mode, a name that is not fp8 anymore, a window shorter than the sequence, unsupported dtype/head_dim.
    """
    impl = getattr(self.config, "_attn_implementation", None)
    cache = kwargs.get("cache")  # transformers 5.24 name
    if cache is None:
        cache = kwargs.get("past_key_values")  # 5.17 name
    s = hidden_states.shape[-2]
    window = getattr(self, "sliding_window", None) or (
        getattr(self.config, "sliding_window", None) if type(self).__name__ == "MistralAttention" else None
    )
    use_fused = (
        not args
        and impl in ATTN_IMPLEMENTATIONS
        and cache is None
        and attention_mask is None
        and kwargs.get("cu_seq_lens_q") is None  # packed sequences: the adapter runs them as varlen
        and not self.training
        and not kwargs.get("output_attentions", False)
        and position_embeddings is not None
        and hidden_states.dtype in SUPPORTED_INPUT_DTYPES
        and self.head_dim in SUPPORTED_HEAD_DIMS
        and (window is None or s <= window)
        and position_embeddings[0].dim() == 3
        and position_embeddings[0].shape[-1] == self.head_dim
    )
    if not use_fused:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)

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
    out = fp8_sdpa(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        is_causal=bool(is_causal) and s > 1,
        scale=self.scaling,
        cos=cos,
        sin=sin,
        backend=ATTN_IMPLEMENTATIONS[impl],
        **_sdpa_options(self),
    )
    attn_output = out.transpose(1, 2).reshape(*input_shape, -1)
    return self.o_proj(attn_output), None


# ---------------------------------------------------------------------------------------------------------
# Model-level API
# ---------------------------------------------------------------------------------------------------------


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


def _attn_implementation_snapshot(model):
    config = model.config
    sub_keys = [k for k in getattr(config, "sub_configs", {}) if getattr(config, k, None) is not None]
    if not sub_keys:
        return config._attn_implementation
    snapshot = {"": config._attn_implementation}
    snapshot.update({k: getattr(config, k)._attn_implementation for k in sub_keys})
    return snapshot


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
            The four options are stored on the model's configs as ``fp8_attention_options`` and passed
            to every fp8_sdpa call of this model.
        fuse_rope: on Llama/Mistral/Qwen2/Qwen3 attention, fuse RoPE into the fp8 quantize kernel.

    It turns the KV cache off (config and generation_config): the fused-RoPE path needs un-rotated keys,
    a cache stores rotated ones. `unprepare_model` undoes everything.
    """
    if hadamard not in (None, *HADAMARD_MODES):
        accepted = ", ".join(map(repr, HADAMARD_MODES))
        raise ValueError(f"hadamard={hadamard!r} is not supported; accepted values: None, {accepted}")
    if hadamard not in (None, "none"):
        # fail here, not at the first forward: the rotation needs a power-of-two head_dim
        for head_dim in {m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)}:
            FP8AttentionOptions(hadamard=hadamard).check_head_dim(head_dim)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown fp8 attention backend {backend!r}; expected one of {BACKENDS} or None (auto)")
    dtype = getattr(model, "dtype", None)
    if dtype is not None and dtype not in SUPPORTED_INPUT_DTYPES:
        raise TypeError(
            f"fp8 attention needs a bfloat16/float16 model, this one is {dtype}: load it with "
            "from_pretrained(..., dtype=torch.bfloat16) or call model.to(torch.bfloat16) first"
        )
    name = plan_attention(_model_device(model), backend, FP8AttentionOptions(qk_scales=qk_scales)).backend
    register()
    if _STATE_ATTR in model.__dict__:
        unprepare_model(model)

    impl = f"fp8_{name}"
    state = {"attn_implementation": _attn_implementation_snapshot(model), "use_cache": [], "patched": []}
    model.set_attn_implementation(impl)
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(state["attn_implementation"])
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation (it does not dispatch through "
            "transformers' AttentionInterface), so fp8 attention cannot be enabled on it"
        )

    for config in _configs_with_cache(model):
        if hasattr(config, "use_cache"):
            state["use_cache"].append((config, config.use_cache))
            config.use_cache = False
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and hasattr(generation_config, "use_cache"):
        state["use_cache"].append((generation_config, generation_config.use_cache))
        generation_config.use_cache = False

    if fuse_rope:
        for module in model.modules():
            if _supports_fused_rope(module):
                setattr(module, _forward_slot(module), types.MethodType(_fused_rope_forward, module))
                state["patched"].append(module)
    options = {"hadamard": hadamard or "none", "smooth_k": bool(smooth_k), "smooth_v": bool(smooth_v),
               "qk_scales": qk_scales}
    state["options"] = options
    state["previous_options"] = [
        (config, config.__dict__[_OPTIONS_ATTR]) for config in _configs_with_cache(model) if _OPTIONS_ATTR in config.__dict__
    ]
    for config in _configs_with_cache(model):
        setattr(config, _OPTIONS_ATTR, dict(options))
    state["fuse_rope"] = fuse_rope
    setattr(model, _STATE_ATTR, state)
    return model


def unprepare_model(model):
    """Undo `prepare_model`: original forwards, previous attention implementation, use_cache. No-op otherwise."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    for module in state["patched"]:
        for slot in ("forward", "_old_forward"):  # an accelerate hook may have come or gone since
            bound = module.__dict__.get(slot)
            if getattr(bound, "__func__", None) is _fused_rope_forward and bound.__self__ is module:
                if slot == "forward":
                    del module.forward
                else:
                    module._old_forward = types.MethodType(type(module).forward, module)
    model.set_attn_implementation(state["attn_implementation"])
    for config, value in state["use_cache"]:
        config.use_cache = value
    for config in _configs_with_cache(model):
        config.__dict__.pop(_OPTIONS_ATTR, None)
    for config, previous in state.get("previous_options", ()):
        setattr(config, _OPTIONS_ATTR, previous)
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
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None:
        extra = [f"{k}={v}" for k, v in state.get("options", {}).items() if v != _DEFAULT_OPTIONS[k]]
        if extra:
            text += ", " + ", ".join(extra)
    total = _count_attention_modules(model)
    if state is None or not state["fuse_rope"]:
        return text + ", fused RoPE off"
    return text + f", fused RoPE on {len(state['patched'])}/{total} layers"
