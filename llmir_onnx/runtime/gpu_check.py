"""The GPU check (`scripts/gpu_check`): the CUDA path, proven on one GPU by one command.

    scripts/gpu_check                # on a GPU machine (CUDA 13 + nvcc, NCCL, PyTorch): every check
    scripts/gpu_check --dry-run      # anywhere: everything up to the first CUDA call, then what it would run

The orchestrator runs with any Python 3.11 (no numpy needed, so a fresh machine's `python3` does). It:

1. finds the tools (nvcc through custom_ops/build.py's own search, cmake, a GPU through the CUDA driver);
2. makes its own venv (WORK/venv) and installs the package there the way the README says, with the
   gpu extra (`pip install -e '.[gpu]'`: onnxruntime-gpu + nvidia-nccl-cu13, never beside the CPU
   onnxruntime), which builds libllmir_ops_cuda.so (LLMIR_BUILD_CUDA=on: no silent CPU-only build);
3. makes the plans with `llmir-onnx partition` (tp 2, pp 2, tp 2 x pp 2 of a bundled model and of
   models/smollm2 when it exists: its 9 heads split unevenly, 6,3; and GPT-2 at tp 3 with a vocab-parallel
   lm_head, whose AllGathers have unequal parts);
4. runs each check as a child process with the venv's interpreter (`python -m llmir_onnx.runtime.gpu_check
   --inner CHECK ...`) and prints one line per check: `PASS name: detail`, `FAIL name: reason` or
   `SKIP name: why`. The exit status is 1 if any check failed.

Why NCCL at world size 1 is a real check only TOGETHER with the placement proof: with one rank an
AllReduce's result equals its input, which a CPU kernel (or a silent host fallback) produces as well.
Only onnxruntime's profile, which names the provider of every node it ran, shows that the ai.llmir
nodes ran on CUDAExecutionProvider, i.e. through the CUDA kernel: device pointers handed to NCCL, the
NCCL communicator set up, the op enqueued on onnxruntime's compute stream, and (AllGather and
ReduceScatter on an inner axis) the strided device copies that pack and unpack the blocks. Given
that, an exact result on large random data of every dtype proves the byte counts per dtype, the
strides and the stream order (LLMIR_CUDA_WAIT=stream returns before NCCL finished: a result read
before it would be stale). It proves no arithmetic across ranks; the multi-rank runs do (staging
backend: CUDA kernels, MPI transport) and so do the CPU tests (tests/test_collectives_mpi.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only: the functions import these in the venv they run in
    import numpy as np
    import onnx

# Only the standard library up here: the orchestrator runs under a bare python3 (see above), so numpy, onnx,
# onnxruntime, torch and llmir_onnx's own modules are imported in the functions that run in the venv.
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "llama-gqa-torch-legacy" / "model.onnx"
SMOLLM2_MODEL = ROOT / "models" / "smollm2" / "model.onnx"
# GPT-2's 4 heads at tp 3 split 2,1,1 and its vocabulary 256,128,128: the AllGathers of unequal parts
# (the `sizes` attribute) through the CUDA kernels, which no even plan has.
UNEVEN_GATHER_MODEL = ROOT / "models" / "gpt2-torch-dynamo" / "model.onnx"
UNEVEN_GATHER_FLAGS = ["--tp", "3", "--vocab-parallel"]
LLMIR_OPS = frozenset({"AllReduce", "AllGather", "ReduceScatter", "Send", "Recv"})
CUDA_PROVIDER = "CUDAExecutionProvider"
# The tensor-parallel degree per model: SmolLM2-135M's 9 query / 3 KV heads do not split in 2, so it runs at 3.
TP_DEGREE = {"bundled": 2, "smollm2": 2}  # SmolLM2 at tp 2 is uneven: heads 6,3 in whole KV groups


def plan_layouts(tp: int) -> dict[str, list[str]]:
    """Plan name suffix -> partition flags: tp alone, 2 pipeline stages alone, both."""
    return {f"tp{tp}": ["--tp", str(tp)], "pp2": ["--pp", "2"], f"tp{tp}xpp2": ["--tp", str(tp), "--pp", "2"]}
PROMPT_IDS = "5,17,42,99,3,250"
TIMING_SIZES_MIB = (1, 4, 16, 64)
# onnxruntime's CUDA EP multiplies float32 in TF32 by default (provider option use_tf32=1): matmul inputs
# keep 10 mantissa bits, so a plan and the original, which sum partial products in different orders, would
# differ by ~1e-3 relative per layer, compounding over SmolLM2's 30. The plan checks run in float32
# (LLMIR_CUDA_TF32=0, session.execution_providers) and are held to verify's own float32 tolerance.
FLOAT32_MATMULS = {"LLMIR_CUDA_TF32": "0"}


@dataclass
class Outcome:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclass
class Context:
    work: Path
    venv: Path
    base_python: str
    torch_python: str
    model: Path
    dry_run: bool
    smollm2: Path = SMOLLM2_MODEL
    system_site_packages: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    planned: list[tuple[str, list[str], dict[str, str]]] = field(default_factory=list)

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def cli(self) -> list[str]:
        return [self.python, "-m", "llmir_onnx.cli.main"]

    def record(self, name: str, status: str, detail: str) -> Outcome:
        outcome = Outcome(name, status, " ".join(detail.split()))
        self.outcomes.append(outcome)
        print(outcome.line(), flush=True)
        return outcome


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_command(command: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 300.0,
                cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    log("$ " + shlex.join(command))
    full_env = dict(os.environ, **(env or {}))
    try:
        return subprocess.run(list(command), cwd=cwd, env=full_env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
        return subprocess.CompletedProcess(list(command), 124, out, f"timed out after {timeout_s:.0f} s")


# --------------------------------------------------------------------------- CPU-side preparation


def load_build_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("llmir_custom_ops_build", ROOT / "custom_ops" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_library_target() -> str:
    """One line about the CUDA library target of the build; raises ValueError when it is missing."""
    build = load_build_module()
    name = getattr(build, "CUDA_LIBRARY", None)
    if name != "libllmir_ops_cuda.so":
        raise ValueError(f"custom_ops/build.py builds {name!r}, not libllmir_ops_cuda.so")
    cmake = (ROOT / "custom_ops" / "CMakeLists.txt").read_text()
    match = re.search(r"add_library\(llmir_ops_cuda\s+SHARED\s+([^)]*)\)", cmake)
    if match is None:
        raise ValueError("custom_ops/CMakeLists.txt has no add_library(llmir_ops_cuda SHARED ...) target")
    sources = [word for word in match.group(1).split() if not word.startswith("$<")]
    missing = [source for source in sources if not (ROOT / "custom_ops" / source).is_file()]
    if missing:
        raise ValueError(f"the llmir_ops_cuda target lists missing sources {missing}")
    if "llmir_onnx._lib.libllmir_ops_cuda" not in (ROOT / "setup.py").read_text():
        raise ValueError("setup.py does not install llmir_onnx/_lib/libllmir_ops_cuda.so")
    return f"{name} from {len(sources)} sources ({', '.join(Path(s).name for s in sources)}) + llmir_core"


def find_tools(ctx: Context) -> bool:
    """nvcc (as custom_ops/build.py finds it), cmake, mpich's mpiexec (installed into the venv later)."""
    build = load_build_module()
    cuda_root = build._find_cuda_root()
    cmake = shutil.which("cmake")
    missing = [what for what, found in (("nvcc (set CUDA_HOME)", cuda_root), ("cmake", cmake)) if not found]
    if missing:
        status = "SKIP" if ctx.dry_run else "FAIL"
        ctx.record("tools", status, f"not found: {', '.join(missing)}" + (" (the real run needs them)"
                                                                            if ctx.dry_run else ""))
        return ctx.dry_run
    nvcc = run_command([str(Path(cuda_root) / "bin" / "nvcc"), "--version"], timeout_s=30)
    release = re.search(r"release ([\d.]+)", nvcc.stdout)
    ctx.record("tools", "PASS", f"nvcc {release.group(1) if release else '?'} at {cuda_root}, cmake at {cmake}")
    return True


