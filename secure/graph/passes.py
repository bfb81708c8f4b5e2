"""Rewrite passes: replace nonlinear nodes on secret values by their secure forms.

Each pass is a small function ``Graph -> Graph`` that changes only the nodes it names and
leaves public nodes alone (they run in plaintext). :func:`rewrite` applies them in order
and finishes with :func:`check_supported`, which stops with an error naming the op and
the module it sits in when a secret node is left that no backend can run.

Secure ops introduced here (their arguments follow the aten op they replace):

* ``secure.gelu(x, form=...)``, ``secure.silu(x, form=...)`` -- PUMA's piecewise polynomials
  (``form="puma"``, also what a node without ``form`` runs) or the even forms (``"even"``:
  two comparisons, ``secure.approx.gelu.even_activation``);
* ``secure.softmax(x, mask, causal=..., kind=..., ...)`` -- PUMA or Power-Softmax over
  the last dim; ``mask`` is a public boolean (True = attend) or None;
* ``secure.tanh(x)`` -- a polynomial in |x| and the sign beyond (``secure.approx.tanh``);
* ``secure.layer_norm(x, gamma, beta, eps=...)``, ``secure.rsqrt(x)``;
* ``secure.embedding(table, token_ids)`` -- a lookup by the client's one-hot.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from secure.approx.softmax import power_softmax_range
from secure.graph.bounds import bound_activation_inputs, bound_attention_scores
from secure.graph.ir import Graph, Node, Ref, Spec


class UnsupportedOpError(ValueError):
    """A secret value meets an operation that has no secure form."""


@dataclass(frozen=True)
class SoftmaxRecipe:
    """Which softmax replaces attention's: "puma" (clipped exp, t, exp order) or "power".

    Power-Softmax's denominator ``eps + mean(x^p)`` is accurate on the division's range
    ``[lower, upper]`` (``lower ~ 3.45 upper / 2^iterations``): its lower end holds by
    construction when ``eps >= lower``, else it is checked at run time with the upper end
    (:func:`secure.approx.softmax.power_softmax`; a query out of range fails with an error
    naming the node). The rewrite refuses a recipe whose range no denominator can meet."""

    kind: str = "puma"
    t: int = 6
    exp_order: int = 3
    exp: str = "limit"  # "limit": PUMA's (1 + x/2^t)^(2^t); "poly": secure.approx.exp.poly_exp
    division: str = "goldschmidt"  # PUMA's reciprocal; "piecewise": secure.approx.reciprocal.divide
    p: int = 4
    eps: float = 1e-6
    upper: float = 1e3
    iterations: int = 10
    normalize: bool = False  # Power-Softmax rows divided by L (sum to 1), as distilled models expect

    def __post_init__(self) -> None:
        if self.kind not in ("puma", "power"):
            raise ValueError(f"softmax kind must be 'puma' or 'power', got {self.kind!r}")
        if self.exp not in ("limit", "poly"):
            raise ValueError(f"softmax exp must be 'limit' or 'poly', got {self.exp!r}")
        if self.division not in ("goldschmidt", "piecewise"):
            raise ValueError(f"softmax division must be 'goldschmidt' or 'piecewise', "
                             f"got {self.division!r}")


ACTIVATION_FORMS: tuple[str, ...] = ("puma", "even")
"""GeLU / SiLU forms a recipe may name: PUMA's piecewise polynomials (three comparisons) or
the even forms (two; ``secure.approx.gelu.even_gelu`` / ``even_silu``)."""


@dataclass(frozen=True)
class Recipe:
    """The set of secure forms a model is rewritten with."""

    name: str
    gelu: str = "puma"
    softmax: SoftmaxRecipe = field(default_factory=SoftmaxRecipe)
    layer_norm_newton: int = 0
    silu: str = "puma"

    def __post_init__(self) -> None:
        for what, form in (("GeLU", self.gelu), ("SiLU", self.silu)):
            if form not in ACTIVATION_FORMS:
                raise ValueError(f"unknown {what} form {form!r}; known: {', '.join(ACTIVATION_FORMS)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Recipe:
        """A recipe as ``to_dict`` wrote it; keys an older recipe lacks take PUMA's forms."""
        return Recipe(d["name"], d.get("gelu", "puma"), SoftmaxRecipe(**d.get("softmax", {})),
                      d.get("layer_norm_newton", 0), d.get("silu", "puma"))


