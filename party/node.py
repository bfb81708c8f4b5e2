"""A party node: serves client queries on its shares of a dealt model, over gRPC.

    python -m party --config cluster.json --party 0

The node serves a catalogue: every model of its dealt share file (``party.catalogue``),
chosen by name per query. ``Query`` runs an encoder or a classifier (``QueryHeader.model``);
``Describe`` lists the catalogue (``ModelInfo.catalogue``: kind, lengths, capacities,
inputs, recipe, graph digest, a classifier's labels) and describes the default model (the
configuration's ``model``; if the file lacks it, its first encoder) in its top-level fields.

Two ports: the peer port (``Peer.Link``, mutually authenticated TLS between parties; each
party's certificate names it and a frame's sender must match it) and the client port
(``Party.Query``, ``Describe``, ``Health`` and the standard ``grpc.health.v1``: TLS plus
this party's client token, checked from the call metadata before any request message is
read; see ``party.serving``). Without ``tls`` in the configuration the node refuses to
start unless it is given ``--insecure``, and then says so loudly in its log.

Scheduling: every accepted query runs in its own thread as soon as its inputs have
arrived; queries are independent (their peer messages are tagged by query id, their PRF
keys are agreed per query), so the three nodes need not agree on an order, and no query
waits behind another. With batching on (``--max-batch`` above 1, ``party.batching``),
concurrent queries of one model and length that are ready on all three parties within a
short window run as one batched execution instead, as party 0 announces them (each client
still gets only its own answer). ``max_concurrent_queries`` bounds them; beyond it a query is
refused with RESOURCE_EXHAUSTED; a slot is taken before the query's inputs are read, and a
client that does not deliver them within ``receive_timeout_s`` is cut off. Every query has
the configured deadline per peer message;
a failing query is aborted on the peers and reported to the client with a gRPC status,
and the node keeps serving.

Logs never contain tensor values, token ids or text: only query ids, shapes, timings
and errors (JSON lines with ``--log-json``, see ``party.logs``). With ``metrics_port`` in
its entry the node serves Prometheus metrics (``party.metrics``): queries by outcome,
latency, peer bytes and rounds, active queries, peer links.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from party.batching import CONTROL_TAG, BatchFailed, BatchOptions, BatchScheduler, Member
from party.catalogue import QUERY_KINDS, ServedModel, default_model, load_party_file
from party.certs import check_party_certificate
from party.config import ClusterConfig, ConfigError, party_name
from party.generation import GenerationService
from party.integrity import check_client_token_digests
from party.logs import configure_logging
from party.metrics import NodeMetrics, QueryRecord
from party.serving import (
    Admission,
    ReceiveDeadline,
    Rejected,
    ServingLimits,
    TokenCheck,
    TokenInterceptor,
    abort_with,
    add_standard_health,
    bind,
    make_server,
    run_in_worker,
    server_credentials,
)
from party.uploads import InputCollector
from protos import load as load_protos
from secure.graph.ir import Graph
from secure.mpc.backend import MpcOps
from secure.mpc.party import Party
from secure.mpc.ring import FixedPoint
from secure.profile.profiler import Profiler, span
from secure.runtime.inputs import InputError, party_inputs
from secure.runtime.interpreter import Interpreter
from secure.transport.base import payload_bytes
from secure.transport.grpc_peer import GrpcTransport, Mailbox, PeerLinks
from secure.transport.shaping import LinkShape, link_shape_arg
from secure.transport.wire import WireError, tensor_chunks

pb2, pb2_grpc = load_protos()
log = logging.getLogger("party")

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]
QUERY_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
QueryRejected = Rejected  # a query refused before it starts, with its gRPC status
HEALTH_METHOD = "/secureinference.Party/Health"


class PartyNode:
    """One of the three computing parties."""

    def __init__(self, cfg: ClusterConfig, party_id: int, device: str = "cpu",
                 max_concurrent_queries: int = 8, insecure: bool = False, link_shape: LinkShape | None = None,
                 batching: BatchOptions | None = None) -> None:
        """``batching``: how concurrent queries are batched (default ``BatchOptions()``: up to 8 per
        batch, a 100 ms window; ``max_batch=1``: each query alone)."""
        cfg.require_tls(insecure)
        self.cfg = cfg
        self.id = party_id
        self.entry = cfg.party(party_id)
        self.device = torch.device(device)
        self.fp = FixedPoint(cfg.frac_bits)
        self.max_concurrent = max_concurrent_queries
        self.tokens = TokenCheck(self.entry.client_token_sha256)
        if not self.tokens.digests:
            raise ConfigError(f"party {party_id} accepts no client token: give its entry 'client_token_sha256'")
        check_client_token_digests(self.entry, cfg)
        if cfg.tls:  # what a peer or a client would refuse later, refused now, naming the file
            assert cfg.ca is not None and self.entry.cert is not None and self.entry.key is not None
            check_party_certificate(self.entry.cert, self.entry.key, cfg.ca, party_id)
        self.limits = ServingLimits(max_streams=max_concurrent_queries, receive_timeout_s=cfg.receive_timeout_s)
        self.admission = Admission(max_concurrent_queries)
        self._reachable: dict[int, tuple[float, bool]] = {}
        if self.entry.shares is None:
            raise ConfigError(f"party {party_id} has no 'shares' file in the configuration")
        t0 = time.perf_counter()
        self.header, self.models = load_party_file(cfg, party_id, self.device)
        if self.header["frac_bits"] != cfg.frac_bits:
            raise ConfigError(f"shares were dealt with frac_bits={self.header['frac_bits']}, "
                              f"the configuration says {cfg.frac_bits}")
        self.default: ServedModel = default_model(self.models, cfg.model)
        log.info("party %d loaded %d model(s) in %.1f s; default %r", party_id, len(self.models),
                 time.perf_counter() - t0, self.default.name)
        for model in self.models.values():
            log.info("party %d serves %s", party_id, model.summary())
        self.mailbox = Mailbox(max_message_bytes=cfg.max_request_bytes)
        self.links = PeerLinks(party_id, self._peer_channel, pb2.PeerFrame, pb2.TensorSpec, shape=link_shape)
        if link_shape is not None and link_shape.shaped:
            log.warning("party %d emulates a %s link on every peer message (--link-shape: benchmarks only)",
                        party_id, link_shape)
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._servers: list[grpc.Server] = []
        self.metrics = NodeMetrics("party", self.entry.name, max_concurrent_queries, lambda: self.admission.active,
                                   peers=lambda: {party_name(p): self.peer_reachable(p) for p in range(3)
                                                  if p != self.id})
        self.generation = GenerationService(
            party_id, self.fp, self.device, self.served,
            transport_for=lambda sid: _CountedTransport(self.id, sid, self.links, self.mailbox, cfg.deadline_s),
            claim=self._claim, release=self._release, abort_local=self.mailbox.abort,
            receive_timeout_s=cfg.receive_timeout_s, max_request_bytes=cfg.max_request_bytes,
            on_step=self.metrics.generation_step)
        self.metrics.track_generation(lambda: len(self.generation.active()))
        self.batching = batching or BatchOptions()
        self.scheduler = BatchScheduler(
            party_id, self.batching, self.fp, self.device,
            transport_for=lambda tag: _CountedTransport(self.id, tag, self.links, self.mailbox, cfg.deadline_s),
            send_control=lambda peer, seq, tensors: self.links.send(peer, CONTROL_TAG, seq, tensors),
            abort_remote=self.links.abort, abort_local=self.mailbox.abort,
            join_timeout_s=cfg.receive_timeout_s, deadline_s=cfg.deadline_s, release_tag=self._release)

    @property
    def graphs(self) -> dict[int, Graph]:
        """The default model's graphs by padded length (what a node of one model exposed)."""
        return self.default.graphs

    def served(self, name: str, kind: str = "encoder") -> ServedModel:
        """The catalogue's model ``name``, which must be of ``kind`` (``Query``: "encoder", which
        also serves a classifier; ``Generate``: "causal"); ``Rejected`` with NOT_FOUND or
        FAILED_PRECONDITION."""
        model = self.models.get(name)
        if model is None:
            raise QueryRejected(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this cluster serves "
                                f"{', '.join(repr(m) for m in self.models)}")
        if model.kind not in (QUERY_KINDS if kind == "encoder" else (kind,)):
            use = "use Generate" if model.kind == "causal" else "use Query"
            what = {"causal": "a causal LM", "classifier": "a classifier"}.get(model.kind, "an encoder")
            raise QueryRejected(grpc.StatusCode.FAILED_PRECONDITION, f"model {name!r} is {what}: {use}")
        return model

    # ---- networking --------------------------------------------------------------------
    def _peer_channel(self, peer: int) -> grpc.Channel:
        target = self.cfg.party(peer).peer_address
        if not self.cfg.tls:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        assert self.cfg.ca is not None and self.entry.cert is not None and self.entry.key is not None
        creds = grpc.ssl_channel_credentials(self.cfg.ca.read_bytes(), self.entry.key.read_bytes(),
                                             self.entry.cert.read_bytes())
        # whatever address it has, the peer must prove it is that party
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", party_name(peer))]
        return grpc.secure_channel(target, creds, options=options)

    def peer_reachable(self, peer: int, timeout_s: float = 0.5, cache_s: float = 1.0) -> bool:
        """Whether the peer's port completes a (TLS) connection now (answers cached for
        ``cache_s``, so that health probes cannot make the node dial at their rate)."""
        now = time.monotonic()
        with self._lock:
            cached = self._reachable.get(peer)
        if cached is not None and now - cached[0] < cache_s:
            return cached[1]
        channel = self._peer_channel(peer)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            ok = True
        except grpc.FutureTimeoutError:
            ok = False
        finally:
            channel.close()
        with self._lock:
            self._reachable[peer] = (time.monotonic(), ok)
        return ok

    def start(self) -> None:
        creds = None
        peer_creds = None
        if self.cfg.tls:
            assert self.cfg.ca is not None and self.entry.cert is not None and self.entry.key is not None
            creds = server_credentials(self.entry.cert, self.entry.key)
            peer_creds = server_credentials(self.entry.cert, self.entry.key, client_ca=self.cfg.ca)
        # peer links are long-lived mTLS streams: never recycled for age or idleness mid-query
        peer = make_server(ServingLimits(max_streams=4, receive_timeout_s=self.cfg.deadline_s,
                                         max_connection_idle_s=None, max_connection_age_s=None))
        pb2_grpc.add_PeerServicer_to_server(_PeerServicer(self), peer)
        client = make_server(self.limits, [TokenInterceptor(self.tokens, open_methods=[HEALTH_METHOD],
                                                            on_refused=self.metrics.refused_call)])
        pb2_grpc.add_PartyServicer_to_server(_PartyServicer(self), client)
        add_standard_health(client, ["secureinference.Party"])
        bind(peer, f"[::]:{self.entry.peer_port}", peer_creds, f"party {self.id}'s peer port")
        bind(client, f"[::]:{self.entry.client_port}", creds, f"party {self.id}'s client port")
        if creds is not None:
            log.info("party %d: peer port %d (mutual TLS), client port %d (TLS + token)", self.id,
                     self.entry.peer_port, self.entry.client_port)
        self.scheduler.start()
        peer.start()
        client.start()
        self._servers = [peer, client]
        if self.entry.metrics_port is not None:
            self.metrics.serve(self.entry.metrics_bind, self.entry.metrics_port)

    def stop(self, grace: float = 1.0) -> None:
        self.metrics.stop()
        self.scheduler.stop()
        self.links.close()
        for s in self._servers:
            s.stop(grace)

    def wait(self) -> None:
        for s in self._servers:
            s.wait_for_termination()

    # ---- queries -----------------------------------------------------------------------
    def _claim(self, query_id: str) -> None:
        """Register a query or generation session id (the tag of its peer messages)."""
        with self._lock:
            if query_id in self._running:
                raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"query or session {query_id} is already running")
            if self.mailbox.finished(query_id):  # its peer frames would be dropped: a hang
                raise Rejected(grpc.StatusCode.ALREADY_EXISTS, f"id {query_id} was already used; every query and "
                               "session needs a fresh id")
            self._running[query_id] = threading.current_thread()

    def _release(self, query_id: str) -> None:
        """Free what a finished query or session held: its peer messages and its id's slot."""
        self.mailbox.forget(query_id)
        self.mailbox.sweep(idle_s=10 * self.cfg.deadline_s)
        with self._lock:
            self._running.pop(query_id, None)

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def receive_query(self, parts: Iterator[Any]) -> tuple[Any, ServedModel, Graph, dict[str, Any]]:
        """Read and validate a query's header and inputs from the client stream: (header, the
        model it names, its graph for the header's length, this party's inputs)."""
        try:
            first = next(parts)
        except StopIteration:
            raise QueryRejected(grpc.StatusCode.INVALID_ARGUMENT, "empty query stream") from None
        if not first.HasField("header"):
            raise QueryRejected(grpc.StatusCode.INVALID_ARGUMENT, "a query must start with a header")
        h = first.header
        if not QUERY_ID.match(h.query_id):
            raise QueryRejected(grpc.StatusCode.INVALID_ARGUMENT, "query id must be 1-64 characters of [A-Za-z0-9_.:-]")
        model = self.served(h.model)
        graph = model.graphs.get(int(h.seq_len))
        if graph is None:
            raise QueryRejected(grpc.StatusCode.INVALID_ARGUMENT, f"sequence length {h.seq_len} was not dealt for "
                                f"{model.name!r}; available: {model.buckets}")
        collector = InputCollector(graph, self.cfg.max_request_bytes)
        for part in parts:
            if not part.HasField("input"):
                raise QueryRejected(grpc.StatusCode.INVALID_ARGUMENT, "only one header per query")
            collector.add(part.input)
        received = collector.complete()
        try:
            return h, model, graph, party_inputs(graph, received, self.id, self.fp.frac_bits, self.device)
        except InputError as e:
            raise QueryRejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def run_query(self, query_id: str, model: ServedModel, graph: Graph, inputs: dict[str, Any],
                  emit: Callable[[Any], None], want_trace: bool, record: QueryRecord | None = None) -> None:
        """Run one query of ``model`` (its ``graph``) in lockstep with the peers, emitting its
        progress, output and summary events; a failure is sent to the peers as an abort and
        raised. ``record`` gets its traffic (bytes to and from the peers, rounds) and its success."""
        transport = _CountedTransport(self.id, query_id, self.links, self.mailbox, self.cfg.deadline_s)
        profiler = Profiler()
        party = Party(transport, self.fp, self.device, profiler)
        secret_nodes = [n for n in graph.nodes if n.name in graph.secret_names()]
        total, done = len(secret_nodes), [0]
        t0 = start = time.perf_counter()
        try:
            party.setup_keys()

            def trace(node: Any) -> Any:
                done[0] += 1
                if done[0] % 25 == 0 or done[0] == total:
                    emit(pb2.QueryEvent(progress=pb2.Progress(done=done[0], total=total, stage="compute")))
                return span(party, node.origin or node.op)

            (out,), _ = Interpreter(graph, MpcOps(party), trace).run(model.weights, inputs)
            outputs = [out]
            for index, share in enumerate(outputs):
                for p, comp in enumerate((share.a, share.b)):
                    for chunk in tensor_chunks(comp, pb2.TensorChunk):
                        emit(pb2.QueryEvent(output=pb2.OutputChunk(index=index, part=p, frac_bits=share.frac_bits,
                                                                   chunk=chunk)))
            spans = []
            if want_trace:  # every traced node, in order, for per-part tables and timelines
                spans = [s.since(start).to_proto(pb2.Span) for s in profiler.spans if s.depth == 0]
            seconds = time.perf_counter() - t0
            emit(pb2.QueryEvent(done=pb2.Done(seconds=seconds, bytes_sent=party.bytes_sent, rounds=party.rounds,
                                              spans=spans)))
            log.info("query %s done: %.2f s, %d rounds, %.1f MB sent", query_id, seconds, party.rounds,
                     party.bytes_sent / 1e6)
            if record is not None:
                record.succeeded()
        except Exception as e:  # noqa: BLE001 - reported to the client and to the peers
            transport.abort(f"{type(e).__name__}: {e}")
            log.warning("query %s failed after %.1f s: %s: %s", query_id, time.perf_counter() - t0,
                        type(e).__name__, e)
            raise
        finally:
            if record is not None:
                record.add_traffic(party.bytes_sent, transport.bytes_received, party.rounds)
            self._release(query_id)


