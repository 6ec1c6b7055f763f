"""Where each rank's weights go on disk, and one pass over the source that puts them there.

The physical limit of partitioning is reading every source weight once and writing every plan
byte once. This module plans the files so that the plan holds no byte twice, then fills them in
source order:

* Layout. A weight (an initializer over `EXTERNAL_THRESHOLD_BYTES`) that several ranks of one
  pipeline stage hold unchanged (a replicated norm, embedding or lm_head; a KV head that tp ranks
  share when tp exceeds the KV heads) goes once into `stage<s>.shared.data`, which those ranks'
  models all reference; every other weight goes into its rank's `rank<r>.onnx.data`. Sharing stops
  at the stage: a stage's files are all a host running that stage needs. Offsets are aligned to
  4 KiB so onnxruntime can memory-map the weights, and are assigned in rank and initializer order,
  so the same model and options give the same files.
* Writing. Jobs run sorted by where they read the source, so it is read front to back once:
  whole tensors and long row slices are copied file to file in the kernel (`copy_file_range`);
  the column slices that the tp ranks take from one source tensor are gathered together from one
  mapped window of rows, so those rows are read once for all ranks, not once per rank; a tensor
  that is all zeros (a Partial share) is a hole in a sparse file and costs nothing. A weight over
  `PIECE_BYTES` is cut into pieces (bytes, or rows of a gathered group) that the writer threads take
  one at a time: a 250 MiB lm_head, last in the source, kept one thread busy alone for 0.8 s at the
  end of a 4.45 GiB partition while the other had finished (docs/BENCHMARKS.md).

* Hashing. The manifest holds each file's digest (BLAKE3, llmir_onnx/digest.py), taken while the
  file is written (no second pass over the plan): the kernel copies never bring the bytes into this
  process and the units finish out of file order, so each file's hash follows its writes from
  behind, in file order: when a unit finishes, the file's prefix that is now complete (its weights,
  the alignment gaps and all-zero holes between them) is mapped from the page cache, where the
  bytes just went, and hashed (`_OrderedHash`). Source order is the files' order for every exported
  model we know, so the prefix grows right behind the writes and the reads stay in the cache. The
  hashing runs on its own threads (`HASH_THREADS`), not on the writers: a writer that hashed a
  prefix itself stopped writing meanwhile (hashing costs half as much CPU per byte as the copy),
  so the writes now go on at the copy's pace while the hashing follows them (the hashers release
  the GIL, so it takes a free core).

The rank models then reference their weights as external tensors at these places and are saved
as small protobufs (no weight passes through protobuf).
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from llmir_onnx.digest import FileDigest, hash_mapped_range, new_hasher
from llmir_onnx.ir_io import graph_protos
from llmir_onnx.weight_slices import ExternalSlice, Zeros, copy_range_at, gather_slices, pwrite_all

EXTERNAL_THRESHOLD_BYTES = 1024
ALIGNMENT_BYTES = 4096
# Threads writing weights: the copies are kernel and memory work that releases the GIL.
WRITER_THREADS = 2
# How often a thread holding the GIL hands it over while the weights are being written.
GIL_SWITCH_INTERVAL_S = 0.0002
# Bytes a writer thread takes at once: a bigger weight (an lm_head, a wide layer's gathered projections)
# is cut into pieces that both threads share, or the last one left at the end is one thread's alone.
PIECE_BYTES = 32 << 20
# Threads hashing the files' completed prefixes behind the writers (one file at a time each).
HASH_THREADS = 2
# Bytes of a file's completed prefix mapped at once to hash them.
HASH_CHUNK_BYTES = 8 << 20
_ZEROS = bytes(HASH_CHUNK_BYTES)


def rank_data_name(rank: int) -> str:
    return f"rank{rank}.onnx.data"


def stage_shared_data_name(stage: int) -> str:
    return f"stage{stage}.shared.data"


@dataclass(frozen=True)
class WeightPlace:
    """Where one weight's bytes live in the plan."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class RankWeights:
    """One rank's weights to place: its rank, its pipeline stage, {initializer name: tensor}."""

    rank: int
    stage: int
    tensors: dict[str, ir.TensorProtocol]

    @classmethod
    def of_model(cls, rank: int, stage: int, model: ir.Model) -> RankWeights:
        return cls(rank, stage, {name: value.const_value for name, value in _initializers(model)})


