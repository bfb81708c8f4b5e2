"""Link emulation (``secure.transport.shaping``): the wire clock on a fake clock, the hook in
the gRPC peer links, and a real three-party gRPC run whose rounds each pay the delay."""

from __future__ import annotations

import argparse
import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
import torch

from protos import load as load_protos
from secure.transport.shaping import LinkShape, LinkShaper, link_shape_arg

pb2, pb2_grpc = load_protos()


class FakeClock:
    """A clock that only moves when the releasing side sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def shaper(text: str) -> tuple[LinkShaper, FakeClock]:
    clock = FakeClock()
    return LinkShaper(LinkShape.parse(text), clock=clock, sleep=clock.sleep), clock


def released_at(s: LinkShaper, clock: FakeClock, stamped: list[tuple[float, bytes]]) -> list[tuple[bytes, float]]:
    return [(item, clock.t) for item in s.release(stamped)]


# ---- the shape --------------------------------------------------------------------------

@pytest.mark.parametrize("text, delay, rate", [
    ("40ms,100mbit", 0.040, 100e6), ("1ms,5gbit", 0.001, 5e9), ("20ms", 0.020, None),
    ("100mbit", 0.0, 100e6), (" 0.5s , 1.5Gbit ", 0.5, 1.5e9), ("250us,64kbit", 250e-6, 64e3),
])
def test_parse(text: str, delay: float, rate: float | None) -> None:
    shape = LinkShape.parse(text)
    assert shape.delay_s == pytest.approx(delay) and shape.rate_bps == (pytest.approx(rate) if rate else None)
    assert LinkShape.parse(str(shape)) == shape


@pytest.mark.parametrize("text, fragment", [
    ("40ms,100mbps", "unknown unit 'mbps'"), ("40,100mbit", "cannot read '40'"), ("1ms,2ms", "delay twice"),
    ("1ms,2mbit,3gbit", "expected DELAY,RATE"), ("", "expected DELAY,RATE"), ("0mbit", "rate must be"),
])
def test_parse_refuses_what_it_cannot_read(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        LinkShape.parse(text)


def test_option_parser() -> None:
    assert link_shape_arg("off") is None and link_shape_arg("40ms,100mbit") == LinkShape(0.040, 100e6)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown unit"):
        link_shape_arg("40ms,100mbps")


# ---- the wire clock, on a fake clock ------------------------------------------------------

def test_delay_is_added_and_messages_in_flight_overlap() -> None:
    s, clock = shaper("40ms")
    stamped = s.stamp([b"a", b"b", b"c"])
    assert [due for due, _ in stamped] == pytest.approx([0.040] * 3)  # pipelined: one delay, not three
    assert released_at(s, clock, stamped) == [(b"a", pytest.approx(0.040)), (b"b", pytest.approx(0.040)),
                                              (b"c", pytest.approx(0.040))]


def test_rate_serializes_back_to_back_messages_then_the_link_goes_idle() -> None:
    s, clock = shaper("5ms,100mbit")
    frame = bytes(125_000)  # 1 Mbit: 10 ms at 100 Mbit/s
    dues = [due for due, _ in s.stamp([frame, frame, frame])]
    assert dues == pytest.approx([0.015, 0.025, 0.035])
    clock.t = 0.012  # sent while the third is still on the wire: queues behind it
    assert s.due(len(frame)) == pytest.approx(0.045)
    clock.t = 1.0  # the link has drained: only this frame's own time counts
    assert s.due(len(frame)) == pytest.approx(1.015)
    assert s.due(0) == pytest.approx(1.015)  # a frame of no bytes still waits for the wire


def test_release_keeps_order_and_never_releases_early() -> None:
    s, clock = shaper("10ms,8kbit")  # 1 ms per byte
    stamped = []
    for i, size in enumerate([5, 1, 20, 1]):
        clock.t = i * 0.002
        stamped += s.stamp([bytes([i]) * size])
    clock.t = 0.0
    out = released_at(s, clock, stamped)
    assert [item[0] for item, _ in out] == [0, 1, 2, 3]
    for (due, _), (_, at) in zip(stamped, out):
        assert at >= due
    assert [at for _, at in out] == sorted(at for _, at in out)


def test_a_late_release_does_not_sleep() -> None:
    s, clock = shaper("10ms")
    stamped = s.stamp([b"x"])
    clock.t = 5.0
    assert list(s.release(stamped)) == [b"x"] and clock.slept == []


def test_no_shape_is_no_shaper() -> None:
    from secure.transport.grpc_peer import PeerLinks

    assert not LinkShape().shaped and LinkShape(0.0, 1e9).shaped and LinkShape(0.001).shaped
    for shape in (None, LinkShape()):
        links = PeerLinks(0, lambda peer: None, pb2.PeerFrame, pb2.TensorSpec, shape=shape)
        assert all(link.shaper is None for link in links.links.values())
    links = PeerLinks(0, lambda peer: None, pb2.PeerFrame, pb2.TensorSpec, shape=LinkShape(0.001))
    assert all(link.shaper is not None for link in links.links.values())


# ---- the hook in the peer links -------------------------------------------------------------

class _Channel:
    """A peer channel whose Link stream records the frames it is handed."""

    def __init__(self, got: list) -> None:
        self.got = got

    def stream_unary(self, method: str, request_serializer: object, response_deserializer: object) -> object:
        def link(frames: object) -> bytes:
            for f in frames:  # type: ignore[attr-defined]
                self.got.append(pb2.PeerFrame.FromString(f))
            return b""
        return link

    def close(self) -> None:
        pass


def test_the_sender_does_not_wait_for_the_wire() -> None:
    """A send returns while its frames are still held by the link (their due time has not
    come); they then go out in order."""
    from secure.transport.grpc_peer import PeerLinks

    got: list = []
    gate = threading.Event()
    links = PeerLinks(0, lambda peer: _Channel(got), pb2.PeerFrame, pb2.TensorSpec, shape=LinkShape(1.0))
    links.links[1].shaper.sleep = lambda s: gate.wait(10)  # the wire's delay ends when the test says
    try:
        for seq in range(3):
            links.send(1, "q", seq, [torch.tensor([seq])])
        time.sleep(0.05)
        assert got == []  # all three sends returned; nothing has arrived
        gate.set()
        end = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < end:
            time.sleep(0.01)
        assert [f.seq for f in got] == [0, 1, 2]
    finally:
        gate.set()
        links.close()


# ---- three parties over real gRPC --------------------------------------------------------

def _three_parties(shape: LinkShape | None) -> tuple[list, list[grpc.Server], list]:
    from party.launch import free_ports
    from party.node import _PeerServicer
    from secure.transport.grpc_peer import GrpcTransport, Mailbox, PeerLinks

    ports = free_ports(3)
    servers, links, transports = [], [], []
    for me in range(3):
        mailbox = Mailbox(max_message_bytes=1 << 24)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_PeerServicer_to_server(_PeerServicer(SimpleNamespace(id=me, mailbox=mailbox)), server)
        server.add_insecure_port(f"127.0.0.1:{ports[me]}")
        server.start()
        servers.append(server)
        peer_links = PeerLinks(me, lambda peer: grpc.insecure_channel(f"127.0.0.1:{ports[peer]}"),
                               pb2.PeerFrame, pb2.TensorSpec, shape=shape)
        links.append(peer_links)
        transports.append(GrpcTransport(me, "shaped", peer_links, mailbox, deadline_s=10.0))
    return transports, servers, links


def test_a_shaped_grpc_link_makes_every_round_pay_the_delay() -> None:
    """Three parties over gRPC on loopback with a 20 ms link: key set-up, three chained
    secure multiplications and an opening (8 rounds) take at least 8 x 20 ms, and the
    answer is right. (A lower bound only: a shared machine can always be slower.)"""
    from secure.mpc import shares as sh
    from secure.mpc.arithmetic import mul, open_float
    from secure.mpc.party import Party
    from secure.mpc.ring import FixedPoint

    delay = 0.020
    fp = FixedPoint()
    x, y = torch.tensor([1.5, -2.0, 0.25]), torch.tensor([1.0, 0.5, -4.0])
    xs, ys = sh.deal_shares(fp.encode(x), fp.frac_bits), sh.deal_shares(fp.encode(y), fp.frac_bits)
    transports, servers, links = _three_parties(LinkShape(delay))
    results: list = [None] * 3
    rounds = [0] * 3
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            party = Party(transports[i], fp)
            party.setup_keys()
            z = xs[i]
            for _ in range(3):
                z = mul(party, z, ys[i])
            results[i] = open_float(party, z)
            rounds[i] = party.rounds
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.perf_counter() - t0
    finally:
        for peer_links in links:
            peer_links.close()
        for server in servers:
            server.stop(0)
    assert not errors, errors
    assert rounds[0] == rounds[1] == rounds[2] == 8
    for r in results:
        assert torch.allclose(r.double(), (x * y ** 3).double(), atol=1e-3)
    assert elapsed >= rounds[0] * delay, (elapsed, rounds[0])
