"""Fidelity of the secure forms on the plaintext backend (FloatOps, float64).

Every bound asserted here is a measured maximum with a little slack; the measured values
are in the forms' docstrings. The last part checks that the forms only use the
``SecureOps`` interface and documents their call (round) structure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from secure.approx.exp import clipped_exp
from secure.approx.float_backend import FloatOps
from secure.approx.gelu import PUMA_GELU_BREAKS, SILU_BREAKS, even_gelu, even_silu, puma_gelu, puma_silu
from secure.approx.norms import layer_norm, rms_norm
from secure.approx.reciprocal import (
    DIVIDE_SEGMENTS,
    RSQRT_SEGMENTS,
    bounded_reciprocal_start,
    divide,
    divide_bounded,
    mantissa_fits,
    mul_rsqrt,
    reciprocal,
    reciprocal_bounded,
    rsqrt,
)
from secure.approx.softmax import even_power, power_softmax, puma_softmax

F64 = torch.float64
OPS = FloatOps()
HYP = settings(max_examples=200, deadline=None)


def _t(values: Sequence[float] | float) -> torch.Tensor:
    return torch.as_tensor(values, dtype=F64).reshape(-1)


def _near(points: Sequence[float]) -> st.SearchStrategy[float]:
    """The points themselves and their floating-point neighbours."""
    return st.sampled_from(
        [p for c in points for p in (c, math.nextafter(c, -math.inf), math.nextafter(c, math.inf))]
    )


def _max_rel(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((approx - exact) / exact).abs().max())


# ---------------------------------------------------------------------------------------
# GeLU / SiLU
# ---------------------------------------------------------------------------------------

GELU_BOUND = 0.02  # measured 0.019913 as x -> 3 from below (DESIGN.md: 0.0199)
SILU_BOUND = 0.0720  # measured 0.071944 just above x = 4 (the identity piece)


def test_puma_gelu_grid() -> None:
    x = torch.linspace(-8, 8, 800_001, dtype=F64)
    err = (puma_gelu(OPS, x) - F.gelu(x)).abs()
    assert float(err.max()) <= GELU_BOUND
    assert float(err.max()) > 0.0199  # the published worst case really is reached
    # Away from the F1 -> x jump at 3 the form is much better.
    assert float(err[(x < 2.5)].max()) < 0.012


def test_puma_gelu_pieces_match_published_polynomials() -> None:
    x = torch.linspace(-6, 6, 12_001, dtype=F64)
    f0 = (
        -0.011034134030615728 * x**3
        - 0.11807612951181953 * x**2
        - 0.42226581151983866 * x
        - 0.5054031199708174
    )
    f1 = (
        0.0018067462606141187 * x**6
        - 0.037688200365904236 * x**4
        + 0.3603292692789629 * x**2
        + 0.5 * x
        + 0.008526321541038084
    )
    ref = torch.where(x < -4, 0 * x, torch.where(x < -1.95, f0, torch.where(x < 3, f1, x)))
    torch.testing.assert_close(puma_gelu(OPS, x), ref, rtol=0, atol=1e-12)


@HYP
@given(st.one_of(st.floats(-8.0, 8.0), _near(PUMA_GELU_BREAKS)))
def test_puma_gelu_hypothesis(v: float) -> None:
    x = _t(v)
    assert float((puma_gelu(OPS, x) - F.gelu(x)).abs().max()) <= GELU_BOUND


@HYP
@given(st.floats(-1e3, 1e3))
def test_puma_gelu_far_tails(v: float) -> None:
    """Outside [-4, 3] the form is exactly 0 or x (no polynomial blow-up leaks through)."""
    x = _t(v)
    y = puma_gelu(OPS, x)
    if v < -4:
        assert float(y) == 0.0
    elif v >= 3:
        assert float(y) == v


def test_puma_silu_grid() -> None:
    x = torch.linspace(-12, 12, 1_200_001, dtype=F64)
    err = (puma_silu(OPS, x) - F.silu(x)).abs()
    assert float(err.max()) <= SILU_BOUND
    inner = (x >= -4) & (x < 4)
    assert float(err[inner].max()) <= 0.0097  # degree-6 piece: measured 0.00965
    assert float(err[(x >= -8) & (x < -4)].max()) <= 0.0044  # quadratic: 0.00435


@HYP
@given(st.one_of(st.floats(-12.0, 12.0), _near(SILU_BREAKS)))
def test_puma_silu_hypothesis(v: float) -> None:
    x = _t(v)
    assert float((puma_silu(OPS, x) - F.silu(x)).abs().max()) <= SILU_BOUND


# ---------------------------------------------------------------------------------------
# exp
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "order", "bound"),
    [(8, 1, 1.06e-3), (5, 1, 8.6e-3), (6, 1, 4.3e-3), (6, 2, 5.7e-5), (8, 2, 3.5e-6)],
)
def test_clipped_exp_grid(t: int, order: int, bound: float) -> None:
    x = torch.linspace(-14, 0, 700_001, dtype=F64)
    err = (clipped_exp(OPS, x, t=t, order=order) - x.exp()).abs()
    assert float(err.max()) <= bound * 1.01


@HYP
@given(st.one_of(st.floats(-14.0, 0.0), _near([-14.0, 0.0]).filter(lambda v: v <= 0)))
def test_clipped_exp_hypothesis(v: float) -> None:
    x = _t(v)
    assert float((clipped_exp(OPS, x, t=8) - x.exp()).abs().max()) <= 1.07e-3


@HYP
@given(st.floats(-1e4, -14.0, exclude_max=True))
def test_clipped_exp_below_clip_is_exactly_zero(v: float) -> None:
    for order in (1, 2):
        y = clipped_exp(OPS, _t(v), t=8, order=order)
        assert float(y) == 0.0  # exp(v) < 8.4e-7, and no inf * 0 = nan for v ~ -1e4


def test_clipped_exp_rejects_bad_clip() -> None:
    with pytest.raises(ValueError):
        clipped_exp(OPS, _t(-1.0), t=3, clip=-14.0)  # -14 < -2^3: base would go negative


# ---------------------------------------------------------------------------------------
# reciprocal, bounded reciprocal, rsqrt
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("iterations", "bound"), [(1, 7.4e-3), (2, 5.5e-5), (3, 3e-9)])
def test_reciprocal_grid(iterations: int, bound: float) -> None:
    x = torch.logspace(-2, 4, 100_001, dtype=F64)
    rel = _max_rel(reciprocal(OPS, x, iterations), 1 / x)
    assert rel <= bound
    assert rel <= 1e-3 or iterations == 1


@HYP
@given(st.floats(1e-2, 1e4))
def test_reciprocal_hypothesis(v: float) -> None:
    x = _t(v)
    assert _max_rel(reciprocal(OPS, x), 1 / x) <= 1e-3


@pytest.mark.parametrize("iterations", [6, 8, 10, 12])
@pytest.mark.parametrize("upper", [1.0, 1e3])
def test_reciprocal_bounded_documented_range(iterations: int, upper: float) -> None:
    _, lower, bound = bounded_reciprocal_start(upper, iterations)
    assert bound == pytest.approx(1e-3, rel=1e-6)
    x = torch.logspace(math.log10(lower), math.log10(upper), 50_001, dtype=F64)
    assert _max_rel(reciprocal_bounded(OPS, x, upper, iterations), 1 / x) <= 1.0001e-3
    num = torch.linspace(-3, 3, x.numel(), dtype=F64)
    quotient = divide_bounded(OPS, num, x, upper, iterations)
    assert float((quotient * x - num).abs().max()) <= 3.0003e-3
    # Below the range (unchecked): an underestimate, never an overshoot.
    small = torch.logspace(math.log10(lower) - 3, math.log10(lower), 1001, dtype=F64)
    assert bool((reciprocal_bounded(OPS, small, upper, iterations, check=False) * small <= 1 + 1e-12).all())


def test_reciprocal_bounded_table() -> None:
    """The lower ends quoted in the docstrings (1e-3 relative error)."""
    expected = {6: 0.0539, 8: 0.01349, 10: 0.003373, 12: 0.000843}
    for k, ratio in expected.items():
        assert bounded_reciprocal_start(1.0, k)[1] == pytest.approx(ratio, rel=1e-3)
    a, lower, bound = bounded_reciprocal_start(10.0, 8, lower=1.0)
    assert a == pytest.approx(2 / 1.1) and lower == 1.0
    assert bound == pytest.approx((9 / 11) ** 256)


@HYP
@given(st.floats(0.0135, 1.0))
def test_reciprocal_bounded_hypothesis(v: float) -> None:
    x = _t(v)
    assert _max_rel(reciprocal_bounded(OPS, x, 1.0, 8), 1 / x) <= 1.0001e-3


def test_mantissa_fits_fit_their_pieces() -> None:
    """Each piece's centred polynomial against g on a dense grid of the piece, relative error."""
    for name, segments, degree, bound, g in (
            ("rsqrt", RSQRT_SEGMENTS, 3, 3.4e-5, lambda m: (2.0 / m).sqrt()),
            ("reciprocal", DIVIDE_SEGMENTS, 2, 2.2e-5, lambda m: 1.0 / m)):
        for j, (mu, *d) in enumerate(mantissa_fits(name, segments, degree)):
            m = torch.linspace(0.5 * 2.0 ** (j / segments), 0.5 * 2.0 ** ((j + 1) / segments), 20_001, dtype=F64)
            u = m - mu
            assert _max_rel(sum(c * u**k for k, c in enumerate(d)), g(m)) <= bound


