"""Per-rank prefill activation peak and time of a long prompt at cp 1, 2 and 4 (context parallelism, `--cp`).

    .venv/bin/python bench/cp_prefill_memory.py [--seq 4096] [--check]
    .venv/bin/python bench/cp_prefill_memory.py --measure [--seq 2048] [--rounds 3] [--runs 3]

Method: a synthetic LLaMA (models/make_synthetic.py, float32, 4096 positions) is partitioned at tp 1 with
cp 1, 2 and 4 in this one run, the memory plan sized at batch 1 x `--seq` tokens (`--max-seq`); the figures
are each plan's manifest entries for its rank 0 (every cp rank runs the same graph on as many tokens):
the predicted activation peak (liveness over the graph's node order, `plan/memory.py`; the prefill phase
is the peak), the node where it falls, the KV cache and the bytes its collectives move, and the predicted
prefill time on `cpu-here` (this machine's calibrated profile, `plan/cost.py`, collectives included). The ratios are
against cp 1 from the same run.

`--measure`: then each plan's ranks run as real processes under mpiexec (one onnxruntime thread each,
the CPU execution provider, the real custom-op library's AllGathers over MPI), on a prompt of `--seq`
tokens with no past (every cp rank is fed the whole prompt; its graph takes its chunk). Per rank:
- time: the wall time of `session.run` of the prefill, `--runs` runs after one warm-up, their median;
- memory: the growth of the process's peak resident set (VmHWM of /proc/self/status) from just before
  the first prefill run (session made, weights loaded, feeds built) to after the last: what the runs
  allocated at their peak, with onnxruntime's CPU memory arena off (it grows in power-of-two extensions
  and keeps them, which would measure its rounding); the outputs (logits, present cache) are included,
  which the prediction leaves out.
The cp 1, 2 and 4 jobs run in turn inside each of `--rounds` rounds (interleaved, so they see the same
moments of the machine's load); ratios against cp 1 are taken per round, and the table gives their median
and range. cp 4 starts 4 single-threaded ranks: on a 2-core machine they share 2 cores, so its time
measures the scheduler too (the report says so); its memory per rank is still its own.

`--check`: then a prompt of `--check-tokens` tokens is prefilled on the cp 2 x tp 2 plan and decoded, and
the greedy tokens are compared with the original's (`generate --check`): the long-prompt case of issue 14.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = ["--hidden", "256", "--layers", "4", "--heads", "8", "--kv-heads", "4", "--intermediate", "704",
         "--vocab", "2048", "--max-position", "4096", "--dtype", "float32"]
CPS = (1, 2, 4)


def _peak_rss_bytes() -> int:
    """VmHWM: the most resident memory this process has held (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: --measure needs Linux")


def worker(plan_dir: Path, seq: int, runs: int, out: Path) -> None:
    """One rank under mpiexec: its prefill `runs` times after a warm-up; wall times and peak RSS growth."""
    import numpy as np

    from llmir_onnx.plan.manifest import Manifest
    from llmir_onnx.runtime.launch import setup_communication
    from llmir_onnx.runtime.session import load_rank_session

    manifest = Manifest.read(plan_dir)
    comm = setup_communication(expected_world_size=manifest.world_size)
    entry = manifest.rank_entry(comm.rank)
    options = comm.session_options(intra_op_num_threads=1)
    options.inter_op_num_threads = 1
    # without onnxruntime's CPU arena, which grows in power-of-two extensions and keeps them: the RSS peak
    # is then what the run's tensors needed at once (plus the allocator's slack), as the prediction counts
    options.enable_cpu_mem_arena = False
    session = load_rank_session(plan_dir / entry.file, comm.rank, options, ["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    whole: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, 2048, size=(1, seq), dtype=np.int64),
        "attention_mask": np.ones((1, seq), dtype=np.int64),
        "position_ids": np.arange(seq, dtype=np.int64)[None, :],
    }
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            whole[value.name] = np.zeros((1, 4, 0, 32), dtype=np.float32)
    feeds = {b.local: np.ascontiguousarray(b.take(whole[b.original])) for b in entry.inputs}
    names = [output.name for output in session.get_outputs()]
    before = _peak_rss_bytes()
    walls = []
    for index in range(runs + 1):
        start = time.perf_counter()
        session.run(names, feeds)
        if index:
            walls.append(time.perf_counter() - start)
    growth = _peak_rss_bytes() - before
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{comm.rank}.json").write_text(json.dumps({"walls": walls, "rss_growth": growth, "before": before}))


def make_model(folder: Path) -> Path:
    """The synthetic LLaMA of SHAPE, written under `folder`/model; its model.onnx (also cp_decode_cache.py's)."""
    subprocess.run([sys.executable, str(REPO / "models" / "make_synthetic.py"), *SHAPE, "--out",
                    str(folder / "model")], check=True, capture_output=True)  # fmt: skip
    return folder / "model" / "model.onnx"


def run_workers(script: str, label: str, ranks: int, worker_args: list[str], folder: Path) -> list[dict]:
    """`mpiexec -n ranks python script --worker ARGS... folder` (a bench's own worker, one per rank); the
    rankN.json each rank wrote into `folder`, in rank order (also cp_decode_cache.py's)."""
    from llmir_onnx.runtime.job import mpiexec_path

    command = [mpiexec_path(), "-n", str(ranks), sys.executable, script, "--worker", *worker_args, str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if result.returncode:
        raise SystemExit(f"{label} ranks failed (rc {result.returncode}): {result.stderr.strip()[-2000:]}")
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def measure_round(plans: dict[int, Path], seq: int, runs: int, out: Path) -> dict[int, list[dict]]:
    return {cp: run_workers(__file__, f"cp {cp}", cp, [str(plan), str(seq), str(runs)], out / f"cp{cp}")
            for cp, plan in plans.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="prompt tokens the memory plan is sized at")
    parser.add_argument("--check", action="store_true", help="also generate --check a long prompt at cp 2 x tp 2")
    parser.add_argument("--check-tokens", type=int, default=1000)
    parser.add_argument("--measure", action="store_true", help="also measure prefill time and peak RSS per rank")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        plan, seq, runs, out = args.worker
        worker(Path(plan), int(seq), int(runs), Path(out))
        return

    from llmir_onnx.api import partition_to_dir

    with tempfile.TemporaryDirectory(prefix="cp_bench_") as tmp:
        folder = Path(tmp)
        model = make_model(folder)
        print(f"synthetic LLaMA {' '.join(SHAPE)}; batch 1 x {args.seq} new tokens, tp 1")
        rows = []
        plans = {}
        for cp in CPS:
            plans[cp] = folder / f"cp{cp}"
            manifest = partition_to_dir(model, plans[cp], tp=1, cp=cp, max_seq=args.seq, device="cpu-here")
            memory, cost = manifest.ranks[0].memory, manifest.ranks[0].cost
            assert memory is not None and cost is not None
            rows.append((cp, memory, cost))
        base = rows[0][1]["activation_peak_bytes"]
        print(f"{'cp':>3} {'activation peak/rank':>21} {'ratio':>6} {'KV cache':>10} {'collectives':>12}  peak node")
        for cp, memory, _ in rows:
            peak = memory["activation_peak_bytes"]
            print(f"{cp:>3} {peak / 2**20:>17.1f} MiB {peak / base:>6.3f} {memory['kv_cache_bytes'] / 2**20:>6.1f} MiB "
                  f"{memory['communication_bytes'] / 2**20:>8.1f} MiB  {memory['activation_peak_node']} "
                  f"({memory['activation_peak_phase']})")
        if args.measure:
            predicted = {cp: (memory["activation_peak_bytes"], cost["prefill"]["total_s"]) for cp, memory, cost in rows}
            measure(plans, predicted, args, folder / "measured")
        if args.check:
            plan = folder / "cp2tp2"
            partition_to_dir(model, plan, tp=2, cp=2)
            prompt = ",".join(str(1 + (i * 37) % 2000) for i in range(args.check_tokens))
            result = subprocess.run(
                [sys.executable, "-m", "llmir_onnx.cli.main", "generate", str(plan), "--prompt-ids", prompt,
                 "--max-new-tokens", "8", "--check"], capture_output=True, text=True, cwd=REPO,
            )
            print(json.dumps({"check": "cp 2 x tp 2", "prompt_tokens": args.check_tokens, "rc": result.returncode,
                              "stderr_tail": result.stderr.strip().splitlines()[-2:]}))


def measure(plans: dict[int, Path], predicted: dict[int, tuple[int, float]], args: argparse.Namespace,
            out: Path) -> None:
    """The interleaved rounds (see the module docstring) and their table."""
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    rounds = [measure_round(plans, args.seq, args.runs, out / f"round{r}") for r in range(args.rounds)]
    finished = time.strftime("%H:%M:%S UTC", time.gmtime())
    load_after = os.getloadavg()
    print(f"measured {started} - {finished}, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds x {args.runs} prefill runs (+1 warm-up) per rank")

    def per_round(cp: int, pick: str) -> list[float]:
        # a rank's figure per round: the slowest rank's median time (the prefill ends when it does), the
        # largest rank's RSS growth
        if pick == "time":
            return [max(statistics.median(rank["walls"]) for rank in got[cp]) for got in rounds]
        return [float(max(rank["rss_growth"] for rank in got[cp])) for got in rounds]

    print("| cp | ranks on 2 cores | prefill (slowest rank, median of rounds) | ratio vs cp 1 (median, range) "
          "| predicted ratio | peak RSS growth per rank (largest) | ratio vs cp 1 (median, range) "
          "| predicted activation peak | predicted ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_time, base_rss = per_round(1, "time"), per_round(1, "rss")
    for cp in plans:
        times, rss = per_round(cp, "time"), per_round(cp, "rss")
        time_ratios = sorted(t / b for t, b in zip(times, base_time, strict=True))
        rss_ratios = sorted(m / b for m, b in zip(rss, base_rss, strict=True))
        peak, seconds = predicted[cp]
        print(f"| {cp} | {'oversubscribed' if cp > (os.cpu_count() or 1) else 'one core each'} "
              f"| {statistics.median(times):.3f} s | **{statistics.median(time_ratios):.3f}** "
              f"({time_ratios[0]:.3f}-{time_ratios[-1]:.3f}) | {seconds / predicted[1][1]:.3f} "
              f"| {statistics.median(rss) / 2**20:.1f} MiB | **{statistics.median(rss_ratios):.3f}** "
              f"({rss_ratios[0]:.3f}-{rss_ratios[-1]:.3f}) | {peak / 2**20:.1f} MiB | {peak / predicted[1][0]:.3f} |")
    print("per round, per rank (median s, RSS growth MiB):")
    for index, got in enumerate(rounds):
        cells = [
            f"cp {cp}: " + ", ".join(f"{statistics.median(r['walls']):.3f}/{r['rss_growth'] / 2**20:.0f}"
                                     for r in ranks)
            for cp, ranks in got.items()
        ]
        print(f"  round {index}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
