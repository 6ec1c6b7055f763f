"""What a decoder LLM's inputs, outputs and symbolic dims stand for: the one place that decides it.

Every exporter (torch.onnx legacy and dynamo, optimum, onnxruntime-genai) writes the same signature,
whatever it names its dims: token ids `[batch, new]` (or embeddings `[batch, new, hidden]`),
position ids `[batch, new]`, an attention mask `[batch, past + new]`, a past KV cache per layer
`[batch, kv_heads, past, head_dim]` and its `present` counterpart `[batch, kv_heads, past + new,
head_dim]`, logits `[batch, new, vocab]`. So the role of a symbolic dim (batch, new tokens, past
tokens, their total) is read from WHERE it stands in that signature, not from its name: a dynamo
export made without named dims (`input_ids ['s1', 's70']`, every past its own `s98`, `s46`, ...)
is understood as well as one named `batch_size`. Several symbols may share a role (every past's
symbol is the past length: onnxruntime needs them equal at run time anyway). An output dim written
as an expression (`s70 + s98` for a present's length) ties its symbols together: with `s70` the
new tokens, `s98` is the past.

Names are only a hint, used for a symbol the structure leaves open (an input of no standard
role). A symbol still open, or one the structure gives two roles, is settled by the user:
`--dim s1=batch` on the CLI, recorded on the model (`DIM_HINTS_KEY` in its metadata) so that
rank models made from it carry it too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmir_onnx.errors import GenerationError, PlanError

# Only in annotations: the runtime reads the name-level facts (KV pairs, layers) in every rank process,
# which then need not import onnx_ir (seconds of CPU per process; docs/RUNTIME.md).
if TYPE_CHECKING:
    import onnx_ir as ir

BATCH = "batch"
NEW = "new"
PAST = "past"
TOTAL = "total"
ROLES = (BATCH, NEW, PAST, TOTAL)
ROLE_WORDS = {"batch": BATCH, "new": NEW, "seq": NEW, "past": PAST, "total": TOTAL}
DIM_HINTS_KEY = "llmir.dim_roles"
CLI_HINT = "--dim {symbol}=batch|new|past|total"

# Input kinds of the standard signature.
TOKEN_IDS = "token_ids"
EMBEDDINGS = "embeddings"
POSITIONS = "positions"
MASK = "mask"
KV_CACHE = "kv_cache"

_KV_NAME = re.compile(r"past|cache", re.IGNORECASE)
_PRESENT_NAME = re.compile(r"present", re.IGNORECASE)
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
# "past_key_values.3.key" and "present.3.key" share the key ".3.key".
_CACHE_PREFIX = re.compile(r"^(past_key_values|past_key_value|present_key_values|past|present)")


def _is_float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def _is_integer(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_integer()


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _feeds_kv_slot(value: ir.Value) -> bool:
    """Read as a past KV cache by the graph: the past input of an attention op, or concatenated in front
    of the new keys into a graph output (the present)."""
    for node, index in value.uses():
        if node.op_type == "GroupQueryAttention" and index in (3, 4):
            return True
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and index in (4, 5):
            return True
        if node.op_type == "Concat" and index == 0 and node.outputs[0].is_graph_output():
            return True
    return False


def is_kv_input(value: ir.Value) -> bool:
    """A past KV cache input: rank 4, floating point, named past/cache or read where a cache is read."""
    if _rank(value) != 4 or not _is_float(value):
        return False
    return bool(_KV_NAME.search(value.name or "")) or _feeds_kv_slot(value)


def is_kv_output_name(name: str) -> bool:
    """A present KV cache output's name (present*, as every exporter names them)."""
    return bool(_PRESENT_NAME.search(name))


def is_kv_output(value: ir.Value) -> bool:
    """A present KV cache output of the graph."""
    return is_kv_output_name(value.name or "")


def kv_cache_inputs(model: ir.Model) -> list[ir.Value]:
    """The past KV cache inputs of `model`, in graph order."""
    return [value for value in model.graph.inputs if is_kv_input(value)]


def _cache_key(name: str) -> str | None:
    match = _CACHE_PREFIX.match(name)
    return name[match.end() :] if match else None


