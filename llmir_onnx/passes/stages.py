"""Pipeline stage split: cut one model into P stage models that hand values over with Send/Recv.

The input is one model: the original, or one tp rank's already tensor-parallel model (then each tp
rank is cut the same way, and stage s of tp rank t talks to stage s +- 1 of the same tp rank).

Where the layers are. Decoder layers are found by name first: the node name (`/model/layers.3/...`,
`/transformer/h.3/...`), else the exporter's scope metadata (torch dynamo's `namespace`,
`pkg.torch.onnx.name_scopes`), else output or weight names (`model.layers.3.self_attn.q_proj.weight`).
The layer count is the number of distinct KV cache inputs (`past...N...`) when the model has them, so a
name index beyond it (the genai builder's `/model/layers.{L}/final_norm_layernorm`) is not a layer. A
model without such names falls back on its KV cache structure: a node belongs to the first layer
whose KV cache input it feeds (the residual stream flows from layer N's attention into layer N+1's),
so stages are cut right after a layer's attention; correct, with a little more to send.

Where each node goes. A node is *replicable* when everything it reads comes from model inputs,
weights and other replicable nodes, and it is not "heavy": the attention mask, rotary cos/sin,
position arithmetic, shape computations, Identity copies and transposes of weights (a tied lm_head's
table). Replicable nodes are recomputed in every stage that reads them instead of being sent: they
are cheap, and the model inputs they need are fed to each stage that needs them. Heavy nodes
(multiplying input-derived data by a weight matrix, or reading more than
`replicate_max_weight_bytes` of weights: a large embedding or rotary table), nodes reading the data
of a KV cache input, and everything downstream of them are placed: on the stage of their layer, or,
when unnamed, on the latest stage among their producers (so a large embedding lands on stage 0, the
final norm and lm_head on the last); a node never runs before a value it reads. A small embedding
table (tiny test models) is replicable, hence computed on the stage that reads it: stage 0.
Reading only a KV cache's *shape* does not tie a node to that layer: exporters take the batch size
and past length from any layer's cache (torch dynamo: the last one's), so in each stage such a Shape
is rewired to one of the stage's own caches that provably has the same dims where they are read (the
same declared shape; else batch for batch, static for equal static, past length for past length when
no layer keeps a shorter cache than another: `_KvShapeSources`), and each stage is fed only its own
layers' caches; where that cannot be proven the split is refused. A graph output of replicated nodes
comes from the last stage only.

What crosses. Every value produced on stage p and read on stage m > p is sent p -> p+1 -> ... -> m:
each intermediate stage receives it and sends it on, even if it does not use it. Each crossing value
has its own tag. Deadlock freedom does not rely on onnxruntime's node order: on each link the Sends
and the Recvs follow one canonical order (the original topological order of the producers), made
explicit by data dependencies: Recv k's dtype-carrying input is an empty slice of Recv k-1's output,
and Send k's input is reshaped to its own shape plus 0 x (Send k-1's output). Send outputs are graph
outputs named `llmir.sent.<tag>` (so nothing prunes them); they are in no binding.

Collectives. A tp rank's model holds ai.llmir collectives whose `group` lists tp ranks (the
partitioner works on a pp = 1 mesh, where global rank = tp rank; no `group` = the whole pp = 1
world). On stage s they are rewritten to the global ranks of stage s's tp group (via DeviceMesh).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common  # ir.passes.common's ShapeInferencePass (the package does not import it itself)

from llmir_onnx.errors import InputModelError, LlmirError, PlanError
from llmir_onnx.ir_io import MAX_IR_VERSION
from llmir_onnx.mesh import DeviceMesh, MeshCoords
from llmir_onnx.model_facts import (
    BATCH,
    CLI_HINT,
    PAST,
    dim_roles,
    kv_cache_layers,
    layer_of_node_by_name,
)
from llmir_onnx.ops import (
    ALL_GATHER,
    ALL_REDUCE,
    LLMIR_DOMAIN,
    LLMIR_OPSET_VERSION,
    PIPELINE_OPS,
    REDUCE_SCATTER,
    recv_like_initializer,
    recv_node,
    send_node,
)
from llmir_onnx.plan.manifest import SliceBinding
from llmir_onnx.plan.memory import unequal_kv_cache_lengths
from llmir_onnx.plan.shapes import default_max_seq, types_in_input_terms
from llmir_onnx.plan.stage_balance import (
    NodeCost,
    StageBalance,
    StageUnit,
    balance_stages,
    default_node_cost,
    stage_layer_ranges,
    subgraph_nodes,
    unit_from_nodes,
)
from llmir_onnx.plan.tp_rank_copy import TpRankCopy, tp_rank_copy

SENT_OUTPUT_PREFIX = "llmir.sent."
DEFAULT_REPLICATE_MAX_WEIGHT_BYTES = 1 << 20

# contrib ops whose first output has the dtype of their first input (onnx shape inference does not know them)
_DTYPE_OF_FIRST_INPUT_OPS = frozenset(
    {
        "SkipSimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "LayerNormalization",
        "GroupQueryAttention",
        "MultiHeadAttention",
        "Attention",
        "RotaryEmbedding",
        "MatMulNBits",
        "FastGelu",
        "BiasGelu",
        "QuickGelu",
        "Gelu",
        "BiasAdd",
        "FusedMatMul",
    }
)
_COLLECTIVES = frozenset({ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER})


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PipelineStage:
    """One stage's model and how to feed it (bindings map the INPUT model's names to this stage's)."""

    stage: int
    rank: int
    model: ir.Model
    inputs: list[SliceBinding]
    outputs: list[SliceBinding]
    layers: range
    received: tuple[str, ...]  # crossing values this stage receives from stage - 1, in order
    sent: tuple[str, ...]  # crossing values this stage sends to stage + 1, in order


@dataclass(frozen=True)
class StageSplitResult:
    stages: tuple[PipelineStage, ...]
    num_layers: int
    layer_source: str  # "names" or "kv-cache structure"
    balance: StageBalance | None  # None when the cuts were given


# --------------------------------------------------------------------------- layer analysis


def _owner_map(graph: ir.Graph) -> dict[ir.Node, ir.Node]:
    """Top-level node of every node (itself, or the If/Loop/Scan whose subgraph holds it)."""
    owner: dict[ir.Node, ir.Node] = {}
    for node in graph:
        owner[node] = node
        for inner in subgraph_nodes(node):
            owner[inner] = node
    return owner


