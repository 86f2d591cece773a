"""The public FP8 SDPA entry points: validate, build the options, plan, run the pipeline.

`fp8_sdpa` takes BHSD views (any strides; Transformers' are views of BSHD memory) and returns a BHSD view of
a contiguous BSHD tensor in the input dtype; `fp8_sdpa_varlen` takes FlashAttention's packed layout. Both
validate here (`_check_inputs`, messages that name the limit and the alternative), build one
`FP8AttentionOptions`, plan the backend and quantizer (`dispatch.plan_attention`) and run
`attention.fp8_attention`: directly in eager mode, as the custom op (`custom_ops`) under torch.compile.

With no backend named, a call whose shape the GPU's speed table measured faster in bf16 runs
`speed_table.bf16_attention` instead (`dispatch.runs_bf16`), decided here, before and outside the op.
"""

from __future__ import annotations

import math

import torch

from ._constants import FP8_DTYPE, SUPPORTED_HEAD_DIMS, SUPPORTED_INPUT_DTYPES
from .attention import fp8_attention, longest_sequences
from .custom_ops import flatten, fp8_sdpa_op
from .dispatch import Plan, bf16_impl, plan_attention, runs_bf16
from .options import FP8AttentionOptions
from .speed_table import bf16_attention, bf16_attention_varlen


def _check_inputs(query, key, value, *, is_causal, scale, cos, sin) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_INPUT_DTYPES:
            hint = (
                "it is already FP8: pass the bf16/fp16 tensors, quantization is done here"
                if t.dtype == FP8_DTYPE or t.dtype == torch.float8_e5m2
                else "cast the model/inputs to torch.bfloat16 (e.g. from_pretrained(..., dtype=torch.bfloat16)) "
                "or use attn_implementation='sdpa'"
            )
            raise TypeError(f"fp8 attention takes bfloat16 or float16 {name}, got {t.dtype}: {hint}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} has a zero-size dimension {tuple(t.shape)}; use attn_implementation='sdpa'")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query/key/value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query/key/value are on different devices: {query.device}, {key.device}, {value.device}")
    b, h_q, s_q, d = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes differ: {tuple(key.shape)} vs {tuple(value.shape)}")
    b_k, h_kv, s_kv, d_k = key.shape
    if b_k != b:
        raise ValueError(f"batch sizes differ: query {b}, key/value {b_k}")
    if d_k != d:
        raise ValueError(f"head_dim differs: query {d}, key/value {d_k}")
    if h_q % h_kv != 0:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv}) for GQA/MQA")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {d} is not supported by fp8 attention (supported: {SUPPORTED_HEAD_DIMS}); "
            "use attn_implementation='sdpa' for this model"
        )
    if is_causal and s_q > s_kv:
        raise ValueError(
            f"causal attention with more queries than keys (S_q={s_q} > S_kv={s_kv}) would leave rows with no "
            "key; the causal mask is bottom-right aligned, pass S_q <= S_kv"
        )
    if scale is not None and (isinstance(scale, bool) or not (isinstance(scale, (int, float))
                                                              and math.isfinite(scale) and scale > 0)):
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(head_dim)), got {scale!r}")
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin for fused RoPE, or neither")
    if cos is not None:
        if s_q != s_kv:
            raise ValueError(f"fused RoPE needs S_q == S_kv (prefill without a KV cache), got {s_q} and {s_kv}")
        if cos.shape != sin.shape:
            raise ValueError(f"cos and sin shapes differ: {tuple(cos.shape)} vs {tuple(sin.shape)}")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1:] != (s_q, d):
                raise ValueError(f"{name} must have shape ({b} or 1, {s_q}, {d}), got {tuple(t.shape)}")
            if t.device != query.device:
                raise ValueError(f"{name} is on {t.device}, query on {query.device}")


