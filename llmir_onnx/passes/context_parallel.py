"""Context parallelism (`--cp C`): the prompt's tokens split over a cp mesh axis, attention included.

What it is. Sequence sharding on a second mesh axis, decided by the sharding rules as sequence parallelism
(passes/sequence_parallel.py) decides its regions, not by a hand-written attention matcher: every
activation with the token axis (the dim whose symbolic role is "new", model_facts' dim roles) is split along
it over the cp group. Rank cp_rank holds tokens [cp_rank*c, (cp_rank+1)*c) of the sequence padded to c*cp,
c = ceil(n / cp), n read at run time from input_ids' shape (sp's padding scheme and graph building, shared
by subclassing: `SequenceParallelPass` with `mesh_axis = "cp"`).

Which nodes join. Walking the graph in order, a node joins when its rule keeps every token-axis input and
output split on the token axis, with its other inputs whole: the per-token families sp uses (elementwise
ops, reductions and norms over other axes), plus MatMul with its row axis split (the query axis of the
attention scores, and the weight projections), and Transpose, Reshape, Slice, Split and Concat that keep the
token axis (the head layout, rotate_half, a partial rotary). The rules are asked with no Megatron roles: the
cp split is independent of the tp one (a weight is the same on every cp rank, whatever its tp slice), so a
projection keeps the rows of its activation. A node joins when it reads the split stream, or starts it: a
token-axis activation times a weight (a projection, a norm's scale). So shape computations, the attention
mask and the position ids and rotary tables stay whole on every rank (cheap, and built differently by every
exporter); where such a whole value meets the split stream in a per-token op (cos/sin times q, the mask
added to the scores) it is cut locally to the rank's rows, with no communication. A whole input that
broadcasts against the token axis must have size 1 there (a mask whose shape is not known is not cut
blindly: that node stays outside).

Attention. The query chunk stays local. Keys and values are the one place that needs every token: the
Concat that joins the new keys/values with the past cache (its output has the total length, not the new
one, so no rule keeps it split) reads its new-token input gathered over the cp group (AllGather along the
tokens, padding sliced off), like any other use outside the region. The scores q_chunk @ K_total^T are
[.., c, past+n]: split on the query axis; the mask is cut to the rank's rows, Softmax over the last axis
and @ V keep the split, and o_proj, the MLP, norms and residual adds run on the chunk. Outputs with a
token axis (logits) are gathered and sliced to n at the graph outputs; `present.*` are whole on every cp
rank. Padding rows (zeros) never mix with a real token (no rule in a region mixes tokens, and the keys
are sliced to n before they are used), and are dropped at every gather: outputs equal the original's for
every n, decode (n = 1) included, where rank 0 holds the token and the others padding.

The KV cache. By default (`kv_cache="replicated"`) the cache is replicated over cp, so a decode step gains
nothing from cp. `kv_cache="sharded"` (the CLI's --cp-kv-cache sharded) shards it along the sequence:
context_parallel_cache.py finds the nodes that read the cache first (they stay out of the token regions:
the queries are gathered where they meet the local keys) and rewrites them after the token split.

Which attention it takes. Attention written in standard ops (torch and optimum exports: MatMul, Softmax,
MatMul, whatever the mask and rotary), com.microsoft GroupQueryAttention (onnxruntime-genai exports) and
ONNX Attention with RotaryEmbedding (torch dynamo at opset 23), which partition.py lowers into such standard
ops before the passes run, only when cp > 1 (lower_attention.py; GroupQueryAttention: rotary at the
positions the op derives from seqlens_k, the KV heads repeated, causal mask, Concat with the past): a fused
op takes its queries as the last tokens of the sequence (its mask and positions are not read off the
queries), so a chunk of them cannot be fed to it, while its lowered form is the same attention this pass
splits for torch exports, --cp-kv-cache sharded included.

What it does not do yet. Projections on [batch*tokens, hidden] (GPT-2's Gemm exports) have no token axis:
their q, k, v and attention run whole on every cp rank (correct, no gain); nor do MatMulNBits projections
(genai int4) join the token split (the norms run on the chunk, are gathered before each projection).
Other fused attention ops that take their queries as the last tokens of the sequence (com.microsoft
Attention and MultiHeadAttention, a lowered op inside a subgraph) cannot take a chunk: refused.

Ranks. The cp rank is baked into each rank model: the local cuts' offsets read one initializer holding
the cp rank (0 here, `ShardingState.cp_rank_constants` gives its value on each cp rank), and the AllGather
group is cp rank 0's (the global ranks with its (pp, tp) coordinates). partition.py makes the other cp
ranks as copies of cp rank 0's model with that constant and their groups moved along the cp axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import MAX_IR_VERSION
from llmir_onnx.mesh import MeshAxis
from llmir_onnx.model_facts import is_lowered_for_cp, last_token_attention, last_token_attention_reason
from llmir_onnx.passes.context_parallel_cache import SequenceShardedCache
from llmir_onnx.passes.sequence_parallel import PER_TOKEN_RULE_MODULES, SequenceParallelPass
from llmir_onnx.passes.state import (
    Redistribution,
    ShardingPassResult,
    ShardingState,
    pending_redistributions,
    require_propagated,
)
from llmir_onnx.placement import REPLICATE, Placement, Shard
from llmir_onnx.propagation import lookup
from llmir_onnx.propagation.base import RuleContext

# Ops whose rules keep a split of the token axis besides the per-token families: the batched MatMul's
# row axis (the queries), and the layout ops of the head split.
_ROW_KEEPING_OPS = frozenset({"MatMul", "Transpose", "Reshape", "Slice", "Split", "Concat"})


class ContextParallelPass(SequenceParallelPass):
    """After propagate (before insert_collectives): token-split regions over the cp group, their cuts and
    AllGathers (see the module docstring).

    Needs: `state` from PropagatePass (its mesh with cp > 1; tp placements are kept as they are).
    Provides in `result.state`: context_shards, cp_rank_constants; redistributions read by a use outside a
    region are renamed to the gathered value. A second run finds context_shards decided and changes nothing.
    """

    mesh_axis: MeshAxis = "cp"
    _scatters_partial_sums = False

    def __init__(self, state: ShardingState, kv_cache: str = "replicated", max_seq: int | None = None) -> None:
        super().__init__(state)
        # "sharded": the KV cache split along the sequence over cp (passes/context_parallel_cache.py), in blocks
        # of ceil(max_seq / cp) tokens: max_seq is the plan's, needed then.
        if kv_cache == "sharded" and max_seq is None:
            raise PlanError("--cp-kv-cache sharded needs the plan's max_seq (its blocks are ceil(max_seq / cp))")
        self._cache = SequenceShardedCache(self, max_seq) if kv_cache == "sharded" and max_seq is not None else None

    def requires(self, model: ir.Model) -> None:
        require_propagated(model, self.state, "context parallelism")

    def call(self, model: ir.Model) -> ShardingPassResult:
        state, graph = self.state, model.graph
        if state.mesh.cp == 1 or state.context_shards:
            return ShardingPassResult(model, False, state)
        _refuse_last_token_attention(graph)
        self._read_token_count(model, "--cp")
        # The tp conversions InsertCollectivesPass will insert (none at tp 1; a whole shard converts to itself).
        pending = {(r.node, r.index): r for r in pending_redistributions(model, state)}
        if self._cache is not None:
            self._cache.find(graph, model)  # before the token split: its nodes stay out of the token regions
        sharded, region = self._find_region(graph, pending)
        if not region:
            raise PlanError(
                f"--cp {state.mesh.cp} finds no per-token work on the new tokens in this model (no projection or "
                "norm of a [.., new, ..] activation that a sharding rule keeps split); partition without --cp"
            )
        output_shapes = {value.name: value.shape for value in graph.outputs}
        reshapes = [(node, sharded[node.outputs[0].name]) for node in region if node.op_type == "Reshape"]
        shapes = [(node, sharded[node.inputs[0].name]) for node in region if node.op_type == "Shape"]
        self._rewrite(graph, region, sharded, pending)
        self._follow_cuts(region)
        for node, axis in reshapes:
            self._chunk_reshape_target(graph, node, axis)
        for node, axis in shapes:
            self._whole_shape(graph, node, axis)
        if self._cache is not None:
            self._cache.rewrite(graph, model)
        state.context_shards = {name: Shard(axis) for name, axis in {**self._chunks, **sharded}.items()}
        model.opset_imports[ops.LLMIR_DOMAIN] = ops.LLMIR_OPSET_VERSION
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        if state.tp == 1:
            # LocalizePass, which drops the export's intermediate shapes (a chunk is not [.., n, ..]), does
            # nothing at tp 1: drop them here; the graph outputs keep the original's.
            for node in graph:
                for value in node.outputs:
                    value.shape = None
            for value in graph.outputs:
                value.shape = output_shapes.get(value.name)
        return ShardingPassResult(model, True, state)

    def _placement_of(self, like: ir.Value | None) -> Placement:
        """A cut, pad or gather along the tokens keeps the tp placement of the value it is made from."""
        if like is None:
            return REPLICATE
        return self.state.placements.get(like.name, REPLICATE)

    def _rank_constants(self) -> dict[str, Callable[[int], np.ndarray]]:
        """The cp rank constants: partition sets them on each cp rank's copy."""
        return self.state.cp_rank_constants

    def _joins(
        self, node: ir.Node, sharded: dict[str, int], pending: dict[tuple[str, int], Redistribution]
    ) -> dict[str, int] | None:
        """The token axes of `node`'s outputs when it joins a region (see the module docstring), else None."""
        if self._cache is not None and id(node) in self._cache.nodes:
            return None  # reads the sequence-sharded cache: its split is the cache's (context_parallel_cache.py)
        source = node.inputs[0] if node.inputs else None
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and source is not None and source.name in sharded:
            return {}  # reads the chunk's shape; the token element is made n again (`_whole_shape`): no gather
        rule = lookup(node)
        if rule is None:
            return None
        per_token = rule.__module__ in PER_TOKEN_RULE_MODULES
        if not per_token and not (node.domain in ("", "ai.onnx") and node.op_type in _ROW_KEEPING_OPS):
            return None
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            return None
        shapes = self.state.shapes
        current: list[Placement | None] = []
        reads_stream = cuts = weighted = False
        whole: list[ir.Value] = []
        for value in node.inputs:
            if value is None:
                current.append(None)
            elif value.name in sharded:
                current.append(Shard(sharded[value.name]))
                reads_stream = True
            elif shapes.get(value.name) is None:
                return None  # its extent along the tokens is unknown: it cannot be cut, or passed whole, blindly
            elif (axis := self._token_axis(value)) is not None:
                current.append(Shard(axis))  # a tp conversion that reads it here converts the cut (`_follow_cuts`)
                cuts = True
            else:
                current.append(REPLICATE)
                whole.append(value)
                weighted = weighted or _is_weight(value)
        if not (reads_stream or (cuts and weighted)):
            return None
        ctx = RuleContext(tp=self._parts, shapes=shapes)  # no roles: a weight is the same on every cp rank
        outputs = self._rule_keeps_split(rule, ctx, node, current)
        if outputs is None or (per_token and not self._whole_inputs_broadcast(node, whole, outputs)):
            return None
        return outputs

    def _whole_inputs_broadcast(self, node: ir.Node, whole: list[ir.Value], outputs: dict[str, int]) -> bool:
        """Every whole input of a per-token op has size 1 (or no dim) where it meets the output's token axis,
        so it broadcasts over the chunk as over the whole sequence ([n, n] masks and unknown dims do not)."""
        first = node.outputs[0]
        out_shape = self.state.shapes.get(first.name)
        if first.name not in outputs or out_shape is None:
            return not whole
        token = outputs[first.name]
        for value in whole:
            shape = self.state.shapes.get(value.name) or ()
            dim = token - (len(out_shape) - len(shape))
            if dim >= 0 and shape[dim] != 1:
                return False
        return True

    def _follow_cuts(self, region: list[ir.Node]) -> None:
        """A tp conversion (slicing the heads of a whole mask, say) of a value a region node now reads cut to
        its rows converts the cut instead: the cut is along the tokens, the conversion along another axis."""
        nodes = {node.name: node for node in region}
        moved = []
        for item in self.state.redistributions:
            node = nodes.get(item.node)
            read = node.inputs[item.index] if node is not None else None
            if read is not None and read.name != item.value and self._converted.get((item.value, "chunk")) is read:
                item = dataclasses.replace(item, value=read.name)
            moved.append(item)
        self.state.redistributions = moved

    def _chunk_reshape_target(
        self, graph: ir.Graph, node: ir.Node, axis: int, whole: ir.Value | None = None, local: ir.Value | None = None
    ) -> None:
        """A Reshape on the chunk whose target is computed at run time may hold n (read off input_ids, or a
        folded literal) on the token axis: that element becomes c; -1, 0 and a c read off a chunk stay.
        `whole` and `local` (default n and c): another pair, a Reshape or Expand of a sequence-sharded cache
        value whose target holds the whole cache's length (context_parallel_cache.py)."""
        target = node.inputs[1]
        if target is None or target.const_value is not None:
            return  # a constant target cannot hold the dynamic n: it has -1 or 0 there
        self._graph = graph
        rank = len(self.state.shapes.get(node.outputs[0].name) or ())
        lengths = self._lengths_of()
        def around(size: ir.Value, fill: int) -> ir.Value:  # [fill, .., size, .., fill], size on the token axis
            before = self._initializer(self._name("before"), np.full(axis, fill, dtype=np.int64))
            after = self._initializer(self._name("after"), np.full(rank - axis - 1, fill, dtype=np.int64))
            return self._int_node("Concat", [before, size, after], axis=0)

        # -2 is no size: only the token axis is compared
        marker = around(whole if whole is not None else lengths["n"], -2)
        local_target = around(local if local is not None else lengths["chunk"], 0)
        equal = ir.Node("", "Equal", [target, marker], name=self._name("Equal"))
        where = ir.Node("", "Where", [equal.outputs[0], local_target, target], name=self._name("Where"))
        for made in (equal, where):
            made.outputs[0].name = made.name + "/out"
            self.state.placements[made.outputs[0].name] = REPLICATE
            self.state.shapes[made.outputs[0].name] = (rank,)
        where.outputs[0].type = ir.TensorType(ir.DataType.INT64)
        for value in (marker, local_target):
            self.state.shapes[value.name] = (rank,)
        graph.insert_before(node, [equal, where])
        node.replace_input_with(1, where.outputs[0])


    def _whole_shape(self, graph: ir.Graph, node: ir.Node, axis: int, whole: ir.Value | None = None) -> None:
        """A Shape of a chunk (which joined the region rather than have the chunk gathered for it) gives the
        whole sequence's shape: its token element is n, not c (or `whole`: the whole cache's length, for a
        Shape of a sequence-sharded cache value)."""
        rank = len(self.state.shapes.get(node.inputs[0].name) or ())
        start_attr, end_attr = node.attributes.get("start"), node.attributes.get("end")
        start, end = (attr.as_int() if attr is not None else None for attr in (start_attr, end_attr))
        read = list(range(rank))[start:end]
        if axis not in read:
            return  # the chunk's other dims are the whole's
        self._graph = graph
        shape_of = node.outputs[0]
        if shape_of.is_graph_output():
            raise PlanError(
                f"--cp: graph output {shape_of.name!r} is the Shape of a token chunk; partition without --cp"
            )
        uses = list(shape_of.uses())
        # Int64 constants and an Equal, not a bool constant: the shape planner evaluates int64 arithmetic.
        one_hot = np.zeros(len(read), dtype=np.int64)
        one_hot[read.index(axis)] = 1
        one_hot_value = self._initializer(self._name("token_element"), one_hot)
        is_token = self._int_node("Equal", [one_hot_value, self._initializer(self._name("one"), np.ones(1, np.int64))])
        is_token.type = ir.TensorType(ir.DataType.BOOL)
        self.state.shapes[is_token.name] = (len(read),)
        length = whole if whole is not None else self._lengths_of()["n"]
        where = ir.Node("", "Where", [is_token, length, shape_of], name=self._name("Where"))
        whole = where.outputs[0]
        whole.name, whole.type = f"{shape_of.name}__whole", ir.TensorType(ir.DataType.INT64)
        self._record(whole, None, (len(read),))
        graph.insert_after(node, where)
        for use in uses:
            use.node.replace_input_with(use.idx, whole)


def _is_weight(value: ir.Value) -> bool:
    """A float initializer of more than one element: a projection's matrix, a norm's scale (not a scalar,
    not a shape)."""
    tensor = value.const_value
    return (
        value.is_initializer()
        and tensor is not None
        and tensor.dtype.is_floating_point()
        and int(np.prod(tensor.shape.numpy())) > 1
    )


def _refuse_last_token_attention(graph: ir.Graph) -> None:
    node = last_token_attention(graph)
    if node is not None and is_lowered_for_cp(node):
        # the top-level ones were lowered into standard ops (partition.py): this one is in a subgraph
        raise PlanError(f"--cp cannot lower node {node.name} ({node.op_type}) inside a subgraph into standard "
                        "ops; use --cp 1")
    if node is not None:
        raise PlanError(f"{last_token_attention_reason(node)}; partition without --cp")

