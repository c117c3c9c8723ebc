"""The metrics listener of real server processes: /metrics, /healthz and /readyz.

Covers a valid exposition after traffic of every kind (promtool and the strict checker
in promcheck.py), exact counter, histogram, gauge and storage values, a real Prometheus
scraping the server, readiness that follows the data dir's writability, the HTTP edge
cases (404, 405, HEAD, over-long request lines, silent clients), `--metrics off` and
`pharos doctor --metrics`.  Every server and Prometheus is started here, stopped by its
pid, and talked to on 127.0.0.1 only.
"""

import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import promcheck
from conftest import PHAROS, ServerProcess, need, python_for_nobody, usable_by_nobody, wait_for

HOST = "127.0.0.1"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NOBODY = 65534
LOGIN_DELAY = 1.0               # the server answers a failed login after one second
HTTP_TIMEOUT = 5.0              # seconds the metrics listener waits for a request
PEOPLE = ("m-0", "m-1", "m-2")


# --------------------------------------------------------------------------
# Servers, HTTP and the exposition
# --------------------------------------------------------------------------

class Server(ServerProcess):
    """A ServerProcess a test can close: killed, its stderr drained and closed."""

    def close(self):
        self.kill()
        if self.drainer:
            self.drainer.join(timeout=10)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()


def start_server(data=None, *extra, storage="file", metrics=True, **kw):
    return Server(data, *extra, storage=storage, metrics=metrics, **kw).start()


def fetch(port, path, method="GET", body=None, timeout=10.0):
    """(status, headers as a dict with lower-case names, body) of one request."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def raw_http(port, request: bytes, timeout=10.0) -> bytes:
    """Send `request` on a fresh connection and read everything until the server closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def scrape(srv):
    """(body text, {(name, frozenset(labels)): value}) of the server's /metrics."""
    status, headers, body = fetch(srv.metrics_port, "/metrics")
    assert status == 200, (status, body)
    text = body.decode("utf-8")
    return text, promcheck.parse(text)


def value(samples, name, **labels):
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have " + \
        ", ".join(sorted(f"{n}{dict(l)}" for n, l in samples if n == name))
    return samples[key]


