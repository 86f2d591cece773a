"""FP8 format constants shared by the quantize kernels, their torch references and the backends."""

import torch

FP8_DTYPE = torch.float8_e4m3fn
# Largest finite e4m3fn value. Every kernel takes it as an argument instead of hard-coding it.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Head dims the FA3 fp8 kernel is built for; the reference backend accepts the same set so CPU runs
# reject exactly what the GPU would.
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
SUPPORTED_INPUT_DTYPES = (torch.bfloat16, torch.float16)
# qk_scales="block": tokens per Q/K scale (one scale per SCALE_BLOCK tokens of one head); divides every
# quantize tile height (16..128), so each tile computes its own blocks' scales.
SCALE_BLOCK = 16
# qk_format="int8": Q/K values are round(x * INT8_MAX / block amax), symmetric in [-127, 127].
INT8_MAX = 127.0
# FP8 KV cache (`kv_cache`): tokens per K/V scale, one scale per KV_BLOCK tokens of one KV head, computed by
# the kernel that writes the block (a block that grows across appends is re-quantized whole). The cache
# attention kernel's key tile is one block, so V's block descale multiplies that tile's P.V product.
KV_BLOCK = 64
