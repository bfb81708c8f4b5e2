"""The small tensor interface that every secure form is written against.

Each approximation (GeLU, softmax, LayerNorm, ...) is written once as a function
``form(ops, x, ...)`` that only calls the methods below. Backends implement them:

* :class:`secure.approx.float_backend.FloatOps` -- plaintext float torch (fidelity of a form),
* :class:`secure.mpc.simulation.FixedPointOps` -- plain fixed-point ring values with the
  MPC backend's scales and truncations (its arithmetic error, in one process),
* :class:`secure.mpc.backend.MpcOps` -- replicated 3-party shares (one object per party,
  the three parties run the same form in lockstep),
* :class:`secure.he.ops.HeOps` -- CKKS ciphertexts; only the polynomial forms run there
  (comparisons, ``max`` and ``frexp`` raise ``HeUnsupportedError``).

This module imports nothing of the project: the backends depend on it, never the reverse.

Values of type ``T`` are secret (a float tensor in the float backend, a ring value in the
fixed-point simulation, a share under MPC, a ciphertext under CKKS). "Bits" returned by
comparisons are values of the same type ``T`` holding exactly 0 or 1; multiplying by a bit
through :meth:`SecureOps.mul` is exact in fixed point (no truncation under MPC).

Round cost matters under MPC, so the batched methods (``mul_many``,
``less_than_public``) exist: a form should put independent products or comparisons of
the same step in one call, which costs one pass of rounds however many there are.

Bounded forms (a division or an inverse square root on a public range, a polynomial GeLU
on ``[-bound, bound]``) are accurate only inside their range. Where the structure of a
form cannot guarantee the range, the form calls :meth:`SecureOps.check_range`, which
raises :class:`RangeError` instead of letting a wrong value through (HE cannot compare:
there it is a no-op, see :class:`secure.he.ops.HeOps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")

Public = float | torch.Tensor
"""A public value: a Python float or a float tensor that broadcasts against the secret."""


class RangeError(ValueError):
    """A bounded form met a value outside the range where its error bound holds
    (:meth:`SecureOps.check_range`): the query fails instead of answering wrongly.

    ``count`` of ``total`` elements of ``what`` lie outside ``[lower, upper]`` (None: that
    end is not checked); ``observed`` is ``(min, max)`` where the backend sees the values
    (float and fixed-point simulation), None under MPC, where only the count is opened.
    """

    def __init__(self, what: str, lower: float | None, upper: float | None, count: int, total: int,
                 observed: tuple[float, float] | None = None) -> None:
        lo = "-inf" if lower is None else f"{lower:g}"
        hi = "inf" if upper is None else f"{upper:g}"
        seen = "" if observed is None else f"; observed min {observed[0]:.6g}, max {observed[1]:.6g}"
        super().__init__(f"{what}: {count} of {total} elements outside [{lo}, {hi}], where the "
                         f"form's error bound holds{seen}; refusing to answer")
        self.what = what
        self.lower = lower
        self.upper = upper
        self.count = count
        self.total = total
        self.observed = observed


def check_range_arguments(lower: float | None, upper: float | None) -> list[float]:
    """The thresholds of a range check (``lower`` and/or ``upper``, None: that end open),
    after checking that there is at least one and that ``lower <= upper``."""
    if lower is None and upper is None:
        raise ValueError("check_range needs a lower or an upper end")
    if lower is not None and upper is not None and not lower <= upper:
        raise ValueError(f"check_range: need lower <= upper, got [{lower}, {upper}]")
    return [float(c) for c in (lower, upper) if c is not None]


class MagnitudeError(ValueError):
    """A value exceeded a bound its structure was said to guarantee (a wrong bound: under
    MPC its comparisons would have read the wrong bits)."""


def check_magnitude(largest: float, magnitude: float | None, what: str = "a comparison's input") -> None:
    """MagnitudeError if ``largest`` (the largest |x| seen) exceeds ``magnitude`` (None: no bound).
    The plaintext backends call it, so a wrong bound shows on floats and in the fixed-point
    simulation before any query runs on shares."""
    if magnitude is not None and not largest <= magnitude:
        raise MagnitudeError(f"{what} reached |x| = {largest:.6g}, beyond the bound {magnitude:.6g} its structure "
                             "was said to guarantee (secure.graph.bounds)")


class SecureOps(Protocol[T]):
    """Operations a secure form may use. All shapes follow torch broadcasting."""

    # ---- shape and linear operations (free under MPC) -----------------------------
    def shape(self, x: T) -> torch.Size:
        """Shape of the secret tensor (public in every backend)."""
        ...

    def from_public(self, c: torch.Tensor) -> T:
        """A public tensor as a value of this backend (a trivial sharing under MPC)."""
        ...

    def concat(self, xs: Sequence[T], dim: int) -> T:
        """torch.cat of secrets along ``dim`` (free)."""
        ...

    def map_shape(self, x: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
        """Apply a shape-only torch function (view, reshape, transpose, slice) to a secret."""
        ...

    def add(self, x: T, y: T) -> T:
        """x + y."""
        ...

    def sub(self, x: T, y: T) -> T:
        """x - y."""
        ...

    def neg(self, x: T) -> T:
        """-x."""
        ...

    def add_public(self, x: T, c: Public) -> T:
        """x + c for a public c."""
        ...

    def mul_public(self, x: T, c: Public) -> T:
        """x * c for a public real c (under MPC one truncation, two rounds with the default
        exact truncation; none when c is integral)."""
        ...

    def sum(self, x: T, dim: int, keepdim: bool = False) -> T:
        """Sum over one dimension."""
        ...

    def dot_public(self, terms: Sequence[T], coeffs: Sequence[float], bias: float = 0.0,
                   truncate: bool = True) -> T:
        """bias + sum_k coeffs[k] * terms[k] (one truncation for the whole sum under MPC).

        ``truncate=False`` leaves a fixed-point result at its higher scale (2f + k), for a
        :meth:`sum_of_products` that truncates once; float and CKKS backends ignore it, and
        so does MPC under the optional probabilistic truncation (whose failure rate grows
        with the scale a later product would reach)."""
        ...

    # ---- products -------------------------------------------------------------------
    def mul(self, x: T, y: T) -> T:
        """Element-wise x * y (broadcasting)."""
        ...

    def mul_many(self, pairs: Sequence[tuple[T, T]]) -> list[T]:
        """[x * y for x, y in pairs] in one pass of rounds."""
        ...

    def matmul(self, x: T, y: T) -> T:
        """Batched matrix product x @ y."""
        ...

    def matmul_many(self, pairs: Sequence[tuple[T, T]]) -> list[T]:
        """[x @ y for x, y in pairs] in one pass of rounds (a layer's independent
        projections of one input)."""
        ...

    def sum_of_products(self, pairs: Sequence[tuple[T, T]], dim: int | None = None) -> T:
        """sum_j x_j * y_j (broadcasting) in one pass: under MPC the local products are
        summed before the one reshare, with one (fused) truncation for the whole sum. With
        ``dim`` the sum also runs over that dimension (kept, size 1) before the truncation:
        ``sum_k sum_j x_jk y_jk``, one rounding per row instead of one per element."""
        ...

    # ---- comparisons ----------------------------------------------------------------
    def less_than_public(self, x: T, thresholds: Sequence[float], magnitude: float | None = None) -> list[T]:
        """[1{x < c} for c in thresholds] as 0/1 values, all in one pass of rounds.

        ``magnitude``: a bound on |x| that the structure guarantees (never one calibrated on
        data); under MPC it lets the comparisons read fewer bits (one round fewer at 32)."""
        ...

    def less_than(self, x: T, y: T) -> T:
        """1{x < y} element-wise as a 0/1 value."""
        ...

    def max(self, x: T, dim: int = -1, keepdim: bool = True) -> T:
        """Maximum along ``dim`` (a tournament of comparisons under MPC)."""
        ...

    def max_and_below(self, x: T, gap: float, magnitude: float | None = None) -> tuple[T, T]:
        """(maximum over the last dimension, kept; ``1{x - max < gap}`` as 0/1 values) for a
        public ``gap`` < 0: under MPC the bits ride in the maximum's last comparison pass,
        so they cost no rounds of their own (a softmax's clip).

        ``magnitude``: a bound on |x| that the structure guarantees; under MPC the passes
        then read x to a resolution that bound allows, at 32 bits (one round fewer per
        level), and the maximum may fall short of the exact one by a tolerance
        (:func:`secure.mpc.compare.max_along`: at most 2^-10 per tournament level)."""
        ...

    def check_range(self, x: T, lower: float | None, upper: float | None, what: str) -> None:
        """Raise :class:`RangeError` unless every element of x lies in ``[lower, upper]``
        (ends inclusive; None leaves that end open); ``what`` names the value in the message.

        Float and fixed-point backends compare the values and report the count and the
        observed min/max. Under MPC: one comparison pass for both ends (8 rounds), the
        out-of-range bits summed locally into one share and only that count opened
        (1 round); it reveals the number of out-of-range elements of that value, which is
        0 for every query that is answered. Under CKKS there is no comparison: a no-op.
        """
        ...

    # ---- normalisation seed for reciprocal and inverse square root ------------------
    def frexp(self, x: T, exponent_fn: Callable[[int], float],
              bounds: tuple[float, float] | None = None) -> tuple[T, T]:
        """For x > 0 write x = m * 2**e with m in [0.5, 1) and e an integer.

        Returns (m, exponent_fn(e)) where exponent_fn is any public function of the
        exponent, evaluated obliviously (under MPC e is never opened). ``bounds = (lo, hi)``
        is a range of x that the caller's structure guarantees (a softmax row sum lies in
        [1, n]); fixed-point backends then tell apart only the exponents in it (fewer
        comparisons under MPC) and return 0 outside it, so pass it only when guaranteed.
        """
        ...


    def frexp_segments(self, x: T, exponent_fn: Callable[[int], float], segments: int = 1,
                       tables: Sequence[Callable[[int], float]] = (), times: T | Callable[[], T] | None = None,
                       bounds: tuple[float, float] | None = None,
                       mantissa_tables: Sequence[Callable[[int], float]] = (),
                       factor_tables: Sequence[Callable[[int], float]] = (),
                       times_table: Callable[[int], float] | None = None) -> tuple[T, T, list[T]]:
        """:meth:`frexp` on finer pieces: for x > 0 with x = m * 2**e (m in [0.5, 1)) and j
        the segment of m, ``2**(j / segments) <= 2m < 2**((j + 1) / segments)``, returns
        ``(m, times * exponent_fn(e), [table(j) for table in tables])`` (``exponent_fn(e)``
        itself when ``times`` is None). A piecewise polynomial in m then needs no public
        coefficient per piece: the tables are the coefficients, values like any other.
        Under MPC ``segments`` times the comparisons of :meth:`frexp` in the same rounds,
        and ``times * exponent_fn(e)`` in the pass that forms m. ``mantissa_tables`` append
        ``[m * table(j)]`` to the values, also formed in that pass; under MPC they need
        ``bounds`` (a narrow window leaves room for the table's precision). ``times`` may
        be a function that computes it: it then runs :func:`concurrently` with the
        comparisons, so a value needed only at the product pass costs no rounds of its own.
        ``factor_tables`` append ``[exponent_fn(e) * table(j)]`` (local, like the tables), and
        ``times_table`` makes the second result ``times * exponent_fn(e) * times_table(j)``:
        a polynomial in m scaled by the exponent factor needs no product for its scaling."""
        ...

Form = Callable[..., T]


def concurrently(ops: SecureOps[T], *branches: Callable[[], object]) -> list:
    """The results of ``branches``, independent pieces of one form (neither reads what the
    other computes), in order. A backend that can overlap them has a ``concurrently``
    method (MPC: the branches' rounds are merged, so they cost the longest branch's
    rounds, :meth:`secure.mpc.party.Party.concurrently`); elsewhere they run one after the
    other, which computes the same values."""
    run = getattr(ops, "concurrently", None)
    if run is None:
        return [branch() for branch in branches]
    return run(list(branches))