PUMA = Recipe("puma", softmax=SoftmaxRecipe("puma", t=8, exp_order=1))
"""PUMA's published forms: GeLU sec. 4.2, softmax with t = 8 and the (1 + x/2^t) base."""

OURS = Recipe("ours", gelu="even", softmax=SoftmaxRecipe("puma", exp="poly", division="piecewise"),
              silu="puma")
"""The even GeLU (two comparisons instead of three, 27% fewer bytes, as many rounds; error
2.6e-3 instead of 0.020) and PUMA's softmax with our degree-15 polynomial exp
(:func:`secure.approx.exp.poly_exp`: 10 rounds where PUMA's t = 8 limit form takes 19 and
a third-order base at t = 6 takes 21, fewer bytes, error 3.5e-5 on shares). MiniLM, 50
sentences (padded to 16-128 tokens), against the exact model: mean cosine 0.9999656, minimum
0.9999342 on three parties (0.9999656 and 0.9999343 on floats), as with the limit form.

SiLU stays PUMA's: the even SiLU has the smaller worst case (0.0145 against 0.072) but the
larger error where LLaMA's activations mostly are (RMS 1.0e-2 against 6e-3 for |x| ~ 1); on
tiny-llama's greedy generation (20 held-out prompts, 16 tokens, float forms) PUMA's SiLU kept
20 of 20 continuations and every top-1 (max logit error 0.106), the even one 19 of 20 and
99.7% (0.153). ``Recipe(..., silu="even")`` selects it."""

RECIPES: dict[str, Recipe] = {"puma": PUMA, "ours": OURS}


def power_recipe(p: int, eps: float, upper: float, iterations: int, normalize: bool = False) -> Recipe:
    """Power-Softmax attention (needs a distilled model) with PUMA GeLU and LayerNorm."""
    return Recipe("power", softmax=SoftmaxRecipe("power", p=p, eps=eps, upper=upper,
                                                 iterations=iterations, normalize=normalize))


# ---- passes -----------------------------------------------------------------------------

def _map_nodes(graph: Graph, fn: Callable[[Node], list[Node] | None]) -> Graph:
    """A copy of the graph with each node replaced by fn(node) (None keeps it)."""
    out = copy.copy(graph)
    nodes: list[Node] = []
    for n in graph.nodes:
        new = fn(n)
        nodes.extend([n] if new is None else new)
    out.nodes = nodes
    return out


def _replace(n: Node, op: str, args: list, kwargs: dict | None = None) -> list[Node]:
    return [Node(n.name, op, args, kwargs or {}, n.spec, n.secret, n.origin)]


def rewrite_gelu(graph: Graph, form: str = "puma") -> Graph:
    """aten.gelu (exact or tanh) on a secret -> secure.gelu with ``form`` ("puma" or "even")."""
    if form not in ACTIVATION_FORMS:
        raise ValueError(f"unknown GeLU form {form!r}")

    def fn(n: Node) -> list[Node] | None:
        if n.secret and n.op == "aten.gelu.default":
            return _replace(n, "secure.gelu", [n.args[0]], {"form": form})
        return None

    return _map_nodes(graph, fn)


def rewrite_silu(graph: Graph, form: str = "puma") -> Graph:
    """aten.silu on a secret -> secure.silu with ``form`` ("puma" or "even")."""
    if form not in ACTIVATION_FORMS:
        raise ValueError(f"unknown SiLU form {form!r}")

    def fn(n: Node) -> list[Node] | None:
        if n.secret and n.op == "aten.silu.default":
            return _replace(n, "secure.silu", [n.args[0]], {"form": form})
        return None

    return _map_nodes(graph, fn)


