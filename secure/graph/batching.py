"""Derive a batch-B graph from a graph captured at batch 1.

Queries are captured with a leading batch dimension of size 1 (``[1, seq]`` token ids and
mask). :func:`batch_graph` rewrites such a graph so that B queries stacked on dimension 0
run as one execution whose row i is exactly the batch-1 graph on query i: every
protocol round is shared by the B queries, and nothing mixes rows.

How it decides. Every value gets a *batch state*:

* ``U`` -- unbatched: the same for every query (weights, constants, anything computed
  from them or from shape literals only);
* ``B`` -- batched: axis 0 is the batch (size 1 at capture, B after the rewrite); row i
  depends on query i only;
* ``IDX`` -- a batch index: ``arange(batch)`` on axis 0 (transformers builds one to index the
  padding mask per query; captured as ``arange(1)``).

Graph inputs are ``B``; each op has a rule that says which states of its arguments keep
the invariant (elementwise ops broadcast; reductions, views, transposes, concatenations
and slices must not touch axis 0; matrix products contract inner dimensions only;
``index`` must index axis 0 with the batch index) and what its output is. Shape literals
whose leading entry is the batch (``view``, ``reshape``, ``expand``, the secure
embedding's ``shape``) are rewritten from 1 to B, the batch index's ``arange(1)`` to
``arange(B)``, and every batched value's spec gets B in front. An op without a rule, or a
rule whose conditions fail, refuses the whole graph (:class:`BatchingError`, naming the
node, the op and the module): a graph is batched exactly, or not at all. The result is
then checked by shape propagation (every node run on ``meta`` tensors, or by its secure
form's shape rule) against the specs the rewrite wrote.

By induction over the nodes, every ``B`` value's row i equals the batch-1 value on query
i and every ``U`` value is unchanged, so the outputs (which must all be ``B``) split back
into the B answers. Imports the IR and the registry only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from secure.graph.ir import Graph, Node, Ref, Spec, resolve_refs
from secure.graph.registry import DTYPES, OPS

U, B, IDX = "U", "B", "I"
"""Batch states: unbatched, batched on axis 0, the batch index (see the module docstring)."""

MAX_BATCH = 64
"""The largest batch a graph is derived for (a bound on memory per execution)."""

_ELEMENTWISE = frozenset({
    "aten.add.Tensor", "aten.sub.Tensor", "aten.rsub.Scalar", "aten.mul.Tensor", "aten.div.Tensor",
    "aten.neg.default", "aten.pow.Tensor_Scalar", "aten.__and__.Tensor", "aten.__or__.Tensor",
    "aten.bitwise_not.default", "aten.clamp.default", "aten.cos.default", "aten.sin.default",
    "aten.tanh.default", "aten.gelu.default", "aten.silu.default", "aten.rsqrt.default", "aten.ge.Scalar",
    "aten.le.Tensor", "aten.lt.Scalar", "aten.gt.Scalar", "aten.eq.Scalar", "aten.ne.Scalar", "aten.gt.Tensor",
    "aten.lt.Tensor", "aten.ge.Tensor", "aten.where.ScalarOther", "aten.where.self", "aten.masked_fill.Scalar",
    "aten._to_copy.default", "aten.clone.default", "aten.alias.default", "aten.detach.default",
    "aten.contiguous.default", "secure.gelu", "secure.silu", "secure.tanh", "secure.rsqrt",
})
"""Ops whose output element depends only on the elements of its (broadcast) arguments at
the same position."""

_LITERAL_SHAPED = frozenset({"aten.new_ones.default", "aten.zeros.default", "aten.full.default"})
"""Ops whose output is made from literal sizes and values only (never from a query)."""

_SIZE_ARG = {"aten.view.default": "size", "aten._unsafe_view.default": "size", "aten.reshape.default": "shape",
             "aten.expand.default": "size"}


class BatchingError(ValueError):
    """The graph cannot be batched exactly; the message names the node, the op and the module."""


def batch_graph(graph: Graph, batch: int) -> Graph:
    """A copy of ``graph`` (captured at batch 1) that runs ``batch`` queries stacked on
    dimension 0; row i of every output is the batch-1 graph's output on query i.

    Raises :class:`BatchingError` when some op could mix queries or cannot be rewritten
    (see the module docstring), or when shape propagation disagrees with the rewrite.
    ``batch == 1`` returns a checked copy of the graph itself."""
    if not 1 <= batch <= MAX_BATCH:
        raise BatchingError(f"batch size {batch} is outside 1..{MAX_BATCH}")
    out = copy.deepcopy(graph)
    rules = _Rules(graph)
    for spec in out.inputs:
        if spec.kind == "state":
            raise BatchingError(f"input {spec.name!r} is party state (a generation cache): only stateless graphs "
                                "are batched")
        if not spec.spec.shape or spec.spec.shape[0] != 1:
            raise BatchingError(f"input {spec.name!r} has shape {spec.spec.shape}: a batched graph needs every "
                                "input captured with a leading batch dimension of 1")
        rules.states[spec.name] = B
        # specs and argument lists may be shared between values: replaced, never edited in place
        spec.spec = Spec([batch, *spec.spec.shape[1:]], spec.spec.dtype)
    for node in out.nodes:
        where = f"node {node.name} ({node.op}) in {node.origin or 'top level'}"
        try:
            state = rules.state_of(node)
        except BatchingError as e:
            raise BatchingError(f"{where}: {e}") from None
        rules.states[node.name] = state
        if state == U:
            continue
        if node.op in _SIZE_ARG or node.op == "secure.embedding":
            _rewrite_size(node, batch)
        elif node.op == "aten.arange.default":
            _set_arg(node, 0, "end", batch)
        if state in (B, IDX) and node.spec is not None:
            if not node.spec.shape or node.spec.shape[0] != 1:
                raise BatchingError(f"{where}: batched value of captured shape {node.spec.shape} does not lead "
                                    "with the batch dimension")
            node.spec = Spec([batch, *node.spec.shape[1:]], node.spec.dtype)
    for name in out.outputs:
        if rules.states.get(name) != B:
            raise BatchingError(f"output {name!r} is not batched on dimension 0: its rows cannot be split between "
                                "the queries")
    check_shapes(out)
    out.meta = {**out.meta, "batch": batch}
    return out


# ---- the rules ------------------------------------------------------------------------------
_SPLIT = "B*"
"""State of a split's list of parts, each batched."""

