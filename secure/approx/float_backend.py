"""Plaintext float backend of :class:`secure.approx.interface.SecureOps`.

Evaluates a secure form on ordinary float tensors, so the error of an approximation
against the exact torch function is measured without any cryptography.

A product with an exact 0 is 0 here, as in the ring: a form may compute a piece on inputs
far outside its range (the powers of a huge x overflow to inf, or to garbage in fixed
point) and drop it with a 0/1 bit, and IEEE's ``0 * inf = nan`` must not leak through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from secure.approx.interface import Public, RangeError, check_magnitude, check_range_arguments


class FloatOps:
    """SecureOps over plain float tensors (float64 by default for measuring error)."""

    def shape(self, x: torch.Tensor) -> torch.Size:
        return x.shape

    def from_public(self, c: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(c, dtype=torch.float64)

    def concat(self, xs: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(list(xs), dim)

    def map_shape(
        self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        return fn(x)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y

    def sub(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x - y

    def neg(self, x: torch.Tensor) -> torch.Tensor:
        return -x

    def add_public(self, x: torch.Tensor, c: Public) -> torch.Tensor:
        return x + c

    def mul_public(self, x: torch.Tensor, c: Public) -> torch.Tensor:
        return x * c

    def sum(self, x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
        return x.sum(dim=dim, keepdim=keepdim)

    def dot_public(
        self, terms: Sequence[torch.Tensor], coeffs: Sequence[float], bias: float = 0.0,
        truncate: bool = True,
    ) -> torch.Tensor:
        if len(terms) != len(coeffs):
            raise ValueError(f"dot_public: {len(terms)} terms but {len(coeffs)} coefficients")
        out = terms[0] * coeffs[0] + bias
        for t, c in zip(terms[1:], coeffs[1:]):
            out = out + t * c
        return out

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _product(x, y)

    def mul_many(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [_product(x, y) for x, y in pairs]

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ y

    def matmul_many(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [x @ y for x, y in pairs]

    def sum_of_products(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        dim: int | None = None) -> torch.Tensor:
        out = _product(*pairs[0])
        for x, y in pairs[1:]:
            out = out + _product(x, y)
        return out if dim is None else out.sum(dim=dim, keepdim=True)

    def less_than_public(self, x: torch.Tensor, thresholds: Sequence[float],
                         magnitude: float | None = None) -> list[torch.Tensor]:
        if magnitude is not None and x.numel():
            check_magnitude(float(x.abs().max()), magnitude)
        return [(x < c).to(x.dtype) for c in thresholds]

    def less_than(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x < y).to(x.dtype)

    def max(self, x: torch.Tensor, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
        return x.amax(dim=dim, keepdim=keepdim)

    def max_and_below(self, x: torch.Tensor, gap: float,
                      magnitude: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if magnitude is not None and x.numel():
            check_magnitude(float(x.abs().max()), magnitude, "a maximum's input")
        top = x.amax(dim=-1, keepdim=True)
        return top, (x - top < gap).to(x.dtype)

    def check_range(self, x: torch.Tensor, lower: float | None, upper: float | None, what: str) -> None:
        """RangeError (count, observed min/max) if any element is outside ``[lower, upper]``
        or NaN."""
        check_range_arguments(lower, upper)
        out = torch.isnan(x)
        if lower is not None:
            out = out | (x < lower)
        if upper is not None:
            out = out | (x > upper)
        count = int(out.sum())
        if count:
            raise RangeError(what, lower, upper, count, x.numel(), (float(x.min()), float(x.max())))

    def frexp(
        self, x: torch.Tensor, exponent_fn: Callable[[int], float],
        bounds: tuple[float, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact ``torch.frexp``; ``bounds`` only lets fixed-point backends compare less."""
        if bool((x <= 0).any()):
            raise ValueError("frexp: every input must be > 0 (reciprocal / rsqrt domain)")
        mantissa, exponent = torch.frexp(x)
        factor = exponent.to(torch.float64).apply_(lambda e: exponent_fn(int(e)))
        return mantissa, factor.to(x.dtype)

    def frexp_segments(
        self, x: torch.Tensor, exponent_fn: Callable[[int], float], segments: int = 1,
        tables: Sequence[Callable[[int], float]] = (),
        times: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        bounds: tuple[float, float] | None = None, mantissa_tables: Sequence[Callable[[int], float]] = (),
        factor_tables: Sequence[Callable[[int], float]] = (), times_table: Callable[[int], float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Exact: the segment of m is ``floor(segments * log2(2m))``."""
        if segments < 1:
            raise ValueError(f"frexp: segments must be >= 1, got {segments}")
        mantissa, factor = self.frexp(x, exponent_fn, bounds)
        if callable(times):
            times = times()
        piece = torch.floor(segments * torch.log2(2.0 * mantissa.to(torch.float64))).clamp(0, segments - 1).long()
        def picked(table: Callable[[int], float]) -> torch.Tensor:
            return torch.tensor([float(table(j)) for j in range(segments)], dtype=x.dtype)[piece]

        values = [picked(table) for table in tables]
        values += [_product(factor, picked(table)) for table in factor_tables]
        values += [mantissa * picked(table) for table in mantissa_tables]
        if times_table is not None:
            factor = _product(factor, picked(times_table))
        return mantissa, (factor if times is None else _product(times, factor)), values


def _product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y with 0 wherever a factor is exactly 0 (also against inf or nan)."""
    prod = x * y
    return torch.where((x == 0) | (y == 0), torch.zeros((), dtype=prod.dtype), prod)
