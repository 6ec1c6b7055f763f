"""Helpers shared by the MPI worker scripts: graphs with ai.llmir ops, exact data, numpy references.

Workers run as `mpiexec -n N python tests/mpi_workers/<worker>.py SCENARIO ...`; each rank prints
`<<<RANK <r> OK <checks>>>>` when every check passed, or `<<<RANK <r> ERROR <type>: <message>>>>` and
exits 1. The markers matter: mpiexec merges the ranks' output and lines can run into each other.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from llmir_onnx.ops import LLMIR_DOMAIN, LLMIR_OPSET_IMPORT

# dtype name -> (numpy dtype, ONNX element type)
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "float32": (np.dtype(np.float32), TensorProto.FLOAT),
    "float64": (np.dtype(np.float64), TensorProto.DOUBLE),
    "float16": (np.dtype(np.float16), TensorProto.FLOAT16),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16),
    "int32": (np.dtype(np.int32), TensorProto.INT32),
    "int64": (np.dtype(np.int64), TensorProto.INT64),
    "int8": (np.dtype(np.int8), TensorProto.INT8),
    "uint8": (np.dtype(np.uint8), TensorProto.UINT8),
    "bool": (np.dtype(np.bool_), TensorProto.BOOL),
}
REDUCTIONS = ("sum", "max", "min")


def reductions_for(dtype_name: str) -> tuple[str, ...]:
    return ("max", "min") if dtype_name == "bool" else REDUCTIONS


def rank_data(rank: int, shape: Sequence[int], dtype_name: str, seed: int) -> np.ndarray:
    """Rank `rank`'s tensor: small integers, so every sum over <= 4 ranks is exact in every dtype
    (bfloat16 holds integers up to 256 exactly) and the reduction order cannot matter."""
    rng = np.random.default_rng([seed, rank, len(shape), *shape])
    dtype = DTYPES[dtype_name][0]
    if dtype_name == "bool":
        return rng.random(shape) < 0.5
    low, high = (0, 60) if dtype_name == "uint8" else (-30, 31) if dtype_name == "int8" else (-64, 65)
    return rng.integers(low, high, size=shape).astype(dtype)


def reduce_reference(arrays: Sequence[np.ndarray], reduction: str) -> np.ndarray:
    stacked = np.stack(arrays)
    dtype = arrays[0].dtype
    if dtype == np.bool_:
        return stacked.any(axis=0) if reduction == "max" else stacked.all(axis=0)
    if reduction == "sum":
        return stacked.astype(np.float64).sum(axis=0).astype(dtype)
    return (stacked.max(axis=0) if reduction == "max" else stacked.min(axis=0)).astype(dtype)


def llmir_node(op_type: str, inputs: list[str], outputs: list[str], name: str, **attributes: object) -> onnx.NodeProto:
    return helper.make_node(op_type, inputs, outputs, domain=LLMIR_DOMAIN, name=name, **attributes)


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, Sequence[int | str | None]]],
    outputs: list[tuple[str, int, Sequence[int | str | None] | None]],
    initializers: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    """A model over opset 21 + ai.llmir 1, ir_version 10. bfloat16 outputs get a Cast to float32 (the
    onnxruntime Python API cannot hand out bfloat16 arrays); their names gain the suffix `_f32`."""
    nodes = list(nodes)
    graph_outputs = []
    for name, elem_type, shape in outputs:
        if elem_type == TensorProto.BFLOAT16:
            nodes.append(helper.make_node("Cast", [name], [f"{name}_f32"], to=TensorProto.FLOAT))
            graph_outputs.append(helper.make_tensor_value_info(f"{name}_f32", TensorProto.FLOAT, shape))
        else:
            graph_outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
    graph = helper.make_graph(
        nodes,
        "llmir_test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        graph_outputs,
        initializer=initializers or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), LLMIR_OPSET_IMPORT], ir_version=10)


def output_name(name: str, dtype_name: str) -> str:
    return f"{name}_f32" if dtype_name == "bfloat16" else name


def empty_like_initializer(name: str, dtype_name: str) -> onnx.TensorProto:
    return helper.make_tensor(name, DTYPES[dtype_name][1], [0], [])


def to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype == ml_dtypes.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), TensorProto.BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    values = session.run_with_ort_values(names, {k: to_ort_value(v) for k, v in feeds.items()})
    return {name: value.numpy() for name, value in zip(names, values, strict=True)}


def session(model: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class Checker:
    """Counts exact comparisons; the first mismatch raises with what differed."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.count = 0

    def equal(self, what: str, actual: np.ndarray, expected: np.ndarray, dtype_name: str | None = None) -> None:
        if dtype_name == "bfloat16":
            expected = expected.astype(np.float32)
        if actual.dtype != expected.dtype or actual.shape != expected.shape or not np.array_equal(actual, expected):
            raise AssertionError(
                f"{what}: got dtype {actual.dtype} shape {actual.shape}, expected dtype {expected.dtype} shape "
                f"{expected.shape}; values equal: "
                f"{actual.shape == expected.shape and bool(np.array_equal(actual, expected))}\n"
                f"got:\n{actual}\nexpected:\n{expected}"
            )
        self.count += 1


def world_rank() -> int:
    for variable in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if variable in os.environ:
            return int(os.environ[variable])
    return 0


def main(scenarios: dict[str, Callable[[list[str]], int]]) -> None:
    """Run the scenario named by argv[1]; print one verdict line per rank; exit at once (os._exit) on
    failure so that a broken rank never sits in MPI_Finalize waiting for peers."""
    rank = world_rank()
    try:
        # --run-id=... only marks the processes of one test run (to find leftovers); not an argument.
        args = [arg for arg in sys.argv[2:] if not arg.startswith("--run-id=")]
        checks = scenarios[sys.argv[1]](args)
    except BaseException as error:  # every failure must end this rank with a verdict line
        fail(rank, error)
    print(f"<<<RANK {rank} OK {checks}>>>", flush=True)


VERDICT_DIR_ENV = "LLMIR_TEST_VERDICT_DIR"  # set by tests/test_collectives_mpi.py's launch()
_WAIT_FOR_PEERS_S = 120.0


def fail(rank: int, error: BaseException, wait_for: Collection[int] = ()) -> None:
    """Print this rank's ERROR verdict and exit 1 at once, or once the ranks in `wait_for` have printed
    theirs (each rank also records its verdict as a file in the run's verdict folder): under hydra's
    default cleanup, this rank's exit gets the others killed, so a rank whose peers are known to fail
    too waits for their verdicts rather than for a guessed number of seconds."""
    if os.environ.get("LLMIR_TEST_TRACEBACK"):
        traceback.print_exception(error)
    message = " ".join(str(error).split())
    print(f"<<<RANK {rank} ERROR {type(error).__name__}: {message}>>>", flush=True)
    sys.stderr.flush()
    folder = os.environ.get(VERDICT_DIR_ENV)
    if folder:
        Path(folder, f"rank{rank}").touch()
        deadline = time.monotonic() + _WAIT_FOR_PEERS_S
        while time.monotonic() < deadline and not all(Path(folder, f"rank{peer}").exists() for peer in wait_for):
            time.sleep(0.05)
    os._exit(1)
