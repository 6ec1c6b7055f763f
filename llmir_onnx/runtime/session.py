"""One rank of a plan as an onnxruntime session that speaks the ORIGINAL model's tensor names.

`RankSession(plan_dir)`:
  1. reads the manifest and sets up communication for this process's rank (launcher environment,
     ai.llmir library, world size checked against the plan);
  2. checks the files this rank reads (its model, its data files) against the manifest: inside the
     plan folder, the recorded sizes and, unless `check_hashes=False`, digests (plan/integrity.py);
  3. creates the onnxruntime session on the CPU, or on CUDA with `device_id` = the launcher's local
     rank (wrapped around the visible GPUs; CUDA EP + `libllmir_ops_cuda.so`, whose collectives use
     NCCL, or MPI through host memory with LLMIR_CUDA_COMM=staging);
  4. runs with I/O binding: `run(feeds, keep_on_device=...)` takes and returns tensors keyed by the
     original model's names. Outputs named in `keep_on_device` come back as `OrtValue`s left where
     the session put them (on the GPU for CUDA), so a KV cache fed back as the next step's past never
     crosses to the host; everything else comes back as numpy arrays.

Tensors are this rank's LOCAL parts (its heads of a KV cache, for example); `take(name, full)` cuts
this rank's part out of a full tensor with the manifest's slice binding.

`OriginalSession(model_path)` is the same interface over the unpartitioned model (bindings are the
identity), so the generation loop runs unchanged on both, which is how `--check` compares them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmir_onnx.errors import GenerationError, InputModelError, PlanError
from llmir_onnx.plan.integrity import check_rank_files
from llmir_onnx.plan.manifest import Manifest, RankEntry, SliceBinding
from llmir_onnx.runtime.launch import CommContext, cuda_device_count, onnxruntime_log_severity, setup_communication

# onnxruntime comes from an optional extra (cpu or gpu): it is imported inside the functions that make
# sessions, so importing this module does not need it.
if TYPE_CHECKING:
    import onnxruntime

DEVICE_CPU = "cpu"
DEVICE_CUDA = "cuda"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

Tensor = Any  # numpy.ndarray or onnxruntime.OrtValue


def load_rank_session(
    model_path: Path, rank: int, options: onnxruntime.SessionOptions, providers: list[Any]
) -> onnxruntime.InferenceSession:
    """An onnxruntime session of one rank's model; one that onnxruntime refuses is said as such, in a line."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as error:  # onnxruntime's pybind errors share no base class but Exception
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PlanError(
            f"rank {rank}'s model {model_path.name!r} does not load in onnxruntime: {reason}; this is a partition "
            "bug: please report it with the model"
        ) from error


