"""Timeline files: each rank's run calls of a measured run (`generate/verify --timeline FILE`), which
`report --timeline` draws as a Gantt chart.

Its own module because the ranks' launcher writes it: runtime imports this and not report.py, whose
figures pull in the planning modules and onnx (seconds of import per process that never draws).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from llmir_onnx.errors import PlanError, atomic_output
from llmir_onnx.plan.manifest import Manifest

TIMELINE_FORMAT = "llmir-onnx-timeline"
TIMELINE_VERSION = 1


@dataclass(frozen=True)
class TimelineEvent:
    """One run call (or collective) of one rank, seconds since the run started."""

    rank: int
    stage: int
    phase: str  # "prefill" | "decode" | "verify"
    step: int
    micro_batch: int
    start_s: float
    end_s: float
    kind: str = "run"


def read_timeline(path: Path) -> list[TimelineEvent]:
    """The events of a timeline file (JSON: {"format", "version", "events": [...]})."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PlanError(
            f"cannot read the timeline {str(path)!r} ({error}); record one with generate --timeline"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != TIMELINE_FORMAT or raw.get("version") != TIMELINE_VERSION:
        raise PlanError(
            f"{str(path)!r} is not a version-{TIMELINE_VERSION} {TIMELINE_FORMAT} file; record one with "
            "generate --timeline FILE or verify --timeline FILE"
        )
    try:
        return [TimelineEvent(**event) for event in raw["events"]]
    except (KeyError, TypeError) as error:
        raise PlanError(f"{str(path)!r} has a malformed event ({error}); record the timeline again") from None


def write_timeline(
    path: Path,
    manifest: Manifest,
    run_calls: dict[int, Sequence[Sequence[float]]],
    phase: str | None = None,
    compute_stretch: dict[int, dict[str, float]] | None = None,
) -> Path:
    """A timeline file from each rank's run calls ((step, micro-batch, start, end) on one clock): with no
    `phase`, step 0 is the prefill and the others decode steps; times are relative to the earliest start.
    `compute_stretch`: per rank under LLMIR_COMPUTE_STRETCH, the seconds its library slept and the thread CPU
    seconds it measured (runtime/stretch.py), kept in the file's "compute_stretch" field."""
    starts = [call[2] for calls in run_calls.values() for call in calls]
    if not starts:
        raise PlanError("no rank recorded a run call; nothing to write to the timeline")
    origin = min(starts)
    events = [
        asdict(TimelineEvent(rank=rank, stage=int(manifest.rank_entry(rank).coords["pp"]),
                             phase=phase or ("prefill" if int(step) == 0 else "decode"), step=int(step),
                             micro_batch=int(micro), start_s=start - origin, end_s=end - origin))
        for rank, calls in sorted(run_calls.items())
        for step, micro, start, end in calls
    ]
    body: dict[str, object] = {"format": TIMELINE_FORMAT, "version": TIMELINE_VERSION, "events": events}
    if compute_stretch:
        body["compute_stretch"] = {str(rank): totals for rank, totals in sorted(compute_stretch.items())}
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(body) + "\n")
    return path
