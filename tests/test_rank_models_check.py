"""Every rank model of every bundled export passes onnx.checker and stays loadable by onnxruntime-gpu.

Full checking (shape inference included) is used wherever the ORIGINAL model passes it; some exports
(the onnxruntime-genai builder's) carry declared shapes that onnx's own inference contradicts, and
there the structural check is what can be asked of their rank models too.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from llmir_onnx import ops
from llmir_onnx.ir_io import MAX_IR_VERSION, load_model, save_model
from llmir_onnx.partition import PartitionOptions, partition

MODELS = Path(__file__).resolve().parents[1] / "models"
BUNDLED = sorted(path.parent.name for path in MODELS.glob("*/model.onnx") if path.parent.name != "smollm2")


def _passes_full_check(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


@pytest.mark.parametrize("name", BUNDLED)
def test_rank_models_pass_the_checker(name: str, tmp_path: Path) -> None:
    ops.register_schemas()
    source_path = MODELS / name / "model.onnx"
    onnx.checker.check_model(str(source_path))  # the export itself is structurally valid
    full = _passes_full_check(source_path)
    source = load_model(source_path)
    heads = 4 if name.startswith("gpt2") else 8
    pp = 2 if name.endswith("torch-legacy") else 1
    result = partition(source, PartitionOptions(tp=2 if heads % 2 == 0 else 1, pp=pp))
    for program in result.ranks:
        path = save_model(program.model, tmp_path / f"rank{program.rank}.onnx")
        proto = onnx.load(str(path), load_external_data=False)
        assert proto.ir_version <= MAX_IR_VERSION
        assert any(o.domain == ops.LLMIR_DOMAIN and o.version == ops.LLMIR_OPSET_VERSION for o in proto.opset_import)
        onnx.checker.check_model(str(path), full_check=full)
