"""`llmir-onnx generate` through real rank processes, real onnxruntime sessions and the ai.llmir library.

Plans of the committed small LLaMA-GQA export (tp 2) and of a tiny synthetic model with a long
position table (long enough generations to interrupt) are written once per module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from job_helpers import MARK_ENV, held_generation, long_generation_plan, marked_processes, seconds_until_gone

from llmir_onnx.api import partition_to_dir
from llmir_onnx.errors import GenerationError
from llmir_onnx.plan.timeline import read_timeline
from llmir_onnx.runtime import generate as generate_module
from llmir_onnx.runtime.generate import generate, recompute_greedy
from llmir_onnx.runtime.generate_job import GenerateRequest, generate_plan, spawn_generation
from llmir_onnx.runtime.job import FAULT_ENV
from llmir_onnx.runtime.sampling import Sampler, SamplingConfig
from llmir_onnx.runtime.session import OriginalSession, RankSession

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = ROOT / "models" / "llama-gqa-torch-legacy" / "model.onnx"
CLI = [sys.executable, "-m", "llmir_onnx.cli.main"]
PROMPT = [[5, 17, 42, 99, 3, 250]]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tp2_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plan = tmp_path_factory.mktemp("runtime") / "tp2"
    partition_to_dir(SMALL_MODEL, plan, tp=2)
    return plan


@pytest.fixture(scope="module")
def long_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tp 2 plan of a tiny synthetic LLaMA with 4096 positions: a generation that lasts seconds."""
    return long_generation_plan(tmp_path_factory.mktemp("runtime-long"), tp=2)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def _prompt_arg(rows: list[list[int]]) -> str:
    return ";".join(",".join(map(str, row)) for row in rows)


def test_tp2_generate_equals_original_greedy(tp2_plan: Path, tmp_path: Path) -> None:
    saved = tmp_path / "tokens.json"
    result = _cli("generate", str(tp2_plan), "--prompt-ids", _prompt_arg(PROMPT), "--max-new-tokens", "12",
                  "--check", "--save-tokens", str(saved))
    assert result.returncode == 0, result.stderr
    assert "equal the original model's greedy tokens" in result.stderr
    tokens = json.loads(saved.read_text())
    # The reference is recomputed here, independently of the CLI's own --check.
    expected = recompute_greedy(SMALL_MODEL, np.array(PROMPT), 12).tokens.tolist()
    assert tokens["tokens"] == expected == tokens["reference_tokens"]
    assert len(expected[0]) == 12
    # Streamed on rank 0 as produced: the ids appear on stdout.
    assert result.stdout.split() == [str(token) for token in expected[0]]


def test_generate_plan_from_python_equals_original_greedy(tp2_plan: Path, tmp_path: Path) -> None:
    """The entry point behind `generate`, called from Python: its ranks are processes, rank 0's outcome
    comes back with the original's greedy tokens beside it, and the timeline holds every rank's run calls."""
    timeline = tmp_path / "timeline.json"
    outcome = generate_plan(tp2_plan, np.array(PROMPT), 6, check=True, timeline=timeline)  # numpy rows too
    assert outcome is not None
    expected = recompute_greedy(SMALL_MODEL, np.array(PROMPT), 6).tokens.tolist()
    assert outcome.report.tokens == outcome.reference_tokens == expected
    assert outcome.difference is None and outcome.world_size == 2
    assert outcome.record()["tokens"] == expected
    assert {event.rank for event in read_timeline(timeline)} == {0, 1}
    with pytest.raises(GenerationError, match="exceeds the batch of 1 prompt"):
        generate_plan(tp2_plan, PROMPT, 6, micro_batches=2)


def test_tp2_batched_micro_batches_equal_original(tp2_plan: Path) -> None:
    prompts = np.random.default_rng(0).integers(0, 512, size=(4, 5))
    request = GenerateRequest(str(tp2_plan), prompts.tolist(), 6, micro_batches=2, stream=False)
    reports = spawn_generation(request, 2)
    assert reports[0].tokens == recompute_greedy(SMALL_MODEL, prompts, 6).tokens.tolist()


