"""Clipped exponential for non-positive inputs: PUMA's limit form (sec. 4.3, DESIGN.md
sec. 4) and our polynomial form with fewer rounds."""

from __future__ import annotations

from functools import cache

import torch

from secure.approx.interface import SecureOps, T

EXP_CLIP: float = -14.0
"""PUMA's clip: exp(x) is taken as 0 for x < -14 (exp(-14) = 8.3e-7)."""


def clipped_exp(
    ops: SecureOps[T], x: T, t: int = 8, clip: float = EXP_CLIP, order: int = 1, below: T | None = None,
    x_scale: float = 1.0,
) -> T:
    """exp(x) for x <= 0 as ``0 if x < clip else (1 + x / 2^t)^(2^t)`` (PUMA, ``order=1``).

    Valid for x <= 0 only (the softmax input after the row max is subtracted); for x > 0
    the limit form still converges to exp(x) but the error grows like exp(x) x^2 / 2^(t+1).

    ``order`` > 1 (our extension, not PUMA's) replaces the base ``1 + y`` (``y = x/2^t``) by
    the Taylor polynomial ``sum_{k<=order} y^k / k!``: the relative error drops from about
    ``x^2 / 2^(t+1)`` to ``|x|^3 / (6 * 4^t)`` for order 2, for one more product pass.
    ``order=2, t=6`` is both cheaper (8 product passes instead of 9) and about 19x more
    accurate than PUMA's ``t=8`` (10x in softmax).

    Order of operations: ``z = poly(x * 2^-t)`` (``dot_public``, plus ``order - 1`` ``mul``
    for the powers of y), then ``z *= 1 - b`` with ``b = 1{x < clip}`` (one
    ``less_than_public``, one product by a 0/1 bit), then ``t`` squarings (``t`` ``mul``).
    The bit is applied *before* the squarings rather than after: it costs the same (one bit
    product), but clipped entries are then exactly 0 throughout, whereas squaring
    ``1 + x/2^t`` for a masked score (x ~ -1e4, so z ~ -38) 256 times overflows float64 to
    inf (inf * 0 = nan on FloatOps) and wraps the ring under MPC.

    ``x_scale`` > 0: exp(x_scale x) instead, the factor folded into the first step's public
    coefficient (a softmax's 1/sqrt(d) costs nothing then); the clip applies to x_scale x.

    ``below``: the bits ``1{x_scale x < clip}`` when the caller has them already (the softmax gets
    them with its row maximum, :meth:`SecureOps.max_and_below`); then no comparison here.

    Cost: 1 ``less_than_public`` (none with ``below``), 1 ``dot_public``, ``t + order``
    ``mul`` calls.

    Measured on FloatOps (float64, 1.4M points on [-14, 0]), max abs error: order 1:
    8.5e-3 (t = 5), 4.3e-3 (t = 6), 1.06e-3 (t = 8, near x = -2); order 2: 2.4e-4
    (t = 5), 5.7e-5 (t = 6), 3.5e-6 (t = 8); order 3: 7.8e-7 (t = 6). Below the clip
    the result is exactly 0 (error <= 8.3e-7).

    Fixed point (not visible on FloatOps): a rounding error of one step ``2^-f`` in the
    base is raised to the power ``2^t``, so expect an extra relative error of roughly
    ``2^(t+1-f)`` (2e-3 for t = 8, f = 18; 5e-4 for t = 6).
    """
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if clip > 0.0 or clip < -(2.0**t):
        # For x < -2^t the base 1 + x/2^t is negative and its even power grows again.
        raise ValueError(f"clip must lie in [-2^t, 0] = [{-(2.0**t)}, 0], got {clip}")
    if x_scale <= 0.0:
        raise ValueError(f"x_scale must be > 0, got {x_scale}")
    if below is None:
        (below,) = ops.less_than_public(x, [clip / x_scale])
    keep = ops.add_public(ops.neg(below), 1.0)  # 1 - b, still a 0/1 value
    if order == 1:
        z = ops.dot_public([x], [x_scale * 2.0**-t], bias=1.0)
    else:
        y = ops.mul_public(x, x_scale * 2.0**-t)
        powers = [y, ops.mul(y, y)]
        if order == 3:
            powers.append(ops.mul(powers[1], y))
        z = ops.dot_public(powers, [1.0, 0.5, 1.0 / 6.0][:order], bias=1.0)
    z = ops.mul(z, keep)
    for _ in range(t):
        z = ops.mul(z, z)
    return z


