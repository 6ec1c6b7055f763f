// Who this process is: MPI's world (mpiexec, or MPI already initialized by mpi4py), or, in the CUDA
// library only, the launcher's environment (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, torchrun style)
// so that GPU clusters need no MPI launcher.
#pragma once

namespace llmir::world {

enum class Kind { kMpi, kEnvironment };

Kind kind();  // decided once per process
int rank();
int size();

}  // namespace llmir::world
