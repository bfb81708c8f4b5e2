"""Tensors on the wire: raw little-endian bytes in bounded chunks, and their checked
reassembly.

Every chunk is far below gRPC's default 4 MB message limit, so a tensor of any size
travels as a stream of chunks; the receiver checks each chunk's dtype, shape and byte
count, refuses tensors above its configured size, and never evaluates anything it
receives (no pickle).

Two forms: :func:`tensor_chunks` / :class:`TensorAssembler` carry one tensor per chunk
stream (client inputs and outputs); :func:`message_parts` / :class:`MessageAssembler`
carry a whole peer message (a list of tensors) as its tensors' bytes concatenated, split
into parts only above the part limit, with the dtype and shape of every tensor listed
once (the peer links: one frame per protocol message in the common case).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

CHUNK_BYTES = 1 << 20  # 1 MiB per chunk
PART_BYTES = 3 << 20  # a peer message above 3 MiB is split into parts (the links accept 8 MiB frames)
MAX_TENSORS = 1024  # tensors in one peer message
DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8,
    "float64": torch.float64, "float32": torch.float32, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A received tensor is malformed: unknown dtype, inconsistent shape or size, too big."""


def tensor_chunks(t: torch.Tensor, chunk_message: Any, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Any]:
    """Yield ``chunk_message`` protobufs (TensorChunk) carrying ``t``."""
    if t.dtype not in _NAMES:
        raise WireError(f"cannot send dtype {t.dtype}")
    data = t.detach().contiguous().cpu().numpy().tobytes()
    count = max(1, -(-len(data) // chunk_bytes))
    for i in range(count):
        yield chunk_message(dtype=_NAMES[t.dtype], shape=list(t.shape), chunk_index=i,
                            chunk_count=count, data=data[i * chunk_bytes:(i + 1) * chunk_bytes])


@dataclass
class TensorAssembler:
    """Collects the chunks of one tensor; ``max_bytes`` bounds what a peer may make us hold."""

    max_bytes: int
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    count: int = 0
    parts: list[bytes] = field(default_factory=list)

    def add(self, chunk: Any) -> torch.Tensor | None:
        """Add one TensorChunk; returns the tensor once complete."""
        if chunk.dtype not in DTYPES:
            raise WireError(f"unknown dtype {chunk.dtype!r}")
        shape = tuple(int(s) for s in chunk.shape)
        if any(s < 0 for s in shape):
            raise WireError(f"negative dimension in shape {shape}")
        if self.dtype is None:
            self.dtype, self.shape, self.count = chunk.dtype, shape, int(chunk.chunk_count)
            nbytes = _nbytes(shape, self.dtype)
            if nbytes > self.max_bytes:
                raise WireError(f"tensor of {nbytes} bytes exceeds the limit of {self.max_bytes} bytes")
            if self.count < 1 or self.count > max(1, -(-nbytes // 1024)) + 1:
                raise WireError(f"implausible chunk count {self.count} for {nbytes} bytes")
        elif (chunk.dtype, shape, int(chunk.chunk_count)) != (self.dtype, self.shape, self.count):
            raise WireError("chunks of one tensor disagree on dtype, shape or count")
        if int(chunk.chunk_index) != len(self.parts):
            raise WireError(f"chunk {chunk.chunk_index} arrived, expected {len(self.parts)}")
        self.parts.append(bytes(chunk.data))
        if len(self.parts) < self.count:
            return None
        data = b"".join(self.parts)
        expected = _nbytes(self.shape, self.dtype)
        if len(data) != expected:
            raise WireError(f"tensor data is {len(data)} bytes, shape {list(self.shape)} of "
                            f"{self.dtype} needs {expected}")
        np_dtype = np.dtype("bool" if self.dtype == "bool" else self.dtype).newbyteorder("<")
        array = np.frombuffer(data, dtype=np_dtype).reshape(self.shape)
        return torch.from_numpy(array.copy())


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty(0, dtype=DTYPES[dtype]).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t``: a view of its memory when it is a contiguous CPU
    tensor (no copy), else of a contiguous CPU copy."""
    if t.dtype not in _NAMES:
        raise WireError(f"cannot send dtype {t.dtype}")
    array = t.detach().cpu().contiguous().numpy()
    if sys.byteorder != "little" and array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8))


def message_parts(tensors: list[torch.Tensor], part_bytes: int = PART_BYTES
                  ) -> tuple[list[tuple[str, tuple[int, ...]]], list[list[memoryview]]]:
    """(dtype name and shape of every tensor, the parts of their concatenated bytes).

    Each part is a list of memoryviews (no copy yet) holding at most ``part_bytes`` bytes;
    a message always has at least one part (an empty one for no tensors or no bytes). The
    views alias the tensors: the caller copies them out before the tensors may change.
    """
    if len(tensors) > MAX_TENSORS:
        raise WireError(f"a message holds at most {MAX_TENSORS} tensors, got {len(tensors)}")
    specs = [(_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for t in tensors]
    views = [tensor_bytes(t) for t in tensors]
    parts: list[list[memoryview]] = [[]]
    room = part_bytes
    for view in views:
        while len(view):
            if room == 0:
                parts.append([])
                room = part_bytes
            piece, view = view[:room], view[room:]
            parts[-1].append(piece)
            room -= len(piece)
    return specs, parts


class MessageAssembler:
    """Collects the parts of one peer message, checking every declared dtype, shape and size
    against the bytes that arrive; ``max_bytes`` bounds what a peer may make us hold."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...]]], part_count: int, max_bytes: int) -> None:
        if len(specs) > MAX_TENSORS:
            raise WireError(f"a message holds at most {MAX_TENSORS} tensors, got {len(specs)}")
        self.specs: list[tuple[str, tuple[int, ...]]] = []
        total = 0
        for dtype, shape in specs:
            if dtype not in DTYPES:
                raise WireError(f"unknown dtype {dtype!r}")
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise WireError(f"negative dimension in shape {list(shape)}")
            total += _nbytes(shape, dtype)
            if total > max_bytes:
                raise WireError(f"message of at least {total} bytes exceeds the limit of {max_bytes} bytes")
            self.specs.append((dtype, shape))
        if part_count < 1 or part_count > max(1, total):  # no part without data
            raise WireError(f"implausible part count {part_count} for {total} bytes")
        self.total = total
        self.count = part_count
        self.received = 0
        self.filled = 0
        self._buffer: bytearray | None = None

    def add(self, part_index: int, part_count: int, data: bytes) -> list[torch.Tensor] | None:
        """Add one part; returns the message's tensors once complete."""
        if part_count != self.count:
            raise WireError(f"parts of one message disagree on their count ({part_count} != {self.count})")
        if part_index != self.received:
            raise WireError(f"part {part_index} arrived, expected {self.received}")
        if not data and self.total:
            raise WireError(f"part {part_index} carries no data")
        if self.filled + len(data) > self.total:
            raise WireError(f"message data exceeds the {self.total} bytes its tensors need")
        self.received += 1
        if self.received == self.count == 1:
            buffer = bytearray(data)  # the common case: one part, one copy into writable memory
        else:
            if self._buffer is None:
                self._buffer = bytearray(self.total)
            self._buffer[self.filled:self.filled + len(data)] = data
            buffer = self._buffer
        self.filled += len(data)
        if self.received < self.count:
            return None
        if self.filled != self.total:
            raise WireError(f"message data is {self.filled} bytes, its tensors need {self.total}")
        self._buffer = None
        return _split(buffer, self.specs)


def _split(buffer: bytearray, specs: list[tuple[str, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Tensors viewing consecutive slices of ``buffer`` (copied only where misaligned)."""
    out = []
    offset = 0
    for dtype, shape in specs:
        np_dtype = np.dtype("bool" if dtype == "bool" else dtype).newbyteorder("<")
        count = 1
        for s in shape:
            count *= s
        array = np.frombuffer(buffer, dtype=np_dtype, count=count, offset=offset).reshape(shape)
        offset += count * np_dtype.itemsize
        if not array.flags.aligned or not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        out.append(torch.from_numpy(array))
    return out
