"""Layout search: per-rank memory and predicted speed of every (tp, pp), from the ORIGINAL model only.

`enumerate_layouts` never builds rank models and never reads a weight, so it plans a 70B model on a
laptop. It evaluates the original model's shapes and per-node costs once per phase (prefill of
max_batch x max_seq tokens, decode of max_batch x 1 token after max_seq - 1), then scales them:

- Tensor parallelism (Megatron): a value is replicated (R), split by attention heads / MLP columns (Q:
  1/tp of it on each rank) or split by KV heads (KV: kv_local/kv_heads, where kv_local = kv_heads/tp,
  or 1 when tp > kv_heads and each KV head is replicated tp/kv_heads times). Inside a decoder layer a
  MatMul by a weight whose input is replicated is column-parallel (its output is Q, or KV when its
  width is kv_heads x head_dim), one whose input is split is row-parallel (its output is a full-size
  partial sum, followed by an AllReduce of that size, then replicated); every other node's output
  takes the widest split of its inputs (Q over KV over R), and a KV input expanded to more elements
  (repeat_kv) becomes Q. Past KV inputs and present outputs are KV. Outside the layers everything is
  replicated: embedding and lm_head are NOT split across tp (each rank holds both), like the
  partitioner's default; with `vocab_parallel=True` (the partitioner's option of that name) the
  embedding table and lm_head are split by vocabulary rows/columns (1/tp each), the embedding lookup is
  followed by an AllReduce of [batch, seq, hidden] and the logits by an AllGather.
- Pipeline parallelism: contiguous layer ranges, chosen by `plan.stage_balance.balance_stages`
  (minimise the slowest stage) with prefill + decode time as the cost and the per-rank memory as the
  limit. Everything before layer 0 that only the first layer uses (the embedding) is on stage 0; what
  several layers use (mask, rotary tables) is recomputed by every stage that needs it; everything after
  the last layer (final norm, lm_head) is on the last stage. A stage receives the hidden state
  [batch, seq, hidden] from the previous one (Send/Recv).

Per rank: exact weight bytes (each initializer once, scaled as above), exact KV cache of its layers,
an activation peak from liveness over its nodes with scaled sizes (values received from an earlier
stage count from the start), and the largest collective payload. Time: roofline + overhead per
node (scaled FLOPs and bytes) + alpha-beta collectives (`plan.cost`); the prefill latency and the
decode step are the sums over stages plus the Send/Recv between them (one batch flows through the
pipeline at a time: pipelining several micro-batches is not modelled, so pp never speeds up one
request, only fits bigger models). Decode tokens/s = max_batch / decode step.

Devices and hosts (`plan.devices.Cluster`): rank r of a layout runs on the cluster's r-th device
(host-major, so a tp group of consecutive ranks stays in one host when tp divides the host size). A
stage is timed on the slowest profile among its devices, its tp collectives over the slowest link the
tp group spans and its Recv over the link to the previous stage's ranks; it must fit the smallest
memory among its devices; the cuts balance each stage on its own devices. Without a cluster, `devices`
of `device` in hosts of the profile's usual size (8 for the GPU profiles).

With `allow_kv_replication=False` (a partitioner that cannot replicate KV heads) tp must also
divide the KV heads.

Context parallelism (`max_cp`, `plan --max-cp`): each (tp, pp) rank copied over cp ranks that split the
prompt's tokens, as `partition --cp` does: every value of the token stream (`_find_cp_facts`) and the work
on it scaled to ceil(n/cp) of n tokens, an AllGather over the cp group where the stream meets the past
cache or a graph output, the weights whole. Every cp layout is listed with each KV cache layout of
`partition --cp-kv-cache`: replicated (whole on every cp rank; decode unchanged plus the gathers' latency)
and sharded (`_find_key_sharded`: a block of B = ceil(max_seq / cp) tokens per rank, held and attended over
at decode, plus the query's AllGather and three log-sum-exp AllReduces per layer). docs/PLANNING.md has the
details, why both are listed, and how the estimate compares with the cp rank models.

Layouts: by default every (tp, pp) with tp x pp == devices (with `max_cp`, also every tp x cp x pp);
`include_fewer=True` adds every tp x pp < devices (for models that fit on fewer devices, leaving the
rest for replicas). A layout that breaks a rule (tp must divide the heads, tp and kv heads must divide
one another, pp <= layers; an MLP width or a vocabulary tp does not divide splits into parts of one
element) is listed as invalid with its reason; one that does not fit says by how much.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import onnx_ir as ir

from llmir_onnx.errors import LlmirError, PlanError
from llmir_onnx.ir_io import io_dtype, io_name, io_shape
from llmir_onnx.mesh import DeviceMesh, MeshCoords, cache_block, grouped_shares
from llmir_onnx.model_facts import (
    is_kv_output_name,
    is_lowered_for_cp,
    kv_cache_inputs,
    last_token_attention,
    last_token_attention_reason,
    layer_of_node_by_name,
    mask_total_axis,
)
from llmir_onnx.plan.cost import (
    FREE_OPS,
    MATRIX_PRODUCT_OPS,
    NodeCost,
    comm_seconds,
    is_activation,
    memory_seconds,
    node_cost,
)
from llmir_onnx.plan.devices import Cluster, DeviceProfile, LinkProfile, derived_tp_weights, uniform_cluster
from llmir_onnx.plan.memory import format_bytes, kv_cache_tokens, phase_sizes
from llmir_onnx.plan.shapes import LLMIR_DOMAIN, Sizes, TensorShape, bind_dims, evaluate_shapes
from llmir_onnx.plan.stage_balance import StageUnit, balance_stages

REPLICATED, HEADS, KV_HEADS = "R", "Q", "KV"
# `partition --cp-kv-cache`: the KV cache whole on every cp rank, or sharded along its tokens over cp. The
# search lists every cp layout with each: which wins is a trade the search is for (a sharded cache holds 1/cp
# of the cache per rank and reads a block at decode, for three AllReduces and a query gather per layer).
REPLICATED_CACHE, SHARDED_CACHE = "replicated", "sharded"
CP_KV_CACHES = (REPLICATED_CACHE, SHARDED_CACHE)


@dataclass(frozen=True)
class RankEstimate:
    """One pipeline stage's rank (all tp ranks of a stage are alike)."""

    stage: int
    layers: tuple[int, int]  # [start, stop)
    weight_bytes: int
    kv_cache_bytes: int
    activation_peak_bytes: int
    communication_bytes: int
    total_bytes: int
    prefill_s: float
    decode_s: float
    # where the stage runs: its devices' profile(s), the smallest memory among them, and the link its
    # tp collectives run over with the hosts the tp group spans ('' and 0 when tp = 1)
    device: str = ""
    device_memory_bytes: int = 0
    tp_link: str = ""
    tp_hosts: int = 0


@dataclass(frozen=True)
class LayoutEstimate:
    tp: int
    pp: int
    devices: int
    valid: bool
    reason: str
    max_batch: int
    max_seq: int
    fits: bool = False
    max_rank_bytes: int = 0
    device_memory_bytes: int = 0
    # None for an invalid layout (JSON has no infinity)
    prefill_s: float | None = None
    decode_step_s: float | None = None
    decode_tokens_per_s: float | None = None
    ranks: list[RankEstimate] = field(default_factory=list)
    # heads per tp rank of an uneven split (empty: even), and the weights it follows (empty: none)
    tp_shares: tuple[int, ...] = ()
    tp_weights: tuple[float, ...] = ()
    # context parallelism (`partition --cp`): the prompt's tokens split over cp ranks per (tp, pp) rank, and
    # the KV cache over them (`partition --cp-kv-cache`): replicated (whole on each) or sharded (a block each)
    cp: int = 1
    cp_kv_cache: str = REPLICATED_CACHE

    @property
    def label(self) -> str:
        """'tp2 x pp1'; an uneven split says its heads per tp rank, runs shortened: 'tp16[8x5,8x3] x pp1';
        with cp: 'tp2 x cp2 x pp1', 'tp2 x cp2[kv sharded] x pp1' with the KV cache sharded over cp."""
        runs: list[list[int]] = []
        for share in self.tp_shares:
            if runs and runs[-1][1] == share:
                runs[-1][0] += 1
            else:
                runs.append([1, share])
        shares = ",".join(f"{count}x{share}" if count > 2 else ",".join([str(share)] * count) for count, share in runs)
        cp = f" x cp{self.cp}" if self.cp > 1 else ""
        cp += "[kv sharded]" if self.cp > 1 and self.cp_kv_cache == SHARDED_CACHE else ""
        return f"tp{self.tp}[{shares}]{cp} x pp{self.pp}" if shares else f"tp{self.tp}{cp} x pp{self.pp}"


