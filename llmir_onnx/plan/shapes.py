"""Concrete shapes of every value of a model at given sizes (batch, new tokens, past tokens), without weights.

The memory plan and the cost model need the size of every intermediate tensor at, say, batch 8 and
4096 tokens. ONNX shape inference (even with `data_prop=True`) loses shapes at the mask and rotary
patterns real exports contain (Range, Where, Expand, a Div on a Shape value), so this module runs a
small abstract interpreter over the graph in topological order instead:

- every value gets a concrete shape (tuple of ints) and dtype;
- small integer/bool tensors (shape computations: Shape -> Gather -> Concat, Range, Equal/Where over
  them, ...) also get their values, computed with numpy, so Reshape / Expand / Slice / ConstantOfShape
  targets are known exactly;
- weights are never read: initializer shapes come from metadata; only integer initializers of at most
  `SMALL_INT_ELEMENTS` elements (shape constants) are read.

Symbolic input dimensions are bound by their role (`bind_dims`): batch, new tokens, past tokens or
their total, as `model_facts.dim_roles` reads it from where the dim stands in the LLM signature
(torch.export's automatic `s70` works as `sequence_length` does), names being only a hint;
arithmetic names such as `past_sequence_length + 1` are evaluated. A dim with no role fails naming
the input, the dimension and the CLI option that settles it (`--dim s1=batch`).

`sequence_limit` / `choose_max_seq`: the longest sequence the model takes (a position table read
off the graph; else bisection for the largest length at which the shapes still work out).

Each op's shape function is part of its op record (`propagation/registry.py`), beside its sharding
rule in the op family's module; this module only walks the graph and computes small values. An op
whose record has no shape function fails naming the node and op: nothing is guessed.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llmir_onnx.errors import PlanError
from llmir_onnx.model_facts import BATCH, CLI_HINT, NEW, PAST, TOTAL, dim_roles, role_from_name
from llmir_onnx.ops import LLMIR_DOMAIN as LLMIR_DOMAIN  # plan modules read the domain here
from llmir_onnx.propagation.registry import ValueFunction, record_for
from llmir_onnx.propagation.tensor_shapes import (
    MAX_COMPUTED_ELEMENTS,
    ShapeMismatchError,
    TensorShape,
)

SMALL_INT_ELEMENTS = 64


@dataclass(frozen=True)
class Sizes:
    """The sizes a model is evaluated at: `seq` new tokens after `past` cached ones, for `batch` sequences."""

    batch: int
    seq: int
    past: int = 0

    @property
    def total(self) -> int:
        return self.past + self.seq


_BIN_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Div: operator.floordiv,
}


def _role_size(role: str, sizes: Sizes) -> int:
    return {BATCH: sizes.batch, NEW: sizes.seq, PAST: sizes.past, TOTAL: sizes.total}[role]


def _classify_dim(name: str, sizes: Sizes) -> int | None:
    role = role_from_name(name)
    return None if role is None else _role_size(role, sizes)


def _eval_expr(expr: str, known: Mapping[str, int]) -> int | None:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return None

    def visit(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return visit(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            return _BIN_OPS[type(node.op)](visit(node.left), visit(node.right))
        raise KeyError(ast.dump(node))

    try:
        return visit(tree)
    except (KeyError, ZeroDivisionError):
        return None


def bind_dims(model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
    """Map every symbolic dimension name of the graph inputs to an int at `sizes`.

    Roles come from `model_facts.dim_roles` (the signature, the user's --dim, names as a hint);
    `overrides` fixes sizes outright; a dim written as arithmetic (`past_sequence_length + 1`) is
    evaluated from the others.
    """
    roles = dim_roles(model)
    bound: dict[str, int] = {symbol: _role_size(role, sizes) for symbol, role in roles.roles.items()}
    bound.update(overrides or {})
    pending: list[tuple[str, str]] = []
    for value in model.graph.inputs:
        for dim in value.shape or ():
            if isinstance(dim, int) or dim.value is None or str(dim.value) in bound:
                continue
            pending.append((value.name or "", str(dim.value)))
    for input_name, name in pending:
        if name in bound:
            continue
        known = {k.replace(".", "_"): v for k, v in bound.items()}
        for symbol in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", name):
            guess = _classify_dim(symbol, sizes)
            if symbol not in known and guess is not None:
                known[symbol] = guess
        evaluated = _eval_expr(name.replace(".", "_"), known)
        if evaluated is None:
            raise PlanError(
                f"cannot tell what the dimension {name!r} of input {input_name!r} stands for (batch, new tokens, "
                f"past tokens or their total); settle it with {CLI_HINT.format(symbol=name)}"
            )
        bound[name] = evaluated
    return bound


# --------------------------------------------------------------------------- rules


class ShapeEvaluator:
    """Evaluates shapes (and small integer values) of every value of one graph at concrete sizes.

    With a `reference` (an evaluation at the same sizes of a graph this one was cut from, `ShapeReference`),
    a node that is the reference's node of the same outputs (`node_signature`) and reads the very values the
    reference's read takes the reference's outputs instead of being evaluated (`reused` holds their ids); a
    value computed anew that equals the reference's of its name becomes the reference's object, so its
    readers can be taken too. With `record`, `reference()` returns this evaluation as such a reference.
    """

    def __init__(
        self,
        model: ir.Model,
        sizes: Sizes,
        overrides: Mapping[str, int] | None = None,
        reference: ShapeReference | None = None,
        record: bool = False,
        signatures: NodeSignatures | None = None,
    ) -> None:
        self.model = model
        self.sizes = sizes
        self.overrides = _overrides_key(overrides)
        self.dims = bind_dims(model, sizes, overrides)
        self.values: dict[str, TensorShape] = {}
        self.reused: set[int] = set()  # ids of the nodes taken from the reference
        self.taken_from = reference  # the reference this evaluation takes from, if any
        self._record = record
        self._signatures: dict[str, NodeSignature] = {}  # recorded: by first output name
        # Signatures of this graph's nodes, shared by its evaluations at other sizes (the graph must not change).
        self._signature_of = signatures if signatures is not None else NodeSignatures()
        self._bound_by_name = False  # the node being evaluated bound a declared dim (`bind_dim`)

    # -- entry points

    def run(self) -> dict[str, TensorShape]:
        graph = self.model.graph
        reference = self.taken_from
        for value in graph.inputs:
            shape = TensorShape(self._input_shape(value), self._dtype(value))
            self.values[value.name or ""] = reference.interned(value.name or "", shape) if reference else shape
        for name, value in graph.initializers.items():
            taken = reference.initializer(name, value) if reference is not None else None
            self.values[name] = taken if taken is not None else self._initializer(value)
        for node in graph:
            if reference is not None and reference.takes(node, self.values, self._signature_of):
                for output in node.outputs:
                    if output.name in reference.values:  # what its evaluation there gave (all but trailing optionals)
                        self.values[output.name] = reference.values[output.name]
                self.reused.add(id(node))
                continue
            self._bound_by_name = False
            try:
                self._node(node)
            except (ValueError, IndexError, ShapeMismatchError) as error:  # numpy's, on shapes the model cannot take
                raise ShapeMismatchError(
                    f"node {node.name!r} ({node.op_type}): shapes do not work out at batch {self.sizes.batch}, "
                    f"{self.sizes.seq} new + {self.sizes.past} past tokens ({error}); the model may not take "
                    "sequences this long: lower --max-seq",
                    where=f"node {node.name!r} ({node.op_type})",
                ) from error
            if reference is not None:
                for output in node.outputs:
                    if output.name in self.values:
                        self.values[output.name] = reference.interned(output.name, self.values[output.name])
            # A node whose shape depends on how a declared dim binds is not taken from a reference.
            elif self._record and not self._bound_by_name and node.outputs and node.outputs[0].name:
                self._signatures[node.outputs[0].name] = self._signature_of(node)
        return self.values

    def reference(self, results: Mapping[str, Mapping[str, object]] | None = None) -> ShapeReference:
        """This evaluation, for graphs cut from this one (`record` must have been set; after `run`), with what
        analyses computed per node at these shapes (`results`: by analysis, then first output name)."""
        if not self._record:
            raise PlanError("a shape evaluation kept as a reference must be run with record=True")
        initializers = {name: value.const_value for name, value in self.model.graph.initializers.items()}
        kept = {analysis: dict(by_name) for analysis, by_name in (results or {}).items()}
        return ShapeReference(self.sizes, self.overrides, self.values, self._signatures, initializers, kept)

    # -- sources

    def _dtype(self, value: ir.Value) -> ir.DataType:
        if value.dtype is None:
            raise PlanError(f"value {value.name!r} has no element type; the model must declare its input types")
        return value.dtype

    def _input_shape(self, value: ir.Value) -> tuple[int, ...]:
        if value.shape is None:
            raise PlanError(f"graph input {value.name!r} has no shape; the planner needs input ranks")
        dims = []
        for dim in value.shape:
            if isinstance(dim, int):
                dims.append(dim)
            elif dim.value is None:
                raise PlanError(f"graph input {value.name!r} has an unnamed dynamic dimension; name it in the export")
            else:
                dims.append(self.dims[str(dim.value)])
        return tuple(dims)

    def _initializer(self, value: ir.Value) -> TensorShape:
        tensor = value.const_value
        if tensor is None:
            raise PlanError(f"initializer {value.name!r} has no tensor")
        shape = tuple(tensor.shape.numpy())  # an initializer's shape is static
        known = None
        numel = math.prod(shape)
        if tensor.dtype in (ir.DataType.INT64, ir.DataType.INT32) and numel <= SMALL_INT_ELEMENTS:
            known = tensor.numpy()  # a shape constant: a few bytes, not a weight
        return TensorShape(shape, tensor.dtype, known)

    # -- nodes

    def _get(self, node: ir.Node, index: int) -> TensorShape | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            return None
        name = value.name or ""
        if name == "":
            return None
        if name not in self.values:
            raise PlanError(f"node {node.name!r} ({node.op_type}) reads {name!r} before it is produced")
        return self.values[name]

    def _node(self, node: ir.Node) -> None:
        inputs = [self._get(node, i) for i in range(len(node.inputs))]
        results = self._evaluate(node, inputs)
        for output, result in zip(node.outputs, results, strict=False):
            if output.name:
                self.values[output.name] = result

    def _evaluate(self, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
        record = record_for(node)
        if record is None or record.shape is None:
            domain = node.domain or ""
            where = node.op_type if domain in ("", "ai.onnx") else f"{domain}.{node.op_type}"
            raise PlanError(
                f"node {node.name!r} ({where}) has no shape rule in the planner; give its op record a shape "
                "function (llmir_onnx/propagation, see docs/DESIGN.md 'Adding an op') to plan models that use it"
            )
        computed = self._compute(node, record.value, inputs) if record.value is not None else None
        if computed is not None:
            return computed
        return record.shape(self, node, inputs)

    # -- value computation for small tensors

    def _compute(
        self, node: ir.Node, value: ValueFunction, inputs: list[TensorShape | None]
    ) -> list[TensorShape] | None:
        """The op's output value when all its inputs are known (shape computations), via its record."""
        present = [i for i in inputs if i is not None]
        if not present or any(i.value is None for i in present):
            return None
        arrays = [i.value if i is not None else None for i in inputs]
        try:
            result = value(node, arrays)
        except PlanError:
            raise
        except Exception:  # an op the small evaluator does not handle: fall back to the shape rule
            return None
        if result is None:
            return None
        result = np.asarray(result)
        if result.size > MAX_COMPUTED_ELEMENTS:
            return None
        dtype = ir.DataType.from_numpy(result.dtype)
        return [TensorShape(tuple(result.shape), dtype, result)]

    # -- what the ops' shape functions may ask (registry.ShapeEnvironment)

    @property
    def total_tokens(self) -> int:
        return self.sizes.total

    def bind_dim(self, dim: int | ir.SymbolicDim, node: ir.Node) -> int:
        if isinstance(dim, int):
            return dim
        self._bound_by_name = True
        name = str(dim.value)
        if name in self.dims:
            return self.dims[name]
        # A declared dim that is arithmetic of the inputs' dims (a sequence-parallel token chunk received
        # from another stage: `(sequence_length + 1) // 2`).
        evaluated = _eval_expr(name, self.dims)
        if evaluated is not None:
            return evaluated
        guess = _classify_dim(name, self.sizes)
        if guess is None:
            raise PlanError(f"node {node.name!r}: cannot bind the dimension {name!r}")
        return guess


class _Same:
    """An attribute value compared by identity (a tensor or graph attribute: the node's own object)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


_PLAIN_ATTRIBUTES = frozenset({ir.AttributeType.INT, ir.AttributeType.FLOAT, ir.AttributeType.STRING})
_LIST_ATTRIBUTES = frozenset({ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS})

NodeSignature = tuple[object, ...]


def node_signature(node: ir.Node) -> NodeSignature:
    """What a node's shapes and cost depend on besides its inputs' shapes: its op, name, attributes, the names
    of what it reads and writes, and where those stand in its graph (initializer, produced, graph output)."""
    attributes = tuple(
        (
            name,
            attribute.type,
            attribute.value
            if attribute.type in _PLAIN_ATTRIBUTES
            else tuple(attribute.value)
            if attribute.type in _LIST_ATTRIBUTES
            else _Same(attribute.value),
        )
        for name, attribute in node.attributes.items()
    )
    inputs = tuple(
        None if value is None else (value.name, value.is_initializer(), value.producer() is not None,
                                    value.is_graph_output())
        for value in node.inputs
    )  # fmt: skip
    outputs = tuple((value.name, value.is_graph_output()) for value in node.outputs)
    return (node.domain, node.op_type, node.overload, node.name, attributes, inputs, outputs)


class NodeSignatures:
    """`node_signature` of each node asked for, computed once: for evaluations of one graph at several sizes
    (the graph must not change in between). Holds the nodes, so their ids stay theirs."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[ir.Node, NodeSignature]] = {}

    def __call__(self, node: ir.Node) -> NodeSignature:
        known = self._known.get(id(node))
        if known is None:
            known = self._known[id(node)] = (node, node_signature(node))
        return known[1]


def _same_shape(a: TensorShape, b: TensorShape) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype or (a.value is None) != (b.value is None):
        return False
    if a.value is None or b.value is None:
        return True
    return a.value.dtype == b.value.dtype and a.value.shape == b.value.shape and bool(np.array_equal(a.value, b.value))


def _overrides_key(overrides: Mapping[str, int] | None) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((overrides or {}).items()))


