"""Softmax, reductions and normalizations.

They keep a shard on any axis they do not reduce over. Over a sharded axis: ReduceSum gives Partial;
everything else (mean, max, norms over the hidden axis) needs the full axis, so the input is gathered.
"""

from __future__ import annotations

import onnx_ir as ir

from llmir_onnx.placement import PARTIAL_SUM, REPLICATE, Partial, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, normalize_dim, register, replicated


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


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
        axis = normalize_dim(_attr_int(node, "axis", -1), rank)
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
        return [normalize_dim(_attr_int(node, "axis", 0), rank)]
    attr = node.attributes.get("axes")
    if attr is not None:
        return [normalize_dim(a, rank) for a in attr.as_ints()]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ctx.constant_ints(node.inputs[1])
        return None if axes is None else [normalize_dim(a, rank) for a in axes]
    if _attr_int(node, "noop_with_empty_axes", 0):
        return []
    return list(range(rank))


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
        if node.op_type == "ReduceSum" and not placement.blocks and not placement.is_replicated_within(ctx.tp):
            return Decision([placement, *rest], [PARTIAL_SUM])
        return replicated(node)
    keepdims = _attr_int(node, "keepdims", 1)
    new_dim = placement.dim if keepdims else placement.dim - sum(1 for a in axes if a < placement.dim)
    return Decision([placement, *rest], [placement.with_dim(new_dim)])


@register(["LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"])
@register(["SimplifiedLayerNormalization", "LayerNormalization"], domain="com.microsoft")
def norm_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    placement = placements[0]
    rank = ctx.rank(node.inputs[0])
    if not isinstance(placement, Shard) or rank is None:
        return replicated(node)
    axis = normalize_dim(_attr_int(node, "axis", -1), rank)
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
