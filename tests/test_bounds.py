"""Bounds the weights guarantee on activation inputs (secure.graph.bounds), and the narrow
comparisons they allow under MPC."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from secure.approx.float_backend import FloatOps
from secure.approx.gelu import even_gelu, puma_gelu
from secure.approx.interface import MagnitudeError
from secure.approx.norms import SQUARES_FLOOR, layer_norm
from secure.graph.bounds import ABSOLUTE_MARGIN, RELATIVE_MARGIN, block_norm_bounds, linear_of_norm_bound
from secure.graph.capture import capture
from secure.graph.ir import Graph, GraphValidationError
from secure.graph.passes import OURS, PUMA, rewrite
from secure.models import CausalLM, SentenceEncoder, tiny_bert, tiny_llama
from secure.mpc.backend import MpcOps
from secure.mpc.compare import comparison_width, max_plan
from secure.mpc.engine import LocalCluster
from secure.mpc.shares import reconstruct
from secure.mpc.simulation import FixedPointOps
from secure.runtime.execute import deal_inputs, deal_weights, run_fixed, run_float, run_mpc
from secure.runtime.interpreter import InterpreterError

WIDTH = 48


class NormLinearGelu(nn.Module):
    """LayerNorm (or RMSNorm-like scaling), a linear layer, GeLU: the FFN's first half."""

    def __init__(self, width: int = WIDTH, out: int = 3 * WIDTH, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.up = nn.Linear(width, out)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.5)
            self.norm.bias.normal_(0.0, 0.3)
            self.up.weight.normal_(0.0, 0.3)
            self.up.bias.normal_(0.0, 0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.up(self.norm(hidden_states)))


