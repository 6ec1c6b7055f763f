"""A generation job: one process per rank, started by us or by the user's launcher, and its outcome.

Outside a launcher, `spawn_generation` runs the ranks as a job of `runtime/job.py` (mpiexec of the
mpich wheel, one supervised process per rank, the first failure stops every rank within a second and is
the one the message names). Each spawned rank writes `rankN.json` (its tokens and timings) into the
job's work folder; every rank must report and all ranks must agree on the tokens.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmir_onnx.errors import GenerationError
from llmir_onnx.runtime.generate import TokenBroadcast, TokenRates, generate, logits_owner
from llmir_onnx.runtime.job import JobInterrupted, fault_hook, ignore_peer_death_notice, run_rank_job
from llmir_onnx.runtime.launch import detect_rank_env
from llmir_onnx.runtime.sampling import Sampler, SamplingConfig
from llmir_onnx.runtime.session import RankSession, execution_providers

REQUEST_FILE = "request.json"


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


@dataclass
class RankReport(TokenRates):
    rank: int
    tokens: list[list[int]]
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float
    step_seconds: list[float]
    run_calls: list[tuple[int, int, float, float]] = field(default_factory=list)  # see GenerationResult


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
    rank = detect_rank_env().rank
    sampler = Sampler(SamplingConfig(request.temperature, request.top_k, request.top_p, request.seed))
    session = RankSession(request.plan_dir, device=request.device,
                          intra_op_num_threads=request.intra_op_num_threads or default_intra_op_threads(),
                          check_hashes=request.check_hashes)
    ignore_peer_death_notice()
    owner = logits_owner(session.manifest)
    broadcast = None
    if session.comm.world_size > 1:
        broadcast = TokenBroadcast(session.comm, owner, execution_providers(request.device, session.device_id))
    prompt = np.array(request.prompt_ids, dtype=np.int64)
    stream = None
    if session.rank == 0 and request.stream:
        tokenizer = load_tokenizer(request.tokenizer_dir) if request.tokenizer_dir else None
        stream = TextStream(tokenizer, prompt.shape[0], _stdout_write)
    result = generate(
        session, prompt, request.max_new_tokens, sampler,
        broadcast=broadcast, micro_batches=request.micro_batches,
        stop_token_ids=frozenset(request.stop_token_ids or ()), on_tokens=stream,
        before_step=fault_hook(session.rank), samples=session.rank == owner,
    )
    if stream is not None and prompt.shape[0] == 1:
        _stdout_write("\n")
    report = RankReport(session.rank, result.tokens.tolist(), result.prompt_tokens, result.prompt_seconds,
                        result.decode_tokens, result.decode_seconds, result.step_seconds, result.run_calls)
    if work_dir is not None:
        (work_dir / f"rank{rank}.json").write_text(json.dumps(asdict(report)))
        # Finalize now: a spawned rank leaves with os._exit (see runtime/job.py).
        session.comm.finalize()
    return report


def rank_main_generate(work_dir: Path, request_path: str) -> None:
    """A rank spawned by `run_rank_job` (see runtime/job.py)."""
    run_generate_rank(GenerateRequest.read(Path(request_path)), work_dir)


# --------------------------------------------------------------------------- the spawning parent


def spawn_generation(request: GenerateRequest, world_size: int, extra_env: dict[str, str] | None = None
                     ) -> list[RankReport]:
    """Run the job as `world_size` local rank processes; returns every rank's report (rank order)."""
    with tempfile.TemporaryDirectory(prefix="llmir-generate-") as tmp:
        work_dir = Path(tmp)
        request.write(work_dir / REQUEST_FILE)
        try:
            run_rank_job("generation", "generate-rank", [str(work_dir / REQUEST_FILE)], world_size, work_dir,
                         extra_env=extra_env)
        except JobInterrupted:
            raise GenerationError("interrupted: every rank was stopped") from None
        reports = [_read_report(work_dir, rank) for rank in range(world_size)]
    assert all(report is not None for report in reports)
    complete = [report for report in reports if report is not None]
    if any(report.tokens != complete[0].tokens for report in complete):
        raise GenerationError("the ranks disagree on the generated tokens: "
                              + "; ".join(f"rank {r.rank}: {r.tokens}" for r in complete))
    return complete


def _read_report(work_dir: Path, rank: int) -> RankReport | None:
    path = work_dir / f"rank{rank}.json"
    return RankReport(**json.loads(path.read_text())) if path.is_file() else None
