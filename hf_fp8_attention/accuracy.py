"""Input families for accuracy checks of the FP8 modes, and one function that scores a mode on them.

Real LLM activations are not Gaussian: a few K channels carry values 10-100x the rest and the first
(BOS) token often has massive activations. With one scale per (batch, KV head) those outliers take the
e4m3 range. The families below reproduce that, plus real Q/K/V captured from a model's forward
(`capture_qkv`). Layout: (B, H, S, D) views of (B, S, H, D) memory, as Transformers hands them over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import report

FAMILIES = ("gaussian", "k_outlier_20x", "k_outlier_100x", "massive_first_token")
# Accuracy modes: name -> fp8_sdpa keyword arguments.
MODES = {
    "none": {},
    "smooth_k": {"smooth_k": True},
    "qkv": {"hadamard": "qkv"},
    "v_only": {"hadamard": "v_only"},
    "qkv+smooth_k": {"hadamard": "qkv", "smooth_k": True},
    "smooth_k+smooth_v": {"smooth_k": True, "smooth_v": True},
    "qkv+smooth_k+smooth_v": {"hadamard": "qkv", "smooth_k": True, "smooth_v": True},
    # a Q/K scale per 16 tokens: the triton backend (reference on CPU) whatever backend the others use
    "block": {"qk_scales": "block"},
    "block+qkv": {"qk_scales": "block", "hadamard": "qkv"},
    "block+qkv+smooth_k": {"qk_scales": "block", "hadamard": "qkv", "smooth_k": True},
}


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


def score_modes(q, k, v, *, family: str, modes=MODES, backend=None, is_causal=True) -> list[Score]:
    """SQNR / cosine / relative L2 against float32 for each fp8 mode, plus bf16 SDPA as a yardstick."""
    from .sdpa import fp8_sdpa

    ref = float32_reference(q, k, v, is_causal=is_causal)
    rows = []
    bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1])
    rows.append(Score(family, f"bf16 sdpa ({q.dtype})", **report(bf16, ref)))
    for name, kwargs in modes.items():
        block = kwargs.get("qk_scales") == "block" and backend not in ("triton", "reference")
        out = fp8_sdpa(q, k, v, is_causal=is_causal, backend=None if block else backend, **kwargs)
        rows.append(Score(family, name, **report(out, ref)))
    return rows


def capture_qkv(model, input_ids: torch.Tensor, layer: int = 0):
    """Real (post-RoPE) Q/K/V from one attention layer's call during ``model(input_ids)``.

    Registers a temporary attention implementation that records its inputs and runs sdpa.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = {}

    def recorder(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) == layer:
            captured["qkv"] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hfa_capture", recorder)
    previous = model.config._attn_implementation
    model.set_attn_implementation("hfa_capture")
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    if "qkv" not in captured:
        raise RuntimeError(f"layer {layer} was not called with the attention interface")
    return captured["qkv"]
