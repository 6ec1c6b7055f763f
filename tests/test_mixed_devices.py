"""Work in proportion to capability: tp weights from the devices, --tp-weights, the CPU-share throttle,
and a mixed-device plan whose tp split is uneven because of its profiles, through real rank processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmir_onnx.errors import PlanError
from llmir_onnx.plan.devices import (
    A100_80G,
    CPU_HERE,
    H100_SXM,
    derived_tp_weights,
    parse_devices,
    parse_tp_weights,
)
from llmir_onnx.runtime.throttle import parse_cpu_shares, throttle_process
from tests.test_cli import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "models" / "gpt2-torch-legacy"


def _quarter_speed_cluster(tmp_path: Path) -> Path:
    """Rank 0 on cpu-here, rank 1 on a profile with a quarter of its memory bandwidth (and FLOP/s)."""
    slow = {
        "memory_bytes": CPU_HERE.memory_bytes,
        "peak_flops": {k: v / 4 for k, v in CPU_HERE.peak_flops.items()},
        "memory_bandwidth": CPU_HERE.memory_bandwidth / 4,
        "link_bandwidth": CPU_HERE.link_bandwidth,
        "link_latency": CPU_HERE.link_latency,
        "node_overhead": CPU_HERE.node_overhead * 4,
        "devices_per_host": None,
    }
    path = tmp_path / "cluster.json"
    body = {"profiles": {"cpu-quarter": slow},
            "devices": [{"profile": "cpu-here", "host": "vm"}, {"profile": "cpu-quarter", "host": "vm"}]}  # fmt: skip
    path.write_text(json.dumps(body))
    return path


def test_weights_follow_memory_bandwidth_and_are_none_on_alike_devices() -> None:
    assert derived_tp_weights(parse_devices("4", "h100-sxm"), 4) is None
    assert derived_tp_weights(parse_devices("4", "h100-sxm"), 2, 2) is None
    mixed = parse_devices("2xh100-sxm,2xa100-80g", devices_per_host=4)
    ratio = H100_SXM.bytes_per_second / A100_80G.bytes_per_second
    assert derived_tp_weights(mixed, 4) == (round(ratio, 3), round(ratio, 3), 1.0, 1.0)
    # tp 2 x pp 2: stage 0 on the H100s, stage 1 on the A100s; each tp rank has one of each: even
    assert derived_tp_weights(mixed, 2, 2) is None


def test_stages_of_different_compositions_share_one_split_by_harmonic_speed() -> None:
    """tp 2 x pp 2 on [h100, a100 | a100, a100]: tp rank 0 runs an H100 then an A100, tp rank 1 two A100s;
    one split for both stages, each rank's speed the harmonic sum over its stages."""
    cluster = parse_devices("1xh100-sxm,3xa100-80g", devices_per_host=4)
    h, a = H100_SXM.bytes_per_second, A100_80G.bytes_per_second
    first, second = 1 / (1 / h + 1 / a), a / 2
    assert derived_tp_weights(cluster, 2, 2) == (float(f"{first / second:.4g}"), 1.0)


