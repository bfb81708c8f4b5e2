"""Do the three parties and CKKS compute what the secure forms compute on floats?

    python -m secure.evaluate.agreement [MODEL] [--mpc 30] [--he 5] [--json out.json]

``MODEL`` is a distilled Power-Softmax folder or ``minilm-power`` (the default: distilled on
first use and cached, :mod:`secure.distill.cache`). Texts are the held-out general-English
split (:func:`secure.distill.mixture.evaluation_sets`), each padded to its bucket as the
service pads a query.

* ``--mpc N``: the first N texts, the model's rewritten graph (``secure_recipe.json``) on
  the in-process three-party engine (:class:`secure.mpc.engine.LocalCluster`, the same
  protocols the party nodes run over gRPC) against the same graph on floats
  (:func:`secure.runtime.execute.run_float`, float64).
* ``--he N``: the first N texts that fit 16 tokens, the HE-compiled graph
  (:func:`secure.evaluate.he_model.distilled_he_model`: polynomial GeLU, bounded LayerNorm)
  under CKKS (:func:`secure.runtime.execute_he.run_he`, client and server in process) against
  that graph on floats. Before that, every held-out text that fits 16 tokens runs on floats
  to count those whose GeLU inputs or LayerNorm variances leave the calibrated ranges
  (:func:`secure.evaluate.he_ranges.range_misses`): CKKS cannot check them, so this is the
  measured coverage of the calibration.

Per text: cosine of the two sentence embeddings, max abs difference, seconds. ``--check``
exits 1 unless every cosine is at least :data:`AGREEMENT`. Runs graphs, so the compiler
(``secure.graph``) must not import this module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from secure.distill import mixture
from secure.distill.cache import resolve_model
from secure.evaluate.distilled import padded
from secure.evaluate.fidelity import resolve_recipe
from secure.evaluate.he_model import HeModel, distilled_he_model
from secure.evaluate.he_ranges import range_misses
from secure.graph.capture import capture
from secure.graph.ir import Graph
from secure.graph.passes import rewrite
from secure.he.plain_cache import PlainCache
from secure.models import SentenceEncoder, load_minilm
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_float, run_mpc
from secure.runtime.execute_he import run_he

AGREEMENT: float = 0.999
"""The cosine every text's secure embedding must reach against the float forms."""

HE_SEQ: int = 16
"""The length the HE comparison compiles for (the README's HE node serves 16 tokens)."""


@dataclass
class Agreement:
    """One text on one backend against the float forms."""

    backend: str
    text: str
    tokens: int
    cosine: float
    max_abs_error: float
    seconds: float


def _compare(backend: str, text: str, tokens: int, ref: torch.Tensor, got: torch.Tensor, seconds: float
             ) -> Agreement:
    ref, got = ref.to(torch.float64).flatten(), got.to(torch.float64).flatten()
    cos = float(torch.nn.functional.cosine_similarity(ref, got, dim=0)) if bool(torch.isfinite(got).all()) \
        else float("nan")
    return Agreement(backend, text, tokens, cos, float((ref - got).abs().max()), seconds)


class _MpcGraphs:
    """The rewritten graph per padded length, its weights dealt once on one cluster."""

    def __init__(self, model_dir: str) -> None:
        encoder, self.tokenizer = load_minilm(model_dir)
        self.model = SentenceEncoder(encoder).eval()
        self.recipe = resolve_recipe("power", model_dir)
        self.cluster = LocalCluster()
        self.graphs: dict[int, tuple[Graph, dict[str, torch.Tensor], list]] = {}

    def compare(self, text: str, seq: int) -> Agreement:
        batch = padded(self.tokenizer, text, seq)
        length = int(batch["input_ids"].shape[-1])
        if length not in self.graphs:
            graph, weights = capture(self.model, batch)
            graph = rewrite(graph, self.recipe)
            self.graphs[length] = (graph, weights, deal_weights(weights, self.cluster.fp))
        graph, weights, shares = self.graphs[length]
        (ref,), _ = run_float(graph, weights, batch)
        t0 = time.perf_counter()
        (got,), _ = run_mpc(self.cluster, graph, shares, deal_inputs(graph, batch, self.cluster.fp))
        return _compare("mpc", text, int(batch["attention_mask"].sum()), ref, got, time.perf_counter() - t0)


def mpc_agreement(model_dir: str, texts: Sequence[str], seq: int = 128, progress: bool = True) -> list[Agreement]:
    """Every text on three parties (in process) against the float forms of the same graph."""
    graphs = _MpcGraphs(model_dir)
    return [graphs.compare(t, seq) for t in tqdm(texts, desc="three parties", disable=not progress)]


