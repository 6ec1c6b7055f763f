// Checks the TCP bootstrap store that replaces MPI for NCCL on GPU clusters (launcher environment:
// RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LLMIR_STORE_TOKEN). tests/test_custom_ops.py builds
// and runs it; by hand:
//   g++ -std=c++17 -O1 -DLLMIR_WITH_CUDA -Icustom_ops/src -I.venv/include -o build/store_test
//       custom_ops/tests/store_test.cc custom_ops/src/{tcp_store,world,common,mpi_backend}.cc
//       -L.venv/lib -Wl,-rpath,$PWD/.venv/lib -lmpi -lpthread      (one command)
//   export LLMIR_STORE_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))')
//   for r in 0 1 2; do RANK=$r WORLD_SIZE=3 MASTER_ADDR=localhost MASTER_PORT=29517 build/store_test & done; wait
// Modes (argv[1]):
//   exchange (default): every rank publishes a value and reads everyone's, plus one key that rank 0
//     sets late (after 1 s) to exercise waiting.
//   serve KEY VALUE SECONDS: set KEY (rank 0 serves) and keep serving for SECONDS.
//   get KEY: read KEY once (waits at most LLMIR_COMM_TIMEOUT_S); prints "value: ..." or "FAIL: ...".
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "tcp_store.h"
#include "world.h"

int main(int argc, char** argv) {
  using namespace llmir;
  OpLabel label;
  label.op = "store_test";
  const std::string mode = argc > 1 ? argv[1] : "exchange";
  try {
    if (world::kind() != world::Kind::kEnvironment) {
      std::printf("FAIL: expected the launcher-environment world\n");
      return 1;
    }
    const int rank = world::rank(), size = world::size();
    label.world_rank = rank;
    if (mode == "serve" && argc == 5) {
      store::set(argv[2], argv[3], label);
      std::printf("serving\n");
      std::fflush(stdout);
      sleep(static_cast<unsigned>(std::atoi(argv[4])));
      return 0;
    }
    if (mode == "get" && argc == 3) {
      std::printf("value: %s\n", store::get(argv[2], label).c_str());
      return 0;
    }
    store::set("value/" + std::to_string(rank), "hello from " + std::to_string(rank), label);
    for (int other = 0; other < size; ++other) {
      const std::string value = store::get("value/" + std::to_string(other), label);
      if (value != "hello from " + std::to_string(other)) {
        std::printf("FAIL rank %d: key of %d is '%s'\n", rank, other, value.c_str());
        return 1;
      }
    }
    if (rank == 0) {
      sleep(1);
      store::set("late", std::string("\0binary\xff", 8), label);
    }
    const std::string late = store::get("late", label);
    if (late != std::string("\0binary\xff", 8)) {
      std::printf("FAIL rank %d: late key\n", rank);
      return 1;
    }
    std::printf("ok rank %d/%d: read %d published values and one late binary value\n", rank, size, size);
    if (rank == 0) sleep(1);  // keep serving until the others have read
    return 0;
  } catch (const std::exception& error) {
    std::printf("FAIL: %s\n", error.what());
    return 1;
  }
}
