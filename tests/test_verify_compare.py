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
