"""`FP8Cache`: a transformers `Cache` whose full-attention layers keep K and V in e4m3 with a scale per block
of KV_BLOCK tokens per KV head (`FP8CacheLayer`); sliding-window layers keep transformers' bf16 layer.

Two ways in:
- the fp8 fast path (`prepare_model(model, kv_cache="fp8")`, Llama/Mistral/Qwen2/Qwen3 with fused RoPE):
  `FP8CacheLayer.append` writes un-rotated keys (RoPE applied by the write kernel) and `attend` runs the new
  queries against the fp8 blocks; nothing is re-quantized and no bf16 copy is made;
- any other model or attention: transformers calls `update` with rotated keys; it appends them and hands
  back the whole cache dequantized to the model dtype (correct, but a bf16 copy per call: no speedup).

Hadamard rotation (``hadamard``, default on where the head_dim is a power of two in [32, 256]): K is stored
rotated by the normalised Hadamard matrix after RoPE and the queries get the same rotation (in the attention
kernel, or in a decode step through `append_attend` by the write launch, which prepares them once), as the
per-call path's default `hadamard="qk"` does: the scores are unchanged and K's outlier channels are spread
over all channels before the e4m3 rounding. `dequantize` rotates K back.

Memory: 1 byte per K/V element plus 4 bytes per block descale (0.05% at D=128), a (2, B, H, KV_BLOCK, D)
float32 tail per layer, and up to ~3% spare capacity (the storage grows in steps, not per token).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .._constants import FP8_DTYPE, KV_BLOCK
from .._intmath import cdiv
from ..quantization.hadamard import hadamard_matrix
from . import ops
from .reference import dequantize

# Storage grows to max(needed, capacity + max(_GROW_MIN, capacity // _GROW_DIV)) tokens, rounded up to
# _GROW_ALIGN: a copy every ~3% of growth, at most ~3% unused.
_GROW_MIN = 256
_GROW_DIV = 32
_GROW_ALIGN = 256


def _impl_for(device: torch.device) -> str:
    """"triton" on GPUs with fp8 conversions (SM 8.9+) and triton installed, else "torch"."""
    from ..dispatch import device_arch, kernel_available

    arch = device_arch(device)
    return "triton" if device.type == "cuda" and arch is not None and arch >= 89 and kernel_available("triton") else "torch"


class _CodesView:
    """A layer's ``keys`` / ``values``: the e4m3 codes of its cached tokens, (B, H, length, D) views of the
    storage attribute ``storage`` made when read (None before the first write). Assigning anything but None
    (the base class's initial value) is refused: the fp8 storage is written by ``append``."""

    def __init__(self, storage: str):
        self.storage = storage

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        codes = getattr(layer, self.storage, None)
        return None if codes is None else codes[:, :, : layer.length]

    def __set__(self, layer, value) -> None:
        if value is not None:
            raise AttributeError(f"FP8CacheLayer.{self.name} is a view of the fp8 storage; write through append()")


class FP8CacheLayer(CacheLayerMixin):
    """One full-attention layer's K/V in e4m3, a descale per KV_BLOCK tokens per KV head.

    ``keys`` / ``values`` are the e4m3 codes of the cached tokens, (B, H, length, D) views (what generic code
    inspecting a cache layer reads for shapes and devices); `dequantize` gives the values. ``impl`` forces
    "triton" or "torch" (tests); None picks from the device at the first write. ``hadamard``: store K rotated
    (and rotate the queries); None: on where the head_dim allows it (`ops.rotatable`), decided at the first
    write; True with a head_dim that does not allow it is an error there.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True
    # The decode step (`append_attend`) hands its length to the attention launch on the device (True) or as
    # an argument (False: the build before session 14; benchmarks compare the two)
    DEVICE_LENGTH = True

    def __init__(self, impl: str | None = None, hadamard: bool | None = None, **kwargs):
        super().__init__()
        self.impl = impl
        self.hadamard = hadamard
        self.rotate = False  # resolved from hadamard and the head_dim at the first write
        self.length = 0
        self.dtype = None
        self.k8 = self.v8 = self.k_desc = self.v_desc = self.tails = None
        self._tail_index = 0
        self._warm_sig = None  # `append_attend`: the geometry of this layer's last warm-up check

    # --- storage -------------------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        if value_states.shape[:2] != (B, H) or value_states.shape[-1] != D:
            raise ValueError(f"keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} differ in batch, "
                             "heads or head_dim; the fp8 cache stores (B, H, S, D) pairs of one shape")
        self.device = key_states.device
        self.dtype = key_states.dtype
        if self.impl is None:
            self.impl = _impl_for(self.device)
        if self.hadamard and not ops.rotatable(D):
            raise ValueError(f"FP8CacheLayer(hadamard=True) needs a power-of-two head_dim in [32, 256], got {D}; "
                             "use hadamard=False or None")
        self.rotate = ops.rotatable(D) if self.hadamard is None else bool(self.hadamard)
        self._allocate(B, H, D, 0)
        # the decode step's length on the device: stored by its write launch, read by its attention launch
        # (`append_attend`; the DEVICE_LEN build, less GPU time than a length argument's)
        self._length_dev = torch.zeros((), dtype=torch.int64, device=self.device)
        self.is_initialized = True

    def _allocate(self, B: int, H: int, D: int, capacity: int) -> None:
        dev = self.device
        self.k8 = torch.empty(B, H, capacity, D, dtype=FP8_DTYPE, device=dev)
        self.v8 = torch.empty(B, H, capacity, D, dtype=FP8_DTYPE, device=dev)
        self.k_desc = torch.ones(B, H, capacity // KV_BLOCK, dtype=torch.float32, device=dev)
        self.v_desc = torch.ones(B, H, capacity // KV_BLOCK, dtype=torch.float32, device=dev)
        self.tails = torch.zeros(2, 2, B, H, KV_BLOCK, D, dtype=torch.float32, device=dev)

    # ``keys`` / ``values``: views made when read (generic code inspecting a layer), not at every append and
    # crop (two slices per call were ~20 us of host time per decode step and layer on a CPU).
    keys = _CodesView("k8")
    values = _CodesView("v8")

    def _reserve(self, needed: int) -> None:
        capacity = self.k8.shape[2]
        if needed <= capacity:
            return
        grown = max(needed, capacity + max(_GROW_MIN, capacity // _GROW_DIV))
        grown = cdiv(grown, _GROW_ALIGN) * _GROW_ALIGN
        B, H, _, D = self.k8.shape
        old = (self.k8, self.v8, self.k_desc, self.v_desc, self.tails)
        self._allocate(B, H, D, grown)
        n_blk = cdiv(self.length, KV_BLOCK)
        self.k8[:, :, : self.length] = old[0][:, :, : self.length]
        self.v8[:, :, : self.length] = old[1][:, :, : self.length]
        self.k_desc[:, :, :n_blk] = old[2][:, :, :n_blk]
        self.v_desc[:, :, :n_blk] = old[3][:, :, :n_blk]
        self.tails.copy_(old[4])

    @property
    def capacity(self) -> int:
        return 0 if self.k8 is None else self.k8.shape[2]

    def memory_bytes(self) -> int:
        """Bytes this layer holds on its device (codes, descales, tails, the length scalar; spare capacity
        included)."""
        if self.k8 is None:
            return 0
        return sum(t.numel() * t.element_size()
                   for t in (self.k8, self.v8, self.k_desc, self.v_desc, self.tails, self._length_dev))

    # --- writes --------------------------------------------------------------------------------------------

    def append(self, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None, *, query: torch.Tensor | None = None,
               q_out: torch.Tensor | None = None, q_desc_out: torch.Tensor | None = None,
               length_out: torch.Tensor | None = None, warm_only: bool = False) -> None:
        """Quantize and store key/value (B, H, n, D) after the cached tokens; with cos/sin (B or 1, n, D) the
        keys are un-rotated and the write applies RoPE (float32, rotate-half convention) first. query / q_out /
        q_desc_out / length_out / warm_only: see `ops.write_blocks` (what `append_attend` uses; warm_only
        reserves the room and compiles the write build, nothing else changes)."""
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        B, H, _, D = self.k8.shape
        if key.shape[:2] != (B, H) or key.shape[-1] != D or value.shape != key.shape:
            raise ValueError(f"appending keys {tuple(key.shape)} / values {tuple(value.shape)} to a cache of "
                             f"(B, H, D) = {(B, H, D)}")
        n = key.shape[2]
        if n == 0:
            return
        self._reserve(self.length + n)
        tail_in = self.tails[self._tail_index]
        tail_out = tail_in if self.impl == "torch" else self.tails[1 - self._tail_index]
        ops.write_blocks(key, value, cos, sin, self.k8, self.v8, self.k_desc, self.v_desc, tail_in, tail_out,
                         self.length, impl=self.impl, rotate=self.rotate, query=query, q_out=q_out,
                         q_desc_out=q_desc_out, length_out=length_out, warm_only=warm_only)
        if warm_only:
            return
        if tail_out is not tail_in:
            self._tail_index = 1 - self._tail_index
        self.length += n

    def append_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None,
                      sin: torch.Tensor | None, *, scale: float) -> torch.Tensor:
        """One step of the fused path: ``append(key, value, cos, sin)`` (B, H, n, D), then the new queries
        (B, n, H_q, D), the same n positions, attend from the cache -> (B, n, H_q, D) in query's dtype; what
        `append` then `attend` give. A decode step (n * H_q / H <= `ops.FP16_MAX_ROWS` query rows per KV
        head) on the kernels of a rotating cache hands the queries to the write launch, which stores them as
        the attention's fp16 operand with RoPE, the rotation and the row scales applied, so that the split
        programs of the attention launch do not each prepare them again (the same values), and stores the
        cached length before the new tokens in a device scalar that the attention launch reads (its DEVICE_LEN
        build: less GPU time, the same output; `ops.cache_attention`'s device_length)."""
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        B, n, H_q, D = query.shape
        if (self.impl != "triton" or not self.rotate or query.shape[0] != self.k8.shape[0] or key.shape[2] != n
                or H_q % self.k8.shape[1] or n * (H_q // self.k8.shape[1]) > ops.FP16_MAX_ROWS):
            self.append(key, value, cos, sin)
            return self.attend(query, cos, sin, scale=scale)
        q_op = torch.empty(query.shape, dtype=torch.float16, device=query.device)
        q_desc = torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
        dev_len = self._length_dev if self.DEVICE_LENGTH else None

        def write(warm_only=False):
            self.append(key, value, cos, sin, query=query, q_out=q_op, q_desc_out=q_desc, length_out=dev_len,
                        warm_only=warm_only)

        def attend(length, warm_only=False):
            return ops.cache_attention(q_op, None, None, self.k8, self.k_desc, self.v8, self.v_desc, length,
                                       scale=scale, impl=self.impl, rotate=False, out_dtype=query.dtype,
                                       q_descale=q_desc, device_length=dev_len, warm_only=warm_only)

        # a new geometry's first step: its write and attention builds compile side by side (the full key is
        # built only when this layer's batch / query count / heads / build differ from its last step's)
        sig = (B, n, H_q, dev_len is not None)
        if ops.CONCURRENT_WARMUP and sig != self._warm_sig:
            self._warm_sig = sig
            step_key = (query.device, query.dtype, key.dtype, value.dtype, tuple(query.shape), tuple(key.shape),
                        key.stride(), value.stride(), query.stride(),
                        None if cos is None else (cos.dtype, cos.shape[0]), self.rotate, dev_len is not None)
            self._reserve(self.length + n)  # the write's storage as it will be (strides of a grown cache)
            ops.warm_decode_step(step_key, lambda: write(warm_only=True),
                                 lambda: attend(self.length + n, warm_only=True))
        write()
        return attend(self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' generic path (keys already rotated): append, then return the whole cache dequantized
        to the model dtype, (B, H, length, D) each."""
        self.append(key_states, value_states)
        return self.dequantize()

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values in the model dtype, (B, H, length, D) (keys rotated back when stored
        rotated: the normalised Hadamard matrix is its own inverse)."""
        keys = dequantize(self.k8, self.k_desc, self.length)
        if self.rotate:
            keys = keys @ hadamard_matrix(keys.shape[-1], device=keys.device)
        return keys.to(self.dtype), dequantize(self.v8, self.v_desc, self.length).to(self.dtype)

    # --- reads ---------------------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, *, scale: float,
               qk_fp8: bool | None = None) -> torch.Tensor:
        """Attention of new queries (B, S_q, H_q, D), the last S_q cached positions (causal), against the
        cache -> (B, S_q, H_q, D) in query's dtype. cos/sin rotate the queries first (un-rotated input)."""
        return ops.cache_attention(query, cos, sin, self.k8, self.k_desc, self.v8, self.v_desc, self.length,
                                   scale=scale, impl=self.impl, qk_fp8=qk_fp8, rotate=self.rotate)

    # --- what transformers' Cache and generate call ------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.length = 0
        self._tail_index = 0
        if self.is_initialized:
            self.tails.zero_()

    def _select(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (any LongTensor index along the batch, repeats allowed)."""
        if not self.is_initialized:
            return
        index = index.to(self.k8.device)
        self.k8, self.v8 = self.k8[index], self.v8[index]
        self.k_desc, self.v_desc = self.k_desc[index], self.v_desc[index]
        self.tails = self.tails[:, :, index]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            B = self.k8.shape[0]
            self._select(torch.arange(B, device=self.k8.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count; a positive
        one is the length to keep). The block holding the new end is re-quantized from its fp8 values at
        the next append (exact when the appended tokens do not raise that block's amax)."""
        if not self.is_initialized:
            return
        keep = self.length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, self.length)
        keep = max(0, keep)
        if keep == self.length:
            return
        self.length = keep
        b0 = keep // KV_BLOCK * KV_BLOCK
        r = keep - b0
        tail = self.tails[self._tail_index]
        if r:
            for slot, (codes, desc) in enumerate(((self.k8, self.k_desc), (self.v8, self.v_desc))):
                tail[slot, :, :, :r] = codes[:, :, b0:keep].float() * desc[:, :, b0 // KV_BLOCK, None, None]

    def offload(self):
        raise NotImplementedError("the fp8 cache does not offload to CPU; use a bf16 cache with offloading")

    def prefetch(self):
        return None


def _layer_types(config) -> list[str]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = text.num_hidden_layers
    types = getattr(text, "layer_types", None)
    if types is None:  # e.g. Mistral: one window (or none) for every layer
        windowed = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True) is not False
        return ["sliding_attention" if windowed else "full_attention"] * n
    return list(types)[:n]


class FP8Cache(DynamicCache):
    """A dynamic cache whose full-attention layers store K/V in e4m3 (`FP8CacheLayer`).

    ``FP8Cache(config=model.config)`` sizes the layer list from the config: full-attention layers get
    `FP8CacheLayer`, sliding-window layers transformers' bf16 `DynamicSlidingWindowLayer` (their window
    is kept), and ``fp8_layers`` (a set of layer indices) restricts fp8 storage further (the others get
    a bf16 `DynamicLayer`). Without a config every layer is an `FP8CacheLayer`, created on first use.
    ``impl``: "triton" / "torch" to force the kernels or their torch reference (tests). ``hadamard``: the
    fp8 layers' K/Q rotation (`FP8CacheLayer`; None: on where the head_dim allows it).
    """

    def __init__(self, config=None, fp8_layers=None, impl: str | None = None, hadamard: bool | None = None):
        self.impl = impl
        if config is None:
            super(DynamicCache, self).__init__(layer_class_to_replicate=_replicator(impl, hadamard))
            return
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = []
        for idx, kind in enumerate(_layer_types(config)):
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text.sliding_window))
            elif kind == "full_attention" and (fp8_layers is None or idx in fp8_layers):
                layers.append(FP8CacheLayer(impl=impl, hadamard=hadamard))
            else:
                layers.append(DynamicLayer())
        super(DynamicCache, self).__init__(layers=layers)

    def fp8_layer(self, layer_idx: int) -> FP8CacheLayer | None:
        """The layer's `FP8CacheLayer` (created if the cache grows lazily), or None for a bf16 layer."""
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer if isinstance(layer, FP8CacheLayer) else None

    def memory_bytes(self) -> int:
        """Bytes held by all layers (fp8 layers with their descales and tails; bf16 layers' K/V)."""
        return layers_memory_bytes(self.layers)


def layers_memory_bytes(layers) -> int:
    """Bytes a cache's layers hold: `FP8CacheLayer.memory_bytes` for fp8 layers (static ones included), the
    keys and values of initialized bf16 layers."""
    total = 0
    for layer in layers:
        if isinstance(layer, FP8CacheLayer):
            total += layer.memory_bytes()
        elif getattr(layer, "keys", None) is not None and layer.is_initialized:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


class _replicator:
    """A picklable zero-argument factory of `FP8CacheLayer(impl, hadamard)` for `Cache.layer_class_to_replicate`."""

    def __init__(self, impl, hadamard=None):
        self.impl = impl
        self.hadamard = hadamard

    def __call__(self):
        return FP8CacheLayer(impl=self.impl, hadamard=self.hadamard)