def make_plans(ctx: Context, python: str) -> dict[str, Path] | None:
    """Every plan of the check, made with `llmir-onnx partition` by `python`."""
    models = {"bundled": ctx.model}
    if ctx.smollm2.is_file():
        models["smollm2"] = ctx.smollm2
    else:
        ctx.record("smollm2 plans", "SKIP", f"{ctx.smollm2} does not exist (models/export_smollm2.py makes it)")
    plans: dict[str, Path] = {}
    made = []
    wanted = [
        (f"{model_key}-{layout}", model, flags)
        for model_key, model in models.items()
        for layout, flags in [("tp1", ["--tp", "1"]), *plan_layouts(TP_DEGREE[model_key]).items()]
        if model_key == "bundled" or layout != "tp1"
    ]
    wanted.append(("gpt2-tp3-vocab", UNEVEN_GATHER_MODEL, UNEVEN_GATHER_FLAGS))
    for name, model, flags in wanted:
        out = ctx.work / "plans" / name
        shutil.rmtree(out, ignore_errors=True)
        result = run_command([python, "-m", "llmir_onnx.cli.main", "partition", str(model), *flags,
                              "-o", str(out)], timeout_s=300)
        if result.returncode != 0:
            ctx.record("plans", "FAIL", f"partition {name}: {last_line(result.stderr + result.stdout)}")
            return None
        plans[name] = out
        world = len(json.loads((out / "manifest.json").read_text())["ranks"])
        made.append(f"{name} ({world} ranks)")
    ctx.record("plans", "PASS", f"llmir-onnx partition: {', '.join(made)} under {ctx.work / 'plans'}")
    return plans


