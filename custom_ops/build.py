"""Build the ai.llmir custom-op libraries with CMake; called by setup.py as `build(build_dir)`.

Inputs, each found or reported in one line:
- onnxruntime C/C++ API headers: $ORT_INCLUDE_DIR, else Debian trixie's `libonnxruntime-dev` fetched
  by package name through apt (the mirror is read from this machine's apt configuration), cached in
  build_dir/ort-headers. Headers of onnxruntime 1.21 work with newer onnxruntime runtimes because the
  C API is versioned and only grows.
- MPI: the mpich wheel of the running interpreter (sys.prefix/include/mpi.h, sys.prefix/lib/libmpi.so).
- CUDA (optional, $LLMIR_BUILD_CUDA=auto|on|off): nvcc's toolkit and nccl.h + libnccl.so.2 from the
  nvidia-nccl-cu13 wheel.

The CMake build folder persists under build_dir/cmake, so a rebuild with nothing changed takes seconds.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
CPU_LIBRARY = "libllmir_ops.so"
CUDA_LIBRARY = "libllmir_ops_cuda.so"
ORT_HEADERS_PACKAGE = "libonnxruntime-dev"
ORT_HEADERS_SUITE = "trixie"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class BuildError(RuntimeError):
    """A missing build input; the message names it and how to provide it."""


def _log(message: str) -> None:
    print(f"[llmir custom_ops] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- onnxruntime headers


def _debian_mirror() -> str:
    """The Debian archive URI this machine's apt already uses (never a host name of our own)."""
    uris: list[str] = []
    for sources_file in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for block in Path(sources_file).read_text().split("\n\n"):
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (line.partition(":") for line in block.splitlines() if ":" in line)
                if not key.startswith("#")
            )
            suites = fields.get("Suites", "")
            if fields.get("URIs") and "security" not in suites and "security" not in fields["URIs"]:
                uris.extend(fields["URIs"].split())
    for list_file in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(list_file):
            continue
        for line in Path(list_file).read_text().splitlines():
            match = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if match and "security" not in match.group(1) and "security" not in match.group(2):
                uris.append(match.group(1))
    debian = [uri for uri in uris if "debian" in uri]
    if not (debian or uris):
        raise BuildError(
            "onnxruntime headers: no Debian mirror in /etc/apt to fetch libonnxruntime-dev from; "
            "set ORT_INCLUDE_DIR to a folder containing onnxruntime_cxx_api.h"
        )
    return (debian or uris)[0].rstrip("/")


