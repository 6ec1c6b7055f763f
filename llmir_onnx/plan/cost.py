"""Cost model: FLOPs, bytes moved and communication bytes per node, and time estimates per rank.

Per node, at concrete sizes (see `llmir_onnx.plan.shapes`):

- `flops`: MatMul / Gemm 2·M·N·K (times the broadcast batch); elementwise ops one per output element
  (exp/sigmoid/erf/tanh/softmax and the normalizations a few more, see FLOPS_PER_ELEMENT); reductions
  one per input element; data movement (Gather, Transpose, Concat, Slice, Expand, ...) none.
- `bytes`: every input read once plus every output written once (weights included, which is what makes
  decode memory-bound); Reshape / Squeeze / Unsqueeze / Identity / Flatten / Shape / Size / Constant move
  nothing (onnxruntime aliases or folds them); a Gather reads only the rows it returns.
- `comm_bytes`: the payload of an ai.llmir op (AllReduce/ReduceScatter/Send: its input, AllGather/Recv:
  its output).

Time of a node on a `DeviceProfile` (roofline + alpha-beta):

    compute  = flops / (peak_flops[dtype] * compute_efficiency)
    memory   = dram bytes / (memory_bandwidth * memory_efficiency)
               + cached bytes / (cache_bandwidth * memory_efficiency)
               + sum over weights w of a MatMul / Gemm: w / weight_bytes_per_second(w)   (`memory_seconds`)
    node     = max(compute, memory) + node_overhead
    run      = sum of its nodes + run_overhead   (once per run: the runtime's state back into cold caches)
    comm     = steps * latency + factor * comm_bytes / bandwidth,  factor = 2(n-1)/n for AllReduce,
               (n-1)/n for AllGather / ReduceScatter (n = group size), 1 for Send / Recv; an AllGather
               of unequal parts (`sizes`) 1 - min(sizes)/sum(sizes): the member with the smallest part
               receives the most, and the gather ends when it has

Which bytes are cached (`memory_seconds`; a profile without a cache, `cache_bytes` 0, charges every byte at
the memory bandwidth, the model before the cache existed). A node's bytes are one entry per value it reads
or writes. An *activation*, a value that a node of this graph writes and another node of it reads (not a
graph input, output or initializer), is charged at the cache bandwidth when it is at most CACHE_FRACTION of
the last-level cache, at the memory bandwidth otherwise. Everything else is charged at the memory bandwidth:
weights (initializers) are read once per run, and by the next run every other weight has streamed through
the cache (a 1B model's are GBs); graph inputs (the past KV cache, the token ids) come from the previous
run or the caller; graph outputs (logits, present KV) leave the run and are written back. Why: a value one
node writes and the next reads, a few MB at most in a prefill, is still in the cache when it is read; the
DRAM bandwidth, measured on weights streaming through a matrix-vector product, over-charges it (the bench's
prefill was over-predicted by 1.2-1.3x, docs/BENCHMARKS.md). What it ignores: the reuse distance (a value
read long after it was written, with weights streaming through in between, e.g. the residual around a
layer's attention, may have been evicted; it is charged as cached if it fits); the other tensors that share
the cache at that moment beyond the one CACHE_FRACTION allows for; other processes using the cache (a
shared L3); caches above the last level (L1 / L2 of a CPU); partial fits (a value just over the bound is
charged wholly at the memory bandwidth; a Gather's rows read from an activation are tested by their own
size); the cache effect on weights small enough to stay cached between
runs (a tiny model's decode). The split does not change `bytes`, only the time of them.

Weights of a matrix product (an initializer input of MatMul / FusedMatMul / Gemm / MatMulNBits:
`NodeCost.weight_bytes`) are charged at the profile's `weight_bytes_per_second` of their own size: a
matrix-vector product of a small weight streams it slower than the large one the memory bandwidth is
measured on (docs/BENCHMARKS.md, "Why decode is predicted too fast"). A profile without `weight_bandwidth`
charges them at the memory bandwidth, as before.

`run_overhead` (`estimate_time`, and the layout search per rank and phase) is charged once per run, not per
node: the start of a run refetches the runtime's code and per-run state that other work evicted between two
runs, a fixed cost whatever the node count. `node_overhead` is calibrated back to back (warm): a decode
step of a small rank graph (one layer and the lm_head: 85 nodes run) measured 1.8 x its back-to-back time
when the caches were emptied before it (docs/BENCHMARKS.md, "A rank's decode step starts cold").

The link of a collective is the device's own (`link_bandwidth`, `link_latency`: NVLink inside a host)
unless a `link_of` says otherwise (a cluster's `group_link`: the slowest link the group spans, and how
many hosts it spans). Inside one host steps = 1; across h hosts a collective pays the inter-host
alpha once per step of a tree over the hosts (NCCL's choice for small messages): 2 ceil(log2 h) for
AllReduce (reduce up, broadcast down), ceil(log2 h) for AllGather / ReduceScatter, 1 for Send / Recv.

Prefill (max_batch x max_seq new tokens) and decode (max_batch x 1 token after max_seq - 1) are
estimated separately; decode throughput is max_batch / decode step time.

`annotate_costs` is the one function here that writes into a model: it sets the metadata_props
`llmir.flops`, `llmir.bytes`, `llmir.comm_bytes` of every node (nothing else), and only when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import onnx_ir as ir

from llmir_onnx.model_facts import layer_of_node_by_name
from llmir_onnx.plan.devices import DeviceProfile, LinkProfile
from llmir_onnx.plan.memory import phase_sizes
from llmir_onnx.plan.shapes import (
    LLMIR_DOMAIN,
    NodeSignatures,
    ShapeEvaluator,
    ShapeReference,
    Sizes,
    TensorShape,
    evaluate_shapes,
    taken_results,
)

META_FLOPS = "llmir.flops"
META_BYTES = "llmir.bytes"
META_COMM_BYTES = "llmir.comm_bytes"

# Ops whose outputs alias their input or are folded at session creation: no data moves.
FREE_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Shape", "Size", "Constant"})
DATA_MOVEMENT_OPS = frozenset(
    {"Gather", "GatherElements", "Transpose", "Concat", "Slice", "Split", "Expand", "Tile", "Pad", "Cast",
     "ConstantOfShape", "Range", "Where", "Send", "Recv", "AllGather"}
)  # fmt: skip
FLOPS_PER_ELEMENT = {
    "Exp": 4, "Log": 4, "Sigmoid": 4, "Tanh": 4, "Erf": 4, "Gelu": 8, "FastGelu": 8, "QuickGelu": 5,
    "Softmax": 5, "LogSoftmax": 5, "Sqrt": 1, "Pow": 1, "Div": 1, "Sin": 4, "Cos": 4,
    "LayerNormalization": 8, "SimplifiedLayerNormalization": 5, "RMSNormalization": 5,
    "SkipSimplifiedLayerNormalization": 6, "SkipLayerNormalization": 9, "RotaryEmbedding": 3,
}  # fmt: skip
# An activation is charged at the cache bandwidth when it is at most this fraction of the last-level cache:
# an elementwise node holds its input and its output, each about the size of the value, in the cache at
# once, so a value up to half of it fits beside the other one.
CACHE_FRACTION = 0.5
# The link an ai.llmir node runs over and how many hosts its group spans (None: the device's own link).
LinkOf = Callable[[ir.Node], "tuple[LinkProfile, int] | None"]


@dataclass(frozen=True)
class NodeCost:
    name: str
    op_type: str
    domain: str
    flops: int
    bytes: int
    comm_bytes: int
    dtype: str
    group_size: int
    layer: int | None
    # An AllGather of unequal parts: each member's length along the axis (its `sizes`); () otherwise.
    gather_sizes: tuple[int, ...] = ()
    # The part of `bytes` that are activations (values a node of the graph writes and another reads), one
    # entry per value read or written: what `memory_seconds` may charge at the cache bandwidth.
    activation_bytes: tuple[int, ...] = ()
    # The part of `bytes` that are a matrix product's weights (its initializer inputs), one entry per
    # weight: what `memory_seconds` charges at the profile's rate for that size.
    weight_bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TimeEstimate:
    """Predicted time of one phase on one rank, and its parts (seconds)."""

    phase: str
    batch: int
    seq: int
    past: int
    flops: int
    bytes: int
    comm_bytes: int
    compute_s: float
    memory_s: float
    roofline_s: float
    overhead_s: float
    comm_s: float
    total_s: float
    nodes: int


@dataclass(frozen=True)
class PhaseEstimates:
    device: str
    prefill: TimeEstimate
    decode: TimeEstimate
    decode_tokens_per_s: float


def _bytes_of(values: Iterable[ir.Value | None], shapes: Mapping[str, TensorShape]) -> int:
    return sum(shapes[v.name].nbytes for v in values if v is not None and v.name and v.name in shapes)


def is_activation(value: ir.Value) -> bool:
    """A value that a node of its graph writes and that does not leave the graph (not a graph input,
    output or initializer): what may stay in the cache between the node that writes it and the one that
    reads it."""
    return value.producer() is not None and not value.is_graph_output()


def _activation_bytes(values: Iterable[ir.Value | None], shapes: Mapping[str, TensorShape]) -> tuple[int, ...]:
    return tuple(
        shapes[v.name].nbytes
        for v in values
        if v is not None and v.name and v.name in shapes and is_activation(v) and shapes[v.name].nbytes
    )


# Matrix products: an initializer input of one is a weight streamed through it (`weight_bytes`).
MATRIX_PRODUCT_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "MatMulNBits"})


def _weight_bytes(node: ir.Node, shapes: Mapping[str, TensorShape]) -> tuple[int, ...]:
    """The bytes of each initializer input of a matrix product (none for other ops)."""
    if node.op_type not in MATRIX_PRODUCT_OPS or (node.domain or "") == LLMIR_DOMAIN:
        return ()
    return tuple(
        shapes[v.name].nbytes
        for v in node.inputs
        if v is not None and v.name and v.name in shapes and v.is_initializer() and shapes[v.name].nbytes
    )


def _compute_dtype(node: ir.Node, shapes: Mapping[str, TensorShape]) -> str:
    for value in (*node.inputs, *node.outputs):
        shape = shapes.get(value.name) if value is not None and value.name is not None else None
        if shape is not None and shape.dtype.is_floating_point():
            return shape.dtype.name.lower()
    return "float32"


def node_cost(node: ir.Node, shapes: Mapping[str, TensorShape]) -> NodeCost:
    """FLOPs, bytes moved and communication bytes of one node at the evaluated shapes."""
    op = node.op_type
    domain = node.domain or ""
    outputs = [shapes[o.name] for o in node.outputs if o.name and o.name in shapes]
    inputs = [shapes.get(v.name) if v is not None and v.name is not None else None for v in node.inputs]
    out_numel = sum(o.numel for o in outputs[:1])
    flops = 0
    moved = _bytes_of(node.inputs, shapes) + _bytes_of(node.outputs, shapes)
    activations = _activation_bytes(node.inputs, shapes) + _activation_bytes(node.outputs, shapes)
    comm = 0
    group = 1
    gather_sizes: tuple[int, ...] = ()
    if domain == LLMIR_DOMAIN:
        sizes_attr = node.attributes.get("sizes") if op == "AllGather" else None
        if sizes_attr is not None:
            gather_sizes = tuple(int(s) for s in sizes_attr.value)
        group_attr = node.attributes.get("group")
        group = len(group_attr.value) if group_attr is not None and group_attr.value else 1
        if op in ("AllReduce", "ReduceScatter", "Send"):
            comm = _bytes_of(node.inputs[:1], shapes)
        else:  # AllGather, Recv
            comm = _bytes_of(node.outputs[:1], shapes)
        if op == "AllReduce":
            flops = out_numel * (group - 1)
    elif op in FREE_OPS:
        moved = 0
        activations = ()
    elif op in ("MatMul", "FusedMatMul", "MatMulNBits") and inputs[0] is not None:
        k = inputs[0].shape[-1]
        flops = 2 * out_numel * k
    elif op == "Gemm" and inputs[0] is not None:
        transposed = node.attributes.get("transA")
        k = inputs[0].shape[0] if transposed is not None and transposed.value else inputs[0].shape[1]
        flops = 2 * out_numel * k + (out_numel if len(node.inputs) > 2 else 0)
    elif op == "Gather" and outputs:
        moved = 2 * outputs[0].nbytes + (inputs[1].nbytes if inputs[1] is not None else 0)
        # the rows it reads (as many bytes as it writes) are cached when its data is an activation
        data = node.inputs[0]
        rows = (outputs[0].nbytes,) if data is not None and is_activation(data) and outputs[0].nbytes else ()
        activations = rows + _activation_bytes(node.inputs[1:2], shapes) + _activation_bytes(node.outputs[:1], shapes)
    elif op == "GroupQueryAttention" and inputs[0] is not None:
        heads = int(node.attributes["num_heads"].value)
        batch, seq = inputs[0].shape[0], inputs[0].shape[1]
        present = outputs[1]
        head_dim, total = present.shape[3], present.shape[2]
        flops = 4 * batch * heads * seq * total * head_dim + 5 * batch * heads * seq * total
    elif op == "Attention" and domain in ("", "ai.onnx") and len(outputs) > 1:
        present = outputs[1]  # [B, kv, T, hd]
        y = outputs[0]
        batch, total, head_dim = present.shape[0], present.shape[2], present.shape[3]
        heads_x_seq = y.numel // (batch * (y.shape[-1] if len(y.shape) == 4 else head_dim))
        # QK^T and PV: 2 x 2 x B x H x S x T x hd, softmax about 5 per score
        flops = 4 * batch * heads_x_seq * total * head_dim + 5 * batch * heads_x_seq * total
    elif op.startswith("Reduce") and inputs[0] is not None:
        flops = inputs[0].numel
    elif op in DATA_MOVEMENT_OPS:
        flops = 0
    else:
        flops = out_numel * FLOPS_PER_ELEMENT.get(op, 1)
    return NodeCost(
        name=node.name or op,
        op_type=op,
        domain=domain,
        flops=int(flops),
        bytes=int(moved),
        comm_bytes=int(comm),
        dtype=_compute_dtype(node, shapes),
        group_size=group,
        layer=layer_of_node_by_name(node),
        gather_sizes=gather_sizes,
        activation_bytes=activations,
        weight_bytes=_weight_bytes(node, shapes),
    )


# Where a `ShapeReference` keeps the node costs of its model (`node_time_function`), by first output name.
NODE_COSTS = "node_cost"


def node_costs(model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None = None) -> list[NodeCost]:
    shapes = evaluate_shapes(model, sizes, overrides)
    # A node taken from a reference evaluation (a stage's node of the whole model) costs what it cost there.
    taken = taken_results(model, sizes, overrides, NODE_COSTS)
    return [cast(NodeCost, taken[id(node)]) if id(node) in taken else node_cost(node, shapes) for node in model.graph]


def annotate_costs(model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None = None) -> list[NodeCost]:
    """Write llmir.flops / llmir.bytes / llmir.comm_bytes into every node's metadata_props, in place."""
    costs = node_costs(model, sizes, overrides)
    for node, cost in zip(model.graph, costs, strict=True):
        node.metadata_props[META_FLOPS] = str(cost.flops)
        node.metadata_props[META_BYTES] = str(cost.bytes)
        node.metadata_props[META_COMM_BYTES] = str(cost.comm_bytes)
    return costs


