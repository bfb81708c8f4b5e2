"""MPC backend of :class:`secure.approx.interface.SecureOps`: one object per party.

The three parties each build ``MpcOps(party)`` and call the same form with their own
shares; every method below is a lockstep protocol step (see ``secure.mpc``). Which scale
each result is held at and when it is truncated is decided by ``secure.mpc.scale``, which
the one-process simulation (``secure.mpc.simulation``) follows too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from secure.approx.interface import Public, RangeError, check_range_arguments
from secure.mpc import arithmetic as ar
from secure.mpc import compare as cmp
from secure.mpc import scale as sc
from secure.mpc import shares as sh
from secure.mpc.party import Party
from secure.mpc.shares import AShare


class MpcOps:
    """SecureOps over this party's replicated shares."""

    def __init__(self, party: Party) -> None:
        self.party = party

    @property
    def frac_bits(self) -> int:
        return self.party.fp.frac_bits

    def _encode(self, c: Public, frac_bits: int) -> torch.Tensor:
        return sc.encode_public(c, frac_bits, self.party.device)

    def shape(self, x: AShare) -> torch.Size:
        return x.shape

    def from_public(self, c: torch.Tensor) -> AShare:
        ring = self.party.fp.encode(c, self.party.device)
        a, b = sh.trivial_component(ring, 0, self.party.id, ring.shape, ring.device)
        return AShare(a, b, self.party.id, self.frac_bits)

    def concat(self, xs: Sequence[AShare], dim: int) -> AShare:
        return sh.cat(list(xs), dim)

    def map_shape(self, x: AShare, fn: Callable[[torch.Tensor], torch.Tensor]) -> AShare:
        return x.map(fn)

    def add(self, x: AShare, y: AShare) -> AShare:
        return sh.add(x, y)

    def sub(self, x: AShare, y: AShare) -> AShare:
        return sh.sub(x, y)

    def neg(self, x: AShare) -> AShare:
        return sh.neg(x)

    def add_public(self, x: AShare, c: Public) -> AShare:
        self.party.fp.encode(c)  # range check with a clear error
        s = sc.add_public_scale(x.frac_bits, c, self.frac_bits)
        if s != x.frac_bits:
            x = sh.lift(x, s)
        return sh.add_ring_public(x, self._encode(c, s), self.party.id)

    def mul_public(self, x: AShare, c: Public) -> AShare:
        self.party.fp.encode(c)  # range check with a clear error
        s, exact = sc.mul_public_scale(c, self.frac_bits)
        c_ring = self._encode(c, s)
        if exact:
            return sh.mul_ring_public(x, c_ring)
        scaled = AShare(x.a * c_ring, x.b * c_ring, x.owner, x.frac_bits + s)
        return ar.to_scale(self.party, [scaled])[0]

    def sum(self, x: AShare, dim: int, keepdim: bool = False) -> AShare:
        return sh.sum_share(x, dim, keepdim)

    def dot_public(self, terms: Sequence[AShare], coeffs: Sequence[float], bias: float = 0.0,
                   truncate: bool = True) -> AShare:
        f = self.frac_bits
        coeff_scale, scale = sc.dot_public_scales(self.party.fp, len(terms), coeffs, bias)
        acc: AShare | None = None
        for t, c in zip(terms, coeffs):
            if t.frac_bits != f:
                t = sh.lift(t, f) if t.frac_bits < f else ar.to_scale(self.party, [t])[0]
            c_ring = self._encode(c, coeff_scale)
            term = AShare(t.a * c_ring, t.b * c_ring, t.owner, scale)
            acc = term if acc is None else sh.add(acc, term)
        assert acc is not None
        acc = sh.add_ring_public(acc, self._encode(bias, scale), self.party.id)
        # the optional probabilistic truncation fails at a rate that grows with the value's
        # scale: a later product of this term would sit at 3f + k, so it truncates now
        if truncate or self.party.fp.truncation == "probabilistic":
            return ar.to_scale(self.party, [acc])[0]
        return acc

    def mul(self, x: AShare, y: AShare) -> AShare:
        return ar.mul(self.party, x, y)

    def mul_many(self, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
        return ar.mul_many(self.party, pairs)

    def matmul(self, x: AShare, y: AShare) -> AShare:
        return ar.matmul(self.party, x, y)

    def matmul_many(self, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
        return ar.matmul_many(self.party, pairs)

    def sum_of_products(self, pairs: Sequence[tuple[AShare, AShare]], dim: int | None = None) -> AShare:
        return ar.sum_of_products(self.party, pairs, dim)

    def concurrently(self, branches: Sequence[Callable[[], object]]) -> list[object]:
        """Independent branches of a form in merged rounds (:meth:`Party.concurrently`)."""
        return self.party.concurrently(branches)

    def less_than_public(self, x: AShare, thresholds: Sequence[float],
                         magnitude: float | None = None) -> list[AShare]:
        return cmp.less_than_public(self.party, x, thresholds, magnitude)

    def less_than(self, x: AShare, y: AShare) -> AShare:
        return cmp.less_than(self.party, x, y)

    def max(self, x: AShare, dim: int = -1, keepdim: bool = True) -> AShare:
        return cmp.max_along(self.party, x, dim, keepdim)

    def max_and_below(self, x: AShare, gap: float, magnitude: float | None = None) -> tuple[AShare, AShare]:
        self.party.fp.encode(torch.tensor(gap, dtype=torch.float64))  # range check
        return cmp.max_and_below(self.party, x, gap, magnitude=magnitude)

    def check_range(self, x: AShare, lower: float | None, upper: float | None, what: str) -> None:
        """RangeError if any element of x is outside ``[lower, upper]``: one comparison pass
        for both ends (8 rounds), the out-of-range bits summed into one share, only that
        count opened (1 round) -- :func:`secure.mpc.compare.count_out_of_range`. It reveals
        the number of out-of-range elements of this value (0 for every answered query); all
        three parties open the same count, so all three fail the same query."""
        check_range_arguments(lower, upper)
        count = cmp.count_out_of_range(self.party, x, lower, upper)
        if count:
            raise RangeError(what, lower, upper, count, x.a.numel())

    def frexp(self, x: AShare, exponent_fn: Callable[[int], float],
              bounds: tuple[float, float] | None = None) -> tuple[AShare, AShare]:
        return cmp.frexp(self.party, x, exponent_fn, bounds=bounds)

    def frexp_segments(self, x: AShare, exponent_fn: Callable[[int], float], segments: int = 1,
                       tables: Sequence[Callable[[int], float]] = (),
                       times: AShare | Callable[[], AShare] | None = None,
                       bounds: tuple[float, float] | None = None,
                       mantissa_tables: Sequence[Callable[[int], float]] = (),
                       factor_tables: Sequence[Callable[[int], float]] = (),
                       times_table: Callable[[int], float] | None = None) -> tuple[AShare, AShare, list[AShare]]:
        return cmp.frexp_segments(self.party, x, exponent_fn, segments, tables, times, bounds=bounds,
                                  mantissa_tables=mantissa_tables, factor_tables=factor_tables,
                                  times_table=times_table)