@pytest.mark.parametrize(("newton", "bound"), [(0, 8.3e-5), (1, 1.1e-8), (2, 1e-14)])
def test_rsqrt_grid(newton: int, bound: float) -> None:
    x = torch.logspace(-3, 4, 100_001, dtype=F64)
    assert _max_rel(rsqrt(OPS, x, newton), x.rsqrt()) <= bound
    num = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    num = num + 0.5 * num.sign()  # keep away from 0 for a relative check
    assert _max_rel(mul_rsqrt(OPS, num, x, newton), num * x.rsqrt()) <= bound


@HYP
@given(st.floats(1e-3, 1e4))
def test_rsqrt_hypothesis(v: float) -> None:
    x = _t(v)
    assert _max_rel(rsqrt(OPS, x, 0), x.rsqrt()) <= 8.3e-5


# ---------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------


def _attention_scores(std: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (2, 12, 32, 32) ~ N(0, std^2), an HF-style additive padding bias (batch 0 pads
    the last 5 keys with finfo.min, batch 1 the last 12 with -1e9), and the keep mask."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 12, 32, 32, dtype=F64, generator=g) * std
    keep = torch.ones(2, 1, 1, 32, dtype=F64)
    keep[0, ..., -5:] = 0
    keep[1, ..., -12:] = 0
    bias = torch.zeros_like(keep)
    bias[0, ..., -5:] = torch.finfo(torch.float32).min
    bias[1, ..., -12:] = -1e9
    return scores, bias, keep


@pytest.mark.parametrize(
    ("t", "order", "bound"),
    [
        (8, 1, 6.0e-3),  # PUMA t = 8: measured 5.1e-3 (not the 1e-3 DESIGN.md quotes)
        (6, 2, 7.0e-4),  # Taylor-2 base, t = 6: measured 4.9e-4, one pass cheaper
        (8, 2, 5.0e-5),  # measured 3.6e-5
    ],
)
def test_puma_softmax_attention(t: int, order: int, bound: float) -> None:
    scores, bias, keep = _attention_scores()
    ref = torch.softmax(scores + bias, dim=-1)
    out = puma_softmax(OPS, scores, t=t, mask_bias=bias, exp_order=order)
    assert float((out - ref).abs().max()) <= bound
    assert bool((out[(keep == 0).expand_as(out)] == 0).all())  # masked: exactly 0
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out.sum(-1)), rtol=0, atol=0.02)


