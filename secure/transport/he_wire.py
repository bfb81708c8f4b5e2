"""Opaque HE byte strings (public contexts, ciphertexts, gather indices) over gRPC:
split into pieces well under gRPC's message limit and put back together with checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from secure.transport.wire import WireError

PIECE_BYTES = 2 << 20
"""At most this many bytes per HeBlob message (gRPC's default limit is 4 MiB)."""


def blob_pieces(make: Callable[..., Any], kind: str, item: int, seq: int, data: bytes,
                piece: int = PIECE_BYTES) -> Iterator[Any]:
    """HeBlob messages carrying ``data``; every piece but the last has ``more`` set."""
    count = max(1, -(-len(data) // piece))
    for i in range(count):
        yield make(kind=kind, item=item, seq=seq, data=data[i * piece:(i + 1) * piece], more=i < count - 1)


class BlobReader:
    """Reads whole blobs from a message stream; ``blob_of(message)`` returns the HeBlob a
    message carries or None (then ``other`` receives the message)."""

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
