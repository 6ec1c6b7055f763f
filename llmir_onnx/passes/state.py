"""What the sharding passes share: the plan they build up one pass at a time, passed explicitly.

Each pass takes a `ShardingState` as a constructor input and returns it in its `ShardingPassResult`
(`result.state`); the next pass is constructed with that state. A pass checks in `requires` that the
state and the graph hold what it needs (naming the pass that provides it), so any pass runs alone on a
model and a state prepared by the passes before it (tests/test_pass_contracts.py). Nothing records
which passes ran: a pass reads the facts themselves (global shapes and roles, a placement per value,
redistributions still read by their consumer, the `LOCALIZED_KEY` entry of the model's metadata).

Why a typed object rather than only the IR: the plan holds what ONNX cannot spell or would spell at a
cost. Placements with blocks, repeated parts, inner blocks or uneven shares have no IR v11 sharding
spec (`annotations._spec`); rank constants are functions of the tp rank; weight views and the
redistributions are per-input facts. Writing and reparsing a string per value on every pass would
cost partition time on deep models (one per value, 10^5 in a 32-layer model), and anything written on
the graph would be written into the rank files, which must stay byte-identical. The one fact kept in
the IR is whether the graph is localized, because only the graph can tell (its sizes are local then).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from llmir_onnx.mesh import DeviceMesh
from llmir_onnx.placement import Placement, Replicate, Shard
from llmir_onnx.propagation.base import Shape, WeightRole

# Model metadata that LocalizePass writes on the graph it localized ("<tp rank>/<tp>"); materialize_rank
# removes it from the rank model it makes, so rank files carry no trace of it.
LOCALIZED_KEY = "llmir.localized_for_tp_rank"


@dataclass(frozen=True)
class Redistribution:
    """Input `index` of node `node` holds `current` but its rule needs `required`."""

    node: str
    index: int
    value: str
    current: Placement
    required: Placement


@dataclass
class ShardingState:
    """The plan, filled in by the passes in order. What each pass provides:

    * given by the caller: mesh, replicate_unsupported, vocab_parallel, keep_output_placements,
      input_seeds, tp_weights;
    * AnnotatePass: shapes (global), roles, attention_heads, head_counts, the mesh's uneven tp_shares;
    * PropagatePass: placements, redistributions, output_targets, weight_placements, weight_views,
      warnings (and shapes of the weight copies it makes);
    * SequenceParallelPass (--sp): sequence_shards (and rewrites redistributions);
    * ContextParallelPass (--cp): context_shards, cp_rank_constants (and renames redistributions);
    * InsertCollectivesPass and LocalizePass: placements, shapes and rank_constants of the values they make.
    """

    mesh: DeviceMesh
    replicate_unsupported: bool = False
    vocab_parallel: bool = False
    # Tests look at raw Partial/fused outputs; a real plan reduces them before they leave the graph.
    keep_output_placements: bool = False
    # Seeds for graph inputs (tests and callers that know an input's layout); the rest are free.
    input_seeds: dict[str, Placement] = field(default_factory=dict)
    # Per-rank weights of an uneven tp split (a faster device gets more heads); None: equal.
    tp_weights: tuple[float, ...] | None = None
    # The model's query head count (annotate reads it; uneven shares split it).
    attention_heads: int | None = None
    # Every head count of the model (query and kv heads): uneven shares keep each rank on whole kv groups.
    head_counts: tuple[int, ...] = ()
    shapes: dict[str, Shape] = field(default_factory=dict)
    roles: dict[str, WeightRole] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    redistributions: list[Redistribution] = field(default_factory=list)
    # Output redistributions: graph output name -> placement it must have.
    output_targets: dict[str, Placement] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Initializer name -> placement; localize slices it per rank.
    weight_placements: dict[str, Placement] = field(default_factory=dict)
    # Initializer name -> the shape it is viewed as while it is sliced (flat quantization scales).
    weight_views: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Initializer name -> its value on a given tp rank (rank-dependent constants such as slice offsets).
    rank_constants: dict[str, Callable[[int], np.ndarray]] = field(default_factory=dict)
    # Sequence parallelism (--sp): values computed on a chunk of the tokens, Shard(token axis) over the tp
    # group (passes/sequence_parallel.py); their tp placement above stays what propagation decided.
    sequence_shards: dict[str, Placement] = field(default_factory=dict)
    # PropagatePass: some split axis (a vocabulary, an MLP's columns) that neither tp nor the heads' units
    # divide is cut into parts of one element (`Shard.shares` over its size): tp ranks' sizes differ.
    element_split: bool = False
    # Context parallelism (--cp): values computed on a chunk of the tokens, Shard(token axis) over the cp
    # group (passes/context_parallel.py), their tp placement above as propagation decided; and the
    # initializers that hold the cp rank (value 0 in the plan's graph), by name -> value on a cp rank.
    context_shards: dict[str, Placement] = field(default_factory=dict)
    cp_rank_constants: dict[str, Callable[[int], np.ndarray]] = field(default_factory=dict)

    @property
    def tp(self) -> int:
        return self.mesh.tp

    @property
    def tp_units(self) -> int:
        """The parts propagation splits every axis into: tp, or with uneven shares their sum."""
        return self.mesh.tp_units

    @property
    def uneven(self) -> bool:
        """Whether tp ranks hold parts of different sizes (each then has its own localized graph)."""
        return bool(self.mesh.tp_shares) or self.element_split


@dataclass
class ShardingPassResult(ir.passes.PassResult):
    """A sharding pass's result: the model and the state the next pass takes (`PassNext(result.state)`)."""

    state: ShardingState


