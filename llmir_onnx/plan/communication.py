"""Communication of one rank per step: each ai.llmir op kind on each link, its bytes and predicted time.

An analysis over a rank's model (it never edits it), at the two phases every analysis evaluates
(prefill of max_batch x max_seq tokens, one decode step after max_seq - 1): ops with the same kind and
the same link (a collective's group, or a Send/Recv's peer) are summed into one entry. The report reads
these entries from the manifest (`cost["collectives"]` of each rank) to show bytes per collective and
per link and their share of the predicted step.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from llmir_onnx.plan.cost import LinkOf, comm_seconds, node_cost
from llmir_onnx.plan.devices import DeviceProfile
from llmir_onnx.plan.memory import phase_sizes
from llmir_onnx.plan.shapes import LLMIR_DOMAIN, evaluate_shapes


@dataclass(frozen=True)
class LinkTraffic:
    """One op kind on one link of a rank, summed over the step: `count` ops, bytes and seconds per phase."""

    op: str
    group: tuple[int, ...] | None  # the ranks of a collective's group (None for Send/Recv)
    peer: int | None  # the other rank of a Send/Recv (None for collectives)
    count: int
    prefill_bytes: int
    decode_bytes: int
    prefill_s: float
    decode_s: float


def _link_of(node: ir.Node) -> tuple[tuple[int, ...] | None, int | None]:
    group = node.attributes.get("group")
    peer = node.attributes.get("peer")
    if peer is not None:
        return None, peer.as_int()
    return (tuple(int(r) for r in group.value) if group is not None and group.value else None), None


def rank_traffic(
    model: ir.Model, device: DeviceProfile, max_batch: int, max_seq: int, link_of: LinkOf | None = None
) -> list[LinkTraffic]:
    """The ai.llmir ops of `model` grouped by (op, link); a group-less collective has group None.

    Times over `link_of(node)` (a cluster's link for the node's group), else the device's own link."""
    totals: dict[tuple[str, tuple[int, ...] | None, int | None], dict[str, float]] = {}
    for phase, sizes in phase_sizes(max_batch, max_seq).items():
        shapes = evaluate_shapes(model, sizes)
        for node in model.graph:
            if node.domain != LLMIR_DOMAIN:
                continue
            cost = node_cost(node, shapes)
            key = (node.op_type, *_link_of(node))
            entry = totals.setdefault(key, {"count": 0})
            if phase == "prefill":
                entry["count"] += 1
            entry[f"{phase}_bytes"] = entry.get(f"{phase}_bytes", 0) + cost.comm_bytes
            link, hosts = (link_of(node) if link_of is not None else None) or (device.intra_host_link, 1)
            entry[f"{phase}_s"] = entry.get(f"{phase}_s", 0.0) + comm_seconds(
                cost.op_type, cost.comm_bytes, cost.group_size, link, hosts, cost.gather_sizes
            )
    return [
        LinkTraffic(
            op=op, group=group, peer=peer, count=int(entry["count"]),
            prefill_bytes=int(entry.get("prefill_bytes", 0)), decode_bytes=int(entry.get("decode_bytes", 0)),
            prefill_s=float(entry.get("prefill_s", 0.0)), decode_s=float(entry.get("decode_s", 0.0)),
        )
        for (op, group, peer), entry in sorted(totals.items(), key=lambda item: str(item[0]))
    ]
