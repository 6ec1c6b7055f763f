#include "cuda_backend.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "mpi_backend.h"
#include "tcp_store.h"
#include "world.h"

namespace llmir::cuda {
namespace {

void check_cuda(cudaError_t code, const char* what) {
  if (code != cudaSuccess) {
    throw Error(std::string("ai.llmir: ") + what + " failed: " + cudaGetErrorName(code) + ": " +
                cudaGetErrorString(code));
  }
}

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(cudaStream_t stream) : stream_(stream) {}
  Buffer allocate(size_t bytes) override {
    void* data = nullptr;
    check_cuda(cudaMallocAsync(&data, bytes ? bytes : 1, stream_), "cudaMallocAsync");
    cudaStream_t stream = stream_;
    return Buffer(data, [stream](void* p) { cudaFreeAsync(p, stream); });
  }
  void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t height) override {
    if (width == 0 || height == 0) return;
    check_cuda(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, cudaMemcpyDefault, stream_),
               "cudaMemcpy2DAsync");
  }
  void to_host(void* host_dst, const void* src, size_t bytes) override {
    check_cuda(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  void from_host(void* dst, const void* host_src, size_t bytes) override {
    check_cuda(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // host_src may go away after return
  }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_;
};

// ----------------------------------------------------------------------------------------------- NCCL

enum class CommKind { kGroup, kPair };

struct NcclComm {
  ncclComm_t comm = nullptr;
  std::vector<int> ranks;
  bool broken = false;
};

std::mutex g_nccl_mutex;
std::map<std::tuple<int, std::vector<int>, int>, std::unique_ptr<NcclComm>>& nccl_comms() {
  static auto* comms = new std::map<std::tuple<int, std::vector<int>, int>, std::unique_ptr<NcclComm>>();
  return *comms;
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return ncclFloat32;
    case DType::kFloat64: return ncclFloat64;
    case DType::kFloat16: return ncclFloat16;
    case DType::kBfloat16: return ncclBfloat16;
    case DType::kInt32: return ncclInt32;
    case DType::kInt64: return ncclInt64;
    case DType::kInt8: return ncclInt8;
    case DType::kUint8: case DType::kBool: return ncclUint8;  // bool: max = or, min = and on 0/1 bytes
  }
  return ncclUint8;
}

ncclRedOp_t nccl_op(Reduction reduction) {
  switch (reduction) {
    case Reduction::kSum: return ncclSum;
    case Reduction::kMax: return ncclMax;
    case Reduction::kMin: return ncclMin;
  }
  return ncclSum;
}

[[noreturn]] void fail(NcclComm& state, const OpLabel& label, const std::string& what) {
  if (state.comm != nullptr) ncclCommAbort(state.comm);  // frees the GPU work stuck waiting for a peer
  state.comm = nullptr;
  state.broken = true;
  mpi::mark_broken();
  throw Error(label.message(what));
}

std::string nccl_error(NcclComm& state, ncclResult_t code) {
  std::string text = std::string("NCCL error: ") + ncclGetErrorString(code);
  if (state.comm != nullptr) {
    const char* last = ncclGetLastError(state.comm);
    if (last != nullptr && *last) text += std::string(" (") + last + ")";
  }
  if (code == ncclInvalidUsage) {
    text += "; if several ranks share one GPU, NCCL refuses them: set LLMIR_CUDA_COMM=staging";
  }
  return text;
}

void check_nccl(NcclComm& state, ncclResult_t code, const OpLabel& label) {
  if (code != ncclSuccess && code != ncclInProgress) fail(state, label, nccl_error(state, code));
}

// The communicators are non-blocking: poll the async state until NCCL has enqueued the operation (or
// set up the communicator), and with `on_stream` also the stream until the operation finished, so that
// a peer that never arrives becomes a timeout error and an abort instead of a GPU kernel waiting
// forever. `on_stream` synchronises the host with the stream: collectives pass it only under
// LLMIR_CUDA_WAIT=host (see host_waits()).
void wait(NcclComm& state, bool on_stream, cudaStream_t stream, const OpLabel& label) {
  const Deadline deadline(comm_timeout_seconds());
  for (uint64_t iteration = 0;; ++iteration) {
    ncclResult_t async = ncclSuccess;
    const ncclResult_t code = ncclCommGetAsyncError(state.comm, &async);
    if (code != ncclSuccess) fail(state, label, nccl_error(state, code));
    if (async != ncclSuccess && async != ncclInProgress) fail(state, label, nccl_error(state, async));
    if (async == ncclSuccess) {
      if (!on_stream) return;  // communicator set-up: nothing was enqueued
      const cudaError_t query = cudaStreamQuery(stream);
      if (query == cudaSuccess) return;
      if (query != cudaErrorNotReady) {
        fail(state, label, std::string("CUDA error on the op's stream: ") + cudaGetErrorString(query));
      }
    }
    if (deadline.expired()) fail(state, label, deadline.timeout_message());
    poll_pause(iteration);
  }
}

int64_t hash_key(const std::string& key) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : key) hash = (hash ^ c) * 1099511628211ull;
  return static_cast<int64_t>(hash >> 1);
}

