"""The same all-MiniLM-L6-v2 query (padded length 32) on the in-process engine and on the
gRPC party nodes.

(1) in process: the three parties are threads of this process over queues
    (``secure.runtime.execute.run_mpc`` on a ``LocalCluster``);
(2) gRPC: three ``python -m party`` processes on loopback with mutual TLS between the
    parties and TLS + token for the client (``party.launch.LocalNodes``), queried through
    ``SecureClient``.

After a warm-up query each, a few timed repetitions, alternating between the two (so that
both see the same load when the machine is shared); prints wall time (median and best),
bytes sent per party (protocol payload as counted by the parties: no gRPC, HTTP/2 or TLS
framing), rounds, the ratio gRPC / in-process, and the cosine of each result with the
plaintext model. Writes JSON (default benchmarks/results/grpc_vs_inprocess.json).

    python benchmarks/grpc_vs_inprocess.py [--reps 3] [--workdir /tmp/grpc_vs_inprocess]

Dealing the model for the nodes takes about half a minute the first time; the dealt
shares in the work directory are reused by later runs. Both sides run with the same
allocator setting (``party.node.tune_malloc``, which the nodes apply at start-up), so
the ratio measures the transport, not glibc; ``--default-malloc`` leaves this process's
allocator alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from client.sdk import local_client
from party.launch import LocalNodes
from secure.graph.capture import capture
from secure.graph.passes import RECIPES, rewrite
from secure.models import SentenceEncoder, load_minilm
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_mpc

TEXT = "A client asks a question of a model it may not see; the owner must not see the question."


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


def summary(seconds: list[float], sent: list[int], rounds: int, cos: float, **extra: Any) -> dict[str, Any]:
    return {"seconds": seconds, "median_s": statistics.median(seconds), "best_s": min(seconds),
            "bytes_per_party": sent, "rounds": rounds, "cosine_vs_plaintext": cos, **extra}


class InProcess:
    """The in-process engine, set up once; ``run`` is one query."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], recipe: str) -> None:
        t0 = time.perf_counter()
        graph, weights = capture(model, inputs)
        self.graph = rewrite(graph, RECIPES[recipe])
        self.inputs = inputs
        self.cluster = LocalCluster(profile=False)
        self.weight_shares = deal_weights(weights, self.cluster.fp)
        self.setup_s = time.perf_counter() - t0
        self.seconds: list[float] = []
        self.sent: list[int] = []
        self.rounds = 0
        self.upload = 0
        self.out: torch.Tensor | None = None

    def run(self, timed: bool) -> float:
        client = deal_inputs(self.graph, self.inputs, self.cluster.fp)  # the client shares afresh every query
        bytes0, rounds0 = self.cluster.bytes_sent(), self.cluster.rounds
        t = time.perf_counter()
        (self.out,), _ = run_mpc(self.cluster, self.graph, self.weight_shares, client)
        elapsed = time.perf_counter() - t
        if timed:
            self.seconds.append(elapsed)
        self.sent = [b - b0 for b, b0 in zip(self.cluster.bytes_sent(), bytes0)]
        self.rounds = self.cluster.rounds - rounds0
        self.upload = client.upload_bytes
        return elapsed

    def summary(self, plain: torch.Tensor) -> dict[str, Any]:
        assert self.out is not None
        return summary(self.seconds, self.sent, self.rounds, cosine(self.out, plain), setup_s=self.setup_s,
                       upload_bytes_per_party=self.upload)


class Grpc:
    """A client of the three party nodes (started by the caller); ``run`` is one query."""

    def __init__(self, client: Any, inputs: dict[str, torch.Tensor], setup_s: float) -> None:
        self.client = client
        self.inputs = inputs
        self.setup_s = setup_s
        self.seconds: list[float] = []
        self.party_seconds: list[list[float]] = []
        self.result: Any = None

    def run(self, timed: bool) -> float:
        t = time.perf_counter()
        self.result = self.client.query(self.inputs)
        elapsed = time.perf_counter() - t
        if timed:
            self.seconds.append(elapsed)
            self.party_seconds.append(self.result.party_seconds)
        return elapsed

    def summary(self, plain: torch.Tensor) -> dict[str, Any]:
        r = self.result
        assert r is not None
        return summary(self.seconds, r.bytes_sent, r.rounds, cosine(r.embedding, plain), setup_s=self.setup_s,
                       party_seconds=self.party_seconds, upload_bytes_per_party=r.upload_bytes, tls=True)


