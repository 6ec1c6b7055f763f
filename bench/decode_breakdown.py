"""Where a decode step's time goes, against the cost model (issue 15 item 5: decode predicted 0.66-0.85 of
what the ranks measure).

    .venv/bin/python bench/decode_breakdown.py --work /tmp/w18c2 [--profile cpu-fast] [--rounds 200] [--op-profile]

On the original model of a `bench/mixed_devices.py --work` directory (its `model/`, `feeds/decode.npz` and
the profiles its `cluster.json` was calibrated with), one process, one thread, onnxruntime's default graph
optimizations (as the rank sessions), every run timed by the thread's CPU time (`time.thread_time`, the
clock of the library's compute meter), all of the following interleaved round by round so that they see the
same moments of a shared machine:

- the decode step (past max_seq - 1);
- its weight MatMuls alone: a graph of the model's MatMuls whose B is an initializer, the same weights and
  shapes, one input per K (x [1, 1, K]);
- the rest: the decode model with each weight MatMul x @ W[K, N] replaced by Slice(x, K 0:1) @ W[0:1, :]
  (the same output shape, about no work; 2 nodes for 1), at past max_seq - 1 and at past 15 (the KV cache's
  share of the rest shrinks 16x, the node count does not);
- calibrate_cpu.py's old node-overhead chain (400 Mul on [1, 1]), its tiny decoder's decode step (the
  node_overhead since 2026-12-04; 5 steps per round, right after the Mul chain) and a chain of 396 nodes of
  12 kinds (Mul, Add, Transpose, Slice, Neg, Softmax, Sigmoid, Concat, Div, Abs) on a [1, 448] row.

Predicted: the cost model (`plan/cost.py`) on the named profile, for the step, its weight MatMuls, and the
rest (the step less them; the replacement nodes not counted); and on the same profile with the figures of
these moments, by the model before 2026-12-04 (node_overhead from the Mul chain, every weight at the GEMV's
bandwidth) and by the model now (node_overhead from the tiny decoder, weights by the profile's
weight_bandwidth scaled as the GEMV's rate): a table of both against the measured parts. `--op-profile`
adds onnxruntime's profiler per op type next to the prediction per op type; the profiler adds
microseconds to every node it times (it prints what it adds to the Mul chain), so its small-node figures
are upper bounds.
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
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from llmir_onnx.plan.cost import FREE_OPS, node_costs, node_seconds  # noqa: E402
from llmir_onnx.plan.devices import DeviceProfile, profile_from_dict  # noqa: E402
from llmir_onnx.plan.shapes import Sizes  # noqa: E402

SHORT_PAST = 15
DECODER_REPEATS = 5  # calibrate_cpu.py's tiny decoder: steps per round
ROW = 448


def calibrate_cpu_module() -> object:
    spec = importlib.util.spec_from_file_location("calibrate_cpu", REPO / "bench/calibrate_cpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session(
    model: onnx.ModelProto | Path, optimize: bool = True, profile_prefix: str | None = None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def weight_matmuls(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    weights = {init.name for init in proto.graph.initializer}
    return [node for node in proto.graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def weights_only_model(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[int]]:
    """The model's weight MatMuls alone, side by side: (model, the K of each input x{K})."""
    inits = {init.name: init for init in proto.graph.initializer}
    matmuls = weight_matmuls(proto)
    ks = sorted({int(inits[node.input[1]].dims[0]) for node in matmuls})
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [f"x{inits[n.input[1]].dims[0]}", n.input[1]], [f"y{i}"])
            for i, n in enumerate(matmuls)
        ],
        "weight_matmuls",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, 1, k]) for k in ks],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(matmuls))],
        initializer=[inits[n.input[1]] for n in matmuls],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model, ks


def rest_model(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The model with each weight MatMul x @ W[K, N] replaced by Slice(x, last axis 0:1) @ W[0:1, :]."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    inits = {init.name: init for init in proto.graph.initializer}
    weights = set(inits)
    replaced = {i for i, node in enumerate(proto.graph.node) if node.op_type == "MatMul" and node.input[1] in weights}
    nodes: list[onnx.NodeProto] = []
    rows: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.array([0], np.int64), "rest_start"),
        numpy_helper.from_array(np.array([1], np.int64), "rest_end"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest_axis"),
    ]
    for index, node in enumerate(proto.graph.node):
        if index not in replaced:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        rows.append(numpy_helper.from_array(np.ascontiguousarray(weight[0:1]), node.input[1] + "_row"))
        sliced = node.output[0] + "_k1"
        nodes.append(helper.make_node("Slice", [node.input[0], "rest_start", "rest_end", "rest_axis"], [sliced]))
        nodes.append(helper.make_node("MatMul", [sliced, node.input[1] + "_row"], list(node.output), name=node.name))
    used = {name for node in nodes for name in node.input}
    kept = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + rows)
    return proto, len(replaced)


