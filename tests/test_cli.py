"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic_helpers import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "llmir_onnx.cli.main"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llmir-onnx: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("partition", "verify", "plan"):
        assert command in result.stdout


@pytest.fixture(scope="module")
def llama_7b_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 7B LLaMA with real shapes (4096 positions, as LLaMA-2 7B) and a sparse (never read) weight file."""
    return make_synthetic(tmp_path_factory.mktemp("llama7b"), "--preset", "llama-7b", "--dtype", "float16",
                          "--max-position", "4096", "--no-weights")


def test_plan_ranks_layouts_for_a_7b_model(llama_7b_shapes: Path) -> None:
    result = run_cli("plan", str(llama_7b_shapes), "--devices", "8", "--device-memory", "80GiB",
                     "--max-batch", "8", "--max-seq", "4096")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert [row[1:4] for row in rows] == [["tp8", "x", "pp1"], ["tp4", "x", "pp2"], ["tp2", "x", "pp4"],
                                          ["tp1", "x", "pp8"]]
    # fits, then the tp link column (new with hosts): 8 devices are one host
    assert [" ".join(row[-3:]) for row in rows] == ["yes in host"] * 3 + ["GiB yes -"]
    assert "recommended: tp8 x pp1" in result.stdout


def test_plan_devices_list_and_its_errors(llama_7b_shapes: Path) -> None:
    result = run_cli("plan", str(llama_7b_shapes), "--devices", "8xh100-sxm,8xa100-80g", "--max-seq", "4096")
    assert result.returncode == 0, result.stderr
    assert "16 devices on 2 hosts: 8 x h100-sxm (80.00 GiB), 8 x a100-80g (80.00 GiB)" in result.stdout
    assert "recommended: tp8 x pp2" in result.stdout and "on a100-80g" in result.stdout
    bad = run_cli("plan", str(llama_7b_shapes), "--devices", "8xh100,8xa100-80g")
    assert_one_line_error(bad, "'h100' is neither a built-in profile")
    hosts = run_cli("plan", str(llama_7b_shapes), "--devices", "16", "--devices-per-host", "0")
    assert hosts.returncode != 0 and "Traceback" not in hosts.stderr


def test_plan_with_too_little_memory_fails_saying_by_how_much(llama_7b_shapes: Path) -> None:
    result = run_cli("plan", str(llama_7b_shapes), "--devices", "8", "--device-memory", "8GiB",
                     "--max-batch", "8", "--max-seq", "4096")
    assert_one_line_error(result, "no layout fits 8.00 GiB per device", "over")


def test_plan_refuses_an_unreadable_memory_size(llama_7b_shapes: Path) -> None:
    result = run_cli("plan", str(llama_7b_shapes), "--devices", "8", "--device-memory", "lots")
    assert_one_line_error(result, "cannot read 'lots' as a memory size")


def test_partition_of_a_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("partition", str(tmp_path / "absent.onnx"), "--tp", "2", "-o", str(tmp_path / "plan"))
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "plan").exists()


def test_verify_of_a_folder_without_plan_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_cli("verify", str(tmp_path))
    assert_one_line_error(result, "manifest.json", "does not exist")


LLAMA = ROOT / "models" / "llama-gqa-torch-legacy" / "model.onnx"


def test_partition_tp2_pp2_then_verify_through_the_cli(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    result = run_cli("partition", str(LLAMA), "--tp", "2", "--pp", "2", "-o", str(plan))
    assert result.returncode == 0, result.stderr
    assert "wrote 4 rank models (tp 2 x pp 2)" in result.stdout
    saved = tmp_path / "out.npz"
    result = run_cli("verify", str(plan), "--save-outputs", str(saved))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "all 5 outputs match the original model" in result.stdout
    import numpy as np

    with np.load(saved) as outputs:
        assert outputs["present.1.key"].shape == (1, 4, 7, 16)  # full heads, reassembled from both tp ranks


def test_verify_refuses_an_unknown_past_source(tmp_path: Path) -> None:
    result = run_cli("verify", str(tmp_path), "--past-from", "zeros")
    assert_one_line_error(result, "--past-from 'zeros' is not one of: model, noise")


def test_too_small_device_memory_names_the_rank_and_writes_nothing(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    result = run_cli("partition", str(LLAMA), "--tp", "2", "--pp", "2", "-o", str(plan), "--device-memory", "1MiB")
    assert_one_line_error(result, "rank 0 needs", "MiB over --device-memory 1.00 MiB")
    assert not plan.exists()
    assert list(tmp_path.iterdir()) == []


def test_impossible_tp_writes_nothing(tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    result = run_cli("partition", str(LLAMA), "--tp", "9", "-o", str(plan))
    assert_one_line_error(result, "--tp 9 does not divide num_heads=8", "use --tp 1, 2, 3, 4, 5, 6, 7 or 8")
    assert list(tmp_path.iterdir()) == []


def test_plan_max_cp_lists_cp_layouts(llama_7b_shapes: Path) -> None:
    """`plan --max-cp 2` adds tp x cp x pp rows (labelled with cp, devices = tp x cp x pp), each with the KV
    cache replicated and sharded over cp, to the same ranking; with room for all, the decode-first ranking
    keeps a layout without cp (a 7B's decode step reads its weights far more than its cache)."""
    result = run_cli("plan", str(llama_7b_shapes), "--devices", "8", "--device-memory", "80GiB",
                     "--max-batch", "8", "--max-seq", "4096", "--max-cp", "2", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    cps = sorted({(layout["tp"], layout["cp"], layout["pp"]) for layout in document["layouts"] if layout["cp"] == 2})
    assert cps == [(1, 2, 4), (2, 2, 2), (4, 2, 1)]
    modes = sorted((layout["tp"], layout["cp_kv_cache"]) for layout in document["layouts"] if layout["cp"] == 2)
    assert modes == [(tp, mode) for tp in (1, 2, 4) for mode in ("replicated", "sharded")]
    assert document["recommended"] == "tp8 x pp1"
