"""Input families for accuracy checks of the FP8 modes, and one function that scores a mode on them.

Real LLM activations are not Gaussian: a few K channels carry values 10-100x the rest and the first
(BOS) token often has massive activations. With one scale per (batch, KV head) those outliers take the
e4m3 range. The families below reproduce that, plus real Q/K/V captured from a model's forward
(`capture_qkv`, `capture_layers_qkv`). Layout: (B, H, S, D) views of (B, S, H, D) memory, as Transformers
hands them over.

Long context (`make_long_context`, `score_long_context`): the kernels run on the whole sequence, but only
the output rows of the last queries are scored, against a float32 reference computed for those queries
alone, so that S = 128k costs a few GB and seconds rather than an S x S reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import report

FAMILIES = ("gaussian", "k_outlier_20x", "k_outlier_100x", "massive_first_token")
# Long-context families (`make_long_context`), scored on the last queries only (`score_long_context`).
LONG_FAMILIES = ("v_offset", "needle", "gaussian")
# v_offset: V = N(0, 1) + V_OFFSET in every channel (what smooth_v removes).
V_OFFSET = 3.0
# needle: keys N(0, NEEDLE_K_STD^2) (diffuse attention), one needle key of norm sqrt(D) at
# `needle_position(S)`; the last queries' score on it is log(S) + NEEDLE_MARGIN, so in float32 it takes
# e^m / (e^m + ~1) ~ 0.88 of their attention at every S; its V row is NEEDLE_V * N(0, 1) per channel. Not
# +-NEEDLE_V: with every channel of the needle row equal in magnitude, e4m3 rounds them all by the same
# relative error (one per head, set by where 448 * NEEDLE_V / amax(V) falls on the e4m3 grid, and amax(V)
# grows with S), which made the family's SQNR jump between seeds and fall ~1 dB from 8k to 128k in fp8 and
# in the CPU emulation alike (bf16 sdpa: flat); Gaussian channels round independently.
NEEDLE_K_STD = 0.1
NEEDLE_MARGIN = 2.0
NEEDLE_V = 4.0
# Accuracy modes: name -> fp8_sdpa keyword arguments.
MODES = {
    "none": {},
    "smooth_k": {"smooth_k": True},
    "qk": {"hadamard": "qk"},
    "qkv": {"hadamard": "qkv"},
    "v_only": {"hadamard": "v_only"},
    "qkv+smooth_k": {"hadamard": "qkv", "smooth_k": True},
    "smooth_v": {"smooth_v": True},
    "smooth_k+smooth_v": {"smooth_k": True, "smooth_v": True},
    "qk+smooth_v": {"hadamard": "qk", "smooth_v": True},
    "qk+smooth_k+smooth_v": {"hadamard": "qk", "smooth_k": True, "smooth_v": True},
    "qkv+smooth_k+smooth_v": {"hadamard": "qkv", "smooth_k": True, "smooth_v": True},
    # a Q/K scale per 16 tokens: the triton backend (reference on CPU) whatever backend the others use
    "block": {"qk_scales": "block"},
    # int8 Q/K with a scale per 16 (Q) / 128 (K) tokens (SageAttention's Q.K^T): the triton backend (reference on CPU)
    "int8": {"qk_format": "int8"},
    "int8+smooth_k": {"qk_format": "int8", "smooth_k": True},
    "int8+smooth_k+smooth_v": {"qk_format": "int8", "smooth_k": True, "smooth_v": True},
    "block+qkv": {"qk_scales": "block", "hadamard": "qkv"},
    "block+qkv+smooth_k": {"qk_scales": "block", "hadamard": "qkv", "smooth_k": True},
    # every scale per block (V per 128 tokens too): the single-pass quantize kernel; triton (reference on CPU).
    "block+block_v": {"qk_scales": "block", "v_scales": "block"},
}
# A mode names everything it switches on: no rotation and no V centring unless it says so (the defaults are
# hadamard="auto" and smooth_v="auto", which centres V on fa3 from 32k keys).
MODES = {name: {"hadamard": "none", "smooth_v": False, **kwargs} for name, kwargs in MODES.items()}


def make_inputs(family: str, b: int, h_q: int, h_kv: int, s: int, d: int, *, device="cpu", dtype=torch.bfloat16, seed=0):
    """q (B, H_q, S, D), k/v (B, H_kv, S, D) of one family, as BHSD views of BSHD memory."""
    if family not in FAMILIES:
        raise ValueError(f"unknown input family {family!r}; expected one of {FAMILIES}")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h_q, d, generator=g)
    k = torch.randn(b, s, h_kv, d, generator=g)
    v = torch.randn(b, s, h_kv, d, generator=g)
    if family.startswith("k_outlier"):
        factor = float(family.split("_")[-1].rstrip("x"))
        channels = torch.randperm(d, generator=g)[:4]
        # a fixed per-channel offset plus scale, as in real K caches (the offset is what smoothing removes)
        k[..., channels] = k[..., channels] * factor * 0.3 + factor
    elif family == "massive_first_token":
        k[:, 0] *= 100.0
        v[:, 0] *= 30.0
        q[:, 0] *= 100.0
    to = lambda t: t.to(device=device, dtype=dtype).transpose(1, 2)  # noqa: E731
    return to(q), to(k), to(v)


def float32_reference(q, k, v, *, is_causal: bool) -> torch.Tensor:
    """Attention in float32 on the same bf16 inputs, (B, H_q, S_q, D) float32 (S_q == S_kv)."""
    return F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
    )


@dataclass
class Score:
    family: str
    mode: str
    sqnr_db: float
    cosine: float
    rel_l2: float


def _bf16_mode(dtype: torch.dtype) -> str:
    return f"bf16 sdpa ({dtype})"


def _fp8_output(q, k, v, kwargs: dict, *, backend, is_causal: bool) -> torch.Tensor:
    """fp8_sdpa with one mode's keywords; block scales and int8 Q/K run where they can (triton, reference on
    CPU)."""
    from .options import FP8AttentionOptions
    from .sdpa import fp8_sdpa

    block = FP8AttentionOptions(**kwargs).block_scales and backend not in ("triton", "reference")  # (V's need Q/K's)
    return fp8_sdpa(q, k, v, is_causal=is_causal, backend=None if block else backend, **kwargs)


def _score_rows(q, k, v, ref, bf16, *, family, modes, backend, is_causal, rows=slice(None)) -> list[Score]:
    """The bf16 yardstick's row, then one per mode: fp8 on all of q/k/v, its query ``rows`` vs ``ref``."""
    scores = [Score(family, _bf16_mode(q.dtype), **report(bf16, ref))]
    for name, kwargs in modes.items():
        out = _fp8_output(q, k, v, kwargs, backend=backend, is_causal=is_causal)[:, :, rows]
        scores.append(Score(family, name, **report(out, ref)))
    return scores


