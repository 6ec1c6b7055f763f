"""Uneven tensor parallelism: a tp that does not divide the heads, through real rank processes.

4 heads on 3 ranks split 2,1,1 (mesh.split_shares); every split axis follows in the same proportion (the
MLP's 128 intermediate columns as 64,32,32); each rank's KV cache holds its own heads. Each rank runs as its own
process with its own onnxruntime session and the ai.llmir library; logits and the KV cache must match the
original within verify's float32 tolerances (1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from plan_helpers import checked_rank_models
from synthetic_helpers import make_synthetic

from llmir_onnx.errors import LlmirError
from llmir_onnx.runtime.feeds import export_check_feeds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _partition_and_verify(
    name: str | Path, tp: int, out_dir: Path, tp_weights: tuple[float, ...] | None = None, **options: object
) -> dict:
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.verify import verify_plan

    model_dir = MODELS / name
    partition_to_dir(model_dir / "model.onnx", out_dir, tp=tp, tp_weights=tp_weights, **options)
    _, rows = verify_plan(out_dir, export_check_feeds(model_dir), model_path=model_dir / "model.onnx", timeout_s=180)
    names = {row.name for row in rows}
    assert "logits" in names and any(n.startswith("present") for n in names), names
    bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
    assert not bad, f"{name} at tp {tp}: " + "; ".join(bad)
    return json.loads((out_dir / "manifest.json").read_text())


def _cache_heads(manifest: dict, name: str = "past_key_values.0.key") -> list[tuple[int, int] | str]:
    """Each rank's [start, stop) of the cache's heads axis, "R" where it holds the whole cache."""
    bindings = [next(b for b in rank["inputs"] if b["original"] == name) for rank in manifest["ranks"]]
    return [(b["start"], b["stop"]) if b["dim"] is not None else "R" for b in bindings]


def _input_dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["gpt2-torch-legacy", "gpt2-optimum"])
def test_four_heads_on_three_ranks_match_the_original(name: str, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    manifest = _partition_and_verify(name, 3, out)
    assert manifest["mesh"]["tp_shares"] == [2, 1, 1]
    assert _cache_heads(manifest) == [(0, 2), (2, 3), (3, 4)]
    models = checked_rank_models(out, 3)
    assert [_input_dims(m, "past_key_values.1.value")[1] for m in models] == [2, 1, 1]
    placements = {w["name"]: w for w in manifest["sharding"]["weights"]}
    fc = next(w for n, w in placements.items() if "mlp" in n and "fc" in n and len(w["shape"]) == 2)
    widths = [sum(stop - start for start, stop in ranges) for ranges in fc["ranges"]]
    assert fc["placement"].endswith("[2,1,1]") and widths == [64, 32, 32], fc


def test_single_kv_head_replicated_on_uneven_query_heads(tmp_path: Path) -> None:
    """Qwen3 with 4 query heads and 1 kv head: 2,1,1 query heads, the kv head on every rank."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify("qwen3-kv1-torch-legacy", 3, out)
    assert _cache_heads(manifest) == ["R", "R", "R"]
    models = checked_rank_models(out, 3)
    assert [_input_dims(m, "past_key_values.0.key")[1] for m in models] == [1, 1, 1]


@pytest.mark.parametrize(("name", "tp"), [("falcon-mqa-torch-legacy", 3), ("llama-gqa-genai", 5)])
def test_uneven_query_heads_on_fewer_kv_heads(name: str, tp: int, tmp_path: Path) -> None:
    """Falcon's fused multi-query qkv at 3,3,2; GroupQueryAttention (4 kv heads) at 2,2,2,1,1 with each
    rank's own num_heads and kv_num_heads."""
    out = tmp_path / "plan"
    _partition_and_verify(name, tp, out)
    models = checked_rank_models(out, tp)
    if name == "llama-gqa-genai":
        gqa = [next(n for n in m.graph.node if n.op_type == "GroupQueryAttention") for m in models]
        heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in gqa]
        assert heads == [2, 2, 2, 1, 1]


