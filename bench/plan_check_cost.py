"""What checking a plan's files costs: `llmir-onnx check`'s hashing against reading the same files with `cat`,
and what hashing the data files while they are written adds to a partition.

    .venv/bin/python bench/plan_check_cost.py --work /work/scratch/checkbench [--hidden 2048 --layers 8] [--rounds 5]

Method. A synthetic LLaMA (models/make_synthetic.py, float16, random weights) is generated once in
`--work`, then partitioned at tp 2. Each round, in this order, on warm files (the first round's `cat`
warms the page cache, and its figures are dropped):

1. `cat` of every plan file to /dev/null (one process, the files in the manifest's order);
2. `check_plan_files` with hashes (what `llmir-onnx check`, `verify` and `generate` run before any rank);
3. `check_plan_files` without hashes (`--no-check-hashes`: paths and sizes only);
4. the partition itself, with the data files hashed as they are written (the default) and with the
   read-back hashing stubbed out (`_OrderedHash._hash_range` a no-op), the output folder removed before each.

The figures are medians over the rounds; the ratios compare steps of the same round. Cold-cache reads
are not measured (dropping the page cache needs the whole machine).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmir_onnx.api import partition_to_dir  # noqa: E402
from llmir_onnx.plan import data_files  # noqa: E402
from llmir_onnx.plan.integrity import check_plan_files  # noqa: E402
from llmir_onnx.plan.manifest import Manifest  # noqa: E402


def _timed(action: object) -> float:
    start = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - start


def _partition(model: Path, out: Path, *, hashing: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    original = data_files._OrderedHash._hash_range
    if not hashing:
        data_files._OrderedHash._hash_range = lambda self, start, stop: None  # type: ignore[method-assign]
    try:
        return _timed(lambda: partition_to_dir(model, out, tp=2))
    finally:
        data_files._OrderedHash._hash_range = original  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = args.work / f"model-h{args.hidden}-l{args.layers}" / "model.onnx"
    if not model.is_file():
        subprocess.run(
            [sys.executable, str(REPO / "models" / "make_synthetic.py"), "--out", str(model.parent),
             "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.hidden // 128),
             "--kv-heads", str(max(1, args.hidden // 512)), "--intermediate", str(args.hidden * 11 // 4),
             "--vocab", "32000", "--dtype", "float16"],
            check=True,
        )  # fmt: skip
    plan = args.work / "plan"
    _partition(model, plan, hashing=True)
    manifest = Manifest.read(plan)
    paths = [str(plan / name) for name in manifest.files]
    total = sum(digest.size for digest in manifest.files.values())
    rows: dict[str, list[float]] = {"cat": [], "check": [], "check_no_hashes": [], "partition": [],
                                    "partition_no_hashing": []}  # fmt: skip
    for round_index in range(args.rounds + 1):
        cat = _timed(lambda: subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True))
        check = _timed(lambda: check_plan_files(plan, manifest))
        check_no_hashes = _timed(lambda: check_plan_files(plan, manifest, check_hashes=False))
        hashed = _partition(model, plan, hashing=True)
        unhashed = _partition(model, plan, hashing=False)
        _partition(model, plan, hashing=True)  # the same plan again (byte-identical) for the next round's check
        if round_index == 0:
            continue  # warm-up
        for key, value in zip(rows, (cat, check, check_no_hashes, hashed, unhashed), strict=True):
            rows[key].append(value)
        print(f"round {round_index}: cat {cat:.3f} s, check {check:.3f} s ({check / cat:.2f}x), no hashes "
              f"{check_no_hashes * 1e3:.2f} ms; partition {hashed:.2f} s, without hashing {unhashed:.2f} s "
              f"({hashed / unhashed:.2f}x)", flush=True)
    median = {key: statistics.median(values) for key, values in rows.items()}
    check_ratios = [c / k for c, k in zip(rows["check"], rows["cat"], strict=True)]
    partition_ratios = [h / u for h, u in zip(rows["partition"], rows["partition_no_hashing"], strict=True)]
    print(f"plan: {len(paths)} files, {total / 2**30:.2f} GiB; medians over {args.rounds} rounds:")
    print(f"  cat {median['cat']:.3f} s ({total / median['cat'] / 2**30:.2f} GiB/s), check {median['check']:.3f} s "
          f"({total / median['check'] / 2**30:.2f} GiB/s), check/cat {statistics.median(check_ratios):.2f}x, "
          f"--no-check-hashes {median['check_no_hashes'] * 1e3:.2f} ms")
    print(f"  partition {median['partition']:.2f} s, without write-time hashing "
          f"{median['partition_no_hashing']:.2f} s, ratio {statistics.median(partition_ratios):.2f}x")


if __name__ == "__main__":
    main()
