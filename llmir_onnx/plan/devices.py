"""Device descriptions for the cost model: built-in profiles and user JSON files.

A profile is what the roofline + alpha-beta model needs. JSON schema (every key required unless a
default is given; numbers are SI units: bytes, bytes per second, FLOP per second, seconds)::

    {
      "name": "my-gpu",                          // str
      "memory_bytes": 85899345920,               // int: memory of one device
      "peak_flops": {"float16": 9.89e14,         // dense FLOP/s by element type name (onnx_ir
                     "bfloat16": 9.89e14,        //   DataType names, lower case); types not
                     "float32": 6.7e13},         //   listed use "float32"'s entry
      "memory_bandwidth": 3.35e12,               // bytes/s of device memory
      "link_bandwidth": 4.5e11,                  // bytes/s per direction between two ranks
      "link_latency": 1e-05,                     // s, the alpha of one collective or send
      "node_overhead": 5e-06,                    // s per graph node (kernel launch / dispatch)
      "run_overhead": 1.5e-04,                   // s per session run, once (default 0; see below)
      "compute_efficiency": 0.7,                 // fraction of peak_flops matmuls reach (default 1)
      "memory_efficiency": 0.8,                  // fraction of memory_bandwidth reached (default 1;
                                                 //   applies to cache_bandwidth too)
      "cache_bytes": 52428800,                   // int: the last-level cache (default 0: no cache)
      "cache_bandwidth": 9.4e12,                 // bytes/s of that cache (required with cache_bytes > 0)
      "weight_bandwidth": [[65536, 1.1e10],      // [weight bytes, bytes/s]: how fast a MatMul / Gemm
                           [268435456, 1.5e10]], //   reads a weight of that size (default []: at
                                                 //   memory_bandwidth whatever its size)
      "description": "where the numbers come from",  // str (default "")
      "devices_per_host": 8,                     // devices in one host (default 8; null: one host
                                                 //   holds any number, as processes on one machine)
      "host_link": "infiniband-ndr"              // the link to other hosts, a LINKS name (default)
    }

`cache_bytes` / `cache_bandwidth` are the last-level cache (a GPU's L2, a CPU's L3): the cost model
charges an activation that fits in part of it at `cache_bandwidth` (`llmir_onnx.plan.cost`,
`memory_seconds`). A profile without them (every profile file written before they existed) has no
cache: every byte is charged at `memory_bandwidth`, as before. Giving one without the other is an error.

`weight_bandwidth` is the rate at which a MatMul / Gemm streams a weight (an initializer) of a given size,
measured at a few sizes (`bench/calibrate_cpu.py`: chains of [1, k] x W[k, k] with distinct weights, more
of them than the last-level cache holds, so each is read from memory; the node overhead taken off; each
size relative to the 256 MiB matrix-vector product timed beside it), for a machine where a small
matrix-vector product does not reach the large one's rate (its fixed costs and the prefetcher's ramp are
spread over fewer bytes; the development VM showed none for square weights, docs/BENCHMARKS.md).
Between two sizes the rate is interpolated linearly in log(size); below the smallest and above the
largest the end points' rates hold (`weight_bytes_per_second`). The memory efficiency applies to it as to
`memory_bandwidth`. A profile without it (every profile written before it
existed, and the GPU profiles, for which no such measure was made) reads weights at `memory_bandwidth`.

`run_overhead` is what a run costs once, beyond its nodes: the runtime's code and per-run state fetched
back into the caches at the start of a run (`bench/calibrate_cpu.py`: a 1-node graph's run right after 2 x
the last-level cache of other data streamed through, less the same run back to back). A rank's run starts
cold: between two of its runs the other ranks sharing its cores, the caller's own work and the step's
weights (a real model's decode step reads more weights than the cache holds) evict what the last run left
(docs/BENCHMARKS.md, "A rank's decode step starts cold"). `node_overhead` is measured back to back, warm.
A profile without it (every profile written before it existed, and the GPU profiles) charges 0.

`link_bandwidth` / `link_latency` are the link between two devices of one host (NVLink for the GPU
profiles); `host_link` names the link between hosts (`LINKS`: NVLink, PCIe, InfiniBand, RoCE,
Ethernet; sources in docs/PLANNING.md).

A cluster (`Cluster`, `parse_devices`) is a list of devices in rank order, each with its profile, its
memory and its host; ranks are placed host-major (rank r runs on the r-th device, and a host's devices
are consecutive), so the tp groups of the mesh (consecutive ranks, mesh.py) stay inside a host whenever
tp divides the host's size. `Cluster.group_link` is the link a collective or Send/Recv among some ranks
runs at: the slowest link the group spans.

Built-in: `h100-sxm`, `a100-80g` (vendor datasheet peaks, dense, no sparsity, with typical achieved
fractions) and `cpu-here` (this project's 2-core development VM, calibrated single-threaded with
`bench/calibrate_cpu.py` on onnxruntime's kernels; method and figures in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llmir_onnx.errors import PlanError
from llmir_onnx.mesh import DeviceMesh, MeshCoords
from llmir_onnx.plan.memory import format_bytes, parse_bytes

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int
    peak_flops: dict[str, float]
    memory_bandwidth: float
    link_bandwidth: float
    link_latency: float
    node_overhead: float
    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    description: str = field(default="", compare=False)
    devices_per_host: int | None = 8
    host_link: str = "infiniband-ndr"
    # The last-level cache (a GPU's L2, a CPU's L3): its size and bandwidth. 0: no cache, every byte is
    # charged at memory_bandwidth (profiles written before these fields existed).
    cache_bytes: int = 0
    cache_bandwidth: float = 0.0
    # (weight bytes, bytes/s) by increasing size: how fast a MatMul / Gemm reads a weight of that size
    # (module docstring). (): every weight at memory_bandwidth (profiles written before this field existed).
    weight_bandwidth: tuple[tuple[int, float], ...] = ()
    # Seconds a run costs once beyond its nodes: the runtime's code and state fetched back into cold caches
    # (module docstring). 0: not charged (profiles written before this field existed, the GPU profiles).
    run_overhead: float = 0.0

    def flops_per_second(self, dtype: str) -> float:
        """Achievable FLOP/s for arithmetic in `dtype` (falls back to float32's peak)."""
        peak = self.peak_flops.get(dtype, self.peak_flops.get("float32"))
        if peak is None:
            raise PlanError(f"device profile {self.name!r} has no peak_flops for {dtype!r} nor for 'float32'")
        return peak * self.compute_efficiency

    @property
    def bytes_per_second(self) -> float:
        return self.memory_bandwidth * self.memory_efficiency

    @property
    def cache_bytes_per_second(self) -> float:
        """Achievable bytes/s of the last-level cache (the memory efficiency applies to it too); 0 without one."""
        return self.cache_bandwidth * self.memory_efficiency

    def weight_bytes_per_second(self, size: float) -> float:
        """Achievable bytes/s of a MatMul / Gemm reading a weight of `size` bytes: `weight_bandwidth`
        interpolated linearly in log(size), the end points' rates beyond them; `bytes_per_second` without it."""
        curve = self.weight_bandwidth
        if not curve:
            return self.bytes_per_second
        if size <= curve[0][0]:
            rate = curve[0][1]
        elif size >= curve[-1][0]:
            rate = curve[-1][1]
        else:
            upper = next(i for i, (bytes_, _) in enumerate(curve) if bytes_ >= size)
            (low_size, low_rate), (high_size, high_rate) = curve[upper - 1], curve[upper]
            position = math.log(size / low_size) / math.log(high_size / low_size)
            rate = low_rate + position * (high_rate - low_rate)
        return rate * self.memory_efficiency

    @property
    def intra_host_link(self) -> LinkProfile:
        """The link between two devices of this profile in one host (`link_bandwidth`, `link_latency`)."""
        return LinkProfile(f"{self.name} peer link", self.link_bandwidth, self.link_latency)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


@dataclass(frozen=True)
class LinkProfile:
    """A link as the alpha-beta model sees it: bytes/s per direction per device, and the alpha (s)."""

    name: str
    bandwidth: float
    latency: float
    description: str = field(default="", compare=False)


# Vendor datasheet peaks (no network here: written from knowledge of the datasheets, see
# docs/PLANNING.md for each source). Bandwidth is per device per direction: a DGX-class host gives
# each GPU its own NIC, so a collective across hosts moves each rank's share over its own NIC. The
# alpha is what one NCCL/MPI operation costs end to end (software, not the wire's sub-microsecond
# latency): ~10 us inside a host, ~20 us across an RDMA fabric, ~50 us over TCP Ethernet.
LINKS: dict[str, LinkProfile] = {
    link.name: link
    for link in (
        LinkProfile("nvlink4", 450e9, 10e-6, "NVLink 4 (H100 SXM5): 900 GB/s bidirectional per GPU via NVSwitch"),
        LinkProfile("nvlink3", 300e9, 10e-6, "NVLink 3 (A100 SXM4): 600 GB/s bidirectional per GPU via NVSwitch"),
        LinkProfile("pcie4-x16", 32e9, 15e-6, "PCIe 4.0 x16: 16 GT/s x 16 lanes, ~32 GB/s per direction"),
        LinkProfile("pcie5-x16", 64e9, 15e-6, "PCIe 5.0 x16: 32 GT/s x 16 lanes, ~64 GB/s per direction"),
        LinkProfile("infiniband-ndr", 50e9, 20e-6, "InfiniBand NDR 400 Gb/s per GPU (ConnectX-7, DGX H100)"),
        LinkProfile("infiniband-hdr", 25e9, 20e-6, "InfiniBand HDR 200 Gb/s per GPU (ConnectX-6, DGX A100)"),
        LinkProfile("roce-400g", 50e9, 25e-6, "RoCE v2 over 400 GbE per GPU (ConnectX-7 / BlueField-3)"),
        LinkProfile("ethernet-100g", 12.5e9, 50e-6, "100 GbE with TCP (NCCL socket transport), per host"),
        LinkProfile("ethernet-25g", 3.125e9, 50e-6, "25 GbE with TCP, per host"),
    )
}
# Two devices of different profiles in one host have no NVLink between them: PCIe.
MIXED_HOST_LINK = "pcie4-x16"


# Calibrated on the development VM (AMD EPYC with AVX-512, 2 cores, shared) with bench/calibrate_cpu.py
# on 2026-11-26, one thread, best of 15 runs, with onnxruntime's own kernels (the runtime the model
# predicts): float32 MatMul up to 255-260 GFLOP/s, MatMul [1, 8192] x W[8192, 8192] streaming W at
# 34-36 GB/s, float16 MatMul n = 1024 up to 154 GFLOP/s, dispatch 0.18 us per node. numpy (OpenBLAS)
# reaches only 131-135 GFLOP/s here, which would predict prefill 1.8x too slow; its figures are kept
# in bench/profiles/cpu-here-numpy.json. Links: mpi4py allreduce of 16 MB at 2 ranks took 3.2-3.7 ms
# (FACTS.md), about 4.6 GB/s with the ring factor 2(n-1)/n = 1. Details: docs/BENCHMARKS.md.
CPU_HERE = DeviceProfile(
    name="cpu-here",
    memory_bytes=24 * GiB,
    peak_flops={"float32": 2.6e11, "float16": 1.54e11},
    memory_bandwidth=3.5e10,
    link_bandwidth=4.6e9,
    link_latency=3.0e-5,
    node_overhead=1.8e-7,
    description="2-core x86_64 Debian 12 VM, one onnxruntime thread per rank; see docs/BENCHMARKS.md",
    devices_per_host=None,  # ranks are processes on one machine
    host_link="ethernet-25g",
    # The L3 as /sys/devices/system/cpu/cpu0/cache lists it (32 MiB, shared by the 2 cores), and its
    # bandwidth by bench/calibrate_cpu.py on 2026-12-03 22:38 UTC (best of 15: a chain of Mul on a 4 MiB
    # float32 activation, 46.6 GB/s). The machine ran the same micro-benchmarks 2-3x slower then than on
    # 2026-11-26 (MatMul 91 against 260 GFLOP/s, matrix-vector 15.2 against 35.9 GB/s), so this figure is
    # likely low beside the others: it under-states the cache's gain, never over-states it.
    cache_bytes=32 * MiB,
    cache_bandwidth=4.66e10,
)

H100_SXM = DeviceProfile(
    name="h100-sxm",
    memory_bytes=80 * GiB,
    peak_flops={"float16": 989.4e12, "bfloat16": 989.4e12, "float32": 66.9e12, "int8": 1978.9e12},
    memory_bandwidth=3.35e12,
    link_bandwidth=450e9,  # NVLink 4: 900 GB/s bidirectional per GPU
    link_latency=10e-6,
    node_overhead=5e-6,
    compute_efficiency=0.7,
    memory_efficiency=0.8,
    description="NVIDIA H100 SXM5 80GB datasheet (dense), NVLink 4 / NVSwitch; typical achieved fractions",
    # H100 whitepaper: 50 MB L2 (CUDA reports 52428800 bytes). NVIDIA publishes no L2 bandwidth for H100:
    # estimated as A100's 5120 bytes/clock at the 1.83 GHz that the FP16 peak implies (989.4e12 / (132 SMs x
    # 4096 FLOP/clock)); docs/PLANNING.md.
    cache_bytes=50 * MiB,
    cache_bandwidth=9.4e12,
)

A100_80G = DeviceProfile(
    name="a100-80g",
    memory_bytes=80 * GiB,
    peak_flops={"float16": 312e12, "bfloat16": 312e12, "float32": 19.5e12, "int8": 624e12},
    memory_bandwidth=2.039e12,
    link_bandwidth=300e9,  # NVLink 3: 600 GB/s bidirectional per GPU
    link_latency=10e-6,
    node_overhead=5e-6,
    compute_efficiency=0.7,
    memory_efficiency=0.8,
    description="NVIDIA A100 SXM4 80GB datasheet (dense), NVLink 3 / NVSwitch; typical achieved fractions",
    host_link="infiniband-hdr",
    # A100 whitepaper: 40 MB L2 (CUDA reports 41943040 bytes), read bandwidth 5120 bytes/clock at the
    # 1410 MHz boost clock (2.3x V100's 2048 bytes/clock at 1530 MHz, as the whitepaper says); docs/PLANNING.md.
    cache_bytes=40 * MiB,
    cache_bandwidth=7.2e12,
)

BUILTIN_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (H100_SXM, A100_80G, CPU_HERE)}

