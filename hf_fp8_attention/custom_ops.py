"""The torch custom op around the fp8 attention pipeline, so `torch.compile(fullgraph=True)` sees one opaque node.

Triton launches and the FA3/FA4 extension calls cannot be traced by dynamo; the op hides them and its fake
computes only the output's shape and dtype. One op serves fixed-length and packed (varlen) batches, as
FA3's ``_flash_attn_forward`` does: the ``cu_seqlens_*`` arguments are optional. The arguments are those of
`attention.fp8_attention`, with the `FP8AttentionOptions` object flattened into its fields: the only
place it is.

Autograd: straight-through. The backward is a second opaque op that recomputes the exact attention in the
input dtype from the saved inputs and returns its gradients (`attention.exact_attention_grads`), so training
through fp8 attention gets the gradients of the attention it approximates, never the silent garbage of
differentiating nothing; cos/sin, offsets and options get no gradient.

Schema sentinels: ``max_seqlen_q/k`` None with offsets given = validate and measure the offsets inside the
op (a traced graph cannot read them on the host); ``scale`` is always resolved to a float before the call.
"""

from __future__ import annotations

import dataclasses

import torch

from .attention import exact_attention_grads, fp8_attention
from .options import FP8AttentionOptions

_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int? max_seqlen_q, "
    "int? max_seqlen_k, Tensor? cos, Tensor? sin, bool is_causal, float scale, str backend, str quantizer, "
    "str hadamard, bool smooth_k, bool? smooth_v, str qk_scales, str qk_format, str v_scales) -> Tensor"
)
_N_OPTIONS = len(dataclasses.fields(FP8AttentionOptions))


def _fp8_sdpa(*args) -> torch.Tensor:
    """(B, H_q, S_q, D) query -> (B, S_q, H_q, D); packed (total_q, H_q, D) -> (total_q, H_q, D)."""
    return fp8_attention(*args[:-_N_OPTIONS], FP8AttentionOptions(*args[-_N_OPTIONS:]))


fp8_sdpa_op = torch.library.custom_op("hf_fp8_attention::fp8_sdpa", _fp8_sdpa, mutates_args=(), schema=_SCHEMA)


@fp8_sdpa_op.register_fake
def _fp8_sdpa_fake(query, key, value, cu_seqlens_q, *unused):
    if cu_seqlens_q is not None:  # packed: same shape as the packed query
        return query.new_empty(query.shape)
    b, h_q, s_q, d = query.shape
    return query.new_empty((b, s_q, h_q, d))


@torch.library.custom_op("hf_fp8_attention::fp8_sdpa_backward", mutates_args=())
def fp8_sdpa_backward_op(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, cos: torch.Tensor | None,
    sin: torch.Tensor | None, is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the exact attention w.r.t. query, key, value (their shapes and dtypes)."""
    return exact_attention_grads(grad_out, query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, is_causal, scale)


@fp8_sdpa_backward_op.register_fake
def _fp8_sdpa_backward_fake(grad_out, query, key, value, *unused):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, cu_q, cu_k, _, _, cos, sin, is_causal, scale = inputs[:11]
    ctx.save_for_backward(query, key, value, cu_q, cu_k, cos, sin)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, grad_out):
    query, key, value, cu_q, cu_k, cos, sin = ctx.saved_tensors
    grads = fp8_sdpa_backward_op(grad_out, query, key, value, cu_q, cu_k, cos, sin, ctx.is_causal, ctx.scale)
    return (*grads, *(None,) * (len(_SCHEMA_ARGS) - 3))


_SCHEMA_ARGS = _SCHEMA[1 : _SCHEMA.index(")")].split(", ")
fp8_sdpa_op.register_autograd(_backward, setup_context=_setup_context)


def flatten(options: FP8AttentionOptions) -> tuple:
    """The op's option arguments, in schema (= field) order; smooth_v="auto" goes as None (the options turn
    None back into "auto", which the op resolves once it knows the key length)."""
    return tuple(None if (f.name == "smooth_v" and v == "auto") else v
                 for f, v in zip(dataclasses.fields(options), dataclasses.astuple(options)))
