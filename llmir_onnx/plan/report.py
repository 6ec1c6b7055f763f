"""`llmir-onnx report`: one self-contained HTML page that shows a plan (and, optionally, a measured run).

Everything comes from the plan's manifest (memory plan, cost estimate, communication per link, the
weight splits) plus, when given, a timeline written by `generate --timeline` / `verify --timeline`.
Figures are drawn by matplotlib (the optional extra `[report]`) as PNG and embedded as base64 data
URIs, so the page opens offline and references nothing outside itself.

Sections (each an <h2 id=...>): memory, times, stages, communication, and timeline (only with a
measured run; otherwise the section says how to record one).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmir_onnx.errors import LlmirError, PlanError, atomic_output, check_output_path
from llmir_onnx.ir_io import load_model
from llmir_onnx.mesh import unit_range
from llmir_onnx.plan.devices import load_profile
from llmir_onnx.plan.layouts import model_shape
from llmir_onnx.plan.manifest import Manifest, RankEntry
from llmir_onnx.plan.memory import format_bytes
from llmir_onnx.plan.timeline import TimelineEvent, read_timeline

SECTIONS = ("memory", "times", "stages", "communication", "timeline")
MEMORY_PARTS = (
    ("weight_bytes", "weights"),
    ("kv_cache_bytes", "KV cache"),
    ("activation_peak_bytes", "activation peak"),
    ("communication_bytes", "communication buffers"),
)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlanError(
            "the report draws with matplotlib, which is not installed; pip install 'llmir-onnx[report]'"
        ) from None
    matplotlib.use("Agg")  # no display: figures only ever go to PNG bytes
    import matplotlib.pyplot as plt

    return plt


def _figure_html(plt: Any, figure: Any, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _stage_of(entry: RankEntry) -> int:
    return int(entry.coords.get("pp", 0))


def _device_memory(manifest: Manifest) -> int | None:
    """The device memory ranks are held to: --device-memory, else the profile's (None if unknown)."""
    limit = manifest.options.get("device_memory_bytes")
    if limit:
        return int(limit)
    try:
        return load_profile(str(manifest.options.get("device", "h100-sxm"))).memory_bytes
    except PlanError:
        return None


def _memory_section(plt: Any, manifest: Manifest) -> str:
    ranks = manifest.ranks
    limit = _device_memory(manifest)
    figure, axes = plt.subplots(figsize=(max(5.0, 0.9 * len(ranks) + 2), 3.6))
    bottoms = [0.0] * len(ranks)
    labels = [f"rank {e.rank}\npp{e.coords['pp']} tp{e.coords['tp']}" for e in ranks]
    largest = max(e.memory["total_bytes"] for e in ranks)
    # A unit that suits the ranks; the device line is drawn only when it is on the same scale.
    unit_name, unit = next(((n, u) for n, u in (("GiB", 2**30), ("MiB", 2**20)) if largest >= u), ("KiB", 2**10))
    for key, label in MEMORY_PARTS:
        heights = [e.memory[key] / unit for e in ranks]
        axes.bar(labels, heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    if limit is not None and limit <= 4 * largest:
        axes.axhline(limit / unit, color="black", linestyle="--", label=f"device memory {format_bytes(limit)}")
    axes.set_ylabel(unit_name)
    scale_note = ""
    if limit is not None and limit > 4 * largest:
        scale_note = (f"\n(device memory {format_bytes(limit)} is off this scale: "
                      f"{100 * largest / limit:.2f}% used at most)")
    axes.set_title(
        f"memory per rank at batch {manifest.options.get('max_batch')} x {manifest.options.get('max_seq')} tokens"
        + scale_note, fontsize="medium"
    )
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    rows = [
        [e.rank, e.coords["pp"], e.coords["tp"], *(format_bytes(e.memory[key]) for key, _ in MEMORY_PARTS),
         format_bytes(e.memory["total_bytes"]),
         f"{100 * e.memory['total_bytes'] / limit:.1f}%" if limit else "-"]
        for e in ranks
    ]
    table = _table(["rank", "pp", "tp", *(label for _, label in MEMORY_PARTS), "total", "of device"], rows)
    return _figure_html(plt, figure, "memory per rank") + table


def _times_section(plt: Any, manifest: Manifest) -> str:
    ranks = manifest.ranks
    stages = sorted({_stage_of(e) for e in ranks})
    # A stage is as slow as its slowest rank; the pipeline as slow as its slowest stage.
    prefill = {s: max(e.cost["prefill"]["total_s"] for e in ranks if _stage_of(e) == s) for s in stages}
    decode = {s: max(e.cost["decode"]["total_s"] for e in ranks if _stage_of(e) == s) for s in stages}
    bottleneck = max(stages, key=lambda s: decode[s] + prefill[s])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"rank {e.rank}" for e in ranks]
    colors = ["tab:red" if _stage_of(e) == bottleneck else "tab:blue" for e in ranks]
    left.bar(labels, [e.cost["prefill"]["total_s"] * 1e3 for e in ranks], color=colors)
    left.set_ylabel("predicted prefill (ms)")
    left.set_title("prefill per rank (red: bottleneck stage)")
    right.bar(labels, [e.cost["decode_tokens_per_s"] for e in ranks], color=colors)
    right.set_ylabel("predicted decode tokens/s")
    right.set_title("decode per rank")
    for axes in (left, right):
        axes.tick_params(axis="x", rotation=45)
    batch = int(manifest.options.get("max_batch", 1))
    rows = [
        [s, _ms(prefill[s]), _ms(decode[s]), f"{batch / decode[s]:.1f}" if decode[s] > 0 else "-",
         "bottleneck" if s == bottleneck else ""]
        for s in stages
    ]
    pipeline = (
        f"<p>Pipeline: prefill {_ms(sum(prefill.values()))} (stages in sequence), decode step "
        f"{_ms(sum(decode.values()))}; with enough micro-batches in flight the slowest stage, stage "
        f"{bottleneck}, bounds the throughput. Times are predicted for "
        f"{html.escape(str(manifest.options.get('device')))}.</p>"
    )
    table = _table(["stage", "prefill", "decode step", "decode tok/s", ""], rows)
    return _figure_html(plt, figure, "predicted times per rank") + pipeline + table