def _reads(node: ir.Node, owner: dict[ir.Node, ir.Node]) -> list[ir.Value]:
    """Values of the top-level graph a node reads: its inputs and what its subgraphs capture."""
    values = [v for v in node.inputs if v is not None]
    inner_nodes = subgraph_nodes(node)
    if not inner_nodes:
        return values
    defined_inside: set[ir.Value] = set()
    for inner in inner_nodes:
        defined_inside.update(inner.outputs)
        if inner.graph is not None:
            defined_inside.update(inner.graph.inputs)
            defined_inside.update(inner.graph.initializers.values())
    for inner in inner_nodes:
        values.extend(v for v in inner.inputs if v is not None and v not in defined_inside)
    return values


def _consumers(value: ir.Value, owner: dict[ir.Node, ir.Node]) -> set[ir.Node]:
    return {owner.get(use.node, use.node) for use in value.uses()}


@dataclass
class _Placement:
    num_layers: int
    layer_source: str
    replicable: set[ir.Node]
    position: dict[ir.Node, int]  # non-replicable nodes: -1 before layer 0, else the layer
    order: dict[ir.Node, int]  # topological index
    owner: dict[ir.Node, ir.Node]
    kv_layers: dict[ir.Value, int]  # past KV cache inputs -> layer


def _weight_bytes_read(node: ir.Node) -> int:
    total = 0
    for each in (node, *subgraph_nodes(node)):
        for value in each.inputs:
            if value is not None and value.const_value is not None and value.producer() is None:
                total += int(value.const_value.nbytes)
    return total


_WEIGHT_MATMUL_OPS = frozenset({"MatMul", "Gemm", "MatMulInteger", "FusedMatMul", "MatMulNBits", "Conv", "Einsum"})


def _multiplies_weight_matrix(node: ir.Node) -> bool:
    """Whether a node multiplies by a weight with two or more non-trivial dims (a projection)."""
    for each in (node, *subgraph_nodes(node)):
        if each.op_type not in _WEIGHT_MATMUL_OPS:
            continue
        for value in each.inputs:
            if value is None or value.const_value is None or value.producer() is not None:
                continue
            if sum(1 for d in value.const_value.shape.numpy() if d > 1) >= 2:  # a weight's shape is static
                return True
    return False


def analyze_layers(model: ir.Model, replicate_max_weight_bytes: int = DEFAULT_REPLICATE_MAX_WEIGHT_BYTES) -> _Placement:
    """Which layer each node belongs to, and which nodes are replicable (see the module docstring)."""
    graph = model.graph
    nodes = list(graph)
    order = {node: index for index, node in enumerate(nodes)}
    owner = _owner_map(graph)
    for node in nodes:
        for value in _reads(node, owner):
            producer = value.producer()
            if producer is not None and order.get(owner.get(producer, producer), -1) > order[node]:
                raise InputModelError(
                    f"node {node.name!r} ({node.op_type}) reads {value.name!r} before it is computed: the graph "
                    "is not topologically sorted; sort it (onnx_ir TopologicalSortPass) first"
                )

    kv_layers = kv_cache_layers(graph)
    named = {node: layer_of_node_by_name(node) for node in nodes}
    if kv_layers:
        num_layers = len(set(kv_layers.values()))
        if sorted(set(kv_layers.values())) != list(range(num_layers)):
            raise InputModelError(
                f"the KV cache inputs name layers {sorted(set(kv_layers.values()))}, not 0..{num_layers - 1}; "
                "pipeline stages need the layers numbered from 0"
            )
    else:
        indices = {layer for layer in named.values() if layer is not None}
        num_layers = max(indices) + 1 if indices else 0
    labels = {node: layer for node, layer in named.items() if layer is not None and layer < num_layers}
    layer_source = "names"
    if num_layers == 0 or len(set(labels.values())) < num_layers:
        labels = _labels_from_kv_cache(nodes, kv_layers, owner)
        layer_source = "kv-cache structure"
    if num_layers == 0 or len(set(labels.values())) < num_layers:
        raise InputModelError(
            "cannot find the decoder layers: no node, scope or weight name carries a layer index "
            "(layers.N, h.N, blocks.N) and the past KV cache inputs do not show them either; name the layers"
        )

    # A node is replicable unless it is "heavy" (multiplies model-input-derived data by a weight matrix,
    # or reads more than replicate_max_weight_bytes of weights: projections, a large embedding or
    # rotary table), reads the data of a KV cache input (only its layer's stage is fed it), or reads a
    # value of a non-replicable node.
    replicable: set[ir.Node] = set()
    position: dict[ir.Node, int] = {}
    reads_model_input: dict[ir.Value, bool] = {v: True for v in graph.inputs}
    for node in nodes:
        reads = _reads(node, owner)
        producers = {owner.get(p, p) for v in reads if (p := v.producer()) is not None}
        touches_input = any(reads_model_input.get(v, False) for v in reads)
        for value in node.outputs:
            reads_model_input[value] = touches_input
        upstream = [position[p] for p in producers if p not in replicable]
        # reading only a KV cache's shape does not tie a node to that layer: see _KvShapeSources
        kv_read = [] if node.op_type in _SHAPE_ONLY_OPS else [kv_layers[v] for v in reads if v in kv_layers]
        heavy = touches_input and (
            _multiplies_weight_matrix(node) or _weight_bytes_read(node) > replicate_max_weight_bytes
        )
        if not heavy and not kv_read and not upstream:
            replicable.add(node)
            continue
        position[node] = max([labels.get(node, -1), *kv_read, *upstream])
    return _Placement(num_layers, layer_source, replicable, position, order, owner, kv_layers)


_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def _labels_from_kv_cache(
    nodes: list[ir.Node], kv_layers: dict[ir.Value, int], owner: dict[ir.Node, ir.Node]
) -> dict[ir.Node, int]:
    """Fallback: a node belongs to the first layer whose KV cache input it feeds (or reads the data of)."""
    labels: dict[ir.Node, int] = {}
    for node in nodes:
        if node.op_type in _SHAPE_ONLY_OPS:
            continue
        anchors = [kv_layers[v] for v in _reads(node, owner) if v in kv_layers]
        if anchors:
            labels[node] = min(anchors)
    downstream: set[ir.Node] = set(labels)
    for node in nodes:
        if node in downstream:
            continue
        if any((p := v.producer()) is not None and owner.get(p, p) in downstream for v in _reads(node, owner)):
            downstream.add(node)
    for node in reversed(nodes):
        if node in labels or node not in downstream:
            continue
        consumer_labels = [labels[c] for value in node.outputs for c in _consumers(value, owner) if c in labels]
        if consumer_labels:
            labels[node] = min(consumer_labels)
    return labels


# --------------------------------------------------------------------------- cost units