def test_puma_softmax_t5_is_worse() -> None:
    scores, bias, _ = _attention_scores()
    ref = torch.softmax(scores + bias, dim=-1)
    err5 = float((puma_softmax(OPS, scores, t=5, mask_bias=bias, exp_order=1) - ref).abs().max())
    err8 = float((puma_softmax(OPS, scores, t=8, mask_bias=bias, exp_order=1) - ref).abs().max())
    print(f"puma_softmax max abs error: t=5 {err5:.3e}, t=8 {err8:.3e}")
    assert err5 > 5 * err8
    assert err5 <= 0.05  # measured 0.041; PUMA reports up to 0.08 on BERT-base


def test_puma_softmax_small_scores_and_no_mask() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 16, dtype=F64, generator=g)
    out = puma_softmax(OPS, scores)
    assert float((out - torch.softmax(scores, -1)).abs().max()) <= 7e-3


def test_puma_softmax_rejects_other_dims() -> None:
    with pytest.raises(ValueError):
        puma_softmax(OPS, torch.zeros(2, 3, dtype=F64), dim=0)
    with pytest.raises(TypeError):
        puma_softmax(OPS, torch.zeros(2, 3, dtype=F64), mask_bias=torch.ones(3, dtype=torch.bool))


def _power_softmax_exact(
    x: torch.Tensor, p: int, eps: float, mask: torch.Tensor | None
) -> torch.Tensor:
    xp = x**p
    if mask is None:
        return xp / (eps + xp.mean(-1, keepdim=True))
    xp = xp * mask
    length = torch.broadcast_to(mask, x.shape).sum(-1, keepdim=True).clamp(min=1)
    return xp / (eps + xp.sum(-1, keepdim=True) / length)


