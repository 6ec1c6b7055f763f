#include "tcp_store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "world.h"

namespace llmir::store {
namespace {

// A connection to the server that sends nothing for this long is dropped, so that a silent client
// cannot hold one of its threads (the server is only up while NCCL communicators are being created).
constexpr double kServerIoSeconds = 10.0;
constexpr uint32_t kMaxStringBytes = 1u << 20;

std::string env_or_empty(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

std::string env_or_throw(const char* name, const OpLabel& label) {
  std::string value = env_or_empty(name);
  if (value.empty()) {
    throw Error(label.message(std::string("bootstrapping NCCL without MPI needs the environment variable ") + name +
                              " (set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LLMIR_STORE_TOKEN, or launch "
                              "with mpiexec)"));
  }
  return value;
}

std::string store_port(const OpLabel& label) {
  const std::string explicit_port = env_or_empty("LLMIR_STORE_PORT");
  return explicit_port.empty() ? env_or_throw("MASTER_PORT", label) : explicit_port;
}

// Where the store listens and where clients connect: LLMIR_STORE_ADDR if set; the loopback when the
// launcher says the whole world is on this host (LOCAL_WORLD_SIZE == WORLD_SIZE, as torchrun sets);
// else MASTER_ADDR, i.e. rank 0's address as the launcher names it. Never every interface, unless
// LLMIR_STORE_ADDR asks for it (0.0.0.0 or ::).
std::string store_host(const OpLabel& label) {
  const std::string explicit_host = env_or_empty("LLMIR_STORE_ADDR");
  if (!explicit_host.empty()) return explicit_host;
  const std::string local = env_or_empty("LOCAL_WORLD_SIZE");
  if (!local.empty() && local == env_or_empty("WORLD_SIZE")) return "127.0.0.1";
  return env_or_throw("MASTER_ADDR", label);
}

// The job's secret: the prefix of every key. Without it nobody can read or plant a communicator id.
std::string key_prefix(const OpLabel& label) {
  const std::string token = env_or_empty("LLMIR_STORE_TOKEN");
  if (token.size() < 16) {
    throw Error(label.message(
        "bootstrapping NCCL without MPI needs LLMIR_STORE_TOKEN: the same random secret of at least 16 characters "
        "on every rank of this job (e.g. export LLMIR_STORE_TOKEN=$(python -c 'import secrets; "
        "print(secrets.token_hex(16))') before starting the ranks)" +
        std::string(token.empty() ? "" : "; it is shorter than 16 characters")));
  }
  return token + "/";
}

double seconds_left(const std::chrono::steady_clock::time_point& end) {
  return std::chrono::duration<double>(end - std::chrono::steady_clock::now()).count();
}

void set_io_timeout(int fd, double seconds) {
  seconds = std::max(seconds, 0.001);
  timeval value{};
  value.tv_sec = static_cast<time_t>(seconds);
  value.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(value.tv_sec)) * 1e6);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &value, sizeof(value));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, sizeof(value));
}

// send/recv fail (EAGAIN) once the socket's SO_SNDTIMEO/SO_RCVTIMEO passes without progress.
bool write_all(int fd, const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes) {
    const ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
  }
  return true;
}

bool read_all(int fd, void* data, size_t bytes) {
  char* p = static_cast<char*>(data);
  while (bytes) {
    const ssize_t n = ::recv(fd, p, bytes, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    bytes -= static_cast<size_t>(n);
  }
  return true;
}

bool write_string(int fd, const std::string& text) {
  const uint32_t size = htonl(static_cast<uint32_t>(text.size()));
  return write_all(fd, &size, 4) && write_all(fd, text.data(), text.size());
}

bool read_string(int fd, std::string* text) {
  uint32_t size = 0;
  if (!read_all(fd, &size, 4)) return false;
  size = ntohl(size);
  if (size > kMaxStringBytes) return false;
  text->assign(size, '\0');
  return read_all(fd, text->data(), size);
}

std::mutex g_values_mutex;
std::map<std::string, std::string>* g_values = new std::map<std::string, std::string>();

// One request per connection: 'S' key value -> 'K'; 'G' key -> 1 + value, or 0 when not (yet) set.
// A key without the job's secret prefix gets no answer.
void serve_connection(int fd, const std::string& prefix) {
  set_io_timeout(fd, kServerIoSeconds);
  char op = 0;
  std::string key, value;
  if (read_all(fd, &op, 1) && read_string(fd, &key) && key.compare(0, prefix.size(), prefix) == 0) {
    if (op == 'S' && read_string(fd, &value)) {
      {
        std::lock_guard<std::mutex> lock(g_values_mutex);
        (*g_values)[key] = value;
      }
      write_all(fd, "K", 1);
    } else if (op == 'G') {
      bool found = false;
      {
        std::lock_guard<std::mutex> lock(g_values_mutex);
        auto it = g_values->find(key);
        if (it != g_values->end()) {
          found = true;
          value = it->second;
        }
      }
      const char flag = found ? 1 : 0;
      if (write_all(fd, &flag, 1) && found) write_string(fd, value);
    }
  }
  ::close(fd);
}

addrinfo* resolve(const std::string& host, const std::string& port, bool passive, const OpLabel& label) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const int code = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (code != 0) {
    throw Error(label.message("cannot resolve the bootstrap store's address " + host + ": " + ::gai_strerror(code) +
                              " (MASTER_ADDR, or LLMIR_STORE_ADDR)"));
  }
  return found;
}

