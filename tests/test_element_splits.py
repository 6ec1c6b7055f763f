"""Split axes that neither tp nor the heads' units divide: a vocabulary, an MLP's intermediate columns.

Such an axis is cut into parts of one element, near-equal and the larger first (`mesh.split_shares`), held as
`Shard.shares` over the axis size: 1001 vocabulary rows on 3 ranks are 334,334,333; 202 MLP columns on 4
ranks 51,51,50,50. Through real rank processes with the ai.llmir library: logits and KV cache against the
original (a prompt, then a decode step after a cache, in one job), and greedy generation at tp 3; the
bundled GPT-2 exports with a prime vocabulary (tied embedding and lm_head) likewise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from plan_helpers import checked_rank_models
from synthetic_helpers import make_synthetic

from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
VOCAB, INTERMEDIATE = 1001, 202  # 1001 = 7 x 11 x 13: no tp from 2 to 6 divides it; 202 only by 2


@pytest.fixture(scope="module")
def odd_sizes_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 heads (tp 2 and 3 divide them), a 1001-row vocabulary and 202 MLP columns;
    float32 so verify's 1e-4 applies and greedy tokens have no ties."""
    return make_synthetic(tmp_path_factory.mktemp("odd-sizes"), "--hidden", "96", "--layers", "2", "--heads", "6",
                          "--kv-heads", "6", "--intermediate", str(INTERMEDIATE), "--vocab", str(VOCAB),
                          "--max-position", "128", "--dtype", "float32")


def _partition_and_verify(model: Path, out: Path, **options: object) -> dict:
    """Partition, then a 4-token prompt and a 1-token decode step after 3 cached tokens in one job."""
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.verify import verify_plan_cases

    partition_to_dir(model, out, **options)  # type: ignore[arg-type]
    sizes = [FeedSizes(new_tokens=4, past_tokens=0), FeedSizes(new_tokens=1, past_tokens=3)]
    cases = [model_past_feeds(model, size) for size in sizes]
    for size, (_, rows) in zip(sizes, verify_plan_cases(out, cases, model_path=model, timeout_s=180), strict=True):
        names = {row.name for row in rows}
        assert "logits" in names and any(n.startswith("present") for n in names), names
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"{options} with {size}: " + "; ".join(bad)
    return json.loads((out / "manifest.json").read_text())


def _local_widths(manifest: dict, weight: str) -> list[int]:
    split = next(w for w in manifest["sharding"]["weights"] if w["name"] == weight)
    return [sum(stop - start for start, stop in ranges) for ranges in split["ranges"]]


def _placement(manifest: dict, weight: str) -> str:
    return str(next(w for w in manifest["sharding"]["weights"] if w["name"] == weight)["placement"])


def _logits_gather_sizes(model: onnx.ModelProto) -> list[list[int]]:
    return [
        list(attr.ints)
        for node in model.graph.node
        if node.op_type == "AllGather"
        for attr in node.attribute
        if attr.name == "sizes"
    ]


@pytest.mark.parametrize(
    ("tp", "tp_weights", "vocab_parts", "mlp_parts"),
    [
        (2, None, [501, 500], [101, 101]),
        # Per-rank weights (a faster device): the heads split 4,2 and the vocabulary follows the weights
        # (mesh.split_shares: one row each, the other 999 as 749.25 : 249.75, the last to the larger remainder);
        # the MLP, which tp divides, takes tp equal parts of its own as before.
        (2, (3.0, 1.0), [750, 251], [101, 101]),
    ],
)
def test_vocab_parallel_vocabulary_tp_does_not_divide(
    odd_sizes_model: Path, tp: int, tp_weights: tuple[float, ...] | None, vocab_parts: list[int],
    mlp_parts: list[int], tmp_path: Path,
) -> None:
    out = tmp_path / "plan"
    manifest = _partition_and_verify(odd_sizes_model, out, tp=tp, vocab_parallel=True, tp_weights=tp_weights)
    assert _local_widths(manifest, "model.embed_tokens.weight") == vocab_parts
    assert _local_widths(manifest, "lm_head.weight") == vocab_parts
    assert _placement(manifest, "lm_head.weight") == "S(1)[" + ",".join(map(str, vocab_parts)) + "]"
    assert _local_widths(manifest, "model.layers.0.mlp.gate_proj.weight") == mlp_parts
    for model in checked_rank_models(out, tp):
        assert _logits_gather_sizes(model) == [vocab_parts]


