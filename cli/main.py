"""`llmir-onnx`: partition ONNX LLMs for tensor/pipeline parallel inference, and check the result.

Every user-facing failure is an LlmirError, printed on one line on stderr with a non-zero exit;
a traceback only with --debug.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from llmir_onnx.errors import LlmirError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ONNX-to-ONNX partitioning for distributed LLM inference (tensor and pipeline parallel).",
)

P = ParamSpec("P")
R = TypeVar("R")


class _Process:
    """What the `llmir-onnx` process does once its command has returned (see `main`)."""

    # Set by a command whose work is all on disk when it returns (a written plan). Tearing the interpreter
    # down then frees every object the command made, one by one: after a partition, hundreds of thousands
    # of graph nodes, values and attributes, 0.3-2 s on the 2-core VM (docs/BENCHMARKS.md, "Partition of
    # multi-GB models"), for nothing.
    exit_without_teardown = False


DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]
NoCheckHashesOption = Annotated[
    bool,
    typer.Option(
        "--no-check-hashes",
        help="Skip the hashes (BLAKE3, or sha256 in older plans) of the plan's files (their paths and sizes are "
        "still checked); by default every file is hashed once before any rank starts.",
    ),
]
DimOption = Annotated[
    list[str] | None,
    typer.Option(
        "--dim",
        help="What a symbolic dim stands for, where the model's signature leaves it open: SYMBOL=batch|new|past|total "
        "(repeat for several).",
    ),
]
DevicesPerHostOption = Annotated[
    int | None,
    typer.Option(
        "--devices-per-host",
        min=1,
        help="Devices in one host for --devices counts and lists [default: the profile's usual size, 8 for GPUs].",
    ),
]


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn errors into one line on stderr and an exit code; tracebacks only with --debug."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        debug = bool(kwargs.get("debug"))
        try:
            return command(*args, **kwargs)
        except LlmirError as error:
            if debug:
                traceback.print_exc()
            typer.echo(f"llmir-onnx: error: {' '.join(str(error).split())}", err=True)
            raise typer.Exit(error.exit_code) from None
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            # Ctrl-C: one line and the shell's code for SIGINT (partition's staging folder is already gone).
            typer.echo("llmir-onnx: interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as error:
            if debug:
                traceback.print_exc()
            typer.echo(
                f"llmir-onnx: internal error: {type(error).__name__}: {' '.join(str(error).split())} "
                "(rerun with --debug for a traceback and report it)",
                err=True,
            )
            raise typer.Exit(3) from None

    return wrapper


@app.command()
@reports_errors
def partition(
    model: Annotated[Path, typer.Argument(help="The ONNX model to partition (external data beside it).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the rank models and manifest.json.")],
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel degree.")] = 1,
    pp: Annotated[int, typer.Option("--pp", min=1, help="Pipeline-parallel stages.")] = 1,
    cp: Annotated[
        int,
        typer.Option(
            "--cp",
            min=1,
            help="Context parallelism: split the prompt's tokens over this many ranks, attention included "
            "(world = tp x cp x pp; the KV cache stays whole on every cp rank unless --cp-kv-cache sharded).",
        ),
    ] = 1,
    cp_kv_cache: Annotated[
        str,
        typer.Option(
            "--cp-kv-cache",
            help="With --cp: 'replicated' (every cp rank holds the whole KV cache) or 'sharded' (cp rank r holds "
            "the cache's positions [r*B, (r+1)*B), B = ceil(max-seq / cp), at most B tokens; attention combines "
            "the shards with the log-sum-exp trick, so a decode step reads at most 1/cp of a full cache per rank).",
        ),
    ] = "replicated",
    vocab_parallel: Annotated[
        bool, typer.Option("--vocab-parallel", help="Shard the embedding and lm_head by vocabulary.")
    ] = False,
    sequence_parallel: Annotated[
        bool,
        typer.Option(
            "--sp",
            help="Sequence parallelism with --tp: norms and residual adds between the tp blocks run on a chunk "
            "of the tokens (ReduceScatter / AllGather along the tokens instead of AllReduce).",
        ),
    ] = False,
    replicate_unsupported: Annotated[
        bool,
        typer.Option("--replicate-unsupported", help="Replicate ops with no sharding rule instead of failing."),
    ] = False,
    allow_replicated: Annotated[
        bool,
        typer.Option("--allow-replicated", help="Write a tp > 1 plan even if it shards no weight (refused otherwise)."),
    ] = False,
    no_fold_shapes: Annotated[
        bool,
        typer.Option("--no-fold-shapes", help="Keep the exported shape-computation chains in the rank graphs "
                     "(by default they are rebuilt once from the inputs; for comparison)."),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace OUT even if it holds files that are not a plan's (they are deleted)."),
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="Device profile for costs: h100-sxm, a100-80g, cpu-here, or a JSON file.")
    ] = "h100-sxm",
    device_memory: Annotated[
        str | None, typer.Option("--device-memory", help="Fail unless every rank fits this, e.g. 80GiB.")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            "--devices",
            help="One device per rank (rank order = host-major): a count (4), a list such as 2xh100-sxm,2xa100-80g, "
            "or a JSON cluster file. Each rank's memory and cost use its own device; pipeline cuts balance each "
            "stage on its devices. Default: every rank a --device, no memory check unless --device-memory.",
        ),
    ] = None,
    devices_per_host: DevicesPerHostOption = None,
    tp_weights: Annotated[
        str | None,
        typer.Option(
            "--tp-weights",
            help="Split the heads unevenly in proportion to one weight per tp rank, e.g. 3,1 (rank 0 three times "
            "as fast). Default: from --devices when a tp group mixes profiles (memory bandwidth), else equal.",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Batch the memory plan is sized for.")] = 1,
    max_seq: Annotated[
        int | None,
        typer.Option("--max-seq", min=1, help="Sequence the plan is sized for [default: 2048 or the model's limit]."),
    ] = None,
    dims: DimOption = None,
    cuts: Annotated[
        str | None,
        typer.Option("--stage-cuts", help="Pipeline cuts as layer indices, e.g. '13,27' (default: cost-balanced)."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress on stderr.")] = False,
    show_progress: Annotated[
        bool, typer.Option("--progress", help="Progress on stderr even when it is not a terminal.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest (and the plan folder) as JSON instead of the table.")
    ] = False,
    ignore_annotations: Annotated[
        bool, typer.Option("--ignore-annotations", help="Do not read the model's IR v11 stage and sharding pins.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Write one ONNX model per rank (tp x pp) and a manifest into OUT."""
    from llmir_onnx.api import partition_to_dir
    from llmir_onnx.errors import PlanError
    from llmir_onnx.model_facts import parse_dim_hints
    from llmir_onnx.plan.devices import parse_devices, parse_tp_weights
    from llmir_onnx.plan.memory import format_bytes, parse_bytes
    from llmir_onnx.progress import Progress

    if quiet and show_progress:
        raise PlanError("--quiet and --progress ask for opposite things; pass one of them")
    memory_bytes = parse_bytes(device_memory) if device_memory is not None else None
    weights = parse_tp_weights(tp_weights, tp) if tp_weights is not None else None
    cluster = None
    if devices is not None:
        cluster = parse_devices(devices, device, devices_per_host=devices_per_host, memory_bytes=memory_bytes)
    manifest = partition_to_dir(
        model,
        out,
        tp=tp,
        pp=pp,
        vocab_parallel=vocab_parallel,
        sequence_parallel=sequence_parallel,
        cp=cp,
        cp_kv_cache=cp_kv_cache,
        replicate_unsupported=replicate_unsupported,
        allow_replicated=allow_replicated,
        fold_shapes=not no_fold_shapes,
        force=force,
        device=device,
        device_memory_bytes=memory_bytes,
        max_batch=max_batch,
        max_seq=max_seq,
        stage_cut_after_layer=_parse_cuts(cuts),
        dim_roles=parse_dim_hints(dims or []),
        progress=Progress(enabled=False if quiet else (True if show_progress else None)),
        ignore_annotations=ignore_annotations,
        tp_weights=weights,
        devices=cluster,
    )
    _Process.exit_without_teardown = True  # the plan is written, renamed into place and its files closed
    if as_json:
        _echo_json({"plan_dir": str(out.resolve()), **manifest.to_document()})
        return
    sp = " with sequence parallelism" if manifest.mesh.get("sp") else ""
    cp_size = int(manifest.mesh.get("cp", 1))
    typer.echo(f"wrote {len(manifest.ranks)} rank models ({_mesh_text(manifest.mesh)}{sp}) to {out}")
    if cp_size > 1 and manifest.cp_sharded_cache:
        typer.echo(f"  cp {cp_size}: the prompt's tokens split over the cp ranks; cp rank r holds KV cache positions "
                   f"[r*{manifest.cp_cache_block}, (r+1)*{manifest.cp_cache_block})")
    elif cp_size > 1:
        typer.echo(f"  cp {cp_size}: the prompt's tokens split over the cp ranks; the KV cache is whole on every one")
    shares, used_weights = manifest.mesh.get("tp_shares"), manifest.options.get("tp_weights")
    if shares or used_weights:
        source = "--tp-weights" if weights is not None else "the devices' memory bandwidth"
        split = ",".join(map(str, shares)) if shares else "even"
        ratio = ":".join(f"{w:.3g}" for w in used_weights or ())
        why = f"weights {ratio} from {source}" if used_weights else "as even as whole heads and KV groups allow"
        typer.echo(f"  heads per tp rank: {split} ({why})")
    limit = manifest.options.get("max_seq_limit")
    if max_seq is None and limit is not None:
        typer.echo(f"  max-seq {limit['tokens']}: the longest sequence the model takes ({limit['reason']})")
    cache_tokens = min(entry.memory.get("kv_cache_tokens", manifest.options["max_seq"]) for entry in manifest.ranks)
    # The plan's own length: a sequence-sharded cache is planned where the decode past splits evenly over cp.
    planned_seq = min(entry.memory.get("max_seq", manifest.options["max_seq"]) for entry in manifest.ranks)
    if cache_tokens < planned_seq:
        typer.echo(f"  KV cache: the model keeps at most {cache_tokens} past tokens (a sliding window); sized for that")
    typer.echo(
        f"  {'rank':<5}{'pp':>3}" + (f"{'cp':>4}" if cp_size > 1 else "")
        + f"{'tp':>4}  {'layers':<9}{'file':<13}{'weights':>12}{'kv cache':>12}{'activations':>13}"
        f"{'total':>12}{'prefill':>11}{'decode tok/s':>14}" + ("  device" if cluster is not None else "")
    )
    for entry in manifest.ranks:
        memory, cost = entry.memory, entry.cost
        layers = f"{entry.layers[0]}-{entry.layers[1] - 1}" if entry.layers else "all"
        typer.echo(
            f"  {entry.rank:<5}{entry.coords['pp']:>3}" + (f"{entry.coords['cp']:>4}" if cp_size > 1 else "")
            + f"{entry.coords['tp']:>4}  {layers:<9}{entry.file:<13}"
            f"{format_bytes(memory['weight_bytes']):>12}{format_bytes(memory['kv_cache_bytes']):>12}"
            f"{format_bytes(memory['activation_peak_bytes']):>13}{format_bytes(memory['total_bytes']):>12}"
            f"{cost['prefill']['total_s'] * 1e3:>9.2f}ms{cost['decode_tokens_per_s']:>14.1f}"
            + (f"  {cluster.devices[entry.rank].profile.name} on {cluster.devices[entry.rank].host}" if cluster else "")
        )
    typer.echo(
        f"  (memory at batch {manifest.options['max_batch']} x {planned_seq} tokens; "
        f"times predicted for {cluster.describe() if cluster is not None else device})"
    )


