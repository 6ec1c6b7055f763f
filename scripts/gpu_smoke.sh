#!/usr/bin/env bash
# GPU smoke test of the runtime's CUDA path (one GPU is enough). See docs/RUNTIME.md.
#
#   scripts/gpu_smoke.sh            # uses `python` and `llmir-onnx` from PATH (an environment with the
#                                   # package installed with the gpu extra: onnxruntime-gpu + nvidia-nccl)
#   PYTHON=/path/to/python scripts/gpu_smoke.sh
#
# Checks, each printed as PASS/FAIL (exit status = number of failures):
#   1. the CUDA provider and libllmir_ops_cuda.so are there;
#   2. world 1, NCCL: an ai.llmir AllReduce on a CUDA tensor (NCCL communicator of one rank), and a
#      RankSession step whose KV cache comes back as an OrtValue on the GPU (I/O binding);
#   3. world 1, NCCL: `generate --device cuda --check` on a tp 1 plan equals the original's greedy tokens;
#   4. 2 ranks on the one GPU, LLMIR_CUDA_COMM=staging: `generate --device cuda --check` on a tp 2 plan;
#   5. the same with rank 1 killed mid-generation: every rank ends non-zero within the timeout.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CLI=("$PYTHON" -m llmir_onnx.cli.main)
MODEL="$ROOT/models/llama-gqa-torch-legacy/model.onnx"
WORK="$(mktemp -d -t llmir-gpu-smoke-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
FAILURES=0
PROMPT="5,17,42,99,3,250"

step() {  # step NAME COMMAND...
    local name="$1"; shift
    echo "=== $name"
    if "$@"; then echo "PASS $name"; else echo "FAIL $name"; FAILURES=$((FAILURES + 1)); fi
}

nvidia-smi -L || echo "(nvidia-smi not found)"

step "cuda provider and library" "$PYTHON" - <<'PY'
import onnxruntime as ort
from llmir_onnx.runtime.launch import custom_ops_library_path
from llmir_onnx.runtime.session import cuda_device_count
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu is not installed"
print("library", custom_ops_library_path(cuda=True), "GPUs", cuda_device_count())
PY

"${CLI[@]}" partition "$MODEL" --tp 1 -o "$WORK/tp1" >/dev/null && \
"${CLI[@]}" partition "$MODEL" --tp 2 -o "$WORK/tp2" >/dev/null || { echo "FAIL partition"; exit 99; }

step "world 1 nccl: AllReduce on CUDA + KV cache stays on the GPU" env LLMIR_CUDA_COMM=nccl "$PYTHON" - "$WORK/tp1" <<'PY'
import sys
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from llmir_onnx.runtime.generate import kv_cache_pairs
from llmir_onnx.runtime.session import RankSession

session = RankSession(sys.argv[1], device="cuda")
node = helper.make_node("AllReduce", ["x"], ["y"], domain="ai.llmir", reduction="sum", group=[0])
graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.llmir", 1)])
model.ir_version = 8
options = session.comm.session_options()
options.log_severity_level = 1
reduce = ort.InferenceSession(model.SerializeToString(), options,
                              providers=[("CUDAExecutionProvider", {"device_id": session.device_id})])
x = np.arange(4, dtype=np.float32)
(y,) = reduce.run(None, {"x": x})
assert np.array_equal(y, x), y
pairs = kv_cache_pairs(session.input_names, session.output_names)
feeds = {"input_ids": np.array([[5, 17, 42]]), "attention_mask": np.ones((1, 3), np.int64),
         "position_ids": np.arange(3)[None]}
for past in pairs.values():
    info = session.input_info(past)
    feeds[past] = np.zeros((1, info.shape[1], 0, info.shape[3]), info.numpy_dtype)
out = session.run(feeds, keep_on_device=pairs)
devices = {out[name].device_name() for name in pairs}
print("present.* on", devices, "logits", out["logits"].shape)
assert devices == {"cuda"}, devices
PY

step "world 1 nccl: generate --check" env LLMIR_CUDA_COMM=nccl \
    "${CLI[@]}" generate "$WORK/tp1" --device cuda --prompt-ids "$PROMPT" --max-new-tokens 16 --check

step "2 ranks on one GPU, staging: generate --check" env LLMIR_CUDA_COMM=staging \
    "${CLI[@]}" generate "$WORK/tp2" --device cuda --prompt-ids "$PROMPT" --max-new-tokens 16 --check

killed_rank_ends_job() {
    local start end status
    start=$(date +%s)
    env LLMIR_CUDA_COMM=staging LLMIR_COMM_TIMEOUT_S=5 LLMIR_FAULT_KILL_RANK_AT=1:4 \
        "${CLI[@]}" generate "$WORK/tp2" --device cuda --prompt-ids "$PROMPT" --max-new-tokens 40 \
        2>"$WORK/fault.err"
    status=$?
    end=$(date +%s)
    tail -1 "$WORK/fault.err"
    echo "exit $status after $((end - start)) s"
    [ "$status" -ne 0 ] && [ $((end - start)) -lt 30 ] && grep -q "rank 1 died" "$WORK/fault.err"
}
step "2 ranks on one GPU, staging: killed rank ends the job" killed_rank_ends_job

echo "gpu smoke: $FAILURES failure(s)"
exit "$FAILURES"
