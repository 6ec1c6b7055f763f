#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <set>

namespace llmir {
namespace {

std::atomic<uint64_t> g_signature_checks{0};

std::vector<int64_t> signature_key(int elem_type, const std::vector<int64_t>& shape) {
  std::vector<int64_t> key;
  key.reserve(shape.size() + 1);
  key.push_back(elem_type);
  key.insert(key.end(), shape.begin(), shape.end());
  return key;
}

size_t product(const std::vector<int64_t>& shape, size_t begin, size_t end) {
  size_t out = 1;
  for (size_t i = begin; i < end; ++i) out *= static_cast<size_t>(shape[i]);
  return out;
}

std::string format_shape(const int64_t* dims, int64_t ndim) {
  std::string out = "[";
  for (int64_t i = 0; i < ndim; ++i) out += (i ? "," : "") + std::to_string(dims[i]);
  return out + "]";
}

DType checked_dtype(int elem_type, const OpLabel& label) {
  try {
    return to_dtype(elem_type);
  } catch (const Error& error) {
    throw Error(label.message(error.what()));
  }
}

std::vector<int> resolve_group(const std::vector<int64_t>& attribute, int world_size, int me, OpLabel& label) {
  std::vector<int> ranks;
  if (attribute.empty()) {
    for (int rank = 0; rank < world_size; ++rank) ranks.push_back(rank);
  } else {
    for (int64_t rank : attribute) ranks.push_back(static_cast<int>(rank));
  }
  label.scope = "group " + format_ranks(ranks);
  std::set<int> seen;
  for (int64_t rank : attribute) {
    if (rank < 0) throw Error(label.message("group member " + std::to_string(rank) + " is not a rank"));
    if (rank >= world_size) {
      throw Error(label.message("group member " + std::to_string(rank) + " does not exist: the world has " +
                                std::to_string(world_size) + " rank(s); launch at least " +
                                std::to_string(*std::max_element(attribute.begin(), attribute.end()) + 1) +
                                " ranks (e.g. mpiexec -n N) or fix the node's group attribute"));
    }
    if (!seen.insert(static_cast<int>(rank)).second) {
      throw Error(label.message("group member " + std::to_string(rank) + " appears twice"));
    }
  }
  if (std::find(ranks.begin(), ranks.end(), me) == ranks.end()) {
    throw Error(label.message("this rank is not a member of the group; the node belongs to another rank's model"));
  }
  return ranks;
}

int64_t normalized_axis(int64_t axis, size_t ndim, const OpLabel& label) {
  const auto rank = static_cast<int64_t>(ndim);
  if (rank == 0) throw Error(label.message("needs an input of rank >= 1 to use an axis, got a scalar"));
  if (axis < -rank || axis >= rank) {
    throw Error(label.message("axis " + std::to_string(axis) + " is out of range for an input of rank " +
                              std::to_string(rank)));
  }
  return axis < 0 ? axis + rank : axis;
}

int64_t hash_order(const std::vector<int>& ranks) {
  uint64_t hash = 1469598103934665603ull;
  for (int rank : ranks) hash = (hash ^ static_cast<uint64_t>(rank + 1)) * 1099511628211ull;
  return static_cast<int64_t>(hash >> 1);
}

// 0 without sizes, so that every op but a sized AllGather exchanges the same word.
int64_t hash_sizes(const OpAttributes& attributes) {
  if (!attributes.has_sizes) return 0;
  uint64_t hash = 1469598103934665603ull;
  for (int64_t size : attributes.sizes) hash = (hash ^ static_cast<uint64_t>(size + 1)) * 1099511628211ull;
  return static_cast<int64_t>((hash >> 1) | 1);
}

// Pre-flight check, one small allgather: every member runs the same op with the same reduction, axis,
// dtype and shape, and lists the group in the same order. Otherwise MPI/NCCL would read or write past
// buffers, or silently mix data. The exchange runs on the communicator of the group's members in
// ascending order, which every member finds whatever order its node lists; each order has its own
// communicator, so members that disagree on the order would otherwise wait on different ones until the
// timeout. Call it before backend.group(ranks) (a CUDA backend hands out one group at a time).
// With `agreed`, a signature that passed once for this node is not exchanged again (see AgreedSignatures).
// A sized AllGather passes its output shape as `input.shape` (members' own lengths along the axis differ;
// each checked its own against `sizes` already) and exchanges a hash of `sizes` besides.
void agree(Backend& backend, const std::vector<int>& ranks, const OpAttributes& attributes, int64_t axis,
           const InputTensor& input, const OpLabel& label, AgreedSignatures* agreed) {
  // [kind, dtype, reduction, axis, ndim, shape[kMaxRank], sizes hash, order hash]
  constexpr size_t kWords = 7 + kMaxRank;
  constexpr size_t kSizesWord = kWords - 2;
  if (input.shape.size() > static_cast<size_t>(kMaxRank)) {
    throw Error(label.message("inputs of rank > " + std::to_string(kMaxRank) + " are not supported"));
  }
  if (agreed != nullptr && agreed->contains(input.elem_type, input.shape)) return;
  g_signature_checks.fetch_add(1, std::memory_order_relaxed);
  std::vector<int> members = ranks;
  std::sort(members.begin(), members.end());
  GroupComm& comm = backend.group(members, label);
  int64_t mine[kWords] = {};
  mine[0] = static_cast<int64_t>(attributes.kind);
  mine[1] = input.elem_type;
  mine[2] = static_cast<int64_t>(attributes.reduction);
  mine[3] = axis;  // normalized, so -1 and ndim-1 agree
  mine[4] = static_cast<int64_t>(input.shape.size());
  for (size_t i = 0; i < input.shape.size(); ++i) mine[5 + i] = input.shape[i];
  mine[kSizesWord] = hash_sizes(attributes);
  mine[kWords - 1] = hash_order(ranks);
  std::vector<int64_t> all(kWords * members.size());
  comm.allgather_host_words(mine, all.data(), kWords, label);
  for (size_t member = 0; member < members.size(); ++member) {
    const int64_t* theirs = all.data() + member * kWords;
    if (std::memcmp(theirs, mine, sizeof(mine)) == 0) continue;
    if (std::memcmp(theirs, mine, sizeof(mine) - sizeof(int64_t)) == 0) {
      throw Error(label.message("group members disagree on the group's order: this rank lists it as " +
                                format_ranks(ranks) + ", rank " + std::to_string(members[member]) +
                                " in another order; every member must list the same ranks in the same order (the "
                                "order fixes each member's chunk)"));
    }
    if (std::memcmp(theirs, mine, kSizesWord * sizeof(int64_t)) == 0) {
      throw Error(label.message("group members disagree on the attribute `sizes`: this rank's is " +
                                (attributes.has_sizes ? format_shape(attributes.sizes.data(),
                                                                     static_cast<int64_t>(attributes.sizes.size()))
                                                      : std::string("absent")) +
                                ", rank " + std::to_string(members[member]) +
                                "'s differs; every member's node must list the same sizes (or none)"));
    }
    auto describe = [&](const int64_t* words) {
      const auto kind = static_cast<OpKind>(words[0]);
      std::string text = std::string(op_name(kind)) + " of " + dtype_name(static_cast<int>(words[1])) + " " +
                         format_shape(words + 5, std::min<int64_t>(words[4], kMaxRank));
      if (kind == OpKind::kAllReduce || kind == OpKind::kReduceScatter) {
        text += std::string(" reduction=") + reduction_name(static_cast<Reduction>(words[2]));
      }
      if (kind == OpKind::kAllGather || kind == OpKind::kReduceScatter) text += " axis=" + std::to_string(words[3]);
      return text;
    };
    throw Error(label.message("group members disagree: rank " + std::to_string(members[member]) + " runs " +
                              describe(theirs) + ", this rank runs " + describe(mine) +
                              "; every member must pass the same dtype and shape"));
  }
  if (agreed != nullptr) agreed->add(input.elem_type, input.shape);
}

// The element type of a reducing op's input; bool has logical max/min but no sum.
DType reduction_dtype(int elem_type, Reduction reduction, const OpLabel& label) {
  const DType dtype = checked_dtype(elem_type, label);
  if (dtype == DType::kBool && reduction == Reduction::kSum) {
    throw Error(label.message("bool tensors support reduction \"max\" (logical or) and \"min\" (logical and), "
                              "not \"sum\"; cast to an integer type to count"));
  }
  return dtype;
}

void all_reduce(Backend& backend, const OpAttributes& attributes, OpLabel& label, const InputTensor& input,
                const AllocateOutput& output, AgreedSignatures* agreed) {
  const auto ranks = resolve_group(attributes.group, backend.world_size(), label.world_rank, label);
  const DType dtype = reduction_dtype(input.elem_type, attributes.reduction, label);
  agree(backend, ranks, attributes, 0, input, label, agreed);
  GroupComm& comm = backend.group(ranks, label);
  void* out = output(input.shape);
  if (input.count == 0) return;
  comm.allreduce(input.data, out, input.count, dtype, attributes.reduction, label);
}

// The sized form's part lengths, checked against the group and this member's input: one per member, none
// negative, this member's equal to its input's length along `axis`.
std::vector<size_t> checked_sizes(const OpAttributes& attributes, const std::vector<int>& ranks, size_t axis,
                                  const InputTensor& input, const OpLabel& label) {
  const auto& sizes = attributes.sizes;
  const auto listed = format_shape(sizes.data(), static_cast<int64_t>(sizes.size()));
  if (sizes.size() != ranks.size()) {
    throw Error(label.message("attribute sizes " + listed + " lists " + std::to_string(sizes.size()) +
                              " length(s) for a group of " + std::to_string(ranks.size()) +
                              " ranks; list one length along the axis per member, in group order"));
  }
  const auto position = static_cast<size_t>(std::find(ranks.begin(), ranks.end(), label.world_rank) - ranks.begin());
  if (input.shape[axis] != sizes[position]) {
    throw Error(label.message("this rank's input " +
                              format_shape(input.shape.data(), static_cast<int64_t>(input.shape.size())) + " has " +
                              std::to_string(input.shape[axis]) + " along axis " + std::to_string(axis) +
                              ", but attribute sizes " + listed + " gives member " + std::to_string(position) +
                              " (this rank) " + std::to_string(sizes[position])));
  }
  std::vector<size_t> out;
  for (int64_t size : sizes) out.push_back(static_cast<size_t>(size));  // non-negative: checked at creation
  return out;
}

// AllGather with `sizes`: member m contributes sizes[m] along `axis` (the even form's layout otherwise).
void all_gather_sized(Backend& backend, const OpAttributes& attributes, OpLabel& label, const InputTensor& input,
                      const AllocateOutput& output, AgreedSignatures* agreed, const std::vector<int>& ranks,
                      size_t axis) {
  const DType dtype = checked_dtype(input.elem_type, label);
  const std::vector<size_t> sizes = checked_sizes(attributes, ranks, axis, input, label);
  size_t total = 0;
  for (size_t size : sizes) total += size;
  std::vector<int64_t> shape = input.shape;
  shape[axis] = static_cast<int64_t>(total);
  InputTensor signature = input;  // members agree on the output's shape and on `sizes`
  signature.shape = shape;
  agree(backend, ranks, attributes, static_cast<int64_t>(axis), signature, label, agreed);
  GroupComm& comm = backend.group(ranks, label);
  auto* out = static_cast<char*>(output(shape));
  const size_t outer = product(input.shape, 0, axis);
  const size_t inner = product(input.shape, axis + 1, input.shape.size());
  if (outer * inner * total == 0) return;  // nothing to move on any member (this one may hold 0 of a non-empty axis)
  std::vector<size_t> counts;
  for (size_t size : sizes) counts.push_back(outer * size * inner);
  if (outer == 1) {  // members' blocks are already contiguous in the output
    comm.allgatherv(input.data, out, counts, dtype, label);
    return;
  }
  // Gather into member blocks [outer, sizes[m] * inner], then interleave each block's rows into
  // [outer, total * inner] at the member's offset along the axis.
  const size_t element = dtype_size(dtype);
  const size_t out_row_bytes = total * inner * element;
  Device::Buffer gathered = backend.device().allocate(outer * total * inner * element);
  comm.allgatherv(input.data, gathered.get(), counts, dtype, label);
  size_t block_offset = 0, column_offset = 0;
  for (size_t size : sizes) {
    const size_t row_bytes = size * inner * element;
    backend.device().copy_2d(out + column_offset, out_row_bytes, static_cast<char*>(gathered.get()) + block_offset,
                             row_bytes, row_bytes, outer);
    block_offset += outer * row_bytes;
    column_offset += row_bytes;
  }
}

void all_gather(Backend& backend, const OpAttributes& attributes, OpLabel& label, const InputTensor& input,
                const AllocateOutput& output, AgreedSignatures* agreed) {
  const auto ranks = resolve_group(attributes.group, backend.world_size(), label.world_rank, label);
  const DType dtype = checked_dtype(input.elem_type, label);
  const auto axis = static_cast<size_t>(normalized_axis(attributes.axis, input.shape.size(), label));
  if (attributes.has_sizes) return all_gather_sized(backend, attributes, label, input, output, agreed, ranks, axis);
  agree(backend, ranks, attributes, static_cast<int64_t>(axis), input, label, agreed);
  GroupComm& comm = backend.group(ranks, label);
  const size_t members = ranks.size();
  std::vector<int64_t> shape = input.shape;
  shape[axis] *= static_cast<int64_t>(members);
  auto* out = static_cast<char*>(output(shape));
  if (input.count == 0) return;
  const size_t element = dtype_size(dtype);
  const size_t outer = product(input.shape, 0, axis);
  if (outer == 1) {  // members' blocks are already contiguous in the output
    comm.allgather(input.data, out, input.count, dtype, label);
    return;
  }
  // Gather into [members, outer, row], then interleave each member's rows into [outer, members * row].
  const size_t row_bytes = (input.count / outer) * element;
  Device::Buffer gathered = backend.device().allocate(members * input.count * element);
  comm.allgather(input.data, gathered.get(), input.count, dtype, label);
  for (size_t member = 0; member < members; ++member) {
    backend.device().copy_2d(out + member * row_bytes, members * row_bytes,
                             static_cast<char*>(gathered.get()) + member * input.count * element, row_bytes, row_bytes,
                             outer);
  }
}

void reduce_scatter(Backend& backend, const OpAttributes& attributes, OpLabel& label, const InputTensor& input,
                    const AllocateOutput& output, AgreedSignatures* agreed) {
  const auto ranks = resolve_group(attributes.group, backend.world_size(), label.world_rank, label);
  const DType dtype = reduction_dtype(input.elem_type, attributes.reduction, label);
  const auto axis = static_cast<size_t>(normalized_axis(attributes.axis, input.shape.size(), label));
  const auto members = static_cast<int64_t>(ranks.size());
  if (input.shape[axis] % members != 0) {
    throw Error(label.message("input dimension " + std::to_string(axis) + " of shape " +
                              format_shape(input.shape.data(), static_cast<int64_t>(input.shape.size())) +
                              " does not divide by the group size " + std::to_string(members)));
  }
  agree(backend, ranks, attributes, static_cast<int64_t>(axis), input, label, agreed);
  GroupComm& comm = backend.group(ranks, label);
  std::vector<int64_t> shape = input.shape;
  shape[axis] /= members;
  auto* out = output(shape);
  if (input.count == 0) return;
  const size_t element = dtype_size(dtype);
  const size_t outer = product(input.shape, 0, axis);
  const size_t chunk = input.count / static_cast<size_t>(members);  // elements each member receives
  if (outer == 1) {
    comm.reduce_scatter(input.data, out, chunk, dtype, attributes.reduction, label);
    return;
  }
  // Pack member m's slice of every outer row into block m of [members, outer, piece], then scatter.
  const size_t piece_bytes = (chunk / outer) * element;
  const size_t row_bytes = piece_bytes * static_cast<size_t>(members);
  Device::Buffer packed = backend.device().allocate(input.count * element);
  for (int64_t member = 0; member < members; ++member) {
    backend.device().copy_2d(static_cast<char*>(packed.get()) + member * chunk * element, piece_bytes,
                             static_cast<const char*>(input.data) + member * piece_bytes, row_bytes, piece_bytes,
                             outer);
  }
  comm.reduce_scatter(packed.get(), out, chunk, dtype, attributes.reduction, label);
}

void check_peer(const OpAttributes& attributes, Backend& backend, OpLabel& label) {
  label.scope = "peer " + std::to_string(attributes.peer);
  const int world_size = backend.world_size();
  if (attributes.peer < 0 || attributes.peer >= world_size) {
    throw Error(label.message("peer " + std::to_string(attributes.peer) + " does not exist: the world has " +
                              std::to_string(world_size) + " rank(s)"));
  }
  if (attributes.peer == label.world_rank) throw Error(label.message("peer is this rank itself"));
}

void send(Backend& backend, const OpAttributes& attributes, OpLabel& label, const InputTensor& input,
          const AllocateOutput& output) {
  check_peer(attributes, backend, label);
  const DType dtype = checked_dtype(input.elem_type, label);
  if (input.shape.size() > static_cast<size_t>(kMaxRank)) {
    throw Error(label.message("inputs of rank > " + std::to_string(kMaxRank) + " are not supported"));
  }
  int64_t header[kHeaderWords] = {};
  header[0] = input.elem_type;
  header[1] = static_cast<int64_t>(input.shape.size());
  for (size_t i = 0; i < input.shape.size(); ++i) header[2 + i] = input.shape[i];
  header[kHeaderWords - 1] = attributes.tag;
  PeerLink& link = backend.peer(static_cast<int>(attributes.peer), label);
  Device& device = backend.device();
  Device::Buffer staged_header = device.allocate(sizeof(header));
  device.from_host(staged_header.get(), header, sizeof(header));
  link.send(staged_header.get(), sizeof(header), static_cast<int>(attributes.tag), label);
  if (input.count) link.send(input.data, input.count * dtype_size(dtype), static_cast<int>(attributes.tag), label);
  const int64_t sent = static_cast<int64_t>(input.count);
  device.from_host(output({}), &sent, sizeof(sent));
}

void recv(Backend& backend, const OpAttributes& attributes, OpLabel& label, const InputTensor& like,
          const AllocateOutput& output) {
  check_peer(attributes, backend, label);
  checked_dtype(like.elem_type, label);
  PeerLink& link = backend.peer(static_cast<int>(attributes.peer), label);
  Device& device = backend.device();
  int64_t header[kHeaderWords] = {};
  Device::Buffer staged_header = device.allocate(sizeof(header));
  link.recv(staged_header.get(), sizeof(header), static_cast<int>(attributes.tag), label);
  device.to_host(header, staged_header.get(), sizeof(header));
  const std::string from = "rank " + std::to_string(attributes.peer);
  if (header[kHeaderWords - 1] != attributes.tag) {
    throw Error(label.message(from + " sent a message with tag " + std::to_string(header[kHeaderWords - 1]) +
                              ", this Recv expects tag " + std::to_string(attributes.tag) +
                              "; Send and Recv nodes between two ranks must run in the same order"));
  }
  if (header[0] != like.elem_type) {
    throw Error(label.message(from + " sent " + dtype_name(static_cast<int>(header[0])) + " but this Recv expects " +
                              dtype_name(like.elem_type) + " (the type of its `like` input)"));
  }
  const int64_t ndim = header[1];
  if (ndim < 0 || ndim > kMaxRank) throw Error(label.message(from + " sent a corrupt header"));
  std::vector<int64_t> shape(header + 2, header + 2 + ndim);
  if (attributes.has_shape) {
    bool matches = static_cast<int64_t>(attributes.shape.size()) == ndim;
    for (size_t i = 0; matches && i < shape.size(); ++i) {
      matches = attributes.shape[i] < 0 || attributes.shape[i] == shape[i];
    }
    if (!matches) {
      throw Error(label.message(from + " sent shape " + format_shape(shape.data(), ndim) +
                                ", this Recv's shape attribute is " +
                                format_shape(attributes.shape.data(), static_cast<int64_t>(attributes.shape.size()))));
    }
  }
  void* out = output(shape);
  const size_t count = product(shape, 0, shape.size());
  if (count) link.recv(out, count * dtype_size(to_dtype(like.elem_type)), static_cast<int>(attributes.tag), label);
}

}  // namespace

const char* op_name(OpKind kind) {
  switch (kind) {
    case OpKind::kAllReduce: return "AllReduce";
    case OpKind::kAllGather: return "AllGather";
    case OpKind::kReduceScatter: return "ReduceScatter";
    case OpKind::kSend: return "Send";
    case OpKind::kRecv: return "Recv";
  }
  return "?";
}

bool AgreedSignatures::contains(int elem_type, const std::vector<int64_t>& shape) const {
  const auto key = signature_key(elem_type, shape);
  std::lock_guard<std::mutex> lock(mutex_);
  return agreed_.count(key) != 0;
}

void AgreedSignatures::add(int elem_type, const std::vector<int64_t>& shape) {
  auto key = signature_key(elem_type, shape);
  std::lock_guard<std::mutex> lock(mutex_);
  if (agreed_.size() < kMaxEntries) agreed_.insert(std::move(key));
}

uint64_t signature_checks() { return g_signature_checks.load(std::memory_order_relaxed); }

void run_op(Backend& backend, const OpAttributes& attributes, const InputTensor& input, const AllocateOutput& output,
            AgreedSignatures* agreed) {
  OpLabel label;
  label.op = op_name(attributes.kind);
  label.node = attributes.node;
  label.world_rank = backend.world_rank();
  switch (attributes.kind) {
    case OpKind::kAllReduce: return all_reduce(backend, attributes, label, input, output, agreed);
    case OpKind::kAllGather: return all_gather(backend, attributes, label, input, output, agreed);
    case OpKind::kReduceScatter: return reduce_scatter(backend, attributes, label, input, output, agreed);
    case OpKind::kSend: return send(backend, attributes, label, input, output);
    case OpKind::kRecv: return recv(backend, attributes, label, input, output);
  }
}

}  // namespace llmir