_REQUIRED = (
    "name",
    "memory_bytes",
    "peak_flops",
    "memory_bandwidth",
    "link_bandwidth",
    "link_latency",
    "node_overhead",
)


def profile_from_dict(raw: dict[str, Any], source: str = "<dict>") -> DeviceProfile:
    known = {f.name for f in fields(DeviceProfile)}
    missing = [key for key in _REQUIRED if key not in raw]
    unknown = sorted(set(raw) - known)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown {', '.join(unknown)}")
        raise PlanError(
            f"device profile {source}: {'; '.join(problems)}; see llmir_onnx/plan/devices.py for the schema"
        )
    if not isinstance(raw["peak_flops"], dict) or not raw["peak_flops"]:
        raise PlanError(f'device profile {source}: peak_flops must be an object like {{"float16": 9.89e14}}')
    for key in ("memory_bytes", "memory_bandwidth", "link_bandwidth"):
        if not isinstance(raw[key], (int, float)) or raw[key] <= 0:
            raise PlanError(f"device profile {source}: {key} must be a positive number, got {raw[key]!r}")
    for key in ("link_latency", "node_overhead"):
        if not isinstance(raw[key], (int, float)) or raw[key] < 0:
            raise PlanError(f"device profile {source}: {key} must be a number >= 0, got {raw[key]!r}")
    per_host = raw.get("devices_per_host", 8)
    if per_host is not None and not (isinstance(per_host, int) and per_host >= 1):
        raise PlanError(f"device profile {source}: devices_per_host must be an integer >= 1 or null, got {per_host!r}")
    host_link = raw.get("host_link", "infiniband-ndr")
    if host_link not in LINKS:
        raise PlanError(f"device profile {source}: host_link {host_link!r} is not one of {', '.join(LINKS)}")
    for key in ("compute_efficiency", "memory_efficiency"):
        if key in raw and not (isinstance(raw[key], (int, float)) and 0 < raw[key] <= 1):
            raise PlanError(f"device profile {source}: {key} must be in (0, 1], got {raw[key]!r}")
    cache_bytes = raw.get("cache_bytes", 0)
    cache_bandwidth = raw.get("cache_bandwidth", 0.0)
    if not (isinstance(cache_bytes, int) and not isinstance(cache_bytes, bool) and cache_bytes >= 0):
        raise PlanError(f"device profile {source}: cache_bytes must be an integer >= 0, got {cache_bytes!r}")
    if not (isinstance(cache_bandwidth, (int, float)) and cache_bandwidth >= 0):
        raise PlanError(f"device profile {source}: cache_bandwidth must be a number >= 0, got {cache_bandwidth!r}")
    if (cache_bytes > 0) != (cache_bandwidth > 0):
        named, absent = ("cache_bytes", "cache_bandwidth") if cache_bytes > 0 else ("cache_bandwidth", "cache_bytes")
        raise PlanError(
            f"device profile {source}: {named} without {absent}; give both (the last-level cache's size and "
            "bandwidth) or neither (no cache: every byte at memory_bandwidth)"
        )
    weight_bandwidth = _weight_bandwidth_from(raw.get("weight_bandwidth", []), source)
    run_overhead = raw.get("run_overhead", 0.0)
    if not (isinstance(run_overhead, (int, float)) and not isinstance(run_overhead, bool) and run_overhead >= 0):
        raise PlanError(f"device profile {source}: run_overhead must be a number of seconds >= 0, got {run_overhead!r}")
    flops = {}
    for dtype, value in raw["peak_flops"].items():
        if not isinstance(value, (int, float)) or value <= 0:
            raise PlanError(f"device profile {source}: peak_flops[{dtype!r}] must be a positive number")
        flops[str(dtype)] = float(value)
    return DeviceProfile(
        name=str(raw["name"]),
        memory_bytes=int(raw["memory_bytes"]),
        peak_flops=flops,
        memory_bandwidth=float(raw["memory_bandwidth"]),
        link_bandwidth=float(raw["link_bandwidth"]),
        link_latency=float(raw["link_latency"]),
        node_overhead=float(raw["node_overhead"]),
        compute_efficiency=float(raw.get("compute_efficiency", 1.0)),
        memory_efficiency=float(raw.get("memory_efficiency", 1.0)),
        description=str(raw.get("description", "")),
        devices_per_host=per_host,
        host_link=str(host_link),
        cache_bytes=cache_bytes,
        cache_bandwidth=float(cache_bandwidth),
        weight_bandwidth=weight_bandwidth,
        run_overhead=float(run_overhead),
    )


