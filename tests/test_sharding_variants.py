"""Layer variants of current families, end to end through real processes, against the original model.

The synthetic generator (models/make_synthetic.py) adds each variant to a legacy-export-shaped LLaMA:
per-head q/k RMSNorm with ONE kv head (tp > kv heads: the head is replicated, never split on head_dim),
q/k/v biases exported as Add(bias, MatMul) with 2 kv heads (kv replication at tp 4), RMSNorm of q and
k over all heads (OLMo 2: one AllReduce of the mean of squares per norm, no gather) and clipped q/k/v.
"""

from __future__ import annotations

import collections
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from synthetic_helpers import synthetic_module

ROOT = Path(__file__).resolve().parents[1]


synthetic = synthetic_module()
BASE = replace(synthetic.PRESETS["tiny"], hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=128, max_position=64)
VARIANTS = {
    "head-norm-one-kv-head": replace(BASE, kv_heads=1, qk_norm="head"),
    "qkv-bias-two-kv-heads": replace(BASE, qkv_bias=True),
    "norm-over-all-heads": replace(BASE, qk_norm="all"),
    "clipped-qkv": replace(BASE, clip_qkv=0.5),
}


def _collectives(rank_model: Path) -> collections.Counter[str]:
    model = onnx.load(rank_model, load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node if n.domain == "ai.llmir")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_original(variant: str, tp: int, tmp_path: Path) -> None:
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.runtime.feeds import FeedSizes, random_feeds
    from llmir_onnx.runtime.verify import verify_plan

    config = VARIANTS[variant]
    model_path = synthetic.generate(config, tmp_path / "model")
    plan_dir = tmp_path / "plan"
    partition_to_dir(model_path, plan_dir, tp=tp)
    feeds = random_feeds(load_model(model_path), FeedSizes(batch=2, new_tokens=3, past_tokens=4, seed=1))
    _, rows = verify_plan(plan_dir, feeds, model_path=model_path, atol=1e-4, rtol=1e-4, timeout_s=180)
    bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
    assert rows and not bad, bad
    assert any(row.name.startswith("present") for row in rows), "the KV cache must be compared too"
    # Megatron's two AllReduces per layer, plus one per norm over all heads (q and k); never a gather.
    norms = 2 if config.qk_norm == "all" else 0
    assert _collectives(plan_dir / "rank0.onnx") == {"AllReduce": config.layers * (2 + norms)}