def kv_cache_pairs(input_names: list[str], output_names: list[str]) -> dict[str, str]:
    """{present output: past input} for the KV cache tensors of one model (original names)."""
    pasts = {_cache_key(name): name for name in input_names if name.startswith("past")}
    pairs = {}
    for name in output_names:
        if not is_kv_output_name(name):
            continue
        past = pasts.get(_cache_key(name))
        if past is None:
            raise GenerationError(
                f"output {name!r} looks like a KV cache but no input matches it; inputs: {sorted(pasts.values())}"
            )
        pairs[name] = past
    unmatched = sorted(set(pasts.values()) - set(pairs.values()))
    if unmatched:
        raise GenerationError(f"KV cache inputs {unmatched} have no present.* output to feed them")
    return pairs


# --------------------------------------------------------------------------- decoder layers

# A decoder layer's scope in a node, value or weight name (`/model/layers.3/...`, `/transformer/h.3/...`,
# `model.layers.3.mlp.weight`) or in the scope metadata torch.onnx's dynamo exporter writes
# (`namespace`: `.../model.model.layers.3: ...`; `pkg.torch.onnx.name_scopes`: `['', 'model',
# 'model.layers.3']`). Cost, layouts, stages and annotations all read layers through this one pattern.
LAYER_PATTERN = re.compile(r"(?:^|[/.:\s'])(?:layers|layer|h|blocks|block)[./_:](\d+)(?=$|[/.:_\s'])")
SCOPE_METADATA_KEYS = ("namespace", "pkg.torch.onnx.name_scopes")
# The layer index in a past KV cache input's name: `past_key_values.3.key`, `past.3.value`, `cache_3_k`.
_KV_LAYER_IN_NAME = re.compile(r"(?:past|cache)\D*?(\d+)", re.IGNORECASE)


def layer_in_text(text: str) -> int | None:
    """The decoder layer index a name or scope shows (`/model/layers.3/...` -> 3), None if none."""
    match = LAYER_PATTERN.search(text)
    return int(match.group(1)) if match else None


def layer_of_node_by_name(node: ir.Node) -> int | None:
    """The decoder layer a node's name, scope metadata, outputs or weights name; None if none does."""
    if node.name and (layer := layer_in_text(node.name)) is not None:
        return layer
    for key in SCOPE_METADATA_KEYS:
        scope = node.metadata_props.get(key)
        if scope and (layer := layer_in_text(scope)) is not None:
            return layer
    for output in node.outputs:
        if output.name and (layer := layer_in_text(output.name)) is not None:
            return layer
    for value in node.inputs:
        if value is None or value.const_value is None or value.producer() is not None:
            continue  # not a weight
        if value.name and (layer := layer_in_text(value.name)) is not None:
            return layer
    return None


def kv_cache_layers(graph: ir.Graph) -> dict[ir.Value, int]:
    """Model inputs that are a layer's past KV cache (`past_key_values.3.key`, ...) -> layer index."""
    found = {}
    for value in graph.inputs:
        match = _KV_LAYER_IN_NAME.search(value.name or "")
        if match and is_kv_input(value):
            found[value] = int(match.group(1))
    return found


def _indexes_an_embedding(value: ir.Value) -> bool:
    for node, index in value.uses():
        table = node.inputs[0] if node.inputs else None
        if node.op_type == "Gather" and index == 1 and table is not None and table.const_value is not None:
            return len(table.const_value.shape) == 2
    return False


def input_kind(value: ir.Value) -> str | None:
    """Which standard LLM input `value` is (TOKEN_IDS, EMBEDDINGS, POSITIONS, MASK, KV_CACHE), or None."""
    name = (value.name or "").lower()
    rank = _rank(value)
    if is_kv_input(value):
        return KV_CACHE
    if "mask" in name and rank in (2, 4):
        return MASK
    if "position" in name and _is_integer(value) and rank in (1, 2, 3):
        return POSITIONS
    if _is_integer(value) and rank == 2 and ("input_ids" in name or _indexes_an_embedding(value)):
        return TOKEN_IDS
    if "embeds" in name and _is_float(value) and rank == 3:
        return EMBEDDINGS
    return None


def kv_length_axis(value: ir.Value) -> int:
    """The axis of a KV cache tensor that holds its tokens: 2 in [batch, heads, tokens, head_dim], the one
    dynamic axis other than batch otherwise ([batch, tokens, heads, head_dim])."""
    shape = value.shape
    if shape is None or not isinstance(shape[2], int):
        return 2
    dynamic = [axis for axis in (1, 3) if not isinstance(shape[axis], int)]
    return dynamic[0] if len(dynamic) == 1 else 2


