#!/usr/bin/env python3
"""Pharos on LDAP against Pharos on file and against slapd itself, on one generated dataset.

    python3 bench/ldap.py --size 10000 --lookups 2000 --adds 500 --changes 50

Measures: time until each server is ready (Pharos on LDAP from nothing, then from the
image a clean stop left: nothing changed, some entries changed by ldapmodify, slapd
restarted too); exact surname lookups (wall time per lookup
and the server's CPU per lookup, from /proc/PID/stat) through Pharos-on-LDAP,
Pharos-on-file and the equivalent `(sn=NAME)` search straight against slapd, one at a
time and then, with bench/loadgen.py, exact and prefix lookups at C=1 and C=16 (req/s
and server CPU per request, medians of --rounds runs in turns; slapd gets the
equivalent searches); adds per second through
Ph against `ldapadd` of the same entries; and how long an ldapmodify takes to be visible
over Ph (p50/p99).
Needs slapd, ldap-utils and ldap3; everything runs on 127.0.0.1 in a temp dir.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

import dataset  # noqa: E402
from conftest import PhClient, ServerProcess  # noqa: E402
from ldap_fixture import ROOTDN, ROOTPW, SUFFIX, Slapd  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    """Seconds of user+system CPU process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def timed_start(server):
    started = time.perf_counter()
    server.start(timeout=600)
    return time.perf_counter() - started


def ph_lookups(server, queries):
    """(µs wall per lookup, µs server CPU per lookup) of `query name=SURNAME`."""
    with PhClient("127.0.0.1", server.port, timeout=60) as c:
        before, started = cpu(server.proc.pid), time.perf_counter()
        for name, count in queries:
            reply = c.cmd(f"query name={name} return alias")
            assert len([r for r in reply if r.startswith("-200:") and "alias" in r]) >= count
        wall = time.perf_counter() - started
        used = cpu(server.proc.pid) - before
    return wall / len(queries) * 1e6, used / len(queries) * 1e6


def slapd_lookups(slapd, queries):
    """The same lookups as `(sn=SURNAME)` searches straight against slapd (ldap3)."""
    import ldap3
    conn = ldap3.Connection(ldap3.Server(slapd.url, get_info=ldap3.NONE), ROOTDN, ROOTPW,
                            client_strategy=ldap3.SAFE_SYNC, auto_bind=True)
    before, started = cpu(slapd.pid()), time.perf_counter()
    for name, count in queries:
        _, _, response, _ = conn.search(f"ou=people,{SUFFIX}", f"(sn={name})",
                                        attributes=["uid"])
        assert len(response) >= count
    wall = time.perf_counter() - started
    used = cpu(slapd.pid()) - before
    conn.unbind()
    return wall / len(queries) * 1e6, used / len(queries) * 1e6


def loadgen_points(targets, size, duration, rounds):
    """bench/loadgen.py's req/s and server CPU µs per request, per target and point: the
    median of ``rounds`` runs taken in turns (the order reversed every other round), with
    the range, and the first target's CPU per request over the second's."""
    for kind in ("exact", "prefix"):
        for conns in (1, 16):
            runs = {label: [] for label, _, _, _ in targets}
            for n in range(rounds):
                for label, driver, port, pid in (targets if n % 2 == 0 else targets[::-1]):
                    done = subprocess.run(
                        [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--driver", driver,
                         "--queries", kind, "--port", str(port), "--pid", str(pid), "--size",
                         str(size), "-c", str(conns), "-d", str(duration), "-w", "1"],
                        capture_output=True, text=True, check=True, timeout=600)
                    res = __import__("json").loads(done.stdout)
                    assert not res["errors"], res
                    runs[label].append((res["cpu_us_per_req"], res["rps"]))
            row, cpus = [], []
            for label, got in runs.items():
                used = sorted(c for c, _ in got)
                rps = statistics.median(r for _, r in got)
                cpus.append(statistics.median(used))
                row.append(f"{label} {rps:,.0f}/s {cpus[-1]:.0f} µs ({used[0]:.0f}-{used[-1]:.0f})")
            print(f"{kind} C={conns}: " + "; ".join(row)
                  + f"; CPU {targets[0][0]} / {targets[1][0]} {cpus[0] / cpus[1]:.2f}x")


def ldapadd_per_second(slapd, n, prefix):
    """Entries/s of one `ldapadd` of ``n`` people like the ones the Ph adds make."""
    ldif = "".join(f"dn: uid={prefix}{i},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\n"
                   f"uid: {prefix}{i}\ncn: Bench {i}\nsn: {i}\n\n" for i in range(n))
    started = time.perf_counter()
    subprocess.run(["ldapadd", "-x", "-H", slapd.url, "-D", ROOTDN, "-w", ROOTPW],
                   input=ldif, text=True, check=True, capture_output=True)
    return n / (time.perf_counter() - started)


