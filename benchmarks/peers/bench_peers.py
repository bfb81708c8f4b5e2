"""One Transformer encoder layer on our engine, on SPU's 3PC simulator and on CrypTen 3PC.

Same shapes, same weights, same machine, one run, interleaved per shape (ours, SPU, CrypTen,
ours again) so a load change on the machine hits all three alike.

    bash benchmarks/peers/setup_peers.sh                     # once: the peers' own venvs
    PYTHONPATH=. python benchmarks/peers/bench_peers.py      # about 4-10 minutes on 2 cores
    PYTHONPATH=. python benchmarks/peers/bench_peers.py --shapes bert-tiny --no-crypten
    PYTHONPATH=. python benchmarks/peers/bench_peers.py --recipe ours --no-crypten  # our forms

* ours: a randomly initialised ``transformers.BertLayer`` captured with
  ``secure.graph.capture.capture`` (hidden states secret, additive mask public), rewritten
  with PUMA's forms (``RECIPES["puma"]``; ``--recipe ours``: our forms, whose error the
  table sets beside SPU's), with the bounds the weights give the activations' inputs
  (``rewrite(..., weights=)``), weights and input dealt, run with ``run_mpc`` on a
  ``LocalCluster(profile=False)``; wall time of ``run_mpc`` after one warm-up run, bytes sent
  per party (mean over the three parties: their roles rotate, so party 0's share moves) and
  rounds (deltas of ``cluster.bytes_sent()`` / ``cluster.rounds``).
* SPU 0.9.5 (``spu_runner.py`` in the SPU venv): simulator, ABY3, FM64, f = 18, PUMA's
  GeLU/softmax in jax; bytes sent by party 0 from rank 0's "Link details" log line, averaged
  over its calls (warm-up included: the same program; it varies by about +-5% per call).
* CrypTen 0.4.1 (``crypten_runner.py`` in the CrypTen venv): three processes, CrypTen's
  softmax, PUMA GeLU in crypten ops; bytes as CrypTen counts them (sent + received).

Every output is checked against the plaintext torch layer (max abs error). A missing venv,
a failing or timed-out peer is reported and the rest goes on. The venvs are looked for under
``$SECURE_PEERS_DIR`` (default ``~/.cache/secure-inference-peers``). Results: a table on
stdout and ``benchmarks/results/peers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEFAULT_PEERS_DIR = Path(os.environ.get("SECURE_PEERS_DIR", Path.home() / ".cache" / "secure-inference-peers"))
SETUP_HINT = "bash benchmarks/peers/setup_peers.sh"


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    ffn: int
    seq: int

    @property
    def label(self) -> str:
        return f"{self.name} h{self.hidden}/s{self.seq}"


SHAPES = [
    Shape("bert-tiny", 128, 2, 512, 32),
    Shape("minilm-s32", 384, 12, 1536, 32),
    Shape("minilm-s128", 384, 12, 1536, 128),
    Shape("bert-base", 768, 12, 3072, 128),
]


class EncoderLayer(nn.Module):
    """One BERT encoder layer: hidden states in, hidden states out, additive mask."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        config = BertConfig(hidden_size=shape.hidden, num_attention_heads=shape.heads,
                            intermediate_size=shape.ffn, hidden_act="gelu",
                            attn_implementation="sdpa")
        self.layer = BertLayer(config)
        self.eps = config.layer_norm_eps

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden_states, attention_mask=attention_mask)
        return out[0] if isinstance(out, tuple) else out


def make_layer(shape: Shape, seed: int = 0) -> tuple[EncoderLayer, dict[str, torch.Tensor], torch.Tensor]:
    """The layer (random weights), its inputs and the plaintext output."""
    torch.manual_seed(seed)  # benchmark weights and inputs only
    model = EncoderLayer(shape).eval()
    inputs = {"hidden_states": torch.randn(1, shape.seq, shape.hidden),
              "attention_mask": torch.zeros(1, 1, 1, shape.seq)}
    with torch.no_grad():
        reference = model(**inputs).double()
    return model, inputs, reference


def save_layer(path: Path, model: EncoderLayer, inputs: dict[str, torch.Tensor],
               reference: torch.Tensor) -> None:
    """Weights (BertLayer state-dict names), inputs and reference for the peer runners."""
    arrays = {k: v.detach().float().numpy() for k, v in model.layer.state_dict().items()}
    arrays.update({k: v.numpy() for k, v in inputs.items()})
    arrays["reference"] = reference.numpy()
    np.savez(path, **arrays)


# ---- ours ---------------------------------------------------------------------------------

