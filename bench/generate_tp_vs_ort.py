"""Benchmark: decode tokens/s of tp 1 and tp 2 plans (real `generate` jobs) vs plain onnxruntime.

    python bench/generate_tp_vs_ort.py MODEL.onnx TP1_PLAN TP2_PLAN [--rounds 7] [--batch 1 8]
        [--extra NAME=PLAN[,VAR=VALUE...] ...]

Per round and batch, four configurations run one after the other, in an order that rotates from round
to round so that the load of other jobs on this machine hits them alike:
  ort1   plain onnxruntime on the original model, 1 intra-op thread (an `InferenceSession.run` loop
         with numpy arrays, what a user writes; the session is created once, before the rounds)
  ort2   the same with 2 intra-op threads
  tp1    the tp 1 plan: a real `generate` job (spawned mpiexec, 1 rank x 1 thread)
  tp2    the tp 2 plan: a real `generate` job (2 ranks x 1 thread, ai.llmir collectives, token broadcast)
`--extra NAME=PLAN` adds more plans (e.g. a --vocab-parallel or --no-fold-shapes tp 2 plan) to the same
rotation, 1 thread per rank, with their ratios to ort1 and ort2; `,VAR=VALUE` sets environment variables of
its ranks (e.g. LLMIR_COMM_WAIT=spin). All of them must produce the same greedy
tokens in every round (checked; a difference stops the run).
Decode tokens/s counts every sequence of the batch and leaves out the first (prefill) step.
Printed: each round's figures and ratios, the medians of the per-round ratios (the figure to quote), and
the ratios of the best runs (other jobs only ever slow a run down).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from llmir_onnx.model_facts import kv_cache_pairs
from llmir_onnx.plan.integrity import check_plan_files
from llmir_onnx.plan.manifest import Manifest
from llmir_onnx.runtime.generate_job import GenerateRequest, spawn_generation

CONFIGS = ("ort1", "ort2", "tp1", "tp2")
RATIOS = (("tp2", "ort1"), ("tp2", "ort2"), ("tp2", "tp1"), ("tp1", "ort1"))


def plain_decode(session: ort.InferenceSession, prompt: np.ndarray, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Greedy decode with a plain `InferenceSession.run` loop; decode tokens/s (all rows) and the tokens."""
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = [arg.name for arg in session.get_outputs()]
    pairs = kv_cache_pairs(list(inputs), outputs)
    batch = prompt.shape[0]
    past = {name: np.zeros((batch, inputs[name].shape[1], 0, inputs[name].shape[3]), np.float32)
            for name in pairs.values()}
    ids, generated, total = prompt.astype(np.int64), [], 0
    start = time.perf_counter()
    for step in range(new_tokens):
        if step == 1:  # decode only: the first step is the prefill
            start = time.perf_counter()
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, total + ids.shape[1]), np.int64),
                 "position_ids": np.arange(total, total + ids.shape[1], dtype=np.int64)[None].repeat(batch, 0),
                 **past}
        results = dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in inputs}),
                           strict=True))
        total += ids.shape[1]
        past = {pairs[name]: results[name] for name in pairs}
        next_ids = np.argmax(results["logits"][:, -1, :], axis=-1).astype(np.int64)
        generated.append(next_ids)
        ids = next_ids[:, None]
    seconds = time.perf_counter() - start
    return batch * (new_tokens - 1) / seconds, np.stack(generated, axis=1).tolist()


