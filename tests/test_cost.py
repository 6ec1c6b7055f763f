"""Cost model, device profiles and the layout search, checked against hand-computed figures."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from llmir_onnx import ops
from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import load_model
from llmir_onnx.plan.cost import (
    CACHE_FRACTION,
    FREE_OPS,
    META_BYTES,
    META_COMM_BYTES,
    META_FLOPS,
    annotate_costs,
    comm_seconds,
    estimate_phases,
    estimate_time,
    node_costs,
)
from llmir_onnx.plan.devices import BUILTIN_PROFILES, DeviceProfile, load_profile, profile_from_dict
from llmir_onnx.plan.layouts import LayoutEstimate, enumerate_layouts, format_layout_table, model_shape, recommend
from llmir_onnx.plan.memory import plan_memory
from llmir_onnx.plan.shapes import Sizes
from tests.test_memory import hand_weight_bytes, linear_params
from tests.test_synthetic import synthetic

GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    config = synthetic.PRESETS["tiny"]
    return config, synthetic.generate(config, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, ir.Model]:
    config = synthetic.PRESETS["llama-7b"]
    path = synthetic.generate(config, tmp_path_factory.mktemp("l7b"), sparse=True)
    return config, load_model(path)


def test_matmul_flops_and_weight_bytes_by_hand(tiny: tuple[object, Path]) -> None:
    config, path = tiny
    batch, seq = 2, 6
    costs = node_costs(load_model(path), Sizes(batch=batch, seq=seq))
    by_name = {c.name: c for c in costs}
    tokens = batch * seq
    q = by_name["/model/layers.0/self_attn/q_proj/MatMul"]
    h = config.hidden
    assert q.flops == 2 * tokens * h * h
    # reads x [tokens, h] and W [h, h], writes [tokens, h], float32
    assert q.bytes == 4 * (tokens * h + h * h + tokens * h)
    assert q.activation_bytes == (4 * tokens * h, 4 * tokens * h)  # x and the output; W is a weight
    projections = sum(c.flops for c in costs if "_proj/MatMul" in c.name)
    assert projections == 2 * tokens * config.layers * linear_params(config)
    lm_head = by_name["/lm_head/MatMul"]
    assert lm_head.flops == 2 * tokens * h * config.vocab
    scores = by_name["/model/layers.0/self_attn/MatMul"]  # q @ k^T: [b, heads, s, hd] x [b, heads, hd, s]
    assert scores.flops == 2 * batch * config.heads * seq * seq * config.head_dim
    reshape = next(c for c in costs if c.op_type == "Reshape")
    assert reshape.bytes == 0 and reshape.flops == 0
    embedding = by_name["/model/embed_tokens/Gather"]  # reads only the gathered rows
    assert embedding.bytes == 2 * tokens * h * 4 + tokens * 8
    # only its output is an activation: the rows come from a weight, the ids are a graph input
    assert embedding.activation_bytes == (tokens * h * 4,)


def test_annotate_writes_metadata_props(tiny: tuple[object, Path]) -> None:
    _, path = tiny
    model = load_model(path)
    costs = annotate_costs(model, Sizes(batch=1, seq=4))
    for node, cost in zip(model.graph, costs, strict=True):
        assert node.metadata_props[META_FLOPS] == str(cost.flops)
        assert node.metadata_props[META_BYTES] == str(cost.bytes)
        assert node.metadata_props[META_COMM_BYTES] == "0"
    fresh = load_model(path)  # the analysis itself never touches a model
    node_costs(fresh, Sizes(batch=1, seq=4))
    assert all(META_FLOPS not in node.metadata_props for node in fresh.graph)


def _collective_model(op_builder, group: list[int]) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch_size", 1024]))
    node = op_builder(x, group)
    node.name = "/comm"
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 17, ops.LLMIR_DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def test_collective_comm_bytes_and_alpha_beta_time() -> None:
    device = profile_from_dict(
        {"name": "t", "memory_bytes": GiB, "peak_flops": {"float32": 1e12}, "memory_bandwidth": 1e11,
         "link_bandwidth": 1e9, "link_latency": 1e-5, "node_overhead": 0.0}
    )  # fmt: skip
    model = _collective_model(lambda x, g: ops.all_reduce_node(x, group=g), [0, 1, 2, 3])
    (cost,) = node_costs(model, Sizes(batch=8, seq=1))
    payload = 8 * 1024 * 4
    assert cost.comm_bytes == payload and cost.group_size == 4
    # ring allreduce: alpha + 2 (n - 1) / n x bytes / bandwidth
    assert comm_seconds("AllReduce", payload, 4, device) == pytest.approx(1e-5 + 1.5 * payload / 1e9)
    assert comm_seconds("AllGather", payload, 4, device) == pytest.approx(1e-5 + 0.75 * payload / 1e9)
    assert comm_seconds("AllReduce", payload, 1, device) == 0.0
    gather = _collective_model(lambda x, g: ops.all_gather_node(x, axis=1, group=g), [0, 1])
    (cost,) = node_costs(gather, Sizes(batch=8, seq=1))
    assert cost.comm_bytes == 2 * payload  # the gathered output
    estimate = estimate_phases(model, device, max_batch=8, max_seq=16)
    assert estimate.decode.comm_s == pytest.approx(1e-5 + 1.5 * payload / 1e9)
    memory = plan_memory(model, 8, 16)
    assert memory.communication_bytes == 2 * payload  # input + output of the one collective


def test_gather_of_unequal_parts_counts_the_full_output_and_the_smallest_part() -> None:
    """AllGather with sizes 1024,512,512 (this rank holds 1024 of 2048): the payload and the output are
    sum(sizes); the time is that of the member with the smallest part, which receives 3/4 of the output
    (an even gather over 3 would be 2/3)."""
    device = profile_from_dict(
        {"name": "t", "memory_bytes": GiB, "peak_flops": {"float32": 1e12}, "memory_bandwidth": 1e11,
         "link_bandwidth": 1e9, "link_latency": 1e-5, "node_overhead": 0.0}
    )  # fmt: skip
    model = _collective_model(lambda x, g: ops.all_gather_node(x, axis=1, group=g, sizes=[1024, 512, 512]), [0, 1, 2])
    (cost,) = node_costs(model, Sizes(batch=8, seq=1))
    full = 8 * 2048 * 4
    assert cost.comm_bytes == full and cost.gather_sizes == (1024, 512, 512)
    assert comm_seconds("AllGather", full, 3, device, gather_sizes=cost.gather_sizes) == pytest.approx(
        1e-5 + 0.75 * full / 1e9
    )
    estimate = estimate_phases(model, device, max_batch=8, max_seq=16)
    assert estimate.decode.comm_s == pytest.approx(1e-5 + 0.75 * full / 1e9)
    assert plan_memory(model, 8, 16).communication_bytes == full + 8 * 1024 * 4  # this rank's part + the output


def test_device_profiles_builtin_and_json(tmp_path: Path) -> None:
    assert set(BUILTIN_PROFILES) == {"h100-sxm", "a100-80g", "cpu-here"}
    h100 = load_profile("h100-sxm")
    assert h100.flops_per_second("float16") == pytest.approx(989.4e12 * 0.7)
    assert h100.flops_per_second("int4") == pytest.approx(66.9e12 * 0.7)  # falls back to float32
    path = tmp_path / "dev.json"
    path.write_text(h100.to_json().replace('"h100-sxm"', '"mine"'))
    mine = load_profile(path)
    assert isinstance(mine, DeviceProfile) and mine.name == "mine" and mine.peak_flops == h100.peak_flops
    raw = json.loads(path.read_text())
    del raw["link_bandwidth"]
    raw["typo_field"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(PlanError, match=r"missing link_bandwidth; unknown typo_field"):
        load_profile(path)
    with pytest.raises(PlanError, match="neither a built-in profile"):
        load_profile("v100")


def test_phases_are_estimated_separately(tiny: tuple[object, Path]) -> None:
    _, path = tiny
    estimate = estimate_phases(load_model(path), load_profile("cpu-here"), max_batch=2, max_seq=64)
    assert (estimate.prefill.seq, estimate.prefill.past) == (64, 0)
    assert (estimate.decode.seq, estimate.decode.past) == (1, 63)
    assert estimate.prefill.flops > 30 * estimate.decode.flops
    assert estimate.decode_tokens_per_s == pytest.approx(2 / estimate.decode.total_s)


def hand_7b_rank_weights(config, tp: int) -> int:
    """Layers split tp ways; embedding, lm_head, norms and rotary tables on every rank (float16)."""
    replicated = hand_weight_bytes(config, 2) - config.layers * linear_params(config) * 2
    return config.layers * linear_params(config) * 2 // tp + replicated


def test_7b_layouts_by_hand(llama7b: tuple[object, ir.Model]) -> None:
    config, model = llama7b
    assert model_shape(model).heads == 32 and model_shape(model).kv_heads == 32
    layouts = enumerate_layouts(model, 8, 80 * GiB, load_profile("h100-sxm"), max_batch=8, max_seq=4096)
    assert {(lay.tp, lay.pp) for lay in layouts} == {(8, 1), (4, 2), (2, 4), (1, 8)}
    by = {(lay.tp, lay.pp): lay for lay in layouts}
    tp8 = by[(8, 1)].ranks[0]
    # 6.48 G layer parameters x 2 bytes / 8 + 2 x 32000 x 4096 x 2 (embedding, lm_head) + norms + rotary
    assert tp8.weight_bytes == hand_7b_rank_weights(config, 8) == 2_144_870_400
    # KV: 2 x 32 layers x batch 8 x 32/8 heads x 4096 x 128 x 2 bytes = 2 GiB per rank
    assert tp8.kv_cache_bytes == 2 * 32 * 8 * 4 * 4096 * 128 * 2 == 2 * GiB
    # one AllReduce of [8, 4096, 4096] float16 = 256 MiB in flight, input + output
    assert tp8.communication_bytes == 2 * 8 * 4096 * 4096 * 2
    tp4pp2 = by[(4, 2)]
    assert [r.layers for r in tp4pp2.ranks] == [(0, 16), (16, 32)]  # symmetric: equal halves
    layer_bytes = linear_params(config) * 2 // 4 + 2 * 4096 * 2
    rotary = 2 * 2048 * 128 * 2
    assert tp4pp2.ranks[0].weight_bytes == 16 * layer_bytes + 32000 * 4096 * 2 + rotary
    assert tp4pp2.ranks[1].weight_bytes == 16 * layer_bytes + 32000 * 4096 * 2 + 4096 * 2 + rotary
    assert tp4pp2.ranks[1].kv_cache_bytes == 2 * 16 * 8 * 8 * 4096 * 128 * 2
    assert all(lay.fits for lay in layouts)
    assert layouts[0].tp == 8  # decode is memory bound: splitting the weights 8 ways is fastest
    best, why = recommend(layouts)
    assert best is layouts[0] and "tp8 x pp1" in why
    table = format_layout_table(layouts)
    assert table.splitlines()[0].split()[:3] == ["#", "layout", "devices"] and "tp1 x pp8" in table
    # a too small device: every layout fails, and the reason says by how much
    small = enumerate_layouts(model, 8, 4 * GiB, load_profile("h100-sxm"), max_batch=8, max_seq=4096)
    assert not any(lay.fits for lay in small)
    best, why = recommend(small)
    assert best is None and "no layout fits 4.00 GiB" in why


def test_1x1_layout_equals_the_memory_plan_of_the_model(tiny: tuple[object, Path]) -> None:
    _, path = tiny
    model = load_model(path)
    (layout,) = enumerate_layouts(model, 1, GiB, load_profile("cpu-here"), max_batch=2, max_seq=32)
    plan = plan_memory(model, 2, 32)
    rank = layout.ranks[0]
    assert (rank.weight_bytes, rank.kv_cache_bytes, rank.activation_peak_bytes) == (
        plan.weight_bytes, plan.kv_cache_bytes, plan.activation_peak_bytes,
    )  # fmt: skip
    estimate = estimate_phases(model, load_profile("cpu-here"), 2, 32)
    assert layout.prefill_s == pytest.approx(estimate.prefill.total_s)
    assert layout.decode_step_s == pytest.approx(estimate.decode.total_s)


def test_layout_rules_on_gqa(tiny: tuple[object, Path]) -> None:
    _, path = tiny  # 8 heads, 4 KV heads, 2 layers
    model = load_model(path)
    layouts = enumerate_layouts(model, 8, GiB, load_profile("cpu-here"), 2, 32, include_fewer=True)
    by = {(lay.tp, lay.pp): lay for lay in layouts}
    # tp 3 splits the heads 4,2,2 in whole KV groups, as the partitioner does (tests/test_uneven_tp.py)
    assert by[(3, 1)].valid and by[(3, 1)].tp_shares == (4, 2, 2), by[(3, 1)].reason
    assert "exceeds the 2 decoder layers" in by[(1, 4)].reason
    # tp 8 > 4 KV heads: each rank keeps one KV head (replicated twice): KV = 2 x 2 x 2 x 1 x 32 x 16 x 4
    assert by[(8, 1)].valid and by[(8, 1)].ranks[0].kv_cache_bytes == 2 * 2 * 2 * 1 * 32 * 16 * 4
    strict = enumerate_layouts(model, 8, GiB, load_profile("cpu-here"), 2, 32, allow_kv_replication=False)
    assert not next(lay for lay in strict if lay.tp == 8).valid


def test_layout_estimate_matches_partitioned_rank_models(tiny: tuple[object, Path]) -> None:
    """The analytic per-rank figures against the memory plan of the real rank models (partitioner)."""
    from llmir_onnx.partition import PartitionOptions, partition

    _, path = tiny
    device = load_profile("cpu-here")
    for tp in (2, 4):
        ranks = partition(load_model(path), PartitionOptions(tp=tp)).ranks
        layouts = enumerate_layouts(load_model(path), tp, GiB, device, max_batch=2, max_seq=64)
        layout = next(lay for lay in layouts if (lay.tp, lay.pp) == (tp, 1))
        predicted = layout.ranks[0]
        for rank in ranks:
            actual = plan_memory(rank.model, 2, 64)
            assert actual.kv_cache_bytes == predicted.kv_cache_bytes
            assert actual.communication_bytes == predicted.communication_bytes
            # the partitioner adds a few shape constants as initializers
            assert abs(actual.weight_bytes - predicted.weight_bytes) <= 0.01 * actual.weight_bytes
            assert (
                abs(actual.activation_peak_bytes - predicted.activation_peak_bytes)
                <= 0.1 * actual.activation_peak_bytes
            )
            timing = estimate_phases(rank.model, device, 2, 64)
            assert layout.prefill_s == pytest.approx(timing.prefill.total_s, rel=0.15)
            assert layout.decode_step_s == pytest.approx(timing.decode.total_s, rel=0.15)


def test_7b_vocab_parallel_splits_embedding_and_lm_head(llama7b: tuple[object, ir.Model]) -> None:
    config, model = llama7b
    device = load_profile("h100-sxm")
    plain = enumerate_layouts(model, 8, 80 * GiB, device, max_batch=8, max_seq=4096)
    split = enumerate_layouts(model, 8, 80 * GiB, device, max_batch=8, max_seq=4096, vocab_parallel=True)
    tp8 = next(lay for lay in split if lay.tp == 8).ranks[0]
    table = 32000 * 4096 * 2
    # embedding and lm_head 1/8 each; norms (65 x 4096) and rotary tables (2 x 2048 x 128) stay whole
    assert tp8.weight_bytes == config.layers * linear_params(config) * 2 // 8 + 2 * table // 8 + 65 * 4096 * 2 + (
        2 * 2048 * 128 * 2
    )
    # the largest collective is now the AllGather of the logits: [8, 4096, 32000] float16 plus this rank's slice
    logits = 8 * 4096 * 32000 * 2
    assert tp8.communication_bytes == logits + logits // 8
    plain_tp8 = next(lay for lay in plain if lay.tp == 8)
    assert next(lay for lay in split if lay.tp == 8).decode_step_s < plain_tp8.decode_step_s


def test_results_are_strict_json_for_the_manifest(tiny: tuple[object, Path]) -> None:
    from dataclasses import asdict

    _, path = tiny
    model = load_model(path)
    device = load_profile("cpu-here")
    layouts = enumerate_layouts(model, 6, GiB, device, 2, 16, include_fewer=True)
    assert any(not lay.valid for lay in layouts)
    for item in (*layouts, plan_memory(model, 2, 16), estimate_phases(model, device, 2, 16), device):
        json.dumps(asdict(item), allow_nan=False)


def test_node_time_function_sums_both_phases(tiny: tuple[object, Path]) -> None:
    from llmir_onnx.plan.cost import node_time_function

    _, path = tiny
    model = load_model(path)
    device = load_profile("cpu-here")
    time_of = node_time_function(model, device, max_batch=2, max_seq=32)
    estimate = estimate_phases(model, device, 2, 32)
    total = sum(time_of(node) for node in model.graph)
    assert total == pytest.approx(estimate.prefill.total_s + estimate.decode.total_s)
    lm_head = next(node for node in model.graph if node.name == "/lm_head/MatMul")
    norm = next(node for node in model.graph if node.op_type == "Sqrt")
    assert time_of(lm_head) > 10 * time_of(norm)


def test_cp_layout_estimate_matches_partitioned_cp_rank_models(tiny: tuple[object, Path]) -> None:
    """`plan --max-cp`: the analytic cp layouts against the memory plan and cost of the real cp rank models
    (partition --cp): the KV cache (replicated over cp) and the collective buffers exactly, activations and
    times close (the estimate counts the logits' chunk alive beside its gathered and sliced copies)."""
    from llmir_onnx.partition import PartitionOptions, partition

    _, path = tiny
    device = load_profile("cpu-here")
    for tp, cp in ((1, 2), (1, 4), (2, 2)):
        ranks = partition(load_model(path), PartitionOptions(tp=tp, cp=cp, max_seq=64)).ranks
        layouts = enumerate_layouts(load_model(path), tp * cp, GiB, device, max_batch=2, max_seq=64, max_cp=cp)
        layout = next(lay for lay in layouts if (lay.tp, lay.cp, lay.pp, lay.cp_kv_cache) == (tp, cp, 1, "replicated"))
        assert layout.label == f"tp{tp} x cp{cp} x pp1" and layout.devices == tp * cp
        _assert_estimate_matches_rank_model(layout, ranks[0].model, device)


def _assert_estimate_matches_rank_model(layout: LayoutEstimate, rank_model: ir.Model, device: DeviceProfile) -> None:
    """The layout search's estimate of rank 0 against the real rank model at batch 2 x 64 tokens: the KV cache
    and collective buffers exactly, the activation peak within 10%, prefill and decode within 15%."""
    predicted = layout.ranks[0]
    actual = plan_memory(rank_model, 2, 64)
    assert actual.kv_cache_bytes == predicted.kv_cache_bytes
    assert actual.communication_bytes == predicted.communication_bytes
    assert abs(actual.activation_peak_bytes - predicted.activation_peak_bytes) <= 0.1 * actual.activation_peak_bytes
    timing = estimate_phases(rank_model, device, 2, 64)
    assert layout.prefill_s == pytest.approx(timing.prefill.total_s, rel=0.15)
    assert layout.decode_step_s == pytest.approx(timing.decode.total_s, rel=0.15)


def test_cp_layouts_by_hand_and_without_max_cp_none(tiny: tuple[object, Path]) -> None:
    """cp scales the prefill's per-token work, keeps the KV cache whole and gains nothing at decode; without
    max_cp no cp layout is listed."""
    config, path = tiny
    model = load_model(path)
    device = load_profile("h100-sxm")
    assert {lay.cp for lay in enumerate_layouts(model, 4, GiB, device, 1, 128)} == {1}
    layouts = enumerate_layouts(model, 4, GiB, device, 1, 128, include_fewer=True, max_cp=4)
    by = {(lay.tp, lay.cp, lay.pp): lay for lay in layouts if lay.cp_kv_cache == "replicated"}
    whole, cp2, cp4 = by[(1, 1, 1)], by[(1, 2, 1)], by[(1, 4, 1)]
    kv = 2 * config.layers * config.kv_heads * 128 * (config.hidden // config.heads) * 4  # [1, kv, 128, hd] float32
    assert whole.ranks[0].kv_cache_bytes == cp2.ranks[0].kv_cache_bytes == cp4.ranks[0].kv_cache_bytes == kv
    assert whole.ranks[0].weight_bytes == cp4.ranks[0].weight_bytes
    # the largest cp buffer: the logits' gather, [1, 128, vocab] float32 out, a quarter of it in
    logits = 128 * config.vocab * 4
    assert cp4.ranks[0].communication_bytes == logits + logits // 4
    peaks = [layout.ranks[0].activation_peak_bytes for layout in (cp4, cp2, whole)]
    assert peaks == sorted(set(peaks))
    assert cp4.decode_step_s is not None and whole.decode_step_s is not None
    assert cp4.decode_step_s >= whole.decode_step_s  # the cache is replicated: every cp rank redoes the step


def test_sharded_cache_layout_estimate_matches_the_partition_manifest(
    tiny: tuple[object, Path], tmp_path: Path
) -> None:
    """`plan --max-cp` lists each cp layout with the KV cache sharded over cp too (partition --cp-kv-cache
    sharded): against the manifest that partition writes with the same options, the KV cache (a block of
    B = ceil(64 / cp) tokens per rank) and the largest collective buffer exactly, the activation peak within
    10% and the weights within 1% (the rank models add the cp constants), the predicted prefill and decode
    within 15% (the rank models' cost counts the length arithmetic the estimate leaves out)."""
    from llmir_onnx.api import partition_to_dir

    config, path = tiny
    device = load_profile("cpu-here")
    per_token = 2 * config.layers * config.kv_heads * (config.hidden // config.heads) * 4 * 2  # (K, V), batch 2
    for tp, cp in ((1, 4), (2, 2)):
        manifest = partition_to_dir(path, tmp_path / f"tp{tp}cp{cp}", tp=tp, cp=cp, cp_kv_cache="sharded",
                                    max_seq=64, max_batch=2, device="cpu-here")  # fmt: skip
        layouts = enumerate_layouts(load_model(path), tp * cp, GiB, device, max_batch=2, max_seq=64, max_cp=cp)
        layout = next(lay for lay in layouts if (lay.tp, lay.cp, lay.pp, lay.cp_kv_cache) == (tp, cp, 1, "sharded"))
        assert layout.label == f"tp{tp} x cp{cp}[kv sharded] x pp1" and layout.valid and layout.devices == tp * cp
        predicted, kv_heads_share = layout.ranks[0], min(1.0, max(1, config.kv_heads // tp) / config.kv_heads)
        assert predicted.kv_cache_bytes == per_token * (64 // cp) * kv_heads_share
        for rank in manifest.ranks:
            memory, cost = rank.memory, rank.cost
            assert memory is not None and cost is not None
            assert memory["kv_cache_bytes"] == predicted.kv_cache_bytes
            assert memory["communication_bytes"] == predicted.communication_bytes
            assert predicted.activation_peak_bytes == pytest.approx(memory["activation_peak_bytes"], rel=0.1)
            assert predicted.weight_bytes == pytest.approx(memory["weight_bytes"], rel=0.01)
            assert predicted.total_bytes == pytest.approx(memory["total_bytes"], rel=0.1)
            assert layout.prefill_s == pytest.approx(cost["prefill"]["total_s"], rel=0.15)
            assert layout.decode_step_s == pytest.approx(cost["decode"]["total_s"], rel=0.15)


def test_sharded_cache_layouts_by_hand(tiny: tuple[object, Path]) -> None:
    """A sharded cache's decode step pays, per layer, the query's AllGather and three AllReduces (the
    softmax's max and denominator, P @ V's partial sum) besides the keys' and values' gathers: on links of
    1 s latency (and no bandwidth cost) the step is the count of collectives, 2 x layers + 1 (the logits)
    with the cache replicated, 6 x layers + 1 sharded. On long sequences the sharded cache, read a block per
    rank, is what the search recommends, and the reason says so and what the replicated one would give."""
    import dataclasses

    config, path = tiny
    model = load_model(path)
    slow_links = dataclasses.replace(load_profile("h100-sxm"), link_latency=1.0, link_bandwidth=1e30)
    layouts = enumerate_layouts(model, 2, GiB, slow_links, 1, 128, max_cp=2)
    by = {lay.cp_kv_cache: lay for lay in layouts if lay.cp == 2}
    assert by["replicated"].decode_step_s == pytest.approx(2 * config.layers + 1, abs=0.01)
    assert by["sharded"].decode_step_s == pytest.approx(6 * config.layers + 1, abs=0.01)
    assert by["sharded"].ranks[0].kv_cache_bytes * 2 == by["replicated"].ranks[0].kv_cache_bytes
    # 256 sequences of 128 tokens on 16 CPU ranks: decode reads the cache; tp stops at the 8 heads
    layouts = enumerate_layouts(model, 16, GiB, load_profile("cpu-here"), 256, 128, max_cp=2)
    best, why = recommend(layouts)
    assert best is not None and best.label == "tp8 x cp2[kv sharded] x pp1", why
    assert "the KV cache sharded over cp, partition --cp-kv-cache sharded: a block of 64 tokens" in why, why
    assert "with the KV cache replicated instead: tp8 x cp2 x pp1" in why, why
    table = format_layout_table(layouts).splitlines()
    assert "kv over cp" in table[0] and "sharded" in table[2] and "replicated" in table[2 + layouts.index(
        next(lay for lay in layouts if lay.label == "tp8 x cp2 x pp1"))]  # fmt: skip
    assert "kv over cp" not in format_layout_table([lay for lay in layouts if lay.cp == 1])


@pytest.mark.parametrize(("tp", "cp"), [(1, 2), (2, 2)])
def test_cp_layout_estimate_of_a_genai_export_matches_its_cp_rank_models(tp: int, cp: int) -> None:
    """GroupQueryAttention (onnxruntime-genai): partition --cp lowers it into standard ops, and plan estimates
    its cp layouts on the lowered graph alike (`_cp_analysis`): the KV cache and the collective buffers as
    the real cp rank models' exactly, activations and times close, as for a torch export."""
    from llmir_onnx.partition import PartitionOptions, partition

    path = Path(__file__).resolve().parents[1] / "models" / "llama-gqa-genai" / "model.onnx"
    device = load_profile("cpu-here")
    ranks = partition(load_model(path), PartitionOptions(tp=tp, cp=cp, max_seq=64)).ranks
    layouts = enumerate_layouts(load_model(path), tp * cp, GiB, device, max_batch=2, max_seq=64, max_cp=cp)
    layout = next(lay for lay in layouts if (lay.tp, lay.cp, lay.pp) == (tp, cp, 1))
    assert layout.valid, layout.reason
    _assert_estimate_matches_rank_model(layout, ranks[0].model, device)


def test_cp_layouts_of_a_model_the_lowering_refuses_are_invalid_with_its_reason() -> None:
    """A GroupQueryAttention attribute the lowering does not take (softcap): plan's cp layouts are invalid with
    the line partition --cp prints."""
    import onnx_ir as ir

    model = load_model(Path(__file__).resolve().parents[1] / "models" / "llama-gqa-genai" / "model.onnx")
    node = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    node.attributes["softcap"] = ir.AttrFloat32("softcap", 50.0)
    layouts = enumerate_layouts(model, 2, GiB, load_profile("h100-sxm"), 1, 64, max_cp=2)
    cp2s = [lay for lay in layouts if lay.cp == 2]
    assert {lay.cp_kv_cache for lay in cp2s} == {"replicated", "sharded"}
    for cp2 in cp2s:
        assert not cp2.valid and cp2.reason == (
            "--cp cannot lower node /model/layers.0/attn/GroupQueryAttention (GroupQueryAttention) into standard "
            "ops: attribute softcap=50.0 is not supported (only its default 0.0); use --cp 1"
        )


def test_recommend_prefers_cp_when_only_its_prefill_activations_fit(tmp_path: Path) -> None:
    """A long prompt on tight memory: the tiny model's 8 heads cap tp at 8, so on 16 devices the other factor
    is pp (halves the weights, not a layer's attention scores) or cp (halves the scores, [heads, n, n] at
    4096 tokens). Where only cp's ranks fit, the cp layout is recommended and the reason says why."""
    import dataclasses

    config = dataclasses.replace(synthetic.PRESETS["tiny"], max_position=4096)
    model = load_model(synthetic.generate(config, tmp_path / "tiny4k", sparse=True), check_data=False)
    device = load_profile("h100-sxm")
    probe = enumerate_layouts(model, 16, 80 * GiB, device, 1, 4096, max_cp=2)
    with_cp = min((lay for lay in probe if lay.valid and lay.cp == 2), key=lambda lay: lay.max_rank_bytes)
    without = min((lay for lay in probe if lay.valid and lay.cp == 1), key=lambda lay: lay.max_rank_bytes)
    assert (with_cp.tp, without.tp) == (8, 8)
    assert with_cp.max_rank_bytes < without.max_rank_bytes
    memory = (with_cp.max_rank_bytes + without.max_rank_bytes) // 2
    layouts = enumerate_layouts(model, 16, memory, device, 1, 4096, max_cp=2)
    best, why = recommend(layouts)
    assert best is not None and best.label == "tp8 x cp2 x pp1", why
    assert "cp 2 splits the prompt's 4096 tokens over 2 ranks" in why and "no layout without cp fits" in why
    table = format_layout_table(layouts)
    assert table.count(" x cp2 x ") + table.count(" x cp2[kv sharded] x ") == sum(lay.cp == 2 for lay in layouts)
    # with room for all, the ranking (decode first) prefers no cp: one short sequence, a cache too small for
    # sharding it over cp to pay for its collectives
    roomy, why = recommend(probe)
    assert roomy is not None and roomy.cp == 1, why


def _relu_then_scale_model() -> ir.Model:
    """x -> Relu -> a -> Mul(a, w) -> y: `a` an activation (written by one node, read by the next), x a
    graph input, y a graph output and w a small initializer; x, a, y are [batch, 1024] float32."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch_size", 1024]))
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1024]))
    w.const_value = ir.tensor([0.5] * 1024, dtype=ir.DataType.FLOAT, name="w")
    relu = ir.Node("", "Relu", [x], name="/relu", num_outputs=1)
    relu.outputs[0].name = "a"
    scale = ir.Node("", "Mul", [relu.outputs[0], w], name="/scale", num_outputs=1)
    scale.outputs[0].name = "y"
    graph = ir.Graph([x], [scale.outputs[0]], nodes=[relu, scale], initializers=[w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=10)


# memory 1 GB/s, cache 10 GB/s, a 64 KiB cache: an activation of at most CACHE_FRACTION x 64 KiB = 32 KiB is
# cached, i.e. [8, 1024] float32 and below; compute and overhead negligible (1 PFLOP/s, 0 s per node)
_CACHED_DEVICE = {
    "name": "cached", "memory_bytes": GiB, "peak_flops": {"float32": 1e15}, "memory_bandwidth": 1e9,
    "link_bandwidth": 1e9, "link_latency": 0.0, "node_overhead": 0.0, "cache_bytes": 65536, "cache_bandwidth": 1e10,
}  # fmt: skip


def test_an_activation_that_fits_the_cache_is_charged_at_its_bandwidth_and_one_that_does_not_at_memory() -> None:
    assert CACHE_FRACTION == 0.5  # the bound below: 32 KiB of a 64 KiB cache
    device = profile_from_dict(_CACHED_DEVICE)
    model = _relu_then_scale_model()
    for batch, cached in ((8, True), (9, False)):
        sizes = Sizes(batch=batch, seq=1)
        relu, scale = node_costs(model, sizes)
        row = batch * 1024 * 4  # bytes of x, a and y
        assert relu.activation_bytes == (row,) and scale.activation_bytes == (row,)  # a only: not x, w, y
        assert (relu.bytes, scale.bytes) == (2 * row, 2 * row + 4096)
        a_seconds = row / 1e10 if cached else row / 1e9
        # Relu: x (a graph input) from memory, a written; Mul: a read, w (an initializer, small as it is)
        # and y (a graph output) at the memory bandwidth
        expected = (row / 1e9 + a_seconds) + (a_seconds + (4096 + row) / 1e9)
        estimate = estimate_time([relu, scale], device, "decode", sizes)
        assert estimate.memory_s == pytest.approx(expected, rel=1e-12), (batch, cached)
        assert estimate.total_s == pytest.approx(expected, rel=1e-9)  # compute 1e-11 s, under the memory time
    # the memory efficiency applies to the cache too
    slower = profile_from_dict({**_CACHED_DEVICE, "memory_efficiency": 0.5})
    relu, scale = node_costs(model, Sizes(batch=8, seq=1))
    row = 8 * 1024 * 4
    assert estimate_time([relu], slower, "decode", Sizes(batch=8, seq=1)).memory_s == pytest.approx(
        row / 0.5e9 + row / 0.5e10
    )


def test_a_profile_without_the_cache_fields_gives_the_figures_of_before(
    tiny: tuple[object, Path], tmp_path: Path
) -> None:
    """An old profile file (no cache_bytes / cache_bandwidth) has no cache: every byte at the memory bandwidth,
    the node's time max(flops / peak, bytes / bandwidth) + overhead as before the cache existed."""
    numpy_profile = load_profile(str(Path(__file__).resolve().parents[1] / "bench/profiles/cpu-here-numpy.json"))
    assert (numpy_profile.cache_bytes, numpy_profile.cache_bandwidth) == (0, 0.0)
    raw = {key: value for key, value in _CACHED_DEVICE.items() if not key.startswith("cache_")}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    old = load_profile(path)
    assert old.cache_bytes == 0
    relu, scale = node_costs(_relu_then_scale_model(), Sizes(batch=8, seq=1))
    assert estimate_time([relu, scale], old, "decode", Sizes(batch=8, seq=1)).memory_s == pytest.approx(
        (relu.bytes + scale.bytes) / 1e9, rel=1e-12
    )
    # a whole model: the sum of the nodes' roofline by the formula of before, on cpu-here's figures less the cache
    _, model_path = tiny
    model = load_model(model_path)
    here = load_profile("cpu-here")
    assert here.cache_bytes == 32 << 20  # cpu-here has one; without it:
    uncached = profile_from_dict({**asdict(here), "cache_bytes": 0, "cache_bandwidth": 0.0})
    sizes = Sizes(batch=2, seq=32)
    costs = node_costs(model, sizes)
    before = sum(
        max(c.flops / uncached.flops_per_second(c.dtype) if c.flops else 0.0, c.bytes / uncached.bytes_per_second)
        + (0.0 if c.op_type in FREE_OPS else uncached.node_overhead)
        for c in costs
    )  # fmt: skip
    assert not any(c.comm_bytes for c in costs)  # no collectives: the total is the roofline + overheads
    assert estimate_time(costs, uncached, "prefill", sizes).total_s == pytest.approx(before, rel=1e-12)
    # and the cache makes the same prefill faster, never slower
    assert estimate_time(costs, here, "prefill", sizes).total_s < before


def test_cache_fields_come_in_pairs() -> None:
    raw = {key: value for key, value in _CACHED_DEVICE.items() if key != "cache_bandwidth"}
    with pytest.raises(PlanError, match="cache_bytes without cache_bandwidth; give both"):
        profile_from_dict(raw)
    raw = {key: value for key, value in _CACHED_DEVICE.items() if key != "cache_bytes"}
    with pytest.raises(PlanError, match="cache_bandwidth without cache_bytes; give both"):
        profile_from_dict(raw)
    with pytest.raises(PlanError, match="cache_bytes must be an integer >= 0"):
        profile_from_dict({**_CACHED_DEVICE, "cache_bytes": 1.5})


def test_a_gather_from_an_activation_reads_its_rows_from_the_cache() -> None:
    """x -> Relu -> a -> Gather(a, ids) -> y: the rows a Gather reads (as many bytes as it writes) are an
    activation's when its data is one; the ids (an initializer) and y (a graph output) are not."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([16, 256]))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([4]))
    ids.const_value = ir.tensor([0, 3, 5, 7], dtype=ir.DataType.INT64, name="ids")
    relu = ir.Node("", "Relu", [x], name="/relu", num_outputs=1)
    relu.outputs[0].name = "a"
    gather = ir.Node("", "Gather", [relu.outputs[0], ids], name="/gather", num_outputs=1)
    gather.outputs[0].name = "y"
    graph = ir.Graph([x], [gather.outputs[0]], nodes=[relu, gather], initializers=[ids], opset_imports={"": 17})
    _, cost = node_costs(ir.Model(graph, ir_version=10), Sizes(batch=1, seq=1))
    rows = 4 * 256 * 4
    assert cost.bytes == 2 * rows + 4 * 8 and cost.activation_bytes == (rows,)
    device = profile_from_dict(_CACHED_DEVICE)
    assert estimate_time([cost], device, "decode", Sizes(batch=1, seq=1)).memory_s == pytest.approx(
        rows / 1e10 + (rows + 32) / 1e9
    )


# memory 1 GB/s; a matrix product's weight read at 0.25 GB/s at 4 KiB, 1 GB/s at 1 MiB and up (interpolated in
# log(size) between); no cache; compute and overhead negligible
_WEIGHT_CURVE_DEVICE = {
    "name": "curve", "memory_bytes": GiB, "peak_flops": {"float32": 1e15}, "memory_bandwidth": 1e9,
    "link_bandwidth": 1e9, "link_latency": 0.0, "node_overhead": 0.0,
    "weight_bandwidth": [[4096, 0.25e9], [1 << 20, 1e9]],
}  # fmt: skip


def _matmul_model(k: int, n: int) -> ir.Model:
    """x [batch, k] @ W[k, n] (an initializer) -> y, and y * x2 [batch, n] (two inputs, no weight)."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", k]), type=ir.TensorType(ir.DataType.FLOAT))
    x2 = ir.Value(name="x2", shape=ir.Shape(["batch", n]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((k, n), np.float32), name="w"))
    matmul = ir.node("MatMul", [x, w], name="matmul")
    scale = ir.node("Mul", [matmul.outputs[0], x2], name="scale")
    scale.outputs[0].name = "y"
    graph = ir.Graph([x, x2], [scale.outputs[0]], nodes=[matmul, scale], initializers=[w], opset_imports={"": 17})
    return ir.Model(graph, ir_version=10)


def test_a_matmul_weight_is_charged_at_the_rate_for_its_size_and_nothing_else_is() -> None:
    """weight_bandwidth (calibrate_cpu.py's weight sizes): a MatMul's weight at the profile's rate for its
    size, interpolated in log(size); its activations and other nodes' bytes at the memory bandwidth. A
    cost model that ignored the field would charge the weight at 1 GB/s: every assertion below fails."""
    device = profile_from_dict(_WEIGHT_CURVE_DEVICE)
    assert device.weight_bytes_per_second(1024) == 0.25e9  # below the first size: the first rate
    assert device.weight_bytes_per_second(64 << 20) == 1e9  # above the last: the last rate
    assert device.weight_bytes_per_second(64 << 10) == pytest.approx(0.625e9)  # halfway in log between 4K and 1M
    sizes = Sizes(batch=1, seq=1)
    for k, n, rate in ((32, 32, 0.25e9), (128, 128, 0.625e9), (512, 512, 1e9)):
        matmul, scale = node_costs(_matmul_model(k, n), sizes)
        weight = 4 * k * n
        assert matmul.weight_bytes == (weight,) and scale.weight_bytes == ()
        assert matmul.bytes == weight + 4 * k + 4 * n
        expected = weight / rate + (4 * k + 4 * n) / 1e9
        assert estimate_time([matmul], device, "decode", sizes).memory_s == pytest.approx(expected, rel=1e-12)
        assert estimate_time([scale], device, "decode", sizes).memory_s == pytest.approx(scale.bytes / 1e9)
        # the same profile without the field: every byte at the memory bandwidth, as before it existed
        plain = profile_from_dict({k_: v for k_, v in _WEIGHT_CURVE_DEVICE.items() if k_ != "weight_bandwidth"})
        assert plain.weight_bandwidth == () and plain.weight_bytes_per_second(weight) == plain.bytes_per_second
        assert estimate_time([matmul], plain, "decode", sizes).memory_s == pytest.approx(matmul.bytes / 1e9)
    # the memory efficiency applies to the curve as to the memory bandwidth
    half = profile_from_dict({**_WEIGHT_CURVE_DEVICE, "memory_efficiency": 0.5})
    assert half.weight_bytes_per_second(4096) == pytest.approx(0.125e9)


def test_the_layout_search_charges_weights_by_the_profiles_curve_like_the_rank_models(
    tiny: tuple[object, Path],
) -> None:
    """The layout search (scaled nodes) and estimate_phases on the partitioned rank models agree on a profile
    with weight_bandwidth, and both differ from the same profile without it (the tiny model's weights are 64-512
    KiB: charged at about 1/30 of cpu-here's memory bandwidth here, its decode becomes weight-bound)."""
    from llmir_onnx.partition import PartitionOptions, partition

    _, path = tiny
    here = load_profile("cpu-here")
    slow_weights = profile_from_dict(
        {**asdict(here), "name": "cpu-here-curve",
         "weight_bandwidth": [[1 << 16, here.memory_bandwidth / 30], [1 << 30, here.memory_bandwidth]]}
    )  # fmt: skip
    decode = {}
    for device in (here, slow_weights):
        layouts = enumerate_layouts(load_model(path), 2, GiB, device, max_batch=1, max_seq=64)
        layout = next(lay for lay in layouts if (lay.tp, lay.pp) == (2, 1))
        rank = partition(load_model(path), PartitionOptions(tp=2)).ranks[0]
        timing = estimate_phases(rank.model, device, 1, 64)
        assert layout.decode_step_s == pytest.approx(timing.decode.total_s, rel=0.15)
        decode[device.name] = (layout.decode_step_s, timing.decode.total_s)
    assert decode[here.name][0] * 2 < decode[slow_weights.name][0]
    assert decode[here.name][1] * 2 < decode[slow_weights.name][1]


def test_weight_bandwidth_is_checked_and_round_trips(tmp_path: Path) -> None:
    # a profile file written before the field: loads, every weight at the memory bandwidth
    numpy_profile = load_profile(str(Path(__file__).resolve().parents[1] / "bench/profiles/cpu-here-numpy.json"))
    assert numpy_profile.weight_bandwidth == ()
    assert numpy_profile.weight_bytes_per_second(1 << 20) == numpy_profile.bytes_per_second
    device = profile_from_dict(_WEIGHT_CURVE_DEVICE)
    path = tmp_path / "curve.json"
    path.write_text(device.to_json())
    assert load_profile(path) == device  # written as [[bytes, bytes/s], ...] and read back
    for bad, message in (
        ({"weight_bandwidth": [[4096, 1e9], [4096, 2e9]]}, "weight_bandwidth sizes must increase, got 4096 after 4096"),
        ({"weight_bandwidth": [[4096.5, 1e9]]}, r"weight_bandwidth entry \[4096.5, 1000000000.0\] is not a"),
        ({"weight_bandwidth": [[4096, 0]]}, "is not a .bytes, bytes/s. pair of positive numbers"),
        ({"weight_bandwidth": 1e9}, "weight_bandwidth must be a list of .bytes, bytes/s. pairs"),
    ):
        with pytest.raises(PlanError, match=message):
            profile_from_dict({**_WEIGHT_CURVE_DEVICE, **bad})


def test_a_run_pays_its_run_overhead_once_whatever_its_node_count() -> None:
    """run_overhead (calibrate_cpu.py: a cold run less a warm one) is charged once per run, as overhead, in
    both phases; a profile without it charges nothing, the figures of before. A model that charged it per
    node (two nodes here) or not at all fails."""
    sizes = Sizes(batch=1, seq=1)
    costs = node_costs(_matmul_model(32, 32), sizes)
    plain = profile_from_dict(_WEIGHT_CURVE_DEVICE)
    cold = profile_from_dict({**_WEIGHT_CURVE_DEVICE, "run_overhead": 2e-3})
    assert plain.run_overhead == 0.0 and len(costs) == 2
    before, after = (estimate_time(costs, device, "decode", sizes) for device in (plain, cold))
    assert after.overhead_s == pytest.approx(before.overhead_s + 2e-3, abs=1e-15)
    assert after.total_s == pytest.approx(before.total_s + 2e-3, abs=1e-15)
    assert after.roofline_s == before.roofline_s and after.comm_s == before.comm_s
    phases_plain = estimate_phases(_matmul_model(32, 32), plain, 1, 8)
    phases_cold = estimate_phases(_matmul_model(32, 32), cold, 1, 8)
    for phase in ("prefill", "decode"):
        gained = getattr(phases_cold, phase).total_s - getattr(phases_plain, phase).total_s
        assert gained == pytest.approx(2e-3, abs=1e-15)


def test_the_layout_search_charges_run_overhead_once_per_rank_like_the_rank_models(tiny: tuple[object, Path]) -> None:
    """The layout search adds a profile's run_overhead to each rank's prefill and decode once, as
    estimate_phases does on the partitioned rank model."""
    from llmir_onnx.partition import PartitionOptions, partition

    _, path = tiny
    here = load_profile("cpu-here")
    cold = profile_from_dict({**asdict(here), "name": "cpu-here-cold", "run_overhead": 5e-4})
    layout_decode, rank_decode = {}, {}
    rank = partition(load_model(path), PartitionOptions(tp=2)).ranks[0]
    for device in (here, cold):
        layouts = enumerate_layouts(load_model(path), 2, GiB, device, max_batch=1, max_seq=64)
        layout = next(lay for lay in layouts if (lay.tp, lay.pp) == (2, 1))
        layout_decode[device.run_overhead] = (layout.decode_step_s, layout.prefill_s)
        timing = estimate_phases(rank.model, device, 1, 64)
        rank_decode[device.run_overhead] = (timing.decode.total_s, timing.prefill.total_s)
    for figures in (layout_decode, rank_decode):
        for phase in (0, 1):
            assert figures[5e-4][phase] - figures[0.0][phase] == pytest.approx(5e-4, rel=1e-9)


def test_run_overhead_is_checked_and_round_trips(tmp_path: Path) -> None:
    device = profile_from_dict({**_WEIGHT_CURVE_DEVICE, "run_overhead": 1.5e-4})
    path = tmp_path / "cold.json"
    path.write_text(device.to_json())
    assert load_profile(path) == device and load_profile(path).run_overhead == 1.5e-4
    # a profile file written before the field: no run overhead
    numpy_profile = load_profile(str(Path(__file__).resolve().parents[1] / "bench/profiles/cpu-here-numpy.json"))
    assert numpy_profile.run_overhead == 0.0
    for bad in (-1e-6, True, "1e-4"):
        with pytest.raises(PlanError, match="run_overhead must be a number of seconds >= 0"):
            profile_from_dict({**_WEIGHT_CURVE_DEVICE, "run_overhead": bad})