def test_seeded_sampling_same_on_every_rank_and_reproducible(tp2_plan: Path) -> None:
    def run(seed: int) -> list[list[list[int]]]:
        request = GenerateRequest(str(tp2_plan), PROMPT, 16, temperature=1.0, top_k=100, top_p=0.95, seed=seed,
                                  stream=False)
        return [report.tokens for report in spawn_generation(request, 2)]

    first, again, other = run(11), run(11), run(12)
    assert first[0] == first[1]  # both ranks continued with the same tokens
    assert first == again
    assert first[0] != other[0]
    greedy = recompute_greedy(SMALL_MODEL, np.array(PROMPT), 16).tokens.tolist()
    assert first[0] != greedy  # it really sampled


def test_killed_rank_ends_every_rank_at_once(tp2_plan: Path) -> None:
    """With the default communication timeout (300 s): the survivors do not wait for it."""
    mark = f"kill-{os.getpid()}-{time.time()}"
    env = {key: value for key, value in os.environ.items() if key != "LLMIR_COMM_TIMEOUT_S"}
    result = subprocess.run([*CLI, "generate", str(tp2_plan), "--prompt-ids", _prompt_arg(PROMPT),
                             "--max-new-tokens", "40"], capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**env, FAULT_ENV: "1:4", MARK_ENV: mark}, cwd=ROOT)
    assert result.returncode != 0
    error_line = result.stderr.strip().splitlines()[-1]
    assert error_line.startswith("llmir-onnx: error: generation failed: rank 1 died: the rank process")
    assert "killed by SIGKILL" in error_line and "rank 0 did not finish" in error_line
    assert seconds_until_gone(mark, TIMEOUT_S) < TIMEOUT_S


def test_ctrl_c_stops_every_rank(long_plan: Path) -> None:
    mark = f"ctrl-c-{os.getpid()}-{time.time()}"
    with held_generation(long_plan, {**os.environ, MARK_ENV: mark}, held_rank=1) as process:
        ranks = [pid for pid in marked_processes(mark) if pid != process.pid]
        assert len(ranks) >= 5, f"mpiexec, 2 supervisors and 2 ranks expected, found {ranks}"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode != 0
        assert "interrupted: every rank was stopped" in stderr
        assert seconds_until_gone(mark, TIMEOUT_S) < TIMEOUT_S