// The unique id travels from the group's lowest rank to the other members over MPI when this is an MPI world, else over
// the launcher-environment TCP store.
void share_unique_id(const std::vector<int>& ranks, const std::string& key, ncclUniqueId* id, const OpLabel& label) {
  if (world::kind() == world::Kind::kMpi) {
    mpi::rendezvous(ranks, hash_key(key), id, sizeof(*id), label);
    return;
  }
  if (world::rank() == *std::min_element(ranks.begin(), ranks.end())) {
    store::set(key, std::string(reinterpret_cast<const char*>(id), sizeof(*id)), label);
  } else {
    const std::string value = store::get(key, label);
    if (value.size() != sizeof(*id)) throw Error(label.message("corrupt NCCL id in the bootstrap store"));
    std::memcpy(id, value.data(), sizeof(*id));
  }
}

NcclComm& nccl_comm(CommKind kind, const std::vector<int>& ranks, const OpLabel& label) {
  std::lock_guard<std::mutex> lock(g_nccl_mutex);
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  auto& slot = nccl_comms()[{static_cast<int>(kind), ranks, device}];
  if (slot) {
    if (slot->broken) {
      throw Error(label.message("the NCCL communicator of " + format_ranks(ranks) +
                                " is unusable after an earlier failure or timeout; restart the ranks"));
    }
    return *slot;
  }
  slot = std::make_unique<NcclComm>();
  slot->ranks = ranks;
  try {
    const int me = world::rank();
    int index = 0;
    while (ranks[static_cast<size_t>(index)] != me) ++index;
    ncclUniqueId id{};
    if (me == *std::min_element(ranks.begin(), ranks.end())) {  // the root of share_unique_id
      const ncclResult_t code = ncclGetUniqueId(&id);
      if (code != ncclSuccess) fail(*slot, label, nccl_error(*slot, code));
    }
    const std::string key =
        std::string("llmir/nccl/") + (kind == CommKind::kGroup ? "group" : "pair") + "/" + format_ranks(ranks);
    share_unique_id(ranks, key, &id, label);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t code = ncclCommInitRankConfig(&slot->comm, static_cast<int>(ranks.size()), id, index, &config);
    check_nccl(*slot, code, label);
    wait(*slot, false, nullptr, label);
  } catch (...) {
    slot->broken = true;  // a half-made communicator is never handed out
    mpi::mark_broken();
    throw;
  }
  return *slot;
}

// LLMIR_CUDA_WAIT=stream (default): a collective returns once NCCL has enqueued it on the EP's stream;
// onnxruntime's stream order puts it before the nodes that read its output, and the host meets the GPU
// only where onnxruntime copies an output to the host. A peer that never arrives then leaves the GPU
// waiting (no LLMIR_COMM_TIMEOUT_S): `generate`/`verify` jobs end such ranks from their supervisor, a
// launcher's cleanup does under mpiexec/torchrun. LLMIR_CUDA_WAIT=host: every collective also polls
// its stream until done, so a lost peer becomes this op's timeout error (one host sync per op).
bool host_waits() {
  const char* mode = std::getenv("LLMIR_CUDA_WAIT");
  if (mode == nullptr || *mode == '\0' || std::strcmp(mode, "stream") == 0) return false;
  if (std::strcmp(mode, "host") == 0) return true;
  throw Error(std::string("ai.llmir: LLMIR_CUDA_WAIT='") + mode + "': use \"stream\" (default) or \"host\"");
}

