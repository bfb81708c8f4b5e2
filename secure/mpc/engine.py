"""The in-process three-party engine: three parties as threads over queues.

``LocalCluster`` keeps three parties (keys set up once) and runs one program on all of
them in lockstep: ``cluster.run(fn, args)`` calls ``fn(party, *args[i])`` in party i's
thread and returns the three results. If any party raises, the network is aborted so the
others fail at once instead of waiting for their deadline, and the first error is raised
in the caller with the failing party named.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from secure.mpc.party import Party
from secure.mpc.ring import FixedPoint
from secure.profile.profiler import Profiler
from secure.transport.base import DEFAULT_DEADLINE_S, TransportError
from secure.transport.inprocess import InProcessNetwork


class PartyFailure(RuntimeError):
    """A party raised while running a program; ``party_id`` says which."""

    def __init__(self, party_id: int, error: BaseException) -> None:
        super().__init__(f"party {party_id} failed: {type(error).__name__}: {error}")
        self.party_id = party_id
        self.error = error


class LocalCluster:
    """Three parties in one process, linked by an in-process network."""

    def __init__(
        self,
        fixed_point: FixedPoint | None = None,
        device: torch.device | str = "cpu",
        deadline_s: float = DEFAULT_DEADLINE_S,
        profile: bool = True,
    ) -> None:
        self.fp = fixed_point or FixedPoint()
        self.device = torch.device(device)
        self.deadline_s = deadline_s
        self._profile = profile
        self._connect()
        self.run(lambda p: p.setup_keys())

    def _connect(self) -> None:
        self.network = InProcessNetwork(self.deadline_s)
        self.parties = [
            Party(self.network.endpoint(i), self.fp, self.device,
                  Profiler() if self._profile else None)
            for i in range(3)
        ]

    def run(self, fn: Callable[..., Any], args: Sequence[Sequence[Any]] | None = None) -> list[Any]:
        """Run ``fn(party, *args[i])`` on the three parties concurrently; return the results."""
        per_party = list(args) if args is not None else [(), (), ()]
        if len(per_party) != 3:
            raise ValueError(f"run needs one argument tuple per party (3), got {len(per_party)}")
        results: list[Any] = [None, None, None]
        errors: list[tuple[int, BaseException]] = []

        def body(i: int) -> None:
            try:
                results[i] = fn(self.parties[i], *per_party[i])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append((i, e))
                self.network.abort(f"party {i} raised {type(e).__name__}: {e}")

        threads = [threading.Thread(target=body, args=(i,), name=f"party-{i}") for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            # the network is poisoned and the PRF counters may be out of step: start afresh
            self._connect()
            self.run(lambda p: p.setup_keys())
            first = next((e for e in errors if not isinstance(e[1], TransportError)), errors[0])
            raise PartyFailure(*first) from first[1]
        return results

    @property
    def rounds(self) -> int:
        """Rounds so far (equal on all parties)."""
        return self.parties[0].rounds

    def bytes_sent(self) -> list[int]:
        """Bytes each party has sent so far."""
        return [p.bytes_sent for p in self.parties]
