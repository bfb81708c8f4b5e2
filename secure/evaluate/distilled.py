"""How well a distilled Power-Softmax model generalises: its sentence embeddings against the
original model's on texts that neither its training nor its calibration saw.

    python -m secure.evaluate.distilled DIR [--json out.json] [--check]

For every evaluation set of :func:`secure.distill.mixture.evaluation_sets` (``general``:
256 held-out WordNet texts; ``docstrings``: the docstring evaluation split; ``everyday``:
the 50 hand-written sentences), every text is tokenised and padded to its bucket
(:func:`secure.graph.buckets.bucket_for`) as the service pads a query, and three models
are compared with the original (all-MiniLM-L6-v2 unless ``--reference``):

* ``exact``: the distilled model with exact Power-Softmax (transformers, float32);
* ``secure``: the distilled model's graph rewritten with its ``secure_recipe.json``
  (Power-Softmax's bounded division, PUMA GeLU, LayerNorm's secure form) and run on
  floats (:func:`secure.runtime.execute.run_float`, float64): what the MPC and HE
  backends approximate, less their own rounding;

plus the largest Power-Softmax denominator over every row (padded ones included) against
the recipe's public ``upper``, and the NaN/inf count of the secure form. ``--check`` exits
with status 1 unless the ``general`` set meets :data:`TARGETS`.

Runs graphs (``secure.runtime``): the compiler (``secure.graph``) must not import this module.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from secure.distill import mixture
from secure.distill.attention import load_power_softmax_model
from secure.distill.calibrate import record_denominators
from secure.distill.report import RECIPE_FILE
from secure.distill.train import lengths_for
from secure.distill.wordnet import WordNetMissing
from secure.evaluate.fidelity import resolve_recipe
from secure.graph.buckets import bucket_for
from secure.graph.capture import capture
from secure.graph.ir import Graph
from secure.graph.passes import Recipe, rewrite
from secure.models import SentenceEncoder, load_minilm
from secure.runtime.execute import run_float

TARGETS: dict[str, float] = {"mean": 0.98, "min": 0.93}
"""What the secure form on floats must reach on the held-out general-English set (and no
NaN/inf)."""


@dataclass
class SetResult:
    """One evaluation set: cosine against the original per text, exact and secure form."""

    name: str
    texts: int = 0
    buckets: dict[int, int] = field(default_factory=dict)
    exact: list[float] = field(default_factory=list)
    secure: list[float] = field(default_factory=list)
    """Cosine of the secure form's embedding; NaN where the output was not finite."""
    non_finite: int = 0
    denominator_max: float = 0.0
    rows_above_upper: int = 0
    seconds: float = 0.0

    @staticmethod
    def _stats(values: Sequence[float]) -> dict[str, float | None]:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return {"mean": None, "min": None}
        return {"mean": sum(finite) / len(finite), "min": min(finite)}

    def summary(self, upper: float) -> dict:
        exact, secure = self._stats(self.exact), self._stats(self.secure)
        return {"set": self.name, "texts": self.texts, "buckets": {str(k): v for k, v in sorted(self.buckets.items())},
                "exact_mean": exact["mean"], "exact_min": exact["min"], "secure_mean": secure["mean"],
                "secure_min": secure["min"], "non_finite": self.non_finite,
                "denominator_max": self.denominator_max, "upper": upper,
                "max_over_upper": self.denominator_max / upper, "rows_above_upper": self.rows_above_upper,
                "seconds": round(self.seconds, 1)}


