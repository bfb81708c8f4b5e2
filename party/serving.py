"""The serving layer every node kind shares (the MPC party node and the HE node).

It owns what stands between the network and a query: TLS credentials, the client-token
check (a server interceptor reading call metadata, so an unauthenticated call is refused
before any of its request messages is read), admission (a slot is taken before a query's
inputs are read, so streams still uploading count), a receive deadline (a stream that
sends nothing is cancelled), server options (message sizes, keepalive, connection age,
``maximum_concurrent_rpcs``), the standard ``grpc.health.v1`` service, and the bridge
that runs a query in a worker thread and streams its events.

It must never import a node (``party.node``, ``party.he_node``) or the client.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from party.config import TOKEN_METADATA_KEY, token_digest

log = logging.getLogger("party.serving")

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_WATCH_METHOD = "/grpc.health.v1.Health/Watch"
_END = object()


class Rejected(Exception):
    """A call refused with a gRPC status before (or instead of) running; the node serves on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ServingLimits:
    """What one node's client port allows.

    ``max_streams`` bounds admitted query streams, uploading or running; the thread pool
    has ``spare_workers`` more, so that Describe and Health answer while every slot is
    taken, and gRPC refuses calls beyond the pool (RESOURCE_EXHAUSTED) instead of queueing
    them. ``receive_timeout_s`` is how long a stream may take to deliver what the node
    waits for (a query's inputs, a refresh reply).
    """

    max_streams: int = 8
    receive_timeout_s: float = 60.0
    max_message_bytes: int = 8 << 20
    spare_workers: int = 8
    keepalive_s: float = 10.0
    max_connection_idle_s: float | None = 300.0  # None: never closed for idleness
    max_connection_age_s: float | None = 4 * 3600.0  # None: never recycled for age
    max_connection_age_grace_s: float = 3600.0  # calls still running when a connection is recycled

    @property
    def workers(self) -> int:
        return self.max_streams + self.spare_workers


def server_options(limits: ServingLimits) -> list[tuple[str, int]]:
    """gRPC channel arguments of a node's server."""
    ms = 1000
    options = [("grpc.max_receive_message_length", limits.max_message_bytes),
               ("grpc.max_send_message_length", limits.max_message_bytes),
               ("grpc.keepalive_time_ms", int(limits.keepalive_s * ms)),
               ("grpc.keepalive_timeout_ms", int(limits.keepalive_s * ms // 2)),
               # clients may ping idle connections, no more often than every 5 s
               ("grpc.http2.min_ping_interval_without_data_ms", 5 * ms),
               ("grpc.keepalive_permit_without_calls", 1)]
    if limits.max_connection_idle_s is not None:
        options.append(("grpc.max_connection_idle_ms", int(limits.max_connection_idle_s * ms)))
    if limits.max_connection_age_s is not None:
        options += [("grpc.max_connection_age_ms", int(limits.max_connection_age_s * ms)),
                    ("grpc.max_connection_age_grace_ms", int(limits.max_connection_age_grace_s * ms))]
    return options


def make_server(limits: ServingLimits, interceptors: Iterable[grpc.ServerInterceptor] = ()) -> grpc.Server:
    """A gRPC server with a pool of ``limits.workers`` threads that refuses calls beyond it."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=limits.workers), options=server_options(limits),
                       interceptors=list(interceptors), maximum_concurrent_rpcs=limits.workers)


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS with this node's certificate; with ``client_ca`` callers must present a certificate
    signed by it (mutual TLS, the peer port)."""
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                       root_certificates=client_ca.read_bytes() if client_ca else None,
                                       require_client_auth=client_ca is not None)


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    """Listen on ``address`` with TLS, or in plaintext when ``credentials`` is None (which the
    caller allows only under an explicit ``--insecure``, and which is logged loudly here)."""
    if credentials is None:
        log.warning("INSECURE: %s on %s is plaintext and unauthenticated (started with --insecure); "
                    "use only for local demos", what, address)
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address} for the {what}")
    return port


# ---- client tokens ------------------------------------------------------------------------
class TokenCheck:
    """Constant-time check of a client token against the accepted SHA-256 digests."""

    def __init__(self, digests: Iterable[str]) -> None:
        self.digests = [d.lower() for d in digests]

    def accepts(self, token: str) -> bool:
        digest = token_digest(token)
        ok = False
        for allowed in self.digests:
            ok |= hmac.compare_digest(digest, allowed)
        return ok

    def check(self, token: str | None) -> None:
        if not token:
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED,
                           f"missing client token (send it in the {TOKEN_METADATA_KEY!r} call metadata)")
        if not self.accepts(token):
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "client token not accepted")


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses without reading a request."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    # no deserializer: the refused request is never decoded
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


