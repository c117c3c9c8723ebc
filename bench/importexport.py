#!/usr/bin/env python3
"""Import and export through the clients: `ph`/`mdb import` and `export` against
`ldapadd`/`ldapsearch` moving the same records into and out of a throwaway slapd, side by side.

    python3 bench/importexport.py                 # 100,000 records (50,000 people + 50,000 machines)
    python3 bench/importexport.py --size 10000    # quicker

Each tool runs as its own process; its wall time and peak memory (ru_maxrss from wait4) are
measured, and records/s computed. Pharos runs `serve --storage file --tier dev` (every write
fsync'd, writes that arrive together sharing an fsync); slapd is bench/run.py's throwaway
instance (back_mdb, olcDbNoSync, so no fsync), bound as its root DN for adds and searches.
The records are bench/dataset.py's. Everything talks to 127.0.0.1; every process started here
is stopped by pid before the script exits. Prints one JSON object.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dataset  # noqa: E402
import run as runner  # noqa: E402   (the slapd and Pharos helpers of bench/run.py)

ROOT_PW = "secret"


def timed(cmd, stdout=subprocess.DEVNULL):
    """Run ``cmd``; (wall seconds, peak RSS MiB) from wait4, raising if it fails."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=stdout, stderr=subprocess.PIPE)
    runner.STARTED.append(proc)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} ... exited {proc.returncode}: {err.strip()[-500:]}")
    return wall, usage.ru_maxrss / 1024


def measure(name, count, cmd, stdout=subprocess.DEVNULL):
    runner.log(f"{name}: {count:,} records")
    wall, peak = timed(cmd, stdout)
    return {"seconds": round(wall, 2), "records_per_s": round(count / wall),
            "peak_rss_mib": round(peak, 1)}


def write_inputs(data, work):
    """people.jsonl and machines.jsonl for Pharos; base.ldif and records.ldif for slapd."""
    paths = {n: os.path.join(work, n) for n in ("people.jsonl", "machines.jsonl", "all.ldif",
                                                "base.ldif", "records.ldif")}
    with open(paths["people.jsonl"], "w", encoding="utf-8") as f:
        for i in range(data.size):
            f.write(json.dumps(data.person(i)) + "\n")
    with open(paths["machines.jsonl"], "w", encoding="utf-8") as f:
        for i in range(data.size):
            f.write(json.dumps(data.machine(i)) + "\n")
    with open(paths["all.ldif"], "w", encoding="utf-8") as f:
        data.write_ldif(f)
    with open(paths["all.ldif"], encoding="utf-8") as src, \
            open(paths["base.ldif"], "w", encoding="utf-8") as base, \
            open(paths["records.ldif"], "w", encoding="utf-8") as rest:
        entries = 0
        for line in src:
            (base if entries < 3 else rest).write(line)
            if not line.strip():
                entries += 1
    return paths


def with_password(config):
    """A slapd config (bench/run.py's) with a root password, so ldapadd can bind."""
    rootdn = f"olcRootDN: cn=admin,{dataset.BASE_DN}\n"
    return config.replace(rootdn, rootdn + f"olcRootPW: {ROOT_PW}\n")


