"""Emulating a slower device on this machine by stretching only a rank's compute (the emulation the
mixed-devices benchmark uses).

`LLMIR_COMPUTE_STRETCH="1=3"` (comma-separated RANK=FACTOR, FACTOR >= 1) makes rank 1 compute like a
device three times slower: the ai.llmir library (custom_ops/src/stretch.h) has each of its CPU kernels
(AllReduce, AllGather, ReduceScatter, Send, Recv), on entry and before it communicates, sleep
(FACTOR - 1) x the CPU time the calling thread used since the last "stretch point"; the point is reset
when the kernel's communication is over, so waiting in a collective is not stretched, and the work after
the run's last collective (the final norm and lm_head, a last stage after its Recv) is stretched by
`llmir_stretch_point`, which the rank runner calls right after each run (`CommContext.stretched_run`).
A real slower device computes k times longer and waits exactly as long as it must; so does a stretched
rank. The older emulation, LLMIR_CPU_SHARE (throttle.py), stretches wall time instead, which in decode
lands a slow rank's short compute segments in its "off" windows more often than not.

The measure is the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so it needs every kernel of a run on the
thread that calls run: onnxruntime does that with intra_op_num_threads = 1 and the sequential executor
(checked: the library records the thread of its stretch point and a kernel on another thread is an
error there; tests/test_mixed_devices.py checks that the compute the library measured is a part of the
CPU time of the thread that called run, and that it slept (FACTOR - 1) x that compute). A rank under the stretch gets
1 intra-op thread by default and more is refused when its session options are made. CPU only: on the
CUDA EP the thread's CPU time is kernel launches, not the device's compute.
"""

from __future__ import annotations

import ctypes
import math
import os
import time

from llmir_onnx.errors import PlanError
from llmir_onnx.runtime.rank_values import parse_rank_values

COMPUTE_STRETCH_ENV = "LLMIR_COMPUTE_STRETCH"


def parse_compute_stretches(text: str) -> dict[int, float]:
    """`"1=3,2=1.5"` -> {1: 3.0, 2: 1.5}; a one-line error for anything else."""
    return parse_rank_values(
        COMPUTE_STRETCH_ENV,
        text,
        lambda factor: math.isfinite(factor) and factor >= 1,
        "RANK=FACTOR with FACTOR >= 1, e.g. 1=3",
    )


def compute_stretch_from_env(rank: int) -> float | None:
    """This rank's factor from LLMIR_COMPUTE_STRETCH, None when it names no factor above 1 for it."""
    text = os.environ.get(COMPUTE_STRETCH_ENV, "")
    factor = parse_compute_stretches(text).get(rank, 1.0) if text else 1.0
    return factor if factor > 1 else None


def bind_stretch_functions(library: ctypes.CDLL) -> None:
    library.llmir_stretch_start.argtypes = []
    library.llmir_stretch_start.restype = None
    library.llmir_stretch_point.argtypes = []
    library.llmir_stretch_point.restype = ctypes.c_double
    library.llmir_stretch_slept_seconds.argtypes = []
    library.llmir_stretch_slept_seconds.restype = ctypes.c_double
    library.llmir_stretch_compute_seconds.argtypes = []
    library.llmir_stretch_compute_seconds.restype = ctypes.c_double


class ComputeStretch:
    """The library's stretch for this rank, through the same handle onnxruntime's sessions use (dlopen of
    the path onnxruntime registered returns the loaded library, so the state is one)."""

    def __init__(self, library: ctypes.CDLL, rank: int, factor: float) -> None:
        self._library = library
        self.rank = rank
        self.factor = factor
        # The calling thread's CPU time inside stretched runs (start to point), the library's measured
        # compute is part of it (the rest: polling in collectives): the check that the kernels ran here.
        self.run_thread_cpu_s = 0.0
        self._run_started_cpu: float | None = None

    def start(self) -> None:
        """Before a run: the runner's own work since the last run is host work, not the device's."""
        self._run_started_cpu = time.thread_time()
        self._library.llmir_stretch_start()

    def point(self) -> float:
        """Right after a run: stretch the work since the run's last collective; the total slept so far."""
        slept = float(self._library.llmir_stretch_point())
        if self._run_started_cpu is not None:
            self.run_thread_cpu_s += time.thread_time() - self._run_started_cpu
            self._run_started_cpu = None
        if slept < 0:
            raise PlanError(f"rank {self.rank}: the ai.llmir library's compute stretch failed (see the line above)")
        return slept

    def totals(self) -> dict[str, float]:
        """Seconds slept by the stretch, seconds of thread CPU time it measured (and stretched), and the calling
        thread's CPU seconds inside stretched runs, so far."""
        return {"slept_s": float(self._library.llmir_stretch_slept_seconds()),
                "compute_s": float(self._library.llmir_stretch_compute_seconds()),
                "run_thread_cpu_s": self.run_thread_cpu_s}  # fmt: skip
