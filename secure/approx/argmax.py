"""Greedy argmax on secret values: the next token of secure generation.

:func:`argmax` returns the position of the largest element along a dimension as a secret
value of the backend, written once against :class:`~secure.approx.interface.SecureOps` so
it runs on floats (``FloatOps``), on the fixed-point simulation (``FixedPointOps``) and on
three-party shares (``MpcOps``); CKKS cannot compare (``HeUnsupportedError``). Under MPC
the caller opens the index to the client only: no value, no comparison bit and no other
position is revealed.

Math: a tournament over adjacent pairs. At each level the candidates (value v, index i)
at even positions meet their right neighbours; with ``c = 1{v_a < v_b}`` (one
``less_than`` for all pairs of the level),
``v = v_a + c (v_b - v_a)`` and ``i = i_a + c (i_b - i_a)`` (one ``mul_many`` for both
products); an odd last candidate passes through. Candidates stay in index order (each
covers a contiguous block of positions, left before right), so ``c = 0`` on a tie keeps
the lower index: torch.argmax's first occurrence, exactly on floats. At the first level
``i_b - i_a = 1`` is public, so ``i = 2j + c`` costs no product.

Ties and resolution on fixed point: no step truncates (every product is with a 0/1 bit)
and comparisons are exact on ring values, so ``FixedPointOps`` and ``MpcOps`` both return
exactly ``torch.argmax`` of the ring values, equal ring values keeping the lower index.
Against the real values that is exact only down to the resolution: values whose
difference is below 2^-f (3.8e-6 at f = 18) may encode to equal ring values, and the
truncations of the computation before the argmax (a few ulps) may swap near-maxima that
close; among such near-maxima either index may come out.

Scale: the index is a real holding an integer, at the value scale f on the fixed-point
backends (``from_public``'s scale; exact, since a product with a 0/1 bit needs no
truncation): it opens/decodes to the exact integer. Float64 on ``FloatOps``.

Cost for length n (per row; all rows of a batch share the passes):
``ceil(log2 n)`` levels, ``n - 1`` comparisons in all, ``n - 1`` value products and
about ``n / 2`` index products (none at the first level). Under MPC each level is one
MSB pass (8 rounds) and one round of bit products (values and indices together, no
truncation): ``9 ceil(log2 n)`` rounds (:func:`argmax_rounds`; 90 for n = 1024, 99 for
n = 2048). Bytes sent by each party (equal on the three), batch 1, measured on the
in-process engine: 47,054 for n = 1024 and 94,158 for n = 2048, about 46 bytes per
element (34 per comparison, 8 per bit product); a batch of rows costs the rows'
bytes in the same rounds. Both pinned in tests/test_argmax.py.

Imports only the interface (and torch), as every form in ``secure.approx``.
"""

from __future__ import annotations

import math

import torch

from secure.approx.interface import SecureOps, T

ROUNDS_PER_LEVEL: int = 9
"""Rounds of one tournament level under MPC: one MSB pass (8) and one bit-product round."""


def argmax_rounds(n: int) -> int:
    """Rounds of :func:`argmax` over length n on ``MpcOps``: ``9 ceil(log2 n)`` (0 for n = 1)."""
    if n < 1:
        raise ValueError(f"argmax_rounds: need n >= 1, got {n}")
    return ROUNDS_PER_LEVEL * math.ceil(math.log2(n)) if n > 1 else 0


def _even(t: torch.Tensor, h: int) -> torch.Tensor:
    return t[..., 0:2 * h:2]


def _odd(t: torch.Tensor, h: int) -> torch.Tensor:
    return t[..., 1:2 * h:2]


def _tail(t: torch.Tensor, h: int) -> torch.Tensor:
    return t[..., 2 * h:]


def _level(ops: SecureOps[T], cur: T, index: T | None, n: int) -> tuple[T, T]:
    """One tournament level over the last dimension (length n >= 2): the winners of the
    adjacent pairs, an odd last candidate passed through. ``index`` None: the first level,
    where the indices are the public 0..n-1."""
    h = n // 2
    a = ops.map_shape(cur, lambda t: _even(t, h))
    b = ops.map_shape(cur, lambda t: _odd(t, h))
    c = ops.less_than(a, b)
    batch = ops.shape(c)[:-1]
    if index is None:  # i_b - i_a = 1: i = 2j + c, no product
        (dv,) = ops.mul_many([(c, ops.sub(b, a))])
        evens = torch.arange(0, 2 * h, 2, dtype=torch.float64).expand(*batch, h)
        best_index = ops.add(ops.from_public(evens.clone()), c)
        tail = torch.arange(2 * h, n, dtype=torch.float64).expand(*batch, n - 2 * h)
        rest = ops.from_public(tail.clone())
    else:
        ia = ops.map_shape(index, lambda t: _even(t, h))
        ib = ops.map_shape(index, lambda t: _odd(t, h))
        dv, di = ops.mul_many([(c, ops.sub(b, a)), (c, ops.sub(ib, ia))])
        best_index = ops.add(ia, di)
        rest = ops.map_shape(index, lambda t: _tail(t, h))
    best = ops.add(a, dv)
    if n % 2:
        best = ops.concat([best, ops.map_shape(cur, lambda t: _tail(t, h))], -1)
        best_index = ops.concat([best_index, rest], -1)
    return best, best_index


def argmax(ops: SecureOps[T], x: T, dim: int = -1, keepdim: bool = False) -> T:
    """Index of the largest element of x along ``dim`` (the first one on ties), as a secret
    value holding the integer (scale f on fixed point, see the module docstring).

    The result has x's shape without ``dim`` (kept as size 1 with ``keepdim``).
    ``ceil(log2 n)`` levels of one ``less_than`` and one ``mul_many`` each.
    """
    shape = ops.shape(x)
    if not -len(shape) <= dim < len(shape):
        raise ValueError(f"argmax: dim {dim} out of range for a {len(shape)}-d value")
    dim %= len(shape)
    n = shape[dim]
    if n == 0:
        raise ValueError("argmax over an empty dimension")
    cur = ops.map_shape(x, lambda t: t.movedim(dim, -1))
    index: T | None = None
    while n > 1:
        cur, index = _level(ops, cur, index, n)
        n = n // 2 + n % 2
    if index is None:  # n = 1: the only position
        index = ops.from_public(torch.zeros(ops.shape(cur), dtype=torch.float64))
    return ops.map_shape(index, lambda t: t.movedim(-1, dim) if keepdim else t.squeeze(-1))
