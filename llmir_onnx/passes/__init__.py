"""The sharding passes, in pipeline order: annotate, propagate, (sequence_parallel,) (context_parallel,)
insert_collectives, localize. Each takes the ShardingState that the one before returned in its
ShardingPassResult (passes/state.py)."""

from llmir_onnx.passes.annotate import AnnotatePass
from llmir_onnx.passes.insert_collectives import InsertCollectivesPass
from llmir_onnx.passes.localize import LocalizePass, materialize_rank
from llmir_onnx.passes.propagate import PropagatePass
from llmir_onnx.passes.state import Redistribution, ShardingPassResult, ShardingState

__all__ = [
    "AnnotatePass",
    "InsertCollectivesPass",
    "LocalizePass",
    "PropagatePass",
    "Redistribution",
    "ShardingPassResult",
    "ShardingState",
    "materialize_rank",
]
