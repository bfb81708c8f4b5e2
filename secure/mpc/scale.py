"""The fixed-point scale rules, written once for the share backend and its simulation.

A value carries a scale s (``frac_bits``: the value is ring / 2^s): the format's f for
reals, 0 for integers and 0/1 bits. The functions below decide, for every operation of
:class:`secure.approx.interface.SecureOps`, the scale its result is held at, when it is
truncated back to f and by how many bits, and how a public constant is encoded.
:class:`secure.mpc.backend.MpcOps` (on shares, with ``secure.mpc.arithmetic`` and
``secure.mpc.compare``) and :class:`secure.mpc.simulation.FixedPointOps` (on plain ring
values) both follow them, so the simulation predicts the protocol's output.

* Products hold ``fx + fy`` and are truncated to f only when that exceeds f: a product
  with a bit or an integer is exact. A sum of products shifts each product up to the
  largest product scale and truncates once.
* Public constants are ``round(c * 2^s)`` (``torch.round``: half to even) at the scale s
  they are used at, with no range check here (callers check with ``FixedPoint.encode``).
* ``add_public``: x keeps its scale, except that a value below f is lifted to f, unless
  it is an integer (scale 0) and c is integral (so ``1 - b`` of a bit is still a bit).
* ``mul_public``: an integral c is an exact ring product at x's scale; a real c is
  encoded at ``f + k`` (k extra bits for a small scalar, :func:`coefficient_extra_bits`),
  the product held at ``fx + f + k`` and truncated to f.
* ``dot_public``: every term at f, coefficients at ``f + k``, the sum and the bias at
  ``2f + k``, one truncation.
* Comparisons with public thresholds happen at x's scale (an integral x compared with a
  fractional threshold is lifted to f first); the thresholds are encoded at that scale.
* ``frexp``: the input at its scale s >= f (lifted to f when below), the highest set bit
  k of its ring value told apart on a window (:func:`frexp_window`), the inverse power
  2^-e as the ring value 2^(last - k) (so the mantissa is a product held at
  ``last + 1`` and truncated once), the exponent factor at f, clamped to
  ``+-fp.max_abs / 4``.

Pure functions of scales and public values: no shares, no rounds. Imports only the ring
(``secure.mpc.ring``) and the interface's ``Public`` type.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from secure.approx.interface import Public
from secure.mpc.ring import RING_DTYPE, FixedPoint, coefficient_extra_bits

FREXP_EXTRA_BITS: int = 25
"""Bits of ``frexp``'s domain above f: it covers 2^-f <= x < 2^(f + 25) (8.8e12 for f = 18),
so a LayerNorm's sum of squares (n times the variance) fits without a truncation first."""


def is_integral(c: Public) -> bool:
    """Every entry of c is a whole number (a product with it needs no truncation)."""
    if isinstance(c, torch.Tensor):
        return bool(torch.all(c == torch.round(c)))
    return float(c).is_integer()