@pytest.mark.parametrize(("p", "upper", "iterations"), [(2, 10.0, 8), (4, 400.0, 10), (6, 1e4, 12)])
@pytest.mark.parametrize("masked", [False, True])
def test_power_softmax_against_exact_formula(
    p: int, upper: float, iterations: int, masked: bool
) -> None:
    g = torch.Generator().manual_seed(p)
    x = torch.randn(2, 4, 16, 16, dtype=F64, generator=g) * 2
    mask = torch.ones(2, 1, 1, 16, dtype=F64)
    mask[1, ..., -6:] = 0
    m = mask if masked else None
    exact = _power_softmax_exact(x, p, 1e-6, m)
    denom = exact.new_tensor(0) + (x**p * (mask if masked else 1)).sum(-1) / (
        torch.broadcast_to(mask if masked else torch.ones_like(mask), x.shape).sum(-1)
    )
    _, lower, _ = bounded_reciprocal_start(upper, iterations)
    assert float(denom.min()) >= lower and float(denom.max()) <= upper  # inside the range
    out = power_softmax(OPS, x, p=p, mask=m, upper=upper, iterations=iterations)
    assert _max_rel(out[exact > 0], exact[exact > 0]) <= 1.0001e-3
    if masked:
        assert bool((out[(mask == 0).expand_as(out)] == 0).all())


def test_power_softmax_fully_masked_row_is_zero_and_bad_p() -> None:
    x = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(5)) * 2  # other rows in range
    mask = torch.ones(3, 8, dtype=F64)
    mask[1] = 0
    out = power_softmax(OPS, x, mask=mask, upper=100.0)
    assert bool((out[1] == 0).all()) and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError):
        power_softmax(OPS, x, p=3)
    with pytest.raises(ValueError):
        power_softmax(OPS, x, mask=torch.full((3, 8), 0.5, dtype=F64))


@pytest.mark.parametrize("p", [2, 4, 6, 8, 10, 12, 14])
def test_even_power_is_exact(p: int) -> None:
    x = torch.linspace(-2, 2, 101, dtype=F64)
    torch.testing.assert_close(even_power(OPS, x, p), x**p, rtol=1e-14, atol=0)
    assert _record(even_power, x, p).products == math.ceil(math.log2(p))  # minimum depth


# ---------------------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ---------------------------------------------------------------------------------------


