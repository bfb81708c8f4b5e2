"""Per-part breakdown of a secure run: time, bytes and rounds grouped by model part."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

_PARTS = [
    (re.compile(r"embeddings"), "embedding + LayerNorm"),
    (re.compile(r"layer\.(\d+)\.attention\.self"), "layer {} attention (QKV, softmax, context)"),
    (re.compile(r"layer\.(\d+)\.attention\.output\.dense"), "layer {} attention output"),
    (re.compile(r"layer\.(\d+)\.attention\.output"), "layer {} LayerNorm 1"),
    (re.compile(r"layer\.(\d+)\.intermediate"), "layer {} FFN up + GeLU"),
    (re.compile(r"layer\.(\d+)\.output\.dense"), "layer {} FFN down"),
    (re.compile(r"layer\.(\d+)\.output"), "layer {} LayerNorm 2"),
]


def part_of(label: str) -> str:
    """Human name of the BERT part a traced graph node (its module path) belongs to."""
    for pattern, name in _PARTS:
        m = pattern.search(label)
        if m:
            return name.format(*m.groups())
    return "pooling and the rest"


def breakdown_table(spans: Iterable[tuple[str, float, int, int]], title: str = "part") -> str:
    """Aggregate (name, seconds, bytes, rounds) spans by part; one line per part."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for name, seconds, nbytes, rounds in spans:
        t = totals[part_of(name)]
        t[0] += seconds
        t[1] += nbytes
        t[2] += rounds
    total = sum(t[0] for t in totals.values()) or 1.0
    lines = [f"{title:<44}{'seconds':>9}{'share':>8}{'MB sent':>10}{'rounds':>8}"]
    for name, (secs, nbytes, rounds) in totals.items():
        lines.append(f"{name:<44}{secs:9.3f}{secs / total:8.1%}{nbytes / 1e6:10.2f}{int(rounds):8d}")
    return "\n".join(lines)