def _parse_cuts(text: str | None) -> tuple[int, ...] | None:
    from llmir_onnx.errors import PlanError

    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise PlanError(f"--stage-cuts {text!r}: write the last layer of each stage but the last, e.g. 13,27") from None


@app.command()
@reports_errors
def verify(
    plan: Annotated[Path, typer.Argument(help="A folder written by `llmir-onnx partition`.")],
    inputs: Annotated[
        Path | None, typer.Option("--inputs", help="NPZ of inputs keyed by the original model's input names.")
    ] = None,
    save_outputs: Annotated[
        Path | None, typer.Option("--save-outputs", help="Write the assembled outputs (original names) to this NPZ.")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="The original model, if it moved since partitioning.")
    ] = None,
    atol: Annotated[
        float | None,
        typer.Option(
            "--atol",
            help="Absolute tolerance [default: 1e-4; float16 (bfloat16) outputs 2e-3 (1.6e-2) "
            "x max(1, largest |value|)].",
        ),
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="Relative tolerance [default: 1e-4; float16 outputs 4e-3, bfloat16 3e-2]."),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of random inputs.")] = 1,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="New tokens in random inputs.")] = 4,
    past_tokens: Annotated[int, typer.Option("--past-tokens", min=0, help="Past KV length in random inputs.")] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    past_from: Annotated[
        str,
        typer.Option(
            "--past-from",
            help="Random inputs' past KV cache: 'model' (the original model's cache of random tokens, what a "
            "real decode step sees) or 'noise' (standard normal values).",
        ),
    ] = "model",
    no_check_hashes: NoCheckHashesOption = False,
    timeline: Annotated[
        Path | None,
        typer.Option("--timeline", help="Record every rank's run call to this file (for `report --timeline`)."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="cpu, or cuda: the ranks (device = local rank) and the original.")
    ] = "cpu",
    profile_dir: Annotated[
        Path | None,
        typer.Option("--profile-dir", help="Write each rank's onnxruntime profile (rankN_*.json) to this folder."),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Run every rank as a process, reassemble the outputs and compare with the original model."""
    import numpy as np

    from llmir_onnx.errors import InputModelError, atomic_output, check_output_path
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.plan.manifest import Manifest
    from llmir_onnx.runtime.feeds import PAST_FROM_MODEL, PAST_FROM_NOISE, FeedSizes, model_past_feeds, random_feeds
    from llmir_onnx.runtime.verify import format_comparisons, load_feeds, raise_if_mismatch, verify_plan

    if save_outputs is not None:
        check_output_path(save_outputs, "--save-outputs")
    if profile_dir is not None:
        check_output_path(profile_dir, "--profile-dir", folder=True)
    if past_from not in (PAST_FROM_MODEL, PAST_FROM_NOISE):
        raise InputModelError(f"--past-from {past_from!r} is not one of: {PAST_FROM_MODEL}, {PAST_FROM_NOISE}")
    if inputs is not None:
        feeds = load_feeds(inputs)
    else:
        source = model or Path(Manifest.read(plan).source["path"])
        sizes = FeedSizes(batch, new_tokens, past_tokens, seed)
        if past_from == PAST_FROM_MODEL:
            feeds = model_past_feeds(source, sizes)
        else:
            feeds = random_feeds(load_model(source), sizes)
    from llmir_onnx.runtime.session import DEVICE_CPU, DEVICE_CUDA

    if device not in (DEVICE_CPU, DEVICE_CUDA):
        raise InputModelError(f"--device {device!r}: use {DEVICE_CPU} or {DEVICE_CUDA}")
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    outputs, rows = verify_plan(plan, feeds, model_path=model, atol=atol, rtol=rtol, check_hashes=not no_check_hashes,
                                timeline=timeline, device=device, profile_dir=profile_dir)
    if not rows:  # a non-zero rank under an external launcher: rank 0 reports
        return
    if save_outputs is not None:
        with atomic_output(save_outputs) as temporary:  # savez adds .npz to a name without it, as before
            # mypy: an output named `allow_pickle` would bind savez's flag of that name; outputs are never so named.
            np.savez(temporary, **outputs)  # type: ignore[arg-type]
    typer.echo(format_comparisons(rows))
    raise_if_mismatch(rows)
    typer.echo(f"all {len(rows)} outputs match the original model")


def _parse_prompt_ids(values: list[str]) -> list[list[int]]:
    from llmir_onnx.errors import GenerationError

    rows = [row for value in values for row in value.split(";") if row.strip()]
    try:
        return [[int(token) for token in row.split(",") if token.strip()] for row in rows]
    except ValueError:
        raise GenerationError(
            f"--prompt-ids {values!r} is not a comma-separated list of integers (rows separated by ';')"
        ) from None


@app.command()
@reports_errors
def generate(
    plan: Annotated[Path, typer.Argument(help="A folder written by `llmir-onnx partition`.")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="Prompt text (repeat for a batch; needs --tokenizer).")
    ] = None,
    prompt_ids: Annotated[
        list[str] | None,
        typer.Option("--prompt-ids", help="Prompt token ids '1,2,3' (';' or repeating the option for a batch)."),
    ] = None,
    tokenizer_dir: Annotated[
        Path | None, typer.Option("--tokenizer", help="Folder with tokenizer.json (the `tokenizers` package).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (default).")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Keep the smallest set with this probability.")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the sampler (sampling only).")] = None,
    micro_batches: Annotated[
        int, typer.Option("--micro-batches", min=1, help="Pipeline micro-batches the batch is cut into.")
    ] = 1,
    device: Annotated[str, typer.Option("--device", help="cpu, or cuda (device = local rank).")] = "cpu",
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="onnxruntime intra-op threads per rank.")
    ] = None,
    stop_token_id: Annotated[
        list[int] | None, typer.Option("--stop-token-id", help="Stop when every sequence produced this id.")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at the tokenizer's EOS.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Also recompute the original model's greedy tokens without a KV cache "
                           "(the whole sequence at every step) and compare token by token.")
    ] = False,
    model: Annotated[
        Path | None, typer.Option("--model", help="The original model for --check, if it moved.")
    ] = None,
    save_tokens: Annotated[
        Path | None, typer.Option("--save-tokens", help="Write tokens and timings as JSON to this file.")
    ] = None,
    no_check_hashes: NoCheckHashesOption = False,
    timeline: Annotated[
        Path | None,
        typer.Option("--timeline", help="Record every rank's run calls to this file (for `report --timeline`)."),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Generate text with a plan: prefill, then decode with per-rank KV caches (starts its own ranks)."""
    import json

    from llmir_onnx.errors import GenerationError, atomic_output, check_output_path
    from llmir_onnx.runtime.generate_job import encode_prompts, eos_token_ids, generate_plan, load_tokenizer

    if save_tokens is not None:
        check_output_path(save_tokens, "--save-tokens")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if bool(prompt) == bool(prompt_ids):
        raise GenerationError("give exactly one of --prompt (with --tokenizer) and --prompt-ids")
    if prompt:
        if tokenizer is None:
            raise GenerationError("--prompt needs --tokenizer DIR (a folder with tokenizer.json), or use --prompt-ids")
        rows = encode_prompts(tokenizer, prompt)
    else:
        rows = _parse_prompt_ids(prompt_ids or [])
    stop_ids = list(stop_token_id or [])
    if not stop_ids and not ignore_eos and tokenizer is not None and tokenizer_dir is not None:
        stop_ids = eos_token_ids(tokenizer, tokenizer_dir)
    single_prompt = prompt[0] if prompt and len(rows) == 1 else None
    outcome = generate_plan(
        plan, rows, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        micro_batches=micro_batches, stop_token_ids=stop_ids, device=device, intra_op_num_threads=threads,
        tokenizer_dir=tokenizer_dir, stream=True, check=check, model_path=model, check_hashes=not no_check_hashes,
        timeline=timeline,
        # The prompt text, before rank 0 streams the text that follows it.
        on_start=(lambda: typer.echo(single_prompt, nl=False)) if single_prompt is not None else None,
    )
    if outcome is None:  # a non-zero rank under an external launcher: rank 0 reports
        return
    if len(rows) > 1:
        for index, tokens in enumerate(outcome.report.tokens):
            text = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens))
            typer.echo(f"[{index}] {text}")
    typer.echo(f"llmir-onnx: {outcome.report.summary()}", err=True)
    if save_tokens is not None:
        with atomic_output(save_tokens) as temporary:
            temporary.write_text(json.dumps(outcome.record()))
    if check:
        outcome.raise_if_differs()
        assert outcome.reference_tokens is not None
        typer.echo(f"llmir-onnx: check: the {sum(map(len, outcome.reference_tokens))} generated tokens equal the "
                   "original model's greedy tokens (onnxruntime, recomputed without a KV cache)", err=True)


