"""FixedPointOps: the one-process fixed-point simulation of MpcOps.

(1) Every form in secure.approx on FixedPointOps agrees with the same form on three-party
shares (MpcOps, in-process engine) within a per-form tolerance in *scaled ulps*:
``|fixed - mpc| / (2^-f * max(1, |ref|))`` where ``ref`` is the FloatOps output, taken
element-wise for element-wise forms and as the row maximum of ``|ref|`` for row forms
(softmax, Power-Softmax, norms). The MPC side truncates at random, so the tolerances are
measured maxima over 60 MPC runs (both truncation modes) with a margin of about 1.5-2x:

==================  =========================  =========
form                measured max (floor/prob)  tolerance
==================  =========================  =========
puma_gelu           2 / 2                      4
puma_silu           2 / 2                      4
even_gelu           8 / 7  (10 runs)           16
even_silu           12 / 12 (10 runs)          24
clipped_exp t8 o1   459 / 426  (~1.8 * 2^t)    768
clipped_exp t6 o3   212 / 154  (~3.3 * 2^t)    384
reciprocal          5 / 5                      10
rsqrt               2 / 2                      4
puma_softmax        67 / 42   (t6 o3)          96
puma_softmax        131 / 128 (t8 o1, PUMA)    256
power_softmax       266 / 180 (150 runs)       512
layer_norm          9.1 / 11.7                 24
rms_norm            9.2 / 10.0                 24
==================  =========================  =========

The forms that square a rounded value 2^t times (exp, softmax) or t times near 1
(Goldschmidt in Power-Softmax) amplify a one-ulp truncation difference accordingly.

Each form on FixedPointOps also meets the bounds tests/test_forms_mpc.py asserts for MpcOps
against the exact function and against FloatOps (the form's documented error plus the
fixed-point allowance).
(2) Scale tracking: bits stay integral, products with bits are exact (equal ring values
on both backends). (3) frexp equals torch.frexp on the decoded input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import given
from hypothesis import strategies as st

from secure.approx.exp import clipped_exp
from secure.approx.float_backend import FloatOps
from secure.approx.gelu import even_gelu, even_silu, puma_gelu, puma_silu
from secure.approx.interface import SecureOps
from secure.approx.norms import layer_norm, rms_norm
from secure.approx.reciprocal import reciprocal, rsqrt
from secure.approx.softmax import power_softmax, puma_softmax
from secure.mpc.backend import MpcOps
from secure.mpc.ring import FixedPoint, FixedPointOverflowError
from secure.mpc.simulation import FREXP_EXTRA_BITS, Fixed, FixedPointOps

F64 = torch.float64
FRAC = 18
ULP = 2.0**-FRAC
MODES = ("floor", "probabilistic")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- inputs (the same as tests/test_forms_mpc.py) -------------------------------------------

SCORES = torch.randn(2, 12, 32, 32, dtype=F64, generator=_gen(0)) * 3
MASK_BIAS = torch.zeros(2, 1, 1, 32, dtype=F64)
MASK_BIAS[1, ..., -8:] = -1e9
PS_X = torch.randn(2, 4, 16, 16, dtype=F64, generator=_gen(4)) * 2
PS_MASK = torch.ones(2, 1, 1, 16, dtype=F64)
PS_MASK[1, ..., -6:] = 0
NORM_X = torch.randn(16, 384, dtype=F64, generator=_gen(1)) * 2
NORM_X[3, 7] = 20.0
NORM_X[9, 100] = -20.0
GAMMA = 1 + 0.1 * torch.randn(384, dtype=F64, generator=_gen(2))
BETA = 0.1 * torch.randn(384, dtype=F64, generator=_gen(3))


def _power_softmax_exact(x: torch.Tensor) -> torch.Tensor:
    xp = x**4 * PS_MASK
    return xp / (1e-6 + xp.sum(-1, keepdim=True) / PS_MASK.sum(-1, keepdim=True))


@dataclass(frozen=True)
class Case:
    """A form, its secret inputs, the exact function, and the error measures."""

    form: Callable[..., object]
    inputs: tuple[torch.Tensor, ...]
    exact: Callable[..., torch.Tensor]
    error: Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], bool]
    """error(out, target, inputs) -> whether out is within the form's bound of target."""
    ulps: float
    rows: bool  # scaled-ulps measure per row (max |ref| of the row) instead of element-wise


