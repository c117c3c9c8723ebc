#!/usr/bin/env python3
"""Closed-loop load client for Ph and LDAP servers, and the SQLite write baseline.

Every connection keeps exactly one request outstanding (like every real Ph client): it sends,
waits for the whole reply, checks it, and sends the next. C connections share one asyncio loop
in this one process. After a warm-up the clock runs for a fixed time; only replies that
complete inside that window count. The server's CPU time (utime + stime from /proc/PID/stat,
all threads) over the window divided by the requests answered is the cost per request.

    python3 bench/loadgen.py --driver ph   --port 2378 --pid PID --size 100000 -c 16
    python3 bench/loadgen.py --driver ldap --port 3890 --pid PID --size 100000 -c 16
    python3 bench/loadgen.py --driver ph-add --port 2378 --pid PID -c 16
    python3 bench/loadgen.py --driver sqlite --db /tmp/x.db -c 16

Drivers:
  ph      `query name=<surname> return alias name email` (--queries exact), or name=<prefix>*
          (prefix), ip=<ip> / mac=<mac> (ip, mac); the entry count is checked per reply
  ldap    (&(objectClass=inetOrgPerson)(sn=<surname>)) (or sn=<prefix>*) with attributes
          uid cn mail; BER bytes built before the clock starts; SearchResultEntry messages are
          counted up to SearchResultDone and checked
  ph-add  `add alias=... name="..." ...` of fresh people, each answered 200 (after fsync)
  sqlite  the same people INSERTed by C threads into SQLite (WAL, synchronous=FULL), one row
          per transaction (autocommit)

Prints one JSON object: requests, seconds, rps, p50_us, p99_us, max_us, errors, cpu_us_per_req,
entries_per_reply, per-connection counts (fairness).
"""

import argparse
import asyncio
import gc
import itertools
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dataset  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
BASE_DN = dataset.BASE_DN.encode()


# -- /proc -------------------------------------------------------------------

