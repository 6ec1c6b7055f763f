// A tiny key-value store over TCP for bootstrapping NCCL without MPI: rank 0 of the launcher's world
// (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) serves it; every rank is a client. It only carries NCCL
// unique ids (128 bytes per communicator). Port: LLMIR_STORE_PORT if set, else MASTER_PORT. Address (to
// listen on and to connect to): LLMIR_STORE_ADDR if set, the loopback when LOCAL_WORLD_SIZE equals
// WORLD_SIZE (one host), else MASTER_ADDR. Every key carries the job's secret LLMIR_STORE_TOKEN (required,
// the same on every rank); the server ignores keys without it. Every socket operation has a deadline
// (the client's: LLMIR_COMM_TIMEOUT_S overall; the server's: 10 s per connection).
#pragma once

#include <string>

#include "common.h"

namespace llmir::store {

void set(const std::string& key, const std::string& value, const OpLabel& label);
// Waits until the key is set, at most LLMIR_COMM_TIMEOUT_S.
std::string get(const std::string& key, const OpLabel& label);

}  // namespace llmir::store
