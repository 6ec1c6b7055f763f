"""AllReduce (float32, sum) inside an onnxruntime session against bare mpi4py `comm.Allreduce`.

Run from the repository root (it starts mpiexec itself, once per world size):

    .venv/bin/python bench/allreduce_vs_mpi.py                 # 2 and 4 ranks, 4 KiB .. 64 MiB
    .venv/bin/python bench/allreduce_vs_mpi.py --worlds 2 --max-mib 16

Per rank: one onnxruntime session (intra_op_num_threads=1) whose graph is a single ai.llmir AllReduce
over the whole world. Two session measurements per size:
- "iobind": IO binding, input and output bound to preallocated CPU OrtValues, `run_with_iobinding`:
  the kernel reduces straight into the bound output, like mpi4py into its receive buffer;
- "run": plain `session.run`, which also pays for onnxruntime allocating the output and copying it
  into the numpy array it returns.
Bare: `comm.Allreduce(send, recv, op=MPI.SUM)` on preallocated numpy arrays in the same processes,
over the same MPI (the library's MPI_Init_thread; mpi4py is imported after it and reuses it).
"bare + check": mpi4py doing what the kernel does in MPI terms: the kernel's pre-flight agreement
check (an allgather of 37 int64 words per member) followed by the Allreduce. It is a reference that
explains the gap, not a number subtracted from anything.
"bare Iallreduce+Test": mpi4py waiting the way the library waits (MPI_Iallreduce polled with MPI_Test,
sched_yield after 16 polls), which it does so that a dead peer becomes a timeout error.
"iobind, check every call": a second session of the same graph created under LLMIR_CHECK_EVERY_CALL=1,
so its kernel runs the pre-flight check on every call as the library did before the per-node cache
(the first session checks once per shape, in the warm-up).
The six are interleaved per repetition (barrier before each), every rank times its own call, and a
repetition's time is the slowest rank's (a collective is done when its last member is). The table
gives the median over repetitions; nothing is subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KIB = 1024
PREFLIGHT_WORDS = 5 + 32  # the library's pre-flight check message: 5 header words + up to 32 dims


def _sizes(max_mib: int) -> list[int]:
    sizes, size = [], 4 * KIB
    while size <= max_mib * KIB * KIB:
        sizes.append(size)
        size *= 4
    return sizes


def _reps(nbytes: int) -> int:
    return 60 if nbytes <= 256 * KIB else 30 if nbytes <= 4 * KIB * KIB else 10


def _measure(comm: Any, mpi: Any, options: Any, nbytes: int) -> dict[str, float]:
    """Median (over repetitions) of the slowest rank's time for each of the AllReduce calls."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from llmir_onnx.ops import LLMIR_OPSET_IMPORT

    n = nbytes // 4
    node = helper.make_node("AllReduce", ["x"], ["y"], domain="ai.llmir", name="allreduce")
    graph = helper.make_graph(
        [node],
        "allreduce",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), LLMIR_OPSET_IMPORT], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    # The same graph with the signature check on every call (the library before its per-node cache):
    # the variable is read when onnxruntime creates the kernel.
    os.environ["LLMIR_CHECK_EVERY_CALL"] = "1"
    session_every = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del os.environ["LLMIR_CHECK_EVERY_CALL"]
    x = np.full(n, comm.Get_rank() + 1, dtype=np.float32)
    y = np.empty(n, dtype=np.float32)
    y_every = np.empty(n, dtype=np.float32)
    recv = np.empty(n, dtype=np.float32)
    binding = session.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(y))
    binding_every = session_every.io_binding()
    binding_every.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
    binding_every.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(y_every))
    plain_out: list[np.ndarray] = []

    def run_plain() -> None:
        plain_out[:] = session.run(["y"], {"x": x})

    # What the kernel does in MPI terms: its pre-flight check (every member runs the same op, dtype and
    # shape: an allgather of 37 int64 words, custom_ops/src/kernels.cc) and then the reduction itself.
    check_words = np.zeros(PREFLIGHT_WORDS, dtype=np.int64)
    check_all = np.empty(PREFLIGHT_WORDS * comm.Get_size(), dtype=np.int64)

    def bare_with_check() -> None:
        comm.Allgather(check_words, check_all)
        comm.Allreduce(x, recv_checked, op=mpi.SUM)

    recv_checked = np.empty(n, dtype=np.float32)
    recv_polled = np.empty(n, dtype=np.float32)

    def bare_polled() -> None:
        # The library's way of waiting (so that a dead peer becomes a timeout): a non-blocking
        # collective polled with MPI_Test, yielding the core after the first 16 polls.
        request = comm.Iallreduce(x, recv_polled, op=mpi.SUM)
        polls = 0
        while not request.Test():
            polls += 1
            if polls >= 16:
                os.sched_yield()

    calls = {
        "iobind": lambda: session.run_with_iobinding(binding),
        "iobind_every": lambda: session_every.run_with_iobinding(binding_every),
        "run": run_plain,
        "bare": lambda: comm.Allreduce(x, recv, op=mpi.SUM),
        "bare_check": bare_with_check,
        "bare_polled": bare_polled,
    }
    samples: dict[str, list[float]] = {label: [] for label in calls}
    reps = _reps(nbytes)
    for rep in range(reps + 2):  # two warm-up repetitions
        for label, call in calls.items():
            comm.Barrier()
            start = time.perf_counter()
            call()
            elapsed = comm.allreduce(time.perf_counter() - start, op=mpi.MAX)
            if rep >= 2:
                samples[label].append(elapsed)
    expected = float(sum(range(1, comm.Get_size() + 1)))
    for label, got in [
        ("iobind", y),
        ("iobind_every", y_every),
        ("run", plain_out[0]),
        ("bare", recv),
        ("bare_check", recv_checked),
        ("bare_polled", recv_polled),
    ]:
        if not np.all(got == expected):
            raise SystemExit(f"rank {comm.Get_rank()}: {label} result wrong at {nbytes} bytes")
    return {"bytes": nbytes, "reps": reps, **{label: statistics.median(v) for label, v in samples.items()}}


