"""pharos scan's mDNS browsing: the pure pieces, and real scans that hear a real zeroconf
publisher.  Every multicast packet stays inside a network namespace made here, whose only
interface is its own loopback; the scans run in it too."""

import json
import os
import secrets
import select
import shutil
import subprocess
import sys

import pytest

from conftest import PHAROS, need

sys.path.insert(0, str(PHAROS.parent))
import pharos  # noqa: E402

try:
    import zeroconf  # noqa: F401
    HAVE_ZEROCONF = True
except ImportError:
    HAVE_ZEROCONF = False

# Listens on 127.0.0.1:0, says its port, closes each connection, until stdin closes.
LISTENER = """
import socket, sys, threading
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
def serve():
    while True:
        s.accept()[0].close()
threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
"""

# Registers the services of argv[1] (JSON; addresses separated by spaces), says ready,
# unregisters when stdin closes.
PUBLISHER = """
import json, socket, sys
from zeroconf import IPVersion, ServiceInfo, Zeroconf
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
def packed(address):
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
infos = [ServiceInfo(kind, name, addresses=[packed(a) for a in address.split()], port=port,
                     properties=txt, server=server)
         for kind, name, server, address, port, txt in json.loads(sys.argv[1])]
for info in infos:
    zc.register_service(info)
print("ready", flush=True)
sys.stdin.read()
for info in infos:
    zc.unregister_service(info)
zc.close()
"""


# -- pure pieces ---------------------------------------------------------------------

@pytest.mark.parametrize("server, name", [
    ("testnas.local.", "testnas.local"), ("TestNAS.LOCAL", "TestNAS.local"),
    ("nas.lab.local.", "nas.lab.local"), ("nas.example.org.", "nas.example.org"),
    ("bad name.local.", None), ("", None), (None, None), ("x" * 64 + ".local.", None),
    ("x" * 63 + ".local.", "x" * 63 + ".local"), ("evil\x1b[31m.local.", None),
])
def test_mdns_host_name(server, name):
    assert pharos.mdns_host_name(server) == name


def test_mdns_entry_takes_service_model_and_vendor():
    entry = pharos.mdns_entry("_http._tcp.local.", "testnas.local.", ["127.0.0.1", "nonsense"],
                              5000, {b"md": b"DS920+", b"vendor": b"Synology", b"ty": b"other"})
    assert entry == {"name": "testnas.local", "ip": ["127.0.0.1"], "service": "5000/http",
                     "model": "DS920+", "vendor": "Synology"}


def test_mdns_entry_cleans_and_caps_what_the_network_says():
    entry = pharos.mdns_entry("_ipp._tcp.local.", "printer.local.", ["127.0.0.3"] * 40, 631,
                              {b"ty": b"Laser\x1b[2J\x00Jet " + b"9" * 300, b"md": None,
                               b"manufacturer": b"\x07"})
    assert entry["model"] == ("Laser [2J Jet " + "9" * 300)[:64]
    assert entry["vendor"] is None and entry["ip"] == ["127.0.0.3"]


@pytest.mark.parametrize("kind", ["_http._tcp.local", "_http._sctp.local.", "http._tcp.local.",
                                  "_" + "a" * 16 + "._tcp.local.", "_h\x00._tcp.local."])
def test_mdns_entry_refuses_bad_service_types(kind):
    assert pharos.mdns_entry(kind, "nas.local.", ["127.0.0.1"], 80, {}) is None


