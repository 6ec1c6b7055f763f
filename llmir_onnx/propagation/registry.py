"""One record per op: its sharding rule, its shape function and its local-size rewrite, in one place.

A record is registered by (domain, op_type, opset range) where the op's family module defines its rule
(`propagation/attention.py` holds GroupQueryAttention's rule, shape and head-count rewrite side by side):

    @register(["GroupQueryAttention"], domain=MS_DOMAIN, shape=gqa_shape, localize=local_heads("num_heads"))
    def gqa_rule(ctx, node, placements): ...

or, for an op that has a shape but no sharding rule (the propagate pass replicates it), by `define`.
Three passes dispatch through the records and know no op by name:
- propagate (`passes/propagate.py`) calls `record.rule` (no rule: the op runs replicated or is refused);
- the shape planner (`plan/shapes.py`) calls `record.value` where all inputs are known (shape
  computations) and `record.shape` at concrete sizes (no shape: it refuses);
- localize (`passes/localize.py`) calls `record.localize` on every node once tp > 1 (None: nothing local).

The record's three parts meet in one op and must agree (a rule that splits heads needs a localize that
writes the local head count); `tests/test_rules.py` checks them together, numerically, through real
rank processes. This module sits low: it imports neither plan/ nor passes/; they hand their own state
to the functions through the `ShapeEnvironment` and `Localizer` protocols below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import onnx_ir as ir

from llmir_onnx.placement import Placement

if TYPE_CHECKING:
    import numpy as np

    from llmir_onnx.propagation.base import Decision, RuleContext, WeightRole
    from llmir_onnx.propagation.tensor_shapes import TensorShape

MS_DOMAIN = "com.microsoft"
# Every opset of a domain; a record for an op whose meaning changed gives the range it covers.
ALL_OPSETS = range(1, 1 << 16)


class ShapeEnvironment(Protocol):
    """What a shape function may ask of the planner beyond its node's inputs."""

    @property
    def total_tokens(self) -> int:
        """Past plus new tokens at the sizes being evaluated (a KV cache's length)."""
        ...

    def bind_dim(self, dim: int | ir.SymbolicDim, node: ir.Node) -> int:
        """A declared dimension's size (a symbolic one bound like the graph inputs' dims)."""
        ...


class Localizer(Protocol):
    """What a local-size rewrite may ask of the localize pass (one tp rank's sizes; `tp_rank`)."""

    tp_rank: int

    @property
    def tp(self) -> int: ...

    def placement(self, value: ir.Value | None) -> Placement | None: ...

    def role(self, node: ir.Node) -> WeightRole | None:
        """Annotate's Megatron role for a weight matmul (or 'vocab' for the embedding)."""
        ...

    def local_head_count(self, heads: int) -> int:
        """How many of `heads` heads (or kv heads, replicated when fewer than the ranks) this rank holds."""
        ...

    def hold_packed_elements(
        self, value: ir.Value, rows: int, bits: int, ranges: Callable[[int], list[tuple[int, int]]]
    ) -> None:
        """Initializer `value` packs `8 // bits` elements a byte in each of its `rows` rows: tp rank r holds
        the elements `ranges(r)` of every row, re-packed from its first byte (a share may start mid-byte)."""
        ...

    # Graph rewrites the localize pass provides for the core ONNX ops that carry sizes in inputs.
    def localize_target(self, graph: ir.Graph, node: ir.Node) -> None: ...
    def localize_split(self, graph: ir.Graph, node: ir.Node) -> None: ...
    def localize_slice(self, graph: ir.Graph, node: ir.Node) -> None: ...
    def localize_gather(self, graph: ir.Graph, node: ir.Node) -> None: ...
    def scale_partial_reduction(self, graph: ir.Graph, node: ir.Node) -> None: ...


Rule = Callable[["RuleContext", ir.Node, list[Placement | None]], "Decision"]
ShapeFunction = Callable[[ShapeEnvironment, ir.Node, list["TensorShape | None"]], list["TensorShape"]]
LocalizeFunction = Callable[[Localizer, ir.Graph, ir.Node], None]
ValueFunction = Callable[[ir.Node, list["np.ndarray | None"]], "np.ndarray | None"]


@dataclass(frozen=True)
class OpRecord:
    """Everything the partitioner knows about one op (in one domain, over a range of its opsets)."""

    domain: str
    op_type: str
    opsets: range = ALL_OPSETS
    # Sharding: the placements its inputs must have and its outputs get (None: replicated or refused).
    rule: Rule | None = None
    # Output shapes (and dtypes) at concrete sizes, for the memory plan and the cost model.
    shape: ShapeFunction | None = None
    # The value of a small output (a shape computation) from its inputs' known values; None: not computed.
    value: ValueFunction | None = None
    # Rewrites sizes the op carries (attributes, size inputs) to one rank's; None when it carries none.
    localize: LocalizeFunction | None = None
    # Whether `rule` knows shards with inner blocks (Shard.inner_blocks); where it does not, the op runs
    # replicated when it meets one, and gathering such a shard is refused.
    inner_blocks: bool = False


_RECORDS: dict[tuple[str, str], list[OpRecord]] = {}