def he_agreement(model: HeModel, texts: Sequence[str], progress: bool = True,
                 plain_cache: PlainCache | None = None) -> list[Agreement]:
    """Every text under CKKS (client and server in process) against the float forms of the
    HE-compiled graph; texts longer than the model's length are refused (ValueError).
    ``plain_cache``: the server's encoded weights, shared by the queries as a node shares them."""
    _, tokenizer = load_minilm(model.name)
    out = []
    for text in tqdm(texts, desc="CKKS", disable=not progress):
        enc = tokenizer([text], truncation=False, return_tensors="pt")
        if enc["input_ids"].shape[-1] > model.seq_len:
            raise ValueError(f"{text[:40]!r}... has {enc['input_ids'].shape[-1]} tokens, the HE model "
                             f"{model.seq_len}")
        enc = tokenizer([text], padding="max_length", max_length=model.seq_len, return_tensors="pt")
        inputs = model.client_inputs(enc["input_ids"], enc["attention_mask"])
        (ref,), _ = run_float(model.graph, model.weights, inputs)
        t0 = time.perf_counter()
        run = run_he(model.graph, model.weights, inputs, plain_cache=plain_cache)
        out.append(_compare("he", text, int(enc["attention_mask"].sum()), ref, run.outputs[0],
                            time.perf_counter() - t0))
    return out


def he_coverage(model: HeModel, texts: Sequence[str]) -> dict:
    """How many ``texts`` (padded to the model's length) keep every calibrated range, and how
    often each node's range is left."""
    _, tokenizer = load_minilm(model.name)
    samples = []
    for text in texts:
        enc = tokenizer([text], padding="max_length", max_length=model.seq_len, return_tensors="pt")
        samples.append(model.client_inputs(enc["input_ids"], enc["attention_mask"]))
    misses = range_misses(model.graph, model.weights, samples)
    per_node: dict[str, int] = {}
    for nodes in misses:
        for node in nodes:
            per_node[node] = per_node.get(node, 0) + 1
    return {"texts": len(texts), "within_ranges": sum(not m for m in misses), "misses_per_node": per_node}


def fitting(texts: Sequence[str], tokens: int, count: int, tokenizer: Callable) -> list[str]:
    """The first ``count`` texts of at most ``tokens`` tokens (special tokens included)."""
    return [t for t in texts if len(tokenizer(t)["input_ids"]) <= tokens][:count]


def summary(rows: Sequence[Agreement]) -> dict:
    """Count, min and mean cosine, worst max abs error, and whether every row meets AGREEMENT."""
    if not rows:
        return {"texts": 0}
    cos = [r.cosine for r in rows]
    return {"texts": len(rows), "cosine_min": min(cos), "cosine_mean": sum(cos) / len(cos),
            "max_abs_error": max(r.max_abs_error for r in rows),
            "seconds_mean": sum(r.seconds for r in rows) / len(rows),
            "all_agree": all(c >= AGREEMENT for c in cos)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m secure.evaluate.agreement", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="minilm-power", help="a distilled folder or minilm-power")
    ap.add_argument("--mpc", type=int, default=30, help="texts on three parties (0: none)")
    ap.add_argument("--he", type=int, default=5, help="texts under CKKS, at most 16 tokens each (0: none)")
    ap.add_argument("--seq", type=int, default=128, help="longest padded length on three parties")
    ap.add_argument("--cache-mib", type=int, default=4096, help="HE server's plaintext cache budget (0: none)")
    ap.add_argument("--json", type=Path, default=None, help="write per-text figures here")
    ap.add_argument("--check", action="store_true", help=f"exit 1 unless every cosine >= {AGREEMENT}")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    model_dir = str(resolve_model(args.model))
    texts = mixture.evaluation_sets(max(args.mpc, mixture.GENERAL_HELD_OUT if args.he else 0), 0)["general"]
    rows: list[Agreement] = []
    coverage = None
    if args.mpc:
        rows += mpc_agreement(model_dir, texts[:args.mpc], args.seq, not args.quiet)
    if args.he:
        he_model = distilled_he_model(model_dir, HE_SEQ)
        _, tokenizer = load_minilm(model_dir)
        short = fitting(texts, HE_SEQ, len(texts), tokenizer)
        coverage = he_coverage(he_model, short)
        print(f"HE calibration: {coverage['within_ranges']} of {coverage['texts']} held-out texts of at most "
              f"{HE_SEQ} tokens keep every calibrated range; misses per node: {coverage['misses_per_node']}")
        rows += he_agreement(he_model, short[:args.he], not args.quiet, PlainCache(args.cache_mib << 20))
    report = {b: summary([r for r in rows if r.backend == b]) for b in ("mpc", "he")}
    for backend, s in report.items():
        if s["texts"]:
            print(f"{backend}: {s['texts']} texts, cosine vs float forms min {s['cosine_min']:.6f} mean "
                  f"{s['cosine_mean']:.6f}, max abs error {s['max_abs_error']:.2e}, {s['seconds_mean']:.1f} s per "
                  f"text; every text >= {AGREEMENT}: {s['all_agree']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": model_dir, "threshold": AGREEMENT, "summary": report,
                                         "he_range_coverage": coverage,
                                         "texts": [asdict(r) for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    ok = all(s.get("all_agree", True) for s in report.values())
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
