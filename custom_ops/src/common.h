// Shared vocabulary of the ai.llmir ops: errors, element types, reductions, op labels, deadlines.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmir {

// Every failure is thrown as this and turned into an OrtStatus by the op wrapper.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ONNX TensorProto element types we move (values equal ONNXTensorElementDataType).
enum class DType : int {
  kFloat32 = 1,
  kUint8 = 2,
  kInt8 = 3,
  kInt32 = 6,
  kInt64 = 7,
  kBool = 9,
  kFloat16 = 10,
  kFloat64 = 11,
  kBfloat16 = 16,
};

bool dtype_supported(int onnx_elem_type);
DType to_dtype(int onnx_elem_type);  // throws Error naming the supported list
size_t dtype_size(DType dtype);
const char* dtype_name(int onnx_elem_type);

enum class Reduction { kSum, kMax, kMin };
Reduction parse_reduction(const std::string& name);  // throws Error
const char* reduction_name(Reduction reduction);

// What a message about an op names: "ai.llmir AllReduce (group [0,1], rank 0)" plus the node.
struct OpLabel {
  std::string op;          // "AllReduce"
  std::string node;        // node name, may be empty
  std::string scope;       // "group [0,1]" or "peer 3"
  int world_rank = -1;

  std::string prefix() const;                          // "ai.llmir AllReduce (group [0,1], rank 0)"
  std::string message(const std::string& what) const;  // prefix + ": " + what + " [node n]"
};

std::string format_ranks(const std::vector<int>& ranks);  // "[0,1]"

// LLMIR_COMM_TIMEOUT_S, read on every op so a test can change it between runs (cheap: one getenv).
double comm_timeout_seconds();

class Deadline {
 public:
  explicit Deadline(double seconds)
      : seconds_(seconds),
        end_(std::chrono::steady_clock::now() +
             std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds))) {}
  bool expired() const { return std::chrono::steady_clock::now() >= end_; }
  double seconds() const { return seconds_; }
  std::string timeout_message() const;  // "no answer from the group within 5.0 s (LLMIR_COMM_TIMEOUT_S); ..."

 private:
  double seconds_;
  std::chrono::steady_clock::time_point end_;
};

// A cheap wait step between completion tests: yield the core (4 ranks share 2 cores in CI).
void poll_pause(uint64_t iteration);

// Header of a point-to-point message: [elem_type, ndim, dims[kMaxRank]..., tag]. Fixed size so the
// receiver (and NCCL, which has no probe) knows how much to expect before it knows the shape.
constexpr int kMaxRank = 32;
constexpr int kHeaderWords = 2 + kMaxRank + 1;

}  // namespace llmir
