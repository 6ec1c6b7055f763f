"""scripts/gpu_check on this machine: its dry run (everything up to the first CUDA call) and the parts of
the GPU checks' own code that run without a GPU, so that the check cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmir_onnx.runtime.gpu_check import (
    CUDA_PROVIDER,
    TIMING_SIZES_MIB,
    Context,
    plan_placement,
    run_checks,
)
from llmir_onnx.runtime.launch import cuda_device_count

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check"
CPU_PROVIDER = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    work = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work", str(work)], cwd=REPO,
                            capture_output=True, text=True, timeout=600, check=False)
    return result, work


def test_dry_run_makes_the_plans_and_lists_every_gpu_check(
    dry_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, work = dry_run
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], result.stdout
    assert any(line.startswith("PASS cuda library target: libllmir_ops_cuda.so") for line in lines), result.stdout
    assert any(line.startswith("PASS collectives models: 9 dtypes") for line in lines), result.stdout
    plans = (("bundled-tp1", 1), ("bundled-tp2", 2), ("bundled-pp2", 2), ("bundled-tp2xpp2", 4), ("gpt2-tp3-vocab", 3))
    for plan, world in plans:
        assert (work / "plans" / plan / "manifest.json").is_file(), plan
        assert f"{plan} ({world} ranks)" in result.stdout
    commands = (work / "commands.sh").read_text()
    for plan in ("bundled-tp2", "bundled-pp2", "bundled-tp2xpp2", "gpt2-tp3-vocab"):
        assert f"LLMIR_CUDA_COMM=staging LLMIR_CUDA_TF32=0 {work}/venv/bin/python -m llmir_onnx.cli.main verify " \
               f"{work}/plans/{plan} --device cuda --profile-dir {work}/profiles/{plan}\n" in commands, commands
        assert f"--inner placement {work}/plans/{plan} {work}/profiles/{plan}" in commands, commands
    generate = [line for line in commands.splitlines() if "llmir_onnx.cli.main generate " in line]
    assert len(generate) == 2 and all("--device cuda" in line and "--check" in line for line in generate), commands
    for inner in ("collectives", "killed-rank", "time-session", "time-torch"):
        assert f"--inner {inner} " in commands, commands
    assert "-e '" + str(REPO) + "[gpu]'" in result.stdout  # onnxruntime-gpu through the gpu extra, own venv


@pytest.mark.skipif(bool(cuda_device_count()), reason="a GPU is visible: the real run would start")
def test_without_a_gpu_the_run_fails_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL gpu: no CUDA GPU visible") and result.stdout.count("\n") == 1, result.stdout
    assert result.stderr == ""
    assert not (tmp_path / "venv").exists()


def test_collectives_check_runs_on_the_cpu_kernels(tmp_path: Path) -> None:
    """The GPU collectives check's own code (models, data, exact comparison, placement proof) on the CPU EP."""
    result = subprocess.run([sys.executable, "-m", "llmir_onnx.runtime.gpu_check", "--inner", "collectives",
                             str(tmp_path), "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "372 exact results" in result.stdout and f"62 ai.llmir nodes ran on {CPU_PROVIDER}" in result.stdout


def test_placement_proof_reads_where_each_llmir_node_ran(
    dry_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path
) -> None:
    """verify --profile-dir on the CPU: the proof finds every rank's AllReduce nodes, accepts them on the CPU
    provider, refuses them for CUDA, and refuses a rank without its profile."""
    _, work = dry_run
    plan = work / "plans" / "bundled-tp2"
    profiles = tmp_path / "profiles"
    result = subprocess.run([sys.executable, "-m", "llmir_onnx.cli.main", "verify", str(plan), "--profile-dir",
                             str(profiles)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    checked, problems = plan_placement(plan, profiles, CPU_PROVIDER)
    assert checked == 8 and problems == [], problems  # 2 layers x (attention + MLP) AllReduce x 2 ranks
    checked, problems = plan_placement(plan, profiles, CUDA_PROVIDER)
    assert checked == 8 and len(problems) == 8, problems
    assert all(f"ran on {CPU_PROVIDER}" in problem for problem in problems), problems
    next(profiles.glob("rank1_*.json")).unlink()
    _, problems = plan_placement(plan, profiles, CPU_PROVIDER)
    assert problems == [f"rank 1: 0 profiles in {profiles} (expected 1)"], problems


def test_verify_on_cuda_without_the_cuda_provider_is_one_line(
    dry_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    _, work = dry_run
    result = subprocess.run([sys.executable, "-m", "llmir_onnx.cli.main", "verify", str(work / "plans" / "bundled-tp2"),
                             "--device", "cuda"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "install the gpu extra" in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_session_timing_runs_on_the_cpu_kernel(tmp_path: Path) -> None:
    out = tmp_path / "session.json"
    result = subprocess.run([sys.executable, "-m", "llmir_onnx.runtime.gpu_check", "--inner", "time-session",
                             str(out), "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    timings = json.loads(out.read_text())
    assert sorted(timings) == ["host", "stream"]
    assert all(sorted(timings[mode], key=int) == [str(mib) for mib in TIMING_SIZES_MIB] for mode in timings)


def test_each_check_is_one_summary_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The orchestrator's reporting: exit status 0 is PASS with the command's last stdout line, anything else
    FAIL with its last stderr line; the two timing files make one comparison line."""
    ctx = Context(work=tmp_path, venv=tmp_path / "venv", base_python=sys.executable, torch_python=sys.executable,
                  model=REPO / "models" / "llama-gqa-torch-legacy" / "model.onnx", dry_run=False)
    timing = tmp_path / "timing"
    timing.mkdir()
    sizes = {str(mib): 100.0 * mib for mib in TIMING_SIZES_MIB}
    (timing / "session.json").write_text(json.dumps({"stream": sizes, "host": sizes}))
    (timing / "torch.json").write_text(json.dumps({key: value / 2 for key, value in sizes.items()}))
    run_checks(ctx, [
        ("good", [sys.executable, "-c", "print('first'); print('all fine')"], {}),
        ("bad", [sys.executable, "-c", "import sys; sys.exit('it broke')"], {}),
    ])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS good: all fine (")
    assert lines[1].startswith("FAIL bad: it broke (exit 1, ")
    assert lines[2].startswith("PASS allreduce in session vs bare nccl: 1 MiB session 100 us (host wait 100) vs "
                               "bare 50 us = 2.00x;")
    assert [outcome.status for outcome in ctx.outcomes] == ["PASS", "FAIL", "PASS"]


def test_float32_matmuls_on_cuda_are_a_provider_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMIR_CUDA_TF32=0 (what the check's plan runs set) reaches the CUDA EP as use_tf32=0; a bad value is
    refused. The CUDA provider's presence is faked: only the options list is under test."""
    import onnxruntime

    from llmir_onnx.errors import GenerationError
    from llmir_onnx.runtime.session import execution_providers

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    monkeypatch.delenv("LLMIR_CUDA_TF32", raising=False)
    assert execution_providers("cuda", 1) == [(CUDA_PROVIDER, {"device_id": 1}), CPU_PROVIDER]
    monkeypatch.setenv("LLMIR_CUDA_TF32", "0")
    assert execution_providers("cuda", 0) == [(CUDA_PROVIDER, {"device_id": 0, "use_tf32": "0"}), CPU_PROVIDER]
    monkeypatch.setenv("LLMIR_CUDA_TF32", "off")
    with pytest.raises(GenerationError, match="LLMIR_CUDA_TF32='off'"):
        execution_providers("cuda", 0)
