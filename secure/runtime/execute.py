"""Run a rewritten graph end to end on one backend: the owner's and the client's sides
(sharing weights and inputs) and the reconstruction of the outputs.

* :func:`run_float` -- the secure forms on plaintext floats (fidelity of the rewrite);
* :func:`run_fixed` -- the fixed-point simulation (the arithmetic error of MPC, fast);
* :func:`run_reference` -- the unrewritten graph in plain float64 torch;
* :func:`run_mpc` -- the three-party engine: the model owner deals weight shares, the
  client deals its inputs (token ids as PRG-compressed one-hot shares), the three
  parties run the interpreter in lockstep, and only the client reconstructs.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from secure.approx.float_backend import FloatOps
from secure.graph.ir import Graph, Node
from secure.mpc import shares as sh
from secure.mpc.backend import MpcOps
from secure.mpc.engine import LocalCluster
from secure.mpc.ring import FixedPoint
from secure.mpc.simulation import FixedPointOps
from secure.profile.profiler import span
from secure.runtime.inputs import InputPart, client_parts, input_specs, party_inputs, upload_bytes
from secure.runtime.interpreter import Interpreter, client_input, embedding_vocab

QUERY_SPAN = "query"
"""Name of the span around a whole traced query; node spans sit one level below it."""


def run_float(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
              observe: Iterable[str] = ()) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The graph's secure forms evaluated on float64 tensors."""
    values = {k: v.to(torch.float64) for k, v in weights.items()}
    prepared = {i.name: client_input(graph, i.name, inputs[i.name]) if i.kind != "public"
                else inputs[i.name] for i in graph.inputs}
    return Interpreter(graph, FloatOps()).run(values, prepared, observe)


def run_fixed(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
              observe: Iterable[str] = (), fixed_point: FixedPoint | None = None, seed: int = 0
              ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The graph on the fixed-point simulation (plain ring values, truncation with the
    protocol's 0/1 error distribution): the MPC result's error without three parties."""
    ops = FixedPointOps(fixed_point or FixedPoint(), truncation="probabilistic", seed=seed)
    values = {k: ops.encode(v.to(torch.float64)) for k, v in weights.items()}
    prepared: dict[str, Any] = {}
    for spec in graph.inputs:
        value = inputs[spec.name]
        if spec.kind == "public":
            prepared[spec.name] = value
        elif embedding_vocab(graph, spec.name) is not None:
            prepared[spec.name] = ops.encode(client_input(graph, spec.name, value), frac_bits=0)
        else:
            prepared[spec.name] = ops.encode(value.to(torch.float64))
    outs, seen = Interpreter(graph, ops).run(values, prepared, observe)
    return [ops.decode(o) for o in outs], {k: ops.decode(v) for k, v in seen.items()}


def run_reference(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                  observe: Iterable[str] = ()) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The unrewritten graph in plain float64 torch (exact functions), node by node."""
    values = {k: v.to(torch.float64) for k, v in weights.items()}
    return Interpreter(graph, None).run(values, dict(inputs), observe)


def deal_weights(weights: dict[str, torch.Tensor], fp: FixedPoint,
                 device: torch.device | str = "cpu") -> list[dict[str, sh.AShare]]:
    """The model owner's side: each party's shares of every weight."""
    per_party: list[dict[str, sh.AShare]] = [{}, {}, {}]
    for name, w in weights.items():
        for i, s in enumerate(sh.deal_shares(fp.encode(w.to(torch.float64)).to(device), fp.frac_bits)):
            per_party[i][name] = s
    return per_party


@dataclass
class ClientShares:
    """What the client sends each party (``secure.runtime.inputs`` parts) and its size."""

    per_party: list[list[InputPart]]
    upload_bytes: list[int]


def deal_inputs(graph: Graph, inputs: dict[str, torch.Tensor], fp: FixedPoint) -> ClientShares:
    """The client's side: one-hot shares for token ids, fixed-point shares for other secret
    inputs, public inputs as they are (the same parts the gRPC client sends)."""
    for spec in graph.inputs:
        if spec.name in inputs and list(inputs[spec.name].shape) != spec.spec.shape:
            raise ValueError(f"input {spec.name!r} has shape {list(inputs[spec.name].shape)}, the graph was "
                             f"captured for {spec.spec.shape}")
    per_party = client_parts(input_specs(graph), inputs, fp)
    return ClientShares(per_party, [upload_bytes(parts) for parts in per_party])


def _party_program(graph: Graph, observe: list[str], trace_spans: bool):
    def program(party: Any, weights: dict[str, sh.AShare], parts: list[InputPart]):
        ready = party_inputs(graph, {p.key: p.tensor for p in parts}, party.id, party.fp.frac_bits, party.device)
        if not trace_spans:
            return Interpreter(graph, MpcOps(party)).run(weights, ready, observe)

        def trace(node: Node) -> AbstractContextManager:
            return span(party, node.origin or node.op)

        with span(party, QUERY_SPAN):  # the total; each secret node is a span inside it
            return Interpreter(graph, MpcOps(party), trace).run(weights, ready, observe)
    return program


def run_mpc(cluster: LocalCluster, graph: Graph, weight_shares: list[dict[str, sh.AShare]],
            client: ClientShares, observe: Iterable[str] = (), trace_spans: bool = False
            ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run on the in-process three-party engine; returns the client's reconstruction of the
    outputs (and of the observed intermediate values, for fidelity reports)."""
    wanted = list(observe)
    program = _party_program(graph, wanted, trace_spans)
    results = cluster.run(program, [(weight_shares[i], client.per_party[i]) for i in range(3)])

    def open_(values: list[Any]) -> torch.Tensor:
        first = values[0]
        return cluster.fp.decode(sh.reconstruct(values).cpu(), first.frac_bits)

    outs = [open_([r[0][k] for r in results]) for k in range(len(graph.outputs))]
    seen = {name: open_([r[1][name] for r in results]) for name in wanted}
    return outs, seen
