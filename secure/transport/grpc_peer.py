"""gRPC transport between party nodes.

Each ordered pair of parties has one long-lived client stream (``Peer.Link``) from the
sender to the receiver's server. A protocol message (a list of tensors) becomes frames
tagged (query id, sender, sequence number, tensor index) and chunked by
``secure.transport.wire``. The receiving server files completed messages in a
:class:`Mailbox` keyed by (query id, sender); a query's :class:`GrpcTransport` takes them
in sequence order, with a deadline. A party that fails a query sends an abort frame so
its peers fail the same query at once; a party that dies makes its peers fail the query
at the deadline. A broken link is re-opened on the next send, so a restarted peer is
reachable again for the next query.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from secure.transport.base import LinkCounters, PeerTimeoutError, TransportError, payload_bytes
from secure.transport.wire import TensorAssembler, WireError, tensor_chunks

log = logging.getLogger("secure.transport.grpc")

_CLOSE = object()


class Mailbox:
    """Completed messages from peers, per (query id, sender), with their sequence numbers."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._cond = threading.Condition()
        self._messages: dict[tuple[str, int], dict[int, list[torch.Tensor]]] = defaultdict(dict)
        self._partial: dict[tuple[str, int, int], dict[int, Any]] = {}
        self._aborted: dict[str, str] = {}
        self._finished: dict[str, None] = {}  # recently finished queries (late frames dropped)
        self._activity: dict[str, float] = {}  # query id -> last frame delivered or taken

    def deliver(self, frame: Any) -> None:
        """File one frame (called by the Peer server); raises WireError on a malformed one."""
        key = (frame.query_id, int(frame.sender))
        if frame.abort_reason:
            with self._cond:
                self._aborted[frame.query_id] = f"party {frame.sender} aborted: {frame.abort_reason}"
                self._cond.notify_all()
            return
        count, index = int(frame.tensor_count), int(frame.tensor_index)
        if not 0 <= index < max(count, 1) or count > 1024:
            raise WireError(f"bad tensor index {index} of {count}")
        mkey = (frame.query_id, int(frame.sender), int(frame.seq))
        with self._cond:
            if frame.query_id in self._finished:
                return
            self._activity[frame.query_id] = time.monotonic()
            parts = self._partial.setdefault(mkey, {})
            if count == 0:
                done: list[torch.Tensor] | None = []
            else:
                assembler = parts.setdefault(index, TensorAssembler(self.max_message_bytes))
                if not isinstance(assembler, TensorAssembler):
                    raise WireError(f"tensor {index} of message {frame.seq} arrived twice")
                tensor = assembler.add(frame.chunk)
                if tensor is not None:
                    parts[index] = tensor
                finished = [parts.get(i) for i in range(count)]
                done = finished if all(isinstance(t, torch.Tensor) for t in finished) else None
            if done is not None:
                del self._partial[mkey]
                self._messages[key][int(frame.seq)] = done
                self._cond.notify_all()

    def abort(self, query_id: str, reason: str) -> None:
        """Fail the query's pending and future receives on this party at once."""
        with self._cond:
            if query_id not in self._finished:
                self._aborted.setdefault(query_id, reason)
                self._cond.notify_all()

    def take(self, query_id: str, sender: int, seq: int, deadline_s: float, me: int) -> list[torch.Tensor]:
        """Message ``seq`` from ``sender`` for ``query_id``; waits up to the deadline."""
        key = (query_id, sender)
        end = time.monotonic() + deadline_s
        with self._cond:
            while True:
                if query_id in self._aborted:
                    raise TransportError(f"party {me}, query {query_id}: {self._aborted[query_id]}")
                box = self._messages.get(key)
                if box and seq in box:
                    return box.pop(seq)
                left = end - time.monotonic()
                if left <= 0:
                    raise PeerTimeoutError(f"party {me}, query {query_id}: no message #{seq} from "
                                           f"party {sender} within {deadline_s:.1f} s")
                self._cond.wait(left)

    def sweep(self, idle_s: float) -> None:
        """Drop messages of queries that saw no activity for ``idle_s`` (e.g. queries this
        party refused while its peers ran them)."""
        now = time.monotonic()
        with self._cond:
            stale = [q for q, t in self._activity.items() if now - t > idle_s]
            for q in stale:
                del self._activity[q]
                for key in [k for k in self._messages if k[0] == q]:
                    del self._messages[key]
                for key in [k for k in self._partial if k[0] == q]:
                    del self._partial[key]
                self._aborted.pop(q, None)

    def finished(self, query_id: str) -> bool:
        """Whether ``query_id`` ran here recently: its frames are dropped now, so the id cannot
        serve another query."""
        with self._cond:
            return query_id in self._finished

    def forget(self, query_id: str) -> None:
        """Drop everything held for a finished query."""
        with self._cond:
            for key in [k for k in self._messages if k[0] == query_id]:
                del self._messages[key]
            for key in [k for k in self._partial if k[0] == query_id]:
                del self._partial[key]
            self._aborted.pop(query_id, None)
            self._activity.pop(query_id, None)
            self._finished[query_id] = None
            while len(self._finished) > 10_000:
                del self._finished[next(iter(self._finished))]


