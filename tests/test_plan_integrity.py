"""A plan cannot be damaged, swapped or pointed elsewhere unnoticed, and the plan folder loses nothing.

Every check goes through the command line as a user meets it: one line on stderr naming the file or
key, a non-zero exit, no traceback, no rank started.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmir_onnx.api import partition_to_dir
from llmir_onnx.digest import hash_file
from llmir_onnx.errors import PlanError
from llmir_onnx.plan.emit import STAGING_LOCK_NAME
from llmir_onnx.plan.integrity import check_plan_files, check_rank_files
from llmir_onnx.plan.manifest import Manifest
from tests.test_cli import assert_one_line_error, run_cli

MODEL = Path(__file__).resolve().parents[1] / "models" / "llama-gqa-torch-legacy" / "model.onnx"


@pytest.fixture(scope="module")
def plan_tp2_pp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = tmp_path_factory.mktemp("plans") / "tp2pp2"
    partition_to_dir(MODEL, plan, tp=2, pp=2)
    return plan


@pytest.fixture
def plan(plan_tp2_pp2: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tp 2 x pp 2 plan that the test may damage."""
    copy = tmp_path / "plan"
    shutil.copytree(plan_tp2_pp2, copy)
    return copy


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_manifest(plan: Path, edit: object) -> None:
    path = plan / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)  # type: ignore[operator]
    path.write_text(json.dumps(raw))


def test_check_passes_a_fresh_plan_on_one_line(plan: Path) -> None:
    result = run_cli("check", str(plan))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "plan ok" in result.stdout and "blake3 match" in result.stdout


def test_every_plan_file_is_in_the_manifest_with_its_size_and_hash(plan: Path) -> None:
    manifest = Manifest.read(plan)
    on_disk = sorted(path.name for path in plan.iterdir() if path.name != "manifest.json")
    assert sorted(manifest.files) == on_disk
    assert any(name.startswith("stage") for name in on_disk) and any(name.endswith(".onnx.data") for name in on_disk)
    assert manifest.files == {name: hash_file(plan / name) for name in on_disk}


@pytest.mark.parametrize("name", ["rank1.onnx.data", "stage1.shared.data", "rank2.onnx"])
def test_one_flipped_bit_is_refused_naming_the_file(plan: Path, name: str) -> None:
    path = plan / name
    _flip_bit(path, path.stat().st_size // 2)
    commands = [["check", str(plan)]]
    if name.endswith(".data"):
        commands += [["verify", str(plan)], ["generate", str(plan), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]]
    for args in commands:
        assert_one_line_error(run_cli(*args), name, "blake3")
    # Hashing off: the flip passes the size check (that is what the flag trades away).
    assert run_cli("check", str(plan), "--no-check-hashes").returncode == 0


def test_a_version_2_plan_is_still_checked_with_its_sha256(plan: Path) -> None:
    """Plans written before issue 16 record sha256 (manifest version 2): read, checked and refused by it."""

    def as_version_2(raw: dict) -> None:
        raw["version"] = 2
        raw["files"] = {name: {"size": entry["size"], "sha256": hash_file(plan / name, "sha256").hexdigest}
                        for name, entry in raw["files"].items()}  # fmt: skip

    _edit_manifest(plan, as_version_2)
    manifest = Manifest.read(plan)
    assert {digest.algorithm for digest in manifest.files.values()} == {"sha256"}
    result = run_cli("check", str(plan))
    assert result.returncode == 0 and "sizes and sha256 match" in result.stdout, result.stderr
    _flip_bit(plan / "rank1.onnx.data", 7)
    assert_one_line_error(run_cli("check", str(plan)), "rank1.onnx.data", "differs from the sha256")
    # A version-2 manifest holds sha256: one with a BLAKE3 key only is refused naming the key.
    _edit_manifest(plan, lambda raw: raw["files"].update({"rank0.onnx": {"size": 1, "blake3": "0" * 64}}))
    with pytest.raises(PlanError, match=re.escape("files.rank0.onnx")):
        Manifest.read(plan)


def test_a_rank_checks_its_own_files_before_its_session(plan: Path) -> None:
    """What each rank runs under an external launcher (no parent to hash for it)."""
    manifest = Manifest.read(plan)
    _flip_bit(plan / "rank1.onnx.data", 5)
    check_rank_files(plan, manifest, 0)  # rank 0 does not read rank 1's file
    with pytest.raises(PlanError, match=r"rank1\.onnx\.data"):
        check_rank_files(plan, manifest, 1)


def test_a_shorter_data_file_swapped_in_is_refused_naming_the_file(plan: Path, tmp_path: Path) -> None:
    # A valid data file of the wrong name (here the plan's own stage file, 32 KiB shorter).
    shorter = tmp_path / "other.data"
    shutil.copyfile(plan / "stage0.shared.data", shorter)
    assert shorter.stat().st_size < (plan / "rank1.onnx.data").stat().st_size
    shutil.copyfile(shorter, plan / "rank1.onnx.data")
    for args in (["check", str(plan)], ["check", str(plan), "--no-check-hashes"], ["verify", str(plan)]):
        assert_one_line_error(run_cli(*args), "rank1.onnx.data", "bytes but the manifest says")


def test_a_missing_data_file_is_refused_naming_it(plan: Path) -> None:
    (plan / "stage0.shared.data").unlink()
    assert_one_line_error(run_cli("verify", str(plan)), "stage0.shared.data", "missing")


@pytest.mark.parametrize("where", ["file", "data_files"])
@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.data", "sub/../rank0.onnx"])
def test_a_manifest_path_outside_the_plan_folder_is_refused(plan: Path, where: str, name: str) -> None:
    def edit(raw: dict) -> None:
        if where == "file":
            raw["ranks"][1]["file"] = name
        else:
            raw["ranks"][1]["data_files"][0] = name
        raw["files"][name] = {"size": 1, "blake3": "0" * 64}

    (plan.parent / "outside.data").write_bytes(b"x")
    _edit_manifest(plan, edit)
    with pytest.raises(PlanError, match="not a plain file name inside the plan folder"):
        Manifest.read(plan)
    if name == "/etc/passwd" and where == "file":
        for command in ("check", "verify"):
            assert_one_line_error(run_cli(command, str(plan)), "not a plain file name inside the plan folder")


def test_a_link_leading_out_of_the_plan_folder_is_refused(plan: Path, tmp_path: Path) -> None:
    # The same bytes, so only the link itself is wrong.
    outside = tmp_path / "elsewhere.data"
    shutil.copyfile(plan / "rank1.onnx.data", outside)
    (plan / "rank1.onnx.data").unlink()
    (plan / "rank1.onnx.data").symlink_to(outside)
    assert_one_line_error(run_cli("check", str(plan)), "rank1.onnx.data", "outside the plan folder")


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda raw: raw["ranks"][0].pop("data_files"), "ranks[0].data_files"),
        (lambda raw: raw.pop("files"), "'files'"),
        (lambda raw: raw["mesh"].update(world_size="4"), "mesh.world_size"),
        (lambda raw: raw["ranks"][2]["inputs"][0].update(dim=True), "ranks[2].inputs[0].dim"),
        (lambda raw: raw["files"]["rank0.onnx"].pop("blake3"), "files.rank0.onnx.blake3"),
        (lambda raw: raw["ranks"].pop(), "'ranks'"),
    ],
)
def test_a_broken_manifest_is_one_line_naming_the_key(plan: Path, edit: object, key: str) -> None:
    _edit_manifest(plan, edit)
    with pytest.raises(PlanError, match=re.escape(key)):
        Manifest.read(plan)
    if key == "ranks[0].data_files":
        for command in ("check", "verify"):
            assert_one_line_error(run_cli(command, str(plan)), key, "partition the model again")