@pytest.mark.parametrize(
    ("text", "tp", "message"),
    [
        ("3", 2, r"^--tp-weights '3' gives 1 weight for --tp 2; give one per tp rank, e\.g\. --tp-weights 1,1$"),
        ("3,1,1", 2, r"^--tp-weights '3,1,1' gives 3 weights for --tp 2; "),
        ("3,x", 2, r"^--tp-weights '3,x': cannot read 'x' as a number; "),
        ("3,0", 2, r"^--tp-weights '3,0': '0' is not a positive number; every weight must be > 0$"),
        ("-1,2", 2, r"^--tp-weights '-1,2': '-1' is not a positive number"),
        ("nan,1", 2, r"^--tp-weights 'nan,1': 'nan' is not a positive number"),
    ],
)
def test_bad_tp_weights_are_one_line_errors(text: str, tp: int, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_tp_weights(text, tp)
    assert parse_tp_weights("3, 1.5", 2) == (3.0, 1.5)


def test_partition_refuses_bad_tp_weights_leaving_nothing(tmp_path: Path) -> None:
    out = tmp_path / "plan"
    result = run_cli("partition", str(GPT2 / "model.onnx"), "-o", str(out), "--tp", "2", "--tp-weights", "3,0")
    assert_one_line_error(result, "--tp-weights '3,0': '0' is not a positive number")
    assert not out.exists()


@pytest.mark.parametrize("text", ["1", "1=0", "1=1.5", "x=0.5", "-1=0.5", "1=half"])
def test_bad_cpu_shares_are_one_line_errors(text: str) -> None:
    with pytest.raises(PlanError, match=r"^LLMIR_CPU_SHARE=.*write RANK=SHARE with 0 < SHARE <= 1"):
        parse_cpu_shares(text)
    assert parse_cpu_shares("1=0.333, 3=1") == {1: 0.333, 3: 1.0}


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_the_throttle_stops_its_target_and_always_leaves_it_running() -> None:
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sidecar = throttle_process(target.pid, 0.05)
        assert sidecar is not None
        # the target spends 95% of each period stopped: it is seen stopped (waits for it, no timing bound)
        seen = False
        for _ in range(2000):
            if _state(target.pid) == "T":
                seen = True
                break
            time.sleep(0.001)
        assert seen, "the sidecar never stopped its target"
        sidecar.terminate()
        sidecar.wait(timeout=30)
        assert _state(target.pid) != "T", "a terminated sidecar must leave its target running"
        assert throttle_process(target.pid, 1.0) is None
    finally:
        target.kill()
        target.wait()


def test_the_throttle_outlives_hydras_sigusr1_and_leaves_its_target_running() -> None:
    """Hydra sends SIGUSR1 to a rank's process group when another rank exits: a sidecar killed by it
    while its target is stopped left the rank stopped for good (the throttled `verify` hang)."""
    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sidecar = throttle_process(target.pid, 0.05)
        assert sidecar is not None
        for _ in range(2000):  # until its signal handlers are in place: it has stopped the target once
            if _state(target.pid) == "T":
                break
            time.sleep(0.001)
        sidecar.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert sidecar.poll() is None, f"the sidecar died of SIGUSR1 (exit {sidecar.returncode})"
        sidecar.terminate()
        sidecar.wait(timeout=30)
        assert _state(target.pid) != "T", "a terminated sidecar must leave its target running"
    finally:
        target.kill()
        target.wait()


def test_mixed_device_tp_plan_gives_the_faster_device_more_heads_and_matches(tmp_path: Path) -> None:
    """gpt2 (4 heads) at tp 2 on cpu-here and a device with a quarter of its bandwidth: weights 4:1 from the
    profiles, heads 3,1; each rank's memory and cost from its own share on its own device; the ranks run
    as processes and reproduce the original. (The CPU-share emulation of the slow device is left to
    bench/mixed_devices.py: it makes a rank slow, which a test must not depend on.)"""
    from typer.testing import CliRunner

    from cli.main import app
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.plan.manifest import Manifest
    from llmir_onnx.runtime.feeds import export_check_feeds
    from llmir_onnx.runtime.verify import verify_plan

    out = tmp_path / "plan"
    cluster = parse_devices(str(_quarter_speed_cluster(tmp_path)))
    partition_to_dir(GPT2 / "model.onnx", out, tp=2, device="cpu-here", devices=cluster)
    manifest = Manifest.read(out)
    assert manifest.options["tp_weights"] == [4.0, 1.0]
    assert manifest.mesh["tp_shares"] == [3, 1]
    fast, slow = manifest.ranks
    assert fast.memory["weight_bytes"] > slow.memory["weight_bytes"]
    assert fast.cost["device"] == "cpu-here" and slow.cost["device"] == "cpu-quarter"
    assert fast.cost["prefill"]["flops"] > 1.5 * slow.cost["prefill"]["flops"]  # lm_head is on both
    _, rows = verify_plan(out, export_check_feeds(GPT2), model_path=GPT2 / "model.onnx", timeout_s=180)
    bad = [f"{row.name}: {row.max_abs_error:.3g}" for row in rows if not row.ok]
    assert rows and not bad, bad
    # The command's summary line, in this process (typer's runner; its exit code and output as a user sees them).
    printed = CliRunner().invoke(app, ["partition", str(GPT2 / "model.onnx"), "-o", str(tmp_path / "cli"), "--tp",
                                       "2", "--devices", str(tmp_path / "cluster.json")])
    assert printed.exit_code == 0, printed.output
    assert "heads per tp rank: 3,1 (weights 4:1 from the devices' memory bandwidth)" in printed.output


@pytest.fixture(scope="module")
def mha4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dataclasses import replace

    from tests.test_synthetic import synthetic

    config = replace(synthetic.PRESETS["tiny"], heads=4, kv_heads=4, layers=2)
    return synthetic.generate(config, tmp_path_factory.mktemp("mha4"))


def test_plan_ranks_the_proportional_split_above_the_even_one_on_mixed_devices(mha4: Path, tmp_path: Path) -> None:
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.plan.layouts import enumerate_layouts, format_layout_table, recommend

    cluster = parse_devices(str(_quarter_speed_cluster(tmp_path)))
    layouts = enumerate_layouts(load_model(mha4), 2, CPU_HERE.memory_bytes, CPU_HERE, 1, 64, cluster=cluster)
    by = {layout.label: layout for layout in layouts}
    proportional, even = by["tp2[3,1] x pp1"], by["tp2 x pp1"]
    assert proportional.valid and even.valid and proportional.tp_weights == (4.0, 1.0)
    # the quarter-speed rank holds 1 head of 4 instead of 2: the step waits less for it
    assert proportional.decode_step_s < even.decode_step_s and proportional.prefill_s < even.prefill_s
    # memory: the tightest rank is the fast one, holding 3 of the 4 heads' weights
    assert proportional.ranks[0].weight_bytes > even.ranks[0].weight_bytes
    assert layouts.index(proportional) < layouts.index(even)
    best, why = recommend(layouts)
    if best is proportional:
        assert "its heads split 3,1, in proportion to its devices' memory bandwidth (4:1)" in why
        assert "against the even split tp2 x pp1" in why
    assert "tp2[3,1] x pp1" in format_layout_table(layouts)


def test_plan_takes_uneven_tp_where_tp_does_not_divide_the_heads(mha4: Path) -> None:
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.plan.layouts import enumerate_layouts

    layouts = enumerate_layouts(load_model(mha4), 3, CPU_HERE.memory_bytes, CPU_HERE, 1, 64)
    by = {(layout.tp, layout.pp): layout for layout in layouts}
    assert by[(3, 1)].valid and by[(3, 1)].tp_shares == (2, 1, 1) and by[(3, 1)].label == "tp3[2,1,1] x pp1"
    assert by[(3, 1)].tp_weights == ()
    # uneven tp with pipeline stages, as the partitioner takes it (tests/test_uneven_tp.py: tp 3 x pp 2)
    six = enumerate_layouts(load_model(mha4), 6, CPU_HERE.memory_bytes, CPU_HERE, 1, 64)
    three_by_two = next(layout for layout in six if (layout.tp, layout.pp) == (3, 2))
    assert three_by_two.valid and three_by_two.tp_shares == (2, 1, 1), three_by_two.reason


@pytest.mark.parametrize("text", ["1", "1=0.5", "x=3", "-1=3", "1=fast", "1=inf", "1=nan"])
def test_bad_compute_stretches_are_one_line_errors(text: str) -> None:
    from llmir_onnx.runtime.stretch import parse_compute_stretches

    with pytest.raises(PlanError, match=r"^LLMIR_COMPUTE_STRETCH=.*write RANK=FACTOR with FACTOR >= 1, e\.g\. 1=3$"):
        parse_compute_stretches(text)
    assert parse_compute_stretches("1=3, 0=1") == {1: 3.0, 0: 1.0}


def test_compute_stretch_sleeps_twice_the_slow_ranks_compute_and_outputs_still_match(
    mha4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMIR_COMPUTE_STRETCH=1=3 through real rank processes (verify, tp 2, a 96-token prompt): the outputs
    match; rank 1's library slept (3 - 1) x the compute CPU time it measured (no timing bound: the two
    counters of the library; a sleep only overshoots, and the last one's overshoot is the only one not paid
    back); that compute is part of the CPU time of the thread that called run (the kernels ran there:
    the library refuses a kernel on another thread); rank 0 is not stretched."""
    from dataclasses import replace

    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.verify import verify_plan_cases
    from tests.test_synthetic import make_feeds, synthetic

    plan = tmp_path / "plan"
    partition_to_dir(mha4, plan, tp=2)
    feeds = make_feeds(replace(synthetic.PRESETS["tiny"], heads=4, kv_heads=4, layers=2), 1, 0, 96)  # mha4's
    monkeypatch.setenv("LLMIR_COMPUTE_STRETCH", "1=3")
    timeline = tmp_path / "timeline.json"
    results = verify_plan_cases(plan, [feeds, feeds], model_path=mha4, timeline=timeline, timeout_s=120)
    bad = [f"{row.name}: {row.max_abs_error:.3g}" for _, rows in results for row in rows if not row.ok]
    assert results and not bad, bad
    stretch = json.loads(timeline.read_text())["compute_stretch"]
    assert set(stretch) == {"1"}, stretch
    slow = stretch["1"]
    assert 0 < slow["compute_s"] <= slow["run_thread_cpu_s"], slow
    assert 2 * slow["compute_s"] * (1 - 1e-6) <= slow["slept_s"] <= 2 * slow["compute_s"] + 0.05, slow


def test_compute_stretch_runs_one_intra_op_thread_and_refuses_more() -> None:
    """The stretch measures the CPU time of the thread that calls run: its rank's sessions get 1 intra-op
    thread unless told otherwise, and more is a one-line error when the options are made."""
    from llmir_onnx.runtime.launch import CommContext, custom_ops_library_path
    from llmir_onnx.runtime.stretch import ComputeMeter

    meter = ComputeMeter(None, 1, 3.0)  # type: ignore[arg-type]  # session_options never calls the library
    comm = CommContext(1, 2, 1, "none", False, custom_ops_library_path(), "test", None,  # type: ignore[arg-type]
                       compute_meter=meter)  # fmt: skip
    options = comm.session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert comm.session_options(intra_op_num_threads=1).intra_op_num_threads == 1
    with pytest.raises(PlanError, match=r"^rank 1: LLMIR_COMPUTE_STRETCH .* needs intra_op_num_threads = 1, not 2; "):
        comm.session_options(intra_op_num_threads=2)


def test_the_compute_meter_counts_a_ranks_compute_and_not_a_collectives_wait() -> None:
    """The library's compute meter on two unstretched ranks (tests/mpi_workers/collectives_worker.py
    `compute_meter`): MatMul -> AllReduce -> MatMul, rank 1 once 1 s late, so that rank 0 polls in the
    AllReduce (CPU time) meanwhile. On every rank and run the meter's compute is non-zero and part of the
    thread's CPU time in the run, and no kernel ran on another thread; on rank 0 the late run's compute
    did not grow by the CPU time of the wait (relations between the figures, no timing bound)."""
    from tests.test_collectives_mpi import assert_all_ok, launch

    run = launch(2, "compute_meter", "1.0", timeout_s=120)
    assert_all_ok(run, 2, min_checks=8)
