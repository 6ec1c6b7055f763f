"""Annotate: prepare the graph and seed the Megatron layout on the weights.

* every node gets a unique name (errors name nodes), constants become initializers and weight
  aliases (torch's `Identity(initializer)`) are folded, so "is this a weight" is one question;
* global shapes of every value come from onnxruntime's symbolic shape inference (it understands the
  contrib ops and computes reshape targets from Shape chains), falling back to onnx's, whose open dims
  (head counts of computed reshape targets) the planner's own evaluation of the model then settles;
* weight matmuls get a role. In topological order, a weight matmul whose output reaches other weight
  matmuls (without passing through one) opens a block: column-parallel. The matmuls it reaches close
  the block: row-parallel. A weight matmul that reaches none (the lm_head) stays replicated. No
  architecture names are involved: q/k/v/gate/up open, o_proj/down close, whatever they are called.
* a column-parallel weight whose output is split into q|k|v (Split, Slices, packed GroupQueryAttention)
  gets those block widths, so each rank takes the same heads from each block.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import tempfile

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, NameFixPass, TopologicalSortPass

from llmir_onnx.errors import PlanError, ShardingError
from llmir_onnx.mesh import DeviceMesh, grouped_shares
from llmir_onnx.model_facts import TOKEN_IDS, input_kind
from llmir_onnx.passes.state import ShardingPassResult, ShardingState, control_flow_owners
from llmir_onnx.placement import Shard
from llmir_onnx.plan.shapes import types_in_input_terms
from llmir_onnx.propagation.attention import gqa_packed_blocks
from llmir_onnx.propagation.base import RuleContext, Shape, WeightRole, normalize_dim
from llmir_onnx.propagation.elementwise import ELEMENTWISE_OPS
from llmir_onnx.propagation.shape_ops import block_of_slice, slice_axes, slice_params

logger = logging.getLogger(__name__)

WEIGHT_MATMULS = ("MatMul", "Gemm")
# Values that only carry shapes: data does not flow from their input into their output.
SHAPE_READERS = ("Shape", "Size")
# Ops between a projection and the split of its fused output that keep the last axis.
PASS_THROUGH = ("Add", "Identity", "Cast", "Reshape")
INLINE_LIMIT_ELEMENTS = 64
# Ops between a projection and the Reshape that splits its heads, searched for the head count.
HEAD_SEARCH_DEPTH = 10


def _fold_weight_aliases(graph: ir.Graph) -> int:
    """Readers of `Identity(initializer)` read the initializer (in subgraphs too, which see outer values)."""
    folded = 0
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):
        if node.op_type == "Identity" and node.domain == "" and node.inputs[0] is not None:
            source = node.inputs[0]
            if source.is_initializer() and not node.outputs[0].is_graph_output():
                node.outputs[0].replace_all_uses_with(source)
                assert node.graph is not None
                node.graph.remove(node, safe=True)
                folded += 1
    return folded


def _unique_node_names(graph: ir.Graph) -> int:
    """Node names unique across subgraphs too (NameFixPass makes them unique per graph; errors and
    redistributions name nodes of any graph). Returns how many were renamed."""
    used: set[str] = set()
    renamed = 0
    for node in ir.traversal.RecursiveGraphIterator(graph):
        name = node.name or node.op_type
        if name in used:
            suffix = 1
            while f"{name}_{suffix}" in used:
                suffix += 1
            node.name, renamed = f"{name}_{suffix}", renamed + 1
        used.add(node.name or name)
    return renamed


def _dim_value(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


def _shapes_of(inferred: onnx.ModelProto) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(_dim_value(d) for d in tensor_type.shape.dim)
    return shapes


def global_shapes(model: ir.Model) -> dict[str, Shape]:
    """Shapes of every value of the unsharded model, symbolic where the model is dynamic."""
    proto = ir.serde.serialize_model(model)
    kept = []
    for init in proto.graph.initializer:
        elements = 1
        for d in init.dims:
            elements *= d
        if init.data_location == onnx.TensorProto.EXTERNAL or elements > INLINE_LIMIT_ELEMENTS:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    symbolic: dict[str, Shape] = {}
    symbolic_failed = False
    try:
        # onnxruntime is an optional extra: without it, the except below leaves onnx's inference to answer.
        from onnxruntime.tools import symbolic_shape_infer

        # Its warnings ("Unable to determine if ... treat as equal") are about symbols we do not use.
        noisy = logging.getLogger(symbolic_shape_infer.__name__)
        level = noisy.level
        noisy.setLevel(logging.ERROR)
        try:
            # When it cannot infer everything it saves "sym_shape_infer_temp.onnx" into the working
            # directory; keep the user's folder clean by running it inside a temporary one.
            with tempfile.TemporaryDirectory(prefix="llmir-shapes-") as scratch, contextlib.chdir(scratch):
                inferred = symbolic_shape_infer.SymbolicShapeInference.infer_shapes(
                    proto, auto_merge=True, guess_output_rank=False
                )
        finally:
            noisy.setLevel(level)
        symbolic = _shapes_of(inferred)
    except Exception as error:  # its failures are many and not ours; onnx's inference still answers
        logger.info("symbolic shape inference failed (%r); using onnx shape inference only", error)
        symbolic_failed = True
    # onnx's inference never guesses: where it knows a size it is right. onnxruntime's symbolic inference
    # computes reshape targets from Shape chains (head counts) but, merging unknown broadcast dims, can
    # claim a size-1 mask axis has the size of the head axis. Take onnx's integers first.
    exact = _shapes_of(onnx.shape_inference.infer_shapes(proto, data_prop=True))
    shapes: dict[str, Shape] = dict(symbolic)
    for name, shape in exact.items():
        other = symbolic.get(name)
        if shape is None:
            continue
        if other is None or len(other) != len(shape):
            shapes[name] = shape
            continue
        shapes[name] = tuple(a if isinstance(a, int) else b for a, b in zip(shape, other, strict=True))
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            shapes[value.name] = tuple(value.const_value.shape.numpy())  # an initializer's shape is static
    return _settle_open_dims(model, shapes) if symbolic_failed else shapes


def _settle_open_dims(model: ir.Model, shapes: dict[str, Shape]) -> dict[str, Shape]:
    """`shapes` with the dims onnx's inference left open (unknown, or its own `unk__N`) settled by evaluating
    the model at two unrelated sizes: a static int, or the graph-input dim it always equals.

    Without onnxruntime's symbolic inference (it fails on shape computations it cannot evaluate, such as
    torch's legacy export of repeat_interleave in Cohere's rotary), onnx's leaves the head count of every
    `Reshape(x, Concat(.., [-1], [head_dim]))` open, and an axis of unknown size cannot be split. The
    planner's own evaluation computes those targets; where it cannot, the shapes stay as they were."""
    named = {str(d.value) for v in model.graph.inputs for d in v.shape or () if isinstance(d, ir.SymbolicDim)}

    def is_open(dim: int | str | None) -> bool:
        return dim is None or (isinstance(dim, str) and dim not in named)

    names = [
        value.name
        for node in model.graph
        for value in node.outputs
        if value.name and (shapes.get(value.name) is None or any(map(is_open, shapes[value.name] or ())))
    ]
    if not names:
        return shapes
    try:
        evaluated = types_in_input_terms(model, names)
    except PlanError as error:
        logger.info("the planner cannot evaluate the model either (%s); open dims stay open", error)
        return shapes
    settled = dict(shapes)
    for name, (_, dims) in evaluated.items():
        known = shapes.get(name)
        if known is None or len(known) != len(dims):
            settled[name] = dims
            continue
        settled[name] = tuple(
            new if is_open(old) and new is not None else old for old, new in zip(known, dims, strict=True)
        )
    return settled