def _fetch_ort_headers(dest: Path) -> Path:
    include_dir = dest / "include" / "onnxruntime"
    if (include_dir / "onnxruntime_cxx_api.h").exists():
        return include_dir
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None or not DEBIAN_KEYRING.exists():
        raise BuildError(
            "onnxruntime headers: ORT_INCLUDE_DIR is not set and apt-get/dpkg-deb/the Debian keyring are "
            "not available to fetch libonnxruntime-dev; set ORT_INCLUDE_DIR to a folder containing "
            "onnxruntime_cxx_api.h (e.g. an onnxruntime release's include/)"
        )
    mirror = _debian_mirror()
    _log(f"fetching {ORT_HEADERS_PACKAGE} ({ORT_HEADERS_SUITE}) for the onnxruntime C/C++ API headers")
    with tempfile.TemporaryDirectory(prefix="llmir-apt-") as tmp:
        work = Path(tmp)
        for sub in ("state/lists/partial", "cache/archives/partial", "download", "extract"):
            (work / sub).mkdir(parents=True)
        sources = work / "sources.list"
        sources.write_text(f"deb [signed-by={DEBIAN_KEYRING}] {mirror} {ORT_HEADERS_SUITE} main\n")
        apt_options = [
            "-o", f"Dir::State={work / 'state'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", "Dir::State::status=/dev/null",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        for step in (["update"], ["download", ORT_HEADERS_PACKAGE]):
            result = subprocess.run(
                ["apt-get", "-q", *apt_options, *step],
                cwd=work / "download",
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
                raise BuildError(
                    f"onnxruntime headers: `apt-get {step[0]}` of {ORT_HEADERS_PACKAGE} from {mirror} failed "
                    f"({tail[0]}); set ORT_INCLUDE_DIR to a folder containing onnxruntime_cxx_api.h"
                )
        debs = list((work / "download").glob("*.deb"))
        if not debs:
            raise BuildError(f"onnxruntime headers: apt-get downloaded no {ORT_HEADERS_PACKAGE}; set ORT_INCLUDE_DIR")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "extract")], check=True)
        extracted = work / "extract" / "usr" / "include" / "onnxruntime"
        if not (extracted / "onnxruntime_cxx_api.h").exists():
            raise BuildError(f"onnxruntime headers: {debs[0].name} has no usr/include/onnxruntime; set ORT_INCLUDE_DIR")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "include").mkdir(parents=True)
        shutil.copytree(extracted, staging / "include" / "onnxruntime")
        (staging / "SOURCE").write_text(f"{debs[0].name}\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)  # atomic: a half-fetched folder is never mistaken for a cached one
    return include_dir


def find_ort_include(build_dir: Path) -> Path:
    explicit = os.environ.get("ORT_INCLUDE_DIR")
    if explicit:
        path = Path(explicit)
        for candidate in (path, path / "onnxruntime", path / "include", path / "include" / "onnxruntime"):
            if (candidate / "onnxruntime_cxx_api.h").exists():
                return candidate.resolve()
        raise BuildError(
            f"ORT_INCLUDE_DIR={explicit} does not contain onnxruntime_cxx_api.h; point it at an onnxruntime "
            "include folder or unset it to fetch libonnxruntime-dev"
        )
    return _fetch_ort_headers(build_dir / "ort-headers")


# --------------------------------------------------------------------------- MPI, CUDA, NCCL


def find_mpi() -> tuple[Path, Path]:
    prefix = Path(sys.prefix)
    header = prefix / "include" / "mpi.h"
    library = prefix / "lib" / "libmpi.so"
    if not header.exists() or not library.exists():
        raise BuildError(
            f"MPI: {header} or {library} is missing; install the mpich wheel into this environment "
            "(`pip install mpich`) and build with --no-build-isolation"
        )
    return header.parent, library


def _find_cuda_root() -> Path | None:
    """A CUDA toolkit folder (bin/nvcc and include/cuda_runtime.h): CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        roots.append(str(Path(nvcc_on_path).resolve().parent.parent))
        # Some installs put a wrapper script in /usr/local/bin that execs the real nvcc.
        text = Path(nvcc_on_path).read_bytes()[:4096] if Path(nvcc_on_path).stat().st_size < 4096 else b""
        match = re.search(rb"(/\S+)/bin/nvcc", text)
        if match:
            roots.append(match.group(1).decode())
    for root in roots:
        if root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root).resolve()
    return None


def _find_nccl() -> tuple[Path, Path] | None:
    roots = [os.environ.get("NCCL_HOME")] + [str(Path(entry) / "nvidia" / "nccl") for entry in sys.path if entry]
    for root in roots:
        if not root:
            continue
        header = Path(root) / "include" / "nccl.h"
        library = Path(root) / "lib" / "libnccl.so.2"
        if header.exists() and library.exists():
            return header.parent.resolve(), library.resolve()
    return None


def _cuda_inputs() -> tuple[Path, Path, Path] | None:
    mode = os.environ.get("LLMIR_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise BuildError(f"LLMIR_BUILD_CUDA={mode!r}: use auto, on or off")
    if mode == "off":
        return None
    cuda_root = _find_cuda_root()
    nccl = _find_nccl()
    if cuda_root is None or nccl is None:
        missing = (
            "the CUDA toolkit (nvcc; set CUDA_HOME)" if cuda_root is None else "nccl.h (pip install nvidia-nccl-cu13)"
        )
        if mode == "on":
            raise BuildError(f"LLMIR_BUILD_CUDA=on but {missing} was not found")
        _log(f"skipping {CUDA_LIBRARY}: {missing} not found")
        return None
    return cuda_root, nccl[0], nccl[1]


# --------------------------------------------------------------------------- CMake


def build(build_dir: Path) -> dict[str, Path]:
    """Configure (when inputs changed) and build; returns {library file name: built path}."""
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise BuildError("cmake was not found on PATH; install CMake >= 3.20 (e.g. `pip install cmake`)")
    ort_include = find_ort_include(build_dir)
    mpi_include, mpi_library = find_mpi()
    cuda = _cuda_inputs()

    cmake_dir = build_dir / "cmake"
    definitions = {
        "CMAKE_BUILD_TYPE": os.environ.get("LLMIR_BUILD_TYPE", "Release"),
        "ORT_INCLUDE_DIR": str(ort_include),
        "MPI_INCLUDE_DIR": str(mpi_include),
        "MPI_LIBRARY": str(mpi_library),
        "LLMIR_WITH_CUDA": "ON" if cuda else "OFF",
    }
    if cuda:
        cuda_root, nccl_include, nccl_library = cuda
        definitions.update(
            {
                "CUDAToolkit_ROOT": str(cuda_root),
                "NCCL_INCLUDE_DIR": str(nccl_include),
                "NCCL_LIBRARY": str(nccl_library),
            }
        )
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", str(SOURCE_DIR), "-B", str(cmake_dir), *generator]
    configure += [f"-D{key}={value}" for key, value in sorted(definitions.items())]
    stamp = cmake_dir / "llmir-configure.json"
    if not (cmake_dir / "CMakeCache.txt").exists() or not stamp.exists() or json.loads(stamp.read_text()) != configure:
        _log("configuring: " + " ".join(configure[5:]))
        subprocess.run(configure, check=True)
        stamp.write_text(json.dumps(configure))
    jobs = os.environ.get("LLMIR_BUILD_JOBS", str(os.cpu_count() or 2))
    subprocess.run([cmake, "--build", str(cmake_dir), "--parallel", jobs], check=True)

    built = {CPU_LIBRARY: cmake_dir / CPU_LIBRARY}
    if cuda:
        built[CUDA_LIBRARY] = cmake_dir / CUDA_LIBRARY
    for name, path in built.items():
        if not path.exists():
            raise BuildError(f"CMake finished but {path} ({name}) was not produced")
    return built


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE_DIR.parent / "build" / "custom_ops"
    for library_name, library_path in build(out).items():
        print(f"{library_name}: {library_path}")
