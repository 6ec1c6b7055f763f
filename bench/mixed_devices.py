"""Mixed devices on this machine: a plan for a fast and a slow device, predicted vs measured per rank.

    .venv/bin/python bench/mixed_devices.py [--emulation stretch|duty] [--stretch 3] [--share 0.333]
        [--runs 12] [--work DIR]

1. Model: a synthetic float32 LLaMA (models/make_synthetic.py): hidden 448, 6 layers, 7 heads (7 KV
   heads), MLP 1344, vocabulary 1000. Seven heads, so that a 3:1 split is not a tie (5,2).
2. Devices: two profiles calibrated now, the same way and at the same time (two processes, as the two
   ranks will be; `bench/calibrate_cpu.py --quick --average`: the mean over >= 1 s of runs per figure,
   onnxruntime's kernels, one thread): `cpu-fast`, the machine as it is, and `cpu-slow`, the machine
   under the emulation of the slow device. `--emulation stretch` (the default): its compute stretched
   by --stretch K (`--compute-stretch K`: `llmir_onnx/runtime/stretch.py`, LLMIR_COMPUTE_STRETCH, the
   ai.llmir library sleeps (K - 1) x the thread's CPU time between collectives); `--emulation duty`,
   the older, wall-clock emulation: the duty cycle of --share (`--cpu-share SHARE`:
   `llmir_onnx/runtime/throttle.py`, SIGSTOP/SIGCONT in a 10 ms period). Links are cpu-here's.
3. Plans, on a cluster file with rank 0 on cpu-fast and rank 1 on cpu-slow:
   - `tp2`: `partition --tp 2 --devices cluster.json`: the tp weights come from the two profiles'
     memory bandwidths (about K : 1 or 1 / SHARE : 1), so the fast rank gets more heads;
   - `pp2`: `partition --pp 2 --devices cluster.json`: the cuts balance each stage on its own device,
     so the slow stage gets fewer layers.
   Both sized for batch 1 x --max-seq tokens.
4. Each plan is verified through real rank processes (`verify`, with LLMIR_COMPUTE_STRETCH=1=K or
   LLMIR_CPU_SHARE=1=SHARE so rank 1 runs slow there too): every output must match the original.
5. Measured: the two ranks as processes under mpiexec, rank 1 under the emulation, each running its
   rank model with onnxruntime's profiler on exactly the inputs the prediction is for: prefill (batch 1
   x max-seq new tokens, no past) and decode (1 token after max-seq - 1), 2 warm-up runs then --runs
   prefill runs and 20 x --runs decode runs. A rank's measured time per run is the sum of its kernels'
   times without the ai.llmir collectives and Send/Recv (their time is mostly waiting for the other
   rank, which the cost model does not predict per rank), less the profiler's own cost per kernel
   (`kernel_times`: the median span of the run's metadata kernels, per kernel), plus, under the
   stretch, the library's stretch sleeps of the run (its comm: the collectives' spans less the sleeps
   at their entries, which lie inside them); the table shows the mean over the runs (a duty cycle
   stretches runs only on average, as in the calibration), the ratio predicted / measured, the kernel
   sum as profiled and the sleeps (with the part that is the profiler's cost stretched). Predicted: the
   manifest's per-rank cost on the rank's own profile, total minus communication.
6. Instrument check, before the plans: the unpartitioned model in one process, unthrottled, an
   unprofiled and a profiled session run alternately: the mean unprofiled wall time per run against
   the profiled kernel sum, raw and corrected as in 5.
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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from llmir_onnx.plan.devices import CPU_HERE  # noqa: E402
from llmir_onnx.plan.manifest import Manifest  # noqa: E402

COMMUNICATION_OPS = frozenset({"AllReduce", "AllGather", "ReduceScatter", "Send", "Recv"})
# Kernels that move no data (onnxruntime aliases or only reads shapes): their profiled span is the
# profiler's own cost per kernel (kernel_times).
METADATA_OPS = ("Reshape", "Unsqueeze", "Squeeze", "Shape", "Flatten", "Identity")
PHASES = ("prefill", "decode")
# A decode step lasts a few ms, less than the duty cycle's 10 ms period: only the mean over about a
# second of steps shows the emulated device's speed (as in the calibration), so decode runs 20x as often.
DECODE_RUNS_FACTOR = 20


def calibrate(emulations: dict[str, list[str]], work: Path) -> dict[str, dict]:
    """The onnxruntime-calibrated fields of bench/calibrate_cpu.py (averaged) per profile name, each under
    its emulation (calibrate_cpu.py's arguments: none, `--compute-stretch K` or `--cpu-share S`). The
    calibrations run at the same time, as the two ranks will: each sees the other's load, as its rank will."""
    running = {}
    for name, emulation in emulations.items():
        command = [sys.executable, str(REPO / "bench/calibrate_cpu.py"), "--quick", "--average",
                   "--json", str(work / f"{name}.json"), *emulation]  # fmt: skip
        running[name] = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    for name, process in running.items():
        if process.wait() != 0:
            raise SystemExit(f"calibrating {name} failed")
    return {name: json.loads((work / f"{name}.json").read_text()) for name in emulations}


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


def kernel_times(profile_path: Path, runs: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per run (the last `runs`): seconds in kernels other than communication, the same less the
    profiler's own cost per kernel, seconds in communication, and the profiler's cost taken out.

    onnxruntime's profiler costs several microseconds inside every kernel span it records (it formats
    the kernel's input and output shapes there), more than a small decode node costs; a decode step's
    hundreds of small kernels then look several milliseconds slower than they run without it. The floor
    of a span is what the profiler takes: the median span of the run's metadata kernels (Reshape,
    Unsqueeze, Shape, ...: no data moves, their own work is a fraction of a microsecond), subtracted
    from each of the run's kernels. main() checks this against unprofiled wall time on the
    unpartitioned model (the instrument check)."""
    events = json.loads(profile_path.read_text())
    sessions = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    spans: list[list[float]] = [[] for _ in sessions]
    floors: list[list[float]] = [[] for _ in sessions]
    comm = [0.0] * len(sessions)
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        for index, (start, end) in enumerate(sessions):
            if start <= event["ts"] <= end:
                op = event.get("args", {}).get("op_name")
                if op in COMMUNICATION_OPS:
                    comm[index] += event["dur"] * 1e-6
                else:
                    spans[index].append(event["dur"] * 1e-6)
                    if op in METADATA_OPS:
                        floors[index].append(event["dur"] * 1e-6)
                break
    missing = [index for index, floor in enumerate(floors) if not floor]
    if missing:
        raise SystemExit(f"{profile_path}: run {missing[0]} has no metadata kernel ({', '.join(METADATA_OPS)}) "
                         "to take the profiler's cost per kernel from")  # fmt: skip
    busy = [sum(run) for run in spans]
    profiler = [len(run) * statistics.median(floor) for run, floor in zip(spans, floors, strict=True)]
    corrected = [sum(run) - cost for run, cost in zip(spans, profiler, strict=True)]
    return busy, corrected, comm, profiler


def instrument_check(model: Path, feeds_dir: Path, out_dir: Path, runs: int) -> list[str]:
    """The unpartitioned model in this process, no throttle: mean unprofiled wall time per run against
    the mean profiled kernel sum, raw and less the profiler's cost per kernel (kernel_times), the two
    sessions' runs interleaved so that both see the same moments of the machine's load."""
    import onnxruntime as ort

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for phase in PHASES:
        sessions = []
        for profiled in (False, True):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.enable_profiling = profiled
            options.profile_file_prefix = str(out_dir / f"original_{phase}")
            sessions.append(ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]))
        plain, profiled_session = sessions
        with np.load(feeds_dir / f"{phase}.npz") as data:
            feeds = {i.name: data[i.name] for i in plain.get_inputs()}
        count = runs * DECODE_RUNS_FACTOR if phase == "decode" else runs
        walls = []
        for index in range(2 + count):
            start = time.perf_counter()
            plain.run(None, feeds)
            if index >= 2:
                walls.append(time.perf_counter() - start)
            profiled_session.run(None, feeds)
        busy, corrected, _, _ = kernel_times(Path(profiled_session.end_profiling()), count)
        wall = statistics.fmean(walls)
        lines.append(
            f"instrument check, original model, {phase}: unprofiled wall {wall * 1e3:.2f} ms; profiled kernels "
            f"{statistics.fmean(busy) * 1e3:.2f} ms ({statistics.fmean(busy) / wall:.2f} x), less the profiler's "
            f"cost per kernel {statistics.fmean(corrected) * 1e3:.2f} ms ({statistics.fmean(corrected) / wall:.2f} x)"
        )
    return lines


class InterleavedCalibration:
    """bench/calibrate_cpu.py's onnxruntime micro-benchmarks (MatMul n = 1024 float32, MatMul [1, 8192] x
    W[8192, 8192], the chain of 400 Mul on [1, 1]), run between a rank's measured runs so that they see
    the same moments of the machine's load and of the rank's duty cycle; each figure is the total work
    over the total time of its runs (a mean, as --average)."""

    def __init__(self, stretched_run: Callable[[], AbstractContextManager[None]] = nullcontext) -> None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("calibrate_cpu", REPO / "bench/calibrate_cpu.py")
        assert spec is not None and spec.loader is not None
        calibrate_cpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(calibrate_cpu)
        from onnx import TensorProto

        self.node_overhead_of = calibrate_cpu.node_overhead_of
        self.benchmarks = {
            "flops": calibrate_cpu.ort_matmul_benchmark(1024, TensorProto.FLOAT, np.float32),
            "bandwidth": calibrate_cpu.ort_gemv_benchmark(8192, 8192),
            "node": calibrate_cpu.node_chain_benchmark(400, 1),
        }
        self.stretched_run = stretched_run  # the rank's compute stretch around each run (none: nullcontext)
        self.work = dict.fromkeys(self.benchmarks, 0.0)
        self.seconds = dict.fromkeys(self.benchmarks, 0.0)
        for run, _ in self.benchmarks.values():
            run()  # warm-up

    def round(self) -> None:
        for name, (run, work) in self.benchmarks.items():
            for _ in range(5 if name == "node" else 1):
                start = time.perf_counter()
                with self.stretched_run():
                    run()
                self.seconds[name] += time.perf_counter() - start
                self.work[name] += work

    def fields(self) -> dict[str, float]:
        rate = {name: self.work[name] / self.seconds[name] for name in self.benchmarks}
        return {"float32": rate["flops"], "memory_bandwidth": rate["bandwidth"],
                "node_overhead": self.node_overhead_of(1 / rate["node"], 1, rate["bandwidth"])}  # fmt: skip


def worker(plan_dir: Path, feeds_dir: Path, out_dir: Path, runs: int) -> None:
    """One rank (under mpiexec): its session on each phase's inputs, profiled, with the calibration's
    micro-benchmarks between chunks of runs."""
    from llmir_onnx.runtime.launch import setup_communication
    from llmir_onnx.runtime.session import load_rank_session

    manifest = Manifest.read(plan_dir)
    # LLMIR_COMPUTE_STRETCH / LLMIR_CPU_SHARE apply here
    comm = setup_communication(expected_world_size=manifest.world_size)
    stretch = comm.compute_stretch
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
        # Under the compute stretch, per run: the library's sleeps at its kernels' entries (inside their
        # profiled spans) and in all (those plus the stretch point's after the run's last collective).
        slept_in_kernels: list[float] = []
        slept: list[float] = []
        calibration = InterleavedCalibration(comm.stretched_run)
        chunk = DECODE_RUNS_FACTOR if phase == "decode" else 1
        for _ in range(2):
            with comm.stretched_run():
                session.run(names, feeds)
        for _ in range(runs):  # `runs` rounds: a chunk of measured runs, then the micro-benchmarks
            for _ in range(chunk):
                start = time.perf_counter()
                if stretch is None:
                    session.run(names, feeds)
                    walls.append(time.perf_counter() - start)
                    slept_in_kernels.append(0.0)
                    slept.append(0.0)
                    continue
                before = stretch.totals()["slept_s"]
                stretch.start()
                session.run(names, feeds)
                in_kernels = stretch.totals()["slept_s"]
                after = stretch.point()
                walls.append(time.perf_counter() - start)
                slept_in_kernels.append(in_kernels - before)
                slept.append(after - before)
            calibration.round()
        busy, corrected, communication, profiler = kernel_times(Path(session.end_profiling()), runs * chunk)
        result[phase] = {"wall": walls, "busy": busy, "corrected": corrected, "comm": communication,
                         "profiler": profiler, "stretch": stretch.factor if stretch else 1.0,
                         "slept": slept, "slept_in_kernels": slept_in_kernels,
                         "calibrated": calibration.fields()}  # fmt: skip
    (out_dir / f"rank{comm.rank}.json").write_text(json.dumps(result))


def interleaved_prediction(plan_dir: Path, rank: int, phase: str, profile: dict, calibrated: dict) -> float:
    """The cost model's time (no communication) of one rank's model and phase on its profile with the
    figures calibrated between its measured runs in place of the ones calibrated before partitioning."""
    import onnx_ir as ir

    from llmir_onnx.plan.cost import estimate_phases
    from llmir_onnx.plan.devices import profile_from_dict

    manifest = Manifest.read(plan_dir)
    fields = {
        **profile,
        "peak_flops": {**profile["peak_flops"], "float32": calibrated["float32"]},
        "memory_bandwidth": calibrated["memory_bandwidth"],
        "node_overhead": calibrated["node_overhead"],
    }
    device = profile_from_dict(fields)
    model = ir.load(str(plan_dir / manifest.rank_entry(rank).file))
    estimate = getattr(estimate_phases(model, device, 1, manifest.options["max_seq"]), phase)
    return estimate.total_s - estimate.comm_s


def measure(plan_dir: Path, feeds_dir: Path, out_dir: Path, runs: int, slow_env: dict[str, str]) -> list[dict]:
    from llmir_onnx.runtime.job import mpiexec_path

    out_dir.mkdir(parents=True, exist_ok=True)
    world = Manifest.read(plan_dir).world_size
    command = [mpiexec_path(), "-n", str(world), sys.executable, __file__, "--worker", str(plan_dir),
               str(feeds_dir), str(out_dir), str(runs)]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, **slow_env}, timeout=600)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


def report(name: str, plan_dir: Path, measured: list[dict], slow_label: str, profiles: dict[str, dict]) -> list[str]:
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
            # a stretched rank's compute: its kernels (less profiler cost) and the stretch's sleeps of the
            # run; its comm: the collectives' spans less the sleeps at their entries (inside the spans)
            computed = [kernels + sleeps for kernels, sleeps in zip(got["corrected"], got["slept"], strict=True)]
            communicated = [spans - sleeps for spans, sleeps in zip(got["comm"], got["slept_in_kernels"], strict=True)]
            busy = statistics.fmean(computed)
            # the stretch stretches all of the thread's CPU time, the profiler's cost per kernel too:
            # that part of the sleeps (shown) stays in the measured compute, by its definition (docs/BENCHMARKS.md)
            stretched_profiler = (
                f" (of which the profiler's cost x {got['stretch'] - 1:g}: "
                f"{(got['stretch'] - 1) * statistics.fmean(got['profiler']) * 1e3:.2f} ms)"
                if got["stretch"] > 1 else ""
            )  # fmt: skip
            profile = {"name": device, **profiles[device]}
            # the same cost model on the profile the manifest used must give the manifest's figure
            again = interleaved_prediction(plan_dir, entry.rank, phase, profile,
                                           {"float32": profile["peak_flops"]["float32"], **profile})  # fmt: skip
            if abs(again - predicted) > 1e-9 + 1e-6 * predicted:
                raise SystemExit(f"{name} rank {entry.rank} {phase}: re-estimated {again} s, manifest {predicted} s")
            interleaved = interleaved_prediction(plan_dir, entry.rank, phase, profile, got["calibrated"])
            lines.append(
                f"| {name} | {entry.rank} | {device}{f' ({slow_label})' if entry.rank == 1 else ''} | {where} "
                f"| {phase} | {predicted * 1e3:.2f} ms | {busy * 1e3:.2f} ms (best {min(computed) * 1e3:.2f}) "
                f"| {predicted / busy:.2f} | {interleaved * 1e3:.2f} ms | {interleaved / busy:.2f} "
                f"| {statistics.fmean(got['busy']) * 1e3:.2f} ms | {statistics.fmean(got['slept']) * 1e3:.2f} ms"
                f"{stretched_profiler} "
                f"| {statistics.fmean(communicated) * 1e3:.2f} ms | {statistics.fmean(got['wall']) * 1e3:.2f} ms |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulation", choices=("stretch", "duty"), default="stretch",
                        help="how rank 1 emulates the slow device: LLMIR_COMPUTE_STRETCH (its compute stretched, "
                        "the default) or LLMIR_CPU_SHARE (the older duty cycle, wall time)")  # fmt: skip
    parser.add_argument("--stretch", type=float, default=3.0, help="compute stretch of the slow device (stretch)")
    parser.add_argument("--share", type=float, default=1 / 3, help="CPU share of the slow device (duty)")
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

    if args.emulation == "stretch":
        slow_env = {"LLMIR_COMPUTE_STRETCH": f"1={args.stretch!r}"}
        slow_calibration = ["--compute-stretch", repr(args.stretch)]
        slow_label = f"stretch {args.stretch:g}"
    else:
        slow_env = {"LLMIR_CPU_SHARE": f"1={args.share!r}"}
        slow_calibration = ["--cpu-share", repr(args.share)]
        slow_label = f"share {args.share:g}"
    calibrated = calibrate({"cpu-fast": [], "cpu-slow": slow_calibration}, work)
    fast, slow = calibrated["cpu-fast"], calibrated["cpu-slow"]
    cluster = {
        "profiles": {
            "cpu-fast": profile_json("cpu-fast", fast, "this machine now, calibrate_cpu.py --quick --average"),
            "cpu-slow": profile_json(
                "cpu-slow", slow, f"this machine under {' '.join(f'{k}={v}' for k, v in slow_env.items())}, "
                f"calibrate_cpu.py --quick --average {' '.join(slow_calibration)}"
            ),
        },
        "devices": [{"profile": "cpu-fast", "host": "vm"}, {"profile": "cpu-slow", "host": "vm"}],
    }
    (work / "cluster.json").write_text(json.dumps(cluster, indent=1))
    print(f"calibrated: cpu-fast {json.dumps(fast)}")
    print(f"calibrated: cpu-slow {json.dumps(slow)} ({slow_label})")

    checks = instrument_check(model, feeds_dir, work / "instrument", args.runs)
    rows = []
    for name, layout in (("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"])):
        plan_dir = work / name
        printed = cli("partition", str(model), "-o", str(plan_dir), *layout, "--devices", str(work / "cluster.json"),
                      "--max-seq", str(args.max_seq), "--force")  # fmt: skip
        print(f"$ llmir-onnx partition model.onnx -o {name} {' '.join(layout)} --devices cluster.json "
              f"--max-seq {args.max_seq}\n{printed}")  # fmt: skip
        verified = cli("verify", str(plan_dir), env=slow_env)
        shown_env = " ".join(f"{key}={value}" for key, value in slow_env.items())
        print(f"$ {shown_env} llmir-onnx verify {name}\n  {verified.strip().splitlines()[-1]}")
        measured = measure(plan_dir, feeds_dir, work / f"{name}-measured", args.runs, slow_env)
        rows += report(name, plan_dir, measured, slow_label, cluster["profiles"])
    print(f"\n{started}, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} CPUs), {args.runs} prefill and {args.runs * DECODE_RUNS_FACTOR} decode runs after 2 "
          "warm-ups each\n")  # fmt: skip
    print("\n".join(checks) + "\n")
    print("| plan | rank | device | share of the work | phase | predicted (manifest, no comm) | measured kernels less "
          "profiler cost plus stretch sleeps, mean | manifest / measured | predicted on the interleaved calibration "
          "| interleaved / measured | kernels as profiled, mean | stretch sleeps, mean | measured comm less stretch "
          "sleeps, mean | measured run (wall), mean |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
