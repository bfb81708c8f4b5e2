"""Which texts the shipped causal LM is trained and judged on: the project's own corpus.

* :func:`training_documents`: every text of the WordNet 3.0 training pool (examples and
  definitions, :func:`secure.distill.wordnet.training_pool`) and every sentence of the
  docstring training pool (:func:`secure.distill.corpus.training_pool`), each once, minus
  any text that equals a 1-4 word phrase a held-out WordNet example starts with (the rule
  :func:`secure.distill.wordnet.training_texts` applies); about 174,000 texts, 8.5 M characters.
* :func:`held_out_documents`: the fixed held-out WordNet evaluation set
  (:func:`secure.distill.wordnet.held_out_texts`: examples, definitions, phrases and
  passages of the held-out pool, which training never sees).
* :func:`docstring_documents`: the docstring evaluation set
  (:func:`secure.distill.corpus.evaluation_sentences`, disjoint from its training pool).

All deterministic (the docstring corpus depends on the Python release, see
:mod:`secure.distill.corpus`). Imports only :mod:`secure.distill`; never imports a model.
"""

from __future__ import annotations

from secure.distill import corpus, wordnet


def _held_out_prefixes() -> frozenset[str]:
    """Every 1-4 word prefix of a held-out WordNet example, final punctuation stripped."""
    out: set[str] = set()
    for text in wordnet.held_out_pool()[0]:
        words = text.rstrip(".!?").split()
        out.update(" ".join(words[:k]) for k in range(1, min(4, len(words)) + 1))
    return frozenset(out)


def training_documents(limit: int | None = None) -> list[str]:
    """The training texts in a fixed order (WordNet examples, definitions, then docstrings,
    each sorted); ``limit`` keeps every k-th text so that about ``limit`` remain (small
    test runs). Raises :class:`secure.distill.wordnet.WordNetMissing` without WordNet."""
    examples, definitions = wordnet.training_pool()
    banned = _held_out_prefixes()
    texts = [t for t in (*examples, *definitions) if t.rstrip(".!?") not in banned]
    texts += list(corpus.training_pool())
    if limit is not None and 0 < limit < len(texts):
        step = len(texts) // limit
        texts = texts[::step][:limit]
    return texts


def held_out_documents(n: int = 256) -> list[str]:
    """The first ``n`` texts of the fixed held-out WordNet evaluation set."""
    return wordnet.held_out_texts(n)


def docstring_documents(n: int = 64) -> list[str]:
    """The first ``n`` texts of the docstring evaluation set."""
    return corpus.evaluation_sentences(n)


__all__ = ["docstring_documents", "held_out_documents", "training_documents"]
