"""Per-layer and per-operation breakdown of an HE query, in the MPC breakdown's format.

Node spans (:class:`secure.profile.profiler.Span`: name = the module path, start and
seconds, bytes exchanged with the client for refreshes inside the node, client round
trips as rounds) feed :mod:`secure.runtime.breakdown` unchanged; :func:`operation_table` adds the CKKS view:
encode, encrypt, plaintext-matrix and ciphertext products, rotations, the forms
(Power-Softmax, GeLU, inverse square root), refreshes and decryption.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager

from secure.graph.ir import Node
from secure.he.refresh import RefreshSession
from secure.profile.profiler import Span

FORM_OF_OP = {
    "secure.softmax": "power-softmax (form)",
    "secure.gelu": "GeLU polynomial (form)",
    "secure.layer_norm": "LayerNorm + inverse sqrt (form)",
    "aten.linear.default": "plaintext-matrix products (linear layers)",
    "secure.linears": "plaintext-matrix products (linear layers)",
    "aten.matmul.default": "ciphertext matmuls (attention)",
}


class HeTracer:
    """Interpreter trace hook: one span per secret node (start counted from the tracer's
    creation), plus totals per form; it also tells ``session`` which node runs
    (:meth:`RefreshSession.at`: the bound and the name of its refreshes)."""

    def __init__(self, session: RefreshSession) -> None:
        self.session = session
        self.spans: list[Span] = []
        self.forms: dict[str, dict[str, float]] = {}
        self.start = time.perf_counter()

    def __call__(self, node: Node) -> AbstractContextManager:
        return self._span(node)

    @contextlib.contextmanager
    def _span(self, node: Node) -> Iterator[None]:
        s = self.session
        b0 = s.bytes_to_client + s.bytes_from_client
        r0 = s.refreshes
        t0 = time.perf_counter()
        try:
            with s.at(node.name, f"node {node.name} ({node.op}) in {node.origin or 'top level'}"):
                yield
        finally:
            dt = time.perf_counter() - t0
            nbytes = s.bytes_to_client + s.bytes_from_client - b0
            trips = s.refreshes - r0
            self.spans.append(Span(node.origin or node.op, t0 - self.start, dt, nbytes, trips))
            self._add_to_form(node.op, dt, nbytes, trips)

    def _add_to_form(self, op: str, seconds: float, nbytes: int, trips: int) -> None:
        form = FORM_OF_OP.get(op, "other element-wise and shape ops")
        f = self.forms.setdefault(form, {"nodes": 0, "seconds": 0.0, "bytes": 0, "client_trips": 0})
        f["nodes"] += 1
        f["seconds"] += seconds
        f["bytes"] += nbytes
        f["client_trips"] += trips


def operation_table(server: dict[str, dict[str, float]], client: dict[str, dict[str, float]],
                    forms: dict[str, dict[str, float]], wire: dict[str, int]) -> str:
    """Console table: CKKS primitives (server and client), forms, bytes on the wire."""
    lines = [f"{'CKKS primitive':<44}{'calls':>8}{'seconds':>10}"]
    for side, stats in (("server", server), ("client", client)):
        for name, s in sorted(stats.items(), key=lambda kv: -kv[1]["seconds"]):
            lines.append(f"{side + ': ' + name:<44}{int(s['count']):8d}{s['seconds']:10.3f}")
    lines.append("")
    lines.append(f"{'form (graph nodes)':<44}{'nodes':>8}{'seconds':>10}{'MB':>9}{'trips':>7}")
    for name, f in sorted(forms.items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"{name:<44}{int(f['nodes']):8d}{f['seconds']:10.3f}{f['bytes'] / 1e6:9.2f}"
                     f"{int(f['client_trips']):7d}")
    lines.append("")
    lines.append("bytes on the wire: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in wire.items()))
    return "\n".join(lines)