def _is_weight(value: ir.Value | None, shapes: dict[str, Shape], rank: int = 2) -> bool:
    return value is not None and value.is_initializer() and len(shapes.get(value.name) or ()) == rank


def _is_weight_matmul(node: ir.Node, shapes: dict[str, Shape]) -> bool:
    if node.domain == "" and node.op_type in WEIGHT_MATMULS:
        return _is_weight(node.inputs[1], shapes)
    # onnxruntime's block-quantized matmul (int4 exports): B is [N, k_blocks, blob].
    return node.domain == "com.microsoft" and node.op_type == "MatMulNBits" and _is_weight(node.inputs[1], shapes, 3)


def _reached_weight_matmuls(start: ir.Node, weight_nodes: set[str]) -> list[ir.Node]:
    reached: dict[str, ir.Node] = {}
    seen: set[int] = set()
    queue = collections.deque(start.outputs)
    while queue:
        value = queue.popleft()
        for consumer in value.consumers():
            if id(consumer) in seen:
                continue
            seen.add(id(consumer))
            if consumer.name in weight_nodes:
                if consumer.inputs[0] is value:  # the activation side, not the weight
                    reached[consumer.name] = consumer
                continue
            if consumer.op_type in SHAPE_READERS:
                continue
            queue.extend(consumer.outputs)
    return list(reached.values())


