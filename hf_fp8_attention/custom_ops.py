"""The torch custom op around the fp8 attention pipeline, so `torch.compile(fullgraph=True)` sees one opaque node.

Triton launches and the FA3/FA4 extension calls cannot be traced by dynamo; the op hides them and its fake
computes only the output's shape and dtype. One op serves fixed-length and packed (varlen) batches, as
FA3's ``_flash_attn_forward`` does: the ``cu_seqlens_*`` arguments are optional. The `FP8AttentionOptions`
object is flattened into its four fields here, the only place it is.

Schema sentinels: ``max_seqlen_q/k`` None with offsets given = validate and measure the offsets inside the
op (a traced graph cannot read them on the host); ``scale`` is always resolved to a float before the call.
"""

from __future__ import annotations

import torch

from .attention import fp8_attention
from .options import FP8AttentionOptions


@torch.library.custom_op("hf_fp8_attention::fp8_sdpa", mutates_args=())
def fp8_sdpa_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    backend: str,
    quantizer: str,
    hadamard: str,
    smooth_k: bool,
    smooth_v: bool,
    qk_scales: str,
) -> torch.Tensor:
    """`attention.fp8_attention` with the options flattened: (B, H_q, S_q, D) query -> (B, S_q, H_q, D);
    packed (total_q, H_q, D) -> (total_q, H_q, D)."""
    options = FP8AttentionOptions(hadamard, smooth_k, smooth_v, qk_scales)
    return fp8_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cos, sin,
                         is_causal, scale, backend, quantizer, options)


@fp8_sdpa_op.register_fake
def _fp8_sdpa_fake(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cos, sin, is_causal,
                   scale, backend, quantizer, hadamard, smooth_k, smooth_v, qk_scales):
    if cu_seqlens_q is not None:  # packed: same shape as the packed query
        return query.new_empty(query.shape)
    b, h_q, s_q, d = query.shape
    return query.new_empty((b, s_q, h_q, d))


def flatten(options: FP8AttentionOptions) -> tuple[str, bool, bool, str]:
    """The op's option arguments, in schema order."""
    return options.hadamard, options.smooth_k, options.smooth_v, options.qk_scales
