"""AllReduce inside an onnxruntime session (run() and io_binding) against bare mpi4py Allreduce.

Run: .venv/bin/mpiexec -n 4 .venv/bin/python custom_ops/bench/ort_vs_mpi4py.py [path/to/libllmir_ops.so]
Median over iterations of the slowest rank's time. The library author's quick check; the product's
benchmark lives in bench/ (docs/BENCHMARKS.md). Needs a quiet machine to mean anything.
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ctypes.CDLL(str(Path(sys.prefix) / "lib" / "libmpi.so.12"), mode=ctypes.RTLD_GLOBAL)
import onnxruntime as ort  # noqa: E402
from mpi4py import MPI  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "custom_ops" / "cmake" / "libllmir_ops.so"
comm = MPI.COMM_WORLD


def median_seconds(run: Callable[[], object], iterations: int) -> float:
    times = []
    for _ in range(iterations):
        comm.Barrier()
        start = time.perf_counter()
        run()
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return sorted(times)[len(times) // 2]


def main() -> None:
    graph = helper.make_graph(
        [helper.make_node("AllReduce", ["x"], ["y"], domain="ai.llmir")],
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.llmir", 1)], ir_version=10
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options)
    if comm.rank == 0:
        print(f"ranks={comm.size}  median ms: mpi4py Allreduce | ORT run() | ORT io_binding | ratios")
    for kib in (4, 64, 1024, 4096, 16384, 65536):
        x = np.ones(kib * 256, np.float32)
        out = np.empty_like(x)
        iterations = 10 if kib >= 16384 else 30
        bare = median_seconds(lambda x=x, out=out: comm.Allreduce(x, out, op=MPI.SUM), iterations)
        plain = median_seconds(lambda x=x: session.run(None, {"x": x}), iterations)
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
        binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(out))
        bound = median_seconds(lambda b=binding: session.run_with_iobinding(b), iterations)
        if comm.rank == 0:
            print(
                f"{kib:6d} KiB  {bare * 1e3:8.3f} | {plain * 1e3:8.3f} | {bound * 1e3:8.3f} | "
                f"run {plain / bare:.2f}x, io_binding {bound / bare:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
