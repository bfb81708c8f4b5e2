"""The peer links' wire format and mailbox, without processes: messages encoded by
``PeerLinks.encode`` parse as PeerFrames, reassemble to the tensors sent (in one frame or
several parts), and malformed frames are refused with a clear WireError."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from protos import load as load_protos
from secure.transport.base import PeerTimeoutError, TransportError
from secure.transport.grpc_peer import Mailbox, PeerLinks
from secure.transport.wire import MAX_TENSORS, MessageAssembler, WireError

pb2, _ = load_protos()


def links(me: int = 0, part_bytes: int = 3 << 20) -> PeerLinks:
    return PeerLinks(me, lambda peer: None, pb2.PeerFrame, pb2.TensorSpec, part_bytes=part_bytes)


def frames(tensors: list[torch.Tensor], part_bytes: int = 3 << 20, seq: int = 0, query: str = "q") -> list:
    return [pb2.PeerFrame.FromString(f) for f in links(part_bytes=part_bytes).encode(query, seq, tensors)]


def roundtrip(tensors: list[torch.Tensor], part_bytes: int = 3 << 20) -> tuple[int, list[torch.Tensor]]:
    box = Mailbox(max_message_bytes=1 << 30)
    sent = frames(tensors, part_bytes)
    for f in sent:
        box.deliver(f)
    return len(sent), box.take("q", 0, 0, 1.0, me=1)


MIXED = [
    torch.arange(7, dtype=torch.uint8),  # odd length: the next tensor starts misaligned
    torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
    torch.tensor([True, False, True]),
    torch.empty(0, 5, dtype=torch.int64),
    torch.linspace(-1, 1, 9, dtype=torch.float64).reshape(3, 3).t(),  # not contiguous
    torch.tensor(3.5, dtype=torch.float32),
    torch.arange(10, dtype=torch.int32),
]


@pytest.mark.parametrize("part_bytes", [3 << 20, 16, 5])
def test_message_roundtrip(part_bytes: int) -> None:
    count, got = roundtrip(MIXED, part_bytes)
    total = sum(t.numel() * t.element_size() for t in MIXED)
    assert count == (1 if part_bytes > total else -(-total // part_bytes))
    assert len(got) == len(MIXED)
    for a, b in zip(got, MIXED):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    got[1].add_(1)  # received tensors are writable and do not alias each other
    assert torch.equal(got[0], MIXED[0]) and torch.equal(got[1], MIXED[1] + 1)


def test_empty_message_and_one_large_tensor() -> None:
    assert roundtrip([]) == (1, [])
    big = torch.randint(-(1 << 62), 1 << 62, (3 << 18,), dtype=torch.int64)  # 6 MiB: three parts
    count, (got,) = roundtrip([big], part_bytes=1 << 21)
    assert count == 3 and torch.equal(got, big)


def test_sender_copies_at_send_time() -> None:
    t = torch.zeros(4, dtype=torch.int64)
    encoded = links().encode("q", 0, [t])
    t.fill_(7)
    box = Mailbox(1 << 20)
    box.deliver(pb2.PeerFrame.FromString(encoded[0]))
    assert torch.equal(box.take("q", 0, 0, 1.0, me=1)[0], torch.zeros(4, dtype=torch.int64))


def _frame(**kw: object) -> object:
    base = {"query_id": "q", "sender": 0, "seq": 0, "part_index": 0, "part_count": 1}
    base.update(kw)
    return pb2.PeerFrame(**base)


def _spec(dtype: str = "int64", shape: tuple[int, ...] = (2,)) -> object:
    return pb2.TensorSpec(dtype=dtype, shape=list(shape))


@pytest.mark.parametrize("frame, fragment", [
    (_frame(tensors=[_spec("complex128")], data=b"\0" * 32), "unknown dtype"),
    (_frame(tensors=[_spec(shape=(2, -1))], data=b""), "negative dimension"),
    (_frame(tensors=[_spec(shape=(1 << 20,))], data=b""), "exceeds the limit"),
    (_frame(tensors=[_spec()], data=b"\0" * 15), "need 16"),
    (_frame(tensors=[_spec()], data=b"\0" * 17), "exceeds the 16 bytes"),
    (_frame(tensors=[_spec()], part_count=4000, data=b"\0" * 16), "implausible part count"),
    (_frame(tensors=[_spec()], part_count=0, data=b"\0" * 16), "implausible part count"),
    (_frame(tensors=[_spec()], part_index=1, part_count=2, data=b"\0" * 8), "before its first part"),
    (_frame(tensors=[_spec()] * (MAX_TENSORS + 1)), "at most"),
    (_frame(tensors=[_spec()], part_count=2, data=b""), "carries no data"),
])
def test_malformed_frames_are_refused(frame: object, fragment: str) -> None:
    with pytest.raises(WireError, match=fragment):
        Mailbox(max_message_bytes=1 << 16).deliver(frame)


def test_parts_must_arrive_in_order_and_once() -> None:
    t = torch.arange(8, dtype=torch.int64)
    first, second, third = frames([t], part_bytes=24)
    box = Mailbox(1 << 20)
    box.deliver(first)
    with pytest.raises(WireError, match="part 2 arrived, expected 1"):
        box.deliver(third)
    with pytest.raises(WireError, match="arrived twice"):
        box.deliver(first)
    listed = pb2.PeerFrame()
    listed.CopyFrom(second)
    listed.tensors.append(_spec())
    with pytest.raises(WireError, match="lists tensors again"):
        box.deliver(listed)
    with pytest.raises(WireError, match="disagree"):
        MessageAssembler([("int64", (8,))], 3, 1 << 20).add(0, 2, b"")
    complete = Mailbox(1 << 20)
    (only,) = frames([t])
    complete.deliver(only)
    with pytest.raises(WireError, match="arrived twice"):
        complete.deliver(only)


def test_take_waits_for_its_message_and_abort_wakes_it() -> None:
    box = Mailbox(1 << 20)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(box.take("q", 2, 1, 5.0, me=0)))
    waiter.start()
    for seq in (1, 0):  # out of order: the waiter wants #1
        box.deliver(pb2.PeerFrame.FromString(links(me=2).encode("q", seq, [torch.tensor([seq])])[0]))
    waiter.join(5)
    assert got and torch.equal(got[0][0], torch.tensor([1]))
    assert torch.equal(box.take("q", 2, 0, 0.1, me=0)[0], torch.tensor([0]))

    errors: list = []

    def blocked() -> None:
        try:
            box.take("q", 1, 0, 30.0, me=0)
        except TransportError as e:
            errors.append(e)

    t0 = time.monotonic()
    waiter = threading.Thread(target=blocked)
    waiter.start()
    time.sleep(0.05)
    box.deliver(pb2.PeerFrame(query_id="q", sender=1, abort_reason="boom"))
    waiter.join(5)
    assert errors and "party 1 aborted: boom" in str(errors[0]) and time.monotonic() - t0 < 5
    with pytest.raises(PeerTimeoutError, match="no message #0 from party 2"):
        box.take("other", 2, 0, 0.05, me=0)


def test_frames_of_a_finished_query_are_dropped() -> None:
    box = Mailbox(1 << 20)
    box.forget("q")
    assert box.finished("q")
    for f in frames([torch.tensor([1])]):
        box.deliver(f)
    with pytest.raises(PeerTimeoutError):
        box.take("q", 0, 0, 0.05, me=1)


class _Channel:
    """A peer channel whose Link streams record the frames they carry; ``hold`` keeps each
    stream open after its last frame, as a connection that broke silently (a cut cable) stays
    open on the sender's side until TCP gives up on it."""

    def __init__(self, peer: int, streams: list, hold: threading.Event) -> None:
        self.peer, self.streams, self.hold = peer, streams, hold

    def stream_unary(self, method: str, request_serializer: object, response_deserializer: object) -> object:
        def link(frames: object) -> bytes:
            got: list = []
            self.streams.append((self.peer, got))
            for f in frames:  # type: ignore[attr-defined]
                got.append(pb2.PeerFrame.FromString(f))
            self.hold.wait(10)
            return b""
        return link

    def close(self) -> None:
        pass


