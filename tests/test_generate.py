"""Secure generation on the in-process engines: prefill + decode graphs with a KV cache
held as shares, against the plaintext model's own cached generation.

Small random-weight configs of the LLaMA family (grouped-query attention, tied
embeddings, RoPE), Qwen2 (bias in the QKV projections) and GPT-2. Random-weight logits
have small gaps between their top two entries, so top-1 agreement is judged on the
positions whose plaintext gap exceeds the secure forms' measured logit error (the
benchmark ``benchmarks/generation.py`` judges a trained model on every position).
"""

from __future__ import annotations

import pytest
import torch

from secure.graph.causal import (
    CausalGraphs,
    GenerationLimitError,
    capacity_for,
    capture_causal,
    check_budget,
    decode_public,
    prefill_inputs,
)
from secure.graph.ir import Graph
from secure.graph.passes import OURS, rewrite
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_weights
from secure.runtime.generate import generate_float, generate_mpc, plaintext_continuation
from secure.runtime.inputs import input_specs

BUCKETS, CAPACITIES = (8, 16), (16, 24)
NEW_TOKENS = 6


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=True, attn_implementation="sdpa")).eval()


def _llama_eager() -> torch.nn.Module:
    """Eager attention: repeat_kv's expand + clone(memory_format) and an additive finfo.min mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, attn_implementation="eager")).eval()


def _qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")).eval()


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")).eval()


MODELS = {"llama-gqa": _llama, "llama-eager": _llama_eager, "qwen2": _qwen2, "gpt2": _gpt2}
_COMPILED: dict[str, tuple[torch.nn.Module, CausalGraphs]] = {}


def compiled(name: str) -> tuple[torch.nn.Module, CausalGraphs]:
    if name not in _COMPILED:
        lm = MODELS[name]()
        graphs = capture_causal(lm, BUCKETS, CAPACITIES)
        graphs.prefill = {k: rewrite(g, OURS) for k, g in graphs.prefill.items()}
        graphs.decode = {k: rewrite(g, OURS) for k, g in graphs.decode.items()}
        _COMPILED[name] = (lm, graphs)
    return _COMPILED[name]


def _prompt(vocab: int, n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _reference_logits(lm: torch.nn.Module, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The plaintext logits after each prefix the secure run saw (prompt + its own tokens)."""
    ids = torch.cat([prompt, torch.tensor(tokens[:-1], dtype=torch.long)]).reshape(1, -1)
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].to(torch.float64)
    return logits[prompt.numel() - 1:]


def _judged_agreement(reference: torch.Tensor, secure: list[torch.Tensor], error: float) -> tuple[int, int]:
    """(agreeing, judged) top-1 positions among those whose plaintext top-2 gap exceeds 2 error."""
    top2 = reference.topk(2, dim=-1).values
    judged = (top2[:, 0] - top2[:, 1]) > 2 * error
    agree = torch.stack(secure).argmax(-1) == reference.argmax(-1)
    return int((agree & judged).sum()), int(judged.sum())


@pytest.mark.parametrize("name", list(MODELS))
def test_float_forms_follow_the_plaintext_cache(name: str) -> None:
    lm, graphs = compiled(name)
    prompt = _prompt(graphs.vocab_size)
    out = generate_float(graphs, prompt, NEW_TOKENS, bucket=8)
    reference = _reference_logits(lm, prompt, out.tokens)
    error = max(float((a - b).abs().max()) for a, b in zip(out.logits, reference))
    assert error < 0.05, f"{name}: the float forms' logits differ by {error}"
    agree, judged = _judged_agreement(reference, out.logits, error)
    assert judged >= NEW_TOKENS // 2 and agree == judged


@pytest.mark.parametrize("name", list(MODELS))
def test_three_parties_generate_what_plaintext_does(cluster: LocalCluster, name: str) -> None:
    lm, graphs = compiled(name)
    prompt = _prompt(graphs.vocab_size, n=6, seed=1)
    shares = deal_weights(graphs.weights, cluster.fp)
    out = generate_mpc(cluster, graphs, shares, prompt, NEW_TOKENS, bucket=8)
    reference = _reference_logits(lm, prompt, out.tokens)
    error = max(float((a - b).abs().max()) for a, b in zip(out.logits, reference))
    assert error < 0.06, f"{name}: the secure logits differ by {error}"
    agree, judged = _judged_agreement(reference, out.logits, error)
    assert judged >= NEW_TOKENS // 2 and agree == judged
    # the plaintext model's own cached greedy run agrees wherever its margins are clear
    tokens, _ = plaintext_continuation(lm, prompt, NEW_TOKENS)
    assert tokens[0] == out.tokens[0] or judged < NEW_TOKENS


def test_decode_steps_do_not_recompute_the_prefix(cluster: LocalCluster) -> None:
    """A decode step's traffic depends only on the capacity it runs on, never on the step
    index, and it is a small fraction of the prefill's."""
    _, graphs = compiled("llama-gqa")
    shares = deal_weights(graphs.weights, cluster.fp)
    out = generate_mpc(cluster, graphs, shares, _prompt(graphs.vocab_size), 12, bucket=8)
    prefill, decode = out.steps[0], out.steps[1:]
    assert prefill.kind == "prefill" and all(s.kind == "decode" for s in decode)
    # bucket 8: step k reads the 8 + k - 1 filled slots: capacity 16 up to step 9, then 24
    assert [s.capacity for s in decode] == [16] * 9 + [24] * 2
    for capacity in (16, 24):
        same = {(s.bytes_sent, s.rounds) for s in decode if s.capacity == capacity}
        assert len(same) == 1, f"decode steps at capacity {capacity} cost differently: {same}"
    assert decode[0].bytes_sent * 3 < prefill.bytes_sent


