"""Thread CPU time of a decode-like onnxruntime MatMul [1, k] x W[k, n] (W an initializer), run back to
back or with a sleep between runs (as a stretched rank sleeps between its compute segments), alone or
with a neighbour process streaming memory (numpy copyto of 256 MiB in a loop) on the other core; the
conditions interleaved in rounds, so that each round sees the same moment of the machine's other load.

    .venv/bin/python bench/segment_cpu_time.py [--rounds 3] [--runs 200]

Prints GB/s of W streamed per second of the calling thread's CPU time (mean over the runs of a round),
per condition and round: how much a compute segment's CPU time depends on what the core and the shared
L3 did just before it (docs/BENCHMARKS.md, "Like-for-like")."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import calibrate_cpu

NEIGHBOUR = "import numpy as np\na = np.ones(1 << 26, np.float32); b = np.empty_like(a)\nwhile True: np.copyto(b, a)"
SIZES = {"12 MiB (pp2 rank 1's decode weights)": (1536, 2048), "48 MiB (tp2 rank 0's)": (3072, 4096)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    benchmarks = {name: calibrate_cpu.ort_gemv_benchmark(k, n) for name, (k, n) in SIZES.items()}
    rates: dict[tuple[str, str, float], list[float]] = {}
    for _ in range(args.rounds):
        for neighbour in ("alone", "neighbour streaming memory"):
            process = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if neighbour != "alone" else None
            try:
                if process is not None:
                    time.sleep(0.5)
                for name, (run, moved) in benchmarks.items():
                    for pause in (0.0, 0.002):
                        seconds = []
                        for _ in range(args.runs):
                            start = time.thread_time()
                            run()
                            seconds.append(time.thread_time() - start)
                            if pause:
                                time.sleep(pause)
                        rates.setdefault((name, neighbour, pause), []).append(moved / statistics.fmean(seconds))
            finally:
                if process is not None:
                    process.kill()
                    process.wait()
    print("| weights | neighbour | between runs | GB/s per second of thread CPU time, per round |")
    print("|---|---|---|---|")
    for (name, neighbour, pause), values in rates.items():
        between = f"sleep {pause * 1e3:g} ms" if pause else "nothing (back to back)"
        print(f"| {name} | {neighbour} | {between} | {', '.join(f'{v / 1e9:.1f}' for v in values)} |")


if __name__ == "__main__":
    main()