def rewrite_tanh(graph: Graph) -> Graph:
    """aten.tanh on a secret (a sequence classifier's pooler) -> secure.tanh."""
    def fn(n: Node) -> list[Node] | None:
        if n.secret and n.op == "aten.tanh.default":
            return _replace(n, "secure.tanh", [n.args[0]])
        return None

    return _map_nodes(graph, fn)


def _softmax_kwargs(recipe: SoftmaxRecipe, causal: bool, n: Node) -> dict:
    if recipe.kind == "power":
        try:
            power_softmax_range(recipe.eps, recipe.upper, recipe.iterations)
        except ValueError as e:
            raise ValueError(f"Power-Softmax recipe at node {n.name} in {n.origin or 'top level'}: {e}") from e
    return {"causal": causal, **asdict(recipe)}


def rewrite_softmax(graph: Graph, recipe: SoftmaxRecipe) -> Graph:
    """aten.softmax / aten._softmax over the last dim of a secret -> secure.softmax.

    An additive attention mask (eager attention: ``softmax(scores + bias)``, the bias public,
    ``finfo.min`` where masked) becomes the softmax's ``bias``: masked where it is at or below
    ``MASK_BIAS_FLOOR``, added where finite (ALiBi-style biases), so that no ring value ever
    holds ``finfo.min``."""
    producers = {n.name: n for n in graph.nodes}
    readers: dict[str, int] = {}
    for n in graph.nodes:
        for r in n.refs():
            readers[r] = readers.get(r, 0) + 1
    secret = graph.secret_names()
    folded: set[str] = set()

    def additive_bias(x: object) -> tuple[object, Ref] | None:
        add = producers.get(x.name) if isinstance(x, Ref) else None
        if add is None or add.op != "aten.add.Tensor" or add.kwargs.get("alpha", 1) != 1 or readers.get(add.name) != 1:
            return None
        a, b = add.args[0], add.args[1]
        for s_arg, p_arg in ((a, b), (b, a)):
            if isinstance(s_arg, Ref) and s_arg.name in secret and isinstance(p_arg, Ref) and p_arg.name not in secret:
                folded.add(add.name)
                return s_arg, p_arg
        return None

    def fn(n: Node) -> list[Node] | None:
        if n.secret and n.op in ("aten._softmax.default", "aten.softmax.int"):
            dim = n.args[1]
            rank = len(n.spec.shape) if n.spec else 0
            if dim not in (-1, rank - 1):
                raise UnsupportedOpError(f"softmax over dim {dim} (node {n.name}, in {n.origin or '?'}): "
                                         "secure softmax works over the last dimension only")
            kwargs = _softmax_kwargs(recipe, False, n)
            x = n.args[0]
            biased = additive_bias(x)
            if biased is not None:
                x, kwargs["bias"] = biased
            return _replace(n, "secure.softmax", [x, None], kwargs)
        return None

    out = _map_nodes(graph, fn)
    return eliminate_dead_nodes(out) if folded else out


