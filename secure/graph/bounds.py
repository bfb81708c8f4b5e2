"""Bounds the weights guarantee on activation inputs and on attention scores, written into
the graph at rewrite time.

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
one round and 36 bytes per comparison fewer. It is derived from the model owner's plaintext
weights when the graph is rewritten (the parties only ever see the number in the graph), and
it is data: a party cannot be made to run anything by it. It reveals one number per FFN,
a function of the weights alone (no query).

The same normalised rows bound attention scores: q and k are linear layers of them, so each
block (head) of a q or k row has a norm the weights bound, and a score, the dot product of
two blocks, at most the product of two such norms (:func:`bound_attention_scores`). Under
MPC the row maximum then reads its candidates at 32 bits
(:func:`secure.mpc.compare.max_reading`). It reveals one more number per layer, again a
function of the weights alone.

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
    return float(block_norm_bounds(weight, bias, gamma, beta, block=1, squares_floor=squares_floor).max())


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
    found = _linear_of_norm(producers, weights, activation.args[0])
    return None if found is None else linear_of_norm_bound(*found)


_LinearOfNorm = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


def _linear_of_norm(producers: dict[str, Node], weights: dict[str, torch.Tensor], ref: object
                    ) -> _LinearOfNorm | None:
    """(weight, bias, gamma, beta) when ``ref`` is a linear layer (or one output of a fused
    ``secure.linears``) of a comparison-based norm's output, all of them model weights;
    else None."""
    linear = _through(producers, ref)
    if linear is None:
        return None
    if linear.op == "getitem":  # one output of a fused secure.linears (gate and up, or q, k, v)
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
    return weight, bias, gamma, beta


# ---- attention scores ------------------------------------------------------------------

SOFTMAX_OPS = ("secure.attention", "secure.softmax")
_SPLITS = frozenset({"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"})
_TRANSPOSES = frozenset({"aten.transpose.int"})
_PERMUTES = frozenset({"aten.permute.default"})


def block_norm_bounds(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
                      beta: torch.Tensor | None, block: int, squares_floor: float = SQUARES_FLOOR) -> torch.Tensor:
    """For each block h of ``block`` consecutive outputs of ``z = W (gamma u + beta) + b``, the
    largest ``||z_h||_2`` over every row u with ``sum_j u_j^2 <= n``, with the secure forms'
    margins (as :func:`linear_of_norm_bound`, per block instead of per output):

        RELATIVE_MARGIN (sqrt(n) ||W_h diag(gamma)||_2 + ||W_h beta + b_h||_2 + ||r_h||_2)
        + ABSOLUTE_MARGIN,   r_i = ||W_i||_1 sqrt(n squares_floor),

    ``||.||_2`` of a matrix its largest singular value (the operator norm)."""
    w = weight.detach().double()
    out_features, n = w.shape
    if block < 1 or out_features % block:
        raise ValueError(f"block_norm_bounds: {out_features} outputs do not split into blocks of {block}")
    g = torch.ones(n, dtype=torch.float64) if gamma is None else gamma.detach().double()
    shift = torch.zeros(out_features, dtype=torch.float64)
    if beta is not None:
        shift = shift + w @ beta.detach().double()
    if bias is not None:
        shift = shift + bias.detach().double()
    rounding = w.abs().sum(dim=-1) * math.sqrt(n * squares_floor)
    blocks = out_features // block
    operator = torch.linalg.matrix_norm((w * g).reshape(blocks, block, n), ord=2)
    per_block = math.sqrt(n) * operator + shift.reshape(blocks, block).norm(dim=-1) \
        + rounding.reshape(blocks, block).norm(dim=-1)
    return per_block * RELATIVE_MARGIN + ABSOLUTE_MARGIN


def bound_attention_scores(graph: Graph, weights: dict[str, torch.Tensor]) -> Graph:
    """A copy of ``graph`` in which every PUMA-kind ``secure.attention`` / ``secure.softmax``
    whose scores are ``q @ k^T``, q and k linear layers of a norm's output split into heads,
    carries ``magnitude``: a bound on |scores| (before the softmax's scale and mask).

    Math: each score is ``q_h . k_h'``, the dot product of a block of one token's q row and
    a block of one token's k row, so by Cauchy-Schwarz ``|q_h . k_h'| <= ||q_h|| ||k_h'||``
    <= ``max_h ||q_h|| max_h ||k_h||`` over the blocks' bounds of :func:`block_norm_bounds`,
    times :data:`RELATIVE_MARGIN` plus :data:`ABSOLUTE_MARGIN` (the products' truncations).
    The graph must show that: from each linear layer only splits of the feature axis,
    transposes and permutes reach the matmul, and it contracts q's and k's blocks of the
    same size (or the whole feature axis). Anything else (a rotary embedding, a cache, a
    repeat of k's heads) leaves the node without a bound. MiniLM's: 1680 to 8206 by layer."""
    out = copy.deepcopy(graph)
    producers = {n.name: n for n in out.nodes}
    for node in out.nodes:
        if node.op in SOFTMAX_OPS and node.kwargs.get("kind") == "puma" and node.args:
            bound = _scores_bound(producers, weights, node.args[0])
            if bound is not None:
                node.kwargs["magnitude"] = bound
    return out


def _scores_bound(producers: dict[str, Node], weights: dict[str, torch.Tensor], ref: object) -> float | None:
    scores = _through(producers, ref)
    if scores is None or scores.op != "aten.matmul.default" or len(scores.args) != 2:
        return None
    q_side, k_side = (_feature_axes(producers, weights, a) for a in scores.args)
    if q_side is None or k_side is None:
        return None
    (q_linear, q_labels, q_block), (k_linear, k_labels, k_block) = q_side, k_side
    if len(q_labels) < 2 or len(k_labels) < 2:
        return None
    # matmul contracts q's last axis with k's second to last: both must be blocks of features
    q_axis, k_axis = q_labels[-1], k_labels[-2]
    if q_axis not in ("block", "feature") or k_axis not in ("block", "feature"):
        return None
    q_bounds = block_norm_bounds(*q_linear, block=q_block if q_axis == "block" else q_linear[0].shape[0])
    k_bounds = block_norm_bounds(*k_linear, block=k_block if k_axis == "block" else k_linear[0].shape[0])
    return float(q_bounds.max() * k_bounds.max()) * RELATIVE_MARGIN + ABSOLUTE_MARGIN


def _feature_axes(producers: dict[str, Node], weights: dict[str, torch.Tensor], ref: object
                  ) -> tuple[_LinearOfNorm, list[str], int] | None:
    """(the linear layer of a norm that ``ref`` comes from, the labels of ``ref``'s axes,
    the block size) when only value-preserving moves lie between them: labels "feature"
    (the linear's output axis, whole), "block" (its last part after a split: consecutive
    features of one token) and "other"."""
    chain: list[Node] = []
    node = producers.get(ref.name) if isinstance(ref, Ref) else None
    while node is not None and (node.op in PASS_THROUGH or node.op in _SPLITS or node.op in _TRANSPOSES
                                or node.op in _PERMUTES):
        chain.append(node)
        node = producers.get(node.args[0].name) if node.args and isinstance(node.args[0], Ref) else None
    if node is None or node.spec is None:
        return None
    linear = _linear_of_norm(producers, weights, Ref(node.name))
    if linear is None or not node.spec.shape or node.spec.shape[-1] != linear[0].shape[0]:
        return None
    labels = ["other"] * (len(node.spec.shape) - 1) + ["feature"]
    shape, block = list(node.spec.shape), linear[0].shape[0]
    for step in reversed(chain):
        if step.op in _SPLITS:
            if step.spec is None:
                return None
            new = list(step.spec.shape)
            if new == shape:
                continue
            # only the feature axis, last, split in two: [..., F] -> [..., F / D, D]
            if labels[-1] != "feature" or new[:-2] != shape[:-1] or new[-2] * new[-1] != shape[-1]:
                return None
            labels, shape, block = labels[:-1] + ["other", "block"], new, new[-1]
        elif step.op in _TRANSPOSES:
            i, j = (int(a) % len(labels) for a in step.args[1:3])
            labels[i], labels[j] = labels[j], labels[i]
            shape[i], shape[j] = shape[j], shape[i]
        elif step.op in _PERMUTES:
            dims = [int(d) % len(labels) for d in step.args[1]]
            labels, shape = [labels[d] for d in dims], [shape[d] for d in dims]
    return linear, labels, block
