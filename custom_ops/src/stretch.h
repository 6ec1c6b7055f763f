// The compute meter, on every rank, and LLMIR_COMPUTE_STRETCH on the ranks it names.
//
// The meter: between llmir_compute_start() and llmir_compute_point() (the Python runner brackets a
// session run with them) the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID) is summed outside the
// CPU ai.llmir kernels' communication: a kernel's entry adds the CPU time since the last point and its
// return resets the point, so polling inside a collective (MPI_Test + sched_yield, which burns CPU time
// while a peer is late) is not counted. That sum is the rank's compute as the device does it, whatever
// the other processes on the machine do (preemption stops the clock), and with no profiler attached.
// With onnxruntime's intra_op_num_threads = 1 and the sequential executor every kernel of a run runs on
// the thread that calls run; a kernel on another thread is counted (foreign_kernels) and not measured
// (an error under the stretch). Outside a start/point bracket an unstretched rank reads no clock.
//
// LLMIR_COMPUTE_STRETCH="RANK=FACTOR[,RANK=FACTOR]": emulate a device FACTOR times slower than this one
// by stretching only this rank's compute. At every kernel entry and point the meter's CPU time since the
// last point is also slept (FACTOR - 1) times (a sleep's overshoot is paid back by the next), so the wait
// inside a collective is not stretched. The work after a run's last collective is stretched by the
// point after the run. Under the stretch the point stays set between runs (a runner that never calls
// start() is stretched from its first kernel on).
#pragma once

#include <cstdint>

namespace llmir::stretch {

// This process's factor (read and parsed once; 1 = off); `world_rank` is called once, and only when the
// variable is set. Throws Error on a malformed variable.
double factor(int (*world_rank)());
bool active(int (*world_rank)());  // factor(world_rank) > 1

// A CPU kernel's entry and return. `stretched` = active(): at entry, add the compute since the last point
// to the meter (and sleep under the stretch; throws Error when the point was set on another thread
// under the stretch); at return, reset the point.
void enter(bool stretched);
void leave(bool stretched);

// Python's calls: start() sets the point without counting (the runner's own work between runs is host
// work, not the device's); point() counts (and stretches) the compute since the last point, then resets
// it under the stretch or ends the bracket otherwise.
void start();
void point(bool stretched);
double slept_seconds();    // total wall time slept by the stretch so far
double compute_seconds();  // total thread CPU time the meter has counted so far (on every rank)
uint64_t foreign_kernels();  // kernels inside a bracket that ran on another thread (not measured)

}  // namespace llmir::stretch
