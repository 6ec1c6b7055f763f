// LLMIR_COMPUTE_STRETCH="RANK=FACTOR[,RANK=FACTOR]": emulate a device FACTOR times slower than this one
// by stretching only this rank's compute. Every CPU ai.llmir kernel, on entry and before it communicates,
// sleeps (FACTOR - 1) x the CPU time the calling thread used since the last stretch point
// (CLOCK_THREAD_CPUTIME_ID: the rank's own compute, whatever the other processes on the machine do); the
// point is reset when the kernel's communication is over, so the wait inside a collective is not
// stretched. The work after a run's last collective is stretched by llmir_stretch_point(), which the
// Python rank runner calls right after each run. With onnxruntime's intra_op_num_threads = 1 every
// kernel of a run runs on the thread that calls run (checked: a kernel on another thread is an error).
// Without the variable (or a factor of 1 for this rank) nothing here reads a clock.
#pragma once

namespace llmir::stretch {

// This process's factor (read and parsed once; 1 = off); `world_rank` is called once, and only when the
// variable is set, so that without it a kernel pays one flag test. Throws Error on a malformed variable.
double factor(int (*world_rank)());
bool active(int (*world_rank)());  // factor(world_rank) > 1

// A CPU kernel's entry: stretch the calling thread's compute since the last point (throws Error when the
// point was set on another thread); then RAII resets the point when the kernel returns or throws.
void enter();
void leave();

// Python's calls: start() resets the point without stretching (before a run: the runner's own work
// between runs is host work, not the device's); point() stretches now and resets.
void start();
void point();
double slept_seconds();   // total wall time slept by the stretch so far
double compute_seconds(); // total thread CPU time the stretch has measured (and stretched) so far

}  // namespace llmir::stretch