def test_a_version_1_manifest_asks_to_partition_again(plan: Path) -> None:
    _edit_manifest(plan, lambda raw: raw.update(version=1))
    assert_one_line_error(run_cli("check", str(plan)), "not a version-2 or 3", "partition the model again")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_partition_removes_only_stale_staging_folders(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    dead = _dead_pid()
    # As kill -9 leaves them: a staging folder whose lock nobody holds, one killed before it made its lock,
    # and a replaced plan parked for deletion.
    stale = [tmp_path / f".plan.partial-{dead}-abc", tmp_path / f".plan.partial-{dead}-nolock",
             tmp_path / f".plan.old-{dead}-xyz"]
    for folder in stale:
        folder.mkdir()
        (folder / "rank0.onnx.data").write_bytes(b"\0" * 4096)
    (stale[0] / STAGING_LOCK_NAME).touch()
    (stale[2] / STAGING_LOCK_NAME).touch()
    # A partition running now (this process holds its lock), another's folder, and a user's hidden folder.
    live = tmp_path / f".plan.partial-{os.getpid()}-live"
    live.mkdir()
    lock = os.open(live / STAGING_LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    kept = [live, tmp_path / f".other.partial-{dead}-abc", tmp_path / ".plan.partial-legacy"]
    for folder in kept[1:]:
        folder.mkdir()
    try:
        result = run_cli("partition", str(MODEL), "--tp", "2", "-o", str(out), "--quiet")
        assert result.returncode == 0, result.stderr
    finally:
        os.close(lock)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["plan", *(folder.name for folder in kept)])
    assert STAGING_LOCK_NAME not in os.listdir(out)
    check_plan_files(out, Manifest.read(out), check_hashes=True)  # what `check` runs (tested above by the CLI)


def test_a_plan_folder_with_a_users_file_is_refused_unless_force(plan: Path) -> None:
    before = {path.name: path.read_bytes() for path in plan.iterdir()}
    (plan / "notes.txt").write_text("mine")
    result = run_cli("partition", str(MODEL), "--tp", "2", "-o", str(plan), "--quiet")
    assert_one_line_error(result, "notes.txt", "--force")
    assert {path.name: path.read_bytes() for path in plan.iterdir() if path.name != "notes.txt"} == before
    assert (plan / "notes.txt").read_text() == "mine"
    result = run_cli("partition", str(MODEL), "--tp", "2", "-o", str(plan), "--quiet", "--force")
    assert result.returncode == 0, result.stderr
    assert not (plan / "notes.txt").exists()
    # A folder that holds only a plan is replaced without --force (re-partitioning; partition_to_dir's rule).
    partition_to_dir(MODEL, plan, tp=2, pp=2)
    assert sorted(path.name for path in plan.iterdir()) == sorted(before)
    assert sorted(path.name for path in plan.parent.iterdir()) == ["plan"]


def test_partitions_are_byte_identical(plan_tp2_pp2: Path, tmp_path: Path) -> None:
    again = tmp_path / "tp2pp2"
    partition_to_dir(MODEL, again, tp=2, pp=2)
    for path in plan_tp2_pp2.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_verify_runs_a_plan_checked_with_hashes_off(plan: Path) -> None:
    result = run_cli("verify", str(plan), "--no-check-hashes")
    assert result.returncode == 0, result.stderr
    assert "all 5 outputs match" in result.stdout

