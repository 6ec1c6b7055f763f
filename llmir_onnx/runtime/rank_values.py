"""`RANK=VALUE[,RANK=VALUE]` environment variables, read the same way by every rank-level emulation
(LLMIR_CPU_SHARE in throttle.py, LLMIR_COMPUTE_STRETCH in stretch.py)."""

from __future__ import annotations

from collections.abc import Callable

from llmir_onnx.errors import PlanError


def parse_rank_values(variable: str, text: str, valid: Callable[[float], bool], form: str) -> dict[int, float]:
    """`"1=0.333,3=0.5"` -> {1: 0.333, 3: 0.5}; a one-line error naming `variable` and saying how to write
    it (`form`) for an item that is not RANK=VALUE with `valid(VALUE)`."""
    values: dict[int, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        rank_text, sep, value_text = item.partition("=")
        try:
            rank, value = int(rank_text), float(value_text)
        except ValueError:
            rank, value = -1, 0.0
        if not sep or rank < 0 or not valid(value):
            raise PlanError(f"{variable}={text!r}: cannot read {item!r}; write {form}")
        values[rank] = value
    return values
