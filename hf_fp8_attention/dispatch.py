"""Pick the FP8 attention backend for a device: SM 9.x -> fa3, SM 10.x -> fa4, other GPUs with FP8
tensor cores (SM 8.9+) or a missing FA3/FA4 kernel -> triton, no CUDA -> reference.

The capability lookup is cached per device index. `HF_FP8_ATTENTION_ARCH` (e.g. ``90`` or ``100``)
overrides the detected architecture; tests use it to exercise the table without the hardware.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

logger = logging.getLogger("hf_fp8_attention")

BACKENDS = ("fa3", "fa4", "triton", "reference")
ARCH_ENV = "HF_FP8_ATTENTION_ARCH"

# (major capability) -> backend whose FP8 kernel runs there.
_ARCH_TABLE = {9: "fa3", 10: "fa4"}
_REQUIRED_ARCH = {"fa3": 9, "fa4": 10}
# Triton compiles fp8 tensor-core dots from Ada (SM 8.9) on.
_TRITON_MIN_ARCH = 89
_INSTALL_HINT = {
    "fa3": "pip install 'hf_fp8_attention[fa3]' (provides flash_attn_interface)",
    "fa4": "pip install 'hf_fp8_attention[fa4]' (provides flash_attn.cute)",
    "triton": "pip install triton",
}
_notified: set[str] = set()


def _notice_once(key: str, message: str) -> None:
    if key not in _notified:
        _notified.add(key)
        logger.warning(message)


@functools.lru_cache(maxsize=None)
def _cuda_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


def device_arch(device: torch.device) -> int | None:
    """Compute capability as ``major*10 + minor`` for a CUDA device, None for other devices."""
    override = os.environ.get(ARCH_ENV)
    if override:
        return int(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_arch(index)


def _probe(backend: str) -> bool:
    if backend == "fa3":
        return importlib.util.find_spec("flash_attn_interface") is not None
    if backend == "fa4":
        # flash_attn.cute without importing flash_attn (FA2's __init__ loads its CUDA extension)
        spec = importlib.util.find_spec("flash_attn")
        return spec is not None and any(
            os.path.isdir(os.path.join(p, "cute")) for p in (spec.submodule_search_locations or ())
        )
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None
    return backend == "reference"


# Probed once at import: torch.compile cannot trace importlib, and a plain dict lookup is free.
_KERNEL_AVAILABLE = {name: _probe(name) for name in ("fa3", "fa4", "triton", "reference")}


def kernel_available(backend: str) -> bool:
    """Whether the Python package of a backend's kernel is installed (probed without importing it)."""
    return _KERNEL_AVAILABLE.get(backend, False)


def triton_quantize_usable(device: torch.device) -> bool:
    """Whether the Triton quantize kernel can run for tensors on ``device`` (a CUDA device)."""
    arch = device_arch(device)
    return kernel_available("triton") and arch is not None and arch >= _TRITON_MIN_ARCH


def _format_arch(arch: int) -> str:
    return f"SM {arch // 10}.{arch % 10}"


def check_backend(backend: str, device: torch.device) -> None:
    """Raise a clear error if ``backend`` cannot run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown fp8 attention backend {backend!r}; expected one of {BACKENDS} or None (auto)")
    if backend == "reference":
        return
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get(ARCH_ENV) is None:
        raise ValueError(
            f"backend {backend!r} (fp8_{backend}) needs CUDA tensors, got tensors on {device.type}; "
            "use backend='reference' (attn_implementation='fp8_reference') on CPU"
        )
    arch = device_arch(device)
    if backend == "triton":
        if arch is not None and arch < _TRITON_MIN_ARCH:
            raise RuntimeError(
                f"fp8_triton needs FP8 tensor cores (SM 8.9+), this GPU is {_format_arch(arch)}; "
                "use attn_implementation='fp8_reference' or 'sdpa'"
            )
        if not kernel_available(backend):
            raise ImportError(f"fp8_triton needs triton: {_INSTALL_HINT['triton']}")
        return
    needed = _REQUIRED_ARCH[backend]
    if arch is not None and arch // 10 != needed:
        if backend == "fa4" and arch // 10 == 9:
            raise RuntimeError(
                f"fp8_fa4 has no FP8 kernel on Hopper ({_format_arch(arch)}): FA4 runs FP8 only on SM 10.x "
                "(Blackwell). Use attn_implementation='fp8_fa3' (backend='fa3') on this GPU."
            )
        raise RuntimeError(
            f"fp8_{backend} needs SM {needed}.x, this GPU is {_format_arch(arch)}; "
            "use attn_implementation='fp8' to pick the backend for this GPU"
        )
    if not kernel_available(backend):
        raise ImportError(
            f"fp8_{backend} needs its kernel package, which is not installed: {_INSTALL_HINT[backend]}; "
            "or use attn_implementation='fp8' (falls back to the triton or reference backend)"
        )


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """Return the backend name to use for tensors on ``device``.

    ``requested`` None picks from the architecture table, falling back to the reference backend (pure
    torch emulation, correct but slow) with a one-time notice when no FP8 kernel is usable.
    An explicit name is checked and returned unchanged.
    """
    if requested is not None:
        check_backend(requested, device)
        return requested
    arch = device_arch(device)
    if arch is None:
        _notice_once(
            "no-cuda",
            "hf_fp8_attention: no CUDA device, using the 'reference' backend (pure-torch emulation of the FP8 "
            "math: same rounding, no speedup)",
        )
        return "reference"
    backend = _ARCH_TABLE.get(arch // 10)
    if backend is not None and kernel_available(backend):
        return backend
    portable = arch >= _TRITON_MIN_ARCH and kernel_available("triton")
    fallback = "triton" if portable else "reference"
    what = "the portable Triton fp8 kernel" if portable else "the 'reference' backend (pure-torch emulation, slow)"
    if backend is None:
        reason = f"no FA3/FA4 fp8 kernel for {_format_arch(arch)} (fa3 needs SM 9.x, fa4 SM 10.x)"
    else:
        reason = f"{_format_arch(arch)} wants the {backend} backend but its kernel is not installed ({_INSTALL_HINT[backend]})"
    _notice_once(f"arch-{arch}-{backend}", f"hf_fp8_attention: {reason}; using {what}")
    return fallback
