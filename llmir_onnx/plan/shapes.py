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

An op with no rule fails naming the node and op: nothing is guessed.
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

SMALL_INT_ELEMENTS = 64
# Values with at most this many elements are computed (not only shaped) when their inputs are known.
MAX_COMPUTED_ELEMENTS = 4096
LLMIR_DOMAIN = "ai.llmir"
MS_DOMAIN = "com.microsoft"


class ShapeMismatchError(PlanError):
    """The model cannot take the sizes it is evaluated at (`where`: the node that says so)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


@dataclass(frozen=True)
class Sizes:
    """The sizes a model is evaluated at: `seq` new tokens after `past` cached ones, for `batch` sequences."""

    batch: int
    seq: int
    past: int = 0

    @property
    def total(self) -> int:
        return self.past + self.seq


@dataclass(frozen=True)
class TensorShape:
    shape: tuple[int, ...]
    dtype: ir.DataType
    value: np.ndarray | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * self.dtype.itemsize)


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


def _attr(node: ir.Node, name: str, default: object = None) -> object:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _int_list(value: np.ndarray | None, node: ir.Node, what: str) -> list[int]:
    if value is None:
        raise PlanError(
            f"node {node.name!r} ({node.op_type}): its {what} is computed at run time from values this "
            "planner cannot evaluate; export the model with static shape computations"
        )
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _broadcast(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*shapes))


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Where", "Sum", "Mean", "BitwiseAnd", "BitwiseOr", "PRelu",
}  # fmt: skip
UNARY = {
    "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Tanh", "Sigmoid", "Relu", "Erf", "Not",
    "Cast", "CastLike", "Identity", "Softmax", "LogSoftmax", "Gelu", "FastGelu", "QuickGelu", "Floor", "Ceil",
    "Round", "Sign", "HardSigmoid", "LeakyRelu", "Elu", "Selu", "Softplus", "IsNaN", "IsInf", "Clip", "Trilu",
    "Dropout", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "RotaryEmbedding",
    "BiasGelu", "AllReduce", "Send",
}  # fmt: skip

_NUMPY_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Max": np.maximum,
    "Min": np.minimum,
    "Equal": np.equal,
    "Less": np.less,
    "LessOrEqual": np.less_equal,
    "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
}


class ShapeEvaluator:
    """Evaluates shapes (and small integer values) of every value of one graph at concrete sizes."""

    def __init__(self, model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None = None) -> None:
        self.model = model
        self.sizes = sizes
        self.dims = bind_dims(model, sizes, overrides)
        self.values: dict[str, TensorShape] = {}

    # -- entry points

    def run(self) -> dict[str, TensorShape]:
        graph = self.model.graph
        for value in graph.inputs:
            self.values[value.name or ""] = TensorShape(self._input_shape(value), self._dtype(value))
        for name, value in graph.initializers.items():
            self.values[name] = self._initializer(value)
        for node in graph:
            try:
                self._node(node)
            except (ValueError, IndexError, ShapeMismatchError) as error:  # numpy's, on shapes the model cannot take
                raise ShapeMismatchError(
                    f"node {node.name!r} ({node.op_type}): shapes do not work out at batch {self.sizes.batch}, "
                    f"{self.sizes.seq} new + {self.sizes.past} past tokens ({error}); the model may not take "
                    "sequences this long: lower --max-seq",
                    where=f"node {node.name!r} ({node.op_type})",
                ) from error
        return self.values

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
        shape = tuple(int(d) for d in tensor.shape)
        known = None
        numel = math.prod(shape)
        if tensor.dtype in (ir.DataType.INT64, ir.DataType.INT32) and numel <= SMALL_INT_ELEMENTS:
            known = tensor.numpy()  # a shape constant: a few bytes, not a weight
        return TensorShape(shape, tensor.dtype, known)

    # -- nodes

    def _get(self, node: ir.Node, index: int) -> TensorShape | None:
        if index >= len(node.inputs) or node.inputs[index] is None:
            return None
        name = node.inputs[index].name or ""
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

    def _out_dtype(self, node: ir.Node, index: int, fallback: ir.DataType) -> ir.DataType:
        output = node.outputs[index]
        return output.dtype if output.dtype is not None else fallback

    def _evaluate(self, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
        op = node.op_type
        domain = node.domain or ""
        first = inputs[0] if inputs else None
        if domain == LLMIR_DOMAIN:
            return self._llmir(node, inputs)
        if domain == MS_DOMAIN and op not in UNARY:
            return self._microsoft(node, inputs)
        if domain not in ("", "ai.onnx", MS_DOMAIN):
            raise PlanError(f"node {node.name!r} ({domain}.{op}) has no shape rule in the planner")

        if op == "Constant":
            tensor = _attr(node, "value")
            if tensor is None:
                raise PlanError(f"Constant node {node.name!r} uses an attribute other than `value`; re-export it")
            array = tensor.numpy()
            return [TensorShape(tuple(array.shape), tensor.dtype, array)]
        if op == "Shape":
            assert first is not None
            start = int(_attr(node, "start", 0))
            end = _attr(node, "end", None)
            shape = np.array(first.shape[start : None if end is None else int(end)], dtype=np.int64)
            return [TensorShape((len(shape),), ir.DataType.INT64, shape)]
        if op == "Size":
            assert first is not None
            return [TensorShape((), ir.DataType.INT64, np.array(first.numel, dtype=np.int64))]

        computed = self._compute(node, inputs)
        if computed is not None:
            return computed

        assert first is not None
        if op in UNARY:
            dtype = first.dtype
            if op == "Cast":
                dtype = ir.DataType(int(_attr(node, "to")))
            elif op in ("Not", "IsNaN", "IsInf"):
                dtype = ir.DataType.BOOL
            outs = [TensorShape(first.shape, dtype)]
            if op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
                axis = _norm_axis(int(_attr(node, "axis", -1)), len(first.shape))
                stat = first.shape[:axis] + (1,) * (len(first.shape) - axis)
                outs += [TensorShape(stat, ir.DataType.FLOAT)] * (len(node.outputs) - 1)
            if op == "Send":
                return [TensorShape((), ir.DataType.INT64)]
            return outs
        if op in ELEMENTWISE:
            shape = _broadcast(*(i.shape for i in inputs if i is not None))
            if op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor"):
                dtype = ir.DataType.BOOL
            elif op == "Where":
                dtype = inputs[1].dtype  # type: ignore[union-attr]
            else:
                dtype = first.dtype
            return [TensorShape(shape, dtype)]
        if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
            b = inputs[1]
            assert b is not None
            a_shape, b_shape = first.shape, b.shape
            if op == "FusedMatMul":
                if _attr(node, "transA", 0):
                    a_shape = (*a_shape[:-2], a_shape[-1], a_shape[-2])
                if _attr(node, "transB", 0):
                    b_shape = (*b_shape[:-2], b_shape[-1], b_shape[-2])
            out = _matmul_shape(a_shape, b_shape)
            return [TensorShape(out, self._out_dtype(node, 0, first.dtype))]
        if op == "Gemm":
            b = inputs[1]
            assert b is not None
            m = first.shape[1] if _attr(node, "transA", 0) else first.shape[0]
            n = b.shape[0] if _attr(node, "transB", 0) else b.shape[1]
            return [TensorShape((m, n), first.dtype)]
        if op == "Gather":
            indices = inputs[1]
            assert indices is not None
            axis = _norm_axis(int(_attr(node, "axis", 0)), len(first.shape))
            return [TensorShape(first.shape[:axis] + indices.shape + first.shape[axis + 1 :], first.dtype)]
        if op == "Attention" and domain in ("", "ai.onnx"):
            return self._onnx_attention(node, inputs)
        if op == "GatherND":
            indices = inputs[1]
            assert indices is not None
            batch_dims = int(_attr(node, "batch_dims", 0))
            depth = indices.shape[-1]
            return [TensorShape(indices.shape[:-1] + first.shape[batch_dims + depth :], first.dtype)]
        if op in ("ScatterND", "ScatterElements"):
            return [TensorShape(first.shape, first.dtype)]
        if op == "GatherElements":
            return [TensorShape(inputs[1].shape, first.dtype)]  # type: ignore[union-attr]
        if op == "Reshape":
            target = _int_list(inputs[1].value, node, "target shape")  # type: ignore[union-attr]
            return [TensorShape(_reshape(first.shape, target, bool(_attr(node, "allowzero", 0)), node), first.dtype)]
        if op in ("Flatten",):
            axis = _norm_axis(int(_attr(node, "axis", 1)), len(first.shape))
            return [TensorShape((math.prod(first.shape[:axis]), math.prod(first.shape[axis:])), first.dtype)]
        if op == "Transpose":
            perm = _attr(node, "perm", None)
            perm = list(perm) if perm is not None else list(reversed(range(len(first.shape))))
            return [TensorShape(tuple(first.shape[p] for p in perm), first.dtype)]
        if op == "Concat":
            present = [i for i in inputs if i is not None]
            axis = _norm_axis(int(_attr(node, "axis")), len(first.shape))
            shape = list(present[0].shape)
            shape[axis] = sum(i.shape[axis] for i in present)
            return [TensorShape(tuple(shape), first.dtype)]
        if op == "Slice":
            return [TensorShape(_slice_shape(first.shape, inputs, node), first.dtype)]
        if op == "Split":
            return self._split(node, inputs)
        if op in ("Unsqueeze", "Squeeze"):
            axes = _attr(node, "axes", None)
            if axes is None and len(inputs) > 1 and inputs[1] is not None:
                axes = _int_list(inputs[1].value, node, "axes")
            return [TensorShape(_squeeze(op, first.shape, axes), first.dtype)]
        if op == "Expand":
            target = tuple(_int_list(inputs[1].value, node, "target shape"))  # type: ignore[union-attr]
            return [TensorShape(_broadcast(first.shape, target), first.dtype)]
        if op == "Tile":
            repeats = _int_list(inputs[1].value, node, "repeats")  # type: ignore[union-attr]
            return [TensorShape(tuple(d * r for d, r in zip(first.shape, repeats, strict=True)), first.dtype)]
        if op == "ConstantOfShape":
            target = tuple(_int_list(first.value, node, "shape"))
            tensor = _attr(node, "value")
            dtype = tensor.dtype if tensor is not None else ir.DataType.FLOAT
            return [TensorShape(target, dtype)]
        if op == "Range":
            values = [_int_list(i.value, node, "bounds")[0] if i is not None else 0 for i in inputs]
            start, limit, delta = values
            return [TensorShape((max(math.ceil((limit - start) / delta), 0),), first.dtype)]
        if op.startswith("Reduce") or op in ("ArgMax", "ArgMin"):
            return [self._reduce(node, inputs)]
        if op in ("Pad",):
            pads = _int_list(inputs[1].value, node, "pads")  # type: ignore[union-attr]
            rank = len(first.shape)
            return [TensorShape(tuple(d + pads[i] + pads[i + rank] for i, d in enumerate(first.shape)), first.dtype)]
        if op in ("CumSum",):
            return [TensorShape(first.shape, first.dtype)]
        if op == "TopK":
            k = _int_list(inputs[1].value, node, "k")[0]  # type: ignore[union-attr]
            axis = _norm_axis(int(_attr(node, "axis", -1)), len(first.shape))
            shape = (*first.shape[:axis], k, *first.shape[axis + 1 :])
            return [TensorShape(shape, first.dtype), TensorShape(shape, ir.DataType.INT64)]
        raise PlanError(
            f"node {node.name!r} ({op}) has no shape rule in llmir_onnx.plan.shapes; add one (and a test) to plan "
            "models that use it"
        )

    # -- value computation for small tensors

    def _compute(self, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape] | None:
        present = [i for i in inputs if i is not None]
        if not present or any(i.value is None for i in present):
            return None
        op = node.op_type
        arrays = [i.value if i is not None else None for i in inputs]
        try:
            result = _numpy_op(node, op, arrays)
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

    def _split(self, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
        first = inputs[0]
        assert first is not None
        axis = _norm_axis(int(_attr(node, "axis", 0)), len(first.shape))
        split = _attr(node, "split", None)
        if split is None and len(inputs) > 1 and inputs[1] is not None:
            split = _int_list(inputs[1].value, node, "split sizes")
        count = len(node.outputs)
        if split is None:
            size = first.shape[axis]
            chunk = -(-size // count)
            split = [min(chunk, size - chunk * i) for i in range(count)]
        outs = []
        for part in split:
            shape = list(first.shape)
            shape[axis] = int(part)
            outs.append(TensorShape(tuple(shape), first.dtype))
        return outs

    def _reduce(self, node: ir.Node, inputs: list[TensorShape | None]) -> TensorShape:
        first = inputs[0]
        assert first is not None
        op = node.op_type
        keepdims = bool(_attr(node, "keepdims", 1))
        rank = len(first.shape)
        if op in ("ArgMax", "ArgMin"):
            axes = [int(_attr(node, "axis", 0))]
        else:
            axes = _attr(node, "axes", None)
            if axes is None and len(inputs) > 1 and inputs[1] is not None:
                axes = _int_list(inputs[1].value, node, "axes")
            if axes is None or len(axes) == 0:
                if _attr(node, "noop_with_empty_axes", 0):
                    return TensorShape(first.shape, first.dtype)
                axes = list(range(rank))
        axes = {_norm_axis(int(a), rank) for a in axes}
        shape = tuple(1 if i in axes else d for i, d in enumerate(first.shape) if keepdims or i not in axes)
        dtype = ir.DataType.INT64 if op in ("ArgMax", "ArgMin") else first.dtype
        return TensorShape(shape, dtype)

    # -- custom domains

    def _llmir(self, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
        first = inputs[0]
        assert first is not None
        op = node.op_type
        group = list(_attr(node, "group", []) or [])
        if op == "AllReduce":
            return [TensorShape(first.shape, first.dtype)]
        if op in ("AllGather", "ReduceScatter"):
            if not group:
                raise PlanError(f"node {node.name!r} ({op}) has no group; the planner needs the group size")
            axis = _norm_axis(int(_attr(node, "axis", 0)), len(first.shape))
            shape = list(first.shape)
            sizes = list(_attr(node, "sizes", []) or []) if op == "AllGather" else []
            if sizes:  # unequal parts: this rank's input is one of them, the output all of them
                if len(sizes) != len(group) or shape[axis] not in sizes:
                    raise PlanError(
                        f"node {node.name!r} (AllGather) has sizes {sizes} for a group of {len(group)} ranks and an "
                        f"input of {shape[axis]} along axis {axis}; list each member's length, in group order"
                    )
                shape[axis] = sum(int(s) for s in sizes)
            else:
                shape[axis] = shape[axis] * len(group) if op == "AllGather" else shape[axis] // len(group)
            return [TensorShape(tuple(shape), first.dtype)]
        if op == "Send":
            # Its output is the element count it sent, known from the input's shape; the stage split
            # orders Sends through it (`shape + 0 * count`), so later Reshape targets depend on it.
            return [TensorShape((), ir.DataType.INT64, np.array(first.numel, dtype=np.int64))]
        if op == "Recv":
            shape = list(_attr(node, "shape", []) or [])
            output = node.outputs[0]
            if not shape or any(d < 0 for d in shape):
                # the attribute is static; a dynamic dim is bound like the graph's inputs by its symbolic name
                if output.shape is None:
                    raise PlanError(f"Recv node {node.name!r} has no static shape and no declared output shape")
                shape = [self._dim(d, node) for d in output.shape]
            return [TensorShape(tuple(int(d) for d in shape), first.dtype)]
        raise PlanError(f"node {node.name!r} ({LLMIR_DOMAIN}.{op}) has no shape rule in the planner")

    def _onnx_attention(self, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
        """ONNX Attention (opset 23): Q/K/V as [B, H, S, hd] or [B, S, H*hd]; past/present K, V [B, kv, T, hd]."""
        q, k, v = inputs[0], inputs[1], inputs[2]
        assert q is not None and k is not None and v is not None
        past_key = inputs[4] if len(inputs) > 4 else None
        if len(q.shape) == 4:
            batch, heads, seq = q.shape[0], q.shape[1], q.shape[2]
            kv_heads, kv_seq, v_dim = v.shape[1], k.shape[2], v.shape[3]
            key_dim = k.shape[3]
            y = TensorShape((batch, heads, seq, v_dim), q.dtype)
        else:
            heads = int(_attr(node, "q_num_heads"))
            kv_heads = int(_attr(node, "kv_num_heads"))
            batch, seq, kv_seq = q.shape[0], q.shape[1], k.shape[1]
            key_dim, v_dim = k.shape[2] // kv_heads, v.shape[2] // kv_heads
            y = TensorShape((batch, seq, heads * v_dim), q.dtype)
        total = kv_seq + (past_key.shape[2] if past_key is not None else 0)
        outs = [
            y,
            TensorShape((batch, kv_heads, total, key_dim), k.dtype),
            TensorShape((batch, kv_heads, total, v_dim), v.dtype),
            TensorShape((batch, heads, seq, total), q.dtype),
        ]
        return outs[: len(node.outputs)]

    def _dim(self, dim: int | ir.SymbolicDim, node: ir.Node) -> int:
        if isinstance(dim, int):
            return dim
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

    def _microsoft(self, node: ir.Node, inputs: list[TensorShape | None]) -> list[TensorShape]:
        first = inputs[0]
        assert first is not None
        op = node.op_type
        if op == "SkipSimplifiedLayerNormalization" or op == "SkipLayerNormalization":
            stat = (*first.shape[:-1], 1)
            outs = [TensorShape(first.shape, first.dtype)]
            for index in range(1, len(node.outputs)):
                # outputs 1, 2 are mean / inv_std (float), 3 is the input + skip sum
                outs.append(
                    TensorShape(first.shape, first.dtype) if index == 3 else TensorShape(stat, ir.DataType.FLOAT)
                )
            return outs
        if op == "MatMulNBits":
            n = int(_attr(node, "N"))
            return [TensorShape((*first.shape[:-1], n), first.dtype)]
        if op == "GroupQueryAttention":
            num_heads = int(_attr(node, "num_heads"))
            kv_heads = int(_attr(node, "kv_num_heads"))
            batch, seq = first.shape[0], first.shape[1]
            key = inputs[1]
            # separate key input, or q|k|v packed in the first input
            packed_width = num_heads + 2 * kv_heads
            head_dim = key.shape[-1] // kv_heads if key is not None else first.shape[-1] // packed_width
            past = inputs[3]
            total = self.sizes.total if past is None else max(past.shape[2], self.sizes.total)
            present = TensorShape((batch, kv_heads, total, head_dim), first.dtype)
            return [TensorShape((batch, seq, num_heads * head_dim), first.dtype), present, present]
        raise PlanError(f"node {node.name!r} ({MS_DOMAIN}.{op}) has no shape rule in the planner")


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if len(a) == 1 and len(b) == 1:
        return ()
    if len(a) == 1:
        return b[:-2] + b[-1:]
    if len(b) == 1:
        return a[:-1]
    return (*_broadcast(a[:-2], b[:-2]), a[-2], b[-1])


def _reshape(shape: tuple[int, ...], target: list[int], allowzero: bool, node: ir.Node) -> tuple[int, ...]:
    out = [shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(target)]
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        total = math.prod(shape)
        if known == 0 or total % known:
            raise ShapeMismatchError(f"Reshape node {node.name!r}: cannot reshape {shape} to {target}")
        out[out.index(-1)] = total // known
    if math.prod(out) != math.prod(shape):
        raise ShapeMismatchError(f"Reshape node {node.name!r}: {shape} has a different size than {out}")
    return tuple(out)


def _slice_shape(shape: tuple[int, ...], inputs: list[TensorShape | None], node: ir.Node) -> tuple[int, ...]:
    starts = _int_list(inputs[1].value, node, "starts")  # type: ignore[union-attr]
    ends = _int_list(inputs[2].value, node, "ends")  # type: ignore[union-attr]
    rank = len(shape)
    axes = (
        _int_list(inputs[3].value, node, "axes")
        if len(inputs) > 3 and inputs[3] is not None
        else list(range(len(starts)))
    )
    steps = _int_list(inputs[4].value, node, "steps") if len(inputs) > 4 and inputs[4] is not None else [1] * len(axes)
    out = list(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _norm_axis(axis, rank)
        out[axis] = len(range(*slice(start, end, step).indices(shape[axis])))
    return tuple(out)


def _squeeze(op: str, shape: tuple[int, ...], axes: object) -> tuple[int, ...]:
    if op == "Unsqueeze":
        rank = len(shape) + len(axes)  # type: ignore[arg-type]
        positions = sorted(_norm_axis(int(a), rank) for a in axes)  # type: ignore[union-attr]
        out = list(shape)
        for position in positions:
            out.insert(position, 1)
        return tuple(out)
    if axes is None:
        return tuple(d for d in shape if d != 1)
    drop = {_norm_axis(int(a), len(shape)) for a in axes}  # type: ignore[union-attr]
    return tuple(d for i, d in enumerate(shape) if i not in drop)


def _numpy_op(node: ir.Node, op: str, arrays: list[np.ndarray | None]) -> np.ndarray | None:
    """The value of a small op whose inputs are all known; None where no numpy rule exists."""
    a = arrays[0]
    if op in _NUMPY_BINARY:
        return _NUMPY_BINARY[op](a, arrays[1])
    if op == "Div":
        b = arrays[1]
        if np.issubdtype(np.asarray(a).dtype, np.integer):
            return np.trunc(np.asarray(a) / b).astype(np.asarray(a).dtype)
        return np.divide(a, b)
    if op == "Neg":
        return np.negative(a)
    if op == "Cast":
        return np.asarray(a).astype(ir.DataType(int(_attr(node, "to"))).numpy())
    if op in ("Identity",):
        return a
    if op == "Not":
        return np.logical_not(a)
    if op == "Where":
        return np.where(a, arrays[1], arrays[2])
    if op == "Gather":
        return np.take(a, arrays[1], axis=int(_attr(node, "axis", 0)))
    if op == "Concat":
        return np.concatenate([x for x in arrays if x is not None], axis=int(_attr(node, "axis")))
    if op == "Unsqueeze" or op == "Squeeze":
        axes = _attr(node, "axes", None)
        if axes is None and len(arrays) > 1 and arrays[1] is not None:
            axes = [int(v) for v in np.asarray(arrays[1]).reshape(-1)]
        return np.asarray(a).reshape(_squeeze(op, tuple(np.asarray(a).shape), axes))
    if op == "Reshape":
        target = [int(v) for v in np.asarray(arrays[1]).reshape(-1)]
        return np.asarray(a).reshape(
            _reshape(tuple(np.asarray(a).shape), target, bool(_attr(node, "allowzero", 0)), node)
        )
    if op == "Range":
        return np.arange(a, arrays[1], arrays[2], dtype=np.asarray(a).dtype)
    if op == "ConstantOfShape":
        shape = tuple(int(v) for v in np.asarray(a).reshape(-1))
        if math.prod(shape) > MAX_COMPUTED_ELEMENTS:
            return None
        tensor = _attr(node, "value")
        fill = tensor.numpy().reshape(-1)[0] if tensor is not None else np.float32(0)
        return np.full(shape, fill, dtype=np.asarray(fill).dtype)
    if op == "Expand":
        target = tuple(int(v) for v in np.asarray(arrays[1]).reshape(-1))
        shape = _broadcast(np.asarray(a).shape, target)
        if math.prod(shape) > MAX_COMPUTED_ELEMENTS:
            return None
        return np.broadcast_to(a, shape).copy()
    if op == "Slice":
        shape = _slice_shape(
            tuple(np.asarray(a).shape),
            [TensorShape((), ir.DataType.INT64, x) if x is not None else None for x in arrays],
            node,
        )
        starts = [int(v) for v in np.asarray(arrays[1]).reshape(-1)]
        ends = [int(v) for v in np.asarray(arrays[2]).reshape(-1)]
        rank = np.asarray(a).ndim
        axes = (
            [int(v) for v in np.asarray(arrays[3]).reshape(-1)]
            if len(arrays) > 3 and arrays[3] is not None
            else list(range(len(starts)))
        )
        steps = (
            [int(v) for v in np.asarray(arrays[4]).reshape(-1)]
            if len(arrays) > 4 and arrays[4] is not None
            else [1] * len(axes)
        )
        index = [slice(None)] * rank
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            index[_norm_axis(axis, rank)] = slice(start, end, step)
        result = np.asarray(a)[tuple(index)]
        assert result.shape == shape
        return result
    if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin"):
        return None
    return None


# Evaluations kept while `shared_shape_evaluations` is open: key -> (model, shapes). The model is held so
# that its id cannot be reused by another model while the entry lives.
_SharedKey = tuple[int, Sizes, tuple[tuple[str, int], ...]]
_shared_evaluations: dict[_SharedKey, tuple[ir.Model, dict[str, TensorShape]]] | None = None


@contextmanager
def shared_shape_evaluations() -> Iterator[None]:
    """Within it, `evaluate_shapes` evaluates each (model, sizes, overrides) once.

    The memory plan, the cost model and the traffic estimate each evaluate a rank's model at the same
    prefill and decode sizes: for a plan's ranks that was about 7 evaluations per stage, the largest
    part of planning. Only for graphs that do not change inside the block (the finished rank models);
    the results are shared, so callers must not change them."""
    global _shared_evaluations
    outer = _shared_evaluations
    _shared_evaluations = {} if outer is None else outer
    try:
        yield
    finally:
        _shared_evaluations = outer


def evaluate_shapes(
    model: ir.Model, sizes: Sizes, overrides: Mapping[str, int] | None = None
) -> dict[str, TensorShape]:
    """Shapes (and small values) of every value of `model` at `sizes`, keyed by value name."""
    if _shared_evaluations is None:
        return ShapeEvaluator(model, sizes, overrides).run()
    key = (id(model), sizes, tuple(sorted((overrides or {}).items())))
    if key not in _shared_evaluations:
        _shared_evaluations[key] = (model, ShapeEvaluator(model, sizes, overrides).run())
    return _shared_evaluations[key][1]


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
                limits.append(int(table.const_value.shape[0]))
        for value in node.inputs:
            tensor = value.const_value if value is not None else None
            if tensor is not None and "cos_cache" in (value.name or "") and len(tensor.shape) == 2:
                limits.append(int(tensor.shape[0]))
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
