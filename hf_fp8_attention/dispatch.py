"""Plan an fp8 attention call: which backend (from `backends.REGISTRY`) and which quantizer run it.

Auto pick: the backend native to the GPU generation (SM 9.x -> fa3, SM 10.x -> fa4), else a portable one
whose minimum arch the GPU meets (triton on SM 8.9+), else the reference, each fallback with a one-time
notice; options a backend cannot serve (per-block Q/K scales on fa3/fa4) move the pick to one that can.
The quantizer is the Triton kernel on GPUs with fp8 casts (SM 8.9+, triton installed), the torch
reference elsewhere.

The capability lookup is cached per device index. `HF_FP8_ATTENTION_ARCH` (e.g. ``90`` or ``100``)
overrides the detected architecture; tests use it to exercise the table without the hardware.

fp8 or bf16 (`runs_bf16`, auto path only): where the GPU's speed table (`speed_table`, measured by
``scripts/tune_dispatch.py``) says the planned fp8 backend is slower than bf16 attention for a call's shape,
the auto path runs `speed_table.bf16_attention` instead (`bf16_impl`: FA3 bf16 on Hopper when installed,
else torch SDPA). A named backend always runs fp8; ``HF_FP8_ATTENTION_SPEED_TABLE=off`` turns the table off.
`describe_dispatch` says in one line what the table makes the auto path do on a device.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from transformers.utils import logging as hf_logging

from . import speed_table
from .backends import BACKENDS, REGISTRY, Backend
from .options import DEFAULT_OPTIONS, FP8AttentionOptions
from .speed_table import SpeedTable

logger = hf_logging.get_logger("hf_fp8_attention")

ARCH_ENV = "HF_FP8_ATTENTION_ARCH"
# The Triton quantize kernel's e4m3 casts need the triton backend's hardware.
_TRITON_QUANTIZE = REGISTRY["triton"]


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


# Probed once at import: torch.compile cannot trace importlib, and a plain dict lookup is free.
_KERNEL_AVAILABLE = {name: b.installed() for name, b in REGISTRY.items()}


def kernel_available(backend: str) -> bool:
    """Whether the Python package of a backend's kernel is installed (probed without importing it)."""
    return _KERNEL_AVAILABLE.get(backend, False)


def _format_arch(arch: int) -> str:
    return f"SM {arch // 10}.{arch % 10}"


