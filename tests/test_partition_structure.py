"""In-process checks of partition(): the plan's structure, the rank models' validity, the clean errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmir_onnx import ops
from llmir_onnx.errors import LlmirError, ShardingError
from llmir_onnx.ir_io import load_model
from llmir_onnx.partition import PartitionOptions, partition

MODELS = Path(__file__).resolve().parents[1] / "models"


def _model(name: str) -> ir.Model:
    return load_model(MODELS / name / "model.onnx")  # committed: a missing one is a failure, not a skip


def _ops(model: ir.Model, domain: str = ops.LLMIR_DOMAIN) -> list[str]:
    return [node.op_type for node in model.graph if node.domain == domain]


def test_llama_tp2_is_megatron() -> None:
    result = partition(_model("llama-gqa-torch-legacy"), PartitionOptions(tp=2))
    assert [p.rank for p in result.ranks] == [0, 1]
    for program in result.ranks:
        model = program.model
        # One AllReduce after attention and one after the MLP, per layer (2 layers); nothing else.
        assert _ops(model) == ["AllReduce"] * 4
        assert model.opset_imports[ops.LLMIR_DOMAIN] == 1
        assert model.ir_version <= 10
        by_name = {b.original: b for b in program.inputs}
        key = by_name["past_key_values.0.key"]
        assert (key.dim, key.start, key.stop) == (1, 2 * program.rank, 2 * program.rank + 2)
        assert by_name["input_ids"].dim is None
        logits = next(b for b in program.outputs if b.original == "logits")
        assert logits.dim is None and logits.local == "logits"
    placements = result.placements
    assert placements["past_key_values.0.key"] == "S(1)"
    assert placements["logits"] == "R"


def test_weights_are_sliced_megatron_style() -> None:
    full = _model("llama-gqa-torch-legacy")
    result = partition(full, PartitionOptions(tp=2))
    full_weights = {n: v.const_value.numpy() for n, v in full.graph.initializers.items() if v.const_value is not None}
    q_node = next(n for n in result.ranks[1].model.graph if n.name.endswith("q_proj/MatMul"))
    down_node = next(n for n in result.ranks[1].model.graph if n.name.endswith("down_proj/MatMul"))
    q_name, down_name = q_node.inputs[1].name, down_node.inputs[1].name
    q_full, down_full = full_weights[q_name], full_weights[down_name]
    np.testing.assert_array_equal(q_node.inputs[1].const_value.numpy(), q_full[:, q_full.shape[1] // 2 :])
    np.testing.assert_array_equal(down_node.inputs[1].const_value.numpy(), down_full[down_full.shape[0] // 2 :, :])


def test_fused_qkv_gets_same_heads_and_local_split_sizes() -> None:
    result = partition(_model("gpt2-torch-legacy"), PartitionOptions(tp=2))
    assert result.placements
    fused = [p for p in result.placements.values() if "|" in p]
    assert fused and all(p.startswith("S(") for p in fused), "c_attn's output must be a blocked shard"


@pytest.mark.parametrize("name", ["llama-gqa-torch-legacy", "gpt2-torch-legacy", "qwen3-torch-dynamo"])
def test_rank_models_pass_the_checker(name: str, tmp_path: Path) -> None:
    ops.register_schemas()
    result = partition(_model(name), PartitionOptions(tp=2))
    for program in result.ranks:
        path = tmp_path / f"rank{program.rank}.onnx"
        ir.save(program.model, path, external_data=path.name + ".data")
        onnx.checker.check_model(str(path))


def test_contrib_attention_head_counts_become_local() -> None:
    # (The genai export itself does not pass onnx.checker: its contrib ops have no onnx schema.)
    result = partition(_model("llama-gqa-genai"), PartitionOptions(tp=2))
    gqa = next(n for n in result.ranks[0].model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.attributes["num_heads"].as_int() == 4
    assert gqa.attributes["kv_num_heads"].as_int() == 2
    result = partition(_model("llama-gqa-genai"), PartitionOptions(tp=8))
    gqa = next(n for n in result.ranks[0].model.graph if n.op_type == "GroupQueryAttention")
    assert (gqa.attributes["num_heads"].as_int(), gqa.attributes["kv_num_heads"].as_int()) == (1, 1)


def test_kv_heads_replicated_when_tp_exceeds_them() -> None:
    result = partition(_model("llama-gqa-torch-legacy"), PartitionOptions(tp=8))
    starts = [next(b for b in p.inputs if b.original == "past_key_values.0.key").start for p in result.ranks]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("name", "tp", "message"),
    [
        # Uneven: every tp up to the 8 heads fits, the shares keeping kv groups whole (3 is 4,2,2).
        (
            "llama-gqa-torch-legacy",
            9,
            r"^--tp 9 does not divide num_heads=8 in node \S+ \(Reshape\); use --tp 1, 2, 3, 4, 5, 6, 7 or 8$",
        ),
        (
            "gpt2-torch-legacy",
            5,
            r"^--tp 5 does not divide num_heads=4 in node \S+ \(Reshape\); use --tp 1, 2, 3 or 4$",
        ),
        ("llama-gqa-genai", 9, r"^--tp 9 does not divide num_heads=8 in node .*; use --tp 1, 2, 3, 4, 5, 6, 7 or 8$"),
        # Two kv groups of four query heads in one fused qkv: tp 4 and 8 split each group further.
        (
            "falcon-gqa-torch-legacy",
            3,
            r"^--tp 3 does not divide num_heads=2 in node \S+ \(Reshape\); use --tp 1, 2, 4 or 8$",
        ),
    ],
)
def test_tp_that_does_not_divide_the_heads(name: str, tp: int, message: str) -> None:
    with pytest.raises(ShardingError, match=message):
        partition(_model(name), PartitionOptions(tp=tp))


def test_more_stages_than_layers_fail_cleanly() -> None:
    with pytest.raises(
        LlmirError, match=r"^--pp 4 needs at least one decoder layer per stage but the model has 2 layers; use --pp 2"
    ):
        partition(_model("llama-gqa-torch-legacy"), PartitionOptions(tp=2, pp=4))


def _mlp_with(
    op: onnx.NodeProto, domain_opsets: list | None = None, extra_inputs: list[onnx.ValueInfoProto] | None = None
) -> ir.Model:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        op,
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8]), *(extra_inputs or [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), *(domain_opsets or [])])
    return ir.serde.deserialize_model(model)


def test_op_without_rule_in_sharded_region_names_node_and_op() -> None:
    model = _mlp_with(
        helper.make_node("Mystery", ["h"], ["a"], name="the_mystery", domain="com.example"),
        [helper.make_opsetid("com.example", 1)],
    )
    with pytest.raises(ShardingError, match=r"no sharding rule for op com\.example::Mystery in node the_mystery"):
        partition(model, PartitionOptions(tp=2))


def test_replicate_unsupported_gathers_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = _mlp_with(
        helper.make_node("Mystery", ["h"], ["a"], name="the_mystery", domain="com.example"),
        [helper.make_opsetid("com.example", 1)],
    )
    with caplog.at_level(logging.WARNING):
        result = partition(model, PartitionOptions(tp=2, replicate_unsupported=True))
    assert any("the_mystery" in w for w in result.warnings)
    assert "AllGather" in _ops(result.ranks[0].model)


def test_partial_into_nonlinear_op_is_reduced_first() -> None:
    # down's output is Partial; a Sigmoid is not linear, so the plan must AllReduce before it.
    model = _mlp_with(helper.make_node("Relu", ["h"], ["a"], name="act"))
    graph = model.graph
    sigmoid = ir.Node("", "Sigmoid", [graph.outputs[0]], name="after")
    graph.append(sigmoid)
    graph.outputs[0] = sigmoid.outputs[0]
    sigmoid.outputs[0].name = "z"
    result = partition(model, PartitionOptions(tp=2))
    order = [n.op_type for n in result.ranks[0].model.graph]
    assert order.index("AllReduce") < order.index("Sigmoid")


def test_vocab_parallel_layout() -> None:
    result = partition(_model("llama-gqa-torch-legacy"), PartitionOptions(tp=2, vocab_parallel=True))
    collectives = _ops(result.ranks[0].model)
    # One AllReduce for the embedding's partial sum, two per layer, one AllGather of the logits' vocab axis.
    assert sorted(collectives) == ["AllGather"] + ["AllReduce"] * 5
    gather = next(n for n in result.ranks[0].model.graph if n.op_type == "AllGather")
    assert gather.attributes["axis"].as_int() == 2
    assert "sizes" not in gather.attributes  # equal parts: the even AllGather, as before `sizes` existed
    logits = next(b for b in result.ranks[1].outputs if b.original == "logits")
    assert logits.dim is None


def test_sharded_value_captured_by_a_subgraph_is_refused() -> None:
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    model = _mlp_with(
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        extra_inputs=[helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
    )
    # The If reads h (S(2), between the column and the row matmul) only from inside its branches.
    proto = ir.serde.serialize_model(model)
    proto.graph.node.append(
        helper.make_node("If", ["flag"], ["b"], name="branchy", then_branch=then_branch, else_branch=else_branch)
    )
    proto.graph.output.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, None))
    with pytest.raises(ShardingError, match=r"node branchy \(If\) reads 'h', which is S\(2\), inside its subgraph"):
        partition(ir.serde.deserialize_model(proto), PartitionOptions(tp=2))


def test_cyclic_gc_is_paused_only_inside_a_partition() -> None:
    import gc

    from llmir_onnx.partition import cyclic_gc_paused

    assert gc.isenabled()
    with cyclic_gc_paused():
        with cyclic_gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block leaves the outer one's pause alone
    assert gc.isenabled()
    partition(_model("llama-gqa-torch-legacy"), PartitionOptions(tp=2, pp=2))
    assert gc.isenabled()
    with pytest.raises(LlmirError):
        partition(_model("llama-gqa-torch-legacy"), PartitionOptions(tp=2, pp=4))
    assert gc.isenabled()  # re-enabled when the partition fails, too