@dataclass(frozen=True)
class ModelShape:
    """What the layout rules need to know about the model."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    column_widths: tuple[int, ...]  # output widths of the column-parallel weights (heads x hd, mlp, ...)


# A node's activations as a stage's peak counts them: (value name, bytes on one tp rank).
PeakTerms = list[tuple[str, float]]
# A node on one rank: (flops, bytes, the activations' bytes among them, collective payload, 1 if not free,
# the matrix product's weights' bytes among them).
ScaledNode = tuple[float, float, tuple[float, ...], float, int, tuple[float, ...]]


_Memoised = TypeVar("_Memoised")


def _per_node_memo(
    store: dict[tuple[Any, ...], list[_Memoised | None]], key: tuple[Any, ...], nodes: int
) -> list[_Memoised | None]:
    """The memo of one (phase, tp, part, cp) point, one slot per node: hashing a key per node would cost
    more than the layout search saves by memoising."""
    memo = store.get(key)
    if memo is None:
        memo = store[key] = [None] * nodes
    return memo


class _Analysis:
    """Structure and per-phase costs of the original model, computed once and scaled per layout."""

    def __init__(
        self,
        model: ir.Model,
        max_batch: int,
        max_seq: int,
        overrides: Mapping[str, int] | None,
        vocab_parallel: bool = False,
    ) -> None:
        self.model = model
        self.vocab_parallel = vocab_parallel
        self.overrides = overrides
        self.nodes = list(model.graph)
        self.index = {id(node): i for i, node in enumerate(self.nodes)}
        self.sizes = phase_sizes(max_batch, max_seq)
        self.shapes: dict[str, dict[str, TensorShape]] = {
            phase: evaluate_shapes(model, sizes, overrides) for phase, sizes in self.sizes.items()
        }
        self.costs: dict[str, list[NodeCost]] = {
            phase: [node_cost(node, shapes) for node in self.nodes] for phase, shapes in self.shapes.items()
        }
        # Every layout reads these sizes many times over (a 70B shape: a million reads); computed once.
        self.value_bytes: dict[str, dict[str, int]] = {
            phase: {name: shape.nbytes for name, shape in shapes.items()} for phase, shapes in self.shapes.items()
        }
        # the values the cost model may charge at the cache bandwidth (`cost.is_activation`)
        self.activations = {v.name for node in self.nodes for v in node.outputs if v.name and is_activation(v)}
        # per-node memos by (phase, tp, part, cp) (`_per_node_memo`)
        self._scaled_nodes: dict[tuple[Any, ...], list[ScaledNode | None]] = {}
        self._peak_terms: dict[tuple[Any, ...], list[tuple[PeakTerms, PeakTerms] | None]] = {}
        self._cp: dict[bool, _CpFacts] = {}  # by sharded cache: found on the first cp layout (`cp_facts`)
        self._chunk_scales: dict[tuple[str, int, bool], dict[str, float]] = {}
        self._kv_bytes_at: dict[tuple[str, int], int] = {}
        self._boundaries: dict[str, list[float]] = {}
        self.past_inputs = {io_name(v) for v in kv_cache_inputs(model)}
        if not self.past_inputs:
            raise PlanError("the model has no past key/value inputs; the layout search needs a decoder with a KV cache")
        # each KV input's exact size at batch = max_batch and the past the cache holds (as the memory plan counts it)
        cache_tokens = self.cache_tokens = kv_cache_tokens(model, self.shapes["decode"], max_seq)
        at_max = bind_dims(model, Sizes(batch=max_batch, seq=1, past=cache_tokens), overrides)
        self.kv_bytes = {
            io_name(v): math.prod(d if isinstance(d, int) else at_max[str(d.value)] for d in io_shape(v))
            * io_dtype(v).itemsize
            for v in kv_cache_inputs(model)
        }
        # (input names, output names) per node: onnx_ir's name properties cost more than the peak's arithmetic
        self.value_names: list[tuple[list[str], list[str]]] = [
            ([v.name for v in node.inputs if v is not None and v.name], [v.name for v in node.outputs if v.name])
            for node in self.nodes
        ]
        self.node_layer = [layer_of_node_by_name(node) for node in self.nodes]
        layer_ids = sorted({layer for layer in self.node_layer if layer is not None})
        if not layer_ids or layer_ids != list(range(len(layer_ids))):
            raise PlanError(
                "cannot find the decoder layers from node names or scope metadata (expected '/layers.N/' or "
                "'/h.N/', N = 0, 1, ...); the layout search needs the layer structure"
            )
        self.num_layers = len(layer_ids)
        self._place_outside_nodes()
        self._propagate_kinds()
        self.shape = self._model_shape()
        # What a stage's activation peak leaves out: weights, the model's inputs and its KV outputs.
        self.graph_output_names = {v.name for v in model.graph.outputs}
        self.peak_excluded = {*self.weights, *(v.name for v in model.graph.inputs)}
        self.peak_excluded |= {name for name in self.graph_output_names if is_kv_output_name(name or "")}

    # -- structure

    def _place_outside_nodes(self) -> None:
        """Node placement: its layer, 'pre' (stage 0 only), 'shared' (every stage) or 'post' (last stage)."""
        first_layer_node = min(i for i, layer in enumerate(self.node_layer) if layer is not None)
        consumers_layers: dict[str, set[int | str]] = {}
        self.placement: list[int | str] = [0] * len(self.nodes)
        for i in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[i]
            layer = self.node_layer[i]
            if layer is not None:
                place: int | str = layer
                reach: set[int | str] = {layer}
            elif i > first_layer_node:
                place = "post"
                reach = {"post"}
            else:
                reach = set()
                for output in node.outputs:
                    reach |= consumers_layers.get(output.name or "", set())
                # only layer 0 (or nothing) needs it: stage 0 alone; otherwise every stage computes its own
                place = "pre" if reach <= {0} else "shared"
            self.placement[i] = place
            for value in node.inputs:
                if value is not None and value.name:
                    consumers_layers.setdefault(value.name, set()).update(reach)
        self.past_layer: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            layer = self.node_layer[i]
            for value in node.inputs:
                if value is not None and value.name in self.past_inputs and layer is not None:
                    self.past_layer.setdefault(value.name, layer)
        missing = self.past_inputs - set(self.past_layer)
        if missing:
            raise PlanError(f"KV inputs {sorted(missing)} are not read by any decoder layer node")

    def _propagate_kinds(self) -> None:
        graph = self.model.graph
        self.kind: dict[str, str] = {v.name or "": REPLICATED for v in graph.inputs}
        for name in self.past_inputs:
            self.kind[name] = KV_HEADS
        self.weights = set(graph.initializers)
        self.weight_kind: dict[str, str] = {name: REPLICATED for name in self.weights}
        # node index -> the collective that follows it under tp: "AllReduce" (row-parallel products, a
        # vocab-parallel embedding) or "AllGather" (vocab-parallel logits)
        self.collectives: dict[int, str] = {}
        self.row_parallel: set[int] = set()
        vocab = self._vocab_size()
        kv_widths = set()
        for name in self.past_inputs:
            shape = self.shapes["prefill"][name].shape
            self.kv_heads, self.head_dim = shape[1], shape[3]
            kv_widths.add(shape[1] * shape[3])
        self.column_widths: set[int] = set()
        prefill = self.shapes["prefill"]
        for i, node in enumerate(self.nodes):
            inputs = [v for v in node.inputs if v is not None and v.name and v.name not in self.weights]
            kinds = [self.kind.get(v.name or "", REPLICATED) for v in inputs]
            weight = next((v for v in node.inputs if v is not None and v.name in self.weights), None)
            in_layer = self.node_layer[i] is not None
            out_kind = REPLICATED
            if node.op_type in ("MatMul", "Gemm") and weight is not None and in_layer and len(inputs) == 1:
                width = prefill[weight.name or ""].shape[-1]
                if kinds[0] == REPLICATED:
                    out_kind = KV_HEADS if (width in kv_widths and self.kv_heads != self._heads_guess()) else HEADS
                    self.weight_kind[weight.name or ""] = out_kind
                    if out_kind == HEADS:
                        self.column_widths.add(width)
                else:
                    self.weight_kind[weight.name or ""] = kinds[0]
                    self.row_parallel.add(i)
                    self.collectives[i] = "AllReduce"
                    out_kind = REPLICATED
            elif self.vocab_parallel and weight is not None and self._is_vocab_table(i, node, weight, vocab):
                self.weight_kind[weight.name or ""] = HEADS
                if node.op_type == "Gather":  # each rank looks up its rows; the partial rows are summed
                    self.row_parallel.add(i)
                    self.collectives[i] = "AllReduce"
                else:  # lm_head: each rank computes its vocab slice of the logits, then they are gathered
                    out_kind = HEADS
                    self.collectives[i] = "AllGather"
                    self.column_widths.add(vocab)
            elif HEADS in kinds:
                out_kind = HEADS
            elif KV_HEADS in kinds:
                kv_numel = max(prefill[v.name or ""].numel for v, k in zip(inputs, kinds, strict=True) if k == KV_HEADS)
                out_numel = max((prefill[o.name].numel for o in node.outputs if o.name in prefill), default=0)
                out_kind = HEADS if out_numel > kv_numel else KV_HEADS
            for output in node.outputs:
                if output.name:
                    self.kind[output.name] = out_kind

    def _vocab_size(self) -> int:
        """The last dimension of the first graph output (the logits)."""
        logits = self.model.graph.outputs[0]
        return self.shapes["prefill"][logits.name or ""].shape[-1]

    def _is_vocab_table(self, i: int, node: ir.Node, weight: ir.Value, vocab: int) -> bool:
        shape = self.shapes["prefill"][weight.name or ""].shape
        if len(shape) != 2 or self.node_layer[i] is not None:
            return False
        if node.op_type == "Gather":
            return self.placement[i] == "pre" and node.inputs[0] is weight and shape[0] == vocab
        return node.op_type in ("MatMul", "Gemm") and self.placement[i] == "post" and shape[1] == vocab

    def _heads_guess(self) -> int:
        if not hasattr(self, "_heads"):
            self._heads = self._find_heads()
        return self._heads

    def _find_heads(self) -> int:
        """Attention heads: dim 1 of the (eager) Softmax input, or the heads of an attention op."""
        prefill = self.shapes["prefill"]
        for i, node in enumerate(self.nodes):
            if self.node_layer[i] is None:
                continue
            if node.op_type == "Softmax" and node.inputs[0] is not None:
                shape = prefill[node.inputs[0].name or ""].shape
                if len(shape) == 4:
                    return shape[1]
            if node.op_type == "GroupQueryAttention":
                return int(node.attributes["num_heads"].value)
            if node.op_type == "Attention" and (node.domain or "") in ("", "ai.onnx"):
                if "q_num_heads" in node.attributes:
                    return int(node.attributes["q_num_heads"].value)
                query = node.inputs[0] if node.inputs else None
                if query is not None:
                    return prefill[query.name or ""].shape[1]
        raise PlanError(
            "cannot find the attention head count (no 4-D Softmax, Attention or GroupQueryAttention in a layer)"
        )

    def _model_shape(self) -> ModelShape:
        return ModelShape(
            layers=self.num_layers,
            heads=self._heads_guess(),
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            column_widths=tuple(sorted(self.column_widths)),
        )

    # -- scaling

    def scale(self, kind: str, tp: int, part: RankPart | None = None) -> float:
        if part is not None and kind in (HEADS, KV_HEADS):
            return part.heads if kind == HEADS else part.kv_heads
        if kind == HEADS:
            return 1.0 / tp
        if kind == KV_HEADS:
            kv_local = max(1, self.kv_heads // tp)
            return kv_local / self.kv_heads
        return 1.0

    def stage_nodes(self, start: int, stop: int, last: bool) -> list[int]:
        chosen = []
        for i, place in enumerate(self.placement):
            if isinstance(place, int):
                if start <= place < stop:
                    chosen.append(i)
            elif place == "shared" or (place == "pre" and start == 0) or (place == "post" and last):
                chosen.append(i)
        return chosen

    def scaled_node(
        self, i: int, phase: str, tp: int, part: RankPart | None = None, cp: int = 1, sharded: bool = False
    ) -> ScaledNode:
        """(flops, bytes, the activations among the bytes, payload of the collective after it, the nodes it
        runs as, each paying the node overhead: 0 if free, the matrix product's weights among the bytes) of
        node i on one tp rank (its `part` of an uneven split; None: 1/tp) and one cp rank (its chunk of the
        tokens; with `sharded`, its block of the KV cache's). Memoised: every stage split the search tries
        reads it again."""
        memo = _per_node_memo(self._scaled_nodes, (phase, tp, part, cp, sharded), len(self.nodes))
        scaled = memo[i]
        if scaled is None:
            scaled = memo[i] = self._scale_node(i, phase, tp, part, cp, sharded)
        return scaled

    def _scale_node(
        self, i: int, phase: str, tp: int, part: RankPart | None, cp: int = 1, sharded: bool = False
    ) -> ScaledNode:
        node = self.nodes[i]
        value_bytes = self.value_bytes[phase]
        cost = self.costs[phase][i]
        chunk = self.chunk_scales(phase, cp, sharded)
        moved = 0.0
        activations: list[float] = []  # as node_cost's activation_bytes, scaled like the bytes
        weights: list[float] = []  # as node_cost's weight_bytes, scaled like the bytes
        is_product = node.op_type in MATRIX_PRODUCT_OPS and (node.domain or "") != LLMIR_DOMAIN
        if node.op_type not in FREE_OPS:
            if node.op_type == "Gather" and cost.bytes:
                scale = self._value_scale(node.outputs[0], tp, part=part) * chunk.get(node.outputs[0].name or "", 1.0)
                moved = cost.bytes * scale
                activations = [size * scale for size in cost.activation_bytes]
            else:
                for value in (*node.inputs, *node.outputs):
                    name = value.name if value is not None else None  # onnx_ir's name property is not free
                    if value is None or not name or name not in value_bytes:
                        continue
                    scaled = value_bytes[name] * (self._value_scale(value, tp, i, part) * chunk.get(name, 1.0))
                    moved += scaled
                    if scaled and name in self.activations:
                        activations.append(scaled)
                    elif scaled and is_product and name in self.weights:
                        weights.append(scaled)
        if node.op_type in ("MatMul", "Gemm", "Gather") and self._weight_of(node):
            flop_scale = self.scale(self.weight_kind[self._weight_of(node)], tp, part)
        else:
            flop_scale = self.scale(self.kind.get(node.outputs[0].name or "", REPLICATED), tp, part)
        # the collective moves the full-size tensor: the partial sums, or the gathered output (of a cp chunk)
        payload = float(value_bytes[node.outputs[0].name or ""]) if (tp > 1 and i in self.collectives) else 0.0
        nodes = int(node.op_type not in FREE_OPS)
        if chunk:
            token_share = chunk.get(node.outputs[0].name or "", 1.0)
            payload *= token_share
            facts = self.cp_facts(sharded)
            if i in facts.partials:  # P @ V: its output is whole, its work the rank's keys
                token_share = chunk.get(self.value_names[i][0][0], 1.0)
            flop_scale *= token_share
            if i in facts.softmaxes:
                # the log-sum-exp composite in place of the Softmax (context_parallel_cache): ReduceMax,
                # Sub, Exp, ReduceSum and Div read or write the rank's scores 8 times where the Softmax
                # did twice (in and out), as 5 nodes; its two AllReduces are `cp_reduces`
                scores = moved / 2
                moved += 6 * scores
                activations = [*activations, *[scores] * 6] if scores and activations else activations
                nodes = 5
        return cost.flops * flop_scale, moved, tuple(activations), float(payload), nodes, tuple(weights)

    # -- context parallelism

    def cp_facts(self, sharded: bool = False) -> _CpFacts:
        """The cp pass's split, with the KV cache replicated over cp or (`sharded`) sharded along the tokens."""
        if sharded not in self._cp:
            self._cp[sharded] = _find_cp_facts(self, sharded)
        return self._cp[sharded]

    def kv_bytes_at(self, name: str, tokens: int) -> int:
        """Bytes of past KV input `name` at batch = max_batch holding `tokens` tokens."""
        key = (name, tokens)
        if key not in self._kv_bytes_at:
            dims = bind_dims(self.model, Sizes(batch=self.sizes["prefill"].batch, seq=1, past=tokens), self.overrides)
            value = next(v for v in kv_cache_inputs(self.model) if io_name(v) == name)
            count = math.prod(d if isinstance(d, int) else dims[str(d.value)] for d in io_shape(value))
            self._kv_bytes_at[key] = int(count * io_dtype(value).itemsize)
        return self._kv_bytes_at[key]

    def chunk_scales(self, phase: str, cp: int, sharded: bool = False) -> Mapping[str, float]:
        """Each token-stream value's scale on one cp rank, ceil(n / cp) / n of its tokens (n: the phase's new
        tokens; 1 at decode: the token on cp rank 0, padding on the others); empty at cp 1. With `sharded`,
        each key-sharded value's too: B / L of its keys' axis of L tokens (the past, or past + new), B =
        ceil(max_seq / cp) the block a cp rank owns (cp rank 0's, full from B tokens on: the bound every rank
        is planned at, as the pass's memory plan plans it)."""
        if cp == 1:
            return {}
        scales = self._chunk_scales.get((phase, cp, sharded))
        if scales is None:
            sizes = self.sizes[phase]
            facts = self.cp_facts(sharded)
            scales = dict.fromkeys(facts.stream, math.ceil(sizes.seq / cp) / sizes.seq)
            block = cache_block(self.sizes["prefill"].seq, cp)
            for name, axis in facts.keys.items():
                length = sizes.past if axis == "past" else sizes.past + sizes.seq
                if length:
                    scales[name] = min(block, length) / length
            self._chunk_scales[(phase, cp, sharded)] = scales
        return scales

    def cp_reduces(self, i: int, phase: str, tp: int, part: RankPart | None, cp: int, sharded: bool) -> list[float]:
        """Payloads of the AllReduces over cp at node i with a sharded KV cache: a Softmax over the keys, its
        max and its denominator (each [.., n, 1]: the scores without their keys' axis); P @ V, its partial
        output (whole: [.., n, head_dim])."""
        if not sharded or cp == 1:
            return []
        facts = self.cp_facts(sharded)
        value_bytes = self.value_bytes[phase]
        inputs, outputs = self.value_names[i]
        if i in facts.softmaxes:
            scores = inputs[0]
            sizes = self.sizes[phase]
            reduced = value_bytes[scores] / (sizes.past + sizes.seq)
            return [reduced * self.scale(self.kind.get(scores, REPLICATED), tp, part)] * 2
        if i in facts.partials:
            return [value_bytes[outputs[0]] * self.scale(self.kind.get(outputs[0], REPLICATED), tp, part)]
        return []

    def cp_gathers(
        self, i: int, phase: str, tp: int, part: RankPart | None, cp: int, sharded: bool = False
    ) -> list[float]:
        """Payloads of the cp AllGathers at node i (each the gathered value: c x cp tokens, c = ceil(n / cp))."""
        names = self.cp_facts(sharded).gathers.get(i) if cp > 1 else None
        if not names:
            return []
        seq = self.sizes[phase].seq
        padded = math.ceil(seq / cp) * cp / seq
        value_bytes = self.value_bytes[phase]
        return [
            value_bytes[name] * self.scale(self.kind.get(name, REPLICATED), tp, part) * padded
            for name in names
            if name in value_bytes
        ]

    def peak_terms(
        self, i: int, phase: str, tp: int, part: RankPart | None, cp: int = 1, sharded: bool = False
    ) -> tuple[PeakTerms, PeakTerms]:
        """Node i's activations on one tp rank, as a stage's peak counts them: (its outputs, its inputs that
        a last use frees), each (name, bytes). Memoised like `scaled_node`."""
        memo = _per_node_memo(self._peak_terms, (phase, tp, part, cp, sharded), len(self.nodes))
        terms = memo[i]
        if terms is None:
            terms = memo[i] = self._node_peak_terms(i, phase, tp, part, cp, sharded)
        return terms

    def _node_peak_terms(
        self, i: int, phase: str, tp: int, part: RankPart | None, cp: int, sharded: bool = False
    ) -> tuple[PeakTerms, PeakTerms]:
        """`peak_terms`, computed: a value's bytes on the tp rank, times its token share on a cp rank."""
        value_bytes, excluded = self.value_bytes[phase], self.peak_excluded
        chunk = self.chunk_scales(phase, cp, sharded)
        facts = self.cp_facts(sharded) if cp > 1 else None
        if facts is not None and facts.outputs.intersection(self.value_names[i][1]):
            # a graph output (the logits) is gathered, then sliced to n tokens: both copies are alive
            # at the Slice, c x cp + n tokens (the chunk is freed after the gather)
            seq = self.sizes[phase].seq
            chunk = {**chunk, **dict.fromkeys(facts.outputs, math.ceil(seq / cp) * cp / seq + 1)}
        token_share = chunk.get  # 1.0 for a value not split over cp (every value at cp 1)
        node = self.nodes[i]
        outputs = [
            (out.name, value_bytes[out.name] * self._value_scale(out, tp, i, part) * token_share(out.name, 1.0))
            for out in node.outputs
            if out.name and out.name not in excluded
        ]
        inputs = [
            (value.name, value_bytes[value.name] * self._value_scale(value, tp, part=part) * token_share(value.name, 1))
            for value in node.inputs
            if value is not None and value.name in value_bytes and value.name not in excluded
            and value.name not in self.graph_output_names
        ]
        return outputs, inputs

    def collective_seconds(self, i: int, payload: float, tp: int, link: LinkProfile, hosts: int = 1) -> float:
        return comm_seconds(self.collectives[i], payload, tp, link, hosts) if payload else 0.0

    def _weight_of(self, node: ir.Node) -> str:
        for value in node.inputs:
            if value is not None and value.name in self.weights:
                return value.name
        return ""

    def _value_scale(
        self, value: ir.Value, tp: int, node_index: int | None = None, part: RankPart | None = None
    ) -> float:
        name = value.name or ""
        if name in self.weights:
            return self.scale(self.weight_kind.get(name, REPLICATED), tp, part)
        if node_index is not None and node_index in self.row_parallel and value in self.nodes[node_index].outputs:
            return 1.0  # a row-parallel product is a full-size partial sum
        return self.scale(self.kind.get(name, REPLICATED), tp, part)


# The structure probe of context parallelism: shapes at a batch and token counts no model dim is likely to
# equal, so that a dim of PROBE_NEW is the new-token axis (a [batch * tokens, ..] flattening is 2 x 11).
PROBE_BATCH, PROBE_NEW, PROBE_PAST = 2, 11, 6


@dataclass(frozen=True)
class _CpFacts:
    """What `partition --cp` would split, as the layout search sees it (`_find_cp_facts`)."""

    refusal: str  # '' when partition --cp takes the model
    stream: frozenset[str]  # values each cp rank holds a chunk of (their token axis split)
    gathers: dict[int, list[str]]  # node index -> the stream values AllGathered over cp there
    outputs: frozenset[str] = frozenset()  # graph outputs in the stream (gathered, then sliced to n tokens)
    # With the KV cache sharded over cp (`partition --cp-kv-cache sharded`; `_find_cp_facts(sharded=True)`):
    # key-sharded value -> the axis (past or total length) of which a cp rank holds its block's tokens
    keys: Mapping[str, str] = field(default_factory=dict)
    softmaxes: frozenset[int] = frozenset()  # Softmax over the keys: the log-sum-exp composite, 2 AllReduces
    partials: frozenset[int] = frozenset()  # P @ V contracting the keys: a partial sum, AllReduced over cp


def _find_cp_facts(analysis: _Analysis, sharded: bool = False) -> _CpFacts:
    """The token stream as the cp pass decides it (passes/context_parallel.py), from the original model's
    shapes: a node in a decoder layer or after them joins when it has an output with the new-token axis and
    reads the stream, or starts it (a token-axis activation with a float weight: a projection, a norm's
    scale); its token-axis outputs join the stream. What is made before the layers (the embedding, the mask,
    position and rotary tables) stays whole on every rank. A stream value read by a node outside the stream
    (the Concat of new keys/values with the past cache, a flattening Reshape before a [batch*tokens, ..]
    Gemm) or a graph output (the logits) is AllGathered there, once. Approximate where the pass looks
    closer (a mask cut to the rank's rows counts whole here; a node whose rule refuses the split joins).

    `sharded` (`--cp-kv-cache sharded`, passes/context_parallel_cache.py): the past inputs are key-sharded
    (each cp rank holds its block of the cache's tokens), and so is every output, with the past or total
    length, of a layer node that reads a key-sharded value (the present, the GQA repeat, the scores, the mask
    add, the softmax). Such a node is outside the token stream: its stream inputs (the query) are gathered
    there, and what it makes without the keys' axis (P @ V, a partial sum AllReduced over cp) is whole on
    every rank until a projection starts the stream again (o_proj). Refused as the pass refuses: a model
    without an attention mask input, or one whose cache is cut to a window (a read outside attention)."""
    node = last_token_attention(analysis.model.graph)
    if node is not None:
        return _CpFacts(last_token_attention_reason(node), frozenset(), {})
    try:
        probe = evaluate_shapes(
            analysis.model, Sizes(batch=PROBE_BATCH, seq=PROBE_NEW, past=PROBE_PAST), analysis.overrides
        )
    except LlmirError as error:
        return _CpFacts(f"cp: the shapes cannot be evaluated at {PROBE_NEW} new tokens ({error})", frozenset(), {})
    prefill, seq = analysis.shapes["prefill"], analysis.sizes["prefill"].seq
    refusal, keys, softmaxes, partials = _find_key_sharded(analysis, probe) if sharded else ("", {}, set(), set())
    if refusal:
        return _CpFacts(refusal, frozenset(), {})
    tokens = set()
    for name, shape in probe.items():
        whole = prefill.get(name)
        if (
            whole is not None
            and len(whole.shape) == len(shape.shape)
            and any(p == PROBE_NEW and w == seq for p, w in zip(shape.shape, whole.shape, strict=True))
        ):
            tokens.add(name)
    stream: set[str] = set()
    gathers: dict[int, list[str]] = {}
    gathered: set[str] = set()
    for i, node in enumerate(analysis.nodes):
        inputs, outputs = analysis.value_names[i]
        place = analysis.placement[i]
        reads_stream = any(name in stream for name in inputs)
        starts = any(name in tokens for name in inputs) and any(
            value is not None and value.name in analysis.weights and io_dtype(value).is_floating_point()
            and (value.const_value is None or value.const_value.size > 1)
            for value in node.inputs
        )
        made = [name for name in outputs if name in tokens]
        reads_keys = any(name in keys for name in inputs)
        if (isinstance(place, int) or place == "post") and made and (reads_stream or starts) and not reads_keys:
            stream.update(made)
        elif node.op_type != "Shape":  # a Shape of a chunk is made whole in place: no gather
            for name in inputs:
                if name in stream and name not in gathered:
                    gathered.add(name)
                    gathers.setdefault(i, []).append(name)
    producers = {name: i for i, (_, outputs) in enumerate(analysis.value_names) for name in outputs}
    for output in sorted(name for name in analysis.graph_output_names if name):
        if output in stream and output not in gathered and not is_kv_output_name(output):
            gathers.setdefault(producers[output], []).append(output)
    if not stream:
        return _CpFacts("cp finds no per-token work on the new tokens in this model", frozenset(), {})
    stream_outputs = frozenset(name for name in analysis.graph_output_names if name in stream)
    return _CpFacts(
        "", frozenset(stream), gathers, stream_outputs, keys, frozenset(softmaxes), frozenset(partials)
    )


def _find_key_sharded(
    analysis: _Analysis, probe: Mapping[str, TensorShape]
) -> tuple[str, dict[str, str], set[int], set[int]]:
    """(refusal, key-sharded value -> 'past' | 'total', Softmax nodes over the keys, P @ V nodes) of a KV
    cache sharded over cp (`_find_cp_facts`). The probe's past (PROBE_PAST) and total (PROBE_PAST + PROBE_NEW)
    lengths tell the keys' axis, as the pass tells it by the cache-length symbols."""
    try:
        mask_total_axis(analysis.model)
    except PlanError as error:
        return str(error), {}, set(), set()
    if analysis.cache_tokens < analysis.sizes["prefill"].seq:
        return (
            f"--cp-kv-cache sharded: the model keeps a window of {analysis.cache_tokens} cache tokens (a read of the "
            "cache outside attention, which the sharded cache refuses); use --cp-kv-cache replicated",
            {}, set(), set(),
        )  # fmt: skip
    decode = analysis.sizes["decode"]
    # (probe length, decode length): an axis is the cache's past or total length when it is at both sizes
    lengths = {(PROBE_PAST, decode.past): "past", (PROBE_PAST + PROBE_NEW, decode.past + decode.seq): "total"}
    keys = dict.fromkeys(analysis.past_inputs, "past")
    softmaxes: set[int] = set()
    partials: set[int] = set()
    for i, node in enumerate(analysis.nodes):
        inputs, outputs = analysis.value_names[i]
        if not isinstance(analysis.placement[i], int) or not any(name in keys for name in inputs):
            continue
        for name in outputs:
            shape = probe[name].shape if name in probe else ()
            at_decode = analysis.shapes["decode"][name].shape if name in analysis.shapes["decode"] else ()
            if len(shape) < 2 or len(at_decode) != len(shape):
                continue
            axes = [lengths[pair] for pair in zip(shape, at_decode, strict=True) if pair in lengths]
            if len(axes) == 1:
                keys[name] = axes[0]
        if node.op_type == "Softmax" and outputs and outputs[0] in keys:
            softmaxes.add(i)
        elif node.op_type == "MatMul" and all(name in keys for name in inputs) and outputs[0] not in keys:
            partials.add(i)
    return "", keys, softmaxes, partials


def _check_layout(shape: ModelShape, tp: int, pp: int, allow_kv_replication: bool = True) -> str:
    """'' when (tp, pp) can be applied, else the reason it cannot."""
    if shape.heads % tp:
        return f"tp {tp} does not divide the {shape.heads} attention heads"
    if shape.kv_heads % tp and not allow_kv_replication:
        return f"tp {tp} does not divide the {shape.kv_heads} KV heads (KV head replication is off)"
    if shape.kv_heads % tp and tp % shape.kv_heads:
        return f"tp {tp} and the {shape.kv_heads} KV heads do not divide one another"
    for width in shape.column_widths:
        # A width tp does not divide (an MLP's columns, a vocabulary) splits into parts of one element;
        # each rank needs one column at least. (A fused [gate|up] projection is the exception: its blocks
        # split evenly only, which the partitioner checks and this estimate does not see.)
        if width < tp:
            return f"tp {tp} exceeds a column-parallel width of {width}"
    if pp > shape.layers:
        return f"pp {pp} exceeds the {shape.layers} decoder layers"
    return ""


@dataclass(frozen=True)
class RankPart:
    """One tp rank's part of an uneven split: its heads, and the fractions of the heads (and of the MLP
    columns, which follow them) and of the KV heads it holds."""

    share: int
    heads: float
    kv_heads: float


def _uneven_parts(
    shape: ModelShape, tp: int, pp: int, shares: tuple[int, ...], allow_kv_replication: bool = True
) -> tuple[list[RankPart], str]:
    """Each tp rank's part of the heads split as `shares`, or '' parts and the reason it cannot be applied
    (the partitioner's rules: a rank's heads may not cut a KV head's group when the KV heads are split)."""
    split = ",".join(map(str, shares))
    why = f"tp {tp} splits the {shape.heads} attention heads as {split}"
    if pp > shape.layers:
        return [], f"pp {pp} exceeds the {shape.layers} decoder layers"
    if shape.heads % shape.kv_heads:
        return [], f"{why} but the {shape.kv_heads} KV heads do not group the heads"
    if shape.kv_heads < tp and not allow_kv_replication:
        return [], f"{why}: fewer KV heads ({shape.kv_heads}) than ranks and KV head replication is off"
    group = shape.heads // shape.kv_heads
    parts = []
    start = 0
    for share in shares:
        # mesh.grouped_shares keeps each rank on one KV head or whole ones: a KV head whose group two
        # ranks share is computed and cached by both.
        kv_local = len({head // group for head in range(start, start + share)})
        parts.append(RankPart(share, share / shape.heads, kv_local / shape.kv_heads))
        start += share
    for width in shape.column_widths:
        # The partitioner splits a width the head units do not divide into tp equal parts, or parts of one
        # element where tp does not divide it either; the estimate still scales it by each rank's head
        # fraction (off by the difference on such MLPs).
        if width < tp:
            return [], f"{why}: tp {tp} exceeds a column-parallel width of {width}"
    return parts, ""


@dataclass(frozen=True)
class _StageDevices:
    """The devices of one pipeline stage: their profiles, smallest memory, and the links it uses."""

    profiles: tuple[DeviceProfile, ...]
    memory_bytes: int
    tp_link: tuple[LinkProfile, int]  # (link, hosts spanned) of its tp group
    recv_link: tuple[LinkProfile, int] | None  # from the previous stage (None on stage 0)
    rank_profiles: tuple[DeviceProfile, ...] = ()  # per tp rank
    rank_memory: tuple[int, ...] = ()  # per tp rank
    cp_link: tuple[LinkProfile, int] | None = None  # (link, hosts spanned) of its slowest cp group (cp > 1)
    cp_alike: bool = True  # every cp copy of a tp rank on a device of its profile


def _stage_devices(cluster: Cluster, tp: int, pp: int, cp: int = 1) -> list[_StageDevices]:
    """Ranks on devices host-major (rank r on cluster.devices[r]): each stage's devices and links. With cp,
    a stage's tp ranks are cp rank 0's; its memory the smallest over the cp copies, its cp link the slowest
    cp group's."""
    mesh = DeviceMesh(pp=pp, cp=cp, tp=tp)
    stages = []
    for stage in range(pp):
        group = mesh.group(mesh.rank_of(MeshCoords(pp=stage, cp=0, tp=0)), "tp")
        cp_link = None
        cp_alike = True
        rank_memory = tuple(cluster.devices[r].memory_bytes for r in group)
        if cp > 1:
            cp_groups = [mesh.group(r, "cp") for r in group]
            cp_link = min((cluster.group_link(g) for g in cp_groups), key=lambda link: (link[0].bandwidth, -link[1]))
            cp_alike = all(len({cluster.devices[r].profile.name for r in g}) == 1 for g in cp_groups)
            rank_memory = tuple(min(cluster.devices[r].memory_bytes for r in g) for g in cp_groups)
        profiles = {cluster.devices[r].profile.name: cluster.devices[r].profile for r in group}
        recv = None
        if stage > 0:
            pairs = [
                (mesh.rank_of(MeshCoords(pp=stage - 1, cp=0, tp=t)), mesh.rank_of(MeshCoords(pp=stage, cp=0, tp=t)))
                for t in range(tp)
            ]
            recv = min((cluster.group_link(pair) for pair in pairs), key=lambda link: link[0].bandwidth)
        stages.append(
            _StageDevices(
                tuple(profiles.values()),
                min(rank_memory),
                cluster.group_link(group),
                recv,
                tuple(cluster.devices[r].profile for r in group),
                rank_memory,
                cp_link,
                cp_alike,
            )
        )
    return stages


def _stage_estimate(
    analysis: _Analysis,
    tp: int,
    stage: int,
    start: int,
    stop: int,
    last: bool,
    devices: _StageDevices,
    max_batch: int,
    max_seq: int,
    parts: Sequence[RankPart] | None = None,
    cp: int = 1,
    sharded: bool = False,
) -> RankEstimate:
    """The stage's ranks, each on its own device with its own part of an uneven split (`parts`, None: even):
    the slowest rank's times (all tp ranks wait for it at each collective) and the tightest rank's memory."""
    nodes = analysis.stage_nodes(start, stop, last)
    tp_link, tp_hosts = devices.tp_link
    ranks: dict[tuple[str, int], tuple[dict[str, float], RankEstimate]] = {}
    times = {"prefill": 0.0, "decode": 0.0}
    for t, device in enumerate(devices.rank_profiles):
        part = parts[t] if parts is not None else None
        key = (device.name, t if part is not None else -1)
        if key not in ranks:
            ranks[key] = _rank_estimate(
                analysis, tp, stage, start, stop, nodes, devices, device, part, tp_link, tp_hosts, cp, sharded
            )
        rank_times, _ = ranks[key]
        times = {phase: max(times[phase], rank_times[phase]) for phase in times}
    # the rank furthest over (or least under) its own device's memory
    _, tightest = max(
        (ranks[(device.name, t if parts is not None else -1)][1].total_bytes - memory, t)
        for t, (device, memory) in enumerate(zip(devices.rank_profiles, devices.rank_memory, strict=True))
    )
    device = devices.rank_profiles[tightest]
    worst = ranks[(device.name, tightest if parts is not None else -1)][1]
    return dataclasses.replace(
        worst,
        prefill_s=times["prefill"],
        decode_s=times["decode"],
        device="+".join(p.name for p in devices.profiles),
        device_memory_bytes=devices.rank_memory[tightest],
    )


def _rank_estimate(
    analysis: _Analysis,
    tp: int,
    stage: int,
    start: int,
    stop: int,
    nodes: Sequence[int],
    devices: _StageDevices,
    device: DeviceProfile,
    part: RankPart | None,
    tp_link: LinkProfile,
    tp_hosts: int,
    cp: int = 1,
    sharded: bool = False,
) -> tuple[dict[str, float], RankEstimate]:
    """One tp rank of a stage on `device` holding `part` (None: 1/tp), and its chunk of the tokens at cp
    (with `sharded`, its block of the KV cache): its times and memory."""
    times = {"prefill": 0.0, "decode": 0.0}
    largest_comm = 0.0
    cp_link, cp_hosts = devices.cp_link or (device.intra_host_link, 1)
    for phase in ("prefill", "decode"):
        total = device.run_overhead  # once per run (plan/cost.py)
        for i in nodes:
            flops, moved, activations, payload, counted, read = analysis.scaled_node(i, phase, tp, part, cp, sharded)
            cost = analysis.costs[phase][i]
            compute = flops / device.flops_per_second(cost.dtype) if flops else 0.0
            memory = memory_seconds(moved, activations, device, read)
            total += max(compute, memory) + counted * device.node_overhead
            if payload:
                total += analysis.collective_seconds(i, payload, tp, tp_link, tp_hosts)
                # an AllReduce holds its input and output; an AllGather its shard (this rank's part of an
                # uneven split: the vocabulary follows the heads' shares) and the full output
                shard = payload if analysis.collectives[i] == "AllReduce" else payload * analysis.scale(HEADS, tp, part)
                largest_comm = max(largest_comm, payload + shard)
        for i in nodes if cp > 1 else ():
            for gathered in analysis.cp_gathers(i, phase, tp, part, cp, sharded):
                # the keys/values before the past cache, the logits (with a sharded cache, the queries
                # too): each rank's chunk in, every chunk out
                total += comm_seconds("AllGather", gathered, cp, cp_link, cp_hosts)
                largest_comm = max(largest_comm, gathered + gathered / cp)
            for reduced in analysis.cp_reduces(i, phase, tp, part, cp, sharded):
                # a sharded cache's softmax max and denominator, and P @ V's partial sum: input and output
                total += comm_seconds("AllReduce", reduced, cp, cp_link, cp_hosts)
                largest_comm = max(largest_comm, 2 * reduced)
        if stage > 0:
            hidden = _boundary_bytes(analysis, start, phase)
            if cp > 1:  # the hidden state a cp rank sends on is its chunk
                seq = analysis.sizes[phase].seq
                hidden *= math.ceil(seq / cp) / seq
            link, hosts = devices.recv_link or (device.intra_host_link, 1)
            total += comm_seconds("Recv", hidden, 2, link, hosts)
            largest_comm = max(largest_comm, hidden)
        times[phase] = total
    weights: dict[str, float] = {}
    for i in nodes:
        for value in analysis.nodes[i].inputs:
            if value is not None and value.name in analysis.weights and value.const_value is not None:
                scale = analysis.scale(analysis.weight_kind[value.name], tp, part)
                weights[value.name] = value.const_value.nbytes * scale
    kv = 0.0
    block = cache_block(analysis.sizes["prefill"].seq, cp) if sharded else 0
    for name, layer in analysis.past_layer.items():
        if start <= layer < stop:
            # a sharded cache: the block of B = ceil(max_seq / cp) tokens a cp rank owns, the most it holds
            whole = analysis.kv_bytes_at(name, block) if sharded else analysis.kv_bytes[name]
            kv += whole * analysis.scale(KV_HEADS, tp, part)
    peak = max(_stage_peak(analysis, nodes, phase, tp, part, cp, sharded) for phase in ("prefill", "decode"))
    weight_total = round(sum(weights.values()))
    total = weight_total + int(kv) + int(peak) + int(largest_comm)
    estimate = RankEstimate(
        stage=stage,
        layers=(start, stop),
        weight_bytes=weight_total,
        kv_cache_bytes=int(kv),
        activation_peak_bytes=int(peak),
        communication_bytes=int(largest_comm),
        total_bytes=total,
        prefill_s=times["prefill"],
        decode_s=times["decode"],
        device=device.name,
        device_memory_bytes=devices.memory_bytes,
        tp_link=tp_link.name if tp > 1 else "",
        tp_hosts=tp_hosts if tp > 1 else 0,
    )
    return times, estimate


def _boundary_bytes(analysis: _Analysis, start: int, phase: str) -> float:
    """Bytes of the replicated activations produced before layer `start` and read from it on (the hidden state)."""
    if start == 0:
        return 0.0
    if phase not in analysis._boundaries:
        analysis._boundaries[phase] = _every_boundary_bytes(analysis, phase)
    return analysis._boundaries[phase][start]


def _every_boundary_bytes(analysis: _Analysis, phase: str) -> list[float]:
    """`_boundary_bytes` at every layer in one walk: a value made in layer `origin` and last read in layer
    `reach` (the post-layer nodes: past the last) crosses every cut after layers origin .. reach - 1."""
    past_last = analysis.num_layers
    reach: dict[str, tuple[int, int]] = {}  # value -> (the layer that made it, the last layer reading it)
    for i, node in enumerate(analysis.nodes):
        place = analysis.placement[i]
        if not isinstance(place, int) and place != "post":
            continue
        reader = place if isinstance(place, int) else past_last
        for value in node.inputs:
            if value is None or not value.name or value.name in analysis.weights:
                continue
            producer = value.producer()
            if producer is None:
                continue
            origin = analysis.placement[analysis.index[id(producer)]]
            if isinstance(origin, int) and origin < reader:
                made, last = reach.get(value.name, (origin, reader))
                reach[value.name] = (made, max(last, reader))
    crossing = [0.0] * (past_last + 2)  # differences: value bytes enter at origin + 1, leave after `last`
    value_bytes = analysis.value_bytes[phase]
    for name, (origin, last) in reach.items():
        crossing[origin + 1] += value_bytes[name]
        crossing[min(last, past_last) + 1] -= value_bytes[name]
    return list(itertools.accumulate(crossing))


def _stage_peak(
    analysis: _Analysis,
    nodes: Sequence[int],
    phase: str,
    tp: int,
    part: RankPart | None = None,
    cp: int = 1,
    sharded: bool = False,
) -> float:
    value_bytes = analysis.value_bytes[phase]
    chunk = analysis.chunk_scales(phase, cp, sharded)
    excluded = analysis.peak_excluded
    last_use: dict[str, int] = {}
    produced_here: set[str] = set()
    for i in nodes:
        input_names, output_names = analysis.value_names[i]
        last_use.update(dict.fromkeys(input_names, i))
        produced_here.update(output_names)
    # values received from an earlier stage are alive from the start until their last use here
    live = 0.0
    for name in last_use:
        if name not in produced_here and name not in excluded and name in value_bytes:
            scale = analysis.scale(analysis.kind.get(name, REPLICATED), tp, part)
            live += value_bytes[name] * (scale * chunk.get(name, 1.0) if chunk else scale)
    peak = live
    for i in nodes:
        outputs, inputs = analysis.peak_terms(i, phase, tp, part, cp, sharded)
        live += sum(size for _, size in outputs)
        peak = max(peak, live)
        for name, size in inputs:
            if last_use.get(name) == i:
                live -= size
        for name, size in outputs:
            if name not in last_use and name not in analysis.graph_output_names:
                live -= size
    return peak


def enumerate_layouts(
    model: ir.Model,
    devices: int,
    device_memory_bytes: int,
    device: DeviceProfile,
    max_batch: int,
    max_seq: int,
    *,
    include_fewer: bool = False,
    allow_kv_replication: bool = True,
    vocab_parallel: bool = False,
    overrides: Mapping[str, int] | None = None,
    cluster: Cluster | None = None,
    max_cp: int = 1,
) -> list[LayoutEstimate]:
    """Every (tp, pp) layout, ranked: valid and fitting first, then by decode tokens/s, then prefill latency.

    `cluster`: the devices, in rank order with their hosts (`devices` must be its size); None:
    `devices` of `device` with `device_memory_bytes` each, in hosts of the profile's usual size.
    `max_cp`: also every (tp, cp, pp) with 1 < cp <= max_cp (context parallelism: tp x cp x pp devices), each
    with the KV cache replicated and sharded over cp (CP_KV_CACHES).
    """
    if devices < 1:
        raise PlanError(f"--devices {devices}: need at least one device")
    if cluster is None:
        cluster = uniform_cluster(device, devices, device_memory_bytes)
    elif len(cluster) != devices:
        raise PlanError(f"--devices: the cluster has {len(cluster)} devices, not {devices}")
    analysis = _Analysis(model, max_batch, max_seq, overrides, vocab_parallel)
    if max_cp < 1:
        raise PlanError(f"--max-cp {max_cp}: must be at least 1")
    cp_analysis = _cp_analysis(model, analysis, max_batch, max_seq, overrides, vocab_parallel) if max_cp > 1 else None
    counts = range(1, devices + 1) if include_fewer else [devices]
    layouts = []
    for used in counts:
        for tp in range(1, used + 1):
            if used % tp:
                continue
            pp = used // tp
            devices_used = cluster.first(used)
            weights = derived_tp_weights(devices_used, tp, pp)
            layouts.append(_layout(analysis, tp, pp, devices_used, max_batch, max_seq, allow_kv_replication, weights))
            if weights is not None and analysis.shape.heads % tp == 0 and layouts[-1].tp_shares:
                # the even split on the same devices, to show what the proportional one wins
                layouts.append(_layout(analysis, tp, pp, devices_used, max_batch, max_seq, allow_kv_replication))
        for cp in range(2, min(max_cp, used) + 1):
            if used % cp:
                continue
            for tp in range(1, used // cp + 1):
                if (used // cp) % tp == 0:
                    for cache in CP_KV_CACHES:
                        layouts.append(_layout(cp_analysis or analysis, tp, used // cp // tp, cluster.first(used),
                                               max_batch, max_seq, allow_kv_replication, cp=cp,
                                               cp_kv_cache=cache))  # fmt: skip
    return rank_layouts(layouts)


def _cp_analysis(
    model: ir.Model, analysis: _Analysis, max_batch: int, max_seq: int, overrides: Mapping[str, int] | None,
    vocab_parallel: bool,
) -> _Analysis | None:
    """The analysis cp layouts are estimated on: `partition --cp` lowers GroupQueryAttention and ONNX Attention
    into standard ops before it splits the tokens (lower_attention.py), so its cp ranks run the lowered
    graph, not the fused ops the other layouts run. None when there is nothing to lower (the same analysis
    serves), or when the lowering refuses the model (its cp layouts then stay invalid with the lowering's
    refusal for a reason, the line partition --cp prints)."""
    from llmir_onnx.lower_attention import lower_group_query_attention, lower_onnx_attention

    if not any(is_lowered_for_cp(node) for node in analysis.nodes):
        return None
    lowered = model.clone()
    try:
        lower_group_query_attention(lowered)
        lower_onnx_attention(lowered)
    except PlanError as error:
        refused = _CpFacts(str(error), frozenset(), {})
        analysis._cp = {False: refused, True: refused}  # either cache layout: the lowering comes first
        return None
    return _Analysis(lowered, max_batch, max_seq, overrides, vocab_parallel)


def rank_layouts(layouts: Sequence[LayoutEstimate]) -> list[LayoutEstimate]:
    return sorted(
        layouts,
        key=lambda e: (
            not e.valid,
            not e.fits,
            -(e.decode_tokens_per_s or 0.0),
            e.prefill_s if e.prefill_s is not None else float("inf"),
            e.devices,
            e.pp,
            e.cp,
            e.cp_kv_cache != REPLICATED_CACHE,
        ),
    )


def _layout(
    analysis: _Analysis,
    tp: int,
    pp: int,
    cluster: Cluster,
    max_batch: int,
    max_seq: int,
    allow_kv_replication: bool = True,
    weights: tuple[float, ...] | None = None,
    cp: int = 1,
    cp_kv_cache: str = REPLICATED_CACHE,
) -> LayoutEstimate:
    """(tp, pp) on `cluster`; the heads split by `weights` (one per tp rank) or, where tp does not divide
    them, unevenly by `mesh.grouped_shares`, as the partitioner splits them; with cp > 1, each (tp, pp) rank
    copied over cp ranks that split the prompt's tokens (tp x cp x pp devices), the KV cache `cp_kv_cache`
    over them (`partition --cp-kv-cache`: replicated, or sharded along the tokens)."""
    sharded = cp > 1 and cp_kv_cache == SHARDED_CACHE
    shape = analysis.shape
    shares: tuple[int, ...] = ()
    parts: list[RankPart] | None = None
    if 1 < tp <= shape.heads and (shape.heads % tp or weights is not None):
        groups = (shape.heads // shape.kv_heads,) if shape.kv_heads and shape.heads % shape.kv_heads == 0 else ()
        shares = grouped_shares(shape.heads, tp, groups, weights)
        shares = shares if len(set(shares)) > 1 else ()
    if shares:
        parts, reason = _uneven_parts(shape, tp, pp, shares, allow_kv_replication)
        if reason and shape.heads % tp:
            reason = f"tp {tp} does not divide the {shape.heads} attention heads, and {reason}"
    else:
        reason = _check_layout(shape, tp, pp, allow_kv_replication)
    stages = _stage_devices(cluster, tp, pp, cp) if cp > 1 else []
    if cp > 1 and not reason:
        reason = analysis.cp_facts(sharded).refusal
        if not reason and cp > max_seq:
            reason = f"cp {cp} exceeds the {max_seq} tokens of --max-seq"
        if not reason and not all(stage.cp_alike for stage in stages):
            reason = f"cp {cp} puts copies of one rank on devices of different profiles (the estimate needs them alike)"
    smallest_memory = min(slot.memory_bytes for slot in cluster.devices)
    if reason:
        return LayoutEstimate(
            tp=tp,
            pp=pp,
            devices=tp * cp * pp,
            valid=False,
            reason=reason,
            max_batch=max_batch,
            max_seq=max_seq,
            device_memory_bytes=smallest_memory,
            tp_shares=shares,
            tp_weights=weights or (),
            cp=cp,
            cp_kv_cache=cp_kv_cache,
        )
    stages = stages or _stage_devices(cluster, tp, pp)
    bounds = _balanced_bounds(analysis, tp, pp, stages, max_batch, max_seq, parts, cp, sharded)
    ranks = [
        _stage_estimate(
            analysis, tp, s, bounds[s], bounds[s + 1], s == pp - 1, stages[s], max_batch, max_seq, parts, cp,
            sharded,
        )
        for s in range(pp)
    ]
    # the stage furthest over (or least under) its devices' memory
    worst = max(ranks, key=lambda r: (r.total_bytes - r.device_memory_bytes, r.total_bytes))
    memory = worst.device_memory_bytes
    fits = worst.total_bytes <= memory
    prefill = sum(r.prefill_s for r in ranks)
    decode = sum(r.decode_s for r in ranks)
    if fits:
        reason = f"fits: the fullest rank (stage {worst.stage}) needs {format_bytes(worst.total_bytes)}"
    else:
        reason = (
            f"does not fit: stage {worst.stage}'s ranks need {format_bytes(worst.total_bytes)}, "
            f"{format_bytes(worst.total_bytes - memory)} over {format_bytes(memory)}"
        )
    return LayoutEstimate(
        tp=tp,
        pp=pp,
        devices=tp * cp * pp,
        valid=True,
        reason=reason,
        max_batch=max_batch,
        max_seq=max_seq,
        fits=fits,
        max_rank_bytes=worst.total_bytes,
        device_memory_bytes=memory,
        prefill_s=prefill,
        decode_step_s=decode,
        decode_tokens_per_s=max_batch / decode,
        ranks=ranks,
        tp_shares=shares,
        tp_weights=weights or (),
        cp=cp,
        cp_kv_cache=cp_kv_cache,
    )


def _balanced_bounds(
    analysis: _Analysis,
    tp: int,
    pp: int,
    stages: Sequence[_StageDevices],
    max_batch: int,
    max_seq: int,
    parts: Sequence[RankPart] | None = None,
    cp: int = 1,
    sharded: bool = False,
) -> list[int]:
    """Layer bounds [0, ..., layers] of the pp stages, balanced on predicted time on each stage's devices."""
    if pp == 1:
        return [0, analysis.num_layers]
    def unit(name: str, nodes: list[int], devices: _StageDevices) -> StageUnit:
        link, hosts = devices.tp_link
        slowest = 0.0
        ranks = {(device.name, parts[t] if parts is not None else None): device
                 for t, device in enumerate(devices.rank_profiles)}  # fmt: skip
        for (_, part), device in ranks.items():
            seconds = 0.0
            cp_link, cp_hosts = devices.cp_link or (device.intra_host_link, 1)
            for phase in ("prefill", "decode"):
                for i in nodes:
                    flops, moved, activations, payload, counted, read = analysis.scaled_node(
                        i, phase, tp, part, cp, sharded
                    )
                    dtype = analysis.costs[phase][i].dtype
                    compute = flops / device.flops_per_second(dtype) if flops else 0.0
                    memory = memory_seconds(moved, activations, device, read)
                    seconds += max(compute, memory) + counted * device.node_overhead
                    seconds += analysis.collective_seconds(i, payload, tp, link, hosts)
                for i in nodes if cp > 1 else ():
                    for gathered in analysis.cp_gathers(i, phase, tp, part, cp, sharded):
                        seconds += comm_seconds("AllGather", gathered, cp, cp_link, cp_hosts)
                    for reduced in analysis.cp_reduces(i, phase, tp, part, cp, sharded):
                        seconds += comm_seconds("AllReduce", reduced, cp, cp_link, cp_hosts)
            slowest = max(slowest, seconds)
        weights: dict[str, int] = {}
        for i in nodes:
            for value in analysis.nodes[i].inputs:
                if value is not None and value.name in analysis.weights and value.const_value is not None:
                    scale = max(analysis.scale(analysis.weight_kind[value.name], tp, part) for _, part in ranks)
                    weights[value.name] = int(value.const_value.nbytes * scale)
        return StageUnit(name, slowest, weights)

    places = analysis.placement
    layer_nodes: list[list[int]] = [[] for _ in range(analysis.num_layers)]
    for i, place in enumerate(places):
        if isinstance(place, int):
            layer_nodes[place].append(i)
    pre = [i for i, p in enumerate(places) if p == "pre"]
    post = [i for i, p in enumerate(places) if p == "post"]

    def units(devices: _StageDevices) -> tuple[StageUnit, list[StageUnit], StageUnit]:
        return (
            unit("embedding", pre, devices),
            [unit(f"layer {k}", nodes, devices) for k, nodes in enumerate(layer_nodes)],
            unit("final norm + lm_head", post, devices),
        )

    # stages on alike devices and links cost alike: evaluate each kind once
    by_kind: dict[tuple[Any, ...], tuple[StageUnit, list[StageUnit], StageUnit]] = {}
    stage_units = []
    for devices in stages:
        kind = (
            tuple(p.name for p in devices.rank_profiles), devices.tp_link[0].name, devices.tp_link[1], devices.cp_link
        )
        if kind not in by_kind:
            by_kind[kind] = units(devices)
        stage_units.append(by_kind[kind])
    prefix, layers, suffix = stage_units[0]
    mixed = len(by_kind) > 1
    limits = [devices.memory_bytes for devices in stages]
    memory_limit: int | list[int] = limits if len(set(limits)) > 1 else limits[0]
    per_stage = stage_units if mixed else None
    try:
        balance = balance_stages(
            layers, pp, prefix=prefix, suffix=suffix, memory_limit_bytes=memory_limit, stage_units=per_stage
        )
    except PlanError:
        balance = balance_stages(layers, pp, prefix=prefix, suffix=suffix, stage_units=per_stage)
    return [r.start for r in balance.stage_layers] + [analysis.num_layers]


def model_shape(model: ir.Model, overrides: Mapping[str, int] | None = None) -> ModelShape:
    """Layers, heads, KV heads, head size and column widths as the layout rules see them."""
    return _Analysis(model, 1, 2, overrides).shape


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1e3:.1f} ms"


def format_layout_table(layouts: Sequence[LayoutEstimate]) -> str:
    """A fixed-width table, one layout per line, in the given (ranked) order; with cp layouts among them, a
    column says where each keeps its KV cache over cp (replicated, sharded; '-' without cp)."""
    header = (
        "#",
        "layout",
        "devices",
        "prefill",
        "decode tok/s",
        "mem/rank (max)",
        "weights",
        "kv cache",
        "activations",
        "fits",
        "tp link",
        "note",
    )
    rows: list[tuple[str, ...]] = [header]
    for position, layout in enumerate(layouts, 1):
        if not layout.valid:
            rows.append(
                (
                    str(position),
                    layout.label,
                    str(layout.devices),
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "invalid",
                    "-",
                    layout.reason,
                )
            )
            continue
        worst = max(layout.ranks, key=lambda r: r.total_bytes)
        rows.append(
            (
                str(position),
                layout.label,
                str(layout.devices),
                _seconds(layout.prefill_s),
                f"{layout.decode_tokens_per_s:.1f}",
                format_bytes(layout.max_rank_bytes),
                format_bytes(worst.weight_bytes),
                format_bytes(worst.kv_cache_bytes),
                format_bytes(worst.activation_peak_bytes),
                "yes" if layout.fits else "NO",
                _tp_link_label(layout),
                "" if layout.fits else f"over by {format_bytes(layout.max_rank_bytes - layout.device_memory_bytes)}",
            )
        )
    if any(layout.cp > 1 for layout in layouts):  # after "kv cache": where it is kept over cp
        column = header.index("kv cache") + 1
        modes = ["kv over cp"] + [layout.cp_kv_cache if layout.cp > 1 else "-" for layout in layouts]
        rows = [(*row[:column], mode, *row[column:]) for row, mode in zip(rows, modes, strict=True)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _tp_hosts(layout: LayoutEstimate) -> int:
    return max((rank.tp_hosts for rank in layout.ranks), default=0)


def _tp_link_label(layout: LayoutEstimate) -> str:
    """'-' at tp 1, 'in host' when every tp group is inside one host, else 'N hosts (link)'."""
    hosts = _tp_hosts(layout)
    if hosts == 0:
        return "-"
    if hosts == 1:
        return "in host"
    slowest = next(rank.tp_link for rank in layout.ranks if rank.tp_hosts == hosts)
    return f"{hosts} hosts ({slowest})"


def _versus(best: LayoutEstimate, other: LayoutEstimate) -> str:
    return (
        f"{other.label} ({_tp_link_label(other)}): {other.decode_tokens_per_s:.1f} tokens/s, prefill "
        f"{_seconds(other.prefill_s)}, {format_bytes(other.max_rank_bytes)} per device"
    )


def recommend(layouts: Sequence[LayoutEstimate]) -> tuple[LayoutEstimate | None, str]:
    """The best valid layout that fits, and why; (None, reason) when none fits."""
    ranked = rank_layouts(layouts)
    fitting = [layout for layout in ranked if layout.valid and layout.fits]
    if not fitting:
        valid = [layout for layout in ranked if layout.valid]
        if not valid:
            return None, "no (tp, pp) layout is valid for this model and device count"
        closest = min(valid, key=lambda e: e.max_rank_bytes)
        return None, (
            f"no layout fits {format_bytes(closest.device_memory_bytes)} per device; the smallest, "
            f"{closest.label}, {closest.reason}; add devices, lower --max-batch/--max-seq or use bigger devices"
        )
    best = fitting[0]
    why = (
        f"{best.label}: highest predicted decode throughput among the layouts that fit "
        f"({best.decode_tokens_per_s:.1f} tokens/s at batch {best.max_batch}, prefill "
        f"{_seconds(best.prefill_s)}); {best.reason}"
    )
    # hosts: say whether tp stays inside them, and against what the choice won
    if any(_tp_hosts(layout) > 1 for layout in fitting):
        inside = [layout for layout in fitting if _tp_hosts(layout) <= 1]
        across = [layout for layout in fitting if _tp_hosts(layout) > 1]
        if _tp_hosts(best) <= 1:
            why += f"; its tp groups stay inside a host; the best with tp across hosts is {_versus(best, across[0])}"
        else:
            why += f"; its tp spans {_tp_link_label(best)} because the model predicts a win over "
            why += _versus(best, inside[0]) if inside else "every layout (none keeps tp inside a host)"
    if best.tp_shares:
        split = ",".join(map(str, best.tp_shares))
        if best.tp_weights:
            ratio = ":".join(f"{w:.3g}" for w in best.tp_weights)
            why += f"; its heads split {split}, in proportion to its devices' memory bandwidth ({ratio})"
            even = next((lay for lay in fitting if (lay.tp, lay.pp, lay.tp_shares) == (best.tp, best.pp, ())), None)
            if even is not None:
                why += f", against the even split {_versus(best, even)}"
        else:
            why += f"; its heads split {split} (tp {best.tp} does not divide {sum(best.tp_shares)} heads)"
    if best.cp > 1:
        why += f"; cp {best.cp} splits the prompt's {best.max_seq} tokens over {best.cp} ranks"
        worst = max(best.ranks, key=lambda rank: rank.total_bytes)
        activations = format_bytes(worst.activation_peak_bytes)
        if best.cp_kv_cache == SHARDED_CACHE:
            block = cache_block(best.max_seq, best.cp)
            why += (
                f" (activations {activations} per rank; the KV cache sharded over cp, partition --cp-kv-cache "
                f"sharded: a block of {block} tokens, {format_bytes(worst.kv_cache_bytes)}, per rank, which a "
                "decode step attends over, for 3 AllReduces and a query gather over cp per layer)"
            )
        else:
            why += f" (activations {activations} per rank; the KV cache is replicated over cp)"
        without = next((layout for layout in fitting if layout.cp == 1), None)
        if without is None:
            what = "sharded KV cache and smaller" if best.cp_kv_cache == SHARDED_CACHE else "smaller"
            why += f"; no layout without cp fits: cp's {what} prefill activations are what make it fit"
        else:
            why += f", because the model predicts a win over the best without cp, {_versus(best, without)}"
        other = next(
            (lay for lay in ranked if (lay.tp, lay.cp, lay.pp, lay.tp_shares) == (best.tp, best.cp, best.pp,
             best.tp_shares) and lay.cp_kv_cache != best.cp_kv_cache),
            None,
        )  # fmt: skip
        if other is not None and other.valid:
            why += (
                f"; with the KV cache {other.cp_kv_cache} instead: {_versus(best, other)}"
                + ("" if other.fits else " (does not fit)")
            )
    if len({rank.device for layout in fitting for rank in layout.ranks}) > 1:
        why += "; stages: " + ", ".join(
            f"{rank.stage}: layers {rank.layers[0]}-{rank.layers[1] - 1} on {rank.device}" for rank in best.ranks
        )
    return best, why
