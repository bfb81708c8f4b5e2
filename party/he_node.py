"""The HE inference node: one server holding the plaintext model, answering CKKS queries.

    python -m party.he_node --model tiny|DISTILLED_DIR --seq 16 [--port 50070]
        --token-file TOKEN [--cert server.pem --key server.key]

A query (``HeInference.Query``, one bidirectional stream): the client sends a start
message (token, model, sequence length, the public attention mask), its public context
(parameters, public/relinearisation/Galois keys; never the secret key) and its
encrypted embedded rows. The node evaluates the compiled graph with
:class:`secure.he.backend.HeOps`; when a ciphertext runs out of levels or must change
layout, it streams a masked refresh request and waits for the client's fresh
ciphertexts on the same stream. It ends with the output ciphertexts, their slot
indices and the per-part spans. Malformed input gets INVALID_ARGUMENT with the reason,
a wrong token UNAUTHENTICATED, an unknown model NOT_FOUND; the node keeps serving.
Queries run at most ``--max-concurrent`` at a time (RESOURCE_EXHAUSTED beyond), each in
its own worker thread.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from party.node import CHANNEL_OPTIONS
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
_END = object()


class HeRejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class HeNode:
    """Serves HE queries for compiled models keyed by (name, sequence length)."""

    def __init__(self, models: dict[tuple[str, int], HeModel], token: str, max_concurrent: int = 2) -> None:
        self.models = models
        self.token = token
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.plans: dict[tuple[str, int], HePlan] = {}
        self.running = 0
        self.server: grpc.Server | None = None

    def check_token(self, token: str) -> None:
        if not token or not hmac.compare_digest(token.encode(), self.token.encode()):
            raise HeRejected(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong client token")

    def model(self, name: str, seq: int) -> HeModel:
        m = self.models.get((name, seq))
        if m is None:
            known = sorted(f"{n} (seq {s})" for n, s in self.models)
            raise HeRejected(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r} at sequence length {seq}; "
                                                        f"this node serves {known}")
        return m

    def plan_for(self, m: HeModel) -> HePlan:
        key = (m.name, m.seq_len)
        if key not in self.plans:
            inputs = m.client_inputs(torch.ones(1, m.seq_len, dtype=torch.long), torch.ones(1, m.seq_len,
                                                                                                dtype=torch.long))
            self.plans[key] = plan(m.graph, m.weights, inputs)
        return self.plans[key]

    # ---- one query, in a worker thread -------------------------------------------------
    def serve(self, requests: Iterator[Any], out: queue.Queue) -> None:
        reader = BlobReader(requests, lambda m: m.blob if m.WhichOneof("msg") == "blob" else None,
                            MAX_CONTEXT_BYTES)
        first = reader.next_message()
        if first.WhichOneof("msg") != "start":
            raise HeRejected(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a query must be its start")
        start = first.start
        self.check_token(start.client_token)
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
        link = _StreamLink(reader, out)
        ops = HeOps(engine, link, on_event=lambda kind, d: out.put(pb2.HeServerMessage(
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
                    out.put(pb2.HeServerMessage(blob=piece))
            for piece in blob_pieces(pb2.HeBlob, "index", i, 0, o.index.numpy().astype("<i8").tobytes()):
                out.put(pb2.HeServerMessage(blob=piece))
            counts.append(len(o.cts))
            shapes.append(json.dumps(list(o.shape)))
        spans = [pb2.Span(name=n, start=s, seconds=d, bytes_sent=b, rounds=r) for n, s, d, b, r in tracer.spans]
        out.put(pb2.HeServerMessage(result=pb2.HeResult(
            ciphertexts=counts, shapes=shapes, seconds=seconds, bytes_to_client=ops.bytes_to_client,
            bytes_from_client=ops.bytes_from_client, refreshes=ops.refreshes, spans=spans)))
        log.info("HE query on %s (seq %d): %.2f s, %d client trips", m.name, m.seq_len, seconds, ops.refreshes)

    def start(self, port: int, cert: Path | None = None, key: Path | None = None) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=CHANNEL_OPTIONS)
        pb2_grpc.add_HeInferenceServicer_to_server(_Servicer(self), server)
        if cert and key:
            creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
        else:
            log.warning("HE node without TLS (local demo mode): the client token travels in the clear")
            bound = server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        self.server = server
        return bound

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0.5)


class _StreamLink:
    """The refresh link over the query's own stream."""

    def __init__(self, reader: BlobReader, out: queue.Queue) -> None:
        self.reader = reader
        self.out = out
        self.trips = 0

    def refresh(self, items: list) -> list[list[bytes]]:
        self.trips += 1
        self.out.put(pb2.HeServerMessage(refresh=pb2.HeRefreshRequest(
            id=self.trips, inputs=[len(b) for b, _, _ in items], outputs=[c for _, _, c in items],
            gathers=[g is not None for _, g, _ in items])))
        for i, (blobs, gather, _) in enumerate(items):
            for j, b in enumerate(blobs):
                for piece in blob_pieces(pb2.HeBlob, "refresh", i, j, b):
                    self.out.put(pb2.HeServerMessage(blob=piece))
            if gather is not None:
                for piece in blob_pieces(pb2.HeBlob, "gather", i, 0, gather.astype("<i4").tobytes()):
                    self.out.put(pb2.HeServerMessage(blob=piece))
        return [[self.reader.read("refresh", i, j) for j in range(count)] for i, (_, _, count) in enumerate(items)]