class NcclGroupComm final : public GroupComm {
 public:
  NcclGroupComm(NcclComm& state, CudaDevice& device, bool host_waits)
      : state_(state), device_(device), host_waits_(host_waits) {}
  int size() const override { return static_cast<int>(state_.ranks.size()); }
  int rank() const override {
    int index = 0;
    while (state_.ranks[static_cast<size_t>(index)] != world::rank()) ++index;
    return index;
  }
  void allgather_host_words(const int64_t* in, int64_t* out, size_t words, const OpLabel& label) override {
    Device::Buffer mine = device_.allocate(words * sizeof(int64_t));
    Device::Buffer all = device_.allocate(words * sizeof(int64_t) * state_.ranks.size());
    device_.from_host(mine.get(), in, words * sizeof(int64_t));
    check_nccl(state_, ncclAllGather(mine.get(), all.get(), words, ncclInt64, state_.comm, device_.stream()), label);
    wait(state_, true, device_.stream(), label);
    device_.to_host(out, all.get(), words * sizeof(int64_t) * state_.ranks.size());
  }
  void allreduce(const void* in, void* out, size_t count, DType dtype, Reduction reduction,
                 const OpLabel& label) override {
    check_nccl(state_,
               ncclAllReduce(in, out, count, nccl_type(dtype), nccl_op(reduction), state_.comm, device_.stream()),
               label);
    wait(state_, host_waits_, device_.stream(), label);
  }
  void allgather(const void* in, void* out, size_t count_per_rank, DType dtype, const OpLabel& label) override {
    check_nccl(state_, ncclAllGather(in, out, count_per_rank, nccl_type(dtype), state_.comm, device_.stream()),
               label);
    wait(state_, host_waits_, device_.stream(), label);
  }
  // NCCL has no allgatherv. One ncclBroadcast per member with a non-empty part, rooted at that member and
  // writing straight to its offset in `out`, all inside one ncclGroupStart/End (NCCL launches the group as
  // one operation). Chosen over padding every part to the largest and compacting afterwards: that sends
  // (members * max - sum) padding elements, needs a members * max staging buffer and a compaction copy, while
  // the broadcasts move exactly each part. Members skip the same empty parts: the counts were agreed.
  void allgatherv(const void* in, void* out, const std::vector<size_t>& counts, DType dtype,
                  const OpLabel& label) override {
    const size_t element = dtype_size(dtype);
    const int me = rank();
    ncclResult_t first_error = ncclGroupStart();
    check_nccl(state_, first_error, label);
    size_t offset = 0;
    for (size_t root = 0; root < counts.size(); ++root) {
      if (counts[root] != 0 && (first_error == ncclSuccess || first_error == ncclInProgress)) {
        const void* send = static_cast<int>(root) == me ? in : nullptr;  // only the root's buffer is read
        first_error = ncclBroadcast(send, static_cast<char*>(out) + offset * element, counts[root], nccl_type(dtype),
                                    static_cast<int>(root), state_.comm, device_.stream());
      }
      offset += counts[root];
    }
    const ncclResult_t end = ncclGroupEnd();  // always closed, even after a failed call inside the group
    check_nccl(state_, first_error, label);
    check_nccl(state_, end, label);
    wait(state_, host_waits_, device_.stream(), label);
  }
  void reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, Reduction reduction,
                      const OpLabel& label) override {
    check_nccl(state_,
               ncclReduceScatter(in, out, count_per_rank, nccl_type(dtype), nccl_op(reduction), state_.comm,
                                 device_.stream()),
               label);
    wait(state_, host_waits_, device_.stream(), label);
  }

 private:
  NcclComm& state_;
  CudaDevice& device_;
  bool host_waits_;
};

// NCCL has no tags: messages between a pair are ordered, and Recv checks the tag carried in the header.
class NcclPeerLink final : public PeerLink {
 public:
  NcclPeerLink(NcclComm& state, CudaDevice& device, int peer_index)
      : state_(state), device_(device), peer_index_(peer_index) {}
  void send(const void* buf, size_t bytes, int, const OpLabel& label) override {
    check_nccl(state_, ncclSend(buf, bytes, ncclUint8, peer_index_, state_.comm, device_.stream()), label);
    wait(state_, true, device_.stream(), label);
  }
  void recv(void* buf, size_t bytes, int, const OpLabel& label) override {
    check_nccl(state_, ncclRecv(buf, bytes, ncclUint8, peer_index_, state_.comm, device_.stream()), label);
    wait(state_, true, device_.stream(), label);
  }

 private:
  NcclComm& state_;
  CudaDevice& device_;
  int peer_index_;
};

