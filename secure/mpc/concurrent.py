"""Independent protocol branches in shared rounds.

Two protocols of one party that do not depend on each other (the comparison pass of an
activation and the powers of its input) need not take turns: :func:`run_concurrently`
runs each branch in a thread of its own and merges the branches' k-th exchanges into one
round, so together they cost the rounds of the longest branch instead of the sum.

Why the three parties stay in step: the branches never run at the same time. Between two
exchanges the coordinator resumes them one after the other, in the order given, so they
read the round counter in the same order on every party, and each branch's k-th exchange
is the k-th of that branch on every party (every protocol calls :meth:`Party.exchange`
equally often on all three parties).

A merged round sends each live branch's messages as messages of their own, in branch
order, and receives them likewise: a link delivers in order, and branch i of one party
sends to a peer exactly when branch i of that peer receives from it, so the k-th message
on a link in a round is the same branch's at both ends, with no framing and no byte beyond
the branches' own.

Each branch draws from pairwise PRF streams of its own
(:meth:`secure.mpc.randomness.PairwiseKeys.fork`, forked in branch order before they
start): the two holders of a key may draw from it in different segments of a protocol (a
party that draws before an exchange where its peer draws after it), which is harmless in
one program order but would shift one branch's draws by the other's if they shared one
stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

R = TypeVar("R")

Messages = dict[int, list[torch.Tensor]]
Exchange = Callable[[Sequence[tuple[int, list[torch.Tensor]]], Sequence[int]], list[list[torch.Tensor]]]
"""One round of messages in order: (sends as (peer, tensors), peers to receive from, in
order) -> the received messages, in that order."""


class _Cancelled(BaseException):
    """Raised in a branch blocked in an exchange when another branch failed."""


class _Branch:
    def __init__(self, fn: Callable[[], Any], keys: Any) -> None:
        self.fn = fn
        self.keys = keys
        self.resume = threading.Semaphore(0)
        self.request: tuple[Messages, list[int]] | None = None
        self.reply: Messages | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.cancelled = False


class Merger:
    """The coordinator of one :func:`run_concurrently` call (see the module docstring)."""

    def __init__(self, branches: Sequence[Callable[[], Any]], exchange_now: Exchange, keys: Sequence[Any]) -> None:
        self.branches = [_Branch(fn, k) for fn, k in zip(branches, keys)]
        self.exchange_now = exchange_now
        self.yielded = threading.Semaphore(0)
        self._threads: dict[int, _Branch] = {}

    def owns_current_thread(self) -> bool:
        return threading.get_ident() in self._threads

    def current_keys(self) -> Any:
        """The PRF keys of the branch running in this thread."""
        return self._threads[threading.get_ident()].keys

    def exchange(self, send: Messages, recv_from: list[int]) -> Messages:
        """A branch's exchange: hand the request to the coordinator and wait for the merged round."""
        branch = self._threads[threading.get_ident()]
        branch.request = (send, list(recv_from))
        self.yielded.release()
        branch.resume.acquire()
        if branch.cancelled:
            raise _Cancelled
        reply, branch.reply = branch.reply, None
        assert reply is not None
        return reply

    def _body(self, branch: _Branch) -> None:
        self._threads[threading.get_ident()] = branch
        branch.resume.acquire()
        try:
            if not branch.cancelled:
                branch.result = branch.fn()
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the coordinator, which re-raises it
            branch.error = e
        finally:
            branch.done = True
            self.yielded.release()

    def _step(self, branch: _Branch) -> None:
        """Let ``branch`` run until its next exchange or its end."""
        branch.resume.release()
        self.yielded.acquire()

    def run(self) -> list[Any]:
        threads = [threading.Thread(target=self._body, args=(b,), daemon=True, name=f"mpc-branch-{i}")
                   for i, b in enumerate(self.branches)]
        for t in threads:
            t.start()
        live = list(self.branches)
        try:
            while live:
                for b in live:
                    self._step(b)
                    if b.error is not None:
                        raise b.error
                live = [b for b in live if not b.done]
                if live:
                    replies = self._merged_round([b.request for b in live])  # type: ignore[misc]
                    for b, reply in zip(live, replies):
                        b.request, b.reply = None, reply
        finally:
            for b in self.branches:
                if not b.done:
                    b.cancelled = True
                    self._step(b)
            for t in threads:
                t.join()
        return [b.result for b in self.branches]

    def _merged_round(self, requests: list[tuple[Messages, list[int]]]) -> list[Messages]:
        """One round carrying every live branch's messages, each its own, in branch order."""
        sends = [(to, tensors) for send, _ in requests for to, tensors in send.items()]
        recvs = [(i, frm) for i, (_, recv_from) in enumerate(requests) for frm in recv_from]
        got = self.exchange_now(sends, [frm for _, frm in recvs])
        replies: list[Messages] = [{} for _ in requests]
        for (i, frm), tensors in zip(recvs, got):
            replies[i][frm] = tensors
        return replies


def run_concurrently(branches: Sequence[Callable[[], R]], exchange_now: Exchange,
                     install: Callable[[Merger | None], None], keys: Sequence[Any]) -> list[R]:
    """Run ``branches`` with their rounds merged (module docstring); ``install`` sets the
    party's active merger (and clears it with None), ``exchange_now`` is its real exchange,
    ``keys[i]`` branch i's PRF keys.
    Returns the branches' results in order; the first branch error is re-raised after the
    other branches were stopped."""
    if len(branches) <= 1:
        return [b() for b in branches]
    merger = Merger(branches, exchange_now, keys)
    install(merger)
    try:
        return merger.run()
    finally:
        install(None)
