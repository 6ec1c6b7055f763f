"""Partition time of two checkouts of this repository, interleaved in one run: is a change slower?

    .venv/bin/python bench/partition_ab.py --a /work/main --b . --model M.onnx --layout "--tp 4 --pp 2" \
        [--model M2.onnx --layout "--tp 2"] [--rounds 5] --work /scratch/ab

Each checkout runs its own code (`<checkout>/.venv/bin/python -m llmir_onnx.cli.main partition ...
--quiet`, from the checkout's folder) on the same model and layout. A round runs every (model, layout)
case once per checkout, in the order A B in odd rounds and B A in even ones, so neither side always
runs first (after the other's output was freed, or with a warmer page cache). Before each timed
partition `sync` runs untimed, as in bench/partition_big.py, and after it its plan is deleted. The
figure per case is the median over the rounds of each side's wall time, and the median of the rounds'
B/A ratios (each ratio compares two runs a few seconds apart on this noisy shared machine). Each
partition's CPU time (user + system, from wait4) is reported beside its wall time: on a machine whose
cores other jobs keep busy, the wall time mostly measures the wait for a core, the CPU time the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _partition(checkout: Path, model: Path, layout: list[str], out: Path) -> tuple[float, int, float]:
    """(seconds, peak RSS in bytes, CPU seconds: user + system) of one partition by `checkout`'s code."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    command = [str(checkout / ".venv/bin/python"), "-m", "llmir_onnx.cli.main", "partition", str(model), *layout,
               "-o", str(out), "--quiet"]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=checkout, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{shlex.join(command)} (in {checkout}) failed")
    shutil.rmtree(out)  # one plan on disk at a time (a multi-GB model's plans would fill a small disk)
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the reference checkout (e.g. main's worktree)")
    parser.add_argument("--b", type=Path, required=True, help="the changed checkout")
    parser.add_argument("--model", type=Path, action="append", required=True, help="a model (repeatable)")
    parser.add_argument("--layout", action="append", required=True, help='options per --model: "--tp 4 --pp 2"')
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for the plans")
    args = parser.parse_args(argv)
    if len(args.model) != len(args.layout):
        parser.error("give one --layout per --model")
    sides = {"a": args.a.resolve(), "b": args.b.resolve()}
    cases = [(model.resolve(), shlex.split(layout)) for model, layout in zip(args.model, args.layout, strict=True)]
    times: dict[tuple[int, str], list[float]] = {(case, side): [] for case in range(len(cases)) for side in sides}
    peaks: dict[tuple[int, str], int] = dict.fromkeys(times, 0)
    cpu: dict[tuple[int, str], list[float]] = {key: [] for key in times}
    print(f"load average before: {os.getloadavg()}", flush=True)
    for round_index in range(args.rounds):
        order = ["a", "b"] if round_index % 2 == 0 else ["b", "a"]
        for case, (model, layout) in enumerate(cases):
            for side in order:
                seconds, peak, cpu_s = _partition(sides[side], model, layout, args.work / f"plan-{case}-{side}")
                times[(case, side)].append(seconds)
                cpu[(case, side)].append(cpu_s)
                peaks[(case, side)] = max(peaks[(case, side)], peak)
                print(f"round {round_index + 1} {model.parent.name} {' '.join(layout)} {side}: {seconds:.2f} s "
                      f"(CPU {cpu_s:.2f} s)", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()}")
    rows = []
    print(f"{'model':<12}{'layout':<16}{'A median':>10}{'B median':>10}{'B/A of medians':>16}{'median B/A':>12}"
          f"{'peak RSS A':>12}{'peak RSS B':>12}")  # fmt: skip
    for case, (model, layout) in enumerate(cases):
        a, b = times[(case, "a")], times[(case, "b")]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        cpu_a, cpu_b = cpu[(case, "a")], cpu[(case, "b")]
        cpu_ratios = [y / x for x, y in zip(cpu_a, cpu_b, strict=True)]
        row = {"model": str(model), "layout": " ".join(layout), "a_s": a, "b_s": b,
               "a_median_s": statistics.median(a), "b_median_s": statistics.median(b),
               "ratio_of_medians": statistics.median(b) / statistics.median(a),
               "median_ratio": statistics.median(ratios), "ratios": ratios,
               "a_peak_rss_bytes": peaks[(case, "a")], "b_peak_rss_bytes": peaks[(case, "b")],
               "a_cpu_s": cpu_a, "b_cpu_s": cpu_b, "cpu_ratios": cpu_ratios,
               "median_cpu_ratio": statistics.median(cpu_ratios)}  # fmt: skip
        rows.append(row)
        print(f"{model.parent.name:<12}{' '.join(layout):<16}{row['a_median_s']:>9.2f}s{row['b_median_s']:>9.2f}s"
              f"{row['ratio_of_medians']:>15.3f}x{row['median_ratio']:>11.3f}x"
              f"{peaks[(case, 'a')] / 2**20:>10.0f}Mi{peaks[(case, 'b')] / 2**20:>10.0f}Mi")  # fmt: skip
        print(f"{'':<28}CPU (user + system): A median {statistics.median(cpu_a):.2f} s, B median "
              f"{statistics.median(cpu_b):.2f} s, median of round B/A {row['median_cpu_ratio']:.3f}x "
              f"({', '.join(f'{r:.2f}' for r in cpu_ratios)})")  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
