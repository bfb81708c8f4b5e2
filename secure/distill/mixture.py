"""What a Power-Softmax student is distilled, calibrated and judged on: a mixture of
general English (WordNet 3.0, :mod:`secure.distill.wordnet`) and Python docstrings
(:mod:`secure.distill.corpus`), plus three evaluation sets that neither training nor
calibration ever sees.

* :func:`training_texts`: two thirds WordNet (examples, definitions, short phrases,
  passages), one third docstrings (phrases, sentences, passages), shuffled together.
* :func:`calibration_texts`: another draw from the same training pools (the public
  ``upper`` is chosen on these).
* :func:`evaluation_sets`: ``general`` (:func:`secure.distill.wordnet.held_out_texts`,
  256 texts from the held-out WordNet pool), ``docstrings``
  (:func:`secure.distill.corpus.evaluation_sentences`, the docstring evaluation pool) and
  ``everyday`` (the 50 hand-written sentences of ``everyday_sentences.txt``: questions,
  news, recipes, medical, travel, "Thanks!").

All deterministic. Imports only :mod:`secure.distill` modules.
"""

from __future__ import annotations

import random
from pathlib import Path

from secure.distill import corpus, wordnet

DOCSTRING_SHARE: float = 1.0 / 3.0
"""Fraction of the training and calibration texts drawn from the docstring corpus."""

GENERAL_HELD_OUT: int = 256
"""Size of the held-out general-English evaluation set."""

DOCSTRING_EVALUATION: int = 64
"""Size of the docstring evaluation set (the existing ``corpus.evaluation_sentences()``)."""

EVERYDAY_FILE: Path = Path(__file__).with_name("everyday_sentences.txt")

_CALIBRATION_SEED_OFFSET = 1_000_003


def training_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` training texts: ``round(n * DOCSTRING_SHARE)`` docstring items and the rest
    WordNet items, none equal to an everyday sentence, shuffled (deterministic in
    ``seed``). Raises
    :class:`secure.distill.wordnet.WordNetMissing` without WordNet."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    k = round(n * DOCSTRING_SHARE)
    banned = set(everyday_sentences())
    texts = [t for t in wordnet.training_texts(n - k + 8, seed) if t not in banned][: n - k]
    texts += [t for t in corpus.training_sentences(k + 8, seed) if t not in banned][:k]
    if len(texts) != n:
        raise RuntimeError("too many training texts equal an everyday sentence")
    random.Random(f"mixture-{seed}").shuffle(texts)
    return texts


def calibration_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts from the training pools, a draw independent of :func:`training_texts`
    (``seed``) for choosing the public ``upper``; never a held-out text."""
    return training_texts(n, seed + _CALIBRATION_SEED_OFFSET)


def everyday_sentences() -> list[str]:
    """The 50 hand-written everyday sentences (``everyday_sentences.txt``), in file order."""
    lines = EVERYDAY_FILE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def evaluation_sets(general: int = GENERAL_HELD_OUT, docstrings: int = DOCSTRING_EVALUATION
                    ) -> dict[str, list[str]]:
    """``{"general", "docstrings", "everyday"}``: the held-out evaluation texts (``general=0``
    needs no WordNet)."""
    return {
        "general": wordnet.held_out_texts(general) if general else [],
        "docstrings": corpus.evaluation_sentences(docstrings),
        "everyday": everyday_sentences(),
    }


__all__ = [
    "DOCSTRING_SHARE",
    "EVERYDAY_FILE",
    "GENERAL_HELD_OUT",
    "calibration_texts",
    "everyday_sentences",
    "evaluation_sets",
    "training_texts",
]