def test_per_rank_weights_give_the_faster_rank_more_heads(tmp_path: Path) -> None:
    """Weights 3:1 on tp 2 (a device three times as fast): heads 3 and 1, not the even 2 and 2."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify("gpt2-torch-legacy", 2, out, tp_weights=(3.0, 1.0))
    assert manifest["mesh"]["tp_shares"] == [3, 1]
    assert _cache_heads(manifest) == [(0, 3), (3, 4)]
    checked_rank_models(out, 2)


@pytest.mark.parametrize(
    ("name", "tp", "pp", "message"),
    [
        # Every rank needs one head at least: only 1 to 4 work for 4 heads.
        (
            "gpt2-torch-legacy",
            8,
            1,
            r"^--tp 8 does not divide num_heads=4 in node \S+ \(Reshape\); use --tp 1, 2, 3 or 4$",
        ),
    ],
)
def test_uneven_splits_not_supported_are_refused(name: str, tp: int, pp: int, message: str, tmp_path: Path) -> None:
    from llmir_onnx.api import partition_to_dir

    with pytest.raises(LlmirError, match=message):
        partition_to_dir(MODELS / name / "model.onnx", tmp_path / "plan", tp=tp, pp=pp)
    assert not (tmp_path / "plan").exists(), "a refused layout must leave nothing behind"


def _gathers(model: onnx.ModelProto) -> list[dict[str, object]]:
    """The ai.llmir AllGather nodes of a rank model, as {attribute: value}."""
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for node in model.graph.node
        if node.domain == "ai.llmir" and node.op_type == "AllGather"
    ]


@pytest.mark.parametrize("pp", [1, 2])
def test_dynamo_gpt2_gathers_unequal_heads(pp: int, tmp_path: Path) -> None:
    """The dynamo export gathers the heads (axis 2 of [batch, seq, heads, head_dim]) before its output
    projection: 4 heads on 3 ranks are an AllGather of unequal parts, sizes 2,1,1, on every rank (with
    pp 2 over each stage's own tp group)."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify("gpt2-torch-dynamo", 3, out, pp=pp)
    assert manifest["mesh"]["tp_shares"] == [2, 1, 1]
    models = checked_rank_models(out, 3 * pp)
    for rank in manifest["ranks"]:
        group = [r["rank"] for r in manifest["ranks"] if r["coords"]["pp"] == rank["coords"]["pp"]]
        gathers = _gathers(models[rank["rank"]])
        assert gathers and all(g["sizes"] == [2, 1, 1] and g["group"] == group for g in gathers), gathers


def test_dynamo_stablelm_gathers_unequal_heads_and_shared_kv_heads(tmp_path: Path) -> None:
    """StableLM (8 heads on 2 kv heads) at tp 3: heads 4,3,1, so ranks 1 and 2 both hold kv head 1. The
    dynamo export gathers the query heads (sizes 4,3,1) and the kv heads (one each: equal parts, no sizes),
    then keeps one copy of each kv head (a Gather of indices 0, 1)."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify("stablelm-qkln-torch-dynamo", 3, out)
    assert manifest["mesh"]["tp_shares"] == [4, 3, 1]
    for model in checked_rank_models(out, 3):
        gathers = _gathers(model)
        assert [g.get("sizes") for g in gathers] == [[4, 3, 1], None] * 2, gathers
        distinct = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0].endswith("__allgather")]
        assert len(distinct) == 2, [n.name for n in distinct]
        wanted = {n.input[1] for n in distinct}
        indices = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in model.graph.initializer if i.name in wanted}
        assert [indices[n.input[1]] for n in distinct] == [[0, 1], [0, 1]]


@pytest.mark.parametrize(
    ("name", "pp", "local_vocab"),
    [("gpt2-torch-legacy", 1, [256, 128, 128]), ("gpt2-torch-legacy", 2, [256, 128, 128])],
)
def test_vocab_parallel_logits_gathered_in_unequal_parts(
    name: str, pp: int, local_vocab: list[int], tmp_path: Path
) -> None:
    """--vocab-parallel at tp 3, which does not divide the 512-token vocabulary: the lm_head's columns follow
    the heads' shares (2,1,1 of 4 units: 256,128,128 tokens) and the logits are gathered with those sizes,
    through real rank processes against the original (with pp 2: six processes, the last stage gathers).
    The memory plan holds each rank's slice and the full logits; the cost counts the full logits."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify(name, 3, out, vocab_parallel=True, pp=pp)
    models = checked_rank_models(out, 3 * pp)
    last_stage = [rank for rank in manifest["ranks"] if rank["coords"]["pp"] == pp - 1]
    assert [r["coords"]["tp"] for r in last_stage] == [0, 1, 2]
    memory = manifest["ranks"][0]["memory"]
    tokens, vocab, float32 = memory["max_batch"] * memory["max_seq"], 512, 4
    for rank in last_stage:
        (gather,) = _gathers(models[rank["rank"]])
        assert gather["sizes"] == local_vocab and gather["axis"] == 2, gather
        assert gather["group"] == [r["rank"] for r in last_stage], gather
        traffic = next(c for c in rank["cost"]["collectives"] if c["op"] == "AllGather")
        assert traffic["prefill_bytes"] == tokens * vocab * float32, traffic
        # the largest ai.llmir op: this rank's slice of the logits in, the full logits out
        mine = local_vocab[rank["coords"]["tp"]]
        assert rank["memory"]["communication_bytes"] == tokens * (vocab + mine) * float32, rank["memory"]


def test_uneven_shares_keep_each_rank_on_whole_kv_groups() -> None:
    """A rank's query heads read one kv head or whole ones: 9 heads over 3 kv heads at tp 2 is 6,3 (5,4 would
    cut the second kv head's group), at tp 4 3,3,2,1; a split that keeps the groups already stays."""
    from llmir_onnx.mesh import grouped_shares

    assert grouped_shares(9, 2, (3,)) == (6, 3)
    assert grouped_shares(9, 4, (3,)) == (3, 3, 2, 1)
    assert grouped_shares(8, 3, (2,)) == (4, 2, 2)
    assert grouped_shares(8, 5, (2,)) == (2, 2, 2, 1, 1)  # split_shares' own, it keeps the groups
    assert grouped_shares(4, 3, ()) == (2, 1, 1)
    assert grouped_shares(9, 2, (3,), (1.0, 3.0)) == (3, 6)  # a faster second rank gets more, groups kept


def test_kv_groups_of_two_on_three_ranks_match_the_original(tmp_path: Path) -> None:
    """8 query heads on 4 kv heads at tp 3: 4,2,2, so rank 0 holds kv heads 0-1 and each other rank one;
    repeat_kv (Unsqueeze/Expand/Reshape with a computed head count) repeats each rank's own kv heads."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify("llama-gqa-torch-legacy", 3, out)
    assert manifest["mesh"]["tp_shares"] == [4, 2, 2]
    assert _cache_heads(manifest) == [(0, 2), (2, 3), (3, 4)]
    models = checked_rank_models(out, 3)
    assert [_input_dims(m, "past_key_values.1.value")[1] for m in models] == [2, 1, 1]


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's structure in miniature: 9 query heads on 3 kv heads, an MLP width (192) and a vocabulary
    (512) that 9 does not divide, tied to nothing; float32 so verify's 1e-4 applies."""
    out = tmp_path_factory.mktemp("smollm2-shaped")
    make_synthetic(out, "--hidden", "144", "--layers", "2", "--heads", "9", "--kv-heads", "3", "--intermediate", "192",
                   "--vocab", "512", "--max-position", "128", "--dtype", "float32")
    return out


@pytest.mark.parametrize(
    ("tp", "vocab_parallel", "shares", "cache", "mlp"),
    [
        (2, False, [6, 3], [(0, 2), (2, 3)], [96, 96]),
        (2, True, [6, 3], [(0, 2), (2, 3)], [96, 96]),
        (4, False, [3, 3, 2, 1], [(0, 1), (1, 2), (2, 3), (2, 3)], [48, 48, 48, 48]),
    ],
)
def test_mlp_and_vocabulary_split_on_their_own_parts(
    smollm2_shaped: Path, tp: int, vocab_parallel: bool, shares: list[int], cache: list, mlp: list[int],
    tmp_path: Path,
) -> None:
    """The heads split in kv groups (6,3; 3,3,2,1), while the MLP's 192 columns and the 512-row vocabulary,
    which 9 head units do not divide, split into tp equal parts: a column/row pair only needs the same split
    on both sides. Through real rank processes, logits and KV cache against the original."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify(smollm2_shaped, tp, out, vocab_parallel=vocab_parallel)
    assert manifest["mesh"]["tp_shares"] == shares
    assert _cache_heads(manifest) == cache
    weights = {w["name"]: w for w in manifest["sharding"]["weights"]}
    for name, placement in [("mlp.gate_proj", "S(1)"), ("mlp.down_proj", "S(0)"), ("self_attn.q_proj", "S(1)")]:
        weight = weights[f"model.layers.0.{name}.weight"]
        even = placement if "mlp" in name else placement + "[" + ",".join(map(str, shares)) + "]"
        assert weight["placement"] == even, weight
    gate = weights["model.layers.0.mlp.gate_proj.weight"]
    assert [sum(stop - start for start, stop in ranges) for ranges in gate["ranges"]] == mlp
    if vocab_parallel:
        assert weights["model.embed_tokens.weight"]["placement"] == "S(0)"
    checked_rank_models(out, tp)


@pytest.mark.parametrize(("name", "shares"), [("gpt2-torch-legacy", [2, 1, 1]), ("llama-gqa-torch-legacy", [4, 2, 2])])
def test_uneven_tp_with_pipeline_stages(name: str, shares: list[int], tmp_path: Path) -> None:
    """tp 3 x pp 2: each tp rank's own graph is cut at the same layer, stage s of every tp rank holding the
    same layers; six real rank processes against the original."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify(name, 3, out, pp=2)
    assert manifest["mesh"]["tp_shares"] == shares
    stages = {(rank["coords"]["pp"], rank["coords"]["tp"]): rank for rank in manifest["ranks"]}
    assert len(stages) == 6
    models = checked_rank_models(out, 6)
    first_stage = {"ranks": [stages[(0, tp)] for tp in range(3)]}
    held = [stop - start for start, stop in _cache_heads(first_stage)]  # type: ignore[misc]
    assert [_input_dims(models[stages[(0, tp)]["rank"]], "past_key_values.0.key")[1] for tp in range(3)] == held
    assert held == [2, 1, 1]  # gpt2: 4 kv heads as 2,1,1; llama: 8 query heads 4,2,2 on 4 kv heads


def test_mlp_split_into_element_parts_where_neither_units_nor_tp_divide(smollm2_shaped: Path, tmp_path: Path) -> None:
    """tp 5 splits 9 heads as 3,3,1,1,1 and the 192 MLP columns, which neither ninths nor fifths divide,
    into parts of one element, near-equal: 39,39,38,38,38 (refused before; tests/test_element_splits.py)."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify(smollm2_shaped, 5, out)
    assert manifest["mesh"]["tp_shares"] == [3, 3, 1, 1, 1]
    weights = {w["name"]: w for w in manifest["sharding"]["weights"]}
    for name in ("gate_proj", "down_proj"):
        weight = weights[f"model.layers.0.mlp.{name}.weight"]
        assert [sum(b - a for a, b in ranges) for ranges in weight["ranges"]] == [39, 39, 38, 38, 38], weight
    assert weights["model.layers.0.mlp.down_proj.weight"]["placement"] == "S(0)[39,39,38,38,38]"
    checked_rank_models(out, 5)


def test_cli_says_how_uneven_heads_were_split_without_devices(tmp_path: Path) -> None:
    """No device weights in play: the summary says the split is the evenest whole heads allow (it once
    printed an empty weight ratio "from the devices' memory bandwidth" with no devices given)."""
    from tests.test_cli import run_cli

    result = run_cli("partition", str(MODELS / "gpt2-torch-legacy" / "model.onnx"), "--tp", "3",
                     "-o", str(tmp_path / "plan"))
    assert result.returncode == 0, result.stderr
    assert "heads per tp rank: 2,1,1 (as even as whole heads and KV groups allow)" in result.stdout, result.stdout
