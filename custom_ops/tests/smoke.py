"""Smoke test of the ai.llmir library through real onnxruntime sessions; compares with numpy.

Run: .venv/bin/mpiexec -n 4 .venv/bin/python custom_ops/tests/smoke.py [path/to/libllmir_ops.so]
(The full matrix, error paths and timeout live in tests/; this is the library author's quick check.)
Prints one line per check on rank 0 and exits non-zero on any failure.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import AttributeProto, TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "custom_ops" / "cmake" / "libllmir_ops.so"

ctypes.CDLL(str(Path(sys.prefix) / "lib" / "libmpi.so.12"), mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL(str(LIBRARY))
lib.llmir_version.restype = ctypes.c_char_p
RANK = lib.llmir_world_rank()
WORLD = lib.llmir_world_size()

DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "bool": TensorProto.BOOL,
}
failures: list[str] = []


def log(message: str) -> None:
    if RANK == 0:
        print(message, flush=True)


def rank_data(rank: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Small integers (exact in every dtype) that differ per rank and per element."""
    n = int(np.prod(shape))
    values = (np.arange(n) * 7 + rank * 3 + 1) % 11
    if dtype == "bool":
        values = values % 2
    elif dtype != "uint8":
        values = values - 5
    return values.reshape(shape).astype(np.float32)


def session(nodes: list, output_type: int = TensorProto.FLOAT, initializers=(), level=None) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", output_type, None)],
        initializer=list(initializers),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.llmir", 1)], ir_version=10
    )
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(LIBRARY))
    options.intra_op_num_threads = 1
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def collective_session(op: str, dtype: str, **attributes) -> ort.InferenceSession:
    cast_back = TensorProto.FLOAT if dtype != "bool" else TensorProto.INT64
    group = attributes.pop("group", None)
    node = helper.make_node(op, ["xt"], ["yt"], domain="ai.llmir", name=f"{op}_node", **attributes)
    if group is not None:  # an explicitly empty list means the whole world
        node.attribute.append(helper.make_attribute("group", group, attr_type=AttributeProto.INTS))
    nodes = [
        helper.make_node("Cast", ["x"], ["xt"], to=DTYPES[dtype]),
        node,
        helper.make_node("Cast", ["yt"], ["y"], to=cast_back),
    ]
    return session(nodes, cast_back)


def check(name: str, run: Callable[[], np.ndarray | None], expected: np.ndarray | None) -> None:
    try:
        got = run()
        if expected is not None and (got.shape != expected.shape or not np.array_equal(got, expected)):
            raise AssertionError(f"got {got.shape} {got.ravel()[:8]} expected {expected.shape} {expected.ravel()[:8]}")
        log(f"ok   {name}")
    except Exception as error:
        failures.append(f"rank {RANK}: {name}: {error}")
        print(f"FAIL rank {RANK} {name}: {error}", flush=True)


def reduce(arrays: list[np.ndarray], reduction: str, dtype: str) -> np.ndarray:
    stacked = np.stack(arrays)
    if dtype == "bool":
        stacked = stacked.astype(bool)
    result = {"sum": stacked.sum(0), "max": stacked.max(0), "min": stacked.min(0)}[reduction]
    if dtype in ("int8", "uint8"):
        result = result.astype(np.int64).astype(np.dtype(dtype)).astype(np.float32)
    return result.astype(np.int64 if dtype == "bool" else np.float32)