def test_under_mpiexec_every_process_runs_its_rank(tp2_plan: Path) -> None:
    from llmir_onnx.runtime.job import mpiexec_path

    result = subprocess.run(
        [mpiexec_path(), "-n", "2", *CLI, "generate", str(tp2_plan), "--prompt-ids", _prompt_arg(PROMPT),
         "--max-new-tokens", "5", "--check"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("equal the original model's greedy tokens") == 1  # rank 0 reports


def test_rank_session_speaks_original_names(tmp_path: Path) -> None:
    """tp 1 plan in this process (world 1): same logits and cache as the original, by original names."""
    plan = tmp_path / "tp1"
    partition_to_dir(SMALL_MODEL, plan, tp=1)
    rank = RankSession(plan, intra_op_num_threads=1)
    original = OriginalSession(SMALL_MODEL, intra_op_num_threads=1)
    assert sorted(rank.input_names) == sorted(original.input_names)
    prompt = np.array(PROMPT)
    ours = generate(rank, prompt, 8, Sampler(SamplingConfig()))
    theirs = generate(original, prompt, 8, Sampler(SamplingConfig()))
    assert ours.tokens.tolist() == theirs.tokens.tolist()
    with pytest.raises(GenerationError, match="needs inputs"):
        rank.run({"input_ids": prompt})


def test_cuda_device_is_refused_clearly_without_cuda(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the GPU smoke script covers it")
    with pytest.raises(GenerationError, match="onnxruntime-gpu"):
        OriginalSession(SMALL_MODEL, device="cuda")


def test_rank_session_cuda_loads_the_cuda_library_then_needs_the_cuda_provider(tp2_plan: Path) -> None:
    """What can run here of the CUDA path: the CUDA/NCCL library variant loads and registers, and a
    CPU-only onnxruntime is refused with the fix named (a subprocess: one library variant per process)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the GPU smoke script covers it")
    plan = tp2_plan.parent / "tp1-cuda"
    if not plan.exists():
        partition_to_dir(SMALL_MODEL, plan, tp=1)
    code = (
        "import sys\n"
        "from llmir_onnx.errors import GenerationError\n"
        "from llmir_onnx.runtime.session import RankSession\n"
        "try:\n"
        f"    RankSession({str(plan)!r}, device='cuda')\n"
        "except GenerationError as error:\n"
        "    from llmir_onnx.runtime.launch import setup_communication\n"
        "    print(setup_communication(cuda=True).library_path.name, '|', error)\n"
        "    sys.exit(0)\n"
        "sys.exit('no error')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("libllmir_ops_cuda.so |")
    assert "onnxruntime-gpu" in result.stdout


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)])
def test_pipeline_plan_with_micro_batches_equals_original(tmp_path: Path, tp: int, pp: int) -> None:
    """Stage ranks hand hidden states over by Send/Recv inside their graphs; only the last stage has
    logits, so the token broadcast is what feeds the first stage."""
    plan = tmp_path / f"tp{tp}pp{pp}"
    partition_to_dir(SMALL_MODEL, plan, tp=tp, pp=pp)
    manifest_ranks = json.loads((plan / "manifest.json").read_text())["ranks"]
    with_logits = [
        entry["rank"] for entry in manifest_ranks if any(b["original"] == "logits" for b in entry["outputs"])
    ]
    assert with_logits == list(range(tp * (pp - 1), tp * pp))  # the last stage only
    prompts = np.random.default_rng(1).integers(0, 512, size=(4, 5))
    expected = recompute_greedy(SMALL_MODEL, prompts, 6).tokens.tolist()
    for micro_batches in (1, 4):
        request = GenerateRequest(str(plan), prompts.tolist(), 6, micro_batches=micro_batches, stream=False)
        reports = spawn_generation(request, tp * pp)
        assert [report.tokens for report in reports] == [expected] * (tp * pp)


# One plan per KV cache layout of the bundled exports against the no-cache recompute (the legacy
# export's flat [B, kv, S, D] cache: the tests above): optimum's and dynamo's flat caches, dynamo's
# opset-23 Attention op, the genai builder's GroupQueryAttention (no position_ids: positions come from
# the mask), and llama-kv2 (2 KV heads) at tp 4 x pp 2, where each KV head and its cache is replicated
# on 2 ranks of a stage, with 2 micro-batches; and dynamo's export without named dims at pp 2, where
# every cache has its own length symbol and each stage reads another layer's cache's shape (batch, past
# length): each stage must be fed its own layers' caches only, as generate feeds them.
KV_LAYOUT_PLANS = [
    ("llama-gqa-optimum", 2, 1),
    ("llama-gqa-torch-dynamo", 2, 1),
    ("llama-gqa-torch-dynamo-opset23", 2, 1),
    ("llama-gqa-genai", 2, 1),
    ("llama-kv2-torch-legacy", 4, 2),
    ("llama-kv2-genai", 4, 2),
    ("llama-gqa-torch-dynamo-autodims", 1, 2),
]
# The recompute's picks for these prompts win by a top-2 logit margin of 5.9e-3 or more (llama-kv2;
# 6.9e-2 for llama-gqa), while the original's cached and uncached last-position logits differ by at
# most 1.1e-5 (float32 rounding, measured along these sequences): no pick can flip between the two.
MIN_MARGIN = 1e-3


@pytest.mark.parametrize(("name", "tp", "pp"), KV_LAYOUT_PLANS)
def test_plan_greedy_equals_no_cache_recompute(tmp_path: Path, name: str, tp: int, pp: int) -> None:
    model = ROOT / "models" / name / "model.onnx"
    plan = tmp_path / "plan"
    partition_to_dir(model, plan, tp=tp, pp=pp)
    prompts = np.random.default_rng(2).integers(0, 512, size=(2, 5))
    expected = recompute_greedy(model, prompts, 10)
    assert expected.margins.min() > MIN_MARGIN
    request = GenerateRequest(str(plan), prompts.tolist(), 10, micro_batches=pp, stream=False)
    reports = spawn_generation(request, tp * pp)
    assert [report.tokens for report in reports] == [expected.tokens.tolist()] * (tp * pp)


def test_vocab_parallel_plan_generates_the_original_tokens(tmp_path: Path) -> None:
    """--vocab-parallel shards the lm_head; the plan AllGathers the logits inside the rank graphs, so every
    rank holds them whole and generate samples as with any plan (issue 16: no replicated lm_head)."""
    plan = tmp_path / "plan"
    manifest = partition_to_dir(SMALL_MODEL, plan, tp=2, vocab_parallel=True)
    assert manifest.options["vocab_parallel"] is True
    prompts = np.random.default_rng(3).integers(0, 512, size=(2, 5))
    expected = recompute_greedy(SMALL_MODEL, prompts, 10)
    assert expected.margins.min() > MIN_MARGIN
    reports = spawn_generation(GenerateRequest(str(plan), prompts.tolist(), 10, stream=False), 2)
    assert [report.tokens for report in reports] == [expected.tokens.tolist()] * 2


def test_recompute_does_not_share_a_cache_loop_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache bookkeeping bug (decode positions that forget the past length) changes what the KV-cache
    loop generates, on a plan and on the original alike; the recompute, which never has a past, stays
    right and points at the first wrong token."""
    original = OriginalSession(SMALL_MODEL, intra_op_num_threads=1)
    prompt = np.array(PROMPT)
    right = generate(original, prompt, 10, Sampler(SamplingConfig())).tokens.tolist()
    step_feeds = generate_module._step_feeds

    def positions_forget_the_past(session: OriginalSession, ids: np.ndarray, past_length: int,
                                  past: dict[str, np.ndarray]) -> dict[str, object]:
        feeds = step_feeds(session, ids, past_length, past)
        feeds[generate_module.POSITION_IDS] = step_feeds(session, ids, 0, past)[generate_module.POSITION_IDS]
        return feeds

    monkeypatch.setattr(generate_module, "_step_feeds", positions_forget_the_past)
    wrong = generate(original, prompt, 10, Sampler(SamplingConfig())).tokens.tolist()
    recomputed = recompute_greedy(SMALL_MODEL, prompt, 10)
    assert wrong != right
    assert recomputed.tokens.tolist() == right
    difference = recomputed.first_difference(wrong)
    assert difference is not None and difference.startswith("row 0 step ")


def test_check_names_the_first_wrong_token(tp2_plan: Path) -> None:
    """--check against another model (same vocabulary, other weights): exit 1, one line naming the row,
    the step, both tokens and the original's margin there."""
    other = ROOT / "models" / "qwen3-torch-legacy" / "model.onnx"
    result = _cli("generate", str(tp2_plan), "--prompt-ids", _prompt_arg(PROMPT), "--max-new-tokens", "4",
                  "--check", "--model", str(other))
    assert result.returncode == 1
    error_line = result.stderr.strip().splitlines()[-1]
    assert error_line.startswith("llmir-onnx: error: the plan's tokens differ from the original model's greedy")
    assert "row 0 step 0: the plan chose " in error_line and "top-2 logit margin there is" in error_line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1,2", "--top-k", "5"], "need --temperature > 0"),
        (["--prompt-ids", "1,2", "--micro-batches", "2"], "exceeds the batch"),
        (["--prompt-ids", "1,2;3"], "same number of tokens"),
        (["--prompt", "hello"], "--prompt needs --tokenizer"),
        (["--prompt-ids", "1,x"], "not a comma-separated list"),
        (["--prompt-ids", "1,2", "--check", "--model", "no/such/model.onnx"], "pass its path with --model"),
    ],
)
def test_bad_generate_options_fail_before_any_rank_starts(tp2_plan: Path, args: list[str], message: str) -> None:
    result = _cli("generate", str(tp2_plan), *args)
    assert result.returncode == 2
    assert result.stderr.startswith("llmir-onnx: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
