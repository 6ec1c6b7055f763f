"""Device descriptions per rank and hosts (issue 15 item 2): parsing, placement of ranks on hosts, the link
the cost model picks for a group, the mixed-device pipeline split, and a mixed-device plan through real
rank processes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.mesh import DeviceMesh
from llmir_onnx.plan.cost import comm_seconds
from llmir_onnx.plan.devices import (
    BUILTIN_PROFILES,
    LINKS,
    MIXED_HOST_LINK,
    parse_devices,
    profile_from_dict,
    uniform_cluster,
)
from llmir_onnx.plan.layouts import enumerate_layouts, recommend
from llmir_onnx.plan.stage_balance import StageUnit, balance_stages
from tests.test_synthetic import synthetic

GiB = 1 << 30
H100, A100, CPU = BUILTIN_PROFILES["h100-sxm"], BUILTIN_PROFILES["a100-80g"], BUILTIN_PROFILES["cpu-here"]

# cpu-here at a third of its speed: a deliberately slow device for the mixed-device tests
SLOW = {
    "memory_bytes": 24 * GiB, "peak_flops": {"float32": 2.6e11 / 3, "float16": 1.54e11 / 3},
    "memory_bandwidth": 3.5e10 / 3, "link_bandwidth": 4.6e9, "link_latency": 3e-5, "node_overhead": 5.4e-7,
    "devices_per_host": None, "description": "cpu-here at a third of its speed",
}  # fmt: skip


def _cluster_file(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(body))
    return path


def test_a_count_fills_hosts_of_the_profiles_usual_size() -> None:
    cluster = parse_devices("64", "h100-sxm")
    assert len(cluster) == 64 and len(cluster.hosts) == 8
    assert [slot.host for slot in cluster.devices[7:9]] == ["host0", "host1"]
    assert all(slot.memory_bytes == H100.memory_bytes for slot in cluster.devices)
    assert len(parse_devices("64", "h100-sxm", devices_per_host=4).hosts) == 16
    assert parse_devices("6", "a100-80g", memory_bytes=40 * GiB).devices[5].memory_bytes == 40 * GiB
    # processes on one machine: one host whatever the count
    assert len(parse_devices("16", "cpu-here").hosts) == 1


def test_a_list_starts_a_host_per_item() -> None:
    cluster = parse_devices("2xh100-sxm,2xa100-80g")
    assert [(s.profile.name, s.host) for s in cluster.devices] == [
        ("h100-sxm", "host0"), ("h100-sxm", "host0"), ("a100-80g", "host1"), ("a100-80g", "host1"),
    ]  # fmt: skip
    assert [s.host for s in parse_devices("12xh100-sxm,a100-80g").devices][7:] == ["host0"] + ["host1"] * 4 + [
        "host2"
    ]
    assert cluster.describe() == "4 devices on 2 hosts: 2 x h100-sxm (80.00 GiB), 2 x a100-80g (80.00 GiB)"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2xh100,2xa100-80g", r"^--devices '2xh100,2xa100-80g': 'h100' is neither a built-in profile"),
        ("0xh100-sxm", r"^--devices '0xh100-sxm': '0xh100-sxm' has no devices; counts start at 1$"),
        ("2xh100-sxm,,", r"^--devices '2xh100-sxm,,': cannot read ''"),
        ("missing.json", r"^--devices 'missing.json': no such file"),
    ],
)
def test_bad_descriptions_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(PlanError, match=message) as error:
        parse_devices(spec)
    assert "\n" not in str(error.value)


def test_a_json_cluster_with_its_own_profile_memory_and_hosts(tmp_path: Path) -> None:
    path = _cluster_file(tmp_path, {
        "profiles": {"cpu-slow": SLOW},
        "devices": [{"profile": "h100-sxm", "count": 2, "host": "a", "memory": "40GiB"},
                    {"profile": "cpu-slow", "host": "b"}],
    })  # fmt: skip
    cluster = parse_devices(str(path))
    assert [(s.profile.name, s.memory_bytes, s.host) for s in cluster.devices] == [
        ("h100-sxm", 40 * GiB, "a"), ("h100-sxm", 40 * GiB, "a"), ("cpu-slow", 24 * GiB, "b"),
    ]  # fmt: skip
    assert cluster.manifest_entry()["ranks"][2] == {"rank": 2, "profile": "cpu-slow", "memory_bytes": 24 * GiB,
                                                    "host": "b"}  # fmt: skip
    split = _cluster_file(tmp_path, {"devices": [{"profile": "h100-sxm", "host": "a"},
                                                 {"profile": "h100-sxm", "host": "b"},
                                                 {"profile": "h100-sxm", "host": "a"}]})  # fmt: skip
    with pytest.raises(PlanError, match=r"host 'a' appears in two places; list each host's devices together"):
        parse_devices(str(split))
    typo = _cluster_file(tmp_path, {"devices": [{"profile": "h100-sxm", "hots": "a"}]})
    with pytest.raises(PlanError, match=r"devices\[0\]: unknown key hots; the keys are profile, count, host, memory"):
        parse_devices(str(typo))


def test_tp_groups_are_placed_inside_hosts() -> None:
    """Rank order is host-major and the mesh's tp groups are consecutive ranks: tp 8 x pp 8 on 8 hosts
    of 8 keeps every tp group on one host and every stage boundary between two hosts."""
    cluster = uniform_cluster(H100, 64)
    mesh = DeviceMesh(pp=8, tp=8)
    for group in mesh.groups("tp"):
        assert len({cluster.devices[r].host for r in group}) == 1
    for group in mesh.groups("pp"):
        assert len({cluster.devices[r].host for r in group}) == 8


def test_the_link_of_a_group_is_the_slowest_it_spans() -> None:
    cluster = parse_devices("16", "h100-sxm")
    link, hosts = cluster.group_link(tuple(range(8)))
    assert (link.bandwidth, link.latency, hosts) == (H100.link_bandwidth, H100.link_latency, 1)
    link, hosts = cluster.group_link(tuple(range(16)))
    assert link is LINKS["infiniband-ndr"] and hosts == 2
    # a Send/Recv between the hosts
    assert cluster.group_link((0, 8)) == (LINKS["infiniband-ndr"], 2)
    # mixed generations: the A100 hosts' HDR is the slowest; two profiles in one host talk over PCIe
    mixed = parse_devices("8xh100-sxm,8xa100-80g")
    assert mixed.group_link((0, 15))[0] is LINKS["infiniband-hdr"]
    one_host = parse_devices("4", "h100-sxm")
    shared = type(one_host)((one_host.devices[0], type(one_host.devices[0])(A100, A100.memory_bytes, "host0")))
    assert shared.group_link((0, 1)) == (LINKS[MIXED_HOST_LINK], 1)


def test_collectives_across_hosts_pay_the_host_links_alpha_per_tree_step() -> None:
    ib = LINKS["infiniband-ndr"]
    payload = 1 << 20
    inside = comm_seconds("AllReduce", payload, 8, H100)
    assert inside == pytest.approx(H100.link_latency + 1.75 * payload / H100.link_bandwidth)
    # 64 ranks on 8 hosts: 2 x log2(8) = 6 steps of the inter-host alpha, the bytes over the NIC
    across = comm_seconds("AllReduce", payload, 64, ib, hosts=8)
    assert across == pytest.approx(6 * ib.latency + 2 * 63 / 64 * payload / ib.bandwidth)
    assert comm_seconds("Send", payload, 2, ib, hosts=2) == pytest.approx(ib.latency + payload / ib.bandwidth)
    assert comm_seconds("AllGather", payload, 16, ib, hosts=2) == pytest.approx(ib.latency + 15 / 16 * payload / 50e9)


def test_profile_host_fields_are_checked() -> None:
    raw = {"name": "x", **SLOW, "devices_per_host": 0}
    with pytest.raises(PlanError, match=r"devices_per_host must be an integer >= 1 or null, got 0"):
        profile_from_dict(raw)
    with pytest.raises(PlanError, match=r"host_link 'carrier-pigeon' is not one of nvlink4"):
        profile_from_dict({"name": "x", **SLOW, "host_link": "carrier-pigeon"})


def test_balance_gives_a_slower_or_smaller_stage_fewer_layers() -> None:
    layers = [StageUnit(f"layer {i}", 1.0, {f"w{i}": 10}) for i in range(8)]
    slow = [StageUnit(u.name, 3.0, u.weights) for u in layers]
    even = balance_stages(layers, 2)
    assert [len(r) for r in even.stage_layers] == [4, 4]
    faster_first = balance_stages(layers, 2, stage_units=[(None, layers, None), (None, slow, None)])
    assert [len(r) for r in faster_first.stage_layers] == [6, 2]
    assert faster_first.stage_costs == (6.0, 6.0)
    # memory per stage: the second device holds only 2 layers' weights
    small_second = balance_stages(layers, 2, memory_limit_bytes=[100, 20])
    assert [len(r) for r in small_second.stage_layers] == [6, 2]
    over = r"tightest cut \(layers 0-5 \| 6-7\) needs 20 B on stage 1 \(layers 6-7\), 10 B over"
    with pytest.raises(PlanError, match=over):
        balance_stages(layers, 2, memory_limit_bytes=[60, 10])


@pytest.fixture(scope="module")
def llama70b_shape(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A 70B-shaped model without its weights (a sparse data file: plan reads shapes only)."""
    config = synthetic.SyntheticConfig(
        hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256, dtype="float16"
    )
    return load_model(synthetic.generate(config, tmp_path_factory.mktemp("l70"), sparse=True), check_data=False)