def encode_public(c: Public, frac_bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``round(c * 2^frac_bits)`` as int64 (half to even), with no range check."""
    t = torch.as_tensor(c, dtype=torch.float64, device=device)
    return torch.round(t * (1 << frac_bits)).to(RING_DTYPE)


def product_scale(fx: int, fy: int) -> int:
    """The scale a ring product of values at fx and fy is held at before any truncation."""
    return fx + fy


def excess_bits(scale: int, f: int) -> int:
    """Bits a value at ``scale`` is truncated by to come back to f (0 at or below f)."""
    return scale - f if scale > f else 0


def sum_of_products_scale(scales: Sequence[int]) -> int:
    """The common scale of a sum of products: the largest product scale (the others are
    shifted up to it exactly), truncated once to f afterwards."""
    if not scales:
        raise ValueError("sum_of_products needs at least one pair")
    return max(scales)


def add_public_scale(fx: int, c: Public, f: int) -> int:
    """The scale ``x + c`` is computed at (x is lifted to it first)."""
    if fx < f and not (fx == 0 and is_integral(c)):
        return f
    return fx


def mul_public_scale(c: Public, f: int) -> tuple[int, bool]:
    """(s, exact) for ``x * c``: c is encoded at scale s. Exact (an integral c, s = 0): the
    ring product is the result, at x's scale, never truncated. Otherwise s = f + k and the
    product, held at ``fx + s``, is truncated to f."""
    if is_integral(c):
        return 0, True
    k = coefficient_extra_bits([c]) if not isinstance(c, torch.Tensor) else 0
    return f + k, False


def dot_public_scales(fp: FixedPoint, terms: int, coeffs: Sequence[float], bias: float) -> tuple[int, int]:
    """(coefficient scale f + k, sum scale 2f + k) of ``bias + sum_j coeffs[j] * terms[j]``,
    after checking the arguments (:meth:`FixedPoint.dot_public_extra_bits`). Every term is
    brought to f first (lifted, or truncated when above)."""
    k = fp.dot_public_extra_bits(terms, coeffs, bias)
    return fp.frac_bits + k, 2 * fp.frac_bits + k


def comparison_scale(fx: int, thresholds: Sequence[float], f: int) -> int:
    """The scale x is compared with public thresholds at: x's own, except that an integral
    x compared with a fractional threshold is lifted to f first."""
    if fx < f and not all(float(c).is_integer() for c in thresholds):
        return f
    return fx


def frexp_positions(f: int, extra_bits: int = FREXP_EXTRA_BITS) -> int:
    """Bit positions ``frexp`` looks at for an input at scale f (2f + extra): its domain is
    1 <= X < 2^positions in ring units."""
    positions = 2 * f + extra_bits
    if positions > FREXP_MAX_POSITIONS:
        raise ValueError(f"frexp needs 2 frac_bits + extra_bits <= {FREXP_MAX_POSITIONS} (the mantissa "
                         f"product is held at that scale), got frac_bits={f}, extra_bits={extra_bits}")
    return positions


FREXP_MAX_POSITIONS: int = 61
"""The highest scale the mantissa product X * 2^-e is held at: it stays below 2^61, within
the exact truncation's range (|x| < 2^62)."""


def frexp_window(f: int, s: int, extra_bits: int = FREXP_EXTRA_BITS,
                 bounds: tuple[float, float] | None = None) -> tuple[int, int]:
    """(first, last): the highest set bit k of X (x's ring value at scale s) that ``frexp``
    distinguishes, k in [first, last]; X outside [2^first, 2^(last + 1)) gives 0.

    Without ``bounds`` the window is the format's domain 2^-f <= x < 2^(f + extra) (capped
    so the mantissa product stays below 2^FREXP_MAX_POSITIONS); with ``bounds = (lo, hi)``,
    a range the caller guarantees, only the bits of [lo, hi] (fewer comparisons).
    """
    if s < f:
        raise ValueError(f"frexp's input scale {s} is below f = {f}; lift it first")
    frexp_positions(f, extra_bits)
    first = s - f
    last = min(s + f + extra_bits, FREXP_MAX_POSITIONS) - 1
    if bounds is not None:
        lo, hi = bounds
        if not 0.0 < lo <= hi:
            raise ValueError(f"frexp bounds need 0 < lo <= hi, got {bounds}")
        first = max(first, math.floor(math.log2(lo)) + s)
        last = min(last, math.floor(math.log2(hi)) + s)
        if first > last:
            raise ValueError(f"frexp bounds {bounds} lie outside the domain at scale {s}")
    return first, last


@functools.cache
def frexp_intervals(first: int, last: int, segments: int = 1
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The pieces ``frexp`` tells apart within its window [first, last]: thresholds
    ``T_0 < T_1 < ... < T_P`` (ring values) and, for each piece ``[T_i, T_(i+1))``, its
    octave k (the highest set bit of X) and its segment j in [0, segments): the octave's
    ``2^(k + j / segments)``, rounded up to an integer. A piece that rounding empties (small
    k) is dropped, the next one keeping its labels; ``T_P = 2^(last + 1)``."""
    if segments < 1:
        raise ValueError(f"frexp: segments must be >= 1, got {segments}")
    thresholds: list[int] = []
    octave: list[int] = []
    segment: list[int] = []
    for k in range(first, last + 1):
        for j in range(segments):
            t = 1 << k if j == 0 else math.ceil(2.0 ** (k + j / segments))
            if thresholds and t <= thresholds[-1]:  # the previous piece is empty
                octave[-1], segment[-1] = k, j
                continue
            thresholds.append(t)
            octave.append(k)
            segment.append(j)
    thresholds.append(1 << (last + 1))
    return tuple(thresholds), tuple(octave), tuple(segment)


def frexp_inverse_powers(first: int, last: int, device: torch.device | str | None = None) -> torch.Tensor:
    """For each highest set bit k of X in [first, last]: the ring value 2^(last - k), i.e.
    2^-e at the scale that puts the mantissa X * 2^-e at scale ``last + 1`` (truncated once
    to f afterwards)."""
    return torch.tensor([1 << (last - k) for k in range(first, last + 1)], dtype=RING_DTYPE, device=device)


@dataclass(frozen=True)
class FrexpPieces:
    """What ``frexp_segments`` tells apart and what it returns for each piece: the
    thresholds ``T_0 < ... < T_P`` (ring values) and, per table, its ring value for each
    piece and the scale it is held at. Tables in order: ``2^-e`` (the ring value
    2^(last - k) at scale ``last + 1 - s``, so that X times it is m at scale last + 1),
    ``exponent_fn(e)`` (at f; times ``times_table(j)`` when given), each of ``tables`` (at
    f), each of ``factor_tables`` (``exponent_fn(e) * table(j)`` at f), each of
    ``mantissa_tables`` (X times it is ``m * table(j)``: :func:`frexp_mantissa_products`)."""

    thresholds: tuple[int, ...]
    values: list[torch.Tensor]
    frac_bits: list[int]


def frexp_pieces(fp: FixedPoint, exponent_fn: Callable[[int], float], s: int, first: int, last: int,
                 segments: int, tables: Sequence[Callable[[int], float]],
                 mantissa_tables: Sequence[Callable[[int], float]],
                 device: torch.device | str | None = None,
                 factor_tables: Sequence[Callable[[int], float]] = (),
                 times_table: Callable[[int], float] | None = None) -> FrexpPieces:
    """The pieces of ``frexp_segments`` on the window [first, last] at input scale s (see
    :class:`FrexpPieces`): one description for the protocol and its simulation."""
    f = fp.frac_bits
    thresholds, octave, segment = frexp_intervals(first, last, segments)
    piece_octave = torch.tensor(octave, device=device) - first
    values = [frexp_inverse_powers(first, last, device)[piece_octave],
              frexp_piece_factors(fp, exponent_fn, s, octave, segment, times_table, device)]
    frac_bits = [last + 1 - s, f]
    for table in tables:
        values.append(fp.encode(torch.tensor([float(table(j)) for j in segment], dtype=torch.float64), device))
        frac_bits.append(f)
    for table in factor_tables:
        values.append(frexp_piece_factors(fp, exponent_fn, s, octave, segment, table, device))
        frac_bits.append(f)
    for table in mantissa_tables:
        ring, frac = frexp_mantissa_products([float(table(j)) for j in segment], octave, first, last, s, f, device)
        values.append(ring)
        frac_bits.append(frac)
    return FrexpPieces(thresholds, values, frac_bits)


def frexp_mantissa_products(values: Sequence[float], octave: Sequence[int], first: int, last: int, s: int,
                            f: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """For each piece i (octave ``octave[i]``, value ``c_i``): the ring value of
    ``c_i 2^(last - k_i)`` with p extra bits of precision, and its scale, so that X times it
    is ``c_i m`` at scale ``last + 1 + p`` (truncated to f afterwards). p is f where the
    product stays below 2^FREXP_MAX_POSITIONS, i.e. for a narrow window (``bounds``);
    raises ValueError where fewer than f/2 bits would be left."""
    top = max((abs(float(c)) for c in values), default=1.0)
    room = FREXP_MAX_POSITIONS - 1 - (last + 1) - max(0, math.ceil(math.log2(top)) if top > 0 else 0)
    p = min(f, room)
    if p < f // 2:
        raise ValueError(f"frexp: products of the mantissa with a table need a narrow window (bounds); "
                         f"only {p} bits of precision are left at window end 2^{last + 1}")
    ring = [round(float(c) * 2.0 ** (last - k + p)) for c, k in zip(values, octave)]
    return torch.tensor(ring, dtype=RING_DTYPE, device=device), last + 1 - s + p


def frexp_piece_factors(fp: FixedPoint, exponent_fn: Callable[[int], float], s: int, octave: Sequence[int],
                        segment: Sequence[int], table: Callable[[int], float] | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """For each piece (highest set bit ``octave[i]`` of X at scale s, so e = k + 1 - s;
    segment ``segment[i]``): ``exponent_fn(e)``, times ``table(j)`` when given, each
    clamped to ``+-fp.max_abs / 4`` and encoded at f."""
    limit = fp.max_abs / 4

    def clamp(v: float) -> float:
        return min(max(v, -limit), limit)

    values = [clamp(clamp(exponent_fn(k + 1 - s)) * (1.0 if table is None else float(table(j))))
              for k, j in zip(octave, segment)]
    return fp.encode(torch.tensor(values, dtype=torch.float64), device)
