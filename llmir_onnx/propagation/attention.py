"""Attention ops of onnxruntime's contrib domain and of opset 23, sharded by heads.

Their head counts are attributes; localize divides them by tp. A packed qkv input (GroupQueryAttention
with empty key/value inputs) is a fused shard whose blocks are the q, k and v columns.
"""

from __future__ import annotations

import onnx_ir as ir

from llmir_onnx.errors import ShardingError
from llmir_onnx.placement import REPLICATE, Placement, Shard
from llmir_onnx.propagation.base import Decision, RuleContext, register, replicated
from llmir_onnx.propagation.registry import (
    MS_DOMAIN,
    LocalizeFunction,
    Localizer,
    ShapeEnvironment,
    attr_int,
)
from llmir_onnx.propagation.tensor_shapes import TensorShape, first_input, required_int, same_as_first

# opset 23 brought Attention to the default domain.
ONNX_ATTENTION_OPSETS = range(23, 1 << 16)


def gqa_packed_blocks(ctx: RuleContext, node: ir.Node) -> tuple[int, ...] | None:
    """Global [q | k | v] column widths of a packed GroupQueryAttention query input."""
    width = ctx.static_dim(node.inputs[0], -1) if ctx.rank(node.inputs[0]) else None
    heads, kv_heads = attr_int(node, "num_heads", 0), attr_int(node, "kv_num_heads", 0)
    if width is None or not heads or not kv_heads:
        return None
    head_dim = width // (heads + 2 * kv_heads)
    return (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)


def _check_heads(ctx: RuleContext, node: ir.Node, names: tuple[str, ...]) -> None:
    for name in names:
        count = attr_int(node, name, 0)
        if count:
            ctx.require_divisible(node, name, [count], replicable=name == "kv_num_heads")


def kv_parts(tp: int, kv_heads: int) -> tuple[int, ...]:
    """Parts of the kv-head axis: () for tp-way, (kv_heads,) when the kv heads are fewer than the ranks."""
    return (kv_heads,) if kv_heads and kv_heads % tp and tp % kv_heads == 0 else ()


def local_heads(*names: str) -> LocalizeFunction:
    """The rewrite of head-count attributes `names` to this rank's count, once the heads are split."""

    def rewrite(localizer: Localizer, graph: ir.Graph, node: ir.Node) -> None:
        if not any(isinstance(localizer.placement(v), Shard) for v in node.inputs if v is not None):
            return
        for name in names:
            count = attr_int(node, name, 0)
            if count > 0:
                node.attributes[name] = ir.AttrInt64(name, localizer.local_head_count(count))

    return rewrite


def gqa_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """output [batch, seq, heads * head_dim]; present key / value [batch, kv_heads, total, head_dim]."""
    first = first_input(inputs)
    num_heads = required_int(node, "num_heads")
    kv_heads = required_int(node, "kv_num_heads")
    batch, seq = first.shape[0], first.shape[1]
    key = inputs[1]
    # separate key input, or q|k|v packed in the first input
    packed_width = num_heads + 2 * kv_heads
    head_dim = key.shape[-1] // kv_heads if key is not None else first.shape[-1] // packed_width
    past = inputs[3]
    total = env.total_tokens if past is None else max(past.shape[2], env.total_tokens)
    present = TensorShape((batch, kv_heads, total, head_dim), first.dtype)
    return [TensorShape((batch, seq, num_heads * head_dim), first.dtype), present, present]


@register(["GroupQueryAttention"], domain=MS_DOMAIN, shape=gqa_shape, localize=local_heads("num_heads", "kv_num_heads"))
def gqa_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    _check_heads(ctx, node, ("num_heads", "kv_num_heads"))
    packed = len(node.inputs) < 2 or node.inputs[1] is None
    query = placements[0]
    if not isinstance(query, Shard):
        return replicated(node)
    if packed:
        blocks = gqa_packed_blocks(ctx, node)
        if blocks is None or query.blocks != blocks:
            return replicated(node)
    kv = kv_parts(ctx.tp, attr_int(node, "kv_num_heads", 0))
    if packed and query.parts != ((ctx.tp, *kv, *kv) if kv else ()):
        # A rank would read kv heads that are not those of its query heads: a model that cannot run.
        raise ShardingError(
            f"node {node.name} (GroupQueryAttention) gets its packed q|k|v split as {query}, which does not "
            f"give each rank the kv heads of its query heads at --tp {ctx.tp}; use a tp that divides kv_num_heads"
        )
    required: list[Placement | None] = []
    for index, value in enumerate(node.inputs):
        if value is None:
            required.append(None)
        elif index == 0:
            required.append(query)
        elif index in (1, 2):
            required.append(Shard(2, (), kv))
        elif index in (3, 4):
            required.append(Shard(1, (), kv))  # past key / value: [batch, kv_heads, past, head_dim]
        else:
            required.append(REPLICATE)  # seqlens_k, total_sequence_length, cos/sin caches, ...
    outputs: list[Placement] = [Shard(2), Shard(1, (), kv), Shard(1, (), kv)]
    return Decision(required, outputs[: len(node.outputs)])


