"""A job of rank processes that llmir-onnx starts itself (`verify`, `generate`), supervised to the end.

`run_rank_job(role, args, world_size, work_dir)` starts `mpiexec -disable-auto-cleanup -n WORLD python
-m llmir_onnx.runtime.rank_main ROLE WORK_DIR ARGS...` (the mpich wheel's mpiexec) and watches the work
folder until every rank has reported, the first rank fails, or the job is interrupted.

Why this design (measured with MPICH 5.0.2 hydra; docs/RUNTIME.md has the details):

- Hydra's default cleanup kills every rank when one dies, and says only "Killed (signal 9)", naming no
  rank. With `-disable-auto-cleanup` it keeps the others running, but still kills them all at once when
  a process it started dies BY A SIGNAL. So each spawned rank is a small supervisor process (the one
  hydra knows) and the rank process, its child: the supervisor turns the rank's death into an ordinary
  exit and writes which rank died and how (`rankN.error`), before anyone else could report anything.
- The survivors of a dead rank would wait in a collective until LLMIR_COMM_TIMEOUT_S (300 s by
  default). Their waits are not interruptible from Python (a Python signal handler only runs once the
  C++ kernel returns), so this parent, which learns of the death within one poll (50 ms), stops the
  job itself: SIGTERM to every rank process (whose SIGTERM action is the default one, so it ends at
  once, even inside a collective), then SIGKILL to whatever is left after a short grace. The first
  real cause (a rank killed, exited without reporting, or failed on its own) is what the message
  names; the others' follow-on errors (a lost peer, being stopped) are secondary.
- SIGINT/SIGTERM to mpiexec: hydra forwards them to the supervisors, which forward them to their rank
  (default action: it ends) and report it. SIGINT/SIGTERM to this parent: it stops every rank the same
  way and raises `JobInterrupted`.
- No orphans: mpiexec dies with this parent (PR_SET_PDEATHSIG), supervisors and ranks exit when their
  parent changes (hydra puts every rank into its own session, out of reach of a process-group kill),
  and this parent SIGKILLs every recorded pid before it returns.

Files in the work folder, per rank N: `rankN.pid` (the rank process), `rankN.supervisor.pid`,
`rankN.ok` (success; the role's own results are written before it), or `rankN.error` (JSON: kind,
message, time), and `rankN.shm` (MPICH's shared-memory segments the rank mapped, unlinked by this
parent at the end: a rank that dies cannot). `ranks.log` holds the ranks' stderr (onnxruntime's and
hydra's log lines); it is shown only when no rank explains a failure, or with LLMIR_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmir_onnx.errors import CommunicationError
from llmir_onnx.runtime.segments import JOB_ENV, remove_noted_shared_memory

POLL_S = 0.05
STOP_GRACE_S = 2.0
WATCHDOG_PERIOD_S = 0.5
LOG_FILE = "ranks.log"
# The kinds of rankN.error. A cause ends the job by itself; an effect follows from another rank's failure.
KIND_LOCAL = "local"  # the rank failed on its own (bad file, bad option): a cause
KIND_KILLED = "killed"  # the rank process died by a signal nobody forwarded: a cause
KIND_EXITED = "exited"  # the rank process exited without reporting: a cause
KIND_SIGNALLED = "signalled"  # SIGINT/SIGTERM reached the rank through its launcher: a cause
KIND_COMMUNICATION = "communication"  # an ai.llmir op failed (lost peer, timeout, disagreement): an effect
# Seen by the parent only: a rank whose processes are gone without a record. Hydra kills every other
# rank's process group when one of ITS processes (a supervisor) dies by a signal, so several ranks can
# vanish together; the rank whose supervisor was killed records it from its rank process (which
# outlives its supervisor by up to one watchdog period), and the parent waits that long for the record.
KIND_VANISHED = "vanished"
_EFFECTS = frozenset({KIND_COMMUNICATION})
VANISHED_GRACE_S = 3 * WATCHDOG_PERIOD_S
_PR_SET_PDEATHSIG = 1


class JobInterrupted(CommunicationError):
    """SIGINT/SIGTERM reached the parent; every rank was stopped."""


@dataclass(frozen=True)
class RankFailure:
    rank: int
    kind: str
    message: str
    at: float  # CLOCK_MONOTONIC (system-wide on Linux): comparable across the job's processes

    @property
    def is_cause(self) -> bool:
        return self.kind not in _EFFECTS

    @property
    def precedence(self) -> int:
        """0: a recorded cause; 1: vanished without a record; 2: a follow-on error."""
        return 2 if not self.is_cause else 1 if self.kind == KIND_VANISHED else 0

    def describe(self) -> str:
        verbs = {KIND_KILLED: "died:", KIND_EXITED: "died:", KIND_VANISHED: "died:", KIND_SIGNALLED: "was stopped"}
        verb = verbs.get(self.kind, "failed:")
        return f"rank {self.rank} {verb} {self.message}"


# --------------------------------------------------------------------------- files of the work folder


def _pid_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"rank{rank}.pid"


def _supervisor_pid_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"rank{rank}.supervisor.pid"


def _ok_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"rank{rank}.ok"


def _error_path(work_dir: Path, rank: int) -> Path:
    return work_dir / f"rank{rank}.error"


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_rank_error(work_dir: Path, rank: int, kind: str, message: str) -> None:
    """Record this rank's failure unless it already reported (the first report stands)."""
    if _ok_path(work_dir, rank).exists() or _error_path(work_dir, rank).exists():
        return
    _write_atomically(_error_path(work_dir, rank),
                      json.dumps({"kind": kind, "message": message, "at": time.clock_gettime(time.CLOCK_MONOTONIC)}))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class _JobFiles:
    work_dir: Path
    world_size: int

    def succeeded(self, rank: int) -> bool:
        return _ok_path(self.work_dir, rank).exists()

    def failure(self, rank: int) -> RankFailure | None:
        path = _error_path(self.work_dir, rank)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return RankFailure(rank, record["kind"], record["message"], float(record["at"]))

    def vanished(self, rank: int) -> RankFailure | None:
        """A rank whose process and supervisor are both gone without a report (e.g. the supervisor was
        killed, then hydra killed the rank)."""
        if self.succeeded(rank) or _error_path(self.work_dir, rank).exists():
            return None
        pids = [_read_int(_pid_path(self.work_dir, rank)), _read_int(_supervisor_pid_path(self.work_dir, rank))]
        if any(pid is None for pid in pids) or any(_alive(pid) for pid in pids if pid is not None):
            return None
        if self.succeeded(rank) or _error_path(self.work_dir, rank).exists():  # it reported as it exited
            return None
        return RankFailure(rank, KIND_VANISHED, "its processes vanished without a word (killed or crashed)",
                           time.clock_gettime(time.CLOCK_MONOTONIC))

    def first_failure(self) -> RankFailure | None:
        """The earliest cause (a rank that died or failed on its own), else the earliest effect."""
        failures = [failure for rank in range(self.world_size)
                    if (failure := self.failure(rank) or self.vanished(rank)) is not None]
        if not failures:
            return None
        return min(failures, key=lambda failure: (failure.precedence, failure.at, failure.rank))

    def pids(self) -> list[int]:
        found = []
        for rank in range(self.world_size):
            for path in (_pid_path(self.work_dir, rank), _supervisor_pid_path(self.work_dir, rank)):
                pid = _read_int(path)
                if pid is not None:
                    found.append(pid)
        return found

    def signal_ranks(self, signum: int) -> None:
        for rank in range(self.world_size):
            pid = _read_int(_pid_path(self.work_dir, rank))
            if pid is not None and _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)

    def kill_all(self) -> None:
        for pid in self.pids():
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the parent


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM on the parent behaves like Ctrl-C: stop the ranks, then report."""
    def raise_interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(process: subprocess.Popen[bytes], files: _JobFiles) -> None:
    """SIGTERM to every rank (they end at once), then SIGKILL whatever is left after a short grace."""
    files.signal_ranks(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    files.kill_all()
    if process.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _log_tail(work_dir: Path, lines: int = 3) -> str:
    try:
        text = (work_dir / LOG_FILE).read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _failure_message(job: str, files: _JobFiles, cause: RankFailure | None, exit_code: int | None) -> str | None:
    missing = [rank for rank in range(files.world_size) if not files.succeeded(rank)]
    if not missing:
        return None
    if cause is None:
        cause = files.first_failure()
    if cause is None:
        never = [rank for rank in missing if _read_int(_pid_path(files.work_dir, rank)) is None]
        what = f"ranks {missing} reported nothing" + (f" (ranks {never} never started)" if never else "")
        tail = _log_tail(files.work_dir)
        return f"{job} failed (mpiexec exit {exit_code}): {what}" + (f"; its output ends: {tail}" if tail else "")
    others = [rank for rank in missing if rank != cause.rank]
    listed = ", ".join(map(str, others))
    suffix = f"; {'rank' if len(others) == 1 else 'ranks'} {listed} did not finish" if others else ""
    return f"{job} failed: {cause.describe()}{suffix}"


def mpiexec_path() -> str:
    """The mpiexec of the mpich wheel installed beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise CommunicationError("no mpiexec found; install the package's dependencies (pip install mpich)")
    return found