_NAMES = {U: "unbatched", B: "batched", IDX: "the batch index", _SPLIT: "a list of parts"}


class _Rules:
    """Batch states of a graph's values, node by node, with the ranks captured at batch 1."""

    def __init__(self, graph: Graph) -> None:
        self.states: dict[str, str] = {name: U for name in (*graph.weights, *graph.constants)}
        self.ranks: dict[str, int] = {i.name: len(i.spec.shape) for i in graph.inputs}
        self.ranks.update({k: len(v.shape) for k, v in graph.weights.items()})
        self.ranks.update({k: v.dim() for k, v in graph.constants.items()})
        self.ranks.update({n.name: len(n.spec.shape) for n in graph.nodes if n.spec is not None})

    def rank(self, ref: Any) -> int:
        if not isinstance(ref, Ref) or ref.name not in self.ranks:
            raise BatchingError(f"the rank of {ref!r} is not known")
        return self.ranks[ref.name]

    def state(self, ref: Any) -> str:
        return self.states[ref.name] if isinstance(ref, Ref) else U

    def require(self, ref: Any, state: str, what: str) -> None:
        if self.state(ref) != state:
            raise BatchingError(f"{what} ({getattr(ref, 'name', ref)}) is {_NAMES[self.state(ref)]}, batching "
                                f"needs it {_NAMES[state]}")

    def row_wise(self, x: Any, min_rank: int = 1) -> str:
        """The output state of an op that works on each row of ``x`` alone."""
        state = self.state(x)
        if state not in (U, B):
            raise BatchingError(f"{getattr(x, 'name', x)} ({_NAMES[state]}) is used as data")
        if state == B and self.rank(x) < min_rank:
            raise BatchingError(f"batched {x.name} has rank below {min_rank}: the op would work along the batch")
        return state

    def state_of(self, node: Node) -> str:
        """The batch state of ``node``'s output; BatchingError where no rule keeps rows apart."""
        op = node.op
        if op == "aten.arange.default":
            plain = "start" not in node.kwargs and "step" not in node.kwargs and len(node.args) == 1
            # transformers' per-query index into the padding mask; any other use of it is refused
            return IDX if plain and _arg(node, 0, "end") == 1 else U
        if op in _LITERAL_SHAPED or all(self.states[r] == U for r in node.refs()):
            return U
        rank = len(node.spec.shape) if node.spec is not None else -1
        if op in _ELEMENTWISE or op == "aten.type_as.default":
            first_only = op in ("aten.type_as.default", "aten._to_copy.default")
            return self.elementwise([node.args[0]] if first_only else _tensor_args(node), rank)
        handler = _HANDLERS.get(op)
        if handler is None:
            raise BatchingError("no batching rule for this op on a batched value")
        return handler(self, node, rank)

    def elementwise(self, tensors: list[Any], rank: int) -> str:
        out = U
        for ref in tensors:
            state = self.state(ref)
            if state not in (U, B):
                raise BatchingError(f"{ref.name} ({_NAMES[state]}) is used arithmetically")
            if state == B:
                if self.rank(ref) != rank:
                    raise BatchingError(f"batched {ref.name} broadcasts into a higher rank: its batch axis would "
                                        "move")
                out = B
        return out

    def not_axis0(self, dims: list[Any], rank: int, what: str) -> None:
        for d in dims:
            if not isinstance(d, int) or isinstance(d, bool):
                raise BatchingError(f"dimension {d!r} is not a literal integer")
            if rank <= 0 or d % rank == 0:
                raise BatchingError(f"the op {what} the batch dimension")