def _stages_section(plt: Any, manifest: Manifest) -> str:
    ranks = manifest.ranks
    first_of_stage: dict[int, RankEntry] = {}
    for entry in ranks:
        first_of_stage.setdefault(_stage_of(entry), entry)
    parts = []
    ranges = [(s, e.layers) for s, e in sorted(first_of_stage.items()) if e.layers]
    if ranges:
        figure, axes = plt.subplots(figsize=(8, 1.0 + 0.4 * len(ranges)))
        for stage, (start, stop) in ranges:
            axes.barh(f"stage {stage}", stop - start, left=start)
            axes.text((start + stop) / 2, stage, f"layers {start}-{stop - 1}", ha="center", va="center", color="white")
        axes.set_xlabel("decoder layer")
        axes.invert_yaxis()
        axes.set_title("layer -> stage map")
        parts.append(_figure_html(plt, figure, "layer to stage map"))
    rows = [
        [s, f"{e.layers[0]}-{e.layers[1] - 1}" if e.layers else "all",
         ", ".join(str(r.rank) for r in ranks if _stage_of(r) == s)]
        for s, e in sorted(first_of_stage.items())
    ]
    parts.append(_table(["stage", "layers", "ranks (tp group)"], rows))
    parts.append(_head_split(manifest))
    return "".join(parts)


def _attention_shape(manifest: Manifest) -> tuple[int, int, int] | str:
    """(heads, KV heads, head size) of the plan's source, read from its graph (weights are not read), or
    why they are unknown. Read here, not at partition time: the layout analysis costs seconds on a 7B model."""
    try:
        shape = model_shape(load_model(Path(manifest.source["path"]), check_data=False))
    except LlmirError as error:
        return f"the head split is unknown: {error}"
    return shape.heads, shape.kv_heads, shape.head_dim


def _head_split(manifest: Manifest) -> str:
    sharding = manifest.sharding
    tp = int(manifest.mesh["tp"])
    parts = []
    attention = _attention_shape(manifest)
    if isinstance(attention, str):
        parts.append(f"<p>{html.escape(attention)}</p>")
    else:
        heads, kv_heads, head_dim = attention
        rows = []
        shares = [int(s) for s in manifest.mesh.get("tp_shares", ())]
        for tp_rank in range(tp):
            q = f"{tp_rank * heads // tp}-{(tp_rank + 1) * heads // tp - 1}"
            if shares:  # uneven: the heads are units, kv heads (as many, or fewer) follow them
                held = unit_range(shares, tp_rank)
                q = f"{held.start}-{held.stop - 1}"
                kv = f"{held.start * kv_heads // heads}-{(held.stop * kv_heads - 1) // heads}"
            elif kv_heads >= tp:
                kv = f"{tp_rank * kv_heads // tp}-{(tp_rank + 1) * kv_heads // tp - 1}"
            else:  # fewer KV heads than ranks: each KV head is replicated on tp / kv_heads ranks
                kv = f"{tp_rank * kv_heads // tp} (replicated)"
            rows.append([tp_rank, q, kv])
        parts.append(
            f"<p>Every tp group splits the {heads} attention heads ({kv_heads} KV heads, head size "
            f"{head_dim}) the same way:</p>" + _table(["tp rank", "query heads", "KV heads"], rows)
        )
    weights = sharding.get("weights", [])
    if weights:
        rows = [
            [w["name"], "x".join(map(str, w["shape"])), w["placement"],
             *("; ".join(f"{a}:{b}" for a, b in ranges) for ranges in w["ranges"])]
            for w in weights
        ]
        parts.append(
            "<p>Columns and rows of each sharded weight (the sliced dim's ranges per tp rank):</p>"
            + _table(["weight", "shape", "placement", *(f"tp {r}" for r in range(tp))], rows)
        )
    elif tp > 1:
        parts.append("<p>The manifest lists no weight splits (partition again to record them).</p>")
    return "".join(parts)


