"""Lazy rank weights: a tp rank's slice of an external weight, read from the source only when saved.

Partitioning a model must not hold the model in memory. A rank's weight is described here by
where its bytes live in the source's external data file, and streamed from there into a plan file
(`plan/data_files.py` for a plan; `tofile`, what onnx_ir's saver calls, for a single model) through
at most `CHUNK_BYTES` at a time, so the partitioner's peak memory is a few chunks, whatever the
model's size.

* A slice whose pieces are long contiguous byte runs (a split of axis 0: row-parallel weights, a
  vocabulary split of the embedding) is copied run by run with `os.copy_file_range`: the bytes
  never enter this process (`copy_runs`).
* A slice whose pieces are short (a split of the last axis: column-parallel weights) is gathered
  a window of whole rows at a time (`gather_slices`): the rows are mapped, numpy copies each
  slice's columns into a reused buffer, which is written. Several slices of one weight (the tp
  ranks' shares) are gathered from the same window, so the rows are read once for all of them.
* `numpy()` and `tobytes()` still give the whole slice (tests and small models use them).
* Packed zero points of int4/int2 MatMulNBits whose rank share starts or ends inside a byte are no
  slice of the source's bytes: `packed_rank_elements` reads the bytes that hold a rank's blocks and
  re-packs them (a small per-rank tensor, a few bits per quantization block).

Pages a process maps count in its resident set until unmapped, so no mapping outlives its window:
reading a 100 GB model through one mapping would look (and, under memory pressure, act) like
holding it.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

import numpy as np
import onnx_ir as ir

from llmir_onnx.placement import Partial, Placement, Shard, shard_array

# Bytes a tensor write holds in this process at once (one mapped window of rows, or one read buffer).
CHUNK_BYTES = 8 << 20
# Byte runs at least this long are copied one by one (in the kernel where possible); shorter ones
# are gathered from blocks of whole rows.
LONG_RUN_BYTES = 256 << 10


def copy_range_at(source_fd: int, source_offset: int, length: int, target_fd: int, target_offset: int) -> None:
    """Copy `length` bytes between two files at explicit offsets (in the kernel where possible)."""
    copied = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    if copy_file_range is not None:
        try:
            while copied < length:
                step = copy_file_range(
                    source_fd,
                    target_fd,
                    min(1 << 30, length - copied),
                    offset_src=source_offset + copied,
                    offset_dst=target_offset + copied,
                )
                if step == 0:
                    break
                copied += step
        except OSError:
            pass  # another filesystem, or one that refuses: the buffered copy below does the rest
    while copied < length:
        chunk = os.pread(source_fd, min(CHUNK_BYTES, length - copied), source_offset + copied)
        if not chunk:
            raise OSError(f"external data ends {length - copied} bytes early at offset {source_offset + copied}")
        pwrite_all(target_fd, chunk, target_offset + copied)
        copied += len(chunk)


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def gather_slices(
    slices: Sequence[ExternalSlice], write: Callable[[int, memoryview], object], rows: tuple[int, int] | None = None
) -> None:
    """Stream short-run slices of one source weight (same view and axis): `write(index, chunk)` gets the
    bytes of `slices[index]` in order, a window of whole rows at a time; only outer rows [start, stop) of
    `rows` when given (a writer thread's share of a big weight).

    Each window is mapped once for all the slices and unmapped before the next; one output buffer is
    reused (a fresh array per window would page-fault, and zero, every byte again).
    """
    first = slices[0]
    outer, axis, inner_bytes = first.layout()
    row_bytes = axis * inner_bytes
    base = first.source.offset or 0
    rows_per_window = max(1, CHUNK_BYTES // row_bytes)
    widest = max(sum(b - a for a, b in piece.ranges) for piece in slices) * inner_bytes
    out = np.empty(rows_per_window * widest, dtype=np.uint8)
    populate = getattr(mmap, "MAP_POPULATE", 0)  # map the window's pages in one call, not a fault each
    with open(first.source.path, "rb") as source:
        size = os.fstat(source.fileno()).st_size
        if base + outer * row_bytes > size:
            raise OSError(
                f"{first.source.path}: external data ends at byte {size}, inside weight {first.source.name!r} "
                f"(bytes {base}..{base + outer * row_bytes})"
            )
        first_row, stop_row = rows if rows is not None else (0, outer)
        for row in range(first_row, stop_row, rows_per_window):
            count = min(rows_per_window, stop_row - row)
            start = base + row * row_bytes
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            window = mmap.mmap(source.fileno(), start - aligned + count * row_bytes, flags=mmap.MAP_SHARED | populate,
                               prot=mmap.PROT_READ, offset=aligned)  # fmt: skip
            try:
                block = np.frombuffer(window, dtype=np.uint8, count=count * row_bytes, offset=start - aligned)
                block = block.reshape(count, axis, inner_bytes)
                for index, piece in enumerate(slices):
                    local_axis = sum(b - a for a, b in piece.ranges)
                    gathered = out[: count * local_axis * inner_bytes].reshape(count, local_axis, inner_bytes)
                    column = 0
                    for a, b in piece.ranges:
                        np.copyto(gathered[:, column : column + b - a], block[:, a:b])
                        column += b - a
                    write(index, gathered.data)
                del block, gathered
            finally:
                window.close()


class ExternalSlice(ir.LazyTensor):
    """Pieces `ranges` of axis `dim` of an external tensor viewed as `view`, concatenated on that axis.

    The result has the shape `shape` (the sliced view, or flat when the weight was viewed to be split).
    A LazyTensor whose function gathers the whole slice (for `numpy()`); `tofile` streams instead.
    """

    __slots__ = ("_dim", "_ranges", "_source", "_view")

    def __init__(
        self,
        source: ir.ExternalTensor,
        view: Sequence[int],
        dim: int,
        ranges: Sequence[tuple[int, int]],
        shape: Sequence[int],
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(self._gather, dtype=source.dtype, shape=ir.Shape(list(shape)), name=name)
        self._source = source
        self._view = tuple(int(d) for d in view)
        self._dim = dim
        self._ranges = tuple((int(a), int(b)) for a, b in ranges)
        sliced = list(self._view)
        sliced[dim] = sum(stop - start for start, stop in self._ranges)
        if math.prod(sliced) != math.prod(shape):
            raise ValueError(f"slice of {self._view} to {sliced} cannot have the shape {tuple(shape)}")

    @property
    def source(self) -> ir.ExternalTensor:
        return self._source

    @property
    def view(self) -> tuple[int, ...]:
        return self._view

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return self._ranges

    def __repr__(self) -> str:
        return f"{self._repr_base()}(source={self._source!r}, dim={self._dim}, ranges={self._ranges!r})"

    @property
    def is_gathered(self) -> bool:
        """Whether the slice's contiguous runs are too short to copy one by one (see `gather_slices`)."""
        outer, _, inner_bytes = self.layout()
        if outer == 1:
            return False  # one row: each range is a run as long as the slice's share of it
        return min(stop - start for start, stop in self._ranges) * inner_bytes < LONG_RUN_BYTES

    def copy_runs(
        self, source_fd: int, target_fd: int, target_offset: int, window: tuple[int, int] | None = None
    ) -> None:
        """Copy the slice run by run to `target_offset` of `target_fd`, file to file (in the kernel); with
        `window`, only the slice's bytes [start, stop), to the same place as in the whole copy."""
        start, stop = window if window is not None else (0, self.nbytes)
        position = 0  # of the run below in the slice's bytes
        for run_offset, run_length in self.byte_runs():
            first, last = max(start, position), min(stop, position + run_length)
            if first < last:
                copy_range_at(source_fd, run_offset + first - position, last - first, target_fd, target_offset + first)
            position += run_length
            if position >= stop:
                break

    def byte_runs(self) -> Iterator[tuple[int, int]]:
        """(source file offset, length) of each contiguous piece, in the slice's byte order."""
        outer, axis, inner_bytes = self.layout()
        base = self._source.offset or 0
        for row in range(outer):
            for start, stop in self._ranges:
                yield base + (row * axis + start) * inner_bytes, (stop - start) * inner_bytes

    def layout(self) -> tuple[int, int, int]:
        """(outer rows, positions on the split axis, bytes per position)."""
        outer = math.prod(self._view[: self._dim])
        inner_bytes = math.prod(self._view[self._dim + 1 :]) * self.dtype.itemsize
        return outer, self._view[self._dim], int(inner_bytes)

    def _gather(self) -> ir.TensorProtocol:
        full = np.memmap(
            self._source.path,
            dtype=np.dtype(self.dtype.numpy()).newbyteorder("<"),
            mode="r",
            offset=self._source.offset or 0,
            shape=self._view,
        )
        pieces = [np.take(full, np.arange(start, stop), axis=self._dim) for start, stop in self._ranges]
        array = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=self._dim)
        del full
        return ir.tensor(np.ascontiguousarray(array).reshape(self.shape.numpy()), name=self.name)

    def tofile(self, file: BinaryIO) -> None:
        if self.is_gathered:
            gather_slices([self], lambda _index, chunk: file.write(chunk))
            return
        file.flush()
        start = file.tell()
        with open(self._source.path, "rb") as source:
            self.copy_runs(source.fileno(), file.fileno(), start)
        file.seek(start + self.nbytes)


