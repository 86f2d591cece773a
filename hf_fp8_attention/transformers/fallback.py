"""Why a call cannot run in fp8, and the bf16/fp16 attention that runs it instead.

Errors, not fallbacks (`_check_supported_call`): dropout (training), ``output_attentions=True`` and float32
activations. Fallbacks (`_fallback_reason`, a message for the one-time warning): logit softcapping,
attention sinks, a position bias, a head_dim without an fp8 kernel, a prepared 3-D/4-D mask, a sliding
window shorter than the keys. `_fallback_attention` then computes exactly what the model asked for in the
input dtype. Before any call, `static_fallback_reason` / `static_sliding_window` tell from an attention
module's attributes and config which of those reasons apply to all its calls, or to calls longer than its
window (for `prepare_model`'s warning and `describe_backend`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from .._constants import SUPPORTED_HEAD_DIMS, SUPPORTED_INPUT_DTYPES


def _check_supported_call(query: torch.Tensor, dropout: float, kwargs: dict) -> None:
    if dropout and dropout > 0.0:
        raise ValueError(
            f"fp8 attention has no attention dropout (its backward is straight-through, its forward "
            f"deterministic), got dropout={dropout} because the model is in training mode with attention_dropout "
            "> 0; set config.attention_dropout=0, call model.eval(), or train with attn_implementation='sdpa'"
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


def _softcap_reason(name: str) -> str:
    return f"{name} uses attention logit softcapping, which the fp8 kernels do not implement"


def _sinks_reason(name: str) -> str:
    return f"{name} uses attention sinks (s_aux), which the fp8 kernels do not implement"


def _head_dim_reason(name: str, d: int, d_k: int, d_v: int) -> str | None:
    if d != d_v or d_k != d:
        return f"{name} has query/key head_dim {d} but value head_dim {d_v}"
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {d} has no fp8 kernel (supported: {SUPPORTED_HEAD_DIMS})"
    return None


def _fallback_reason(module, query, key, value, attention_mask, kwargs) -> str | None:
    """Why this call cannot run in fp8 exactly (the same text for every call of that kind, so the warning
    is shown once), None when it can."""
    name = type(module).__name__
    if kwargs.get("softcap") is not None:
        return _softcap_reason(name)
    if kwargs.get("s_aux") is not None:
        return _sinks_reason(name)
    if kwargs.get("position_bias") is not None:
        return f"{name} adds a position bias to the scores, which the fp8 kernels do not take"
    reason = _head_dim_reason(name, query.shape[-1], key.shape[-1], value.shape[-1])
    if reason is not None:
        return reason
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            return (
                f"a prepared {attention_mask.dim()}-D attention mask (custom mask pattern, packed sequences or a "
                "user-built mask) cannot be expressed as fp8 causal attention over contiguous keys"
            )
        if attention_mask.shape[0] not in (1, query.shape[0]) or attention_mask.shape[1] != key.shape[2]:
            raise ValueError(
                f"2-D attention mask of shape {tuple(attention_mask.shape)} does not match batch {query.shape[0]} "
                f"and {key.shape[2]} keys"
            )
    window = _sliding_window(module, kwargs)
    if window is not None and key.shape[2] > window:
        return f"{name} uses a sliding window of {window} tokens, shorter than the keys, which fp8_sdpa does not mask"
    return None


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
    key = repeat_kv(key, h_q // key.shape[1])
    value = repeat_kv(value, h_q // value.shape[1])
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


# --- what a model's attention layers will run, as far as their attributes and configs tell ----------------


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention layers (modules with q/k/v/o projections)."""
    return [m for m in model.modules() if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))]


def static_fallback_reason(module: torch.nn.Module) -> str | None:
    """Why every call of this attention module will run in bf16/fp16 instead of fp8, as far as its attributes
    and config tell (the same text as `_fallback_reason` gives at call time); None when calls can run in
    fp8 (a call may still bring a reason of its own: a 4-D mask, a window shorter than its keys)."""
    name = type(module).__name__
    config = getattr(module, "config", None)
    if getattr(module, "attn_logit_softcapping", getattr(config, "attn_logit_softcapping", None)) is not None:
        return _softcap_reason(name)  # Gemma2; final_logit_softcapping is on the logits, not in attention
    if isinstance(getattr(module, "sinks", None), torch.Tensor):  # gpt-oss
        return _sinks_reason(name)
    d = getattr(module, "head_dim", None)
    if not isinstance(d, int):
        d = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // max(
            getattr(config, "num_attention_heads", 1) or 1, 1)
    d_qk = getattr(module, "qk_head_dim", None) or d
    return _head_dim_reason(name, d_qk, d_qk, getattr(module, "v_head_dim", None) or d_qk) if d_qk else None


def static_sliding_window(module: torch.nn.Module) -> int | None:
    """The sliding window this attention module passes to its calls, as far as its attributes and config tell:
    the module's own ``sliding_window`` (Qwen2/Qwen3/Gemma2: None on full layers), else the config's when the
    config has no per-layer ``layer_types`` (Mistral passes config.sliding_window to every layer)."""
    if "sliding_window" in vars(module):
        window = module.sliding_window
    else:
        config = getattr(module, "config", None)
        window = None if getattr(config, "layer_types", None) else getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None
