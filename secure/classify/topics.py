"""The topic task: which of six coarse topics a WordNet noun definition is about.

Texts are the first definition of every noun synset (``data.noun`` of WordNet 3.0, the
Debian package ``wordnet-base``; read and cleaned as :mod:`secure.distill.wordnet` does),
labelled by the synset's lexicographer file:

==========  ===============  ==========================================================
label       lexicographer    a test text
==========  ===============  ==========================================================
animal      noun.animal      "The young of certain carnivorous mammals such as the bear or
                             wolf or lion."
plant       noun.plant       "Any coniferous tree of the genus Picea."
food        noun.food        "A meal set out on a buffet at which guests help themselves."
person      noun.person      "An imaginary being similar to a person but smaller and with
                             hairy feet."
artifact    noun.artifact    "Artillery designed to shoot upward at airplanes."
location    noun.location    "A region whose population is affected by a general disaster."
==========  ===============  ==========================================================

The split is deterministic and by synset: a synset is a test synset when a salted SHA-256
of its id (``n02010272``) is 0 modulo :data:`TEST_MODULUS`. A definition that several
synsets share (562 texts in all of ``data.noun``) is dropped, so no text is in both
splits or under two labels. Each class keeps the :data:`TRAIN_PER_CLASS` training and
:data:`TEST_PER_CLASS` test synsets whose hashes come first: 6000 training and 384 test
texts, balanced (the whole pool, 42,934 texts, is unbalanced from 2560 food to 11,528
artifact definitions). Nothing is downloaded; without WordNet every function raises
:class:`secure.distill.wordnet.WordNetMissing`.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from secure.distill.wordnet import WordNetMissing, clean_text, missing_reason, parse_gloss, wordnet_dir

LABELS: tuple[str, ...] = ("animal", "plant", "food", "person", "artifact", "location")
"""The six classes, in the order of the classifier's logits."""

LEXICOGRAPHER_FILES: dict[int, str] = {5: "animal", 20: "plant", 13: "food", 18: "person", 6: "artifact",
                                       15: "location"}
"""WordNet 3.0 lexicographer file numbers (``lexnames``: 05 noun.animal, 06 noun.artifact,
13 noun.food, 15 noun.location, 18 noun.person, 20 noun.plant) -> label."""

TEST_MODULUS: int = 8
"""A synset is a test synset when its salted hash is 0 modulo this (about 1 in 8)."""
TRAIN_PER_CLASS: int = 1000
TEST_PER_CLASS: int = 64

_SALT = b"secure-classify-topics-split-v1:"


@dataclass(frozen=True)
class Example:
    """One labelled text: the synset's id (``n`` and its offset), its first definition and label."""

    synset: str
    text: str
    label: int


def _rank(synset: str) -> int:
    return int.from_bytes(hashlib.sha256(_SALT + synset.encode()).digest()[:8], "big")


def is_test_synset(synset: str) -> bool:
    """The fixed split, by a salted SHA-256 of the synset id."""
    return _rank(synset) % TEST_MODULUS == 0


@functools.cache
def all_examples() -> tuple[Example, ...]:
    """Every noun synset of the six classes with a usable first definition that no other
    noun synset shares, in file order."""
    reason = missing_reason()
    if reason is not None:
        raise WordNetMissing(reason)
    found: list[Example] = []
    counts: dict[str, int] = {}
    with open(wordnet_dir() / "data.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" ") or " | " not in line:
                continue  # the licence header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            definitions, _ = parse_gloss(gloss)
            text = clean_text(definitions[0]) if definitions else None
            if text is None:
                continue
            counts[text] = counts.get(text, 0) + 1
            label = LEXICOGRAPHER_FILES.get(int(fields[1]))
            if label is not None:
                found.append(Example(f"n{fields[0]}", text, LABELS.index(label)))
    return tuple(e for e in found if counts[e.text] == 1)


@functools.cache
def split() -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, test): per class the first :data:`TRAIN_PER_CLASS` training and
    :data:`TEST_PER_CLASS` test synsets by hash, then all of them ordered by synset id."""
    train: list[Example] = []
    test: list[Example] = []
    for label in range(len(LABELS)):
        pool = sorted((e for e in all_examples() if e.label == label), key=lambda e: _rank(e.synset))
        train.extend([e for e in pool if not is_test_synset(e.synset)][:TRAIN_PER_CLASS])
        test.extend([e for e in pool if is_test_synset(e.synset)][:TEST_PER_CLASS])
    return tuple(sorted(train, key=lambda e: e.synset)), tuple(sorted(test, key=lambda e: e.synset))


def train_examples() -> tuple[Example, ...]:
    return split()[0]


def test_examples() -> tuple[Example, ...]:
    return split()[1]


__all__ = ["LABELS", "LEXICOGRAPHER_FILES", "TEST_MODULUS", "TEST_PER_CLASS", "TRAIN_PER_CLASS", "Example",
           "all_examples", "is_test_synset", "split", "test_examples", "train_examples"]
