"""What the sharding passes share: the plan they build up one pass at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmir_onnx.mesh import DeviceMesh
from llmir_onnx.placement import Placement
from llmir_onnx.propagation.base import Shape, WeightRole


@dataclass(frozen=True)
class Redistribution:
    """Input `index` of node `node` holds `current` but its rule needs `required`."""

    node: str
    index: int
    value: str
    current: Placement
    required: Placement


@dataclass
class ShardingState:
    mesh: DeviceMesh
    replicate_unsupported: bool = False
    vocab_parallel: bool = False
    # Tests look at raw Partial/fused outputs; a real plan reduces them before they leave the graph.
    keep_output_placements: bool = False
    # Seeds for graph inputs (tests and callers that know an input's layout); the rest are free.
    input_seeds: dict[str, Placement] = field(default_factory=dict)
    # Per-rank weights of an uneven tp split (a faster device gets more heads); None: equal.
    tp_weights: tuple[float, ...] | None = None
    # The model's query head count (annotate reads it; uneven shares split it).
    attention_heads: int | None = None
    # Every head count of the model (query and kv heads): uneven shares keep each rank on whole kv groups.
    head_counts: tuple[int, ...] = ()
    shapes: dict[str, Shape] = field(default_factory=dict)
    roles: dict[str, WeightRole] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    redistributions: list[Redistribution] = field(default_factory=list)
    # Output redistributions: graph output name -> placement it must have.
    output_targets: dict[str, Placement] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Initializer name -> placement; localize slices it per rank.
    weight_placements: dict[str, Placement] = field(default_factory=dict)
    # Initializer name -> the shape it is viewed as while it is sliced (flat quantization scales).
    weight_views: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Initializer name -> its value on a given tp rank (rank-dependent constants such as slice offsets).
    rank_constants: dict[str, Callable[[int], np.ndarray]] = field(default_factory=dict)
    # Sequence parallelism (--sp): values computed on a chunk of the tokens, Shard(token axis) over the tp
    # group (passes/sequence_parallel.py); their tp placement above stays what propagation decided.
    sequence_shards: dict[str, Placement] = field(default_factory=dict)
    propagated: bool = False
    collectives_inserted: bool = False
    localized: bool = False

    @property
    def tp(self) -> int:
        return self.mesh.tp

    @property
    def tp_units(self) -> int:
        """The parts propagation splits every axis into: tp, or with uneven shares their sum."""
        return self.mesh.tp_units

    @property
    def uneven(self) -> bool:
        return bool(self.mesh.tp_shares)
