"""A small, readable, serialisable graph IR for models captured with ``torch.export``.

A :class:`Graph` is a list of :class:`Node` in execution order. Every value carries a
``secret`` flag: client inputs and model weights are secret, everything computed from
public values only (masks, positions, shapes) is public and runs in plaintext torch. The
graph holds no weight values (they travel separately, as shares); public buffers and
constants (position ids, ...) are part of it.

Serialisation is JSON (``to_json`` / ``from_json``): node arguments are JSON values where
a reference to another value (an input, a weight, a public tensor in ``constants`` or an
earlier node) is ``{"ref": name}``, a dtype ``{"dtype": "float32"}`` and a keyword dict
``{"dict": {...}}``. A party loads graphs from files, so ``from_json`` treats its text as
untrusted data: every op must be in the registry (:mod:`secure.graph.registry`), every
dtype in its allow-list, every reference to a value defined before it; anything else is a
:class:`GraphValidationError` naming the node, the op and the source. Nothing read from
the text is ever resolved with ``getattr``.

Imports the registry only: never ``secure.runtime`` nor the passes.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from secure.graph.registry import DTYPE_NAMES, DTYPES, KINDS, OPS, Kind, OpSpec

SECRET_INPUT_KINDS = frozenset({"client", "state"})
"""Input kinds whose values are secret (shares on the parties)."""

MAX_ARGUMENT_DEPTH = 16
"""How deeply node arguments may nest (captured graphs use two levels: lists of refs)."""


class GraphValidationError(ValueError):
    """A serialised graph is malformed or names something outside the registry; the message
    names the node, the op and the source (file) when known."""


@dataclass(frozen=True)
class Ref:
    """A reference to a graph value (an input, a weight, a constant or a node output)."""

    name: str


@dataclass
class Spec:
    """Shape and dtype of a tensor value."""

    shape: list[int]
    dtype: str


@dataclass
class GraphInput:
    """A runtime input: ``kind`` is "client" (secret, from the client), "public", or "state"
    (secret, held by the parties between the steps of one generation session: the key and
    value cache; no client ever sends it)."""

    name: str
    kind: str
    spec: Spec


@dataclass
class Node:
    """One operation. ``op`` is an aten overload name ("aten.linear.default") or a secure
    form ("secure.gelu"); ``origin`` names the model module it came from."""

    name: str
    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    spec: Spec | None
    secret: bool
    origin: str = ""

    def refs(self) -> list[str]:
        """Names of the values this node reads."""
        out: list[str] = []
        _collect_refs(self.args, out)
        _collect_refs(list(self.kwargs.values()), out)
        return out


def resolve_refs(value: Any, env: dict[str, Any]) -> Any:
    """``value`` with every :class:`Ref` in it (nested in lists and dicts) replaced by
    ``env[ref.name]``: a node's arguments as the values they name."""
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, list):
        return [resolve_refs(x, env) for x in value]
    if isinstance(value, dict):
        return {k: resolve_refs(x, env) for k, x in value.items()}
    return value


