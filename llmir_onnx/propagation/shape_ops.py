"""Data movement: Reshape/Flatten, Transpose, (Un)Squeeze, Expand, Concat, Split, Slice, Gather, and
the ops that only read shapes (Shape, Size) or make tensors from them (ConstantOfShape, Range).

Reshape follows DTensor's view rules: dims are grouped by equal products; a 1-to-1 dim keeps its
shard; a flattened group stays sharded only if its leftmost piece is the sharded one; a split dim
stays sharded on its leftmost piece, which must be divisible by tp (that is where a head count
that tp does not divide is caught).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from llmir_onnx.errors import PlanError
from llmir_onnx.placement import PARTIAL_SUM, REPLICATE, Partial, Placement, Shard
from llmir_onnx.propagation.base import (
    Decision,
    Dim,
    RuleContext,
    Shape,
    normalize_dim,
    register,
    replicated,
)
from llmir_onnx.propagation.registry import Localizer, ShapeEnvironment, attr_int, attr_ints, define
from llmir_onnx.propagation.tensor_shapes import (
    MAX_COMPUTED_ELEMENTS,
    TensorShape,
    attr_tensor,
    broadcast,
    first_input,
    input_ints,
    int_list,
    known_arrays,
    norm_axis,
    required_int,
    reshaped,
    same_as_first,
    sliced,
    squeezed,
)

INT64_MAX = 2**63 - 1


def _only_shard(placements: list[Placement | None]) -> Shard | None:
    first = placements[0] if placements else None
    return first if isinstance(first, Shard) else None


def _static_dims(dims: tuple[Dim, ...]) -> list[int] | None:
    """The dims as ints, or None when one is symbolic or unknown."""
    static = [d for d in dims if isinstance(d, int)]
    return static if len(static) == len(dims) else None


def map_reshape_dim(ctx: RuleContext, node: ir.Node, in_shape: Shape, out_shape: Shape, shard: Shard) -> Shard | None:
    """Where the shard of `in_shape` lands in `out_shape`, or None when the reshape mixes it up."""
    if in_shape is None or out_shape is None:
        return None
    n, m, dim = len(in_shape), len(out_shape), shard.dim
    prefix = 0
    while prefix < min(n, m) and in_shape[prefix] is not None and in_shape[prefix] == out_shape[prefix]:
        prefix += 1
    nested = bool(shard.inner_blocks) and not shard.inner_flat
    if dim < prefix and not nested:
        return shard
    suffix = 0
    while (
        suffix < min(n, m) - prefix
        and in_shape[n - 1 - suffix] is not None
        and in_shape[n - 1 - suffix] == out_shape[m - 1 - suffix]
    ):
        suffix += 1
    if nested:
        # The inner blocks live on dim + 1: both axes must come through unchanged.
        if dim + 1 < prefix:
            return shard
        return shard.with_dim(dim + m - n) if dim >= n - suffix else None
    if dim >= n - suffix:
        return shard.with_dim(dim + m - n)
    middle_in = _static_dims(in_shape[prefix : n - suffix])
    middle_out = _static_dims(out_shape[prefix : m - suffix])
    if middle_in is None or middle_out is None:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(middle_in) and j < len(middle_out):
        gi, go = [i], [j]
        pi, po = middle_in[i], middle_out[j]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po and i < len(middle_in):
                pi *= middle_in[i]
                gi.append(i)
                i += 1
            elif po < pi and j < len(middle_out):
                po *= middle_out[j]
                go.append(j)
                j += 1
            else:
                return None
        groups.append((gi, go))
    local = dim - prefix
    for gi, go in groups:
        if local not in gi:
            continue
        ins = [d for d in gi if middle_in[d] != 1]
        outs = [d for d in go if middle_out[d] != 1]
        if not outs or local not in ins or ins[0] != local:
            return None
        first_out = outs[0]
        if len(ins) == 1 and len(outs) == 1:
            return shard.with_dim(prefix + first_out)
        if shard.inner_flat:
            sizes = [middle_out[d] for d in outs]
            return _split_groups(shard, sizes, prefix + first_out, outs) if len(ins) == 1 else None
        if len(ins) > 1 and len(outs) == 1:
            if shard.inner:
                # repeat_kv's [kv_heads, n_rep] merged into the query heads: split tp ways again.
                return Shard(prefix + first_out) if ins == [local, local + 1] else None
            return None if shard.blocks else Shard(prefix + first_out, (), shard.parts)
        if len(ins) == 1 and len(outs) > 1:
            if shard.blocks:
                # [3*H] -> [3, H]: the fused blocks become their own axis; the next one is split.
                widths = set(shard.blocks)
                rest = 1
                for d in outs[1:]:
                    rest *= middle_out[d]
                if len(widths) == 1 and middle_out[first_out] == len(shard.blocks) and rest == shard.blocks[0]:
                    second = outs[1]
                    ctx.require_divisible(node, "num_heads", [middle_out[second]])
                    return Shard(prefix + second)
                if not shard.inner and all(block % rest == 0 for block in shard.blocks):
                    # [.., (q|k|v heads) * head_dim] -> [.., heads, head_dim] (Falcon's fused multi-query
                    # qkv): the blocks become head counts on the heads axis, each split as before.
                    heads = tuple(block // rest for block in shard.blocks)
                    for index, count in enumerate(heads):
                        replicable = shard.block_parts(index, ctx.tp) < ctx.tp
                        ctx.require_divisible(node, "num_heads", [count], replicable=replicable)
                    if any(count % shard.block_parts(i, ctx.tp) for i, count in enumerate(heads)):
                        return None  # heads split finer than heads: the constraints above name the tp values
                    return Shard(prefix + first_out, heads, shard.parts)
                return None
            if shard.inner:
                return None
            ctx.require_divisible(node, "num_heads", [middle_out[first_out]], replicable=bool(shard.parts))
            return Shard(prefix + first_out, (), shard.parts)
        return None
    return None


def _split_groups(shard: Shard, sizes: list[int], out_dim: int, outs: list[int]) -> Shard | None:
    """[.., parts * sum(inner_blocks)] -> [.., parts, heads per part, head_dim..]: the inner blocks move to
    the heads axis, counted in heads."""
    if len(sizes) < 3 or outs[1] != outs[0] + 1 or sizes[0] != shard.parts[0]:
        return None
    rest = 1
    for size in sizes[2:]:
        rest *= size
    if any(block % rest for block in shard.inner_blocks) or sum(shard.inner_blocks) != sizes[1] * rest:
        return None
    heads = tuple(block // rest for block in shard.inner_blocks)
    if any(count % parts for count, parts in zip(heads, shard.inner_parts, strict=True)):
        return None
    return Shard(out_dim, (), shard.parts, shard.inner, heads, shard.inner_parts)


@register(["Reshape", "Flatten"], inner_blocks=True)
def reshape_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    if shard is None:
        return replicated(node)
    target = map_reshape_dim(ctx, node, ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0]), shard)
    if target is None:
        return replicated(node)
    return Decision([shard, *([REPLICATE] * (len(node.inputs) - 1))], [target])


@register(["Transpose"])
def transpose_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    if shard is None:
        return replicated(node)
    rank = ctx.rank(node.inputs[0])
    perm = attr_ints(node, "perm") or (list(reversed(range(rank))) if rank is not None else None)
    if perm is None or shard.inner:
        return replicated(node)
    return Decision([shard], [shard.with_dim(perm.index(shard.dim))])


def _axes(ctx: RuleContext, node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return ctx.constant_ints(node.inputs[1])
    return attr_ints(node, "axes")


@register(["Unsqueeze"])
def unsqueeze_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    axes = _axes(ctx, node)
    out_rank = ctx.rank(node.outputs[0])
    if shard is None or axes is None or out_rank is None:
        return replicated(node)
    inserted = {normalize_dim(a, out_rank) for a in axes}
    kept = [d for d in range(out_rank) if d not in inserted]
    return Decision([shard, *([REPLICATE] * (len(node.inputs) - 1))], [shard.with_dim(kept[shard.dim])])


@register(["Squeeze"])
def squeeze_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    in_shape = ctx.shape(node.inputs[0])
    if shard is None or in_shape is None:
        return replicated(node)
    axes = _axes(ctx, node)
    removed = (
        {normalize_dim(a, len(in_shape)) for a in axes}
        if axes is not None
        else {d for d, size in enumerate(in_shape) if size == 1}
    )
    if shard.dim in removed:
        return replicated(node)
    new_dim = shard.dim - sum(1 for a in removed if a < shard.dim)
    return Decision([shard, *([REPLICATE] * (len(node.inputs) - 1))], [shard.with_dim(new_dim)])


@register(["Expand"])
def expand_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    in_rank, out_rank = ctx.rank(node.inputs[0]), ctx.rank(node.outputs[0])
    if shard is None or in_rank is None or out_rank is None or shard.inner:
        return replicated(node)
    out_dim = shard.dim + out_rank - in_rank
    in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if (
        shard.is_replicated_within(ctx.tp)
        and not shard.blocks
        and in_shape is not None
        and out_shape is not None
        and shard.dim + 1 < in_rank
        and in_shape[shard.dim + 1] == 1
        and isinstance(repeated := out_shape[out_dim + 1], int)
        and repeated > 1
    ):
        # repeat_kv with fewer kv heads than ranks: a rank repeats its kv head only for its own query heads.
        repeat = ctx.tp // shard.parts[0]
        ctx.require_divisible(node, "num_heads/kv_heads", [repeated * shard.parts[0]])
        return Decision([shard, REPLICATE], [Shard(out_dim, (), shard.parts, inner=repeat)])
    return Decision([shard, REPLICATE], [shard.with_dim(out_dim)])


@register(["Concat"])
def concat_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    out_rank = ctx.rank(node.outputs[0])
    shards = {p for p in placements if isinstance(p, Shard)}
    if len(shards) != 1 or out_rank is None:
        return replicated(node)
    (shard,) = shards
    axis = normalize_dim(attr_int(node, "axis", 0), out_rank)
    if shard.dim == axis:
        return replicated(node)
    return Decision([shard if v is not None else None for v in node.inputs], [shard])


def _split_sizes(ctx: RuleContext, node: ir.Node, size: int | None) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return ctx.constant_ints(node.inputs[1])
    sizes = attr_ints(node, "split")
    if sizes is not None:
        return sizes
    parts = attr_int(node, "num_outputs", len(node.outputs))
    if size is None:
        return None
    step = -(-size // parts)
    return [min(step, size - i * step) for i in range(parts)]


@register(["Split"])
def split_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    rank = ctx.rank(node.inputs[0])
    if shard is None or rank is None:
        return replicated(node)
    axis = normalize_dim(attr_int(node, "axis", 0), rank)
    rest = [REPLICATE] * (len(node.inputs) - 1)
    if axis != shard.dim:
        return Decision([shard, *rest], [shard] * len(node.outputs))
    sizes = _split_sizes(ctx, node, ctx.static_dim(node.inputs[0], axis))
    if shard.blocks and sizes is not None and tuple(sizes) == shard.blocks:
        return Decision([shard, *rest], [shard.block(i) for i in range(len(node.outputs))])
    return replicated(node)


def slice_params(ctx: RuleContext, node: ir.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Constant (starts, ends, axes, steps) of a Slice, or None when any is computed at run time."""
    starts = ctx.constant_ints(node.inputs[1])
    ends = ctx.constant_ints(node.inputs[2])
    if starts is None or ends is None:
        return None
    axes = ctx.constant_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = ctx.constant_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None) or (
        len(node.inputs) > 4 and node.inputs[4] is not None and steps is None
    ):
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps


