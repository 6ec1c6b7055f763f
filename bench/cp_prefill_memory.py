"""Per-rank prefill activation peak of a long prompt at cp 1, 2 and 4 (context parallelism, `--cp`).

    .venv/bin/python bench/cp_prefill_memory.py [--seq 4096] [--check]

Method: a synthetic LLaMA (models/make_synthetic.py, float32, 4096 positions) is partitioned at tp 1 with
cp 1, 2 and 4 in this one run, the memory plan sized at batch 1 x `--seq` tokens (`--max-seq`); the figures
are each plan's manifest entries for its rank 0 (every cp rank runs the same graph on as many tokens):
the predicted activation peak (liveness over the graph's node order, `plan/memory.py`; the prefill phase
is the peak), the node where it falls, the KV cache and the bytes its collectives move. The ratios are
against cp 1 from the same run. A prediction, not a measurement: bench/memory_peak.py compares the
predictor with onnxruntime's measured peak on this CPU.

`--check`: then a prompt of `--check-tokens` tokens is prefilled on the cp 2 x tp 2 plan and decoded, and
the greedy tokens are compared with the original's (`generate --check`): the long-prompt case of issue 14.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = ["--hidden", "256", "--layers", "4", "--heads", "8", "--kv-heads", "4", "--intermediate", "704",
         "--vocab", "2048", "--max-position", "4096", "--dtype", "float32"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096, help="prompt tokens the memory plan is sized at")
    parser.add_argument("--check", action="store_true", help="also generate --check a long prompt at cp 2 x tp 2")
    parser.add_argument("--check-tokens", type=int, default=1000)
    args = parser.parse_args()

    from llmir_onnx.api import partition_to_dir

    with tempfile.TemporaryDirectory(prefix="cp_bench_") as tmp:
        folder = Path(tmp)
        subprocess.run([sys.executable, str(REPO / "models" / "make_synthetic.py"), *SHAPE, "--out",
                        str(folder / "model")], check=True, capture_output=True)
        model = folder / "model" / "model.onnx"
        print(f"synthetic LLaMA {' '.join(SHAPE)}; batch 1 x {args.seq} new tokens, tp 1")
        rows = []
        for cp in (1, 2, 4):
            manifest = partition_to_dir(model, folder / f"cp{cp}", tp=1, cp=cp, max_seq=args.seq)
            memory = manifest.ranks[0].memory
            assert memory is not None
            rows.append((cp, memory))
        base = rows[0][1]["activation_peak_bytes"]
        print(f"{'cp':>3} {'activation peak/rank':>21} {'ratio':>6} {'KV cache':>10} {'collectives':>12}  peak node")
        for cp, memory in rows:
            peak = memory["activation_peak_bytes"]
            print(f"{cp:>3} {peak / 2**20:>17.1f} MiB {peak / base:>6.3f} {memory['kv_cache_bytes'] / 2**20:>6.1f} MiB "
                  f"{memory['communication_bytes'] / 2**20:>8.1f} MiB  {memory['activation_peak_node']} "
                  f"({memory['activation_peak_phase']})")
        if args.check:
            plan = folder / "cp2tp2"
            partition_to_dir(model, plan, tp=2, cp=2)
            prompt = ",".join(str(1 + (i * 37) % 2000) for i in range(args.check_tokens))
            result = subprocess.run(
                [sys.executable, "-m", "llmir_onnx.cli.main", "generate", str(plan), "--prompt-ids", prompt,
                 "--max-new-tokens", "8", "--check"], capture_output=True, text=True, cwd=REPO,
            )
            print(json.dumps({"check": "cp 2 x tp 2", "prompt_tokens": args.check_tokens, "rc": result.returncode,
                              "stderr_tail": result.stderr.strip().splitlines()[-2:]}))


if __name__ == "__main__":
    main()
