"""Softmax, reductions and normalizations.

They keep a shard on any axis they do not reduce over. Over a sharded axis: ReduceSum gives Partial;
everything else (mean, max, norms over the hidden axis) needs the full axis, so the input is gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from llmir_onnx.placement import PARTIAL_SUM, REPLICATE, Partial, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, normalize_dim, register, replicated
from llmir_onnx.propagation.registry import MS_DOMAIN, Localizer, ShapeEnvironment, attr_int, attr_ints, define
from llmir_onnx.propagation.tensor_shapes import (
    TensorShape,
    attr,
    first_input,
    input_ints,
    int_list,
    known_arrays,
    norm_axis,
    same_as_first,
)


@register(["Softmax", "LogSoftmax", "Hardmax", "CumSum"])
def softmax_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = placements[0]
    rank = ctx.rank(node.inputs[0])
    if not isinstance(shard, Shard) or rank is None:
        return replicated(node)
    if node.op_type == "CumSum":
        axis_values = ctx.constant_ints(node.inputs[1])
        if axis_values is None:
            return replicated(node)
        axis = normalize_dim(axis_values[0], rank)
    else:
        axis = normalize_dim(attr_int(node, "axis", -1), rank)
    if axis == shard.dim:
        return replicated(node)
    return Decision([shard, *([REPLICATE] * (len(node.inputs) - 1))], [shard])


REDUCE_OPS = (
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "ArgMax",
    "ArgMin",
)


def _reduce_axes(ctx: RuleContext, node: ir.Node, rank: int) -> list[int] | None:
    if node.op_type in ("ArgMax", "ArgMin"):
        return [normalize_dim(attr_int(node, "axis", 0), rank)]
    attr = node.attributes.get("axes")
    if attr is not None:
        return [normalize_dim(a, rank) for a in attr.as_ints()]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ctx.constant_ints(node.inputs[1])
        return None if axes is None else [normalize_dim(a, rank) for a in axes]
    if attr_int(node, "noop_with_empty_axes", 0):
        return []
    return list(range(rank))


# Reductions whose result over the whole axis is a weighted sum of their results over its pieces.
PARTIAL_REDUCTIONS = ("ReduceSum", "ReduceSumSquare", "ReduceMean")


def partial_reduction_scale(op_type: str, placement: Shard, tp: int) -> float:
    """What localize multiplies a rank's partial reduction by (1: nothing to do).

    A rank's piece is 1/parts of the axis and `tp // parts` ranks hold the same piece: a mean over the
    piece weighs 1/parts of the whole mean, and each copy counts 1/(tp // parts) of it.
    """
    parts = placement.block_parts(0, tp)
    duplicates = tp // parts
    return 1.0 / (parts * duplicates) if op_type == "ReduceMean" else 1.0 / duplicates


@register(REDUCE_OPS)
def reduce_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    placement = placements[0]
    rank = ctx.rank(node.inputs[0])
    rest = [REPLICATE if v is not None else None for v in node.inputs[1:]]
    if isinstance(placement, Partial) and node.op_type == "ReduceSum" and placement == PARTIAL_SUM:
        return Decision([placement, *rest], [PARTIAL_SUM])
    if not isinstance(placement, Shard) or rank is None:
        return replicated(node)
    axes = _reduce_axes(ctx, node, rank)
    if axes is None:
        return replicated(node)
    if placement.dim in axes:
        if node.op_type in PARTIAL_REDUCTIONS and not placement.blocks and not placement.inner:
            # Each rank reduces its piece; localize scales the piece's mean (or a sum over pieces that
            # several ranks hold alike) so that the partials add up to the whole: one AllReduce of a
            # reduced tensor (RMSNorm's mean of squares over all heads) instead of a gather of the input.
            return Decision([placement, *rest], [PARTIAL_SUM])
        return replicated(node)
    keepdims = attr_int(node, "keepdims", 1)
    new_dim = placement.dim if keepdims else placement.dim - sum(1 for a in axes if a < placement.dim)
    return Decision([placement, *rest], [placement.with_dim(new_dim)])


@register(["LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"])
@register(["SimplifiedLayerNormalization", "LayerNormalization"], domain="com.microsoft")
def norm_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    placement = placements[0]
    rank = ctx.rank(node.inputs[0])
    if not isinstance(placement, Shard) or rank is None:
        return replicated(node)
    axis = normalize_dim(attr_int(node, "axis", -1), rank)
    if placement.dim >= axis:
        return replicated(node)
    # mean / inv_std keep the leading axes, so the same shard
    outputs: list[Placement] = [placement, *(placement for _ in node.outputs[1:])]
    return Decision([placement, *([REPLICATE] * (len(node.inputs) - 1))], outputs)


@register(
    ["SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "SkipGroupNorm"],
    domain="com.microsoft",
)
def skip_norm_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    # The residual add is fused in: a Partial input is reduced first (the AllReduce of Megatron).
    # Input and skip split alike on a leading axis (the tokens, under sequence parallelism) stay split:
    # the norm is over the last axis and the add is elementwise; gamma, beta and bias are per channel.
    x, skip = placements[0], placements[1] if len(placements) > 1 else None
    rank = ctx.rank(node.inputs[0])
    if not isinstance(x, Shard):
        return replicated(node)
    plain = x == skip and x.plain and not x.shares
    if plain and rank is not None and 0 <= x.dim < rank - 1 and ctx.rank(node.inputs[1]) == rank:
        rest: list[Placement | None] = [REPLICATE if v is not None else None for v in node.inputs[2:]]
        # An absent optional output (mean, inv_std) has no shape to split: it is nothing, call it replicated.
        outputs: list[Placement] = [x if ctx.rank(out) is not None else REPLICATE for out in node.outputs]
        return Decision([x, skip, *rest], outputs)
    return replicated(node)


# --------------------------------------------------------------------------- shape functions


def norm_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """Y like X; the optional statistics (mean, inv_std) keep the axes before `axis`, in float."""
    first = first_input(inputs)
    axis = norm_axis(attr_int(node, "axis", -1), len(first.shape))
    stat = first.shape[:axis] + (1,) * (len(first.shape) - axis)
    return [TensorShape(first.shape, first.dtype)] + [TensorShape(stat, ir.DataType.FLOAT)] * (len(node.outputs) - 1)


def skip_norm_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """Outputs 1, 2 are mean / inv_std (float), 3 is the input + skip sum."""
    first = first_input(inputs)
    stat = (*first.shape[:-1], 1)
    outs = [TensorShape(first.shape, first.dtype)]
    for index in range(1, len(node.outputs)):
        outs.append(TensorShape(first.shape, first.dtype) if index == 3 else TensorShape(stat, ir.DataType.FLOAT))
    return outs


def reduce_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    op = node.op_type
    keepdims = bool(attr(node, "keepdims", 1))
    rank = len(first.shape)
    axes: list[int] | None
    if op in ("ArgMax", "ArgMin"):
        axes = [attr_int(node, "axis", 0)]
    else:
        axes = attr_ints(node, "axes")
        if axes is None and len(inputs) > 1 and inputs[1] is not None:
            axes = int_list(inputs[1].value, node, "axes")
        if axes is None or len(axes) == 0:
            if attr(node, "noop_with_empty_axes", 0):
                return [TensorShape(first.shape, first.dtype)]
            axes = list(range(rank))
    kept = {norm_axis(int(a), rank) for a in axes}
    shape = tuple(1 if i in kept else d for i, d in enumerate(first.shape) if keepdims or i not in kept)
    dtype = ir.DataType.INT64 if op in ("ArgMax", "ArgMin") else first.dtype
    return [TensorShape(shape, dtype)]


# Reductions the planner computes on small known tensors: torch's legacy export of repeat_interleave
# (Cohere's rotary) takes the repeat count as ReduceMax(ConstantOfShape(..., value=2)) into an Expand target.
_NUMPY_REDUCTIONS: dict[str, Callable[..., Any]] = {
    "ReduceSum": np.sum,
    "ReduceMean": np.mean,
    "ReduceMax": np.max,
    "ReduceMin": np.min,
    "ReduceProd": np.prod,
}


def reduce_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    data = np.asarray(known_arrays(arrays, 1)[0])
    axes = attr_ints(node, "axes")
    if axes is None and len(arrays) > 1 and arrays[1] is not None:
        axes = [int(v) for v in np.asarray(arrays[1]).reshape(-1)]
    if not axes:
        if attr_int(node, "noop_with_empty_axes", 0):
            return data
        axes = list(range(data.ndim))
    reduced = _NUMPY_REDUCTIONS[node.op_type](data, axis=tuple(axes), keepdims=bool(attr_int(node, "keepdims", 1)))
    return np.asarray(reduced, dtype=data.dtype)  # numpy's mean of integers is a float; ONNX keeps the type


def top_k_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    k = input_ints(inputs, 1, node, "k")[0]
    axis = norm_axis(attr_int(node, "axis", -1), len(first.shape))
    shape = (*first.shape[:axis], k, *first.shape[axis + 1 :])
    return [TensorShape(shape, first.dtype), TensorShape(shape, ir.DataType.INT64)]


def _scale_partial_reduction(localizer: Localizer, graph: ir.Graph, node: ir.Node) -> None:
    localizer.scale_partial_reduction(graph, node)


define(["Softmax", "LogSoftmax", "CumSum"], shape=same_as_first)
define(["LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"], shape=norm_shape)
define(["LayerNormalization", "SimplifiedLayerNormalization"], domain=MS_DOMAIN, shape=norm_shape)
define(["SkipSimplifiedLayerNormalization", "SkipLayerNormalization"], domain=MS_DOMAIN, shape=skip_norm_shape)
define(REDUCE_OPS, shape=reduce_shape)
define(tuple(_NUMPY_REDUCTIONS), value=reduce_value)
define(PARTIAL_REDUCTIONS, localize=_scale_partial_reduction)
define(["TopK"], shape=top_k_shape)
