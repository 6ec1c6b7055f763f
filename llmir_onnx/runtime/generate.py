"""Token generation over a plan's ranks: prefill, then decode with per-rank KV caches.

Every rank runs the same loop (`generate`) on its own `RankSession`:

- feeds: `input_ids` [B, n], `attention_mask` ones [B, past + n], `position_ids` [B, n] and this
  rank's past KV cache. A rank only gets the inputs its model takes (a later pipeline stage takes no
  `input_ids`: its hidden states arrive by Recv inside its graph).
- the KV cache stays per rank and per micro-batch: each `present.*` output (this rank's heads, this
  stage's layers) becomes the matching `past.*` input of the next step, kept as an OrtValue on the
  session's device (I/O binding: on CUDA it never visits the host).
- next token: the lowest rank that holds the full logits (the last pipeline stage; with tp every
  rank of that stage holds them) samples, and `TokenBroadcast` gives the ids to every rank with one
  ai.llmir AllReduce(sum) over the world in which the other ranks contribute zeros. Every rank thus
  continues with bit-identical tokens, whatever the last bits of its own logits.

Pipeline micro-batching (`micro_batches` M > 1): the batch is cut into M micro-batches with their
own KV caches, and at each step every rank runs micro-batch 0, 1, ..., M-1 in order, then joins the
token broadcast. Send/Recv live inside the stage graphs, so this program order is the whole schedule:
stage s runs micro-batch i while stage s+1 runs micro-batch i-1 (stage s's Send of i-1 completes when
s+1's Recv takes it; small decode messages go eagerly, larger prefill ones wait for the Recv, so at
most one micro-batch is in flight between two stages). One step then takes M + P - 1 stage-slots of
a micro-batch instead of P slots of the whole batch: the GPipe bound, speedup M·P / (M + P - 1) when
a stage's time is linear in its batch. The broadcast at the end of each step is the step's barrier
(the first stage needs the sampled tokens before it can start the next step).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmir_onnx.errors import GenerationError
from llmir_onnx.model_facts import is_kv_output_name, kv_cache_pairs
from llmir_onnx.runtime.sampling import Sampler
from llmir_onnx.runtime.session import BoundSession, OriginalSession, Tensor

# onnxruntime comes from an optional extra (cpu or gpu): it is imported inside the functions that make
# sessions, so importing this module does not need it.
if TYPE_CHECKING:
    import onnxruntime

    from llmir_onnx.plan.manifest import Manifest
    from llmir_onnx.runtime.launch import CommContext

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
def logits_name(output_names: list[str]) -> str:
    """The original model's logits output: the one named *logits*, else the first non-cache output."""
    named = [name for name in output_names if "logits" in name]
    if named:
        return named[0]
    others = [name for name in output_names if not is_kv_output_name(name)]
    if not others:
        raise GenerationError(f"the model has no logits output (outputs: {output_names})")
    return others[0]


def logits_owner(manifest: Manifest) -> int:
    """The lowest rank that produces the whole logits tensor (the one that samples)."""
    name = logits_name([info.name for info in manifest.outputs])
    holders = [entry.rank for entry in manifest.ranks
               for binding in entry.outputs if binding.original == name and binding.dim is None]
    if not holders:
        raise GenerationError(
            f"no rank of the plan holds the whole {name!r} (vocabulary-parallel logits?); generate needs one "
            "rank with full logits: partition without --vocab-parallel"
        )
    return min(holders)


