"""Bounded forms answer inside their range or fail loudly outside it (issue 11, item 1).

Each bounded form -- Power-Softmax, the polynomial GeLU, LayerNorm on a calibrated variance
range, the bounded Goldschmidt division -- is driven inside its range (error within the
stated bound against the exact function), at its edges (still answered, still within the
bound) and beyond (:class:`RangeError` on floats, on the fixed-point simulation and on the
three-party engine, never a value outside the bound). Then a Power-Softmax graph end to
end: the error names the node and the module on floats and on three parties, and the cost
of the check under MPC is pinned (9 rounds per call; 102 bytes per checked end and row
over the three parties, plus 24 for the opened count).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from secure.approx.float_backend import FloatOps
from secure.approx.gelu import poly_gelu
from secure.approx.interface import RangeError
from secure.approx.norms import layer_norm
from secure.approx.reciprocal import bounded_reciprocal_start, divide_bounded, reciprocal_bounded
from secure.approx.softmax import power_softmax, power_softmax_range
from secure.graph.capture import capture
from secure.graph.passes import power_recipe, rewrite
from secure.mpc.backend import MpcOps
from secure.mpc.engine import PartyFailure
from secure.mpc.simulation import FixedPointOps
from secure.runtime.execute import deal_inputs, deal_weights, run_float, run_mpc
from secure.runtime.interpreter import InterpreterError

F64 = torch.float64
ULP = 2.0**-18
FLOAT = FloatOps()
FIXED = FixedPointOps(truncation="floor")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on_fixed(form, *xs: torch.Tensor) -> torch.Tensor:
    out = form(FIXED, *(FIXED.encode(x) for x in xs))
    return FIXED.decode(out)


def _mpc_counts(runner, form, *xs: torch.Tensor) -> list[int | None]:
    """Each party's RangeError count (None: it answered)."""
    def body(party, *shares):
        try:
            form(MpcOps(party), *shares)
        except RangeError as e:
            return e.count
        return None
    shares = [runner.share(x) for x in xs]
    return runner.cluster.run(body, [tuple(s[i] for s in shares) for i in range(3)])


# ---- the range check itself -----------------------------------------------------------------

def test_check_range_counts_exactly_the_same_on_every_backend(runner):
    lo, hi = 0.25, 4.0  # exact in fixed point: the ends themselves are inside
    x = torch.tensor([lo, hi, 1.0, lo - ULP, hi + ULP, -3.0, 100.0, 2.0], dtype=F64)
    with pytest.raises(RangeError) as err:
        FLOAT.check_range(x, lo, hi, "x")
    assert err.value.count == 4 and err.value.observed == (-3.0, 100.0) and "4 of 8" in str(err.value)
    with pytest.raises(RangeError) as err:
        FIXED.check_range(FIXED.encode(x), lo, hi, "x")
    assert err.value.count == 4 and err.value.observed == (-3.0, 100.0)
    # three parties: the same count opened on all three, nothing else (no min/max)
    assert _mpc_counts(runner, lambda o, a: o.check_range(a, lo, hi, "x"), x) == [4, 4, 4]
    inside = x[:3]
    for ops, v in ((FLOAT, inside), (FIXED, FIXED.encode(inside))):
        ops.check_range(v, lo, hi, "x")
    assert _mpc_counts(runner, lambda o, a: o.check_range(a, lo, hi, "x"), inside) == [None] * 3
    # one end open
    assert _mpc_counts(runner, lambda o, a: o.check_range(a, None, hi, "x"), x) == [2, 2, 2]
    assert _mpc_counts(runner, lambda o, a: o.check_range(a, lo, None, "x"), x) == [2, 2, 2]
    with pytest.raises(RangeError, match="1 of 2"):
        FLOAT.check_range(torch.tensor([1.0, math.nan], dtype=F64), lo, hi, "x")  # NaN is out of range
    with pytest.raises(ValueError):
        FLOAT.check_range(x, hi, lo, "x")
    with pytest.raises(ValueError):
        FLOAT.check_range(x, None, None, "x")


def test_mpc_count_matches_the_fixed_point_count_on_random_data(runner):
    x = torch.randn(3, 50, dtype=F64, generator=_gen(1)) * 3
    expected = int(((x < -2.5) | (x > 4.0)).sum())
    assert expected > 0
    assert _mpc_counts(runner, lambda o, a: o.check_range(a, -2.5, 4.0, "x"), x) == [expected] * 3
    with pytest.raises(RangeError) as err:
        FIXED.check_range(FIXED.encode(x), -2.5, 4.0, "x")
    assert err.value.count == expected


