"""Sharding rules, one module per op family, registered by (domain, op_type)."""

from __future__ import annotations

from llmir_onnx.propagation import attention, collectives, elementwise, indexing, matmul, reductions, shape_ops
from llmir_onnx.propagation.base import Decision, RuleContext, WeightRole, lookup, register, registered_ops

__all__ = [
    "Decision",
    "RuleContext",
    "WeightRole",
    "attention",
    "collectives",
    "elementwise",
    "indexing",
    "lookup",
    "matmul",
    "reductions",
    "register",
    "registered_ops",
    "shape_ops",
]
