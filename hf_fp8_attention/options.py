"""`FP8AttentionOptions`: the accuracy options of one fp8 attention call, validated once.

Public entry points (`fp8_sdpa`, `fp8_sdpa_varlen`, `prepare_model`) keep their keyword arguments and build
one of these from them; everything below them (planning, quantizers, backends, output fix-up) receives the
object. It is flattened into plain arguments only at the `torch.library` schema (`custom_ops`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

HADAMARD_MODES = ("auto", "none", "qk", "qkv", "v_only")
# What hadamard="auto" (the default) means where the head dim allows a rotation (power of two <= 256); other
# head dims get "none". Chosen from data (H200, 2026-12-01, README "Accuracy modes"): "qk" is the most accurate
# mode that costs <= 5% over mode none at S=16k causal (fp8_fa3 1.04x, fp8_triton 0.99x; "qkv" 1.06x on
# fp8_fa3, smooth_v 1.10x), SmolLM2 perplexity +0.83% (fa3) / +0.55% (triton) vs bf16 against +1.64% / +1.41%
# for "none", real-activation SQNR 24.5 dB vs 21.7.
AUTO_HADAMARD = "qk"
# What smooth_v="auto" (the default) means: V centred where the attention kernel adds P.V into one fp8
# accumulator over the whole key loop (fa3; fa4 assumed alike, not checked: its fp8 kernel needs SM100; the
# reference accumulates in float32 but follows fa3's default so that CPU runs match it; the triton kernel
# accumulates each key block in float32 and needs none) and the call has at least AUTO_SMOOTH_V_MIN_KEYS keys
# (resolved inside the op, `attention.fp8_attention`, once a packed batch's longest sequence is known).
# Why (H200, 2026-12-01, README "Long context"): FA3's fp8 accumulation loses the small P.V terms of long
# rows when V has a channel offset (V = N(0,1) + 3: 16.8 dB at 8k keys, 8.2 at 32k, 3.6 at 128k; centred:
# 56 dB at every length), while centring costs a fixed pass over V and the output
# (+0.30 ms at S=16k, H=32: 1.11x of fp8_fa3's causal time there) that the quadratic attention time dilutes
# with length: fp8_fa3 causal, qk+smooth_v vs qk 1.075x at 32k keys, 1.023x at 64k (2 rounds, one run:
# docs/results/mode_costs_long_h200_s4.log). 32k is where the uncentred loss is already 8.2 dB on v_offset.
AUTO_SMOOTH_V_MIN_KEYS = 32768
AUTO_SMOOTH_V_BACKENDS = ("fa3", "fa4", "reference")
QK_SCALES = ("head", "block")
QK_FORMATS = ("e4m3", "int8")
V_SCALES = ("head", "block")
MAX_HADAMARD_DIM = 256


@dataclass(frozen=True)
class FP8AttentionOptions:
    """How Q/K/V are prepared before their e4m3 cast.

    hadamard: "auto" (the default: `AUTO_HADAMARD` where the head dim is a power of two <= 256 and Q/K have
        per-head e4m3 scales, else "none"; `for_head_dim` resolves it), "none", "qk" (Q and K rotated by a normalised Hadamard matrix: Q.K^T is
        unchanged, no output pass), "qkv" (V too; the output is rotated back) or "v_only". The explicit
        rotations need a power-of-two head_dim <= 256 (`check_head_dim`). None means "auto".
    smooth_k: subtract K's per-channel mean over the sequence (exact for softmax).
    smooth_v: subtract V's per-channel mean and add it back to the output (exact). "auto" (the default, also
        None): on for the fa3/fa4/reference backends when the call has at least `AUTO_SMOOTH_V_MIN_KEYS` keys,
        else off (`for_keys` resolves it per call; `for_head_dim` alone takes it as off).
    qk_scales: "head" (one Q and one K scale per (batch, KV head), what FA3/FA4 take) or "block" (one per
        16 tokens of one head; backends that take them: triton, reference).
    qk_format: "e4m3" or "int8": Q and K as int8 with a scale per 16 (Q) / 128 (K) tokens of one head (so per-block
        scales whatever qk_scales says), Q.K^T as an int8 dot with int32 accumulation (SageAttention's
        scheme; backends: triton, reference). V and P stay e4m3.
    v_scales: "head" (one V scale per (batch, KV head), what FA3/FA4 take) or "block" (one per V_SCALE_BLOCK
        (128) tokens of one KV head; backends: triton, reference). Needs per-block Q/K scales (qk_scales="block"
        or qk_format="int8") and no smooth_v: then every scale is per block, and the quantizer reads Q/K/V
        once (`quantization.block_kernel`; K twice with smooth_k, for its mean) instead of twice (a per-head
        scale needs the whole head's amax before its first element is written). The per-(batch, KV head)
        descales are then not computed (NaN).
    """

    hadamard: str = "auto"
    smooth_k: bool = False
    smooth_v: bool | str = "auto"
    qk_scales: str = "head"
    qk_format: str = "e4m3"
    v_scales: str = "head"

    def __post_init__(self):
        if self.hadamard is None:
            object.__setattr__(self, "hadamard", "auto")
        if self.smooth_v is None:
            object.__setattr__(self, "smooth_v", "auto")
        if not isinstance(self.hadamard, str) or self.hadamard not in HADAMARD_MODES:
            raise ValueError(f"hadamard={self.hadamard!r} is not supported; accepted values: None, "
                             + ", ".join(map(repr, HADAMARD_MODES)))
        for name in ("smooth_k", "smooth_v"):
            value = getattr(self, name)
            # "no" or 0 would silently mean something; say what is wanted
            if not isinstance(value, bool) and not (name == "smooth_v" and value == "auto"):
                accepted = "True, False or 'auto'" if name == "smooth_v" else "True or False"
                raise TypeError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")
        if not isinstance(self.qk_scales, str) or self.qk_scales not in QK_SCALES:
            raise ValueError(f"qk_scales={self.qk_scales!r} is not supported; accepted values: {QK_SCALES}")
        if not isinstance(self.qk_format, str) or self.qk_format not in QK_FORMATS:
            raise ValueError(f"qk_format={self.qk_format!r} is not supported; accepted values: {QK_FORMATS}")
        if not isinstance(self.v_scales, str) or self.v_scales not in V_SCALES:
            raise ValueError(f"v_scales={self.v_scales!r} is not supported; accepted values: {V_SCALES}")
        if self.v_scales == "block" and not self.block_scales:
            raise ValueError("v_scales='block' needs per-block Q/K scales too (qk_scales='block' or qk_format='int8'): "
                             "with every scale per block the quantizer reads Q/K/V once")
        if self.v_scales == "block" and self.smooth_v is True:
            raise ValueError("smooth_v=True cannot be combined with v_scales='block' (its add-back corrects a "
                             "per-head V scale's drift; the triton kernel needs no V centring: smooth_v='auto' or False)")

    # --- what the kernels need -------------------------------------------------------------------------
    def for_head_dim(self, head_dim: int) -> "FP8AttentionOptions":
        """These options with hadamard="auto" resolved for ``head_dim`` (what the kernels run), and a
        smooth_v="auto" that `for_keys` has not resolved taken as off (the quantizers called directly).
        Memoized (`_RESOLVED`): every attention call resolves its options, and a dataclass replace with its
        validation costs microseconds of host time."""
        if self.hadamard != "auto" and self.smooth_v != "auto":
            return self
        key = (self, "head_dim", head_dim, AUTO_HADAMARD, MAX_HADAMARD_DIM)  # the module constants it reads
        hit = _RESOLVED.get(key)
        if hit is None:
            options = self if self.smooth_v != "auto" else dataclasses.replace(self, smooth_v=False)
            if options.hadamard == "auto":
                # measured for e4m3 Q/K with per-head scales; per-block scales and int8 (triton) were measured
                # without
                rotatable = (not head_dim & (head_dim - 1) and head_dim <= MAX_HADAMARD_DIM
                             and not options.block_scales)
                options = dataclasses.replace(options, hadamard=AUTO_HADAMARD if rotatable else "none")
            hit = _RESOLVED[key] = options
        return hit

    def for_keys(self, backend: str, n_keys: int) -> "FP8AttentionOptions":
        """These options with smooth_v="auto" resolved for one call: on when ``backend`` is one of
        `AUTO_SMOOTH_V_BACKENDS` and the call has at least `AUTO_SMOOTH_V_MIN_KEYS` keys (``n_keys``: the key
        length, the longest sequence's for a packed batch). Memoized as `for_head_dim`."""
        if self.smooth_v != "auto":
            return self
        smooth = (backend in AUTO_SMOOTH_V_BACKENDS and n_keys >= AUTO_SMOOTH_V_MIN_KEYS
                  and not self.v_block_scales)  # V block scales exclude it (the constructor says why)
        key = (self, "smooth_v", smooth)
        hit = _RESOLVED.get(key)
        if hit is None:
            hit = _RESOLVED[key] = dataclasses.replace(self, smooth_v=smooth)
        return hit

    @classmethod
    def of(cls, hadamard="auto", smooth_k=False, smooth_v="auto", qk_scales="head",
           qk_format="e4m3", v_scales="head") -> "FP8AttentionOptions":
        """``cls(...)`` from the public keyword arguments, memoized by their types and values (a call's
        options are built on every call); unhashable or new values are validated by the constructor."""
        args = (hadamard, smooth_k, smooth_v, qk_scales, qk_format, v_scales)
        key = (cls, *((type(x), x) for x in args))
        try:
            hit = _BUILT.get(key)
        except TypeError:  # unhashable: the constructor says what is wrong with it
            return cls(*args)
        if hit is None:
            hit = cls(*args)
            if len(_BUILT) < _MEMO_MAX:
                _BUILT[key] = hit
        return hit

    @property
    def rotates_qk(self) -> bool:
        self._resolved()
        return self.hadamard in ("qk", "qkv")

    @property
    def rotates_v(self) -> bool:
        self._resolved()
        return self.hadamard in ("qkv", "v_only")

    def _resolved(self) -> None:
        if self.hadamard == "auto":
            raise ValueError("hadamard='auto' depends on the head dim: resolve it with for_head_dim() first")

    @property
    def block_scales(self) -> bool:
        return self.qk_scales == "block" or self.int8_qk

    @property
    def int8_qk(self) -> bool:
        return self.qk_format == "int8"

    @property
    def v_block_scales(self) -> bool:
        """V scales per V_SCALE_BLOCK tokens: with the per-block Q/K scales it needs, every scale is per block
        and the quantizer takes its single-pass kernel."""
        return self.v_scales == "block"

    @property
    def smooths(self) -> bool:
        """Whether the quantizer gathers per-channel statistics (K or V mean subtraction)."""
        if self.smooth_v == "auto":
            raise ValueError("smooth_v='auto' depends on the backend and the key length: resolve it with "
                             "for_keys() (or for_head_dim(), which takes it as off) first")
        return self.smooth_k or self.smooth_v

    def check_head_dim(self, head_dim: int) -> None:
        """Raise if these options cannot run at ``head_dim`` (the Hadamard rotation's size limits)."""
        if self.hadamard not in ("none", "auto") and (head_dim & (head_dim - 1) or head_dim > MAX_HADAMARD_DIM):
            raise ValueError(
                f"hadamard={self.hadamard!r} needs a power-of-two head_dim <= {MAX_HADAMARD_DIM}, got {head_dim}; "
                "use hadamard='none' (smooth_k still applies)"
            )

    # --- conversions -------------------------------------------------------------------------------------
    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults, as a dict (for messages and `describe_backend`)."""
        default = FP8AttentionOptions()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def coerce(cls, value: "FP8AttentionOptions | Mapping[str, Any] | None") -> "FP8AttentionOptions":
        """None -> the defaults; a mapping (e.g. a model config's ``fp8_attention_options``) -> validated
        options, unknown keys being an error instead of silently dropped."""
        if value is None:
            return DEFAULT_OPTIONS
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"fp8 attention options must be an FP8AttentionOptions or a dict, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown fp8 attention option(s) {unknown}; known: {sorted(known)}")
        return cls(**value)


# Memo tables of `FP8AttentionOptions.for_head_dim` / `for_keys` (keyed by the options and what they resolve
# from: a few entries per process) and `FP8AttentionOptions.of` (bounded: the keys are user arguments).
_RESOLVED: dict = {}
_BUILT: dict = {}
_MEMO_MAX = 256

DEFAULT_OPTIONS = FP8AttentionOptions()
# No accuracy mode at all: the quantizers' default when called directly (their tests compare plain e4m3).
NO_MODES = FP8AttentionOptions(hadamard="none")
