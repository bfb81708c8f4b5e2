"""A small, readable, serialisable graph IR for models captured with ``torch.export``.

A :class:`Graph` is a list of :class:`Node` in execution order. Every value carries a
``secret`` flag: client inputs and model weights are secret, everything computed from
public values only (masks, positions, shapes) is public and runs in plaintext torch. The
graph holds no weight values (they travel separately, as shares); public buffers and
constants (position ids, ...) are part of it.

Serialisation is JSON (``to_json`` / ``from_json``): node arguments are JSON values where
a reference to another value is ``{"ref": name}``, a dtype ``{"dtype": "float32"}`` and
a public tensor ``{"tensor": name}`` in ``constants``.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


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
    """A runtime input: ``kind`` is "client" (secret, from the client) or "public"."""

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
        names = {i.name for i in self.inputs if i.kind == "client"} | set(self.weights)
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
    def from_json(text: str) -> Graph:
        try:
            d = json.loads(text)
            return Graph(
                inputs=[GraphInput(i["name"], i["kind"], Spec(**i["spec"])) for i in d["inputs"]],
                weights={k: Spec(**v) for k, v in d["weights"].items()},
                constants={k: _tensor_from_b64(v) for k, v in d["constants"].items()},
                nodes=[Node(n["name"], n["op"], _decode(n["args"]), _decode(n["kwargs"]),
                            Spec(**n["spec"]) if n["spec"] else None, n["secret"], n["origin"])
                       for n in d["nodes"]],
                outputs=list(d["outputs"]),
                meta=dict(d.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a valid serialised graph: {type(e).__name__}: {e}") from e


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
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {k: _encode(x) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot serialise graph argument of type {type(v).__name__}: {v!r}")


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "ref" in v:
            return Ref(v["ref"])
        if "dtype" in v:
            return getattr(torch, v["dtype"])
        if "dict" in v:
            return {k: _decode(x) for k, x in v["dict"].items()}
        raise ValueError(f"unknown encoded argument {v!r}")
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def _tensor_to_b64(t: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(t.detach().cpu(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tensor_from_b64(s: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(s)), weights_only=True)
