"""Memory plan of one model (a rank's model or the original): an analysis, it never edits the graph.

Four parts, in bytes, for serving at most `max_batch` sequences of at most `max_seq` tokens:

- `weight_bytes`: exact, the sum of every initializer's size from its metadata (shape x dtype); the
  weights themselves are never read.
- `kv_cache_bytes`: exact, from the past key/value inputs (`model_facts.kv_cache_inputs`): each
  shaped at batch = max_batch and past length = max_seq, i.e. 2 x layers x max_batch x kv_heads_local x
  max_seq x head_dim x itemsize for the usual [batch, kv_heads, past, head_dim] layout; a model whose
  present outputs stay shorter than max_seq (a sliding-window cache) holds only that many
  (`kv_cache_tokens`).
- `activation_peak_bytes`: the most bytes of intermediate tensors alive at once when the graph's nodes
  run in their (topological) order, with every shape evaluated at prefill (max_batch x max_seq new
  tokens, no past) and at decode (max_batch x 1 token after max_seq - 1): the larger wins. A tensor
  lives from the node that produces it until its last consumer has run (graph outputs until the end).
  Graph inputs and weights are not activations; the `present.*` outputs are the KV cache (counted
  there), so they are left out here. Nothing is assumed about in-place reuse or operator fusion.
- `communication_bytes`: the largest payload of one ai.llmir op (AllReduce / AllGather / ReduceScatter /
  Send / Recv, its input plus output) at those sizes: the staging buffers a collective needs while it
  runs; nodes run one at a time, so one op's buffers bound it.

`total_bytes` is their sum.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

from llmir_onnx.errors import LlmirError, PlanError
from llmir_onnx.ir_io import io_dtype, io_name
from llmir_onnx.model_facts import is_kv_output, kv_length_axis
from llmir_onnx.model_facts import kv_cache_inputs as past_kv_inputs
from llmir_onnx.plan.shapes import LLMIR_DOMAIN, Sizes, TensorShape, bind_dims, evaluate_shapes


@dataclass(frozen=True)
class ActivationPeak:
    """The liveness peak of one phase: its bytes, and the node whose outputs made it."""

    phase: str
    sizes: Sizes
    bytes: int
    node: str


@dataclass(frozen=True)
class MemoryPlan:
    max_batch: int
    max_seq: int
    weight_bytes: int
    kv_cache_bytes: int
    activation_peak_bytes: int
    communication_bytes: int
    total_bytes: int
    kv_cache_inputs: int
    activation_peak_phase: str
    activation_peak_node: str
    # past tokens the KV cache holds per sequence: max_seq, or fewer where the model keeps a window
    kv_cache_tokens: int = 0


def weight_bytes(model: ir.Model) -> int:
    """Exact size of all initializers, from their metadata (external data is not read)."""
    total = 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            raise PlanError(f"initializer {name!r} has no tensor; the model is malformed")
        total += int(tensor.nbytes)
    return total


def kv_cache_bytes(model: ir.Model, max_batch: int, max_seq: int, overrides: Mapping[str, int] | None = None) -> int:
    """Exact bytes of the past KV inputs shaped at batch = max_batch and past length = max_seq."""
    dims = bind_dims(model, Sizes(batch=max_batch, seq=1, past=max_seq), overrides)
    total = 0
    for value in past_kv_inputs(model):
        count = 1
        for dim in value.shape or ():
            count *= dim if isinstance(dim, int) else dims[str(dim.value)]
        total += count * int(io_dtype(value).itemsize)
    return total


def activation_peak(
    model: ir.Model,
    sizes: Sizes,
    phase: str = "",
    shapes: Mapping[str, TensorShape] | None = None,
    *,
    include_kv_outputs: bool = False,
) -> ActivationPeak:
    """Liveness peak of intermediate tensors over the graph's node order at `sizes`.

    With `include_kv_outputs` the present.* outputs count too (as a runtime that allocates them as
    fresh outputs every step sees them, e.g. onnxruntime without IO binding).
    """
    graph = model.graph
    shapes = shapes if shapes is not None else evaluate_shapes(model, sizes)
    graph_inputs = {v.name for v in graph.inputs}
    graph_outputs = {v.name for v in graph.outputs}
    not_activations = graph_inputs | set(graph.initializers)
    if not include_kv_outputs:
        not_activations |= {v.name for v in graph.outputs if is_kv_output(v)}

    last_use: dict[str, int] = {}
    nodes = list(graph)
    for index, node in enumerate(nodes):
        for value in node.inputs:
            if value is not None and value.name:
                last_use[value.name] = index

    live = 0
    peak, peak_node = 0, ""
    for index, node in enumerate(nodes):
        produced = [o.name for o in node.outputs if o.name and o.name not in not_activations]
        live += sum(shapes[name].nbytes for name in produced)
        if live > peak:
            peak, peak_node = live, node.name or node.op_type
        freed = {
            value.name
            for value in node.inputs
            if value is not None
            and value.name
            and value.name not in not_activations
            and value.name not in graph_outputs
            and last_use.get(value.name) == index
        }
        freed |= {name for name in produced if name not in last_use and name not in graph_outputs}
        live -= sum(shapes[name].nbytes for name in freed)
    return ActivationPeak(phase=phase, sizes=sizes, bytes=peak, node=peak_node)


def communication_bytes(model: ir.Model, shapes: Mapping[str, TensorShape]) -> int:
    largest = 0
    for node in model.graph:
        if node.domain != LLMIR_DOMAIN:
            continue
        payload = 0
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.name and value.name in shapes:
                payload += shapes[value.name].nbytes
        largest = max(largest, payload)
    return largest


def phase_sizes(max_batch: int, max_seq: int) -> dict[str, Sizes]:
    """The two phases every analysis evaluates: prefill of max_seq tokens, decode of 1 after max_seq - 1."""
    if max_batch < 1 or max_seq < 1:
        raise PlanError(f"--max-batch ({max_batch}) and --max-seq ({max_seq}) must be at least 1")
    return {
        "prefill": Sizes(batch=max_batch, seq=max_seq, past=0),
        "decode": Sizes(batch=max_batch, seq=1, past=max_seq - 1),
    }


def kv_cache_lengths(model: ir.Model, shapes: Mapping[str, TensorShape]) -> dict[str, int]:
    """Tokens each present KV cache output holds at the evaluated `shapes`, by output name."""
    names = {io_name(value): value for value in model.graph.outputs if is_kv_output(value)}
    return {
        name: shapes[name].shape[kv_length_axis(value)]
        for name, value in names.items()
        if name in shapes and len(shapes[name].shape) == 4
    }


def cache_run_dim(past: str, parts: int) -> str:
    """The token dim of a past KV input holding one cp rank's run of a sequence-sharded cache: the longest
    run of a balanced split, ceil(past / parts)."""
    return f"({past} + {parts - 1}) // {parts}"


def holds_cache_runs(model: ir.Model) -> bool:
    """The past KV inputs hold this rank's run of a sequence-sharded cache (`cache_run_dim`)."""
    for value in past_kv_inputs(model):
        dim = value.shape[kv_length_axis(value)] if value.shape is not None else None
        if dim is not None and not isinstance(dim, int) and re.fullmatch(r".+ // \d+", str(dim.value)):
            return True
    return False


