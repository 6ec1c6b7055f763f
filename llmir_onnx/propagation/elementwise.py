"""Elementwise ops with numpy broadcasting, unary and n-ary.

A shard survives an elementwise op when every input that is not broadcast along the sharded axis is
sharded the same way (weights are sliced to match, activations sliced locally). Partial survives
only ops that are linear in that argument: a sum of partials (Add/Sub of all-partial inputs, or of a
weight that is then held by rank 0 only), a partial times a replicated factor (Mul, Div by R).
"""

from __future__ import annotations

import onnx_ir as ir

from llmir_onnx.placement import PARTIAL_SUM, REPLICATE, Partial, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, register, replicated

UNARY_OPS = (
    "Abs",
    "Acos",
    "Asin",
    "Atan",
    "Ceil",
    "Cos",
    "Cosh",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "IsInf",
    "IsNaN",
    "LeakyRelu",
    "Log",
    "Mish",
    "Neg",
    "Not",
    "Reciprocal",
    "Relu",
    "Round",
    "Selu",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Tan",
    "Tanh",
    "ThresholdedRelu",
    "Identity",
    "Cast",
    "CastLike",
    "FastGelu",
    "QuickGelu",
    "BiasGelu",
)
BINARY_OPS = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Max",
    "Min",
    "Mod",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Xor",
    "BitShift",
    "BitwiseAnd",
    "BitwiseOr",
    "Where",
    "Sum",
    "Mean",
    "PRelu",
)
# Ops f with f(sum_i x_i) == sum_i f(x_i): a partial input gives a partial output.
LINEAR_UNARY = ("Neg", "Identity")
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def _aligned(out_dim: int, out_rank: int, in_rank: int) -> int:
    return out_dim - (out_rank - in_rank)


def _broadcasts(ctx: RuleContext, value: ir.Value, dim: int) -> bool:
    shape = ctx.shape(value)
    return dim < 0 or (shape is not None and shape[dim] == 1)


def _out_rank(ctx: RuleContext, node: ir.Node) -> int | None:
    rank = ctx.rank(node.outputs[0])
    if rank is not None:
        return rank
    ranks = [ctx.rank(v) for v in node.inputs if v is not None]
    known = [r for r in ranks if r is not None]
    return max(known) if known and len(known) == len(ranks) else None


def _linear_partial(node: ir.Node, placements: list[Placement | None]) -> Decision | None:
    """The decision keeping a Partial output, or None when this op is not linear in its partial inputs."""
    op = node.op_type
    present = [i for i, v in enumerate(node.inputs) if v is not None]
    partial = [i for i in present if isinstance(placements[i], Partial) and placements[i] == PARTIAL_SUM]
    if not partial:
        return None
    outputs: list[Placement] = [PARTIAL_SUM] * len(node.outputs)
    if op in ("Add", "Sub", "Sum"):
        # Free inputs (weights) become Partial too: rank 0 holds them, the others zeros.
        if all(isinstance(placements[i], Partial) or placements[i] is None for i in present):
            return Decision([PARTIAL_SUM if v is not None else None for v in node.inputs], outputs)
        return None
    if op == "Mul" and len(partial) == 1:
        return Decision([PARTIAL_SUM if i in partial else REPLICATE for i in range(len(node.inputs))], outputs)
    if op == "Div" and partial == [0]:
        return Decision([PARTIAL_SUM, REPLICATE], outputs)
    if op in LINEAR_UNARY:
        return Decision([PARTIAL_SUM], outputs)
    if op == "Cast":
        to = node.attributes.get("to")
        if to is not None and ir.DataType(to.as_int()) in FLOAT_TYPES:
            return Decision([PARTIAL_SUM], outputs)
    return None


@register(UNARY_OPS + BINARY_OPS)
def elementwise_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    out_rank = _out_rank(ctx, node)
    shards: set[Shard] = set()
    for value, placement in zip(node.inputs, placements, strict=True):
        if isinstance(placement, Shard) and value is not None and out_rank is not None:
            in_rank = ctx.rank(value)
            if in_rank is None:
                return replicated(node)
            shards.add(placement.with_dim(placement.dim + out_rank - in_rank))
    if len(shards) == 1 and out_rank is not None:
        (out_shard,) = shards
        out_dim = out_shard.dim
        required: list[Placement | None] = []
        for value in node.inputs:
            if value is None:
                required.append(None)
                continue
            in_rank = ctx.rank(value)
            assert in_rank is not None
            dim = _aligned(out_dim, out_rank, in_rank)
            required.append(REPLICATE if _broadcasts(ctx, value, dim) else out_shard.with_dim(dim))
        return Decision(required, [out_shard] * len(node.outputs))
    linear = _linear_partial(node, placements)
    if linear is not None and not shards:
        return linear
    return replicated(node)