def _layer_norm(r: _Rules, node: Node, rank: int) -> str:
    r.require(_arg(node, 1, "gamma", None), U, "LayerNorm's gamma")
    r.require(_arg(node, 2, "beta", None), U, "LayerNorm's beta")
    return r.row_wise(_arg(node, 0, "x"), min_rank=2)


def _rms_norm(r: _Rules, node: Node, rank: int) -> str:
    r.require(_arg(node, 1, "gamma", None), U, "RMSNorm's gamma")
    return r.row_wise(_arg(node, 0, "x"), min_rank=2)


def _softmax(r: _Rules, node: Node, rank: int) -> str:
    x = _arg(node, 0, "x")
    r.require(x, B, "the softmax input")
    if node.op == "secure.attention":
        values = _arg(node, 2, "values")
        r.require(values, B, "the attention's values")
        if r.rank(values) != r.rank(x):
            raise BatchingError("the attention's values and scores differ in rank: their batch axes would not line up")
    for what, ref in (("mask", _arg(node, 1, "mask", None)), ("bias", node.kwargs.get("bias"))):
        if r.state(ref) != U:
            r.require(ref, B, f"the softmax {what}")
            if r.rank(ref) != r.rank(x):
                raise BatchingError(f"the softmax {what} and input differ in rank: their batch axes would not "
                                    "line up")
    return r.row_wise(x, min_rank=2)


def _linear(r: _Rules, node: Node, rank: int) -> str:
    r.require(_arg(node, 1, "weight"), U, "the weight")
    r.require(_arg(node, 2, "bias", None), U, "the bias")
    return r.row_wise(_arg(node, 0, "input"), min_rank=2)


def _linears(r: _Rules, node: Node, rank: int) -> str:
    """``secure.linears``: several linear layers of one input (a list of outputs, each row-wise)."""
    for ref in node.args[1:]:
        r.require(ref, U, "a weight or bias")
    return _SPLIT if r.row_wise(node.args[0], min_rank=2) == B else U


def _product(r: _Rules, node: Node, a: Any, b: Any, rank: int) -> str:
    sa, sb = r.state(a), r.state(b)
    if not {sa, sb} <= {U, B}:
        raise BatchingError("a batch index or a list in a matrix product")
    if sb == B and (r.rank(b) < 3 or r.rank(b) != rank):
        raise BatchingError("the right operand's batch dimension would be contracted")
    if sa == B and (r.rank(a) < 2 or r.rank(a) != rank):
        raise BatchingError("the left operand's batch dimension would move")
    if sa == B and r.rank(a) == 2 and sb == B:
        raise BatchingError("a product of two batched matrices contracts the batch")
    if node.op == "aten.bmm.default" and sa != sb:
        raise BatchingError("bmm of a batched and an unbatched operand")
    return B


def _matmul(r: _Rules, node: Node, rank: int) -> str:
    second = "other" if node.op == "aten.matmul.default" else "mat2"
    return _product(r, node, _arg(node, 0, "self"), _arg(node, 1, second), rank)


