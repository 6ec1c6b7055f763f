// CUDA tensors: NCCL on the CUDA EP's compute stream (default), or with LLMIR_CUDA_COMM=staging a copy to
// the host, MPI, and a copy back (several ranks may then share one GPU, which NCCL refuses).
#pragma once

#include <memory>
#include <string>

#include "backend.h"

namespace llmir::cuda {

// stream: KernelContext_GetGPUComputeStream; input_data: the op's input, whose device becomes current
// (NCCL communicators are per device).
std::unique_ptr<Backend> make_backend(void* stream, const void* input_data);
// Finalize, then destroy the healthy NCCL communicators (NCCL's documented order); "" or the failures.
std::string finalize();

}  // namespace llmir::cuda