def decompose_attention(graph: Graph, recipe: SoftmaxRecipe) -> Graph:
    """aten.scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale) ->
    matmul(q, k^T) -> secure.attention(scores, mask, v; causal, scale): PUMA's softmax and
    the product with v in one node, which normalises the rows after the product
    (:func:`secure.approx.softmax.puma_softmax` with ``values``), the scale in its public coefficients;
    Power-Softmax: ``* scale`` -> secure.softmax(mask, causal) -> matmul(., v)."""
    def fn(n: Node) -> list[Node] | None:
        if not (n.secret and n.op == "aten.scaled_dot_product_attention.default"):
            return None
        q, k, v, *rest = n.args
        mask = rest[0] if len(rest) > 0 else n.kwargs.get("attn_mask")
        dropout = rest[1] if len(rest) > 1 else n.kwargs.get("dropout_p", 0.0)
        causal = rest[2] if len(rest) > 2 else n.kwargs.get("is_causal", False)
        scale = n.kwargs.get("scale") or (rest[3] if len(rest) > 3 else None)
        if dropout:
            raise UnsupportedOpError(f"attention dropout {dropout} at inference (node {n.name}); "
                                     "capture the model in eval mode")
        if n.kwargs.get("enable_gqa"):
            raise UnsupportedOpError(f"grouped-query attention (node {n.name}) is not supported yet")
        if n.spec is None:
            raise UnsupportedOpError(f"attention node {n.name} has no shape")
        q_len, d = n.spec.shape[-2], n.spec.shape[-1]
        head_shape = n.spec.shape[:-2]
        k_len = _shape_of(graph, k)[-2] if isinstance(k, Ref) else q_len
        score_spec = Spec([*head_shape, q_len, k_len], n.spec.dtype)
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        base = n.name
        kt = Node(f"{base}.k_t", "aten.transpose.int", [k, -2, -1], {},
                  Spec([*head_shape, d, k_len], n.spec.dtype), True, n.origin)
        scores = Node(f"{base}.scores", "aten.matmul.default", [q, Ref(kt.name)], {}, score_spec, True,
                      n.origin)
        if recipe.kind == "puma":  # the scale rides in the softmax's public coefficients: no truncation
            out = Node(base, "secure.attention", [Ref(scores.name), mask, v],
                       {**_softmax_kwargs(recipe, bool(causal), n), "scale": scale}, n.spec, True, n.origin)
            return [kt, scores, out]
        else:
            scaled = [Node(f"{base}.scaled", "aten.mul.Tensor", [Ref(scores.name), scale], {}, score_spec, True,
                           n.origin)]
            probs = Node(f"{base}.probs", "secure.softmax", [Ref(scaled[0].name), mask],
                         _softmax_kwargs(recipe, bool(causal), n), score_spec, True, n.origin)
        out = Node(base, "aten.matmul.default", [Ref(probs.name), v], {}, n.spec, True, n.origin)
        return [kt, scores, *scaled, probs, out]

    return _map_nodes(graph, fn)


def _shape_of(graph: Graph, ref: Ref) -> list[int]:
    for n in graph.nodes:
        if n.name == ref.name and n.spec is not None:
            return n.spec.shape
    for i in graph.inputs:
        if i.name == ref.name:
            return i.spec.shape
    raise KeyError(f"no shape known for {ref.name!r}")


def rewrite_layer_norm(graph: Graph, newton_iterations: int = 0) -> Graph:
    """aten.layer_norm over the last dim of a secret -> secure.layer_norm."""
    def fn(n: Node) -> list[Node] | None:
        if not (n.secret and n.op == "aten.layer_norm.default"):
            return None
        x, shape, *rest = n.args
        if len(shape) != 1:
            raise UnsupportedOpError(f"layer_norm over {len(shape)} dims (node {n.name}, in "
                                     f"{n.origin or '?'}): only the last dimension is supported")
        gamma = rest[0] if len(rest) > 0 else None
        beta = rest[1] if len(rest) > 1 else None
        eps = rest[2] if len(rest) > 2 else 1e-5
        return _replace(n, "secure.layer_norm", [x, gamma, beta],
                        {"eps": float(eps), "newton_iterations": newton_iterations})

    return _map_nodes(graph, fn)