def _fused_blocks(ctx: RuleContext, node: ir.Node) -> tuple[int, ...]:
    """Block widths of a fused projection, found by following its output to where it is split."""
    width = ctx.static_dim(node.outputs[0], -1) if ctx.rank(node.outputs[0]) else None
    if width is None:
        return ()
    frontier = [node.outputs[0]]
    for _ in range(4):
        next_frontier = []
        for value in frontier:
            rank = ctx.rank(value)
            consumers = value.consumers()
            slices = [c for c in consumers if c.op_type == "Slice" and c.inputs[0] is value]
            for consumer in consumers:
                if consumer.op_type == "Split" and consumer.inputs[0] is value and rank:
                    axis_attr = consumer.attributes.get("axis")
                    axis = normalize_dim(axis_attr.as_int() if axis_attr else 0, rank)
                    if axis == rank - 1:
                        sizes = _split_sizes(ctx, consumer, width)
                        if sizes and sum(sizes) == width and len(sizes) > 1:
                            return tuple(sizes)
                packed_gqa = consumer.op_type == "GroupQueryAttention" and (
                    len(consumer.inputs) < 2 or consumer.inputs[1] is None
                )
                if packed_gqa and consumer.inputs[0] is value:
                    blocks = gqa_packed_blocks(ctx, consumer)
                    if blocks and sum(blocks) == width:
                        return blocks
                if consumer.op_type == "Reshape" and consumer.inputs[0] is value:
                    split = head_axis_split(ctx, consumer, width)
                    if split is not None:
                        heads, head_dim = split
                        return tuple(count * head_dim for count in heads)
                if consumer.op_type in PASS_THROUGH and consumer.inputs[0] is value:
                    out_rank = ctx.rank(consumer.outputs[0])
                    if out_rank and ctx.static_dim(consumer.outputs[0], -1) == width:
                        next_frontier.append(consumer.outputs[0])
            if len(slices) > 1 and rank:
                blocks = _slice_blocks(ctx, slices, rank, width)
                if blocks:
                    return blocks
        frontier = next_frontier
    return ()


def head_axis_split(ctx: RuleContext, reshape: ir.Node, width: int) -> tuple[tuple[int, ...], int] | None:
    """(heads per block, head_dim) of a fused output of `width` columns that `reshape` turns into
    [.., heads, head_dim] and Slices / constant Gathers cut along the heads axis into blocks of whole heads
    (Falcon's fused multi-query qkv: q = [:, :, :-2], k = [:, :, -2], v = [:, :, -1])."""
    out = reshape.outputs[0]
    shape, in_rank = ctx.shape(out), ctx.rank(reshape.inputs[0])
    if shape is None or in_rank is None or len(shape) != in_rank + 1 or len(shape) < 2:
        return None
    heads, head_dim = shape[-2], shape[-1]
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads * head_dim != width:
        return None
    counts = _head_blocks(ctx, out, len(shape) - 2, heads)
    return None if counts is None else (counts, head_dim)


