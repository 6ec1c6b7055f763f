"""Localize: make the graph compute on local shards; then slice the weights for each rank.

Rank-independent part (LocalizePass, in place): every head count or hidden size that became local.
* Reshape/Expand whose output is split on axis k: the target's element k must be the local size. A
  constant target is rewritten; a target computed at run time (Shape->Gather->Concat chains) already
  holds the local size when it reads the shape of a split tensor, and holds the global one when it was
  a literal: a `Where(target == global, local, target)` on element k covers both, and leaves -1 and 0.
* Split sizes and Slice bounds on a fused (blocked) axis; head-count attributes of attention ops.
* Graph inputs and outputs get local shapes; intermediate shapes are dropped (onnxruntime re-infers).

Rank-dependent part (`materialize_rank`): a copy of the localized model with its weights sliced.

Uneven tp (the mesh has shares): ranks differ in shapes, so LocalizePass runs once per tp rank, on its own
copy of the graph, with that rank's sizes (`tp_rank`); an even plan localizes once for every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.errors import ShardingError
from llmir_onnx.ir_io import MAX_IR_VERSION
from llmir_onnx.passes.state import (
    LOCALIZED_KEY,
    ShardingPassResult,
    ShardingState,
    pending_output_targets,
    pending_redistributions,
    precondition,
    require_propagated,
)
from llmir_onnx.placement import Partial, Placement, Shard
from llmir_onnx.propagation.base import RuleContext, WeightRole, normalize_dim
from llmir_onnx.propagation.reductions import partial_reduction_scale
from llmir_onnx.propagation.registry import record_for
from llmir_onnx.propagation.shape_ops import (
    block_of_range,
    gathered_block,
    inner_gathered_block,
    slice_axes,
    slice_params,
)
from llmir_onnx.weight_slices import packed_rank_elements, rank_weight


class LocalizePass(ir.passes.InPlacePass):
    """Local head counts and sizes; graph inputs and outputs get tp rank `tp_rank`'s local shapes.

    Needs: `state` from InsertCollectivesPass: a placement per value, and no redistribution or output
    target left unconverted in the graph.
    Provides: the localized graph, marked so in its metadata (`LOCALIZED_KEY`: a second run changes
    nothing and says so); in `result.state` the placements, shapes and rank_constants of values it makes.
    At tp 1 every rank holds the whole graph: nothing is local, the model is left as it is.
    Visits every node, in subgraphs too (their values are replicated, so their sizes stay whole).
    """

    def __init__(self, state: ShardingState, tp_rank: int = 0) -> None:
        super().__init__()
        self.state = state
        # Whose sizes this localization writes: any rank's when the split is even, this one's when uneven.
        self.tp_rank = tp_rank
        self._counter = 0

    def requires(self, model: ir.Model) -> None:
        require_propagated(model, self.state, "localize")
        pending = pending_redistributions(model, self.state)
        if pending:
            raise ir.passes.PreconditionError(
                f"localize needs every redistribution converted, but node {pending[0].node} still reads "
                f"{pending[0].value!r} as {pending[0].current}: run InsertCollectivesPass first"
            )
        targets = pending_output_targets(model, self.state)
        if targets:
            raise ir.passes.PreconditionError(
                f"localize needs graph output {targets[0]!r} converted for the caller: run InsertCollectivesPass first"
            )
        mark = model.metadata_props.get(LOCALIZED_KEY)
        precondition(
            mark is None or mark == self._mark,
            f"the graph is already localized for tp rank/tp {mark}; localize the unlocalized graph for {self._mark}",
        )

    @property
    def _mark(self) -> str:
        return f"{self.tp_rank}/{self.state.tp}"

    def call(self, model: ir.Model) -> ShardingPassResult:
        if self.state.tp == 1 or model.metadata_props.get(LOCALIZED_KEY) == self._mark:
            return ShardingPassResult(model, False, self.state)
        graph = model.graph
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            # Each op's record says which sizes it carries (attributes, size inputs) and how they become local.
            record = record_for(node)
            if record is not None and record.localize is not None:
                assert node.graph is not None
                record.localize(self, node.graph, node)
        io_values = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
        for value in [*graph.inputs, *graph.outputs]:
            value.shape = self._local_shape(value)
        for node in graph:
            for value in node.outputs:
                if value.name not in io_values:
                    value.shape = None
        model.opset_imports[ops.LLMIR_DOMAIN] = ops.LLMIR_OPSET_VERSION
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        model.metadata_props[LOCALIZED_KEY] = self._mark
        return ShardingPassResult(model, True, self.state)

    # -- what the ops' local-size rewrites may ask (registry.Localizer)

    @property
    def tp(self) -> int:
        return self.state.tp

    def role(self, node: ir.Node) -> WeightRole | None:
        return self.state.roles.get(node.name)

    def local_head_count(self, heads: int) -> int:
        tp, units = self.state.tp, self.state.tp_units
        if self.state.mesh.tp_shares:
            # The heads are units, or kv heads each replicated over units // heads of them.
            held = Shard(0, (), (heads,) if heads < units else (), shares=self.state.mesh.tp_shares)
            return held.local_size(heads, tp, self.tp_rank)
        # kv heads fewer than ranks are replicated: each rank keeps one.
        return heads // tp if heads % tp == 0 else 1

    def hold_packed_elements(
        self, value: ir.Value, rows: int, bits: int, ranges: Callable[[int], list[tuple[int, int]]]
    ) -> None:
        tensor = value.const_value
        if tensor is None:
            raise ShardingError(f"{value.name!r} packs elements a tp rank splits mid-byte; it must be an initializer")
        flat = len(tensor.shape) == 1

        def held(tp_rank: int) -> np.ndarray:
            packed = packed_rank_elements(tensor, rows, bits, ranges(tp_rank))
            return packed.reshape(-1) if flat else packed

        # A rank's own tensor, written like the other per-rank constants (small: a few bits per block).
        self.state.rank_constants[value.name] = held

    def localize_gather(self, graph: ir.Graph, node: ir.Node) -> None:
        """The embedding lookup (split by vocabulary) or a Gather of one block of a fused axis."""
        if getattr(self.role(node), "kind", "") == "vocab":
            self._localize_vocab_gather(graph, node)
        else:
            self._localize_block_gather(graph, node)

    def placement(self, value: ir.Value | None) -> Placement | None:
        return None if value is None else self.state.placements.get(value.name)

    def _global_dim(self, value: ir.Value, dim: int) -> int:
        shape = self.state.shapes.get(value.name)
        size = shape[dim] if shape else None
        if not isinstance(size, int):
            raise ShardingError(f"axis {dim} of {value.name!r} has no static size; cannot localize it")
        return size

    def _local_shape(self, value: ir.Value) -> ir.Shape | None:
        shape = self.state.shapes.get(value.name)
        placement = self.placement(value)
        if shape is None:
            return value.shape
        dims: list[int | str | None] = list(shape)
        if value.shape is not None and len(value.shape) == len(dims):
            # The export's own dim names (even expressions like `past_sequence_length + sequence_length`)
            # are what users and runtimes bind; only the split axes change.
            dims = [d if isinstance(d, int) else d.value for d in value.shape]
        for axis, _, local in self._local_axes(value, placement):
            dims[axis] = local
        return ir.Shape(dims)

    def _local_axes(self, value: ir.Value, placement: Placement | None) -> list[tuple[int, int, int]]:
        """(axis, global size, local size) of every axis of `value` that is split."""
        if not isinstance(placement, Shard):
            return []
        axes = [(placement.dim, self._global_dim(value, placement.dim))]
        axes_local = [(placement.dim, axes[0][1], placement.local_size(axes[0][1], self.state.tp, self.tp_rank))]
        if placement.inner_blocks and not placement.inner_flat:
            size = self._global_dim(value, placement.dim + 1)
            axes_local.append((placement.dim + 1, size, placement.inner_local_size()))
        elif placement.inner and not placement.inner_flat:
            size = self._global_dim(value, placement.dim + 1)
            axes_local.append((placement.dim + 1, size, placement.inner_repeat_size(size, self.tp_rank)))
        return axes_local

    def _new_initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        self._counter += 1
        name = f"{base}__local_{self._counter}"
        value = ir.Value(
            name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))
        )
        value.const_value = ir.tensor(array, name=name)
        graph.register_initializer(value)
        return value

    def localize_target(self, graph: ir.Graph, node: ir.Node) -> None:
        out = node.outputs[0]
        split_axes = self._local_axes(out, self.placement(out))
        target = node.inputs[1]
        if not split_axes or target is None:
            return
        if target.const_value is not None:
            values = target.const_value.numpy().astype(np.int64).reshape(-1).copy()
            for k, size, local in split_axes:
                if values[k] == size:
                    values[k] = local
                elif values[k] not in (-1, 0, 1, local):
                    raise ShardingError(
                        f"node {node.name} ({node.op_type}) gives axis {k} the size {values[k]}, expected {size}; "
                        "cannot localize its target shape"
                    )
            node.replace_input_with(1, self._new_initializer(graph, target.name, values))
            return
        # At run time element k is either the global size (a literal), the local size (read from the
        # shape of a split tensor), or in between: repeat_kv's `kv_heads_local * n_rep` when kv heads are
        # replicated. Every value but the local one is rewritten; -1 and 0 are left alone.
        rank = len(self.state.shapes.get(out.name) or ())
        tp = self.state.tp
        current = target
        placement = self.placement(out)
        units = self.state.tp_units
        for k, size, local in split_axes:
            if isinstance(placement, Shard) and placement.shares:
                # Any whole number of units is a size some rank (or repeat_kv) may have computed.
                candidates = sorted({size * n // units for n in range(1, units + 1) if size * n % units == 0} - {local})
            else:
                candidates = sorted({size // d for d in range(1, tp + 1) if tp % d == 0 and size % d == 0} - {local})
            if isinstance(placement, Shard) and placement.inner_blocks and k == placement.dim + 1:
                candidates = [size]  # a literal of the whole group's heads; only it needs the local count
            for candidate in candidates:
                marker = np.full(rank, -2, dtype=np.int64)
                marker[k] = candidate
                replacement = np.zeros(rank, dtype=np.int64)
                replacement[k] = local
                marker_value = self._new_initializer(graph, f"{node.name}/size_{candidate}", marker)
                local_value = self._new_initializer(graph, f"{node.name}/local_size", replacement)
                equal = ir.Node("", "Equal", [current, marker_value], name=f"{node.name}/llmir_is_{k}_{candidate}")
                where = ir.Node(
                    "",
                    "Where",
                    [equal.outputs[0], local_value, current],
                    name=f"{node.name}/llmir_local_{k}_{candidate}",
                )
                graph.insert_before(node, [equal, where])
                current = where.outputs[0]
        node.replace_input_with(1, current)

    def localize_split(self, graph: ir.Graph, node: ir.Node) -> None:
        placement = self.placement(node.inputs[0])
        if not isinstance(placement, Shard) or not placement.blocks:
            return
        rank = len(self.state.shapes.get(node.inputs[0].name) or ())
        axis_attr = node.attributes.get("axis")
        axis = normalize_dim(axis_attr.as_int() if axis_attr else 0, rank)
        if axis != placement.dim:
            return
        size = self._global_dim(node.inputs[0], placement.dim)
        local = np.array(placement.local_widths(size, self.state.tp, self.tp_rank), dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            node.replace_input_with(1, self._new_initializer(graph, f"{node.name}/split", local))
        elif "split" in node.attributes:
            node.attributes["split"] = ir.AttrInt64s("split", [int(x) for x in local])

    def localize_slice(self, graph: ir.Graph, node: ir.Node) -> None:
        placement = self.placement(node.inputs[0])
        if isinstance(placement, Shard) and placement.inner_blocks:
            self._localize_inner_block_slice(graph, node, placement)
            return
        if not isinstance(placement, Shard) or not placement.blocks:
            return
        rank = len(self.state.shapes.get(node.inputs[0].name) or ())
        axes_value = node.inputs[3] if len(node.inputs) > 3 else None
        if node.inputs[1].const_value is None or node.inputs[2].const_value is None:
            return  # bounds read from the local shape at run time (propagate checked they are equal blocks)
        starts = node.inputs[1].const_value.numpy().astype(np.int64).reshape(-1)
        ends = node.inputs[2].const_value.numpy().astype(np.int64).reshape(-1)
        axes = (
            axes_value.const_value.numpy().reshape(-1).tolist() if axes_value is not None else list(range(len(starts)))
        )
        axes = [normalize_dim(int(a), rank) for a in axes]
        if placement.dim not in axes:
            return
        k = axes.index(placement.dim)
        size = self._global_dim(node.inputs[0], placement.dim)
        tp = self.state.tp
        new_starts, new_ends = starts.copy(), ends.copy()
        start = starts[k] + size if starts[k] < 0 else starts[k]
        end = min(ends[k] + size if ends[k] < 0 else ends[k], size)
        # Local offsets of the selected block: the local widths of the blocks before it.
        widths = placement.local_widths(size, tp, self.tp_rank)
        offset = local_offset = 0
        for index, block in enumerate(placement.blocks):
            if offset == start:
                break
            offset += block
            local_offset += widths[index]
        new_starts[k] = local_offset
        if placement.shares:
            new_ends[k] = local_offset + widths[index]
        else:
            new_ends[k] = local_offset + (end - start) // placement.block_parts(index, tp)
        node.replace_input_with(1, self._new_initializer(graph, f"{node.name}/starts", new_starts))
        node.replace_input_with(2, self._new_initializer(graph, f"{node.name}/ends", new_ends))

    def _inner_block_range(self, node: ir.Node, placement: Shard, block: int | None) -> tuple[int, int]:
        """[start, stop) of inner block `block` on a rank's axis dim + 1."""
        if block is None:
            raise ShardingError(f"node {node.name} ({node.op_type}) takes no whole inner block of {placement}")
        start = placement.inner_local_offset(block)
        return start, start + placement.inner_blocks[block] // placement.inner_parts[block]

    def _localize_inner_block_slice(self, graph: ir.Graph, node: ir.Node, placement: Shard) -> None:
        """A Slice of one inner block (the query heads of a kv group) reads that block's local heads."""
        rank = len(self.state.shapes.get(node.inputs[0].name) or ())
        ctx = RuleContext(tp=self.state.tp, shapes=self.state.shapes)
        axes = slice_axes(ctx, node, rank)
        params = slice_params(ctx, node)
        if axes is None or placement.inner_flat or placement.dim + 1 not in axes:
            return  # propagate kept the shard only where the Slice cuts neither split axis
        if params is None:
            raise ShardingError(f"node {node.name} (Slice) has bounds computed at run time; cannot localize it")
        starts, ends, _, steps = params
        k = axes.index(placement.dim + 1)
        size = self._global_dim(node.inputs[0], placement.dim + 1)
        block = block_of_range(placement.inner_blocks, size, starts[k], ends[k], steps[k])
        start, stop = self._inner_block_range(node, placement, block)
        new_starts, new_ends = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        new_starts[k], new_ends[k] = start, stop
        node.replace_input_with(1, self._new_initializer(graph, f"{node.name}/starts", new_starts))
        node.replace_input_with(2, self._new_initializer(graph, f"{node.name}/ends", new_ends))

    def _localize_block_gather(self, graph: ir.Graph, node: ir.Node) -> None:
        """A Gather that takes one whole block of a fused axis (a kv head) reads it at its local offset."""
        placement, indices = self.placement(node.inputs[0]), node.inputs[1]
        if isinstance(placement, Shard) and placement.inner_blocks and indices is not None:
            self._localize_inner_block_gather(graph, node, placement, indices)
            return
        if not isinstance(placement, Shard) or not placement.blocks or indices is None:
            return
        rank = len(self.state.shapes.get(node.inputs[0].name) or ())
        axis_attr = node.attributes.get("axis")
        if normalize_dim(axis_attr.as_int() if axis_attr else 0, rank) != placement.dim:
            return
        ctx = RuleContext(tp=self.state.tp, shapes=self.state.shapes)
        block = gathered_block(ctx, node, placement)
        if block is None or indices.const_value is None:
            raise ShardingError(f"node {node.name} (Gather) takes no whole block of {placement}; cannot localize it")
        widths = placement.local_widths(self._global_dim(node.inputs[0], placement.dim), self.state.tp, self.tp_rank)
        start, width = sum(widths[:block]), widths[block]
        original = indices.const_value.numpy()
        local = np.arange(start, start + width, dtype=original.dtype).reshape(original.shape if width == 1 else -1)
        node.replace_input_with(1, self._new_initializer(graph, f"{node.name}/indices", local))

    def _localize_inner_block_gather(self, graph: ir.Graph, node: ir.Node, placement: Shard, indices: ir.Value) -> None:
        rank = len(self.state.shapes.get(node.inputs[0].name) or ())
        axis_attr = node.attributes.get("axis")
        axis = normalize_dim(axis_attr.as_int() if axis_attr else 0, rank)
        if placement.inner_flat or axis != placement.dim + 1:
            return  # propagate kept the shard only where the Gather reads neither split axis
        ctx = RuleContext(tp=self.state.tp, shapes=self.state.shapes)
        start, stop = self._inner_block_range(node, placement, inner_gathered_block(ctx, node, placement))
        original = indices.const_value.numpy()
        local = np.arange(start, stop, dtype=original.dtype).reshape(original.shape if stop - start == 1 else -1)
        node.replace_input_with(1, self._new_initializer(graph, f"{node.name}/indices", local))

    def _localize_vocab_gather(self, graph: ir.Graph, node: ir.Node) -> None:
        """Embedding lookup in this rank's vocabulary rows; ids outside them give zeros (summed later)."""
        table, ids = node.inputs[0], node.inputs[1]
        if table is None or ids is None or not isinstance(self.placement(table), Shard):
            return
        vocab, tp = self._global_dim(table, 0), self.state.tp
        rows = self.placement(table)
        assert isinstance(rows, Shard)
        local = rows.local_size(vocab, tp, self.tp_rank)
        dtype = (ids.dtype or ir.DataType.INT64).numpy()
        name = node.name

        def first_row(r: int) -> np.ndarray:
            return np.array(rows.local_ranges(vocab, tp, r)[0][0], dtype=dtype)

        start = self._rank_initializer(graph, f"{name}/vocab_start", first_row)
        size = self._new_initializer(graph, f"{name}/vocab_size", np.array(local, dtype=dtype))
        zero = self._new_initializer(graph, f"{name}/zero", np.array(0, dtype=dtype))
        minus_one = self._new_initializer(graph, f"{name}/last_axis", np.array([-1], dtype=np.int64))
        shifted = ir.Node("", "Sub", [ids, start], name=f"{name}/llmir_local_ids")
        above = ir.Node("", "GreaterOrEqual", [shifted.outputs[0], zero], name=f"{name}/llmir_above")
        below = ir.Node("", "Less", [shifted.outputs[0], size], name=f"{name}/llmir_below")
        mine = ir.Node("", "And", [above.outputs[0], below.outputs[0]], name=f"{name}/llmir_mine")
        safe = ir.Node("", "Where", [mine.outputs[0], shifted.outputs[0], zero], name=f"{name}/llmir_safe_ids")
        graph.insert_before(node, [shifted, above, below, mine, safe])
        node.replace_input_with(1, safe.outputs[0])
        out = node.outputs[0]
        table_type = table.dtype or ir.DataType.FLOAT
        mask = ir.Node("", "Unsqueeze", [mine.outputs[0], minus_one], name=f"{name}/llmir_mask")
        mask_float = ir.Node(
            "",
            "Cast",
            [mask.outputs[0]],
            attributes=[ir.AttrInt64("to", table_type.value)],
            name=f"{name}/llmir_mask_cast",
        )
        masked = ir.Node("", "Mul", [out, mask_float.outputs[0]], name=f"{name}/llmir_masked")
        # Rewire every reader of the lookup to the masked value, then let the Mul read the raw lookup.
        out.replace_all_uses_with(masked.outputs[0])
        masked.replace_input_with(0, out)
        graph.insert_after(node, [mask, mask_float, masked])
        placement = self.placement(out)
        if placement is not None and masked.outputs[0].name:
            self.state.placements[masked.outputs[0].name] = placement

    def scale_partial_reduction(self, graph: ir.Graph, node: ir.Node) -> None:
        placement, out = self.placement(node.inputs[0]), node.outputs[0]
        if not isinstance(placement, Shard) or not isinstance(self.placement(out), Partial):
            return
        scale = partial_reduction_scale(node.op_type, placement, self.state.tp)
        if placement.shares:
            scale = self._uneven_partial_scale(node, placement)
        if scale == 1.0:
            return
        name = node.name
        factor = self._new_initializer(graph, f"{name}/partial_scale", np.array(scale, dtype=np.float32))
        typed = ir.Node("", "CastLike", [factor, node.inputs[0]], name=f"{name}/llmir_partial_scale_cast")
        scaled = ir.Node("", "Mul", [out, typed.outputs[0]], name=f"{name}/llmir_partial_scale")
        out.replace_all_uses_with(scaled.outputs[0], replace_graph_outputs=True)
        scaled.replace_input_with(0, out)
        graph.insert_after(node, [typed, scaled])
        # The scaled value takes the name its readers (and a graph output) know.
        placement, original = self.placement(out), out.name
        out.name = f"{original}__unscaled"
        scaled.outputs[0].name = original
        self.state.placements[out.name] = placement
        self.state.shapes[out.name] = self.state.shapes.get(original)

    def _uneven_partial_scale(self, node: ir.Node, placement: Shard) -> float:
        """A rank's mean over its piece weighs its share of the axis; a sum needs nothing (no part repeats)."""
        if placement.parts or placement.blocks:
            raise ShardingError(
                f"node {node.name} ({node.op_type}) reduces {placement}, whose parts repeat over uneven shares; "
                "use a tp that divides the heads"
            )
        if node.op_type != "ReduceMean":
            return 1.0
        size = self._global_dim(node.inputs[0], placement.dim)
        return placement.local_size(size, self.state.tp, self.tp_rank) / size

    def _rank_initializer(self, graph: ir.Graph, base: str, per_rank: Callable[[int], np.ndarray]) -> ir.Value:
        value = self._new_initializer(graph, base, per_rank(0))
        self.state.rank_constants[value.name] = per_rank
        return value