# ---- the bounded division -------------------------------------------------------------------

UPPER, ITER = 100.0, 8
_, LOWER, _ = bounded_reciprocal_start(UPPER, ITER)  # 1.349
FIXED_ABS = 96 * ULP
"""Fixed point adds an absolute error of up to about (upper / x) ulps: the start's rounding
is multiplied by upper / x over the iterations (upper / lower = 74 at 8 iterations;
measured at most 67 ulps, at x = 1.35)."""


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out - ref).abs() / ref.abs()).max())


def test_bounded_division_inside_and_at_its_edges():
    x = torch.cat([torch.tensor([LOWER, UPPER], dtype=F64),
                   torch.logspace(math.log10(LOWER), math.log10(UPPER), 2001, dtype=F64)])
    num = torch.linspace(-3, 3, x.numel(), dtype=F64)
    assert _rel(reciprocal_bounded(FLOAT, x, UPPER, ITER), 1 / x) <= 1.0001e-3
    assert float((divide_bounded(FLOAT, num, x, UPPER, ITER) - num / x).abs().max()) <= 3.0003e-3 / LOWER
    fixed = _on_fixed(lambda o, a: reciprocal_bounded(o, a, UPPER, ITER), x)
    assert bool(((fixed - 1 / x).abs() <= 1.0001e-3 / x + FIXED_ABS).all())


@pytest.mark.parametrize("value", [LOWER * 0.99, LOWER / 10, 0.0, -1.0, UPPER * 1.01, UPPER * 3])
def test_bounded_division_beyond_its_range_raises(runner, value):
    x = torch.tensor([2.0, value, 50.0], dtype=F64)
    with pytest.raises(RangeError, match="reciprocal_bounded input: 1 of 3"):
        reciprocal_bounded(FLOAT, x, UPPER, ITER)
    with pytest.raises(RangeError, match="divide_bounded denominator: 1 of 3"):
        divide_bounded(FLOAT, x, x, UPPER, ITER)
    with pytest.raises(RangeError):
        _on_fixed(lambda o, a: divide_bounded(o, a, a, UPPER, ITER), x)
    assert _mpc_counts(runner, lambda o, a: divide_bounded(o, a, a, UPPER, ITER), x) == [1, 1, 1]


def test_bounded_division_never_answers_outside_its_bound():
    """Sweep far below and above the range: every value is answered within 1e-3 or refused."""
    answered = 0
    for v in torch.logspace(math.log10(LOWER) - 3, math.log10(UPPER) + 1, 400, dtype=F64):
        x = v.reshape(1)
        for ops, enc, dec, tol in ((FLOAT, lambda t: t, lambda t: t, 1.0001e-3),
                                   (FIXED, FIXED.encode, FIXED.decode, 1.0001e-3 + FIXED_ABS * float(v))):
            try:
                out = dec(reciprocal_bounded(ops, enc(x), UPPER, ITER))
            except RangeError:
                assert not LOWER <= float(v) <= UPPER
                continue
            answered += 1
            assert _rel(out, 1 / x) <= tol
    assert answered > 100


def test_bounded_division_inside_on_three_parties(runner):
    x = torch.logspace(math.log10(LOWER), math.log10(UPPER), 200, dtype=F64)
    out = runner.run(lambda p, a: reciprocal_bounded(MpcOps(p), a, UPPER, ITER), runner.share(x))
    assert bool(((out - 1 / x).abs() <= 1.0001e-3 / x + FIXED_ABS).all())


# ---- Power-Softmax ------------------------------------------------------------------------

PS_UPPER, PS_ITER = 400.0, 12
_, PS_LOWER, _ = bounded_reciprocal_start(PS_UPPER, PS_ITER)  # 0.337


def _scores(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 3, 8, 8, dtype=F64, generator=_gen(7)) * scale
    mask = torch.ones(2, 1, 1, 8, dtype=F64)
    mask[1, ..., -3:] = 0
    return x, mask


def _ps_exact(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    xp = x**4 * mask
    return xp / (eps + xp.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))


def _ps(eps: float = 1e-6):
    return lambda o, a, m: power_softmax(o, a, p=4, eps=eps, mask=m, upper=PS_UPPER, iterations=PS_ITER)


