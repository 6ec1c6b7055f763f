"""The custom-op library's own checks (custom_ops/tests), run as part of the suite.

- `smoke.py` under `mpiexec -n 4`: every op and dtype through real onnxruntime sessions, compared with
  numpy, for the CPU library and (when it was built) the CPU kernels of the CUDA library;
- `check_half.py`: src/half.h's float16/bfloat16 conversions against numpy/ml_dtypes;
- `store_test.cc` (built here with g++): the TCP bootstrap store of the CUDA library's launcher-
  environment world (compiled for the CPU: it is plain sockets), including its secret, its bind address
  and its deadlines.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmir_onnx.runtime.launch import CUDA_LIBRARY_NAME, LIBRARY_DIR, custom_ops_library_path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "custom_ops" / "tests"
MPIEXEC = Path(sys.prefix) / "bin" / "mpiexec"
TIMEOUT_S = 300
TOKEN = "test-secret-0123456789abcdef"


def _run(command: list[str], env: dict[str, str] | None = None,
         timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("library", ["cpu", "cuda"])
def test_smoke_on_4_ranks(library: str) -> None:
    path = custom_ops_library_path() if library == "cpu" else LIBRARY_DIR / CUDA_LIBRARY_NAME
    if not path.is_file():
        pytest.skip(f"{CUDA_LIBRARY_NAME} was not built (no CUDA toolkit at install time)")
    # The timeout bounds the error paths' waits (a folded Recv would wait for it; see smoke.py).
    result = _run([str(MPIEXEC), "-n", "4", sys.executable, str(TESTS / "smoke.py"), str(path)],
                  env={"LLMIR_COMM_TIMEOUT_S": "60"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all smoke checks passed on 4 ranks (llmir_finalize -> 0)" in result.stdout, result.stdout


def test_half_conversions_match_numpy() -> None:
    result = _run([sys.executable, str(TESTS / "check_half.py")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" 0 mismatches") == 4, result.stdout  # h2f, b2f, f2h, f2b


# --------------------------------------------------------------------------- the TCP bootstrap store


@pytest.fixture(scope="module")
def store_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("store") / "store_test"
    prefix = Path(sys.prefix)
    sources = [TESTS / "store_test.cc", *(ROOT / "custom_ops" / "src" / f"{name}.cc"
                                          for name in ("tcp_store", "world", "common", "mpi_backend"))]
    result = _run(["g++", "-std=c++17", "-O1", "-DLLMIR_WITH_CUDA", f"-I{ROOT / 'custom_ops' / 'src'}",
                   f"-I{prefix / 'include'}", *map(str, sources), f"-L{prefix / 'lib'}",
                   f"-Wl,-rpath,{prefix / 'lib'}", "-lmpi", "-lpthread", "-o", str(binary)])
    assert result.returncode == 0, result.stderr
    return binary


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _world(rank: int, size: int, port: int, **extra: str) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(("PMI_", "OMPI_", "MPI_LOCAL", "LLMIR_STORE", "LOCAL_WORLD"))}
    return {**clean, "RANK": str(rank), "WORLD_SIZE": str(size), "MASTER_ADDR": "localhost",
            "MASTER_PORT": str(port), "LLMIR_STORE_TOKEN": TOKEN, "LLMIR_COMM_TIMEOUT_S": "30", **extra}


def _start(binary: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)


def test_store_exchange_on_3_ranks(store_test: Path) -> None:
    port = _free_port()
    ranks = [_start(store_test, _world(rank, 3, port)) for rank in range(3)]
    outputs = [process.communicate(timeout=TIMEOUT_S)[0] for process in ranks]
    for rank, (process, output) in enumerate(zip(ranks, outputs, strict=True)):
        assert process.returncode == 0 and f"ok rank {rank}/3" in output, output


def test_store_refuses_to_start_without_the_job_secret(store_test: Path) -> None:
    env = _world(0, 2, _free_port())
    del env["LLMIR_STORE_TOKEN"]
    result = subprocess.run([str(store_test), "get", "k"], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == 1
    assert "needs LLMIR_STORE_TOKEN" in result.stdout and "secrets.token_hex" in result.stdout, result.stdout


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


@pytest.fixture()
def one_host_store(store_test: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """Rank 0 of a world that the launcher says is on one host, serving key k = v."""
    port = _free_port()
    server = _start(store_test, _world(0, 2, port, LOCAL_WORLD_SIZE="2", MASTER_ADDR=socket.gethostname()),
                    "serve", "k", "v", "60")
    assert server.stdout is not None and server.stdout.readline().strip() == "serving"
    yield port, server
    server.kill()
    server.wait()


def test_store_on_one_host_listens_on_the_loopback_only(one_host_store: tuple[int, subprocess.Popen[str]],
                                                         store_test: Path) -> None:
    port, _ = one_host_store
    assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1, not every interface
    result = subprocess.run([str(store_test), "get", "k"], capture_output=True, text=True, timeout=TIMEOUT_S,
                            env=_world(1, 2, port, LOCAL_WORLD_SIZE="2"))
    assert result.stdout.strip() == "value: v", result.stdout


def test_store_keys_carry_the_job_secret(one_host_store: tuple[int, subprocess.Popen[str]], store_test: Path) -> None:
    """A client of another job (another secret) cannot read this job's communicator id."""
    port, _ = one_host_store
    result = subprocess.run([str(store_test), "get", "k"], capture_output=True, text=True, timeout=TIMEOUT_S,
                            env=_world(1, 2, port, LOCAL_WORLD_SIZE="2", LLMIR_STORE_TOKEN="another-job-secret-42",
                                       LLMIR_COMM_TIMEOUT_S="2"))
    assert result.returncode == 1
    assert "did not answer" in result.stdout and "same LLMIR_STORE_TOKEN" in result.stdout, result.stdout


def test_a_silent_store_is_a_timeout_not_a_hang(store_test: Path) -> None:
    """A server that accepts and never answers: each read has a deadline, so the client fails at
    LLMIR_COMM_TIMEOUT_S instead of blocking (before, recv() had none)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        result = subprocess.run([str(store_test), "get", "k"], capture_output=True, text=True, timeout=TIMEOUT_S,
                                env=_world(1, 2, port, MASTER_ADDR="127.0.0.1", LLMIR_COMM_TIMEOUT_S="2"))
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()
    assert result.returncode == 1
    assert "did not answer" in result.stdout and "within 2.0 s" in result.stdout, result.stdout
    assert accepted, "the client never connected"
