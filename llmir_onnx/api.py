"""The library entry points behind the CLI commands."""

from __future__ import annotations

from pathlib import Path

from llmir_onnx.ir_io import load_model
from llmir_onnx.plan.emit import write_plan
from llmir_onnx.plan.manifest import Manifest, SliceBinding


def partition_to_dir(
    model_path: Path,
    out_dir: Path,
    *,
    tp: int,
    pp: int = 1,
    vocab_parallel: bool = False,
    replicate_unsupported: bool = False,
) -> Manifest:
    """Partition `model_path` for a tp x pp mesh and write the plan into `out_dir` atomically."""
    from llmir_onnx.partition import PartitionOptions, partition

    options = PartitionOptions(tp=tp, pp=pp, vocab_parallel=vocab_parallel, replicate_unsupported=replicate_unsupported)
    source = load_model(model_path)
    result = partition(load_model(model_path), options)
    mesh = result.mesh
    rank_models = [
        (
            program.rank,
            mesh.coords(program.rank),
            program.model,
            [SliceBinding(b.original, b.local, b.dim, b.start, b.stop) for b in program.inputs],
            [SliceBinding(b.original, b.local, b.dim, b.start, b.stop) for b in program.outputs],
        )
        for program in result.ranks
    ]
    mesh_info = {
        "tp": mesh.tp,
        "pp": mesh.pp,
        "cp": mesh.cp,
        "world_size": mesh.world_size,
        "groups": {"tp": [list(g) for g in mesh.groups("tp")], "pp": [list(g) for g in mesh.groups("pp")]},
    }
    return write_plan(
        out_dir,
        source_path=model_path,
        source_model=source,
        mesh=mesh_info,
        rank_models=rank_models,
        options={"tp": tp, "pp": pp, "vocab_parallel": vocab_parallel, "replicate_unsupported": replicate_unsupported},
    )