class _Servicer(pb2_grpc.HeInferenceServicer):
    def __init__(self, node: HeNode) -> None:
        self.node = node

    def Plan(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            self.node.check_token(request.client_token)
            m = self.node.model(request.model, int(request.seq_len))
            p = self.node.plan_for(m)
        except HeRejected as e:
            context.abort(e.code, str(e))
        return pb2.HePlanReply(params_json=json.dumps(p.params.to_dict()), steps=p.steps, refreshes=p.refreshes,
                               depth=p.depth, embeds_input=m.embeds_input)

    def Embedding(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        try:
            self.node.check_token(request.client_token)
            tables = [m.table for (name, _), m in self.node.models.items() if name == request.model]
            if not tables:
                raise HeRejected(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}")
        except HeRejected as e:
            context.abort(e.code, str(e))
        yield from tensor_chunks(tables[0].to(torch.float32), pb2.TensorChunk)

    def Health(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb2.HealthReply(live=True, ready=True, detail=f"{len(self.node.models)} compiled models",
                               running_queries=self.node.running)

    def Query(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        if not self.node.slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many HE queries running; retry later")
        out: queue.Queue = queue.Queue()
        failure: list[tuple[grpc.StatusCode, str]] = []

        def work() -> None:
            self.node.running += 1
            try:
                self.node.serve(request_iterator, out)
            except HeRejected as e:
                failure.append((e.code, str(e)))
            except (WireError, HeFormatError) as e:
                failure.append((grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            except InterpreterError as e:
                failure.append((grpc.StatusCode.INVALID_ARGUMENT if isinstance(e.__cause__, HeFormatError)
                                else grpc.StatusCode.INTERNAL, str(e)))
            except Exception as e:  # the node must keep serving whatever one query did
                log.exception("HE query failed")
                failure.append((grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
            finally:
                self.node.running -= 1
                self.node.slots.release()
                out.put(_END)

        threading.Thread(target=work, daemon=True, name="he-query").start()
        while True:
            msg = out.get()
            if msg is _END:
                break
            yield msg
        if failure:
            context.abort(*failure[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (2 layers, hidden 128) or a distilled model folder")
    ap.add_argument("--seq", type=int, nargs="+", default=[16])
    ap.add_argument("--port", type=int, default=50070)
    ap.add_argument("--token-file", type=Path, required=True)
    ap.add_argument("--cert", type=Path)
    ap.add_argument("--key", type=Path)
    ap.add_argument("--max-concurrent", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s he-node %(levelname)s %(message)s")
    models = {}
    for seq in args.seq:
        m = tiny_he_model(seq) if args.model == "tiny" else distilled_he_model(args.model, seq)
        models[(args.model, seq)] = m
    node = HeNode(models, args.token_file.read_text().strip(), args.max_concurrent)
    port = node.start(args.port, args.cert, args.key)
    log.info("HE node serving %s on 127.0.0.1:%d", sorted(models), port)
    node.server.wait_for_termination()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
