"""The plan manifest: a versioned JSON file that says what each rank runs and how to feed it.

It is meant to be enough for another runtime to use a plan without this package: the mesh, each
rank's model file with its digest, and for every input and output of the ORIGINAL model which
slice each rank holds (`dim`, `start`, `stop`; `dim` null means the rank holds the whole tensor).

Schema version 3 (all keys always present):

    format            "llmir-onnx-plan"
    version           3
    source            {"path": str (absolute at partition time), "sha256": str}
    mesh              {"tp": int, "pp": int, "cp": int, "world_size": int,
                       "groups": {"tp": [[rank, ...], ...], "pp": [[rank, ...], ...]}}
                      with --cp (cp > 1) also "groups"."cp" and "kv_cache": "replicated over cp" (every
                      cp rank holds and returns the whole cache; the prompt's tokens are split); an
                      external runtime feeds every cp rank the same whole inputs, as every tp rank.
                      With --cp-kv-cache sharded, "kv_cache": "sharded over cp (sequence)" and
                      "kv_cache_block": B = ceil(max_seq / cp): cp rank r holds the cache's global
                      positions [r*B, (r+1)*B) (short or empty past the cache's end); its `past.*`
                      inputs and `present.*` outputs are its own run (the bindings' sequence dim is not
                      sliced statically: a runtime feeds each cp rank the present that rank returned;
                      `cp_cache_runs` gives the runs of a whole cache fed from outside). A step whose
                      total length passes max_seq fails in the rank models (no block holds it).
    options           the partition options used (free-form, informative)
    inputs, outputs   the original model's [{"name", "dtype", "shape"}]; shape entries are ints or
                      strings (symbolic dims)
    files             {name: {"size": int, "blake3": str}} for EVERY file of the plan besides the
                      manifest (rank models, their data files), sorted by name; names are plain file
                      names inside the plan folder. `llmir-onnx check` and every runtime entry point
                      compare the files against these before a rank starts. The digest is BLAKE3
                      (256-bit, lowercase hex: `b3sum`'s output) of the whole file.
    ranks             [{"rank", "coords": {"pp", "cp", "tp"}, "file": its model, a key of `files`,
                        "layers": [first, stop) decoder layers of its pipeline stage, or null (all),
                        "data_files": the external data files its model references, keys of `files`:
                                      its own `rankN.onnx.data` and its stage's
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

Version 2 (issue 12 until issue 16) is version 3 with sha256 instead of BLAKE3 (`files`: {name: {"size",
"sha256"}}): such a plan is still read and its files checked with sha256. BLAKE3 costs half the CPU per
byte, and a partition hashes every byte it writes (llmir_onnx/digest.py).

Version 1 (until issue 12) hashed the rank models only, not their data files: such a plan is refused
with a request to partition again (its data files cannot be checked).

Graph outputs of a rank model that no binding names (e.g. `llmir.sent.<tag>`, the element counts
of Send nodes) are bookkeeping: a runtime may fetch them or not. Byte counts are exact for weights
and the KV cache; activation peaks and times are estimates (see plan/memory.py and plan/cost.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, TypeVar, overload

from llmir_onnx.digest import HEX_DIGITS, FileDigest
from llmir_onnx.errors import PlanError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llmir-onnx-plan"
MANIFEST_VERSION = 3
# The digest each version's `files` record (the versions still read); new plans are MANIFEST_VERSION's.
FILE_DIGEST_BY_VERSION = {2: "sha256", 3: "blake3"}

T = TypeVar("T")

# mesh["kv_cache"] of a cp plan, by the partition's cp_kv_cache layout.
KV_CACHE_REPLICATED_OVER_CP = "replicated over cp"
KV_CACHE_SHARDED_OVER_CP = "sharded over cp (sequence)"
CP_KV_CACHE_DESCRIPTIONS = {"replicated": KV_CACHE_REPLICATED_OVER_CP, "sharded": KV_CACHE_SHARDED_OVER_CP}


def cp_cache_runs(tokens: int, cp: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) of a whole cache of `tokens` tokens held by each cp rank of a sequence-sharded cache, in
    cp-rank order: rank r holds the global positions [r*block, (r+1)*block) (mesh["kv_cache_block"], ceil(max_seq /
    cp)), short or empty past the cache's end. The rank models keep new tokens by the same rule, so this is
    how a runtime splits a cache it is given whole (verify's feeds)."""
    if tokens > cp * block:
        raise PlanError(
            f"a KV cache of {tokens} tokens does not fit a cache sharded over cp {cp} in blocks of {block} tokens "
            f"({cp * block} in all, from --max-seq); partition with a larger --max-seq"
        )
    return [(min(r * block, tokens), min((r + 1) * block, tokens)) for r in range(cp)]


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
    inputs: list[SliceBinding]
    outputs: list[SliceBinding]
    layers: list[int] | None = None
    data_files: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[str]:
        """Every plan file this rank's session reads: its model, then its data files."""
        return [self.file, *self.data_files]


