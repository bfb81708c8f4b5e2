"""Core-operation benchmark of the in-process three-party engine.

For each operation: wall time of the secure run, the plaintext torch time of the same
operation in the same run (ratio secure/plain), bytes sent by each party and rounds. The
activations (PUMA's and the even GeLU and SiLU) also report comparisons per element and
bytes per element over the three parties, on the same input.
Prints a table and writes JSON (default benchmarks/results/core_ops.json).

    python benchmarks/core_ops.py            # the shapes of the issue (about 1-2 minutes)
    python benchmarks/core_ops.py --quick    # small shapes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from secure.approx.gelu import even_gelu, even_silu, puma_gelu, puma_silu
from secure.approx.norms import layer_norm
from secure.approx.softmax import puma_softmax
from secure.mpc import arithmetic as ar
from secure.mpc import compare as cmp
from secure.mpc import shares as sh
from secure.mpc.backend import MpcOps
from secure.mpc.embedding import client_onehot_shares, embed, puma_onehot
from secure.mpc.engine import LocalCluster


@dataclass
class Result:
    op: str
    shape: str
    seconds: float
    plaintext_seconds: float
    bytes_per_party: list[int]
    rounds: int
    max_abs_error: float
    comparisons_per_element: float | None = None
    """Public thresholds compared per input element (activations only)."""
    bytes_per_element: float | None = None
    """Bytes sent by the three parties together per input element (activations only)."""

    @property
    def slowdown(self) -> float:
        return self.seconds / max(self.plaintext_seconds, 1e-9)


def _time(fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class Bench:
    def __init__(self, device: str) -> None:
        self.cluster = LocalCluster(device=device, profile=False)
        self.fp = self.cluster.fp
        self.device = device
        self.results: list[Result] = []

    def share(self, x: torch.Tensor, integral: bool = False) -> list[sh.AShare]:
        ring = x.to(torch.int64) if integral else self.fp.encode(x)
        return sh.deal_shares(ring.to(self.device), 0 if integral else self.fp.frac_bits)

    def measure(self, op: str, shape: str, program: Callable, inputs: list[list[sh.AShare]],
                plain: Callable[[], torch.Tensor], opened_frac_bits: int | None = None) -> Result:
        """Run ``program(party, *inputs)`` securely, open its result, compare with ``plain``."""
        c = self.cluster
        args = [tuple(x[i] for x in inputs) for i in range(3)]
        seconds = float("inf")
        for _ in range(2):  # a second run when the first was short: first calls warm up torch
            bytes0, rounds0 = c.bytes_sent(), c.rounds
            t0 = time.perf_counter()
            outs = c.run(program, args)
            seconds = min(seconds, time.perf_counter() - t0)
            sent = [b - b0 for b, b0 in zip(c.bytes_sent(), bytes0)]
            rounds = c.rounds - rounds0
            if seconds > 2.0:
                break
        ring = sh.reconstruct([o for o in outs])
        frac = outs[0].frac_bits if opened_frac_bits is None else opened_frac_bits
        secure = self.fp.decode(ring.cpu(), frac)
        reference = plain()
        err = float((secure - reference.double()).abs().max()) if reference.numel() else 0.0
        res = Result(op, shape, seconds, _time(plain), sent, rounds, err)
        self.results.append(res)
        print(f"{op:<28} {shape:<22} {seconds:9.3f} s {res.slowdown:9.0f}x "
              f"{max(sent) / 1e6:10.2f} MB {rounds:6d} {err:10.2e}", flush=True)
        return res


class ComparisonCount:
    """MpcOps that count, on party 0, the elements compared in ``less_than_public`` (one per
    threshold and element) and the runs (one ``ops`` call per run); the other parties run
    plain MpcOps."""

    def __init__(self) -> None:
        self.compared = 0
        self.runs = 0

    def ops(self, party) -> MpcOps:
        if party.id != 0:
            return MpcOps(party)
        self.runs += 1
        counter = self

        class Counting(MpcOps):
            def less_than_public(self, x, thresholds, magnitude=None):
                counter.compared += len(thresholds) * x.a.numel()
                return super().less_than_public(x, thresholds, magnitude)

        return Counting(party)


def measure_activation(b: Bench, op: str, form: Callable, x: torch.Tensor,
                       exact: Callable[[torch.Tensor], torch.Tensor]) -> Result:
    """One activation form on shares of x, with comparisons and bytes per element."""
    count = ComparisonCount()
    res = b.measure(op, "x".join(map(str, x.shape)), lambda p, a: form(count.ops(p), a), [b.share(x)],
                    lambda: exact(x))
    res.comparisons_per_element = count.compared / count.runs / x.numel()
    res.bytes_per_element = sum(res.bytes_per_party) / x.numel()
    print(f"{'':<28} {res.comparisons_per_element:g} comparisons and "
          f"{res.bytes_per_element:.0f} bytes (three parties) per element", flush=True)
    return res


def run(quick: bool, device: str) -> list[Result]:
    torch.manual_seed(0)  # benchmark inputs only; share randomness comes from the CSPRNG
    b = Bench(device)
    print(f"{'operation':<28} {'shape':<22} {'secure':>11} {'vs plain':>10} "
          f"{'max MB/party':>13} {'rounds':>6} {'max error':>10}")

    m, k, n = (32, 128, 128) if quick else (128, 768, 768)
    x = torch.randn(m, k, dtype=torch.float64)
    w = torch.randn(k, n, dtype=torch.float64) / k**0.5
    b.measure("matmul (fixed point)", f"{m}x{k}x{n}", lambda p, a, c: ar.matmul(p, a, c),
              [b.share(x), b.share(w)], lambda: x @ w)

    rows, cols = (32, 768) if quick else (128, 3072)
    y = torch.randn(rows, cols, dtype=torch.float64) * 4
    wide = sh.deal_shares((b.fp.encode(y) << b.fp.frac_bits).to(device), 2 * b.fp.frac_bits)
    b.measure("truncation (exact)", f"{rows}x{cols}",
              lambda p, a: ar.truncate_exact_many(p, [a], [b.fp.frac_bits])[0], [wide], lambda: y)
    b.measure("truncation (probabilistic)", f"{rows}x{cols}",
              lambda p, a: ar.truncate_many(p, [a], [b.fp.frac_bits])[0], [wide], lambda: y)

    count = 10_000 if quick else 1_000_000
    u, v = torch.randn(count, dtype=torch.float64), torch.randn(count, dtype=torch.float64)
    fu, fv = b.fp.decode(b.fp.encode(u)), b.fp.decode(b.fp.encode(v))  # ties after rounding
    b.measure("less-than", f"{count}", lambda p, a, c: cmp.less_than(p, a, c),
              [b.share(u), b.share(v)], lambda: (fu < fv).double(), opened_frac_bits=0)

    g = torch.randn(rows, cols, dtype=torch.float64) * 3
    gelu, silu = torch.nn.functional.gelu, torch.nn.functional.silu
    for op, form, exact in (("PUMA GeLU", puma_gelu, gelu), ("even GeLU (ours)", even_gelu, gelu),
                            ("PUMA SiLU (ours)", puma_silu, silu), ("even SiLU", even_silu, silu)):
        measure_activation(b, op, form, g, exact)

    heads, seq = (2, 32) if quick else (12, 128)
    s = torch.randn(heads, seq, seq, dtype=torch.float64) * 3
    b.measure("softmax (t=6, order 3)", f"{heads}x{seq}x{seq}",
              lambda p, a: puma_softmax(MpcOps(p), a), [b.share(s)],
              lambda: torch.softmax(s, -1))
    b.measure("PUMA softmax (t=8)", f"{heads}x{seq}x{seq}",
              lambda p, a: puma_softmax(MpcOps(p), a, t=8, exp_order=1), [b.share(s)],
              lambda: torch.softmax(s, -1))

    hidden = 128 if quick else 768
    h = torch.randn(seq, hidden, dtype=torch.float64) * 2
    gamma = 1 + 0.1 * torch.randn(hidden, dtype=torch.float64)
    beta = 0.1 * torch.randn(hidden, dtype=torch.float64)
    b.measure("LayerNorm", f"{seq}x{hidden}",
              lambda p, a, gm, bt: layer_norm(MpcOps(p), a, gm, bt),
              [b.share(h), b.share(gamma), b.share(beta)],
              lambda: torch.nn.functional.layer_norm(h, (hidden,), gamma, beta, eps=1e-12))

    tokens, vocab, width = (8, 2000, 64) if quick else (32, 30522, 384)
    ids = torch.randint(0, vocab, (tokens,))
    table = torch.randn(vocab, width, dtype=torch.float64) * 0.05
    table_sh = b.share(table)
    onehot = client_onehot_shares(ids, vocab)
    upload = [s.wire_bytes for s in onehot]
    res = b.measure("embedding, client one-hot", f"{tokens} ids, V={vocab}",
                    lambda p, o, t: embed(p, o.expand(p.id, p.device), t),
                    [onehot, table_sh], lambda: table[ids])
    print(f"{'':<28} client upload per party: {[round(u / 1e6, 2) for u in upload]} MB")
    res.op += f" (+{max(upload) / 1e6:.1f} MB client upload)"
    b.measure("embedding, PUMA equality", f"{tokens} ids, V={vocab}",
              lambda p, i, t: embed(p, puma_onehot(p, i, vocab), t),
              [b.share(ids, integral=True), table_sh], lambda: table[ids])
    return b.results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/core_ops.json"))
    args = ap.parse_args()
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"host={platform.node()}")
    results = run(args.quick, args.device)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "results": [asdict(r) | {"slowdown_vs_plaintext": r.slowdown} for r in results],
    }
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
