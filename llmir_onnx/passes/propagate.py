"""Propagate: give every value a placement, node by node in topological order.

Weights and graph inputs are *free*: the first rule that asks for a placement fixes theirs (a weight is
then sliced, an input bound as a slice). A weight asked for a different placement by a later consumer
is duplicated for that consumer (the copy shares the stored bytes until localize slices it). Any other
mismatch between what a value holds and what its consumer's rule needs is a redistribution, which
insert_collectives turns into a collective.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Callable

import onnx_ir as ir

from llmir_onnx.errors import LlmirError, ShardingError
from llmir_onnx.mesh import DeviceMesh, split_shares
from llmir_onnx.passes.annotate import assign_weight_roles, tp_mesh
from llmir_onnx.passes.insert_collectives import InsertCollectivesPass
from llmir_onnx.passes.localize import LocalizePass
from llmir_onnx.passes.state import (
    Redistribution,
    ShardingPassResult,
    ShardingState,
    precondition,
    require_annotated,
    subgraphs_of,
)
from llmir_onnx.placement import REPLICATE, Partial, Placement, Replicate, Shard, is_shard
from llmir_onnx.propagation.base import (
    Decision,
    RuleContext,
    any_sharded,
    divisibility_error,
    replicated,
    tp_candidates,
    valid_tp_listing,
)
from llmir_onnx.propagation.registry import record_for

logger = logging.getLogger(__name__)


def _check_divisible(ctx: RuleContext, node: ir.Node, value: ir.Value, placement: Placement) -> None:
    if not isinstance(placement, Shard):
        return
    size = ctx.static_dim(value, placement.dim) if ctx.rank(value) is not None else None
    if size is None:
        raise ShardingError(
            f"value {value.name!r} of node {node.name} ({node.op_type}) is split on axis {placement.dim} whose "
            "size is not static; export the model with static head counts and hidden sizes"
        )
    sizes = list(placement.blocks) if placement.blocks else [size]
    if sum(sizes) != size:
        raise ShardingError(f"internal: blocks {placement} of {value.name!r} do not add up to its size {size}")
    if placement.parts:
        # Fewer parts than ranks was chosen from a head count; that count carries the tp constraint.
        if not placement.divides(size, ctx.tp):
            raise ShardingError(f"internal: {placement} does not split axis {placement.dim} of {value.name!r}")
        return
    ctx.require_divisible(node, f"axis {placement.dim} of {value.name!r}", sizes, value=value.name)


def _partitions_at(model: ir.Model, state: ShardingState, tp: int, units_only: bool = False) -> bool:
    """Whether the sharding passes succeed on a copy of `model` at another tp (shapes do not depend on tp).
    `units_only`: whether propagation alone succeeds where axes that can split on tp parts of their own
    are left aside (the plan in units of one head that every uneven tp starts from)."""
    trial = model.clone()
    probe = ShardingState(
        tp_mesh(state.attention_heads, DeviceMesh(pp=1, tp=tp), None, state.head_counts),
        replicate_unsupported=state.replicate_unsupported,
        vocab_parallel=state.vocab_parallel,
        input_seeds=dict(state.input_seeds),
        shapes=dict(state.shapes),
        attention_heads=state.attention_heads,
        head_counts=state.head_counts,
    )
    ctx = RuleContext(tp=probe.tp_units, shapes=probe.shapes)
    probe.roles = assign_weight_roles(trial, ctx, state.vocab_parallel)
    try:
        PropagatePass(probe, try_other_tps=False, units_only=units_only).call(trial)
        if units_only:
            return True
        InsertCollectivesPass(probe).call(trial)
        LocalizePass(probe).call(trial)
    except LlmirError:
        return False
    return True


class PropagatePass(ir.passes.InPlacePass):
    """Placements for every value; redistributions where a rule needs something else.

    Needs: `state` from AnnotatePass (global shapes, weight roles), with no placements yet.
    Provides in `result.state`: placements (every value, in subgraphs too: they run whole on every rank),
    redistributions, output_targets, weight_placements, weight_views, warnings.
    Modifies the model only where a weight is duplicated for a consumer that needs another placement.
    """

    def __init__(self, state: ShardingState, try_other_tps: bool = True, units_only: bool = False) -> None:
        super().__init__()
        self.state = state
        # A tp that some split cannot take is refused with the tp values that work, each one tried.
        self.try_other_tps = try_other_tps
        # A trial of the units plan: split axes that name their value (they may split on their own parts
        # of another tp) are not checked.
        self.units_only = units_only
        self._duplicated = 0

    def requires(self, model: ir.Model) -> None:
        require_annotated(self.state, "propagate")
        placed = next((v.name for node in model.graph for v in node.outputs if v.name in self.state.placements), None)
        precondition(
            placed is None,
            f"propagate places every value once, but {placed!r} already has a placement: run it on a state fresh "
            "from AnnotatePass",
        )

    def call(self, model: ir.Model) -> ShardingPassResult:
        state = self.state
        ctx = RuleContext(tp=state.tp_units, shapes=state.shapes, roles=state.roles)
        graph = model.graph
        free = {v.name for v in graph.inputs} | set(graph.initializers)
        placements = state.placements
        for value in graph.inputs:
            if value.name in state.input_seeds:
                placements[value.name] = state.input_seeds[value.name]
        reduced: set[str] = set()
        for node in list(graph):
            current = [placements.get(v.name) if v is not None else None for v in node.inputs]
            # A Partial value already reduced for an earlier consumer is offered reduced: reusing that
            # AllReduce beats carrying the partial further and reducing it a second time downstream.
            current = [
                REPLICATE if v is not None and isinstance(p, Partial) and v.name in reduced else p
                for v, p in zip(node.inputs, current, strict=True)
            ]
            decision = self._decide(ctx, node, current)
            self._replicate_subgraphs(graph, node, free)
            for index, (value, required) in enumerate(zip(node.inputs, decision.inputs, strict=True)):
                if value is None or required is None:
                    continue
                held = placements.get(value.name)
                if index in decision.weight_views:
                    state.weight_views[value.name] = decision.weight_views[index]
                if held is None and value.name in free:
                    placements[value.name] = required
                    continue
                held = held or REPLICATE
                if held == required:
                    continue
                if isinstance(held, Partial) and isinstance(required, Replicate):
                    reduced.add(value.name)
                if value.is_initializer():
                    self._duplicate_weight(graph, node, index, value, required)
                    continue
                state.redistributions.append(Redistribution(node.name, index, value.name, held, required))
            for value, placement in zip(node.outputs, decision.outputs, strict=True):
                _check_divisible(ctx, node, value, placement)
                # A single kv head held whole by every rank is replicated: rules that act per head or on
                # head_dim (q/k norms, rotary) then need no gather, and none can split head_dim by mistake.
                full = isinstance(placement, Shard) and placement.holds_everything()
                placements[value.name] = REPLICATE if full else placement
        works = functools.cache(lambda tp: _partitions_at(model, self.state, tp)) if self.try_other_tps else None
        own, element = self._own_splits(graph) if state.tp > 1 else (set(), {})
        constraints = [
            c
            for c in ctx.constraints
            if c.value not in own and c.value not in element and not (self.units_only and c.value)
        ]
        units_works = None
        if self.try_other_tps and state.attention_heads:
            heads = state.attention_heads
            units_works = functools.cache(lambda: _partitions_at(model, self.state, heads, units_only=True))
        error = divisibility_error(
            state.tp, constraints, works, state.mesh.tp_shares, state.attention_heads, units_works
        )
        if error is not None:
            raise error
        for value in graph.inputs:
            placements.setdefault(value.name, REPLICATE)
        for name in graph.initializers:
            placements.setdefault(name, REPLICATE)
        for value in graph.outputs:
            held = placements.get(value.name, REPLICATE)
            if state.keep_output_placements:
                break
            rank = len(state.shapes.get(value.name) or ())
            vocab_split = state.vocab_parallel and isinstance(held, Shard) and rank and held.dim == rank - 1
            if isinstance(held, Partial) or (isinstance(held, Shard) and held.blocks) or vocab_split:
                state.output_targets[value.name] = REPLICATE
        state.weight_placements = {name: placements[name] for name in graph.initializers}
        state.element_split = bool(element)
        if state.uneven:
            self._apply_shares(works, own, element)
        return ShardingPassResult(model, self._duplicated > 0, state)

    def _own_splits(self, graph: ir.Graph) -> tuple[set[str], dict[str, tuple[int, ...]]]:
        """Values whose split does not follow the heads' units: groups of split values joined through nodes
        (an MLP's intermediate columns, a vocabulary table, its lm_head and logits) whose axis the units do
        not divide. A column-parallel/row-parallel pair only needs the same split on both sides, and the
        group holds both. Returns:

        * `own`: groups that tp divides, split into tp equal parts of their own (plain shards);
        * `element`: plain groups of one size that neither divides, value -> shares: the axis is cut into
          parts of one element, near-equal (`mesh.split_shares`, the larger parts first) or, with per-rank
          `tp_weights` (mixed devices), in proportion to the weights, as the heads are.

        Blocks (fused [q|k|v] columns), repeated parts and groups of mixed sizes stay in units (and are
        refused when those do not divide them)."""
        state, placements = self.state, self.state.placements
        parent: dict[str, str] = {}

        def root(name: str) -> str:
            while parent.setdefault(name, name) != name:
                name = parent[name]
            return name

        for node in graph:
            values = (*node.inputs, *node.outputs)
            split = [v.name for v in values if v is not None and is_shard(placements.get(v.name))]
            for name in split:
                parent[root(name)] = root(split[0])
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for name in parent:
            groups[root(name)].append(name)

        def shard(name: str) -> Shard:
            placement = placements[name]
            assert isinstance(placement, Shard)  # the names in `parent` are the split ones (above)
            return placement

        def size(name: str) -> int | str | None:
            placement, shape = shard(name), state.shapes.get(name)
            return shape[placement.dim] if shape is not None and placement.dim < len(shape) else None

        def in_units(name: str) -> bool:
            return isinstance(length := size(name), int) and shard(name).divides(length, state.tp_units)

        def in_tp(name: str) -> bool:
            length = size(name)
            return shard(name).plain and isinstance(length, int) and length % state.tp == 0

        own: set[str] = set()
        element: dict[str, tuple[int, ...]] = {}
        for members in groups.values():
            if all(map(in_units, members)):
                continue
            if all(map(in_tp, members)):
                own.update(members)
                continue
            lengths = {size(name) for name in members}
            length = lengths.pop() if len(lengths) == 1 else None
            if all(shard(name).plain for name in members) and isinstance(length, int) and length >= state.tp:
                shares = split_shares(length, state.tp, state.tp_weights)
                element.update(dict.fromkeys(members, shares))
        return own, element

    def _apply_shares(
        self, works: Callable[[int], bool] | None, own: set[str], element: dict[str, tuple[int, ...]]
    ) -> None:
        """Rules planned the split in units; every shard now says which units each tp rank holds, but for
        the values split into tp equal parts of their own (`own`), which stay plain shards, and those cut
        into parts of one element (`element`), which hold their own shares."""
        state = self.state
        shares = state.mesh.tp_shares
        element_dims = {
            name: placement.dim
            for name, placement in state.placements.items()
            if name in element and isinstance(placement, Shard)
        }

        def uneven(name: str, placement: Placement) -> Placement:
            if not isinstance(placement, Shard) or name in own:
                return placement
            if name in element:
                if placement.dim != element_dims[name]:
                    raise ShardingError(
                        f"value {name!r} is split unevenly on axis {element_dims[name]} (parts "
                        f"{','.join(map(str, element[name]))}) and asked for on axis {placement.dim}; "
                        f"use a tp that divides its axis {element_dims[name]}"
                    )
                return placement.with_shares(element[name])
            if not shares:
                return placement
            misfit = placement.with_shares(shares).uneven_misfit()
            if misfit is not None:
                listed = valid_tp_listing(state.tp, tp_candidates([]), works, state.attention_heads, units_plan=True)
                raise ShardingError(
                    f"--tp {state.tp} splits the {state.tp_units} heads as {','.join(map(str, shares))}: {misfit} "
                    f"(value {name!r}); use {listed}"
                )
            return placement.with_shares(shares)

        state.placements.update({name: uneven(name, p) for name, p in state.placements.items()})
        state.weight_placements = {name: uneven(name, p) for name, p in state.weight_placements.items()}
        state.redistributions = [
            dataclasses.replace(r, current=uneven(r.value, r.current), required=uneven(r.value, r.required))
            for r in state.redistributions
        ]
        state.output_targets = {name: uneven(name, p) for name, p in state.output_targets.items()}

    def _replicate_subgraphs(self, graph: ir.Graph, node: ir.Node, free: set[str]) -> None:
        """Subgraphs (If/Loop/Scan) run whole on every rank: every value in them is replicated, and so is every
        outer value they read (implicitly: no rule sees those). A free one (a weight, a graph input) is fixed
        replicated here, as a rule fixes what it asks for; a sharded weight is read through a replicated copy
        (as when two rules disagree, whichever comes first); a sharded or partial activation is refused."""
        placements = self.state.placements
        inside = set(subgraphs_of(node))
        for subgraph in list(inside):
            nested = ir.traversal.RecursiveGraphIterator(subgraph)
            inside.update(deeper for inner in nested for deeper in subgraphs_of(inner))
        for subgraph in inside:
            for value in [*subgraph.inputs, *subgraph.initializers.values()]:
                placements[value.name] = REPLICATE
            for inner in subgraph:
                for index, value in enumerate(inner.inputs):
                    if value is None or value.graph in inside:
                        continue
                    held = placements.get(value.name)
                    if held is None and value.name in free:
                        placements[value.name] = REPLICATE
                    elif held is None or held == REPLICATE:
                        continue
                    elif value.is_initializer():
                        self._duplicate_weight(graph, inner, index, value, REPLICATE)
                    else:
                        raise ShardingError(
                            f"node {node.name} ({node.op_type}) reads {value.name!r}, which is {held}, inside its "
                            f"subgraph (node {inner.name}, {inner.op_type}); sharding through control flow is not "
                            "supported: export without it"
                        )
                for value in inner.outputs:
                    placements[value.name] = REPLICATE

    def _decide(self, ctx: RuleContext, node: ir.Node, current: list[Placement | None]) -> Decision:
        record = record_for(node)
        rule = None if record is None else record.rule
        if rule is None:
            if not any_sharded(current):
                return replicated(node)
            held = ", ".join(
                f"{v.name!r} is {p}"
                for v, p in zip(node.inputs, current, strict=True)
                if v is not None and p not in (None, REPLICATE)
            )
            domain = node.domain or "ai.onnx"
            if not self.state.replicate_unsupported:
                raise ShardingError(
                    f"no sharding rule for op {domain}::{node.op_type} in node {node.name}, which sits in a sharded "
                    f"region ({held}); pass --replicate-unsupported to gather its inputs and run it replicated"
                )
            message = f"node {node.name} ({domain}::{node.op_type}) has no sharding rule; its inputs are gathered"
            logger.warning(message)
            self.state.warnings.append(message)
            return replicated(node)
        inner_blocks = any(isinstance(p, Shard) and p.inner_blocks for p in current)
        if inner_blocks and not (record is not None and record.inner_blocks):
            return replicated(node)  # insert_collectives then refuses to gather it, naming the value
        decision = rule(ctx, node, current)
        if len(decision.inputs) != len(node.inputs) or len(decision.outputs) != len(node.outputs):
            raise ShardingError(f"internal: the rule for {node.op_type} answered for the wrong number of values")
        return decision

    def _duplicate_weight(
        self, graph: ir.Graph, node: ir.Node, index: int, value: ir.Value, required: Placement
    ) -> None:
        copy = ir.Value(name=f"{value.name}__{required!s}", shape=value.shape, type=value.type)
        copy.const_value = value.const_value
        if copy.name not in graph.initializers:
            graph.register_initializer(copy)
        else:
            copy = graph.initializers[copy.name]
        node.replace_input_with(index, copy)
        self._duplicated += 1
        self.state.placements[copy.name] = required
        self.state.shapes[copy.name] = self.state.shapes.get(value.name)

    def ensures(self, model: ir.Model) -> None:
        missing = [
            v.name
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            for v in node.outputs
            if v.name not in self.state.placements
        ]
        if missing:
            raise ir.passes.PostconditionError(f"values without placement: {missing[:5]}")