def precondition(condition: bool, message: str) -> None:
    """A pass's `requires` check: one line naming what is missing and which pass provides it."""
    if not condition:
        raise ir.passes.PreconditionError(message)


def require_annotated(state: ShardingState, what: str) -> None:
    precondition(bool(state.shapes), f"{what} needs the global shapes in its ShardingState: run AnnotatePass first")


def require_propagated(model: ir.Model, state: ShardingState, what: str) -> None:
    """Every graph input and output has a placement (PropagatePass gives one to every value)."""
    require_annotated(state, what)
    graph = model.graph
    missing = next((v.name for v in [*graph.inputs, *graph.outputs] if v.name not in state.placements), None)
    precondition(
        missing is None, f"{what} needs a placement for every value, {missing!r} has none: run PropagatePass first"
    )


def pending_redistributions(model: ir.Model, state: ShardingState, with_whole: bool = False) -> list[Redistribution]:
    """The redistributions whose consumer still reads the value as it is held (not yet converted). A shard
    that holds everything is converted to itself (nothing is inserted): listed only `with_whole`."""
    if state.tp == 1 or not state.redistributions:
        return []  # at tp 1 every placement is the whole tensor: nothing to convert
    nodes = {node.name: node for node in ir.traversal.RecursiveGraphIterator(model.graph)}
    pending = []
    for item in state.redistributions:
        node = nodes.get(item.node)
        read = node.inputs[item.index] if node is not None and item.index < len(node.inputs) else None
        whole = isinstance(item.current, Shard) and item.current.holds_everything()
        if whole and isinstance(item.required, Replicate) and not with_whole:
            continue
        if read is not None and read.name == item.value:
            pending.append(item)
    return pending


def pending_output_targets(model: ir.Model, state: ShardingState) -> list[str]:
    """Graph outputs that do not yet hold the placement they must leave the graph with."""
    if state.tp == 1:
        return []
    return [
        v.name
        for v in model.graph.outputs
        if v.name in state.output_targets and state.placements.get(v.name) != state.output_targets[v.name]
    ]


def subgraphs_of(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node holds in its attributes (If branches, Loop and Scan bodies), not nested ones."""
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def control_flow_owners(graph: ir.Graph) -> dict[ir.Node, ir.Node]:
    """Every node inside a subgraph (at any depth) -> the node of `graph` that holds it."""
    owners: dict[ir.Node, ir.Node] = {}
    for node in graph:
        for subgraph in subgraphs_of(node):
            for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                owners[inner] = node
    return owners
