#include "mpi_backend.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>

#include "half.h"

namespace llmir::mpi {
namespace {

// Tags on MPI_COMM_WORLD: user Send/Recv tags are 0..kMaxUserTag; the internal ones sit above.
constexpr int kRendezvousTag = 32766;
constexpr int kCreateGroupTag = 32765;

std::mutex g_init_mutex;
bool g_initialized_by_us = false;
bool g_finalized = false;
std::atomic<bool> g_any_broken{false};
MPI_Op g_half_ops[3] = {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL};
MPI_Op g_bfloat_ops[3] = {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL};

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

void check(int code, const char* what, const OpLabel& label, bool* broken) {
  if (code == MPI_SUCCESS) return;
  if (broken) *broken = true;
  mark_broken();
  throw Error(label.message(std::string(what) + " failed: " + mpi_error_text(code)));
}

// 16-bit float reductions compute in float32 and round to nearest even.
template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float), int kReduction>
void reduce_16bit(void* in, void* inout, MPI_Count* length, MPI_Datatype*) {  // large-count form
  const auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (MPI_Count i = 0; i < *length; ++i) {
    const float x = ToFloat(a[i]);
    const float y = ToFloat(b[i]);
    if (kReduction == 0) {
      b[i] = FromFloat(x + y);
    } else if (kReduction == 1) {
      if (x > y || x != x) b[i] = a[i];
    } else {
      if (x < y || x != x) b[i] = a[i];
    }
  }
}

void create_16bit_ops() {
  MPI_Op_create_c(&reduce_16bit<half_to_float, float_to_half, 0>, 1, &g_half_ops[0]);
  MPI_Op_create_c(&reduce_16bit<half_to_float, float_to_half, 1>, 1, &g_half_ops[1]);
  MPI_Op_create_c(&reduce_16bit<half_to_float, float_to_half, 2>, 1, &g_half_ops[2]);
  MPI_Op_create_c(&reduce_16bit<bfloat16_to_float, float_to_bfloat16, 0>, 1, &g_bfloat_ops[0]);
  MPI_Op_create_c(&reduce_16bit<bfloat16_to_float, float_to_bfloat16, 1>, 1, &g_bfloat_ops[1]);
  MPI_Op_create_c(&reduce_16bit<bfloat16_to_float, float_to_bfloat16, 2>, 1, &g_bfloat_ops[2]);
}

MPI_Datatype datatype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return MPI_FLOAT;
    case DType::kFloat64: return MPI_DOUBLE;
    case DType::kInt32: return MPI_INT32_T;
    case DType::kInt64: return MPI_INT64_T;
    case DType::kInt8: return MPI_INT8_T;
    case DType::kUint8: case DType::kBool: return MPI_UINT8_T;  // bool: 0/1 bytes, max = or, min = and
    case DType::kFloat16: case DType::kBfloat16: return MPI_UINT16_T;
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op reduction_op(DType dtype, Reduction reduction) {
  const int index = static_cast<int>(reduction);
  if (dtype == DType::kFloat16) return g_half_ops[index];
  if (dtype == DType::kBfloat16) return g_bfloat_ops[index];
  switch (reduction) {
    case Reduction::kSum: return MPI_SUM;
    case Reduction::kMax: return MPI_MAX;
    case Reduction::kMin: return MPI_MIN;
  }
  return MPI_OP_NULL;
}

void throw_if_broken(bool broken, const std::vector<int>& ranks, const OpLabel& label) {
  if (broken) {
    throw Error(label.message("the communicator of group " + format_ranks(ranks) +
                              " is unusable after an earlier failure or timeout; restart the ranks"));
  }
}

class HostDevice final : public Device {
 public:
  Buffer allocate(size_t bytes) override {
    void* data = std::malloc(bytes ? bytes : 1);
    if (data == nullptr) throw Error("out of host memory allocating " + std::to_string(bytes) + " bytes");
    return Buffer(data, [](void* p) { std::free(p); });
  }
  void copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t height) override {
    if (width == 0 || height == 0) return;
    if (dst_pitch == width && src_pitch == width) {
      std::memcpy(dst, src, width * height);
      return;
    }
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    for (size_t row = 0; row < height; ++row) std::memcpy(d + row * dst_pitch, s + row * src_pitch, width);
  }
  void to_host(void* host_dst, const void* src, size_t bytes) override { std::memcpy(host_dst, src, bytes); }
  void from_host(void* dst, const void* host_src, size_t bytes) override { std::memcpy(dst, host_src, bytes); }
};