def fp8_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
    is_causal: bool = False, scale: float | None = None, cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None, backend: str | None = None,
    hadamard: str = "auto", smooth_k: bool = False, smooth_v: bool | str = "auto", qk_scales: str = "head",
    qk_format: str = "e4m3", v_scales: str = "head",
) -> torch.Tensor:
    """FP8 scaled dot-product attention with per-(batch, KV head) scales.

    Args:
        query: (B, H_q, S_q, D) bf16/fp16, any strides.
        key, value: (B, H_kv, S_kv, D), same dtype; H_q % H_kv == 0 (GQA/MQA).
        is_causal: causal mask aligned to the bottom right (top-left when S_q == S_kv); S_q > S_kv is an error.
        scale: softmax scale, default 1/sqrt(D).
        cos, sin: (B or 1, S_q, D) rotary tables: query/key are then un-rotated and RoPE (rotate-half
            convention) is applied inside the quantize kernel. Needs S_q == S_kv.
        backend: "fa3", "fa4", "triton", "reference" (always fp8), or None: the fp8 backend picked from the
            device (see `dispatch`), except where this GPU's speed table (``hf_fp8_attention/tables``,
            written by ``scripts/tune_dispatch.py``) measured that backend slower than bf16 attention for
            this shape (S_q, S_kv, causal, head_dim, GQA group, batch): such calls run bf16/fp16 attention
            (FA3 bf16 on Hopper when installed, else torch SDPA; RoPE applied first when cos/sin are given),
            so their output is exact attention in the input dtype, not fp8's. No table for the GPU, or
            ``HF_FP8_ATTENTION_SPEED_TABLE=off``: fp8 on every call. `dispatch.describe_dispatch` says which.
        hadamard: accuracy mode for outlier-heavy inputs: "auto" (default: "qk" where the head dim is a power
            of two <= 256 and Q/K use per-head e4m3 scales, else "none"; `options.AUTO_HADAMARD` says why), "none", "qk" (Q and K rotated by a
            normalised Hadamard matrix inside the quantize kernel; Q.K^T unchanged), "qkv" (V too; the output
            is rotated back) or "v_only". The explicit rotations need a power-of-two head_dim <= 256.
        smooth_k: subtract K's per-channel mean over the sequence before quantizing (exact for softmax).
        smooth_v: subtract V's per-channel mean before quantizing and add it back to the output. "auto"
            (default): on for the fa3/fa4/reference backends from 32k keys on (`options.AUTO_SMOOTH_V_MIN_KEYS`
            says why: FA3's fp8 P.V accumulation loses precision over long rows when V has a channel offset),
            off otherwise (the triton kernel accumulates in float32 per key block).
        qk_scales: "head" (one Q and one K scale per (batch, KV head), what FA3/FA4 take) or "block" (one per
            16 tokens of one head, computed by the quantize kernel from the tiles it reads anyway: more
            accurate where a few tokens carry large values). "block" runs on the triton backend (reference
            on CPU); naming fa3/fa4 with it is an error.
        qk_format: "e4m3" or "int8" (Q and K as int8 with a scale per 16 (Q) / 128 (K) tokens, one K scale per
            key tile of the kernel, Q.K^T as an int8 dot with
            int32 accumulation, as SageAttention does; V and P stay e4m3). "int8" runs on the triton backend
            (reference on CPU); naming fa3/fa4 with it is an error.
        v_scales: "head" or "block" (one V scale per 128 tokens of one KV head; needs qk_scales="block" or
            qk_format="int8", and not smooth_v=True). With every scale per block the quantize kernel reads
            Q/K/V once instead of twice. The triton backend (reference on CPU); fa3/fa4 with it is an error.
    Returns:
        (B, H_q, S_q, D) in the input dtype: a transposed view of a contiguous (B, S_q, H_q, D) tensor.
    """
    _check_inputs(query, key, value, is_causal=is_causal, scale=scale, cos=cos, sin=sin)
    options = FP8AttentionOptions.of(hadamard, smooth_k, smooth_v, qk_scales, qk_format, v_scales)
    is_causal = bool(is_causal)
    plan = _plan(query, backend, options)
    if backend is None and not query.is_meta and runs_bf16(
        query.device, plan.backend, batch=query.shape[0], heads_q=query.shape[1], heads_kv=key.shape[1],
        s_q=query.shape[2], s_kv=key.shape[2], head_dim=query.shape[3], causal=is_causal,
    ):
        out = bf16_attention(query, key, value, is_causal=is_causal and query.shape[2] > 1, scale=scale,
                             impl=bf16_impl(query.device), cos=cos, sin=sin)
    else:
        out = _run(query, key, value, None, cos, sin, is_causal, scale, plan, options)
    return out.transpose(1, 2)


def _plan(query, backend, options) -> Plan:
    """Check the options against the head_dim, then plan (shapes only for meta tensors: the op's fake
    answers, whatever the backend would be)."""
    options.check_head_dim(query.shape[-1])
    if query.is_meta:
        return Plan(backend or "reference", "reference")
    return plan_attention(query.device, backend, options)