def grouped_head_split(ctx: RuleContext, reshape: ir.Node, width: int) -> tuple[int, tuple[int, ...], int] | None:
    """(groups, heads per block of a group, head_dim) of a fused output of `width` columns that `reshape`
    turns into [.., groups, heads per group, head_dim] and Slices / constant Gathers cut along the heads
    axis (Falcon's grouped qkv: per kv group its query heads, then its k head, then its v head)."""
    out = reshape.outputs[0]
    shape, in_rank = ctx.shape(out), ctx.rank(reshape.inputs[0])
    if shape is None or in_rank is None or len(shape) != in_rank + 2:
        return None
    groups, heads, head_dim = shape[-3:]
    if not (isinstance(groups, int) and isinstance(heads, int) and isinstance(head_dim, int)):
        return None
    if groups * heads * head_dim != width:
        return None
    counts = _head_blocks(ctx, out, len(shape) - 2, heads)
    return None if counts is None else (groups, counts, head_dim)


def _head_blocks(ctx: RuleContext, value: ir.Value, axis: int, heads: int) -> tuple[int, ...] | None:
    """Heads per block when every reader of `value` but shape readers takes whole heads along `axis`,
    together covering it once, in at least two blocks."""
    ranges = set()
    for consumer in value.consumers():
        if consumer.op_type in SHAPE_READERS:
            continue
        cut = _head_range(ctx, consumer, value, axis, heads)
        if cut is None:
            return None
        ranges.add(cut)
    offset = 0
    for start, end in sorted(ranges):
        if start != offset:
            return None
        offset = end
    if offset != heads or len(ranges) < 2:
        return None
    return tuple(end - start for start, end in sorted(ranges))


def _head_range(ctx: RuleContext, node: ir.Node, value: ir.Value, axis: int, heads: int) -> tuple[int, int] | None:
    """The [start, end) heads that a Slice or constant Gather of `value` takes along its heads `axis`."""
    if node.inputs[0] is not value:
        return None
    if node.op_type == "Slice":
        params = slice_params(ctx, node)
        if params is None:
            return None
        starts, ends, axes, steps = params
        if [normalize_dim(a, len(ctx.shape(value) or ())) for a in axes] != [axis] or steps[0] != 1:
            return None
        start = starts[0] + heads if starts[0] < 0 else starts[0]
        end = min(ends[0] + heads if ends[0] < 0 else ends[0], heads)
        return (start, end) if 0 <= start < end else None
    if node.op_type == "Gather":
        axis_attr = node.attributes.get("axis")
        indices = ctx.constant_ints(node.inputs[1])
        if axis_attr is None or normalize_dim(axis_attr.as_int(), len(ctx.shape(value) or ())) != axis or not indices:
            return None
        indices = [i + heads if i < 0 else i for i in indices]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            return None
        return indices[0], indices[-1] + 1
    return None