def layer_units(
    model: ir.Model,
    node_cost: NodeCost = default_node_cost,
    replicate_max_weight_bytes: int = DEFAULT_REPLICATE_MAX_WEIGHT_BYTES,
    placement: _Placement | None = None,
) -> tuple[StageUnit, list[StageUnit], StageUnit]:
    """(embedding, layers, head) cost units of a model, for `balance_stages`.

    The embedding is what is placed before layer 0; the head is every node after the last layer's
    own nodes (final norm, lm_head). A replicable node counts in every unit that reads it (it is
    recomputed there, and its weights are held there). `placement`: the model's `analyze_layers`,
    when the caller has it already.
    """
    if placement is None:
        placement = analyze_layers(model, replicate_max_weight_bytes)
    count = placement.num_layers
    embedding, head = -1, count  # unit indices besides the layers 0 .. count-1
    last_layer_own = _last_layer_own_nodes(model, placement)
    unit_of: dict[ir.Node, set[int]] = {}
    for node, position in placement.position.items():
        unit_of[node] = {head if position == count - 1 and node not in last_layer_own else position}
    graph_outputs = set(model.graph.outputs)
    for node in reversed(list(model.graph)):
        if node not in placement.replicable:
            continue
        units: set[int] = set()
        for value in node.outputs:
            if value in graph_outputs:
                units.add(head)
            for consumer in _consumers(value, placement.owner):
                units |= unit_of.get(consumer, set())
        unit_of[node] = units
    members: dict[int, list[ir.Node]] = {index: [] for index in range(embedding, head + 1)}
    for node in model.graph:
        for index in unit_of[node]:
            members[index].append(node)
    return (
        unit_from_nodes("embedding", members[embedding], node_cost),
        [unit_from_nodes(f"layer {i}", members[i], node_cost) for i in range(count)],
        unit_from_nodes("lm_head", members[head], node_cost),
    )


def _last_layer_own_nodes(model: ir.Model, placement: _Placement) -> set[ir.Node]:
    """The last layer's nodes proper (the rest of its stage position is the head)."""
    last = placement.num_layers - 1
    candidates = [n for n in model.graph if placement.position.get(n) == last]
    if placement.layer_source == "names":
        return {n for n in candidates if layer_of_node_by_name(n) == last}
    # structural fallback: up to the last node that reads the last layer's KV cache
    last_kv = {v for v, layer in placement.kv_layers.items() if layer == last}
    readers = [i for i, n in enumerate(candidates) if any(v in last_kv for v in _reads(n, placement.owner))]
    return set(candidates[: readers[-1] + 1]) if readers else set()


# --------------------------------------------------------------------------- types of crossing values


