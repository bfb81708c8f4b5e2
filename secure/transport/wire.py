"""Tensors on the wire: raw little-endian bytes in bounded chunks, and their checked
reassembly.

Every chunk is far below gRPC's default 4 MB message limit, so a tensor of any size
travels as a stream of chunks; the receiver checks each chunk's dtype, shape and byte
count, refuses tensors above its configured size, and never evaluates anything it
receives (no pickle).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

CHUNK_BYTES = 1 << 20  # 1 MiB per chunk
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