def _tensor_key(tensor: ir.TensorProtocol) -> tuple[object, ...]:
    """Equal keys mean equal bytes: the same source range, the same slice of it, or the same object."""
    if isinstance(tensor, ExternalSlice):
        source = tensor.source
        return ("slice", os.fspath(source.path), source.offset or 0, tensor.view, tensor.dim, tensor.ranges)
    if isinstance(tensor, ir.ExternalTensor):
        return ("external", os.fspath(tensor.path), tensor.offset or 0, tensor.length, tensor.dtype)
    if isinstance(tensor, Zeros):
        return ("zeros", tensor.dtype, tuple(tensor.shape))
    return ("object", id(tensor))


def _initializers(model: ir.Model) -> Iterator[tuple[str, ir.Value]]:
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                yield name, value


def _is_external(tensor: ir.TensorProtocol) -> bool:
    return tensor.nbytes > EXTERNAL_THRESHOLD_BYTES


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT_BYTES) * ALIGNMENT_BYTES


@dataclass
class DataLayout:
    """Every weight's place; `jobs` lists each distinct weight once with the place it is written to."""

    places: dict[tuple[int, str], WeightPlace]  # (rank, initializer name) -> place
    jobs: list[tuple[ir.TensorProtocol, WeightPlace]]
    file_sizes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(place.length for _, place in self.jobs)

    def append(self, file: str, tensor: ir.TensorProtocol) -> WeightPlace:
        """A place at the end of `file` for one more weight."""
        offset = _align(self.file_sizes.get(file, 0))
        place = WeightPlace(file, offset, tensor.nbytes)
        self.file_sizes[file] = offset + tensor.nbytes
        self.jobs.append((tensor, place))
        return place


def plan_layout(ranks: Sequence[RankWeights]) -> DataLayout:
    """Place every rank's external weights: once per stage, shared when several of its ranks hold them."""
    ranks = sorted(ranks, key=lambda entry: entry.rank)
    holders: dict[tuple[int, tuple[object, ...]], set[int]] = defaultdict(set)
    for entry in ranks:
        for tensor in entry.tensors.values():
            if _is_external(tensor):
                holders[(entry.stage, _tensor_key(tensor))].add(entry.rank)
    layout = DataLayout({}, [], {})
    placed: dict[tuple[int, tuple[object, ...]], WeightPlace] = {}
    for entry in ranks:
        for name, tensor in entry.tensors.items():
            if not _is_external(tensor):
                continue
            key = (entry.stage, _tensor_key(tensor))
            if key not in placed:
                shared = len(holders[key]) > 1
                file = stage_shared_data_name(entry.stage) if shared else rank_data_name(entry.rank)
                placed[key] = layout.append(file, tensor)
            layout.places[(entry.rank, name)] = placed[key]
    return layout


def reference_placed_weights(rank: int, model: ir.Model, layout: DataLayout, plan_dir: Path) -> list[str]:
    """Point the rank model's weights at their places; returns the data files it references.

    A large weight the layout does not know (one made after the weights were planned) is placed at
    the end of the rank's own file: the caller writes `layout.jobs` added since. Small lazy weights
    are read into the model.
    """
    files: set[str] = set()
    for name, value in _initializers(model):
        tensor = value.const_value
        assert tensor is not None
        if not _is_external(tensor):
            value.const_value = _in_memory(tensor)
            continue
        place = layout.places.get((rank, name))
        if place is None:
            place = layout.append(rank_data_name(rank), tensor)
            layout.places[(rank, name)] = place
        files.add(place.file)
        value.const_value = _placed(place, tensor.dtype, list(tensor.shape.numpy()), tensor.name or name, plan_dir)
    return sorted(files)