def normalize_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def define(
    op_types: Sequence[str],
    domain: str = "",
    *,
    opsets: range = ALL_OPSETS,
    rule: Rule | None = None,
    shape: ShapeFunction | None = None,
    value: ValueFunction | None = None,
    localize: LocalizeFunction | None = None,
    inner_blocks: bool = False,
) -> None:
    """Register the record of each op in `op_types`.

    An op may get its parts from two definitions of one family module (its rule from one list of ops,
    its shape from another) when both name the same opset range; a part given twice is an error."""
    domain = normalize_domain(domain)
    for op_type in op_types:
        records = _RECORDS.setdefault((domain, op_type), [])
        same = [r for r in records if r.opsets == opsets]
        if not same:
            if any(r.opsets.start < opsets.stop and opsets.start < r.opsets.stop for r in records):
                raise ValueError(f"{domain or 'ai.onnx'}::{op_type}: opsets {opsets} overlap another record's")
            records.append(OpRecord(domain, op_type, opsets, rule, shape, value, localize, inner_blocks))
            records.sort(key=lambda r: r.opsets.start)
            continue
        record = same[0]
        given = {
            "rule": rule,
            "shape": shape,
            "value": value,
            "localize": localize,
            "inner_blocks": inner_blocks or None,
        }
        set_before = {part for part in given if getattr(record, part) not in (None, False)}
        twice = [part for part, value in given.items() if value is not None and part in set_before]
        if twice:
            raise ValueError(f"{domain or 'ai.onnx'}::{op_type} opsets {opsets}: {', '.join(twice)} defined twice")
        # The parts differ in type: Any, as dataclasses.replace's keyword arguments are checked per name.
        changes: dict[str, Any] = {part: value for part, value in given.items() if value is not None}
        records[records.index(record)] = replace(record, **changes)


def register(
    op_types: Sequence[str],
    domain: str = "",
    *,
    opsets: range = ALL_OPSETS,
    shape: ShapeFunction | None = None,
    value: ValueFunction | None = None,
    localize: LocalizeFunction | None = None,
    inner_blocks: bool = False,
) -> Callable[[Rule], Rule]:
    """Decorator: the function is the sharding rule of the records of `op_types` (see `define`)."""

    def wrap(rule: Rule) -> Rule:
        define(
            op_types,
            domain,
            opsets=opsets,
            rule=rule,
            shape=shape,
            value=value,
            localize=localize,
            inner_blocks=inner_blocks,
        )
        return rule

    return wrap


def node_opset(node: ir.Node) -> int | None:
    """The opset of the node's domain that its graph imports (None for a node in no graph)."""
    if node.version is not None:
        return node.version
    graph = node.graph
    if graph is None:
        return None
    imports = graph.opset_imports
    domain = normalize_domain(node.domain)
    version = imports.get(domain, imports.get("ai.onnx") if domain == "" else None)
    return version


def record_for(node: ir.Node) -> OpRecord | None:
    """The record of `node`'s (domain, op_type) that covers its opset; the newest when the opset is unknown."""
    domain = node.domain
    records = _RECORDS.get(("" if domain == "ai.onnx" else domain, node.op_type))
    if not records:
        return None
    if len(records) == 1 and records[0].opsets is ALL_OPSETS:
        return records[0]  # the common case, asked once per node by every pass (and shape evaluation)
    opset = node_opset(node)
    if opset is None:
        return records[-1]
    return next((r for r in records if opset in r.opsets), None)


def lookup(node: ir.Node) -> Rule | None:
    """The sharding rule of `node`'s op, or None."""
    record = record_for(node)
    return None if record is None else record.rule


def registered_ops() -> list[tuple[str, str]]:
    """(domain, op_type) of every op with a sharding rule."""
    return sorted(key for key, records in _RECORDS.items() if any(r.rule is not None for r in records))


class RuleTable(MutableMapping[tuple[str, str], Rule]):
    """The sharding rules by (domain, op_type), as a dict: the rule of each op's newest record.

    Setting an entry swaps that record's rule (tests swap in a wrong rule to see the harness catch it)."""

    def __getitem__(self, key: tuple[str, str]) -> Rule:
        found = [r for r in _RECORDS.get(key, []) if r.rule is not None]
        if not found:
            raise KeyError(key)
        rule = found[-1].rule
        assert rule is not None
        return rule

    def __setitem__(self, key: tuple[str, str], rule: Rule) -> None:
        records = _RECORDS.setdefault(key, [])
        if not records:
            records.append(OpRecord(key[0], key[1], rule=rule))
        else:
            records[-1] = replace(records[-1], rule=rule)

    def __delitem__(self, key: tuple[str, str]) -> None:
        records = _RECORDS.get(key, [])
        if not records or records[-1].rule is None:
            raise KeyError(key)
        records[-1] = replace(records[-1], rule=None)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(registered_ops())

    def __len__(self) -> int:
        return len(registered_ops())


RULES = RuleTable()


def records() -> list[OpRecord]:
    return [record for key in sorted(_RECORDS) for record in _RECORDS[key]]


def attr_int(node: ir.Node, name: str, default: int) -> int:
    """An int attribute of `node`, or `default` when it is absent."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    """An ints attribute of `node`, or None when it is absent."""
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())
