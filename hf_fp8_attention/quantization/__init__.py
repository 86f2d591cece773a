"""FP8 (e4m3) quantization of Q/K/V: BHSD bf16/fp16 in, BSHD fp8 + per-(batch, KV head) descales out."""

from .hadamard import HADAMARD_MODES, check_hadamard, hadamard_matrix
from .reference import (
    QuantizedQKV,
    apply_rope_reference,
    check_cu_seqlens,
    quantize_qkv_fp8_reference,
    quantize_qkv_fp8_varlen_reference,
)

try:
    from .qkv import quantize_qkv_fp8, quantize_qkv_fp8_varlen
except ImportError as e:  # no triton (e.g. macOS): the reference still works
    _triton_import_error = e

    def quantize_qkv_fp8(*args, **options):
        raise ImportError(f"quantize_qkv_fp8 needs triton: {_triton_import_error}") from _triton_import_error

    def quantize_qkv_fp8_varlen(*args, **options):
        raise ImportError(f"quantize_qkv_fp8_varlen needs triton: {_triton_import_error}") from _triton_import_error

__all__ = [
    "HADAMARD_MODES",
    "check_hadamard",
    "hadamard_matrix",
    "QuantizedQKV", "apply_rope_reference", "check_cu_seqlens", "quantize_qkv_fp8", "quantize_qkv_fp8_reference",
    "quantize_qkv_fp8_varlen", "quantize_qkv_fp8_varlen_reference"]
