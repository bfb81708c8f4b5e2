"""Fidelity report: how far a rewritten model is from the original, layer by layer.

For a model and a recipe, each backend (plaintext floats with the secure forms, the
fixed-point simulation, the in-process three-party engine) runs the rewritten graph on a
set of inputs; the unrewritten graph in plain float64 torch is the reference. Reported:
per-layer max and mean absolute error of each block's output, and output agreement:
cosine of sentence embeddings for encoders, top-1 next-token agreement and the
perplexity delta for causal LMs.

    python -m secure.evaluate.fidelity --model minilm --recipe ours --backends float,mpc --n 50

Runs graphs (``secure.runtime``, ``secure.mpc``): the compiler (``secure.graph``) must not
import this module.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from secure.distill.corpus import evaluation_sentences
from secure.graph.buckets import bucket_for, buckets_up_to
from secure.graph.capture import capture
from secure.graph.ir import Graph
from secure.graph.passes import RECIPES, Recipe, power_recipe, rewrite
from secure.models import CausalLM, SentenceEncoder, load_minilm, tiny_gpt2
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import (
    deal_inputs,
    deal_weights,
    run_fixed,
    run_float,
    run_mpc,
    run_reference,
)

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)(?:\.|$)")


def layer_outputs(graph: Graph) -> list[tuple[str, str]]:
    """(label, node name) of the last secret node of every numbered block, in order."""
    last: dict[int, str] = {}
    for n in graph.nodes:
        m = _LAYER.search(n.origin)
        if n.secret and m:
            last[int(m.group(1))] = n.name
    return [(f"layer {i}", last[i]) for i in sorted(last)]


@dataclass
class LayerError:
    label: str
    node: str
    max_abs: float = 0.0
    mean_abs: float = 0.0
    max_ref: float = 0.0


@dataclass
class BackendReport:
    """Fidelity of one backend over all inputs."""

    backend: str
    inputs: int = 0
    seconds: float = 0.0
    layers: list[LayerError] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    top1_agreement: float | None = None
    perplexity: float | None = None
    reference_perplexity: float | None = None

    def summary(self) -> dict:
        out = {"backend": self.backend, "inputs": self.inputs, "seconds": round(self.seconds, 2)}
        if self.cosine:
            out |= {"cosine_mean": sum(self.cosine) / len(self.cosine), "cosine_min": min(self.cosine)}
        if self.top1_agreement is not None:
            out |= {"top1_agreement": self.top1_agreement, "perplexity": self.perplexity,
                    "reference_perplexity": self.reference_perplexity}
        return out


Batch = dict[str, torch.Tensor]


def _nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    logp = torch.log_softmax(logits[0, :-1].double(), -1)
    target = ids[0, 1:]
    keep = mask[0, 1:].bool() & mask[0, :-1].bool()
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[keep]
    return float(nll.sum()), int(keep.sum())


class _Backends:
    """Runs a rewritten graph (one per padded length) on each requested backend."""

    def __init__(self, names: Sequence[str], weights: dict[str, torch.Tensor]) -> None:
        unknown = set(names) - {"float", "fixed", "mpc"}
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}; choose from float, fixed, mpc")
        self.names = list(names)
        self.weights = weights
        if "mpc" in names:
            self.cluster = LocalCluster(profile=False)
            self.shares = deal_weights(weights, self.cluster.fp)

    def run(self, name: str, graph: Graph, batch: Batch, observe: list[str]
            ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        if name == "float":
            return run_float(graph, self.weights, batch, observe)
        if name == "fixed":
            return run_fixed(graph, self.weights, batch, observe)
        return run_mpc(self.cluster, graph, self.shares, deal_inputs(graph, batch, self.cluster.fp), observe)


def evaluate(model: torch.nn.Module, recipe: Recipe, batches: Sequence[Batch], backends: Sequence[str],
             causal: bool, progress: bool = True, reference_model: torch.nn.Module | None = None
             ) -> list[BackendReport]:
    """Run every backend on every input and compare with the exact reference.

    Inputs may have different padded lengths: the model is captured once per length. The
    reference is the model itself with exact functions, or ``reference_model`` (the
    original model a distilled one must match), whose layers are matched by position.
    """
    graphs: dict[int, tuple[Graph, Graph, list[tuple[str, str]]]] = {}
    references: dict[int, tuple[Graph, dict[str, torch.Tensor], list[tuple[str, str]]]] = {}
    weights: dict[str, torch.Tensor] | None = None
    runner: _Backends | None = None
    reports: dict[str, BackendReport] = {}
    counts = {name: [0.0, 0, 0, 0] for name in backends}  # nll, tokens, top-1 agreeing, positions
    ref_nll = [0.0, 0]
    for batch in tqdm(batches, desc=f"fidelity ({', '.join(backends)})", disable=not progress):
        seq = int(batch["input_ids"].shape[-1])
        if seq not in graphs:
            graph, w = capture(model, batch)
            weights = weights or w
            graphs[seq] = (graph, rewrite(graph, recipe, weights=w), layer_outputs(graph))
        graph, secure_graph, layers = graphs[seq]
        if reference_model is not None and seq not in references:
            ref_graph, ref_weights = capture(reference_model, batch)
            references[seq] = (ref_graph, ref_weights, layer_outputs(ref_graph))
        if runner is None:
            assert weights is not None
            runner = _Backends(backends, weights)
            reports = {name: BackendReport(name, layers=[LayerError(lbl, node) for lbl, node in layers])
                       for name in backends}
        observe = [node for _, node in layers]
        if reference_model is not None:
            ref_graph, ref_weights, ref_layers = references[seq]
            ref_observe = [node for _, node in ref_layers]
            (ref_out,), ref_by_node = run_reference(ref_graph, ref_weights, batch, ref_observe)
            ref_seen = {mine: ref_by_node[theirs] for mine, theirs in zip(observe, ref_observe)}
        else:
            (ref_out,), ref_seen = run_reference(graph, runner.weights, batch, observe)
        mask = batch["attention_mask"][0].bool()
        if causal:
            nll, n = _nll(ref_out, batch["input_ids"], batch["attention_mask"])
            ref_nll[0] += nll
            ref_nll[1] += n
        for name in backends:
            t0 = time.perf_counter()
            (out,), seen = runner.run(name, secure_graph, batch, observe)
            rep = reports[name]
            rep.seconds += time.perf_counter() - t0
            rep.inputs += 1
            for err, (_, node) in zip(rep.layers, layers):
                diff = (seen[node] - ref_seen[node]).abs()
                if diff.dim() >= 2 and diff.shape[-2] == mask.numel():
                    diff = diff[..., mask, :]  # padded positions carry no meaning
                err.max_abs = max(err.max_abs, float(diff.max()))
                err.mean_abs += float(diff.mean()) / len(batches)
                err.max_ref = max(err.max_ref, float(ref_seen[node].abs().max()))
            if causal:
                nll, n = _nll(out, batch["input_ids"], batch["attention_mask"])
                agree = int((out[0].argmax(-1) == ref_out[0].argmax(-1))[mask].sum())
                for k, v in enumerate((nll, n, agree, int(mask.sum()))):
                    counts[name][k] += v
            else:
                rep.cosine.append(float(torch.nn.functional.cosine_similarity(out, ref_out, dim=-1).min()))
    for name, rep in reports.items():
        if causal:
            nll, n, agree, positions = counts[name]
            rep.top1_agreement = agree / max(positions, 1)
            rep.perplexity = float(torch.tensor(nll / max(n, 1)).exp())
            rep.reference_perplexity = float(torch.tensor(ref_nll[0] / max(ref_nll[1], 1)).exp())
    return list(reports.values())


def format_report(reports: Sequence[BackendReport]) -> str:
    lines = []
    for rep in reports:
        lines.append(f"[{rep.backend}] {json.dumps(rep.summary())}")
        lines.append(f"  {'layer':<10}{'max abs err':>14}{'mean abs err':>14}{'max |ref|':>12}")
        for e in rep.layers:
            lines.append(f"  {e.label:<10}{e.max_abs:14.3e}{e.mean_abs:14.3e}{e.max_ref:12.2f}")
    return "\n".join(lines)


def _load(model_name: str, max_length: int, n: int) -> tuple[torch.nn.Module, list[Batch], bool, str]:
    """(wrapped model, tokenised inputs padded to their bucket, causal?, label)."""
    if model_name == "tiny-gpt2":
        lm = CausalLM(tiny_gpt2())
        gen = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(n):
            length = int(torch.randint(4, max_length + 1, (1,), generator=gen))
            seq = bucket_for(length, buckets_up_to(max_length))
            ids = torch.randint(0, 256, (1, seq), generator=gen)
            mask = (torch.arange(seq) < length).long().unsqueeze(0)
            batches.append({"input_ids": ids, "attention_mask": mask})
        return lm, batches, True, "tiny GPT-2 (random weights)"
    path = None if model_name == "minilm" else model_name
    encoder, tokenizer = load_minilm(path)
    batches = []
    for text in evaluation_sentences(n):
        tokens = len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        seq = bucket_for(tokens, buckets_up_to(max_length))
        enc = tokenizer([text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return SentenceEncoder(encoder), batches, False, model_name


def resolve_recipe(name: str, model_name: str) -> Recipe:
    """A named recipe, or "power" read from a distilled model's secure_recipe.json."""
    if name in RECIPES:
        return RECIPES[name]
    if name == "power":
        meta = Path(model_name) / "secure_recipe.json"
        if not meta.exists():
            raise FileNotFoundError(f"recipe 'power' needs a distilled model folder with {meta.name}; "
                                    f"run `python -m secure.distill --out DIR` first")
        d = json.loads(meta.read_text())
        return power_recipe(d["p"], d["eps"], d["upper"], d["iterations"], d.get("normalize", False))
    raise ValueError(f"unknown recipe {name!r}; choose from {sorted(RECIPES)} or 'power'")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="minilm", help="minilm, tiny-gpt2, or a model folder")
    ap.add_argument("--recipe", default="ours", help="puma, ours, or power (distilled model folder)")
    ap.add_argument("--backends", default="float,mpc", help="comma list of float, fixed, mpc")
    ap.add_argument("--n", type=int, default=50, help="number of inputs")
    ap.add_argument("--seq", type=int, default=128,
                    help="longest padded length; inputs are padded to 16, 32, 64 or 128")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)
    model, batches, causal, label = _load(args.model, args.seq, args.n)
    recipe = resolve_recipe(args.recipe, args.model)
    reference = None
    if recipe.softmax.kind == "power" and args.model not in ("minilm", "tiny-gpt2"):
        reference = SentenceEncoder(load_minilm()[0])  # a distilled model must match the original
        print("reference: the original all-MiniLM-L6-v2")
    t0 = time.perf_counter()
    reports = evaluate(model, recipe, batches, args.backends.split(","), causal, reference_model=reference)
    lengths = sorted({int(b["input_ids"].shape[-1]) for b in batches})
    print(f"model {label}, recipe {recipe.name}, {len(batches)} inputs, padded lengths {lengths}, "
          f"{time.perf_counter() - t0:.1f} s")
    print(format_report(reports))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": label, "recipe": recipe.to_dict(), "seq": args.seq,
                                         "reports": [asdict(r) | r.summary() for r in reports]}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
