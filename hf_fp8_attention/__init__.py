"""FP8 (e4m3) attention with per-head scales for HuggingFace Transformers.

Data path: `quantization` (Triton quantize / RoPE+quantize kernels and their torch reference) ->
`attention` (the one pipeline: quantize -> backend -> output fix-up; `custom_ops` makes it a torch custom
op) -> `backends` (fa3, fa4, triton, reference: one registry, `dispatch.plan_attention` picks) ->
`sdpa` (the public `fp8_sdpa` / `fp8_sdpa_varlen`, options as `FP8AttentionOptions`) -> `transformers`
(AttentionInterface names ``fp8``, ``fp8_fa3``, ``fp8_fa4``, ``fp8_triton``, ``fp8_reference`` and
`prepare_model`); `kv_cache` (the FP8 KV cache generation reads directly). Importing the package registers the attention implementations.
"""

from .backends import ATTN_IMPLEMENTATIONS, BACKENDS
from .dispatch import plan_attention, resolve_backend
from .kv_cache import FP8Cache, FP8CacheLayer, FP8StaticCache, FP8StaticCacheLayer
from .options import FP8AttentionOptions
from .quantization import QuantizedQKV, quantize_qkv_fp8, quantize_qkv_fp8_reference
from .sdpa import fp8_sdpa, fp8_sdpa_varlen

from .transformers import describe_backend, new_cache, prepare_model, register, unprepare_model

register()

__version__ = "0.1.0"
__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "BACKENDS",
    "FP8AttentionOptions",
    "FP8Cache",
    "FP8CacheLayer",
    "FP8StaticCache",
    "FP8StaticCacheLayer",
    "QuantizedQKV",
    "describe_backend",
    "fp8_sdpa",
    "fp8_sdpa_varlen",
    "new_cache",
    "plan_attention",
    "prepare_model",
    "quantize_qkv_fp8",
    "quantize_qkv_fp8_reference",
    "register",
    "resolve_backend",
    "unprepare_model",
]
