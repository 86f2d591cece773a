"""Host-side integer helpers for the launchers. `triton.cdiv` / `triton.next_power_of_2` are
constexpr_functions (~2 us per host call in triton 3.6-3.9, against ~0.03 us for plain ints), and the
launchers call them several times per attention call."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