def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds; None without a pid."""
    if not pid:
        return None
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_seconds():
    """CPU seconds all processes have spent busy (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def rss_kib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith(key + ":"):
                return int(row.split()[1])
    return None


# -- a tiny BER encoder (just what a SearchRequest needs) ---------------------

def ber_length(n):
    if n < 0x80:
        return bytes((n,))
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def tlv(tag, content):
    return bytes((tag,)) + ber_length(len(content)) + content


def ber_integer(value, tag=0x02):
    return tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def octets(text, tag=0x04):
    return tlv(tag, text.encode() if isinstance(text, str) else text)


def f_equal(attr, value):                       # equalityMatch [3]
    return tlv(0xA3, octets(attr) + octets(value))


def f_initial(attr, prefix):                    # substrings [4] with initial [0]
    return tlv(0xA4, octets(attr) + tlv(0x30, octets(prefix, 0x80)))


def f_and(*filters):                            # and [0] SET OF Filter
    return tlv(0xA0, b"".join(filters))


def search_request(message_id, base, ldap_filter, attributes):
    """LDAPMessage { messageID, SearchRequest [APPLICATION 3] } for a subtree search."""
    body = (octets(base) + tlv(0x0A, b"\x02") + tlv(0x0A, b"\x00")      # wholeSubtree, never
            + ber_integer(0) + ber_integer(0) + tlv(0x01, b"\x00")       # no limits, typesOnly F
            + ldap_filter + tlv(0x30, b"".join(octets(a) for a in attributes)))
    return tlv(0x30, ber_integer(message_id) + tlv(0x63, body))


# -- request sets ---------------------------------------------------------------

QUERY_SAMPLE = 20_000


def ph_requests(data, kind):
    """[(request bytes, expected entries)] for the Ph driver."""
    if kind == "exact":
        return [(f"query name={s} return alias name email\n".encode(), n)
                for s, n in data.exact_queries(QUERY_SAMPLE)]
    if kind == "prefix":
        return [(f"query name={p}* return alias name email\n".encode(), n)
                for p, n in data.prefix_queries(QUERY_SAMPLE)]
    if kind in ("ip", "mac"):
        pick = 0 if kind == "ip" else 1
        return [(f"query {kind}={m[pick]} return hostname ip mac\n".encode(), 1)
                for m in data.machine_queries(QUERY_SAMPLE)]
    raise ValueError(kind)


def ldap_requests(data, kind):
    """[(SearchRequest bytes, expected entries)] for the LDAP driver."""
    person = f_equal("objectClass", "inetOrgPerson")
    attrs = ("uid", "cn", "mail")
    if kind == "exact":
        return [(search_request(1, BASE_DN, f_and(person, f_equal("sn", s)), attrs), n)
                for s, n in data.exact_queries(QUERY_SAMPLE)]
    if kind == "prefix":
        return [(search_request(1, BASE_DN, f_and(person, f_initial("sn", p)), attrs), n)
                for p, n in data.prefix_queries(QUERY_SAMPLE)]
    raise ValueError(f"the LDAP driver has no {kind} queries")


def quote(value):
    return f'"{value}"' if " " in value else value


class WriteSource:
    """Fresh people to add, numbered across all connections or threads (never repeated)."""

    FIELDS = ("alias", "name", "email", "phone", "title", "department")

    def __init__(self, size=200_000):
        self.data = dataset.Dataset(size)
        self.counter = itertools.count()
        self.lock = threading.Lock()

    def record(self):
        with self.lock:
            i = next(self.counter)
        p = self.data.person(i % self.data.size)
        lap = i // self.data.size
        if lap:
            p["alias"] += f"-{lap}"
            p["email"] = f"{p['alias']}@example.org"
        return p

    def ph_line(self):
        p = self.record()
        return ("add " + " ".join(f"{k}={quote(p[k])}" for k in self.FIELDS) + "\n").encode()


# -- the closed loop over asyncio ----------------------------------------------

class Run:
    """Shared state of one measurement: request source, window flag, results."""

    def __init__(self, requests=None, source=None):
        self.requests = requests
        self.source = source
        self.next = 0
        self.recording = False
        self.stopping = False
        self.latencies = []
        self.errors = 0
        self.first_error = None
        self.entries = 0
        self.outstanding = 0
        self.drained = None

    def take(self):
        if self.source is not None:
            return self.source.ph_line(), None
        i = self.next
        self.next = i + 1
        return self.requests[i % len(self.requests)]

    def error(self, text):
        if self.recording:
            self.errors += 1
            if self.first_error is None:
                self.first_error = text


class Client(asyncio.Protocol):
    """One connection, one request outstanding at a time."""

    def __init__(self, run):
        self.run = run
        self.transport = None
        self.buf = b""
        self.expect = None
        self.waiting = False
        self.started = 0.0
        self.done = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if self.waiting:
            self.run.error(f"connection lost with a request outstanding: {exc}")
            self.idle()
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self):
        run = self.run
        if run.stopping:
            self.idle()
            return
        request, self.expect = run.take()
        self.waiting = True
        self.started = time.perf_counter()
        self.transport.write(request)

    def idle(self):
        self.waiting = False
        run = self.run
        run.outstanding -= 1
        if run.outstanding == 0 and run.drained is not None and not run.drained.done():
            run.drained.set_result(None)

    def complete(self, ok, entries, what):
        run = self.run
        self.waiting = False
        if run.recording:
            run.latencies.append(time.perf_counter() - self.started)
            self.done += 1
            run.entries += entries
            if not ok:
                run.error(what)
        self.send()


