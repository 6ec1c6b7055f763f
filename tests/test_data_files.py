"""The plan's weight files: each byte placed once, written from the source, referenced by the rank models."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from llmir_onnx import weight_slices
from llmir_onnx.api import partition_to_dir
from llmir_onnx.digest import hash_file
from llmir_onnx.placement import PARTIAL_SUM, Placement, Shard, shard_array
from llmir_onnx.plan import data_files
from llmir_onnx.plan.data_files import (
    ALIGNMENT_BYTES,
    RankWeights,
    WeightWriter,
    rank_data_name,
    stage_shared_data_name,
)
from llmir_onnx.plan.manifest import Manifest
from llmir_onnx.weight_slices import rank_weight

MODELS = Path(__file__).resolve().parents[1] / "models"
TP = 4


def _source(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, ir.ExternalTensor]:
    """The arrays stored one after another (unaligned) in one data file, as external tensors."""
    offset, blob, tensors = 24, bytearray(b"\x07" * 24), {}
    for name, array in arrays.items():
        blob += array.tobytes()
        tensors[name] = ir.ExternalTensor(
            "source.data", offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
            shape=ir.Shape(array.shape), name=name, base_dir=str(folder),
        )  # fmt: skip
        offset += array.nbytes
    (folder / "source.data").write_bytes(bytes(blob))
    return tensors


def _read(folder: Path, place: data_files.WeightPlace) -> bytes:
    with open(folder / place.file, "rb") as stream:
        stream.seek(place.offset)
        return stream.read(place.length)


# name -> (placement, view): column and row splits, fused blocks, a heads view, a Partial, a replica.
WEIGHTS: dict[str, tuple[Placement | None, tuple[int, ...] | None]] = {
    "q_proj_columns": (Shard(1), None),
    "o_proj_rows": (Shard(0), None),
    "qkv_fused_columns": (Shard(1, blocks=(32, 16, 16)), None),
    "kv_heads_shared_by_pairs": (Shard(1, blocks=(32, 16, 16), parts=(4, 2, 2)), None),
    "heads_view": (Shard(1), (48, 4, 16)),
    "bias_partial": (PARTIAL_SUM, None),
    "norm_replicated": (None, None),
}


@pytest.mark.parametrize(("dtype", "order"), [(np.float16, "source"), (np.float32, "source"), (np.float32, "shuffled")])
def test_every_rank_weight_is_written_once_where_it_is_placed(
    dtype: type, order: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """... and each file's size and digest, taken as it is written, are those of the bytes on disk, also
    when its weights are written in another order than the file's (`shuffled`)."""
    if order == "shuffled":
        in_source_order = data_files._pieces_in_source_order

        def shuffled(jobs: list[tuple[ir.TensorProtocol, data_files.WeightPlace]]) -> list[data_files._Piece]:
            pieces = in_source_order(jobs)
            random.Random(3).shuffle(pieces)
            return pieces

        monkeypatch.setattr(data_files, "_pieces_in_source_order", shuffled)
    # Small windows and run thresholds: the gather crosses many windows, and both copy paths run.
    monkeypatch.setattr(weight_slices, "CHUNK_BYTES", 700)
    monkeypatch.setattr(weight_slices, "LONG_RUN_BYTES", 64)
    # Pieces smaller than a weight and cutting its rows and runs mid-way: every weight is written by several
    # pieces (in any order when shuffled), each at its own offset.
    monkeypatch.setattr(data_files, "PIECE_BYTES", 3000)
    # Hashing windows smaller than a weight and not page-aligned: prefixes span several mapped windows.
    monkeypatch.setattr(data_files, "HASH_CHUNK_BYTES", 5000)
    rng = np.random.default_rng(1)
    # 48 x 64: every rank's share is over the 1 KiB threshold of external data, even in float16.
    arrays = {name: rng.standard_normal((48, 64)).astype(dtype) for name in WEIGHTS}
    source = _source(tmp_path, arrays)
    in_memory = ir.tensor(rng.standard_normal((40, 40)).astype(dtype), name="rewritten_constant")
    expected: dict[tuple[int, str], bytes] = {}
    ranks = []
    for stage in range(2):
        for tp_rank in range(TP):
            rank = stage * TP + tp_rank
            tensors: dict[str, ir.TensorProtocol] = {"rewritten_constant": in_memory}
            expected[(rank, "rewritten_constant")] = in_memory.tobytes()
            for name, (placement, view) in WEIGHTS.items():
                if placement is None:
                    tensors[name] = source[name]
                    expected[(rank, name)] = arrays[name].tobytes()
                    continue
                tensors[name] = rank_weight(source[name], placement, TP, tp_rank, view, name=name)
                local = shard_array(arrays[name].reshape(view or arrays[name].shape), placement, TP, tp_rank)
                expected[(rank, name)] = np.ascontiguousarray(local).tobytes()
            ranks.append(RankWeights(rank, stage, tensors))
    plan = tmp_path / "plan"
    plan.mkdir()
    with WeightWriter(plan) as writer:
        writer.start(ranks)
        writer.finish()
    layout = writer.layout
    assert layout is not None
    assert writer.digests == {name: hash_file(plan / name) for name in layout.file_sizes}
    assert sorted(writer.digests) == sorted(path.name for path in plan.iterdir())
    for key, data in expected.items():
        place = layout.places[key]
        assert place.offset % ALIGNMENT_BYTES == 0
        assert _read(plan, place) == data, key
    # Held unchanged by all ranks of a stage: once in the stage's shared file, one copy per stage.
    for stage in range(2):
        shared = {layout.places[(stage * TP + t, "norm_replicated")] for t in range(TP)}
        assert len(shared) == 1 and next(iter(shared)).file == stage_shared_data_name(stage)
    # Slices held by one rank go to its own file; kv heads two ranks share are stored once for the pair.
    assert layout.places[(1, "q_proj_columns")].file == rank_data_name(1)
    assert layout.places[(0, "kv_heads_shared_by_pairs")] != layout.places[(2, "kv_heads_shared_by_pairs")]
    # The Partial's zero shares of ranks 1..3 are one hole, shared.
    zero_places = {layout.places[(t, "bias_partial")] for t in range(1, TP)}
    assert len(zero_places) == 1
    # No byte twice: the files hold the distinct weights plus alignment padding, nothing else.
    distinct = {(place.file, place.offset, place.length) for place in layout.places.values()}
    assert layout.total_bytes == sum(length for _, _, length in distinct)
    on_disk = sum((plan / name).stat().st_size for name in layout.file_sizes)
    assert on_disk < layout.total_bytes + ALIGNMENT_BYTES * len(distinct)


