"""The committed models in models/ are what the partitioner is tested on: check they are sound.

No torch here: each model folder carries `reference.npz` (inputs and the torch model's outputs,
written by models/export.py), so onnxruntime's results are checked against torch's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
MODEL_DIRS = sorted(p.parent for p in MODELS_DIR.glob("*/model.onnx") if p.parent.name != "smollm2")
MAX_IR_VERSION = 10  # onnxruntime-gpu 1.31 refuses newer


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _heads(config: dict) -> tuple[int, int, int]:
    heads = config.get("num_attention_heads") or config["n_head"]
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size") or config["n_embd"]
    return heads, kv_heads, config.get("head_dim") or hidden // heads


def test_models_are_committed() -> None:
    names = {p.name for p in MODEL_DIRS}
    for family in ("llama-gqa", "gpt2"):
        for exporter in ("torch-legacy", "torch-dynamo", "optimum"):
            assert f"{family}-{exporter}" in names
    assert "llama-gqa-genai" in names


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda p: p.name)
def test_layout_and_io(model_dir: Path) -> None:
    proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    assert proto.ir_version <= MAX_IR_VERSION
    external = {
        entry.value for tensor in proto.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
    assert external == {"model.onnx.data"}
    config = _config(model_dir)
    _, kv_heads, head_dim = _heads(config)
    inputs = {v.name: v for v in proto.graph.input}
    outputs = {v.name: v for v in proto.graph.output}
    assert {"input_ids", "attention_mask"} <= inputs.keys()
    assert "logits" in outputs
    layers = config.get("num_hidden_layers") or config["n_layer"]
    for layer in range(layers):
        for kind in ("key", "value"):
            past = inputs[f"past_key_values.{layer}.{kind}"].type.tensor_type.shape.dim
            assert [past[1].dim_value, past[3].dim_value] == [kv_heads, head_dim]
            assert f"present.{layer}.{kind}" in outputs


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda p: p.name)
def test_onnxruntime_matches_torch_reference(model_dir: Path) -> None:
    reference = np.load(model_dir / "reference.npz")
    feeds = {k.removeprefix("input."): reference[k] for k in reference.files if k.startswith("input.")}
    expected = {k.removeprefix("output."): reference[k] for k in reference.files if k.startswith("output.")}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, feeds), strict=True))
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4, err_msg=f"{model_dir.name}: {name}")