// -------------------------------------------------------------------------------------------- staging

class StagingGroupComm final : public GroupComm {
 public:
  StagingGroupComm(GroupComm& host, CudaDevice& device) : host_(host), device_(device) {}
  int size() const override { return host_.size(); }
  int rank() const override { return host_.rank(); }
  void allgather_host_words(const int64_t* in, int64_t* out, size_t words, const OpLabel& label) override {
    host_.allgather_host_words(in, out, words, label);
  }
  void allreduce(const void* in, void* out, size_t count, DType dtype, Reduction reduction,
                 const OpLabel& label) override {
    const size_t bytes = count * dtype_size(dtype);
    std::vector<char> host_in(bytes), host_out(bytes);
    device_.to_host(host_in.data(), in, bytes);
    host_.allreduce(host_in.data(), host_out.data(), count, dtype, reduction, label);
    device_.from_host(out, host_out.data(), bytes);
  }
  void allgather(const void* in, void* out, size_t count_per_rank, DType dtype, const OpLabel& label) override {
    const size_t bytes = count_per_rank * dtype_size(dtype);
    std::vector<char> host_in(bytes), host_out(bytes * static_cast<size_t>(size()));
    device_.to_host(host_in.data(), in, bytes);
    host_.allgather(host_in.data(), host_out.data(), count_per_rank, dtype, label);
    device_.from_host(out, host_out.data(), host_out.size());
  }
  void allgatherv(const void* in, void* out, const std::vector<size_t>& counts, DType dtype,
                  const OpLabel& label) override {
    const size_t element = dtype_size(dtype);
    size_t total = 0;
    for (size_t count : counts) total += count;
    const size_t mine = counts[static_cast<size_t>(rank())];
    std::vector<char> host_in(mine * element), host_out(total * element);
    if (mine) device_.to_host(host_in.data(), in, host_in.size());
    host_.allgatherv(host_in.data(), host_out.data(), counts, dtype, label);
    device_.from_host(out, host_out.data(), host_out.size());
  }
  void reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, Reduction reduction,
                      const OpLabel& label) override {
    const size_t bytes = count_per_rank * dtype_size(dtype);
    std::vector<char> host_in(bytes * static_cast<size_t>(size())), host_out(bytes);
    device_.to_host(host_in.data(), in, host_in.size());
    host_.reduce_scatter(host_in.data(), host_out.data(), count_per_rank, dtype, reduction, label);
    device_.from_host(out, host_out.data(), bytes);
  }

 private:
  GroupComm& host_;
  CudaDevice& device_;
};

class StagingPeerLink final : public PeerLink {
 public:
  StagingPeerLink(PeerLink& host, CudaDevice& device) : host_(host), device_(device) {}
  void send(const void* buf, size_t bytes, int tag, const OpLabel& label) override {
    std::vector<char> staged(bytes);
    device_.to_host(staged.data(), buf, bytes);
    host_.send(staged.data(), bytes, tag, label);
  }
  void recv(void* buf, size_t bytes, int tag, const OpLabel& label) override {
    std::vector<char> staged(bytes);
    host_.recv(staged.data(), bytes, tag, label);
    device_.from_host(buf, staged.data(), bytes);
  }

 private:
  PeerLink& host_;
  CudaDevice& device_;
};

bool use_staging() {
  const char* mode = std::getenv("LLMIR_CUDA_COMM");
  if (mode == nullptr || *mode == '\0' || std::strcmp(mode, "nccl") == 0) return false;
  if (std::strcmp(mode, "staging") == 0) return true;
  throw Error(std::string("ai.llmir: LLMIR_CUDA_COMM='") + mode + "': use \"nccl\" (default) or \"staging\"");
}

// Built per kernel call (it holds the call's stream); the communicators it hands out are cached.
class CudaBackend final : public Backend {
 public:
  CudaBackend(cudaStream_t stream, bool staging) : device_(stream), staging_(staging) {}
  int world_rank() override { return world::rank(); }
  int world_size() override { return world::size(); }
  Device& device() override { return device_; }
  GroupComm& group(const std::vector<int>& ranks, const OpLabel& label) override {
    if (staging_) {
      require_mpi(label);
      staged_group_ = std::make_unique<StagingGroupComm>(mpi::group_comm(ranks, label), device_);
      return *staged_group_;
    }
    nccl_group_ = std::make_unique<NcclGroupComm>(nccl_comm(CommKind::kGroup, ranks, label), device_, host_waits());
    return *nccl_group_;
  }
  PeerLink& peer(int peer_rank, const OpLabel& label) override {
    if (staging_) {
      require_mpi(label);
      staged_peer_ = std::make_unique<StagingPeerLink>(mpi::peer_link(peer_rank, label), device_);
      return *staged_peer_;
    }
    const int me = world::rank();
    const std::vector<int> pair = {std::min(me, peer_rank), std::max(me, peer_rank)};
    nccl_peer_ = std::make_unique<NcclPeerLink>(nccl_comm(CommKind::kPair, pair, label), device_,
                                                peer_rank == pair[0] ? 0 : 1);
    return *nccl_peer_;
  }

