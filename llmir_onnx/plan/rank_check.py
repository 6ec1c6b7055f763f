"""Every rank model a partition writes passes onnx.checker before the plan is published.

A rank model that onnxruntime refuses is a partition bug found only at deployment; most such models
(a stale declared shape, an op wired to the wrong input count, an attribute out of range) fail
onnx's full check, which runs the op schemas' shape inference with the ai.llmir schemas
registered. It is run by path, so models over 2 GiB work and weights are never read; it costs
about 0.15 s for a 32-layer 7B-shaped graph.

onnx has no schemas for onnxruntime's com.microsoft ops, so its inference stops at them and a rank
whose GroupQueryAttention yields fewer heads than its o_proj weight expects would pass. Their
schemas are copied from onnxruntime's own (same inputs, attributes and types), with the output
shapes of GroupQueryAttention and MatMulNBits inferred, so such a mismatch fails here as it would
when onnxruntime loads the model.

Some exports fail the full check themselves: the onnxruntime-genai builder declares intermediate
shapes (value_info) that onnx's own inference contradicts. For those, what can be asked of a rank
is what its source passes: the full check with the declared intermediate shapes dropped (shape
inference over the ops alone), else the structural check.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import onnx
from onnx import helper
from onnx.defs import OpSchema
from onnx.shape_inference import InferenceContext

from llmir_onnx import ops
from llmir_onnx.errors import PlanError

FULL = "full check"
WITHOUT_VALUE_INFO = "full check without the export's declared intermediate shapes"
STRUCTURAL = "structural check"


MS_DOMAIN = "com.microsoft"


def _known_dims(ctx: InferenceContext, index: int) -> list[onnx.TensorShapeProto.Dimension] | None:
    value = ctx.get_input_type(index) if index < ctx.get_num_inputs() else None
    if value is None or not value.HasField("tensor_type") or not value.tensor_type.HasField("shape"):
        return None
    return list(value.tensor_type.shape.dim)


def _output_like(ctx: InferenceContext, index: int, dims: list[onnx.TensorShapeProto.Dimension]) -> None:
    elem_type = ctx.get_input_type(0).tensor_type.elem_type
    out = helper.make_tensor_type_proto(elem_type, None)
    for dim in dims:
        out.tensor_type.shape.dim.add().CopyFrom(dim)
    ctx.set_output_type(index, out)


def _infer_group_query_attention(ctx: InferenceContext) -> None:
    """output [batch, seq, num_heads * head_dim]: head_dim from the key input, or from packed q|k|v."""
    query = _known_dims(ctx, 0)
    num_heads = ctx.get_attribute("num_heads")
    kv_heads = ctx.get_attribute("kv_num_heads")
    if query is None or len(query) != 3 or num_heads is None or kv_heads is None:
        return
    key = _known_dims(ctx, 1) if ctx.get_num_inputs() > 1 and ctx.has_input(1) else None
    width = (key or query)[-1]
    if not width.HasField("dim_value"):
        return
    parts = kv_heads.i if key is not None else num_heads.i + 2 * kv_heads.i
    if width.dim_value % parts:
        raise onnx.shape_inference.InferenceError(
            f"[ShapeInferenceError] GroupQueryAttention: width {width.dim_value} does not divide into {parts} heads"
        )
    hidden = onnx.TensorShapeProto.Dimension(dim_value=num_heads.i * (width.dim_value // parts))
    _output_like(ctx, 0, [query[0], query[1], hidden])


def _infer_matmul_nbits(ctx: InferenceContext) -> None:
    """output [..., N]: A's shape with its last dim replaced by the attribute N."""
    a = _known_dims(ctx, 0)
    n = ctx.get_attribute("N")
    if a is None or n is None:
        return
    _output_like(ctx, 0, [*a[:-1], onnx.TensorShapeProto.Dimension(dim_value=n.i)])


