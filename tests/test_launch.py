"""Launcher detection and library lookup (single process; communication itself is in test_collectives_mpi)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmir_onnx.errors import CommunicationError
from llmir_onnx.runtime import launch
from llmir_onnx.runtime.launch import RankEnv, detect_rank_env


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, RankEnv(2, 4, 0, "mpich")),
        (
            {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            RankEnv(5, 8, 1, "openmpi"),
        ),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "6", "SLURM_LOCALID": "3"}, RankEnv(3, 6, 3, "slurm")),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
            RankEnv(1, 2, 1, "torchrun", "10.0.0.1", 29500),
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, RankEnv(1, 2, 1, "mpich")),  # no local rank: the global one
        ({}, RankEnv(0, 1, 0, "none")),
        # mpiexec inside a Slurm allocation: MPI's variables win over Slurm's.
        (
            {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
            RankEnv(1, 2, 1, "mpich"),
        ),
        # A batch script's SLURM_PROCID without SLURM_NTASKS is not an srun step.
        ({"SLURM_PROCID": "0"}, RankEnv(0, 1, 0, "none")),
    ],
)
def test_detect_rank_env(environ: dict[str, str], expected: RankEnv) -> None:
    assert detect_rank_env(environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PMI_RANK": "x", "PMI_SIZE": "2"}, "PMI_RANK='x' (from the mpich launcher) is not an integer"),
        ({"RANK": "0"}, "the torchrun launcher environment lacks WORLD_SIZE"),
        ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_RANK=4 is outside 0..3"),
    ],
)
def test_detect_rank_env_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(CommunicationError) as caught:
        detect_rank_env(environ)
    assert message in str(caught.value)


def test_library_missing_says_reinstall(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(launch, "LIBRARY_DIR", tmp_path)
    for cuda, name in [(False, "libllmir_ops.so"), (True, "libllmir_ops_cuda.so")]:
        with pytest.raises(CommunicationError) as caught:
            launch.custom_ops_library_path(cuda=cuda)
        assert str(tmp_path / name) in str(caught.value)
        assert "reinstall the package" in str(caught.value)
    monkeypatch.setattr(launch, "_context", None)
    with pytest.raises(CommunicationError, match=r"libllmir_ops\.so is not installed"):
        launch.setup_communication()


def test_library_path_points_into_the_package() -> None:
    expected = Path(launch.__file__).resolve().parent.parent / "_lib" / "libllmir_ops.so"
    assert expected == launch.LIBRARY_DIR / launch.CPU_LIBRARY_NAME
