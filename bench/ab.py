#!/usr/bin/env python3
"""Lookups of two pharos.py versions side by side, in turns: is a change within noise?

    python3 bench/ab.py OLD/pharos.py pharos.py                  # 100k+100k, 5 rounds
    python3 bench/ab.py OLD/pharos.py pharos.py --size 20000 --rounds 3

Each version loads the same generated dataset into its own data dir and serves it
(`--storage file`, metrics off) at once, both servers up the whole time. Then, round after
round, every point (exact and prefix name lookups at C=1 and C=16, bench/loadgen.py) is
measured on one server and then the other, the order swapped each round, so drift in the
machine's load falls on both alike. Prints, per point, each version's median server CPU
per request and req/s over the rounds, their spread (min-max), and the ratio B / A.
"""

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dataset  # noqa: E402
import run  # noqa: E402

POINTS = (("exact", 1), ("exact", 16), ("prefix", 16), ("ip", 16))


def started(path, data, jsonl):
    """A run.Pharos of ``path`` serving ``jsonl`` from ``data``, up."""
    run.PHAROS = path
    server = run.Pharos(data)
    server.load(jsonl)
    server.start()
    return server


def measure(server, size, kind, connections, duration):
    """(server CPU µs per request, req/s) of one loadgen point."""
    res = run.loadgen_run("--driver", "ph", "--queries", kind, "--port", server.port,
                          "--pid", server.proc.pid, "--size", size, "-c", connections,
                          "-d", duration, "-w", 1)
    if res["errors"]:
        raise RuntimeError(f"{res['errors']} errors at {kind} C={connections}")
    return res["cpu_us_per_req"], res["rps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="pharos.py A (before)")
    ap.add_argument("b", help="pharos.py B (after)")
    ap.add_argument("--size", type=int, default=100_000, help="people, and as many machines")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per point")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pharos-ab-")
    jsonl = os.path.join(work, "data.jsonl")
    with open(jsonl, "w") as f:
        dataset.Dataset(args.size).write_jsonl(f)
    servers = {}
    try:
        for name, path in (("A", args.a), ("B", args.b)):
            servers[name] = started(os.path.abspath(path), os.path.join(work, name), jsonl)
        seen = {(name, point): [] for name in servers for point in POINTS}
        for round_ in range(args.rounds):
            order = ("A", "B") if round_ % 2 == 0 else ("B", "A")
            for point in POINTS:
                for name in order:
                    seen[name, point].append(measure(servers[name], args.size, *point,
                                                     args.duration))
            run.log(f"round {round_ + 1} of {args.rounds} done")
        report(args, seen)
    finally:
        for server in servers.values():
            server.stop()
        run.stop_all()


def report(args, seen):
    """The table: per point, A and B medians (spread) and B / A."""
    print(f"A = {args.a}\nB = {args.b}\n{args.size:,} people + {args.size:,} machines, "
          f"{args.rounds} rounds of {args.duration:g} s per point, in turns\n")
    print("| point | A CPU µs/req | B CPU µs/req | B ÷ A | A req/s | B req/s | B ÷ A |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for kind, connections in POINTS:
        a = seen["A", (kind, connections)]
        b = seen["B", (kind, connections)]
        cpu_a, cpu_b = (statistics.median(c for c, _ in x) for x in (a, b))
        rps_a, rps_b = (statistics.median(r for _, r in x) for x in (a, b))
        spread = lambda x: f"{min(c for c, _ in x):.1f}–{max(c for c, _ in x):.1f}"  # noqa: E731
        print(f"| {kind} C={connections} | {cpu_a:.1f} ({spread(a)}) | {cpu_b:.1f} ({spread(b)})"
              f" | {cpu_b / cpu_a:.2f}× | {rps_a:,.0f} | {rps_b:,.0f} | {rps_b / rps_a:.2f}× |")


if __name__ == "__main__":
    main()
