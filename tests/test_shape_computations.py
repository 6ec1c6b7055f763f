"""Shape computations that exporters write and that onnxruntime's symbolic shape inference cannot follow.

torch's legacy export of `repeat_interleave(x, 2, dim=-1)` (Cohere's rotary: optimum's default export)
takes the repeat count as `ReduceMax(ConstantOfShape([n], value=2))` into an Expand target, and the
repeated elements' indices as `NonZero` of a constant mask. onnxruntime's symbolic inference stops at that
Expand, so it leaves every head count of the model unknown; the planner evaluates the computation itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmir_onnx.ir_io import load_model
from llmir_onnx.passes.annotate import global_shapes
from llmir_onnx.plan.shapes import Sizes, evaluate_shapes

HIDDEN, HEAD_DIM = 64, 16


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def repeat_interleave_model() -> onnx.ModelProto:
    """x [batch, seq, 64] -> q projection reshaped to heads by a computed target [B, S, -1, 16] (the head
    count only a shape inference that follows Shape chains finds), and beside it `x` repeated twice along its
    last axis as torch's legacy exporter writes repeat_interleave: -> y [batch, seq, 128]."""
    rng = np.random.default_rng(0)
    nodes = [
        # The head reshape: Concat(B, S, [-1], [16]) from the activation's own shape.
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["x_shape", "one"], ["s"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axis0"], ["b1"]),
        helper.make_node("Unsqueeze", ["s", "axis0"], ["s1"]),
        helper.make_node("Concat", ["b1", "s1", "minus_one", "head_dim"], ["heads_target"], axis=0),
        helper.make_node("MatMul", ["x", "w_q"], ["q"], name="/q_proj/MatMul"),
        helper.make_node("Reshape", ["q", "heads_target"], ["q_heads"], name="/q_heads/Reshape"),
        helper.make_node("Transpose", ["q_heads"], ["q_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["q_t"], ["q_back"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["q_back", "flat_target"], ["attn"]),
        helper.make_node("MatMul", ["attn", "w_o"], ["o"], name="/o_proj/MatMul"),
        # repeat_interleave(x, 2, dim=-1): the repeat count is ReduceMax of a ConstantOfShape of 2s.
        helper.make_node("Gather", ["x_shape", "two"], ["width"], axis=0),
        helper.make_node("Unsqueeze", ["width", "axis0"], ["width1"]),
        helper.make_node(
            "ConstantOfShape", ["width1"], ["repeats"], value=numpy_helper.from_array(np.array([2], np.int64))
        ),
        helper.make_node("ReduceMax", ["repeats"], ["count"], keepdims=0),
        helper.make_node("Unsqueeze", ["x", "minus_one"], ["x_last"]),
        helper.make_node("Unsqueeze", ["count", "axis0"], ["count1"]),
        helper.make_node("Concat", ["ones3", "count1"], ["expand_target"], axis=0),
        helper.make_node("Expand", ["x_last", "expand_target"], ["x_rep"], name="/repeat/Expand"),
        helper.make_node("Range", ["zero", "count", "one"], ["steps"]),
        helper.make_node("Unsqueeze", ["repeats", "one_axis"], ["repeats_col"]),
        helper.make_node("Less", ["steps", "repeats_col"], ["keep"]),
        helper.make_node("NonZero", ["keep"], ["kept"], name="/repeat/NonZero"),
        helper.make_node("Transpose", ["kept"], ["kept_t"], perm=[1, 0]),
        helper.make_node("Transpose", ["x_rep"], ["x_rep_t"], perm=[2, 3, 0, 1]),
        helper.make_node("GatherND", ["x_rep_t", "kept_t"], ["picked"]),
        helper.make_node("Transpose", ["picked"], ["y"], perm=[1, 2, 0]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        _ints("axis0", [0]),
        _ints("one_axis", [1]),
        _ints("minus_one", [-1]),
        _ints("ones3", [1, 1, 1]),
        _ints("head_dim", [HEAD_DIM]),
        _ints("flat_target", [0, 0, -1]),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "w_q"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "w_o"),
    ]
    graph = helper.make_graph(
        nodes,
        "repeat_interleave",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", "sequence_length", HIDDEN])],
        [
            helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch_size", "sequence_length", HIDDEN]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", "sequence_length", 2 * HIDDEN]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(repeat_interleave_model(), path)
    return path


def test_symbolic_inference_stops_at_the_repeat_count() -> None:
    """The premise of the tests below: onnxruntime's symbolic inference fails on the model as a whole."""
    from onnxruntime.tools import symbolic_shape_infer

    with pytest.raises(AssertionError):
        symbolic_shape_infer.SymbolicShapeInference.infer_shapes(
            repeat_interleave_model(), auto_merge=True, guess_output_rank=False
        )


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (2, 5)])
def test_the_planner_evaluates_the_repeat_count_and_its_indices(model_path: Path, batch: int, seq: int) -> None:
    """ReduceMax and NonZero of known values are computed, so the Expand target and the GatherND indices are
    known: every shape the planner gives is onnxruntime's, and the small values are exact."""
    from tests.test_memory import every_value_by_onnxruntime

    shapes = evaluate_shapes(load_model(model_path), Sizes(batch=batch, seq=seq))
    assert shapes["count"].value is not None and int(shapes["count"].value) == 2
    x = np.random.default_rng(1).standard_normal((batch, seq, HIDDEN)).astype(np.float32)
    values = every_value_by_onnxruntime(model_path, shapes, {"x": x})
    np.testing.assert_array_equal(values["y"], np.repeat(x, 2, axis=-1))
    for name, array in values.items():
        assert shapes[name].shape == array.shape, name
        if shapes[name].value is not None:
            np.testing.assert_array_equal(shapes[name].value, array, err_msg=name)


def test_heads_are_found_where_symbolic_inference_fails(model_path: Path) -> None:
    """onnx's own inference leaves the head count of Reshape(q, [B, S, -1, 16]) open; evaluating the model
    settles it (4), so the projection splits by heads: tp 2 gives each rank 2 heads of q's 64 columns."""
    from llmir_onnx.partition import PartitionOptions, partition

    model = load_model(model_path)
    shapes = global_shapes(model)
    assert shapes["q_heads"] == ("batch_size", "sequence_length", 4, HEAD_DIM)
    assert shapes["y"] == ("batch_size", "sequence_length", 2 * HIDDEN)
    result = partition(model, PartitionOptions(tp=2))
    for rank in result.ranks:
        by_name = {node.name: node for node in rank.model.graph}
        assert by_name["/q_proj/MatMul"].inputs[1].shape == ir.Shape([HIDDEN, HIDDEN // 2])
        assert by_name["/o_proj/MatMul"].inputs[1].shape == ir.Shape([HIDDEN // 2, HIDDEN])


def test_nonzero_of_run_time_data_is_refused_naming_the_node() -> None:
    """The count of non-zeros of an activation is known only at run time: the planner names the node."""
    from llmir_onnx.errors import PlanError

    graph = helper.make_graph(
        [
            helper.make_node("Greater", ["x", "zero"], ["positive"]),
            helper.make_node("NonZero", ["positive"], ["where"], name="/mask/NonZero"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch_size", 4])],
        [helper.make_tensor_value_info("where", TensorProto.INT64, [2, None])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    refusal = r"^node '/mask/NonZero' \(NonZero\): .* non-zeros of 'positive', known only at run time, .*not supported"
    with pytest.raises(PlanError, match=refusal):
        evaluate_shapes(model, Sizes(1, 1))


def router_model(with_nonzero: bool) -> onnx.ModelProto:
    """A mixture of experts' router as torch's legacy exporter writes Mixtral's: the top 2 of 4 experts per
    token, one-hot masks of them, and (`with_nonzero`) the tokens each expert got, found with NonZero."""
    nodes = [
        helper.make_node("TopK", ["router_logits", "k"], ["top_values", "top_experts"], axis=-1),
        helper.make_node("OneHot", ["top_experts", "experts", "off_on"], ["masks"], name="/moe/OneHot", axis=-1),
        helper.make_node("Transpose", ["masks"], ["per_expert"], perm=[2, 1, 0]),
    ]
    outputs = [helper.make_tensor_value_info("per_expert", TensorProto.INT64, [4, 2, "sequence_length"])]
    if with_nonzero:
        nodes += [
            helper.make_node("Gather", ["per_expert", "zero"], ["expert0"], axis=0),
            helper.make_node("NonZero", ["expert0"], ["expert0_tokens"], name="/moe/NonZero"),
        ]
        outputs = [helper.make_tensor_value_info("expert0_tokens", TensorProto.INT64, [2, None])]
    graph = helper.make_graph(
        nodes,
        "router",
        [helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, ["sequence_length", 4])],
        outputs,
        [
            _ints("k", [2]),
            numpy_helper.from_array(np.array(4, np.int64), "experts"),
            _ints("off_on", [0, 1]),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_one_hot_is_sized_and_routing_by_nonzero_is_refused(tmp_path: Path) -> None:
    """OneHot's shape is its indices' with the depth inserted (what onnxruntime computes); the tokens an expert
    gets are data (NonZero of the router's masks): the planner refuses them, naming the node."""
    from llmir_onnx.errors import PlanError
    from tests.test_memory import every_value_by_onnxruntime

    path = tmp_path / "router.onnx"
    onnx.save(router_model(with_nonzero=False), path)
    shapes = evaluate_shapes(load_model(path), Sizes(batch=1, seq=5))
    logits = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    for name, array in every_value_by_onnxruntime(path, shapes, {"router_logits": logits}).items():
        assert shapes[name].shape == array.shape, name
    assert shapes["masks"].shape == (5, 2, 4)
    refusal = r"^node '/moe/NonZero' \(NonZero\): .*known only at run time.* mixture of experts"
    with pytest.raises(PlanError, match=refusal):
        evaluate_shapes(ir.from_proto(router_model(with_nonzero=True)), Sizes(batch=1, seq=5))
