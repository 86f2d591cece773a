"""FP8 KV cache: K/V stored in e4m3 with a scale per block of tokens per KV head, written once by the kernel
that appends them and read directly by the cache attention kernel (`layer`, `ops`, `kernels`, `reference`)."""

from .layer import FP8Cache, FP8CacheLayer

__all__ = ["FP8Cache", "FP8CacheLayer"]