def fuse_rms_norm(graph: Graph) -> Graph:
    """LLaMA's RMSNorm as captured, ``w * (x * rsqrt(mean(x^2, -1, keepdim) + eps))``
    (aten pow, mean, add, rsqrt, mul, mul; either order of each product's factors), on a
    secret x with a weight w of the graph -> ``secure.rms_norm(x, w, eps)``, when nothing
    else reads the intermediate values. The form (``secure.approx.norms.rms_norm``) takes the
    root of the sum with ``x^2`` and ``x w`` in one pass and no division to truncate: 16
    rounds where the captured chain takes 24 (pow, mean's truncation, the rsqrt form, two
    products)."""
    by_name = {n.name: n for n in graph.nodes}
    readers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for r in n.refs():
            readers.setdefault(r, []).append(n)
    weights = set(graph.weights)

    def only_reader(name: str) -> Node | None:
        got = readers.get(name, [])
        return got[0] if len(got) == 1 and name not in graph.outputs else None

    def other(n: Node, name: str) -> Any:
        a, b = n.args[0], n.args[1]
        if isinstance(a, Ref) and a.name == name:
            return b
        return a if isinstance(b, Ref) and b.name == name else None

    replaced: dict[str, Node] = {}
    for r in graph.nodes:
        if not (r.secret and r.op == "aten.rsqrt.default" and isinstance(r.args[0], Ref)):
            continue
        add = by_name.get(r.args[0].name)
        if add is None or add.op != "aten.add.Tensor" or add.kwargs or not isinstance(add.args[1], (int, float)):
            continue
        mean = by_name.get(add.args[0].name) if isinstance(add.args[0], Ref) else None
        if mean is None or mean.op != "aten.mean.dim" or list(mean.args[1:3]) != [[-1], True] or mean.kwargs:
            continue
        power = by_name.get(mean.args[0].name) if isinstance(mean.args[0], Ref) else None
        if power is None or power.op != "aten.pow.Tensor_Scalar" or power.args[1] != 2:
            continue
        x = power.args[0]
        scaled = only_reader(r.name)
        if not (isinstance(x, Ref) and scaled is not None and scaled.op == "aten.mul.Tensor"
                and other(scaled, r.name) == x and all(only_reader(v.name) for v in (power, mean, add))):
            continue
        final = only_reader(scaled.name)
        gamma = other(final, scaled.name) if final is not None and final.op == "aten.mul.Tensor" else None
        if not (isinstance(gamma, Ref) and gamma.name in weights):
            continue
        replaced[final.name] = Node(final.name, "secure.rms_norm", [x, gamma], {"eps": float(add.args[1])},
                                    final.spec, True, final.origin)
    if not replaced:
        return graph
    out = _map_nodes(graph, lambda n: [replaced[n.name]] if n.name in replaced else None)
    return eliminate_dead_nodes(out)


def rewrite_rsqrt(graph: Graph) -> Graph:
    """aten.rsqrt on a secret (RMSNorm in LLaMA-style models) -> secure.rsqrt."""
    def fn(n: Node) -> list[Node] | None:
        if n.secret and n.op == "aten.rsqrt.default":
            return _replace(n, "secure.rsqrt", [n.args[0]])
        return None

    return _map_nodes(graph, fn)


_RESHAPES = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
             "aten.unsqueeze.default", "aten.squeeze.dim", "aten.flatten.using_ints",
             "aten.clone.default", "aten.alias.default", "aten.contiguous.default"}


def _client_source(graph: Graph, ref: Ref, client: set[str]) -> str | None:
    """The client input that ``ref`` is a reshaped copy of, or None."""
    producers = {n.name: n for n in graph.nodes}
    name = ref.name
    while name not in client:
        node = producers.get(name)
        if node is None or node.op not in _RESHAPES or not isinstance(node.args[0], Ref):
            return None
        name = node.args[0].name
    return name


MASK_INPUT = "attention_mask"


def positions_from_mask(graph: Graph) -> Graph:
    """Public structure derived from the secret token ids, derived from the public mask instead.

    RoBERTa, XLM-R and CamemBERT number their positions from ``input_ids != pad`` (a cumsum);
    on shares that would be an embedding indexed by a computed secret. The client pads with
    the pad token exactly where ``attention_mask`` is 0, so ``ids != pad`` equals
    ``attention_mask != 0``: the comparison is rewritten to read the public mask, and every
    node computed from it alone becomes public (plaintext). A graph with such a comparison
    but no public ``attention_mask`` input is refused, naming the node."""
    client = {i.name for i in graph.inputs if i.kind == "client"}
    has_mask = any(i.name == MASK_INPUT and i.kind == "public" for i in graph.inputs)

    def fn(n: Node) -> list[Node] | None:
        if n.op != "aten.ne.Scalar" or not isinstance(n.args[0], Ref):
            return None
        if _client_source(graph, n.args[0], client) is None:
            return None
        if not has_mask:
            raise UnsupportedOpError(f"node {n.name} (in {n.origin or 'top level'}) compares the secret token ids "
                                     f"with {n.args[1]!r} to derive structure, and the graph has no public "
                                     f"{MASK_INPUT!r} input to derive it from")
        return [Node(n.name, n.op, [Ref(MASK_INPUT), 0], {}, n.spec, False, n.origin)]

    out = _map_nodes(graph, fn)
    return graph if all(a is b for a, b in zip(out.nodes, graph.nodes)) else _reflow_secrecy(out)


