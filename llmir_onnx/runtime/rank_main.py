"""Entry point of one rank process: `python -m llmir_onnx.runtime.rank_main ROLE ARGS...`.

A rank that fails prints one line naming its rank and exits non-zero at once (os._exit): after a
communication error MPI_Finalize could wait forever on peers that are gone.
"""

from __future__ import annotations

import os
import sys
import traceback

from llmir_onnx.errors import LlmirError


def _rank_label() -> str:
    for variable in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "RANK"):
        if variable in os.environ:
            return os.environ[variable]
    return "?"


def main(argv: list[str]) -> int:
    role, *args = argv
    if role == "verify-rank":
        from llmir_onnx.runtime.verify import rank_main_verify

        rank_main_verify(*args)
        return 0
    if role == "generate-rank":
        from llmir_onnx.runtime.generate_job import rank_main_generate

        rank_main_generate(*args)
        return 0
    raise SystemExit(f"unknown rank role {role!r}")


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except (LlmirError, RuntimeError, OSError, ValueError) as error:
        if os.environ.get("LLMIR_DEBUG"):
            traceback.print_exc()
        message = " ".join(str(error).split())
        print(f"llmir-onnx rank {_rank_label()}: {type(error).__name__}: {message}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    sys.exit(code)
