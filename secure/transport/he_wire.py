"""The HE query stream on the wire, both directions (``HeInference.Query``, one
bidirectional gRPC stream):

client -> node   the start (model, sequence length, the public attention mask, the number
                 of input ciphertexts), the public context, the input ciphertexts; then,
                 for every refresh request, the fresh ciphertexts of each item
node -> client   progress; refresh requests (per item: the masked ciphertexts, an optional
                 int32 gather index, the ciphertexts wanted back, the bound B and the mask
                 amplitude M; the node's name); at the end every output's ciphertexts and
                 int64 slot index, then the result (counts, shapes, seconds, bytes, client
                 trips, per-node spans)

Byte strings (context, ciphertexts, indices) travel as ``HeBlob`` pieces well under gRPC's
message limit (:func:`blob_pieces`) and are put back together with checks
(:class:`BlobReader`). :class:`NodeStream` is the node's end of a query, :class:`ClientStream`
the client's: each writes what its side sends and reads what the other side sends. The
generated messages come in as the ``pb2`` module: this module never imports ``protos``,
``party``, ``client`` or ``secure.he``. Malformed messages raise :class:`WireError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from secure.profile.profiler import Span
from secure.transport.wire import WireError

PIECE_BYTES = 2 << 20
"""At most this many bytes per HeBlob message (gRPC's default limit is 4 MiB)."""

RefreshItem = tuple[list[bytes], np.ndarray | None, int]
"""One item of a refresh request: masked ciphertexts, gather index (int64) or None, ciphertexts wanted back."""


def blob_pieces(make: Callable[..., Any], kind: str, item: int, seq: int, data: bytes,
                piece: int = PIECE_BYTES) -> Iterator[Any]:
    """HeBlob messages carrying ``data``; every piece but the last has ``more`` set."""
    count = max(1, -(-len(data) // piece))
    for i in range(count):
        yield make(kind=kind, item=item, seq=seq, data=data[i * piece:(i + 1) * piece], more=i < count - 1)


def _blob_of(message: Any) -> Any | None:
    return message.blob if message.WhichOneof("msg") == "blob" else None


class BlobReader:
    """Reads whole blobs from a message stream; ``blob_of(message)`` returns the HeBlob a
    message carries or None (another message where a blob was expected: a :class:`WireError`)."""

    def __init__(self, messages: Iterator[Any], blob_of: Callable[[Any], Any | None], max_bytes: int) -> None:
        self.messages = messages
        self.blob_of = blob_of
        self.max_bytes = max_bytes

    def next_message(self) -> Any:
        try:
            return next(self.messages)
        except StopIteration:
            raise WireError("the stream ended in the middle of a query") from None

    def read(self, kind: str, item: int, seq: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            blob = self.blob_of(self.next_message())
            if blob is None:
                raise WireError(f"expected {kind} data (item {item}, ciphertext {seq}), got another message")
            if (blob.kind, blob.item, blob.seq) != (kind, item, seq):
                raise WireError(f"expected {kind} item {item} ciphertext {seq}, got {blob.kind!r} item "
                                f"{blob.item} ciphertext {blob.seq}")
            size += len(blob.data)
            if size > self.max_bytes:
                raise WireError(f"{kind} data exceeds {self.max_bytes} bytes")
            parts.append(blob.data)
            if not blob.more:
                return b"".join(parts)


# ---- what a query carries, decoded ---------------------------------------------------------------
@dataclass(frozen=True)
class QueryStart:
    """The first message of a query (the mask still as bytes: :meth:`attention_mask` checks it)."""

    model: str
    seq_len: int
    input_ciphertexts: int
    mask_bytes: bytes

    def attention_mask(self) -> torch.Tensor:
        """The public attention mask, [1, seq_len] int64 of 0 and 1."""
        if len(self.mask_bytes) != 8 * self.seq_len:
            raise WireError(f"attention mask must be {self.seq_len} int64 values")
        mask = torch.from_numpy(np.frombuffer(self.mask_bytes, dtype="<i8").copy()).view(1, self.seq_len)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise WireError("attention mask must hold 0 and 1 only")
        return mask


@dataclass(frozen=True)
class QueryProgress:
    done: int
    total: int
    stage: str


@dataclass(frozen=True)
class RefreshRequest:
    """One refresh the node asks for: its items, and what the client checks every slot against
    (the node's name, B and M per item)."""

    items: list[RefreshItem]
    node: str
    bounds: list[float]
    masks: list[float]


@dataclass(frozen=True)
class QueryResult:
    """The end of a query: per output its ciphertexts and slot index (shaped as the output),
    and the node's account of the query."""

    outputs: list[tuple[list[bytes], torch.Tensor]]
    seconds: float
    bytes_to_client: int
    bytes_from_client: int
    refreshes: int
    spans: list[Span]


# ---- the node's end ------------------------------------------------------------------------------
class NodeStream:
    """The node's end of one query: ``requests`` are the client's messages, ``emit`` sends one
    of the node's. The public context may take ``max_context_bytes``; every blob after it
    (ciphertexts) at most ``max_ciphertext_bytes``."""

    def __init__(self, pb2: Any, requests: Iterator[Any], emit: Callable[[Any], None], max_context_bytes: int,
                 max_ciphertext_bytes: int) -> None:
        self.pb2 = pb2
        self.emit = emit
        self.reader = BlobReader(requests, _blob_of, max_context_bytes)
        self.max_ciphertext_bytes = max_ciphertext_bytes

    def read_start(self) -> QueryStart:
        first = self.reader.next_message()
        if first.WhichOneof("msg") != "start":
            raise WireError("the first message of a query must be its start")
        s = first.start
        return QueryStart(s.model, int(s.seq_len), int(s.input_ciphertexts), bytes(s.attention_mask))

    def read_context(self) -> bytes:
        context = self.reader.read("context", 0, 0)
        self.reader.max_bytes = self.max_ciphertext_bytes
        return context

    def inputs(self, count: int) -> Iterator[bytes]:
        """The input ciphertexts, one at a time as they arrive."""
        for i in range(count):
            yield self.reader.read("input", 0, i)

    def send_progress(self, done: int, total: int, stage: str) -> None:
        self.emit(self.pb2.HeServerMessage(progress=self.pb2.Progress(done=done, total=total, stage=stage)))

    def send_refresh(self, trip: int, items: list[RefreshItem], node: str, bounds: list[float],
                     masks: list[float]) -> None:
        """Refresh request number ``trip``, then every item's ciphertexts and gather index."""
        self.emit(self.pb2.HeServerMessage(refresh=self.pb2.HeRefreshRequest(
            id=trip, inputs=[len(b) for b, _, _ in items], outputs=[c for _, _, c in items],
            gathers=[g is not None for _, g, _ in items], bounds=bounds, masks=masks, node=node)))
        for i, (blobs, gather, _) in enumerate(items):
            for j, b in enumerate(blobs):
                self._send_blob("refresh", i, j, b)
            if gather is not None:
                self._send_blob("gather", i, 0, gather.astype("<i4").tobytes())

    def read_refresh_reply(self, counts: list[int]) -> list[list[bytes]]:
        """The client's fresh ciphertexts, ``counts[i]`` for item i."""
        return [[self.reader.read("refresh", i, j) for j in range(count)] for i, count in enumerate(counts)]

    def send_result(self, result: QueryResult) -> None:
        """Every output's ciphertexts and index, then the result message."""
        for i, (cts, index) in enumerate(result.outputs):
            for j, b in enumerate(cts):
                self._send_blob("output", i, j, b)
            self._send_blob("index", i, 0, index.numpy().astype("<i8").tobytes())
        pb2 = self.pb2
        self.emit(pb2.HeServerMessage(result=pb2.HeResult(
            ciphertexts=[len(cts) for cts, _ in result.outputs],
            shapes=[json.dumps(list(index.shape)) for _, index in result.outputs], seconds=result.seconds,
            bytes_to_client=result.bytes_to_client, bytes_from_client=result.bytes_from_client,
            refreshes=result.refreshes, spans=[s.to_proto(pb2.Span) for s in result.spans])))

    def _send_blob(self, kind: str, item: int, seq: int, data: bytes) -> None:
        for piece in blob_pieces(self.pb2.HeBlob, kind, item, seq, data):
            self.emit(self.pb2.HeServerMessage(blob=piece))


# ---- the client's end ----------------------------------------------------------------------------
class ClientStream:
    """The client's end of one query: ``send`` puts one of its messages on the request stream,
    ``responses`` are the node's messages (blobs up to ``max_bytes``)."""

    def __init__(self, pb2: Any, send: Callable[[Any], None], responses: Iterator[Any],
                 max_bytes: int = 1 << 30) -> None:
        self.pb2 = pb2
        self.send = send
        self.reader = BlobReader(responses, _blob_of, max_bytes)
        self._outputs: dict[tuple[str, int, int], list[bytes]] = {}

    def send_start(self, model: str, seq_len: int, attention_mask: torch.Tensor, context: bytes,
                   inputs: list[bytes]) -> None:
        """The start, the public context and the input ciphertexts."""
        mask = attention_mask.to(torch.int64).numpy().astype("<i8").tobytes()
        self.send(self.pb2.HeClientMessage(start=self.pb2.HeStart(
            model=model, seq_len=seq_len, input_ciphertexts=len(inputs), attention_mask=mask)))
        self._send_blob("context", 0, 0, context)
        for i, b in enumerate(inputs):
            self._send_blob("input", 0, i, b)

    def send_refresh_reply(self, fresh: list[list[bytes]]) -> None:
        """The fresh ciphertexts of every item of the last refresh request."""
        for i, cts in enumerate(fresh):
            for j, b in enumerate(cts):
                self._send_blob("refresh", i, j, b)

    def next_event(self) -> QueryProgress | RefreshRequest | QueryResult:
        """The node's next progress report, refresh request or result; output pieces are kept
        until the result gives their counts and shapes."""
        while True:
            msg = self.reader.next_message()
            kind = msg.WhichOneof("msg")
            if kind == "blob" and msg.blob.kind in ("output", "index"):
                self._outputs.setdefault((msg.blob.kind, msg.blob.item, msg.blob.seq), []).append(msg.blob.data)
            elif kind == "progress":
                return QueryProgress(msg.progress.done, msg.progress.total, msg.progress.stage)
            elif kind == "refresh":
                return self._refresh_request(msg.refresh)
            elif kind == "result":
                return self._result(msg.result)
            else:
                raise WireError(f"unexpected message from the server: {kind}")

    def _refresh_request(self, r: Any) -> RefreshRequest:
        items: list[RefreshItem] = []
        for i in range(len(r.inputs)):
            cts = [self.reader.read("refresh", i, j) for j in range(r.inputs[i])]
            gather = None
            if r.gathers[i]:
                gather = np.frombuffer(self.reader.read("gather", i, 0), dtype="<i4").astype(np.int64)
            items.append((cts, gather, r.outputs[i]))
        return RefreshRequest(items, r.node, list(r.bounds), list(r.masks))

    def _result(self, res: Any) -> QueryResult:
        outputs = []
        for i, count in enumerate(res.ciphertexts):
            shape = json.loads(res.shapes[i])
            index = np.frombuffer(b"".join(self._outputs.pop(("index", i, 0), [])), dtype="<i8")
            if index.size != int(np.prod(shape)):
                raise WireError(f"output {i}: index of {index.size} entries for shape {shape}")
            cts = [b"".join(self._outputs.pop(("output", i, j), [])) for j in range(count)]
            outputs.append((cts, torch.from_numpy(index.copy()).view(shape)))
        return QueryResult(outputs, res.seconds, res.bytes_to_client, res.bytes_from_client, res.refreshes,
                           [Span.from_proto(s) for s in res.spans])

    def _send_blob(self, kind: str, item: int, seq: int, data: bytes) -> None:
        for piece in blob_pieces(self.pb2.HeBlob, kind, item, seq, data):
            self.send(self.pb2.HeClientMessage(blob=piece))