def comm_seconds(
    op_type: str,
    payload: float,
    group: int,
    link: DeviceProfile | LinkProfile,
    hosts: int = 1,
    gather_sizes: tuple[int, ...] = (),
) -> float:
    """Alpha-beta time of one ai.llmir op moving `payload` bytes among `group` ranks spanning `hosts`
    hosts over `link` (a device profile: its own intra-host link); `gather_sizes`: an AllGather's
    unequal parts (its `sizes`)."""
    if isinstance(link, DeviceProfile):
        link = link.intra_host_link
    if payload <= 0:
        return 0.0
    if op_type == "AllReduce":
        factor = 2 * (group - 1) / group if group > 1 else 0.0
    elif op_type == "AllGather" and gather_sizes and sum(gather_sizes) > 0:
        factor = 1 - min(gather_sizes) / sum(gather_sizes) if group > 1 else 0.0
    elif op_type in ("AllGather", "ReduceScatter"):
        factor = (group - 1) / group if group > 1 else 0.0
    else:  # Send / Recv
        factor = 1.0
    if factor == 0.0:
        return 0.0
    if op_type in ("Send", "Recv") or hosts <= 1:
        steps = 1
    else:
        steps = math.ceil(math.log2(hosts)) * (2 if op_type == "AllReduce" else 1)
    return steps * link.latency + factor * payload / link.bandwidth


