"""Exhaustive-ish check of src/half.h (the float16/bfloat16 conversions of the MPI reductions) against
numpy and ml_dtypes: every 16-bit pattern to float32, and ~8.7 M float32 patterns (a dense stride plus the
rounding boundaries) to float16/bfloat16 with round to nearest even.

Run: .venv/bin/python custom_ops/tests/check_half.py   (needs g++; prints mismatch counts, exit 1 if any)
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

SOURCE = r"""
#include "half.h"
#define CONVERT(name, in_type, out_type, function) \
  extern "C" void name(const in_type* in, out_type* out, long n) { \
    for (long i = 0; i < n; ++i) out[i] = llmir::function(in[i]); \
  }
CONVERT(f2h, float, unsigned short, float_to_half)
CONVERT(h2f, unsigned short, float, half_to_float)
CONVERT(f2b, float, unsigned short, float_to_bfloat16)
CONVERT(b2f, unsigned short, float, bfloat16_to_float)
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "h.cc").write_text(SOURCE)
        include = Path(__file__).resolve().parents[1] / "src"
        library_path = Path(tmp) / "libh.so"
        subprocess.run(
            ["g++", "-O2", "-shared", "-fPIC", f"-I{include}", f"{tmp}/h.cc", "-o", str(library_path)], check=True
        )
        library = ctypes.CDLL(str(library_path))

    def call(name: str, values: np.ndarray, out_type: type) -> np.ndarray:
        out = np.empty(values.shape, out_type)
        getattr(library, name)(
            values.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_long(values.size)
        )
        return out

    failures = 0
    patterns = np.arange(65536, dtype=np.uint16)
    for name, numpy_type in (("h2f", np.float16), ("b2f", ml_dtypes.bfloat16)):
        expected = patterns.view(numpy_type).astype(np.float32)
        got = call(name, patterns, np.float32)
        bad = ~((expected.view(np.uint32) == got.view(np.uint32)) | (np.isnan(expected) & np.isnan(got)))
        print(f"{name}: 65536 patterns, {int(bad.sum())} mismatches")
        failures += int(bad.sum())
    bits = np.arange(0, 1 << 32, 997, dtype=np.uint64).astype(np.uint32)
    for boundary in (0x33000000, 0x38800000, 0x477FE000, 0x477FF000, 0x7F7FFFFF):
        bits = np.concatenate([bits, np.arange(boundary - 5000, boundary + 5000, dtype=np.uint64).astype(np.uint32)])
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    floats = bits.view(np.float32)
    nan = np.isnan(floats)
    for name, numpy_type in (("f2h", np.float16), ("f2b", ml_dtypes.bfloat16)):
        with np.errstate(all="ignore"):
            expected = floats.astype(numpy_type).view(np.uint16)
        got = call(name, floats, np.uint16)
        bad = (expected != got) & ~nan
        nan_kept = bool(np.all(np.isnan(got[nan].view(numpy_type).astype(np.float32))))
        print(f"{name}: {floats.size} floats, {int(bad.sum())} mismatches, nan stays nan: {nan_kept}")
        failures += int(bad.sum()) + (not nan_kept)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