class _CountedTransport(GrpcTransport):
    """One query's transport, also counting the payload bytes it receives (for the metrics)."""

    bytes_received = 0

    def recv(self, frm: int) -> list[torch.Tensor]:
        msg = super().recv(frm)
        self.bytes_received += payload_bytes(msg)
        return msg


class _PeerServicer(pb2_grpc.PeerServicer):
    def __init__(self, node: PartyNode) -> None:
        self.node = node

    def Link(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:  # noqa: N802
        expected = _peer_identity(context)
        frames = 0
        try:
            for frame in request_iterator:
                if frame.sender not in (0, 1, 2) or frame.sender == self.node.id:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"frame from invalid sender {frame.sender}")
                if expected is not None and frame.sender != expected:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, f"the certificate of party {expected} cannot "
                                  f"send as party {frame.sender}")
                if frame.query_id == CONTROL_TAG:  # the batch protocol, not a query's message
                    self.node.scheduler.deliver(frame)
                else:
                    self.node.mailbox.deliver(frame)
                frames += 1
        except WireError as e:
            log.warning("party %d: malformed frame from a peer: %s", self.node.id, e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {e}")
        return pb2.PeerSummary(frames=frames)


def _peer_identity(context: grpc.ServicerContext) -> int | None:
    """The party id named by the peer's certificate (common name "partyN"); None without TLS."""
    names = context.auth_context().get("x509_common_name") or []
    for name in names:
        m = re.fullmatch(rb"party([012])", name)
        if m:
            return int(m.group(1))
    return None


class _PartyServicer(pb2_grpc.PartyServicer):
    def __init__(self, node: PartyNode) -> None:
        self.node = node

    def Query(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        record = self.node.metrics.query()
        return record.track(self._query(request_iterator, context, record), context)

    def _query(self, request_iterator: Iterator[Any], context: grpc.ServicerContext, record: QueryRecord
               ) -> Iterator[Any]:
        node = self.node
        try:
            node.admission.acquire()  # before reading: a stream still uploading holds a slot
        except Rejected as e:
            abort_with(context, e)
        try:
            header, model, graph, inputs = self._receive(request_iterator, context)
        except Rejected as e:
            node.admission.release()
            abort_with(context, e)
        except grpc.RpcError:  # the client went away while uploading
            node.admission.release()
            return
        query_id = header.query_id
        record.query_id = query_id
        record.running()
        log.info("query %s accepted: model %s, length %d", query_id, model.name, header.seq_len)
        if node.batching.enabled:
            yield from self._batched(header, model, graph, inputs, context, record)
            return
        # a client that gives up (or fails on another party) cancels the query here too
        context.add_callback(lambda: node.mailbox.abort(query_id, "the client cancelled the query"))
        events = run_in_worker(lambda emit: node.run_query(query_id, model, graph, inputs, emit, header.want_trace,
                                                           record),
                               f"query-{query_id}", on_exit=node.admission.release)
        try:
            yield from events
        except Exception as e:  # noqa: BLE001 - the query failed; the node serves on
            code = grpc.StatusCode.DEADLINE_EXCEEDED if "within" in str(e) else grpc.StatusCode.ABORTED
            context.abort(code, f"query {query_id} failed on party {node.id}: {type(e).__name__}: {e}")

    def _batched(self, header: Any, model: ServedModel, graph: Graph, inputs: dict[str, Any],
                 context: grpc.ServicerContext, record: QueryRecord) -> Iterator[Any]:
        """A validated query, answered from the batch party 0 puts it in (``party.batching``)."""
        node, query_id = self.node, header.query_id

        def on_exit() -> None:
            node.admission.release()
            node._release(query_id)

        member = Member(query_id, model, graph, int(header.seq_len), inputs, header.want_trace, record, on_exit)
        context.add_callback(lambda: node.scheduler.client_gone(member))
        try:
            yield from node.scheduler.submit(member)
        except BatchFailed as e:
            context.abort(e.code, str(e))

    def _receive(self, request_iterator: Iterator[Any], context: grpc.ServicerContext
                 ) -> tuple[Any, ServedModel, Graph, Any]:
        """The query's header, model, graph and inputs, within the receive deadline; registers its id."""
        node = self.node
        with ReceiveDeadline(context, node.cfg.receive_timeout_s) as deadline, \
                deadline.waiting("the query's header and inputs"):
            header, model, graph, inputs = node.receive_query(iter(request_iterator))
        node._claim(header.query_id)
        return header, model, graph, inputs

    # ---- generation: Generate(stream GenerateRequest) -> stream GenerateEvent -------------
    def Generate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        """One generation session (``party.generation``); it holds a query slot while it lives."""
        node = self.node
        try:
            node.admission.acquire()
        except Rejected as e:
            abort_with(context, e)
        try:
            yield from node.generation.serve(request_iterator, context, pb2)
        except Rejected as e:
            abort_with(context, e)
        except grpc.RpcError:  # the client went away
            return
        finally:
            node.admission.release()

    def Describe(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """The catalogue, and the default model in the top-level fields (older clients read those)."""
        node = self.node
        default = node.default
        return pb2.ModelInfo(model=default.name, seq_lens=default.buckets, inputs=_input_infos(default),
                             frac_bits=node.cfg.frac_bits, recipe=default.recipe.get("name", ""),
                             party_id=node.id, shares_sha256=node.entry.shares_sha256 or "",
                             running_queries=node.running(), sessions=len(node.generation.active()),
                             catalogue=[_model_entry(m) for m in node.models.values()])

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Liveness and readiness (both peers reachable); open to anyone, so it names no model and
        counts no queries."""
        unreachable = [p for p in range(3) if p != self.node.id and not self.node.peer_reachable(p)]
        detail = (f"party {self.node.id} serving" if not unreachable
                  else f"party {self.node.id}: peers {unreachable} unreachable")
        return pb2.HealthReply(live=True, ready=not unreachable, detail=detail)


def _input_infos(model: ServedModel) -> list[Any]:
    return [pb2.InputInfo(name=i.name, kind=i.kind, vocab_size=i.vocab_size) for i in model.inputs]


def _model_entry(model: ServedModel) -> Any:
    """One model of ``Describe``'s catalogue (a causal LM's vocabulary, positions and
    end-of-text token from its info, -1: no end-of-text token; a classifier's labels)."""
    info = model.info
    eos = info.get("eos_token_id")
    return pb2.ModelEntry(model=model.name, kind=model.kind, seq_lens=model.buckets, capacities=model.capacities,
                          inputs=_input_infos(model), recipe=model.recipe.get("name", ""),
                          graph_sha256=model.graph_sha256, vocab_size=int(info.get("vocab_size") or 0),
                          max_positions=int(info.get("max_positions") or 0),
                          eos_token_id=-1 if eos is None else int(eos), labels=model.labels)


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed megabyte buffers in the heap (glibc only).

    Every round allocates and frees tensors and wire buffers of up to a few megabytes; by
    default glibc serves those with fresh mmaps and hands them back at once, so every new
    buffer page-faults and is zeroed again by the kernel. Measured on the peer links
    (``benchmarks/peer_rounds.py``, 2 x 480 KB per message): about half the time of a round.
    Returns whether the settings took.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one party node of a secure inference cluster.")
    ap.add_argument("--config", type=Path, required=True, help="cluster configuration (JSON)")
    ap.add_argument("--party", type=int, required=True, choices=[0, 1, 2])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-concurrent-queries", type=int, default=8)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--insecure", action="store_true",
                    help="allow a configuration without TLS (plaintext, unauthenticated links; local demos only)")
    ap.add_argument("--log-json", action="store_true", help="log JSON lines (or \"log_json\": true in the config)")
    ap.add_argument("--max-batch", type=int, default=8, metavar="N",
                    help="run up to N concurrent queries of one model and length as one batched execution (party 0 "
                         "decides; default 8; 1: every query alone, no coordination); all three nodes must agree on "
                         "batching on or off")
    ap.add_argument("--batch-window-ms", type=float, default=100.0, metavar="MS",
                    help="how long party 0 holds a ready query for others to join its batch (default 100)")
    ap.add_argument("--link-shape", type=link_shape_arg, default=None, metavar="DELAY,RATE",
                    help="benchmarks only: emulate a link on every peer message this node sends, e.g. 40ms,100mbit "
                         "(one-way delay, rate per peer; secure.transport.shaping); off by default")
    args = ap.parse_args(argv)
    try:
        batching = BatchOptions(window_s=args.batch_window_ms / 1000.0, max_batch=args.max_batch)
    except ValueError as e:
        ap.error(str(e))
    configure_logging(f"party{args.party}", args.log_level, args.log_json)
    torch.set_num_threads(1)
    tune_malloc()
    try:
        cfg = ClusterConfig.load(args.config)
        if cfg.log_json and not args.log_json:
            configure_logging(f"party{args.party}", args.log_level, json_lines=True)
        node = PartyNode(cfg, args.party, args.device, args.max_concurrent_queries, insecure=args.insecure,
                         link_shape=args.link_shape, batching=batching)
    except (ConfigError, FileNotFoundError) as e:
        log.error("cannot start: %s", e)
        return 2
    try:
        node.start()
    except OSError as e:  # a port in use
        log.error("cannot start: %s", e)
        node.stop(0)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("party %d ready", args.party)
    stop.wait()
    log.info("party %d shutting down", args.party)
    node.stop()
    return 0


if __name__ == "__main__":  # python -m party.node, as python -m party
    raise SystemExit(main())
