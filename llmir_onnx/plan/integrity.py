"""Is a plan folder what its manifest says? Paths, sizes and digests of every file, before any rank runs.

A plan is copied between machines and run for days; a flipped bit in a weight file changes tokens
without an error anywhere. Every runtime entry point (`verify`, `generate`, `RankSession`) and
`llmir-onnx check` therefore compare the files a plan names with the manifest's `files` first:

* every name resolves inside the plan folder (no absolute path, no `..`, no link leading out);
* every file exists, is a regular file and has its recorded size (cheap: a truncated or swapped
  file is refused without reading it);
* every file's digest matches, by the algorithm the manifest names (BLAKE3, or sha256 in plans made
  before issue 16; one read of each file, the big data files in parallel threads: the hashers
  release the GIL). `check_hashes=False` (`--no-check-hashes`) skips only this step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llmir_onnx.digest import hash_file
from llmir_onnx.errors import PlanError
from llmir_onnx.plan.manifest import Manifest, plan_file_name_error

# Files hashed at once: each is read front to back by one thread.
HASH_THREADS = 4
_FIX = "copy the plan again from where it was written, or partition the model again"


@dataclass(frozen=True)
class PlanCheck:
    """What a check covered: how many files and bytes, and whether their contents were hashed."""

    files: int
    bytes: int
    hashed: bool


def plan_file(plan_dir: str | Path, name: str) -> Path:
    """The path of plan file `name`, refused unless it is a plain name that resolves inside the folder."""
    problem = plan_file_name_error(name)
    if problem is not None:
        raise PlanError(f"the manifest of {str(plan_dir)!r} names {problem}; {_FIX}")
    root = Path(plan_dir).resolve()
    path = Path(plan_dir) / name
    target = path.resolve()
    if not target.is_relative_to(root):
        raise PlanError(f"plan file {str(path)!r} is a link to {str(target)!r}, outside the plan folder; {_FIX}")
    return path


def check_plan_files(
    plan_dir: str | Path, manifest: Manifest, names: Iterable[str] | None = None, *, check_hashes: bool = True
) -> PlanCheck:
    """Refuse (PlanError naming the file) unless the plan files `names` (default: all) match the manifest."""
    wanted = sorted(set(manifest.files if names is None else names))
    paths = {}
    for name in wanted:
        path = plan_file(plan_dir, name)
        expected = manifest.files.get(name)
        if expected is None:
            raise PlanError(f"plan file {name!r} is not listed in the manifest's `files`; {_FIX}")
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} is missing; {_FIX}")
        size = path.stat().st_size
        if size != expected.size:
            raise PlanError(
                f"plan file {str(path)!r} is {size} bytes but the manifest says {expected.size} "
                f"(truncated, or another plan's file); {_FIX}"
            )
        paths[name] = path
    total = sum(manifest.files[name].size for name in wanted)
    if check_hashes and wanted:
        biggest_first = sorted(wanted, key=lambda name: -manifest.files[name].size)
        with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(wanted), os.cpu_count() or 1)) as pool:
            hashed = pool.map(lambda name: hash_file(paths[name], manifest.files[name].algorithm), biggest_first)
            actual = dict(zip(biggest_first, hashed, strict=True))
        changed = [name for name in wanted if actual[name] != manifest.files[name]]
        if changed:
            listed = ", ".join(repr(str(paths[name])) for name in changed)
            raise PlanError(
                f"plan file{'s' if len(changed) > 1 else ''} {listed} differ{'' if len(changed) > 1 else 's'} from "
                f"the {manifest.files[changed[0]].algorithm} in the manifest (changed or damaged after partitioning); "
                f"{_FIX}"
            )
    return PlanCheck(len(wanted), total, check_hashes)


def check_rank_files(plan_dir: str | Path, manifest: Manifest, rank: int, *, check_hashes: bool = True) -> PlanCheck:
    """`check_plan_files` on the files rank `rank` reads: its model and its data files."""
    return check_plan_files(plan_dir, manifest, manifest.rank_entry(rank).files, check_hashes=check_hashes)
