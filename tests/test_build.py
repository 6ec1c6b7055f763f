"""The install builds both library variants wherever it can, so the CUDA code cannot rot unseen."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llmir_onnx.runtime.launch import custom_ops_library_path


def _nvcc_present() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").is_file()


def test_cpu_library_is_built() -> None:
    assert custom_ops_library_path(cuda=False).is_file()


@pytest.mark.skipif(not _nvcc_present(), reason="no CUDA toolkit on this machine: the CUDA variant is not built")
def test_cuda_library_is_built_and_links_nccl() -> None:
    library = custom_ops_library_path(cuda=True)
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "libnccl.so.2" in dynamic
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    assert "RegisterCustomOps" in symbols