def _weight_bandwidth_from(raw: Any, source: str) -> tuple[tuple[int, float], ...]:
    """The `weight_bandwidth` of a profile file: [[bytes, bytes/s], ...], sizes increasing."""
    example = "like [[65536, 1.1e10], [268435456, 1.5e10]]"
    if not isinstance(raw, (list, tuple)):
        raise PlanError(f"device profile {source}: weight_bandwidth must be a list of [bytes, bytes/s] pairs {example}")
    points: list[tuple[int, float]] = []
    for point in raw:
        ok = isinstance(point, (list, tuple)) and len(point) == 2
        size, rate = point if ok else (None, None)
        if not (ok and isinstance(size, int) and not isinstance(size, bool) and size > 0
                and isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0):  # fmt: skip
            raise PlanError(
                f"device profile {source}: weight_bandwidth entry {point!r} is not a [bytes, bytes/s] pair of positive "
                f"numbers (bytes an integer); write it {example}"
            )
        if points and size <= points[-1][0]:
            raise PlanError(
                f"device profile {source}: weight_bandwidth sizes must increase, got {size} after {points[-1][0]}"
            )
        points.append((size, float(rate)))
    return tuple(points)


def load_profile(spec: str | os.PathLike) -> DeviceProfile:
    """A built-in profile by name, or a JSON file by path."""
    text = str(spec)
    if text in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[text]
    path = Path(text)
    if not path.is_file():
        raise PlanError(
            f"--device {text!r} is neither a built-in profile ({', '.join(sorted(BUILTIN_PROFILES))}) "
            "nor a JSON file; pass one of those names or the path of a profile file"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"device profile {str(path)!r} is not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise PlanError(f"device profile {str(path)!r} must hold a JSON object")
    return profile_from_dict(raw, repr(str(path)))


@dataclass(frozen=True)
class DeviceSlot:
    """One device of a cluster: what it is, how much memory it offers the plan, which host holds it."""

    profile: DeviceProfile
    memory_bytes: int
    host: str


@dataclass(frozen=True)
class Cluster:
    """Devices in rank order (rank r runs on `devices[r]`), a host's devices consecutive."""

    devices: tuple[DeviceSlot, ...]
    spec: str = ""  # what the user wrote, for messages and the manifest

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(slot.host for slot in self.devices))

    @property
    def uniform(self) -> bool:
        """One profile and one memory size for every device."""
        return len({(slot.profile.name, slot.memory_bytes) for slot in self.devices}) == 1

    def first(self, count: int) -> Cluster:
        """The first `count` devices (a layout that uses fewer devices than the cluster has)."""
        return Cluster(self.devices[:count], self.spec)

    def group_link(self, ranks: tuple[int, ...] | list[int]) -> tuple[LinkProfile, int]:
        """(the slowest link the ranks span, how many hosts they span).

        Inside one host: the profile's own link (NVLink), or PCIe when the host mixes profiles.
        Across hosts: the slowest `host_link` of the ranks' profiles.
        """
        slots = [self.devices[r] for r in ranks]
        by_host: dict[str, dict[str, DeviceProfile]] = {}  # host -> profile name -> profile
        for slot in slots:
            by_host.setdefault(slot.host, {})[slot.profile.name] = slot.profile
        spanned: list[LinkProfile] = []
        for profiles in by_host.values():
            if len(profiles) > 1:
                spanned.append(LINKS[MIXED_HOST_LINK])
            elif len(slots) > 1:
                spanned.append(next(iter(profiles.values())).intra_host_link)
        if len(by_host) > 1:
            spanned.extend(LINKS[slot.profile.host_link] for slot in slots)
        if not spanned:
            return slots[0].profile.intra_host_link, 1
        slowest = min(spanned, key=lambda link: (link.bandwidth, -link.latency))
        return slowest, len(by_host)

    def describe(self) -> str:
        """'16 devices on 2 hosts: 8 x h100-sxm (80.00 GiB), 8 x a100-80g (80.00 GiB)'."""
        runs: list[list[Any]] = []
        for slot in self.devices:
            if runs and runs[-1][1] == slot.profile.name and runs[-1][2] == slot.memory_bytes:
                runs[-1][0] += 1
            else:
                runs.append([1, slot.profile.name, slot.memory_bytes])
        parts = ", ".join(f"{count} x {name} ({format_bytes(memory)})" for count, name, memory in runs)
        hosts = len(self.hosts)
        return f"{len(self)} devices on {hosts} host{'s' if hosts > 1 else ''}: {parts}"

    def manifest_entry(self) -> dict[str, Any]:
        """Where each rank runs, for a plan's manifest (`options["devices"]`)."""
        return {
            "spec": self.spec,
            "ranks": [
                {"rank": rank, "profile": slot.profile.name, "memory_bytes": slot.memory_bytes, "host": slot.host}
                for rank, slot in enumerate(self.devices)
            ],
        }


