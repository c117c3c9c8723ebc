"""Shared fixtures: real Pharos servers in subprocesses, and a raw Ph client."""

import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHAROS = ROOT / "pharos.py"
LISTEN_RE = re.compile(rb"Ph listening on (\S+):(\d+)")
METRICS_RE = re.compile(rb"metrics listening on (\S+):(\d+)")
IN_CI = os.environ.get("CI") == "true"


def need(tool_ok, why):
    """Skip on a dev machine that lacks a real component; fail in CI."""
    if tool_ok:
        return
    if IN_CI:
        pytest.fail(f"CI must have {why}")
    pytest.skip(f"needs {why}")


def usable_by_nobody(path, need_bits=stat.S_IROTH):
    """Whether user nobody (not root, no groups) can reach `path` and has `need_bits` on it."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return os.stat(path).st_mode & need_bits == need_bits


def python_for_nobody():
    """An interpreter user nobody can run: ours, else a system python3 >= 3.10."""
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    for python in candidates:
        if not os.path.exists(python) or not usable_by_nobody(python, stat.S_IROTH | stat.S_IXOTH):
            continue
        ok = subprocess.run([python, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"],
                            capture_output=True)
        if ok.returncode == 0:
            return python
    need(False, f"a python3 >= 3.10 that user nobody can run (tried {candidates})")


def wait_for(predicate, timeout=10.0, interval=0.01, what="condition"):
    """Poll predicate() until it is truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """`pharos.py serve` in a subprocess on 127.0.0.1:0; learns its port from stderr.

    Once it listens, its stderr is drained in the background, so a chatty server can
    never block on a full pipe during a long test.
    """

    def __init__(self, data=None, *extra, storage="file", env=None, preexec_fn=None,
                 metrics=False):
        self.data = Path(data) if data else None
        self.args = [sys.executable, str(PHAROS), "serve", "--listen", "127.0.0.1:0",
                     "--storage", storage, "--tier", "dev"]
        self.args += ["--metrics", "127.0.0.1:0" if metrics else "off"]
        self.metrics_port = None
        if self.data:
            self.args += ["--data", str(self.data)]
        self.args += list(extra)
        self.env = dict(os.environ, **(env or {}))
        self.preexec_fn = preexec_fn
        self.proc = None
        self.port = None
        self.stderr = b""
        self.drainer = None

    def start(self, timeout=30.0, expect_ready=True):
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=self.env, preexec_fn=self.preexec_fn)
        if expect_ready:
            self.wait_listening(timeout)
        self.drainer = threading.Thread(target=self.drain, daemon=True)
        self.drainer.start()
        return self

    def wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        while self.port is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"server did not start: {self.stderr.decode(errors='replace')}")
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.proc.stderr.fileno(), 65536)
            if not chunk:
                self.proc.wait(timeout=10)
                raise AssertionError(f"server exited {self.proc.returncode}: "
                                     f"{self.stderr.decode(errors='replace')}")
            self.stderr += chunk
            match = LISTEN_RE.search(self.stderr)
            if match:
                self.port = int(match.group(2))
                found = METRICS_RE.search(self.stderr)
                self.metrics_port = int(found.group(2)) if found else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def drain(self):
        fd = self.proc.stderr.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.stderr += chunk

    def read_stderr(self):
        """Everything the server wrote to stderr so far (after it exits: all of it)."""
        if self.proc and self.proc.poll() is not None and self.drainer is not None:
            self.drainer.join(timeout=10)
        return self.stderr.decode(errors="replace")

    def finish(self, timeout=30.0):
        """Wait for the process to exit and return (returncode, stderr text)."""
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.read_stderr()

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.finish(timeout)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self, timeout=10.0):
        return PhClient("127.0.0.1", self.port, timeout)


class PhClient:
    """A raw, line-level Ph client: send a command, read to the final line."""

    def __init__(self, host, port, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read_reply(self) -> list[str]:
        """Lines of one reply, up to the first line whose code (a signed number) is >= 200."""
        lines = []
        while True:
            line = self.read_line().decode("utf-8")
            lines.append(line)
            if not line.startswith("-") and int(line[:3]) >= 200:
                return lines

    def cmd(self, line: str) -> list[str]:
        self.send_raw(line.encode("utf-8") + b"\n")
        return self.read_reply()

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def server(tmp_path):
    """A file-storage dev-tier server on a fresh data dir."""
    srv = ServerProcess(tmp_path / "data").start()
    yield srv
    srv.kill()


@pytest.fixture
def mem_server():
    """A memory-storage dev-tier server."""
    srv = ServerProcess(None, storage="memory").start()
    yield srv
    srv.kill()
