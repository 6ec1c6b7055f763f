"""Pipeline stage split and stage balance.

Three levels: the balance search against brute force and hand-checked cases; the split's structure
(which stage gets which KV cache, logits, Send/Recv pairing, peers, chained forwarding) and its
numerics in one process (Recv/Send simulated by feeding and fetching the values); and equivalence
through real processes (`verify_plan` runs `mpiexec -n P` with the ai.llmir library).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from plan_helpers import rank_model, tp_models_for_split, write_plan
from synthetic_helpers import synthetic_module

from llmir_onnx.errors import InputModelError, PlanError
from llmir_onnx.ir_io import load_model, save_model
from llmir_onnx.mesh import DeviceMesh
from llmir_onnx.ops import LLMIR_DOMAIN
from llmir_onnx.passes.stages import (
    SENT_OUTPUT_PREFIX,
    PipelineStage,
    PipelineStageSplit,
    compose_bindings,
    layer_units,
    split_tp_stages,
)
from llmir_onnx.plan.emit import PlanContents, tensor_infos
from llmir_onnx.plan.manifest import SliceBinding
from llmir_onnx.plan.stage_balance import StageUnit, balance_stages, stage_layer_ranges
from llmir_onnx.runtime.feeds import random_feeds
from llmir_onnx.runtime.verify import default_tolerance_for, format_comparisons, verify_plan

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


# --------------------------------------------------------------------------- balance


def _units(costs: list[float]) -> list[StageUnit]:
    return [StageUnit(f"layer {i}", cost, {f"w{i}": 10}) for i, cost in enumerate(costs)]


def _brute_force(costs: list[float], stages: int, prefix: float, suffix: float) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *cuts, len(costs)]
        loads = [sum(costs[bounds[s]:bounds[s + 1]]) for s in range(stages)]
        loads[0] += prefix
        loads[-1] += suffix
        best = min(best, max(loads))
    return best


def test_balance_uniform_layers() -> None:
    assert balance_stages(_units([1.0] * 4), 2).cut_after_layer == (1,)
    assert balance_stages(_units([1.0] * 4), 4).cut_after_layer == (0, 1, 2)
    balance = balance_stages(_units([1.0] * 8), 4)
    assert [len(r) for r in balance.stage_layers] == [2, 2, 2, 2]
    assert balance.stage_costs == (2.0, 2.0, 2.0, 2.0)


def test_balance_counts_lm_head_on_the_last_stage() -> None:
    # 8 layers of cost 1 and an lm_head of 2.5: 5 | 3 + head (5 vs 5.5) beats 4 | 4 + head (6.5)
    balance = balance_stages(_units([1.0] * 8), 2, suffix=StageUnit("lm_head", 2.5))
    assert balance.stage_layers == (range(0, 5), range(5, 8))
    assert balance.stage_costs == (5.0, 5.5)


def test_balance_counts_embedding_on_the_first_stage() -> None:
    balance = balance_stages(_units([1.0] * 8), 2, prefix=StageUnit("embedding", 2.5))
    assert balance.stage_layers == (range(0, 3), range(3, 8))
    assert balance.stage_costs == (5.5, 5.0)


def test_balance_is_optimal_against_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(60):
        count = rng.randint(2, 9)
        stages = rng.randint(1, count)
        costs = [rng.uniform(0.1, 5.0) for _ in range(count)]
        prefix, suffix = rng.uniform(0, 4), rng.uniform(0, 4)
        balance = balance_stages(_units(costs), stages, prefix=StageUnit("e", prefix), suffix=StageUnit("h", suffix))
        assert balance.bottleneck_cost == pytest.approx(_brute_force(costs, stages, prefix, suffix))
        assert balance.stage_layers[0].start == 0 and balance.stage_layers[-1].stop == count
        assert all(len(r) >= 1 for r in balance.stage_layers)


def test_balance_memory_limit_overflow_names_the_stage_and_the_excess() -> None:
    # the 100-byte embedding table sits on stage 0 with at least one 10-byte layer: 110 bytes
    layers = [StageUnit(f"layer {i}", 1.0, {f"w{i}": 10}) for i in range(3)]
    embedding = StageUnit("embedding", 0.0, {"table": 100})
    fits = balance_stages(layers, 2, prefix=embedding, memory_limit_bytes=120)
    assert fits.stage_layers == (range(0, 1), range(1, 3))
    assert fits.stage_memory_bytes == (110, 20)
    with pytest.raises(PlanError, match=r"stage 0 \(embedding \+ layer 0\), 10 B over the limit"):
        balance_stages(layers, 2, prefix=embedding, memory_limit_bytes=100)


def test_balance_memory_limit_chooses_a_slower_cut_that_fits() -> None:
    # cost alone: 2 | 2 (cut after layer 1), but layers 0 and 1 together hold 120 bytes
    weights = [60, 60, 10, 10]
    layers = [StageUnit(f"layer {i}", 1.0, {f"w{i}": w}) for i, w in enumerate(weights)]
    assert balance_stages(layers, 2).cut_after_layer == (1,)
    balance = balance_stages(layers, 2, memory_limit_bytes=100)
    assert balance.cut_after_layer == (0,)
    assert balance.stage_memory_bytes == (60, 80)
    assert balance.stage_costs == (1.0, 3.0)


def test_balance_shared_weights_count_once_per_stage() -> None:
    # a tied table read by the embedding and the lm_head: both end stages hold a copy; two layers
    # sharing one weight on one stage hold it once (counted twice, no cut would fit 155 bytes)
    layers = [StageUnit("layer 0", 1.0, {"shared": 50}), StageUnit("layer 1", 1.0, {"shared": 50}),
              StageUnit("layer 2", 1.0, {"w2": 10})]
    balance = balance_stages(layers, 2, prefix=StageUnit("embedding", 0.0, {"table": 100}),
                             suffix=StageUnit("lm_head", 0.0, {"table": 100}), memory_limit_bytes=155)
    assert balance.stage_layers == (range(0, 2), range(2, 3))
    assert balance.stage_memory_bytes == (150, 110)


def test_balance_refuses_more_stages_than_layers() -> None:
    with pytest.raises(PlanError, match=r"at least one decoder layer per stage.*2 layers"):
        balance_stages(_units([1.0, 1.0]), 4)


def test_stage_layer_ranges_validates_cuts() -> None:
    assert stage_layer_ranges(4, [1]) == (range(0, 2), range(2, 4))
    for bad in ([3], [1, 1], [2, 1], [-1]):
        with pytest.raises(PlanError, match="strictly increasing"):
            stage_layer_ranges(4, bad)


# --------------------------------------------------------------------------- a tiny decoder (onnx.helper)


class TinyDecoder:
    """A 4-layer LLaMA-like decoder with a KV cache, built by hand: RMSNorm, rotary, MHA, SiLU MLP.

    The mask and the rotary angles are computed once before layer 0 and read by every layer (the
    shared values a split must replicate or send). `anonymous` drops every name that tells a layer.
    """

    def __init__(self, layers: int = 4, hidden: int = 32, heads: int = 2, vocab: int = 64,
                 anonymous: bool = False, mask_output: bool = False, seed: int = 0) -> None:
        self.layers, self.hidden, self.heads, self.vocab = layers, hidden, heads, vocab
        self.head_dim = hidden // heads
        self.anonymous = anonymous
        self.mask_output = mask_output
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.counter = 0

    def _name(self, scope: str) -> str:
        self.counter += 1
        return f"n{self.counter}" if self.anonymous else f"{scope}/op_{self.counter}"

    def weight(self, name: str, array: np.ndarray) -> str:
        self.counter += 1
        name = f"w{self.counter}" if self.anonymous else name
        if any(t.name == name for t in self.initializers):
            name = f"{name}.{self.counter}"
        self.initializers.append(onnx.numpy_helper.from_array(array.astype(array.dtype), name))
        return name

    def op(self, scope: str, op_type: str, inputs: list[str], **attrs: object) -> str:
        name = self._name(scope)
        output = f"v{self.counter}" if self.anonymous else f"{name}_out"
        self.nodes.append(oh.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def matrix(self, name: str, rows: int, cols: int) -> str:
        return self.weight(name, (self.rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32))

    def rms_norm(self, scope: str, x: str, weight_name: str) -> str:
        eps = self.weight(f"{weight_name}.eps", np.array(1e-5, np.float32))
        two = self.weight(f"{weight_name}.two", np.array(2.0, np.float32))
        square = self.op(scope, "Pow", [x, two])
        mean = self.op(scope, "ReduceMean", [square], axes=[-1], keepdims=1)
        root = self.op(scope, "Sqrt", [self.op(scope, "Add", [mean, eps])])
        scale = self.weight(weight_name, self.rng.uniform(0.5, 1.5, self.hidden).astype(np.float32))
        return self.op(scope, "Mul", [self.op(scope, "Div", [x, root]), scale])

    def heads_first(self, scope: str, x: str) -> str:
        shape = self.weight(f"{scope}.shape", np.array([0, 0, self.heads, self.head_dim], np.int64))
        return self.op(scope, "Transpose", [self.op(scope, "Reshape", [x, shape])], perm=[0, 2, 1, 3])

    def rotate(self, scope: str, x: str, cos: str, sin: str) -> str:
        half = self.head_dim // 2
        first = self.op(scope, "Slice", [x, self.weight(f"{scope}.s0", np.array([0], np.int64)),
                                         self.weight(f"{scope}.e0", np.array([half], np.int64)),
                                         self.weight(f"{scope}.a0", np.array([3], np.int64))])
        second = self.op(scope, "Slice", [x, self.weight(f"{scope}.s1", np.array([half], np.int64)),
                                          self.weight(f"{scope}.e1", np.array([self.head_dim], np.int64)),
                                          self.weight(f"{scope}.a1", np.array([3], np.int64))])
        rotated = self.op(scope, "Concat", [self.op(scope, "Neg", [second]), first], axis=3)
        return self.op(scope, "Add", [self.op(scope, "Mul", [x, cos]), self.op(scope, "Mul", [rotated, sin])])

    def build(self) -> onnx.ModelProto:
        float_t, int_t = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
        inputs = [
            oh.make_tensor_value_info("input_ids", int_t, ["batch", "seq"]),
            oh.make_tensor_value_info("attention_mask", int_t, ["batch", "total"]),
            oh.make_tensor_value_info("position_ids", int_t, ["batch", "seq"]),
        ]
        outputs = [oh.make_tensor_value_info("logits", float_t, ["batch", "seq", self.vocab])]
        table = self.matrix("model.embed_tokens.weight", self.vocab, self.hidden)
        hidden = self.op("/model/embed_tokens", "Gather", [table, "input_ids"])
        # shared: additive padding mask [batch, 1, 1, total] and rotary cos/sin [batch, 1, seq, head_dim]
        mask = self.op("/model/mask", "Cast", ["attention_mask"], to=float_t)
        one = self.weight("model.mask.one", np.array(1.0, np.float32))
        big = self.weight("model.mask.big", np.array(-1e4, np.float32))
        mask = self.op("/model/mask", "Mul", [self.op("/model/mask", "Sub", [one, mask]), big])
        mask = self.op("/model/mask", "Unsqueeze", [mask, self.weight("model.mask.axes", np.array([1, 2], np.int64))])
        if self.mask_output:  # a graph output computed from model inputs alone (replicated nodes)
            self.nodes.append(oh.make_node("Identity", [mask], ["additive_mask"], name=self._name("/model/mask")))
            outputs.append(oh.make_tensor_value_info("additive_mask", float_t, ["batch", 1, 1, "total"]))
        inv_freq = 1.0 / (10000 ** (np.arange(0, self.head_dim, 2) / self.head_dim))
        positions = self.op("/model/rotary", "Cast", ["position_ids"], to=float_t)
        positions = self.op("/model/rotary", "Unsqueeze",
                            [positions, self.weight("model.rotary.axis", np.array([-1], np.int64))])
        angles = self.op("/model/rotary", "Mul",
                         [positions, self.weight("model.rotary.inv_freq", inv_freq.astype(np.float32))])
        angles = self.op("/model/rotary", "Concat", [angles, angles], axis=-1)
        axis1 = self.weight("model.rotary.axis1", np.array([1], np.int64))
        cos = self.op("/model/rotary", "Unsqueeze", [self.op("/model/rotary", "Cos", [angles]), axis1])
        sin = self.op("/model/rotary", "Unsqueeze", [self.op("/model/rotary", "Sin", [angles]), axis1])
        scale = self.weight("model.attn.scale", np.array(1 / np.sqrt(self.head_dim), np.float32))
        for layer in range(self.layers):
            scope = f"/model/layers.{layer}"
            prefix = f"model.layers.{layer}"
            for kind in ("key", "value"):
                inputs.append(oh.make_tensor_value_info(
                    f"past_key_values.{layer}.{kind}", float_t, ["batch", self.heads, "past", self.head_dim]))
                outputs.append(oh.make_tensor_value_info(
                    f"present.{layer}.{kind}", float_t, ["batch", self.heads, "total", self.head_dim]))
            x = self.rms_norm(f"{scope}/input_layernorm", hidden, f"{prefix}.input_layernorm.weight")
            attn = f"{scope}/self_attn"
            q, k, v = (self.heads_first(attn, self.op(attn, "MatMul", [x, self.matrix(
                f"{prefix}.self_attn.{p}_proj.weight", self.hidden, self.hidden)])) for p in "qkv")
            q, k = self.rotate(attn, q, cos, sin), self.rotate(attn, k, cos, sin)
            present_k = self.op(attn, "Concat", [f"past_key_values.{layer}.key", k], axis=2)
            present_v = self.op(attn, "Concat", [f"past_key_values.{layer}.value", v], axis=2)
            self.nodes.append(oh.make_node("Identity", [present_k], [f"present.{layer}.key"], name=self._name(attn)))
            self.nodes.append(oh.make_node("Identity", [present_v], [f"present.{layer}.value"], name=self._name(attn)))
            scores = self.op(attn, "MatMul", [q, self.op(attn, "Transpose", [present_k], perm=[0, 1, 3, 2])])
            scores = self.op(attn, "Add", [self.op(attn, "Mul", [scores, scale]), mask])
            context = self.op(attn, "MatMul", [self.op(attn, "Softmax", [scores], axis=-1), present_v])
            context = self.op(attn, "Transpose", [context], perm=[0, 2, 1, 3])
            flat = self.weight(f"{attn}.flat", np.array([0, 0, self.hidden], np.int64))
            context = self.op(attn, "Reshape", [context, flat])
            out = self.op(attn, "MatMul", [context, self.matrix(f"{prefix}.self_attn.o_proj.weight",
                                                                  self.hidden, self.hidden)])
            hidden = self.op(scope, "Add", [hidden, out])
            x = self.rms_norm(f"{scope}/post_attention_layernorm", hidden, f"{prefix}.post_attention_layernorm.weight")
            mlp = f"{scope}/mlp"
            up = self.op(mlp, "MatMul", [x, self.matrix(f"{prefix}.mlp.up_proj.weight", self.hidden, 2 * self.hidden)])
            act = self.op(mlp, "Mul", [up, self.op(mlp, "Sigmoid", [up])])
            down = self.op(mlp, "MatMul", [act, self.matrix(f"{prefix}.mlp.down_proj.weight",
                                                              2 * self.hidden, self.hidden)])
            hidden = self.op(scope, "Add", [hidden, down])
        x = self.rms_norm("/model/norm", hidden, "model.norm.weight")
        head = self.matrix("lm_head.weight", self.hidden, self.vocab)
        self.nodes.append(oh.make_node("MatMul", [x, head], ["logits"], name=self._name("/lm_head")))
        graph = oh.make_graph(self.nodes, "tiny_decoder", inputs, outputs, self.initializers)
        model = oh.make_model(graph, ir_version=10, opset_imports=[oh.make_opsetid("", 17)])
        onnx.checker.check_model(model, full_check=True)
        return model


def tiny_decoder_path(folder: Path, **options: object) -> Path:
    path = folder / "tiny" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(TinyDecoder(**options).build(), path)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_decoder_path(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def synthetic4_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer model from models/make_synthetic.py (the torch-legacy export pattern)."""
    import dataclasses

    module = synthetic_module()
    config = dataclasses.replace(module.PRESETS["tiny"], layers=4)
    return module.generate(config, tmp_path_factory.mktemp("synthetic4"))


