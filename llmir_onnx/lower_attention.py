"""Lower fused attention into standard ONNX ops, for context parallelism (`--cp C > 1`): com.microsoft
GroupQueryAttention (onnxruntime-genai exports), and ONNX Attention with RotaryEmbedding (torch dynamo at
opset 23; `lower_onnx_attention`, at the end of this module). What follows is GroupQueryAttention's.

Why. The fused op takes its queries as the last tokens of the sequence (its causal mask and rotary positions
come from `seqlens_k`, not from the queries), so a cp rank's chunk of the queries cannot be fed to it
(passes/context_parallel.py). Written out as the ops a torch export uses (rotary on q and k, Concat with the
past, the KV heads repeated, scores, mask, Softmax, @ V), the attention is what the cp pass already splits:
the projections and the query side run on each rank's chunk, the Concat with the past reads the gathered new
keys/values, the mask and positions stay whole and are cut to the rank's rows, and --cp-kv-cache sharded finds
its Concat, repeat, scores, Softmax and P@V by the same sharding rules. Run only when cp > 1 (partition.py):
a plan without cp keeps the fused op, byte for byte.

What it computes, as onnxruntime's CPU kernel does (contrib_ops/cpu/bert/group_query_attention.cc and
gqa_attention_base.h), with S new tokens, seqlens_k[b] + 1 the valid length of row b, total the
total_sequence_length input, and "first prompt" meaning S == total:
- q, k, v: the packed [q | k | v] query (key and value absent) split into N*H, Nkv*H, Nkv*H columns, or the
  three inputs; each reshaped to heads and transposed to BNSH.
- positions (rotary, do_rotary=1): first prompt: s (right-padded rows too: onnxruntime 1.32 rotates its
  padding rows at s; older kernels used 1 there, which only changes the cache rows of padding tokens); after
  it: seqlens_k[b] + 1 - S + s. cos/sin are gathered from the caches at those positions; rotary_interleaved
  rotates pairs (x[2i], x[2i+1]), otherwise the halves of the first 2 * cos_cache.shape[1] dims (a partial
  rotary leaves the rest).
- present_key/present_value = Concat(past, new) along the sequence, BNSH: what the kernel writes when every
  row's past is the whole past buffer (seqlens_k[b] + 1 == total on every row after the first prompt, and
  past_sequence_length + S == total). The kernel writes a right-padded row's new tokens at its own
  seqlens_k instead, and with past_present_share_buffer (past and present bound to one max-length buffer)
  in place. Neither is reproduced: the lowered graph refuses a padded batch after the first prompt at run
  time, by a Gather out of range named `<node>/lowered/refuse_padded_rows_after_prompt` (ONNX has no assert);
  a max-length shared buffer is a runtime binding, not something a graph can see, and this project's
  runtimes feed each past as the past tokens only.
- scores = q @ K^T * scale (scale 0: 1/sqrt(H)), K and V with each KV head repeated N / Nkv times; key j is
  visible to row s of batch b when j <= min(row position, seqlens_k[b]) (the row position as above, s on
  the first prompt), else the dtype's lowest value is added; Softmax over the keys; @ V; back to [B, S, N*H].
  Rows past seqlens_k on the first prompt (right padding) attend to the row's valid keys, as the kernel's
  do (checked against onnxruntime 1.32, tests/test_lower_attention.py).

Also, before a node is lowered: the genai builder's per-head q/k norm (Qwen3: Reshape to [B, S*N, H], norm over
H, Reshape back) is moved to [B, S, N, H], the same arithmetic with the token axis kept, so that cp splits
the q/k path instead of gathering it (`_keep_tokens_through_head_norm`).

Refused (one line naming the node, the attribute and the fix): softcap, local_window_size, smooth_softmax,
qk_output, or any other attribute not at its default; the optional inputs past cos/sin (position_ids,
attention_bias, head_sink); a GroupQueryAttention inside a subgraph is left for the cp pass to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llmir_onnx.errors import PlanError

MS_DOMAIN = "com.microsoft"
_MIN_OPSET = 13  # Split, Unsqueeze and ReduceMax as written here (inputs for split sizes and axes)

# Attributes the lowering takes whatever their value, and those it takes only at their default.
_HANDLED = frozenset({"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved"})
_DEFAULTS: dict[str, float] = {"softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0, "qk_output": 0}
# Inputs (by index) past query .. sin_cache: position_ids, attention_bias, head_sink in newer onnxruntimes.
_LAST_HANDLED_INPUT = 8
_INPUT_NAMES = {9: "position_ids", 10: "attention_bias", 11: "head_sink"}


def _refusal(node: ir.Node, what: str) -> PlanError:
    return PlanError(
        f"--cp cannot lower node {node.name} (GroupQueryAttention) into standard ops: {what}; use --cp 1"
    )


def lower_group_query_attention(model: ir.Model) -> int:
    """Replace every top-level com.microsoft GroupQueryAttention of `model` by standard ops (module
    docstring); returns how many. Raises PlanError, naming the node, for what the lowering does not take."""
    graph = model.graph
    nodes = [node for node in graph if node.domain == MS_DOMAIN and node.op_type == "GroupQueryAttention"]
    if not nodes:
        return 0
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < _MIN_OPSET:
        raise _refusal(nodes[0], f"the model's ONNX opset is {opset}, the lowering needs {_MIN_OPSET} or more")
    lowerings = [_Lowering(graph, node) for node in nodes]  # every node's attributes checked before any change
    for lowering in lowerings:
        for index in (0, 1):  # query, key
            value = lowering.node.inputs[index] if len(lowering.node.inputs) > index else None
            if value is not None:
                _keep_tokens_through_head_norm(graph, value)
        lowering.run()
    return len(nodes)


_NORMS = frozenset({"SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization"})


def _keep_tokens_through_head_norm(graph: ir.Graph, value: ir.Value) -> None:
    """The genai builder's per-head q/k norm (Qwen3) reshapes [B, S, N*H] to [B, S*N, H] for the norm and
    back: tokens and heads in one axis, which no token split survives, so cp would gather q and k before it.
    The same norm on [B, S, N, H] (target [0, 0, -1, H]) is the same arithmetic (it normalizes the last axis)
    and keeps the token axis; the Reshape back ([0, -1, N*H]) gives [B, S, N*H] from either. Rewritten only
    for that exact chain, the first Reshape read by the norm alone."""
    back = value.producer()
    if back is None or back.op_type != "Reshape" or back.domain not in ("", "ai.onnx"):
        return
    normed = back.inputs[0]
    norm = normed.producer() if normed is not None else None
    if normed is None or norm is None or norm.op_type not in _NORMS or len(normed.uses()) != 1:
        return
    axis = norm.attributes.get("axis")
    if axis is not None and axis.as_int() != -1:
        return
    heads_flat = norm.inputs[0]
    split = heads_flat.producer() if heads_flat is not None else None
    if heads_flat is None or split is None or split.op_type != "Reshape" or split.domain not in ("", "ai.onnx"):
        return
    if len(split.inputs) < 2 or len(heads_flat.uses()) != 1:
        return
    source, target = split.inputs[0], split.inputs[1]
    split_target = ir.convenience.get_const_tensor(target) if target is not None else None
    back_target = ir.convenience.get_const_tensor(back.inputs[1]) if back.inputs[1] is not None else None
    if split_target is None or back_target is None or source is None:
        return
    first, second = split_target.numpy().tolist(), back_target.numpy().tolist()
    if len(first) != 3 or first[:2] != [0, -1] or len(second) != 3 or second[:2] != [0, -1]:
        return
    if source.shape is not None and len(source.shape) != 3:
        return
    head_size = int(first[2])
    name = f"{split.name}/target_keeping_tokens"
    kept = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
    kept.const_value = ir.tensor(np.array([0, 0, -1, head_size], dtype=np.int64), name=name)
    graph.register_initializer(kept)
    split.replace_input_with(1, kept)
    for out in (split.outputs[0], norm.outputs[0]):
        out.shape = None  # now [B, S, N, H]; annotate infers it again


@dataclass(frozen=True)
class _Attributes:
    num_heads: int
    kv_num_heads: int
    scale: float
    do_rotary: bool
    interleaved: bool


def _attributes(node: ir.Node) -> _Attributes:
    for name, attr in node.attributes.items():
        if name in _HANDLED:
            continue
        default = _DEFAULTS.get(name)
        value = attr.value
        if default is None or value != default:
            raise _refusal(node, f"attribute {name}={value!r} is not supported (only its default"
                           f"{'' if default is None else f' {default!r}'})")
    for index, value in enumerate(node.inputs):
        if index > _LAST_HANDLED_INPUT and value is not None:
            raise _refusal(node, f"input {index} ({_INPUT_NAMES.get(index, 'optional')}) {value.name!r} is not "
                           "supported")

    def integer(name: str, default: int | None = None) -> int:
        attr = node.attributes.get(name)
        if attr is None:
            if default is None:
                raise _refusal(node, f"it has no {name} attribute")
            return default
        return attr.as_int()

    scale = node.attributes.get("scale")
    heads, kv_heads = integer("num_heads"), integer("kv_num_heads")
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise _refusal(node, f"num_heads={heads} is not a positive multiple of kv_num_heads={kv_heads}")
    return _Attributes(heads, kv_heads, scale.as_float() if scale is not None else 0.0,
                       integer("do_rotary", 0) == 1, integer("rotary_interleaved", 0) == 1)


class _Builder:
    """Standard ops replacing one fused node, built before it (`_replace` swaps them in and removes it)."""

    def __init__(self, graph: ir.Graph, node: ir.Node) -> None:
        self.graph, self.node = graph, node
        self.prefix = f"{node.name}/lowered"
        self.made: list[ir.Node] = []
        self.ints: dict[tuple[str, tuple[int, ...], tuple[int, ...]], ir.Value] = {}
        self.dtype = ir.DataType.FLOAT

    def _op(self, op_type: str, inputs: list[ir.Value], what: str, **attributes: int | float | list[int]) -> ir.Value:
        return self._ops(op_type, inputs, what, 1, **attributes)[0]

    def _ops(self, op_type: str, inputs: list[ir.Value], what: str, outputs: int,
             **attributes: int | float | list[int]) -> list[ir.Value]:
        name = f"{self.prefix}/{what}"
        attrs: list[ir.Attr] = []
        for key, val in attributes.items():
            if isinstance(val, list):
                attrs.append(ir.AttrInt64s(key, val))
            elif isinstance(val, float):
                attrs.append(ir.AttrFloat32(key, val))
            else:
                attrs.append(ir.AttrInt64(key, val))
        made = ir.Node("", op_type, inputs, attributes=attrs, name=name, num_outputs=outputs)
        for index, out in enumerate(made.outputs):
            out.name = f"{name}/output_{index}"
        self.made.append(made)
        return list(made.outputs)

    def _const(self, what: str, array: np.ndarray) -> ir.Value:
        name = f"{self.prefix}/{what}"
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(array.shape))
        value.const_value = ir.tensor(array, name=name)
        self.graph.register_initializer(value)
        return value

    def _ints(self, what: str, values: list[int] | int) -> ir.Value:
        """An int64 initializer, made once per name (the same axis or shape serves several nodes)."""
        array = np.array(values, dtype=np.int64)
        key = (what, array.shape, tuple(array.ravel().tolist()))
        if key not in self.ints:
            self.ints[key] = self._const(what, array)
        return self.ints[key]

    def _np_dtype(self) -> np.dtype:
        return self.dtype.numpy()

    def _rotary(self, x: ir.Value, cos: ir.Value, sin: ir.Value, rotary_dim: int, head_size: int | None,
                name: str, interleaved: bool) -> ir.Value:
        """x [B, heads, S, H] rotated by cos/sin [B, 1, S, rotary_dim / 2] on its first rotary_dim dims (H None:
        not known, the dims past rotary_dim are kept whatever their number)."""
        axis3 = self._ints(f"{name}_axis_3", [3])
        rotated, rest = x, None
        if head_size is None or rotary_dim < head_size:
            rotated = self._op("Slice", [x, self._ints(f"{name}_start", [0]), self._ints(f"{name}_rot", [rotary_dim]),
                                         axis3], f"{name}_rot")
            end = head_size if head_size is not None else np.iinfo(np.int64).max
            rest = self._op("Slice", [x, self._ints(f"{name}_rot_end", [rotary_dim]),
                                      self._ints(f"{name}_end", [end]), axis3], f"{name}_pass")
        half = rotary_dim // 2
        if interleaved:
            pairs = self._op("Reshape", [rotated, self._ints(f"{name}_pairs_shape", [0, 0, 0, -1, 2])],
                             f"{name}_pairs")
            even, odd = self._ops("Split", [pairs, self._ints(f"{name}_pair_split", [1, 1])], f"{name}_even_odd", 2,
                                  axis=-1)
            last = self._ints(f"{name}_axis_last", [-1])
            cos5 = self._op("Unsqueeze", [cos, last], f"{name}_cos_pairs")
            sin5 = self._op("Unsqueeze", [sin, last], f"{name}_sin_pairs")
            new_even = self._op("Sub", [self._op("Mul", [even, cos5], f"{name}_even_cos"),
                                        self._op("Mul", [odd, sin5], f"{name}_odd_sin")], f"{name}_new_even")
            new_odd = self._op("Add", [self._op("Mul", [odd, cos5], f"{name}_odd_cos"),
                                       self._op("Mul", [even, sin5], f"{name}_even_sin")], f"{name}_new_odd")
            joined = self._op("Concat", [new_even, new_odd], f"{name}_pairs_rotated", axis=-1)
            out = self._op("Reshape", [joined, self._ints(f"{name}_unpair_shape", [0, 0, 0, -1])], f"{name}_rotated")
        else:
            first = self._op("Slice", [rotated, self._ints(f"{name}_h0", [0]), self._ints(f"{name}_h1", [half]),
                                       axis3], f"{name}_first_half")
            second = self._op("Slice", [rotated, self._ints(f"{name}_h2", [half]),
                                        self._ints(f"{name}_h3", [rotary_dim]), axis3], f"{name}_second_half")
            rotate_half = self._op("Concat", [self._op("Neg", [second], f"{name}_neg"), first], f"{name}_rotate_half",
                                   axis=-1)
            cos_full = self._op("Concat", [cos, cos], f"{name}_cos_full", axis=-1)
            sin_full = self._op("Concat", [sin, sin], f"{name}_sin_full", axis=-1)
            out = self._op("Add", [self._op("Mul", [rotated, cos_full], f"{name}_cos_part"),
                                   self._op("Mul", [rotate_half, sin_full], f"{name}_sin_part")], f"{name}_rotated")
        if rest is not None:
            out = self._op("Concat", [out, rest], f"{name}_with_pass", axis=-1)
        return out

    def _replace(self, new_outputs: list[ir.Value]) -> None:
        """Insert the made nodes before the fused node and give its outputs' readers (and graph outputs, by
        name) the new values."""
        node, graph = self.node, self.graph
        for made in self.made:
            made.metadata_props.update(node.metadata_props)  # its scope: the layer, where the name does not say
        graph.insert_before(node, self.made)
        for old, new in zip(node.outputs, new_outputs[: len(node.outputs)], strict=True):  # presents are optional
            if old.is_graph_output():
                index = next(i for i, out in enumerate(graph.outputs) if out is old)
                name, shape, type_ = old.name, old.shape, old.type
                old.name = f"{name}__fused"
                new.name, new.shape, new.type = name, shape, type_
                graph.outputs[index] = new
            elif new.shape is None and new.type is None:
                new.shape, new.type = old.shape, old.type  # the same tensor: what a later lowering reads
            old.replace_all_uses_with(new)
        graph.remove(node, safe=True)


class _Lowering(_Builder):
    """GroupQueryAttention in standard ops (module docstring)."""

    def __init__(self, graph: ir.Graph, node: ir.Node) -> None:
        super().__init__(graph, node)
        self.attrs = _attributes(node)

    def run(self) -> None:
        node, attrs = self.node, self.attrs
        inputs = list(node.inputs) + [None] * (9 - len(node.inputs))
        query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache = inputs[:9]
        if query is None or seqlens_k is None or total_length is None:
            raise _refusal(node, "its query, seqlens_k or total_sequence_length input is missing")
        if (key is None) != (value is None) or (past_key is None) != (past_value is None):
            raise _refusal(node, "key and value (and past_key and past_value) must be both given or both absent")
        if attrs.do_rotary and (cos_cache is None or sin_cache is None):
            raise _refusal(node, "do_rotary=1 without cos_cache and sin_cache")
        dtype = next((v.dtype for v in (query, past_key, cos_cache) if v is not None and v.dtype is not None), None)
        if dtype is None:
            raise _refusal(node, "the element type of its query is not known")
        self.dtype = dtype
        head_size = self._head_size(query, key, past_key)
        heads, kv_heads = attrs.num_heads, attrs.kv_num_heads

        if key is None or value is None:
            widths = self._ints("qkv_widths", [heads * head_size, kv_heads * head_size, kv_heads * head_size])
            q, k, v = self._ops("Split", [query, widths], "split_packed_qkv", 3, axis=-1)
        else:
            q, k, v = query, key, value
        to_heads = self._ints("heads_shape", [0, 0, -1, head_size])
        q, k, v = (
            self._op("Transpose", [self._op("Reshape", [x, to_heads], f"{n}_heads")], f"{n}_bnsh", perm=[0, 2, 1, 3])
            for x, n in ((q, "q"), (k, "k"), (v, "v"))
        )

        positions, row_end = self._positions(query, seqlens_k, total_length)
        if attrs.do_rotary:
            assert cos_cache is not None and sin_cache is not None
            rotary_dim = self._rotary_dim(cos_cache, head_size)
            cos = self._op("Unsqueeze", [self._op("Gather", [cos_cache, positions], "cos"), self._ints("axis_1", [1])],
                           "cos_bnsh")
            sin = self._op("Unsqueeze", [self._op("Gather", [sin_cache, positions], "sin"), self._ints("axis_1", [1])],
                           "sin_bnsh")
            q = self._rotary(q, cos, sin, rotary_dim, head_size, "q", attrs.interleaved)
            k = self._rotary(k, cos, sin, rotary_dim, head_size, "k", attrs.interleaved)

        present_key = self._op("Concat", [past_key, k], "present_key", axis=2) if past_key is not None else k
        present_value = self._op("Concat", [past_value, v], "present_value", axis=2) if past_value is not None else v
        keys = self._repeat_kv(present_key, "key")
        values = self._repeat_kv(present_value, "value")

        scores = self._op("MatMul", [q, self._op("Transpose", [keys], "key_t", perm=[0, 1, 3, 2])], "scores")
        scale = attrs.scale if attrs.scale != 0.0 else 1.0 / float(np.sqrt(head_size))
        scores = self._op("Mul", [scores, self._const("scale", np.array(scale, dtype=self._np_dtype()))], "scaled")
        scores = self._op("Add", [scores, self._mask(present_key, row_end)], "masked")
        probs = self._op("Softmax", [scores], "softmax", axis=-1)
        attended = self._op("MatMul", [probs, values], "attended")
        merged = self._op("Transpose", [attended], "bsnh", perm=[0, 2, 1, 3])
        output = self._op("Reshape", [merged, self._ints("merged_shape", [0, 0, -1])], "output")

        self._replace([output, present_key, present_value])

    def _head_size(self, query: ir.Value, key: ir.Value | None, past_key: ir.Value | None) -> int:
        """H: the past cache's last dim, or the query's width over its heads."""
        if past_key is not None and past_key.shape is not None and len(past_key.shape) == 4:
            dim = past_key.shape[3]
            if isinstance(dim, int):
                return dim
        width = query.shape[-1] if query.shape is not None and len(query.shape) == 3 else None
        if isinstance(width, int):
            heads = self.attrs.num_heads + (2 * self.attrs.kv_num_heads if key is None else 0)
            return width // heads
        raise _refusal(self.node, "its head size is not known (no static past_key or query width)")

    def _rotary_dim(self, cos_cache: ir.Value, head_size: int) -> int:
        shape = cos_cache.shape
        half = shape[1] if shape is not None and len(shape) == 2 else None
        if not isinstance(half, int) or not 0 < 2 * half <= head_size:
            raise _refusal(self.node, f"cos_cache {cos_cache.name!r} has shape {shape}, not [positions, <= H/2]")
        return 2 * half

    def _positions(self, query: ir.Value, seqlens_k: ir.Value, total_length: ir.Value) -> tuple[ir.Value, ir.Value]:
        """The rotary positions [B, S] and each row's last visible key [B, S] (module docstring), from seqlens_k
        and total_sequence_length as the kernel derives them; refuses a padded batch after the first prompt."""
        shape = self._op("Shape", [query], "query_shape")
        new = self._op("Gather", [shape, self._ints("token_axis", 1)], "new_tokens", axis=0)
        zero, one = self._ints("zero", 0), self._ints("one", 1)
        steps = self._op("Range", [zero, new, one], "steps")  # s = 0 .. S-1
        # total_sequence_length is a scalar or a 1-element tensor: both broadcast alike below (a Reshape to a
        # scalar would stop onnxruntime's symbolic shape inference, which annotate needs for the token axes).
        total = self._op("Cast", [total_length], "total", to=int(ir.DataType.INT64))
        first = self._op("Equal", [new, total], "first_prompt")
        valid = self._op("Cast", [seqlens_k], "seqlens_i64", to=int(ir.DataType.INT64))
        # After the first prompt every row's past must be the whole past (Concat writes there): else refuse.
        padded = self._op("Not", [self._op("Equal", [self._op("Add", [valid, one], "lengths"), total], "full_rows")],
                          "padded_rows")
        any_padded = self._op("Cast", [self._op("ReduceMax", [self._op("Cast", [padded], "padded_i64",
                                                                        to=int(ir.DataType.INT64))],
                                                "any_padded_i64", keepdims=1)], "any_padded", to=int(ir.DataType.BOOL))
        refused = self._op("And", [self._op("Not", [first], "after_prompt"), any_padded], "refused")
        # ONNX has no assert: a Gather of [0] at index 1 fails in any runtime, naming the node; at index 0 it adds
        # 0. (Not a Reshape to -2: its target would be data the planner cannot evaluate.)
        index = self._op("Where", [refused, self._ints("refuse", [1]), self._ints("keep", [0])], "check_index")
        checked = ir.Node("", "Gather", [self._ints("no_padding", [0]), index], attributes=[ir.AttrInt64("axis", 0)],
                          name=f"{self.prefix}/refuse_padded_rows_after_prompt")
        checked.outputs[0].name = f"{checked.name}/output_0"
        self.made.append(checked)
        valid = self._op("Add", [valid, checked.outputs[0]], "seqlens_checked")
        last = self._op("Unsqueeze", [valid, self._ints("axis_1", [1])], "last_key")  # [B, 1]
        later = self._op("Add", [self._op("Sub", [self._op("Add", [last, one], "valid_length"), new], "past_length"),
                                 steps], "later_positions")
        positions = self._op("Where", [first, steps, later], "positions")
        row_end = self._op("Where", [first, self._op("Min", [steps, last], "first_row_end"), later], "row_end")
        return positions, row_end

    def _repeat_kv(self, present: ir.Value, name: str) -> ir.Value:
        """[B, Nkv, T, H] -> [B, Nkv * rep, T, H], each KV head rep times in a row (torch's repeat_kv: Unsqueeze,
        Expand, Reshape, the dims read off the value so that a tp slice of the heads repeats alike)."""
        rep = self.attrs.num_heads // self.attrs.kv_num_heads
        if rep == 1:
            return present
        shape = self._op("Shape", [present], f"{name}_shape")
        dims = [self._op("Gather", [shape, self._ints(f"{name}_dim{i}", [i])], f"{name}_dim{i}", axis=0)
                for i in range(4)]
        repeats = self._ints(f"{name}_repeats", [rep])
        expanded = self._op("Expand", [
            self._op("Unsqueeze", [present, self._ints(f"{name}_axis_2", [2])], f"{name}_unsqueezed"),
            self._op("Concat", [dims[0], dims[1], repeats, dims[2], dims[3]], f"{name}_expand_shape", axis=0),
        ], f"{name}_expanded")
        heads = self._op("Mul", [dims[1], repeats], f"{name}_heads")
        target = self._op("Concat", [dims[0], heads, dims[2], dims[3]], f"{name}_repeat_shape", axis=0)
        return self._op("Reshape", [expanded, target], f"{name}_repeated")

    def _mask(self, present_key: ir.Value, row_end: ir.Value) -> ir.Value:
        """[B, 1, S, T]: 0 where key j <= the row's last visible key, the dtype's lowest value elsewhere."""
        length = self._op("Gather", [self._op("Shape", [present_key], "present_shape"), self._ints("key_axis", 2)],
                          "key_length", axis=0)
        keys = self._op("Range", [self._ints("key_zero", 0), length, self._ints("key_one", 1)], "key_index")
        end = self._op("Unsqueeze", [row_end, self._ints("axis_last", [-1])], "row_end_column")  # [B, S, 1]
        visible = self._op("LessOrEqual", [keys, end], "visible")  # [B, S, T]
        np_dtype = self._np_dtype()
        lowest = np.array(np.finfo(np_dtype).min, dtype=np_dtype)
        bias = self._op("Where", [visible, self._const("mask_zero", np.array(0, dtype=np_dtype)),
                                  self._const("mask_lowest", lowest)], "mask_bias")
        return self._op("Unsqueeze", [bias, self._ints("axis_1", [1])], "mask")


# -- ONNX Attention and RotaryEmbedding (opset 23), as torch's dynamo exporter writes them ------------------

_STANDARD = ("", "ai.onnx")


def _standard_refusal(node: ir.Node, what: str) -> PlanError:
    return PlanError(f"--cp cannot lower node {node.name} ({node.op_type}) into standard ops: {what}; use --cp 1")


def lower_onnx_attention(model: ir.Model) -> int:
    """Replace every top-level ONNX Attention and RotaryEmbedding (opset 23) by standard ops; returns how many.

    Attention takes its queries as the last tokens too (its causal mask is built for them), and torch's
    dynamo exporter at opset 23 writes the rotary as RotaryEmbedding, which no token-split rule keeps split.
    Lowered: RotaryEmbedding on 4-D [B, N, S, H] input (cos/sin already gathered to [B, S, R/2], or gathered
    here at position_ids), rotate-half or interleaved, a partial rotary_embedding_dim (another is left as it
    is: no last-token op, the cp pass gathers its input as before); Attention on 4-D q, k,
    v with the same head count (the export repeats the KV heads itself), no past inputs (the export joins the
    cache itself), is_causal 0, an optional bool or float mask, scale: Softmax(q @ k^T * scale + mask) @ v.
    Any other Attention (3-D inputs, past inputs, is_causal, softcap, qk_matmul_output, softmax_precision) is
    refused in one line naming node, value and fix."""
    graph = model.graph
    made = 0
    for node in list(graph):
        if node.domain not in _STANDARD:
            continue
        if node.op_type == "RotaryEmbedding":
            made += _RotaryLowering(graph, node).run()
        elif node.op_type == "Attention":
            _AttentionLowering(graph, node).run()
            made += 1
    return made


def _rank_and_dtype(node: ir.Node, value: ir.Value) -> tuple[int, ir.DataType]:
    if value.shape is None or value.dtype is None:
        raise _standard_refusal(node, f"the shape or element type of its input {value.name!r} is not known")
    return len(value.shape), value.dtype


class _RotaryLowering(_Builder):
    def run(self) -> bool:
        """Lowered, or False where it is left as it is: a RotaryEmbedding is no last-token op, the cp pass takes
        it as before (its input gathered, correct, no split) where this does not know its layout."""
        node = self.node
        x, cos_cache, sin_cache = node.inputs[0], node.inputs[1], node.inputs[2]
        positions = node.inputs[3] if len(node.inputs) > 3 else None
        if x is None or cos_cache is None or sin_cache is None or x.shape is None or x.dtype is None:
            return False
        if len(x.shape) != 4:
            return False  # 3-D [batch, tokens, hidden]: its heads would need num_heads
        self.dtype = x.dtype
        attribute = node.attributes.get("rotary_embedding_dim")
        rotary_dim = attribute.as_int() if attribute is not None else 0
        head = x.shape[3]
        head_size = head if isinstance(head, int) else None
        if rotary_dim == 0:
            if head_size is None:
                return False
            rotary_dim = head_size
        interleaved = node.attributes.get("interleaved")
        if positions is not None:
            cos_cache = self._op("Gather", [cos_cache, positions], "cos")
            sin_cache = self._op("Gather", [sin_cache, positions], "sin")
        axis = self._ints("axis_1", [1])
        cos = self._op("Unsqueeze", [cos_cache, axis], "cos_bnsh")
        sin = self._op("Unsqueeze", [sin_cache, axis], "sin_bnsh")
        out = self._rotary(x, cos, sin, rotary_dim, head_size, "x",
                           interleaved is not None and interleaved.as_int() == 1)
        # RotaryEmbedding keeps its input's shape (an Attention lowered after it reads it)
        out.shape, out.type = ir.Shape(x.shape), x.type
        self._replace([out])
        return True


class _AttentionLowering(_Builder):
    def run(self) -> None:
        node = self.node
        inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
        query, key, value, mask = inputs[:4]
        if query is None or key is None or value is None:
            raise _standard_refusal(node, "its q, k or v input is missing")
        for index, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
            given = inputs[index]
            if given is not None:
                raise _standard_refusal(node, f"its {name} input {given.name!r} is not supported")
        for index, out in enumerate(node.outputs[1:], start=1):
            if out.uses() or out.is_graph_output():
                raise _standard_refusal(node, f"its output {index} {out.name!r} is used; only the attention output "
                                        "is lowered")
        for name, attr in node.attributes.items():
            if name in ("scale", "q_num_heads", "kv_num_heads") or (name, attr.value) in (
                ("is_causal", 0), ("softcap", 0.0), ("qk_matmul_output_mode", 0)
            ):
                continue
            raise _standard_refusal(node, f"attribute {name}={attr.value!r} is not supported")
        ranks = [_rank_and_dtype(node, v) for v in (query, key, value)]
        self.dtype = ranks[0][1]
        if any(rank != 4 for rank, _ in ranks):
            raise _standard_refusal(node, "its q, k, v are not all 4-D [batch, heads, tokens, head_size]")
        heads = [v.shape[1] if v.shape is not None else None for v in (query, key, value)]
        if not all(isinstance(h, int) for h in heads) or len(set(heads)) != 1:
            raise _standard_refusal(node, f"q, k, v head counts {heads} are not known and equal")
        head = query.shape[3] if query.shape is not None else None
        scale_attr = node.attributes.get("scale")
        if scale_attr is not None:
            scale = scale_attr.as_float()
        elif isinstance(head, int):
            scale = 1.0 / float(np.sqrt(head))
        else:
            raise _standard_refusal(node, "it has no scale and its head size is not known")
        scores = self._op("MatMul", [query, self._op("Transpose", [key], "key_t", perm=[0, 1, 3, 2])], "scores")
        scores = self._op("Mul", [scores, self._const("scale", np.array(scale, dtype=self._np_dtype()))], "scaled")
        if mask is not None:
            if mask.dtype == ir.DataType.BOOL:
                np_dtype = self._np_dtype()
                mask = self._op("Where", [mask, self._const("mask_zero", np.array(0, dtype=np_dtype)),
                                          self._const("mask_lowest", np.array(np.finfo(np_dtype).min, np_dtype))],
                                "mask_bias")
            scores = self._op("Add", [scores, mask], "masked")
        probs = self._op("Softmax", [scores], "softmax", axis=-1)
        self._replace([self._op("MatMul", [probs, value], "output")])
