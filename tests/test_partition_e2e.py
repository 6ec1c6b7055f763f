"""End to end: every model in models/ at every valid tp, through real processes, against the original.

Each rank runs as its own process (mpiexec) with its own onnxruntime session and the ai.llmir library;
inputs are the exporter's own check inputs (reference.npz) where present, else valid random ones.
Logits and the KV cache must match the unsharded model within `verify`'s default tolerances: atol/rtol
1e-4 for float32 outputs; for float16 ones a unit or two in the last place of the output's largest values
(runtime/verify.py: default_tolerance_for).
SmolLM2 (real weights, 650 MB) runs only with LLMIR_TEST_SMOLLM2=1: it takes about a minute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from synthetic_helpers import script_module

from llmir_onnx.errors import LlmirError
from llmir_onnx.runtime.feeds import export_check_feeds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SMALL_MODELS = sorted(p.parent.name for p in MODELS.glob("*/model.onnx") if p.parent.name != "smollm2")
ATOL = RTOL = 1e-4  # float32 figures, where a test states them


def _partition_and_verify(
    model_dir: Path,
    tp: int,
    out_dir: Path,
    vocab_parallel: bool = False,
    feeds: dict[str, np.ndarray] | None = None,
    atol: float | None = None,
) -> dict[str, float]:
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.verify import verify_plan

    partition_to_dir(model_dir / "model.onnx", out_dir, tp=tp, vocab_parallel=vocab_parallel)
    _, rows = verify_plan(
        out_dir,
        feeds if feeds is not None else export_check_feeds(model_dir),
        model_path=model_dir / "model.onnx",
        atol=atol,
        rtol=None if atol is None else RTOL,
        timeout_s=180,
    )
    assert rows, "verify compared no outputs"
    errors = {row.name: row.max_abs_error for row in rows}
    bad = [
        f"{row.name}: max abs {row.max_abs_error:.3g}, max rel {row.max_rel_error:.3g}" for row in rows if not row.ok
    ]
    assert not bad, f"{model_dir.name} at tp {tp}: " + "; ".join(bad)
    return errors


# Layouts the model does not allow, with the one line a user sees; it lists only tp values that work.
# The int4 models: tp must not split a quantization block (a byte of packed 4-bit zero points it may: at tp 4
# the b128-zp model's ranks hold one block each, and their zero points re-packed).
REFUSED = {
    ("llama-wide-genai-int4-b128", 8): r"^--tp 8 does not divide the number of K blocks \(K=512, block_size 128\)=4 "
    r"in node \S+ \(MatMulNBits\); use --tp 1, 2 or 4$",
    ("llama-wide-genai-int4-b128-zp", 8): r"^--tp 8 does not divide the number of K blocks \(K=512, block_size 128\)=4 "
    r"in node \S+ \(MatMulNBits\); use --tp 1, 2 or 4$",
}


def _assert_refused(name: str, tp: int, plan: Path) -> bool:
    """True when (name, tp) is a layout the model does not allow, after checking its refusal."""
    refusal = REFUSED.get((name, tp))
    if refusal is None:
        return False
    with pytest.raises(LlmirError, match=refusal):
        _partition_and_verify(MODELS / name, tp, plan)
    assert not plan.exists(), "a refused layout must leave nothing behind"
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_matches_original(name: str, tp: int, tmp_path: Path) -> None:
    if _assert_refused(name, tp, tmp_path / "plan"):
        return
    errors = _partition_and_verify(MODELS / name, tp, tmp_path / "plan")
    assert any("logits" in output for output in errors)
    assert any("present" in output for output in errors), "the KV cache must be compared too"


@pytest.mark.parametrize("name", [n for n in SMALL_MODELS if n in ("llama-gqa-torch-legacy", "phi3-torch-legacy")])
def test_plan_is_not_tied_to_one_input_shape(name: str, tmp_path: Path) -> None:
    """Batch, past and new lengths other than the exporter's: shapes read at run time stay right."""
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.runtime.feeds import FeedSizes, random_feeds

    sizes = FeedSizes(batch=2, new_tokens=3, past_tokens=5, seed=7)
    feeds = random_feeds(load_model(MODELS / name / "model.onnx"), sizes)
    _partition_and_verify(MODELS / name, 4, tmp_path / "plan", feeds=feeds)


