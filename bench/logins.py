#!/usr/bin/env python3
"""Logins per second, and what a logged-in write costs over an anonymous one.

    python3 bench/logins.py [--seconds 5]

Starts real servers on loopback: a lab-tier server with an ed25519 key (pure-Python
verification, then asyncssh's when it is installed), and a dev-tier server for the
anonymous baseline. Signatures come from a real ssh-agent started here, so signing costs
the same in every run; the server's CPU time per login is read from /proc.
"""

import argparse
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pharos  # noqa: E402


def start_server(data, *args):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pharos.py"), "serve",
                             "--data", data, "--listen", "127.0.0.1:0", "--metrics", "off",
                             *args], stderr=subprocess.PIPE)
    seen = b""
    while True:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            raise SystemExit(f"server did not start: {seen.decode(errors='replace')}")
        seen += chunk
        match = re.search(rb"Ph listening on 127\.0\.0\.1:(\d+)", seen)
        if match:
            return proc, int(match.group(1))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rwb")

    def cmd(self, text):
        self.file.write(text.encode() + b"\n")
        self.file.flush()
        while True:
            reply = self.file.readline().decode()
            if not reply.startswith("-") and (int(reply[:3]) >= 200 or reply.startswith("301")):
                return reply.rstrip("\n")


def measure(pid, seconds, step):
    """(operations per second, server CPU microseconds per operation)."""
    done, started, cpu0 = 0, time.perf_counter(), cpu_seconds(pid)
    while time.perf_counter() - started < seconds:
        step(done)
        done += 1
    elapsed = time.perf_counter() - started
    return done / elapsed, (cpu_seconds(pid) - cpu0) / done * 1e6


def bench_logins(tmp, agent, blob, seconds, crypto):
    proc, port = start_server(os.path.join(tmp, f"lab-{crypto}"), "--tier", "lab",
                              "--crypto", crypto)
    try:
        conn = Conn(port)

        def login(_):
            challenge = conn.cmd("login bench")[4:]
            signature = base64.b64encode(agent.sshsig(blob, challenge.encode())).decode()
            reply = conn.cmd("answer " + signature)
            assert reply == "200:bench:Hi how are you?", reply
        login(0)
        return measure(proc.pid, seconds, login)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def bench_writes(tmp, seconds, tier, agent=None, blob=None):
    proc, port = start_server(os.path.join(tmp, f"writes-{tier}"), "--tier", tier,
                              "--storage", "file")
    try:
        conn = Conn(port)
        if agent is not None:
            challenge = conn.cmd("login bench")[4:]
            signature = base64.b64encode(agent.sshsig(blob, challenge.encode())).decode()
            assert conn.cmd("answer " + signature).startswith("200:")

        def add(n):
            reply = conn.cmd(f"add alias=w{n} name=\"Writer {n}\"")
            assert reply == "200:Ok.", reply
        return measure(proc.pid, seconds, add)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not (shutil.which("ssh-agent") and shutil.which("ssh-keygen")):
        raise SystemExit("needs ssh-agent and ssh-keygen (Debian openssh-client)")
    tmp = tempfile.mkdtemp(prefix="pharos-bench-logins-")
    key = os.path.join(tmp, "id_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key, "-C", "bench"],
                   check=True)
    sock = os.path.join(tmp, "agent.sock")
    agent_proc = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        subprocess.run(["ssh-add", "-q", key], check=True, env=dict(os.environ, SSH_AUTH_SOCK=sock))
        pub = open(key + ".pub").read().split()
        for name in ("lab-pure", "lab-auto", "writes-lab", "writes-dev"):
            os.makedirs(os.path.join(tmp, name))
            with open(os.path.join(tmp, name, "authorized_keys"), "w") as f:
                f.write(f'bench role="admin" {pub[0]} {pub[1]}\n')
        agent = pharos.AgentClient(sock)
        blob = base64.b64decode(pub[1])
        rows = [("login, ed25519, pure Python",) + bench_logins(tmp, agent, blob, args.seconds,
                                                                "pure")]
        import importlib.util
        if importlib.util.find_spec("asyncssh"):
            rows.append(("login, ed25519, asyncssh",) + bench_logins(tmp, agent, blob,
                                                                     args.seconds, "auto"))
        else:
            rows.append(("login, ed25519, asyncssh (not installed)", 0.0, 0.0))
        anon = bench_writes(tmp, args.seconds, "dev")
        logged = bench_writes(tmp, args.seconds, "lab", agent, blob)
        rows += [("add, dev tier, anonymous",) + anon, ("add, lab tier, logged in",) + logged]
        print(f"{'operation':<42} {'per second':>11} {'server CPU us/op':>17}")
        for name, rate, cpu in rows:
            print(f"{name:<42} {rate:>11.0f} {cpu:>17.0f}")
        print(f"logged-in write / anonymous write, server CPU: {logged[1] / anon[1]:.2f}x; "
              f"throughput: {logged[0] / anon[0]:.2f}x")
    finally:
        agent_proc.send_signal(signal.SIGTERM)
        agent_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
