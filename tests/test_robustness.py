"""Hostile and broken input against real server processes (memory storage, dev tier).

Covers the connection cap, the idle timeout (silent, half-line and trickling clients),
over-long request lines, binary junk, clients that reset mid-reply or never read,
thousands of idle connections, running out of file descriptors, and SIGTERM with
connections open.  Every server is started by the ``launch`` fixture, killed at the
end of the test, and its stderr must never hold a Python traceback.

The junk is reproducible: the seed is printed, and PHAROS_ROBUSTNESS_SEED sets it.
"""

import fcntl
import os
import random
import re
import resource
import socket
import struct
import termios
import time

import pytest

from conftest import ServerProcess, wait_for

HOST = "127.0.0.1"
SEED = int(os.environ.get("PHAROS_ROBUSTNESS_SEED", "2378"))
MAX_LINE = 8192
REPLY_LINE_RE = re.compile(rb"^-?\d{3}:")
TOO_LONG = b"599:Command too long (limit 8192 bytes)."
READY = b"200:Database ready."
BULK_RECORDS = 300
BULK_QUERY = b"query name=bulk return all\n"
TCP_ESTABLISHED = 1


# --------------------------------------------------------------------------
# Servers and raw sockets
# --------------------------------------------------------------------------



def assert_clean_stderr(err):
    def excerpt():
        if len(err) <= 6000:
            return err
        return f"{err[:4000]}\n[... {len(err) - 6000} characters ...]\n{err[-2000:]}"
    assert "Traceback" not in err, (f"server wrote {err.count('Traceback')} tracebacks "
                                    f"({len(err)} characters) to stderr:\n{excerpt()}")
    assert "internal error" not in err, f"server logged an internal error:\n{excerpt()}"


@pytest.fixture
def launch():
    """Start memory-storage servers; kill them after the test and check their stderr."""
    started = []

    def start(*extra, **kw):
        srv = ServerProcess(None, *extra, storage="memory", **kw).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill()
    for srv in started:
        if not getattr(srv, "checked", False):
            assert_clean_stderr(srv.read_stderr())


def stop_clean(srv, timeout=15.0):
    """SIGTERM the server; it must exit 0 within the deadline with a clean stderr."""
    start = time.monotonic()
    srv.checked = True
    try:
        code, err = srv.stop(timeout=timeout)
    except Exception as e:  # subprocess.TimeoutExpired
        srv.kill()
        raise AssertionError(f"server did not exit within {timeout}s of SIGTERM: {e}\n"
                             f"{srv.read_stderr()}") from None
    assert code == 0, f"server exited {code} after SIGTERM:\n{err}"
    assert_clean_stderr(err)
    return time.monotonic() - start, err


class Raw:
    """A raw socket to the server that reads lines with an overall deadline."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def line(self, timeout=10.0):
        """One reply line (bytes, no newline); EOFError if the server closes first."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply line within {timeout}s (have {self.buf[:200]!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(262144)
            except socket.timeout:
                continue
            if not chunk:
                raise EOFError(f"server closed the connection (pending {self.buf[:200]!r})")
            self.buf += chunk
        out, self.buf = self.buf.split(b"\n", 1)
        return out

    def reply(self, timeout=10.0):
        """Lines of one reply up to its final line; each must look like a Ph reply line."""
        deadline = time.monotonic() + timeout
        lines = []
        while True:
            got = self.line(max(0.0, deadline - time.monotonic()))
            check_reply_line(got)
            lines.append(got)
            if not got.startswith(b"-") and int(got[:3]) >= 200:
                return lines

    def cmd(self, text, timeout=10.0):
        self.send(text.encode() + b"\n")
        return self.reply(timeout)

    def close(self):
        self.sock.close()


def check_reply_line(got):
    assert REPLY_LINE_RE.match(got), f"reply line is not a Ph reply line: {got[:300]!r}"
    assert b"Traceback" not in got and b'File "' not in got, f"traceback sent: {got[:300]!r}"


