"""Bounds the weights guarantee on activation inputs, written into the graph at rewrite time.

A GeLU or SiLU whose input is a linear layer of a normalised value has an input range that
follows from the weights alone, whatever the query: with ``u`` the normalised row
(LayerNorm: ``(x - mean) / sqrt(var + eps)``; RMSNorm: ``x / sqrt(mean(x^2) + eps)``),
``sum_j u_j^2 <= n`` for every row, so by Cauchy-Schwarz the linear layer's output i,

    z_i = sum_j W_ij (gamma_j u_j + beta_j) + b_i,

satisfies ``|z_i| <= sqrt(n) ||W_i * gamma||_2 + |W_i . beta + b_i|``. The secure forms hold
this too: their sum of squares is truncated once and gets at least a floor that covers
that truncation (:data:`secure.approx.norms.SQUARES_FLOOR`: an ulp or more at f >= 17),
so the secure ``u`` has ``sum_j u_j^2 <= n`` up to the rsqrt's relative error; the
rounding of the numerator (an ulp, at most ``floor``), amplified at most
``sqrt(n / floor)`` times, adds ``||W_i||_1 sqrt(n floor)`` (:func:`linear_of_norm_bound`). A relative
margin of :data:`RELATIVE_MARGIN` and an absolute one of :data:`ABSOLUTE_MARGIN` cover the
rest (the rsqrt's 1.5e-5, the fixed-point encoding of the weights, the product's truncation).

:func:`bound_activation_inputs` writes the bound as the node's ``magnitude``. Under MPC the
comparisons of the activation's form then look at the low 32 bits of x only when
``(magnitude + |threshold|) 2^f < 2^31`` (:func:`secure.mpc.compare.comparison_width`):
one round and 24 bytes per comparison fewer. It is derived from the model owner's plaintext
weights when the graph is rewritten (the parties only ever see the number in the graph), and
it is data: a party cannot be made to run anything by it. It reveals one number per layer,
a function of the weights alone (no query).

Imports the IR and the norms' floor only.
"""

from __future__ import annotations

import copy
import math

import torch

from secure.approx.norms import SQUARES_FLOOR
from secure.graph.ir import Graph, Node, Ref

RELATIVE_MARGIN: float = 1.01
ABSOLUTE_MARGIN: float = 1.0
NORM_OPS = ("secure.layer_norm", "secure.rms_norm")
ACTIVATIONS = ("secure.gelu", "secure.silu")
COMPARING_FORMS = ("puma", "even")
PASS_THROUGH = frozenset({"aten.clone.default", "aten.alias.default", "aten.contiguous.default",
                          "aten.detach.default"})
"""Ops between a norm, its linear layer and the activation that change no value (dropout at
inference is captured as a clone)."""


def linear_of_norm_bound(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                         beta: torch.Tensor | None, squares_floor: float = SQUARES_FLOOR) -> float:
    """The largest ``|z_i|`` of ``z = W (gamma u + beta) + b`` over every row ``u`` with
    ``sum_j u_j^2 <= n`` (n = W's input width), with the secure forms' margins:

        max_i  RELATIVE_MARGIN (sqrt(n) ||W_i * gamma||_2 + |W_i . beta + b_i|
                                + ||W_i||_1 sqrt(n squares_floor)) + ABSOLUTE_MARGIN.
    """
    w = weight.detach().double()
    n = w.shape[-1]
    g = torch.ones(n, dtype=torch.float64) if gamma is None else gamma.detach().double()
    shift = torch.zeros(w.shape[0], dtype=torch.float64)
    if beta is not None:
        shift = shift + w @ beta.detach().double()
    if bias is not None:
        shift = shift + bias.detach().double()
    rounding = w.abs().sum(dim=-1) * math.sqrt(n * squares_floor)
    per_output = math.sqrt(n) * (w * g).norm(dim=-1) + shift.abs() + rounding
    return float(per_output.max()) * RELATIVE_MARGIN + ABSOLUTE_MARGIN


def bound_activation_inputs(graph: Graph, weights: dict[str, torch.Tensor]) -> Graph:
    """A copy of ``graph`` in which every comparing GeLU/SiLU (forms ``puma`` and ``even``)
    fed by ``norm -> linear`` (through value-preserving ops and a fused linears' output)
    carries ``magnitude``: the bound of :func:`linear_of_norm_bound` for its linear layer.
    Activations fed otherwise are left as they are (their comparisons stay 64 bits wide)."""
    out = copy.deepcopy(graph)
    producers = {n.name: n for n in out.nodes}
    for node in out.nodes:
        if node.op in ACTIVATIONS and node.kwargs.get("form", "puma") in COMPARING_FORMS:
            bound = _input_bound(producers, weights, node)
            if bound is not None:
                node.kwargs["magnitude"] = bound
    return out


def _through(producers: dict[str, Node], ref: object) -> Node | None:
    """The node ``ref`` names, looking through ops that change no value."""
    node = producers.get(ref.name) if isinstance(ref, Ref) else None
    while node is not None and node.op in PASS_THROUGH:
        node = producers.get(node.args[0].name) if node.args and isinstance(node.args[0], Ref) else None
    return node


def _weight(weights: dict[str, torch.Tensor], ref: object) -> torch.Tensor | None:
    return weights.get(ref.name) if isinstance(ref, Ref) else None


def _input_bound(producers: dict[str, Node], weights: dict[str, torch.Tensor], activation: Node) -> float | None:
    linear = _through(producers, activation.args[0])
    if linear is None:
        return None
    if linear.op == "getitem":  # one output of a fused secure.linears (gate and up)
        fused, index = _through(producers, linear.args[0]), linear.args[1]
        if fused is None or fused.op != "secure.linears" or not isinstance(index, int):
            return None
        slot = 1 + 2 * index
        args = [fused.args[0], *fused.args[slot:slot + 2]]
    elif linear.op == "aten.linear.default":
        args = list(linear.args)
    else:
        return None
    weight = _weight(weights, args[1])
    bias = _weight(weights, args[2]) if len(args) > 2 and args[2] is not None else None
    if weight is None or weight.dim() != 2 or (len(args) > 2 and args[2] is not None and bias is None):
        return None  # a weight computed in the graph, or a bias that is not a weight: no bound
    norm = _through(producers, args[0])
    if norm is None or norm.op not in NORM_OPS or norm.kwargs.get("variance_range") is not None:
        return None
    gamma_ref = norm.args[1] if len(norm.args) > 1 else None
    beta_ref = norm.args[2] if norm.op == "secure.layer_norm" and len(norm.args) > 2 else None
    gamma, beta = _weight(weights, gamma_ref), _weight(weights, beta_ref)
    if (gamma_ref is not None and gamma is None) or (beta_ref is not None and beta is None):
        return None
    if gamma is not None and gamma.shape[-1:] != weight.shape[-1:]:
        return None
    return linear_of_norm_bound(weight, bias, gamma, beta)