POLY_EXP_RANGE: float = 16.0
"""The polynomial exp is fitted on [-16, 0] (clipped inputs map to its left end)."""

POLY_EXP_DEGREE: int = 15


@cache
def poly_exp_coefficients(degree: int = POLY_EXP_DEGREE, span: float = POLY_EXP_RANGE) -> tuple[float, ...]:
    """Monomial coefficients m_0 .. m_degree of ``p(t) ~ exp(span/2 (t - 1))`` on t in [-1, 1]
    (so ``z = span/2 (t - 1)`` covers [-span, 0]): the Chebyshev interpolant at 256 nodes,
    converted to the monomial basis. For degree 15 on [-16, 0] the coefficients lie in
    [-0.01, 0.15] (no cancellation in fixed point) and the max abs error is 4.4e-7."""
    import numpy as np
    from numpy.polynomial import chebyshev

    half = span / 2.0
    nodes = np.cos(np.pi * (np.arange(256) + 0.5) / 256)
    fit = chebyshev.chebfit(nodes, np.exp(half * nodes - half), degree)
    return tuple(float(c) for c in chebyshev.cheb2poly(fit))


def poly_exp(ops: SecureOps[T], x: T, below: T, clip: float = EXP_CLIP, x_scale: float = 1.0) -> T:
    """exp(x) for x <= 0 as ``0 if x < clip else p(x/8 + 1)``, p of degree 15 (our form).

    ``below`` are the bits ``1{x < clip}`` (the softmax has them from its row maximum,
    :meth:`SecureOps.max_and_below`); ``keep = 1 - below``. With ``x_scale``: exp of
    ``x_scale x`` (``below`` then marks ``x_scale x < clip``), the factor folded into the
    public coefficient of the first step, free.

    Math: ``t = keep (x/8 + 1)`` (t in [-0.75, 1] where kept, exactly 0 where clipped),
    then Paterson-Stockmeyer with blocks of four:
    ``p(t) = Q(t) + q1(t) t^4 + (q2(t) + q3(t) t^4) t^8`` with ``q_i`` the cubic blocks of
    :func:`poly_exp_coefficients` and ``Q = m1 t + m2 t^2 + m3 t^3 + m0 keep``: the constant
    term rides on ``keep`` and every other term on a power of t, so clipped entries (and
    masked ones, x ~ -1e4) come out exactly 0 and no power of an unclipped t exceeds 1.

    Under MPC: ``t`` (one bit product with the untruncated ``x/8 + 1``, its truncation
    fused), ``t^2``, ``t^3, t^4``, ``t^8, q3 t^4``, then one ``sum_of_products`` with one
    fused truncation: 5 passes, 10 rounds and 432 bytes per element over the three
    parties (60 per truncated product; the truncations by 2f + k send the mask's top bit
    in 8 bytes, not 4), where :func:`clipped_exp` (t = 6, order 3) takes 21 rounds and about 590
    bytes and its own comparison.

    Measured max abs error on [-14, 0]: 4.4e-7 on floats (the fit); below the clip
    exactly 0.
    """
    m = poly_exp_coefficients()
    keep = ops.add_public(ops.neg(below), 1.0)
    if x_scale <= 0.0:
        raise ValueError(f"x_scale must be > 0, got {x_scale}")
    t = ops.mul(keep, ops.dot_public([x], [x_scale / 8.0], bias=1.0, truncate=False))
    t2 = ops.mul(t, t)
    t3, t4 = ops.mul_many([(t2, t), (t2, t2)])
    powers = [t, t2, t3]
    q3 = ops.dot_public(powers, list(m[13:16]), bias=m[12], truncate=False)
    t8, r = ops.mul_many([(t4, t4), (q3, t4)])
    low = ops.dot_public([*powers, keep], [*m[1:4], m[0]], truncate=False)
    q1 = ops.dot_public(powers, list(m[5:8]), bias=m[4], truncate=False)
    q2 = ops.add(ops.dot_public(powers, list(m[9:12]), bias=m[8], truncate=False), r)
    one = ops.from_public(torch.ones((), dtype=torch.float64))
    return ops.sum_of_products([(low, one), (q1, t4), (q2, t8)])
