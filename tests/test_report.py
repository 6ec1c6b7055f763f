"""`plan --json`, `partition --json` and `llmir-onnx report`: machine-readable results and one offline HTML page."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import LLAMA, ROOT, assert_one_line_error, run_cli

from llmir_onnx.plan.manifest import Manifest
from llmir_onnx.plan.report import SECTIONS, write_report
from llmir_onnx.plan.timeline import TIMELINE_FORMAT, TIMELINE_VERSION

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tp 2 x pp 2 plan of the bundled LLaMA, partitioned with --json (stdout is the JSON only)."""
    plan = tmp_path_factory.mktemp("report") / "plan"
    result = run_cli("partition", str(LLAMA), "--tp", "2", "--pp", "2", "-o", str(plan), "--json")
    assert result.returncode == 0, result.stderr
    return plan, json.loads(result.stdout)


def test_partition_json_is_the_manifest_and_nothing_else(plan_json: tuple[Path, dict]) -> None:
    plan, document = plan_json
    assert document.pop("plan_dir") == str(plan.resolve())
    assert document == json.loads((plan / "manifest.json").read_text())
    # What the report reads: the traffic of every rank per link, the weight splits.
    rank2 = document["ranks"][2]
    links = {(c["op"], c["peer"], tuple(c["group"] or ())) for c in rank2["cost"]["collectives"]}
    assert ("Recv", 0, ()) in links  # stage 1's tp rank 0 receives from stage 0's tp rank 0
    assert ("AllReduce", None, (2, 3)) in links
    column = next(w for w in document["sharding"]["weights"] if w["placement"] == "S(1)")
    width = column["shape"][1]
    assert column["ranges"] == [[[0, width // 2]], [[width // 2, width]]]


def test_plan_json_lists_the_layouts_and_the_recommendation() -> None:
    result = run_cli("plan", str(LLAMA), "--devices", "4", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    labels = [f"tp{layout['tp']} x pp{layout['pp']}" for layout in document["layouts"]]
    assert document["recommended"] in labels
    assert all(layout["devices"] == 4 for layout in document["layouts"])


def _timeline(path: Path, manifest: Manifest) -> Path:
    """A measured run's shape: two micro-batches through two stages, then a decode step (both tp ranks)."""
    events = []
    clock = 0.0
    for phase, step in (("prefill", 0), ("decode", 1)):
        for micro in range(2):
            for stage in range(2):
                for entry in manifest.ranks:
                    if entry.coords["pp"] == stage:
                        events.append({"rank": entry.rank, "stage": stage, "phase": phase, "step": step,
                                       "micro_batch": micro, "start_s": clock, "end_s": clock + 0.002})
                clock += 0.0025
    path.write_text(json.dumps({"format": TIMELINE_FORMAT, "version": TIMELINE_VERSION, "events": events}))
    return path


def test_report_is_one_offline_page_with_every_section_and_figure(plan_json: tuple[Path, dict], tmp_path: Path) -> None:
    plan, _ = plan_json
    out = tmp_path / "report.html"
    timeline = _timeline(tmp_path / "timeline.json", Manifest.read(plan))
    result = run_cli("report", str(plan), "-o", str(out), "--timeline", str(timeline))
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    for section in SECTIONS:
        assert f'<h2 id="{section}">' in page
    # Nothing outside the page: no link or source that names another file or a server.
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert "http://" not in page and "https://" not in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in images] == [
        "memory per rank", "predicted times per rank", "layer to stage map", "communication per step",
        "pipeline timeline",
    ]
    assert all(base64.b64decode(data).startswith(PNG_MAGIC) for _, data in images)
    assert "bottleneck" in page and "query heads" in page and "Recv" in page and "AllReduce" in page


def test_report_without_a_timeline_says_how_to_record_one(plan_json: tuple[Path, dict], tmp_path: Path) -> None:
    plan, _ = plan_json
    out = tmp_path / "report.html"
    write_report(plan, out)  # in this process: the page is under test (the command: the test above)
    page = out.read_text()
    assert "--timeline run.json" in page
    assert page.count("data:image/png;base64,") == 4


def test_report_refuses_a_file_that_is_no_timeline(plan_json: tuple[Path, dict], tmp_path: Path) -> None:
    plan, _ = plan_json
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = run_cli("report", str(plan), "-o", str(tmp_path / "r.html"), "--timeline", str(bad))
    assert_one_line_error(result, "timeline")
    assert not (tmp_path / "r.html").exists()


def test_without_matplotlib_the_cli_loads_and_report_names_the_extra(plan_json: tuple[Path, dict],
                                                                     tmp_path: Path) -> None:
    plan, _ = plan_json
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from llmir_onnx.cli.main import main\n"
        "assert 'matplotlib' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        f"sys.argv = ['llmir-onnx', 'report', {str(plan)!r}, '-o', {str(tmp_path / 'r.html')!r}]\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "llmir-onnx: error: the report draws with matplotlib, which is not installed; "
        "pip install 'llmir-onnx[report]'"
    )


def test_generate_timeline_records_every_rank_and_the_report_draws_it(plan_json: tuple[Path, dict],
                                                                      tmp_path: Path) -> None:
    plan, _ = plan_json
    timeline = tmp_path / "timeline.json"
    result = run_cli("generate", str(plan), "--prompt-ids", "1,2,3;4,5,6", "--micro-batches", "2",
                     "--max-new-tokens", "3", "--ignore-eos", "--timeline", str(timeline))
    assert result.returncode == 0, result.stderr
    document = json.loads(timeline.read_text())
    assert (document["format"], document["version"]) == (TIMELINE_FORMAT, TIMELINE_VERSION)
    events = document["events"]
    # Every rank ran every (step, micro-batch) once: 3 steps x 2 micro-batches.
    for rank in range(4):
        calls = sorted((e["step"], e["micro_batch"]) for e in events if e["rank"] == rank)
        assert calls == [(step, micro) for step in range(3) for micro in range(2)]
    assert {e["phase"] for e in events if e["step"] == 0} == {"prefill"}
    assert min(e["start_s"] for e in events) == 0.0
    # Causality, not timing: stage 1 receives what stage 0 sends inside its run, so stage 1's call of a
    # micro-batch cannot end before stage 0's call of it has started.
    by_call = {(e["rank"], e["step"], e["micro_batch"]): e for e in events}
    for step in range(3):
        for micro in range(2):
            assert by_call[(2, step, micro)]["end_s"] >= by_call[(0, step, micro)]["start_s"]
    out = tmp_path / "report.html"
    write_report(plan, out, timeline)  # in this process: the drawing of a recorded timeline is under test
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 5 and 'alt="pipeline timeline"' in page


def test_verify_timeline_records_each_rank_s_run(plan_json: tuple[Path, dict], tmp_path: Path) -> None:
    plan, _ = plan_json
    timeline = tmp_path / "verify.json"
    result = run_cli("verify", str(plan), "--timeline", str(timeline))
    assert result.returncode == 0, result.stdout + result.stderr
    events = json.loads(timeline.read_text())["events"]
    assert sorted(e["rank"] for e in events) == [0, 1, 2, 3]
    assert {(e["rank"], e["stage"]) for e in events} == {(0, 0), (1, 0), (2, 1), (3, 1)}
    assert all(e["phase"] == "verify" and e["end_s"] >= e["start_s"] >= 0.0 for e in events)
    by_rank = {e["rank"]: e for e in events}
    assert by_rank[2]["end_s"] >= by_rank[0]["start_s"]  # stage 1 receives what stage 0 sends during its run