@dataclass(frozen=True)
class ShapeReference:
    """One graph's evaluation at `sizes` (`ShapeEvaluator(record=True).reference()`), for the graphs cut from it.

    A pipeline stage is cut from tp rank 0's whole model: most of its nodes are that model's nodes (the
    same op, name, attributes, inputs), so their shapes are the whole model's at the same sizes. The stage
    split's cost model evaluates the whole model at the plan's prefill and decode sizes before the stages
    exist; the stages' memory plans and costs then take those shapes (`shared_shape_evaluations`) instead of
    evaluating every stage again. `signatures`: the nodes that may be taken, by first output name (a node
    whose shape bound a declared dim by name is not among them); `initializers`: the tensor each name held;
    `results`: what analyses computed per node at these shapes (`plan.cost` keeps its node costs there), by
    analysis, then first output name.
    """

    sizes: Sizes
    overrides: tuple[tuple[str, int], ...]
    values: dict[str, TensorShape]
    signatures: dict[str, NodeSignature]
    initializers: dict[str, ir.TensorProtocol | None]
    results: dict[str, dict[str, object]]

    def takes(
        self, node: ir.Node, values: Mapping[str, TensorShape], signature_of: Callable[[ir.Node], NodeSignature]
    ) -> bool:
        """Whether `node` is the reference's node of its outputs reading the very values the reference's read."""
        if not node.outputs or not node.outputs[0].name:
            return False
        signature = self.signatures.get(node.outputs[0].name)
        if signature is None or signature != signature_of(node):
            return False
        for value in node.inputs:
            if value is not None and value.name and values.get(value.name) is not self.values.get(value.name):
                return False
        return True

    def interned(self, name: str, shape: TensorShape) -> TensorShape:
        """The reference's object for `name` when it equals `shape` (so readers of it can be taken), else `shape`."""
        known = self.values.get(name)
        return known if known is not None and _same_shape(known, shape) else shape

    def initializer(self, name: str, value: ir.Value) -> TensorShape | None:
        """The reference's shape of an initializer holding the very tensor the reference's did, else None."""
        tensor = self.initializers.get(name)
        if tensor is None or value.const_value is not tensor:
            return None
        return self.values.get(name)