class LinearGelu(nn.Module):
    """A GeLU fed by a linear layer of the raw input: nothing bounds it."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.up(hidden_states))


def _graph(module: nn.Module, recipe=OURS, rows: int = 4) -> tuple[Graph, dict[str, torch.Tensor]]:
    graph, weights = capture(module, {"hidden_states": torch.randn(1, rows, WIDTH)}, secret_inputs=["hidden_states"])
    return rewrite(graph, recipe, weights=weights), weights


def _magnitudes(graph: Graph) -> list[float | None]:
    return [n.kwargs.get("magnitude") for n in graph.nodes if n.op in ("secure.gelu", "secure.silu")]


def test_the_bound_is_cauchy_schwarz_and_reached_by_the_aligned_row() -> None:
    torch.manual_seed(1)
    n, m = 64, 32
    w, b, gamma, beta = (t.double() for t in (torch.randn(m, n), torch.randn(m), torch.randn(n), torch.randn(n)))
    bound = linear_of_norm_bound(w, b, gamma, beta)
    a, shift = w * gamma, w @ beta + b
    reached = []
    for i in range(m):
        # the normalised row along W_i * gamma, on the side of the shift: sum u^2 = n
        u = torch.sign(shift[i]) * math.sqrt(n) * a[i] / a[i].norm()
        reached.append(float((w @ (gamma * u + beta) + b)[i].abs()))
    cauchy_schwarz = math.sqrt(n) * a.norm(dim=-1) + shift.abs()
    assert reached == pytest.approx(cauchy_schwarz.tolist(), rel=1e-12)
    rounding = w.abs().sum(dim=-1) * math.sqrt(n * SQUARES_FLOOR)
    assert bound == pytest.approx(float((cauchy_schwarz + rounding).max()) * 1.01 + 1.0, rel=1e-12)


def test_the_pass_bounds_a_norm_fed_activation_only() -> None:
    graph, weights = _graph(NormLinearGelu())
    (magnitude,) = _magnitudes(graph)
    module = NormLinearGelu()
    expected = linear_of_norm_bound(module.up.weight, module.up.bias, module.norm.weight, module.norm.bias)
    assert magnitude == pytest.approx(expected)
    bare, _ = _graph(LinearGelu())
    assert _magnitudes(bare) == [None]
    graph_puma, _ = _graph(NormLinearGelu(), PUMA)
    assert _magnitudes(graph_puma) == [pytest.approx(expected)]
    # without the weights nothing is bounded, and the bounded graph round-trips as data
    plain, _ = capture(NormLinearGelu(), {"hidden_states": torch.randn(1, 4, WIDTH)}, secret_inputs=["hidden_states"])
    assert _magnitudes(rewrite(plain, OURS)) == [None]
    assert _magnitudes(Graph.from_json(graph.to_json())) == [pytest.approx(expected)]


def test_a_graph_file_with_a_malformed_magnitude_is_refused() -> None:
    graph, _ = _graph(NormLinearGelu())
    text = graph.to_json()
    assert '"magnitude"' in text
    bad = re.sub(r'"magnitude": [0-9.e+-]+', '"magnitude": "huge"', text, count=1)
    with pytest.raises(GraphValidationError, match="magnitude"):
        Graph.from_json(bad)


def _hostile_rows(draw: st.DrawFn) -> torch.Tensor:
    """LayerNorm inputs a benign corpus never shows: near-constant rows (differences of an
    ulp or two on a large offset), a single spike, huge or tiny scales."""
    kind = draw(st.sampled_from(["constant", "ulps", "spike", "scaled", "normal"]))
    offset = draw(st.floats(-300.0, 300.0))
    row = torch.full((WIDTH,), offset, dtype=torch.float64)
    if kind == "ulps":
        row += torch.tensor(draw(st.lists(st.integers(-2, 2), min_size=WIDTH, max_size=WIDTH)),
                            dtype=torch.float64) * 2.0**-18
    elif kind == "spike":
        row[draw(st.integers(0, WIDTH - 1))] += draw(st.floats(1e-4, 1e3))
    elif kind == "scaled":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        row += torch.randn(WIDTH, generator=g, dtype=torch.float64) * 10.0 ** draw(st.floats(-4.0, 2.5))
    elif kind == "normal":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        row += torch.randn(WIDTH, generator=g, dtype=torch.float64)
    return row


@functools.cache
def _bounded_ffn(seed: int, rows: int) -> tuple[Graph, dict[str, torch.Tensor]]:
    return _graph(NormLinearGelu(seed=seed), rows=rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.composite(_hostile_rows)(), min_size=1, max_size=3), st.integers(0, 3))
def test_the_bound_holds_on_hostile_rows_in_fixed_point_and_on_floats(rows: list[torch.Tensor], seed: int) -> None:
    """The fixed-point simulation and the float backend check every bounded comparison's
    input against its magnitude (MagnitudeError), so a wrong bound fails here."""
    graph, weights = _bounded_ffn(seed, len(rows))
    x = torch.stack(rows).unsqueeze(0)
    run_fixed(graph, weights, {"hidden_states": x}, seed=seed)
    run_float(graph, weights, {"hidden_states": x})


def _aligned_rows(module: NormLinearGelu, ulps: float) -> torch.Tensor:
    """A row whose normalised form points along the output with the largest bound, scaled so
    that its squared deviations sum to about ``ulps`` ulps of 2^-18: where truncating that
    sum shrinks the variance the most, relative to the row (a bound without the floor breaks)."""
    w, gamma = module.up.weight.detach().double(), module.norm.weight.detach().double()
    a = w * gamma
    shift = w @ module.norm.bias.detach().double() + module.up.bias.detach().double()
    i = int((math.sqrt(WIDTH) * a.norm(dim=-1) + shift.abs()).argmax())
    direction = a[i] - a[i].mean()
    direction = direction / direction.norm() * math.sqrt(WIDTH)
    return (3.0 + math.sqrt(ulps / WIDTH) * 2.0**-9 * direction).unsqueeze(0)


def _fixed_ffn_input_bound_check(module: NormLinearGelu, x: torch.Tensor, truncation: str) -> None:
    graph, weights = _graph(module, rows=x.shape[0])
    ops = FixedPointOps(truncation=truncation, seed=1)
    values = {k: ops.encode(v.double()) for k, v in weights.items()}
    norm = next(n for n in graph.nodes if n.op == "secure.layer_norm")
    (magnitude,) = _magnitudes(graph)
    y = layer_norm(ops, ops.encode(x), values[norm.args[1].name], values[norm.args[2].name])
    z = ops.add(ops.matmul(y, ops.map_shape(values["up.weight"], lambda t: t.T)), values["up.bias"])
    even_gelu(ops, z, magnitude=magnitude)


@pytest.mark.parametrize("truncation", ["floor", "probabilistic"])
@pytest.mark.parametrize("ulps", [0.6, 1.2, 1.6, 1.9, 2.5, 4.0, 100.0])
def test_the_bound_holds_where_truncation_shrinks_the_variance(truncation: str, ulps: float) -> None:
    module = NormLinearGelu(seed=5)
    _fixed_ffn_input_bound_check(module, _aligned_rows(module, ulps), truncation)


def test_without_the_squares_floor_the_bound_would_break(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor is what makes the bound hold: with LayerNorm's own eps (1e-12, 0 in fixed
    point) floor truncation of the sum of squares lets an aligned row exceed it."""
    monkeypatch.setattr("secure.approx.norms.SQUARES_FLOOR", 0.0)
    module = NormLinearGelu(seed=5)
    with pytest.raises(MagnitudeError):
        _fixed_ffn_input_bound_check(module, _aligned_rows(module, 1.9), "floor")


