"""The ai.llmir custom-op domain, in one place: names, attributes, dtypes, shape rules, node builders.

The C++ library in custom_ops/ implements these ops for onnxruntime; this module gives them ONNX
schemas (registered with `onnx.defs.register_schema`, with type and shape inference) so that models
using them pass `onnx.checker.check_model(model, full_check=True)` and keep their shapes under
`onnx.shape_inference.infer_shapes`. Importing this module registers the schemas (idempotently).

| op            | inputs   | outputs          | attributes                                     |
|---------------|----------|------------------|------------------------------------------------|
| AllReduce     | X: T     | Y: T (X's shape) | reduction ("sum"), group                       |
| AllGather     | X: T     | Y: T             | axis (0), group, sizes (optional)              |
| ReduceScatter | X: T     | Y: T             | axis (0), reduction ("sum"), group             |
| Send          | X: T     | sent: int64 []   | peer, tag (0)                                  |
| Recv          | like: T  | Y: T             | peer, tag (0), shape (optional, -1 = unknown)  |

`group` lists the global ranks taking part, in order; absent or empty means the whole world. Shape
rules: AllGather multiplies dimension `axis` by the group size, ReduceScatter divides it; a symbolic
(named) dimension on `axis` becomes unknown because its product/quotient has no name, every other
dimension is kept as it is. With no `group` the world size is not known to a model, so the `axis`
dimension becomes unknown. AllGather of unequal parts (uneven tp) lists `sizes`, one length along `axis`
per member in group order (0 allowed: a member that contributes nothing); dimension `axis` is then
sum(sizes), whatever the input's own. Equal parts leave `sizes` out. Recv's input only carries the
dtype (its data is ignored, e.g. an empty initializer); its output shape comes from the `shape` attribute
when present, else it is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx.defs import OpSchema
from onnx.shape_inference import InferenceContext, InferenceError

LLMIR_DOMAIN = "ai.llmir"
LLMIR_OPSET_VERSION = 1
LLMIR_OPSET_IMPORT: onnx.OperatorSetIdProto = helper.make_opsetid(LLMIR_DOMAIN, LLMIR_OPSET_VERSION)

REDUCTIONS: tuple[str, ...] = ("sum", "max", "min")

# ONNX type strings of the element types every ai.llmir op accepts (the C++ kernels register the same).
TENSOR_TYPES: tuple[str, ...] = (
    "tensor(float)",
    "tensor(double)",
    "tensor(float16)",
    "tensor(bfloat16)",
    "tensor(int32)",
    "tensor(int64)",
    "tensor(int8)",
    "tensor(uint8)",
    "tensor(bool)",
)
ELEMENT_TYPES: tuple[int, ...] = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
)

ALL_REDUCE = "AllReduce"
ALL_GATHER = "AllGather"
REDUCE_SCATTER = "ReduceScatter"
SEND = "Send"
RECV = "Recv"
PIPELINE_OPS = frozenset({SEND, RECV})
OP_TYPES: tuple[str, ...] = (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, SEND, RECV)


# --------------------------------------------------------------------------- attribute helpers


def _attr(ctx: InferenceContext, name: str) -> onnx.AttributeProto | None:
    return ctx.get_attribute(name)


def _int_attr(ctx: InferenceContext, name: str, default: int) -> int:
    attribute = _attr(ctx, name)
    return default if attribute is None else int(attribute.i)


def _ints_attr(ctx: InferenceContext, name: str) -> list[int] | None:
    attribute = _attr(ctx, name)
    return None if attribute is None else [int(v) for v in attribute.ints]


def _string_attr(ctx: InferenceContext, name: str, default: str) -> str:
    attribute = _attr(ctx, name)
    return default if attribute is None else attribute.s.decode()


def _fail(ctx: InferenceContext, op_type: str, message: str) -> None:
    # The display name reads "node AllReduce[ai.llmir] (its_name)".
    raise InferenceError(f"[ai.llmir {op_type}] {ctx.get_display_name() or 'unnamed node'}: {message}")


def _group_size(ctx: InferenceContext, op_type: str) -> int | None:
    """The group's size, or None when the op spans the whole (unknown) world."""
    group = _ints_attr(ctx, "group")
    if not group:
        return None
    if len(set(group)) != len(group):
        _fail(ctx, op_type, f"group {group} lists a rank twice; list each global rank once")
    if min(group) < 0:
        _fail(ctx, op_type, f"group {group} has a negative rank; ranks are 0 .. world_size-1")
    return len(group)


