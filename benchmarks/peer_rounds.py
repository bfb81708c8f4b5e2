"""Per-round latency of the gRPC peer links alone: three processes on loopback (mutual TLS
by default), each running the party node's peer server, links and mailbox, exchange in a
ring (send to the next party, receive from the previous one) for many rounds.

    python benchmarks/peer_rounds.py [--rounds 2000] [--tensors 2] [--numel 1536] [--no-tls]

Prints the median over the three parties of the wall time per round; the protocol's
rounds on the real model carry between a few and a few hundred thousand int64 each, so
``--numel`` sets the size of every tensor of a message.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import torch

from party.launch import free_ports


def _party(me: int, ports: list[int], certs: tuple[Path, list[tuple[Path, Path]]] | None, rounds: int,
           tensors: int, numel: int, tune: bool, extra: list[tuple[str, object]], switch_s: float | None,
           out: mp.Queue) -> None:
    from party import node as party_node
    from party.node import CHANNEL_OPTIONS, _PeerServicer, pb2, pb2_grpc
    from secure.transport.grpc_peer import GrpcTransport, Mailbox, PeerLinks

    torch.set_num_threads(1)
    if switch_s:
        sys.setswitchinterval(switch_s)
    channel_options = CHANNEL_OPTIONS + extra
    if tune:
        party_node.tune_malloc()
    if certs is not None:
        ca, leaves = certs
        cert, key = leaves[me]
        server_creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                                   root_certificates=ca.read_bytes(), require_client_auth=True)

        def channel(peer: int) -> grpc.Channel:
            creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
            return grpc.secure_channel(f"localhost:{ports[peer]}", creds, options=channel_options)
    else:
        def channel(peer: int) -> grpc.Channel:
            return grpc.insecure_channel(f"127.0.0.1:{ports[peer]}", options=channel_options)

    mailbox = Mailbox(max_message_bytes=1 << 30)
    node = SimpleNamespace(id=me, mailbox=mailbox)
    options = getattr(party_node, "SERVER_OPTIONS", CHANNEL_OPTIONS) + extra
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    pb2_grpc.add_PeerServicer_to_server(_PeerServicer(node), server)
    if certs is not None:
        server.add_secure_port(f"[::]:{ports[me]}", server_creds)
    else:
        server.add_insecure_port(f"[::]:{ports[me]}")
    server.start()
    for peer in (p for p in range(3) if p != me):  # every peer's server is up before the first frame
        ch = channel(peer)
        grpc.channel_ready_future(ch).result(timeout=60)
        ch.close()
    links = PeerLinks(me, channel, pb2.PeerFrame, pb2.TensorSpec)
    nxt, prev = (me + 1) % 3, (me + 2) % 3
    msg = [torch.arange(numel, dtype=torch.int64) + i for i in range(tensors)]
    results = {}
    for label, n in (("warm-up", 50), ("timed", rounds)):
        transport = GrpcTransport(me, f"bench-{label}", links, mailbox, deadline_s=60.0)
        t = time.perf_counter()
        cpu = time.process_time()
        for _ in range(n):
            transport.send(nxt, msg)
            got = transport.recv(prev)
            assert len(got) == tensors and got[0].shape == msg[0].shape
        results[label] = ((time.perf_counter() - t) / n, (time.process_time() - cpu) / n)
        mailbox.forget(transport.query_id)
    out.put((me, results["timed"]))
    time.sleep(1.0)  # let the peers take their last messages before the links close
    links.close()
    server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--tensors", type=int, default=2, help="tensors per message")
    ap.add_argument("--numel", type=int, default=1536, help="int64 elements per tensor")
    ap.add_argument("--no-tls", action="store_true")
    ap.add_argument("--default-malloc", action="store_true", help="without the party node's malloc settings")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra gRPC channel and server option (integer values as integers)")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval in the parties")
    args = ap.parse_args(argv)
    extra: list[tuple[str, object]] = []
    for item in args.option:
        key, value = item.split("=", 1)
        extra.append((key, int(value) if value.lstrip("-").isdigit() else value))
    ports = free_ports(3)
    with tempfile.TemporaryDirectory() as tmp:
        certs = None
        if not args.no_tls:
            from party.certs import make_cluster_certs
            certs = make_cluster_certs(Path(tmp))
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        procs = [ctx.Process(target=_party, args=(i, ports, certs, args.rounds, args.tensors, args.numel,
                                                          not args.default_malloc, extra, args.switch_interval, out))
                 for i in range(3)]
        for p in procs:
            p.start()
        per_round = sorted(out.get(timeout=600) for _ in range(3))
        for p in procs:
            p.join(30)
    ms = [r[0] * 1e3 for _, r in per_round]
    cpu = [r[1] * 1e3 for _, r in per_round]
    print(f"{args.rounds} ring rounds, {args.tensors} x {args.numel} int64 per message, "
          f"{'plaintext' if args.no_tls else 'mutual TLS'}: {statistics.median(ms):.3f} ms per round "
          f"(parties: {', '.join(f'{m:.3f}' for m in ms)}; CPU ms per round: {', '.join(f'{c:.3f}' for c in cpu)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
