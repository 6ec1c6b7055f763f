"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded generator.

Only the rank(s) that hold the logits sample; the token ids then travel to every rank (see
`generate.TokenBroadcast`), so every rank continues with the same tokens even though the logits of
different ranks may differ in the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmir_onnx.errors import GenerationError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean no filtering."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GenerationError(f"--temperature {self.temperature} is negative; use 0 for greedy or a value > 0")
        if self.top_k < 0:
            raise GenerationError(f"--top-k {self.top_k} is negative; use 0 (off) or a positive count")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"--top-p {self.top_p} is outside (0, 1]; use 1.0 to turn it off")
        if self.greedy and (self.top_k or self.top_p < 1.0):
            raise GenerationError("--top-k/--top-p need --temperature > 0 (temperature 0 is greedy decoding)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Chooses one token per row of a [batch, vocab] logits array; seeded, so runs repeat."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if logits.ndim != 2:
            raise GenerationError(f"expected logits of shape [batch, vocab], got {list(logits.shape)}")
        if self.config.greedy:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, row: np.ndarray) -> int:
        scaled = row.astype(np.float64) / self.config.temperature
        # Stable descending order, so ties resolve the same way on every run.
        order = np.argsort(-scaled, kind="stable")
        if self.config.top_k:
            order = order[: self.config.top_k]
        kept = scaled[order]
        probs = np.exp(kept - kept[0])
        probs /= probs.sum()
        if self.config.top_p < 1.0:
            cumulative = np.cumsum(probs)
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            count = int(np.searchsorted(cumulative, self.config.top_p) + 1)
            order, probs = order[:count], probs[:count] / probs[:count].sum()
        return int(order[self._rng.choice(len(order), p=probs)])