 private:
  static void require_mpi(const OpLabel& label) {
    if (world::kind() != world::Kind::kMpi) {
      throw Error(label.message("LLMIR_CUDA_COMM=staging moves data over MPI: launch the ranks with mpiexec"));
    }
  }
  CudaDevice device_;
  bool staging_;
  std::unique_ptr<GroupComm> staged_group_, nccl_group_;
  std::unique_ptr<PeerLink> staged_peer_, nccl_peer_;
};

}  // namespace

std::unique_ptr<Backend> make_backend(void* stream, const void* input_data) {
  if (input_data != nullptr) {
    cudaPointerAttributes attributes{};
    if (cudaPointerGetAttributes(&attributes, input_data) == cudaSuccess &&
        attributes.type == cudaMemoryTypeDevice) {
      int current = -1;
      check_cuda(cudaGetDevice(&current), "cudaGetDevice");
      if (current != attributes.device) check_cuda(cudaSetDevice(attributes.device), "cudaSetDevice");
    } else {
      cudaGetLastError();  // host pointers (Recv's `like`) are not an error
    }
  }
  return std::make_unique<CudaBackend>(static_cast<cudaStream_t>(stream), use_staging());
}

// NCCL's documented teardown of a non-blocking communicator (nccl.h, ncclCommFinalize): ncclCommFinalize
// flushes the issued work and leaves the communicator ncclInProgress until it is globally quiescent;
// once ncclCommGetAsyncError says ncclSuccess, ncclCommDestroy frees the rest without blocking. Every
// communicator is finalized first and only then waited for, so that members that finalize their
// communicators in another order cannot wait for each other. A communicator that fails or stays busy
// past the deadline is aborted; each failure is reported.
std::string finalize() {
  std::lock_guard<std::mutex> lock(g_nccl_mutex);
  std::vector<std::string> failures;
  std::vector<NcclComm*> finalizing;
  auto describe = [](const NcclComm& state, const std::string& what) {
    return "NCCL communicator " + format_ranks(state.ranks) + ": " + what;
  };
  for (auto& [key, state] : nccl_comms()) {
    if (state->comm == nullptr || state->broken) continue;
    const ncclResult_t code = ncclCommFinalize(state->comm);
    if (code == ncclSuccess || code == ncclInProgress) {
      finalizing.push_back(state.get());
      continue;
    }
    failures.push_back(describe(*state, "ncclCommFinalize: " + nccl_error(*state, code)));
    ncclCommAbort(state->comm);
    state->comm = nullptr;
  }
  const Deadline deadline(comm_timeout_seconds());
  for (NcclComm* state : finalizing) {
    ncclResult_t async = ncclInProgress;
    for (uint64_t iteration = 0;; ++iteration) {
      const ncclResult_t code = ncclCommGetAsyncError(state->comm, &async);
      if (code != ncclSuccess) async = code;
      if (async != ncclInProgress || deadline.expired()) break;
      poll_pause(iteration);
    }
    if (async == ncclSuccess) {
      const ncclResult_t code = ncclCommDestroy(state->comm);
      if (code != ncclSuccess) failures.push_back(describe(*state, "ncclCommDestroy: " + nccl_error(*state, code)));
    } else {
      failures.push_back(describe(*state, async == ncclInProgress
                                              ? "ncclCommFinalize did not complete: " + deadline.timeout_message()
                                              : "ncclCommFinalize: " + nccl_error(*state, async)));
      ncclCommAbort(state->comm);
    }
    state->comm = nullptr;
  }
  nccl_comms().clear();
  std::string joined;
  for (const auto& failure : failures) joined += (joined.empty() ? "" : "; ") + failure;
  return joined;
}

}  // namespace llmir::cuda