def test_plan_keeps_tp_inside_hosts_for_a_70b_shape_on_64_devices(llama70b_shape) -> None:  # type: ignore[no-untyped-def]
    layouts = enumerate_layouts(llama70b_shape, 64, 80 * GiB, H100, max_batch=1, max_seq=2048)
    best, why = recommend(layouts)
    assert best is not None and best.label == "tp8 x pp8", why
    assert "its tp groups stay inside a host" in why and "tp16 x pp4 (2 hosts (infiniband-ndr))" in why
    tp64 = next(layout for layout in layouts if layout.tp == 64)
    assert tp64.ranks[0].tp_hosts == 8 and tp64.prefill_s > best.prefill_s
    # all 64 in one host (the old model, NVLink everywhere): tp 64 is predicted fastest
    one_host = enumerate_layouts(
        llama70b_shape, 64, 80 * GiB, H100, 1, 2048, cluster=parse_devices("64", "h100-sxm", devices_per_host=64)
    )
    assert one_host[0].label == "tp64 x pp1"


def test_plan_on_mixed_hosts_gives_the_slower_stage_fewer_layers(llama70b_shape) -> None:  # type: ignore[no-untyped-def]
    cluster = parse_devices("8xh100-sxm,8xa100-80g")
    layouts = enumerate_layouts(llama70b_shape, 16, 80 * GiB, H100, 1, 2048, cluster=cluster)
    best, why = recommend(layouts)
    assert best is not None and best.label == "tp8 x pp2", why
    first, second = best.ranks
    assert (first.device, second.device) == ("h100-sxm", "a100-80g")
    assert first.layers[1] - first.layers[0] > second.layers[1] - second.layers[0]
    assert "stages: 0: layers 0-" in why and "on a100-80g" in why


