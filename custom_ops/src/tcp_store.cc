#include "tcp_store.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "world.h"

namespace llmir::store {
namespace {

std::string env_or_throw(const char* name, const OpLabel& label) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    throw Error(label.message(std::string("bootstrapping NCCL without MPI needs the environment variable ") + name +
                              " (set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or launch with mpiexec)"));
  }
  return value;
}

std::string store_port(const OpLabel& label) {
  const char* explicit_port = std::getenv("LLMIR_STORE_PORT");
  if (explicit_port != nullptr && *explicit_port != '\0') return explicit_port;
  return env_or_throw("MASTER_PORT", label);
}

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
  if (size > (1u << 20)) return false;
  text->assign(size, '\0');
  return read_all(fd, text->data(), size);
}

std::mutex g_values_mutex;
std::map<std::string, std::string>* g_values = new std::map<std::string, std::string>();

// One request per connection: 'S' key value -> 'K'; 'G' key -> 1 + value, or 0 when not (yet) set.
void serve_connection(int fd) {
  char op = 0;
  std::string key, value;
  if (read_all(fd, &op, 1) && read_string(fd, &key)) {
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

void start_server_once(const OpLabel& label) {
  static std::once_flag started;
  static std::string failure;
  std::call_once(started, [&] {
    const std::string port = store_port(label);
    const int fd = ::socket(AF_INET6, SOCK_STREAM, 0);
    const int any = 1, dual_stack = 0;
    int listen_fd = fd;
    bool ok = false;
    if (fd >= 0) {  // IPv6 socket accepting IPv4 too
      ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &any, sizeof(any));
      ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &dual_stack, sizeof(dual_stack));
      sockaddr_in6 address{};
      address.sin6_family = AF_INET6;
      address.sin6_addr = in6addr_any;
      address.sin6_port = htons(static_cast<uint16_t>(std::atoi(port.c_str())));
      ok = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 && ::listen(fd, 128) == 0;
    }
    if (!ok) {
      if (fd >= 0) ::close(fd);
      listen_fd = ::socket(AF_INET, SOCK_STREAM, 0);
      ::setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &any, sizeof(any));
      sockaddr_in address{};
      address.sin_family = AF_INET;
      address.sin_addr.s_addr = htonl(INADDR_ANY);
      address.sin_port = htons(static_cast<uint16_t>(std::atoi(port.c_str())));
      ok = listen_fd >= 0 && ::bind(listen_fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
           ::listen(listen_fd, 128) == 0;
    }
    if (!ok) {
      failure = "rank 0 cannot serve the bootstrap store on port " + port + " (" + std::strerror(errno) +
                "); set LLMIR_STORE_PORT to a free port (the same on every rank)";
      return;
    }
    std::thread([listen_fd] {
      for (;;) {
        const int client = ::accept(listen_fd, nullptr, nullptr);
        if (client < 0) {
          if (errno == EINTR || errno == ECONNABORTED) continue;
          return;
        }
        std::thread(serve_connection, client).detach();
      }
    }).detach();
  });
  if (!failure.empty()) throw Error(label.message(failure));
}

// Connect to the store; -1 while it is not up yet (rank 0 may start later than us).
int connect_store(const OpLabel& label) {
  const std::string host = env_or_throw("MASTER_ADDR", label);
  const std::string port = store_port(label);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int code = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &found);
  if (code != 0) {
    throw Error(label.message("cannot resolve MASTER_ADDR=" + host + ": " + ::gai_strerror(code)));
  }
  int fd = -1;
  for (addrinfo* entry = found; entry != nullptr && fd < 0; entry = entry->ai_next) {
    fd = ::socket(entry->ai_family, entry->ai_socktype, entry->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, entry->ai_addr, entry->ai_addrlen) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  return fd;
}

void prepare(const OpLabel& label) {
  if (world::rank() == 0) start_server_once(label);
}

}  // namespace

void set(const std::string& key, const std::string& value, const OpLabel& label) {
  prepare(label);
  const Deadline deadline(comm_timeout_seconds());
  for (;;) {
    const int fd = connect_store(label);
    if (fd >= 0) {
      char ack = 0;
      const bool ok = write_all(fd, "S", 1) && write_string(fd, key) && write_string(fd, value) &&
                      read_all(fd, &ack, 1) && ack == 'K';
      ::close(fd);
      if (ok) return;
    }
    if (deadline.expired()) {
      throw Error(label.message("the bootstrap store at MASTER_ADDR:" + store_port(label) + " did not answer: " +
                                deadline.timeout_message()));
    }
    ::usleep(50 * 1000);
  }
}

std::string get(const std::string& key, const OpLabel& label) {
  prepare(label);
  const Deadline deadline(comm_timeout_seconds());
  for (;;) {
    const int fd = connect_store(label);
    if (fd >= 0) {
      char found = 0;
      std::string value;
      const bool ok = write_all(fd, "G", 1) && write_string(fd, key) && read_all(fd, &found, 1) &&
                      (!found || read_string(fd, &value));
      ::close(fd);
      if (ok && found) return value;
    }
    if (deadline.expired()) throw Error(label.message(deadline.timeout_message()));
    ::usleep(20 * 1000);
  }
}

}  // namespace llmir::store
