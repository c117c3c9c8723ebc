#!/usr/bin/env python3
"""Pharos against OpenLDAP slapd (lookups) and SQLite (durable writes), side by side, one run.

    python3 bench/run.py                  # 100,000 people + 100,000 machines; writes docs/benchmarks.md
    python3 bench/run.py --quick          # about a minute, small data; report in bench/out/
    python3 bench/run.py --size 1000000   # 1M + 1M (slow); its numbers join the report's scale table

Everything runs on 127.0.0.1 and every process this script starts is stopped by pid before it
exits. slapd is a throwaway instance (its own cn=config dir, mdb, 4 threads) started directly;
if slapd or slapadd is missing and we are root, `apt-get install slapd ldap-utils` is run first.
"""

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import dataset  # noqa: E402
import loadgen  # noqa: E402

PHAROS = os.path.join(ROOT, "pharos.py")
SLAPD, SLAPADD = "/usr/sbin/slapd", "/usr/sbin/slapadd"
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"
PY = sys.executable

STARTED = []                                    # Popen objects of every process we started


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc, timeout=20):
    """SIGTERM the process we started (by pid), wait; SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in STARTED:
        STARTED.remove(proc)
    return proc.returncode


def stop_all():
    for proc in list(STARTED):
        stop(proc)


def du(path):
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(base, name)).st_blocks * 512
            except OSError:
                pass
    return total


QUIET = {"limit_s": 90.0}


def wait_quiet():
    """Wait (up to QUIET['limit_s']) until other processes use under 10 % of a core."""
    deadline = time.monotonic() + QUIET["limit_s"]
    said = False
    while True:
        b0 = loadgen.system_busy_seconds()
        time.sleep(0.5)
        busy = (loadgen.system_busy_seconds() - b0) / 0.5
        if busy < 0.10 or time.monotonic() > deadline:
            return busy
        if not said:
            log(f"other processes use {busy * 100:.0f} % of a core; waiting for quiet")
            said = True
        time.sleep(2)


def loadgen_run(*args, timeout=600):
    """Run bench/loadgen.py in its own process (so the client heap is small); its JSON."""
    wait_quiet()
    cmd = [PY, os.path.join(HERE, "loadgen.py"), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {' '.join(cmd)}\n{done.stderr}")
    return json.loads(done.stdout)


# -- slapd ----------------------------------------------------------------------------

def ensure_slapd():
    if os.path.exists(SLAPD) and os.path.exists(SLAPADD):
        return
    if os.geteuid() != 0:
        sys.exit("slapd is not installed; as root: apt-get install slapd ldap-utils")
    log("installing slapd and ldap-utils (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input="slapd slapd/no_configuration boolean true\n",
                   text=True, check=True)
    if subprocess.run(["apt-cache", "show", "slapd"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300",
                    "--no-install-recommends", "slapd", "ldap-utils"], check=True, env=env)


def slapd_version():
    out = subprocess.run([SLAPD, "-VV"], capture_output=True, text=True)
    text = (out.stderr or out.stdout).strip().splitlines()
    return text[0].split("$")[1].replace("OpenLDAP: ", "").strip() if text and "$" in text[0] \
        else "slapd"


def slapd_config(directory, size):
    max_size = max(1 << 30, size * 16_000)
    return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {directory}/slapd.pid
olcArgsFile: {directory}/slapd.args
olcLogLevel: none
olcThreads: 4

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_DIR}
olcModuleLoad: back_mdb

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file://{SCHEMA_DIR}/core.ldif
include: file://{SCHEMA_DIR}/cosine.ldif
include: file://{SCHEMA_DIR}/inetorgperson.ldif
include: file://{SCHEMA_DIR}/nis.ldif

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {dataset.BASE_DN}
olcRootDN: cn=admin,{dataset.BASE_DN}
olcDbDirectory: {directory}/data
olcDbMaxSize: {max_size}
olcDbNoSync: TRUE
olcDbIndex: objectClass eq
olcDbIndex: uid,cn,mail eq
olcDbIndex: sn eq,sub
olcAccess: {{0}}to * by * read
"""


class Slapd:
    """A throwaway slapd: cn=config in DIR/slapd.d, mdb in DIR/data, loaded with slapadd -q."""

    def __init__(self, directory, size):
        self.dir = directory
        self.size = size
        self.proc = None
        self.port = None

    def load(self, ldif):
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(os.path.join(self.dir, "slapd.d"))
        os.makedirs(os.path.join(self.dir, "data"))
        config = os.path.join(self.dir, "config.ldif")
        with open(config, "w") as f:
            f.write(slapd_config(self.dir, self.size))
        subprocess.run([SLAPADD, "-n", "0", "-F", os.path.join(self.dir, "slapd.d"), "-l", config],
                       check=True, capture_output=True)
        started = time.perf_counter()
        subprocess.run([SLAPADD, "-q", "-F", os.path.join(self.dir, "slapd.d"),
                        "-b", dataset.BASE_DN, "-l", ldif], check=True, capture_output=True)
        return time.perf_counter() - started

    def start(self):
        self.port = free_port()
        started = time.perf_counter()
        logf = open(os.path.join(self.dir, "slapd.log"), "wb")
        self.proc = subprocess.Popen([SLAPD, "-F", os.path.join(self.dir, "slapd.d"),
                                      "-h", f"ldap://127.0.0.1:{self.port}/", "-d", "0"],
                                     stdout=logf, stderr=subprocess.STDOUT)
        STARTED.append(self.proc)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: see {self.dir}/slapd.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("slapd not ready after 60 s")
                time.sleep(0.02)
        return time.perf_counter() - started

    def stop(self):
        if self.proc:
            stop(self.proc)
            self.proc = None


