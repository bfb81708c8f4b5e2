"""A graph under CKKS in one process: the client (keys, encryption, refreshes,
decryption) and the server (HeOps over the interpreter) talk through bytes only, so the
byte counts are those of the wire."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from secure.graph.ir import Graph
from secure.he.backend import HeOps
from secure.he.breakdown import HeTracer
from secure.he.client import HeClient, server_engine
from secure.he.layout import Cipher, Plain
from secure.he.planner import HePlan, plan
from secure.runtime.interpreter import Interpreter


@dataclass
class HeRun:
    outputs: list[torch.Tensor]
    observed: dict[str, torch.Tensor]
    plan: HePlan
    seconds: dict[str, float] = field(default_factory=dict)
    server_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    client_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    refreshes: int = 0
    spans: list[tuple[str, float, float, int, int]] = field(default_factory=list)
    forms: dict[str, dict[str, float]] = field(default_factory=dict)


class InProcessLink:
    """In-process refresh link: the server's serialised ciphertexts go to the client object
    as bytes (HeOps counts them), exactly what the gRPC stream would carry."""

    def __init__(self, client: HeClient) -> None:
        self.client = client

    def refresh(self, items: list) -> list[list[bytes]]:
        return self.client.refresh(items)


def run_he(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
           observe: Iterable[str] = (), allow_refresh: bool = True,
           on_event: Callable[[str, dict], None] | None = None) -> HeRun:
    """Plan, generate keys, encrypt the client inputs, evaluate (every secret node traced
    for the breakdown), decrypt."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    the_plan = plan(graph, weights, inputs, allow_refresh=allow_refresh)
    seconds["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    client = HeClient(the_plan.params, the_plan.steps)
    public = client.public_context()
    seconds["keygen"] = time.perf_counter() - t
    engine = server_engine(public)
    ops = HeOps(engine, InProcessLink(client), allow_refresh=allow_refresh, on_event=on_event)
    t = time.perf_counter()
    upload = 0
    prepared: dict[str, Any] = {}
    for spec in graph.inputs:
        value = inputs[spec.name]
        if spec.kind == "client":
            blobs, index = client.encrypt(value.to(torch.float64))
            upload += sum(len(b) for b in blobs)
            prepared[spec.name] = Cipher([engine.deserialize(b) for b in blobs], index)
        else:
            prepared[spec.name] = value
    seconds["encrypt"] = time.perf_counter() - t
    t = time.perf_counter()
    tracer = HeTracer(ops)
    interp = Interpreter(graph, ops, tracer)
    outs, seen = interp.run({k: Plain(v.to(torch.float64)) for k, v in weights.items()}, prepared, observe)
    seconds["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    download = 0

    def open_(v: Any) -> torch.Tensor:
        nonlocal download
        if isinstance(v, Plain):
            return v.value
        blobs = [engine.serialize(c) for c in v.cts]
        download += sum(len(b) for b in blobs)
        return client.decrypt(blobs, v.index)

    outputs = [open_(o) for o in outs]
    observed = {k: open_(v) for k, v in seen.items()}
    seconds["decrypt"] = time.perf_counter() - t
    return HeRun(outputs, observed, the_plan, seconds, engine.stats.as_dict(), client.stats.as_dict(),
                 {"public_context": len(public), "inputs": upload, "outputs": download,
                  "refresh_to_client": ops.bytes_to_client, "refresh_from_client": ops.bytes_from_client},
                 ops.refreshes, tracer.spans, tracer.forms)