def test_pieces_cover_each_place_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pieces the writer threads take split big weights and cover every byte of every place once."""
    monkeypatch.setattr(data_files, "PIECE_BYTES", 3000)
    arrays = {name: np.ones((48, 64), np.float32) for name in ("columns", "rows", "whole")}
    source = _source(tmp_path, arrays)
    tensors = {f"columns{t}": rank_weight(source["columns"], Shard(1), TP, t) for t in range(TP)}
    tensors |= {f"rows{t}": rank_weight(source["rows"], Shard(0), TP, t) for t in range(TP)}
    tensors["whole"] = source["whole"]
    layout = data_files.plan_layout([RankWeights(0, 0, tensors)])
    pieces = data_files._pieces_in_source_order(layout.jobs)
    assert len(pieces) > len(layout.jobs) - TP + 1  # the 4 column slices are one group, cut again
    assert {span.file for piece in pieces for span in piece.spans} == {rank_data_name(0)}
    spans = sorted((span.offset, span.offset + span.length) for piece in pieces for span in piece.spans)
    for _, place in layout.jobs:
        inside = [(start, stop) for start, stop in spans if place.offset <= start < place.offset + place.length]
        assert inside[0][0] == place.offset and inside[-1][1] == place.offset + place.length
        assert all(stop == next_start for (_, stop), (next_start, _) in itertools.pairwise(inside))
    assert sum(stop - start for start, stop in spans) == layout.total_bytes


def test_a_weight_made_after_planning_goes_to_the_end_of_its_rank_file(tmp_path: Path) -> None:
    array = np.arange(2048, dtype=np.float32).reshape(32, 64)
    source = _source(tmp_path, {"w": array})
    late = np.full((16, 32), 3.0, dtype=np.float32)
    graph = ir.Graph([], [], nodes=[], initializers=[ir.Value(name="late", const_value=ir.tensor(late, name="late"))])
    model = ir.Model(graph, ir_version=10)
    plan = tmp_path / "plan"
    plan.mkdir()
    with WeightWriter(plan) as writer:
        writer.start([RankWeights(0, 0, {"w": source["w"]})])
        assert writer.place(0, model) == [rank_data_name(0)]
        writer.finish()
    reference = model.graph.initializers["late"].const_value
    assert isinstance(reference, ir.ExternalTensor) and reference.offset and reference.offset >= array.nbytes
    np.testing.assert_array_equal(reference.numpy(), late)


def test_a_failed_write_raises_and_leaves_no_open_files(tmp_path: Path) -> None:
    source = _source(tmp_path, {"w": np.ones((32, 64), np.float32)})
    (tmp_path / "source.data").write_bytes(b"short")  # the weight's bytes are gone
    plan = tmp_path / "plan"
    plan.mkdir()
    with pytest.raises(OSError, match="ends"), WeightWriter(plan) as writer:
        writer.start([RankWeights(0, 0, {"w": rank_weight(source["w"], Shard(0), 2, 0)})])
        writer.finish()


def _external_refs(model_path: Path) -> list[tuple[str, int, int]]:
    proto = onnx.load(model_path, load_external_data=False)
    refs = []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            refs.append((info["location"], int(info.get("offset", 0)), int(info["length"])))
    return refs


@pytest.mark.parametrize(
    ("name", "tp", "pp"), [("llama-gqa-torch-legacy", 4, 2), ("gpt2-torch-legacy", 2, 2), ("llama-gqa-genai", 8, 1)]
)
def test_plan_files_hold_only_referenced_bytes(name: str, tp: int, pp: int, tmp_path: Path) -> None:
    """Every data file is covered by the rank models' references (gaps below the alignment only), the
    manifest lists each rank's files, a stage's shared file serves all its tp ranks, and every written
    rank model passes onnx.checker with its external data."""
    plan = tmp_path / "plan"
    manifest = partition_to_dir(MODELS / name / "model.onnx", plan, tp=tp, pp=pp)
    ranges: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for entry in manifest.ranks:
        # The checker resolves the external data of the written file (shared files included).
        onnx.checker.check_model(str(plan / entry.file), full_check=True)
        refs = _external_refs(plan / entry.file)
        assert sorted({location for location, _, _ in refs}) == entry.data_files
        for location, offset, length in refs:
            ranges[location].add((offset, offset + length))
    data_names = sorted(p.name for p in plan.iterdir() if p.name.endswith(".data"))
    assert sorted(ranges) == data_names
    for location, spans in ranges.items():
        end = 0
        for start, stop in sorted(spans):
            assert start >= end or (start, stop) in spans, f"{location}: overlapping weights at {start}"
            assert start - end < ALIGNMENT_BYTES, f"{location}: {start - end} unreferenced bytes at {end}"
            end = max(end, stop)
        assert (plan / location).stat().st_size == end
    shared = [files for entry in manifest.ranks for files in entry.data_files if files.endswith("shared.data")]
    if tp > 1:
        assert len(shared) == len(manifest.ranks), "every rank of a tp > 1 stage shares replicated weights"
    assert Manifest.read(plan).ranks[0].data_files == manifest.ranks[0].data_files
    # The manifest's sizes and hashes, taken while the files were written, are the files' own.
    assert sorted(manifest.files) == sorted(path.name for path in plan.iterdir() if path.name != "manifest.json")
    assert manifest.files == {name: hash_file(plan / name) for name in manifest.files}


def test_a_copied_graph_with_an_unplanned_subgraph_weight_is_made_instead(tmp_path: Path) -> None:
    """The proto patch reaches the weights of subgraphs too: one with no place for the rank means the
    rank's model must be made and placed as a graph (None), not left pointing at tp rank 0's bytes."""
    external = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[512])
    external.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "rank0.onnx.data"), ("offset", "0"), ("length", "2048")):
        external.external_data.add(key=key, value=value)
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])], "then", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [512])], initializer=[external],
    )  # fmt: skip
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["z"])], "else", [],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [512])],
    )  # fmt: skip
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["c"], ["out"], then_branch=then_branch, else_branch=else_branch)], "main",
        [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [512])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [512])],
    )  # fmt: skip
    layout = data_files.DataLayout({}, [], {})
    assert data_files.reference_placed_weights_in_proto(1, graph, layout, tmp_path, {}) is None
    layout.places[(1, "w")] = data_files.WeightPlace("rank1.onnx.data", 4096, 2048)
    assert data_files.reference_placed_weights_in_proto(1, graph, layout, tmp_path, {}) == ["rank1.onnx.data"]
    then_graph = next(a.g for a in graph.node[0].attribute if a.name == "then_branch")
    placed = {entry.key: entry.value for entry in then_graph.initializer[0].external_data}
    assert (placed["location"], placed["offset"], placed["length"]) == ("rank1.onnx.data", "4096", "2048")


def _packed_by_hand(elements: list[int], bits: int) -> list[int]:
    """Elements packed `8 // bits` a byte, the first in the low bits; the bits left over are zeros."""
    packed = [0] * -(-len(elements) * bits // 8)
    for index, element in enumerate(elements):
        packed[index * bits // 8] |= element << (index * bits % 8)
    return packed


@pytest.mark.parametrize(
    ("bits", "blocks", "ranks"),
    [
        # Odd shares: the first ends mid-byte, the second starts there, the third ends in the row's padding.
        (4, 9, [[(0, 3)], [(3, 6)], [(6, 9)]]),
        (4, 4, [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 4)]]),  # one block a rank: low nibble, high nibble
        (2, 10, [[(0, 5)], [(5, 10)]]),  # 2-bit, four a byte: the second share starts at a byte's second element
        (4, 12, [[(1, 4), (6, 9)]]),  # a rank holding two pieces of the axis, joined
    ],
)
@pytest.mark.parametrize("external", [True, False])
def test_packed_zero_points_are_repacked_from_a_ranks_first_block(
    bits: int, blocks: int, ranks: list[list[tuple[int, int]]], external: bool, tmp_path: Path
) -> None:
    """MatMulNBits zero points [N, ceil(blocks * bits / 8)]: a rank's blocks re-packed from its first byte,
    read from the source's bytes (external or in memory); the source's own padding bits are never taken."""
    rows, mask = 3, (1 << bits) - 1
    rng = np.random.default_rng(5)
    elements = rng.integers(0, mask + 1, (rows, blocks)).tolist()
    source = np.array([_packed_by_hand(row, bits) for row in elements], dtype=np.uint8)
    used = blocks * bits % 8
    if used:  # padding bits set in the source: a re-pack that copied a whole last byte would carry them over
        source[:, -1] |= np.uint8((0xFF << used) & 0xFF)
    tensor = _source(tmp_path, {"zp": source.reshape(-1)})["zp"] if external else ir.tensor(source.reshape(-1))
    for ranges in ranks:
        got = weight_slices.packed_rank_elements(tensor, rows, bits, ranges)
        want = [_packed_by_hand([e for start, stop in ranges for e in row[start:stop]], bits) for row in elements]
        np.testing.assert_array_equal(got, np.array(want, dtype=np.uint8), err_msg=f"{bits}-bit blocks {ranges}")
