"""Prometheus metrics of one node (the MPC party node or the HE node), and their HTTP endpoint.

Each node owns one :class:`NodeMetrics`: its own registry (never the process-wide default,
so several nodes in one process do not collide) and, when the configuration names a
``metrics_port``, a small HTTP server in its own threads answering ``GET /metrics`` (any
path) in the Prometheus text format. A slow or malformed scrape holds only its own thread
(cut off after :data:`SCRAPE_TIMEOUT_S`); the node's gRPC servers never wait for it.

What is exported (``secure_inference_`` prefix)::

    queries_total{outcome, code}        Query streams by outcome: ok (code OK), refused (the
                                        node's status before running it, e.g. UNAUTHENTICATED,
                                        NOT_FOUND, RESOURCE_EXHAUSTED) or failed (after it
                                        started running, an INTERNAL error, or the client went
                                        away: CANCELLED)
    query_duration_seconds{outcome}     histogram of the queries that ran (ok or failed), from
                                        the stream's opening to its end
    query_sent_bytes_total              MPC: payload bytes sent to the peers; HE: bytes of the
    query_received_bytes_total          query stream's messages to / from the client
    query_rounds_total                  MPC: communication rounds; HE: client round trips
    active_queries, query_slots         admitted streams (uploading or running) and the limit
    unauthenticated_calls_total{method} calls refused by the token check, before their handler
    peer_up{peer}                       MPC only: 1 when the peer's port completes a (TLS)
                                        connection, as the node's Health reports it
    node_info{kind, node}               1, naming the node

The labels are fixed words, gRPC status names, method names and party names: never a
token, a query's content, a share or a key. Every query also ends with one log line
(``party.metrics``) carrying its id, outcome, status, seconds, bytes and rounds as fields
that :mod:`party.logs` writes out in JSON mode.

This module imports no node, no client and nothing under ``secure``.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

log = logging.getLogger("party.metrics")

PREFIX = "secure_inference"
SCRAPE_TIMEOUT_S = 10.0
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
OK, REFUSED, FAILED = "ok", "refused", "failed"
_NODE_ERRORS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)  # the node's fault: failed, never refused
T = TypeVar("T")


class NodeMetrics:
    """The metrics of one node, in a registry of its own.

    ``kind`` is "party" or "he"; ``node`` names it ("party0", "he-node"); ``slots`` is its
    query limit and ``active`` reports the streams it has admitted now; ``peers`` (MPC only)
    reports each peer's link state by name when scraped.
    """

    def __init__(self, kind: str, node: str, slots: int, active: Callable[[], int],
                 peers: Callable[[], dict[str, bool]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queries = Counter(f"{PREFIX}_queries", "Query streams by outcome (ok, refused, failed) and gRPC status",
                               ["outcome", "code"], registry=r)
        self.duration = Histogram(f"{PREFIX}_query_duration_seconds", "Seconds from a query stream's opening to "
                                  "its end, for queries that ran", ["outcome"], buckets=DURATION_BUCKETS, registry=r)
        self.sent = Counter(f"{PREFIX}_query_sent_bytes", "Bytes queries sent (MPC: to the peers; HE: to the client)",
                            registry=r)
        self.received = Counter(f"{PREFIX}_query_received_bytes", "Bytes queries received (MPC: from the peers; "
                                "HE: from the client)", registry=r)
        self.rounds = Counter(f"{PREFIX}_query_rounds", "Communication rounds (MPC) or client round trips (HE)",
                              registry=r)
        self.unauthenticated = Counter(f"{PREFIX}_unauthenticated_calls", "Calls refused by the client-token check",
                                       ["method"], registry=r)
        Gauge(f"{PREFIX}_active_queries", "Admitted query streams, uploading or running",
              registry=r).set_function(active)
        Gauge(f"{PREFIX}_query_slots", "Query streams the node admits at once", registry=r).set(slots)
        Gauge(f"{PREFIX}_node_info", "This node", ["kind", "node"], registry=r).labels(kind, node).set(1)
        if peers is not None:
            r.register(_PeerCollector(peers))
        self._numbers = itertools.count(1)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def track_generation(self, sessions: Callable[[], int]) -> None:
        """Generation metrics (MPC party node): live sessions (``sessions()`` when scraped) and
        the steps they run, by kind (prefill, decode)."""
        Gauge(f"{PREFIX}_generation_sessions", "Generation sessions holding a key/value cache",
              registry=self.registry).set_function(sessions)
        self.steps = Counter(f"{PREFIX}_generation_steps", "Generation steps run, by kind (prefill, decode)",
                             ["kind"], registry=self.registry)
        self.step_seconds = Counter(f"{PREFIX}_generation_step_seconds", "Seconds spent in generation steps, by "
                                    "kind", ["kind"], registry=self.registry)

    def generation_step(self, kind: str, seconds: float, bytes_sent: int, rounds: int) -> None:
        """One generation step ran (its traffic counts with the queries')."""
        self.steps.labels(kind).inc()
        self.step_seconds.labels(kind).inc(seconds)
        self.sent.inc(bytes_sent)
        self.rounds.inc(rounds)

    # ---- recording -------------------------------------------------------------------------
    def query(self) -> QueryRecord:
        """A query stream opened now: record it with the returned object."""
        return QueryRecord(self, f"#{next(self._numbers)}")

    def refused_call(self, method: str, code: grpc.StatusCode) -> None:
        """A call refused before its handler ran (the token check); a Query counts as a refused query."""
        name = method.rsplit("/", 1)[-1]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            self.unauthenticated.labels(name).inc()
        if name == "Query":
            self.queries.labels(REFUSED, code.name).inc()

    # ---- the endpoint --------------------------------------------------------------------------
    def serve(self, address: str, port: int) -> int:
        """Answer scrapes on ``address:port`` (port 0: any free port) in threads of their own;
        returns the bound port."""
        if self._server is not None:
            raise RuntimeError("the metrics endpoint is already serving")
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        try:
            server = make_server(address, port, make_wsgi_app(self.registry), server_class, _QuietHandler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {address}:{port}: {e}") from e
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", address, bound)
        return bound

    @property
    def port(self) -> int | None:
        """The endpoint's bound port; None when it is not serving."""
        return None if self._server is None else int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop answering scrapes and release the port (scrapes in flight end on their own)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)


class QueryRecord:
    """One query stream, from its opening to its end.

    The node says :meth:`running` once the query passed its checks, adds its traffic, and
    says :meth:`succeeded` when it produced its answer; :meth:`track` wraps the stream's
    handler and records the outcome however it ends (a status set with ``context.abort``,
    an exception, or the client going away).
    """

    def __init__(self, metrics: NodeMetrics, number: str) -> None:
        self.metrics = metrics
        self.query_id = number  # the client's query id replaces it once known
        self.started = time.perf_counter()
        self.is_running = False
        self.ok = False
        self.traffic = {"bytes_sent": 0, "bytes_received": 0, "rounds": 0}

    def running(self) -> None:
        self.is_running = True

    def succeeded(self) -> None:
        self.ok = True

    def add_traffic(self, sent: int = 0, received: int = 0, rounds: int = 0) -> None:
        m = self.metrics
        for key, counter, n in (("bytes_sent", m.sent, sent), ("bytes_received", m.received, received),
                                ("rounds", m.rounds, rounds)):
            if n:
                counter.inc(n)
                self.traffic[key] += n

    def received_messages(self, messages: Iterable[T]) -> Iterator[T]:
        """``messages`` (protobuf), each one's size counted as received."""
        for msg in messages:
            self.add_traffic(received=msg.ByteSize())  # type: ignore[attr-defined]
            yield msg

    def sending(self, emit: Callable[[T], None]) -> Callable[[T], None]:
        """``emit`` (of protobuf messages), each one's size counted as sent."""
        def counted(msg: T) -> None:
            self.add_traffic(sent=msg.ByteSize())  # type: ignore[attr-defined]
            emit(msg)
        return counted

    def track(self, events: Iterator[T], context: grpc.ServicerContext) -> Iterator[T]:
        """``events`` (a stream handler's replies), recording the outcome when they end."""
        error = False
        try:
            yield from events
        except Exception:
            error = True
            raise
        finally:
            self.finish(getattr(context, "code", lambda: None)(), error)

    def finish(self, code: grpc.StatusCode | None, error: bool = False) -> None:
        """Record the outcome: ``code`` is the status the node set (None: none), ``error``
        whether the handler raised."""
        if self.ok and code in (None, grpc.StatusCode.OK):
            outcome, status = OK, grpc.StatusCode.OK
        else:
            status = code or (grpc.StatusCode.UNKNOWN if error else grpc.StatusCode.CANCELLED)
            refused = code is not None and code not in _NODE_ERRORS and not self.is_running
            outcome = REFUSED if refused else FAILED
        seconds = time.perf_counter() - self.started
        self.metrics.queries.labels(outcome, status.name).inc()
        if self.is_running:
            self.metrics.duration.labels(outcome).observe(seconds)
        log.info("query %s %s (%s) after %.3f s: %d rounds, %d bytes sent, %d received", self.query_id, outcome,
                 status.name, seconds, self.traffic["rounds"], self.traffic["bytes_sent"],
                 self.traffic["bytes_received"],
                 extra={"query_id": self.query_id, "outcome": outcome, "code": status.name,
                        "seconds": round(seconds, 6), **self.traffic})


class _PeerCollector(Collector):
    """``peer_up{peer}``, asked of the node at every scrape."""

    def __init__(self, peers: Callable[[], dict[str, bool]]) -> None:
        self.peers = peers

    def collect(self) -> Iterable[Any]:
        family = GaugeMetricFamily(f"{PREFIX}_peer_up", "1 when the peer's port completes a (TLS) connection",
                                   labels=["peer"])
        for name, up in sorted(self.peers().items()):
            family.add_metric([name], 1.0 if up else 0.0)
        yield family

    def describe(self) -> Iterable[Any]:
        yield GaugeMetricFamily(f"{PREFIX}_peer_up", "1 when the peer's port completes a (TLS) connection",
                                labels=["peer"])


class _QuietHandler(WSGIRequestHandler):
    """Logs no request line, and cuts off a scraper that stops sending or reading."""

    timeout = SCRAPE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass
