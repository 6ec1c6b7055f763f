// The one implementation of each ai.llmir op, written against Backend (backend.h).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend.h"

namespace llmir {

enum class OpKind { kAllReduce, kAllGather, kReduceScatter, kSend, kRecv };
const char* op_name(OpKind kind);

// Attributes, parsed and validated once when onnxruntime creates the kernel.
struct OpAttributes {
  OpKind kind = OpKind::kAllReduce;
  std::string node;
  Reduction reduction = Reduction::kSum;
  int64_t axis = 0;
  std::vector<int64_t> group;  // empty: the whole world
  int64_t peer = -1;
  int64_t tag = 0;
  bool has_shape = false;
  std::vector<int64_t> shape;  // Recv: -1 = unknown dim
};

// User tags must stay below the tags the library reserves on MPI_COMM_WORLD.
constexpr int64_t kMaxUserTag = 32000;

struct InputTensor {
  int elem_type = 0;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t count = 0;
};

// Allocates the op's output (in the backend's memory) and returns its data pointer.
using AllocateOutput = std::function<void*(const std::vector<int64_t>& shape)>;

void run_op(Backend& backend, const OpAttributes& attributes, const InputTensor& input, const AllocateOutput& output);

}  // namespace llmir
