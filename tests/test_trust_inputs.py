"""Broken input models get one line naming the cause and the fix, a non-zero exit and nothing written.

Each model here is broken in one way a downloaded model can be (empty, not ONNX, external data that
lies about its size or is cut short), or is valid but gives tensor parallelism nothing to shard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from llmir_onnx.runtime.verify import format_comparisons, verify_plan
from tests.test_cli import assert_one_line_error, run_cli

FLOAT = onnx.TensorProto.FLOAT
WEIGHT = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
X = oh.make_tensor_value_info("x", FLOAT, [2, 64])
Y = oh.make_tensor_value_info("y", FLOAT, [2, 64])


def _save(folder: Path, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], opset: int = 17) -> Path:
    folder.mkdir()
    graph = oh.make_graph(nodes, "g", [X], [Y], initializers)
    path = folder / "model.onnx"
    onnx.save(oh.make_model(graph, ir_version=10, opset_imports=[oh.make_opsetid("", opset)]), path)
    return path


def _external(location: str, length: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name="w", data_type=FLOAT, dims=list(WEIGHT.shape))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def empty(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    return folder / "model.onnx"


def not_onnx(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 42\n")
    return folder / "model.onnx"


def length_mismatch(folder: Path) -> Path:
    path = _save(folder, [oh.make_node("MatMul", ["x", "w"], ["y"])], [_external("w.bin", WEIGHT.nbytes - 4)])
    (folder / "w.bin").write_bytes(WEIGHT.tobytes())
    return path


def short_data_file(folder: Path) -> Path:
    path = _save(folder, [oh.make_node("MatMul", ["x", "w"], ["y"])], [_external("w.bin", WEIGHT.nbytes)])
    (folder / "w.bin").write_bytes(WEIGHT.tobytes()[:1000])
    return path


def constant_in_external_data(folder: Path) -> Path:
    nodes = [oh.make_node("Constant", [], ["w"], value=_external("w.bin", WEIGHT.nbytes)),
             oh.make_node("MatMul", ["x", "w"], ["y"])]
    path = _save(folder, nodes, [])
    (folder / "w.bin").write_bytes(WEIGHT.tobytes())
    return path


def single_relu(folder: Path) -> Path:
    return _save(folder, [oh.make_node("Relu", ["x"], ["y"])], [])


def matmul_relu_opset7(folder: Path) -> Path:
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Relu", ["h"], ["y"])]
    return _save(folder, nodes, [oh.make_tensor("w", FLOAT, list(WEIGHT.shape), WEIGHT.ravel())], opset=7)


@pytest.mark.parametrize(
    ("make", "tp", "fragments"),
    [
        (empty, 1, ["is empty (0 bytes)", "model.onnx"]),
        (not_onnx, 1, ["cannot read", "as an ONNX model", "pass an .onnx file"]),
        (length_mismatch, 1, ["'w'", "16384 bytes", "length of 16380 bytes", "w.bin", "fix its `length`"]),
        (short_data_file, 1, ["'w'", "'w.bin'", "holds only 1000 bytes", "copy the complete data file"]),
        (single_relu, 2, ["--tp 2 shards no weight", "Relu x1", "--allow-replicated"]),
        (matmul_relu_opset7, 2, ["--tp 2 shards no weight", "MatMul x1", "Relu x1", "--allow-replicated"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    make: Callable[[Path], Path], tp: int, fragments: list[str], tmp_path: Path
) -> None:
    model = make(tmp_path / "model")
    out = tmp_path / "out" / "plan"
    result = run_cli("partition", str(model), "--tp", str(tp), "-o", str(out), "--quiet")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [single_relu, matmul_relu_opset7])
def test_allow_replicated_writes_the_replicated_plan_asked_for(make: Callable[[Path], Path], tmp_path: Path) -> None:
    model = make(tmp_path / "model")
    out = tmp_path / "plan"
    result = run_cli("partition", str(model), "--tp", "2", "-o", str(out), "--quiet", "--allow-replicated")
    assert result.returncode == 0, result.stderr
    _verify_numerically(out, model)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_constant_in_external_data_is_partitioned_as_a_weight(tp: int, tmp_path: Path) -> None:
    model = constant_in_external_data(tmp_path / "model")
    out = tmp_path / "plan"
    extra = ["--allow-replicated"] if tp > 1 else []
    result = run_cli("partition", str(model), "--tp", str(tp), "-o", str(out), "--quiet", *extra)
    assert result.returncode == 0, result.stderr
    # The weight went into the plan's data files: no rank model points at the source's w.bin.
    for rank_model in out.glob("rank*.onnx"):
        proto = onnx.load(rank_model, load_external_data=False)
        locations = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        assert locations and all(location.endswith(".data") and location != "w.bin" for location in locations)
    _verify_numerically(out, model)


def _verify_numerically(plan: Path, model: Path) -> None:
    # In this process (the plan, not the verify command, is under test here): the rank processes run it.
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    _, rows = verify_plan(plan, feeds, model_path=model)
    assert [row.name for row in rows] == ["y"] and all(row.ok for row in rows), format_comparisons(rows)


@pytest.fixture(scope="module")
def relu_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("relu")
    model = single_relu(folder / "model")
    plan = folder / "plan"
    result = run_cli("partition", str(model), "-o", str(plan), "--quiet")
    assert result.returncode == 0, result.stderr
    return plan


GOOD_X = np.zeros((2, 64), np.float32)


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        (None, ["inputs file", "does not exist", "numpy.savez"]),
        ("not an npz", ["cannot read", "as an NPZ of inputs", "numpy.savez"]),
        ({}, ["lack the model's input(s) ['x']", "give every input"]),
        ({"x": GOOD_X, "z": GOOD_X}, ["hold ['z'], not inputs of the model", "remove them"]),
        ({"x": GOOD_X.astype(np.float64)}, ["input 'x' is float64, the model takes float32", "astype('float32')"]),
        ({"x": GOOD_X[:, :32]}, ["input 'x' has 32 in dim 1, the model takes [2, 64]", "give it 64 there"]),
        ({"x": GOOD_X[0]}, ["input 'x' has shape [64], the model takes [2, 64] (2 dims)", "reshape it"]),
    ],
)
def test_verify_inputs_that_do_not_fit_the_model_are_one_line(
    arrays: dict[str, np.ndarray] | str | None, fragments: list[str], relu_plan: Path, tmp_path: Path
) -> None:
    """--inputs is checked against the original model's inputs before any rank starts (a rank's onnxruntime
    error, or an internal error, before)."""
    path = tmp_path / "inputs.npz"
    if isinstance(arrays, str):
        path.write_text(arrays)
    elif arrays is not None:
        np.savez(path, **arrays)
    assert_one_line_error(run_cli("verify", str(relu_plan), "--inputs", str(path)), *fragments)
