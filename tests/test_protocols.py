"""Each three-party protocol against its plaintext result, with round counts and errors."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secure.mpc import arithmetic as ar
from secure.mpc import compare as cmp
from secure.mpc import shares as sh
from secure.mpc.boolean import msb_many, msb_of_differences
from secure.mpc.engine import LocalCluster, PartyFailure
from secure.mpc.party import ShareOwnershipError
from secure.mpc.ring import FixedPoint, FixedPointOverflowError
from secure.transport.base import PeerTimeoutError
from secure.transport.inprocess import InProcessNetwork

ULP = 2.0**-18


def floats(lo: float = -1000.0, hi: float = 1000.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def tensors(shape_strategy, lo=-1000.0, hi=1000.0):
    return shape_strategy.flatmap(
        lambda shape: st.lists(floats(lo, hi), min_size=_n(shape), max_size=_n(shape)).map(
            lambda v: torch.tensor(v, dtype=torch.float64).reshape(shape)))


def _n(shape):
    n = 1
    for s in shape:
        n *= s
    return n


shapes = st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 3, 4)])


@given(tensors(shapes), st.data())
def test_add_sub_and_public_ops(runner, x, data):
    y = data.draw(tensors(st.just(tuple(x.shape))))
    X, Y = runner.share(x), runner.share(y)
    s, d, n = runner.run(lambda p, a, b: [sh.add(a, b), sh.sub(a, b), sh.neg(a)], X, Y)
    assert torch.allclose(s, x + y, atol=2 * ULP)
    assert torch.allclose(d, x - y, atol=2 * ULP)
    assert torch.allclose(n, -x, atol=ULP)


@given(tensors(shapes, -300, 300), st.data())
def test_mul_matches_plaintext(runner, x, data):
    y = data.draw(tensors(st.just(tuple(x.shape)), -300, 300))
    out = runner.run(lambda p, a, b: ar.mul(p, a, b), runner.share(x), runner.share(y))
    # encoding error of each factor (|x| + |y|) * ulp/2 plus 1 ulp from truncation
    tol = (x.abs() + y.abs()) * ULP / 2 + 2 * ULP
    assert torch.all((out - x * y).abs() <= tol + 1e-9)


@given(tensors(st.sampled_from([(1,), (6,), (2, 5)]), -100, 100), st.data())
def test_sum_of_products_of_bits_and_values_matches_plaintext(runner, x, data):
    """Bits times values at mixed scales (f and 2f), summed: one reshare, one fused truncation."""
    y = data.draw(tensors(st.just(tuple(x.shape)), -100, 100))
    bits = data.draw(tensors(st.just(tuple(x.shape)), 0, 1)).round()
    X, Y, B = runner.share(x), runner.share(y), runner.share(bits, integral=True)

    def program(p, a, b, c):
        y2 = ar.mul_untruncated_many(p, [(b, b)])[0]  # y^2 at scale 2f, untruncated
        return ar.sum_of_products(p, [(c, a), (c, y2), (a, b)])

    out = runner.run(program, X, Y, B)
    want = bits * x + bits * y * y + x * y
    tol = (x.abs() + y.abs() * (1 + 2 * y.abs()) + 1) * ULP * 2
    assert torch.all((out - want).abs() <= tol + 1e-9)


def test_sum_of_products_costs_what_one_product_costs(runner):
    x = torch.randn(64, dtype=torch.float64)
    X, B = runner.share(x), runner.share((x > 0).double(), integral=True)
    r0, b0 = runner.cluster.rounds, sum(runner.cluster.bytes_sent())
    runner.run(lambda p, a, b: ar.sum_of_products(p, [(b, a), (a, a), (b, a)]), X, B)
    r1, b1 = runner.cluster.rounds, sum(runner.cluster.bytes_sent())
    runner.run(lambda p, a: ar.mul(p, a, a), X)
    r2, b2 = runner.cluster.rounds, sum(runner.cluster.bytes_sent())
    assert r1 - r0 == r2 - r1  # the open after each program included in both
    assert b1 - b0 == b2 - b1


def test_mul_broadcasts_and_handles_large_magnitudes(runner):
    x = torch.tensor([[1e4], [-1e4], [3.5]], dtype=torch.float64)
    y = torch.tensor([[2.0, -1e3, 1e-3]], dtype=torch.float64)
    out = runner.run(lambda p, a, b: ar.mul(p, a, b), runner.share(x), runner.share(y))
    assert out.shape == (3, 3)
    assert torch.allclose(out, x * y, rtol=1e-6, atol=0.02)


@given(st.sampled_from([(1, 1, 1), (4, 7, 3), (0, 3, 2), (3, 0, 2), (2, 5, 0)]),
       st.integers(1, 3), st.data())
def test_matmul_matches_plaintext(runner, dims, batch, data):
    m, k, n = dims
    x = data.draw(tensors(st.just((batch, m, k)), -30, 30))
    y = data.draw(tensors(st.just((k, n)), -30, 30))
    out = runner.run(lambda p, a, b: ar.matmul(p, a, b), runner.share(x), runner.share(y))
    assert out.shape == (batch, m, n)
    # each factor's encoding error (ulp/2) times the other factor's row/column mass
    tol = (x.abs().sum(-1, keepdim=True) + y.abs().sum(0)) * ULP / 2 + 2 * ULP
    assert torch.all((out - x @ y).abs() <= tol)


def test_truncation_error_is_at_most_one_ulp(runner):
    x = torch.randn(20000, dtype=torch.float64) * 100
    X = sh.deal_shares(runner.fp.encode(x) << 10, 28)  # the value at scale 2^28
    out = runner.run(lambda p, a: ar.truncate_many(p, [a], [10])[0], X)
    err = (out - runner.fp.decode(runner.fp.encode(x))).abs()
    assert float(err.max()) <= ULP + 1e-12


def test_multiply_and_truncate_cost_one_round_each(runner):
    x = runner.share(torch.randn(10, dtype=torch.float64))
    assert runner.rounds_of(lambda p, a: ar.mul_untruncated_many(p, [(a, a)] * 3), x) == 1
    assert runner.rounds_of(lambda p, a: ar.truncate_many(p, [a, a], [18, 18]), x) == 1
    assert runner.rounds_of(lambda p, a: ar.truncate_exact_many(p, [a, a], [18, 18]), x) == 2
    assert runner.rounds_of(lambda p, a: ar.mul(p, a, a), x) == 2  # exact truncation fused into the product
    bits = runner.share(torch.tensor([0, 1, 1, 0] * 2 + [1, 0]), integral=True)
    assert runner.rounds_of(lambda p, a, b: ar.mul(p, b, a), x, bits) == 1


@given(tensors(shapes), st.data())
def test_less_than_matches_plaintext(runner, x, data):
    y = data.draw(tensors(st.just(tuple(x.shape))))
    x = torch.where(torch.rand(x.shape) < 0.2, y, x)  # include ties
    fx, fy = runner.fp.decode(runner.fp.encode(x)), runner.fp.decode(runner.fp.encode(y))
    out = runner.run(lambda p, a, b: cmp.less_than(p, a, b), runner.share(x), runner.share(y))
    assert torch.equal(out, (fx < fy).double())


def test_msb_at_the_edges_of_the_range(runner):
    big = 2.0**43 - 1
    x = torch.tensor([0.0, ULP, -ULP, big, -big, 1e10, -1e10, 0.5, -0.5], dtype=torch.float64)
    out = runner.run(lambda p, a: msb_many(p, [a])[0], runner.share(x))
    assert torch.equal(out, (x < 0).double())


def test_less_than_costs_at_most_eight_rounds_batched(runner):
    x = runner.share(torch.randn(1000, dtype=torch.float64))
    r = runner.rounds_of(lambda p, a: cmp.less_than_public(p, a, [-4.0, -1.95, 3.0]), x)
    assert r <= 8
    assert runner.rounds_of(lambda p, a: cmp.less_than(p, a, a), x) == r


def test_comparison_of_broadcast_shapes(runner):
    x = torch.randn(4, 1, dtype=torch.float64)
    y = torch.randn(1, 5, dtype=torch.float64)
    out = runner.run(lambda p, a, b: cmp.less_than(p, a, b), runner.share(x), runner.share(y))
    assert torch.equal(out, (x < y).double())


@given(tensors(shapes, -50, 50))
def test_relu_select_equal(runner, x):
    y = torch.where(torch.rand(x.shape) < 0.5, x, x.flip(-1) if x.dim() else x)
    X, Y = runner.share(x), runner.share(y)

    def prog(p, a, b):
        lt = cmp.less_than(p, a, b)
        return [cmp.relu(p, a), cmp.relu_mask(p, a), cmp.select(p, lt, a, b), cmp.equal(p, a, b)]

    relu, mask, sel, eq = runner.run(prog, X, Y)
    fx, fy = runner.fp.decode(runner.fp.encode(x)), runner.fp.decode(runner.fp.encode(y))
    assert torch.allclose(relu, fx.clamp(min=0), atol=ULP)
    assert torch.equal(mask, (fx >= 0).double())
    assert torch.allclose(sel, torch.minimum(fx, fy), atol=ULP)
    assert torch.equal(eq, (fx == fy).double())


@given(st.sampled_from([(1,), (2,), (5,), (3, 8), (2, 3, 7)]), st.data())
def test_max_by_tree(runner, shape, data):
    x = data.draw(tensors(st.just(shape), -100, 100))
    out = runner.run(lambda p, a: cmp.max_along(p, a, dim=-1), runner.share(x))
    ref = runner.fp.decode(runner.fp.encode(x)).amax(-1, keepdim=True)
    assert torch.allclose(out, ref, atol=ULP)


@given(st.integers(1, 40), st.sampled_from([2, 3, 4, 8]), st.data())
def test_max_with_ties_and_any_group(runner, n, group, data):
    """Few distinct values, so most groups hold ties: exactly one winner each."""
    vals = data.draw(st.lists(st.sampled_from([-3.0, 0.5, 2.0]), min_size=n, max_size=n))
    x = torch.tensor([vals, vals[::-1]], dtype=torch.float64)
    out = runner.run(lambda p, a: cmp.max_along(p, a, dim=-1, group=group), runner.share(x))
    assert torch.equal(out, x.amax(-1, keepdim=True))


def test_max_round_count_is_log_depth(runner):
    """Groups chosen by cmp.max_plan (12 rows per item here): 128 candidates in groups of 16
    then 8 (12 + 11 rounds), 32 in one group of 32 (8 + 5); the binary tree took 7 * 9 and
    5 * 9. A level costs 8 + ceil(log2 g) rounds whatever the plan."""
    x = runner.share(torch.randn(12, 128, dtype=torch.float64))
    assert cmp.max_plan(12, 128, False) == ((8, 16), False)
    assert runner.rounds_of(lambda p, a: cmp.max_along(p, a), x) == 11 + 12
    x = runner.share(torch.randn(12, 32, dtype=torch.float64))
    assert runner.rounds_of(lambda p, a: cmp.max_along(p, a), x) == 13
    x = runner.share(torch.randn(2, 384, 32, dtype=torch.float64))  # a query's scores: 8, 4
    assert cmp.max_plan(384, 32, True) == ((8, 4), True)
    assert runner.rounds_of(lambda p, a: cmp.max_along(p, a), x) == 21


def test_max_plan_prices_rounds_against_bytes():
    """More rows per item: smaller groups (fewer bytes per round saved); a plan never costs
    more rounds than pairs, and the clip is fused only while its bytes are worth 8 rounds."""
    for rows in (1, 12, 384, 1536, 20000):
        for n in (2, 7, 32, 128):
            plan, fuse = cmp.max_plan(rows, n, True)
            assert math.prod(plan) >= n and all(2 <= g <= cmp.MAX_GROUP for g in plan)
            assert sum(8 + math.ceil(math.log2(g)) for g in plan) <= 9 * math.ceil(math.log2(n))
    assert cmp.max_plan(20000, 128, True)[1] is False  # 2.5M row elements: the clip's own pass
    assert max(cmp.max_plan(20000, 128, False)[0]) < max(cmp.max_plan(12, 128, False)[0])


@given(st.sampled_from([16, 32]), st.data())
def test_msb_on_the_low_bits_when_the_range_allows(runner, width, data):
    """x mod 2^width has x's sign for |x| < 2^(width - 1): 6 or 7 rounds instead of 8."""
    from secure.mpc.boolean import msb_many

    lim = 2 ** (width - 1) - 1
    vals = torch.tensor(data.draw(st.lists(st.integers(-lim, lim), min_size=1, max_size=40)), dtype=torch.int64)
    x = sh.deal_shares(vals, 0)
    out = runner.run(lambda p, a: msb_many(p, [a], width)[0], x)
    assert torch.equal(out, (vals < 0).double())
    assert runner.rounds_of(lambda p, a: msb_many(p, [a], width), x) == {16: 6, 32: 7}[width]


