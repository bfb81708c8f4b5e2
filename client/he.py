"""Client SDK for HE queries: keys stay here, the server sees ciphertexts only.

    with HeSecureClient.from_config(HeNodeConfig.load("he.json"), token) as c:
        result = c.query("tiny", input_ids, attention_mask)

Steps: ask the server for the plan (CKKS parameters and rotation steps for this model
and length), fetch the embedding table once (HE mode discloses it: DESIGN.md sec. 1),
generate keys, look the ids up locally, encrypt, stream the public context and the
ciphertexts, answer the server's refresh requests (decrypt masked values, re-arrange,
re-encrypt) and decrypt the result.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from client.sdk import CHANNEL_OPTIONS, QueryFailed
from party.config import TOKEN_METADATA_KEY, HeNodeConfig
from protos import load
from secure.he.client import HeClient
from secure.he.params import CkksParams
from secure.transport.he_wire import BlobReader, blob_pieces
from secure.transport.wire import TensorAssembler

pb2, pb2_grpc = load()


@dataclass
class HeQueryResult:
    outputs: list[torch.Tensor]
    seconds: float
    server_seconds: float
    refreshes: int
    bytes_up: int
    bytes_down: int
    spans: list[tuple[str, float, float, int, int]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class HeSecureClient:
    """One HE server, over TLS with ``root_cert`` (the server's certificate authority),
    expecting ``server_name`` in its certificate; plaintext only with ``insecure=True``.
    The token travels in the call metadata."""

    def __init__(self, target: str, token: str, timeout_s: float | None = None,
                 root_cert: bytes | None = None, server_name: str = "he-node", insecure: bool = False) -> None:
        self.metadata = ((TOKEN_METADATA_KEY, token),)
        self.timeout_s = timeout_s
        if root_cert is None:
            if not insecure:
                raise ValueError(f"no CA certificate for the HE node at {target}: refusing to send the query in "
                                 "plaintext (give the configuration a tls section, or insecure=True for a local demo)")
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name)]
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options=options)
        self.stub = pb2_grpc.HeInferenceStub(self.channel)
        self._tables: dict[str, torch.Tensor] = {}

    @staticmethod
    def from_config(cfg: HeNodeConfig, token: str, timeout_s: float | None = None,
                    insecure: bool = False) -> HeSecureClient:
        """A client for the node that ``cfg`` describes."""
        cfg.require_tls(insecure)
        root = cfg.ca.read_bytes() if cfg.ca is not None else None
        return HeSecureClient(cfg.address, token, timeout_s, root, cfg.server_name, insecure)

    def __enter__(self) -> HeSecureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except grpc.RpcError as e:
            raise QueryFailed(f"HE server: {e.details()}", e.code()) from e

    def plan(self, model: str, seq_len: int) -> Any:
        return self._call(lambda: self.stub.Plan(pb2.HePlanRequest(model=model, seq_len=seq_len),
                                                   metadata=self.metadata, timeout=60))

    def table(self, model: str) -> torch.Tensor:
        if model not in self._tables:
            def fetch() -> torch.Tensor:
                asm = TensorAssembler(max_bytes=1 << 30)
                t = None
                for chunk in self.stub.Embedding(pb2.HeEmbeddingRequest(model=model), metadata=self.metadata,
                                                 timeout=120):
                    t = asm.add(chunk)
                if t is None:
                    raise QueryFailed("the server sent an incomplete embedding table")
                return t
            self._tables[model] = self._call(fetch).to(torch.float64)
        return self._tables[model]

    def query(self, model: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              progress: Callable[[int, int], None] | None = None) -> HeQueryResult:
        t_start = time.perf_counter()
        seq = int(input_ids.shape[-1])
        p = self.plan(model, seq)
        table = self.table(model)
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= table.shape[0]:
            raise ValueError(f"token ids must lie in [0, {table.shape[0]})")
        timings = {}
        t = time.perf_counter()
        keys = HeClient(CkksParams.from_dict(json.loads(p.params_json)), p.steps)
        context = keys.public_context()
        timings["keygen"] = time.perf_counter() - t
        t = time.perf_counter()
        blobs, _ = keys.encrypt(table[input_ids.long()].view(1, seq, -1))
        timings["encrypt"] = time.perf_counter() - t
        requests: queue.Queue = queue.Queue()
        up = [0]

        def send(msg: Any) -> None:
            up[0] += msg.ByteSize()
            requests.put(msg)

        send(pb2.HeClientMessage(start=pb2.HeStart(
            model=model, seq_len=seq, input_ciphertexts=len(blobs),
            attention_mask=attention_mask.to(torch.int64).numpy().astype("<i8").tobytes())))
        for piece in blob_pieces(pb2.HeBlob, "context", 0, 0, context):
            send(pb2.HeClientMessage(blob=piece))
        for i, b in enumerate(blobs):
            for piece in blob_pieces(pb2.HeBlob, "input", 0, i, b):
                send(pb2.HeClientMessage(blob=piece))

        def request_stream() -> Iterator[Any]:
            while True:
                msg = requests.get()
                if msg is None:
                    return
                yield msg

        responses = self.stub.Query(request_stream(), metadata=self.metadata, timeout=self.timeout_s)
        down = [0]

        def counted() -> Iterator[Any]:
            for msg in responses:
                down[0] += msg.ByteSize()
                yield msg

        reader = BlobReader(counted(), lambda m: m.blob if m.WhichOneof("msg") == "blob" else None, 1 << 30)
        pieces: dict[tuple[str, int, int], list[bytes]] = {}
        try:
            while True:
                msg = reader.next_message()
                kind = msg.WhichOneof("msg")
                if kind == "progress":
                    if progress is not None:
                        progress(msg.progress.done, msg.progress.total)
                elif kind == "refresh":
                    r = msg.refresh
                    items = []
                    for i in range(len(r.inputs)):
                        cts = [reader.read("refresh", i, j) for j in range(r.inputs[i])]
                        gather = None
                        if r.gathers[i]:
                            gather = np.frombuffer(reader.read("gather", i, 0), dtype="<i4").astype(np.int64)
                        items.append((cts, gather, r.outputs[i]))
                    for i, fresh in enumerate(keys.refresh(items)):
                        for j, b in enumerate(fresh):
                            for piece in blob_pieces(pb2.HeBlob, "refresh", i, j, b):
                                send(pb2.HeClientMessage(blob=piece))
                elif kind == "blob" and msg.blob.kind in ("output", "index"):
                    pieces.setdefault((msg.blob.kind, msg.blob.item, msg.blob.seq), []).append(msg.blob.data)
                elif kind == "result":
                    res = msg.result
                    outputs = []
                    for i, count in enumerate(res.ciphertexts):
                        shape = json.loads(res.shapes[i])
                        index = np.frombuffer(b"".join(pieces.pop(("index", i, 0), [])), dtype="<i8")
                        if index.size != int(np.prod(shape)):
                            raise QueryFailed(f"output {i}: index of {index.size} entries for shape {shape}")
                        cts = [b"".join(pieces.pop(("output", i, j), [])) for j in range(count)]
                        outputs.append(keys.decrypt(cts, torch.from_numpy(index.copy()).view(shape)))
                    return HeQueryResult(outputs, time.perf_counter() - t_start, res.seconds, res.refreshes, up[0],
                                         down[0], [(s.name, s.start, s.seconds, s.bytes_sent, s.rounds)
                                                   for s in res.spans], timings)
                else:
                    raise QueryFailed(f"unexpected message from the server: {kind}")
        except grpc.RpcError as e:
            raise QueryFailed(f"HE server: {e.details()}", e.code()) from e
        finally:
            requests.put(None)
