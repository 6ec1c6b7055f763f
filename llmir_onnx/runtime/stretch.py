"""The compute meter of every rank, and emulating a slower device on this machine by stretching only a
rank's compute (the emulation the mixed-devices benchmark uses).

The meter (custom_ops/src/stretch.h): between `start()` and `point()` (the rank runner brackets a session
run with them: `CommContext.metered_run`) the ai.llmir library sums the CPU time (CLOCK_THREAD_CPUTIME_ID)
of the thread that calls run outside its CPU kernels' communication: each kernel's entry adds the CPU time
since the last point and its return resets the point, so the polling inside a collective while a peer is
late is not counted. No profiler is attached, and a process preempted by another job does not advance
its thread's CPU clock, so the figure is the rank's compute whatever else the machine runs (memory
bandwidth and caches are still shared).

`LLMIR_COMPUTE_STRETCH="1=3"` (comma-separated RANK=FACTOR, FACTOR >= 1) makes rank 1 compute like a
device three times slower: at each of those points the library also sleeps (FACTOR - 1) x the CPU time
it just counted, so waiting in a collective is not stretched, and the work after the run's last
collective (the final norm and lm_head, a last stage after its Recv) is stretched by the point after the
run. A real slower device computes k times longer and waits exactly as long as it must; so does a
stretched rank. Its device time is FACTOR x the meter's compute (`ComputeMeter.device_seconds`).
The older emulation, LLMIR_CPU_SHARE (throttle.py), stretches wall time instead; the meter does not see
it (a stopped process uses no CPU time).

The measure is one thread's CPU time, so it needs every kernel of a run on the thread that calls run:
onnxruntime does that with intra_op_num_threads = 1 and the sequential executor (checked: the library
records the thread of its point; a kernel on another thread is an error under the stretch and is
counted in `foreign_kernels` otherwise; tests/test_mixed_devices.py checks that the compute the library
measured is a part of the CPU time of the thread that called run, and excludes a collective's wait). A
rank under the stretch gets 1 intra-op thread by default and more is refused when its session options
are made. CPU only: on the CUDA EP the thread's CPU time is kernel launches, not the device's compute.
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


def bind_compute_meter_functions(library: ctypes.CDLL) -> None:
    library.llmir_compute_start.argtypes = []
    library.llmir_compute_start.restype = None
    library.llmir_compute_point.argtypes = []
    library.llmir_compute_point.restype = ctypes.c_double
    library.llmir_stretch_slept_seconds.argtypes = []
    library.llmir_stretch_slept_seconds.restype = ctypes.c_double
    library.llmir_compute_seconds.argtypes = []
    library.llmir_compute_seconds.restype = ctypes.c_double
    library.llmir_compute_foreign_kernels.argtypes = []
    library.llmir_compute_foreign_kernels.restype = ctypes.c_uint64


class ComputeMeter:
    """The library's compute meter for this rank (and its stretch when `factor` > 1), through the same
    handle onnxruntime's sessions use (dlopen of the path onnxruntime registered returns the loaded
    library, so the state is one)."""

    def __init__(self, library: ctypes.CDLL, rank: int, factor: float = 1.0) -> None:
        self._library = library
        self.rank = rank
        self.factor = factor
        # The calling thread's CPU time inside metered runs (start to point); the library's measured
        # compute is part of it (the rest: polling in collectives): the check that the kernels ran here.
        self.run_thread_cpu_s = 0.0
        self._run_started_cpu: float | None = None

    @property
    def stretched(self) -> bool:
        return self.factor > 1

    def start(self) -> None:
        """Before a run: the runner's own work since the last run is host work, not the device's."""
        self._run_started_cpu = time.thread_time()
        self._library.llmir_compute_start()

    def point(self) -> float:
        """Right after a run: count (and, stretched, stretch) the work since the run's last collective;
        the total slept so far."""
        slept = float(self._library.llmir_compute_point())
        if self._run_started_cpu is not None:
            self.run_thread_cpu_s += time.thread_time() - self._run_started_cpu
            self._run_started_cpu = None
        if slept < 0:
            raise PlanError(f"rank {self.rank}: the ai.llmir library's compute meter failed (see the line above)")
        return slept

    def device_seconds(self) -> float:
        """The device time so far: FACTOR x the thread CPU time the meter counted as compute (the CPU time
        itself on an unstretched rank). The stretch's sleeps deliver the (FACTOR - 1) x part in wall time,
        but a sleep's overshoot (a loaded machine wakes a sleeper late) is paid back by whatever kernel
        sleeps next, which may be another run's: the sleeps of one run are not its device time, their
        total is (`totals`)."""
        return self.factor * float(self._library.llmir_compute_seconds())

    def totals(self) -> dict[str, float]:
        """Seconds slept by the stretch, seconds of thread CPU time the meter counted as compute, the calling
        thread's CPU seconds inside metered runs, and the kernels that ran on another thread, so far."""
        return {"slept_s": float(self._library.llmir_stretch_slept_seconds()),
                "compute_s": float(self._library.llmir_compute_seconds()),
                "run_thread_cpu_s": self.run_thread_cpu_s,
                "foreign_kernels": int(self._library.llmir_compute_foreign_kernels())}  # fmt: skip