def _copy_shape(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None else ir.Shape(list(shape))


def _crossing_types(model: ir.Model, names: set[str]) -> dict[str, tuple[ir.DataType, ir.Shape | None]]:
    """dtype and shape of the named values, dims named by the input dims they equal (batch_size, ...),
    not `unk__87`: from the shape planner's evaluation, else as declared, else from onnx shape inference.
    """
    values = {v.name: v for n in model.graph for v in n.outputs if v.name in names}
    declared = {name: (v.dtype, v.shape) for name, v in values.items()}
    try:
        evaluated = types_in_input_terms(model, names)
    except LlmirError:
        # Only the Recv's declared shape is at stake (the data's shape travels by handshake at run
        # time); a model the shape planner cannot evaluate keeps the types its exporter declared.
        evaluated = {}
    types: dict[str, tuple[ir.DataType, ir.Shape | None]] = {}
    for name in names:
        dtype, shape = declared.get(name, (None, None))
        if name in evaluated:
            evaluated_dtype, dims = evaluated[name]
            old = list(shape) if shape is not None and len(shape) == len(dims) else [None] * len(dims)
            shape = ir.Shape([new if new is not None else prior for new, prior in zip(dims, old, strict=True)])
            dtype = dtype or evaluated_dtype
        if dtype is not None:
            types[name] = (dtype, shape)
    missing = names - types.keys()
    if missing:
        types.update(_inferred_types(model, missing, values))
    return types


def _inferred_types(
    model: ir.Model, missing: set[str], values: dict[str, ir.Value]
) -> dict[str, tuple[ir.DataType, ir.Shape | None]]:
    """dtype and shape of the named values by onnx shape inference on a copy of the model."""
    known: dict[str, tuple[ir.DataType, ir.Shape | None]] = {}
    copy = ir.Model(model.graph.clone(), ir_version=model.ir_version, functions=list(model.functions.values()))
    inferred = ir.passes.common.ShapeInferencePass(strict_mode=False)(copy).model
    inferred_values = {v.name: v for n in inferred.graph for v in n.outputs if v.name in missing}
    # contrib ops onnx does not know: propagate the dtype of their first input, in graph order
    dtypes = {v.name: v.dtype for n in inferred.graph for v in n.outputs if v.dtype is not None}
    dtypes.update({v.name: v.dtype for v in inferred.graph.inputs if v.dtype is not None})
    dtypes.update({name: v.dtype for name, v in inferred.graph.initializers.items() if v.dtype is not None})
    for node in inferred.graph:
        if node.op_type in _DTYPE_OF_FIRST_INPUT_OPS and node.inputs and node.inputs[0] is not None:
            source = dtypes.get(node.inputs[0].name)
            for value in node.outputs:
                if value.name and value.name not in dtypes and source is not None:
                    dtypes[value.name] = source
        for value in node.outputs:
            if value.dtype is None and value.name in dtypes:
                value.dtype = dtypes[value.name]
    for name in missing:
        value = inferred_values.get(name)
        if value is None or value.dtype is None:
            producer = values[name].producer()
            raise InputModelError(
                f"value {name!r} (output of {producer.op_type if producer else '?'} node "
                f"{producer.name if producer else '?'!r}) crosses a pipeline stage but its element type is "
                "unknown and shape inference cannot tell it; add value_info for it to the model"
            )
        known[name] = (value.dtype, value.shape)
    return known


# --------------------------------------------------------------------------- the split


def _global_rank(mesh: DeviceMesh, stage: int, cp_rank: int, tp_rank: int) -> int:
    return mesh.rank_of(MeshCoords(pp=stage, cp=cp_rank, tp=tp_rank))


def compose_bindings(outer: Sequence[SliceBinding], inner: Sequence[SliceBinding]) -> list[SliceBinding]:
    """Bindings original -> stage-local from (original -> tp-local) and (tp-local -> stage-local, whole)."""
    by_local = {b.local: b for b in outer}
    composed = []
    for binding in inner:
        if binding.dim is not None:
            raise PlanError(f"stage binding {binding} slices its tensor; stage bindings are whole tensors")
        source = by_local.get(binding.original)
        if source is None:
            raise PlanError(f"stage value {binding.original!r} has no binding to the original model")
        composed.append(SliceBinding(source.original, binding.local, source.dim, source.start, source.stop))
    return composed


class PipelineStageSplit:
    """The pipeline stage split: one model in, one model per pipeline stage out, in two steps.

    `plan(model)` decides the split without building anything: the cuts, where each node goes, what
    crosses each cut, and which stages will hold each initializer (so a caller can start writing the
    weights before the stage graphs exist); `StageSplitPlan.build()` then builds the stage models.
    Calling the split does both.

    A plain class, not an `onnx_ir` pass: a pass maps one model to one model (`PassResult.model`,
    with `modified`), while this maps one model to P models and a balance report, and the plan step
    between the two halves is what the weight writer needs. Imitating the pass API would hide that.

    Cuts are `stage_cut_after_layer` when given, else chosen by `balance_stages` from `node_cost` under
    `memory_limit_bytes`: exact weight bytes per stage plus `extra_memory_bytes_per_layer` (e.g. one
    layer's KV cache at the planned batch and length). The input model is not modified, unless
    `consume_input`: then the last stage is cut from the input's own graph instead of a copy (the
    caller has no further use for it; a graph copy is ~40% of a stage split's time). `max_seq`: the
    longest sequence the plan serves (default: what the model takes, up to 2048), over which the
    layers' KV caches must hold equal lengths when a stage reads another's past length off its own.
    """

    def __init__(
        self,
        mesh: DeviceMesh,
        *,
        tp_rank: int = 0,
        cp_rank: int = 0,
        stage_cut_after_layer: Sequence[int] | None = None,
        node_cost: NodeCost = default_node_cost,
        memory_limit_bytes: int | Sequence[int] | None = None,
        extra_memory_bytes_per_layer: int = 0,
        replicate_max_weight_bytes: int = DEFAULT_REPLICATE_MAX_WEIGHT_BYTES,
        consume_input: bool = False,
        max_seq: int | None = None,
        stage_node_costs: Sequence[NodeCost] | None = None,
    ) -> None:
        if not 0 <= tp_rank < mesh.tp or not 0 <= cp_rank < mesh.cp:
            raise PlanError(f"tp_rank {tp_rank} / cp_rank {cp_rank} are outside the mesh {mesh}")
        self.mesh = mesh
        self.tp_rank = tp_rank
        self.cp_rank = cp_rank
        self.stage_cut_after_layer = None if stage_cut_after_layer is None else tuple(stage_cut_after_layer)
        self.node_cost = node_cost
        # mixed devices: each stage's node cost on its own devices, and memory limits per stage
        self.stage_node_costs = None if stage_node_costs is None else tuple(stage_node_costs)
        self.memory_limit_bytes = memory_limit_bytes
        self.extra_memory_bytes_per_layer = extra_memory_bytes_per_layer
        self.replicate_max_weight_bytes = replicate_max_weight_bytes
        self.consume_input = consume_input
        self.max_seq = max_seq

    def __call__(self, model: ir.Model) -> StageSplitResult:
        return self.plan(model).build()

    def plan(self, model: ir.Model) -> StageSplitPlan:
        """The split decided on `model`, nothing built yet (see the class docstring)."""
        num_stages = self.mesh.pp
        placement = analyze_layers(model, self.replicate_max_weight_bytes)
        balance = None
        if self.stage_cut_after_layer is not None:
            if len(self.stage_cut_after_layer) != num_stages - 1:
                raise PlanError(
                    f"stage_cut_after_layer {list(self.stage_cut_after_layer)} has "
                    f"{len(self.stage_cut_after_layer)} cuts; --pp {num_stages} needs {num_stages - 1}"
                )
            ranges = stage_layer_ranges(placement.num_layers, self.stage_cut_after_layer)
        else:
            prefix, layers, suffix = layer_units(model, self.node_cost, self.replicate_max_weight_bytes, placement)
            if self.extra_memory_bytes_per_layer:
                layers = [
                    dataclasses.replace(unit, extra_memory_bytes=self.extra_memory_bytes_per_layer) for unit in layers
                ]
            stage_units = None
            if self.stage_node_costs is not None:
                stage_units = [
                    layer_units(model, cost, self.replicate_max_weight_bytes, placement)
                    for cost in self.stage_node_costs
                ]
            balance = balance_stages(
                layers,
                num_stages,
                prefix=prefix,
                suffix=suffix,
                memory_limit_bytes=self.memory_limit_bytes,
                stage_units=stage_units,
            )
            ranges = balance.stage_layers
        layer_stage = {layer: s for s, layer_range in enumerate(ranges) for layer in layer_range}
        splitter = _Splitter(model, placement, layer_stage, ranges, self)
        return StageSplitPlan(
            tuple(ranges),
            placement.num_layers,
            placement.layer_source,
            balance,
            splitter.initializer_stages(),
            splitter,
        )


@dataclass(frozen=True)
class StageSplitPlan:
    """A pipeline stage split decided on one model and not built yet (`PipelineStageSplit.plan`).

    `initializer_stages`: the stages whose models will hold each initializer of the model (those
    keeping a node that reads it), known before any stage graph exists. `build` makes the stage
    models once: with `consume_input` the last stage is the input model's own graph.
    """

    stage_layers: tuple[range, ...]
    num_layers: int
    layer_source: str  # "names" or "kv-cache structure"
    balance: StageBalance | None  # None when the cuts were given
    initializer_stages: Mapping[str, frozenset[int]]
    _splitter: _Splitter = dataclasses.field(repr=False, compare=False)

    @property
    def cut_after_layer(self) -> tuple[int, ...]:
        """The cuts as `stage_cut_after_layer` takes them: the last layer of every stage but the last."""
        return tuple(layers.stop - 1 for layers in self.stage_layers[:-1])

    def build(self) -> StageSplitResult:
        stages = self._splitter.build()
        return StageSplitResult(stages, self.num_layers, self.layer_source, self.balance)


class _Splitter:
    def __init__(
        self,
        model: ir.Model,
        placement: _Placement,
        layer_stage: dict[int, int],
        ranges: Sequence[range],
        options: PipelineStageSplit,
    ) -> None:
        self.model = model
        self.placement = placement
        self.ranges = ranges
        self.options = options
        self.num_stages = len(ranges)
        graph = model.graph
        self.stage_of: dict[ir.Node, int] = {
            node: layer_stage[max(position, 0)] for node, position in placement.position.items()
        }
        # which stages need each replicable node (reverse order: consumers first)
        self.needs: dict[ir.Node, set[int]] = {}
        self._graph_outputs = set(graph.outputs)
        for node in reversed(list(graph)):
            if node in placement.replicable:
                self.needs[node] = set().union(*(self._stages_reading(value) for value in node.outputs))
        # crossing values: (value, producing stage, last consuming stage), in canonical order
        crossing = []
        for node in graph:
            if node in placement.replicable:
                continue
            produced_on = self.stage_of[node]
            for index, value in enumerate(node.outputs):
                consumer_stages = [self.stage_of[c] for c in _consumers(value, placement.owner)]
                last_use = max([produced_on, *consumer_stages])
                if last_use > produced_on:
                    crossing.append((placement.order[node], index, value, produced_on, last_use))
        crossing.sort(key=lambda item: (item[0], item[1]))
        self.crossing = [(value, first, last_use) for _, _, value, first, last_use in crossing]
        self.tag = {value: tag for tag, (value, _, _) in enumerate(self.crossing)}
        self.types: dict[str, tuple[ir.DataType, ir.Shape | None]] = {}
        self._built = False
        # Decided on the whole input model, before any weight is written or any stage consumes the graph.
        self.kv_shape_sources = _KvShapeSources(model, placement, ranges, self.needs, options.max_seq).resolve()

    def _output_stage(self, value: ir.Value) -> int:
        """The one stage that returns a graph output: its producer's, or the last for replicated ones."""
        producer = value.producer()
        if producer is None or producer in self.placement.replicable:
            return self.num_stages - 1
        return self.stage_of[producer]

    def _link(self, stage: int) -> list[ir.Value]:
        """Values sent from `stage` to `stage + 1`, in the canonical order."""
        return [value for value, first, last_use in self.crossing if first <= stage < last_use]

    def build(self) -> tuple[PipelineStage, ...]:
        if self._built:
            raise PlanError("a stage split plan was built twice; plan the split again (building may consume its model)")
        self._built = True
        # The crossing values' types need the shape planner's evaluation of the whole model: done here,
        # not at construction, so the plan (`initializer_stages`) is ready, and the weights stream, before it.
        names = {v.name for v, _, _ in self.crossing if v.name}
        known = _crossing_types(self.model, names)
        self.types = {name: (known[name][0], _copy_shape(known[name][1])) for name in names}
        return tuple(self._build_stage(stage) for stage in range(self.num_stages))

    def _stages_reading(self, value: ir.Value) -> set[int]:
        """The stages that read `value`: its consumers' (a replicable one's: all that need it), and the
        last stage for a graph output. Replicable consumers must have their `needs` already."""
        stages = {self.num_stages - 1} if value in self._graph_outputs else set()
        for consumer in _consumers(value, self.placement.owner):
            if consumer in self.placement.replicable:
                stages |= self.needs.get(consumer, set())
            else:
                stages.add(self.stage_of[consumer])
        return stages

    def initializer_stages(self) -> dict[str, frozenset[int]]:
        """The stages whose models will hold each initializer: those keeping a node that reads it."""
        return {
            name: frozenset(self._stages_reading(value)) for name, value in self.model.graph.initializers.items()
        }

    def _peer(self, stage: int) -> int:
        return _global_rank(self.options.mesh, stage, self.options.cp_rank, self.options.tp_rank)

    def _build_stage(self, stage: int) -> PipelineStage:
        original = self.model.graph
        # Stages are built in order, so the last may take the input graph itself when it is consumed.
        graph = original if self.options.consume_input and stage == self.num_stages - 1 else original.clone()
        node_map = dict(zip(original, graph, strict=True))
        value_map: dict[ir.Value, ir.Value] = dict(zip(original.inputs, graph.inputs, strict=True))
        for old, new in node_map.items():
            value_map.update(zip(old.outputs, new.outputs, strict=True))
        for name, value in original.initializers.items():
            value_map[value] = graph.initializers[name]

        keep = {
            node_map[node]
            for node in original
            if (node in self.placement.replicable and stage in self.needs[node])
            or (node not in self.placement.replicable and self.stage_of[node] == stage)
        }
        helpers = _HelperConstants(graph)
        received = self._link(stage - 1) if stage > 0 else []
        sent = self._link(stage) if stage < self.num_stages - 1 else []
        available: dict[ir.Value, ir.Value] = {}
        new_nodes: list[ir.Node] = []

        previous: ir.Value | None = None
        for value in received:
            dtype, shape = self.types[value.name]
            tag = self.tag[value]
            if previous is None:
                like = recv_like_initializer(dtype, f"llmir.recv_like.{dtype.name.lower()}")
                if like.name not in graph.initializers:
                    graph.register_initializer(like)
                like = graph.initializers[like.name]
            else:
                like = self._empty_like_after(previous, dtype, tag, helpers, new_nodes)
            shape_dims = None if shape is None else [d if isinstance(d, int) else None for d in shape]
            recv = recv_node(
                like, peer=self._peer(stage - 1), tag=tag, shape=shape_dims, name=f"/llmir/pipeline/recv_{tag}"
            )
            out = recv.outputs[0]
            cloned = value_map[value]
            cloned.replace_all_uses_with(out)
            cloned.name = f"{value.name}.llmir.unused"
            out.name = value.name  # the received value keeps the name it had in the input model
            out.dtype = dtype
            out.shape = shape.copy() if shape is not None else None
            new_nodes.append(recv)
            available[value] = out
            previous = out

        sent_outputs: list[ir.Value] = []
        previous_sent: ir.Value | None = None
        for value in sent:
            tag = self.tag[value]
            source = available.get(value, value_map[value])
            if previous_sent is not None:
                dtype, shape = self.types[value.name]
                source = self._after(source, previous_sent, tag, dtype, shape, helpers, new_nodes)
            send = send_node(source, peer=self._peer(stage + 1), tag=tag, name=f"/llmir/pipeline/send_{tag}")
            out = send.outputs[0]
            out.name = f"{SENT_OUTPUT_PREFIX}{tag}"
            out.dtype = ir.DataType.INT64
            out.shape = ir.Shape([])
            new_nodes.append(send)
            sent_outputs.append(out)
            previous_sent = out

        produced_here = {value for value in original.outputs if self._output_stage(value) == stage}
        outputs = [value_map[v] for v in original.outputs if v in produced_here]
        graph.outputs.clear()
        graph.outputs.extend([*outputs, *sent_outputs])
        dropped = [node for node in graph if node not in keep]
        try:
            graph.remove(dropped, safe=True)
        except ValueError as error:
            raise PlanError(f"stage {stage}: the split left a dangling use ({error}); this is a bug") from error
        graph.extend(new_nodes)
        graph.sort()
        for (reading_stage, node), source in self.kv_shape_sources.items():
            if reading_stage == stage:
                node_map[node].replace_input_with(0, value_map[source])
        stage_inputs = [value_map[v] for v in original.inputs if value_map[v].uses() or value_map[v] in outputs]
        graph.inputs.clear()
        graph.inputs.extend(stage_inputs)
        for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in outputs]:
            del graph.initializers[name]
        graph.opset_imports[LLMIR_DOMAIN] = LLMIR_OPSET_VERSION
        self._rewrite_collective_groups(graph, stage)

        stage_model = ir.Model(
            graph,
            ir_version=min(self.model.ir_version, MAX_IR_VERSION),
            producer_name="llmir-onnx",
            functions=list(self.model.functions.values()),
            metadata_props={
                **self.model.metadata_props,
                "llmir.pipeline_stage": str(stage),
                "llmir.layers": f"{self.ranges[stage].start}-{self.ranges[stage].stop - 1}",
            },
        )
        inputs = [SliceBinding(v.name, v.name, None, 0, 0) for v in stage_inputs]
        output_bindings = [SliceBinding(v.name, v.name, None, 0, 0) for v in outputs]
        return PipelineStage(
            stage=stage,
            rank=self._peer(stage),
            model=stage_model,
            inputs=inputs,
            outputs=output_bindings,
            layers=self.ranges[stage],
            received=tuple(v.name or "" for v in received),
            sent=tuple(v.name or "" for v in sent),
        )

    @staticmethod
    def _empty_like_after(
        previous: ir.Value, dtype: ir.DataType, tag: int, helpers: _HelperConstants, new_nodes: list[ir.Node]
    ) -> ir.Value:
        """An empty tensor of `dtype` that exists only after `previous` did: orders Recv after Recv."""
        prefix = f"/llmir/pipeline/recv_{tag}_order"
        flat = ir.node("Reshape", [previous, helpers.minus_one], name=f"{prefix}/Reshape")
        empty = ir.node("Slice", [flat.outputs[0], helpers.zero, helpers.zero], name=f"{prefix}/Slice")
        cast = ir.node("Cast", [empty.outputs[0]], attributes={"to": dtype}, name=f"{prefix}/Cast")
        for node, suffix in ((flat, "flat"), (empty, "empty"), (cast, "like")):
            node.outputs[0].name = f"llmir.recv_{tag}.{suffix}"
        cast.outputs[0].dtype = dtype
        cast.outputs[0].shape = ir.Shape([0])
        new_nodes.extend([flat, empty, cast])
        return cast.outputs[0]

    @staticmethod
    def _after(
        value: ir.Value,
        previous_sent: ir.Value,
        tag: int,
        dtype: ir.DataType,
        shape: ir.Shape | None,
        helpers: _HelperConstants,
        new_nodes: list[ir.Node],
    ) -> ir.Value:
        """`value` unchanged, but only once `previous_sent` exists: orders Send after Send."""
        prefix = f"/llmir/pipeline/send_{tag}_order"
        shape_of = ir.node("Shape", [value], name=f"{prefix}/Shape")
        zero = ir.node("Mul", [previous_sent, helpers.zero_scalar], name=f"{prefix}/Mul")
        same = ir.node("Add", [shape_of.outputs[0], zero.outputs[0]], name=f"{prefix}/Add")
        reshaped = ir.node("Reshape", [value, same.outputs[0]], name=f"{prefix}/Reshape")
        for node, suffix in ((shape_of, "shape"), (zero, "zero"), (same, "same_shape"), (reshaped, "ordered")):
            node.outputs[0].name = f"llmir.send_{tag}.{suffix}"
        reshaped.outputs[0].dtype = dtype
        reshaped.outputs[0].shape = shape.copy() if shape is not None else None
        new_nodes.extend([shape_of, zero, same, reshaped])
        return reshaped.outputs[0]

    def _rewrite_collective_groups(self, graph: ir.Graph, stage: int) -> None:
        mesh = self.options.mesh
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.domain != LLMIR_DOMAIN or node.op_type not in _COLLECTIVES:
                continue
            attr = node.attributes.get("group")
            tp_ranks = list(attr.as_ints()) if attr is not None and attr.as_ints() else list(range(mesh.tp))
            # The model's ranks are those of the pp=1 mesh: tp ranks, and with cp the (cp, tp) ranks of cp rank 0's
            # model, whose cp groups (context parallelism's AllGathers) span the cp axis.
            flat = DeviceMesh(cp=mesh.cp, tp=mesh.tp)
            bad = [r for r in tp_ranks if not 0 <= r < flat.world_size]
            if bad:
                raise PlanError(
                    f"{node.op_type} node {node.name!r} has group {tp_ranks}: ranks {bad} are not tp ranks of a "
                    f"tp={mesh.tp} model; the stage split expects the tensor-parallel model of a pp=1 mesh"
                )
            coords = [flat.coords(r) for r in tp_ranks]
            spans_cp = len({c.cp for c in coords}) > 1
            node.attributes["group"] = ir.AttrInt64s(
                "group", [_global_rank(mesh, stage, c.cp if spans_cp else self.options.cp_rank, c.tp) for c in coords]
            )