# -- Pharos -----------------------------------------------------------------------------

class Pharos:
    """`pharos.py serve --storage file` on a data dir, ready when it logs its listen line."""

    def __init__(self, data):
        self.data = data
        self.proc = None
        self.port = None
        self.metrics_port = None
        self.stderr = []

    def load(self, jsonl):
        shutil.rmtree(self.data, ignore_errors=True)
        started = time.perf_counter()
        subprocess.run([PY, PHAROS, "load", "--data", self.data, jsonl], check=True,
                       capture_output=True)
        return time.perf_counter() - started

    def authorize(self, user, public_key):
        """Put one admin key in DATA/authorized_keys (the lab tier's key list)."""
        os.makedirs(self.data, exist_ok=True)
        with open(os.path.join(self.data, "authorized_keys"), "w") as f:
            f.write(f'{user} role="admin",tenant="*" {public_key}\n')

    def start(self, metrics="off", tier=None, profile=None, extra=()):
        self.port = free_port()
        self.stderr, self.metrics_port = [], None
        cmd = [PY] + (["-m", "cProfile", "-o", profile] if profile else []) + \
              [PHAROS, "serve", "--storage", "file", "--data", self.data,
               "--listen", f"127.0.0.1:{self.port}", "--metrics", metrics] + \
              (["--tier", tier] if tier else []) + list(extra)
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        STARTED.append(self.proc)
        ready = threading.Event()

        def drain():
            for row in self.proc.stderr:
                self.stderr.append(row.rstrip())
                if "metrics listening on" in row:
                    self.metrics_port = int(row.split(" on ")[1].split()[0].rsplit(":", 1)[1])
                if "Ph listening on" in row:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(600)
        if self.proc.poll() is not None or not any("Ph listening" in r for r in self.stderr):
            raise RuntimeError("pharos serve did not start:\n" + "\n".join(self.stderr))
        return time.perf_counter() - started

    def stop(self):
        if self.proc:
            code = stop(self.proc)
            self.proc = None
            if code != 0:
                raise RuntimeError(f"pharos serve exited {code}:\n" + "\n".join(self.stderr))


def scrape_cost(port, pid, count):
    """Wall ms and server CPU ms of GET /metrics, ``count`` times on fresh connections."""
    walls = []
    size = 0
    cpu0 = loadgen.cpu_seconds(pid)
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        walls.append(time.perf_counter() - started)
        if resp.status != 200:
            raise RuntimeError(f"/metrics answered {resp.status}")
        size = len(body)
    cpu1 = loadgen.cpu_seconds(pid)
    return {"scrapes": count, "wall_ms_p50": round(statistics.median(walls) * 1e3, 2),
            "wall_ms_max": round(max(walls) * 1e3, 2),
            "cpu_ms_per_scrape": round((cpu1 - cpu0) / count * 1e3, 2), "bytes": size}


# -- the run -----------------------------------------------------------------------------