def _abs(bound: float) -> Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], bool]:
    return lambda out, ref, _: float((out - ref).abs().max()) <= bound


def _rel_to_max(bound: float, rows: bool = False
                ) -> Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], bool]:
    def ok(out: torch.Tensor, ref: torch.Tensor, _: tuple[torch.Tensor, ...]) -> bool:
        scale = ref.abs().amax(-1, keepdim=True) if rows else ref.abs().max()
        return float(((out - ref).abs() / scale).max()) <= bound
    return ok


def _relative(rel: float) -> Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], bool]:
    return lambda out, ref, _: bool(((out - ref).abs() <= rel * ref.abs() + 8 * ULP).all())


CASES: dict[str, Case] = {
    "puma_gelu": Case(puma_gelu, (torch.linspace(-8, 8, 4001, dtype=F64),), Fn.gelu,
                      _abs(0.0205), 4, False),
    "puma_silu": Case(puma_silu, (torch.linspace(-10, 10, 2001, dtype=F64),), Fn.silu,
                      _abs(0.073), 4, False),
    "even_gelu": Case(even_gelu, (torch.linspace(-8, 8, 4001, dtype=F64),), Fn.gelu,
                      _abs(2.6e-3), 16, False),
    "even_silu": Case(even_silu, (torch.linspace(-10, 10, 2001, dtype=F64),), Fn.silu,
                      _abs(0.0145), 24, False),
    "clipped_exp_t8_o1": Case(lambda o, a: clipped_exp(o, a, t=8, order=1),
                              (torch.linspace(-16, 0, 3001, dtype=F64),), torch.exp,
                              _abs(2.5e-3), 768, False),
    "clipped_exp_t6_o3": Case(lambda o, a: clipped_exp(o, a, t=6, order=3),
                              (torch.linspace(-16, 0, 3001, dtype=F64),), torch.exp,
                              _abs(8e-4), 384, False),
    "reciprocal": Case(reciprocal, (torch.logspace(-1.3, 3, 400, dtype=F64),), torch.reciprocal,
                       _relative(1e-3), 10, False),
    "rsqrt": Case(rsqrt, (torch.logspace(-2, 4, 400, dtype=F64),), torch.rsqrt,
                  _relative(1e-3), 4, False),
    "puma_softmax": Case(lambda o, a: puma_softmax(o, a, mask_bias=MASK_BIAS), (SCORES,),
                         lambda s: torch.softmax(s + MASK_BIAS, -1), _abs(4e-4), 96, True),
    "puma_softmax_t8_o1": Case(lambda o, a: puma_softmax(o, a, t=8, exp_order=1, mask_bias=MASK_BIAS),
                               (SCORES,), lambda s: torch.softmax(s + MASK_BIAS, -1),
                               _abs(8e-3), 256, True),
    "power_softmax": Case(lambda o, a: power_softmax(o, a, p=4, mask=PS_MASK, upper=400.0, iterations=10),
                          (PS_X,), _power_softmax_exact, _rel_to_max(2e-3, rows=True), 512, True),
    "layer_norm": Case(layer_norm, (NORM_X, GAMMA, BETA),
                       lambda x, g, b: Fn.layer_norm(x, (384,), g, b, eps=1e-12),
                       _rel_to_max(1e-3), 24, True),
    "rms_norm": Case(rms_norm, (NORM_X, GAMMA),
                     lambda x, g: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * g,
                     _rel_to_max(1e-3), 24, True),
}


def _on_fixed(case: Case, mode: str, seed: int = 0) -> torch.Tensor:
    ops = FixedPointOps(truncation=mode, seed=seed)
    out = case.form(ops, *[ops.encode(t) for t in case.inputs])
    assert isinstance(out, Fixed) and out.frac_bits == FRAC
    return ops.decode(out)


