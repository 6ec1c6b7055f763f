"""Valid random inputs for a decoder LLM, read off the model's own input signature.

Decoder exports agree on the meaning of their inputs even where they disagree on dim names:
token ids [batch, new], an attention mask over past + new tokens, position ids [batch, new], and a
past KV cache [batch, kv_heads, past, head_dim] per layer (static heads and head_dim). Anything
else is refused by name, so the user knows to pass --inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llmir_onnx.errors import InputModelError


@dataclass(frozen=True)
class FeedSizes:
    batch: int = 1
    new_tokens: int = 4
    past_tokens: int = 3
    seed: int = 0


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


def vocab_size(model: ir.Model) -> int:
    """The vocabulary size: the last dim of the logits, else the largest 2-D Gather table."""
    for value in model.graph.outputs:
        if value.name and "logits" in value.name and value.shape is not None and _static(value.shape[-1]):
            return int(value.shape[-1])
    tables = [
        node.inputs[0].const_value.shape[0]
        for node in model.graph
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None
        and len(node.inputs[0].const_value.shape) == 2
    ]
    if tables:
        return int(max(tables))
    raise InputModelError("cannot tell the vocabulary size (no static logits dim, no embedding table); pass --inputs")


def random_feeds(model: ir.Model, sizes: FeedSizes = FeedSizes()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sizes.seed)
    batch, new, past = sizes.batch, sizes.new_tokens, sizes.past_tokens
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        name = value.name or ""
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        shape = list(value.shape) if value.shape is not None else []
        if "input_ids" in name:
            feeds[name] = rng.integers(0, vocab_size(model), size=(batch, new)).astype(dtype)
        elif "attention_mask" in name:
            feeds[name] = np.ones((batch, past + new), dtype=dtype)
        elif "position_ids" in name:
            feeds[name] = np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(dtype)
        elif "past" in name and len(shape) == 4:
            heads, head_dim = _static(shape[1]), _static(shape[3])
            if heads is None or head_dim is None:
                raise InputModelError(
                    f"input {name!r} has shape {shape}: heads and head_dim must be static to make a random "
                    "KV cache; pass --inputs"
                )
            feeds[name] = rng.standard_normal((batch, heads, past, head_dim)).astype(dtype)
        else:
            raise InputModelError(f"cannot make a random value for input {name!r} (shape {shape}); pass --inputs")
    return feeds
