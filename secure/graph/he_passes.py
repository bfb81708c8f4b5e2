"""Passes that turn a rewritten graph into its HE form (CKKS evaluates polynomials only).

* :func:`apply_he_ranges` -- GeLU becomes one polynomial on a calibrated range and
  LayerNorm's inverse square root a Newton iteration on a calibrated variance range;
  the ranges (:class:`HeRanges`, at the nodes :func:`he_range_sites` names) are data,
  measured by running the graph on sample inputs
  (``secure.evaluate.he_ranges.calibrate_for_he`` does both);
* :func:`client_embedding_input` -- in HE mode the client looks its token ids up in the
  embedding table itself (DESIGN.md sec. 1: the table is disclosed to clients), so the
  lookup node becomes a new client input holding the embedded rows.
* :func:`check_he_supported` -- names the first node that needs a comparison.

Compiler floor: never imports ``secure.runtime`` or ``secure.mpc``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from secure.approx.gelu import poly_gelu_degree
from secure.approx.softmax import power_softmax_range
from secure.graph.ir import Graph, GraphInput, Node, Ref, Spec
from secure.graph.passes import UnsupportedOpError

GELU_MARGIN: float = 1.1
"""The GeLU polynomial's bound is this much above the largest |input| seen in calibration."""

VARIANCE_MARGIN: float = 3.0
"""LayerNorm's variance range is widened by this factor on both ends of what was seen."""


@dataclass(frozen=True)
class ClientEmbedding:
    """Where the client's own lookup enters the HE graph."""

    table: str          # weight name of the (disclosed) embedding table
    ids_input: str      # the original token-id input
    embeds_input: str   # the new client input: rows of the table, shape (*ids, hidden)


@dataclass
class HeRanges:
    """What calibration saw, per node name: the largest |x| entering each ``secure.gelu``
    and the (min, max) of ``var(x) + eps`` entering each ``secure.layer_norm``."""

    gelu_max: dict[str, float] = field(default_factory=dict)
    variance: dict[str, tuple[float, float]] = field(default_factory=dict)


def he_range_sites(graph: Graph) -> dict[str, str]:
    """GeLU or LayerNorm node -> the value whose range it needs (its input), for every
    such node whose input is a graph value."""
    return {n.name: n.args[0].name for n in graph.nodes
            if n.op in ("secure.gelu", "secure.layer_norm") and isinstance(n.args[0], Ref)}


def apply_he_ranges(graph: Graph, ranges: HeRanges, gelu_tolerance: float = 1e-2) -> Graph:
    """A copy of ``graph`` whose GeLU and LayerNorm nodes carry the calibrated ``ranges``.

    Sets ``form="poly", bound=..., degree=...`` on GeLU nodes (bound: :data:`GELU_MARGIN`
    times the largest |x| seen, at least 1, rounded up to an integer; degree: the least
    whose max error on the bound is ``gelu_tolerance``) and ``variance_range=[lo, hi]``
    on LayerNorm nodes (what was seen, widened by :data:`VARIANCE_MARGIN` on both ends).
    Nodes without a range are kept as they are.
    """
    out = copy.copy(graph)
    nodes = []
    for n in graph.nodes:
        if n.name in ranges.gelu_max:
            bound = math.ceil(GELU_MARGIN * max(ranges.gelu_max[n.name], 1.0))
            n = Node(n.name, n.op, n.args, {"form": "poly", "bound": float(bound),
                                            "degree": poly_gelu_degree(float(bound), gelu_tolerance)},
                     n.spec, n.secret, n.origin)
        elif n.name in ranges.variance:
            seen_lo, seen_hi = ranges.variance[n.name]
            lo, hi = seen_lo / VARIANCE_MARGIN, seen_hi * VARIANCE_MARGIN
            n = Node(n.name, n.op, n.args, {**n.kwargs, "variance_range": [lo, hi]}, n.spec, n.secret, n.origin)
        nodes.append(n)
    out.nodes = nodes
    out.meta = {**graph.meta, "he_calibrated": True}
    return out


def client_embedding_input(graph: Graph) -> tuple[Graph, ClientEmbedding]:
    """Replace the lookup of the client's ids (``secure.embedding``) by a client input of
    embedded rows; returns the new graph and where the client's lookup goes."""
    lookups = [n for n in graph.nodes if n.op == "secure.embedding"]
    if len(lookups) != 1:
        raise UnsupportedOpError(f"HE mode needs exactly one lookup of the client's token ids, "
                                 f"found {len(lookups)}")
    node = lookups[0]
    table, ids = node.args[0].name, node.args[1].name
    hidden = graph.weights[table].shape[-1]
    ids_spec = next(i for i in graph.inputs if i.name == ids).spec
    embeds = f"{ids}_embeds"
    shape = node.kwargs.get("shape") or [*ids_spec.shape, hidden]
    out = copy.copy(graph)
    out.inputs = [i for i in graph.inputs if i.name != ids] + [
        GraphInput(embeds, "client", Spec([*ids_spec.shape, hidden], "torch.float32"))]
    out.nodes = [Node(n.name, "aten.view.default", [Ref(embeds), list(shape)], {}, n.spec, True, n.origin)
                 if n is node else n for n in graph.nodes]
    out.weights = {k: v for k, v in graph.weights.items() if k != table or _still_used(graph, node, k)}
    return out, ClientEmbedding(table, ids, embeds)


def _still_used(graph: Graph, lookup: Node, weight: str) -> bool:
    return any(weight in n.refs() for n in graph.nodes if n is not lookup)


def _unguarded_power_softmax(kw: dict) -> str | None:
    """Why a Power-Softmax node cannot be trusted under CKKS, or None: nothing can check a
    ciphertext's range, so the denominator's lower end must hold by construction (eps at
    least the division's lower end); the upper end is left to the client's refresh check."""
    lower, _ = power_softmax_range(kw["eps"], kw["upper"], kw["iterations"])
    if lower is None:
        return None
    return (f"eps = {kw['eps']:g} is below the division's accurate range [{lower:g}, {kw['upper']:g}], so small "
            "denominators would be silently wrong under CKKS; distil with eps >= the lower end (python -m "
            "secure.distill)")


def check_he_supported(graph: Graph) -> Graph:
    """Raise UnsupportedOpError naming the first secret node that CKKS cannot evaluate
    (anything that needs a comparison, a max or frexp)."""
    for n in graph.nodes:
        if not n.secret:
            continue
        reason = None
        if n.op in ("secure.softmax", "secure.attention") and n.kwargs.get("kind") != "power":
            reason = "the clipped-exp softmax needs a row max (comparisons); use the power recipe"
        elif n.op == "secure.softmax":
            reason = _unguarded_power_softmax(n.kwargs)
        elif n.op == "secure.gelu" and n.kwargs.get("form") != "poly":
            reason = "piecewise GeLU needs comparisons; calibrate the graph for HE first"
        elif n.op == "secure.layer_norm" and not n.kwargs.get("variance_range"):
            reason = "LayerNorm needs a calibrated variance range under HE (no frexp)"
        elif n.op in ("secure.silu", "secure.rsqrt"):
            reason = f"{n.op} needs comparisons"
        elif n.op == "aten.div.Tensor" and isinstance(n.args[1], Ref) and n.args[1].name in graph.secret_names():
            reason = "division by a secret needs a reciprocal seed (frexp)"
        if reason:
            raise UnsupportedOpError(f"cannot run node {n.name!r} ({n.op}) in module "
                                     f"{n.origin or '(top level)'} under CKKS: {reason}")
    return graph
