"""Per-layer and per-operation breakdown of one secure query, or of a generation per token.

    python benchmarks/breakdown.py --model minilm --seq 32 [--recipe ours] [--grpc]
    python benchmarks/breakdown.py --generate 16 [--model tiny-llama] [--seq 16] [--recipe ours]

Runs one query (after a warm-up) with every secret graph node traced on party 0, and
writes next to each other, under ``--out`` (default benchmarks/results/breakdown_<model>_<seq>):
``table.txt`` (the console table), ``breakdown.json`` (per part and per protocol call:
seconds, bytes sent, rounds, share of the total), ``chart.png`` and ``trace.json`` (a
Chrome-trace / Perfetto timeline: open it at ui.perfetto.dev or chrome://tracing).
With ``--grpc`` the query goes through three party nodes on loopback, which report
their spans to the client.

With ``--generate N`` a causal LM (``tiny-llama``: the shipped LM; ``random-llama``; or a
model folder) generates N tokens greedily on three parties in process from a held-out
prompt left-padded to the prompt bucket ``--seq`` (default 16), each step traced: the
same four files (default folder benchmarks/results/breakdown_<model>_generate<N>), with
the prefill apart from the decode steps: the table's sections "prefill" and "decode (per
token, mean over steps)", then one line per step; the JSON's per-step and per-token
figures (time, bytes, rounds, parts); the chart's two bars per part; the trace's steps
one after the other (a track of steps above the node spans).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from secure.graph.capture import capture
from secure.graph.passes import RECIPES, rewrite
from secure.models import SentenceEncoder, load_minilm, tiny_bert
from secure.mpc.engine import LocalCluster
from secure.runtime.breakdown import (
    CAUSAL_REST,
    aggregate,
    breakdown_table,
    chrome_trace,
    mean_parts,
    parts_table,
    steps_trace,
    write_chart,
    write_sections_chart,
)
from secure.runtime.execute import QUERY_SPAN, deal_inputs, deal_weights, run_mpc
from secure.runtime.generate import StepCost, generate_mpc

QUERY_MODELS = ("minilm", "tiny-bert")


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
    secure_graph = rewrite(graph, RECIPES[recipe], weights=weights)
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


def _generation_benchmark() -> ModuleType:
    """benchmarks/generation.py (model loading, prompts, compilation), whichever way this
    script was started."""
    if "generation_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("generation_benchmark", Path(__file__).with_name("generation.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["generation_benchmark"]


def _totals(steps: list[StepCost]) -> dict[str, float]:
    return {"seconds": sum(s.seconds for s in steps) / len(steps),
            "bytes_sent": sum(s.bytes_sent for s in steps) / len(steps),
            "rounds": sum(s.rounds for s in steps) / len(steps)}


def in_process_generation(model_name: str, bucket: int, new_tokens: int, recipe: str) -> dict[str, Any]:
    """One traced generation of ``new_tokens`` tokens (after a warm-up): per step its cost
    (wall time, rounds, bytes of the party that sent most) and parts (party 0's node
    spans), the prefill's parts, the decode steps' mean per token."""
    gen = _generation_benchmark()
    model = gen.load_lm(model_name)
    capacities = gen.capacities_for(bucket, new_tokens)
    graphs = gen.compile_causal(model.lm, recipe, [bucket], capacities)
    cluster = LocalCluster()
    shares = deal_weights(graphs.weights, cluster.fp)
    prompt = torch.tensor(gen.draw_prompts(model, 1)[0])
    generate_mpc(cluster, graphs, shares, prompt, min(2, new_tokens), bucket)  # warm-up
    t0 = time.perf_counter()
    out = generate_mpc(cluster, graphs, shares, prompt, new_tokens, bucket, trace=True)
    wall = time.perf_counter() - t0
    steps = []
    for k, s in enumerate(out.steps):
        label = "prefill" if s.kind == "prefill" else f"decode {k} (capacity {s.capacity})"
        steps.append({"step": k, "label": label, "kind": s.kind, "capacity": s.capacity, "seconds": s.seconds,
                      "bytes_sent": s.bytes_sent, "rounds": s.rounds,
                      "node_seconds": sum(x.duration_s for x in s.spans), "parts": aggregate(s.spans, CAUSAL_REST)})
    decode = [s for s in out.steps if s.kind == "decode"]
    prefill = [s for s in out.steps if s.kind == "prefill"]
    by_capacity = {c: {"steps": sum(s.capacity == c for s in decode), **_totals([s for s in decode if s.capacity == c])}
                   for c in sorted({s.capacity for s in decode})}
    return {
        "mode": "in-process generation", "model": model.name, "model_note": model.note, "recipe": recipe,
        "recipe_forms": RECIPES[recipe].to_dict(), "code": gen.code_version(),
        "prompt_bucket": bucket, "capacities": capacities, "new_tokens": new_tokens,
        "prompt": model.decode(prompt.tolist()), "continuation": model.decode(out.tokens), "tokens": out.tokens,
        "wall_seconds": wall, "load_average_1_5_15_min": os.getloadavg(),
        "prefill": {**_totals(prefill), "parts": steps[0]["parts"]},
        "decode_per_token": ({"steps": len(decode), **_totals(decode),
                              "parts": mean_parts([x["parts"] for x in steps[1:]])} if decode else None),
        "decode_by_capacity": by_capacity,
        "steps": steps,
        "trace_steps": [(x["label"], s.seconds, s.spans) for x, s in zip(steps, out.steps)],
    }


def _shares(parts: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    total = sum(p["seconds"] for p in parts.values()) or 1.0
    return {k: {**v, "share": v["seconds"] / total} for k, v in parts.items()}


def generation_report(run: dict[str, Any], out: Path) -> None:
    """The four files of a generation breakdown, and the table on the console."""
    prefill, decode = run["prefill"], run["decode_per_token"]
    summary = (f"{run['model']}, recipe {run['recipe']}, {run['new_tokens']} tokens from a prompt in bucket "
               f"{run['prompt_bucket']} (capacities {run['capacities']}), in process, party 0: "
               f"{run['wall_seconds']:.2f} s wall; prefill {prefill['seconds']:.3f} s, "
               f"{prefill['bytes_sent'] / 1e6:.2f} MB, {prefill['rounds']:.0f} rounds")
    if decode:
        summary += (f"; decode per token {decode['seconds']:.3f} s, {decode['bytes_sent'] / 1e6:.3f} MB, "
                    f"{decode['rounds']:.1f} rounds (mean of {decode['steps']} steps)")
    sections = [f"prompt {run['prompt']!r} -> {run['continuation']!r}", "",
                parts_table(prefill["parts"], "prefill")]
    if decode:
        sections += ["", parts_table(decode["parts"], f"decode (per token, mean over {decode['steps']} steps)")]
    sections += ["", "per step: wall seconds, MB sent by the party that sent most (the parts above: party 0's "
                 "node spans; roles rotate), rounds, share of the time inside graph nodes",
                 f"{'step':<32}{'seconds':>9}{'MB sent':>10}{'party 0':>10}{'rounds':>8}{'in nodes':>10}"]
    for s in run["steps"]:
        party0 = sum(p["bytes_sent"] for p in s["parts"].values())
        sections.append(f"{s['label']:<32}{s['seconds']:9.3f}{s['bytes_sent'] / 1e6:10.3f}{party0 / 1e6:10.3f}"
                        f"{s['rounds']:8d}{s['node_seconds'] / s['seconds']:10.1%}")
    table = "\n".join(sections)
    print(summary)
    print(table)
    (out / "table.txt").write_text(summary + "\n" + table + "\n")
    payload = {k: v for k, v in run.items() if k != "trace_steps"}
    payload["prefill"] = {**prefill, "parts": _shares(prefill["parts"])}
    if decode:
        payload["decode_per_token"] = {**decode, "parts": _shares(decode["parts"])}
        payload["ratios"] = {k: decode[k] / prefill[k] for k in ("seconds", "bytes_sent", "rounds")}
    (out / "breakdown.json").write_text(json.dumps(payload, indent=2))
    (out / "trace.json").write_text(json.dumps(steps_trace(run["trace_steps"])))
    chart = {"prefill": prefill["parts"], **({"decode per token (mean)": decode["parts"]} if decode else {})}
    write_sections_chart(chart, str(out / "chart.png"), f"{run['model']}: prefill and decode per token")
    print(f"wrote {out}/table.txt, breakdown.json, trace.json, chart.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="query: minilm (default) or tiny-bert; --generate: tiny-llama "
                    "(the shipped LM, default), random-llama or a model folder")
    ap.add_argument("--seq", type=int, default=None, help="padded length (default 32); --generate: the prompt "
                    "bucket (default 16)")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="break down a greedy generation of N tokens by step (a causal LM)")
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--grpc", action="store_true", help="through three party nodes on loopback (minilm only)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.generate:
        if args.grpc:
            ap.error("--generate runs in process only")
        model = args.model or "tiny-llama"
        run = in_process_generation(model, args.seq or 16, args.generate, args.recipe)
        out = args.out or Path(f"benchmarks/results/breakdown_{run['model']}_generate{args.generate}")
        out.mkdir(parents=True, exist_ok=True)
        generation_report(run, out)
        return 0
    args.model, args.seq = args.model or "minilm", args.seq or 32
    if args.model not in QUERY_MODELS:
        ap.error(f"--model must be one of {QUERY_MODELS} for a query (a causal LM needs --generate)")
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
