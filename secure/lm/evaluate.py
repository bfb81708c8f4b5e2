"""How good the LM is: perplexity on texts, the unigram baseline, greedy continuations.

Perplexity is per token over every token after BOS (the text's tokens and the final EOS),
each text scored alone from position 0 and cut to the model's positions (a WordNet passage
can run past 128 tokens). The uniform baseline is the vocabulary size; the unigram
baseline scores the same tokens by the training stream's token frequencies (add-one).

Imports :mod:`secure.lm.tokenizer` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from secure.lm.tokenizer import encode_documents

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(input_ids, attention_mask) -> logits [batch, length, vocab]: a
:class:`secure.models.CausalLM`, or a lambda around a Hugging Face model."""


def _targets(tokenizer: object, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return [ids[:max_length] for ids in encode_documents(tokenizer, texts)]


@torch.no_grad()
def perplexity(logits_fn: LogitsFn, tokenizer: object, texts: Sequence[str], max_length: int = 128,
               batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per predicted token) of ``texts`` (right-padded
    batches; padding is masked and not scored)."""
    rows = _targets(tokenizer, texts, max_length)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = logits_fn(ids, mask).float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        scored = mask[:, 1:].bool()
        total += float(nll[scored].sum())
        count += int(scored.sum())
    return math.exp(total / count)


def unigram_perplexity(counts: torch.Tensor, tokenizer: object, texts: Sequence[str], max_length: int = 128) -> float:
    """Perplexity of the same tokens as :func:`perplexity` under the unigram distribution of
    ``counts`` (one count per vocabulary entry, add-one smoothed)."""
    logp = torch.log((counts.double() + 1.0) / (counts.double() + 1.0).sum())
    targets = [t for row in _targets(tokenizer, texts, max_length) for t in row[1:]]
    return math.exp(-float(logp[torch.tensor(targets)].mean()))


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, tokenizer: object, prompt: str, new_tokens: int = 24) -> str:
    """``prompt`` and the Hugging Face causal LM's greedy continuation (stops at EOS)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


__all__ = ["LogitsFn", "greedy_continuation", "perplexity", "unigram_perplexity"]
