"""FP8 format constants shared by the quantize kernels, their torch references and the backends."""

import torch

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite e4m3fn value. Every kernel takes it as an argument instead of hard-coding it.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Head dims the FA3 fp8 kernel is built for; the reference backend accepts the same set so CPU runs
# reject exactly what the GPU would.
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
SUPPORTED_INPUT_DTYPES = (torch.bfloat16, torch.float16)
# qk_scales="block" and qk_format="int8": tokens per Q scale (one scale per SCALE_BLOCK tokens of one head),
# and per K scale with e4m3 block scales; divides every quantize tile height (16..128), so each tile computes
# its own blocks' scales.
SCALE_BLOCK = 16
# qk_format="int8": tokens per K scale, a multiple of the triton kernel's key tiles (64, 128) so that a key
# tile has one K descale, folded into the row scales instead of multiplying every score (sm_90, 64x128 tile,
# 4 warps: 695 -> 626 instructions per key block; e4m3 with per-head scales: 548). Real activations
# (SmolLM2-135M, 30 layers x 2 windows of 1024 tokens, CPU reference, int8 + smooth_k): 29.99 dB mean SQNR
# with 16-token K blocks, 29.65 dB with 128. Not for e4m3 block scales: there 128-token K blocks lost their
# gain on K outliers (k_outlier_100x, S=1024, H 4/4, D=128: 14.29 dB with 16, 12.54 with 128, 12.43 per head).
# A multiple of every quantize tile height: the quantize kernel merges a block's amax over its tiles.
INT8_K_SCALE_BLOCK = 128


def k_scale_block(int8: bool) -> int:
    """Tokens per K scale under block scales: `INT8_K_SCALE_BLOCK` for int8 Q/K, else `SCALE_BLOCK`."""
    return INT8_K_SCALE_BLOCK if int8 else SCALE_BLOCK
# qk_format="int8": Q/K values are round(x * INT8_MAX / block amax), symmetric in [-127, 127].
INT8_MAX = 127.0
# v_scales="block": tokens per V scale, one scale per V_SCALE_BLOCK tokens of one KV head. A multiple of the
# triton kernel's key tiles (16..128), so that a key tile has one V descale, which multiplies its float32 P.V
# product; and the height of the single-pass quantize kernel's tile (`quantization.block_kernel`), so that
# the tile that writes a block has all of it.
V_SCALE_BLOCK = 128
# FP8 KV cache (`kv_cache`): tokens per K/V scale, one scale per KV_BLOCK tokens of one KV head, computed by
# the kernel that writes the block (a block that grows across appends is re-quantized whole). The cache
# attention kernel's key tile is one block, so V's block descale multiplies that tile's P.V product.
KV_BLOCK = 64
