"""Insert collectives: turn every redistribution into ai.llmir ops (or a local slice).

Partial->Replicate is AllReduce, Shard->Replicate is AllGather (with `sizes`, each tp rank's length,
for an uneven shard), Partial->Shard is ReduceScatter, Replicate->Shard is a local Slice (every rank
already holds the full tensor), Shard->Shard is a gather then a slice. Outputs of the graph that end
Partial are reduced before they leave.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.errors import ShardingError
from llmir_onnx.passes.state import (
    ShardingPassResult,
    ShardingState,
    pending_output_targets,
    pending_redistributions,
    require_propagated,
)
from llmir_onnx.placement import REPLICATE, Partial, Placement, Replicate, Shard


class InsertCollectivesPass(ir.passes.InPlacePass):
    """A collective (or local slice) for every redistribution its consumer still reads unconverted.

    Needs: `state` from PropagatePass (a placement per value, the redistributions and output targets).
    Provides in `result.state`: placements, shapes and rank_constants of the values it makes.
    Modifies the model where a redistribution or an output target is pending; none at tp 1, none when
    every one is converted already (a second run). Consumers are looked up in subgraphs too, though
    propagation leaves none there: subgraphs run whole on every rank and read only replicated outer values.
    """

    def __init__(self, state: ShardingState) -> None:
        super().__init__()
        self.state = state
        self._cache: dict[tuple[str, Placement], ir.Value] = {}
        self._counter = 0

    def requires(self, model: ir.Model) -> None:
        require_propagated(model, self.state, "insert_collectives")

    @property
    def group(self) -> tuple[int, ...]:
        return self.state.mesh.group(0, "tp")

    def call(self, model: ir.Model) -> ShardingPassResult:
        graph = model.graph
        pending = pending_redistributions(model, self.state, with_whole=True)
        targets = set(pending_output_targets(model, self.state))
        if not pending and not targets:
            return ShardingPassResult(model, False, self.state)
        modified = bool(targets)
        nodes = {node.name: node for node in ir.traversal.RecursiveGraphIterator(graph)}
        values = {v.name: v for node in graph for v in node.outputs} | {v.name: v for v in graph.inputs}
        for item in pending:
            consumer = nodes[item.node]
            source = values[item.value]
            converted = self._convert(graph, source, item.current, item.required, consumer)
            modified |= converted is not source
            consumer.replace_input_with(item.index, converted)
        for index, output in enumerate(list(graph.outputs)):
            if output.name not in targets:
                continue
            target = self.state.output_targets[output.name]
            held = self.state.placements[output.name]
            name = output.name
            output.name = f"{name}__{held}"
            self.state.placements[output.name] = held
            self.state.shapes[output.name] = self.state.shapes.get(name)
            converted = self._convert(graph, output, held, target, None)
            converted.name = name
            self.state.placements[name] = target
            graph.outputs[index] = converted
        return ShardingPassResult(model, modified, self.state)

    def ensures(self, model: ir.Model) -> None:
        left = pending_redistributions(model, self.state)
        if left:
            raise ir.passes.PostconditionError(f"redistribution of {left[0].value!r} before {left[0].node} left")

    def _name(self, base: str) -> str:
        self._counter += 1
        return f"llmir/{base}_{self._counter}"

    def _insert(self, graph: ir.Graph, node: ir.Node, anchor: ir.Value) -> ir.Value:
        producer = anchor.producer()
        if producer is None:
            graph.insert_before(next(iter(graph)), node) if len(graph) else graph.append(node)
        else:
            graph.insert_after(producer, node)
        return node.outputs[0]

    def _convert(
        self, graph: ir.Graph, value: ir.Value, held: Placement, required: Placement, consumer: ir.Node | None
    ) -> ir.Value:
        key = (value.name, required)
        if key in self._cache:
            return self._cache[key]
        result = self._convert_uncached(graph, value, held, required)
        result.type = value.type
        self.state.placements[result.name] = required
        self.state.shapes[result.name] = self.state.shapes.get(value.name)
        self._cache[key] = result
        return result

    def _convert_uncached(self, graph: ir.Graph, value: ir.Value, held: Placement, required: Placement) -> ir.Value:
        where = f"value {value.name!r}"
        if isinstance(held, Partial) and isinstance(required, Replicate):
            node = ops.all_reduce_node(value, self.group, reduction=held.op, name=self._name("AllReduce"))
            return self._named(self._insert(graph, node, value), value, "allreduce")
        if isinstance(held, Shard) and isinstance(required, Replicate):
            if held.holds_everything():
                return value
            if held.blocks or held.inner:
                raise ShardingError(f"cannot gather the shard {held} of {where}; no rule keeps it sharded")
            if held.shares:
                return self._gather_uneven(graph, value, held)
            node = ops.all_gather_node(value, held.dim, self.group, name=self._name("AllGather"))
            # Shapes are still global here: the gathered value is `value`'s shape, not its shape x tp.
            node.outputs[0].shape = None if value.shape is None else ir.Shape(list(value.shape))
            gathered = self._named(self._insert(graph, node, value), value, "allgather")
            return self._distinct_parts(graph, gathered, held, value) if held.parts else gathered
        if isinstance(held, Partial) and isinstance(required, Shard):
            # Uneven parts: reduce everything, then each rank slices its own (no ReduceScatter of unequal parts).
            if not required.blocks and not required.shares and held.op == "sum":
                node = ops.reduce_scatter_node(value, required.dim, self.group, name=self._name("ReduceScatter"))
                return self._named(self._insert(graph, node, value), value, "reducescatter")
            reduced = self._convert(graph, value, held, REPLICATE, None)
            return self._local_slice(graph, reduced, required)
        if isinstance(held, Replicate) and isinstance(required, Shard):
            return self._local_slice(graph, value, required)
        if isinstance(held, Shard) and isinstance(required, Shard):
            gathered = self._convert(graph, value, held, REPLICATE, None)
            return self._local_slice(graph, gathered, required)
        if isinstance(required, Partial):
            full = value if isinstance(held, Replicate) else self._convert(graph, value, held, REPLICATE, None)
            return self._rank_zero_only(graph, full)
        raise ShardingError(f"internal: no redistribution from {held} to {required} for {where}")

    def _gather_uneven(self, graph: ir.Graph, value: ir.Value, held: Shard) -> ir.Value:
        """An AllGather of unequal parts (`sizes`: each tp rank's local length), then, where ranks hold a part
        alike (a kv head on several ranks), a Gather keeping the first copy of each global index."""
        shape = self.state.shapes.get(value.name)
        size = shape[held.dim] if shape else None
        if not isinstance(size, int):
            raise ShardingError(
                f"cannot gather the uneven shard {held} of value {value.name!r}: axis {held.dim} has no static size"
            )
        tp = self.state.tp
        ranges = [held.local_ranges(size, tp, rank) for rank in range(tp)]
        node = ops.all_gather_node(
            value, held.dim, self.group, name=self._name("AllGather"), sizes=[sum(b - a for a, b in r) for r in ranges]
        )
        # Shapes are still global here: the gathered value is `value`'s shape (or longer, with repeated parts).
        node.outputs[0].shape = None
        gathered = self._named(self._insert(graph, node, value), value, "allgather")
        held_indices = np.concatenate([np.arange(a, b) for rank_ranges in ranges for a, b in rank_ranges])
        if np.array_equal(held_indices, np.arange(size)):
            return gathered
        first = {int(index): position for position, index in reversed(list(enumerate(held_indices)))}
        if sorted(first) != list(range(size)):
            raise ShardingError(
                f"internal: the tp ranks' parts of {held} do not cover axis {held.dim} of {value.name!r}"
            )
        indices = np.array([first[index] for index in range(size)], dtype=np.int64)
        index_value = self._constant(graph, self._name("distinct_parts"), lambda r: indices)
        axis = [ir.AttrInt64("axis", held.dim)]
        gather = ir.Node("", "Gather", [gathered, index_value], attributes=axis, name=self._name("Gather"))
        return self._named(self._insert(graph, gather, gathered), gathered, "distinct")

    def _distinct_parts(self, graph: ir.Graph, gathered: ir.Value, held: Shard, source: ir.Value) -> ir.Value:
        """Keep one copy of each part from an AllGather of a shard that neighbouring ranks hold alike."""
        shape = self.state.shapes.get(source.name)
        size = shape[held.dim] if shape else None
        if not isinstance(size, int):
            raise ShardingError(f"cannot gather {gathered.name!r}: axis {held.dim} has no static size")
        tp = self.state.tp
        parts = held.block_parts(0, tp)
        width = size // parts
        indices = np.concatenate([np.arange(width) + k * (tp // parts) * width for k in range(parts)])
        index_value = self._constant(graph, self._name("distinct_parts"), lambda r: indices.astype(np.int64))
        node = ir.Node(
            "",
            "Gather",
            [gathered, index_value],
            attributes=[ir.AttrInt64("axis", held.dim)],
            name=self._name("Gather"),
        )
        return self._named(self._insert(graph, node, gathered), gathered, "distinct")

    def _named(self, result: ir.Value, source: ir.Value, what: str) -> ir.Value:
        result.name = f"{source.name}__{what}"
        return result

    def _constant(self, graph: ir.Graph, name: str, per_rank: Callable[[int], np.ndarray]) -> ir.Value:
        """An initializer whose value depends on the tp rank (materialize_rank writes it per rank)."""
        sample = per_rank(0)
        value = ir.Value(
            name=name, type=ir.TensorType(ir.DataType.from_numpy(sample.dtype)), shape=ir.Shape(sample.shape)
        )
        value.const_value = ir.tensor(sample, name=name)
        graph.register_initializer(value)
        self.state.rank_constants[name] = per_rank
        self.state.placements[name] = REPLICATE
        self.state.shapes[name] = tuple(sample.shape)
        return value

    def _local_slice(self, graph: ir.Graph, value: ir.Value, shard: Shard) -> ir.Value:
        shape = self.state.shapes.get(value.name)
        size = shape[shard.dim] if shape else None
        if not isinstance(size, int):
            raise ShardingError(f"cannot slice {value.name!r} locally: axis {shard.dim} has no static size")
        tp = self.state.tp
        pieces = []
        anchor_name = self._name("Slice")
        for block_index in range(len(shard.blocks or (size,))):

            def starts(r: int, b: int = block_index) -> np.ndarray:
                return np.array([shard.local_ranges(size, tp, r)[b][0]], dtype=np.int64)

            def ends(r: int, b: int = block_index) -> np.ndarray:
                return np.array([shard.local_ranges(size, tp, r)[b][1]], dtype=np.int64)

            start_value = self._constant(graph, f"{anchor_name}/starts_{block_index}", starts)
            end_value = self._constant(graph, f"{anchor_name}/ends_{block_index}", ends)
            axes_value = self._constant(
                graph, f"{anchor_name}/axes_{block_index}", lambda r: np.array([shard.dim], dtype=np.int64)
            )
            node = ir.Node(
                "", "Slice", [value, start_value, end_value, axes_value], name=f"{anchor_name}/block_{block_index}"
            )
            if shard.blocks:
                pieces.append(self._insert(graph, node, value))
            else:
                last = self._unless_broadcast(graph, value, shard.dim, node, anchor_name)
                graph.insert_after(last, node)
                pieces.append(node.outputs[0])
        if len(pieces) == 1:
            return self._named(pieces[0], value, f"slice{shard.dim}")
        concat = ir.Node(
            "", "Concat", pieces, attributes=[ir.AttrInt64("axis", shard.dim)], name=f"{anchor_name}/concat"
        )
        graph.insert_after(pieces[-1].producer(), concat)
        return self._named(concat.outputs[0], value, f"slice{shard.dim}")

    def _unless_broadcast(self, graph: ir.Graph, value: ir.Value, dim: int, slice_node: ir.Node, base: str) -> ir.Node:
        """Slice bounds that keep the whole axis when it has size 1 at run time.

        Static shapes cannot always tell a broadcast axis (an attention mask's [batch, 1, q, k]) from a
        full one, and a shard of a broadcast axis is the axis itself; deciding at run time is exact.
        """
        shape = ir.Node(
            "",
            "Shape",
            [value],
            attributes=[ir.AttrInt64("start", dim), ir.AttrInt64("end", dim + 1)],
            name=f"{base}/axis_size",
        )
        one = self._constant(graph, f"{base}/one", lambda r: np.array([1], dtype=np.int64))
        zero = self._constant(graph, f"{base}/zero", lambda r: np.array([0], dtype=np.int64))
        start, end = slice_node.inputs[1], slice_node.inputs[2]
        assert start is not None and end is not None
        full_end = self._constant(graph, f"{base}/full_end", lambda r: np.array([2**62], dtype=np.int64))
        is_split = ir.Node("", "Greater", [shape.outputs[0], one], name=f"{base}/is_split")
        new_start = ir.Node("", "Where", [is_split.outputs[0], start, zero], name=f"{base}/start")
        new_end = ir.Node("", "Where", [is_split.outputs[0], end, full_end], name=f"{base}/end")
        self._insert(graph, shape, value)
        previous = shape
        for node in (is_split, new_start, new_end):
            graph.insert_after(previous, node)
            previous = node
        slice_node.replace_input_with(1, new_start.outputs[0])
        slice_node.replace_input_with(2, new_end.outputs[0])
        return new_end

    def _rank_zero_only(self, graph: ir.Graph, value: ir.Value) -> ir.Value:
        dtype = value.dtype or ir.DataType.FLOAT
        numpy_dtype = dtype.numpy()
        mask = self._constant(
            graph, self._name("rank0_mask"), lambda r: np.array(1 if r == 0 else 0, dtype=numpy_dtype)
        )
        node = ir.Node("", "Mul", [value, mask], name=self._name("RankZeroOnly"))
        return self._named(self._insert(graph, node, value), value, "rank0")
