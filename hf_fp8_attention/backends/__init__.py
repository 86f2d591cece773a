"""The backend registry: one record per FP8 attention kernel. Adding a backend touches only `REGISTRY`.

Every backend function takes a `QuantizedQKV` (BSHD e4m3 + descales) and returns BSHD output:
``fn(qkv, *, is_causal: bool, scale: float, out_dtype) -> Tensor``. A varlen `QuantizedQKV` (packed
sequences) gets the packed (1, total_q, H_q, D) output: backends with ``native_varlen`` run it in one
launch, the others one sequence at a time (`_per_sequence`). `dispatch.plan_attention` picks a record;
the attention names (``fp8_<name>``), the install hints and the availability probes all come from here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

BackendFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """One FP8 attention kernel.

    name: the backend name (``backend=`` of `fp8_sdpa`; attention name ``fp8_<name>``).
    entry: "module:function" of the backend function, imported on first use (its package may be missing).
    arch_major: the GPU generation (compute capability major) it is the native choice for, or None.
    min_arch: lowest ``major*10 + minor`` it runs on (None: any device, CPU included).
    package: the import name probed (without importing it) to tell whether the kernel is installed.
    install_hint: what to install when it is missing.
    native_varlen: runs packed sequences in one launch (else one call per sequence).
    block_scales: takes per-block Q/K scales (``qk_scales="block"``).
    int8_qk: takes int8 Q/K with per-block scales (``qk_format="int8"``).
    v_block_scales: takes per-block V scales (``v_scales="block"``).
    v_keys_contiguous: None, or ``(s_q, h_q, h_kv, s_kv, head_dim) -> bool``: the shapes at which the backend
        reads V keys-contiguous (`quantization.quantized.keys_contiguous`), which the pipeline then has the
        quantizer write (`attention.fp8_attention`).
    v_wgmma_order: None, or ``(device, s_q, h_q, h_kv, s_kv, head_dim, *, is_causal, options, varlen) -> bool``:
        the calls for which the backend reads that V with its keys in wgmma order within every 16
        (`quantization.quantized.wgmma_key_order`), which the quantizer then writes so.
    compile_ahead: None, or ``(device, batch, s_q, h_q, h_kv, s_kv, head_dim, *, is_causal, scale, out_dtype,
        v_wgmma_order, q_in_kernel, q_rotate) -> context manager``: the pipeline quantizes inside it; the backend
        may start compiling the kernel the call will run in it, beside the quantizer's compile (a first call's time).
    q_in_kernel: None, or ``(options, rope: bool) -> bool``: for a call that reads V in wgmma order
        (``v_wgmma_order`` said so), whether the backend's kernel quantizes Q itself, one scale per query row
        (`quantization.QuantizedQKV.q_in_kernel`): the pipeline then has the quantizer leave Q as it is.
    """

    name: str
    entry: str
    arch_major: int | None
    min_arch: int | None
    package: str | None
    install_hint: str
    native_varlen: bool
    block_scales: bool
    int8_qk: bool
    v_block_scales: bool = False
    v_keys_contiguous: Callable[[int, int, int, int, int], bool] | None = None
    v_wgmma_order: Callable[..., bool] | None = None
    compile_ahead: Callable[..., contextlib.AbstractContextManager] | None = None
    q_in_kernel: Callable[..., bool] | None = None

    @property
    def needs_cuda(self) -> bool:
        return self.min_arch is not None

    @property
    def attn_implementation(self) -> str:
        return f"fp8_{self.name}"

    def installed(self) -> bool:
        return _installed(self.package)

    @functools.cached_property
    def fn(self) -> BackendFn:
        module, _, attr = self.entry.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        return fn if self.native_varlen else _per_sequence(fn)


# The triton backend's V layout. Query rows per KV head (S_q * H_q / H_kv) up to which it runs its decode path
# (small tiles, split keys; BSHD V); prefill reads V keys-contiguous from S_kv * D of this on (H100, triton 3.6:
# the on-chip transpose of BSHD V tiles halves the kernel's speed; a copy costs more only below it).
TRITON_DECODE_MAX_ROWS = 64
# The Triton backend's prefill kernel: auto (the Gluon kernel on Hopper at D=128), triton, gluon* (`triton.py`)
TRITON_KERNEL_ENV = "HF_FP8_ATTENTION_TRITON_KERNEL"
TRITON_V_KEYS_MIN_KEYS_X_DIM = 2048 * 128


def triton_reads_v_keys_contiguous(s_q: int, h_q: int, h_kv: int, s_kv: int, dim: int) -> bool:
    """Whether the triton backend reads V keys-contiguous at this shape (copying a BSHD V first): its
    registry record's ``v_keys_contiguous``."""
    return s_q * (h_q // h_kv) > TRITON_DECODE_MAX_ROWS and s_kv * dim >= TRITON_V_KEYS_MIN_KEYS_X_DIM


def triton_reads_v_wgmma_order(device, s_q: int, h_q: int, h_kv: int, s_kv: int, dim: int, *, is_causal: bool,
                               options, varlen: bool) -> bool:
    """Whether the triton backend's call runs the Gluon kernel on V in wgmma key order (`triton.reads_v_wgmma_order`;
    imported here on first use: it needs triton): its registry record's ``v_wgmma_order``."""
    from .triton import reads_v_wgmma_order

    return reads_v_wgmma_order(torch.device(device), s_q, h_q, h_kv, s_kv, dim, is_causal=is_causal, options=options,
                               varlen=varlen)


def triton_compile_ahead(device: torch.device, batch: int, s_q: int, h_q: int, h_kv: int, s_kv: int, dim: int, *,
                         is_causal: bool, scale: float, out_dtype, v_wgmma_order: bool, q_in_kernel: bool = False,
                         q_rotate: bool = False):
    """The triton backend's compile-ahead context for the quantization (`triton.compile_ahead`; imported here on
    first use): its registry record's ``compile_ahead``."""
    from .triton import compile_ahead

    return compile_ahead(device, batch, s_q, h_q, h_kv, s_kv, dim, is_causal=is_causal, scale=scale,
                         out_dtype=out_dtype, v_wgmma_order=v_wgmma_order, q_in_kernel=q_in_kernel,
                         q_rotate=q_rotate)


def triton_q_in_kernel(options, rope: bool) -> bool:
    """Whether the triton backend's Gluon kernel quantizes Q itself for a call it reads V in wgmma order for
    (`triton.q_in_kernel`; imported here on first use): its registry record's ``q_in_kernel``."""
    from .triton import q_in_kernel

    return q_in_kernel(options, rope)


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("fa3", "hf_fp8_attention.backends.fa3:fa3_fp8_attention", arch_major=9, min_arch=90,
                package="flash_attn_interface",
                install_hint="pip install 'hf_fp8_attention[fa3]' (provides flash_attn_interface)",
                native_varlen=True, block_scales=False, int8_qk=False),
        Backend("fa4", "hf_fp8_attention.backends.fa4:fa4_fp8_attention", arch_major=10, min_arch=100,
                package="flash_attn.cute",
                install_hint="pip install 'hf_fp8_attention[fa4]' (provides flash_attn.cute)",
                native_varlen=False, block_scales=False, int8_qk=False),
        # Triton compiles fp8 tensor-core dots from Ada (SM 8.9) on.
        Backend("triton", "hf_fp8_attention.backends.triton:triton_fp8_attention", arch_major=None, min_arch=89,
                package="triton", install_hint="pip install triton", native_varlen=True, block_scales=True,
                int8_qk=True, v_block_scales=True, v_keys_contiguous=triton_reads_v_keys_contiguous,
                v_wgmma_order=triton_reads_v_wgmma_order, compile_ahead=triton_compile_ahead,
                q_in_kernel=triton_q_in_kernel),
        Backend("reference", "hf_fp8_attention.backends.reference:reference_fp8_attention", arch_major=None,
                min_arch=None, package=None, install_hint="", native_varlen=False, block_scales=True, int8_qk=True,
                v_block_scales=True),
    )
}
BACKENDS = tuple(REGISTRY)
# transformers attention names -> backend (None: picked per call from the query's device).
ATTN_IMPLEMENTATIONS: dict[str, str | None] = {"fp8": None, **{b.attn_implementation: b.name for b in REGISTRY.values()}}


