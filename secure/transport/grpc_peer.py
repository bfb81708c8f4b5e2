"""gRPC transport between party nodes.

Each ordered pair of parties has one long-lived client stream (``Peer.Link``) from the
sender to the receiver's server. A protocol message (a list of tensors) becomes one frame
tagged (query id, sender, sequence number) that lists the tensors' dtypes and shapes and
carries their raw bytes concatenated; only a message above ``wire.PART_BYTES`` is split
into several frames (parts). The sender encodes frames itself (a small protobuf header
plus the data field appended to it: one copy of the tensors' memory, no protobuf
message holding megabytes) and hands them to the link's stream through a queue, so a
send never waits for the network. The receiving server files completed messages in a
:class:`Mailbox` keyed by (query id, sender); a query's :class:`GrpcTransport` takes them
in sequence order, with a deadline, woken by the arrival of exactly the message it waits
for. A party that fails a query sends an abort frame so its peers fail the same query at
once; a party that dies makes its peers fail the query at the deadline. A broken link is
re-opened on the next send, so a restarted peer is reachable again for the next query;
after an abort the links are renewed too, so that a connection broken silently (a cut
cable) cannot lose the next query's frames once the cable is back. For benchmarks, a
``LinkShape`` makes every outgoing link emulate a delay and a rate
(``secure.transport.shaping``); without one the frames go out as soon as they are queued.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from secure.transport.base import LinkCounters, PeerTimeoutError, TransportError, payload_bytes
from secure.transport.shaping import LinkShape, LinkShaper
from secure.transport.wire import PART_BYTES, MessageAssembler, WireError, message_parts

log = logging.getLogger("secure.transport.grpc")

_CLOSE = object()
_DATA_FIELD = 11  # PeerFrame.data


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_DATA_TAG = _varint(_DATA_FIELD << 3 | 2)  # field 11, length-delimited


class Mailbox:
    """Completed messages from peers, per (query id, sender), with their sequence numbers."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int], threading.Condition] = {}  # one per receiving (query, sender)
        self._messages: dict[tuple[str, int], dict[int, list[torch.Tensor]]] = {}
        self._partial: dict[tuple[str, int, int], MessageAssembler] = {}
        self._aborted: dict[str, str] = {}
        self._finished: dict[str, None] = {}  # recently finished queries (late frames dropped)
        self._activity: dict[str, float] = {}  # query id -> last frame delivered or taken

    def deliver(self, frame: Any) -> None:
        """File one frame (called by the Peer server); raises WireError on a malformed one."""
        query_id, sender, seq = frame.query_id, int(frame.sender), int(frame.seq)
        if frame.abort_reason:
            self.abort(query_id, f"party {sender} aborted: {frame.abort_reason}", force=True)
            return
        index, count = int(frame.part_index), int(frame.part_count)
        key, mkey = (query_id, sender), (query_id, sender, seq)
        with self._lock:
            if query_id in self._finished:
                return
            self._activity[query_id] = time.monotonic()
            assembler = self._partial.get(mkey)
            if index == 0:
                if assembler is not None or seq in self._messages.get(key, ()):
                    raise WireError(f"message {seq} from party {sender} arrived twice")
                specs = [(t.dtype, tuple(t.shape)) for t in frame.tensors]
                assembler = MessageAssembler(specs, count, self.max_message_bytes)
            elif assembler is None:
                raise WireError(f"part {index} of message {seq} arrived before its first part")
            elif len(frame.tensors):
                raise WireError(f"part {index} of message {seq} lists tensors again")
            done = assembler.add(index, count, frame.data)
            if done is None:
                self._partial[mkey] = assembler
                return
            self._partial.pop(mkey, None)
            self._messages.setdefault(key, {})[seq] = done
            waiter = self._waiting.get(key)
            if waiter is not None:
                waiter.notify()

    def abort(self, query_id: str, reason: str, force: bool = False) -> None:
        """Fail the query's pending and future receives on this party at once (a peer's abort
        frame, ``force``, replaces an earlier local reason)."""
        with self._lock:
            if query_id in self._finished:
                return
            if force:
                self._aborted[query_id] = reason
            else:
                self._aborted.setdefault(query_id, reason)
            self._activity.setdefault(query_id, time.monotonic())  # swept if the query never runs here
            for key, waiter in self._waiting.items():
                if key[0] == query_id:
                    waiter.notify_all()

    def take(self, query_id: str, sender: int, seq: int, deadline_s: float, me: int) -> list[torch.Tensor]:
        """Message ``seq`` from ``sender`` for ``query_id``; waits up to the deadline."""
        key = (query_id, sender)
        end = time.monotonic() + deadline_s
        with self._lock:
            while True:
                if query_id in self._aborted:
                    raise TransportError(f"party {me}, query {query_id}: {self._aborted[query_id]}")
                box = self._messages.get(key)
                if box and seq in box:
                    self._activity[query_id] = time.monotonic()
                    return box.pop(seq)
                left = end - time.monotonic()
                if left <= 0:
                    raise PeerTimeoutError(f"party {me}, query {query_id}: no message #{seq} from "
                                           f"party {sender} within {deadline_s:.1f} s")
                waiter = self._waiting.get(key)
                if waiter is None:
                    waiter = self._waiting[key] = threading.Condition(self._lock)
                waiter.wait(left)

    def _drop(self, query_id: str) -> None:
        for table in (self._messages, self._waiting, self._partial):
            for key in [k for k in table if k[0] == query_id]:
                del table[key]
        self._aborted.pop(query_id, None)
        self._activity.pop(query_id, None)

    def sweep(self, idle_s: float) -> None:
        """Drop messages of queries that saw no activity for ``idle_s`` (e.g. queries this
        party refused while its peers ran them)."""
        now = time.monotonic()
        with self._lock:
            for q in [q for q, t in self._activity.items() if now - t > idle_s]:
                self._drop(q)

    def finished(self, query_id: str) -> bool:
        """Whether ``query_id`` ran here recently: its frames are dropped now, so the id cannot
        serve another query."""
        with self._lock:
            return query_id in self._finished

    def forget(self, query_id: str) -> None:
        """Drop everything held for a finished query."""
        with self._lock:
            self._drop(query_id)
            self._finished[query_id] = None
            while len(self._finished) > 10_000:
                del self._finished[next(iter(self._finished))]