def token_broadcast_model(world_size: int) -> bytes:
    """TokenBroadcast's one-node model, serialized: an ai.llmir AllReduce(sum) of int64 ids over every rank.

    onnx is imported here only: a job's launcher builds these bytes once and its spawned ranks read them,
    so that rank processes never import onnx (seconds of CPU each; docs/RUNTIME.md)."""
    from onnx import TensorProto, helper

    node = helper.make_node(
        "AllReduce", ["token_ids"], ["all_token_ids"], domain="ai.llmir", name="token_broadcast",
        reduction="sum", group=list(range(world_size)),
    )
    graph = helper.make_graph(
        [node], "llmir_token_broadcast",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("all_token_ids", TensorProto.INT64, ["batch"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.llmir", 1)])
    model.ir_version = 8
    return model.SerializeToString()


class TokenBroadcast:
    """Gives the owner's token ids to every rank: an ai.llmir AllReduce(sum) where others send zeros.

    A one-node onnxruntime session, created once and reused every step, with the same providers as
    the rank's model (on CUDA the CUDA kernel runs it, so torchrun-style worlds without MPI work too).
    `model`: token_broadcast_model(world size), when the launcher built it already.
    """

    def __init__(self, comm: CommContext, owner: int, providers: list[object], model: bytes | None = None) -> None:
        import onnxruntime as ort

        self.comm = comm
        self.owner = owner
        self._session: onnxruntime.InferenceSession = ort.InferenceSession(
            model or token_broadcast_model(comm.world_size),
            comm.session_options(intra_op_num_threads=1), providers=providers,
        )

    def __call__(self, token_ids: np.ndarray | None, batch: int) -> np.ndarray:
        if self.comm.rank == self.owner:
            if token_ids is None:
                raise GenerationError(f"rank {self.owner} owns the logits but sampled nothing")
            contribution = token_ids.astype(np.int64)
        else:
            contribution = np.zeros(batch, dtype=np.int64)
        with self.comm.stretched_run():  # LLMIR_COMPUTE_STRETCH: the sampling before it is host work
            (result,) = self._session.run(None, {"token_ids": contribution})
        return result


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
class GenerationResult(TokenRates):
    tokens: np.ndarray  # [batch, generated] int64
    prompt_tokens: int
    prompt_seconds: float
    decode_tokens: int
    decode_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    # Every session run of this rank: (step, micro-batch, start, end) in CLOCK_MONOTONIC seconds, which
    # is system-wide on Linux, so the ranks of one host line up (the report's pipeline timeline).
    run_calls: list[tuple[int, int, float, float]] = field(default_factory=list)


def _empty_past(session: BoundSession, name: str, batch: int) -> np.ndarray:
    info = session.input_info(name)
    if len(info.shape) != 4 or not isinstance(info.shape[1], int) or not isinstance(info.shape[3], int):
        raise GenerationError(
            f"KV cache input {name!r} has shape {list(info.shape)}; generate expects "
            "[batch, kv_heads, past, head_dim] with static kv_heads and head_dim"
        )
    return np.zeros((batch, info.shape[1], 0, info.shape[3]), dtype=info.numpy_dtype)


def _step_feeds(session: BoundSession, ids: np.ndarray, past_length: int, past: dict[str, Tensor]
                ) -> dict[str, Tensor]:
    batch, new = ids.shape
    feeds: dict[str, Tensor] = dict(past)
    for name in session.input_names:
        if name in feeds:
            continue
        if name == INPUT_IDS:
            feeds[name] = ids.astype(session.input_info(name).numpy_dtype)
        elif name == ATTENTION_MASK:
            feeds[name] = np.ones((batch, past_length + new), dtype=session.input_info(name).numpy_dtype)
        elif name == POSITION_IDS:
            positions = np.arange(past_length, past_length + new)
            feeds[name] = np.broadcast_to(positions, (batch, new)).astype(session.input_info(name).numpy_dtype)
        else:
            raise GenerationError(
                f"the model takes input {name!r}, which generate does not know how to fill (it fills "
                f"{INPUT_IDS}, {ATTENTION_MASK}, {POSITION_IDS} and past.* KV caches)"
            )
    return feeds


def generate(
    session: BoundSession,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    sampler: Sampler,
    *,
    broadcast: Callable[[np.ndarray | None, int], np.ndarray] | None = None,
    micro_batches: int = 1,
    stop_token_ids: frozenset[int] = frozenset(),
    on_tokens: Callable[[int, np.ndarray], None] | None = None,
    before_step: Callable[[int], None] | None = None,
    samples: bool = True,
) -> GenerationResult:
    """Run prefill + decode on this rank; every rank of the job calls this with the same arguments.

    `broadcast(sampled_or_None, batch)` hands the sampled ids to every rank (None for a single
    process). `on_tokens(step, ids)` sees each step's tokens (for streaming). Generation stops after
    `max_new_tokens` or when every row has produced one of `stop_token_ids`. Only a rank with
    `samples` True draws from its sampler (the broadcast's owner), so the seeded stream is consumed once.
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise GenerationError(f"prompt ids must be [batch, length>0], got shape {list(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    batch, prompt_length = prompt_ids.shape
    if not 1 <= micro_batches <= batch:
        raise GenerationError(f"--micro-batches {micro_batches} must be between 1 and the batch size {batch}")
    cache_pairs = kv_cache_pairs(session.input_names, session.output_names)
    logits = logits_name(session.output_names) if any(
        not is_kv_output_name(name) for name in session.output_names) else None
    if broadcast is None and logits is None:
        raise GenerationError("this session produces no logits and there is no broadcast to receive tokens from")
    row_groups = np.array_split(np.arange(batch), micro_batches)
    pasts: list[dict[str, Tensor]] = [
        {past: _empty_past(session, past, len(rows)) for past in cache_pairs.values()} for rows in row_groups
    ]
    step_ids = [prompt_ids[rows] for rows in row_groups]
    past_length = 0
    generated: list[np.ndarray] = []
    finished = np.zeros(batch, dtype=bool)
    step_seconds: list[float] = []
    run_calls: list[tuple[int, int, float, float]] = []
    keep = frozenset(cache_pairs)
    start = time.perf_counter()
    for step in range(max_new_tokens):
        if before_step is not None:
            before_step(step)
        step_start = time.perf_counter()
        last_logits = []
        for index in range(micro_batches):
            feeds = _step_feeds(session, step_ids[index], past_length, pasts[index])
            run_start = time.monotonic()
            outputs = session.run(feeds, keep)
            run_calls.append((step, index, run_start, time.monotonic()))
            pasts[index] = {past: outputs[present] for present, past in cache_pairs.items()}
            if logits is not None:
                last_logits.append(outputs[logits][:, -1, :])
        sampled = sampler(np.concatenate(last_logits)) if last_logits and samples else None
        tokens = broadcast(sampled, batch) if broadcast is not None else sampled
        assert tokens is not None
        step_seconds.append(time.perf_counter() - step_start)
        past_length += step_ids[0].shape[1]
        generated.append(tokens)
        if on_tokens is not None:
            on_tokens(step, tokens)
        finished |= np.isin(tokens, list(stop_token_ids))
        if finished.all():
            break
        step_ids = [tokens[rows, None] for rows in row_groups]
    total = time.perf_counter() - start
    steps = len(generated)
    return GenerationResult(
        tokens=np.stack(generated, axis=1),
        prompt_tokens=batch * prompt_length,
        prompt_seconds=step_seconds[0],
        decode_tokens=batch * (steps - 1),
        decode_seconds=total - step_seconds[0],
        step_seconds=step_seconds,
        run_calls=run_calls,
    )


@dataclass(frozen=True)
class RecomputedGreedy:
    """Greedy tokens of the original model recomputed without a KV cache, with each pick's margin."""

    tokens: np.ndarray  # [batch, generated] int64
    margins: np.ndarray  # [batch, generated] float64: top-1 minus top-2 logit of each pick

    def first_difference(self, tokens: list[list[int]]) -> str | None:
        """Where `tokens` first differ from these, with the margin there (None when they are equal)."""
        expected = self.tokens.tolist()
        if len(tokens) != len(expected):
            return f"{len(tokens)} rows generated, the original has {len(expected)}"
        for row, (ours, theirs) in enumerate(zip(tokens, expected, strict=True)):
            if ours == theirs:
                continue
            step = next((i for i, (got, want) in enumerate(zip(ours, theirs, strict=False)) if got != want), None)
            if step is None:
                return f"row {row}: the plan generated {len(ours)} tokens, the original {len(theirs)}"
            return (f"row {row} step {step}: the plan chose {ours[step]}, the original {theirs[step]} (its top-2 "
                    f"logit margin there is {self.margins[row, step]:.3g})")
        return None


def recompute_greedy(model_path: str | Path, prompt_ids: np.ndarray, max_new_tokens: int,
                     stop_token_ids: frozenset[int] = frozenset()) -> RecomputedGreedy:
    """The original model's greedy tokens WITHOUT a KV cache: every step runs the whole sequence so far
    from an empty (0-token) past and takes the argmax of the last position's logits.

    An independent reference for `generate`: it shares no cache bookkeeping with the loop under test
    (no present-to-past hand-over, no past lengths in masks or positions), so a bug there cannot hide
    on both sides as it could if the original ran through `generate` too. It costs O(n^2) in the
    generated length.
    Same stop rule as `generate`: stop after `max_new_tokens` or once every row produced a stop id.
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise GenerationError(f"prompt ids must be [batch, length>0], got shape {list(prompt_ids.shape)}")
    session = OriginalSession(model_path)
    batch = prompt_ids.shape[0]
    pasts = {past: _empty_past(session, past, batch)
             for past in kv_cache_pairs(session.input_names, session.output_names).values()}
    logits = logits_name(session.output_names)
    sequence = prompt_ids.astype(np.int64)
    tokens: list[np.ndarray] = []
    margins: list[np.ndarray] = []
    finished = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        last = session.run(_step_feeds(session, sequence, 0, pasts))[logits][:, -1, :].astype(np.float64)
        picked = np.argmax(last, axis=-1).astype(np.int64)
        top_two = np.sort(last, axis=-1)[:, -2:]
        tokens.append(picked)
        margins.append(top_two[:, 1] - top_two[:, 0])
        finished |= np.isin(picked, list(stop_token_ids))
        if finished.all():
            break
        sequence = np.concatenate([sequence, picked[:, None]], axis=1)
    return RecomputedGreedy(np.stack(tokens, axis=1), np.stack(margins, axis=1))
