"""Write a partition to disk atomically: rank models, their external data, the manifest.

Everything is written into a temporary sibling folder first and renamed into place at the end, so
a failed or interrupted partition leaves no half-written plan (and an older plan stays intact
until the new one is complete).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from llmir_onnx.digest import FileDigest, sha256_file
from llmir_onnx.errors import PlanError, check_output_path
from llmir_onnx.ir_io import model_proto, write_model_proto
from llmir_onnx.plan.data_files import RankWeights, WeightWriter, reference_placed_weights_in_proto
from llmir_onnx.plan.manifest import MANIFEST_NAME, Manifest, RankEntry, SliceBinding, TensorInfo
from llmir_onnx.plan.rank_check import check_rank_model
from llmir_onnx.plan.tp_rank_copy import TpRankCopy
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


# Held (flock) by the partition that owns a staging folder, for as long as it runs; removed before the
# folder becomes the plan. A folder whose lock nobody holds belongs to a dead partition.
STAGING_LOCK_NAME = ".llmir-partition.lock"
# Files a plan folder may hold besides those its manifest names: verify's work folder under a launcher.
PLAN_WORK_NAMES = frozenset({MANIFEST_NAME, ".verify"})


def _staging_pattern(out_dir: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out_dir.name)}\.(partial|old)-(\d+)-[^/]+")


def _make_staging(out_dir: Path, kind: str) -> tuple[Path, int]:
    """A new hidden sibling of `out_dir` named with this process's pid, and the fd of its held lock."""
    folder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-{os.getpid()}-", dir=out_dir.parent))
    lock = os.open(folder / STAGING_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return folder, lock


def _release_staging(folder: Path, lock: int) -> None:
    (folder / STAGING_LOCK_NAME).unlink(missing_ok=True)
    os.close(lock)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _is_stale(folder: Path, pid: int) -> bool:
    """Whether `folder` belongs to a partition that died: its lock is free, or (lock not made yet, or
    already released while it renames) the pid in its name runs no more."""
    try:
        lock = os.open(folder / STAGING_LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return pid != os.getpid() and not _pid_alive(pid)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(lock)
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the staging folders that dead partitions (kill -9, power loss) left beside `out_dir`.

    Only folders of this naming (with a pid and a lock) are judged; a running partition's are kept."""
    pattern = _staging_pattern(out_dir)
    removed = []
    for folder in sorted(out_dir.parent.iterdir()) if out_dir.parent.is_dir() else []:
        match = pattern.fullmatch(folder.name)
        if match and folder.is_dir() and not folder.is_symlink() and _is_stale(folder, int(match.group(2))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def plan_file_names(plan_dir: Path) -> set[str]:
    """The names the plan in `plan_dir` owns (its manifest and the files it lists), read leniently: any
    version, any damage (what cannot be read owns nothing)."""
    try:
        raw = json.loads((plan_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return set(PLAN_WORK_NAMES)
    names = set(PLAN_WORK_NAMES)
    if isinstance(raw, dict):
        names.update(name for name in raw.get("files") or {} if isinstance(name, str))
        for entry in raw.get("ranks") or []:
            if isinstance(entry, dict):
                names.update(name for name in [entry.get("file"), *(entry.get("data_files") or [])]
                             if isinstance(name, str))
    return names


def _refuse_foreign_files(out_dir: Path) -> None:
    if not out_dir.is_dir():
        return
    foreign = sorted(path.name for path in out_dir.iterdir() if path.name not in plan_file_names(out_dir))
    if not foreign:
        return
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    if not (out_dir / MANIFEST_NAME).is_file():
        raise PlanError(
            f"{str(out_dir)!r} is not empty and holds no plan ({shown}); choose an empty or new -o folder, "
            "or pass --force to replace the folder and everything in it"
        )
    raise PlanError(
        f"{str(out_dir)!r} holds files that are not part of its plan ({shown}); move them away, choose another "
        "-o folder, or pass --force to replace the folder and everything in it"
    )


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh staging folder that replaces `out_dir` only if the block succeeds.

    An existing `out_dir` must hold only a plan (a previous partition's files), unless `force`; staging
    folders that dead partitions left beside it are removed first."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise PlanError(f"{str(out_dir)!r} exists and is not a folder; choose another -o")
    check_output_path(out_dir, "-o", folder=True)
    if not force:
        _refuse_foreign_files(out_dir)
    created = [folder for folder in [out_dir.parent, *out_dir.parent.parents] if not folder.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    staging, lock = _make_staging(out_dir, "partial")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(lock)
        for folder in created:  # innermost first: a failed partition leaves no folder it made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    _release_staging(staging, lock)
    previous = None
    if out_dir.exists():
        previous, previous_lock = _make_staging(out_dir, "old")
        os.rename(out_dir, previous / "plan")
    os.rename(staging, out_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
        os.close(previous_lock)


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
    weights' places and values, then the copy's patch (`TpRankCopy.patch`, which `materialize` applies
    too). The same bytes as the copy's model made and saved; None when the copy's weights were not all
    planned (then the model is made instead)."""
    assert writer.layout is not None
    proto = onnx.ModelProto()
    proto.CopyFrom(source)
    changed = {name: copy.weights[name] for name in copy.changed}
    files = reference_placed_weights_in_proto(rank, proto.graph, writer.layout, staging, changed)
    if files is None:
        return None
    copy.patch(proto)
    return proto, files


def write_plan_into(
    staging: Path, writer: WeightWriter, contents: PlanContents, progress: Progress | None = None
) -> Manifest:
    """The rank model files and the manifest, in `staging`, whose weights `writer` is writing."""
    progress = progress if progress is not None else QUIET
    data_files: dict[int, list[str]] = {}
    files: dict[str, FileDigest] = {}
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
        files[rank_file_name(rank)] = write_model_proto(proto, staging / rank_file_name(rank))
    writer.finish()
    files.update(writer.digests)
    progress.finish()
    for rank, *_ in contents.rank_models:
        check_rank_model(staging / rank_file_name(rank), rank, contents.source_path)  # before the plan is published
    entries = []
    for index, (rank, coords, _, inputs, outputs) in enumerate(contents.rank_models):
        details = contents.rank_details[index] if contents.rank_details is not None else {}
        entries.append(
            RankEntry(
                rank=rank,
                coords=coords,
                file=rank_file_name(rank),
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
        files=dict(sorted(files.items())),
        options=contents.options,
        sharding=contents.sharding or {},
    )
    manifest.write(staging)
    return manifest