def test_mixed_device_plan_has_unequal_stages_and_matches_the_original(tmp_path: Path) -> None:
    """Two stages, a fast and a deliberately slow profile: the slow stage gets fewer layers, the manifest
    says where each rank runs, and the plan reproduces the original through real rank processes."""
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.feeds import random_feeds
    from llmir_onnx.runtime.launch import custom_ops_library_path
    from llmir_onnx.runtime.verify import format_comparisons, verify_plan

    custom_ops_library_path()
    config = synthetic.PRESETS["tiny"]
    model = synthetic.generate(dataclasses.replace(config, layers=6), tmp_path / "tiny6")
    cluster = parse_devices(str(_cluster_file(tmp_path, {
        "profiles": {"cpu-slow": SLOW},
        "devices": [{"profile": "cpu-here", "host": "vm"}, {"profile": "cpu-slow", "host": "vm"}],
    })))  # fmt: skip
    plan = tmp_path / "plan"
    manifest = partition_to_dir(model, plan, tp=1, pp=2, devices=cluster)
    fast, slow = (entry.layers[1] - entry.layers[0] for entry in manifest.ranks)
    assert fast + slow == 6 and fast > slow
    assert [r["profile"] for r in manifest.options["devices"]["ranks"]] == ["cpu-here", "cpu-slow"]
    assert [entry.cost["device"] for entry in manifest.ranks] == ["cpu-here", "cpu-slow"]
    _, rows = verify_plan(plan, random_feeds(load_model(model)), timeout_s=240)
    assert "logits" in {row.name for row in rows}
    assert all(row.ok for row in rows), format_comparisons(rows)
    # a uniform description splits the same model evenly
    even = partition_to_dir(model, tmp_path / "even", tp=1, pp=2, devices=parse_devices("2", "cpu-here"))
    assert [entry.layers[1] - entry.layers[0] for entry in even.ranks] != [fast, slow]


def test_partition_refuses_a_description_of_the_wrong_size(tmp_path: Path) -> None:
    from llmir_onnx.api import partition_to_dir

    model = synthetic.generate(synthetic.PRESETS["tiny"], tmp_path / "tiny")
    with pytest.raises(Exception, match=r"--devices '3' describes 3 devices but --tp 1 x --pp 2 needs 2"):
        partition_to_dir(model, tmp_path / "plan", tp=1, pp=2, devices=parse_devices("3", "cpu-here"))
    assert not (tmp_path / "plan").exists()
