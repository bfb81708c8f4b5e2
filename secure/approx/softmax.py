"""Softmax forms: PUMA's clipped-exp softmax and Power-Softmax (DESIGN.md sec. 4)."""

from __future__ import annotations

import torch

from secure.approx.exp import EXP_CLIP, clipped_exp, poly_exp
from secure.approx.interface import Public, SecureOps, T, concurrently
from secure.approx.reciprocal import bounded_reciprocal_start, divide, divide_bounded, reciprocal

MASK_BIAS_FLOOR: float = -1.0e4
"""Additive mask biases are clamped to >= this value (public operation). HF models use
``finfo(float32).min`` = -3.4e38, which no 64-bit ring with f = 18 holds (|v| < 2^45 =
3.5e13). -1e4 is far below the -14 clip after the row max is subtracted, and
1e4 * 2^18 = 2.6e9 keeps probabilistic truncation failures negligible (~2^-32)."""

SOFTMAX_EPS: float = 1e-6
"""PUMA subtracts the row max and eps, so every exp input is < 0 (DESIGN.md sec. 4)."""

POWER_SOFTMAX_EPS: float = 1e-6
"""Default eps of Power-Softmax. DESIGN.md does not state the paper's value; 1e-6 is our
choice: it only keeps an all-zero (fully masked) row finite, it does not affect rows whose
mean x^p lies in the reciprocal's accuracy range."""


def _check_last_dim(ops: SecureOps[T], x: T, dim: int) -> int:
    ndim = len(ops.shape(x))
    if dim not in (-1, ndim - 1):
        raise ValueError(
            f"secure softmax only works over the last dimension (dim=-1), got dim={dim}; "
            "secret values cannot be transposed through SecureOps"
        )
    return ops.shape(x)[-1]