def _check_reduction(ctx: InferenceContext, op_type: str, input_type: onnx.TypeProto) -> None:
    reduction = _string_attr(ctx, "reduction", "sum")
    if reduction not in REDUCTIONS:
        _fail(ctx, op_type, f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if reduction == "sum" and input_type.tensor_type.elem_type == onnx.TensorProto.BOOL:
        _fail(ctx, op_type, "reduction 'sum' is undefined for bool tensors; use 'max' (or) or 'min' (and)")


def _input_tensor_type(ctx: InferenceContext, op_type: str) -> onnx.TypeProto | None:
    input_type = ctx.get_input_type(0)
    if input_type is None or not input_type.HasField("tensor_type"):
        return None
    if input_type.tensor_type.elem_type not in ELEMENT_TYPES:
        _fail(
            ctx,
            op_type,
            f"input type {onnx.TensorProto.DataType.Name(input_type.tensor_type.elem_type)} is not "
            f"supported; supported: {', '.join(TENSOR_TYPES)}",
        )
    return input_type


def _normalized_axis(ctx: InferenceContext, op_type: str, rank: int) -> int:
    axis = _int_attr(ctx, "axis", 0)
    if not -rank <= axis < rank:
        _fail(ctx, op_type, f"axis {axis} is out of range for a rank-{rank} input; use -{rank} .. {rank - 1}")
    return axis % rank


# --------------------------------------------------------------------------- shape inference


def collective_axis_length(
    op_type: str, length: int, group_size: int, sizes: Sequence[int] | None = None
) -> int | None:
    """The output's length along `axis` of AllGather or ReduceScatter for an input `length` long over
    `group_size` ranks; None where ReduceScatter's group does not divide it.

    The one statement of the rule: the schemas' inference, the node builders (`_scaled_shape`) and the
    shape planner (`propagation/collectives.py`) all ask it; each reports a None its own way."""
    if op_type == ALL_GATHER:
        return sum(int(s) for s in sizes) if sizes is not None else length * group_size
    if length % group_size != 0:
        return None
    return length // group_size


def _infer_all_reduce(ctx: InferenceContext) -> None:
    input_type = _input_tensor_type(ctx, ALL_REDUCE)
    if input_type is None:
        return
    _group_size(ctx, ALL_REDUCE)
    _check_reduction(ctx, ALL_REDUCE, input_type)
    ctx.set_output_type(0, input_type)


def _scale_axis(ctx: InferenceContext, op_type: str, gather: bool) -> None:
    input_type = _input_tensor_type(ctx, op_type)
    if input_type is None:
        return
    group_size = _group_size(ctx, op_type)
    if not gather:
        _check_reduction(ctx, op_type, input_type)
    output_type = onnx.TypeProto()
    output_type.CopyFrom(input_type)
    if not output_type.tensor_type.HasField("shape"):
        ctx.set_output_type(0, output_type)
        return
    dims = output_type.tensor_type.shape.dim
    if len(dims) == 0:
        _fail(ctx, op_type, "the input is a scalar; it needs at least one dimension to split or concatenate")
    axis = _normalized_axis(ctx, op_type, len(dims))
    dim = dims[axis]
    if dim.HasField("dim_value") and group_size is not None:
        length = collective_axis_length(op_type, dim.dim_value, group_size)
        if length is None:
            _fail(
                ctx,
                op_type,
                f"dimension {axis} has size {dim.dim_value}, not divisible by the group size {group_size}",
            )
        else:
            dim.dim_value = length
    elif group_size != 1:
        dim.Clear()  # a named or unknown dimension scaled by the group size has no name: unknown
    ctx.set_output_type(0, output_type)


def _infer_all_gather(ctx: InferenceContext) -> None:
    sizes = _ints_attr(ctx, "sizes")
    if sizes is None:
        _scale_axis(ctx, ALL_GATHER, gather=True)
        return
    input_type = _input_tensor_type(ctx, ALL_GATHER)
    group_size = _group_size(ctx, ALL_GATHER)
    if not sizes or min(sizes) < 0:
        _fail(ctx, ALL_GATHER, f"sizes {sizes} must list one length (0 or more) along `axis` per group member")
    if group_size is not None and len(sizes) != group_size:
        _fail(ctx, ALL_GATHER, f"sizes {sizes} lists {len(sizes)} lengths for a group of {group_size} ranks")
    if input_type is None:
        return
    output_type = onnx.TypeProto()
    output_type.CopyFrom(input_type)
    if output_type.tensor_type.HasField("shape"):
        dims = output_type.tensor_type.shape.dim
        if len(dims) == 0:
            _fail(ctx, ALL_GATHER, "the input is a scalar; it needs at least one dimension to concatenate")
        dim = dims[_normalized_axis(ctx, ALL_GATHER, len(dims))]
        if dim.HasField("dim_value") and dim.dim_value not in sizes:
            _fail(ctx, ALL_GATHER, f"the input's length {dim.dim_value} along `axis` is none of sizes {sizes}")
        dim.Clear()
        dim.dim_value = collective_axis_length(ALL_GATHER, 0, len(sizes), sizes)
    ctx.set_output_type(0, output_type)


def _infer_reduce_scatter(ctx: InferenceContext) -> None:
    _scale_axis(ctx, REDUCE_SCATTER, gather=False)


def _check_peer(ctx: InferenceContext, op_type: str) -> None:
    peer = _attr(ctx, "peer")
    if peer is None:
        _fail(ctx, op_type, "attribute 'peer' (the global rank on the other side) is required")
    elif peer.i < 0:
        _fail(ctx, op_type, f"peer {peer.i} is negative; ranks are 0 .. world_size-1")


def _infer_send(ctx: InferenceContext) -> None:
    _input_tensor_type(ctx, SEND)
    _check_peer(ctx, SEND)
    ctx.set_output_type(0, helper.make_tensor_type_proto(onnx.TensorProto.INT64, []))


def _infer_recv(ctx: InferenceContext) -> None:
    input_type = _input_tensor_type(ctx, RECV)
    _check_peer(ctx, RECV)
    if input_type is None:
        return
    shape = _ints_attr(ctx, "shape")
    if shape is not None and any(d < -1 for d in shape):
        _fail(ctx, RECV, f"shape {shape} has a dimension below -1; use -1 for an unknown dimension")
    dims = None if shape is None else [None if d == -1 else d for d in shape]
    ctx.set_output_type(0, helper.make_tensor_type_proto(input_type.tensor_type.elem_type, dims))


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class _OpDefinition:
    name: str
    doc: str
    inputs: tuple[tuple[str, str, str], ...]  # (name, type string, description)
    outputs: tuple[tuple[str, str, str], ...]
    attributes: tuple[OpSchema.Attribute, ...]
    infer: Callable[[InferenceContext], None]


def _group_attribute() -> OpSchema.Attribute:
    return OpSchema.Attribute(
        "group",
        OpSchema.AttrType.INTS,
        "Global ranks taking part, in order; absent or empty: the whole world.",
        required=False,
    )


def _reduction_attribute() -> OpSchema.Attribute:
    return OpSchema.Attribute(
        "reduction",
        helper.make_attribute("reduction", "sum"),
        "Elementwise reduction: 'sum', 'max' or 'min' (bool: max = or, min = and; sum is an error).",
    )


def _sizes_attribute() -> OpSchema.Attribute:
    return OpSchema.Attribute(
        "sizes",
        OpSchema.AttrType.INTS,
        "Unequal parts: each member's length along `axis`, in group order (0 allowed); absent: equal parts.",
        required=False,
    )


def _axis_attribute() -> OpSchema.Attribute:
    return OpSchema.Attribute(
        "axis", helper.make_attribute("axis", 0), "Axis to concatenate/split; negative counts from the end."
    )


def _peer_attribute() -> OpSchema.Attribute:
    return OpSchema.Attribute("peer", OpSchema.AttrType.INT, "Global rank on the other side.", required=True)


def _tag_attribute() -> OpSchema.Attribute:
    return OpSchema.Attribute(
        "tag", helper.make_attribute("tag", 0), "Matches a Send with its Recv between the same pair."
    )


def _definitions() -> tuple[_OpDefinition, ...]:
    return (
        _OpDefinition(
            ALL_REDUCE,
            "Elementwise reduction of X over the ranks of `group`; every member gets the result.",
            (("X", "T", "This rank's contribution."),),
            (("Y", "T", "The reduction, same shape as X."),),
            (_reduction_attribute(), _group_attribute()),
            _infer_all_reduce,
        ),
        _OpDefinition(
            ALL_GATHER,
            "Concatenation of the group members' X along `axis`, in group order.",
            (("X", "T", "This rank's shard."),),
            (("Y", "T", "X's shape with dimension `axis` multiplied by the group size (sum(sizes) with `sizes`)."),),
            (_axis_attribute(), _group_attribute(), _sizes_attribute()),
            _infer_all_gather,
        ),
        _OpDefinition(
            REDUCE_SCATTER,
            "Elementwise reduction over `group`, then this rank's chunk along `axis` "
            "(chunk index = this rank's position in `group`); X.shape[axis] must divide by the group size.",
            (("X", "T", "This rank's contribution."),),
            (("Y", "T", "X's shape with dimension `axis` divided by the group size."),),
            (_axis_attribute(), _reduction_attribute(), _group_attribute()),
            _infer_reduce_scatter,
        ),
        _OpDefinition(
            SEND,
            "Sends X (dtype and shape travel with it) to global rank `peer`; returns the element count.",
            (("X", "T", "Tensor to send."),),
            (("sent", "tensor(int64)", "Scalar: number of elements sent."),),
            (_peer_attribute(), _tag_attribute()),
            _infer_send,
        ),
        _OpDefinition(
            RECV,
            "Receives the tensor sent by the Send of global rank `peer` with the same `tag`.",
            (("like", "T", "Carries only the dtype (data ignored), e.g. an empty initializer."),),
            (("Y", "T", "The received tensor."),),
            (
                _peer_attribute(),
                _tag_attribute(),
                OpSchema.Attribute(
                    "shape",
                    OpSchema.AttrType.INTS,
                    "Expected shape (-1 = unknown dimension): used by shape inference, checked at run time.",
                    required=False,
                ),
            ),
            _infer_recv,
        ),
    )


def _schema(definition: _OpDefinition) -> OpSchema:
    schema = OpSchema(
        definition.name,
        LLMIR_DOMAIN,
        LLMIR_OPSET_VERSION,
        definition.doc,
        inputs=[OpSchema.FormalParameter(n, t, d) for n, t, d in definition.inputs],
        outputs=[OpSchema.FormalParameter(n, t, d) for n, t, d in definition.outputs],
        type_constraints=[("T", list(TENSOR_TYPES), "Element types the ai.llmir kernels support.")],
        attributes=list(definition.attributes),
    )
    schema.set_type_and_shape_inference_function(definition.infer)
    return schema


def _is_registered(op_type: str) -> bool:
    try:
        onnx.defs.get_schema(op_type, LLMIR_OPSET_VERSION, LLMIR_DOMAIN)
    except onnx.defs.SchemaError:
        return False
    return True


def register_schemas() -> None:
    """Register the ai.llmir schemas with onnx; calling it again is a no-op."""
    for definition in _definitions():
        if not _is_registered(definition.name):
            onnx.defs.register_schema(_schema(definition))
    _register_onnxruntime_default_domain_ops()


def _register_onnxruntime_default_domain_ops() -> None:
    """onnxruntime implements SimplifiedLayerNormalization in the ONNX domain (the genai builder emits
    it) but onnx has no schema for it, so onnx.checker refuses such models outright. Declaring its
    signature (from onnxruntime's contrib schema) lets the checker check the rest of the model."""
    try:
        onnx.defs.get_schema("SimplifiedLayerNormalization", 1, "")
        return
    except onnx.defs.SchemaError:
        pass
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "SimplifiedLayerNormalization",
        "",
        1,
        "onnxruntime's RMS normalization over the last axes: X / sqrt(mean(X^2) + epsilon) * scale.",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
        outputs=[
            OpSchema.FormalParameter("Y", "V"),
            OpSchema.FormalParameter("inv_std_var", "U", param_option=optional),
        ],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[
            OpSchema.Attribute("axis", OpSchema.AttrType.INT, "first normalized axis", required=False),
            OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False),
            OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "", required=False),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_like_input)
    onnx.defs.register_schema(schema)


