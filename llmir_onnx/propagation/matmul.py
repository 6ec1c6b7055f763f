"""MatMul and Gemm.

Weight matmuls carry a role chosen by annotate (Megatron layout): a column-parallel weight is split
along its output features (q, k, v, gate, up: output sharded on its last axis), a row-parallel one
along its input features (attention output, down: input sharded on its last axis, output Partial).
Activation-by-activation matmuls (attention scores, attention times values) follow the shards of
their operands: a shared batch/head axis stays sharded, a sharded contraction axis gives Partial.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from llmir_onnx.errors import ShardingError
from llmir_onnx.placement import PARTIAL_SUM, REPLICATE, Partial, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, register, replicated
from llmir_onnx.propagation.registry import MS_DOMAIN, Localizer, ShapeEnvironment, attr_int, define
from llmir_onnx.propagation.tensor_shapes import TensorShape, attr, first_input, matmul_dims, out_dtype, required_int


def _role_decision(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision | None:
    role = ctx.role(node)
    if role is None or role.kind == "replicate":
        return None  # a weight that opens no block (lm_head): the generic rule, which keeps R on R
    a_rank = ctx.rank(node.inputs[0])
    if a_rank is None:
        return None
    transposed_b = node.op_type == "Gemm" and attr_int(node, "transB", 0) == 1
    out_dim = a_rank - 1
    bias: list[Placement | None] = [None] * (len(node.inputs) - 2)
    if role.kind == "column":
        weight = role.column_shard(0 if transposed_b else 1)
        bias = [role.column_shard(0) if v is not None else None for v in node.inputs[2:]]
        return Decision([REPLICATE, weight, *bias], [role.column_shard(out_dim)])
    if role.kind == "row":
        activation = placements[0]
        if isinstance(activation, Shard) and activation.is_replicated_within(ctx.tp):
            # Fewer heads than ranks reach a row-parallel projection: a sum over ranks would double count.
            ctx.require_divisible(node, "num_heads", [activation.parts[0]])
        if not (isinstance(activation, Shard) and activation.dim == a_rank - 1 and not activation.blocks):
            activation = Shard(a_rank - 1)
        weight = Shard(1 if transposed_b else 0)
        # The bias of a row-parallel Gemm is added once: rank 0 holds it, the others zeros.
        bias = [PARTIAL_SUM if v is not None else None for v in node.inputs[2:]]
        return Decision([activation, weight, *bias], [PARTIAL_SUM])
    return None


def _batch_shard(
    ctx: RuleContext, value: ir.Value | None, out_dim: int, out_rank: int, blocks: tuple[int, ...]
) -> Placement:
    rank = ctx.rank(value)
    assert rank is not None
    dim = out_dim - (out_rank - rank)
    shape = ctx.shape(value)
    if dim < 0 or (shape is not None and shape[dim] == 1):
        return REPLICATE
    return Shard(dim, blocks)


@register(["MatMul"])
def matmul_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    decided = _role_decision(ctx, node, placements)
    if decided is not None:
        return decided
    a, b = node.inputs[0], node.inputs[1]
    a_rank, b_rank, out_rank = ctx.rank(a), ctx.rank(b), ctx.rank(node.outputs[0])
    if a_rank is None or b_rank is None or out_rank is None or a_rank < 2 or b_rank < 2:
        return replicated(node)
    pa, pb = placements
    if isinstance(pa, Partial) and pa == PARTIAL_SUM and not isinstance(pb, Shard | Partial):
        return Decision([PARTIAL_SUM, REPLICATE], [PARTIAL_SUM])
    if isinstance(pb, Partial) and pb == PARTIAL_SUM and not isinstance(pa, Shard | Partial):
        return Decision([REPLICATE, PARTIAL_SUM], [PARTIAL_SUM])
    a_shard = pa if isinstance(pa, Shard) else None
    b_shard = pb if isinstance(pb, Shard) else None
    if a_shard is not None:
        if a_shard.dim == a_rank - 1 and a_shard.is_replicated_within(ctx.tp):
            return replicated(node)
        if a_shard.dim == a_rank - 1:
            # Contraction axis: b must be split the same way along its rows; the result is a partial sum.
            return Decision([a_shard, Shard(b_rank - 2, a_shard.blocks)], [PARTIAL_SUM])
        if a_shard.dim == a_rank - 2:
            return Decision([a_shard, REPLICATE], [Shard(out_rank - 2, a_shard.blocks)])
        out_dim = a_shard.dim + out_rank - a_rank
        return Decision([a_shard, _batch_shard(ctx, b, out_dim, out_rank, a_shard.blocks)], [a_shard.with_dim(out_dim)])
    if b_shard is not None:
        if b_shard.dim == b_rank - 1:
            return Decision([REPLICATE, b_shard], [Shard(out_rank - 1, b_shard.blocks)])
        if b_shard.dim == b_rank - 2 and not b_shard.is_replicated_within(ctx.tp):
            return Decision([Shard(a_rank - 1, b_shard.blocks), b_shard], [PARTIAL_SUM])
        out_dim = b_shard.dim + out_rank - b_rank
        return Decision([_batch_shard(ctx, a, out_dim, out_rank, b_shard.blocks), b_shard], [b_shard.with_dim(out_dim)])
    return replicated(node)


@register(["Gemm"])
def gemm_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    decided = _role_decision(ctx, node, placements)
    if decided is not None:
        return decided
    trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
    pa, pb = placements[0], placements[1]
    if isinstance(pa, Shard) and pa.dim == (0 if trans_a else 1):
        bias = [PARTIAL_SUM if v is not None else None for v in node.inputs[2:]]
        return Decision([pa, Shard(1 if trans_b else 0, pa.blocks), *bias], [PARTIAL_SUM])
    if isinstance(pb, Shard) and pb.dim == (0 if trans_b else 1):
        has_c = len(node.inputs) > 2 and node.inputs[2] is not None
        c_shape = ctx.shape(node.inputs[2]) if has_c else None
        c_req: list[Placement | None] = []
        if has_c:
            last_is_broadcast = c_shape is not None and (len(c_shape) == 0 or c_shape[-1] == 1)
            c_req = [REPLICATE if last_is_broadcast else Shard((len(c_shape) if c_shape else 1) - 1, pb.blocks)]
        return Decision([REPLICATE, pb, *c_req], [Shard(1, pb.blocks)])
    return replicated(node)


def matmul_nbits_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first = first_input(inputs)
    return [TensorShape((*first.shape[:-1], required_int(node, "N")), first.dtype)]


def localize_matmul_nbits(localizer: Localizer, graph: ir.Graph, node: ir.Node) -> None:
    """N (column-parallel) or K (row-parallel) becomes this rank's part: the attributes size the kernel."""
    role = localizer.role(node)
    placement = localizer.placement(node.inputs[1])
    if role is None or not isinstance(placement, Shard):
        return
    name = "N" if role.kind == "column" else "K"
    if placement.shares:
        raise ShardingError(
            f"node {node.name} (MatMulNBits) would be split unevenly ({placement}); quantized weights take "
            f"an even split only: use a tp that divides the heads and its {name}={node.attributes[name].as_int()}"
        )
    if role.kind == "row":
        _localize_packed_zero_points(localizer, node, placement)
    node.attributes[name] = ir.AttrInt64(name, node.attributes[name].as_int() // localizer.tp)


def _packed_zero_points(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The zero points and their bits when packed below a byte (uint8, 2 or 4 bits): several blocks a byte."""
    zero_points = node.inputs[3] if len(node.inputs) > 3 else None
    bits = attr_int(node, "bits", 4)
    if zero_points is None or zero_points.dtype != ir.DataType.UINT8 or bits >= 8:
        return None
    return zero_points, bits


def _localize_packed_zero_points(localizer: Localizer, node: ir.Node, blocks: Shard) -> None:
    """A rank's K blocks that start or end inside a byte of packed zero points get their own re-packed copy."""
    packed = _packed_zero_points(node)
    if packed is None:
        return
    zero_points, bits = packed
    k_blocks = -(-attr_int(node, "K", 0) // attr_int(node, "block_size", 0))
    tp = localizer.tp
    if (k_blocks // tp * bits) % 8 == 0:
        return  # every rank's blocks fill whole bytes: the plain slice of the bytes is right
    if 8 % bits:
        raise ShardingError(
            f"node {node.name} (MatMulNBits) has {bits}-bit zero points, which a rank's {k_blocks // tp} K blocks "
            f"split inside a byte; use a tp that gives each rank a multiple of {8 // math.gcd(bits, 8)} blocks"
        )

    def ranges(tp_rank: int) -> list[tuple[int, int]]:
        return blocks.local_ranges(k_blocks, tp, tp_rank)

    localizer.hold_packed_elements(zero_points, attr_int(node, "N", 0), bits, ranges)


@register(["MatMulNBits"], domain=MS_DOMAIN, shape=matmul_nbits_shape, localize=localize_matmul_nbits)
def matmul_nbits_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    """Block-quantized weights: B [N, k_blocks, blob], scales and zero points per (N, k_block).

    Column-parallel splits N (rows of every quantized input); row-parallel splits the k blocks, so
    K / tp must be a whole number of quantization blocks. Packed zero points (2 or 4 bits) whose bytes a
    rank's blocks share with another's are re-packed per rank by localize.
    """
    role = ctx.role(node)
    if role is None or role.kind not in ("column", "row") or (len(node.inputs) > 4 and node.inputs[4] is not None):
        return replicated(node)  # act-order (g_idx) weights are not split
    n, k, block_size = attr_int(node, "N", 0), attr_int(node, "K", 0), attr_int(node, "block_size", 0)
    k_blocks = -(-k // block_size)
    a_rank = ctx.rank(node.inputs[0]) or 2
    views: dict[int, tuple[int, ...]] = {}
    required: list[Placement | None] = []
    for index, value in enumerate(node.inputs):
        if value is None:
            required.append(None)
            continue
        shape = ctx.shape(value) or ()
        if index == 0:
            required.append(REPLICATE if role.kind == "column" else Shard(a_rank - 1))
        elif index == 5:  # bias [N]
            required.append(Shard(0) if role.kind == "column" else PARTIAL_SUM)
        elif role.kind == "column":
            if len(shape) == 1 and index in (2, 3):
                views[index] = (n, -1)
            required.append(Shard(0))
        else:
            if len(shape) == 1 and index in (2, 3):
                views[index] = (n, -1)
            required.append(Shard(1))
    if role.kind == "row":
        ctx.require_divisible(node, f"the number of K blocks (K={k}, block_size {block_size})", [k_blocks])
        packed = _packed_zero_points(node)
        if packed is not None and (8 % packed[1] != 0 or packed[0].const_value is None):
            # Zero points of a width that does not tile a byte, or computed at run time, cannot be re-packed
            # per rank (localize does that for 2 and 4 bits): a rank's blocks must fill whole bytes of a row.
            bits = packed[1]
            row_bytes = -(-k_blocks * bits // 8)
            what = f"the packed zero-point bytes per row ({bits}-bit, K={k}, block_size {block_size})"
            ctx.require_divisible(node, what, [row_bytes])
    outputs: list[Placement] = [Shard(a_rank - 1)] if role.kind == "column" else [PARTIAL_SUM]
    return Decision(required, outputs, weight_views=views)


# --------------------------------------------------------------------------- shape functions


def matmul_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """MatMul, MatMulInteger (its int32 output type is declared) and FusedMatMul (transA / transB)."""
    first, b = first_input(inputs), inputs[1]
    assert b is not None
    a_shape, b_shape = first.shape, b.shape
    if node.op_type == "FusedMatMul":
        if attr(node, "transA", 0):
            a_shape = (*a_shape[:-2], a_shape[-1], a_shape[-2])
        if attr(node, "transB", 0):
            b_shape = (*b_shape[:-2], b_shape[-1], b_shape[-2])
    return [TensorShape(matmul_dims(a_shape, b_shape), out_dtype(node, 0, first.dtype))]


def gemm_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    first, b = first_input(inputs), inputs[1]
    assert b is not None
    m = first.shape[1] if attr(node, "transA", 0) else first.shape[0]
    n = b.shape[0] if attr(node, "transB", 0) else b.shape[1]
    return [TensorShape((m, n), first.dtype)]


# FusedMatMul is com.microsoft's; the planner has only ever sized it in the default domain, where no
# exporter writes it (kept as it was: a planner change of its own, with a model to test it on).
define(["MatMul", "MatMulInteger", "FusedMatMul"], shape=matmul_shape)
define(["Gemm"], shape=gemm_shape)
