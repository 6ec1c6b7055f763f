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
