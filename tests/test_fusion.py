"""Round-saving rewrites: parallel linear layers fused into one pass of products, and
attention's 1/sqrt(d) folded into the softmax's public coefficients. Same results, fewer
rounds, on floats and on three parties."""

from __future__ import annotations

import torch

from secure.graph.capture import capture
from secure.graph.ir import Graph
from secure.graph.passes import OURS, PUMA, rewrite
from secure.models import CausalLM, SentenceEncoder, tiny_bert, tiny_llama
from secure.runtime.execute import deal_inputs, deal_weights, run_float, run_mpc

F64 = torch.float64


def _bert() -> tuple[Graph, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 200, (1, 12), generator=gen)
    mask = torch.ones(1, 12, dtype=torch.long)
    mask[0, 9:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    graph, weights = capture(SentenceEncoder(tiny_bert()), inputs)
    return graph, weights, inputs


def _ops(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes if n.secret]


def test_query_key_value_become_one_linears_node_and_the_scale_leaves_the_graph():
    graph, _, _ = _bert()
    fused, apart = rewrite(graph, OURS), rewrite(graph, OURS, fuse_linears=False)
    layers = _ops(apart).count("secure.attention")
    assert _ops(fused).count("secure.linears") == layers  # one per layer: q, k, v
    assert _ops(apart).count("aten.linear.default") - _ops(fused).count("aten.linear.default") == 3 * layers
    softmax = [n for n in fused.nodes if n.op == "secure.attention"]
    assert all(n.kwargs["scale"] == 0.25 for n in softmax)  # 1/sqrt(head dim 16)
    assert not any(n.op == "aten.mul.Tensor" and n.name.endswith(".scaled") for n in fused.nodes)
    assert Graph.from_json(fused.to_json()).nodes[0].name == fused.nodes[0].name  # stays loadable data


def test_fused_graph_gives_the_same_answer_in_fewer_rounds(cluster):
    graph, weights, inputs = _bert()
    fused, apart = rewrite(graph, OURS), rewrite(graph, OURS, fuse_linears=False)
    (f_fused,), _ = run_float(fused, weights, inputs)
    (f_apart,), _ = run_float(apart, weights, inputs)
    assert torch.allclose(f_fused, f_apart, atol=1e-12)
    shares = deal_weights(weights, cluster.fp)
    outs, rounds = [], []
    for g in (fused, apart):
        before = cluster.rounds
        (out,), _ = run_mpc(cluster, g, shares, deal_inputs(g, inputs, cluster.fp))
        rounds.append(cluster.rounds - before)
        outs.append(out)
    assert float((outs[0] - outs[1]).abs().max()) < 2e-3
    assert float((outs[0] - f_fused).abs().max()) < 5e-3
    assert rounds[1] - rounds[0] == 4 * _ops(apart).count("secure.attention")  # 2 linears' rounds per layer


def test_scale_in_the_softmax_matches_scaling_first():
    """PUMA's own forms keep the old graph shape apart from the scale: floats agree."""
    graph, weights, inputs = _bert()
    scores_first = rewrite(graph, PUMA, fuse_linears=False)
    (out,), _ = run_float(scores_first, weights, inputs)
    ref = SentenceEncoder(tiny_bert())  # same seed, same weights as captured
    with torch.no_grad():
        exact = ref(**inputs).to(F64)
    assert float((out - exact).abs().max()) < 0.05  # PUMA's forms' own error


def test_llama_gate_and_up_fuse_too():
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    graph, _ = capture(CausalLM(tiny_llama()), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    fused = rewrite(graph, OURS)
    linears = [n for n in fused.nodes if n.op == "secure.linears"]
    widths = sorted(sum(1 for a in n.args[1::2] if a is not None) for n in linears)
    layers = _ops(fused).count("secure.attention")
    assert widths == [2] * layers + [3] * layers  # gate/up and q/k/v in every layer


def test_llama_rmsnorm_chain_becomes_one_form_with_the_same_output(cluster, monkeypatch):
    """pow, mean, add, rsqrt, mul, mul -> secure.rms_norm: 16 rounds instead of 24 per norm,
    the output within the forms' error of the captured chain on floats and on shares."""
    import secure.graph.passes as passes

    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    graph, weights = capture(CausalLM(tiny_llama()), inputs)
    fused = rewrite(graph, OURS)
    layers = _ops(fused).count("secure.attention")
    assert _ops(fused).count("secure.rms_norm") == 2 * layers + 1 and "secure.rsqrt" not in _ops(fused)
    monkeypatch.setattr(passes, "fuse_rms_norm", lambda g: g)
    chain = rewrite(graph, OURS)
    assert _ops(chain).count("secure.rsqrt") == 2 * layers + 1
    (f_fused,), _ = run_float(fused, weights, inputs)
    (f_chain,), _ = run_float(chain, weights, inputs)
    assert float((f_fused - f_chain).abs().max()) < 1e-3
    shares = deal_weights(weights, cluster.fp)
    rounds = []
    for g in (fused, chain):
        before = cluster.rounds
        (out,), _ = run_mpc(cluster, g, shares, deal_inputs(g, inputs, cluster.fp))
        rounds.append(cluster.rounds - before)
        assert float((out - f_fused).abs().max()) < 2e-2
    assert rounds[1] - rounds[0] == 8 * (2 * layers + 1)
