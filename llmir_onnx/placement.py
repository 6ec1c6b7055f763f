"""Placements of one tensor over one mesh axis, DTensor style, and the per-mesh ShardSpec.

* ``Shard(dim)``: the tensor is split evenly along ``dim``; tp rank ``r`` holds part ``r``.
  ``blocks`` (global sizes along ``dim`` that add up to it) describes a fused projection such as
  GPT-2's ``[q | k | v]`` columns: every block is split evenly and rank ``r`` holds part ``r`` of
  each block, concatenated, so that it owns q, k and v of the SAME heads.
* ``Replicate()``: every rank holds the full tensor.
* ``Partial(op)``: every rank holds a tensor of the full shape; the value is their reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmir_onnx.mesh import MESH_AXES, DeviceMesh, MeshAxis


@dataclass(frozen=True)
class Shard:
    dim: int
    blocks: tuple[int, ...] = ()
    # Distinct parts per block (one entry when there are no blocks); () means tp parts. Fewer parts than
    # ranks replicate each part over tp // parts neighbouring ranks: GQA with tp > kv heads, where rank r
    # holds kv head r // (tp // kv_heads).
    parts: tuple[int, ...] = ()
    # repeat_kv's expanded axis (dim + 1) is split `inner` ways on top (rank r holds piece r % inner), so
    # that merging it with `dim` gives the query heads split tp ways. 0: no inner split.
    inner: int = 0

    def __str__(self) -> str:
        text = str(self.dim)
        if self.blocks:
            text += ";" + "|".join(str(b) for b in self.blocks)
        if self.parts:
            text += "/" + ",".join(str(p) for p in self.parts)
        if self.inner:
            text += f"x{self.inner}"
        return f"S({text})"

    def with_dim(self, dim: int) -> Shard:
        return Shard(dim, self.blocks, self.parts, self.inner)

    def block_parts(self, block_index: int, tp: int) -> int:
        if not self.parts:
            return tp
        return self.parts[block_index if len(self.parts) > 1 else 0]

    def is_replicated_within(self, tp: int) -> bool:
        """Some ranks hold the same part: a sum over ranks would count it more than once."""
        return any(p < tp for p in self.parts)

    def holds_everything(self) -> bool:
        """One part replicated over every rank (a single kv head): the data of Replicate under another name."""
        return not self.blocks and not self.inner and bool(self.parts) and all(p == 1 for p in self.parts)

    def block(self, index: int) -> Shard:
        """The plain shard of one block of a fused shard (what a Split/Slice of that block holds)."""
        parts = (self.block_parts(index, 0),) if self.parts else ()
        return Shard(self.dim, (), parts)

    def local_offset(self, block_index: int, tp: int) -> int:
        """Where block `block_index` starts along the local axis: the local widths of the blocks before it."""
        return sum(block // self.block_parts(i, tp) for i, block in enumerate(self.blocks[:block_index]))

    def local_ranges(self, size: int, tp: int, rank: int) -> list[tuple[int, int]]:
        """The [start, stop) ranges of the global axis that tp rank `rank` holds, in order."""
        blocks = self.blocks or (size,)
        ranges = []
        offset = 0
        for index, block in enumerate(blocks):
            parts = self.block_parts(index, tp)
            part = rank // (tp // parts)
            step = block // parts
            ranges.append((offset + part * step, offset + (part + 1) * step))
            offset += block
        return ranges

    def local_size(self, size: int, tp: int) -> int:
        return sum(stop - start for start, stop in self.local_ranges(size, tp, 0))

    def divides(self, size: int, tp: int) -> bool:
        blocks = self.blocks or (size,)
        return sum(blocks) == size and all(
            tp % self.block_parts(i, tp) == 0 and block % self.block_parts(i, tp) == 0 for i, block in enumerate(blocks)
        )


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    op: str = "sum"

    def __str__(self) -> str:
        return "P" if self.op == "sum" else f"P({self.op})"


Placement = Shard | Replicate | Partial

REPLICATE = Replicate()
PARTIAL_SUM = Partial("sum")


def is_shard(placement: Placement | None) -> bool:
    return isinstance(placement, Shard)


@dataclass(frozen=True)
class ShardSpec:
    """One placement per mesh axis, in mesh order (pp, cp, tp)."""

    placements: tuple[Placement, ...]

    @classmethod
    def tensor_parallel(cls, placement: Placement) -> ShardSpec:
        return cls((REPLICATE, REPLICATE, placement))

    def on(self, axis: MeshAxis) -> Placement:
        return self.placements[MESH_AXES.index(axis)]

    def __str__(self) -> str:
        # pp and cp are always replicated today; the tp placement is what a reader wants to see.
        non_trivial = [
            f"{axis}:{p}" for axis, p in zip(MESH_AXES, self.placements, strict=True) if axis != "tp" and p != REPLICATE
        ]
        return ",".join([*non_trivial, str(self.on("tp"))])


def shard_array(array: np.ndarray, placement: Placement, parts: int, index: int) -> np.ndarray:
    """The piece of a full array that tp rank `index` of `parts` ranks holds (Partial: rank 0 holds it all)."""
    if isinstance(placement, Replicate):
        return array
    if isinstance(placement, Partial):
        if placement.op != "sum":
            return array
        return array if index == 0 else np.zeros_like(array)
    dim = placement.dim % array.ndim
    pieces = [
        np.take(array, np.arange(start, stop), axis=dim)
        for start, stop in placement.local_ranges(array.shape[dim], parts, index)
    ]
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=dim)


def unshard_arrays(pieces: list[np.ndarray], placement: Placement) -> np.ndarray:
    """Inverse of `shard_array` over all tp ranks (used by tests and the in-process simulator)."""
    if isinstance(placement, Replicate):
        return pieces[0]
    if isinstance(placement, Partial):
        reduce = {"sum": np.sum, "max": np.max, "min": np.min}[placement.op]
        return reduce(np.stack(pieces), axis=0)
    tp = len(pieces)
    dim = placement.dim % pieces[0].ndim
    if placement.inner:
        raise ValueError(f"{placement} is an intermediate of repeat_kv; it has no full tensor to rebuild")
    out = []
    offset = 0
    for index, block in enumerate(placement.blocks or (None,)):
        parts = placement.block_parts(index, tp)
        width = pieces[0].shape[dim] if block is None else block // parts
        distinct = [pieces[part * (tp // parts)] for part in range(parts)]
        out.extend(np.take(p, np.arange(offset, offset + width), axis=dim) for p in distinct)
        offset += width
    return np.concatenate(out, axis=dim)


__all__ = [
    "PARTIAL_SUM",
    "REPLICATE",
    "DeviceMesh",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "ShardSpec",
    "is_shard",
    "shard_array",
    "unshard_arrays",
]