def rank_tensor(state: ShardingState, name: str, tensor: ir.TensorProtocol, tp_rank: int) -> ir.TensorProtocol:
    """What tp rank `tp_rank` holds of initializer `name`, whose value in the template is `tensor`.

    Lazy over external data: the bytes are read (a slice at a time) only when the rank is saved.
    """
    if name in state.rank_constants:
        return ir.tensor(state.rank_constants[name](tp_rank), name=name)
    placement = state.weight_placements.get(name, state.placements.get(name))
    if state.tp == 1 or placement is None or not isinstance(placement, Shard | Partial):
        return tensor
    return rank_weight(tensor, placement, state.tp, tp_rank, state.weight_views.get(name), name)


def materialize_rank(template: ir.Model, state: ShardingState, tp_rank: int, consume: bool = False) -> ir.Model:
    """A copy of the localized model holding the weights of one tp rank (`consume`: the template itself,
    for the last rank, when the template is not used after)."""
    model = template if consume else template.clone()
    model.metadata_props.pop(LOCALIZED_KEY, None)  # a rank model is what it is: no trace of the passes
    for name, value in model.graph.initializers.items():
        if value.const_value is None:
            continue
        tensor = rank_tensor(state, name, value.const_value, tp_rank)
        if tensor is not value.const_value:
            value.const_value = tensor
            value.shape = ir.Shape(list(tensor.shape.numpy()))  # a weight's shape is static
    return model
