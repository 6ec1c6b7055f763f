"""A tp rank's model not yet made: tp rank 0's model with this rank's weights and pipeline peers.

Every tp rank of a stage runs the same graph; only the weights it holds and the peers of its Send/Recv
differ. The partition makes tp rank 0's model as a graph and every other tp rank as a `TpRankCopy` of it;
the plan writer (plan/emit.py) patches tp rank 0's serialized model with a copy's differences instead of
copying the graph, and `materialize` makes the graph where one is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.ir_io import initializer_tensors


@dataclass(frozen=True)
class TpRankCopy:
    """Tp rank `tp_rank`'s model, not yet made: tp rank 0's (`source`, a whole model or one pipeline
    stage of it) with other weights and Send/Recv peers. Every tp rank runs the same graph.

    `weights` are the rank's initializers by name; `changed` names those that differ from tp rank 0's
    (sliced weights, rank constants), `peers` maps each Send/Recv peer of the source to this rank's.
    `materialize` makes the model (a graph copy); a plan writer can instead patch the source's
    serialized model with the same differences, which is what the copies are for.
    """

    source: ir.Model
    tp_rank: int
    weights: Mapping[str, ir.TensorProtocol]
    changed: frozenset[str]
    peers: Mapping[int, int]

    def materialize(self) -> ir.Model:
        model = self.source.clone()
        for name, value in model.graph.initializers.items():
            if name in self.changed:
                value.const_value = self.weights[name]
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain == ops.LLMIR_DOMAIN and node.op_type in ops.PIPELINE_OPS:
                node.attributes["peer"] = ir.AttrInt64("peer", self.peers[node.attributes["peer"].as_int()])
        return model

    def initializer_tensors(self) -> dict[str, ir.TensorProtocol]:
        """The model's initializers by name, as `ir_io.initializer_tensors` of the made model."""
        return {
            name: self.weights[name] if name in self.changed else tensor
            for name, tensor in initializer_tensors(self.source).items()
        }


def tp_rank_copy(
    source: ir.Model,
    tp_rank: int,
    weights: Mapping[str, ir.TensorProtocol],
    first_weights: Mapping[str, ir.TensorProtocol],
    peers: Mapping[int, int] | None = None,
) -> TpRankCopy:
    """Tp rank `tp_rank`'s copy of `source` (tp rank 0's, holding `first_weights`)."""
    changed = frozenset(name for name, tensor in weights.items() if tensor is not first_weights.get(name))
    return TpRankCopy(source, tp_rank, weights, changed, dict(peers or {}))