def slice_axes(ctx: RuleContext, node: ir.Node, rank: int) -> list[int] | None:
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = ctx.constant_ints(node.inputs[3])
        return None if axes is None else [normalize_dim(a, rank) for a in axes]
    starts = node.inputs[1]
    shape = ctx.shape(starts)
    if shape is None or not isinstance(shape[0], int):
        return None
    return list(range(shape[0]))


def block_of_slice(shard: Shard, size: int, start: int, end: int, step: int) -> int | None:
    """Which block of a fused shard a Slice selects exactly, or None."""
    return block_of_range(shard.blocks or (size,), size, start, end, step)


def block_of_range(blocks: tuple[int, ...], size: int, start: int, end: int, step: int) -> int | None:
    """Which of `blocks` (adding up to `size`) the range [start, end) selects exactly, or None."""
    if step != 1:
        return None
    start = start + size if start < 0 else start
    end = min(end + size if end < 0 else end, size)
    offset = 0
    for index, block in enumerate(blocks):
        if start == offset and end == offset + block:
            return index
        offset += block
    return None


@register(["Slice"], inner_blocks=True)
def slice_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    rank = ctx.rank(node.inputs[0])
    if shard is None or rank is None:
        return replicated(node)
    rest: list[Placement | None] = [REPLICATE if v is not None else None for v in node.inputs[1:]]
    axes = slice_axes(ctx, node, rank)
    if axes is None:
        return replicated(node)
    if shard.inner_blocks:
        return _inner_block_slice(ctx, node, shard, axes, rest)
    if shard.dim not in axes:
        return Decision([shard, *rest], [shard])
    params = slice_params(ctx, node)
    size = ctx.static_dim(node.inputs[0], shard.dim)
    if size is None:
        return replicated(node)
    if params is None:
        # Bounds computed at run time from the local shape (torch's chunk): one of equal blocks.
        out_width = ctx.static_dim(node.outputs[0], shard.dim) if ctx.rank(node.outputs[0]) == rank else None
        if shard.blocks and len(set(shard.blocks)) == 1 and out_width == shard.blocks[0] and len(set(shard.parts)) <= 1:
            return Decision([shard, *rest], [shard.block(0)])
        return replicated(node)
    starts, ends, _, steps = params
    k = axes.index(shard.dim)
    block = block_of_slice(shard, size, starts[k], ends[k], steps[k])
    if block is None:
        return replicated(node)
    return Decision([shard, *rest], [shard.block(block)])


