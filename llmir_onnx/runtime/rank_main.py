"""Entry point of one spawned rank: `python -m llmir_onnx.runtime.rank_main ROLE WORK_DIR ARGS...`.

`runtime/job.py` starts it under mpiexec. The process hydra starts is a small supervisor; the rank runs
in its child, and every outcome lands in WORK_DIR (see job.py): a rank that fails, whatever the
exception, records one line there and exits non-zero at once (os._exit: after a communication error
MPI_Finalize could wait forever on peers that are gone).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from llmir_onnx.runtime.generate_job import rank_main_generate
from llmir_onnx.runtime.job import supervise_rank
from llmir_onnx.runtime.verify import rank_main_verify


def _role(role: str, work_dir: Path, args: list[str]) -> Callable[[], None]:
    if role == "verify-rank":
        return lambda: rank_main_verify(work_dir, *args)
    if role == "generate-rank":
        return lambda: rank_main_generate(work_dir, *args)
    raise SystemExit(f"unknown rank role {role!r}")


def main(argv: list[str]) -> None:
    role, work_dir, *args = argv
    supervise_rank(Path(work_dir), _role(role, Path(work_dir), args))


if __name__ == "__main__":
    main(sys.argv[1:])
