"""HE range calibration: run a rewritten graph on sample inputs and measure the ranges
that :func:`secure.graph.he_passes.apply_he_ranges` turns into polynomial GeLU and
bounded LayerNorm.

The compiler (``secure.graph``) takes the ranges as data and never runs a graph; this
module runs it (``secure.runtime``, the secure forms on plaintext floats).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from secure.graph.he_passes import HeRanges, apply_he_ranges, he_range_sites
from secure.graph.ir import Graph, Node
from secure.runtime.execute import run_float


def measure_he_ranges(graph: Graph, weights: dict[str, torch.Tensor],
                      samples: Sequence[dict[str, torch.Tensor]]) -> HeRanges:
    """Run ``graph`` on FloatOps over ``samples`` and record, per node of
    :func:`he_range_sites`, the largest |x| entering each ``secure.gelu`` and the range of
    ``var(x) + eps`` (over the last dimension, ``eps`` the node's) entering each
    ``secure.layer_norm``."""
    if not samples:
        raise ValueError("calibration needs at least one sample input")
    watch = he_range_sites(graph)
    gelu_max: dict[str, float] = {}
    var_lo: dict[str, float] = {}
    var_hi: dict[str, float] = {}
    eps = {n.name: n.kwargs.get("eps", 0.0) for n in graph.nodes if n.op == "secure.layer_norm"}
    for sample in samples:
        _, seen = run_float(graph, weights, sample, observe=set(watch.values()))
        for node, source in watch.items():
            x = seen[source]
            if node in eps:
                var = x.var(dim=-1, unbiased=False) + eps[node]
                var_lo[node] = min(var_lo.get(node, math.inf), float(var.min()))
                var_hi[node] = max(var_hi.get(node, 0.0), float(var.max()))
            else:
                gelu_max[node] = max(gelu_max.get(node, 0.0), float(x.abs().max()))
    return HeRanges(gelu_max, {node: (var_lo[node], var_hi[node]) for node in var_lo})


_RANGE_KWARGS = ("form", "bound", "degree", "variance_range")
"""What :func:`secure.graph.he_passes.apply_he_ranges` sets on a node."""


def range_misses(graph: Graph, weights: dict[str, torch.Tensor],
                 samples: Sequence[dict[str, torch.Tensor]]) -> list[list[str]]:
    """For each sample, the calibrated GeLU and LayerNorm nodes of ``graph`` whose input
    leaves the node's range on it (GeLU: max |x| above ``bound``; LayerNorm: some row's
    ``var + eps`` outside ``variance_range``): under CKKS nothing checks these, so this is
    how far the calibration can be trusted on other text. Runs on floats, with the nodes'
    unbounded forms (the bounded ones refuse an input outside their range: RangeError)."""
    limits = {n.name: n.kwargs for n in graph.nodes
              if n.kwargs.get("bound") is not None or n.kwargs.get("variance_range") is not None}
    unbounded = copy.copy(graph)
    unbounded.nodes = [Node(n.name, n.op, n.args, {k: v for k, v in n.kwargs.items() if k not in _RANGE_KWARGS},
                            n.spec, n.secret, n.origin) if n.name in limits else n for n in graph.nodes]
    out = []
    for sample in samples:
        seen = measure_he_ranges(unbounded, weights, [sample])
        missed = [node for node, top in seen.gelu_max.items()
                  if node in limits and top > limits[node]["bound"]]
        missed += [node for node, (lo, hi) in seen.variance.items()
                   if node in limits and not limits[node]["variance_range"][0] <= lo <= hi
                   <= limits[node]["variance_range"][1]]
        out.append(missed)
    return out


def calibrate_for_he(graph: Graph, weights: dict[str, torch.Tensor],
                     samples: Sequence[dict[str, torch.Tensor]],
                     gelu_tolerance: float = 1e-2) -> Graph:
    """A copy of ``graph`` whose GeLU and LayerNorm nodes carry ranges calibrated on
    ``samples``: :func:`measure_he_ranges`, then :func:`secure.graph.he_passes.apply_he_ranges`."""
    return apply_he_ranges(graph, measure_he_ranges(graph, weights, samples), gelu_tolerance)
