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

from llmir_onnx.errors import LlmirError
from llmir_onnx.runtime.feeds import export_check_feeds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _partition_and_verify(name: str, tp: int, out_dir: Path, tp_weights: tuple[float, ...] | None = None) -> dict:
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.verify import verify_plan

    model_dir = MODELS / name
    partition_to_dir(model_dir / "model.onnx", out_dir, tp=tp, tp_weights=tp_weights)
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


def _rank_models_check(out_dir: Path, ranks: int) -> list[onnx.ModelProto]:
    models = []
    for rank in range(ranks):
        path = out_dir / f"rank{rank}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        models.append(onnx.load(str(path), load_external_data=False))
    return models


def _input_dims(model: onnx.ModelProto, name: str) -> list[int | str]:
    value = next(v for v in model.graph.input if v.name == name)
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["gpt2-torch-legacy", "gpt2-optimum"])
def test_four_heads_on_three_ranks_match_the_original(name: str, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    manifest = _partition_and_verify(name, 3, out)
    assert manifest["mesh"]["tp_shares"] == [2, 1, 1]
    assert _cache_heads(manifest) == [(0, 2), (2, 3), (3, 4)]
    models = _rank_models_check(out, 3)
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
    models = _rank_models_check(out, 3)
    assert [_input_dims(m, "past_key_values.0.key")[1] for m in models] == [1, 1, 1]


@pytest.mark.parametrize(("name", "tp"), [("falcon-mqa-torch-legacy", 3), ("llama-gqa-genai", 5)])
def test_uneven_query_heads_on_fewer_kv_heads(name: str, tp: int, tmp_path: Path) -> None:
    """Falcon's fused multi-query qkv at 3,3,2; GroupQueryAttention (4 kv heads) at 2,2,2,1,1 with each
    rank's own num_heads and kv_num_heads."""
    out = tmp_path / "plan"
    _partition_and_verify(name, tp, out)
    models = _rank_models_check(out, tp)
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
    _rank_models_check(out, 2)


@pytest.mark.parametrize(
    ("name", "tp", "pp", "message"),
    [
        # 8 heads over 3 ranks (3,3,2) would give a rank one kv head and a half of another.
        (
            "llama-gqa-torch-legacy",
            3,
            1,
            r"^--tp 3 splits the 8 heads as 3,3,2: tp rank 0 would hold units 0-2, which cut the 4 kv heads "
            r"\(2 units each\) \(value '[^']+'\); use --tp 1, 2, 4 or 8$",
        ),
        # Every rank needs one head at least: only 1 to 4 work for 4 heads.
        (
            "gpt2-torch-legacy",
            8,
            1,
            r"^--tp 8 does not divide num_heads=4 in node \S+ \(Reshape\); use --tp 1, 2, 3 or 4$",
        ),
        # The dynamo export gathers the heads before its output projection: AllGather of unequal parts.
        ("gpt2-torch-dynamo", 3, 1, r"^cannot gather the uneven shard S\(2\)\[2,1,1\] of value '[^']+': gathers of "),
        ("gpt2-torch-legacy", 3, 2, r"^--tp 3 splits the heads unevenly \(2,1,1\), which pipeline stages do not "),
    ],
)
def test_uneven_splits_not_supported_are_refused(name: str, tp: int, pp: int, message: str, tmp_path: Path) -> None:
    from llmir_onnx.api import partition_to_dir

    with pytest.raises(LlmirError, match=message):
        partition_to_dir(MODELS / name / "model.onnx", tmp_path / "plan", tp=tp, pp=pp)
    assert not (tmp_path / "plan").exists(), "a refused layout must leave nothing behind"
