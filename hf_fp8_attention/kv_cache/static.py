"""`FP8StaticCache`: the FP8 cache for transformers' fast-generation recipe (a static cache + `torch.compile`).

transformers compiles a decode step when the cache is compileable (every layer ``is_compileable``, as its
`StaticCache`): the step is then traced once and, in mode "reduce-overhead", replayed as a CUDA graph. Both
need a step whose host code does not depend on the cached length. `FP8StaticCacheLayer` therefore keeps its
storage at a fixed size (``max_cache_len`` rounded up to a block) and its length in a device tensor
(``cumulative_length``, an int64 scalar, as transformers' `StaticLayer`); its kernels read the length on the
device (`ops.write_blocks` / `ops.cache_attention` with ``device_length``): one write launch sized for the
new tokens, one attention launch with the split count a cache of the full capacity takes (the splits past
the real length do nothing), so one traced step serves every length. The write, the attention and the
length update are one torch custom op (`fp8_cache_step`) that mutates the layer's buffers: opaque to dynamo,
marked static for CUDA graphs.

The partial block's float32 values live in two parity slots (a block's in slot ``block % 2``), so a write
reads and writes them without knowing the length on the host (see `kernels.cache_write_kernel`). The
numerics are those of `FP8CacheLayer`: the same blocks, scales and kernels, the same output.

Two ways in: ``generate(..., cache_implementation="static")`` on a model prepared with
``prepare_model(model, kv_cache="fp8")`` swaps transformers' fresh `StaticCache` for an `FP8StaticCache`
(its fp8 layers where the fused forward attends from them; the others stay transformers' static layers),
and generate compiles the decode step on a GPU as it does for its own static cache; or
``past_key_values=FP8StaticCache(config=model.config, max_cache_len=...)``. Limits: no padded batches (the
fused forward refuses a padding mask where it can see one: outside a compiled step, i.e. at the prefill),
the batch size is fixed (beam search reorders in place; nothing changes the batch size), no offloading, and
compiled steps need the Triton kernels (the torch implementation reads the length on the host).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from .._constants import FP8_DTYPE, KV_BLOCK
from .._intmath import cdiv
from . import ops
from .layer import FP8CacheLayer, _CodesView, _layer_types, layers_memory_bytes
from .reference import dequantize


def _step(query: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None,
          sin: torch.Tensor | None, k8: torch.Tensor, v8: torch.Tensor, k_desc: torch.Tensor, v_desc: torch.Tensor,
          tails: torch.Tensor, length: torch.Tensor, scale: float, rotate: bool, impl: str) -> torch.Tensor | None:
    """Append key/value (B, H, n, D) at the device ``length``, then (query (B, n, H_q, D) given) attend from
    the cache; ``length`` += n. The body of both custom ops."""
    B, H, n, D = key.shape
    if impl == "torch" and key.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the FP8 static cache's torch implementation reads its length on the host, which a "
                           "CUDA graph cannot capture: compiled generation with it needs the Triton kernels "
                           "(SM 8.9+ with triton installed)")
    tails_in = tails if n <= KV_BLOCK else tails.clone()  # a long write reads its tails from a copy
    # a decode step: the write launch prepares the queries once (`FP8CacheLayer.append_attend`)
    prep = query is not None and impl == "triton" and rotate and n * (query.shape[2] // H) <= ops.FP16_MAX_ROWS
    q_op = q_desc = None
    if prep:
        q_op = torch.empty(query.shape, dtype=torch.float16, device=query.device)
        q_desc = torch.empty(query.shape[:3], dtype=torch.float32, device=query.device)
    ops.write_blocks(key, value, cos, sin, k8, v8, k_desc, v_desc, tails_in, tails, 0, impl=impl, rotate=rotate,
                     query=query if prep else None, q_out=q_op, q_desc_out=q_desc, device_length=length)
    out = None
    if prep:
        out = ops.cache_attention(q_op, None, None, k8, k_desc, v8, v_desc, k8.shape[2], scale=scale, impl=impl,
                                  rotate=False, out_dtype=query.dtype, q_descale=q_desc, device_length=length,
                                  static=True)
    elif query is not None:
        out = ops.cache_attention(query, cos, sin, k8, k_desc, v8, v_desc, k8.shape[2], scale=scale, impl=impl,
                                  rotate=rotate, device_length=length, static=True)
    length.add_(n)
    return out


_MUTATED = ("k8", "v8", "k_desc", "v_desc", "tails", "length")

# raised where a padded batch meets an FP8StaticCache (the prefill's fused forward, generate's first step)
PADDED_BATCH_ERROR = ("FP8StaticCache does not take padded batches (its attention reads every filled slot); generate "
                      "sequences of one length, or use FP8Cache (prepare_model(kv_cache='fp8') without "
                      "cache_implementation='static')")


@torch.library.custom_op("hf_fp8_attention::fp8_cache_step", mutates_args=_MUTATED)
def fp8_cache_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None,
                   sin: torch.Tensor | None, k8: torch.Tensor, v8: torch.Tensor, k_desc: torch.Tensor,
                   v_desc: torch.Tensor, tails: torch.Tensor, length: torch.Tensor, scale: float, rotate: bool,
                   impl: str) -> torch.Tensor:
    """One step of `FP8StaticCacheLayer.append_attend`: write, attend, advance the length -> (B, n, H_q, D)."""
    return _step(query, key, value, cos, sin, k8, v8, k_desc, v_desc, tails, length, scale, rotate, impl)


@fp8_cache_step.register_fake
def _fp8_cache_step_fake(query, *unused):
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


@torch.library.custom_op("hf_fp8_attention::fp8_cache_write", mutates_args=_MUTATED)
def fp8_cache_write(key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                    k8: torch.Tensor, v8: torch.Tensor, k_desc: torch.Tensor, v_desc: torch.Tensor,
                    tails: torch.Tensor, length: torch.Tensor, rotate: bool, impl: str) -> None:
    """`FP8StaticCacheLayer.append`: write at the device length, advance it."""
    _step(None, key, value, cos, sin, k8, v8, k_desc, v_desc, tails, length, 1.0, rotate, impl)


@fp8_cache_write.register_fake
def _fp8_cache_write_fake(*unused):
    return None


class _FullView(_CodesView):
    """A static layer's ``keys`` / ``values``: its whole e4m3 storage (B, H, capacity, D), as transformers'
    `StaticLayer` exposes its whole buffers (None before the first write); written only through the ops."""

    def __get__(self, layer, owner=None):
        return self if layer is None else getattr(layer, self.storage, None)


class FP8StaticCacheLayer(FP8CacheLayer):
    """`FP8CacheLayer` at a fixed capacity with its length on the device: compileable (see the module).

    ``max_cache_len``: tokens it holds (storage rounded up to a block of KV_BLOCK). ``impl`` / ``hadamard``:
    as `FP8CacheLayer`. ``cumulative_length``: the cached length, an int64 scalar on the cache's device.
    Writes past ``max_cache_len``: a chunk (n > 1) outside a compiled step is refused (one host read of the
    length); a decode step is not checked (generate sizes the cache for its tokens): the kernels store
    nothing past the storage, the torch path raises.
    """

    is_compileable = True
    is_croppable = True

    keys = _FullView("k8")
    values = _FullView("v8")

    def __init__(self, max_cache_len: int, impl: str | None = None, hadamard: bool | None = None, **kwargs):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"FP8StaticCacheLayer needs max_cache_len >= 1, got {max_cache_len!r}")
        super().__init__(impl=impl, hadamard=hadamard)
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        super().lazy_initialization(key_states, value_states)  # checks, impl, rotation; empty storage
        self.capacity_tokens = cdiv(self.max_cache_len, KV_BLOCK) * KV_BLOCK
        dev = self.device
        # zeros: `update` hands the whole storage back dequantized, and masked slots must not hold NaN codes
        self.k8 = torch.zeros(B, H, self.capacity_tokens, D, dtype=FP8_DTYPE, device=dev)
        self.v8 = torch.zeros(B, H, self.capacity_tokens, D, dtype=FP8_DTYPE, device=dev)
        self.k_desc = torch.ones(B, H, self.capacity_tokens // KV_BLOCK, dtype=torch.float32, device=dev)
        self.v_desc = torch.ones(B, H, self.capacity_tokens // KV_BLOCK, dtype=torch.float32, device=dev)
        self.tails = torch.zeros(2, 2, B, H, KV_BLOCK, D, dtype=torch.float32, device=dev)  # (parity, K/V, ...)
        self.cumulative_length = self.cumulative_length.to(dev)
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs replay over these buffers
            for t in (self.k8, self.v8, self.k_desc, self.v_desc, self.tails, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
            if dev.type == "cuda":
                # the fused combine's arrival counters (one per batch row, KV head and row tile; a decode step has
                # one tile, a long chunk more), allocated here, outside the compiled step: a first allocation in
                # its warm-up would land in the CUDA-graph pool, which must hold no tensor that outlives a step
                ops._counters(dev, 4 * B * H)

    def _reserve(self, needed: int) -> None:  # never grows
        return None

    def _check(self, key: torch.Tensor, value: torch.Tensor) -> None:
        B, H, _, D = self.k8.shape
        if key.shape[:2] != (B, H) or key.shape[-1] != D or value.shape != key.shape:
            raise ValueError(f"appending keys {tuple(key.shape)} / values {tuple(value.shape)} to a static cache of "
                             f"(B, H, D) = {(B, H, D)}")
        n = key.shape[2]
        if n > self.max_cache_len:
            raise ValueError(f"{n} new tokens exceed the static cache's {self.max_cache_len}")
        if n > 1 and not torch.compiler.is_compiling() and self.length + n > self.max_cache_len:
            # chunks (a prefill) outside a compiled step: one host read of the length (decode steps are not
            # checked: generate sizes the cache for them; past the end the kernels store nothing)
            raise ValueError(f"{self.length} cached + {n} new tokens exceed the static cache's {self.max_cache_len}")

    def append(self, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None, **unused) -> None:
        """Quantize and store key/value (B, H, n, D) after the cached tokens (RoPE first with cos/sin)."""
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        self._check(key, value)
        if key.shape[2]:
            fp8_cache_write(key, value, cos, sin, self.k8, self.v8, self.k_desc, self.v_desc, self.tails,
                            self.cumulative_length, self.rotate, self.impl)

    def append_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor | None,
                      sin: torch.Tensor | None, *, scale: float) -> torch.Tensor:
        """`FP8CacheLayer.append_attend` with the length on the device: one custom op call."""
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        self._check(key, value)
        B, n, H_q, D = query.shape
        if key.shape[2] != n or B != self.k8.shape[0] or H_q % self.k8.shape[1] or D != self.k8.shape[-1]:
            raise ValueError(f"queries {tuple(query.shape)} do not fit keys {tuple(key.shape)} of a cache of "
                             f"(B, H, D) = {(self.k8.shape[0], self.k8.shape[1], self.k8.shape[-1])}")
        return fp8_cache_step(query, key, value, cos, sin, self.k8, self.v8, self.k_desc, self.v_desc, self.tails,
                              self.cumulative_length, float(scale), self.rotate, self.impl)

    def attend(self, *args, **kwargs):
        raise NotImplementedError("FP8StaticCacheLayer attends in append_attend (the length is on the device)")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """transformers' generic path (rotated keys): append, then the whole storage dequantized (B, H, capacity,
        D), as `StaticLayer` hands back its whole buffers (the mask hides the unwritten slots: zeros)."""
        self.append(key_states, value_states)
        return self.dequantize()

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first max_cache_len slots in the model dtype (unwritten slots 0: the mask's kv length), keys
        rotated back when stored rotated."""
        from ..quantization.hadamard import hadamard_matrix

        keys = dequantize(self.k8, self.k_desc, self.max_cache_len)
        if self.rotate:
            keys = keys @ hadamard_matrix(keys.shape[-1], device=keys.device)
        return keys.to(self.dtype), dequantize(self.v8, self.v_desc, self.max_cache_len).to(self.dtype)

    # --- what transformers' Cache and generate call ------------------------------------------------------

    @property
    def length(self) -> int:
        """The cached length read on the host (a device sync; not inside a compiled step)."""
        return int(self.cumulative_length)

    @length.setter
    def length(self, value: int) -> None:  # FP8CacheLayer.__init__ sets 0; the length lives on the device
        if value:
            raise AttributeError("FP8StaticCacheLayer's length is its device tensor cumulative_length")

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def reset(self) -> None:
        if self.is_initialized:
            self.cumulative_length.zero_()
            self.tails.zero_()

    def memory_bytes(self) -> int:
        return super().memory_bytes() + (8 if self.is_initialized else 0)

    def _select(self, index: torch.Tensor) -> None:
        """Reorder the batch rows in place (the addresses stay: CUDA graphs replay over them)."""
        if not self.is_initialized:
            return
        index = index.to(self.k8.device)
        if index.shape != (self.k8.shape[0],):
            raise ValueError(f"a static cache keeps its batch size {self.k8.shape[0]}; got an index of shape "
                             f"{tuple(index.shape)}")
        for t in (self.k8, self.v8, self.k_desc, self.v_desc):
            t.copy_(t[index])
        self.tails.copy_(self.tails[:, :, index])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static cache keeps its batch size: use FP8Cache for batch selection")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static cache keeps its batch size: use FP8Cache to repeat the batch")

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as `StaticLayer`). The new end's partial
        block goes into its parity slot from its fp8 values (a host sync: outside compiled steps)."""
        if tokens_to_remove > 0:
            raise RuntimeError("static layers are cropped by a negative count of tokens to remove")
        if not self.is_initialized or tokens_to_remove == 0:
            return
        keep = max(0, self.length + tokens_to_remove)
        b0 = keep // KV_BLOCK * KV_BLOCK
        r = keep - b0
        tail = self.tails[b0 // KV_BLOCK % 2]
        if r:
            for slot, (codes, desc) in enumerate(((self.k8, self.k_desc), (self.v8, self.v_desc))):
                tail[slot, :, :, :r] = codes[:, :, b0:keep].float() * desc[:, :, b0 // KV_BLOCK, None, None]
        self.cumulative_length.fill_(keep)


class FP8StaticCache(StaticCache):
    """transformers' `StaticCache` whose full-attention layers store K/V in e4m3 (`FP8StaticCacheLayer`).

    ``FP8StaticCache(config=model.config, max_cache_len=n)``: the layers `StaticCache` would build, its
    plain full-attention ones (`StaticLayer`) replaced by fp8 layers; ``fp8_layers`` (layer indices)
    restricts that further. ``impl`` / ``hadamard``: as `FP8Cache`. Sliding-window layers keep transformers'
    static sliding layers (bf16).
    """

    def __init__(self, config, max_cache_len: int, fp8_layers=None, impl: str | None = None,
                 hadamard: bool | None = None, **kwargs):
        if kwargs.get("offloading"):
            raise ValueError("FP8StaticCache does not offload; use transformers' StaticCache for offloading")
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.impl = impl
        types = _layer_types(config)
        for idx, layer in enumerate(self.layers):
            if (type(layer) is StaticLayer and idx < len(types) and types[idx] == "full_attention"
                    and (fp8_layers is None or idx in fp8_layers)):
                self.layers[idx] = FP8StaticCacheLayer(layer.max_cache_len, impl=impl, hadamard=hadamard)

    def fp8_layer(self, layer_idx: int) -> FP8StaticCacheLayer | None:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer if isinstance(layer, FP8StaticCacheLayer) else None

    def memory_bytes(self) -> int:
        """Bytes held by all layers (fp8 layers with their descales, tails and length; bf16 layers' K/V)."""
        return layers_memory_bytes(self.layers)

