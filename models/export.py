"""Export the small random-weight decoder LLMs that the partitioner tests run on.

Run with the export toolchain venv (see models/requirements-export.txt):

    .venv-export/bin/python models/export.py [--only NAME] [--out models]

Each model is built from a transformers config in code (no hub download), with
`torch.manual_seed(0)` random float32 weights, and exported by several exporters
into `<out>/<family>-<exporter>/`:

    model.onnx        graph (IR version <= 10, so onnxruntime-gpu 1.31 loads it)
    model.onnx.data   weights as external data (the layout big models use)
    config.json       the transformers config (what `from_config` takes)

Every export is then run in onnxruntime (CPU) with batch 1, a past KV cache of
3 tokens and 2 new tokens, and compared with the torch model; a mismatch fails
the export. A summary of all models (IO, op histograms, attributes of contrib
ops, tool versions, timings, errors) is written to `<out>/models.json`, which
`models/README.md` is written from.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from readme import write_readme
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    CohereConfig,
    DynamicCache,
    FalconConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    StableLmConfig,
    Starcoder2Config,
    masking_utils,
)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_utils import no_init_weights

MAX_IR_VERSION = 10
REFERENCE_FILE = "reference.npz"
LEGACY_OPSET = 17
PAST_LEN = 3
NEW_LEN = 2
# (batch, past length, new tokens) each export is checked at; batch 2 with one new token only,
# since onnxruntime's CPU GroupQueryAttention refuses batch > 1 with several new tokens after a past.
CHECK_SHAPES = ((1, PAST_LEN, NEW_LEN), (1, 6, 1), (2, 4, 1))
ATOL = 1e-4
RTOL = 1e-4
# (atol, rtol) of a low-precision export against torch holding the same weights (int4: the
# dequantized weights; fp16: computed in float16 by onnxruntime).
LOW_PRECISION_TOLERANCE = {"int4": (1e-3, 1e-3), "fp16": (5e-2, 5e-2)}
# mistral-window's sliding window: longer than every check's past + new tokens, since
# transformers' sliding-window cache makes the export fail past it.
MISTRAL_WINDOW = 16
TOOLCHAIN = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnxruntime-genai",
    "onnxscript",
    "onnx",
    "onnx-ir",
    "onnxruntime",
)


def make_llama_gqa_config() -> PretrainedConfig:
    # 8 query heads over 4 KV heads: tp 1, 2 and 4 all split whole KV heads. head_dim 16, not 8:
    # onnxruntime's CPU GroupQueryAttention (genai builder exports) requires a multiple of 16.
    return LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
        torch_dtype="float32",
    )


def make_llama_kv2_config() -> PretrainedConfig:
    # 8 query heads over 2 KV heads (n_rep 4): tp 4 must replicate each KV head on two ranks.
    config = make_llama_gqa_config()
    config.num_key_value_heads = 2
    return config


def make_gpt2_config() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=512,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["GPT2LMHeadModel"],
        torch_dtype="float32",
    )


def make_phi3_config() -> PretrainedConfig:
    # Phi-3 fuses q|k|v into qkv_proj and gate|up into gate_up_proj, split again by Slice.
    return Phi3Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["Phi3ForCausalLM"],
        torch_dtype="float32",
    )


def make_qwen3_config() -> PretrainedConfig:
    # Qwen3 normalises every head of q and k (q_norm / k_norm over head_dim) before rotary.
    return Qwen3Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["Qwen3ForCausalLM"],
        torch_dtype="float32",
    )


# What every family below shares (the families above spell it out).
TINY: dict[str, Any] = {
    "vocab_size": 512,
    "num_hidden_layers": 2,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def make_mistral_window_config() -> PretrainedConfig:
    # Sliding-window attention with transformers' sliding-window cache: the export runs only up to
    # 16 tokens (past + new; onnxruntime fails on the mask Add beyond), presents keep 15 tokens.
    return MistralConfig(
        **TINY,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        sliding_window=MISTRAL_WINDOW,
        rms_norm_eps=1e-5,
        architectures=["MistralForCausalLM"],
    )


def make_qwen3_kv1_config() -> PretrainedConfig:
    # Per-head q/k RMSNorm with ONE KV head under 4 query heads: tp 2 and 4 replicate the KV head.
    return Qwen3Config(
        **TINY,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        rms_norm_eps=1e-6,
        architectures=["Qwen3ForCausalLM"],
    )


def make_qwen2_kv2_config() -> PretrainedConfig:
    # Qwen2 has a bias on q, k and v (not on o); 8 query heads over 2 KV heads: tp 4 replicates.
    return Qwen2Config(
        **TINY,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        architectures=["Qwen2ForCausalLM"],
    )


def make_falcon_config(kv_heads: int | None) -> PretrainedConfig:
    """Falcon's fused query_key_value: grouped per KV head (new decoder architecture) or multi-query."""
    grouped = kv_heads is not None
    config = FalconConfig(
        **TINY,
        hidden_size=128,
        num_attention_heads=8,
        num_kv_heads=kv_heads,
        new_decoder_architecture=grouped,
        multi_query=not grouped,
        parallel_attn=True,
        alibi=False,
        bias=False,
        ffn_hidden_size=256,
        architectures=["FalconForCausalLM"],
    )
    # The heads of the KV cache, which the tests read as num_key_value_heads: multi-query caches its
    # one KV head; the grouped architecture caches k and v broadcast to every query head (8), though
    # its weights hold 2 (num_kv_heads).
    config.num_key_value_heads = config.num_attention_heads if grouped else 1
    return config