@app.command()
@reports_errors
def check(
    plan: Annotated[Path, typer.Argument(help="A folder written by `llmir-onnx partition`.")],
    no_check_hashes: NoCheckHashesOption = False,
    debug: DebugOption = False,
) -> None:
    """Check a plan without running it: the manifest's schema, every file's path, size and digest."""
    from llmir_onnx.plan.integrity import check_plan_files
    from llmir_onnx.plan.manifest import Manifest
    from llmir_onnx.plan.memory import format_bytes

    manifest = Manifest.read(plan)
    result = check_plan_files(plan, manifest, check_hashes=not no_check_hashes)
    algorithms = "/".join(sorted({digest.algorithm for digest in manifest.files.values()}))
    what = f"sizes and {algorithms} match" if result.hashed else f"sizes match ({algorithms} not checked)"
    typer.echo(
        f"{plan}: plan ok: {_mesh_text(manifest.mesh)}, {result.files} files "
        f"({format_bytes(result.bytes)}), {what}"
    )


@app.command()
@reports_errors
def plan(
    model: Annotated[Path, typer.Argument(help="The ONNX model (only shapes are read; weights need not exist).")],
    devices: Annotated[
        str,
        typer.Option(
            "--devices",
            help="The devices: a count (64: --device profiles in hosts of its usual size, 8 for GPUs), a list "
            "such as 8xh100-sxm,8xa100-80g (each item starts a new host), or a JSON cluster file.",
        ),
    ],
    device_memory: Annotated[
        str | None, typer.Option("--device-memory", help="Memory per device, e.g. 80GiB (default: the profile's).")
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="Device profile: h100-sxm, a100-80g, cpu-here, or a JSON file.")
    ] = "h100-sxm",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Sequences served at once.")] = 1,
    max_seq: Annotated[
        int | None,
        typer.Option("--max-seq", min=1, help="Longest sequence (prompt + generated) [default: 2048 or less]."),
    ] = None,
    dims: DimOption = None,
    include_fewer: Annotated[
        bool, typer.Option("--include-fewer", help="Also list layouts that use fewer devices.")
    ] = False,
    devices_per_host: DevicesPerHostOption = None,
    max_cp: Annotated[
        int,
        typer.Option(
            "--max-cp", min=1,
            help="Also list layouts with context parallelism (partition --cp) up to this cp: tp x cp x pp devices, "
            "each with the KV cache replicated over cp and sharded over it (partition --cp-kv-cache).",
        ),
    ] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the ranked layouts and the recommendation as JSON.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Rank the (tp, pp) layouts (and tp x cp x pp with --max-cp) by predicted speed and memory per rank, and
    recommend one."""
    from llmir_onnx.ir_io import load_model
    from llmir_onnx.model_facts import parse_dim_hints, record_dim_hints
    from llmir_onnx.plan.devices import load_profile, parse_devices
    from llmir_onnx.plan.layouts import enumerate_layouts, format_layout_table, recommend
    from llmir_onnx.plan.memory import parse_bytes
    from llmir_onnx.plan.shapes import choose_max_seq

    profile = load_profile(device)
    asked_memory = parse_bytes(device_memory) if device_memory is not None else None
    cluster = parse_devices(devices, device, devices_per_host=devices_per_host, memory_bytes=asked_memory)
    memory = asked_memory if asked_memory is not None else min(slot.memory_bytes for slot in cluster.devices)
    source = load_model(model, check_data=False)
    record_dim_hints(source, parse_dim_hints(dims or []))
    asked = max_seq
    max_seq, limit = choose_max_seq(source, max_batch, asked)
    layouts = enumerate_layouts(
        source, len(cluster), memory, profile, max_batch, max_seq, include_fewer=include_fewer, cluster=cluster,
        max_cp=max_cp,
    )
    best, reason = recommend(layouts)
    if as_json:
        from dataclasses import asdict

        _echo_json({
            "model": str(model), "devices": len(cluster), "device": profile.name, "device_memory_bytes": memory,
            "cluster": cluster.manifest_entry(),
            "max_batch": max_batch, "max_seq": max_seq, "layouts": [asdict(layout) for layout in layouts],
            "recommended": best.label if best is not None else None, "reason": reason,
        })
    else:
        typer.echo(f"{model}: {cluster.describe()}, batch {max_batch}, sequences up to {max_seq} tokens")
        if asked is None and limit.tokens is not None:
            typer.echo(f"  max-seq {limit.tokens}: the longest sequence the model takes ({limit.reason})")
        typer.echo(format_layout_table(layouts))
    if best is None:
        from llmir_onnx.errors import PlanError

        raise PlanError(reason)
    if not as_json:
        typer.echo(f"recommended: {reason}")


def _mesh_text(mesh: Mapping[str, Any]) -> str:
    """A plan's mesh as the summaries print it: `tp 2 x pp 2`, with `x cp C` between when cp > 1."""
    cp = int(mesh.get("cp", 1))
    return f"tp {mesh.get('tp')}" + (f" x cp {cp}" if cp > 1 else "") + f" x pp {mesh.get('pp')}"


