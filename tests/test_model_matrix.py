"""The model matrix: small random configs of the architectures users bring, captured,
rewritten with the default recipe and run on the secure forms' float evaluation, on the
fixed-point simulation and (one per new family) on three parties, each against the
plaintext model: cosine of the mean-pooled embedding for encoders, logit error and top-1
agreement for causal LMs (judged on the positions whose plaintext top-2 gap exceeds twice
the measured logit error: random weights make near-ties).

Covered: BERT, RoBERTa (positions from the public mask), DistilBERT, ALBERT (one layer's
weights shared by all), ELECTRA, GPT-2, GPT-NeoX (Pythia: partial rotary, parallel
residual), LLaMA with GQA, Qwen2 (QKV bias), Mistral (sliding-window mask). An
architecture we do not support fails at the rewrite, naming the op and the module.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from secure.graph.capture import capture
from secure.graph.passes import OURS, UnsupportedOpError, rewrite
from secure.models import CausalLM, SentenceEncoder
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_fixed, run_float, run_mpc

SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
SEQ, REAL = 8, 6


def _encoders() -> dict[str, Callable[[], torch.nn.Module]]:
    import transformers as t

    return {
        "bert": lambda: t.BertModel(t.BertConfig(vocab_size=100, max_position_embeddings=40, **SHAPE)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(vocab_size=100, max_position_embeddings=40, pad_token_id=1,
                                                          **SHAPE)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                                                   hidden_dim=64, max_position_embeddings=40)),
        "albert": lambda: t.AlbertModel(t.AlbertConfig(vocab_size=100, embedding_size=16, max_position_embeddings=40,
                                                       **SHAPE)),
        "electra": lambda: t.ElectraModel(t.ElectraConfig(vocab_size=100, embedding_size=16,
                                                          max_position_embeddings=40, **SHAPE)),
    }


def _decoders() -> dict[str, Callable[[], torch.nn.Module]]:
    import transformers as t

    return {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_positions=40, n_embd=32, n_layer=2, n_head=2,
                                                       bos_token_id=0, eos_token_id=0)),
        "gpt-neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(vocab_size=100, max_position_embeddings=40,
                                                                 rotary_pct=0.25, **SHAPE)),
        "llama-gqa": lambda: t.LlamaForCausalLM(t.LlamaConfig(vocab_size=100, max_position_embeddings=40,
                                                              num_key_value_heads=1, **SHAPE)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(vocab_size=100, max_position_embeddings=40,
                                                          num_key_value_heads=1, **SHAPE)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(vocab_size=100, max_position_embeddings=40,
                                                                num_key_value_heads=1, sliding_window=4, **SHAPE)),
    }


ENCODERS = ["bert", "roberta", "distilbert", "albert", "electra"]
DECODERS = ["gpt2", "gpt-neox", "llama-gqa", "qwen2", "mistral"]
ON_THREE_PARTIES = ["roberta", "albert", "gpt-neox", "mistral"]


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (1, SEQ), generator=torch.Generator().manual_seed(0))
    ids[0, REAL:] = 1  # RoBERTa's pad id: the client pads with the pad token where the mask is 0
    mask = torch.zeros(1, SEQ, dtype=torch.long)
    mask[0, :REAL] = 1
    return {"input_ids": ids, "attention_mask": mask}


_BUILT: dict[str, tuple] = {}


def _built(name: str) -> tuple:
    """(wrapped plaintext model, rewritten graph, weights, plaintext output) for ``name``."""
    if name not in _BUILT:
        torch.manual_seed(0)
        make = {**_encoders(), **_decoders()}[name]
        model = make().eval()
        model.config._attn_implementation = "sdpa"
        wrapped = SentenceEncoder(model) if name in ENCODERS else CausalLM(model)
        graph, weights = capture(wrapped, _inputs())
        with torch.no_grad():
            reference = wrapped(**_inputs()).double()
        _BUILT[name] = (wrapped, rewrite(graph, OURS), weights, reference)
    return _BUILT[name]


def _judge(name: str, secure: torch.Tensor, reference: torch.Tensor, float_error: float | None = None) -> float:
    """Assert agreement; returns the logit error (LMs) or 1 - cosine (encoders)."""
    if name in ENCODERS:
        cosine = float(torch.nn.functional.cosine_similarity(secure.reshape(1, -1), reference.reshape(1, -1)))
        assert cosine > 0.9995, f"{name}: cosine {cosine}"
        return 1.0 - cosine
    real = slice(0, REAL)
    got, want = secure[0, real], reference[0, real]
    error = float((got - want).abs().max())
    assert error < 0.05, f"{name}: logits differ by {error}"
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * max(error, float_error or 0.0)
    assert bool((got.argmax(-1) == want.argmax(-1))[clear].all()), f"{name}: a clear top-1 differs"
    return error


@pytest.mark.parametrize("name", ENCODERS + DECODERS)
def test_float_forms_and_fixed_point(name: str) -> None:
    _, graph, weights, reference = _built(name)
    (floats,), _ = run_float(graph, weights, _inputs())
    error = _judge(name, floats, reference)
    (fixed,), _ = run_fixed(graph, weights, _inputs())
    _judge(name, fixed, reference, error)


@pytest.mark.parametrize("name", ON_THREE_PARTIES)
def test_three_parties(cluster: LocalCluster, name: str) -> None:
    _, graph, weights, reference = _built(name)
    (floats,), _ = run_float(graph, weights, _inputs())
    float_error = _judge(name, floats, reference)
    (secure,), _ = run_mpc(cluster, graph, deal_weights(weights, cluster.fp), deal_inputs(graph, _inputs(), cluster.fp))
    _judge(name, secure, reference, float_error)


def test_roberta_positions_come_from_the_public_mask() -> None:
    """RoBERTa's position ids (cumsum of ids != pad) are computed in plaintext from the mask:
    no secret node compares or counts, and the position table is read by public indices."""
    _, graph, _, _ = _built("roberta")
    secret_ops = {n.op for n in graph.nodes if n.secret}
    assert not secret_ops & {"aten.ne.Scalar", "aten.cumsum.default", "aten.gather.default"}
    position_lookup = [n for n in graph.nodes if n.op == "aten.embedding.default" and "position" in n.origin]
    assert position_lookup and all(not any(r == "input_ids" for r in n.refs()) for n in position_lookup)


def test_an_unsupported_architecture_names_the_op_and_module() -> None:
    import transformers as t

    model = t.BertModel(t.BertConfig(vocab_size=100, max_position_embeddings=40, hidden_act="relu", **SHAPE)).eval()
    graph, _ = capture(SentenceEncoder(model), _inputs())
    with pytest.raises(UnsupportedOpError, match=r"aten\.relu.*encoder\.encoder\.layer\.0\.intermediate"):
        rewrite(graph, OURS)
