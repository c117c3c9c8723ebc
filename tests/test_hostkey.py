"""The hostkey field: its one form and its refusals, merge finding a machine by its SSH host
key before anything else, and `pharos scan` fetching host keys from real asyncssh servers on
127.77.8.x (the only addresses scanned here), with and without asyncssh."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import PHAROS, ServerProcess, need
from test_scan import Listener

sys.path.insert(0, str(PHAROS.parent))
import pharos  # noqa: E402

try:
    import asyncssh
    HAVE_ASYNCSSH = True
except ImportError:
    HAVE_ASYNCSSH = False

DIGEST = "LeoukUgI/dn83IUd1HKfsBNMq9xZc5XTGonJvjlY45Y"
KEY = "SHA256:" + DIGEST


# -- the field -----------------------------------------------------------------------

@pytest.mark.parametrize("given", [
    KEY, "ssh-ed25519 " + KEY, "ecdsa-sha2-nistp256 " + KEY, "sha256:" + DIGEST,
    "sk-ssh-ed25519@openssh.com " + KEY, "  ssh-rsa   " + KEY + " ",
])
def test_hostkey_has_one_form(given):
    schema = pharos.Schema()
    assert schema.clean_value(schema.by_name["hostkey"], given) == KEY


@pytest.mark.parametrize("given", [
    "MD5:16:27:ac:a5:76:28:2d:36:63:1b:56:4d:eb:df:a6:48",      # the old MD5 form
    KEY + "=",                                                  # padded
    KEY[:-1],                                                   # 42 characters
    KEY + "A",                                                  # 44
    KEY[:-1] + "Z",         # the last character carries bits past the 32 bytes
    KEY[:-2] + "-_",        # URL-safe base64 is not what OpenSSH prints
    "SHA1:" + DIGEST, DIGEST, "ssh-ed25519", "256 " + KEY + " root@vm (ED25519)",
    "SSH ED25519 " + KEY, KEY + " (ED25519)", "x" * 41 + " " + KEY,
])
def test_hostkey_refuses_anything_else(given):
    schema = pharos.Schema()
    with pytest.raises(pharos.RecordError) as refused:
        schema.clean_value(schema.by_name["hostkey"], given)
    assert "must be an SSH fingerprint like SHA256:<43 base64 characters>" in str(refused.value)


def test_hostkey_is_a_machine_field_matched_whole():
    schema = pharos.Schema()
    field = schema.by_name["hostkey"]
    assert (field.id, field.multi, field.words, field.types) == (32, True, False, {"machine"})
    assert field.properties() == "Indexed Lookup Public Change NoPeople"
    with pytest.raises(pharos.RecordError, match="longer than 96"):
        schema.clean_value(field, "k" * 50 + " " + KEY)
    store = pharos.MemoryStore(schema)
    store.apply(store.plan_add("machine", {"hostname": ["a"], "hostkey": [KEY]}, 0))
    found = lambda text: store.select(pharos.parse_selection(schema, pharos.tokenize(text))[0])
    assert len(found(f"hostkey={KEY}")) == 1
    assert found("hostkey=SHA256") == [] and found(f"hostkey={DIGEST[:20]}") == []


# -- merge's identities --------------------------------------------------------------

def test_identities_go_strongest_first():
    fields = {"hostname": ["nas.local"], "ip": ["10.0.0.5"], "hostkey": [KEY],
              "mac": ["da:a1:19:00:00:01", "00:16:3e:00:00:01"]}
    assert pharos.identities(pharos.Schema(), fields) == [
        ("hostkey", KEY), ("hostname", "nas.local"), ("mac", "00:16:3e:00:00:01"),
        ("ip", "10.0.0.5")]
    fields["hostname"] = ["nas.lan"]
    assert pharos.identities(pharos.Schema(), fields)[-1] == ("hostname", "nas.lan")
    assert [pharos.is_mdns_name(n) for n in ("a.local", "A.LOCAL.", "local", "a.local.lan")] == [
        True, True, False, False]


def test_a_machine_merged_again_by_its_host_key_stays_one_record(tmp_path):
    srv = ServerProcess(tmp_path / "data").start()
    try:
        with srv.client() as c:
            assert c.cmd(f'merge source=scan hostname=ip-10-0-0-7 ip=10.0.0.7 '
                         f'mac=00:16:3e:00:00:01 hostkey="ssh-ed25519 {KEY}"') == \
                ["200:1 entry added."]
            assert c.cmd("merge source=scan hostname=other ip=10.0.0.99 "
                         "mac=00:16:3e:00:00:99") == ["200:1 entry added."]
            # A new address and MAC, a name another record has: the host key decides.
            assert c.cmd(f"merge source=scan hostname=web ip=10.0.0.99 mac=00:16:3e:00:00:02 "
                         f"hostkey={KEY}") == ["200:3 fields changed."]
            assert c.cmd(f"query hostkey={KEY} return hostname ip mac") == [
                "102:There was 1 match to your request.", "-200:1: hostname: web",
                "-200:1:       ip: 10.0.0.99", "-200:1:      mac: 00:16:3e:00:00:02", "200:Ok."]
            assert c.cmd("query type=machine return hostname")[0] == \
                "102:There were 2 matches to your request."
    finally:
        srv.kill()


# -- pharos scan and real SSH servers ------------------------------------------------

class SshServer:
    """A real asyncssh server on ``address``:0 with the host key file ``key``, on its own
    event loop in a thread."""

    def __init__(self, address, key):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        async def start():
            return await asyncssh.create_server(asyncssh.SSHServer, address, 0,
                                                server_host_keys=[str(key)])
        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def host_key(tmp_path):
    """(private key path, its SHA256 fingerprint as `ssh-keygen -lf` prints it)."""
    need(shutil.which("ssh-keygen"), "ssh-keygen")
    need(HAVE_ASYNCSSH, "asyncssh (pip install asyncssh)")
    path = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    shown = subprocess.run(["ssh-keygen", "-lf", f"{path}.pub"], capture_output=True,
                           text=True, check=True)
    return path, shown.stdout.split()[1]


def scan(*args, env=None):
    """`pharos.py scan ARGS -n --no-mdns --timeout 2`: (exit, stdout, stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(PHAROS), "scan", *args, "-n", "--no-mdns",
                           "--timeout", "2"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def test_scan_fetches_the_host_key_ssh_keygen_shows(host_key):
    server = SshServer("127.77.8.2", host_key[0])
    try:
        code, out, err, _ = scan("127.77.8.1-3", "--ports", str(server.port), "--dry-run",
                                 "--json")
    finally:
        server.close()
    assert code == 0, err
    [record] = json.loads(out)
    assert record["ip"] == ["127.77.8.2"] and record["hostkey"] == [host_key[1]]
    assert record["services"] == [f"{server.port}/ssh AsyncSSH_{asyncssh.__version__}"]
    assert "host key" not in err


def test_a_port_that_stalls_costs_the_deadline_and_no_key(host_key):
    """Two SSH ports on one machine: a real server, and one that greets, then says nothing
    more; the scan ends within the machine's deadline and keeps the key it got."""
    server = SshServer("127.77.8.4", host_key[0])

    def stall(conn):
        conn.sendall(b"SSH-2.0-Stall_1.0\r\n")
        while conn.recv(4096):
            pass
    staller = Listener("127.77.8.4", 0, stall)
    try:
        code, out, err, seconds = scan("127.77.8.4", "--ports",
                                       f"{server.port},{staller.sock.getsockname()[1]}",
                                       "--dry-run", "--json")
    finally:
        staller.close()
        server.close()
    assert code == 0, err
    [record] = json.loads(out)
    assert record["hostkey"] == [host_key[1]] and len(record["services"]) == 2
    assert seconds < 2 + 8, seconds         # one --timeout for the keys, not one per try


def test_a_scan_finds_a_moved_machine_by_its_host_key(host_key, tmp_path):
    """A DHCP machine seen at a new address (and no MAC on loopback): one record."""
    srv = ServerProcess(tmp_path / "data").start()
    at = ("--server", f"127.0.0.1:{srv.port}")
    try:
        for address, summary in (("127.77.8.6", "1 added, 0 changed, 0 left alone"),
                                 ("127.77.8.7", "0 added, 1 changed, 0 left alone")):
            server = SshServer(address, host_key[0])
            try:
                code, out, err, _ = scan(address, "--ports", str(server.port), *at)
            finally:
                server.close()
            assert code == 0 and err.splitlines()[-1] == f"pharos: scan: {summary}", err
        with srv.client() as c:
            assert c.cmd("query type=machine return hostname ip hostkey") == [
                "102:There was 1 match to your request.", "-200:1: hostname: ip-127-77-8-7",
                "-200:1:       ip: 127.77.8.7", f"-200:1:  hostkey: {host_key[1]}", "200:Ok."]
    finally:
        srv.kill()


def test_scan_without_asyncssh_says_so_and_still_scans(tmp_path):
    (tmp_path / "asyncssh.py").write_text("raise ImportError('no asyncssh here')\n")
    listener = Listener("127.77.8.9", 0, lambda conn: conn.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n"))
    port = listener.sock.getsockname()[1]
    try:
        code, out, err, _ = scan("127.77.8.9", "--ports", str(port), "--dry-run", "--json",
                                 env={"PYTHONPATH": str(tmp_path)})
    finally:
        listener.close()
    assert code == 0, err
    assert json.loads(out) == [{"type": "machine", "hostname": "ip-127-77-8-9",
                                "ip": ["127.77.8.9"], "services": [f"{port}/ssh OpenSSH_9.2p1"]}]
    assert err.splitlines()[0] == \
        "pharos: scan: SSH host keys skipped (pip install asyncssh adds them)"
    assert sum("asyncssh" in line for line in err.splitlines()) == 1
