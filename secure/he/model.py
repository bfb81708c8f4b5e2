"""A model compiled for HE queries: the rewritten, calibrated graph with the client's
embedding lookup split off, and what the client needs to do that lookup."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from secure.graph.capture import capture
from secure.graph.he_passes import calibrate_for_he, check_he_supported, client_embedding_input
from secure.graph.ir import Graph
from secure.graph.passes import Recipe, power_recipe, rewrite
from secure.models import SentenceEncoder, load_minilm, tiny_bert

TINY_RECIPE: Recipe = power_recipe(4, 1e-6, 50.0, 8, normalize=True)
"""Power-Softmax for the random-weight test model (its denominators stay far below 50)."""


@dataclass
class HeModel:
    """Graph and plaintext weights (the server's), the embedding table (disclosed to
    clients in HE mode, DESIGN.md sec. 1) and the input names."""

    name: str
    graph: Graph
    weights: dict[str, torch.Tensor]
    table: torch.Tensor
    ids_input: str
    embeds_input: str
    seq_len: int

    @property
    def embeds_shape(self) -> list[int]:
        """Shape of the client's embedded rows, (1, seq_len, hidden)."""
        return next(i.spec.shape for i in self.graph.inputs if i.name == self.embeds_input)

    def client_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The client's side of the lookup: rows of the table for its ids (plus the public mask)."""
        if tuple(input_ids.shape) != (1, self.seq_len):
            raise ValueError(f"model {self.name} was compiled for ids of shape (1, {self.seq_len}), "
                             f"got {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.table.shape[0]:
            raise ValueError(f"token ids must lie in [0, {self.table.shape[0]})")
        return {self.embeds_input: self.table[input_ids.long()].to(torch.float64),
                "attention_mask": attention_mask}


def compile_he(name: str, model: torch.nn.Module, recipe: Recipe,
               samples: Sequence[dict[str, torch.Tensor]]) -> HeModel:
    """Capture on the first sample's shapes, rewrite with ``recipe``, calibrate GeLU and
    LayerNorm ranges on ``samples``, and split off the client's embedding lookup."""
    graph, weights = capture(model, samples[0])
    g = calibrate_for_he(rewrite(graph, recipe), weights, samples)
    g, lookup = client_embedding_input(g)
    check_he_supported(g)
    used = {k: v for k, v in weights.items() if k in g.weights}
    seq = samples[0]["input_ids"].shape[-1]
    return HeModel(name, g, used, weights[lookup.table], lookup.ids_input, lookup.embeds_input, seq)


def tiny_he_model(seq: int = 16, hidden: int = 128, layers: int = 2, heads: int = 2,
                  vocab: int = 200) -> HeModel:
    """The 2-layer, hidden-128 BERT with random weights (seeded), Power-Softmax."""
    model = SentenceEncoder(tiny_bert(vocab_size=vocab, layers=layers, hidden=hidden, heads=heads))
    gen = torch.Generator().manual_seed(7)
    mask = torch.ones(1, seq, dtype=torch.long)
    samples = [{"input_ids": torch.randint(1, vocab, (1, seq), generator=gen), "attention_mask": mask}
               for _ in range(8)]
    return compile_he(f"tiny-bert-h{hidden}", model, TINY_RECIPE, samples)


def distilled_he_model(path: str | Path, seq: int = 16, calibration: int = 16) -> HeModel:
    """A Power-Softmax MiniLM distilled by ``python -m secure.graph.distill --out DIR``."""
    from secure.graph.corpus import evaluation_sentences
    from secure.graph.fidelity import resolve_recipe

    encoder, tokenizer = load_minilm(path)
    samples = []
    for text in evaluation_sentences(calibration):
        enc = tokenizer([text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        samples.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return compile_he(str(path), SentenceEncoder(encoder), resolve_recipe("power", str(path)), samples)