class Ours:
    """Our engine: one LocalCluster for all shapes, the layer rewritten with ``recipe``."""

    def __init__(self, recipe: str = "puma") -> None:
        from secure.mpc.engine import LocalCluster

        self.cluster = LocalCluster(profile=False)
        self.recipe = recipe

    def prepare(self, model: EncoderLayer, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        from secure.graph.capture import capture
        from secure.graph.passes import RECIPES, rewrite
        from secure.runtime.execute import deal_inputs, deal_weights

        graph, weights = capture(model, dict(inputs), secret_inputs=["hidden_states"])
        secure = rewrite(graph, RECIPES[self.recipe], weights=weights)
        return {"graph": secure, "weights": deal_weights(weights, self.cluster.fp),
                "client": deal_inputs(secure, dict(inputs), self.cluster.fp)}

    def measure(self, prepared: dict[str, Any], reference: torch.Tensor, warmup: bool) -> dict[str, Any]:
        from secure.runtime.execute import run_mpc

        c = self.cluster
        if warmup:
            run_mpc(c, prepared["graph"], prepared["weights"], prepared["client"])
        bytes0, rounds0 = c.bytes_sent(), c.rounds
        t0 = time.perf_counter()
        (out,), _ = run_mpc(c, prepared["graph"], prepared["weights"], prepared["client"])
        seconds = time.perf_counter() - t0
        sent = [b - a for a, b in zip(bytes0, c.bytes_sent())]
        return {"seconds": seconds, "bytes_sent_p0": sent[0], "bytes_sent_per_party": sent,
                "rounds": c.rounds - rounds0,
                "max_abs_error": float((out.double() - reference).abs().max())}


# ---- peers --------------------------------------------------------------------------------

@dataclass
class Peer:
    name: str
    venv: Path
    runner: Path
    extra_args: tuple[str, ...] = ()

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def available(self) -> str | None:
        """None when usable, else why not and how to fix it."""
        if not self.python.exists():
            return (f"{self.name}: no virtual environment at {self.venv}; create it with "
                    f"`{SETUP_HINT} {self.name}` (or set SECURE_PEERS_DIR)")
        return None

    def run(self, data: Path, shape: Shape, repeats: int, timeout_s: float) -> dict[str, Any]:
        cmd = [str(self.python), str(self.runner), "--data", str(data), "--heads", str(shape.heads),
               "--repeats", str(repeats), *self.extra_args]
        t0 = time.perf_counter()
        # own session: a timeout kills the runner and every party process it started
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=str(ROOT))
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"ok": False, "error": f"timed out after {timeout_s:.0f} s (killed)",
                    "wall_seconds": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        lines = [ln for ln in stdout.splitlines() if ln.startswith("PEER_JSON ")]
        if not lines:
            return {"ok": False, "wall_seconds": wall,
                    "error": f"runner exited {proc.returncode} without a result",
                    "stderr_tail": (stderr or stdout)[-2000:]}
        result = json.loads(lines[-1][len("PEER_JSON "):])
        result["wall_seconds"] = wall
        if not result.get("ok"):
            result["stderr_tail"] = stderr[-2000:]
        return result


def make_peers(peers_dir: Path, use_spu: bool, use_crypten: bool) -> list[Peer]:
    peers = []
    if use_spu:
        peers.append(Peer("spu", peers_dir / "spu", HERE / "spu_runner.py"))
    if use_crypten:
        peers.append(Peer("crypten", peers_dir / "crypten", HERE / "crypten_runner.py"))
    return peers


def peer_bytes(name: str, r: dict[str, Any]) -> tuple[float | None, float | None]:
    """(bytes as the peer reports them, estimate of bytes SENT by party 0)."""
    if not r or not r.get("ok"):
        return None, None
    if name == "spu":  # party 0's bytes vary from call to call (+-5% measured): the mean of its calls
        per_call = [c["bytes_sent_p0"] for c in r.get("calls", []) if c.get("bytes_sent_p0") is not None]
        b = sum(per_call) / len(per_call) if per_call else r.get("bytes_sent_p0")
        return b, b
    b = r.get("bytes_p0")  # CrypTen counts sent + received; symmetric protocol: sent ~ half
    return b, (b / 2 if b is not None else None)