def make_olmo2_config() -> PretrainedConfig:
    # OLMo 2 normalises q and k over ALL heads (q_norm over 8 x 16, k_norm over 2 x 16), not per head.
    return Olmo2Config(
        **TINY,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        architectures=["Olmo2ForCausalLM"],
    )


def make_olmo_clip_config() -> PretrainedConfig:
    # OLMo clamps q, k and v to [-clip_qkv, clip_qkv]; projections have std ~2.3 here, so 2.0 clips
    # about a third of the values.
    return OlmoConfig(
        **TINY,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=4,
        clip_qkv=2.0,
        pad_token_id=0,
        architectures=["OlmoForCausalLM"],
    )


def make_starcoder2_config() -> PretrainedConfig:
    # Biases on every projection, LayerNorm, GQA with 2 KV heads, a plain (gelu) 2-matrix MLP.
    return Starcoder2Config(
        **TINY,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        sliding_window=None,
        use_bias=True,
        architectures=["Starcoder2ForCausalLM"],
    )


def make_stablelm_config() -> PretrainedConfig:
    # StableLM 2: per-head LayerNorm on q and k (a separate weight per head), partial rotary
    # (a quarter of head_dim), qkv bias, 2 KV heads.
    return StableLmConfig(
        **TINY,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        partial_rotary_factor=0.25,
        qk_layernorm=True,
        use_qkv_bias=True,
        architectures=["StableLmForCausalLM"],
    )


def make_bloom_config() -> PretrainedConfig:
    # BLOOM: ALiBi (a per-head slope times the key position, added to the scores; no rotary), the fused
    # query_key_value grouped per head ([heads, 3, head_dim]: each head's q, k, v side by side), scores over
    # batch * heads merged into one axis (baddbmm), LayerNorm after the embedding, tied lm_head.
    return BloomConfig(
        vocab_size=512,
        hidden_size=64,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["BloomForCausalLM"],
        torch_dtype="float32",
    )


def make_cohere_config() -> PretrainedConfig:
    # Cohere: rotary on interleaved pairs (x[..., ::2], x[..., 1::2]) with cos/sin made by repeat_interleave,
    # which torch's legacy exporter (under optimum) writes with ReduceMax and NonZero of constants that
    # onnxruntime's symbolic shape inference cannot follow; LayerNorm without bias, attention and MLP in
    # parallel, logits scaled by logit_scale, tied lm_head; 4 heads over 2 KV heads.
    return CohereConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        logit_scale=0.0625,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["CohereForCausalLM"],
        torch_dtype="float32",
    )