void start_server_once(const OpLabel& label) {
  static std::once_flag started;
  static std::string failure;
  std::call_once(started, [&] {
    const std::string host = store_host(label);
    const std::string port = store_port(label);
    const std::string prefix = key_prefix(label);
    addrinfo* found = resolve(host, port, true, label);
    int listen_fd = -1;
    int error = 0;
    for (addrinfo* entry = found; entry != nullptr && listen_fd < 0; entry = entry->ai_next) {
      const int fd = ::socket(entry->ai_family, entry->ai_socktype | SOCK_CLOEXEC, entry->ai_protocol);
      if (fd < 0) continue;
      const int yes = 1;
      ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
      if (::bind(fd, entry->ai_addr, entry->ai_addrlen) == 0 && ::listen(fd, 128) == 0) {
        listen_fd = fd;
      } else {
        error = errno;
        ::close(fd);
      }
    }
    ::freeaddrinfo(found);
    if (listen_fd < 0) {
      failure = "rank 0 cannot serve the bootstrap store on " + host + ":" + port + " (" + std::strerror(error) +
                "); set LLMIR_STORE_PORT to a free port, or LLMIR_STORE_ADDR to an address of this host (the same "
                "on every rank)";
      return;
    }
    std::thread([listen_fd, prefix] {
      for (;;) {
        const int client = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (client < 0) {
          if (errno == EINTR || errno == ECONNABORTED) continue;
          return;
        }
        std::thread(serve_connection, client, prefix).detach();
      }
    }).detach();
  });
  if (!failure.empty()) throw Error(label.message(failure));
}

// Connect within the deadline; -1 while the store is not up (rank 0 may start later than us).
int connect_store(const std::chrono::steady_clock::time_point& end, const OpLabel& label) {
  addrinfo* found = resolve(store_host(label), store_port(label), false, label);
  int fd = -1;
  for (addrinfo* entry = found; entry != nullptr && fd < 0; entry = entry->ai_next) {
    fd = ::socket(entry->ai_family, entry->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, entry->ai_protocol);
    if (fd < 0) continue;
    bool connected = ::connect(fd, entry->ai_addr, entry->ai_addrlen) == 0;
    if (!connected && errno == EINPROGRESS) {
      pollfd waiting{fd, POLLOUT, 0};
      const int wait_ms = static_cast<int>(std::max(1.0, seconds_left(end) * 1000.0));
      int error = 0;
      socklen_t length = sizeof(error);
      connected = ::poll(&waiting, 1, wait_ms) == 1 &&
                  ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0 && error == 0;
    }
    if (!connected) {
      ::close(fd);
      fd = -1;
      continue;
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    set_io_timeout(fd, seconds_left(end));
  }
  ::freeaddrinfo(found);
  return fd;
}

void prepare(const OpLabel& label) {
  if (world::rank() == 0) start_server_once(label);
}

std::chrono::steady_clock::time_point deadline_end(double seconds) {
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
}

std::string silent_store_message(const Deadline& deadline, const OpLabel& label) {
  return "the bootstrap store at " + store_host(label) + ":" + store_port(label) +
         " did not answer: " + deadline.timeout_message() + " (check MASTER_ADDR/LLMIR_STORE_ADDR and that every "
         "rank has the same LLMIR_STORE_TOKEN)";
}

}  // namespace

void set(const std::string& key, const std::string& value, const OpLabel& label) {
  prepare(label);
  const std::string full_key = key_prefix(label) + key;
  const Deadline deadline(comm_timeout_seconds());
  const auto end = deadline_end(deadline.seconds());
  for (;;) {
    const int fd = connect_store(end, label);
    if (fd >= 0) {
      char ack = 0;
      const bool ok = write_all(fd, "S", 1) && write_string(fd, full_key) && write_string(fd, value) &&
                      read_all(fd, &ack, 1) && ack == 'K';
      ::close(fd);
      if (ok) return;
    }
    if (deadline.expired()) throw Error(label.message(silent_store_message(deadline, label)));
    ::usleep(50 * 1000);
  }
}

std::string get(const std::string& key, const OpLabel& label) {
  prepare(label);
  const std::string full_key = key_prefix(label) + key;
  const Deadline deadline(comm_timeout_seconds());
  const auto end = deadline_end(deadline.seconds());
  for (;;) {
    const int fd = connect_store(end, label);
    if (fd >= 0) {
      char found = 0;
      std::string value;
      const bool ok = write_all(fd, "G", 1) && write_string(fd, full_key) && read_all(fd, &found, 1) &&
                      (!found || read_string(fd, &value));
      ::close(fd);
      if (ok && found) return value;
    }
    if (deadline.expired()) throw Error(label.message(silent_store_message(deadline, label)));
    ::usleep(20 * 1000);
  }
}

}  // namespace llmir::store
