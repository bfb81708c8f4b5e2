"""Plaintext float backend of :class:`secure.approx.interface.SecureOps`.

Evaluates a secure form on ordinary float tensors, so the error of an approximation
against the exact torch function is measured without any cryptography.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from secure.approx.interface import Public, RangeError, check_range_arguments


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
        return x * y

    def mul_many(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [x * y for x, y in pairs]

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ y

    def matmul_many(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [x @ y for x, y in pairs]

    def sum_of_products(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        out = pairs[0][0] * pairs[0][1]
        for x, y in pairs[1:]:
            out = out + x * y
        return out

    def less_than_public(self, x: torch.Tensor, thresholds: Sequence[float]) -> list[torch.Tensor]:
        return [(x < c).to(x.dtype) for c in thresholds]

    def less_than(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x < y).to(x.dtype)

    def max(self, x: torch.Tensor, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
        return x.amax(dim=dim, keepdim=keepdim)

    def max_and_below(self, x: torch.Tensor, gap: float) -> tuple[torch.Tensor, torch.Tensor]:
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