def _inner_block_slice(
    ctx: RuleContext, node: ir.Node, shard: Shard, axes: list[int], rest: list[Placement | None]
) -> Decision:
    """A Slice of a shard with inner blocks keeps it when it cuts neither split axis, or takes one inner block."""
    if shard.dim not in axes and (shard.inner_flat or shard.dim + 1 not in axes):
        return Decision([shard, *rest], [shard])
    params = slice_params(ctx, node)
    size = ctx.static_dim(node.inputs[0], shard.dim + 1)
    if shard.inner_flat or shard.dim in axes or params is None or size is None:
        return replicated(node)
    starts, ends, _, steps = params
    k = axes.index(shard.dim + 1)
    block = block_of_range(shard.inner_blocks, size, starts[k], ends[k], steps[k])
    return _inner_block_of(node, shard, block, [shard, *rest])


def _inner_block_of(node: ir.Node, shard: Shard, block: int | None, inputs: list[Placement | None]) -> Decision:
    if block is None or shard.inner_parts[block] not in (1, shard.inner):
        return replicated(node)
    return Decision(inputs, [shard.inner_block(block)])


def inner_gathered_block(ctx: RuleContext, node: ir.Node, shard: Shard) -> int | None:
    """Which inner block (on dim + 1) a Gather takes whole (constant, ascending, contiguous indices)."""
    indices = ctx.constant_ints(node.inputs[1])
    size = ctx.static_dim(node.inputs[0], shard.dim + 1)
    if not indices or size is None:
        return None
    indices = [i + size if i < 0 else i for i in indices]
    if indices != list(range(indices[0], indices[0] + len(indices))):
        return None
    return block_of_range(shard.inner_blocks, size, indices[0], indices[-1] + 1, 1)


