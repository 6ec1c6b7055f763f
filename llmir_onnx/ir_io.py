"""Loading and saving models: lazy external data, safe paths, checksums.

Weights stay memory-mapped: onnx_ir keeps external initializers as `ExternalTensor`s that read
their bytes (via mmap) only when asked, so loading a 100 GB model costs its graph, not its weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from llmir_onnx.digest import FileDigest, bytes_digest
from llmir_onnx.errors import InputModelError

# onnxruntime-gpu 1.31 refuses IR 11+ models written by newer onnx helpers; 10 is read everywhere.
MAX_IR_VERSION = 10
EXTERNAL_DATA_SUFFIX = ".data"


def io_name(value: ir.Value) -> str:
    """A graph input's or output's name: ONNX requires one (onnx_ir's type leaves any value's optional)."""
    if value.name is None:
        raise InputModelError("a graph input or output has no name, which ONNX requires; re-export the model")
    return value.name


def io_dtype(value: ir.Value) -> ir.DataType:
    """A graph input's or output's element type; refused, naming it, when the model declares none."""
    if value.dtype is None:
        raise InputModelError(
            f"graph input or output {value.name!r} declares no element type; re-export the model with typed inputs"
        )
    return value.dtype


def io_shape(value: ir.Value) -> ir.Shape:
    """A graph input's or output's shape; refused, naming it, when the model declares none."""
    if value.shape is None:
        raise InputModelError(
            f"graph input or output {value.name!r} declares no shape; re-export the model with shaped inputs"
        )
    return value.shape


def _graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield model.graph
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A serialized graph and every subgraph in it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from graph_protos(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from graph_protos(subgraph)


def initializer_tensors(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """The main graph's initializers that hold a value, by name."""
    initializers = model.graph.initializers.items()
    return {name: value.const_value for name, value in initializers if value.const_value is not None}


def external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    """Every initializer of the model (subgraphs included) whose bytes live in an external file."""
    for graph in _graphs(model):
        for name, value in graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield name, value.const_value


def check_external_data_paths(model: ir.Model, model_dir: Path, *, require_files: bool = True) -> None:
    """Refuse external-data locations that escape the model's folder (e.g. `../../etc/passwd`)."""
    root = model_dir.resolve()
    for name, tensor in external_tensors(model):
        target = (root / tensor.location).resolve()
        if not target.is_relative_to(root):
            raise InputModelError(
                f"initializer {name!r} stores its data at {tensor.location!r}, outside the model's folder "
                f"{root}; move the data file next to the model and fix its location"
            )
        if require_files and not target.is_file():
            raise InputModelError(
                f"initializer {name!r} stores its data in {tensor.location!r}, which does not exist in {root}; "
                "copy the external data file next to the model"
            )


def check_external_data_sizes(model: ir.Model) -> None:
    """Refuse external data whose declared `length` is not the tensor's size, or that its file does not hold.

    onnxruntime refuses such a model; a partition would otherwise copy whatever bytes are there."""
    for name, tensor in external_tensors(model):
        needed = math.ceil(tensor.dtype.bitwidth * tensor.size / 8)
        shape = "x".join(str(dim) for dim in tensor.shape) or "scalar"
        if tensor.length is not None and tensor.length != needed:
            raise InputModelError(
                f"initializer {name!r} ({tensor.dtype.name.lower()} {shape}, {needed} bytes) declares an external "
                f"data length of {tensor.length} bytes in {tensor.location!r}; fix its `length` (export the model "
                "again)"
            )
        offset = tensor.offset or 0
        size = os.path.getsize(tensor.path)
        if offset + needed > size:
            raise InputModelError(
                f"initializer {name!r} needs bytes {offset} to {offset + needed} of {tensor.location!r}, which holds "
                f"only {size} bytes (a truncated or wrong data file); copy the complete data file next to the model"
            )


def lift_external_constants(model: ir.Model) -> int:
    """Constant nodes whose tensor lives in external data become initializers (the same value, lazily
    read like every other weight); returns how many. Weights are streamed as initializers only."""
    lifted = 0
    for graph in list(_graphs(model)):
        for node in list(graph):
            attribute = node.attributes.get("value")
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or attribute is None:
                continue
            if not isinstance(attribute.value, ir.ExternalTensor):
                continue
            output = node.outputs[0]
            value = ir.Value(name=output.name, shape=output.shape, type=output.type, const_value=attribute.value)
            ir.convenience.replace_all_uses_with(output, value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            graph.register_initializer(value)
            lifted += 1
    return lifted


def load_model(path: str | os.PathLike, *, check_data: bool = True) -> ir.Model:
    """Load a model lazily; external weights stay on disk until read.

    `check_data=False` is for analyses that need shapes only (`plan`): the weight files may be absent.
    """
    model_path = Path(path)
    if model_path.is_dir():
        inside = sorted(model_path.glob("*.onnx"))
        hint = f", e.g. {str(inside[0])!r}" if inside else ""
        raise InputModelError(f"model file {str(model_path)!r} is a folder; pass the path of the .onnx file{hint}")
    if not model_path.is_file():
        raise InputModelError(f"model file {str(model_path)!r} does not exist; pass the path of an .onnx file")
    if model_path.stat().st_size == 0:
        raise InputModelError(f"model file {str(model_path)!r} is empty (0 bytes); pass a complete .onnx file")
    try:
        model = ir.load(model_path)
    except Exception as error:  # onnx/protobuf raise many kinds; the user needs one line
        raise InputModelError(
            f"cannot read {str(model_path)!r} as an ONNX model ({error}); pass an .onnx file from an ONNX exporter"
        ) from error
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InputModelError(f"{str(model_path)!r} holds no ONNX graph (no nodes, no outputs); pass an .onnx model")
    lift_external_constants(model)
    check_external_data_paths(model, model_path.parent, require_files=check_data)
    if check_data:
        check_external_data_sizes(model)
    return model


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_threshold_bytes: int = 1024,
    on_tensor: Callable[[ir.TensorProtocol], None] | None = None,
) -> Path:
    """Save with weights over the threshold in `<file>.data` beside it; returns the model path.

    Tensors are written one at a time, in initializer order (serial writer: lazy weights are read
    only while they are written, so memory stays at one tensor's write buffer). `on_tensor` is
    called with each external tensor as its write starts (progress).
    """
    model_path = Path(path)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    ir.save(
        model,
        model_path,
        external_data=model_path.name + EXTERNAL_DATA_SUFFIX,
        size_threshold_bytes=external_threshold_bytes,
        callback=None if on_tensor is None else (lambda tensor, _info: on_tensor(tensor)),
        max_workers=1,
    )
    return model_path


def model_proto(model: ir.Model) -> onnx.ModelProto:
    """The model file's protobuf: external tensors are referenced where they already are, not read."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return ir.serde.serialize_model(model)


def write_model_proto(proto: onnx.ModelProto, path: str | os.PathLike) -> FileDigest:
    """Write the model file; returns its size and digest, taken from the bytes written (no read back)."""
    data = proto.SerializeToString()
    Path(path).write_bytes(data)
    return bytes_digest(data)