def mixed_chain(cycles: int) -> tuple[onnx.ModelProto, int]:
    """A chain of small nodes of 12 kinds on float32 [1, ROW], graph optimizations off when run."""
    kinds = (
        "Mul",
        "Add",
        "Transpose",
        "Transpose",
        "Slice",
        "Neg",
        "Softmax",
        "Sigmoid",
        "Concat",
        "Slice",
        "Div",
        "Abs",
    )
    nodes, current = [], "x"
    for index in range(cycles * len(kinds)):
        kind, out = kinds[index % len(kinds)], f"t{index}"
        inputs = {"Mul": [current, "h"], "Add": [current, "b"], "Div": [current, "d"], "Concat": [current, current],
                  "Slice": [current, "s0", "sW", "s1"]}.get(kind, [current])  # fmt: skip
        attributes: dict[str, dict[str, Any]] = {"Transpose": {"perm": [1, 0]}, "Softmax": {"axis": -1},
                                                 "Concat": {"axis": 1}}  # fmt: skip
        attrs = attributes.get(kind, {})
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        current = out
    inits = [
        numpy_helper.from_array(np.full(ROW, 0.5, np.float32), "h"),
        numpy_helper.from_array(np.full(ROW, 0.1, np.float32), "b"),
        numpy_helper.from_array(np.full(ROW, 2.0, np.float32), "d"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([ROW], np.int64), "sW"),
        numpy_helper.from_array(np.array([1], np.int64), "s1"),
    ]
    graph = helper.make_graph(
        nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROW])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, ROW])], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model, len(nodes)


def short_feeds(feeds: dict[str, np.ndarray], past: int) -> dict[str, np.ndarray]:
    short = {
        name: (value[:, :, :past, :].copy() if name.startswith("past") else value) for name, value in feeds.items()
    }
    short["attention_mask"] = feeds["attention_mask"][:, : past + 1].copy()
    short["position_ids"] = np.array([[past]], np.int64)
    return short


def predicted(model: ir.Model, device: DeviceProfile, past: int) -> dict[str, float]:
    """Seconds by part: weight MatMul, and the rest by op type (roofline) plus 'node_overhead'."""
    weights = set(model.graph.initializers)
    parts: dict[str, float] = collections.defaultdict(float)
    for node, cost in zip(model.graph, node_costs(model, Sizes(batch=1, seq=1, past=past)), strict=True):
        compute, memory, _ = node_seconds(cost, device)
        overhead = 0.0 if cost.op_type in FREE_OPS else device.node_overhead
        is_weight = cost.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].name in weights
        if is_weight:
            parts["weight MatMul"] += max(compute, memory) + overhead
        else:
            parts[cost.op_type] += max(compute, memory)
            parts["node_overhead"] += overhead
    return dict(parts)


def stats(times: list[float]) -> str:
    t = np.array(times) * 1e3
    return f"mean {t.mean():.3f} ms, median {np.median(t):.3f}, best {t.min():.3f}"