def make_llama_wide_config() -> PretrainedConfig:
    # For the quantized and half-precision genai exports: the row-parallel projections' inner
    # dims (o_proj: 8 heads x 64 = 512, down_proj: 512) stay whole int4 blocks of 128 at tp 4.
    # vocab 384, not 512: the genai builder (0.11.4) takes a Linear of lm_head's shape for lm_head,
    # so with vocab == intermediate it wires lm_head to the first layer's up_proj input (the same
    # happens to Phi-3, whose gate_up_proj is 512 x 128 like its lm_head).
    config = make_llama_gqa_config()
    config.vocab_size = 384
    config.hidden_size = 256
    config.head_dim = 64
    config.intermediate_size = 512
    return config


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama-gqa": make_llama_gqa_config,
    "llama-kv2": make_llama_kv2_config,
    "gpt2": make_gpt2_config,
    "phi3": make_phi3_config,
    "qwen3": make_qwen3_config,
    "mistral-window": make_mistral_window_config,
    "qwen3-kv1": make_qwen3_kv1_config,
    "qwen2-kv2": make_qwen2_kv2_config,
    "falcon-gqa": lambda: make_falcon_config(2),
    "falcon-mqa": lambda: make_falcon_config(None),
    "olmo2-kv2": make_olmo2_config,
    "olmo-clip": make_olmo_clip_config,
    "starcoder2-kv2": make_starcoder2_config,
    "stablelm-qkln": make_stablelm_config,
    "llama-wide": make_llama_wide_config,
    "bloom-alibi": make_bloom_config,
    "cohere-interleaved": make_cohere_config,
}


def build_model(config: PretrainedConfig, attn_implementation: str = "eager") -> PreTrainedModel:
    torch.manual_seed(0)
    # transformers 4.57's StableLM init zeroes LayerNorm biases that its per-head q/k norms do not
    # have (AttributeError); every parameter is redrawn below, so skip its init.
    skip_init = no_init_weights() if config.model_type == "stablelm" else contextlib.nullcontext()
    with skip_init:
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation, torch_dtype=torch.float32
        )
    # Random init gives tiny weights with near-uniform logits, zero biases and all-ones norm
    # weights; widen them so a wrong partition shows up as a large error (a bias added on every
    # rank, a norm weight sliced wrongly), and so no two tensors are equal and get merged by an
    # exporter's constant deduplication.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
            elif name.endswith("weight"):  # 1-D weights are norm scales
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def kv_shape(config: PretrainedConfig) -> tuple[int, int]:
    """Number of KV heads and head size of the cache tensors."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim


def io_names(config: PretrainedConfig) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for layer in range(num_layers(config)):
        inputs += [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        outputs += [f"present.{layer}.key", f"present.{layer}.value"]
    return inputs, outputs


class FlatKvDecoder(torch.nn.Module):
    """The HF model with the KV cache as flat tensors, the IO layout optimum and the genai builder use."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.layers = num_layers(model.config)
        # A new Module is in training mode; exporters restore that mode on exit, recursively,
        # which would switch GPT-2's dropout on in the wrapped model.
        self.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        cache = seeded_cache(past, self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        flat = [out.logits]
        for key, value in out.past_key_values.to_legacy_cache():
            flat += [key, value]
        return tuple(flat)


def seeded_cache(past: tuple[torch.Tensor, ...], config: PretrainedConfig) -> DynamicCache:
    """The cache transformers builds for the config (`DynamicCache(config=...)`), holding `past`.

    A config with a sliding window gets transformers' sliding-window layers, which keep only the
    last window - 1 tokens: its export runs only up to the window (what a user's export of such a
    model does).
    """
    cache = DynamicCache(config=config)
    if not cache.layers:  # a config transformers does not read layers from
        cache.layers = [DynamicLayer() for _ in range(num_layers(config))]
    # Set the layers directly: DynamicLayer.update concatenates onto an empty 1-D tensor
    # first, which TorchScript tracing records as a Concat that fails in onnxruntime.
    for layer, cache_layer in enumerate(cache.layers):
        cache_layer.lazy_initialization(past[2 * layer])
        cache_layer.keys, cache_layer.values = past[2 * layer], past[2 * layer + 1]
        if isinstance(cache_layer, DynamicSlidingWindowLayer):
            cache_layer.cumulative_length = past[2 * layer].shape[-2]
    return cache


def broadcast_eager_mask(
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = masking_utils.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' causal+padding eager mask written with broadcasting only.

    Its own versions go through torch.vmap, which TorchScript tracing records with the
    example's query length baked into a Reshape.
    """
    kv_positions = torch.arange(kv_length, device=cache_position.device) + kv_offset
    if mask_function is masking_utils.causal_mask_function:
        allowed = kv_positions[None, None, None, :] <= cache_position[None, None, :, None]
    else:
        # transformers' mask functions (sliding window: causal and kv > q - window) are elementwise
        # comparisons of (batch, head, q, kv) indices, so broadcast indices evaluate them whole.
        allowed = mask_function(None, None, cache_position[None, None, :, None], kv_positions[None, None, None, :])
    if attention_mask is not None:
        padding = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        allowed = allowed & padding[:, None, None, :]
    zero = torch.tensor(0.0, dtype=dtype, device=cache_position.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@contextlib.contextmanager
def traceable_masks() -> Iterator[None]:
    registry = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    registry.register("eager", broadcast_eager_mask)
    try:
        yield
    finally:
        registry.register("eager", masking_utils.eager_mask)


def example_inputs(
    config: PretrainedConfig, batch: int = 1, past_len: int = PAST_LEN, new_len: int = NEW_LEN, seed: int = 1
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kv_heads, head_dim = kv_shape(config)
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, config.vocab_size, size=(batch, new_len), dtype=np.int64),
        "attention_mask": np.ones((batch, past_len + new_len), dtype=np.int64),
        "position_ids": np.tile(np.arange(past_len, past_len + new_len, dtype=np.int64), (batch, 1)),
    }
    for layer in range(num_layers(config)):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = rng.standard_normal(
                (batch, kv_heads, past_len, head_dim)
            ).astype(np.float32)
    return feeds


def torch_reference(model: PreTrainedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    input_names, output_names = io_names(model.config)
    wrapper = FlatKvDecoder(model)
    args = [torch.from_numpy(feeds[name]) for name in input_names]
    with torch.no_grad():
        outs = wrapper(*args)
    return {name: out.numpy() for name, out in zip(output_names, outs, strict=True)}


def dynamic_axes(config: PretrainedConfig) -> dict[str, dict[int, str]]:
    inputs, outputs = io_names(config)
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for name in inputs[3:]:
        axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in outputs[1:]:
        axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    return axes


def export_torch_legacy(model: PreTrainedModel, hf_dir: Path, work: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The torch-legacy export; with dtype float16 (or bfloat16), of the model cast to it: weights, IO, compute."""
    import copy

    inputs, outputs = io_names(model.config)
    feeds = example_inputs(model.config)
    args = tuple(torch.from_numpy(feeds[name]) for name in inputs)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
        args = tuple(arg.to(dtype) if arg.is_floating_point() else arg for arg in args)
    path = work / "model.onnx"
    with traceable_masks():
        torch.onnx.export(
            FlatKvDecoder(model),
            args,
            str(path),
            dynamo=False,
            opset_version=LEGACY_OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes(model.config),
            do_constant_folding=True,
        )
    return path


def export_torch_dynamo(model: PreTrainedModel, hf_dir: Path, work: Path, opset: int | None = None) -> Path:
    batch = torch.export.Dim("batch_size", min=1, max=64)
    seq = torch.export.Dim("sequence_length", min=1, max=64)
    past = torch.export.Dim("past_sequence_length", min=1, max=64)
    # The mask length is past + sequence; torch.export derives that relation itself.
    dynamic_shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.AUTO},
        {0: batch, 1: seq},
        # *past arrives as one tuple argument.
        tuple({0: batch, 2: past} for _ in range(2 * num_layers(model.config))),
    )
    return dynamo_export(model, work, dynamic_shapes, opset)


