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
:class:`secure.he.backend.HeOps`; when a ciphertext runs out of levels or must change
layout, it streams a masked refresh request and waits for the client's fresh
ciphertexts on the same stream. It ends with the output ciphertexts, their slot
indices and the per-part spans. Malformed input gets INVALID_ARGUMENT with the reason,
a wrong token UNAUTHENTICATED, an unknown model NOT_FOUND, a client that stops sending
DEADLINE_EXCEEDED; the node keeps serving. Queries run at most
``max_concurrent_queries`` at a time (RESOURCE_EXHAUSTED beyond), each in its own
worker thread.
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
import numpy as np
import torch

from party.config import ConfigError, HeNodeConfig
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
from protos import load
from secure.he.backend import HeOps
from secure.he.breakdown import HeTracer
from secure.he.client import server_engine
from secure.he.engine import HeFormatError
from secure.he.layout import Cipher, Plain, canonical
from secure.he.model import HeModel, distilled_he_model, tiny_he_model
from secure.he.planner import HePlan, plan
from secure.runtime.interpreter import Interpreter, InterpreterError
from secure.transport.he_wire import BlobReader, blob_pieces
from secure.transport.wire import WireError, tensor_chunks

pb2, pb2_grpc = load()
log = logging.getLogger("party.he_node")

MAX_CONTEXT_BYTES = 1 << 30
MAX_CIPHERTEXT_BYTES = 8 << 20
HEALTH_METHOD = "/secureinference.HeInference/Health"
HeRejected = Rejected  # a query refused with its gRPC status