def planned_checks(ctx: Context, plans: dict[str, Path]) -> list[tuple[str, list[str], dict[str, str]]]:
    """(check name, command, extra environment) of every GPU check, in order."""
    inner = [ctx.python, "-m", "llmir_onnx.runtime.gpu_check", "--inner"]
    checks: list[tuple[str, list[str], dict[str, str]]] = [
        ("collectives nccl world 1", [*inner, "collectives", str(ctx.work / "profiles" / "collectives")],
         {"LLMIR_CUDA_COMM": "nccl"}),
    ]
    for name, plan in plans.items():
        if name.endswith("-tp1"):
            continue
        profiles = ctx.work / "profiles" / name
        verify = [*ctx.cli, "verify", str(plan), "--device", "cuda", "--profile-dir", str(profiles)]
        checks.append((f"verify {name} cuda staging", verify, {"LLMIR_CUDA_COMM": "staging", **FLOAT32_MATMULS}))
        checks.append((f"placement {name}", [*inner, "placement", str(plan), str(profiles)], {}))
    generate = ["generate", "--device", "cuda", "--prompt-ids", PROMPT_IDS, "--max-new-tokens", "16", "--check"]
    checks.append(("generate --check cuda nccl tp1", [*ctx.cli, *generate[:1], str(plans["bundled-tp1"]),
                                                      *generate[1:]], {"LLMIR_CUDA_COMM": "nccl", **FLOAT32_MATMULS}))
    checks.append(("generate --check cuda staging tp2xpp2", [*ctx.cli, *generate[:1], str(plans["bundled-tp2xpp2"]),
                                                             *generate[1:]],
                   {"LLMIR_CUDA_COMM": "staging", **FLOAT32_MATMULS}))
    checks.append(("killed rank ends the job (staging)",
                   [*inner, "killed-rank", ctx.python, str(plans["bundled-tp2"])], {"LLMIR_CUDA_COMM": "staging"}))
    timing = ctx.work / "timing"
    checks.append(("allreduce timing: session", [*inner, "time-session", str(timing / "session.json")],
                   {"LLMIR_CUDA_COMM": "nccl"}))
    checks.append(("allreduce timing: bare nccl (torch.distributed)",
                   [ctx.torch_python, str(Path(__file__).resolve()), "--inner", "time-torch",
                    str(timing / "torch.json")], {}))
    return checks