class _KvShapeSources:
    """Which of its own KV cache inputs each stage reads, where the model reads another stage's one's shape.

    Exporters take the batch size and past length off any layer's cache (torch dynamo: the last
    layer's; without named dims every cache has its own symbols, and a layer's mask slice may read
    another layer's past length). A stage is fed only its own layers' caches, so each Shape/Size of
    another stage's cache input is rewired to one of the stage's own that provably has the same dims
    where the Shape is read: one with the same declared shape; else, over the axes read (the Shape's
    start/end, narrowed by Gather/Slice consumers with constant indices), a cache of the same kind
    (key/value) first, equal static sizes, the batch (one batch for every input), or the past length
    when every layer's cache holds as many tokens as every other's (`unequal_kv_cache_lengths`: not
    so with per-layer windows). Anything else is refused, naming the stage, the input and the node:
    feeding a wrong shape would go unnoticed.
    """

    def __init__(
        self,
        model: ir.Model,
        placement: _Placement,
        ranges: Sequence[range],
        needs: Mapping[ir.Node, set[int]],
        max_seq: int | None,
    ) -> None:
        self.model = model
        self.placement = placement
        self.ranges = ranges
        self.needs = needs
        self.max_seq = max_seq
        self._roles: Mapping[str, str] | None = None
        self._unequal: tuple[str | None] | None = None

    def resolve(self) -> dict[tuple[int, ir.Node], ir.Value]:
        """(stage, node of the input model) -> the input model's KV cache input that node reads there."""
        kv_layers = self.placement.kv_layers
        sources: dict[tuple[int, ir.Node], ir.Value] = {}
        for node in self.model.graph:
            if node.op_type not in _SHAPE_ONLY_OPS or not node.inputs or node.inputs[0] not in kv_layers:
                continue
            read = node.inputs[0]
            assert read is not None
            stages = self.needs[node] if node in self.placement.replicable else set()
            for stage in sorted(stages):
                if kv_layers[read] not in self.ranges[stage]:
                    sources[(stage, node)] = self._own_source(stage, node, read)
        return sources

    def _own_source(self, stage: int, node: ir.Node, read: ir.Value) -> ir.Value:
        own = [v for v, layer in self.placement.kv_layers.items() if layer in self.ranges[stage]]
        for candidate in own:
            declared_same = read.shape is not None and candidate.shape is not None
            if declared_same and candidate.dtype == read.dtype and list(candidate.shape) == list(read.shape):
                return candidate
        axes = _shape_axes_read(node, read)
        kind = _cache_kind(read)
        reasons = []
        for candidate in sorted(own, key=lambda v: _cache_kind(v) != kind):
            reason = self._why_not_same(read, candidate, axes)
            if reason is None:
                return candidate
            reasons.append(reason)
        layer = self.placement.kv_layers[read]
        reason = reasons[0] if reasons else "it has none"
        if self._unequal is not None and self._unequal[0] is not None and reason.endswith(self._unequal[0]):
            fix = "use --pp 1: the stage is not fed that layer's cache, whose length its own caches do not tell"
        else:
            settle = CLI_HINT.format(symbol="SYMBOL")
            fix = f"settle the dims' roles with {settle}, re-export with named dims, or use --pp 1"
        raise PlanError(
            f"stage {stage} (layers {self.ranges[stage].start}-{self.ranges[stage].stop - 1}) reads the shape of "
            f"{read.name!r}, layer {layer}'s KV cache on another stage, in node {node.name!r} ({node.op_type}), and "
            f"none of its own caches provably has the same axes {axes}: {reason}; {fix}"
        )

    def _why_not_same(self, read: ir.Value, candidate: ir.Value, axes: Sequence[int]) -> str | None:
        """Why `candidate`'s shape may differ from `read`'s on `axes`, or None when it provably does not."""
        if read.shape is None or candidate.shape is None or len(read.shape) != len(candidate.shape):
            return f"{candidate.name!r} has no declared shape of {read.name!r}'s rank"
        for axis in axes:
            theirs, ours = read.shape[axis], candidate.shape[axis]
            if theirs == ours and (isinstance(theirs, int) or theirs.value is not None):
                continue
            roles = (self._role(theirs), self._role(ours))
            if roles == (BATCH, BATCH):
                continue
            if roles == (PAST, PAST):
                unequal = self._unequal_lengths()
                if unequal is None:
                    continue
                return f"axis {axis} is the past length of each ({theirs} and {ours}), which may differ: {unequal}"
            return (
                f"axis {axis} is {theirs} ({roles[0] or 'no known role'}) in {read.name!r} but {ours} "
                f"({roles[1] or 'no known role'}) in {candidate.name!r}"
            )
        return None

    def _role(self, dim: int | ir.SymbolicDim) -> str | None:
        if isinstance(dim, int) or dim.value is None:
            return None
        if self._roles is None:
            self._roles = dim_roles(self.model).roles
        return self._roles.get(str(dim.value))

    def _unequal_lengths(self) -> str | None:
        if self._unequal is None:
            max_seq = self.max_seq or default_max_seq(self.model)
            self._unequal = (unequal_kv_cache_lengths(self.model, max_seq),)
        return self._unequal[0]


