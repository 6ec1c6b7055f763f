"""DeviceMesh: the group tables in its docstring, asserted literally."""

from __future__ import annotations

import pytest

from llmir_onnx.errors import PlanError
from llmir_onnx.mesh import DeviceMesh, MeshCoords


def test_tp4_pp2_tables() -> None:
    mesh = DeviceMesh(pp=2, tp=4)
    assert mesh.world_size == 8
    assert mesh.groups("tp") == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert mesh.groups("pp") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert mesh.groups("cp") == [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,)]
    assert [mesh.coords(r).pp for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [mesh.coords(r).tp for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert mesh.group(6, "tp") == (4, 5, 6, 7)
    assert mesh.group(6, "pp") == (2, 6)


def test_tp2_pp2_tables() -> None:
    mesh = DeviceMesh(pp=2, tp=2)
    assert mesh.groups("tp") == [(0, 1), (2, 3)]
    assert mesh.groups("pp") == [(0, 2), (1, 3)]
    assert mesh.coords(3) == MeshCoords(pp=1, cp=0, tp=1)


def test_rank_formula_with_context_axis() -> None:
    mesh = DeviceMesh(pp=2, cp=3, tp=2)
    for rank in range(mesh.world_size):
        c = mesh.coords(rank)
        assert rank == (c.pp * mesh.cp + c.cp) * mesh.tp + c.tp
        assert mesh.rank_of(c) == rank
    assert mesh.groups("cp")[0] == (0, 2, 4)


def test_bad_mesh_and_rank() -> None:
    with pytest.raises(PlanError):
        DeviceMesh(tp=0)
    with pytest.raises(PlanError, match="outside the mesh"):
        DeviceMesh(tp=2).coords(2)


def test_uneven_shares_larger_first_or_by_weight() -> None:
    from llmir_onnx.mesh import split_shares

    assert split_shares(4, 3) == (2, 1, 1)
    assert split_shares(9, 2) == (5, 4)
    assert split_shares(9, 4) == (3, 2, 2, 2)
    assert split_shares(8, 3) == (3, 3, 2)
    assert split_shares(4, 4) == (1, 1, 1, 1)
    # A rank twice as fast gets twice the heads; every rank keeps one at least.
    assert split_shares(8, 3, [2, 1, 1]) == (4, 2, 2)
    assert split_shares(4, 2, [3, 1]) == (3, 1)
    assert split_shares(4, 3, [100, 1, 1]) == (2, 1, 1)
    with pytest.raises(PlanError, match="at least one each"):
        split_shares(4, 5)
    with pytest.raises(PlanError, match="positive"):
        split_shares(4, 2, [1, 0])


def test_uneven_mesh_units_table() -> None:
    """The docstring's table for DeviceMesh(tp=3, tp_shares=(2, 1, 1)); groups are those of tp 3."""
    mesh = DeviceMesh(pp=2, tp=3, tp_shares=(2, 1, 1))
    assert mesh.tp_units == 4
    assert [list(mesh.unit_range(r)) for r in range(3)] == [[0, 1], [2], [3]]
    assert mesh.groups("tp") == [(0, 1, 2), (3, 4, 5)]
    assert DeviceMesh(tp=3).tp_units == 3
    assert [list(DeviceMesh(tp=3).unit_range(r)) for r in range(3)] == [[0], [1], [2]]
    with pytest.raises(PlanError, match="at least one unit"):
        DeviceMesh(tp=3, tp_shares=(3, 1))
