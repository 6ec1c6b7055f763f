"""Generate a synthetic LLaMA-shaped decoder ONNX model with random weights in external data.

    python models/make_synthetic.py --out DIR --hidden H --layers L --heads N --kv-heads K \\
        --intermediate I --vocab V [--dtype float16|float32] [--seed S] [--no-weights]
    python models/make_synthetic.py --out DIR --preset llama-7b [--no-weights]
    python models/make_synthetic.py --out DIR --preset tiny

Writes `DIR/model.onnx` (graph only, opset 17, IR 10), `DIR/model.onnx.data` (every initializer,
page aligned) and `DIR/config.json` (LlamaConfig keys).

The graph follows what a torch.onnx legacy (TorchScript) export of `LlamaForCausalLM` with a flat
KV cache contains, so the partitioner meets the same patterns as on a real export:

- inputs `input_ids` / `position_ids` [batch_size, sequence_length] int64, `attention_mask`
  [batch_size, total_sequence_length] int64, `past_key_values.{i}.key|value`
  [batch_size, kv_heads, past_sequence_length, head_dim]; outputs `logits`
  [batch_size, sequence_length, vocab] and `present.{i}.key|value`.
- embedding `Gather`; RMSNorm as Cast(float)/Pow/ReduceMean/Add/Sqrt/Div/Mul/Cast/Mul(weight).
- q/k/v/o/gate/up/down and lm_head as `MatMul` with weights stored [in, out] (as torch exports
  store a Linear's transposed weight).
- head reshapes as `Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)),
  [-1], [head_dim]))`: no literal head count, exactly as FACTS.md records for legacy exports.
- rotary embedding from cos/sin caches [max_position, head_dim] gathered by `position_ids` (the
  transformers < 4.38 export pattern); rotate_half as Slice/Neg/Concat with the half size
  computed as `Div(Gather(Shape(q), 3), 2)`.
- causal + padding mask from Range/LessOrEqual/And/Where, sliced to the key length per layer.
- GQA repeat_kv (only when heads != kv_heads, like transformers) as Unsqueeze/Expand/Reshape
  whose repeated head count is `Mul(Gather(Shape(k), 1), n_rep)`.
- eager attention: MatMul, Mul(scale), Add(mask), Softmax (in float32), MatMul.

Weights are random but well scaled: each element is ±[2^e, 2^(e+1)) with a random sign and
mantissa and `2^e` about 0.7/sqrt(fan_in), made from raw generator bits with two bitwise ops and
streamed to the data file in chunks, so memory stays at one chunk and the cost is disk speed.
`--no-weights` writes the data file as a sparse file of the right size (all zeros, no disk
time): for planning and graph work on models larger than this machine (e.g. the 7B preset).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 10
DATA_FILE_SUFFIX = ".data"
ALIGNMENT = 4096
CHUNK_BYTES = 32 << 20
DIM_BATCH = "batch_size"
DIM_SEQ = "sequence_length"
DIM_PAST = "past_sequence_length"
DIM_TOTAL = "total_sequence_length"
INT64_MAX = 9223372036854775807

DTYPES: dict[str, tuple[int, type[np.generic]]] = {
    "float32": (TensorProto.FLOAT, np.float32),
    "float16": (TensorProto.FLOAT16, np.float16),
}


@dataclass(frozen=True)
class SyntheticConfig:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str = "float16"
    max_position: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seed: int = 0
    # Variants that current families add to the LLaMA layer (all off: plain LLaMA):
    # "head": RMSNorm of q and k over head_dim after the head split (Qwen 3); "all": over all heads, on
    # the projections' outputs (OLMo 2).
    qk_norm: str = ""
    qkv_bias: bool = False  # Qwen 2: q/k/v projections with a bias, exported as Add(bias, MatMul)
    clip_qkv: float = 0.0  # OLMo: q/k/v projections clipped to [-clip, clip]

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads {self.heads} is not a multiple of --kv-heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for the rotary embedding")
        if self.qk_norm not in ("", "head", "all"):
            raise ValueError(f"qk_norm {self.qk_norm!r}: use '', 'head' or 'all'")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {sorted(DTYPES)}")


PRESETS: dict[str, SyntheticConfig] = {
    "llama-7b": SyntheticConfig(
        hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, dtype="float16"
    ),
    "tiny": SyntheticConfig(
        hidden=128, layers=2, heads=8, kv_heads=4, intermediate=256, vocab=512, dtype="float32", max_position=128
    ),
}


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightSpec:
    """One initializer: its name, shape and how its random values are drawn."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "linear" (scale from fan_in), "norm" (positive, about 1) or "rotary_cos"/"rotary_sin"
    fan_in: int = 1