def tcp_state(sock):
    """The kernel's TCP state of ``sock`` (1 ESTABLISHED); does not read any data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def server_side_state(server_port, client_sock):
    """The TCP state of the server's end of ``client_sock`` (1 ESTABLISHED), from
    /proc/net/tcp, or None once the kernel has dropped it.  Reads nothing from the socket,
    so it does not unblock a server that is waiting for the client to read."""
    client_port = client_sock.getsockname()[1]
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            parts = row.split()
            local, remote = parts[1].split(":"), parts[2].split(":")
            if int(local[1], 16) == server_port and int(remote[1], 16) == client_port:
                return int(parts[3], 16)
    return None


def unread_bytes(sock):
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return struct.unpack("i", buf)[0]


def wait_closed_by_server(sock, timeout, stats=None):
    """Wait (reading and discarding) until the server closes ``sock``; return the wait.
    ``stats["bytes"]``, if given, counts what was read."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"server did not close the connection within {timeout}s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        if not chunk:
            return time.monotonic() - start
        if stats is not None:
            stats["bytes"] = stats.get("bytes", 0) + len(chunk)


def assert_serves(srv, timeout=5.0):
    """A fresh connection gets `200:Database ready.` for `status` within the deadline."""
    start = time.monotonic()
    c = Raw(srv.port, timeout)
    try:
        assert c.cmd("status", timeout) == [READY]
    finally:
        c.close()
    took = time.monotonic() - start
    assert took < timeout, f"status took {took:.2f}s"
    return took


def load_bulk(port, count=BULK_RECORDS):
    """Add ``count`` people, each with a ~3000-character notes value (a ~1 MB reply)."""
    notes = " ".join(f"lorem{i:04d}" for i in range(300))[:3000]
    c = Raw(port)
    try:
        c.send(b"".join(f'add alias=bulk-{i} name="bulk person {i}" notes="{notes}"\n'.encode()
                        for i in range(count)))
        for i in range(count):
            assert c.reply() == [b"200:Ok."], f"add {i} failed"
    finally:
        c.close()


def check_bulk_query(c, count=BULK_RECORDS, timeout=10.0):
    """Run the big query on ``c`` and check the whole reply arrived."""
    c.send(BULK_QUERY)
    lines = c.reply(timeout)
    assert lines[0] == f"102:There were {count} matches to your request.".encode()
    assert lines[-1] == b"200:Ok."
    aliases = [ln for ln in lines if re.match(rb"^-200:\d+:\s+alias: bulk-\d+$", ln)]
    assert len(aliases) == count
    return lines


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# --------------------------------------------------------------------------
# Connection cap
# --------------------------------------------------------------------------

def test_connection_cap_refuses_then_recovers(launch):
    srv = launch("--max-connections", "3")
    held = [Raw(srv.port) for _ in range(3)]
    try:
        for c in held:
            assert c.cmd("status") == [READY]

        extra = Raw(srv.port)
        assert extra.line() == b"400:Too many connections (limit 3); try again later."
        with pytest.raises(EOFError):
            got = extra.line()
            pytest.fail(f"refused connection got a second line {got!r}")
        extra.close()

        # The held connections are untouched by the refusal.
        for c in held:
            assert c.cmd("status") == [READY]

        # Once one closes, a new connection is accepted again (the server may need a
        # moment to notice the close, so retry refused attempts until a deadline).
        held.pop().close()

        def admitted():
            c = Raw(srv.port)
            first = c.cmd("status")
            if first == [READY]:
                held.append(c)
                return True
            assert first == [b"400:Too many connections (limit 3); try again later."]
            c.close()
            return False

        wait_for(admitted, timeout=5, interval=0.02, what="a connection admitted after a close")

        # Full again: the next one is refused.
        extra = Raw(srv.port)
        assert extra.line() == b"400:Too many connections (limit 3); try again later."
        extra.close()

        # Close them all: three fresh connections all work.
        for c in held:
            c.close()
        held = []

        def three_admitted():
            fresh = [Raw(srv.port) for _ in range(3)]
            try:
                return all(c.cmd("status") == [READY] for c in fresh)
            except EOFError:
                return False
            finally:
                for c in fresh:
                    c.close()

        wait_for(three_admitted, timeout=5, interval=0.02, what="three fresh connections admitted")
    finally:
        for c in held:
            c.close()
    stop_clean(srv)