def machine_info():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for row in f:
            if row.startswith("model name"):
                model = row.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1])
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    git = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip() or "unknown"
    return {"cpu": model, "nproc": nproc, "mem_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "slapd": slapd_version(), "pharos": git}


def run(args):
    d, w = args.duration, args.warmup
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    res = {"size": args.size, "duration": d, "warmup": w, "quick": args.quick,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info()}
    n = args.size

    log(f"dataset: {n} people + {n} machines")
    started = time.perf_counter()
    data = dataset.Dataset(n)
    jsonl, ldif = os.path.join(work, "data.jsonl"), os.path.join(work, "data.ldif")
    with open(jsonl, "w") as f:
        data.write_jsonl(f)
    with open(ldif, "w") as f:
        data.write_ldif(f)
    res["dataset_s"] = round(time.perf_counter() - started, 2)
    del data

    conns = (1, 16, 64)

    # slapd -------------------------------------------------------------------------
    ensure_slapd()
    slapd = Slapd(os.path.join(work, "slapd"), n)
    log("slapd: slapadd -q")
    s = res["slapd"] = {"load_s": round(slapd.load(ldif), 2)}
    try:
        s["ready_s"] = round(slapd.start(), 3)
        s["rss_ready_mib"] = round(loadgen.rss_kib(slapd.proc.pid) / 1024, 1)
        for c in conns:
            log(f"slapd: exact lookups, C={c}")
            s[f"exact_c{c}"] = loadgen_run("--driver", "ldap", "--port", slapd.port, "--pid",
                                           slapd.proc.pid, "--size", n, "-c", c, "-d", d, "-w", w)
        log("slapd: prefix lookups, C=16")
        s["prefix_c16"] = loadgen_run("--driver", "ldap", "--queries", "prefix", "--port",
                                      slapd.port, "--pid", slapd.proc.pid, "--size", n,
                                      "-c", 16, "-d", d, "-w", w)
        s["rss_mib"] = round(loadgen.rss_kib(slapd.proc.pid) / 1024, 1)
        s["disk_mib"] = round(du(os.path.join(slapd.dir, "data")) / 2**20, 1)
    finally:
        slapd.stop()
    shutil.rmtree(slapd.dir, ignore_errors=True)

    # Pharos lookups (default tier: reads are open) -----------------------------------
    key = os.path.join(work, "bench-key")
    for path in (key, key + ".pub"):
        if os.path.exists(path):
            os.unlink(path)
    have_keygen = shutil.which("ssh-keygen") is not None
    if have_keygen:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pharos-bench",
                        "-f", key], check=True)
        with open(key + ".pub") as f:
            public_key = f.read().strip()
    ph = Pharos(os.path.join(work, "pharos-data"))
    log("pharos: load")
    p = res["pharos"] = {"load_s": round(ph.load(jsonl), 2)}
    if have_keygen:
        ph.authorize("bench", public_key)
    p["disk_mib"] = round(du(ph.data) / 2**20, 1)
    try:
        p["ready_s"] = round(ph.start(), 3)
        pid = ph.proc.pid
        p["rss_ready_mib"] = round(loadgen.rss_kib(pid) / 1024, 1)
        log("pharos: first connection vs a later one")
        p["first_connection"] = loadgen_run("--driver", "ph", "--port", ph.port, "--pid", pid,
                                            "--size", n, "--first-connection",
                                            "-d", max(1.0, d / 2))
        for c in conns:
            log(f"pharos: exact lookups, C={c}")
            p[f"exact_c{c}"] = loadgen_run("--driver", "ph", "--port", ph.port, "--pid", pid,
                                           "--size", n, "-c", c, "-d", d, "-w", w)
        for kind in ("prefix", "ip", "mac"):
            log(f"pharos: {kind} lookups, C=16")
            p[f"{kind}_c16"] = loadgen_run("--driver", "ph", "--queries", kind, "--port",
                                           ph.port, "--pid", pid, "--size", n, "-c", 16,
                                           "-d", d, "-w", w)
        p["rss_mib"] = round(loadgen.rss_kib(pid) / 1024, 1)
        p["hwm_mib"] = round(loadgen.rss_kib(pid, "VmHWM") / 1024, 1)
    finally:
        ph.stop()

    # The same lookups with the loop's busy poll off: what the poll buys
    log("pharos: exact lookups with --busy-poll 0, C=1 and C=16")
    try:
        ph.start(extra=("--busy-poll", "0"))
        for c in (1, 16):
            p[f"nopoll_c{c}"] = loadgen_run("--driver", "ph", "--port", ph.port, "--pid",
                                            ph.proc.pid, "--size", n, "-c", c, "-d", d,
                                            "-w", w)
    finally:
        ph.stop()

    # The same start without the snapshot's image: the snapshot read and every record indexed
    log("pharos: start without the snapshot image")
    image = os.path.join(ph.data, "snapshot.image")
    os.replace(image, image + ".aside")
    try:
        p["ready_snapshot_s"] = round(ph.start(), 3)
        p["rss_snapshot_mib"] = round(loadgen.rss_kib(ph.proc.pid) / 1024, 1)
    finally:
        ph.stop()                       # a clean stop writes the image again
        os.replace(image + ".aside", image)

    # metrics off against on: fresh servers in turn, the median run of each ----------
    log("pharos: metrics off vs on (--metrics 127.0.0.1:0), alternating servers, C=16")
    m = res["metrics"] = {"off": [], "on": []}
    try:
        for _ in range(1 if args.quick else 3):
            for mode, flag in (("off", "off"), ("on", "127.0.0.1:0")):
                ph.start(metrics=flag)
                try:
                    m[mode].append(loadgen_run("--driver", "ph", "--port", ph.port, "--pid",
                                               ph.proc.pid, "--size", n, "-c", 16, "-d", d,
                                               "-w", w))
                    if mode == "on" and "scrape" not in m:
                        m["scrape"] = scrape_cost(ph.metrics_port, ph.proc.pid,
                                                  5 if args.quick else 20)
                finally:
                    ph.stop()
    finally:
        shutil.rmtree(ph.data, ignore_errors=True)
    for mode in ("off", "on"):
        runs = sorted(m[mode], key=lambda r: r["rps"])
        m[f"{mode}_c16"] = runs[len(runs) // 2]
    m["exact_c16"] = m["on_c16"]

    # durable writes -------------------------------------------------------------------
    # Each point is run three times (once with --quick), Pharos and SQLite in turn, each
    # on fresh files; the run with the median rate is reported, the worst wait of them all.
    wr = res["writes"] = {}
    runs = 1 if args.quick else 3
    for c in (1, 16):
        every = {"pharos": [], "sqlite": []}
        for turn in range(runs):
            log(f"pharos: add over the Ph port, {c} client(s), run {turn + 1} of {runs}")
            ph = Pharos(os.path.join(work, f"pharos-writes-{c}"))
            shutil.rmtree(ph.data, ignore_errors=True)
            try:
                if have_keygen:         # the default (lab) tier: log in with an SSH key first
                    ph.authorize("bench", public_key)
                    ph.start()
                    login = ("--login", "bench", key)
                else:                   # no ssh-keygen: the dev tier needs no login
                    ph.start(tier="dev")
                    login = ()
                wr["tier"] = "lab" if have_keygen else "dev"
                every["pharos"].append(loadgen_run("--driver", "ph-add", "--port", ph.port,
                                                   "--pid", ph.proc.pid, "-c", c, "-d", d,
                                                   "-w", w, *login))
            finally:
                ph.stop()
            shutil.rmtree(ph.data, ignore_errors=True)
            log(f"sqlite: INSERT, WAL + synchronous=FULL, {c} thread(s), run {turn + 1} of {runs}")
            db = os.path.join(work, f"sqlite-{c}.db")
            every["sqlite"].append(loadgen_run("--driver", "sqlite", "--db", db, "-c", c,
                                               "-d", d, "-w", w))
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.unlink(db + suffix)
        for who, results in every.items():
            median = dict(sorted(results, key=lambda r: r["rps"])[len(results) // 2])
            median["rps_runs"] = [r["rps"] for r in results]
            median["worst_us"] = max(r["max_us"] for r in results)
            wr[f"{who}_c{c}"] = median

    for path in (jsonl, ldif, key, key + ".pub"):
        if os.path.exists(path):
            os.unlink(path)
    return res


# -- the report ------------------------------------------------------------------------------

def ratio(a, b, digits=2):
    if a is None or b in (None, 0):
        return "–"
    return f"{a / b:.{digits}f}×"


def fmt(value, digits=0):
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def lookup_rows(res):
    s, p = res["slapd"], res["pharos"]
    rows = [("exact `name=<surname>`", "C=1", s["exact_c1"], p["exact_c1"]),
            ("exact `name=<surname>`", "C=16", s["exact_c16"], p["exact_c16"]),
            ("exact `name=<surname>`", "C=64", s["exact_c64"], p["exact_c64"]),
            ("wildcard `name=<prefix>*`", "C=16", s["prefix_c16"], p["prefix_c16"]),
            ("machine `ip=<ip>`", "C=16", None, p["ip_c16"]),
            ("machine `mac=<mac>`", "C=16", None, p["mac_c16"])]
    if "nopoll_c1" in p:
        rows[3:3] = [("exact, Pharos `--busy-poll 0`", f"C={c}", s[f"exact_c{c}"],
                      p[f"nopoll_c{c}"]) for c in (1, 16)]
    out = ["| lookup | conns | slapd req/s | Pharos req/s | ratio | slapd p50 / p99 µs "
           "| Pharos p50 / p99 µs | slapd CPU µs/req | Pharos CPU µs/req | CPU ratio "
           "| entries/reply | errors (slapd / Pharos) | other load % (slapd / Pharos) |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, c, a, b in rows:
        a = a or {}
        out.append(
            f"| {name} | {c} | {fmt(a.get('rps'))} | {fmt(b['rps'])} | {ratio(b['rps'], a.get('rps'))} "
            f"| {fmt(a.get('p50_us'))} / {fmt(a.get('p99_us'))} | {fmt(b['p50_us'])} / {fmt(b['p99_us'])} "
            f"| {fmt(a.get('cpu_us_per_req'), 1)} | {fmt(b['cpu_us_per_req'], 1)} "
            f"| {ratio(b['cpu_us_per_req'], a.get('cpu_us_per_req'))} "
            f"| {fmt(b['entries_per_reply'], 2)} | {a.get('errors', '–')} / {b['errors']} "
            f"| {fmt(a.get('other_cpu_pct'))} / {fmt(b.get('other_cpu_pct'))} |")
    return out


def write_rows(res):
    w = res["writes"]
    out = ["| writer | clients | records/s (median) | each run | ratio | commit p50 ms | p99 ms "
           "| worst wait ms (all runs) | records per writer (min–max) | errors |",
           "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for c in (1, 16):
        for who, label in (("sqlite", "SQLite WAL, synchronous=FULL (threads)"),
                           ("pharos", "Pharos `add` over Ph (connections)")):
            r = w[f"{who}_c{c}"]
            rat = ratio(r["rps"], w[f"sqlite_c{c}"]["rps"]) if who == "pharos" else "1.00×"
            each = " / ".join(fmt(x) for x in r.get("rps_runs", [r["rps"]]))
            out.append(f"| {label} | {c} | {fmt(r['rps'])} | {each} | {rat} "
                       f"| {r['p50_us'] / 1e3:.2f} | {r['p99_us'] / 1e3:.2f} "
                       f"| {r.get('worst_us', r['max_us']) / 1e3:.1f} "
                       f"| {r['per_conn_min']:,}–{r['per_conn_max']:,} | {r['errors']} |")
    return out


def targets(res, scale):
    s, p, w = res["slapd"], res["pharos"], res["writes"]
    fc = p["first_connection"]
    rows = []

    def add(what, measured, ok):
        rows.append(f"| {what} | {measured} | {'met' if ok else '**missed**'} |")

    r = p["exact_c16"]["cpu_us_per_req"] / s["exact_c16"]["cpu_us_per_req"]
    add("C=16 exact: Pharos CPU/request ≤ 0.8 × slapd", f"{r:.2f}×", r <= 0.8)
    r = p["exact_c16"]["rps"] / s["exact_c16"]["rps"]
    add("C=16 exact: Pharos req/s ≥ slapd", f"{r:.2f}×", r >= 1)
    r = p["exact_c1"]["p50_us"] / s["exact_c1"]["p50_us"]
    nopoll = p.get("nopoll_c1")
    add("C=1 exact: Pharos p50 ≤ slapd", f"{r:.2f}× ({p['exact_c1']['p50_us']:.0f} vs "
        f"{s['exact_c1']['p50_us']:.0f} µs)" + (
            f"; with `--busy-poll 0` {nopoll['p50_us'] / s['exact_c1']['p50_us']:.2f}× "
            f"({nopoll['p50_us']:.0f} µs)" if nopoll else ""), r <= 1)
    r = p["prefix_c16"]["cpu_us_per_req"] / p["exact_c16"]["cpu_us_per_req"]
    add("wildcard prefix CPU/request ≤ 2 × exact (Pharos, C=16)", f"{r:.2f}×", r <= 2)
    big = scale.get(1_000_000)
    if big:
        bp = big["pharos"]
        add("1M+1M: `serve` ready < 15 s", f"{bp['ready_s']:.1f} s from the snapshot's image"
            + (f"; {bp['ready_snapshot_s']:.1f} s without it" if "ready_snapshot_s" in bp
               else ""), bp["ready_s"] < 15)
        add("1M+1M: holds them in RSS < 2.5 GB", f"{bp['rss_mib'] / 1024:.2f} GiB after lookups "
            f"({bp['rss_mib'] * 2**20 / 1e9:.2f} GB); peak while loading "
            f"{bp['hwm_mib'] / 1024:.2f} GiB", bp["rss_mib"] < 2.5e9 / 2**20)
        small = scale.get(100_000)
        if small:
            r = bp["exact_c16"]["cpu_us_per_req"] / small["pharos"]["exact_c16"]["cpu_us_per_req"]
            add("1M+1M: exact lookup CPU within 10 % of 100k", f"{r:.2f}×", r <= 1.10)
    else:
        add("1M+1M: ready < 15 s, RSS < 2.5 GB, lookups within 10 %",
            "not measured yet (`python3 bench/run.py --size 1000000`)", False)
    r = w["pharos_c16"]["rps"] / w["sqlite_c16"]["rps"]
    add("16 writers: Pharos ≥ 2 × SQLite (median runs)", f"{r:.2f}×", r >= 2)
    worst = w["pharos_c16"].get("worst_us", w["pharos_c16"]["max_us"]) / 1e3
    add("16 writers: no Pharos writer waits > 50 ms", f"worst {worst:.1f} ms", worst <= 50)
    r = w["pharos_c1"]["rps"] / w["sqlite_c1"]["rps"]
    add("1 writer: Pharos ≥ 0.8 × SQLite (median runs)", f"{r:.2f}×", r >= 0.8)
    r = fc["first"]["cpu_us_per_req"] / fc["later"]["cpu_us_per_req"]
    add("no first-connection penalty (first ÷ later CPU/request ≤ 1.2)", f"{r:.2f}× "
        f"({fc['first']['cpu_us_per_req']:.1f} vs {fc['later']['cpu_us_per_req']:.1f} µs)",
        r <= 1.2)
    met = res["metrics"]
    r = met["on_c16"]["rps"] / met["off_c16"]["rps"]
    add(f"metrics on ÷ off req/s ≥ 0.97 (C=16, median of {len(met['on'])} alternating runs)",
        f"{r:.2f}×", r >= 0.97)
    return ["| target | measured | |", "|---|---|---|"] + rows


def svg_chart(res):
    """Three grouped bar panels: req/s, server CPU µs/request, durable writes/s."""
    s, p, w = res["slapd"], res["pharos"], res["writes"]
    panels = [
        ("Exact lookups: requests/s", [("C=1", s["exact_c1"]["rps"], p["exact_c1"]["rps"]),
                                        ("C=16", s["exact_c16"]["rps"], p["exact_c16"]["rps"]),
                                        ("C=64", s["exact_c64"]["rps"], p["exact_c64"]["rps"]),
                                        ("prefix C=16", s["prefix_c16"]["rps"],
                                         p["prefix_c16"]["rps"])],
         ("slapd", "Pharos")),
        ("Server CPU µs per request (lower is better)",
         [(k, s[f"{x}"]["cpu_us_per_req"], p[f"{x}"]["cpu_us_per_req"])
          for k, x in (("C=1", "exact_c1"), ("C=16", "exact_c16"), ("C=64", "exact_c64"),
                       ("prefix C=16", "prefix_c16"))],
         ("slapd", "Pharos")),
        ("Durable writes: records/s",
         [("1 writer", w["sqlite_c1"]["rps"], w["pharos_c1"]["rps"]),
          ("16 writers", w["sqlite_c16"]["rps"], w["pharos_c16"]["rps"])],
         ("SQLite", "Pharos")),
    ]
    width, panel_h, top = 760, 230, 30
    colors = ("#8c8c8c", "#1f6fb2")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{top + panel_h * len(panels) + 10}" font-family="sans-serif" '
             f'font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="10" y="20" font-size="14" font-weight="bold">Pharos vs slapd and SQLite '
             f'({res["size"]:,} people + {res["size"]:,} machines, {res["machine"]["nproc"]} '
             f'cores)</text>']
    for k, (title, groups, names) in enumerate(panels):
        y0 = top + k * panel_h
        plot_top, plot_bottom, left = y0 + 30, y0 + panel_h - 40, 70
        top_value = max(max(a or 0, b or 0) for _, a, b in groups) * 1.15 or 1
        parts.append(f'<text x="10" y="{y0 + 18}" font-weight="bold">{title}</text>')
        for j, name in enumerate(names):
            parts.append(f'<rect x="{width - 170 + j * 80}" y="{y0 + 8}" width="12" '
                         f'height="12" fill="{colors[j]}"/><text x="{width - 154 + j * 80}" '
                         f'y="{y0 + 18}">{name}</text>')
        for t in range(5):
            v = top_value * t / 4
            y = plot_bottom - (plot_bottom - plot_top) * t / 4
            parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
                         f'stroke="#e0e0e0"/><text x="{left - 6}" y="{y + 4:.1f}" '
                         f'text-anchor="end">{v:,.0f}</text>')
        slot = (width - 10 - left) / len(groups)
        bar = min(60, slot / 3)
        for g, (label, a, b) in enumerate(groups):
            x = left + g * slot + slot / 2 - bar
            for j, v in enumerate((a, b)):
                if v is None:
                    continue
                h = (plot_bottom - plot_top) * v / top_value
                parts.append(f'<rect x="{x + j * bar:.1f}" y="{plot_bottom - h:.1f}" '
                             f'width="{bar - 4:.1f}" height="{h:.1f}" fill="{colors[j]}"/>'
                             f'<text x="{x + j * bar + (bar - 4) / 2:.1f}" '
                             f'y="{plot_bottom - h - 4:.1f}" text-anchor="middle" '
                             f'font-size="10">{v:,.0f}</text>')
            parts.append(f'<text x="{left + g * slot + slot / 2:.1f}" y="{plot_bottom + 16}" '
                         f'text-anchor="middle">{label}</text>')
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{plot_bottom}" '
                     f'y2="{plot_bottom}" stroke="#333"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def scale_rows(scale):
    out = ["| size | store | bulk load s | start → ready s | start without image s "
           "| RSS after lookups MiB | peak RSS MiB | on disk MiB | exact C=16 CPU µs/req |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for size in sorted(scale):
        r = scale[size]
        for who, name in (("slapd", "slapd (`slapadd -q`)"), ("pharos", "Pharos (`pharos load`)")):
            x = r[who]
            bare = x.get("ready_snapshot_s")
            out.append(f"| {size:,} + {size:,} | {name} | {x['load_s']:.1f} | {x['ready_s']:.2f} "
                       f"| {'–' if bare is None else f'{bare:.2f}'} "
                       f"| {fmt(x['rss_mib'])} | {fmt(x.get('hwm_mib'))} | {fmt(x['disk_mib'])} "
                       f"| {x['exact_c16']['cpu_us_per_req']:.1f} |")
    return out


def report(res, scale, svg_name):
    m, s, p = res["machine"], res["slapd"], res["pharos"]
    fc, met = p["first_connection"], res["metrics"]
    n = res["size"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python3 bench/run.py` (do not edit by hand; rerun it). "
        f"Run of {res['date']}: {n:,} people + {n:,} machines"
        + (" — **quick smoke run, numbers are not meaningful**" if res["quick"] else "") + ".",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, `nproc` = {m['nproc']}, {m['mem_gib']} GiB RAM, Linux {m['kernel']}",
        f"- Python {m['python']}, SQLite {m['sqlite']}, OpenLDAP {m['slapd']}; "
        f"pharos.py at `{m.get('pharos', 'unknown')}`",
        "- Client and server share the same cores, so the fair comparison is the server's CPU "
        "time per request (read from `/proc/PID/stat`, all threads), not only requests/s.",
        "",
        "## Method",
        "",
        f"- **Data** (`bench/dataset.py`, deterministic): {n:,} people (alias, \"First Last\" "
        f"name, email, phone, title, department) and {n:,} machines (hostname, ip, mac, os, "
        "role, owner). About N/2 distinct surnames, each carried by 1, 2 or 3 people, so "
        "every reply's entry count is known and checked. The same records go to both "
        "servers: JSONL for `pharos.py load`, LDIF (`inetOrgPerson` under `ou=people`, "
        "`device` + `ipHost` + `ieee802Device` under `ou=hosts`, base `dc=pharos,dc=test`) "
        "for `slapadd -q`.",
        "- **slapd**: a throwaway instance started directly (`slapd -F DIR -h "
        "ldap://127.0.0.1:PORT/ -d 0`), its own cn=config, mdb backend, `olcThreads: 4`, "
        "eq indexes on objectClass, sn, uid, cn, mail and a sub index on sn (for the "
        "wildcard search), anonymous reads.",
        "- **Pharos**: `pharos.py load --data DIR` then `pharos.py serve --storage file "
        "--data DIR --listen 127.0.0.1:PORT --metrics off` in the default tier (lab: reads "
        "are open, writes need an SSH-key login), so the authorization check is on the "
        "measured path; ready when it logs its listen line (no probe connection, so the "
        "first benchmark connection really is the first). Its event loop polls up to "
        "100 µs for the next request before it sleeps (`--busy-poll`, on by default); a "
        "second server with `--busy-poll 0` shows exact lookups without it. slapd has no "
        "such option.",
        f"- **Load client** (`bench/loadgen.py`): C connections in one asyncio process, each "
        f"with exactly one request outstanding; {res['warmup']:g} s warm-up, then "
        f"{res['duration']:g} s measured. Ph: `query name=<surname> return alias name email`; "
        "LDAP: `(&(objectClass=inetOrgPerson)(sn=<surname>))` with attributes uid cn mail, "
        "BER bytes encoded before the clock starts. Wildcard: `name=<5-letter prefix>*` / "
        "`(sn=<prefix>*)`, prefixes chosen so both answer the same entries. Every reply is "
        "parsed and its entry count compared with the dataset; a mismatch is an error. "
        "Latency is send → complete reply, p50/p99 over the window. Before each point the "
        "script waits for the machine to be quiet; *other load* is the CPU other processes "
        "used during the window (`/proc/stat` busy time minus client and server, 100 = one "
        "core); a point with more than a few % is disturbed.",
        "- **Durable writes**: Pharos `add` (fresh people) over the Ph port from 1 and 16 "
        f"connections to a fresh `--storage file` data dir, tier {res['writes'].get('tier')}"
        + (" (each connection logs in once with an SSH key, `login`/`answer`, before the "
           "clock starts; every add then goes through the authorization check and the audit "
           "log)" if res["writes"].get("tier") == "lab" else "") +
        "; each add is answered after the journal fsync; SQLite WAL + `synchronous=FULL`, the same records INSERTed from 1 "
        "and 16 threads (one connection each, autocommit: one row per transaction, table with "
        "a primary key on alias and an index on name). Each point runs three times (once "
        "with `--quick`), Pharos and SQLite taking turns on fresh files, since write rates "
        "on this disk drift by 10-20 % from minute to minute; the run with the median rate "
        "is shown, with the rate of every run beside it. Worst wait = the longest single add "
        "or commit seen by any writer in any of the runs.",
        "- **Metrics**: fresh Pharos servers on the same data, `--metrics off` and "
        "`--metrics 127.0.0.1:0` in turn, three of each (one with `--quick`), exact lookups "
        "at C=16; the median run of each is compared (the counting itself runs either way; "
        "taking turns keeps drift between runs out of the ratio). Then `GET /metrics` on "
        "fresh connections, wall time and server CPU.",
        "- **First connection**: on the fresh `--metrics off` server, one connection runs "
        "lookups (no warm-up) and closes; then a second connection does the same. Server CPU "
        "per request of each.",
        "",
        "## Targets",
        "",
        *targets(res, scale),
        "",
        f"![chart]({svg_name})",
        "",
        "## Lookups",
        "",
        *lookup_rows(res),
        "",
        "## Durable writes",
        "",
        *write_rows(res),
        "",
        "## Load time and memory",
        "",
        *scale_rows(scale),
        "",
        "Bulk load is the offline loader's wall time (`slapadd -q` / `pharos.py load`, which "
        "writes the snapshot and its image); start → ready is from exec to the listening "
        "socket (slapd) or the listen log line (Pharos, which loads the snapshot's image, "
        "records and index together). *Start without image* is the same data dir with the "
        "image moved aside: the snapshot is read and every record indexed, as after a "
        "compaction and a crash. Peak RSS is VmHWM; while the image loads, its file pages "
        "are mapped too. slapd's RSS counts the mdb pages it touched (file-backed mmap).",
        "",
        "## Metrics endpoint",
        "",
        "| | value |",
        "|---|--:|",
        f"| exact C=16 req/s, `--metrics off` (median of {len(met['off'])} fresh servers) "
        f"| {fmt(met['off_c16']['rps'])} |",
        f"| exact C=16 req/s, `--metrics 127.0.0.1:0` (median, taken in turn with off) "
        f"| {fmt(met['on_c16']['rps'])} |",
        f"| ratio on ÷ off | {ratio(met['on_c16']['rps'], met['off_c16']['rps'])} |",
        f"| server CPU µs/req off / on | {met['off_c16']['cpu_us_per_req']:.1f} / "
        f"{met['on_c16']['cpu_us_per_req']:.1f} |",
        f"| one `/metrics` scrape, wall ms (p50 / max of {met['scrape']['scrapes']}) "
        f"| {met['scrape']['wall_ms_p50']:.2f} / {met['scrape']['wall_ms_max']:.2f} |",
        f"| one `/metrics` scrape, server CPU ms | {met['scrape']['cpu_ms_per_scrape']:.2f} |",
        f"| exposition size, bytes | {met['scrape']['bytes']:,} |",
        "",
        "## First-connection warm-up",
        "",
        "| connection | requests | req/s | p50 µs | server CPU µs/req |",
        "|---|--:|--:|--:|--:|",
        *[f"| {label} | {fc[k]['requests']:,} | {fmt(fc[k]['rps'])} | {fmt(fc[k]['p50_us'])} "
          f"| {fc[k]['cpu_us_per_req']:.1f} |"
          for k, label in (("first", "first connection of a fresh server"),
                           ("later", "a later connection"))],
        "",
        "## Load client cost and other load",
        "",
        "Client CPU per request (the client shares the cores): "
        + ", ".join(f"{who} C=16 {r['client_cpu_us_per_req']:.1f} µs"
                    for who, r in (("LDAP", s["exact_c16"]), ("Ph", p["exact_c16"]))) + ". "
        "CPU used by other processes on the machine during the lookup windows (busy time from "
        "`/proc/stat` minus client and server; 100 % = one core): "
        + ", ".join(f"{name} {r.get('other_cpu_pct', 0):.0f} %" for name, r in (
            ("slapd C=1", s["exact_c1"]), ("C=16", s["exact_c16"]), ("C=64", s["exact_c64"]),
            ("Pharos C=1", p["exact_c1"]), ("C=16", p["exact_c16"]), ("C=64", p["exact_c64"])))
        + ".",
        "",
        "## Reproduce",
        "",
        "```sh",
        "python3 bench/run.py                  # this report (about 5 minutes)",
        "python3 bench/run.py --quick          # smoke run, report in bench/out/",
        "python3 bench/run.py --size 1000000   # 1M + 1M; adds its row to the scale table",
        "```",
        "",
        "Raw numbers: `bench/results/size-<N>.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="people, and as many machines")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per point")
    ap.add_argument("--quick", action="store_true", help="10k+10k, 1 s points; a smoke run")
    ap.add_argument("--wait-quiet", type=float, default=90.0, metavar="SECONDS",
                    help="before each point, wait up to this long for other load to stop")
    ap.add_argument("--workdir", default=os.path.join(HERE, "out"), help="scratch space")
    ap.add_argument("--out", help="report path (default docs/benchmarks.md; "
                                  "bench/out/benchmarks-quick.md with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 10_000)
        args.duration, args.warmup = 1.0, 0.3
    out = args.out or (os.path.join(HERE, "out", "benchmarks-quick.md") if args.quick
                       else os.path.join(ROOT, "docs", "benchmarks.md"))
    QUIET["limit_s"] = args.wait_quiet
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    started = time.perf_counter()
    try:
        res = run(args)
    finally:
        stop_all()
    res["total_s"] = round(time.perf_counter() - started, 1)

    results_dir = os.path.join(HERE, "out") if args.quick else os.path.join(HERE, "results")
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"size-{args.size}.json"), "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")
    scale = {}
    for name in sorted(os.listdir(results_dir)):
        if name.startswith("size-") and name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                other = json.load(f)
            if other.get("quick") == args.quick:
                scale[other["size"]] = other
    scale[args.size] = res

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # The report shows the default-size run in full; a --size 1000000 run adds its scale row.
    main_res = scale.get(100_000) if not args.quick and 100_000 in scale else res
    svg_path = os.path.splitext(out)[0] + ".svg"
    with open(svg_path, "w") as f:
        f.write(svg_chart(main_res))
    with open(out, "w") as f:
        f.write(report(main_res, scale, os.path.basename(svg_path)))
    print(f"\n{out} written ({res['total_s']:.0f} s)\n")
    print("\n".join(targets(main_res, scale)))
    print()
    print("\n".join(lookup_rows(res)))
    print()
    print("\n".join(write_rows(res)))
    print()
    print("\n".join(scale_rows(scale)))
    bad = [f"{who}.{k}: {r['errors']} errors, first: {r['first_error']}"
           for who in ("slapd", "pharos", "metrics", "writes") for k, r in res[who].items()
           if isinstance(r, dict) and r.get("errors")]
    for text in bad:
        print("WARNING " + text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