class Zeros(ir.LazyTensor):
    """An all-zero tensor written in chunks (a Partial weight's share on every rank but the first)."""

    __slots__ = ()

    def __init__(self, dtype: ir.DataType, shape: Sequence[int], *, name: str | None = None) -> None:
        super().__init__(self._zeros, dtype=dtype, shape=ir.Shape(list(shape)), name=name)

    def __repr__(self) -> str:
        return f"{self._repr_base()}(zeros)"

    def _zeros(self) -> ir.TensorProtocol:
        return ir.tensor(np.zeros(self.shape.numpy(), dtype=self.dtype.numpy()), name=self.name)

    def tofile(self, file: BinaryIO) -> None:
        remaining = self.nbytes
        zeros = bytes(min(CHUNK_BYTES, remaining))
        while remaining > 0:
            step = min(len(zeros), remaining)
            file.write(zeros[:step] if step < len(zeros) else zeros)
            remaining -= step


def _resolve_view(view: tuple[int, ...], elements: int) -> tuple[int, ...]:
    """`view` with its -1 (at most one, as in a reshape) replaced by the size it stands for."""
    known = math.prod(d for d in view if d != -1)
    return tuple(elements // known if d == -1 else d for d in view)


def _streamable(tensor: ir.TensorProtocol) -> bool:
    """External tensors of whole-byte element types can be sliced without loading them."""
    return isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth % 8 == 0 and tensor.size > 0


def rank_weight(
    tensor: ir.TensorProtocol,
    placement: Placement,
    tp: int,
    tp_rank: int,
    view: Sequence[int] | None = None,
    name: str | None = None,
) -> ir.TensorProtocol:
    """The weight tp rank `tp_rank` holds: lazy over an external source, else sliced in memory.

    Same bytes as `shard_array(tensor.numpy().reshape(view), placement, tp, tp_rank)` (flattened
    when `view` is given).
    """
    source_shape = tuple(tensor.shape.numpy())  # a weight's shape is static
    viewed = _resolve_view(tuple(view), math.prod(source_shape)) if view else source_shape
    if _streamable(tensor):
        assert isinstance(tensor, ir.ExternalTensor)
        if isinstance(placement, Partial) and placement.op == "sum":
            return tensor if tp_rank == 0 else Zeros(tensor.dtype, source_shape, name=name)
        if isinstance(placement, Shard):
            dim = placement.dim % len(viewed)
            ranges = placement.local_ranges(viewed[dim], tp, tp_rank)
            local = list(viewed)
            local[dim] = sum(stop - start for start, stop in ranges)
            shape = [math.prod(local)] if view else local
            return ExternalSlice(tensor, viewed, dim, ranges, shape, name=name)
        return tensor
    array = tensor.numpy()
    viewed_array = array.reshape(viewed)
    local_array = np.ascontiguousarray(shard_array(viewed_array, placement, tp, tp_rank))
    if view:
        local_array = local_array.reshape(-1)
    return ir.tensor(local_array, name=name)


def repack_elements(packed: np.ndarray, bits: int, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Elements `ranges` of each row of `packed` ([rows, bytes], `8 // bits` elements a byte, the first in
    the low bits: onnxruntime's MatMulNBits zero points), packed the same way from the row's first byte.

    A row whose elements do not fill its last byte keeps zeros in the bits left over, as onnxruntime's
    quantizer pads a row (its kernels never read them).
    """
    per_byte = 8 // bits
    rows = packed.shape[0]
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    elements = ((packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(rows, -1)
    kept = np.concatenate([elements[:, start:stop] for start, stop in ranges], axis=1)
    width = -(-kept.shape[1] // per_byte)
    padded = np.zeros((rows, width * per_byte), dtype=np.uint8)
    padded[:, : kept.shape[1]] = kept
    return np.bitwise_or.reduce(padded.reshape(rows, width, per_byte) << shifts, axis=2).astype(np.uint8)


def packed_rank_elements(
    tensor: ir.TensorProtocol, rows: int, bits: int, ranges: Sequence[tuple[int, int]]
) -> np.ndarray:
    """`repack_elements` of a packed uint8 weight of `rows` rows, reading only the bytes that hold `ranges`
    (a slice of the external data, mapped while it is read)."""
    per_byte = 8 // bits
    row_bytes = tensor.size // rows
    first = min(start for start, _ in ranges) // per_byte
    last = -(-max(stop for _, stop in ranges) // per_byte)
    if _streamable(tensor):
        assert isinstance(tensor, ir.ExternalTensor)
        covering = ExternalSlice(tensor, (rows, row_bytes), 1, [(first, last)], (rows, last - first)).numpy()
    else:
        covering = tensor.numpy().reshape(rows, row_bytes)[:, first:last]
    offset = first * per_byte
    return repack_elements(covering, bits, [(start - offset, stop - offset) for start, stop in ranges])
