"""Fold shape-computation chains: every small integer value that is a constant or one input dim at all sizes.

Legacy-style exports recompute shapes in every layer (`Shape -> Gather -> Unsqueeze -> Concat`, then the
partitioner's `Equal/Where` that turn a head count into the local one): about 1100 tiny nodes per step in
a 12-layer LLaMA, each costing onnxruntime a kernel launch (1-3 us). They do not shrink with tp, so on a
CPU they eat a good part of what tensor parallelism saves (docs/BENCHMARKS.md, issue 16).

The pass evaluates the graph (`plan.shapes.ShapeEvaluator`) at several sizes that span prefill (no
past), decode (1 new token) and the plan's longest sequence (`max_seq`, so that a value such as
min(total, window) is not taken for `total`), and looks at every 0-d or 1-d int32/int64 value of at most
`MAX_ELEMENTS` elements that the evaluator computed at every size. When each element is either the same
number at every size, or equals one dim role (batch, new tokens, past tokens, their total) at every
size, the value is rebuilt once from the graph inputs: `Shape -> Gather` of the input axis that holds
each role (one per role for the whole graph), constants, and one `Concat` per distinct vector, shared
by every layer. Each use of such a value by a node that is not itself foldable (a Reshape's shape, a
Slice's ends, an Expand's shape) reads the rebuilt value; the old chains are then unused and removed.

Values derived from initializers that differ between tp ranks (`rank_varying`: rank constants such as
a vocabulary offset) are left alone, so one rank's folded graph is valid for its tp copies.
Numerically checked like every transformation: plans still verify against the original through real
rank processes (tests/test_fold_shapes.py, `llmir-onnx verify`, `generate --check`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from llmir_onnx.errors import PlanError
from llmir_onnx.model_facts import BATCH, NEW, PAST, TOTAL
from llmir_onnx.plan.shapes import ShapeEvaluator, Sizes, TensorShape, default_max_seq

MAX_ELEMENTS = 8
# Sizes that make every role differ from the others at some point, with prefill (past 0) and decode
# (1 new token) among them: a value that agrees with a role at all of them is that role.
SAMPLE_SIZES = (Sizes(2, 3, 5), Sizes(3, 7, 11), Sizes(1, 1, 6), Sizes(4, 1, 9), Sizes(5, 6, 0))
_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
_PREFIX = "llmir_shape"

Element = int | str  # a constant, or a role name


@dataclass(frozen=True)
class FoldReport:
    folded_uses: int  # node inputs that now read a rebuilt value
    removed_nodes: int  # nodes fewer in the graph after the unused chains went


def sample_sizes(max_seq: int) -> tuple[Sizes, ...]:
    """The sizes the graph is evaluated at: the small ones and both ends of the plan's longest sequence."""
    return (*SAMPLE_SIZES, Sizes(3, 1, max_seq - 1), Sizes(2, max_seq, 0))


def _role_size(role: str, sizes: Sizes) -> int:
    return {BATCH: sizes.batch, NEW: sizes.seq, PAST: sizes.past, TOTAL: sizes.total}[role]


def _elements(samples: list[TensorShape], points: tuple[Sizes, ...]) -> tuple[Element, ...] | None:
    """The value's elements as constants or roles, or None when some element is neither."""
    first = samples[0]
    if first.value is None or first.dtype not in _INT_TYPES or len(first.shape) > 1 or first.numel > MAX_ELEMENTS:
        return None
    if any(s.value is None or s.shape != first.shape for s in samples):
        return None
    columns = np.stack([np.asarray(s.value).reshape(-1) for s in samples], axis=1)  # [elements, points]
    elements: list[Element] = []
    for row in columns:
        if (row == row[0]).all():
            elements.append(int(row[0]))
            continue
        roles = [role for role in (BATCH, NEW, PAST, TOTAL)
                 if all(int(v) == _role_size(role, sizes) for v, sizes in zip(row, points, strict=True))]
        if len(roles) != 1:
            return None
        elements.append(roles[0])
    return tuple(elements)


