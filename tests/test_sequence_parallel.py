"""Megatron sequence parallelism (`partition --sp`) through real rank processes.

Between the tensor-parallel blocks (residual adds, norms) each tp rank holds a chunk of the tokens: the
row-parallel outputs are reduce-scattered along the tokens instead of all-reduced, and an all-gather
along them feeds each column-parallel block and the lm_head. The token count is padded to a multiple of
tp, so prompts whose length tp does not divide, and one-token decode steps after a KV cache, must give the
original's logits and present cache (verify's float32 tolerances, 1e-4), on several exporters' models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from llmir_onnx.errors import LlmirError
from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CLI = [sys.executable, "-m", "llmir_onnx.cli.main"]


def _partition(name: str, out: Path, tp: int, pp: int = 1) -> dict:
    from llmir_onnx.api import partition_to_dir

    partition_to_dir(MODELS / name / "model.onnx", out, tp=tp, pp=pp, sequence_parallel=True)
    return json.loads((out / "manifest.json").read_text())


def _verify(name: str, plan: Path, sizes: list[tuple[int, int]]) -> None:
    """Each (new tokens, past tokens) in one job: the plan's logits and present cache against the original's."""
    from llmir_onnx.runtime.verify import verify_plan_cases

    model = MODELS / name / "model.onnx"
    cases = [model_past_feeds(model, FeedSizes(new_tokens=new, past_tokens=past)) for new, past in sizes]
    for (new_tokens, past_tokens), (_, rows) in zip(sizes, verify_plan_cases(plan, cases, model_path=model,
                                                                              timeout_s=180), strict=True):
        names = {row.name for row in rows}
        assert "logits" in names and any(n.startswith("present") for n in names), names
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"{name} --sp, {new_tokens} new tokens after {past_tokens}: " + "; ".join(bad)


def _collectives(plan: Path, rank: int) -> Counter[str]:
    model = onnx.load(str(plan / f"rank{rank}.onnx"), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node if node.domain == "ai.llmir")


# (model, tp, pp): LLaMA-style models of four exporters (torch legacy, torch dynamo, optimum Qwen3 with
# per-head q/k norms, onnxruntime-genai with SkipSimplifiedLayerNormalization and GroupQueryAttention), and
# GPT-2, whose row-parallel Gemm outputs are [batch * tokens, hidden]: reduced after the Reshape back.
LAYOUTS = [
    ("llama-gqa-torch-legacy", 2, 1),
    ("llama-gqa-torch-legacy", 4, 1),
    ("llama-gqa-torch-dynamo", 2, 1),
    ("qwen3-optimum", 2, 1),
    ("qwen3-optimum", 4, 1),
    ("llama-gqa-genai", 2, 1),
    ("llama-gqa-genai", 4, 1),
    ("llama-gqa-torch-legacy", 2, 2),
    ("llama-gqa-genai", 2, 2),
    ("gpt2-torch-dynamo", 2, 1),
    ("gpt2-optimum", 4, 1),
]


@pytest.mark.parametrize(("name", "tp", "pp"), LAYOUTS, ids=[f"{n}-tp{t}-pp{p}" for n, t, p in LAYOUTS])
def test_sequence_parallel_plan_matches_the_original(name: str, tp: int, pp: int, tmp_path: Path) -> None:
    plan = tmp_path / "plan"
    manifest = _partition(name, plan, tp, pp)
    assert manifest["mesh"]["sp"] is True and manifest["options"]["sequence_parallel"] is True
    # Every row-parallel reduction became a ReduceScatter along the tokens (none left as an AllReduce),
    # and the AllGathers bring the tokens back for the column-parallel blocks and the lm_head.
    for rank in range(tp * pp):
        found = _collectives(plan, rank)
        assert found["ReduceScatter"] >= 1 and found["AllGather"] >= 1 and found["AllReduce"] == 0, (rank, found)
    # Lengths tp divides, lengths it does not (padded), a one-token decode step, a prompt without a cache.
    _verify(name, plan, sorted({(tp, 3), (tp + 1, 3), (1, 3), (2 * tp - 1, 0)}))


def test_sequence_parallel_generate_equals_original_greedy(tmp_path: Path) -> None:
    """Prefill of a 5-token prompt (not a multiple of tp 2), then 1-token decode steps over the KV cache."""
    from llmir_onnx.runtime.generate import recompute_greedy

    plan = tmp_path / "plan"
    _partition("llama-gqa-torch-legacy", plan, 2)
    prompt = [[5, 17, 42, 99, 3]]
    saved = tmp_path / "tokens.json"
    result = subprocess.run(
        [*CLI, "generate", str(plan), "--prompt-ids", ",".join(map(str, prompt[0])), "--max-new-tokens", "10",
         "--check", "--save-tokens", str(saved)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "equal the original model's greedy tokens" in result.stderr
    tokens = json.loads(saved.read_text())
    expected = recompute_greedy(MODELS / "llama-gqa-torch-legacy" / "model.onnx", np.array(prompt), 10).tokens
    assert tokens["tokens"] == expected.tolist() and len(expected[0]) == 10


def test_sequence_parallel_padding_is_in_the_graph(tmp_path: Path) -> None:
    """The chunk length is computed from the token count in the graph (Pad before each ReduceScatter, a
    Slice after each AllGather), not fixed at partition time: the same plan serves every length above."""
    plan = tmp_path / "plan"
    _partition("qwen3-optimum", plan, 2)
    model = onnx.load(str(plan / "rank1.onnx"), load_external_data=False)
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scatters = [n for n in model.graph.node if n.op_type == "ReduceScatter"]
    gathers = [n for n in model.graph.node if n.op_type == "AllGather"]
    assert scatters and gathers
    assert all(producers[n.input[0]].op_type == "Pad" for n in scatters)
    assert all([c.op_type for c in consumers[n.output[0]]] == ["Slice"] for n in gathers)
    axis = {a.name: a.i for n in scatters for a in n.attribute if a.name == "axis"}
    assert axis == {"axis": 1}  # the tokens of [batch, tokens, hidden]


def _mlp_model(folder: Path, residual: bool) -> Path:
    """x [batch, tokens, 8] -> up (column-parallel) -> Relu -> down (row-parallel) -> [x + ...] -> a second
    such MLP -> Softmax over the tokens, which mixes them: no per-token work a token chunk can do."""
    rng = np.random.default_rng(0)
    f = onnx.TensorProto.FLOAT
    inits, nodes, hidden = [], [], "x"
    for layer in range(2 if residual else 1):
        up, down = f"layers.{layer}.up.weight", f"layers.{layer}.down.weight"
        inits += [onnx.numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), up),
                  onnx.numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), down)]  # fmt: skip
        scope = f"/layers.{layer}/mlp"
        nodes += [oh.make_node("MatMul", [hidden, up], [f"h{layer}"], name=f"{scope}/up/MatMul"),
                  oh.make_node("Relu", [f"h{layer}"], [f"a{layer}"], name=f"{scope}/Relu"),
                  oh.make_node("MatMul", [f"a{layer}", down], [f"y{layer}"], name=f"{scope}/down/MatMul")]  # fmt: skip
        if residual and layer == 0:
            nodes.append(oh.make_node("Add", [hidden, "y0"], ["r0"], name="/layers.0/Add"))
            hidden = "r0"
        else:
            hidden = f"y{layer}"
    nodes.append(oh.make_node("Softmax", [hidden], ["out"], axis=1, name="/mix/Softmax"))
    dims = ["batch_size", "sequence_length", 8]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", f, dims)], [oh.make_tensor_value_info("out", f, dims)], inits
    )
    path = folder / "model.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10), str(path))
    return path


@pytest.mark.parametrize(
    ("residual", "message"),
    [
        (False, r"^--sp cannot split the tokens over 2 ranks in this model: the row-parallel output 'y0' is "
                r"reduced for node /mix/Softmax \(Softmax\), and Softmax is not per-token work"),
        (True, r"^--sp cannot split the tokens of the row-parallel output 'y1': its consumer /mix/Softmax "
               r"\(Softmax\) is not per-token work .* so it would stay all-reduced; partition without --sp$"),
    ],
    ids=["no-per-token-work", "one-block-not-covered"],
)  # fmt: skip
def test_sequence_parallel_refused_where_a_reduction_feeds_token_mixing(
    residual: bool, message: str, tmp_path: Path
) -> None:
    """No silent fallback: a row-parallel output whose consumer mixes the tokens (a Softmax over them) is
    refused in one line naming it, whether no block could be split or only this one could not."""
    from llmir_onnx.api import partition_to_dir

    out = tmp_path / "plan"
    with pytest.raises(LlmirError, match=message):
        partition_to_dir(_mlp_model(tmp_path, residual), out, tp=2, sequence_parallel=True)
    assert not out.exists()


def test_sequence_parallel_needs_tensor_parallelism(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "partition", str(MODELS / "qwen3-optimum" / "model.onnx"), "--sp", "-o", str(tmp_path / "p")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "llmir-onnx: error: --sp splits the tokens over the tp group; it needs --tp 2 or more, got --tp 1"
    ]
