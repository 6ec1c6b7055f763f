"""A file's size and digest: what a plan manifest records of each file and what every rank checks.

New plans record BLAKE3 (`WRITTEN_ALGORITHM`); plans written before issue 16 recorded sha256, and are
still checked with it (the manifest names the algorithm: see plan/manifest.py). Both are cryptographic
hashes of the whole file; BLAKE3 costs half of sha256's CPU per byte even with the SHA extensions
(3.1 against 1.4 GiB/s on one core of the 2-vCPU AMD EPYC VM, docs/BENCHMARKS.md "Partition of
multi-GB models"), and a partition hashes every byte it writes, as much work as the copy itself.

Apart from ir_io on purpose: rank processes check their files before anything else, and importing onnx
and onnx_ir (through ir_io) costs each rank process about two seconds of CPU that it otherwise never
needs (see docs/RUNTIME.md, "What a rank process imports").
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from typing import Protocol

import blake3

# The digest new plans record; DIGEST_ALGORITHMS lists every one a manifest may name.
WRITTEN_ALGORITHM = "blake3"
DIGEST_ALGORITHMS = ("blake3", "sha256")
HEX_DIGITS = 64  # both are 256-bit digests


class Hasher(Protocol):
    """What hashlib's and blake3's hashers share (both release the GIL on large updates)."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = WRITTEN_ALGORITHM) -> Hasher:
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}; known: {', '.join(DIGEST_ALGORITHMS)}")


@dataclass(frozen=True)
class FileDigest:
    """A file's size in bytes and the digest of its bytes (what a plan manifest records of each of its files)."""

    size: int
    hexdigest: str
    algorithm: str = WRITTEN_ALGORITHM


def bytes_digest(data: bytes, algorithm: str = WRITTEN_ALGORITHM) -> FileDigest:
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return FileDigest(len(data), hasher.hexdigest(), algorithm)


def hash_file(path: str | os.PathLike, algorithm: str = WRITTEN_ALGORITHM, chunk_bytes: int = 1 << 22) -> FileDigest:
    """The size and digest of a file, read once front to back through one reused buffer."""
    hasher = new_hasher(algorithm)
    size = 0
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            hasher.update(view[:count])
            size += count
    return FileDigest(size, hasher.hexdigest(), algorithm)


# Mapped pages are faulted in by the kernel at once, not one page fault at a time, where it can.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def hash_mapped_range(hasher: Hasher, fd: int, start: int, stop: int, window_bytes: int) -> None:
    """Feed bytes [start, stop) of the open file `fd` to `hasher`, mapped from the page cache a window at a
    time, not read: a read copies every byte into this process first, which cost more CPU than the hash
    itself (0.5 s of system time per GiB on the 2-core VM, against 0.1 s to map the pages). The range must
    lie inside the file: mapping past its end faults (SIGBUS)."""
    while start < stop:
        length = min(window_bytes, stop - start)
        skip = start % mmap.ALLOCATIONGRANULARITY
        window = mmap.mmap(fd, skip + length, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ,
                           offset=start - skip)  # fmt: skip
        try:
            with memoryview(window) as view, view[skip:] as part:
                hasher.update(part)
        finally:
            window.close()
        start += length


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file (the manifest's `source.sha256`: which model a plan was made from)."""
    return hash_file(path, "sha256").hexdigest
