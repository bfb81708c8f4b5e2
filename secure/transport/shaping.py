"""Link emulation for benchmarks: a one-way delay and a rate on every peer message.

Where the kernel cannot shape a link (no ``sch_netem`` in containers), the party nodes
can emulate one themselves: each directed peer link gets a :class:`LinkShaper` that
stamps every outgoing frame with the time it would leave the far end of a link of the
given :class:`LinkShape`, and the link's stream releases the frame no earlier than that.

Timing of one directed link (a FIFO wire with a queue in front of it)::

    start = max(send_time, busy_until)        # wait behind frames still serializing
    busy_until = start + bytes * 8 / rate     # the wire is busy while this one serializes
    due = busy_until + delay                  # then it propagates for the one-way delay

The sender never waits: frames are stamped and queued, and the releasing thread (the
stream's request consumer, one per link) sleeps until each frame's due time, so several
messages are in flight at once, as on a real long link. Due times never decrease along a
link, so releasing in queue order keeps the per-link order and never holds a frame behind
a later one. Real transmission (loopback) comes on top of the emulated link.

This is a benchmark and emulation feature (``python -m party ... --link-shape
40ms,100mbit``); nodes never shape unless told to.
"""

from __future__ import annotations

import argparse
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_DELAY_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}
# tc's bit-rate suffixes (SI); tc's "bps" family means *bytes* per second, so it is refused
# rather than silently read as bits
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TOKEN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class LinkShape:
    """An emulated link: ``delay_s`` one-way delay (seconds) and ``rate_bps`` bits per
    second (None: unlimited)."""

    delay_s: float = 0.0
    rate_bps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ValueError(f"a link's delay must be a finite number of seconds >= 0, got {self.delay_s!r}")
        if self.rate_bps is not None and not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise ValueError(f"a link's rate must be a finite number of bits per second > 0, got {self.rate_bps!r}")

    @classmethod
    def parse(cls, text: str) -> LinkShape:
        """A shape from ``"40ms,100mbit"``, ``"1ms,5gbit"``, ``"20ms"`` or ``"100mbit"``
        (delay units s, ms, us; rate units bit, kbit, mbit, gbit, tbit, as tc writes them)."""
        delay: float | None = None
        rate: float | None = None
        parts = [p for p in text.lower().split(",") if p.strip()]
        if not parts or len(parts) > 2:
            raise ValueError(f"link shape {text!r}: expected DELAY,RATE such as '40ms,100mbit'")
        for part in parts:
            m = _TOKEN.match(part)
            if m is None:
                raise ValueError(f"link shape {text!r}: cannot read {part.strip()!r} (e.g. '40ms' or '100mbit')")
            value, unit = float(m.group(1)), m.group(2)
            if unit in _DELAY_UNITS and delay is None:
                delay = value * _DELAY_UNITS[unit]
            elif unit in _RATE_UNITS and rate is None:
                rate = value * _RATE_UNITS[unit]
            elif unit in _DELAY_UNITS or unit in _RATE_UNITS:
                raise ValueError(f"link shape {text!r}: gives the {'delay' if unit in _DELAY_UNITS else 'rate'} twice")
            else:
                raise ValueError(f"link shape {text!r}: unknown unit {unit!r} (delay: s, ms, us; rate: bit, kbit, "
                                 "mbit, gbit, tbit -- bits per second)")
        return cls(delay or 0.0, rate)

    @property
    def shaped(self) -> bool:
        """Whether the shape changes anything (a zero delay and no rate limit is loopback)."""
        return self.delay_s > 0 or self.rate_bps is not None

    def serialization_s(self, nbytes: int) -> float:
        """Seconds ``nbytes`` occupy the wire at the link's rate (0 when unlimited)."""
        return 0.0 if self.rate_bps is None else nbytes * 8 / self.rate_bps

    def __str__(self) -> str:
        delay = f"{self.delay_s * 1e3:g}ms"
        if self.rate_bps is None:
            return delay
        for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
            if self.rate_bps >= scale:
                return f"{delay},{self.rate_bps / scale:g}{unit}"
        return f"{delay},{self.rate_bps:g}bit"


def link_shape_arg(text: str) -> LinkShape | None:
    """``LinkShape.parse`` for an argparse option (its message on a bad value); "none" or
    "off" is no shaping."""
    if text.strip().lower() in ("none", "off", ""):
        return None
    try:
        return LinkShape.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class LinkShaper:
    """The wire clock of one directed link: stamps frames with their due time and
    releases them at it. ``clock`` and ``sleep`` are injectable for tests."""

    def __init__(self, shape: LinkShape, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.shape = shape
        self.clock = clock
        self.sleep = sleep
        self._busy_until = -math.inf
        self._lock = threading.Lock()

    def due(self, nbytes: int) -> float:
        """When a frame of ``nbytes`` sent now arrives: after the frames before it have left
        the wire, its own serialization, and the one-way delay."""
        with self._lock:
            start = max(self.clock(), self._busy_until)
            self._busy_until = start + self.shape.serialization_s(nbytes)
            return self._busy_until + self.shape.delay_s

    def stamp(self, frames: Iterable[bytes]) -> list[tuple[float, bytes]]:
        """``frames`` (sent now, in this order) with their due times."""
        return [(self.due(len(f)), f) for f in frames]

    def release(self, stamped: Iterable[tuple[float, T]]) -> Iterator[T]:
        """The items of ``stamped`` (due time, item), each yielded no earlier than its due
        time and in order; runs on the link's releasing thread, never the sender's."""
        for due, item in stamped:
            wait = due - self.clock()
            while wait > 0:  # a sleep cut short (a signal) must not release a frame early
                self.sleep(wait)
                wait = due - self.clock()
            yield item