@given(st.lists(st.floats(1e-4, 1e7), min_size=1, max_size=30))
def test_frexp_recovers_mantissa_and_exponent_function(runner, values):
    x = torch.tensor(values, dtype=torch.float64)
    fx = runner.fp.decode(runner.fp.encode(x))
    m, fac = runner.run(lambda p, a: list(cmp.frexp(p, a, lambda e: float(e))), runner.share(x))
    m_ref, e_ref = torch.frexp(fx)
    assert torch.equal(fac, e_ref.double())
    # m = x * 2^-e: the truncation's ulp, scaled up by 2^-e for small x
    assert torch.all((m - m_ref).abs() <= 2 * ULP / fx.clamp(max=1) + 1e-9)


def test_ownership_is_enforced(cluster, runner):
    x = runner.share(torch.ones(3, dtype=torch.float64))
    wrong = [x[1], x[2], x[0]]  # every party gets its neighbour's pair
    with pytest.raises(PartyFailure) as info:
        cluster.run(lambda p, a: ar.mul(p, a, a), [(w,) for w in wrong])
    assert isinstance(info.value.error, ShareOwnershipError)
    assert "belongs to party" in str(info.value)
    # the cluster recovers and keeps computing correctly
    out = runner.run(lambda p, a: ar.mul(p, a, a), x)
    assert torch.allclose(out, torch.ones(3, dtype=torch.float64), atol=2 * ULP)


