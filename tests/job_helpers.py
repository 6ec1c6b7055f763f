"""Helpers of the tests that run rank jobs: a plan whose generation lasts seconds (long enough to
interrupt), and finding the processes of one job (every process that inherited the test's mark, an
environment variable, and among them the rank processes proper)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from llmir_onnx.api import partition_to_dir

ROOT = Path(__file__).resolve().parents[1]

MARK_ENV = "LLMIR_TEST_JOB_MARK"


def long_generation_plan(folder: Path, tp: int, pp: int = 1, timeout_s: float = 60.0) -> Path:
    """A (tp, pp) plan of a tiny synthetic LLaMA with 4096 positions: a generation that lasts seconds."""
    subprocess.run(
        [sys.executable, str(ROOT / "models" / "make_synthetic.py"), "--preset", "tiny", "--max-position", "4096",
         "--out", str(folder / "model")], check=True, capture_output=True, timeout=timeout_s,
    )
    plan = folder / f"tp{tp}pp{pp}"
    # Unfolded shape chains (fold_shapes=False): the folded graph decodes the tiny model about twice as
    # fast, and its 4000 tokens could then end before a test's signal arrives on a busy machine.
    partition_to_dir(folder / "model" / "model.onnx", plan, tp=tp, pp=pp, fold_shapes=False)
    return plan


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


def seconds_until_gone(mark: str, limit_s: float) -> float:
    """Seconds until no marked process is left (polled every 20 ms), or `limit_s` if some remain."""
    start = time.monotonic()
    while marked_processes(mark):
        if time.monotonic() - start > limit_s:
            return limit_s
        time.sleep(0.02)
    return time.monotonic() - start
