"""Indexing ops by family: index tensors aligned element by element (GatherElements, ScatterElements) and
index tuples over leading axes (GatherND, ScatterND). Gather and Slice live with the shape ops.

A shard on an axis that no index selects along survives: every rank looks up (or writes) its own rows
with its own slice of the indices. A shard on an indexed axis needs the whole axis: replicated.
"""

from __future__ import annotations

import onnx_ir as ir

from llmir_onnx.placement import REPLICATE, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, normalize_dim, register, replicated
from llmir_onnx.propagation.registry import ShapeEnvironment, attr_int, define
from llmir_onnx.propagation.tensor_shapes import (
    TensorShape,
    first_input,
    input_ints,
    norm_axis,
    required_input,
    same_as_first,
)


def _the_shard(placements: list[Placement | None]) -> Shard | None:
    """The one shard among the inputs (the same axis everywhere), or None when there is none or several."""
    shards = {p for p in placements if isinstance(p, Shard)}
    if len(shards) != 1:
        return None
    (shard,) = shards
    return None if shard.blocks or shard.inner else shard


@register(["GatherElements", "ScatterElements"])
def elements_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    """data, indices (and updates) have one rank; output[i] reads (or writes) data at i with axis replaced."""
    shard = _the_shard(placements)
    rank = ctx.rank(node.inputs[0])
    if shard is None or rank is None:
        return replicated(node)
    axis = normalize_dim(attr_int(node, "axis", 0), rank)
    # The axes other than `axis` must match between data and indices to be split alike.
    sizes = {ctx.static_dim(v, shard.dim) for v in node.inputs if v is not None}
    if shard.dim == axis or len(sizes) != 1 or None in sizes:
        return replicated(node)
    return Decision([shard if v is not None else None for v in node.inputs], [shard])


@register(["GatherND", "ScatterND"])
def nd_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    """indices[..., :k] address k axes of data after its `batch_dims` leading ones; the rest are whole slices.

    GatherND: out = indices.shape[:-1] + data.shape[batch_dims + k:]. ScatterND: updates has that shape.
    """
    data_rank, index_rank = ctx.rank(node.inputs[0]), ctx.rank(node.inputs[1])
    k = ctx.static_dim(node.inputs[1], -1) if index_rank else None
    shard = _the_shard(placements)
    if shard is None or data_rank is None or not index_rank or k is None:
        return replicated(node)
    batch = attr_int(node, "batch_dims", 0)
    data_held, index_held = placements[0], placements[1]
    update_held = placements[2] if len(placements) > 2 else None
    # The data axis the shard stands for, wherever it arrives.
    if isinstance(data_held, Shard):
        dim = data_held.dim
    elif isinstance(index_held, Shard):
        if index_held.dim >= index_rank - 1:
            return replicated(node)  # the index tuples themselves
        if index_held.dim >= batch:
            if node.op_type == "ScatterND":
                return replicated(node)  # which rows a rank writes would depend on its indices
            return Decision([REPLICATE, index_held], [index_held])  # each rank looks up its own tuples
        dim = index_held.dim
    elif isinstance(update_held, Shard) and update_held.dim >= index_rank - 1:
        dim = update_held.dim - (index_rank - 1) + batch + k
    else:
        return replicated(node)
    if batch <= dim < batch + k:
        return replicated(node)  # an indexed axis
    slice_dim = dim if dim < batch else index_rank - 1 + dim - batch - k
    index_required: Placement = shard.with_dim(dim) if dim < batch else REPLICATE
    if node.op_type == "GatherND":
        return Decision([shard.with_dim(dim), index_required], [shard.with_dim(slice_dim)])
    return Decision([shard.with_dim(dim), index_required, shard.with_dim(slice_dim)], [shard.with_dim(dim)])


# --------------------------------------------------------------------------- shape functions


def gather_nd_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first, indices = first_input(inputs), inputs[1]
    assert indices is not None
    batch_dims = attr_int(node, "batch_dims", 0)
    depth = indices.shape[-1]
    return [TensorShape(indices.shape[:-1] + first.shape[batch_dims + depth :], first.dtype)]


def gather_elements_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    return [TensorShape(required_input(inputs, 1, node, "indices").shape, first_input(inputs).dtype)]


def one_hot_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """indices' shape with an axis of `depth` inserted at `axis`, in the type of `values` (a mixture of
    experts' router turns its top-k expert ids into masks this way)."""
    indices = first_input(inputs)
    depth = input_ints(inputs, 1, node, "depth")[0]
    values = required_input(inputs, 2, node, "values")
    axis = norm_axis(attr_int(node, "axis", -1), len(indices.shape) + 1)
    return [TensorShape((*indices.shape[:axis], depth, *indices.shape[axis:]), values.dtype)]


define(["GatherND"], shape=gather_nd_shape)
define(["OneHot"], shape=one_hot_shape)
define(["ScatterND", "ScatterElements"], shape=same_as_first)
define(["GatherElements"], shape=gather_elements_shape)