# Evaluations kept while `shared_shape_evaluations` is open: key -> (model, evaluator). The model is held so
# that its id cannot be reused by another model while the entry lives.
_SharedKey = tuple[int, Sizes, tuple[tuple[str, int], ...]]
_shared_evaluations: dict[_SharedKey, tuple[ir.Model, ShapeEvaluator]] | None = None
_references: tuple[ShapeReference, ...] = ()
_block_signatures: NodeSignatures | None = None


@contextmanager
def shared_shape_evaluations(references: Iterable[ShapeReference] = ()) -> Iterator[None]:
    """Within it, `evaluate_shapes` evaluates each (model, sizes, overrides) once, taking what it can from
    the `references` at the same sizes (the whole model the evaluated stages were cut from).

    The memory plan, the cost model and the traffic estimate each evaluate a rank's model at the same
    prefill and decode sizes: for a plan's ranks that was about 7 evaluations per stage, the largest
    part of planning. Only for graphs that do not change inside the block (the finished rank models);
    the results are shared, so callers must not change them."""
    global _shared_evaluations, _references, _block_signatures
    outer, outer_references, outer_signatures = _shared_evaluations, _references, _block_signatures
    _shared_evaluations = {} if outer is None else outer
    _references = (*outer_references, *references)
    _block_signatures = NodeSignatures() if outer_signatures is None else outer_signatures
    try:
        yield
    finally:
        _shared_evaluations, _references, _block_signatures = outer, outer_references, outer_signatures


