"""Rewrite a float32 ONNX model as float64: every float tensor, Cast target and graph input/output.

    .venv/bin/python models/to_float64.py SOURCE.onnx OUT.onnx

`retype_graph` does the same between any two float types (the tests use it to make a bfloat16 export
from the float16 one, and to run a bfloat16 plan in float32 where onnxruntime's CPU has no bfloat16
MatMul).

Why: a tensor-parallel plan sums partial products in another order than the original, so in
float32 the two differ by rounding that a deep model amplifies (SmolLM2's 30 layers turn it into
logit differences near 1e-4 on some inputs). In float64 the same rounding is about 1e-9 as large,
so a plan of the float64 model that does not match the float64 original to ~1e-10 computes
something else: a check that no float32 tolerance can give. onnxruntime runs the standard ops these
exports use (MatMul, Softmax, Pow, ReduceMean, Sin/Cos, ...) in double on CPU; onnxruntime's
contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization, ...) have no double kernels,
so models from the onnxruntime-genai builder cannot be converted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT = onnx.TensorProto.FLOAT
DOUBLE = onnx.TensorProto.DOUBLE


def _retyped(tensor: onnx.TensorProto, target: int) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(target)), tensor.name)


def retype_graph(graph: onnx.GraphProto, source: int = FLOAT, target: int = DOUBLE) -> None:
    """Every `source`-typed initializer, constant, Cast target and graph value of `graph` (and its
    subgraphs) becomes `target`, values converted through float32 (exact for float16 and bfloat16)."""
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == source:
            graph.initializer[index].CopyFrom(_retyped(tensor, target))
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == source:
                attribute.t.CopyFrom(_retyped(attribute.t, target))
            elif attribute.type == onnx.AttributeProto.GRAPH:
                retype_graph(attribute.g, source, target)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    retype_graph(subgraph, source, target)
            elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == source:
                attribute.i = target
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == source:
            value.type.tensor_type.elem_type = target


def to_float64(source: Path, destination: Path) -> None:
    """Write the float64 version of `source` (external data next to it: DESTINATION.data)."""
    model = onnx.load(source)
    retype_graph(model.graph)
    destination.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, destination, save_as_external_data=True, location=destination.name + ".data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("destination", type=Path)
    args = parser.parse_args(argv)
    to_float64(args.source, args.destination)
    print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
