"""Train the linear head of ``minilm-topics`` on MiniLM's mean-pooled embeddings.

    python -m secure.classify.train --out secure/classify/minilm_topics

Steps, all deterministic (float64, no sampling):

1. the pooled all-MiniLM-L6-v2 embedding (:class:`secure.models.SentenceEncoder`, not
   normalised: what the served model computes) of every training and test text of
   :mod:`secure.classify.topics` (6000 + 384), in batches of texts sorted by length;
2. the weight decay: multinomial logistic regression (L-BFGS, :func:`fit_head`) fitted on
   the training texts whose synset hash is not 0 modulo 6 and scored on the others, for
   each of :data:`WEIGHT_DECAYS`; the best validation accuracy wins (ties: the larger decay);
3. the head refitted on all 6000 training texts with that decay, and scored on the test split;
4. ``OUT/head.safetensors`` (:func:`secure.classify.save_head`) and ``OUT/training.json``.

The test split is never used before step 3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secure.classify import HEAD_FILE, save_head
from secure.classify.topics import LABELS, TEST_PER_CLASS, TRAIN_PER_CLASS, Example, split

WEIGHT_DECAYS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
"""The L2 penalties tried (``decay / 2 * |W|^2`` beside the mean cross-entropy)."""
VALIDATION_MODULUS: int = 6


def embed_texts(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Pooled embeddings (float64) of ``texts``, computed in batches of similar length."""
    order = sorted(range(len(texts)), key=lambda i: (len(tokenizer(texts[i])["input_ids"]), i))
    out = torch.zeros(len(texts), encoder.encoder.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in chunk], padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            out[chunk] = encoder(enc["input_ids"], enc["attention_mask"]).double()
    return out


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, weight_decay: float,
             iterations: int = 500) -> nn.Linear:
    """Multinomial logistic regression: mean cross-entropy plus ``weight_decay / 2 * |W|^2``
    (the bias is not penalised), minimised by L-BFGS (strong Wolfe line search) from zero
    in float64. Convex, so the optimum does not depend on the start."""
    x = features.to(torch.float64)
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, labels) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(w.detach())
        head.bias.copy_(b.detach())
    return head.eval()


def accuracy(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = (features.to(torch.float64) @ head.weight.double().T + head.bias.double()).argmax(-1)
    return float((predicted == labels).double().mean())


def _validation_synset(synset: str) -> bool:
    """1 in :data:`VALIDATION_MODULUS` training synsets, by a salted hash (only to choose the decay)."""
    digest = hashlib.sha256(b"secure-classify-topics-validation:" + synset.encode()).digest()
    return int.from_bytes(digest[:4], "big") % VALIDATION_MODULUS == 0


def _labels(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([e.label for e in examples])


def train(threads: int = 2, progress: bool = True) -> tuple[nn.Linear, dict[str, Any]]:
    """The head and the record of how it was made (see the module docstring)."""
    from secure.models import SentenceEncoder, load_minilm

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    train_set, test_set = split()
    encoder, tokenizer = load_minilm()
    model = SentenceEncoder(encoder).eval()
    x_train = embed_texts(model, tokenizer, [e.text for e in train_set])
    x_test = embed_texts(model, tokenizer, [e.text for e in test_set])
    y_train, y_test = _labels(train_set), _labels(test_set)
    embed_s = time.perf_counter() - t0
    if progress:
        print(f"embedded {len(train_set)} + {len(test_set)} texts in {embed_s:.0f} s", flush=True)
    held = torch.tensor([_validation_synset(e.synset) for e in train_set])
    validation = {}
    for decay in WEIGHT_DECAYS:
        head = fit_head(x_train[~held], y_train[~held], len(LABELS), decay)
        validation[decay] = accuracy(head, x_train[held], y_train[held])
        if progress:
            print(f"weight decay {decay:g}: validation accuracy {validation[decay]:.4f}", flush=True)
    best = max(WEIGHT_DECAYS, key=lambda d: (validation[d], d))
    head = fit_head(x_train, y_train, len(LABELS), best)
    record = {
        "command": "python -m secure.classify.train --out secure/classify/minilm_topics",
        "task": "WordNet 3.0 noun definitions by lexicographer file (secure.classify.topics)",
        "labels": list(LABELS),
        "split": {"train": len(train_set), "test": len(test_set), "train_per_class": TRAIN_PER_CLASS,
                  "test_per_class": TEST_PER_CLASS, "validation": int(held.sum())},
        "features": "all-MiniLM-L6-v2 mean-pooled embedding (not normalised), 384",
        "weight_decays": {f"{d:g}": round(a, 4) for d, a in validation.items()},
        "weight_decay": best,
        "train_accuracy": round(accuracy(head, x_train, y_train), 4),
        "test_accuracy": round(accuracy(head, x_test, y_test), 4),
        "seconds": {"embed": round(embed_s, 1), "total": round(time.perf_counter() - t0, 1)},
        "threads": threads,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return head, record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for head.safetensors and training.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    head, record = train(args.threads)
    save_head(head, LABELS, args.out / HEAD_FILE)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"test accuracy {record['test_accuracy']:.4f} ({record['split']['test']} texts), weight decay "
          f"{record['weight_decay']:g}; wrote {args.out / HEAD_FILE} and {args.out / 'training.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