// Non-blocking collectives polled with MPI_Test, so that a dead peer becomes a timeout error.
// Measured with MPICH 5.0.2 on 2 cores (bench/ and custom_ops/README.md): MPI_Iallreduce + MPI_Test/
// sched_yield polling is as fast as blocking MPI_Allreduce from 1 MiB up, so there is no blocking path.
class MpiGroupComm final : public GroupComm {
 public:
  MpiGroupComm(std::vector<int> ranks, MPI_Comm comm) : ranks_(std::move(ranks)), comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
  }
  ~MpiGroupComm() override = default;  // freed by finalize(); never from a static destructor
  int size() const override { return static_cast<int>(ranks_.size()); }
  int rank() const override { return rank_; }
  bool broken() const { return broken_; }
  MPI_Comm comm() const { return comm_; }

  void allgather_host_words(const int64_t* in, int64_t* out, size_t words, const OpLabel& label) override {
    throw_if_broken(broken_, ranks_, label);
    MPI_Request request;
    check(MPI_Iallgather(in, static_cast<int>(words), MPI_INT64_T, out, static_cast<int>(words), MPI_INT64_T, comm_,
                         &request),
          "MPI_Iallgather", label, &broken_);
    wait(&request, MPI_STATUS_IGNORE, label, &broken_, false);
  }

  void allreduce(const void* in, void* out, size_t count, DType dtype, Reduction reduction,
                 const OpLabel& label) override {
    throw_if_broken(broken_, ranks_, label);
    MPI_Request request;
    check(MPI_Iallreduce_c(in, out, static_cast<MPI_Count>(count), datatype(dtype), reduction_op(dtype, reduction),
                           comm_, &request),
          "MPI_Iallreduce", label, &broken_);
    wait(&request, MPI_STATUS_IGNORE, label, &broken_, false);
  }

  void allgather(const void* in, void* out, size_t count_per_rank, DType dtype, const OpLabel& label) override {
    throw_if_broken(broken_, ranks_, label);
    MPI_Request request;
    const auto count = static_cast<MPI_Count>(count_per_rank);
    check(MPI_Iallgather_c(in, count, datatype(dtype), out, count, datatype(dtype), comm_, &request),
          "MPI_Iallgather", label, &broken_);
    wait(&request, MPI_STATUS_IGNORE, label, &broken_, false);
  }

  void allgatherv(const void* in, void* out, const std::vector<size_t>& counts, DType dtype,
                  const OpLabel& label) override {
    throw_if_broken(broken_, ranks_, label);
    std::vector<MPI_Count> recv_counts(counts.size());
    std::vector<MPI_Aint> displacements(counts.size());
    MPI_Aint offset = 0;
    for (size_t member = 0; member < counts.size(); ++member) {
      recv_counts[member] = static_cast<MPI_Count>(counts[member]);
      displacements[member] = offset;  // in elements of the receive type
      offset += static_cast<MPI_Aint>(counts[member]);
    }
    MPI_Request request;
    check(MPI_Iallgatherv_c(in, recv_counts[static_cast<size_t>(rank_)], datatype(dtype), out, recv_counts.data(),
                            displacements.data(), datatype(dtype), comm_, &request),
          "MPI_Iallgatherv", label, &broken_);
    wait(&request, MPI_STATUS_IGNORE, label, &broken_, false);
  }

  void reduce_scatter(const void* in, void* out, size_t count_per_rank, DType dtype, Reduction reduction,
                      const OpLabel& label) override {
    throw_if_broken(broken_, ranks_, label);
    MPI_Request request;
    check(MPI_Ireduce_scatter_block_c(in, out, static_cast<MPI_Count>(count_per_rank), datatype(dtype),
                                      reduction_op(dtype, reduction), comm_, &request),
          "MPI_Ireduce_scatter_block", label, &broken_);
    wait(&request, MPI_STATUS_IGNORE, label, &broken_, false);
  }

 private:
  std::vector<int> ranks_;
  MPI_Comm comm_;
  int rank_ = -1;
  bool broken_ = false;
};

