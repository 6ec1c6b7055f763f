"""Manifest round trip, atomic plan writing, output reassembly and safe model loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from llmir_onnx.errors import InputModelError, PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.plan.emit import atomic_output_dir
from llmir_onnx.plan.manifest import FileDigest, Manifest, RankEntry, SliceBinding, TensorInfo
from llmir_onnx.runtime.verify import assemble_outputs, rank_outputs_path


def _manifest(bindings_per_rank: list[list[SliceBinding]]) -> Manifest:
    return Manifest(
        source={"path": "/nowhere/model.onnx", "sha256": "0" * 64},
        mesh={"tp": len(bindings_per_rank), "pp": 1, "cp": 1, "world_size": len(bindings_per_rank), "groups": {}},
        inputs=[TensorInfo("x", "float32", ["batch", 4])],
        outputs=[TensorInfo("y", "float32", ["batch", 6])],
        ranks=[
            RankEntry(rank, {"pp": 0, "cp": 0, "tp": rank}, f"rank{rank}.onnx", [], bindings)
            for rank, bindings in enumerate(bindings_per_rank)
        ],
        files={f"rank{rank}.onnx": FileDigest(10, "f" * 64) for rank in range(len(bindings_per_rank))},
    )


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = _manifest([[SliceBinding("y", "y", 1, 0, 4)], [SliceBinding("y", "y_local", 1, 4, 6)]])
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest


def test_manifest_of_another_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "llmir-onnx-plan", "version": 99}')
    with pytest.raises(PlanError, match="not a version-2"):
        Manifest.read(tmp_path)


def test_assemble_uneven_slices_and_replicas(tmp_path: Path) -> None:
    full = np.arange(12, dtype=np.float32).reshape(2, 6)
    manifest = _manifest([[SliceBinding("y", "y", 1, 0, 4)], [SliceBinding("y", "y", 1, 4, 6)]])
    np.savez(rank_outputs_path(tmp_path, 0, 0), y=full[:, :4])
    np.savez(rank_outputs_path(tmp_path, 1, 0), y=full[:, 4:])
    np.testing.assert_array_equal(assemble_outputs(manifest, tmp_path)["y"], full)


def test_assemble_refuses_a_gap(tmp_path: Path) -> None:
    manifest = _manifest([[SliceBinding("y", "y", 1, 0, 2)], [SliceBinding("y", "y", 1, 4, 6)]])
    np.savez(rank_outputs_path(tmp_path, 0, 0), y=np.zeros((2, 2), np.float32))
    np.savez(rank_outputs_path(tmp_path, 1, 0), y=np.zeros((2, 2), np.float32))
    with pytest.raises(PlanError, match="partly uncovered"):
        assemble_outputs(manifest, tmp_path)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    with pytest.raises(RuntimeError), atomic_output_dir(out) as staging:
        (staging / "rank0.onnx").write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_replaces_an_old_plan_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out) as staging:
        (staging / "manifest.json").write_text("new")
        raise RuntimeError("interrupted")
    assert (out / "manifest.json").read_text() == "old"
    with atomic_output_dir(out) as staging:
        (staging / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]


def test_atomic_output_dir_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PlanError, match="holds no plan"), atomic_output_dir(tmp_path):
        pass


def _model_with_external_location(tmp_path: Path, location: str) -> Path:
    weight = oh.make_tensor("w", onnx.TensorProto.FLOAT, [4], [0.0] * 4)
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [weight],
    )
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    onnx.save(oh.make_model(graph, ir_version=10, opset_imports=[oh.make_opsetid("", 17)]), path)
    return path


def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    path = _model_with_external_location(tmp_path, "../secret.bin")
    with pytest.raises(InputModelError, match="outside the model's folder"):
        load_model(path)


def test_external_data_inside_the_folder_loads_lazily(tmp_path: Path) -> None:
    path = _model_with_external_location(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = load_model(path)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), np.arange(4, dtype=np.float32))


def test_missing_model_file_is_a_clean_error(tmp_path: Path) -> None:
    with pytest.raises(InputModelError, match="does not exist"):
        load_model(tmp_path / "absent.onnx")