def _scaled_ulps(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, rows: bool) -> float:
    scale = (ref.abs().amax(-1, keepdim=True) if rows else ref.abs()).clamp(min=1.0)
    return float(((a - b).abs() / scale).max()) / ULP


# ---- (1) forms: FixedPointOps vs MpcOps, FloatOps and the exact function -------------------


@pytest.mark.parametrize("name", list(CASES))
def test_form_agrees_with_mpc_float_and_exact(runner, name: str) -> None:
    case = CASES[name]
    mpc = runner.run(lambda p, *a: case.form(MpcOps(p), *a), *[runner.share(t) for t in case.inputs])
    ref_float = case.form(FloatOps(), *case.inputs)
    exact = case.exact(*case.inputs)
    assert case.error(mpc, exact, case.inputs)  # the MPC side itself is in bounds
    for mode in MODES:
        out = _on_fixed(case, mode)
        ulps = _scaled_ulps(out, mpc, ref_float, case.rows)
        assert ulps <= case.ulps, f"{name} [{mode}]: {ulps:.1f} scaled ulps from MpcOps"
        assert case.error(out, exact, case.inputs), f"{name} [{mode}] vs exact"


@pytest.mark.parametrize(
    ("name", "bound"),
    [
        ("puma_gelu", 1e-3),  # test_forms_mpc: fixed point adds under 1e-3 (measured 9.4e-4)
        ("puma_silu", 2e-3),  # measured 1.34e-3
        ("even_gelu", 5e-5),  # tests/test_gelu.py: measured 2.2e-5
        ("even_silu", 5e-5),  # measured 3.1e-5
        ("clipped_exp_t8_o1", 2.0 ** (8 + 1 - FRAC)),  # documented ~2^(t+1-f) = 2e-3; 1.04e-3
        ("clipped_exp_t6_o3", 2.0 ** (6 + 2 - FRAC)),  # 2 * 2^(t+1-f): floor is biased, 5.6e-4
        ("puma_softmax", 4e-4),  # measured 2.0e-4 (floor), 1.3e-4 (probabilistic)
        ("puma_softmax_t8_o1", 1e-3),  # measured 3.8e-4
    ],
)
def test_fixed_point_error_against_float_form(name: str, bound: float) -> None:
    case = CASES[name]
    ref = case.form(FloatOps(), *case.inputs)
    for mode in MODES:
        assert float((_on_fixed(case, mode) - ref).abs().max()) <= bound, mode


@pytest.mark.parametrize("name", ["reciprocal", "rsqrt", "power_softmax", "layer_norm", "rms_norm"])
def test_fixed_point_error_against_float_form_relative(name: str) -> None:
    case = CASES[name]
    ref = case.form(FloatOps(), *case.inputs)
    for mode in MODES:
        assert case.error(_on_fixed(case, mode), ref, case.inputs), mode


def test_masked_entries_are_exactly_zero() -> None:
    for mode in MODES:
        assert bool((_on_fixed(CASES["puma_softmax"], mode)[1, ..., -8:] == 0).all())
        assert bool((_on_fixed(CASES["power_softmax"], mode)[1, ..., -6:] == 0).all())
        below = _on_fixed(CASES["clipped_exp_t8_o1"], mode)[CASES["clipped_exp_t8_o1"].inputs[0] < -14.01]
        assert bool((below == 0).all())


@given(st.lists(st.floats(0.05, 1000.0), min_size=1, max_size=40))
def test_reciprocal_matches_mpc(runner, values: list[float]) -> None:
    x = torch.tensor(values, dtype=F64)
    mpc = runner.run(lambda p, a: reciprocal(MpcOps(p), a), runner.share(x))
    for mode in MODES:
        ops = FixedPointOps(truncation=mode, seed=1)
        out = ops.decode(reciprocal(ops, ops.encode(x)))
        assert _scaled_ulps(out, mpc, 1 / x, rows=False) <= 10
        assert bool(((out - 1 / x).abs() <= 1e-3 / x + 8 * ULP).all())


