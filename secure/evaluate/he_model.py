"""A model compiled for HE queries: the rewritten, calibrated graph with the client's
embedding lookup split off, what the client needs to do that lookup, and the bound B of
every node's refreshes (:func:`refresh_bounds`, in ``graph.meta``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secure.approx.float_backend import FloatOps
from secure.evaluate.he_ranges import calibrate_for_he
from secure.graph.capture import capture
from secure.graph.he_passes import check_he_supported, client_embedding_input
from secure.graph.ir import Graph, Node
from secure.graph.passes import Recipe, power_recipe, rewrite
from secure.he.refresh import OUTPUTS, REFRESH_BOUND, REFRESH_BOUNDS_META
from secure.models import SentenceEncoder, load_minilm, tiny_bert
from secure.runtime.interpreter import Interpreter, client_input

TINY_RECIPE: Recipe = power_recipe(4, 1.0, 50.0, 8, normalize=True)
"""Power-Softmax for the random-weight test model. Its scores are tiny (mean x^4 ~ 1e-6), so
eps = 1 (at or above the division's lower end 0.67 for upper 50, 8 iterations) keeps every
denominator in the accuracy range by construction: CKKS cannot check it at run time. (With
eps = 1e-6 every row fell below that end and the attention weights came out ~0, silently.)"""

REFRESH_MARGIN: float = 4.0
"""A node's refresh bound B is this much above the largest |value| seen in calibration
(then rounded up to a power of two; LayerNorm's variance range has a margin of 3)."""


class _LargestValue:
    """FloatOps that records, per graph node, the largest |x| of any tensor an operation
    takes or returns: every value a refresh inside that node can send (its inputs and
    the forms' intermediate values, the same code path under CKKS)."""

    def __init__(self) -> None:
        self.ops = FloatOps()
        self.node = OUTPUTS
        self.largest: dict[str, float] = {}

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.ops, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.largest[self.node] = max(self.largest.get(self.node, 0.0), _largest(args), _largest(out))
            return out
        return recorded

    @contextlib.contextmanager
    def trace(self, node: Node) -> Iterator[None]:
        self.node = node.name
        yield


def _largest(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.abs().max()) if v.is_floating_point() and v.numel() else 0.0
    if isinstance(v, (list, tuple)):
        return max((_largest(u) for u in v), default=0.0)
    return 0.0


def refresh_bounds(graph: Graph, weights: dict[str, torch.Tensor],
                   samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """B per secret node: the least power of two >= :data:`REFRESH_MARGIN` times the largest
    |value| that the node's operations took or produced on ``samples`` (FloatOps), at least
    :data:`REFRESH_BOUND`; ``OUTPUTS`` gets the largest B of the output nodes.

    Measured on the tiny model (hidden 128, seq 16, 8 samples): 2^13 for the embeddings'
    LayerNorm (1/var, hence Newton's y^2, reaches 1.3e3: var down to 2.5e-4), 2^10 for the
    other LayerNorms (row sums of d^2, about 130), 2^8 for the pooled sum, 2^7 elsewhere.
    With B = 2^7 for every node the client refused the tiny model's query at the first, in each
    of 4 runs."""
    rec = _LargestValue()
    values = {k: v.to(torch.float64) for k, v in weights.items()}
    for sample in samples:
        prepared = {i.name: client_input(graph, i.name, sample[i.name]) if i.kind == "client" else sample[i.name]
                    for i in graph.inputs}
        Interpreter(graph, rec, rec.trace).run(values, prepared)
    bounds = {name: max(REFRESH_BOUND, 2.0 ** math.ceil(math.log2(REFRESH_MARGIN * v)) if v > 0 else 0.0)
              for name, v in rec.largest.items()}
    bounds[OUTPUTS] = max((bounds.get(o, REFRESH_BOUND) for o in graph.outputs), default=REFRESH_BOUND)
    return bounds


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
    LayerNorm ranges on ``samples``, split off the client's embedding lookup, and calibrate
    the refresh bounds on ``samples`` (:func:`refresh_bounds`)."""
    graph, weights = capture(model, samples[0])
    g = calibrate_for_he(rewrite(graph, recipe), weights, samples)
    g, lookup = client_embedding_input(g)
    check_he_supported(g)
    used = {k: v for k, v in weights.items() if k in g.weights}
    seq = samples[0]["input_ids"].shape[-1]
    m = HeModel(name, g, used, weights[lookup.table], lookup.ids_input, lookup.embeds_input, seq)
    lookups = [m.client_inputs(s["input_ids"], s["attention_mask"]) for s in samples]
    g.meta = {**g.meta, REFRESH_BOUNDS_META: refresh_bounds(g, used, lookups)}
    return m


def tiny_he_model(seq: int = 16, hidden: int = 128, layers: int = 2, heads: int = 2,
                  vocab: int = 200) -> HeModel:
    """The 2-layer, hidden-128 BERT with random weights (seeded), Power-Softmax."""
    model = SentenceEncoder(tiny_bert(vocab_size=vocab, layers=layers, hidden=hidden, heads=heads))
    gen = torch.Generator().manual_seed(7)
    mask = torch.ones(1, seq, dtype=torch.long)
    samples = [{"input_ids": torch.randint(1, vocab, (1, seq), generator=gen), "attention_mask": mask}
               for _ in range(8)]
    return compile_he(f"tiny-bert-h{hidden}", model, TINY_RECIPE, samples)


HE_CALIBRATION: int = 64
"""Texts the distilled model's HE ranges are calibrated on."""


def distilled_he_model(path: str | Path, seq: int = 16, calibration: int = HE_CALIBRATION) -> HeModel:
    """A Power-Softmax MiniLM distilled by ``python -m secure.distill --out DIR``, or
    ``"minilm-power"``: distilled on first use and cached (:mod:`secure.distill.cache`).
    GeLU, LayerNorm and refresh ranges are calibrated on ``calibration`` texts of the
    distillation's training pools (general English and docstrings,
    :func:`secure.distill.mixture.calibration_texts`), never on an evaluation text."""
    from secure.distill.cache import resolve_model
    from secure.distill.mixture import calibration_texts
    from secure.evaluate.fidelity import resolve_recipe

    path = resolve_model(path)
    encoder, tokenizer = load_minilm(path)
    samples = []
    for text in calibration_texts(calibration):
        enc = tokenizer([text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        samples.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return compile_he(str(path), SentenceEncoder(encoder), resolve_recipe("power", str(path)), samples)