@dataclass(frozen=True)
class Manifest:
    source: dict[str, str]
    mesh: dict[str, Any]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ranks: list[RankEntry]
    files: dict[str, FileDigest] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    sharding: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def world_size(self) -> int:
        return int(self.mesh["world_size"])

    @property
    def cp_sharded_cache(self) -> bool:
        """Each cp rank holds its own run of the KV cache's tokens (--cp-kv-cache sharded)."""
        return self.mesh.get("kv_cache") == KV_CACHE_SHARDED_OVER_CP

    @property
    def cp_cache_block(self) -> int:
        """B, the tokens of each cp rank's block of a KV cache sharded over cp (mesh["kv_cache_block"])."""
        block = self.mesh.get("kv_cache_block")
        if not isinstance(block, int) or block < 1:
            raise PlanError(
                "this plan's KV cache is sharded over cp but its manifest has no mesh.kv_cache_block (a plan made "
                "before the cache's fixed blocks, whose ranks keep tokens by another rule): partition it again"
            )
        return block

    def check_cache_tokens(self, tokens: int, what: str) -> None:
        """Refuse, before any rank starts, a step of `tokens` tokens in all (past and new) that a KV cache
        sharded over cp cannot hold: past the plan's max_seq (the rank models would fail on it too)."""
        if not self.cp_sharded_cache:
            return
        max_seq = int(self.options["max_seq"])
        if tokens > max_seq:
            raise PlanError(
                f"{what} holds {tokens} tokens, more than the --max-seq {max_seq} this plan's KV cache sharded over "
                f"cp holds (cp rank r keeps positions [r*B, (r+1)*B), B = {self.cp_cache_block}); partition "
                f"with --max-seq {tokens} or more"
            )

    def rank_entry(self, rank: int) -> RankEntry:
        for entry in self.ranks:
            if entry.rank == rank:
                return entry
        raise PlanError(f"the manifest has no rank {rank}; its world size is {self.world_size}")

    def to_document(self) -> dict[str, Any]:
        """The manifest as manifest.json holds it (also what `partition --json` prints)."""
        raw = asdict(self)
        # One key per file naming its digest's algorithm ({"size", "blake3"}; a version-2 plan read: "sha256").
        raw["files"] = {
            name: {"size": self.files[name].size, self.files[name].algorithm: self.files[name].hexdigest}
            for name in sorted(self.files)
        }
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_document(), indent=2, sort_keys=False) + "\n"

    def write(self, plan_dir: Path) -> Path:
        path = plan_dir / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, plan_dir: str | Path) -> Manifest:
        """The manifest of `plan_dir`, checked key by key: a missing key or a wrong type is a PlanError naming it."""
        path = Path(plan_dir) / MANIFEST_NAME
        if not path.is_file():
            raise PlanError(f"{str(path)!r} does not exist; pass a folder written by `llmir-onnx partition`")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PlanError(f"{str(path)!r} is not valid JSON ({error}); partition the model again") from error
        readable = raw.get("version") in FILE_DIGEST_BY_VERSION if isinstance(raw, dict) else False
        if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT or not readable:
            found = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else (None, None)
            versions = " or ".join(str(version) for version in sorted(FILE_DIGEST_BY_VERSION))
            raise PlanError(
                f"{str(path)!r} is not a version-{versions} {MANIFEST_FORMAT} manifest "
                f"(format={found[0]!r}, version={found[1]!r}); partition the model again"
            )
        return _ManifestReader(str(path)).manifest(raw)


def plan_file_name_error(name: str) -> str | None:
    """Why `name` cannot be a file of a plan folder (None when it can): plan files are plain names in it."""
    pure = PurePath(name)
    if not name or pure.is_absolute() or len(pure.parts) != 1 or pure.name in (".", ".."):
        return f"{name!r} is not a plain file name inside the plan folder"
    return None