def _inner_block_gather(ctx: RuleContext, node: ir.Node, data: Shard, axis: int, idx_rank: int) -> Decision:
    if axis not in ((data.dim,) if data.inner_flat else (data.dim, data.dim + 1)):
        out_dim = data.dim if data.dim < axis else data.dim + idx_rank - 1
        return Decision([data, REPLICATE], [data.with_dim(out_dim)])
    if data.inner_flat or axis != data.dim + 1 or idx_rank != 1:
        return replicated(node)
    return _inner_block_of(node, data, inner_gathered_block(ctx, node, data), [data, REPLICATE])


@register(["Gather"], inner_blocks=True)
def gather_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    data_rank, idx_rank = ctx.rank(node.inputs[0]), ctx.rank(node.inputs[1])
    if data_rank is None or idx_rank is None:
        return replicated(node)
    axis = normalize_dim(attr_int(node, "axis", 0), data_rank)
    data, indices = placements
    role = ctx.role(node)
    if role is not None and role.kind == "vocab" and not isinstance(indices, Shard | Partial):
        # Vocab-parallel embedding: each rank looks up the ids in its rows (others give zeros): a partial sum.
        table = node.inputs[0]
        assert table is not None  # its rank is known, so the input is present
        vocab = ctx.static_dim(table, 0)
        if vocab is not None:
            ctx.require_divisible(node, "the vocabulary size", [vocab], value=table.name)
        return Decision([Shard(0), REPLICATE], [PARTIAL_SUM])
    if isinstance(data, Shard) and data.inner_blocks:
        return replicated(node) if isinstance(indices, Shard) else _inner_block_gather(ctx, node, data, axis, idx_rank)
    if isinstance(data, Shard) and not isinstance(indices, Shard) and data.dim != axis:
        out_dim = data.dim if data.dim < axis else data.dim + idx_rank - 1
        return Decision([data, REPLICATE], [data.with_dim(out_dim)])
    if isinstance(data, Shard) and data.blocks and data.dim == axis and not isinstance(indices, Shard):
        taken = _gathered_block(ctx, node, data, idx_rank)
        if taken is not None:
            return Decision([data, REPLICATE], [taken])
    if isinstance(indices, Shard) and not isinstance(data, Shard):
        return Decision([REPLICATE, indices], [indices.with_dim(axis + indices.dim)])
    return replicated(node)


