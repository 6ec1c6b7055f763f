"""Entry point: partition one ONNX model into per-rank models for a tensor-parallel mesh.

The pipeline (onnx_ir passes; each takes the ShardingState the one before returned in its result):

    AnnotatePass          names, constants as initializers, global shapes, Megatron weight roles
    PropagatePass         a placement for every value from per-op rules (propagation/), redistributions
    InsertCollectivesPass AllReduce / AllGather / ReduceScatter / local Slice where placements change
    LocalizePass          local head counts and sizes (reshape targets, split sizes, attributes)
    materialize_rank      the localized graph takes tp rank 0's slice of every weight

Every rank of a tensor-parallel group runs the same graph; only weights and a few rank constants
(slice offsets, the vocabulary offset of a vocab-parallel embedding) differ. So only tp rank 0 is
made as a graph; every other tp rank is a `TpRankCopy` of it (its weights, its Send/Recv peers),
made as a graph only when asked (`RankProgram.model`), and written to a plan by patching tp rank
0's serialized model. With pipeline stages (pp > 1) tp rank 0's model is cut into stages once
(passes.stages.PipelineStageSplit) and the copies are of its stages.

A partition reads top to bottom, in three steps (`partition` runs them; `api.partition_to_dir` starts
the weight writer between the second and the third, so the weights stream to disk while the stage
graphs are built):

    shard_tp_ranks        the passes above: tp rank 0's model, every tp rank's weights and bindings
    plan_rank_weights     which weights (lazy slices) each rank holds; pp > 1: the stage split decided
                          (cuts, which stage holds each initializer), nothing built: a frozen plan
    build_rank_models     the stage graphs built from that plan; the other tp ranks as copies

With context parallelism (cp > 1, passes/context_parallel.py) the passes make cp rank 0's graph, and every
other cp rank is a copy of its (pp, tp) rank's model too (`moved_rank_copy`): the same weights, another
value of the one initializer holding the cp rank, its collective groups and peers moved along the cp axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from llmir_onnx import ops
from llmir_onnx.errors import LlmirError, ShardingError
from llmir_onnx.ir_io import MAX_IR_VERSION, initializer_tensors
from llmir_onnx.mesh import DeviceMesh, MeshCoords
from llmir_onnx.passes import (
    AnnotatePass,
    InsertCollectivesPass,
    LocalizePass,
    PropagatePass,
    ShardingPassResult,
    ShardingState,
    materialize_rank,
)
from llmir_onnx.passes.fold_shapes import try_fold_shape_chains
from llmir_onnx.passes.localize import rank_tensor
from llmir_onnx.passes.stages import (
    PipelineStageSplit,
    StageSplitPlan,
    build_uneven_tp_stages,
    plan_uneven_tp_stages,
    tp_rank_stages,
)
from llmir_onnx.placement import Partial, Placement, Replicate, Shard
from llmir_onnx.plan.cost import node_time_function
from llmir_onnx.plan.data_files import RankWeights
from llmir_onnx.plan.devices import Cluster, load_profile
from llmir_onnx.plan.manifest import SliceBinding
from llmir_onnx.plan.shapes import ShapeReference, default_max_seq
from llmir_onnx.plan.tp_rank_copy import TpRankCopy, moved_rank_copy, tp_rank_copy

# The KV cache layouts over the cp axis (PartitionOptions.cp_kv_cache, the CLI's --cp-kv-cache).
CP_KV_CACHE_LAYOUTS = ("replicated", "sharded")


@dataclass(frozen=True)
class PartitionOptions:
    tp: int
    pp: int = 1
    vocab_parallel: bool = False
    replicate_unsupported: bool = False
    # tp > 1 that shards no weight is refused (each rank would run the whole model) unless this is set.
    allow_replicated: bool = False
    # Pipeline cuts: balanced by the cost model on `device` at (max_batch, max_seq) unless given.
    stage_cut_after_layer: tuple[int, ...] | None = None
    device: str = "h100-sxm"
    device_memory_bytes: int | None = None
    max_batch: int = 1
    max_seq: int | None = None  # None: plan.shapes.default_max_seq of the model
    # Per tp rank weights of an uneven head split (a faster device gets more heads); None: equal parts.
    tp_weights: tuple[float, ...] | None = None
    # Mixed devices: rank r runs on cluster.devices[r]; the cuts balance each stage on its own devices
    # and memory (a slower or smaller stage gets fewer layers). None: every rank is a `device`.
    cluster: Cluster | None = None
    # Rebuild shape-computation chains once from the inputs (passes/fold_shapes.py); False keeps them as exported.
    fold_shapes: bool = True
    # Megatron sequence parallelism over the tp group (passes/sequence_parallel.py): per-token work between
    # the tensor-parallel blocks runs on a chunk of the tokens (ReduceScatter / AllGather along them).
    sequence_parallel: bool = False
    # Context parallelism (passes/context_parallel.py): the prompt's tokens split over a cp mesh axis of this
    # size, attention included; world = tp x cp x pp.
    cp: int = 1
    # With cp > 1: "replicated" (every cp rank holds the whole KV cache) or "sharded" (the cache split along the
    # sequence over cp, attention combined across the shards with the log-sum-exp trick).
    cp_kv_cache: str = "replicated"


class RankProgram:
    """One rank's model and how the original model's inputs and outputs map onto it.

    The tp ranks but the first are made lazily (`TpRankCopy`): `model` makes the graph on first use,
    while a plan writer can write the rank from its tp rank 0's model without it.
    """

    def __init__(
        self,
        rank: int,
        model: ir.Model | TpRankCopy,
        inputs: list[SliceBinding],
        outputs: list[SliceBinding],
        layers: range | None = None,  # the decoder layers this rank's pipeline stage holds (None: all)
    ) -> None:
        self.rank = rank
        self._model = model
        self.inputs = inputs
        self.outputs = outputs
        self.layers = layers

    @property
    def model(self) -> ir.Model:
        if isinstance(self._model, TpRankCopy):
            self._model = self._model.materialize()
        return self._model

    @property
    def model_or_copy(self) -> ir.Model | TpRankCopy:
        """The model, or while it is not made, what it is a copy of."""
        return self._model


@dataclass
class PartitionResult:
    mesh: DeviceMesh
    ranks: list[RankProgram]
    placements: dict[str, str]
    warnings: list[str]
    # Each sliced weight: its global shape, placement and the [start, stop) ranges of its sliced dim per tp rank.
    weight_splits: list[dict[str, object]] | None = None
    # pp > 1: tp rank 0's whole model evaluated at the plan's sizes before it was cut into the stages, for
    # the stages' memory plans and costs (`plan.shapes.shared_shape_evaluations`).
    shape_references: tuple[ShapeReference, ...] = ()


def _binding(value: ir.Value, placement: Placement, size: int | str | None, tp: int, tp_rank: int) -> SliceBinding:
    if isinstance(placement, Replicate) or tp == 1:
        return SliceBinding(value.name, value.name, None, 0, 0)
    if isinstance(placement, Shard) and not placement.blocks and not placement.inner and isinstance(size, int):
        ((start, stop),) = placement.local_ranges(size, tp, tp_rank)
        return SliceBinding(value.name, value.name, placement.dim, start, stop)
    raise ShardingError(f"graph input/output {value.name!r} would be {placement}, which a binding cannot express")


def _check_options(options: PartitionOptions) -> None:
    if options.tp < 1:
        raise ShardingError(f"--tp must be at least 1, got {options.tp}")
    if options.pp < 1:
        raise ShardingError(f"--pp must be at least 1, got {options.pp}")
    if options.cp < 1:
        raise ShardingError(f"--cp must be at least 1, got {options.cp}")
    if options.cp_kv_cache not in CP_KV_CACHE_LAYOUTS:
        raise ShardingError(
            f"--cp-kv-cache {options.cp_kv_cache!r} is not one of {', '.join(CP_KV_CACHE_LAYOUTS)}"
        )
    if options.cp_kv_cache != "replicated" and options.cp == 1:
        raise ShardingError(f"--cp-kv-cache {options.cp_kv_cache} needs --cp 2 or more (no cp axis to shard over)")
    if options.cp > 1 and options.sequence_parallel:
        raise ShardingError(
            f"--cp {options.cp} with --sp is not supported yet (both split the tokens); partition with one of them"
        )
    if options.sequence_parallel and options.tp < 2:
        raise ShardingError(f"--sp splits the tokens over the tp group; it needs --tp 2 or more, got --tp {options.tp}")
    world = options.tp * options.cp * options.pp
    if options.cluster is not None and len(options.cluster) != world:
        cp = f" x --cp {options.cp}" if options.cp > 1 else ""
        raise ShardingError(
            f"--devices {options.cluster.spec!r} describes {len(options.cluster)} devices but --tp {options.tp}{cp} x "
            f"--pp {options.pp} needs {world}; describe one device per rank"
        )


def plan(
    model: ir.Model,
    options: PartitionOptions,
    input_seeds: dict[str, Placement] | None = None,
    keep_output_placements: bool = False,
    consume_model: bool = False,
) -> tuple[ir.Model, ShardingState]:
    """Run the sharding passes on a copy of `model`; returns the localized template (tp rank 0's, when the
    split is uneven) and the plan. See `plan_ranks`."""
    templates, state = plan_ranks(model, options, input_seeds, keep_output_placements, consume_model)
    return templates[0], state


def plan_ranks(
    model: ir.Model,
    options: PartitionOptions,
    input_seeds: dict[str, Placement] | None = None,
    keep_output_placements: bool = False,
    consume_model: bool = False,
) -> tuple[list[ir.Model], ShardingState]:
    """Run the sharding passes on a copy of `model`; returns the localized templates and the plan: one
    template that every tp rank shares, or with an uneven split (tp does not divide the heads) one per tp rank.

    With `consume_model` the passes run on `model` itself (the caller loaded it for this and will not
    use it again): a graph copy is a large share of the partition's time on a deep model.

    `input_seeds` fixes the placement of graph inputs (the others are free); `keep_output_placements`
    leaves Partial outputs unreduced (rule tests reduce them in numpy).
    """
    _check_options(options)
    # Tensor parallelism is planned on one pipeline stage; stages are cut afterwards (split_tp_stages).
    mesh = DeviceMesh(pp=1, cp=options.cp, tp=options.tp)
    state = ShardingState(
        mesh,
        replicate_unsupported=options.replicate_unsupported,
        vocab_parallel=options.vocab_parallel,
        keep_output_placements=keep_output_placements,
        input_seeds=dict(input_seeds or {}),
        tp_weights=options.tp_weights,
    )
    template = model if consume_model else model.clone()
    if options.cp > 1:
        # A fused attention op that takes its queries as the last tokens (onnxruntime-genai's
        # GroupQueryAttention, ONNX Attention) cannot take a cp chunk of them: written out in standard ops first,
        # its attention is what the cp pass splits (lower_attention.py). Only with cp: a plan without it
        # keeps the op.
        from llmir_onnx.lower_attention import lower_group_query_attention, lower_onnx_attention

        lower_group_query_attention(template)
        lower_onnx_attention(template)
    state = _run_pass(AnnotatePass(state), template).state
    state = _run_pass(PropagatePass(state), template).state
    if options.sequence_parallel:
        from llmir_onnx.passes.sequence_parallel import SequenceParallelPass

        state = _run_pass(SequenceParallelPass(state), template).state
    if options.cp > 1:
        from llmir_onnx.passes.context_parallel import ContextParallelPass

        # A sequence-sharded cache is held in blocks of ceil(max_seq / cp) tokens: the plan's max_seq is a constant.
        cache_max_seq = (options.max_seq or default_max_seq(template)) if options.cp_kv_cache == "sharded" else None
        cp_pass = ContextParallelPass(state, kv_cache=options.cp_kv_cache, max_seq=cache_max_seq)
        state = _run_pass(cp_pass, template).state
    state = _run_pass(InsertCollectivesPass(state), template).state
    if not state.uneven:
        _run_pass(LocalizePass(state), template)
        templates = [template]
    else:
        # Uneven: every tp rank has its own sizes, so its own localized graph.
        templates = [template, *(template.clone() for _ in range(1, options.tp))]
        for tp_rank, rank_template in enumerate(templates):
            _run_pass(LocalizePass(state, tp_rank), rank_template)
    if state.sequence_shards or state.context_shards:
        from llmir_onnx.passes.sequence_parallel import declare_token_chunk_shapes

        for localized in templates:
            declare_token_chunk_shapes(localized, state)
    if options.cp > 1 and options.cp_kv_cache == "sharded":
        from llmir_onnx.passes.context_parallel_cache import declare_cache_run_dims

        for localized in templates:
            declare_cache_run_dims(localized, options.cp)
    return templates, state


def _run_pass(sharding_pass: ir.passes.PassBase, model: ir.Model) -> ShardingPassResult:
    """Run one sharding pass (its pre- and postconditions included); its result carries the state."""
    try:
        result = sharding_pass(model)
    except ir.passes.PassError as error:
        # The pass framework wraps what a pass's checks raise; a user must see our message, not the wrapper.
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, LlmirError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    assert isinstance(result, ShardingPassResult)
    return result


@dataclass
class TpRanks:
    """The tensor-parallel ranks of the whole model, before any pipeline cut (`shard_tp_ranks`): tp rank
    0's model (the partition's own graph, holding tp rank 0's weights, cleaned of unused nodes) and what
    the other tp ranks need to be its copies: their bindings and weights (lazy slices of the source's)."""

    model: ir.Model
    bindings: list[tuple[list[SliceBinding], list[SliceBinding]]]  # per tp rank: inputs, outputs
    weights: list[dict[str, ir.TensorProtocol]]  # per tp rank: initializer name -> tensor
    placements: dict[str, str]
    warnings: list[str]
    weight_splits: list[dict[str, object]] | None = None
    # Uneven tp: every tp rank's own model (shapes differ, so none is a copy of tp rank 0's); and the shares.
    models: list[ir.Model] | None = None
    tp_shares: tuple[int, ...] = ()
    # Context parallelism: the initializers holding the cp rank -> their value on a cp rank (cp rank 0's are in
    # the models); every other weight of a cp rank is its (pp, tp) rank's.
    cp_rank_constants: dict[str, Callable[[int], np.ndarray]] = field(default_factory=dict)


def _weight_splits(state: ShardingState) -> list[dict[str, object]]:
    """How each sharded weight's sliced dim is split among the tp ranks (for the manifest and the report)."""
    splits: list[dict[str, object]] = []
    for name, placement in sorted(state.weight_placements.items()):
        shape = state.shapes.get(name)
        if not isinstance(placement, Shard) or shape is None or not isinstance(shape[placement.dim], int):
            continue
        if name in state.rank_constants:
            continue  # computed for each rank (packed zero points re-packed), not a range of the source's
        size = int(shape[placement.dim])
        splits.append(
            {
                "name": name,
                "shape": [int(d) if isinstance(d, int) else str(d) for d in shape],
                "placement": str(placement),
                "dim": placement.dim,
                "ranges": [
                    [list(r) for r in placement.local_ranges(size, state.tp, tp_rank)] for tp_rank in range(state.tp)
                ],
            }
        )
    return splits


def shard_tp_ranks(model: ir.Model, options: PartitionOptions, consume_model: bool = False) -> TpRanks:
    """Tensor-parallel sharding of `model`: tp rank 0's model and every tp rank's weights and bindings
    (the first step of `partition`). With `consume_model` the passes run on `model` itself."""
    _check_options(options)
    if options.tp == 1 and options.cp == 1:
        # The original graph runs as it is; nothing to split, so nothing can fail to split.
        first = model if consume_model else model.clone()
        first.opset_imports[ops.LLMIR_DOMAIN] = ops.LLMIR_OPSET_VERSION
        first.ir_version = min(first.ir_version, MAX_IR_VERSION)
        whole = [SliceBinding(v.name, v.name, None, 0, 0) for v in first.graph.inputs]
        whole_out = [SliceBinding(v.name, v.name, None, 0, 0) for v in first.graph.outputs]
        placements = {v.name: "R" for v in [*first.graph.inputs, *first.graph.outputs]}
        _remove_unused(first)
        notes = _fold_shapes(first, options)
        return TpRanks(first, [(whole, whole_out)], [initializer_tensors(first)], placements, notes)
    templates, state = plan_ranks(model, options, consume_model=consume_model)
    template = templates[0]
    if not options.allow_replicated and options.tp > 1:
        _refuse_unsharded(template, state)
    bindings = [_tp_bindings(template.graph, state, tp_rank) for tp_rank in range(options.tp)]
    if state.uneven:
        uneven = _uneven_ranks(templates, state, bindings, options)
        uneven.cp_rank_constants = dict(state.cp_rank_constants)
        return uneven
    unsharded = initializer_tensors(template)
    first = materialize_rank(template, state, 0, consume=True)
    _remove_unused(first)  # before any copy is made from it
    # Every tp rank runs tp rank 0's graph: fold only what is the same on all of them.
    notes = _fold_shapes(first, options, _rank_varying(state))
    kept = initializer_tensors(first)
    # Tp rank 0's tensors are the very objects its model holds: a copy's weights differ where they are others.
    weights = [kept] + [
        {name: rank_tensor(state, name, tensor, tp_rank) for name, tensor in unsharded.items() if name in kept}
        for tp_rank in range(1, options.tp)
    ]
    placements = {name: str(p) for name, p in state.placements.items()}
    return TpRanks(
        first,
        bindings,
        weights,
        placements,
        [*state.warnings, *notes],
        _weight_splits(state),
        cp_rank_constants=dict(state.cp_rank_constants),
    )


def _uneven_ranks(
    templates: list[ir.Model], state: ShardingState, bindings: list[tuple[list[SliceBinding], list[SliceBinding]]],
    options: PartitionOptions,
) -> TpRanks:
    """Every tp rank's own localized model holding its weights."""
    models = [materialize_rank(t, state, tp_rank, consume=True) for tp_rank, t in enumerate(templates)]
    notes: list[str] = []
    for made in models:
        _remove_unused(made)
        notes += _fold_shapes(made, options)  # each tp rank has its own graph here
    placements = {name: str(p) for name, p in state.placements.items()}
    return TpRanks(
        models[0],
        bindings,
        [initializer_tensors(made) for made in models],
        placements,
        [*state.warnings, *dict.fromkeys(notes)],
        _weight_splits(state),
        models,
        state.mesh.tp_shares,
    )


def _refuse_unsharded(template: ir.Model, state: ShardingState) -> None:
    """tp > 1 where no weight is sharded: every rank would hold and run the whole model, which is not what
    a user asking for tensor parallelism wants (and usually means the model's ops were not recognized)."""
    if any(isinstance(placement, Shard) for placement in state.weight_placements.values()):
        return
    ops = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(template.graph))
    found = ", ".join(f"{op} x{count}" for op, count in ops.most_common(6)) + (", ..." if len(ops) > 6 else "")
    weights = len(state.weight_placements)
    raise ShardingError(
        f"--tp {state.tp} shards no weight of this model ({weights} weight{'s' if weights != 1 else ''}, "
        f"ops: {found or 'none'}): every rank would hold and run the whole model; use --tp 1, or pass "
        "--allow-replicated to write such a replicated plan anyway"
    )


