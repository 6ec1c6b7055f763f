"""Context parallelism (`partition --cp C`) through real rank processes.

The prompt's tokens are split over a cp mesh axis: each cp rank computes the projections, norms, MLP and
the attention of its chunk of the queries; keys and values are all-gathered over the cp group where they
meet the past cache, and the logits at the output. Prompts whose length cp does not divide are padded,
and a one-token decode step after a cache leaves the other cp ranks only padding: every case must give
the original's logits and present cache (verify's float32 tolerances), with tp and pp too, on a torch
legacy (TorchScript) and a torch dynamo export.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from llmir_onnx.errors import LlmirError
from llmir_onnx.plan.manifest import Manifest
from llmir_onnx.runtime.feeds import FeedSizes, model_past_feeds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CLI = [sys.executable, "-m", "llmir_onnx.cli.main"]
TIMEOUT_S = 240

# (new tokens, past tokens, batch): 4 divides cp 2 and 4, 5 neither, 3 leaves a cp 4 rank only padding,
# a decode step after a cache (rank 0 holds the token), a batch of 2 after a cache.
CASES = [(4, 0, 1), (5, 0, 1), (3, 0, 1), (1, 3, 1), (6, 2, 2)]

# (model, tp, cp, pp)
LAYOUTS = [
    ("llama-gqa-torch-legacy", 1, 2, 1),
    ("llama-gqa-torch-legacy", 1, 4, 1),
    ("llama-gqa-torch-legacy", 2, 2, 1),
    ("llama-gqa-torch-legacy", 1, 2, 2),
    ("llama-gqa-torch-legacy", 2, 2, 2),
    ("llama-gqa-torch-dynamo", 1, 2, 1),
    ("llama-gqa-torch-dynamo", 1, 4, 1),
    ("llama-gqa-torch-dynamo", 2, 2, 1),
    ("llama-gqa-torch-dynamo", 1, 2, 2),
    ("llama-gqa-torch-dynamo-opset23", 2, 2, 1),  # ONNX Attention and RotaryEmbedding, lowered (lower_attention.py)
    ("qwen3-optimum", 1, 2, 1),
    ("gpt2-torch-dynamo", 1, 2, 1),
]
# GPT-2's projections are Gemms on [batch*tokens, hidden] (no token axis): its norms run split and are
# gathered before each Gemm, its attention runs whole (correct, no gain: README says so).
FLATTENED_PROJECTIONS = {"gpt2-torch-dynamo"}


def _partition(name: str, out: Path, tp: int, cp: int, pp: int) -> dict:
    from llmir_onnx.api import partition_to_dir

    partition_to_dir(MODELS / name / "model.onnx", out, tp=tp, pp=pp, cp=cp)
    return json.loads((out / "manifest.json").read_text())


def _rank_model(plan: Path, rank: int) -> onnx.ModelProto:
    return onnx.load(str(plan / f"rank{rank}.onnx"), load_external_data=False)


def _cp_gathers(model: onnx.ModelProto) -> list[tuple[str, list[int]]]:
    """(input, group) of each AllGather made by the cp pass."""
    gathers = []
    for node in model.graph.node:
        if node.domain == "ai.llmir" and node.op_type == "AllGather" and node.name.startswith("llmir/cp/"):
            group = next(list(a.ints) for a in node.attribute if a.name == "group")
            gathers.append((node.input[0], group))
    return gathers


def _cp_rank_constant(model: onnx.ModelProto) -> int:
    (value,) = [
        int(onnx.numpy_helper.to_array(t).reshape(-1)[0]) for t in model.graph.initializer if "cp_rank" in t.name
    ]
    return value


@pytest.mark.parametrize(("name", "tp", "cp", "pp"), LAYOUTS, ids=[f"{n}-tp{t}-cp{c}-pp{p}" for n, t, c, p in LAYOUTS])
def test_context_parallel_plan_matches_the_original(name: str, tp: int, cp: int, pp: int, tmp_path: Path) -> None:
    from llmir_onnx.mesh import DeviceMesh, MeshCoords
    from llmir_onnx.runtime.verify import verify_plan_cases

    plan = tmp_path / "plan"
    manifest = _partition(name, plan, tp, cp, pp)
    mesh = DeviceMesh(pp=pp, cp=cp, tp=tp)
    assert manifest["mesh"]["cp"] == cp and manifest["mesh"]["world_size"] == tp * cp * pp
    assert manifest["mesh"]["groups"]["cp"] == [list(g) for g in mesh.groups("cp")]
    assert manifest["mesh"]["kv_cache"] == "replicated over cp"
    config = json.loads((MODELS / name / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    by_rank = {entry["rank"]: entry for entry in manifest["ranks"]}
    for rank in range(mesh.world_size):
        coords = mesh.coords(rank)
        model = _rank_model(plan, rank)
        gathers = _cp_gathers(model)
        # Every cp AllGather runs over this rank's cp group, and this rank's chunk offsets read its cp rank.
        assert gathers and all(group == list(mesh.group(rank, "cp")) for _, group in gathers), gathers
        assert _cp_rank_constant(model) == coords.cp
        # Attention stays split on the queries: a gather feeds only the keys/values (2 per layer) and the logits.
        stage_layers = by_rank[rank]["layers"]
        held = (stage_layers[1] - stage_layers[0]) if stage_layers else layers
        if held is not None and name not in FLATTENED_PROJECTIONS:
            last_stage = coords.pp == pp - 1
            assert len(gathers) == 2 * held + (1 if last_stage else 0), gathers
        # A cp rank holds its (pp, tp) rank's weights: the same data files, written once.
        first = by_rank[mesh.rank_of(MeshCoords(pp=coords.pp, cp=0, tp=coords.tp))]
        assert by_rank[rank]["data_files"] == first["data_files"]
    assert not [f for f in manifest["files"] if f.startswith("rank") and f.endswith(".onnx.data")]

    model_path = MODELS / name / "model.onnx"
    feeds = [
        model_past_feeds(model_path, FeedSizes(batch=batch, new_tokens=new, past_tokens=past))
        for new, past, batch in CASES
    ]
    results = verify_plan_cases(plan, feeds, model_path=model_path, timeout_s=TIMEOUT_S)
    for (new, past, batch), (_, rows) in zip(CASES, results, strict=True):
        names = {row.name for row in rows}
        assert "logits" in names and any(n.startswith("present") for n in names), names
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"{name} tp {tp} cp {cp} pp {pp}, batch {batch}, {new} new after {past}: " + "; ".join(bad)


def test_cli_cp_plan_generates_the_original_greedy_tokens(tmp_path: Path) -> None:
    """`partition --cp 2 --tp 2` writes tp x cp ranks; a prompt prefilled on them, then decoded, gives the
    original's greedy tokens (generate --check)."""
    plan = tmp_path / "plan"
    _partition_legacy_llama_cp2_tp2(plan)
    manifest = json.loads((plan / "manifest.json").read_text())
    assert manifest["options"]["cp"] == 2
    assert [tuple(entry["coords"].values()) for entry in manifest["ranks"]] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)
    ]
    _generate_check(plan)


