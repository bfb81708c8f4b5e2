"""Per-protocol-call profiling: wall time, bytes sent and communication rounds.

Every protocol entry point is wrapped with :func:`protocol`; when the party has a
:class:`Profiler` attached, each call becomes a :class:`Span`. Spans nest (a GeLU span
contains its comparison and multiplication spans); ``summary(top_level_only=True)`` adds
up the outermost spans only, so totals are not counted twice.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Span:
    """One protocol call on one party."""

    name: str
    depth: int
    start_s: float
    duration_s: float = 0.0
    bytes_sent: int = 0
    rounds: int = 0


@dataclass
class OpTotals:
    """Aggregate of all spans with one name."""

    calls: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    rounds: int = 0


@dataclass
class Profiler:
    """Collects spans for one party."""

    spans: list[Span] = field(default_factory=list)
    _depth: int = 0

    def summary(self, top_level_only: bool = False) -> dict[str, OpTotals]:
        """Totals per span name (outermost spans only when ``top_level_only``)."""
        out: dict[str, OpTotals] = {}
        for s in self.spans:
            if top_level_only and s.depth != 0:
                continue
            t = out.setdefault(s.name, OpTotals())
            t.calls += 1
            t.seconds += s.duration_s
            t.bytes_sent += s.bytes_sent
            t.rounds += s.rounds
        return out

    def clear(self) -> None:
        self.spans.clear()


@contextlib.contextmanager
def span(party: Any, name: str) -> Iterator[None]:
    """Record the enclosed work of ``party`` as one span named ``name`` (if it profiles)."""
    prof: Profiler | None = party.profiler
    if prof is None:
        yield
        return
    record = Span(name, prof._depth, time.perf_counter())
    prof.spans.append(record)
    bytes0, rounds0 = party.bytes_sent, party.rounds
    prof._depth += 1
    try:
        yield
    finally:
        prof._depth -= 1
        record.duration_s = time.perf_counter() - record.start_s
        record.bytes_sent = party.bytes_sent - bytes0
        record.rounds = party.rounds - rounds0


def protocol(name: str) -> Callable[[F], F]:
    """Decorator for protocol functions whose first argument is a ``Party``: each call is
    recorded as a span (time, bytes sent by this party, rounds) when the party profiles."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(party: Any, *args: Any, **kwargs: Any) -> Any:
            with span(party, name):
                return fn(party, *args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
