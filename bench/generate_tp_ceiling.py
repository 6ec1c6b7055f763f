"""What 2 cores of this machine can give a 2-way split at all: the ceiling for benchmark (b).

    python bench/generate_tp_ceiling.py [--mib 784] [--batch 1 8] [--rounds 5]

No communication, no onnxruntime: one process multiplies a [batch, 1024] activation by float32 weight
matrices totalling MIB (the 200M-parameter model's size), one thread; then two processes at once
each do half of the weights. The per-round ratio (time of one / time of the slower of the two, for
the same total work) is the speedup a perfect tp 2 could reach here. Decode at batch 1 reads every
weight once per token, so it measures the memory bandwidth the two cores share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import os, sys, time
import numpy as np
mib, batch, steps = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = int(mib * 2**20 / 4 / 1024 / 1024)
weights = [np.random.default_rng(i).standard_normal((1024, 1024), dtype=np.float32) for i in range(rows)]
x = np.ones((batch, 1024), np.float32)
for w in weights: x2 = x @ w
start = time.perf_counter()
for _ in range(steps):
    for w in weights:
        y = x @ w
print(time.perf_counter() - start)
"""


def run(parallel: int, mib: float, batch: int, steps: int) -> float:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(mib / parallel), str(batch), str(steps)],
                                 stdout=subprocess.PIPE, text=True, env=env) for _ in range(parallel)]
    return max(float(child.communicate()[0]) for child in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, default=784)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for batch in args.batch:
        ratios, ones, twos = [], [], []
        for _ in range(args.rounds):
            ones.append(run(1, args.mib, batch, args.steps))
            twos.append(run(2, args.mib, batch, args.steps))
            ratios.append(ones[-1] / twos[-1])
        print(f"batch {batch}: 1 process / 2 processes (half the weights each), {args.mib:.0f} MiB float32: "
              f"median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
              f"{args.rounds} rounds; best/best {min(ones) / min(twos):.3f}")


if __name__ == "__main__":
    main()