def test_power_softmax_range_says_which_end_is_guaranteed():
    assert power_softmax_range(1e-6, PS_UPPER, PS_ITER) == (PS_LOWER, PS_UPPER)  # checked
    assert power_softmax_range(PS_LOWER, PS_UPPER, PS_ITER) == (None, PS_UPPER)  # by construction
    with pytest.raises(ValueError, match="above upper"):
        power_softmax_range(500.0, PS_UPPER, PS_ITER)
    calls: list[tuple] = []

    class Spy(FloatOps):
        def check_range(self, x, lower, upper, what):
            calls.append((lower, upper, x.shape))
            super().check_range(x, lower, upper, what)

    x, mask = _scores(2.0)
    power_softmax(Spy(), x, p=4, mask=mask, upper=PS_UPPER, iterations=PS_ITER)
    power_softmax(Spy(), x, p=4, eps=1.0, mask=mask, upper=PS_UPPER, iterations=PS_ITER)
    power_softmax(Spy(), x, p=4, mask=mask, upper=PS_UPPER, iterations=PS_ITER, check=False)
    assert calls == [(PS_LOWER, PS_UPPER, (2, 3, 8, 1)), (None, PS_UPPER, (2, 3, 8, 1))]


def test_power_softmax_inside_its_range(runner):
    x, mask = _scores(2.0)  # denominators in [0.337, 400]
    ref = _ps_exact(x, mask, 1e-6)
    out = _ps()(FLOAT, x, mask)
    assert _rel(out[ref > 0], ref[ref > 0]) <= 1.0001e-3
    fixed = FIXED.decode(_ps()(FIXED, FIXED.encode(x), mask))
    scale = ref.amax(-1, keepdim=True)
    assert float(((fixed - ref).abs() / scale).max()) <= 2e-3
    mpc = runner.run(lambda p, a: _ps()(MpcOps(p), a, mask), runner.share(x))
    assert float(((mpc - ref).abs() / scale).max()) <= 2e-3
    assert bool((mpc[1, ..., -3:] == 0).all())


def test_power_softmax_lower_end_guaranteed_by_eps(runner):
    """eps >= lower: tiny scores (mean x^4 ~ 5e-3, far below lower) still answer within the bound."""
    x, mask = _scores(0.1)
    eps = 1.0
    ref = _ps_exact(x, mask, eps)
    out = _ps(eps)(FLOAT, x, mask)
    assert _rel(out[ref > 0], ref[ref > 0]) <= 1.0001e-3
    mpc = runner.run(lambda p, a: _ps(eps)(MpcOps(p), a, mask), runner.share(x))
    # fixed point: the division multiplies a one-ulp rounding by up to upper / eps (7.9e-4 measured)
    assert float((mpc - ref).abs().max()) <= 1e-3 * float(ref.max()) + 2 * PS_UPPER / eps * ULP


@pytest.mark.parametrize("scale", [0.1, 10.0], ids=["below-lower", "above-upper"])
def test_power_softmax_beyond_its_range_raises_everywhere(runner, scale):
    x, mask = _scores(scale)
    with pytest.raises(RangeError, match=r"Power-Softmax denominator eps \+ mean\(x\^4\)") as err:
        _ps()(FLOAT, x, mask)
    count = err.value.count
    assert count > 0
    with pytest.raises(RangeError) as err:
        _ps()(FIXED, FIXED.encode(x), mask)
    assert err.value.count == count
    assert _mpc_counts(runner, lambda o, a: _ps()(o, a, mask), x) == [count] * 3


def test_power_softmax_fully_masked_rows_are_exempt(runner):
    x, _ = _scores(2.0)
    mask = torch.ones(2, 3, 8, 8, dtype=F64)
    mask[0, 1, 4] = 0  # one query row attends to nothing: denominator exactly eps < lower
    out = _ps()(FLOAT, x, mask)
    assert bool((out[0, 1, 4] == 0).all()) and bool(torch.isfinite(out).all())
    mpc = runner.run(lambda p, a: _ps()(MpcOps(p), a, mask), runner.share(x))
    assert bool((mpc[0, 1, 4] == 0).all())


def test_power_softmax_that_gave_nan_now_refuses():
    """The issue: a denominator past upper (1 + lower/upper) diverges (NaN/inf on floats)."""
    x, mask = _scores(10.0)
    unchecked = power_softmax(FLOAT, x, p=4, mask=mask, upper=PS_UPPER, iterations=PS_ITER, check=False)
    assert not bool(torch.isfinite(unchecked).all())
    with pytest.raises(RangeError):
        _ps()(FLOAT, x, mask)


# ---- polynomial GeLU ----------------------------------------------------------------------