def plan_decode(plan: Path, prompt: np.ndarray, new_tokens: int, env: dict[str, str] | None = None
                ) -> tuple[float, list[list[int]]]:
    """A real `generate` job on the plan, 1 intra-op thread per rank. The plan files' sha256 are checked once
    in main(), not by every job (hashing 800 MB per rank would only lengthen the run)."""
    request = GenerateRequest(str(plan), prompt.tolist(), new_tokens, intra_op_num_threads=1, stream=False,
                              check_hashes=False)
    report = spawn_generation(request, Manifest.read(plan).world_size, extra_env=env)[0]
    return report.decode_tokens_per_s, report.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("tp1_plan", type=Path)
    parser.add_argument("tp2_plan", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=PLAN")
    args = parser.parse_args()
    plans = {"tp1": args.tp1_plan, "tp2": args.tp2_plan}
    envs: dict[str, dict[str, str]] = {}
    for item in args.extra:
        name, _, rest = item.partition("=")
        path, *settings = rest.split(",")
        if not name or not path or name in (*CONFIGS, *plans) or any("=" not in s for s in settings):
            raise SystemExit(f"--extra {item!r}: give NAME=PLAN[,VAR=VALUE...] with a new name")
        plans[name] = Path(path)
        envs[name] = dict(setting.split("=", 1) for setting in settings)
    for plan in plans.values():
        check_plan_files(plan, Manifest.read(plan))
    configs = (*CONFIGS, *(name for name in plans if name not in CONFIGS))
    extra_ratios = tuple((name, base) for name in configs[len(CONFIGS):] for base in ("ort1", "ort2"))

    sessions = {}
    for name, threads in (("ort1", 1), ("ort2", 2)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions[name] = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    vocab = int(sessions["ort1"].get_outputs()[0].shape[-1])

    def run(name: str, prompt: np.ndarray) -> tuple[float, list[list[int]]]:
        if name in sessions:
            return plain_decode(sessions[name], prompt, args.new_tokens)
        return plan_decode(plans[name], prompt, args.new_tokens, envs.get(name))

    ratios_of = (*RATIOS, *extra_ratios)
    for batch in args.batch:
        prompt = np.random.default_rng(batch).integers(0, vocab, size=(batch, args.prompt_length))
        for name in ("ort1", "ort2"):  # warm-up: first-run allocations
            run(name, prompt)
        print(f"batch {batch}, prompt {args.prompt_length}, {args.new_tokens} new tokens: decode tokens/s "
              "(all sequences)", flush=True)
        ratio_names = [f"{a}/{b}" for a, b in ratios_of]
        print(f"{'round':>6} " + " ".join(f"{name:>7}" for name in configs) + "  "
              + " ".join(f"{name:>9}" for name in ratio_names), flush=True)
        samples: dict[str, list[float]] = {name: [] for name in configs}
        ratios: dict[str, list[float]] = {name: [] for name in ratio_names}
        for index in range(args.rounds):
            order = configs[index % len(configs):] + configs[: index % len(configs)]
            measured, tokens = {}, {}
            for name in order:
                measured[name], tokens[name] = run(name, prompt)
                samples[name].append(measured[name])
            if any(tokens[name] != tokens["ort1"] for name in configs):
                raise SystemExit(f"batch {batch} round {index}: the configurations disagree on the tokens: {tokens}")
            for (a, b), name in zip(ratios_of, ratio_names, strict=True):
                ratios[name].append(measured[a] / measured[b])
            print(f"{index:>6} " + " ".join(f"{measured[name]:>7.1f}" for name in configs) + "  "
                  + " ".join(f"{ratios[name][-1]:>9.3f}" for name in ratio_names), flush=True)
        print(f"{'median':>6} " + " ".join(f"{statistics.median(samples[name]):>7.1f}" for name in configs) + "  "
              + " ".join(f"{statistics.median(ratios[name]):>9.3f}" for name in ratio_names)
              + "   (ratios: medians of the per-round ratios)")
        best = {name: max(values) for name, values in samples.items()}
        print(f"{'best':>6} " + " ".join(f"{best[name]:>7.1f}" for name in configs) + "  "
              + " ".join(f"{best[a] / best[b]:>9.3f}" for a, b in ratios_of))
        for name in ratio_names:
            print(f"  {name}: per-round min {min(ratios[name]):.3f} max {max(ratios[name]):.3f}")
        print("  tokens: all configurations equal in every round", flush=True)


if __name__ == "__main__":
    main()
