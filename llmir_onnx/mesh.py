"""The device mesh: the ONLY place where rank arithmetic lives.

Axes, outermost to innermost: pipeline (pp), context (cp), tensor (tp). tp is innermost so that the
ranks of one tensor-parallel group are neighbours (one node, fastest links):

    rank = (pp_rank * cp + cp_rank) * tp + tp_rank

Group tables for ``DeviceMesh(pp=2, tp=4)`` (8 ranks; tests assert them literally)::

    tp groups: (0, 1, 2, 3) (4, 5, 6, 7)
    pp groups: (0, 4) (1, 5) (2, 6) (3, 7)
    cp groups: (0,) (1,) (2,) (3,) (4,) (5,) (6,) (7,)

    rank:     0  1  2  3  4  5  6  7
    pp_rank:  0  0  0  0  1  1  1  1
    tp_rank:  0  1  2  3  0  1  2  3

For ``DeviceMesh(pp=2, tp=2)``: tp groups (0, 1) (2, 3); pp groups (0, 2) (1, 3).

Uneven tensor parallelism: a split that tp does not divide (4 heads on 3 ranks) is made of *units*, one per
head, and tp rank r holds ``tp_shares[r]`` neighbouring units. ``split_shares(4, 3)`` is ``(2, 1, 1)``: the
larger shares first, as Megatron-style uneven splits do; with per-rank weights (a faster device gets more)
the shares follow the weights. For ``DeviceMesh(tp=3, tp_shares=(2, 1, 1))``::

    tp_rank:     0     1  2
    units:       0, 1  2  3

Every axis split over tp is cut into ``tp_units`` equal parts; rank r holds ``unit_range(r)`` of them.
An axis those units do not divide (a vocabulary, an MLP's columns) splits into tp equal parts where tp
divides it, else into parts of one element: ``split_shares(size, tp)`` units of one element each.
An even mesh has no shares: ``tp_units == tp`` and rank r holds unit r.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llmir_onnx.errors import PlanError

MeshAxis = Literal["pp", "cp", "tp"]
MESH_AXES: tuple[MeshAxis, ...] = ("pp", "cp", "tp")


@dataclass(frozen=True)
class MeshCoords:
    pp: int
    cp: int
    tp: int

    def as_dict(self) -> dict[str, int]:
        return {"pp": self.pp, "cp": self.cp, "tp": self.tp}

    def items(self) -> list[tuple[str, int]]:
        """Mapping-style access, so a manifest can treat coordinates as {"pp", "cp", "tp"}."""
        return list(self.as_dict().items())


@dataclass(frozen=True)
class DeviceMesh:
    pp: int = 1
    cp: int = 1
    tp: int = 1
    # Units each tp rank holds of every split axis (uneven tp); () is even: one unit per rank.
    tp_shares: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise PlanError(f"mesh axis {axis} must be a positive integer, got {size!r}")
        if self.tp_shares and (len(self.tp_shares) != self.tp or min(self.tp_shares) < 1):
            raise PlanError(f"tp shares {self.tp_shares} must give each of the {self.tp} tp ranks at least one unit")

    @property
    def tp_units(self) -> int:
        """How many equal parts every split axis is cut into (tp when even)."""
        return sum(self.tp_shares) if self.tp_shares else self.tp

    def unit_range(self, tp_rank: int) -> range:
        """The units tp rank `tp_rank` holds."""
        return unit_range(self.tp_shares or (1,) * self.tp, tp_rank)

    @property
    def world_size(self) -> int:
        return self.pp * self.cp * self.tp

    def size(self, axis: MeshAxis) -> int:
        if axis not in MESH_AXES:
            raise PlanError(f"unknown mesh axis {axis!r}; use one of {', '.join(MESH_AXES)}")
        return int(getattr(self, axis))

    def rank_of(self, coords: MeshCoords) -> int:
        return (coords.pp * self.cp + coords.cp) * self.tp + coords.tp

    def coords(self, rank: int) -> MeshCoords:
        if not 0 <= rank < self.world_size:
            raise PlanError(f"rank {rank} is outside the mesh of {self.world_size} ranks")
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        pp_rank = rank // (self.tp * self.cp)
        return MeshCoords(pp=pp_rank, cp=cp_rank, tp=tp_rank)

    def group(self, rank: int, axis: MeshAxis) -> tuple[int, ...]:
        """The global ranks that share every coordinate of `rank` except `axis`, in axis order."""
        here = self.coords(rank)
        members = []
        for index in range(self.size(axis)):
            coords = MeshCoords(**{**here.as_dict(), axis: index})
            members.append(self.rank_of(coords))
        return tuple(members)

    def groups(self, axis: MeshAxis) -> list[tuple[int, ...]]:
        """Every group along `axis`, ordered by the smallest rank they contain."""
        seen: dict[tuple[int, ...], None] = {}
        for rank in range(self.world_size):
            seen.setdefault(self.group(rank, axis), None)
        return list(seen)


def unit_range(shares: Sequence[int], tp_rank: int) -> range:
    """The units tp rank `tp_rank` holds when rank r holds `shares[r]` neighbouring units."""
    if not 0 <= tp_rank < len(shares):
        raise PlanError(f"tp rank {tp_rank} is outside a tp group of {len(shares)} ranks")
    start = sum(shares[:tp_rank])
    return range(start, start + shares[tp_rank])


def split_shares(units: int, tp: int, weights: Sequence[float] | None = None) -> tuple[int, ...]:
    """`units` (heads) split among `tp` ranks, at least one each, in proportion to `weights` (equal by
    default); the remainder goes to the ranks with the largest fractions, earlier ranks first on ties,
    so equal weights give the larger shares first: split_shares(4, 3) == (2, 1, 1)."""
    if not 1 <= tp <= units:
        raise PlanError(f"cannot split {units} units among {tp} ranks with at least one each")
    weights = list(weights) if weights is not None else [1.0] * tp
    if len(weights) != tp or min(weights) <= 0:
        raise PlanError(f"tp weights {weights} must be {tp} positive numbers")
    total = sum(weights)
    # Every rank takes one unit first; the rest go by weight (largest remainder).
    exact = [(units - tp) * w / total for w in weights]
    shares = [1 + int(e) for e in exact]
    order = sorted(range(tp), key=lambda r: (-(exact[r] - int(exact[r])), r))
    for r in order[: units - sum(shares)]:
        shares[r] += 1
    return tuple(shares)


def _keeps_groups(start: int, stop: int, group_sizes: Sequence[int]) -> bool:
    """Whether units [start, stop) lie inside one group or cover whole groups, for every group size."""
    return all((start % g == 0 and stop % g == 0) or start // g == (stop - 1) // g for g in group_sizes)


def grouped_shares(
    units: int, tp: int, group_sizes: Sequence[int] = (), weights: Sequence[float] | None = None
) -> tuple[int, ...]:
    """Shares of `units` (query heads) for `tp` ranks in which no rank's heads straddle two groups of any
    size in `group_sizes` (the query heads of one kv head): each rank reads one kv head, or whole ones.
    `split_shares` when it already does; otherwise the split with the least load per weight on its busiest
    rank, the larger shares first among equals. grouped_shares(9, 2, (3,)) == (6, 3): 5,4 would cut the
    second kv head's group; grouped_shares(9, 4, (3,)) == (3, 3, 2, 1)."""
    first = split_shares(units, tp, weights)
    groups = [g for g in group_sizes if 1 < g < units and units % g == 0]
    if all(_keeps_groups(r.start, r.stop, groups) for r in (unit_range(first, t) for t in range(tp))):
        return first
    load = [1.0 / w for w in weights] if weights is not None else [1.0] * tp
    inf = float("inf")
    # best[t][s]: the least busiest-rank load when ranks t.. hold units s..; a split exists when finite.
    best = [[inf] * (units + 1) for _ in range(tp + 1)]
    best[tp][units] = 0.0
    for t in range(tp - 1, -1, -1):
        for s in range(units):
            for e in range(s + 1, units - (tp - t - 1) + 1):
                if _keeps_groups(s, e, groups) and best[t + 1][e] < inf:
                    best[t][s] = min(best[t][s], max((e - s) * load[t], best[t + 1][e]))
    if best[0][0] == inf:
        return first
    shares, start = [], 0
    for t in range(tp):
        stop = max(
            e
            for e in range(start + 1, units - (tp - t - 1) + 1)
            if _keeps_groups(start, e, groups) and max((e - start) * load[t], best[t + 1][e]) <= best[0][0]
        )
        shares.append(stop - start)
        start = stop
    return tuple(shares)


def cache_block(max_seq: int, parts: int) -> int:
    """B, the tokens of each cp rank's block of a sequence-sharded cache: ceil(max_seq / parts)."""
    return -(-max_seq // parts)
