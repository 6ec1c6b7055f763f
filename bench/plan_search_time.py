"""CPU seconds of `enumerate_layouts` for a 70B shape on 64 H100s, this tree against another (a base commit).

    git archive BASE llmir_onnx | tar -x -C /tmp/base     # the tree to compare with
    .venv/bin/python bench/plan_search_time.py --other /tmp/base [--rounds 5] [--max-cp 8]

Each round runs the search in a fresh process on the other tree, then on this one (interleaved, so both see
the same moments of the machine's load), and prints both CPU times (`time.process_time`, the search only,
not the model's load) and their ratio; then once on this tree with `--max-cp`. The model is the 70B
shape of tests/test_devices.py (hidden 8192, 80 layers, 64 heads, 8 KV heads, MLP 28672, vocabulary
128256, float16), written once with a sparse data file (plan reads shapes only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from llmir_onnx.ir_io import load_model
from llmir_onnx.plan.devices import load_profile
from llmir_onnx.plan.layouts import enumerate_layouts
model = load_model(sys.argv[2], check_data=False)
start = time.process_time()
layouts = enumerate_layouts(model, 64, 80 * 2**30, load_profile("h100-sxm"), 1, 2048, **json.loads(sys.argv[3]))
print(time.process_time() - start, len(layouts))
"""


def search_seconds(tree: Path, model: Path, options: dict) -> tuple[float, int]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(model), json.dumps(options)],
                            check=True, capture_output=True, text=True)  # fmt: skip
    seconds, count = result.stdout.split()
    return float(seconds), int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, required=True, help="a tree holding the llmir_onnx to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-cp", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))  # tests/test_synthetic.py imports its helpers as pytest does
    from tests.test_synthetic import synthetic

    with tempfile.TemporaryDirectory(prefix="plan_time_") as tmp:
        config = synthetic.SyntheticConfig(
            hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256, dtype="float16"
        )
        model = synthetic.generate(config, Path(tmp), sparse=True)
        print(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        ratios = []
        for _ in range(args.rounds):
            (other, count_other), (this, count) = (search_seconds(tree, model, {}) for tree in (args.other, REPO))
            ratios.append(this / other)
            print(f"other {other:.2f} s ({count_other} layouts)  this {this:.2f} s ({count} layouts)  "
                  f"ratio {this / other:.3f}")
        print(f"median ratio this / other: {statistics.median(ratios):.3f}")
        seconds, count = search_seconds(REPO, model, {"max_cp": args.max_cp})
        print(f"this, max_cp {args.max_cp}: {seconds:.2f} s ({count} layouts)")


if __name__ == "__main__":
    main()