def _installed(package: str | None) -> bool:
    """Whether ``package`` can be imported, found without importing it (a dotted name's parent is not
    imported either: flash_attn's __init__ loads FA2's CUDA extension)."""
    if package is None:
        return True
    top, _, rest = package.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not rest:
        return spec is not None
    path = rest.replace(".", os.sep)
    return any(os.path.isdir(os.path.join(p, path)) or os.path.isfile(os.path.join(p, path + ".py"))
               for p in (spec.submodule_search_locations or ()))


def _per_sequence(fn: BackendFn) -> BackendFn:
    """A backend without a varlen kernel: a packed batch runs one sequence at a time, outputs concatenated."""

    @functools.wraps(fn)
    def run(qkv, *, is_causal, scale, out_dtype):
        if not qkv.is_varlen:
            return fn(qkv, is_causal=is_causal, scale=scale, out_dtype=out_dtype)
        parts = [fn(part, is_causal=is_causal, scale=scale, out_dtype=out_dtype) for part in qkv.sequences()]
        return torch.cat(parts, dim=1)

    return run


def get_backend(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown fp8 attention backend {name!r}; expected one of {BACKENDS} or None (auto)") from None


def get_backend_fn(name: str) -> BackendFn:
    return get_backend(name).fn


__all__ = ["ATTN_IMPLEMENTATIONS", "BACKENDS", "Backend", "REGISTRY", "get_backend", "get_backend_fn",
           "triton_compile_ahead", "triton_q_in_kernel", "triton_reads_v_keys_contiguous", "triton_reads_v_wgmma_order"]