def _infer_skip_norm(ctx: InferenceContext) -> None:
    """output and input_skip_bias_sum (outputs 0 and 3): the input's shape."""
    dims = _known_dims(ctx, 0)
    if dims is None:
        return
    for index in (0, 3):
        if index < ctx.get_num_outputs():
            _output_like(ctx, index, dims)


_CONTRIB_SHAPES = {
    "GroupQueryAttention": _infer_group_query_attention,
    "MatMulNBits": _infer_matmul_nbits,
    "SkipSimplifiedLayerNormalization": _infer_skip_norm,
    "SkipLayerNormalization": _infer_skip_norm,
}


_OPTIONS = {
    "Single": OpSchema.FormalParameterOption.Single,
    "Optional": OpSchema.FormalParameterOption.Optional,
    "Variadic": OpSchema.FormalParameterOption.Variadic,
}


def _parameters(formals: list[Any]) -> list[OpSchema.FormalParameter]:
    """onnx formal parameters from onnxruntime's (same names, type strings and options)."""
    return [
        OpSchema.FormalParameter(f.name, f.typeStr, param_option=_OPTIONS[str(f.option).rsplit(".", 1)[-1]])
        for f in formals
    ]


@functools.cache
def register_contrib_schemas() -> None:
    """onnx schemas for the com.microsoft ops whose output shapes the check infers, mirrored from
    onnxruntime's own schemas (inputs, attributes, type constraints)."""
    # onnxruntime is an optional extra: imported here, where its schemas are read.
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    for source in ort_state.get_all_operator_schema():
        infer = _CONTRIB_SHAPES.get(source.name)
        if source.domain != MS_DOMAIN or infer is None:
            continue
        try:
            onnx.defs.get_schema(source.name, source.since_version, MS_DOMAIN)
            continue  # onnx has one already
        except onnx.defs.SchemaError:
            pass
        schema = OpSchema(
            source.name,
            MS_DOMAIN,
            source.since_version,
            f"onnxruntime's {source.name} (schema mirrored for onnx.checker)",
            inputs=_parameters(source.inputs),
            outputs=_parameters(source.outputs),
            type_constraints=[(c.type_param_str, list(c.allowed_type_strs), "") for c in source.type_constraints],
            attributes=[
                # onnx's stub omits the pybind11 enum's constructor from its int value
                OpSchema.Attribute(name, OpSchema.AttrType(int(attribute.type)), "", required=attribute.required)  # type: ignore[call-arg]
                for name, attribute in source.attributes.items()
            ],
        )
        schema.set_type_and_shape_inference_function(infer)
        onnx.defs.register_schema(schema)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _failure(path: Path, level: str) -> str | None:
    """Why the model at `path` fails the check at `level`, or None when it passes."""
    try:
        if level == FULL:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(str(path))
            if level == WITHOUT_VALUE_INFO:
                # the full check's shape inference, on the graph alone (by path the checker would
                # read the declared shapes back from the file)
                proto = onnx.load(str(path), load_external_data=False)
                del proto.graph.value_info[:]
                onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        return _first_line(error)
    return None


@functools.lru_cache(maxsize=8)
def _source_level(source_path: Path, mtime_ns: int) -> str:
    """The strictest check the source model passes (its rank models must pass it too)."""
    for level in (FULL, WITHOUT_VALUE_INFO):
        if _failure(source_path, level) is None:
            return level
    return STRUCTURAL


def check_rank_model(path: Path, rank: int, source_path: Path) -> None:
    """PlanError naming the rank, the node and the checker's reason when the rank model at `path` fails
    the strictest check its source model passes."""
    ops.register_schemas()
    register_contrib_schemas()
    if _failure(path, FULL) is None:
        return
    level = _source_level(source_path.resolve(), source_path.stat().st_mtime_ns) if source_path.is_file() else FULL
    reason = _failure(path, level)
    if reason is not None:
        raise PlanError(
            f"rank {rank}'s model would not load: onnx.checker ({level}) says: {reason}; this is a "
            "partition bug: please report it with the model (nothing was written)"
        )
