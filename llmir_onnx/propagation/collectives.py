"""The ai.llmir ops' records: the collectives and pipeline transfers the partitioner itself inserts.

They have no sharding rule (insert_collectives and the stage split place them after propagation) and
carry no size to localize; their shapes follow `ops.collective_axis_length`, the rule the ops' ONNX
schemas infer by. The planner evaluates one rank alone: an even AllGather of a small known integer tensor
takes every member to contribute what this rank does (`gather_value`). (The sequence-sharded KV cache,
passes/context_parallel_cache.py, gathered its runs' lengths so until its fixed blocks (issue 14); no pass
inserts such a gather now.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.errors import PlanError
from llmir_onnx.propagation.registry import ShapeEnvironment, attr_int, attr_ints, define
from llmir_onnx.propagation.tensor_shapes import TensorShape, first_input, norm_axis, same_as_first


def gather_scatter_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    op = node.op_type
    group = attr_ints(node, "group") or []
    if not group:
        raise PlanError(f"node {node.name!r} ({op}) has no group; the planner needs the group size")
    axis = norm_axis(attr_int(node, "axis", 0), len(first.shape))
    shape = list(first.shape)
    sizes = (attr_ints(node, "sizes") or []) if op == ops.ALL_GATHER else []
    if sizes and (len(sizes) != len(group) or shape[axis] not in sizes):
        # unequal parts: this rank's input is one of them, the output all of them
        raise PlanError(
            f"node {node.name!r} (AllGather) has sizes {sizes} for a group of {len(group)} ranks and an "
            f"input of {shape[axis]} along axis {axis}; list each member's length, in group order"
        )
    length = ops.collective_axis_length(op, shape[axis], len(group), sizes or None)
    if length is None:
        raise PlanError(
            f"node {node.name!r} ({op}) splits axis {axis} of length {shape[axis]} over a group of {len(group)} "
            "ranks, which does not divide it"
        )
    shape[axis] = length
    return [TensorShape(tuple(shape), first.dtype)]


def gather_value(node: ir.Node, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """An even AllGather of a known (small integer) value, every member taken to hold this rank's value."""
    group = attr_ints(node, "group") or []
    first = inputs[0] if inputs else None
    if not group or first is None or attr_ints(node, "sizes"):
        return None
    axis = norm_axis(attr_int(node, "axis", 0), first.ndim)
    return np.concatenate([first] * len(group), axis=axis)


def send_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    # Its output is the element count it sent, known from the input's shape; the stage split orders
    # Sends through it (`shape + 0 * count`), so later Reshape targets depend on it.
    first = first_input(inputs)
    return [TensorShape((), ir.DataType.INT64, np.array(first.numel, dtype=np.int64))]


def recv_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    shape = attr_ints(node, "shape") or []
    output = node.outputs[0]
    if not shape or any(d < 0 for d in shape):
        # the attribute is static; a dynamic dim is bound like the graph's inputs by its symbolic name
        if output.shape is None:
            raise PlanError(f"Recv node {node.name!r} has no static shape and no declared output shape")
        shape = [env.bind_dim(d, node) for d in output.shape]
    return [TensorShape(tuple(int(d) for d in shape), first.dtype)]


define([ops.ALL_REDUCE], ops.LLMIR_DOMAIN, shape=same_as_first)
define([ops.ALL_GATHER], ops.LLMIR_DOMAIN, shape=gather_scatter_shape, value=gather_value)
define([ops.REDUCE_SCATTER], ops.LLMIR_DOMAIN, shape=gather_scatter_shape)
define([ops.SEND], ops.LLMIR_DOMAIN, shape=send_shape)
define([ops.RECV], ops.LLMIR_DOMAIN, shape=recv_shape)