def _rank_varying(state: ShardingState) -> set[str]:
    """Initializers whose value differs between tp ranks (rank constants, sliced weights)."""
    sliced = {name for name, p in state.weight_placements.items() if isinstance(p, Shard | Partial)}
    return set(state.rank_constants) | sliced


def _fold_shapes(model: ir.Model, options: PartitionOptions, rank_varying: set[str] | None = None) -> list[str]:
    """Fold the shape chains of a whole-model rank (pp 1) in place; the warning when they cannot be."""
    if options.pp > 1 or not options.fold_shapes or options.cp > 1:
        # Pipeline stages are cut from this graph by layer; a shared shape value at the graph's start would
        # cross stages, so stage graphs keep their chains (not measured to matter yet: issue 16 is tp decode).
        # With cp the chunk's length is arithmetic on the cp rank constant, which differs between the cp
        # copies of this graph: the exported chains are kept rather than folded from cp rank 0's value.
        return []
    _report, why_not = try_fold_shape_chains(model, options.max_seq, rank_varying or ())
    return [why_not] if why_not else []


def _remove_unused(model: ir.Model) -> None:
    # Rewrites leave constants nobody reads (old head counts); onnxruntime warns about each one.
    ir.passes.common.RemoveUnusedNodesPass()(model)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (nested blocks are fine).

    Graph work makes hundreds of thousands of small objects (nodes, values, attributes) that stay
    alive until the partition ends, and CPython's cyclic collector walks all of them on every full
    collection: a third of the Python time of a 32-layer partition went there. Reference counting
    still frees everything acyclic at once; the few discarded graph copies (cycles) wait for the
    collector to run after the block.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def partition(model: ir.Model, options: PartitionOptions, consume_model: bool = False) -> PartitionResult:
    """Tensor-parallel sharding of `model`, then (pp > 1) pipeline stages cut from the tp ranks.

    The three steps, which `api.partition_to_dir` runs with the weight writer started between the
    second and the third: `shard_tp_ranks`, `plan_rank_weights` (which weights each rank holds; at
    pp > 1 the stage split decided), `build_rank_models`. With `consume_model` the rank models are cut
    from `model` itself, which is then not usable.
    """
    with cyclic_gc_paused():
        tp_ranks = shard_tp_ranks(model, options, consume_model)
        weights = plan_rank_weights(tp_ranks, options)
        return build_rank_models(tp_ranks, weights, options)


