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
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        for axis in MESH_AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or size < 1:
                raise PlanError(f"mesh axis {axis} must be a positive integer, got {size!r}")

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
