"""Per-part breakdown of a secure run: time, bytes and rounds grouped by model part.

Every function reads :class:`secure.profile.profiler.Span` records (a party's profiler spans,
the spans a node reports to the client, an HE node's spans), named by the traced graph
node's module path. :func:`part_of` knows BERT's module paths and the causal LMs'
(LLaMA, Qwen2 and their kin: ``model.layers.N.self_attn`` ...; GPT-2:
``transformer.h.N.attn`` ...). A generation's steps (prefill, then one decode step per
token) are kept apart: :func:`mean_parts` averages the decode steps' parts per token and
:func:`steps_trace` lays the steps out one after the other on a timeline.

Imports only the profiler (ground floor); matplotlib only inside the chart functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from secure.profile.profiler import Span

REST = "pooling and the rest"
"""The part of a node no pattern names (BERT: the mean pooling)."""

CAUSAL_REST = "KV-cache copies and the rest"
"""The same for a causal LM's generation step: the step's own cache slices and the last
position's slice (nodes outside the model's layers)."""

Parts = dict[str, dict[str, float]]
"""{part: {"seconds", "bytes_sent", "rounds"}}, in first-seen order."""

_CAUSAL_PARTS = [
    # LLaMA, Qwen2, Mistral ... (``model.layers.N``)
    (re.compile(r"layers\.(\d+)\.self_attn"), "layer {} attention"),
    (re.compile(r"layers\.(\d+)\.mlp"), "layer {} MLP"),
    (re.compile(r"layers\.(\d+)\.input_layernorm"), "layer {} RMSNorm 1"),
    (re.compile(r"layers\.(\d+)\.post_attention_layernorm"), "layer {} RMSNorm 2"),
    (re.compile(r"layers\.(\d+)$"), "layer {} residual adds"),
    (re.compile(r"embed_tokens"), "embedding"),
    (re.compile(r"(^|\.)model\.norm$"), "final RMSNorm"),
    # GPT-2 (``transformer.h.N``)
    (re.compile(r"\bh\.(\d+)\.attn"), "layer {} attention"),
    (re.compile(r"\bh\.(\d+)\.mlp"), "layer {} MLP"),
    (re.compile(r"\bh\.(\d+)\.ln_1"), "layer {} LayerNorm 1"),
    (re.compile(r"\bh\.(\d+)\.ln_2"), "layer {} LayerNorm 2"),
    (re.compile(r"\bh\.(\d+)$"), "layer {} residual adds"),
    (re.compile(r"transformer\.(wte|wpe)$"), "embedding"),
    (re.compile(r"transformer\.ln_f$"), "final LayerNorm"),
    (re.compile(r"lm_head"), "LM head"),
]

_BERT_PARTS = [
    (re.compile(r"embeddings"), "embedding + LayerNorm"),
    (re.compile(r"layer\.(\d+)\.attention\.self"), "layer {} attention (QKV, softmax, context)"),
    (re.compile(r"layer\.(\d+)\.attention\.output\.dense"), "layer {} attention output"),
    (re.compile(r"layer\.(\d+)\.attention\.output"), "layer {} LayerNorm 1"),
    (re.compile(r"layer\.(\d+)\.intermediate"), "layer {} FFN up + GeLU"),
    (re.compile(r"layer\.(\d+)\.output\.dense"), "layer {} FFN down"),
    (re.compile(r"layer\.(\d+)\.output"), "layer {} LayerNorm 2"),
]

_PARTS = _CAUSAL_PARTS + _BERT_PARTS


def part_of(label: str, rest: str = REST) -> str:
    """Human name of the model part a traced graph node (its module path) belongs to:
    BERT's ("layer 3 FFN down"), a LLaMA-family LM's ("layer 0 attention", "layer 1 MLP",
    "layer 1 RMSNorm 2", "LM head") or GPT-2's ("layer 0 LayerNorm 1"); ``rest`` when
    no pattern matches."""
    for pattern, name in _PARTS:
        m = pattern.search(label)
        if m:
            return name.format(*(g for g in m.groups() if g is not None and g.isdigit()))
    return rest


def breakdown_table(spans: Iterable[Span], title: str = "part", rest: str = REST) -> str:
    """Aggregate spans by part; one line per part (seconds, share, MB sent, rounds)."""
    return parts_table(aggregate(spans, rest), title)


def parts_table(parts: Mapping[str, Mapping[str, float]], title: str = "part") -> str:
    """One line per part of an :func:`aggregate` (or :func:`mean_parts`): seconds, share of
    the time, MB sent, rounds (a mean over steps may have fractional rounds)."""
    total = sum(t["seconds"] for t in parts.values()) or 1.0
    lines = [f"{title:<44}{'seconds':>9}{'share':>8}{'MB sent':>10}{'rounds':>8}"]
    for name, t in parts.items():
        rounds = t["rounds"]
        shown = f"{int(rounds):8d}" if float(rounds).is_integer() else f"{rounds:8.1f}"
        lines.append(f"{name:<44}{t['seconds']:9.3f}{t['seconds'] / total:8.1%}{t['bytes_sent'] / 1e6:10.2f}{shown}")
    return "\n".join(lines)


def aggregate(spans: Iterable[Span], rest: str = REST) -> Parts:
    """{part: {"seconds", "bytes_sent", "rounds"}} in first-seen order."""
    out: Parts = {}
    for s in spans:
        t = out.setdefault(part_of(s.name, rest), {"seconds": 0.0, "bytes_sent": 0, "rounds": 0})
        t["seconds"] += s.duration_s
        t["bytes_sent"] += s.bytes_sent
        t["rounds"] += s.rounds
    return out


def mean_parts(steps: Sequence[Mapping[str, Mapping[str, float]]]) -> Parts:
    """The per-step mean of several steps' :func:`aggregate` (a part missing from a step
    counts as zero there): a decode step's cost per token."""
    out: Parts = {}
    for parts in steps:
        for name, t in parts.items():
            acc = out.setdefault(name, {"seconds": 0.0, "bytes_sent": 0.0, "rounds": 0.0})
            for key in acc:
                acc[key] += t[key] / len(steps)
    return out