class HeNode:
    """Serves HE queries for compiled models keyed by (name, sequence length).

    ``token_sha256`` lists the accepted client tokens' digests; ``limits`` bounds the
    admitted queries and the receive deadline.
    """

    def __init__(self, models: dict[tuple[str, int], HeModel], token_sha256: list[str],
                 limits: ServingLimits | None = None) -> None:
        self.models = models
        self.tokens = TokenCheck(token_sha256)
        if not self.tokens.digests:
            raise ConfigError("the HE node accepts no client token: give it 'client_token_sha256'")
        self.limits = limits or ServingLimits(max_streams=2, receive_timeout_s=120.0)
        self.admission = Admission(self.limits.max_streams, "HE queries")
        self.plans: dict[tuple[str, int], HePlan] = {}
        self._plan_lock = threading.Lock()
        self.server: grpc.Server | None = None

    def model(self, name: str, seq: int) -> HeModel:
        m = self.models.get((name, seq))
        if m is None:
            known = sorted(f"{n} (seq {s})" for n, s in self.models)
            raise HeRejected(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r} at sequence length {seq}; "
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
    def serve(self, requests: Iterator[Any], emit: Callable[[Any], None]) -> None:
        """One query: ``requests`` are the client's messages, ``emit`` sends the node's."""
        reader = BlobReader(requests, lambda m: m.blob if m.WhichOneof("msg") == "blob" else None,
                            MAX_CONTEXT_BYTES)
        first = reader.next_message()
        if first.WhichOneof("msg") != "start":
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a query must be its start")
        start = first.start
        m = self.model(start.model, int(start.seq_len))
        mask_bytes = bytes(start.attention_mask)
        if len(mask_bytes) != 8 * m.seq_len:
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT, f"attention mask must be {m.seq_len} int64 values")
        mask = torch.from_numpy(np.frombuffer(mask_bytes, dtype="<i8").copy()).view(1, m.seq_len)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT, "attention mask must hold 0 and 1 only")
        the_plan = self.plan_for(m)
        try:
            engine = server_engine(reader.read("context", 0, 0))
        except HeFormatError as e:
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT, f"public context: {e}") from e
        if engine.ctx.params != the_plan.params:
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT, f"the context's parameters {engine.ctx.params} "
                                                               f"differ from the plan's {the_plan.params}")
        hidden = m.embeds_shape
        index, count = canonical(hidden, engine.slots)
        if int(start.input_ciphertexts) != count:
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT,
                             f"expected {count} input ciphertexts for shape {hidden}, the start announces "
                             f"{start.input_ciphertexts}")
        reader.max_bytes = MAX_CIPHERTEXT_BYTES
        try:
            cts = [engine.deserialize(reader.read("input", 0, i)) for i in range(count)]
        except HeFormatError as e:
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT, f"input ciphertext: {e}") from e
        link = _StreamLink(reader, emit)
        ops = HeOps(engine, link, on_event=lambda kind, d: emit(pb2.HeServerMessage(
            progress=pb2.Progress(done=link.trips, total=the_plan.refreshes, stage=kind))))
        tracer = HeTracer(ops)
        t0 = time.perf_counter()
        outs, _ = Interpreter(m.graph, ops, tracer).run(
            {k: Plain(v.to(torch.float64)) for k, v in m.weights.items()},
            {m.embeds_input: Cipher(cts, index.reshape(hidden)), "attention_mask": mask})
        seconds = time.perf_counter() - t0
        counts, shapes = [], []
        for i, o in enumerate(outs):
            o = o if isinstance(o, Cipher) else ops.encrypt_public(o.value)
            for j, ct in enumerate(o.cts):
                for piece in blob_pieces(pb2.HeBlob, "output", i, j, engine.serialize(ct)):
                    emit(pb2.HeServerMessage(blob=piece))
            for piece in blob_pieces(pb2.HeBlob, "index", i, 0, o.index.numpy().astype("<i8").tobytes()):
                emit(pb2.HeServerMessage(blob=piece))
            counts.append(len(o.cts))
            shapes.append(json.dumps(list(o.shape)))
        spans = [pb2.Span(name=n, start=s, seconds=d, bytes_sent=b, rounds=r) for n, s, d, b, r in tracer.spans]
        emit(pb2.HeServerMessage(result=pb2.HeResult(
            ciphertexts=counts, shapes=shapes, seconds=seconds, bytes_to_client=ops.bytes_to_client,
            bytes_from_client=ops.bytes_from_client, refreshes=ops.refreshes, spans=spans)))
        log.info("HE query on %s (seq %d): %.2f s, %d client trips", m.name, m.seq_len, seconds, ops.refreshes)

    def start(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Listen on ``address`` (TLS with ``credentials``; None is plaintext, logged loudly) and
        return the bound port."""
        server = make_server(self.limits, [TokenInterceptor(self.tokens, open_methods=[HEALTH_METHOD])])
        pb2_grpc.add_HeInferenceServicer_to_server(_Servicer(self), server)
        add_standard_health(server, ["secureinference.HeInference"])
        bound = bind(server, address, credentials, "HE node's client port")
        server.start()
        self.server = server
        return bound

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0.5)


class _StreamLink:
    """The refresh link over the query's own stream."""

    def __init__(self, reader: BlobReader, emit: Callable[[Any], None]) -> None:
        self.reader = reader
        self.emit = emit
        self.trips = 0

    def refresh(self, items: list) -> list[list[bytes]]:
        self.trips += 1
        self.emit(pb2.HeServerMessage(refresh=pb2.HeRefreshRequest(
            id=self.trips, inputs=[len(b) for b, _, _ in items], outputs=[c for _, _, c in items],
            gathers=[g is not None for _, g, _ in items])))
        for i, (blobs, gather, _) in enumerate(items):
            for j, b in enumerate(blobs):
                for piece in blob_pieces(pb2.HeBlob, "refresh", i, j, b):
                    self.emit(pb2.HeServerMessage(blob=piece))
            if gather is not None:
                for piece in blob_pieces(pb2.HeBlob, "gather", i, 0, gather.astype("<i4").tobytes()):
                    self.emit(pb2.HeServerMessage(blob=piece))
        return [[self.reader.read("refresh", i, j) for j in range(count)] for i, (_, _, count) in enumerate(items)]


class _Servicer(pb2_grpc.HeInferenceServicer):
    """The gRPC face of an :class:`HeNode`; the client token was checked by the interceptor."""

    def __init__(self, node: HeNode) -> None:
        self.node = node

    def Plan(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            m = self.node.model(request.model, int(request.seq_len))
            p = self.node.plan_for(m)
        except Rejected as e:
            abort_with(context, e)
        return pb2.HePlanReply(params_json=json.dumps(p.params.to_dict()), steps=p.steps, refreshes=p.refreshes,
                               depth=p.depth, embeds_input=m.embeds_input)

    def Embedding(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        tables = [m.table for (name, _), m in self.node.models.items() if name == request.model]
        if not tables:
            abort_with(context, Rejected(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}"))
        yield from tensor_chunks(tables[0].to(torch.float32), pb2.TensorChunk)

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        """Open to anyone: it names no model and counts no queries."""
        return pb2.HealthReply(live=True, ready=True, detail="HE node serving")

    def Query(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        node = self.node
        try:
            node.admission.acquire()  # before reading: a stream still uploading holds a slot
        except Rejected as e:
            abort_with(context, e)

        def work(emit: Callable[[Any], None]) -> None:
            with ReceiveDeadline(context, node.limits.receive_timeout_s) as deadline:
                node.serve(deadline.timed(request_iterator, "the next message of its query"), emit)

        try:
            yield from run_in_worker(work, "he-query", on_exit=node.admission.release)
        except Rejected as e:
            abort_with(context, e)
        except grpc.RpcError:  # the client went away
            return
        except (WireError, HeFormatError) as e:
            abort_with(context, Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
        except InterpreterError as e:
            code = (grpc.StatusCode.INVALID_ARGUMENT if isinstance(e.__cause__, HeFormatError)
                    else grpc.StatusCode.INTERNAL)
            abort_with(context, Rejected(code, str(e)))
        except Exception as e:  # noqa: BLE001 - the node must keep serving whatever one query did
            log.exception("HE query failed")
            abort_with(context, Rejected(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))


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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s he-node %(levelname)s %(message)s")
    try:
        cfg = HeNodeConfig.load(args.config)
        cfg.require_tls(args.insecure)
        node = HeNode(load_models(cfg), list(cfg.client_token_sha256),
                      ServingLimits(max_streams=cfg.max_concurrent_queries, receive_timeout_s=cfg.receive_timeout_s))
        creds = server_credentials(cfg.cert, cfg.key) if cfg.cert and cfg.key else None
        port = node.start(cfg.bind_address, creds)
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