def gathered_block(ctx: RuleContext, node: ir.Node, shard: Shard) -> int | None:
    """Which block of a fused shard a Gather on its axis takes whole (constant, ascending, contiguous indices)."""
    indices = ctx.constant_ints(node.inputs[1])
    size = ctx.static_dim(node.inputs[0], shard.dim)
    if not indices or size is None:
        return None
    indices = [i + size if i < 0 else i for i in indices]
    if indices != list(range(indices[0], indices[0] + len(indices))):
        return None
    return block_of_slice(shard, size, indices[0], indices[-1] + 1, 1)


def _gathered_block(ctx: RuleContext, node: ir.Node, shard: Shard, idx_rank: int) -> Placement | None:
    """What a Gather that takes one whole block of a fused shard holds: that block's plain shard.

    A scalar index drops the axis: only a block of one element that every rank holds whole survives that.
    """
    block = gathered_block(ctx, node, shard)
    if block is None or idx_rank > 1 or shard.blocks[block] % shard.block_parts(block, ctx.tp):
        return None  # (a tp that splits a block's heads finer than heads is reported by the Reshape)
    if idx_rank == 1:
        return shard.block(block)
    whole = shard.blocks[block] == 1 and shard.block_parts(block, ctx.tp) == 1
    return REPLICATE if whole else None


@register(["Shape", "Size"], inner_blocks=True)
def shape_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    # The shape is read at run time from the LOCAL tensor; localize corrects the consumers that need it.
    return Decision([None], [REPLICATE])


