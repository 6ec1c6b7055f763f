"""One `llmir-onnx partition` in this process, with the moment each step began and ended.

    .venv/bin/python bench/partition_timeline.py MODEL --tp 4 --pp 2 -o PLAN [--last-pieces 8]

Runs the CLI's partition (all arguments after the script's own are the CLI's) with the steps of
`api.partition_to_dir` and the writer's threads wrapped: for each step, the wall time since the process
started (from /proc, so the interpreter's start and the imports count), the CPU time of the thread
that ran it and of the whole process. `--last-pieces N` also lists the last N pieces the writer threads
wrote (when, on which thread, how many bytes): where the tail of the writes goes.

What it measures is the partition's own code; the wrapping adds a few calls per step. Steps it names
must exist: a renamed step fails here, loudly, rather than being left out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _process_start() -> float:
    """The wall-clock time this process started (/proc/self/stat field 22, in clock ticks since boot)."""
    with open("/proc/self/stat") as stat:
        ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        since_boot = float(uptime.read().split()[0])
    return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))


START = _process_start()
# (what, wall seconds since the process started, CPU seconds of the thread, CPU seconds of the process)
MARKS: list[tuple[str, float, float, float]] = []


def mark(what: str) -> None:
    MARKS.append((what, time.time() - START, time.thread_time(), time.process_time()))


mark("interpreter up")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's `cli` package

from cli import main as cli_main  # noqa: E402
from llmir_onnx import api  # noqa: E402
from llmir_onnx.plan import data_files  # noqa: E402

mark("imports")

API_STEPS = ("load_model", "choose_max_seq", "shard_tp_ranks", "plan_rank_weights", "start_weight_writer",
             "build_rank_models", "_rank_details", "write_plan_into")  # fmt: skip
# (start, end, thread, bytes, what) of each piece written
PIECES: list[tuple[float, float, str, int, str]] = []


def _wrapped(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def step(*args: Any, **kwargs: Any) -> Any:
        mark(f"{name} begins")
        result = function(*args, **kwargs)
        mark(f"{name} ends")
        return result

    return step


def _describe(piece: Any) -> tuple[int, str]:
    unit = piece.unit
    if isinstance(unit, list):
        return sum(span.length for span in piece.spans), f"gathered {unit[0][0].name} x{len(unit)}"
    return piece.stop - piece.start, f"{type(unit[0]).__name__} {unit[0].name}"


def _instrument() -> None:
    for name in API_STEPS:
        setattr(api, name, _wrapped(name, getattr(api, name)))
    run_thread = data_files.WeightWriter._run
    write_piece = data_files._write_piece

    def writer_thread(self: data_files.WeightWriter, pending: Any) -> None:
        run_thread(self, pending)
        mark(f"{threading.current_thread().name} done")

    def piece_written(piece: Any, files: Any, advance: Callable[[int], None]) -> None:
        began = time.time() - START
        write_piece(piece, files, advance)
        count, what = _describe(piece)
        PIECES.append((began, time.time() - START, threading.current_thread().name, count, what))

    data_files.WeightWriter._run = writer_thread  # type: ignore[method-assign]
    data_files._write_piece = piece_written


def _report(last_pieces: int) -> None:
    for began, ended, thread, count, what in PIECES[len(PIECES) - last_pieces :] if last_pieces else []:
        print(f"  {began:7.3f}-{ended:7.3f} s  {thread:<16} {count / 2**20:8.1f} MiB  {what}", file=sys.stderr)
    print(f"{'wall':>8} {'thread CPU':>11} {'process CPU':>12}  step", file=sys.stderr)
    for what, wall, thread_cpu, process_cpu in MARKS:
        print(f"{wall:7.3f}s {thread_cpu:10.3f}s {process_cpu:11.3f}s  {what}", file=sys.stderr)
    sys.stderr.flush()


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--last-pieces", type=int, default=0)
    own, cli_args = parser.parse_known_args()
    _instrument()
    exit_now = os._exit

    def leave(code: int) -> None:  # the CLI leaves without the interpreter's teardown after a partition
        mark("exit")
        _report(own.last_pieces)
        exit_now(code)

    os._exit = leave  # type: ignore[assignment]
    sys.argv = ["llmir-onnx", "partition", *cli_args]
    with contextlib.suppress(SystemExit):  # a CLI that returns through sys.exit (an error) still reports
        cli_main.main()
    mark("exit")
    _report(own.last_pieces)


if __name__ == "__main__":
    main()
