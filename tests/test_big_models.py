"""Big-model behaviour on small models: lazy weights, bounded memory, determinism, atomic output, > 2 GiB."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from synthetic_helpers import synthetic_module

from llmir_onnx import weight_slices
from llmir_onnx.api import partition_to_dir
from llmir_onnx.ir_io import load_model
from llmir_onnx.partition import PartitionOptions, partition
from llmir_onnx.passes.stages import StageSplitPlan, StageSplitResult
from llmir_onnx.placement import PARTIAL_SUM, Partial, Placement, Replicate, Shard, shard_array
from llmir_onnx.plan import emit
from llmir_onnx.plan.data_files import RankWeights, WeightWriter
from llmir_onnx.plan.memory import plan_memory
from llmir_onnx.plan.tp_rank_copy import TpRankCopy
from llmir_onnx.weight_slices import ExternalSlice, Zeros, rank_weight

REPO = Path(__file__).resolve().parent.parent


synthetic = synthetic_module()
TINY = synthetic.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.generate(TINY, tmp_path_factory.mktemp("tiny"))


def _external(tmp_path: Path, array: np.ndarray, offset: int = 24) -> ir.ExternalTensor:
    """`array` stored at `offset` of a data file, as a model's external initializer would be."""
    data = tmp_path / "weights.data"
    data.write_bytes(b"\x07" * offset + array.tobytes() + b"\x09" * 5)
    return ir.ExternalTensor(
        "weights.data",
        offset,
        array.nbytes,
        ir.DataType.from_numpy(array.dtype),
        shape=ir.Shape(array.shape),
        name="w",
        base_dir=str(tmp_path),
    )


def _written(tensor: ir.TensorProtocol, tmp_path: Path) -> bytes:
    out = tmp_path / "out.bin"
    with open(out, "wb") as stream:
        stream.write(b"head")  # the saver writes each tensor at an offset of an open file
        tensor.tofile(stream)
    return out.read_bytes()[4:]


PLACEMENTS: list[tuple[Placement, tuple[int, ...] | None]] = [
    (Shard(0), None),
    (Shard(1), None),
    (Shard(-1), None),
    (Shard(1, blocks=(32, 16, 16)), None),  # fused q|k|v columns
    (Shard(1, blocks=(32, 16, 16), parts=(4, 2, 2)), None),  # kv heads fewer than ranks: replicated pairs
    (Shard(0, blocks=(8, 16)), None),
    (Shard(1), (24, 4, 16)),  # a weight viewed as [in, heads, head_dim] to be split by heads
    (Shard(0), (8, -1)),  # MatMulNBits' blob viewed as [N, -1]
    (PARTIAL_SUM, None),
    (Replicate(), None),
]