def _reflow_secrecy(graph: Graph) -> Graph:
    """A copy with every node's ``secret`` flag recomputed from the inputs and weights forward."""
    secret = {i.name for i in graph.inputs if i.kind != "public"} | set(graph.weights)
    nodes = []
    for n in graph.nodes:
        flag = any(r in secret for r in n.refs())
        nodes.append(n if n.secret == flag else dataclasses.replace(n, secret=flag))
        if flag:
            secret.add(n.name)
    out = copy.copy(graph)
    out.nodes = nodes
    return out


def rewrite_embedding(graph: Graph) -> Graph:
    """aten.embedding(table, ids) with the client's ids (possibly reshaped) ->
    secure.embedding(table, ids, shape): a product with the client's one-hot.

    Lookups with public indices (positions, token types) stay: the interpreter gathers rows
    of the shared table locally, for free.
    """
    client = {i.name for i in graph.inputs if i.kind == "client"}

    def fn(n: Node) -> list[Node] | None:
        if n.op != "aten.embedding.default":
            return None
        table, ids = n.args[0], n.args[1]
        if not isinstance(ids, Ref) or ids.name not in graph.secret_names():
            return None
        source = _client_source(graph, ids, client)
        if source is None:
            raise UnsupportedOpError(f"embedding indexed by a computed secret ({ids.name}, node "
                                     f"{n.name}): only the client's token ids are supported")
        shape = n.spec.shape if n.spec else None
        return _replace(n, "secure.embedding", [table, Ref(source)], {"shape": shape})

    return eliminate_dead_nodes(_map_nodes(graph, fn))


REWRITE_VERSION: int = 5
"""Bumped whenever a pass changes the graphs it writes for a recipe (2: the polynomial exp,
the softmax scale, fused linear layers and RMSNorm; 3: ours' softmax divides piecewise; 4:
activation inputs bounded by the weights, ``secure.graph.bounds``; 5: attention scores
bounded too). A
deal records it; a cached deal of another version is dealt again by the launchers instead of
serving yesterday's forms."""

MAX_FUSED_LINEARS: int = 3
"""Linear layers of one input run as one ``secure.linears`` node (query, key and value)."""


def fuse_parallel_linears(graph: Graph) -> Graph:
    """Secret ``aten.linear`` nodes that read the same input with graph weights (and graph
    biases or none) -> one ``secure.linears`` per up to three of them, placed where the
    first was, and a ``getitem`` in each one's place. Their products then share one pass:
    2 rounds where each took 2 (attention's query, key and value: 4 rounds fewer per
    layer; LLaMA's gate and up projections: 2 more). Bytes and results are unchanged."""
    weights = set(graph.weights)

    def weight_ref(a: Any) -> bool:
        return isinstance(a, Ref) and a.name in weights

    groups: dict[str, list[Node]] = {}
    for n in graph.nodes:
        bias = n.args[2] if len(n.args) > 2 else None
        if (n.secret and n.op == "aten.linear.default" and not n.kwargs and isinstance(n.args[0], Ref)
                and weight_ref(n.args[1]) and (bias is None or weight_ref(bias))):
            groups.setdefault(n.args[0].name, []).append(n)
    member: dict[str, tuple[Node, int]] = {}
    first: dict[str, Node] = {}
    for x, linears in groups.items():
        for start in range(0, len(linears), MAX_FUSED_LINEARS):
            chunk = linears[start:start + MAX_FUSED_LINEARS]
            if len(chunk) < 2:
                continue
            args: list[Any] = [Ref(x)]
            for m in chunk:
                args += [m.args[1], m.args[2] if len(m.args) > 2 else None]
            fused = Node(f"{chunk[0].name}.fused", "secure.linears", args, {}, None, True, chunk[0].origin)
            first[chunk[0].name] = fused
            member.update({m.name: (fused, i) for i, m in enumerate(chunk)})

    def fn(n: Node) -> list[Node] | None:
        if n.name not in member:
            return None
        fused, i = member[n.name]
        getter = Node(n.name, "getitem", [Ref(fused.name), i], {}, n.spec, True, n.origin)
        return [fused, getter] if first.get(n.name) is fused else [getter]

    return _map_nodes(graph, fn)


