"""Streaming calls that open and then send nothing: how an idle or hostile client looks to a node."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc


class SilentStreams:
    """``count`` calls made by ``start(requests)``, whose request streams stay silent until
    :meth:`close`; ``channel`` is closed with them."""

    def __init__(self, start: Callable[[Iterator[Any]], Any], count: int, channel: grpc.Channel) -> None:
        self.release = threading.Event()
        self.channel = channel
        self.calls = [start(self._nothing()) for _ in range(count)]

    def _nothing(self) -> Iterator[Any]:
        self.release.wait(120)
        return
        yield  # a generator that yields nothing

    def outcomes(self, timeout_s: float) -> list[tuple[grpc.StatusCode, float]]:
        """Each call's final status and when it ended (seconds from now), waiting up to ``timeout_s``."""
        t0 = time.monotonic()
        out: list[tuple[grpc.StatusCode, float]] = []
        lock = threading.Lock()

        def wait(call: Any) -> None:
            try:
                for _ in call:
                    pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            with lock:
                out.append((code, time.monotonic() - t0))

        threads = [threading.Thread(target=wait, args=(c,), daemon=True) for c in self.calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, timeout_s - (time.monotonic() - t0)))
        return out

    def close(self) -> None:
        self.release.set()
        for c in self.calls:
            c.cancel()
        self.channel.close()