def puma_softmax(
    ops: SecureOps[T],
    x: T,
    dim: int = -1,
    t: int = 6,
    mask_bias: Public | None = None,
    *,
    eps: float = SOFTMAX_EPS,
    reciprocal_iterations: int = 2,
    clip: float = EXP_CLIP,
    exp_order: int = 3,
    exp_form: str = "limit",
    scale: float = 1.0,
    division: str = "goldschmidt",
    values: T | None = None,
    magnitude: float | None = None,
) -> T:
    """PUMA's softmax over the last dimension (PUMA sec. 4.3), by default with our
    third-order exp base and t = 6 (``t=8, exp_order=1`` is PUMA's form exactly).
    With ``values``: ``softmax(x) @ values`` (attention's context), normalised after the
    product, see below.

    Math, per row: ``z = x + clamp(mask_bias, -1e4) - max_j(x + bias) - eps`` (z < 0);
    ``e = clipped_exp(z, t, clip)`` = 0 for z < -14 else ``(1 + z/2^t)^(2^t)``;
    ``out = e * reciprocal(sum_j e)`` (one Goldschmidt reciprocal per row, broadcast by one
    product). Masked entries (bias <= -1e4) come out exactly 0.

    ``mask_bias`` is a public additive bias broadcasting against x (0 where attended, a
    large negative value where masked, as HF builds it). ``reciprocal_iterations`` = 2
    gives relative error 5.4e-5 on the row sum, well under the exp error.

    ``scale`` > 0: the softmax of ``scale * x`` (attention's 1/sqrt(d)), the factor folded
    into the exp's first public coefficient and into the public clip and bias, so it costs
    no truncation of its own (the mask bias is that of the scaled scores).

    ``exp_form="poly"`` (ours, :func:`secure.approx.exp.poly_exp`) replaces the limit form
    by a degree-15 polynomial in blocks: 10 rounds instead of 21 (t = 6, order 3) and
    about 30% fewer bytes, max abs exp error 4.4e-7 on floats, 3.5e-5 on shares; ``t`` and
    ``exp_order`` then do not apply.

    ``division="piecewise"`` (ours) divides by the row sum with
    :func:`~secure.approx.reciprocal.divide` (a quadratic per eighth of an octave of frexp's
    mantissa, ``e * 2^-e`` formed in frexp's own product pass): 14 rounds where the
    Goldschmidt reciprocal and the product with e took 18, relative error 2.1e-5 instead of
    5.4e-5; ``reciprocal_iterations`` then does not apply.

    ``magnitude``: a bound on |x| (the scores before ``mask_bias``) that the structure
    guarantees (:mod:`secure.graph.bounds`). With it the row maximum reads the scores at
    32 bits (:meth:`SecureOps.max_and_below`: one round fewer per tournament level, 35%
    fewer bytes per comparison), and may fall short of the exact maximum by its tolerance
    (at most 2^-10 per level; 1.2e-4 per level for a MiniLM query), so the largest ``z``
    may exceed 0 by that much: the exp's forms hold there (``t`` of :func:`poly_exp` at most
    1 + 1e-3, seven levels at the largest tolerance and scale 1; 1 + 1e-5 for MiniLM).

    ``values`` (attention): ``(e @ values) * (1 / sum_j e)``, the same values (the reciprocal
    is one per row), where the product with the values no longer waits for the reciprocal.
    Under MPC ``e @ values`` runs concurrently with the reciprocal's comparison pass
    (``division="piecewise"``: it is :func:`~secure.approx.reciprocal.divide`'s numerator, scaled
    in frexp's product pass; 14 rounds for the division and the product with the values,
    where the division, then the product, took 16) or with the whole Goldschmidt reciprocal
    (PUMA's: 2 rounds fewer). The last product then runs on ``[..., n, d]`` instead of
    ``[..., n, n]``: fewer bytes wherever the head dimension d is below the key count n.

    ``exp_order`` > 1 (our extension, see :func:`clipped_exp`) uses the base
    ``sum_{k<=order} y^k / k!``. Under MPC a rounding error in the base is raised to the
    power 2^t, so a smaller t with a better base wins twice. Measured on three-party
    shares (f = 18, scores ~ N(0, 3^2), shape (12, 128, 128)), max abs error and rounds:
    PUMA t=8/order 1: 8.2e-3, 114 rounds; t=8/order 2: 3.6e-4, 117; t=7/order 2: 2.8e-4,
    115; t=6/order 3 (default): 9.2e-5, 115; t=5/order 3: 1.9e-4, 113.

    Measured on FloatOps (float64, scores ~ N(0, 3^2), shape (2, 12, 32, 32), HF padding
    bias), max abs error vs torch.softmax: PUMA (exp_order 1): 4.1e-2 (t = 5),
    2.1e-2 (t = 6), 5.1e-3 (t = 8); exp_order 2: 2.1e-3 (t = 5), 4.9e-4 (t = 6),
    3.6e-5 (t = 8). Masked entries exactly 0. (PUMA's t = 8 gives 5-6e-3 for any score
    scale from N(0, 1) to N(0, 4^2) at 32 keys, not the 1e-3 DESIGN.md quotes.)

    Cost: 1 ``max_and_below`` (log4(n) comparison passes, the clip's bits in the last),
    1 ``dot_public``,
    ``t + 1`` ``mul`` (exp), 1 ``frexp``, ``reciprocal_iterations + 1`` product calls
    (reciprocal), 1 ``mul`` (broadcast); ``exp_order - 1`` more ``mul``.
    """
    _check_last_dim(ops, x, dim)
    if exp_form not in ("limit", "poly"):
        raise ValueError(f"exp_form must be 'limit' (PUMA) or 'poly', got {exp_form!r}")
    if division not in ("goldschmidt", "piecewise"):
        raise ValueError(f"division must be 'goldschmidt' (PUMA) or 'piecewise', got {division!r}")
    if not scale > 0.0:
        raise ValueError(f"softmax scale must be > 0, got {scale}")
    if mask_bias is not None:
        if isinstance(mask_bias, torch.Tensor):
            if mask_bias.dtype == torch.bool:
                raise TypeError("mask_bias must be an additive float bias, not a boolean mask")
            bias: Public = mask_bias.clamp(min=MASK_BIAS_FLOOR)
        else:
            bias = max(float(mask_bias), MASK_BIAS_FLOOR)
        x = ops.add_public(x, bias / scale if scale != 1.0 else bias)
        if magnitude is not None:
            magnitude += float(torch.as_tensor(bias).abs().max()) / scale
    # scale z < clip iff x - max < (clip + eps) / scale: the clip's bits come with the maximum
    row_max, below = ops.max_and_below(x, (clip + eps) / scale, magnitude=magnitude)
    z = ops.add_public(ops.sub(x, row_max), -eps / scale)
    if exp_form == "poly":
        e = poly_exp(ops, z, below, clip, x_scale=scale)
    else:
        e = clipped_exp(ops, z, t=t, clip=clip, order=exp_order, below=below, x_scale=scale)
    total = ops.sum(e, dim=-1, keepdim=True)
    # every exp is at most 1 and the row's maximum gives exp(-eps) ~ 1, so the sum lies in
    # [1, n] up to the exp's error: a range the structure guarantees, where frexp needs
    # only a few comparisons
    bounds = (0.5, 2.0 * ops.shape(x)[-1])
    if values is None:
        if division == "piecewise":
            return divide(ops, e, total, bounds=bounds)
        return ops.mul(e, reciprocal(ops, total, iterations=reciprocal_iterations, bounds=bounds))
    if division == "piecewise":
        return divide(ops, lambda: ops.matmul(e, values), total, bounds=bounds)
    weighted, inv = concurrently(ops, lambda: ops.matmul(e, values),
                                 lambda: reciprocal(ops, total, iterations=reciprocal_iterations, bounds=bounds))
    return ops.mul(weighted, inv)