def eliminate_dead_nodes(graph: Graph) -> Graph:
    """Drop nodes whose values nothing reads (e.g. reshapes of ids now read as one-hot)."""
    live = set(graph.outputs)
    kept: list[Node] = []
    for n in reversed(graph.nodes):
        if n.name in live:
            kept.append(n)
            live.update(n.refs())
    out = copy.copy(graph)
    out.nodes = list(reversed(kept))
    return out


SHAPE_OPS = {
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.transpose.int",
    "aten.permute.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
    "aten.expand.default", "aten.slice.Tensor", "aten.select.int", "aten.clone.default",
    "aten.alias.default", "aten.t.default", "aten._to_copy.default", "aten.detach.default",
    "aten.flatten.using_ints", "aten.contiguous.default", "aten.unflatten.int",
    "aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "getitem",
    "aten.embedding.default", "aten.index_select.default",
}
ARITHMETIC_OPS = {
    "aten.linear.default", "aten.matmul.default", "aten.bmm.default", "aten.mm.default",
    "aten.addmm.default", "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor",
    "aten.neg.default", "aten.sum.dim_IntList", "aten.mean.dim", "aten.pow.Tensor_Scalar",
    "aten.cat.default", "aten.rsub.Scalar",
}
SECURE_OPS = {"secure.gelu", "secure.silu", "secure.softmax", "secure.attention", "secure.layer_norm",
              "secure.rms_norm", "secure.rsqrt",
              "secure.embedding", "secure.tanh", "secure.linears"}
SUPPORTED_SECRET_OPS = SHAPE_OPS | ARITHMETIC_OPS | SECURE_OPS


def check_supported(graph: Graph) -> Graph:
    """Raise UnsupportedOpError for the first secret node no backend can run."""
    for n in graph.nodes:
        if n.secret and n.op not in SUPPORTED_SECRET_OPS:
            raise UnsupportedOpError(
                f"cannot run {n.op} on secret values: node {n.name!r} in module "
                f"{n.origin or '(top level)'}; no secure form is known for it. Supported on "
                f"secrets: linear algebra, add/sub/mul, division by public values, shape "
                f"operations, GeLU, SiLU, tanh, softmax, attention, LayerNorm, rsqrt, embedding")
    return graph


def rewrite(graph: Graph, recipe: Recipe, fuse_linears: bool = True,
            weights: dict[str, torch.Tensor] | None = None) -> Graph:
    """All passes in order; the result records the recipe in ``meta``. ``fuse_linears``
    (:func:`fuse_parallel_linears`) is for the share engine; the CKKS engine encodes each
    linear layer's weights on their own and keeps them apart. With the model owner's
    plaintext ``weights``, activations fed by a norm's linear layer carry the bound on their
    input that the weights guarantee (:func:`secure.graph.bounds.bound_activation_inputs`),
    and PUMA-kind softmaxes of ``q @ k^T`` the bound on their scores
    (:func:`secure.graph.bounds.bound_attention_scores`), so their comparisons read 32 bits
    under MPC."""
    g = positions_from_mask(graph)
    g = rewrite_embedding(g)
    g = decompose_attention(g, recipe.softmax)
    g = rewrite_softmax(g, recipe.softmax)
    g = rewrite_gelu(g, recipe.gelu)
    g = rewrite_silu(g, recipe.silu)
    g = rewrite_layer_norm(g, recipe.layer_norm_newton)
    g = fuse_rms_norm(g)
    g = rewrite_rsqrt(g)
    g = rewrite_tanh(g)
    if fuse_linears:
        g = fuse_parallel_linears(g)
    g = check_supported(g)
    if weights is not None:
        g = bound_attention_scores(bound_activation_inputs(g, weights), weights)
    g.meta = {**graph.meta, "recipe": recipe.to_dict()}
    return g
