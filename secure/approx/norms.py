"""LayerNorm and RMSNorm over the last dimension (PUMA sec. 4.5, DESIGN.md sec. 4).

``gamma`` and ``beta`` are secret values of the backend's type (model weights are secret),
broadcasting against x (usually shape ``[n]``), or None.
"""

from __future__ import annotations

import math

from secure.approx.interface import SecureOps, T
from secure.approx.reciprocal import mul_rsqrt, mul_rsqrt_bounded

LAYER_NORM_EPS: float = 1e-12
"""BERT's LayerNorm eps. Under fixed point with f = 18 it encodes as 0: a constant row
(variance exactly 0) would then reach ``frexp`` with 0; real activations never do."""

RMS_NORM_EPS: float = 1e-6
"""LLaMA's RMSNorm eps."""


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
    (biased, as torch); ``y = sqrt(n) (d * gamma) * rsqrt(S + n eps)`` with
    :func:`mul_rsqrt` (a cubic per half octave of frexp's mantissa, and ``newton_iterations``
    Newton steps on it; ``sqrt(n)`` rides in the exponent factor's table), ``+ beta``.
    Taking the root of the sum rather than of the mean leaves no division to truncate.
    ``d * gamma`` is formed in the same pass as ``d * d``, and its product with the
    exponent factor in frexp's own product pass, so the whole norm costs 4 product passes.

    Measured on FloatOps (float64, rows of 384 values ~ N(0, 2^2) with outliers of 20,
    random gamma ~ N(1, 0.1^2), beta ~ N(0, 0.1^2)): relative error of the normalised
    part ``(y - beta)`` 3.3e-5 max elementwise (0 Newton steps), 1.6e-9 (1 step);
    max abs error / max |y| 3.2e-5 (0 steps), 1.6e-9 (1 step). (SPU's quartic seed, one
    product pass more: 8.0e-5 and 6.9e-5.)

    Cost: 1 ``mul_public`` (mean), 1 ``frexp_segments``, ``4 + 2 * newton_iterations``
    product calls (1 with ``d``, 3 in ``mul_rsqrt``); under MPC 2 + 2 + 10 + 4 + 2 = 20
    rounds with the mean's truncation (22 with SPU's seed; 31 before frexp compared
    against thresholds and the variance's division went).

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
    if gamma is None:
        dd = ops.mul(d, d)
        num = d
    else:
        dd, num = ops.mul_many([(d, d), (d, gamma)])
    total = ops.sum(dd, dim=-1, keepdim=True)
    if variance_range is not None:
        var_eps = ops.dot_public([total], [1.0 / n], bias=eps)
        lo, hi = variance_range
        if check:
            ops.check_range(var_eps, lo, hi, "LayerNorm variance + eps")
        y = mul_rsqrt_bounded(ops, num, var_eps, lo, hi, check=False)
    else:
        y = mul_rsqrt(ops, num, ops.add_public(total, n * eps), newton_iterations=newton_iterations,
                      gain=math.sqrt(n))
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

    Math: ``S = sum(x^2)``, ``y = sqrt(n) (x * gamma) * rsqrt(S + n eps)`` (the mean
    square's ``1/sqrt(S/n + eps)`` with ``sqrt(n)`` in the exponent factor's table, so no
    division is truncated), with ``x * gamma`` formed in the same pass as ``x * x``.

    Measured on FloatOps (float64, rows of 384 values ~ N(0, 2^2) with outliers, random
    gamma): max elementwise relative error 3.2e-5 (0 Newton steps), 1.5e-9 (1 step).

    Cost: 1 ``frexp_segments``, ``4 + 2 * newton_iterations`` product calls (under MPC
    2 + 10 + 4 + 2 = 18 rounds).
    """
    n = ops.shape(x)[-1]
    if gamma is None:
        xx = ops.mul(x, x)
        num = x
    else:
        xx, num = ops.mul_many([(x, x), (x, gamma)])
    total = ops.add_public(ops.sum(xx, dim=-1, keepdim=True), n * eps)
    return mul_rsqrt(ops, num, total, newton_iterations=newton_iterations, gain=math.sqrt(n))
