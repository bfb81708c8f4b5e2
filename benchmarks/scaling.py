"""How secure time and bytes grow with sequence length and hidden size, and where they go.

One BERT encoder layer (random weights, PUMA recipe) on the in-process three-party
engine: sequence length 16 to 256 at MiniLM's width (hidden 384, 12 heads, FFN 1536),
then hidden 128 to 768 (heads = hidden / 32, FFN = 4 hidden) at sequence 32. For each
run, party 0's time, bytes and rounds are split by protocol family: comparisons (MSB,
max, frexp), products (multiplications and matmuls), truncations, and the rest.
Writes benchmarks/results/scaling.json and scaling.png.

    python benchmarks/scaling.py [--max-seq 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from secure.profile.profiler import Profiler

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_peers", HERE / "peers" / "bench_peers.py")
assert _spec is not None and _spec.loader is not None
bench_peers = importlib.util.module_from_spec(_spec)
sys.modules["bench_peers"] = bench_peers  # its dataclasses look their module up
_spec.loader.exec_module(bench_peers)

FAMILIES = {"msb": "comparisons", "max": "comparisons", "frexp": "comparisons", "less_than": "comparisons",
            "range_check": "comparisons",
            "mul": "products", "truncate_exact": "truncations", "truncate": "truncations"}


def measure(shape: bench_peers.Shape, ours: bench_peers.Ours) -> dict:
    model, inputs, reference = bench_peers.make_layer(shape)
    prepared = ours.prepare(model, inputs)
    ours.measure(prepared, reference, warmup=False)  # warm-up
    party = ours.cluster.parties[0]
    party.profiler.clear()
    result = ours.measure(prepared, reference, warmup=False)
    families: dict[str, dict[str, float]] = {}
    for name, totals in party.profiler.summary(top_level_only=True).items():
        fam = families.setdefault(FAMILIES.get(name, "other"), {"seconds": 0.0, "bytes_sent": 0, "rounds": 0})
        fam["seconds"] += totals.seconds
        fam["bytes_sent"] += totals.bytes_sent
        fam["rounds"] += totals.rounds
    return {"hidden": shape.hidden, "heads": shape.heads, "ffn": shape.ffn, "seq": shape.seq, **result,
            "families": families}


def _line(r: dict) -> str:
    fams = r["families"]
    total = sum(f["seconds"] for f in fams.values()) or 1.0
    shares = " ".join(f"{k} {v['seconds'] / total:4.0%}/{v['bytes_sent'] / 1e6:6.1f}MB"
                      for k, v in sorted(fams.items()))
    return (f"h{r['hidden']:<4} s{r['seq']:<4} {r['seconds']:8.2f} s {r['bytes_sent_p0'] / 1e6:9.1f} MB "
            f"{r['rounds']:5d} rounds | {shares}")


def plot(seq_runs: list[dict], hidden_runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, runs, key, label in ((axes[0], seq_runs, "seq", "sequence length (hidden 384)"),
                                 (axes[1], hidden_runs, "hidden", "hidden size (sequence 32)")):
        xs = [r[key] for r in runs]
        ax.plot(xs, [r["seconds"] for r in runs], "o-", color="#4477aa", label="seconds")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds", color="#4477aa")
        twin = ax.twinx()
        twin.plot(xs, [r["bytes_sent_p0"] / 1e6 for r in runs], "s--", color="#cc6677", label="MB sent")
        twin.set_yscale("log")
        twin.set_ylabel("MB sent by party 0", color="#cc6677")
    fig.suptitle("one BERT layer, PUMA recipe, three parties in process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max-seq", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ours = bench_peers.Ours()
    ours.cluster.parties[0].profiler = Profiler()  # party 0's protocol calls, for the split by family
    t0 = time.perf_counter()
    seq_runs, hidden_runs = [], []
    seq = 16
    while seq <= args.max_seq:
        seq_runs.append(measure(bench_peers.Shape("minilm", 384, 12, 1536, seq), ours))
        print(_line(seq_runs[-1]), flush=True)
        seq *= 2
    for hidden in (128, 256, 384, 512, 768):
        hidden_runs.append(measure(bench_peers.Shape("bert", hidden, hidden // 32, 4 * hidden, 32), ours))
        print(_line(hidden_runs[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps({"by_seq": seq_runs, "by_hidden": hidden_runs}, indent=2))
    plot(seq_runs, hidden_runs, args.out / "scaling.png")
    print(f"wrote {args.out}/scaling.json and scaling.png in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
