// MPI: the CPU backend, the staging backend's transport and the NCCL bootstrap when MPI is present.
#pragma once

#include <mpi.h>

#include <memory>
#include <vector>

#include "backend.h"

namespace llmir::mpi {

// Lazily MPI_Init_thread(MPI_THREAD_MULTIPLE) unless MPI is already initialized (mpi4py may have done it).
void ensure_initialized();
bool is_initialized();
int world_rank();
int world_size();

// A communication failed or timed out: MPI_Finalize would hang, so llmir_finalize skips it.
void mark_broken();
bool any_broken();
int finalize();  // llmir_finalize: 0 finalized or nothing to do, 1 skipped (broken), -1 error

// Wait for one request until the LLMIR_COMM_TIMEOUT_S deadline; sched_yield between MPI_Test calls.
// On expiry a receive is cancelled, `broken` set, and Error thrown with the label's timeout message.
void wait(MPI_Request* request, MPI_Status* status, const OpLabel& label, bool* broken, bool cancellable);

// Every group member of `ranks` posts a small message to the group's lowest rank (the root) and gets its
// answer, all non-blocking and bounded by the deadline, so that a missing member becomes an error and not
// a hang in a blocking MPI call that follows (MPI_Comm_create_group has no non-blocking form). `payload`
// travels to every member from the root; members check that they all agree on `check` (e.g. a hash of
// the ordered group): a disagreement, such as the same ranks listed in another order, is an error on
// every member at once.
void rendezvous(const std::vector<int>& ranks, int64_t check, void* payload, int payload_bytes, const OpLabel& label);

// Host tensors over MPI (stateless; communicators live in a process-wide cache).
std::unique_ptr<Backend> make_cpu_backend();
Device& host_device();

// Builders shared with the staging backend.
GroupComm& group_comm(const std::vector<int>& ranks, const OpLabel& label);
PeerLink& peer_link(int peer_rank, const OpLabel& label);

}  // namespace llmir::mpi