BOUND = 8.0


def test_poly_gelu_inside_and_at_its_edges(runner):
    x = torch.cat([torch.tensor([-BOUND, BOUND], dtype=F64), torch.linspace(-BOUND, BOUND, 4001, dtype=F64)])
    err = float((poly_gelu(FLOAT, x, BOUND) - Fn.gelu(x)).abs().max())
    assert err <= 0.0235  # poly_gelu_coefficients: 0.023 at bound 8, degree 8
    fixed = _on_fixed(lambda o, a: poly_gelu(o, a, BOUND), x)
    assert float((fixed - Fn.gelu(x)).abs().max()) <= 0.0235 + 1e-3
    mpc = runner.run(lambda p, a: poly_gelu(MpcOps(p), a, BOUND), runner.share(x[:200]))
    assert float((mpc - Fn.gelu(x[:200])).abs().max()) <= 0.0235 + 1e-3


@pytest.mark.parametrize("value", [BOUND + 0.01, -BOUND * 1.5, 40.0])
def test_poly_gelu_beyond_its_bound_raises(runner, value):
    x = torch.tensor([0.5, value, -2.0, 3.0], dtype=F64)
    with pytest.raises(RangeError, match="poly_gelu input .bound 8.: 1 of 4"):
        poly_gelu(FLOAT, x, BOUND)
    with pytest.raises(RangeError):
        _on_fixed(lambda o, a: poly_gelu(o, a, BOUND), x)
    assert _mpc_counts(runner, lambda o, a: poly_gelu(o, a, BOUND), x) == [1, 1, 1]


def test_poly_gelu_never_answers_outside_its_bound():
    for v in torch.linspace(-3 * BOUND, 3 * BOUND, 601, dtype=F64):
        x = v.reshape(1)
        try:
            out = poly_gelu(FLOAT, x, BOUND)
        except RangeError:
            assert abs(float(v)) > BOUND
            continue
        assert float((out - Fn.gelu(x)).abs().max()) <= 0.0235


# ---- LayerNorm on a calibrated variance range ----------------------------------------------

VAR_RANGE = (0.5, 50.0)


def _rows(stds: list[float]) -> torch.Tensor:
    x = torch.randn(len(stds), 32, dtype=F64, generator=_gen(3))
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    return x * torch.tensor(stds, dtype=F64).unsqueeze(-1)


def test_layer_norm_with_variance_range_inside_and_at_its_edges(runner):
    x = _rows([math.sqrt(0.5), 1.0, 3.0, math.sqrt(50.0) * (1 - 1e-9)])  # variances 0.5 .. 50 (edges)
    ref = Fn.layer_norm(x, (32,), eps=1e-12)
    out = layer_norm(FLOAT, x, variance_range=VAR_RANGE)
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())  # rsqrt_bounded_plan tol 1e-4
    mpc = runner.run(lambda p, a: layer_norm(MpcOps(p), a, variance_range=VAR_RANGE), runner.share(x[1:3]))
    assert float((mpc - ref[1:3]).abs().max()) <= 1e-3


@pytest.mark.parametrize("std", [0.5, 8.0], ids=["below", "above"])
def test_layer_norm_variance_beyond_its_range_raises(runner, std):
    x = _rows([1.0, std, 2.0])  # variance 0.25 or 64
    with pytest.raises(RangeError, match=r"LayerNorm variance \+ eps: 1 of 3"):
        layer_norm(FLOAT, x, variance_range=VAR_RANGE)
    with pytest.raises(RangeError):
        _on_fixed(lambda o, a: layer_norm(o, a, variance_range=VAR_RANGE), x)
    assert _mpc_counts(runner, lambda o, a: layer_norm(o, a, variance_range=VAR_RANGE), x) == [1, 1, 1]
    layer_norm(FLOAT, x)  # without a variance range (frexp) there is nothing to check


# ---- end to end: a Power-Softmax graph -------------------------------------------------------

class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ x.transpose(-1, -2) * 0.5, dim=-1) @ x


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.attn = _Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.proj(x))


@pytest.fixture(scope="module")
def power_graph():
    torch.manual_seed(0)
    model = _Block().eval()
    with torch.no_grad():
        model.proj.weight.copy_(torch.eye(4))
        model.proj.bias.zero_()
    example = {"x": torch.randn(1, 6, 4)}
    graph, weights = capture(model, example, secret_inputs=["x"])
    return rewrite(graph, power_recipe(4, 1e-6, 400.0, 12)), weights


