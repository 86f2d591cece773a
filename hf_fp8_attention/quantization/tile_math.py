"""Per-tile arithmetic of the quantize kernel (`kernels.qkv_quantize_kernel`): non-finite-safe amax and
e4m3 / int8 casts, per-block amax, the Hadamard rotation (a fast Walsh-Hadamard transform) and the
power-of-two norm bound that stands for a rotated group's amax. Jitted helpers only: no launches, no
pointers."""

import os

import triton
import triton.language as tl


@triton.jit
def _finite_abs(x):
    """|x| where x is finite, 0 where it is NaN or +-inf (NaN < inf is False): non-finite elements never set
    a scale, so they damage only the scores / output columns they are in, not their whole head."""
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def _to_fp8(x, FP8_MAX: tl.constexpr):
    """RNE e4m3 of x clamped to +-FP8_MAX; NaN and +-inf become NaN (e4m3fn has no inf)."""
    y = tl.clamp(x, -FP8_MAX, FP8_MAX)
    return tl.where(tl.abs(x) < float("inf"), y, float("nan")).to(tl.float8e4nv)


@triton.jit
def _to_int8(x, INT8_MAX: tl.constexpr):
    """floor(x + 0.5) clamped to +-INT8_MAX as int8; non-finite elements give 0 (the caller marks their block)."""
    y = tl.clamp(tl.floor(x + 0.5), -INT8_MAX, INT8_MAX)
    return tl.where(tl.abs(x) < float("inf"), y, 0.0).to(tl.int8)


