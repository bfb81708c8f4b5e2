"""Reciprocal and inverse square root (PUMA sec. 4.3 / 4.5, SPU; DESIGN.md sec. 4).

* :func:`reciprocal` -- 1/x for x > 0 through ``frexp`` and Goldschmidt on the mantissa.
* :func:`reciprocal_bounded`, :func:`divide_bounded` -- 1/x (or n/x) for x in (0, upper]
  with a public ``upper``: no comparison and no ``frexp`` at all (polynomial only, for HE
  and for Power-Softmax).
* :func:`divide` -- numerator/x for x in a guaranteed range through ``frexp_segments`` and
  a quadratic per piece of the mantissa.
* :func:`rsqrt`, :func:`mul_rsqrt` -- 1/sqrt(x) (or n/sqrt(x)) for x > 0 through
  ``frexp_segments``, a cubic per piece of the mantissa and optional Newton steps.

The bounded forms (:func:`reciprocal_bounded`, :func:`divide_bounded`,
:func:`mul_rsqrt_bounded`) are accurate only on their range: with ``check=True`` (the
default) they call ``ops.check_range`` on x first, which raises
:class:`~secure.approx.interface.RangeError` for a value outside it (under MPC one
comparison pass and one opened count, 9 rounds; a no-op under CKKS).

Round notes (MPC): a "pass" below is one ``mul``/``mul_many`` call (2 rounds);
``frexp`` costs 10 rounds (one threshold comparison pass and one product; measured).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from secure.approx.interface import SecureOps, T

# ---- Goldschmidt reciprocal on [0.5, 1) (PUMA sec. 4.3; DESIGN.md sec. 4) ----------------
GOLDSCHMIDT_START: tuple[float, float] = (2.9142, -2.0)
"""w0 = 2.9142 - 2 m, the linear start for 1/m on [0.5, 1); |1 - m w0| <= 0.0858."""

BOUNDED_RECIPROCAL_TOL: float = 1e-3
"""Relative error the default start of :func:`reciprocal_bounded` is tuned for."""


def _one_plus(ops: SecureOps[T], e: T) -> T:
    return ops.add_public(e, 1.0)


def _one_minus(ops: SecureOps[T], e: T) -> T:
    return ops.add_public(ops.neg(e), 1.0)


def reciprocal(ops: SecureOps[T], x: T, iterations: int = 3,
               bounds: tuple[float, float] | None = None) -> T:
    """1/x for x > 0 (PUMA's Goldschmidt reciprocal).

    Math: ``x = m 2^e`` with m in [0.5, 1) (``frexp``, which also returns ``s = 2^-e``);
    ``w0 = 2.9142 - 2m``, ``err0 = 1 - m w0`` (|err0| <= 0.0858 on [0.5, 1));
    Goldschmidt ``w <- w (1 + err)``, ``err <- err^2``, so after k iterations
    ``w = (1 - err0^(2^k)) / m`` and ``1/x = s w``. The factor ``s`` is multiplied into
    ``w0`` in the same pass that forms ``m w0``, so no pass is spent on it at the end.

    Relative error bound ``0.0858^(2^k)``: 7.4e-3 (k=1), 5.4e-5 (k=2), 2.9e-9 (k=3).
    Measured on FloatOps (float64, x log-spaced on [1e-2, 1e4]): max relative error
    7.4e-3 (k=1), 5.4e-5 (k=2), 2.9e-9 (k=3).

    Cost: 1 ``frexp``; ``1 + iterations`` product calls (1 ``mul_many`` of 2 then
    ``iterations - 1`` ``mul_many`` of 2 and a last ``mul``). ``bounds``: a range of x
    the caller guarantees, handed to ``frexp`` (fewer comparisons under MPC).

    Fixed point: 1/x is only as precise as the ring's 2^-f step; for f = 18 and x = 1e4
    the result 1e-4 is 26 steps, about 4% relative. PUMA uses it for row sums in
    [1, seq_len], where this is harmless.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    m, scale = ops.frexp(x, lambda e: 2.0**-e, bounds=bounds)
    w0 = ops.add_public(ops.mul_public(m, GOLDSCHMIDT_START[1]), GOLDSCHMIDT_START[0])
    mw, w = ops.mul_many([(m, w0), (w0, scale)])
    err = _one_minus(ops, mw)
    for i in range(iterations):
        if i == iterations - 1:
            w = ops.mul(w, _one_plus(ops, err))
        else:
            w, err = ops.mul_many([(w, _one_plus(ops, err)), (err, err)])
    return w


def bounded_reciprocal_start(
    upper: float,
    iterations: int,
    lower: float | None = None,
    tol: float = BOUNDED_RECIPROCAL_TOL,
) -> tuple[float, float, float]:
    """Public helper: the fixed Goldschmidt start for 1/x on [lower, upper].

    With ``c = x / upper`` and the start ``w0 = a`` (a public constant), after k iterations
    the relative error is ``|1 - a c|^(2^k)``. On ``c in [c_lo, 1]`` the minimax start is
    ``a = 2 / (1 + c_lo)``, giving the bound ``((1 - c_lo) / (1 + c_lo))^(2^k)``.

    If ``lower`` is None it is chosen as the smallest value for which that bound equals
    ``tol``: ``c_lo = (1 - r) / (1 + r)``, ``r = tol^(1 / 2^k)``. With tol = 1e-3:

    ====  ===========  =====
    k     lower/upper  a
    ====  ===========  =====
    6     0.0539       1.898
    8     0.01349      1.973
    10    0.003373     1.993
    12    0.000843     1.998
    ====  ===========  =====

    Returns ``(a, lower, bound)``: the start, the lower end of the accuracy range and the
    relative error bound on ``[lower, upper]``.
    """
    if upper <= 0.0:
        raise ValueError(f"upper must be > 0, got {upper}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if lower is None:
        r = tol ** (1.0 / 2**iterations)
        c_lo = (1.0 - r) / (1.0 + r)
    else:
        if not 0.0 < lower <= upper:
            raise ValueError(f"need 0 < lower <= upper, got lower={lower}, upper={upper}")
        c_lo = lower / upper
    a = 2.0 / (1.0 + c_lo)
    bound = ((1.0 - c_lo) / (1.0 + c_lo)) ** (2**iterations)
    return a, c_lo * upper, bound


def divide_bounded(
    ops: SecureOps[T],
    numerator: T,
    x: T,
    upper: float,
    iterations: int = 8,
    *,
    lower: float | None = None,
    check: bool = True,
) -> T:
    """numerator / x for x in (0, upper] with a public bound ``upper``; no comparison.

    Goldschmidt division with a public start ``k = a / upper`` (``a`` from
    :func:`bounded_reciprocal_start`): ``N0 = numerator * k`` (public product),
    ``err0 = 1 - k x`` (one ``dot_public``); then ``iterations`` times
    ``N <- N (1 + err)``, ``err <- err^2``, so ``N = numerator (1 - err0^(2^k)) / x``.
    ``numerator`` broadcasts against ``x`` (e.g. a row ``[..., L]`` over ``[..., 1]``).

    Accuracy: relative error ``|1 - a x / upper|^(2^iterations)``, at most
    ``BOUNDED_RECIPROCAL_TOL`` = 1e-3 on ``[lower, upper]`` where by default
    ``lower = 0.0135 upper`` for 8 iterations, ``0.00337 upper`` for 10 (see
    :func:`bounded_reciprocal_start`). Below ``lower`` the result is an underestimate
    (never larger than the exact value; about ``2^k a / upper`` times the numerator as
    x -> 0); above ``upper (1 + lower/upper)`` the iteration diverges, so ``upper`` must
    really bound x. Measured on FloatOps: see :func:`reciprocal_bounded`.

    ``check=True`` first checks ``x in [lower, upper]`` (``ops.check_range``: RangeError
    outside it; under MPC 9 rounds, see :meth:`secure.mpc.backend.MpcOps.check_range`).
    ``check=False`` is for callers that guarantee or check the range themselves.

    Cost: 1 ``dot_public``, 1 ``mul_public``, ``iterations`` product calls (the last a
    ``mul``, the others ``mul_many`` of 2). Multiplicative depth ``iterations`` (HE).
    """
    a, lo, _ = bounded_reciprocal_start(upper, iterations, lower)
    if check:
        ops.check_range(x, lo, upper, "divide_bounded denominator")
    k = a / upper
    err = ops.dot_public([x], [-k], bias=1.0)
    n = ops.mul_public(numerator, k)
    for i in range(iterations):
        if i == iterations - 1:
            n = ops.mul(n, _one_plus(ops, err))
        else:
            n, err = ops.mul_many([(n, _one_plus(ops, err)), (err, err)])
    return n


def reciprocal_bounded(
    ops: SecureOps[T],
    x: T,
    upper: float,
    iterations: int = 8,
    *,
    lower: float | None = None,
    check: bool = True,
) -> T:
    """1/x for x in (0, upper] with a public bound ``upper``; no comparison, no ``frexp``.

    Math: ``c = x / upper``, public start ``a`` (``bounded_reciprocal_start``), Goldschmidt
    ``w0 = a / upper``, ``err0 = 1 - a c``; ``w <- w (1 + err)``, ``err <- err^2``; after k
    iterations ``w = (1 - err0^(2^k)) / x``. The first update ``w1 = (a/upper)(1 + err0)``
    is a public-coefficient ``dot_public`` (no product).

    Accuracy range (relative error <= 1e-3, default ``lower``): ``[0.0135 upper, upper]``
    for 8 iterations, ``[0.00337 upper, upper]`` for 10, ``[0.000843 upper, upper]`` for 12.
    It converges slowly for x << upper (error ~ exp(-2^k a x / upper)); below the range
    the result underestimates 1/x, above ``upper (1 + lower/upper)`` it diverges.
    Measured on FloatOps (upper = 1, 8 iterations, x log-spaced on [0.0135, 1]): max
    relative error 1.0e-3 (at both ends, equioscillating); at x = 0.05: 3e-12.
    ``check=True`` raises RangeError for x outside ``[lower, upper]`` (as
    :func:`divide_bounded`).

    Cost: 2 ``dot_public``, ``iterations`` product calls for ``iterations >= 2`` (the first
    only squares err0, since ``w1`` needs no product; 0 for ``iterations = 1``); depth
    ``iterations``. To divide, :func:`divide_bounded` saves the final product.
    """
    a, lo, _ = bounded_reciprocal_start(upper, iterations, lower)
    if check:
        ops.check_range(x, lo, upper, "reciprocal_bounded input")
    k = a / upper
    err = ops.dot_public([x], [-k], bias=1.0)
    w = ops.dot_public([err], [k], bias=k)  # first update k (1 + err0): public coefficients
    if iterations > 1:
        err = ops.mul(err, err)
    for i in range(1, iterations):
        if i == iterations - 1:
            w = ops.mul(w, _one_plus(ops, err))
        else:
            w, err = ops.mul_many([(w, _one_plus(ops, err)), (err, err)])
    return w


# ---- piecewise polynomials on frexp's mantissa ----------------------------------------------
RSQRT_SEGMENTS: int = 2
"""Pieces per octave of the inverse square root's cubic in m: max relative error 3.1e-5
on floats, 3.3e-5 measured through frexp (one piece: 4.8e-4; SPU's quartic, which needs one
more product pass: 8.2e-5)."""

MUL_RSQRT_SEGMENTS: int = 6
"""Pieces per octave of :func:`mul_rsqrt`'s quadratic in m: max relative error 1.5e-5 on
floats (four pieces: 5.3e-5; eight: 6.5e-6). A quadratic, not the cubic, because its
scaling by the numerator then fits two product passes after frexp's (see mul_rsqrt)."""

DIVIDE_SEGMENTS: int = 8
"""Pieces per octave of the reciprocal's quadratic in m: max relative error 2.0e-5 on floats
(four pieces: 1.6e-4; PUMA's Goldschmidt with 2 iterations, three product passes: 5.4e-5)."""

_MANTISSA_FUNCTIONS = {"rsqrt": lambda m: (2.0 / m) ** 0.5, "reciprocal": lambda m: 1.0 / m}


@functools.cache
def mantissa_fits(name: str, segments: int, degree: int) -> tuple[tuple[float, ...], ...]:
    """For each piece j of m in [0.5, 1) (``0.5 * 2^(j/S) <= m < 0.5 * 2^((j+1)/S)``): its
    centre mu and the coefficients ``d_0 .. d_degree`` of a polynomial in ``u = m - mu``
    fitted to ``g(m)`` (``"rsqrt"``: ``sqrt(2/m)``, the mantissa part of 1/sqrt(x) for
    x = (m/2) 2^(e+1); ``"reciprocal"``: ``1/m``), minimax in the Chebyshev basis (Lawson,
    2001 points, 600 passes). Centred, the coefficients stay small, so a truncated ``u^2``
    costs a few ulps, not the 20 its monomial coefficients in m would."""
    import numpy as np

    from secure.approx.gelu import lawson_fit

    fn = _MANTISSA_FUNCTIONS[name]
    pieces = []
    for j in range(segments):
        lo, hi = 0.5 * 2.0 ** (j / segments), 0.5 * 2.0 ** ((j + 1) / segments)
        mu, half = (lo + hi) / 2, (hi - lo) / 2
        v = np.linspace(-1.0, 1.0, 2001)
        cheb = lawson_fit(v, fn(mu + half * v), degree, 600)
        in_v = np.polynomial.chebyshev.cheb2poly(np.asarray(cheb))
        pieces.append((mu, *(float(c) / half**k for k, c in enumerate(in_v))))
    return tuple(pieces)


def _table(pieces: tuple[tuple[float, ...], ...], fn: Callable[[tuple[float, ...]], float]) -> Callable[[int], float]:
    return lambda j: fn(pieces[j])


def _cubic_in_mantissa(ops: SecureOps[T], m: T, tables: Sequence[T]) -> T:
    """``d_0 + d_1 u + d_2 u^2 + d_3 u^3`` with ``u = m - mu`` (mu, d_k: the piece's, as
    values): ``(u^2, d_3 u)`` in one product pass, the sum in one more."""
    mu, d0, d1, d2, d3 = tables
    u = ops.sub(m, mu)
    u2, d3u = ops.mul_many([(u, u), (d3, u)])
    return ops.add(ops.sum_of_products([(d1, u), (d2, u2), (d3u, u2)]), d0)


def _newton_rsqrt(ops: SecureOps[T], m: T, z: T, iterations: int) -> T:
    for _ in range(iterations):
        # z <- z (3 - u z^2) / 2 with u = m/2: 1.5 z - 0.25 m z^3; every value is O(1).
        mz, z2 = ops.mul_many([(m, z), (z, z)])
        mz3 = ops.mul(mz, z2)
        z = ops.dot_public([z, mz3], [1.5, -0.25])
    return z


def _rsqrt_exponent_factor(e: int) -> float:
    # x = m 2^e = u 2^(e+1) with u = m/2 in [0.25, 0.5): 1/sqrt(x) = u^-1/2 * 2^(-(e+1)/2).
    return 2.0 ** (-(e + 1) / 2.0)


def rsqrt(ops: SecureOps[T], x: T, newton_iterations: int = 0) -> T:
    """1/sqrt(x) for x > 0 (after SPU's method, DESIGN.md sec. 4 / PUMA sec. 4.5).

    Math: ``frexp_segments`` gives ``x = m 2^e``, m in [0.5, 1), the piece of m (one of
    :data:`RSQRT_SEGMENTS` per octave) and ``s = 2^(-(e+1)/2)``; with ``u = m/2``,
    ``x = u 2^(e+1)`` and ``1/sqrt(x) = u^(-1/2) s``. ``u^(-1/2) = sqrt(2/m)`` is the
    piece's cubic (:func:`mantissa_fits`, its coefficients the comparison's one-hot sums),
    refined by ``newton_iterations`` Newton steps ``z <- z (3 - u z^2) / 2``, then times s.

    Measured on FloatOps (float64, x log-spaced on [1e-3, 1e4]): max relative error 3.1e-5
    with 0 Newton steps, 1.7e-9 with 1.

    Cost: 1 ``frexp_segments``; product calls ``3 + 2 * newton_iterations`` (the cubic's
    two, [``mul_many``, ``mul``] per step, the final ``mul`` by s). Under MPC 10 + 6 = 16
    rounds with no Newton step (SPU's quartic seed took 18).
    """
    if newton_iterations < 0:
        raise ValueError(f"newton_iterations must be >= 0, got {newton_iterations}")
    m, scale, tables = ops.frexp_segments(x, _rsqrt_exponent_factor, RSQRT_SEGMENTS, _rsqrt_tables())
    z = _newton_rsqrt(ops, m, _cubic_in_mantissa(ops, m, tables), newton_iterations)
    return ops.mul(z, scale)


def mul_rsqrt(ops: SecureOps[T], numerator: T, x: T, newton_iterations: int = 0, gain: float = 1.0) -> T:
    """gain * numerator / sqrt(x) for x > 0, two product passes after frexp's.

    Math: ``frexp_segments`` gives ``x = m 2^e`` and the piece j of m (one of
    :data:`MUL_RSQRT_SEGMENTS` per octave); with ``s = gain 2^(-(e+1)/2)`` and the piece's
    quadratic ``sqrt(2/m) ~ d_0 + d_1 u + d_2 u^2`` in ``u = m - mu`` (:func:`mantissa_fits`),

        gain * N / sqrt(x) = N s d_0 + (N u) (s d_1 + (s d_2) u).

    ``s d_k`` are public functions of (e, j), so local one-hot sums (``factor_tables``), and
    ``N s d_0`` is formed in frexp's own product pass beside m (``times_table``); then one
    pass forms ``N u`` and ``(s d_2) u``, and one the last product. ``numerator`` broadcasts
    against ``x`` (``[..., n]`` over ``[..., 1]``). Measured on FloatOps (x log-spaced on
    [1e-3, 1e4]): max relative error 1.5e-5 (the fit's); through LayerNorm on three parties
    see :func:`secure.approx.norms.layer_norm`.

    With ``newton_iterations`` > 0 it is :func:`rsqrt`'s cubic on two pieces per octave,
    refined, times ``N s`` formed in frexp's pass.

    Cost: 1 ``frexp_segments`` (with ``times``) and 2 product calls: under MPC 10 + 4 = 14
    rounds (16 with the cubic, whose scaling by N needed a pass of its own; 18 with SPU's
    quartic seed), one product per element of N more than the cubic's and three times its
    comparisons; with Newton steps ``3 + 2 * newton_iterations`` product calls.
    """
    if newton_iterations < 0:
        raise ValueError(f"newton_iterations must be >= 0, got {newton_iterations}")
    def exponent(e: int) -> float:
        return gain * _rsqrt_exponent_factor(e)

    if newton_iterations:
        m, ns, tables = ops.frexp_segments(x, exponent, RSQRT_SEGMENTS, _rsqrt_tables(), times=numerator)
        z = _newton_rsqrt(ops, m, _cubic_in_mantissa(ops, m, tables), newton_iterations)
        return ops.mul(ns, z)
    pieces = mantissa_fits("rsqrt", MUL_RSQRT_SEGMENTS, 2)
    m, scaled, (mu, p1, p2) = ops.frexp_segments(
        x, exponent, MUL_RSQRT_SEGMENTS, [_table(pieces, lambda p: p[0])], times=numerator,
        factor_tables=[_table(pieces, lambda p: p[2]), _table(pieces, lambda p: p[3])],
        times_table=_table(pieces, lambda p: p[1]))
    u = ops.sub(m, mu)
    nu, p2u = ops.mul_many([(numerator, u), (p2, u)])
    return ops.add(scaled, ops.mul(nu, ops.add(p1, p2u)))


def divide(ops: SecureOps[T], numerator: T | Callable[[], T], x: T, bounds: tuple[float, float]) -> T:
    """numerator / x for x in ``bounds`` (a range the caller's structure guarantees, e.g. a
    softmax row sum in [1, n]; x broadcasting against the numerator). ``numerator`` may be
    a function computing it: it then runs concurrently with frexp's comparisons.

    Math: ``frexp_segments`` gives ``x = m 2^e``, the piece of m (one of
    :data:`DIVIDE_SEGMENTS` per octave) and, in its product pass, ``numerator * 2^-e`` and
    ``d_1 m``, ``d_2 m`` (the piece's coefficients times m: a narrow window leaves room for
    their precision); ``1/m = d_0 + d_1 u + d_2 u^2`` with ``u = m - mu``
    (:func:`mantissa_fits`), ``d_k u = d_k m - d_k mu`` local, so one product
    ``(d_2 u) u`` and one last product with ``numerator * 2^-e``.

    Measured on FloatOps (float64, x log-spaced on [1e-2, 1e4]): max relative error 2.1e-5.

    Cost: 1 ``frexp_segments`` and 2 product calls: under MPC 10 + 4 = 14 rounds, where
    :func:`reciprocal` (2 Goldschmidt iterations) and the product with the numerator took
    18. Comparisons: 8 per octave of ``bounds`` and element of x.
    """
    pieces = mantissa_fits("reciprocal", DIVIDE_SEGMENTS, 2)
    tables = [_table(pieces, lambda p: p[0]), _table(pieces, lambda p: p[1]),
              _table(pieces, lambda p: p[2] * p[0]), _table(pieces, lambda p: p[3] * p[0])]
    m, scaled, (mu, d0, d1_mu, d2_mu, d1_m, d2_m) = ops.frexp_segments(
        x, lambda e: 2.0**-e, DIVIDE_SEGMENTS, tables, times=numerator, bounds=bounds,
        mantissa_tables=[_table(pieces, lambda p: p[2]), _table(pieces, lambda p: p[3])])
    u = ops.sub(m, mu)
    z = ops.add(ops.add(ops.sub(d1_m, d1_mu), d0), ops.mul(ops.sub(d2_m, d2_mu), u))
    return ops.mul(scaled, z)


def _rsqrt_tables() -> list[Callable[[int], float]]:
    pieces = mantissa_fits("rsqrt", RSQRT_SEGMENTS, 3)
    return [_table(pieces, lambda p, k=k: p[k]) for k in range(5)]


def rsqrt_bounded_plan(lower: float, upper: float, tol: float = 1e-4) -> tuple[float, float, int]:
    """Public helper: the seed ``y0 = c0 + c1 x`` and Newton step count for 1/sqrt(x) on
    ``[lower, upper]`` so that the relative error is at most ``tol`` everywhere.

    The seed is the line through ``(lower, 1/sqrt(lower))`` and ``(upper, 1/sqrt(upper))``
    scaled down until ``x y0^2 <= 1`` on the whole range (Newton for 1/sqrt converges
    monotonically from below); the step count is found by running the iteration in float64
    on 4001 log-spaced points. Returns ``(c0, c1, steps)``.
    """
    import numpy as np

    if not 0.0 < lower < upper:
        raise ValueError(f"need 0 < lower < upper, got lower={lower}, upper={upper}")
    x = np.geomspace(lower, upper, 4001)
    c1 = (upper**-0.5 - lower**-0.5) / (upper - lower)
    c0 = lower**-0.5 - c1 * lower
    shrink = 0.99 / float(np.sqrt((x * (c0 + c1 * x) ** 2).max()))
    c0, c1 = c0 * shrink, c1 * shrink
    y = c0 + c1 * x
    for steps in range(0, 64):
        if float(np.abs(y * np.sqrt(x) - 1.0).max()) <= tol:
            return float(c0), float(c1), steps
        y = y * (1.5 - 0.5 * x * y * y)
    raise ValueError(f"no Newton count reaches {tol} on [{lower}, {upper}]")


def mul_rsqrt_bounded(ops: SecureOps[T], numerator: T, x: T, lower: float, upper: float,
                      tol: float = 1e-4, *, check: bool = True) -> T:
    """numerator / sqrt(x) for x in a public range ``[lower, upper]``; no comparison, no
    ``frexp`` (the HE form of the LayerNorm denominator).

    Math: a linear seed ``y0 = c0 + c1 x`` below 1/sqrt(x) (:func:`rsqrt_bounded_plan`),
    then Newton ``y <- y (1.5 - h y^2)`` with ``h = x / 2``; relative error <= ``tol``
    on the range (measured in float64 on a log grid by the plan itself), an underestimate
    outside it below ``lower``, divergence far above ``upper``. ``check=True`` raises
    RangeError for x outside ``[lower, upper]`` (``ops.check_range``) instead.

    Each step is written ``y <- 1.5 y - (h y)(y^2)``: ``h y`` and ``y^2`` in one product
    pass, then their product, so a step is 2 levels deep under CKKS where ``y (1.5 - h y^2)``
    was 3, and a refresh's 3 levels carry one and a half steps instead of one (MiniLM's
    LayerNorms, 8 to 14 steps each: 147 client trips a query before).

    Cost: 1 ``dot_public`` (seed), 1 ``mul_public`` (h), per Newton step 3 products in 2
    passes and 1 ``mul_public``, 1 final product; depth ``2 + 2 steps + 1`` under CKKS.
    For a range ratio of 100: 7 steps at tol 1e-4.
    """
    c0, c1, steps = rsqrt_bounded_plan(lower, upper, tol)
    if check:
        ops.check_range(x, lower, upper, "mul_rsqrt_bounded input")
    y = ops.dot_public([x], [c1], bias=c0)
    h = ops.mul_public(x, 0.5)
    for _ in range(steps):
        hy, y2 = ops.mul_many([(h, y), (y, y)])
        y = ops.sub(ops.mul_public(y, 1.5), ops.mul(hy, y2))
    return ops.mul(numerator, y)


__all__ = [
    "BOUNDED_RECIPROCAL_TOL",
    "GOLDSCHMIDT_START",
    "DIVIDE_SEGMENTS",
    "RSQRT_SEGMENTS",
    "bounded_reciprocal_start",
    "divide",
    "divide_bounded",
    "mul_rsqrt",
    "mantissa_fits",
    "mul_rsqrt_bounded",
    "reciprocal",
    "reciprocal_bounded",
    "rsqrt",
    "rsqrt_bounded_plan",
]