def _shared_evaluator(model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None) -> ShapeEvaluator | None:
    if _shared_evaluations is None:
        return None
    key = (id(model), sizes, _overrides_key(overrides))
    if key not in _shared_evaluations:
        reference = next((r for r in _references if r.sizes == sizes and r.overrides == key[2]), None)
        evaluator = ShapeEvaluator(model, sizes, overrides, reference=reference, signatures=_block_signatures)
        evaluator.run()
        _shared_evaluations[key] = (model, evaluator)
    return _shared_evaluations[key][1]


def evaluate_shapes(
    model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None = None
) -> dict[str, TensorShape]:
    """Shapes (and small values) of every value of `model` at `sizes`, keyed by value name."""
    evaluator = _shared_evaluator(model, sizes, overrides)
    return evaluator.values if evaluator is not None else ShapeEvaluator(model, sizes, overrides).run()


def taken_results(
    model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None, analysis: str
) -> dict[int, object]:
    """Inside `shared_shape_evaluations`: what `analysis` computed on the reference for each node of `model`
    that its evaluation at `sizes` took from the reference (by node id; the same node, the same shapes, so
    the same result). Empty outside the block or without a reference."""
    evaluator = _shared_evaluator(model, sizes, overrides)
    if evaluator is None or evaluator.taken_from is None:
        return {}
    results = evaluator.taken_from.results.get(analysis, {})
    taken: dict[int, object] = {}
    for node in model.graph:
        if id(node) in evaluator.reused and (name := node.outputs[0].name) in results:
            taken[id(node)] = results[name]
    return taken