def _cache_kind(value: ir.Value) -> str:
    """`key` or `value` (the last part of `past_key_values.3.key`)."""
    return (value.name or "").rsplit(".", 1)[-1]


def _shape_axes_read(node: ir.Node, read: ir.Value) -> list[int]:
    """The axes of `read` whose sizes a Shape/Size node's result is used for."""
    rank = len(read.shape) if read.shape is not None else 0
    if node.op_type != "Shape":
        return list(range(rank))
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    axes = list(range(rank))[start:end]  # onnx's clamping of start/end is Python's slicing
    result = node.outputs[0]
    if result.is_graph_output():
        return axes
    picked: set[int] = set()
    for consumer, index in result.uses():
        elements = _elements_picked(consumer, index, len(axes))
        if elements is None:
            return axes
        picked.update(axes[i] for i in elements)
    return sorted(picked)


def _elements_picked(node: ir.Node, index: int, length: int) -> list[int] | None:
    """The elements of a 1-D input that a Gather or Slice with constant indices takes; None when not known."""
    if index != 0 or node.domain not in ("", "ai.onnx"):
        return None
    constants = []
    for value in node.inputs[1:]:
        tensor = ir.convenience.get_const_tensor(value) if value is not None else None
        constants.append(None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)])
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) in (0, -1) and constants[0] is not None:
        picked = [i + length if i < 0 else i for i in constants[0]]
        return picked if all(0 <= i < length for i in picked) else None
    if node.op_type == "Slice" and len(constants) >= 2 and all(c is not None and len(c) == 1 for c in constants):
        (start,), (end,) = constants[0], constants[1]
        axis = constants[2][0] if len(constants) > 2 else 0
        step = constants[3][0] if len(constants) > 3 else 1
        if axis not in (0, -1) or step == 0:
            return None
        return list(range(length))[start:end:step]  # onnx's clamping of starts/ends is Python's slicing
    return None


