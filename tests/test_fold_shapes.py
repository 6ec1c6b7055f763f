"""Shape-chain folding (passes/fold_shapes.py): what it folds, what it must leave, and that the folded
graphs compute the same numbers (onnxruntime on both graphs here; real rank processes through
`verify` and `generate --check` in tests/test_partition_e2e.py and tests/test_runtime_generate.py,
whose plans are all folded now)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmir_onnx.passes.fold_shapes import _PREFIX, fold_shape_chains

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "models" / "llama-gqa-torch-legacy"


def _capped_model() -> onnx.ModelProto:
    """A Reshape whose shape is [batch, new] from a Shape chain (foldable), and a Slice whose end is
    min(total, 100): equal to `total` at small sizes, not at the plan's 2048 tokens (must stay)."""
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "zero"], ["batch"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["new"]),
        helper.make_node("Concat", ["batch", "new"], ["ids_target"], axis=0),
        helper.make_node("Reshape", ["input_ids", "ids_target"], ["ids_again"]),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total"]),
        helper.make_node("Min", ["total", "hundred"], ["capped"]),
        helper.make_node("Slice", ["attention_mask", "zero", "capped", "one"], ["mask_cut"]),
    ]
    constants = [
        helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("hundred", TensorProto.INT64, [1], [100]),
    ]
    graph = helper.make_graph(
        nodes, "capped",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])],
        [helper.make_tensor_value_info("ids_again", TensorProto.INT64, None),
         helper.make_tensor_value_info("mask_cut", TensorProto.INT64, None)],
        constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_role_values_are_rebuilt_and_a_capped_total_is_left_alone() -> None:
    original = _capped_model()
    model = ir.from_proto(original)
    report = fold_shape_chains(model, max_seq=2048)
    folded = ir.to_proto(model)
    producers = {out: node for node in folded.graph.node for out in node.output}
    reshape = next(node for node in folded.graph.node if node.op_type == "Reshape")
    assert producers[reshape.input[1]].name.startswith(_PREFIX), "the Reshape's shape must be rebuilt"
    slice_node = next(node for node in folded.graph.node if node.op_type == "Slice")
    assert producers[slice_node.input[2]].op_type == "Min", "min(total, 100) is not `total` at 2048 tokens"
    assert report.folded_uses == 2  # the Reshape's shape, and the Min's `total` (read off the shared role)
    # Same numbers, including where the cap bites (total 150 > 100).
    for batch, new, total in ((1, 1, 1), (3, 7, 12), (2, 4, 150)):
        feeds = {"input_ids": np.arange(batch * new, dtype=np.int64).reshape(batch, new),
                 "attention_mask": np.arange(batch * total, dtype=np.int64).reshape(batch, total)}
        for ours, theirs in zip(_run(folded, feeds), _run(original, feeds), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_legacy_export_loses_its_per_layer_shape_chains_and_computes_the_same(tmp_path: Path) -> None:
    from llmir_onnx.api import partition_to_dir

    counts = {}
    for fold in (True, False):
        plan = tmp_path / f"fold-{fold}"
        partition_to_dir(LEGACY / "model.onnx", plan, tp=1, fold_shapes=fold)
        counts[fold] = Counter(node.op_type for node in onnx.load(plan / "rank0.onnx").graph.node)
    # Shape stays once per input that holds a role (batch, new, past, total): every layer's own Shape is gone.
    assert counts[True]["Shape"] <= 4 < counts[False]["Shape"]
    assert sum(counts[True].values()) < 0.7 * sum(counts[False].values())
    sessions = {fold: ort.InferenceSession(str(tmp_path / f"fold-{fold}" / "rank0.onnx"),
                                           providers=["CPUExecutionProvider"]) for fold in (True, False)}
    inputs = {arg.name: arg for arg in sessions[True].get_inputs()}
    rng = np.random.default_rng(0)
    for batch, new, past in ((1, 1, 0), (2, 5, 0), (3, 1, 9), (2, 4, 6)):
        feeds = {}
        for name, arg in inputs.items():
            if name == "input_ids":
                feeds[name] = rng.integers(0, 100, size=(batch, new))
            elif name == "attention_mask":
                feeds[name] = np.ones((batch, past + new), np.int64)
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(np.int64)
            else:
                feeds[name] = rng.standard_normal((batch, arg.shape[1], past, arg.shape[3])).astype(np.float32)
        results = {fold: session.run(None, feeds) for fold, session in sessions.items()}
        for ours, theirs in zip(results[True], results[False], strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_no_fold_shapes_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    from llmir_onnx.api import partition_to_dir

    manifest = partition_to_dir(LEGACY / "model.onnx", tmp_path / "plan", tp=2, fold_shapes=False)
    assert manifest.options.get("fold_shapes") is False


@pytest.mark.parametrize("tp", [2])
def test_tp_plan_folded_verifies_through_rank_processes_at_decode_and_prefill(tmp_path: Path, tp: int) -> None:
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds
    from llmir_onnx.runtime.verify import verify_plan_cases

    plan = tmp_path / "plan"
    partition_to_dir(LEGACY / "model.onnx", plan, tp=tp)
    assert sum(node.op_type == "Shape" for node in onnx.load(plan / "rank0.onnx").graph.node) <= 4
    # A decode step of batch 2 after 7 cached tokens, then a 6-token prompt: one job, the cases in turn.
    sizes = [FeedSizes(batch, new, past, seed=1) for batch, new, past in ((2, 1, 7), (1, 6, 0))]
    cases = [model_past_feeds(LEGACY / "model.onnx", size) for size in sizes]
    results = verify_plan_cases(plan, cases, model_path=LEGACY / "model.onnx", timeout_s=180)
    for size, (_, rows) in zip(sizes, results, strict=True):
        assert rows and all(row.ok for row in rows), (size, [row for row in rows if not row.ok])