class PhClient(Client):
    waiter = None

    async def exchange(self, request):
        """Send one request outside the measurement; its whole reply (text)."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await asyncio.wait_for(self.waiter, 30)
        finally:
            self.waiter = None

    async def login(self, user, key):
        """Ph login with an SSH signature (ssh-keygen -Y sign) before the clock starts."""
        reply = await self.exchange(f"login {user}\n".encode())
        if not reply.startswith("301:"):
            raise RuntimeError(f"login: {reply.strip()}")
        challenge = reply[4:].rstrip("\n")
        proc = await asyncio.create_subprocess_exec(
            "ssh-keygen", "-q", "-Y", "sign", "-n", "pharos", "-f", key,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        armored, _ = await proc.communicate(challenge.encode())
        signature = "".join(x.strip() for x in armored.decode().splitlines()
                            if x.strip() and "-----" not in x)
        reply = await self.exchange(f"answer {signature}\n".encode())
        if not reply.startswith("200:"):
            raise RuntimeError(f"login answer: {reply.strip()}")

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        if buf[-1:] != b"\n":
            self.buf = buf
            return
        last = buf.rfind(b"\n", 0, len(buf) - 1) + 1
        if buf[last] in b"-1" and not buf.startswith(b"301:"):   # more to come
            self.buf = buf
            return
        self.buf = b""
        if self.waiter is not None:
            self.waiter.set_result(buf.decode(errors="replace"))
            return
        expect = self.expect
        if expect is None:                      # a write: exactly "200:Ok."
            self.complete(buf == b"200:Ok.\n", 0, buf[:200].decode(errors="replace"))
            return
        if expect == 0:
            self.complete(buf.startswith(b"501:"), 0, buf[:200].decode(errors="replace"))
            return
        entries = -1
        if buf.startswith(b"102:") and buf.endswith(b"\n200:Ok.\n"):
            words = buf[4:buf.index(b"\n")].split()
            count = int(words[2]) if len(words) > 2 and words[2].isdigit() else -1
            at = buf.rfind(b"\n-200:") + 6
            lastn = int(buf[at:buf.index(b":", at)])
            entries = count if count == lastn else -1
        self.complete(entries == expect, max(entries, 0),
                      f"expected {expect} entries, got: {buf[:200]!r}")


class LdapClient(Client):
    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        pos, size, entries = 0, len(buf), getattr(self, "entries", 0)
        result = None
        while size - pos >= 2:
            first = buf[pos + 1]
            if first < 0x80:
                hdr, length = 2, first
            else:
                n = first & 0x7F
                if size - pos < 2 + n:
                    break
                hdr, length = 2 + n, int.from_bytes(buf[pos + 2:pos + 2 + n], "big")
            end = pos + hdr + length
            if end > size:
                break
            p = pos + hdr
            p += 2 + buf[p + 1]                 # messageID INTEGER (short form length)
            op = buf[p]
            if op == 0x64:                      # SearchResultEntry
                entries += 1
            elif op == 0x65:                    # SearchResultDone: resultCode ENUMERATED
                n = buf[p + 1]
                q = p + 2 + (n & 0x7F if n & 0x80 else 0)
                result = buf[q + 2] if buf[q] == 0x0A and buf[q + 1] == 1 else -1
            pos = end
            if result is not None:
                break
        if result is None:
            self.buf = buf[pos:]
            self.entries = entries
            return
        self.buf = b""
        self.entries = 0
        ok = result == 0 and entries == self.expect and pos == size
        self.complete(ok, entries, f"expected {self.expect} entries, got {entries}, "
                                   f"resultCode {result}")


async def closed_loop(host, port, proto, conns, duration, warmup, pid, requests=None,
                      source=None, login=None):
    """Run ``conns`` connections for warmup + duration seconds, close them; the result dict."""
    loop = asyncio.get_running_loop()
    run = Run(requests, source)
    clients = []
    for _ in range(conns):
        _, c = await loop.create_connection(lambda: proto(run), host, port)
        clients.append(c)
    if login:
        await asyncio.gather(*(c.login(*login) for c in clients))
    run.outstanding = len(clients)
    for c in clients:
        c.send()
    if warmup:
        await asyncio.sleep(warmup)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    own0, busy0 = time.process_time(), system_busy_seconds()
    run.recording = True
    await asyncio.sleep(duration)
    run.recording = False
    cpu1, t1 = cpu_seconds(pid), time.perf_counter()
    own1, busy1 = time.process_time(), system_busy_seconds()
    run.other_cpu = busy1 - busy0 - (own1 - own0) - (cpu1 - cpu0)
    run.drained = loop.create_future()
    run.stopping = True
    try:
        await asyncio.wait_for(run.drained, 30)
    except asyncio.TimeoutError:
        run.errors += 1
        run.first_error = run.first_error or "replies still outstanding 30 s after the window"
    for c in clients:
        c.transport.close()
    await asyncio.wait([c.closed for c in clients], timeout=5)
    return summarize(run, t1 - t0, cpu0, cpu1, own1 - own0, [c.done for c in clients])


def summarize(run, seconds, cpu0, cpu1, own_cpu, per_conn):
    lat = sorted(run.latencies)
    n = len(lat)

    def pct(q):
        return round(lat[min(n - 1, int(q * n))] * 1e6, 1) if n else None

    out = {"requests": n, "seconds": round(seconds, 3), "rps": round(n / seconds, 1),
           "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": pct(1.0),
           "errors": run.errors, "first_error": run.first_error,
           "entries_per_reply": round(run.entries / n, 3) if n else None,
           "client_cpu_us_per_req": round(own_cpu / n * 1e6, 2) if n else None,
           "per_conn_min": min(per_conn) if per_conn else None,
           "per_conn_max": max(per_conn) if per_conn else None}
    if getattr(run, "other_cpu", None) is not None:
        # CPU that neither this client nor the server used during the window: other load
        out["other_cpu_pct"] = round(max(0.0, run.other_cpu) / seconds * 100, 1)
    if cpu0 is not None:
        out["server_cpu_s"] = round(cpu1 - cpu0, 3)
        out["cpu_us_per_req"] = round((cpu1 - cpu0) / n * 1e6, 2) if n else None
    return out


# -- SQLite baseline --------------------------------------------------------------

def sqlite_prepare(path):
    import sqlite3
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE person (alias TEXT PRIMARY KEY, name TEXT, email TEXT, "
               "phone TEXT, title TEXT, department TEXT)")
    db.execute("CREATE INDEX person_name ON person(name)")
    db.commit()
    db.close()


def sqlite_writers(path, threads, duration, warmup):
    """``threads`` threads, one connection each, INSERT one row per transaction."""
    import sqlite3
    sqlite_prepare(path)
    source = WriteSource()
    run = Run(source=source)
    done = [0] * threads
    sql = "INSERT INTO person VALUES (?, ?, ?, ?, ?, ?)"
    fields = WriteSource.FIELDS

    def worker(k):
        db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        clock = time.perf_counter
        while not run.stopping:
            p = source.record()
            row = tuple(p[f] for f in fields)
            started = clock()
            try:
                db.execute(sql, row)            # autocommit: one transaction, fsync'd
                ok, what = True, None
            except sqlite3.Error as e:
                ok, what = False, str(e)
            if run.recording:
                run.latencies.append(clock() - started)
                done[k] += 1
                if not ok:
                    run.error(what)
        db.close()

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    time.sleep(warmup)
    t0, own0 = time.perf_counter(), time.process_time()
    run.recording = True
    time.sleep(duration)
    run.recording = False
    t1, own1 = time.perf_counter(), time.process_time()
    run.stopping = True
    for w in workers:
        w.join()
    out = summarize(run, t1 - t0, None, None, own1 - own0, done)
    out["cpu_us_per_req"] = out.pop("client_cpu_us_per_req")   # SQLite runs in this process
    return out


# -- command line -------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", choices=("ph", "ldap", "ph-add", "sqlite"), required=True)
    ap.add_argument("--queries", choices=("exact", "prefix", "ip", "mac"), default="exact")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--pid", type=int, help="server process whose CPU time is read")
    ap.add_argument("--size", type=int, default=100_000, help="dataset size the server holds")
    ap.add_argument("-c", "--connections", type=int, default=1)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("-w", "--warmup", type=float, default=1.0)
    ap.add_argument("--db", help="SQLite file (driver sqlite)")
    ap.add_argument("--login", nargs=2, metavar=("USER", "KEY"),
                    help="log every Ph connection in with this SSH private key first")
    ap.add_argument("--first-connection", action="store_true",
                    help="no warm-up; run one connection, close it, then a second; report both")
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("traffic goes to loopback only")

    if args.driver == "sqlite":
        result = sqlite_writers(args.db, args.connections, args.duration, args.warmup)
    else:
        data = dataset.Dataset(args.size) if args.driver != "ph-add" else None
        requests = source = None
        if args.driver == "ph":
            requests, proto = ph_requests(data, args.queries), PhClient
        elif args.driver == "ldap":
            requests, proto = ldap_requests(data, args.queries), LdapClient
        else:
            source, proto = WriteSource(), PhClient
        del data
        gc.collect()
        gc.freeze()
        gc.disable()
        if args.first_connection:
            async def both():
                first = await closed_loop(args.host, args.port, proto, 1, args.duration, 0,
                                          args.pid, requests, source)
                await asyncio.sleep(0.3)        # the server has seen the first one close
                later = await closed_loop(args.host, args.port, proto, 1, args.duration, 0,
                                          args.pid, requests, source)
                return {"first": first, "later": later}
            result = asyncio.run(both(), debug=False)
        else:
            result = asyncio.run(closed_loop(args.host, args.port, proto, args.connections,
                                             args.duration, args.warmup, args.pid, requests,
                                             source, args.login))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
