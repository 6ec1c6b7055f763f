"""Write a partition to disk atomically: rank models, their external data, the manifest.

Everything is written into a temporary sibling folder first and renamed into place at the end, so
a failed or interrupted partition leaves no half-written plan (and an older plan stays intact
until the new one is complete).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import graph_protos, model_proto, sha256_file, write_model_proto
from llmir_onnx.ops import LLMIR_DOMAIN, PIPELINE_OPS
from llmir_onnx.passes.localize import TpRankCopy
from llmir_onnx.plan.data_files import RankWeights, WeightWriter, reference_placed_weights_in_proto
from llmir_onnx.plan.manifest import MANIFEST_NAME, Manifest, RankEntry, SliceBinding, TensorInfo
from llmir_onnx.progress import QUIET, Progress


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.onnx"


def tensor_infos(values: Sequence[ir.Value]) -> list[TensorInfo]:
    infos = []
    for value in values:
        dtype = value.dtype.name.lower() if value.dtype is not None else "undefined"
        shape: list[int | str] = []
        if value.shape is not None:
            shape = [dim if isinstance(dim, int) else str(dim.value) for dim in value.shape]
        infos.append(TensorInfo(name=value.name or "", dtype=dtype, shape=shape))
    return infos


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces `out_dir` only if the block succeeds."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise PlanError(f"{str(out_dir)!r} exists and is not a folder; choose another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise PlanError(f"{str(out_dir)!r} is not empty and holds no plan; choose an empty or new -o folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if out_dir.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, previous / "plan")
    os.rename(staging, out_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


# rank, mesh coords, model (or a tp rank copy still to make), input and output bindings
RankModel = tuple[int, dict[str, int], ir.Model | TpRankCopy, list[SliceBinding], list[SliceBinding]]


@dataclass(frozen=True)
class PlanContents:
    """What a plan folder holds besides the weights: the source, the mesh, the rank models, the options.

    `inputs` and `outputs` are the original model's (`tensor_infos` of its graph, taken before the
    partition consumes it). `rank_details[i]` holds extra RankEntry fields (layers, memory, cost) for
    `rank_models[i]`.
    """

    source_path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    mesh: dict[str, Any]
    rank_models: Sequence[RankModel]
    options: dict[str, Any]
    rank_details: Sequence[dict[str, Any]] | None = None
    sharding: dict[str, Any] | None = None


def write_plan(out_dir: Path, contents: PlanContents, progress: Progress | None = None) -> Manifest:
    """Save every rank model, its weights and the manifest into `out_dir`, atomically."""
    progress = progress if progress is not None else QUIET
    with atomic_output_dir(out_dir) as staging, WeightWriter(staging, on_bytes=progress.advance) as writer:
        weights = [
            RankWeights.of_model(rank, coords.get("pp", 0), _made(model))
            for rank, coords, model, _, _ in contents.rank_models
        ]
        start_weight_writer(writer, weights, progress)
        return write_plan_into(staging, writer, contents, progress)


def start_weight_writer(writer: WeightWriter, ranks: Sequence[RankWeights], progress: Progress) -> None:
    writer.start(ranks)
    assert writer.layout is not None
    progress.start_bytes(f"writing {len(ranks)} ranks", writer.layout.total_bytes)


def _made(model: ir.Model | TpRankCopy) -> ir.Model:
    return model.materialize() if isinstance(model, TpRankCopy) else model


def _tp_rank_copy_proto(
    source: onnx.ModelProto, rank: int, copy: TpRankCopy, writer: WeightWriter, staging: Path
) -> tuple[onnx.ModelProto, list[str]] | None:
    """Rank `rank`'s model file made from its tp rank 0's serialized model, without a graph copy: its
    weights' places and values, its pipeline peers. The same bytes as the copy's model made and
    saved; None when the copy's weights were not all planned (then the model is made instead)."""
    assert writer.layout is not None
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    changed = {name: copy.weights[name] for name in copy.changed}
    files = reference_placed_weights_in_proto(rank, proto.graph, writer.layout, staging, changed)
    if files is None:
        return None
    for node in (node for graph in graph_protos(proto.graph) for node in graph.node):
        if node.domain == LLMIR_DOMAIN and node.op_type in PIPELINE_OPS:
            for attribute in node.attribute:
                if attribute.name == "peer":
                    attribute.i = copy.peers[attribute.i]
    return proto, files


def write_plan_into(
    staging: Path, writer: WeightWriter, contents: PlanContents, progress: Progress | None = None
) -> Manifest:
    """The rank model files and the manifest, in `staging`, whose weights `writer` is writing."""
    progress = progress if progress is not None else QUIET
    data_files: dict[int, list[str]] = {}
    paths = []
    # Serialized stage models, by id of the model, for the tp rank copies made from them.
    protos: dict[int, onnx.ModelProto] = {}
    for rank, _, model, _, _ in contents.rank_models:
        copied = None
        if isinstance(model, TpRankCopy) and id(model.source) in protos:
            copied = _tp_rank_copy_proto(protos[id(model.source)], rank, model, writer, staging)
        if copied is not None:
            proto, data_files[rank] = copied
        else:
            made = _made(model)
            data_files[rank] = writer.place(rank, made)
            proto = protos[id(made)] = model_proto(made)
        paths.append(write_model_proto(proto, staging / rank_file_name(rank)))
    writer.finish()
    progress.finish()
    entries = []
    for index, ((rank, coords, _, inputs, outputs), path) in enumerate(zip(contents.rank_models, paths, strict=True)):
        details = contents.rank_details[index] if contents.rank_details is not None else {}
        entries.append(
            RankEntry(
                rank=rank,
                coords=coords,
                file=path.name,
                sha256=sha256_file(path),
                inputs=inputs,
                outputs=outputs,
                data_files=data_files[rank],
                **details,
            )
        )
    manifest = Manifest(
        source={"path": str(contents.source_path.resolve()), "sha256": sha256_file(contents.source_path)},
        mesh=contents.mesh,
        inputs=contents.inputs,
        outputs=contents.outputs,
        ranks=entries,
        options=contents.options,
        sharding=contents.sharding or {},
    )
    manifest.write(staging)
    return manifest
