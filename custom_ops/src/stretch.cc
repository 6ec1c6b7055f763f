#include "stretch.h"

#include <time.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "common.h"

namespace llmir::stretch {
namespace {

constexpr const char* kVariable = "LLMIR_COMPUTE_STRETCH";

double parse_factor(const char* text, int rank) {
  double found = 1.0;
  std::string all(text);
  size_t begin = 0;
  while (begin <= all.size()) {
    size_t end = all.find(',', begin);
    if (end == std::string::npos) end = all.size();
    std::string item = all.substr(begin, end - begin);
    begin = end + 1;
    // trim spaces
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    if (item.empty()) continue;
    const size_t equals = item.find('=');
    char* rank_end = nullptr;
    char* factor_end = nullptr;
    long item_rank = -1;
    double item_factor = 0;
    if (equals != std::string::npos) {
      const std::string rank_text = item.substr(0, equals);
      const std::string factor_text = item.substr(equals + 1);
      item_rank = std::strtol(rank_text.c_str(), &rank_end, 10);
      item_factor = std::strtod(factor_text.c_str(), &factor_end);
      if (rank_text.empty() || *rank_end != '\0' || factor_text.empty() || *factor_end != '\0') item_rank = -1;
    }
    if (equals == std::string::npos || item_rank < 0 || !std::isfinite(item_factor) || !(item_factor >= 1)) {
      throw Error(std::string(kVariable) + "='" + text + "': cannot read '" + item +
                  "'; write RANK=FACTOR with FACTOR >= 1, e.g. 1=3");
    }
    if (item_rank == rank) found = item_factor;
  }
  return found;
}

double thread_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

double monotonic_seconds() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

std::once_flag g_factor_once;
double g_factor = 1.0;
std::string g_factor_error;

// The meter's state; one owner thread (the one that called start(), or under the stretch the first
// kernel's). g_has_point is read without the lock so that an unstretched kernel outside a bracket costs
// one atomic load.
std::mutex g_mutex;
std::atomic<bool> g_has_point{false};
std::thread::id g_owner;
double g_point_cpu = 0;  // thread CPU time at the last point
double g_owed = 0;       // seconds still to sleep: a sleep's overshoot is paid back by the next one
double g_slept = 0;
double g_compute = 0;
uint64_t g_foreign = 0;

void reset_locked() {
  g_owner = std::this_thread::get_id();
  g_point_cpu = thread_cpu_seconds();
  g_has_point.store(true);
}

// Count the compute since the last point (and sleep (factor - 1) x it under the stretch). False when the
// calling thread is not the point's (counted in g_foreign; an error under the stretch).
bool count_locked(bool stretched) {
  if (g_owner != std::this_thread::get_id()) {
    if (stretched) {
      throw Error(std::string(kVariable) +
                  ": an ai.llmir kernel ran on another thread than the one that runs the session; the stretch "
                  "measures one thread's CPU time: run the session with intra_op_num_threads = 1 and "
                  "inter_op_num_threads = 1");
    }
    ++g_foreign;
    return false;
  }
  const double compute = thread_cpu_seconds() - g_point_cpu;
  g_compute += compute;
  if (!stretched) return true;
  g_owed += (g_factor - 1) * compute;
  if (g_owed > 0) {
    const double start = monotonic_seconds();
    timespec request{};
    request.tv_sec = static_cast<time_t>(g_owed);
    request.tv_nsec = static_cast<long>((g_owed - static_cast<double>(request.tv_sec)) * 1e9);
    while (nanosleep(&request, &request) != 0) {
    }  // EINTR: sleep the rest
    const double slept = monotonic_seconds() - start;
    g_slept += slept;
    g_owed -= slept;
  }
  return true;
}

}  // namespace

double factor(int (*world_rank)()) {
  std::call_once(g_factor_once, [world_rank] {
    const char* text = std::getenv(kVariable);
    if (text == nullptr || *text == '\0') return;
    try {
      g_factor = parse_factor(text, world_rank());
    } catch (const std::exception& error) {
      g_factor_error = error.what();
    }
  });
  if (!g_factor_error.empty()) throw Error(g_factor_error);
  return g_factor;
}

bool active(int (*world_rank)()) { return factor(world_rank) > 1; }

void enter(bool stretched) {
  if (!stretched && !g_has_point.load()) return;  // no bracket: no clock
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_has_point.load()) {  // under the stretch, the first kernel of a runner that never called start()
    reset_locked();
    return;
  }
  count_locked(stretched);
}

void leave(bool stretched) {
  if (!stretched && !g_has_point.load()) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_owner == std::this_thread::get_id() || !g_has_point.load()) reset_locked();
}

void start() {
  std::lock_guard<std::mutex> lock(g_mutex);
  reset_locked();
}

void point(bool stretched) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_has_point.load()) {
    if (stretched) reset_locked();
    return;
  }
  count_locked(stretched);
  if (stretched) {
    reset_locked();
  } else {
    g_has_point.store(false);
  }
}

double slept_seconds() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_slept;
}

double compute_seconds() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_compute;
}

uint64_t foreign_kernels() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_foreign;
}

}  // namespace llmir::stretch