def test_collectives() -> None:
    groups = [[], [0, 1], [2, 3], [0, 2], [1, 3]] if WORLD == 4 else [[]]
    shape = (4, 8, 2)
    for dtype in DTYPES:
        for group in groups:
            members = group or list(range(WORLD))
            if RANK not in members:
                continue
            inputs = [rank_data(r, shape, dtype) for r in members]
            mine = rank_data(RANK, shape, dtype)
            for reduction in ("max", "min") if dtype == "bool" else ("sum", "max", "min"):
                sess = collective_session("AllReduce", dtype, reduction=reduction, group=group)
                check(
                    f"AllReduce {dtype} {reduction} group={group}",
                    lambda s=sess, m=mine: s.run(None, {"x": m})[0],
                    reduce(inputs, reduction, dtype),
                )
            for axis in (0, 1, -1):
                sess = collective_session("AllGather", dtype, axis=axis, group=group)
                expected = np.concatenate(inputs, axis=axis).astype(np.int64 if dtype == "bool" else np.float32)
                if dtype == "bool":
                    expected = (expected != 0).astype(np.int64)
                check(
                    f"AllGather {dtype} axis={axis} group={group}",
                    lambda s=sess, m=mine: s.run(None, {"x": m})[0],
                    expected,
                )
            reduction = "max" if dtype == "bool" else "sum"
            for axis in (0, 1, 2 if len(members) == 2 else -2):
                sess = collective_session("ReduceScatter", dtype, axis=axis, reduction=reduction, group=group)
                full = reduce(inputs, reduction, dtype)
                expected = np.split(full, len(members), axis=axis)[members.index(RANK)]
                check(
                    f"ReduceScatter {dtype} {reduction} axis={axis} group={group}",
                    lambda s=sess, m=mine: s.run(None, {"x": m})[0],
                    expected,
                )


def test_16bit_sums() -> None:
    """Random float16/bfloat16 sums over 2-member groups: one combination, so exactly numpy's float32 sum
    rounded to nearest even (4-member results depend on MPICH's combination order)."""
    import ml_dtypes

    groups = [[0, 1], [2, 3]] if WORLD == 4 else [[0, 1]]
    for dtype, numpy_type in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        for group in groups:
            if RANK not in group:
                continue
            values = [
                np.random.default_rng(100 + r).normal(0, 50, (3, 1000)).astype(numpy_type).astype(np.float32)
                for r in group
            ]
            expected = (values[0] + values[1]).astype(numpy_type).astype(np.float32)
            sess = collective_session("AllReduce", dtype, reduction="sum", group=group)
            mine = values[group.index(RANK)]
            check(
                f"AllReduce {dtype} random sum group={group} (round to nearest even)",
                lambda s=sess, m=mine: s.run(None, {"x": m})[0],
                expected,
            )


