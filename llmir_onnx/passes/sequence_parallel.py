"""Sequence parallelism (Megatron SP, `--sp` with `--tp`): the work between the tensor-parallel blocks
(residual adds, norms, other per-token elementwise work) runs on a slice of the tokens.

Where the collectives go. Propagation leaves every row-parallel block's output Partial and the residual
stream Replicate; the AllReduce that would make it Replicate becomes a ReduceScatter along the token axis,
the per-token work after it runs on this rank's chunk of tokens, and an AllGather along the token axis
feeds whatever needs every token (the next column-parallel block, the lm_head, a Shape). A replicated
token-axis value that meets the sharded stream (the embedding output at the first residual add) is cut
locally, with no communication.

Which nodes join. The regions are found by the sharding rules themselves, on a second placement per
value, the token axis (`Shard(axis)` in `ShardingState.sequence_shards`): walking the graph in order, a
node joins when its rule (only the per-element and per-row families: `propagation.elementwise` and
`propagation.reductions`, i.e. elementwise ops, reductions and norms over other axes, skip-norms) keeps
every token-axis input and output split on the token axis, its other inputs replicated (weights, per-channel
constants), and it reads the sharded stream or a Partial row-parallel output that propagation wanted
replicated. The token axis of a value is the axis whose symbolic dim has the role "new" (model_facts'
dim roles, read from the model's signature), so no exporter's node names matter. A node whose rule says
otherwise (attention, a column-parallel MatMul, a Reshape that reads the sequence length) is outside.

Uneven and one-token lengths. The number of new tokens n is dynamic (a prefill of any length, a decode
step of one), and ReduceScatter/AllGather need equal parts. Every conversion pads the token axis with
zeros to the next multiple of tp, c = ceil(n / tp) tokens per rank, and the gather slices the first n
tokens back: rank r holds tokens [r*c, (r+1)*c) of the padded sequence. The ops inside a region never mix
tokens (that is what the rules checked), so the padding rows never reach a real token, and they are
dropped at the gather: outputs equal the original for every n, 1 included (rank 0 holds the token, the
others a row of zeros). n is read from a graph input with the token axis (`input_ids`), the same on every
rank and in every pipeline stage (stages recompute such input-derived shape arithmetic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.errors import PlanError
from llmir_onnx.mesh import MeshAxis
from llmir_onnx.model_facts import NEW, dim_roles
from llmir_onnx.passes.state import (
    Redistribution,
    ShardingPassResult,
    ShardingState,
    pending_redistributions,
    precondition,
    require_propagated,
)
from llmir_onnx.placement import REPLICATE, Partial, Placement, Replicate, Shard
from llmir_onnx.propagation import elementwise, lookup, reductions
from llmir_onnx.propagation.base import RuleContext
from llmir_onnx.propagation.registry import Rule

# Rule families whose ops act on each token on its own when the token axis is split: a node joins a
# sequence-parallel region only when one of these rules keeps that split.
PER_TOKEN_RULE_MODULES = frozenset({elementwise.__name__, reductions.__name__})
# The folder of the names of the values a token-splitting pass makes, by the mesh axis it splits over.
_NAME_PREFIX: dict[str, str] = {"tp": "sp", "cp": "cp"}


class SequenceParallelPass(ir.passes.InPlacePass):
    """Between propagate and insert_collectives: token-sharded regions, their ReduceScatter/AllGather.

    Needs: `state` from PropagatePass, with every redistribution still unconverted (InsertCollectivesPass
    has not run: it would all-reduce what this pass scatters).
    Provides in `result.state`: sequence_shards; the redistributions it converted are gone from the list.
    A second run finds the regions decided (sequence_shards) and changes nothing. Only top-level nodes
    join a region: a node holding a subgraph never joins (`_joins`), nor anything inside it, which runs
    whole on every rank; a subgraph's read of a region's value is a use outside the region, rewired to
    the value's AllGather like any other (`_rewrite`).
    """

    # The mesh axis whose group splits the tokens; names of the values this pass makes say it.
    mesh_axis: MeshAxis = "tp"
    # A Partial token-axis input of a region is a row-parallel output over this same group: its reduction
    # becomes a ReduceScatter (sp). Over another axis (cp) it is cut like any other value.
    _scatters_partial_sums = True

    def __init__(self, state: ShardingState) -> None:
        super().__init__()
        self.state = state
        self._parts = state.mesh.size(self.mesh_axis)
        self._counter = 0
        self._converted: dict[tuple[str, str], ir.Value] = {}
        self._pad_vectors: dict[tuple[int, int], ir.Value] = {}
        self._lengths: dict[str, ir.Value] = {}
        self._symbols: set[str] = set()
        self._chunks: dict[str, int] = {}  # values made here that hold a chunk of the tokens -> token axis

    def requires(self, model: ir.Model) -> None:
        require_propagated(model, self.state, "sequence parallelism")
        converted = len(self.state.redistributions) - len(pending_redistributions(model, self.state, with_whole=True))
        precondition(
            self.state.tp == 1 or converted == 0,
            f"sequence parallelism runs before insert_collectives, but {converted} redistributions are converted "
            "already: run it on the state and model from PropagatePass",
        )

    def call(self, model: ir.Model) -> ShardingPassResult:
        state, graph = self.state, model.graph
        if state.tp == 1 or state.sequence_shards:
            return ShardingPassResult(model, False, state)
        self._read_token_count(model, "--sp")
        self._reduce_after_unflatten(graph)
        pending = {(r.node, r.index): r for r in state.redistributions}
        sharded, region = self._find_region(graph, pending)
        if not region:
            raise PlanError(self._why_no_region(graph))
        self._refuse_partial_coverage(graph, region)
        self._rewrite(graph, region, sharded, pending)
        state.sequence_shards = {name: Shard(axis) for name, axis in {**self._chunks, **sharded}.items()}
        return ShardingPassResult(model, True, state)

    def _read_token_count(self, model: ir.Model, flag: str) -> None:
        """The new-token symbols, and the graph input the token count n is read from (input_ids)."""
        self._symbols = {symbol for symbol, role in dim_roles(model).roles.items() if role == NEW}
        inputs = model.graph.inputs
        length_input = next((v for v in inputs if self._token_axis(v) is not None), None)
        if length_input is None:
            raise PlanError(
                f"{flag} needs a graph input with the new-token dim (input_ids [batch, new]); none of "
                f"{[v.name for v in inputs]} has one: name it with --dim SYMBOL=new, or partition without {flag}"
            )
        self._length_input = length_input

    def _find_region(
        self, graph: ir.Graph, pending: dict[tuple[str, int], Redistribution]
    ) -> tuple[dict[str, int], list[ir.Node]]:
        """The nodes that join, in graph order (`_joins`), and the token axis of each value they split."""
        sharded: dict[str, int] = {}
        region: list[ir.Node] = []
        for node in graph:
            joined = self._joins(node, sharded, pending)
            if joined is not None:
                region.append(node)
                sharded.update(joined)
        return sharded, region

    def _reduce_after_unflatten(self, graph: ir.Graph) -> None:
        """A row-parallel output reduced as [batch * tokens, hidden] for the Reshape back to [batch, tokens,
        hidden] (GPT-2's Gemm exports) is reduced after that Reshape instead: a Reshape is linear, so the
        partial sums reshape alike, and the reduction then has a token axis to scatter along."""
        state = self.state
        nodes = {node.name: node for node in graph}
        moved: list[Redistribution] = []
        kept: list[Redistribution] = []
        for item in state.redistributions:
            node = nodes[item.node]
            output = node.outputs[0]
            movable = (
                node.op_type == "Reshape"
                and node.domain in ("", "ai.onnx")
                and item.index == 0
                and isinstance(item.current, Partial)
                and item.current.op == "sum"
                and isinstance(item.required, Replicate)
                and self._token_axis(node.inputs[0]) is None
                and self._token_axis(output) is not None
                and isinstance(state.placements.get(output.name), Replicate)
                and not output.is_graph_output()
            )
            uses = [(use.node.name, use.idx) for use in output.uses()] if movable else []
            if not movable or any(key in {(r.node, r.index) for r in state.redistributions} for key in uses):
                kept.append(item)
                continue
            state.placements[output.name] = item.current
            moved.extend(Redistribution(name, index, output.name, item.current, REPLICATE) for name, index in uses)
        state.redistributions = kept + moved

    def _refuse_partial_coverage(self, graph: ir.Graph, region: list[ir.Node]) -> None:
        """No silent half measure: a token-axis Partial value that stays all-reduced (its consumer is no
        per-token work) would leave that block's output replicated; refused, naming it."""
        joined = {node.name for node in region}
        nodes = {node.name: node for node in graph}
        for item in self.state.redistributions:
            if item.node in joined or not isinstance(item.current, Partial) or not isinstance(item.required, Replicate):
                continue
            node = nodes[item.node]
            if self._token_axis(node.inputs[item.index]) is None:
                continue
            raise PlanError(
                f"--sp cannot split the tokens of the row-parallel output {item.value!r}: its consumer {node.name} "
                f"({node.op_type}) is not per-token work that a sharding rule keeps split on the tokens, so it would "
                "stay all-reduced; partition without --sp"
            )

    def _why_no_region(self, graph: ir.Graph) -> str:
        """The one-line refusal when no row-parallel output feeds per-token work: names the first reduction."""
        state = self.state
        nodes = {node.name: node for node in graph}
        for item in state.redistributions:
            if not (isinstance(item.current, Partial) and isinstance(item.required, Replicate)):
                continue
            node = nodes[item.node]
            shape = state.shapes.get(item.value)
            if self._token_axis(node.inputs[item.index]) is None:
                why = f"its shape {list(shape or ())} has no axis of the new tokens alone ({sorted(self._symbols)})"
            else:
                why = f"{node.op_type} is not per-token work that a sharding rule keeps split on the tokens"
            return (
                f"--sp cannot split the tokens over {state.tp} ranks in this model: the row-parallel output "
                f"{item.value!r} is reduced for node {node.name} ({node.op_type}), and {why}; partition without --sp"
            )
        return (
            f"--sp --tp {state.tp}: this plan has no row-parallel output to reduce (no AllReduce to split); "
            "partition without --sp"
        )

    def _token_axis(self, value: ir.Value) -> int | None:
        """The one axis of `value` whose dim is the new-token symbol, or None."""
        shape = self.state.shapes.get(value.name)
        if shape is None:
            return None
        axes = [axis for axis, dim in enumerate(shape) if isinstance(dim, str) and dim in self._symbols]
        return axes[0] if len(axes) == 1 else None

    def _joins(
        self, node: ir.Node, sharded: dict[str, int], pending: dict[tuple[str, int], Redistribution]
    ) -> dict[str, int] | None:
        """The token axes of `node`'s outputs when it joins a region (see the module docstring), else None."""
        rule = lookup(node)
        if rule is None or rule.__module__ not in PER_TOKEN_RULE_MODULES:
            return None
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return None
        placements = self.state.placements
        current: list[Placement | None] = []
        reads_stream = False
        for index, value in enumerate(node.inputs):
            if value is None:
                current.append(None)
                continue
            held = placements.get(value.name, REPLICATE)
            redistribution = pending.get((node.name, index))
            if value.name in sharded:
                current.append(Shard(sharded[value.name]))
                reads_stream = True
                continue
            axis = self._token_axis(value)
            partial_to_reduce = (
                isinstance(held, Partial)
                and held.op == "sum"
                and redistribution is not None
                and isinstance(redistribution.required, Replicate)
            )
            if axis is not None and partial_to_reduce:
                current.append(Shard(axis))
                reads_stream = True
            elif axis is not None and isinstance(held, Replicate) and redistribution is None:
                current.append(Shard(axis))  # replicated tokens: each rank cuts its own chunk, no communication
            elif axis is None and isinstance(held, Replicate) and redistribution is None:
                current.append(held)  # a weight or constant without the token axis (per-channel, a scalar)
            else:
                return None
        if not reads_stream:
            return None
        ctx = RuleContext(tp=self.state.tp_units, shapes=self.state.shapes, roles=self.state.roles)
        return self._rule_keeps_split(rule, ctx, node, current)

    def _rule_keeps_split(
        self, rule: Rule, ctx: RuleContext, node: ir.Node, current: list[Placement | None]
    ) -> dict[str, int] | None:
        """The token axes of `node`'s outputs when its `rule`, given the inputs `current` (token-axis inputs
        Shard on that axis), keeps them and splits every used output on its token axis; else None."""
        outputs: dict[str, int] = {}
        expected: list[Placement] = []
        for value in node.outputs:
            axis = self._token_axis(value)
            if axis is None:
                if value.uses() or value.is_graph_output():
                    return None
                expected.append(current[0] or REPLICATE)  # an unused optional output (a norm's mean)
                continue
            outputs[value.name] = axis
            expected.append(Shard(axis))
        decision = rule(ctx, node, current)
        if decision.inputs != current:
            return None
        unused = [not (v.uses() or v.is_graph_output()) for v in node.outputs]
        if any(got != want and not skip for got, want, skip in zip(decision.outputs, expected, unused, strict=True)):
            return None
        return outputs

    def _rewrite(
        self,
        graph: ir.Graph,
        region: list[ir.Node],
        sharded: dict[str, int],
        pending: dict[tuple[str, int], Redistribution],
    ) -> None:
        state = self.state
        in_region = {id(node) for node in region}
        replaced: set[tuple[str, int]] = set()
        exits: list[tuple[ir.Value, int, list[tuple[ir.Node, int]], bool]] = []
        for node in region:
            for value in node.outputs:
                if value.name not in sharded:
                    continue
                outside = [(use.node, use.idx) for use in value.uses() if id(use.node) not in in_region]
                if outside or value.is_graph_output():
                    exits.append((value, sharded[value.name], outside, value.is_graph_output()))
        for node in region:
            for index, value in enumerate(node.inputs):
                if value is None or value.name in sharded:
                    continue
                axis = self._token_axis(value)
                if axis is None:
                    continue
                held = state.placements.get(value.name, REPLICATE)
                if isinstance(held, Partial) and self._scatters_partial_sums:
                    converted = self._reduce_scatter(graph, value, axis)
                    replaced.add((node.name, index))
                else:
                    converted = self._local_chunk(graph, value, axis)
                node.replace_input_with(index, converted)
        state.redistributions = [r for r in state.redistributions if (r.node, r.index) not in replaced]
        renamed: dict[tuple[str, int], str] = {}
        for value, axis, outside, is_output in exits:
            gathered = self._all_gather(graph, value, axis)
            for consumer, index in outside:
                consumer.replace_input_with(index, gathered)
                renamed[(consumer.name, index)] = gathered.name
            if is_output:
                position = next(i for i, out in enumerate(graph.outputs) if out is value)
                name = value.name
                value.name = f"{name}__tokens"
                sharded[value.name] = axis
                state.placements[value.name] = state.placements.get(name)
                state.shapes[value.name] = state.shapes.get(name)
                gathered.name = name
                graph.outputs[position] = gathered
        state.redistributions = [
            dataclasses.replace(r, value=renamed[(r.node, r.index)]) if (r.node, r.index) in renamed else r
            for r in state.redistributions
        ]

    # -- graph building --------------------------------------------------------------------------------

    def _name(self, base: str) -> str:
        self._counter += 1
        return f"llmir/{_NAME_PREFIX[self.mesh_axis]}/{base}_{self._counter}"

    def _record(self, value: ir.Value, like: ir.Value | None, shape: tuple | None = None) -> ir.Value:
        """Placement and (global) shape of a value this pass made."""
        self.state.placements[value.name] = self._placement_of(like)
        self.state.shapes[value.name] = shape if like is None else self.state.shapes.get(like.name)
        if like is not None:
            value.type = like.type
        return value

    def _placement_of(self, like: ir.Value | None) -> Placement:
        """The tp placement of a value made from `like`: sp's conversions hold the residual stream, which
        propagation left Replicate (the ReduceScatter's Partial input is reduced by it)."""
        return REPLICATE

    def _rank_constants(self) -> dict[str, Callable[[int], np.ndarray]]:
        """Where the initializers holding this rank's index along the pass's mesh axis are recorded: the tp
        rank constants (LocalizePass sets them per tp rank)."""
        return self.state.rank_constants

    def _register_rank_constant(self, name: str, array: np.ndarray) -> None:
        """`name` holds this rank's index along the pass's mesh axis."""
        self._rank_constants()[name] = lambda r: (array * 0 + r).astype(np.int64)

    def _initializer(self, name: str, array: np.ndarray, per_rank: bool = False) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(array.shape))
        value.const_value = ir.tensor(array, name=name)
        self._graph.register_initializer(value)
        if per_rank:
            self._register_rank_constant(name, array)
        return self._record(value, None, tuple(array.shape))

    def _int_node(self, op_type: str, inputs: list[ir.Value], **ints: int) -> ir.Value:
        attributes = [ir.AttrInt64(key, val) for key, val in ints.items()]
        node = ir.Node("", op_type, inputs, attributes=attributes, name=self._name(op_type))
        self._append_early(node)
        out = node.outputs[0]
        out.name = node.name + "/out"
        out.type = ir.TensorType(ir.DataType.INT64)
        return self._record(out, None, (1,))

    def _append_early(self, node: ir.Node) -> None:
        """Token-count arithmetic goes at the start of the graph, in order (it reads graph inputs only)."""
        if self._early_anchor is None:
            first = next(iter(self._graph), None)
            if first is None:
                self._graph.append(node)
            else:
                self._graph.insert_before(first, node)
        else:
            self._graph.insert_after(self._early_anchor, node)
        self._early_anchor = node

    def _lengths_of(self) -> dict[str, ir.Value]:
        """n (the new tokens), c = ceil(n / parts) (this rank's chunk), the padding, this rank's first token;
        parts is the size of the pass's mesh axis (tp for sp)."""
        if self._lengths:
            return self._lengths
        parts, axis_name = self._parts, self.mesh_axis
        axis = self._token_axis(self._length_input)
        assert axis is not None
        n = self._int_node("Shape", [self._length_input], start=axis, end=axis + 1)
        minus_one = self._initializer(self._name(f"{axis_name}_minus_one"), np.array([parts - 1], dtype=np.int64))
        parts_value = self._initializer(self._name(axis_name), np.array([parts], dtype=np.int64))
        rank = self._initializer(self._name(f"{axis_name}_rank"), np.array([0], dtype=np.int64), per_rank=True)
        chunk = self._int_node("Div", [self._int_node("Add", [n, minus_one]), parts_value])
        padding = self._int_node("Sub", [self._int_node("Mul", [chunk, parts_value]), n])
        start = self._int_node("Mul", [chunk, rank])
        stop = self._int_node("Add", [start, chunk])
        self._lengths = {"n": n, "chunk": chunk, "padding": padding, "start": start, "stop": stop, "rank": rank}
        return self._lengths

    def _pads_input(self, rank: int, axis: int) -> ir.Value:
        """Pad's `pads` input: zeros, but the end of `axis` gets the padding to a multiple of the parts."""
        key = (rank, axis)
        if key not in self._pad_vectors:
            before = self._initializer(self._name("pads_before"), np.zeros(rank + axis, dtype=np.int64))
            after = self._initializer(self._name("pads_after"), np.zeros(rank - axis - 1, dtype=np.int64))
            padding = self._lengths_of()["padding"]
            node = ir.Node(
                "", "Concat", [before, padding, after], attributes=[ir.AttrInt64("axis", 0)], name=self._name("pads")
            )
            self._append_early(node)
            node.outputs[0].name = node.name + "/out"
            node.outputs[0].type = ir.TensorType(ir.DataType.INT64)
            self._pad_vectors[key] = self._record(node.outputs[0], None, (2 * rank,))
        return self._pad_vectors[key]

    def _after(self, value: ir.Value, nodes: list[ir.Node]) -> None:
        producer = value.producer()
        anchor = producer if producer is not None else self._early_anchor
        for node in nodes:
            if anchor is None:
                self._append_early(node)
            else:
                self._graph.insert_after(anchor, node)
            anchor = node

    def _padded(self, value: ir.Value, axis: int) -> ir.Node:
        shape = self.state.shapes.get(value.name)
        assert shape is not None
        pad = ir.Node("", "Pad", [value, self._pads_input(len(shape), axis)], name=self._name("Pad"))
        pad.outputs[0].name = f"{value.name}__sp_padded"
        self._record(pad.outputs[0], value)
        return pad

    def _reduce_scatter(self, graph: ir.Graph, value: ir.Value, axis: int) -> ir.Value:
        self._graph = graph
        key = (value.name, "reduce_scatter")
        if key not in self._converted:
            pad = self._padded(value, axis)
            scatter = ops.reduce_scatter_node(
                pad.outputs[0], axis, self.state.mesh.group(0, "tp"), name=self._name("ReduceScatter")
            )
            scatter.outputs[0].name = f"{value.name}__reducescatter"
            self._after(value, [pad, scatter])
            self._converted[key] = self._record(scatter.outputs[0], value)
            self._chunks[self._converted[key].name] = axis
        return self._converted[key]

    def _local_chunk(self, graph: ir.Graph, value: ir.Value, axis: int) -> ir.Value:
        self._graph = graph
        key = (value.name, "chunk")
        if key not in self._converted:
            lengths = self._lengths_of()
            pad = self._padded(value, axis)
            axes = self._initializer(self._name("axes"), np.array([axis], dtype=np.int64))
            cut = ir.Node(
                "", "Slice", [pad.outputs[0], lengths["start"], lengths["stop"], axes], name=self._name("Slice")
            )
            cut.outputs[0].name = f"{value.name}__tokenchunk"
            self._after(value, [pad, cut])
            self._converted[key] = self._record(cut.outputs[0], value)
            self._chunks[self._converted[key].name] = axis
        return self._converted[key]

    def _all_gather(self, graph: ir.Graph, value: ir.Value, axis: int) -> ir.Value:
        self._graph = graph
        key = (value.name, "gather")
        if key not in self._converted:
            lengths = self._lengths_of()
            group = self.state.mesh.group(0, self.mesh_axis)
            gather = ops.all_gather_node(value, axis, group, name=self._name("AllGather"))
            gather.outputs[0].name = f"{value.name}__allgather_padded"
            self._record(gather.outputs[0], value)
            zero = self._initializer(self._name("zero"), np.array([0], dtype=np.int64))
            axes = self._initializer(self._name("axes"), np.array([axis], dtype=np.int64))
            cut = ir.Node("", "Slice", [gather.outputs[0], zero, lengths["n"], axes], name=self._name("Slice"))
            cut.outputs[0].name = f"{value.name}__allgather"
            self._after(value, [gather, cut])
            self._converted[key] = self._record(cut.outputs[0], value)
        return self._converted[key]

    _early_anchor: ir.Node | None = None
    _graph: ir.Graph
    _length_input: ir.Value