def _addmm(r: _Rules, node: Node, rank: int) -> str:
    r.require(_arg(node, 0, "self"), U, "addmm's bias")
    return _product(r, node, _arg(node, 1, "mat1"), _arg(node, 2, "mat2"), rank)


def _reduction(r: _Rules, node: Node, rank: int) -> str:
    x = _arg(node, 0, "self")
    dims = _arg(node, 1, "dim", None)
    if dims is None or dims == []:
        raise BatchingError("a reduction over every dimension adds the queries together")
    r.not_axis0(dims if isinstance(dims, list) else [dims], r.rank(x), "reduces over")
    return r.row_wise(x)


def _cumsum(r: _Rules, node: Node, rank: int) -> str:
    r.not_axis0([_arg(node, 1, "dim")], rank, "accumulates along")
    return r.row_wise(_arg(node, 0, "self"))


def _resize(r: _Rules, node: Node, rank: int) -> str:
    x, size = _arg(node, 0, "self"), _arg(node, 1, _SIZE_ARG[node.op])
    r.require(x, B, "the reshaped value")
    if not isinstance(size, list) or not size or not all(isinstance(s, int) for s in size):
        raise BatchingError(f"sizes {size!r} are not literal integers")
    inferred_other = size[0] == -1 and (node.spec is None or node.spec.shape[:1] != [1])
    if size[0] not in (1, -1) or inferred_other:
        raise BatchingError(f"sizes {size} fold the batch dimension into another one")
    if node.op == "aten.expand.default" and len(size) != r.rank(x):
        raise BatchingError("an expand that adds leading dimensions moves the batch dimension")
    return B


def _transpose(r: _Rules, node: Node, rank: int) -> str:
    r.not_axis0([_arg(node, 1, "dim0"), _arg(node, 2, "dim1")], rank, "swaps")
    return r.row_wise(_arg(node, 0, "self"))


def _permute(r: _Rules, node: Node, rank: int) -> str:
    dims = _arg(node, 1, "dims")
    if not isinstance(dims, list) or not dims or not isinstance(dims[0], int) or dims[0] % rank != 0:
        raise BatchingError(f"permutation {dims} moves the batch dimension")
    return r.row_wise(_arg(node, 0, "self"))


def _unsqueeze(r: _Rules, node: Node, rank: int) -> str:
    x = _arg(node, 0, "self")
    r.not_axis0([_arg(node, 1, "dim")], rank, "inserts a dimension before")
    return IDX if r.state(x) == IDX else r.row_wise(x)


def _along(dim_index: int, split: bool = False) -> Callable[[_Rules, Node, int], str]:
    """An op that works along one dimension (or a list: ``squeeze.dims``) of its first argument."""
    def rule(r: _Rules, node: Node, rank: int) -> str:
        x = _arg(node, 0, "self")
        dim = _arg(node, dim_index, "dim", 0)
        r.not_axis0(dim if isinstance(dim, list) else [dim], r.rank(x), "works along")
        if node.op == "aten.index_select.default":
            r.require(_arg(node, 2, "index"), U, "the index")
        state = r.row_wise(x)
        return _SPLIT if split and state == B else state
    return rule


def _flatten(r: _Rules, node: Node, rank: int) -> str:
    x = _arg(node, 0, "self")
    start = _arg(node, 1, "start_dim", 0)
    if not isinstance(start, int) or start % r.rank(x) == 0:
        raise BatchingError("flattening from dimension 0 folds the batch into another dimension")
    return r.row_wise(x)


def _getitem(r: _Rules, node: Node, rank: int) -> str:
    if r.state(_arg(node, 0, "value")) != _SPLIT:
        raise BatchingError("an element of a batched value that is not a split")
    return B


def _cat(r: _Rules, node: Node, rank: int) -> str:
    parts = _arg(node, 0, "tensors")
    if not isinstance(parts, list) or {r.state(p) for p in parts} != {B}:
        raise BatchingError("concatenating batched with unbatched values")
    r.not_axis0([_arg(node, 1, "dim", 0)], rank, "concatenates along")
    return B


def _lookup(r: _Rules, node: Node, rank: int) -> str:
    r.require(_arg(node, 0, "weight"), U, "the table")
    r.require(_arg(node, 1, "indices"), B, "the indices")
    return B