def _fill_hosts(
    profile: DeviceProfile, count: int, per_host: int | None, memory: int, first_host: int
) -> list[DeviceSlot]:
    size = per_host if per_host is not None else profile.devices_per_host
    return [DeviceSlot(profile, memory, f"host{first_host + (i // size if size else 0)}") for i in range(count)]


def uniform_cluster(
    profile: DeviceProfile, count: int, memory_bytes: int | None = None, devices_per_host: int | None = None
) -> Cluster:
    """`count` devices of `profile` in hosts of `devices_per_host` (default: the profile's usual size)."""
    if count < 1:
        raise PlanError(f"--devices {count}: need at least one device")
    memory = profile.memory_bytes if memory_bytes is None else memory_bytes
    return Cluster(tuple(_fill_hosts(profile, count, devices_per_host, memory, 0)), str(count))


_ITEM = re.compile(r"^(?:(\d+)\s*x\s*)?(\S+)$")


def parse_devices(
    spec: str,
    default_profile: str = "h100-sxm",
    *,
    devices_per_host: int | None = None,
    memory_bytes: int | None = None,
) -> Cluster:
    """A cluster from `--devices`: a count (`64`: devices of `default_profile`), a list
    (`8xh100-sxm,8xa100-80g`: each item starts a new host, hosts of `devices_per_host` or the profile's
    usual size) or a JSON file (`cluster_from_json`). `memory_bytes` (--device-memory) replaces each
    device's default memory."""
    text = spec.strip()
    if devices_per_host is not None and devices_per_host < 1:
        raise PlanError(f"--devices-per-host {devices_per_host}: must be at least 1")
    if text.isdigit():
        cluster = uniform_cluster(load_profile(default_profile), int(text), memory_bytes, devices_per_host)
        return Cluster(cluster.devices, text)
    if text.endswith(".json") or Path(text).is_file():
        return cluster_from_json(Path(text), devices_per_host=devices_per_host, memory_bytes=memory_bytes)
    slots: list[DeviceSlot] = []
    for item in text.split(","):
        match = _ITEM.match(item.strip())
        if match is None or not item.strip():
            raise PlanError(
                f"--devices {spec!r}: cannot read {item.strip()!r}; write a count (64), a list such as "
                "8xh100-sxm,8xa100-80g, or the path of a JSON cluster file"
            )
        count = int(match.group(1) or 1)
        if count < 1:
            raise PlanError(f"--devices {spec!r}: {item.strip()!r} has no devices; counts start at 1")
        profile = _profile_for_devices(match.group(2), spec)
        memory = profile.memory_bytes if memory_bytes is None else memory_bytes
        slots.extend(_fill_hosts(profile, count, devices_per_host, memory, len({s.host for s in slots})))
    return Cluster(tuple(slots), text)