def _activations(rows: int = 64, n: int = 384) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, rows // 2, n, dtype=F64, generator=g) * 2 + 0.5
    idx = torch.randint(0, n, (2, rows // 2, 3), generator=g)
    sign = torch.randint(0, 2, idx.shape, generator=g).to(F64) * 2 - 1
    x.scatter_(-1, idx, 20.0 * sign)  # a few outliers of size 20 per row
    gamma = 1 + 0.1 * torch.randn(n, dtype=F64, generator=g)
    beta = 0.1 * torch.randn(n, dtype=F64, generator=g)
    return x, gamma, beta


@pytest.mark.parametrize(("newton", "bound"), [(0, 2e-5), (1, 1.1e-8)])
def test_layer_norm(newton: int, bound: float) -> None:
    x, gamma, beta = _activations()
    n = x.shape[-1]
    ref = F.layer_norm(x, (n,), gamma, beta, eps=1e-12)
    out = layer_norm(OPS, x, gamma, beta, newton_iterations=newton)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-3
    assert _max_rel(out - beta, ref - beta) <= bound  # relative error of the rsqrt factor
    plain = layer_norm(OPS, x, newton_iterations=newton)
    assert _max_rel(plain, F.layer_norm(x, (n,), eps=1e-12)) <= bound


@pytest.mark.parametrize(("newton", "bound"), [(0, 2e-5), (1, 1.1e-8)])
def test_rms_norm(newton: int, bound: float) -> None:
    x, gamma, _ = _activations()
    n = x.shape[-1]
    ref = F.rms_norm(x, (n,), gamma, eps=1e-6)
    assert _max_rel(rms_norm(OPS, x, gamma, newton_iterations=newton), ref) <= bound
    plain = rms_norm(OPS, x, newton_iterations=newton)
    assert _max_rel(plain, F.rms_norm(x, (n,), eps=1e-6)) <= bound


# ---------------------------------------------------------------------------------------
# The forms only touch the interface; their call structure (rounds under MPC)
# ---------------------------------------------------------------------------------------

PRODUCTS = ("mul", "mul_many", "sum_of_products")


class RecordingOps:
    """FloatOps that counts every interface call (and the batch size of mul_many)."""

    def __init__(self) -> None:
        self.inner = FloatOps()
        self.calls: Counter[str] = Counter()
        self.thresholds: list[int] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        target = getattr(self.inner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if name == "less_than_public":
                self.thresholds.append(len(args[1]))
            return target(*args, **kwargs)

        return wrapper

    @property
    def products(self) -> int:
        return sum(self.calls[k] for k in PRODUCTS)


class Box:
    """An opaque secret: no arithmetic, no truth value, not a tensor."""

    __slots__ = ("v",)

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v

    def __bool__(self) -> bool:
        raise TypeError("Python control flow on a secret value")

    def __float__(self) -> float:
        raise TypeError("a secret value was opened")


class OpaqueOps:
    """SecureOps whose values are opaque boxes, so any use outside the interface fails."""

    def __init__(self) -> None:
        self.f = FloatOps()

    def shape(self, x: Box) -> torch.Size:
        return x.v.shape

    def from_public(self, c: torch.Tensor) -> Box:
        assert isinstance(c, torch.Tensor)
        return Box(c.to(F64))

    def map_shape(self, x: Box, fn: Callable[[torch.Tensor], torch.Tensor]) -> Box:
        return Box(fn(x.v))

    def add(self, x: Box, y: Box) -> Box:
        return Box(x.v + y.v)

    def sub(self, x: Box, y: Box) -> Box:
        return Box(x.v - y.v)

    def neg(self, x: Box) -> Box:
        return Box(-x.v)

    def add_public(self, x: Box, c: Any) -> Box:
        assert not isinstance(c, Box)
        return Box(x.v + c)

    def mul_public(self, x: Box, c: Any) -> Box:
        assert not isinstance(c, Box)
        return Box(x.v * c)

    def sum(self, x: Box, dim: int, keepdim: bool = False) -> Box:
        return Box(x.v.sum(dim=dim, keepdim=keepdim))

    def dot_public(self, terms: Sequence[Box], coeffs: Sequence[float], bias: float = 0.0,
                   truncate: bool = True) -> Box:
        assert all(isinstance(c, float | int) for c in coeffs) and isinstance(bias, float | int)
        return Box(self.f.dot_public([t.v for t in terms], coeffs, bias, truncate))

    def mul(self, x: Box, y: Box) -> Box:
        return Box(x.v * y.v)

    def mul_many(self, pairs: Sequence[tuple[Box, Box]]) -> list[Box]:
        return [Box(x.v * y.v) for x, y in pairs]

    def matmul(self, x: Box, y: Box) -> Box:
        return Box(x.v @ y.v)

    def matmul_many(self, pairs: Sequence[tuple[Box, Box]]) -> list[Box]:
        return [Box(x.v @ y.v) for x, y in pairs]

    def sum_of_products(self, pairs: Sequence[tuple[Box, Box]], dim: int | None = None) -> Box:
        out = sum(x.v * y.v for x, y in pairs)
        return Box(out if dim is None else out.sum(dim=dim, keepdim=True))

    def less_than_public(self, x: Box, thresholds: Sequence[float], magnitude: float | None = None) -> list[Box]:
        return [Box(b) for b in self.f.less_than_public(x.v, thresholds, magnitude)]

    def less_than(self, x: Box, y: Box) -> Box:
        return Box(self.f.less_than(x.v, y.v))

    def max(self, x: Box, dim: int = -1, keepdim: bool = True) -> Box:
        return Box(self.f.max(x.v, dim, keepdim))

    def max_and_below(self, x: Box, gap: float, magnitude: float | None = None) -> tuple[Box, Box]:
        top, below = self.f.max_and_below(x.v, gap, magnitude)
        return Box(top), Box(below)

    def frexp(self, x: Box, exponent_fn: Callable[[int], float],
              bounds: tuple[float, float] | None = None) -> tuple[Box, Box]:
        m, s = self.f.frexp(x.v, exponent_fn, bounds)
        return Box(m), Box(s)

    def frexp_segments(self, x: Box, exponent_fn: Callable[[int], float], segments: int = 1,
                       tables: Sequence[Callable[[int], float]] = (), times: Any = None,
                       bounds: tuple[float, float] | None = None,
                       mantissa_tables: Sequence[Callable[[int], float]] = (),
                       factor_tables: Sequence[Callable[[int], float]] = (),
                       times_table: Callable[[int], float] | None = None) -> tuple[Box, Box, list[Box]]:
        if callable(times):
            times = times()
        m, s, values = self.f.frexp_segments(x.v, exponent_fn, segments, tables,
                                             None if times is None else times.v, bounds, mantissa_tables,
                                             factor_tables, times_table)
        return Box(m), Box(s), [Box(v) for v in values]

    def check_range(self, x: Box, lower: float | None, upper: float | None, what: str) -> None:
        self.f.check_range(x.v, lower, upper, what)


def _cases() -> dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...], dict[str, Any]]]:
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 3, 8, dtype=F64, generator=g) * 3
    x, gamma, beta = _activations(rows=4, n=16)
    bias = torch.zeros(2, 1, 8, dtype=F64)
    bias[1, :, -2:] = -1e9
    mask = (bias == 0).to(F64)
    return {
        "puma_gelu": (puma_gelu, (z,), {}),
        "puma_silu": (puma_silu, (z,), {}),
        "even_gelu": (even_gelu, (z,), {}),
        "even_silu": (even_silu, (z,), {}),
        "clipped_exp": (clipped_exp, (-z.abs(),), {}),
        "clipped_exp_o2": (clipped_exp, (-z.abs(),), {"t": 6, "order": 2}),
        "reciprocal": (reciprocal, (z.abs() + 0.1,), {}),
        "reciprocal_bounded": (reciprocal_bounded, (z.abs() + 0.3, 20.0, 8), {}),  # in [0.27, 20]
        "divide_bounded": (divide_bounded, (z, z.abs() + 0.3, 20.0, 8), {}),
        "rsqrt": (rsqrt, (z.abs() + 0.1,), {}),
        "mul_rsqrt": (mul_rsqrt, (z, z.abs() + 0.1), {"newton_iterations": 1}),
        "puma_softmax": (puma_softmax, (z,), {"mask_bias": bias}),
        "power_softmax": (power_softmax, (z,), {"mask": mask, "upper": 1e4, "iterations": 12}),
        "layer_norm": (layer_norm, (x, gamma, beta), {}),
        "rms_norm": (rms_norm, (x, gamma), {"newton_iterations": 1}),
    }