def memory_seconds(
    moved: float, activation_bytes: Iterable[float], device: DeviceProfile, weight_bytes: Iterable[float] = ()
) -> float:
    """Seconds to move a node's `moved` bytes, of which `activation_bytes` (one entry per value) are
    activations: each at most CACHE_FRACTION x the device's last-level cache at the cache bandwidth; and
    `weight_bytes` (one entry per weight of a matrix product) each at the device's rate for a weight of its
    size (`weight_bytes_per_second`); the rest of `moved` at the memory bandwidth (module docstring: why,
    and what it ignores). A device without a cache (`cache_bytes` 0) and without `weight_bandwidth`
    charges everything at the memory bandwidth."""
    if not moved:
        return 0.0
    seconds = 0.0
    if device.weight_bandwidth:
        for size in weight_bytes:
            seconds += size / device.weight_bytes_per_second(size)
            moved -= size
    if not device.cache_bytes:
        return seconds + moved / device.bytes_per_second
    fits = CACHE_FRACTION * device.cache_bytes
    cached = sum(size for size in activation_bytes if size <= fits)
    return seconds + (moved - cached) / device.bytes_per_second + cached / device.cache_bytes_per_second


def node_seconds(
    cost: NodeCost, device: DeviceProfile, link: tuple[LinkProfile, int] | None = None
) -> tuple[float, float, float]:
    """(compute, memory, communication) seconds of one node; the node's time is max of the first two + overhead."""
    compute = cost.flops / device.flops_per_second(cost.dtype) if cost.flops else 0.0
    memory = memory_seconds(cost.bytes, cost.activation_bytes, device, cost.weight_bytes)
    comm = 0.0
    if cost.domain == LLMIR_DOMAIN:
        over, hosts = link if link is not None else (device.intra_host_link, 1)
        comm = comm_seconds(cost.op_type, cost.comm_bytes, cost.group_size, over, hosts, cost.gather_sizes)
    return compute, memory, comm


