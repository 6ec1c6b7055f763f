"""A tp rank's model not yet made: tp rank 0's model with this rank's weights and pipeline peers.

Every tp rank of a stage runs the same graph; only the weights it holds and the peers of its Send/Recv
differ. The partition makes tp rank 0's model as a graph and every other tp rank as a `TpRankCopy` of it.
The patch that turns tp rank 0's model into another tp rank's is written once, on the serialized model
(`TpRankCopy.patch`): the plan writer (plan/emit.py) applies it to tp rank 0's saved model file instead of
copying the graph, and `materialize`, which makes the graph where one is needed, reads a patched
serialization back. The weights are not part of the patch: they are the rank's own tensors
(`initializer_tensors`), which the plan writer places and `materialize` attaches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.ir_io import graph_protos, initializer_tensors
from llmir_onnx.mesh import MESH_AXES, DeviceMesh, MeshCoords

# The external-data location of the stand-ins that keep a weight's bytes out of a serialization.
_UNREAD_LOCATION = "llmir.unread"


@dataclass(frozen=True)
class TpRankCopy:
    """Tp rank `tp_rank`'s model, not yet made: tp rank 0's (`source`, a whole model or one pipeline
    stage of it) with other weights and Send/Recv peers. Every tp rank runs the same graph.

    `weights` are the rank's initializers by name; `changed` names those that differ from tp rank 0's
    (sliced weights, rank constants), `peers` maps each Send/Recv peer of the source to this rank's.
    `groups` maps a collective's group in the source to this rank's (context parallelism: the source's
    groups are its cp rank's and tp rank's; empty without cp, where every tp rank shares the tp group).
    `patch` is the one definition of how the copy's graph differs from the source's; `materialize`
    makes the model from it (a plan writer patches the source's serialized model instead, which is what
    the copies are for).
    """

    source: ir.Model
    tp_rank: int
    weights: Mapping[str, ir.TensorProtocol]
    changed: frozenset[str]
    peers: Mapping[int, int]
    groups: Mapping[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)

    def patch(self, proto: onnx.ModelProto) -> None:
        """Turn `proto`, the source's serialized model (subgraphs included), into this rank's: its Send/Recv
        peers. The weights are placed by the caller (`initializer_tensors` says which they are)."""
        for node in (node for graph in graph_protos(proto.graph) for node in graph.node):
            if node.domain == ops.LLMIR_DOMAIN and node.op_type in ops.PIPELINE_OPS:
                for attribute in node.attribute:
                    if attribute.name == "peer":
                        attribute.i = self.peers[attribute.i]
            elif self.groups and node.domain == ops.LLMIR_DOMAIN:
                for attribute in node.attribute:
                    if attribute.name == "group" and tuple(attribute.ints) in self.groups:
                        attribute.ints[:] = self.groups[tuple(attribute.ints)]

    def materialize(self) -> ir.Model:
        """The copy made as a graph: the source serialized without its weights' bytes, `patch`ed and read
        back, holding this rank's tensors (the same objects, lazy where the source's are)."""
        proto = _proto_without_weight_bytes(self.source)
        self.patch(proto)
        model = ir.serde.deserialize_model(proto)
        tensors = self.initializer_tensors()
        for name, value in model.graph.initializers.items():
            if name in tensors:
                value.const_value = tensors[name]
        return model

    def initializer_tensors(self) -> dict[str, ir.TensorProtocol]:
        """The model's initializers by name, as `ir_io.initializer_tensors` of the made model."""
        return {
            name: self.weights[name] if name in self.changed else tensor
            for name, tensor in initializer_tensors(self.source).items()
        }


def _proto_without_weight_bytes(model: ir.Model) -> onnx.ModelProto:
    """`model` serialized with each main-graph initializer as an external reference to nowhere (dtype and
    shape kept, no byte read: its tensor may be a lazy slice of a multi-GB file). The model is unchanged
    afterwards."""
    held = initializer_tensors(model)
    values = model.graph.initializers
    try:
        for name, tensor in held.items():
            values[name].const_value = ir.ExternalTensor(
                _UNREAD_LOCATION,
                0,
                tensor.nbytes,
                tensor.dtype,
                shape=ir.Shape(tensor.shape.numpy()),  # a weight's dims are static
                name=tensor.name or name,
            )
        return ir.serde.serialize_model(model)
    finally:
        for name, tensor in held.items():
            values[name].const_value = tensor


def tp_rank_copy(
    source: ir.Model,
    tp_rank: int,
    weights: Mapping[str, ir.TensorProtocol],
    first_weights: Mapping[str, ir.TensorProtocol],
    peers: Mapping[int, int] | None = None,
    groups: Mapping[tuple[int, ...], tuple[int, ...]] | None = None,
) -> TpRankCopy:
    """Tp rank `tp_rank`'s copy of `source` (tp rank 0's, holding `first_weights`)."""
    changed = frozenset(name for name, tensor in weights.items() if tensor is not first_weights.get(name))
    return TpRankCopy(source, tp_rank, weights, changed, dict(peers or {}), dict(groups or {}))


def moved_rank_copy(
    source: ir.Model,
    mesh: DeviceMesh,
    rank: int,
    weights: Mapping[str, ir.TensorProtocol],
    first_weights: Mapping[str, ir.TensorProtocol],
) -> TpRankCopy:
    """Rank `rank`'s copy of `source`, the model of another rank of its pipeline stage (holding
    `first_weights`): its Send/Recv peers and collective groups moved to `rank`'s coordinates on every
    mesh axis they do not span (a peer keeps its stage, a tp group its tp ranks, a cp group its cp ranks)."""
    target = mesh.coords(rank)
    peers: dict[int, int] = {}
    groups: dict[tuple[int, ...], tuple[int, ...]] = {}
    for node in ir.traversal.RecursiveGraphIterator(source.graph):
        if node.domain != ops.LLMIR_DOMAIN:
            continue
        if node.op_type in ops.PIPELINE_OPS:
            peer = node.attributes["peer"].as_int()
            peers[peer] = mesh.rank_of(dataclasses.replace(mesh.coords(peer), cp=target.cp, tp=target.tp))
        group = node.attributes.get("group")
        members = tuple(group.as_ints()) if group is not None else ()
        if members:
            groups[members] = _moved_group(mesh, members, target)
    return tp_rank_copy(source, target.tp, weights, first_weights, peers, groups)


def _moved_group(mesh: DeviceMesh, members: tuple[int, ...], target: MeshCoords) -> tuple[int, ...]:
    coords = [mesh.coords(member).as_dict() for member in members]
    fixed: dict[str, int] = {axis: getattr(target, axis) for axis in MESH_AXES if len({c[axis] for c in coords}) == 1}
    return tuple(mesh.rank_of(MeshCoords(**{**c, **fixed})) for c in coords)
