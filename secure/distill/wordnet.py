"""General English from WordNet 3.0, the Debian package ``wordnet-base``; nothing is downloaded.

The package ships ``/usr/share/wordnet/data.{noun,verb,adj,adv}`` (about 117,000 synsets):
every synset line ends with a gloss, ``definition; definition; "example"; "example"``.
The quoted examples (about 48,000, e.g. "he was elected to a seat in the Senate") are
ordinary English sentences and phrases on every topic; the definitions (about 134,000,
e.g. "the proceeding whereby a foreigner is granted citizenship") are plain descriptive
English. Both are cleaned (:func:`clean_text`: WordNet's `` `quotes' `` straightened,
whitespace normalised, first letter capitalised, a full stop added where the text has no
final punctuation, odd characters and over-long items dropped), deduplicated and sorted.

Every text is assigned to the training or the held-out pool by a salted SHA-256 of its
text (:func:`is_held_out`: 1 in :data:`HELD_OUT_MODULUS`), so the split is fixed whatever
is asked for and independent of the docstring corpus's split (:mod:`secure.distill.corpus`).
Held-out texts are never used for training or calibration; :func:`held_out_texts` draws
the fixed evaluation set from them.

``SECURE_WORDNET_DIR`` overrides the folder. Without the package every function raises
:class:`WordNetMissing`, whose message names the package and how to install it
(``scripts/setup.sh`` installs it when run as root).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from secure.distill.corpus import distinct_draws

WORDNET_PACKAGE: str = "wordnet-base"
"""The Debian package that ships WordNet 3.0's database."""

DEFAULT_WORDNET_DIR: str = "/usr/share/wordnet"
POS_FILES: tuple[str, ...] = ("noun", "verb", "adj", "adv")

HELD_OUT_MODULUS: int = 16
"""A text is held out when its salted hash is 0 modulo this number (about 11,000 texts)."""

_SALT = b"secure-distill-wordnet-split-v1:"
MAX_WORDS: int = 60
_QUOTED = re.compile(r'"([^"]*)"')
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'!?()\-$%&/]+$")


class WordNetMissing(RuntimeError):
    """WordNet's data files are not on this machine."""


def wordnet_dir() -> Path:
    """The folder with ``data.noun`` etc. (``SECURE_WORDNET_DIR`` or /usr/share/wordnet)."""
    return Path(os.environ.get("SECURE_WORDNET_DIR", DEFAULT_WORDNET_DIR))


def missing_reason() -> str | None:
    """None when the data files are there, else a message naming the package."""
    folder = wordnet_dir()
    absent = [f"data.{pos}" for pos in POS_FILES if not (folder / f"data.{pos}").is_file()]
    if not absent:
        return None
    return (f"WordNet 3.0 is not installed ({', '.join(absent)} missing in {folder}): install the Debian "
            f"package {WORDNET_PACKAGE!r} (`sudo apt-get install {WORDNET_PACKAGE}`, or run "
            f"scripts/setup.sh as root), or point SECURE_WORDNET_DIR at a folder holding its data.* files")


def available() -> bool:
    """Whether WordNet's data files are on this machine."""
    return missing_reason() is None


def clean_text(text: str) -> str | None:
    """One gloss part or example as a text, or None to drop it.

    Straightens WordNet's `` `word' `` quotes, removes ``...`` (elisions), normalises
    whitespace, drops a trailing attribution (``"..." - Shakespeare`` keeps only the
    quote, which is how it arrives here), capitalises the first letter and adds a full
    stop unless the text ends in ``.!?``. Dropped: empty texts, texts over
    :data:`MAX_WORDS` words, and texts with characters outside plain English prose."""
    s = text.replace("`", "'").replace("...", " ").replace("--", " - ")
    s = " ".join(s.split()).strip(" ,;:-")
    if not s or len(s.split()) > MAX_WORDS or not _ALLOWED.match(s):
        return None
    if not any(c.isalpha() for c in s):
        return None
    s = s[0].upper() + s[1:]
    if s[-1] not in ".!?":
        s += "."
    return s


def parse_gloss(gloss: str) -> tuple[list[str], list[str]]:
    """``(definitions, examples)`` of one gloss (raw, not cleaned)."""
    examples = _QUOTED.findall(gloss)
    rest = _QUOTED.sub(";", gloss)
    definitions = [part.strip() for part in rest.split(";")]
    return [d for d in definitions if d], [e for e in examples if e.strip()]