# Secret positional arguments per form (the rest are public).
_SECRET_ARGS = {
    "reciprocal_bounded": 1,
    "divide_bounded": 2,
    "mul_rsqrt": 2,
    "layer_norm": 3,
    "rms_norm": 2,
}


@pytest.mark.parametrize("name", list(_cases()))
def test_forms_only_use_the_interface(name: str) -> None:
    form, args, kwargs = _cases()[name]
    n_secret = _SECRET_ARGS.get(name, 1)
    boxed = [Box(a) for a in args[:n_secret]] + list(args[n_secret:])
    out = form(OpaqueOps(), *boxed, **kwargs)
    assert isinstance(out, Box)
    torch.testing.assert_close(out.v, form(OPS, *args, **kwargs), rtol=0, atol=0)


def _record(form: Callable[..., Any], *args: Any, **kwargs: Any) -> RecordingOps:
    rec = RecordingOps()
    form(rec, *args, **kwargs)
    return rec


def test_call_structure_gelu_silu() -> None:
    z = torch.linspace(-6, 6, 101, dtype=F64)
    for form in (puma_gelu, puma_silu):
        rec = _record(form, z)
        assert rec.calls["less_than_public"] == 1 and rec.thresholds == [3]
        # powers: mul, mul_many, mul; the tail: one sum_of_products (one reshare under MPC)
        assert rec.products <= 4 and rec.calls["mul_many"] == 1 and rec.calls["sum_of_products"] == 1
        assert rec.calls["dot_public"] == 2
        assert rec.calls["max"] == rec.calls["frexp"] == rec.calls["less_than"] == 0
    for form in (even_gelu, even_silu):  # tests/test_gelu.py pins their rounds and bytes
        rec = _record(form, z)
        assert rec.calls["less_than_public"] == 1 and rec.thresholds == [2]
        # z = (kappa^2 x) x (the factor untruncated), q = z (z + alpha), the polynomial's sum;
        # the tail: the bit products
        assert rec.products == 4 and rec.calls["mul"] == 1 and rec.calls["sum_of_products"] == 3
        assert rec.calls["dot_public"] == 1 and rec.calls["mul_many"] == 0
        assert rec.calls["max"] == rec.calls["frexp"] == rec.calls["less_than"] == 0


