"""Mixed devices on this machine: a plan for a fast and a slow device, predicted vs measured per rank.

    .venv/bin/python bench/mixed_devices.py [--share 0.333] [--runs 12] [--work DIR]

1. Model: a synthetic float32 LLaMA (models/make_synthetic.py): hidden 448, 6 layers, 7 heads (7 KV
   heads), MLP 1344, vocabulary 1000. Seven heads, so that a 3:1 split is not a tie (5,2).
2. Devices: two profiles calibrated now, the same way and at the same time (two processes, as the two
   ranks will be; `bench/calibrate_cpu.py --quick --average`: the mean over >= 1 s of runs per figure,
   onnxruntime's kernels, one thread): `cpu-fast`, the machine as it is, and `cpu-slow`, the machine
   under the duty cycle that emulates the slow device (`--cpu-share SHARE`:
   `llmir_onnx/runtime/throttle.py`, SIGSTOP/SIGCONT in a 10 ms period). Links are cpu-here's.
3. Plans, on a cluster file with rank 0 on cpu-fast and rank 1 on cpu-slow:
   - `tp2`: `partition --tp 2 --devices cluster.json`: the tp weights come from the two profiles'
     memory bandwidths (about 1 / SHARE : 1), so the fast rank gets more heads;
   - `pp2`: `partition --pp 2 --devices cluster.json`: the cuts balance each stage on its own device,
     so the slow stage gets fewer layers.
   Both sized for batch 1 x --max-seq tokens.
4. Each plan is verified through real rank processes (`verify`, with LLMIR_CPU_SHARE=1=SHARE so rank
   1 runs slow there too): every output must match the original.
5. Measured: the two ranks as processes under mpiexec, rank 1 under the duty cycle, each running its
   rank model with onnxruntime's profiler on exactly the inputs the prediction is for: prefill (batch 1
   x max-seq new tokens, no past) and decode (1 token after max-seq - 1), 2 warm-up runs then --runs
   prefill runs and 20 x --runs decode runs. A rank's measured time per run is the sum of its kernels'
   times without the ai.llmir collectives and Send/Recv (their time is mostly waiting for the other
   rank, which the cost model does not predict per rank); the table shows the mean over the runs (a
   duty cycle stretches runs only on average, as in the calibration) and the ratio predicted /
   measured. Predicted: the manifest's per-rank cost on the rank's own profile, total minus
   communication.
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
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from llmir_onnx.plan.devices import CPU_HERE  # noqa: E402
from llmir_onnx.plan.manifest import Manifest  # noqa: E402

COMMUNICATION_OPS = frozenset({"AllReduce", "AllGather", "ReduceScatter", "Send", "Recv"})
PHASES = ("prefill", "decode")
# A decode step lasts a few ms, less than the duty cycle's 10 ms period: only the mean over about a
# second of steps shows the emulated device's speed (as in the calibration), so decode runs 20x as often.
DECODE_RUNS_FACTOR = 20


def calibrate(shares: dict[str, float], work: Path) -> dict[str, dict]:
    """The onnxruntime-calibrated fields of bench/calibrate_cpu.py (averaged) per profile name, each under
    its share of the CPU. The calibrations run at the same time, as the two ranks will: each sees the
    other's load, as its rank will."""
    running = {}
    for name, share in shares.items():
        command = [sys.executable, str(REPO / "bench/calibrate_cpu.py"), "--quick", "--average",
                   "--json", str(work / f"{name}.json")]  # fmt: skip
        if share < 1:
            command += ["--cpu-share", str(share)]
        running[name] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    for name, process in running.items():
        if process.wait() != 0:
            raise SystemExit(f"calibrating {name} failed")
    return {name: json.loads((work / f"{name}.json").read_text()) for name in shares}


def profile_json(name: str, fields: dict, description: str) -> dict:
    return {
        "memory_bytes": CPU_HERE.memory_bytes,
        **fields,
        "link_bandwidth": CPU_HERE.link_bandwidth,
        "link_latency": CPU_HERE.link_latency,
        "devices_per_host": None,
        "host_link": CPU_HERE.host_link,
        "description": description,
    }


def cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "llmir-onnx"), *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return done.stdout


def kernel_times(profile_path: Path, runs: int) -> tuple[list[float], list[float]]:
    """Per run (the last `runs`): seconds in kernels other than communication, and in communication."""
    events = json.loads(profile_path.read_text())
    sessions = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    busy = [0.0] * len(sessions)
    comm = [0.0] * len(sessions)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        for index, (start, end) in enumerate(sessions):
            if start <= event["ts"] <= end:
                if event.get("args", {}).get("op_name") in COMMUNICATION_OPS:
                    comm[index] += event["dur"] * 1e-6
                else:
                    busy[index] += event["dur"] * 1e-6
                break
    return busy, comm


def worker(plan_dir: Path, feeds_dir: Path, out_dir: Path, runs: int) -> None:
    """One rank (under mpiexec): its session on each phase's inputs, profiled."""
    from llmir_onnx.runtime.launch import setup_communication
    from llmir_onnx.runtime.session import load_rank_session

    manifest = Manifest.read(plan_dir)
    comm = setup_communication(expected_world_size=manifest.world_size)  # LLMIR_CPU_SHARE applies here
    entry = manifest.rank_entry(comm.rank)
    result = {}
    for phase in PHASES:
        options = comm.session_options(intra_op_num_threads=1)
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(out_dir / f"rank{comm.rank}_{phase}")
        session = load_rank_session(plan_dir / entry.file, comm.rank, options, ["CPUExecutionProvider"])
        with np.load(feeds_dir / f"{phase}.npz") as data:
            feeds = {b.local: np.ascontiguousarray(b.take(data[b.original])) for b in entry.inputs}
        # every output, so that onnxruntime runs a stage's Send too
        names = [output.name for output in session.get_outputs()]
        walls = []
        count = runs * DECODE_RUNS_FACTOR if phase == "decode" else runs
        for _ in range(2 + count):
            start = time.perf_counter()
            session.run(names, feeds)
            walls.append(time.perf_counter() - start)
        busy, communication = kernel_times(Path(session.end_profiling()), count)
        result[phase] = {"wall": walls[2:], "busy": busy, "comm": communication}
    (out_dir / f"rank{comm.rank}.json").write_text(json.dumps(result))


