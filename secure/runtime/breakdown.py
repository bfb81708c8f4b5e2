"""Per-part breakdown of a secure run: time, bytes and rounds grouped by model part."""

from __future__ import annotations

import re
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
    totals = aggregate(spans)
    total = sum(t["seconds"] for t in totals.values()) or 1.0
    lines = [f"{title:<44}{'seconds':>9}{'share':>8}{'MB sent':>10}{'rounds':>8}"]
    for name, t in totals.items():
        lines.append(f"{name:<44}{t['seconds']:9.3f}{t['seconds'] / total:8.1%}{t['bytes_sent'] / 1e6:10.2f}"
                     f"{int(t['rounds']):8d}")
    return "\n".join(lines)


def aggregate(spans: Iterable[tuple[str, float, int, int]]) -> dict[str, dict[str, float]]:
    """{part: {"seconds", "bytes_sent", "rounds"}} in first-seen order."""
    out: dict[str, dict[str, float]] = {}
    for name, seconds, nbytes, rounds in spans:
        t = out.setdefault(part_of(name), {"seconds": 0.0, "bytes_sent": 0, "rounds": 0})
        t["seconds"] += seconds
        t["bytes_sent"] += nbytes
        t["rounds"] += rounds
    return out


def chrome_trace(spans: Iterable[tuple[str, float, float, int, int]], party: int = 0) -> dict:
    """A Chrome-trace / Perfetto timeline: spans are (name, start_s, seconds, bytes, rounds)."""
    events = [{"name": name, "cat": part_of(name), "ph": "X", "ts": round(start * 1e6, 1),
               "dur": round(seconds * 1e6, 1), "pid": party, "tid": 0,
               "args": {"bytes_sent": nbytes, "rounds": rounds, "part": part_of(name)}}
              for name, start, seconds, nbytes, rounds in spans]
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
