"""Calibrate the `cpu-here` device profile on this machine, single-threaded.

    .venv/bin/python bench/calibrate_cpu.py [--quick]

Measures, with one thread (OMP/OpenBLAS/MKL threads = 1, onnxruntime intra_op_num_threads = 1):

- float32 matmul FLOP/s with numpy (n x n @ n x n, 2 n^3 FLOPs), best of several runs, for n = 512,
  1024, 2048; and the same with an onnxruntime MatMul (MLAS), float32 and float16;
- memory bandwidth: numpy `np.copyto` of a 256 MiB float32 array counted as 2 x 256 MiB moved (read +
  write), `sum` of it (256 MiB read) and a float32 matrix-vector product over it (8192 x 8192: 256 MiB
  of matrix read), best of several runs; the profile takes the matrix-vector figure (decode is weight
  streaming through matrix-vector products); and an onnxruntime MatMul [1, 8192] x W (W an initializer);
- the last-level cache: its size read from /sys/devices/system/cpu/cpu0/cache (the highest level that
  holds data), and its bandwidth the way the memory bandwidth is measured, but on an activation that fits:
  a chain of 20 onnxruntime `Mul` nodes (graph optimizations off) on a float32 tensor of 1/8 of the cache
  (32 MiB here: 4 MiB, more than the 512 KiB L2; each node's input and output together 1/4 of the cache),
  each node multiplying by a scalar initializer, counted as the cost model counts it (input + output +
  the scalar per node) over the run time less the node overhead below: the profile's `cache_bytes` and
  `cache_bandwidth`;
- onnxruntime's per-node cost on small tensors, the profile's `node_overhead`, on the op mix of a decode
  step: a decode step (past 15) of a synthetic LLaMA decoder (models/make_synthetic.py, hidden 32, 2
  layers, 4 heads, 2 KV heads, every tensor a few KB) with onnxruntime's default graph optimizations, as a
  rank's session runs it: its MatMul / Add / Mul / Gather / Transpose / Concat / Softmax / normalization
  nodes and the Shape / Gather / Unsqueeze / Concat / Reshape chains that compute its dynamic shapes, at
  sizes where their time is dispatch. Its run time less the cost model's roofline of its nodes (a few
  us), over the nodes the cost model charges an overhead (`estimate_time`: all but FREE_OPS; onnxruntime
  runs the "free" ones too, and fuses some others, so the figure is per counted node of such a graph).
  Until 2026-12-04 it was a chain of 400 `Mul` nodes on [1, 1] float32 (graph optimizations off), one
  kernel hot in every cache: about half what a real decode graph's node costs (docs/BENCHMARKS.md, "Why
  decode is predicted too fast"); that figure is still printed (and written by --json-mul-chain). For
  comparison the same chain on a [1, 512] row. Measured with the session's own clock, not onnxruntime's
  profiler: the profiler adds several microseconds to every node it times (docs/BENCHMARKS.md, "Mixed
  devices"), more than such a node costs;
- what a run costs once when it starts with cold caches, the profile's `run_overhead`: a run of a 1-node
  graph (one `Mul` on [1, 1]) right after 2 x the last-level cache of other data streamed through this
  thread (a numpy multiply, not timed), less the same run right after it (warm), the two timed
  alternately: the runtime's code and per-run state fetched back, which node_overhead (measured back to
  back) does not hold. A rank's run starts cold: the other ranks on its cores, the caller's work and the
  step's own weights evict the caches between two runs (docs/BENCHMARKS.md, "A rank's decode step starts
  cold");
- the rate at which a MatMul reads a weight of a given size, the profile's `weight_bandwidth`: per size
  (64 KiB, 256 KiB, 1, 4, 16, 64 MiB) a chain of [1, k] x W[k, k] MatMuls (k = sqrt(size / 4)) with
  distinct weights, as many as make 2 x the last-level cache (so each weight is read from memory, as a
  decode step's are after every other weight streamed through), default graph optimizations; per size the
  weight's bytes over (the run time per MatMul less node_overhead), relative to the [1, 8192] x W MatMul
  timed alternately with it (the same moments of a shared machine), times that MatMul's figure above; and
  256 MiB from it. Where a small matrix-vector product streams its weight slower than the large one, the
  curve shows it.

Best-of timings: the machine is shared, and the best run is the one least disturbed by others.
`--clock cpu` times each run by the ai.llmir library's compute meter instead of the wall clock: the
calling thread's CPU time (every run is on it: one thread), plus the stretch's sleeps under
`--compute-stretch K` (k x the CPU time): the clock bench/mixed_devices.py measures the ranks with, which
a busy neighbour's preemption does not advance (shared memory bandwidth and caches still count).

Prints a table and two sets of profile fields: onnxruntime-calibrated (its own MatMul kernels, the
runtime the cost model predicts: the built-in `cpu-here` in `llmir_onnx/plan/devices.py`) and
numpy-calibrated (`bench/profiles/cpu-here-numpy.json`); `bench/cost_vs_measured.py` reports the
error of both.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from llmir_onnx.runtime.stretch import ComputeMeter  # noqa: E402

# --average (implied by --cpu-share): the mean over runs that together last AVERAGE_S at least, not the best
AVERAGE = False
AVERAGE_S = 1.0
# The ai.llmir library's compute meter (llmir_onnx/runtime/stretch.py), set under --clock cpu or
# --compute-stretch: every timed run is bracketed by its start and point, so under the stretch the run
# takes as long as on the emulated device.
METER: ComputeMeter | None = None
# --clock: "wall" (perf_counter around each run) or "cpu" (the meter's device time of each run: the thread's
# CPU time, plus the stretch's sleeps under --compute-stretch; what bench/mixed_devices.py measures of a rank)
CLOCK = "wall"


def metered(run: Callable[[], object]) -> Callable[[], object]:
    """`run` bracketed by the compute meter's start and point when there is one; `run` itself otherwise."""
    if METER is None:
        return run
    meter = METER

    def metered_run() -> object:
        meter.start()
        result = run()
        meter.point()
        return result

    return metered_run


