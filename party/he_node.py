"""The HE inference node: one server holding the plaintext model, answering CKKS queries.

    python -m party.he_node --config he.json [--insecure]

The configuration (``party.config.HeNodeConfig``) names the bind address, TLS files, the
accepted client-token digests and the models with their lengths. The serving layer is the
MPC node's (``party.serving``): the token is checked from the call metadata before any
message is read, a query slot is taken before its upload, every message the node waits
for has a receive deadline, and the standard ``grpc.health.v1`` service answers probes.

A query (``HeInference.Query``, one bidirectional stream): the client sends a start
message (model, sequence length, the public attention mask), its public context
(parameters, public/relinearisation/Galois keys; never the secret key) and its
encrypted embedded rows. The node evaluates the compiled graph with
:class:`secure.he.ops.HeOps`; when a ciphertext runs out of levels or must change
layout, it streams a masked refresh request and waits for the client's fresh
ciphertexts on the same stream. It ends with the output ciphertexts, their slot
indices and the per-part spans. Malformed input gets INVALID_ARGUMENT with the reason,
a wrong token UNAUTHENTICATED, an unknown model NOT_FOUND, a client that stops sending
DEADLINE_EXCEEDED; the node keeps serving. Queries run at most
``max_concurrent_queries`` at a time (RESOURCE_EXHAUSTED beyond), each in its own
worker thread. With ``metrics_port`` the node serves Prometheus metrics
(``party.metrics``: queries by outcome, latency, stream bytes, client trips); with
``--log-json`` it logs JSON lines (``party.logs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import torch

from party import serving
from party.config import ConfigError, HeNodeConfig
from party.logs import configure_logging
from party.metrics import NodeMetrics, QueryRecord
from party.serving import Rejected
from protos import load
from secure.evaluate.he_model import HeModel, distilled_he_model, tiny_he_model
from secure.he.breakdown import HeTracer
from secure.he.client import RefreshCheck, server_engine
from secure.he.engine import HeFormatError, SealEngine
from secure.he.layout import Cipher, Plain, canonical
from secure.he.ops import HeOps
from secure.he.plain_cache import PlainCache
from secure.he.pool import HePool, HeWorkerError, cache_share
from secure.he.refresh import REFRESH_BOUNDS_META, RefreshSession, Sent
from secure.runtime.he_planner import HePlan, plan
from secure.runtime.interpreter import Interpreter, InterpreterError
from secure.transport.he_wire import NodeStream, QueryResult
from secure.transport.wire import WireError, tensor_chunks

pb2, pb2_grpc = load()
log = logging.getLogger("party.he_node")

MAX_CONTEXT_BYTES = 1 << 30
MAX_CIPHERTEXT_BYTES = 8 << 20
HEALTH_METHOD = "/secureinference.HeInference/Health"


class HeNode:
    """Serves HE queries for compiled models keyed by (name, sequence length).

    ``token_sha256`` lists the accepted client tokens' digests; ``limits`` bounds the
    admitted queries and the receive deadline; ``flood_bits = k`` floods the outputs with
    uniform noise in [-2^-k, 2^-k] (``HeOps.finish_outputs``; None: off); ``plain_cache``
    keeps encoded weight diagonals for every later query (:mod:`secure.he.plain_cache`);
    ``pool`` shares the linear layers with worker processes (:mod:`secure.he.pool`).
    """

    def __init__(self, models: dict[tuple[str, int], HeModel], token_sha256: list[str],
                 limits: serving.ServingLimits | None = None, flood_bits: int | None = None,
                 plain_cache: PlainCache | None = None, pool: HePool | None = None) -> None:
        self.models = models
        self.pool = pool
        self.flood_bits = flood_bits
        self.plain_cache = plain_cache
        self.tokens = serving.TokenCheck(token_sha256)
        if not self.tokens.digests:
            raise ConfigError("the HE node accepts no client token: give it 'client_token_sha256'")
        self.limits = limits or serving.ServingLimits(max_streams=2, receive_timeout_s=120.0)
        self.admission = serving.Admission(self.limits.max_streams, "HE queries")
        self.plans: dict[tuple[str, int], HePlan] = {}
        self._plan_lock = threading.Lock()
        self.server: grpc.Server | None = None
        self.metrics = NodeMetrics("he", "he-node", self.limits.max_streams, lambda: self.admission.active)

    def model(self, name: str, seq: int) -> HeModel:
        m = self.models.get((name, seq))
        if m is None:
            known = sorted(f"{n} (seq {s})" for n, s in self.models)
            raise Rejected(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r} at sequence length {seq}; "
                                                        f"this node serves {known}")
        return m

    def plan_for(self, m: HeModel) -> HePlan:
        key = (m.name, m.seq_len)
        with self._plan_lock:
            return self._plan(m, key)

    def _plan(self, m: HeModel, key: tuple[str, int]) -> HePlan:
        if key not in self.plans:
            inputs = m.client_inputs(torch.ones(1, m.seq_len, dtype=torch.long), torch.ones(1, m.seq_len,
                                                                                                dtype=torch.long))
            self.plans[key] = plan(m.graph, m.weights, inputs)
        return self.plans[key]

    # ---- one query, in a worker thread -------------------------------------------------
    def serve(self, requests: Iterator[Any], emit: Callable[[Any], None], record: QueryRecord | None = None) -> None:
        """One query: ``requests`` are the client's messages, ``emit`` sends the node's.
        Malformed messages raise :class:`WireError`, refused ones :class:`Rejected`;
        ``record`` hears when it runs, its client trips and its success."""
        wire = NodeStream(pb2, requests, emit, MAX_CONTEXT_BYTES, MAX_CIPHERTEXT_BYTES)
        start = wire.read_start()
        m = self.model(start.model, start.seq_len)
        mask = start.attention_mask()
        the_plan = self.plan_for(m)
        engine = _query_engine(wire.read_context(), the_plan)
        engine.plain_cache = self.plain_cache
        engine.pool = self.pool
        embeds = _input_cipher(wire, engine, m, start.input_ciphertexts)
        if record is not None:
            record.running()
        link = _StreamLink(wire)
        session = RefreshSession(engine, link, refresh_bounds=m.graph.meta.get(REFRESH_BOUNDS_META),
                                 on_event=lambda kind, _: wire.send_progress(link.trips, the_plan.refreshes, kind))
        ops, tracer = HeOps(session), HeTracer(session)
        t0 = time.perf_counter()
        outs, _ = Interpreter(m.graph, ops, tracer).run(
            {k: Plain(v.to(torch.float64)) for k, v in m.weights.items()},
            {m.embeds_input: embeds, "attention_mask": mask})
        seconds = time.perf_counter() - t0
        finished = ops.finish_outputs(outs, self.flood_bits)  # unused slots cleared
        wire.send_result(QueryResult([([engine.serialize(ct) for ct in o.cts], o.index) for o in finished], seconds,
                                     session.bytes_to_client, session.bytes_from_client, session.refreshes,
                                     tracer.spans))
        log.info("HE query on %s (seq %d): %.2f s, %d client trips%s", m.name, m.seq_len, seconds, session.refreshes,
                 "" if self.plain_cache is None else f"; plaintext cache {self.plain_cache.summary()}")
        if record is not None:
            record.add_traffic(rounds=session.refreshes)
            record.succeeded()

    def start(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Listen on ``address`` (TLS with ``credentials``; None is plaintext, logged loudly) and
        return the bound port."""
        interceptor = serving.TokenInterceptor(self.tokens, open_methods=[HEALTH_METHOD],
                                               on_refused=self.metrics.refused_call)
        server = serving.make_server(self.limits, [interceptor])
        pb2_grpc.add_HeInferenceServicer_to_server(_Servicer(self), server)
        serving.add_standard_health(server, ["secureinference.HeInference"])
        bound = serving.bind(server, address, credentials, "HE node's client port")
        server.start()
        self.server = server
        return bound

    def stop(self) -> None:
        self.metrics.stop()
        if self.server is not None:
            self.server.stop(0.5)
        if self.pool is not None:
            self.pool.close()


