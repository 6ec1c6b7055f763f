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


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["partition", str(LLAMA), "--tp", "0"], ["Invalid value for '--tp'", "`llmir-onnx partition --help`"]),
        (["partition", str(LLAMA), "--tp", "abc"], ["Invalid value for '--tp'", "valid integer"]),
        (["partition", str(LLAMA), "--max-seq", "0"], ["Invalid value for '--max-seq'"]),
        (["partition", str(LLAMA), "--bogus"], ["No such option: --bogus"]),
        (["partitoin"], ["No such command 'partitoin'", "Did you mean 'partition'?"]),
    ],
)
def test_usage_errors_are_one_line_and_write_nothing(args: list[str], fragments: list[str], tmp_path: Path) -> None:
    """click's own errors (a bad number, an unknown option or command) print as ours: one line, no box."""
    result = run_cli(*args, "-o", str(tmp_path / "plan"))
    assert_one_line_error(result, *fragments)
    assert result.returncode == 2
    assert list(tmp_path.iterdir()) == []


def test_a_model_folder_instead_of_its_file_names_the_onnx_inside(tmp_path: Path) -> None:
    result = run_cli("partition", str(LLAMA.parent), "-o", str(tmp_path / "plan"))
    assert_one_line_error(result, "is a folder", f"e.g. {str(LLAMA)!r}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--quiet", "--progress"], ["--quiet and --progress ask for opposite things"]),
        (["--stage-cuts", "0"], ["--stage-cuts 0 makes 2 stages but --pp is 1", "drop --stage-cuts"]),
        (["--pp", "2", "--stage-cuts", "5"], ["--stage-cuts 5: the cuts must be strictly increasing", "0..0"]),
    ],
)
def test_conflicting_partition_flags_are_refused(args: list[str], fragments: list[str], tmp_path: Path) -> None:
    result = run_cli("partition", str(LLAMA), "-o", str(tmp_path / "plan"), *args)
    assert_one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def llama_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = tmp_path_factory.mktemp("llama") / "plan"
    result = run_cli("partition", str(LLAMA), "--tp", "2", "-o", str(plan), "--quiet")
    assert result.returncode == 0, result.stderr
    return plan


def test_outputs_that_cannot_be_written_are_refused_before_any_work(llama_plan: Path, tmp_path: Path) -> None:
    """A folder where a file goes, or a path under a file: one line naming the option, and no partial file
    (report's `.NAME.partial`, annotate's `NAME.data`) left beside it."""
    a_file, a_folder = tmp_path / "a_file", tmp_path / "a_folder"
    a_file.write_text("x")
    a_folder.mkdir()
    cases = [
        (["partition", str(LLAMA), "-o", str(a_file / "plan")], ["-o", "is a file, not a folder"]),
        (["report", str(llama_plan), "-o", str(a_file / "r.html")], ["-o", "is a file, not a folder"]),
        (["report", str(llama_plan), "-o", str(a_folder)], ["-o", "is a folder; give the path of a file"]),
        (["annotate", str(llama_plan), "-o", str(a_folder)], ["-o", "is a folder; give the path of a file"]),
        (["generate", str(llama_plan), "--prompt-ids", "1", "--save-tokens", str(a_file / "t.json")],
         ["--save-tokens", "is a file, not a folder"]),
        (["generate", str(llama_plan), "--prompt-ids", "1", "--timeline", str(a_file / "t.json")],
         ["--timeline", "is a file, not a folder"]),
        (["verify", str(llama_plan), "--save-outputs", str(a_file / "o.npz")], ["--save-outputs", "is a file"]),
        (["verify", str(llama_plan), "--timeline", str(a_file / "t.json")], ["--timeline", "is a file"]),
        (["verify", str(llama_plan), "--profile-dir", str(a_file / "p")], ["--profile-dir", "is a file"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(run_cli(*args), *fragments)
        assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "a_folder"], args
        assert list(a_folder.iterdir()) == []


@pytest.mark.parametrize("ids", ["512", "3,-5"])
def test_generate_refuses_prompt_ids_outside_the_vocabulary(ids: str, llama_plan: Path) -> None:
    """Before any rank starts: 512 would fail in a rank's Gather, -5 would silently read the 5th last row."""
    result = run_cli("generate", str(llama_plan), "--prompt-ids", ids, "--max-new-tokens", "1")
    assert_one_line_error(result, f"[{ids.split(',')[-1]}]", "outside the model's vocabulary (0 to 511)")


def test_ctrl_c_during_partition_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the rank models are being written: one line, exit 130, no staging folder or plan left
    (nor the parent folder the partition made)."""
    from llmir_onnx.cli.main import main

    import llmir_onnx.api

    staged: list[Path] = []

    def interrupted(*args: object, **kwargs: object) -> None:
        staged.extend(tmp_path.glob("new/.plan.partial-*"))  # the weights are streaming into it now
        raise KeyboardInterrupt

    monkeypatch.setattr(llmir_onnx.api, "build_rank_models", interrupted)
    monkeypatch.setattr(sys, "argv", ["llmir-onnx", "partition", str(LLAMA), "--tp", "2", "-o",
                                      str(tmp_path / "new" / "plan"), "--quiet"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "llmir-onnx: interrupted\n"
    assert len(staged) == 1
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_annotate_keeps_the_previous_output(
    llama_plan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C after the annotated model and its weights are half written: exit 130, the annotated model of
    an earlier run and its `.data` untouched, no partial file or folder beside them."""
    import onnx_ir
    from llmir_onnx.cli.main import main

    out = tmp_path / "annotated.onnx"
    earlier = {out: b"earlier model", out.with_name("annotated.onnx.data"): b"earlier weights"}
    for path, content in earlier.items():
        path.write_bytes(content)
    save = onnx_ir.save

    def interrupted(model: object, path: Path, **kwargs: object) -> None:
        save(model, path, **kwargs)  # type: ignore[arg-type]
        path.write_bytes(path.read_bytes()[:100])  # as if stopped mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_ir, "save", interrupted)
    monkeypatch.setattr(sys, "argv", ["llmir-onnx", "annotate", str(llama_plan), "-o", str(out)])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "llmir-onnx: interrupted\n"
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == earlier


@pytest.mark.parametrize(
    ("document", "fragments"),
    [
        ({"hosts": [{"count": 2}]}, ['non-empty "devices" list, e.g. {"devices": [{"profile": "h100-sxm"']),
        ({"devices": [{"count": 2}]}, ['devices[0]: each device is an object with at least "profile", e.g.']),
    ],
)
def test_a_cluster_file_without_its_fields_shows_the_format(
    document: dict[str, object], fragments: list[str], tmp_path: Path
) -> None:
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(document))
    result = run_cli("partition", str(LLAMA), "--tp", "2", "--devices", str(cluster), "-o", str(tmp_path / "plan"))
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "plan").exists()
