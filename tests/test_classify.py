"""Sequence classification end to end, below the nodes.

* Hugging Face ``BertForSequenceClassification`` and ``RobertaForSequenceClassification``
  (small random configs; the pooler's tanh becomes ``secure.tanh``) capture, rewrite and run
  on the float forms, fixed point and three parties: logits against the plaintext model and
  the same argmax; ``DistilBertForSequenceClassification`` is refused, naming its ReLU;
  a saved classifier folder loads as a :class:`SequenceClassifier` with its labels.
* The WordNet topic task (``secure.classify.topics``): a deterministic, balanced split by
  synset, no text in both halves.
* The shipped ``minilm-topics``: its head loads with its labels, its plaintext accuracy on
  the test split is what ``training.json`` records, and on fixed point a batch of test texts
  gets the plaintext labels; dealt by name (``python -m party.deal --model minilm-topics``)
  as a classifier with its label names.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from secure.graph.capture import capture
from secure.graph.passes import OURS, UnsupportedOpError, rewrite
from secure.models import SentenceEncoder, SequenceClassifier, load_model_folder
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_fixed, run_float, run_mpc

SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
LABELS = ("negative", "neutral", "positive", "other")
BATCH, SEQ = 3, 8


def _classifiers() -> dict[str, Callable[[], torch.nn.Module]]:
    import transformers as t

    common = {"vocab_size": 100, "max_position_embeddings": 40, "num_labels": len(LABELS),
              "id2label": dict(enumerate(LABELS)), "label2id": {v: k for k, v in enumerate(LABELS)}}
    return {
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(**common, **SHAPE)),
        "roberta": lambda: t.RobertaForSequenceClassification(t.RobertaConfig(pad_token_id=1, **common, **SHAPE)),
    }


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for row, real in enumerate((8, 6, 3)):
        ids[row, real:] = 1  # RoBERTa's pad id where the mask is 0
        mask[row, real:] = 0
    return {"input_ids": ids, "attention_mask": mask}


_BUILT: dict[str, tuple] = {}


def _built(name: str) -> tuple:
    """(wrapped model, rewritten graph, weights, plaintext logits): the classifier head scaled up
    so that the random model's logits are O(1) apart, not near-ties."""
    if name not in _BUILT:
        torch.manual_seed(0)
        model = _classifiers()[name]().eval()
        model.config._attn_implementation = "sdpa"
        head = model.classifier.out_proj if name == "roberta" else model.classifier
        with torch.no_grad():
            head.weight.mul_(100.0)
        wrapped = SequenceClassifier(model)
        graph, weights = capture(wrapped, _inputs())
        with torch.no_grad():
            reference = wrapped(**_inputs()).double()
        _BUILT[name] = (wrapped, rewrite(graph, OURS), weights, reference)
    return _BUILT[name]


def _judge(logits: torch.Tensor, reference: torch.Tensor, bound: float) -> None:
    assert logits.shape == (BATCH, len(LABELS))
    assert float((logits - reference).abs().max()) <= bound * float(reference.abs().max())
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_classifier_on_float_forms_and_fixed_point(name: str) -> None:
    wrapped, graph, weights, reference = _built(name)
    assert wrapped.labels == LABELS
    assert [n.op for n in graph.nodes if "tanh" in n.op] == ["secure.tanh"]
    assert float((reference.max(-1).values - reference.min(-1).values).min()) > 0.3  # clear winners
    (floats,), _ = run_float(graph, weights, _inputs())
    _judge(floats, reference, 0.01)
    (fixed,), _ = run_fixed(graph, weights, _inputs())
    _judge(fixed, reference, 0.01)


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_classifier_on_three_parties(cluster: LocalCluster, name: str) -> None:
    _, graph, weights, reference = _built(name)
    (logits,), _ = run_mpc(cluster, graph, deal_weights(weights, cluster.fp), deal_inputs(graph, _inputs(), cluster.fp))
    _judge(logits, reference, 0.01)


def test_distilbert_classifier_is_refused_naming_its_relu() -> None:
    import transformers as t

    model = t.DistilBertForSequenceClassification(t.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=40, num_labels=2)).eval()
    graph, _ = capture(SequenceClassifier(model), _inputs())
    with pytest.raises(UnsupportedOpError, match=r"aten\.relu"):
        rewrite(graph, OURS)