# --------------------------------------------------------------------------
# Idle timeout
# --------------------------------------------------------------------------

@pytest.mark.parametrize("busy_poll", ["0", "10000"])
def test_idle_timeout_closes_silent_and_half_line_clients(launch, busy_poll):
    # the timeout's timer fires whether the loop sleeps at once or polls first
    srv = launch("--idle-timeout", "0.5", "--busy-poll", busy_poll)
    start = time.monotonic()
    silent = Raw(srv.port)
    half = Raw(srv.port)
    half.send(b"quer")
    try:
        for name, c in (("silent", silent), ("half line", half)):
            wait_closed_by_server(c.sock, timeout=10)
            took = time.monotonic() - start
            # conn.last is set after our connect, so the server may not close before 0.5s
            assert took >= 0.45, f"{name} client closed after only {took:.2f}s"
        assert_serves(srv)
    finally:
        silent.close()
        half.close()
    stop_clean(srv)


def test_idle_timeout_closes_trickling_client_but_not_an_active_one(launch):
    srv = launch("--idle-timeout", "0.5")
    trickle = Raw(srv.port)
    active = Raw(srv.port)
    try:
        start = time.monotonic()
        closed_after = None
        # One byte every 0.05s, never a newline: partial input does not count as activity.
        # Alongside, a real command every 0.1s keeps the other connection alive.
        # (The sleeps pace the clients; nothing here waits for the server by sleeping.)
        n = 0
        while time.monotonic() - start < 10:
            try:
                trickle.send(b"x")
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
            if tcp_state(trickle.sock) != TCP_ESTABLISHED:
                closed_after = time.monotonic() - start
                break
            if n % 2 == 0:
                assert active.cmd("status", timeout=5) == [READY]
            n += 1
            time.sleep(0.05)
        assert closed_after is not None, "trickling client was never closed"
        assert closed_after >= 0.45, f"trickling client closed after only {closed_after:.2f}s"
        # The active client, connected longer than the idle timeout, is still served.
        assert time.monotonic() - start > 0.5
        assert active.cmd("status") == [READY]
    finally:
        trickle.close()
        active.close()
    stop_clean(srv)


# --------------------------------------------------------------------------
# Over-long lines
# --------------------------------------------------------------------------

def test_long_lines_refused_and_connection_keeps_working(launch):
    srv = launch()
    c = Raw(srv.port)
    try:
        # Just under the limit (8191 bytes plus the newline) is an ordinary request.
        body = b"status " + b"x" * (MAX_LINE - 1 - len(b"status "))
        assert len(body) == MAX_LINE - 1
        c.send(body + b"\n")
        assert c.reply() == [READY]

        # Clearly over: 8193 bytes before the newline.
        c.send(b"status " + b"x" * (MAX_LINE + 1 - len(b"status ")) + b"\n")
        assert c.reply() == [TOO_LONG]
        assert c.cmd("status") == [READY]

        # 1 MiB on one line, sent in 64 KiB pieces, then the next command in the same write.
        piece = b"query " + b"y" * (65536 - 6)
        for _ in range(16):
            c.send(piece)
        c.send(b"\nstatus\n")
        assert c.reply(timeout=20) == [TOO_LONG]
        assert c.reply() == [READY]

        # 100 KiB with no newline; the newline comes in a later write.
        c.send(b"z" * (100 * 1024))
        c.send(b"\n")
        assert c.reply() == [TOO_LONG]
        assert c.cmd("status") == [READY]

        # Several long lines back to back each get exactly one refusal.
        c.send((b"w" * 20000 + b"\n") * 3 + b"status\n")
        assert [c.reply() for _ in range(4)] == [[TOO_LONG]] * 3 + [[READY]]

        # Nothing else is pending on the connection.
        c.send(b"id done\n")
        assert c.reply() == [b"200:Thanks."]
        assert c.buf == b""
    finally:
        c.close()
    assert_serves(srv)
    stop_clean(srv)


