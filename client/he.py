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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from client.sdk import CHANNEL_OPTIONS, QueryFailed
from party.config import TOKEN_METADATA_KEY, HeNodeConfig
from protos import load
from secure.he.client import HeClient, RefreshCheck
from secure.he.params import CkksParams
from secure.he.pool import ClientPool, HeWorkerError
from secure.profile.profiler import Span
from secure.transport.he_wire import ClientStream, QueryResult, RefreshRequest
from secure.transport.wire import TensorAssembler, WireError

pb2, pb2_grpc = load()


@dataclass
class HeQueryResult:
    outputs: list[torch.Tensor]
    seconds: float
    server_seconds: float
    refreshes: int
    bytes_up: int
    bytes_down: int
    spans: list[Span] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class HeSecureClient:
    """One HE server, over TLS with ``root_cert`` (the server's certificate authority),
    expecting ``server_name`` in its certificate; plaintext only with ``insecure=True``.
    The token travels in the call metadata. ``workers``: processes of this client's own
    that share each refresh's decryptions and encryptions (:class:`secure.he.pool.ClientPool`;
    they hold the query's secret key; MiniLM at 16 tokens, measured in process: the client's
    refresh work 9.5 s alone, 6.0 s with one worker on a second core)."""

    def __init__(self, target: str, token: str, timeout_s: float | None = None,
                 root_cert: bytes | None = None, server_name: str = "he-node", insecure: bool = False,
                 workers: int = 0) -> None:
        self.metadata = ((TOKEN_METADATA_KEY, token),)
        self.pool = ClientPool(workers) if workers else None
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
                    insecure: bool = False, workers: int = 0) -> HeSecureClient:
        """A client for the node that ``cfg`` describes."""
        cfg.require_tls(insecure)
        root = cfg.ca.read_bytes() if cfg.ca is not None else None
        return HeSecureClient(cfg.address, token, timeout_s, root, cfg.server_name, insecure, workers)

    def __enter__(self) -> HeSecureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        if self.pool is not None:
            self.pool.close()

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
        """One query: the plan, keys, the encrypted embedded rows up, the node's refreshes
        answered (``progress(done, total)`` on its reports), the outputs decrypted."""
        t_start = time.perf_counter()
        seq = int(input_ids.shape[-1])
        p = self.plan(model, seq)
        rows = self._rows(model, input_ids)
        timings: dict[str, float] = {}
        with _timed(timings, "keygen"):
            keys = HeClient(CkksParams.from_dict(json.loads(p.params_json)), p.steps)
            keys.pool = self.pool
            context = keys.public_context()
        with _timed(timings, "encrypt"):
            blobs, _ = keys.encrypt(rows.view(1, seq, -1))
        call = _QueryCall()
        try:
            stream = ClientStream(pb2, call.send, call.responses(self.stub, self.metadata, self.timeout_s))
            stream.send_start(model, seq, attention_mask, context, blobs)
            result = _answer_refreshes(stream, keys, progress)
        except grpc.RpcError as e:
            raise QueryFailed(f"HE server: {e.details()}", e.code()) from e
        except (WireError, HeWorkerError) as e:
            raise QueryFailed(str(e)) from e
        finally:
            call.close()
        outputs = [keys.decrypt(cts, index) for cts, index in result.outputs]
        return HeQueryResult(outputs, time.perf_counter() - t_start, result.seconds, result.refreshes, call.up,
                             call.down, result.spans, timings)

    def _rows(self, model: str, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding table's rows of the ids, looked up here (the table is fetched once)."""
        table = self.table(model)
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= table.shape[0]:
            raise ValueError(f"token ids must lie in [0, {table.shape[0]})")
        return table[input_ids.long()]


class _QueryCall:
    """One Query stream's request queue and the bytes sent and received on it."""

    def __init__(self) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.up = 0
        self.down = 0

    def send(self, msg: Any) -> None:
        self.up += msg.ByteSize()
        self.requests.put(msg)

    def close(self) -> None:
        self.requests.put(None)

    def _requests(self) -> Iterator[Any]:
        while (msg := self.requests.get()) is not None:
            yield msg

    def responses(self, stub: Any, metadata: Any, timeout_s: float | None) -> Iterator[Any]:
        """The node's messages; the call starts at the first one asked for."""
        for msg in stub.Query(self._requests(), metadata=metadata, timeout=timeout_s):
            self.down += msg.ByteSize()
            yield msg


def _answer_refreshes(stream: ClientStream, keys: HeClient,
                      progress: Callable[[int, int], None] | None) -> QueryResult:
    """Answer the node's refresh requests (one beyond its stated bound is refused:
    :class:`secure.he.client.RefreshBoundError`) and pass on its progress, until the result."""
    while True:
        event = stream.next_event()
        if isinstance(event, QueryResult):
            return event
        if isinstance(event, RefreshRequest):
            stream.send_refresh_reply(keys.refresh(event.items, RefreshCheck(event.node, event.bounds, event.masks)))
        elif progress is not None:
            progress(event.done, event.total)


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - t
