// A tiny key-value store over TCP for bootstrapping NCCL without MPI: rank 0 of the launcher's world
// (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) serves it; every rank is a client. Port:
// LLMIR_STORE_PORT if set, else MASTER_PORT. It only carries NCCL unique ids (128 bytes per communicator).
#pragma once

#include <string>

#include "common.h"

namespace llmir::store {

void set(const std::string& key, const std::string& value, const OpLabel& label);
// Waits until the key is set, at most LLMIR_COMM_TIMEOUT_S.
std::string get(const std::string& key, const OpLabel& label);

}  // namespace llmir::store