def types_in_input_terms(
    model: ir.Model, value_names: Iterable[str]
) -> dict[str, tuple[ir.DataType, tuple[int | str | None, ...]]]:
    """Each named value's element type, and its dims as a static int, the graph-input dim name it always
    equals, or None.

    Intermediate values of an export often carry no type, no shape, or machine names such as `unk__87`
    from symbolic inference that no input binds. Evaluating the model at two unrelated size points and
    matching every dim against the inputs' named dims recovers `[batch_size, sequence_length, 4096]`
    for a hidden state: what a Recv must declare so later analyses and runtimes can bind it. Raises
    PlanError when the model cannot be evaluated.
    """
    points = (Sizes(batch=2, seq=3, past=5), Sizes(batch=3, seq=7, past=11))
    evaluated = [evaluate_shapes(model, sizes) for sizes in points]
    bound = [bind_dims(model, sizes) for sizes in points]
    named: dict[str, tuple[ir.DataType, tuple[int | str | None, ...]]] = {}
    for name in value_names:
        first, second = evaluated[0].get(name), evaluated[1].get(name)
        if first is None or second is None or len(first.shape) != len(second.shape):
            continue
        dims: list[int | str | None] = []
        for a, b in zip(first.shape, second.shape, strict=True):
            if a == b:
                dims.append(int(a))
                continue
            matches = [dim for dim, size in bound[0].items() if size == a and bound[1].get(dim) == b]
            dims.append(matches[0] if matches else None)
        named[name] = (first.dtype, tuple(dims))
    return named


