"""Benchmark (c): pipeline micro-batching throughput against M = 1 and the ideal M·P / (M + P − 1).

    python bench/generate_microbatch.py PLAN [--batch 8] [--micro-batches 1 2 4 8] [--rounds 5]

It starts `mpiexec -n WORLD` on itself; every rank loads its RankSession ONCE (1 intra-op thread) and
then runs the same sequence of generations: each round runs every M once, in an order that rotates
from round to round, so the load of other jobs on this machine hits all M alike. A generation is
`generate()` with the token broadcast, exactly as `llmir-onnx generate` runs it.

Reported on rank 0, medians over rounds: prefill throughput (batch × prompt tokens / the prefill step,
which ends when the last stage's tokens are broadcast), decode throughput (tokens / s over the decode
steps), and the prefill speedup of M over M = 1 (median of the per-round ratios) against the ideal.
The ideal assumes a stage's time is linear in its micro-batch size. Prefill steps nearly are; decode
steps of small micro-batches are not (every micro-batch reads all the stage's weights, so at batch 8
a decode step costs about as much as at batch 1): micro-batching is for prefill-heavy batched work.
The machine's own ceiling for each M: the ideal times the micro-batch efficiency
t(B) / (M · t(B/M)) of stage 0 (rank 0's prefill run of the whole batch at M = 1 against its median
prefill run of one micro-batch at M, in the same round). On one thread a micro-batch of B/M rows costs
more than 1/M of the whole batch (smaller matrix products use the cores less well), which no schedule
can win back; with balanced stages, M·P/(M+P−1) × efficiency is the best any pipeline schedule can do
on this machine, so "of ceiling" says how much the schedule itself loses.
With --timeline, rank 0 and the last rank also print when each of their runs started and ended in
the last round (ms from the round's start), which shows the stages overlapping.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llmir_onnx.plan.manifest import Manifest


def vocab_size(manifest: Manifest) -> int:
    (logits,) = [info for info in manifest.outputs if "logits" in info.name]
    return int(logits.shape[-1])


def run_rank(args: argparse.Namespace) -> None:
    from llmir_onnx.runtime.generate import TokenBroadcast, generate, logits_owner
    from llmir_onnx.runtime.sampling import Sampler, SamplingConfig
    from llmir_onnx.runtime.session import BoundSession, RankSession

    session = RankSession(args.plan, intra_op_num_threads=1)
    manifest = session.manifest
    stages = int(manifest.mesh["pp"])
    owner = logits_owner(manifest)
    broadcast = TokenBroadcast(session.comm, owner, ["CPUExecutionProvider"]) if session.comm.world_size > 1 else None
    prompt = np.random.default_rng(0).integers(0, vocab_size(manifest), size=(args.batch, args.prompt_length))
    runs: list[tuple[float, float]] = []  # this rank's session runs of the current generation, in order
    original_run = BoundSession.run

    def timed_run(self: BoundSession, feeds: dict, keep_on_device: frozenset = frozenset()) -> dict:
        start = time.perf_counter()
        outputs = original_run(self, feeds, keep_on_device)
        runs.append((start, time.perf_counter()))
        return outputs

    BoundSession.run = timed_run  # type: ignore[method-assign]

    def once(m: int) -> tuple[float, float, list[list[int]]]:
        result = generate(session, prompt, args.new_tokens, Sampler(SamplingConfig()), broadcast=broadcast,
                          micro_batches=m, samples=session.rank == owner)
        return result.prompt_tokens_per_s, result.decode_tokens_per_s, result.tokens.tolist()

    tokens_of: dict[int, list[list[int]]] = {}
    for m in args.micro_batches:  # warm-up, and every M must give the same tokens
        tokens_of[m] = once(m)[2]
    if any(tokens != tokens_of[args.micro_batches[0]] for tokens in tokens_of.values()):
        raise SystemExit(f"rank {session.rank}: the micro-batch counts disagree on the tokens")
    prefill: dict[int, list[float]] = {m: [] for m in args.micro_batches}
    decode: dict[int, list[float]] = {m: [] for m in args.micro_batches}
    speedup: dict[int, list[float]] = {m: [] for m in args.micro_batches}
    # Stage 0's median prefill run of one micro-batch, per M, per round: the first M runs are the prefill.
    micro_batch_run: dict[int, list[float]] = {m: [] for m in args.micro_batches}
    timeline: dict[int, list[tuple[float, float]]] = {}
    for index in range(args.rounds):
        shift = index % len(args.micro_batches)
        order = args.micro_batches[shift:] + args.micro_batches[:shift]
        measured = {}
        for m in order:
            runs.clear()
            start = time.perf_counter()
            measured[m], decode_rate, _ = once(m)
            prefill[m].append(measured[m])
            decode[m].append(decode_rate)
            timeline[m] = [(a - start, b - start) for a, b in runs]
            micro_batch_run[m].append(statistics.median(b - a for a, b in runs[:m]))
        for m in args.micro_batches:
            speedup[m].append(measured[m] / measured[args.micro_batches[0]])
    if args.timeline and session.rank in (0, manifest.world_size - 1):
        for m in args.micro_batches:
            spans = " ".join(f"[{a * 1e3:.0f}-{b * 1e3:.0f}]" for a, b in timeline[m][: m + 2])
            print(f"timeline rank {session.rank} (stage {session.entry.coords['pp']}) M={m}: {spans} ms", flush=True)
    if session.rank != 0:
        return
    time.sleep(0.2)  # let the last rank's timeline lines out first
    print(f"plan {args.plan}: tp {manifest.mesh['tp']} x pp {stages}, batch {args.batch}, prompt "
          f"{args.prompt_length}, {args.new_tokens} new tokens, 1 intra-op thread per rank, {args.rounds} rounds")
    print(f"{'M':>3} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill vs M=1':>15} {'ideal':>7} "
          f"{'of ideal':>9} {'min..max':>13} {'best/best':>10} {'mb effic.':>10} {'ceiling':>8} {'of ceiling':>11}")
    first = args.micro_batches[0]
    for m in args.micro_batches:
        ideal = m * stages / (m + stages - 1)
        median = statistics.median(speedup[m])
        # Per round, so that both run times share that round's load.
        efficiency = statistics.median(
            (first * whole) / (m * part) for whole, part in zip(micro_batch_run[first], micro_batch_run[m], strict=True)
        )
        ceiling = ideal * efficiency
        print(f"{m:>3} {statistics.median(prefill[m]):>14.1f} {statistics.median(decode[m]):>13.1f} {median:>15.3f} "
              f"{ideal:>7.3f} {median / ideal:>9.2f} {min(speedup[m]):>6.2f}..{max(speedup[m]):.2f} "
              f"{max(prefill[m]) / max(prefill[first]):>10.3f} {efficiency:>10.3f} {ceiling:>8.3f} "
              f"{median / ceiling:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--timeline", action="store_true")
    args = parser.parse_args()
    if "PMI_RANK" in os.environ:
        run_rank(args)
        return
    from llmir_onnx.runtime.job import mpiexec_path

    world = Manifest.read(args.plan).world_size
    raise SystemExit(subprocess.call([mpiexec_path(), "-n", str(world), sys.executable, *sys.argv]))


if __name__ == "__main__":
    main()