class MpiPeerLink final : public PeerLink {
 public:
  explicit MpiPeerLink(int peer) : peer_(peer) {}
  void send(const void* buf, size_t bytes, int tag, const OpLabel& label) override {
    throw_if_broken(broken_, {peer_}, label);
    MPI_Request request;
    check(MPI_Isend_c(buf, static_cast<MPI_Count>(bytes), MPI_BYTE, peer_, tag, MPI_COMM_WORLD, &request),
          "MPI_Isend", label, &broken_);
    wait(&request, MPI_STATUS_IGNORE, label, &broken_, false);
  }
  void recv(void* buf, size_t bytes, int tag, const OpLabel& label) override {
    throw_if_broken(broken_, {peer_}, label);
    MPI_Request request;
    MPI_Status status;
    check(MPI_Irecv_c(buf, static_cast<MPI_Count>(bytes), MPI_BYTE, peer_, tag, MPI_COMM_WORLD, &request),
          "MPI_Irecv", label, &broken_);
    wait(&request, &status, label, &broken_, true);
    MPI_Count received = 0;
    MPI_Get_count_c(&status, MPI_BYTE, &received);
    if (static_cast<size_t>(received) != bytes) {
      throw Error(label.message("expected " + std::to_string(bytes) + " bytes from rank " + std::to_string(peer_) +
                                ", got " + std::to_string(received)));
    }
  }

 private:
  int peer_;
  bool broken_ = false;
};

class CpuBackend final : public Backend {
 public:
  int world_rank() override { return mpi::world_rank(); }
  int world_size() override { return mpi::world_size(); }
  Device& device() override { return host_device(); }
  GroupComm& group(const std::vector<int>& ranks, const OpLabel& label) override { return group_comm(ranks, label); }
  PeerLink& peer(int peer_rank, const OpLabel& label) override { return peer_link(peer_rank, label); }
};

std::mutex g_comms_mutex;
std::map<std::vector<int>, std::unique_ptr<MpiGroupComm>>& group_comms() {
  static auto* comms = new std::map<std::vector<int>, std::unique_ptr<MpiGroupComm>>();  // never destroyed
  return *comms;
}
std::map<int, std::unique_ptr<MpiPeerLink>>& peer_links() {
  static auto* links = new std::map<int, std::unique_ptr<MpiPeerLink>>();
  return *links;
}

int64_t hash_ranks(const std::vector<int>& ranks) {
  uint64_t hash = 1469598103934665603ull;
  for (int rank : ranks) hash = (hash ^ static_cast<uint64_t>(rank + 1)) * 1099511628211ull;
  return static_cast<int64_t>(hash >> 1);
}

}  // namespace

void ensure_initialized() {
  std::lock_guard<std::mutex> lock(g_init_mutex);
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) throw Error("ai.llmir: MPI was already finalized in this process; no further communication");
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS) {
      throw Error("ai.llmir: MPI_Init_thread failed; launch the ranks with mpiexec");
    }
    g_initialized_by_us = true;
    // Failures come back as codes that become op errors (the default aborts every rank).
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  if (g_half_ops[0] == MPI_OP_NULL) create_16bit_ops();
}

bool is_initialized() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int finalized = 0;
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

