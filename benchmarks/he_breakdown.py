"""HE (CKKS) query breakdown, and the same graph on the three-party engine.

    python benchmarks/he_breakdown.py [--model tiny | DISTILLED_DIR | minilm-power] [--seq 16 32] [--no-mpc]
                                      [--queries 2] [--cache-mib 4096] [--workers N]

For each sequence length: one HE query in process (client and server exchange bytes
only), the per-layer table in the MPC breakdown's format, the CKKS-primitive and form
table, then the same calibrated graph (polynomial GeLU, bounded rsqrt, Power-Softmax) on
the in-process three-party engine: time and bytes side by side. Accuracy: the HE output
against the plaintext polynomial model (FloatOps on the same graph): max abs error and
cosine. Writes benchmarks/results/he_breakdown_<model>_<seq>/{table.txt, breakdown.json,
trace.json, chart.png}. Takes about 15 s per length for tiny, a few minutes for MiniLM.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from secure.evaluate.he_model import HeModel, distilled_he_model, tiny_he_model
from secure.he.breakdown import operation_table
from secure.he.plain_cache import PlainCache
from secure.he.pool import ClientPool, HePool, cache_share
from secure.mpc.engine import LocalCluster
from secure.runtime.breakdown import aggregate, breakdown_table, chrome_trace, write_chart
from secure.runtime.execute import deal_inputs, deal_weights, run_float, run_mpc
from secure.runtime.execute_he import run_he
from secure.runtime.he_planner import plan

QUERY = "Secure inference lets a client ask a question of a model it may not see, and the owner keeps its weights."


def query(model: HeModel, seed: int = 11) -> dict[str, torch.Tensor]:
    """Random ids for the random-weight model; a real sentence for MiniLM (random ids would
    leave the calibrated ranges)."""
    if model.name.startswith("tiny"):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, model.table.shape[0], (1, model.seq_len), generator=gen)
        return model.client_inputs(ids, torch.ones(1, model.seq_len, dtype=torch.long))
    from secure.models import load_minilm

    _, tokenizer = load_minilm(model.name)
    enc = tokenizer([QUERY], padding="max_length", truncation=True, max_length=model.seq_len, return_tensors="pt")
    return model.client_inputs(enc["input_ids"], enc["attention_mask"])


def original_embedding(model: HeModel) -> torch.Tensor | None:
    """The original all-MiniLM-L6-v2's embedding of the query (distilled models only)."""
    if model.name.startswith("tiny"):
        return None
    from secure.models import SentenceEncoder, load_minilm

    encoder, tokenizer = load_minilm()
    enc = tokenizer([QUERY], padding="max_length", truncation=True, max_length=model.seq_len, return_tensors="pt")
    with torch.no_grad():
        return SentenceEncoder(encoder)(enc["input_ids"], enc["attention_mask"]).to(torch.float64)