@dataclass(frozen=True)
class RankWeightsPlan:
    """Which weights every rank holds, decided before any stage graph is built (`plan_rank_weights`).

    `ranks`: each rank's weights ({initializer name: tensor}, lazy slices of the source's data) and its
    pipeline stage, sorted by rank: what the weight writer places and writes. `stage_splits` (pp > 1):
    the stage split decided and not built yet: one of tp rank 0's model, whose stages every other tp
    rank copies, or with an uneven split one per tp rank; empty at pp 1. `shape_references` (pp > 1): the
    evaluations of tp rank 0's whole model that planned the split, which the stages' analyses take from.
    """

    ranks: tuple[RankWeights, ...]
    stage_splits: tuple[StageSplitPlan, ...] = ()
    shape_references: tuple[ShapeReference, ...] = ()


def plan_rank_weights(tp_ranks: TpRanks, options: PartitionOptions) -> RankWeightsPlan:
    """Which weights each rank gets, and at pp > 1 which stage holds each initializer (the stage split
    planned on tp rank 0's model, or on every tp rank's when the split is uneven): nothing is built."""
    if options.pp == 1:
        if tp_ranks.models is not None:
            tensors = [initializer_tensors(made) for made in tp_ranks.models]
        else:
            tensors = [initializer_tensors(tp_ranks.model)] + [
                tp_rank_copy(tp_ranks.model, tp_rank, weights, tp_ranks.weights[0]).initializer_tensors()
                for tp_rank, weights in enumerate(tp_ranks.weights[1:], 1)
            ]
        cp_mesh = DeviceMesh(cp=options.cp, tp=options.tp)
        return RankWeightsPlan(
            tuple(
                sorted(
                    (
                        RankWeights(cp_mesh.rank_of(MeshCoords(pp=0, cp=cp_rank, tp=tp_rank)), 0, rank_tensors)
                        for tp_rank, tp_tensors in enumerate(tensors)
                        for cp_rank, rank_tensors in _cp_rank_tensors(tp_ranks, tp_tensors, options.cp)
                    ),
                    key=lambda entry: entry.rank,
                )
            )
        )
    mesh = DeviceMesh(pp=options.pp, cp=options.cp, tp=options.tp)
    first = tp_ranks.model
    max_seq = options.max_seq or default_max_seq(first)
    # Its evaluations are kept: the stages cut from it take their shapes and node costs (`build_rank_models`).
    references: list[ShapeReference] = []
    node_cost = node_time_function(
        first, load_profile(options.device), options.max_batch, max_seq, references=references
    )
    stage_costs = memory_limits = None
    if options.cluster is not None:
        stage_costs, memory_limits = _stage_device_costs(first, mesh, options.cluster, options.max_batch, max_seq)
    memory_limit = memory_limits if memory_limits is not None else options.device_memory_bytes
    if tp_ranks.models is not None:
        # Uneven: every tp rank's own model, split at the layers tp rank 0's split chose.
        splits = plan_uneven_tp_stages(
            tp_ranks.models,
            mesh,
            stage_cut_after_layer=options.stage_cut_after_layer,
            node_cost=node_cost,
            memory_limit_bytes=memory_limit,
            stage_node_costs=stage_costs,
            consume_input=True,  # every tp rank's model is this partition's own
            max_seq=max_seq,
        )
    else:
        split = PipelineStageSplit(
            mesh,
            stage_cut_after_layer=options.stage_cut_after_layer,
            node_cost=node_cost,
            memory_limit_bytes=memory_limit,
            stage_node_costs=stage_costs,
            consume_input=True,  # tp rank 0's model is this partition's own (the template or a copy)
            max_seq=max_seq,
        )
        splits = [split.plan(first)]  # the same stages hold the same initializers on every tp rank
    ranks: list[RankWeights] = []
    for tp_rank, rank_weights in enumerate(tp_ranks.weights):
        stages_of = splits[tp_rank if len(splits) > 1 else 0].initializer_stages
        ranks.extend(
            RankWeights(
                mesh.rank_of(MeshCoords(pp=stage, cp=cp_rank, tp=tp_rank)),
                stage,
                {name: tensor for name, tensor in cp_tensors.items() if stage in stages_of.get(name, ())},
            )
            for cp_rank, cp_tensors in _cp_rank_tensors(tp_ranks, rank_weights, options.cp)
            for stage in range(mesh.pp)
        )
    return RankWeightsPlan(tuple(sorted(ranks, key=lambda entry: entry.rank)), tuple(splits), tuple(references))