def test_mismatched_shapes_raise_clearly(cluster, runner):
    x = runner.share(torch.ones(3, dtype=torch.float64))
    y = runner.share(torch.ones(4, dtype=torch.float64))
    with pytest.raises(PartyFailure, match="size"):
        cluster.run(lambda p, a, b: ar.mul(p, a, b), [(x[i], y[i]) for i in range(3)])
    with pytest.raises(PartyFailure, match="shapes"):
        cluster.run(lambda p, a, b: ar.matmul(p, a, b),
                    [(x[i].reshape(1, 3), y[i].reshape(1, 4)) for i in range(3)])


def test_overflowing_public_constant_is_rejected(cluster, runner):
    from secure.mpc.backend import MpcOps

    x = runner.share(torch.ones(3, dtype=torch.float64))
    with pytest.raises(PartyFailure, match="fixed-point range"):
        cluster.run(lambda p, a: MpcOps(p).add_public(a, 1e20), [(s,) for s in x])
    with pytest.raises(FixedPointOverflowError):
        runner.share(torch.tensor([1e15], dtype=torch.float64))


def test_a_silent_party_times_out_with_a_clear_error():
    net = InProcessNetwork(deadline_s=0.3)
    start = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="no message from party 1 within 0.3 s"):
        net.endpoint(0).recv(1)
    assert time.monotonic() - start < 2