def test_call_structure_exp_reciprocal_rsqrt() -> None:
    z = torch.linspace(-14, 0, 11, dtype=F64)
    rec = _record(clipped_exp, z, t=8)
    assert rec.calls["less_than_public"] == 1 and rec.products == 9
    rec = _record(clipped_exp, z, t=6, order=2)
    assert rec.calls["less_than_public"] == 1 and rec.products == 8
    pos = torch.linspace(0.1, 10, 11, dtype=F64)
    for k in (1, 2, 3):
        rec = _record(reciprocal, pos, k)
        assert rec.calls["frexp"] == 1 and rec.products == 1 + k
    for k in (2, 8, 10):
        rec = _record(reciprocal_bounded, pos, 20.0, k, check=False)
        assert rec.products == k and rec.calls["frexp"] == rec.calls["less_than_public"] == 0
        rec = _record(divide_bounded, pos, pos, 20.0, k, check=False)
        assert rec.products == k and rec.calls["frexp"] == rec.calls["less_than_public"] == 0
    for k in (0, 1, 2):
        assert _record(rsqrt, pos, k).products == 3 + 2 * k
    # the quadratic with no Newton step: two product passes after frexp's; the cubic with k
    assert _record(mul_rsqrt, pos, pos, 0).products == 2
    for k in (1, 2):
        assert _record(mul_rsqrt, pos, pos, k).products == 3 + 2 * k
    rec = _record(divide, pos, pos, (0.05, 20.0))
    assert rec.calls["frexp_segments"] == 1 and rec.products == 2


def test_call_structure_softmax_and_norms() -> None:
    z, bias, _ = _attention_scores()
    rec = _record(puma_softmax, z, t=8, mask_bias=bias, exp_order=1)
    # the clip's bits come with the maximum: no comparison of their own
    assert rec.calls["max_and_below"] == 1 and rec.calls["max"] == rec.calls["less_than_public"] == 0
    assert rec.calls["frexp"] == 1
    assert rec.products == (8 + 1) + (2 + 1) + 1  # exp, reciprocal (2 iterations), broadcast
    rec = _record(puma_softmax, z, mask_bias=bias)  # default: t = 6, third-order exp base
    assert rec.products == (6 + 3) + (2 + 1) + 1
    rec = _record(power_softmax, z, p=4, upper=1e4, iterations=10, check=False)
    assert rec.calls["max"] == rec.calls["max_and_below"] == rec.calls["less_than_public"] == rec.calls["frexp"] == 0
    assert rec.products == 2 + 10
    x, gamma, beta = _activations(rows=4, n=16)
    # S (summed per row before its truncation) and d * gamma are two calls run concurrently:
    # one pass under MPC, then two in mul_rsqrt
    rec = _record(layer_norm, x, gamma, beta)
    assert rec.calls["frexp_segments"] == 1 and rec.products == 4 and rec.calls["sum_of_products"] == 1
    assert rec.calls["less_than_public"] == rec.calls["max"] == rec.calls["frexp"] == 0
    rec = _record(rms_norm, x, gamma)
    assert rec.calls["frexp_segments"] == 1 and rec.products == 4
    rec = _record(puma_softmax, z, mask_bias=bias, exp_form="poly", division="piecewise")
    assert rec.calls["frexp_segments"] == 1 and rec.calls["frexp"] == 0
    assert rec.products == _record(puma_softmax, z, mask_bias=bias, exp_form="poly").products - 2
