"""Softmax, reductions and normalizations.

They keep a shard on any axis they do not reduce over. Over a sharded axis: ReduceSum gives Partial;
everything else (mean, max, norms over the hidden axis) needs the full axis, so the input is gathered.
"""

from __future__ import annotations

import onnx_ir as ir

from llmir_onnx.placement import PARTIAL_SUM, REPLICATE, Partial, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, normalize_dim, register, replicated
from llmir_onnx.propagation.registry import attr_int


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
    outputs: list[Placement] = [placement] + [
        placement for _ in node.outputs[1:]
    ]  # mean / inv_std keep the leading axes, so the same shard
    return Decision([placement, *([REPLICATE] * (len(node.inputs) - 1))], outputs)


@register(
    ["SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "SkipGroupNorm"],
    domain="com.microsoft",
)
def skip_norm_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    # The residual add is fused in: a Partial input is reduced first (the AllReduce of Megatron).
    return replicated(node)
