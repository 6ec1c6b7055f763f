"""bfloat16 exports: partitioned like any other, their plans checked numerically in float32.

onnxruntime's CPU execution provider has no bfloat16 MatMul, Add or ReduceMax, so neither a bfloat16
export nor its plan can run on this machine kind (the CUDA EP runs both). What is checked here instead:
the plan of a bfloat16 model keeps bfloat16 weights, inputs and outputs (sharding is type-agnostic), and
that plan, rewritten in float32 (exact: every bfloat16 number is a float32 one), computes what the
original rewritten the same way computes, ranks as real processes with the ai.llmir library, at
float32's default tolerances. The bfloat16 export is the float16 one (torch legacy, LLaMA GQA) retyped.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import blake3
import ml_dtypes
import numpy as np
import onnx
import pytest
from synthetic_helpers import script_module

from llmir_onnx.plan.manifest import FileDigest, Manifest, TensorInfo
from llmir_onnx.runtime.feeds import export_check_feeds

MODELS = Path(__file__).resolve().parents[1] / "models"
FLOAT16_EXPORT = MODELS / "llama-gqa-torch-legacy-fp16"
FLOAT, FLOAT16, BFLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


def _retype_graph(graph: onnx.GraphProto, source: int, target: int) -> None:
    script_module(MODELS / "to_float64.py").retype_graph(graph, source, target)


def _retyped_copy(source: Path, destination: Path, from_type: int, to_type: int) -> Path:
    """`source` with every `from_type` value as `to_type`, its weights in DESTINATION.data."""
    model = onnx.load(source)
    _retype_graph(model.graph, from_type, to_type)
    destination.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, destination, save_as_external_data=True, location=destination.name + ".data")
    return destination


def _digest(path: Path) -> FileDigest:
    return FileDigest(path.stat().st_size, blake3.blake3(path.read_bytes()).hexdigest(), "blake3")


def _as_float32(infos: list[TensorInfo]) -> list[TensorInfo]:
    return [dataclasses.replace(info, dtype="float32") if info.dtype == "bfloat16" else info for info in infos]


def _float32_plan(plan: Path, manifest: Manifest, original: Path, out: Path) -> None:
    """The plan with every rank model retyped bfloat16 -> float32, and a manifest that says so."""
    files: dict[str, FileDigest] = {}
    ranks = []
    for entry in manifest.ranks:
        model_path = _retyped_copy(plan / entry.file, out / entry.file, BFLOAT16, FLOAT)
        data_path = model_path.with_name(model_path.name + ".data")
        files[model_path.name], files[data_path.name] = _digest(model_path), _digest(data_path)
        ranks.append(dataclasses.replace(entry, data_files=[data_path.name]))
    source = {"path": str(original), "sha256": hashlib.sha256(original.read_bytes()).hexdigest()}
    dataclasses.replace(
        manifest,
        files=files,
        ranks=ranks,
        source=source,
        inputs=_as_float32(manifest.inputs),
        outputs=_as_float32(manifest.outputs),
    ).write(out)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (4, 1), (2, 2)])
def test_bfloat16_export_partitions_and_its_plan_computes_the_original(tmp_path: Path, tp: int, pp: int) -> None:
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.verify import verify_plan

    export = _retyped_copy(FLOAT16_EXPORT / "model.onnx", tmp_path / "bf16" / "model.onnx", FLOAT16, BFLOAT16)
    manifest = partition_to_dir(export, tmp_path / "plan", tp=tp, pp=pp)

    assert {info.dtype for info in manifest.outputs} == {"bfloat16"}
    for entry in manifest.ranks:
        rank_model = onnx.load(tmp_path / "plan" / entry.file, load_external_data=False)
        # The export keeps its norms' and rotary's small constants in float32; its weights are bfloat16.
        weight_types = {t.data_type for t in rank_model.graph.initializer if np.prod(t.dims) > 64}
        assert weight_types == {BFLOAT16}, f"{entry.file}: weights of types {weight_types}"

    original32 = _retyped_copy(export, tmp_path / "f32" / "model.onnx", BFLOAT16, FLOAT)
    _float32_plan(tmp_path / "plan", manifest, original32, tmp_path / "plan-f32")
    feeds = {
        name: array.astype(ml_dtypes.bfloat16).astype(np.float32) if array.dtype == np.float16 else array
        for name, array in export_check_feeds(FLOAT16_EXPORT).items()
    }
    _, rows = verify_plan(tmp_path / "plan-f32", feeds, model_path=original32, timeout_s=180)
    bad = [f"{row.name}: {row.max_abs_error:.3g} > atol {row.atol:g}" for row in rows if not row.ok]
    assert rows and not bad, bad
    assert {row.atol for row in rows} == {1e-4}  # held to float32's tolerance