def test_matmul_matches_mpc(runner) -> None:
    a = torch.randn(3, 8, 16, dtype=F64, generator=_gen(5))
    b = torch.randn(16, 4, dtype=F64, generator=_gen(6))
    mpc = runner.run(lambda p, x, y: MpcOps(p).matmul(x, y), runner.share(a), runner.share(b))
    for mode in MODES:
        ops = FixedPointOps(truncation=mode, seed=2)
        out = ops.decode(ops.matmul(ops.encode(a), ops.encode(b)))
        assert float((out - mpc).abs().max()) <= 2 * ULP
        assert float((out - a @ b).abs().max()) <= 16 * ULP  # 16 rounded inputs per entry


# ---- (2) scale tracking --------------------------------------------------------------------

values = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=30)


@given(values, st.sampled_from(MODES))
def test_bits_stay_integral_and_bit_products_are_exact(xs: list[float], mode: str) -> None:
    ops = FixedPointOps(truncation=mode, seed=3)
    x = ops.encode(torch.tensor(xs, dtype=F64))
    y = ops.encode(torch.tensor(xs[::-1], dtype=F64))
    b = ops.less_than(x, y)
    (c,) = ops.less_than_public(x, [0.25])
    for bit in (b, c, ops.sub(b, c), ops.neg(b), ops.add_public(ops.neg(b), 1.0), ops.mul(b, c),
                ops.mul_public(b, 3.0), ops.add_public(b, -2.0)):
        assert bit.frac_bits == 0
    assert torch.equal(b.ring, (x.ring < y.ring).to(torch.int64))
    assert torch.equal(c.ring, (x.ring < round(0.25 * 2**FRAC)).to(torch.int64))
    keep = ops.add_public(ops.neg(b), 1.0)
    assert torch.equal(keep.ring, 1 - b.ring)
    # products of a bit with a value: no truncation, exact in either mode
    for prod in (ops.mul(b, x), ops.mul(x, keep), *ops.mul_many([(b, y), (keep, y)])):
        assert prod.frac_bits == FRAC
    assert torch.equal(ops.mul(b, x).ring, torch.where(b.ring == 1, x.ring, 0))
    select = ops.add(ops.mul(b, y), ops.mul(keep, x))
    assert torch.equal(select.ring, torch.where(b.ring == 1, y.ring, x.ring))
    # an integral public product is exact, a non-integral constant lifts a bit to scale f
    assert torch.equal(ops.mul_public(x, -3.0).ring, -3 * x.ring)
    assert ops.add_public(b, 0.5).frac_bits == FRAC
    assert torch.equal(ops.decode(ops.add_public(b, 0.5)), b.ring.to(F64) + 0.5)
    assert torch.equal(ops.decode(ops.mul_public(b, 0.5)), b.ring.to(F64) * 0.5)
    # the maximum is exact (the MPC tree selects exactly)
    assert torch.equal(ops.max(x, dim=-1).ring, x.ring.amax(-1, keepdim=True))


def test_exact_operations_equal_mpc_ring_values(runner) -> None:
    """Comparisons, bit algebra, bit products and max give identical values on both backends."""
    x = torch.randn(4, 33, dtype=F64, generator=_gen(7)) * 10
    y = torch.randn(4, 33, dtype=F64, generator=_gen(8)) * 10

    def program(ops, a, b):
        lt = ops.less_than(a, b)
        c0, c1 = ops.less_than_public(a, [0.0, -2.5])
        keep = ops.add_public(ops.neg(lt), 1.0)
        sel = ops.add(ops.mul(lt, b), ops.mul(keep, a))
        return [lt, c0, c1, keep, sel, ops.max(a, dim=-1), ops.mul_public(a, 3.0), ops.sub(c0, c1)]

    mpc = runner.run(lambda p, a, b: program(MpcOps(p), a, b), runner.share(x), runner.share(y))
    ops = FixedPointOps(truncation="probabilistic", seed=4)
    fixed = [ops.decode(v) for v in program(ops, ops.encode(x), ops.encode(y))]
    for m, f in zip(mpc, fixed):
        assert torch.equal(m, f)
    assert torch.equal(fixed[4], torch.maximum(x, y).mul(2**FRAC).round().div(2**FRAC))


