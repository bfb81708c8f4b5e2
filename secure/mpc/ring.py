"""The ring Z_2^64 held in ``torch.int64`` and fixed-point encoding into it.

Ring arithmetic is torch's int64 arithmetic: addition, subtraction and multiplication
wrap around modulo 2^64 (two's complement), which is exactly the ring. A ring element
``a`` is read as the signed integer in [-2^63, 2^63).

Fixed point: a real x is encoded as round(x * 2^f) with f fraction bits (default 18,
SPU's FM64 default used by PUMA). Resolution is 2^-f (3.8e-6 for f = 18).

Overflow. Encoding refuses |x| >= 2^(62 - f) (2^44 = 1.8e13 for f = 18) with
:class:`FixedPointOverflowError`, which keeps one bit of headroom for additions. The range
that matters in practice is smaller: a product of two encoded values is held at scale
2f before truncation, so |x * y| must stay below 2^(63 - 2f) = 2^27 (1.3e8 for f = 18),
and the optional one-round probabilistic truncation fails (returns a value off by about
2^(64 - f)) with probability |x * y| * 2^(2f) / 2^64 per element; the default exact
truncation has no such failure (see ``secure.mpc.arithmetic``). Silent wrap-around beyond these bounds is the ring's
nature; :func:`decode` cannot detect it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

RING_BITS = 64
RING_DTYPE = torch.int64
DEFAULT_FRAC_BITS = 18


class FixedPointOverflowError(OverflowError):
    """A real value is too large in magnitude for the configured fixed-point format."""


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point format: ``frac_bits`` fraction bits in Z_2^64."""

    frac_bits: int = DEFAULT_FRAC_BITS
    truncation: str = "exact"
    """"exact": two rounds, 1-ulp error, no failure mode for |x| < 2^62 ring units (the
    default); "probabilistic": one round, but an element fails (is off by 2^(64-d)) with
    probability |x| / 2^64 -- about |v| / 2^28 for a product v at f = 18, which over the
    millions of truncations of one MiniLM query at 128 tokens is a few percent."""

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits must be in [0, 30], got {self.frac_bits}")
        if self.truncation not in ("exact", "probabilistic"):
            raise ValueError(f"truncation must be 'exact' or 'probabilistic', got {self.truncation!r}")

    @property
    def scale(self) -> int:
        """2^f."""
        return 1 << self.frac_bits

    @property
    def max_abs(self) -> float:
        """Largest magnitude :meth:`encode` accepts: 2^(62 - f)."""
        return float(2 ** (62 - self.frac_bits))

    def encode(self, x: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
        """round(x * 2^f) as int64. Raises on non-finite or out-of-range values."""
        t = torch.as_tensor(x, dtype=torch.float64, device=device)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("cannot encode NaN or infinity as fixed point")
        if t.numel() and float(t.abs().max()) >= self.max_abs:
            raise FixedPointOverflowError(
                f"value {float(t.abs().max()):.6g} is out of the fixed-point range "
                f"|x| < 2^{62 - self.frac_bits} = {self.max_abs:.6g} (frac_bits={self.frac_bits})"
            )
        return torch.round(t * self.scale).to(RING_DTYPE)

    def dot_public_extra_bits(self, terms: int, coeffs: Sequence[float], bias: float) -> int:
        """Check the arguments of ``dot_public`` (bias + sum_k c_k t_k) and return the extra
        coefficient bits k: the sum is accumulated at scale 2f + k."""
        if terms != len(coeffs):
            raise ValueError(f"dot_public: {terms} terms but {len(coeffs)} coefficients")
        if not terms:
            raise ValueError("dot_public needs at least one term")
        self.encode(torch.tensor([*coeffs, bias], dtype=torch.float64))
        k = coefficient_extra_bits(coeffs)
        if abs(bias) >= 2.0 ** (62 - 2 * self.frac_bits - k):
            raise FixedPointOverflowError(f"dot_public: bias {bias:g} is out of range at scale "
                                          f"2^{2 * self.frac_bits + k}")
        return k

    def decode(self, a: torch.Tensor, frac_bits: int | None = None) -> torch.Tensor:
        """Signed reading of the ring element divided by 2^f, as float64."""
        check_ring(a, "decode")
        bits = self.frac_bits if frac_bits is None else frac_bits
        return a.to(torch.float64) / float(1 << bits)


def check_ring(a: torch.Tensor, what: str) -> None:
    """Raise a TypeError naming ``what`` unless ``a`` is an int64 tensor (a ring element)."""
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{what}: expected an int64 torch.Tensor, got {type(a).__name__}")
    if a.dtype != RING_DTYPE:
        raise TypeError(f"{what}: expected dtype torch.int64 (ring Z_2^64), got {a.dtype}")


def logical_right_shift(a: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned (logical) a >> bits on int64 storage."""
    if bits == 0:
        return a
    mask = (1 << (RING_BITS - bits)) - 1
    return (a >> bits) & mask


MAX_EXTRA_COEFF_BITS = 20


def coefficient_extra_bits(coeffs: Sequence[float]) -> int:
    """Extra fraction bits for small public coefficients: k with 2^k max|c| in [0.5, 1).

    A coefficient c encoded with f + k bits keeps about f significant bits (1/384 at
    f = 18 would otherwise be 683/2^18, 5e-4 off), while the product x*c at scale 2f + k
    is no larger in ring units than a product with a coefficient near 1, so truncation's
    failure probability does not grow.
    """
    largest = max((abs(float(c)) for c in coeffs), default=0.0)
    if largest == 0.0 or largest >= 0.5:
        return 0
    return min(MAX_EXTRA_COEFF_BITS, int(-math.floor(math.log2(largest))) - 1)
