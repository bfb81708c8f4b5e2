"""Padded-length buckets: the lengths a query's tokens are padded to, and the choice of one.

A model is captured, rewritten and dealt once per padded length; a client pads its text to
the smallest length that holds it, so the parties learn only the bucket, not the length.
The dealer (``party.deal``), the client (``client.sdk``), the demos and the fidelity report
all take their lengths from here. Imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Sequence

BUCKETS: tuple[int, ...] = (16, 32, 64, 128)
"""The padded lengths dealt by default, shortest first."""


def bucket_for(n_tokens: int, available: Sequence[int] = BUCKETS) -> int:
    """The smallest length of ``available`` that holds ``n_tokens``; the longest when none
    does (the text is then truncated to it)."""
    if not available:
        raise ValueError("no padded lengths to choose from")
    lengths = sorted(available)
    return next((s for s in lengths if s >= n_tokens), lengths[-1])


def buckets_up_to(longest: int, buckets: Sequence[int] = BUCKETS) -> list[int]:
    """The buckets no longer than ``longest``, shortest first; ``[longest]`` when there is none."""
    return sorted(b for b in buckets if b <= longest) or [longest]
