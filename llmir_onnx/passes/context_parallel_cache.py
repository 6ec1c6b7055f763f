"""A KV cache sharded along the sequence over the cp axis (`partition --cp C --cp-kv-cache sharded`).

What it is. With the default layout (context_parallel.py) every cp rank holds and returns the whole cache.
Here cp rank r holds a contiguous run of the cache's tokens, global positions [s_r, s_r + L_r), the runs
following each other in cp-rank order, each within a fixed block of the sequence, and attention combines
the ranks' partial results with the log-sum-exp trick: a decode step reads at most 1/C of the cache (a
block) per rank, and the cache's memory falls as cp grows.

Which tokens a rank keeps: fixed blocks. With B = ceil(max_seq / C) (`cache_block`; max_seq is the plan's
--max-seq, a constant of the rank models), cp rank r owns the global positions [r*B, (r+1)*B). At any step
with a whole past of P tokens and n new ones (the new keys/values are gathered over cp, as in the default
layout, at the Concat with the past), rank r keeps the new rows [a_r, b_r), a_r = clamp(r*B - P, 0, n),
b_r = clamp((r+1)*B - P, 0, n) (a Slice inserted at that Concat): its `present.*` is Concat(its past, those
rows). So its run always starts at s_r = r*B, stays contiguous, and never exceeds B tokens: the memory a rank
needs is bounded by B exactly, whatever the prompt and generation lengths (an earlier rule, the prompt's
chunks then every later token on the last rank, let a long generation grow one rank to nearly the whole
cache past what the memory plan said). The price: a sequence shorter than max_seq leaves the high ranks'
blocks empty or short, so the attention work (scores, softmax, P@V) sits on the low ranks, while the
projections and MLP stay balanced by the token chunks; the memory bound is what this layout is for (very
long sequences, where the blocks fill).
A step whose total length (P + n) passes max_seq has tokens no block holds: the graph refuses it rather
than drop their keys, by a Reshape of the total to a target of -2 when it is over (ONNX has no assert op; the
node is named `llmir/cp/refuse_total_length_over_max_seq_<max_seq>`); verify and generate refuse it in
one line before the ranks start (`Manifest.check_cache_tokens`).

The lengths, in the graph: no communication. The whole past P is the attention mask's total length less n:
the mask stays whole on every rank (a model without a mask input is refused), while a rank's past input
holds its run only (its length L_r). s_r = r*B from the cp-rank constant.

Which nodes take part: sharding rules, not an attention matcher. A value is "key-sharded" when it holds a
rank's run of the cache's tokens on one axis: the past inputs (seeds), the present, and whatever a sharding
rule (`propagation`, asked with Shard on that axis) keeps split on the same axis: the GQA repeat (Unsqueeze,
Expand, Reshape), the Transpose of the keys, the scores MatMul(q, K^T) (q whole: the query chunk is
gathered over cp where it meets a key-sharded value, the token split's "use outside the region"), the scale,
the mask add, Casts. Three cases the rules do not keep split get a composite instead of a gather:
- Concat(past, new) along the tokens (the present): the layout rule above.
- Softmax over the split axis: m = AllReduce(max) of the local ReduceMax, e = Exp(x - m), the denominator
  AllReduce(sum) of the local ReduceSum(e), output e / denominator, still key-sharded: exact up to rounding.
  A rank holding no keys reduces an empty axis: ReduceMax gives -inf there (onnxruntime), which the max
  over the group ignores, and ReduceSum 0.
- MatMul contracting the split axis in both inputs (probabilities @ V): the rule says Partial(sum); an
  AllReduce(sum) over cp resolves it, whole on every rank; the token split cuts its rows again at o_proj.
A whole value that meets a key-sharded one with the cache's length on that axis (the attention mask) is cut
locally to the rank's key columns [s_r, s_r + L_r + b_r - a_r) (a_r > 0 only when the rank's past is empty,
its block starting inside the step's new tokens: P + a_r = s_r then). A Shape of a key-sharded value gives the
whole cache's shape (P, or P + n for the present), so the mask, positions and anything else the exporter
derives from it are the original's; a Reshape or Expand of a key-sharded value whose target holds that whole
length gets the local one there. A node that reads a key-sharded value and fits none of this is refused with
one line naming it (a sliding window's trim of the cache, a subgraph reading it); fused attention ops stay
refused by --cp itself.

Empty runs. A rank whose block starts past the sequence so far holds no token: its scores have an empty key
axis (see the Softmax above), its P@V part is zeros, and a Reshape target that would get its run's length 0
there (Reshape's "copy the input's dim") gets -1 instead.

What it costs per layer and step: the query chunk's AllGather (as the keys' was), two AllReduces of
[.., n, 1] (max, sum) and one of the attention output [.., n, head_dim], for a decode step that reads
at most B cached tokens per rank instead of P (with a full cache: B = ceil(max_seq / C)). The division by
the denominator could follow the P@V AllReduce instead (one multiply of [n, head_dim] instead of [n, keys]);
kept before it so that the Softmax's output is the original's probabilities, key-sharded, for whatever
reads them.

Planning (plan/memory.py, plan/cost.py evaluate each rank model alone): each rank's past inputs are declared
as a run of the whole past, ceil(past / C) (`declare_cache_run_dims`), which the memory plan evaluates at
past = max_seq: B, the block. All cp ranks share cp rank 0's model (copied with a cp-rank constant), so every
rank is planned at B: an upper bound on each rank's cache (the last rank's block may be shorter), reached
by every full block. The plan is made at --max-seq itself (the rank models hold no per-step communication
of lengths that an evaluation of one rank alone would get wrong).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from llmir_onnx import ops
from llmir_onnx.errors import PlanError
from llmir_onnx.mesh import cache_block
from llmir_onnx.model_facts import kv_cache_inputs, kv_length_axis, mask_total_axis
from llmir_onnx.placement import REPLICATE, Partial, Placement, Shard
from llmir_onnx.plan.memory import cache_run_dim
from llmir_onnx.propagation import lookup
from llmir_onnx.propagation.base import RuleContext

if TYPE_CHECKING:
    from llmir_onnx.passes.context_parallel import ContextParallelPass

PAST, PRESENT = "past", "present"  # the two extents a key-sharded value can have: P, or P + n tokens
_STANDARD = ("", "ai.onnx")


def _refusal(node: ir.Node, value: ir.Value, why: str) -> PlanError:
    return PlanError(
        f"--cp-kv-cache sharded: node {node.name} ({node.op_type}) reads the sequence-sharded KV cache value "
        f"{value.name!r} and {why}; partition with --cp-kv-cache replicated"
    )


class SequenceShardedCache:
    """Finds (`find`, before the token split) and rewrites (`rewrite`, after it) the key-sharded part of the
    graph for a ContextParallelPass; it builds with the pass's graph helpers (names, records, lengths)."""

    def __init__(self, cp_pass: ContextParallelPass, max_seq: int) -> None:
        self.cp_pass = cp_pass
        self.max_seq = max_seq  # the plan's --max-seq: the blocks are ceil(max_seq / C) tokens (`cache_block`)
        self.state = cp_pass.state
        self.axis_of: dict[str, int] = {}  # key-sharded value -> its split axis
        self.extent_of: dict[str, str] = {}  # the cache-length symbol of a key-sharded axis -> PAST | PRESENT
        self.nodes: set[int] = set()  # id() of every node that reads a key-sharded value
        self._appends: list[ir.Node] = []
        self._shapes: list[tuple[ir.Node, int, str]] = []
        self._targets: list[tuple[ir.Node, int, str]] = []
        self._cuts: list[tuple[ir.Node, int, int, str]] = []
        self._softmaxes: list[tuple[ir.Node, int]] = []
        self._partials: list[ir.Node] = []
        self._values: dict[str, ir.Value] = {}  # the step's lengths (`_lengths`), built once
        self._never_zero_values: dict[str, ir.Value] = {}
        self._cut_values: dict[tuple[str, int, str], ir.Value] = {}

    # -- finding --------------------------------------------------------------------------------------

    def find(self, graph: ir.Graph, model: ir.Model) -> None:
        inputs = kv_cache_inputs(model)
        if not inputs:
            raise PlanError(
                "--cp-kv-cache sharded needs the model's past KV cache inputs (past_key_values.*); this model has "
                "none: partition with --cp-kv-cache replicated"
            )
        self._first_past = inputs[0]
        self._total_source = mask_total_axis(model)
        for value in inputs:
            axis = kv_length_axis(value)
            self.axis_of[value.name] = axis
            self.extent_of[str(self._dim(value, axis))] = PAST
        for node in graph:
            reads = [(i, v) for i, v in enumerate(node.inputs) if v is not None and v.name in self.axis_of]
            if reads:
                self._decide(node, reads)
                self.nodes.add(id(node))
            self._refuse_subgraph_reads(node, node)

    def _refuse_subgraph_reads(self, top: ir.Node, node: ir.Node) -> None:
        """A subgraph that reads a key-sharded value from the enclosing graph would take a rank's run for the
        whole cache: refused (only top-level nodes are rewritten)."""
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                graphs = [attr.as_graph()]
            elif attr.type == ir.AttributeType.GRAPHS:
                graphs = list(attr.as_graphs())
            else:
                continue
            for subgraph in graphs:
                for inner in subgraph:
                    read = next((v for v in inner.inputs if v is not None and v.name in self.axis_of), None)
                    if read is not None:
                        raise _refusal(top, read, "holds a subgraph that reads it")
                    self._refuse_subgraph_reads(top, inner)

    def _dim(self, value: ir.Value, axis: int) -> object:
        shape = self.state.shapes.get(value.name)
        if shape is None or axis >= len(shape):
            raise PlanError(f"--cp-kv-cache sharded: the shape of {value.name!r} is not known; partition with "
                            "--cp-kv-cache replicated")
        return shape[axis]

    def _key_axis(self, value: ir.Value) -> int | None:
        """The one axis of a value whose dim is a cache length (past or present), else None."""
        shape = self.state.shapes.get(value.name)
        if shape is None:
            return None
        axes = [axis for axis, dim in enumerate(shape) if isinstance(dim, str) and dim in self.extent_of]
        return axes[0] if len(axes) == 1 else None

    def _decide(self, node: ir.Node, reads: list[tuple[int, ir.Value]]) -> None:
        first = reads[0][1]
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise _refusal(node, first, "holds a subgraph")
        if any(out.is_graph_output() for out in node.outputs) and not (
            node.op_type == "Concat" and node.domain in _STANDARD
        ):
            raise _refusal(node, first, "makes a graph output other than the present cache")
        standard = node.domain in _STANDARD
        axis = self.axis_of[first.name]
        extent = self.extent_of[str(self._dim(first, axis))]
        if standard and node.op_type == "Shape":
            self._shapes.append((node, axis, extent))
            return
        if standard and node.op_type == "Concat" and self._is_append(node, axis):
            out = node.outputs[0]
            self.axis_of[out.name] = axis
            self.extent_of[str(self._dim(out, axis))] = PRESENT
            self._appends.append(node)
            return
        if standard and node.op_type == "Softmax":
            rank = len(self.state.shapes.get(first.name) or ())
            softmax_axis = node.attributes.get("axis")
            along = (softmax_axis.as_int() if softmax_axis is not None else -1) % rank
            if along == axis:
                self.axis_of[node.outputs[0].name] = axis
                self._softmaxes.append((node, axis))
                return
        self._by_rule(node, reads)

    def _is_append(self, node: ir.Node, axis: int) -> bool:
        """Concat(past, new) along the cache's tokens: the present."""
        concat_axis = node.attributes.get("axis")
        if concat_axis is None or len(node.inputs) != 2:
            return False
        past, new = node.inputs
        rank = len(self.state.shapes.get(node.outputs[0].name) or ())
        return (
            past is not None and past.name in self.axis_of and new is not None and new.name not in self.axis_of
            and rank > 0 and concat_axis.as_int() % rank == axis
        )

    def _by_rule(self, node: ir.Node, reads: list[tuple[int, ir.Value]]) -> None:
        first = reads[0][1]
        rule = lookup(node)
        if rule is None:
            raise _refusal(node, first, "has no sharding rule")
        current: list[Placement | None] = []
        cuts: list[tuple[int, int, str]] = []
        for index, value in enumerate(node.inputs):
            if value is None:
                current.append(None)
            elif value.name in self.axis_of:
                current.append(Shard(self.axis_of[value.name]))
            elif (axis := self._key_axis(value)) is not None:
                # A whole value with the cache's length there (the mask): each rank cuts its own key columns.
                current.append(Shard(axis))
                cuts.append((index, axis, self.extent_of[str(self._dim(value, axis))]))
            else:
                current.append(REPLICATE)
        ctx = RuleContext(tp=self.cp_pass._parts, shapes=self.state.shapes)
        decision = rule(ctx, node, current)
        if decision.inputs != current:
            raise _refusal(node, first, "no sharding rule keeps its split on the cache's tokens")
        partial = False
        for value, placement in zip(node.outputs, decision.outputs, strict=True):
            used = bool(value.uses()) or value.is_graph_output()
            if isinstance(placement, Partial) and placement.op == "sum" and node.op_type == "MatMul":
                partial = True
            elif isinstance(placement, Shard) and self._key_axis(value) == placement.dim:
                self.axis_of[value.name] = placement.dim
            elif used:
                raise _refusal(node, first, f"its rule gives its output {value.name!r} {placement}, not a split "
                               "on the cache's tokens")
        if partial:
            self._partials.append(node)
        if node.op_type in ("Reshape", "Expand") and node.domain in _STANDARD:
            out = node.outputs[0]
            out_axis = self.axis_of[out.name]
            self._targets.append((node, out_axis, self.extent_of[str(self._dim(out, out_axis))]))
        self._cuts.extend((node, index, axis, extent) for index, axis, extent in cuts)

    # -- rewriting ------------------------------------------------------------------------------------

    def rewrite(self, graph: ir.Graph, model: ir.Model) -> None:
        p = self.cp_pass
        p._graph = graph
        lengths = self._lengths_cache()
        for node in self._appends:
            new = node.inputs[1]
            assert new is not None
            axes = p._initializer(p._name("axes"), np.array([self.axis_of[node.outputs[0].name]], dtype=np.int64))
            cut = ir.Node("", "Slice", [new, lengths["a"], lengths["b"], axes], name=p._name("Slice"))
            cut.outputs[0].name = f"{new.name}__cache_rows"
            p._record(cut.outputs[0], new)
            graph.insert_before(node, cut)
            node.replace_input_with(1, cut.outputs[0])
        for node, axis, extent in self._shapes:
            p._whole_shape(graph, node, axis, whole=lengths[f"{extent}_whole"])
        for node, axis, extent in self._targets:
            local = lengths[f"{extent}_local"]
            if node.op_type == "Reshape" and not _attribute(node, "allowzero"):
                local = self._never_zero(local)
            p._chunk_reshape_target(graph, node, axis, whole=lengths[f"{extent}_whole"], local=local)
        renamed: dict[tuple[str, int], str] = {}
        for node, index, axis, extent in self._cuts:
            value = node.inputs[index]
            assert value is not None
            cut_value = self._key_columns(graph, value, axis, extent)
            node.replace_input_with(index, cut_value)
            renamed[(node.name, index)] = cut_value.name
        self.state.redistributions = [
            dataclasses.replace(r, value=renamed[(r.node, r.index)]) if (r.node, r.index) in renamed else r
            for r in self.state.redistributions
        ]
        opset = model.opset_imports.get("", 1)
        for node, axis in self._softmaxes:
            self._log_sum_exp_softmax(graph, node, axis, opset)
        for node in self._partials:
            self._all_reduce_after(graph, node)

    def _lengths(self) -> dict[str, ir.Value]:
        """The step's cache lengths (module docstring), built at the start of the graph: the whole past P from
        the mask's total length, this rank's block [r*B, (r+1)*B) and the new rows [a_r, b_r) it keeps."""
        p, parts = self.cp_pass, self.cp_pass._parts
        tokens = p._lengths_of()
        n, rank = tokens["n"], tokens["rank"]
        block = cache_block(self.max_seq, parts)
        axis = self.axis_of[self._first_past.name]
        local_past = p._int_node("Shape", [self._first_past], start=axis, end=axis + 1)
        mask, mask_axis = self._total_source
        total = p._int_node("Shape", [mask], start=mask_axis, end=mask_axis + 1)
        whole_past = p._int_node("Sub", [self._checked_total(total), n])
        zero = p._initializer(p._name("zero"), np.array([0], dtype=np.int64))
        block_value = p._initializer(p._name("cp_cache_block"), np.array([block], dtype=np.int64))
        start = p._int_node("Mul", [rank, block_value])
        stop = p._int_node("Add", [start, block_value])

        def clamped_row(position: ir.Value) -> ir.Value:  # clamp(position - P, 0, n)
            return p._int_node("Min", [p._int_node("Max", [p._int_node("Sub", [position, whole_past]), zero]), n])

        first_row, stop_row = clamped_row(start), clamped_row(stop)
        local_present = p._int_node("Add", [local_past, p._int_node("Sub", [stop_row, first_row])])
        return {
            "a": first_row,
            "b": stop_row,
            f"{PAST}_whole": whole_past,
            f"{PAST}_local": local_past,
            f"{PAST}_start": start,
            f"{PRESENT}_whole": p._int_node("Add", [whole_past, n]),
            f"{PRESENT}_local": local_present,
            f"{PRESENT}_start": start,  # a run always starts at its block's start: a_r > 0 only when it was empty
        }

    def _checked_total(self, total: ir.Value) -> ir.Value:
        """The step's total length, through a Reshape that fails when it passes max_seq: the tokens past the
        last block would have no rank to hold them. ONNX has no assert op; a Reshape target of -2 is refused
        by any runtime, and the node's name says why (onnxruntime's error names the node)."""
        p = self.cp_pass
        limit = p._initializer(p._name("max_seq"), np.array([self.max_seq], dtype=np.int64))
        refused = p._initializer(p._name("refused"), np.array([-2], dtype=np.int64))
        kept = p._initializer(p._name("kept"), np.array([1], dtype=np.int64))
        over = self._bool(p._int_node("Less", [limit, total]), (1,))
        target = p._int_node("Where", [over, refused, kept])
        name = f"llmir/cp/refuse_total_length_over_max_seq_{self.max_seq}"
        check = ir.Node("", "Reshape", [total, target], name=name)
        p._append_early(check)
        out = check.outputs[0]
        out.name = f"{check.name}/out"
        out.type = ir.TensorType(ir.DataType.INT64)
        return p._record(out, None, (1,))

    def _never_zero(self, length: ir.Value) -> ir.Value:
        """A run's length for a Reshape target, where 0 would mean "copy the input's dim": -1 (infer) when the
        run is empty (a rank holding no tokens of the cache; the other dims are the whole's, not 0)."""
        if length.name not in self._never_zero_values:
            p = self.cp_pass
            zero = p._initializer(p._name("zero"), np.array([0], dtype=np.int64))
            infer = p._initializer(p._name("infer"), np.array([-1], dtype=np.int64))
            empty = self._bool(p._int_node("Equal", [length, zero]), (1,))
            self._never_zero_values[length.name] = p._int_node("Where", [empty, infer, length])
        return self._never_zero_values[length.name]

    def _bool(self, value: ir.Value, shape: tuple[int, ...]) -> ir.Value:
        value.type = ir.TensorType(ir.DataType.BOOL)
        self.state.shapes[value.name] = shape
        return value

    def _key_columns(self, graph: ir.Graph, value: ir.Value, axis: int, extent: str) -> ir.Value:
        """This rank's columns of a whole value along the cache's tokens (the mask's key columns)."""
        key = (value.name, axis, extent)
        if key not in self._cut_values:
            p = self.cp_pass
            lengths = self._lengths_cache()
            start = lengths[f"{extent}_start"]
            stop = p._int_node("Add", [start, lengths[f"{extent}_local"]])
            axes = p._initializer(p._name("axes"), np.array([axis], dtype=np.int64))
            cut = ir.Node("", "Slice", [value, start, stop, axes], name=p._name("Slice"))
            cut.outputs[0].name = f"{value.name}__cache_columns"
            p._after(value, [cut])
            self._cut_values[key] = p._record(cut.outputs[0], value)
        return self._cut_values[key]

    def _lengths_cache(self) -> dict[str, ir.Value]:
        if not self._values:
            self._values = self._lengths()
        return self._values

    def _log_sum_exp_softmax(self, graph: ir.Graph, node: ir.Node, axis: int, opset: int) -> None:
        """Softmax over the split axis: local max and sum, each combined over cp by one AllReduce."""
        p = self.cp_pass
        scores = node.inputs[0]
        assert scores is not None
        out = node.outputs[0]
        group = p.state.mesh.group(0, "cp")
        shape = p.state.shapes.get(scores.name)
        reduced_shape = None if shape is None else tuple(1 if i == axis else d for i, d in enumerate(shape))
        axes = p._initializer(p._name("axes"), np.array([axis], dtype=np.int64))
        made: list[ir.Node] = []

        def add(op: str, inputs: list[ir.Value], reduced: bool = False, **ints: int) -> ir.Value:
            attributes = [ir.AttrInt64(key, val) for key, val in ints.items()]
            made_node = ir.Node("", op, inputs, attributes=attributes, name=p._name(op))
            return take(made_node, reduced)

        def take(made_node: ir.Node, reduced: bool) -> ir.Value:
            made.append(made_node)
            value = made_node.outputs[0]
            value.name = f"{made_node.name}/out"
            p._record(value, scores)
            if reduced:
                p.state.shapes[value.name] = reduced_shape
            return value

        if opset >= 18:
            local_max = add("ReduceMax", [scores, axes], reduced=True, keepdims=1)
        else:
            reduce_max = ir.Node("", "ReduceMax", [scores], attributes=[ir.AttrInt64s("axes", [axis]),
                                 ir.AttrInt64("keepdims", 1)], name=p._name("ReduceMax"))
            local_max = take(reduce_max, True)
        whole_max = take(ops.all_reduce_node(local_max, group, "max", name=p._name("AllReduce")), True)
        exp = add("Exp", [add("Sub", [scores, whole_max])])
        local_sum = add("ReduceSum", [exp, axes], reduced=True, keepdims=1)
        whole_sum = take(ops.all_reduce_node(local_sum, group, "sum", name=p._name("AllReduce")), True)
        probabilities = add("Div", [exp, whole_sum])
        graph.insert_before(node, made)
        name = out.name
        out.replace_all_uses_with(probabilities)
        graph.remove(node, safe=True)
        probabilities.name = name

    def _all_reduce_after(self, graph: ir.Graph, node: ir.Node) -> None:
        """A MatMul contracting the split axis: its Partial(sum) over cp resolved by an AllReduce."""
        p = self.cp_pass
        out = node.outputs[0]
        name = out.name
        uses = list(out.uses())
        reduce = ops.all_reduce_node(out, p.state.mesh.group(0, "cp"), "sum", name=p._name("AllReduce"))
        reduced = reduce.outputs[0]
        for use in uses:
            use.node.replace_input_with(use.idx, reduced)
        out.name = f"{name}__cp_partial"
        p.state.placements[out.name] = p.state.placements.get(name, REPLICATE)
        p.state.shapes[out.name] = p.state.shapes.get(name)
        reduced.name = name
        reduced.type = out.type
        graph.insert_after(node, reduce)


def _attribute(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return 0 if attr is None else attr.as_int()


def declare_cache_run_dims(model: ir.Model, parts: int) -> None:
    """Declare each past KV cache input's token dim a rank's run of the whole past: `ceil(past / parts)`.

    The rank's past is its own run, not the whole past the symbol stands for in the original. The planner
    (plan/shapes.py), which evaluates one rank alone, binds the whole past by the symbol's role and this
    rank's run as that arithmetic; the memory plan evaluates it at past = max_seq: ceil(max_seq / parts) = B,
    the block each cp rank owns (`cache_block`), the most any rank holds."""
    for value in kv_cache_inputs(model):
        shape = value.shape
        if shape is None:
            continue
        axis = kv_length_axis(value)
        dim = shape[axis]
        if isinstance(dim, int) or dim.value is None:
            continue
        dims: list[int | ir.SymbolicDim] = [d if isinstance(d, int) else ir.SymbolicDim(d.value) for d in shape]
        dims[axis] = ir.SymbolicDim(cache_run_dim(str(dim.value), parts))
        value.shape = ir.Shape(dims)
