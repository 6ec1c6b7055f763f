"""Choosing pipeline cut points: contiguous layer ranges that minimise the slowest stage.

A pipeline runs at the pace of its slowest stage, so the cuts minimise the maximum stage cost
(not the sum). The stages are contiguous ranges of decoder layers; the embedding (everything before
layer 0) always belongs to the first stage and the final norm + lm_head to the last, so their cost
and weights count there: a large lm_head pushes layers off the last stage.

The cost of a unit (a layer, the embedding, the head) is the sum of a per-node cost callable. Until
the cost model (`llmir_onnx.plan.cost`) is plugged in, `default_node_cost` is a time proxy: weight
bytes a node streams per token plus 2 x multiply-adds per token. Memory is exact weight bytes: the
union of the initializers a stage reads (a weight shared by two layers of one stage counts once; a
tied embedding/lm_head table counts on both the first and the last stage, since both hold a copy),
plus optional extra bytes per unit (e.g. the KV cache at the planned batch and length).

With mixed devices each stage has its own costs (the units timed on that stage's devices) and its own
memory limit, so a slower or smaller stage gets fewer layers; the search is the same.

The search is an exact dynamic program over (stage, last layer): O(P x L^2), trivial for L <= a few
hundred layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from llmir_onnx.errors import PlanError
from llmir_onnx.plan.memory import format_bytes

NodeCost = Callable[[ir.Node], float]

# ops whose second (or first) operand is a weight matrix multiplied with every token
_MATMUL_OPS = frozenset({"MatMul", "Gemm", "MatMulInteger", "FusedMatMul", "MatMulNBits", "Conv"})


@dataclass(frozen=True)
class StageUnit:
    """One indivisible piece of the layer sequence: a decoder layer, the embedding or the head."""

    name: str
    cost: float
    weights: Mapping[str, int] = field(default_factory=dict)  # initializer name -> bytes
    extra_memory_bytes: int = 0


@dataclass(frozen=True)
class StageBalance:
    """The chosen cuts: stage s holds layers `stage_layers[s]` (a range of layer indices)."""

    cut_after_layer: tuple[int, ...]
    stage_layers: tuple[range, ...]
    stage_costs: tuple[float, ...]
    stage_memory_bytes: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def bottleneck_cost(self) -> float:
        return max(self.stage_costs)


def _tensor_bytes(value: ir.Value) -> int:
    tensor = value.const_value
    if tensor is None:
        return 0
    return int(tensor.nbytes)


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def node_weights(node: ir.Node) -> dict[str, int]:
    """Initializers (and Constant payloads) a node reads, including inside its subgraphs: name -> bytes."""
    weights: dict[str, int] = {}
    for each in (node, *subgraph_nodes(node)):
        for value in each.inputs:
            if _is_weight(value):
                assert value is not None
                weights[value.name or f"<unnamed {id(value)}>"] = _tensor_bytes(value)
        if each.op_type == "Constant" and each.domain in ("", "ai.onnx"):
            for attr in each.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    weights[each.outputs[0].name or f"<constant {id(each)}>"] = int(attr.as_tensor().nbytes)
    return weights


def subgraph_nodes(node: ir.Node) -> list[ir.Node]:
    """Every node inside the subgraphs (If/Loop/Scan bodies) of `node`, recursively."""
    found: list[ir.Node] = []
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.GRAPH:
            found.extend(ir.traversal.RecursiveGraphIterator(attr.as_graph()))
        elif attr.type == ir.AttributeType.GRAPHS:
            for graph in attr.as_graphs():
                found.extend(ir.traversal.RecursiveGraphIterator(graph))
    return found


def default_node_cost(node: ir.Node) -> float:
    """Time proxy per token: weight bytes streamed + 2 x multiply-adds (the lead swaps in plan/cost.py)."""
    cost = 0.0
    for index, value in enumerate(node.inputs):
        if not _is_weight(value):
            continue
        assert value is not None
        nbytes = _tensor_bytes(value)
        # a weight's shape is static
        shape = tuple(value.const_value.shape.numpy()) if value.const_value is not None else ()
        numel = math.prod(shape)
        if node.op_type in _MATMUL_OPS and index > 0:
            if node.op_type == "MatMulNBits":
                k = node.attributes.get_int("K", 0)
                n = node.attributes.get_int("N", 0)
                numel = k * n if k and n else numel
            cost += nbytes + 2.0 * numel
        elif node.op_type == "Gather" and index == 0 and len(shape) == 2:
            # an embedding lookup streams one row per token, not the table
            row = shape[1]
            cost += nbytes / max(shape[0], 1) + row
        else:
            cost += nbytes
    return cost


def unit_from_nodes(name: str, nodes: Sequence[ir.Node], node_cost: NodeCost, extra_memory_bytes: int = 0) -> StageUnit:
    weights: dict[str, int] = {}
    total = 0.0
    for node in nodes:
        total += float(node_cost(node))
        weights.update(node_weights(node))
    return StageUnit(name, total, weights, extra_memory_bytes)


class _Segments:
    """Cost and exact (union) memory of every contiguous layer range [start, stop)."""

    def __init__(self, layers: Sequence[StageUnit], prefix: StageUnit | None, suffix: StageUnit | None) -> None:
        count = len(layers)
        self.cost = np.zeros((count + 1, count + 1))
        self.memory = np.zeros((count + 1, count + 1), dtype=np.int64)
        for start in range(count):
            weights: dict[str, int] = {}
            cost = 0.0
            extra = 0
            if start == 0 and prefix is not None:
                weights.update(prefix.weights)
                cost += prefix.cost
                extra += prefix.extra_memory_bytes
            for stop in range(start + 1, count + 1):
                unit = layers[stop - 1]
                weights.update(unit.weights)
                cost += unit.cost
                extra += unit.extra_memory_bytes
                seg_cost, seg_memory = cost, sum(weights.values()) + extra
                if stop == count and suffix is not None:
                    seg_cost += suffix.cost
                    merged = {**weights, **suffix.weights}
                    seg_memory = sum(merged.values()) + extra + suffix.extra_memory_bytes
                self.cost[start, stop] = seg_cost
                self.memory[start, stop] = seg_memory


def _min_max_partition(
    count: int, stages: int, weight: Sequence[np.ndarray], allowed: Sequence[np.ndarray]
) -> list[int] | None:
    """Stage boundaries [0, b1, ..., count] minimising the max of weight[stage][start, stop] over allowed
    segments (one matrix per stage: a stage's devices set what a range of layers costs there)."""
    best = np.full((stages + 1, count + 1), np.inf)
    choice = np.zeros((stages + 1, count + 1), dtype=np.int64)
    best[0, 0] = -np.inf
    for stage in range(1, stages + 1):
        stage_weight, stage_allowed = weight[stage - 1], allowed[stage - 1]
        for stop in range(stage, count - (stages - stage) + 1):
            for start in range(stage - 1, stop):
                if not stage_allowed[start, stop] or best[stage - 1, start] == np.inf:
                    continue
                value = max(best[stage - 1, start], stage_weight[start, stop])
                # strict '<' keeps the earliest start among ties: deterministic cuts
                if value < best[stage, stop]:
                    best[stage, stop] = value
                    choice[stage, stop] = start
    if best[stages, count] == np.inf:
        return None
    bounds = [count]
    for stage in range(stages, 0, -1):
        bounds.append(int(choice[stage, bounds[-1]]))
    return bounds[::-1]


def _describe_stage(
    stage: int, start: int, stop: int, count: int, prefix: StageUnit | None, suffix: StageUnit | None
) -> str:
    parts = []
    if start == 0 and prefix is not None:
        parts.append(prefix.name)
    parts.append(f"layers {start}-{stop - 1}" if stop - start > 1 else f"layer {start}")
    if stop == count and suffix is not None:
        parts.append(suffix.name)
    return f"stage {stage} ({' + '.join(parts)})"


def balance_stages(
    layers: Sequence[StageUnit],
    num_stages: int,
    *,
    prefix: StageUnit | None = None,
    suffix: StageUnit | None = None,
    memory_limit_bytes: int | Sequence[int] | None = None,
    stage_units: Sequence[tuple[StageUnit | None, Sequence[StageUnit], StageUnit | None]] | None = None,
) -> StageBalance:
    """Cut `layers` into `num_stages` contiguous non-empty ranges minimising the slowest stage's cost.

    `prefix` (embedding) joins the first stage, `suffix` (final norm + lm_head) the last. With
    `memory_limit_bytes`, every stage's exact weight bytes (+ extra bytes) must fit; if no cut fits,
    the error names the stage of the tightest cut that overflows and by how much.

    Mixed devices: `memory_limit_bytes` may be one limit per stage, and `stage_units` one (prefix,
    layers, suffix) per stage with the costs on that stage's devices (a slower stage's units cost
    more, so it gets fewer layers); memory is always `layers`' (the weights do not depend on the device).
    """
    count = len(layers)
    if num_stages < 1:
        raise PlanError(f"--pp {num_stages}: the number of pipeline stages must be at least 1")
    if num_stages > count:
        raise PlanError(
            f"--pp {num_stages} needs at least one decoder layer per stage but the model has {count} layers; "
            f"use --pp {count} or less"
        )
    if stage_units is not None and len(stage_units) != num_stages:
        raise PlanError(f"stage_units has {len(stage_units)} entries for {num_stages} pipeline stages")
    limits = (
        [memory_limit_bytes] * num_stages
        if memory_limit_bytes is None or isinstance(memory_limit_bytes, int)
        else list(memory_limit_bytes)
    )
    if len(limits) != num_stages:
        raise PlanError(f"{len(limits)} memory limits for {num_stages} pipeline stages")
    segments = _Segments(layers, prefix, suffix)
    if stage_units is None:
        costs = [segments.cost] * num_stages
    else:
        costs = [_Segments(units, first, last).cost for first, units, last in stage_units]
    allowed = []
    for limit in limits:
        fits = np.zeros((count + 1, count + 1), dtype=bool)
        for start in range(count):
            for stop in range(start + 1, count + 1):
                fits[start, stop] = limit is None or segments.memory[start, stop] <= limit
        allowed.append(fits)
    bounds = _min_max_partition(count, num_stages, costs, allowed)
    if bounds is None:
        everything = [np.ones_like(allowed[0])] * num_stages
        # the cut closest to fitting: the smallest largest excess over a stage's limit
        excess = [segments.memory.astype(np.float64) - float(limit or 0) for limit in limits]
        tightest = _min_max_partition(count, num_stages, excess, everything)
        assert tightest is not None
        worst_stage = max(range(num_stages), key=lambda s: excess[s][tightest[s], tightest[s + 1]])
        start, stop = tightest[worst_stage], tightest[worst_stage + 1]
        need = int(segments.memory[start, stop])
        limit = int(limits[worst_stage] or 0)
        cuts = " | ".join(f"{tightest[s]}-{tightest[s + 1] - 1}" for s in range(num_stages))
        raise PlanError(
            f"no cut of {count} layers into {num_stages} pipeline stages fits {format_bytes(limit)} per "
            f"device: even the tightest cut (layers {cuts}) needs {format_bytes(need)} on "
            f"{_describe_stage(worst_stage, start, stop, count, prefix, suffix)}, "
            f"{format_bytes(need - limit)} over the limit; use more pipeline stages or tensor "
            "parallelism, or devices with more memory"
        )
    ranges = tuple(range(bounds[s], bounds[s + 1]) for s in range(num_stages))
    return StageBalance(
        cut_after_layer=tuple(r.stop - 1 for r in ranges[:-1]),
        stage_layers=ranges,
        stage_costs=tuple(float(costs[s][r.start, r.stop]) for s, r in enumerate(ranges)),
        stage_memory_bytes=tuple(int(segments.memory[r.start, r.stop]) for r in ranges),
    )


def stage_layer_ranges(num_layers: int, cut_after_layer: Sequence[int]) -> tuple[range, ...]:
    """Layer ranges from explicit cuts; refuses cuts that are unsorted, repeated or out of range."""
    cuts = list(cut_after_layer)
    if cuts != sorted(set(cuts)) or any(not 0 <= c < num_layers - 1 for c in cuts):
        raise PlanError(
            f"--stage-cuts {','.join(map(str, cuts))}: the cuts must be strictly increasing layer indices in "
            f"0..{num_layers - 2} (the model has {num_layers} layers; a cut after the last layer would leave an "
            "empty stage)"
        )
    bounds = [0, *(c + 1 for c in cuts), num_layers]
    return tuple(range(bounds[s], bounds[s + 1]) for s in range(len(bounds) - 1))
