"""Per-rank KV cache and decode step time of a long context at cp 1, cp 2 with the KV cache replicated, and
cp 2 and cp 4 with it sharded over cp (`partition --cp C --cp-kv-cache sharded`), against the predictions.

    .venv/bin/python bench/cp_decode_cache.py [--seq 4096] [--batch 4] [--rounds 3] [--runs 5]

Method: a synthetic LLaMA (models/make_synthetic.py, the shape of bench/cp_prefill_memory.py: float32, 4
layers, 8 heads, 4 KV heads of 32, 4096 positions) is partitioned at tp 1 in the four layouts in this one
run, at --max-seq `--seq` and --max-batch `--batch`. One decode step is timed where the cache is full:
`--batch` sequences, 1 new token after a past of seq - 1 tokens (random values; the same feeds for every
layout). Each plan's ranks run as real processes under mpiexec (one onnxruntime thread each, the CPU
execution provider, the real custom-op library's collectives over MPI); a rank is fed the original's
feeds as its bindings take them, and with a sharded cache its run of the past (`plan.manifest.cp_cache_runs`,
as verify splits a whole cache: cp rank r holds positions [r*B, (r+1)*B), B = ceil(seq / cp)). Per rank:
- time: the wall time of `session.run` of the step, `--runs` runs after one warm-up, their median;
- KV cache: the bytes of the present.* outputs the step returns (the cache the rank holds from then on).
The four layouts run in turn inside each of `--rounds` rounds (interleaved, so they see the same moments of
the machine's load); a layout's time per round is its slowest rank's median (the step ends when it does),
its ratio against cp 1 taken per round; the table gives the median ratio and the range.

Predicted, per layout: the decode step of the manifest (the cost model on rank 0's model, `plan/cost.py`,
on `cpu-here`, collectives included) and of the layout search (`plan --max-cp`, `plan/layouts.py`, which
never builds a rank model), and the KV cache per rank of each (the manifest's memory plan: its bound).
cp 4 starts 4 single-threaded ranks: on a 2-core machine they share 2 cores, so its time measures the
scheduler too (the table says so); its KV cache per rank is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The prefill bench's model and rank launcher (bench/ is on sys.path: this script's own folder).
from cp_prefill_memory import SHAPE, make_model, run_workers  # noqa: E402

# (label, cp, --cp-kv-cache)
LAYOUTS = (("cp 1", 1, "replicated"), ("cp 2 replicated", 2, "replicated"), ("cp 2 sharded", 2, "sharded"),
           ("cp 4 sharded", 4, "sharded"))  # fmt: skip


def worker(plan_dir: Path, feeds_file: Path, runs: int, out: Path) -> None:
    """One rank under mpiexec: the decode step `runs` times after a warm-up; wall times, present bytes."""
    import numpy as np

    from llmir_onnx.plan.manifest import Manifest
    from llmir_onnx.runtime.launch import setup_communication
    from llmir_onnx.runtime.session import load_rank_session
    from llmir_onnx.runtime.verify import _past_inputs, _rank_part

    manifest = Manifest.read(plan_dir)
    comm = setup_communication(expected_world_size=manifest.world_size)
    entry = manifest.rank_entry(comm.rank)
    options = comm.session_options(intra_op_num_threads=1)
    options.inter_op_num_threads = 1
    session = load_rank_session(plan_dir / entry.file, comm.rank, options, ["CPUExecutionProvider"])
    with np.load(feeds_file) as whole:
        pasts = _past_inputs(manifest)
        feeds = {
            b.local: np.ascontiguousarray(_rank_part(manifest, entry, b, whole[b.original], pasts))
            for b in entry.inputs
        }
    names = [output.name for output in session.get_outputs()]
    walls = []
    outputs = []
    for index in range(runs + 1):
        start = time.perf_counter()
        outputs = session.run(names, feeds)
        if index:
            walls.append(time.perf_counter() - start)
    present = sum(int(array.nbytes) for name, array in zip(names, outputs, strict=True) if name.startswith("present"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{comm.rank}.json").write_text(json.dumps({"walls": walls, "present_bytes": present}))


def measure_round(plans: dict[str, tuple[int, Path]], feeds: Path, runs: int, out: Path) -> dict[str, list[dict]]:
    return {label: run_workers(__file__, label, cp, [str(plan), str(feeds), str(runs)], out / label.replace(" ", "_"))
            for label, (cp, plan) in plans.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="--max-seq: the decode step's past is seq - 1")
    parser.add_argument("--batch", type=int, default=4, help="sequences decoded at once (--max-batch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        plan, feeds, runs, out = args.worker
        worker(Path(plan), Path(feeds), int(runs), Path(out))
        return

    import numpy as np

    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.plan.devices import load_profile
    from llmir_onnx.plan.layouts import enumerate_layouts
    from llmir_onnx.runtime.feeds import FeedSizes, random_feeds

    with tempfile.TemporaryDirectory(prefix="cp_decode_bench_") as tmp:
        folder = Path(tmp)
        model_path = make_model(folder)
        model = load_model(model_path, check_data=False)
        feeds = folder / "feeds.npz"
        np.savez(feeds, **random_feeds(model, FeedSizes(batch=args.batch, new_tokens=1, past_tokens=args.seq - 1)))
        print(f"synthetic LLaMA {' '.join(SHAPE)}; decode: batch {args.batch} x 1 token after {args.seq - 1}, tp 1")
        device = load_profile("cpu-here")
        plans: dict[str, tuple[int, Path]] = {}
        predicted: dict[str, tuple[int, float, int, float]] = {}
        for label, cp, cache in LAYOUTS:
            plan = folder / label.replace(" ", "_")
            manifest = partition_to_dir(model_path, plan, tp=1, cp=cp, cp_kv_cache=cache, max_seq=args.seq,
                                        max_batch=args.batch, device="cpu-here")  # fmt: skip
            memory, cost = manifest.ranks[0].memory, manifest.ranks[0].cost
            assert memory is not None and cost is not None
            layouts = enumerate_layouts(model, cp, device.memory_bytes, device, args.batch, args.seq, max_cp=cp)
            layout = next(lay for lay in layouts if (lay.tp, lay.cp, lay.pp, lay.cp_kv_cache) == (1, cp, 1, cache))
            assert layout.decode_step_s is not None
            predicted[label] = (int(memory["kv_cache_bytes"]), float(cost["decode"]["total_s"]),
                                layout.ranks[0].kv_cache_bytes, layout.decode_step_s)  # fmt: skip
            plans[label] = (cp, plan)
        measure(plans, predicted, feeds, args, folder / "measured")


def measure(
    plans: dict[str, tuple[int, Path]],
    predicted: dict[str, tuple[int, float, int, float]],
    feeds: Path,
    args: argparse.Namespace,
    out: Path,
) -> None:
    """The interleaved rounds (see the module docstring) and their table."""
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rounds = [measure_round(plans, feeds, args.runs, out / f"round{r}") for r in range(args.rounds)]
    finished = time.strftime("%H:%M:%S UTC", time.gmtime())
    load_after = os.getloadavg()
    print(f"measured {started} - {finished}, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds x {args.runs} decode steps (+1 warm-up) per rank")

    def step_times(label: str) -> list[float]:  # per round: the slowest rank's median
        return [max(statistics.median(rank["walls"]) for rank in got[label]) for got in rounds]

    first = next(iter(plans))
    base = step_times(first)
    base_manifest, base_plan = predicted[first][1], predicted[first][3]
    print("| layout | ranks on 2 cores | KV cache per rank (measured, largest) | ratio | planned (manifest; plan) "
          "| decode step (slowest rank, median of rounds) | ratio vs cp 1 (median, range) "
          "| predicted step, manifest (ratio) | predicted step, plan (ratio) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_kv = max(rank["present_bytes"] for rank in rounds[0][first])
    for label, (cp, _) in plans.items():
        kv = max(rank["present_bytes"] for rank in rounds[0][label])
        times = step_times(label)
        ratios = sorted(t / b for t, b in zip(times, base, strict=True))
        manifest_kv, manifest_s, plan_kv, plan_s = predicted[label]
        print(f"| {label} | {'oversubscribed' if cp > (os.cpu_count() or 1) else 'one core each'} "
              f"| {kv / 2**20:.2f} MiB | {kv / base_kv:.3f} | {manifest_kv / 2**20:.2f}; {plan_kv / 2**20:.2f} MiB "
              f"| {statistics.median(times) * 1e3:.2f} ms | **{statistics.median(ratios):.3f}** "
              f"({ratios[0]:.3f}-{ratios[-1]:.3f}) | {manifest_s * 1e3:.2f} ms ({manifest_s / base_manifest:.3f}) "
              f"| {plan_s * 1e3:.2f} ms ({plan_s / base_plan:.3f}) |")
    print("per round, per rank (median ms):")
    for index, got in enumerate(rounds):
        cells = [f"{label}: " + ", ".join(f"{statistics.median(r['walls']) * 1e3:.2f}" for r in ranks)
                 for label, ranks in got.items()]  # fmt: skip
        print(f"  round {index}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
