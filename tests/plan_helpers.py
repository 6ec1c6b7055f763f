"""Helpers of the tests that split and write plans by hand, outside `partition`: the stage split's arguments
from whole tp rank models, and writing a plan from rank models in one call; and reading a written plan's rank
models back under the full check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from llmir_onnx.errors import PlanError
from llmir_onnx.ir_io import initializer_tensors
from llmir_onnx.passes.stages import StageRankModel
from llmir_onnx.plan.data_files import RankWeights, WeightWriter
from llmir_onnx.plan.emit import PlanContents, RankModel, atomic_output_dir, start_weight_writer, write_plan_into
from llmir_onnx.plan.manifest import Manifest, SliceBinding
from llmir_onnx.plan.tp_rank_copy import TpRankCopy
from llmir_onnx.progress import QUIET

TensorsByName = dict[str, ir.TensorProtocol]


def tp_models_for_split(
    tp_models: Sequence[tuple[ir.Model, Sequence[SliceBinding], Sequence[SliceBinding]]],
) -> tuple[ir.Model, list[tuple[Sequence[SliceBinding], Sequence[SliceBinding]]], Callable[[int], TensorsByName]]:
    """`split_tp_stages`' first three arguments from every tp rank's whole model (index = tp rank;
    bindings original -> tp-local): tp rank 0's model, the bindings, each rank's weights by name.

    The models must be one graph with equal-shaped weights (what the partitioner makes), since every
    tp rank's stages are copies of tp rank 0's.
    """
    weights = [initializer_tensors(model) for model, _, _ in tp_models]
    shapes = {name: tuple(tensor.shape) for name, tensor in weights[0].items()}
    for tp_rank, rank_weights in enumerate(weights[1:], 1):
        differing = sorted(
            set(shapes).symmetric_difference(rank_weights)
            | {name for name, tensor in rank_weights.items() if shapes.get(name) != tuple(tensor.shape)}
        )
        if differing:
            raise PlanError(
                f"tp rank {tp_rank}'s model differs from tp rank 0's in the initializers {differing[:5]}: the "
                "stage split cuts tp ranks that run one graph with equal-shaped weights (the partitioner's output)"
            )
    return tp_models[0][0], [(inputs, outputs) for _, inputs, outputs in tp_models], weights.__getitem__


def rank_model(rank: StageRankModel) -> RankModel:
    """A stage split's rank as the plan writer takes it."""
    return rank.rank, rank.coords, rank.model, rank.inputs, rank.outputs


def write_plan(out_dir: Path, contents: PlanContents) -> Manifest:
    """Save every rank model, its weights and the manifest into `out_dir`, atomically (see atomic_output_dir)."""
    with atomic_output_dir(out_dir) as staging, WeightWriter(staging) as writer:
        weights = [
            RankWeights.of_model(rank, coords.get("pp", 0),
                                 model.materialize() if isinstance(model, TpRankCopy) else model)
            for rank, coords, model, _, _ in contents.rank_models
        ]
        start_weight_writer(writer, weights, QUIET)
        return write_plan_into(staging, writer, contents)


def checked_rank_models(plan_dir: Path, ranks: int) -> list[onnx.ModelProto]:
    """Ranks 0..ranks-1 of a plan, each after passing the full check (strict shape inference over its static
    shapes), without their weights."""
    models = []
    for rank in range(ranks):
        path = plan_dir / f"rank{rank}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        models.append(onnx.load(str(path), load_external_data=False))
    return models