@register(["ConstantOfShape", "Range", "Constant", "EyeLike", "NonZero", "RandomNormalLike", "RandomUniformLike"])
def replicated_producers(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    return replicated(node)


@register(["Trilu"])
def trilu_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = _only_shard(placements)
    rank = ctx.rank(node.inputs[0])
    if shard is None or rank is None or shard.dim >= rank - 2:
        return replicated(node)
    return Decision([shard, *([REPLICATE] * (len(node.inputs) - 1))], [shard])


# --------------------------------------------------------------------------- shape functions


def constant_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    tensor = attr_tensor(node, "value")
    if tensor is None:
        raise PlanError(f"Constant node {node.name!r} uses an attribute other than `value`; re-export it")
    array = tensor.numpy()
    return [TensorShape(tuple(array.shape), tensor.dtype, array)]


def shape_of_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    start = attr_int(node, "start", 0)
    end = node.attributes.get("end")
    shape = np.array(first.shape[start : None if end is None else end.as_int()], dtype=np.int64)
    return [TensorShape((len(shape),), ir.DataType.INT64, shape)]


def size_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    return [TensorShape((), ir.DataType.INT64, np.array(first_input(inputs).numel, dtype=np.int64))]


def gather_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first, indices = first_input(inputs), inputs[1]
    assert indices is not None
    axis = norm_axis(attr_int(node, "axis", 0), len(first.shape))
    return [TensorShape(first.shape[:axis] + indices.shape + first.shape[axis + 1 :], first.dtype)]


def reshape_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    target = input_ints(inputs, 1, node, "target shape")
    return [TensorShape(reshaped(first.shape, target, bool(attr_int(node, "allowzero", 0)), node), first.dtype)]


def flatten_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    axis = norm_axis(attr_int(node, "axis", 1), len(first.shape))
    return [TensorShape((math.prod(first.shape[:axis]), math.prod(first.shape[axis:])), first.dtype)]


def transpose_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    perm = attr_ints(node, "perm")
    order = list(perm) if perm is not None else list(reversed(range(len(first.shape))))
    return [TensorShape(tuple(first.shape[p] for p in order), first.dtype)]


def concat_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    present = [i for i in inputs if i is not None]
    axis = norm_axis(required_int(node, "axis"), len(first.shape))
    shape = list(present[0].shape)
    shape[axis] = sum(i.shape[axis] for i in present)
    return [TensorShape(tuple(shape), first.dtype)]


def slice_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    return [TensorShape(sliced(first.shape, inputs, node), first.dtype)]


def split_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    axis = norm_axis(attr_int(node, "axis", 0), len(first.shape))
    split = attr_ints(node, "split")
    if split is None and len(inputs) > 1 and inputs[1] is not None:
        split = int_list(inputs[1].value, node, "split sizes")
    count = len(node.outputs)
    if split is None:
        size = first.shape[axis]
        chunk = -(-size // count)
        split = [min(chunk, size - chunk * i) for i in range(count)]
    outs = []
    for part in split:
        shape = list(first.shape)
        shape[axis] = int(part)
        outs.append(TensorShape(tuple(shape), first.dtype))
    return outs


def squeeze_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """Squeeze and Unsqueeze: axes from the attribute (older opsets) or the second input."""
    first = first_input(inputs)
    axes = attr_ints(node, "axes")
    if axes is None and len(inputs) > 1 and inputs[1] is not None:
        axes = int_list(inputs[1].value, node, "axes")
    return [TensorShape(squeezed(node.op_type, first.shape, axes), first.dtype)]


def expand_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    target = tuple(input_ints(inputs, 1, node, "target shape"))
    return [TensorShape(broadcast(first.shape, target), first.dtype)]


def tile_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    repeats = input_ints(inputs, 1, node, "repeats")
    return [TensorShape(tuple(d * r for d, r in zip(first.shape, repeats, strict=True)), first.dtype)]


def constant_of_shape_shape(
    env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]
) -> list[TensorShape]:
    target = tuple(int_list(first_input(inputs).value, node, "shape"))
    tensor = attr_tensor(node, "value")
    dtype = tensor.dtype if tensor is not None else ir.DataType.FLOAT
    return [TensorShape(target, dtype)]


def range_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    values = [int_list(i.value, node, "bounds")[0] if i is not None else 0 for i in inputs]
    start, limit, delta = values
    return [TensorShape((max(math.ceil((limit - start) / delta), 0),), first.dtype)]


def pad_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    pads = input_ints(inputs, 1, node, "pads")
    rank = len(first.shape)
    return [TensorShape(tuple(d + pads[i] + pads[i + rank] for i, d in enumerate(first.shape)), first.dtype)]


def gather_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    data, indices = known_arrays(arrays, 2)
    return np.take(data, indices, axis=attr_int(node, "axis", 0))


def concat_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    return np.concatenate([x for x in arrays if x is not None], axis=required_int(node, "axis"))


def squeeze_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    a = np.asarray(arrays[0])
    axes = attr_ints(node, "axes")
    if axes is None and len(arrays) > 1 and arrays[1] is not None:
        axes = [int(v) for v in np.asarray(arrays[1]).reshape(-1)]
    return a.reshape(squeezed(node.op_type, tuple(a.shape), axes))


def reshape_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    a = np.asarray(arrays[0])
    target = [int(v) for v in np.asarray(arrays[1]).reshape(-1)]
    return a.reshape(reshaped(tuple(a.shape), target, bool(attr_int(node, "allowzero", 0)), node))


def range_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    start, limit, delta = known_arrays(arrays, 3)
    # numpy's stubs take scalars only; 0-d arrays, which these are, work the same at run time.
    return np.arange(start, limit, delta, dtype=np.asarray(start).dtype)  # type: ignore[call-overload]


def constant_of_shape_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    shape = tuple(int(v) for v in np.asarray(arrays[0]).reshape(-1))
    if math.prod(shape) > MAX_COMPUTED_ELEMENTS:
        return None
    tensor = attr_tensor(node, "value")
    fill = tensor.numpy().reshape(-1)[0] if tensor is not None else np.float32(0)
    return np.full(shape, fill, dtype=np.asarray(fill).dtype)


def non_zero_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    data = np.asarray(known_arrays(arrays, 1)[0])
    # [rank, count]: one row of indices per axis (a scalar's NonZero is left to the shape rule).
    return np.stack(np.nonzero(data)).astype(np.int64) if data.ndim else None


def non_zero_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """[rank, count of non-zeros]: the count is the input's data, known only where the planner computed it
    (torch's legacy export of repeat_interleave takes NonZero of a constant mask: Cohere's rotary)."""
    first = first_input(inputs)
    if first.value is None:
        source = node.inputs[0].name if node.inputs[0] is not None else ""
        raise PlanError(
            f"node {node.name!r} (NonZero): its output's size is the number of non-zeros of {source!r}, known only "
            "at run time, so the planner cannot size it; data-dependent ops (a mixture of experts' token routing, "
            "for one) are not supported: export the model without them"
        )
    return [TensorShape((len(first.shape), int(np.count_nonzero(first.value))), ir.DataType.INT64)]


def expand_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    a = known_arrays(arrays, 1)[0]
    target = tuple(int(v) for v in np.asarray(arrays[1]).reshape(-1))
    shape = broadcast(np.asarray(a).shape, target)
    if math.prod(shape) > MAX_COMPUTED_ELEMENTS:
        return None
    return np.broadcast_to(a, shape).copy()


def slice_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    a = np.asarray(arrays[0])
    shape = sliced(
        tuple(a.shape), [TensorShape((), ir.DataType.INT64, x) if x is not None else None for x in arrays], node
    )
    starts = [int(v) for v in np.asarray(arrays[1]).reshape(-1)]
    ends = [int(v) for v in np.asarray(arrays[2]).reshape(-1)]
    rank = a.ndim
    has_axes = len(arrays) > 3 and arrays[3] is not None
    axes = [int(v) for v in np.asarray(arrays[3]).reshape(-1)] if has_axes else list(range(len(starts)))
    has_steps = len(arrays) > 4 and arrays[4] is not None
    steps = [int(v) for v in np.asarray(arrays[4]).reshape(-1)] if has_steps else [1] * len(axes)
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[norm_axis(axis, rank)] = slice(start, end, step)
    result = a[tuple(index)]
    assert result.shape == shape
    return result


def _localize_target(localizer: Localizer, graph: ir.Graph, node: ir.Node) -> None:
    localizer.localize_target(graph, node)


def _localize_split(localizer: Localizer, graph: ir.Graph, node: ir.Node) -> None:
    localizer.localize_split(graph, node)


def _localize_slice(localizer: Localizer, graph: ir.Graph, node: ir.Node) -> None:
    localizer.localize_slice(graph, node)


def _localize_gather(localizer: Localizer, graph: ir.Graph, node: ir.Node) -> None:
    localizer.localize_gather(graph, node)


define(["Constant"], shape=constant_shape)
define(["Shape"], shape=shape_of_shape)
define(["Size"], shape=size_shape)
define(["Gather"], shape=gather_shape, localize=_localize_gather, value=gather_value)
define(["Reshape"], shape=reshape_shape, localize=_localize_target, value=reshape_value)
define(["Expand"], shape=expand_shape, localize=_localize_target, value=expand_value)
define(["Flatten"], shape=flatten_shape)
define(["Transpose"], shape=transpose_shape)
define(["Concat"], shape=concat_shape, value=concat_value)
define(["Slice"], shape=slice_shape, localize=_localize_slice, value=slice_value)
define(["Split"], shape=split_shape, localize=_localize_split)
define(["Squeeze", "Unsqueeze"], shape=squeeze_shape, value=squeeze_value)
define(["Tile"], shape=tile_shape)
define(["ConstantOfShape"], shape=constant_of_shape_shape, value=constant_of_shape_value)
define(["Range"], shape=range_shape, value=range_value)
define(["NonZero"], shape=non_zero_shape, value=non_zero_value)
define(["Pad"], shape=pad_shape)
define(["Trilu"], shape=same_as_first)