def original_session(model_path: Path, device: str = "cpu") -> onnxruntime.InferenceSession:
    """An onnxruntime session of the original model on `device` (cpu, or cuda on GPU 0); one onnxruntime
    refuses is bad input, said in a line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = onnxruntime_log_severity()
    providers = execution_providers(device, 0)
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as error:  # onnxruntime's pybind errors share no base class but Exception
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputModelError(f"onnxruntime cannot run the original model {str(model_path)!r}: {reason}") from error


def execution_providers(device: str, device_id: int) -> list[Any]:
    """The providers list for `device`; a clear error when this onnxruntime build cannot do CUDA."""
    import onnxruntime as ort

    if device == DEVICE_CPU:
        return [CPU_PROVIDER]
    if device != DEVICE_CUDA:
        raise GenerationError(f"unknown device {device!r}; use {DEVICE_CPU!r} or {DEVICE_CUDA!r}")
    # LLMIR_CUDA_TF32=0: float32 matmuls in float32 (onnxruntime's CUDA EP default, use_tf32=1, keeps 10
    # mantissa bits of their inputs); scripts/gpu_check compares plans with the original this way.
    tf32 = os.environ.get("LLMIR_CUDA_TF32", "")
    if tf32 not in ("", "0", "1"):
        raise GenerationError(f"LLMIR_CUDA_TF32={tf32!r}: use 0 (float32 matmuls) or 1 (onnxruntime's default, TF32)")
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise GenerationError(
            f"--device cuda needs onnxruntime with the {CUDA_PROVIDER}, but this onnxruntime "
            f"({ort.__version__}) offers {ort.get_available_providers()}; install the gpu extra "
            "(pip install 'llmir-onnx[gpu]', i.e. onnxruntime-gpu) in place of onnxruntime"
        )
    options: dict[str, Any] = {"device_id": device_id, **({"use_tf32": tf32} if tf32 else {})}
    # The CPU provider stays as a fallback for shape ops that onnxruntime keeps on the host.
    return [(CUDA_PROVIDER, options), CPU_PROVIDER]


def rank_device_id(local_rank: int) -> int:
    """The GPU of a rank: its local rank, wrapped around the visible GPUs.

    More ranks than GPUs on a node (e.g. the 2-rank smoke test on one GPU) is only valid with
    LLMIR_CUDA_COMM=staging: NCCL refuses two ranks on one device ("Duplicate GPU detected")."""
    count = cuda_device_count()
    return local_rank % count if count else local_rank


@dataclass(frozen=True)
class LocalTensorInfo:
    """A session input as this rank sees it (dims are ints or symbolic names)."""

    local: str
    shape: tuple[int | str | None, ...]
    numpy_dtype: np.dtype


_ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class BoundSession:
    """An onnxruntime session run through I/O binding, addressed by original tensor names."""

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        inputs: list[SliceBinding],
        outputs: list[SliceBinding],
        device: str,
        device_id: int,
    ) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self.input_bindings = {binding.original: binding for binding in inputs}
        self.output_bindings = {binding.original: binding for binding in outputs}
        self._local_inputs = {arg.name: arg for arg in session.get_inputs()}
        bound = {binding.local for binding in outputs}
        # Outputs of the rank's graph that are no original output (e.g. a pipeline stage's Send
        # results): bound too, so that onnxruntime never skips the nodes that produce them.
        self._extra_outputs = [arg.name for arg in session.get_outputs() if arg.name not in bound]

    def _stretched_run(self) -> contextlib.AbstractContextManager[None]:
        """Around a run: the rank's LLMIR_COMPUTE_STRETCH (RankSession); nothing for other sessions."""
        return contextlib.nullcontext()

    @property
    def input_names(self) -> list[str]:
        return list(self.input_bindings)

    @property
    def output_names(self) -> list[str]:
        return list(self.output_bindings)

    def input_info(self, original: str) -> LocalTensorInfo:
        binding = self.input_bindings[original]
        arg = self._local_inputs[binding.local]
        dtype = _ORT_TYPE_TO_NUMPY.get(arg.type)
        if dtype is None:
            raise GenerationError(f"input {original!r} has type {arg.type}, which generation does not handle")
        return LocalTensorInfo(binding.local, tuple(arg.shape), np.dtype(dtype))

    def take(self, original: str, full: np.ndarray) -> np.ndarray:
        """This rank's part of a full (original-shaped) input tensor."""
        return np.ascontiguousarray(self.input_bindings[original].take(full))

    def run(self, feeds: Mapping[str, Tensor], keep_on_device: Collection[str] = ()) -> dict[str, Tensor]:
        """Run once. `feeds` must hold every input this rank takes (numpy arrays or OrtValues).

        Returns every output this rank produces: those in `keep_on_device` as OrtValues on the
        session's device, the others as numpy arrays.
        """
        import onnxruntime as ort

        missing = sorted(set(self.input_bindings) - set(feeds))
        if missing:
            raise GenerationError(f"this rank's model needs inputs {missing} that the feeds lack")
        binding = self.session.io_binding()
        for original, local in ((name, b.local) for name, b in self.input_bindings.items()):
            value = feeds[original]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(local, value)
            else:
                binding.bind_cpu_input(local, np.ascontiguousarray(value))
        names = list(self.output_bindings)
        for original in names:
            on_device = original in keep_on_device
            device = self.device if on_device else DEVICE_CPU
            binding.bind_output(self.output_bindings[original].local, device, self.device_id if on_device else 0)
        for local in self._extra_outputs:
            binding.bind_output(local, DEVICE_CPU)
        with self._stretched_run():
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        values = binding.get_outputs()[: len(names)]
        return {
            name: value if name in keep_on_device else value.numpy()
            for name, value in zip(names, values, strict=True)
        }


class RankSession(BoundSession):
    """This process's rank of a plan (see the module docstring)."""

    def __init__(
        self,
        plan_dir: str | Path,
        *,
        device: str = DEVICE_CPU,
        intra_op_num_threads: int | None = None,
        comm: CommContext | None = None,
        check_hashes: bool = True,
    ) -> None:
        self.plan_dir = Path(plan_dir)
        self.manifest = Manifest.read(self.plan_dir)
        self.comm = comm or setup_communication(
            cuda=device == DEVICE_CUDA, expected_world_size=self.manifest.world_size
        )
        self.entry: RankEntry = self.manifest.rank_entry(self.comm.rank)
        check_rank_files(self.plan_dir, self.manifest, self.comm.rank, check_hashes=check_hashes)
        model_path = self.plan_dir / self.entry.file
        device_id = rank_device_id(self.comm.local_rank) if device == DEVICE_CUDA else 0
        providers = execution_providers(device, device_id)
        options = self.comm.session_options(intra_op_num_threads=intra_op_num_threads)
        # Op failures (a lost peer) come back as exceptions that the caller reports on one line;
        # onnxruntime's own log would print each of them a second time.
        options.log_severity_level = 4
        session = load_rank_session(model_path, self.comm.rank, options, providers)
        if device == DEVICE_CUDA and CUDA_PROVIDER not in session.get_providers():
            raise GenerationError(f"rank {self.comm.rank}: onnxruntime did not enable {CUDA_PROVIDER} on device "
                                  f"{device_id}; check the CUDA/cuDNN installation")
        super().__init__(session, self.entry.inputs, self.entry.outputs, device, device_id)

    @property
    def rank(self) -> int:
        return self.comm.rank

    def _stretched_run(self) -> contextlib.AbstractContextManager[None]:
        return self.comm.stretched_run()


class OriginalSession(BoundSession):
    """The unpartitioned model behind the same interface (identity bindings), for reference runs."""

    def __init__(
        self, model_path: str | Path, *, device: str = DEVICE_CPU, intra_op_num_threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = onnxruntime_log_severity()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        session = ort.InferenceSession(str(model_path), options, providers=execution_providers(device, 0))

        def identity(name: str) -> SliceBinding:
            return SliceBinding(name, name, None, 0, 0)

        super().__init__(
            session,
            [identity(arg.name) for arg in session.get_inputs()],
            [identity(arg.name) for arg in session.get_outputs()],
            device,
            0,
        )
