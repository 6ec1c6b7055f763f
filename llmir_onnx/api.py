"""The library entry points behind the CLI commands."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx_ir as ir

from llmir_onnx.annotations import (
    AnnotationPins,
    check_pin_shards,
    check_value_pins,
    cuts_from_pins,
    read_pins,
    strip_annotations,
)
from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.mesh import cache_block
from llmir_onnx.model_facts import record_dim_hints
from llmir_onnx.partition import (
    PartitionOptions,
    PartitionResult,
    build_rank_models,
    cyclic_gc_paused,
    plan_rank_weights,
    shard_tp_ranks,
)
from llmir_onnx.plan.communication import rank_traffic
from llmir_onnx.plan.cost import LinkOf, estimate_phases
from llmir_onnx.plan.data_files import WeightWriter
from llmir_onnx.plan.devices import Cluster, DeviceProfile, derived_tp_weights, load_profile
from llmir_onnx.plan.emit import PlanContents, atomic_output_dir, start_weight_writer, tensor_infos, write_plan_into
from llmir_onnx.plan.manifest import CP_KV_CACHE_DESCRIPTIONS, Manifest
from llmir_onnx.plan.memory import MemoryPlan, format_bytes, plan_memory
from llmir_onnx.plan.shapes import LLMIR_DOMAIN, choose_max_seq, shared_shape_evaluations
from llmir_onnx.plan.tp_rank_copy import TpRankCopy
from llmir_onnx.progress import QUIET, Progress


def _structure_signature(model: ir.Model) -> tuple[Any, ...]:
    """What the memory plan and cost read: ops with their attributes, value types, weight shapes.

    Tensor values (weights, rank offsets), the peers of Send/Recv and which ranks a collective's group
    holds (its size stays) are left out: they differ between the tp ranks of a stage and change
    neither memory nor cost.
    """
    graph = model.graph
    nodes = tuple(
        (
            node.domain,
            node.op_type,
            tuple(v.name if v is not None else "" for v in node.inputs),
            tuple((v.name, v.dtype, str(v.shape)) for v in node.outputs),
            tuple(
                (name, len(attr.value) if name == "group" else str(attr.value))
                for name, attr in sorted(node.attributes.items())
                if name != "peer" and attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            ),
        )
        for node in ir.traversal.RecursiveGraphIterator(graph)
    )
    weights = tuple(
        (name, value.const_value.dtype, tuple(value.const_value.shape)) if value.const_value is not None else (name,)
        for name, value in graph.initializers.items()
    )
    io = tuple((v.name, v.dtype, str(v.shape)) for v in [*graph.inputs, *graph.outputs])
    return nodes, weights, io


@cyclic_gc_paused()  # the whole partition is graph work (see its docstring)
def partition_to_dir(
    model_path: Path,
    out_dir: Path,
    *,
    tp: int,
    pp: int = 1,
    vocab_parallel: bool = False,
    replicate_unsupported: bool = False,
    allow_replicated: bool = False,
    force: bool = False,
    device: str = "h100-sxm",
    device_memory_bytes: int | None = None,
    max_batch: int = 1,
    max_seq: int | None = None,
    stage_cut_after_layer: tuple[int, ...] | None = None,
    dim_roles: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    ignore_annotations: bool = False,
    tp_weights: tuple[float, ...] | None = None,
    devices: Cluster | None = None,
    fold_shapes: bool = True,
    sequence_parallel: bool = False,
    cp: int = 1,
    cp_kv_cache: str = "replicated",
) -> Manifest:
    """Partition `model_path` for a tp x pp mesh and write the plan into `out_dir` atomically.

    Each rank's memory plan and cost estimate (on `device` at max_batch x max_seq) go into the
    manifest; with `device_memory_bytes`, a rank that does not fit fails the partition before
    anything is written. `max_seq` defaults to 2048, or the longest sequence the model takes when
    that is less (GPT-2's 128 positions, a sliding-window cache): the manifest's options record it as
    `max_seq_limit`. `dim_roles` ({symbol: "batch" | "new" | "past" | "total"}, the CLI's --dim)
    settles dims the model's signature leaves open.

    `out_dir` may hold a previous plan (replaced) but no other file, unless `force`; tp > 1 that shards no
    weight is refused unless `allow_replicated`.
    `tp_weights` (one per tp rank) split the heads in proportion (uneven tp); when None, `devices`
    whose tp groups mix profiles derive them (`plan.devices.derived_tp_weights`: each rank's memory
    bandwidth), else the split is equal. The manifest records the weights used (`options["tp_weights"]`).
    IR v11 annotations in the model pin stages and placements (llmir_onnx/annotations.py) unless
    `ignore_annotations`.

    `devices` (the CLI's --devices): one device per rank, rank r on `devices.devices[r]`; each rank's
    memory is checked against its own device's and its cost predicted on its profile over the links
    its groups span; the pipeline cuts balance each stage on its own devices. The manifest records
    where each rank runs (`options["devices"]`). None: every rank is a `device` (the manifest as before).
    `fold_shapes` False keeps the exported shape-computation chains (passes/fold_shapes.py) in the rank
    graphs, for comparison; the manifest then records `options["fold_shapes"] = false`.
    `sequence_parallel` (the CLI's --sp): per-token work between the tp blocks runs on a chunk of the tokens
    (passes/sequence_parallel.py); the manifest records `mesh["sp"] = true`.
    `cp` (the CLI's --cp): the prompt's tokens split over a cp mesh axis of this size, attention included
    (passes/context_parallel.py), world = tp x cp x pp; the manifest records `mesh["cp"]`, the cp groups and
    `mesh["kv_cache"]`: "replicated over cp" (every cp rank holds the whole cache), or with `cp_kv_cache`
    "sharded" (the CLI's --cp-kv-cache) "sharded over cp (sequence)" (each cp rank holds a contiguous run of
    the cache's tokens and attention combines the shards with the log-sum-exp trick).
    """
    profile = load_profile(device)
    if tp_weights is not None and len(tp_weights) != tp:
        raise PlanError(
            f"tp_weights {list(tp_weights)} gives {len(tp_weights)} weights for --tp {tp}; give one per tp rank"
        )
    if tp_weights is None and devices is not None:
        tp_weights = derived_tp_weights(devices, tp, pp)
    if stage_cut_after_layer is not None and len(stage_cut_after_layer) != pp - 1:
        cuts = ",".join(map(str, stage_cut_after_layer))
        raise PlanError(f"--stage-cuts {cuts} makes {len(stage_cut_after_layer) + 1} stages but --pp is {pp}; "
                        f"pass --pp {len(stage_cut_after_layer) + 1}, or "
                        + (f"{pp - 1} cut(s) for --pp {pp}" if pp > 1 else "drop --stage-cuts"))
    progress = progress if progress is not None else QUIET
    progress.phase(f"loading {model_path.name} (weights stay on disk)")
    source = load_model(model_path)
    pins = AnnotationPins({}, ()) if ignore_annotations else read_pins(source)
    strip_annotations(source)
    check_pin_shards(pins, tp)
    planned_cuts = cuts_from_pins(pins, pp, stage_cut_after_layer)
    record_dim_hints(source, dim_roles or {})
    max_seq, limit = choose_max_seq(source, max_batch, max_seq)
    options = PartitionOptions(
        tp=tp,
        pp=pp,
        vocab_parallel=vocab_parallel,
        replicate_unsupported=replicate_unsupported,
        allow_replicated=allow_replicated,
        fold_shapes=fold_shapes,
        sequence_parallel=sequence_parallel,
        cp=cp,
        cp_kv_cache=cp_kv_cache,
        stage_cut_after_layer=planned_cuts,
        device=device,
        device_memory_bytes=device_memory_bytes,
        max_batch=max_batch,
        max_seq=max_seq,
        tp_weights=tp_weights,
        cluster=devices,
    )
    progress.phase(f"sharding for tp {tp} x pp {pp}" + (f" x cp {cp}" if cp > 1 else ""))
    with atomic_output_dir(out_dir, force=force) as staging, WeightWriter(staging, on_bytes=progress.advance) as writer:
        # The partition consumes the loaded graph: the original's IO is read off it first.
        source_inputs, source_outputs = tensor_infos(source.graph.inputs), tensor_infos(source.graph.outputs)
        tp_ranks = shard_tp_ranks(source, options, consume_model=True)
        weights = plan_rank_weights(tp_ranks, options)
        # From here the weights stream to disk while the stage graphs, plans and costs are made.
        start_weight_writer(writer, weights.ranks, progress)
        result = build_rank_models(tp_ranks, weights, options)
        check_value_pins(pins, result.placements)
        mesh = result.mesh
        with shared_shape_evaluations(result.shape_references):
            details = _rank_details(result, profile, max_batch, max_seq, device_memory_bytes, devices)
        groups = {"tp": [list(g) for g in mesh.groups("tp")], "pp": [list(g) for g in mesh.groups("pp")]}
        if cp > 1:
            groups["cp"] = [list(g) for g in mesh.groups("cp")]
        mesh_info = {"tp": mesh.tp, "pp": mesh.pp, "cp": mesh.cp, "world_size": mesh.world_size, "groups": groups}
        if mesh.tp_shares:
            mesh_info["tp_shares"] = list(mesh.tp_shares)  # heads per tp rank of an uneven split
        if sequence_parallel:
            mesh_info["sp"] = True  # the tp group also splits the tokens between its blocks
        if cp > 1:
            # The prompt's tokens are split over cp; the KV cache a step returns is whole on every cp rank, or
            # (sharded) each cp rank's run of its tokens.
            mesh_info["kv_cache"] = CP_KV_CACHE_DESCRIPTIONS[cp_kv_cache]
            if cp_kv_cache == "sharded":
                # cp rank r holds the cache's global positions [r*B, (r+1)*B): B = ceil(max_seq / cp).
                mesh_info["kv_cache_block"] = cache_block(max_seq, cp)
        contents = PlanContents(
            source_path=model_path,
            inputs=source_inputs,
            outputs=source_outputs,
            mesh=mesh_info,
            rank_models=[
                (p.rank, mesh.coords(p.rank).as_dict(), p.model_or_copy, list(p.inputs), list(p.outputs))
                for p in result.ranks
            ],
            rank_details=details,
            options={
                "tp": tp,
                "pp": pp,
                "vocab_parallel": vocab_parallel,
                "replicate_unsupported": replicate_unsupported,
                "allow_replicated": allow_replicated,
                "device": device,
                "device_memory_bytes": device_memory_bytes,
                "max_batch": max_batch,
                "max_seq": max_seq,
                "max_seq_limit": None if limit.tokens is None else {"tokens": limit.tokens, "reason": limit.reason},
                "stage_cut_after_layer": list(stage_cut_after_layer) if stage_cut_after_layer else None,
                **({"devices": devices.manifest_entry()} if devices is not None else {}),
                **({"fold_shapes": False} if not fold_shapes else {}),
                **({"sequence_parallel": True} if sequence_parallel else {}),
                **({"cp": cp} if cp > 1 else {}),
                **({"cp_kv_cache": cp_kv_cache} if cp_kv_cache != "replicated" else {}),
                **({"tp_weights": list(tp_weights)} if tp_weights is not None else {}),
            },
            sharding={"weights": result.weight_splits or []},
        )
        return write_plan_into(staging, writer, contents, progress)


def _rank_details(
    result: PartitionResult,
    profile: DeviceProfile,
    max_batch: int,
    max_seq: int,
    device_memory_bytes: int | None,
    cluster: Cluster | None = None,
) -> list[dict[str, Any]]:
    """Each rank's layers, memory plan and cost; a rank over `device_memory_bytes` is a PlanError.

    With a `cluster`, each rank on its own device: its profile, its memory, the links of its groups."""
    details: list[dict[str, Any]] = []
    # The tp ranks of one stage run the same graph on equal-shaped weights, so their memory plans and
    # costs are equal: evaluate each distinct structure once (the shape evaluation dominates planning).
    analyses: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any], list[Any]]] = {}
    signatures: dict[int, tuple[Any, ...]] = {}  # by id of the model
    for program in result.ranks:
        # A tp rank copy has its tp rank 0's structure (only weights and peers differ): no need to make it.
        model = program.model_or_copy
        peers = model.peers if isinstance(model, TpRankCopy) else None
        groups = model.groups if isinstance(model, TpRankCopy) else {}
        model = model.source if isinstance(model, TpRankCopy) else model
        if id(model) not in signatures:
            signatures[id(model)] = _structure_signature(model)
        rank_profile, limit, link_of, key = profile, device_memory_bytes, None, signatures[id(model)]
        if cluster is not None:
            slot = cluster.devices[program.rank]
            rank_profile, limit = slot.profile, slot.memory_bytes
            link_of, links = _cluster_links(model, cluster, result, program.rank, peers, groups)
            key = (key, slot.profile.name, links)
        if key not in analyses:
            analysis = plan_memory(model, max_batch, max_seq)
            cost = estimate_phases(model, rank_profile, max_batch, max_seq, link_of=link_of)
            traffic = rank_traffic(model, rank_profile, max_batch, max_seq, link_of=link_of)
            analyses[key] = (asdict(analysis), asdict(cost), traffic)
        memory_fields, cost_fields, traffic = analyses[key]
        memory = MemoryPlan(**memory_fields)
        if limit is not None and memory.total_bytes > limit:
            where = f" on its {rank_profile.name} ({cluster.devices[program.rank].host})" if cluster else ""
            raise PlanError(
                f"rank {program.rank}{where} needs {format_bytes(memory.total_bytes)} (weights "
                f"{format_bytes(memory.weight_bytes)}, KV cache {format_bytes(memory.kv_cache_bytes)}, activations "
                f"{format_bytes(memory.activation_peak_bytes)}) at batch {max_batch} x {max_seq} tokens, "
                f"{format_bytes(memory.total_bytes - limit)} over "
                f"{'its device memory' if cluster else '--device-memory'} "
                f"{format_bytes(limit)}; use more --tp/--pp, or lower --max-batch/--max-seq"
            )
        details.append(
            {
                "layers": [program.layers.start, program.layers.stop] if program.layers is not None else None,
                "memory": copy.deepcopy(memory_fields),
                "cost": {
                    **copy.deepcopy(cost_fields),
                    "collectives": _collectives(traffic, peers, result, program.rank, groups),
                },
            }
        )
    return details


def _cluster_links(
    model: ir.Model,
    cluster: Cluster,
    result: PartitionResult,
    rank: int,
    peers: Any,
    groups: Mapping[tuple[int, ...], tuple[int, ...]],
) -> tuple[LinkOf, tuple[str, ...]]:
    """The link each ai.llmir node of `rank` runs over (the slowest its ranks span), and their names.
    `peers` and `groups`: a copy's moves of its source's (`TpRankCopy`)."""
    chosen: dict[int, tuple[Any, int]] = {}
    for node in model.graph:
        if node.domain != LLMIR_DOMAIN:
            continue
        peer, group = node.attributes.get("peer"), node.attributes.get("group")
        if peer is not None:
            other = peer.as_int()
            ranks: tuple[int, ...] = (rank, peers[other] if peers is not None else other)
        elif group is not None and group.value:
            members = tuple(int(r) for r in group.value)
            ranks = tuple(groups.get(members, members))
        else:
            ranks = result.mesh.group(rank, "tp")
        chosen[id(node)] = cluster.group_link(ranks)
    names = tuple(sorted({f"{link.name}/{hosts}" for link, hosts in chosen.values()}))
    return (lambda node: chosen.get(id(node))), names


def _collectives(
    traffic: list[Any], peers: Any, result: PartitionResult, rank: int, groups: Mapping[tuple[int, ...], Any]
) -> list[dict[str, Any]]:
    """The rank's traffic as manifest entries: a copy's Send/Recv peers and groups renamed, a group-less
    collective (the whole tp group at pp 1) given its ranks."""
    entries = []
    for link in traffic:
        entry = asdict(link)
        if link.peer is not None and peers is not None:
            entry["peer"] = peers[link.peer]
        if link.peer is None and link.group is None:
            entry["group"] = list(result.mesh.group(rank, "tp"))
        elif link.group is not None:
            entry["group"] = list(groups.get(tuple(link.group), link.group))
        entries.append(entry)
    return entries
