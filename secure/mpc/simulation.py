"""Fixed-point simulation of the three-party backend: :class:`FixedPointOps`.

:class:`FixedPointOps` implements :class:`secure.approx.interface.SecureOps` on plain
(unshared) ring values in one process, with the arithmetic of
:class:`secure.mpc.backend.MpcOps`: both follow the scale rules of ``secure.mpc.scale``
(the scale each result is held at, when it is truncated, how public constants are
encoded), so a form run here shows the error fixed point adds to it, with no shares and no
rounds, in a fraction of the time of the in-process three-party engine.

Values are :class:`Fixed`: a ring tensor (``torch.int64``, Z_2^64 with wrap-around) and its
scale ``frac_bits``. What is particular to the simulation:

* Truncation by ``d`` bits. ``"floor"``: arithmetic right shift, ``floor(x / 2^d)``.
  ``"probabilistic"``: ``floor(x / 2^d) + b`` with ``b`` a 0/1 draw with
  ``P(b = 1) = (x mod 2^d) / 2^d``, i.e. stochastic rounding (exact when ``2^d`` divides
  ``x``). That is the distribution of the one-round protocol
  (``secure.mpc.arithmetic.truncate_many``: ``floor(x_0 / 2^d) + ceil(u / 2^d)`` with a
  uniform ``x_0``), checked empirically on the three-party engine, and it is close to the
  default exact truncation, whose result is within 1 ulp of the floor. The draws come from
  the parties' AES-CTR stream (``secure.mpc.randomness.PrfStream``) keyed by ``seed``, so a
  seeded simulation is reproducible; no torch or numpy generator is used.
* Comparisons are exact on ring values: ``less_than(x, y)`` = ``1{x < y}`` after aligning
  scales, ``less_than_public(x, [c])`` = ``1{x_ring < round(c * 2^s)}`` at the comparison
  scale s (x's own; f for an integral x and a fractional c), both as scale-0 bits. ``max``
  is the exact maximum of the ring values (the MPC tree selects exactly).
* ``frexp`` (``secure.mpc.compare.frexp``): the input keeps its scale s (lifted to f
  when below). With ``k`` the highest set bit of the ring value ``X`` on the window
  ``[first, last]`` of ``scale.frexp_window``, ``e = k + 1 - s`` and
  ``m = trunc(X * 2^(last - k))`` from scale ``last + 1`` to f; the factor is
  ``exponent_fn(e)`` clamped to ``+-fp.max_abs / 4`` and encoded at scale ``f``. Default
  domain at s = f: ``1 <= X < 2^61`` (``2^-f <= x < 2^(61-f)``); outside the window the
  protocol's one-hot has no bit in range and both results are exactly 0, which is
  reproduced here.
* ``check_range`` compares the ring values with both thresholds exactly as ``MpcOps``
  counts them, and raises :class:`~secure.approx.interface.RangeError` with the count and
  the observed min/max (under MPC only the count is opened).
* Range checks as ``MpcOps``: ``add_public`` and ``mul_public`` check c with
  :meth:`FixedPoint.encode` (:class:`FixedPointOverflowError`), ``dot_public`` its
  coefficients and its bias (:meth:`FixedPoint.dot_public_extra_bits`).

Which mode to use: ``"probabilistic"`` reproduces the MPC error statistics (unbiased
rounding). ``"floor"`` is deterministic but biased by -1/2 ulp per truncation, which forms
that square a value many times amplify: on ``puma_softmax`` (t = 6, order 3) floor mode
shows about 2x the MPC error vs the exact softmax (2.8e-4 vs 1.0e-4 on (12, 128, 128)).

Not modelled: the wrap-around failures of probabilistic truncation and of comparisons with
``|x - y| >= 2^63`` ring units; silent ring overflow is modelled (int64 wraps like Z_2^64).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from secure.approx.interface import Public, RangeError, check_magnitude, check_range_arguments
from secure.mpc import scale
from secure.mpc.matmul import ring_matmul
from secure.mpc.randomness import KEY_BYTES, PrfStream, random_key
from secure.mpc.ring import RING_DTYPE, FixedPoint, FixedPointOverflowError, check_ring
from secure.mpc.scale import FREXP_EXTRA_BITS

TRUNCATION_MODES: tuple[str, ...] = ("floor", "probabilistic")
"""Accepted values of ``FixedPointOps(truncation=...)``."""


@dataclass(frozen=True)
class Fixed:
    """A plain fixed-point value: ring tensor ``ring`` (int64, Z_2^64) at scale 2^frac_bits.

    The real value is ``ring / 2^frac_bits`` (signed reading). ``frac_bits`` is ``f`` for
    reals and 0 for integers and 0/1 bits, exactly like an ``AShare``'s.
    """

    ring: torch.Tensor
    frac_bits: int

    def __post_init__(self) -> None:
        check_ring(self.ring, "Fixed")
        if self.frac_bits < 0:
            raise ValueError(f"Fixed: frac_bits must be >= 0, got {self.frac_bits}")

    @property
    def shape(self) -> torch.Size:
        return self.ring.shape

    @property
    def device(self) -> torch.device:
        return self.ring.device


class FixedPointOps:
    """SecureOps over plain fixed-point ring values with MpcOps' arithmetic.

    ``fixed_point`` is the format (default f = 18, as the three-party engine);
    ``truncation`` is ``"floor"`` (deterministic arithmetic right shift) or
    ``"probabilistic"`` (stochastic rounding, the distribution of the real protocol's
    truncation); ``seed`` seeds the generator of the probabilistic draws (None: a fresh
    non-deterministic seed). See the module docstring for the semantics of every method.
    """

    def __init__(
        self,
        fixed_point: FixedPoint = FixedPoint(),  # noqa: B008 (frozen, immutable default)
        truncation: str = "floor",
        seed: int | None = None,
    ) -> None:
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
        self.fp = fixed_point
        self.truncation = truncation
        self.seed = seed if seed is not None else int.from_bytes(random_key(), "little")
        # the same AES-CTR generator the parties use, keyed by the seed: reproducible draws
        self._stream = PrfStream((self.seed % (1 << 128)).to_bytes(KEY_BYTES, "little"))

    @property
    def frac_bits(self) -> int:
        """The format's f."""
        return self.fp.frac_bits

    # ---- helpers --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor | float, frac_bits: int | None = None) -> Fixed:
        """``round(x * 2^s)`` as a :class:`Fixed` at scale ``s`` (default f; 0 for integers).

        Raises ``ValueError`` for NaN/inf and :class:`FixedPointOverflowError` for
        ``|x| >= 2^(62 - s)`` (:meth:`FixedPoint.encode`).
        """
        s = self.frac_bits if frac_bits is None else frac_bits
        fp = self.fp if s == self.frac_bits else FixedPoint(s)
        device = x.device if isinstance(x, torch.Tensor) else None
        return Fixed(fp.encode(x, device), s)

    def decode(self, v: Fixed) -> torch.Tensor:
        """The real value ``ring / 2^frac_bits`` as float64."""
        return self.fp.decode(v.ring, v.frac_bits)

    @staticmethod
    def _const(c: Public, frac_bits: int, device: torch.device) -> torch.Tensor:
        """round(c * 2^frac_bits) as int64, with no range check (``scale.encode_public``)."""
        return scale.encode_public(c, frac_bits, device)


    def _truncate(self, x: Fixed, bits: int) -> Fixed:
        """x / 2^bits at scale ``x.frac_bits - bits``: floor, or floor + stochastic 0/1."""
        if bits < 0:
            raise ValueError(f"truncate: negative shift {bits}")
        if bits == 0:
            return x
        out = x.ring >> bits
        if self.truncation == "probabilistic":
            low = x.ring & ((1 << bits) - 1)
            draw = self._stream.words(x.ring.numel(), x.ring.device).reshape(x.ring.shape) & ((1 << bits) - 1)
            out = out + (draw < low).to(RING_DTYPE)
        return Fixed(out, x.frac_bits - bits)

    def _to_scale(self, x: Fixed) -> Fixed:
        """Truncate to f if the scale is above f (``secure.mpc.arithmetic.to_scale``)."""
        return self._truncate(x, scale.excess_bits(x.frac_bits, self.frac_bits))

    @staticmethod
    def _lift(x: Fixed, frac_bits: int) -> Fixed:
        """The same value at a finer scale (exact left shift)."""
        if frac_bits < x.frac_bits:
            raise ValueError(f"lift: cannot lower scale {x.frac_bits} to {frac_bits} without truncation")
        return Fixed(x.ring << (frac_bits - x.frac_bits), frac_bits)

    def _align(self, x: Fixed, y: Fixed) -> tuple[Fixed, Fixed]:
        if x.frac_bits < y.frac_bits:
            return self._lift(x, y.frac_bits), y
        if y.frac_bits < x.frac_bits:
            return x, self._lift(y, x.frac_bits)
        return x, y

    # ---- shape and linear operations ------------------------------------------------------
    def shape(self, x: Fixed) -> torch.Size:
        return x.shape

    def from_public(self, c: torch.Tensor) -> Fixed:
        """A public tensor as a value at scale f (``FixedPoint.encode``, range-checked)."""
        return self.encode(c)

    def concat(self, xs: Sequence[Fixed], dim: int) -> Fixed:
        """torch.cat along ``dim``; the values must share one scale (as ``shares.cat``)."""
        if not xs:
            raise ValueError("concat needs at least one value")
        first = xs[0].frac_bits
        for v in xs[1:]:
            if v.frac_bits != first:
                raise ValueError(f"cat: scales differ ({first} vs {v.frac_bits})")
        return Fixed(torch.cat([v.ring for v in xs], dim), first)

    def map_shape(self, x: Fixed, fn: Callable[[torch.Tensor], torch.Tensor]) -> Fixed:
        """``fn`` applied to the ring tensor (shape-only functions), scale unchanged."""
        return Fixed(fn(x.ring), x.frac_bits)

    def add(self, x: Fixed, y: Fixed) -> Fixed:
        x, y = self._align(x, y)
        return Fixed(x.ring + y.ring, x.frac_bits)

    def sub(self, x: Fixed, y: Fixed) -> Fixed:
        x, y = self._align(x, y)
        return Fixed(x.ring - y.ring, x.frac_bits)

    def neg(self, x: Fixed) -> Fixed:
        return Fixed(-x.ring, x.frac_bits)

    def add_public(self, x: Fixed, c: Public) -> Fixed:
        """x + c at ``scale.add_public_scale`` (a scale-0 x plus an integral c stays at 0)."""
        self.fp.encode(c)  # range check with a clear error
        x = self._lift(x, scale.add_public_scale(x.frac_bits, c, self.frac_bits))
        return Fixed(x.ring + self._const(c, x.frac_bits, x.device), x.frac_bits)

    def mul_public(self, x: Fixed, c: Public) -> Fixed:
        """x * c (``scale.mul_public_scale``): exact for an integral c; else c at scale
        ``f + k``, the product truncated back to f."""
        self.fp.encode(c)  # range check with a clear error
        s, exact = scale.mul_public_scale(c, self.frac_bits)
        product = Fixed(x.ring * self._const(c, s, x.device), x.frac_bits + s)
        return product if exact else self._to_scale(product)

    def sum(self, x: Fixed, dim: int, keepdim: bool = False) -> Fixed:
        return Fixed(x.ring.sum(dim=dim, keepdim=keepdim), x.frac_bits)

    def dot_public(self, terms: Sequence[Fixed], coeffs: Sequence[float], bias: float = 0.0,
                   truncate: bool = True) -> Fixed:
        """bias + sum_k coeffs[k] * terms[k] at ``scale.dot_public_scales`` (2f + k), one
        truncation to f; left at 2f + k with ``truncate=False``."""
        f = self.frac_bits
        coeff_scale, sum_scale = scale.dot_public_scales(self.fp, len(terms), coeffs, bias)
        acc: torch.Tensor | None = None
        for t, c in zip(terms, coeffs):
            if t.frac_bits != f:
                t = self._lift(t, f) if t.frac_bits < f else self._to_scale(t)
            term = t.ring * self._const(c, coeff_scale, t.device)
            acc = term if acc is None else acc + term
        assert acc is not None
        acc = acc + self._const(bias, sum_scale, acc.device)
        return self._to_scale(Fixed(acc, sum_scale)) if truncate else Fixed(acc, sum_scale)

    # ---- products -------------------------------------------------------------------------
    def mul(self, x: Fixed, y: Fixed) -> Fixed:
        """x * y at scale fx + fy, truncated to f when above it (exact with a bit)."""
        return self._to_scale(Fixed(x.ring * y.ring, scale.product_scale(x.frac_bits, y.frac_bits)))

    def mul_many(self, pairs: Sequence[tuple[Fixed, Fixed]]) -> list[Fixed]:
        return [self.mul(x, y) for x, y in pairs]

    def sum_of_products(self, pairs: Sequence[tuple[Fixed, Fixed]], dim: int | None = None) -> Fixed:
        """sum_j x_j * y_j: ring products brought to the largest scale (and summed over ``dim``),
        one truncation (as MpcOps)."""
        scales = [scale.product_scale(x.frac_bits, y.frac_bits) for x, y in pairs]
        top = scale.sum_of_products_scale(scales)
        acc = None
        for (x, y), sc in zip(pairs, scales):
            term = (x.ring * y.ring) << (top - sc)
            acc = term if acc is None else acc + term
        assert acc is not None
        if dim is not None:
            acc = acc.sum(dim=dim, keepdim=True)
        return self._to_scale(Fixed(acc, top))

    def matmul(self, x: Fixed, y: Fixed) -> Fixed:
        """x @ y exactly in the ring (``ring_matmul``), then truncated to f."""
        return self._to_scale(Fixed(ring_matmul(x.ring, y.ring), scale.product_scale(x.frac_bits, y.frac_bits)))

    def matmul_many(self, pairs: Sequence[tuple[Fixed, Fixed]]) -> list[Fixed]:
        return [self.matmul(x, y) for x, y in pairs]

    # ---- comparisons ----------------------------------------------------------------------
    def less_than_public(self, x: Fixed, thresholds: Sequence[float], magnitude: float | None = None) -> list[Fixed]:
        """[1{x_ring < round(c * 2^s)}] as scale-0 bits at ``scale.comparison_scale`` s (x's
        own; an integral x compared with a fractional c is lifted to f first). A
        ``magnitude`` bound is checked (:class:`~secure.approx.interface.MagnitudeError`)."""
        x = self._lift(x, scale.comparison_scale(x.frac_bits, thresholds, self.frac_bits))
        if magnitude is not None and x.ring.numel():
            check_magnitude(float(x.ring.abs().max()) * 2.0**-x.frac_bits, magnitude)
        self.fp.encode(torch.tensor(list(thresholds), dtype=torch.float64))  # range check
        return [Fixed((x.ring < self._const(c, x.frac_bits, x.device)).to(RING_DTYPE), 0) for c in thresholds]

    def less_than(self, x: Fixed, y: Fixed) -> Fixed:
        """1{x < y} as a scale-0 bit (exact on the aligned ring values, broadcasting)."""
        x, y = self._align(x, y)
        return Fixed((x.ring < y.ring).to(RING_DTYPE), 0)

    def max(self, x: Fixed, dim: int = -1, keepdim: bool = True) -> Fixed:
        """Exact maximum of the ring values along ``dim`` (scale unchanged)."""
        if x.shape[dim] == 0:
            raise ValueError("max over an empty dimension")
        return Fixed(x.ring.amax(dim=dim, keepdim=keepdim), x.frac_bits)

    def max_and_below(self, x: Fixed, gap: float, magnitude: float | None = None) -> tuple[Fixed, Fixed]:
        """(exact row maximum, ``1{x_ring - max_ring < round(gap 2^s)}``) at x's scale s >= f
        (lifted when below), as ``secure.mpc.compare.max_and_below`` reads it without a
        ``magnitude`` (with one, MPC's maximum may fall short by its tolerance); the
        ``magnitude`` bound is checked (:class:`~secure.approx.interface.MagnitudeError`)."""
        if magnitude is not None and x.ring.numel():
            check_magnitude(float(x.ring.abs().max()) * 2.0**-x.frac_bits, magnitude, "a maximum's input")
        x = self._lift(x, max(x.frac_bits, self.frac_bits))
        self.fp.encode(torch.tensor(gap, dtype=torch.float64))  # range check
        top = x.ring.amax(dim=-1, keepdim=True)
        below = (x.ring - top < self._const(gap, x.frac_bits, x.device)).to(RING_DTYPE)
        return Fixed(top, x.frac_bits), Fixed(below, 0)

    def check_range(self, x: Fixed, lower: float | None, upper: float | None, what: str) -> None:
        """RangeError if any ring value is below ``round(lower 2^s)`` or above
        ``round(upper 2^s)`` at ``scale.comparison_scale`` s, exactly as ``MpcOps`` counts
        them (there only the count is opened); the message adds the observed min/max."""
        thresholds = check_range_arguments(lower, upper)
        x = self._lift(x, scale.comparison_scale(x.frac_bits, thresholds, self.frac_bits))
        self.fp.encode(torch.tensor(thresholds, dtype=torch.float64))  # range check
        out = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        if lower is not None:
            out |= x.ring < self._const(lower, x.frac_bits, x.device)
        if upper is not None:
            out |= x.ring > self._const(upper, x.frac_bits, x.device)
        count = int(out.sum())
        if count:
            values = self.decode(x)
            raise RangeError(what, lower, upper, count, x.ring.numel(), (float(values.min()), float(values.max())))

    # ---- frexp ----------------------------------------------------------------------------
    def frexp(self, x: Fixed, exponent_fn: Callable[[int], float],
              bounds: tuple[float, float] | None = None) -> tuple[Fixed, Fixed]:
        """(m, exponent_fn(e)) with x = m 2^e, m in [0.5, 1), as ``secure.mpc.compare.frexp``.

        The input keeps its scale s (lifted to f when below). With k the highest set bit
        of its ring value X on the window [first, last] of ``scale.frexp_window``:
        m = trunc_f(X * 2^(last - k)) from scale last + 1 (within one truncation ulp of
        x 2^-e); the factor is ``clamp(exponent_fn(e), +-fp.max_abs/4)`` encoded at f.
        Outside the window (x <= 0 included) both outputs are exactly 0, as in the protocol.
        """
        m, factor, _ = self.frexp_segments(x, exponent_fn, bounds=bounds)
        return m, factor

    def frexp_segments(self, x: Fixed, exponent_fn: Callable[[int], float], segments: int = 1,
                       tables: Sequence[Callable[[int], float]] = (),
                       times: Fixed | Callable[[], Fixed] | None = None,
                       bounds: tuple[float, float] | None = None,
                       mantissa_tables: Sequence[Callable[[int], float]] = (),
                       factor_tables: Sequence[Callable[[int], float]] = (),
                       times_table: Callable[[int], float] | None = None) -> tuple[Fixed, Fixed, list[Fixed]]:
        """As ``secure.mpc.compare.frexp_segments``: the piece of X among the thresholds of
        ``scale.frexp_pieces`` picks each table's value (m's power of two, the factor, the
        tables' values at f); ``times * factor`` is a product truncated to f, and
        so is each mantissa table's X times its scaled power. All outputs exactly 0 outside
        the window."""
        f = self.frac_bits
        if callable(times):
            times = times()
        x = self._lift(x, max(x.frac_bits, f))
        first, last = scale.frexp_window(f, x.frac_bits, FREXP_EXTRA_BITS, bounds)
        pieces = scale.frexp_pieces(self.fp, exponent_fn, x.frac_bits, first, last, segments, tables,
                                    mantissa_tables, x.device, factor_tables, times_table)
        ring = x.ring
        bounds_ring = torch.tensor(pieces.thresholds, dtype=ring.dtype, device=ring.device)
        in_domain = (ring >= bounds_ring[0]) & (ring < bounds_ring[-1])
        piece = (torch.searchsorted(bounds_ring, ring, right=True) - 1).clamp(0, len(bounds_ring) - 2)
        piece = torch.where(in_domain, piece, torch.zeros_like(piece))
        zero = torch.zeros_like(ring)
        picked = [torch.where(in_domain, v[piece], zero) for v in pieces.values]
        local = 2 + len(tables) + len(factor_tables)
        inv, factor, *plain = picked[:local]
        m = self._to_scale(Fixed(ring * inv, x.frac_bits + pieces.frac_bits[0]))
        values = [Fixed(v, f) for v in plain]
        values += [self._to_scale(Fixed(ring * v, x.frac_bits + fb))  # X times the scaled table: m * table(j)
                   for v, fb in zip(picked[local:], pieces.frac_bits[local:])]
        factor_f = Fixed(factor, f)
        return m, (self.mul(times, factor_f) if times is not None else factor_f), values


__all__ = ["FREXP_EXTRA_BITS", "TRUNCATION_MODES", "Fixed", "FixedPointOps", "FixedPointOverflowError"]
