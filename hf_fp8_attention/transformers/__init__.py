"""The only part of the package that knows about HuggingFace Transformers (5.17 and 5.24: attention modules
take ``past_key_values`` in 5.17, ``cache`` in 5.24).

Modules, dependencies one way (each imports only those above it):
- `bound`: `BoundMethod`, the picklable bound method that prepare_model stores on instances.
- `masks`: the mask function for the fp8 names (all `transformers.masking_utils` coupling).
- `unpad`: padding spans, the packing plan and packed offsets (as modeling_flash_attention_utils), cached
  per forward.
- `fallback`: why a call cannot run in fp8, and the bf16/fp16 attention that runs it instead.
- `attention`: the attention names (one per `backends.ATTN_IMPLEMENTATIONS` entry), the adapter, `register`.
- `fused_rope`: the Llama-family forward with RoPE fused into the fp8 quantize step, its version gate and
  self-check.
- `model`: `prepare_model` / `unprepare_model` / `describe_backend`.

What runs where:
- ``fp8_fa3`` / ``fp8_fa4`` / ``fp8_triton`` / ``fp8_reference`` / ``fp8`` (backend from the query's device at
  call time) are registered in `AttentionInterface`, each with a flash-style mask in `AttentionMaskInterface`:
  a 2-D (B, S_kv) padding mask, or None when nothing is padded.
- Padded batches stay exact in fp8: every row whose valid keys are one contiguous run (left or right
  padding) is attended over that run (rows packed into one `fp8_sdpa_varlen` call when they differ);
  padded query rows are zeros (as FlashAttention-2 returns them). Packed sequences that come with
  FlashAttention's ``cu_seq_lens_q/k`` kwargs run as varlen, as flash_attention_2 runs them.
- What fp8_sdpa cannot express (a non-contiguous or prepared 4-D mask, packing known only from position_ids
  or other custom mask patterns, a sliding window shorter than the keys, logit softcapping, attention sinks,
  a head_dim without an fp8 kernel) runs that call in bf16/fp16 attention after a one-time warning. Never
  silently wrong: fp8 runs only when its result is the one the model asked for.
- Errors instead of fallbacks: dropout (training), ``output_attentions=True``, and float32 activations
  (a silent per-call fallback would hide that nothing runs in fp8; load the model in bf16 instead).
"""

from ..backends import ATTN_IMPLEMENTATIONS
from .attention import register
from .masks import fp8_attention_mask
from .model import describe_backend, new_cache, prepare_model, unprepare_model
from .unpad import _fp8_padded  # noqa: F401  (tests/gpu/test_varlen_gpu.py imports it from here)

__all__ = ["ATTN_IMPLEMENTATIONS", "describe_backend", "fp8_attention_mask", "new_cache", "prepare_model",
           "register", "unprepare_model"]