def rotary_caches(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [max_position, head_dim] in float64, as LlamaRotaryEmbedding builds them."""
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    freqs = np.outer(np.arange(config.max_position, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def _bit_pattern(dtype: type[np.generic], exponent: int, keep_sign: bool) -> tuple[int, int, type[np.generic]]:
    """(and-mask, or-bits, unsigned view type) that turn random bits into ±[2^exponent, 2^(exponent+1))."""
    if dtype is np.float32:
        sign, mantissa, bias, shift, view = 0x80000000, 0x007FFFFF, 127, 23, np.uint32
    else:
        sign, mantissa, bias, shift, view = 0x8000, 0x03FF, 15, 10, np.uint16
    and_mask = mantissa | (sign if keep_sign else 0)
    return and_mask, (exponent + bias) << shift, view


def random_chunks(spec: WeightSpec, dtype: type[np.generic], rng: np.random.Generator, chunk_bytes: int):
    """Yield the tensor's bytes in chunks of at most chunk_bytes, never the whole tensor at once."""
    itemsize = np.dtype(dtype).itemsize
    count = math.prod(spec.shape)
    if spec.kind == "linear":
        exponent, keep_sign = math.floor(math.log2(0.7 / math.sqrt(spec.fan_in))), True
    else:  # norm weights: positive, in [0.5, 1)
        exponent, keep_sign = -1, False
    and_mask, or_bits, view = _bit_pattern(dtype, exponent, keep_sign)
    per_chunk = max(1, chunk_bytes // itemsize)
    done = 0
    while done < count:
        n = min(per_chunk, count - done)
        words = rng.bit_generator.random_raw((n * itemsize + 7) // 8)
        bits = words.view(view)[:n]
        np.bitwise_and(bits, view(and_mask), out=bits)
        np.bitwise_or(bits, view(or_bits), out=bits)
        yield bits.tobytes()
        done += n


def weight_specs(config: SyntheticConfig) -> list[WeightSpec]:
    h, hd, i = config.hidden, config.head_dim, config.intermediate
    specs = [WeightSpec("model.embed_tokens.weight", (config.vocab, h), "linear", fan_in=1)]
    specs += [
        WeightSpec("model.rotary_emb.cos_cached", (config.max_position, hd), "rotary_cos"),
        WeightSpec("model.rotary_emb.sin_cached", (config.max_position, hd), "rotary_sin"),
    ]
    for layer in range(config.layers):
        p = f"model.layers.{layer}"
        specs += [
            WeightSpec(f"{p}.input_layernorm.weight", (h,), "norm"),
            WeightSpec(f"{p}.self_attn.q_proj.weight", (h, config.heads * hd), "linear", fan_in=h),
            WeightSpec(f"{p}.self_attn.k_proj.weight", (h, config.kv_heads * hd), "linear", fan_in=h),
            WeightSpec(f"{p}.self_attn.v_proj.weight", (h, config.kv_heads * hd), "linear", fan_in=h),
            WeightSpec(f"{p}.self_attn.o_proj.weight", (config.heads * hd, h), "linear", fan_in=config.heads * hd),
            WeightSpec(f"{p}.post_attention_layernorm.weight", (h,), "norm"),
            WeightSpec(f"{p}.mlp.gate_proj.weight", (h, i), "linear", fan_in=h),
            WeightSpec(f"{p}.mlp.up_proj.weight", (h, i), "linear", fan_in=h),
            WeightSpec(f"{p}.mlp.down_proj.weight", (i, h), "linear", fan_in=i),
        ]
        if config.qkv_bias:
            specs += [
                WeightSpec(f"{p}.self_attn.{name}_proj.bias", (heads * hd,), "linear", fan_in=h)
                for name, heads in (("q", config.heads), ("k", config.kv_heads), ("v", config.kv_heads))
            ]
        if config.qk_norm:
            widths = {"q": hd, "k": hd} if config.qk_norm == "head" else {"q": h, "k": config.kv_heads * hd}
            specs += [WeightSpec(f"{p}.self_attn.{name}_norm.weight", (w,), "norm") for name, w in widths.items()]
    specs += [
        WeightSpec("model.norm.weight", (h,), "norm"),
        WeightSpec("lm_head.weight", (h, config.vocab), "linear", fan_in=h),
    ]
    return specs


def write_weights(
    config: SyntheticConfig, data_path: Path, *, sparse: bool, chunk_bytes: int = CHUNK_BYTES
) -> dict[str, tuple[int, int]]:
    """Write every initializer into data_path; returns name -> (offset, length)."""
    dtype = DTYPES[config.dtype][1]
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(config.seed)
    cos, sin = rotary_caches(config)
    locations: dict[str, tuple[int, int]] = {}
    offset = 0
    with open(data_path, "wb") as stream:
        for spec in weight_specs(config):
            offset = -(-offset // ALIGNMENT) * ALIGNMENT
            length = math.prod(spec.shape) * itemsize
            locations[spec.name] = (offset, length)
            if spec.kind.startswith("rotary"):
                # Real values even with --no-weights: they are small and keep the positions meaningful.
                stream.seek(offset)
                stream.write((cos if spec.kind == "rotary_cos" else sin).astype(dtype).tobytes())
            elif not sparse:
                stream.seek(offset)
                for chunk in random_chunks(spec, dtype, rng, chunk_bytes):
                    stream.write(chunk)
            offset += length
        stream.truncate(offset)
    return locations


# --------------------------------------------------------------------------- graph


class GraphBuilder:
    """Adds nodes named like torch.onnx legacy exports: `<scope>/<Op>[_k]` with outputs `<name>_output_0`."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._counts: dict[tuple[str, str], int] = defaultdict(int)

    def op(self, op_type: str, inputs: list[str], scope: str, **attrs: object) -> str:
        key = (scope, op_type)
        k = self._counts[key]
        self._counts[key] += 1
        name = f"{scope}/{op_type}" + (f"_{k}" if k else "")
        output = f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def op_to(self, op_type: str, inputs: list[str], output: str, scope: str, **attrs: object) -> str:
        """Like op, but writes a given output name (graph outputs such as present.0.key)."""
        key = (scope, op_type)
        k = self._counts[key]
        self._counts[key] += 1
        name = f"{scope}/{op_type}" + (f"_{k}" if k else "")
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def const(self, value: np.ndarray | int | float, scope: str) -> str:
        array = np.asarray(value)
        return self.op("Constant", [], scope, value=onnx.numpy_helper.from_array(array))

    def ints(self, values: list[int], scope: str) -> str:
        return self.const(np.array(values, dtype=np.int64), scope)

    def dim(self, tensor: str, axis: int, scope: str) -> str:
        """A 0-d int64 holding tensor.shape[axis] (Shape -> Gather, as traced by torch)."""
        shape = self.op("Shape", [tensor], scope)
        return self.op("Gather", [shape, self.const(np.int64(axis), scope)], scope, axis=0)

    def unsqueeze0(self, scalar: str, scope: str) -> str:
        return self.op("Unsqueeze", [scalar, self.ints([0], scope)], scope)


def _rms_norm(b: GraphBuilder, x: str, weight: str, scope: str, elem_type: int, eps: float) -> str:
    x32 = b.op("Cast", [x], scope, to=TensorProto.FLOAT)
    squared = b.op("Pow", [x32, b.const(np.float32(2.0), scope)], scope)
    mean = b.op("ReduceMean", [squared], scope, axes=[-1], keepdims=1)
    shifted = b.op("Add", [mean, b.const(np.float32(eps), scope)], scope)
    root = b.op("Sqrt", [shifted], scope)
    inverse = b.op("Div", [b.const(np.float32(1.0), scope), root], scope)
    normed = b.op("Mul", [x32, inverse], scope)
    back = b.op("Cast", [normed], scope, to=elem_type)
    return b.op("Mul", [weight, back], scope)


def _split_heads(b: GraphBuilder, x: str, head_dim: int, batch: str, seq: str, scope: str) -> str:
    """[batch, seq, heads*hd] -> [batch, heads, seq, hd], the head count left to Reshape's -1."""
    target = b.op(
        "Concat",
        [b.unsqueeze0(batch, scope), b.unsqueeze0(seq, scope), b.ints([-1], scope), b.ints([head_dim], scope)],
        scope,
        axis=0,
    )
    reshaped = b.op("Reshape", [x, target], scope)
    return b.op("Transpose", [reshaped], scope, perm=[0, 2, 1, 3])


def _rotate_half(b: GraphBuilder, x: str, scope: str) -> str:
    half = b.op("Div", [b.dim(x, 3, scope), b.const(np.int64(2), scope)], scope)
    half_1d = b.unsqueeze0(half, scope)
    axis = b.ints([3], scope)
    step = b.ints([1], scope)
    first = b.op("Slice", [x, b.ints([0], scope), half_1d, axis, step], scope)
    second = b.op("Slice", [x, half_1d, b.ints([INT64_MAX], scope), axis, step], scope)
    return b.op("Concat", [b.op("Neg", [second], scope), first], scope, axis=-1)


def _apply_rotary(b: GraphBuilder, x: str, cos: str, sin: str, scope: str) -> str:
    return b.op("Add", [b.op("Mul", [x, cos], scope), b.op("Mul", [_rotate_half(b, x, scope), sin], scope)], scope)


def _repeat_kv(b: GraphBuilder, x: str, n_rep: int, scope: str) -> str:
    """transformers' repeat_kv: [b, kv, t, hd] -> [b, kv*n_rep, t, hd] via Unsqueeze/Expand/Reshape."""
    batch, kv, total, hd = (b.dim(x, axis, scope) for axis in range(4))
    expanded_shape = b.op(
        "Concat",
        [
            b.unsqueeze0(batch, scope),
            b.unsqueeze0(kv, scope),
            b.ints([n_rep], scope),
            b.unsqueeze0(total, scope),
            b.unsqueeze0(hd, scope),
        ],
        scope,
        axis=0,
    )
    expanded = b.op("Expand", [b.op("Unsqueeze", [x, b.ints([2], scope)], scope), expanded_shape], scope)
    heads = b.op("Mul", [kv, b.const(np.int64(n_rep), scope)], scope)
    target = b.op(
        "Concat",
        [b.unsqueeze0(batch, scope), b.unsqueeze0(heads, scope), b.unsqueeze0(total, scope), b.unsqueeze0(hd, scope)],
        scope,
        axis=0,
    )
    return b.op("Reshape", [expanded, target], scope)


def _projection(b: GraphBuilder, config: SyntheticConfig, x: str, w: str, scope: str, name: str) -> str:
    out = b.op("MatMul", [x, f"{w}.self_attn.{name}_proj.weight"], f"{scope}/{name}_proj")
    if config.qkv_bias:
        out = b.op("Add", [f"{w}.self_attn.{name}_proj.bias", out], f"{scope}/{name}_proj")
    if config.clip_qkv:
        bound = np.float32(config.clip_qkv).astype(DTYPES[config.dtype][1])
        out = b.op("Clip", [out, b.const(-bound, scope), b.const(bound, scope)], scope)
    return out


def build_graph(config: SyntheticConfig, locations: dict[str, tuple[int, int]], data_name: str) -> onnx.ModelProto:
    elem_type, dtype = DTYPES[config.dtype]
    b = GraphBuilder()
    hd, n_rep = config.head_dim, config.heads // config.kv_heads
    min_value = float(np.finfo(dtype).min)

    initializers = []
    for spec in weight_specs(config):
        tensor = TensorProto(name=spec.name, data_type=elem_type, dims=spec.shape)
        offset, length = locations[spec.name]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        initializers.append(tensor)

    kv_shape = [DIM_BATCH, config.kv_heads, DIM_PAST, hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [DIM_BATCH, DIM_SEQ]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [DIM_BATCH, DIM_TOTAL]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [DIM_BATCH, DIM_SEQ]),
    ]
    outputs = [helper.make_tensor_value_info("logits", elem_type, [DIM_BATCH, DIM_SEQ, config.vocab])]
    for layer in range(config.layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{kind}", elem_type, kv_shape))
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{layer}.{kind}", elem_type, [DIM_BATCH, config.kv_heads, DIM_TOTAL, hd]
                )
            )

    hidden = b.op("Gather", ["model.embed_tokens.weight", "input_ids"], "/model/embed_tokens")

    # Causal + padding mask [batch, 1, seq, total] in the model dtype: 0 where allowed, dtype min elsewhere.
    scope = "/model"
    past = b.dim("past_key_values.0.key", 2, scope)
    seq = b.dim("input_ids", 1, scope)
    total = b.op("Add", [past, seq], scope)
    one = b.const(np.int64(1), scope)
    query_pos = b.op("Range", [past, total, one], scope)
    key_pos = b.op("Range", [b.const(np.int64(0), scope), total, one], scope)
    causal = b.op("LessOrEqual", [key_pos, b.op("Unsqueeze", [query_pos, b.ints([1], scope)], scope)], scope)
    causal_4d = b.op("Unsqueeze", [causal, b.ints([0, 1], scope)], scope)
    padding = b.op("Cast", ["attention_mask"], scope, to=TensorProto.BOOL)
    padding_4d = b.op("Unsqueeze", [padding, b.ints([1, 2], scope)], scope)
    allowed = b.op("And", [causal_4d, padding_4d], scope)
    mask = b.op("Where", [allowed, b.const(dtype(0.0), scope), b.const(np.array(min_value, dtype=dtype), scope)], scope)

    scope = "/model/rotary_emb"
    cos = b.op("Gather", ["model.rotary_emb.cos_cached", "position_ids"], scope)
    sin = b.op("Gather", ["model.rotary_emb.sin_cached", "position_ids"], scope)
    cos = b.op("Unsqueeze", [cos, b.ints([1], scope)], scope)
    sin = b.op("Unsqueeze", [sin, b.ints([1], scope)], scope)

    scale = np.array(1.0 / math.sqrt(hd), dtype=dtype)
    for layer in range(config.layers):
        p, w = f"/model/layers.{layer}", f"model.layers.{layer}"
        residual = hidden
        normed = _rms_norm(
            b, hidden, f"{w}.input_layernorm.weight", f"{p}/input_layernorm", elem_type, config.rms_norm_eps
        )
        scope = f"{p}/self_attn"
        batch_dim, seq_dim = b.dim(normed, 0, scope), b.dim(normed, 1, scope)
        q, k, v = (_projection(b, config, normed, w, scope, name) for name in ("q", "k", "v"))
        if config.qk_norm == "all":
            q = _rms_norm(b, q, f"{w}.self_attn.q_norm.weight", f"{scope}/q_norm", elem_type, config.rms_norm_eps)
            k = _rms_norm(b, k, f"{w}.self_attn.k_norm.weight", f"{scope}/k_norm", elem_type, config.rms_norm_eps)
        q = _split_heads(b, q, hd, batch_dim, seq_dim, scope)
        k = _split_heads(b, k, hd, batch_dim, seq_dim, scope)
        if config.qk_norm == "head":
            q = _rms_norm(b, q, f"{w}.self_attn.q_norm.weight", f"{scope}/q_norm", elem_type, config.rms_norm_eps)
            k = _rms_norm(b, k, f"{w}.self_attn.k_norm.weight", f"{scope}/k_norm", elem_type, config.rms_norm_eps)
        q = _apply_rotary(b, q, cos, sin, scope)
        k = _apply_rotary(b, k, cos, sin, scope)
        v = _split_heads(b, v, hd, batch_dim, seq_dim, scope)
        k = b.op_to("Concat", [f"past_key_values.{layer}.key", k], f"present.{layer}.key", scope, axis=-2)
        v = b.op_to("Concat", [f"past_key_values.{layer}.value", v], f"present.{layer}.value", scope, axis=-2)
        if n_rep > 1:
            k, v = _repeat_kv(b, k, n_rep, scope), _repeat_kv(b, v, n_rep, scope)
        scores = b.op("MatMul", [q, b.op("Transpose", [k], scope, perm=[0, 1, 3, 2])], scope)
        scores = b.op("Mul", [scores, b.const(scale, scope)], scope)
        key_len = b.unsqueeze0(b.dim(k, 2, scope), scope)
        layer_mask = b.op("Slice", [mask, b.ints([0], scope), key_len, b.ints([3], scope), b.ints([1], scope)], scope)
        scores = b.op("Add", [scores, layer_mask], scope)
        probs = b.op("Softmax", [b.op("Cast", [scores], scope, to=TensorProto.FLOAT)], scope, axis=-1)
        probs = b.op("Cast", [probs], scope, to=elem_type)
        context = b.op("Transpose", [b.op("MatMul", [probs, v], scope)], scope, perm=[0, 2, 1, 3])
        merged_shape = b.op(
            "Concat",
            [b.unsqueeze0(batch_dim, scope), b.unsqueeze0(seq_dim, scope), b.ints([-1], scope)],
            scope,
            axis=0,
        )
        context = b.op("Reshape", [context, merged_shape], scope)
        attn_out = b.op("MatMul", [context, f"{w}.self_attn.o_proj.weight"], f"{scope}/o_proj")
        hidden = b.op("Add", [residual, attn_out], p)

        residual = hidden
        normed = _rms_norm(
            b,
            hidden,
            f"{w}.post_attention_layernorm.weight",
            f"{p}/post_attention_layernorm",
            elem_type,
            config.rms_norm_eps,
        )
        scope = f"{p}/mlp"
        gate = b.op("MatMul", [normed, f"{w}.mlp.gate_proj.weight"], f"{scope}/gate_proj")
        gate = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{scope}/act_fn")], f"{scope}/act_fn")
        up = b.op("MatMul", [normed, f"{w}.mlp.up_proj.weight"], f"{scope}/up_proj")
        down = b.op("MatMul", [b.op("Mul", [gate, up], scope), f"{w}.mlp.down_proj.weight"], f"{scope}/down_proj")
        hidden = b.op("Add", [residual, down], p)

    normed = _rms_norm(b, hidden, "model.norm.weight", "/model/norm", elem_type, config.rms_norm_eps)
    b.op_to("MatMul", [normed, "lm_head.weight"], "logits", "/lm_head")

    graph = helper.make_graph(b.nodes, "llama_synthetic", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="llmir-onnx-synthetic"
    )
    model.ir_version = IR_VERSION
    return model


def hf_config(config: SyntheticConfig) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden,
        "intermediate_size": config.intermediate,
        "num_attention_heads": config.heads,
        "num_hidden_layers": config.layers,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab,
        "max_position_embeddings": config.max_position,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": config.dtype,
        "attention_bias": config.qkv_bias,
        "clip_qkv": config.clip_qkv or None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def generate(config: SyntheticConfig, out_dir: str | os.PathLike, *, sparse: bool = False) -> Path:
    """Write model.onnx, model.onnx.data and config.json into out_dir; returns the model path."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    data_name = model_path.name + DATA_FILE_SUFFIX
    locations = write_weights(config, out / data_name, sparse=sparse)
    model = build_graph(config, locations, data_name)
    onnx.save_model(model, model_path)
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    return model_path


def parse_args(argv: list[str] | None) -> tuple[SyntheticConfig, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    for flag in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "max-position"):
        parser.add_argument(f"--{flag}", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-weights", action="store_true", help="sparse all-zero data file (graph work only)")
    args = parser.parse_args(argv)
    base = asdict(PRESETS[args.preset]) if args.preset else {}
    overrides = {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "max_position": args.max_position,
        "dtype": args.dtype,
        "seed": args.seed,
    }
    base.update({key: value for key, value in overrides.items() if value is not None})
    missing = [key for key in ("hidden", "layers", "heads", "intermediate", "vocab") if key not in base]
    if missing:
        parser.error(f"give --preset or all of: {', '.join('--' + m.replace('_', '-') for m in missing)}")
    base.setdefault("kv_heads", base["heads"])
    config = SyntheticConfig(**base)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config, args.out, args.no_weights


def main(argv: list[str] | None = None) -> int:
    config, out, sparse = parse_args(argv)
    start = time.perf_counter()
    path = generate(config, out, sparse=sparse)
    data = path.with_name(path.name + DATA_FILE_SUFFIX)
    seconds = time.perf_counter() - start
    size = data.stat().st_size
    print(
        f"wrote {path} and {data.name}: {size / 2**30:.3f} GiB of {'sparse zero' if sparse else 'random'} "
        f"{config.dtype} weights in {seconds:.2f} s ({size / 2**20 / max(seconds, 1e-9):.0f} MiB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
