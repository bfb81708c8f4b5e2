"""The per-layer breakdown on a tiny model: spans add up to the total, bytes to the counters."""

from __future__ import annotations

import json

import torch

from secure.graph.capture import capture
from secure.graph.passes import OURS, rewrite
from secure.models import SentenceEncoder, tiny_bert
from secure.profile.profiler import Span
from secure.runtime.breakdown import aggregate, breakdown_table, chrome_trace, part_of, write_chart
from secure.runtime.execute import QUERY_SPAN, deal_inputs, deal_weights, run_mpc


def test_layer_spans_add_up_to_the_total_and_match_the_transport(cluster, tmp_path):
    inputs = {"input_ids": torch.randint(1, 200, (1, 8), generator=torch.Generator().manual_seed(1)),
              "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    graph, weights = capture(SentenceEncoder(tiny_bert()), inputs)
    secure = rewrite(graph, OURS)
    shares = deal_weights(weights, cluster.fp)
    for p in cluster.parties:
        p.profiler.clear()
    before = cluster.bytes_sent()
    run_mpc(cluster, secure, shares, deal_inputs(secure, inputs, cluster.fp), trace_spans=True)
    sent = [b - b0 for b, b0 in zip(cluster.bytes_sent(), before)]
    for party, nbytes in zip(cluster.parties, sent):
        spans = party.profiler.spans
        (query,) = [s for s in spans if s.depth == 0 and s.name == QUERY_SPAN]
        nodes = [s for s in spans if s.depth == 1]
        assert abs(sum(s.duration_s for s in nodes) - query.duration_s) <= 0.05 * query.duration_s
        assert sum(s.bytes_sent for s in nodes) == query.bytes_sent == nbytes
        assert sum(s.rounds for s in nodes) == query.rounds
    node_spans = [s for s in cluster.parties[0].profiler.spans if s.depth == 1]
    parts = aggregate(node_spans)
    assert {"embedding + LayerNorm", "layer 0 FFN up + GeLU", "layer 1 attention (QKV, softmax, context)"} <= set(parts)
    assert sum(p["bytes_sent"] for p in parts.values()) == sent[0]
    table = breakdown_table(node_spans)
    assert "layer 1 LayerNorm 2" in table
    trace = chrome_trace([Span("encoder.layer.0.intermediate", 0.0, 0.5, 10, 2)])
    assert json.loads(json.dumps(trace))["traceEvents"][0]["dur"] == 500000.0
    write_chart(parts, str(tmp_path / "chart.png"), "tiny BERT")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    assert part_of("encoder.encoder.layer.3.output.dense") == "layer 3 FFN down"