VOCAB_PARALLEL = [n for n in SMALL_MODELS if n in ("llama-gqa-torch-legacy", "gpt2-torch-legacy", "llama-gqa-genai")]


@pytest.mark.parametrize("name", VOCAB_PARALLEL)
def test_vocab_parallel_matches_original(name: str, tmp_path: Path) -> None:
    """Embedding rows and lm_head columns split by vocabulary: masked lookup + AllReduce, AllGather of logits."""
    _partition_and_verify(MODELS / name, 2, tmp_path / "plan", vocab_parallel=True)


def test_int4_matmulnbits_matches_original(tmp_path: Path) -> None:
    """MatMulNBits (onnxruntime's block-quantized matmul, as in int4 exports): N split for column-parallel
    weights, the K blocks for row-parallel ones. The model is quantized here with onnxruntime's quantizer."""
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as quantizer

    source = MODELS / "llama-gqa-torch-legacy"
    q = quantizer.MatMulNBitsQuantizer(onnx.load(source / "model.onnx"), block_size=16, is_symmetric=True)
    q.process()
    model_dir = tmp_path / "int4"
    model_dir.mkdir()
    onnx.save(q.model.model, model_dir / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    (model_dir / "reference.npz").symlink_to(source / "reference.npz")
    _partition_and_verify(model_dir, 2, tmp_path / "plan")


def _models_script(name: str) -> ModuleType:
    return script_module(MODELS / f"{name}.py")


def _assert_float64_plan_exact(model_path: Path, plan_dir: Path, tp: int, pp: int) -> None:
    """Partition a float64 model and compare on a noise past at 1e-10: only rounding may differ (~1e-14)."""
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.runtime.feeds import FeedSizes, random_feeds
    from llmir_onnx.runtime.verify import verify_plan

    partition_to_dir(model_path, plan_dir, tp=tp, pp=pp)
    feeds = random_feeds(load_model(model_path), FeedSizes(batch=2, new_tokens=3, past_tokens=4, seed=3))
    assert feeds["input_ids"].shape == (2, 3) and any(v.dtype == np.float64 for v in feeds.values())
    _, rows = verify_plan(plan_dir, feeds, model_path=model_path, atol=1e-10, rtol=1e-10, timeout_s=180)
    bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
    assert rows and not bad, bad


# Exports whose ops onnxruntime runs in double (its contrib ops and opset-23 RotaryEmbedding have no
# double kernels).
FLOAT64_EXPORTS = ("llama-gqa-torch-legacy", "gpt2-optimum", "phi3-torch-dynamo", "qwen3-torch-legacy")
FLOAT64_MODELS = [n for n in SMALL_MODELS if n in FLOAT64_EXPORTS]


@pytest.mark.parametrize("name", FLOAT64_MODELS)
def test_float64_plan_is_exact(name: str, tmp_path: Path) -> None:
    """In float32 a plan may only match within rounding; in float64 that rounding is ~1e-14, so a rule
    that computes something slightly different (a scale, a mask, a bias added twice) cannot hide."""
    to_float64 = _models_script("to_float64").to_float64
    to_float64(MODELS / name / "model.onnx", tmp_path / "f64" / "model.onnx")
    _assert_float64_plan_exact(tmp_path / "f64" / "model.onnx", tmp_path / "plan", tp=2, pp=2)


def test_model_made_past_is_the_originals_own_cache() -> None:
    """verify's default past: what the original returns as `present` for random tokens, fed back."""
    from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds
    from llmir_onnx.runtime.session import original_session

    path = MODELS / "llama-gqa-torch-legacy" / "model.onnx"
    sizes = FeedSizes(batch=2, new_tokens=3, past_tokens=5, seed=1)
    feeds = model_past_feeds(path, sizes)
    session = original_session(path)
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    assert feeds["input_ids"].shape == (2, 3) and feeds["attention_mask"].shape == (2, 8)
    pasts = [name for name in feeds if name.startswith("past")]
    assert pasts
    for past in pasts:
        present = outputs[past.replace("past_key_values", "present")]
        assert feeds[past].shape[2] == 5 and present.shape[2] == 8
        np.testing.assert_array_equal(present[:, :, :5], feeds[past])
    # Not noise: a model-made key cache has structure (rotary, per-channel scales) a standard normal lacks.
    keys = np.concatenate([feeds[p].ravel() for p in pasts if p.endswith("key")])
    assert abs(float(keys.std()) - 1.0) > 0.05 or abs(float(keys.mean())) > 0.05


def _heads(name: str) -> tuple[int, int]:
    config = json.loads((MODELS / name / "config.json").read_text())
    heads = config.get("num_attention_heads") or config.get("n_head") or 0
    return heads, config.get("num_key_value_heads") or heads


# Models whose query heads divide by 8 but whose kv heads are fewer: at tp 8 kv heads are replicated.
KV_REPLICATED = [n for n in SMALL_MODELS if _heads(n)[0] % 8 == 0 and _heads(n)[1] < 8]


@pytest.mark.parametrize("name", KV_REPLICATED)
def test_tp_above_kv_heads_replicates_them(name: str, tmp_path: Path) -> None:
    """tp 8 with 2 or 4 kv heads: rank r holds kv head r // (8 // kv_heads), its copy of the cache too."""
    if not _assert_refused(name, 8, tmp_path / "plan"):
        _partition_and_verify(MODELS / name, 8, tmp_path / "plan")


@pytest.mark.skipif(
    not (MODELS / "smollm2/model.onnx").is_file() or os.environ.get("LLMIR_TEST_SMOLLM2") != "1",
    reason="set LLMIR_TEST_SMOLLM2=1 (and export models/smollm2) to run the real model",
)
def test_smollm2_tp3_matches_original(tmp_path: Path) -> None:
    """SmolLM2-135M (9 heads, 3 kv heads, 30 layers, real weights) at tp 3, on `verify`'s default inputs:
    4 random tokens after a 3-token cache the model made itself. Logits and cache within 1e-4.

    (A standard-normal past cache, `--past-from noise`, is a state no model reaches; there float32
    rounding is amplified ~1e4 times through 30 layers and the logits of the plan and of onnxruntime
    with its graph optimizations off both drift up to ~3e-3 from the optimized original. The float64
    test below shows that drift is rounding, not a different computation.)
    """
    from llmir_onnx.runtime.feeds import model_past_feeds

    feeds = model_past_feeds(MODELS / "smollm2" / "model.onnx")
    errors = _partition_and_verify(MODELS / "smollm2", 3, tmp_path / "plan", feeds=feeds)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.skipif(
    not (MODELS / "smollm2/model.onnx").is_file() or os.environ.get("LLMIR_TEST_SMOLLM2") != "1",
    reason="set LLMIR_TEST_SMOLLM2=1 (and export models/smollm2) to run the real model",
)
def test_smollm2_tp3_float64_is_exact(tmp_path: Path) -> None:
    to_float64 = _models_script("to_float64").to_float64
    to_float64(MODELS / "smollm2" / "model.onnx", tmp_path / "f64" / "model.onnx")
    _assert_float64_plan_exact(tmp_path / "f64" / "model.onnx", tmp_path / "plan", tp=3, pp=1)


@pytest.mark.parametrize("tp", [16])
def test_fused_multi_query_refusal_lists_the_tp_values_that_work(tp: int) -> None:
    """Falcon's fused multi-query qkv (8 q heads, 1 kv head): up to 8 ranks take one query head at least
    (3 splits them 3,3,2; tests/test_uneven_tp.py), 16 fit nothing."""
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.partition import PartitionOptions, partition

    refusal = rf"^--tp {tp} does not divide num_heads=8 in node \S+ \(\w+\); use --tp 1, 2, 3, 4, 5, 6, 7 or 8$"
    with pytest.raises(LlmirError, match=refusal):
        partition(load_model(MODELS / "falcon-mqa-torch-legacy/model.onnx"), PartitionOptions(tp=tp))


@pytest.mark.skipif(not (MODELS / "smollm2/model.onnx").is_file(), reason="models/smollm2 is not exported")
def test_smollm2_tp2_splits_heads_by_kv_group_and_the_mlp_in_halves() -> None:
    """9 heads on 3 kv heads at tp 2: 6,3 (whole kv groups); the MLP's 1536 columns, no multiple of 9,
    768 each. Numbers: tests/test_real_models.py (LLMIR_TEST_REAL=1) generates through the ranks."""
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.partition import PartitionOptions, partition

    result = partition(load_model(MODELS / "smollm2/model.onnx"), PartitionOptions(tp=2))
    assert result.mesh.tp_shares == (6, 3)
    for rank in result.ranks:
        by_name = {node.name: node for node in rank.model.graph}
        gate = by_name["/model/model/layers.0/mlp/gate_proj/MatMul"].inputs[1]
        q = by_name["/model/model/layers.0/self_attn/q_proj/MatMul"].inputs[1]
        assert (gate.shape[1], q.shape[1]) == (768, [384, 192][rank.rank]), rank.rank


def _with_unsupported_ops(source: Path, target: Path) -> None:
    """The LLaMA export with an op that has no sharding rule (TopK, k = the whole width, sorted: its result
    needs the whole row) twice in every layer, both where values are sharded: over the MLP's
    column-parallel intermediate S(2), and over the attention's row-parallel output, a partial sum P (the
    top values of a part are no part of the top values). TopK has a shape rule in plan/shapes.py, which
    the plan needs. (Clip, used here before, now has its elementwise family's rule.)"""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(source)  # 1 MiB of weights: in memory is fine
    config = json.loads((source.parent / "config.json").read_text())
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([config["intermediate_size"]], dtype=np.int64), "unsupported_topk_k"),
        numpy_helper.from_array(np.array([config["hidden_size"]], dtype=np.int64), "unsupported_attn_topk_k"),
    ])
    nodes = []
    for node in model.graph.node:
        if node.name.endswith("/mlp/down_proj/MatMul"):
            name = node.name.replace("down_proj/MatMul", "topk")
            nodes.append(helper.make_node("TopK", [node.input[0], "unsupported_topk_k"],
                                          [f"{name}_values", f"{name}_indices"], name=name, axis=-1))
            node.input[0] = f"{name}_values"
        nodes.append(node)
        if node.name.endswith("/self_attn/o_proj/MatMul"):
            name, projected = node.name.replace("o_proj/MatMul", "topk"), node.output[0]
            for consumer in model.graph.node:
                consumer.input[:] = [f"{name}_values" if value == projected else value for value in consumer.input]
            nodes.append(helper.make_node("TopK", [projected, "unsupported_attn_topk_k"],
                                          [f"{name}_values", f"{name}_indices"], name=name, axis=-1))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    target.parent.mkdir(parents=True)
    onnx.save(model, target, save_as_external_data=True, location="model.onnx.data")


