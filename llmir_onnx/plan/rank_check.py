"""Every rank model a partition writes passes onnx.checker before the plan is published.

A rank model that onnxruntime refuses is a partition bug found only at deployment; most such models
(a stale declared shape, an op wired to the wrong input count, an attribute out of range) fail
onnx's full check, which runs the op schemas' shape inference with the ai.llmir schemas
registered. It is run by path, so models over 2 GiB work and weights are never read; it costs
about 0.15 s for a 32-layer 7B-shaped graph.

Some exports fail the full check themselves: the onnxruntime-genai builder declares intermediate
shapes (value_info) that onnx's own inference contradicts. For those, what can be asked of a rank
is what its source passes: the full check with the declared intermediate shapes dropped (shape
inference over the ops alone), else the structural check.
"""

from __future__ import annotations

import functools
from pathlib import Path

import onnx

from llmir_onnx import ops
from llmir_onnx.errors import PlanError

FULL = "full"
WITHOUT_VALUE_INFO = "full, declared intermediate shapes dropped"
STRUCTURAL = "structural"


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _failure(path: Path, level: str) -> str | None:
    """Why the model at `path` fails the check at `level`, or None when it passes."""
    try:
        if level == FULL:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(str(path))
            if level == WITHOUT_VALUE_INFO:
                # the full check's shape inference, on the graph alone (by path the checker would
                # read the declared shapes back from the file)
                proto = onnx.load(str(path), load_external_data=False)
                del proto.graph.value_info[:]
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return _first_line(error)
    return None


@functools.lru_cache(maxsize=8)
def _source_level(source_path: Path, mtime_ns: int) -> str:
    """The strictest check the source model passes (its rank models must pass it too)."""
    for level in (FULL, WITHOUT_VALUE_INFO):
        if _failure(source_path, level) is None:
            return level
    return STRUCTURAL


def check_rank_model(path: Path, rank: int, source_path: Path) -> None:
    """PlanError naming the rank, the node and the checker's reason when the rank model at `path` fails
    the strictest check its source model passes."""
    ops.register_schemas()
    if _failure(path, FULL) is None:
        return
    level = _source_level(source_path.resolve(), source_path.stat().st_mtime_ns) if source_path.is_file() else FULL
    reason = _failure(path, level)
    if reason is not None:
        raise PlanError(
            f"rank {rank}'s model would not load: onnx.checker ({level} check) says: {reason}; this is a "
            "partition bug: please report it with the model (nothing was written)"
        )
