"""Memory plan: exact weights and KV cache, liveness peak, and the shape evaluator against onnxruntime."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.plan.memory import activation_peak, kv_cache_bytes, plan_memory, weight_bytes
from llmir_onnx.plan.shapes import Sizes, TensorShape, bind_dims, evaluate_shapes
from tests.test_synthetic import make_feeds, synthetic


def linear_params(config) -> int:
    """Parameters of one decoder layer's projections (q, k, v, o, gate, up, down)."""
    h, hd = config.hidden, config.head_dim
    attention = h * config.heads * hd * 2 + h * config.kv_heads * hd * 2
    return attention + 3 * h * config.intermediate


def hand_weight_bytes(config, itemsize: int) -> int:
    h = config.hidden
    params = config.vocab * h * 2  # embedding + lm_head (untied)
    params += 2 * config.max_position * config.head_dim  # rotary cos/sin caches
    params += config.layers * (linear_params(config) + 2 * h) + h  # + input/post norms, final norm
    return params * itemsize


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    config = synthetic.PRESETS["tiny"]
    return config, synthetic.generate(config, tmp_path_factory.mktemp("tiny"))


def test_weights_and_kv_cache_are_exact(tiny: tuple[object, Path]) -> None:
    config, path = tiny
    model = load_model(path)
    # tiny: hidden 128, 2 layers, 8 heads, 4 kv heads, head_dim 16, mlp 256, vocab 512, float32
    assert weight_bytes(model) == hand_weight_bytes(config, 4) == 1_722_880
    assert weight_bytes(model) == sum(
        math.prod(i.dims) * 4 for i in onnx.load(str(path), load_external_data=False).graph.initializer
    )
    # 2 (key, value) x 2 layers x batch 3 x 4 kv heads x 100 positions x 16 x 4 bytes
    assert kv_cache_bytes(model, max_batch=3, max_seq=100) == 2 * 2 * 3 * 4 * 100 * 16 * 4 == 307_200
    plan = plan_memory(model, max_batch=3, max_seq=100)
    assert plan.weight_bytes == 1_722_880 and plan.kv_cache_bytes == 307_200
    assert plan.kv_cache_inputs == 4
    assert plan.communication_bytes == 0  # no ai.llmir ops in the original
    assert plan.total_bytes == plan.weight_bytes + plan.kv_cache_bytes + plan.activation_peak_bytes


def test_7b_weights_and_kv_cache_without_reading_weights(tmp_path: Path) -> None:
    config = synthetic.PRESETS["llama-7b"]
    path = synthetic.generate(config, tmp_path, sparse=True)  # 12.6 GiB sparse data file, nothing written
    model = load_model(path)
    # 32 x (4 x 4096^2 + 3 x 4096 x 11008) + 2 x 32000 x 4096 + 65 x 4096 + rotary 2 x 2048 x 128, float16
    assert hand_weight_bytes(config, 2) == 13_477_879_808
    assert weight_bytes(model) == 13_477_879_808
    assert kv_cache_bytes(model, 8, 4096) == 2 * 32 * 8 * 32 * 4096 * 128 * 2 == 16 * 2**30


def test_liveness_peak_on_a_hand_built_graph() -> None:
    # a = Relu(x); b = Relu(a); c = Add(a, b); d = Relu(c) -> output d; every value is [batch, seq] float32
    dims = ["batch", "seq_len"]
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"], name="n1"),
            helper.make_node("Relu", ["a"], ["b"], name="n2"),
            helper.make_node("Add", ["a", "b"], ["c"], name="n3"),
            helper.make_node("Relu", ["c"], ["d"], name="n4"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, dims)],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    unit = 3 * 5 * 4
    peak = activation_peak(model, Sizes(batch=3, seq=5))
    # n3 holds a, b and c at once; then a, b die; n4 holds c and d
    assert peak.bytes == 3 * unit and peak.node == "n3"


