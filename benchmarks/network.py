"""Secure query time on a LAN and a WAN link.

    python benchmarks/network.py [--seq 32]

The intended set-up puts each party in its own network namespace joined by veth pairs
shaped with ``tc netem`` (LAN: 1 ms, a few Gbps; WAN: 40 ms, 100 Mbps). This script
first checks that namespaces and netem both work (``ip netns``, ``tc qdisc ... netem``
on a throwaway namespace). Where either does not -- containers without the sch_netem
kernel module, for one -- it says so and falls back to the loopback measurement plus a
model of the link: each round adds one one-way latency and the busiest party's bytes
cross at the link rate:

    t(link) = t(loopback) + rounds * latency + max_party_bytes * 8 / rate

The modelled figures are labelled as such in the output and the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import uuid
from pathlib import Path

from secure.graph.capture import capture
from secure.graph.passes import RECIPES, rewrite
from secure.models import SentenceEncoder, load_minilm
from secure.mpc.engine import LocalCluster
from secure.runtime.execute import deal_inputs, deal_weights, run_mpc

LINKS = {"LAN": {"latency_s": 0.001, "rate_bps": 5e9}, "WAN": {"latency_s": 0.040, "rate_bps": 100e6}}


def netem_available() -> tuple[bool, str]:
    """Whether this machine can give a namespace's veth a netem qdisc; the reason if not."""
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
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def loopback_query(seq: int, recipe: str) -> dict:
    """One in-process MiniLM query (after a warm-up): seconds, rounds, bytes per party."""
    encoder, tokenizer = load_minilm()
    model = SentenceEncoder(encoder)
    text = "How long does a secure query take when the parties are far apart? " * 6
    enc = tokenizer([text], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    graph, weights = capture(model, inputs)
    secure = rewrite(graph, RECIPES[recipe])
    cluster = LocalCluster(profile=False)
    shares = deal_weights(weights, cluster.fp)
    run_mpc(cluster, secure, shares, deal_inputs(secure, inputs, cluster.fp))
    bytes0, rounds0 = cluster.bytes_sent(), cluster.rounds
    t0 = time.perf_counter()
    run_mpc(cluster, secure, shares, deal_inputs(secure, inputs, cluster.fp))
    return {"seconds": time.perf_counter() - t0, "rounds": cluster.rounds - rounds0,
            "bytes_sent": [b - a for a, b in zip(bytes0, cluster.bytes_sent())]}


def modelled(loopback: dict, latency_s: float, rate_bps: float) -> float:
    """t(loopback) + rounds * latency + busiest party's bytes at the link rate."""
    return loopback["seconds"] + loopback["rounds"] * latency_s + max(loopback["bytes_sent"]) * 8 / rate_bps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--recipe", default="ours", choices=sorted(RECIPES))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/network.json"))
    args = ap.parse_args(argv)
    ok, why = netem_available()
    if ok:
        print("netem is available, but shaped namespaces are not wired to the party nodes yet; "
              "reporting the loopback measurement and the link model")
    else:
        print(f"cannot shape a link here ({why}); falling back to loopback plus a link model")
    loop = loopback_query(args.seq, args.recipe)
    print(f"MiniLM, seq {args.seq}, {args.recipe}: loopback {loop['seconds']:.2f} s, {loop['rounds']} rounds, "
          f"{max(loop['bytes_sent']) / 1e6:.1f} MB from the busiest party")
    result = {"seq": args.seq, "recipe": args.recipe, "netem": ok, "netem_detail": why, "loopback": loop,
              "modelled": {}}
    for name, link in LINKS.items():
        t = modelled(loop, **link)
        result["modelled"][name] = {**link, "seconds": t}
        print(f"  {name} (modelled: {link['latency_s'] * 1e3:.0f} ms, {link['rate_bps'] / 1e9:g} Gbps): {t:.2f} s "
              f"= {loop['rounds'] * link['latency_s']:.2f} s of latency + "
              f"{max(loop['bytes_sent']) * 8 / link['rate_bps']:.2f} s of transfer + compute")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