def _cp_rank_tensors(
    tp_ranks: TpRanks, tensors: dict[str, ir.TensorProtocol], cp: int
) -> Iterator[tuple[int, dict[str, ir.TensorProtocol]]]:
    """A (pp, tp) rank's weights on each cp rank: the same tensors (the plan writes them once per stage,
    shared), but the initializers holding the cp rank."""
    yield 0, tensors
    for cp_rank in range(1, cp):
        constants = {
            name: ir.tensor(value(cp_rank), name=name) for name, value in tp_ranks.cp_rank_constants.items()
        }
        yield cp_rank, {name: constants.get(name, tensor) for name, tensor in tensors.items()}


def build_rank_models(tp_ranks: TpRanks, weights: RankWeightsPlan, options: PartitionOptions) -> PartitionResult:
    """Every rank's model: at pp 1 tp rank 0's and its lazy copies; at pp > 1 the stage graphs of
    `weights.stage_splits` built, and the other tp ranks' stages as copies of tp rank 0's."""
    if options.pp == 1:
        if tp_ranks.models is not None:
            ranks = [RankProgram(r, made, *tp_ranks.bindings[r]) for r, made in enumerate(tp_ranks.models)]
        else:
            ranks = [RankProgram(0, tp_ranks.model, *tp_ranks.bindings[0])] + [
                RankProgram(
                    tp_rank,
                    tp_rank_copy(tp_ranks.model, tp_rank, rank_weights, tp_ranks.weights[0]),
                    *tp_ranks.bindings[tp_rank],
                )
                for tp_rank, rank_weights in enumerate(tp_ranks.weights[1:], 1)
            ]
        mesh = DeviceMesh(cp=options.cp, tp=options.tp, tp_shares=tp_ranks.tp_shares)
        if options.cp > 1:
            ranks = _cp_rank_copies(ranks, weights, mesh)
        return PartitionResult(mesh, ranks, tp_ranks.placements, tp_ranks.warnings, tp_ranks.weight_splits)
    mesh = DeviceMesh(pp=options.pp, cp=options.cp, tp=options.tp)
    if tp_ranks.models is not None:
        staged = build_uneven_tp_stages(weights.stage_splits, tp_ranks.bindings, mesh)
        mesh = DeviceMesh(pp=options.pp, cp=options.cp, tp=options.tp, tp_shares=tp_ranks.tp_shares)
    else:
        (split,) = weights.stage_splits
        staged = tp_rank_stages(split.build(), tp_ranks.bindings, tp_ranks.weights.__getitem__, mesh)
    ranks = [RankProgram(s.rank, s.model, list(s.inputs), list(s.outputs), s.layers) for s in staged]
    # The other tp ranks' copies are made from these stage models, so they inherit the clean-up.
    for program in ranks:
        if isinstance(program.model_or_copy, ir.Model):
            _remove_unused(program.model_or_copy)
    if options.cp > 1:
        ranks = _cp_rank_copies(ranks, weights, mesh)
    return PartitionResult(
        mesh, ranks, tp_ranks.placements, tp_ranks.warnings, tp_ranks.weight_splits, weights.shape_references
    )