def _profile_for_devices(name: str, spec: str) -> DeviceProfile:
    if name in BUILTIN_PROFILES or Path(name).is_file():
        return load_profile(name)
    raise PlanError(
        f"--devices {spec!r}: {name!r} is neither a built-in profile ({', '.join(sorted(BUILTIN_PROFILES))}) "
        "nor a profile JSON file"
    )


def cluster_from_json(path: Path, *, devices_per_host: int | None = None, memory_bytes: int | None = None) -> Cluster:
    """A cluster file::

        {"profiles": {"slow-gpu": {...a profile, schema above...}},     // optional, by name
         "devices": [{"profile": "h100-sxm", "count": 8, "host": "node0", "memory": "80GiB"},
                     {"profile": "slow-gpu", "host": "node1"}]}

    Each entry: `profile` (a built-in, a name from `profiles`, or a profile file), `count` (default
    1), `host` (default: hosts of the profile's usual size, numbered on), `memory` (bytes or "40GiB";
    default the profile's). The entries' order is the rank order; a host's devices must be consecutive.
    """
    where = f"cluster file {str(path)!r}"
    if not path.is_file():
        raise PlanError(
            f"--devices {str(path)!r}: no such file; pass a count, a list such as 2xh100-sxm or a JSON file"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"{where} is not valid JSON ({error})") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("devices"), list) or not raw["devices"]:
        raise PlanError(f'{where} must hold an object with a non-empty "devices" list, e.g. '
                        '{"devices": [{"profile": "h100-sxm", "count": 8}]}')
    unknown = sorted(set(raw) - {"devices", "profiles"})
    if unknown:
        raise PlanError(f"{where}: unknown key {', '.join(unknown)}; the keys are devices and profiles")
    custom = {
        name: profile_from_dict({"name": name, **body}, f"{where} profiles[{name!r}]")
        for name, body in (raw.get("profiles") or {}).items()
    }
    slots: list[DeviceSlot] = []
    auto_host = 0
    for index, entry in enumerate(raw["devices"]):
        at = f"{where} devices[{index}]"
        if not isinstance(entry, dict) or "profile" not in entry:
            raise PlanError(f'{at}: each device is an object with at least "profile", e.g. '
                            '{"profile": "h100-sxm", "count": 8}')
        extra = sorted(set(entry) - {"profile", "count", "host", "memory"})
        if extra:
            raise PlanError(f"{at}: unknown key {', '.join(extra)}; the keys are profile, count, host, memory")
        name = str(entry["profile"])
        profile = custom[name] if name in custom else _profile_for_devices(name, str(path))
        count = entry.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise PlanError(f"{at}: count must be an integer >= 1, got {count!r}")
        memory = entry.get("memory", profile.memory_bytes if memory_bytes is None else memory_bytes)
        memory = parse_bytes(memory) if isinstance(memory, str) else memory
        if not isinstance(memory, int) or memory <= 0:
            raise PlanError(f'{at}: memory must be a positive byte count or a size like "40GiB", got {memory!r}')
        if "host" in entry:
            slots.extend(DeviceSlot(profile, memory, str(entry["host"])) for _ in range(count))
        else:
            filled = _fill_hosts(profile, count, devices_per_host, memory, auto_host)
            auto_host += len({s.host for s in filled})
            slots.extend(filled)
    seen: list[str] = []
    for slot in slots:
        if seen and slot.host != seen[-1] and slot.host in seen:
            raise PlanError(
                f"{where}: host {slot.host!r} appears in two places; list each host's devices together "
                "(ranks are placed host by host)"
            )
        if not seen or slot.host != seen[-1]:
            seen.append(slot.host)
    return Cluster(tuple(slots), str(path))


