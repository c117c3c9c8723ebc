#!/usr/bin/env python3
"""pharos scan against nmap -sT on loopback: wall time and the open ports each finds.

    python3 bench/scan.py [--rounds 3]

Starts 40 listeners spread over 127.0.0.0/20 on 20 common ports (each says a greeting and
closes, so banner reads end at once), then times, on the /20 (81,920 probes) and on a
/24: `pharos scan NET --ports P -n --no-mdns --dry-run --json` and
`nmap -n -sT -Pn -T4 -p P NET`.  The open-port sets must be equal.  Loopback only.
"""

import argparse
import ipaddress
import json
import random
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORTS = (21, 22, 23, 25, 53, 80, 110, 111, 135, 139, 143, 443, 445, 993, 995, 1723, 3306,
         3389, 5900, 8080)
# The installed `pharos` command: an entry point that imports the module (its .pyc cached),
# not `python3 pharos.py`, which compiles the whole file on every run.
PHAROS = [sys.executable, "-c", "import sys, pharos; sys.exit(pharos.main(sys.argv[1:]))"]
GREP_OPEN = re.compile(r"(\d+)/open/tcp")


def start_listeners(count, seed=7):
    """``count`` listeners at random 127.0.x.y (x < 16) on PORTS; their (address, port)."""
    rng = random.Random(seed)
    chosen = set()
    while len(chosen) < count:
        host = rng.randrange(1, 4095)
        address = f"127.0.{host >> 8}.{host & 255}"
        chosen.add((address, PORTS[len(chosen) % len(PORTS)]))
    # a few in the first /24, so the /24 run finds some too
    chosen = sorted(chosen)[:count - 4] + [("127.0.0.9", 22), ("127.0.0.9", 80),
                                           ("127.0.0.77", 443), ("127.0.0.200", 3306)]
    selector = selectors.DefaultSelector()
    for address, port in chosen:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(128)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    threading.Thread(target=serve, args=(selector,), daemon=True).start()
    return set(chosen)


def serve(selector):
    """Greet and close every connection."""
    while True:
        for key, _ in selector.select():
            try:
                conn, _ = key.fileobj.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.sendall(b"220 bench ready\r\n")
                except OSError:
                    pass


def timed(argv):
    """(wall seconds, stdout) of one command."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{argv[:3]} failed ({done.returncode}): {done.stderr.strip()}")
    return wall, done.stdout


def pharos_open(net):
    """(wall, open set) of pharos scan."""
    wall, out = timed(PHAROS + ["scan", net, "--ports",
                       ",".join(map(str, PORTS)), "-n", "--no-mdns", "--no-arp", "--dry-run",
                       "--json"])
    return wall, {(r["ip"][0], int(s.split("/")[0])) for r in json.loads(out)
                  for s in r.get("services", [])}


def nmap_open(net):
    """(wall, open set) of nmap -sT."""
    wall, out = timed(["nmap", "-n", "-sT", "-Pn", "-T4", "-p", ",".join(map(str, PORTS)),
                       "-oG", "-", net])
    found = set()
    for line in out.splitlines():
        if line.startswith("Host:") and "Ports:" in line:
            address = line.split()[1]
            found |= {(address, int(p)) for p in GREP_OPEN.findall(line)}
    return wall, found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (best is kept)")
    args = parser.parse_args()
    if not shutil.which("nmap"):
        raise SystemExit("bench/scan.py needs nmap (apt-get install nmap)")
    print(f"open-files limit: soft {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, "
          f"hard {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}")
    started = start_listeners(40)
    for net in ("127.0.0.0/20", "127.0.0.0/24"):
        network = ipaddress.ip_network(net)
        inside = {(a, p) for a, p in started if ipaddress.ip_address(a) in network}
        walls = {"pharos": [], "nmap": []}
        for _ in range(args.rounds):
            for name, run in (("pharos", pharos_open), ("nmap", nmap_open)):
                wall, found = run(net)
                walls[name].append(wall)
                if found != inside:
                    raise SystemExit(f"{name} on {net}: missing {sorted(inside - found)}, "
                                     f"extra {sorted(found - inside)}")
        best = {name: min(w) for name, w in walls.items()}
        probes = network.num_addresses * len(PORTS)
        print(f"{net}: {probes:,} probes, {len(inside)} open; pharos {best['pharos']:.3f} s "
              f"({probes / best['pharos']:,.0f}/s), nmap {best['nmap']:.3f} s; "
              f"ratio pharos/nmap {best['pharos'] / best['nmap']:.2f}  "
              f"(all runs: pharos {', '.join(f'{w:.2f}' for w in walls['pharos'])}; "
              f"nmap {', '.join(f'{w:.2f}' for w in walls['nmap'])})")


if __name__ == "__main__":
    main()
