"""verify's comparison: tolerances per output type unless given, and the table that reports them."""

from __future__ import annotations

import numpy as np

from llmir_onnx.runtime.verify import compare, format_comparisons


def _ulps_away(values: np.ndarray, ulps: int) -> np.ndarray:
    out = values.copy()
    for _ in range(ulps):
        out = np.nextafter(out, np.array(np.inf, dtype=values.dtype))
    return out


def test_float16_outputs_allow_a_few_ulps_by_default_float32_holds_1e_4() -> None:
    half = np.linspace(-4, 4, 64, dtype=np.float16)
    single = np.linspace(-4, 4, 64, dtype=np.float32)
    rows = compare(
        {"h2": half, "h12": half, "s": single, "s_off": single},
        {"h2": _ulps_away(half, 2), "h12": _ulps_away(half, 12), "s": single + 5e-5, "s_off": single + 1e-3},
        atol=None,
        rtol=None,
    )
    verdict = {row.name: row.ok for row in rows}
    assert verdict == {"h2": True, "h12": False, "s": True, "s_off": False}
    assert {row.name: (row.atol, row.rtol) for row in rows}["s"] == (1e-4, 1e-4)
    table = format_comparisons(rows)
    # float16's atol is 2e-3 scaled by the output's largest magnitude (4 here)
    assert "ok (atol, rtol)" in table and "NO (0.008, 0.004)" in table


def test_float16_small_values_may_be_off_by_an_ulp_of_the_largest() -> None:
    """A hidden state rounded to float16 at a stage boundary carries an error of the largest values' ulp
    into small outputs: allowed for 16-bit outputs, never for float32 ones."""
    half = np.array([4.0, 0.02, -3.5], dtype=np.float16)
    ulp_of_largest = np.float16(np.spacing(np.float16(4.0)))
    shifted = half.copy()
    shifted[1] += ulp_of_largest
    single = half.astype(np.float32)
    rows = compare({"h": half, "s": single}, {"h": shifted, "s": shifted.astype(np.float32)}, atol=None, rtol=None)
    assert {row.name: row.ok for row in rows} == {"h": True, "s": False}
    far = half.copy()
    far[1] += 4 * ulp_of_largest
    assert not compare({"h": half}, {"h": far}, atol=None, rtol=None)[0].ok


def test_explicit_tolerances_apply_to_every_output() -> None:
    half = np.linspace(-4, 4, 64, dtype=np.float16)
    rows = compare({"h": half}, {"h": _ulps_away(half, 2)}, atol=1e-4, rtol=1e-4)
    assert not rows[0].ok and (rows[0].atol, rows[0].rtol) == (1e-4, 1e-4)
    table = format_comparisons(rows)
    assert "ok (atol=0.0001, rtol=0.0001)" in table and table.rstrip().endswith("NO")


def test_an_original_that_does_not_run_is_named_not_an_internal_error(tmp_path) -> None:
    """verify's default past is made by the original model; where onnxruntime cannot run the export at all
    (here a Reshape of the tokens into rows of 4 fails on 3 tokens), the user is told the model fails on its
    own, in one line, with onnxruntime's reason."""
    import onnx
    import pytest
    from onnx import TensorProto, helper, numpy_helper

    from llmir_onnx.errors import InputModelError
    from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds

    past = ["batch_size", 1, "past_sequence_length", 4]
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["ids", "rows_of_4"], ["new_keys"], name="/rows/Reshape"),
            helper.make_node("Concat", ["past_key_values.0.key", "new_keys"], ["present.0.key"], axis=2),
            helper.make_node("Concat", ["past_key_values.0.value", "new_keys"], ["present.0.value"], axis=2),
            helper.make_node("Unsqueeze", ["ids", "last"], ["logits"]),
        ],
        "does_not_run",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, past),
            helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, past),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", 1]),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [*past[:2], "total", 4]),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, [*past[:2], "total", 4]),
        ],
        [
            numpy_helper.from_array(np.array([0, 1, -1, 4], np.int64), "rows_of_4"),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    refusal = r"^the original model \S+model\.onnx fails in onnxruntime on its own \(.*/rows/Reshape.*\) while making"
    with pytest.raises(InputModelError, match=refusal):
        model_past_feeds(tmp_path / "model.onnx", FeedSizes(batch=1, new_tokens=4, past_tokens=3))