def device_speed(profile: DeviceProfile) -> float:
    """The speed a tp split is proportioned by: achievable memory bandwidth (bytes/s).

    Decode, the phase a served model spends its time in, streams every weight once per token and is
    memory-bound on every profile here (a GPU's FLOP/s outrun its bandwidth by two orders), and a tp
    rank's weights are in proportion to its heads; so a rank's decode time is about its share of the
    weights over its bandwidth, and shares in proportion to bandwidth make the ranks finish together.
    """
    return profile.bytes_per_second


def derived_tp_weights(cluster: Cluster, tp: int, pp: int = 1) -> tuple[float, ...] | None:
    """Per tp rank weights of the head split on `cluster` (rank r on `cluster.devices[r]`), the slowest
    rank's 1; None when every tp rank runs on the same profile in every stage (the even split, plans as
    without devices). The heads follow them by `mesh.split_shares` (at least one each, the remainder to
    the largest fractions): in proportion within head granularity.

    One split serves every stage (a tp rank's stage models share its head range), so with stages of
    different compositions tp rank t's speed is the harmonic sum over the stages of its devices'
    speeds, 1 / sum_s 1 / speed(s, t): the time it needs for one unit of work on each stage, which is
    what the step (the sum over stages) pays.
    """
    if tp < 2 or len(cluster) != tp * pp:
        return None
    mesh = DeviceMesh(pp=pp, tp=tp)
    per_rank = [
        [cluster.devices[mesh.rank_of(MeshCoords(pp=stage, cp=0, tp=t))].profile for stage in range(pp)]
        for t in range(tp)
    ]
    if all(column == per_rank[0] for column in per_rank):
        return None
    speeds = [1.0 / sum(1.0 / device_speed(profile) for profile in column) for column in per_rank]
    # relative to the slowest rank, to 4 significant digits: what the manifest and the CLI show
    return tuple(float(f"{speed / min(speeds):.4g}") for speed in speeds)


def parse_tp_weights(text: str, tp: int) -> tuple[float, ...]:
    """`--tp-weights 3,1`: one positive number per tp rank."""
    parts = [part.strip() for part in text.split(",")]
    try:
        weights = tuple(float(part) for part in parts)
    except ValueError:
        raise PlanError(
            f"--tp-weights {text!r}: cannot read {next(p for p in parts if not _is_number(p))!r} as a number; "
            f"write one weight per tp rank, e.g. --tp-weights {','.join(['1'] * max(tp, 2))}"
        ) from None
    if len(weights) != tp:
        raise PlanError(
            f"--tp-weights {text!r} gives {len(weights)} weight{'s' if len(weights) != 1 else ''} for --tp {tp}; "
            f"give one per tp rank, e.g. --tp-weights {','.join(['1'] * tp)}"
        )
    bad = [part for part, weight in zip(parts, weights, strict=True) if not (weight > 0 and weight < float("inf"))]
    if bad:
        raise PlanError(f"--tp-weights {text!r}: {bad[0]!r} is not a positive number; every weight must be > 0")
    return weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