def test_dimension_names_real_exports_use() -> None:
    def model_with(dims: list[list[str | int]]) -> ir.Model:
        inputs = [helper.make_tensor_value_info(f"in{i}", TensorProto.FLOAT, d) for i, d in enumerate(dims)]
        graph = helper.make_graph([], "g", inputs, [])
        return ir.from_proto(helper.make_model(graph))

    sizes = Sizes(batch=2, seq=5, past=7)
    model = model_with(
        [["batch_size", "sequence_length"], ["batch", "past_sequence_length + 1"], ["N", "total_sequence_length"],
         ["b", "past_seq_len", "seq_len"], ["batch_size", "dim_7"]]
    )  # fmt: skip
    with pytest.raises(PlanError, match="dim_7"):
        bind_dims(model, sizes)
    bound = bind_dims(model, sizes, overrides={"dim_7": 12})
    assert bound == {
        "batch_size": 2, "sequence_length": 5, "batch": 2, "past_sequence_length + 1": 8, "N": 2,
        "total_sequence_length": 12, "b": 2, "past_seq_len": 7, "seq_len": 5, "dim_7": 12,
    }  # fmt: skip


def every_value_by_onnxruntime(
    path: Path, shapes: dict[str, TensorShape], feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Every value of the model as onnxruntime computes it: intermediates exposed as outputs, no fusions."""
    proto = onnx.load(str(path))
    existing = {o.name for o in proto.graph.output}
    names = [o for node in proto.graph.node for o in node.output if o and o not in existing]
    for name in names:
        proto.graph.output.append(helper.make_tensor_value_info(name, shapes[name].dtype.value, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    return dict(zip(out_names, session.run(None, feeds), strict=True))


@pytest.mark.parametrize(("batch", "past", "seq"), [(2, 0, 6), (1, 5, 1)])
def test_every_evaluated_shape_matches_onnxruntime(tiny: tuple[object, Path], batch: int, past: int, seq: int) -> None:
    config, path = tiny
    shapes = evaluate_shapes(load_model(path), Sizes(batch=batch, seq=seq, past=past))
    values = every_value_by_onnxruntime(path, shapes, make_feeds(config, batch, past, seq))
    checked = 0
    for name, array in values.items():
        assert shapes[name].shape == tuple(array.shape), name
        assert shapes[name].dtype.numpy() == array.dtype, name
        if shapes[name].value is not None:  # small computed values (shape arithmetic) are exact
            np.testing.assert_array_equal(shapes[name].value, array, err_msg=name)
        checked += 1
    assert checked == len(values) > 400


def test_missing_shape_rule_names_the_node() -> None:
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["x", "x"], ["y"], name="/weird/Einsum", equation="ij,jk->ik")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(PlanError, match=r"/weird/Einsum.*Einsum"):
        evaluate_shapes(model, Sizes(1, 1))


def test_activation_peak_grows_with_prefill_length(tiny: tuple[object, Path]) -> None:
    config, path = tiny
    model = load_model(path)
    small = plan_memory(model, 1, 32)
    large = plan_memory(model, 1, 64)
    assert small.activation_peak_phase == "prefill"
    # attention scores [1, heads, seq, seq] dominate: at least 4x bigger when seq doubles? at least 2x.
    assert large.activation_peak_bytes > 2 * small.activation_peak_bytes
    gqa_free = replace(config, kv_heads=config.heads)
    assert gqa_free.kv_heads == 8


BUNDLED = sorted((Path(__file__).resolve().parents[1] / "models").glob("*/model.onnx"))


def bundled_feeds(model: ir.Model, sizes: Sizes) -> dict[str, np.ndarray]:
    """Inputs of any exported decoder at `sizes`, shaped by the same dimension binding the planner uses."""
    dims = bind_dims(model, sizes)
    rng = np.random.default_rng(0)
    vocab = model.graph.outputs[0].shape[-1]
    feeds = {}
    for value in model.graph.inputs:
        shape = tuple(d if isinstance(d, int) else dims[str(d.value)] for d in value.shape)
        name = value.name or ""
        if "mask" in name:
            feeds[name] = np.ones(shape, value.dtype.numpy())
        elif "position" in name:
            feeds[name] = np.broadcast_to(np.arange(sizes.past, sizes.total), shape).astype(value.dtype.numpy())
        elif value.dtype.is_floating_point():
            feeds[name] = rng.standard_normal(shape).astype(value.dtype.numpy())
        elif "seqlens" in name:  # genai: seqlens_k = total - 1 per sequence
            feeds[name] = np.full(shape, sizes.total - 1, value.dtype.numpy())
        elif "total_sequence_length" in name:
            feeds[name] = np.array(sizes.total, value.dtype.numpy()).reshape(shape)
        else:
            feeds[name] = rng.integers(0, vocab, size=shape).astype(value.dtype.numpy())
    return feeds


@pytest.mark.parametrize("path", BUNDLED, ids=[p.parent.name for p in BUNDLED])
def test_shapes_of_bundled_exports_match_onnxruntime(path: Path) -> None:
    """Every intermediate shape of every exporter's model, as onnxruntime computes it."""
    model = load_model(path)
    sizes = Sizes(batch=2, seq=1, past=4)
    try:
        shapes = evaluate_shapes(model, sizes)
    except PlanError as error:
        pytest.fail(f"{path.parent.name}: {error}")
    for name, array in every_value_by_onnxruntime(path, shapes, bundled_feeds(model, sizes)).items():
        assert shapes[name].shape == tuple(array.shape), name
    plan = plan_memory(model, 2, 8)
    assert plan.weight_bytes == sum(
        math.prod(i.dims) * ir.DataType(i.data_type).itemsize
        for i in onnx.load(str(path), load_external_data=False).graph.initializer
    )


def _same_values(a: dict[str, TensorShape], b: dict[str, TensorShape]) -> bool:
    def same(x: TensorShape, y: TensorShape) -> bool:
        values = (x.value is None and y.value is None) or (
            x.value is not None and y.value is not None and np.array_equal(x.value, y.value)
        )
        return x.shape == y.shape and x.dtype == y.dtype and values

    return a.keys() == b.keys() and all(same(a[name], b[name]) for name in a)


def test_stage_analyses_that_take_the_whole_models_shapes_equal_their_own(tiny: tuple[object, Path]) -> None:
    """A tp 2 x pp 2 partition keeps tp rank 0's whole-model evaluations (`shape_references`); each stage's
    shapes, node costs and memory plan taken from them are what evaluating the stage on its own gives."""
    from llmir_onnx.partition import PartitionOptions, partition
    from llmir_onnx.plan.cost import NODE_COSTS, node_costs
    from llmir_onnx.plan.shapes import shared_shape_evaluations, taken_results

    _, path = tiny
    result = partition(load_model(path), PartitionOptions(tp=2, pp=2))
    assert len(result.shape_references) == 2  # prefill and decode
    stages = [program.model for program in result.ranks if program.rank in (0, 2)]  # tp rank 0 of each stage
    for reference in result.shape_references:
        for stage in stages:
            own_shapes = evaluate_shapes(stage, reference.sizes)
            own_costs = node_costs(stage, reference.sizes)
            own_plan = plan_memory(stage, max_batch=reference.sizes.batch, max_seq=reference.sizes.total)
            with shared_shape_evaluations(result.shape_references):
                assert _same_values(evaluate_shapes(stage, reference.sizes), own_shapes)
                assert node_costs(stage, reference.sizes) == own_costs
                assert plan_memory(stage, max_batch=reference.sizes.batch, max_seq=reference.sizes.total) == own_plan
                # Most of a stage's nodes are the whole model's: taken, not evaluated again.
                assert len(taken_results(stage, reference.sizes, None, NODE_COSTS)) > len(stage.graph) // 2


def test_a_node_that_differs_from_the_reference_is_evaluated_again(tiny: tuple[object, Path]) -> None:
    """Taking from a reference is by node: a node whose attributes differ (here a Cast's target type) and
    everything reading it are evaluated anew; the nodes before it are taken."""
    from llmir_onnx.plan.shapes import ShapeEvaluator

    _, path = tiny
    model = load_model(path)
    sizes = Sizes(batch=2, seq=5, past=3)
    recorded = ShapeEvaluator(model, sizes, record=True)
    recorded.run()
    reference = recorded.reference()
    changed = model.clone()
    cast = next(
        node
        for node in changed.graph
        if node.op_type == "Cast" and reference.values[node.outputs[0].name].dtype == ir.DataType.FLOAT
    )
    cast.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT16)
    taken = ShapeEvaluator(changed, sizes, reference=reference)
    values = taken.run()
    assert _same_values(values, ShapeEvaluator(changed, sizes).run())
    assert values[cast.outputs[0].name].dtype == ir.DataType.FLOAT16
    assert id(cast) not in taken.reused and taken.reused
