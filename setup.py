"""Build hook: `pip install` (editable or not) compiles the ai.llmir custom-op library.

The CMake project lives in custom_ops/; custom_ops/build.py finds its inputs (onnxruntime C API
headers, MPI from the mpich wheel, CUDA and NCCL when present) and runs CMake. Install with
`--no-build-isolation` so the build sees the environment's mpich and nvidia-nccl wheels.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_builder():
    spec = importlib.util.spec_from_file_location("llmir_custom_ops_build", ROOT / "custom_ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _replace_file(source: Path, dest: Path) -> None:
    """Copy then rename: a process that has the old library mapped keeps a valid file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(dest.name + ".tmp")
    shutil.copy2(source, staging)
    os.replace(staging, dest)


class CMakeLibrary(Extension):
    """A shared library built by CMake, not by setuptools' compiler driver."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class BuildCustomOps(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # A plain `libllmir_ops.so`: it is loaded by onnxruntime, not imported by Python.
        return str(Path(*fullname.split("."))) + ".so"

    def run(self) -> None:
        built = _load_builder().build(build_dir=ROOT / "build" / "custom_ops")
        for ext in self.extensions:
            library = ext.name.rsplit(".", 1)[-1] + ".so"
            dest = Path(self.get_ext_fullpath(ext.name))
            if library not in built:
                continue  # the CUDA variant when no CUDA toolkit is present (build.py says so)
            _replace_file(built[library], dest)
            if not self.inplace:
                _replace_file(built[library], ROOT / "llmir_onnx" / "_lib" / library)


setup(
    # The CLI lives in cli/ (the product layout) but installs as llmir_onnx.cli, never as a top-level `cli`.
    packages=[*find_packages(include=["llmir_onnx", "llmir_onnx.*"]), "llmir_onnx.cli"],
    package_dir={"llmir_onnx.cli": "cli"},
    ext_modules=[CMakeLibrary("llmir_onnx._lib.libllmir_ops"), CMakeLibrary("llmir_onnx._lib.libllmir_ops_cuda")],
    cmdclass={"build_ext": BuildCustomOps},
)
