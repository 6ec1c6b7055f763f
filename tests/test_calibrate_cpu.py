"""bench/calibrate_cpu.py's micro-benchmarks for node_overhead and weight_bandwidth compute what they claim."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx_ir as ir
import pytest

from llmir_onnx.plan.cost import FREE_OPS, node_costs
from llmir_onnx.plan.shapes import Sizes

CALIBRATE_CPU = Path(__file__).resolve().parents[1] / "bench" / "calibrate_cpu.py"


@pytest.fixture(scope="module")
def calibrate_cpu() -> ModuleType:
    """The script as a module; the thread variables it sets on import (OMP_NUM_THREADS, ...) are put back so
    that the processes later tests start do not inherit them."""
    spec = importlib.util.spec_from_file_location("calibrate_cpu", CALIBRATE_CPU)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    environment = dict(os.environ)
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return module


def test_the_weight_chain_multiplies_by_as_many_distinct_weights_as_asked(calibrate_cpu: ModuleType) -> None:
    """64 KiB weights (128 x 128 float32), 256 KiB of them: a chain of 4 MatMuls whose weights, written to an
    external data file one by one, are the ones the generator made: the output is numpy's product chain."""
    run, count = calibrate_cpu.weight_chain_benchmark(64 << 10, 256 << 10)
    assert count == 4
    rng = np.random.default_rng(0)
    expected = np.ones((1, 128), np.float32)
    for _ in range(count):
        expected = expected @ (rng.standard_normal((128, 128), np.float32) / np.float32(128**0.5))
    (output,) = run()
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5)
    # at least one weight, however large
    assert calibrate_cpu.weight_chain_benchmark(1 << 20, 1 << 10)[1] == 1


def test_the_dispatch_decoder_counts_the_nodes_the_cost_model_charges(
    calibrate_cpu: ModuleType, tmp_path: Path
) -> None:
    """node_overhead's benchmark: a decode step of the tiny decoder runs (logits for one token) and its count is
    the cost model's count of nodes with an overhead on that model (FREE_OPS excluded)."""
    run, counted, moved = calibrate_cpu.decoder_dispatch_benchmark(tmp_path)
    costs = node_costs(ir.load(str(tmp_path / "model.onnx")), Sizes(batch=1, seq=1, past=calibrate_cpu.DISPATCH_PAST))
    assert counted == sum(1 for cost in costs if cost.op_type not in FREE_OPS) > 100
    assert moved == sum(cost.bytes for cost in costs)
    logits = run()[0]
    assert logits.shape == (1, 1, calibrate_cpu.DISPATCH_DECODER["vocab"]) and np.isfinite(logits).all()
    # the overhead is the step less its roofline, per counted node
    assert calibrate_cpu.decoder_node_overhead(1e-3, 200, 1e6, 1e10) == pytest.approx((1e-3 - 1e-4) / 200)
    assert calibrate_cpu.weight_rate_of(2e-6, 4096, 1e-6) == pytest.approx(4096 / 1e-6)


def test_run_overhead_is_a_cold_run_less_the_warm_run_right_after_it(calibrate_cpu: ModuleType) -> None:
    """run_overhead's benchmark: each cold run comes right after the flush, each warm run right after a cold
    one; the figure is the difference (a run whose cold start costs 3 ms more gives 3 ms: a benchmark that timed
    the flush, or two warm runs, does not)."""
    order: list[str] = []
    ticks = iter(range(10**6))
    clock = calibrate_cpu.clock
    calibrate_cpu.clock = lambda: float(next(ticks)) * 1e-3  # each call 1 ms later than the one before
    try:

        def run() -> None:
            order.append("run")
            if order[-2:-1] == ["flush"]:  # a cold run: 3 ms more on this clock
                for _ in range(3):
                    calibrate_cpu.clock()

        cold, warm = calibrate_cpu.cold_and_warm_seconds(run, lambda: order.append("flush"), 4)
    finally:
        calibrate_cpu.clock = clock
    assert order == ["run"] + ["flush", "run", "run"] * 4
    assert (cold, warm) == (pytest.approx(4e-3), pytest.approx(1e-3))
    assert calibrate_cpu.run_overhead_of(cold, warm) == pytest.approx(3e-3)
    assert calibrate_cpu.run_overhead_of(1e-3, 2e-3) == 0.0  # never negative
    # the flush streams 2 x the size asked through the caches: reads one array of that size, writes another
    flush = calibrate_cpu.cache_flush(1 << 20)
    assert flush().nbytes == 1 << 20
