"""Several queries of one graph as one execution on the parties.

The batch-B graph comes from :func:`secure.graph.batching.batch_graph` (cached per graph
and size by :class:`BatchedGraphs`). On each party, every query's inputs are rebuilt and
checked as for a lone query (``secure.runtime.inputs.party_inputs`` on the batch-1 graph),
then stacked on dimension 0 (:func:`stack_inputs`); the batched graph runs once, on
:class:`BatchOps`, and every output is split back into rows (:func:`split_rows`), so each
query's client receives its own row's shares only. Every protocol round is shared by the
queries of the batch; nothing in the batched graph mixes rows.

Range checks (the bounded forms' one opened value) are made per row: :class:`BatchOps`
opens one out-of-range count per query instead of one for the whole value, so a query
that leaves a form's range fails alone (its row is computed on but never released) and
the parties learn for each query exactly what a lone run of it would have told them.

:func:`run_mpc_batch` runs a batch on the in-process engine (tests, benchmarks); the
party node's scheduler (``party.batching``) runs the same steps over gRPC.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from secure.approx.interface import RangeError, check_range_arguments
from secure.graph.batching import BatchingError, batch_graph
from secure.graph.ir import Graph
from secure.mpc import scale
from secure.mpc import shares as sh
from secure.mpc.arithmetic import open_many
from secure.mpc.backend import MpcOps
from secure.mpc.boolean import msb_many
from secure.mpc.engine import LocalCluster
from secure.mpc.party import Party
from secure.mpc.shares import AShare
from secure.profile.profiler import protocol
from secure.runtime.execute import ClientShares
from secure.runtime.inputs import party_inputs
from secure.runtime.interpreter import Interpreter


class BatchedGraphs:
    """Batch-B graphs derived from batch-1 graphs, each derived once (thread-safe).

    :meth:`get` returns the batched graph or raises :class:`BatchingError` (also cached: a
    graph that cannot be batched is refused at once the next time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: dict[tuple[int, int], Graph | BatchingError] = {}
        self._keep: dict[int, Graph] = {}  # the source graphs, so that their ids stay theirs

    def get(self, graph: Graph, batch: int) -> Graph:
        """``graph`` (captured at batch 1) for ``batch`` stacked queries."""
        if batch == 1:
            return graph
        key = (id(graph), batch)
        with self._lock:
            found = self._graphs.get(key)
        if found is None:
            try:
                found = batch_graph(graph, batch)
            except BatchingError as e:
                found = e
            with self._lock:
                self._graphs[key] = found
                self._keep[id(graph)] = graph
        if isinstance(found, BatchingError):
            raise found
        return found

    def batchable(self, graph: Graph) -> BatchingError | None:
        """None when ``graph`` can be batched (checked at size 2), else why not."""
        try:
            self.get(graph, 2)
        except BatchingError as e:
            return e
        return None


def stack_inputs(graph: Graph, per_query: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One party's interpreter inputs of the batch: each input of ``graph`` (the batch-1
    graph) from every query (as ``party_inputs`` returned them), concatenated on dimension 0
    in the batch's order (shares as shares, public values as tensors)."""
    if not per_query:
        raise ValueError("an empty batch")
    stacked: dict[str, Any] = {}
    for spec in graph.inputs:
        values = [q[spec.name] for q in per_query]
        if isinstance(values[0], AShare):
            stacked[spec.name] = values[0] if len(values) == 1 else sh.cat(values, 0)
        else:
            stacked[spec.name] = values[0] if len(values) == 1 else torch.cat(values, 0)
    return stacked


def split_rows(value: Any, batch: int) -> list[Any]:
    """Rows ``[i:i+1]`` of a batched output (a share or a tensor), one per query, each with
    the batch-1 shape."""
    if value.shape[0] != batch:
        raise ValueError(f"a batched output of shape {list(value.shape)} does not lead with the batch ({batch})")
    return [value[i:i + 1] for i in range(batch)]


class BatchOps(MpcOps):
    """:class:`MpcOps` for a batch of ``batch`` queries stacked on dimension 0: range checks
    open one count per query (same rounds and messages as one count: 9 rounds), record a
    :class:`RangeError` in :attr:`failed` for each query out of range and raise only when
    every query of the batch has failed."""

    def __init__(self, party: Party, batch: int) -> None:
        super().__init__(party)
        self.batch = batch
        self.failed: dict[int, RangeError] = {}

    def check_range(self, x: AShare, lower: float | None, upper: float | None, what: str) -> None:
        """Per-row version of :meth:`MpcOps.check_range` (the whole value when its leading
        dimension is not the batch, or for a batch of one: a lone query's behaviour)."""
        if self.batch == 1 or not x.shape or x.shape[0] != self.batch:
            try:
                super().check_range(x, lower, upper, what)
            except RangeError as e:
                self.failed.update({i: e for i in range(self.batch) if i not in self.failed})
                raise
            return
        counts = count_out_of_range_rows(self.party, x, lower, upper)
        per_row = x.a[0].numel()
        for i, count in enumerate(counts):
            if count and i not in self.failed:
                self.failed[i] = RangeError(what, lower, upper, count, per_row)
        if len(self.failed) == self.batch:
            raise self.failed[min(self.failed)]


@protocol("range_check")
def count_out_of_range_rows(party: Party, x: AShare, lower: float | None, upper: float | None) -> list[int]:
    """For each row of x (dimension 0), the number of its elements outside ``[lower, upper]``;
    only those counts are opened, to all three parties. The protocol of
    :func:`secure.mpc.compare.count_out_of_range` (one MSB pass for both ends, 8 rounds; the
    0/1 bits summed locally; 1 round to open) with a sum per row instead of one in all."""
    thresholds = check_range_arguments(lower, upper)
    s = scale.comparison_scale(x.frac_bits, thresholds, party.fp.frac_bits)
    if s != x.frac_bits:
        x = sh.lift(x, s)
    party.fp.encode(torch.tensor(thresholds, dtype=torch.float64))  # refuses thresholds the ring cannot hold
    diffs = []
    if lower is not None:  # MSB(x - lower) = 1{x < lower}
        diffs.append(sh.add_ring_public(x, -scale.encode_public(lower, s, x.device), party.id))
    if upper is not None:  # MSB(upper - x) = 1{x > upper}
        diffs.append(sh.add_ring_public(sh.neg(x), scale.encode_public(upper, s, x.device), party.id))
    rows = x.shape[0]
    count: AShare | None = None
    for bits in msb_many(party, diffs):
        total = bits.map(lambda t: t.reshape(rows, -1).sum(1))
        count = total if count is None else sh.add(count, total)
    assert count is not None
    (opened,) = open_many(party, [count])
    return [int(c) for c in opened.tolist()]


@dataclass
class BatchRun:
    """One party's result of a batched execution: per query, its rows of the outputs (None
    where the query failed a range check, with the error in ``failed``)."""

    outputs: list[list[Any] | None]
    failed: dict[int, RangeError] = field(default_factory=dict)


def run_batch(party: Party, graph: Graph, batched: Graph, weights: dict[str, AShare],
              per_query: list[dict[str, Any]], trace: Any = None) -> BatchRun:
    """Run ``batched`` (``graph`` for ``len(per_query)`` queries) on this party over the
    queries' interpreter inputs (``party_inputs`` of each, in the batch's order) and split
    the outputs back per query. ``trace`` is the interpreter's per-node hook.

    ``per_query`` is emptied once stacked, so that the queries' one-hot inputs are not held
    twice while the batch runs (what the caller still references stays, of course)."""
    size = len(per_query)
    ops = BatchOps(party, size)
    interpreter = Interpreter(batched, ops) if trace is None else Interpreter(batched, ops, trace)
    stacked = stack_inputs(graph, per_query)
    per_query.clear()
    try:
        outs, _ = interpreter.run(weights, stacked)
    except Exception as e:
        if ops.failed and len(ops.failed) == size and isinstance(e.__cause__, RangeError):
            return BatchRun([None] * size, dict(ops.failed))
        raise
    columns = [split_rows(out, size) for out in outs]
    rows = [None if i in ops.failed else [col[i] for col in columns] for i in range(size)]
    return BatchRun(rows, dict(ops.failed))


def run_mpc_batch(cluster: LocalCluster, graph: Graph, weight_shares: list[dict[str, AShare]],
                  clients: Sequence[ClientShares], graphs: BatchedGraphs | None = None
                  ) -> list[list[torch.Tensor] | RangeError]:
    """Run ``len(clients)`` queries of ``graph`` as one batch on the in-process engine;
    returns, per query in order, the client's reconstruction of its outputs, or the
    :class:`RangeError` that failed it alone."""
    batched = (graphs or BatchedGraphs()).get(graph, len(clients))

    def program(party: Party, weights: dict[str, AShare], parts: list[list[Any]]) -> BatchRun:
        ready = [party_inputs(graph, {p.key: p.tensor for p in q}, party.id, party.fp.frac_bits, party.device)
                 for q in parts]
        return run_batch(party, graph, batched, weights, ready)

    results = cluster.run(program, [(weight_shares[i], [c.per_party[i] for c in clients]) for i in range(3)])
    answers: list[list[torch.Tensor] | RangeError] = []
    for q in range(len(clients)):
        rows = [r.outputs[q] for r in results]
        if any(row is None for row in rows):
            answers.append(next(r.failed[q] for r in results if q in r.failed))
            continue
        answers.append([cluster.fp.decode(sh.reconstruct([row[k] for row in rows]).cpu(), rows[0][k].frac_bits)
                        for k in range(len(graph.outputs))])
    return answers
