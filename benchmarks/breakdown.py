"""Per-layer and per-operation breakdown of one secure query.

    python benchmarks/breakdown.py --model minilm --seq 32 [--recipe ours] [--grpc]

Runs one query (after a warm-up) with every secret graph node traced on party 0, and
writes next to each other, under ``--out`` (default benchmarks/results/breakdown_<model>_<seq>):
``table.txt`` (the console table), ``breakdown.json`` (per part and per protocol call:
seconds, bytes sent, rounds, share of the total), ``chart.png`` and ``trace.json`` (a
Chrome-trace / Perfetto timeline: open it at ui.perfetto.dev or chrome://tracing).
With ``--grpc`` the query goes through three party nodes on loopback, which report
their spans to the client.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from secure.graph.capture import capture
from secure.graph.passes import RECIPES, rewrite
from secure.models import SentenceEncoder, load_minilm, tiny_bert
from secure.mpc.engine import LocalCluster
from secure.runtime.breakdown import aggregate, breakdown_table, chrome_trace, write_chart
from secure.runtime.execute import QUERY_SPAN, deal_inputs, deal_weights, run_mpc


def _inputs(model_name: str, seq: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    if model_name == "tiny-bert":
        ids = torch.randint(1, 200, (1, seq), generator=torch.Generator().manual_seed(0))
        return SentenceEncoder(tiny_bert()), {"input_ids": ids, "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    encoder, tokenizer = load_minilm()
    text = "Secure inference lets a client ask a question of a model it may not see. " * 8
    enc = tokenizer([text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return SentenceEncoder(encoder), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def in_process(model_name: str, seq: int, recipe: str) -> dict:
    """Spans of party 0 for one in-process query: nodes (start_s from the query's start),
    protocol calls, totals."""
    model, inputs = _inputs(model_name, seq)
    graph, weights = capture(model, inputs)
    secure_graph = rewrite(graph, RECIPES[recipe])
    cluster = LocalCluster()
    shares = deal_weights(weights, cluster.fp)
    run_mpc(cluster, secure_graph, shares, deal_inputs(secure_graph, inputs, cluster.fp))  # warm-up
    for p in cluster.parties:
        p.profiler.clear()
    bytes0, rounds0 = cluster.bytes_sent(), cluster.rounds
    t0 = time.perf_counter()
    run_mpc(cluster, secure_graph, shares, deal_inputs(secure_graph, inputs, cluster.fp), trace_spans=True)
    wall = time.perf_counter() - t0
    spans = cluster.parties[0].profiler.spans
    query = next(s for s in spans if s.depth == 0 and s.name == QUERY_SPAN)
    nodes = [s for s in spans if s.depth == 1]
    calls: dict[str, dict[str, float]] = {}
    for s in spans:
        if s.depth == 2:  # the protocol calls directly inside each node
            c = calls.setdefault(s.name, {"calls": 0, "seconds": 0.0, "bytes_sent": 0, "rounds": 0})
            c["calls"] += 1
            c["seconds"] += s.duration_s
            c["bytes_sent"] += s.bytes_sent
            c["rounds"] += s.rounds
    return {
        "mode": "in-process", "wall_seconds": wall, "total_seconds": query.duration_s,
        "total_bytes_sent": [b - b0 for b, b0 in zip(cluster.bytes_sent(), bytes0)], "rounds": cluster.rounds - rounds0,
        "nodes": [s.since(query.start_s) for s in nodes],
        "protocol_calls": calls,
    }


def over_grpc(seq: int, recipe: str) -> dict:
    """Spans reported by party 0's node for one query through three nodes on loopback."""
    from client.sdk import local_client
    from party.launch import LocalNodes

    with tempfile.TemporaryDirectory() as tmp, LocalNodes(Path(tmp), recipe=recipe, seq_lens=(seq,)) as nodes:
        with local_client(nodes) as client:
            inputs = _inputs("minilm", seq)[1]
            client.query(inputs)  # warm-up
            t0 = time.perf_counter()
            result = client.query(inputs, trace=True)
            wall = time.perf_counter() - t0
    return {"mode": "grpc", "wall_seconds": wall, "total_seconds": result.party_seconds[0],
            "total_bytes_sent": result.bytes_sent, "rounds": result.rounds,
            "nodes": result.spans, "protocol_calls": {}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=["minilm", "tiny-bert"])
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--grpc", action="store_true", help="through three party nodes on loopback (minilm only)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or Path(f"benchmarks/results/breakdown_{args.model}_{args.seq}{'_grpc' if args.grpc else ''}")
    out.mkdir(parents=True, exist_ok=True)
    run = over_grpc(args.seq, args.recipe) if args.grpc else in_process(args.model, args.seq, args.recipe)
    parts = aggregate(run["nodes"])
    covered = sum(p["seconds"] for p in parts.values())
    table = breakdown_table(run["nodes"], f"part ({run['mode']}, party 0)")
    summary = (f"{args.model}, seq {args.seq}, recipe {args.recipe}, {run['mode']}: {run['wall_seconds']:.2f} s wall, "
               f"{run['rounds']} rounds, MB sent per party {[round(b / 1e6, 2) for b in run['total_bytes_sent']]}; "
               f"node spans cover {covered / run['total_seconds']:.1%} of party 0's time")
    print(summary)
    print(table)
    if run["protocol_calls"]:
        print(f"\n{'protocol call':<20}{'calls':>7}{'seconds':>10}{'MB sent':>10}{'rounds':>8}")
        for name, c in sorted(run["protocol_calls"].items(), key=lambda kv: -kv[1]["seconds"]):
            print(f"{name:<20}{c['calls']:7d}{c['seconds']:10.3f}{c['bytes_sent'] / 1e6:10.2f}{c['rounds']:8d}")
    (out / "table.txt").write_text(summary + "\n" + table + "\n")
    payload = {"model": args.model, "seq": args.seq, "recipe": args.recipe, **{k: v for k, v in run.items()
               if k != "nodes"}, "parts": {k: {**v, "share": v["seconds"] / (covered or 1)} for k, v in parts.items()}}
    (out / "breakdown.json").write_text(json.dumps(payload, indent=2))
    (out / "trace.json").write_text(json.dumps(chrome_trace(run["nodes"])))
    write_chart(parts, str(out / "chart.png"), summary.split(":")[0])
    print(f"wrote {out}/table.txt, breakdown.json, trace.json, chart.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