def position_limit(model: ir.Model) -> int | None:
    """The longest sequence the model's position tables allow, if it has any (GPT-2: 128 rows of wpe).

    Found where positions index a table: a 2-D initializer gathered by indices computed from the
    `position_ids` input, or a rotary `cos_cache` initializer (onnxruntime-genai, opset-23 RotaryEmbedding).
    Models that compute rotary angles from positions (torch LLaMA exports) have no limit here.
    """
    graph = model.graph
    from_positions: set[int] = set()
    for value in graph.inputs:
        if "position" in (value.name or ""):
            from_positions.add(id(value))
    limits: list[int] = []
    for node in graph:
        if any(value is not None and id(value) in from_positions for value in node.inputs):
            from_positions.update(id(output) for output in node.outputs)
            table = node.inputs[0] if node.op_type == "Gather" and node.inputs else None
            if table is not None and table.const_value is not None and len(table.const_value.shape) == 2:
                limits.append(table.const_value.shape.numpy()[0])
        for input_value in node.inputs:
            if input_value is None or (tensor := input_value.const_value) is None:
                continue
            if "cos_cache" in (input_value.name or "") and len(tensor.shape) == 2:
                limits.append(tensor.shape.numpy()[0])
    return min(limits) if limits else None


DEFAULT_MAX_SEQ = 2048


@dataclass(frozen=True)
class SequenceLimit:
    """The longest sequence a model takes, where that is less than asked: `tokens` (None: no limit below
    what was asked) and why, in a few words."""

    tokens: int | None
    reason: str = ""


def _fails_at(model: ir.Model, max_batch: int, tokens: int) -> ShapeMismatchError | None:
    """Why the model cannot take `tokens` (prefill of all of them, or decode of the last after the
    others: the two phases every plan is sized for), or None when it can."""
    for sizes in (Sizes(batch=max_batch, seq=tokens, past=0), Sizes(batch=max_batch, seq=1, past=tokens - 1)):
        try:
            evaluate_shapes(model, sizes)
        except ShapeMismatchError as error:
            return error
    return None


def sequence_limit(model: ir.Model, max_batch: int = 1, up_to: int = DEFAULT_MAX_SEQ) -> SequenceLimit:
    """The longest sequence of at most `up_to` tokens the model takes.

    Two limits are found. A position table (GPT-2's 128 rows of wpe, a rotary cos cache) is read off
    the graph: its indices come from an input, so shapes alone never show it. Everything else (a
    sliding-window cache sliced to its window, a fixed-size mask or bias constant) shows as shapes that
    stop working out: the shape evaluator is run at `up_to` tokens and, when that fails, bisected for
    the largest length that works (lengths the model takes are assumed to be all those below one
    bound: a window or a table). Only a model that fails at `up_to` pays for the search, about
    2 log2(up_to) shape evaluations; a model that takes `up_to` costs two.
    """
    table = position_limit(model)
    ceiling = min(up_to, table) if table is not None else up_to
    failure = _fails_at(model, max_batch, ceiling)
    if failure is None:
        if table is not None and table < up_to:
            return SequenceLimit(table, f"its position table has {table} rows")
        return SequenceLimit(None)
    if (first := _fails_at(model, max_batch, 1)) is not None:
        raise first  # not a length limit: the model fails at one token
    works, fails = 1, ceiling
    while fails - works > 1:
        middle = (works + fails) // 2
        error = _fails_at(model, max_batch, middle)
        if error is None:
            works = middle
        else:
            fails, failure = middle, error
    return SequenceLimit(works, f"{failure.where or 'its shapes'} fails at {fails} tokens")


def choose_max_seq(model: ir.Model, max_batch: int, requested: int | None) -> tuple[int, SequenceLimit]:
    """The sequence length a plan is sized for: `requested`, or by default DEFAULT_MAX_SEQ lowered to what
    the model takes; a request beyond what the model takes is a PlanError saying the limit."""
    if requested is not None and requested < 1:
        raise PlanError(f"--max-seq ({requested}) must be at least 1")
    limit = sequence_limit(model, max_batch, requested or DEFAULT_MAX_SEQ)
    if limit.tokens is None:
        return requested or DEFAULT_MAX_SEQ, limit
    if requested is not None:
        raise PlanError(
            f"--max-seq {requested} is more than the model takes: at most {limit.tokens} tokens ({limit.reason}); "
            f"use --max-seq {limit.tokens} or less"
        )
    return limit.tokens, limit


def default_max_seq(model: ir.Model) -> int:
    """DEFAULT_MAX_SEQ, or less when the model takes less (what memory plans are sized for by default)."""
    return choose_max_seq(model, 1, None)[0]
