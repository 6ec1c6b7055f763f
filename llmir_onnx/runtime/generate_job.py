"""A generation job: one process per rank, started by us or by the user's launcher, and its outcome.

Outside a launcher, `spawn_generation` starts `mpiexec -disable-auto-cleanup -n WORLD` (the mpich
wheel's) running `rank_main generate-rank`. Why `-disable-auto-cleanup` (measured, see docs/RUNTIME.md):
with hydra's default cleanup, a rank killed by a signal makes hydra kill the survivors at once, so
they never print which op and group lost their peer. Without it the survivors run into the
communication timeout (LLMIR_COMM_TIMEOUT_S) and each reports it; the parent bounds that wait, and
ends the job at once when a rank fails for a reason of its own (a bad file, a bad option), since the
others would only wait for the timeout.

Each rank writes into the job's work folder: `rankN.pid` at start, then `rankN.json` (its tokens and
timings) on success or `rankN.error` (one line) on failure. The parent never trusts mpiexec's exit
code alone (hydra can exit 0 after killing ranks): every rank must have written its result, and all
ranks must agree on the tokens. A rank with neither file died without a word (killed, crashed), and
the parent's message names it.

Orphans: the parent forwards Ctrl-C/SIGTERM to mpiexec (hydra passes it on to the ranks), then kills
any rank still alive by its pid; mpiexec gets SIGTERM if the parent itself dies (PR_SET_PDEATHSIG);
and each rank exits when its launcher process disappears (a watchdog on the parent pid), because
hydra puts every rank into its own session, out of reach of a process-group kill.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmir_onnx.errors import CommunicationError, GenerationError

DEFAULT_COMM_TIMEOUT_S = 300.0
# Test hook: "RANK:STEP" makes that rank SIGKILL itself before that decode step (a real kill).
FAULT_ENV = "LLMIR_FAULT_KILL_RANK_AT"
REQUEST_FILE = "request.json"
_PR_SET_PDEATHSIG = 1
_WATCHDOG_PERIOD_S = 0.5
_finished = threading.Event()


@dataclass
class GenerateRequest:
    """Everything a rank needs to run its part of a generation (written as JSON for spawned ranks)."""

    plan_dir: str
    prompt_ids: list[list[int]]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    micro_batches: int = 1
    stop_token_ids: list[int] | None = None
    device: str = "cpu"
    intra_op_num_threads: int | None = None
    tokenizer_dir: str | None = None
    stream: bool = True
    # Each rank hashes its plan files before its session; False where the launching process hashed them all.
    check_hashes: bool = True

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> GenerateRequest:
        return cls(**json.loads(path.read_text()))


class TokenRates:
    """Prompt and decode throughput of a generation, from the counts and seconds a subclass holds."""

    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens in {self.prompt_seconds:.3f} s "
            f"({self.prompt_tokens_per_s:.1f} tokens/s); decode: {self.decode_tokens} tokens in "
            f"{self.decode_seconds:.3f} s ({self.decode_tokens_per_s:.1f} tokens/s)"
        )


@dataclass
class RankReport(TokenRates):
    rank: int
    tokens: list[list[int]]
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float
    step_seconds: list[float]


def load_tokenizer(directory: str | Path) -> object:
    """`tokenizers.Tokenizer` from DIR/tokenizer.json."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise GenerationError(f"{str(path)!r} does not exist; --tokenizer takes a folder holding tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise GenerationError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from error
    return Tokenizer.from_file(str(path))