class _OutgoingLink:
    """The sending side of one ordered pair: a queue drained into a Link stream."""

    def __init__(self, me: int, peer: int, channel_factory: Any, stub_factory: Any) -> None:
        self.me, self.peer = me, peer
        self._channel_factory = channel_factory
        self._stub_factory = stub_factory
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def send(self, frames: list[Any]) -> None:
        with self._lock:
            if self._queue is None or self._thread is None or not self._thread.is_alive():
                self._open()
            assert self._queue is not None
            for f in frames:
                self._queue.put(f)

    def _open(self) -> None:
        q: queue.Queue = queue.Queue()
        self._queue = q
        self.error = None

        def frames() -> Iterator[Any]:
            while True:
                item = q.get()
                if item is _CLOSE:
                    return
                yield item

        def pump() -> None:
            try:
                channel = self._channel_factory(self.peer)
                self._stub_factory(channel).Link(frames())
            except grpc.RpcError as e:
                self.error = f"{e.code().name}: {e.details()}"
                log.warning("link to party %d closed: %s", self.peer, self.error)
            except Exception as e:  # noqa: BLE001 - a link must never take the node down
                self.error = f"{type(e).__name__}: {e}"
                log.warning("link to party %d failed: %s", self.peer, self.error)

        self._thread = threading.Thread(target=pump, name=f"link-{self.me}->{self.peer}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._queue is not None:
                self._queue.put(_CLOSE)


class PeerLinks:
    """This party's outgoing links to its two peers."""

    def __init__(self, me: int, channel_factory: Any, stub_factory: Any, frame_factory: Any,
                 chunk_factory: Any) -> None:
        self.me = me
        self.frame = frame_factory
        self.chunk = chunk_factory
        self.links = {p: _OutgoingLink(me, p, channel_factory, stub_factory) for p in range(3) if p != me}

    def send(self, to: int, query_id: str, seq: int, tensors: list[torch.Tensor]) -> None:
        frames = []
        for index, t in enumerate(tensors):
            for chunk in tensor_chunks(t, self.chunk):
                frames.append(self.frame(query_id=query_id, sender=self.me, seq=seq, tensor_index=index,
                                         tensor_count=len(tensors), chunk=chunk))
        if not tensors:
            frames.append(self.frame(query_id=query_id, sender=self.me, seq=seq, tensor_count=0))
        self.links[to].send(frames)

    def abort(self, query_id: str, reason: str) -> None:
        for link in self.links.values():
            link.send([self.frame(query_id=query_id, sender=self.me, abort_reason=reason[:500])])

    def close(self) -> None:
        for link in self.links.values():
            link.close()


class GrpcTransport:
    """One query's view of the network: implements ``secure.transport.base.Transport``."""

    def __init__(self, party_id: int, query_id: str, links: PeerLinks, mailbox: Mailbox,
                 deadline_s: float) -> None:
        self.party_id = party_id
        self.query_id = query_id
        self.links = links
        self.mailbox = mailbox
        self.deadline_s = deadline_s
        self.counters = LinkCounters()
        self._sent_seq = {p: 0 for p in range(3) if p != party_id}
        self._recv_seq = {p: 0 for p in range(3) if p != party_id}

    def send(self, to: int, tensors: list[torch.Tensor]) -> None:
        if to not in self._sent_seq:
            raise ValueError(f"party {self.party_id} has no link to party {to}")
        self.counters.record(to, payload_bytes(tensors))
        self.links.send(to, self.query_id, self._sent_seq[to], tensors)
        self._sent_seq[to] += 1

    def recv(self, frm: int) -> list[torch.Tensor]:
        if frm not in self._recv_seq:
            raise ValueError(f"party {self.party_id} has no link to party {frm}")
        msg = self.mailbox.take(self.query_id, frm, self._recv_seq[frm], self.deadline_s, self.party_id)
        self._recv_seq[frm] += 1
        return msg

    def abort(self, reason: str) -> None:
        self.links.abort(self.query_id, reason)
