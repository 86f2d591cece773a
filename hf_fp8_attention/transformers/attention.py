"""The fp8 attention names and the adapter transformers calls for them.

Layout as `transformers.integrations.sdpa_attention.sdpa_attention_forward`: query (B, H_q, S_q, D),
key/value (B, H_kv, S_kv, D) in; (B, S_q, H_q, D) contiguous out. One name per entry of
`backends.ATTN_IMPLEMENTATIONS` (``fp8`` picks the backend from the query's device at call time), each
registered in `AttentionInterface` with `masks.fp8_attention_mask` in `AttentionMaskInterface`. ``fp8``
passes backend=None down, so its calls also follow the GPU's speed table (bf16 attention on the shapes
where fp8 measured slower; `sdpa.fp8_sdpa`); the named ``fp8_<backend>`` names always run fp8.

The accuracy options of a model live on its config as the plain dict ``fp8_attention_options`` (JSON
serialisable; `prepare_model` writes it, a user may set it for a model given attn_implementation=
directly); every call reads them through `FP8AttentionOptions.coerce` (unknown keys are an error).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import logging as hf_logging

from ..backends import ATTN_IMPLEMENTATIONS
from ..options import FP8AttentionOptions
from ..sdpa import fp8_sdpa, fp8_sdpa_varlen
from .fallback import _check_supported_call, _fallback_attention, _fallback_reason, _sliding_window
from .masks import fp8_attention_mask
from .unpad import _fp8_padded, _packed_offsets, _padding_spans

logger = hf_logging.get_logger(__name__)

OPTIONS_ATTR = "fp8_attention_options"


def module_options(module: torch.nn.Module) -> FP8AttentionOptions:
    """The accuracy options stored on ``module.config`` (defaults when there are none)."""
    return FP8AttentionOptions.coerce(getattr(getattr(module, "config", None), OPTIONS_ATTR, None) or None)


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
    _check_supported_call(query, dropout, kwargs)
    options = module_options(module)
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
        if _fallback_reason(module, query, key, value, None, kwargs) is None:
            cu_q, cu_k = packed
            out = fp8_sdpa_varlen(
                query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                is_causal=bool(is_causal), scale=scaling, backend=backend, **options.changed(),
            )
            return out[None], None
    reason = _fallback_reason(module, query, key, value, attention_mask, kwargs)
    if reason is None and attention_mask is not None:
        spans = _padding_spans(attention_mask)
        if spans is not None:
            out = _fp8_padded(
                query, key, value, spans, is_causal=is_causal, scaling=scaling, backend=backend, options=options
            )
            return out, None
        reason = "the padding mask of some batch row is not one contiguous run of keys"
    if reason is not None:
        logger.warning_once(
            f"hf_fp8_attention: {reason}; running such calls in {query.dtype} attention instead of fp8 "
            "(correct, not faster). This warning is shown once."
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
    out = fp8_sdpa(query, key, value, is_causal=causal, scale=scaling, backend=backend, **options.changed())
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
    """Register every name of `ATTN_IMPLEMENTATIONS` (``fp8``, ``fp8_fa3``, ...) with transformers (idempotent)."""
    for name, forward in _ATTENTION_FORWARDS.items():
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, fp8_attention_mask)
