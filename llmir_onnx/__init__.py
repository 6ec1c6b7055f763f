"""llmir-onnx: ONNX-to-ONNX transformations for distributed LLM inference."""

from __future__ import annotations

from typing import Any

from llmir_onnx.errors import LlmirError

__version__ = "0.1.0"

__all__ = ["LlmirError", "__version__", "custom_ops_library_path", "setup_communication"]

# Loaded on first use so that `import llmir_onnx` does not load MPI or onnxruntime.
_LAZY_RUNTIME_EXPORTS = {"custom_ops_library_path", "setup_communication"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_RUNTIME_EXPORTS:
        from llmir_onnx.runtime import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'llmir_onnx' has no attribute {name!r}")
