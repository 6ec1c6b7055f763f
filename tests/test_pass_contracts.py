"""The sharding passes' contracts: each runs alone on what the pass before it returned, says truthfully
whether it changed the model, checks what it needs (naming the pass that provides it), and visits
subgraphs (If/Loop/Scan bodies) instead of skipping them."""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmir_onnx.errors import ShardingError
from llmir_onnx.mesh import DeviceMesh
from llmir_onnx.partition import PartitionOptions, partition, plan_ranks
from llmir_onnx.passes import (
    AnnotatePass,
    InsertCollectivesPass,
    LocalizePass,
    PropagatePass,
    ShardingPassResult,
    ShardingState,
    materialize_rank,
)
from llmir_onnx.passes.context_parallel import ContextParallelPass
from llmir_onnx.passes.sequence_parallel import SequenceParallelPass, declare_token_chunk_shapes
from llmir_onnx.passes.state import LOCALIZED_KEY
from llmir_onnx.placement import REPLICATE, Shard
from tests.test_rules import Case, R, make_model, run, simulate

MODELS = Path(__file__).resolve().parents[1] / "models"

PassFactory = Callable[[ShardingState], ir.passes.PassBase]


@dataclass(frozen=True)
class Step:
    name: str
    make: PassFactory
    after: int  # the step whose output this pass takes (-1: the model as loaded)


def _steps(tp: int, sp: bool, uneven_ranks: int, cp: int = 1) -> list[Step]:
    steps = [Step("annotate", AnnotatePass, -1), Step("propagate", PropagatePass, 0)]
    if sp:
        steps.append(Step("sequence_parallel", SequenceParallelPass, len(steps) - 1))
    if cp > 1:
        steps.append(Step("context_parallel", ContextParallelPass, len(steps) - 1))
    steps.append(Step("insert_collectives", InsertCollectivesPass, len(steps) - 1))
    collectives = len(steps) - 1
    for tp_rank in range(max(uneven_ranks, 1)):
        steps.append(Step(f"localize[{tp_rank}]", lambda s, r=tp_rank: LocalizePass(s, r), collectives))
    return steps


def state_of(result: ir.passes.PassResult) -> ShardingState:
    """The state a sharding pass returns for the next one."""
    assert isinstance(result, ShardingPassResult)
    return result.state


def _initial_state(options: PartitionOptions) -> ShardingState:
    """The state `partition.plan_ranks` starts from (the caller's configuration only)."""
    return ShardingState(
        DeviceMesh(pp=1, cp=options.cp, tp=options.tp),
        replicate_unsupported=options.replicate_unsupported,
        vocab_parallel=options.vocab_parallel,
        tp_weights=options.tp_weights,
    )


AUTO_NAME = re.compile(r"^val_\d+$")


def fingerprint(model: ir.Model) -> bytes:
    """The model as ONNX bytes, weights included by content (wherever they are stored). Values the passes
    leave unnamed are named when the model is written (`val_<n>`, counted per file), so in both forms they
    are named here by their place in the graph."""
    model = model.clone()
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if not value.name or AUTO_NAME.match(value.name):
                value.name, count = f"unnamed_{count}", count + 1
    proto = ir.serde.serialize_model(model)
    digest = hashlib.sha256()
    for graph_proto in _graph_protos(proto.graph):
        for tensor in graph_proto.initializer:
            # A weight read from a file is written as a reference to it: compare its values instead.
            digest.update(tensor.name.encode())
            digest.update(numpy_helper.to_array(tensor, base_dir=_base_dir(model, tensor)).tobytes())
        del graph_proto.initializer[:]
    return proto.SerializeToString(deterministic=True) + digest.digest()


