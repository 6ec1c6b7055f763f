"""bench/copy_floor.py, the floor bench/partition_big.py --floor measures: it must copy every byte and
hash the copy exactly as a plan's digest would be taken, or its time is not the floor of that work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from synthetic_helpers import script_module

from llmir_onnx.digest import hash_file

ROOT = Path(__file__).resolve().parents[1]


def _copy_floor():
    return script_module(ROOT / "bench" / "copy_floor.py")


def test_the_floor_copies_every_byte_and_hashes_the_copy_in_file_order(tmp_path, monkeypatch):
    copy_floor = _copy_floor()
    # Chunks and windows smaller than the file, not multiples of each other or of the page size, so
    # the copy is handed over in several pieces and a window starts inside a page.
    monkeypatch.setattr(copy_floor, "COPY_CHUNK_BYTES", 3 << 20)
    monkeypatch.setattr(copy_floor, "HASH_WINDOW_BYTES", (1 << 20) + 12345)
    source = tmp_path / "weights.data"
    source.write_bytes(os.urandom((10 << 20) + 4097))
    target = tmp_path / "copy.data"
    digest = copy_floor.copy_and_hash(str(source), str(target), hash_bytes=True)
    assert target.read_bytes() == source.read_bytes()
    assert digest == hash_file(source).hexdigest
    target.unlink()
    assert copy_floor.copy_and_hash(str(source), str(target), hash_bytes=False) == str(source.stat().st_size)
    assert target.read_bytes() == source.read_bytes()


def test_the_floor_refuses_a_source_that_shrinks_under_it(tmp_path, monkeypatch):
    copy_floor = _copy_floor()
    source = tmp_path / "weights.data"
    source.write_bytes(b"x" * 8192)
    real_fstat = os.fstat

    def larger_than_it_is(fd):
        stat = real_fstat(fd)
        return os.stat_result((*stat[:6], stat.st_size + 4096, *stat[7:]))

    monkeypatch.setattr(copy_floor.os, "fstat", larger_than_it_is)
    with pytest.raises(OSError, match="ended at byte 8192 of 12288"):
        copy_floor.copy_and_hash(str(source), str(tmp_path / "copy.data"), hash_bytes=True)