def test_a_flood_of_pipelined_lines_is_answered_in_order(launch):
    """Hundreds of thousands of lines in one write: blank ones answer nothing, every
    request is answered once and in order, and the connection then works as before."""
    srv = launch()
    c = Raw(srv.port)
    try:
        c.send(b"\n" * 400_000 + b"id a\n" * 2000 + b"status\n")
        assert [c.reply(timeout=60) for _ in range(2000)] == [[b"200:Thanks."]] * 2000
        assert c.reply(timeout=60) == [READY]
    finally:
        c.close()
    stop_clean(srv)


def test_long_continued_line_is_one_refused_request(launch):
    """Backslash-continued pieces form one request line; over 8192 bytes in all it gets a
    single 599 and none of its pieces run as commands of their own."""
    srv = launch()
    c = Raw(srv.port)
    try:
        piece = b"fields " + b"a" * 600 + b" \\\n"
        request = piece * 20 + b"alias\n"          # ~12 KiB in 21 physical lines
        c.send(request + b"status\n")
        first = c.reply()
        assert first == [TOO_LONG], f"expected one 599, got {first!r}"
        second = c.reply()
        assert second == [READY], (f"the rest of the refused continued line was run as a "
                                   f"command: got {second!r} where status's reply belonged")
    finally:
        c.close()
    stop_clean(srv)


# --------------------------------------------------------------------------
# Binary junk
# --------------------------------------------------------------------------

SPICE = [b"\x00", b"\xff", b"\xff\xff", b"\xff\xfb\x01", b"\xff\xfd\x03", b"\xff\xf4", b"\xff\xfa",
         b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x81", b"\xc0\xaf", b"\xfe",
         b'"', b'\\', b'\\"', b"\\n", b"\\t", b"=", b"~", b"*", b"?", b"[", b"]", b"[z-a]", b"\r",
         b"\t", b" ", b"  ", b"\x1b[2J", "\u2028".encode(), "\u202e".encode(), b"\x7f",
         b"return", b" return all", b" make ", b" force ", b"alias=", b"name=", b"notes=",
         b"hostname=", b"type=", b"ip=", b"%s%n", b"{}", b"\x00\x00\x00", b"-", b"200:", b":"]
VERBS = [b"", b"", b"query ", b"ph ", b"fields ", b"help ", b"help native ", b"id ", b"set ",
         b"add ", b"change ", b"delete ", b"login ", b"answer ", b"clear ", b"email ", b"logout ",
         b"xlogin ", b"klogin ", b"siteinfo ", b"\x00query ", b"\xff\xfb\x01query "]


def junk_request(rng):
    parts = [rng.choice(VERBS)]
    for _ in range(rng.randint(0, 24)):
        if rng.random() < 0.5:
            parts.append(rng.choice(SPICE))
        else:
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 12))))
    return b"".join(parts)


