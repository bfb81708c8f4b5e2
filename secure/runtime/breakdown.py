"""Per-part breakdown of a secure run: time, bytes and rounds grouped by model part.

Every function reads :class:`secure.profile.profiler.Span` records (a party's profiler spans,
the spans a node reports to the client, an HE node's spans), named by the traced graph
node's module path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from secure.profile.profiler import Span

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


def breakdown_table(spans: Iterable[Span], title: str = "part") -> str:
    """Aggregate spans by part; one line per part (seconds, share, MB sent, rounds)."""
    totals = aggregate(spans)
    total = sum(t["seconds"] for t in totals.values()) or 1.0
    lines = [f"{title:<44}{'seconds':>9}{'share':>8}{'MB sent':>10}{'rounds':>8}"]
    for name, t in totals.items():
        lines.append(f"{name:<44}{t['seconds']:9.3f}{t['seconds'] / total:8.1%}{t['bytes_sent'] / 1e6:10.2f}"
                     f"{int(t['rounds']):8d}")
    return "\n".join(lines)


def aggregate(spans: Iterable[Span]) -> dict[str, dict[str, float]]:
    """{part: {"seconds", "bytes_sent", "rounds"}} in first-seen order."""
    out: dict[str, dict[str, float]] = {}
    for s in spans:
        t = out.setdefault(part_of(s.name), {"seconds": 0.0, "bytes_sent": 0, "rounds": 0})
        t["seconds"] += s.duration_s
        t["bytes_sent"] += s.bytes_sent
        t["rounds"] += s.rounds
    return out


def chrome_trace(spans: Iterable[Span], party: int = 0) -> dict:
    """A Chrome-trace / Perfetto timeline of the spans (``start_s`` from the query's start)."""
    events = [{"name": s.name, "cat": part_of(s.name), "ph": "X", "ts": round(s.start_s * 1e6, 1),
               "dur": round(s.duration_s * 1e6, 1), "pid": party, "tid": 0,
               "args": {"bytes_sent": s.bytes_sent, "rounds": s.rounds, "part": part_of(s.name)}}
              for s in spans]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chart(parts: dict[str, dict[str, float]], path: str, title: str) -> None:
    """A PNG with time and bytes per part, side by side (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(parts)
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.28 * len(names) + 1.5)), sharey=True)
    y = range(len(names))
    axes[0].barh(y, [parts[n]["seconds"] for n in names], color="#4477aa")
    axes[0].set_xlabel("seconds")
    axes[1].barh(y, [parts[n]["bytes_sent"] / 1e6 for n in names], color="#cc6677")
    axes[1].set_xlabel("MB sent by the party")
    axes[0].set_yticks(list(y), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