def test_a_violated_bound_is_caught_on_floats_and_in_fixed_point() -> None:
    x = torch.tensor([[-5.0, 0.5, 20.0]], dtype=torch.float64)
    with pytest.raises(MagnitudeError, match="beyond the bound 10"):
        even_gelu(FloatOps(), x, magnitude=10.0)
    ops = FixedPointOps()
    with pytest.raises(MagnitudeError):
        puma_gelu(ops, ops.encode(x), magnitude=10.0)
    assert torch.equal(even_gelu(FloatOps(), x, magnitude=20.0), even_gelu(FloatOps(), x))


def test_comparison_width() -> None:
    assert comparison_width(None, [3.0], 18) == 64
    assert comparison_width(64.0, [-4.0, -1.95, 3.0], 18) == 32
    assert comparison_width(8192.0 - 3.0, [3.0], 18) == 64  # 2^13 2^18 + 2 >= 2^31
    assert comparison_width(8192.0 - 4.0, [3.0], 18) == 32
    assert comparison_width(0.01, [0.02], 18) == 16
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="magnitude"):
            comparison_width(bad, [0.0], 18)


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    return LocalCluster(profile=False)


def test_bounded_comparisons_read_the_same_bits(cluster: LocalCluster) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64) * 20
    x[0, :6] = torch.tensor([-64.0, 64.0, -4.0 - 2.0**-17, 3.0 - 2.0**-17, -1.95 + 2.0**-16, 3.0 + 2.0**-17])
    (shares,) = [deal_weights({"x": x}, cluster.fp)]
    thresholds = [-4.0, -1.95, 3.0]
    expected = [(x < c).to(torch.int64) for c in thresholds]
    for magnitude in (None, 64.0):
        got = cluster.run(lambda p, s, m=magnitude: MpcOps(p).less_than_public(s["x"], thresholds, magnitude=m),
                          [(s,) for s in shares])
        for k in range(len(thresholds)):
            assert torch.equal(reconstruct([got[i][k] for i in range(3)]), expected[k])