def _echo_json(document: dict[str, Any]) -> None:
    """One JSON document on stdout (nothing else goes there), for scripts and CI."""
    import json

    typer.echo(json.dumps(document, indent=2, allow_nan=False))


@app.command()
@reports_errors
def report(
    plan: Annotated[Path, typer.Argument(help="A folder written by `llmir-onnx partition`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The HTML file to write (self-contained).")],
    timeline: Annotated[
        Path | None,
        typer.Option("--timeline", help="A measured run (generate/verify --timeline FILE) to draw as a Gantt chart."),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """One self-contained HTML page: memory, predicted times, stages and splits, communication, timeline."""
    from llmir_onnx.plan.report import write_report

    written = write_report(plan, out, timeline)
    typer.echo(f"wrote {written}")


@app.command()
@reports_errors
def annotate(
    plan: Annotated[Path, typer.Argument(help="A folder written by `llmir-onnx partition`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The annotated model (weights in OUT.data beside it).")],
    model: Annotated[
        Path | None, typer.Option("--model", help="The original model, if it moved since partitioning.")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Write the ORIGINAL model with the plan as ONNX IR v11 annotations (mesh, sharding specs, stages)."""
    from llmir_onnx.annotations import write_annotated_source

    written, specs = write_annotated_source(plan, out, model)
    typer.echo(f"wrote {written} (IR v11: {specs} sharding specs, every node's pipeline stage)")


def main() -> None:
    """The `llmir-onnx` process: the command, then exit (without the interpreter's teardown after a partition)."""
    # click's exceptions: click's own module, or (typer >= 0.2x) typer's copy of it.
    click_errors = sys.modules[typer.BadParameter.__module__]
    try:
        # Not standalone: click's usage errors come back here, to be printed on one line like ours.
        code = app(prog_name="llmir-onnx", standalone_mode=False)
    except click_errors.ClickException as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `llmir-onnx` alone: its help
            error.show()
            sys.exit(error.exit_code)
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "llmir-onnx"
        typer.echo(f"llmir-onnx: error: {' '.join(error.format_message().split())} (see `{command} --help`)",
                   err=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        typer.echo("llmir-onnx: aborted", err=True)
        sys.exit(1)
    if _Process.exit_without_teardown and code in (None, 0):
        # Only the partition's own objects are left to free: its files are closed and in place, its
        # threads joined. Flush what Python would flush at exit, then leave.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
