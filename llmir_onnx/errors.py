"""One error hierarchy. A user-facing error names the node, the op, the value and the fix.

The CLI prints `str(error)` on one line and exits non-zero; tracebacks only with --debug. The checks and
writing of output paths live here too (`check_output_path`, `atomic_output`), so that rank processes use
them without importing onnx.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


class LlmirError(Exception):
    """Base of every error llmir-onnx reports to a user."""

    exit_code: int = 2


class InputModelError(LlmirError):
    """The model given to us is unreadable, unsafe (e.g. external data outside its folder) or unsupported."""


class ShardingError(LlmirError):
    """A layout cannot be applied: a tp that does not divide a head count, an op with no sharding rule."""


class PlanError(LlmirError):
    """A plan or manifest is inconsistent, or a layout does not fit the device memory."""


class CommunicationError(LlmirError):
    """Setting up or using the ai.llmir collectives failed (no launcher, wrong world size, timeout)."""


class VerificationError(LlmirError):
    """Partitioned ranks did not reproduce the original model's outputs within tolerance."""

    exit_code = 1


class OutputPathError(LlmirError):
    """A path given for output cannot be written: a folder where a file goes, a file where a folder goes."""


class GenerationError(LlmirError):
    """Generation cannot run as asked: bad sampling options, prompts, tokenizer, or a rank that failed."""


def check_output_path(path: Path, option: str, *, folder: bool = False) -> None:
    """Refuse, before any work is done, an output `path` (given as `option`) that cannot be written: one
    under a file, one without write permission, or (unless `folder`) a folder where a file goes. Here, not in
    ir_io, so that rank processes (verify, generate) check their outputs without importing onnx."""
    for parent in path.absolute().parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise OutputPathError(f"{option} {str(path)!r}: {str(parent)!r} is a file, not a folder; "
                                  f"give {option} a path under a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {str(path)!r}: cannot write in {str(parent)!r} (permission denied); "
                                  f"give {option} a path in a folder you can write")
        break
    if not folder and path.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a folder; give the path of a file to write")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A path to write `path`'s content to (and any files named after it, such as `path`.data), in a hidden
    folder beside it; when the block ends without an error, every file written there is moved beside
    `path` (`path` itself last, so it never refers to files not yet in place), else they are all removed:
    an interrupted or failed write leaves no half-written output (nor a previous one destroyed)."""
    staging = path.parent / f".{path.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a process killed mid-write
    staging.mkdir(parents=True)
    try:
        yield staging / path.name
        written = sorted(staging.iterdir(), key=lambda file: file.name == path.name)
        for file in written:
            file.replace(path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