@pytest.mark.parametrize(("form", "rounds"), [(even_gelu, (9, 8)), (puma_gelu, (10, 9))])
def test_a_bounded_gelu_costs_fewer_rounds_and_bytes(cluster: LocalCluster, form, rounds) -> None:
    """Three parties: the same output with and without the bound (up to the truncations'
    ulps), in the pinned rounds, with 36 bytes fewer per comparison and element (102 over
    the three parties at 64 bits, 66 at 32: the carry tree's 24 and the narrow binary words'
    12)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64) * 6
    x[0, :4] = torch.tensor([-60.0, 60.0, -4.0, 3.0])
    shares = deal_weights({"x": x}, cluster.fp)
    outs, costs = [], []
    for magnitude in (None, 64.0):
        r0, b0 = cluster.rounds, sum(cluster.bytes_sent())
        got = cluster.run(lambda p, s, m=magnitude: form(MpcOps(p), s["x"], magnitude=m), [(s,) for s in shares])
        costs.append((cluster.rounds - r0, sum(cluster.bytes_sent()) - b0))
        outs.append(cluster.fp.decode(reconstruct(got), got[0].frac_bits))
    assert float((outs[0] - outs[1]).abs().max()) < 1e-4
    assert float((outs[1] - form(FloatOps(), x)).abs().max()) < 1e-3
    assert (costs[0][0], costs[1][0]) == rounds
    comparisons = (2 if form is even_gelu else 3) * x.numel()
    assert costs[0][1] - costs[1][1] == 36 * comparisons


# ---- attention scores --------------------------------------------------------------------

def _encoder(layers: int = 2, hidden: int = 32, heads: int = 2, seq: int = 12, scale: float = 1.0):
    """A tiny BERT sentence encoder (weights scaled by ``scale``), its captured graph and weights."""
    model = tiny_bert(vocab_size=60, layers=layers, hidden=hidden, heads=heads, seed=4)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    encoder = SentenceEncoder(model)
    ids = torch.randint(1, 60, (1, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[0, -3:] = 0  # padding: the mask bias -1e4 in the scores the maximum compares
    inputs = {"input_ids": ids, "attention_mask": mask}
    graph, weights = capture(encoder, inputs)
    return model, graph, weights, inputs


def _score_magnitudes(graph: Graph) -> list[float | None]:
    return [n.kwargs.get("magnitude") for n in graph.nodes if n.op in ("secure.attention", "secure.softmax")]


def test_the_scores_bound_is_the_largest_q_block_times_the_largest_k_block() -> None:
    model, graph, weights, _ = _encoder()
    bounded = rewrite(graph, OURS, weights=weights)
    magnitudes = _score_magnitudes(bounded)
    assert len(magnitudes) == 2 and all(m is not None for m in magnitudes)
    norms = [model.embeddings.LayerNorm, model.encoder.layer[0].output.LayerNorm]
    for layer, norm, magnitude in zip(model.encoder.layer, norms, magnitudes):
        attention = layer.attention.self
        q, k = (block_norm_bounds(lin.weight, lin.bias, norm.weight, norm.bias, block=16)
                for lin in (attention.query, attention.key))
        assert magnitude == pytest.approx(float(q.max() * k.max()) * RELATIVE_MARGIN + ABSOLUTE_MARGIN)
    assert _score_magnitudes(rewrite(graph, PUMA, weights=weights)) == [pytest.approx(m) for m in magnitudes]
    assert _score_magnitudes(rewrite(graph, OURS)) == [None, None]  # no weights, no bound
    assert _score_magnitudes(Graph.from_json(bounded.to_json())) == [pytest.approx(m) for m in magnitudes]


def test_a_block_norm_bound_is_reached_by_the_aligned_row() -> None:
    """Per block, the operator norm's top right singular vector, scaled to sum u^2 = n,
    attains sqrt(n) ||W_h diag(gamma)||_2 (beta = b = 0, and no rounding term): the bound
    is tight."""
    torch.manual_seed(5)
    n, block = 24, 8
    w, gamma = torch.randn(3 * block, n, dtype=torch.float64), torch.rand(n, dtype=torch.float64) + 0.5
    bounds = block_norm_bounds(w, None, gamma, None, block=block, squares_floor=0.0)
    for h in range(3):
        a = w[h * block:(h + 1) * block] * gamma
        u = torch.linalg.svd(a).Vh[0] * math.sqrt(n)
        reached = float((a @ u).norm())
        assert reached <= float(bounds[h]) <= reached * RELATIVE_MARGIN * 1.001 + ABSOLUTE_MARGIN
    with pytest.raises(ValueError, match="blocks of 5"):
        block_norm_bounds(w, None, gamma, None, block=5)


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_the_scores_stay_within_their_bound_for_any_tokens(scale: float) -> None:
    """Float and fixed-point runs check every bounded maximum's input (MagnitudeError), so
    a run over random tokens on weights scaled up 6x (scores near 200, bound 1560) is the test;
    a bound set too small is caught the same way."""
    _, graph, weights, inputs = _encoder(scale=scale)
    bounded = rewrite(graph, OURS, weights=weights)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        ids = torch.randint(1, 60, inputs["input_ids"].shape, generator=g)
        run_float(bounded, weights, {**inputs, "input_ids": ids})
        run_fixed(bounded, weights, {**inputs, "input_ids": ids})
    tight = Graph.from_json(bounded.to_json())
    for node in tight.nodes:
        if node.op == "secure.attention":
            node.kwargs["magnitude"] = 0.01
    with pytest.raises(InterpreterError, match="MagnitudeError: a maximum's input"):
        run_float(tight, weights, inputs)


def test_rotary_positions_leave_the_scores_unbounded() -> None:
    """LLaMA's q and k pass a rotary embedding (products with public cos and sin, a sum of
    halves) before the matmul: not a split or a move, so no bound."""
    model = tiny_llama(vocab_size=40, layers=1, hidden=32, heads=2, seed=1)
    ids = torch.randint(1, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    graph, weights = capture(CausalLM(model), {"input_ids": ids, "attention_mask": torch.ones(1, 6, dtype=torch.long)})
    magnitudes = _score_magnitudes(rewrite(graph, OURS, weights=weights))
    assert magnitudes and all(m is None for m in magnitudes)


def test_bounded_scores_on_three_parties_cost_fewer_rounds(cluster: LocalCluster) -> None:
    """The same answer within the forms' error, one round fewer per tournament level."""
    _, graph, weights, inputs = _encoder(seq=20)
    reference = run_float(rewrite(graph, OURS, weights=weights), weights, inputs)[0][0]
    shares = deal_weights(weights, cluster.fp)
    outs, rounds = [], []
    for w in (None, weights):
        secure = rewrite(graph, OURS, weights=w)
        r0 = cluster.rounds
        outs.append(run_mpc(cluster, secure, shares, deal_inputs(secure, inputs, cluster.fp))[0][0])
        rounds.append(cluster.rounds - r0)
    def max_rounds(width: int, msb_rounds: int) -> int:
        plan, fused = max_plan(2 * 20, 20, True, width=width)  # 2 heads x 20 rows of 20 scores
        return sum(msb_rounds + math.ceil(math.log2(g)) for g in plan) + (0 if fused else msb_rounds)

    saved_per_layer = max_rounds(64, 8) - max_rounds(32, 7) + 1  # and the GeLU's comparison pass
    assert saved_per_layer >= 2 and rounds[0] - rounds[1] == 2 * saved_per_layer
    for out in outs:
        assert float((out - reference).abs().max()) < 2e-3


