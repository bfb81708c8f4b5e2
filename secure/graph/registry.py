"""The op registry: every operation a graph may name, and the dtypes it may mention.

This is the IR's allow-list (:func:`secure.graph.ir.Graph.from_json` refuses anything
else) and the base of the interpreter's dispatch: a public node runs the callable written
out here, never one looked up from a name that came from a file. Entries:

* the aten overloads that capture (``torch.export`` of the models in ``secure.models``:
  MiniLM, BERT, DistilBERT, GPT-2, LLaMA) and the rewrite passes produce, each the explicit
  ``torch.ops.aten`` object; their parameters (names, which are keyword-only, which are
  required) come from the op's own schema;
* ``getitem`` (``operator.getitem``, the element of a multi-output op such as ``split``);
* the secure forms (``secure.gelu``, ...) introduced by ``secure.graph.passes``: no public
  callable, secret values only, their parameters and argument kinds written out.

Adding an op: append its ``aten.<name>.<overload>`` object to :data:`_ATEN` (and give it a
secret handler in ``secure.runtime.interpreter`` if it may run on secrets).

Imports torch and the standard library only: never ``secure.runtime`` (the graph layer does
not know the runtime) and never ``secure.graph.ir`` (which imports this module).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

Kind = str
"""What an argument may be, after decoding: "any" (any encodable value), "ref" (a reference
to a graph value), "ref?" (a reference or None), "int", "number" (int or float), "bool",
"str", "ints?" / "numbers?" (a list of them, or None)."""

KINDS: frozenset[Kind] = frozenset({"any", "ref", "ref?", "int", "number", "bool", "str", "ints?", "numbers?"})


@dataclass(frozen=True)
class Param:
    """One parameter of an op: how it may be passed and what it may hold."""

    name: str
    kind: Kind = "any"
    positional: bool = True   # False: keyword-only
    required: bool = False


@dataclass(frozen=True)
class OpSpec:
    """One op a graph may name. ``fn`` runs it on public (plaintext) values; None marks a
    secure form, which only the backend runs (secret values only)."""

    name: str
    fn: Callable[..., Any] | None
    params: tuple[Param, ...]

    @property
    def positional(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.positional)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


aten = torch.ops.aten

_ATEN: tuple[torch._ops.OpOverload, ...] = (
    # linear algebra and arithmetic
    aten.linear.default, aten.matmul.default, aten.bmm.default, aten.mm.default, aten.addmm.default,
    aten.add.Tensor, aten.sub.Tensor, aten.rsub.Scalar, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.sum.dim_IntList, aten.mean.dim, aten.pow.Tensor_Scalar, aten.cat.default,
    # nonlinear ops that the rewrite passes replace on secrets (public ones run as they are)
    aten.gelu.default, aten.silu.default, aten.rsqrt.default, aten.layer_norm.default,
    aten.softmax.int, aten._softmax.default, aten.scaled_dot_product_attention.default,
    aten.tanh.default,  # a sequence classifier's pooler (secure.tanh on secrets)
    # shapes, copies, lookups
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.clone.default, aten.alias.default,
    aten.t.default, aten._to_copy.default, aten.detach.default, aten.flatten.using_ints,
    aten.contiguous.default, aten.unflatten.int, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.embedding.default, aten.index_select.default,
    # public masks and positions (attention masks, rotary tables)
    aten.__and__.Tensor, aten.arange.default, aten.clamp.default, aten.cos.default, aten.sin.default,
    aten.gather.default, aten.ge.Scalar, aten.le.Tensor, aten.index.Tensor, aten.new_ones.default,
    aten.zeros.default, aten.where.ScalarOther, aten.where.self, aten.full.default, aten.lt.Scalar,
    aten.gt.Scalar, aten.eq.Scalar, aten.masked_fill.Scalar, aten.bitwise_not.default,
    # RoBERTa-family position ids, computed from the public mask (secure.graph.passes.positions_from_mask)
    aten.ne.Scalar, aten.cumsum.default, aten.type_as.default,
    # sliding-window masks (Mistral)
    aten.gt.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.__or__.Tensor,
)


def _aten_spec(op: torch._ops.OpOverload) -> OpSpec:
    params = tuple(Param(a.name, "any", not a.kwarg_only, not a.has_default_value())
                   for a in op._schema.arguments)
    return OpSpec(str(op), op, params)


def _x(name: str = "x") -> Param:
    return Param(name, "ref", required=True)


def _kw(name: str, kind: Kind, required: bool = False) -> Param:
    return Param(name, kind, positional=False, required=required)


_SOFTMAX_KWARGS: tuple[Param, ...] = (
    _kw("bias", "ref?"), _kw("causal", "bool"), _kw("kind", "str", required=True), _kw("t", "int"),
    _kw("exp_order", "int"), _kw("exp", "str"), _kw("division", "str"), _kw("scale", "number"), _kw("p", "int"),
    _kw("eps", "number"), _kw("upper", "number"), _kw("iterations", "int"), _kw("normalize", "bool"),
    _kw("magnitude", "number"))
"""The keyword arguments of ``secure.softmax`` and ``secure.attention`` (a
:class:`secure.graph.passes.SoftmaxRecipe`, with the attention's causal flag, scale and bias,
and the scores' bound of :mod:`secure.graph.bounds`)."""

_SECURE: tuple[OpSpec, ...] = (
    OpSpec("secure.gelu", None, (_x(), _kw("form", "str"), _kw("bound", "number"), _kw("degree", "int"),
                                 _kw("magnitude", "number"))),
    OpSpec("secure.silu", None, (_x(), _kw("form", "str"), _kw("magnitude", "number"))),
    OpSpec("secure.tanh", None, (_x(),)),
    OpSpec("secure.rsqrt", None, (_x(),)),
    OpSpec("secure.layer_norm", None, (_x(), Param("gamma", "ref?"), Param("beta", "ref?"),
                                       _kw("eps", "number", required=True), _kw("newton_iterations", "int"),
                                       _kw("variance_range", "numbers?"))),
    OpSpec("secure.rms_norm", None, (_x(), Param("gamma", "ref?"), _kw("eps", "number", required=True))),
    OpSpec("secure.embedding", None, (_x("table"), _x("ids"), _kw("shape", "ints?"))),
    OpSpec("secure.linears", None, (_x(), _x("w0"), Param("b0", "ref?"), _x("w1"), Param("b1", "ref?"),
                                    Param("w2", "ref?"), Param("b2", "ref?"))),
    OpSpec("secure.softmax", None, (_x(), Param("mask", "ref?"), *_SOFTMAX_KWARGS)),
    OpSpec("secure.attention", None, (_x(), Param("mask", "ref?"), _x("values"), *_SOFTMAX_KWARGS)),
)

_GETITEM = OpSpec("getitem", operator.getitem, (_x("value"), Param("index", "int", required=True)))


def _build() -> Mapping[str, OpSpec]:
    specs = [_aten_spec(op) for op in _ATEN] + [_GETITEM, *_SECURE]
    table = {s.name: s for s in specs}
    if len(table) != len(specs):
        raise RuntimeError("duplicate op in the registry")
    for s in specs:
        if any(p.kind not in KINDS for p in s.params):
            raise RuntimeError(f"unknown argument kind in {s.name}")
    return MappingProxyType(table)


OPS: Mapping[str, OpSpec] = _build()
"""Every op a graph may name, by the name nodes carry ("aten.linear.default", "getitem",
"secure.gelu", ...)."""

DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
})
"""The dtypes a graph argument may name (``{"dtype": "float32"}``), by ``str(dtype)`` less "torch."."""

DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType({v: k for k, v in DTYPES.items()})