def test_a_failing_party_aborts_the_others_promptly():
    cluster = LocalCluster(deadline_s=30.0)
    x = sh.deal_shares(cluster.fp.encode(torch.ones(4)), cluster.fp.frac_bits)

    def prog(p, a):
        if p.id == 2:
            raise RuntimeError("simulated crash")
        return ar.mul(p, a, a)

    start = time.monotonic()
    with pytest.raises(PartyFailure, match="party 2 failed: RuntimeError: simulated crash"):
        cluster.run(prog, [(s,) for s in x])
    assert time.monotonic() - start < 5
    assert threading.active_count() < 10


def test_fixed_point_bits_are_configurable():
    cluster = LocalCluster(fixed_point=FixedPoint(12))
    x = torch.tensor([1.5, -2.25, 100.0], dtype=torch.float64)
    X = sh.deal_shares(cluster.fp.encode(x), 12)
    out = cluster.run(lambda p, a: ar.open_float(p, ar.mul(p, a, a)), [(s,) for s in X])[0]
    assert torch.allclose(out, x * x, atol=2.0**-11)


def test_truncation_failure_rate_matches_the_documented_probability(runner):
    """A value of v ring units fails the local truncation with probability v / 2^64: force
    it with v = 2^59 (expected rate 1/32) and check the measured rate."""
    n = 20000
    value = 1 << 59
    X = sh.deal_shares(torch.full((n,), value, dtype=torch.int64), 20)
    ring = runner.cluster.run(lambda p, a: ar.open_value(p, ar.truncate_many(p, [a], [20])[0]),
                              [(s,) for s in X])[0]
    wrong = ((ring - (value >> 20)).abs() > 1).double().mean().item()
    assert 0.5 / 32 < wrong < 2 / 32


