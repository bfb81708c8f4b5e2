"""Per-layer and per-operation breakdown of an HE query, in the MPC breakdown's format.

Node spans (name = the module path, seconds, bytes exchanged with the client for
refreshes inside the node, client round trips as "rounds") feed
:mod:`secure.runtime.breakdown` unchanged; :func:`operation_table` adds the CKKS view:
encode, encrypt, plaintext-matrix and ciphertext products, rotations, the forms
(Power-Softmax, GeLU, inverse square root), refreshes and decryption.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager

from secure.graph.ir import Node
from secure.he.backend import HeOps

FORM_OF_OP = {
    "secure.softmax": "power-softmax (form)",
    "secure.gelu": "GeLU polynomial (form)",
    "secure.layer_norm": "LayerNorm + inverse sqrt (form)",
    "aten.linear.default": "plaintext-matrix products (linear layers)",
    "aten.matmul.default": "ciphertext matmuls (attention)",
}


class HeTracer:
    """Interpreter trace hook: one span per secret node, plus totals per form."""

    def __init__(self, ops: HeOps) -> None:
        self.ops = ops
        self.spans: list[tuple[str, float, float, int, int]] = []  # name, start, seconds, bytes, trips
        self.forms: dict[str, dict[str, float]] = {}
        self.start = time.perf_counter()

    def __call__(self, node: Node) -> AbstractContextManager:
        return self._span(node)

    @contextlib.contextmanager
    def _span(self, node: Node) -> Iterator[None]:
        ops = self.ops
        b0 = ops.bytes_to_client + ops.bytes_from_client
        r0 = ops.refreshes
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            nbytes = ops.bytes_to_client + ops.bytes_from_client - b0
            trips = ops.refreshes - r0
            self.spans.append((node.origin or node.op, t0 - self.start, dt, nbytes, trips))
            form = FORM_OF_OP.get(node.op, "other element-wise and shape ops")
            f = self.forms.setdefault(form, {"nodes": 0, "seconds": 0.0, "bytes": 0, "client_trips": 0})
            f["nodes"] += 1
            f["seconds"] += dt
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