def export_torch_dynamo_autodims(model: PreTrainedModel, hf_dir: Path, work: Path) -> Path:
    """What a user gets who marks the dims dynamic without naming them (Dim.AUTO).

    The graph's dims are torch.export's own symbols: `s10`/`s43` for the batch of input_ids and
    of attention_mask, one past-length symbol per layer (`s69`, `s15`), `s53` for the mask's
    length, and presents of length `s69 + s70`.
    """
    auto = torch.export.Dim.AUTO
    dynamic_shapes = (
        {0: auto, 1: auto},
        {0: auto, 1: auto},
        {0: auto, 1: auto},
        tuple({0: auto, 2: auto} for _ in range(2 * num_layers(model.config))),
    )
    return dynamo_export(model, work, dynamic_shapes)


def dynamo_export(
    model: PreTrainedModel, work: Path, dynamic_shapes: tuple[Any, ...], opset: int | None = None
) -> Path:
    inputs, outputs = io_names(model.config)
    # Sizes of 0 or 1 would be specialised by torch.export: trace with 2+ everywhere.
    feeds = example_inputs(model.config, batch=2, past_len=4, new_len=3)
    args = tuple(torch.from_numpy(feeds[name]) for name in inputs)
    path = work / "model.onnx"
    program = torch.onnx.export(
        FlatKvDecoder(model),
        args,
        dynamo=True,
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=dynamic_shapes,
        optimize=True,
        opset_version=opset,
    )
    assert program is not None
    program.save(str(path), external_data=True)
    return path


