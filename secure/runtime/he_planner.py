"""The level planner: depth, parameters and rotation keys of a graph, before running it.

It runs the graph through :class:`~secure.he.ops.HeOps` on a
:class:`~secure.he.engine.GhostEngine` (level counters, no cryptography) with a
:class:`GhostRefresh` session (the level-counting stand-in for the client), so the plan
follows exactly the code path of the real run: the same layouts, products, rotations
and refreshes.

* With client refresh (the default) any graph fits the cheapest parameter set
  (N = 8192, 4 levels); the plan lists the refreshes and the rotation steps whose Galois
  keys the client must generate.
* Without refresh, the whole graph must fit one modulus chain: the plan picks the
  smallest 128-bit set with enough levels, or raises :class:`HeDepthError` naming the
  node and module where the chain runs out and how many levels are missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from secure.graph.ir import Graph
from secure.he.engine import GhostCt, GhostEngine, OutOfLevelsError
from secure.he.layout import Cipher, Plain, canonical
from secure.he.ops import HeOps
from secure.he.params import PARAM_SETS, CkksParams
from secure.he.refresh import RefreshSession, Trip, refreshed
from secure.runtime.interpreter import Interpreter, InterpreterError

DEPTH_PROBE_LEVELS: int = 1_000_000


class HeDepthError(ValueError):
    """The graph cannot fit one modulus chain at 128-bit security (refresh disabled)."""


@dataclass
class HePlan:
    params: CkksParams
    steps: list[int]
    refreshes: int
    relayouts: int
    depth: int
    products: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "params": self.params.to_dict()}


class GhostRefresh(RefreshSession):
    """The planner's trips on level counters: no mask, no client; a trip gives fresh top-level
    counters and is counted as the real one would be. With ``count_depth`` a trip keeps its
    levels and is not counted (the depth of the whole graph without refresh)."""

    def __init__(self, engine: GhostEngine, allow_refresh: bool, count_depth: bool) -> None:
        super().__init__(engine, allow_refresh=allow_refresh)
        self.count_depth = count_depth

    def trip(self, items: list[Trip]) -> list[Cipher]:
        if not self.count_depth:
            return super().trip(items)
        out = []
        for x, target, count, _ in items:
            low = min(self.engine.level(c) for c in x.cts)
            out.append(Cipher([self.engine.lower_to(self.engine.encrypt(None), low) for _ in range(count)],
                              x.index if target is None else target, None, True))
        return out

    def exchange(self, items: list[Trip]) -> list[Cipher]:
        return [refreshed(x, target, [self.engine.encrypt(None) for _ in range(count)])
                for x, target, count, _ in items]

    def flooded(self, c: Cipher, flood_bits: int | None) -> Cipher:
        return c


def _ghost_inputs(graph: Graph, inputs: dict[str, Any], engine: GhostEngine) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in graph.inputs:
        value = inputs[spec.name]
        if spec.kind == "client":
            index, count = canonical(value.shape, engine.slots)
            out[spec.name] = Cipher([GhostCt(engine.top_level) for _ in range(count)], index.reshape(value.shape))
        else:
            out[spec.name] = value
    return out


def _run_ghost(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, Any], params: CkksParams,
               levels: int | None, allow_refresh: bool, count_depth: bool) -> tuple[GhostRefresh, GhostEngine, int]:
    engine = GhostEngine(params, levels)
    session = GhostRefresh(engine, allow_refresh, count_depth)
    outs, _ = Interpreter(graph, HeOps(session)).run({k: Plain(v.to(torch.float64)) for k, v in weights.items()},
                                                     _ghost_inputs(graph, inputs, engine))
    lowest = min((c.level for o in outs if isinstance(o, Cipher) for c in o.cts), default=engine.top_level)
    return session, engine, engine.top_level - lowest


def graph_depth(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, Any]) -> int:
    """Multiplicative depth of the whole graph without any refresh."""
    _, _, depth = _run_ghost(graph, weights, inputs, PARAM_SETS[0], DEPTH_PROBE_LEVELS, False, True)
    return depth


def plan(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, Any], *,
         allow_refresh: bool = True, params: CkksParams | None = None) -> HePlan:
    """Parameters, rotation steps and refresh count for running ``graph`` on inputs of
    these shapes (client inputs may be any tensor of the right shape)."""
    depth = graph_depth(graph, weights, inputs)
    if allow_refresh:
        chosen = params or PARAM_SETS[0]
        session, engine, _ = _run_ghost(graph, weights, inputs, chosen, None, True, False)
        return HePlan(chosen, sorted(engine.steps), session.refreshes, session.relayouts, depth,
                      dict(engine.stats.count))
    for candidate in ([params] if params else PARAM_SETS):
        if candidate.usable_levels >= depth:
            try:
                _, engine, _ = _run_ghost(graph, weights, inputs, candidate, None, False, False)
            except InterpreterError as e:
                if isinstance(e.__cause__, OutOfLevelsError):
                    continue
                raise
            return HePlan(candidate, sorted(engine.steps), 0, 0, depth, dict(engine.stats.count))
    largest = params or PARAM_SETS[-1]
    where = ""
    try:
        _run_ghost(graph, weights, inputs, largest, None, False, False)
    except InterpreterError as e:
        where = f" The chain runs out at {e}."
    missing = max(depth - largest.usable_levels, 0)
    raise HeDepthError(
        f"the graph needs {depth} multiplicative levels without client refresh; the largest parameter set "
        f"at 128-bit security (N={largest.poly_degree}, {largest.total_bits}-bit modulus) has {largest.usable_levels}: "
        f"{missing} levels missing." + where +
        " Enable client refresh (the default) or run fewer layers per query.")
