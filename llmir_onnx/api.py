"""The library entry points behind the CLI commands."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.plan.emit import write_plan
from llmir_onnx.plan.manifest import Manifest


def partition_to_dir(
    model_path: Path,
    out_dir: Path,
    *,
    tp: int,
    pp: int = 1,
    vocab_parallel: bool = False,
    replicate_unsupported: bool = False,
    device: str = "h100-sxm",
    device_memory_bytes: int | None = None,
    max_batch: int = 1,
    max_seq: int = 2048,
    stage_cut_after_layer: tuple[int, ...] | None = None,
) -> Manifest:
    """Partition `model_path` for a tp x pp mesh and write the plan into `out_dir` atomically.

    Each rank's memory plan and cost estimate (on `device` at max_batch x max_seq) go into the
    manifest; with `device_memory_bytes`, a rank that does not fit fails the partition before
    anything is written.
    """
    from llmir_onnx.partition import PartitionOptions, partition
    from llmir_onnx.plan.cost import estimate_phases
    from llmir_onnx.plan.devices import load_profile
    from llmir_onnx.plan.memory import format_bytes, plan_memory

    profile = load_profile(device)
    options = PartitionOptions(
        tp=tp,
        pp=pp,
        vocab_parallel=vocab_parallel,
        replicate_unsupported=replicate_unsupported,
        stage_cut_after_layer=stage_cut_after_layer,
        device=device,
        device_memory_bytes=device_memory_bytes,
        max_batch=max_batch,
        max_seq=max_seq,
    )
    source = load_model(model_path)
    result = partition(load_model(model_path), options)
    mesh = result.mesh
    details: list[dict[str, Any]] = []
    for program in result.ranks:
        memory = plan_memory(program.model, max_batch, max_seq)
        if device_memory_bytes is not None and memory.total_bytes > device_memory_bytes:
            raise PlanError(
                f"rank {program.rank} needs {format_bytes(memory.total_bytes)} (weights "
                f"{format_bytes(memory.weight_bytes)}, KV cache {format_bytes(memory.kv_cache_bytes)}, activations "
                f"{format_bytes(memory.activation_peak_bytes)}) at batch {max_batch} x {max_seq} tokens, "
                f"{format_bytes(memory.total_bytes - device_memory_bytes)} over --device-memory "
                f"{format_bytes(device_memory_bytes)}; use more --tp/--pp, or lower --max-batch/--max-seq"
            )
        details.append(
            {
                "layers": [program.layers.start, program.layers.stop] if program.layers is not None else None,
                "memory": asdict(memory),
                "cost": asdict(estimate_phases(program.model, profile, max_batch, max_seq)),
            }
        )
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
        rank_models=[
            (p.rank, mesh.coords(p.rank).as_dict(), p.model, list(p.inputs), list(p.outputs)) for p in result.ranks
        ],
        rank_details=details,
        options={
            "tp": tp,
            "pp": pp,
            "vocab_parallel": vocab_parallel,
            "replicate_unsupported": replicate_unsupported,
            "device": device,
            "device_memory_bytes": device_memory_bytes,
            "max_batch": max_batch,
            "max_seq": max_seq,
            "stage_cut_after_layer": list(stage_cut_after_layer) if stage_cut_after_layer else None,
        },
    )