@functools.cache
def _load() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(examples, definitions): cleaned, deduplicated, sorted; an example that is also a
    definition counts as an example only."""
    reason = missing_reason()
    if reason is not None:
        raise WordNetMissing(reason)
    examples: set[str] = set()
    definitions: set[str] = set()
    for pos in POS_FILES:
        with open(wordnet_dir() / f"data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith(" ") or " | " not in line:
                    continue  # the licence header
                defs, exs = parse_gloss(line.split(" | ", 1)[1])
                for raw, dest in [(e, examples) for e in exs] + [(d, definitions) for d in defs]:
                    text = clean_text(raw)
                    if text is not None:
                        dest.add(text)
    return tuple(sorted(examples)), tuple(sorted(definitions - examples))


def examples() -> tuple[str, ...]:
    """Every cleaned example sentence or phrase (sorted, distinct)."""
    return _load()[0]


def definitions() -> tuple[str, ...]:
    """Every cleaned definition (sorted, distinct, none equal to an example)."""
    return _load()[1]


def is_held_out(text: str) -> bool:
    """The fixed split: by a salted SHA-256 of the text."""
    digest = hashlib.sha256(_SALT + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % HELD_OUT_MODULUS == 0


@functools.cache
def _pools() -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {"train_examples": [], "train_definitions": [], "held_examples": [],
                                 "held_definitions": []}
    for kind, texts in (("examples", examples()), ("definitions", definitions())):
        for t in texts:
            out[("held_" if is_held_out(t) else "train_") + kind].append(t)
    return {k: tuple(v) for k, v in out.items()}


def training_pool() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(examples, definitions) that training and calibration may use."""
    p = _pools()
    return p["train_examples"], p["train_definitions"]


def held_out_pool() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(examples, definitions) never used for training or calibration."""
    p = _pools()
    return p["held_examples"], p["held_definitions"]


def _phrase(rng: random.Random, text: str) -> str:
    words = text.rstrip(".!?").split()
    k = rng.randint(1, min(4, len(words)))
    return " ".join(words[:k])


def _passage(rng: random.Random, pool: Sequence[str], low: int, high: int) -> str:
    """Pool texts drawn at random and joined until ``low``-``high`` words: a paragraph of
    unrelated sentences (64- and 128-token inputs)."""
    target = rng.randint(low, high)
    parts: list[str] = []
    count = 0
    while count < target:
        s = rng.choice(pool)
        parts.append(s)
        count += len(s.split())
    return " ".join(parts)


_KINDS: tuple[str, ...] = ("example", "definition", "example", "phrase", "example", "passage", "definition",
                           "example")
"""The cycle of held-out item kinds: half examples, a quarter definitions, one phrase (1-4
words of an example) and one passage (30-100 words) in eight."""

_TRAIN_KINDS: tuple[str, ...] = ("example", "definition", "example", "phrase", "passage", "passage", "definition",
                                 "short")
"""Training draws kinds from these: passages twice as often as in the held-out set (long
inputs are where a Power-Softmax student is weakest: measured on MiniLM, a passage's
cosine falls from 0.99 per sentence to 0.88 at 123 tokens), and short phrases with a final
``.``, ``!`` or ``?`` (inputs like "Thanks!")."""


def _item(kind: str, rng: random.Random, exs: Sequence[str], defs: Sequence[str]) -> str:
    if kind == "example":
        return rng.choice(exs)
    if kind == "definition":
        return rng.choice(defs)
    if kind == "phrase":
        return _phrase(rng, rng.choice(exs))
    if kind == "short":
        return _phrase(rng, rng.choice(exs)) + rng.choice(".!?")
    return _passage(rng, exs if rng.random() < 0.5 else defs, 30, 100)


@functools.cache
def _held_out_phrases() -> frozenset[str]:
    """Every 1-4 word prefix of a held-out example (training phrases equal to one are skipped)."""
    out = set()
    for s in held_out_pool()[0]:
        words = s.rstrip(".!?").split()
        for k in range(1, min(4, len(words)) + 1):
            out.add(" ".join(words[:k]))
    return frozenset(out)


def training_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` training texts (deterministic in ``seed``) from :func:`training_pool`, kinds
    drawn independently with the proportions of :data:`_TRAIN_KINDS`; never equal to a
    held-out text or to a phrase a held-out text starts with (final punctuation aside)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"wordnet-train-{seed}")
    exs, defs = training_pool()
    banned = _held_out_phrases() | set(held_out_pool()[0]) | set(held_out_pool()[1])
    out: list[str] = []
    while len(out) < n:
        item = _item(rng.choice(_TRAIN_KINDS), rng, exs, defs)
        if item not in banned and item.rstrip(".!?") not in banned:
            out.append(item)
    return out


def held_out_texts(n: int = 256) -> list[str]:
    """The fixed held-out evaluation set: ``n`` distinct texts from :func:`held_out_pool`
    in the fixed order of :data:`_KINDS` (a smaller ``n`` is a prefix of a larger one)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random("wordnet-held-out")
    exs, defs = held_out_pool()
    return distinct_draws(n, lambda k: _item(_KINDS[k % len(_KINDS)], rng, exs, defs), "the held-out pool")


__all__ = [
    "HELD_OUT_MODULUS",
    "WORDNET_PACKAGE",
    "WordNetMissing",
    "available",
    "clean_text",
    "definitions",
    "examples",
    "held_out_pool",
    "held_out_texts",
    "is_held_out",
    "missing_reason",
    "parse_gloss",
    "training_pool",
    "training_texts",
    "wordnet_dir",
]
