"""Sampling and the generation loop's pure parts (one process, no ranks)."""

from __future__ import annotations

import numpy as np
import pytest

from llmir_onnx.errors import GenerationError
from llmir_onnx.runtime.generate import kv_cache_pairs, logits_name
from llmir_onnx.runtime.sampling import Sampler, SamplingConfig


def _logits(seed: int = 0, batch: int = 3, vocab: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, vocab)).astype(np.float32)


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert Sampler(SamplingConfig())(logits).tolist() == np.argmax(logits, axis=-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(1)
    greedy = np.argmax(logits, axis=-1).tolist()
    assert Sampler(SamplingConfig(temperature=1.5, top_k=1, seed=3))(logits).tolist() == greedy
    assert Sampler(SamplingConfig(temperature=1.5, top_p=1e-6, seed=3))(logits).tolist() == greedy


def test_seeded_sampling_repeats_and_differs_by_seed() -> None:
    logits = np.zeros((64, 1000), dtype=np.float32)  # uniform: a different seed must change the draw

    def draw(seed: int) -> list[int]:
        return Sampler(SamplingConfig(temperature=1.0, seed=seed))(logits).tolist()

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_top_k_keeps_only_the_k_most_likely() -> None:
    logits = np.tile(np.arange(100, dtype=np.float32), (200, 1))
    drawn = Sampler(SamplingConfig(temperature=100.0, top_k=3, seed=0))(logits)
    assert set(drawn.tolist()) == {97, 98, 99}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # Probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two, never the third.
    logits = np.log(np.array([[0.2, 0.5, 0.3]] * 500, dtype=np.float64)).astype(np.float32)
    drawn = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=1))(logits)
    assert set(drawn.tolist()) == {1, 2}


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": 5}]
)
def test_bad_options_are_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(GenerationError):
        SamplingConfig(**kwargs)  # type: ignore[arg-type]


def test_kv_cache_pairs_and_logits_name() -> None:
    inputs = ["input_ids", "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key"]
    outputs = ["logits", "present.0.key", "present.0.value", "present.1.key"]
    assert kv_cache_pairs(inputs, outputs) == {
        "present.0.key": "past_key_values.0.key",
        "present.0.value": "past_key_values.0.value",
        "present.1.key": "past_key_values.1.key",
    }
    assert logits_name(outputs) == "logits"
    with pytest.raises(GenerationError, match=r"present\.2\.key"):
        kv_cache_pairs(inputs, [*outputs, "present.2.key"])
    with pytest.raises(GenerationError, match=r"past_key_values\.1\.key"):
        kv_cache_pairs(inputs, outputs[:-1])