def series(samples, name):
    """{frozenset(labels): value} of every sample called `name`."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def histogram(samples, name, **labels):
    """([(le, cumulative count)] in exposition order, sum, count) of one histogram series."""
    want = set(labels.items())
    buckets = [(promcheck._float(dict(l)["le"]), v) for (n, l), v in samples.items()
               if n == name + "_bucket" and set(l) - {("le", dict(l)["le"])} == want]
    return (buckets, value(samples, name + "_sum", **labels),
            value(samples, name + "_count", **labels))


def reply_class(reply):
    """The result class of a Ph reply, from its final line: "2xx" for 200:Ok. and so on."""
    return reply[-1][0] + "xx"


def promtool_check(body: bytes):
    result = subprocess.run(["promtool", "check", "metrics"], input=body,
                            capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stderr, \
        f"promtool exit {result.returncode}:\n{result.stderr.decode(errors='replace')}"


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------
# One server that has seen traffic of every kind
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """A file-storage server capped at two connections, after queries (matches, no match,
    errors), fields, status, siteinfo, set, id, help, writes, a failed login, an unknown
    command, binary junk and one refused connection.  Yields (server, expected) where
    expected["requests"] is {(command, class): count} as the replies showed it and
    expected["samples"] the exposition right after that traffic."""
    srv = start_server(tmp_path_factory.mktemp("busy") / "data", "--max-connections", "2")
    requests, writes = {}, 0

    def send(client, command, text=None):
        reply = client.cmd(text or command)
        key = (command, reply_class(reply))
        requests[key] = requests.get(key, 0) + 1
        return reply

    try:
        with srv.client() as c:
            for alias in PEOPLE:
                assert send(c, "add", f'add alias={alias} name="Metric {alias}" '
                                      f"email={alias}@example.org") == ["200:Ok."]
                writes += 1
            assert send(c, "add", "add hostname=mx-1 ip=10.0.0.1") == ["200:Ok."]
            assert send(c, "add", "add alias=m-gone name=Gone") == ["200:Ok."]
            writes += 2
            # A refused write is answered but never reaches the journal.
            assert send(c, "add", "add alias=m-0 name=Again")[-1].startswith("599:")
            assert send(c, "change", "change alias=m-1 make title=Tester") == \
                ["200:1 entry changed."]
            assert send(c, "delete", "delete alias=m-gone")[-1].startswith("200:")
            writes += 2
            assert send(c, "query", "query alias=m-0 return alias")[-1] == "200:Ok."
            assert send(c, "query", "query alias=nosuch")[-1].startswith("501:")
            assert send(c, "query", "query")[-1].startswith("500:")
            assert send(c, "query", "query alias=m-* return alias name")[-1] == "200:Ok."
            assert send(c, "fields")[-1] == "200:Ok."
            assert send(c, "fields", "fields nosuch")[-1].startswith("599:")
            assert send(c, "status") == ["200:Database ready."]
            assert send(c, "siteinfo")[-1] == "200:Ok."
            assert send(c, "set", "set echo=off")[-1].startswith("200:")
            assert send(c, "id", "id metrics-test") == ["200:Thanks."]
            assert send(c, "help")[-1] == "200:Ok."
            assert send(c, "help", "help query")[-1].startswith("200:")
            assert send(c, "login", "login x")[-1].startswith("301:")
            started = time.monotonic()
            assert send(c, "answer", "answer junk")[-1].startswith("500:")
            assert time.monotonic() - started >= LOGIN_DELAY * 0.9
            assert send(c, "unknown", "frobnicate")[-1].startswith("598:")
            # Binary junk: answered as an unknown command; the session goes on.
            c.send_raw(b"\x00\xff\xfe\x80 \x07\x1b[2J junk \xc3\x28\n")
            reply = c.read_reply()
            assert reply[-1].startswith("598:"), reply
            requests[("unknown", "5xx")] = requests.get(("unknown", "5xx"), 0) + 1
            assert send(c, "status") == ["200:Database ready."]

            with srv.client() as second:
                with srv.client() as third:
                    first_line = third.read_line()
                    assert first_line.startswith(b"400:Too many connections"), first_line
                    assert third.sock.recv(1) == b"", "the refused connection stays open"
                assert send(second, "status") == ["200:Database ready."]
        # Later tests open connections of their own: wait until the server saw these close.
        wait_for(lambda: value(scrape(srv)[1], "pharos_connections_open") == 0,
                 interval=0.02, what="the server to see its connections close")
        # Tests below add traffic of their own: they compare against this scrape.
        yield srv, {"requests": requests, "writes": writes, "connections": 3,
                    "samples": scrape(srv)[1]}
        assert "Traceback" not in srv.read_stderr(), srv.read_stderr()
    finally:
        srv.close()


def test_exposition_passes_promtool_and_the_strict_checker(busy):
    need(shutil.which("promtool"), "promtool (Debian prometheus)")
    srv, _ = busy
    status, headers, body = fetch(srv.metrics_port, "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE
    assert int(headers["content-length"]) == len(body)
    promtool_check(body)
    text = body.decode("utf-8")
    assert promcheck.check(text) == []
    assert text.endswith("\n") and "\r" not in text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert families >= {
        "pharos_requests_total", "pharos_request_duration_seconds", "pharos_connections_open",
        "pharos_connections_total", "pharos_connections_refused_total", "pharos_logins_total",
        "pharos_records", "pharos_machines", "pharos_store_writable",
        "pharos_storage_write_duration_seconds", "pharos_storage_fsyncs_total",
        "pharos_storage_journal_entries_total", "pharos_storage_journal_written_bytes_total",
        "pharos_storage_journal_bytes", "process_cpu_seconds_total",
        "process_resident_memory_bytes", "process_open_fds", "process_max_fds",
        "process_start_time_seconds", "pharos_build_info"}, sorted(families)


def test_a_memory_server_exposition_is_valid_too(tmp_path):
    need(shutil.which("promtool"), "promtool (Debian prometheus)")
    srv = start_server(storage="memory")
    try:
        with srv.client() as c:
            assert c.cmd("status") == ["200:Database ready."]
            assert c.cmd("query alias=none")[-1].startswith("501:")
        status, headers, body = fetch(srv.metrics_port, "/metrics")
    finally:
        srv.close()
    assert status == 200 and headers["content-type"] == CONTENT_TYPE
    promtool_check(body)
    assert promcheck.check(body.decode("utf-8")) == []
    assert b"pharos_storage_" not in body           # no journal, so no storage families


def test_request_counters_match_the_traffic(busy):
    srv, expected = busy
    samples = expected["samples"]
    got = {(dict(l)["command"], dict(l)["class"]): v
           for l, v in series(samples, "pharos_requests_total").items()}
    assert got == expected["requests"]


def test_n_queries_add_exactly_n(busy):
    srv, _ = busy
    n = 7
    _, before = scrape(srv)
    with srv.client() as c:
        for i in range(n):
            assert c.cmd(f"query alias={PEOPLE[i % len(PEOPLE)]} return alias")[-1] == "200:Ok."
    _, after = scrape(srv)
    for key, old in series(before, "pharos_requests_total").items():
        new = series(after, "pharos_requests_total")[key]
        grown = n if key == frozenset({("command", "query"), ("class", "2xx")}) else 0
        assert new - old == grown, (dict(key), old, new)
    assert value(after, "pharos_request_duration_seconds_count", command="query") - \
        value(before, "pharos_request_duration_seconds_count", command="query") == n


def test_latency_histograms_are_consistent(busy):
    srv, expected = busy
    samples = expected["samples"]
    commands = {c for c, _ in expected["requests"]}
    counted = {dict(l)["command"] for l in series(samples, "pharos_request_duration_seconds_count")}
    assert counted == commands
    for command in commands:
        total = sum(v for l, v in series(samples, "pharos_requests_total").items()
                    if dict(l)["command"] == command)
        buckets, seconds, count = histogram(samples, "pharos_request_duration_seconds",
                                            command=command)
        assert count == total, command
        bounds = [le for le, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf"), bounds
        assert len(set(bounds)) == len(bounds), bounds
        counts = [v for _, v in buckets]
        assert all(a <= b for a, b in zip(counts, counts[1:])), (command, counts)
        assert counts[-1] == count, command
        assert seconds >= 0
    # The failed answer waited a second before replying: that time is in its histogram.
    buckets, seconds, count = histogram(samples, "pharos_request_duration_seconds",
                                        command="answer")
    assert count == 1 and seconds >= LOGIN_DELAY * 0.9
    fast = [(le, v) for le, v in buckets if le < LOGIN_DELAY * 0.9]
    assert fast and all(v == 0 for _, v in fast), f"a one-second answer in a fast bucket: {fast}"
    writes_hist = histogram(samples, "pharos_storage_write_duration_seconds")
    assert writes_hist[2] == value(samples, "pharos_storage_fsyncs_total")
    assert writes_hist[0][-1] == (float("inf"), writes_hist[2])


def test_gauges_and_counters_after_traffic(busy):
    srv, expected = busy
    _, samples = scrape(srv)
    assert value(samples, "pharos_records", type="person") == len(PEOPLE)
    assert value(samples, "pharos_records", type="machine") == 1
    machines = series(samples, "pharos_machines")
    assert sum(machines.values()) == 1, machines
    assert value(samples, "pharos_connections_refused_total") == 1
    assert value(expected["samples"], "pharos_connections_total") == expected["connections"]
    assert value(samples, "pharos_connections_open") == 0
    assert value(samples, "pharos_logins_total", result="failed") == 1
    assert value(samples, "pharos_logins_total", result="ok") == 0
    assert value(samples, "pharos_store_writable") == 1
    version = subprocess.run([sys.executable, str(PHAROS), "--version"], capture_output=True,
                             text=True, timeout=30).stdout.split()[-1]
    [(labels, one)] = series(samples, "pharos_build_info").items()
    assert one == 1 and dict(labels)["version"] == version, dict(labels)


def test_storage_counters_match_the_journal(busy):
    srv, expected = busy
    _, samples = scrape(srv)
    writes = expected["writes"]
    fsyncs = value(samples, "pharos_storage_fsyncs_total")
    assert 1 <= fsyncs <= writes
    assert value(samples, "pharos_storage_journal_entries_total") == writes
    journals = sorted(srv.data.glob("journal-*.jsonl"))
    assert journals, list(srv.data.iterdir())
    data = [p.read_bytes().rstrip(b"\0") for p in journals]   # before the zero fill
    assert value(samples, "pharos_storage_journal_written_bytes_total") == sum(map(len, data))
    assert value(samples, "pharos_storage_journal_bytes") == len(data[-1])
    assert sum(len(d.splitlines()) for d in data) == writes


def test_process_metrics_are_plausible(busy):
    srv, _ = busy
    _, samples = scrape(srv)
    started = value(samples, "process_start_time_seconds")
    assert time.time() - 600 < started <= time.time() + 1
    assert value(samples, "process_resident_memory_bytes") > 1 << 20
    fds = value(samples, "process_open_fds")
    assert 3 <= fds <= value(samples, "process_max_fds")
    assert fds == pytest.approx(len(os.listdir(f"/proc/{srv.proc.pid}/fd")), abs=3)
    assert value(samples, "process_cpu_seconds_total") > 0


def test_scrapes_during_writes_stay_valid_and_add_up(tmp_path):
    """/metrics is rendered on its own thread while the event loop writes: every page must
    still be valid, and once the writers stop the counters equal what they did."""
    srv = start_server(tmp_path / "data")
    stop, done, failures = threading.Event(), {}, []

    def writer(k):
        try:
            with srv.client() as c:
                i = 0
                while not stop.is_set():
                    assert c.cmd(f"add alias=w{k}-{i} name=Writer") == ["200:Ok."]
                    assert c.cmd(f"query alias=w{k}-{i} return alias")[-1] == "200:Ok."
                    assert c.cmd(f"nosuchverb{i % 7}")[-1].startswith("598:")
                    if i % 2:
                        assert c.cmd(f"delete alias=w{k}-{i}")[-1].startswith("200:")
                    i += 1
                done[k] = i
        except Exception as e:                  # reported by the main thread
            failures.append(repr(e))
            stop.set()

    writers = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(3)]
    try:
        for w in writers:
            w.start()
        scrapes, deadline = 0, time.monotonic() + 1.5
        while time.monotonic() < deadline and not stop.is_set():
            status, _, body = fetch(srv.metrics_port, "/metrics")
            assert status == 200, body[:300]
            assert promcheck.check(body.decode("utf-8")) == []
            scrapes += 1
        stop.set()
        for w in writers:
            w.join(timeout=30)
        assert not failures, failures
        assert scrapes >= 10 and len(done) == 3, (scrapes, done)
        _, samples = scrape(srv)
    finally:
        stop.set()
        srv.close()
    loops = sum(done.values())
    deletes = sum(n // 2 for n in done.values())
    assert value(samples, "pharos_requests_total", command="add", **{"class": "2xx"}) == loops
    assert value(samples, "pharos_requests_total", command="query", **{"class": "2xx"}) == loops
    assert value(samples, "pharos_requests_total", command="unknown", **{"class": "5xx"}) == loops
    assert value(samples, "pharos_requests_total", command="delete", **{"class": "2xx"}) == deletes
    assert value(samples, "pharos_records", type="person") == loops - deletes
    assert value(samples, "pharos_storage_journal_entries_total") == loops + deletes
    assert value(samples, "pharos_connections_total") == 3


@pytest.mark.parametrize("bad, problem", [
    ("# HELP a_total A.\n# TYPE a_total counter\na_total 1", "end with"),
    ("# HELP a_total A.\r\n# TYPE a_total counter\r\na_total 1\r\n", "CR"),
    ("# HELP a A.\n# TYPE a counter\na 1\n", "_total"),
    ("# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_sum 1\nh_count 1\n", "+Inf"),
    ("# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
     "h_sum 1\nh_count 1\n", "cumulative"),
    ("# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
     "_count != +Inf"),
    ("# HELP g G.\n# TYPE g gauge\ng{a=\"1\"} 1\ng{a=\"1\"} 2\n", "duplicate series"),
    ("# HELP g G.\n# TYPE g gauge\ng 1\n# HELP k K.\n# TYPE k gauge\nk 1\ng{a=\"2\"} 1\n",
     "contiguous"),
    ("# HELP g G.\n# TYPE g gauge\ng{a=\"\\q\"} 1\n", "not a valid sample"),
    ("# TYPE g gauge\ng 1\n", "no HELP"),
])
def test_the_strict_checker_catches_what_promtool_lets_through(bad, problem):
    problems = promcheck.check(bad)
    assert any(problem in p for p in problems), problems


# --------------------------------------------------------------------------
# A real Prometheus scraping the server
# --------------------------------------------------------------------------

def prom_query(port, query):
    """The instant vector of `query` as [(labels, value)], or None while Prometheus is not up."""
    url = f"/api/v1/query?query={urllib.parse.quote(query)}"
    try:
        status, _, body = fetch(port, url, timeout=5.0)
    except OSError:
        return None
    if status != 200:
        return None
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return [(r["metric"], float(r["value"][1])) for r in answer["data"]["result"]]


def test_prometheus_scrapes_the_exact_values(tmp_path):
    need(shutil.which("prometheus"), "prometheus (Debian prometheus)")
    srv = start_server(storage="memory")
    prom = None
    try:
        with srv.client() as c:
            for _ in range(5):
                assert c.cmd("status") == ["200:Database ready."]
            assert c.cmd("query alias=nobody")[-1].startswith("501:")
        (tmp_path / "tsdb").mkdir()
        (tmp_path / "prom.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: pharos\n    static_configs:\n"
            f"      - targets: ['{HOST}:{srv.metrics_port}']\n")
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prom.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={HOST}:{port}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        log.close()

        def until(query, want, what):
            def check():
                if prom.poll() is not None:
                    log_text = (tmp_path / "prometheus.log").read_text(errors="replace")
                    raise AssertionError(f"prometheus exited {prom.returncode}:\n{log_text}")
                result = prom_query(port, query)
                return result if result and [v for _, v in result] == [want] else None
            return wait_for(check, timeout=20.0, interval=0.1, what=what)

        until('up{job="pharos"}', 1.0, "Prometheus to scrape the server (up == 1)")
        [(labels, five)] = until('pharos_requests_total{command="status"}', 5.0,
                                 "the status counter in Prometheus")
        assert labels["class"] == "2xx" and labels["job"] == "pharos", labels
        [(_, one)] = prom_query(port, 'pharos_requests_total{command="query",class="5xx"}')
        assert one == 1
        with srv.client() as c:
            for _ in range(3):
                assert c.cmd("status") == ["200:Database ready."]
        until('pharos_requests_total{command="status"}', 8.0, "the status counter to reach 8")
        # Every sample of the exposition arrived (no line was dropped by the scraper).
        _, samples = scrape(srv)
        until('scrape_samples_scraped{job="pharos"}', float(len(samples)),
              f"scrape_samples_scraped == {len(samples)}")
    finally:
        if prom is not None and prom.poll() is None:
            prom.terminate()
            try:
                prom.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(timeout=10)
        srv.close()


# --------------------------------------------------------------------------
# /healthz and /readyz
# --------------------------------------------------------------------------

@pytest.fixture
def unprivileged():
    """(preexec_fn, python, data dir): as root chmod stops nothing, so the server runs as
    nobody on a data dir nobody owns.  The dir lives in a private directory under /tmp
    (which nobody can traverse) rather than in pytest's tmp_path, whose parents are
    private to root and shared with any other pytest run on the machine."""
    base = Path(tempfile.mkdtemp(prefix="pharos-readyz-"))
    data = base / "data"
    data.mkdir()
    try:
        if os.geteuid() != 0:
            yield None, None, data
        else:
            python = python_for_nobody()
            assert usable_by_nobody(PHAROS), f"user nobody cannot read {PHAROS}"
            base.chmod(0o711)
            assert usable_by_nobody(base, stat.S_IXOTH), f"user nobody cannot reach {base}"
            os.chown(data, NOBODY, NOBODY)

            def demote():
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            yield demote, python, data
    finally:
        data.chmod(0o700)
        shutil.rmtree(base)


def readyz(srv):
    status, headers, body = fetch(srv.metrics_port, "/readyz")
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


def test_readyz_follows_the_data_dir(unprivileged):
    demote, python, data = unprivileged
    srv = Server(data, storage="file", metrics=True, preexec_fn=demote)
    if python:
        srv.args[0] = python
    srv.start()
    try:
        status, headers, body = fetch(srv.metrics_port, "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        assert readyz(srv) == (200, {"status": "ready"})
        data.chmod(0o555)                       # the owner (the server) may no longer write
        status, answer = readyz(srv)
        assert status == 503, answer
        assert answer["status"] == "not ready" and str(data) in answer["reason"], answer
        status, _, _ = fetch(srv.metrics_port, "/healthz")
        assert status == 200, "liveness must not follow the data dir"
        data.chmod(0o700)
        assert readyz(srv) == (200, {"status": "ready"})
        with srv.client() as c:                 # and the store still takes writes
            assert c.cmd("add alias=after-ro name=After") == ["200:Ok."]
        leftovers = [p.name for p in data.iterdir() if p.name.startswith(".probe")]
        assert leftovers == [], "the readiness probe left files behind"
        assert "Traceback" not in srv.read_stderr(), srv.read_stderr()
    finally:
        data.chmod(0o700)
        srv.close()


def test_readyz_is_503_at_the_connection_cap():
    srv = start_server(None, "--max-connections", "1", storage="memory")
    try:
        assert readyz(srv) == (200, {"status": "ready"})
        with srv.client() as c:
            assert c.cmd("status") == ["200:Database ready."]
            status, answer = readyz(srv)
            assert status == 503 and answer["status"] == "not ready" and answer["reason"], answer
        wait_for(lambda: readyz(srv)[0] == 200, what="/readyz 200 after the connection closed")
    finally:
        srv.close()


# --------------------------------------------------------------------------
# HTTP edge cases
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def web():
    srv = start_server(storage="memory")
    yield srv
    srv.close()


def test_unknown_path_is_404(web):
    for path in ("/", "/metric", "/metrics/x", "/healthz/../etc"):
        status, _, _ = fetch(web.metrics_port, path)
        assert status == 404, path
    status, _, _ = fetch(web.metrics_port, "/healthz?verbose=1")
    assert status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405_with_allow(web, method):
    body = b"x=1" if method in ("POST", "PUT", "PATCH") else None
    for path in ("/metrics", "/healthz", "/nowhere"):
        status, headers, _ = fetch(web.metrics_port, path, method=method, body=body)
        if path == "/nowhere":          # no route: 404, whatever the method
            assert status == 404, (method, path, status)
            continue
        assert status == 405, (method, path, status)
        assert headers.get("allow") == "GET, HEAD", headers


def test_head_metrics_has_headers_and_no_body(web):
    raw = raw_http(web.metrics_port, b"HEAD /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep and rest == b"", raw[:300]
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split()[1] == "200", lines[0]
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
    assert headers["content-type"] == CONTENT_TYPE
    assert int(headers["content-length"]) > 0


def test_over_long_request_line_is_refused_and_the_listener_lives(web):
    request = b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.0\r\n\r\n"
    try:
        answer = raw_http(web.metrics_port, request)
    except (ConnectionResetError, BrokenPipeError):
        answer = b""                            # closed on us before we could read: allowed
    assert answer == b"" or answer.split(b"\r\n", 1)[0].split()[1] == b"414", answer[:200]
    status, _, body = fetch(web.metrics_port, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert scrape(web)[1]


def test_silent_client_is_dropped_and_others_are_served(web):
    silent = socket.create_connection((HOST, web.metrics_port), timeout=HTTP_TIMEOUT + 5)
    try:
        started = time.monotonic()
        for _ in range(3):
            status, _, _ = fetch(web.metrics_port, "/healthz")
            assert status == 200
            assert scrape(web)[1]
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):    # still open while the others were served
            silent.recv(1)
        silent.settimeout(HTTP_TIMEOUT + 5 - (time.monotonic() - started))
        assert silent.recv(1) == b"", "the server sent data to a silent client"
        elapsed = time.monotonic() - started
        assert HTTP_TIMEOUT - 1 <= elapsed <= HTTP_TIMEOUT + 3, elapsed
    finally:
        silent.close()
    assert fetch(web.metrics_port, "/healthz")[0] == 200


def test_metrics_off_starts_no_listener():
    srv = start_server(storage="memory", metrics=False)
    try:
        assert "--metrics" in srv.args and srv.args[srv.args.index("--metrics") + 1] == "off"
        text = srv.stderr.decode()
        assert "Ph listening on" in text
        assert "metrics" not in text.lower(), text
        assert srv.metrics_port is None
        with srv.client() as c:
            assert c.cmd("status") == ["200:Database ready."]
    finally:
        srv.close()


# --------------------------------------------------------------------------
# pharos doctor
# --------------------------------------------------------------------------

def doctor(*args):
    return subprocess.run([sys.executable, str(PHAROS), "doctor", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_doctor_reports_the_metrics_endpoints(tmp_path):
    data = tmp_path / "data"
    srv = start_server(data)
    try:
        result = doctor("--data", str(data), "--server", f"{HOST}:{srv.port}",
                        "--metrics", f"{HOST}:{srv.metrics_port}")
    finally:
        srv.close()
    assert result.returncode == 0, result.stderr
    line = next((l for l in result.stdout.splitlines() if l.startswith("metrics")), None)
    assert line is not None, result.stdout
    assert f"{HOST}:{srv.metrics_port}" in line, line
    assert "/healthz 200" in line and "/readyz 200" in line, line


def test_doctor_says_when_metrics_do_not_answer(tmp_path):
    port = free_port()
    result = doctor("--data", str(tmp_path / "data"), "--metrics", f"{HOST}:{port}")
    assert result.returncode == 3, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("metrics"))
    assert "not answering" in line and "/healthz 200" not in line, line