def test_binary_junk_never_kills_the_connection(launch):
    print(f"junk seed {SEED} (PHAROS_ROBUSTNESS_SEED)")
    rng = random.Random(SEED)
    srv = launch()
    c = Raw(srv.port)
    try:
        sent = 0
        for batch in range(25):
            requests = [junk_request(rng) for _ in range(20)]
            if batch % 5 == 4:                       # a plain random blob, newlines and all
                requests.append(rng.randbytes(8192))
            payload = b"".join(r + b"\n" for r in requests)
            # An empty line ends any backslash continuation the junk may have started; then
            # a sentinel request whose reply no junk can produce marks the end of the junk.
            sentinel = f"zzsentinel{batch}".encode()
            c.send(payload + b"\n\nfields " + sentinel + b"\n")
            sent += len(payload)
            lines = []
            while True:
                try:
                    got = c.line(timeout=10)
                except EOFError as e:
                    raise AssertionError(f"server closed the connection after junk batch "
                                         f"{batch} (seed {SEED}): {payload[:2000]!r}") from e
                check_reply_line(got)
                lines.append(got)
                if got == b"-507:" + sentinel + b":unknown field.":
                    break
            assert c.reply() == [b"599:Invalid field request."]
            assert len(lines) >= 2, f"junk batch {batch} got no replies at all"
            assert c.cmd("status") == [READY]
        assert sent > 50_000
        assert c.cmd("status") == [READY]
    finally:
        c.close()
    assert_serves(srv)
    stop_clean(srv)


INJECTIONS = [
    b'fields "a\\nb"', b'fields "x\\n200:Ok."', b'help "x\\ny"', b'help native "a\\n/b"',
    b'query name="\\n200:Ok."', b'query "\\n" return "\\n"', b'query name=x return "a\\nb"',
    b'set "echo\\n"=on', b'set echo="on\\n"', b'set limit="1\\n2"', b'login "a\\nb"',
    b'login a\\nb', b'answer "x\\ny"', b'id "x\\ny"', b'xlogin "a\\nb"', b'klogin "\\n"',
    b'"\\n200:Ok."', b'\\n200:Ok.', b'frob\\n200:Ok.', b'fields "\xe2\x80\xa8\xc2\x85\x1b]0;x\x07"',
    b'add alias=inj name="a b" notes="one\\n200:Ok.\\n-200:1: alias: root\\nthree"',
    b'query alias=inj return all', b'add hostname="h\\nx"', b'add alias="a\\nb"',
    b'change alias=inj make notes="\\r\\n102:x\\n"', b'query alias=inj return notes',
    b'delete "\\n"', b'set echo=on', b'query "\\n\\t\\\\" \x00\xff\xfe',
]


def test_reply_injection_attempts_stay_framed(launch):
    """Escapes that decode to newlines, CRs and control characters never break a reply
    line: every line the server sends is a Ph reply line, one reply per request."""
    srv = launch()
    c = Raw(srv.port)
    try:
        for request in INJECTIONS:
            c.send(request + b"\n")
            try:
                lines = c.reply()
            except (AssertionError, EOFError) as e:
                raise AssertionError(f"no proper reply to {request!r}: {e}") from None
            for got in lines:
                assert b"\r" not in got, f"{request!r} put a CR in reply line {got!r}"
            # Nothing beyond the one reply is pending: no request was split in two.
            assert c.cmd("status")[-1] == READY, f"reply to {request!r} was not one reply"
        # The multi-line notes (changed to CR, LF and a reply look-alike) came back inside
        # the one entry, and no raw CR went out.
        c.send(b"set echo=off\n")
        assert c.reply()[-1] == b"200:Done."
        lines = c.cmd("query alias=inj return notes")
        assert lines[0] == b"102:There was 1 match to your request.", lines
        assert lines[-1] == b"200:Ok.", lines
        assert len(lines) >= 4 and all(ln.startswith(b"-200:1:") for ln in lines[1:-1]), lines
        assert not any(b"\r" in ln for ln in lines), lines
    finally:
        c.close()
    assert_serves(srv)
    stop_clean(srv)