def export_torch_dynamo_opset23(model: PreTrainedModel, hf_dir: Path, work: Path) -> Path:
    # Opset 23 gives ONNX Attention (from sdpa), RotaryEmbedding and RMSNormalization.
    return export_torch_dynamo(model, hf_dir, work, opset=23)


def export_optimum(model: PreTrainedModel, hf_dir: Path, work: Path) -> Path:
    from optimum.exporters.onnx import main_export

    main_export(
        model_name_or_path=str(hf_dir),
        output=str(work),
        task="text-generation-with-past",
        opset=LEGACY_OPSET,
        device="cpu",
        dtype="fp32",
        local_files_only=True,
    )
    return work / "model.onnx"


def export_genai(
    model: PreTrainedModel, hf_dir: Path, work: Path, precision: str = "fp32", extra_options: tuple[str, ...] = ()
) -> Path:
    cache = work / "cache"
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(work),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
        "--extra_options",
        "hf_token=false",
        "hf_remote=false",
        *extra_options,
    ]
    subprocess.run(cmd, check=True)
    return work / "model.onnx"


@dataclass(frozen=True)
class Exporter:
    export: Callable[[PreTrainedModel, Path, Path], Path]
    families: tuple[str, ...]
    # How the model runs attention while exported: eager gives MatMul/Softmax, sdpa gives
    # ONNX Attention at opset 23. optimum and the genai builder load the saved folder themselves.
    attn_implementation: str = "eager"
    # Weights the export holds other than the float32 model's: "int4" (MatMulNBits) or "fp16".
    # Such an export is checked against the torch model with the weights it holds (dequantized,
    # or rounded to float16), within LOW_PRECISION_TOLERANCE, and its reference.npz holds
    # onnxruntime's outputs, not torch's.
    precision: str = "fp32"


def genai_exporter(precision: str, *extra_options: str) -> Callable[[PreTrainedModel, Path, Path], Path]:
    def export(model: PreTrainedModel, hf_dir: Path, work: Path) -> Path:
        return export_genai(model, hf_dir, work, precision, extra_options)

    return export


ALL_FAMILIES = ("llama-gqa", "gpt2", "phi3", "qwen3")
EXPORTERS: dict[str, Exporter] = {
    "torch-legacy": Exporter(
        export_torch_legacy,
        (
            *ALL_FAMILIES,
            "llama-kv2",
            "mistral-window",
            "qwen3-kv1",
            "falcon-gqa",
            "falcon-mqa",
            "olmo2-kv2",
            "olmo-clip",
            "starcoder2-kv2",
            "bloom-alibi",
        ),
    ),
    "torch-dynamo": Exporter(export_torch_dynamo, (*ALL_FAMILIES, "qwen3-kv1", "stablelm-qkln")),
    "torch-dynamo-opset23": Exporter(export_torch_dynamo_opset23, ("llama-gqa",), attn_implementation="sdpa"),
    "torch-dynamo-autodims": Exporter(export_torch_dynamo_autodims, ("llama-gqa",)),
    # optimum 2.1 cannot export falcon-gqa: its dummy past has num_kv_heads (2) heads where the
    # model caches k and v broadcast to all 8 query heads (torch.cat: "Expected size 2 but got size 8").
    # optimum-onnx 0.1.0 has no StarCoder2 config ("custom or unsupported architecture").
    # Cohere through the torch-legacy path above fails in torch's export of a torch.cat ("All tensors must
    # have the same rank"); optimum (the same legacy exporter with its own wrapper) exports it.
    "optimum": Exporter(export_optimum, (*ALL_FAMILIES, "qwen2-kv2", "stablelm-qkln", "cohere-interleaved")),
    # The genai builder has no GPT-2 support (no GPT2LMHeadModel in its model table). Its Phi-3
    # export (0.11.4) is wrong: lm_head reads layer 0's post-attention norm instead of the final
    # norm (logits differ from torch by ~10), so it is not exported.
    "genai": Exporter(export_genai, ("llama-gqa", "llama-kv2", "qwen3", "qwen2-kv2")),
    # int4 (RTN), symmetric (no zero points) by default, asymmetric (uint4 with zero points) on
    # request. Accuracy level 1 (float32 activations), not the CPU default 4 (activations quantized
    # to int8, which moves logits of ~12 by up to ~1.4 at block 128), so that the export is checked
    # tightly against torch with the dequantized weights; the graph is the same but for that attribute.
    "genai-int4-b32": Exporter(
        genai_exporter("int4", "int4_block_size=32", "int4_accuracy_level=1"), ("llama-wide",), precision="int4"
    ),
    "genai-int4-b128": Exporter(
        genai_exporter("int4", "int4_block_size=128", "int4_accuracy_level=1"), ("llama-wide",), precision="int4"
    ),
    "genai-int4-b32-zp": Exporter(
        genai_exporter("int4", "int4_block_size=32", "int4_is_symmetric=false", "int4_accuracy_level=1"),
        ("llama-wide",),
        precision="int4",
    ),
    # The genai builder's fp16 CPU export (0.11.4) fails in onnxruntime (Expand in
    # attn_mask_reformat: "invalid expand shape"); onnxruntime's CPU has no bfloat16 MatMul, Add
    # or ReduceMax kernels, so no bfloat16 export runs there.
    "torch-legacy-fp16": Exporter(
        lambda model, hf_dir, work: export_torch_legacy(model, hf_dir, work, torch.float16),
        ("llama-gqa",),
        precision="fp16",
    ),
    "genai-int4-b128-zp": Exporter(
        genai_exporter("int4", "int4_block_size=128", "int4_is_symmetric=false", "int4_accuracy_level=1"),
        ("llama-wide",),
        precision="int4",
    ),
}


