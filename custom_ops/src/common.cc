#include "common.h"

#include <sched.h>

#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace llmir {

bool dtype_supported(int onnx_elem_type) {
  switch (onnx_elem_type) {
    case 1: case 2: case 3: case 6: case 7: case 9: case 10: case 11: case 16:
      return true;
    default:
      return false;
  }
}

const char* dtype_name(int onnx_elem_type) {
  switch (onnx_elem_type) {
    case 1: return "float32";
    case 2: return "uint8";
    case 3: return "int8";
    case 4: return "uint16";
    case 5: return "int16";
    case 6: return "int32";
    case 7: return "int64";
    case 8: return "string";
    case 9: return "bool";
    case 10: return "float16";
    case 11: return "float64";
    case 12: return "uint32";
    case 13: return "uint64";
    case 16: return "bfloat16";
    default: return "unknown";
  }
}

DType to_dtype(int onnx_elem_type) {
  if (!dtype_supported(onnx_elem_type)) {
    throw Error(std::string("unsupported element type ") + dtype_name(onnx_elem_type) + " (" +
                std::to_string(onnx_elem_type) +
                "); supported: float32, float64, float16, bfloat16, int32, int64, int8, uint8, bool");
  }
  return static_cast<DType>(onnx_elem_type);
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kInt64: case DType::kFloat64: return 8;
    case DType::kFloat16: case DType::kBfloat16: return 2;
    case DType::kUint8: case DType::kInt8: case DType::kBool: return 1;
  }
  return 0;
}

Reduction parse_reduction(const std::string& name) {
  if (name == "sum") return Reduction::kSum;
  if (name == "max") return Reduction::kMax;
  if (name == "min") return Reduction::kMin;
  throw Error("unsupported reduction '" + name + "'; use \"sum\", \"max\" or \"min\"");
}

const char* reduction_name(Reduction reduction) {
  switch (reduction) {
    case Reduction::kSum: return "sum";
    case Reduction::kMax: return "max";
    case Reduction::kMin: return "min";
  }
  return "?";
}

std::string format_ranks(const std::vector<int>& ranks) {
  std::string out = "[";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(ranks[i]);
  }
  return out + "]";
}

std::string OpLabel::prefix() const {
  std::string out = "ai.llmir " + op + " (";
  if (!scope.empty()) out += scope + ", ";
  return out + "rank " + std::to_string(world_rank) + ")";
}

std::string OpLabel::message(const std::string& what) const {
  std::string out = prefix() + ": " + what;
  if (!node.empty()) out += " [node " + node + "]";
  return out;
}

double comm_timeout_seconds() {
  const char* text = std::getenv("LLMIR_COMM_TIMEOUT_S");
  if (text == nullptr || *text == '\0') return 300.0;
  char* end = nullptr;
  double value = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(value > 0)) {
    throw Error(std::string("LLMIR_COMM_TIMEOUT_S='") + text + "' is not a positive number of seconds");
  }
  return value;
}

std::string Deadline::timeout_message() const {
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%.1f", seconds_);
  return std::string("no answer from the group within ") + seconds +
         " s (LLMIR_COMM_TIMEOUT_S); a peer rank died or never reached this op";
}

void poll_pause(uint64_t iteration) {
  // The first few tests spin: small messages complete within microseconds. After that, give the core
  // away so that ranks sharing it (oversubscribed CPU runs) can make progress.
  if (iteration >= 16) sched_yield();
}

}  // namespace llmir
