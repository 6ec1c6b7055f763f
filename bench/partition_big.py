"""Partition a multi-GB model at tp 4 x pp 2: wall time against `cp` of its weights, peak memory.

    .venv/bin/python bench/partition_big.py --work /big/scratch [--shape 7b] [--layers 12] [--rounds 5]
                                            [--keep] [--verify] [--floor] [--checkout A --checkout B]

Generates a LLaMA-shaped float16 model with models/make_synthetic.py (`--shape 7b`: hidden 4096, 32
heads, 8 kv heads, intermediate 11008, vocab 32000, 12 layers are 4.45 GiB of weights; `--shape 70b`:
hidden 8192, 64 heads, intermediate 28672, 8 layers are 13.7 GiB), then runs `--rounds` pairs of

1. `cp` of the weight file to the same disk;
2. `llmir-onnx partition --tp 4 --pp 2 --quiet` as a subprocess: wall time and peak RSS
   (the child's own rusage from wait4, which includes any pages of the weights it maps).

With `--floor`, each round runs a third step between the two: `bench/copy_floor.py`, which copies the
weight file in the kernel as `cp` does and BLAKE3-hashes the copy behind it on a second thread (the
least work of a partition that records its files' digests), so the floor is measured in the same
state of the machine as the two it lies between.

With `--phases`, each partition runs with `--progress` instead of `--quiet` and its stderr is read as
it comes: the moment the weights start streaming to disk (the first `writing` of its progress) splits
its time into the fixed cost before the first byte (interpreter, imports, loading, sharding, the stage
split) and the writing after it, each over the round's cp. The moment is when this script's reader saw
the text: on a busy machine it can see it late (after the partition even), which moves time from the
writing to the fixed cost; read it on a quiet machine.

With `--checkout DIR` (repeatable), each round partitions once with each checkout's code
(`DIR/.venv/bin/python -m llmir_onnx.cli.main`, run from DIR), the first checkout first in odd rounds
and last in even ones, each against the same round's cp (and floor); with two checkouts the second's
time over the first's per round is reported too: a before/after comparison interleaved in one run.

The steps start from the same state: no output exists (each round deletes them first), and a
`sync` (not timed; then `--settle` seconds of waiting) so one step's dirty pages are not flushed on
the next step's clock. Each is timed to its return ("cached": the data may still be in the page
cache) and to the end of a following `sync` ("durable"). The disk and memory of a shared VM change
speed 2-4x within a minute (this one's guest also hands freed pages back to its host, which makes
the next writes into them slower), so each round's ratio compares the partition with the cp just
before it, and the median round is the result. Whether the source stays in the page cache depends
on the memory the kernel could give the page cache (`MemAvailable` at the start: on a VM whose
`/dev/shm` holds most of the RAM, far below the RAM; the script says which held). Ratios: partition
time / cp time (target <= 1.2), peak RSS / weight bytes (target <= 0.05), and partition CPU / cp CPU
(user + system of each child, from wait4): where other jobs keep the cores busy, a step's wall time
is mostly its wait for a core, and the partition (graph work, copies, hashing) needs more CPU than cp
(a kernel copy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
# (hidden, heads, intermediate) of one decoder layer: 0.38 GiB (7b) and 1.6 GiB (70b) of float16 weights.
# The partition's graph work grows with the layer count, its copying with the bytes, so the two shapes
# bracket how a model's depth and width weigh on the time against cp.
LAYER_SHAPES = {"7b": (4096, 32, 11008), "70b": (8192, 64, 28672)}
PYTHON = sys.executable


def _sync() -> float:
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


class Timing(NamedTuple):
    """One timed step: seconds to return, to return + sync, peak RSS of the child in bytes, its CPU seconds
    (user + system), and with a marker the seconds until its stderr first said it."""

    returned: float
    durable: float
    peak_rss: int
    cpu: float
    marked: float | None = None


# What a partition's progress says when its weights start streaming to disk (plan/emit.py).
WRITING_MARKER = b"writing"


def _time_of_marker(stream: IO[bytes], marker: bytes, start: float, found: list[float]) -> None:
    """Read `stream` to its end; append the time (since `start`) its bytes first held `marker`."""
    tail = b""
    while chunk := os.read(stream.fileno(), 1 << 16):
        if not found and marker in tail + chunk:
            found.append(time.perf_counter() - start)
        tail = chunk[-len(marker) :]


def _timed(command: list[str], settle_s: float, cwd: Path | None = None, marker: bytes | None = None) -> Timing:
    """Run `command` after a sync (and `settle_s`), timed; with `marker`, also when its stderr first held it."""
    _sync()
    time.sleep(settle_s)
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if marker else None, cwd=cwd)
    found: list[float] = []
    reader = None
    if marker:
        assert child.stderr is not None
        reader = threading.Thread(target=_time_of_marker, args=(child.stderr, marker, start, found))
        reader.start()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would report the largest child so far).
    _, status, usage = os.wait4(child.pid, 0)
    returned = time.perf_counter() - start
    if reader is not None:
        reader.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {child.returncode}")
    if marker and not found:
        raise SystemExit(f"{' '.join(command)} never printed {marker.decode()!r} on stderr")
    durable = returned + _sync()
    return Timing(returned, durable, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime,
                  found[0] if found else None)  # fmt: skip


def _available_bytes() -> int:
    """Memory the kernel could give the page cache now (MemAvailable; the RAM where /proc/meminfo has none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder on the disk to measure")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument(
        "--shape", choices=sorted(LAYER_SHAPES), default="7b", help="layer shape: LLaMA-2 7B or 70B (8 kv heads)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="cp, partition pairs to run (median reported)")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds to wait after the sync before each timed step"
    )
    parser.add_argument("--keep", action="store_true", help="keep the model and the plan")
    parser.add_argument("--verify", action="store_true", help="run `llmir-onnx verify` on the plan afterwards")
    parser.add_argument(
        "--floor", action="store_true", help="also time bench/copy_floor.py (copy + BLAKE3 of the copy) in each round"
    )
    parser.add_argument(
        "--checkout", type=Path, action="append", help="partition with this checkout's .venv (repeatable: A/B)"
    )
    parser.add_argument(
        "--phases", action="store_true", help="time the partition's first written byte too (it runs with --progress)"
    )
    args = parser.parse_args(argv)
    work = args.work.resolve()
    model_dir = work / "model"
    plan_dir = work / "plan"
    model = model_dir / "model.onnx"
    data = model_dir / "model.onnx.data"
    if not data.is_file():
        hidden, heads, intermediate = LAYER_SHAPES[args.shape]
        subprocess.run(
            [PYTHON, str(ROOT / "models" / "make_synthetic.py"), "--out", str(model_dir), "--hidden", str(hidden),
             "--layers", str(args.layers), "--heads", str(heads), "--kv-heads", "8", "--intermediate",
             str(intermediate), "--vocab", "32000", "--dtype", "float16"],
            check=True,
        )  # fmt: skip
    weight_bytes = data.stat().st_size
    copy = work / "copy.data"
    cli = [PYTHON, "-m", "llmir_onnx.cli.main"]
    partition_args = ["partition", str(model), "--tp", "4", "--pp", "2", "-o", str(plan_dir),
                      "--progress" if args.phases else "--quiet"]  # fmt: skip
    marker = WRITING_MARKER if args.phases else None
    # (label, folder to run in, command): this checkout with this interpreter, or each --checkout with its own.
    sides = [(str(checkout), checkout.resolve(), [str(checkout.resolve() / ".venv" / "bin" / "python"),
              "-m", "llmir_onnx.cli.main", *partition_args]) for checkout in args.checkout or []]  # fmt: skip
    sides = sides or [("this checkout", None, [*cli, *partition_args])]
    available = _available_bytes()  # before the rounds: what the source and one output had to fit in
    floor_cmd = [PYTHON, str(ROOT / "bench" / "copy_floor.py"), str(data), str(copy)]
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load average before (1, 5, 15 min): "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    runs: list[list[tuple[Timing, Timing]]] = [[] for _ in sides]  # per side: (cp, partition) per round
    floors: list[Timing] = []
    for index in range(args.rounds):
        # The steps start from the same state: no output exists (deleting one frees its pages in the
        # page cache, which the next writer then gets without reclaiming others).
        copy.unlink(missing_ok=True)
        shutil.rmtree(plan_dir, ignore_errors=True)
        cp = _timed(["cp", str(data), str(copy)], args.settle)
        copy.unlink()
        if args.floor:
            floors.append(_timed(floor_cmd, args.settle))
            copy.unlink()
        # Interleaved: the first side runs first in odd rounds, last in even ones.
        for side in range(len(sides)) if index % 2 == 0 else reversed(range(len(sides))):
            shutil.rmtree(plan_dir, ignore_errors=True)
            _, cwd, command = sides[side]
            runs[side].append((cp, _timed(command, args.settle, cwd, marker)))
    plan_bytes = sum(p.stat().st_size for p in plan_dir.iterdir())
    for label, rounds in zip((label for label, _, _ in sides), runs, strict=True):
        if len(sides) > 1:
            print(f"--- {label}")
        _report(rounds, floors, weight_bytes, plan_bytes, available)
    if len(sides) == 2:
        walls = [b[1][0] / a[1][0] for a, b in zip(*runs, strict=True)]
        cpus = [b[1][3] / a[1][3] for a, b in zip(*runs, strict=True)]
        print(f"{sides[1][0]} / {sides[0][0]} per round: wall {', '.join(f'{r:.2f}' for r in walls)} (median "
              f"{statistics.median(walls):.3f}x); CPU {', '.join(f'{r:.2f}' for r in cpus)} (median "
              f"{statistics.median(cpus):.3f}x)")  # fmt: skip
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load average after (1, 5, 15 min): "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    if args.verify:
        start = time.perf_counter()
        subprocess.run([*cli, "verify", str(plan_dir), "--new-tokens", "2", "--past-tokens", "1"], check=True)
        print(f"verify: {time.perf_counter() - start:.1f} s")
    if not args.keep:
        shutil.rmtree(plan_dir, ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)
    return 0