def test_send_recv_chain() -> None:
    """rank r receives from r-1 (except 0), adds 1, sends to r+1 (except the last)."""
    for dtype in ("float32", "float16", "bfloat16", "int64", "int8"):
        nodes = [helper.make_node("Cast", ["x"], ["xt"], to=DTYPES[dtype])]
        like = numpy_helper.from_array(np.zeros((0,), np.float32), "like_f")
        inits = [like]
        nodes.append(helper.make_node("Cast", ["like_f"], ["like"], to=DTYPES[dtype]))
        if RANK > 0:
            nodes.append(
                helper.make_node("Recv", ["like"], ["got"], domain="ai.llmir", peer=RANK - 1, tag=5, shape=[-1, 3])
            )
            nodes.append(helper.make_node("Cast", ["got"], ["gotf"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Add", ["gotf", "one"], ["value"]))
            inits.append(numpy_helper.from_array(np.ones((), np.float32), "one"))
        else:
            nodes.append(helper.make_node("Cast", ["xt"], ["value"], to=TensorProto.FLOAT))
        if RANK < WORLD - 1:
            nodes.append(helper.make_node("Cast", ["value"], ["out_t"], to=DTYPES[dtype]))
            nodes.append(helper.make_node("Send", ["out_t"], ["sent"], domain="ai.llmir", peer=RANK + 1, tag=5))
            nodes.append(helper.make_node("Cast", ["sent"], ["sentf"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Add", ["value", "zero_sent"], ["y_pre"]))
            nodes.append(helper.make_node("Mul", ["sentf", "zero"], ["zero_sent"]))
            nodes.append(helper.make_node("Identity", ["y_pre"], ["y"]))
            inits.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
        else:
            nodes.append(helper.make_node("Identity", ["value"], ["y"]))
        sess = session(nodes, initializers=inits, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        x = rank_data(0, (5, 3), "float32")
        check(f"Send/Recv chain {dtype}", lambda s=sess, v=x: s.run(None, {"x": v})[0], x + RANK)


def test_errors() -> None:
    def expect_error(name: str, run: Callable[[], object], fragment: str) -> None:
        try:
            run()
        except Exception as error:
            if fragment in str(error):
                log(f"ok   error {name}: {str(error).splitlines()[-1][-160:]}")
                return
            failures.append(f"rank {RANK}: {name}: wrong error {error}")
            print(f"FAIL rank {RANK} {name}: wrong error: {error}", flush=True)
            return
        failures.append(f"rank {RANK}: {name}: no error")
        print(f"FAIL rank {RANK} {name}: no error", flush=True)

    x = rank_data(RANK, (4, 2), "float32")
    expect_error(
        "bool sum", lambda: collective_session("AllReduce", "bool", reduction="sum").run(None, {"x": x}), 'not "sum"'
    )
    expect_error(
        "member beyond world",
        lambda: collective_session("AllReduce", "float32", group=list(range(WORLD + 1))).run(None, {"x": x}),
        "does not exist",
    )
    expect_error(
        "not in group",
        lambda: collective_session("AllReduce", "float32", group=[(RANK + 1) % WORLD]).run(None, {"x": x}),
        "not a member",
    )
    expect_error(
        "bad reduction", lambda: collective_session("AllReduce", "float32", reduction="prod"), "unsupported reduction"
    )
    mismatched = rank_data(RANK, (4, 2 + (RANK == 1)), "float32")
    expect_error(
        "shape mismatch", lambda: collective_session("AllReduce", "float32").run(None, {"x": mismatched}), "disagree"
    )
    expect_error(
        "ReduceScatter indivisible",
        lambda: collective_session("ReduceScatter", "float32", axis=1).run(
            None, {"x": rank_data(RANK, (2, 3), "float32")}
        ),
        "does not divide",
    )


def test_recv_not_folded() -> None:
    """Recv with an initializer input, ORT_ENABLE_ALL: must run at Run(), not at session creation.

    The sender sends only after the receiver says (tag 10) that its session exists. Folding the Recv
    would run it inside session creation, before that message: both would wait until the
    communication timeout and the check fails. No clock is involved."""
    if WORLD < 2 or RANK > 1:
        return
    inits = [numpy_helper.from_array(np.zeros((0,), np.float32), "like")]
    if RANK == 1:
        nodes = [
            helper.make_node("Recv", ["like"], ["r"], domain="ai.llmir", peer=0, tag=9),
            helper.make_node("Add", ["r", "x"], ["y"]),
        ]
        try:
            sess = session(nodes, initializers=inits, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            ready = [helper.make_node("Send", ["x"], ["y"], domain="ai.llmir", peer=0, tag=10)]
            session(ready, output_type=TensorProto.INT64).run(None, {"x": np.array([0], np.float32)})
            y = sess.run(None, {"x": np.ones((3,), np.float32)})[0]
            ok = np.array_equal(y, np.array([2.0, 3.0, 4.0], np.float32))
        except Exception as error:  # onnxruntime's errors share no base class but Exception
            ok, y = False, f"{type(error).__name__}: {error}"
        print(
            f"{'ok  ' if ok else 'FAIL'} Recv(initializer) not constant-folded: the session was created before "
            f"the sender sent, result {y}",
            flush=True,
        )
        if not ok:
            failures.append("Recv folded")
    else:
        wait = [helper.make_node("Recv", ["like"], ["y"], domain="ai.llmir", peer=1, tag=10)]
        session(wait, initializers=inits).run(None, {"x": np.zeros((1,), np.float32)})
        nodes = [helper.make_node("Send", ["x"], ["y"], domain="ai.llmir", peer=1, tag=9)]
        session(nodes, output_type=TensorProto.INT64).run(None, {"x": np.array([1, 2, 3], np.float32)})


def main() -> int:
    log(f"library {LIBRARY.name} {lib.llmir_version().decode()} world={WORLD} onnxruntime={ort.__version__}")
    if WORLD < 2:
        print("run under mpiexec -n 2 or -n 4 (the checks assume at least 2 ranks)")
        return 2
    only = os.environ.get("SMOKE_ONLY", "")
    for test in (test_collectives, test_16bit_sums, test_send_recv_chain, test_errors, test_recv_not_folded):
        if not only or only in test.__name__:
            test()
    finalized = lib.llmir_finalize()
    if failures:
        print(f"rank {RANK}: {len(failures)} failure(s)", flush=True)
        return 1
    log(f"all smoke checks passed on {WORLD} ranks (llmir_finalize -> {finalized})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