int world_rank() {
  ensure_initialized();
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  ensure_initialized();
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

void mark_broken() { g_any_broken = true; }
bool any_broken() { return g_any_broken; }

int finalize() {
  std::lock_guard<std::mutex> lock(g_init_mutex);
  if (!g_initialized_by_us || g_finalized) return 0;
  if (g_any_broken) return 1;  // MPI_Finalize would wait for the peer that never answered
  {
    std::lock_guard<std::mutex> comms_lock(g_comms_mutex);
    for (auto& [ranks, comm] : group_comms()) {
      MPI_Comm handle = comm->comm();
      MPI_Comm_free(&handle);
    }
    group_comms().clear();
    peer_links().clear();
  }
  for (MPI_Op* op : {&g_half_ops[0], &g_half_ops[1], &g_half_ops[2], &g_bfloat_ops[0], &g_bfloat_ops[1],
                     &g_bfloat_ops[2]}) {
    if (*op != MPI_OP_NULL) MPI_Op_free(op);
  }
  g_finalized = true;
  return MPI_Finalize() == MPI_SUCCESS ? 0 : -1;
}

void wait(MPI_Request* request, MPI_Status* status, const OpLabel& label, bool* broken, bool cancellable) {
  const Deadline deadline(comm_timeout_seconds());
  int done = 0;
  for (uint64_t iteration = 0;; ++iteration) {
    const int code = MPI_Test(request, &done, status);
    if (code != MPI_SUCCESS) check(code, "MPI_Test", label, broken);
    if (done) return;
    if (deadline.expired()) {
      if (cancellable) {
        // A cancelled receive can no longer write into the (soon freed) output buffer.
        MPI_Cancel(request);
        MPI_Wait(request, MPI_STATUS_IGNORE);
      }
      // A collective cannot be cancelled: the communicator is dead from here on.
      if (broken) *broken = true;
      mark_broken();
      throw Error(label.message(deadline.timeout_message()));
    }
    poll_pause(iteration);
  }
}

namespace {

// Rendezvous messages are int64 words: [check, disagreeing rank or -1, n, ranks[n]..., their ranks[n]...,
// payload...]. A member's message to the root uses the first 3 + n words.
constexpr size_t kHeaderWordsRendezvous = 3;

std::vector<int> ranks_of(const int64_t* words, size_t n) {
  std::vector<int> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<int>(words[i]);
  return out;
}

std::string disagreement(int other, const std::vector<int>& theirs, const std::vector<int>& ours,
                         const std::string& reporter) {
  if (theirs != ours) {
    return "group members disagree on the group's order: rank " + std::to_string(other) + " lists it as " +
           format_ranks(theirs) + ", this rank as " + format_ranks(ours) + reporter +
           "; every member must list the same ranks in the same order (the order fixes each member's chunk)";
  }
  return "rank " + std::to_string(other) + " is setting up a different communicator at the same time" + reporter +
         "; every member of " + format_ranks(ours) + " must run the same ai.llmir ops in the same order";
}

}  // namespace

void rendezvous(const std::vector<int>& ranks, int64_t check_value, void* payload, int payload_bytes,
                const OpLabel& label) {
  const int me = world_rank();
  // The lowest rank is the root: every member finds the same one even when the members list the group
  // in different orders, so that a disagreement is an error on every member and not a wait.
  const int root = *std::min_element(ranks.begin(), ranks.end());
  const size_t n = ranks.size();
  const size_t payload_words = (static_cast<size_t>(payload_bytes) + sizeof(int64_t) - 1) / sizeof(int64_t);
  const size_t request_words = kHeaderWordsRendezvous + n;
  const size_t reply_words = kHeaderWordsRendezvous + 2 * n + payload_words;
  std::vector<int64_t> mine(request_words);
  mine[0] = check_value;
  mine[1] = -1;
  mine[2] = static_cast<int64_t>(n);
  for (size_t i = 0; i < n; ++i) mine[kHeaderWordsRendezvous + i] = ranks[i];
  std::vector<int64_t> reply(reply_words, 0);
  bool broken = false;
  if (me == root) {
    std::vector<int> others;
    for (int rank : ranks) {
      if (rank != root) others.push_back(rank);
    }
    std::vector<std::vector<int64_t>> arrived(others.size(), std::vector<int64_t>(request_words));
    std::vector<MPI_Request> requests(others.size());
    for (size_t i = 0; i < others.size(); ++i) {
      check(MPI_Irecv(arrived[i].data(), static_cast<int>(request_words), MPI_INT64_T, others[i], kRendezvousTag,
                      MPI_COMM_WORLD, &requests[i]),
            "MPI_Irecv", label, &broken);
    }
    for (auto& request : requests) wait(&request, MPI_STATUS_IGNORE, label, &broken, true);
    // Answer every member before failing, so that a disagreement is an error on all of them at once.
    reply[0] = check_value;
    reply[1] = -1;
    reply[2] = static_cast<int64_t>(n);
    for (size_t i = 0; i < n; ++i) reply[kHeaderWordsRendezvous + i] = ranks[i];
    size_t bad = others.size();
    for (size_t i = 0; i < others.size() && bad == others.size(); ++i) {
      if (arrived[i][0] != check_value) bad = i;
    }
    if (bad != others.size()) {
      reply[1] = others[bad];
      std::copy(arrived[bad].begin() + kHeaderWordsRendezvous, arrived[bad].end(),
                reply.begin() + static_cast<std::ptrdiff_t>(kHeaderWordsRendezvous + n));
    }
    if (payload_bytes) {
      std::memcpy(reply.data() + kHeaderWordsRendezvous + 2 * n, payload, static_cast<size_t>(payload_bytes));
    }
    for (size_t i = 0; i < others.size(); ++i) {
      check(MPI_Isend(reply.data(), static_cast<int>(reply_words), MPI_INT64_T, others[i], kRendezvousTag,
                      MPI_COMM_WORLD, &requests[i]),
            "MPI_Isend", label, &broken);
    }
    for (auto& request : requests) wait(&request, MPI_STATUS_IGNORE, label, &broken, false);
    if (bad != others.size()) {
      throw Error(label.message(disagreement(others[bad], ranks_of(arrived[bad].data() + kHeaderWordsRendezvous, n),
                                             ranks, "")));
    }
    return;
  }
  MPI_Request request;
  check(MPI_Isend(mine.data(), static_cast<int>(request_words), MPI_INT64_T, root, kRendezvousTag, MPI_COMM_WORLD,
                  &request),
        "MPI_Isend", label, &broken);
  wait(&request, MPI_STATUS_IGNORE, label, &broken, false);
  check(MPI_Irecv(reply.data(), static_cast<int>(reply_words), MPI_INT64_T, root, kRendezvousTag, MPI_COMM_WORLD,
                  &request),
        "MPI_Irecv", label, &broken);
  wait(&request, MPI_STATUS_IGNORE, label, &broken, true);
  if (reply[0] != check_value) {
    throw Error(label.message(disagreement(root, ranks_of(reply.data() + kHeaderWordsRendezvous, n), ranks, "")));
  }
  if (reply[1] >= 0) {
    const int other = static_cast<int>(reply[1]);
    const auto theirs = ranks_of(reply.data() + kHeaderWordsRendezvous + n, n);
    throw Error(label.message(disagreement(other, theirs, ranks, " (found by rank " + std::to_string(root) + ")")));
  }
  if (payload_bytes) {
    std::memcpy(payload, reply.data() + kHeaderWordsRendezvous + 2 * n, static_cast<size_t>(payload_bytes));
  }
}

GroupComm& group_comm(const std::vector<int>& ranks, const OpLabel& label) {
  std::lock_guard<std::mutex> lock(g_comms_mutex);
  auto& comms = group_comms();
  auto found = comms.find(ranks);
  if (found != comms.end()) return *found->second;
  ensure_initialized();
  // Everyone is known to be present before the blocking MPI_Comm_create_group.
  rendezvous(ranks, hash_ranks(ranks), nullptr, 0, label);
  MPI_Group world_group, group;
  MPI_Comm_group(MPI_COMM_WORLD, &world_group);
  MPI_Group_incl(world_group, static_cast<int>(ranks.size()), ranks.data(), &group);
  MPI_Comm comm = MPI_COMM_NULL;
  check(MPI_Comm_create_group(MPI_COMM_WORLD, group, kCreateGroupTag, &comm), "MPI_Comm_create_group", label,
        nullptr);
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  auto& slot = comms[ranks];
  slot = std::make_unique<MpiGroupComm>(ranks, comm);
  return *slot;
}

PeerLink& peer_link(int peer_rank, const OpLabel&) {
  std::lock_guard<std::mutex> lock(g_comms_mutex);
  ensure_initialized();
  auto& slot = peer_links()[peer_rank];
  if (!slot) slot = std::make_unique<MpiPeerLink>(peer_rank);
  return *slot;
}

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

Device& host_device() {
  static auto* device = new HostDevice();
  return *device;
}

}  // namespace llmir::mpi