def _cp_rank_copies(programs: list[RankProgram], weights: RankWeightsPlan, mesh: DeviceMesh) -> list[RankProgram]:
    """Every rank of a cp mesh from the cp rank 0 programs (one per (pp, tp) rank): the model of each (pp, tp)
    rank's source (tp rank 0's stage, or its own with an uneven split) copied with the rank's weights (its cp
    rank constants) and its collective groups and peers moved to its coordinates (`moved_rank_copy`); the
    source itself is kept where the rank is its own."""
    held = {entry.rank: entry.tensors for entry in weights.ranks}
    ranks: list[RankProgram] = []
    for program in programs:
        made = program.model_or_copy
        source = made.source if isinstance(made, TpRankCopy) else made
        first = initializer_tensors(source)
        coords = mesh.coords(program.rank)
        for cp_rank in range(mesh.cp):
            rank = mesh.rank_of(dataclasses.replace(coords, cp=cp_rank))
            moved = moved_rank_copy(source, mesh, rank, held[rank], first)
            # The source's own rank keeps the source: nothing moves, nothing changes.
            own = rank == mesh.rank_of(MeshCoords(pp=coords.pp, cp=0, tp=0)) and not moved.changed
            ranks.append(RankProgram(rank, source if own else moved, program.inputs, program.outputs, program.layers))
    return sorted(ranks, key=lambda program: program.rank)