def test_junk_without_newline_then_close(launch):
    """Junk that never ends a line, then an abrupt close, on many connections at once."""
    rng = random.Random(SEED + 1)
    srv = launch()
    socks = []
    try:
        for n in range(20):
            s = socket.create_connection((HOST, srv.port), timeout=10)
            s.sendall(rng.randbytes(4096).replace(b"\n", b"\xff"))
            if n % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            socks.append(s)
        assert_serves(srv)
        for s in socks:
            s.close()
        socks = []
        assert_serves(srv)
    finally:
        for s in socks:
            s.close()
    stop_clean(srv)


# --------------------------------------------------------------------------
# Clients that reset mid-reply or never read
# --------------------------------------------------------------------------

def test_client_reset_mid_reply_does_not_disturb_others(launch):
    srv = launch("--max-results", "1000")
    load_bulk(srv.port)
    observer = Raw(srv.port)
    try:
        check_bulk_query(observer)
        for round_ in range(3):
            victims = []
            for _ in range(4):
                v = socket.create_connection((HOST, srv.port), timeout=10)
                v.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                v.sendall(BULK_QUERY * 3)
                victims.append(v)
            # Each reply has started arriving (checked without reading it) ...
            for v in victims:
                wait_for(lambda: unread_bytes(v) > 0, timeout=10, what="a reply to start")
            # ... and the client resets the connection mid-reply.
            for v in victims:
                v.close()
            # The observer, on its own connection, is unaffected.
            check_bulk_query(observer)
            assert observer.cmd("status") == [READY]
        assert srv.proc.poll() is None, "server died"
    finally:
        observer.close()
    assert_serves(srv)
    fresh = Raw(srv.port)
    try:
        check_bulk_query(fresh)
    finally:
        fresh.close()
    stop_clean(srv)


def test_client_that_never_reads_does_not_block_others(launch):
    srv = launch("--max-results", "1000", "--idle-timeout", "1.5")
    load_bulk(srv.port)
    stalled = socket.create_connection((HOST, srv.port), timeout=10)
    others = []
    try:
        # ~20 MB of replies asked for, none read: the server's writes to this client stall.
        stalled.sendall(BULK_QUERY * 20)
        wait_for(lambda: unread_bytes(stalled) > 0, timeout=10, what="the stalled reply to start")
        full_reply = 0
        for _ in range(3):
            c = Raw(srv.port)
            others.append(c)
            start = time.monotonic()
            assert c.cmd("status", timeout=3) == [READY]
            full_reply = sum(len(ln) + 1 for ln in check_bulk_query(c, timeout=5))
            assert time.monotonic() - start < 5
        assert server_side_state(srv.port, stalled) == TCP_ESTABLISHED
        # Eventually the idle timeout closes the stalled client.  Checked on the server's
        # end of the connection, without reading: its FIN waits behind the unread data.
        wait_for(lambda: server_side_state(srv.port, stalled) != TCP_ESTABLISHED, timeout=15,
                 interval=0.05, what="the server to close the non-reading client (idle timeout)")
        # Reading now drains what was already sent, then the close arrives; far less than
        # the 20 replies asked for came, so the server really was stalled on this client.
        stats = {}
        wait_closed_by_server(stalled, timeout=15, stats=stats)
        assert stats.get("bytes", 0) < 19 * full_reply, stats
        # (The other connections have sat idle too and may be closed by now.) A fresh
        # connection still works promptly.
        assert_serves(srv, timeout=3)
        c = Raw(srv.port)
        others.append(c)
        check_bulk_query(c, timeout=5)
    finally:
        stalled.close()
        for c in others:
            c.close()
    stop_clean(srv)


# --------------------------------------------------------------------------
# Many connections, running out of descriptors
# --------------------------------------------------------------------------

