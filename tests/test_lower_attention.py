"""GroupQueryAttention lowered into standard ops (lower_attention.py, what --cp runs on genai exports)
against onnxruntime's own kernel: one-node models covering packed and separate q/k/v, rotate-half and
interleaved rotary, a partial rotary, a scale, a right-padded first prompt, and the run-time refusal of a
padded batch after it; plus the refusal of an attribute the lowering does not take."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llmir_onnx.errors import PlanError
from llmir_onnx.lower_attention import lower_group_query_attention

MAX_POSITIONS = 32


def _gqa_model(heads: int, kv_heads: int, head_size: int, rotary_half: int, packed: bool,
               **attributes: float | int) -> onnx.ModelProto:
    """One GroupQueryAttention node with past inputs and cos/sin caches (random, fixed by a seed)."""
    rng = np.random.default_rng(1)
    angles = rng.uniform(0, 3, size=(MAX_POSITIONS, rotary_half)).astype(np.float32)
    width = (heads + 2 * kv_heads) * head_size if packed else heads * head_size
    inputs = [helper.make_tensor_value_info("query", TensorProto.FLOAT, ["batch", "new", width])]
    names = ["query", "", ""]
    if not packed:
        for name in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "new", kv_heads * head_size])
            )
        names = ["query", "key", "value"]
    for name in ("past_key", "past_value"):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "past", head_size]))
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    node = helper.make_node(
        "GroupQueryAttention", [*names, "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos", "sin"],
        ["output", "present_key", "present_value"], name="layers.0/GroupQueryAttention", domain="com.microsoft",
        num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, **attributes,
    )
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "new", heads * head_size])]
    outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, "total", head_size])
                for name in ("present_key", "present_value")]
    caches = [helper.make_tensor("cos", TensorProto.FLOAT, angles.shape, np.cos(angles).ravel()),
              helper.make_tensor("sin", TensorProto.FLOAT, angles.shape, np.sin(angles).ravel())]
    graph = helper.make_graph([node], "gqa", inputs, outputs, initializer=caches)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _lowered(model: onnx.ModelProto) -> onnx.ModelProto:
    ir_model = ir.serde.deserialize_model(model)
    assert lower_group_query_attention(ir_model) == 1
    assert not [n for n in ir_model.graph if n.op_type == "GroupQueryAttention"]
    return ir.serde.serialize_model(ir_model)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(model: onnx.ModelProto, batch: int, new: int, past: int, valid: list[int] | None = None,
           seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in ("query", "key", "value"):
            feeds[value.name] = rng.standard_normal((batch, new, dims[2].dim_value)).astype(np.float32)
        elif value.name.startswith("past"):
            feeds[value.name] = rng.standard_normal((batch, dims[1].dim_value, past, dims[3].dim_value)).astype(
                np.float32)
    total = past + new
    feeds["seqlens_k"] = np.array(valid if valid is not None else [total] * batch, dtype=np.int32) - 1
    feeds["total_sequence_length"] = np.array(total, dtype=np.int32)
    return feeds


# (heads, kv heads, head size, cos width, packed, attributes)
VARIANTS = [
    (4, 2, 16, 8, True, {}),
    (4, 1, 16, 8, False, {"rotary_interleaved": 1, "scale": 0.3}),
    (2, 1, 32, 8, True, {}),  # rotary on the first 16 of 32 dims
    (2, 2, 32, 8, False, {"rotary_interleaved": 1}),
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=[f"n{v[0]}-kv{v[1]}-h{v[2]}-packed{int(v[4])}-{v[5]}" for v in VARIANTS]
)
def test_lowered_gqa_equals_onnxruntime_kernel(variant: tuple) -> None:
    heads, kv_heads, head_size, rotary_half, packed, attributes = variant
    model = _gqa_model(heads, kv_heads, head_size, rotary_half, packed, **attributes)
    fused, lowered = _session(model), _session(_lowered(model))
    names = [o.name for o in model.graph.output]
    # (batch, new, past): first prompts, decode steps (batch 2 too), a later multi-token step (batch 1: the
    # kernel refuses batch > 1 there)
    for batch, new, past in ((1, 5, 0), (2, 4, 0), (1, 1, 6), (2, 1, 3), (1, 3, 4)):
        feeds = _feeds(model, batch, new, past, seed=new + past)
        for name, want, got in zip(names, fused.run(names, feeds), lowered.run(names, feeds), strict=True):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"{name}, {batch}x{new} after {past}")


def test_right_padded_first_prompt_and_refused_padded_step() -> None:
    """A right-padded first prompt (row 1 holds 2 of 5 tokens): outputs and presents equal the kernel's; after
    the prompt, a batch whose rows have different lengths is refused by the lowered graph at run time (the
    kernel would write each row's new token at its own length), naming the check."""
    model = _gqa_model(4, 2, 16, 8, True)
    fused, lowered = _session(model), _session(_lowered(model))
    names = [o.name for o in model.graph.output]
    feeds = _feeds(model, 2, 5, 0, valid=[5, 2])
    want, got = fused.run(names, feeds), lowered.run(names, feeds)
    for name, expected, actual in zip(names, want, got, strict=True):
        np.testing.assert_allclose(actual, expected, atol=2e-5, rtol=1e-4, err_msg=name)
    padded_step = _feeds(model, 2, 1, 5, valid=[6, 3])
    with pytest.raises(Exception, match="refuse_padded_rows_after_prompt"):
        lowered.run(names, padded_step)


def test_unsupported_attribute_is_refused_naming_node_and_value() -> None:
    model = ir.serde.deserialize_model(_gqa_model(4, 2, 16, 8, True, softcap=30.0))
    with pytest.raises(PlanError) as error:
        lower_group_query_attention(model)
    assert str(error.value) == (
        "--cp cannot lower node layers.0/GroupQueryAttention (GroupQueryAttention) into standard ops: attribute "
        "softcap=30.0 is not supported (only its default 0.0); use --cp 1"
    )


def _onnx_attention_model(mask_type: int, interleaved: int, **attributes: float | int) -> onnx.ModelProto:
    """RotaryEmbedding (position_ids given) on q and k, then ONNX Attention with a mask: opset 23."""
    rng = np.random.default_rng(2)
    angles = rng.uniform(0, 3, size=(MAX_POSITIONS, 8)).astype(np.float32)
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 4, "new", 16]) for name in "qkv"]
    inputs += [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "new"]),
               helper.make_tensor_value_info("mask", mask_type, ["batch", 1, "new", "new"])]
    nodes = [
        helper.make_node("RotaryEmbedding", [x, "cos", "sin", "position_ids"], [f"{x}_rotated"], name=f"rotary_{x}",
                         interleaved=interleaved)
        for x in "qk"
    ]
    nodes.append(helper.make_node("Attention", ["q_rotated", "k_rotated", "v", "mask"], ["y"], name="attention",
                                  **attributes))
    graph = helper.make_graph(
        nodes, "attention", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "new", 16])],
        initializer=[helper.make_tensor("cos", TensorProto.FLOAT, angles.shape, np.cos(angles).ravel()),
                     helper.make_tensor("sin", TensorProto.FLOAT, angles.shape, np.sin(angles).ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize(("mask_type", "interleaved"), [(TensorProto.BOOL, 0), (TensorProto.FLOAT, 1)])
def test_lowered_onnx_attention_and_rotary_equal_onnxruntime(mask_type: int, interleaved: int) -> None:
    from llmir_onnx.lower_attention import lower_onnx_attention

    model = _onnx_attention_model(mask_type, interleaved, scale=0.3)
    ir_model = ir.serde.deserialize_model(model)
    assert lower_onnx_attention(ir_model) == 3
    assert not [n for n in ir_model.graph if n.op_type in ("Attention", "RotaryEmbedding")]
    fused, lowered = _session(model), _session(ir.serde.serialize_model(ir_model))
    rng = np.random.default_rng(3)
    batch, new = 2, 5
    feeds = {x: rng.standard_normal((batch, 4, new, 16)).astype(np.float32) for x in "qkv"}
    feeds["position_ids"] = np.array([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]], dtype=np.int64)
    causal = np.tril(np.ones((new, new), dtype=bool))[None, None].repeat(batch, axis=0)
    feeds["mask"] = causal if mask_type == TensorProto.BOOL else np.where(causal, 0.0, -1e9).astype(np.float32)
    np.testing.assert_allclose(lowered.run(["y"], feeds)[0], fused.run(["y"], feeds)[0], atol=2e-5, rtol=1e-4)


def test_unsupported_onnx_attention_is_refused() -> None:
    from llmir_onnx.lower_attention import lower_onnx_attention

    model = ir.serde.deserialize_model(_onnx_attention_model(TensorProto.BOOL, 0, is_causal=1))
    with pytest.raises(PlanError) as error:
        lower_onnx_attention(model)
    assert str(error.value) == (
        "--cp cannot lower node attention (Attention) into standard ops: attribute is_causal=1 is not supported; "
        "use --cp 1"
    )
