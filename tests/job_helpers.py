"""Helpers of the tests that run rank jobs: a plan whose generation lasts seconds (long enough to
interrupt), and finding the processes of one job (every process that inherited the test's mark, an
environment variable, and among them the rank processes proper)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from synthetic_helpers import make_synthetic

from llmir_onnx.api import partition_to_dir
from llmir_onnx.runtime.job import HANG_ENV

ROOT = Path(__file__).resolve().parents[1]

MARK_ENV = "LLMIR_TEST_JOB_MARK"
CLI = [sys.executable, "-m", "llmir_onnx.cli.main"]
HELD_AT_STEP = 30


def long_generation_plan(folder: Path, tp: int, pp: int = 1) -> Path:
    """A (tp, pp) plan of a tiny synthetic LLaMA with 4096 positions: room for a generation that a test
    holds mid-way (LLMIR_FAULT_HANG_RANK_AT) to signal or kill it."""
    model = make_synthetic(folder / "model", "--preset", "tiny", "--max-position", "4096")
    plan = folder / f"tp{tp}pp{pp}"
    partition_to_dir(model, plan, tp=tp, pp=pp)
    return plan


def _interruptible() -> None:
    # A shell starts background commands with SIGINT ignored (`bash .ci/run &`), and Python then installs
    # no KeyboardInterrupt handler: that CLI rightly ignores Ctrl-C. A terminal's foreground CLI has
    # SIGINT at its default action, which is what the tests are about.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def held_generation(plan: Path, env: Mapping[str, str], held_rank: int) -> Iterator[subprocess.Popen[str]]:
    """`llmir-onnx generate PLAN` (4000 tokens) in which `held_rank` stops making progress before decode
    step 30: the others then wait in a collective, so the job cannot end by itself before a test's signal
    or kill, however fast or slow the machine. Yielded once tokens stream (every rank is mid-generation);
    a CLI the test leaves running is stopped (SIGTERM, its orderly stop; then SIGKILL)."""
    process = subprocess.Popen(
        [*CLI, "generate", str(plan), "--prompt-ids", "1,2,3", "--max-new-tokens", "4000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**env, HANG_ENV: f"{held_rank}:{HELD_AT_STEP}"}, preexec_fn=_interruptible,
    )
    try:
        assert process.stdout is not None
        streamed = ""
        while len(streamed.split()) < 5:
            chunk = process.stdout.read(20)
            assert chunk, f"the generation ended before streaming: {process.communicate()[1]}"
            streamed += chunk
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes whose environment carries this mark (ranks inherit the CLI's env)."""
    found = []
    needle = f"{MARK_ENV}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if needle in environ and state != "Z":
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def rank_process(mark: str, rank: int, supervisor: bool = False) -> int | None:
    """The rank process of `rank` (the child of its supervisor: both run llmir_onnx.runtime.rank_main),
    or with `supervisor` its supervisor (the process mpiexec started)."""
    for pid in marked_processes(mark):
        if b"rank_main" not in _cmdline(pid) or (b"rank_main" in _cmdline(_parent(pid))) == supervisor:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in environ:
            return pid
    return None


def mapped_mpich_segments(mark: str) -> set[Path]:
    """The MPICH shared-memory segments (/dev/shm/mpich_shm_*) the job's live rank processes have mapped:
    this job's own, whatever else runs on the machine."""
    segments: set[Path] = set()
    for pid in marked_processes(mark):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for fields in (line.split(maxsplit=5) for line in maps):
            if len(fields) == 6 and fields[5].startswith("/dev/shm/mpich_shm_"):
                segments.add(Path(fields[5].strip()))
    return segments


def seconds_until_gone(mark: str, limit_s: float) -> float:
    """Seconds until no marked process is left (polled every 20 ms), or `limit_s` if some remain."""
    start = time.monotonic()
    while marked_processes(mark):
        if time.monotonic() - start > limit_s:
            return limit_s
        time.sleep(0.02)
    return time.monotonic() - start