def _graph_protos(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found += _graph_protos(sub)
    return found


def _base_dir(model: ir.Model, tensor: onnx.TensorProto) -> str:
    initializer = model.graph.initializers.get(tensor.name)
    external = getattr(initializer.const_value, "base_dir", "") if initializer is not None else ""
    return str(external or "")


def state_summary(state: ShardingState) -> dict[str, object]:
    """Every field of the state, rank constants by their value on each tp rank."""
    by_rank = {"rank_constants": state.tp, "cp_rank_constants": state.mesh.cp}
    fields = {name: copy.copy(value) for name, value in vars(state).items() if name not in by_rank}
    for field_name, ranks in by_rank.items():
        fields[field_name] = {
            name: [np.asarray(per_rank(r)).tolist() for r in range(ranks)]
            for name, per_rank in sorted(getattr(state, field_name).items())
        }
    return fields


def save(model: ir.Model, folder: Path, name: str) -> Path:
    """The model written as an ONNX file (weights in a data file beside it), for a pass to run on alone."""
    path = folder / f"{name}.onnx"
    ir.save(model.clone(), path, external_data=f"{name}.onnx.data")
    return path


@dataclass
class Recorded:
    before: bytes
    after: bytes
    modified: bool
    model_after: ir.Model
    state_after: ShardingState


def _run_pipeline(model: ir.Model, steps: list[Step], state: ShardingState, folder: Path) -> list[Recorded]:
    """Every step in memory, chained as partition chains them; each output also saved as `step<index>.onnx`."""
    recorded: list[Recorded] = []
    for index, step in enumerate(steps):
        if step.after < 0:
            source_model, source_state = model, state
        else:
            source_model, source_state = recorded[step.after].model_after, recorded[step.after].state_after
        current = source_model.clone()
        before = fingerprint(current)
        result = step.make(copy.deepcopy(source_state))(current)
        assert isinstance(result, ShardingPassResult)
        save(result.model, folder, f"step{index}")
        after = fingerprint(result.model)
        recorded.append(Recorded(before, after, result.modified, result.model, copy.deepcopy(result.state)))
    return recorded


LAYOUTS = [
    pytest.param("llama-gqa-torch-legacy", PartitionOptions(tp=2), id="legacy-tp2"),
    pytest.param("llama-gqa-torch-legacy", PartitionOptions(tp=2, sequence_parallel=True), id="legacy-tp2-sp"),
    pytest.param("llama-gqa-torch-legacy", PartitionOptions(tp=3), id="legacy-tp3-uneven"),
    pytest.param("llama-gqa-torch-legacy", PartitionOptions(tp=1), id="legacy-tp1"),
    pytest.param("llama-gqa-torch-legacy", PartitionOptions(tp=2, cp=2), id="legacy-tp2-cp2"),
]


def _uneven_ranks(name: str, options: PartitionOptions) -> int:
    _, state = plan_ranks(ir.load(MODELS / name / "model.onnx"), options)
    return options.tp if state.uneven else 1


@pytest.mark.parametrize(("name", "options"), LAYOUTS)
def test_each_pass_runs_alone_on_the_saved_output_of_the_one_before(
    name: str, options: PartitionOptions, tmp_path: Path
) -> None:
    model = ir.load(MODELS / name / "model.onnx")
    steps = _steps(options.tp, options.sequence_parallel, _uneven_ranks(name, options), options.cp)
    pipeline = _run_pipeline(model, steps, _initial_state(options), tmp_path)

    # The chained steps are the partition's own pipeline: the same localized templates.
    templates, _ = plan_ranks(ir.load(MODELS / name / "model.onnx"), options)
    localized = [r for step, r in zip(steps, pipeline, strict=True) if step.name.startswith("localize")]
    assert len(localized) == len(templates)
    for made, template in zip(localized, templates, strict=True):
        finished = made.model_after.clone()
        if made.state_after.sequence_shards or made.state_after.context_shards:
            declare_token_chunk_shapes(finished, made.state_after)  # as plan_ranks does after localize
        assert fingerprint(finished) == fingerprint(template)

    for index, step in enumerate(steps):
        if step.after < 0:
            continue
        prepared = ir.load(tmp_path / f"step{step.after}.onnx")  # the pass before's output, as a file
        alone = step.make(copy.deepcopy(pipeline[step.after].state_after))(prepared)
        assert isinstance(alone, ShardingPassResult)
        assert fingerprint(alone.model) == pipeline[index].after, f"{step.name} alone made another model"
        assert state_summary(alone.state) == state_summary(pipeline[index].state_after), f"{step.name}: other state"
        assert alone.modified == pipeline[index].modified


@pytest.mark.parametrize(("name", "options"), LAYOUTS)
def test_modified_is_true_exactly_when_the_model_changed(name: str, options: PartitionOptions, tmp_path: Path) -> None:
    model = ir.load(MODELS / name / "model.onnx")
    steps = _steps(options.tp, options.sequence_parallel, _uneven_ranks(name, options), options.cp)
    for step, recorded in zip(steps, _run_pipeline(model, steps, _initial_state(options), tmp_path), strict=True):
        assert recorded.modified == (recorded.before != recorded.after), step.name
        if options.tp == 1 and step.name != "annotate":
            assert not recorded.modified, f"{step.name} changed a tp 1 model"


@pytest.mark.parametrize(("name", "options"), [*LAYOUTS[:3], LAYOUTS[-1]])
def test_a_second_run_changes_nothing_and_says_so(name: str, options: PartitionOptions, tmp_path: Path) -> None:
    model = ir.load(MODELS / name / "model.onnx")
    steps = _steps(options.tp, options.sequence_parallel, 1, options.cp)
    _run_pipeline(model, steps, _initial_state(options), tmp_path)
    for index, step in enumerate(steps):
        if step.name == "propagate":
            continue  # it places every value once: a second run is refused (test_preconditions_name_the_pass)
        done = ir.load(tmp_path / f"step{index}.onnx")
        state = _state_after(model, steps, index, options)
        before = fingerprint(done)
        again = step.make(state)(done)
        assert not again.modified, f"{step.name} said it changed its own output"
        assert fingerprint(again.model) == before, f"{step.name} changed its own output"


def _state_after(model: ir.Model, steps: list[Step], index: int, options: PartitionOptions) -> ShardingState:
    state = _initial_state(options)
    current = model.clone()
    for step in steps[: index + 1]:
        state = state_of(step.make(state)(current))
    return state


def test_preconditions_name_what_is_missing_and_the_pass_that_provides_it() -> None:
    options = PartitionOptions(tp=2)
    model = ir.load(MODELS / "llama-gqa-torch-legacy" / "model.onnx")
    with pytest.raises(ir.passes.PreconditionError, match=r"^propagate needs the global shapes .*run AnnotatePass"):
        PropagatePass(_initial_state(options))(model)
    annotated = state_of(AnnotatePass(_initial_state(options))(model))
    for make, name in ((InsertCollectivesPass, "insert_collectives"), (LocalizePass, "localize"),
                       (SequenceParallelPass, "sequence parallelism"), (ContextParallelPass, "context parallelism")):
        with pytest.raises(ir.passes.PreconditionError, match=rf"^{name} needs a placement .*run PropagatePass first"):
            make(copy.deepcopy(annotated))(model)
    propagated = state_of(PropagatePass(annotated)(model))
    with pytest.raises(ir.passes.PreconditionError, match=r"already has a placement: run it on a state fresh"):
        PropagatePass(propagated)(model)
    with pytest.raises(ir.passes.PreconditionError, match=r"^localize needs every redistribution converted, but node "
                       r"\S+ still reads '\S+' as \S+: run InsertCollectivesPass first$"):
        LocalizePass(propagated)(model)
    converted = state_of(InsertCollectivesPass(propagated)(model))
    with pytest.raises(ir.passes.PreconditionError, match=r"^sequence parallelism runs before insert_collectives"):
        SequenceParallelPass(converted)(model)
    LocalizePass(converted)(model)
    assert model.metadata_props[LOCALIZED_KEY] == "0/2"
    with pytest.raises(ir.passes.PreconditionError, match=r"already localized for tp rank/tp 0/2; .* for 1/2$"):
        LocalizePass(converted, tp_rank=1)(model)
    assert LOCALIZED_KEY not in materialize_rank(model, converted, 0).metadata_props


# -- subgraphs -------------------------------------------------------------------------------------------------


def _branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])


