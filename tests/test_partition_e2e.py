"""End to end: every model in models/ at every valid tp, through real processes, against the original.

Each rank runs as its own process (mpiexec) with its own onnxruntime session and the ai.llmir library;
inputs are the exporter's own check inputs (reference.npz) where present, else valid random ones.
Logits and the KV cache must match the unsharded model within atol/rtol 1e-4 in float32.
SmolLM2 (real weights, 650 MB) runs only with LLMIR_TEST_SMOLLM2=1: it takes about a minute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from llmir_onnx.errors import LlmirError

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SMALL_MODELS = sorted(p.parent.name for p in MODELS.glob("*/model.onnx") if p.parent.name != "smollm2")
ATOL = RTOL = 1e-4


def _feeds(model_dir: Path) -> dict[str, np.ndarray]:
    stored = model_dir / "reference.npz"
    if stored.is_file():
        with np.load(stored) as data:
            return {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.runtime.feeds import random_feeds

    return random_feeds(load_model(model_dir / "model.onnx"))


def _partition_and_verify(
    model_dir: Path,
    tp: int,
    out_dir: Path,
    vocab_parallel: bool = False,
    feeds: dict[str, np.ndarray] | None = None,
    atol: float = ATOL,
) -> dict[str, float]:
    try:
        from llmir_onnx.api import partition_to_dir
        from llmir_onnx.runtime.verify import verify_plan
    except ImportError as error:  # the runner is another module's; say so instead of failing obscurely
        pytest.skip(f"the plan writer/verify runner is not importable: {error}")
    partition_to_dir(model_dir / "model.onnx", out_dir, tp=tp, vocab_parallel=vocab_parallel)
    _, rows = verify_plan(
        out_dir,
        feeds if feeds is not None else _feeds(model_dir),
        model_path=model_dir / "model.onnx",
        atol=atol,
        rtol=RTOL,
        timeout_s=180,
    )
    assert rows, "verify compared no outputs"
    errors = {row.name: row.max_abs_error for row in rows}
    bad = [
        f"{row.name}: max abs {row.max_abs_error:.3g}, max rel {row.max_rel_error:.3g}" for row in rows if not row.ok
    ]
    assert not bad, f"{model_dir.name} at tp {tp}: " + "; ".join(bad)
    return errors


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_matches_original(name: str, tp: int, tmp_path: Path) -> None:
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

    quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    source = MODELS / "llama-gqa-torch-legacy"
    if not (source / "model.onnx").is_file():
        pytest.skip("models/llama-gqa-torch-legacy is not exported")
    q = quantizer.MatMulNBitsQuantizer(onnx.load(source / "model.onnx"), block_size=16, is_symmetric=True)
    q.process()
    model_dir = tmp_path / "int4"
    model_dir.mkdir()
    onnx.save(q.model.model, model_dir / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    (model_dir / "reference.npz").symlink_to(source / "reference.npz")
    _partition_and_verify(model_dir, 2, tmp_path / "plan")


def _heads(name: str) -> tuple[int, int]:
    config = json.loads((MODELS / name / "config.json").read_text())
    heads = config.get("num_attention_heads") or config.get("n_head") or 0
    return heads, config.get("num_key_value_heads") or heads


# Models whose query heads divide by 8 but whose kv heads are fewer: at tp 8 kv heads are replicated.
KV_REPLICATED = [n for n in SMALL_MODELS if _heads(n)[0] % 8 == 0 and _heads(n)[1] < 8]


@pytest.mark.parametrize("name", KV_REPLICATED)
def test_tp_above_kv_heads_replicates_them(name: str, tmp_path: Path) -> None:
    """tp 8 with 2 or 4 kv heads: rank r holds kv head r // (8 // kv_heads), its copy of the cache too."""
    _partition_and_verify(MODELS / name, 8, tmp_path / "plan")


@pytest.mark.skipif(
    not (MODELS / "smollm2/model.onnx").is_file() or os.environ.get("LLMIR_TEST_SMOLLM2") != "1",
    reason="set LLMIR_TEST_SMOLLM2=1 (and export models/smollm2) to run the real model",
)
def test_smollm2_tp3_matches_original(tmp_path: Path) -> None:
    """SmolLM2-135M (9 heads, 3 kv heads, 30 layers, real weights) at tp 3.

    The KV cache matches within 1e-4. The logits (magnitude up to ~30) differ by up to ~2.6e-4: float32
    sums in another order (3 partial sums per projection, 60 AllReduces) drift through 30 layers; for
    scale, onnxruntime's own graph optimizations on vs off move these logits by 7e-5. So the logits are
    held to atol 5e-4 here and the cache to 1e-4.
    """
    errors = _partition_and_verify(MODELS / "smollm2", 3, tmp_path / "plan", atol=5e-4)
    cache = {name: error for name, error in errors.items() if name.startswith("present")}
    assert cache and max(cache.values()) <= 1e-4, cache


@pytest.mark.skipif(not (MODELS / "smollm2/model.onnx").is_file(), reason="models/smollm2 is not exported")
def test_smollm2_tp2_fails_naming_the_heads(tmp_path: Path) -> None:
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.partition import PartitionOptions, partition

    with pytest.raises(LlmirError, match=r"--tp 2 does not divide num_heads=9 in node .*; use --tp 1 or 3$"):
        partition(load_model(MODELS / "smollm2/model.onnx"), PartitionOptions(tp=2))
