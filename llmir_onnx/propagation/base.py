"""What a sharding rule sees and returns.

A rule is a function ``rule(ctx, node, placements) -> Decision``. ``placements`` holds, per input, the
placement that value currently has, or None where the input is absent or is a *free* value (a weight
or a graph input whose placement has not been fixed yet: it can take whatever the rule asks for at
no communication cost, the weight is sliced or the input bound as a slice). The decision says which
placement every input must have (the propagate pass inserts a redistribution where it differs) and
which placement every output gets. Rules never touch the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from llmir_onnx.errors import ShardingError
from llmir_onnx.placement import REPLICATE, Partial, Placement, Replicate, Shard

# Rules register into the op records; re-exported here, where rules have always found them.
from llmir_onnx.propagation.registry import RULES, lookup, register, registered_ops

# The rules by (domain, op_type), as a dict (the harness's test of itself swaps one).
_RULES = RULES

Dim = int | str | None
Shape = tuple[Dim, ...] | None


@dataclass
class Decision:
    inputs: list[Placement | None]
    outputs: list[Placement]
    note: str = ""
    # Input index -> the shape a flat weight is viewed as before it is sliced (MatMulNBits' 1-D scales).
    weight_views: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class WeightRole:
    """How annotate decided to split one weight matmul (Megatron layout)."""

    kind: str  # "column" | "row" | "replicate"
    blocks: tuple[int, ...] = ()
    parts: tuple[int, ...] = ()  # per block; set when a block has fewer heads than tp (KV heads replicated)
    # Grouped fused output ([q heads | k | v] per kv group) with fewer groups than ranks: `parts` are the
    # groups, each split over `inner` ranks with these per-group blocks (see Shard.inner_blocks).
    inner: int = 0
    inner_blocks: tuple[int, ...] = ()
    inner_parts: tuple[int, ...] = ()

    def column_shard(self, dim: int) -> Shard:
        """The placement of a column-parallel weight's output columns (and its weight's) on `dim`."""
        flat = bool(self.inner_blocks)
        return Shard(dim, self.blocks, self.parts, self.inner, self.inner_blocks, self.inner_parts, flat)


@dataclass(frozen=True)
class SplitConstraint:
    """A size that the tp degree must divide for this layout (a head count, a block of columns)."""

    node: str | None  # an unnamed node has None (onnx_ir)
    op_type: str
    what: str
    sizes: tuple[int, ...]
    # KV heads may also be fewer than tp ranks: each is then replicated over tp // heads ranks.
    replicable: bool = False
    # The split value whose axis this is ("" for a head count a rule names).
    value: str | None = ""  # None: the value is unnamed (onnx_ir names are optional)

    def allows(self, tp: int) -> bool:
        return all(size % tp == 0 or (self.replicable and tp % size == 0) for size in self.sizes)


@dataclass
class RuleContext:
    tp: int
    shapes: dict[str, Shape]
    roles: dict[str, WeightRole] = field(default_factory=dict)
    constraints: list[SplitConstraint] = field(default_factory=list)

    def require_divisible(
        self, node: ir.Node, what: str, sizes: Sequence[int], replicable: bool = False, value: str | None = ""
    ) -> None:
        """Record that `sizes` are split over tp; propagation goes on, the error comes once, at the end."""
        self.constraints.append(
            SplitConstraint(node.name, node.op_type, what, tuple(int(s) for s in sizes), replicable, value)
        )

    def role(self, node: ir.Node) -> WeightRole | None:
        """The split annotate chose for this weight matmul; None for any other node (an unnamed one too)."""
        return None if node.name is None else self.roles.get(node.name)

    def shape(self, value: ir.Value | None) -> Shape:
        if value is None or value.name is None:
            return None
        return self.shapes.get(value.name)

    def rank(self, value: ir.Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def static_dim(self, value: ir.Value | None, dim: int) -> int | None:
        shape = self.shape(value)
        if shape is None:
            return None
        size = shape[dim]
        return size if isinstance(size, int) else None

    def constant(self, value: ir.Value | None) -> ir.TensorProtocol | None:
        if value is None:
            return None
        return value.const_value

    def constant_ints(self, value: ir.Value | None) -> list[int] | None:
        tensor = self.constant(value)
        if tensor is None:
            return None
        return [int(x) for x in tensor.numpy().reshape(-1)]


def normalize_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def tp_candidates(constraints: Sequence[SplitConstraint], limit: int = 64) -> list[int]:
    """The tp degrees that every recorded split allows, kv head counts taken as replicable."""
    # At another tp, head counts below the largest one (kv heads of GQA/MQA) may be replicated instead.
    heads = [size for c in constraints if c.what.startswith("num_heads") for size in c.sizes]
    most = max(heads, default=0)
    kv_counts = {size for size in heads if size < most}
    listing = [dataclasses.replace(c, replicable=True) if kv_counts.issuperset(c.sizes) else c for c in constraints]
    largest = max((size for c in constraints for size in c.sizes), default=1)
    return [t for t in range(1, min(largest, limit) + 1) if all(c.allows(t) for c in listing)]


def _finer_than_group_candidates(tp: int, constraints: Sequence[SplitConstraint], limit: int = 64) -> list[int]:
    """Multiples of a head count that `tp` broke, which every other split allows.

    A fused grouped qkv (Falcon's) splits each kv group further by inner blocks at a multiple of the group
    count; the constraints recorded at `tp` describe `tp`'s split, not that one, so only a trial can tell.
    """
    groups = {s for c in constraints if c.what.startswith("num_heads") and not c.allows(tp) for s in c.sizes}
    return [
        t
        for group in sorted(groups)
        for t in range(2 * group, limit + 1, group)
        if all(c.allows(t) or set(c.sizes) == {group} for c in constraints)
    ]


def valid_tp_listing(
    tp: int,
    candidates: Sequence[int],
    works: Callable[[int], bool] | None,
    heads: int | None = None,
    units_plan: bool | None = None,
    own_part_sizes: Sequence[int] = (),
) -> str:
    """'--tp 1, 2 or 4': the candidates other than `tp` that `works` confirms (a trial partition), and with
    a trial and a known head count every tp up to the heads (uneven splits give each rank one at least).

    Every uneven split is planned in units of one head, as tp = heads is: `units_plan` says whether that
    plan succeeds (None: unknown, one trial at tp = heads tells). When it fails, no uneven tp is tried, so
    a refusal on a big model costs the trials of the head count's divisors, not one per head.
    `own_part_sizes` are axes the head units do not divide: an uneven tp splits them into tp equal parts,
    so an uneven tp that does not divide one of them is not tried.
    """
    options = set(candidates) | ({1} if not candidates else set())
    if works is not None and heads:
        options |= {t for t in range(2, heads + 1) if heads % t == 0}
        if units_plan is None:
            units_plan = tp != heads and works(heads)
        if units_plan:
            options |= {t for t in range(2, heads) if heads % t == 0 or all(s % t == 0 for s in own_part_sizes)}
    valid = [t for t in sorted(options) if t == 1 or (t != tp and (works is None or works(t)))]
    return "--tp 1" if len(valid) == 1 else "--tp " + ", ".join(map(str, valid[:-1])) + f" or {valid[-1]}"


def divisibility_error(
    tp: int,
    constraints: Sequence[SplitConstraint],
    works: Callable[[int], bool] | None = None,
    shares: Sequence[int] = (),
    heads: int | None = None,
    units_works: Callable[[], bool] | None = None,
) -> ShardingError | None:
    """One error for a tp that some split cannot take; head counts are named first, they are what users know.

    `units_works` (a trial of the plan in units of one head, axes that can split on their own parts of tp
    aside) says whether uneven tps are worth trying at all.

    The tp values it offers are the candidates the constraints allow that `works` confirms (a trial
    partition): a constraint met at one tp says little about the splits another tp would choose. With
    uneven `shares` the constraints were recorded in units (their sum): every split must follow the heads'.
    """
    units = sum(shares) if shares else tp
    broken = [c for c in constraints if not c.allows(units)]
    if not broken:
        return None
    broken.sort(key=lambda c: (not c.what.startswith(("num_heads", "kv_num_heads")),))
    first = broken[0]
    shown = first.sizes[0] if len(first.sizes) == 1 else "|".join(str(s) for s in first.sizes)
    candidates = set(tp_candidates(constraints))
    if works is not None:
        candidates |= set(_finer_than_group_candidates(tp, constraints))
    if shares and not any(c.value for c in broken):
        # An uneven run failed on a head count: every other uneven split would fail the same way.
        units_plan: bool | None = False
    else:  # an axis another tp may split on its own parts (an MLP's columns): the units trial tells
        units_plan = units_works() if units_works is not None else (False if shares else None)
    # Recorded in units of one head, an axis that breaks them splits on its own parts at any uneven tp.
    own_part_sizes = [size for c in broken if c.value for size in c.sizes] if units == heads else []
    listed = valid_tp_listing(tp, sorted(candidates), works, heads, units_plan, own_part_sizes)
    if shares:
        return ShardingError(
            f"--tp {tp} splits the heads as {','.join(map(str, shares))} ({units} parts), which {first.what}={shown} "
            f"in node {first.node} ({first.op_type}) cannot follow; use {listed}"
        )
    return ShardingError(
        f"--tp {tp} does not divide {first.what}={shown} in node {first.node} ({first.op_type}); use {listed}"
    )


def replicated(node: ir.Node) -> Decision:
    """Everything replicated: the safe answer for ops that are correct only on full tensors."""
    return Decision([REPLICATE if v is not None else None for v in node.inputs], [REPLICATE] * len(node.outputs))


def any_sharded(placements: Sequence[Placement | None]) -> bool:
    return any(isinstance(p, Shard | Partial) for p in placements)


__all__ = [
    "REPLICATE",
    "Decision",
    "Partial",
    "Placement",
    "Replicate",
    "RuleContext",
    "Shard",
    "WeightRole",
    "any_sharded",
    "divisibility_error",
    "lookup",
    "normalize_dim",
    "register",
    "registered_ops",
    "replicated",
    "valid_tp_listing",
]
