"""`llmir-onnx verify`: run every rank of a plan as its own process and compare with the original.

The ranks are real processes with real onnxruntime sessions and the real custom-op library: the
collectives and Send/Recv they execute are the ones production runs. Outside a launcher this
module starts `mpiexec -n WORLD` itself; under one (mpiexec, srun, torchrun) each process runs its
own rank and rank 0 assembles the results from the files the ranks write.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmir_onnx.errors import CommunicationError, InputModelError, PlanError, VerificationError, check_output_path
from llmir_onnx.model_facts import kv_cache_pairs
from llmir_onnx.plan.integrity import check_plan_files, check_rank_files
from llmir_onnx.plan.manifest import Manifest, RankEntry, SliceBinding, TensorInfo, cp_cache_runs
from llmir_onnx.plan.timeline import write_timeline
from llmir_onnx.runtime.job import fault_hook, ignore_peer_death_notice, run_rank_job
from llmir_onnx.runtime.launch import detect_rank_env, setup_communication
from llmir_onnx.runtime.session import (
    CUDA_PROVIDER,
    DEVICE_CPU,
    DEVICE_CUDA,
    execution_providers,
    load_rank_session,
    original_session,
    rank_device_id,
)

RANK_DONE_SUFFIX = ".done"
CHAINED_MARKER = "chained_cache"  # in a verify job's folder: each case's past is the previous case's present"
RUN_CALLS_SUFFIX = ".run_calls.json"
STRETCH_SUFFIX = ".compute_stretch.json"


@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    ok: bool
    atol: float = 0.0  # the tolerance the output was held to
    rtol: float = 0.0


# Default (atol, rtol) per output element type. float32 (and float64): the contract every bundled model is
# held to. 16-bit floats: a tp plan sums partial products in another order, and a pipeline stage boundary
# rounds a hidden state to the type where the original's fused kernels (SkipSimplifiedLayerNormalization
# and kin) kept it in float32, so the plan may differ from the original by a unit or two in the last place
# of the LARGEST values, which spreads to the small ones: the absolute tolerance of a 16-bit output is
# scaled by max(1, its largest |value|) (default_tolerance_for). float16's epsilon is 9.8e-4, bfloat16's 7.8e-3.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (2e-3, 4e-3),
    "bfloat16": (1.6e-2, 3e-2),
}
FLOAT32_TOLERANCE = (1e-4, 1e-4)


def default_tolerance(dtype: np.dtype) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(np.dtype(dtype).name, FLOAT32_TOLERANCE)


def default_tolerance_for(expected: np.ndarray) -> tuple[float, float]:
    """The default (atol, rtol) for one reference output: 16-bit atol scaled by its largest magnitude."""
    atol, rtol = default_tolerance(expected.dtype)
    if np.dtype(expected.dtype).name in DEFAULT_TOLERANCES and expected.size:
        largest = float(np.max(np.abs(expected.astype(np.float32))))
        atol *= max(1.0, largest) if np.isfinite(largest) else 1.0
    return atol, rtol


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the NPZ at `path` (a user's --inputs, or the feeds the launcher wrote for its ranks)."""
    if not path.is_file():
        raise InputModelError(f"inputs file {str(path)!r} does not exist; pass an NPZ of the original model's "
                              "inputs, written with numpy.savez(path, input_name=array, ...)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, AttributeError, EOFError) as error:  # AttributeError: a lone .npy array
        raise InputModelError(
            f"cannot read {str(path)!r} as an NPZ of inputs ({type(error).__name__}); write one with "
            "numpy.savez(path, input_name=array, ...)"
        ) from None


# The manifest's element type names (onnx's, lower case) -> numpy's dtype name, for the types a feed can be
# checked by name alone: a rank process may not import onnx / onnx_ir / ml_dtypes (tests/test_rank_imports.py).
_FEED_DTYPE_NAMES = {
    "float": "float32", "double": "float64", "float16": "float16", "bfloat16": "bfloat16", "bool": "bool",
    **{name: name for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
}


def check_feeds(inputs: Sequence[TensorInfo], feeds: dict[str, np.ndarray], where: str) -> None:
    """Refuse, before any rank starts, `feeds` that do not match the original model's `inputs`: a name
    missing or unknown, an element type, a rank or a fixed dim that differs.

    Symbolic dims are not compared across inputs: onnxruntime does not enforce them, and exports exist whose
    one dim name covers sizes that differ (an attention mask's total length named like input_ids' new tokens),
    so such feeds run as onnxruntime runs them."""
    names = [info.name for info in inputs]
    missing = [name for name in names if name not in feeds]
    if missing:
        raise InputModelError(f"{where} lack the model's input(s) {missing}; give every input of the original "
                              f"model, keyed by its name: {names}")
    unknown = sorted(set(feeds) - set(names))
    if unknown:
        raise InputModelError(f"{where} hold {unknown}, not inputs of the model; remove them (its inputs: {names})")
    for info in inputs:
        array = feeds[info.name]
        expected = _FEED_DTYPE_NAMES.get(info.dtype)
        if expected is not None and array.dtype.name != expected:
            raise InputModelError(f"{where}: input {info.name!r} is {array.dtype}, the model takes {expected}; "
                                  f"convert it (array.astype({str(expected)!r}))")
        if not info.shape:
            continue
        declared = f"[{', '.join(map(str, info.shape))}]"
        if array.ndim != len(info.shape):
            raise InputModelError(f"{where}: input {info.name!r} has shape {list(array.shape)}, the model takes "
                                  f"{declared} ({len(info.shape)} dims); reshape it")
        for axis, (dim, size) in enumerate(zip(info.shape, array.shape, strict=True)):
            if isinstance(dim, int) and dim != size:
                raise InputModelError(f"{where}: input {info.name!r} has {size} in dim {axis}, the model takes "
                                      f"{declared}; give it {dim} there")


def rank_outputs_path(work_dir: Path, rank: int, case: int) -> Path:
    """Where a rank writes its outputs of feed case `case` (local names) for the launcher to assemble."""
    return work_dir / f"rank{rank}.case{case}.npz"


def case_feeds_path(work_dir: Path, case: int) -> Path:
    return work_dir / f"feeds{case}.npz"


def run_rank(
    plan_dir: Path,
    manifest: Manifest,
    feed_cases: Sequence[dict[str, np.ndarray]],
    work_dir: Path,
    *,
    check_hashes: bool = True,
    device: str = DEVICE_CPU,
    profile_dir: Path | None = None,
    chained: bool = False,
) -> None:
    """Run this process's rank on each of `feed_cases` in turn, one session for all, and write its outputs of
    case i to `rank_outputs_path(work_dir, N, i)`.

    The past KV inputs of a plan whose cache is sharded over cp are this cp rank's run of the fed cache
    (`cp_cache_runs`). `chained`: a case fed a non-empty past continues the case before it: each past KV
    input is this rank's own present of that case (the fed one is ignored), as `generate` hands them
    over: decode steps after a prefill, on the cache layout the plan itself left. A case fed an empty
    past (a prefill) starts a new chain.

    Its files are checked first; `check_hashes=False` where the launching process hashed them already.
    `device` "cuda": the CUDA EP on GPU `rank_device_id(local rank)` with the CUDA ai.llmir library.
    `profile_dir`: onnxruntime's profile of the run goes to `profile_dir/rank{N}_*.json` (its events name
    each node's provider: the proof that the ai.llmir nodes ran where they should)."""
    comm = setup_communication(cuda=device == DEVICE_CUDA, expected_world_size=manifest.world_size)
    ignore_peer_death_notice()
    entry = manifest.rank_entry(comm.rank)
    check_rank_files(plan_dir, manifest, comm.rank, check_hashes=check_hashes)
    model_path = plan_dir / entry.file
    for feeds in feed_cases:
        missing = sorted({binding.original for binding in entry.inputs} - feeds.keys())
        if missing:
            raise PlanError(f"rank {comm.rank} needs inputs {missing} that the feeds do not hold")
    device_id = rank_device_id(comm.local_rank) if device == DEVICE_CUDA else 0
    options = comm.session_options()
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / f"rank{comm.rank}")
    session = load_rank_session(model_path, comm.rank, options, execution_providers(device, device_id))
    if device == DEVICE_CUDA and CUDA_PROVIDER not in session.get_providers():
        raise PlanError(f"rank {comm.rank}: onnxruntime did not enable {CUDA_PROVIDER} on device {device_id}")
    before_run = fault_hook(comm.rank)
    run_calls = []  # (case, micro-batch, start, end) on CLOCK_MONOTONIC, for `verify --timeline`
    pasts = _past_inputs(manifest)
    previous: dict[str, Any] = {}  # this rank's presents of the case before, by local name
    for case, feeds in enumerate(feed_cases):
        rank_feeds = {b.local: np.ascontiguousarray(_rank_part(manifest, entry, b, feeds[b.original], pasts))
                      for b in entry.inputs}
        if chained and case > 0 and not _starts_chain(feeds, pasts):
            rank_feeds.update({b.local: previous[present] for b in entry.inputs
                               if (present := _present_of(entry, b, pasts)) is not None})
        if before_run is not None:
            before_run(case)
        run_start = time.monotonic()
        with comm.stretched_run():
            results = session.run([b.local for b in entry.outputs], rank_feeds)
        run_calls.append([case, 0, run_start, time.monotonic()])
        previous = {binding.local: array for binding, array in zip(entry.outputs, results, strict=True)}
        np.savez(rank_outputs_path(work_dir, comm.rank, case), **previous)
    if profile_dir is not None:
        session.end_profiling()
    (work_dir / f"rank{comm.rank}{RUN_CALLS_SUFFIX}").write_text(json.dumps(run_calls))
    if comm.compute_stretch is not None:  # LLMIR_COMPUTE_STRETCH: what the library slept and measured
        (work_dir / f"rank{comm.rank}{STRETCH_SUFFIX}").write_text(json.dumps(comm.compute_stretch.totals()))
    (work_dir / f"rank{comm.rank}{RANK_DONE_SUFFIX}").touch()
    # Finalize now, as generate's ranks do: a spawned rank leaves with os._exit (see runtime/job.py).
    comm.finalize()


def _past_inputs(manifest: Manifest) -> dict[str, tuple[str, int]]:
    """{past KV input: (its present output, its token axis)} of the original model."""
    infos = {info.name: info for info in manifest.inputs}
    pairs = kv_cache_pairs([info.name for info in manifest.inputs], [info.name for info in manifest.outputs])
    return {past: (present, _cache_axis(infos[past])) for present, past in pairs.items() if past in infos}


def _cache_axis(info: TensorInfo) -> int:
    """The token axis of a KV cache tensor (model_facts.kv_length_axis, on the manifest's shape)."""
    shape = info.shape
    if len(shape) != 4 or not isinstance(shape[2], int):
        return 2
    dynamic = [axis for axis in (1, 3) if not isinstance(shape[axis], int)]
    return dynamic[0] if len(dynamic) == 1 else 2


def _rank_part(
    manifest: Manifest, entry: RankEntry, binding: SliceBinding, full: np.ndarray, pasts: dict[str, tuple[str, int]]
) -> np.ndarray:
    """This rank's part of one original input: its binding's slice, and of a cache sharded over cp its run."""
    part = binding.take(full)
    if not manifest.cp_sharded_cache or binding.original not in pasts:
        return part
    axis = pasts[binding.original][1]
    runs = cp_cache_runs(part.shape[axis], int(manifest.mesh["cp"]), manifest.cp_cache_block)
    start, stop = runs[entry.coords["cp"]]
    index = [slice(None)] * part.ndim
    index[axis] = slice(start, stop)
    return part[tuple(index)]


def _starts_chain(feeds: dict[str, np.ndarray], pasts: dict[str, tuple[str, int]]) -> bool:
    """A case whose fed past KV caches are empty (a prefill): it continues no case before it."""
    return all(feeds[past].shape[axis] == 0 for past, (_, axis) in pasts.items() if past in feeds)


def _present_of(entry: RankEntry, binding: SliceBinding, pasts: dict[str, tuple[str, int]]) -> str | None:
    """The local name of this rank's present output that a past KV input binding continues, if any."""
    if binding.original not in pasts:
        return None
    present = pasts[binding.original][0]
    return next((out.local for out in entry.outputs if out.original == present), None)


def assemble_outputs(manifest: Manifest, work_dir: Path, case: int = 0) -> dict[str, np.ndarray]:
    """Put the original model's outputs of feed case `case` back together from every rank's slices; a
    cache sharded over cp is its cp ranks' runs concatenated in cp-rank order."""
    parts: dict[str, list[tuple[SliceBinding, np.ndarray]]] = {}
    runs: dict[tuple[str, int, int], list[tuple[int, np.ndarray]]] = {}  # (output, pp, tp) -> [(cp, run)]
    presents = {present: axis for present, axis in _past_inputs(manifest).values()}
    for entry in manifest.ranks:
        with np.load(rank_outputs_path(work_dir, entry.rank, case)) as archive:
            for binding in entry.outputs:
                if manifest.cp_sharded_cache and binding.original in presents:
                    key = (binding.original, entry.coords["pp"], entry.coords["tp"])
                    run = archive[binding.local]
                    if not runs.get(key):
                        parts.setdefault(binding.original, []).append((binding, run))
                    runs.setdefault(key, []).append((entry.coords["cp"], run))
                    continue
                parts.setdefault(binding.original, []).append((binding, archive[binding.local]))
    for (name, _, _), held in runs.items():
        joined = np.concatenate([run for _, run in sorted(held, key=lambda item: item[0])], axis=presents[name])
        slices = parts[name]
        # The first cp rank's piece stands for this (pp, tp) slice: replace it with the runs joined.
        at = next(i for i, (_, array) in enumerate(slices) if array is held[0][1])
        slices[at] = (slices[at][0], joined)
    assembled = {}
    for info in manifest.outputs:
        pieces = parts.get(info.name)
        if not pieces:
            raise PlanError(f"no rank produces output {info.name!r}; the plan is incomplete")
        whole = [array for binding, array in pieces if binding.dim is None]
        if whole:
            assembled[info.name] = whole[0]
            continue
        dim = pieces[0][0].dim
        assert dim is not None  # no piece is whole (above), so each is a slice along an axis
        shape = list(pieces[0][1].shape)
        shape[dim] = max(binding.stop for binding, _ in pieces)
        full = np.empty(shape, dtype=pieces[0][1].dtype)
        covered = np.zeros(shape[dim], dtype=np.bool_)
        for binding, array in pieces:
            index = [slice(None)] * len(shape)
            index[dim] = slice(binding.start, binding.stop)
            full[tuple(index)] = array
            covered[binding.start : binding.stop] = True
        if not covered.all():
            raise PlanError(f"the ranks' slices of output {info.name!r} leave dim {dim} partly uncovered")
        assembled[info.name] = full
    return assembled


def compare(
    reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: float | None, rtol: float | None
) -> list[OutputComparison]:
    """Each output against the reference; a tolerance left None is the default for the output's type."""
    rows = []
    for name, expected in reference.items():
        got = actual[name]
        default_atol, default_rtol = default_tolerance_for(expected)
        row_atol = default_atol if atol is None else atol
        row_rtol = default_rtol if rtol is None else rtol
        if got.shape != expected.shape:
            rows.append(OutputComparison(name, tuple(got.shape), float("inf"), float("inf"), False, row_atol, row_rtol))
            continue
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        rel = diff / np.maximum(np.abs(expected.astype(np.float64)), np.finfo(np.float32).tiny)
        max_rel = float(rel.max()) if rel.size else 0.0
        ok = bool(np.allclose(got, expected, atol=row_atol, rtol=row_rtol))
        rows.append(OutputComparison(name, tuple(got.shape), max_abs, max_rel, ok, row_atol, row_rtol))
    return rows


def reference_outputs(
    model_path: Path, feed_cases: Sequence[dict[str, np.ndarray]], device: str = DEVICE_CPU, chained: bool = False
) -> list[dict[str, np.ndarray]]:
    """The original model's outputs for each feed case, from one session; `chained`: a case fed a non-empty
    past continues the case before it (its past KV inputs are that case's presents; see run_rank)."""
    session = original_session(model_path, device)
    names = [output.name for output in session.get_outputs()]
    inputs = {value.name: TensorInfo(value.name, value.type, list(value.shape)) for value in session.get_inputs()}
    pairs = kv_cache_pairs(list(inputs), names)
    axes = {past: (present, _cache_axis(inputs[past])) for present, past in pairs.items()}
    results: list[dict[str, np.ndarray]] = []
    for feeds in feed_cases:
        if chained and results and not _starts_chain(feeds, axes):
            feeds = {**feeds, **{past: results[-1][present] for present, past in pairs.items()}}
        results.append(dict(zip(names, session.run(names, feeds), strict=True)))
    return results


def wait_for_ranks(manifest: Manifest, work_dir: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = {entry.rank for entry in manifest.ranks}
    while pending:
        pending = {rank for rank in pending if not (work_dir / f"rank{rank}{RANK_DONE_SUFFIX}").exists()}
        if pending and time.monotonic() > deadline:
            raise CommunicationError(f"ranks {sorted(pending)} reported no result (waited {timeout_s:.0f} s)")
        time.sleep(0.05)


def verify_plan(
    plan_dir: Path, feeds: dict[str, np.ndarray], **options: Any
) -> tuple[dict[str, np.ndarray], list[OutputComparison]]:
    """Run the plan on `feeds` and compare with the original model; returns (outputs, comparisons), empty in
    the non-zero ranks under an external launcher (rank 0 reports). `options`: those of verify_plan_cases."""
    results = verify_plan_cases(plan_dir, [feeds], **options)
    return results[0] if results else ({}, [])


def verify_plan_cases(
    plan_dir: Path,
    feed_cases: Sequence[dict[str, np.ndarray]],
    *,
    model_path: Path | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    timeout_s: float = 600.0,
    check_hashes: bool = True,
    timeline: Path | None = None,
    device: str = DEVICE_CPU,
    profile_dir: Path | None = None,
    chained: bool = False,
) -> list[tuple[dict[str, np.ndarray], list[OutputComparison]]]:
    """Run the plan on each of `feed_cases` (say a prompt, then a decode step after a cache) and compare each
    with the original model: one job, each rank loads its session once and runs the cases in turn. Returns
    (outputs, comparisons) per case, in order.

    `device`: where the ranks AND the original run (cpu or cuda); `profile_dir`: see run_rank.
    `chained`: the cases are consecutive steps (a prefill, then decode steps): a case fed a non-empty past
    continues the case before it, each rank's past KV inputs being its own presents of that case and the
    original's its presents (the fed caches only give the shapes: the other inputs must be the next
    step's, ids and a mask of the grown length); a case fed an empty past starts a new chain.

    With `timeline`, every rank's run call is written there (see plan/timeline.py), phase "verify", the
    case as its step. The plan's files are checked against the manifest before any rank starts: by this
    process when it launches the ranks, by each rank for its own files under an external launcher.
    """
    if not feed_cases:
        raise PlanError("verify needs at least one set of inputs")
    manifest = Manifest.read(plan_dir)
    for case, feeds in enumerate(feed_cases):
        check_feeds(manifest.inputs, feeds, "the inputs" if len(feed_cases) == 1 else f"the inputs of case {case}")
        masks = [array for name, array in feeds.items() if "mask" in name.lower() and array.ndim in (2, 4)]
        if masks:  # the mask's last axis: the step's total length (past + new)
            manifest.check_cache_tokens(int(masks[0].shape[-1]), f"feed case {case}")
    execution_providers(device, 0)  # an onnxruntime without the CUDA EP is refused here, before any rank starts
    source = model_path or Path(manifest.source["path"])
    if not source.is_file():
        raise PlanError(f"the original model {str(source)!r} is gone; pass its path with --model")
    env = detect_rank_env()
    if timeline is not None and env.launcher != "none":
        raise PlanError("--timeline needs the run calls of every rank: let llmir-onnx start the ranks "
                        "(run it without mpiexec/srun)")
    if timeline is not None:
        check_output_path(timeline, "--timeline")
    if env.launcher != "none":
        work_dir = plan_dir / ".verify"
        if env.rank == 0:
            shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(exist_ok=True)
        run_rank(plan_dir, manifest, feed_cases, work_dir, check_hashes=check_hashes, device=device,
                 profile_dir=profile_dir, chained=chained)
        if env.rank != 0:
            return []
        wait_for_ranks(manifest, work_dir, timeout_s)
        assembled = [assemble_outputs(manifest, work_dir, case) for case in range(len(feed_cases))]
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        check_plan_files(plan_dir, manifest, check_hashes=check_hashes)
        with tempfile.TemporaryDirectory(prefix="llmir-verify-") as tmp:
            work_dir = Path(tmp)
            if chained:
                (work_dir / CHAINED_MARKER).touch()
            for case, feeds in enumerate(feed_cases):
                # mypy: a feed named `allow_pickle` would bind savez's flag; model inputs are never so named.
                np.savez(case_feeds_path(work_dir, case), **feeds)  # type: ignore[arg-type]
            rank_args = [str(plan_dir.resolve()), str(len(feed_cases)), device]
            if profile_dir is not None:
                rank_args.append(str(profile_dir.resolve()))
            run_rank_job("verify", "verify-rank", rank_args, manifest.world_size, work_dir, timeout_s=timeout_s)
            assembled = [assemble_outputs(manifest, work_dir, case) for case in range(len(feed_cases))]
            if timeline is not None:
                calls = {e.rank: json.loads((work_dir / f"rank{e.rank}{RUN_CALLS_SUFFIX}").read_text())
                         for e in manifest.ranks}
                stretched = {e.rank: json.loads(path.read_text()) for e in manifest.ranks
                             if (path := work_dir / f"rank{e.rank}{STRETCH_SUFFIX}").is_file()}  # fmt: skip
                write_timeline(timeline, manifest, calls, phase="verify", compute_stretch=stretched)
    references = reference_outputs(source, feed_cases, device, chained=chained)
    return [(outputs, compare(reference, outputs, atol, rtol))
            for outputs, reference in zip(assembled, references, strict=True)]


def format_comparisons(rows: list[OutputComparison]) -> str:
    width = max([len(row.name) for row in rows] + [6])
    header = f"{'output':<{width}}  {'shape':<22} {'max abs err':>12} {'max rel err':>12}"
    tolerances = {(row.atol, row.rtol) for row in rows}
    if len(tolerances) == 1:
        atol, rtol = next(iter(tolerances))
        lines = [f"{header}  ok (atol={atol:g}, rtol={rtol:g})"]
    else:
        lines = [f"{header}  ok (atol, rtol)"]
    for row in rows:
        shape = "x".join(str(d) for d in row.shape)
        line = f"{row.name:<{width}}  {shape:<22} {row.max_abs_error:12.3e} {row.max_rel_error:12.3e}  "
        line += "yes" if row.ok else "NO"
        if len(tolerances) != 1:
            line += f" ({row.atol:g}, {row.rtol:g})"
        lines.append(line)
    return "\n".join(lines)


def raise_if_mismatch(rows: list[OutputComparison]) -> None:
    bad = [row.name for row in rows if not row.ok]
    if bad:
        raise VerificationError(f"outputs {bad} differ from the original model beyond tolerance")


def rank_main_verify(
    work_dir: Path, plan_dir: str, cases: str, device: str = DEVICE_CPU, profile_dir: str | None = None
) -> None:
    """A rank spawned by `run_rank_job` (see runtime/job.py): the launching process wrote the `cases` feed
    files and checked the plan files' hashes already (sizes and paths are checked again)."""
    manifest = Manifest.read(plan_dir)
    feed_cases = [load_feeds(case_feeds_path(work_dir, case)) for case in range(int(cases))]
    run_rank(Path(plan_dir), manifest, feed_cases, work_dir, check_hashes=False, device=device,
             profile_dir=Path(profile_dir) if profile_dir else None, chained=(work_dir / CHAINED_MARKER).exists())