def _report(
    rounds: list[tuple[Timing, Timing]], floors: list[Timing], weight_bytes: int, plan_bytes: int, available: int
) -> None:
    """The rounds of one checkout against their cps (and floors): tables, medians, and the JSON of them."""
    # The disk of a shared VM swings 2-4x within a minute: each round's ratio compares a partition
    # with the cp just before it; the median round is the figure.
    ratios = sorted(part[0] / cp[0] for cp, part in rounds)
    durable = sorted(part[1] / cp[1] for cp, part in rounds)
    peak = max(part[2] for _, part in rounds)
    rows = {
        "weight_bytes": weight_bytes,
        "plan_bytes": plan_bytes,
        "rounds": [
            {"cp_s": cp[0], "cp_durable_s": cp[1], "partition_s": part[0], "partition_durable_s": part[1],
             "partition_peak_rss_bytes": part[2], "cp_cpu_s": cp[3], "partition_cpu_s": part[3],
             **({"partition_first_byte_s": part.marked} if part.marked is not None else {})}
            for cp, part in rounds
        ],
        "median_ratio_time_vs_cp": statistics.median(ratios),
        "median_ratio_time_vs_cp_durable": statistics.median(durable),
        "ratio_peak_rss_vs_weights": peak / weight_bytes,
        "median_ratio_cpu_vs_cp": statistics.median(part[3] / cp[3] for cp, part in rounds),
        "load_average": os.getloadavg(),
    }  # fmt: skip
    if floors:
        rows["floor_rounds"] = [{"floor_s": f[0], "floor_durable_s": f[1], "floor_cpu_s": f[3]} for f in floors]
        paired = list(zip(floors, rounds, strict=True))
        rows["median_ratio_floor_vs_cp"] = statistics.median(f[0] / cp[0] for f, (cp, _) in paired)
        rows["median_ratio_time_vs_floor"] = statistics.median(part[0] / f[0] for f, (_, part) in paired)
        rows["median_ratio_floor_cpu_vs_cp"] = statistics.median(f[3] / cp[3] for f, (cp, _) in paired)
    gib = 2**30
    print(f"weights {weight_bytes / gib:.2f} GiB; plan written {plan_bytes / gib:.2f} GiB (tp 4 x pp 2)")
    print(f"{'round':<7}{'cp':>9}{'partition':>11}{'ratio':>8}{'cp+sync':>10}{'part+sync':>11}{'ratio':>8}"
          f"{'cp CPU':>9}{'part CPU':>10}{'ratio':>8}")  # fmt: skip
    for index, (cp, part) in enumerate(rounds, 1):
        print(f"{index:<7}{cp[0]:>8.2f}s{part[0]:>10.2f}s{part[0] / cp[0]:>7.2f}x{cp[1]:>9.2f}s{part[1]:>10.2f}s"
              f"{part[1] / cp[1]:>7.2f}x{cp[3]:>8.2f}s{part[3]:>9.2f}s{part[3] / cp[3]:>7.2f}x")  # fmt: skip
    print(f"partition / cp, median of {len(rounds)} rounds: {rows['median_ratio_time_vs_cp']:.2f}x "
          f"(durable: {rows['median_ratio_time_vs_cp_durable']:.2f}x), target <= 1.2")  # fmt: skip
    print(f"partition CPU / cp CPU (user + system), median of rounds: {rows['median_ratio_cpu_vs_cp']:.2f}x "
          "(on a machine whose cores other jobs keep busy, wall time mostly measures the wait for a core)")  # fmt: skip
    if floors:
        print(f"{'round':<7}{'cp':>9}{'floor':>9}{'ratio':>8}{'partition':>11}{'/floor':>8}"
              f"{'cp CPU':>9}{'fl. CPU':>9}{'ratio':>8}")  # fmt: skip
        for index, (floor, (cp, part)) in enumerate(paired, 1):
            print(f"{index:<7}{cp[0]:>8.2f}s{floor[0]:>8.2f}s{floor[0] / cp[0]:>7.2f}x{part[0]:>10.2f}s"
                  f"{part[0] / floor[0]:>7.2f}x{cp[3]:>8.2f}s{floor[3]:>8.2f}s{floor[3] / cp[3]:>7.2f}x")  # fmt: skip
        print(f"floor (copy + BLAKE3 of the copy) / cp, median of rounds: {rows['median_ratio_floor_vs_cp']:.2f}x "
              f"(CPU {rows['median_ratio_floor_cpu_vs_cp']:.2f}x); partition / floor: "
              f"{rows['median_ratio_time_vs_floor']:.2f}x")  # fmt: skip
    # (cp, seconds before the first byte, seconds writing after it) of each round, with --phases
    phases = [(cp.returned, part.marked, part.returned - part.marked) for cp, part in rounds if part.marked is not None]
    if phases:
        rows["median_ratio_first_byte_vs_cp"] = statistics.median(before / cp for cp, before, _ in phases)
        rows["median_ratio_writing_vs_cp"] = statistics.median(after / cp for cp, _, after in phases)
        print(f"{'round':<7}{'cp':>9}{'1st byte':>10}{'/cp':>7}{'writing':>10}{'/cp':>7}")
        for index, (cp_s, before, after) in enumerate(phases, 1):
            print(f"{index:<7}{cp_s:>8.2f}s{before:>9.2f}s{before / cp_s:>6.2f}x{after:>9.2f}s{after / cp_s:>6.2f}x")
        print(f"partition = before its first byte + writing; over cp, medians of rounds: "
              f"{rows['median_ratio_first_byte_vs_cp']:.2f}x + {rows['median_ratio_writing_vs_cp']:.2f}x")  # fmt: skip
    print(f"peak RSS / weight bytes      : {rows['ratio_peak_rss_vs_weights']:.4f} "
          f"({peak / 2**20:.0f} MiB), target <= 0.05")  # fmt: skip
    if 2 * weight_bytes < available:
        print(f"cache state: source plus one output ({2 * weight_bytes / gib:.1f} GiB) fit in the memory "
              f"available at the start ({available / gib:.1f} GiB): the source can stay in the page cache")  # fmt: skip
    else:
        print(f"cache state: source plus one output ({2 * weight_bytes / gib:.1f} GiB) exceed the memory "
              f"available at the start ({available / gib:.1f} GiB): steps re-read part of the source "
              "and wait on writeback")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    sys.exit(main())