def mask_total_axis(model: ir.Model) -> tuple[ir.Value, int]:
    """The attention mask input and its total-length axis (past + new): the whole past P is that length less
    the new tokens, on every rank (the mask stays whole), while a rank's past input holds its block only."""
    for value in model.graph.inputs:
        if input_kind(value) == MASK and value.shape is not None and len(value.shape) in (2, 4):
            return value, 1 if len(value.shape) == 2 else 3
    raise PlanError(
        "--cp-kv-cache sharded needs the model's attention mask input ([batch, past + new]: the whole past's "
        "length, a rank's past input holding its block only); this model has none: partition with "
        "--cp-kv-cache replicated"
    )


def _input_roles(value: ir.Value) -> dict[int, str]:
    """{axis: role} of one graph input in the standard signature."""
    kind = input_kind(value)
    rank = _rank(value)
    if kind in (TOKEN_IDS, EMBEDDINGS):
        return {0: BATCH, 1: NEW}
    if kind == POSITIONS:
        if rank is None:
            return {}  # no shape: no axis to name
        return {0: NEW} if rank == 1 else {rank - 2: BATCH, rank - 1: NEW}
    if kind == MASK:
        return {0: BATCH, 1: TOTAL} if rank == 2 else {0: BATCH, 2: NEW, 3: TOTAL}
    if kind == KV_CACHE:
        return {0: BATCH, kv_length_axis(value): PAST}
    return {}


def _output_roles(value: ir.Value) -> dict[int, str]:
    """{axis: role} of one graph output in the standard signature."""
    rank = _rank(value)
    if is_kv_output(value) and rank == 4 and _is_float(value):
        return {0: BATCH, kv_length_axis(value): TOTAL}
    if "logits" in (value.name or "") and rank == 3:
        return {0: BATCH, 1: NEW}
    return {}


def role_from_name(name: str) -> str | None:
    """The role a dim's NAME suggests (a hint only: `batch_size`, `past_sequence_length`, ...)."""
    lowered = name.lower()
    if "batch" in lowered or lowered in ("b", "n", "bs"):
        return BATCH
    if "past" in lowered or "cache" in lowered:
        return PAST
    if "total" in lowered or "all" in lowered or "kv" in lowered or "key" in lowered or "present" in lowered:
        return TOTAL
    if re.search(r"seq|len|token", lowered):
        return NEW
    return None


def _is_symbol(text: str) -> bool:
    return _SYMBOL.fullmatch(text) is not None


def _sum_terms(expression: str) -> list[str] | None:
    """`s70 + s98` -> ['s70', 's98']; None for anything but a sum of two symbols."""
    terms = [term.strip() for term in expression.split("+")]
    return terms if len(terms) == 2 and all(_is_symbol(term) for term in terms) else None


# A sum of two roles is a third: past + new = total.
_SUM_COMPLEMENT = {(PAST, TOTAL): NEW, (NEW, TOTAL): PAST}


@dataclass(frozen=True)
class DimRoles:
    """The role of every symbolic dim of a model's inputs that has one, and where it was read.

    `roles`: symbol -> BATCH | NEW | PAST | TOTAL. `sources`: symbol -> where the role came from
    ("axis 1 of input 'input_ids'", "--dim", "its name"), for error messages.
    """

    roles: Mapping[str, str]
    sources: Mapping[str, str]


def dim_hints(model: ir.Model) -> dict[str, str]:
    """The roles a user gave (`--dim`), recorded on the model."""
    text = model.metadata_props.get(DIM_HINTS_KEY)
    return dict(json.loads(text)) if text else {}


def parse_dim_hints(texts: Iterable[str]) -> dict[str, str]:
    """['s1=batch', 's70=new'] -> {'s1': 'batch', 's70': 'new'} (the CLI's --dim values)."""
    hints = {}
    for text in texts:
        symbol, _, word = text.partition("=")
        role = ROLE_WORDS.get(word.strip().lower())
        if not symbol.strip() or role is None:
            raise PlanError(f"cannot read --dim {text!r}; write it as SYMBOL=ROLE, ROLE one of batch, new, past, total")
        hints[symbol.strip()] = role
    return hints


def record_dim_hints(model: ir.Model, hints: Mapping[str, str]) -> None:
    """Keep the user's `--dim` roles on the model (and the rank models made from it)."""
    if hints:
        merged = {**dim_hints(model), **hints}
        model.metadata_props[DIM_HINTS_KEY] = json.dumps(merged, sort_keys=True)


