"""`llmir-onnx`: partition ONNX LLMs for tensor/pipeline parallel inference, and check the result.

Every user-facing failure is an LlmirError, printed on one line on stderr with a non-zero exit;
a traceback only with --debug.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from llmir_onnx.errors import LlmirError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ONNX-to-ONNX partitioning for distributed LLM inference (tensor and pipeline parallel).",
)

F = TypeVar("F", bound=Callable[..., Any])
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]


def reports_errors(command: F) -> F:
    """Turn errors into one line on stderr and an exit code; tracebacks only with --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
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
        except Exception as error:
            if debug:
                traceback.print_exc()
            typer.echo(
                f"llmir-onnx: internal error: {type(error).__name__}: {' '.join(str(error).split())} "
                "(rerun with --debug for a traceback and report it)",
                err=True,
            )
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@reports_errors
def partition(
    model: Annotated[Path, typer.Argument(help="The ONNX model to partition (external data beside it).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Folder for the rank models and manifest.json.")],
    tp: Annotated[int, typer.Option("--tp", min=1, help="Tensor-parallel degree.")] = 1,
    pp: Annotated[int, typer.Option("--pp", min=1, help="Pipeline-parallel stages.")] = 1,
    vocab_parallel: Annotated[
        bool, typer.Option("--vocab-parallel", help="Shard the embedding and lm_head by vocabulary.")
    ] = False,
    replicate_unsupported: Annotated[
        bool,
        typer.Option("--replicate-unsupported", help="Replicate ops with no sharding rule instead of failing."),
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Write one ONNX model per rank (tp x pp) and a manifest into OUT."""
    from llmir_onnx.api import partition_to_dir

    manifest = partition_to_dir(
        model, out, tp=tp, pp=pp, vocab_parallel=vocab_parallel, replicate_unsupported=replicate_unsupported
    )
    typer.echo(f"wrote {len(manifest.ranks)} rank models to {out}")
    for entry in manifest.ranks:
        size = sum(p.stat().st_size for p in out.glob(entry.file + "*"))
        coords = " ".join(f"{axis}={value}" for axis, value in entry.coords.items())
        typer.echo(f"  rank {entry.rank:<3} {coords:<16} {entry.file:<14} {size / 2**20:10.2f} MiB")


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
    atol: Annotated[float, typer.Option("--atol")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol")] = 1e-4,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of random inputs.")] = 1,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="New tokens in random inputs.")] = 4,
    past_tokens: Annotated[int, typer.Option("--past-tokens", min=0, help="Past KV length in random inputs.")] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    debug: DebugOption = False,
) -> None:
    """Run every rank as a process, reassemble the outputs and compare with the original model."""
    import numpy as np

    from llmir_onnx.ir_io import load_model
    from llmir_onnx.plan.manifest import Manifest
    from llmir_onnx.runtime.feeds import FeedSizes, random_feeds
    from llmir_onnx.runtime.verify import format_comparisons, load_feeds, raise_if_mismatch, verify_plan

    if inputs is not None:
        feeds = load_feeds(inputs)
    else:
        source = model or Path(Manifest.read(plan).source["path"])
        feeds = random_feeds(load_model(source), FeedSizes(batch, new_tokens, past_tokens, seed))
    outputs, rows = verify_plan(plan, feeds, model_path=model, atol=atol, rtol=rtol)
    if not rows:  # a non-zero rank under an external launcher: rank 0 reports
        return
    if save_outputs is not None:
        np.savez(save_outputs, **outputs)
    typer.echo(format_comparisons(rows, atol, rtol))
    raise_if_mismatch(rows)
    typer.echo(f"all {len(rows)} outputs match the original model")


def main() -> None:
    app(prog_name="llmir-onnx")


if __name__ == "__main__":
    sys.exit(main())
