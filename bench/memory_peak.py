"""Predicted activation peak (llmir_onnx.plan.memory) against onnxruntime's measured peak on this CPU.

    .venv/bin/python bench/memory_peak.py [--quick]

Method. Each case runs in a fresh child process (so nothing of one case stays resident in the next):

1. generate a synthetic LLaMA (models/make_synthetic.py, float32) once, in a temporary folder;
2. in the child: `MALLOC_MMAP_THRESHOLD_=65536` (every tensor over 64 KiB gets its own mmap and goes
   back to the OS when freed, so RSS follows the live tensors; glibc's default dynamic threshold keeps
   freed memory in the heap), an onnxruntime session with the CPU memory arena and the memory-pattern
   planner off (so tensors are malloc'ed and freed one by one), one thread, sequential execution;
3. one warm-up run (one-time allocations, prepacked weights), then reset the peak RSS with
   `/proc/self/clear_refs` (writing 5 resets VmHWM to the current RSS), read VmRSS, run once, read
   VmHWM: measured peak = VmHWM - VmRSS before the run.

Predicted: the liveness peak over the graph's node order at the same sizes, *including* the present.*
outputs (onnxruntime allocates them as fresh outputs every run; the memory plan counts them as KV cache,
so here they are added back to compare like with like). Both graph optimization levels are measured:
`disabled` runs the graph as written (what the prediction models), `all` lets onnxruntime fuse and
reuse buffers in place (which the prediction does not model).

Limits: RSS counts pages, so the measurement includes allocator and page rounding and any scratch memory
of kernels (MLAS packing buffers, thread-local storage); small tensors (< 64 KiB) may come from
heap pages that were already resident and then cost nothing measurable. The figure is the whole
process's extra resident memory while one run executes, at page granularity.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/test_synthetic.py imports its helpers as pytest does

CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)

path, batch, seq, layers, kv_heads, head_dim, vocab, level = sys.argv[1:9]
batch, seq, layers, kv_heads, head_dim, vocab = map(int, (batch, seq, layers, kv_heads, head_dim, vocab))
options = ort.SessionOptions()
options.enable_cpu_mem_arena = False
options.enable_mem_pattern = False
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.graph_optimization_level = (
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == "disabled" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
)
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feeds = {
    "input_ids": rng.integers(0, vocab, size=(batch, seq), dtype=np.int64),
    "attention_mask": np.ones((batch, seq), dtype=np.int64),
    "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
}
for layer in range(layers):
    for kind in ("key", "value"):
        feeds[f"past_key_values.{layer}.{kind}"] = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
outputs = session.run(None, feeds)
del outputs
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
outputs = session.run(None, feeds)
peak = status("VmHWM:")
print(json.dumps({"measured": peak - before, "finite": bool(np.isfinite(outputs[0]).all())}))
"""


def measure(path: Path, config, batch: int, seq: int, level: str) -> dict[str, object]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", CHILD, str(path), str(batch), str(seq), str(config.layers), str(config.kv_heads),
            str(config.head_dim), str(config.vocab), level]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    from dataclasses import replace

    from llmir_onnx.ir_io import load_model
    from llmir_onnx.plan.memory import activation_peak, format_bytes
    from llmir_onnx.plan.shapes import Sizes
    from tests.test_synthetic import synthetic

    base = synthetic.PRESETS["tiny"]
    models = {
        "h512-L4": replace(base, hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1408, vocab=8000,
                           max_position=2048),
        "h1024-L2": replace(base, hidden=1024, layers=2, heads=16, kv_heads=16, intermediate=2816, vocab=16000,
                            max_position=2048),
    }  # fmt: skip
    cases = [("h512-L4", 1, 256), ("h512-L4", 4, 512), ("h1024-L2", 2, 1024), ("h1024-L2", 1, 2048)]
    if args.quick:
        cases = cases[:2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: synthetic.generate(config, Path(tmp) / name) for name, config in models.items()}
        for name, batch, seq in cases:
            config = models[name]
            model = load_model(paths[name])
            sizes = Sizes(batch=batch, seq=seq)
            predicted = activation_peak(model, sizes, include_kv_outputs=True).bytes
            without_kv = activation_peak(model, sizes).bytes
            for level in ("disabled", "all"):
                start = time.perf_counter()
                result = measure(paths[name], config, batch, seq, level)
                measured = int(result["measured"])  # type: ignore[arg-type]
                rows.append((name, batch, seq, level, without_kv, predicted, measured, predicted / measured - 1,
                             time.perf_counter() - start))  # fmt: skip
    print(
        "| model | batch | seq | ORT graph opt | predicted activations | predicted + present outputs "
        "| measured peak (RSS) | error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, seq, level, without_kv, predicted, measured, error, _ in rows:
        print(f"| {name} | {batch} | {seq} | {level} | {format_bytes(without_kv)} | {format_bytes(predicted)} | "
              f"{format_bytes(measured)} | {error:+.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