def test_truncation_modes() -> None:
    ring = torch.full((100_000,), (1 << 36) + (1 << 16), dtype=torch.int64)  # 1 + ulp/4 at 2f
    ring[::2] = -ring[::2]
    x = Fixed(ring, 2 * FRAC)
    floor = FixedPointOps(truncation="floor")._to_scale(x)
    assert floor.frac_bits == FRAC and torch.equal(floor.ring, ring >> FRAC)
    prob = FixedPointOps(truncation="probabilistic", seed=5)._to_scale(x).ring - (ring >> FRAC)
    assert set(prob.unique().tolist()) <= {0, 1}
    # stochastic rounding, as the real protocol: P(+1) = (x mod 2^d) / 2^d = 1/4 and 3/4
    assert abs(float(prob[1::2].double().mean()) - 0.25) < 0.01
    assert abs(float(prob[::2].double().mean()) - 0.75) < 0.01
    again = FixedPointOps(truncation="probabilistic", seed=5)._to_scale(x).ring - (ring >> FRAC)
    assert torch.equal(prob, again)  # reproducible from the seed
    exact = Fixed(ring & ~((1 << FRAC) - 1), 2 * FRAC)  # multiples of 2^d truncate exactly
    p = FixedPointOps(truncation="probabilistic", seed=6)._to_scale(exact)
    assert torch.equal(p.ring, exact.ring >> FRAC)


def test_dot_public_single_truncation() -> None:
    ops = FixedPointOps(truncation="floor")
    a, b = ops.encode(torch.tensor([1.3, -2.7])), ops.encode(torch.tensor([0.1, 5.0]))
    out = ops.dot_public([a, b], [0.5, -0.25], bias=0.75)
    c = [round(0.5 * 2**FRAC), round(-0.25 * 2**FRAC)]
    acc = a.ring * c[0] + b.ring * c[1] + round(0.75 * 2**(2 * FRAC))
    assert out.frac_bits == FRAC and torch.equal(out.ring, acc >> FRAC)


def test_errors() -> None:
    ops = FixedPointOps()
    with pytest.raises(FixedPointOverflowError):
        ops.encode(torch.tensor([2.0**45]))
    with pytest.raises(ValueError):
        ops.encode(torch.tensor([float("nan")]))
    x = ops.encode(torch.ones(3))
    with pytest.raises(FixedPointOverflowError):
        ops.add_public(x, 2.0**50)
    with pytest.raises(FixedPointOverflowError):
        ops.mul_public(x, 2.0**50 + 0.5)
    with pytest.raises(RuntimeError):
        ops.add(x, ops.encode(torch.ones(4)))  # shape mismatch, from torch
    with pytest.raises(ValueError):
        ops.dot_public([x], [1.0, 2.0])
    with pytest.raises(ValueError):
        ops.max(ops.encode(torch.ones(2, 0)), dim=-1)
    with pytest.raises(ValueError):
        FixedPointOps(truncation="round")
    with pytest.raises(TypeError):
        Fixed(torch.ones(3), FRAC)


def test_implements_every_secure_ops_method() -> None:
    for name, proto in inspect.getmembers(SecureOps, inspect.isfunction):
        if name.startswith("_"):
            continue
        impl = getattr(FixedPointOps, name, None)
        assert impl is not None, f"FixedPointOps lacks {name}"
        assert list(inspect.signature(impl).parameters) == list(inspect.signature(proto).parameters), name


