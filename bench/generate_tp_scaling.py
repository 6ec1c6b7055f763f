"""Benchmark (b): decode tokens/s of a tp 2 plan (2 ranks x 1 intra-op thread) vs tp 1 (1 thread).

    python bench/generate_tp_scaling.py TP1_PLAN TP2_PLAN [--rounds 5] [--new-tokens 32] [--batch 1 4]

Every run is a real `generate` job (spawned mpiexec, real ranks, real ai.llmir collectives and token
broadcast). tp 1 and tp 2 alternate within each round, and the reported ratio is the median of the
per-round ratios, so that the load of other jobs on this machine hits both alike; the ratio of the
best runs (least disturbed) is printed too.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from llmir_onnx.plan.manifest import Manifest
from llmir_onnx.runtime.generate_job import GenerateRequest, spawn_generation


def vocab_size(manifest: Manifest) -> int:
    """The last dim of the logits (static in every export this project makes)."""
    (logits,) = [info for info in manifest.outputs if "logits" in info.name]
    return int(logits.shape[-1])


def decode_tokens_per_s(plan: Path, prompt: np.ndarray, new_tokens: int) -> tuple[float, list[list[int]]]:
    request = GenerateRequest(str(plan), prompt.tolist(), new_tokens, intra_op_num_threads=1, stream=False)
    report = spawn_generation(request, Manifest.read(plan).world_size)[0]
    return report.decode_tokens_per_s, report.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tp1_plan", type=Path)
    parser.add_argument("tp2_plan", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    for batch in args.batch:
        vocab = vocab_size(Manifest.read(args.tp1_plan))
        prompt = np.random.default_rng(batch).integers(0, vocab, size=(batch, args.prompt_length))
        print(f"batch {batch}, prompt {args.prompt_length}, {args.new_tokens} new tokens: decode tokens/s "
              "(all sequences)")
        print(f"{'round':>5} {'tp1 x1':>9} {'tp2 2x1':>9} {'tp2/tp1':>8}")
        ratios, tp1_values, tp2_values = [], [], []
        for index in range(args.rounds):
            plans = [args.tp1_plan, args.tp2_plan] if index % 2 == 0 else [args.tp2_plan, args.tp1_plan]
            measured = {plan: decode_tokens_per_s(plan, prompt, args.new_tokens) for plan in plans}
            (tp1, tokens1), (tp2, tokens2) = measured[args.tp1_plan], measured[args.tp2_plan]
            if tokens1 != tokens2:
                raise SystemExit(f"tp 1 and tp 2 generated different tokens: {tokens1} vs {tokens2}")
            tp1_values.append(tp1)
            tp2_values.append(tp2)
            ratios.append(tp2 / tp1)
            print(f"{index:>5} {tp1:>9.1f} {tp2:>9.1f} {ratios[-1]:>8.3f}")
        print(f"{'median':>5} {statistics.median(tp1_values):>9.1f} {statistics.median(tp2_values):>9.1f} "
              f"{statistics.median(ratios):>8.3f}   (per-round ratio min {min(ratios):.3f} max {max(ratios):.3f})")
        # Other jobs only ever slow a run down: the best run of each is the least disturbed one.
        print(f"{'best':>5} {max(tp1_values):>9.1f} {max(tp2_values):>9.1f} {max(tp2_values) / max(tp1_values):>8.3f}")


if __name__ == "__main__":
    main()