def reference_placed_weights_in_proto(
    rank: int, graph: onnx.GraphProto, layout: DataLayout, plan_dir: Path, replaced: Mapping[str, ir.TensorProtocol]
) -> list[str] | None:
    """`reference_placed_weights` on a serialized graph (and its subgraphs) that another rank of the same stage holds
    (its external tensors placed already): they are pointed at this rank's places, and the small
    tensors named in `replaced` take this rank's values. Returns the data files it references, or None
    when a weight has no place for this rank (the caller makes and places the rank's model instead).
    """
    files: set[str] = set()
    for tensor in (tensor for subgraph in graph_protos(graph) for tensor in subgraph.initializer):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            place = layout.places.get((rank, tensor.name))
            if place is None:
                return None
            files.add(place.file)
            dtype = ir.DataType(tensor.data_type)
            tensor.CopyFrom(ir.serde.serialize_tensor(_placed(place, dtype, list(tensor.dims), tensor.name, plan_dir)))
        elif tensor.name in replaced:
            value = replaced[tensor.name]
            if _is_external(value):
                return None
            value = _in_memory(value)
            value.name = tensor.name  # as the graph serializer names initializers
            tensor.CopyFrom(ir.serde.serialize_tensor(value))
    return sorted(files)


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """A small weight's bytes in the model itself, not a reference to the source's data."""
    if isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):
        return ir.tensor(tensor.numpy(), name=tensor.name)
    return tensor


def _placed(place: WeightPlace, dtype: ir.DataType, shape: list[int], name: str, plan_dir: Path) -> ir.ExternalTensor:
    return ir.ExternalTensor(
        place.file, place.offset, place.length, dtype, shape=ir.Shape(shape), name=name, base_dir=plan_dir
    )


def _source_order(job: tuple[ir.TensorProtocol, WeightPlace]) -> tuple[str, int]:
    tensor = job[0]
    if isinstance(tensor, ExternalSlice):
        return os.fspath(tensor.source.path), tensor.source.offset or 0
    if isinstance(tensor, ir.ExternalTensor):
        return os.fspath(tensor.path), tensor.offset or 0
    return "", 0


class _OrderedHash:
    """The digest of one data file, fed in file order as its weights are written, in whatever order.

    `places` are the file's weights as (offset, length), in file order; `written(offset)` says the
    weight at `offset` is on disk (or is a hole). The prefix up to the first weight not yet written
    is then hashed where it lies (mapped): gaps between weights and holes read as zeros, and so do
    bytes past the file's current end, which later writes or the final truncate only extend with
    zeros. The hashing runs through `submit` (the writer's hashing threads), one round at a time per
    file: `written` only records the weight and, when no round of this file is pending, submits one,
    so the writer that called it goes on writing.
    """

    def __init__(
        self,
        fd: Callable[[], int],
        submit: Callable[[Callable[[], None]], object],
        places: Sequence[tuple[int, int]] = (),
    ) -> None:
        self._fd = fd
        self._submit = submit
        self._places: list[tuple[int, int]] = []
        self._written: set[int] = set()
        self._next = 0  # index of the first place not hashed yet
        self._hashed = 0  # bytes hashed
        self._digest = new_hasher()
        self._lock = threading.Lock()
        self._busy = False
        self.extend(places)

    def extend(self, places: Sequence[tuple[int, int]]) -> None:
        """More places, after the known ones (weights placed after the writes started go at the end)."""
        with self._lock:
            for offset, length in places:
                if self._places and offset < sum(self._places[-1]):
                    raise ValueError(f"place at {offset} overlaps or precedes the file's last place")
                self._places.append((offset, length))

    def written(self, offset: int) -> None:
        with self._lock:
            self._written.add(offset)
            if self._busy:
                return  # the round pending for this file takes it
            self._busy = True
        self._submit(self._hash_written)

    def _hash_written(self) -> None:
        """Hash the written prefix until none is left past what is hashed (one round; see `written`)."""
        try:
            while (end := self._complete_prefix()) is not None:
                self._hash_range(self._hashed, end)
                self._hashed = end
        except BaseException:
            with self._lock:
                self._busy = False
            raise

    def _complete_prefix(self) -> int | None:
        """The end of the written prefix past what is hashed; None (and not busy) when there is none."""
        with self._lock:
            end = self._hashed
            while self._next < len(self._places) and self._places[self._next][0] in self._written:
                offset, length = self._places[self._next]
                self._written.discard(offset)
                end = offset + length
                self._next += 1
            if end == self._hashed:
                self._busy = False
                return None
            return end

    def _hash_range(self, start: int, stop: int) -> None:
        """Hash bytes [start, stop) of the file where they lie, in the page cache (`hash_mapped_range`)."""
        fd = self._fd()
        # The file only grows while it is written; past its current end lie zeros (see the class docstring),
        # and mapping them would fault (SIGBUS), so they are hashed as zeros instead.
        mapped_stop = min(stop, os.fstat(fd).st_size)
        hash_mapped_range(self._digest, fd, start, mapped_stop, HASH_CHUNK_BYTES)
        start = max(start, mapped_stop)
        while start < stop:
            length = min(len(_ZEROS), stop - start)
            self._digest.update(memoryview(_ZEROS)[:length])
            start += length

    def digest(self, size: int) -> FileDigest:
        """The file's digest once every place is written and hashed and the file has its final `size`."""
        if self._next != len(self._places) or self._busy:
            raise RuntimeError("a data file's hash was asked for before all its weights were written")
        if size > self._hashed:
            self._hash_range(self._hashed, size)
            self._hashed = size
        return FileDigest(size, self._digest.hexdigest())