def _secure_embedding(r: _Rules, node: Node, rank: int) -> str:
    r.require(_arg(node, 0, "table"), U, "the table")
    r.require(_arg(node, 1, "ids"), B, "the token ids")
    shape = node.kwargs.get("shape")
    if shape is not None and (not shape or shape[0] != 1):
        raise BatchingError(f"embedding shape {shape} does not lead with the batch dimension")
    return B


def _gather(r: _Rules, node: Node, rank: int) -> str:
    r.require(_arg(node, 0, "self"), B, "the gathered value")
    r.require(_arg(node, 2, "index"), B, "the gather index")
    r.not_axis0([_arg(node, 1, "dim")], rank, "gathers along")
    return B


def _index(r: _Rules, node: Node, rank: int) -> str:
    """``x[i0, i1, ...]`` with tensor indices: batched exactly when x is batched and i0 is the
    batch index at the broadcast indices' full rank (so row i reads row i of x)."""
    x, indices = _arg(node, 0, "self"), _arg(node, 1, "indices")
    r.require(x, B, "the indexed value")
    if not isinstance(indices, list) or not indices or not all(isinstance(i, Ref) for i in indices):
        raise BatchingError("indices other than a list of tensors")
    r.require(indices[0], IDX, "the index of axis 0")
    if r.rank(indices[0]) != max(r.rank(i) for i in indices):
        raise BatchingError("the batch index does not lead the broadcast indices")
    for i in indices[1:]:
        r.require(i, U, "a later index")
    return B


_HANDLERS: dict[str, Callable[[_Rules, Node, int], str]] = {
    "secure.layer_norm": _layer_norm, "secure.softmax": _softmax, "secure.attention": _softmax,
    "aten.linear.default": _linear,
    "secure.linears": _linears, "secure.rms_norm": _rms_norm,
    "aten.matmul.default": _matmul, "aten.bmm.default": _matmul, "aten.mm.default": _matmul,
    "aten.addmm.default": _addmm, "aten.sum.dim_IntList": _reduction, "aten.mean.dim": _reduction,
    "aten.cumsum.default": _cumsum, "aten.view.default": _resize, "aten._unsafe_view.default": _resize,
    "aten.reshape.default": _resize, "aten.expand.default": _resize, "aten.transpose.int": _transpose,
    "aten.permute.default": _permute, "aten.unsqueeze.default": _unsqueeze,
    "aten.squeeze.dim": _along(1), "aten.squeeze.dims": _along(1), "aten.slice.Tensor": _along(1),
    "aten.select.int": _along(1), "aten.unflatten.int": _along(1), "aten.index_select.default": _along(1),
    "aten.split.Tensor": _along(2, split=True), "aten.split_with_sizes.default": _along(2, split=True),
    "aten.chunk.default": _along(2, split=True), "aten.flatten.using_ints": _flatten, "getitem": _getitem,
    "aten.cat.default": _cat, "aten.embedding.default": _lookup, "secure.embedding": _secure_embedding,
    "aten.gather.default": _gather, "aten.index.Tensor": _index,
}
"""Rules of the ops that may see a batched value, beyond the elementwise ones."""


def _arg(node: Node, index: int, name: str, default: Any = ...) -> Any:
    """Argument ``name`` of ``node`` (positional ``index`` or keyword)."""
    if index < len(node.args):
        return node.args[index]
    if name in node.kwargs:
        return node.kwargs[name]
    if default is ...:
        raise BatchingError(f"missing argument {name!r}")
    return default


def _set_arg(node: Node, index: int, name: str, value: Any) -> None:
    if index < len(node.args):
        node.args = [*node.args[:index], value, *node.args[index + 1:]]
    else:
        node.kwargs = {**node.kwargs, name: value}


def _rewrite_size(node: Node, batch: int) -> None:
    """The leading size literal from 1 to ``batch`` (a -1 infers it and stays)."""
    if node.op == "secure.embedding":
        shape = node.kwargs.get("shape")
        if shape is not None:
            node.kwargs = {**node.kwargs, "shape": [batch, *shape[1:]]}
        return
    name = _SIZE_ARG[node.op]
    size = _arg(node, 1, name)
    if size[0] == 1:
        _set_arg(node, 1, name, [batch, *size[1:]])


def _tensor_args(node: Node) -> list[Ref]:
    return [v for v in [*node.args, *node.kwargs.values()] if isinstance(v, Ref)]