def test_merge_mdns_keeps_only_the_targets_and_merges_by_address():
    pairs = [(pharos.ipaddress.ip_address(f"127.0.0.{n}"), None) for n in range(1, 5)]
    found = [{"address": "127.0.0.1", "ip": ["127.0.0.1"], "name": None, "mac": None,
              "services": ["22/ssh OpenSSH_9.2p1", "8080/tcp"]}]
    entries = [
        pharos.mdns_entry("_http._tcp.local.", "nas.local.", ["127.0.0.1"], 8080,
                          {b"md": b"DS920+"}),
        pharos.mdns_entry("_ssh._tcp.local.", "nas.local.", ["127.0.0.1"], 22, {}),
        pharos.mdns_entry("_smb._tcp.local.", "nas.local.", ["127.0.0.1"], 445, {}),
        pharos.mdns_entry("_ipp._tcp.local.", "printer.local.", ["127.0.0.3"], 631, {}),
        pharos.mdns_entry("_http._tcp.local.", "outside.local.", ["10.9.9.9"], 80, {}),
    ]
    pharos.merge_mdns(found, entries, pairs)
    assert [(h["address"], h["name"], h["services"], h.get("model")) for h in found] == [
        ("127.0.0.1", "nas.local", ["22/ssh OpenSSH_9.2p1", "445/smb", "8080/http"], "DS920+"),
        ("127.0.0.3", "printer.local", ["631/ipp"], None)]
    records = pharos.scan_records(found)
    assert records[0]["hostname"] == "nas.local" and records[0]["model"] == "DS920+"
    assert records[1] == {"type": pharos.MACHINE, "hostname": "printer.local", "ip": ["127.0.0.3"],
                          "services": ["631/ipp"]}


def test_merge_mdns_leaves_a_given_name_alone():
    pairs = [(pharos.ipaddress.ip_address("127.0.0.1"), "nas.lan")]
    found = [{"address": "127.0.0.1", "ip": ["127.0.0.1"], "name": "nas.lan", "mac": None,
              "services": []}]
    entry = pharos.mdns_entry("_ssh._tcp.local.", "other.local.", ["127.0.0.1"], 22, {})
    assert pharos.merge_mdns(found, [entry], pairs)[0]["name"] == "nas.lan"


# -- real scans in a network namespace -----------------------------------------------

def need_netns():
    """Skip (fail in CI) without root and `ip netns`."""
    need(os.geteuid() == 0 and shutil.which("ip"), "root and ip netns (iproute2)")


def ip(*args):
    """Run `ip ARGS`, failing the test with its stderr when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


@pytest.fixture
def netns():
    """A new network namespace whose loopback is up and carries multicast; deleted after."""
    need_netns()
    name = f"pharos-mdns-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "set", "lo", "multicast", "on")
        ip("-n", name, "route", "add", "224.0.0.0/4", "dev", "lo")
        yield name
    finally:
        ip("netns", "del", name)


@pytest.fixture
def started():
    """Start processes (closing stdin asks them to stop); every one is stopped by pid after."""
    procs = []

    def start(argv):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def first_line(proc, timeout=20):
    """The first line a started process prints, within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line from {proc.args[:4]} in {timeout}s"
    line = proc.stdout.readline().strip()
    assert line, f"{proc.args[:4]} ended: {proc.stderr.read()}"
    return line