def _link_name(entry: dict[str, Any], rank: int) -> str:
    if entry.get("peer") is not None:
        return f"{rank}->{entry['peer']}" if entry["op"] == "Send" else f"{entry['peer']}->{rank}"
    group = entry.get("group")
    return "group " + ",".join(map(str, group)) if group else "group"


def _communication_section(plt: Any, manifest: Manifest) -> str:
    ranks = manifest.ranks
    rows = []
    per_rank_share = []
    for e in ranks:
        collectives = e.cost.get("collectives", [])
        decode_comm = sum(c["decode_s"] for c in collectives)
        step = e.cost["decode"]["total_s"]
        per_rank_share.append((e.rank, decode_comm, step))
        for c in collectives:
            rows.append([
                e.rank, c["op"], _link_name(c, e.rank), c["count"], format_bytes(c["prefill_bytes"]),
                format_bytes(c["decode_bytes"]), _ms(c["decode_s"]),
                f"{100 * c['decode_s'] / step:.1f}%" if step > 0 else "-",
            ])
    if not rows:
        return "<p>No rank communicates (tp 1, pp 1): nothing crosses a link.</p>"
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    by_op: dict[str, list[float]] = {}
    for index, e in enumerate(ranks):
        for c in e.cost.get("collectives", []):
            by_op.setdefault(c["op"], [0.0] * len(ranks))[index] += c["decode_bytes"] / 2**10
    labels = [f"rank {e.rank}" for e in ranks]
    bottoms = [0.0] * len(ranks)
    for op, values in sorted(by_op.items()):
        left.bar(labels, values, bottom=bottoms, label=op)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    left.set_ylabel("KiB per decode step")
    left.set_title("bytes per collective")
    left.legend(fontsize="small")
    right.bar(labels, [100 * comm / step if step > 0 else 0 for _, comm, step in per_rank_share])
    right.set_ylabel("% of predicted decode step")
    right.set_title("communication share of the step")
    for axes in (left, right):
        axes.tick_params(axis="x", rotation=45)
    table = _table(
        ["rank", "op", "link", "ops/step", "prefill bytes", "decode bytes", "decode time", "share of decode step"], rows
    )
    return _figure_html(plt, figure, "communication per step") + table


def _predicted_schedule(manifest: Manifest, events: Sequence[TimelineEvent]) -> list[TimelineEvent]:
    """The measured calls replayed with predicted durations: a call starts when its stage is free and the
    previous stage's call of the same (phase, step, micro-batch) has ended."""
    duration: dict[tuple[int, str], float] = {}
    for e in manifest.ranks:
        for phase in ("prefill", "decode"):
            key = (_stage_of(e), phase)
            duration[key] = max(duration.get(key, 0.0), e.cost[phase]["total_s"])
    calls = sorted({(ev.stage, ev.phase, ev.step, ev.micro_batch) for ev in events if ev.kind == "run"},
                   key=lambda c: (c[2], c[3], c[0]))
    stage_free: dict[int, float] = {}
    done: dict[tuple[int, str, int, int], float] = {}
    predicted = []
    for stage, phase, step, micro in sorted(calls, key=lambda c: (c[2], c[3], c[0])):
        ready = done.get((stage - 1, phase, step, micro), 0.0)
        # A step starts when the previous one has ended on every stage (its tokens are broadcast).
        previous_step = max((t for (_, _, st, _), t in done.items() if st == step - 1), default=0.0)
        start = max(stage_free.get(stage, 0.0), ready, previous_step if stage == 0 else 0.0)
        end = start + duration.get((stage, "prefill" if phase == "prefill" else "decode"), 0.0)
        stage_free[stage] = end
        done[(stage, phase, step, micro)] = end
        predicted.append(TimelineEvent(-1, stage, phase, step, micro, start, end))
    return predicted