class _HelperConstants:
    """Small int64 initializers the ordering chains use, added to the graph on first use."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph

    def _get(self, name: str, array: np.ndarray) -> ir.Value:
        if name not in self.graph.initializers:
            tensor = ir.tensor(array, name=name)
            value = ir.Value(
                name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64), const_value=tensor
            )
            self.graph.register_initializer(value)
        return self.graph.initializers[name]

    @property
    def minus_one(self) -> ir.Value:
        return self._get("llmir.const.minus_one_1d", np.array([-1], dtype=np.int64))

    @property
    def zero(self) -> ir.Value:
        return self._get("llmir.const.zero_1d", np.array([0], dtype=np.int64))

    @property
    def zero_scalar(self) -> ir.Value:
        return self._get("llmir.const.zero", np.array(0, dtype=np.int64))


@dataclass(frozen=True)
class StageRankModel:
    """One rank of a tp x pp plan: a `plan.emit.RankModel`'s fields, plus the layer range."""

    rank: int
    coords: dict[str, int]
    model: ir.Model | TpRankCopy
    inputs: list[SliceBinding]  # ORIGINAL model names -> this rank's
    outputs: list[SliceBinding]
    layers: range


def split_tp_stages(
    model: ir.Model,
    bindings: Sequence[tuple[Sequence[SliceBinding], Sequence[SliceBinding]]],
    weights_of: Callable[[int], Mapping[str, ir.TensorProtocol]],
    mesh: DeviceMesh,
    *,
    stage_cut_after_layer: Sequence[int] | None = None,
    node_cost: NodeCost = default_node_cost,
    memory_limit_bytes: int | Sequence[int] | None = None,
    extra_memory_bytes_per_layer: int = 0,
    replicate_max_weight_bytes: int = DEFAULT_REPLICATE_MAX_WEIGHT_BYTES,
    consume_model: bool = False,
    max_seq: int | None = None,
    stage_node_costs: Sequence[NodeCost] | None = None,
) -> tuple[list[StageRankModel], StageSplitResult]:
    """Cut tp rank 0's `model` into mesh.pp stages, then give every other tp rank a copy of each stage:
    `PipelineStageSplit` with these options (`consume_model` is its `consume_input`) planned and built on
    `model`, then `tp_rank_stages` of it (see there).

    `bindings[t]`: tp rank t's (inputs, outputs), original -> tp-local; `weights_of(t)`: tp rank t's
    initializer name -> tensor. Returns the ranks sorted by global rank and the split result (its
    `balance` says why the cuts are where they are).
    """
    if len(bindings) != mesh.tp:
        raise PlanError(f"{len(bindings)} tensor-parallel bindings for a mesh with tp={mesh.tp}")
    split = PipelineStageSplit(
        mesh,
        stage_cut_after_layer=stage_cut_after_layer,
        node_cost=node_cost,
        memory_limit_bytes=memory_limit_bytes,
        extra_memory_bytes_per_layer=extra_memory_bytes_per_layer,
        replicate_max_weight_bytes=replicate_max_weight_bytes,
        consume_input=consume_model,
        max_seq=max_seq,
        stage_node_costs=stage_node_costs,
    )
    result = split.plan(model).build()
    return tp_rank_stages(result, bindings, weights_of, mesh), result


