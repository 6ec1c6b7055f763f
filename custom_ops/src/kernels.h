// The one implementation of each ai.llmir op, written against Backend (backend.h).
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
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
  // AllGather of unequal parts: one length along `axis` per group member, in group order (0 allowed).
  bool has_sizes = false;
  std::vector<int64_t> sizes;
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

// The (dtype, shape) signatures one node's group has already agreed on, so that the pre-flight check
// (agree() in kernels.cc: a host round-trip per call, and on NCCL two blocking copies) runs once per node
// and shape instead of on every call. Every member caches exactly the signatures that passed a check, so
// all members hold the same set and skip or check together. What a cache gives up: two members that
// both pass shapes agreed before, but different ones in the same call, are no longer caught (a plan or
// feed bug; LLMIR_CHECK_EVERY_CALL=1 checks every call). One member on a known shape and another on a
// new one wait on different exchanges: the op fails by LLMIR_COMM_TIMEOUT_S or by the backend's error.
class AgreedSignatures {
 public:
  bool contains(int elem_type, const std::vector<int64_t>& shape) const;
  void add(int elem_type, const std::vector<int64_t>& shape);

 private:
  static constexpr size_t kMaxEntries = 4096;  // prompt lengths vary; beyond this, new shapes keep checking
  mutable std::mutex mutex_;
  std::set<std::vector<int64_t>> agreed_;  // [elem_type, dims...]
};

// `agreed`: the node's cache, or nullptr to check every call.
void run_op(Backend& backend, const OpAttributes& attributes, const InputTensor& input, const AllocateOutput& output,
            AgreedSignatures* agreed);

// Process-wide number of signature exchanges so far (exported as llmir_signature_checks for tests and
// benchmarks that prove a repeated call does no extra round).
uint64_t signature_checks();

}  // namespace llmir
