"""FP8 KV cache: K/V stored in e4m3 with a scale per block of tokens per KV head, written once by the kernel
that appends them and read directly by the cache attention kernel (`layer`, `ops`, `kernels`, `reference`);
`static`: the same at a fixed capacity with the length on the device, for compiled generation."""

from .layer import FP8Cache, FP8CacheLayer
from .static import FP8StaticCache, FP8StaticCacheLayer

__all__ = ["FP8Cache", "FP8CacheLayer", "FP8StaticCache", "FP8StaticCacheLayer"]
