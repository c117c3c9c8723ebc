#!/usr/bin/env python3
"""Start-up time of the command-line tools against a bare interpreter.

    python3 bench/startup.py              # 21 runs of each command, medians
    python3 bench/startup.py --runs 51    # steadier figures on a busy machine
    python3 bench/startup.py --pharos OLD/pharos.py --pharos pharos.py   # before and after

Builds the zipapp into a temporary directory, warms its compile cache (a temporary
XDG_CACHE_HOME), starts one memory-storage dev-tier server on 127.0.0.1 with a few records,
then runs every command in turn, round after round (so a change in the machine's load falls
on all of them alike), and prints each one's median wall time and its ratio to
`python3 -c pass`. `python3 pharos.py` compiles the module on every start (a script's
bytecode is never cached); `python3 -m pharos` is shown with and without a cached .pyc.
The `-S` rows skip the site module, whose .pth files can import much on their own (on one
machine, certifi: 30 ms), and compare with `python3 -S -c pass`.
The server is stopped by pid before the script exits.
"""

import argparse
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
sys.path.insert(0, ROOT)
import build_zipapp  # noqa: E402

LISTEN_RE = re.compile(rb"Ph listening on \S+:(\d+)")
RECORDS = [["alias=ada", "name=Ada Lovelace", "email=ada@example.org"],
           ["alias=alan", "name=Alan Turing", "email=alan@example.org"],
           ["alias=grace", "name=Grace Hopper", "email=grace@example.org"]]


def start_server(env):
    """A memory-storage dev-tier server on 127.0.0.1:0; (process, port)."""
    proc = subprocess.Popen([PY, os.path.join(ROOT, "pharos.py"), "serve", "--listen",
                             "127.0.0.1:0", "--storage", "memory", "--tier", "dev",
                             "--metrics", "off"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen, deadline = b"", time.monotonic() + 30
    while time.monotonic() < deadline:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
        match = LISTEN_RE.search(seen)
        if match:
            return proc, int(match.group(1))
    stop(proc)
    raise SystemExit(f"startup: the server did not start: {seen.decode(errors='replace')}")


def stop(proc):
    """SIGTERM the server we started (by pid); SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(cmd, env, cwd):
    """Wall seconds of one run of ``cmd``; SystemExit if it fails."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"startup: {' '.join(cmd)} exited {done.returncode}: "
                         f"{done.stderr.decode(errors='replace').strip()[-400:]}")
    return wall


def commands(work, port, tag=""):
    """(label, argv, extra environment, directory) of every command measured; `-m pharos`
    with and without a .pyc runs from two copies, so the one never reads the other's."""
    return [(label + tag, argv, extra, cwd) for label, argv, extra, cwd in pharos_commands(
        work, port)]


def bare_commands(work):
    """The bare interpreter, with and without site."""
    return [("python3 -c pass", [PY, "-c", "pass"], {}, work),
            ("python3 -S -c pass", [PY, "-S", "-c", "pass"], {}, work)]


def pharos_commands(work, port):
    """The commands of one pharos.py, built in ``work``."""
    pyz, server = os.path.join(work, "pharos.pyz"), f"127.0.0.1:{port}"
    query = ["ph", "--server", server, "ada"]
    plain, cached = os.path.join(work, "plain"), os.path.join(work, "cached")
    nopyc, pyc = {"PYTHONDONTWRITEBYTECODE": "1"}, {"PYTHONDONTWRITEBYTECODE": ""}
    return [("pharos.pyz --version", [pyz, "--version"], {}, work),
            ("pharos.pyz ph QUERY", [pyz, *query], {}, work),
            ("python3 -S pharos.pyz --version", [PY, "-S", pyz, "--version"], {}, work),
            ("python3 -S pharos.pyz ph QUERY", [PY, "-S", pyz, *query], {}, work),
            ("python3 pharos.py --version", [PY, "pharos.py", "--version"], {}, plain),
            ("python3 pharos.py ph QUERY", [PY, "pharos.py", *query], {}, plain),
            ("python3 -m pharos ph QUERY (no .pyc)", [PY, "-m", "pharos", *query], nopyc, plain),
            ("python3 -m pharos --version (.pyc)", [PY, "-m", "pharos", "--version"], pyc, cached),
            ("python3 -m pharos ph QUERY (.pyc)", [PY, "-m", "pharos", *query], pyc, cached)]


def prepare(source, work, env):
    """Copy ``source`` into ``work``/plain and /cached, build the zipapp of it in ``work``
    and warm the zipapp's compile cache."""
    for copy in ("plain", "cached"):
        os.mkdir(os.path.join(work, copy))
        shutil.copy(source, os.path.join(work, copy, "pharos.py"))
    pyz = os.path.join(work, "pharos.pyz")
    build_zipapp.build(pathlib.Path(source), pathlib.Path(pyz))
    run([pyz, "--version"], env, work)


def measure(cmds, env, runs):
    """{label: [seconds, ...]}: one warm-up run of each, then ``runs`` rounds of all."""
    times = {label: [] for label, _, _, _ in cmds}
    for round_no in range(runs + 1):
        for label, argv, extra, cwd in cmds:
            wall = run(argv, dict(env, **extra), cwd)
            if round_no:
                times[label].append(wall)
    return times


def table(times):
    """The result table: median and fastest run in ms, and the median over those of
    `python3 -c pass` and of `python3 -S -c pass`."""
    base = statistics.median(times["python3 -c pass"])
    bare = statistics.median(times["python3 -S -c pass"])
    width = max(map(len, times))
    lines = [f"{'command':<{width}}  median ms  fastest ms  x python3 -c pass  x python3 -S"]
    for label, walls in times.items():
        median = statistics.median(walls)
        lines.append(f"{label:<{width}}  {median * 1000:9.1f}  {min(walls) * 1000:10.1f}  "
                     f"{median / base:17.2f}  {median / bare:12.2f}")
    return "\n".join(lines)


def main():
    """Build, start the server, add the records, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="rounds of runs (default 21)")
    parser.add_argument("--pharos", action="append", metavar="FILE",
                        help="a pharos.py to measure (default: this checkout's); given "
                             "more than once, their runs take turns and rows are tagged [N]")
    args = parser.parse_args()
    sources = args.pharos or [os.path.join(ROOT, "pharos.py")]
    with tempfile.TemporaryDirectory(prefix="pharos-startup-") as work:
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(work, "cache"), NO_COLOR="1")
        dirs = [os.path.join(work, str(n)) for n in range(1, len(sources) + 1)]
        for source, where in zip(sources, dirs):
            os.mkdir(where)
            prepare(source, where, env)
        proc, port = start_server(env)
        try:
            for words in RECORDS:
                run([PY, "pharos.py", "ph", "--server", f"127.0.0.1:{port}", "add", *words],
                    env, os.path.join(dirs[-1], "plain"))
            cmds = bare_commands(work)
            for n, where in enumerate(dirs, 1):
                cmds += commands(where, port, f" [{n}]" if len(dirs) > 1 else "")
            times = measure(cmds, env, args.runs)
        finally:
            stop(proc)
    for n, source in enumerate(sources, 1):
        print(f"[{n}] {source}" if len(sources) > 1 else source)
    print(f"Python {sys.version.split()[0]}, {args.runs} runs each, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(table(times))


if __name__ == "__main__":
    main()
