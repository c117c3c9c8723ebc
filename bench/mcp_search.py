#!/usr/bin/env python3
"""What an MCP search costs beside a Ph query for the same record, in one run.

    python3 bench/mcp_search.py [--size 100000] [--calls 2000] [--concurrency 1 16]

Generates N people and N machines (bench/dataset.py), loads them with `pharos load`,
starts a dev-tier server with /mcp on loopback, then for each concurrency C runs
`tools/call search {"query": "hostname=H"}` over HTTP and `query hostname=H` over Ph for
the same hostnames. The HTTP listener closes each connection after one answer, so every
MCP call opens a new connection; Ph clients keep theirs. Server CPU per call is the
utime+stime delta of the server process (/proc/PID/stat) over the calls made. The last
column is a GET of a path with no route, also on a new connection: what the HTTP listener
costs before MCP or the directory is reached.
"""

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(pid):
    """Seconds of CPU the process has used (user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start_server(data, busy_poll):
    """A dev-tier server on loopback with /mcp: (process, Ph port, HTTP port)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pharos.py"), "serve",
                             "--data", data, "--tier", "dev", "--listen", "127.0.0.1:0",
                             "--metrics", "127.0.0.1:0", "--busy-poll", str(busy_poll)],
                            stderr=subprocess.PIPE)
    seen = b""
    while True:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            raise SystemExit(f"server did not start: {seen.decode(errors='replace')}")
        seen += chunk
        ph = re.search(rb"Ph listening on 127\.0\.0\.1:(\d+)", seen)
        web = re.search(rb"metrics listening on 127\.0\.0\.1:(\d+)", seen)
        if ph and web:
            threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
            return proc, int(ph.group(1)), int(web.group(1))


def mcp_search(port, hostname):
    """One tools/call search on a new connection; the number of records it found."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "search", "arguments": {"query": f"hostname={hostname}"}}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/mcp", body, {"Content-Type": "application/json"})
    reply = json.loads(conn.getresponse().read())
    conn.close()
    return reply["result"]["structuredContent"]["total"]


def http_floor(port, hostname):
    """One GET of a path with no route on a new connection: the HTTP listener's own cost
    (accept, read, a worker, write, close) without MCP or the directory."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/no-such-page")
    conn.getresponse().read()
    conn.close()
    return 1


class PhLine:
    """A Ph connection kept open for many queries."""

    def __init__(self, port):
        import socket
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")

    def query(self, hostname):
        """One query; the number of records it found."""
        self.sock.sendall(f"query hostname={hostname}\n".encode())
        found = 0
        while True:
            text = self.file.readline().decode()
            if text.startswith("102:"):
                found = int(text.split()[2])
            if not text.startswith("-") and int(text[:3]) >= 200:
                return found


def run(kind, port, hostnames, concurrency, pid):
    """(calls/s, server CPU ms per call) of ``kind`` ('mcp' or 'ph') over ``hostnames``."""
    share = [hostnames[n::concurrency] for n in range(concurrency)]
    wrong = []

    def worker(names):
        line = PhLine(port) if kind == "ph" else None
        for name in names:
            found = line.query(name) if line else KINDS[kind](port, name)
            if found != 1:
                wrong.append(name)
    threads = [threading.Thread(target=worker, args=(names,)) for names in share]
    cpu, start = server_cpu(pid), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, used = time.perf_counter() - start, server_cpu(pid) - cpu
    if wrong:
        raise SystemExit(f"{kind}: {len(wrong)} searches did not find their one record")
    return len(hostnames) / elapsed, used * 1000 / len(hostnames)


KINDS = {"mcp": mcp_search, "http": http_floor}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="people, and as many machines")
    ap.add_argument("--calls", type=int, default=2000, help="searches of each kind per run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--busy-poll", type=int, nargs="+", default=[100, 0], metavar="US",
                    help="the server's --busy-poll for each run (default: 100, then 0)")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, data = os.path.join(tmp, "data.jsonl"), os.path.join(tmp, "data")
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "dataset.py"), "--size",
                        str(ns.size), "--jsonl", jsonl], check=True)
        began = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "pharos.py"), "load", jsonl,
                        "--data", data], check=True, stderr=subprocess.DEVNULL)
        print(f"loaded {2 * ns.size} records in {time.perf_counter() - began:.1f} s")
        with open(jsonl) as f:
            hosts = [r["hostname"] for r in map(json.loads, f) if r.get("type") == "machine"]
        step = max(1, len(hosts) // ns.calls)
        names = hosts[::step][:ns.calls]
        for busy_poll in ns.busy_poll:
            print(f"serve --busy-poll {busy_poll}")
            proc, ph_port, web_port = start_server(data, busy_poll)
            try:
                report(proc.pid, ph_port, web_port, names, ns.concurrency)
            finally:
                proc.terminate()
                proc.wait(timeout=60)


def report(pid, ph_port, web_port, names, levels):
    """Print one line per concurrency: calls/s and CPU per call of each, and their ratio."""
    run("mcp", web_port, names[:50], 1, pid)        # warm up both paths
    run("ph", ph_port, names[:50], 1, pid)
    print("C    MCP calls/s  MCP ms CPU/call   Ph calls/s  Ph ms CPU/call   CPU ratio"
          "   HTTP 404 ms CPU/call")
    for level in levels:
        mcp_rate, mcp_cpu = run("mcp", web_port, names, level, pid)
        ph_rate, ph_cpu = run("ph", ph_port, names, level, pid)
        _, floor_cpu = run("http", web_port, names, level, pid)
        print(f"{level:<4} {mcp_rate:11.0f}  {mcp_cpu:15.3f}   {ph_rate:10.0f}  {ph_cpu:14.3f}"
              f"   {mcp_cpu / ph_cpu:9.2f}   {floor_cpu:20.3f}")


if __name__ == "__main__":
    main()