class _NormedAttention(nn.Module):
    """LayerNorm, then softmax scores of q and k (linear layers of it) in one of several
    layouts: heads split with a view and a transpose or a permute (a bound), or a
    contraction over tokens instead of features (none)."""

    def __init__(self, layout: str, width: int = 24, heads: int = 3) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.layout, self.heads = layout, heads
        self.norm = nn.LayerNorm(width)
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.norm(hidden_states)
        q, k = self.q(h), self.k(h)
        b, t, f = q.shape
        if self.layout == "transpose":
            q = q.view(b, t, self.heads, f // self.heads).transpose(1, 2)
            k = k.view(b, t, self.heads, f // self.heads).transpose(1, 2)
            scores = q @ k.transpose(-2, -1)
        elif self.layout == "permute":
            q = q.view(b, t, self.heads, f // self.heads).permute(0, 2, 1, 3)
            k = k.view(b, t, self.heads, f // self.heads).permute(0, 2, 3, 1)
            scores = q @ k
        elif self.layout == "whole":  # one head: the whole feature axis
            scores = q @ k.transpose(-2, -1)
        else:  # "tokens": q^T k contracts over the tokens, not over a row's features
            scores = q.transpose(-2, -1) @ k
        return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize(("layout", "bounded"), [("transpose", True), ("permute", True), ("whole", True),
                                                  ("tokens", False)])
def test_the_scores_pass_bounds_feature_contractions_only(layout: str, bounded: bool) -> None:
    module = _NormedAttention(layout)
    x = torch.randn(1, 5, 24) * 40 + 7  # the norm makes the input's scale irrelevant
    graph, weights = capture(module, {"hidden_states": x}, secret_inputs=["hidden_states"])
    secure = rewrite(graph, PUMA, weights=weights)
    (magnitude,) = _score_magnitudes(secure)
    assert (magnitude is not None) == bounded
    if bounded:
        block = 24 if layout == "whole" else 8
        q, k = (block_norm_bounds(lin.weight, lin.bias, module.norm.weight, module.norm.bias, block=block)
                for lin in (module.q, module.k))
        assert magnitude == pytest.approx(float(q.max() * k.max()) * RELATIVE_MARGIN + ABSOLUTE_MARGIN)
        run_float(secure, weights, {"hidden_states": x})  # within the bound (MagnitudeError otherwise)
