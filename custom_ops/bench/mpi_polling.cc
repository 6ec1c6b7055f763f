// Is the library's way of waiting (MPI_Iallreduce + MPI_Test polling with sched_yield, plus a 37-word
// MPI_Iallgather pre-flight check) as fast as a blocking MPI_Allreduce? Median of N iterations per size.
// Build and run:
//   .venv/bin/mpicxx -O2 -std=c++17 custom_ops/bench/mpi_polling.cc -o build/mpi_polling
//   .venv/bin/mpiexec -n 4 build/mpi_polling
#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

void poll(MPI_Request* request) {
  int done = 0;
  for (uint64_t i = 0;; ++i) {
    MPI_Test(request, &done, MPI_STATUS_IGNORE);
    if (done) return;
    if (i >= 16) sched_yield();
  }
}

template <typename F>
double median_seconds(int iterations, F run) {
  std::vector<double> times;
  for (int i = 0; i < iterations; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double start = MPI_Wtime();
    run();
    double elapsed = MPI_Wtime() - start;
    MPI_Allreduce(MPI_IN_PLACE, &elapsed, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    times.push_back(elapsed);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank == 0) {
    std::printf("ranks=%d  median us: blocking Allreduce | Iallreduce+Wait | Iallreduce+Test/yield | +check allgather"
                "  (ratio polled+check / blocking)\n", size);
  }
  for (size_t bytes = 4096; bytes <= (64u << 20); bytes *= 4) {
    const size_t count = bytes / sizeof(float);
    std::vector<float> in(count, 1.0f), out(count);
    const int iterations = bytes >= (16u << 20) ? 10 : 30;
    const double blocking = median_seconds(iterations, [&] {
      MPI_Allreduce(in.data(), out.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    });
    const double waited = median_seconds(iterations, [&] {
      MPI_Request request;
      MPI_Iallreduce(in.data(), out.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request);
      MPI_Wait(&request, MPI_STATUS_IGNORE);
    });
    const double polled = median_seconds(iterations, [&] {
      MPI_Request request;
      MPI_Iallreduce(in.data(), out.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request);
      poll(&request);
    });
    int64_t words[37] = {}, all[37 * 64];
    const double checked = median_seconds(iterations, [&] {
      MPI_Request request;
      MPI_Iallgather(words, 37, MPI_INT64_T, all, 37, MPI_INT64_T, MPI_COMM_WORLD, &request);
      poll(&request);
      MPI_Iallreduce(in.data(), out.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &request);
      poll(&request);
    });
    if (rank == 0) {
      std::printf("%9zu B  %9.1f | %9.1f | %9.1f | %9.1f   (%.2fx)\n", bytes, blocking * 1e6, waited * 1e6,
                  polled * 1e6, checked * 1e6, checked / blocking);
    }
  }
  MPI_Finalize();
  return 0;
}