def declare_token_chunk_shapes(model: ir.Model, state: ShardingState) -> None:
    """Declare the shape of every token-chunk value (after localize, which drops intermediate shapes): the
    token dim as `(new + parts - 1) // parts`, arithmetic of the input dims that the shape planner evaluates
    (parts: tp for sp's chunks, cp for context parallelism's). A pipeline stage's Recv of such a value
    declares it, so the memory plan and cost model can bind it."""
    for shards, parts in ((state.sequence_shards, state.tp), (state.context_shards, state.mesh.cp)):
        if shards:
            _declare_chunk_shapes(model, state, shards, parts)


def _declare_chunk_shapes(model: ir.Model, state: ShardingState, shards: dict[str, Placement], parts: int) -> None:
    for node in model.graph:
        for value in node.outputs:
            placement = shards.get(value.name)
            shape = state.shapes.get(value.name)
            if not isinstance(placement, Shard) or shape is None or any(d is None for d in shape):
                continue
            held = state.placements.get(value.name)
            if isinstance(held, Shard) and not held.holds_everything():
                continue  # split over tp too (a cp chunk of some heads): its local dims are localize's to say
            if value.type is None:
                # A shape is written with its element type; exports without value_info leave it unset.
                dtype = _float_dtype_of(value, 64)
                if dtype is None:
                    continue
                value.type = ir.TensorType(dtype)
            token = shape[placement.dim]
            dims: list[int | ir.SymbolicDim] = [d if isinstance(d, int) else ir.SymbolicDim(str(d)) for d in shape]
            dims[placement.dim] = ir.SymbolicDim(f"({token} + {parts - 1}) // {parts}")
            value.shape = ir.Shape(dims)
    # A tp AllReduce of a chunk (a row-parallel projection's partial sums, cp x tp) holds the same chunk: a
    # pipeline stage that receives it (genai's skip norm opens the next layer) must be able to declare it.
    for node in model.graph:
        if node.domain != ops.LLMIR_DOMAIN or node.op_type != "AllReduce" or not node.inputs or node.inputs[0] is None:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if out.shape is None and source.shape is not None and source.name in shards:
            out.shape = ir.Shape(list(source.shape))
            out.type = out.type or source.type


_NOT_FLOAT_OPS = frozenset(
    {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Shape"}
)


def _float_dtype_of(value: ir.Value, depth: int) -> ir.DataType | None:
    """The element type of a value of the residual stream: declared, a Cast's target, else what the
    per-token op that made it read (adds, norms and activations keep their input's float type)."""
    if value.type is not None:
        return value.dtype
    producer = value.producer()
    if producer is None or depth == 0:
        return None
    if producer.op_type in _NOT_FLOAT_OPS:
        return None
    if producer.op_type == "Cast":
        to = producer.attributes.get("to")
        return None if to is None else ir.DataType(to.as_int())
    if producer.domain not in ("", "ai.onnx", "com.microsoft", ops.LLMIR_DOMAIN) or not producer.inputs:
        return None
    first = producer.inputs[0]
    dtype = None if first is None else _float_dtype_of(first, depth - 1)
    return dtype if dtype is not None and dtype.is_floating_point() else None
