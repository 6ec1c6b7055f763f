"""The rank graphs of a mixed-devices plan alone, one process: is the decode gap in the graphs or in the ranks?

    .venv/bin/python bench/rank_graphs_alone.py --work DIR [--profile cpu-fast] [--rounds 60]

On a `bench/mixed_devices.py --work` directory (its `model/`, `tp2/`, `pp2/`, `feeds/decode.npz`, and the
profiles of its `cluster.json`):

1. Per op type, for the original model and every rank model: the nodes of the graph, the nodes the cost model
   charges node_overhead for (`plan/cost.py`: all but FREE_OPS), and the nodes onnxruntime runs (its optimized
   graph, default optimizations, the ai.llmir library registered, as a rank's session).
2. Every rank graph on its own in this process: each AllReduce replaced by Identity (its input's shape and
   cost, no peer), a Send dropped (its input made a graph output), a Recv made a graph input (random values of
   its shape). One thread, default optimizations, every run timed by the thread's CPU time (the clock of the
   library's compute meter). Two states, timed alternately: warm (right after the same run) and cold (right
   after 2 x the last-level cache of other data streamed through this thread, as `calibrate_cpu.py`'s
   run_overhead is measured). Predicted: the cost model on the named profile (one device for every graph, so
   the graphs are compared, not the devices), with and without that profile's `run_overhead`.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from llmir_onnx.plan.cost import FREE_OPS, estimate_time, node_costs  # noqa: E402
from llmir_onnx.plan.devices import DeviceProfile, profile_from_dict  # noqa: E402
from llmir_onnx.plan.manifest import Manifest  # noqa: E402
from llmir_onnx.plan.shapes import LLMIR_DOMAIN, Sizes  # noqa: E402
from llmir_onnx.runtime.launch import custom_ops_library_path  # noqa: E402

PLANS = ("tp2", "pp2")


def calibrate_cpu_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("calibrate_cpu", REPO / "bench/calibrate_cpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session_options(optimized_path: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.register_custom_ops_library(str(custom_ops_library_path()))
        options.optimized_model_filepath = str(optimized_path)
    return options


def ops_run(path: Path) -> collections.Counter[str]:
    """The op types of the nodes onnxruntime runs: its optimized graph of `path` (a rank model loads with the
    ai.llmir library registered; the session is not run, so no peer is needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort.InferenceSession(str(path), session_options(optimized), providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
        return collections.Counter(node.op_type for node in graph.node)


def alone(path: Path) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """The rank model without its peers: AllReduce -> Identity, a Send dropped (its input a graph output), a
    Recv's output a graph input; (the model, those new inputs' names and shapes at batch 1 x 1 token)."""
    model = onnx.load(str(path))
    nodes, sent = [], []
    received: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.domain != LLMIR_DOMAIN:
            nodes.append(node)
        elif node.op_type == "AllReduce":
            nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
        elif node.op_type == "Send":
            sent.append((node.output[0], node.input[0]))
        elif node.op_type == "Recv":
            shape = next(list(a.ints) for a in node.attribute if a.name == "shape")
            received[node.output[0]] = [1 if size < 0 else size for size in shape]
        else:
            raise SystemExit(f"{path.name}: node {node.name!r} ({node.op_type}) has no stand-in here")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    dropped = {output for output, _ in sent}
    outputs = [output for output in model.graph.output if output.name not in dropped]
    outputs += [helper.make_tensor_value_info(source, TensorProto.FLOAT, None) for _, source in sent]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    # at decode's batch 1 x 1 token, the shapes the planner evaluates
    model.graph.input.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in received.items()
    )
    opsets = [opset for opset in model.opset_import if opset.domain != LLMIR_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model, received


def predicted(model: ir.Model, device: DeviceProfile, past: int) -> float:
    sizes = Sizes(batch=1, seq=1, past=past)
    estimate = estimate_time(node_costs(model, sizes), device, "decode", sizes)
    return estimate.total_s - estimate.comm_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench/mixed_devices.py --work directory")
    parser.add_argument("--profile", default="cpu-fast", help="the profile of its cluster.json to predict on")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    profile = json.loads((args.work / "cluster.json").read_text())["profiles"][args.profile]
    device = profile_from_dict({"name": args.profile, **profile})
    before = profile_from_dict({"name": args.profile, **{k: v for k, v in profile.items() if k != "run_overhead"}})
    data = dict(np.load(args.work / "feeds" / "decode.npz"))
    past = int(data["past_key_values.0.key"].shape[2])
    paths = {"original": args.work / "model" / "model.onnx"}
    for plan in PLANS:
        for entry in Manifest.read(args.work / plan).ranks:
            paths[f"{plan} rank {entry.rank}"] = args.work / plan / entry.file

    counts = {}
    for name, path in paths.items():
        costs = node_costs(ir.load(str(path)), Sizes(batch=1, seq=1, past=past))
        counts[name] = (
            collections.Counter(cost.op_type for cost in costs),
            collections.Counter(cost.op_type for cost in costs if cost.op_type not in FREE_OPS),
            ops_run(path),
        )
    print(f"decode (past {past}): nodes of the graph / charged node_overhead by the cost model / run by onnxruntime\n")
    print("| op type | " + " | ".join(counts) + " |")
    print("|---|" + "---|" * len(counts))
    for op in sorted(set().union(*(set(graph) | set(run) for graph, _, run in counts.values()))):
        print(f"| {op} | " + " | ".join(f"{g[op]} / {c[op]} / {r[op]}" for g, c, r in counts.values()) + " |")
    print("| all | " + " | ".join(f"{sum(g.values())} / {sum(c.values())} / {sum(r.values())}"
                                  for g, c, r in counts.values()) + " |")  # fmt: skip

    calibrate_cpu = calibrate_cpu_module()
    flush = calibrate_cpu.cache_flush(calibrate_cpu.last_level_cache_bytes())
    runs: dict[str, tuple[Callable[[], object], float, float]] = {}
    for name, path in paths.items():
        if name == "original":
            model, feeds = onnx.load(str(path)), dict(data)
        else:
            plan, _, rank = name.split()
            entry = Manifest.read(path.parent).rank_entry(int(rank))
            model, received = alone(path)
            feeds = {b.local: np.ascontiguousarray(b.take(data[b.original])) for b in entry.inputs}
            rng = np.random.default_rng(0)
            feeds |= {r: rng.standard_normal(shape).astype(np.float32) for r, shape in received.items()}
        session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        feeds = {key: value for key, value in feeds.items() if key in inputs}
        outputs = [o.name for o in session.get_outputs()]
        graph = ir.from_proto(model)

        def run(session: ort.InferenceSession = session, outputs: list[str] = outputs, feeds: dict = feeds) -> object:
            return session.run(outputs, feeds)

        runs[name] = (run, predicted(graph, device, past), predicted(graph, before, past))
    times: dict[str, dict[str, list[float]]] = {name: {"warm": [], "cold": []} for name in runs}
    for run, _, _ in runs.values():
        run()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, (run, _, _) in runs.items():
            for state in ("warm", "cold"):
                if state == "cold":
                    flush()
                else:
                    run()
                start = time.thread_time()
                run()
                times[name][state].append(time.thread_time() - start)
    print(f"\n{started}, load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds; "
          f"profile {args.profile}: node_overhead {device.node_overhead * 1e6:.2f} us, run_overhead "
          f"{device.run_overhead * 1e6:.1f} us, memory_bandwidth {device.memory_bandwidth / 1e9:.2f} GB/s\n")
    print("| graph, alone (decode step) | warm, mean | cold, mean | predicted, no run_overhead | / warm | / cold "
          "| predicted with run_overhead | / warm | / cold |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, now, old) in runs.items():
        warm, cold = (float(np.mean(times[name][state])) for state in ("warm", "cold"))
        print(f"| {name} | {warm * 1e3:.3f} ms | {cold * 1e3:.3f} ms | {old * 1e3:.3f} ms | {old / warm:.2f} "
              f"| {old / cold:.2f} | {now * 1e3:.3f} ms | {now / warm:.2f} | {now / cold:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