def cosine(a: torch.Tensor | None, b: torch.Tensor) -> float | None:
    return None if a is None else float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def one_length(model: HeModel, out: Path, mpc: bool, queries: int = 2, cache_mib: int = 4096,
               workers: int = 0) -> dict:
    """``queries`` HE queries in a row sharing one plan, one plaintext cache of ``cache_mib``
    MiB (split between this process and ``workers`` worker processes) and the workers, as an
    HE node serves them; the client gets as many workers of its own for its refreshes (they
    never run while the server's do). The figures and tables are the last query's."""
    inputs = query(model)
    (ref,), _ = run_float(model.graph, model.weights, inputs)
    share = cache_share(cache_mib << 20, workers)
    cache = PlainCache(share)
    t0 = time.perf_counter()
    the_plan = plan(model.graph, model.weights, inputs)
    plan_seconds = time.perf_counter() - t0
    walls = []
    with HePool(workers, share) as pool, ClientPool(workers) as client_pool:
        for _ in range(queries):
            t0 = time.perf_counter()
            run = run_he(model.graph, model.weights, inputs, plain_cache=cache, the_plan=the_plan, pool=pool,
                         client_pool=client_pool)
            walls.append(time.perf_counter() - t0)
    he_wall = walls[-1]
    got = run.outputs[0]
    cos = cosine(ref, got)
    original = original_embedding(model)
    result = {"model": model.name, "seq": model.seq_len, "he_wall_seconds": he_wall, "he_seconds": run.seconds,
              "max_abs_error": float((got - ref).abs().max()), "cosine": cos, "refreshes": run.refreshes,
              "plan": run.plan.to_dict(), "bytes": run.bytes, "server_ops": run.server_stats,
              "client_ops": run.client_stats, "forms": run.forms,
              "cosine_vs_original_minilm": cosine(original, got),
              "float_form_cosine_vs_original_minilm": cosine(original, ref),
              "query_walls_seconds": walls, "plan_seconds": plan_seconds, "workers": workers,
              "plaintext_cache": cache.summary()}
    parts = aggregate(run.spans)
    table = breakdown_table(run.spans, "part (HE, server; rounds = client trips)")
    ops = operation_table(run.server_stats, run.client_stats, run.forms, run.bytes)
    lines = [f"{model.name}, seq {model.seq_len}, HE (CKKS N={run.plan.params.poly_degree}): {he_wall:.2f} s wall "
             f"({', '.join(f'{k} {v:.2f} s' for k, v in run.seconds.items())}), {run.refreshes} client trips, "
             f"max abs error {result['max_abs_error']:.2e}, cosine {cos:.6f} vs the plaintext polynomial model"
             + ("" if result["cosine_vs_original_minilm"] is None else
                f"; vs the original all-MiniLM-L6-v2: HE {result['cosine_vs_original_minilm']:.4f}, polynomial "
                f"model in float {result['float_form_cosine_vs_original_minilm']:.4f}"),
             f"plan {plan_seconds:.2f} s, made once and kept as the HE node keeps it; {workers} worker "
             f"process(es) for the linear layers, as many for the client's refreshes; queries in a row "
             f"sharing the plaintext cache "
             f"({cache_mib} MiB budget, this process's share): "
             + ", ".join(f"{w:.1f} s" for w in walls) + f"; cache {cache.summary()}",
             table, "", ops]
    if mpc:
        cluster = LocalCluster()
        shares = deal_weights(model.weights, cluster.fp)
        bytes0, rounds0 = cluster.bytes_sent(), cluster.rounds
        t0 = time.perf_counter()
        (mpc_out,), _ = run_mpc(cluster, model.graph, shares, deal_inputs(model.graph, inputs, cluster.fp))
        mpc_wall = time.perf_counter() - t0
        mpc_bytes = sum(b - b0 for b, b0 in zip(cluster.bytes_sent(), bytes0))
        he_bytes = sum(run.bytes.values())
        result["mpc"] = {"wall_seconds": mpc_wall, "bytes_all_parties": mpc_bytes, "rounds": cluster.rounds - rounds0,
                         "cosine": cosine(ref, mpc_out)}
        result["he_over_mpc"] = {"time": he_wall / mpc_wall, "bytes": he_bytes / max(mpc_bytes, 1)}
        lines += ["", f"same graph on three parties in process: {mpc_wall:.2f} s, {mpc_bytes / 1e6:.1f} MB sent "
                      f"(all parties), {result['mpc']['rounds']} rounds; HE/MPC time {he_wall / mpc_wall:.2f}, "
                      f"bytes {he_bytes / max(mpc_bytes, 1):.2f} (HE bytes incl. the "
                      f"{run.bytes['public_context'] / 1e6:.1f} MB public context)"]
    text = "\n".join(lines)
    print(text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text + "\n")
    (out / "breakdown.json").write_text(json.dumps({**result, "parts": parts}, indent=2))
    (out / "trace.json").write_text(json.dumps(chrome_trace(run.spans)))
    write_chart(parts, str(out / "chart.png"), f"HE {model.name} seq {model.seq_len}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (2 layers, hidden 128) or a distilled model folder")
    ap.add_argument("--seq", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--no-mpc", action="store_true", help="skip the three-party comparison")
    ap.add_argument("--queries", type=int, default=2,
                    help="HE queries in a row (the first fills the plaintext cache; the tables are the last's)")
    ap.add_argument("--cache-mib", type=int, default=4096,
                    help="plaintext cache budget, split between the processes (0: none)")
    ap.add_argument("--workers", type=int, default=max(0, (os.cpu_count() or 1) - 1),
                    help="worker processes for the server's linear layers and as many for the client's "
                         "refreshes (default: CPUs - 1; 0: none)")
    args = ap.parse_args(argv)
    label = "tiny" if args.model == "tiny" else Path(args.model).name
    for seq in args.seq:
        model = tiny_he_model(seq) if args.model == "tiny" else distilled_he_model(args.model, seq)
        one_length(model, Path(f"benchmarks/results/he_breakdown_{label}_{seq}"), not args.no_mpc, args.queries,
                   args.cache_mib, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