def tp_rank_stages(
    result: StageSplitResult,
    bindings: Sequence[tuple[Sequence[SliceBinding], Sequence[SliceBinding]]],
    weights_of: Callable[[int], Mapping[str, ir.TensorProtocol]],
    mesh: DeviceMesh,
) -> list[StageRankModel]:
    """Every tp rank's stages from tp rank 0's split `result`, sorted by global rank.

    Every tp rank runs the same graph on equal-shaped weights, so one split serves them all: tp rank
    t's stage s is tp rank 0's stage s with t's weights (`weights_of(t)`: initializer name -> tensor)
    and Send/Recv peers on tp rank t of the neighbouring stages (a `TpRankCopy`). Cutting once and
    copying half-graphs costs a fraction of cutting every rank's whole graph (the analysis, the shape
    inference of the crossing values and a graph copy per rank), and stage s of every tp rank holds the
    same layers by construction. `bindings[t]`: tp rank t's (inputs, outputs), original -> tp-local.
    """
    if len(bindings) != mesh.tp:
        raise PlanError(f"{len(bindings)} tensor-parallel bindings for a mesh with tp={mesh.tp}")
    ranks: list[StageRankModel] = []
    first_weights = weights_of(0)
    for stage in result.stages:
        for tp_rank, (inputs, outputs) in enumerate(bindings):
            stage_model: ir.Model | TpRankCopy = stage.model
            if tp_rank > 0:
                peers = {peer: _same_peer_on(mesh, peer, tp_rank) for peer in _pipeline_peers(stage.model)}
                stage_model = tp_rank_copy(stage.model, tp_rank, weights_of(tp_rank), first_weights, peers)
            ranks.append(_stage_rank(mesh, stage, tp_rank, stage_model, inputs, outputs))
    return sorted(ranks, key=lambda entry: entry.rank)


def _stage_rank(
    mesh: DeviceMesh,
    stage: PipelineStage,
    tp_rank: int,
    model: ir.Model | TpRankCopy,
    inputs: Sequence[SliceBinding],
    outputs: Sequence[SliceBinding],
) -> StageRankModel:
    """Stage `stage` of tp rank `tp_rank` with its bindings composed: original -> tp-local -> stage."""
    rank = _global_rank(mesh, stage.stage, 0, tp_rank)
    coords = mesh.coords(rank)
    return StageRankModel(
        rank=rank,
        coords={"pp": coords.pp, "cp": coords.cp, "tp": coords.tp},
        model=model,
        inputs=compose_bindings(inputs, stage.inputs),
        outputs=compose_bindings(outputs, stage.outputs),
        layers=stage.layers,
    )


def plan_uneven_tp_stages(
    models: Sequence[ir.Model],
    mesh: DeviceMesh,
    *,
    stage_cut_after_layer: Sequence[int] | None = None,
    node_cost: NodeCost = default_node_cost,
    memory_limit_bytes: int | Sequence[int] | None = None,
    stage_node_costs: Sequence[NodeCost] | None = None,
    consume_input: bool = False,
    max_seq: int | None = None,
) -> list[StageSplitPlan]:
    """Uneven tp: every tp rank has its own graph (its own head counts and shapes), so none is a copy of
    tp rank 0's; each is split on its own, at the layers tp rank 0's split chose, so stage s of every tp
    rank holds the same layers. One plan per tp rank, nothing built yet; the options as `PipelineStageSplit`'s
    (with `consume_input`, building consumes every model)."""
    if len(models) != mesh.tp:
        raise PlanError(f"{len(models)} tp rank models for a mesh with tp={mesh.tp}")
    plans: list[StageSplitPlan] = []
    cuts = stage_cut_after_layer
    for tp_rank, model in enumerate(models):
        split = PipelineStageSplit(
            mesh,
            tp_rank=tp_rank,
            stage_cut_after_layer=cuts,
            node_cost=node_cost,
            memory_limit_bytes=memory_limit_bytes,
            stage_node_costs=stage_node_costs,
            consume_input=consume_input,
            max_seq=max_seq,
        )
        plans.append(split.plan(model))
        cuts = plans[0].cut_after_layer
    return plans


def build_uneven_tp_stages(
    plans: Sequence[StageSplitPlan],
    bindings: Sequence[tuple[Sequence[SliceBinding], Sequence[SliceBinding]]],
    mesh: DeviceMesh,
) -> list[StageRankModel]:
    """Every tp rank's stages built from its own plan (`plan_uneven_tp_stages`), sorted by global rank."""
    if len(plans) != mesh.tp or len(bindings) != mesh.tp:
        raise PlanError(f"{len(plans)} tp rank splits and {len(bindings)} bindings for a mesh with tp={mesh.tp}")
    ranks: list[StageRankModel] = []
    for tp_rank, (plan, (inputs, outputs)) in enumerate(zip(plans, bindings, strict=True)):
        ranks.extend(_stage_rank(mesh, stage, tp_rank, stage.model, inputs, outputs) for stage in plan.build().stages)
    return sorted(ranks, key=lambda entry: entry.rank)


def _pipeline_peers(model: ir.Model) -> set[int]:
    return {
        node.attributes["peer"].as_int()
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain == LLMIR_DOMAIN and node.op_type in PIPELINE_OPS
    }


def _same_peer_on(mesh: DeviceMesh, peer: int, tp_rank: int) -> int:
    """The rank at `peer`'s pipeline stage (and cp rank) on tp rank `tp_rank`."""
    return mesh.rank_of(dataclasses.replace(mesh.coords(peer), tp=tp_rank))