def score_modes(q, k, v, *, family: str, modes=MODES, backend=None, is_causal=True) -> list[Score]:
    """SQNR / cosine / relative L2 against float32 for each fp8 mode, plus bf16 SDPA as a yardstick."""
    ref = float32_reference(q, k, v, is_causal=is_causal)
    bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1])
    return _score_rows(q, k, v, ref, bf16, family=family, modes=modes, backend=backend, is_causal=is_causal)


# ------------------------------------------------------------------------------------------------------
# Long context
# ------------------------------------------------------------------------------------------------------


def needle_position(s: int) -> int:
    """The sequence position of the needle key of the ``needle`` family: early, not the first token."""
    return max(1, s // 16)


def make_long_context(family: str, s: int, *, b: int = 1, h: int = 8, h_kv: int = 8, d: int = 128,
                      device="cpu", dtype=torch.bfloat16, seed: int = 0, last: int = 256):
    """Full-length q (B, H, S, D), k/v (B, H_kv, S, D) of a long-context family, BHSD views of BSHD memory.

    ``gaussian``: N(0, 1) everywhere. ``v_offset``: Gaussian Q/K, V = N(0, 1) + `V_OFFSET` in every channel.
    ``needle``: keys N(0, `NEEDLE_K_STD`^2), so attention is diffuse, except one needle key
    (`needle_position`) of norm sqrt(D) along a random unit direction u per (batch, KV head); the last
    ``last`` queries (which all see the needle) are Gaussian with their u component set to
    log(S) + `NEEDLE_MARGIN`, so in float32 the needle takes ~0.88 of their attention at any S; the needle's
    V row is `NEEDLE_V` * N(0, 1) per channel.
    """
    if family not in LONG_FAMILIES:
        raise ValueError(f"unknown long-context family {family!r}; expected one of {LONG_FAMILIES}")
    if h % h_kv:
        raise ValueError(f"h ({h}) must be a multiple of h_kv ({h_kv})")
    if family == "needle" and not 0 < last < s - needle_position(s):
        raise ValueError(f"needle: last must be in [1, S - needle position = {s - needle_position(s)}), got {last}")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g)
    k = torch.randn(b, s, h_kv, d, generator=g)
    v = torch.randn(b, s, h_kv, d, generator=g)
    if family == "v_offset":
        v += V_OFFSET
    elif family == "needle":
        k *= NEEDLE_K_STD
        u = F.normalize(torch.randn(b, h_kv, d, generator=g), dim=-1)
        u_q = u.repeat_interleave(h // h_kv, dim=1)[:, None]  # (B, 1, H, D): each query head's KV head
        tail = q[:, -last:]
        tail -= (tail * u_q).sum(-1, keepdim=True) * u_q  # q . u = 0, then exactly log(S) + margin
        tail += (math.log(s) + NEEDLE_MARGIN) * u_q
        pos = needle_position(s)
        k[:, pos] = math.sqrt(d) * u  # score (q . k) / sqrt(D) = log(S) + margin
        v[:, pos] = NEEDLE_V * torch.randn(b, h_kv, d, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype).transpose(1, 2)  # noqa: E731
    return to(q), to(k), to(v)


def last_rows_attention(q, k, v, *, last: int, is_causal: bool = True, dtype: torch.dtype | None = torch.float32):
    """Attention of the last ``last`` queries over all keys, (B, H_q, last, D) in ``dtype`` (None: the
    inputs'). Causal is bottom-right aligned, as in `fp8_sdpa`. One query head at a time (its KV head
    converted once per group), so the score block is last x S_kv for one head: 128 MB at S = 128k."""
    b, h_q, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    group = h_q // h_kv
    dtype = dtype or q.dtype
    mask = None
    if is_causal:  # query row s_q - last + i sees keys j <= s_kv - last + i
        mask = torch.ones(last, s_kv, dtype=torch.bool, device=q.device).tril(s_kv - last)
    out = torch.empty(b, h_q, last, d, dtype=dtype, device=q.device)
    for j in range(h_kv):
        kj, vj = (t[:, j : j + 1].to(dtype) for t in (k, v))
        for i in range(j * group, (j + 1) * group):
            qi = q[:, i : i + 1, s_q - last :].to(dtype)
            out[:, i : i + 1] = F.scaled_dot_product_attention(qi, kj, vj, attn_mask=mask)
    return out


def score_long_context(q, k, v, *, family: str = "", modes=MODES, backend=None, last: int = 256,
                       is_causal: bool = True) -> list[Score]:
    """`score_modes` for long sequences: each mode runs fp8_sdpa on the whole q/k/v (every key, the scales
    of the whole sequence), and only the output rows of the last ``last`` queries are compared, with a
    float32 reference computed for those queries alone (`last_rows_attention`). The bf16 yardstick is
    torch SDPA in the inputs' dtype for the same queries."""
    if not 0 < last <= q.shape[2]:
        raise ValueError(f"last must be in [1, S_q={q.shape[2]}], got {last}")
    ref = last_rows_attention(q, k, v, last=last, is_causal=is_causal)
    bf16 = last_rows_attention(q, k, v, last=last, is_causal=is_causal, dtype=None)
    return _score_rows(q, k, v, ref, bf16, family=family, modes=modes, backend=backend, is_causal=is_causal,
                       rows=slice(q.shape[2] - last, None))


# ------------------------------------------------------------------------------------------------------
# Real activations
# ------------------------------------------------------------------------------------------------------


def capture_layers_qkv(model, input_ids: torch.Tensor, layers=None) -> dict:
    """Real (post-RoPE) Q/K/V of several attention layers from one ``model(input_ids)`` forward.

    ``layers``: layer indices, or None for every layer that calls the attention interface. Returns
    {layer index: (q, k, v)} in layer order, BHSD as the attention interface gets them. A temporary
    attention implementation records its inputs and runs sdpa; the model's own is restored afterwards.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    wanted = None if layers is None else set(layers)
    captured = {}

    def recorder(module, query, key, value, attention_mask, **kwargs):
        idx = getattr(module, "layer_idx", None)
        if idx is not None and (wanted is None or idx in wanted):
            captured[idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hfa_capture", recorder)
    previous = model.config._attn_implementation
    model.set_attn_implementation("hfa_capture")
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    missing = sorted(wanted - captured.keys()) if wanted is not None else ([] if captured else ["any"])
    if missing:
        raise RuntimeError(f"layer(s) {missing} were not called with the attention interface")
    return dict(sorted(captured.items()))


def capture_qkv(model, input_ids: torch.Tensor, layer: int = 0):
    """Real (post-RoPE) Q/K/V (q, k, v) from one attention layer's call during ``model(input_ids)``."""
    return capture_layers_qkv(model, input_ids, [layer])[layer]