class _Files:
    """The plan's data files, opened once each for writing at explicit offsets, and their hashing threads."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._fds: dict[str, int] = {}
        self._hashes: dict[str, _OrderedHash] = {}
        self._lock = threading.Lock()
        self._hash_pool: ThreadPoolExecutor | None = None
        self._hash_rounds: list[Future[None]] = []

    def fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                # Read and write: each file's hash maps what was written (see _OrderedHash).
                self._fds[name] = os.open(self._folder / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            return self._fds[name]

    def _submit_hash(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._hash_pool is None:
                self._hash_pool = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="llmir-hash")
            self._hash_rounds.append(self._hash_pool.submit(work))

    def expect(self, places: Sequence[WeightPlace]) -> None:
        """The places to hash as they are written: the first ones of their files, or after those known."""
        by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for place in sorted(places, key=lambda place: (place.file, place.offset)):
            by_file[place.file].append((place.offset, place.length))
        for name, spans in by_file.items():
            if name not in self._hashes:
                self._hashes[name] = _OrderedHash(functools.partial(self.fd, name), self._submit_hash)
            self._hashes[name].extend(spans)

    def written(self, place: WeightPlace) -> None:
        self._hashes[place.file].written(place.offset)

    def _join_hashing(self, raise_errors: bool) -> None:
        """Wait for every hashing round submitted (the first error raised with `raise_errors`)."""
        with self._lock:
            pool, rounds = self._hash_pool, self._hash_rounds
            self._hash_pool, self._hash_rounds = None, []
        if pool is None:
            return
        pool.shutdown(wait=True)
        if raise_errors:
            for round_ in rounds:
                round_.result()

    def finish(self, sizes: dict[str, int]) -> dict[str, FileDigest]:
        """Extend each file to its size and close them all; returns each file's digest."""
        try:
            self._join_hashing(raise_errors=True)
            digests = {}
            for name in sorted(sizes):
                # Holes (alignment, all-zero weights) read as zeros; the size covers the last weight.
                os.ftruncate(self.fd(name), sizes[name])
                digests[name] = self._hashes[name].digest(sizes[name])
        finally:
            self.close()
        return digests

    def close(self) -> None:
        self._join_hashing(raise_errors=False)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# One tensor to write, or the column slices of one source tensor that several ranks take.
