"""Per-tile arithmetic of the quantize kernel (`kernels.qkv_quantize_kernel`): non-finite-safe amax and
e4m3 cast, per-block amax, the Hadamard rotation by tl.dot, and the per-channel statistics of K/V
smoothing. Jitted helpers only: no launches, no pointers beyond what the kernel hands them."""

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
def _block_nonfinite(x1, x2, valid, BLOCK_S: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """Whether each SCALE_BLOCK rows of a tile (half tiles x1, x2; rows with `valid` False ignored) hold a
    NaN or +-inf. (BLOCK_S // SCALE_BLOCK,) bool."""
    bad = ((tl.abs(x1) < float("inf")) & (tl.abs(x2) < float("inf"))) == 0
    bad = tl.where(valid[:, None], bad.to(tl.int32), 0)
    return tl.max(tl.reshape(bad, (BLOCK_S // SCALE_BLOCK, SCALE_BLOCK * bad.shape[1])), 1) > 0


@triton.jit
def _block_amax(x1, x2, valid, BLOCK_S: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """max |x| over the finite elements of each SCALE_BLOCK rows of a tile given as half tiles x1, x2
    (BLOCK_S, HALF_BLOCK), rows with `valid` False counted as 0. (BLOCK_S // SCALE_BLOCK,)"""
    a = tl.where(valid[:, None], tl.maximum(_finite_abs(x1), _finite_abs(x2)), 0.0)
    return tl.max(tl.reshape(a, (BLOCK_S // SCALE_BLOCK, SCALE_BLOCK * a.shape[1])), 1)


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
def _dot_signs(x, signs, SPLIT: tl.constexpr):
    """x (BLOCK_S, N) float32 @ signs (N, N) with float32 accumulation. The products with +-1 are exact, so
    the only rounding is the accumulation's: x must be exact in signs.dtype (unrotated bf16/fp16 input),
    or SPLIT writes it as hi + lo in bf16 (16 of the 24 mantissa bits, relative error <= 2^-17, far below
    e4m3's 2^-4) at the cost of a second dot. Not tf32: its 10-bit inputs would flip ~0.4% of the fp8s."""
    hi = x.to(signs.dtype)
    acc = tl.dot(hi, signs, out_dtype=tl.float32)
    if SPLIT:
        lo = (x - hi.to(tl.float32)).to(signs.dtype)
        acc = tl.dot(lo, signs, acc, out_dtype=tl.float32)
    return acc


@triton.jit
def _hadamard(x1, x2, signs, on, INV_SQRT_D: tl.constexpr, SPLIT: tl.constexpr):
    """x @ (H_D / sqrt(D)) for the half tiles x = [x1, x2] when `on`. Sylvester: H_D = [[H, H], [H, -H]] with
    H = H_{D/2} (`signs`), so x @ H_D = [x1 @ H + x2 @ H, x1 @ H - x2 @ H]: two half-size dots."""
    p = _dot_signs(x1, signs, SPLIT)
    r = _dot_signs(x2, signs, SPLIT)
    y1 = (p + r) * INV_SQRT_D
    y2 = (p - r) * INV_SQRT_D
    return tl.where(on, y1, x1), tl.where(on, y2, x2)


@triton.jit
def _store_half_stats(x, valid, ptr, d_mask, HEAD_DIM: tl.constexpr):
    """Per-channel sum, min and max over the valid rows of a transformed half tile, to ptr, ptr + HEAD_DIM,
    ptr + 2 * HEAD_DIM (rows past seq_len were loaded as 0: they add nothing to the sum and are masked out
    of min and max). Non-finite elements count as 0 in the sum and are left out of min and max."""
    finite = tl.abs(x) < float("inf")
    tl.store(ptr, tl.sum(tl.where(finite, x, 0.0), axis=0), mask=d_mask)
    tl.store(ptr + HEAD_DIM, tl.min(tl.where(valid & finite, x, float("inf")), axis=0), mask=d_mask)
    tl.store(ptr + 2 * HEAD_DIM, tl.max(tl.where(valid & finite, x, float("-inf")), axis=0), mask=d_mask)


@triton.jit
def _reduce_half_stats(part_ptr, n_tiles, seq_len, offs_d, d_mask,
                       HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, RED_TILES: tl.constexpr):
    """Mean over the sequence and centred max |x - mean| of the channels part_ptr + offs_d of one head, from
    its n_tiles partials (stride 3 * HEAD_DIM), in tile order so the result does not depend on timing.
    Returns (mean (HALF_BLOCK,), centred amax scalar over the finite elements)."""
    total = tl.zeros((HALF_BLOCK,), tl.float32)
    lo = tl.full((HALF_BLOCK,), float("inf"), tl.float32)
    hi = tl.full((HALF_BLOCK,), float("-inf"), tl.float32)
    for i in range(0, n_tiles, RED_TILES):
        tiles = i + tl.arange(0, RED_TILES)
        mask = (tiles < n_tiles)[:, None] & d_mask[None, :]
        ptr = part_ptr + tiles[:, None] * (3 * HEAD_DIM) + offs_d[None, :]
        # .cg: read past L1, which may hold lines from before the acquire
        total += tl.sum(tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
        lo = tl.minimum(lo, tl.min(tl.load(ptr + HEAD_DIM, mask=mask, other=float("inf"), cache_modifier=".cg"), axis=0))
        hi = tl.maximum(hi, tl.max(tl.load(ptr + 2 * HEAD_DIM, mask=mask, other=float("-inf"), cache_modifier=".cg"), axis=0))
    mean = tl.math.div_rn(total, tl.maximum(seq_len, 1).to(tl.float32))  # an empty sequence: mean 0
    # rounding is monotonic, so max over x of fl(x - mean) is fl(max - mean): the amax of the centred tile
    # a channel with no finite element has lo = inf, hi = -inf: centred -inf, below the 0 of the padding
    centred = tl.maximum(hi - mean, mean - lo)
    return mean, tl.max(tl.where(d_mask, centred, 0.0))
