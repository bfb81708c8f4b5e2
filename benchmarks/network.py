"""Secure query time on a LAN and a WAN link, measured end to end over the real party nodes,
next to the link model.

    python benchmarks/network.py [--seq 32 128] [--links loopback LAN WAN] [--reps 1]

Three ``python -m party`` processes on loopback (mutual TLS, ``party.launch.LocalNodes``)
serve all-MiniLM-L6-v2 (recipe ``ours``); a client (``client.sdk``) sends a warm-up query
and then the measured one(s), for each padded length and each link:

* loopback: no shaping;
* LAN: 1 ms one-way delay, 5 Gbit/s;
* WAN: 40 ms one-way delay, 100 Mbit/s.

The links are emulated in the nodes' transport (``--link-shape``,
``secure.transport.shaping``): every peer frame a node sends leaves no earlier than its
send time plus its serialization at the rate (frames to the same peer queue behind each
other) plus the delay, without blocking the protocol, so messages are pipelined as on a real
link. This works where the kernel cannot shape (``tc netem`` needs ``sch_netem``, which
containers often lack; the script says whether this machine has it). Client-to-party
traffic is not shaped (the client sits at the edge; the model below leaves it out too).

The link model, kept as a cross-check, is applied to the loopback measurement with the
query's rounds and its busiest party's bytes:

    t(link) = t(loopback) + rounds * delay + max_party_bytes * 8 / rate

Prints measured seconds beside the model's and their ratio, checks every answer against the
plaintext model (cosine), and writes JSON (default benchmarks/results/network_minilm.json).
The WAN run pays about 650 rounds x 40 ms = 26 s of delay per query at length 32, more
bytes at 128: a few minutes with its warm-up (``--warmup once`` warms up once per link).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from client.sdk import local_client
from party.launch import LocalNodes
from secure.graph.passes import RECIPES
from secure.models import SentenceEncoder, load_minilm
from secure.transport.shaping import LinkShape

# the link model's parameters (benchmarks/llama7b.py projects with LINKS and modelled() too)
LINKS = {"LAN": {"latency_s": 0.001, "rate_bps": 5e9}, "WAN": {"latency_s": 0.040, "rate_bps": 100e6}}
SHAPES: dict[str, LinkShape | None] = {"loopback": None, **{name: LinkShape(link["latency_s"], link["rate_bps"])
                                                            for name, link in LINKS.items()}}
TEXT = ("How long does a secure query take when the parties are far apart? Each round pays the latency "
        "of the link, and every byte crosses it at its rate. ") * 8


def netem_available() -> tuple[bool, str]:
    """Whether this machine can give a namespace's veth a netem qdisc; the reason if not
    (reported only: the emulation in the transport is what this script measures with)."""
    ns = f"si{uuid.uuid4().hex[:6]}"
    steps = [["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"],
             ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "va", "root", "netem", "delay", "1ms"]]
    try:
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                return False, f"`{' '.join(cmd[:4])} ...` failed: {(r.stderr or r.stdout).strip()}"
        return True, "namespaces and netem available"
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        try:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass


def modelled(loopback: dict, latency_s: float, rate_bps: float) -> float:
    """t(loopback) + rounds * latency + busiest party's bytes at the link rate; ``loopback``
    holds ``seconds``, ``rounds`` and ``bytes_sent`` (per party)."""
    return loopback["seconds"] + loopback["rounds"] * latency_s + max(loopback["bytes_sent"]) * 8 / rate_bps


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


class Progress:
    """Prints a query's progress (nodes done of the graph's secret nodes) every few seconds."""

    def __init__(self, label: str, every_s: float = 10.0) -> None:
        self.label, self.every_s = label, every_s
        self.t0 = self.last = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.tty:
            print(f"\r    {self.label}: {done}/{total} nodes, {now - self.t0:.0f} s", end="", flush=True)
        elif now - self.last >= self.every_s:
            print(f"    {self.label}: {done}/{total} nodes, {now - self.t0:.0f} s", flush=True)
            self.last = now

    def end(self, seconds: float) -> None:
        print(f"{chr(13) if self.tty else ''}    {self.label}: {seconds:.2f} s" + " " * 20, flush=True)


def run_link(nodes: LocalNodes, name: str, shape: LinkShape | None, seqs: list[int],
             inputs: dict[int, dict[str, torch.Tensor]], plain: dict[int, torch.Tensor], reps: int,
             warmup: str) -> dict[int, dict[str, Any]]:
    """Start the nodes with ``shape``; per length: warm-up, then ``reps`` measured queries."""
    nodes.link_shape = str(shape) if shape is not None else None
    t0 = time.perf_counter()
    nodes.start()
    try:
        nodes.wait_ready()
        print(f"  {name}: nodes ready in {time.perf_counter() - t0:.1f} s"
              f"{f' (--link-shape {shape})' if shape else ''}", flush=True)
        out: dict[int, dict[str, Any]] = {}
        with local_client(nodes, timeout_s=3600) as client:
            client.describe()  # channels up, TLS handshakes done
            for k, seq in enumerate(seqs):
                warm: dict[str, Any] | None = None
                if warmup == "each" or k == 0:
                    bar = Progress(f"{name} seq {seq} warm-up")
                    t = time.perf_counter()
                    w = client.query(inputs[seq], progress=bar)
                    warm = {"seconds": time.perf_counter() - t, "rounds": w.rounds, "bytes_sent": w.bytes_sent}
                    bar.end(warm["seconds"])
                seconds, result = [], None
                for rep in range(reps):
                    bar = Progress(f"{name} seq {seq} query {rep + 1}/{reps}")
                    t = time.perf_counter()
                    result = client.query(inputs[seq], progress=bar)
                    seconds.append(time.perf_counter() - t)
                    bar.end(seconds[-1])
                assert result is not None
                out[seq] = {"seconds": seconds, "measured_s": statistics.median(seconds), "warmup": warm,
                            "party_seconds": result.party_seconds, "rounds": result.rounds,
                            "bytes_sent": result.bytes_sent,
                            "cosine_vs_plaintext": cosine(result.embedding, plain[seq])}
    finally:
        nodes.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[32, 128], help="padded lengths (default: 32 128)")
    ap.add_argument("--links", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                    help="links to measure (loopback is always measured: the model needs it)")
    ap.add_argument("--reps", type=int, default=1, help="measured queries per length and link (median reported)")
    ap.add_argument("--warmup", choices=["each", "once"], default="each",
                    help="a warm-up query before each length's measurement, or once per link (first length)")
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--deadline", type=float, default=120.0, help="the nodes' deadline per peer message (s)")
    ap.add_argument("--min-cosine", type=float, default=0.99, help="fail if an answer is further from plaintext")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/network_bench"),
                    help="dealt shares (reused), certificates, configuration and party logs")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/network_minilm.json"))
    args = ap.parse_args(argv)
    seqs = sorted(set(args.seq))
    links = ["loopback"] + [name for name in LINKS if name in args.links]
    torch.set_num_threads(1)

    netem, why = netem_available()
    print(f"netem: {why}; links emulated in the nodes' transport (--link-shape, secure.transport.shaping)")
    encoder, tokenizer = load_minilm()
    model = SentenceEncoder(encoder).eval()
    inputs, plain = {}, {}
    for seq in seqs:
        enc = tokenizer([TEXT], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        inputs[seq] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with torch.no_grad():
            plain[seq] = model(**inputs[seq]).double()
    print(f"all-MiniLM-L6-v2, recipe {args.recipe!r}, lengths {seqs}, links {links}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    nodes = LocalNodes(args.workdir, recipe=args.recipe, seq_lens=tuple(seqs), tls=True, deadline_s=args.deadline,
                       progress=True)
    t0 = time.perf_counter()
    nodes.prepare()
    print(f"  deal and certificates ready in {time.perf_counter() - t0:.1f} s (reused when already dealt)")
    measured = {name: run_link(nodes, name, SHAPES[name], seqs, inputs, plain, args.reps, args.warmup)
                for name in links}

    rows = []
    for seq in seqs:
        loop = measured["loopback"][seq]
        loopback = {"seconds": loop["measured_s"], "rounds": loop["rounds"], "bytes_sent": loop["bytes_sent"]}
        for name in links:
            m, shape = measured[name][seq], SHAPES[name]
            model_s = modelled(loopback, **LINKS[name]) if name in LINKS else loop["measured_s"]
            rows.append({"seq": seq, "link": name, "delay_s": shape.delay_s if shape else 0.0,
                         "rate_bps": shape.rate_bps if shape else None, **m, "model_s": model_s,
                         "ratio_measured_over_model": m["measured_s"] / model_s})

    print(f"\n{'seq':>4} {'link':<9}{'shape':>14}{'measured s':>12}{'model s':>10}{'ratio':>7}{'rounds':>8}"
          f"{'MB busiest':>12}{'cosine':>10}")
    for r in rows:
        shape = SHAPES[r["link"]]
        print(f"{r['seq']:>4} {r['link']:<9}{str(shape) if shape else '-':>14}{r['measured_s']:12.2f}"
              f"{r['model_s']:10.2f}{r['ratio_measured_over_model']:7.2f}{r['rounds']:8d}"
              f"{max(r['bytes_sent']) / 1e6:12.1f}{r['cosine_vs_plaintext']:10.6f}")
    print("model: t(loopback) + rounds x delay + busiest party's bytes x 8 / rate (loopback row: the measurement)")
    for r in rows:
        loop = measured["loopback"][r["seq"]]
        if r["rounds"] != loop["rounds"] or r["bytes_sent"] != loop["bytes_sent"]:
            print(f"note: seq {r['seq']} {r['link']} ran {r['rounds']} rounds, loopback {loop['rounds']}: the nodes "
                  "ran different code (the tree changed between starts?) or the protocol is data-dependent")

    payload = {
        "model": "all-MiniLM-L6-v2", "recipe": args.recipe, "seqs": seqs, "reps": args.reps, "warmup": args.warmup,
        "links": {name: ({"delay_s": s.delay_s, "rate_bps": s.rate_bps, "link_shape": str(s)} if s else None)
                  for name, s in SHAPES.items() if name in links},
        "emulation": "secure.transport.shaping via python -m party --link-shape: every peer frame leaves at "
                     "max(send time, link busy until) + bytes*8/rate + delay, per directed link; client traffic "
                     "unshaped",
        "netem": netem, "netem_detail": why,
        "model_formula": "t(loopback) + rounds * delay + max_party_bytes * 8 / rate",
        "bytes_note": "protocol payload counted by the parties; the shaper also counts frame headers",
        "torch": torch.__version__, "cpus": os.cpu_count(), "host": platform.node(),
        "load_average_at_end": os.getloadavg()[0], "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
    bad = [r for r in rows if not r["cosine_vs_plaintext"] >= args.min_cosine]
    for r in bad:
        print(f"seq {r['seq']} {r['link']}: cosine {r['cosine_vs_plaintext']:.6f} below {args.min_cosine}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
