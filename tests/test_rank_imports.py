"""A spawned rank process imports what it runs (numpy, onnxruntime, the plan's manifest), not the
partitioner's stack: onnx and onnx_ir import ml_dtypes and sympy, about 2 s of CPU per process on this
machine kind, paid by every rank of every verify and generate job (docs/RUNTIME.md).

The ranks here run with tests/rank_import_guard on PYTHONPATH, whose sitecustomize makes any import of
those packages fail: a rank that imports one, at module level or inside a function, fails its job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmir_onnx.api import partition_to_dir
from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds
from llmir_onnx.runtime.generate_job import generate_plan
from llmir_onnx.runtime.verify import verify_plan

ROOT = Path(__file__).resolve().parents[1]
GUARD = Path(__file__).resolve().parent / "rank_import_guard"
MODEL = ROOT / "models" / "llama-gqa-torch-legacy" / "model.onnx"


@pytest.fixture
def guarded_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")])))


def test_the_guard_refuses_onnx(guarded_ranks: None) -> None:
    result = subprocess.run([sys.executable, "-c", "import onnx"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "a rank process imported 'onnx'" in result.stderr


def test_verify_and_generate_ranks_import_no_onnx(guarded_ranks: None, tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    partition_to_dir(MODEL, plan, tp=2, pp=2)
    _, rows = verify_plan(plan, model_past_feeds(MODEL, FeedSizes(new_tokens=2, past_tokens=3)), timeout_s=180)
    assert rows and all(row.ok for row in rows)
    outcome = generate_plan(plan, [[5, 17, 42]], 4, stream=False, check=True)
    assert outcome is not None and outcome.difference is None and len(outcome.report.tokens[0]) == 4