def _collect_refs(value: Any, out: list[str]) -> None:
    if isinstance(value, Ref):
        out.append(value.name)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_refs(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_refs(v, out)


@dataclass
class Graph:
    """A captured (and possibly rewritten) model."""

    inputs: list[GraphInput]
    weights: dict[str, Spec]
    constants: dict[str, torch.Tensor]
    nodes: list[Node]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def secret_names(self) -> set[str]:
        """Names of every secret value (client inputs, weights, secret node outputs)."""
        names = {i.name for i in self.inputs if i.kind in SECRET_INPUT_KINDS} | set(self.weights)
        return names | {n.name for n in self.nodes if n.secret}

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def summary(self) -> str:
        """One line per node: name = op(args) [secret|public] shape (origin)."""
        lines = [f"inputs: {', '.join(f'{i.name}:{i.kind}{i.spec.shape}' for i in self.inputs)}",
                 f"weights: {len(self.weights)} tensors, constants: {len(self.constants)}"]
        for n in self.nodes:
            args = ", ".join(_fmt(a) for a in n.args)
            kw = "".join(f", {k}={_fmt(v)}" for k, v in n.kwargs.items())
            where = f"  ({n.origin})" if n.origin else ""
            shape = n.spec.shape if n.spec else ""
            lines.append(f"{n.name} = {n.op}({args}{kw}) [{'secret' if n.secret else 'public'}] "
                         f"{shape}{where}")
        lines.append(f"outputs: {', '.join(self.outputs)}")
        return "\n".join(lines)

    # ---- serialisation --------------------------------------------------------------
    def to_json(self) -> str:
        """The JSON text of the graph; refuses ops that a party's ``from_json`` would refuse."""
        for n in self.nodes:
            if n.op not in OPS:
                raise GraphValidationError(f"node {n.name!r}: op {n.op!r} is not in the op registry "
                                           "(secure.graph.registry); a party would refuse this graph")
        payload = {
            "inputs": [asdict(i) for i in self.inputs],
            "weights": {k: asdict(v) for k, v in self.weights.items()},
            "constants": {k: _tensor_to_b64(v) for k, v in self.constants.items()},
            "nodes": [{"name": n.name, "op": n.op, "args": _encode(n.args),
                       "kwargs": _encode(n.kwargs), "spec": asdict(n.spec) if n.spec else None,
                       "secret": n.secret, "origin": n.origin} for n in self.nodes],
            "outputs": self.outputs,
            "meta": self.meta,
        }
        return json.dumps(payload)

    @staticmethod
    def from_json(text: str, source: str | None = None) -> Graph:
        """Parse and validate a serialised graph (see the module docstring); ``source`` (a
        file name, say) goes into the error message."""
        where = f" ({source})" if source else ""
        try:
            return _graph_from_dict(json.loads(text))
        except GraphValidationError as e:
            raise GraphValidationError(f"not a valid serialised graph{where}: {e}") from e
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise GraphValidationError(f"not a valid serialised graph{where}: {type(e).__name__}: {e}") from e


def _fmt(v: Any) -> str:
    if isinstance(v, Ref):
        return v.name
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v) if isinstance(v, str) else str(v)