def bench_pharos(paths, work, size, res):
    server = runner.Pharos(os.path.join(work, "pharos-data"))
    shutil.rmtree(server.data, ignore_errors=True)
    server.start(tier="dev")
    where = ["--server", f"127.0.0.1:{server.port}"]
    try:
        py, pharos = runner.PY, runner.PHAROS
        res["import_people"] = measure("pharos: ph import", size, [
            py, pharos, "ph", "import", paths["people.jsonl"], *where])
        res["import_machines"] = measure("pharos: mdb import", size, [
            py, pharos, "mdb", "import", paths["machines.jsonl"], *where])
        res["reimport_unchanged"] = measure("pharos: ph import again (idempotent)", size, [
            py, pharos, "ph", "import", paths["people.jsonl"], *where])
        res["export_people"] = measure("pharos: ph export --format jsonl", size, [
            py, pharos, "ph", "export", "--format", "jsonl", "-o",
            os.path.join(work, "out-people.jsonl"), *where])
        res["export_machines"] = measure("pharos: mdb export --format jsonl", size, [
            py, pharos, "mdb", "export", "--format", "jsonl", "-o",
            os.path.join(work, "out-machines.jsonl"), *where])
        res["export_vcard"] = measure("pharos: ph export --format vcard", size, [
            py, pharos, "ph", "export", "--format", "vcard", "-o",
            os.path.join(work, "out.vcf"), *where])
        res["server_rss_mib"] = round(runner.loadgen.rss_kib(server.proc.pid) / 1024, 1)
        res["server_peak_rss_mib"] = round(
            runner.loadgen.rss_kib(server.proc.pid, "VmHWM") / 1024, 1)
        with open(os.path.join(work, "out-people.jsonl"), encoding="utf-8") as f:
            res["exported_people"] = sum(1 for _ in f)
    finally:
        server.stop()


def bench_slapd(paths, work, size, res):
    runner.ensure_slapd()
    slapd = runner.Slapd(os.path.join(work, "slapd"), size)
    plain = runner.slapd_config
    runner.slapd_config = lambda directory, n: with_password(plain(directory, n))
    try:
        slapd.load(paths["base.ldif"])
    finally:
        runner.slapd_config = plain
    slapd.start()
    url = f"ldap://127.0.0.1:{slapd.port}"
    bind = ["-x", "-H", url, "-D", f"cn=admin,{dataset.BASE_DN}", "-w", ROOT_PW]
    try:
        res["import"] = measure("slapd: ldapadd", 2 * size, ["ldapadd", *bind, "-f",
                                                             paths["records.ldif"]])
        with open(os.path.join(work, "out.ldif"), "wb") as out:
            res["export"] = measure("slapd: ldapsearch (paged)", 2 * size, [
                "ldapsearch", *bind, "-LLL", "-E", "pr=1000/noprompt", "-b", dataset.BASE_DN,
                "(|(objectClass=inetOrgPerson)(objectClass=device))"], stdout=out)
        res["server_peak_rss_mib"] = round(
            runner.loadgen.rss_kib(slapd.proc.pid, "VmHWM") / 1024, 1)
        with open(os.path.join(work, "out.ldif"), encoding="utf-8") as f:
            res["exported_entries"] = sum(1 for line in f if line.startswith("dn: "))
    finally:
        slapd.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000, help="records (half people, half machines)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    half = args.size // 2
    work = tempfile.mkdtemp(prefix="pharos-importexport-")
    res = {"records": 2 * half, "pharos": {}, "slapd": {}}
    try:
        runner.log(f"data: {half:,} people + {half:,} machines in {work}")
        paths = write_inputs(dataset.Dataset(half), work)
        bench_pharos(paths, work, half, res["pharos"])
        bench_slapd(paths, work, half, res["slapd"])
    finally:
        runner.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    p, s = res["pharos"], res["slapd"]
    p_in = 2 * half / (p["import_people"]["seconds"] + p["import_machines"]["seconds"])
    p_out = 2 * half / (p["export_people"]["seconds"] + p["export_machines"]["seconds"])
    res["summary"] = {
        "pharos_import_per_s": round(p_in), "ldapadd_per_s": s["import"]["records_per_s"],
        "pharos_export_per_s": round(p_out), "ldapsearch_per_s": s["export"]["records_per_s"],
        "import_ratio": round(p_in / s["import"]["records_per_s"], 2),
        "export_ratio": round(p_out / s["export"]["records_per_s"], 2),
        "pharos_client_peak_mib": max(v["peak_rss_mib"] for v in p.values()
                                      if isinstance(v, dict)),
        "ldap_client_peak_mib": max(s["import"]["peak_rss_mib"], s["export"]["peak_rss_mib"]),
    }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