def test_a_classifier_folder_loads_as_a_classifier(tmp_path: Path) -> None:
    from tests.test_catalogue import _save_tokenizer

    wrapped, *_ = _built("bert")
    wrapped.model.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    loaded, tokenizer, causal = load_model_folder(tmp_path)
    assert isinstance(loaded, SequenceClassifier) and not causal and loaded.labels == LABELS
    with torch.no_grad():
        assert torch.allclose(loaded(**_inputs()).double(), _built("bert")[3], atol=1e-5)


# ---- the topic task and the shipped classifier ------------------------------------------------
def _wordnet() -> None:
    from secure.distill.wordnet import missing_reason

    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)


def test_the_topic_split_is_fixed_balanced_and_disjoint() -> None:
    _wordnet()
    from secure.classify.topics import LABELS as TOPICS
    from secure.classify.topics import TEST_PER_CLASS, TRAIN_PER_CLASS, all_examples, is_test_synset, split

    train, test = split()
    assert len(train) == TRAIN_PER_CLASS * len(TOPICS) and len(test) == TEST_PER_CLASS * len(TOPICS)
    for label in range(len(TOPICS)):
        assert sum(e.label == label for e in test) == TEST_PER_CLASS
    assert not {e.text for e in train} & {e.text for e in test}
    assert not {e.synset for e in train} & {e.synset for e in test}
    assert all(is_test_synset(e.synset) for e in test) and not any(is_test_synset(e.synset) for e in train)
    texts = [e.text for e in all_examples()]
    assert len(texts) == len(set(texts))  # a definition two synsets share is in neither half
    assert test[0].synset < test[-1].synset and split() == (train, test)


@pytest.fixture(scope="module")
def topics() -> tuple:
    """(the shipped classifier, its tokenizer, the test split)."""
    _wordnet()
    from secure.classify import load_topic_classifier
    from secure.classify.topics import test_examples

    model, tokenizer = load_topic_classifier()
    return model, tokenizer, test_examples()


def test_the_shipped_head_has_the_recorded_accuracy(topics: tuple) -> None:
    from secure.classify import shipped_head_path
    from secure.classify.topics import LABELS as TOPICS
    from secure.classify.train import embed_texts

    model, tokenizer, test = topics
    assert model.labels == TOPICS
    record = json.loads((shipped_head_path().parent / "training.json").read_text())
    assert record["labels"] == list(TOPICS) and record["split"]["test"] == len(test)
    features = embed_texts(SentenceEncoder(model.encoder), tokenizer, [e.text for e in test])
    with torch.no_grad():
        predicted = model.head(features.float()).argmax(-1)
    accuracy = float((predicted == torch.tensor([e.label for e in test])).double().mean())
    assert abs(accuracy - record["test_accuracy"]) <= 1.5 / len(test) and accuracy >= 0.9


def test_the_shipped_classifier_on_fixed_point(topics: tuple) -> None:
    model, tokenizer, test = topics
    texts = [e.text for e in test[::48]]  # 8 texts
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    graph, weights = capture(model, inputs)
    graph = rewrite(graph, OURS)
    with torch.no_grad():
        reference = model(**inputs).double()
    (fixed,), _ = run_fixed(graph, weights, inputs)
    assert fixed.shape == (len(texts), 6) and float((fixed - reference).abs().max()) <= 0.05
    assert torch.equal(fixed.argmax(-1), reference.argmax(-1))


def test_minilm_topics_is_dealt_by_name(topics: tuple, tmp_path: Path) -> None:
    from party.deal import main as deal_main
    from secure.classify.topics import LABELS as TOPICS

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert deal_main(["--model", "minilm-topics", "--out", str(tmp_path), "--seq-lens", "16"]) == 0
    text = out.getvalue()
    assert "[1/1] minilm-topics: classifier" in text and "dealt minilm-topics (classifier, ours)" in text, text
    info = json.loads((tmp_path / "model.json").read_text())
    (entry,) = info["models"]
    assert (entry["model"], entry["kind"], entry["labels"], entry["seq_lens"]) == (
        "minilm-topics", "classifier", list(TOPICS), [16])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(m["model"], m["kind"]) for m in manifest["models"]] == [("minilm-topics", "classifier")]
    shares = torch.load(tmp_path / "party2" / "shares.pt", weights_only=True)
    assert shares["models"]["minilm-topics"]["info"] == {"labels": list(TOPICS)}
    assert not (tmp_path / "tokenizer").exists()  # every client has MiniLM's tokenizer
