"""Concrete tensor shapes as the ops' shape functions see and return them, and the helpers they share.

The shape planner (`plan/shapes.py`) evaluates a model at concrete sizes by calling each node's
record's shape function (`registry.OpRecord.shape`) on its inputs' `TensorShape`s. They live here,
below plan/, because the shape functions live beside the sharding rules, one module per op family.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llmir_onnx.errors import PlanError

# Values with at most this many elements are computed (not only shaped) when their inputs are known.
MAX_COMPUTED_ELEMENTS = 4096


class ShapeMismatchError(PlanError):
    """The model cannot take the sizes it is evaluated at (`where`: the node that says so)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


@dataclass(frozen=True)
class TensorShape:
    shape: tuple[int, ...]
    dtype: ir.DataType
    value: np.ndarray | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * self.dtype.itemsize)


def attr(node: ir.Node, name: str, default: object = None) -> object:
    """An attribute's value, whatever its type, or `default`."""
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def attr_tensor(node: ir.Node, name: str) -> ir.TensorProtocol | None:
    """A tensor attribute of `node` (Constant's `value`), or None when it is absent."""
    attribute = node.attributes.get(name)
    if attribute is None:
        return None
    if attribute.type == ir.AttributeType.TENSOR:
        # as_tensor() would check the value against a runtime-checkable Protocol, which costs 0.2 ms a
        # call: a 70B-shaped graph's 11,708 Constants took 2.2 s of `plan` that way.
        return attribute.value
    return attribute.as_tensor()  # its TypeError names the attribute's actual type


def required_int(node: ir.Node, name: str) -> int:
    """An int attribute the op cannot be sized without; refused, naming the node, when it is absent."""
    attribute = node.attributes.get(name)
    if attribute is None:
        raise PlanError(f"node {node.name!r} ({node.op_type}) has no {name!r} attribute, which the op requires")
    return attribute.as_int()


def int_list(value: np.ndarray | None, node: ir.Node, what: str) -> list[int]:
    """A size input's known value; refuses one computed at run time from what the planner cannot evaluate."""
    if value is None:
        raise PlanError(
            f"node {node.name!r} ({node.op_type}): its {what} is computed at run time from values this "
            "planner cannot evaluate; export the model with static shape computations"
        )
    return [int(v) for v in np.asarray(value).reshape(-1)]


def required_input(inputs: list[TensorShape | None], index: int, node: ir.Node, what: str) -> TensorShape:
    """Input `index`, which the op cannot be sized without; refused, naming the node, when it is absent."""
    given = inputs[index] if index < len(inputs) else None
    if given is None:
        raise PlanError(f"node {node.name!r} ({node.op_type}) has no {what} input (input {index}); the op requires it")
    return given


def input_ints(inputs: list[TensorShape | None], index: int, node: ir.Node, what: str) -> list[int]:
    """The known value of size input `index` (a target shape, starts, pads...) as ints."""
    return int_list(required_input(inputs, index, node, what).value, node, what)


def known_arrays(arrays: list[np.ndarray | None], count: int) -> list[np.ndarray]:
    """The first `count` input values of a value function, inputs its op requires.

    A missing one is a malformed node: the ValueError makes the planner size it with the shape rule instead,
    which names the node.
    """
    known = [array for array in arrays[:count] if array is not None]
    if len(known) < count:
        raise ValueError(f"{count} input values needed, {len(known)} known")
    return known


def broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*shapes))


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def first_input(inputs: list[TensorShape | None]) -> TensorShape:
    first = inputs[0] if inputs else None
    assert first is not None
    return first


def out_dtype(node: ir.Node, index: int, fallback: ir.DataType) -> ir.DataType:
    """The declared dtype of output `index`, else `fallback` (ops whose output type is an attribute's)."""
    output = node.outputs[index]
    return output.dtype if output.dtype is not None else fallback


def matmul_dims(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if len(a) == 1 and len(b) == 1:
        return ()
    if len(a) == 1:
        return b[:-2] + b[-1:]
    if len(b) == 1:
        return a[:-1]
    return (*broadcast(a[:-2], b[:-2]), a[-2], b[-1])


def reshaped(shape: tuple[int, ...], target: list[int], allowzero: bool, node: ir.Node) -> tuple[int, ...]:
    out = [shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(target)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        total = math.prod(shape)
        if known == 0 or total % known:
            raise ShapeMismatchError(f"Reshape node {node.name!r}: cannot reshape {shape} to {target}")
        out[out.index(-1)] = total // known
    if math.prod(out) != math.prod(shape):
        raise ShapeMismatchError(f"Reshape node {node.name!r}: {shape} has a different size than {out}")
    return tuple(out)


def sliced(shape: tuple[int, ...], inputs: list[TensorShape | None], node: ir.Node) -> tuple[int, ...]:
    starts = input_ints(inputs, 1, node, "starts")
    ends = input_ints(inputs, 2, node, "ends")
    rank = len(shape)
    axes = (
        int_list(inputs[3].value, node, "axes")
        if len(inputs) > 3 and inputs[3] is not None
        else list(range(len(starts)))
    )
    steps = int_list(inputs[4].value, node, "steps") if len(inputs) > 4 and inputs[4] is not None else [1] * len(axes)
    out = list(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = norm_axis(axis, rank)
        out[axis] = len(range(*slice(start, end, step).indices(shape[axis])))
    return tuple(out)


def squeezed(op: str, shape: tuple[int, ...], axes: Sequence[int] | None) -> tuple[int, ...]:
    if op == "Unsqueeze":
        if axes is None:
            raise ValueError("Unsqueeze needs axes")  # callers give them; an absent one is a malformed node
        rank = len(shape) + len(axes)
        positions = sorted(norm_axis(int(a), rank) for a in axes)
        out = list(shape)
        for position in positions:
            out.insert(position, 1)
        return tuple(out)
    if axes is None:
        return tuple(d for d in shape if d != 1)
    drop = {norm_axis(int(a), len(shape)) for a in axes}
    return tuple(d for i, d in enumerate(shape) if i not in drop)


def same_as_first(env: object, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """Shape function of an op whose one output has its first input's shape and dtype."""
    first = first_input(inputs)
    return [TensorShape(first.shape, first.dtype)]