def kv_cache_tokens(model: ir.Model, decode_shapes: Mapping[str, TensorShape], max_seq: int) -> int:
    """Past tokens the KV cache holds per sequence at `max_seq`: max_seq, or the length of the present
    outputs where they stay shorter (a sliding-window cache keeps only its window; the next step's
    past is that present). A rank holding runs of a sequence-sharded cache returns its run, not a window:
    max_seq (its past inputs are declared as the run of it, `cache_run_dim`)."""
    if holds_cache_runs(model):
        return max_seq
    lengths = kv_cache_lengths(model, decode_shapes).values()
    return min(max_seq, max(lengths)) if lengths else max_seq


def unequal_kv_cache_lengths(model: ir.Model, max_seq: int) -> str | None:
    """Why the layers' KV caches may differ in length over sequences of up to `max_seq` tokens, or None
    when they provably do not.

    Each step's past is the previous step's present, so the caches stay equal as long as every layer's
    present is as long as every other's. A layer's present holds the tokens so far, or its window of
    them (sliced to a fixed size): min(tokens, window), which is the same for every layer at every
    length up to `max_seq` exactly when it is at `max_seq`; so one decode evaluation at `max_seq` tells.
    """
    try:
        shapes = evaluate_shapes(model, phase_sizes(1, max_seq)["decode"])
    except LlmirError as error:
        return f"its shapes cannot be evaluated at {max_seq} tokens ({error})"
    lengths = kv_cache_lengths(model, shapes)
    if not lengths:
        return "it has no present.* KV cache outputs whose lengths could be compared"
    if len(set(lengths.values())) > 1:
        held = ", ".join(f"{name} {length}" for name, length in lengths.items())
        return f"its layers keep KV caches of different lengths at {max_seq} tokens ({held})"
    return None


def plan_memory(
    model: ir.Model, max_batch: int, max_seq: int, overrides: Mapping[str, int] | None = None
) -> MemoryPlan:
    """The memory plan of `model` serving max_batch sequences of up to max_seq tokens."""
    peaks = []
    comm = 0
    cache_tokens = max_seq
    for phase, sizes in phase_sizes(max_batch, max_seq).items():
        shapes = evaluate_shapes(model, sizes, overrides)
        peaks.append(activation_peak(model, sizes, phase, shapes))
        comm = max(comm, communication_bytes(model, shapes))
        if phase == "decode":
            cache_tokens = kv_cache_tokens(model, shapes, max_seq)
    peak = max(peaks, key=lambda p: p.bytes)
    weights = weight_bytes(model)
    kv = kv_cache_bytes(model, max_batch, cache_tokens, overrides)
    return MemoryPlan(
        max_batch=max_batch,
        max_seq=max_seq,
        weight_bytes=weights,
        kv_cache_bytes=kv,
        activation_peak_bytes=peak.bytes,
        communication_bytes=comm,
        total_bytes=weights + kv + peak.bytes + comm,
        kv_cache_inputs=len(past_kv_inputs(model)),
        activation_peak_phase=peak.phase,
        activation_peak_node=peak.node,
        kv_cache_tokens=cache_tokens,
    )


def format_bytes(count: float) -> str:
    """1536 -> '1.50 KiB'; binary units, as --device-memory takes them."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920, '80GB' -> 8e10, '1024' -> 1024 (as --device-memory takes them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _BYTE_UNITS:
        raise PlanError(f"cannot read {text!r} as a memory size; write e.g. 80GiB, 40GB or 1073741824")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])