def _infer_like_input(ctx: InferenceContext) -> None:
    """Y: X's shape, the scale's element type (so the checker's inference goes on past the norm)."""
    x, scale = ctx.get_input_type(0), ctx.get_input_type(1)
    if x is None or scale is None or not x.HasField("tensor_type"):
        return
    output = onnx.TypeProto()
    output.CopyFrom(x)
    output.tensor_type.elem_type = scale.tensor_type.elem_type
    ctx.set_output_type(0, output)


register_schemas()


# --------------------------------------------------------------------------- node builders (onnx_ir)


def _group_attrs(group: Sequence[int] | None) -> dict[str, ir.Attr]:
    if not group:
        return {}
    return {"group": ir.AttrInt64s("group", [int(r) for r in group])}


def _check_reduction_name(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {', '.join(REDUCTIONS)}")


def _node(
    op_type: str,
    value: ir.Value,
    attributes: dict[str, ir.Attr],
    name: str | None,
    output_type: ir.TypeProtocol | None,
    output_shape: ir.Shape | None,
) -> ir.Node:
    node = ir.Node(
        LLMIR_DOMAIN,
        op_type,
        [value],
        attributes=attributes,
        num_outputs=1,
        version=LLMIR_OPSET_VERSION,
        name=name,
    )
    # The same type and shape rules as the schemas' inference, so a pass sees them without re-inferring.
    node.outputs[0].type = output_type
    node.outputs[0].shape = output_shape
    return node


def _scaled_shape(
    value: ir.Value, axis: int, group: Sequence[int] | None, gather: bool, sizes: Sequence[int] | None = None
) -> ir.Shape | None:
    """The output shape by the schema's rule, or None where the rule fails (an axis out of range, a
    dimension the group does not divide): the builders never refuse, the checker reports the node."""
    if value.shape is None:
        return None
    dims: list[int | ir.SymbolicDim | None] = list(value.shape)
    rank = len(dims)
    if not -rank <= axis < rank:
        return None
    axis %= rank
    dim, size = dims[axis], len(group) if group else None
    op_type = ALL_GATHER if gather else REDUCE_SCATTER
    if gather and sizes is not None:
        dims[axis] = collective_axis_length(op_type, 0, len(sizes), sizes)
    elif isinstance(dim, int) and size is not None:
        length = collective_axis_length(op_type, dim, size)
        if length is None:
            return None
        dims[axis] = length
    elif size != 1:
        dims[axis] = None
    return ir.Shape(dims)


def all_reduce_node(
    value: ir.Value, group: Sequence[int] | None = None, reduction: str = "sum", name: str | None = None
) -> ir.Node:
    """An unattached ai.llmir AllReduce node reading `value`; its result is `node.outputs[0]`."""
    _check_reduction_name(reduction)
    attributes = {"reduction": ir.AttrString("reduction", reduction), **_group_attrs(group)}
    shape = None if value.shape is None else ir.Shape(list(value.shape))
    return _node(ALL_REDUCE, value, attributes, name, value.type, shape)


def all_gather_node(
    value: ir.Value,
    axis: int,
    group: Sequence[int] | None = None,
    name: str | None = None,
    sizes: Sequence[int] | None = None,
) -> ir.Node:
    """An unattached ai.llmir AllGather node concatenating `value` along `axis` over `group`; `sizes`, each
    member's length along `axis` in group order, for unequal parts. Equal sizes write no attribute (the
    even form, the same node as without them)."""
    attributes = {"axis": ir.AttrInt64("axis", axis), **_group_attrs(group)}
    if sizes is not None:
        if not sizes or min(sizes) < 0 or (group and len(sizes) != len(group)):
            raise ValueError(f"sizes {list(sizes)} must list one length (0 or more) per member of group {group}")
        if len(set(sizes)) == 1:
            sizes = None
        else:
            attributes["sizes"] = ir.AttrInt64s("sizes", [int(s) for s in sizes])
    shape = _scaled_shape(value, axis, group, gather=True, sizes=sizes)
    return _node(ALL_GATHER, value, attributes, name, value.type, shape)


def reduce_scatter_node(
    value: ir.Value,
    axis: int,
    group: Sequence[int] | None = None,
    reduction: str = "sum",
    name: str | None = None,
) -> ir.Node:
    """An unattached ai.llmir ReduceScatter node: reduce `value` over `group`, keep this rank's chunk."""
    _check_reduction_name(reduction)
    attributes = {
        "axis": ir.AttrInt64("axis", axis),
        "reduction": ir.AttrString("reduction", reduction),
        **_group_attrs(group),
    }
    shape = _scaled_shape(value, axis, group, gather=False)
    return _node(REDUCE_SCATTER, value, attributes, name, value.type, shape)


def send_node(value: ir.Value, peer: int, tag: int = 0, name: str | None = None) -> ir.Node:
    """An unattached ai.llmir Send node. Make its int64 scalar output a graph output: onnxruntime 1.32 runs
    a Send whose output is unused (checked), but dead-code passes (e.g. onnx_ir's unused-node removal) drop it."""
    attributes = {"peer": ir.AttrInt64("peer", peer), "tag": ir.AttrInt64("tag", tag)}
    return _node(SEND, value, attributes, name, ir.TensorType(ir.DataType.INT64), ir.Shape([]))


def recv_node(
    like: ir.Value,
    peer: int,
    tag: int = 0,
    shape: Sequence[int | None] | None = None,
    name: str | None = None,
) -> ir.Node:
    """An unattached ai.llmir Recv node; `like` carries the dtype, `shape` (None = unknown dim) is optional."""
    attributes: dict[str, ir.Attr] = {"peer": ir.AttrInt64("peer", peer), "tag": ir.AttrInt64("tag", tag)}
    output_shape = None
    if shape is not None:
        attributes["shape"] = ir.AttrInt64s("shape", [-1 if d is None else int(d) for d in shape])
        output_shape = ir.Shape(list(shape))
    return _node(RECV, like, attributes, name, like.type, output_shape)


def recv_like_initializer(dtype: ir.DataType, name: str) -> ir.Value:
    """An empty (shape [0]) initializer value of `dtype` to feed Recv's `like` input; add it to the graph."""
    tensor = ir.tensor(np.empty(0, dtype=dtype.numpy()), dtype=dtype, name=name)
    return ir.Value(name=name, shape=ir.Shape([0]), type=ir.TensorType(dtype), const_value=tensor)