@pytest.mark.parametrize(("placement", "view"), PLACEMENTS, ids=[f"{p}-{v}" for p, v in PLACEMENTS])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_lazy_rank_weight_equals_sliced_array(
    placement: Placement, view: tuple[int, ...] | None, dtype: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny chunks and run thresholds so the block gather, its last short block and the run copy all run.
    monkeypatch.setattr(weight_slices, "CHUNK_BYTES", 200)
    monkeypatch.setattr(weight_slices, "LONG_RUN_BYTES", 64)
    array = np.random.default_rng(0).standard_normal((24, 64)).astype(dtype)
    source = _external(tmp_path, array)
    tp = 4
    for tp_rank in range(tp):
        expected = np.ascontiguousarray(shard_array(array.reshape(view or array.shape), placement, tp, tp_rank))
        if view:
            expected = expected.reshape(-1)
        tensor = rank_weight(source, placement, tp, tp_rank, view, name="w")
        assert tuple(tensor.shape) == expected.shape
        assert tensor.dtype == source.dtype
        assert tensor.nbytes == expected.nbytes
        np.testing.assert_array_equal(tensor.numpy(), expected)
        assert _written(tensor, tmp_path) == expected.tobytes()
        if isinstance(placement, Shard):
            assert isinstance(tensor, ExternalSlice)
        elif isinstance(placement, Partial) and tp_rank > 0:
            assert isinstance(tensor, Zeros)
        else:
            assert tensor is source  # unchanged weights are copied file to file, never loaded


def test_in_memory_weights_are_sliced_in_memory() -> None:
    array = np.arange(32, dtype=np.float32).reshape(4, 8)
    tensor = rank_weight(ir.tensor(array), Shard(1), 2, 1)
    np.testing.assert_array_equal(tensor.numpy(), array[:, 4:])


def test_partition_reads_weights_only_while_writing(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No weight is loaded (mmap of the source) on the partition path; the plan matches the numbers.

    Only tensors the saver inlines into the rank's .onnx (1 KiB and less: the tiny model's norms) are read.
    """
    loaded: list[str] = []
    original_load = ir.ExternalTensor._load

    def counting_load(self: ir.ExternalTensor) -> None:
        if self.nbytes > 1024:
            loaded.append(self.name or "?")
        original_load(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", counting_load)
    gathered: list[str] = []
    original_gather = ExternalSlice._gather

    def counting_gather(self: ExternalSlice) -> ir.Tensor:
        gathered.append(self.name or "?")
        return original_gather(self)

    monkeypatch.setattr(ExternalSlice, "_gather", counting_gather)
    manifest = partition_to_dir(tiny_model, tmp_path / "plan", tp=2, pp=2)
    assert loaded == []
    assert gathered == []
    source = load_model(tiny_model)
    weights = {name: value.const_value for name, value in source.graph.initializers.items()}
    assert sum(t.nbytes for t in weights.values() if isinstance(t, ir.ExternalTensor)) > 0
    monkeypatch.setattr(ir.ExternalTensor, "_load", original_load)
    # Every rank's weights are the slices the placements say (gate/up by columns, down by rows).
    tp_of = {entry.rank: entry.coords["tp"] for entry in manifest.ranks}
    checked = 0
    for entry in manifest.ranks:
        rank_model = load_model(tmp_path / "plan" / entry.file)
        for name, value in rank_model.graph.initializers.items():
            if name in weights and name.endswith(("gate_proj.weight", "down_proj.weight")):
                full = weights[name].numpy()
                placement = Shard(1) if "gate" in name else Shard(0)
                expected = shard_array(full, placement, 2, tp_of[entry.rank])
                np.testing.assert_array_equal(value.const_value.numpy(), expected)
                checked += 1
    assert checked == 2 * TINY.layers * 2  # two weights per layer, each layer on two tp ranks


@pytest.mark.parametrize(
    ("model", "tp", "builds"),
    [("tiny", 2, 1), ("tiny", 4, 1), (REPO / "models/llama-gqa-torch-legacy/model.onnx", 3, 3)],
    ids=["tp2", "tp4", "uneven-tp3"],
)
def test_weights_stream_before_the_stage_graphs_are_built(
    model: str | Path, tp: int, builds: int, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weight path reads top to bottom: every rank's weights are decided, the writer starts, then the
    stage graphs are built (one split of tp rank 0's model, or one per tp rank when the split is uneven)."""
    events: list[str] = []
    original_start, original_build = WeightWriter.start, StageSplitPlan.build

    def start(self: WeightWriter, ranks: Sequence[RankWeights]) -> None:
        events.append(f"writer started with {len(ranks)} ranks")
        original_start(self, ranks)

    def build(self: StageSplitPlan) -> StageSplitResult:
        events.append("stages built")
        return original_build(self)

    monkeypatch.setattr(WeightWriter, "start", start)
    monkeypatch.setattr(StageSplitPlan, "build", build)
    source = tiny_model if model == "tiny" else Path(model)
    manifest = partition_to_dir(source, tmp_path / "plan", tp=tp, pp=2)
    assert events == [f"writer started with {2 * tp} ranks"] + ["stages built"] * builds
    assert len(manifest.ranks) == 2 * tp


def _partition_cli(model: Path, out: Path, *extra: str, hash_seed: str = "0") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run(
        [sys.executable, "-m", "llmir_onnx.cli.main", "partition", str(model), "--tp", "2", "--pp", "2",
         "-o", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


CliPartitions = dict[str, tuple[Path, subprocess.CompletedProcess]]


@pytest.fixture(scope="module")
def cli_partitions(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> CliPartitions:
    """The tiny model partitioned tp 2 x pp 2 by three CLI processes, each with its own hash seed and
    progress flag: --progress (seed 1), neither flag (seed 2), --quiet (seed 3). Two tests read them."""
    folder = tmp_path_factory.mktemp("cli-partitions")
    runs = {"shown": (("--progress",), "1"), "silent": ((), "2"), "quiet": (("--quiet",), "3")}
    return {name: (folder / name, _partition_cli(tiny_model, folder / name, *extra, hash_seed=seed))
            for name, (extra, seed) in runs.items()}


def test_partition_is_deterministic(cli_partitions: CliPartitions) -> None:
    """Same model and options, processes with different hash seeds (and progress shown or not):
    byte-identical plans."""
    trees = {}
    for name, (out, result) in cli_partitions.items():
        assert result.returncode == 0, result.stderr
        trees[name] = _tree_bytes(out)
    a = trees["shown"]
    assert "manifest.json" in a and "rank3.onnx.data" in a
    for other, b in trees.items():
        assert sorted(a) == sorted(b), other
        for name in a:
            assert a[name] == b[name], f"{name} differs between two partitions of the same model ({other})"


def test_progress_goes_to_stderr_only_when_asked(cli_partitions: CliPartitions) -> None:
    _, shown = cli_partitions["shown"]
    assert shown.returncode == 0, shown.stderr
    assert "writing 4 ranks" in shown.stderr and "100%" in shown.stderr
    assert "llmir-onnx:" not in shown.stdout
    # stderr is a pipe here, not a terminal: no progress unless asked; --quiet wins over a terminal.
    _, silent = cli_partitions["silent"]
    assert silent.returncode == 0 and silent.stderr == ""
    _, quiet = cli_partitions["quiet"]
    assert quiet.returncode == 0 and quiet.stderr == ""


class _Injected(Exception):
    pass


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_tp_rank_copies_are_written_as_if_made(
    tp: int, pp: int, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other tp ranks (of a stage) are written by patching tp rank 0's serialized model (their
    weights' places and values, their peers): the files equal those written from the copies made as graphs."""
    made_as_graphs: list[int] = []
    original = emit._made

    def made(model: object) -> ir.Model:
        if isinstance(model, TpRankCopy):
            made_as_graphs.append(model.tp_rank)
        return original(model)  # type: ignore[arg-type]

    monkeypatch.setattr(emit, "_made", made)
    patched = partition_to_dir(tiny_model, tmp_path / "patched", tp=tp, pp=pp)
    assert made_as_graphs == []  # no copy was made as a graph
    monkeypatch.setattr(emit, "_tp_rank_copy_proto", lambda *args: None)
    graphs = partition_to_dir(tiny_model, tmp_path / "graphs", tp=tp, pp=pp)
    assert sorted(made_as_graphs) == sorted(list(range(1, tp)) * pp)  # every copy was made as a graph here
    a, b = _tree_bytes(tmp_path / "patched"), _tree_bytes(tmp_path / "graphs")
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "manifest.json":  # it names its own folder
            assert a[name] == b[name], f"{name} differs between the patched and the made copies"
    assert patched.files == graphs.files
    if pp == 1:
        return  # no pipeline peers
    for rank in range(tp * pp):
        nodes = onnx.load(tmp_path / "patched" / f"rank{rank}.onnx").graph.node
        peers = [a.i for n in nodes if n.op_type in ("Send", "Recv") for a in n.attribute if a.name == "peer"]
        # Stage s of tp rank t talks to stages s -+ 1 of the same tp rank (global rank = stage * tp + t).
        assert peers and all(peer % tp == rank % tp and peer // tp != rank // tp for peer in peers), (rank, peers)


@pytest.mark.parametrize("error", [_Injected, KeyboardInterrupt])
def test_interrupted_partition_keeps_the_older_plan(
    error: type[BaseException], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "plan"
    partition_to_dir(tiny_model, out, tp=2)
    before = _tree_bytes(out)
    original_write = emit.write_model_proto

    def failing_write(proto: onnx.ModelProto, path: Path) -> Path:
        if path.name == "rank1.onnx":
            # Fail half way: the data files and rank 0 exist in the staging folder when the error comes.
            original_write(proto, path)
            raise error("interrupted while writing rank 1")
        return original_write(proto, path)

    monkeypatch.setattr(emit, "write_model_proto", failing_write)
    with pytest.raises(error):
        partition_to_dir(tiny_model, out, tp=2)
    assert _tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]  # no staging folder left behind
    with pytest.raises(error):
        partition_to_dir(tiny_model, tmp_path / "fresh", tp=2)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]


def _peak_rss_of_partition(model: Path, out: Path) -> int:
    child = subprocess.Popen(
        [sys.executable, "-m", "llmir_onnx.cli.main", "partition", str(model), "--tp", "2", "--pp", "2",
         "-o", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return usage.ru_maxrss * 1024


def test_peak_memory_does_not_grow_with_the_weights(tiny_model: Path, tmp_path: Path) -> None:
    """A ~200 MB model partitions in about the memory of a tiny one (the old path held every weight)."""
    config = replace(TINY, hidden=1024, intermediate=4096, layers=4, heads=8, kv_heads=4, vocab=8192)
    big = synthetic.generate(config, tmp_path / "big")
    weight_bytes = (tmp_path / "big" / "model.onnx.data").stat().st_size
    assert weight_bytes > 150 << 20
    small_peak = _peak_rss_of_partition(tiny_model, tmp_path / "small-plan")
    big_peak = _peak_rss_of_partition(big, tmp_path / "big-plan")
    # Generous: interpreter and graph noise, and a few write buffers per writer thread.
    assert big_peak - small_peak < 0.25 * weight_bytes, (small_peak, big_peak, weight_bytes)


def _iter_rank_weight_bytes(models: list[ir.Model]) -> Iterator[int]:
    for model in models:
        for value in model.graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value.nbytes


def test_over_2gib_model_plans_without_serializing_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2.4 GiB model (sparse file: no disk time) goes through every pass and the memory plan.

    Anything that serialized a ModelProto with its weights inline would fail at protobuf's 2 GiB;
    anything that read the weights would count here.
    """
    config = replace(TINY, hidden=2048, intermediate=8192, layers=8, heads=16, kv_heads=8, vocab=32000)
    model_path = synthetic.generate(replace(config, dtype="float32"), tmp_path / "big", sparse=True)
    weight_bytes = (tmp_path / "big" / "model.onnx.data").stat().st_size
    assert weight_bytes > 2**31
    loaded: list[str] = []
    original_load = ir.ExternalTensor._load

    def counting_load(self: ir.ExternalTensor) -> None:
        loaded.append(self.name or "?")
        original_load(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", counting_load)
    result = partition(load_model(model_path), PartitionOptions(tp=2, pp=2))
    assert len(result.ranks) == 4
    for program in result.ranks:
        assert plan_memory(program.model, 1, 128).weight_bytes > 0
    assert loaded == []
    # tp 2: the embedding and lm_head are replicated, everything else is split once.
    assert sum(_iter_rank_weight_bytes([p.model for p in result.ranks])) >= weight_bytes