def _query_engine(context: bytes, the_plan: HePlan) -> SealEngine:
    """The server's engine on the client's public context, which must have the plan's parameters."""
    try:
        engine = server_engine(context)
    except HeFormatError as e:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"public context: {e}") from e
    if engine.ctx.params != the_plan.params:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"the context's parameters {engine.ctx.params} "
                                                           f"differ from the plan's {the_plan.params}")
    return engine


def _input_cipher(wire: NodeStream, engine: SealEngine, m: HeModel, announced: int) -> Cipher:
    """The client's embedded rows, read as they arrive, in the canonical layout of ``m.embeds_shape``."""
    hidden = m.embeds_shape
    index, count = canonical(hidden, engine.slots)
    if announced != count:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT,
                         f"expected {count} input ciphertexts for shape {hidden}, the start announces {announced}")
    try:
        cts = [engine.deserialize(blob) for blob in wire.inputs(count)]
    except HeFormatError as e:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"input ciphertext: {e}") from e
    return Cipher(cts, index.reshape(hidden))


class _StreamLink:
    """The refresh link over the query's own stream."""

    def __init__(self, wire: NodeStream) -> None:
        self.wire = wire
        self.trips = 0

    def refresh(self, items: list[Sent], check: RefreshCheck) -> list[list[bytes]]:
        self.trips += 1
        self.wire.send_refresh(self.trips, items, check.node, check.bounds, check.masks)
        return self.wire.read_refresh_reply([count for _, _, count in items])