@triton.jit
def _block_nonfinite(x1, x2, BLOCK_S: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """Whether each SCALE_BLOCK rows of a tile (half tiles x1, x2; rows past the sequence must be 0) hold a
    NaN or +-inf: x * 0 is NaN exactly there, so the block's sum of them is NaN (two operations per element;
    the compare/select/max form took six). (BLOCK_S // SCALE_BLOCK,) bool."""
    z = tl.sum(x1 * 0.0, 1) + tl.sum(x2 * 0.0, 1)
    z = tl.sum(tl.reshape(z, (BLOCK_S // SCALE_BLOCK, SCALE_BLOCK)), 1)
    return z != z


@triton.jit
def _block_amax(x1, x2, valid, BLOCK_S: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """max |x| over the finite elements of each SCALE_BLOCK rows of a tile given as half tiles x1, x2
    (BLOCK_S, HALF_BLOCK), rows with `valid` False counted as 0. (BLOCK_S // SCALE_BLOCK,)"""
    # rows first (within a thread's registers and warp shuffles), then the (BLOCK_S,) row maxima by block: the
    # same maxima as reshaping the whole tile, without moving the tile through shared memory
    a = tl.where(valid, tl.max(tl.maximum(_finite_abs(x1), _finite_abs(x2)), 1), 0.0)
    return tl.max(tl.reshape(a, (BLOCK_S // SCALE_BLOCK, SCALE_BLOCK)), 1)


@triton.jit
def _amax_scales(amax, MAX: tl.constexpr):
    """(scale, descale) of amaxes (any shape; a group's, a block's, a row's): MAX / amax and amax / MAX,
    correctly rounded, or 1 and 1 where the amax is 0 (all-zero or all non-finite values)."""
    positive = amax > 0.0
    return (tl.where(positive, tl.math.div_rn(MAX, amax), 1.0),
            tl.where(positive, tl.math.div_rn(amax, MAX), 1.0))


@triton.jit
def _sign_matrix(N: tl.constexpr, dtype: tl.constexpr):
    """(N, N) Sylvester Hadamard signs, H[i, j] = (-1)^popcount(i & j), entries +-1 (exact in any dtype);
    N <= 256."""
    bits = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    # via float32: the interpreter's int -> bf16 cast is wrong (triton 3.9)
    return (1.0 - 2.0 * (bits & 1).to(tl.float32)).to(dtype)


@triton.jit
def _dot_signs(x, signs):
    """x (BLOCK_S, N) float32 @ signs (N, N) with float32 accumulation, x rounded to signs.dtype (the input
    dtype) first: the products with +-1 are exact, so the accumulation is the only other rounding (none when
    the row's values span fewer than ~16 binades: then any summation order gives the same bits). The rounding
    to 16 bits (2^-9 relative for bf16) is far below e4m3's 2^-4. Not tf32: its 10-bit inputs would flip
    fp8s the reference cannot follow. `_hadamard`'s HADAMARD_BY_DOT form."""
    return tl.dot(x.to(signs.dtype), signs, out_dtype=tl.float32)


@triton.jit
def _butterfly(x, S: tl.constexpr):
    """One stage of the fast Walsh-Hadamard transform on the last axis of x (R, N): every pair of columns
    (i, i + S) within a block of 2S columns -> (x_i + x_(i+S), x_i - x_(i+S)). Written as reshape / permute /
    split / join, which the compiler turns into register moves, warp shuffles for pairs held by different threads
    and a few shared-memory layout conversions (offline sm_90 compile, triton 3.6: the split path's codes passes
    have 6-8 shared-memory stores with it, 24-40 with tl.dot's rotation and 0-2 without a rotation)."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    if S == 1:
        a, b = tl.split(tl.reshape(x, (R, N // 2, 2)))
        y = tl.reshape(tl.join(a + b, a - b), (R, N))
    else:
        a, b = tl.split(tl.permute(tl.reshape(x, (R, N // (2 * S), 2, S)), (0, 1, 3, 2)))
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, N))
    return y


@triton.jit
def _fwht(x):
    """x (R, N) float32 @ H_N (Sylvester signs, not normalised), N a power of two <= 256: log2(N) butterfly
    stages, N log2(N) additions per row instead of tl.dot's N^2 multiply-adds."""
    N: tl.constexpr = x.shape[1]
    tl.static_assert(N <= 256 and (N & (N - 1)) == 0, "the fast Walsh-Hadamard transform wants N = 2^k <= 256")
    for i in tl.static_range(8):  # stride 2^i while it is below N (unrolled at compile time)
        if (1 << i) < N:
            x = _butterfly(x, 1 << i)
    return x


# `_hadamard` by tl.dot against the sign matrix (the form before session 24) instead of the fast transform:
# HF_FP8_ATTENTION_HADAMARD=dot, read at import (benchmarks time both, in separate processes).
HADAMARD_BY_DOT = tl.constexpr(os.environ.get("HF_FP8_ATTENTION_HADAMARD", "fwht") == "dot")


@triton.jit
def _hadamard(x1, x2, dtype: tl.constexpr, INV_SQRT_D: tl.constexpr, BY_DOT: tl.constexpr = False):
    """x @ (H_D / sqrt(D)) for the float32 half tiles x = [x1, x2] (R, D/2), the rows rounded to ``dtype`` (the
    input dtype; float32: no rounding) first. Sylvester: H_D = [[H, H], [H, -H]] with H = H_{D/2}, so x @ H_D =
    [x1 @ H + x2 @ H, x1 @ H - x2 @ H]. Each x_i @ H by the fast Walsh-Hadamard transform (`_fwht`): the
    products with +-1 are exact and, for rows whose values span fewer than ~16 binades, so is every float32
    partial sum, so the result is the reference's (`reference._rotate`: x rounded, then a float32 matmul) bit
    for bit; otherwise they differ in summation order only. BY_DOT (a call site's choice) or HADAMARD_BY_DOT
    (every call site): two half-size tl.dot against the sign matrix instead."""
    if BY_DOT or HADAMARD_BY_DOT:
        signs = _sign_matrix(x1.shape[1], dtype)
        p = _dot_signs(x1, signs)
        r = _dot_signs(x2, signs)
    else:
        p = _fwht(x1.to(dtype).to(tl.float32))
        r = _fwht(x2.to(dtype).to(tl.float32))
    return (p + r) * INV_SQRT_D, (p - r) * INV_SQRT_D


@triton.jit
def _pow2_norm_bound(x1, x2, INV_SQRT_D: tl.constexpr):
    """A power of two >= every |(x H)_i| of every row of the tile (half tiles x1, x2; non-finite elements count
    as 0) for the normalised Hadamard H: the group amax of a rotated tensor without the rotation. Per row
    min(||x||_2, ||x||_1 / sqrt(D)) (both bound |x . h_i| for a column h_i of entries +-1/sqrt(D); the second
    is exact for a one-channel spike, where the first is sqrt(D) too large), the max over rows, then the
    power-of-two ceiling from its bits, as `reference._pow2_norm_bound`; 0 for an all-zero tile."""
    f1 = tl.where(tl.abs(x1) < float("inf"), x1, 0.0)
    f2 = tl.where(tl.abs(x2) < float("inf"), x2, 0.0)
    l2 = tl.sqrt_rn(tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1))
    l1 = (tl.sum(tl.abs(f1), axis=1) + tl.sum(tl.abs(f2), axis=1)) * INV_SQRT_D
    m = tl.max(tl.minimum(l2, l1))
    bound = (m.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000  # 2^ceil(log2 m) for normal m
    return tl.where(m > 0.0, bound.to(tl.float32, bitcast=True), 0.0)