def warm_starts(slapd, data, changes):
    """(what came before, what to do while Pharos is stopped) of each start from the
    image a clean stop leaves: nothing changed; ``changes`` entries modified by another
    tool; slapd restarted too (its session log of changes is gone: a present phase)."""
    def modify():
        ldif = "".join(f"dn: uid={person['alias']},ou=people,{SUFFIX}\nchangetype: modify\n"
                       f"replace: title\ntitle: warm{i}-{time.monotonic_ns()}\n\n"
                       for i, person in enumerate(map(data.person, range(changes))))
        slapd.ldap("ldapmodify", input=ldif)

    def restart():
        slapd.stop()
        slapd.start()
        modify()
    return [("from its image, nothing changed since", lambda: None),
            (f"from its image, {changes} entries changed since by ldapmodify", modify),
            (f"from its image, slapd restarted and {changes} entries changed since "
             f"(a present phase)", restart)]


def adds_per_second(server, n, prefix):
    with PhClient("127.0.0.1", server.port, timeout=60) as c:
        started = time.perf_counter()
        for i in range(n):
            assert c.cmd(f"add alias={prefix}{i} name=\"Bench {i}\"")[-1] == "200:Ok."
    return n / (time.perf_counter() - started)


def freshness(slapd, server, n):
    """Seconds from an ldapmodify's answer to the change showing in a Ph query."""
    import ldap3
    conn = ldap3.Connection(ldap3.Server(slapd.url, get_info=ldap3.NONE), ROOTDN, ROOTPW,
                            client_strategy=ldap3.SAFE_SYNC, auto_bind=True)
    delays = []
    with PhClient("127.0.0.1", server.port, timeout=60) as c:
        for i in range(n):
            title = f"fresh{i}x"
            conn.modify(f"uid=ladd0,ou=people,{SUFFIX}",
                        {"title": [(ldap3.MODIFY_REPLACE, [title])]})
            started = time.perf_counter()
            while not c.cmd(f"query title={title} return alias")[-1].startswith("200"):
                time.sleep(0.005)
            delays.append(time.perf_counter() - started)
    conn.unbind()
    delays.sort()
    return delays[len(delays) // 2], delays[min(len(delays) - 1, int(len(delays) * 0.99))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=10_000, help="people, and as many machines")
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--adds", type=int, default=500)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per loadgen point")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each loadgen point, in turns")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pharos-bench-ldap-"))
    data = dataset.Dataset(args.size)
    with open(work / "data.ldif", "w") as f:
        data.write_ldif(f)
    with open(work / "data.jsonl", "w") as f:
        data.write_jsonl(f)
    slapd = Slapd(work / "slapd", base=False)
    slapd.configure()
    slapd.slapadd("-b", SUFFIX, "-q", "-w", "-l", str(work / "data.ldif"))
    slapd.start()
    subprocess.run([sys.executable, str(ROOT / "pharos.py"), "load", str(work / "data.jsonl"),
                    "--data", str(work / "file")], check=True, capture_output=True)
    on_ldap = ServerProcess(work / "ldap-data", "--ldap-bind-dn", ROOTDN,
                            storage=f"{slapd.url}/{SUFFIX}",
                            env={"PHAROS_LDAP_PASSWORD": ROOTPW})
    on_file = ServerProcess(work / "file")
    try:
        print(f"dataset: {args.size} people + {args.size} machines "
              f"(OpenLDAP, ldap3 {__import__('ldap3').__version__})")
        cold = timed_start(on_ldap)
        print(f"ready: pharos on ldap {cold:.2f} s from nothing, "
              f"pharos on file {timed_start(on_file):.2f} s")
        for label, between in warm_starts(slapd, data, args.changes):
            on_ldap.stop(timeout=600)
            on_ldap.port, on_ldap.stderr = None, b""
            between()
            print(f"ready: pharos on ldap {timed_start(on_ldap):.2f} s {label}")
        queries = data.exact_queries(args.lookups)
        for label, run in (("pharos on ldap", lambda: ph_lookups(on_ldap, queries)),
                           ("pharos on file", lambda: ph_lookups(on_file, queries)),
                           ("slapd directly", lambda: slapd_lookups(slapd, queries))):
            wall, used = run()
            print(f"exact lookups, {label}: {wall:.0f} µs/lookup wall, "
                  f"{used:.0f} µs server CPU/lookup")
        loadgen_points([("pharos on ldap", "ph", on_ldap.port, on_ldap.proc.pid),
                        ("pharos on file", "ph", on_file.port, on_file.proc.pid),
                        ("slapd", "ldap", slapd.port, slapd.pid())], args.size, args.duration,
                       args.rounds)
        print(f"adds through Ph: ldap {adds_per_second(on_ldap, args.adds, 'ladd'):.0f}/s, "
              f"file {adds_per_second(on_file, args.adds, 'fadd'):.0f}/s; "
              f"ldapadd of the same entries {ldapadd_per_second(slapd, args.adds, 'sadd'):.0f}/s")
        p50, p99 = freshness(slapd, on_ldap, args.changes)
        print(f"ldapmodify to visible over Ph: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    finally:
        on_ldap.kill()
        on_file.kill()
        slapd.stop()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    main()
