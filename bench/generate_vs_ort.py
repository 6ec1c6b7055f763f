"""Benchmark (a): a tp 1 x pp 1 plan through RankSession vs plain onnxruntime on the original model.

    python bench/generate_vs_ort.py MODEL.onnx PLAN_DIR [--threads 2] [--rounds 7] [--new-tokens 32]

One process, three ways to generate the same greedy tokens, interleaved round by round (the order
rotates) so that load from other jobs hits all of them alike:
  plan      RankSession on the plan's rank 0 (ai.llmir library registered, I/O binding, generate())
  original  OriginalSession (same loop, same I/O binding) on the original model
  plain     a hand-written loop over InferenceSession.run with numpy arrays (what a user writes)
Prints decode tokens/s per round, the medians and the ratios plan/plain and plan/original (median of
the per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llmir_onnx.runtime.generate import generate, kv_cache_pairs
from llmir_onnx.runtime.sampling import Sampler, SamplingConfig
from llmir_onnx.runtime.session import OriginalSession, RankSession


def plain_decode_tokens_per_s(
    session: ort.InferenceSession, prompt: np.ndarray, new_tokens: int
) -> tuple[float, list[int]]:
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = [arg.name for arg in session.get_outputs()]
    pairs = kv_cache_pairs(list(inputs), outputs)
    batch = prompt.shape[0]
    past = {
        name: np.zeros((batch, inputs[name].shape[1], 0, inputs[name].shape[3]), np.float32) for name in pairs.values()
    }
    ids, tokens, total = prompt, [], 0
    start = time.perf_counter()
    for step in range(new_tokens):
        if step == 1:
            start = time.perf_counter()
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, total + ids.shape[1]), np.int64),
                 "position_ids": np.arange(total, total + ids.shape[1], dtype=np.int64)[None].repeat(batch, 0), **past}
        results = dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in inputs}), strict=True))
        total += ids.shape[1]
        past = {pairs[name]: results[name] for name in pairs}
        next_ids = np.argmax(results["logits"][:, -1, :], axis=-1)
        tokens.append(int(next_ids[0]))
        ids = next_ids[:, None].astype(np.int64)
    return batch * (new_tokens - 1) / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    original = OriginalSession(args.model, intra_op_num_threads=args.threads)
    plan = RankSession(args.plan, intra_op_num_threads=args.threads)
    vocab = int(plain.get_outputs()[0].shape[-1])
    prompt = np.random.default_rng(0).integers(0, vocab, size=(1, args.prompt_length)).astype(np.int64)
    greedy = Sampler(SamplingConfig())

    def run(name: str) -> tuple[float, list[int]]:
        if name == "plain":
            return plain_decode_tokens_per_s(plain, prompt, args.new_tokens)
        session = plan if name == "plan" else original
        result = generate(session, prompt, args.new_tokens, greedy)
        return result.decode_tokens_per_s, result.tokens[0].tolist()

    names = ["plan", "original", "plain"]
    for name in names:  # warm-up (first-run allocations), and the tokens must agree
        run(name)
    samples: dict[str, list[float]] = {name: [] for name in names}
    ratios_plain, ratios_original = [], []
    print(f"model {args.model}, plan {args.plan}, {args.threads} intra-op threads, prompt {args.prompt_length}, "
          f"{args.new_tokens} new tokens, batch 1; decode tokens/s")
    print(f"{'round':>5} {'plan':>10} {'original':>10} {'plain':>10} {'plan/plain':>11} {'plan/orig':>10}")
    for index in range(args.rounds):
        order = names[index % 3:] + names[: index % 3]
        measured, tokens = {}, {}
        for name in order:
            measured[name], tokens[name] = run(name)
            samples[name].append(measured[name])
        if not tokens["plan"] == tokens["original"] == tokens["plain"]:
            raise SystemExit(f"the three runs disagree on the tokens: {tokens}")
        ratios_plain.append(measured["plan"] / measured["plain"])
        ratios_original.append(measured["plan"] / measured["original"])
        print(f"{index:>5} {measured['plan']:>10.1f} {measured['original']:>10.1f} {measured['plain']:>10.1f} "
              f"{ratios_plain[-1]:>11.3f} {ratios_original[-1]:>10.3f}")
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{'median':>5} {medians['plan']:>10.1f} {medians['original']:>10.1f} {medians['plain']:>10.1f} "
          f"{statistics.median(ratios_plain):>11.3f} {statistics.median(ratios_original):>10.3f}")
    print(f"per-round ratio plan/plain: min {min(ratios_plain):.3f} max {max(ratios_plain):.3f}")
    best = {name: max(values) for name, values in samples.items()}
    print(f"{'best':>5} {best['plan']:>10.1f} {best['original']:>10.1f} {best['plain']:>10.1f} "
          f"{best['plan'] / best['plain']:>11.3f} {best['plan'] / best['original']:>10.3f}")


if __name__ == "__main__":
    main()
