"""ONNX IR v11 multi-device annotations: a plan's decisions written onto the ORIGINAL model, and read back.

Written (`llmir-onnx annotate PLAN -o OUT.onnx`): one model-level device configuration
(`llmir-plan`, one device per rank, named `rank0`, `rank1`, ...) and, on every node, a node device
configuration with
- its `pipeline_stage`: the stage whose layers hold the node's decoder layer; a node outside the
  layers takes the latest stage of the nodes it reads (0 when it reads none: the embedding, masks and
  rotary tables, which later stages recompute), so the final norm and lm_head land on the last stage;
- a sharding spec for each input and output the plan shards as S(d): the axis d split tp ways over
  the tp group of the node's stage. Replicated values get no spec (the standard's default); Partial
  values and block-wise shards (fused q|k|v) have no IR v11 spelling and get none either; an input the
  plan redistributes before the node (e.g. all-reduced) gets none, as its spec would be the node's
  need, not the value's layout.

Read (`partition`, unless --ignore-annotations): a model that carries `llmir-plan` annotations (or any
node pipeline stages and sharding specs under one configuration) pins
- the stage of each annotated node's decoder layer: the layers' stages must agree within a layer, rise
  with the layer index and stay below --pp; they fix the stage cuts (and must agree with --stage-cuts);
- the placement of each annotated value: a sharded pin must be split --tp ways (checked first), and
  after propagation every pinned value must have its pinned placement, else the partition fails naming
  the value, the node and both placements. Pins are checked, not imposed: the sharding rules decide,
  and a pin that disagrees is an error rather than a different plan.
The annotations are then removed, so the rank models are those of the model without them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from llmir_onnx.errors import PlanError, ShardingError, atomic_output, check_output_path
from llmir_onnx.ir_io import load_model
from llmir_onnx.mesh import DeviceMesh
from llmir_onnx.model_facts import layer_of_node_by_name
from llmir_onnx.partition import PartitionOptions, plan
from llmir_onnx.placement import Placement, Shard
from llmir_onnx.plan.manifest import Manifest, RankEntry

CONFIGURATION_NAME = "llmir-plan"
ANNOTATED_IR_VERSION = 11
# The IR version the model had before it was annotated, restored when the annotations are stripped, so a
# partition of the annotated model writes the same rank files as one of the original.
SOURCE_IR_VERSION_KEY = "llmir.source_ir_version"


@dataclass(frozen=True)
class ValuePin:
    value: str
    node: str
    op_type: str
    placement: str  # printed short: S(1), R
    shards: int  # the shard count of its sharded axis (1 when replicated)


@dataclass(frozen=True)
class AnnotationPins:
    """What a model's IR v11 annotations fix: layer -> stage (with the node that says so), value placements."""

    layer_stages: dict[int, tuple[int, str]]
    values: tuple[ValuePin, ...]

    @property
    def empty(self) -> bool:
        return not self.layer_stages and not self.values


def _node_label(node: ir.Node) -> str:
    return f"{node.name or '<unnamed>'} ({node.op_type})"


def node_stages(graph: ir.Graph, layer_ranges: Sequence[range]) -> dict[ir.Node, int]:
    """The pipeline stage of each top-level node: its layer's stage, else the latest stage it reads from."""
    stage_of_layer = {layer: stage for stage, layers in enumerate(layer_ranges) for layer in layers}
    stages: dict[ir.Node, int] = {}
    for node in graph:  # topological order: producers first
        layer = layer_of_node_by_name(node)
        if layer is not None and layer in stage_of_layer:
            stages[node] = stage_of_layer[layer]
            continue
        producers = [p for v in node.inputs if v is not None and (p := v.producer()) is not None]
        stages[node] = max((stages.get(p, 0) for p in producers), default=0)
    return stages


def _spec(value: ir.Value, placement: Placement, devices: tuple[int, ...]) -> ir.ShardingSpec | None:
    # ShardingSpecProto splits evenly: blocks, repeated parts and uneven shares have no spec.
    if not isinstance(placement, Shard) or not placement.plain or placement.shares:
        return None
    if value.shape is None or not value.name or placement.dim >= len(value.shape):
        return None
    dim = value.shape[placement.dim]
    size = dim if isinstance(dim, int) else ir.SymbolicDim(dim.value)
    simple = ir.SimpleShardedDim(dim=size, num_shards=len(devices))
    sharded = ir.ShardedDim(axis=placement.dim, simple_shardings=(simple,))
    return ir.ShardingSpec(value=value, device=devices, sharded_dims=(sharded,))


