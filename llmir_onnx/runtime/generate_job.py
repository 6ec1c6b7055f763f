"""A generation job: one process per rank, started by us or by the user's launcher, and its outcome.

`generate_plan` is the entry point (`llmir-onnx generate` parses its options and prints its outcome): it
checks the options and the plan's files before any rank starts, runs the ranks, and with `check` compares
the tokens with the original model's greedy ones.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmir_onnx.errors import GenerationError, VerificationError, check_output_path
from llmir_onnx.plan.integrity import check_plan_files
from llmir_onnx.plan.manifest import Manifest
from llmir_onnx.plan.timeline import write_timeline
from llmir_onnx.runtime.generate import (
    TokenBroadcast,
    TokenRates,
    generate,
    logits_name,
    logits_owner,
    recompute_greedy,
    token_broadcast_model,
)
from llmir_onnx.runtime.job import JobInterrupted, fault_hook, ignore_peer_death_notice, run_rank_job
from llmir_onnx.runtime.launch import LAUNCHER_NONE, detect_rank_env
from llmir_onnx.runtime.sampling import Sampler, SamplingConfig
from llmir_onnx.runtime.session import DEVICE_CPU, DEVICE_CUDA, RankSession, execution_providers

if TYPE_CHECKING:  # imported where it is used: only --tokenizer needs the package
    from tokenizers import Tokenizer

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
    # token_broadcast_model's bytes, written by the launcher of spawned ranks (None: each rank builds them).
    token_broadcast_model: str | None = None

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


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """`tokenizers.Tokenizer` from DIR/tokenizer.json."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise GenerationError(f"{str(path)!r} does not exist; --tokenizer takes a folder holding tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise GenerationError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from error
    return Tokenizer.from_file(str(path))


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each prompt text."""
    return [list(tokenizer.encode(text).ids) for text in texts]


def eos_token_ids(tokenizer: Tokenizer, tokenizer_dir: Path) -> list[int]:
    """The tokenizer's end-of-sequence id (tokenizer_config.json's eos_token), if it names one."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return []
    eos = json.loads(config_path.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    token_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    return [] if token_id is None else [int(token_id)]


class TextStream:
    """Prints the first sequence's new text as tokens arrive (ids when there is no tokenizer)."""

    def __init__(self, tokenizer: Tokenizer | None, batch: int, write: Callable[[str], None]) -> None:
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
        text = self._tokenizer.decode(self._ids)
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
        model = Path(request.token_broadcast_model).read_bytes() if request.token_broadcast_model else None
        broadcast = TokenBroadcast(session.comm, owner, execution_providers(request.device, session.device_id),
                                   model)
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
        broadcast_model = work_dir / "token_broadcast.onnx"
        broadcast_model.write_bytes(token_broadcast_model(world_size))
        replace(request, token_broadcast_model=str(broadcast_model)).write(work_dir / REQUEST_FILE)
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


# --------------------------------------------------------------------------- the entry point


@dataclass(frozen=True)
class GenerationOutcome:
    """A generation job's result as rank 0 saw it (`generate_plan`)."""

    report: RankReport  # rank 0's tokens and timings
    prompt_ids: list[list[int]]
    world_size: int
    # With `check`: the original model's greedy tokens (recomputed without a KV cache), and where the plan's
    # tokens first differ from them (None: they are equal).
    reference_tokens: list[list[int]] | None = None
    difference: str | None = None

    def record(self) -> dict[str, Any]:
        """The tokens and rates as `generate --save-tokens` writes them (JSON)."""
        result: dict[str, Any] = {
            "tokens": self.report.tokens, "prompt_ids": self.prompt_ids,
            "prompt_tokens_per_s": self.report.prompt_tokens_per_s,
            "decode_tokens_per_s": self.report.decode_tokens_per_s, "world_size": self.world_size,
        }
        if self.reference_tokens is not None:
            result["reference_tokens"] = self.reference_tokens
        return result

    def raise_if_differs(self) -> None:
        if self.difference is not None:
            raise VerificationError(f"the plan's tokens differ from the original model's greedy tokens (recomputed "
                                    f"without a KV cache): {self.difference}")


def _check_token_ids(manifest: Manifest, rows: list[list[int]]) -> None:
    """Refuse prompt ids outside the vocabulary (the logits' last dim, where the model fixes it): a Gather
    would fail in a rank on a too large one and silently count a negative one from the end."""
    logits = next(info for info in manifest.outputs if info.name == logits_name([o.name for o in manifest.outputs]))
    vocab = logits.shape[-1] if logits.shape and isinstance(logits.shape[-1], int) else None
    outside = sorted({token for row in rows for token in row if token < 0 or (vocab is not None and token >= vocab)})
    if outside:
        allowed = f"0 to {vocab - 1}" if vocab is not None else "0 or more"
        raise GenerationError(f"prompt token id(s) {outside[:5]} are outside the model's vocabulary ({allowed}); "
                              "pass ids from the model's tokenizer")


def generate_plan(
    plan_dir: str | Path,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    micro_batches: int = 1,
    stop_token_ids: Sequence[int] = (),
    device: str = DEVICE_CPU,
    intra_op_num_threads: int | None = None,
    tokenizer_dir: str | Path | None = None,
    stream: bool = False,
    check: bool = False,
    model_path: str | Path | None = None,
    check_hashes: bool = True,
    timeline: Path | None = None,
    on_start: Callable[[], None] | None = None,
) -> GenerationOutcome | None:
    """Generate with the plan in `plan_dir` from `prompt_ids` (rows of equal length): prefill, then decode
    with per-rank KV caches, every rank a process. Returns rank 0's outcome; None in the other ranks of a
    job the user's launcher started (each process of such a job calls this and runs its own rank).

    Every option and the plan's files (paths, sizes and, with `check_hashes`, digests) are checked before any
    rank starts. Sampling: greedy unless `temperature` > 0 (`SamplingConfig`). Generation stops after
    `max_new_tokens`, or once every row produced one of `stop_token_ids`. `stream`: rank 0 prints the first
    row's new tokens as they come (text with `tokenizer_dir`, a folder with tokenizer.json). `check` (greedy
    only): the original model (`model_path`, else the manifest's source) recomputes its greedy tokens without
    a KV cache, and the outcome says where the plan's first differ. `timeline`: every rank's run calls are
    written there (for `report --timeline`); it needs ranks started here. `on_start` is called on rank 0
    once everything is checked, just before the ranks start (the CLI prints the prompt text there).
    """
    plan_dir = Path(plan_dir)
    manifest = Manifest.read(plan_dir)
    rows = [[int(token) for token in row] for row in prompt_ids]  # plain ints: the request is JSON
    if not rows or any(not row for row in rows):
        raise GenerationError("a prompt is empty; every prompt needs at least one token")
    if len({len(row) for row in rows}) != 1:
        raise GenerationError(
            f"batched prompts must have the same number of tokens (got {[len(row) for row in rows]}); "
            "padding is not supported"
        )
    _check_token_ids(manifest, rows)
    # The last step runs on the prompt and every generated token but the last.
    manifest.check_cache_tokens(len(rows[0]) + max_new_tokens - 1, f"a {len(rows[0])}-token prompt and "
                                f"--max-new-tokens {max_new_tokens}")
    if check and temperature != 0.0:
        raise GenerationError("--check compares greedy tokens: drop --temperature/--top-k/--top-p")
    source = Path(model_path) if model_path is not None else Path(manifest.source["path"])
    if check and not source.is_file():
        raise GenerationError(f"--check needs the original model, and {str(source)!r} is gone; pass its path "
                              "with --model")
    SamplingConfig(temperature, top_k, top_p, seed)  # option errors here, before any rank starts
    if micro_batches > len(rows):
        raise GenerationError(f"--micro-batches {micro_batches} exceeds the batch of {len(rows)} prompt(s)")
    if device not in (DEVICE_CPU, DEVICE_CUDA):
        raise GenerationError(f"--device {device!r}: use {DEVICE_CPU} or {DEVICE_CUDA}")
    request = GenerateRequest(
        plan_dir=str(plan_dir.resolve()), prompt_ids=rows, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, micro_batches=micro_batches, stop_token_ids=list(stop_token_ids),
        device=device, intra_op_num_threads=intra_op_num_threads,
        tokenizer_dir=str(Path(tokenizer_dir).resolve()) if tokenizer_dir is not None else None, stream=stream,
    )
    env = detect_rank_env()
    if timeline is not None and env.launcher != LAUNCHER_NONE:
        raise GenerationError("--timeline needs the run calls of every rank: let llmir-onnx start the ranks "
                              "(run it without mpiexec/srun)")
    if timeline is not None:
        check_output_path(Path(timeline), "--timeline")
    if env.launcher == LAUNCHER_NONE:
        # Once here for every rank, before any starts; the ranks then check only paths and sizes.
        check_plan_files(plan_dir, manifest, check_hashes=check_hashes)
        request.check_hashes = False
    else:
        request.check_hashes = check_hashes
    if env.rank == 0 and on_start is not None:
        on_start()
    if env.launcher == LAUNCHER_NONE:
        reports = spawn_generation(request, manifest.world_size)
        report = reports[0]
        if timeline is not None:
            write_timeline(timeline, manifest, {r.rank: r.run_calls for r in reports})
    else:
        report = run_generate_rank(request)
        if env.rank != 0:
            return None
    if not check:
        return GenerationOutcome(report, rows, manifest.world_size)
    reference = recompute_greedy(source, np.array(rows, dtype=np.int64), max_new_tokens, frozenset(stop_token_ids))
    return GenerationOutcome(report, rows, manifest.world_size, reference.tokens.tolist(),
                             reference.first_difference(report.tokens))
