"""MPICH's shared-memory segments of a job's ranks: recorded by each rank, unlinked by the job's parent.

MPICH's intra-node transport maps /dev/shm/mpich_shm_<id>_<n>, which only MPI_Finalize unlinks. A rank that
leaves with os._exit (every failure path, and the roles that skip MPI_Finalize because a lost peer could
make it hang) or is killed leaves its segment behind for good: measured here, one 2-8 MiB file per job,
21 GiB of /dev/shm after a day of test runs, until new jobs failed with "No space left on device". So each
rank of a job (runtime/job.py) lists what it mapped once MPI is up (`rankN.shm` in the job's folder), and
the parent unlinks those names when every rank is gone, however the ranks ended.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# The job's work folder, set in every rank process of a job that runtime/job.py started.
JOB_ENV = "LLMIR_JOB_DIR"
_MPICH_SEGMENT_PREFIX = "/dev/shm/mpich_shm_"


def _shared_memory_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"rank{rank}.shm"


def note_shared_memory_segments(rank: int) -> None:
    """Record the MPICH segments this rank has mapped (rankN.shm), so that the parent can unlink them when
    the job is over however the rank ended. Call it once MPI is initialized; outside a job it does nothing."""
    work_dir = os.environ.get(JOB_ENV)
    if not work_dir:
        return
    try:
        with open("/proc/self/maps") as maps:
            # A mapped file's line: address perms offset dev inode path.
            mapped = [fields[5].strip() for fields in (line.split(maxsplit=5) for line in maps) if len(fields) == 6]
    except OSError:  # no /proc (not Linux): nothing to record, nothing this job can clean
        return
    segments = sorted({path for path in mapped if path.startswith(_MPICH_SEGMENT_PREFIX)})
    if segments:
        record = _shared_memory_path(Path(work_dir), rank)
        partial = record.with_name(record.name + ".partial")
        partial.write_text("\n".join(segments) + "\n")
        partial.replace(record)


def remove_noted_shared_memory(work_dir: Path, world_size: int) -> None:
    """Unlink the segments the job's ranks recorded. Only once every rank is gone: a process that has mapped
    a segment keeps it, but one still starting would not find it by name."""
    for rank in range(world_size):
        path = _shared_memory_path(work_dir, rank)
        if not path.is_file():
            continue
        for segment in path.read_text().split():
            if segment.startswith(_MPICH_SEGMENT_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(segment)
