"""FP8 (e4m3) attention with per-head scales for HuggingFace Transformers.

Data path: `quantization` (Triton quantize / RoPE+quantize kernels and their torch reference) ->
`sdpa.fp8_sdpa` (the one shared FP8 SDPA, wrapped as a torch custom op in `custom_ops`; `fp8_sdpa_varlen` for
packed variable-length batches) ->
`backends` (fa3, fa4, triton, reference) chosen by `dispatch` -> `transformers` (AttentionInterface names
``fp8``, ``fp8_fa3``, ``fp8_fa4``, ``fp8_reference`` and `prepare_model`). Importing the package registers
the attention implementations.
"""

from .dispatch import BACKENDS, resolve_backend
from .quantization import QuantizedQKV, quantize_qkv_fp8, quantize_qkv_fp8_reference
from .sdpa import fp8_sdpa, fp8_sdpa_varlen

from .transformers import describe_backend, prepare_model, register, unprepare_model

register()

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "QuantizedQKV",
    "describe_backend",
    "fp8_sdpa",
    "fp8_sdpa_varlen",
    "prepare_model",
    "quantize_qkv_fp8",
    "quantize_qkv_fp8_reference",
    "register",
    "resolve_backend",
    "unprepare_model",
]