# ---- shape propagation -----------------------------------------------------------------------
_ENUMS: dict[str, dict[str, Any]] = {
    "memory_format": {str(f): f for f in (torch.contiguous_format, torch.preserve_format, torch.channels_last,
                                          torch.channels_last_3d)},
    "layout": {str(torch.strided): torch.strided},
}
_FACTORIES = frozenset({"aten.arange.default", "aten.zeros.default", "aten.full.default", "aten.new_ones.default"})


def check_shapes(graph: Graph) -> None:
    """Propagate shapes through ``graph`` on ``meta`` tensors (secure forms by their shape
    rules) and compare every node's with its spec; BatchingError on the first disagreement."""
    env: dict[str, Any] = {}
    for spec in graph.inputs:
        env[spec.name] = _meta(spec.spec)
    for name, spec in graph.weights.items():
        env[name] = _meta(spec)
    for name, value in graph.constants.items():
        env[name] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    for node in graph.nodes:
        try:
            value = _propagate(node, env)
        except BatchingError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means the rewrite is inconsistent
            raise BatchingError(f"shape propagation fails at node {node.name} ({node.op}) in "
                                f"{node.origin or 'top level'}: {type(e).__name__}: {e}") from None
        env[node.name] = value
        if node.spec is not None and isinstance(value, torch.Tensor) and list(value.shape) != node.spec.shape:
            raise BatchingError(f"node {node.name} ({node.op}) in {node.origin or 'top level'}: shape propagation "
                                f"gives {list(value.shape)}, the rewrite says {node.spec.shape}")


def _meta(spec: Spec) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=DTYPES[spec.dtype.removeprefix("torch.")], device="meta")


def _propagate(node: Node, env: dict[str, Any]) -> Any:
    args = resolve_refs(node.args, env)
    kwargs = resolve_refs(node.kwargs, env)
    if node.op.startswith("secure."):
        return _secure_shape(node, args, kwargs)
    if node.op in ("aten.view.default", "aten._unsafe_view.default"):
        # the interpreter runs views as reshapes (shares need not be contiguous)
        return args[0].reshape(args[1])
    spec = OPS[node.op]
    assert spec.fn is not None
    kwargs = {k: _ENUMS[k].get(v, v) if k in _ENUMS and isinstance(v, str) else v for k, v in kwargs.items()}
    if node.op in _FACTORIES:
        kwargs["device"] = "meta"
    if node.op == "aten._to_copy.default" and "device" in kwargs:
        kwargs["device"] = "meta"
    return spec.fn(*args, **kwargs)


_SHAPE_RULES: dict[str, Callable[[list[Any], dict[str, Any]], Any]] = {
    "secure.gelu": lambda a, k: a[0], "secure.silu": lambda a, k: a[0], "secure.tanh": lambda a, k: a[0],
    "secure.rsqrt": lambda a, k: a[0], "secure.layer_norm": lambda a, k: a[0], "secure.rms_norm": lambda a, k: a[0],
    "secure.softmax": lambda a, k: _broadcast_check(a[0], a[1] if len(a) > 1 else None, k.get("bias")),
    "secure.attention": lambda a, k: _broadcast_check(a[0], a[1], k.get("bias")).matmul(a[2]),
    "secure.embedding": lambda a, k: _embedding_shape(a[0], a[1], k.get("shape")),
    "secure.linears": lambda a, k: [a[0].matmul(w.transpose(-1, -2)) + (0 if b is None else b)
                                    for w, b in zip(a[1::2], [*a[2::2], None]) if w is not None],
}


def _secure_shape(node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
    rule = _SHAPE_RULES.get(node.op)
    if rule is None:
        raise BatchingError(f"no shape rule for {node.op}")
    return rule(args, kwargs)


def _broadcast_check(x: torch.Tensor, *others: Any) -> torch.Tensor:
    for o in others:
        if isinstance(o, torch.Tensor) and torch.broadcast_shapes(x.shape, o.shape) != x.shape:
            raise BatchingError(f"a mask of shape {list(o.shape)} does not broadcast to {list(x.shape)}")
    return x


def _embedding_shape(table: torch.Tensor, ids: torch.Tensor, shape: list[int] | None) -> torch.Tensor:
    rows = torch.empty((*ids.shape, table.shape[1]), dtype=table.dtype, device="meta")
    return rows if shape is None else rows.reshape(shape)