def save_hf_folder(model: PreTrainedModel, folder: Path) -> None:
    """A local HF folder for the exporters that take a path (optimum, genai builder)."""
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, model.config)


def save_tokenizer(folder: Path, config: PretrainedConfig) -> None:
    """A byte-level BPE tokenizer with no merges: ids 0..255 are bytes, the rest are unused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {ch: i for i, ch in enumerate(sorted(vocab))}
    for extra in range(len(vocab), config.vocab_size):
        vocab[f"<extra_{extra}>"] = extra
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<extra_256>", eos_token="<extra_257>", unk_token="<extra_258>"
    )
    fast.save_pretrained(folder)


def op_histogram(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.domain or "ai.onnx"][node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    for function in model.functions:
        for node in function.node:
            counts[f"function:{node.domain or 'ai.onnx'}"][node.op_type] += 1
    return {domain: dict(sorted(c.items())) for domain, c in sorted(counts.items())}


# Default-domain ops whose attributes carry head counts or norm settings.
ATTRIBUTE_OPS = {"Attention", "RotaryEmbedding", "RMSNormalization", "SimplifiedLayerNormalization"}


def contrib_attributes(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Distinct attribute sets of contrib and attention-like ops (num_heads, kv_num_heads, ...)."""
    seen: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type not in ATTRIBUTE_OPS:
            continue
        attrs = {a.name: _attr_value(a) for a in node.attribute}
        key = f"{node.domain or 'ai.onnx'}.{node.op_type}"
        if attrs not in seen[key]:
            seen[key].append(attrs)
    return dict(seen)


