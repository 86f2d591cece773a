"""Test setup: run Triton kernels in the interpreter when there is no GPU, with a correct fp8 cast.

TRITON_INTERPRET must be set before any @triton.jit is decorated, i.e. before hf_fp8_attention is
imported; conftest.py is imported before the test modules, so it is set here.

The interpreter's float32 -> float8e4nv conversion (`triton.runtime.interpreter._convert_float`, seen in
triton 3.6.0 and 3.9.0) ORs the rounding carry into the exponent instead of adding it: -31.92 becomes -16
instead of -32 (shared/README.md). On the GPU the hardware cast is right, so for CPU runs the conversion to
float8e4nv is routed through torch's correctly rounded cast; so is float32 -> bfloat16, which the
interpreter truncates instead of rounding to nearest even. The outcome is recorded in the environment
variable HF_FP8_INTERPRETER_FP8_PATCH ("applied", "skipped: <why>", "not needed: CUDA") for a test to check.
"""

import os

import pytest
import torch

PATCH_STATUS_ENV = "HF_FP8_INTERPRETER_FP8_PATCH"

if torch.cuda.is_available():
    os.environ.setdefault(PATCH_STATUS_ENV, "not needed: CUDA")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_fp8_cast() -> str:
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError as e:
        return f"skipped: {e}"
    original = getattr(interpreter, "_convert_float", None)
    if original is None or not callable(original):
        return "skipped: triton.runtime.interpreter._convert_float not found"
    if getattr(original, "_hf_fp8_patched", False):
        return "applied"
    # Source dtypes whose bits torch can read directly; the destination is e4m3fn only.
    src_views = {
        tl.float32: (np.float32, torch.float32),
        tl.float16: (np.float16, torch.float16),
        tl.bfloat16: (np.uint16, torch.bfloat16),
    }
    rtz = getattr(getattr(interpreter, "_ir", None), "ROUNDING_MODE", None)
    rtz = getattr(rtz, "RTZ", object())

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in src_views and rounding_mode != rtz:
            np_dtype, torch_dtype = src_views[input_dtype]
            bits = np.frombuffer(input.tobytes(), dtype=np_dtype).copy()
            src = torch.from_numpy(bits).view(torch_dtype)
            out = src.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return out.reshape(input.shape)
        if output_dtype == tl.bfloat16 and input_dtype == tl.float32 and rounding_mode != rtz:
            # the interpreter truncates float32 -> bf16; the GPU rounds to nearest even, as torch does
            bits = np.frombuffer(input.tobytes(), dtype=np.float32).copy()
            out = torch.from_numpy(bits).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return out.reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    _convert_float._hf_fp8_patched = True
    interpreter._convert_float = _convert_float
    return "applied"


if os.environ.get("TRITON_INTERPRET") == "1":
    os.environ[PATCH_STATUS_ENV] = _patch_interpreter_fp8_cast()

if torch.cuda.is_available():
    # Every direct launch of a compiled kernel (`hf_fp8_attention._launch`) in the GPU tests also runs the
    # JIT's binder and fails if the call specializes differently from the call that made its key.
    from hf_fp8_attention import _launch

    _launch.VERIFY = True


# Per-(batch, KV head) scales go through the persistent two-pass kernel or, from `qkv._SPLIT_MIN_ELEMENTS`
# elements on, the split path (two launches): tests of the quantizer's results take both (`quantize_path`), tests of the
# persistent kernel's schedule pin it (`persistent_path`), whatever today's threshold is.
QUANTIZE_PATH_ELEMENTS = {"persistent": 1 << 62, "split": 0}


@pytest.fixture(params=sorted(QUANTIZE_PATH_ELEMENTS))
def quantize_path(request, monkeypatch):
    from hf_fp8_attention.quantization import qkv

    monkeypatch.setattr(qkv, "_SPLIT_MIN_ELEMENTS", QUANTIZE_PATH_ELEMENTS[request.param])
    return request.param


@pytest.fixture
def persistent_path(monkeypatch):
    from hf_fp8_attention.quantization import qkv

    monkeypatch.setattr(qkv, "_SPLIT_MIN_ELEMENTS", QUANTIZE_PATH_ELEMENTS["persistent"])