def test_argmax_reveal_gives_the_greedy_tokens(cluster: LocalCluster) -> None:
    """Revealing only the token id (argmax on shares) picks what greedy sampling on the
    opened logits picks, on positions with a clear margin."""
    lm, graphs = compiled("llama-gqa")
    prompt = _prompt(graphs.vocab_size, seed=4)
    shares = deal_weights(graphs.weights, cluster.fp)
    out = generate_mpc(cluster, graphs, shares, prompt, 4, bucket=8, reveal="argmax")
    assert out.logits == [] and len(out.tokens) == 4
    reference = _reference_logits(lm, prompt, out.tokens)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert all(t == int(r.argmax()) for t, r, c in zip(out.tokens, reference, clear) if c)


def test_an_additive_mask_becomes_the_softmax_bias() -> None:
    """Eager attention adds a public finfo.min mask to the secret scores; the rewrite folds it
    into the secure softmax (masked at or below its floor), so no share holds finfo.min."""
    _, graphs = compiled("llama-eager")
    for graph in (graphs.prefill[8], graphs.decode[16]):
        softmaxes = [n for n in graph.nodes if n.op == "secure.softmax"]
        assert len(softmaxes) == 2 and all(n.kwargs.get("bias") is not None for n in softmaxes)


def test_tied_embeddings_are_one_secret() -> None:
    """LLaMA's tied input and output embeddings are one weight, dealt once, used by the
    secure embedding and by the LM head on shares."""
    _, graphs = compiled("llama-gqa")
    names = [k for k in graphs.weights if "embed_tokens" in k or "lm_head" in k]
    assert names == ["lm.model.embed_tokens.weight"]
    graph = graphs.prefill[8]
    readers = [n.op for n in graph.nodes if any(r == names[0] for r in n.refs())]
    assert "secure.embedding" in readers and "aten.linear.default" in readers


def test_graphs_share_weights_and_hold_state_inputs() -> None:
    _, graphs = compiled("qwen2")
    decode = graphs.decode[16]
    state = [i for i in decode.inputs if i.kind == "state"]
    assert len(state) == 2 * graphs.layout.layers
    assert [s.name for s in input_specs(decode)] == ["input_ids", "attention_mask", "position_ids"]
    assert Graph.from_json(decode.to_json()).inputs == decode.inputs  # state inputs survive the file
    assert set(decode.weights) == set(graphs.prefill[8].weights)
    assert graphs.info()["capacities"] == [16, 24]


def test_limits_are_refused_with_reasons() -> None:
    info = compiled("llama-gqa")[1].info()
    with pytest.raises(GenerationLimitError, match="does not fit the bucket"):
        prefill_inputs(torch.arange(1, 10), 8)
    with pytest.raises(GenerationLimitError, match="empty"):
        prefill_inputs(torch.tensor([], dtype=torch.long), 8)
    with pytest.raises(GenerationLimitError, match="positions"):
        check_budget(info, 5, 8, 70)
    with pytest.raises(GenerationLimitError, match="need 25 cache slots"):
        check_budget(info, 5, 16, 11)
    with pytest.raises(GenerationLimitError, match="at least 1"):
        check_budget(info, 5, 8, 0)
    with pytest.raises(GenerationLimitError, match="capacity"):
        capacity_for([16, 24], 25)
    check_budget(info, 5, 16, 10)  # the 9th and last decode step reads 16 + 8 = 24 slots: the largest capacity
    full = generate_float(compiled("llama-gqa")[1], _prompt(128), 10, bucket=16)
    assert [s.capacity for s in full.steps[1:]] == [16] + [24] * 8


def test_public_inputs_of_a_step() -> None:
    step = decode_public(prompt_len=3, bucket=8, filled=10, capacity=16)
    assert step["attention_mask"].tolist()[0] == [0] * 5 + [1] * 5 + [0] * 6 + [1]
    assert step["position_ids"].item() == 5
    first = prefill_inputs(torch.tensor([7, 8, 9]), 8)
    assert first["input_ids"].tolist()[0] == [0] * 5 + [7, 8, 9]
    assert first["position_ids"].tolist()[0] == [0] * 5 + [0, 1, 2]


def test_the_unrewritten_reference_runs_gqa_graphs() -> None:
    """repeat_kv's clone names its memory format; the plain-torch reference reads it back
    from an allow-list (a graph naming another value is refused)."""
    from secure.graph.capture import capture
    from secure.models import CausalLM
    from secure.runtime.execute import run_reference
    from secure.runtime.interpreter import InterpreterError

    lm, _ = compiled("llama-gqa")
    inputs = {"input_ids": _prompt(128, n=8).reshape(1, -1), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    graph, weights = capture(CausalLM(lm), inputs)
    assert any(n.kwargs.get("memory_format") == "torch.contiguous_format" for n in graph.nodes)
    (logits,), _ = run_reference(graph, weights, inputs)
    with torch.no_grad():
        assert float((logits - lm(**inputs).logits.double()).abs().max()) < 1e-5
    clone = next(n for n in graph.nodes if n.kwargs.get("memory_format"))
    clone.kwargs["memory_format"] = "os.system"
    with pytest.raises(InterpreterError, match="memory_format='os.system' is not one of"):
        run_reference(graph, weights, inputs)
