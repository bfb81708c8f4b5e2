"""LayerNorm and RMSNorm over the last dimension (PUMA sec. 4.5, DESIGN.md sec. 4).

``gamma`` and ``beta`` are secret values of the backend's type (model weights are secret),
broadcasting against x (usually shape ``[n]``), or None.
"""

from __future__ import annotations

import math

from secure.approx.interface import SecureOps, T, concurrently
from secure.approx.reciprocal import mul_rsqrt, mul_rsqrt_bounded

LAYER_NORM_EPS: float = 1e-12
"""BERT's LayerNorm eps. Under fixed point with f = 18 it encodes as 0; the secure form adds
:data:`SQUARES_FLOOR` instead, so a constant row (variance exactly 0) gives beta."""

RMS_NORM_EPS: float = 1e-6
"""LLaMA's RMSNorm eps."""

SQUARES_FLOOR: float = 2.0**-17
"""The least value the comparison-based norms add to their sum of squares S (``max(n eps,
floor)``). S is summed before its one truncation, so it is within an ulp (2^-f, at most the
floor for f >= 17) of the exact sum of the squares of the values normalised: ``S + floor >=
sum_j d_j^2``, and the normalised row keeps ``sum_j u_j^2 <= n`` for every input, which
bounds what a linear layer of it can reach (:mod:`secure.graph.bounds`). BERT's eps
(n eps = 4e-10 at n = 384) is below it; the output of a row with variance v moves by
``floor / (2 n v)`` relatively, 2e-8 at v = 1 (LLaMA's n eps is above it: no change)."""


def _squares_and_numerator(ops: SecureOps[T], d: T, gamma: T | None) -> tuple[T, T]:
    """``S = sum_j d_j^2`` per row (summed before its one truncation) and ``d * gamma``
    (or d), in one pass of rounds."""
    def squares() -> T:
        return ops.sum_of_products([(d, d)], dim=-1)

    if gamma is None:
        return squares(), d
    total, num = concurrently(ops, squares, lambda: ops.mul(d, gamma))
    return total, num


def layer_norm(
    ops: SecureOps[T],
    x: T,
    gamma: T | None = None,
    beta: T | None = None,
    eps: float = LAYER_NORM_EPS,
    newton_iterations: int = 0,
    variance_range: tuple[float, float] | None = None,
    *,
    check: bool = True,
) -> T:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    Math: ``mean = sum(x) / n``; ``d = x - mean``; ``S = sum(d^2)``, so ``var = S / n``
    (biased, as torch); ``y = sqrt(n) (d * gamma) * rsqrt(S + max(n eps, SQUARES_FLOOR))`` with
    :func:`mul_rsqrt` (a quadratic per sixth of an octave of frexp's mantissa, or with
    ``newton_iterations`` Newton steps a cubic per half octave refined; ``sqrt(n)`` rides in
    the exponent factor's table), ``+ beta``.
    Taking the root of the sum rather than of the mean leaves no division to truncate.
    ``d * gamma`` is formed in the same pass as S (summed per row before its one
    truncation), and its product with the exponent factor in frexp's own product pass, so
    the whole norm costs 3 product passes besides the mean's and frexp's.

    Measured on FloatOps (float64, rows of 384 values ~ N(0, 2^2) with outliers of 20,
    random gamma ~ N(1, 0.1^2), beta ~ N(0, 0.1^2)): relative error of the normalised
    part ``(y - beta)`` 1.5e-5 max elementwise (0 Newton steps; 3.3e-5 with the cubic it
    replaced), 1.6e-9 (1 step). On three parties (32 such rows, one of them with variance
    4e-4, one with 2500, one offset by 30): max abs error 3.5e-4 (5.9e-4 before the
    quadratic and the sum of squares truncated once), 1389 kB sent per party (1135 before:
    the quadratic's six pieces an octave triple the comparisons), 88 ms in process (69).
    (SPU's quartic seed, one product pass more: 8.0e-5 relative.)

    Cost: 1 ``mul_public`` (mean), 1 ``frexp_segments``, 3 product passes (S with
    ``d * gamma``, 2 in ``mul_rsqrt``; ``4 + 2 * newton_iterations`` with Newton steps);
    under MPC 2 + 2 + 10 + 2 + 2 = 18 rounds with the mean's truncation (20 with the
    cubic, 22 with SPU's seed; 31 before frexp compared against thresholds and the
    variance's division went).

    With ``variance_range = (lower, upper)`` (calibrated bounds of ``var + eps``) the
    denominator is :func:`mul_rsqrt_bounded` instead: no comparison, the HE form. Its
    accuracy holds on that range only and nothing guarantees it (the variance is data), so
    ``check=True`` (the default) checks ``var + eps`` against it first
    (``ops.check_range``: RangeError outside it; under MPC 9 rounds on one value per row;
    a no-op under CKKS). Without ``variance_range`` there is nothing to check.
    """
    n = ops.shape(x)[-1]
    mean = ops.mul_public(ops.sum(x, dim=-1, keepdim=True), 1.0 / n)
    d = ops.sub(x, mean)
    if variance_range is not None:
        if gamma is None:
            dd, num = ops.mul(d, d), d
        else:
            dd, num = ops.mul_many([(d, d), (d, gamma)])
        var_eps = ops.dot_public([ops.sum(dd, dim=-1, keepdim=True)], [1.0 / n], bias=eps)
        lo, hi = variance_range
        if check:
            ops.check_range(var_eps, lo, hi, "LayerNorm variance + eps")
        y = mul_rsqrt_bounded(ops, num, var_eps, lo, hi, check=False)
    else:
        total, num = _squares_and_numerator(ops, d, gamma)
        y = mul_rsqrt(ops, num, ops.add_public(total, max(n * eps, SQUARES_FLOOR)),
                      newton_iterations=newton_iterations, gain=math.sqrt(n))
    if beta is not None:
        y = ops.add(y, beta)
    return y


def rms_norm(
    ops: SecureOps[T],
    x: T,
    gamma: T | None = None,
    eps: float = RMS_NORM_EPS,
    newton_iterations: int = 0,
) -> T:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * gamma``.

    Math: ``S = sum(x^2)``, ``y = sqrt(n) (x * gamma) * rsqrt(S + max(n eps, SQUARES_FLOOR))``
    (the mean square's ``1/sqrt(S/n + eps)`` with ``sqrt(n)`` in the exponent factor's
    table, so no division is truncated), with ``x * gamma`` formed in the same pass as S.

    Measured on FloatOps (float64, rows of 384 values ~ N(0, 2^2) with outliers, random
    gamma): max elementwise relative error 1.5e-5 (0 Newton steps), 1.5e-9 (1 step).

    Cost: 1 ``frexp_segments``, 3 product passes (under MPC 2 + 10 + 2 + 2 = 16 rounds).
    """
    n = ops.shape(x)[-1]
    total, num = _squares_and_numerator(ops, x, gamma)
    return mul_rsqrt(ops, num, ops.add_public(total, max(n * eps, SQUARES_FLOOR)),
                     newton_iterations=newton_iterations, gain=math.sqrt(n))
