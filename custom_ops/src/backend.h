// The two small interfaces every op is written against, so one kernel serves MPI (host memory),
// NCCL (device memory, CUDA stream) and MPI-staged CUDA tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "common.h"

namespace llmir {

// Memory where the op's tensors live.
class Device {
 public:
  using Buffer = std::unique_ptr<void, std::function<void(void*)>>;
  virtual ~Device() = default;
  virtual Buffer allocate(size_t bytes) = 0;
  // Copy `height` rows of `width` bytes; rows start every `*_pitch` bytes. CPU: memcpy; CUDA:
  // cudaMemcpy2DAsync on the op's stream (ordered before the collective that follows).
  virtual void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width,
                       size_t height) = 0;
  void copy(void* dst, const void* src, size_t bytes) { copy_2d(dst, bytes, src, bytes, bytes, 1); }
  // Blocking transfers of small control data (point-to-point headers) between host and this memory.
  virtual void to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void from_host(void* dst, const void* host_src, size_t bytes) = 0;
};

// One communicator per distinct group (ordered list of global ranks). Buffers are in the backend's
// memory; counts are elements. Calls block until done or until the LLMIR_COMM_TIMEOUT_S deadline.
class GroupComm {
 public:
  virtual ~GroupComm() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;  // position in the group
  // All members exchange `words` int64 host values (out: size() * words, in group order). Used for the
  // pre-flight check that every member runs the same op on the same dtype and shape.
  virtual void allgather_host_words(const int64_t* in, int64_t* out, size_t words, const OpLabel& label) = 0;
  virtual void allreduce(const void* in, void* out, size_t count, DType dtype, Reduction reduction,
                         const OpLabel& label) = 0;
  virtual void allgather(const void* in, void* out, size_t count_per_rank, DType dtype, const OpLabel& label) = 0;
  // Unequal parts: member m contributes counts[m] elements (0 allowed; `in` holds counts[rank()]), and `out`
  // receives them packed in group order (sum(counts) elements). Every member passes the same counts.
  virtual void allgatherv(const void* in, void* out, const std::vector<size_t>& counts, DType dtype,
                          const OpLabel& label) = 0;
  virtual void reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, Reduction reduction,
                              const OpLabel& label) = 0;
};

// Ordered byte stream to one peer. MPI matches on the tag; NCCL keeps pair order and the tag is checked
// through the message header.
class PeerLink {
 public:
  virtual ~PeerLink() = default;
  virtual void send(const void* buf, size_t bytes, int tag, const OpLabel& label) = 0;
  virtual void recv(void* buf, size_t bytes, int tag, const OpLabel& label) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual int world_rank() = 0;
  virtual int world_size() = 0;
  virtual Device& device() = 0;
  virtual GroupComm& group(const std::vector<int>& ranks, const OpLabel& label) = 0;
  virtual PeerLink& peer(int peer_rank, const OpLabel& label) = 0;
};

}  // namespace llmir
