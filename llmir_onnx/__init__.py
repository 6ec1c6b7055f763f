"""llmir-onnx: ONNX-to-ONNX transformations for distributed LLM inference."""

from __future__ import annotations

from llmir_onnx.errors import LlmirError

__version__ = "0.1.0"

__all__ = ["LlmirError", "__version__"]