# ---- the run ------------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + args.budget_s
    shapes = [s for s in SHAPES if not args.shapes or s.name in args.shapes]
    peers = make_peers(Path(args.peers_dir), not args.no_spu, not args.no_crypten)
    notes: list[str] = []
    usable: list[Peer] = []
    for p in peers:
        why = p.available()
        if why:
            print(f"[peers] {why}", flush=True)
            notes.append(why)
        else:
            usable.append(p)
    ours = Ours(args.recipe)
    rows: list[dict[str, Any]] = []
    last_scale: dict[str, tuple[float, float]] = {}  # peer -> (peer s, ours s) on the last shape
    tmp = Path(tempfile.mkdtemp(prefix="peer_bench_"))
    try:
        for shape in shapes:
            print(f"\n[{shape.label}] heads {shape.heads}, FFN {shape.ffn}", flush=True)
            model, inputs, reference = make_layer(shape)
            data = tmp / f"{shape.name}.npz"
            save_layer(data, model, inputs, reference)
            prepared = ours.prepare(model, inputs)
            first = ours.measure(prepared, reference, warmup=True)
            print(f"  ours      {first['seconds']:8.2f} s  {first['bytes_sent_p0'] / 1e6:9.1f} MB sent (p0)"
                  f"  {first['rounds']:5d} rounds  err {first['max_abs_error']:.2e}", flush=True)
            row: dict[str, Any] = {"shape": asdict(shape), "label": shape.label, "ours_runs": [first],
                                   "peers": {}}
            for p in usable:
                repeats = args.repeats if first["seconds"] < args.repeat_below_s else 1
                remaining = deadline - time.perf_counter() - args.reserve_s
                estimate = None
                if p.name in last_scale:  # scale the peer's last time by our own scaling
                    peer_s, ours_s = last_scale[p.name]
                    estimate = peer_s * first["seconds"] / max(ours_s, 1e-9) * (1 + repeats) + 15.0
                limit = min(args.peer_timeout_s, remaining)
                if limit < 20 or (estimate is not None and estimate > limit):
                    msg = (f"{p.name} skipped on {shape.label}: estimated {estimate or 0:.0f} s for "
                           f"warm-up + {repeats} call(s), limit {max(limit, 0):.0f} s "
                           f"(--peer-timeout-s {args.peer_timeout_s:.0f}, budget left {max(remaining, 0):.0f} s)")
                    print(f"  {msg}", flush=True)
                    row["peers"][p.name] = {"ok": False, "skipped": True, "error": msg}
                    notes.append(msg)
                    continue
                r = p.run(data, shape, repeats, limit)
                row["peers"][p.name] = r
                if r.get("ok"):
                    reported, sent = peer_bytes(p.name, r)
                    last_scale[p.name] = (r["seconds"], first["seconds"])
                    rounds = r.get("send_actions_p0", r.get("rounds_p0"))
                    print(f"  {p.name:<9} {r['seconds']:8.2f} s  {_fmt(reported and reported / 1e6, '9.1f')} MB"
                          f"{' sent (p0)' if p.name == 'spu' else ' sent+recv (p0, crypten count)'}"
                          f"  {_fmt(rounds, '5d')} {'send actions' if p.name == 'spu' else 'comm calls'}"
                          f"  err {r['max_abs_error']:.2e}"
                          + (f" ({r['elements_off_by_0.1']} elements off by > 0.1)"
                             if r.get("elements_off_by_0.1") else ""), flush=True)
                else:
                    print(f"  {p.name} FAILED: {r.get('error')}", flush=True)
                    tail = r.get("stderr_tail")
                    if tail:
                        print("    " + tail.strip().replace("\n", "\n    ")[-1200:], flush=True)
            again = ours.measure(prepared, reference, warmup=False)
            row["ours_runs"].append(again)
            print(f"  ours      {again['seconds']:8.2f} s  (again, after the peers)", flush=True)
            best = min(row["ours_runs"], key=lambda r: r["seconds"])
            row["ours"] = {**best, "seconds_runs": [r["seconds"] for r in row["ours_runs"]],
                           "max_abs_error": max(r["max_abs_error"] for r in row["ours_runs"])}
            del prepared
            rows.append(row)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()

    summary = []
    for row in rows:
        o = row["ours"]
        s, c = row["peers"].get("spu", {}), row["peers"].get("crypten", {})
        s_rep, s_sent = peer_bytes("spu", s)
        c_rep, c_sent = peer_bytes("crypten", c)
        s_t = s.get("seconds") if s.get("ok") else None
        c_t = c.get("seconds") if c.get("ok") else None
        # our parties take turns in each protocol's roles (by round number), so party 0's share
        # moves between runs; the mean per party over the timed runs is the stable figure
        per_party = [b for run in row["ours_runs"] for b in run.get("bytes_sent_per_party", [])]
        o_mean = sum(per_party) / len(per_party) if per_party else o["bytes_sent_p0"]
        summary.append({
            "shape": row["label"], "ours_s": o["seconds"], "spu_s": s_t, "crypten_s": c_t,
            "ours_over_spu_time": _ratio(o["seconds"], s_t),
            "ours_over_crypten_time": _ratio(o["seconds"], c_t),
            "ours_MB_sent_p0": o["bytes_sent_p0"] / 1e6,
            "ours_MB_sent_mean_per_party": o_mean / 1e6,
            "spu_MB_sent_p0": s_sent and s_sent / 1e6,
            "crypten_MB_p0_crypten_count": c_rep and c_rep / 1e6,
            "crypten_MB_sent_p0_estimate": c_sent and c_sent / 1e6,
            "ours_over_spu_bytes": _ratio(o_mean, s_sent),
            "ours_over_crypten_bytes_vs_sent_estimate": _ratio(o_mean, c_sent),
            "ours_rounds": o["rounds"], "spu_send_actions_p0": s.get("send_actions_p0"),
            "crypten_comm_calls_p0": c.get("rounds_p0"),
            "max_abs_error": {"ours": o["max_abs_error"], "spu": s.get("max_abs_error"),
                              "crypten": c.get("max_abs_error")},
        })
    return {
        "recipe": args.recipe,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_start_end": [_loadavg_at_start, _loadavg()]},
        "note": "ours and each peer measured in the same run, interleaved per shape (ours, peers, ours "
                "again; ours = the faster of its two timed runs). Times: wall seconds per call after "
                "one warm-up. Bytes: ours = sent per party, mean over the parties and the timed runs (our "
                "roles rotate, so party 0's share moves by +-3% between runs); SPU = sent by party 0, mean "
                "over its calls (it varies by +-5% from call to call); CrypTen's own counter counts sent + "
                "received per party, so its ratio uses half of it as the sent estimate.",
        "wall_seconds_total": time.perf_counter() - start,
        "summary": summary, "notes": notes, "rows": rows,
    }


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


