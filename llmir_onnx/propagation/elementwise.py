"""Elementwise ops with numpy broadcasting, unary and n-ary.

A shard survives an elementwise op when every input that is not broadcast along the sharded axis is
sharded the same way (weights are sliced to match, activations sliced locally). Partial survives
only ops that are linear in that argument: a sum of partials (Add/Sub of all-partial inputs, or of a
weight that is then held by rank 0 only), a partial times a replicated factor (Mul, Div by R).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llmir_onnx.placement import PARTIAL_SUM, REPLICATE, Partial, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, register, replicated
from llmir_onnx.propagation.registry import MS_DOMAIN, ShapeEnvironment, define
from llmir_onnx.propagation.tensor_shapes import (
    TensorShape,
    broadcast,
    first_input,
    known_arrays,
    required_input,
    required_int,
    same_as_first,
)


@dataclass(frozen=True)
class ElementwiseFamily:
    """Ops that share one sharding rule: numpy broadcasting over every input, one output shape.

    `partial` says how a Partial("sum") input may pass through (see `_linear_partial`): "sum" for ops
    linear in all their inputs together, "product" / "quotient" for ops linear in one factor, "linear"
    for unary ops with f(a + b) == f(a) + f(b), "" for none (the input is reduced first).
    """

    name: str
    ops: tuple[str, ...]
    domain: str = ""
    partial: str = ""


ELEMENTWISE_FAMILIES = (
    ElementwiseFamily(
        "math",
        (
            "Abs",
            "Acos",
            "Acosh",
            "Asin",
            "Asinh",
            "Atan",
            "Atanh",
            "Ceil",
            "Cos",
            "Cosh",
            "Erf",
            "Exp",
            "Floor",
            "Log",
            "Reciprocal",
            "Round",
            "Sign",
            "Sin",
            "Sinh",
            "Sqrt",
            "Tan",
            "Tanh",
        ),
    ),
    ElementwiseFamily(
        "activation",
        (
            "Celu",
            "Elu",
            "Gelu",
            "HardSigmoid",
            "HardSwish",
            "LeakyRelu",
            "Mish",
            "Relu",
            "Selu",
            "Shrink",
            "Sigmoid",
            "Softplus",
            "Softsign",
            "Swish",
            "ThresholdedRelu",
        ),
    ),
    ElementwiseFamily("linear", ("Neg", "Identity"), partial="linear"),
    ElementwiseFamily("cast", ("Cast", "CastLike"), partial="linear"),
    ElementwiseFamily("clip", ("Clip",)),
    ElementwiseFamily("test", ("IsInf", "IsNaN")),
    ElementwiseFamily("sum", ("Add", "Sub", "Sum"), partial="sum"),
    ElementwiseFamily("product", ("Mul",), partial="product"),
    ElementwiseFamily("quotient", ("Div",), partial="quotient"),
    ElementwiseFamily("arithmetic", ("Pow", "Max", "Min", "Mod", "Mean", "PRelu")),
    ElementwiseFamily("comparison", ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")),
    ElementwiseFamily("logical", ("And", "Or", "Xor", "Not")),
    ElementwiseFamily("bitwise", ("BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot")),
    ElementwiseFamily("select", ("Where",)),
    ElementwiseFamily("contrib activation", ("FastGelu", "QuickGelu", "BiasGelu", "Gelu"), domain="com.microsoft"),
)
# Ops of the default domain that keep their input's layout (annotate follows them to find head counts).
ELEMENTWISE_OPS = frozenset(op for family in ELEMENTWISE_FAMILIES if not family.domain for op in family.ops)
_PARTIAL_KIND = {(family.domain, op): family.partial for family in ELEMENTWISE_FAMILIES for op in family.ops}
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
    kind = _PARTIAL_KIND.get((_domain(node), node.op_type), "")
    present = [i for i, v in enumerate(node.inputs) if v is not None]
    partial = [i for i in present if isinstance(placements[i], Partial) and placements[i] == PARTIAL_SUM]
    if not partial or not kind:
        return None
    outputs: list[Placement] = [PARTIAL_SUM] * len(node.outputs)
    if kind == "sum":
        # Free inputs (weights) become Partial too: rank 0 holds them, the others zeros.
        if all(isinstance(placements[i], Partial) or placements[i] is None for i in present):
            return Decision([PARTIAL_SUM if v is not None else None for v in node.inputs], outputs)
        return None
    if kind == "product" and len(partial) == 1:
        return Decision([PARTIAL_SUM if i in partial else REPLICATE for i in range(len(node.inputs))], outputs)
    if kind == "quotient" and partial == [0]:
        return Decision([PARTIAL_SUM, REPLICATE], outputs)
    if kind == "linear" and partial == [0]:
        if node.op_type == "Cast" and not _casts_to_float(node):
            return None  # rounding to an integer type is not linear
        if node.op_type == "CastLike":
            return None  # its target type is a tensor's; keep the cautious answer
        return Decision([PARTIAL_SUM], outputs)
    return None


def _casts_to_float(node: ir.Node) -> bool:
    to = node.attributes.get("to")
    return to is not None and ir.DataType(to.as_int()) in FLOAT_TYPES


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


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


for _family in ELEMENTWISE_FAMILIES:
    register(_family.ops, domain=_family.domain)(elementwise_rule)


# --------------------------------------------------------------------------- shape functions

# Ops whose one output has the first input's shape and dtype (the planner's unary ops).
SAME_SHAPE_OPS = (
    "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Tanh", "Sigmoid", "Relu", "Erf", "CastLike",
    "Identity", "Gelu", "FastGelu", "QuickGelu", "Floor", "Ceil", "Round", "Sign", "HardSigmoid", "LeakyRelu", "Elu",
    "Selu", "Softplus", "Clip", "Dropout", "BiasGelu",
)  # fmt: skip
BOOL_RESULT_OPS = ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor")
BROADCAST_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Sum", "Mean", "BitwiseAnd", "BitwiseOr", "PRelu",
)  # fmt: skip


def cast_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    return [TensorShape(first_input(inputs).shape, ir.DataType(required_int(node, "to")))]


def bool_unary_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    return [TensorShape(first_input(inputs).shape, ir.DataType.BOOL)]


def broadcast_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """numpy broadcasting of every present input; the first input's dtype (a comparison's: bool)."""
    first = first_input(inputs)
    shape = broadcast(*(i.shape for i in inputs if i is not None))
    return [TensorShape(shape, ir.DataType.BOOL if node.op_type in BOOL_RESULT_OPS else first.dtype)]


def where_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first_input(inputs)
    shape = broadcast(*(i.shape for i in inputs if i is not None))
    return [TensorShape(shape, required_input(inputs, 1, node, "X").dtype)]


_NUMPY_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Max": np.maximum,
    "Min": np.minimum,
    "Equal": np.equal,
    "Less": np.less,
    "LessOrEqual": np.less_equal,
    "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
}


def binary_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    a, b = known_arrays(arrays, 2)
    return _NUMPY_BINARY[node.op_type](a, b)


def div_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    a, b = known_arrays(arrays, 2)
    if np.issubdtype(np.asarray(a).dtype, np.integer):
        return np.trunc(np.asarray(a) / b).astype(np.asarray(a).dtype)  # ONNX integer Div truncates
    return np.divide(a, b)


def cast_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    return np.asarray(arrays[0]).astype(ir.DataType(required_int(node, "to")).numpy())


def where_value(node: ir.Node, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    condition, x, y = known_arrays(arrays, 3)
    return np.where(condition, x, y)


define(SAME_SHAPE_OPS, shape=same_as_first)
define(tuple(_NUMPY_BINARY), value=binary_value)
define(["Div"], value=div_value)
define(["Neg"], value=lambda node, arrays: np.negative(known_arrays(arrays, 1)[0]))
define(["Identity"], value=lambda node, arrays: arrays[0])
define(["Not"], value=lambda node, arrays: np.logical_not(known_arrays(arrays, 1)[0]))
define(["FastGelu", "QuickGelu", "BiasGelu", "Gelu"], domain=MS_DOMAIN, shape=same_as_first)
define(["Cast"], shape=cast_shape, value=cast_value)
define(["Not", "IsNaN", "IsInf"], shape=bool_unary_shape)
define((*BROADCAST_OPS, *BOOL_RESULT_OPS), shape=broadcast_shape)
define(["Where"], shape=where_shape, value=where_value)