class _ManifestReader:
    """Reads the manifest's JSON into its dataclasses; every error names the key (a JSON path) and the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> PlanError:
        return PlanError(f"{self.path!r}: key {key!r} {problem}; partition the model again")

    @overload
    def get(self, obj: dict[str, Any], key: str, kind: type[T], where: str) -> T: ...
    @overload
    def get(self, obj: dict[str, Any], key: str, kind: tuple[type, ...], where: str) -> Any: ...
    def get(self, obj: dict[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise self.fail(name, "is missing")
        value = obj[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON has no int/bool distinction in Python's reading: true is not a count.
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise self.fail(name, f"should be {names}, not {type(value).__name__} {json.dumps(value)[:40]}")
        return value

    def file_name(self, name: str, where: str) -> str:
        problem = plan_file_name_error(name)
        if problem is not None:
            raise self.fail(where, f"names {problem}")
        return name

    def binding(self, raw: Any, where: str) -> SliceBinding:
        if not isinstance(raw, dict):
            raise self.fail(where, "should be an object")
        return SliceBinding(
            original=self.get(raw, "original", str, where),
            local=self.get(raw, "local", str, where),
            dim=self.get(raw, "dim", (int, type(None)), where),
            start=self.get(raw, "start", int, where),
            stop=self.get(raw, "stop", int, where),
        )

    def bindings(self, raw: dict[str, Any], key: str, where: str) -> list[SliceBinding]:
        items = self.get(raw, key, list, where)
        return [self.binding(item, f"{where}.{key}[{index}]") for index, item in enumerate(items)]

    def tensor_info(self, raw: Any, where: str) -> TensorInfo:
        if not isinstance(raw, dict):
            raise self.fail(where, "should be an object")
        shape = self.get(raw, "shape", list, where)
        for index, dim in enumerate(shape):
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise self.fail(f"{where}.shape[{index}]", "should be int or str")
        return TensorInfo(self.get(raw, "name", str, where), self.get(raw, "dtype", str, where), shape)

    def rank(self, raw: Any, where: str, files: dict[str, FileDigest]) -> RankEntry:
        if not isinstance(raw, dict):
            raise self.fail(where, "should be an object")
        coords = self.get(raw, "coords", dict, where)
        for axis in ("pp", "cp", "tp"):
            self.get(coords, axis, int, f"{where}.coords")
        file = self.file_name(self.get(raw, "file", str, where), f"{where}.file")
        data_files = []
        for index, name in enumerate(self.get(raw, "data_files", list, where)):
            if not isinstance(name, str):
                raise self.fail(f"{where}.data_files[{index}]", "should be str")
            data_files.append(self.file_name(name, f"{where}.data_files[{index}]"))
        for key, name in [(f"{where}.file", file)] + [
            (f"{where}.data_files[{index}]", name) for index, name in enumerate(data_files)
        ]:
            if name not in files:
                raise self.fail(key, f"names {name!r}, which `files` does not list")
        layers: list[int] | None = self.get(raw, "layers", (list, type(None)), where)
        return RankEntry(
            rank=self.get(raw, "rank", int, where),
            coords=coords,
            file=file,
            inputs=self.bindings(raw, "inputs", where),
            outputs=self.bindings(raw, "outputs", where),
            layers=layers,
            data_files=data_files,
            memory=self.get(raw, "memory", dict, where),
            cost=self.get(raw, "cost", dict, where),
        )

    def files(self, raw: dict[str, Any]) -> dict[str, FileDigest]:
        algorithm = FILE_DIGEST_BY_VERSION[raw["version"]]
        files = {}
        for name, digest in self.get(raw, "files", dict, "").items():
            where = f"files.{name}"
            self.file_name(name, where)
            if not isinstance(digest, dict):
                raise self.fail(where, "should be an object")
            size = self.get(digest, "size", int, where)
            hexdigest = self.get(digest, algorithm, str, where)
            if size < 0 or len(hexdigest) != HEX_DIGITS or any(c not in "0123456789abcdef" for c in hexdigest):
                raise self.fail(where, f"should hold a size >= 0 and a {HEX_DIGITS}-digit lowercase hex {algorithm}")
            files[name] = FileDigest(size, hexdigest, algorithm)
        return files

    def manifest(self, raw: dict[str, Any]) -> Manifest:
        mesh = self.get(raw, "mesh", dict, "")
        world_size = self.get(mesh, "world_size", int, "mesh")
        files = self.files(raw)
        source = self.get(raw, "source", dict, "")
        self.get(source, "path", str, "source")
        self.get(source, "sha256", str, "source")
        ranks = [self.rank(entry, f"ranks[{i}]", files) for i, entry in enumerate(self.get(raw, "ranks", list, ""))]
        if sorted(entry.rank for entry in ranks) != list(range(world_size)):
            raise self.fail("ranks", f"should hold ranks 0 to {world_size - 1} once each (mesh.world_size)")
        return Manifest(
            source=source,
            mesh=mesh,
            inputs=[self.tensor_info(t, f"inputs[{i}]") for i, t in enumerate(self.get(raw, "inputs", list, ""))],
            outputs=[self.tensor_info(t, f"outputs[{i}]") for i, t in enumerate(self.get(raw, "outputs", list, ""))],
            ranks=ranks,
            files=files,
            options=self.get(raw, "options", dict, ""),
            sharding=self.get(raw, "sharding", dict, "") if "sharding" in raw else {},
            version=raw["version"],
        )