def _run(query, key, value, varlen, cos, sin, is_causal, scale, plan: Plan, options) -> torch.Tensor:
    """Run validated inputs with their plan. varlen: None or (cu_q, cu_k, max_q, max_k), the maxima None when
    the offsets could not be read on the host (compiling, meta tensors)."""
    softmax_scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    args = (query, key, value, *(varlen or (None,) * 4), cos, sin, is_causal, softmax_scale, plan.backend,
            plan.quantizer)
    # The custom op keeps a compiled graph whole, carries the (straight-through) backward and gives meta
    # tensors their shapes through its fake; in eager inference its dispatch would be pure overhead.
    if torch.compiler.is_compiling() or query.is_meta or _needs_grad(query, key, value):
        return fp8_sdpa_op(*args, *flatten(options))
    return fp8_attention(*args, options)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fp8_sdpa_varlen(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor, *,
    is_causal: bool = False, scale: float | None = None, cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None, backend: str | None = None,
    hadamard: str = "auto", smooth_k: bool = False, smooth_v: bool | str = "auto", qk_scales: str = "head",
    qk_format: str = "e4m3", v_scales: str = "head",
) -> torch.Tensor:
    """`fp8_sdpa` over variable-length sequences packed along the tokens (FlashAttention's varlen layout).

    Args:
        query: (total_q, H_q, D) bf16/fp16; key, value: (total_kv, H_kv, D); any strides.
        cu_seqlens_q, cu_seqlens_k: int32 (N + 1,) offsets: sequence i is query rows
            [cu_seqlens_q[i], cu_seqlens_q[i + 1]) and key rows [cu_seqlens_k[i], cu_seqlens_k[i + 1]).
            Every sequence needs >= 1 query and >= 1 key. They are validated on the host: CPU tensors
            cost no device sync (they are then copied to the query's device), device tensors one.
        is_causal: per sequence, bottom-right aligned; each sequence needs S_q <= S_kv.
        cos, sin: (total_q, D) or (1, total_q, D) per packed token (positions restart per sequence as
            the caller wants); needs the same offsets for queries and keys.
        Other arguments as in `fp8_sdpa`. Scales are per (sequence, KV head), so the result equals
        `fp8_sdpa` on each sequence alone (up to the backend's rounding order; smooth_v="auto" is decided by
        the longest sequence, so a short one packed with a long one is centred too). backend None: the speed
        table is looked up with the longest sequences as S_q/S_kv and their number as the batch, and a
        bf16 decision runs FA3's bf16 varlen; without FA3 (torch SDPA has no varlen) packed calls stay fp8.
    Returns:
        (total_q, H_q, D) in the input dtype, contiguous. fa3 and triton run all sequences in one launch;
        the reference and fa4 backends loop over the sequences.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, H, D) for varlen attention, got {tuple(t.shape)}")
    # (total_q, D) tables -> (1, total_q, D), the shape `_check_inputs` and the quantizers take
    cos, sin = (t[None] if isinstance(t, torch.Tensor) and t.dim() == 2 else t for t in (cos, sin))
    # the shape/dtype/device/option checks of fp8_sdpa on (1, H, total, D) views; causality is per sequence
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (query, key, value))
    _check_inputs(q4, k4, v4, is_causal=False, scale=scale, cos=cos, sin=sin)
    is_causal = bool(is_causal)
    options = FP8AttentionOptions.of(hadamard, smooth_k, smooth_v, qk_scales, qk_format, v_scales)
    if torch.compiler.is_compiling() or query.is_meta:
        # the offsets cannot be read while tracing (or have no values): the op validates and measures them
        # when it runs
        varlen = (cu_seqlens_q.to(query.device), cu_seqlens_k.to(query.device), None, None)
    else:
        # validated where they are (offsets built on the host cost no device sync), then moved to the device
        max_q, max_k = longest_sequences(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0],
                                         is_causal=is_causal, rope=cos is not None)
        cu_q, cu_k = (t.to(query.device, non_blocking=True) for t in (cu_seqlens_q, cu_seqlens_k))
        # fused RoPE: the offsets were just checked equal; one tensor for both lets the quantizer take its q/k
        # RoPE kernel (`qkv._launch_blocks`), whose programs read q's and k's rows of one sequence together
        varlen = (cu_q, cu_q if cos is not None else cu_k, max_q, max_k)
    plan = _plan(query, backend, options)
    # bf16 needs the longest lengths on the host (not while compiling) and a one-launch bf16 varlen (FA3)
    if backend is None and varlen[2] is not None and runs_bf16(
        query.device, plan.backend, batch=cu_seqlens_q.shape[0] - 1, heads_q=query.shape[1],
        heads_kv=key.shape[1], s_q=varlen[2], s_kv=varlen[3], head_dim=query.shape[2], causal=is_causal,
        varlen=True,
    ):
        return bf16_attention_varlen(query, key, value, *varlen, is_causal=is_causal, scale=scale, cos=cos, sin=sin)
    return _run(query, key, value, varlen, cos, sin, is_causal, scale, plan, options)


