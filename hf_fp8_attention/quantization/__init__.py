"""FP8 (e4m3) quantization of Q/K/V: BHSD bf16/fp16 in, BSHD fp8 + descales out (`QuantizedQKV`).

`qkv.py` launches the Triton kernel (`kernels.py`, its per-tile arithmetic in `tile_math.py`),
`reference.py` is its torch twin, `quantized.py` holds the bundle they return and the checks of their
inputs.
"""

from .hadamard import hadamard_matrix
from .quantized import QuantizedQKV, check_cu_seqlens, check_dtypes, check_rope_args
from .reference import apply_rope_reference, quantize_qkv_fp8_reference, quantize_qkv_fp8_varlen_reference

try:
    from .qkv import quantize_qkv_fp8, quantize_qkv_fp8_varlen
except ImportError as e:  # no triton (e.g. macOS): the reference still works
    _triton_import_error = e

    def quantize_qkv_fp8(*args, **options):
        raise ImportError(f"quantize_qkv_fp8 needs triton: {_triton_import_error}") from _triton_import_error

    def quantize_qkv_fp8_varlen(*args, **options):
        raise ImportError(f"quantize_qkv_fp8_varlen needs triton: {_triton_import_error}") from _triton_import_error

# quantizer name (`dispatch.Plan.quantizer`) -> (fixed-length, varlen) functions
QUANTIZERS = {
    "triton": (quantize_qkv_fp8, quantize_qkv_fp8_varlen),
    "reference": (quantize_qkv_fp8_reference, quantize_qkv_fp8_varlen_reference),
}

__all__ = [
    "QUANTIZERS", "QuantizedQKV", "apply_rope_reference", "check_cu_seqlens", "check_dtypes", "check_rope_args",
    "hadamard_matrix", "quantize_qkv_fp8", "quantize_qkv_fp8_reference", "quantize_qkv_fp8_varlen",
    "quantize_qkv_fp8_varlen_reference",
]