def _where(value: ir.Value, axis: int, io: str) -> str:
    return f"axis {axis} of {io} {value.name!r}"


def dim_roles(model: ir.Model) -> DimRoles:
    """The role of every symbolic dim the model's signature (or, failing that, its name) settles.

    Raises PlanError when the structure gives a symbol two roles and no `--dim` settles it.
    """
    graph = model.graph
    hints = dim_hints(model)
    found: dict[str, dict[str, str]] = {}  # symbol -> {role: where}
    sums: list[tuple[list[str], str, str]] = []  # (terms, role of the sum, where)

    def note(dim: int | ir.SymbolicDimProtocol, role: str, where: str) -> None:
        if isinstance(dim, int) or dim.value is None:
            return
        text = str(dim.value)
        if _is_symbol(text):
            found.setdefault(text, {}).setdefault(role, where)
        elif (terms := _sum_terms(text)) is not None:
            sums.append((terms, role, where))

    for io, values, reader in (("input", graph.inputs, _input_roles), ("output", graph.outputs, _output_roles)):
        for value in values:
            if value.shape is None:
                continue
            for axis, role in reader(value).items():
                note(value.shape[axis], role, _where(value, axis, io))

    roles: dict[str, str] = {}
    sources: dict[str, str] = {}
    for symbol, candidates in found.items():
        if symbol in hints:
            continue
        if len(candidates) > 1:
            said = "; ".join(f"{role} as {where}" for role, where in candidates.items())
            settle = CLI_HINT.format(symbol=symbol)
            raise PlanError(f"the dimension {symbol!r} stands for two things ({said}); settle it with {settle}")
        ((role, where),) = candidates.items()
        roles[symbol], sources[symbol] = role, where
    for symbol, role in hints.items():
        roles[symbol], sources[symbol] = role, "--dim"
    # A sum whose one term is known tells the other (`s70 + s98` = total with s70 = new: s98 = past).
    changed = True
    while changed:
        changed = False
        for terms, role, where in sums:
            for known, unknown in (terms, terms[::-1]):
                complement = _SUM_COMPLEMENT.get((roles.get(known, ""), role))
                if complement is not None and unknown not in roles:
                    roles[unknown], sources[unknown] = complement, f"{' + '.join(terms)} at {where}"
                    changed = True
    for value in graph.inputs:
        for dim in value.shape or ():
            text = None if isinstance(dim, int) or dim.value is None else str(dim.value)
            if text is not None and _is_symbol(text) and text not in roles:
                named_role = role_from_name(text)
                if named_role is not None:
                    roles[text], sources[text] = named_role, "its name"
    return DimRoles(roles, sources)


# Fused attention that places its queries at the end of the sequence (the causal mask, rotary positions).
_LAST_TOKEN_ATTENTION = frozenset(
    {
        ("com.microsoft", "GroupQueryAttention"),
        ("com.microsoft", "MultiHeadAttention"),
        ("com.microsoft", "Attention"),
        ("", "Attention"),
        ("ai.onnx", "Attention"),
    }
)


def last_token_attention(graph: ir.Graph) -> ir.Node | None:
    """The first fused attention node that takes its queries as the last tokens of the sequence, or None:
    `partition --cp` refuses such a model (passes/context_parallel.py) once it has lowered the top-level
    GroupQueryAttention and ONNX Attention nodes into standard ops (lower_attention.py), and `plan`, which
    estimates cp layouts on the lowered graph too (plan/layouts.py `_cp_analysis`), offers no cp layout."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(graph):
        if (node.domain, node.op_type) in _LAST_TOKEN_ATTENTION:
            return node
    return None


def is_lowered_for_cp(node: ir.Node) -> bool:
    """Whether `partition --cp` writes this fused attention node out in standard ops (lower_attention.py):
    com.microsoft GroupQueryAttention and ONNX Attention, at the top level of the graph."""
    return (node.domain, node.op_type) in (("com.microsoft", "GroupQueryAttention"), ("", "Attention"),
                                           ("ai.onnx", "Attention"))


def last_token_attention_reason(node: ir.Node) -> str:
    return (
        f"--cp cannot split the queries of node {node.name} ({node.op_type}): the fused attention op takes its "
        "queries as the last tokens of the sequence (causal mask, positions), so a chunk of them would attend as "
        "the wrong tokens"
    )