def in_netns(ns, *argv):
    """An argv that runs ``argv`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def scan_in(ns, *args, env=None):
    """`pharos.py scan ARGS -n --dry-run --json` inside ``ns``: (exit, records, stderr)."""
    done = subprocess.run(in_netns(ns, sys.executable, str(PHAROS), "scan", *args, "-n",
                                   "--dry-run", "--json"),
                          capture_output=True, text=True, timeout=60, env=env)
    return done.returncode, json.loads(done.stdout or "[]"), done.stderr


def listener_port(ns, started):
    """The port of a TCP listener on 127.0.0.1 inside ``ns``."""
    return int(first_line(started(in_netns(ns, sys.executable, "-c", LISTENER))))


def test_scan_hears_a_published_service(netns, started):
    need(HAVE_ZEROCONF, "zeroconf (pip install zeroconf)")
    port = listener_port(netns, started)
    services = [
        ["_http._tcp.local.", "Test NAS._http._tcp.local.", "testnas.local.", "127.0.0.1", port,
         {"md": "DS920+"}],
        ["_ssh._tcp.local.", "Test NAS._ssh._tcp.local.", "testnas.local.", "127.0.0.1", 22,
         {"vendor": "Acme\x1b[31m\x00 " + "v" * 200}],
        ["_ipp._tcp.local.", "Printer._ipp._tcp.local.", "printer.local.", "127.0.0.3", 631, {}],
        ["_http._tcp.local.", "Elsewhere._http._tcp.local.", "outside.local.", "127.0.0.9", 80,
         {}],
        ["_pharostest._tcp.local.", "Odd._pharostest._tcp.local.", "oddbox.local.",
         "127.0.0.4", 7000, {}],
    ]
    assert first_line(started(in_netns(netns, sys.executable, "-c", PUBLISHER,
                                       json.dumps(services)))) == "ready"
    code, records, err = scan_in(netns, "127.0.0.0/29", "--ports", str(port),
                                 "--mdns-seconds", "4")
    assert code == 0, err
    by_name = {r["hostname"]: r for r in records}
    assert set(by_name) == {"testnas.local", "printer.local", "oddbox.local"}, records
    nas = by_name["testnas.local"]
    assert nas["ip"] == ["127.0.0.1"] and nas["model"] == "DS920+"
    assert nas["services"] == ["22/ssh", f"{port}/http"]
    assert nas["vendor"] == ("Acme [31m " + "v" * 200)[:64]
    assert by_name["printer.local"]["services"] == ["631/ipp"]
    # A type only the DNS-SD enumeration names.
    assert by_name["oddbox.local"]["services"] == ["7000/pharostest"]
    assert "mDNS" not in err


def test_scan_keeps_the_ipv6_addresses_mdns_gives_inside_ipv6_targets(netns, started):
    need(HAVE_ZEROCONF, "zeroconf (pip install zeroconf)")
    services = [["_ssh._tcp.local.", "Six._ssh._tcp.local.", "sixbox.local.", "127.0.0.5 ::1",
                 22, {}]]
    assert first_line(started(in_netns(netns, sys.executable, "-c", PUBLISHER,
                                       json.dumps(services)))) == "ready"
    code, records, err = scan_in(netns, "127.0.0.5", "::1", "--ports", "9",
                                 "--mdns-seconds", "4")
    assert code == 0, err
    assert records == [{"type": "machine", "hostname": "sixbox.local",
                        "ip": ["127.0.0.5", "::1"], "services": ["22/ssh"]}]
    # An address outside the targets is not taken, IPv6 or not.
    code, records, err = scan_in(netns, "127.0.0.5", "--ports", "9", "--mdns-seconds", "4")
    assert code == 0, err
    assert [r["ip"] for r in records] == [["127.0.0.5"]]


def test_scan_without_zeroconf_says_so_and_still_scans(netns, started, tmp_path):
    (tmp_path / "zeroconf.py").write_text("raise ImportError('no zeroconf here')\n")
    port = listener_port(netns, started)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code, records, err = scan_in(netns, "127.0.0.1", "--ports", str(port), env=env)
    assert code == 0, err
    assert [(r["hostname"], r["services"]) for r in records] == [
        ("ip-127-0-0-1", [f"{port}/tcp"])]
    assert err.splitlines()[0] == "pharos: scan: mDNS skipped (pip install zeroconf adds it)"
    assert sum("zeroconf" in line for line in err.splitlines()) == 1


def test_mdns_seconds_has_a_limit():
    done = subprocess.run([sys.executable, str(PHAROS), "scan", "127.0.0.1", "-n", "--no-mdns",
                           "--mdns-seconds", "61", "--dry-run"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr == "pharos: scan: --mdns-seconds 61 is more than 60\n"


def test_a_failed_browse_is_one_note_and_no_entries():
    need(HAVE_ZEROCONF, "zeroconf (pip install zeroconf)")
    from concurrent.futures import Future
    heard, notes = Future(), []
    heard.set_exception(OSError(19, "No such device\x1b[2J"))
    assert pharos.mdns_heard(heard, zeroconf, notes.append) == []
    assert notes == ["mDNS browsing failed: [Errno 19] No such device [2J"]
