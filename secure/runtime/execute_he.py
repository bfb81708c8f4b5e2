"""Run a graph under CKKS end to end in one process, the HE counterpart of
:func:`secure.runtime.execute.run_mpc`.

The client (keys, encryption, refreshes, decryption: :class:`secure.he.client.HeClient`)
and the server (:class:`secure.he.ops.HeOps` over the interpreter) talk through bytes only,
so the byte counts are those of the wire; the HE node (``party.he_node``) runs the same
steps over gRPC.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from secure.graph.ir import Graph
from secure.he.breakdown import HeTracer
from secure.he.client import HeClient, RefreshCheck, server_engine
from secure.he.engine import SealEngine
from secure.he.layout import Cipher, Plain
from secure.he.ops import HeOps
from secure.he.plain_cache import PlainCache
from secure.he.pool import ClientPool, HePool
from secure.he.refresh import REFRESH_BOUNDS_META, RefreshSession, Sent
from secure.profile.profiler import Span
from secure.runtime.he_planner import HePlan, plan
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
    spans: list[Span] = field(default_factory=list)
    forms: dict[str, dict[str, float]] = field(default_factory=dict)


class InProcessLink:
    """In-process refresh link: the server's serialised ciphertexts go to the client object
    as bytes (the session counts them), exactly what the gRPC stream would carry."""

    def __init__(self, client: HeClient) -> None:
        self.client = client

    def refresh(self, items: list[Sent], check: RefreshCheck) -> list[list[bytes]]:
        return self.client.refresh(items, check)


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - t


def _encrypted_inputs(graph: Graph, inputs: dict[str, torch.Tensor], client: HeClient,
                      engine: SealEngine) -> tuple[dict[str, Any], int]:
    """The client inputs encrypted (public ones as they are), and the bytes uploaded."""
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
    return prepared, upload


class _Opener:
    """Decrypts values on the client's side, counting the bytes downloaded."""

    def __init__(self, client: HeClient, engine: SealEngine) -> None:
        self.client = client
        self.engine = engine
        self.download = 0

    def __call__(self, v: Any) -> torch.Tensor:
        if isinstance(v, Plain):
            return v.value
        blobs = [self.engine.serialize(c) for c in v.cts]
        self.download += sum(len(b) for b in blobs)
        return self.client.decrypt(blobs, v.index)


def run_he(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
           observe: Iterable[str] = (), allow_refresh: bool = True,
           on_event: Callable[[str, dict], None] | None = None, flood_bits: int | None = None,
           plain_cache: PlainCache | None = None, the_plan: HePlan | None = None,
           pool: HePool | None = None, client_pool: ClientPool | None = None) -> HeRun:
    """Plan, generate keys, encrypt the client inputs, evaluate (every secret node traced
    for the breakdown; refreshes bounded by ``graph.meta[REFRESH_BOUNDS_META]``), finish the
    outputs as the HE node does (:meth:`HeOps.finish_outputs`: unused slots cleared,
    ``flood_bits`` noise flooding), decrypt. ``plain_cache``: the server's encoded weight
    diagonals, kept across runs as the HE node keeps them (None: encode every time).
    ``the_plan``: a plan made earlier for this graph and these input shapes (the HE node
    keeps one per model and length); None plans here (``seconds["plan"]``). ``pool``: worker
    processes for the linear layers (:class:`~secure.he.pool.HePool`; None: all in this one);
    ``client_pool``: the client's, for its refreshes (:class:`~secure.he.pool.ClientPool`)."""
    seconds: dict[str, float] = {}
    if the_plan is None:
        with _timed(seconds, "plan"):
            the_plan = plan(graph, weights, inputs, allow_refresh=allow_refresh)
    with _timed(seconds, "keygen"):
        client = HeClient(the_plan.params, the_plan.steps)
        client.pool = client_pool
        public = client.public_context()
    engine = server_engine(public)
    engine.plain_cache = plain_cache
    engine.pool = pool
    session = RefreshSession(engine, InProcessLink(client), allow_refresh=allow_refresh, on_event=on_event,
                             refresh_bounds=graph.meta.get(REFRESH_BOUNDS_META))
    with _timed(seconds, "encrypt"):
        prepared, upload = _encrypted_inputs(graph, inputs, client, engine)
    with _timed(seconds, "evaluate"):
        ops = HeOps(session)
        tracer = HeTracer(session)
        outs, seen = Interpreter(graph, ops, tracer).run({k: Plain(v.to(torch.float64)) for k, v in weights.items()},
                                                         prepared, observe)
        outs = ops.finish_outputs(outs, flood_bits)
    with _timed(seconds, "decrypt"):
        open_ = _Opener(client, engine)
        outputs = [open_(o) for o in outs]
        observed = {k: open_(v) for k, v in seen.items()}
    wire = {"public_context": len(public), "inputs": upload, "outputs": open_.download,
            "refresh_to_client": session.bytes_to_client, "refresh_from_client": session.bytes_from_client}
    return HeRun(outputs, observed, the_plan, seconds, engine.stats.as_dict(), client.stats.as_dict(), wire,
                 session.refreshes, tracer.spans, tracer.forms)