def _encode(v: Any) -> Any:
    if isinstance(v, Ref):
        return {"ref": v.name}
    if isinstance(v, torch.dtype):
        if v not in DTYPE_NAMES:
            raise TypeError(f"dtype {v} is not in the registry's dtype allow-list")
        return {"dtype": DTYPE_NAMES[v]}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {k: _encode(x) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot serialise graph argument of type {type(v).__name__}: {v!r}")


def _tensor_to_b64(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t.detach().cpu(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- validation of untrusted graph text ------------------------------------------------------

_GRAPH_KEYS = {"inputs", "weights", "constants", "nodes", "outputs"}
_NODE_KEYS = {"name", "op", "args", "kwargs", "spec", "secret", "origin"}
_INPUT_KINDS = {"client", "public", "state"}


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GraphValidationError(f"{what} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _keys(d: dict, required: set[str], optional: set[str], what: str) -> None:
    missing, unknown = required - set(d), set(d) - required - optional
    if missing or unknown:
        raise GraphValidationError(f"{what}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")


def _spec(v: Any, what: str) -> Spec:
    d = _expect(v, dict, f"{what}: spec")
    _keys(d, {"shape", "dtype"}, set(), f"{what}: spec")
    shape = [_expect(s, int, f"{what}: spec shape entry") for s in _expect(d["shape"], list, f"{what}: shape")]
    dtype = _expect(d["dtype"], str, f"{what}: spec dtype")
    if dtype.removeprefix("torch.") not in DTYPES:
        raise GraphValidationError(f"{what}: dtype {dtype!r} is not in the dtype allow-list")
    return Spec(shape, dtype)


def _constant(name: str, v: Any) -> torch.Tensor:
    try:
        value = torch.load(io.BytesIO(base64.b64decode(_expect(v, str, "constant"), validate=True)),
                           weights_only=True)
    except Exception as e:  # torch.load raises many types on bad bytes; name the constant
        raise GraphValidationError(f"constant {name!r}: {type(e).__name__}: {e}") from e
    return _expect(value, torch.Tensor, f"constant {name!r}")


def _decode(v: Any, depth: int = 0) -> Any:
    """A node argument from its JSON form; refuses every encoding but ref, dtype, dict, lists
    and JSON scalars, and every dtype outside :data:`DTYPES`."""
    if depth > MAX_ARGUMENT_DEPTH:
        raise GraphValidationError(f"arguments nested deeper than {MAX_ARGUMENT_DEPTH} levels")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, depth + 1) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        ((key, inner),) = v.items()
        if key == "ref" and isinstance(inner, str):
            return Ref(inner)
        if key == "dtype" and isinstance(inner, str) and inner in DTYPES:
            return DTYPES[inner]
        if key == "dict" and isinstance(inner, dict):
            return {k: _decode(x, depth + 1) for k, x in inner.items()}
    raise GraphValidationError(f"unknown encoded argument {_short(v)}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KIND_CHECKS: dict[Kind, Callable[[Any], bool]] = {
    "any": lambda v: True,
    "ref": lambda v: isinstance(v, Ref),
    "ref?": lambda v: v is None or isinstance(v, Ref),
    "int": _is_int,
    "number": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "ints?": lambda v: v is None or (isinstance(v, list) and all(_is_int(x) for x in v)),
    "numbers?": lambda v: v is None or (isinstance(v, list) and all(_is_number(x) for x in v)),
}
if set(_KIND_CHECKS) != KINDS:
    raise RuntimeError("ir.py checks a different set of argument kinds than the registry names")


def _check_call(spec: OpSpec, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Argument count, keyword names, required parameters and argument kinds against the registry."""
    positional = spec.positional
    if len(args) > len(positional):
        raise GraphValidationError(f"{len(args)} positional arguments, the op takes at most {len(positional)}")
    given = {p.name: v for p, v in zip(positional, args)}
    for key, value in kwargs.items():
        if spec.param(key) is None or key in given:
            raise GraphValidationError(f"keyword argument {key!r} is unknown or given twice")
        given[key] = value
    for param in spec.params:
        if param.name not in given:
            if param.required:
                raise GraphValidationError(f"missing argument {param.name!r}")
        elif not _KIND_CHECKS[param.kind](given[param.name]):
            raise GraphValidationError(f"argument {param.name!r} must be {param.kind}, got "
                                       f"{_short(given[param.name])}")


def _node(d: Any, index: int, known: set[str]) -> Node:
    d = _expect(d, dict, f"node #{index}")
    name = _expect(d.get("name"), str, f"node #{index}: name")
    op = _expect(d.get("op"), str, f"node {name!r}: op")
    spec = OPS.get(op)
    if spec is None:
        raise GraphValidationError(f"node {name!r}: op {op!r} is not in the op registry")
    try:
        _keys(d, _NODE_KEYS, set(), "keys")
        if not name or name in known:
            raise GraphValidationError("the name is empty or already used")
        args = _expect(_decode(d["args"]), list, "args")
        kwargs = _expect(_decode(d["kwargs"]), dict, "kwargs")
        node = Node(name, op, args, kwargs, None if d["spec"] is None else _spec(d["spec"], "output"),
                    _expect(d["secret"], bool, "secret"), _expect(d["origin"], str, "origin"))
        unknown = [r for r in node.refs() if r not in known]
        if unknown:
            raise GraphValidationError(f"reads {unknown[0]!r}, which is not defined before it")
        _check_call(spec, args, kwargs)
    except GraphValidationError as e:
        raise GraphValidationError(f"node {name!r} (op {op!r}): {e}") from e
    return node


def _graph_from_dict(d: Any) -> Graph:
    """A Graph from parsed JSON, validated throughout (see the module docstring)."""
    d = _expect(d, dict, "the graph")
    _keys(d, _GRAPH_KEYS, {"meta"}, "the graph")
    inputs = []
    for i in _expect(d["inputs"], list, "inputs"):
        i = _expect(i, dict, "an input")
        _keys(i, {"name", "kind", "spec"}, set(), "an input")
        name = _expect(i["name"], str, "an input's name")
        if i["kind"] not in _INPUT_KINDS:
            raise GraphValidationError(f"input {name!r}: kind must be one of {sorted(_INPUT_KINDS)}")
        inputs.append(GraphInput(name, i["kind"], _spec(i["spec"], f"input {name!r}")))
    weights = {k: _spec(v, f"weight {k!r}") for k, v in _expect(d["weights"], dict, "weights").items()}
    constants = {k: _constant(k, v) for k, v in _expect(d["constants"], dict, "constants").items()}
    known = [i.name for i in inputs] + list(weights) + list(constants)
    if len(set(known)) != len(known):
        raise GraphValidationError("an input, weight or constant name is used twice")
    defined = set(known)
    nodes = []
    for index, raw in enumerate(_expect(d["nodes"], list, "nodes")):
        nodes.append(_node(raw, index, defined))
        defined.add(nodes[-1].name)
    outputs = [_expect(o, str, "an output") for o in _expect(d["outputs"], list, "outputs")]
    undefined = [o for o in outputs if o not in defined]
    if undefined:
        raise GraphValidationError(f"output {undefined[0]!r} is not a value of the graph")
    return Graph(inputs, weights, constants, nodes, outputs, dict(_expect(d.get("meta", {}), dict, "meta")))
