"""Placements: short names, hashing, and the shard/unshard round trip (fused blocks included)."""

from __future__ import annotations

import numpy as np

from llmir_onnx.placement import Partial, Replicate, Shard, ShardSpec, shard_array, unshard_arrays


def test_short_names_and_hashing() -> None:
    assert str(Shard(1)) == "S(1)"
    assert str(Replicate()) == "R"
    assert str(Partial()) == "P"
    assert str(Shard(2, (64, 32, 32))) == "S(2;64|32|32)"
    assert len({Shard(1), Shard(1), Replicate(), Replicate(), Partial("sum")}) == 3
    assert str(ShardSpec.tensor_parallel(Shard(0))) == "S(0)"


def test_fused_blocks_take_the_same_heads_from_each_block() -> None:
    columns = np.arange(12)  # q = 0..5, k = 6..8, v = 9..11
    shard = Shard(0, (6, 3, 3))
    pieces = [shard_array(columns, shard, 3, r) for r in range(3)]
    assert pieces[0].tolist() == [0, 1, 6, 9]
    assert pieces[2].tolist() == [4, 5, 8, 11]
    assert unshard_arrays(pieces, shard).tolist() == columns.tolist()


def test_round_trip_plain_shard_and_partial() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 3))
    pieces = [shard_array(x, Shard(1), 4, r) for r in range(4)]
    assert all(p.shape == (2, 2, 3) for p in pieces)
    np.testing.assert_array_equal(unshard_arrays(pieces, Shard(1)), x)
    parts = [shard_array(x, Partial(), 2, r) for r in range(2)]
    np.testing.assert_array_equal(unshard_arrays(parts, Partial()), x)


GROUPED = Shard(0, (), (2,), 2, (4, 1, 1), (2, 1, 1), inner_flat=True)  # 2 groups of [4 q | k | v] columns


def test_inner_blocks_give_each_rank_its_query_heads_and_its_groups_kv() -> None:
    columns = np.arange(12)  # group 0: q 0..3, k 4, v 5; group 1: q 6..9, k 10, v 11
    assert [GROUPED.local_ranges(12, 4, r) for r in range(4)] == [
        [(0, 2), (4, 5), (5, 6)],
        [(2, 4), (4, 5), (5, 6)],
        [(6, 8), (10, 11), (11, 12)],
        [(8, 10), (10, 11), (11, 12)],
    ]
    pieces = [shard_array(columns, GROUPED, 4, r) for r in range(4)]
    assert pieces[1].tolist() == [2, 3, 4, 5]
    assert pieces[2].tolist() == [6, 7, 10, 11]
    assert GROUPED.local_size(12, 4) == 4
    assert unshard_arrays(pieces, GROUPED).tolist() == columns.tolist()


def test_inner_blocks_round_trip_on_a_middle_axis_and_their_names() -> None:
    x = np.random.default_rng(1).standard_normal((3, 12, 2))
    shard = GROUPED.with_dim(1)
    assert shard.inner_flat and shard.inner_blocks == (4, 1, 1)
    np.testing.assert_array_equal(unshard_arrays([shard_array(x, shard, 4, r) for r in range(4)], shard), x)
    assert str(shard) == "S(1/2x2:4|1|1/2,1,1)"
    heads = Shard(2, (), (2,), 2, (4, 1, 1), (2, 1, 1))  # the same after the Reshape into [groups, heads, dim]
    assert str(heads) == "S(2/2x2;4|1|1/2,1,1)"
    assert heads.inner_local_size() == 4 and heads.inner_local_offset(1) == 2
    assert heads.inner_block(0) == Shard(2, (), (2,), 2) and heads.inner_block(2) == Shard(2, (), (2,))
    assert GROUPED.divides(12, 4) and not GROUPED.divides(12, 8) and not GROUPED.divides(14, 4)


def test_uneven_shares_print_and_take_neighbouring_units() -> None:
    heads = Shard(1, shares=(2, 1, 1))
    assert str(heads) == "S(1)[2,1,1]"
    assert [heads.local_ranges(4, 3, r) for r in range(3)] == [[(0, 2)], [(2, 3)], [(3, 4)]]
    assert [heads.local_size(1024, 3, r) for r in range(3)] == [512, 256, 256]
    # GPT-2's fused [q | k | v]: each rank takes its units of every block, the same heads of each.
    fused = Shard(1, (64, 64, 64), shares=(2, 1, 1))
    assert str(fused) == "S(1;64|64|64)[2,1,1]"
    assert fused.local_ranges(192, 3, 0) == [(0, 32), (64, 96), (128, 160)]
    assert fused.local_ranges(192, 3, 2) == [(48, 64), (112, 128), (176, 192)]
    full = np.arange(2 * 12).reshape(2, 12)
    pieces = [shard_array(full, Shard(1, shares=(2, 1, 1)), 3, r) for r in range(3)]
    assert [p.shape[1] for p in pieces] == [6, 3, 3]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), full)


def test_uneven_shares_keep_whole_kv_heads_or_refuse() -> None:
    # 4 kv heads over 8 units (2 each): shares 2,2,2,1,1 hold whole kv heads or share one.
    kv = Shard(1, (), (4,), shares=(2, 2, 2, 1, 1))
    assert kv.uneven_misfit() is None
    assert [kv.local_ranges(4, 5, r) for r in range(5)] == [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 4)], [(3, 4)]]
    # Shares 3,3,2 would give rank 0 one kv head and a half.
    misfit = Shard(1, (), (4,), shares=(3, 3, 2)).uneven_misfit()
    assert misfit is not None and "cut the 4 kv heads" in misfit
    assert Shard(1, shares=(3, 3, 2)).uneven_misfit() is None