def test_shape_operations_and_public_values() -> None:
    ops = FixedPointOps()
    x = ops.encode(torch.arange(12, dtype=F64).reshape(3, 4) / 7)
    y = ops.map_shape(x, lambda t: t.transpose(0, 1)[1:])
    assert ops.shape(y) == torch.Size((3, 3)) and y.frac_bits == FRAC
    assert torch.equal(ops.decode(y), ops.decode(x).transpose(0, 1)[1:])
    c = ops.from_public(torch.tensor([[0.5, -1.25, 3.0, 1e-7]], dtype=F64))
    assert c.frac_bits == FRAC and torch.equal(c.ring, torch.tensor([[1 << 17, -(5 << 16), 3 << 18, 0]]))
    cat = ops.concat([x, c], dim=0)
    assert cat.shape == torch.Size((4, 4)) and torch.equal(cat.ring[:3], x.ring)
    with pytest.raises(ValueError):
        ops.concat([x, ops.less_than(x, x)], dim=0)  # scales f and 0
    with pytest.raises(FixedPointOverflowError):
        ops.from_public(torch.tensor([1e20]))


# ---- (3) frexp -----------------------------------------------------------------------------

DOMAIN_BITS = 2 * FRAC + FREXP_EXTRA_BITS  # 2^-f <= x < 2^(f+25)


@given(st.lists(st.integers(1, 2**min(DOMAIN_BITS, 53) - 1), min_size=1, max_size=40),  # float64-exact
       st.sampled_from(MODES))
def test_frexp_equals_torch_frexp(rings: list[int], mode: str) -> None:
    ops = FixedPointOps(truncation=mode, seed=7)
    x = Fixed(torch.tensor(rings, dtype=torch.int64), FRAC)
    value = ops.decode(x)
    mant, expo = torch.frexp(value)
    m, e = ops.frexp(x, float)
    assert m.frac_bits == FRAC and e.frac_bits == FRAC
    assert torch.equal(ops.decode(e), expo.to(F64))
    diff = ops.decode(m) - mant  # m = x 2^-e truncated once to f bits
    assert bool((diff.abs() < ULP).all())
    if mode == "floor":
        assert bool((diff <= 0).all())
    exact = expo <= 0  # x 2^-e = x 2^|e| keeps x's f fraction bits
    assert bool((diff[exact] == 0).all())
    _, s = ops.frexp(x, lambda k: 2.0**-k)  # the reciprocal's factor, encoded at f (2^-19 -> 0)
    assert torch.equal(s.ring, ops.encode(torch.ldexp(torch.ones_like(value), -expo)).ring)


def test_frexp_domain_clamp_and_mpc(runner) -> None:
    fp = FixedPoint()
    ops = FixedPointOps(truncation="probabilistic", seed=8)
    # outside the domain the protocol's one-hot is empty: both outputs exactly 0
    x = torch.tensor([0.0, -1.0, 2.0**43, 3.0, 2.0**-19, 2.0**-18, 6e7])  # 2^-19 encodes as 0
    m, e = ops.frexp(ops.encode(x), lambda k: float(k) + 100)
    assert torch.equal(ops.decode(e), torch.tensor([0.0, 0, 0, 102, 0, 100 - 17, 126], dtype=F64))
    assert bool((ops.decode(m)[[0, 1, 2, 4]] == 0).all())
    # clamping of huge exponent values to +-max_abs / 4
    _, big = ops.frexp(ops.encode(torch.tensor([1.0])), lambda k: 1e300)
    assert float(ops.decode(big)) == fp.max_abs / 4
    # against the protocol: same factor, mantissa within one truncation ulp
    pos = torch.logspace(-5, 7.5, 300, dtype=F64)
    m_mpc, e_mpc = runner.run(lambda p, a: list(MpcOps(p).frexp(a, lambda k: 2.0 ** (-(k + 1) / 2))),
                              runner.share(pos))
    m_fx, e_fx = ops.frexp(ops.encode(pos), lambda k: 2.0 ** (-(k + 1) / 2))
    assert torch.equal(ops.decode(e_fx), e_mpc)
    assert float((ops.decode(m_fx) - m_mpc).abs().max()) <= ULP
