"""bench/partition_big.py --phases: the moment a partition starts writing its weights, read off its progress
on stderr. If the progress stops saying so, the bench must fail, not report another moment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from synthetic_helpers import script_module

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "llama-gqa-torch-legacy" / "model.onnx"


def _bench():
    return script_module(ROOT / "bench" / "partition_big.py")


def test_the_first_write_is_found_in_a_partitions_progress(tmp_path: Path) -> None:
    bench = _bench()
    command = [sys.executable, "-m", "llmir_onnx.cli.main", "partition", str(MODEL), "--tp", "2", "--pp", "2",
               "-o", str(tmp_path / "plan"), "--progress"]  # fmt: skip
    timing = bench._timed(command, 0.0, ROOT, bench.WRITING_MARKER)
    # Not compared with timing.returned: on a busy machine the reader may see the marker after the child
    # has exited (the bench's figure is then late by that wait, which it says).
    assert timing.marked is not None and timing.marked > 0
    assert (tmp_path / "plan" / "manifest.json").is_file()


def test_a_marker_split_over_two_writes_is_found(tmp_path: Path) -> None:
    bench = _bench()
    script = "import sys, time; sys.stderr.write('wri'); sys.stderr.flush(); time.sleep(0.05); sys.stderr.write('ting')"
    timing = bench._timed([sys.executable, "-c", script], 0.0, None, bench.WRITING_MARKER)
    assert timing.marked is not None


def test_a_partition_that_never_writes_fails_the_bench() -> None:
    bench = _bench()
    with pytest.raises(SystemExit, match="never printed"):
        bench._timed([sys.executable, "-c", "pass"], 0.0, None, bench.WRITING_MARKER)