def clock() -> float:
    """Seconds on the --clock: wall time, or the meter's device time so far."""
    if CLOCK == "cpu":
        assert METER is not None
        return METER.device_seconds()
    return time.perf_counter()


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    run = metered(run)
    run()
    if AVERAGE:
        # Under a duty cycle a short run may fall inside an "on" window: only a mean over many periods
        # shows the emulated device's speed.
        count, start, measured = 0, time.perf_counter(), clock()
        while count < repeats or time.perf_counter() - start < AVERAGE_S:
            run()
            count += 1
        return (clock() - measured) / count
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def paired_seconds(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """`best_seconds` of two runs timed alternately (a run of one, then a run of the other), so that both
    see the same moments of a shared machine: the best of each, or under --average the mean of each over
    at least AVERAGE_S of both."""
    first, second = metered(first), metered(second)
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    while len(times[0]) < repeats or (AVERAGE and time.perf_counter() - started < AVERAGE_S):
        for run, spent in ((first, times[0]), (second, times[1])):
            start = clock()
            run()
            spent.append(clock() - start)
    if AVERAGE:
        return sum(times[0]) / len(times[0]), sum(times[1]) / len(times[1])
    return min(times[0]), min(times[1])


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def weights_session(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    weights: list[tuple[str, Callable[[], np.ndarray]]],
) -> ort.InferenceSession:
    """A session (as `session`) of a graph whose float32 initializers (name, a function making it) are written
    one at a time into an external data file that onnxruntime reads: the process never holds a weight twice
    (a 256 MiB weight in a ModelProto took 1.1 GB at peak: the array, the proto, its serialized bytes and
    onnxruntime's copy; the machine is shared and short of memory)."""
    initializers = []
    with tempfile.TemporaryDirectory(prefix="llmir-calibrate-") as tmp:
        with open(f"{tmp}/weights.bin", "wb") as data:
            for name, make in weights:
                array = np.ascontiguousarray(make(), np.float32)
                offset = data.tell()
                array.tofile(data)
                data.write(b"\0" * (-data.tell() % 4096))  # page-aligned offsets
                initializer = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                                          data_location=TensorProto.EXTERNAL)  # fmt: skip
                for key, value in (("location", "weights.bin"), ("offset", offset), ("length", array.nbytes)):
                    entry = initializer.external_data.add()
                    entry.key, entry.value = key, str(value)
                initializers.append(initializer)
                del array
        graph = helper.make_graph(nodes, "weights", inputs, outputs, initializer=initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10
        onnx.save(model, f"{tmp}/model.onnx")
        return session(Path(f"{tmp}/model.onnx"))


def ort_matmul_benchmark(n: int, elem: int, np_dtype: type[np.generic]) -> tuple[Callable[[], object], float]:
    """(one run, its FLOPs) of an onnxruntime MatMul n x n @ n x n."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "mm",
        [helper.make_tensor_value_info("a", elem, [n, n]), helper.make_tensor_value_info("b", elem, [n, n])],
        [helper.make_tensor_value_info("c", elem, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    sess = session(model)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n)).astype(np_dtype), "b": rng.standard_normal((n, n)).astype(np_dtype)}
    return (lambda: sess.run(None, feeds)), 2.0 * n**3


def ort_matmul_flops(n: int, elem: int, np_dtype: type[np.generic], repeats: int) -> float:
    run, flops = ort_matmul_benchmark(n, elem, np_dtype)
    return flops / best_seconds(run, repeats)


def node_chain_benchmark(nodes: int, width: int) -> tuple[Callable[[], object], int]:
    """(one run, its node count) of a chain of `nodes` elementwise Mul nodes on float32 [1, width], graph
    optimizations off so that every node runs."""
    return _mul_chain_run(nodes, [1, width], np.full((1, width), 0.5, np.float32)), nodes


def _mul_chain_run(nodes: int, shape: list[int], half: np.ndarray) -> Callable[[], object]:
    """One run of a chain of `nodes` Mul nodes on float32 `shape`, each by the initializer `half`, in a
    1-thread session with graph optimizations off so that every node runs."""
    names = ["x"] + [f"t{i}" for i in range(nodes)]
    graph = helper.make_graph(
        [helper.make_node("Mul", [names[i], "half"], [names[i + 1]]) for i in range(nodes)],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, shape)],
        initializer=[onnx.numpy_helper.from_array(half, "half")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones(shape, np.float32)}
    return lambda: sess.run(None, feeds)


def last_level_cache_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """Size of CPU 0's last-level cache: the highest level whose type is Unified or Data, in bytes."""
    levels: list[tuple[int, int]] = []
    for index in sorted(cpu.glob("index*")):
        if (index / "type").read_text().strip() not in ("Unified", "Data"):
            continue
        size = (index / "size").read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        number = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        levels.append((int((index / "level").read_text()), number))
    if not levels:
        raise SystemExit(f"no data cache listed under {cpu}; cannot calibrate cache_bytes on this machine")
    return max(levels)[1]


def cache_chain_benchmark(nodes: int, numel: int) -> tuple[Callable[[], object], float]:
    """(one run, the bytes the cost model counts for it) of a chain of `nodes` Mul nodes on float32 [numel],
    each by a scalar initializer, graph optimizations off so that every node runs: per node its input, the
    scalar and its output, activations that stay in the cache when `numel` floats fit."""
    return _mul_chain_run(nodes, [numel], np.array([0.5], np.float32)), float(nodes * (2 * numel * 4 + 4))


def cache_bandwidth_of(seconds: float, moved: float, nodes: int, overhead: float) -> float:
    """Bytes/s of a cache chain run: its bytes over its time less the per-node overhead of its nodes."""
    return moved / max(seconds - nodes * overhead, 1e-12)


CACHE_CHAIN_NODES = 20


def cache_chain_numel(cache_bytes: int) -> int:
    """float32 elements of the cache chain's tensor: 1/8 of the cache (input + output: 1/4 of it)."""
    return cache_bytes // 8 // 4


def cache_flush(cache_bytes: int) -> Callable[[], object]:
    """A function that streams 2 x `cache_bytes` of other data through this thread's caches (reads one array
    of `cache_bytes`, writes another): what a run finds after other work used the machine."""
    source = np.ones(max(1, cache_bytes // 4), np.float32)
    target = np.empty_like(source)
    return lambda: np.multiply(source, 1.0, out=target)


def cold_and_warm_seconds(run: Callable[[], object], flush: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(a run right after `flush`, the same run right after that one), timed alternately on the --clock (the
    flush not timed): the best of each, or under --average the mean of each over at least AVERAGE_S."""
    run = metered(run)
    run()
    cold: list[float] = []
    warm: list[float] = []
    started = time.perf_counter()
    while len(cold) < repeats or (AVERAGE and time.perf_counter() - started < AVERAGE_S):
        flush()
        for spent in (cold, warm):
            start = clock()
            run()
            spent.append(clock() - start)
    if AVERAGE:
        return sum(cold) / len(cold), sum(warm) / len(warm)
    return min(cold), min(warm)


def run_overhead_of(cold: float, warm: float) -> float:
    """The cost of a run's cold start: a cold run less the same run warm (its nodes cost the same in both)."""
    return max(cold - warm, 0.0)


def node_overhead_of(per_node: float, width: int, bandwidth: float) -> float:
    """A chain node's seconds less the memory time the cost model charges it separately (two inputs read,
    one output written, over `bandwidth`): the per-node overhead."""
    return max(per_node - 3 * width * 4 / bandwidth, 0.0)


def node_overhead(nodes: int, width: int, repeats: int, bandwidth: float) -> tuple[float, float]:
    """(per-node seconds, the same less the cost model's memory time of the node) of node_chain_benchmark."""
    run, count = node_chain_benchmark(nodes, width)
    per_node = best_seconds(run, repeats) / count
    return per_node, node_overhead_of(per_node, width, bandwidth)


# The decoder whose decode step calibrates node_overhead: every tensor a few KB, so its time is dispatch
# (models/make_synthetic.py's SyntheticConfig fields); a decode step after DISPATCH_PAST tokens.
DISPATCH_DECODER = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 64, "vocab": 64,
                    "dtype": "float32", "max_position": 32}  # fmt: skip
DISPATCH_PAST = 15


def decoder_dispatch_benchmark(work: Path) -> tuple[Callable[[], object], int, float]:
    """(one decode step of the DISPATCH_DECODER written into `work`, the nodes the cost model charges an
    overhead, the step's bytes the cost model charges) in a 1-thread session with default optimizations."""
    import onnx_ir as ir

    from llmir_onnx.plan.cost import FREE_OPS, node_costs
    from llmir_onnx.plan.shapes import Sizes

    # models/ is no package; its generator is imported as the module the tests load it as (make_synthetic).
    if str(REPO / "models") not in sys.path:
        sys.path.insert(0, str(REPO / "models"))
    import make_synthetic

    config = make_synthetic.SyntheticConfig(**DISPATCH_DECODER)
    path = make_synthetic.generate(config, work)
    costs = node_costs(ir.load(str(path)), Sizes(batch=1, seq=1, past=DISPATCH_PAST))
    counted = sum(1 for cost in costs if cost.op_type not in FREE_OPS)
    moved = float(sum(cost.bytes for cost in costs))
    sess = session(onnx.load(str(path)))
    head_dim = config.hidden // config.heads
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([[1]], np.int64),
        "attention_mask": np.ones((1, DISPATCH_PAST + 1), np.int64),
        "position_ids": np.array([[DISPATCH_PAST]], np.int64),
    }
    rng = np.random.default_rng(0)
    for layer in range(config.layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (1, config.kv_heads, DISPATCH_PAST, head_dim)
            ).astype(np.float32)
    return (lambda: sess.run(None, feeds)), counted, moved


def decoder_node_overhead(seconds: float, counted: int, moved: float, bandwidth: float) -> float:
    """A dispatch decoder step's seconds less its bytes at `bandwidth` (the roofline, a few us), per counted node."""
    return max(seconds - moved / bandwidth, 0.0) / counted


# The weight sizes the weight_bandwidth curve is measured at below 256 MiB (which is the [1, 8192] MatMul's).
WEIGHT_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)


def weight_chain_benchmark(size: int, total: int) -> tuple[Callable[[], object], int]:
    """(one run, its MatMul count) of a chain x @ W1 @ W2 ... of [1, k] x W[k, k] float32 MatMuls, k = sqrt(size
    / 4), with distinct weights of `size` bytes each, at least `total` bytes of them (and at least one)."""
    k = round((size // 4) ** 0.5)
    count = max(1, -(-total // size))
    rng = np.random.default_rng(0)
    names = ["x"] + [f"y{i}" for i in range(count)]
    sess = weights_session(
        [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(count)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, k])],
        # scaled so that a product keeps the vector's norm about the same along the chain
        [(f"w{i}", lambda: rng.standard_normal((k, k), np.float32) / np.float32(k**0.5)) for i in range(count)],
    )
    feeds = {"x": np.ones((1, k), np.float32)}
    return (lambda: sess.run(None, feeds)), count


def weight_rate_of(per_matmul: float, size: int, overhead: float) -> float:
    """Bytes/s of a weight of `size` bytes read by one MatMul taking `per_matmul` s, its node overhead off."""
    return size / max(per_matmul - overhead, 1e-12)


def ort_gemv_benchmark(k: int, n: int) -> tuple[Callable[[], object], float]:
    """(one run, the weight bytes it streams) of an onnxruntime MatMul [1, k] x W[k, n], W an initializer
    as in decode."""
    sess = weights_session(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [("w", lambda: np.random.default_rng(0).standard_normal((k, n), np.float32))],
    )
    feeds = {"x": np.ones((1, k), np.float32)}
    return (lambda: sess.run(None, feeds)), float(k * n * 4)


def ort_gemv_bandwidth(k: int, n: int, repeats: int) -> float:
    """Bytes/s of weights streamed by an onnxruntime MatMul [1, k] x W[k, n] (W an initializer, as in decode)."""
    run, moved = ort_gemv_benchmark(k, n)
    return moved / best_seconds(run, repeats)


def numpy_bandwidths(size: int, repeats: int, rows: list[tuple[str, str]]) -> float:
    """numpy's copy, sum and matrix-vector product over `size` bytes of float32 (rows appended); returns the
    matrix-vector product's bytes/s."""
    src = np.ones(size // 4, np.float32)
    dst = np.empty_like(src)
    copy_bandwidth = 2 * size / best_seconds(lambda: np.copyto(dst, src), repeats)
    rows.append(("numpy copyto 256 MiB (read + write)", f"{copy_bandwidth / 1e9:.2f} GB/s"))
    read_bandwidth = size / best_seconds(lambda: src.sum(), repeats)
    rows.append(("numpy sum 256 MiB (read)", f"{read_bandwidth / 1e9:.2f} GB/s"))
    matrix = src.reshape(8192, -1)
    vector = np.ones(matrix.shape[1], np.float32)
    gemv_bandwidth = size / best_seconds(lambda: matrix @ vector, repeats)
    rows.append(("numpy matrix-vector 8192 x 8192 (matrix bytes)", f"{gemv_bandwidth / 1e9:.2f} GB/s"))
    return gemv_bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--cpu-share",
        type=float,
        default=1.0,
        help="run under the duty cycle of LLMIR_CPU_SHARE (llmir_onnx/runtime/throttle.py) with this share, to "
        "calibrate an emulated slower device; implies --average",
    )
    parser.add_argument(
        "--compute-stretch",
        type=float,
        default=1.0,
        help="calibrate the device that LLMIR_COMPUTE_STRETCH emulates with this factor (>= 1; "
        "llmir_onnx/runtime/stretch.py): each run is stretched by the ai.llmir library's stretch point",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time each run by the wall clock (default) or by the ai.llmir library's compute meter: the thread's "
        "CPU time, plus the stretch's sleeps under --compute-stretch (what bench/mixed_devices.py measures of a rank; "
        "a process preempted by another job does not advance it)",
    )
    parser.add_argument("--average", action="store_true", help="mean over >= 1 s of runs instead of the best run")
    parser.add_argument("--json", type=str, default=None, help="write the onnxruntime-calibrated fields here")
    parser.add_argument(
        "--json-mul-chain",
        type=str,
        default=None,
        help="write {\"node_overhead\": the 400-Mul chain's figure} here (the node_overhead before 2026-12-04, "
        "for before/after comparisons)",
    )
    args = parser.parse_args()
    global AVERAGE, METER, CLOCK
    AVERAGE = args.average or args.cpu_share < 1
    CLOCK = args.clock
    if args.compute_stretch < 1:
        raise SystemExit(f"--compute-stretch {args.compute_stretch:g}: the factor must be >= 1")
    if args.cpu_share < 1 and args.clock == "cpu":
        raise SystemExit("--cpu-share with --clock cpu: a stopped process uses no CPU time, so the duty cycle "
                         "does not show on that clock; use --clock wall")  # fmt: skip
    if args.compute_stretch > 1 or args.clock == "cpu":
        from llmir_onnx.runtime.launch import setup_communication
        from llmir_onnx.runtime.stretch import COMPUTE_STRETCH_ENV

        # this process alone is world rank 0 (no launcher)
        if args.compute_stretch > 1:
            os.environ[COMPUTE_STRETCH_ENV] = f"0={args.compute_stretch!r}"
        else:
            os.environ.pop(COMPUTE_STRETCH_ENV, None)
        METER = setup_communication().compute_meter
        assert METER is not None and METER.stretched == (args.compute_stretch > 1)
    if args.cpu_share < 1:
        from llmir_onnx.runtime.throttle import throttle_process

        throttle_process(os.getpid(), args.cpu_share)
    repeats = 3 if args.quick else 15
    rng = np.random.default_rng(0)
    rows = []
    numpy_flops, ort_flops = {}, {}
    for n in (512, 1024, 2048):
        a = rng.standard_normal((n, n)).astype(np.float32)
        b = rng.standard_normal((n, n)).astype(np.float32)
        numpy_flops[n] = 2 * n**3 / best_seconds(lambda a=a, b=b: a @ b, repeats)
        rows.append((f"numpy float32 matmul n={n}", f"{numpy_flops[n] / 1e9:.1f} GFLOP/s"))
    for n in (512, 1024, 2048):
        ort_flops[n] = ort_matmul_flops(n, TensorProto.FLOAT, np.float32, repeats)
        rows.append((f"onnxruntime float32 MatMul n={n}", f"{ort_flops[n] / 1e9:.1f} GFLOP/s"))
    fp16 = ort_matmul_flops(1024, TensorProto.FLOAT16, np.float16, max(2, repeats // 2))
    rows.append(("onnxruntime float16 MatMul n=1024", f"{fp16 / 1e9:.1f} GFLOP/s"))

    size = 256 << 20
    # numpy's arrays (512 MiB) are freed on return, before the onnxruntime sessions below (a shared machine)
    gemv_bandwidth = numpy_bandwidths(size, repeats, rows)
    ort_gemv = ort_gemv_bandwidth(8192, 8192, repeats)
    rows.append(("onnxruntime MatMul [1, 8192] x W[8192, 8192] (W bytes)", f"{ort_gemv / 1e9:.2f} GB/s"))
    per_node, mul_chain_overhead = node_overhead(400, 1, repeats * 3, ort_gemv)
    rows.append(("onnxruntime per node, 400 Mul on [1, 1]", f"{per_node * 1e6:.2f} us"))
    rows.append(("  minus its 12 bytes / MatMul bandwidth (node_overhead until 2026-12-04)",
                 f"{mul_chain_overhead * 1e6:.2f} us"))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        decoder_run, counted, decoder_bytes = decoder_dispatch_benchmark(Path(tmp))
        decoder_seconds = best_seconds(decoder_run, repeats * 3)
    overhead = decoder_node_overhead(decoder_seconds, counted, decoder_bytes, ort_gemv)
    rows.append((f"onnxruntime decode step of a tiny decoder (past {DISPATCH_PAST})",
                 f"{decoder_seconds * 1e6:.1f} us, {counted} counted nodes"))  # fmt: skip
    rows.append(("  less its bytes / MatMul bandwidth, per counted node (node_overhead)", f"{overhead * 1e6:.2f} us"))
    one_node, _ = node_chain_benchmark(1, 1)
    cold_run, warm_run = cold_and_warm_seconds(one_node, cache_flush(last_level_cache_bytes()), repeats * 3)
    run_overhead = run_overhead_of(cold_run, warm_run)
    rows.append(("onnxruntime run of 1 Mul on [1, 1]: after 2 x the last-level cache streamed, back to back",
                 f"{cold_run * 1e6:.1f} us, {warm_run * 1e6:.1f} us"))  # fmt: skip
    rows.append(("  the difference (run_overhead)", f"{run_overhead * 1e6:.1f} us"))
    # Each size's chain alternates run by run with the 256 MiB GEMV, and its rate is taken relative to the
    # GEMV's at the same moments, times the GEMV's figure above (memory_bandwidth): on a shared machine two
    # figures measured a second apart differ by more than the sizes do (0.56-1.13 x the GEMV's rate, with no
    # consistent direction, when each was timed on its own: docs/BENCHMARKS.md).
    weight_total = 2 * last_level_cache_bytes()
    weight_bandwidth = []
    gemv_run, gemv_bytes = ort_gemv_benchmark(8192, 8192)
    for weight_size in WEIGHT_SIZES:
        weight_run, matmuls = weight_chain_benchmark(weight_size, weight_total)
        chain_seconds, gemv_seconds = paired_seconds(weight_run, gemv_run, repeats)
        del weight_run  # its session's weights, before the next size's
        ratio = weight_rate_of(chain_seconds / matmuls, weight_size, overhead) / (gemv_bytes / gemv_seconds)
        weight_bandwidth.append([weight_size, float(f"{ratio * ort_gemv:.3g}")])
        rows.append((f"onnxruntime {matmuls} MatMul [1, k] x W of {weight_size >> 10} KiB each, less node_overhead",
                     f"{ratio:.3f} x the GEMV's rate beside it: {ratio * ort_gemv / 1e9:.2f} GB/s"))  # fmt: skip
    del gemv_run
    weight_bandwidth.append([size, float(f"{weight_rate_of(size / ort_gemv, size, overhead):.3g}")])
    # For comparison, a decode-sized row: its activations stay in cache, so what it costs beyond the
    # [1, 1] chain is far less than the DRAM-bandwidth memory time the cost model charges it.
    row_node, _ = node_overhead(400, 512, repeats * 3, ort_gemv)
    rows.append(("onnxruntime per node, 400 Mul on [1, 512] (model: + 6 KB / bandwidth)", f"{row_node * 1e6:.2f} us"))

    cache_bytes = last_level_cache_bytes()
    chain_numel = cache_chain_numel(cache_bytes)
    chain_run, chain_bytes = cache_chain_benchmark(CACHE_CHAIN_NODES, chain_numel)
    # the cache chain is a Mul chain like the one above, graph optimizations off: its nodes cost what that one's do
    cache_bandwidth = cache_bandwidth_of(
        best_seconds(chain_run, repeats), chain_bytes, CACHE_CHAIN_NODES, mul_chain_overhead
    )
    rows.append(("last-level cache (/sys/devices/system/cpu/cpu0/cache)", f"{cache_bytes >> 20} MiB"))
    rows.append(
        (
            f"onnxruntime {CACHE_CHAIN_NODES} Mul on float32 [{chain_numel}] ({chain_numel * 4 >> 20} MiB, in cache)",
            f"{cache_bandwidth / 1e9:.2f} GB/s",
        )
    )

    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    # Peaks are the best of the sizes (the machine is shared: the best run is the least disturbed).
    # Bandwidth is the matrix-vector figure: decode streams weights through matrix-vector products.
    numpy_fields = {
        "peak_flops": {"float32": float(f"{max(numpy_flops.values()):.3g}"), "float16": float(f"{fp16:.3g}")},
        "memory_bandwidth": float(f"{gemv_bandwidth:.3g}"),
        "node_overhead": float(f"{overhead:.3g}"),
    }
    ort_fields = {
        "peak_flops": {"float32": float(f"{max(ort_flops.values()):.3g}"), "float16": float(f"{fp16:.3g}")},
        "memory_bandwidth": float(f"{ort_gemv:.3g}"),
        "node_overhead": float(f"{overhead:.3g}"),
        "cache_bytes": cache_bytes,
        "cache_bandwidth": float(f"{cache_bandwidth:.3g}"),
        "weight_bandwidth": weight_bandwidth,
        "run_overhead": float(f"{run_overhead:.3g}"),
    }
    print("onnxruntime-calibrated (the built-in cpu-here):", json.dumps(ort_fields))
    print("numpy-calibrated (bench/profiles/cpu-here-numpy.json):", json.dumps(numpy_fields))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(ort_fields, out)
    if args.json_mul_chain:
        with open(args.json_mul_chain, "w") as out:
            json.dump({"node_overhead": float(f"{mul_chain_overhead:.3g}")}, out)


if __name__ == "__main__":
    main()
