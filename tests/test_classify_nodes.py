"""A classifier served by three party nodes (``LocalNodes``, TLS).

A random 2-layer ``BertForSequenceClassification`` folder (hidden 32, four named labels,
the word-level tokenizer of ``tests/test_catalogue.py``) dealt with the command line's
loader at padded length 8 and served: ``Describe`` lists it as a classifier with its
labels; ``SecureClient.classify`` returns the label probabilities, computed at the client
from the logits the parties reconstruct, against the plaintext model; the command line
prints the label; ``Generate`` on it is refused, the nodes serving on.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client.sdk import local_client
from party.launch import LocalNodes
from tests.test_catalogue import TEXT, _save_tokenizer

SEQ = 8
LABELS = ("animal", "plant", "food", "person")


def _classifier_folder(folder: Path) -> None:
    import transformers as t

    vocab = _save_tokenizer(folder)
    torch.manual_seed(3)
    config = t.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, num_labels=len(LABELS),
                          id2label=dict(enumerate(LABELS)), label2id={v: k for k, v in enumerate(LABELS)})
    model = t.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)  # logits O(1) apart: the random model is not a near-tie
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNodes, Path]]:
    folder = tmp_path_factory.mktemp("models") / "tiny-classifier"
    _classifier_folder(folder)
    with LocalNodes(tmp_path_factory.mktemp("cluster"), seq_lens=(SEQ,), deadline_s=10.0, progress=False,
                    models=(str(folder),)) as nodes:
        yield nodes, folder


def test_a_classifier_is_described_and_classifies(served: tuple[LocalNodes, Path]) -> None:
    from secure.models import load_model_folder

    nodes, folder = served
    with local_client(nodes) as client:
        infos = client.verify_parties()
        answer = client.classify(TEXT)
        inputs = client.encode_text(TEXT)
    for info in infos:
        (entry,) = info.catalogue
        assert (entry.model, entry.kind, list(entry.labels), list(entry.seq_lens)) == (
            "tiny-classifier", "classifier", list(LABELS), [SEQ])
    plain, _, _ = load_model_folder(folder)
    with torch.no_grad():
        expected = torch.softmax(plain(**inputs).double()[0], -1)
    assert answer.labels == list(LABELS) and answer.label == LABELS[int(expected.argmax())]
    assert float((answer.probabilities - expected).abs().max()) <= 1e-2
    assert abs(sum(answer.as_dict().values()) - 1.0) <= 1e-9 and answer.result.rounds > 0


def test_the_command_line_prints_the_label(served: tuple[LocalNodes, Path], monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from client.__main__ import main as client_main
    from client.generate import GenerationFailed, generate

    nodes, _ = served
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT + "\n"))
    assert client_main(["--config", str(nodes.config_path), "--token-file", str(nodes.token_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["label"] in LABELS and list(printed["probabilities"]) == list(LABELS)
    with local_client(nodes) as client:
        with pytest.raises(GenerationFailed, match="is a classifier, not a causal LM"):
            generate(client, "tiny-classifier", TEXT, 2)
        assert client.classify(TEXT).label == printed["label"]  # the nodes serve on


def test_the_client_refuses_parties_whose_labels_differ() -> None:
    from client.sdk import QueryFailed, _check_same_catalogue, pb2

    def info(labels: list[str]) -> object:
        return pb2.ModelInfo(catalogue=[pb2.ModelEntry(model="c", kind="classifier", graph_sha256="a" * 64,
                                                       labels=labels)])

    _check_same_catalogue([info(list(LABELS))] * 3)
    with pytest.raises(QueryFailed, match=r"party 1 reports another catalogue .*\['c'\].*labels"):
        _check_same_catalogue([info(list(LABELS)), info(list(reversed(LABELS))), info(list(LABELS))])