def estimate_time(
    costs: Iterable[NodeCost],
    device: DeviceProfile,
    phase: str,
    sizes: Sizes,
    links: Iterable[tuple[LinkProfile, int] | None] | None = None,
) -> TimeEstimate:
    """Sum of the nodes' times and the run's own overhead; `links`, parallel to `costs`, the link of each
    (None: the device's)."""
    flops = moved = comm_bytes = nodes = 0
    compute_s = memory_s = roofline_s = comm_s = 0.0
    overhead_s = device.run_overhead
    costs = list(costs)
    node_links = list(links) if links is not None else [None] * len(costs)
    for cost, link in zip(costs, node_links, strict=True):
        compute, memory, comm = node_seconds(cost, device, link)
        flops += cost.flops
        moved += cost.bytes
        comm_bytes += cost.comm_bytes
        compute_s += compute
        memory_s += memory
        roofline_s += max(compute, memory)
        comm_s += comm
        if cost.op_type not in FREE_OPS:
            overhead_s += device.node_overhead
        nodes += 1
    return TimeEstimate(
        phase=phase,
        batch=sizes.batch,
        seq=sizes.seq,
        past=sizes.past,
        flops=flops,
        bytes=moved,
        comm_bytes=comm_bytes,
        compute_s=compute_s,
        memory_s=memory_s,
        roofline_s=roofline_s,
        overhead_s=overhead_s,
        comm_s=comm_s,
        total_s=roofline_s + overhead_s + comm_s,
        nodes=nodes,
    )