class TextStream:
    """Prints the first sequence's new text as tokens arrive (ids when there is no tokenizer)."""

    def __init__(self, tokenizer: object | None, batch: int, write: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._batch = batch
        self._write = write
        self._ids: list[int] = []
        self._printed = ""

    def __call__(self, step: int, tokens: np.ndarray) -> None:
        if self._batch != 1:
            return
        self._ids.append(int(tokens[0]))
        if self._tokenizer is None:
            self._write(f"{tokens[0]} ")
            return
        text = self._tokenizer.decode(self._ids)  # type: ignore[attr-defined]
        # A token can end inside a multi-byte character: wait until it decodes to whole characters.
        if text.endswith("\ufffd"):
            return
        self._write(text[len(self._printed):])
        self._printed = text


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# --------------------------------------------------------------------------- one rank


def _start_orphan_watchdog(rank: int) -> None:
    """Exit when the launcher process that started us is gone (ranks live in their own sessions)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(_WATCHDOG_PERIOD_S)
            if os.getppid() != parent:
                print(f"llmir-onnx rank {rank}: its launcher (pid {parent}) is gone; exiting", file=sys.stderr,
                      flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="llmir-orphan-watchdog", daemon=True).start()


def _handle_peer_death_notice(rank: int) -> None:
    """Hydra (-disable-auto-cleanup) sends SIGUSR1 to the survivors when a rank dies. Installed after
    MPI_Init, which sets a handler of its own: keep going, so that the pending op runs into the
    communication timeout and reports which op and group lost its peer."""

    def peer_died(_signum: int, _frame: object) -> None:
        if _finished.is_set():  # hydra also signals when a rank exits normally before this one
            return
        print(f"llmir-onnx rank {rank}: the launcher reports that another rank died", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, peer_died)


def _fault_hook(rank: int) -> Callable[[int], None] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    target, step = (int(part) for part in spec.split(":"))
    if target != rank:
        return None

    def before_step(current: int) -> None:
        if current == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return before_step


# Ranks per node, as launchers that say so name it (hydra, Open MPI, Slurm, torchrun).
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE")


def default_intra_op_threads() -> int | None:
    """This rank's share of the node's cores: onnxruntime's default (one thread per core in every
    rank) oversubscribes the cores and its spinning threads then starve the collectives (measured:
    tp 2 on 2 cores decodes 28x slower with 2 threads per rank than with 1)."""
    for name in _LOCAL_SIZE_VARIABLES:
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return max(1, len(os.sched_getaffinity(0)) // int(value))
    return None


def run_generate_rank(request: GenerateRequest, work_dir: Path | None = None) -> RankReport:
    """This process's rank of a generation job; writes rankN.json / rankN.error into `work_dir`."""
    from llmir_onnx.runtime.generate import TokenBroadcast, generate, logits_owner
    from llmir_onnx.runtime.launch import detect_rank_env
    from llmir_onnx.runtime.sampling import Sampler, SamplingConfig
    from llmir_onnx.runtime.session import RankSession, execution_providers

    rank = detect_rank_env().rank
    if work_dir is not None:
        (work_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
        _start_orphan_watchdog(rank)
    try:
        sampler = Sampler(SamplingConfig(request.temperature, request.top_k, request.top_p, request.seed))
        session = RankSession(request.plan_dir, device=request.device,
                              intra_op_num_threads=request.intra_op_num_threads or default_intra_op_threads(),
                              check_hashes=request.check_hashes)
        if work_dir is not None:
            _handle_peer_death_notice(rank)
        owner = logits_owner(session.manifest)
        broadcast = None
        if session.comm.world_size > 1:
            broadcast = TokenBroadcast(session.comm, owner,
                                       execution_providers(request.device, session.device_id))
        prompt = np.array(request.prompt_ids, dtype=np.int64)
        stream = None
        if session.rank == 0 and request.stream:
            tokenizer = load_tokenizer(request.tokenizer_dir) if request.tokenizer_dir else None
            stream = TextStream(tokenizer, prompt.shape[0], _stdout_write)
        result = generate(
            session, prompt, request.max_new_tokens, sampler,
            broadcast=broadcast, micro_batches=request.micro_batches,
            stop_token_ids=frozenset(request.stop_token_ids or ()), on_tokens=stream,
            before_step=_fault_hook(session.rank), samples=session.rank == owner,
        )
        if stream is not None and prompt.shape[0] == 1:
            _stdout_write("\n")
        report = RankReport(session.rank, result.tokens.tolist(), result.prompt_tokens, result.prompt_seconds,
                            result.decode_tokens, result.decode_seconds, result.step_seconds)
    except BaseException as error:
        if work_dir is not None and not isinstance(error, (KeyboardInterrupt, SystemExit)):
            kind = "communication" if "ai.llmir" in str(error) or isinstance(error, CommunicationError) else "local"
            message = _short_error(error)
            (work_dir / f"rank{rank}.error").write_text(json.dumps(
                {"kind": kind, "message": f"{type(error).__name__}: {message}"}))
        raise
    if work_dir is not None:
        (work_dir / f"rank{rank}.json").write_text(json.dumps(asdict(report)))
        _finished.set()
        # Finalize now: the spawned rank leaves with os._exit (see _run_rank_process).
        session.comm.finalize()
    return report


def _run_rank_process(request_path: str, work_dir: str, rank: str) -> None:
    def stop(signum: int, _frame: object) -> None:
        print(f"llmir-onnx rank {rank}: stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        # os._exit: MPI_Finalize could wait forever for peers that are stopping too.
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        run_generate_rank(GenerateRequest.read(Path(request_path)), Path(work_dir))
    except Exception as error:  # onnxruntime's op errors are not RuntimeErrors: report every failure alike
        print(f"llmir-onnx rank {rank}: {type(error).__name__}: {_short_error(error)}", file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # run_generate_rank finalized MPI already


def _short_error(error: BaseException) -> str:
    """One line; onnxruntime's wrapper text around an op's own message is dropped."""
    message = " ".join(str(error).split())
    marker = "Status Message: "
    return message[message.index(marker) + len(marker):] if marker in message else message


def rank_main_generate(request_path: str, work_dir: str) -> None:
    """A spawned rank: a small supervisor process (the one mpiexec sees) and the rank as its child.

    Why the supervisor (measured, see docs/RUNTIME.md): when a process that hydra started dies BY A
    SIGNAL, hydra's proxy SIGKILLs every other rank at once, even with -disable-auto-cleanup, so no
    survivor can report anything. The supervisor turns the rank's death into an ordinary exit code
    (128 + signal), writes which rank died and how, and the survivors then run into the communication
    timeout and report it themselves. It forwards SIGINT/SIGTERM to the rank.
    """
    rank = os.environ.get("PMI_RANK", "?")
    child = os.fork()
    if child == 0:
        _run_rank_process(request_path, work_dir, rank)
    folder = Path(work_dir)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.kill(child, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    # Hydra's "a rank died" notice; the rank itself handles it (see _handle_peer_death_notice).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    launcher = os.getppid()

    def watch_launcher() -> None:
        while True:
            time.sleep(_WATCHDOG_PERIOD_S)
            if os.getppid() != launcher:
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGKILL)
                os._exit(1)

    threading.Thread(target=watch_launcher, name="llmir-supervisor-watchdog", daemon=True).start()
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name
        reported = (folder / f"rank{rank}.json").exists() or (folder / f"rank{rank}.error").exists()
        if not reported:
            (folder / f"rank{rank}.error").write_text(json.dumps(
                {"kind": "killed", "message": f"the rank process (pid {child}) was killed by {name}"}))
            print(f"llmir-onnx rank {rank}: the rank process (pid {child}) was killed by {name}", file=sys.stderr,
                  flush=True)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))


# --------------------------------------------------------------------------- the spawning parent


def _comm_timeout_s() -> float:
    try:
        return float(os.environ.get("LLMIR_COMM_TIMEOUT_S", DEFAULT_COMM_TIMEOUT_S))
    except ValueError:
        return DEFAULT_COMM_TIMEOUT_S


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


@dataclass
class _RankFiles:
    work_dir: Path
    world_size: int

    def pid(self, rank: int) -> int | None:
        try:
            return int((self.work_dir / f"rank{rank}.pid").read_text())
        except (OSError, ValueError):
            return None

    def report(self, rank: int) -> RankReport | None:
        path = self.work_dir / f"rank{rank}.json"
        return RankReport(**json.loads(path.read_text())) if path.is_file() else None

    def error(self, rank: int) -> dict[str, str] | None:
        path = self.work_dir / f"rank{rank}.error"
        return json.loads(path.read_text()) if path.is_file() else None

    def vanished(self, rank: int) -> bool:
        pid = self.pid(rank)
        return (pid is not None and not _alive(pid) and self.error(rank) is None
                and not (self.work_dir / f"rank{rank}.json").is_file())

    def first_failure(self) -> tuple[int, str] | None:
        for rank in range(self.world_size):
            error = self.error(rank)
            if error is not None:
                return rank, error["kind"]
            if self.vanished(rank):
                return rank, "vanished"
        return None

    def kill_ranks(self) -> None:
        for rank in range(self.world_size):
            pid = self.pid(rank)
            if pid is not None and _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _stop_job(process: subprocess.Popen[bytes], files: _RankFiles, grace_s: float = 3.0) -> None:
    """SIGTERM to mpiexec (hydra forwards it to the ranks), then SIGKILL whatever is left."""
    if process.poll() is None:
        with contextlib.suppress(OSError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    files.kill_ranks()
    if process.poll() is None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM on the parent behaves like Ctrl-C: stop the ranks, then exit."""
    def raise_interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failure_message(files: _RankFiles, exit_code: int | None) -> str | None:
    causes: list[str] = []  # ranks that died or failed on their own: listed first
    effects: list[str] = []  # ranks that lost a peer
    for rank in range(files.world_size):
        if files.report(rank) is not None:
            continue
        error = files.error(rank)
        if error is None:
            what = "never started" if files.pid(rank) is None else "died without reporting (killed or crashed)"
            causes.append(f"rank {rank} {what}")
        elif error["kind"] == "killed":
            causes.append(f"rank {rank} died: {error['message']}")
        elif error["kind"] == "local":
            causes.append(f"rank {rank} failed: {error['message']}")
        else:
            effects.append(f"rank {rank} failed: {error['message']}")
    if not causes and not effects:
        return None
    return f"generation failed (mpiexec exit {exit_code}): " + "; ".join(causes + effects)


def spawn_generation(request: GenerateRequest, world_size: int, extra_env: dict[str, str] | None = None
                     ) -> list[RankReport]:
    """Run the job as `world_size` local rank processes; returns every rank's report (rank order)."""
    from llmir_onnx.runtime.verify import mpiexec_path

    comm_timeout = _comm_timeout_s()
    with tempfile.TemporaryDirectory(prefix="llmir-generate-") as tmp:
        work_dir = Path(tmp)
        request.write(work_dir / REQUEST_FILE)
        command = [
            mpiexec_path(), "-disable-auto-cleanup", "-n", str(world_size), sys.executable, "-m",
            "llmir_onnx.runtime.rank_main", "generate-rank", str(work_dir / REQUEST_FILE), str(work_dir),
        ]
        env = {**os.environ, **(extra_env or {})}
        files = _RankFiles(work_dir, world_size)
        process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        failure_deadline: float | None = None
        try:
            with _signals_raise_interrupt():
                while process.poll() is None:
                    time.sleep(0.05)
                    if failure_deadline is None:
                        failure = files.first_failure()
                        if failure is not None:
                            _, kind = failure
                            # A rank's own error: the others would only wait for the timeout; end now.
                            # A lost peer: let the survivors hit the timeout and say which op lost it.
                            wait = 0.5 if kind == "local" else comm_timeout + 10.0
                            failure_deadline = time.monotonic() + wait
                    elif time.monotonic() > failure_deadline:
                        _stop_job(process, files)
        except KeyboardInterrupt:
            _stop_job(process, files)
            raise GenerationError("interrupted: every rank was stopped") from None
        finally:
            if process.poll() is None:
                _stop_job(process, files)
            files.kill_ranks()
        message = _failure_message(files, process.returncode)
        if message is not None:
            raise CommunicationError(message)
        reports = [files.report(rank) for rank in range(world_size)]
    assert all(report is not None for report in reports)
    complete = [report for report in reports if report is not None]
    if any(report.tokens != complete[0].tokens for report in complete):
        raise GenerationError("the ranks disagree on the generated tokens: "
                              + "; ".join(f"rank {r.rank}: {r.tokens}" for r in complete))
    if process.returncode != 0:
        raise CommunicationError(f"every rank reported success but mpiexec exited {process.returncode}")
    return complete