def test_graph_out_of_range_fails_naming_node_and_module_on_floats_and_three_parties(power_graph, cluster):
    graph, weights = power_graph
    node = next(n for n in graph.nodes if n.op == "secure.softmax")
    ok = {"x": torch.randn(1, 6, 4, generator=_gen(3)) * 1.5}  # denominators in [1.5, 296]
    (out,), _ = run_float(graph, weights, ok)
    (mpc_out,), _ = run_mpc(cluster, graph, deal_weights(weights, cluster.fp), deal_inputs(graph, ok, cluster.fp))
    assert float((mpc_out - out).abs().max()) < 1e-2
    big = {"x": ok["x"] * 6}  # scores up to ~1e3: denominators past upper = 400
    with pytest.raises(InterpreterError) as err:
        run_float(graph, weights, big)
    msg = str(err.value)
    assert f"node {node.name} (secure.softmax) in attn" in msg and "RangeError" in msg
    with pytest.raises(PartyFailure) as failure:
        run_mpc(cluster, graph, deal_weights(weights, cluster.fp), deal_inputs(graph, big, cluster.fp))
    msg = str(failure.value)
    assert f"node {node.name} (secure.softmax) in attn" in msg and "RangeError" in msg
    assert "Power-Softmax denominator" in msg and "observed" not in msg  # MPC opens the count only
    # the cluster is usable after the failed query
    (again,), _ = run_mpc(cluster, graph, deal_weights(weights, cluster.fp), deal_inputs(graph, ok, cluster.fp))
    assert float((again - out).abs().max()) < 1e-2


def test_a_recipe_whose_range_no_denominator_meets_is_refused_at_rewrite():
    graph, _ = capture(_Block().eval(), {"x": torch.randn(1, 6, 4)}, secret_inputs=["x"])
    with pytest.raises(ValueError, match=r"Power-Softmax recipe at node .* in attn: .*above upper"):
        rewrite(graph, power_recipe(4, 10.0, 5.0, 8))


def test_ckks_refuses_a_power_softmax_whose_lower_end_is_not_guaranteed(power_graph):
    """CKKS cannot check a range: a denominator below the division's range would be silently
    wrong, so a graph whose eps does not guarantee the lower end is refused, naming the node;
    with eps at the lower end it passes."""
    from secure.approx.reciprocal import bounded_reciprocal_start
    from secure.graph.he_passes import UnsupportedOpError, check_he_supported
    from secure.graph.ir import Graph

    graph = Graph.from_json(power_graph[0].to_json())  # a copy: the fixture is shared
    node = next(n for n in graph.nodes if n.op == "secure.softmax")
    with pytest.raises(UnsupportedOpError, match=rf"node '{node.name}' .* in module attn .*eps = 1e-06 is below"):
        check_he_supported(graph)
    _, lower, _ = bounded_reciprocal_start(node.kwargs["upper"], node.kwargs["iterations"])
    node.kwargs["eps"] = lower
    check_he_supported(graph)


# ---- the cost of the check under MPC -------------------------------------------------------

def test_check_cost_per_power_softmax_call(runner, capsys):
    """9 rounds (one 8-round comparison pass, one opening); bytes over the three parties:
    102 per row and checked end, plus 24 for the opened count."""
    x, mask = _scores(2.0)
    rows = x[..., 0].numel()  # 48 denominators
    shares = runner.share(x)
    cluster = runner.cluster

    def cost(**kw) -> tuple[int, int]:
        r0, b0 = cluster.rounds, sum(cluster.bytes_sent())
        cluster.run(lambda p, a: power_softmax(MpcOps(p), a, p=4, mask=mask, upper=PS_UPPER,
                                               iterations=PS_ITER, **kw), [(s,) for s in shares])
        return cluster.rounds - r0, sum(cluster.bytes_sent()) - b0

    off = cost(check=False)
    both = cost()
    upper_only = cost(eps=1.0)  # eps >= lower: the lower end is guaranteed, not compared
    assert both[0] - off[0] == 9 and upper_only[0] - off[0] == 9
    assert both[1] - off[1] == 2 * 102 * rows + 24
    assert upper_only[1] - off[1] == 102 * rows + 24
    with capsys.disabled():
        print(f"\nPower-Softmax range check on {rows} rows: +{both[0] - off[0]} rounds "
              f"({off[0]} -> {both[0]}), +{both[1] - off[1]} bytes both ends, "
              f"+{upper_only[1] - off[1]} bytes upper end only (of {off[1]})")