def test_binary_and_and_bit_decomposition(runner, cluster):
    from secure.mpc.boolean import DaBits, and_many, bit_decompose
    from secure.mpc.shares import BShare

    x = torch.tensor([0, 1, -1, 123456789, -(2**62), 2**62 + 5], dtype=torch.int64)
    y = torch.tensor([5, -1, -1, 987654321, 2**40, 7], dtype=torch.int64)
    xs, ys = sh.deal(x), sh.deal(y)

    def prog(p, ax, ay):
        bx = bit_decompose(p, ax, DaBits(p, ax.shape))
        by = bit_decompose(p, ay, DaBits(p, ay.shape))
        (z,) = and_many(p, [(bx, by)])
        got = p.exchange({p.prev: [z.b]}, [p.next])[p.next][0]  # open the binary sharing
        return z.a ^ z.b ^ got, isinstance(z, BShare)

    out = cluster.run(prog, [(sh.AShare(*xs[i], i, 0), sh.AShare(*ys[i], i, 0)) for i in range(3)])
    value, is_binary = out[0]
    assert is_binary
    assert torch.equal(value, x & y)


def test_backend_edge_cases_found_by_the_fixed_point_simulation(cluster, runner):
    """Integral inputs to frexp and fractional thresholds on bits; range checks on
    dot_public; small coefficients keep their precision."""
    from secure.mpc.backend import MpcOps

    three = runner.share(torch.tensor([3, 1, 0]), integral=True)
    m, e = runner.run(lambda p, a: list(cmp.frexp(p, a[:2], lambda k: float(k))), three)
    assert torch.allclose(m, torch.tensor([0.75, 0.5], dtype=torch.float64), atol=ULP)
    assert torch.equal(e, torch.tensor([2.0, 1.0], dtype=torch.float64))
    (below_half,) = runner.run(lambda p, a: cmp.less_than_public(p, a, [0.5]), three)
    assert torch.equal(below_half, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))

    x = runner.share(torch.full((4,), 300.0, dtype=torch.float64))
    out = runner.run(lambda p, a: MpcOps(p).mul_public(a, 1 / 384), x)
    assert float((out - 300 / 384).abs().max()) <= 4 * ULP  # not 683/2^18 per unit
    out = runner.run(lambda p, a: MpcOps(p).dot_public([a], [1 / 384], bias=1e-3), x)
    assert float((out - (300 / 384 + 1e-3)).abs().max()) <= 4 * ULP
    with pytest.raises(PartyFailure, match="out of range"):
        cluster.run(lambda p, a: MpcOps(p).dot_public([a], [1.0], bias=2.0**28), [(s,) for s in x])
    with pytest.raises(PartyFailure, match="at least one term"):
        cluster.run(lambda p, a: MpcOps(p).dot_public([], []), [(s,) for s in x])


def test_exact_truncation_has_no_failure_mode(runner):
    """The default truncation on values that make the probabilistic one fail 1 in 32 times."""
    n = 20000
    for value in (1 << 59, -(1 << 59), 12345):
        X = sh.deal_shares(torch.full((n,), value, dtype=torch.int64), 20)
        ring = runner.cluster.run(lambda p, a: ar.open_value(p, ar.truncate_exact_many(p, [a], [20])[0]),
                                  [(s,) for s in X])[0]
        assert int((ring - (value >> 20)).abs().max()) <= 1


