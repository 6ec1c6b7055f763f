"""One error hierarchy. A user-facing error names the node, the op, the value and the fix.

The CLI prints `str(error)` on one line and exits non-zero; tracebacks only with --debug.
"""

from __future__ import annotations


class LlmirError(Exception):
    """Base of every error llmir-onnx reports to a user."""

    exit_code: int = 2


class InputModelError(LlmirError):
    """The model given to us is unreadable, unsafe (e.g. external data outside its folder) or unsupported."""


class ShardingError(LlmirError):
    """A layout cannot be applied: a tp that does not divide a head count, an op with no sharding rule."""


class PlanError(LlmirError):
    """A plan or manifest is inconsistent, or a layout does not fit the device memory."""


class CommunicationError(LlmirError):
    """Setting up or using the ai.llmir collectives failed (no launcher, wrong world size, timeout)."""


class VerificationError(LlmirError):
    """Partitioned ranks did not reproduce the original model's outputs within tolerance."""

    exit_code = 1


class OutputPathError(LlmirError):
    """A path given for output cannot be written: a folder where a file goes, a file where a folder goes."""


class GenerationError(LlmirError):
    """Generation cannot run as asked: bad sampling options, prompts, tokenizer, or a rank that failed."""