def annotate_model(
    model: ir.Model,
    placements: dict[str, Placement],
    redistributed: set[tuple[str, int]],
    tp_groups: Sequence[Sequence[int]],
    layer_ranges: Sequence[range],
    world_size: int,
) -> int:
    """Write the plan onto `model` in place (IR v11); returns the number of sharding specs written.

    `tp_groups[s]` holds the ranks of stage s; `redistributed` the (node name, input index) pairs whose
    input the plan redistributes before the node.
    """
    configuration = ir.ModelConfiguration(
        name=CONFIGURATION_NAME, num_devices=world_size, device_names=tuple(f"rank{r}" for r in range(world_size))
    )
    model.device_configurations = (configuration,)
    model.metadata_props[SOURCE_IR_VERSION_KEY] = str(model.ir_version)
    model.ir_version = max(model.ir_version, ANNOTATED_IR_VERSION)
    stages = node_stages(model.graph, layer_ranges) if len(tp_groups) > 1 else dict.fromkeys(model.graph, 0)
    count = 0
    for node, stage in stages.items():
        devices = tuple(int(r) for r in tp_groups[stage])
        specs = []
        seen: set[ir.Value] = set()
        io = [(v, (node.name, i)) for i, v in enumerate(node.inputs)] + [(v, None) for v in node.outputs]
        for value, key in io:
            if value is None or value in seen or (key is not None and key in redistributed):
                continue
            placement = placements.get(value.name or "")
            spec = _spec(value, placement, devices) if placement is not None else None
            if spec is not None:
                specs.append(spec)
                seen.add(value)
        count += len(specs)
        node.device_configurations = (
            ir.NodeDeviceConfiguration(
                configuration=configuration,
                sharding_specs=tuple(specs),
                pipeline_stage=stage if len(tp_groups) > 1 else None,
            ),
        )
    return count


def write_annotated_source(plan_dir: Path, out: Path, model_path: Path | None = None) -> tuple[Path, int]:
    """The plan's source model with the plan as IR v11 annotations, saved to `out` (weights in `out`.data)."""
    check_output_path(out, "-o")
    manifest = Manifest.read(plan_dir)
    source = model_path or Path(manifest.source["path"])
    model = load_model(source)
    if out.resolve() == source.resolve():
        raise PlanError(f"-o {str(out)!r} is the source model; write the annotated model to another file")
    mesh = DeviceMesh(pp=int(manifest.mesh["pp"]), tp=int(manifest.mesh["tp"]))
    placements: dict[str, Placement] = {}
    redistributed: set[tuple[str, int]] = set()
    if mesh.tp > 1:
        options = PartitionOptions(
            tp=mesh.tp, pp=1, vocab_parallel=bool(manifest.options.get("vocab_parallel")),
            replicate_unsupported=bool(manifest.options.get("replicate_unsupported")),
        )
        _, state = plan(model, options)  # on a copy: `model` keeps its own nodes and names
        placements = dict(state.placements)
        redistributed = {(r.node, r.index) for r in state.redistributions}
    first_of_stage: dict[int, RankEntry] = {}
    for entry in manifest.ranks:
        first_of_stage.setdefault(int(entry.coords["pp"]), entry)
    layer_ranges = [range(*e.layers) if e.layers else range(0) for _, e in sorted(first_of_stage.items())]
    tp_groups = [mesh.group(mesh.rank_of(mesh.coords(e.rank)), "tp") for _, e in sorted(first_of_stage.items())]
    count = annotate_model(model, placements, redistributed, tp_groups, layer_ranges, mesh.world_size)
    with atomic_output(out) as temporary:
        ir.save(model, temporary, external_data=f"{out.name}.data")
    return out, count