def estimate_phases(
    model: ir.Model,
    device: DeviceProfile,
    max_batch: int,
    max_seq: int,
    overrides: Mapping[str, int] | None = None,
    link_of: LinkOf | None = None,
) -> PhaseEstimates:
    """Predicted prefill and decode time of one model (one rank) on `device` (its links: `link_of`)."""
    links = [link_of(node) for node in model.graph] if link_of is not None else None
    estimates = {
        phase: estimate_time(node_costs(model, sizes, overrides), device, phase, sizes, links)
        for phase, sizes in phase_sizes(max_batch, max_seq).items()
    }
    decode = estimates["decode"]
    return PhaseEstimates(
        device=device.name,
        prefill=estimates["prefill"],
        decode=decode,
        decode_tokens_per_s=max_batch / decode.total_s if decode.total_s > 0 else float("inf"),
    )


def node_time_function(
    model: ir.Model,
    device: DeviceProfile,
    max_batch: int,
    max_seq: int,
    overrides: Mapping[str, int] | None = None,
    link_of: LinkOf | None = None,
    references: list[ShapeReference] | None = None,
) -> Callable[[ir.Node], float]:
    """Predicted prefill + decode seconds of each node of `model`, as a callable on its nodes.

    Meant as the per-node cost of pipeline stage balancing (`plan.stage_balance`): the shapes are
    evaluated once per phase here, so calling it per node is a dictionary lookup. Nodes of another
    model raise KeyError. With `references`, each phase's evaluation and node costs are appended to it as a
    `ShapeReference`, for the analyses of the stages cut from `model` (`shared_shape_evaluations`).
    """
    seconds: dict[int, float] = {}
    signatures = NodeSignatures()  # one graph evaluated at two sizes: each node's signature once
    for sizes in phase_sizes(max_batch, max_seq).values():
        evaluator = (
            ShapeEvaluator(model, sizes, overrides, record=True, signatures=signatures)
            if references is not None
            else None
        )
        shapes = evaluator.run() if evaluator is not None else evaluate_shapes(model, sizes, overrides)
        costs: dict[str, NodeCost] = {}
        for node in model.graph:
            cost = node_cost(node, shapes)
            if evaluator is not None and node.outputs and node.outputs[0].name:
                costs[node.outputs[0].name] = cost
            link = link_of(node) if link_of is not None and cost.domain == LLMIR_DOMAIN else None
            compute, memory, comm = node_seconds(cost, device, link)
            overhead = 0.0 if cost.op_type in FREE_OPS else device.node_overhead
            seconds[id(node)] = seconds.get(id(node), 0.0) + max(compute, memory) + comm + overhead
        if evaluator is not None and references is not None:
            references.append(evaluator.reference({NODE_COSTS: costs}))

    def time_of(node: ir.Node) -> float:
        return seconds[id(node)]

    return time_of
