"""The plan manifest: a versioned JSON file that says what each rank runs and how to feed it.

It is meant to be enough for another runtime to use a plan without this package: the mesh, each
rank's model file with its sha256, and for every input and output of the ORIGINAL model which
slice each rank holds (`dim`, `start`, `stop`; `dim` null means the rank holds the whole tensor).

Schema version 1 (all keys always present):

    format            "llmir-onnx-plan"
    version           1
    source            {"path": str (absolute at partition time), "sha256": str}
    mesh              {"tp": int, "pp": int, "cp": int, "world_size": int,
                       "groups": {"tp": [[rank, ...], ...], "pp": [[rank, ...], ...]}}
    options           the partition options used (free-form, informative)
    inputs, outputs   the original model's [{"name", "dtype", "shape"}]; shape entries are ints or
                      strings (symbolic dims)
    ranks             [{"rank", "coords": {"pp", "cp", "tp"}, "file", "sha256",
                        "layers": [first, stop) decoder layers of its pipeline stage, or null (all),
                        "data_files": the external data files its model references, in the plan
                                      folder: its own `rankN.onnx.data` and its stage's
                                      `stageS.shared.data` (weights several ranks of the stage
                                      hold, stored once); copy these with the model file,
                        "inputs":  [{"original", "local", "dim", "start", "stop"}],
                        "outputs": [{"original", "local", "dim", "start", "stop"}],
                        "memory": {"max_batch", "max_seq", "weight_bytes", "kv_cache_bytes",
                                   "activation_peak_bytes", "communication_bytes", "total_bytes", ...},
                        "cost": {"device", "prefill": {...}, "decode": {...}, "decode_tokens_per_s",
                                 "collectives": [{"op", "group", "peer", "count", "prefill_bytes",
                                                  "decode_bytes", "prefill_s", "decode_s"}]
                                 (each ai.llmir op kind on each link summed over one step,
                                 plan/communication.py)}}]
    sharding          (optional) {"weights": [{"name", "shape", "placement", "dim",
                      "ranges": per tp rank [[start, stop], ...] of dim}]}: each sliced weight, read
                      by `report`

Graph outputs of a rank model that no binding names (e.g. `llmir.sent.<tag>`, the element counts
of Send nodes) are bookkeeping: a runtime may fetch them or not. Byte counts are exact for weights
and the KV cache; activation peaks and times are estimates (see plan/memory.py and plan/cost.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmir_onnx.errors import PlanError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llmir-onnx-plan"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SliceBinding:
    """How one tensor of the original model maps onto one rank's tensor."""

    original: str
    local: str
    dim: int | None
    start: int
    stop: int

    def take(self, full: Any) -> Any:
        """This rank's part of the full (original) array."""
        if self.dim is None:
            return full
        index = [slice(None)] * full.ndim
        index[self.dim] = slice(self.start, self.stop)
        return full[tuple(index)]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class RankEntry:
    rank: int
    coords: dict[str, int]
    file: str
    sha256: str
    inputs: list[SliceBinding]
    outputs: list[SliceBinding]
    layers: list[int] | None = None
    data_files: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    source: dict[str, str]
    mesh: dict[str, Any]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ranks: list[RankEntry]
    options: dict[str, Any] = field(default_factory=dict)
    sharding: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def world_size(self) -> int:
        return int(self.mesh["world_size"])

    def rank_entry(self, rank: int) -> RankEntry:
        for entry in self.ranks:
            if entry.rank == rank:
                return entry
        raise PlanError(f"the manifest has no rank {rank}; its world size is {self.world_size}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, plan_dir: Path) -> Path:
        path = plan_dir / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, plan_dir: str | Path) -> Manifest:
        path = Path(plan_dir) / MANIFEST_NAME
        if not path.is_file():
            raise PlanError(f"{str(path)!r} does not exist; pass a folder written by `llmir-onnx partition`")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise PlanError(f"{str(path)!r} is not valid JSON ({error}); partition the model again") from error
        if raw.get("format") != MANIFEST_FORMAT or raw.get("version") != MANIFEST_VERSION:
            raise PlanError(
                f"{str(path)!r} is not a version-{MANIFEST_VERSION} {MANIFEST_FORMAT} manifest "
                f"(format={raw.get('format')!r}, version={raw.get('version')!r}); partition the model again"
            )
        ranks = [
            RankEntry(
                rank=entry["rank"],
                coords=entry["coords"],
                file=entry["file"],
                sha256=entry["sha256"],
                inputs=[SliceBinding(**binding) for binding in entry["inputs"]],
                outputs=[SliceBinding(**binding) for binding in entry["outputs"]],
                layers=entry.get("layers"),
                data_files=entry.get("data_files", []),
                memory=entry.get("memory", {}),
                cost=entry.get("cost", {}),
            )
            for entry in raw["ranks"]
        ]
        return cls(
            source=raw["source"],
            mesh=raw["mesh"],
            inputs=[TensorInfo(**info) for info in raw["inputs"]],
            outputs=[TensorInfo(**info) for info in raw["outputs"]],
            ranks=ranks,
            options=raw.get("options", {}),
            sharding=raw.get("sharding", {}),
        )