def read_pins(model: ir.Model) -> AnnotationPins:
    """The stage and placement pins in `model`'s IR v11 annotations (one configuration at most)."""
    configurations = list(model.device_configurations)
    annotated = [node for node in model.graph if node.device_configurations]
    if not annotated:
        return AnnotationPins({}, ())
    if len(configurations) > 1:
        names = ", ".join(c.name for c in configurations)
        raise ShardingError(
            f"the model declares {len(configurations)} device configurations ({names}); partition reads one: "
            "remove the others or pass --ignore-annotations"
        )
    layer_stages: dict[int, tuple[int, str]] = {}
    values: list[ValuePin] = []
    for node in annotated:
        for config in node.device_configurations:
            if config.pipeline_stage is not None:
                layer = layer_of_node_by_name(node)
                if layer is not None:
                    previous = layer_stages.get(layer)
                    if previous is not None and previous[0] != config.pipeline_stage:
                        raise ShardingError(
                            f"node {_node_label(node)} is pinned to stage {config.pipeline_stage} but node "
                            f"{previous[1]} of the same layer {layer} to stage {previous[0]}; a layer runs on one "
                            "stage: fix the annotations or pass --ignore-annotations"
                        )
                    layer_stages.setdefault(layer, (config.pipeline_stage, _node_label(node)))
            for spec in config.sharding_specs:
                if spec.value is None or not spec.value.name:
                    continue
                if len(spec.sharded_dims) > 1:
                    raise ShardingError(
                        f"node {_node_label(node)} shards {spec.value.name!r} along {len(spec.sharded_dims)} axes; "
                        "tensor parallelism splits one: fix the annotation or pass --ignore-annotations"
                    )
                shards = 1
                if spec.sharded_dims:
                    axis = spec.sharded_dims[0].axis
                    rank = len(spec.value.shape) if spec.value.shape is not None else None
                    placement = f"S({axis + rank if axis < 0 and rank is not None else axis})"
                    shards = max((s.num_shards for s in spec.sharded_dims[0].simple_shardings), default=1)
                else:
                    placement = "R"
                values.append(ValuePin(spec.value.name, node.name or "", node.op_type, placement, shards))
    return AnnotationPins(layer_stages, tuple(values))


def strip_annotations(model: ir.Model) -> None:
    """Remove every IR v11 annotation, so rank models are those of the unannotated model."""
    for node in model.graph.all_nodes():
        node.device_configurations = ()
    model.device_configurations = ()
    source_ir_version = model.metadata_props.pop(SOURCE_IR_VERSION_KEY, None)
    if source_ir_version is not None and source_ir_version.isdigit():
        model.ir_version = int(source_ir_version)


def cuts_from_pins(pins: AnnotationPins, pp: int, given: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The stage cuts (last layer of each stage but the last) that the layer pins fix; None if none pinned."""
    ordered = sorted(pins.layer_stages.items())
    for layer, (stage, label) in ordered:
        if stage >= pp:
            raise ShardingError(
                f"node {label} of layer {layer} is pinned to stage {stage}, but --pp {pp} has stages 0-{pp - 1}; "
                "raise --pp or fix the annotation (or pass --ignore-annotations)"
            )
    if not ordered or pp == 1:
        return given
    for (layer, (stage, label)), (next_layer, (next_stage, next_label)) in itertools.pairwise(ordered):
        if next_stage < stage:
            raise ShardingError(
                f"node {next_label} of layer {next_layer} is pinned to stage {next_stage}, before node {label} of "
                f"layer {layer} on stage {stage}; stages must follow the layers: fix the annotations or pass "
                "--ignore-annotations"
            )
    cuts = []
    for stage in range(pp - 1):
        before = [layer for layer, (s, _) in ordered if s <= stage]
        after = [layer for layer, (s, _) in ordered if s > stage]
        low = max(before) if before else None
        high = min(after) - 1 if after else None
        if low is None or high is None or low != high:
            raise ShardingError(
                f"the stage annotations leave the cut after stage {stage} open (anywhere in layers "
                f"{low if low is not None else 0}-{high if high is not None else 'last'}); pin the stage of a node "
                "in the last layer of each stage and the first of the next, or pass --ignore-annotations"
            )
        cuts.append(low)
    if given is not None and tuple(given) != tuple(cuts):
        raise ShardingError(
            f"--stage-cuts {','.join(map(str, given))} contradicts the model's stage annotations, which cut after "
            f"layers {','.join(map(str, cuts))}; drop one of them (or pass --ignore-annotations)"
        )
    return tuple(cuts)


def check_pin_shards(pins: AnnotationPins, tp: int) -> None:
    """Every sharded pin is split tp ways (checked before any work), else a one-line error."""
    for pin in pins.values:
        if pin.placement != "R" and pin.shards != tp:
            raise ShardingError(
                f"node {pin.node} ({pin.op_type}) pins {pin.value!r} to {pin.shards} shards, but --tp is {tp}; "
                f"partition with --tp {pin.shards}, fix the annotation, or pass --ignore-annotations"
            )


def check_value_pins(pins: AnnotationPins, placements: dict[str, str]) -> None:
    """Every pinned value has its pinned placement in the plan, else a one-line error naming both."""
    for pin in pins.values:
        decided = placements.get(pin.value, "R")
        if decided != pin.placement:
            raise ShardingError(
                f"node {pin.node} ({pin.op_type}) pins {pin.value!r} to {pin.placement}, but the model's sharding "
                f"rules make it {decided}; fix or remove the annotation, or pass --ignore-annotations"
            )