@register(["RotaryEmbedding"], domain=MS_DOMAIN, shape=same_as_first, localize=local_heads("num_heads"))
@register(["RotaryEmbedding"], shape=same_as_first, localize=local_heads("num_heads"))
def rotary_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    shard = placements[0]
    rank = ctx.rank(node.inputs[0])
    if not isinstance(shard, Shard) or rank is None:
        return replicated(node)
    heads = attr_int(node, "num_heads", 0)
    if rank == 3 and (not heads or shard.dim != 2 or shard.blocks):
        return replicated(node)  # [batch, seq, heads * head_dim] without a head count: cannot localize
    if rank == 4 and shard.dim not in (0, 1):
        return replicated(node)  # [batch, heads, seq, head_dim]: only batch and heads may be split
    heads = attr_int(node, "num_heads", 0)
    if heads:
        ctx.require_divisible(node, "num_heads", [heads], replicable=bool(shard.parts))
    return Decision([shard, *[REPLICATE if v is not None else None for v in node.inputs[1:]]], [shard])


def _heads_axis(rank: int | None) -> int | None:
    """Heads axis of an attention operand: [batch, heads, seq, head_dim] or [batch, seq, heads*head_dim]."""
    return {4: 1, 3: 2}.get(rank or 0)


def onnx_attention_shape(env: ShapeEnvironment, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
    """Q/K/V as [B, H, S, hd] or [B, S, H*hd]; past/present K, V [B, kv, T, hd]; qk [B, H, S, T]."""
    q, k, v = inputs[0], inputs[1], inputs[2]
    assert q is not None and k is not None and v is not None
    past_key = inputs[4] if len(inputs) > 4 else None
    if len(q.shape) == 4:
        batch, heads, seq = q.shape[0], q.shape[1], q.shape[2]
        kv_heads, kv_seq, v_dim = v.shape[1], k.shape[2], v.shape[3]
        key_dim = k.shape[3]
        y = TensorShape((batch, heads, seq, v_dim), q.dtype)
    else:
        heads = required_int(node, "q_num_heads")
        kv_heads = required_int(node, "kv_num_heads")
        batch, seq, kv_seq = q.shape[0], q.shape[1], k.shape[1]
        key_dim, v_dim = k.shape[2] // kv_heads, v.shape[2] // kv_heads
        y = TensorShape((batch, seq, heads * v_dim), q.dtype)
    total = kv_seq + (past_key.shape[2] if past_key is not None else 0)
    outs = [
        y,
        TensorShape((batch, kv_heads, total, key_dim), k.dtype),
        TensorShape((batch, kv_heads, total, v_dim), v.dtype),
        TensorShape((batch, heads, seq, total), q.dtype),
    ]
    return outs[: len(node.outputs)]


@register(
    ["Attention"],
    opsets=ONNX_ATTENTION_OPSETS,
    shape=onnx_attention_shape,
    localize=local_heads("num_heads", "q_num_heads", "kv_num_heads"),
)
def onnx_attention_rule(ctx: RuleContext, node: ir.Node, placements: list[Placement | None]) -> Decision:
    """opset-23 Attention(Q, K, V, attn_mask, past_key, past_value) -> (Y, present_key, present_value, qk)."""
    query = placements[0]
    q_axis = _heads_axis(ctx.rank(node.inputs[0]))
    if not isinstance(query, Shard) or q_axis is None or query.dim != q_axis or query.blocks:
        return replicated(node)
    _check_heads(ctx, node, ("q_num_heads", "kv_num_heads"))
    key = placements[1]
    kv = key.parts if isinstance(key, Shard) else ()
    required: list[Placement | None] = []
    for index, value in enumerate(node.inputs):
        if value is None:
            required.append(None)
        elif index in (0, 1, 2):
            axis = _heads_axis(ctx.rank(value))
            if axis is None:
                return replicated(node)
            required.append(Shard(axis, (), kv if index else ()))
        elif index == 3:
            shape = ctx.shape(value)
            # The mask broadcasts to [batch, q_heads, q_seq, kv_seq]: split its head axis when it has one.
            per_head = shape is not None and len(shape) == 4 and shape[1] != 1
            required.append(Shard(1) if per_head else REPLICATE)
        elif index in (4, 5):
            required.append(Shard(1, (), kv))
        else:
            required.append(REPLICATE)
    y_axis = _heads_axis(ctx.rank(node.outputs[0])) or q_axis
    outputs: list[Placement] = [Shard(y_axis), Shard(1, (), kv), Shard(1, (), kv), Shard(1)]
    return Decision(required, outputs[: len(node.outputs)])