def _runs_on(b: Backend, arch: int | None) -> bool:
    """Whether backend ``b`` has a kernel for ``arch`` (None: no CUDA) and it is installed."""
    if b.needs_cuda and (arch is None or arch < b.min_arch or (b.arch_major is not None and arch // 10 != b.arch_major)):
        return False
    return kernel_available(b.name)


def check_backend(backend: str, device: torch.device) -> None:
    """Raise a clear error if ``backend`` cannot run on ``device``."""
    if backend not in REGISTRY:
        raise ValueError(f"unknown fp8 attention backend {backend!r}; expected one of {BACKENDS} or None (auto)")
    b = REGISTRY[backend]
    if not b.needs_cuda:
        return
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get(ARCH_ENV) is None:
        raise ValueError(
            f"backend {backend!r} ({b.attn_implementation}) needs CUDA tensors, got tensors on {device.type}; "
            "use backend='reference' (attn_implementation='fp8_reference') on CPU"
        )
    arch = device_arch(device)
    if arch is not None and b.arch_major is not None and arch // 10 != b.arch_major:
        native = [o.attn_implementation for o in REGISTRY.values() if o.arch_major == arch // 10]
        if native:
            raise RuntimeError(
                f"{b.attn_implementation} has no FP8 kernel on {_format_arch(arch)}: it runs FP8 only on "
                f"SM {b.arch_major}.x. Use attn_implementation='{native[0]}' (backend='{native[0][4:]}') on this GPU."
            )
        raise RuntimeError(
            f"{b.attn_implementation} needs SM {b.arch_major}.x, this GPU is {_format_arch(arch)}; "
            "use attn_implementation='fp8' to pick the backend for this GPU"
        )
    if arch is not None and arch < b.min_arch:
        raise RuntimeError(
            f"{b.attn_implementation} needs FP8 tensor cores (SM {b.min_arch // 10}.{b.min_arch % 10}+), this GPU is "
            f"{_format_arch(arch)}; use attn_implementation='fp8_reference' or 'sdpa'"
        )
    if not kernel_available(backend):
        raise ImportError(
            f"{b.attn_implementation} needs its kernel package, which is not installed: {b.install_hint}; "
            "or use attn_implementation='fp8' (falls back to the triton or reference backend)"
        )


# Options only some backends serve: (the FP8AttentionOptions property and the Backend field of the same name,
# how the user asked for it, why a backend without it cannot serve it). V block scales and int8 first: they
# imply (V: need) Q/K block scales, and the message names the first one missing.
_CAPABILITIES = (
    ("v_block_scales", "v_scales='block'", lambda b: f"it takes a V scale per 128 tokens, {b.name} one per (batch, KV head)"),
    ("int8_qk", "qk_format='int8'", lambda b: f"{b.name} multiplies e4m3 Q and K only"),
    ("block_scales", "qk_scales='block'", lambda b: f"it takes a Q/K scale per 16 tokens, {b.name} one per (batch, KV head)"),
)


def _missing(b: Backend, options: FP8AttentionOptions) -> list[tuple]:
    return [c for c in _CAPABILITIES if getattr(options, c[0]) and not getattr(b, c[0])]


def _serves(b: Backend, options: FP8AttentionOptions) -> bool:
    return not _missing(b, options)


def _check_options(b: Backend, options: FP8AttentionOptions) -> None:
    for flag, asked, why in _missing(b, options)[:1]:
        takers = [o.name for o in REGISTRY.values() if getattr(o, flag)]
        raise ValueError(
            f"{asked} needs backend {' or '.join(map(repr, takers))} (attn_implementation='fp8_triton'): {why(b)}"
        )


def _notice(message: str) -> None:
    """A one-time warning, skipped while torch.compile traces (Dynamo cannot trace a logger call, and with
    fullgraph=True that would fail the compilation; an eager call shows it)."""
    if not torch.compiler.is_compiling():
        logger.warning_once(message)


def _auto_pick(device: torch.device, options: FP8AttentionOptions) -> str:
    arch = device_arch(device)
    if arch is None:
        _notice(
            "hf_fp8_attention: no CUDA device, using the 'reference' backend (pure-torch emulation of the FP8 "
            "math: same rounding, no speedup)"
        )
        return "reference"
    native = [b for b in REGISTRY.values() if b.arch_major == arch // 10]
    for b in native:
        if _runs_on(b, arch) and _serves(b, options):
            return b.name
    portable = [b for b in REGISTRY.values() if b.arch_major is None and b.needs_cuda and _runs_on(b, arch) and _serves(b, options)]
    if native and not any(_runs_on(b, arch) for b in native):
        missing = native[0]
        reason = (f"{_format_arch(arch)} wants the {missing.name} backend but its kernel is not installed "
                  f"({missing.install_hint})")
    elif native:  # installed, but the options need another kernel: the pick follows from the options
        reason = None
    else:
        natives = ", ".join(f"{b.name} needs SM {b.arch_major}.x" for b in REGISTRY.values() if b.arch_major)
        reason = f"no FA3/FA4 fp8 kernel for {_format_arch(arch)} ({natives})"
    pick = portable[0].name if portable else "reference"
    if reason is not None:
        what = ("the portable Triton fp8 kernel" if pick == "triton"
                else f"the {pick!r} backend" + (" (pure-torch emulation, slow)" if pick == "reference" else ""))
        _notice(f"hf_fp8_attention: {reason}; using {what}")
    return pick


@dataclass(frozen=True)
class Plan:
    """What runs one fp8 attention call: the backend and the quantizer ("triton" or "reference")."""

    backend: str
    quantizer: str


def quantizer_for(device: torch.device) -> str:
    """"triton" where the Triton quantize kernel can run for tensors on ``device``, else "reference"."""
    device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    arch = device_arch(device)
    usable = arch is not None and arch >= _TRITON_QUANTIZE.min_arch and kernel_available(_TRITON_QUANTIZE.name)
    return "triton" if usable else "reference"


def plan_attention(device: torch.device, requested: str | None = None,
                   options: FP8AttentionOptions = DEFAULT_OPTIONS) -> Plan:
    """The backend and quantizer for tensors on ``device``.

    ``requested`` None picks from the architecture table (see the module docstring); an explicit name is
    checked against the device and the options and kept.
    """
    if requested is not None:
        if requested in REGISTRY:  # an option the backend cannot serve is the clearer error
            _check_options(REGISTRY[requested], options)
        check_backend(requested, device)
        name = requested
    else:
        name = _auto_pick(device, options)
    return Plan(name, quantizer_for(device))


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend name `plan_attention` picks for default options."""
    return plan_attention(device, requested).backend


# --- fp8 or bf16: the speed table ------------------------------------------------------------------------

# The bf16 attention of the FA3 package runs on the generation its fp8 kernel is native to.
_FA3 = REGISTRY["fa3"]


def bf16_impl(device: torch.device) -> str:
    """The bf16 attention the auto path runs where fp8 is slower: "fa3" (``flash_attn_interface``) on SM 9.x
    with FA3 installed, else "sdpa" (torch SDPA)."""
    device = torch.device(device)
    arch = device_arch(device) if device.type == "cuda" else None
    usable = arch is not None and arch // 10 == _FA3.arch_major and kernel_available(_FA3.name)
    return _FA3.name if usable else "sdpa"


def device_key(device: torch.device) -> str:
    """The speed table's name for a device: ``sm90`` for a CUDA device of SM 9.0, else the device type."""
    device = torch.device(device)
    arch = device_arch(device) if device.type == "cuda" else None
    return f"sm{arch}" if arch is not None else device.type


def speed_table_for(device: torch.device, fp8_backend: str) -> SpeedTable | None:
    """The table that applies to auto-path calls on ``device`` planned to ``fp8_backend``: one measured for
    this device with that fp8 backend against the bf16 attention this process would run, else None."""
    table = speed_table.table_for(device_key(device))
    if table is None or table.fp8_backend != fp8_backend or table.bf16 != bf16_impl(device):
        return None
    return table


@functools.lru_cache(maxsize=4096)
def _prefers_bf16(table: SpeedTable, s_q: int, s_kv: int, causal: bool, head_dim: int, group: int, batch: int,
                  heads_q: int) -> bool:
    return table.prefers_bf16(s_q=s_q, s_kv=s_kv, causal=causal, head_dim=head_dim, group=group, batch=batch,
                              heads_q=heads_q)


def runs_bf16(device: torch.device, fp8_backend: str, *, batch, heads_q, heads_kv, s_q, s_kv, head_dim,
              causal: bool, varlen: bool = False) -> bool:
    """Whether an auto-path call of this shape runs bf16 attention (the speed table measured the planned fp8
    backend slower there). ``varlen``: packed sequences, ``batch`` their number and ``s_q``/``s_kv`` the
    longest; only FA3 has a one-launch bf16 varlen, so with torch SDPA they stay fp8. Bottom-right causal
    with 1 < S_q < S_kv stays fp8 with torch SDPA too (it would need an explicit mask: another kernel than
    the one measured). Cheap: one dict lookup per new shape, then an lru_cache hit; under torch.compile
    the decision is taken while tracing, guarded on the shape's buckets."""
    table = speed_table_for(device, fp8_backend)
    if table is None:
        return False
    causal = bool(causal) and s_q > 1
    if table.bf16 == "sdpa" and (varlen or (causal and s_q < s_kv)):
        return False
    group = heads_q // heads_kv
    if torch.compiler.is_compiling():  # the cache would be bypassed (and warned about) by Dynamo anyway
        return table.prefers_bf16(s_q=s_q, s_kv=s_kv, causal=causal, head_dim=head_dim, group=group,
                                  batch=batch, heads_q=heads_q)
    return _prefers_bf16(table, s_q, s_kv, causal, head_dim, group, batch, heads_q)


_BF16_LABELS = {"fa3": "FA3 bf16", "sdpa": "torch SDPA bf16"}


def describe_dispatch(device: torch.device, backend: str | None = None,
                      options: FP8AttentionOptions = DEFAULT_OPTIONS) -> str:
    """One line on what the speed table makes calls on ``device`` run, e.g. "speed table sm90 (NVIDIA H200,
    fa3 fp8 vs FA3 bf16): bf16 on 40/264 measured shapes: decode (S_q=1) S_kv 1k-128k 40/48, ...; fp8
    elsewhere", or why every call runs fp8 (backend named, table off, no table for this device, a table
    measured for another backend pair)."""
    if backend is not None:
        return f"fp8 on every call (backend {backend!r} named; the speed table serves the auto path only)"
    if speed_table.disabled():
        return f"speed table off ({speed_table.ENV}={speed_table._env_setting()}): fp8 on every call"
    key = device_key(device)
    table = speed_table.table_for(key)
    if table is None:
        return f"no speed table for {key}: fp8 on every call (scripts/tune_dispatch.py measures one)"
    fp8_backend, impl = plan_attention(device, None, options).backend, bf16_impl(device)
    measured = f"{table.fp8_backend} fp8 vs {_BF16_LABELS[table.bf16]}"
    if (table.fp8_backend, table.bf16) != (fp8_backend, impl):
        return (f"speed table {key} measured {measured}, this process runs {fp8_backend} fp8 and "
                f"{_BF16_LABELS[impl]}: not used, fp8 on every call")
    return f"speed table {key} ({table.device_name}, {measured}): {table.summary()}; fp8 elsewhere"