def worker(sizes: list[int]) -> None:
    from llmir_onnx.runtime.launch import setup_communication

    comm_context = setup_communication()
    from mpi4py import MPI  # after the library initialized MPI: mpi4py reuses that initialization

    comm = MPI.COMM_WORLD
    assert comm.Get_size() == comm_context.world_size and comm.Get_rank() == comm_context.rank
    options = comm_context.session_options(intra_op_num_threads=1)
    results = [_measure(comm, MPI, options, nbytes) for nbytes in sizes]
    if comm.Get_rank() == 0:
        print("RESULTS " + json.dumps(results), flush=True)


def _format_size(nbytes: int) -> str:
    return f"{nbytes // (KIB * KIB)} MiB" if nbytes >= KIB * KIB else f"{nbytes // KIB} KiB"


def driver(worlds: list[int], max_mib: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    mpiexec = Path(sys.prefix) / "bin" / "mpiexec"
    print(
        "| ranks | size | session iobind ms | session run ms | bare mpi4py ms | iobind / bare | run / bare "
        "| bare + check ms | iobind / (bare + check) | bare Iallreduce+Test ms | iobind, check every call ms "
        "| iobind / check every call |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for world in worlds:
        command = [str(mpiexec), "-n", str(world), sys.executable, __file__, "--worker", "--max-mib", str(max_mib)]
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULTS ")]
        if completed.returncode != 0 or not lines:
            raise SystemExit(
                f"{world} ranks failed (exit {completed.returncode}):\n{completed.stdout}{completed.stderr}"
            )
        for row in json.loads(lines[0][len("RESULTS ") :]):
            print(
                f"| {world} | {_format_size(row['bytes'])} | {row['iobind'] * 1e3:.3f} | {row['run'] * 1e3:.3f} | "
                f"{row['bare'] * 1e3:.3f} | {row['iobind'] / row['bare']:.2f} | {row['run'] / row['bare']:.2f} | "
                f"{row['bare_check'] * 1e3:.3f} | {row['iobind'] / row['bare_check']:.2f} | "
                f"{row['bare_polled'] * 1e3:.3f} | {row['iobind_every'] * 1e3:.3f} | "
                f"{row['iobind'] / row['iobind_every']:.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="rank counts (default: 2 4)")
    parser.add_argument("--max-mib", type=int, default=64, help="largest message in MiB (default 64)")
    parser.add_argument("--worker", action="store_true", help="internal: run as one rank under mpiexec")
    args = parser.parse_args()
    if args.worker:
        worker(_sizes(args.max_mib))
    else:
        driver(args.worlds, args.max_mib)


if __name__ == "__main__":
    main()