def _split_sizes(ctx: RuleContext, node: ir.Node, width: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return ctx.constant_ints(node.inputs[1])
    attr = node.attributes.get("split")
    if attr is not None:
        return list(attr.as_ints())
    parts = len(node.outputs)
    return [width // parts] * parts if width % parts == 0 else None


def _slice_blocks(ctx: RuleContext, slices: list[ir.Node], rank: int, width: int) -> tuple[int, ...]:
    """Block widths of a fused output cut by Slices along its last axis (chunk, qkv slicing)."""
    ranges = []
    for node in slices:
        params = slice_params(ctx, node)
        if params is None:
            return _runtime_chunk_blocks(ctx, slices, rank, width)
        starts, ends, axes, steps = params
        axes = [normalize_dim(a, rank) for a in axes]
        if rank - 1 not in axes:
            return ()
        k = axes.index(rank - 1)
        if steps[k] != 1:
            return ()
        start = starts[k] + width if starts[k] < 0 else starts[k]
        end = min(ends[k] + width if ends[k] < 0 else ends[k], width)
        ranges.append((start, end))
    ranges = sorted(set(ranges))
    offset = 0
    for start, end in ranges:
        if start != offset:
            return ()
        offset = end
    if offset != width:
        return ()
    blocks = tuple(end - start for start, end in ranges)
    shard = Shard(rank - 1, blocks)
    assert all(block_of_slice(shard, width, s, e, 1) is not None for s, e in ranges)
    return blocks


def _runtime_chunk_blocks(ctx: RuleContext, slices: list[ir.Node], rank: int, width: int) -> tuple[int, ...]:
    """torch's chunk: Slice bounds computed from the Shape of the fused tensor, so equal pieces.

    Equal pieces are all a shard needs (their order does not matter when they are the same width),
    and bounds read from the local shape at run time are already local.
    """
    widths = []
    for node in slices:
        axes = slice_axes(ctx, node, rank)
        out_width = ctx.static_dim(node.outputs[0], -1) if ctx.rank(node.outputs[0]) == rank else None
        if axes != [rank - 1] or out_width is None:
            return ()
        widths.append(out_width)
    if len(set(widths)) == 1 and sum(widths) == width:
        return tuple(widths)
    return ()


def _head_counts(ctx: RuleContext, node: ir.Node, blocks: tuple[int, ...]) -> tuple[int, ...] | None:
    """Heads per block of a column projection's output, read where it is reshaped into [heads, head_dim]."""
    output = node.outputs[0]
    if not blocks:
        heads = _heads_of(ctx, output)
        return None if heads is None else (heads,)
    for packed, consumer in ((v, c) for v in _same_layout(ctx, output) for c in v.consumers()):
        if consumer.op_type == "GroupQueryAttention" and consumer.inputs[0] is packed:
            heads_attr = consumer.attributes.get("num_heads")
            kv = consumer.attributes.get("kv_num_heads")
            if heads_attr is not None and kv is not None:
                return (heads_attr.as_int(), kv.as_int(), kv.as_int())
    # Phi-3 style: q, k, v sliced out of the fused output by constant Slices, each reshaped to heads.
    rank = ctx.rank(output)
    width = ctx.static_dim(output, -1) if rank else None
    by_start: dict[int, int] = {}
    for consumer in output.consumers():
        params = slice_params(ctx, consumer) if consumer.op_type == "Slice" and consumer.inputs[0] is output else None
        if params is None or rank is None or width is None:
            continue
        starts, _, axes, _ = params
        axes = [normalize_dim(a, rank) for a in axes]
        if rank - 1 in axes:
            heads = _heads_of(ctx, consumer.outputs[0])
            start = starts[axes.index(rank - 1)]
            if heads is not None:
                by_start[start + width if start < 0 else start] = heads
    offsets = [sum(blocks[:i]) for i in range(len(blocks))]
    if all(offset in by_start for offset in offsets):
        return tuple(by_start[offset] for offset in offsets)
    # Falcon style: reshaped to [heads, head_dim] first, then cut along the heads axis.
    for current in _same_layout(ctx, output):
        for consumer in current.consumers():
            reshapes = consumer.op_type == "Reshape" and consumer.inputs[0] is current
            split = head_axis_split(ctx, consumer, width) if reshapes and width else None
            if split is not None and tuple(count * split[1] for count in split[0]) == blocks:
                return split[0]
    return None


def _heads_of(ctx: RuleContext, value: ir.Value) -> int | None:
    """The head count of a [.., heads * head_dim] value, from the Reshape that splits its last axis."""
    width = _last_dim(ctx, value)
    for current in _same_layout(ctx, value):
        for consumer in current.consumers():
            if consumer.op_type == "Reshape" and consumer.inputs[0] is current:
                out = ctx.shape(consumer.outputs[0])
                heads, head_dim = (out[-2], out[-1]) if out is not None and len(out) >= 2 else (None, None)
                if not (isinstance(heads, int) and isinstance(head_dim, int)):
                    continue
                if width is not None and head_dim * heads == width:
                    return heads
    return None


def _same_layout(ctx: RuleContext, value: ir.Value) -> list[ir.Value]:
    """`value` and the values elementwise ops make of it with the same last axis, nearest first.

    A bias added on either side (Add(bias, x), as torch exports a Linear), a clip, a norm over all heads
    (OLMo 2) sit between a projection and where its heads are split.
    """
    width = _last_dim(ctx, value)
    found, frontier = [value], [value]
    seen: set[int] = set()
    for _ in range(HEAD_SEARCH_DEPTH):
        next_frontier = []
        for current in frontier:
            for consumer in current.consumers():
                keeps_layout = consumer.op_type in ELEMENTWISE_OPS and consumer.domain in ("", "ai.onnx")
                if keeps_layout and id(consumer) not in seen and _last_dim(ctx, consumer.outputs[0]) == width:
                    seen.add(id(consumer))
                    next_frontier.append(consumer.outputs[0])
        found.extend(next_frontier)
        frontier = next_frontier
    return found


def _last_dim(ctx: RuleContext, value: ir.Value) -> int | None:
    return ctx.static_dim(value, -1) if ctx.rank(value) else None


def _kv_parts_of(ctx: RuleContext, node: ir.Node, blocks: tuple[int, ...]) -> tuple[int, ...]:
    """Per-block parts when a block has fewer heads than tp ranks (GQA/MQA kv heads are then replicated)."""
    heads = _head_counts(ctx, node, blocks)
    if heads is None or all(h % ctx.tp == 0 for h in heads):
        return ()
    if not all(h % ctx.tp == 0 or ctx.tp % h == 0 for h in heads):
        return ()  # propagate reports the head count that tp does not divide
    parts = tuple(ctx.tp if h % ctx.tp == 0 else h for h in heads)
    return parts


def _grouped_role(ctx: RuleContext, node: ir.Node) -> WeightRole | None:
    """The role of a grouped fused projection with fewer groups than tp ranks: each group's ranks split its
    query heads and each hold its k and v heads whole. None where tp does not exceed the groups (a plain
    column split then keeps whole groups) or splits them another way."""
    output = node.outputs[0]
    width = _last_dim(ctx, output)
    for consumer in output.consumers():
        split = grouped_head_split(ctx, consumer, width) if consumer.op_type == "Reshape" and width else None
        if split is None or consumer.inputs[0] is not output:
            continue
        groups, counts, head_dim = split
        if ctx.tp <= groups or ctx.tp % groups:
            return None
        inner = ctx.tp // groups
        parts = tuple(inner if count % inner == 0 else 1 for count in counts)
        if any(count % inner and count != 1 for count in counts):
            return None
        return WeightRole("column", (), (groups,), inner, tuple(count * head_dim for count in counts), parts)
    return None


# Attributes that carry the query head count of an attention op.
QUERY_HEAD_ATTRIBUTES = ("num_heads", "q_num_heads")


def attention_heads(model: ir.Model, ctx: RuleContext) -> int | None:
    """The model's query head count: the most heads a column projection is reshaped into, or an attention
    op's num_heads; None when no projection is split into heads."""
    return max(attention_head_counts(model, ctx), default=None)


def attention_head_counts(model: ir.Model, ctx: RuleContext) -> tuple[int, ...]:
    """Every head count the projections are reshaped into or attention ops name (query and kv heads)."""
    weight_nodes = [node for node in model.graph if _is_weight_matmul(node, ctx.shapes)]
    names = {node.name for node in weight_nodes}
    counts = [
        count
        for node in weight_nodes
        if _reached_weight_matmuls(node, names)
        for count in (_head_counts(ctx, node, _fused_blocks(ctx, node)) or _split_head_counts(ctx, node))
    ]
    for node in model.graph:
        for name in QUERY_HEAD_ATTRIBUTES:
            attr = node.attributes.get(name)
            if attr is not None and attr.type == ir.AttributeType.INT and attr.as_int() > 0:
                counts.append(attr.as_int())
    for node in model.graph:
        attr = node.attributes.get("kv_num_heads")
        if attr is not None and attr.type == ir.AttributeType.INT and attr.as_int() > 0:
            counts.append(attr.as_int())
    return tuple(sorted(set(counts)))


def _split_head_counts(ctx: RuleContext, node: ir.Node) -> tuple[int, ...]:
    """Heads of the pieces a Split cuts a fused projection into (GPT-2's q, k, v), each reshaped to heads."""
    width = _last_dim(ctx, node.outputs[0])
    # A 2-D Gemm's output is reshaped back to [batch, tokens, width] before it is split.
    values = [
        same
        for value in _same_layout(ctx, node.outputs[0])
        for reshaped in [value] + [c.outputs[0] for c in value.consumers() if c.op_type == "Reshape"]
        if _last_dim(ctx, reshaped) == width
        for same in _same_layout(ctx, reshaped)
    ]
    return tuple(
        heads
        for value in values
        for consumer in value.consumers()
        if consumer.op_type == "Split" and consumer.inputs[0] is value
        for piece in consumer.outputs
        if (heads := _heads_of(ctx, piece)) is not None
    )


def tp_mesh(
    heads: int | None, mesh: DeviceMesh, weights: tuple[float, ...] | None, head_counts: tuple[int, ...] = ()
) -> DeviceMesh:
    """`mesh` with uneven tp shares of the `heads` where tp does not divide them but each rank can hold one
    (or where per-rank `weights` ask for unequal parts); `mesh` itself where tp divides them evenly.
    The shares keep each rank's query heads on one kv head or whole ones (`head_counts` name the kv heads)."""
    if mesh.tp == 1:
        return mesh
    even = weights is None or len(set(weights)) == 1
    if heads is None or heads < mesh.tp or (even and heads % mesh.tp == 0):
        return mesh  # propagate names what does not divide
    groups = tuple(heads // count for count in head_counts if 0 < count < heads and heads % count == 0)
    shares = grouped_shares(heads, mesh.tp, groups, weights)
    return mesh if len(set(shares)) == 1 else dataclasses.replace(mesh, tp_shares=shares)


def assign_weight_roles(model: ir.Model, ctx: RuleContext, vocab_parallel: bool = False) -> dict[str, WeightRole]:
    """Megatron roles of weight matmuls; with `vocab_parallel`, the lm_head and embedding split by vocabulary.
    Subgraphs (If/Loop/Scan) are searched too: a weight matmul there gets the role it would have, which
    AnnotatePass refuses (`_refuse_sharding_in_subgraphs`)."""
    every_node = ir.traversal.RecursiveGraphIterator(model.graph)
    weight_nodes = [node for node in every_node if _is_weight_matmul(node, ctx.shapes)]
    names = {node.name for node in weight_nodes}
    roles: dict[str, WeightRole] = {}
    for node in weight_nodes:
        if node.name in roles:
            continue
        reached = _reached_weight_matmuls(node, names)
        if not reached:
            # The lm_head (its output is the logits): split its vocabulary columns only when asked.
            lm_head = vocab_parallel and _reaches_graph_output(node)
            roles[node.name] = WeightRole("column" if lm_head else "replicate")
            continue
        blocks = _fused_blocks(ctx, node)
        grouped = None if blocks else _grouped_role(ctx, node)
        roles[node.name] = grouped or WeightRole("column", blocks, _kv_parts_of(ctx, node, blocks))
        for closing in reached:
            roles.setdefault(closing.name, WeightRole("row"))
    if vocab_parallel:
        lookups = []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            table = node.inputs[0] if node.op_type == "Gather" and node.domain == "" else None
            axis = node.attributes.get("axis")
            if _is_weight(table, ctx.shapes) and (axis is None or axis.as_int() == 0):
                lookups.append(node)
        # The token embedding is the lookup of the token ids. Other row lookups in a weight (the rotary
        # cos/sin caches, indexed by positions) would split correctly too, but each would cost an AllReduce
        # of its partial sums every step for nothing: they stay replicated. Where no lookup reads the token
        # ids (an export that computes its indices), every row lookup splits, as a vocabulary would.
        embeddings = [node for node in lookups if _reads_token_ids(node.inputs[1])]
        for node in embeddings or lookups:
            roles[node.name] = WeightRole("vocab")
    return roles


# Ops that pass token ids through unchanged in value (dtype or shape aside).
_ID_PASSTHROUGH = frozenset({"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def _reads_token_ids(indices: ir.Value | None) -> bool:
    while indices is not None and not indices.is_graph_input():
        producer = indices.producer()
        if producer is None or producer.op_type not in _ID_PASSTHROUGH or not producer.inputs:
            return False
        indices = producer.inputs[0]
    return indices is not None and input_kind(indices) == TOKEN_IDS


def _reaches_graph_output(node: ir.Node) -> bool:
    seen: set[int] = set()
    queue = collections.deque(node.outputs)
    while queue:
        value = queue.popleft()
        if value.is_graph_output():
            return True
        for consumer in value.consumers():
            if id(consumer) not in seen and consumer.op_type not in SHAPE_READERS:
                seen.add(id(consumer))
                queue.extend(consumer.outputs)
    return False


def _refuse_sharding_in_subgraphs(model: ir.Model, roles: dict[str, WeightRole]) -> None:
    """A weight matmul inside a subgraph (If/Loop/Scan) that tensor parallelism would split is refused:
    propagation runs subgraphs whole on every rank, so splitting it is not supported; keeping it whole
    while the user asked for tp would hide that the model is not sharded where its work is."""
    owners = control_flow_owners(model.graph)
    for inner, owner in owners.items():
        role = roles.get(inner.name)
        if role is not None and role.kind != "replicate":
            raise ShardingError(
                f"node {inner.name} ({inner.op_type}) inside the subgraph of node {owner.name} ({owner.op_type}) "
                f"would be {role.kind}-parallel; sharding inside control flow (If/Loop/Scan) is not supported: "
                "export the model without control flow, or use --tp 1"
            )


class AnnotatePass(ir.passes.InPlacePass):
    """Names, constants, global shapes and weight roles; the graph's meaning is unchanged.

    Needs: `state` with the caller's configuration (mesh, vocab_parallel, tp_weights).
    Provides in `result.state`: shapes, roles, attention_heads, head_counts, the mesh's uneven tp_shares.
    Modifies the model only where a node had no unique name, a constant was a node or a weight had an
    Identity alias, or the nodes were out of topological order (`modified` says which was the case).
    """

    def __init__(self, state: ShardingState) -> None:
        super().__init__()
        self.state = state

    def call(self, model: ir.Model) -> ShardingPassResult:
        modified = NameFixPass()(model).modified
        modified |= _unique_node_names(model.graph) > 0
        modified |= LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
        modified |= _fold_weight_aliases(model.graph) > 0
        modified |= TopologicalSortPass()(model).modified
        self.state.shapes = global_shapes(model)
        counts = attention_head_counts(model, RuleContext(tp=self.state.tp, shapes=self.state.shapes))
        self.state.attention_heads, self.state.head_counts = max(counts, default=None), counts
        self.state.mesh = tp_mesh(self.state.attention_heads, self.state.mesh, self.state.tp_weights, counts)
        ctx = RuleContext(tp=self.state.tp_units, shapes=self.state.shapes)
        self.state.roles = assign_weight_roles(model, ctx, self.state.vocab_parallel)
        if self.state.tp > 1:
            _refuse_sharding_in_subgraphs(model, self.state.roles)
        return ShardingPassResult(model, modified, self.state)

    def ensures(self, model: ir.Model) -> None:
        names = [node.name for node in ir.traversal.RecursiveGraphIterator(model.graph)]
        if len(set(names)) != len(names) or not all(names):
            raise ir.passes.PostconditionError("every node must have a unique name after annotate")
