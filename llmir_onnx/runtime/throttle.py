"""The older, wall-clock emulation of a slower device: a rank's process runs under a CPU duty cycle.

The benchmarks now use LLMIR_COMPUTE_STRETCH (runtime/stretch.py), which stretches only a rank's
compute; this duty cycle stretches its wall time, waits included, so in decode a slow rank's short
compute segments between collectives land in "off" windows more often than 1 - share of the time while
its "on" windows go to waiting (docs/BENCHMARKS.md, "Mixed devices", Run E: its decode kernels measured
0.53-0.58 of the prediction). It stays for what it does emulate (a process that gets a share of a CPU)
and for `bench/calibrate_cpu.py --cpu-share`; `bench/mixed_devices.py` no longer takes it (it measures
every rank by the library's compute meter, thread CPU time, which a stopped process does not use).

`LLMIR_CPU_SHARE="1=0.333"` (comma-separated RANK=SHARE) makes rank 1 run a third of the wall time:
a small sidecar process stops it (SIGSTOP) and continues it (SIGCONT) in a fixed period, on for
`share` of each period and off for the rest, which is what `cpulimit` does. Everything the rank does,
its kernels, its dispatch and its side of a collective, then takes about 1 / share as long on average,
like a device that is uniformly that much slower. The period, 10 ms, is long against the sidecar's
wake-up latency on a loaded machine (about a millisecond, which would otherwise skew the share); the
credit Linux's scheduler gives a process that was stopped (it runs ahead of the others once
continued) makes up for part of each stop on a busy machine. A 50 ms period was tried and dropped:
three of six throttled `verify` runs hung with it (docs/BENCHMARKS.md): hydra's SIGUSR1 to the rank's
process group when the other rank exits killed the sidecar, and when that fell in an "off" window the
rank stayed stopped (at 10 ms too, less often); the sidecar ignores SIGUSR1 now, and neither period
hangs (the period stays 10 ms for the reasons below). A single run shorter than a
period either fits in an "on" window (full speed) or not, so only averages over many periods show the
emulated speed (the calibration under a share, `bench/calibrate_cpu.py --cpu-share`, averages for that
reason). On an idle machine the stretch is 1 / share; on a busy one it is less, by how much depends on
the other load (see docs/BENCHMARKS.md).

Shorter periods were measured and not taken (2026-12-03, load 1.6-3.2 on 2 cores, a process doing
steps of 2-6 ms of matrix-vector work at share 1/3, 300 steps; docs/BENCHMARKS.md, "Mixed devices"):
at 10 ms the mean step was 2.7-3.5 x the unthrottled one, each step 0.6-0.9 x (p10) to 4.7-5.2 x
(p90); at 2 ms 1.19 x and at 1 ms 3.9 x on the mean, p10 to p90 0.5 to 7.9 x: no steadier per step,
and further from 1 / share on the mean (the target's wake-up after SIGCONT and its refilled caches are
a larger part of a short window). A sidecar that corrects each window for the measured length of the
previous ones (closed loop) stretched the mean 4.8-9.2 x at 1-10 ms. So the period stays 10 ms and the
benchmarks compare means over many periods.

Honoured by every rank runner (`runtime.launch.setup_communication`), so `verify` and `generate` of a
plan run its slow ranks slow. Meant for benchmarks and tests of mixed-device plans on one machine; a
share of 1 (or no entry) leaves the rank alone.
"""

from __future__ import annotations

import os
import subprocess
import sys

from llmir_onnx.runtime.rank_values import parse_rank_values

CPU_SHARE_ENV = "LLMIR_CPU_SHARE"
PERIOD_S = 0.010

# The sidecar: alternately continues and stops its target; continues it and exits when told to stop
# (SIGTERM/SIGINT) or when the target is gone (the sidecar is its child: a new parent means it died).
_SIDECAR = """
import os, signal, sys, time
pid, on, off = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
parent = os.getppid()
def release(*_):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, release)
signal.signal(signal.SIGINT, release)
signal.signal(signal.SIGHUP, release)
# Hydra (-disable-auto-cleanup) sends SIGUSR1 to a rank's process group, this sidecar included, when
# another rank exits. The rank ignores it, but the sidecar is started while MPI's own handler is in
# place, which exec resets to the default action, termination: killed inside an "off" window it would
# leave the rank stopped for good (the hang of docs/BENCHMARKS.md). It is not a request to stop.
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
try:
    while os.getppid() == parent:
        time.sleep(on)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(off)
        os.kill(pid, signal.SIGCONT)
except ProcessLookupError:
    pass
release()
"""


def parse_cpu_shares(text: str) -> dict[int, float]:
    """`"1=0.333,3=0.5"` -> {1: 0.333, 3: 0.5}; a one-line error for anything else."""
    return parse_rank_values(
        CPU_SHARE_ENV, text, lambda share: 0 < share <= 1, "RANK=SHARE with 0 < SHARE <= 1, e.g. 1=0.333"
    )


def throttle_process(pid: int, share: float, period_s: float = PERIOD_S) -> subprocess.Popen[bytes] | None:
    """Run process `pid` at `share` of the wall time from now on (None: share 1, nothing to do).

    The sidecar is started from the calling process, so `pid` should be the caller (or a process that
    outlives the caller): the sidecar ends when its parent does.
    """
    if share >= 1:
        return None
    on, off = share * period_s, (1 - share) * period_s
    return subprocess.Popen([sys.executable, "-c", _SIDECAR, str(pid), repr(on), repr(off)], stdin=subprocess.DEVNULL)


def throttle_rank_from_env(rank: int) -> subprocess.Popen[bytes] | None:
    """This process, rank `rank`, under the duty cycle `LLMIR_CPU_SHARE` gives it (if any)."""
    text = os.environ.get(CPU_SHARE_ENV, "")
    share = parse_cpu_shares(text).get(rank) if text else None
    return throttle_process(os.getpid(), share) if share is not None else None