@given(st.integers(1, 40), st.sampled_from([-14.0, -0.5, -3.25]), st.data())
def test_max_and_below_gives_the_clip_bits_in_the_max_rounds(runner, n, gap, data):
    x = data.draw(tensors(st.just((3, n)), -20, 20))
    x[0, 0] = x[0, -1] + gap  # exactly at the gap from a possible maximum: ring-exact boundary
    top, below = runner.run(lambda p, a: list(cmp.max_and_below(p, a, gap)), runner.share(x))
    fx = runner.fp.decode(runner.fp.encode(x))
    ref_top = fx.amax(-1, keepdim=True)
    assert torch.equal(top, ref_top)
    assert torch.equal(below, ((fx - ref_top) < gap).double())
    if n > 1:
        plain = runner.share(x)
        assert runner.rounds_of(lambda p, a: cmp.max_and_below(p, a, gap), plain) == \
            runner.rounds_of(lambda p, a: cmp.max_along(p, a), plain)


# ---- bounded maxima: comparisons read to a resolution (msb_of_differences) --------------

def _ring(runner, x: torch.Tensor) -> torch.Tensor:
    return runner.fp.encode(x)


@given(st.sampled_from([(32, 0), (32, 4), (32, 9), (16, 2)]), st.data())
def test_msb_of_differences_reads_every_difference_beyond_its_tolerance(runner, reading, data):
    """1{X - Y < c} with X, Y the readings at 2^shift ring units: right wherever
    x - y - c 2^shift is further than 2^(shift + 1) ring units from 0 (the floor and the
    dropped carry), whatever the sharing; inside the reach the caller guarantees."""
    width, shift = reading
    reach = 2.0 ** (width - 1) * 2.0 ** (shift - runner.fp.frac_bits) / 4  # |x - y| well inside
    x = data.draw(tensors(st.just((4, 9)), -reach / 2, reach / 2))
    y = data.draw(tensors(st.just((4, 9)), -reach / 2, reach / 2))
    y[0] = x[0]  # ties
    y[1] = x[1] + 2.0 ** (shift - runner.fp.frac_bits) * 0.5  # within the tolerance
    c = data.draw(st.integers(-3, 3))
    got = runner.cluster.run(
        lambda p, a, b: ar.open_many(p, msb_of_differences(p, [(a, b, c)], width, shift)),
        [(sx, sy) for sx, sy in zip(runner.share(x), runner.share(y))])[0][0]
    gap = _ring(runner, x) - _ring(runner, y) - c * 2**shift
    clear = gap.abs() > 2 ** (shift + 1)
    assert set(got.unique().tolist()) <= {0, 1}
    assert torch.equal(got[clear], (gap[clear] < 0).to(torch.int64))
    if shift == 0:  # an exact reading: every entry, ties included
        assert torch.equal(got, (gap < 0).to(torch.int64))


def test_msb_of_differences_refuses_a_width_or_shift_it_cannot_read(runner):
    x = runner.share(torch.zeros(3))
    for width, shift in ((64, 1), (32, 33), (32, -1), (8, 0)):
        with pytest.raises(PartyFailure, match="width|shift"):
            runner.cluster.run(lambda p, a, w=width, s=shift: msb_of_differences(p, [(a, a, 0)], w, s),
                               [(s,) for s in x])


def test_max_reading():
    f = 18
    assert cmp.max_reading(None, -14.0, f) == (64, 0)
    assert cmp.max_reading(0.01, None, f) == (16, 0)  # 2 * 0.01 * 2^18 < 2^15: exact at 16 bits
    assert cmp.max_reading(1000.0, None, f) == (32, 0)  # 2000 * 2^18 < 2^31: exact at 32 bits
    # a MiniLM layer: scores within 8206, the mask bias -1e4 at scale 1/sqrt(32), the clip
    assert cmp.max_reading(8206 + 1e4 * 32**0.5, -14 * 32**0.5, f) == (32, 4)
    width, shift = cmp.max_reading(4e5, None, f)
    assert width == 32 and 2.0 ** (shift + 1 - f) <= cmp.MAX_TOLERANCE
    assert cmp.max_reading(1e7, None, f) == (64, 0)  # beyond the tolerance: exact, 64 bits
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="magnitude"):
            cmp.max_reading(bad, None, f)