def _raw(frame: bytes) -> bytes:
    return frame


class _OutgoingLink:
    """The sending side of one ordered pair: a queue of encoded frames drained into a Link
    stream by gRPC's request-consuming thread."""

    def __init__(self, me: int, peer: int, channel_factory: Any, method: str,
                 shaper: LinkShaper | None = None) -> None:
        self.me, self.peer = me, peer
        self._channel_factory = channel_factory
        self._method = method
        self.shaper = shaper  # link emulation (benchmarks); None: frames go out as soon as queued
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def send(self, frames: list[bytes]) -> None:
        with self._lock:
            if self._queue is None or self._thread is None or not self._thread.is_alive():
                self._open()
            assert self._queue is not None
            # stamped under the link's lock, so due times never decrease along the queue
            for f in (frames if self.shaper is None else self.shaper.stamp(frames)):
                self._queue.put(f)

    def _open(self) -> None:
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._queue = q
        self.error = None

        def frames() -> Iterator[bytes]:
            while True:
                item = q.get()
                if item is _CLOSE:
                    return
                yield item

        def pump() -> None:
            channel = None
            try:
                channel = self._channel_factory(self.peer)
                link = channel.stream_unary(self._method, request_serializer=_raw, response_deserializer=_raw)
                link(frames() if self.shaper is None else self.shaper.release(frames()))
            except grpc.RpcError as e:
                self.error = f"{e.code().name}: {e.details()}"
                log.warning("link to party %d closed: %s", self.peer, self.error)
            except Exception as e:  # noqa: BLE001 - a link must never take the node down
                self.error = f"{type(e).__name__}: {e}"
                log.warning("link to party %d failed: %s", self.peer, self.error)
            finally:
                q.put(_CLOSE)  # ends gRPC's consumer of this stream's frames, if still waiting
                if channel is not None:
                    channel.close()

        self._thread = threading.Thread(target=pump, name=f"link-{self.me}->{self.peer}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            if self._queue is not None:
                self._queue.put(_CLOSE)

    def renew(self) -> None:
        """End the current stream once what is queued on it has gone; the next send opens a
        new one, on a new connection (a new channel)."""
        with self._lock:
            if self._queue is not None:
                self._queue.put(_CLOSE)
                self._queue = None


class PeerLinks:
    """This party's outgoing links to its two peers.

    ``frame_factory`` and ``spec_factory`` are the generated PeerFrame and TensorSpec
    message classes; the Link method's path is read from their descriptors. ``shape``
    emulates a link (delay and rate) on each outgoing link (``secure.transport.shaping``;
    benchmarks only).
    """

    def __init__(self, me: int, channel_factory: Any, frame_factory: Any, spec_factory: Any,
                 part_bytes: int = PART_BYTES, shape: LinkShape | None = None) -> None:
        self.me = me
        self.frame = frame_factory
        self.spec = spec_factory
        self.part_bytes = part_bytes
        service = frame_factory.DESCRIPTOR.file.services_by_name["Peer"]
        method = f"/{service.full_name}/{service.methods_by_name['Link'].name}"
        self.links = {p: _OutgoingLink(me, p, channel_factory, method,
                                       LinkShaper(shape) if shape is not None and shape.shaped else None)
                      for p in range(3) if p != me}

    def encode(self, query_id: str, seq: int, tensors: list[torch.Tensor]) -> list[bytes]:
        """The serialized PeerFrames of one message (copies the tensors' bytes)."""
        specs, parts = message_parts(tensors, self.part_bytes)
        frames = []
        for index, segments in enumerate(parts):
            header = self.frame(query_id=query_id, sender=self.me, seq=seq, part_index=index, part_count=len(parts),
                                tensors=[self.spec(dtype=d, shape=s) for d, s in specs] if index == 0 else None)
            size = sum(len(s) for s in segments)
            frames.append(b"".join([header.SerializeToString(), _DATA_TAG, _varint(size), *segments]))
        return frames

    def send(self, to: int, query_id: str, seq: int, tensors: list[torch.Tensor]) -> None:
        self.links[to].send(self.encode(query_id, seq, tensors))

    def abort(self, query_id: str, reason: str) -> None:
        """Tell both peers that the query failed here; then renew both links.

        A query fails when a peer was silent past the deadline or told us it failed; either
        way a connection may have broken without a reset (a cut cable). TCP retransmits into
        it until it is given up (seconds later, by the TCP user timeout or gRPC's keepalive),
        and whatever the next queries send on it meanwhile is lost with it, failing them at
        their deadline although the cable is back. So the current streams end after this
        abort frame and the next message opens a new connection (one TLS handshake when the
        old one was fine; what concurrent queries queued still goes out on the old stream,
        and receivers take messages by number)."""
        frame = self.frame(query_id=query_id, sender=self.me, abort_reason=reason[:500]).SerializeToString()
        for link in self.links.values():
            link.send([frame])
            link.renew()

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