Unit = tuple[ir.TensorProtocol, WeightPlace] | list[tuple[ExternalSlice, WeightPlace]]


@dataclass(frozen=True)
class _Piece:
    """The part of a unit one writer thread takes: outer rows [start, stop) of a gathered group (every
    rank's share of those rows), else bytes [start, stop) of the one tensor as placed."""

    unit: Unit
    start: int
    stop: int

    @property
    def spans(self) -> list[WeightPlace]:
        """Where its bytes go: one span of each place it writes into (what its file's hash waits for)."""
        if isinstance(self.unit, list):
            outer = self.unit[0][0].layout()[0]
            row_bytes = [place.length // outer for _, place in self.unit]
            return [
                WeightPlace(place.file, place.offset + self.start * local, (self.stop - self.start) * local)
                for (_, place), local in zip(self.unit, row_bytes, strict=True)
            ]
        place = self.unit[1]
        return [WeightPlace(place.file, place.offset + self.start, self.stop - self.start)]


def _pieces(unit: Unit) -> list[_Piece]:
    """`unit` cut into pieces of about `PIECE_BYTES` that the writer threads take one at a time."""
    if isinstance(unit, list):
        outer, axis, inner_bytes = unit[0][0].layout()
        # Source rows: the group's shares of them add up to the rows themselves.
        rows = max(1, PIECE_BYTES // (axis * inner_bytes))
        return [_Piece(unit, row, min(row + rows, outer)) for row in range(0, outer, rows)]
    tensor, place = unit
    if isinstance(tensor, (ExternalSlice, ir.ExternalTensor)) and place.length > PIECE_BYTES:
        return [_Piece(unit, at, min(at + PIECE_BYTES, place.length)) for at in range(0, place.length, PIECE_BYTES)]
    return [_Piece(unit, 0, place.length)]


def _write_gathered(
    group: list[tuple[ExternalSlice, WeightPlace]], rows: tuple[int, int], spans: list[WeightPlace],
    files: _Files, advance: Callable[[int], None],
) -> None:  # fmt: skip
    """Rows `rows` of the column slices of one source tensor for several ranks, from one pass over them."""
    written = [0] * len(group)

    def write(index: int, chunk: memoryview) -> None:
        span = spans[index]
        pwrite_all(files.fd(span.file), chunk, span.offset + written[index])
        written[index] += chunk.nbytes
        advance(chunk.nbytes)

    gather_slices([tensor for tensor, _ in group], write, rows)
    for (tensor, _), span, count in zip(group, spans, written, strict=True):
        if count != span.length:
            raise OSError(f"wrote {count} of {span.length} bytes of rows {rows[0]}..{rows[1]} of {tensor.name!r}")


def _pieces_in_source_order(jobs: Sequence[tuple[ir.TensorProtocol, WeightPlace]]) -> list[_Piece]:
    """The jobs' pieces in source order; the short-run slices of one source tensor as one group, where its
    first was."""
    groups: dict[tuple[object, ...], list[tuple[ExternalSlice, WeightPlace]]] = {}
    units: list[Unit] = []
    for tensor, place in sorted(jobs, key=_source_order):
        if isinstance(tensor, ExternalSlice) and tensor.is_gathered:
            source = tensor.source
            key = (os.fspath(source.path), source.offset or 0, tensor.view, tensor.dim)
            if key not in groups:
                groups[key] = []
                units.append(groups[key])
            groups[key].append((tensor, place))
        else:
            units.append((tensor, place))
    return [piece for unit in units for piece in _pieces(unit)]


def _write_piece(piece: _Piece, files: _Files, advance: Callable[[int], None]) -> None:
    spans = piece.spans
    if isinstance(piece.unit, list):
        _write_gathered(piece.unit, (piece.start, piece.stop), spans, files, advance)
    else:
        tensor, place = piece.unit
        fd = files.fd(place.file)
        if isinstance(tensor, Zeros):
            pass  # a hole in the file
        elif isinstance(tensor, ExternalSlice):
            with open(tensor.source.path, "rb") as source_file:
                tensor.copy_runs(source_file.fileno(), fd, place.offset, (piece.start, piece.stop))
        elif isinstance(tensor, ir.ExternalTensor):
            with open(tensor.path, "rb") as source_file:
                copy_range_at(source_file.fileno(), (tensor.offset or 0) + piece.start, piece.stop - piece.start,
                              fd, place.offset + piece.start)  # fmt: skip
        else:
            pwrite_all(fd, tensor.tobytes(), place.offset)  # in memory: always one piece
        advance(piece.stop - piece.start)
    for span in spans:
        files.written(span)


class WeightWriter:
    """Writes a plan's weight files in the background, from the moment the weights are known.

    `start` places the weights (`plan_layout`) and starts two threads that take their pieces in source
    order: column slices gathered from the source (a memory copy, then a write), whole tensors and
    row slices copied file to file in the kernel. Meanwhile the caller builds the rank graphs (Python,
    mostly holding the GIL; the copies release it), then `place`s each rank model and `finish`es.
    Leaving the `with` block by an error stops the threads at their next tensor.
    """

    def __init__(self, folder: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        self.folder = folder
        self.layout: DataLayout | None = None
        self._advance = on_bytes or (lambda _count: None)
        self._files = _Files(folder)
        self._failed = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._written_jobs = 0
        self._switch_interval: float | None = None
        # Each data file's size and digest, once `finish` has written them all.
        self.digests: dict[str, FileDigest] = {}

    def __enter__(self) -> WeightWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self._failed.set()
            self._join(raise_errors=False)
            self._files.close()

    def start(self, ranks: Sequence[RankWeights]) -> None:
        if self.layout is not None:
            raise RuntimeError("WeightWriter.start called twice")
        self.layout = plan_layout(ranks)
        self._written_jobs = len(self.layout.jobs)
        pieces = _pieces_in_source_order(self.layout.jobs)
        self._files.expect([span for piece in pieces for span in piece.spans])
        # The writer threads need the GIL for a moment between copies; the caller's graph building holds
        # it for 5 ms at a time by default, which starved the writes to ~0.5 GB/s on a 32-layer model.
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # Both threads take the next unit in source order from one queue: a split by kind (gathers on one
        # thread, kernel copies on the other) left one thread idle for half the time on wide layers.
        pending: queue.SimpleQueue[_Piece] = queue.SimpleQueue()
        for piece in pieces:
            pending.put(piece)
        self._pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="llmir-write")
        self._futures = [self._pool.submit(self._run, pending) for _ in range(WRITER_THREADS)]

    def _run(self, pending: queue.SimpleQueue[_Piece]) -> None:
        try:
            while not self._failed.is_set():
                try:
                    piece = pending.get_nowait()
                except queue.Empty:
                    return
                _write_piece(piece, self._files, self._advance)
        except BaseException:
            self._failed.set()
            raise

    def place(self, rank: int, model: ir.Model) -> list[str]:
        """Point `model`'s weights at their places in the plan; returns the data files it references."""
        if self.layout is None:
            raise RuntimeError("WeightWriter.place before start")
        return reference_placed_weights(rank, model, self.layout, self.folder)

    def _join(self, raise_errors: bool) -> None:
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        for future in self._futures:
            try:
                future.result()
            except BaseException:
                if raise_errors:
                    raise
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._futures = []

    def finish(self) -> None:
        """Wait for the background writes, write weights placed since `start`, extend and close the files
        (`digests` then holds their sizes and hashes)."""
        assert self.layout is not None
        try:
            self._join(raise_errors=True)
        except BaseException:
            self._failed.set()
            self._join(raise_errors=False)
            raise
        late = self.layout.jobs[self._written_jobs :]
        pieces = _pieces_in_source_order(late)
        self._files.expect([span for piece in pieces for span in piece.spans])
        for piece in pieces:
            _write_piece(piece, self._files, self._advance)
        self.digests = self._files.finish(self.layout.file_sizes)