def test_an_abort_renews_the_links_so_the_next_query_never_rides_a_dead_connection() -> None:
    """After a failed query (the abort) each link's stream ends after the abort frame and the
    next message goes on a new stream, even while the old one has not failed yet: frames sent
    into a connection that broke silently are lost with it, and would fail the next query at
    its deadline although the cable is back (found by tests/test_multihost.py)."""
    streams: list = []
    hold = threading.Event()
    peers = PeerLinks(0, lambda peer: _Channel(peer, streams, hold), pb2.PeerFrame, pb2.TensorSpec)
    try:
        peers.send(1, "q1", 0, [torch.tensor([1])])
        peers.send(2, "q1", 0, [torch.tensor([2])])
        peers.abort("q1", "no message #3 from party 1 within 3.0 s")
        peers.send(1, "q2", 0, [torch.tensor([3])])
        end = time.monotonic() + 5
        while sum(len(got) for _, got in streams) < 5 and time.monotonic() < end:
            time.sleep(0.01)
        carried = sorted((peer, [(f.query_id, f.seq, bool(f.abort_reason)) for f in got]) for peer, got in streams)
        assert carried == [(1, [("q1", 0, False), ("q1", 0, True)]), (1, [("q2", 0, False)]),
                           (2, [("q1", 0, False), ("q1", 0, True)])], carried
    finally:
        hold.set()
        peers.close()
