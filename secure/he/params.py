"""CKKS parameter sets at 128-bit security.

SEAL (and the HomomorphicEncryption.org standard it follows) caps the total coefficient
modulus for 128-bit classical security at 109 / 218 / 438 / 881 bits for ring degrees
4096 / 8192 / 16384 / 32768. A chain is ``[first] + [scale] * levels + [special]``: the
first prime holds the integer part of the last level's values (``first - scale`` bits of
headroom), each middle prime is consumed by one rescale (one multiplicative level), the
special prime serves key switching (relinearisation, rotations).

Two measured facts shape the sets below (N = 8192, scale 2^30):

* key-switching noise grows with the largest prime over the special prime: with
  ``[49, 30 x 4, 49]`` one rotation adds 2.6e-4 to 6.4e-4 absolute error, so the
  special prime is made the largest (58 bits over a 40-bit first prime);
* a 40-bit first prime leaves only 2^9 of headroom at level 0, too little for
  Power-Softmax's x^4 or a refresh mask, so products stop at ``floor_level = 1``
  (headroom 2^39) and the refresh happens there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MAX_COEFF_BITS_128: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


class HeParameterError(ValueError):
    """Parameters that SEAL would reject or that are below 128-bit security."""


@dataclass(frozen=True)
class CkksParams:
    """One CKKS parameter set; ``levels`` multiplications fit between two refreshes."""

    poly_degree: int
    scale_bits: int
    first_bits: int
    levels: int
    special_bits: int
    floor_level: int = 1

    def __post_init__(self) -> None:
        if self.poly_degree not in MAX_COEFF_BITS_128:
            raise HeParameterError(f"ring degree {self.poly_degree} not in {sorted(MAX_COEFF_BITS_128)}")
        if self.total_bits > MAX_COEFF_BITS_128[self.poly_degree]:
            raise HeParameterError(
                f"coefficient modulus of {self.total_bits} bits exceeds the 128-bit-security limit "
                f"{MAX_COEFF_BITS_128[self.poly_degree]} for N={self.poly_degree}")
        if self.first_bits <= self.scale_bits or self.levels <= self.floor_level:
            raise HeParameterError("need first_bits > scale_bits and levels above the floor level")

    @property
    def usable_levels(self) -> int:
        """Products between two refreshes."""
        return self.levels - self.floor_level

    @property
    def slots(self) -> int:
        return self.poly_degree // 2

    @property
    def coeff_bits(self) -> list[int]:
        return [self.first_bits] + [self.scale_bits] * self.levels + [self.special_bits]

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_bits)

    @property
    def headroom_bits(self) -> int:
        """|value| must stay below 2^headroom at the floor level."""
        return self.first_bits + self.scale_bits * self.floor_level - self.scale_bits - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> CkksParams:
        return CkksParams(**{k: int(d[k]) for k in ("poly_degree", "scale_bits", "first_bits", "levels",
                                                    "special_bits", "floor_level")})


PARAM_SETS: tuple[CkksParams, ...] = (
    CkksParams(8192, 30, 40, 4, 58),      # 218 bits: 3 usable levels, 4096 slots
    CkksParams(16384, 30, 40, 11, 60),    # 430 bits: 10 usable levels, 8192 slots
    CkksParams(32768, 30, 40, 26, 60),    # 880 bits: 25 usable levels, 16384 slots
)
"""From the cheapest up; the planner picks the first that fits."""


def galois_element(step: int, poly_degree: int) -> int:
    """SEAL's Galois element for a left rotation of the slot vector by ``step``
    (negative: right): ``3^step mod 2N`` with ``step`` taken modulo N/2."""
    slots = poly_degree // 2
    if step == 0 or abs(step) >= slots:
        raise HeParameterError(f"rotation step {step} out of range for {slots} slots")
    k = step % slots
    return pow(3, k, 2 * poly_degree)