def chrome_trace(spans: Iterable[Span], party: int = 0, rest: str = REST) -> dict:
    """A Chrome-trace / Perfetto timeline of the spans (``start_s`` from the query's start)."""
    return {"traceEvents": _events(spans, party, 0, 0.0, rest), "displayTimeUnit": "ms"}


def _events(spans: Iterable[Span], party: int, tid: int, offset_s: float, rest: str) -> list[dict]:
    return [{"name": s.name, "cat": part_of(s.name, rest), "ph": "X", "ts": round((offset_s + s.start_s) * 1e6, 1),
             "dur": round(s.duration_s * 1e6, 1), "pid": party, "tid": tid,
             "args": {"bytes_sent": s.bytes_sent, "rounds": s.rounds, "part": part_of(s.name, rest)}}
            for s in spans]


def steps_trace(steps: Sequence[tuple[str, float, Sequence[Span]]], party: int = 0, rest: str = CAUSAL_REST) -> dict:
    """A timeline of a generation: ``steps`` are (label, seconds, spans with ``start_s``
    from the step's start), laid out one after the other. Track 0 holds one segment per
    step (its label, time, bytes and rounds of its spans), track 1 the node spans."""
    events: list[dict] = [{"name": "thread_name", "ph": "M", "pid": party, "tid": tid, "args": {"name": name}}
                          for tid, name in ((0, "steps"), (1, "graph nodes"))]
    offset = 0.0
    for label, seconds, spans in steps:
        events.append({"name": label, "cat": "step", "ph": "X", "ts": round(offset * 1e6, 1),
                       "dur": round(seconds * 1e6, 1), "pid": party, "tid": 0,
                       "args": {"bytes_sent": sum(s.bytes_sent for s in spans),
                                "rounds": sum(s.rounds for s in spans)}})
        events += _events(spans, party, 1, offset, rest)
        offset += seconds
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chart(parts: Mapping[str, Mapping[str, float]], path: str, title: str) -> None:
    """A PNG with time and bytes per part, side by side (matplotlib, no display needed)."""
    write_sections_chart({"": parts}, path, title)


def write_sections_chart(sections: Mapping[str, Mapping[str, Mapping[str, float]]], path: str, title: str) -> None:
    """A PNG with time and bytes per part, side by side, one bar colour per section (e.g.
    "prefill" and "decode per token"); a single section needs no legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for parts in sections.values() for n in parts))
    k = len(sections)
    height = 0.8 / k
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.28 * len(names) * max(1, k * 0.7) + 1.5)), sharey=True)
    colours = (["#4477aa", "#cc6677"] if k == 1 else ["#4477aa", "#ddaa33", "#228833", "#aa3377"])
    for j, (label, parts) in enumerate(sections.items()):
        y = [i + (j - (k - 1) / 2) * height for i in range(len(names))]
        zero = {"seconds": 0.0, "bytes_sent": 0.0}
        seconds = [parts.get(n, zero)["seconds"] for n in names]
        mb = [parts.get(n, zero)["bytes_sent"] / 1e6 for n in names]
        axes[0].barh(y, seconds, height=height, color=colours[j % len(colours)] if k > 1 else colours[0],
                     label=label or None)
        axes[1].barh(y, mb, height=height, color=colours[j % len(colours)] if k > 1 else colours[1],
                     label=label or None)
    axes[0].set_xlabel("seconds")
    axes[1].set_xlabel("MB sent by the party")
    axes[0].set_yticks(list(range(len(names))), names, fontsize=8)
    axes[0].invert_yaxis()
    if k > 1:
        axes[1].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
