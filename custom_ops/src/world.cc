#include "world.h"

#include <cstdlib>
#include <string>

#include "common.h"
#include "mpi_backend.h"

namespace llmir::world {
namespace {

[[maybe_unused]] bool has_env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0';
}

int env_int(const char* name) {
  const char* text = std::getenv(name);
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || value < 0) {
    throw Error(std::string("ai.llmir: environment variable ") + name + "='" + text + "' is not a rank number");
  }
  return static_cast<int>(value);
}

Kind decide() {
#ifdef LLMIR_WITH_CUDA
  if (mpi::is_initialized()) return Kind::kMpi;
  // Launched by an MPI launcher (MPICH hydra / PMI, PMIx, Open MPI): use MPI even if RANK is also set.
  for (const char* name : {"PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID"}) {
    if (has_env(name)) return Kind::kMpi;
  }
  if (has_env("RANK") && has_env("WORLD_SIZE")) return Kind::kEnvironment;
#endif
  return Kind::kMpi;
}

}  // namespace

Kind kind() {
  static const Kind decided = decide();
  return decided;
}

int rank() {
  if (kind() == Kind::kMpi) return mpi::world_rank();
  static const int value = env_int("RANK");
  return value;
}

int size() {
  if (kind() == Kind::kMpi) return mpi::world_size();
  static const int value = env_int("WORLD_SIZE");
  return value;
}

}  // namespace llmir::world
