"""Placements of one tensor over one mesh axis, DTensor style, and the per-mesh ShardSpec.

* ``Shard(dim)``: the tensor is split evenly along ``dim``; tp rank ``r`` holds part ``r``.
  ``blocks`` (global sizes along ``dim`` that add up to it) describes a fused projection such as
  GPT-2's ``[q | k | v]`` columns: every block is split evenly and rank ``r`` holds part ``r`` of
  each block, concatenated, so that it owns q, k and v of the SAME heads.
  ``inner_blocks`` describe a grouped fused projection split finer than its groups (Falcon-style GQA,
  ``[q heads | k | v]`` per kv group, with more ranks than groups): ``parts`` split the axis into groups,
  the ``inner`` ranks sharing a group split each inner block ``inner_parts[b]`` ways.
* Uneven (``shares``, from ``DeviceMesh.tp_shares``): the axis is cut into ``sum(shares)`` equal units as
  if there were that many ranks, and tp rank ``r`` holds its ``shares[r]`` neighbouring units (of every
  block), printed with the shares: ``S(1)[2,1,1]`` is 4 heads on 3 ranks, 2 on the first. A plain axis
  that neither tp nor the heads' units divide (a vocabulary, an MLP's columns) has one unit per element:
  ``S(0)[334,334,333]`` is 1001 vocabulary rows on 3 ranks (``passes/propagate.py`` ``_own_splits``).
* ``Replicate()``: every rank holds the full tensor.
* ``Partial(op)``: every rank holds a tensor of the full shape; the value is their reduction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmir_onnx.mesh import MESH_AXES, DeviceMesh, MeshAxis, unit_range


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
    # With `inner`: the width of each of the `parts` is made of these blocks (a kv group's [q heads | k | v]),
    # block b split inner_parts[b] ways among the `inner` ranks of the part: rank r takes piece
    # (r % inner) // (inner // inner_parts[b]) of it. A block split fewer ways is repeated on those ranks.
    inner_blocks: tuple[int, ...] = ()
    inner_parts: tuple[int, ...] = ()
    # True: the inner blocks lie on `dim` itself, inside each part (the fused columns, before the Reshape
    # into [groups, heads per group, head_dim]); False: on dim + 1, in its units (after that Reshape).
    inner_flat: bool = False
    # Uneven tp: units per tp rank (see the module docstring); () is even.
    shares: tuple[int, ...] = ()

    def __str__(self) -> str:
        text = str(self.dim)
        if self.blocks:
            text += ";" + "|".join(str(b) for b in self.blocks)
        if self.parts:
            text += "/" + ",".join(str(p) for p in self.parts)
        if self.inner:
            text += f"x{self.inner}"
        if self.inner_blocks:
            # ':' blocks inside each part of `dim`, ';' blocks of the next axis.
            text += (":" if self.inner_flat else ";") + "|".join(str(b) for b in self.inner_blocks)
            text += "/" + ",".join(str(p) for p in self.inner_parts)
        uneven = "[" + ",".join(str(s) for s in self.shares) + "]" if self.shares else ""
        return f"S({text}){uneven}"

    def with_dim(self, dim: int) -> Shard:
        return dataclasses.replace(self, dim=dim)

    def with_shares(self, shares: tuple[int, ...]) -> Shard:
        return dataclasses.replace(self, shares=shares)

    @property
    def plain(self) -> bool:
        """One run of the axis per rank: no fused blocks, no replicated parts, no inner split (shares aside)."""
        return not (self.blocks or self.parts or self.inner)

    def even(self) -> Shard:
        """The same split in units, as if every unit were a rank."""
        return dataclasses.replace(self, shares=())

    def uneven_misfit(self) -> str | None:
        """Why the shares cannot hold this split, or None. A part (a kv head) replicated over several units
        must be held whole by a rank, or be the only part it holds: a rank's query heads must read whole
        kv heads, or share one."""
        if not self.shares:
            return None
        # A plain repeat (repeat_kv's axis, `inner` without blocks) follows the parts; blocks inside groups do not.
        if self.inner_blocks or self.inner_flat or (self.inner and len(set(self.parts)) != 1):
            return f"{self} splits kv groups further, which uneven shares {list(self.shares)} do not support"
        units = sum(self.shares)
        for parts in set(self.parts):
            if units % parts:
                return f"{parts} parts cannot be replicated over {units} units"
            per_part = units // parts
            for rank in range(len(self.shares)):
                held = unit_range(self.shares, rank)
                whole = held.start % per_part == 0 and len(held) % per_part == 0
                if not whole and held.start // per_part != (held.stop - 1) // per_part:
                    return (
                        f"tp rank {rank} would hold units {held.start}-{held.stop - 1}, which cut the {parts} "
                        f"kv heads ({per_part} units each)"
                    )
        return None

    def inner_repeat_size(self, size: int, rank: int) -> int:
        """The local length of the repeat axis (dim + 1, `inner` without blocks) of `size` on tp rank `rank`:
        a rank of whole parts (kv heads) repeats each fully, one inside a part its units' share of it."""
        if not self.shares:
            return size // self.inner
        held, per_part = unit_range(self.shares, rank), sum(self.shares) // self.parts[0]
        if held.start % per_part == 0 and len(held) % per_part == 0:
            return size
        return size * len(held) // per_part

    def inner_block(self, index: int) -> Shard:
        """What a Slice/Gather of inner block `index` (on dim + 1) holds: the groups, that block split as before."""
        if self.inner_parts[index] == self.inner:
            return Shard(self.dim, (), self.parts, self.inner)
        assert self.inner_parts[index] == 1, "only blocks split by every rank of a group, or by none, are kept"
        return Shard(self.dim, (), self.parts)

    def inner_local_offset(self, index: int) -> int:
        """Where inner block `index` starts on a rank: the local widths of the inner blocks before it."""
        return sum(b // p for b, p in zip(self.inner_blocks[:index], self.inner_parts[:index], strict=True))

    def inner_local_size(self) -> int:
        return self.inner_local_offset(len(self.inner_blocks))

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
        return Shard(self.dim, (), parts, shares=self.shares)

    def local_offset(self, block_index: int, tp: int) -> int:
        """Where block `block_index` starts along the local axis: the local widths of the blocks before it."""
        return sum(block // self.block_parts(i, tp) for i, block in enumerate(self.blocks[:block_index]))

    def local_ranges(self, size: int, tp: int, rank: int) -> list[tuple[int, int]]:
        """The [start, stop) ranges of the global axis that tp rank `rank` holds, in order."""
        if self.shares:
            return self._uneven_ranges(size, tp, rank)
        if self.inner_flat:
            parts = self.parts[0]
            chunk = size // parts
            start = rank // (tp // parts) * chunk
            ranges = []
            for block, block_parts in zip(self.inner_blocks, self.inner_parts, strict=True):
                width = block // block_parts
                piece = rank % self.inner // (self.inner // block_parts)
                ranges.append((start + piece * width, start + (piece + 1) * width))
                start += block
            return ranges
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

    def _uneven_ranges(self, size: int, tp: int, rank: int) -> list[tuple[int, int]]:
        """Per block, the units of `rank` merged: neighbouring units touch, a replicated part repeats."""
        if tp != len(self.shares):
            raise ValueError(f"{self} has {len(self.shares)} shares, asked for a tp of {tp}")
        even, units = self.even(), sum(self.shares)
        held = unit_range(self.shares, rank)
        if self.plain:
            # A plain axis: the rank's units are one run (an element-granular split has one unit per
            # element, so this avoids a loop over the whole vocabulary).
            step = size // units
            return [(held.start * step, held.stop * step)]
        merged: list[tuple[int, int]] = []
        for unit in held:
            for index, (start, stop) in enumerate(even.local_ranges(size, units, unit)):
                if index == len(merged):
                    merged.append((start, stop))
                elif merged[index][0] <= start and stop <= merged[index][1]:
                    continue  # a replicated part this rank already holds (a kv head of several of its units)
                elif merged[index][1] == start:
                    merged[index] = (merged[index][0], stop)
                else:
                    raise ValueError(f"{self}: tp rank {rank} would hold pieces that are not neighbours")
        return merged

    def local_widths(self, size: int, tp: int, rank: int = 0) -> list[int]:
        """The local width of each block (one entry without blocks) on tp rank `rank`."""
        return [stop - start for start, stop in self.local_ranges(size, tp, rank)]

    def local_size(self, size: int, tp: int, rank: int = 0) -> int:
        return sum(self.local_widths(size, tp, rank))

    def divides(self, size: int, tp: int) -> bool:
        if self.shares:
            return self.even().divides(size, sum(self.shares)) and self.uneven_misfit() is None
        if self.inner_blocks:
            parts = self.block_parts(0, tp)
            inner_ok = tp % parts == 0 and self.inner == tp // parts and len(self.inner_parts) == len(self.inner_blocks)
            inner_ok = inner_ok and all(
                self.inner % p == 0 and b % p == 0 for b, p in zip(self.inner_blocks, self.inner_parts, strict=True)
            )
            whole = sum(self.inner_blocks) * parts == size if self.inner_flat else size % parts == 0
            return inner_ok and not self.blocks and whole
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
        reductions: dict[str, Callable[..., np.ndarray]] = {"sum": np.sum, "max": np.max, "min": np.min}
        return reductions[placement.op](np.stack(pieces), axis=0)
    tp = len(pieces)
    dim = placement.dim % pieces[0].ndim
    if placement.inner_flat:
        return _unshard_inner_blocks(pieces, placement, dim)
    if placement.inner:
        raise ValueError(f"{placement} is an intermediate of repeat_kv; it has no full tensor to rebuild")
    out: list[np.ndarray] = []
    offset = 0
    for index, block in enumerate(placement.blocks or (None,)):
        parts = placement.block_parts(index, tp)
        width = pieces[0].shape[dim] if block is None else block // parts
        distinct = [pieces[part * (tp // parts)] for part in range(parts)]
        out.extend(np.take(p, np.arange(offset, offset + width), axis=dim) for p in distinct)
        offset += width
    return np.concatenate(out, axis=dim)


def _unshard_inner_blocks(pieces: list[np.ndarray], placement: Shard, dim: int) -> np.ndarray:
    """Each part's inner blocks, each from the first rank of every piece of it, in global order."""
    tp = len(pieces)
    out = []
    for part in range(placement.parts[0]):
        first = part * (tp // placement.parts[0])
        for index, block_parts in enumerate(placement.inner_parts):
            width = placement.inner_blocks[index] // block_parts
            offset = placement.inner_local_offset(index)
            for piece in range(block_parts):
                held = pieces[first + piece * (placement.inner // block_parts)]
                out.append(np.take(held, np.arange(offset, offset + width), axis=dim))
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
