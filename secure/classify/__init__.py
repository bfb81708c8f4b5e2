"""A real classifier to serve: ``minilm-topics``, all-MiniLM-L6-v2 plus a linear head.

The served model is one module (:class:`TopicClassifier`): the shipped all-MiniLM-L6-v2
encoder (:func:`secure.models.load_minilm`), sentence-transformers' mean pooling over the
attention mask (:class:`secure.models.SentenceEncoder`) and a linear head ``384 -> 6``
trained on those pooled embeddings for the WordNet topic task
(:mod:`secure.classify.topics`: animal, plant, food, person, artifact, location). It is
captured and rewritten like the MiniLM encoder and returns the six logits; the client
applies softmax or argmax itself.

The head's weights ship in ``minilm_topics/head.safetensors`` (float32, 9 KB, the label
names in its metadata), with ``minilm_topics/training.json`` (the command, settings, split
sizes, accuracy and versions); made by ``python -m secure.classify.train --out
secure/classify/minilm_topics`` (:mod:`secure.classify.train`).

Deal it by name: ``python -m party.deal --model minilm-topics`` (kind ``classifier``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from secure.models import SentenceEncoder

MINILM_TOPICS: str = "minilm-topics"
"""The shipped classifier's name (``--model`` of ``party.deal``)."""
HEAD_FILE: str = "head.safetensors"
LABELS_KEY: str = "labels"
"""The head file's metadata key holding the label names, comma-separated, in logit order."""


def shipped_head_path() -> Path:
    """The committed head of ``minilm-topics``."""
    return Path(__file__).with_name("minilm_topics") / HEAD_FILE


class TopicClassifier(SentenceEncoder):
    """Encoder + mean pooling (as :class:`SentenceEncoder`) + a linear head: the logits."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, labels: tuple[str, ...]) -> None:
        super().__init__(encoder)
        if head.out_features != len(labels):
            raise ValueError(f"the head has {head.out_features} outputs for {len(labels)} labels")
        self.head = head
        self.labels = tuple(labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(input_ids, attention_mask))


def save_head(head: nn.Linear, labels: tuple[str, ...], path: Path) -> None:
    """The head's weight and bias (float32) with the label names in the metadata."""
    from safetensors.torch import save_file

    if any("," in label for label in labels):
        raise ValueError("label names may not contain a comma")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().float().contiguous(), "bias": head.bias.detach().float().contiguous()},
              str(path), metadata={LABELS_KEY: ",".join(labels)})


def load_head(path: Path | None = None) -> tuple[nn.Linear, tuple[str, ...]]:
    """(head, label names) from a head file (default: the shipped one)."""
    from safetensors import safe_open

    path = path or shipped_head_path()
    if not path.is_file():
        raise FileNotFoundError(f"no classifier head at {path} (made by `python -m secure.classify.train --out "
                                f"{path.parent}`)")
    with safe_open(str(path), framework="pt") as f:
        labels = tuple((f.metadata() or {}).get(LABELS_KEY, "").split(","))
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    if len(labels) != weight.shape[0] or not all(labels):
        raise ValueError(f"{path}: its metadata names {len(labels)} labels for {weight.shape[0]} outputs")
    return head.eval(), labels


def load_topic_classifier(head_path: Path | None = None) -> tuple[TopicClassifier, object]:
    """(``minilm-topics`` in eval mode, MiniLM's tokenizer), offline."""
    from secure.models import load_minilm

    encoder, tokenizer = load_minilm()
    head, labels = load_head(head_path)
    return TopicClassifier(encoder, head, labels).eval(), tokenizer


__all__ = ["HEAD_FILE", "LABELS_KEY", "MINILM_TOPICS", "TopicClassifier", "load_head", "load_topic_classifier",
           "save_head", "shipped_head_path"]