@given(st.integers(2, 40), st.sampled_from([2, 3, 4, 8, 32]), st.sampled_from([50.0, 3e4]), st.data())
def test_a_bounded_max_is_one_candidate_within_its_tolerance(runner, n, group, magnitude, data):
    """Near-ties (values within the reading's resolution) and exact ties in every group:
    still exactly one winner per group, so the result is one of the candidates (ring-exact),
    and it falls short of the maximum by at most the tolerance per level."""
    width, shift = cmp.max_reading(magnitude, None, runner.fp.frac_bits)
    assert width == 32
    step = 2.0 ** (shift - runner.fp.frac_bits)
    base = data.draw(st.floats(-magnitude / 2, magnitude / 2))
    offsets = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    x = torch.tensor([[base + k * step / 2 for k in offsets], [base - k * step for k in offsets]],
                     dtype=torch.float64)
    x[1, 0] = -magnitude  # the bound itself
    shares = runner.share(x)
    out = runner.cluster.run(lambda p, a: ar.open_many(p, [cmp.max_along(p, a, group=group, magnitude=magnitude)]),
                             [(s,) for s in shares])[0][0]
    ring = _ring(runner, x)
    levels = len(cmp.max_plan(1, n, False, group, width)[0])
    for r in range(2):
        assert bool((ring[r] == out[r]).any()), "the maximum is not one of the candidates"
        assert int(ring[r].max() - out[r, 0]) <= levels * 2 ** (shift + 1)


def test_a_bounded_max_costs_one_round_fewer_per_level_and_fewer_bytes(runner):
    """A query's 12 x 32 x 32 scores (with the clip): 8, 4 at 64 bits (21 rounds) and at 32
    bits (19); bytes down by the comparisons' 36 of 102 over the three parties."""
    x = torch.randn(1, 384, 32, dtype=torch.float64) * 5
    shares = runner.share(x)
    cluster = runner.cluster
    costs = []
    for magnitude in (None, 30.0):
        r0, b0 = cluster.rounds, sum(cluster.bytes_sent())
        cluster.run(lambda p, a, m=magnitude: cmp.max_and_below(p, a, -14.0, magnitude=m), [(s,) for s in shares])
        costs.append((cluster.rounds - r0, sum(cluster.bytes_sent()) - b0))
    assert cmp.max_plan(384, 32, True) == cmp.max_plan(384, 32, True, width=32) == ((8, 4), True)
    assert (costs[0][0], costs[1][0]) == (21, 19)
    comparisons = 384 * (4 * 28 + 6 + 32 * 4)  # level 1: 4 groups of 8; level 2: 1 of 4 and the clip's
    assert costs[0][1] - costs[1][1] == 36 * comparisons


@given(st.integers(2, 40), st.sampled_from([-14.0, -3.25]), st.data())
def test_a_bounded_max_and_below_reads_the_clip_beyond_its_tolerance(runner, n, gap, data):
    magnitude = 1e4
    x = data.draw(tensors(st.just((3, n)), -20, 20))
    top, below = runner.run(lambda p, a: list(cmp.max_and_below(p, a, gap, magnitude=magnitude)), runner.share(x))
    width, shift = cmp.max_reading(magnitude, gap, runner.fp.frac_bits)
    tolerance = 2.0 ** (shift + 1 - runner.fp.frac_bits)
    fx = runner.fp.decode(runner.fp.encode(x))
    ref_top = fx.amax(-1, keepdim=True)
    levels = len(cmp.max_plan(3, n, True, width=width)[0])
    assert bool(((ref_top - top) <= levels * tolerance + ULP).all()) and bool((top <= ref_top).all())
    clear = ((fx - top) - gap).abs() > 2 * tolerance
    assert torch.equal(below[clear], ((fx - top) < gap).double()[clear])
