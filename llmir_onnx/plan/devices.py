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
      "compute_efficiency": 0.7,                 // fraction of peak_flops matmuls reach (default 1)
      "memory_efficiency": 0.8,                  // fraction of memory_bandwidth reached (default 1)
      "description": "where the numbers come from"   // str (default "")
    }

Built-in: `h100-sxm`, `a100-80g` (vendor datasheet peaks, dense, no sparsity, with typical achieved
fractions) and `cpu-here` (this project's 2-core development VM, calibrated single-threaded with
`bench/calibrate_cpu.py` on onnxruntime's kernels; method and figures in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llmir_onnx.errors import PlanError

GiB = 1 << 30


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

    def flops_per_second(self, dtype: str) -> float:
        """Achievable FLOP/s for arithmetic in `dtype` (falls back to float32's peak)."""
        peak = self.peak_flops.get(dtype, self.peak_flops.get("float32"))
        if peak is None:
            raise PlanError(f"device profile {self.name!r} has no peak_flops for {dtype!r} nor for 'float32'")
        return peak * self.compute_efficiency

    @property
    def bytes_per_second(self) -> float:
        return self.memory_bandwidth * self.memory_efficiency

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


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
    for key in ("compute_efficiency", "memory_efficiency"):
        if key in raw and not (isinstance(raw[key], (int, float)) and 0 < raw[key] <= 1):
            raise PlanError(f"device profile {source}: {key} must be in (0, 1], got {raw[key]!r}")
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
    )


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
