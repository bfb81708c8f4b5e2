"""A client's input chunks, assembled and checked as they arrive (queries and generation
steps alike): each part is checked against the graph before its data is read, the total
against the request limit."""

from __future__ import annotations

from typing import Any

import grpc
import torch

from party.serving import Rejected
from secure.graph.ir import Graph
from secure.runtime.inputs import InputError, check_part_key
from secure.transport.wire import TensorAssembler, WireError


class InputCollector:
    """Assembles a client's ``InputChunk`` messages into tensors keyed by (name, kind, part),
    checking each part against the graph before reading its data and the total size."""

    def __init__(self, graph: Graph, max_bytes: int, allowed: set[str] | None = None) -> None:
        self.graph = graph
        self.max_bytes = max_bytes
        self.allowed = allowed
        self.total = 0
        self.received: dict[tuple[str, str, int], torch.Tensor] = {}
        self._assemblers: dict[tuple[str, str, int], TensorAssembler] = {}

    def add(self, chunk: Any) -> None:
        """One ``InputChunk``; raises :class:`Rejected` (INVALID_ARGUMENT / RESOURCE_EXHAUSTED)."""
        if self.allowed is not None and chunk.name not in self.allowed:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"input {chunk.name!r} is not taken here; this step "
                           f"takes {sorted(self.allowed)} (positions and masks are the parties' own)")
        try:
            check_part_key(self.graph, chunk.name, chunk.kind, chunk.part)
        except InputError as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        self.total += len(chunk.chunk.data)
        if self.total > self.max_bytes:
            raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request exceeds {self.max_bytes} bytes")
        key = (chunk.name, chunk.kind, chunk.part)
        if key in self.received:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"input {chunk.name!r} part {chunk.part} sent twice")
        assembler = self._assemblers.setdefault(key, TensorAssembler(self.max_bytes))
        try:
            tensor = assembler.add(chunk.chunk)
        except WireError as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"input {chunk.name!r}: {e}") from None
        if tensor is not None:
            self.received[key] = tensor
            del self._assemblers[key]

    def complete(self) -> dict[tuple[str, str, int], torch.Tensor]:
        """Everything received, or INVALID_ARGUMENT naming what is still incomplete."""
        if self._assemblers:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"incomplete inputs: {sorted(self._assemblers)}")
        return self.received