class _Servicer(pb2_grpc.HeInferenceServicer):
    """The gRPC face of an :class:`HeNode`; the client token was checked by the interceptor."""

    def __init__(self, node: HeNode) -> None:
        self.node = node

    def Plan(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            m = self.node.model(request.model, int(request.seq_len))
            p = self.node.plan_for(m)
        except Rejected as e:
            serving.abort_with(context, e)
        return pb2.HePlanReply(params_json=json.dumps(p.params.to_dict()), steps=p.steps, refreshes=p.refreshes,
                               depth=p.depth, embeds_input=m.embeds_input)

    def Embedding(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        tables = [m.table for (name, _), m in self.node.models.items() if name == request.model]
        if not tables:
            serving.abort_with(context, Rejected(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}"))
        yield from tensor_chunks(tables[0].to(torch.float32), pb2.TensorChunk)

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Open to anyone: it names no model and counts no queries."""
        return pb2.HealthReply(live=True, ready=True, detail="HE node serving")

    def Query(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        record = self.node.metrics.query()
        return record.track(self._query(request_iterator, context, record), context)

    def _query(self, request_iterator: Iterator[Any], context: grpc.ServicerContext, record: QueryRecord
               ) -> Iterator[Any]:
        node = self.node
        try:
            node.admission.acquire()  # before reading: a stream still uploading holds a slot
        except Rejected as e:
            serving.abort_with(context, e)

        def work(emit: Callable[[Any], None]) -> None:
            with serving.ReceiveDeadline(context, node.limits.receive_timeout_s) as deadline:
                requests = deadline.timed(record.received_messages(request_iterator), "the next message of its query")
                node.serve(requests, record.sending(emit), record)

        try:
            yield from serving.run_in_worker(work, "he-query", on_exit=node.admission.release)
        except Rejected as e:
            serving.abort_with(context, e)
        except grpc.RpcError:  # the client went away
            return
        except (WireError, HeFormatError) as e:
            serving.abort_with(context, Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
        except InterpreterError as e:
            code = (grpc.StatusCode.INVALID_ARGUMENT if isinstance(e.__cause__, HeFormatError)
                    # a worker that died: fresh workers serve the next query
                    else grpc.StatusCode.UNAVAILABLE if isinstance(e.__cause__, HeWorkerError)
                    else grpc.StatusCode.INTERNAL)
            serving.abort_with(context, Rejected(code, str(e)))
        except Exception as e:  # noqa: BLE001 - the node must keep serving whatever one query did
            log.exception("HE query failed")
            serving.abort_with(context, Rejected(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))


def load_models(cfg: HeNodeConfig) -> dict[tuple[str, int], HeModel]:
    """Compile every configured model at every configured length."""
    models = {}
    for entry in cfg.models:
        for seq in entry.seq_lens:
            m = tiny_he_model(seq) if entry.model == "tiny" else distilled_he_model(entry.model, seq)
            models[(entry.model, seq)] = m
    return models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="HE node configuration (party.config.HeNodeConfig)")
    ap.add_argument("--insecure", action="store_true",
                    help="allow a configuration without TLS (plaintext; the token travels in the clear)")
    ap.add_argument("--log-json", action="store_true", help="log JSON lines (or \"log_json\": true in the config)")
    args = ap.parse_args(argv)
    configure_logging("he-node", logging.INFO, args.log_json)
    try:
        cfg = HeNodeConfig.load(args.config)
        if cfg.log_json and not args.log_json:
            configure_logging("he-node", logging.INFO, json_lines=True)
        cfg.require_tls(args.insecure)
        share = cache_share(cfg.plaintext_cache_mib << 20, cfg.linear_workers)
        node = HeNode(load_models(cfg), list(cfg.client_token_sha256),
                      serving.ServingLimits(max_streams=cfg.max_concurrent_queries,
                                            receive_timeout_s=cfg.receive_timeout_s), cfg.flood_bits,
                      PlainCache(share), HePool(cfg.linear_workers, share) if cfg.linear_workers else None)
        creds = serving.server_credentials(cfg.cert, cfg.key) if cfg.cert and cfg.key else None
        port = node.start(cfg.bind_address, creds)
        if cfg.metrics_port is not None:
            node.metrics.serve(cfg.metrics_bind, cfg.metrics_port)
    except (ConfigError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    log.info("HE node serving %s on %s (port %d)", sorted(node.models), cfg.bind_address, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
