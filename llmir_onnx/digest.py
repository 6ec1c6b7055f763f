"""A file's size and sha256: what a plan manifest records of each file and what every rank checks.

Apart from ir_io on purpose: rank processes check their files before anything else, and importing onnx
and onnx_ir (through ir_io) costs each rank process about two seconds of CPU that it otherwise never
needs (see docs/RUNTIME.md, "What a rank process imports").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FileDigest:
    """A file's size in bytes and the sha256 of its bytes (what a plan manifest records of each of its files)."""

    size: int
    sha256: str


def bytes_digest(data: bytes) -> FileDigest:
    return FileDigest(len(data), hashlib.sha256(data).hexdigest())


def hash_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> FileDigest:
    """The size and sha256 of a file, read once front to back through one reused buffer."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            digest.update(view[:count])
            size += count
    return FileDigest(size, digest.hexdigest())


def sha256_file(path: str | os.PathLike) -> str:
    return hash_file(path).sha256
