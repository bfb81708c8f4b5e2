"""Per-call profiling: wall time, bytes sent and communication rounds, as :class:`Span` records.

Every protocol entry point is wrapped with :func:`protocol`; when the party has a
:class:`Profiler` attached, each call becomes a :class:`Span`. Spans nest (a GeLU span
contains its comparison and multiplication spans); ``summary(top_level_only=True)`` adds
up the outermost spans only, so totals are not counted twice.

:class:`Span` is the one span type of the project: the profiler records it, the nodes send it
as the ``Span`` protocol-buffer message (:meth:`Span.to_proto` / :meth:`Span.from_proto`, which
take the generated message class or message, so this module never imports the protos), the
client returns it, and the breakdown tables, charts and timelines read it.

Ground floor: this module imports nothing of the project (``party`` is any object with
``profiler``, ``bytes_sent`` and ``rounds``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M")


@dataclass(frozen=True)
class Span:
    """One timed piece of work on one party: a protocol call, a graph node or a whole query.

    ``start_s`` is a ``time.perf_counter()`` reading while recording, and seconds since the
    query started once it has crossed the wire (:meth:`since`); ``rounds`` counts
    communication rounds (client round trips for an HE node); ``depth`` is the nesting level
    (0: outermost; not carried by the protocol-buffer message, which holds outermost spans).
    """

    name: str
    start_s: float
    duration_s: float = 0.0
    bytes_sent: int = 0
    rounds: int = 0
    depth: int = 0

    def since(self, origin_s: float) -> Span:
        """The same span with its start counted from ``origin_s``."""
        return dataclasses.replace(self, start_s=self.start_s - origin_s)

    def to_proto(self, message_cls: Callable[..., M]) -> M:
        """This span as a ``Span`` message (``message_cls`` is the generated class, ``pb2.Span``)."""
        return message_cls(name=self.name, start=self.start_s, seconds=self.duration_s,
                           bytes_sent=self.bytes_sent, rounds=self.rounds)

    @classmethod
    def from_proto(cls, message: Any) -> Span:
        """A span read back from a ``Span`` message (depth 0)."""
        return cls(message.name, message.start, message.seconds, int(message.bytes_sent), int(message.rounds))


@dataclass
class OpTotals:
    """Aggregate of all spans with one name."""

    calls: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    rounds: int = 0


@dataclass
class Profiler:
    """Collects spans for one party, in the order they start."""

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
    """Record the enclosed work of ``party`` as one span named ``name`` (if it profiles).

    The span takes its place in ``spans`` when the work starts (so spans stay in start
    order) and is completed, as a new frozen record in that place, when it ends.
    """
    prof: Profiler | None = party.profiler
    if prof is None:
        yield
        return
    opened = Span(name, time.perf_counter(), depth=prof._depth)
    index = len(prof.spans)
    prof.spans.append(opened)
    bytes0, rounds0 = party.bytes_sent, party.rounds
    prof._depth += 1
    try:
        yield
    finally:
        prof._depth -= 1
        done = dataclasses.replace(opened, duration_s=time.perf_counter() - opened.start_s,
                                   bytes_sent=party.bytes_sent - bytes0, rounds=party.rounds - rounds0)
        if index < len(prof.spans) and prof.spans[index] is opened:  # not cleared meanwhile
            prof.spans[index] = done


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
