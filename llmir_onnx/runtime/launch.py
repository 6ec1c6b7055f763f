"""Communication setup for one rank: find the ai.llmir library, read the launcher, check the world.

Public functions:

- `custom_ops_library_path(cuda=False) -> Path`: THE function that returns the path of the installed
  ai.llmir custom-op library (`llmir_onnx/_lib/libllmir_ops.so`, or `libllmir_ops_cuda.so` with the
  CUDA/NCCL kernels). Pass it to `onnxruntime.SessionOptions.register_custom_ops_library` to use the
  ops in your own sessions (but call `setup_communication` first, which also loads MPI/NCCL).
- `detect_rank_env() -> RankEnv`: rank, world size and local rank from the launcher's environment:
  MPICH/hydra `mpiexec` (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID), Open MPI `mpirun` (OMPI_COMM_WORLD_RANK,
  _SIZE, _LOCAL_RANK), Slurm `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), torchrun-style
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or none (a single process, world 1).
- `setup_communication(cuda=False, expected_world_size=None) -> CommContext`: loads libmpi (from the
  mpich wheel) and, for CUDA, libnccl (nvidia-nccl wheel) process-wide, loads the library, checks that
  the communicator's world size agrees with the launcher and with `expected_world_size`, registers
  `llmir_finalize` at exit, and gives `CommContext.session_options()`: onnxruntime session options
  with the library registered.

Example, under `mpiexec -n 4 python script.py`::

    from llmir_onnx.runtime.launch import setup_communication
    comm = setup_communication(expected_world_size=4)
    session = onnxruntime.InferenceSession("rank.onnx", comm.session_options(intra_op_num_threads=1))
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmir_onnx.errors import CommunicationError, PlanError
from llmir_onnx.runtime.segments import note_shared_memory_segments
from llmir_onnx.runtime.stretch import (
    COMPUTE_STRETCH_ENV,
    ComputeMeter,
    bind_compute_meter_functions,
    compute_stretch_from_env,
)
from llmir_onnx.runtime.throttle import throttle_rank_from_env

# onnxruntime comes from an optional extra (cpu or gpu): it is imported inside the functions that make
# sessions, so importing this module does not need it.
if TYPE_CHECKING:
    import onnxruntime

CPU_LIBRARY_NAME = "libllmir_ops.so"
CUDA_LIBRARY_NAME = "libllmir_ops_cuda.so"
# Where `pip install` puts the built libraries (setup.py copies them next to llmir_onnx/_lib/__init__.py).
LIBRARY_DIR = Path(__file__).resolve().parent.parent / "_lib"
MPI_LIBRARY_NAME = "libmpi.so.12"
NCCL_LIBRARY_NAME = "libnccl.so.2"

LAUNCHER_MPICH = "mpich"
LAUNCHER_OPENMPI = "openmpi"
LAUNCHER_SLURM = "slurm"
LAUNCHER_TORCHRUN = "torchrun"
LAUNCHER_NONE = "none"


def onnxruntime_log_severity() -> int:
    """Session log level for llmir-onnx's sessions: errors come back as exceptions that are reported on one
    line, so onnxruntime's own colour-coded log (warnings, and each error a second time) stays quiet
    (4 = fatal only) unless LLMIR_DEBUG is set (2 = warnings)."""
    return 2 if os.environ.get("LLMIR_DEBUG") else 4


def cuda_device_count() -> int | None:
    """GPUs visible to this process (CUDA driver API), None when the driver cannot tell."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    return count.value


def custom_ops_library_path(cuda: bool = False) -> Path:
    """Path of the installed ai.llmir custom-op library (the CUDA+NCCL variant when `cuda`)."""
    name = CUDA_LIBRARY_NAME if cuda else CPU_LIBRARY_NAME
    path = LIBRARY_DIR / name
    if not path.is_file():
        variant = "CUDA/NCCL" if cuda else "CPU/MPI"
        hint = (
            " The CUDA variant is only built when nvcc and the nvidia-nccl wheel are present at install time."
            if cuda
            else ""
        )
        raise CommunicationError(
            f"the ai.llmir {variant} custom-op library {name} is not installed at {path}; reinstall the "
            f"package so that it is built: pip install --no-build-isolation -e . (from the repository root).{hint}"
        )
    return path


# --------------------------------------------------------------------------- launcher environment


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # one of LAUNCHER_*
    master_addr: str | None = None
    master_port: int | None = None


