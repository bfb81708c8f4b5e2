"""Correlated randomness from a cryptographically secure PRF (AES-128 in counter mode).

Choice: AES-CTR through the ``cryptography`` package (OpenSSL, AES-NI): several GB/s on
one core, and a standard PRF assumption. torch's and numpy's generators are never used
for anything a share depends on.

Keys (ABY3 layout). There are three keys k_0, k_1, k_2; key k_j is known to exactly the
two parties j and j-1, so party i holds k_i (shared with its predecessor) and k_{i+1}
(shared with its successor). With a per-key call counter kept in lockstep by both
holders, the parties get, without communication:

* a replicated sharing of a fresh random value r = r_0 + r_1 + r_2 with r_j = F(k_j, n):
  party i computes its pair (r_i, r_{i+1});
* a zero sharing alpha_i = F(k_i, n) - F(k_{i+1}, n), whose three parts sum to 0.

Each call of :meth:`PairwiseKeys.draw` consumes a fresh nonce on the key, so a
(key, nonce) pair is never reused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 16


def random_key() -> bytes:
    """A fresh 128-bit key from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)


def csprng_words(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n uniformly random int64 words straight from the OS CSPRNG (for one-off sampling)."""
    return _bytes_to_words(os.urandom(8 * n), n, device)


def _bytes_to_words(data: bytes, n: int, device: torch.device | str) -> torch.Tensor:
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    words = torch.frombuffer(bytearray(data), dtype=torch.int64, count=n)
    return words.to(device)


@dataclass
class PrfStream:
    """AES-128-CTR keystream read as int64 words; one nonce per draw."""

    key: bytes
    calls: int = 0

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"PRF key must be {KEY_BYTES} bytes, got {len(self.key)}")

    def words(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """F(key, calls) expanded to n int64 words; advances the call counter."""
        nonce = self.calls.to_bytes(8, "big") + bytes(8)
        self.calls += 1
        encryptor = Cipher(algorithms.AES(self.key), modes.CTR(nonce)).encryptor()
        return _bytes_to_words(encryptor.update(bytes(8 * n)), n, device)

    def fork(self) -> PrfStream:
        """A stream of its own under a fresh key F(key, calls) (one nonce of this stream): the
        other holder forking at the same point gets the same stream."""
        nonce = self.calls.to_bytes(8, "big") + bytes(8)
        self.calls += 1
        encryptor = Cipher(algorithms.AES(self.key), modes.CTR(nonce)).encryptor()
        return PrfStream(encryptor.update(bytes(KEY_BYTES)))


@dataclass
class PairwiseKeys:
    """The two PRF keys one party holds: k_i (with party i-1) and k_{i+1} (with party i+1)."""

    with_prev: PrfStream
    with_next: PrfStream

    def fork(self) -> PairwiseKeys:
        """Keys of their own for a protocol branch that runs interleaved with others
        (:mod:`secure.mpc.concurrent`): each pairwise stream forked, so the draws of one
        branch never shift the other's."""
        return PairwiseKeys(with_prev=self.with_prev.fork(), with_next=self.with_next.fork())

    def draw(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(F(k_i, n), F(k_{i+1}, n)) with the shape given: this party's pair of a random sharing."""
        n = _numel(shape)
        a = self.with_prev.words(n, device).reshape(shape)
        b = self.with_next.words(n, device).reshape(shape)
        return a, b

    def zero_share(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
        """alpha_i = F(k_i, n) - F(k_{i+1}, n); the three parties' alphas sum to 0."""
        a, b = self.draw(shape, device)
        return a - b

    def zero_share_xor(self, shape: torch.Size | tuple[int, ...],
                       device: torch.device | str = "cpu") -> torch.Tensor:
        """beta_i = F(k_i, n) xor F(k_{i+1}, n); the three betas xor to 0."""
        a, b = self.draw(shape, device)
        return a ^ b

def _numel(shape: torch.Size | tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