def run_rank_job(
    job: str,
    role: str,
    args: list[str],
    world_size: int,
    work_dir: Path,
    *,
    timeout_s: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> None:
    """Run `world_size` ranks of `role` (see rank_main) to the end; raise CommunicationError naming the
    first rank that failed or died. `job` names the job in messages ("verify", "generation")."""
    command = [mpiexec_path(), "-disable-auto-cleanup", "-n", str(world_size), sys.executable, "-m",
               "llmir_onnx.runtime.rank_main", role, str(work_dir), *args]
    env = {**os.environ, **(extra_env or {})}
    files = _JobFiles(work_dir, world_size)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    cause: RankFailure | None = None
    vanished_since: float | None = None
    with open(work_dir / LOG_FILE, "wb") as log:
        debug = bool(os.environ.get("LLMIR_DEBUG"))
        process = subprocess.Popen(command, env=env, stderr=None if debug else log, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    try:
        with _signals_raise_interrupt():
            while process.poll() is None:
                time.sleep(POLL_S)
                cause = files.first_failure()
                if cause is not None and cause.kind == KIND_VANISHED:
                    vanished_since = vanished_since or time.monotonic()
                    if time.monotonic() - vanished_since < VANISHED_GRACE_S:
                        continue  # a record of the rank that really died may still come
                if cause is not None:
                    _stop(process, files)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    _stop(process, files)
                    pending = [rank for rank in range(world_size) if not files.succeeded(rank)]
                    raise CommunicationError(f"{job} failed: ranks {pending} did not finish within {timeout_s:.0f} s")
    except KeyboardInterrupt:
        _stop(process, files)
        raise JobInterrupted(f"{job} interrupted: every rank was stopped") from None
    finally:
        if process.poll() is None:
            _stop(process, files)
        files.kill_all()
        remove_noted_shared_memory(work_dir, world_size)
    message = _failure_message(job, files, cause, process.returncode)
    if message is not None:
        raise CommunicationError(message)
    if process.returncode != 0:
        raise CommunicationError(f"{job}: every rank reported success but mpiexec exited {process.returncode}")


# --------------------------------------------------------------------------- one spawned rank


def _rank_of_launcher() -> int:
    return int(os.environ.get("PMI_RANK", "0"))


def _exit_when_parent_changes(on_exit: Callable[[], None]) -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_PERIOD_S)
            if os.getppid() != parent:
                on_exit()
                os._exit(1)

    threading.Thread(target=watch, name="llmir-parent-watchdog", daemon=True).start()


def failure_kind(error: BaseException) -> str:
    """An ai.llmir op error follows from another rank (lost peer, disagreement); anything else is local."""
    return KIND_COMMUNICATION if "ai.llmir" in str(error) or isinstance(error, CommunicationError) else KIND_LOCAL


def short_error(error: BaseException) -> str:
    """One line: the type and message; onnxruntime's wrapper text around an op's own message is dropped."""
    message = " ".join(str(error).split())
    marker = "Status Message: "
    if marker in message:
        message = message[message.index(marker) + len(marker):]
    return f"{type(error).__name__}: {message}"


def ignore_peer_death_notice() -> None:
    """Hydra (-disable-auto-cleanup) sends SIGUSR1 to the others when a rank exits; this parent ends the
    job itself. Call after MPI_Init, which installs a handler of its own."""
    if os.environ.get(JOB_ENV):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


# Test hooks, each "RANK:STEP", acting before that step: a decode step under `generate`, step 0 (before
# its session runs) under `verify`. KILL: that rank SIGKILLs itself (a real kill). HANG: that rank stops
# making progress until a signal ends it, so a test can signal a job that is certainly still running
# (a generation of a tiny model can otherwise finish before the signal arrives on a busy machine).
FAULT_ENV = "LLMIR_FAULT_KILL_RANK_AT"
HANG_ENV = "LLMIR_FAULT_HANG_RANK_AT"


def _fault_step(variable: str, rank: int) -> int | None:
    spec = os.environ.get(variable)
    if not spec:
        return None
    target, step = (int(part) for part in spec.split(":"))
    return step if target == rank else None


def fault_hook(rank: int) -> Callable[[int], None] | None:
    kill_at, hang_at = _fault_step(FAULT_ENV, rank), _fault_step(HANG_ENV, rank)
    if kill_at is None and hang_at is None:
        return None

    def before_step(current: int) -> None:
        if current == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if current == hang_at:
            while True:  # SIGINT/SIGTERM keep their default action in a rank: they end it here
                time.sleep(3600)

    return before_step


def _run_rank_process(work_dir: Path, rank: int, body: Callable[[], None]) -> None:
    # The default actions: SIGINT/SIGTERM end the rank at once, even inside a collective (a Python
    # handler would only run after the C++ kernel returns).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    os.environ[JOB_ENV] = str(work_dir)
    _write_atomically(_pid_path(work_dir, rank), str(os.getpid()))
    supervisor = os.getppid()
    _exit_when_parent_changes(lambda: write_rank_error(
        work_dir, rank, KIND_KILLED, f"its supervisor process (pid {supervisor}) was killed; the rank process left"))
    try:
        body()
    except BaseException as error:  # onnxruntime's errors are not all RuntimeErrors: report every failure
        if os.environ.get("LLMIR_DEBUG"):
            import traceback

            traceback.print_exc()
        write_rank_error(work_dir, rank, failure_kind(error), short_error(error))
        sys.stderr.flush()
        os._exit(1)
    _write_atomically(_ok_path(work_dir, rank), "")
    sys.stdout.flush()
    os._exit(0)  # the role finalized MPI already; nothing else to wait for


def supervise_rank(work_dir: Path, body: Callable[[], None]) -> None:
    """Run `body` as this rank in a child process; this process (the one hydra knows) waits for it,
    forwards SIGINT/SIGTERM, and records a death the rank could not report. Never returns."""
    rank = _rank_of_launcher()
    _write_atomically(_supervisor_pid_path(work_dir, rank), str(os.getpid()))
    forwarded: list[int] = []
    child = os.fork()
    if child == 0:
        _run_rank_process(work_dir, rank, body)

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        with contextlib.suppress(OSError):
            os.kill(child, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def kill_child() -> None:
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)

    _exit_when_parent_changes(kill_child)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name
        if signum in forwarded:
            write_rank_error(work_dir, rank, KIND_SIGNALLED, f"by {name} (sent to it through its launcher)")
        else:
            write_rank_error(work_dir, rank, KIND_KILLED, f"the rank process (pid {child}) was killed by {name}")
        os._exit(128 + signum)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not _ok_path(work_dir, rank).exists():
        write_rank_error(work_dir, rank, KIND_EXITED,
                         f"the rank process (pid {child}) exited with status {code} without reporting")
    os._exit(code)