def even_power(ops: SecureOps[T], x: T, p: int) -> T:
    """x^p for an even p >= 2: ``x^2`` then square-and-multiply on it, the square and the
    multiply of one step batched in one ``mul_many``. Exact (no approximation).

    Product calls: ceil(log2(p)), the minimum depth (p = 2: 1, 4: 2, 6: 3, 8: 3, 12: 4).
    """
    if p < 2 or p % 2:
        raise ValueError(f"p must be an even integer >= 2, got {p}")
    base = ops.mul(x, x)
    q = p // 2
    acc: T | None = None
    while True:
        take = q & 1
        q >>= 1
        pairs: list[tuple[T, T]] = []
        mult_at: int | None = None
        if take:
            if acc is None:
                acc = base
            else:
                mult_at = len(pairs)
                pairs.append((acc, base))
        if q:
            pairs.append((base, base))
        if pairs:
            out = ops.mul_many(pairs) if len(pairs) > 1 else [ops.mul(*pairs[0])]
            if mult_at is not None:
                acc = out[mult_at]
            if q:
                base = out[-1]
        if not q:
            break
    assert acc is not None
    return acc


def power_softmax(
    ops: SecureOps[T],
    x: T,
    p: int = 4,
    eps: float = POWER_SOFTMAX_EPS,
    mask: Public | None = None,
    upper: float = 1.0e3,
    iterations: int = 10,
    *,
    lower: float | None = None,
    dim: int = -1,
    normalize: bool = False,
    check: bool = True,
) -> T:
    """Power-Softmax (Zimerman et al. 2024) over the last dimension, no comparison at all.

    Math, per row (DESIGN.md sec. 4): ``PS(x)_j = m_j x_j^p / (eps + (1/L) sum_i m_i x_i^p)``
    with ``m`` the public 0/1 ``mask`` (1 = attend; broadcasting against x; all ones if None)
    and ``L = sum_i m_i`` the number of attended entries of the row (``L = n`` without a
    mask; a fully masked row gives all zeros). Note the rows sum to about L, not 1, as in
    the formula DESIGN.md quotes; ``normalize=True`` divides by L so that rows sum to 1,
    the form the distilled models are trained with (``secure.distill``): with rows
    summing to L the attention output grows with the sentence length, which no weight can
    undo (distillation reaches cosine 0.33 that way, 0.98 normalised).

    The division is :func:`secure.approx.reciprocal.divide_bounded` with the public bound
    ``upper`` on the denominator ``eps + mean(x^p)``: relative error <= 1e-3 for
    denominators in ``[lower, upper]``, by default ``lower = 0.00337 upper`` with
    10 iterations (``lower = 3.37`` for ``upper = 1e3``); smaller denominators give an
    underestimate, denominators above ``upper (1 + lower/upper)`` diverge, so calibrate
    ``upper`` on the (distilled) model's attention scores.

    Range (:func:`power_softmax_range`): the denominator is ``eps + mean(m x^p) >= eps``
    (p even), so the lower end is guaranteed by construction when ``eps >= lower`` (up to
    one fixed-point ulp); the upper end never is (it grows with the scores). With
    ``check=True`` (the default) the denominator is checked before the division
    (``ops.check_range``, :class:`~secure.approx.interface.RangeError` outside): its upper
    end always, its lower end only when not guaranteed (fully masked rows, whose
    denominator is exactly eps and whose numerator is exactly 0, are exempt). Under MPC
    that is 9 rounds per call (one comparison pass, one opened count) whichever ends are
    checked, on one value per row; a no-op under CKKS (see :class:`secure.he.ops.HeOps`).
    Guaranteeing the lower end instead costs iterations: ``lower ~ 3.45 upper / 2^k``, so
    eps = 1e-6 under upper = 1e3 needs about 32 (64 rounds). ``check=False`` is for cost
    measurements and for callers that have bounded the scores themselves.

    Measured on FloatOps (float64, scores ~ N(0, 2^2), shape (2, 4, 16, 16), all
    denominators inside [lower, upper]), max relative error vs the exact formula:
    p = 4, upper = 400, 10 iterations: 2.3e-5 (no mask), 3.2e-4 (padding mask);
    p = 6, upper = 1e4, 12 iterations: 3.5e-4; the bound is 1e-3 anywhere in range.
    Masked entries exactly 0.

    Cost: ``even_power`` (2 product calls for p = 4), 1 ``mul_public`` by the mask
    (integral: free under MPC), 1 ``mul_public`` / ``dot_public`` for the mean,
    ``iterations`` product calls, and the ``check_range`` (above). No ``max``,
    ``less_than_public`` or ``frexp``.
    """
    n = _check_last_dim(ops, x, dim)
    checked_lower, _ = power_softmax_range(eps, upper, iterations, lower)
    xp = even_power(ops, x, p)
    if mask is None:
        total = ops.sum(xp, dim=-1, keepdim=True)
        denom = ops.dot_public([total], [1.0 / n], bias=eps)
    else:
        m = torch.as_tensor(mask, dtype=torch.float64)
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (1 = attend)")
        xp = ops.mul_public(xp, m)
        counts = torch.broadcast_to(m, ops.shape(x)).sum(dim=-1, keepdim=True)
        inv_len = 1.0 / counts.clamp(min=1.0)
        total = ops.sum(xp, dim=-1, keepdim=True)
        denom = ops.add_public(ops.mul_public(total, inv_len), eps)
    if check:
        seen = denom
        if checked_lower is not None and mask is not None and bool((counts == 0).any()):
            # a fully masked row: denominator exactly eps, numerator exactly 0, answer 0
            seen = ops.add_public(denom, (counts == 0).to(torch.float64) * checked_lower)
        ops.check_range(seen, checked_lower, upper, f"Power-Softmax denominator eps + mean(x^{p})")
    if normalize:  # the public 1/L per row, applied to the numerator
        xp = ops.mul_public(xp, 1.0 / n if mask is None else inv_len)
    return divide_bounded(ops, xp, denom, upper, iterations, lower=lower, check=False)


def power_softmax_range(
    eps: float, upper: float, iterations: int, lower: float | None = None
) -> tuple[float | None, float]:
    """Public helper: ``(lower end to check or None, upper)`` of Power-Softmax's denominator.

    The division (:func:`divide_bounded`) is accurate on ``[lower, upper]`` (``lower`` from
    :func:`bounded_reciprocal_start` when None). The denominator ``eps + mean(m x^p)`` is at
    least eps, so the lower end needs no check when ``eps >= lower`` (returned as None);
    the upper end always does. Raises ValueError for an ``eps`` above ``upper``: every
    denominator would be out of range.
    """
    if eps < 0.0:
        raise ValueError(f"Power-Softmax eps must be >= 0, got {eps}")
    _, lo, _ = bounded_reciprocal_start(upper, iterations, lower)
    if eps > upper:
        raise ValueError(f"Power-Softmax eps = {eps:g} is above upper = {upper:g}: every denominator "
                         "(>= eps) would be outside the division's range")
    return (None if eps >= lo else lo), upper
