"""The least work a partition that records file digests must do: copy every byte once, hash it once.

    .venv/bin/python bench/copy_floor.py SOURCE TARGET [--no-hash]

Copies SOURCE to TARGET file to file in the kernel (`os.copy_file_range`, as `cp` does on one
filesystem) a chunk at a time, and, unless `--no-hash`, BLAKE3-hashes TARGET on a second thread
behind the copy, each chunk mapped from the page cache where the copy just put it: what the
partition's weight writer does for every plan byte (llmir_onnx/plan/data_files.py, `_OrderedHash`),
without the graph work, the column gathers or the split into rank files. `bench/partition_big.py
--floor` runs it between `cp` and the partition in each round, so the three are measured in the
same state of the machine: the gap from `cp` to this is the price of the digests, the gap from this
to the partition is everything else.

Imports only the standard library and `blake3` (through `llmir_onnx.digest`, which imports no onnx),
so its start costs about what `cp`'s does. Prints the digest (or the byte count with `--no-hash`).
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading

# Bytes copied per copy_file_range call and handed to the hashing thread as one piece.
COPY_CHUNK_BYTES = 64 << 20
# Bytes mapped at once to hash (the writer's HASH_CHUNK_BYTES).
HASH_WINDOW_BYTES = 8 << 20


def _hash_behind(fd: int, pieces: queue.SimpleQueue[tuple[int, int] | None], result: list[str]) -> None:
    """BLAKE3 of the target's pieces as the copy finishes them, in file order, mapped from the page cache."""
    from llmir_onnx.digest import hash_mapped_range, new_hasher

    hasher = new_hasher()
    while (piece := pieces.get()) is not None:
        hash_mapped_range(hasher, fd, *piece, HASH_WINDOW_BYTES)
    result.append(hasher.hexdigest())


def copy_and_hash(source: str, target: str, hash_bytes: bool) -> str:
    """Copy `source` to `target`; the target's BLAKE3 hex digest (its size when not `hash_bytes`)."""
    source_fd = os.open(source, os.O_RDONLY)
    target_fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(source_fd).st_size
        pieces: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        result: list[str] = []
        hashing = threading.Thread(target=_hash_behind, args=(target_fd, pieces, result)) if hash_bytes else None
        if hashing is not None:
            hashing.start()
        try:
            offset = 0
            while offset < size:
                copied = os.copy_file_range(
                    source_fd, target_fd, min(COPY_CHUNK_BYTES, size - offset), offset_src=offset, offset_dst=offset
                )
                if copied == 0:
                    raise OSError(f"{source} ended at byte {offset} of {size}")
                pieces.put((offset, offset + copied))
                offset += copied
        finally:
            if hashing is not None:  # stopped on an error too, before the files close under it
                pieces.put(None)
                hashing.join()
        return result[0] if hashing is not None else str(size)
    finally:
        os.close(source_fd)
        os.close(target_fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--no-hash", action="store_true", help="only copy (a Python `cp`)")
    args = parser.parse_args(argv)
    print(copy_and_hash(args.source, args.target, hash_bytes=not args.no_hash))
    return 0


if __name__ == "__main__":
    sys.exit(main())
