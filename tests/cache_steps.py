"""One step of an FP8 static cache layer next to the dynamic layer that it must match, for the CPU (bit for
bit) and GPU (a tolerance) static-cache tests."""

from __future__ import annotations


def static_and_dynamic_step(dyn, st, q, k, v, cos, sin, *, scale):
    """Appends k/v (B, H, n, D) to both layers and attends with q (B, n, H_q, D) -> (static output, dynamic
    output). The dynamic layer's first chunk (an empty cache) is `append` then `attend`, as a prefill's first
    chunk runs; later chunks `append_attend`, as the static layer's every step."""
    if dyn.length == 0:
        dyn.append(k, v, cos, sin)
        want = dyn.attend(q, cos, sin, scale=scale)
    else:
        want = dyn.append_attend(q, k, v, cos, sin, scale=scale)
    return st.append_attend(q, k, v, cos, sin, scale=scale), want