def _mlp_and_if(then_nodes: list[onnx.NodeProto], else_nodes: list[onnx.NodeProto], if_first: bool,
                branch_weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """x -> up (column) -> Relu -> down (row) -> y, and an If on `flag` whose branches make `b`."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((8, 16)), "w2": rng.standard_normal((16, 8)), **(branch_weights or {})}
    branches = {"then_branch": _branch("then", then_nodes, "t"), "else_branch": _branch("else", else_nodes, "e")}
    branchy = helper.make_node("If", ["flag"], ["b"], name="branchy", **branches)
    mlp = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        [branchy, *mlp] if if_first else [*mlp, branchy],
        "mlp_and_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_a_sharded_op_inside_an_if_branch_is_refused_naming_it() -> None:
    rng = np.random.default_rng(1)
    # The then branch holds its own column/row pair: tensor parallelism would split it.
    then_nodes = [helper.make_node("MatMul", ["x", "v1"], ["p"], name="branch_up"),
                  helper.make_node("MatMul", ["p", "v2"], ["t"], name="branch_down")]
    model = _mlp_and_if(then_nodes, [helper.make_node("Neg", ["x"], ["e"], name="branch_neg")], if_first=False,
                        branch_weights={"v1": rng.standard_normal((8, 16)), "v2": rng.standard_normal((16, 8))})
    with pytest.raises(ShardingError, match=r"^node branch_up \(MatMul\) inside the subgraph of node branchy \(If\) "
                       r"would be column-parallel; sharding inside control flow .* is not supported"):
        partition(ir.serde.deserialize_model(model), PartitionOptions(tp=2))


@pytest.mark.parametrize("if_first", [True, False], ids=["if-before-the-mlp", "if-after-the-mlp"])
@pytest.mark.parametrize("tp", [2, 4])
def test_a_weight_read_in_a_branch_stays_whole_there_and_the_ranks_match(if_first: bool, tp: int) -> None:
    """The branches read w1, which the column-parallel `up` splits: whichever comes first, the branches read a
    whole copy, every value in them is replicated, and the ranks' outputs combine into the original's (one
    process, onnxruntime per rank, as tests/test_rules.py checks rules; the row output `y` stays Partial)."""
    then_nodes = [helper.make_node("MatMul", ["x", "w1"], ["t"], name="branch_matmul")]
    else_nodes = [helper.make_node("Neg", ["x"], ["e0"], name="branch_neg"),
                  helper.make_node("MatMul", ["e0", "w1"], ["e"], name="branch_neg_matmul")]
    proto = _mlp_and_if(then_nodes, else_nodes, if_first)
    x = np.random.default_rng(3).standard_normal((2, 3, 8)).astype(np.float32)
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    for flag in (True, False):
        case = Case(f"if_{if_first}", nodes, {"x": (x, R), "flag": (np.array(flag), R)}, ["y", "b"], weights)
        expected = dict(zip(case.outputs, run(make_model(case), {"x": x, "flag": np.array(flag)}, case.outputs),
                            strict=True))
        combined, placements = simulate(case, tp)
        assert placements == {"y": "P", "b": "R"}
        for name in case.outputs:
            np.testing.assert_allclose(combined[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)

    templates, state = plan_ranks(ir.serde.deserialize_model(proto), PartitionOptions(tp=tp))
    assert isinstance(state.weight_placements["w1"], Shard) or isinstance(state.weight_placements["w1__S(1)"], Shard)
    branchy = next(node for node in templates[0].graph if node.op_type == "If")
    for attr in ("then_branch", "else_branch"):
        for node in branchy.attributes[attr].as_graph():
            assert all(state.placements[v.name] == REPLICATE for v in node.outputs), node.name
            weight = node.inputs[1] if node.op_type == "MatMul" else None
            if weight is not None:
                assert state.placements[weight.name] == REPLICATE, f"{node.name} reads {weight.name}"


def test_localize_visits_subgraph_nodes_and_leaves_their_whole_sizes() -> None:
    """A Reshape in a branch reads only replicated values: localize visits it and keeps its target."""
    then_nodes = [helper.make_node("Constant", [], ["shape"], name="branch_shape",
                                   value=numpy_helper.from_array(np.array([6, 8], dtype=np.int64))),
                  helper.make_node("Reshape", ["x", "shape"], ["t"], name="branch_reshape")]
    model = ir.serde.deserialize_model(_mlp_and_if(then_nodes, [helper.make_node("Neg", ["x"], ["e"])], False))
    templates, _ = plan_ranks(model, PartitionOptions(tp=2))
    branch = next(n for n in templates[0].graph if n.op_type == "If").attributes["then_branch"].as_graph()
    reshape = next(n for n in branch if n.op_type == "Reshape")
    target = reshape.inputs[1]
    assert target is not None and target.const_value is not None
    assert target.const_value.numpy().tolist() == [6, 8]