@pytest.fixture(scope="module")
def unsupported_ops_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unsupported") / "model" / "model.onnx"
    _with_unsupported_ops(MODELS / "llama-gqa-torch-legacy" / "model.onnx", path)
    return path


def test_unsupported_ops_sit_in_sharded_regions(unsupported_ops_model: Path) -> None:
    """Without the flag the partition refuses them; with it, each of the 4 inserted nodes is gathered."""
    from llmir_onnx.errors import ShardingError
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.partition import PartitionOptions, partition

    refusal = r"no sharding rule for op ai\.onnx::TopK in node /model/model/layers\.0/"
    with pytest.raises(ShardingError, match=refusal):
        partition(load_model(unsupported_ops_model), PartitionOptions(tp=2))
    result = partition(load_model(unsupported_ops_model), PartitionOptions(tp=2, replicate_unsupported=True))
    gathered = sorted(w.split()[1] for w in result.warnings)
    assert gathered == sorted(f"/model/model/layers.{layer}/{part}" for layer in (0, 1)
                              for part in ("self_attn/topk", "mlp/topk"))


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (2, 2)])
def test_replicate_unsupported_matches_original(unsupported_ops_model: Path, tmp_path: Path, tp: int,
                                                pp: int) -> None:
    """--replicate-unsupported: the ranks, as real processes, reproduce the original's logits and KV
    cache (a shard-wise TopK, or a TopK of partial sums, would be far off)."""
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds
    from llmir_onnx.runtime.verify import verify_plan

    plan = tmp_path / "plan"
    partition_to_dir(unsupported_ops_model, plan, tp=tp, pp=pp, replicate_unsupported=True)
    feeds = model_past_feeds(unsupported_ops_model, FeedSizes(batch=2, new_tokens=3, past_tokens=4, seed=5))
    _, rows = verify_plan(plan, feeds, model_path=unsupported_ops_model, atol=ATOL, rtol=RTOL, timeout_s=180)
    assert {row.name for row in rows} >= {"logits", "present.0.key", "present.1.value"}
    bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
    assert not bad, bad
