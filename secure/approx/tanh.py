"""tanh: a polynomial in |x| on [0, T], the sign beyond (BERT's and RoBERTa's pooler).

The pooler of a sequence classifier runs ``tanh(W h_cls + b)`` on one row of the hidden
size, so the form spends rounds on precision: its float error (4.6e-7) is below one
fixed-point step at f = 18 (3.8e-6), and what is left under MPC is rounding.

**Why a polynomial in |x|.** tanh has poles at ``+-i pi/2``. An odd polynomial in x on
``[-T, T]`` sees them at a relative distance ``pi / (2T)`` from its interval and needs
degree 60 or so for 1e-6; folded to ``u = |x|`` on ``[0, T]`` the nearest pole sits off the
interval's end, and a degree-20 Chebyshev fit reaches 4.5e-7 at T = 7.5, where the
saturation error ``1 - tanh(7.5) = 6.1e-7`` matches it. The fold costs nothing extra: the
sign bit and the range bits come from one comparison pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from secure.approx.gelu import chebyshev_basis, lawson_fit
from secure.approx.interface import SecureOps, T

TANH_BOUND: float = 7.5
"""T: the polynomial covers ``|x| < T``; beyond it the form returns ``sign(x)``
(``1 - tanh(7.5) = 6.1e-7``)."""

TANH_CHEBYSHEV: tuple[float, ...] = (
    0.8196725237596815, 0.32895726408378917, -0.24884671765986438, 0.15408559090825388,
    -0.07506668849534025, 0.025084381263445046, -0.0014862534326502265, -0.00548078063537998,
    0.005029874763626471, -0.0027642854901559987, 0.0009787486760245935, -8.642639630609551e-05,
    -0.00018608679453792335, 0.0001777973146862403, -9.921449644088545e-05, 3.5798004853550774e-05,
    -3.831772753699962e-06, -6.3820804976500065e-06, 6.109605632066709e-06, -3.7166074602065237e-06,
    1.2299444659724884e-06,
)
"""Chebyshev coefficients ``c_0 .. c_20`` of ``tanh(u) ~ sum_k c_k T_k(v)``, ``v = 2u/T - 1``
on ``u in [0, 7.5]``: :func:`tanh_fit` (``TANH_BOUND``, degree 20, 12001 points, 4000
iterations); max error 4.54e-7 on 400,001 points of ``[0, 7.5]``."""


def tanh_fit(bound: float = TANH_BOUND, degree: int = 20, points: int = 12001,
             iterations: int = 4000) -> tuple[float, ...]:
    """Chebyshev coefficients (in ``v = 2u/bound - 1``) of a minimax fit of ``tanh(u)`` on
    ``[0, bound]``: Lawson's iteratively reweighted least squares on ``points`` evenly
    spaced points (as :func:`secure.approx.gelu.even_fit`). How :data:`TANH_CHEBYSHEV`
    was made (the defaults: about 2.5 minutes on a shared core)."""
    import numpy as np

    if bound <= 0 or degree < 1:
        raise ValueError(f"need bound > 0 and degree >= 1, got bound={bound}, degree={degree}")
    u = np.linspace(0.0, bound, points)
    return lawson_fit(2.0 * u / bound - 1.0, np.tanh(u), degree, iterations)


def tanh(ops: SecureOps[T], x: T, bound: float = TANH_BOUND,
         chebyshev: Sequence[float] = TANH_CHEBYSHEV) -> T:
    """tanh(x) on the whole real line: ``sign(x) P(|x|)`` for ``|x| < T``, ``sign(x)`` beyond,
    with ``P(u) = sum_k c_k T_k(2u/T - 1)`` (:data:`TANH_CHEBYSHEV`, T = :data:`TANH_BOUND`).

    Steps:

    1. one ``less_than_public`` with the thresholds ``-T, 0, T``: bits ``lo = 1{x < -T}``,
       ``neg = 1{x < 0}``, ``hi = 1{x < T}``. Free linear combinations of them give
       ``s = hi + lo - 2 neg`` (``sign(x)`` inside the bound, 0 outside) and
       ``o = 1 - hi - lo`` (``sign(x)`` outside, 0 inside), both exact integers;
    2. ``v = s * (2x/T) - 1`` (``2x/T`` an untruncated ``dot_public``, the product with the
       integer ``s`` truncated once): ``2|x|/T - 1`` inside, ``-1`` outside, so every later
       value is bounded (``|T_k(v)| <= 1``) whatever x is;
    3. ``T_1 .. T_20`` of v (:func:`~secure.approx.gelu.chebyshev_basis`, 5 product passes);
    4. ``P`` as one untruncated ``dot_public``; the result ``s P + o``: one
       ``sum_of_products`` (``s P``, one truncation) plus ``o`` (free).

    Cost: 1 comparison call (3 thresholds), 1 ``mul`` (v), 5 ``mul_many`` (the basis, 19
    products), 2 ``dot_public`` (untruncated), 1 ``sum_of_products``. Under MPC with the
    exact truncation: 8 + 2 + 5 * 2 + 2 = 22 rounds and 1,710 bytes per element over the
    three parties (measured: 450 for the three comparisons, 60 for each of the 21 products
    with a truncation); 1.3 MB for a 768-wide pooler row.

    Max abs error vs ``torch.tanh`` over the whole line (measured on 240,001 points of
    [-12, 12], the saturated tails included): 6.1e-7 on floats (the saturation at T; the
    fit's own is 4.5e-7); at f = 18 about 6 steps of 2^-18: 2.0-2.3e-5 on the fixed-point
    simulation (10 seeds, probabilistic truncation; 1.8e-5 with floor) and 2.0-2.3e-5 on
    three-party shares (7 runs), largest near x = 0: the truncation of v (one step) moves u
    by T/2 steps, and tanh' = 1 there. Tests assert 7e-7 (floats) and 3e-5 (fixed, MPC). Input range: every x whose
    fixed-point encoding the comparisons accept; ``2x/T`` is held at scale 2f + 1, so
    ``|x| < 2^(61 - 2f)`` (3.4e7 at f = 18). On floats, every finite x.
    """
    if len(chebyshev) < 2 or bound <= 0:
        raise ValueError(f"need at least a degree-1 fit and bound > 0, got {len(chebyshev)} coefficients, {bound}")
    lo, neg, hi = ops.less_than_public(x, [-bound, 0.0, bound])
    edges = ops.add(hi, lo)
    inside_sign = ops.sub(edges, ops.add(neg, neg))
    outside_sign = ops.add_public(ops.neg(edges), 1.0)
    v = ops.add_public(ops.mul(inside_sign, ops.dot_public([x], [2.0 / bound], truncate=False)), -1.0)
    degree = len(chebyshev) - 1
    basis = chebyshev_basis(ops, v, degree)
    poly = ops.dot_public([basis[k] for k in range(1, degree + 1)], list(chebyshev[1:]), bias=chebyshev[0],
                          truncate=False)
    return ops.add(ops.sum_of_products([(inside_sign, poly)]), outside_sign)


__all__ = ["TANH_BOUND", "TANH_CHEBYSHEV", "tanh", "tanh_fit"]
