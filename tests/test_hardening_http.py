"""The HTTP listener against hostile and broken clients, and `pharos doctor` against it.

Slow clients that trickle a request must neither starve scrapes and probes nor keep their
connection past the whole-request deadline; no client behaviour may print a traceback;
doctor checks the configured server's own HTTP listener and says by its exit code whether
every check passed.
"""

import http.client
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pharos  # noqa: E402
from conftest import PHAROS, ServerProcess, wait_for  # noqa: E402

HOST = "127.0.0.1"
SLOW_CLIENTS = 96                           # more than the listener's connection cap (64)


def start(*extra, metrics=True):
    return ServerProcess(None, *extra, storage="memory", metrics=metrics).start()


def fetch(port, path, timeout=2.0):
    """(status, body) of one GET that must be answered within ``timeout`` seconds."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def exchange(port, request: bytes, timeout=10.0) -> bytes:
    """Send ``request`` and read until the server closes; b'' when it resets instead."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


def status_of(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split()[1])


# --------------------------------------------------------------------------
# The request reader (pure)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("data, code", [
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET /metrics HTTP/1.1\nHost: x\n\n", None),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n", "incomplete"),
    (b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc", "incomplete"),
    (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
    (b"\xff\xfe / HTTP/1.1\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"y" * 20000, 431),
    (b"GET /" + b"a" * 20000, 414),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
])
def test_request_reader_limits(data, code):
    if code is None:
        request = pharos.read_http_request(bytearray(data))
        assert (request.method, request.path, request.headers["host"]) == ("GET", "/metrics", "x")
    elif code == "incomplete":
        assert pharos.read_http_request(bytearray(data)) is None
    else:
        with pytest.raises(pharos.HttpError) as refused:
            pharos.read_http_request(bytearray(data))
        assert refused.value.code == code


def test_request_reader_takes_the_body_by_content_length():
    data = bytearray(b"POST /mcp?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcNEXT")
    request = pharos.read_http_request(data)
    assert (request.path, request.query, request.body) == ("/mcp", "x=1", b"abc")


# --------------------------------------------------------------------------
# Slow clients
# --------------------------------------------------------------------------

class Tricklers:
    """Connections that each send a request header one byte a second until the server closes."""

    def __init__(self, port, count):
        self.socks = {}
        for _ in range(count):
            sock = socket.create_connection((HOST, port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            sock.setblocking(False)
            self.socks[sock] = time.monotonic()
        self.closed = {}                    # socket → seconds it lived
        self.sent = {sock: 0 for sock in self.socks}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set() and len(self.closed) < len(self.socks):
            for sock, opened in self.socks.items():
                if sock not in self.closed and self.trickle(sock):
                    self.closed[sock] = time.monotonic() - opened
            self.stop.wait(1.0)

    def trickle(self, sock):
        """Send one byte; True once the server has closed the connection."""
        try:
            if select.select([sock], [], [], 0)[0] and sock.recv(4096) == b"":
                return True
            sock.send(b"a")
            self.sent[sock] += 1
        except OSError:
            return True
        return False

    def trickled_twice(self):
        """Whether every connection still open has sent two bytes of its header."""
        return all(self.sent[sock] >= 2 for sock in self.socks if sock not in self.closed)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=10)
        for sock in self.socks:
            sock.close()


def test_slow_clients_neither_starve_probes_nor_outlive_the_deadline():
    srv = start()
    tricklers = None
    try:
        tricklers = Tricklers(srv.metrics_port, SLOW_CLIENTS)
        wait_for(tricklers.trickled_twice, timeout=10, what="the slow clients to trickle twice")
        for path in ("/metrics", "/healthz", "/readyz"):
            started = time.monotonic()
            status, body = fetch(srv.metrics_port, path)
            assert status == 200 and body, (path, status)
            assert time.monotonic() - started < 2.0, path
        assert len(tricklers.socks) - len(tricklers.closed) >= 32, "too few still trickling"
        wait_for(lambda: len(tricklers.closed) == SLOW_CLIENTS,
                 timeout=pharos.HTTP_DEADLINE + 5, what="the server to close every slow client")
        lived = sorted(tricklers.closed.values())
        assert lived[-1] <= pharos.HTTP_DEADLINE + 2, lived
        # the ones not displaced by newer clients kept trickling and were cut off at the deadline
        assert lived[-1] >= pharos.HTTP_DEADLINE - 0.5, lived
        assert fetch(srv.metrics_port, "/healthz")[0] == 200
    finally:
        if tricklers:
            tricklers.close()
        srv.kill()
    assert "Traceback" not in srv.read_stderr(), srv.read_stderr()


# --------------------------------------------------------------------------
# No client behaviour prints a traceback
# --------------------------------------------------------------------------

def reset_after_sending(port, request):
    """Send ``request`` and reset the connection at once, before the answer is written."""
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(request)
    sock.close()


REFUSED = [
    (b"BREW /metrics HTTP/1.1\r\n\r\n", 405),
    (b"G\x01T /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
    (b"\xff\xfe\xfd\r\n\r\n", 400),
    (b"GET /metrics HTTP/3.0\r\n\r\n", 505),
    (b"GET /metrics HTTP/1.1\r\n" + b"X-Many: y\r\n" * 500 + b"\r\n", 431),
    (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"y" * 200_000 + b"\r\n\r\n", 431),
    (b"POST /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n", 413),
]


def test_clients_that_hang_up_print_no_traceback():
    srv = start()
    port = srv.metrics_port
    try:
        for _ in range(30):                 # reset before the answer is written
            reset_after_sending(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        for request in (b"GET /metrics HTTP/1.1\r\nHo", b"GET /met", b""):
            with socket.create_connection((HOST, port), timeout=5) as sock:
                sock.sendall(request)       # half a request, then gone
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            sock.shutdown(socket.SHUT_RD)   # never reads the answer
        wait_for(lambda: fetch(port, "/healthz")[0] == 200, what="the listener to answer")
        assert fetch(port, "/metrics")[0] == 200
    finally:
        srv.kill()
    stderr = srv.read_stderr()
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr


def test_malformed_requests_get_a_4xx_or_5xx_and_no_traceback():
    srv = start()
    try:
        for request, code in REFUSED:
            answer = exchange(srv.metrics_port, request)
            assert answer and status_of(answer) == code, (request[:40], answer[:80])
        assert fetch(srv.metrics_port, "/healthz")[0] == 200
    finally:
        srv.kill()
    assert "Traceback" not in srv.read_stderr(), srv.read_stderr()


# --------------------------------------------------------------------------
# pharos doctor
# --------------------------------------------------------------------------

def doctor(*args):
    return subprocess.run([sys.executable, str(PHAROS), "doctor", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def line_of(result, name):
    return next((text for text in result.stdout.splitlines() if text.startswith(name)), "")


def refused_port():
    """A port on HOST that refuses connections while the returned socket stays open."""
    sock = socket.socket()
    sock.bind((HOST, 0))                    # bound, not listening
    return sock, sock.getsockname()[1]


def test_siteinfo_advertises_the_http_port_only_when_there_is_a_listener():
    with_http, without = start(), start(metrics=False)
    try:
        with with_http.client() as c:
            assert f"metrics:{with_http.metrics_port}" in "\n".join(c.cmd("siteinfo"))
        with without.client() as c:
            assert not any(":metrics:" in text for text in c.cmd("siteinfo"))
    finally:
        with_http.kill()
        without.kill()


def test_doctor_checks_the_http_listener_the_server_advertises(tmp_path):
    srv = start()
    try:
        result = doctor("--data", str(tmp_path / "data"), "--server", f"{HOST}:{srv.port}")
    finally:
        srv.kill()
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = line_of(result, "metrics")
    assert f"{HOST}:{srv.metrics_port}:" in metrics, result.stdout
    assert "/healthz 200" in metrics and "/readyz 200" in metrics, metrics


def test_doctor_exits_3_when_the_server_is_unreachable(tmp_path):
    closed, port = refused_port()
    with closed:
        result = doctor("--data", str(tmp_path / "data"), "--server", f"{HOST}:{port}")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "cannot reach" in line_of(result, "server"), result.stdout
    assert f"{HOST}:{pharos.METRICS_PORT}" in line_of(result, "metrics"), result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_doctor_exits_3_when_the_http_listener_is_unreachable(tmp_path):
    srv = start(metrics=False)
    closed, port = refused_port()
    try:
        with closed:
            result = doctor("--data", str(tmp_path / "data"), "--server", f"{HOST}:{srv.port}",
                            "--metrics", f"{HOST}:{port}")
        off = doctor("--data", str(tmp_path / "data"), "--server", f"{HOST}:{srv.port}")
    finally:
        srv.kill()
    assert result.returncode == 3, result.stdout + result.stderr
    assert "200:Database ready." in line_of(result, "server"), result.stdout
    assert "not answering" in line_of(result, "metrics"), result.stdout
    assert off.returncode == 0, off.stdout + off.stderr
    assert "advertises no HTTP listener" in line_of(off, "metrics"), off.stdout


def test_doctor_reports_why_the_server_is_not_ready(tmp_path):
    srv = start("--max-connections", "1")
    try:
        with srv.client() as holder:        # the one slot: /readyz says 503 and why
            assert holder.cmd("status") == ["200:Database ready."]
            result = doctor("--data", str(tmp_path / "data"), "--server", f"{HOST}:{srv.port}",
                            "--metrics", f"{HOST}:{srv.metrics_port}")
    finally:
        srv.kill()
    assert result.returncode == 3, result.stdout + result.stderr
    metrics = line_of(result, "metrics")
    assert "/healthz 200" in metrics, metrics
    assert "/readyz 503 (the Ph listener is at its connection cap)" in metrics, metrics
