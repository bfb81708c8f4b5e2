"""GeLU and SiLU forms: PUMA's piecewise polynomials, the even forms, the HE polynomial.

**PUMA's forms** (:func:`puma_gelu`, :func:`puma_silu`) share one shape: ``0`` left of
``b0``, a low-degree polynomial ``A`` on ``[b0, b1)``, an even-plus-linear degree-6
polynomial ``B`` on ``[b1, b2)``, the identity from ``b2`` on. A call costs:

* one ``less_than_public`` call with the three breakpoints (one comparison pass),
* three product passes for the powers: ``x^2``; ``(x^3, x^4)``; ``x^6 = x^4 * x^2``,
* two ``dot_public`` calls for ``A`` and ``B``, left untruncated,
* one ``sum_of_products`` of the three 0/1 indicators with ``(A, B, x)``: under MPC one
  reshare with one fused truncation for the whole sum (it replaced two truncations and
  three bit-product reshares: 60 instead of 160 bytes per element over the three parties,
  and 2 rounds instead of 5).

That is 3 product calls (``mul``, ``mul_many``, ``mul``), 1 ``sum_of_products``, 2
``dot_public`` and 1 comparison call; the comparisons do not depend on the powers, so they
run :func:`~secure.approx.interface.concurrently` with them. Under MPC with the default
exact truncation: the comparison pass (8 rounds) overlaps the three power steps (2 rounds
each), then 2 for the sum: 10 rounds (16 one after the other) and 606 bytes per element
over the three parties (306 of them for the three comparisons). With a ``magnitude``
bound on |x| the structure guarantees (:mod:`secure.graph.bounds`) the comparisons read
32 bits: 9 rounds and 498 bytes.
Coefficients: PUMA (Dong et al. 2023), sec. 4.2, as quoted in ``shared/DESIGN.md`` sec. 4.

**The even forms** (:func:`even_gelu`, :func:`even_silu`, the ``ours`` recipe): two
comparisons instead of three, under a seventh of PUMA's GeLU error, 32% fewer bytes, 9
rounds (8 with a bounded input); see :func:`even_activation`.

**The HE form** (:func:`poly_gelu`): one polynomial on a calibrated range, no comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch

from secure.approx.interface import SecureOps, T, concurrently

# ---- PUMA GeLU (PUMA sec. 4.2; DESIGN.md sec. 4) ----------------------------------------
PUMA_GELU_BREAKS: tuple[float, float, float] = (-4.0, -1.95, 3.0)
"""0 for x < -4; F0 on [-4, -1.95); F1 on [-1.95, 3); x for x >= 3."""

PUMA_GELU_F0: tuple[float, ...] = (
    -0.5054031199708174,
    -0.42226581151983866,
    -0.11807612951181953,
    -0.011034134030615728,
)
"""F0 coefficients of x^0 .. x^3 (ascending degree)."""

PUMA_GELU_F1: tuple[float, ...] = (
    0.008526321541038084,
    0.5,
    0.3603292692789629,
    0.0,
    -0.037688200365904236,
    0.0,
    0.0018067462606141187,
)
"""F1 coefficients of x^0 .. x^6 (ascending degree; odd part is 0.5 x only)."""

# ---- SiLU for LLaMA-style models (DESIGN.md sec. 4) --------------------------------------
SILU_BREAKS: tuple[float, float, float] = (-8.0, -4.0, 4.0)
"""0 for x < -8; Q on [-8, -4); P on [-4, 4); x for x >= 4."""

SILU_Q: tuple[float, ...] = (-0.3067541139982155, -0.0819767021525476, -0.0055465625580307)
"""Quadratic on [-8, -4): coefficients of x^0 .. x^2."""

SILU_P: tuple[float, ...] = (
    0.0085064025895951,
    0.5,
    0.2281430841728270,
    0.0,
    -0.011113046708173,
    0.0,
    0.0002743776353465,
)
"""Degree-6 even part plus 0.5 x on [-4, 4): coefficients of x^0 .. x^6."""


def _poly(ops: SecureOps[T], powers: dict[int, T], coeffs: Sequence[float], truncate: bool = True) -> T:
    """sum_k coeffs[k] x^k with the powers given (k >= 1), one ``dot_public``."""
    terms: list[T] = []
    weights: list[float] = []
    for k, c in enumerate(coeffs):
        if k == 0 or c == 0.0:
            continue
        terms.append(powers[k])
        weights.append(c)
    return ops.dot_public(terms, weights, bias=coeffs[0], truncate=truncate)


def _zero_poly_poly_identity(
    ops: SecureOps[T],
    x: T,
    breaks: Sequence[float],
    left: Sequence[float],
    middle: Sequence[float],
    magnitude: float | None = None,
) -> T:
    """0 | left(x) | middle(x) | x on (-inf,b0) | [b0,b1) | [b1,b2) | [b2,inf).

    ``left`` has degree <= 3, ``middle`` degree <= 6 with no x^5 term: the powers computed
    here are x, x^2, x^3, x^4 and x^6. ``magnitude``: a bound on |x| the structure
    guarantees, for the comparisons (:meth:`SecureOps.less_than_public`).
    """
    if len(breaks) != 3:
        raise ValueError(f"expected three breakpoints, got {len(breaks)}")
    if len(left) > 4 or len(middle) > 7 or (len(middle) > 5 and middle[5] != 0.0):
        raise ValueError("left must have degree <= 3 and middle use only x, x^2, x^3, x^4, x^6")
    def pieces() -> tuple[T, T]:
        # Powers by squaring: three product passes. Both polynomials stay untruncated
        # (scale 2f + k under fixed point): the three indicator products are summed before
        # one reshare with one fused truncation. For |x| beyond the breakpoints the powers
        # may overflow the ring; their indicators are 0 there, so the garbage never shows.
        x2 = ops.mul(x, x)
        x3, x4 = ops.mul_many([(x2, x), (x2, x2)])
        x6 = ops.mul(x4, x2)
        powers = {1: x, 2: x2, 3: x3, 4: x4, 6: x6}
        return _poly(ops, powers, left, truncate=False), _poly(ops, powers, middle, truncate=False)

    # One comparison pass for all three thresholds (b_k = 1{x < breaks[k]}), overlapped
    # with the powers: neither reads the other.
    bits, (f_left, f_middle) = concurrently(ops, lambda: ops.less_than_public(x, list(breaks), magnitude=magnitude),
                                            pieces)
    b0, b1, b2 = bits
    # Indicators as differences of bits (still exactly 0/1): free.
    ind_left = ops.sub(b1, b0)  # b0 <= x < b1
    ind_middle = ops.sub(b2, b1)  # b1 <= x < b2
    above = ops.add_public(ops.neg(b2), 1.0)  # x >= b2
    return ops.sum_of_products([(ind_left, f_left), (ind_middle, f_middle), (above, x)])


def puma_gelu(ops: SecureOps[T], x: T, magnitude: float | None = None) -> T:
    """PUMA's piecewise GeLU (PUMA sec. 4.2).

    Computes::

        0                                   x < -4
        F0(x) = sum_k PUMA_GELU_F0[k] x^k   -4 <= x < -1.95
        F1(x) = sum_k PUMA_GELU_F1[k] x^k   -1.95 <= x < 3
        x                                   x >= 3

    (at x = 3 itself the identity is used: it is closer to GeLU(3) than F1(3) = 3.016).

    Cost: 1 ``less_than_public`` (3 thresholds), 3 product calls (``mul``, ``mul_many``,
    ``mul``), 2 ``dot_public`` (left untruncated), 1 ``sum_of_products`` (the 0/1 indicators
    times the pieces, one truncation).

    Measured on FloatOps (float64, 2.4M points on [-12, 12]): max abs error vs exact
    (erf) GeLU 0.01991, approached as x -> 3 from below (F1(3) = 3.016 vs GeLU(3) = 2.996);
    by piece: 1.3e-4 (x < -4), 7.5e-4 (F0), 0.0199 (F1), 4.0e-3 (x >= 3).
    """
    return _zero_poly_poly_identity(ops, x, PUMA_GELU_BREAKS, PUMA_GELU_F0, PUMA_GELU_F1, magnitude)


def puma_silu(ops: SecureOps[T], x: T, magnitude: float | None = None) -> T:
    """Piecewise SiLU (x * sigmoid(x)) for LLaMA-style models (DESIGN.md sec. 4).

    Computes::

        0                               x < -8
        Q(x) = sum_k SILU_Q[k] x^k      -8 <= x < -4
        P(x) = sum_k SILU_P[k] x^k      -4 <= x < 4
        x                               x >= 4

    Same cost as :func:`puma_gelu`: 1 ``less_than_public`` (3 thresholds), 3 product calls,
    2 ``dot_public``, 1 ``sum_of_products``.

    Measured on FloatOps (float64, 2.4M points on [-12, 12]): max abs error 0.0719, just
    above x = 4, where the identity replaces SiLU(4) = 3.928 (SiLU(x) - x = -x/(1+e^x));
    by piece: 2.7e-3 (x < -8), 4.4e-3 (Q), 9.7e-3 (P), 0.0719 (x >= 4). The identity piece
    dominates: its error is 0.072 at 4, 0.034 at 5, 0.015 at 6.
    """
    return _zero_poly_poly_identity(ops, x, SILU_BREAKS, SILU_Q, SILU_P, magnitude)


# ---- the even forms: ReLU outside [-T, T], x/2 + an even polynomial inside -------------------
@dataclass(frozen=True)
class EvenForm:
    """An activation ``x/2 + E(x)`` whose part ``E`` is even and tends to ``|x|/2`` (GeLU:
    ``E = (x/2) erf(x/sqrt 2)``, SiLU: ``E = (x/2) tanh(x/2)``), approximated by ReLU(x)
    outside ``[-bound, bound]`` and by ``x/2 + sum_k chebyshev[k] T_k(v)``,
    ``v = 2 (x/bound)^2 - 1``, inside: degree 4 in ``x^2``, a minimax fit of ``E`` on
    ``[0, bound]`` (:func:`even_fit`). The Chebyshev basis keeps the coefficients below 2;
    :func:`even_steps` turns them into the constants the form multiplies by."""

    name: str
    bound: float
    chebyshev: tuple[float, ...]


@dataclass(frozen=True)
class EvenSteps:
    """How :func:`even_activation` evaluates an :class:`EvenForm` inside its bound:
    ``z = (kappa x)^2``, ``q = z (z + alpha)`` and
    ``E(x) ~ constant + linear z + q (sign q + gamma)`` with ``sign = +-1``.

    ``kappa`` scales ``x^2`` so that the ``z^4`` coefficient is ``+-1`` (z stays in
    ``[0, kappa^2 bound^2]``, 1.10 for GeLU, 1.49 for SiLU): the last product needs no
    public factor, so it is a plain product of two values at scale f."""

    kappa: float
    alpha: float
    gamma: float
    linear: float
    constant: float
    sign: float


@cache
def even_steps(bound: float, chebyshev: tuple[float, ...]) -> EvenSteps:
    """The constants of :class:`EvenSteps` for a degree-4 Chebyshev fit on ``[0, bound]``.

    With ``w = (x/bound)^2``, ``sum_k c_k T_k(2w - 1) = sum_k p_k w^k``; ``s = |p_4|^(1/4)``,
    ``z = s w`` and ``d_k = p_k / s^k``, so ``d_4 = sign``. Then
    ``q (sign q + gamma) = sign z^4 + 2 sign alpha z^3 + (sign alpha^2 + gamma) z^2 + gamma alpha z``
    matches ``d_4..d_2`` with ``alpha = sign d_3 / 2``, ``gamma = d_2 - sign alpha^2``; the rest
    is ``linear = d_1 - gamma alpha``, ``constant = d_0``."""
    import math

    import numpy as np

    if len(chebyshev) != 5 or bound <= 0:
        raise ValueError(f"need a degree-4 fit (5 coefficients) and bound > 0, got {len(chebyshev)}, {bound}")
    in_v = np.polynomial.chebyshev.cheb2poly(np.asarray(chebyshev, dtype=np.float64))
    p = np.polynomial.Polynomial(in_v)(np.polynomial.Polynomial([-1.0, 2.0])).coef  # in w
    if p[4] == 0.0:
        raise ValueError("the fit has no x^8 term")
    s = abs(float(p[4])) ** 0.25
    d = [float(p[k]) / s**k for k in range(5)]
    sign = math.copysign(1.0, d[4])
    alpha = sign * d[3] / 2
    gamma = d[2] - sign * alpha**2
    return EvenSteps(kappa=math.sqrt(s) / bound, alpha=alpha, gamma=gamma, linear=d[1] - gamma * alpha,
                     constant=d[0], sign=sign)


def even_fit(fn: Callable[..., object], bound: float, degree: int = 4, points: int = 8001,
             iterations: int = 2000) -> tuple[float, ...]:
    """Chebyshev coefficients ``c_k`` (in ``v = 2 (x/bound)^2 - 1``) of a minimax fit of the
    even function ``fn`` (numpy array in, array out) on ``[0, bound]``: Lawson's iteratively
    reweighted least squares on ``points`` evenly spaced points. How :data:`EVEN_GELU` and
    :data:`EVEN_SILU` were made (points 12001, iterations 4000)."""
    import numpy as np

    x = np.linspace(0.0, bound, points)
    return lawson_fit(2.0 * (x / bound) ** 2 - 1.0, np.asarray(fn(x), dtype=np.float64), degree, iterations)


def lawson_fit(v: object, target: object, degree: int, iterations: int) -> tuple[float, ...]:
    """Chebyshev coefficients ``c_k`` minimising ``max |sum_k c_k T_k(v) - target|`` over the
    sample points (numpy arrays ``v`` in [-1, 1] and ``target``): Lawson's iteratively
    reweighted least squares, each pass reweighting the points by their error."""
    import numpy as np

    basis = np.polynomial.chebyshev.chebvander(np.asarray(v, dtype=np.float64), degree)
    target = np.asarray(target, dtype=np.float64)
    weight = np.full(len(target), 1.0 / len(target))
    coeffs = np.zeros(degree + 1)
    for _ in range(iterations):
        root = np.sqrt(weight)
        coeffs = np.linalg.lstsq(basis * root[:, None], target * root, rcond=None)[0]
        weight = weight * np.abs(basis @ coeffs - target)
        weight = weight / weight.sum()
    return tuple(float(c) for c in coeffs)


EVEN_GELU = EvenForm("gelu", 3.15, (0.946557307978147, 0.7411225172837144, -0.14882901235099083,
                                    0.042537035234296985, -0.01151389456784995))
"""GeLU: ``E(x) = (x/2) erf(x/sqrt 2)`` fitted on [0, 3.15] (:func:`even_fit`, max error 2.555e-3),
where it meets the error of ReLU beyond 3.15 (``x Phi(-x)`` <= 2.572e-3)."""

EVEN_SILU = EvenForm("silu", 6.03, (1.8212141899063283, 1.3914743431737226, -0.2815818312478622,
                                    0.09436103383047567, -0.03936664026308231))
"""SiLU: ``E(x) = (x/2) tanh(x/2)`` fitted on [0, 6.03] (:func:`even_fit`, max error 0.01443),
where it meets the error of ReLU beyond 6.03 (``x / (1 + e^x)`` <= 0.01447)."""


def even_activation(ops: SecureOps[T], x: T, form: EvenForm, magnitude: float | None = None) -> T:
    """``ReLU(x)`` outside ``[-T, T]``, ``x/2 + P(x^2)`` inside (T = ``form.bound``).

    ``x/2 + E(x)`` with ``E`` even and ``E(x) - |x|/2 -> 0``: outside the bound the form is
    exactly ReLU, inside ``E`` is a degree-4 polynomial in ``x^2`` (:class:`EvenForm`). Steps:

    1. one ``less_than_public`` with the two thresholds ``-T, T`` (2 comparisons per element):
       ``below = 1{x < -T}``, ``inside = 1{x < T} - below``, ``above = 1 - 1{x < T}``;
    2. at the same time (:func:`~secure.approx.interface.concurrently`: neither reads the
       other), the polynomial on x unmasked: ``z = (kappa^2 x) x`` (the public factor
       untruncated, so it rides in the product's truncation), ``q = z (z + alpha)``, then
       one ``sum_of_products``
       ``inner = q (sign q + gamma) + linear z + x/2`` (+ ``constant``), one truncation;
    3. ``inside * inner + above * x``: products with 0/1 bits of values at scale f, so one
       ``sum_of_products`` with no truncation.

    For |x| beyond the bound the powers may overflow the fixed-point ring and ``inner`` is
    garbage, but ``inside`` is exactly 0 there, so it never reaches the result: the form is
    right for every encodable x. (It used to mask x by ``inside`` before the powers; the
    powers now overlap the comparisons instead of following them.) The ``+-1`` top
    coefficient leaves ``q (sign q + gamma)`` without a public factor (one there would hold
    it at scale 3f + k, where the probabilistic truncation fails once in a few hundred);
    ``linear`` and ``1/2`` ride in the same sum as public factors (trivial sharings).

    Cost: 1 comparison call (2 thresholds), 1 ``mul``, 1 ``dot_public`` (untruncated), 3
    ``sum_of_products``. Under MPC with exact truncation: the comparison pass (8 rounds)
    overlaps the three truncated steps of the polynomial (2 + 2 + 2), then 1 round for the
    bit products: 9 rounds (16 when the steps followed the comparisons) and
    2 * 102 + 64 + 60 + 60 + 24 = 412 bytes per element over the three parties (the first
    product, truncated by 2f + k bits, sends its top bit's share in 8 bytes, not 4; PUMA's
    form: 10 rounds, 606 bytes). With a ``magnitude`` (a bound on |x| the structure
    guarantees, :mod:`secure.graph.bounds`) the comparisons read 32 bits: 7 rounds, so 8 in
    all, and 340 bytes. The first product holds ``z`` at scale 3f + k before its
    truncation (k = 3 for GeLU's kappa^2, 4 for SiLU's): exact under the default
    truncation, since inside the bound z <= 1.1 (GeLU), 1.5 (SiLU) keeps ``z 2^(3f + k)``
    under its 2^62 (outside, ``inside`` drops whatever comes out); the optional
    probabilistic truncation would fail there about ``z 2^(3f + k - 63)`` of the time, so
    under it MPC truncates ``kappa^2 x`` first (a one-round truncation; the polynomial
    stays the shorter branch). Input range: every x whose fixed-point encoding the
    comparisons accept (``above * x`` is exact at scale f). On floats, every finite x.
    """
    steps = even_steps(form.bound, form.chebyshev)

    def polynomial() -> T:
        # z = (kappa x)^2 as (kappa^2 x) x: the public factor rides in the product's own
        # truncation (one product pass, where truncating kappa x first took two)
        z = ops.sum_of_products([(ops.dot_public([x], [steps.kappa**2], truncate=False), x)])
        q = ops.mul(z, ops.add_public(z, steps.alpha))
        top = ops.add_public(q if steps.sign > 0 else ops.neg(q), steps.gamma)
        constants = ops.from_public(torch.tensor([steps.linear, 0.5], dtype=torch.float64))
        linear = ops.map_shape(constants, lambda t: t[0])
        half = ops.map_shape(constants, lambda t: t[1])
        return ops.add_public(ops.sum_of_products([(q, top), (z, linear), (x, half)]), steps.constant)

    (below, under), inner = concurrently(
        ops, lambda: ops.less_than_public(x, [-form.bound, form.bound], magnitude=magnitude), polynomial)
    inside = ops.sub(under, below)
    above = ops.add_public(ops.neg(under), 1.0)
    return ops.sum_of_products([(inside, inner), (above, x)])


def even_gelu(ops: SecureOps[T], x: T, magnitude: float | None = None) -> T:
    """GeLU with two comparisons: ReLU outside [-3.15, 3.15], ``x/2`` plus a degree-4
    polynomial in ``x^2`` inside (:func:`even_activation`, :data:`EVEN_GELU`).

    Measured max abs error vs exact (erf) GeLU on the whole line (4M points on [-20, 20],
    the thresholds' neighbours, |x| up to 5e7): 2.5714e-3 on floats (PUMA's form: 0.0199),
    at x -> +-3.15; 2.5741e-3 on FixedPointOps (both truncation modes) and 2.573e-3 on three
    parties, which differ from the float form by at most 2.2e-5 away from +-3.15. RMS error
    on N(0, s^2) inputs: 1.8e-3 (s = 0.5 to 2), 1.6e-3 (s = 3); PUMA's 6.1e-3 to 5.3e-3, 4.6e-3.
    """
    return even_activation(ops, x, EVEN_GELU, magnitude)


def even_silu(ops: SecureOps[T], x: T, magnitude: float | None = None) -> T:
    """SiLU with two comparisons: ReLU outside [-6.03, 6.03], ``x/2`` plus a degree-4
    polynomial in ``x^2`` inside (:func:`even_activation`, :data:`EVEN_SILU`).

    Measured max abs error vs exact SiLU on the whole line: 0.014470 on floats (PUMA's form:
    0.0719), at x -> +-6.03; 0.014472 on FixedPointOps and on three parties (at most 3.1e-5
    from the float form away from +-6.03). SiLU approaches ReLU slowly (``x / (1 + e^x)``),
    so the fit spans [-6.03, 6.03] and its error equioscillates there: the RMS error on
    N(0, s^2) inputs is 1.0e-2 for every s from 0.5 to 3, where PUMA's is 6.2e-3 (s = 0.5),
    5.9e-3 (1), 9.2e-3 (2), 1.29e-2 (3). Smaller worst case and fewer bytes, larger typical
    error for activations mostly inside [-2, 2].
    """
    return even_activation(ops, x, EVEN_SILU, magnitude)


# ---- one polynomial on a calibrated range (HE: no comparison) ----------------------------
POLY_GELU_DEGREE: int = 8
"""Chebyshev degree in v = 2 (x/R)^2 - 1 of the even part; x-degree 16, depth 6 under CKKS."""


def poly_gelu_coefficients(bound: float, degree: int = POLY_GELU_DEGREE) -> tuple[float, ...]:
    """Chebyshev coefficients ``c_k`` with ``x erf(x / sqrt 2) ~ sum_k c_k T_k(v)``,
    ``v = 2 (x / bound)^2 - 1`` in ``[-1, 1]``.

    Public helper for :func:`poly_gelu`; a least-squares fit on 20001 evenly spaced points
    of ``[-bound, bound]`` (float64). The Chebyshev basis keeps every coefficient below
    ``bound`` (the monomial basis needs coefficients near 1e4 at bound 8, which multiplies a
    CKKS error of 1e-5 into 0.06). Max abs error of the resulting GeLU (half the fit's):
    bound 4: 1e-4; bound 8: 0.023; bound 12: 0.076 (degree 8); bound 8, degree 12: 0.0019.
    """
    import math

    import numpy as np

    if bound <= 0 or degree < 1:
        raise ValueError(f"need bound > 0 and degree >= 1, got bound={bound}, degree={degree}")
    x = np.linspace(-bound, bound, 20001)
    v = 2.0 * (x / bound) ** 2 - 1.0
    h = x * np.vectorize(math.erf)(x / math.sqrt(2.0))
    coeffs = np.polynomial.chebyshev.chebfit(v, h, degree)
    return tuple(float(c) for c in coeffs)


POLY_GELU_DEGREES: tuple[int, ...] = (8, 12, 16, 24, 32, 48, 64)
"""The degrees :func:`poly_gelu_degree` chooses from (depth 6 to 9 under CKKS)."""


def poly_gelu_degree(bound: float, tol: float = 1e-2) -> int:
    """The smallest degree in :data:`POLY_GELU_DEGREES` whose fit on ``[-bound, bound]``
    has max abs GeLU error <= ``tol`` (the largest if none does). The error falls roughly
    like exp(-c degree / bound): measured, degree 8 gives 0.023 at bound 8 and 0.48 at
    bound 31; degree 24 gives 0.056 at bound 31, degree 16 1e-4 at bound 8."""
    import math

    import numpy as np

    x = np.linspace(-bound, bound, 4001)
    v = 2.0 * (x / bound) ** 2 - 1.0
    exact = 0.5 * x * np.vectorize(math.erf)(x / math.sqrt(2.0))
    for degree in POLY_GELU_DEGREES:
        fit = 0.5 * np.polynomial.chebyshev.chebval(v, poly_gelu_coefficients(bound, degree))
        if float(np.abs(fit - exact).max()) <= tol:
            return degree
    return POLY_GELU_DEGREES[-1]


def chebyshev_basis(ops: SecureOps[T], v: T, degree: int) -> dict[int, T]:
    """``{k: T_k(v) for k in 1..degree}`` at depth ``ceil(log2 k)``, by
    ``T_2k = 2 T_k^2 - 1`` and ``T_2k+1 = 2 T_k T_k+1 - T_1``; the factor 2 is an
    addition (free in every backend), the terms of one depth form one ``mul_many`` pass."""
    basis: dict[int, T] = {1: v}
    top = 1
    while top < degree:
        jobs: list[tuple[int, int, int]] = []  # (k, a, b): T_k from 2 T_a T_b
        for k in range(top + 1, min(2 * top, degree) + 1):
            a = k // 2
            jobs.append((k, a, k - a))
        outs = ops.mul_many([(ops.add(basis[a], basis[a]), basis[b]) for _, a, b in jobs])
        for (k, a, b), prod in zip(jobs, outs):
            basis[k] = ops.add_public(prod, -1.0) if a == b else ops.sub(prod, basis[b - a])
        top = min(2 * top, degree)
    return basis


def chebyshev_split(coeffs: Sequence[float], giant: int) -> tuple[list[float], list[float]]:
    """(q, r) with ``sum_k c_k T_k = q(v) T_giant(v) + r(v)`` exactly, r of degree below
    ``giant``: each ``T_(g+j)`` (j >= 1) is ``2 T_g T_j - T_|g-j|``, so ``c_(g+j)`` adds
    ``2 c_(g+j)`` to q's coefficient j and ``-c_(g+j)`` to r's coefficient ``|g - j|``
    (Chebyshev division; every coefficient stays within twice the input's sum of |c|)."""
    n = len(coeffs) - 1
    if n < giant:
        raise ValueError(f"chebyshev_split: degree {n} below the giant step {giant}")
    q = [0.0] * (n - giant + 1)
    r = [float(c) for c in coeffs[:giant]] + [0.0] * max(0, n - 2 * giant + 1)
    q[0] = float(coeffs[giant])
    for j in range(1, n - giant + 1):
        c = float(coeffs[giant + j])
        q[j] += 2.0 * c
        r[abs(giant - j)] -= c
    while len(r) > 1 and r[-1] == 0.0:
        r.pop()
    return q, r


def chebyshev_series(ops: SecureOps[T], v: T, coeffs: Sequence[float]) -> T:
    """``sum_k c_k T_k(v)`` by baby steps and giant steps (v in [-1, 1]).

    Baby steps ``T_1 .. T_(m-1)`` (``m`` the power of two nearest sqrt(degree + 1)), giant
    steps ``T_m, T_2m, T_4m, ...``; the series is split at the largest giant step g below
    its degree, ``p = q T_g + r`` (:func:`chebyshev_split`), recursively, down to pieces of
    degree below m, which are public dot products of the baby steps. Products: about
    ``m + log2(degree / m) + degree / m`` instead of ``degree - 1`` for the whole basis
    (11 instead of 31 at degree 32), at the same depth (``ceil(log2 degree)`` products plus
    one scalar level); under CKKS far fewer values reach the last level, so far fewer
    ciphertexts go back to the client for a refresh. Measured, GeLU at bound 28 and degree
    32 on 16 x 1536 values (6 ciphertexts, N = 8192): 60 ciphertexts refreshed instead of
    180, 72 ciphertext products instead of 192, 2.0 s instead of 4.9 s, in 6 client trips
    instead of 4; max abs error 9.7e-3 (9.4e-3 before: the fit's own error dominates)."""
    degree = len(coeffs) - 1
    if degree < 1:
        raise ValueError("chebyshev_series needs degree >= 1")
    m = 1 << max(1, round(math.log2(degree + 1) / 2))
    baby = chebyshev_basis(ops, v, min(m, degree))  # T_m too: the first giant step
    giants = {m: baby[m]} if m <= degree else {}
    g = m
    while 2 * g <= -(-degree // 2):  # a giant step of at most half the degree: the splits stay shallow
        giants[2 * g] = ops.add_public(ops.mul(ops.add(giants[g], giants[g]), giants[g]), -1.0)
        g *= 2

    def series(c: list[float]) -> T:
        n = len(c) - 1
        if n < m:
            terms = [baby[k] for k in range(1, n + 1)]
            if not terms:
                return ops.add_public(ops.mul_public(v, 0.0), c[0])
            return ops.dot_public(terms, c[1:], bias=c[0])
        top = max(k for k in giants if k <= n)
        q, r = chebyshev_split(c, top)
        if len(q) == 1:  # a public multiple of the giant step
            qt = ops.mul_public(giants[top], q[0])
        else:
            qt = ops.mul(series(q), giants[top])
        if len(r) == 1 and r[0] == 0.0:
            return qt
        return ops.add(qt, series(r))

    return series([float(c) for c in coeffs])


def poly_gelu(ops: SecureOps[T], x: T, bound: float, degree: int = POLY_GELU_DEGREE, *,
              check: bool = True) -> T:
    """GeLU as one polynomial on ``[-bound, bound]`` (no comparison: the HE form).

    Math: ``gelu(x) = 0.5 x + 0.5 x erf(x / sqrt 2)``; the even part is
    ``sum_k c_k T_k(v)`` with ``v = 2 (x / bound)^2 - 1`` in ``[-1, 1]`` (Chebyshev basis,
    every term bounded by 1, so nothing overflows a CKKS or fixed-point range); see
    :func:`poly_gelu_coefficients` for the error per bound. Outside the bound the
    polynomial diverges: calibrate ``bound`` on the model's activations
    (``secure.evaluate.he_ranges.calibrate_for_he``). Nothing in the structure bounds x, so
    ``check=True`` (the default) checks ``|x| <= bound`` first (``ops.check_range``:
    RangeError outside it; a no-op under CKKS, whose guard is the refresh bound check).

    Cost: 1 ``mul_public``, 1 product for ``v``, the series by baby and giant steps
    (:func:`chebyshev_series`: 11 products at degree 32, 6 at degree 8), 1 ``mul_public``
    for ``0.5 x``. Depth under CKKS: 1 + 1 + ``ceil(log2 degree)`` + 1 (8 at degree 32, 6
    at degree 8).
    """
    coeffs = poly_gelu_coefficients(bound, degree)
    if check:
        ops.check_range(x, -bound, bound, f"poly_gelu input (bound {bound:g})")
    xs = ops.mul_public(x, 2.0**0.5 / bound)
    v = ops.add_public(ops.mul(xs, xs), -1.0)
    even = chebyshev_series(ops, v, [0.5 * c for c in coeffs])
    return ops.add(even, ops.mul_public(x, 0.5))
