"""The ai.llmir ONNX schemas: full checker, shape inference, error messages, onnx_ir node builders."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx.shape_inference import InferenceError

from llmir_onnx import ops

Dim = int | str | None


def _model(
    node: onnx.NodeProto,
    input_shape: list[Dim] | None,
    input_type: int = TensorProto.FLOAT,
    initializers: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    inputs = [] if initializers else [helper.make_tensor_value_info("x", input_type, input_shape)]
    # y stays an intermediate value so that the test sees exactly what inference gives it (a graph
    # output would need a declared shape that inference then merges with).
    graph = helper.make_graph(
        [node, helper.make_node("Size", ["y"], ["y_size"])],
        "g",
        inputs,
        [helper.make_tensor_value_info("y_size", TensorProto.INT64, [])],
        initializer=initializers or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), ops.LLMIR_OPSET_IMPORT], ir_version=10)


def _inferred_output(model: onnx.ModelProto) -> onnx.TypeProto:
    """Checker (full) must pass; then the inferred type of output y."""
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    (output,) = [v for v in inferred.graph.value_info if v.name == "y"]
    return output.type


def _dims(type_proto: onnx.TypeProto) -> list[Dim] | None:
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    out: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            out.append(dim.dim_value)
        elif dim.HasField("dim_param") and not dim.dim_param.startswith("unk__"):
            # onnx names each unknown dimension unk__N; our rules only produce such unknowns
            out.append(dim.dim_param)
        else:
            out.append(None)
    return out


def _node(op_type: str, **attributes: object) -> onnx.NodeProto:
    inputs = ["like"] if op_type == ops.RECV else ["x"]
    return helper.make_node(op_type, inputs, ["y"], domain=ops.LLMIR_DOMAIN, name=f"my_{op_type}", **attributes)


def test_schemas_registered_once_with_inference() -> None:
    ops.register_schemas()  # a second call is a no-op, not a SchemaError
    for op_type in ops.OP_TYPES:
        schema = onnx.defs.get_schema(op_type, ops.LLMIR_OPSET_VERSION, ops.LLMIR_DOMAIN)
        assert schema.has_type_and_shape_inference_function
        assert schema.domain == "ai.llmir"
    all_reduce = onnx.defs.get_schema("AllReduce", 1, "ai.llmir")
    assert all_reduce.attributes["reduction"].default_value.s == b"sum"
    assert not all_reduce.attributes["group"].required
    assert onnx.defs.get_schema("AllGather", 1, "ai.llmir").attributes["axis"].default_value.i == 0
    assert onnx.defs.get_schema("Send", 1, "ai.llmir").attributes["peer"].required
    (constraint,) = all_reduce.type_constraints
    assert set(constraint.allowed_type_strs) == set(ops.TENSOR_TYPES)


@pytest.mark.parametrize("elem_type", ops.ELEMENT_TYPES)
def test_all_reduce_keeps_type_and_shape(elem_type: int) -> None:
    reduction = "max" if elem_type == TensorProto.BOOL else "sum"
    model = _model(_node("AllReduce", reduction=reduction, group=[0, 1]), [2, "S", 4], elem_type)
    output = _inferred_output(model)
    assert output.tensor_type.elem_type == elem_type
    assert _dims(output) == [2, "S", 4]


@pytest.mark.parametrize(
    ("axis", "expected"),
    [(0, [8, "S", 5]), (1, [2, None, 5]), (2, [2, "S", 20]), (-1, [2, "S", 20]), (-3, [8, "S", 5])],
)
def test_all_gather_multiplies_axis(axis: int, expected: list[Dim]) -> None:
    model = _model(_node("AllGather", axis=axis, group=[3, 1, 0, 2]), [2, "S", 5], TensorProto.FLOAT16)
    output = _inferred_output(model)
    assert output.tensor_type.elem_type == TensorProto.FLOAT16
    assert _dims(output) == expected


def test_all_gather_default_axis_and_whole_world() -> None:
    # No group: the world size is not in the model, so the gathered dimension is unknown.
    assert _dims(_inferred_output(_model(_node("AllGather"), [3, 4]))) == [None, 4]
    assert _dims(_inferred_output(_model(_node("AllGather", group=[0, 1]), [3, 4]))) == [6, 4]


@pytest.mark.parametrize(
    ("axis", "expected"), [(0, [2, "S", 12]), (-1, [4, "S", 6]), (2, [4, "S", 6]), (1, [4, None, 12])]
)
def test_reduce_scatter_divides_axis(axis: int, expected: list[Dim]) -> None:
    node = _node("ReduceScatter", axis=axis, reduction="min", group=[0, 2])
    output = _inferred_output(_model(node, [4, "S", 12], TensorProto.INT32))
    assert output.tensor_type.elem_type == TensorProto.INT32
    assert _dims(output) == expected


def test_send_gives_int64_scalar() -> None:
    output = _inferred_output(_model(_node("Send", peer=1, tag=7), [2, 3], TensorProto.BFLOAT16))
    assert output.tensor_type.elem_type == TensorProto.INT64
    assert _dims(output) == []


@pytest.mark.parametrize(("shape", "expected"), [([-1, 3, 8], [None, 3, 8]), ([5], [5]), ([], []), (None, None)])
def test_recv_type_from_like_and_shape_from_attribute(shape: list[int] | None, expected: list[Dim] | None) -> None:
    like = helper.make_tensor("like", TensorProto.INT8, [0], [])
    node = _node("Recv", peer=0)
    if shape is not None:
        node.attribute.append(helper.make_attribute("shape", shape, attr_type=onnx.AttributeProto.INTS))
    output = _inferred_output(_model(node, None, initializers=[like]))
    assert output.tensor_type.elem_type == TensorProto.INT8
    assert _dims(output) == expected


@pytest.mark.parametrize(
    ("node", "input_type", "message"),
    [
        (_node("AllReduce", reduction="sum"), TensorProto.BOOL, "reduction 'sum' is undefined for bool"),
        (_node("AllReduce", reduction="prod"), TensorProto.FLOAT, "reduction 'prod' is not one of sum, max, min"),
        (_node("AllReduce", group=[0, 1, 0]), TensorProto.FLOAT, "group [0, 1, 0] lists a rank twice"),
        (_node("AllGather", axis=3, group=[0, 1]), TensorProto.FLOAT, "axis 3 is out of range for a rank-3"),
        (_node("AllGather", axis=-4, group=[0, 1]), TensorProto.FLOAT, "axis -4 is out of range"),
        (
            _node("ReduceScatter", axis=2, group=[0, 1, 2]),
            TensorProto.FLOAT,
            "dimension 2 has size 4, not divisible by the group size 3",
        ),
        (_node("ReduceScatter", reduction="sum"), TensorProto.BOOL, "reduction 'sum' is undefined for bool"),
        (_node("Send", peer=-1), TensorProto.FLOAT, "peer -1 is negative"),
    ],
)
def test_inference_errors_name_node_and_fix(node: onnx.NodeProto, input_type: int, message: str) -> None:
    model = _model(node, [2, 3, 4], input_type)
    with pytest.raises(InferenceError) as caught:
        onnx.checker.check_model(model, full_check=True)
    assert message in str(caught.value)
    assert f"node {node.op_type}[ai.llmir] (my_{node.op_type})" in str(caught.value)
    assert "[ai.llmir" in str(caught.value)


def test_unsupported_dtype_is_rejected_by_checker() -> None:
    model = _model(_node("AllReduce"), [2], TensorProto.UINT16)
    with pytest.raises((InferenceError, onnx.checker.ValidationError)):
        onnx.checker.check_model(model, full_check=True)


def test_missing_peer_is_rejected_by_checker() -> None:
    with pytest.raises(onnx.checker.ValidationError, match="peer"):
        onnx.checker.check_model(_model(_node("Send"), [2]), full_check=True)


def test_shapes_flow_through_a_chain() -> None:
    """AllGather -> Relu -> ReduceScatter: the standard op after ours keeps the inferred shape."""
    nodes = [
        helper.make_node("AllGather", ["x"], ["g"], domain=ops.LLMIR_DOMAIN, axis=-1, group=[0, 1]),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("ReduceScatter", ["r"], ["y"], domain=ops.LLMIR_DOMAIN, axis=0, group=[0, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
        [helper.make_value_info("y", onnx.TypeProto())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), ops.LLMIR_OPSET_IMPORT], ir_version=10)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: _dims(v.type) for v in [*inferred.graph.value_info, *inferred.graph.output]}
    assert shapes == {"g": ["B", 12], "r": ["B", 12], "y": [None, 12]}


def test_onnx_ir_builders_produce_checked_models() -> None:
    x = ir.Value(name="x", shape=ir.Shape([4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    reduced = ops.all_reduce_node(x, group=[0, 1], reduction="max", name="ar")
    gathered = ops.all_gather_node(reduced.outputs[0], axis=1, group=[0, 1], name="ag")
    scattered = ops.reduce_scatter_node(gathered.outputs[0], axis=0, group=[0, 1], name="rs")
    sent = ops.send_node(scattered.outputs[0], peer=1, tag=3, name="send")
    like = ops.recv_like_initializer(ir.DataType.BFLOAT16, "recv_like")
    received = ops.recv_node(like, peer=1, tag=4, shape=[None, 16], name="recv")
    nodes = [reduced, gathered, scattered, sent, received]
    for node, name in zip(nodes, ["ar_out", "ag_out", "rs_out", "sent", "received"], strict=True):
        node.outputs[0].name = name
    # The builders set output types and shapes by the same rules as the schemas.
    built = {n.outputs[0].name: (n.outputs[0].dtype, n.outputs[0].shape) for n in nodes}
    assert built == {
        "ar_out": (ir.DataType.FLOAT, ir.Shape([4, 8])),
        "ag_out": (ir.DataType.FLOAT, ir.Shape([4, 16])),
        "rs_out": (ir.DataType.FLOAT, ir.Shape([2, 16])),
        "sent": (ir.DataType.INT64, ir.Shape([])),
        "received": (ir.DataType.BFLOAT16, ir.Shape([None, 16])),
    }
    # Declare only the rank of the received output: inference must fill in the rest.
    received.outputs[0].shape = ir.Shape([None, None])
    graph = ir.Graph(
        [x],
        [sent.outputs[0], received.outputs[0]],
        nodes=nodes,
        initializers=[like],
        name="builders",
        opset_imports={"": 21, ops.LLMIR_DOMAIN: ops.LLMIR_OPSET_VERSION},
    )
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    assert _dims(types["ag_out"]) == [4, 16]
    assert _dims(types["rs_out"]) == [2, 16]
    assert _dims(types["sent"]) == []
    assert types["sent"].tensor_type.elem_type == TensorProto.INT64
    assert _dims(types["received"]) == [None, 16]
    assert types["received"].tensor_type.elem_type == TensorProto.BFLOAT16
    attrs = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in proto.graph.node}
    assert attrs["ar"] == {"reduction": b"max", "group": [0, 1]}
    assert attrs["recv"] == {"peer": 1, "tag": 4, "shape": [-1, 16]}
    assert all(n.domain == "ai.llmir" for n in proto.graph.node)
    like_array = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    assert like_array.shape == (0,)


def test_builder_shapes_symbolic_and_invalid() -> None:
    x = ir.Value(name="x", shape=ir.Shape(["B", 6]), type=ir.TensorType(ir.DataType.INT8))
    assert ops.all_gather_node(x, axis=0, group=[0, 1]).outputs[0].shape == ir.Shape([None, 6])
    assert ops.all_gather_node(x, axis=-1, group=[0, 1, 2]).outputs[0].shape == ir.Shape(["B", 18])
    assert ops.all_gather_node(x, axis=1).outputs[0].shape == ir.Shape(["B", None])  # whole world: unknown
    assert ops.reduce_scatter_node(x, axis=1, group=[2, 3]).outputs[0].shape == ir.Shape(["B", 3])
    assert ops.all_reduce_node(x, group=[0, 1]).outputs[0].shape == ir.Shape(["B", 6])
    # Where the rule fails the builder leaves the shape unknown; the checker names the node (tested above).
    assert ops.reduce_scatter_node(x, axis=1, group=[0, 1, 2, 3]).outputs[0].shape is None
    assert ops.all_gather_node(x, axis=2, group=[0, 1]).outputs[0].shape is None


def test_builders_reject_unknown_reduction() -> None:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(ValueError, match="'avg' is not one of sum, max, min"):
        ops.all_reduce_node(x, reduction="avg")
    assert np.dtype(ir.DataType.BFLOAT16.numpy()).itemsize == 2


@pytest.mark.parametrize(
    ("axis", "input_shape", "sizes", "expected"),
    [
        (1, [2, 1, 5], [2, 1, 1], [2, 4, 5]),  # S(1)[2,1,1]: this rank holds 1 of 4
        (-1, [2, "S", 256], [256, 128, 128], [2, "S", 512]),  # vocab-parallel logits
        (0, ["N", 3], [3, 0, 2], [5, 3]),  # a symbolic length still gathers to sum(sizes); 0 is allowed
    ],
)
def test_all_gather_with_sizes_gives_their_sum(
    axis: int, input_shape: list[Dim], sizes: list[int], expected: list[Dim]
) -> None:
    node = _node("AllGather", axis=axis, group=[0, 1, 2], sizes=sizes)
    assert _dims(_inferred_output(_model(node, input_shape))) == expected


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ([2, 1], "sizes [2, 1] lists 2 lengths for a group of 3 ranks"),
        ([2, -1, 1], "sizes [2, -1, 1] must list one length (0 or more)"),
        ([1, 1, 2], "the input's length 3 along `axis` is none of sizes [1, 1, 2]"),
    ],
)
def test_all_gather_sizes_errors_name_the_node(sizes: list[int], message: str) -> None:
    model = _model(_node("AllGather", axis=1, group=[0, 1, 2], sizes=sizes), [2, 3, 4])
    with pytest.raises(InferenceError) as caught:
        onnx.checker.check_model(model, full_check=True)
    assert message in str(caught.value) and "(my_AllGather)" in str(caught.value)


def test_all_gather_builder_writes_sizes_only_for_unequal_parts() -> None:
    """Equal parts are the even AllGather, with no `sizes`: plans whose heads divide stay as they were."""
    x = ir.Value(name="x", shape=ir.Shape(["B", 2]), type=ir.TensorType(ir.DataType.FLOAT))
    uneven = ops.all_gather_node(x, axis=1, group=[0, 1, 2], sizes=[2, 1, 1])
    assert list(uneven.attributes["sizes"].value) == [2, 1, 1]
    assert uneven.outputs[0].shape == ir.Shape(["B", 4])
    even = ops.all_gather_node(x, axis=1, group=[0, 1, 2], sizes=[2, 2, 2])
    assert "sizes" not in even.attributes and even.outputs[0].shape == ir.Shape(["B", 6])
    with pytest.raises(ValueError, match="one length"):
        ops.all_gather_node(x, axis=1, group=[0, 1], sizes=[2, 1, 1])