def _gantt(axes: Any, events: Sequence[TimelineEvent], stages: int, title: str) -> None:
    import matplotlib  # the optional report extra, found by _pyplot already

    palette = matplotlib.colormaps["tab10"]
    for ev in events:
        axes.barh(ev.stage, (ev.end_s - ev.start_s) * 1e3, left=ev.start_s * 1e3, height=0.6,
                  color=palette(ev.micro_batch % 10), edgecolor="black", linewidth=0.3)
    axes.set_yticks(range(stages))
    axes.set_yticklabels([f"stage {s}" for s in range(stages)])
    axes.invert_yaxis()
    axes.set_xlabel("ms since start")
    axes.set_title(title)


def _timeline_section(plt: Any, manifest: Manifest, events: Sequence[TimelineEvent] | None) -> str:
    if events is None:
        return ("<p>No measured run given. Record one with <code>llmir-onnx generate PLAN --timeline run.json</code> "
                "and pass it with <code>--timeline run.json</code>.</p>")
    runs = [ev for ev in events if ev.kind == "run"]
    if not runs:
        raise PlanError("the timeline holds no run calls; record it again with generate --timeline")
    stages = int(manifest.mesh["pp"])
    # One lane per stage: its tp rank 0 stands for the stage (the tp ranks of a stage run in lockstep).
    lanes = [ev for ev in runs if manifest.rank_entry(ev.rank).coords["tp"] == 0]
    predicted = _predicted_schedule(manifest, lanes)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 2.0 + 1.4 * stages), layout="constrained")
    _gantt(top, lanes, stages, "measured: run calls per stage (colour = micro-batch)")
    _gantt(bottom, predicted, stages, "predicted (plan's cost model at its batch and length)")
    measured_total = max(ev.end_s for ev in lanes) - min(ev.start_s for ev in lanes)
    predicted_total = max(ev.end_s for ev in predicted) if predicted else 0.0
    phases = sorted({ev.phase for ev in runs})
    rows = []
    for stage in range(stages):
        for phase in phases:
            mine = [ev.end_s - ev.start_s for ev in lanes if ev.stage == stage and ev.phase == phase]
            if mine:
                rows.append([stage, phase, len(mine), _ms(sum(mine) / len(mine)), _ms(max(mine))])
    summary = (f"<p>Measured span {_ms(measured_total)} over {len(lanes)} stage calls (one lane per stage: its tp "
               "rank 0; a call includes its wait in Recv for the previous stage); the same schedule at the "
               f"predicted times of the plan's device and sizes spans {_ms(predicted_total)}.</p>")
    return (_figure_html(plt, figure, "pipeline timeline") + summary
            + _table(["stage", "phase", "calls", "mean", "max"], rows))


STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
td, th { border: 1px solid #bbb; padding: 2px 6px; text-align: right; }
figure { margin: 0.5em 0; }
img { max-width: 100%; }
"""


def render_report(plan_dir: Path, timeline: Path | None = None) -> str:
    """The report page of the plan in `plan_dir` (and of a measured run), as one HTML string."""
    manifest = Manifest.read(plan_dir)
    events = read_timeline(timeline) if timeline is not None else None
    plt = _pyplot()
    mesh = manifest.mesh
    bodies = {
        "memory": ("Memory per rank", _memory_section(plt, manifest)),
        "times": ("Predicted times and the bottleneck", _times_section(plt, manifest)),
        "stages": ("Layers, stages and the tensor-parallel split", _stages_section(plt, manifest)),
        "communication": ("Communication per step", _communication_section(plt, manifest)),
        "timeline": ("Measured pipeline timeline", _timeline_section(plt, manifest, events)),
    }
    sp = " (sp)" if mesh.get("sp") else ""  # the tp groups also split the tokens between their blocks
    title = f"llmir-onnx plan: {Path(manifest.source['path']).name}, tp {mesh['tp']}{sp} x pp {mesh['pp']}"
    sections = "".join(f'<section><h2 id="{key}">{html.escape(name)}</h2>{body}</section>'
                       for key, (name, body) in bodies.items())
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{manifest.world_size} ranks; memory at batch {manifest.options.get('max_batch')} x "
            f"{manifest.options.get('max_seq')} tokens.</p>{sections}</body></html>\n")


def write_report(plan_dir: Path, out: Path, timeline: Path | None = None) -> Path:
    check_output_path(out, "-o")
    page = render_report(plan_dir, timeline)
    with atomic_output(out) as temporary:
        temporary.write_text(page)
    return out