def install_commands(ctx: Context) -> list[list[str]]:
    pip = [ctx.python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    venv = [ctx.base_python, "-m", "venv", *(["--system-site-packages"] if ctx.system_site_packages else [])]
    return [
        [*venv, str(ctx.venv)],
        [*pip, "setuptools>=64", "wheel", "mpich>=4.2", "nvidia-nccl-cu13>=2.20", "ml_dtypes"],
        [*pip, "--no-build-isolation", "-e", f"{ROOT}[gpu]"],
    ]


# --------------------------------------------------------------------------- the real run


def install(ctx: Context) -> bool:
    env = {"LLMIR_BUILD_CUDA": "on"}  # fail the build rather than install a CPU-only package
    start = time.monotonic()
    if not (ctx.venv / "bin" / "python").exists():
        for command in install_commands(ctx):
            result = run_command(command, env=env, timeout_s=480)
            if result.returncode != 0:
                reason = last_line(result.stderr + result.stdout)
                ctx.record("install", "FAIL", f"{shlex.join(command[:4])}...: {reason}")
                return False
    else:
        result = run_command(install_commands(ctx)[-1], env=env, timeout_s=480)  # rebuilds what changed
        if result.returncode != 0:
            ctx.record("install", "FAIL", f"pip install -e .[gpu]: {last_line(result.stderr + result.stdout)}")
            return False
    # Offered is not enabled: a session falls back to the CPU (one warning line) when onnxruntime-gpu
    # cannot load its CUDA/cuDNN libraries, so a one-node session must really get the CUDA EP.
    probe = run_command([ctx.python, "-c", (
        "import importlib.metadata as m, onnxruntime as o\n"
        "from onnx import TensorProto as T, helper as h\n"
        "names = {d.metadata['Name'].lower() for d in m.distributions()}\n"
        "both = {'onnxruntime', 'onnxruntime-gpu'} <= names\n"
        "g = h.make_graph([h.make_node('Identity', ['x'], ['y'])], 'g', [h.make_tensor_value_info('x', T.FLOAT, [1])],"
        " [h.make_tensor_value_info('y', T.FLOAT, [1])])\n"
        "model = h.make_model(g, opset_imports=[h.make_opsetid('', 21)], ir_version=10).SerializeToString()\n"
        "s = o.InferenceSession(model, providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])\n"
        "print(o.__version__, 'CUDAExecutionProvider' in s.get_providers(), both)")], timeout_s=120)
    words = probe.stdout.split()
    if probe.returncode != 0 or len(words) != 3:
        ctx.record("install", "FAIL", f"onnxruntime does not import in {ctx.venv}: {last_line(probe.stderr)}")
        return False
    if words[2] == "True":
        ctx.record("install", "FAIL", f"{ctx.venv} holds both onnxruntime and onnxruntime-gpu; delete it and rerun")
        return False
    if words[1] != "True":
        warnings = [line for line in probe.stderr.splitlines() if "CUDA" in line or "cuDNN" in line]
        ctx.record("install", "FAIL", f"onnxruntime {words[0]} in {ctx.venv} could not enable {CUDA_PROVIDER}: "
                   f"{warnings[-1] if warnings else last_line(probe.stderr)} (its CUDA/cuDNN libraries must match; "
                   "--system-site-packages lets the venv see the machine's nvidia-* wheels)")
        return False
    ctx.record("install", "PASS", f"onnxruntime-gpu {words[0]} with {CUDA_PROVIDER} in {ctx.venv} "
               f"({time.monotonic() - start:.0f} s)")
    return True


def check_cuda_library(ctx: Context) -> bool:
    library = ROOT / "llmir_onnx" / "_lib" / "libllmir_ops_cuda.so"
    probe = run_command([ctx.python, "-c", (
        "import ctypes; from llmir_onnx.runtime.launch import setup_communication\n"
        "c = setup_communication(cuda=True); print(c.version)")], env={"LLMIR_CUDA_COMM": "nccl"}, timeout_s=120)
    if probe.returncode != 0 or "cuda+nccl" not in probe.stdout:
        ctx.record("cuda library", "FAIL", f"{library}: {last_line(probe.stderr + probe.stdout)}")
        return False
    ctx.record("cuda library", "PASS", f"{library.name} built and loaded: {probe.stdout.strip()}")
    return True


def run_checks(ctx: Context, checks: list[tuple[str, list[str], dict[str, str]]]) -> None:
    for name, command, env in checks:
        start = time.monotonic()
        result = run_command(command, env=env, timeout_s=300)
        seconds = time.monotonic() - start
        if result.returncode == 0:
            detail = last_line(result.stdout) if result.stdout.strip() else "ok"
            ctx.record(name, "PASS", f"{detail} ({seconds:.0f} s)")
        else:
            ctx.record(name, "FAIL", f"{last_line(result.stderr + result.stdout)} (exit {result.returncode}, "
                       f"{seconds:.0f} s)")
    timing = ctx.work / "timing"
    if (timing / "session.json").exists() and (timing / "torch.json").exists():
        session = json.loads((timing / "session.json").read_text())
        bare = json.loads((timing / "torch.json").read_text())
        parts = []
        for mib in TIMING_SIZES_MIB:
            key = str(mib)
            stream, host, torch_us = session["stream"][key], session["host"][key], bare[key]
            parts.append(f"{mib} MiB session {stream:.0f} us (host wait {host:.0f}) vs bare {torch_us:.0f} us "
                         f"= {stream / torch_us:.2f}x")
        ctx.record("allreduce in session vs bare nccl", "PASS", "; ".join(parts))


# --------------------------------------------------------------------------- inner checks (venv python)


def llmir_node_names(model_path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {node.name for node in model.graph.node if node.domain == "ai.llmir"}


def profile_providers(profile_path: Path) -> dict[str, str]:
    """{node name: provider} of the ai.llmir nodes in one onnxruntime profile (SessionOptions.enable_profiling):
    each node's `*_kernel_time` event carries args.op_name and args.provider."""
    providers: dict[str, str] = {}
    for event in json.loads(profile_path.read_text()):
        args = event.get("args") or {}
        if event.get("cat") != "Node" or args.get("op_name") not in LLMIR_OPS:
            continue
        name = str(event.get("name", "")).removesuffix("_kernel_time")
        providers[name] = str(args.get("provider"))
    return providers


def placement_problems(expected_nodes: Iterable[str], providers: dict[str, str], provider: str) -> list[str]:
    """What keeps `expected_nodes` from having all run on `provider`: nodes absent from the profile (not run,
    or renamed) and nodes that ran elsewhere."""
    problems = [f"{node} is not in the profile" for node in sorted(expected_nodes) if node not in providers]
    problems += [f"{node} ran on {ran}" for node, ran in sorted(providers.items()) if ran != provider]
    return problems


def plan_placement(plan: Path, profile_dir: Path, provider: str = CUDA_PROVIDER) -> tuple[int, list[str]]:
    """(ai.llmir nodes checked, problems) for every rank of a plan run with `verify --profile-dir`."""
    manifest = json.loads((plan / "manifest.json").read_text())
    checked = 0
    problems: list[str] = []
    for entry in manifest["ranks"]:
        rank = entry["rank"]
        profiles = sorted(profile_dir.glob(f"rank{rank}_*.json"))
        if len(profiles) != 1:
            problems.append(f"rank {rank}: {len(profiles)} profiles in {profile_dir} (expected 1)")
            continue
        nodes = llmir_node_names(plan / entry["file"])
        checked += len(nodes)
        problems += [f"rank {rank}: {problem}" for problem in
                     placement_problems(nodes, profile_providers(profiles[0]), provider)]
    return checked, problems


def inner_placement(plan: str, profile_dir: str) -> int:
    checked, problems = plan_placement(Path(plan), Path(profile_dir))
    if problems or checked == 0:
        print(f"{len(problems)} problems: {'; '.join(problems[:4])}" if problems else "no ai.llmir node in the plan",
              file=sys.stderr)
        return 1
    print(f"all {checked} ai.llmir nodes of every rank ran on {CUDA_PROVIDER} (onnxruntime profile)")
    return 0


def _dtypes() -> dict[str, tuple[type[np.generic], int]]:
    import ml_dtypes
    import numpy as np
    from onnx import TensorProto

    return {
        "float32": (np.float32, TensorProto.FLOAT), "float64": (np.float64, TensorProto.DOUBLE),
        "float16": (np.float16, TensorProto.FLOAT16), "bfloat16": (ml_dtypes.bfloat16, TensorProto.BFLOAT16),
        "int32": (np.int32, TensorProto.INT32), "int64": (np.int64, TensorProto.INT64),
        "int8": (np.int8, TensorProto.INT8), "uint8": (np.uint8, TensorProto.UINT8),
        "bool": (np.bool_, TensorProto.BOOL),
    }


def collectives_model(elem_type: int, dtype_name: str) -> onnx.ModelProto:
    """Every ai.llmir collective on one input, at group [0]: AllReduce with each reduction the dtype has,
    AllGather and ReduceScatter on the outer axis (one NCCL call) and on the inner axis (strided device
    copies around it)."""
    from onnx import TensorProto, helper

    from llmir_onnx.ops import LLMIR_OPSET_IMPORT

    reductions = ("max", "min") if dtype_name == "bool" else ("sum", "max", "min")
    nodes = [helper.make_node("AllReduce", ["x"], [f"ar_{r}"], domain="ai.llmir", name=f"ar_{r}", reduction=r,
                              group=[0]) for r in reductions]
    for axis in (0, 1):
        nodes.append(helper.make_node("AllGather", ["x"], [f"ag_{axis}"], domain="ai.llmir", name=f"ag_{axis}",
                                      axis=axis, group=[0]))
        nodes.append(helper.make_node("ReduceScatter", ["x"], [f"rs_{axis}"], domain="ai.llmir", name=f"rs_{axis}",
                                      axis=axis, reduction=reductions[0], group=[0]))
    outputs = [helper.make_tensor_value_info(node.output[0], elem_type, [None, None]) for node in nodes]
    if dtype_name == "bfloat16":  # onnxruntime's Python API hands out no bfloat16 arrays; float32 holds them exactly
        casts = [helper.make_node("Cast", [node.output[0]], [f"{node.output[0]}_f32"], to=TensorProto.FLOAT)
                 for node in nodes]
        outputs = [helper.make_tensor_value_info(cast.output[0], TensorProto.FLOAT, [None, None]) for cast in casts]
        nodes += casts
    graph = helper.make_graph(nodes, f"collectives_{dtype_name}",
                              [helper.make_tensor_value_info("x", elem_type, ["M", "N"])], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), LLMIR_OPSET_IMPORT], ir_version=10)


