"""The client's choice of the next token from the logits it opened.

Only the client sees the logits (``reveal="logits"``), so sampling is the client's own
business: greedy, temperature, top-k and top-p (nucleus) filtering, in that order, as
Hugging Face's samplers apply them. The randomness is the client's: a ``torch.Generator``
seeded from the operating system's CSPRNG unless a seed is given for reproducibility
(it decides which token is drawn, never a share).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass
class Sampler:
    """``temperature == 0`` is greedy (argmax, first on ties); otherwise softmax(logits / T)
    restricted to the ``top_k`` largest (0: all) and to the smallest set whose probability
    reaches ``top_p`` (1.0: all), renormalised, sampled."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self._generator = torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution the next token is drawn from (one-hot on the argmax when greedy)."""
        logits = logits.reshape(-1).to(torch.float64)
        if self.greedy:
            return torch.nn.functional.one_hot(torch.argmax(logits), logits.numel()).to(torch.float64)
        scaled = logits / self.temperature
        if 0 < self.top_k < scaled.numel():
            kth = torch.topk(scaled, self.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if self.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ranked above each
            drop = torch.zeros_like(probs, dtype=torch.bool)
            drop[order] = before >= self.top_p
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum()
        return probs

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token."""
        if self.greedy:
            return int(torch.argmax(logits.reshape(-1)))
        return int(torch.multinomial(self.probabilities(logits), 1, generator=self._generator))