class _Builder:
    """Makes the rebuilt values (each once) and collects their nodes in dependency order."""

    def __init__(self, role_sources: dict[str, tuple[ir.Value, int]]) -> None:
        self.role_sources = role_sources
        self.nodes: list[ir.Node] = []
        self._made: dict[tuple[object, ...], ir.Value] = {}

    def _node(self, op: str, inputs: list[ir.Value], dtype: ir.DataType, shape: list[int],
              attributes: list[ir.Attr] | None = None) -> ir.Value:
        name = f"{_PREFIX}/{op}_{len(self.nodes)}"
        output = ir.Value(name=f"{name}_output", type=ir.TensorType(dtype), shape=ir.Shape(shape))
        self.nodes.append(ir.Node("", op, inputs, attributes or [], outputs=[output], name=name))
        return output

    def constant(self, values: list[int], dtype: ir.DataType, scalar: bool = False) -> ir.Value:
        key = ("const", tuple(values), dtype, scalar)
        if key not in self._made:
            array = np.array(values[0] if scalar else values, dtype=dtype.numpy())
            self._made[key] = self._node("Constant", [], dtype, list(array.shape),
                                         [ir.AttrTensor("value", ir.tensor(array))])
        return self._made[key]

    def role(self, role: str) -> ir.Value:
        """[size of `role`] as a 1-element int64 tensor, read off the input axis that holds it."""
        key = ("role", role)
        if key not in self._made:
            source, axis = self.role_sources[role]
            shape_key = ("shape", source.name)
            if shape_key not in self._made:  # one Shape per input, whatever roles it holds
                self._made[shape_key] = self._node("Shape", [source], ir.DataType.INT64, [len(source.shape or ())])
            self._made[key] = self._node("Gather", [self._made[shape_key], self.constant([axis], ir.DataType.INT64)],
                                         ir.DataType.INT64, [1])
        return self._made[key]

    def value(self, elements: tuple[Element, ...], dtype: ir.DataType, scalar: bool) -> ir.Value:
        key = ("value", elements, dtype, scalar)
        if key in self._made:
            return self._made[key]
        if all(isinstance(e, int) for e in elements):
            made = self.constant([int(e) for e in elements], dtype, scalar)
        else:
            pieces: list[ir.Value] = []
            run: list[int] = []
            for element in elements:
                if isinstance(element, int):
                    run.append(element)
                    continue
                if run:
                    pieces.append(self.constant(run, ir.DataType.INT64))
                    run = []
                pieces.append(self.role(element))
            if run:
                pieces.append(self.constant(run, ir.DataType.INT64))
            made = pieces[0] if len(pieces) == 1 else self._node(
                "Concat", pieces, ir.DataType.INT64, [len(elements)], [ir.AttrInt64("axis", 0)])
            if dtype != ir.DataType.INT64:
                made = self._node("Cast", [made], dtype, [len(elements)], [ir.AttrInt64("to", dtype.value)])
            if scalar:
                made = self._node("Reshape", [made, self.constant([], ir.DataType.INT64)], dtype, [])
        self._made[key] = made
        return made


def _role_sources(model: ir.Model, samples: list[dict[str, TensorShape]], points: tuple[Sizes, ...]
                  ) -> dict[str, tuple[ir.Value, int]]:
    """For each role, the first graph input axis whose size is that role at every sample size."""
    sources: dict[str, tuple[ir.Value, int]] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, int):
                continue
            sizes = [sample[value.name or ""].shape[axis] for sample in samples]
            for role in (BATCH, NEW, PAST, TOTAL):
                if role not in sources and all(
                    size == _role_size(role, point) for size, point in zip(sizes, points, strict=True)
                ):
                    sources[role] = (value, axis)
    return sources


def fold_shape_chains(model: ir.Model, max_seq: int, rank_varying: Collection[str] = ()) -> FoldReport:
    """Fold the model's shape chains in place (see the module docstring); valid up to `max_seq` tokens.
    Raises PlanError when the model cannot be evaluated at the sample sizes (then nothing is changed)."""
    graph = model.graph
    points = sample_sizes(max_seq)
    samples = [ShapeEvaluator(model, sizes).run() for sizes in points]
    role_sources = _role_sources(model, samples, points)
    varying = set(rank_varying)
    for node in graph:  # values computed from a rank-varying initializer vary too (a Shape reads no values:
        # tp ranks of one graph hold equally shaped slices)
        if node.op_type not in ("Shape", "Size") and any(v is not None and v.name in varying for v in node.inputs):
            varying.update(o.name for o in node.outputs if o.name)
    foldable: dict[str, tuple[Element, ...]] = {}
    for node in graph:
        for output in node.outputs:
            name = output.name or ""
            if name in varying or any(name not in sample for sample in samples):
                continue
            elements = _elements([sample[name] for sample in samples], points)
            if elements is not None and all(isinstance(e, int) or e in role_sources for e in elements):
                foldable[name] = elements
    builder = _Builder(role_sources)
    outputs = {value.name for value in graph.outputs}
    uses = 0
    for node in list(graph):
        if node.outputs and all((o.name or "") in foldable for o in node.outputs):
            continue  # part of a chain: unused once its consumers read the rebuilt value
        for index, value in enumerate(node.inputs):
            if value is None or value.producer() is None or (value.name or "") not in foldable:
                continue
            if value.name in outputs:
                continue
            assert value.dtype is not None or value.name in samples[0]
            dtype = samples[0][value.name or ""].dtype
            scalar = len(samples[0][value.name or ""].shape) == 0
            node.replace_input_with(index, builder.value(foldable[value.name or ""], dtype, scalar))
            uses += 1
    before = len(graph)
    if builder.nodes:
        first = next(iter(graph))
        graph.insert_before(first, builder.nodes)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    return FoldReport(uses, before - len(graph))


def try_fold_shape_chains(model: ir.Model, max_seq: int | None, rank_varying: Collection[str] = ()
                          ) -> tuple[FoldReport | None, str]:
    """`fold_shape_chains` (max_seq None: `plan.shapes.default_max_seq`), or (None, why not) when the model
    cannot be evaluated at the sample sizes (an op with no shape rule, kept by --replicate-unsupported): the
    plan is then written unfolded, which is correct, only slower; the reason goes to the warnings."""
    try:
        if max_seq is None:
            max_seq = default_max_seq(model)
        return fold_shape_chains(model, max_seq, rank_varying), ""
    except PlanError as error:
        return None, f"shape chains not folded (the plan runs them as exported): {error}"