def check_collectives_models(ctx: Context) -> bool:
    """Dry run: the collectives check's models pass onnx.checker with full checking (ai.llmir schemas)."""
    import onnx

    import llmir_onnx.ops  # noqa: F401  (registers the ai.llmir schemas with onnx)

    nodes = 0
    for dtype_name, (_, elem_type) in _dtypes().items():
        model = collectives_model(elem_type, dtype_name)
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as error:
            ctx.record("collectives models", "FAIL", f"{dtype_name}: {last_line(str(error))}")
            return False
        nodes += sum(node.domain == "ai.llmir" for node in model.graph.node)
    ctx.record("collectives models", "PASS", f"{len(_dtypes())} dtypes, {nodes} ai.llmir nodes pass onnx.checker")
    return True


def random_data(dtype: type[np.generic], dtype_name: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    import numpy as np

    rng = np.random.default_rng(seed)
    if dtype_name == "bool":
        return rng.random(shape) < 0.5
    if dtype_name.startswith(("int", "uint")):
        info = np.iinfo(np.dtype(dtype))
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def inner_collectives(profile_dir: str, device: str = "cuda") -> int:
    """NCCL at world size 1, every dtype, two shapes (the second after the cached first), both wait modes,
    exact against numpy; then the placement proof from the profile. `device` cpu runs the same on the CPU
    kernels and proves CPUExecutionProvider instead (tests/test_gpu_check.py: the check's own code cannot
    rot between GPU runs)."""
    import numpy as np
    import onnxruntime as ort

    from llmir_onnx.runtime.launch import setup_communication

    cuda = device == "cuda"
    provider = CUDA_PROVIDER if cuda else "CPUExecutionProvider"
    providers = [(CUDA_PROVIDER, {"device_id": 0}), "CPUExecutionProvider"] if cuda else [provider]
    comm = setup_communication(cuda=cuda, expected_world_size=1)
    Path(profile_dir).mkdir(parents=True, exist_ok=True)
    checked = 0
    placed = 0
    for index, (dtype_name, (dtype, elem_type)) in enumerate(_dtypes().items()):
        model = collectives_model(elem_type, dtype_name)
        options = comm.session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / dtype_name)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        if provider not in session.get_providers():
            print(f"onnxruntime did not enable {provider} (it fell back to {session.get_providers()})", file=sys.stderr)
            return 1
        names = [output.name for output in session.get_outputs()]
        for wait in ("stream", "host"):
            os.environ["LLMIR_CUDA_WAIT"] = wait  # read per op call
            for shape in ((512, 2048), (3, 1000), (512, 2048)):  # ~1-8 MiB; a new shape; the cached one again
                x = random_data(dtype, dtype_name, shape, seed=index * 100 + shape[0])
                feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    x.view(np.uint16), elem_type) if dtype_name == "bfloat16" else ort.OrtValue.ortvalue_from_numpy(x)
                # Outputs bound to the host: onnxruntime copies them off the GPU after the collectives, in
                # stream order (what a stale read under LLMIR_CUDA_WAIT=stream would get wrong).
                binding = session.io_binding()
                binding.bind_ortvalue_input("x", feed)
                for name in names:
                    binding.bind_output(name, "cpu")
                session.run_with_iobinding(binding)
                got = binding.get_outputs()
                # At one rank every collective returns its input: AllGather's one block, ReduceScatter's one
                # chunk, AllReduce's one term.
                want = x.astype(np.float32) if dtype_name == "bfloat16" else x
                for name, value in zip(names, got, strict=True):
                    array = value.numpy()
                    if array.dtype != want.dtype or array.shape != want.shape or not np.array_equal(array, want):
                        print(f"{dtype_name} {name} shape {shape} LLMIR_CUDA_WAIT={wait}: got {array.dtype} "
                              f"{array.shape}, differs from the input", file=sys.stderr)
                        return 1
                    checked += 1
        profile = Path(session.end_profiling())
        llmir_nodes = {node.name for node in model.graph.node if node.domain == "ai.llmir"}
        problems = placement_problems(llmir_nodes, profile_providers(profile), provider)
        if problems:
            print(f"{dtype_name}: {'; '.join(problems[:4])}", file=sys.stderr)
            return 1
        placed += len(llmir_nodes)
    os.environ.pop("LLMIR_CUDA_WAIT", None)
    print(f"{checked} exact results (9 dtypes, AllReduce sum/max/min, AllGather and ReduceScatter on axes 0 and 1, "
          "shapes [512,2048], [3,1000] and the first again, LLMIR_CUDA_WAIT stream and host); "
          f"all {placed} ai.llmir nodes ran on {provider}")
    return 0


