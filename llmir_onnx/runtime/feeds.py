"""Valid random inputs for a decoder LLM, read off the model's own input signature.

Decoder exports agree on the meaning of their inputs even where they disagree on dim names:
token ids [batch, new], an attention mask over past + new tokens, position ids [batch, new], and a
past KV cache [batch, kv_heads, past, head_dim] per layer (static heads and head_dim). Anything
else is refused by name, so the user knows to pass --inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from llmir_onnx.errors import InputModelError
from llmir_onnx.ir_io import load_model
from llmir_onnx.model_facts import KV_CACHE, MASK, POSITIONS, TOKEN_IDS, input_kind, kv_cache_pairs, kv_length_axis
from llmir_onnx.runtime.session import original_session


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
        if value.name and "logits" in value.name and value.shape is not None and (last := _static(value.shape[-1])):
            return last
    tables = [
        node.inputs[0].const_value.shape.numpy()[0]  # an initializer's shape is static
        for node in model.graph
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None
        and len(node.inputs[0].const_value.shape) == 2
    ]
    if tables:
        return max(tables)
    raise InputModelError("cannot tell the vocabulary size (no static logits dim, no embedding table); pass --inputs")


def random_feeds(model: ir.Model, sizes: FeedSizes = FeedSizes()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sizes.seed)
    batch, new, past = sizes.batch, sizes.new_tokens, sizes.past_tokens
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        name = value.name or ""
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        shape = list(value.shape) if value.shape is not None else []
        kind = input_kind(value)
        if kind == TOKEN_IDS:
            feeds[name] = rng.integers(0, vocab_size(model), size=(batch, new)).astype(dtype)
        elif kind == MASK and len(shape) == 2:
            feeds[name] = np.ones((batch, past + new), dtype=dtype)
        elif kind == POSITIONS and len(shape) == 2:
            feeds[name] = np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(dtype)
        elif kind == KV_CACHE:
            tokens_axis = kv_length_axis(value)
            kept = [_static(dim) for axis, dim in enumerate(shape) if axis not in (0, tokens_axis)]
            static = [size for size in kept if size is not None]
            if len(static) < len(kept):
                raise InputModelError(
                    f"input {name!r} has shape {shape}: heads and head_dim must be static to make a random "
                    "KV cache; pass --inputs"
                )
            cache_shape = [batch, *static]
            cache_shape.insert(tokens_axis, past)
            feeds[name] = rng.standard_normal(cache_shape).astype(dtype)
        else:
            raise InputModelError(f"cannot make a random value for input {name!r} (shape {shape}); pass --inputs")
    return feeds


PAST_FROM_MODEL = "model"
PAST_FROM_NOISE = "noise"


def model_past_feeds(model_path: Path, sizes: FeedSizes = FeedSizes()) -> dict[str, np.ndarray]:
    """Random new tokens after a past KV cache that the original model made from random tokens.

    Why not noise: a standard-normal past is a cache no model produces (real keys have a few
    large channels and a norm the model's own attention expects), and pushed through a 30-layer
    model it turns float32 rounding differences into errors several times larger than the ones
    real decoding sees. Running the original on `past_tokens` random tokens first gives the
    decode step a cache the model could really hold; the new tokens, mask and positions are
    those of `random_feeds`.
    """
    model = load_model(model_path)
    feeds = random_feeds(model, sizes)
    if sizes.past_tokens == 0:
        return feeds
    # Its own session, dropped on return: verify makes the reference session again after the ranks ran,
    # because keeping one through the rank runs would add the model's size to verify's peak memory.
    session = original_session(model_path)
    output_names = [output.name for output in session.get_outputs()]
    pairs = kv_cache_pairs([value.name or "" for value in model.graph.inputs], output_names)
    if not pairs:
        return feeds
    prompt_sizes = FeedSizes(sizes.batch, new_tokens=sizes.past_tokens, past_tokens=0, seed=sizes.seed + 1)
    try:
        outputs = session.run(output_names, random_feeds(model, prompt_sizes))
    except Exception as error:  # onnxruntime's errors (Fail, InvalidArgument, ...) share no narrower base
        # The model as exported does not run, whatever the plan does: say so, not "internal error".
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputModelError(
            f"the original model {model_path} fails in onnxruntime on its own ({reason}) while making the past KV "
            f"cache of {sizes.past_tokens} random tokens that verify starts from; the export does not run as it is: "
            "re-export it (and check it in onnxruntime), or give inputs the model takes with --inputs"
        ) from error
    presents = dict(zip(output_names, outputs, strict=True))
    for present, past in pairs.items():
        feeds[past] = presents[present]
    return feeds


def export_check_feeds(model_dir: Path) -> dict[str, np.ndarray]:
    """The exporter's own check inputs (`reference.npz`'s `input.*` arrays, as models/export.py writes
    them) where the model folder has them, else valid random feeds."""
    stored = model_dir / "reference.npz"
    if stored.is_file():
        with np.load(stored) as data:
            return {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
    return random_feeds(load_model(model_dir / "model.onnx"))
