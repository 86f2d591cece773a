"""Per-tile arithmetic of the quantize kernel (`kernels.qkv_quantize_kernel`): non-finite-safe amax and
e4m3 cast, per-block amax, the Hadamard rotation by tl.dot, and the per-channel statistics of K/V
smoothing (merged with atomics in P1, turned into the mean and the centred amax once per head). Jitted
helpers only: no launches, no pointers beyond what the kernel hands them."""

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
def _ordered_key(x):
    """float32 -> uint32 ordered like the floats (sign bit flipped for x >= 0, all bits for x < 0), for
    atomic max of signed floats in one integer atomic. Key 0 sorts below every float, -inf included
    (key 0x007FFFFF), so a zero-filled workspace is the identity of the max."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def _from_ordered_key(key):
    """Inverse of `_ordered_key`; key 0 (nothing published) reads as -inf."""
    bits = tl.where((key >> 31) == 1, key & 0x7FFFFFFF, ~key)
    return tl.where(key == 0, float("-inf"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _publish_half_stats(x, keep, slot_ptr, col, offs_d, mask, HEAD_DIM: tl.constexpr):
    """Merges the per-channel statistics of a transformed half tile (channels col + offs_d) into a slot of
    4 * HEAD_DIM 32-bit words at slot_ptr: HEAD_DIM float64 sums (words [0, 2 D)), then the max and the max
    of -x as `_ordered_key`s (words [2 D, 3 D) and [3 D, 4 D)). Only elements with `keep` (valid rows,
    finite values) count: non-finite elements add nothing and set no bound. The tile's float32 sums are
    added in float64, so the order the tiles arrive in moves a total by ~2^-53 relative only.
    `mask`: the channels (and whether to publish at all)."""
    sums = slot_ptr.to(tl.pointer_type(tl.float64), bitcast=True) + col + offs_d
    keys = (slot_ptr + 2 * HEAD_DIM).to(tl.pointer_type(tl.uint32), bitcast=True) + col + offs_d
    total = tl.sum(tl.where(keep, x, 0.0), axis=0)
    tl.atomic_add(sums, total.to(tl.float64), mask=mask, sem="relaxed")
    tl.atomic_max(keys, _ordered_key(tl.max(tl.where(keep, x, float("-inf")), axis=0)), mask=mask, sem="relaxed")
    tl.atomic_max(keys + HEAD_DIM, _ordered_key(tl.max(tl.where(keep, -x, float("-inf")), axis=0)), mask=mask,
                  sem="relaxed")


@triton.jit
def _merge_half_stats(slots_ptr, col, seq_len, offs_d, d_mask, n_copies, MAX_COPIES: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """Mean over the sequence and centred max |x - mean| of the channels col + offs_d of one head, from the
    n_copies <= MAX_COPIES slots (4 * HEAD_DIM words apart) that `_publish_half_stats` filled, once all are
    complete (read
    past L1: the caller has acquired them). In a fixed order, so the result does not depend on timing.
    Returns (mean (HALF_BLOCK,) float32, centred amax over the finite elements, a scalar). As in the
    reference, the mean is the float64 total rounded to float32, divided by seq_len in float32."""
    copy = tl.arange(0, MAX_COPIES)[:, None] * (4 * HEAD_DIM)  # words
    mask = (tl.arange(0, MAX_COPIES) < n_copies)[:, None] & d_mask[None, :]
    chan = (col + offs_d)[None, :]
    sums = slots_ptr.to(tl.pointer_type(tl.float64), bitcast=True) + copy // 2 + chan
    keys = (slots_ptr + 2 * HEAD_DIM).to(tl.pointer_type(tl.uint32), bitcast=True) + copy + chan
    total = tl.sum(tl.load(sums, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
    hi = _from_ordered_key(tl.max(tl.load(keys, mask=mask, other=0, cache_modifier=".cg"), axis=0))
    neg_lo = _from_ordered_key(tl.max(tl.load(keys + HEAD_DIM, mask=mask, other=0, cache_modifier=".cg"), axis=0))
    mean = tl.math.div_rn(total.to(tl.float32), tl.maximum(seq_len, 1).to(tl.float32))  # empty: mean 0
    # Rounding is monotonic and symmetric, so max over x of |fl(x - mean)| is max(fl(hi - mean),
    # fl(mean - lo)): exactly the amax of the centred values given this mean. A channel with no finite
    # element has hi = -lo = -inf: centred -inf, below the 0 of the padding channels.
    centred = tl.maximum(hi - mean, neg_lo + mean)
    return mean, tl.max(tl.where(d_mask, centred, 0.0))