@pytest.fixture(scope="module")
def tp3_vocab_plan(odd_sizes_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tp3-vocab") / "plan"
    return out, _partition_and_verify(odd_sizes_model, out, tp=3, vocab_parallel=True)


def test_vocabulary_and_mlp_in_element_parts_at_tp3(tp3_vocab_plan: tuple[Path, dict]) -> None:
    """tp 3 divides the 6 heads but neither the 1001 rows (334,334,333) nor the 202 columns (68,67,67):
    the embedding's Gather reads each rank's own row range, the logits are gathered with per-rank sizes."""
    out, manifest = tp3_vocab_plan
    assert "tp_shares" not in manifest["mesh"]  # the heads split evenly
    assert _local_widths(manifest, "model.embed_tokens.weight") == [334, 334, 333]
    assert _local_widths(manifest, "model.layers.0.mlp.gate_proj.weight") == [68, 67, 67]
    assert _local_widths(manifest, "model.layers.0.mlp.down_proj.weight") == [68, 67, 67]
    assert _local_widths(manifest, "model.layers.0.self_attn.q_proj.weight") == [32, 32, 32]
    for tp_rank, model in enumerate(checked_rank_models(out, 3)):
        assert _logits_gather_sizes(model) == [[334, 334, 333]]
        embedding_start = "embed_tokens/Gather/vocab_start"
        starts = [int(onnx.numpy_helper.to_array(i)) for i in model.graph.initializer if embedding_start in i.name]
        assert starts == [[0, 334, 668][tp_rank]], starts


def test_generate_at_tp3_gives_the_original_greedy_tokens(
    tp3_vocab_plan: tuple[Path, dict], odd_sizes_model: Path
) -> None:
    from llmir_onnx.runtime.generate import recompute_greedy
    from llmir_onnx.runtime.generate_job import generate_plan

    out, _ = tp3_vocab_plan
    prompt = np.array([[5, 900, 17, 1000, 333]])
    outcome = generate_plan(out, prompt, 8, check=True)
    assert outcome is not None
    expected = recompute_greedy(odd_sizes_model, prompt, 8).tokens.tolist()
    assert outcome.report.tokens == outcome.reference_tokens == expected
    assert outcome.difference is None and len(expected[0]) == 8


def test_mlp_columns_tp_does_not_divide_with_uneven_heads_and_stages(odd_sizes_model: Path, tmp_path: Path) -> None:
    """tp 4 x pp 2: the 6 heads split 2,2,1,1, the 202 MLP columns (neither sixths nor
    quarters) 51,51,50,50; eight real rank processes."""
    out = tmp_path / "plan"
    manifest = _partition_and_verify(odd_sizes_model, out, tp=4, pp=2)
    assert manifest["mesh"]["tp_shares"] == [2, 2, 1, 1]
    assert _local_widths(manifest, "model.layers.1.mlp.up_proj.weight") == [51, 51, 50, 50]
    checked_rank_models(out, 8)


def _cut_vocabulary(source: Path, out: Path, vocab: int) -> Path:
    """The bundled model with its vocabulary cut to the first `vocab` tokens: embedding rows, lm_head
    columns (one tied table in the optimum and dynamo exports) and the logits' last dim."""
    from onnx import numpy_helper

    model = onnx.load(str(source / "model.onnx"))
    logits = model.graph.output[0].type.tensor_type.shape.dim[-1]
    full, logits.dim_value = logits.dim_value, vocab
    for index, tensor in enumerate(model.graph.initializer):
        if len(tensor.dims) == 2 and full in tensor.dims:
            array = numpy_helper.to_array(tensor)
            array = array[:vocab] if array.shape[0] == full else array[:, :vocab]
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), tensor.name))
    for info in list(model.graph.value_info):  # shapes recorded with the full vocabulary
        if any(dim.dim_value == full for dim in info.type.tensor_type.shape.dim):
            model.graph.value_info.remove(info)
    out.mkdir(parents=True)
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out / "model.onnx"


@pytest.mark.parametrize(
    ("name", "tp", "vocab_parts"),
    [
        ("gpt2-optimum", 2, [255, 254]),  # the heads 2,2: only the vocabulary is uneven
        ("gpt2-optimum", 3, [170, 170, 169]),  # the heads 2,1,1 too
        ("gpt2-torch-dynamo", 3, [170, 170, 169]),
    ],
)
def test_gpt2_with_a_prime_vocabulary_vocab_parallel(
    name: str, tp: int, vocab_parts: list[int], tmp_path: Path
) -> None:
    """GPT-2's own vocabulary (50257 = 29 x 1733) divides by no small tp; the bundled exports cut to 509
    tokens (a prime) stand for it: one table tied to the embedding and the lm_head (through a Transpose),
    fused [q|k|v] columns, the heads split evenly at tp 2 and 2,1,1 at tp 3."""
    model = _cut_vocabulary(MODELS / name, tmp_path / "model", 509)
    manifest = _partition_and_verify(model, tmp_path / "plan", tp=tp, vocab_parallel=True)
    table = next(w["name"] for w in manifest["sharding"]["weights"] if w["shape"] == [509, 64])
    assert _local_widths(manifest, table) == vocab_parts
    for rank_model in checked_rank_models(tmp_path / "plan", tp):
        assert vocab_parts in _logits_gather_sizes(rank_model)  # the logits (at tp 3 the heads' too)


def test_plan_lists_tps_that_split_an_axis_into_element_parts(odd_sizes_model: Path) -> None:
    """`plan` offers tp 3 and tp 4 for a model whose 202 MLP columns and 1001-token vocabulary they do not
    divide (the partitioner splits those into parts of one element); tp 7 exceeds the 6 heads."""
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.plan.devices import CPU_HERE
    from llmir_onnx.plan.layouts import enumerate_layouts

    layouts = enumerate_layouts(
        load_model(odd_sizes_model), 7, CPU_HERE.memory_bytes, CPU_HERE, 1, 64, include_fewer=True, vocab_parallel=True
    )
    by = {(layout.tp, layout.pp): layout for layout in layouts}
    assert by[(3, 1)].valid and by[(3, 1)].tp_shares == (), by[(3, 1)].reason
    assert by[(4, 1)].valid and by[(4, 1)].tp_shares == (2, 2, 1, 1), by[(4, 1)].reason
    assert not by[(7, 1)].valid