def inner_killed_rank(python: str, plan: str) -> int:
    """2 ranks on one GPU (staging), rank 1 killed before decode step 4: the job ends non-zero naming it."""
    start = time.monotonic()
    env = dict(os.environ, LLMIR_COMM_TIMEOUT_S="5", LLMIR_FAULT_KILL_RANK_AT="1:4")
    result = subprocess.run([python, "-m", "llmir_onnx.cli.main", "generate", plan, "--device", "cuda",
                             "--prompt-ids", PROMPT_IDS, "--max-new-tokens", "40"], env=env, capture_output=True,
                            text=True, timeout=120, check=False)
    seconds = time.monotonic() - start
    if result.returncode == 0 or "rank 1 died" not in result.stderr or seconds > 60:
        print(f"exit {result.returncode} after {seconds:.0f} s: {last_line(result.stderr)}", file=sys.stderr)
        return 1
    print(f"exit {result.returncode} after {seconds:.1f} s: {last_line(result.stderr)}")
    return 0


def _median_us(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1e6


def inner_time_session(out_path: str, device: str = "cuda") -> int:
    """In-session AllReduce (float32, world 1, NCCL; input and output bound on the GPU) per size and wait
    mode, median of 20 runs after 3 warm-ups; each run ends with the output ready (synchronize_outputs).
    `device` cpu: the same on the CPU kernel (tests/test_gpu_check.py)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from llmir_onnx.ops import LLMIR_OPSET_IMPORT
    from llmir_onnx.runtime.launch import setup_communication

    cuda = device == "cuda"
    comm = setup_communication(cuda=cuda, expected_world_size=1)
    node = helper.make_node("AllReduce", ["x"], ["y"], domain="ai.llmir", name="ar", group=[0])
    graph = helper.make_graph([node], "ar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), LLMIR_OPSET_IMPORT], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), comm.session_options(),
                                   providers=[(CUDA_PROVIDER, {"device_id": 0})] if cuda else ["CPUExecutionProvider"])
    results: dict[str, dict[str, float]] = {}
    for wait in ("stream", "host"):
        os.environ["LLMIR_CUDA_WAIT"] = wait
        results[wait] = {}
        for mib in TIMING_SIZES_MIB:
            n = mib * 2**20 // 4
            x = ort.OrtValue.ortvalue_from_numpy(np.arange(n, dtype=np.float32), device, 0)
            y = ort.OrtValue.ortvalue_from_shape_and_type([n], np.float32, device, 0)
            binding = session.io_binding()
            binding.bind_ortvalue_input("x", x)
            binding.bind_ortvalue_output("y", y)
            samples = []
            for iteration in range(23):
                start = time.perf_counter()
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()
                if iteration >= 3:
                    samples.append(time.perf_counter() - start)
            results[wait][str(mib)] = _median_us(samples)
            if not np.array_equal(y.numpy(), np.arange(n, dtype=np.float32)):
                print(f"{mib} MiB LLMIR_CUDA_WAIT={wait}: the AllReduce result differs from its input", file=sys.stderr)
                return 1
    os.environ.pop("LLMIR_CUDA_WAIT", None)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(results))
    print(" ".join(f"{mib} MiB {results['stream'][str(mib)]:.0f} us" for mib in TIMING_SIZES_MIB))
    return 0


def inner_time_torch(out_path: str) -> int:
    """Bare NCCL through torch.distributed at world size 1, the same bytes as the session's out-of-place
    AllReduce: clone into a fresh buffer + all_reduce in place, median of 20 after 3 warm-ups."""
    import tempfile

    import torch
    import torch.distributed as dist

    with tempfile.NamedTemporaryFile(prefix="llmir-gpu-check-store-") as store:
        dist.init_process_group("nccl", init_method=f"file://{store.name}", rank=0, world_size=1)
        results = {}
        for mib in TIMING_SIZES_MIB:
            x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device="cuda")
            samples = []
            for iteration in range(23):
                torch.cuda.synchronize()
                start = time.perf_counter()
                y = x.clone()
                dist.all_reduce(y)
                torch.cuda.synchronize()
                if iteration >= 3:
                    samples.append(time.perf_counter() - start)
            results[str(mib)] = _median_us(samples)
        dist.destroy_process_group()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(results))
    print(f"torch {torch.__version__} nccl {torch.cuda.nccl.version()}: " +
          " ".join(f"{mib} MiB {results[str(mib)]:.0f} us" for mib in TIMING_SIZES_MIB))
    return 0


INNER: dict[str, Callable[..., int]] = {
    "collectives": inner_collectives,
    "placement": inner_placement,
    "killed-rank": inner_killed_rank,
    "time-session": inner_time_session,
    "time-torch": inner_time_torch,
}


# --------------------------------------------------------------------------- main


def shell_line(command: Sequence[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{key}={value}" for key, value in env.items()), shlex.join(command)])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="everything up to the first CUDA call (tools, plans, commands), then print the commands")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-check",
                        help="work folder: venv, plans, profiles, timings [build/gpu-check]")
    parser.add_argument("--venv", type=Path, default=None, help="the check's own venv [WORK/venv]")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the bundled model to partition")
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2_MODEL,
                        help="SmolLM2-135M's model.onnx; its plans are skipped when it is missing [models/smollm2]")
    parser.add_argument("--system-site-packages", action="store_true",
                        help="let the check's venv see the interpreter's packages (e.g. the CUDA/cuDNN nvidia-* "
                        "wheels PyTorch brought); the install still fails if that adds the CPU onnxruntime")
    parser.add_argument("--python", default=sys.executable, help="interpreter that creates the venv [this one]")
    parser.add_argument("--torch-python", default=None,
                        help="interpreter with PyTorch for the bare-NCCL timing [--python]")
    parser.add_argument("--inner", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.inner:
        name, *rest = args.inner
        return INNER[name](*rest)
    work = args.work.resolve()
    ctx = Context(work=work, venv=(args.venv or work / "venv").resolve(), base_python=args.python,
                  torch_python=args.torch_python or args.python, model=args.model.resolve(), dry_run=args.dry_run,
                  smollm2=args.smollm2.resolve(), system_site_packages=args.system_site_packages)
    if not args.dry_run:
        from llmir_onnx.runtime.launch import cuda_device_count  # numpy-free: fine under a bare python3

        count = cuda_device_count()
        if not count:
            print("FAIL gpu: no CUDA GPU visible (" + ("the CUDA driver (libcuda.so.1) is missing or cannot tell"
                  if count is None else "the CUDA driver reports 0 devices") + "); run this on a GPU machine, "
                  "or `scripts/gpu_check --dry-run` for the CPU-side part", flush=True)
            return 1
        ctx.record("gpu", "PASS", f"{count} CUDA device(s) visible")
    work.mkdir(parents=True, exist_ok=True)
    ok = find_tools(ctx)
    try:
        ctx.record("cuda library target", "PASS", cuda_library_target())
    except ValueError as error:
        ctx.record("cuda library target", "FAIL", str(error))
        ok = False
    if not args.dry_run and ok:
        ok = install(ctx) and check_cuda_library(ctx)
    if not ok:
        return 1
    # The dry run partitions with this interpreter (it needs the package); the real run with the venv's.
    plans = make_plans(ctx, sys.executable if args.dry_run else ctx.python)
    if plans is None:
        return 1
    if args.dry_run and not check_collectives_models(ctx):
        return 1
    checks = planned_checks(ctx, plans)
    lines = [shell_line(command, env) for _, command, env in checks]
    (work / "commands.sh").write_text("#!/bin/sh\n# what scripts/gpu_check runs after the install, in order\n"
                                      + "".join(f"# {name}\n{line}\n" for (name, _, _), line in zip(checks, lines,
                                                                                                   strict=True)))
    if args.dry_run:
        print("dry run: the real run would first install (LLMIR_BUILD_CUDA=on):")
        for command in install_commands(ctx):
            print(f"  {shlex.join(command)}")
        print(f"then run ({work / 'commands.sh'}):")
        for (name, _, _), line in zip(checks, lines, strict=True):
            print(f"  [{name}] {line}")
        return 0
    for stale in ("profiles", "timing"):  # a previous run's files would pass for this run's (or add a profile)
        shutil.rmtree(work / stale, ignore_errors=True)
    run_checks(ctx, checks)
    failed = [o.name for o in ctx.outcomes if o.status == "FAIL"]
    print(f"gpu check: {len(ctx.outcomes) - len(failed)} of {len(ctx.outcomes)} passed or skipped; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no failures"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