class TokenInterceptor(grpc.ServerInterceptor):
    """Checks the client token in the call's metadata before the handler runs.

    Methods in ``open_methods`` (health probes) need no token. The streaming health
    ``Watch`` would hold a worker thread per caller for as long as it likes, so it is
    refused to callers without a token. ``on_refused(method, code)`` hears of each refusal
    (the node's metrics).
    """

    def __init__(self, check: TokenCheck, open_methods: Iterable[str] = (),
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self.check = check
        self.open = {HEALTH_CHECK_METHOD, *open_methods}
        self.on_refused = on_refused

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method in self.open:
            return handler
        token = next((v for k, v in details.invocation_metadata or () if k == TOKEN_METADATA_KEY), None)
        try:
            self.check.check(token if isinstance(token, str) else None)
        except Rejected as e:
            if self.on_refused is not None:
                self.on_refused(details.method, e.code)
            return _refusal(handler, e.code, str(e))
        return handler


def add_standard_health(server: grpc.Server, services: Iterable[str]) -> health.HealthServicer:
    """The standard ``grpc.health.v1`` service answering SERVING for the node and ``services``."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


# ---- admission and receive deadlines ----------------------------------------------------------
class Admission:
    """At most ``limit`` query streams at once, counted from before their inputs are read."""

    def __init__(self, limit: int, what: str = "queries") -> None:
        self.limit = limit
        self.what = what
        self._lock = threading.Lock()
        self._active = 0

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    def acquire(self) -> None:
        with self._lock:
            if self._active >= self.limit:
                raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.limit} {self.what} are running or "
                                                                   "uploading; retry later")
            self._active += 1

    def release(self) -> None:
        with self._lock:
            self._active -= 1


class ReceiveDeadline:
    """Cancels a call whose client does not deliver in time.

    ``with deadline.waiting("its inputs"):`` around a blocking read of the request stream:
    when ``timeout_s`` runs out the call is cancelled, the read ends (an RpcError or the
    end of the stream) and the block raises a clear :class:`Rejected` (DEADLINE_EXCEEDED).
    One watchdog thread per call; use the object as a context manager to end it.
    """

    def __init__(self, context: grpc.ServicerContext, timeout_s: float) -> None:
        self.context = context
        self.timeout_s = timeout_s
        self.expired: str | None = None
        self._cond = threading.Condition()
        self._due: float | None = None
        self._what = ""
        self._closed = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ReceiveDeadline:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._due is None:
                    self._cond.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.expired, self._closed = self._what, True
        if self.expired is not None:
            self.context.cancel()

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        with self._cond:
            if self._closed:
                self.raise_if_expired()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="receive-deadline", daemon=True)
                self._thread.start()
            self._due, self._what = time.monotonic() + self.timeout_s, what
            self._cond.notify()
        try:
            yield
        except (Rejected, grpc.RpcError):
            self.raise_if_expired()  # the cut-off explains best what the read saw
            raise
        finally:
            with self._cond:
                self._due = None
        self.raise_if_expired()

    def timed(self, requests: Iterable[Any], what: str) -> Iterator[Any]:
        """``requests`` with every read under the deadline."""
        it = iter(requests)
        while True:
            with self.waiting(what):
                try:
                    message = next(it)
                except StopIteration:
                    return
            yield message

    def raise_if_expired(self) -> None:
        if self.expired is not None:
            raise Rejected(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"the client did not send {self.expired} within {self.timeout_s:.0f} s")


# ---- worker bridge ------------------------------------------------------------------------------
def run_in_worker(work: Callable[[Callable[[Any], None]], None], name: str,
                  on_exit: Callable[[], None] = lambda: None) -> Iterator[Any]:
    """Start ``work(emit)`` in its own thread now; the returned iterator yields what it
    emits, in order.

    An exception raised by ``work`` is re-raised by the iterator, after everything it
    emitted before; ``on_exit`` runs in the worker when it ends, however it ends (so a
    slot is released even if nobody ever reads the events).
    """
    events: queue.SimpleQueue = queue.SimpleQueue()

    def body() -> None:
        try:
            work(events.put)
        except BaseException as e:  # noqa: BLE001 - handed to the serving thread
            events.put(_Failure(e))
        finally:
            try:
                on_exit()
            finally:
                events.put(_END)

    threading.Thread(target=body, name=name, daemon=True).start()
    return _drain(events)


def _drain(events: queue.SimpleQueue) -> Iterator[Any]:
    failure: BaseException | None = None
    while True:
        event = events.get()
        if event is _END:
            break
        if isinstance(event, _Failure):
            failure = event.error
            continue
        yield event
    if failure is not None:
        raise failure


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def abort_with(context: grpc.ServicerContext, error: Rejected) -> None:
    """End the call with the rejection's status (raises, as ``context.abort`` does)."""
    log.info("call refused: %s: %s", error.code.name, error)
    context.abort(error.code, str(error))
