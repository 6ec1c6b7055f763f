"""Start cost of one spawned rank: a fresh interpreter importing the rank entry point and onnxruntime.

Every verify and generate job pays it once per rank, on the same cores, so it sets the floor of a small
job's time. Compare checkouts in one interleaved run (the machine is shared and noisy):

    python bench/rank_start.py --python /work/main/.venv/bin/python --python .venv/bin/python --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

STATEMENT = "import llmir_onnx.runtime.rank_main, onnxruntime"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", required=True, help="an interpreter (repeat to compare)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {python: [] for python in args.python}
    for _ in range(args.rounds):
        for python in args.python:
            start = time.perf_counter()
            # cwd "/": `-c` puts the working directory first on sys.path, which would shadow the installed checkout
            subprocess.run([python, "-c", STATEMENT], check=True, cwd="/")
            seconds[python].append(time.perf_counter() - start)
    first = statistics.median(seconds[args.python[0]])
    for python, times in seconds.items():
        median = statistics.median(times)
        print(f"{python}: median {median:.2f} s (min {min(times):.2f}, max {max(times):.2f}), "
              f"{first / median:.2f}x the first")


if __name__ == "__main__":
    main()