def measure(plan_dir: Path, feeds_dir: Path, out_dir: Path, runs: int, share: float) -> list[dict]:
    from llmir_onnx.runtime.verify import mpiexec_path

    out_dir.mkdir(parents=True, exist_ok=True)
    world = Manifest.read(plan_dir).world_size
    command = [mpiexec_path(), "-n", str(world), sys.executable, __file__, "--worker", str(plan_dir),
               str(feeds_dir), str(out_dir), str(runs)]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "LLMIR_CPU_SHARE": f"1={share}"}, timeout=600)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


def report(name: str, plan_dir: Path, measured: list[dict], share: float) -> list[str]:
    manifest = Manifest.read(plan_dir)
    shares = manifest.mesh.get("tp_shares")
    lines = []
    for entry in manifest.ranks:
        where = (
            f"heads {shares[entry.coords['tp']]}" if shares else
            f"layers {entry.layers[0]}-{entry.layers[1] - 1}" if entry.layers else "all"
        )  # fmt: skip
        device = manifest.options["devices"]["ranks"][entry.rank]["profile"]
        for phase in PHASES:
            cost = entry.cost[phase]
            predicted = cost["total_s"] - cost["comm_s"]
            got = measured[entry.rank][phase]
            busy = statistics.fmean(got["busy"])
            lines.append(
                f"| {name} | {entry.rank} | {device}{f' (share {share:g})' if entry.rank == 1 else ''} | {where} "
                f"| {phase} | {predicted * 1e3:.2f} ms | {busy * 1e3:.2f} ms (best {min(got['busy']) * 1e3:.2f}) "
                f"| {predicted / busy:.2f} | {statistics.fmean(got['comm']) * 1e3:.2f} ms "
                f"| {statistics.fmean(got['wall']) * 1e3:.2f} ms |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=1 / 3, help="CPU share of the emulated slow device")
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--max-seq", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="keep the models, plans and profiles here")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        plan_dir, feeds_dir, out_dir, runs = args.worker
        worker(Path(plan_dir), Path(feeds_dir), Path(out_dir), int(runs))
        return
    from tests.test_synthetic import make_feeds, synthetic

    work = args.work or Path(tempfile.mkdtemp(prefix="llmir-mixed-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    config = replace(synthetic.PRESETS["tiny"], hidden=448, layers=6, heads=7, kv_heads=7, intermediate=1344,
                     vocab=1000, max_position=args.max_seq)  # fmt: skip
    model = synthetic.generate(config, work / "model")
    feeds_dir = work / "feeds"
    feeds_dir.mkdir(exist_ok=True)
    for phase, (past, seq) in {"prefill": (0, args.max_seq), "decode": (args.max_seq - 1, 1)}.items():
        feeds = make_feeds(config, 1, past, seq)
        feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
        np.savez(feeds_dir / f"{phase}.npz", **feeds)

    calibrated = calibrate({"cpu-fast": 1.0, "cpu-slow": args.share}, work)
    fast, slow = calibrated["cpu-fast"], calibrated["cpu-slow"]
    cluster = {
        "profiles": {
            "cpu-fast": profile_json("cpu-fast", fast, "this machine now, calibrate_cpu.py --quick --average"),
            "cpu-slow": profile_json(
                "cpu-slow", slow, f"this machine under LLMIR_CPU_SHARE {args.share:g}, calibrate_cpu.py --average"
            ),
        },
        "devices": [{"profile": "cpu-fast", "host": "vm"}, {"profile": "cpu-slow", "host": "vm"}],
    }
    (work / "cluster.json").write_text(json.dumps(cluster, indent=1))
    print(f"calibrated: cpu-fast {json.dumps(fast)}")
    print(f"calibrated: cpu-slow {json.dumps(slow)} (share {args.share:g})")

    rows = []
    for name, layout in (("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"])):
        plan_dir = work / name
        printed = cli("partition", str(model), "-o", str(plan_dir), *layout, "--devices", str(work / "cluster.json"),
                      "--max-seq", str(args.max_seq), "--force")  # fmt: skip
        print(f"$ llmir-onnx partition model.onnx -o {name} {' '.join(layout)} --devices cluster.json "
              f"--max-seq {args.max_seq}\n{printed}")  # fmt: skip
        verified = cli("verify", str(plan_dir), env={"LLMIR_CPU_SHARE": f"1={args.share}"})
        print(f"$ LLMIR_CPU_SHARE=1={args.share:g} llmir-onnx verify {name}\n  {verified.strip().splitlines()[-1]}")
        measured = measure(plan_dir, feeds_dir, work / f"{name}-measured", args.runs, args.share)
        rows += report(name, plan_dir, measured, args.share)
    print(f"\n{started}, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs), {args.runs} prefill and {args.runs * DECODE_RUNS_FACTOR} decode runs after 2 "
          "warm-ups each\n")  # fmt: skip
    print("| plan | rank | device | share of the work | phase | predicted (no comm) | measured kernels, mean "
          "| predicted / measured | measured comm, mean | measured run (wall), mean |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