def profiled_chain_us() -> float:
    """Mean kernel duration onnxruntime's profiler reports for a node of a 400-Mul chain on [1, 1]."""
    names = ["x"] + [f"t{i}" for i in range(400)]
    graph = helper.make_graph(
        [helper.make_node("Mul", [names[i], "half"], [names[i + 1]]) for i in range(400)], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, 1])],
        initializer=[numpy_helper.from_array(np.full((1, 1), 0.5, np.float32), "half")],
    )  # fmt: skip
    chain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    chain.ir_version = 10
    with tempfile.TemporaryDirectory() as tmp:
        profiled = session(chain, optimize=False, profile_prefix=f"{tmp}/chain")
        for _ in range(50):
            profiled.run(None, {"x": np.ones((1, 1), np.float32)})
        events = json.loads(Path(profiled.end_profiling()).read_text())
    return float(np.mean([e["dur"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]))


def op_profile(model_path: Path, feeds: dict[str, np.ndarray], parts: dict[str, float], runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model_path, profile_prefix=f"{tmp}/decode")
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    run_us = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            entry = kernels[event["args"]["op_name"]]
            entry[0] += 1
            entry[1] += event["dur"]
    count = len(run_us)
    print(f"\nonnxruntime profiler, {count} runs: model_run mean {np.mean(run_us) / 1e3:.3f} ms (wall), kernels "
          f"{sum(v[1] for v in kernels.values()) / count / 1e3:.3f} ms per run")  # fmt: skip
    print("| op type | nodes run per step | profiler, ms per step | profiler, us per node "
          "| predicted roofline on the interleaved figures, ms |")  # fmt: skip
    print("|---|---|---|---|---|")
    for op, (nodes, dur) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(
            f"| {op} | {nodes / count:.0f} | {dur / count / 1e3:.3f} | {dur / nodes:.2f} "
            f"| {parts.get(op, 0.0) * 1e3:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench/mixed_devices.py --work directory")
    parser.add_argument("--profile", default="cpu-fast", help="the profile of its cluster.json to predict on")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--op-profile", action="store_true", help="also onnxruntime's profiler per op type")
    args = parser.parse_args()
    profile = json.loads((args.work / "cluster.json").read_text())["profiles"][args.profile]
    device = profile_from_dict({"name": args.profile, **profile})
    model_path = args.work / "model" / "model.onnx"
    proto = onnx.load(str(model_path))
    model = ir.load(str(model_path))
    feeds = dict(np.load(args.work / "feeds" / "decode.npz"))
    past = int(feeds["past_key_values.0.key"].shape[2])
    short = short_feeds(feeds, SHORT_PAST)
    weights_model, ks = weights_only_model(proto)
    rest, replaced = rest_model(proto)
    calibrate_cpu = calibrate_cpu_module()
    mul_run, mul_nodes = calibrate_cpu.node_chain_benchmark(400, 1)  # type: ignore[attr-defined]
    gemv_run, gemv_bytes = calibrate_cpu.ort_gemv_benchmark(8192, 8192)  # type: ignore[attr-defined]
    mixed, mixed_nodes = mixed_chain(33)
    decoder_dir = tempfile.TemporaryDirectory(prefix="llmir-dispatch-decoder-")
    decoder_run, decoder_counted, decoder_bytes = calibrate_cpu.decoder_dispatch_benchmark(  # type: ignore[attr-defined]
        Path(decoder_dir.name)
    )
    # 5 steps in a row, as bench/mixed_devices.py's interleaved calibration runs it: one step right after the
    # 256 MiB GEMV (which empties the caches) took 2.9 us per counted node against 1.3-1.4 back to back, while
    # the decode step's small nodes do not slow down beside its weight MatMuls (the step ~ its weight
    # MatMuls + the rest, each measured alone): the back-to-back figure is the step's
    decoder_name = f"calibrate_cpu's tiny decoder step x {DECODER_REPEATS}: {decoder_counted} counted nodes each"

    def decoder_steps() -> None:
        for _ in range(DECODER_REPEATS):
            decoder_run()
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(weights_model, f"{tmp}/w.onnx", save_as_external_data=True, location="w.data")
        onnx.save(rest, f"{tmp}/r.onnx", save_as_external_data=True, location="r.data")
        decode_s, weights_s, rest_s = (
            session(model_path),
            session(Path(f"{tmp}/w.onnx")),
            session(Path(f"{tmp}/r.onnx")),
        )
    mixed_s = session(mixed, optimize=False)
    x_of_k = {f"x{k}": np.ones((1, 1, k), np.float32) for k in ks}
    row = {"x": np.ones((1, ROW), np.float32)}
    runs: dict[str, tuple[Callable[[], object], int]] = {
        f"decode step (past {past})": (lambda: decode_s.run(None, feeds), 1),
        f"its {replaced} weight MatMuls alone": (lambda: weights_s.run(None, x_of_k), 1),
        f"the rest (past {past})": (lambda: rest_s.run(None, feeds), 1),
        f"the rest (past {SHORT_PAST})": (lambda: rest_s.run(None, short), 1),
        f"calibrate_cpu's chain: {mul_nodes} Mul on [1, 1]": (mul_run, mul_nodes),
        decoder_name: (decoder_steps, DECODER_REPEATS * decoder_counted),
        f"mixed chain: {mixed_nodes} nodes of 12 kinds on [1, {ROW}]": (lambda: mixed_s.run(None, row), mixed_nodes),
        "calibrate_cpu's GEMV [1, 8192] x W[8192, 8192]": (gemv_run, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run, _ in runs.values():
        for _ in range(3):
            run()
    started, load = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    for _ in range(args.rounds):
        for name, (run, _) in runs.items():
            start = time.thread_time()
            run()
            times[name].append(time.thread_time() - start)
    ended, load_after = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    print(
        f"{started}-{ended} UTC, load average {load[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{args.rounds} interleaved rounds, thread CPU time"
    )
    for name, (_, nodes) in runs.items():
        per_node = f"; per node mean {np.mean(times[name]) / nodes * 1e6:.2f} us" if nodes > 1 else ""
        print(f"  {name:48s} {stats(times[name])}{per_node}")
    # the same profile with the figures of these moments: the GEMV's bandwidth; the node overhead of the model
    # before 2026-12-04 (the Mul chain's) and after (the tiny decoder's), calibrate_cpu.py's formulas on the
    # interleaved means; the weight sizes' curve (after) the profile's, scaled as the GEMV's rate; the flops and
    # the cache bandwidth as profiled
    bandwidth = gemv_bytes / float(np.mean(times["calibrate_cpu's GEMV [1, 8192] x W[8192, 8192]"]))
    chain_node = float(np.mean(times[f"calibrate_cpu's chain: {mul_nodes} Mul on [1, 1]"])) / mul_nodes
    overhead = calibrate_cpu.node_overhead_of(chain_node, 1, bandwidth)  # type: ignore[attr-defined]
    decoder_overhead = calibrate_cpu.decoder_node_overhead(  # type: ignore[attr-defined]
        float(np.mean(times[decoder_name])) / DECODER_REPEATS, decoder_counted, decoder_bytes, bandwidth
    )
    old = {key: value for key, value in profile.items() if key != "weight_bandwidth"}
    interleaved = profile_from_dict(
        {"name": f"{args.profile} now, the model before", **old, "memory_bandwidth": bandwidth,
         "node_overhead": overhead}
    )  # fmt: skip
    scale = bandwidth / profile["memory_bandwidth"]
    interleaved_after = profile_from_dict(
        {"name": f"{args.profile} now", **profile, "memory_bandwidth": bandwidth, "node_overhead": decoder_overhead,
         "weight_bandwidth": [[size, rate * scale] for size, rate in profile.get("weight_bandwidth", [])]}
    )  # fmt: skip
    overhead_nodes = sum(1 for node in model.graph if node.op_type not in FREE_OPS)
    measured = {
        "decode step": float(np.mean(times[f"decode step (past {past})"])),
        "its weight MatMuls": float(np.mean(times[f"its {replaced} weight MatMuls alone"])),
        f"the rest, past {past}": float(np.mean(times[f"the rest (past {past})"])),
        f"the rest, past {SHORT_PAST}": float(np.mean(times[f"the rest (past {SHORT_PAST})"])),
    }
    table: dict[str, dict[str, float]] = {}
    for label, on in (
        (f"{args.profile} (its cluster.json)", device),
        ("the model before (400-Mul node_overhead, no weight_bandwidth), interleaved figures", interleaved),
        ("the model now (decoder node_overhead, weight_bandwidth), interleaved figures", interleaved_after),
    ):
        full, short_parts = predicted(model, on, past), predicted(model, on, SHORT_PAST)
        rest_pred = sum(v for k, v in full.items() if k != "weight MatMul")
        short_rest_pred = sum(v for k, v in short_parts.items() if k != "weight MatMul")
        print(f"predicted on {label}: memory_bandwidth {on.memory_bandwidth / 1e9:.2f} GB/s, node_overhead "
              f"{on.node_overhead * 1e6:.2f} us x {overhead_nodes} nodes")  # fmt: skip
        print(f"  decode step {sum(full.values()) * 1e3:.3f} ms; weight MatMuls {full['weight MatMul'] * 1e3:.3f} ms; "
              f"the rest {rest_pred * 1e3:.3f} ms (node_overhead {full['node_overhead'] * 1e3:.3f}); the rest at past "
              f"{SHORT_PAST} {short_rest_pred * 1e3:.3f} ms")  # fmt: skip
        top = sorted(
            ((k, v) for k, v in full.items() if k not in ("weight MatMul", "node_overhead")), key=lambda kv: -kv[1]
        )[:5]
        print("  the rest's largest rooflines: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in top))
        table[label] = {
            "decode step": sum(full.values()),
            "its weight MatMuls": full["weight MatMul"],
            f"the rest, past {past}": rest_pred,
            f"the rest, past {SHORT_PAST}": short_rest_pred,
        }
    before_label, after_label = list(table)[1:]
    print("\n| part | measured, mean | predicted, the model before (interleaved) | / measured "
          "| predicted, the model now (interleaved) | / measured |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for part, seconds in measured.items():
        before, after = table[before_label][part], table[after_label][part]
        print(f"| {part} | {seconds * 1e3:.3f} ms | {before * 1e3:.3f} ms | {before / seconds:.2f} "
              f"| {after * 1e3:.3f} ms | {after / seconds:.2f} |")  # fmt: skip
    print(f"(interleaved figures: GEMV {bandwidth / 1e9:.2f} GB/s; node_overhead {overhead * 1e6:.2f} us before, "
          f"{decoder_overhead * 1e6:.2f} us now)")  # fmt: skip
    if args.op_profile:
        op_profile(model_path, feeds, {**full, "MatMul": full["weight MatMul"] + full.get("MatMul", 0.0)}, 50)
        mul_mean = np.mean(times[next(name for name in runs if "Mul on" in name)]) / mul_nodes
        print(f"the profiler on the 400-Mul chain: {profiled_chain_us():.2f} us per node (unprofiled, above: "
              f"{mul_mean * 1e6:.2f} us): what it adds to each node")  # fmt: skip


if __name__ == "__main__":
    main()
