"""LayerNorm and RMSNorm over the last dimension (PUMA sec. 4.5, DESIGN.md sec. 4).

``gamma`` and ``beta`` are secret values of the backend's type (model weights are secret),
broadcasting against x (usually shape ``[n]``), or None.
"""

from __future__ import annotations

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

    Math: ``mean = sum(x) / n``; ``d = x - mean``; ``var = sum(d^2) / n`` (biased, as
    torch); ``y = (d * gamma) * rsqrt(var + eps)`` with :func:`mul_rsqrt` (SPU's seed, and
    ``newton_iterations`` Newton steps on the mantissa), ``+ beta``. ``d * gamma`` is formed
    in the same pass as ``d * d``, and the exponent factor of the rsqrt in the same pass as
    ``m^2``, so the whole norm costs 4 product passes.

    Measured on FloatOps (float64, rows of 384 values ~ N(0, 2^2) with outliers of 20,
    random gamma ~ N(1, 0.1^2), beta ~ N(0, 0.1^2)): relative error of the normalised
    part ``(y - beta)`` 8.0e-5 max elementwise (0 Newton steps), 9.5e-9 (1 step);
    max abs error / max |y| 6.9e-5 (0 steps), 8.1e-9 (1 step).

    Cost: 2 ``mul_public``/``dot_public`` (mean, variance + eps), 1 ``frexp``,
    ``4 + 2 * newton_iterations`` product calls (1 with ``d``, 3 in ``mul_rsqrt``).

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
    var_eps = ops.dot_public([ops.sum(dd, dim=-1, keepdim=True)], [1.0 / n], bias=eps)
    if variance_range is not None:
        lo, hi = variance_range
        if check:
            ops.check_range(var_eps, lo, hi, "LayerNorm variance + eps")
        y = mul_rsqrt_bounded(ops, num, var_eps, lo, hi, check=False)
    else:
        y = mul_rsqrt(ops, num, var_eps, newton_iterations=newton_iterations)
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

    Math: ``ms = sum(x^2) / n + eps`` (one ``dot_public``), ``y = (x * gamma) * rsqrt(ms)``
    with ``x * gamma`` formed in the same pass as ``x * x``.

    Measured on FloatOps (float64, rows of 384 values ~ N(0, 2^2) with outliers, random
    gamma): max elementwise relative error 8.1e-5 (0 Newton steps), 9.7e-9 (1 step).

    Cost: 1 ``dot_public``, 1 ``frexp``, ``4 + 2 * newton_iterations`` product calls.
    """
    n = ops.shape(x)[-1]
    if gamma is None:
        xx = ops.mul(x, x)
        num = x
    else:
        xx, num = ops.mul_many([(x, x), (x, gamma)])
    ms = ops.dot_public([ops.sum(xx, dim=-1, keepdim=True)], [1.0 / n], bias=eps)
    return mul_rsqrt(ops, num, ms, newton_iterations=newton_iterations)
