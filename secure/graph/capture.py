"""Capture a torch or Hugging Face model as an IR :class:`Graph` with ``torch.export``.

The exported aten graph (after ``run_decompositions({})``, which keeps ``linear``,
``layer_norm``, ``gelu``, ``scaled_dot_product_attention`` and ``embedding`` whole) is
translated node by node. Parameters become secret weights; buffers and lifted constants
become public constants; each user input is secret when named in ``secret_inputs`` (the
client's token ids) and public otherwise (attention masks). Secrecy then flows forward:
a node is secret when any of its inputs is.

Shapes are specialised to the example inputs (the parties learn shapes anyway); capture
once per padded sequence length.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from secure.graph.ir import Graph, GraphInput, Node, Ref, Spec

_TANH_GELU_MODULES = {"NewGELUActivation", "GELUTanh", "FastGELUActivation", "PytorchGELUTanh",
                      "GELUPytorchTanh"}
_SKIPPED_OPS = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
                "aten.sym_constrain_range_for_size.default"}


class CaptureError(RuntimeError):
    """The model could not be captured into the IR."""


def prepare_model(model: nn.Module) -> nn.Module:
    """Put the model in eval mode and replace tanh-GeLU modules written out in elementwise
    torch (GPT-2's NewGELUActivation) by ``nn.GELU(approximate="tanh")``, so they export
    as one ``aten.gelu`` that the GeLU rewrite recognises."""
    model.eval()
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ in _TANH_GELU_MODULES:
                setattr(parent, child_name, nn.GELU(approximate="tanh"))
    return model


def capture(model: nn.Module, example_inputs: dict[str, torch.Tensor],
            secret_inputs: Iterable[str] = ("input_ids",),
            meta: dict[str, Any] | None = None, state_inputs: Iterable[str] = ()
            ) -> tuple[Graph, dict[str, torch.Tensor]]:
    """Export ``model(**example_inputs)`` and translate it to a Graph.

    ``secret_inputs`` come from the client; ``state_inputs`` are secret values the parties
    hold themselves (a generation session's key/value cache). Returns the graph and the
    weights by name (plain tensors, for the owner to share).
    """
    prepare_model(model)
    held = set(state_inputs)
    secret = set(secret_inputs)
    unknown = (secret | held) - set(example_inputs)
    if unknown:
        raise CaptureError(f"secret or state inputs {sorted(unknown)} are not among the model inputs "
                           f"{sorted(example_inputs)}")
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), dict(example_inputs), strict=False)
            ep = ep.run_decompositions({})
    except Exception as e:  # torch.export raises many types; name the cause
        raise CaptureError(f"torch.export failed on {type(model).__name__}: "
                           f"{type(e).__name__}: {e}") from e
    return _translate(ep, example_inputs, secret, meta or {}, held)


def _translate(ep: ExportedProgram, example_inputs: dict[str, torch.Tensor], secret: set[str],
               meta: dict[str, Any], held: set[str] = frozenset()) -> tuple[Graph, dict[str, torch.Tensor]]:
    state = ep.state_dict
    names: dict[str, str] = {}  # fx placeholder name -> IR name
    inputs: list[GraphInput] = []
    weights: dict[str, Spec] = {}
    weight_values: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for spec in ep.graph_signature.input_specs:
        ph = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            value = state[spec.target]
            tied = next((n for n, v in weight_values.items() if _same_tensor(v, value)), None)
            if tied is not None:  # tied weights (input and output embeddings): one secret, dealt once
                names[ph] = tied
                continue
            names[ph] = spec.target
            weights[spec.target] = _spec_of(value)
            weight_values[spec.target] = value
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = state[spec.target] if spec.target in state else ep.constants[spec.target]
            names[ph] = spec.target
            constants[spec.target] = value.detach().clone()
        elif spec.kind == InputKind.USER_INPUT:
            names[ph] = ph
            if ph not in example_inputs:
                raise CaptureError(f"exported input {ph!r} is not among the example inputs")
            kind = "state" if ph in held else "client" if ph in secret else "public"
            inputs.append(GraphInput(ph, kind, _spec_of(example_inputs[ph])))
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind} for {ph!r}")

    secret_values = {i.name for i in inputs if i.kind != "public"} | set(weights)
    nodes: list[Node] = []
    for fx_node in ep.graph.nodes:
        if fx_node.op != "call_function":
            continue
        op = _op_name(fx_node.target)
        if op in _SKIPPED_OPS:
            continue
        args = [_arg(a, names) for a in fx_node.args]
        kwargs = {k: _arg(v, names) for k, v in fx_node.kwargs.items()}
        node = Node(fx_node.name, op, args, kwargs, _spec_of(fx_node.meta.get("val")), False,
                    _origin(fx_node))
        node.secret = any(r in secret_values for r in node.refs())
        if node.secret:
            secret_values.add(node.name)
        names[fx_node.name] = fx_node.name
        nodes.append(node)

    outputs = []
    for spec in ep.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(f"the model mutates state ({spec.kind}); capture needs a pure forward")
        outputs.append(names.get(spec.arg.name, spec.arg.name))
    graph = Graph(inputs, weights, constants, nodes, outputs, dict(meta))
    return graph, {k: v.detach().clone() for k, v in weight_values.items()}


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two parameters are one tensor (tied weights share their storage)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def _op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    return str(target)


def _arg(a: Any, names: dict[str, str]) -> Any:
    if isinstance(a, torch.fx.Node):
        return Ref(names[a.name])
    if isinstance(a, (list, tuple)):
        return [_arg(x, names) for x in a]
    if isinstance(a, torch.dtype) or a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
        return str(a)
    raise CaptureError(f"unsupported argument of type {type(a).__name__}: {a!r}")


def _spec_of(v: Any) -> Spec | None:
    if isinstance(v, torch.Tensor):
        return Spec([int(s) for s in v.shape], str(v.dtype).removeprefix("torch."))
    return None


def _origin(fx_node: torch.fx.Node) -> str:
    stack = fx_node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self__.", "")