def test_two_thousand_idle_connections(launch):
    count = 2000
    raise_nofile(count + 200)
    srv = launch("--max-connections", "5000")
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((HOST, srv.port), timeout=10))
        # Every one of them is a live session (none refused, none dropped).
        for s in socks:
            s.sendall(b"id idle\n")
        deadline = time.monotonic() + 20
        for n, s in enumerate(socks):
            s.settimeout(max(0.1, deadline - time.monotonic()))
            got = b""
            while not got.endswith(b"\n"):
                chunk = s.recv(64)
                assert chunk, f"connection {n} of {count} was closed by the server"
                got += chunk
            assert got == b"200:Thanks.\n", f"connection {n}: {got!r}"
        # With all of them open, a fresh client is served promptly.
        assert_serves(srv, timeout=5)
        for s in socks:
            s.close()
        socks = []
        assert_serves(srv, timeout=5)
        assert srv.proc.poll() is None
    finally:
        for s in socks:
            s.close()
    stop_clean(srv)


def test_out_of_file_descriptors_keeps_running(launch):
    """With a tiny open-files limit the server caps its connections below it (one log line)
    instead of failing accept() with EMFILE: the rest get the cap's 400 line, and it serves
    again once connections close."""
    limit = 64

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    srv = launch("--max-connections", "5000", preexec_fn=low_nofile)
    socks, refused = [], 0
    try:
        for _ in range(limit + 40):
            sock = socket.create_connection((HOST, srv.port), timeout=10)
            socks.append(sock)
        for sock in socks:
            sock.sendall(b"status\n")
            reply = sock.recv(200)
            assert reply in (READY + b"\n", b"400:Too many connections (limit 32); "
                                                b"try again later.\n"), reply
            refused += reply.startswith(b"400:")
        assert refused >= 40, "connections beyond the open-files limit were not refused"
        assert srv.proc.poll() is None, "server died when short of file descriptors"
        for s in socks:
            s.close()
        socks = []
        assert_serves(srv, timeout=10)
    finally:
        for s in socks:
            s.close()
    assert "more than the open-files limit allows; using 32" in srv.read_stderr()
    stop_clean(srv)


# --------------------------------------------------------------------------
# SIGTERM with connections open
# --------------------------------------------------------------------------

def test_sigterm_with_connections_open_exits_zero(launch):
    srv = launch("--max-results", "1000")
    load_bulk(srv.port, 60)
    idle = [Raw(srv.port) for _ in range(5)]
    talked = Raw(srv.port)
    midline = Raw(srv.port)
    stalled = socket.create_connection((HOST, srv.port), timeout=10)
    try:
        assert talked.cmd("status") == [READY]
        midline.send(b"query name=bul")
        stalled.sendall(BULK_QUERY * 100)
        wait_for(lambda: unread_bytes(stalled) > 0, timeout=10, what="the stalled reply to start")
        took, err = stop_clean(srv, timeout=15)
        assert took < 12, f"SIGTERM took {took:.1f}s"
        assert "stopped" in err
        for c in idle + [talked, midline]:
            wait_closed_by_server(c.sock, timeout=5)
        with pytest.raises(OSError):
            socket.create_connection((HOST, srv.port), timeout=2).close()
    finally:
        for c in idle + [talked, midline]:
            c.close()
        stalled.close()


# --------------------------------------------------------------------------
# The polling selector the server loop runs on
# --------------------------------------------------------------------------

def test_polling_selector_reports_ready_sockets_and_honours_timeouts():
    import selectors
    import sys
    import threading
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import pharos
    a, b = socket.socketpair()
    sel = pharos.polling_selector_class()(0.002)
    try:
        sel.register(a, selectors.EVENT_READ)
        assert sel.select(0) == [] and sel.select(0.01) == []      # nothing yet: a timeout
        b.send(b"x")
        ready = sel.select(None)                                   # ready: no wait at all
        assert [(key.fileobj, events) for key, events in ready] == [(a, selectors.EVENT_READ)]
        a.recv(1)
        deadline = time.monotonic() + 5
        threading.Timer(0.05, b.send, (b"y",)).start()             # comes after the window
        ready = sel.select(None)
        assert time.monotonic() < deadline and [key.fileobj for key, _ in ready] == [a]
    finally:
        sel.close()
        a.close()
        b.close()