def _attr_value(attr: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    if isinstance(value, (int, float, str)):
        return value
    return str(type(value).__name__)


def value_info_summary(values: Any) -> list[dict[str, Any]]:
    out = []
    for value in values:
        tensor = value.type.tensor_type
        dims = [
            d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in tensor.shape.dim
        ]
        out.append(
            {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": dims}
        )
    return out


def finalize(exported: Path, dest: Path, config: PretrainedConfig) -> onnx.ModelProto:
    """Rewrite an export into the one layout all models share, capping the IR version."""
    model = onnx.load(str(exported), load_external_data=True)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    onnx.save_model(
        model,
        str(dest / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
        convert_attribute=False,
    )
    config.to_json_file(str(dest / "config.json"))
    return onnx.load(str(dest / "model.onnx"), load_external_data=False)


def checker_verdict(path: Path) -> str:
    """onnx.checker's verdict, recorded not enforced: the genai builder's exports fail it by design."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        return "fails: " + str(exc).strip().splitlines()[0]
    return "passes"


def run_onnxruntime(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    unknown = wanted - feeds.keys()
    if unknown:
        raise RuntimeError(f"{path}: inputs the test feeds do not know: {sorted(unknown)}")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted}), strict=True))


def compare(
    reference: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float = ATOL, rtol: float = RTOL
) -> dict[str, float]:
    diffs: dict[str, float] = {}
    for name, expected in reference.items():
        if name not in got:
            raise RuntimeError(f"output {name} missing from the export (it has {sorted(got)})")
        actual = got[name]
        if actual.shape != expected.shape:
            raise RuntimeError(f"output {name}: shape {actual.shape} != torch {expected.shape}")
        diffs[name] = float(np.max(np.abs(actual - expected)))
        if not np.allclose(actual, expected, atol=atol, rtol=rtol):
            raise RuntimeError(f"output {name}: max abs diff {diffs[name]:.3g} exceeds atol {atol} rtol {rtol}")
    return diffs


def dequantize_matmul_nbits(node: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """The float weight `[N, K]` a MatMulNBits node (4 bits) multiplies by: (q - zero point) * scale per block."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
    if attrs["bits"] != 4:
        raise RuntimeError(f"{node.name}: {attrs['bits']}-bit MatMulNBits is not handled here")
    packed = initializers[node.input[1]].reshape(n, -1)
    blocks = -(-k // block)
    # Two 4-bit values a byte, the low nibble first.
    quant = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, : blocks * block].astype(np.float32)
    scales = initializers[node.input[2]].reshape(n, blocks).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp_packed = initializers[node.input[3]].reshape(n, -1)
        zero_points = np.stack([zp_packed & 0x0F, zp_packed >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        zero_points = np.full((n, blocks), 8)
    weight = (quant.reshape(n, blocks, block) - zero_points[..., None]) * scales[..., None]
    return weight.reshape(n, blocks * block)[:, :k]


# genai builder weight names (`model.layers.0.attn.qkv_proj.MatMul.weight_Q4`) -> torch Linear modules.
GENAI_PROJECTIONS = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj",),
    "mlp.up_proj": ("mlp.up_proj",),
    "mlp.down_proj": ("mlp.down_proj",),
}


def model_with_exported_weights(model: PreTrainedModel, path: Path, precision: str) -> PreTrainedModel:
    """A copy of the torch model holding the weights the export holds: int4 dequantized, or float16 rounded."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        if precision == "fp16":
            for param in twin.parameters():
                param.copy_(param.half().float())
            return twin
        if precision != "int4":
            raise ValueError(f"unknown precision {precision}")
        proto = onnx.load(str(path), load_external_data=True)
        initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        replaced = set()
        for node in proto.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            weight = torch.from_numpy(dequantize_matmul_nbits(node, initializers))
            name = node.input[1]
            if name.startswith("lm_head."):
                targets = ["lm_head"]
            else:
                layer, proj = name.removeprefix("model.layers.").split(".MatMul")[0].split(".", 1)
                targets = [f"model.layers.{layer}.{t}" for t in GENAI_PROJECTIONS[proj]]
            modules = [twin.get_submodule(t) for t in targets]
            rows = [m.weight.shape[0] for m in modules]
            for module, part in zip(modules, torch.split(weight, rows), strict=True):
                module.weight.copy_(part)
            replaced.update(targets)
    linears = {n for n, m in twin.named_modules() if isinstance(m, torch.nn.Linear)}
    if linears - replaced:
        raise RuntimeError(f"{path}: no MatMulNBits weight found for {sorted(linears - replaced)}")
    return twin


def save_reference(
    path: Path, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray], model_inputs: list[str]
) -> None:
    """Inputs and torch's outputs for one check, so tests without torch can check the model numerically."""
    arrays = {f"input.{name}": feeds[name] for name in model_inputs}
    arrays.update({f"output.{name}": value for name, value in outputs.items()})
    np.savez_compressed(path, **arrays)


def tool_versions() -> dict[str, str]:
    versions = {}
    for dist in TOOLCHAIN:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def export_one(family: str, exporter_name: str, out: Path) -> dict[str, Any]:
    config = FAMILIES[family]()
    model = build_model(config, EXPORTERS[exporter_name].attn_implementation)
    name = f"{family}-{exporter_name}"
    dest = out / name
    # References come first: nothing an exporter does to the model can leak into them.
    checks = []
    for batch, past_len, new_len in CHECK_SHAPES:
        feeds = example_inputs(config, batch=batch, past_len=past_len, new_len=new_len)
        checks.append((feeds, torch_reference(model, feeds)))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"export-{name}-") as tmp:
        hf_dir = Path(tmp) / "hf"
        work = Path(tmp) / "onnx"
        work.mkdir()
        save_hf_folder(model, hf_dir)
        exported = EXPORTERS[exporter_name].export(model, hf_dir, work)
        export_seconds = time.perf_counter() - start
        source_ir = onnx.load(str(exported), load_external_data=False).ir_version
        proto = finalize(exported, dest, config)
    precision = EXPORTERS[exporter_name].precision
    atol, rtol = LOW_PRECISION_TOLERANCE.get(precision, (ATOL, RTOL))
    if precision != "fp32":
        # The export's IO dtype (float16 for fp16) for the float inputs; torch gets the same values.
        io_dtype = onnx.helper.tensor_dtype_to_np_dtype(proto.graph.input[-1].type.tensor_type.elem_type)
        twin = model_with_exported_weights(model, dest / "model.onnx", precision)
        checks = [
            ({k: v.astype(io_dtype) if v.dtype == np.float32 else v for k, v in f.items()}, {}) for f, _ in checks
        ]
        checks = [
            (f, torch_reference(twin, {k: v.astype(np.float32) if v.dtype == io_dtype else v for k, v in f.items()}))
            for f, _ in checks
        ]
    diffs: dict[str, float] = {}
    first_outputs: dict[str, np.ndarray] = {}
    for feeds, reference in checks:
        outputs = run_onnxruntime(dest / "model.onnx", feeds)
        first_outputs = first_outputs or outputs
        got = compare(reference, {k: v.astype(np.float32) for k, v in outputs.items()}, atol, rtol)
        diffs = {k: max(v, diffs.get(k, 0.0)) for k, v in got.items()}
    # A low-precision export's reference is onnxruntime's own output (torch's differs by its rounding).
    reference_outputs = checks[0][1] if precision == "fp32" else first_outputs
    save_reference(
        dest / REFERENCE_FILE, checks[0][0], reference_outputs, model_inputs=[i.name for i in proto.graph.input]
    )
    sizes = {p.name: p.stat().st_size for p in sorted(dest.iterdir())}
    kv_heads, head_dim = kv_shape(config)
    return {
        "name": name,
        "family": family,
        "exporter": exporter_name,
        "export_seconds": round(export_seconds, 1),
        "ir_version": proto.ir_version,
        "ir_version_written_by_exporter": source_ir,
        "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "heads": int(config.num_attention_heads),
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden": int(config.hidden_size),
        "layers": num_layers(config),
        "vocab": int(config.vocab_size),
        "inputs": value_info_summary(proto.graph.input),
        "outputs": value_info_summary(proto.graph.output),
        "ops": op_histogram(proto),
        "contrib_attributes": contrib_attributes(proto),
        "initializers": len(proto.graph.initializer),
        "onnx_checker": checker_verdict(dest / "model.onnx"),
        "file_sizes": sizes,
        "versions": tool_versions(),
        "max_abs_diff_vs_torch": diffs,
        "check": f"(batch, past, new) in {CHECK_SHAPES}: allclose atol {atol} rtol {rtol}"
        + ("" if precision == "fp32" else f" against torch with the export's {precision} weights"),
        "reference_npz": "torch outputs" if precision == "fp32" else "onnxruntime outputs",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="model name (llama-gqa-optimum), family (gpt2) or exporter (genai); repeatable",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    jobs = [(family, exp) for exp, spec in EXPORTERS.items() for family in FAMILIES if family in spec.families]
    if args.only:
        jobs = [(f, e) for f, e in jobs if {f"{f}-{e}", f, e} & set(args.only)]
        if not jobs:
            parser.error(f"--only {args.only} matches no model")
    summary_path = args.out / "models.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("models", {})
    summary["toolchain"] = tool_versions()
    failures = []
    for family, exporter_name in jobs:
        name = f"{family}-{exporter_name}"
        print(f"== {name}", flush=True)
        try:
            info = export_one(family, exporter_name, args.out)
        except Exception as exc:  # one exporter failing must not stop the others; it is reported
            failures.append(name)
            print(f"!! {name} failed: {type(exc).__name__}: {exc}", flush=True)
            summary["models"][name] = {"name": name, "error": f"{type(exc).__name__}: {exc}"}
        else:
            summary["models"][name] = info
            print(json.dumps({k: info[k] for k in ("export_seconds", "ops", "max_abs_diff_vs_torch")}, indent=1))
        summary["models"] = dict(sorted(summary["models"].items()))
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    write_readme(args.out)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; failed: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