def _partition_legacy_llama_cp2_tp2(plan: Path, *options: str) -> str:
    """`llmir-onnx partition` of the legacy LLaMA export at cp 2 x tp 2 (plus `options`) into `plan`; its stdout."""
    result = subprocess.run(
        [*CLI, "partition", str(MODELS / "llama-gqa-torch-legacy" / "model.onnx"), "-o", str(plan), "--cp", "2",
         "--tp", "2", *options],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _generate_check(plan: Path) -> None:
    """`llmir-onnx generate --check` on two 7-token prompts: the original model's greedy tokens."""
    result = subprocess.run(
        [*CLI, "generate", str(plan), "--prompt-ids", "1,2,3,4,5,6,7;9,8,7,6,5,4,3", "--max-new-tokens", "6",
         "--check"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "equal the original model's greedy tokens" in result.stderr


def test_cp_with_sp_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LlmirError, match="--cp 2 with --sp is not supported"):
        from llmir_onnx.api import partition_to_dir

        partition_to_dir(
            MODELS / "llama-gqa-torch-legacy" / "model.onnx", tmp_path / "plan", tp=2, cp=2, sequence_parallel=True
        )


def test_without_cp_copies_move_no_group() -> None:
    """A plan without --cp is written as before: the tp rank copies carry no group moves (their patch is the
    peers alone), and a moved copy on a cp 1 mesh moves nothing."""
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.mesh import DeviceMesh
    from llmir_onnx.partition import PartitionOptions, partition
    from llmir_onnx.plan.tp_rank_copy import TpRankCopy, moved_rank_copy

    result = partition(load_model(MODELS / "llama-gqa-torch-legacy" / "model.onnx"), PartitionOptions(tp=2))
    copy = result.ranks[1].model_or_copy
    assert isinstance(copy, TpRankCopy) and not copy.groups
    source = result.ranks[0].model
    moved = moved_rank_copy(source, DeviceMesh(tp=2), 1, copy.weights, dict(copy.initializer_tensors()))
    assert moved.groups and all(before == after for before, after in moved.groups.items())


def test_cp_rank_memory_plan_and_cost_match_hand_figures(tmp_path: Path) -> None:
    """The memory plan, cost model and traffic of a cp rank evaluate its graph at the chunk sizes.

    A synthetic LLaMA (hidden 64, 2 layers, 2 KV heads of 16, vocabulary 128, float32) at cp 2, tp 1 and
    --max-seq 101 (odd: c = ceil(101/2) = 51 tokens per rank, gathered to 102 before the padding is sliced
    off), on one device per host so the cp group spans 2 hosts (InfiniBand NDR: 50e9 B/s, 20 us):
    - prefill: 2 layers x (K, V) AllGathers of [1, 2, 102, 16] float32 = 13056 B, and the logits' of
      [1, 102, 128] = 52224 B: 104448 B; decode (c = 1, gathered to 2): 4 x 256 + 1024 = 2048 B;
    - each AllGather on the cp group's inter-host link: 20 us + (1/2) x bytes / 50e9;
    - the KV cache is replicated over cp: whole on each rank, 2 layers x 2 x [1, 2, 101, 16] float32 = 51712 B;
    - the largest collective buffer: the logits' gather, input [1, 51, 128] + output = 26112 + 52224 B.
    """
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.plan.devices import load_profile, uniform_cluster

    subprocess.run(
        [sys.executable, str(MODELS / "make_synthetic.py"), "--out", str(tmp_path / "model"), "--hidden", "64",
         "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "128",
         "--max-position", "256", "--dtype", "float32"],
        check=True, capture_output=True, timeout=TIMEOUT_S,
    )
    model = tmp_path / "model" / "model.onnx"
    cluster = uniform_cluster(load_profile("h100-sxm"), 2, devices_per_host=1)
    manifest = partition_to_dir(model, tmp_path / "cp2", tp=1, cp=2, max_seq=101, devices=cluster)
    whole = partition_to_dir(model, tmp_path / "cp1", tp=1, cp=1, max_seq=101)
    for rank in manifest.ranks:
        memory, cost = rank.memory, rank.cost
        assert memory is not None and cost is not None
        assert memory["kv_cache_bytes"] == 51712 == whole.ranks[0].memory["kv_cache_bytes"]  # type: ignore[index]
        assert memory["communication_bytes"] == 26112 + 52224
        (gathers,) = cost["collectives"]
        assert (gathers["op"], gathers["group"], gathers["count"]) == ("AllGather", [0, 1], 5)
        assert (gathers["prefill_bytes"], gathers["decode_bytes"]) == (4 * 13056 + 52224, 4 * 256 + 1024)
        assert gathers["prefill_s"] == pytest.approx(5 * 20e-6 + 0.5 * (4 * 13056 + 52224) / 50e9)
        assert gathers["decode_s"] == pytest.approx(5 * 20e-6 + 0.5 * 2048 / 50e9)
        assert cost["prefill"]["comm_bytes"] == 4 * 13056 + 52224
        assert cost["prefill"]["comm_s"] == pytest.approx(gathers["prefill_s"])
    # the per-token work runs on 51 of 101 tokens: the prefill's FLOPs about halve; decode is redone whole
    cp_cost, whole_cost = manifest.ranks[0].cost, whole.ranks[0].cost
    assert cp_cost is not None and whole_cost is not None
    assert 0.45 < cp_cost["prefill"]["flops"] / whole_cost["prefill"]["flops"] < 0.55
    assert cp_cost["decode"]["flops"] >= whole_cost["decode"]["flops"]


# --- the KV cache sharded along the sequence over cp (--cp-kv-cache sharded) ---------------------------

# Chains of (prompt tokens, batch): a prefill, then DECODE_STEPS one-token steps, each step's past being each
# rank's own present of the step before (verify's `chained`). 4 divides cp 2 and 4, 5 neither (cp 4: runs of
# 2, 2, 1, 0), 3 and 1 leave a rank with no token of the prompt (cp 4, cp 2), whose run then takes the
# decode steps (the last rank) or stays empty.
SHARDED_CHAINS = [(4, 1), (5, 2), (3, 1), (1, 2)]
DECODE_STEPS = 3

# (model, tp, cp, pp)
SHARDED_LAYOUTS = [
    ("llama-gqa-torch-legacy", 1, 2, 1),
    ("llama-gqa-torch-legacy", 1, 4, 1),
    ("llama-gqa-torch-legacy", 2, 2, 1),
    ("llama-gqa-torch-legacy", 1, 2, 2),
    ("llama-gqa-torch-dynamo", 1, 2, 1),
    ("llama-gqa-torch-dynamo", 2, 2, 2),
    ("llama-gqa-torch-dynamo-opset23", 1, 2, 1),
    ("qwen3-optimum", 1, 2, 1),
    ("qwen3-optimum", 1, 4, 1),
]


def _chained_cases(model_path: Path) -> list[tuple[int, int, int, dict]]:
    """(prompt, batch, step, feeds) of every chain: step 0 the prefill (an empty past), then the decode steps
    (their fed past only gives the grown length: verify continues each rank's own cache)."""
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.runtime.feeds import random_feeds

    model = load_model(model_path)
    cases = []
    for prompt, batch in SHARDED_CHAINS:
        for step in range(DECODE_STEPS + 1):
            new, past = (prompt, 0) if step == 0 else (1, prompt + step - 1)
            feeds = random_feeds(model, FeedSizes(batch=batch, new_tokens=new, past_tokens=past, seed=prompt + step))
            cases.append((prompt, batch, step, feeds))
    return cases


# The chains' longest sequence (a 5-token prompt and 3 decode steps): planned at this --max-seq, the blocks
# of ceil(8 / cp) tokens (4 at cp 2, 2 at cp 4) are crossed by prompts and by decode steps.
SHARDED_MAX_SEQ = max(prompt for prompt, _ in SHARDED_CHAINS) + DECODE_STEPS


def _partition_sharded(name: str, out: Path, tp: int, cp: int, pp: int, max_seq: int = SHARDED_MAX_SEQ) -> dict:
    from llmir_onnx.api import partition_to_dir

    partition_to_dir(MODELS / name / "model.onnx", out, tp=tp, pp=pp, cp=cp, cp_kv_cache="sharded", max_seq=max_seq)
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("name", "tp", "cp", "pp"), SHARDED_LAYOUTS, ids=[f"{n}-tp{t}-cp{c}-pp{p}" for n, t, c, p in SHARDED_LAYOUTS]
)
def test_sequence_sharded_cache_prefill_and_decode_match_the_original(
    name: str, tp: int, cp: int, pp: int, tmp_path: Path
) -> None:
    """A prefill, then 3 decode steps on the cache each cp rank holds: logits and the cp ranks' presents joined
    in cp-rank order equal the original's at every step, for prompts that cp divides and not, batch 1 and 2."""
    from llmir_onnx.runtime.verify import verify_plan_cases

    plan = tmp_path / "plan"
    manifest = _partition_sharded(name, plan, tp, cp, pp)
    assert manifest["mesh"]["kv_cache"] == "sharded over cp (sequence)"
    assert manifest["options"]["cp_kv_cache"] == "sharded"
    for rank in range(tp * cp * pp):
        model = _rank_model(plan, rank)
        # Each rank's past is its run: declared ceil(past / cp), and the softmax's max and sum combined over cp.
        pasts = [i for i in model.graph.input if i.name.startswith("past")]
        assert pasts and all(f"// {cp}" in i.type.tensor_type.shape.dim[2].dim_param for i in pasts)
        reductions = [next(a.s.decode() for a in n.attribute if a.name == "reduction") for n in model.graph.node
                      if n.op_type == "AllReduce" and n.name.startswith("llmir/cp/")]
        layers = len(pasts) // 2
        assert reductions.count("max") == layers and reductions.count("sum") == 2 * layers, reductions
    model_path = MODELS / name / "model.onnx"
    cases = _chained_cases(model_path)
    results = verify_plan_cases(plan, [feeds for *_, feeds in cases], model_path=model_path, timeout_s=TIMEOUT_S,
                                chained=True)
    for (prompt, batch, step, _), (outputs, rows) in zip(cases, results, strict=True):
        names = {row.name for row in rows}
        assert "logits" in names and any(n.startswith("present") for n in names), names
        present = next(array for n, array in outputs.items() if n.startswith("present"))
        assert present.shape[2] == prompt + step
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        where = f"{name} tp {tp} cp {cp} pp {pp}, batch {batch}, prompt {prompt}, step {step}"
        assert not bad, f"{where}: " + "; ".join(bad)


def test_sequence_sharded_cache_takes_a_whole_cache_split_into_runs(tmp_path: Path) -> None:
    """verify feeds a whole past cache split into the cp ranks' blocks (`cp_cache_runs`): --max-seq 9 at cp 4,
    blocks of 3 tokens."""
    from llmir_onnx.runtime.verify import verify_plan_cases

    plan = tmp_path / "plan"
    _partition_sharded("llama-gqa-torch-legacy", plan, 1, 4, 1, max_seq=9)
    model_path = MODELS / "llama-gqa-torch-legacy" / "model.onnx"
    # (new, past, batch): past runs 3, 3, 1, 0 (the new tokens to rank 2); 3, 2, 0, 0; 2, 0, 0, 0 (the new
    # tokens to ranks 0 and 1)
    cases = [(2, 7, 2), (1, 5, 1), (2, 2, 1)]
    feeds = [model_past_feeds(model_path, FeedSizes(batch=b, new_tokens=n, past_tokens=p)) for n, p, b in cases]
    for (new, past, batch), (_, rows) in zip(cases, verify_plan_cases(plan, feeds, model_path=model_path,
                                                                       timeout_s=TIMEOUT_S), strict=True):
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"batch {batch}, {new} new after {past}: " + "; ".join(bad)


def test_cp_runs_of_a_cache() -> None:
    """Rank r holds global positions [r*B, (r+1)*B), short or empty past the cache's end; a cache longer than
    the cp blocks together is refused."""
    from llmir_onnx.plan.manifest import cp_cache_runs

    assert cp_cache_runs(5, 4, 2) == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert cp_cache_runs(3, 4, 3) == [(0, 3), (3, 3), (3, 3), (3, 3)]
    assert cp_cache_runs(0, 2, 6) == [(0, 0), (0, 0)]
    assert cp_cache_runs(7, 2, 6) == [(0, 6), (6, 7)]
    assert cp_cache_runs(12, 2, 6) == [(0, 6), (6, 12)]
    with pytest.raises(LlmirError, match="a KV cache of 13 tokens does not fit a cache sharded over cp 2 in blocks "
                       "of 6 tokens"):
        cp_cache_runs(13, 2, 6)


def _decode_chain(model_path: Path, prompt: int, steps: int) -> list[dict]:
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.runtime.feeds import random_feeds

    model = load_model(model_path)
    return [
        random_feeds(model, FeedSizes(batch=1, new_tokens=prompt if step == 0 else 1,
                                      past_tokens=0 if step == 0 else prompt + step - 1, seed=step))
        for step in range(steps + 1)
    ]


def test_sharded_cache_decode_crosses_a_block_boundary(tmp_path: Path) -> None:
    """--max-seq 12 at cp 2: blocks of 6 tokens. A 4-token prompt fills rank 0's block partly, decode steps at
    positions 4..7 fill it (4, 5) and then go to rank 1 (6, 7): every step equals the original, chained on the
    ranks' own presents; whole caches split by the block rule too (a step of 3 new tokens across the boundary),
    which only agree with the original when the rank models keep new tokens by the same rule."""
    from llmir_onnx.runtime.verify import verify_plan_cases

    plan = tmp_path / "plan"
    manifest = _partition_sharded("llama-gqa-torch-legacy", plan, 1, 2, 1, max_seq=12)
    assert manifest["mesh"]["kv_cache_block"] == 6
    model_path = MODELS / "llama-gqa-torch-legacy" / "model.onnx"
    chain = _decode_chain(model_path, 4, 4)
    results = verify_plan_cases(plan, chain, model_path=model_path, timeout_s=TIMEOUT_S, chained=True)
    for step, (outputs, rows) in enumerate(results):
        present = next(array for n, array in outputs.items() if n.startswith("present"))
        assert present.shape[2] == 4 + step
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"step {step}: " + "; ".join(bad)
    cases = [(3, 5), (1, 6), (1, 7), (6, 6)]  # (new, past): runs (5, 0), (6, 0), (6, 1), (6, 0)
    feeds = [model_past_feeds(model_path, FeedSizes(batch=1, new_tokens=n, past_tokens=p)) for n, p in cases]
    for (new, past), (_, rows) in zip(cases, verify_plan_cases(plan, feeds, model_path=model_path,
                                                               timeout_s=TIMEOUT_S), strict=True):
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"{new} new after {past}: " + "; ".join(bad)


def test_sharded_cache_refuses_a_step_past_max_seq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-seq 12 at cp 2: a decode step to position 12 (13 tokens in all) has no block to go to: the rank
    models fail on it, naming the check, instead of dropping its keys."""
    from llmir_onnx.runtime.verify import verify_plan_cases

    plan = tmp_path / "plan"
    _partition_sharded("llama-gqa-torch-legacy", plan, 1, 2, 1, max_seq=12)
    model_path = MODELS / "llama-gqa-torch-legacy" / "model.onnx"
    chain = _decode_chain(model_path, 10, 3)  # totals 10, 11, 12, then 13
    with pytest.raises(LlmirError, match=r"feed case 3 holds 13 tokens, more than the --max-seq 12 this plan's KV "
                       r"cache sharded over cp holds \(cp rank r keeps positions \[r\*B, \(r\+1\)\*B\), B = 6\); "
                       "partition with --max-seq 13 or more"):
        verify_plan_cases(plan, chain, model_path=model_path, timeout_s=TIMEOUT_S, chained=True)
    # A runtime that does not check: the rank models refuse the step themselves (a Reshape to -2 named for
    # the check), rather than drop the keys no block holds.
    manifest = Manifest.read(plan)
    monkeypatch.setattr(Manifest, "check_cache_tokens", lambda self, tokens, what: None)
    with pytest.raises(LlmirError, match="A dimension cannot be less than -1"):
        verify_plan_cases(plan, chain, model_path=model_path, timeout_s=TIMEOUT_S, chained=True)
    monkeypatch.undo()
    assert any(node.name == "llmir/cp/refuse_total_length_over_max_seq_12" for node in _rank_model(plan, 0).graph.node)
    assert manifest.mesh["kv_cache_block"] == 6
    # generate's last step runs on the prompt and every generated token but the last: 10 + 3 - 1 = 12 fits.
    from llmir_onnx.runtime.generate_job import generate_plan

    with pytest.raises(LlmirError, match="a 10-token prompt and --max-new-tokens 4 holds 13 tokens, more than the "
                       "--max-seq 12"):
        generate_plan(plan, [[1] * 10], max_new_tokens=4, model_path=model_path)
    assert len(generate_plan(plan, [[1] * 10], max_new_tokens=3, model_path=model_path).report.tokens[0]) == 3
    results = verify_plan_cases(plan, chain[:3], model_path=model_path, timeout_s=TIMEOUT_S, chained=True)
    assert all(row.ok for _, rows in results for row in rows)


def test_cli_sharded_cache_plan_generates_the_original_greedy_tokens(tmp_path: Path) -> None:
    """`partition --cp 2 --tp 2 --cp-kv-cache sharded`, then generate --check: the original's greedy tokens,
    every rank decoding on its own run of the cache."""
    plan = tmp_path / "plan"
    printed = _partition_legacy_llama_cp2_tp2(plan, "--cp-kv-cache", "sharded")
    block = Manifest.read(plan).cp_cache_block
    assert f"cp rank r holds KV cache positions [r*{block}, (r+1)*{block})" in printed, printed
    _generate_check(plan)


def test_sharded_cache_memory_is_one_cp_th_of_the_replicated(tmp_path: Path) -> None:
    """kv_cache_bytes of a sharded cache: each cp rank's block, B = ceil(max_seq / cp) tokens, the most any
    rank holds whatever the prompt and generation lengths. LLaMA legacy: 2 layers x (K, V) x [1, 4, tokens, 16]
    float32 = 2 * 2 * 4 * 16 * 4 = 1024 B per token; --max-seq 101: cp 2, ceil(101 / 2) = 51 tokens; cp 4,
    ceil(101 / 4) = 26 (the replicated plan: 101); --max-seq 100 at cp 2: 50 tokens, planned at 100 itself."""
    from llmir_onnx.api import partition_to_dir

    model = MODELS / "llama-gqa-torch-legacy" / "model.onnx"
    replicated = partition_to_dir(model, tmp_path / "r", tp=1, cp=2, max_seq=101)
    for cp, max_seq, tokens in ((2, 101, 51), (4, 101, 26), (2, 100, 50)):
        sharded = partition_to_dir(model, tmp_path / f"s{cp}-{max_seq}", tp=1, cp=cp, max_seq=max_seq,
                                   cp_kv_cache="sharded")
        for rank in sharded.ranks:
            assert rank.memory["kv_cache_bytes"] == tokens * 1024, (cp, max_seq, rank.memory)
            assert rank.memory["max_seq"] == max_seq
    assert all(rank.memory["kv_cache_bytes"] == 101 * 1024 for rank in replicated.ranks)


def test_sharded_cache_is_refused_without_cp_and_for_an_unknown_layout(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "partition", str(MODELS / "llama-gqa-torch-legacy" / "model.onnx"), "-o", str(tmp_path / "plan"),
         "--cp-kv-cache", "sharded"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--cp-kv-cache sharded needs --cp 2 or more" in lines[0], result.stderr
    with pytest.raises(LlmirError, match="--cp-kv-cache 'ring' is not one of replicated, sharded"):
        from llmir_onnx.api import partition_to_dir

        partition_to_dir(MODELS / "llama-gqa-torch-legacy" / "model.onnx", tmp_path / "p", tp=1, cp=2,
                         cp_kv_cache="ring")


def test_sharded_cache_refuses_a_cache_read_outside_attention(tmp_path: Path) -> None:
    """A sliding window trims the cache (a Slice of the present that is itself the present output): no rule
    keeps that on a rank's run, so the partition stops with one line naming the node and the fix."""
    result = subprocess.run(
        [*CLI, "partition", str(MODELS / "mistral-window-torch-legacy" / "model.onnx"), "-o", str(tmp_path / "plan"),
         "--cp", "2", "--cp-kv-cache", "sharded"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "--cp-kv-cache sharded: node /model/model/layers.0/self_attn/Slice_4 (Slice)" in lines[0]
    assert lines[0].endswith("partition with --cp-kv-cache replicated")
    assert not (tmp_path / "plan").exists()


# --- onnxruntime-genai exports: GroupQueryAttention lowered into standard ops (lower_attention.py) ---

GENAI = "llama-gqa-genai"  # 8 heads, 4 KV heads of 16: tp 2 splits whole KV heads
# (new tokens, past tokens, batch) as CASES; no several new tokens after a past at batch 2: onnxruntime's
# GroupQueryAttention refuses that batch (the original model cannot give the reference).
GENAI_CASES = [(4, 0, 1), (5, 0, 1), (1, 3, 1), (1, 4, 2), (3, 2, 1), (6, 0, 2)]


@pytest.fixture(scope="module")
def genai_cp2_tp2_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`llmir-onnx partition` of the genai export at cp 2 x tp 2, shared by the tests that read it."""
    plan = tmp_path_factory.mktemp("genai") / "plan"
    result = subprocess.run(
        [*CLI, "partition", str(MODELS / GENAI / "model.onnx"), "-o", str(plan), "--cp", "2", "--tp", "2"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return plan


def _assert_genai_cases_match(plan: Path, name: str = GENAI) -> None:
    from llmir_onnx.runtime.verify import verify_plan_cases

    model_path = MODELS / name / "model.onnx"
    feeds = [model_past_feeds(model_path, FeedSizes(batch=b, new_tokens=n, past_tokens=p)) for n, p, b in GENAI_CASES]
    for (new, past, batch), (_, rows) in zip(GENAI_CASES, verify_plan_cases(plan, feeds, model_path=model_path,
                                                                             timeout_s=TIMEOUT_S), strict=True):
        names = {row.name for row in rows}
        assert "logits" in names and any(n.startswith("present") for n in names), names
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"batch {batch}, {new} new after {past}: " + "; ".join(bad)


def test_genai_gqa_cp_plan_matches_the_original(genai_cp2_tp2_plan: Path) -> None:
    """The genai export at cp 2 x tp 2: no GroupQueryAttention left, the attention split on the queries (the
    only cp gathers are each layer's new keys and values and the logits), and logits and presents equal the
    original's for prompts cp divides and not, decode steps after a cache, batch 1 and 2."""
    manifest = json.loads((genai_cp2_tp2_plan / "manifest.json").read_text())
    assert manifest["mesh"]["cp"] == 2 and manifest["mesh"]["world_size"] == 4
    for rank in range(4):
        model = _rank_model(genai_cp2_tp2_plan, rank)
        assert not [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
        gathered = [name for name, _ in _cp_gathers(model)]
        assert len(gathered) == 2 * 2 + 1, gathered
        assert all(("k_rotated" in name or "v_bnsh" in name) for name in gathered[:-1]), gathered
    _assert_genai_cases_match(genai_cp2_tp2_plan)


def test_genai_gqa_cp_tp_pp_plan_matches_the_original(tmp_path: Path) -> None:
    """cp 2 x tp 2 x pp 2: the genai skip norm opens each layer with the previous one's down_proj output, so
    a stage receives a tp AllReduce of a token chunk, whose chunk shape must be declared for its Recv."""
    from llmir_onnx.api import partition_to_dir

    plan = tmp_path / "plan"
    partition_to_dir(MODELS / GENAI / "model.onnx", plan, tp=2, cp=2, pp=2)
    _assert_genai_cases_match(plan)


def test_genai_qwen3_head_norms_keep_the_token_split(tmp_path: Path) -> None:
    """Qwen3 by the genai builder normalizes q and k per head on [batch, tokens * heads, head_dim] (tokens and
    heads in one axis); the lowering moves that norm to [batch, tokens, heads, head_dim], so at cp 2 the q/k
    path stays split (the only cp gathers: each layer's new keys and values, the logits) and equals the
    original."""
    from llmir_onnx.api import partition_to_dir

    plan = tmp_path / "plan"
    partition_to_dir(MODELS / "qwen3-genai" / "model.onnx", plan, tp=1, cp=2)
    for rank in range(2):
        gathered = [name for name, _ in _cp_gathers(_rank_model(plan, rank))]
        assert len(gathered) == 2 * 2 + 1 and all(("k_rotated" in n or "v_bnsh" in n) for n in gathered[:-1]), gathered
    _assert_genai_cases_match(plan, "qwen3-genai")


def test_genai_gqa_cp_plan_generates_the_original_greedy_tokens(genai_cp2_tp2_plan: Path) -> None:
    """A 7-token prompt prefilled on the cp 2 x tp 2 ranks, then decoded: the original's greedy tokens."""
    _generate_check(genai_cp2_tp2_plan)


def test_genai_gqa_sequence_sharded_cache_prefill_and_decode_match_the_original(tmp_path: Path) -> None:
    """--cp-kv-cache sharded on the lowered attention (cp 2, tp 1): a prefill then decode steps, each on the
    cache each rank holds, equal the original at every step (the chains of the sharded-cache tests)."""
    from llmir_onnx.runtime.verify import verify_plan_cases

    plan = tmp_path / "plan"
    manifest = _partition_sharded(GENAI, plan, 1, 2, 1)
    assert manifest["mesh"]["kv_cache"] == "sharded over cp (sequence)"
    for rank in range(2):
        # the lowered Softmax is combined over the cache's shards: one max and two sums per layer
        reductions = [next(a.s.decode() for a in n.attribute if a.name == "reduction")
                      for n in _rank_model(plan, rank).graph.node
                      if n.op_type == "AllReduce" and n.name.startswith("llmir/cp/")]
        assert reductions.count("max") == 2 and reductions.count("sum") == 4, reductions
    model_path = MODELS / GENAI / "model.onnx"
    cases = _chained_cases(model_path)
    results = verify_plan_cases(plan, [feeds for *_, feeds in cases], model_path=model_path, timeout_s=TIMEOUT_S,
                                chained=True)
    for (prompt, batch, step, _), (outputs, rows) in zip(cases, results, strict=True):
        present = next(array for n, array in outputs.items() if n.startswith("present"))
        assert present.shape[2] == prompt + step
        bad = [f"{row.name}: max abs {row.max_abs_error:.3g}" for row in rows if not row.ok]
        assert not bad, f"batch {batch}, prompt {prompt}, step {step}: " + "; ".join(bad)


def test_genai_gqa_unsupported_attribute_is_refused(tmp_path: Path) -> None:
    """A GroupQueryAttention attribute the lowering does not take (softcap): one line naming the node, the
    attribute's value and the fix; no plan written."""
    proto = onnx.load(str(MODELS / GENAI / "model.onnx"), load_external_data=False)
    node = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
    next(a for a in node.attribute if a.name == "softcap").f = 50.0
    source = tmp_path / "model"
    source.mkdir()
    onnx.save(proto, str(source / "model.onnx"))
    shutil.copy(MODELS / GENAI / "model.onnx.data", source / "model.onnx.data")  # a link would be refused
    result = subprocess.run(
        [*CLI, "partition", str(source / "model.onnx"), "-o", str(tmp_path / "plan"), "--cp", "2"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith(
        "--cp cannot lower node /model/layers.0/attn/GroupQueryAttention (GroupQueryAttention) into standard ops: "
        "attribute softcap=50.0 is not supported (only its default 0.0); use --cp 1"
    ), lines[0]
    assert not (tmp_path / "plan").exists()