def _tp_bindings(
    graph: ir.Graph, state: ShardingState, tp_rank: int
) -> tuple[list[SliceBinding], list[SliceBinding]]:
    """tp rank `tp_rank`'s (inputs, outputs): original -> tp-local."""
    tp = state.tp
    inputs = [_binding(v, state.placements[v.name], _dim_of(state, v), tp, tp_rank) for v in graph.inputs]
    outputs = [_binding(v, state.placements[v.name], _dim_of(state, v), tp, tp_rank) for v in graph.outputs]
    return inputs, outputs


def _stage_device_costs(
    model: ir.Model, mesh: DeviceMesh, cluster: Cluster, max_batch: int, max_seq: int
) -> tuple[list[Callable[[ir.Node], float]], list[int]]:
    """Per stage: a node's predicted time on the stage's slowest device (its tp collectives over the
    link its tp group spans), and the stage's smallest device memory."""
    costs: list[Callable[[ir.Node], float]] = []
    limits: list[int] = []
    for stage in range(mesh.pp):
        group = mesh.group(mesh.rank_of(MeshCoords(pp=stage, cp=0, tp=0)), "tp")
        link = cluster.group_link(group)
        profiles = {cluster.devices[r].profile.name: cluster.devices[r].profile for r in group}.values()
        times = [
            # mypy cannot infer a lambda with a default argument; the default binds this stage's link.
            node_time_function(model, profile, max_batch, max_seq, link_of=lambda _node, link=link: link)  # type: ignore[misc]
            for profile in profiles
        ]
        costs.append(times[0] if len(times) == 1 else _slowest_of(times))
        limits.append(min(cluster.devices[r].memory_bytes for r in group))
    return costs, limits


def _slowest_of(times: list[Callable[[ir.Node], float]]) -> Callable[[ir.Node], float]:
    return lambda node: max(time_of(node) for time_of in times)


def _dim_of(state: ShardingState, value: ir.Value) -> int | str | None:
    placement = state.placements[value.name]
    shape = state.shapes.get(value.name)
    if not isinstance(placement, Shard) or shape is None:
        return None
    return shape[placement.dim]