# (launcher, rank variable, size variable, local rank variable), first match wins: an mpiexec run
# inside a Slurm allocation carries SLURM_* too, so MPI's own variables come first.
_LAUNCHER_VARIABLES: tuple[tuple[str, str, str, str], ...] = (
    (LAUNCHER_OPENMPI, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    (LAUNCHER_MPICH, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    (LAUNCHER_SLURM, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    (LAUNCHER_TORCHRUN, "RANK", "WORLD_SIZE", "LOCAL_RANK"),
)


def _int_variable(environ: Mapping[str, str], name: str, launcher: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None:
        if default is None:
            raise CommunicationError(f"the {launcher} launcher environment lacks {name}; start the ranks with it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise CommunicationError(f"{name}={raw!r} (from the {launcher} launcher) is not an integer") from None


def detect_rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """Rank, world size and local rank from the launcher's environment variables (os.environ by default)."""
    env = os.environ if environ is None else environ
    for launcher, rank_name, size_name, local_name in _LAUNCHER_VARIABLES:
        if rank_name not in env:
            continue
        if launcher == LAUNCHER_SLURM and size_name not in env:
            # SLURM_PROCID without SLURM_NTASKS: a batch script, not an srun step.
            continue
        rank = _int_variable(env, rank_name, launcher)
        world_size = _int_variable(env, size_name, launcher)
        # Without a local rank (e.g. a single-node launcher that omits it) the global rank is the local one.
        local_rank = _int_variable(env, local_name, launcher, default=rank)
        if not 0 <= rank < world_size:
            raise CommunicationError(
                f"{rank_name}={rank} is outside 0..{world_size - 1} ({size_name}={world_size}); check the launcher"
            )
        master_addr = env.get("MASTER_ADDR")
        master_port = _int_variable(env, "MASTER_PORT", launcher, default=-1) if "MASTER_PORT" in env else None
        return RankEnv(rank, world_size, local_rank, launcher, master_addr, master_port)
    return RankEnv(0, 1, 0, LAUNCHER_NONE)


# --------------------------------------------------------------------------- loading and checking


def _preload_global(path: Path | str, what: str, fix: str) -> ctypes.CDLL:
    """dlopen with RTLD_GLOBAL so that the custom-op library (and onnxruntime's dlopen of it) resolve here."""
    try:
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        raise CommunicationError(f"cannot load {what} ({path}): {error}; {fix}") from error


def _mpi_library_path() -> Path | str:
    beside_python = Path(sys.prefix) / "lib" / MPI_LIBRARY_NAME
    # Outside a venv with the mpich wheel, let the dynamic loader search (a system MPICH-ABI libmpi).
    return beside_python if beside_python.is_file() else MPI_LIBRARY_NAME


def _nccl_library_path() -> Path | str:
    try:
        import nvidia.nccl
    except ImportError:
        return NCCL_LIBRARY_NAME
    for base in list(getattr(nvidia.nccl, "__path__", [])):
        candidate = Path(base) / "lib" / NCCL_LIBRARY_NAME
        if candidate.is_file():
            return candidate
    return NCCL_LIBRARY_NAME


def _bind(library: ctypes.CDLL) -> None:
    library.llmir_world_rank.argtypes = []
    library.llmir_world_rank.restype = ctypes.c_int
    library.llmir_world_size.argtypes = []
    library.llmir_world_size.restype = ctypes.c_int
    library.llmir_finalize.argtypes = []
    library.llmir_finalize.restype = ctypes.c_int
    library.llmir_version.argtypes = []
    library.llmir_version.restype = ctypes.c_char_p
    bind_compute_meter_functions(library)


@dataclass
class CommContext:
    """This rank's communication: who it is, and session options that carry the ai.llmir library."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    cuda: bool
    library_path: Path
    version: str
    _library: ctypes.CDLL = field(repr=False)
    _finalized: bool = field(default=False, repr=False)
    # The library's compute meter for this rank, with LLMIR_COMPUTE_STRETCH's factor for it (runtime/stretch.py)
    compute_meter: ComputeMeter | None = None

    @property
    def compute_stretch(self) -> ComputeMeter | None:
        """The meter when LLMIR_COMPUTE_STRETCH stretches this rank, None otherwise."""
        return self.compute_meter if self.compute_meter is not None and self.compute_meter.stretched else None

    def session_options(self, intra_op_num_threads: int | None = None) -> onnxruntime.SessionOptions:
        """New onnxruntime SessionOptions with the ai.llmir library registered.

        Under LLMIR_COMPUTE_STRETCH the rank's sessions run on 1 intra-op thread (the stretch measures the
        thread that calls run); asking for more is refused."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = onnxruntime_log_severity()
        options.register_custom_ops_library(str(self.library_path))
        if self.compute_stretch is not None:
            if intra_op_num_threads not in (None, 1):
                raise PlanError(
                    f"rank {self.rank}: {COMPUTE_STRETCH_ENV} measures the CPU time of the thread that calls run, "
                    f"so it needs intra_op_num_threads = 1, not {intra_op_num_threads}; drop the thread count or "
                    f"the variable"
                )
            intra_op_num_threads = 1
            options.inter_op_num_threads = 1
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        return options

    @contextlib.contextmanager
    def metered_run(self) -> Iterator[None]:
        """Around one session run, on any rank: the library's compute meter counts the run's thread CPU time
        outside communication (and, under LLMIR_COMPUTE_STRETCH, stretches it; runtime/stretch.py)."""
        if self.compute_meter is None:
            raise PlanError(f"rank {self.rank}: no compute meter: this context was not made by setup_communication")
        self.compute_meter.start()
        yield
        self.compute_meter.point()

    def stretched_run(self) -> contextlib.AbstractContextManager[None]:
        """Around one session run: under LLMIR_COMPUTE_STRETCH, metered_run (the stretch point reset before
        it and the work after its last collective stretched right after it); nothing otherwise."""
        return self.metered_run() if self.compute_stretch is not None else contextlib.nullcontext()

    def finalize(self) -> None:
        """Free the communicators and finalize MPI if the library initialized it; idempotent."""
        if self._finalized:
            return
        self._finalized = True
        code = self._library.llmir_finalize()
        if code != 0:
            print(f"llmir-onnx rank {self.rank}: llmir_finalize returned {code}", file=sys.stderr, flush=True)


_context: CommContext | None = None


def setup_communication(cuda: bool = False, expected_world_size: int | None = None) -> CommContext:
    """Set up this process's rank for the ai.llmir ops; the same context on every later call."""
    global _context
    if _context is not None:
        if _context.cuda != cuda:
            raise CommunicationError(
                f"communication was already set up with cuda={_context.cuda}; one process uses one library variant"
            )
        _check_world_size(_context.world_size, _context.launcher, detect_rank_env(), expected_world_size, cuda)
        return _context
    env = detect_rank_env()
    library_path = custom_ops_library_path(cuda)
    _preload_global(
        _mpi_library_path(), "the MPI library", "install the mpich package into this environment (pip install mpich)"
    )
    if cuda:
        _preload_global(
            _nccl_library_path(), "the NCCL library", "install NCCL (pip install nvidia-nccl-cu13) for the CUDA ops"
        )
    library = _preload_global(
        library_path, "the ai.llmir custom-op library", "reinstall the package (pip install --no-build-isolation -e .)"
    )
    try:
        _bind(library)
    except AttributeError as error:
        raise CommunicationError(
            f"{library_path} lacks the llmir_* C functions ({error}); it is stale or foreign: reinstall the package"
        ) from error
    world_size = library.llmir_world_size()
    rank = library.llmir_world_rank()
    if world_size < 1 or rank < 0:
        raise CommunicationError(
            f"the ai.llmir library could not initialize communication (world size {world_size}, rank {rank}); "
            "see the messages above"
        )
    note_shared_memory_segments(rank)  # MPI is up: a job's parent unlinks them however this rank ends
    _check_world_size(world_size, env.launcher, env, expected_world_size, cuda)
    if env.launcher != LAUNCHER_NONE and rank != env.rank:
        raise CommunicationError(
            f"the communicator says this process is rank {rank} but the {env.launcher} launcher says {env.rank}; "
            "start the job with one launcher (mpiexec -n N ...)"
        )
    version = (library.llmir_version() or b"").decode(errors="replace")
    factor = compute_stretch_from_env(rank)
    if factor is not None and cuda:
        raise PlanError(
            f"{COMPUTE_STRETCH_ENV} names rank {rank}, which runs on CUDA: the stretch emulates a slower device "
            "from the CPU time of the ai.llmir CPU kernels' thread and is CPU-only; drop it for CUDA runs"
        )
    meter = ComputeMeter(library, rank, factor if factor is not None else 1.0)
    _context = CommContext(rank, world_size, env.local_rank, env.launcher, cuda, library_path, version, library,
                           compute_meter=meter)  # fmt: skip
    atexit.register(_context.finalize)
    throttle_rank_from_env(rank)  # LLMIR_CPU_SHARE: emulate a slower device for this rank
    return _context


def _check_world_size(
    world_size: int, launcher: str, env: RankEnv, expected_world_size: int | None, cuda: bool
) -> None:
    if launcher != LAUNCHER_NONE and world_size != env.world_size:
        fix = (
            "the CUDA ops bootstrap from mpiexec or from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT: give every rank "
            "the same launcher environment"
            if cuda
            else f"the CPU ops communicate over MPI: start the ranks with mpiexec -n {env.world_size} (the mpiexec "
            "of the mpich package in this environment), not with another launcher's or MPI's"
        )
        raise CommunicationError(
            f"the communicator has world size {world_size} but the {launcher} launcher says {env.world_size}; {fix}"
        )
    if expected_world_size is not None and world_size != expected_world_size:
        raise CommunicationError(
            f"this job runs {world_size} rank(s) but {expected_world_size} are expected; start it with "
            f"mpiexec -n {expected_world_size} (or the same number of ranks under your launcher)"
        )