# --------------------------------------------------------------------------- in-process simulation


def _stage_session_proto(stage: PipelineStage, folder: Path) -> tuple[Path, list[tuple[str, int]], list[int]]:
    """Save the stage, then a copy where Recv reads a fed input and Send also exposes what it sends."""
    path = save_model(stage.model, folder / f"stage{stage.stage}.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    nodes, recv_inputs, send_tags = [], [], []
    for node in proto.graph.node:
        if node.domain == LLMIR_DOMAIN and node.op_type in ("Recv", "Send"):
            tag = next(a.i for a in node.attribute if a.name == "tag")
            if node.op_type == "Recv":
                name = f"sim.recv.{tag}"
                recv_inputs.append((name, tag))
                proto.graph.input.append(onnx.ValueInfoProto(name=name))
                nodes.append(oh.make_node("Identity", [name], list(node.output), name=node.name))
            else:
                send_tags.append(tag)
                nodes.append(oh.make_node("Size", [node.input[0]], list(node.output), name=node.name))
                nodes.append(oh.make_node("Identity", [node.input[0]], [f"sim.send.{tag}"]))
                proto.graph.output.append(onnx.ValueInfoProto(name=f"sim.send.{tag}"))
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    sim_path = path.with_name(f"stage{stage.stage}.sim.onnx")
    onnx.save(proto, str(sim_path))
    return sim_path, recv_inputs, send_tags


def simulate(stages: tuple[PipelineStage, ...], feeds: dict[str, np.ndarray], folder: Path
             ) -> dict[str, np.ndarray]:
    """Run the stages one after the other in this process, handing sent values to the next stage."""
    messages: dict[int, np.ndarray] = {}
    results: dict[str, np.ndarray] = {}
    for stage in stages:
        sim_path, recv_inputs, send_tags = _stage_session_proto(stage, folder)
        received = {name: messages.pop(tag) for name, tag in recv_inputs}
        proto = onnx.load(str(sim_path), load_external_data=False)
        for value in proto.graph.input:
            if value.name in received:
                array = received[value.name]
                value.CopyFrom(oh.make_tensor_value_info(
                    value.name, oh.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
        onnx.save(proto, str(sim_path))
        session = ort.InferenceSession(str(sim_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        run_feeds = {**{b.local: feeds[b.original] for b in stage.inputs}, **received}
        outputs = dict(zip(names, session.run(names, run_feeds), strict=True))
        for tag in send_tags:
            sent = outputs[f"sim.send.{tag}"]
            assert outputs[f"{SENT_OUTPUT_PREFIX}{tag}"] == sent.size
            messages[tag] = sent
        for binding in stage.outputs:
            assert binding.original not in results, f"{binding.original} comes from two stages"
            results[binding.original] = outputs[binding.local]
    assert not messages, f"sent but never received: {sorted(messages)}"
    return results


def reference(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_close(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        atol, rtol = default_tolerance_for(array)  # 1e-4 for float32; a 16-bit output: its own rounding
        np.testing.assert_allclose(actual[name], array, atol=atol, rtol=rtol, err_msg=name)


def check_stage_models(stages: tuple[PipelineStage, ...], folder: Path) -> None:
    for stage in stages:
        path = save_model(stage.model, folder / f"checked{stage.stage}.onnx")
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        assert proto.ir_version <= 10
        assert {(o.domain, o.version) for o in proto.opset_import} >= {(LLMIR_DOMAIN, 1)}


# --------------------------------------------------------------------------- structure of a split


def _kv_layers(names: list[str]) -> set[int]:
    return {int(name.split(".")[1]) for name in names if name.startswith(("past_key_values.", "present."))}


def _ancestors(node: ir.Node) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    pending = [node]
    while pending:
        for value in pending.pop().inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer not in seen:
                seen.add(producer)
                pending.append(producer)
    return seen


def _send_recv(stage: PipelineStage) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    sends, recvs = [], []
    for node in stage.model.graph:
        if node.domain == LLMIR_DOMAIN and node.op_type in ("Send", "Recv"):
            entry = (node.attributes.get_int("tag"), node.attributes.get_int("peer"))
            (sends if node.op_type == "Send" else recvs).append(entry)
    return sends, recvs


@pytest.mark.parametrize("pp", [2, 4])
def test_tiny_split_structure_and_numerics(tiny_path: Path, tmp_path: Path, pp: int) -> None:
    model = load_model(tiny_path)
    result = PipelineStageSplit(DeviceMesh(pp=pp))(model)
    assert result.layer_source == "names" and result.num_layers == 4
    assert [s.layers for s in result.stages] == list(stage_layer_ranges(4, result.balance.cut_after_layer))
    for stage in result.stages:
        inputs = [b.local for b in stage.inputs]
        outputs = [b.local for b in stage.outputs]
        # each stage is fed and returns only its own layers' KV caches; logits only from the last
        assert _kv_layers(inputs) == set(stage.layers) == _kv_layers(outputs)
        assert ("logits" in outputs) == (stage.stage == pp - 1)
        assert all(b.original == b.local and b.dim is None for b in [*stage.inputs, *stage.outputs])
        assert "input_ids" in inputs if stage.stage == 0 else True
        # the shared mask and rotary values are recomputed, so only the residual stream crosses
        assert len(stage.sent) == (0 if stage.stage == pp - 1 else 1)
        sends, recvs = _send_recv(stage)
        assert [peer for _, peer in sends] == [stage.stage + 1] * len(sends)
        assert [peer for _, peer in recvs] == [stage.stage - 1] * len(recvs)
        sent_outputs = [v.name for v in stage.model.graph.outputs if v.name.startswith(SENT_OUTPUT_PREFIX)]
        assert sent_outputs == [f"{SENT_OUTPUT_PREFIX}{tag}" for tag, _ in sends]
    for sender, receiver in itertools.pairwise(result.stages):
        assert sender.sent == receiver.received
        assert [t for t, _ in _send_recv(sender)[0]] == [t for t, _ in _send_recv(receiver)[1]]
    check_stage_models(result.stages, tmp_path)
    feeds = random_feeds(model)
    assert_close(reference(tiny_path, feeds), simulate(result.stages, feeds, tmp_path))


def test_values_crossing_several_stages_are_forwarded_in_order(tiny_path: Path, tmp_path: Path) -> None:
    # With no weight allowed in replicated nodes, the rotary angles (read from inv_freq) are computed
    # on stage 0 and must travel 0 -> 1 -> 2 -> 3 through stages that only forward them.
    model = load_model(tiny_path)
    result = PipelineStageSplit(DeviceMesh(pp=4), replicate_max_weight_bytes=0)(model)
    first = result.stages[0].sent
    assert len(first) >= 3  # the residual stream plus the shared rotary values
    forwarded = [name for name in first if "/model/layers." not in name]
    assert forwarded
    for stage in result.stages[1:-1]:
        assert [n for n in stage.received if n in forwarded] == forwarded
        assert [n for n in stage.sent if n in forwarded] == forwarded
    for stage in result.stages:
        # each Send / Recv depends on the previous one of its link: the order is data, not luck
        for op_type in ("Send", "Recv"):
            chain = [n for n in stage.model.graph if n.domain == LLMIR_DOMAIN and n.op_type == op_type]
            for before, after in itertools.pairwise(chain):
                assert before in _ancestors(after), f"stage {stage.stage}: {after.name} may run before {before.name}"
    tags = [tag for stage in result.stages for tag, _ in _send_recv(stage)[0]]
    sent_names = [name for stage in result.stages for name in stage.sent]
    assert len(set(zip(tags, sent_names, strict=True))) == len(set(sent_names))  # one tag per value
    check_stage_models(result.stages, tmp_path)
    feeds = random_feeds(model)
    assert_close(reference(tiny_path, feeds), simulate(result.stages, feeds, tmp_path))


def test_unnamed_layers_fall_back_on_the_kv_cache_structure(tmp_path: Path) -> None:
    path = tiny_decoder_path(tmp_path, anonymous=True)
    model = load_model(path)
    assert all(not n.name.startswith("/model") for n in model.graph)
    result = PipelineStageSplit(DeviceMesh(pp=2), stage_cut_after_layer=[1])(model)
    assert result.layer_source == "kv-cache structure"
    for stage in result.stages:
        assert _kv_layers([b.local for b in stage.inputs]) == set(stage.layers)
        assert _kv_layers([b.local for b in stage.outputs]) == set(stage.layers)
    feeds = random_feeds(model)
    assert_close(reference(path, feeds), simulate(result.stages, feeds, tmp_path))


def test_an_output_of_replicated_nodes_comes_from_the_last_stage_only(tmp_path: Path) -> None:
    path = tiny_decoder_path(tmp_path, mask_output=True)
    model = load_model(path)
    result = PipelineStageSplit(DeviceMesh(pp=2))(model)
    owners = [s.stage for s in result.stages for b in s.outputs if b.original == "additive_mask"]
    assert owners == [1]
    feeds = random_feeds(model)
    assert_close(reference(path, feeds), simulate(result.stages, feeds, tmp_path))


def test_peers_are_the_same_tp_rank_of_the_neighbour_stages(tiny_path: Path) -> None:
    mesh = DeviceMesh(pp=2, tp=2)
    result = PipelineStageSplit(mesh, tp_rank=1, stage_cut_after_layer=[1])(load_model(tiny_path))
    assert [s.rank for s in result.stages] == [1, 3]
    assert {peer for _, peer in _send_recv(result.stages[0])[0]} == {3}
    assert {peer for _, peer in _send_recv(result.stages[1])[1]} == {1}


def test_collective_groups_become_the_stage_tp_group(tmp_path: Path) -> None:
    # a tp rank's model holds groups of tp ranks; on stage 1 of a (pp 2, tp 2) mesh they are ranks 2, 3
    proto = TinyDecoder(layers=2).build()
    for node in proto.graph.node:
        if node.name.startswith("/model/layers.1/") and node.op_type == "Softmax":
            original_output = node.output[0]
            node.output[0] = original_output + ".pre"
            proto.graph.node.append(oh.make_node("AllReduce", [node.output[0]], [original_output],
                                                 domain=LLMIR_DOMAIN, name="/model/layers.1/ar", group=[0, 1]))
            break
    proto.opset_import.append(oh.make_opsetid(LLMIR_DOMAIN, 1))
    model = ir.from_proto(proto)
    model.graph.sort()
    stages = PipelineStageSplit(DeviceMesh(pp=2, tp=2), tp_rank=0, stage_cut_after_layer=[0])(model).stages
    groups = [list(n.attributes["group"].as_ints()) for s in stages for n in s.model.graph if n.op_type == "AllReduce"]
    assert groups == [[2, 3]]


def test_explicit_cuts_and_their_errors(tiny_path: Path) -> None:
    model = load_model(tiny_path)
    result = PipelineStageSplit(DeviceMesh(pp=2), stage_cut_after_layer=[2])(model)
    assert [s.layers for s in result.stages] == [range(0, 3), range(3, 4)]
    assert result.balance is None
    with pytest.raises(PlanError, match="needs 1"):
        PipelineStageSplit(DeviceMesh(pp=2), stage_cut_after_layer=[0, 1])(model)
    with pytest.raises(PlanError, match="at least one decoder layer per stage"):
        PipelineStageSplit(DeviceMesh(pp=8))(model)


def test_memory_limit_failure_names_the_stage(tiny_path: Path) -> None:
    model = load_model(tiny_path)
    # the 8 KiB table: replicable (recomputed where read: layer 0) under the default 1 MiB bound
    embedding, layers, head = layer_units(model)
    assert "model.embed_tokens.weight" in layers[0].weights and not embedding.weights
    embedding, layers, head = layer_units(model, replicate_max_weight_bytes=1024)
    assert embedding.weights == {"model.embed_tokens.weight": 64 * 32 * 4}
    assert {"lm_head.weight", "model.norm.weight"} <= head.weights.keys()
    for index, unit in enumerate(layers):
        named = {int(n.split(".")[2]) for n in unit.weights if n.startswith("model.layers.")}
        assert named == {index}, unit.weights.keys()
        assert f"model.layers.{index}.self_attn.q_proj.weight" in unit.weights
        assert unit.cost > embedding.cost  # four projections and an MLP outweigh one embedding row
    with pytest.raises(PlanError, match=r"stage [0-3] \(.*\), .* over the limit"):
        PipelineStageSplit(DeviceMesh(pp=4), memory_limit_bytes=4096)(model)
    # one layer per stage: the exact need fits; 8 KiB of KV cache per layer on top does not
    need = max(PipelineStageSplit(DeviceMesh(pp=4))(model).balance.stage_memory_bytes)
    fits = PipelineStageSplit(DeviceMesh(pp=4), memory_limit_bytes=need)(model)
    assert max(fits.balance.stage_memory_bytes) == need
    with pytest.raises(PlanError, match=r"8.00 KiB over the limit"):
        PipelineStageSplit(DeviceMesh(pp=4), memory_limit_bytes=need, extra_memory_bytes_per_layer=8192)(model)


def test_input_model_is_not_modified(tiny_path: Path) -> None:
    model = load_model(tiny_path)
    before = onnx.printer.to_text(ir.to_proto(model).graph)
    PipelineStageSplit(DeviceMesh(pp=4))(model)
    assert onnx.printer.to_text(ir.to_proto(model).graph) == before


def test_a_model_without_layers_is_refused(tmp_path: Path) -> None:
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = ir.from_proto(oh.make_model(graph, ir_version=10, opset_imports=[oh.make_opsetid("", 17)]))
    with pytest.raises(InputModelError, match="cannot find the decoder layers"):
        PipelineStageSplit(DeviceMesh(pp=2))(model)


def test_compose_bindings_with_tensor_parallel_slices() -> None:
    outer = [SliceBinding("past_key_values.1.key", "past_key_values.1.key", 1, 2, 4),
             SliceBinding("input_ids", "input_ids", None, 0, 0)]
    inner = [SliceBinding("past_key_values.1.key", "past_key_values.1.key", None, 0, 0)]
    assert compose_bindings(outer, inner) == [SliceBinding("past_key_values.1.key", "past_key_values.1.key", 1, 2, 4)]


# --------------------------------------------------------------------------- another stage's cache shape


def cross_shape_model(folder: Path, read: str, axis: int, window: int | None) -> Path:
    """Two layers whose caches have their own length symbols (p0, p1), as torch dynamo exports them
    without named dims; layer 0 adds a size of layer 1's cache (`read`: Shape's start/end, or a Gather
    of the whole shape) to its input. `window`: layer 1 keeps only its last `window` tokens."""
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "model.embed.weight"),
             onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             onnx.numpy_helper.from_array(np.array([axis], np.int64), "picked")]
    nodes = [oh.make_node("Gather", ["model.embed.weight", "input_ids"], ["h"], name="/model/embed/Gather")]
    if read == "start":
        nodes.append(oh.make_node("Shape", ["past_key_values.1.key"], ["size"], start=axis, end=axis + 1,
                                  name="/model/Shape"))
    else:
        nodes += [oh.make_node("Shape", ["past_key_values.1.key"], ["shape"], name="/model/Shape"),
                  oh.make_node("Gather", ["shape", "picked"], ["size"], axis=0, name="/model/Gather")]
    nodes += [oh.make_node("Cast", ["size"], ["size_f"], to=f, name="/model/Cast"),
              oh.make_node("Add", ["h", "size_f"], ["x0"], name="/model/layers.0/Add")]
    inputs = [oh.make_tensor_value_info("input_ids", i64, ["b", "s"])]
    outputs = [oh.make_tensor_value_info("logits", f, ["b", "s", 2])]
    x = "x0"
    for layer in range(2):
        scope, past = f"/model/layers.{layer}", f"past_key_values.{layer}.key"
        inputs.append(oh.make_tensor_value_info(past, f, ["b", 1, f"p{layer}", 2]))
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal((2, 2)).astype(np.float32),
                                                  f"model.layers.{layer}.proj.weight"))
        weight = f"model.layers.{layer}.proj.weight"
        nodes += [oh.make_node("MatMul", [x, weight], [f"y{layer}"], name=f"{scope}/MatMul"),
                  oh.make_node("Unsqueeze", [f"y{layer}", "axis1"], [f"k{layer}"], name=f"{scope}/Unsqueeze"),
                  oh.make_node("Concat", [past, f"k{layer}"], [f"cat{layer}"], axis=2, name=f"{scope}/Concat")]
        total = f"p{layer} + s"
        if layer == 1 and window is not None:
            inits += [onnx.numpy_helper.from_array(np.array([-window], np.int64), "window_start"),
                      onnx.numpy_helper.from_array(np.array([1 << 30], np.int64), "window_end"),
                      onnx.numpy_helper.from_array(np.array([2], np.int64), "window_axis")]
            nodes.append(oh.make_node("Slice", [f"cat{layer}", "window_start", "window_end", "window_axis"],
                                      [f"present.{layer}.key"], name=f"{scope}/Slice"))
            total = "kept"
        else:
            nodes.append(oh.make_node("Identity", [f"cat{layer}"], [f"present.{layer}.key"], name=f"{scope}/Identity"))
        outputs.append(oh.make_tensor_value_info(f"present.{layer}.key", f, ["b", 1, total, 2]))
        x = f"y{layer}"
    nodes.append(oh.make_node("Identity", [x], ["logits"], name="/lm_head/Identity"))
    graph = oh.make_graph(nodes, "cross_shape", inputs, outputs, inits)
    path = folder / "cross" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(oh.make_model(graph, ir_version=10, opset_imports=[oh.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(("read", "axis", "window"), [("start", 2, None), ("gather", 2, None), ("gather", 0, 3)])
def test_another_stages_cache_shape_is_read_off_an_own_cache(
    tmp_path: Path, read: str, axis: int, window: int | None
) -> None:
    """The past length when no layer keeps a window, the batch always: stage 0 is fed layer 0's cache only."""
    path = cross_shape_model(tmp_path, read, axis, window)
    result = PipelineStageSplit(DeviceMesh(pp=2))(load_model(path))
    for stage in result.stages:
        assert _kv_layers([b.local for b in stage.inputs]) == set(stage.layers)
    from llmir_onnx.runtime.feeds import FeedSizes

    # the size read is added to every logit: batch 2 and 5 past tokens, neither a static dim's size
    feeds = random_feeds(load_model(path), FeedSizes(batch=2, new_tokens=4, past_tokens=5))
    assert_close(reference(path, feeds), simulate(result.stages, feeds, tmp_path))


@pytest.mark.parametrize("read", ["start", "gather"])
def test_another_stages_past_length_is_refused_when_a_layer_keeps_a_window(tmp_path: Path, read: str) -> None:
    model = load_model(cross_shape_model(tmp_path, read, 2, window=3))
    with pytest.raises(PlanError, match=r"^stage 0 \(layers 0-0\) reads the shape of 'past_key_values.1.key', "
                       r"layer 1's KV cache on another stage, in node '/model/Shape' \(Shape\).*axes \[2\].*"
                       r"different lengths at 2048 tokens \(present.0.key 2048, present.1.key 3\); use --pp 1: "):
        PipelineStageSplit(DeviceMesh(pp=2))(model)


# --------------------------------------------------------------------------- every bundled model, in process


def bundled_models() -> list[Path]:
    return sorted(MODELS.glob("*/model.onnx"))


def _layer_count(path: Path) -> int:
    import json

    config = json.loads((path.parent / "config.json").read_text())
    return int(config.get("num_hidden_layers", config.get("n_layer", 0)))


@pytest.mark.parametrize("path", bundled_models(), ids=lambda p: p.parent.name)
def test_bundled_models_split_in_process(path: Path, tmp_path: Path) -> None:
    model = load_model(path)
    pp = 4 if _layer_count(path) >= 4 else 2
    result = PipelineStageSplit(DeviceMesh(pp=pp))(model)
    assert result.layer_source == "names"
    assert result.num_layers == _layer_count(path)
    for stage in result.stages:
        assert _kv_layers([b.local for b in stage.inputs]) == set(stage.layers)
        assert _kv_layers([b.local for b in stage.outputs]) == set(stage.layers)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        # the genai builder's exports declare shapes onnx's own inference contradicts: the original
        # fails full checking too (tests/test_rank_models_check.py checks their ranks structurally)
        pass
    else:
        check_stage_models(result.stages, tmp_path)
    feeds = random_feeds(model)
    assert_close(reference(path, feeds), simulate(result.stages, feeds, tmp_path))


# --------------------------------------------------------------------------- real processes


def split_and_write_plan(path: Path, plan_dir: Path, pp: int, tp: int = 1, **split_options: int) -> None:
    """Split `path` (after the tp partition when tp > 1) and write the plan with write_plan."""
    mesh = DeviceMesh(pp=pp, tp=tp)
    source = load_model(path)
    if tp == 1:
        model = load_model(path)
        whole = [SliceBinding(v.name, v.name, None, 0, 0) for v in model.graph.inputs]
        whole_out = [SliceBinding(v.name, v.name, None, 0, 0) for v in model.graph.outputs]
        tp_models = [(model, whole, whole_out)]
    else:
        from llmir_onnx.partition import PartitionOptions, partition

        tp_result = partition(load_model(path), PartitionOptions(tp=tp))
        tp_models = [
            (p.model,
             [SliceBinding(b.original, b.local, b.dim, b.start, b.stop) for b in p.inputs],
             [SliceBinding(b.original, b.local, b.dim, b.start, b.stop) for b in p.outputs])
            for p in sorted(tp_result.ranks, key=lambda program: program.rank)
        ]
    ranks, _ = split_tp_stages(*tp_models_for_split(tp_models), mesh, **split_options)
    assert [r.rank for r in ranks] == list(range(mesh.world_size))
    mesh_info = {"tp": tp, "pp": pp, "cp": 1, "world_size": mesh.world_size,
                 "groups": {"tp": [list(g) for g in mesh.groups("tp")], "pp": [list(g) for g in mesh.groups("pp")]}}
    rank_models = [rank_model(r) for r in ranks]
    io = tensor_infos(source.graph.inputs), tensor_infos(source.graph.outputs)
    write_plan(plan_dir, PlanContents(path, *io, mesh_info, rank_models, options={"tp": tp, "pp": pp}))


@pytest.fixture
def mpi_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmir_onnx.runtime.launch import custom_ops_library_path

    custom_ops_library_path()  # fails (not skips) without the library: these tests exist to run it
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("LLMIR_COMM_TIMEOUT_S", "60")


def _verify(path: Path, plan_dir: Path, pp: int, tp: int = 1, **split_options: int) -> None:
    split_and_write_plan(path, plan_dir, pp, tp, **split_options)
    _, rows = verify_plan(plan_dir, random_feeds(load_model(path)), timeout_s=240)  # per-dtype defaults
    print(f"\n{path.parent.name} tp={tp} pp={pp}\n{format_comparisons(rows)}")
    names = {row.name for row in rows}
    assert "logits" in names and any(name.startswith("present.") for name in names)
    assert all(row.ok for row in rows), format_comparisons(rows)


@pytest.mark.parametrize("path", [p for p in bundled_models() if _layer_count(p) < 4], ids=lambda p: p.parent.name)
def test_bundled_models_pp2_through_processes(path: Path, tmp_path: Path, mpi_env: None) -> None:
    _verify(path, tmp_path / "plan", pp=2)


def test_tiny_pp4_through_processes(tiny_path: Path, tmp_path: Path, mpi_env: None) -> None:
    _verify(tiny_path, tmp_path / "plan", pp=4)


def test_forwarded_values_through_processes(tiny_path: Path, tmp_path: Path, mpi_env: None) -> None:
    # several values per link, some relayed through stages that do not read them (see above)
    _verify(tiny_path, tmp_path / "plan", pp=4, replicate_max_weight_bytes=0)


def test_unnamed_layers_through_processes(tmp_path: Path, mpi_env: None) -> None:
    _verify(tiny_decoder_path(tmp_path, anonymous=True), tmp_path / "plan", pp=4)


def test_synthetic_pp2_and_pp4_through_processes(synthetic4_path: Path, tmp_path: Path, mpi_env: None) -> None:
    _verify(synthetic4_path, tmp_path / "plan2", pp=2)
    _verify(synthetic4_path, tmp_path / "plan4", pp=4)


def test_synthetic_tp2_pp4_through_processes(synthetic4_path: Path, tmp_path: Path, mpi_env: None) -> None:
    _verify(synthetic4_path, tmp_path / "plan", pp=4, tp=2)  # 8 ranks


DEEP_BUNDLED_MODELS = [p for p in bundled_models() if _layer_count(p) >= 4] or [
    pytest.param(
        None,
        marks=pytest.mark.skip(
            reason="no model in models/ has 4+ layers: only models/smollm2 (models/export_smollm2.py, not committed)"
        ),
    )
]


@pytest.mark.parametrize("path", DEEP_BUNDLED_MODELS, ids=lambda p: p.parent.name if p else "smollm2-absent")
def test_large_bundled_models_pp4_through_processes(path: Path, tmp_path: Path, mpi_env: None) -> None:
    _verify(path, tmp_path / "plan", pp=4)


@pytest.mark.parametrize(
    "name", ["llama-gqa-optimum", "llama-gqa-torch-dynamo", "llama-gqa-genai", "gpt2-torch-legacy", "qwen3-optimum"]
)
def test_tp2_pp2_through_processes(name: str, tmp_path: Path, mpi_env: None) -> None:
    _verify(MODELS / name / "model.onnx", tmp_path / "plan", pp=2, tp=2)