def padded(tokenizer: object, text: str, seq: int) -> dict[str, torch.Tensor]:
    """One text as the service sends it: truncated to ``seq`` tokens, padded to its bucket."""
    n = len(tokenizer(text, truncation=True, max_length=seq)["input_ids"])  # type: ignore[operator]
    length = bucket_for(n, lengths_for(seq))
    enc = tokenizer([text], padding="max_length", truncation=True, max_length=length,  # type: ignore[operator]
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class _Graphs:
    """The distilled model's rewritten graph, captured once per padded length."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe) -> None:
        self.model, self.recipe = model, recipe
        self.graphs: dict[int, tuple[Graph, dict[str, torch.Tensor]]] = {}

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seq = int(batch["input_ids"].shape[-1])
        if seq not in self.graphs:
            graph, weights = capture(self.model, batch)
            self.graphs[seq] = (rewrite(graph, self.recipe), weights)
        graph, weights = self.graphs[seq]
        (out,), _ = run_float(graph, weights, batch)
        return out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    if not bool(torch.isfinite(a).all()):
        return math.nan
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def evaluate_distilled(model_dir: str | os.PathLike[str], sets: dict[str, Sequence[str]],
                       reference: str | os.PathLike[str] | None = None, seq: int = 128,
                       progress: bool = True) -> tuple[list[SetResult], dict]:
    """Every set's :class:`SetResult` and the recipe (``secure_recipe.json``) of ``model_dir``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe_json = json.loads((Path(model_dir) / RECIPE_FILE).read_text())
    recipe = resolve_recipe("power", str(model_dir))
    p, eps, upper = recipe_json["p"], recipe_json["eps"], float(recipe_json["upper"])
    original = SentenceEncoder(load_minilm(None if reference is None else str(reference))[0]).eval()
    plain, tokenizer = load_minilm(str(model_dir))
    graphs = _Graphs(SentenceEncoder(plain), recipe)
    exact = load_power_softmax_model(model_dir)
    exact_encoder = SentenceEncoder(exact).eval()
    results = []
    for name, texts in sets.items():
        res = SetResult(name, texts=len(texts))
        t0 = time.perf_counter()
        with record_denominators(exact, p, eps, rows="all") as ranges:
            for text in tqdm(texts, desc=f"{name} ({len(texts)} texts)", disable=not progress):
                batch = padded(tokenizer, text, seq)
                length = int(batch["input_ids"].shape[-1])
                res.buckets[length] = res.buckets.get(length, 0) + 1
                with torch.no_grad():
                    ref = original(**batch)
                    res.exact.append(_cosine(exact_encoder(**batch), ref))
                out = graphs.run(batch)
                cos = _cosine(out, ref)
                res.non_finite += int(not math.isfinite(cos))
                res.secure.append(cos)
        res.denominator_max = max(r.denominator_max for r in ranges.values())
        res.rows_above_upper = sum(r.rows - r.rows_below(upper) for r in ranges.values())
        res.seconds = time.perf_counter() - t0
        results.append(res)
    return results, recipe_json


def format_table(results: Sequence[SetResult], upper: float) -> str:
    head = (f"{'set':<12}{'texts':>6}  {'exact mean':>10} {'min':>7}  {'secure mean':>11} {'min':>7}  "
            f"{'NaN/inf':>7}  {'max denom':>9} {'/upper':>7}  buckets")
    lines = [head, "-" * len(head)]

    def f(v: float | None, width: int) -> str:
        return f"{v:{width}.4f}" if v is not None else f"{'-':>{width}}"

    for r in results:
        s = r.summary(upper)
        buckets = " ".join(f"{k}:{v}" for k, v in s["buckets"].items())
        lines.append(f"{r.name:<12}{r.texts:>6}  {f(s['exact_mean'], 10)} {f(s['exact_min'], 7)}  "
                     f"{f(s['secure_mean'], 11)} {f(s['secure_min'], 7)}  {r.non_finite:>7}  "
                     f"{r.denominator_max:9.3g} {s['max_over_upper']:7.3f}  {buckets}")
    return "\n".join(lines)


def _per_text(r: SetResult) -> dict[str, list[float | None]]:
    return {"exact": [v if math.isfinite(v) else None for v in r.exact],
            "secure": [v if math.isfinite(v) else None for v in r.secure]}


def meets_targets(result: SetResult) -> bool:
    """No NaN/inf and the secure form's cosine at or above :data:`TARGETS`."""
    s = SetResult._stats(result.secure)
    return (result.non_finite == 0 and s["mean"] is not None and s["mean"] >= TARGETS["mean"]
            and s["min"] is not None and s["min"] >= TARGETS["min"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m secure.evaluate.distilled",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a folder written by `python -m secure.distill --out DIR`")
    ap.add_argument("--reference", default=None, help="the original model folder (default: bundled MiniLM)")
    ap.add_argument("--general", type=int, default=mixture.GENERAL_HELD_OUT,
                    help="held-out general-English texts (at least 200 for the check)")
    ap.add_argument("--docstrings", type=int, default=mixture.DOCSTRING_EVALUATION)
    ap.add_argument("--no-everyday", action="store_true", help="skip the 50 everyday sentences")
    ap.add_argument("--seq", type=int, default=128, help="longest padded length")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (default: DIR/evaluation.json)")
    ap.add_argument("--check", action="store_true", help=f"exit 1 unless the general set meets {TARGETS}, no NaN")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        sets: dict[str, Sequence[str]] = dict(mixture.evaluation_sets(args.general, args.docstrings))
    except WordNetMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_everyday:
        del sets["everyday"]
    sets = {k: v for k, v in sets.items() if v}
    t0 = time.perf_counter()
    results, recipe = evaluate_distilled(args.model, sets, args.reference, args.seq, progress=not args.quiet)
    upper = float(recipe["upper"])
    print(f"model {args.model}: p={recipe['p']}, eps {recipe['eps']:g}, upper {upper:g}, iterations "
          f"{recipe['iterations']}, lower {recipe.get('lower', float('nan')):.3g}; reference "
          f"{args.reference or 'all-MiniLM-L6-v2'}; cosine of sentence embeddings, texts padded to their buckets; "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_table(results, upper))
    general = next((r for r in results if r.name == "general"), None)
    ok = general is not None and meets_targets(general)
    if general is not None:
        print(f"general English: secure form {'meets' if ok else 'does NOT meet'} the targets "
              f"(mean >= {TARGETS['mean']}, min >= {TARGETS['min']}, no NaN/inf)")
    out = args.json or Path(args.model) / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(args.model), "reference": args.reference or "all-MiniLM-L6-v2",
                               "recipe": {k: recipe[k] for k in ("p", "eps", "upper", "iterations", "lower",
                                                                  "normalize") if k in recipe},
                               "targets": TARGETS, "general_meets_targets": ok,
                               "sets": [r.summary(upper) | {"per_text": _per_text(r)} for r in results]},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
