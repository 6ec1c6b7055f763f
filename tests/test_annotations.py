"""ONNX IR v11 annotations: `annotate` writes a plan onto the original model; `partition` reads them as pins."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from synthetic_helpers import make_synthetic
from test_cli import assert_one_line_error, run_cli

from llmir_onnx.annotations import CONFIGURATION_NAME
from llmir_onnx.api import partition_to_dir
from llmir_onnx.model_facts import layer_of_node_by_name
from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds
from llmir_onnx.runtime.verify import format_comparisons, verify_plan


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic4"), "--preset", "tiny", "--layers", "4")


@pytest.fixture(scope="module")
def annotated(four_layers: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tp 2 x pp 2 plan of the 4-layer model, and the model annotated with it."""
    folder = tmp_path_factory.mktemp("annotated")
    plan = folder / "plan"
    partition_to_dir(four_layers, plan, tp=2, pp=2)
    out = folder / "annotated.onnx"
    result = run_cli("annotate", str(plan), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return plan, out


def _stage_layers(plan: Path) -> list[list[int]]:
    manifest = json.loads((plan / "manifest.json").read_text())
    return [entry["layers"] for entry in manifest["ranks"] if entry["coords"]["tp"] == 0]


def test_annotated_model_passes_the_checker_and_round_trips(annotated: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = annotated
    proto = onnx.load(str(path), load_external_data=False)
    assert proto.ir_version == 11
    onnx.checker.check_model(str(path), full_check=True)
    assert [c.name for c in proto.configuration] == [CONFIGURATION_NAME]
    assert list(proto.configuration[0].device) == [f"rank{r}" for r in range(4)]
    stages = {n.device_configurations[0].pipeline_stage for n in proto.graph.node}
    assert stages == {0, 1} and all(len(n.device_configurations) == 1 for n in proto.graph.node)
    # A column-parallel weight's spec: its output axis split over the tp group of its stage.
    specs = [(n, s) for n in proto.graph.node for s in n.device_configurations[0].sharding_spec]
    column = [(n, s) for n, s in specs if n.op_type == "MatMul" and s.sharded_dim and s.sharded_dim[0].axis == 1
              and s.tensor_name in {i.name for i in proto.graph.initializer}]
    assert column
    for node, spec in column:
        stage = node.device_configurations[0].pipeline_stage
        assert list(spec.device) == ([0, 1] if stage == 0 else [2, 3])
        assert spec.sharded_dim[0].simple_sharding[0].num_shards == 2
    # Through onnx_ir and back: the same annotations.
    again = tmp_path / "again.onnx"
    ir.save(ir.load(path), again, external_data="again.onnx.data")
    reloaded = onnx.load(str(again), load_external_data=False)
    assert [n.device_configurations for n in reloaded.graph.node] == [n.device_configurations for n in proto.graph.node]
    assert reloaded.configuration == proto.configuration


def test_partitioning_the_annotated_model_gives_the_same_plan_byte_for_byte(annotated: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    plan, path = annotated
    again = tmp_path / "plan"
    partition_to_dir(path, again, tp=2, pp=2)
    files = sorted(p.name for p in plan.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        if name != "manifest.json":
            assert (plan / name).read_bytes() == (again / name).read_bytes(), name
    first, second = (json.loads((p / "manifest.json").read_text()) for p in (plan, again))
    first.pop("source"), second.pop("source")
    assert first == second


def _restaged(path: Path, out: Path, stage_of_layer: dict[int, int]) -> Path:
    model = ir.load(path)
    for node in model.graph:
        layer = layer_of_node_by_name(node)
        if layer is not None and node.device_configurations:
            node.device_configurations = tuple(
                dataclasses.replace(c, pipeline_stage=stage_of_layer[layer]) for c in node.device_configurations
            )
    ir.save(model, out, external_data=f"{out.name}.data")
    return out


def test_a_hand_pinned_stage_cut_moves_the_cut_and_the_plan_still_matches(annotated: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    plan, path = annotated
    assert _stage_layers(plan) == [[0, 2], [2, 4]]  # the balanced cut
    moved = _restaged(path, tmp_path / "moved.onnx", {0: 0, 1: 1, 2: 1, 3: 1})
    out = tmp_path / "plan"
    partition_to_dir(moved, out, tp=2, pp=2)
    assert _stage_layers(out) == [[0, 1], [1, 4]]
    # verify's default feeds (a 4-token step after 3 cached tokens), through the rank processes.
    _, rows = verify_plan(out, model_past_feeds(moved, FeedSizes()))
    assert rows and all(row.ok for row in rows), format_comparisons(rows)
    # The pins and --stage-cuts must agree; --ignore-annotations goes back to the balanced cut.
    assert_one_line_error(run_cli("partition", str(moved), "--tp", "2", "--pp", "2", "-o", str(tmp_path / "x"),
                                  "--stage-cuts", "1"), "contradicts the model's stage annotations", "after layers 0")
    assert not (tmp_path / "x").exists()
    partition_to_dir(moved, tmp_path / "free", tp=2, pp=2, ignore_annotations=True)
    assert _stage_layers(tmp_path / "free") == [[0, 2], [2, 4]]


def test_stages_that_run_backwards_fail_with_one_line(annotated: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = annotated
    backwards = _restaged(path, tmp_path / "backwards.onnx", {0: 1, 1: 0, 2: 1, 3: 1})
    result = run_cli("partition", str(backwards), "--tp", "2", "--pp", "2", "-o", str(tmp_path / "plan"))
    assert_one_line_error(result, "layer 1 is pinned to stage 0", "stages must follow the layers")
    assert not (tmp_path / "plan").exists()


def test_a_contradictory_sharding_pin_fails_with_one_line(annotated: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = annotated
    model = ir.load(path)
    # Pin a column-parallel weight (split along its output axis) to its input axis instead.
    node = next(n for n in model.graph for c in n.device_configurations for s in c.sharding_specs
                if n.op_type == "MatMul" and s.value is n.inputs[1] and s.sharded_dims[0].axis == 1)
    (config,) = node.device_configurations
    specs = tuple(
        dataclasses.replace(s, sharded_dims=(dataclasses.replace(s.sharded_dims[0], axis=0),))
        if s.value is node.inputs[1] else s
        for s in config.sharding_specs
    )
    node.device_configurations = (dataclasses.replace(config, sharding_specs=specs),)
    bad = tmp_path / "bad.onnx"
    ir.save(model, bad, external_data="bad.onnx.data")
    result = run_cli("partition", str(bad), "--tp", "2", "--pp", "2", "-o", str(tmp_path / "plan"))
    assert_one_line_error(result, node.inputs[1].name, "to S(0)", "make it S(1)", "--ignore-annotations")
    assert not (tmp_path / "plan").exists()
    partition_to_dir(bad, tmp_path / "plan", tp=2, pp=2, ignore_annotations=True)


def test_pins_made_for_another_tp_fail_with_one_line(annotated: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = annotated
    result = run_cli("partition", str(path), "--tp", "4", "--pp", "2", "-o", str(tmp_path / "plan"))
    assert_one_line_error(result, "to 2 shards, but --tp is 4", "--ignore-annotations")
    assert not (tmp_path / "plan").exists()
