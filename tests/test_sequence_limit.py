"""The default --max-seq comes from the model: the longest sequence it takes when that is under 2048."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.plan.shapes import DEFAULT_MAX_SEQ, choose_max_seq, sequence_limit

MODELS = Path(__file__).resolve().parents[1] / "models"
WINDOW = 48


def window_model(path: Path, window: int = WINDOW) -> Path:
    """A mask bias sliced from a fixed table of `window` entries (as a sliding-window or fixed-causal-mask
    export does): it adds to the mask's [batch, past + new] only while past + new <= window."""
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Slice", ["mask_shape", "one", "two"], ["total"]),
        helper.make_node("Slice", ["window_table", "zero", "total"], ["window_bias"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["mask_float", "window_bias"], ["biased_mask"]),
        helper.make_node("ReduceSum", ["biased_mask"], ["summed"], keepdims=1),
        helper.make_node("Unsqueeze", ["summed", "axes23"], ["summed_4d"]),
        helper.make_node("Mul", ["past_key_values.0.key", "summed_4d"], ["scaled_past"]),
        helper.make_node("Cast", ["input_ids"], ["ids_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_float", "axes13"], ["new_key_1"]),
        helper.make_node("Expand", ["new_key_1", "new_key_shape"], ["new_key"]),
        helper.make_node("Concat", ["scaled_past", "new_key"], ["present.0.key"], axis=2),
    ]
    initializers = [
        numpy_helper.from_array(np.zeros(window, dtype=np.float32), "window_table"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "two"),
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes23"),
        numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "axes13"),
        numpy_helper.from_array(np.array([1, 2, 1, 4], dtype=np.int64), "new_key_shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "window",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info(
                "past_key_values.0.key", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 4]
            ),
        ],
        [
            helper.make_tensor_value_info(
                "present.0.key", TensorProto.FLOAT, ["batch_size", 2, "total_sequence_length", 4]
            )
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_window_limits_the_default_and_an_explicit_length_beyond_it_is_refused(tmp_path: Path) -> None:
    model = load_model(window_model(tmp_path / "model.onnx"))
    limit = sequence_limit(model)
    assert limit.tokens == WINDOW
    assert "fails at 49 tokens" in limit.reason and "Add" in limit.reason
    assert choose_max_seq(model, 1, None) == (WINDOW, limit)
    assert choose_max_seq(model, 1, 32)[0] == 32
    with pytest.raises(PlanError, match=rf"--max-seq 100 is more than the model takes: at most {WINDOW} tokens"):
        choose_max_seq(model, 1, 100)


def test_a_model_without_limit_keeps_the_default() -> None:
    model = load_model(MODELS / "llama-gqa-torch-legacy" / "model.onnx")
    assert sequence_limit(model).tokens is None
    assert choose_max_seq(model, 1, None)[0] == DEFAULT_MAX_SEQ


def test_the_manifest_records_the_limit_and_the_cli_says_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    source = MODELS / "gpt2-torch-legacy" / "model.onnx"
    result = CliRunner().invoke(app, ["partition", str(source), "-o", str(tmp_path / "plan"), "--tp", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "max-seq 128: the longest sequence the model takes (its position table has 128 rows)" in result.output
    options = json.loads((tmp_path / "plan" / "manifest.json").read_text())["options"]
    assert options["max_seq"] == 128
    assert options["max_seq_limit"] == {"tokens": 128, "reason": "its position table has 128 rows"}
    beyond = CliRunner().invoke(
        app, ["partition", str(source), "-o", str(tmp_path / "other"), "--tp", "2", "--max-seq", "129"]
    )
    assert beyond.exit_code != 0
    assert "--max-seq 129 is more than the model takes: at most 128 tokens" in beyond.output
    assert not (tmp_path / "other").exists()


def test_a_sliding_window_cache_is_sized_at_its_window() -> None:
    """mistral-window keeps the last 15 tokens in its presents: the model takes 2048 tokens, its cache holds 15."""
    from llmir_onnx.plan.memory import kv_cache_bytes, plan_memory

    model = load_model(MODELS / "mistral-window-torch-legacy" / "model.onnx")
    assert choose_max_seq(model, 1, None)[0] == DEFAULT_MAX_SEQ
    plan = plan_memory(model, max_batch=2, max_seq=DEFAULT_MAX_SEQ)
    assert plan.kv_cache_tokens == 15
    assert plan.kv_cache_bytes == kv_cache_bytes(model, 2, 15) == 2 * 2 * 2 * 4 * 15 * 16 * 4  # k+v, layers, batch
    assert plan_memory(model, max_batch=1, max_seq=8).kv_cache_tokens == 8