def bench(model: torch.nn.Module, workdir: Path, inputs: dict[str, torch.Tensor], recipe: str, reps: int,
          seq: int, plain: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """One warm-up each, then ``reps`` timed queries on each engine, alternating, so that both
    see the same load on a shared machine."""
    local = InProcess(model, inputs, recipe)
    t0 = time.perf_counter()
    with LocalNodes(workdir, recipe=recipe, seq_lens=(seq,), tls=True, deadline_s=60.0, progress=False) as nodes:
        setup_s = time.perf_counter() - t0
        with local_client(nodes, timeout_s=600) as client:
            client.describe()  # channels up, TLS handshakes done
            remote = Grpc(client, inputs, setup_s)
            for rep in range(reps + 1):  # rep 0 is the warm-up
                label = "warm-up" if rep == 0 else f"rep {rep}"
                t_local = local.run(timed=rep > 0)
                t_remote = remote.run(timed=rep > 0)
                print(f"  {label}: in-process {t_local:.2f} s, gRPC {t_remote:.2f} s (parties "
                      f"{[round(s, 2) for s in remote.result.party_seconds]} s), load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    return local.summary(plain), remote.summary(plain)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, default=32, help="padded sequence length")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up")
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/grpc_vs_inprocess"),
                    help="dealt shares, certificates, configuration and party logs of the nodes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of this process (each party node process uses 1)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/grpc_vs_inprocess.json"))
    ap.add_argument("--default-malloc", action="store_true",
                    help="do not give the in-process engine the nodes' allocator setting")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        from party.node import tune_malloc

        tune_malloc()

    encoder, tokenizer = load_minilm()
    model = SentenceEncoder(encoder).eval()
    enc = tokenizer([TEXT], padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        plain = model(**inputs).double()
    print(f"all-MiniLM-L6-v2, recipe {args.recipe!r}, padded length {args.seq}, {args.reps} reps after a warm-up; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    print("in-process engine (three parties as threads, in-process queues) and gRPC nodes (three processes on "
          "loopback, TLS), one query each in turn:", flush=True)
    local, remote = bench(model, args.workdir, inputs, args.recipe, args.reps, args.seq, plain)

    ratio = remote["median_s"] / local["median_s"]
    # the nodes agree on fresh PRF keys for every query (one round, a 16-byte key per party);
    # the in-process cluster did so once, when it was made: otherwise the protocol is the same
    extra_bytes = [g - i for g, i in zip(remote["bytes_per_party"], local["bytes_per_party"])]
    extra_rounds = remote["rounds"] - local["rounds"]
    print(f"\n{'':<12}{'median s':>10}{'best s':>9}{'rounds':>8}  {'MB sent per party':<26}{'cosine':>10}")
    for name, r in (("in-process", local), ("gRPC", remote)):
        mb = "[" + ", ".join(f"{b / 1e6:.2f}" for b in r["bytes_per_party"]) + "]"
        print(f"{name:<12}{r['median_s']:10.2f}{r['best_s']:9.2f}{r['rounds']:8d}  {mb:<26}"
              f"{r['cosine_vs_plaintext']:10.6f}")
    pairs = [g / i for g, i in zip(remote["seconds"], local["seconds"])]
    print(f"ratio gRPC / in-process (median wall time): {ratio:.2f}x; best: "
          f"{remote['best_s'] / local['best_s']:.2f}x; median of the per-repetition ratios: "
          f"{statistics.median(pairs):.2f}x")
    per_round_ms = (remote["median_s"] - local["median_s"]) / remote["rounds"] * 1e3
    print(f"gRPC overhead per round (median difference / rounds): {per_round_ms:.2f} ms")
    print(f"gRPC - in-process: {extra_bytes} bytes per party, {extra_rounds} round(s) (per-query PRF key set-up)")

    payload = {
        "model": "all-MiniLM-L6-v2", "recipe": args.recipe, "seq_len": args.seq, "reps": args.reps,
        "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads, "host": platform.node(),
        "load_average_at_start": os.getloadavg()[0],
        "bytes_note": "protocol payload counted by the parties; excludes gRPC/HTTP2/TLS framing",
        "inprocess": local, "grpc": remote, "ratio_grpc_over_inprocess_median": ratio,
        "ratio_grpc_over_inprocess_best": remote["best_s"] / local["best_s"],
        "ratio_grpc_over_inprocess_pairs": pairs, "overhead_ms_per_round": per_round_ms,
        "extra_bytes_per_party_grpc": extra_bytes,
        "extra_rounds_grpc": extra_rounds,
        "extra_note": "the nodes agree on fresh PRF keys per query (1 round, 16 bytes per party); the in-process "
                      "cluster once at construction",
        "upload_note": "in-process counts secret inputs only; the SDK counts every chunk byte it sends (with the "
                       "public attention mask)",
        "setup_note": "grpc setup_s includes dealing the model unless the work directory held it already",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
