"""One interpreter for rewritten graphs, over any backend of the secure-form interface.

Public nodes (masks, positions, anything computed from public values only) run in
plaintext torch: the callable that the op registry (:mod:`secure.graph.registry`) holds for
the op they name. Secret nodes run through the backend (``SecureOps``): plaintext floats
(:class:`FloatOps`), fixed-point simulation or the three-party engine (:class:`MpcOps`, one
interpreter per party in lockstep), dispatched by op name in :data:`SECRET_HANDLERS`. No op
name is ever resolved with ``getattr``: an op that is in neither table does not run.

Client token ids arrive already one-hot (the client builds and shares its own one-hot,
see ``secure.mpc.embedding``); :func:`client_input` prepares them for a float backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch

from secure.approx.gelu import even_gelu, even_silu, poly_gelu, puma_gelu, puma_silu
from secure.approx.interface import SecureOps
from secure.approx.norms import layer_norm, rms_norm
from secure.approx.reciprocal import reciprocal, rsqrt
from secure.approx.softmax import MASK_BIAS_FLOOR, power_softmax, puma_softmax
from secure.approx.tanh import tanh
from secure.graph.ir import Graph, Node, Ref, resolve_refs
from secure.graph.registry import OPS

Trace = Callable[[Node], AbstractContextManager]


class InterpreterError(RuntimeError):
    """A node could not be executed; the message names the node and its module."""


def no_trace(node: Node) -> AbstractContextManager:
    return contextlib.nullcontext()


SecretHandler = Callable[["Interpreter", Node, list[Any], dict[str, Any]], Any]
"""Runs one secret node: (interpreter, node, argument values, environment) -> value."""

SECRET_HANDLERS: dict[str, SecretHandler] = {}
"""The ops that may run on secret values, by registry name (filled by :func:`_secret_op`)."""


def _secret_op(*names: str) -> Callable[[SecretHandler], SecretHandler]:
    """Register the decorated method as the secret handler of ``names`` (registry ops)."""
    def register(fn: SecretHandler) -> SecretHandler:
        for name in names:
            if name not in OPS:
                raise RuntimeError(f"secret handler for {name!r}, which is not in the op registry")
            SECRET_HANDLERS[name] = fn
        return fn
    return register


class Interpreter:
    """Runs a Graph on one backend.

    ``trace(node)`` returns a context manager around each secret node (the profiler uses
    it for per-layer breakdowns). With ``ops=None`` every node runs in plain torch: the
    exact reference of an unrewritten graph, node by node.
    """

    def __init__(self, graph: Graph, ops: SecureOps | None, trace: Trace = no_trace) -> None:
        self.graph = graph
        self.ops = ops
        self.trace = trace
        # without a backend every node runs as plain torch: the exact reference of a graph
        self.secret = graph.secret_names() if ops is not None else set()

    def run(self, weights: dict[str, Any], inputs: dict[str, Any],
            observe: Iterable[str] = ()) -> tuple[list[Any], dict[str, Any]]:
        """Execute; returns (outputs, {name: value for each observed name})."""
        missing = [i.name for i in self.graph.inputs if i.name not in inputs]
        if missing:
            raise InterpreterError(f"missing graph inputs: {missing}")
        absent = [w for w in self.graph.weights if w not in weights]
        if absent:
            raise InterpreterError(f"missing {len(absent)} weights, e.g. {absent[:3]}")
        env: dict[str, Any] = {**self.graph.constants, **weights, **inputs}
        wanted = set(observe)
        seen: dict[str, Any] = {}
        for node in self.graph.nodes:
            try:
                if node.name in self.secret:
                    with self.trace(node):
                        env[node.name] = self._secret(node, env)
                else:
                    env[node.name] = self._public(node, env)
            except InterpreterError:
                raise
            except Exception as e:
                raise InterpreterError(f"node {node.name} ({node.op}) in {node.origin or 'top level'}: "
                                       f"{type(e).__name__}: {e}") from e
            if node.name in wanted:
                seen[node.name] = env[node.name]
        return [env[o] for o in self.graph.outputs], seen

    # ---- public nodes: plaintext torch ---------------------------------------------
    def _public(self, node: Node, env: dict[str, Any]) -> Any:
        spec = OPS.get(node.op)
        if spec is None or spec.fn is None:
            why = "a secure form runs on secret values only" if spec else "not in the op registry"
            raise InterpreterError(f"node {node.name} ({node.op}) in {node.origin or 'top level'}: {why}")
        kwargs = {k: _torch_enum(k, v) for k, v in resolve_refs(node.kwargs, env).items()}
        return spec.fn(*resolve_refs(node.args, env), **kwargs)

    # ---- secret nodes: the backend ---------------------------------------------------
    def _is_secret(self, a: Any) -> bool:
        return isinstance(a, Ref) and a.name in self.secret

    def _secret(self, node: Node, env: dict[str, Any]) -> Any:
        handler = SECRET_HANDLERS.get(node.op)
        if handler is None:
            raise InterpreterError(f"no secure implementation of {node.op} (node {node.name}, in "
                                   f"{node.origin or 'top level'})")
        val = [env[x.name] if isinstance(x, Ref) else resolve_refs(x, env) for x in node.args]
        return handler(self, node, val, env)

    # ---- secret handlers: linear algebra and arithmetic ------------------------------
    @_secret_op("aten.linear.default")
    def _linear(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        a, ops = node.args, self.ops
        x, w = self._secret_value(a[0], val[0]), self._secret_value(a[1], val[1])
        y = ops.matmul(x, ops.map_shape(w, lambda t: t.transpose(-1, -2)))
        return y if len(val) < 3 or val[2] is None else self._add(y, val[2], a[2])

    @_secret_op("secure.linears")
    def _linears(self, node: Node, val: list[Any], env: dict[str, Any]) -> list[Any]:
        """Two or three linear layers of one input in one pass of products: [x W_i^T + b_i]."""
        a, ops = node.args, self.ops
        x = self._secret_value(a[0], val[0])
        slots = [(k, k + 1) for k in range(1, len(val), 2) if val[k] is not None]
        ws = [ops.map_shape(self._secret_value(a[w], val[w]), lambda t: t.transpose(-1, -2)) for w, _ in slots]
        ys = ops.matmul_many([(x, w) for w in ws])
        return [y if b >= len(val) or val[b] is None else self._add(y, val[b], a[b]) for y, (_, b) in zip(ys, slots)]

    @_secret_op("aten.matmul.default", "aten.bmm.default", "aten.mm.default")
    def _matmul(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        a = node.args
        return self.ops.matmul(self._secret_value(a[0], val[0]), self._secret_value(a[1], val[1]))

    @_secret_op("aten.addmm.default")
    def _addmm(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        a = node.args
        prod = self.ops.matmul(self._secret_value(a[1], val[1]), self._secret_value(a[2], val[2]))
        return self._add(prod, val[0], a[0])

    @_secret_op("aten.add.Tensor")
    def _add_tensor(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        a, alpha = node.args, node.kwargs.get("alpha", 1)
        y = val[1] if alpha == 1 else self._scale(val[1], a[1], alpha)
        return self._add(val[0], y, a[1], a[0])

    @_secret_op("aten.sub.Tensor")
    def _sub_tensor(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        a, alpha = node.args, node.kwargs.get("alpha", 1)
        return self._add(val[0], self._scale(val[1], a[1], -alpha), a[1], a[0])

    @_secret_op("aten.rsub.Scalar")
    def _rsub(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return self.ops.add_public(self.ops.neg(val[0]), float(val[1]))

    @_secret_op("aten.neg.default")
    def _neg(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return self.ops.neg(val[0])

    @_secret_op("aten.mul.Tensor")
    def _mul(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        a = node.args
        if self._is_secret(a[0]) and self._is_secret(a[1]):
            return self.ops.mul(val[0], val[1])
        s, p = (val[0], val[1]) if self._is_secret(a[0]) else (val[1], val[0])
        return self.ops.mul_public(s, _public_number(p))

    @_secret_op("aten.div.Tensor")
    def _div(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        a = node.args
        if self._is_secret(a[1]):
            return self.ops.mul(self._secret_value(a[0], val[0]), reciprocal(self.ops, val[1]))
        return self.ops.mul_public(val[0], 1.0 / _public_number(val[1]))

    @_secret_op("aten.sum.dim_IntList", "aten.mean.dim")
    def _sum(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        ops = self.ops
        dims = val[1] if isinstance(val[1], list) else [val[1]]
        keep = bool(val[2]) if len(val) > 2 else bool(node.kwargs.get("keepdim", False))
        rank = len(ops.shape(val[0]))
        out, count = val[0], 1
        for d in sorted((d % rank for d in dims), reverse=True):
            count *= ops.shape(out)[d]
            out = ops.sum(out, d, keep)
        return ops.mul_public(out, 1.0 / count) if node.op == "aten.mean.dim" else out

    @_secret_op("aten.pow.Tensor_Scalar")
    def _pow(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        k = val[1]
        if not (isinstance(k, int) or float(k).is_integer()) or int(k) < 1:
            raise InterpreterError(f"node {node.name}: pow with exponent {k} on a secret; "
                                   "only positive integer powers are supported")
        out = val[0]
        for _ in range(int(k) - 1):
            out = self.ops.mul(out, val[0])
        return out

    @_secret_op("aten.cat.default")
    def _cat(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        parts = [self._secret_value(r, v) for r, v in zip(node.args[0], val[0])]
        return self.ops.concat(parts, val[1] if len(val) > 1 else 0)

    # ---- secret handlers: the secure forms -------------------------------------------
    @_secret_op("secure.gelu")
    def _gelu(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        form = node.kwargs.get("form", "puma")  # graphs dealt before forms existed: PUMA's
        if form == "poly":
            return poly_gelu(self.ops, val[0], node.kwargs["bound"], node.kwargs["degree"])
        if form == "even":
            return even_gelu(self.ops, val[0], node.kwargs.get("magnitude"))
        if form == "puma":
            return puma_gelu(self.ops, val[0], node.kwargs.get("magnitude"))
        raise InterpreterError(f"node {node.name}: unknown GeLU form {form!r} (puma, even or poly)")

    @_secret_op("secure.silu")
    def _silu(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        form = node.kwargs.get("form", "puma")  # graphs dealt before forms existed: PUMA's
        if form == "even":
            return even_silu(self.ops, val[0], node.kwargs.get("magnitude"))
        if form == "puma":
            return puma_silu(self.ops, val[0], node.kwargs.get("magnitude"))
        raise InterpreterError(f"node {node.name}: unknown SiLU form {form!r} (puma or even)")

    @_secret_op("secure.tanh")
    def _tanh(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return tanh(self.ops, val[0])

    @_secret_op("secure.rsqrt")
    def _rsqrt(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return rsqrt(self.ops, val[0])

    @_secret_op("secure.layer_norm")
    def _layer_norm(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        var_range = node.kwargs.get("variance_range")
        return layer_norm(self.ops, val[0], val[1], val[2], eps=node.kwargs["eps"],
                          newton_iterations=node.kwargs.get("newton_iterations", 0),
                          variance_range=None if var_range is None else tuple(var_range))

    @_secret_op("secure.rms_norm")
    def _rms_norm(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return rms_norm(self.ops, val[0], val[1], eps=node.kwargs["eps"])

    @_secret_op("secure.embedding")
    def _embedding(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        """The client's one-hot (*ids, V) @ table (V, H)."""
        rows = self.ops.matmul(val[1], val[0])
        shape = node.kwargs.get("shape")
        return rows if shape is None else self.ops.map_shape(rows, lambda t: t.reshape(shape))

    def _secret_value(self, ref: Any, value: Any) -> Any:
        return value if self._is_secret(ref) else self.ops.from_public(_as_float(value))

    def _add(self, x: Any, y: Any, y_ref: Any, x_ref: Any = None) -> Any:
        x_secret = x_ref is None or self._is_secret(x_ref)
        y_secret = self._is_secret(y_ref)
        if x_secret and y_secret:
            return self.ops.add(x, y)
        if x_secret:
            return self.ops.add_public(x, _public_number(y))
        return self.ops.add_public(y, _public_number(x))

    def _scale(self, v: Any, ref: Any, factor: float) -> Any:
        if self._is_secret(ref):
            return self.ops.mul_public(v, float(factor))
        return v * factor

    # ---- secret handlers: shapes, copies and lookups (local on every backend) ---------
    @_secret_op("getitem")
    def _getitem(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return val[0][val[1]]

    @_secret_op("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default")
    def _split(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        ops, fn, x = self.ops, OPS[node.op].fn, val[0]
        count = len(fn(torch.empty(ops.shape(x), device="meta"), *val[1:]))
        return [ops.map_shape(x, lambda t, i=i: fn(t, *val[1:])[i]) for i in range(count)]

    @_secret_op("aten.embedding.default")
    def _public_lookup(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        """Public indices into a secret table."""
        idx = torch.as_tensor(val[1]).long()
        return self.ops.map_shape(val[0], lambda t: t[idx.to(t.device)])

    @_secret_op("aten.index_select.default")
    def _index_select(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        idx = torch.as_tensor(val[2]).long()
        return self.ops.map_shape(val[0], lambda t: t.index_select(val[1], idx.to(t.device)))

    @_secret_op("aten._to_copy.default")
    def _to_copy(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        dtype = node.kwargs.get("dtype")
        if dtype is not None and not dtype.is_floating_point:
            raise InterpreterError(f"node {node.name}: converting a secret to {dtype}")
        return val[0]

    @_secret_op("aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.contiguous.default")
    def _same(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return val[0]

    @_secret_op("aten.view.default", "aten._unsafe_view.default")
    def _view(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        return self.ops.map_shape(val[0], lambda t: t.reshape(val[1]))

    @_secret_op("aten.reshape.default", "aten.transpose.int", "aten.permute.default", "aten.unsqueeze.default",
                "aten.squeeze.dim", "aten.squeeze.dims", "aten.expand.default", "aten.slice.Tensor",
                "aten.select.int", "aten.t.default", "aten.flatten.using_ints", "aten.unflatten.int")
    def _reshape(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        """A shape op applied to every share (its registry callable, public arguments)."""
        fn, rest, kwargs = OPS[node.op].fn, val[1:], resolve_refs(node.kwargs, env)
        return self.ops.map_shape(val[0], lambda t: fn(t, *rest, **kwargs))

    # ---- secret handlers: softmax ----------------------------------------------------
    @_secret_op("secure.softmax")
    def _softmax(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        x, keep, magnitude = self._masked_scores(node, val[0], val[1], env)
        kw = node.kwargs
        if kw["kind"] == "power":
            return power_softmax(self.ops, x, p=kw["p"], eps=kw["eps"],
                                 mask=None if keep is None else keep.to(torch.float64),
                                 upper=kw["upper"], iterations=kw["iterations"],
                                 normalize=kw.get("normalize", False))
        return puma_softmax(self.ops, x, mask_bias=_mask_bias(keep), magnitude=magnitude, **_puma_kwargs(kw))

    @_secret_op("secure.attention")
    def _attention(self, node: Node, val: list[Any], env: dict[str, Any]) -> Any:
        """softmax(scores) @ values in one form (the rows normalised after the product)."""
        x, keep, magnitude = self._masked_scores(node, val[0], val[1], env)
        if node.kwargs["kind"] != "puma":
            raise InterpreterError(f"node {node.name}: secure.attention takes PUMA's softmax, "
                                   f"not {node.kwargs['kind']!r}")
        return puma_softmax(self.ops, x, mask_bias=_mask_bias(keep), values=val[2], magnitude=magnitude,
                            **_puma_kwargs(node.kwargs))

    def _masked_scores(self, node: Node, x: Any, mask: Any, env: dict[str, Any]
                       ) -> tuple[Any, torch.Tensor | None, float | None]:
        """The scores with any finite additive bias added, the public keep mask (the mask
        input, the causal triangle and the bias's masked entries together), and a bound on
        the returned scores' magnitude: the node's ``magnitude`` (:mod:`secure.graph.bounds`)
        plus the largest finite bias added, or None without one."""
        kw = node.kwargs
        magnitude = kw.get("magnitude")
        shape = self.ops.shape(x)
        keep = None if mask is None else torch.as_tensor(mask).to(torch.bool)
        if kw.get("causal"):
            q, k = shape[-2], shape[-1]
            tril = torch.ones(q, k, dtype=torch.bool).tril(diagonal=k - q)
            keep = tril if keep is None else keep & tril
        if kw.get("bias") is not None:  # an additive mask: finfo.min where masked, finite biases added
            bias = torch.as_tensor(resolve_refs(kw["bias"], env)).to(torch.float64)
            allowed = bias > MASK_BIAS_FLOOR
            keep = allowed if keep is None else keep & allowed
            finite = bias.masked_fill(~allowed, 0.0)
            if bool(finite.any()):  # a bias of the scaled scores
                x = self.ops.add_public(x, finite / float(kw.get("scale", 1.0)))
                if magnitude is not None:
                    magnitude = float(magnitude) + float(finite.abs().max()) / float(kw.get("scale", 1.0))
        return x, keep, None if magnitude is None else float(magnitude)


def _mask_bias(keep: torch.Tensor | None) -> torch.Tensor | None:
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, MASK_BIAS_FLOOR)


def _puma_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {"t": kw["t"], "exp_order": kw["exp_order"], "exp_form": kw.get("exp", "limit"),
            "scale": float(kw.get("scale", 1.0)), "division": kw.get("division", "goldschmidt")}


_TORCH_ENUMS: dict[str, dict[str, Any]] = {
    "memory_format": {str(f): f for f in (torch.contiguous_format, torch.preserve_format, torch.channels_last,
                                          torch.channels_last_3d)},
    "layout": {str(torch.strided): torch.strided},
}
"""The torch enum values a captured graph names by their string (capture stores them as
strings), read back from this allow-list only."""


def _torch_enum(key: str, value: Any) -> Any:
    table = _TORCH_ENUMS.get(key)
    if table is None or not isinstance(value, str):
        return value
    if value not in table:
        raise InterpreterError(f"{key}={value!r} is not one of {sorted(table)}")
    return table[value]


def _as_float(v: Any) -> torch.Tensor:
    return torch.as_tensor(v).to(torch.float64)


def _public_number(v: Any) -> float | torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(torch.float64)
    return float(v)


def embedding_vocab(graph: Graph, name: str) -> int | None:
    """Vocabulary size if input ``name`` holds token ids for a secure embedding, else None."""
    for n in graph.nodes:
        if n.op == "secure.embedding" and isinstance(n.args[1], Ref) and n.args[1].name == name:
            return graph.weights[n.args[0].name].shape[0]
    return None


def client_input(graph: Graph, name: str, value: torch.Tensor) -> torch.Tensor:
    """The float form of a client input: a one-hot matrix for token ids that feed
    ``secure.embedding``, else the float tensor itself."""
    vocab = embedding_vocab(graph, name)
    if vocab is None:
        return value.to(torch.float64)
    return torch.nn.functional.one_hot(value.long(), vocab).to(torch.float64)
