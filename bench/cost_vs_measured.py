"""Predicted (llmir_onnx.plan.cost) against measured onnxruntime time on this CPU, prefill and decode.

    .venv/bin/python bench/cost_vs_measured.py [--quick] [--level all|disabled] [--device PROFILE ...]
        [--calibrated FIELDS.json]

For a few synthetic LLaMA sizes (float32, models/make_synthetic.py) and both phases:

- prefill: batch x seq new tokens, no past;
- decode: batch x 1 new token after a past of `past` tokens (random past KV).

Measured: best and median of 5 rounds x 3 runs (after 2 warm-up runs; the rounds interleave the
cases over time) of an onnxruntime CPU session with one intra-op thread, sequential execution and
the given graph optimization level (default: all, what users run). The error is against the best
run, the one least disturbed by other processes on this shared machine (the calibration is best-of
too). Also shown: the best thread CPU time of a run (onnxruntime with one intra-op thread runs its
kernels on the calling thread), which leaves out time the thread waited for a core but not the
memory-bandwidth and cache contention of the other jobs.

Predicted: `estimate_time` over the graph's nodes, the sum of max(FLOPs / peak, bytes / bandwidth)
plus a per-node overhead, with the built-in `cpu-here` profile (calibrated on onnxruntime's kernels)
and `bench/profiles/cpu-here-numpy.json` (calibrated with numpy), both from bench/calibrate_cpu.py.
The prediction is made on the graph as written; onnxruntime's fusions (level all) are not modelled.
`--calibrated FIELDS.json` adds a profile `cpu-here-now`: cpu-here with the fields of a
`bench/calibrate_cpu.py --json FIELDS.json` run (taken just before, on the machine as it is now).

Every profile with a last-level cache (`cache_bytes`) is also predicted without it (`... no cache`: the
same profile with every byte at the memory bandwidth, the cost model before the cache existed), on the
same measured runs: the before / after of the cache-aware charge in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/test_synthetic.py imports its helpers as pytest does

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from llmir_onnx.ir_io import load_model  # noqa: E402
from llmir_onnx.plan.cost import estimate_time, node_costs  # noqa: E402
from llmir_onnx.plan.devices import load_profile, profile_from_dict  # noqa: E402
from llmir_onnx.plan.shapes import Sizes  # noqa: E402
from tests.test_synthetic import make_feeds, synthetic  # noqa: E402


class Timer:
    """One onnxruntime session and its feeds; `sample` adds timed runs, the times accumulate."""

    def __init__(self, path: Path, config, sizes: Sizes, level: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == "all" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.feeds = make_feeds(config, sizes.batch, sizes.past, sizes.seq)
        self.feeds["attention_mask"] = np.ones_like(self.feeds["attention_mask"])
        for _ in range(2):
            self.session.run(None, self.feeds)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def sample(self, runs: int) -> None:
        for _ in range(runs):
            start, start_cpu = time.perf_counter(), time.thread_time()
            self.session.run(None, self.feeds)
            self.cpu_times.append(time.thread_time() - start_cpu)
            self.times.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--level", choices=("all", "disabled"), default="all")
    parser.add_argument(
        "--device",
        action="append",
        help="profiles to predict with (default: cpu-here and bench/profiles/cpu-here-numpy.json)",
    )
    parser.add_argument(
        "--calibrated",
        type=Path,
        default=None,
        help="a bench/calibrate_cpu.py --json output: also predict with cpu-here on those fields (cpu-here-now)",
    )
    args = parser.parse_args()
    default_profiles = ["cpu-here", str(REPO / "bench/profiles/cpu-here-numpy.json")]
    profiles = [load_profile(d) for d in (args.device or default_profiles)]
    if args.calibrated is not None:
        fields = {**asdict(load_profile("cpu-here")), **json.loads(args.calibrated.read_text())}
        fields["name"] = "cpu-here-now"
        fields["description"] = f"cpu-here with the fields of {args.calibrated}"
        profiles.append(profile_from_dict(fields, str(args.calibrated)))
    devices = []
    for profile in profiles:
        devices.append(profile)
        if profile.cache_bytes:  # the same profile before the cache existed
            devices.append(replace(profile, name=f"{profile.name} no cache", cache_bytes=0, cache_bandwidth=0.0))
    base = synthetic.PRESETS["tiny"]
    models = {
        "h512-L4": replace(base, hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1408, vocab=8000,
                           max_position=2048),
        "h1024-L4": replace(base, hidden=1024, layers=4, heads=16, kv_heads=16, intermediate=2816, vocab=16000,
                            max_position=2048),
        "h2048-L2": replace(base, hidden=2048, layers=2, heads=16, kv_heads=8, intermediate=5504, vocab=32000,
                            max_position=2048),
    }  # fmt: skip
    cases = [
        ("h512-L4", "prefill", Sizes(batch=1, seq=256)),
        ("h512-L4", "decode", Sizes(batch=1, seq=1, past=511)),
        ("h1024-L4", "prefill", Sizes(batch=1, seq=512)),
        ("h1024-L4", "decode", Sizes(batch=4, seq=1, past=1023)),
        ("h2048-L2", "prefill", Sizes(batch=2, seq=256)),
        ("h2048-L2", "decode", Sizes(batch=1, seq=1, past=1023)),
    ]
    runs, rounds = (2, 2) if args.quick else (3, 5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: synthetic.generate(config, Path(tmp) / name) for name, config in models.items()}
        timers = [Timer(paths[name], models[name], sizes, args.level) for name, _, sizes in cases]
        # Rounds interleave the cases over time, so a burst of load from other processes on this shared
        # machine does not hit all runs of one case.
        for _ in range(rounds):
            for timer in timers:
                timer.sample(runs)
        for (name, phase, sizes), timer in zip(cases, timers, strict=True):
            costs = node_costs(load_model(paths[name]), sizes)
            estimates = [estimate_time(costs, device, phase, sizes) for device in devices]
            rows.append(
                (name, phase, sizes, estimates, min(timer.times), statistics.median(timer.times), min(timer.cpu_times))
            )
    names = " | ".join(f"predicted {d.name} (compute / memory / overhead) | error vs best" for d in devices)
    print(
        f"| model | phase | batch x new (past) | GFLOP | MB moved | measured best (median) | thread CPU best "
        f"| {names} |"
    )
    print("|---|---|---|---|---|---|---|" + "---|---|" * len(devices))
    for name, phase, sizes, estimates, best, median, cpu in rows:
        cells = " | ".join(
            f"{e.total_s * 1e3:.1f} ms ({e.compute_s * 1e3:.1f} / {e.memory_s * 1e3:.1f} / {e.overhead_s * 1e3:.2f}) | "
            f"{e.total_s / best - 1:+.0%}"
            for e in estimates
        )
        e = estimates[0]
        print(
            f"| {name} | {phase} | {sizes.batch} x {sizes.seq} ({sizes.past}) | {e.flops / 1e9:.2f} | "
            f"{e.bytes / 1e6:.0f} | {best * 1e3:.1f} ms ({median * 1e3:.1f}) | {cpu * 1e3:.1f} ms | {cells} |"
        )
    print()
    for index, device in enumerate(devices):
        within = [f"{name} {phase}" for name, phase, _, estimates, best, _, _ in rows
                  if abs(estimates[index].total_s / best - 1) <= 0.2]  # fmt: skip
        print(f"{device.name}: {len(within)} of {len(rows)} within 20% of the best run ({', '.join(within) or 'none'})")


if __name__ == "__main__":
    main()
