"""The per-layer breakdown on tiny models: spans add up to the total, bytes to the counters;
BERT and causal LM module paths name their parts; a generation's steps stay apart."""

from __future__ import annotations

import json

import pytest
import torch

from secure.graph.capture import capture
from secure.graph.causal import capture_causal
from secure.graph.passes import OURS, rewrite
from secure.models import SentenceEncoder, tiny_bert
from secure.profile.profiler import Span
from secure.runtime.breakdown import (
    CAUSAL_REST,
    aggregate,
    breakdown_table,
    chrome_trace,
    mean_parts,
    part_of,
    parts_table,
    steps_trace,
    write_chart,
    write_sections_chart,
)
from secure.runtime.execute import QUERY_SPAN, deal_inputs, deal_weights, run_mpc
from secure.runtime.generate import generate_mpc


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


BERT_PARTS = {
    "encoder.embeddings.word_embeddings": "embedding + LayerNorm",
    "encoder.encoder.layer.0.attention.self.query": "layer 0 attention (QKV, softmax, context)",
    "encoder.encoder.layer.0.attention.output.dense": "layer 0 attention output",
    "encoder.encoder.layer.0.attention.output.LayerNorm": "layer 0 LayerNorm 1",
    "encoder.encoder.layer.5.intermediate.intermediate_act_fn": "layer 5 FFN up + GeLU",
    "encoder.encoder.layer.5.output.LayerNorm": "layer 5 LayerNorm 2",
    "aten.mul.Tensor": "pooling and the rest",
}

CAUSAL_PARTS = {
    # LLaMA (and Qwen2, whose module paths are the same), under CausalStep / CausalLM
    "lm.model.embed_tokens": "embedding",
    "lm.model.layers.0.input_layernorm": "layer 0 RMSNorm 1",
    "lm.model.layers.0.self_attn": "layer 0 attention",
    "lm.model.layers.0.self_attn.k_proj": "layer 0 attention",
    "lm.model.layers.0.self_attn.o_proj": "layer 0 attention",
    "lm.model.layers.0": "layer 0 residual adds",
    "lm.model.layers.11.post_attention_layernorm": "layer 11 RMSNorm 2",
    "lm.model.layers.11.mlp.act_fn": "layer 11 MLP",
    "lm.model.layers.3.mlp.down_proj": "layer 3 MLP",
    "lm.model.norm": "final RMSNorm",
    "lm.lm_head": "LM head",
    "model.layers.2.self_attn.q_proj": "layer 2 attention",  # a bare ...ForCausalLM
    # GPT-2
    "lm.transformer.wte": "embedding",
    "lm.transformer.wpe": "embedding",
    "lm.transformer.h.1.ln_1": "layer 1 LayerNorm 1",
    "lm.transformer.h.1.attn.c_attn": "layer 1 attention",
    "lm.transformer.h.1.ln_2": "layer 1 LayerNorm 2",
    "lm.transformer.h.10.mlp.act": "layer 10 MLP",
    "lm.transformer.h.10": "layer 10 residual adds",
    "lm.transformer.ln_f": "final LayerNorm",
}


def test_module_paths_of_bert_and_causal_lms_name_their_parts():
    for label, part in {**BERT_PARTS, **CAUSAL_PARTS}.items():
        assert part_of(label) == part, label
    assert part_of("aten.cat.default", rest=CAUSAL_REST) == CAUSAL_REST
    assert part_of("lm", rest=CAUSAL_REST) == CAUSAL_REST


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=True, attn_implementation="sdpa")).eval()


def test_generation_steps_break_down_by_part_and_lay_out_one_after_another(cluster, tmp_path):
    """Each step's node spans carry its bytes and rounds; the decode steps' mean per token
    is a mean of steps; the timeline puts the steps end to end."""
    graphs = capture_causal(_tiny_llama(), [8], [12])
    graphs.prefill = {k: rewrite(g, OURS) for k, g in graphs.prefill.items()}
    graphs.decode = {k: rewrite(g, OURS) for k, g in graphs.decode.items()}
    shares = deal_weights(graphs.weights, cluster.fp)
    out = generate_mpc(cluster, graphs, shares, torch.tensor([3, 5, 7]), 3, bucket=8, trace=True)
    assert [s.kind for s in out.steps] == ["prefill", "decode", "decode"]
    per_step = []
    for step in out.steps:
        # party 0's spans; the step counts the party that sent most (roles rotate from call to
        # call, so in a small decode step one party sends up to about a tenth more than another)
        assert 0.85 * step.bytes_sent <= sum(s.bytes_sent for s in step.spans) <= step.bytes_sent
        assert sum(s.rounds for s in step.spans) == step.rounds
        assert sum(s.duration_s for s in step.spans) <= step.seconds
        per_step.append(aggregate(step.spans, CAUSAL_REST))
    assert {"embedding", "layer 0 attention", "layer 1 MLP", "layer 1 RMSNorm 2", "final RMSNorm",
            "LM head"} <= set(per_step[0])
    decode = mean_parts(per_step[1:])
    for key, field in (("seconds", "duration_s"), ("bytes_sent", "bytes_sent"), ("rounds", "rounds")):
        per_token = sum(getattr(x, field) for s in out.steps[1:] for x in s.spans) / 2
        assert sum(p[key] for p in decode.values()) == pytest.approx(per_token)
    assert "layer 0 attention" in parts_table(decode, "decode (per token, mean over steps)")
    # a decode step sends a small fraction of the prefill's bytes
    assert sum(p["bytes_sent"] for p in decode.values()) * 3 < sum(p["bytes_sent"] for p in per_step[0].values())

    trace = steps_trace([(f"step {k}", s.seconds, s.spans) for k, s in enumerate(out.steps)])
    events = json.loads(json.dumps(trace))["traceEvents"]
    segments = [e for e in events if e["ph"] == "X" and e["tid"] == 0]
    assert [e["name"] for e in segments] == ["step 0", "step 1", "step 2"]
    for first, second in zip(segments, segments[1:]):
        assert second["ts"] == pytest.approx(first["ts"] + first["dur"], abs=1.0)
    for segment, step in zip(segments, out.steps):
        nodes = [e for e in events if e["ph"] == "X" and e["tid"] == 1
                 and segment["ts"] <= e["ts"] < segment["ts"] + segment["dur"]]
        assert len(nodes) == len(step.spans)
        assert segment["args"]["bytes_sent"] == sum(s.bytes_sent for s in step.spans)
    write_sections_chart({"prefill": per_step[0], "decode per token": decode}, str(tmp_path / "steps.png"), "steps")
    assert (tmp_path / "steps.png").stat().st_size > 1000
