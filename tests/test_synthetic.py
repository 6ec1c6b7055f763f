"""The synthetic LLaMA generator: onnxruntime's outputs equal a plain numpy LLaMA on the same weights."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from synthetic_helpers import synthetic_module

REPO = Path(__file__).resolve().parents[1]


synthetic = synthetic_module()


def weights(model_path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(model_path), load_external_data=True)
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x32 = x.astype(np.float32)
    return weight * (x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def numpy_llama(config, w: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LLaMA decoding step written from the math, not from the graph (float32)."""
    ids, mask, positions = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
    batch, seq = ids.shape
    past = feeds["past_key_values.0.key"].shape[2]
    total = past + seq
    hd, n_rep = config.head_dim, config.heads // config.kv_heads
    # position cos/sin straight from the formula, not the graph's caches
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2) / hd))
    angles = positions[..., None] * inv_freq
    cos = np.cos(np.concatenate([angles, angles], -1))[:, None].astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1))[:, None].astype(np.float32)
    allowed = (np.arange(total)[None, :] <= np.arange(past, total)[:, None])[None, None] & (mask[:, None, None, :] > 0)
    bias = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)

    hidden = w["model.embed_tokens.weight"][ids]
    out: dict[str, np.ndarray] = {}
    for layer in range(config.layers):
        p = f"model.layers.{layer}"
        x = rms_norm(hidden, w[f"{p}.input_layernorm.weight"], config.rms_norm_eps)
        q = (x @ w[f"{p}.self_attn.q_proj.weight"]).reshape(batch, seq, config.heads, hd).transpose(0, 2, 1, 3)
        k = (x @ w[f"{p}.self_attn.k_proj.weight"]).reshape(batch, seq, config.kv_heads, hd).transpose(0, 2, 1, 3)
        v = (x @ w[f"{p}.self_attn.v_proj.weight"]).reshape(batch, seq, config.kv_heads, hd).transpose(0, 2, 1, 3)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.concatenate([feeds[f"past_key_values.{layer}.key"], k], axis=2)
        v = np.concatenate([feeds[f"past_key_values.{layer}.value"], v], axis=2)
        out[f"present.{layer}.key"], out[f"present.{layer}.value"] = k, v
        k_rep, v_rep = np.repeat(k, n_rep, axis=1), np.repeat(v, n_rep, axis=1)
        scores = q @ k_rep.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
        context = (softmax(scores) @ v_rep).transpose(0, 2, 1, 3).reshape(batch, seq, config.heads * hd)
        hidden = hidden + context @ w[f"{p}.self_attn.o_proj.weight"]
        x = rms_norm(hidden, w[f"{p}.post_attention_layernorm.weight"], config.rms_norm_eps)
        gate = x @ w[f"{p}.mlp.gate_proj.weight"]
        gate = gate / (1.0 + np.exp(-gate))
        hidden = hidden + (gate * (x @ w[f"{p}.mlp.up_proj.weight"])) @ w[f"{p}.mlp.down_proj.weight"]
    hidden = rms_norm(hidden, w["model.norm.weight"], config.rms_norm_eps)
    out["logits"] = hidden @ w["lm_head.weight"]
    return out


def make_feeds(config, batch: int, past: int, seq: int, dtype=np.float32, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + seq), dtype=np.int64)
    if past >= 2:
        mask[0, :2] = 0  # left padding inside the past of the first sequence
    feeds = {
        "input_ids": rng.integers(0, config.vocab, size=(batch, seq), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    for layer in range(config.layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (batch, config.kv_heads, past, config.head_dim)
            ).astype(dtype)
    return feeds


def run_ort(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path]]:
    config = synthetic.PRESETS["tiny"]
    path = synthetic.generate(config, tmp_path_factory.mktemp("tiny"))
    yield config, path


@pytest.mark.parametrize(("batch", "past", "seq"), [(1, 0, 5), (2, 4, 3), (2, 6, 1)])
def test_tiny_matches_numpy_llama(tiny: tuple[object, Path], batch: int, past: int, seq: int) -> None:
    config, path = tiny
    feeds = make_feeds(config, batch, past, seq)
    got = run_ort(path, feeds)
    want = numpy_llama(config, weights(path), feeds)
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        np.testing.assert_allclose(got[name], expected, atol=1e-4, rtol=1e-4, err_msg=name)
    # the logits are not degenerate: a wrong mask or rotary would move them by far more than atol
    assert got["logits"].std() > 0.1


def test_mha_without_repeat_kv_and_float16_run_finite(tmp_path: Path) -> None:
    config = replace(synthetic.PRESETS["tiny"], heads=4, kv_heads=4, dtype="float16", layers=3)
    path = synthetic.generate(config, tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    assert not any(node.op_type == "Expand" for node in model.graph.node)  # repeat_kv only for GQA
    feeds = make_feeds(config, 2, 3, 2, dtype=np.float16)
    got = run_ort(path, feeds)
    assert got["logits"].dtype == np.float16
    assert np.isfinite(got["logits"]).all()
    want = numpy_llama(
        config,
        {k: v.astype(np.float32) for k, v in weights(path).items()},
        {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in feeds.items()},
    )
    np.testing.assert_allclose(got["logits"].astype(np.float32), want["logits"], atol=0.05, rtol=0.05)


def test_export_like_structure(tiny: tuple[object, Path]) -> None:
    config, path = tiny
    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version == 10 and model.opset_import[0].version == 17
    onnx.checker.check_model(str(path), full_check=True)
    names = {node.name for node in model.graph.node}
    for layer in range(config.layers):
        for proj in (
            "self_attn/q_proj",
            "self_attn/k_proj",
            "self_attn/v_proj",
            "self_attn/o_proj",
            "mlp/gate_proj",
            "mlp/up_proj",
            "mlp/down_proj",
        ):
            assert f"/model/layers.{layer}/{proj}/MatMul" in names
    # head counts never appear as literals in Reshape targets: only -1 and head_dim
    consts = {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t)
        for node in model.graph.node
        if node.op_type == "Constant"
    }
    for node in model.graph.node:
        if node.op_type == "Concat" and node.output[0].endswith("_output_0") and "self_attn/Concat" in node.name:
            literals = [int(v) for name in node.input if name in consts for v in consts[name].ravel()]
            assert config.heads not in literals and config.kv_heads not in literals, node.name
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["past_key_values.0.key"] == ["batch_size", config.kv_heads, "past_sequence_length", config.head_dim]
    assert json.loads((path.parent / "config.json").read_text())["num_key_value_heads"] == config.kv_heads


def test_no_weights_writes_a_sparse_file_of_the_right_size(tmp_path: Path) -> None:
    config = replace(synthetic.PRESETS["tiny"], hidden=256, intermediate=512, vocab=4096, layers=4, heads=4, kv_heads=4)
    path = synthetic.generate(config, tmp_path, sparse=True)
    data = path.with_name("model.onnx.data")
    model = onnx.load(str(path), load_external_data=False)
    end = max(
        int(dict((e.key, e.value) for e in init.external_data)["offset"])
        + int(dict((e.key, e.value) for e in init.external_data)["length"])
        for init in model.graph.initializer
    )
    assert data.stat().st_size == end
    assert data.stat().st_blocks * 512 < data.stat().st_size // 4  # holes, not written zeros


def test_cli_rejects_inconsistent_heads(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path), "--preset", "tiny", "--kv-heads", "3"])
