"""`plan` for a 70B-class shape on clusters of hosts: the tables of docs/PLANNING.md.

    .venv/bin/python bench/plan_hosts.py --work /tmp/l70

Makes a LLaMA-3-70B-shaped model (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate 28672,
vocabulary 128256, float16) with models/make_synthetic.py --no-weights (a sparse data file: `plan` reads
shapes only), then runs `llmir-onnx plan` on 64 H100s in hosts of 8, on the same 64 as one host (every
link NVLink, the model before hosts), at batch 32, and on one H100 host + one A100 host. Each takes
~15 s on the 2-core development VM.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--hidden", "8192", "--layers", "80", "--heads", "64", "--kv-heads", "8", "--intermediate", "28672",
         "--vocab", "128256", "--dtype", "float16"]  # fmt: skip
RUNS = {
    "64 H100 in hosts of 8": ["--devices", "64", "--device-memory", "80GiB"],
    "64 H100 as one host (every link NVLink)": [
        "--devices", "64", "--device-memory", "80GiB", "--devices-per-host", "64"
    ],
    "64 H100 in hosts of 8, batch 32": ["--devices", "64", "--device-memory", "80GiB", "--max-batch", "32"],
    "one H100 host + one A100 host": ["--devices", "8xh100-sxm,8xa100-80g"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the shape-only model")
    args = parser.parse_args()
    model = args.work / "model.onnx"
    if not model.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "make_synthetic.py"), "--out", str(args.work), *SHAPE,
                        "--no-weights"], check=True)  # fmt: skip
    cli = [str(Path(sys.executable).parent / "llmir-onnx"), "plan", str(model)]
    for title, options in RUNS.items():
        print(f"## {title}: llmir-onnx plan {model} {' '.join(options)}", flush=True)
        subprocess.run([*cli, *options], check=True)
        print(flush=True)


if __name__ == "__main__":
    main()