_loadavg_at_start = _loadavg()


def print_table(result: dict[str, Any]) -> None:
    head = (f"{'shape':<22} {'ours s':>7} {'SPU s':>7} {'CrypTen s':>9} {'o/SPU t':>8} {'o/CrT t':>8} "
            f"{'ours MB':>8} {'SPU MB':>8} {'CrT MB*':>8} {'o/SPU B':>8} {'o/CrT B*':>8} "
            f"{'rounds o/SPU/CrT':>17}  {'max err o/SPU/CrT'}")
    print("\n" + head)
    print("-" * len(head))
    for s in result["summary"]:
        e = s["max_abs_error"]
        rounds = "/".join(_fmt(v, "d") for v in (s["ours_rounds"], s["spu_send_actions_p0"],
                                                s["crypten_comm_calls_p0"]))
        errs = "/".join(_fmt(v, ".1e") for v in (e["ours"], e["spu"], e["crypten"]))
        print(f"{s['shape']:<22} {s['ours_s']:7.2f} {_fmt(s['spu_s'], '7.2f')} {_fmt(s['crypten_s'], '9.2f')} "
              f"{_fmt(s['ours_over_spu_time'], '8.3f')} {_fmt(s['ours_over_crypten_time'], '8.3f')} "
              f"{s['ours_MB_sent_mean_per_party']:8.1f} {_fmt(s['spu_MB_sent_p0'], '8.1f')} "
              f"{_fmt(s['crypten_MB_p0_crypten_count'], '8.1f')} {_fmt(s['ours_over_spu_bytes'], '8.3f')} "
              f"{_fmt(s['ours_over_crypten_bytes_vs_sent_estimate'], '8.3f')} {rounds:>17}  {errs}")
    print("MB: ours = sent per party (mean over parties and runs); SPU = sent by party 0 (mean over its calls)."
          " CrT MB*: CrypTen's own count for party 0 (sent + received); o/CrT B* compares with half of it."
          "\nrounds: ours = communication rounds;"
          " SPU = messages sent by party 0 ('send actions'); CrypTen = its communication calls.")
    for n in result["notes"]:
        print(f"note: {n}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", choices=[s.name for s in SHAPES], help="default: all")
    ap.add_argument("--peers-dir", default=str(DEFAULT_PEERS_DIR))
    ap.add_argument("--no-spu", action="store_true")
    ap.add_argument("--no-crypten", action="store_true")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed peer calls after the warm-up on shapes where ours took < --repeat-below-s")
    ap.add_argument("--repeat-below-s", type=float, default=1.5)
    ap.add_argument("--peer-timeout-s", type=float, default=420.0, help="limit for one peer run on one shape")
    ap.add_argument("--budget-s", type=float, default=1200.0, help="the whole benchmark")
    ap.add_argument("--reserve-s", type=float, default=60.0, help="budget kept back for our own runs")
    ap.add_argument("--recipe", choices=["puma", "ours"], default="puma",
                    help="our side's forms: PUMA's (as SPU runs them; the default) or ours")
    ap.add_argument("--out", default=None, help="default benchmarks/results/peers.json (peers_ours.json for ours)")
    args = ap.parse_args(argv)
    if args.out is None:
        name = "peers.json" if args.recipe == "puma" else f"peers_{args.recipe}.json"
        args.out = str(ROOT / "benchmarks" / "results" / name)
    result = run(args)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out} ({result['wall_seconds_total']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
