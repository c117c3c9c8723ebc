"""Field provenance (record["sources"]) and the merge verb: the rule, every store, restarts,
compaction and the image, old data dirs, tenants and roles, and `pharos scan` writing
through merge against real listeners on 127.79.0.x (the only addresses scanned here)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import PHAROS, ServerProcess, need
from test_scan import Listener as ScanListener

sys.path.insert(0, str(PHAROS.parent))
import pharos  # noqa: E402

SOURCES_LINE = "-200:1:    sources: "


def sources_of(client, hostname):
    """The sources line's text of machine ``hostname`` ('' when every field is manual)."""
    reply = client.cmd(f"query hostname={hostname} return all sources")
    assert reply[-1] == "200:Ok.", reply
    return next((x[len(SOURCES_LINE):] for x in reply if x.startswith(SOURCES_LINE)), "")


# -- the rule, pure ------------------------------------------------------------------

def test_merge_plan_fills_blanks_updates_its_own_and_leaves_manual():
    schema = pharos.Schema()
    old = {"type": "machine", "hostname": "nas", "role": "nas", "ip": ["10.0.0.5"],
           "services": ["22/ssh"], "sources": {"services": "scan", "ip": "pulse"}}
    plan = pharos.merge_plan(schema, old, {"hostname": ["ip-10-0-0-5"], "role": ["web"],
                                           "ip": ["10.0.0.6"], "os": ["Linux"],
                                           "services": ["22/ssh OpenSSH_9.2p1", "80/http"]},
                             "scan")
    assert plan == {"os": ["Linux"], "services": ["22/ssh OpenSSH_9.2p1", "80/http"]}


def test_services_accept_a_detail_after_a_space():
    schema = pharos.Schema()
    field = schema.by_name["services"]
    assert schema.clean_value(field, '443/HTTPS nginx "Home"') == '443/https nginx "Home"'
    with pytest.raises(pharos.RecordError):
        schema.clean_value(field, "ssh OpenSSH")


def test_a_person_takes_a_field_back():
    record = {"type": "machine", "hostname": "a", "ip": ["1.2.3.4"], "os": "x",
              "sources": {"ip": "scan", "os": "scan"}}
    assert pharos.with_sources(dict(record), ["ip"], "manual")["sources"] == {"os": "scan"}
    assert "sources" not in pharos.with_sources(dict(record), ["ip", "os"], "manual")


def test_sources_are_never_indexed():
    store = pharos.MemoryStore(pharos.Schema())
    [(rid, record)] = store.plan_add("machine", {"hostname": ["scanned"]}, 0, source="scan")
    store.apply([(rid, record)])
    assert record["sources"] == {"hostname": "scan"}
    selection, errors = pharos.parse_selection(store.schema, pharos.tokenize("scan"))
    assert not errors and store.select(selection) == []
    with pytest.raises(pharos.UsageError):
        pharos.custom_field("x.ini", 100, "field sources", {}, {"sources"})


# -- every store, restarts, compaction, the image -------------------------------------

def seed(client):
    """A scanned machine a person then edits: role and hostname become manual."""
    assert client.cmd("merge source=scan hostname=ip-10-0-0-7 ip=10.0.0.7 services=22/ssh") == \
        ["200:1 entry added."]
    assert client.cmd("change hostname=ip-10-0-0-7 make hostname=nas role=nas") == \
        ["200:1 entry changed."]


@pytest.mark.parametrize("storage", ["memory", "file"])
def test_provenance_in_each_store(tmp_path, storage):
    srv = ServerProcess(tmp_path / "data", storage=storage).start()
    try:
        with srv.client() as c:
            seed(c)
            assert sources_of(c, "nas") == "ip=scan services=scan"
            assert c.cmd("merge source=scan hostname=ip-10-0-0-7 ip=10.0.0.7 role=web "
                         "services=22/ssh services=80/http") == ["200:1 field changed."]
            assert c.cmd("query hostname=nas return role services") == [
                "102:There was 1 match to your request.", "-200:1:     role: nas",
                "-200:1: services: 22/ssh", "-200:1: services: 80/http", "200:Ok."]
    finally:
        srv.kill()


def test_provenance_survives_restart_compaction_and_the_image(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(data, "--compact-bytes", "4096").start()
    with srv.client() as c:
        seed(c)
        for n in range(60):             # enough journal to compact into a snapshot
            assert c.cmd(f"merge source=scan hostname=h{n} ip=10.1.0.{n}")[0] == \
                "200:1 entry added."
    srv.proc.send_signal(signal.SIGKILL)
    srv.finish()
    assert b'"sources"' in (data / "snapshot.jsonl").read_bytes()
    srv = ServerProcess(data).start()                   # snapshot and journal replayed
    with srv.client() as c:
        assert sources_of(c, "nas") == "ip=scan services=scan"
        assert sources_of(c, "h59") == "hostname=scan ip=scan"
    assert srv.stop()[0] == 0                           # a clean stop writes the image
    assert (data / "snapshot.image").exists()
    srv = ServerProcess(data).start()
    try:
        with srv.client() as c:
            assert sources_of(c, "nas") == "ip=scan services=scan"
            assert c.cmd("merge source=scan hostname=nas role=web")[0] == "200:No change."
    finally:
        srv.kill()


def test_a_data_dir_written_without_sources_reads_as_manual(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = {"type": "machine", "hostname": "old-nas", "ip": ["10.0.0.5"], "role": "nas",
           "services": ["22/ssh"], "source": "scan", "status": "unknown",
           "created": "2024-01-01T00:00:00Z", "modified": "2024-01-01T00:00:00Z"}
    pharos.write_snapshot(str(data), 1, 2, {1: old})
    (data / pharos.journal_name(2)).write_bytes(b"")    # as a clean stop leaves it
    srv = ServerProcess(data).start()
    try:
        with srv.client() as c:
            assert sources_of(c, "old-nas") == ""
            assert c.cmd("merge source=scan hostname=old-nas ip=10.0.0.5 role=web "
                         "services=80/http os=Linux") == ["200:1 field changed."]
            assert sources_of(c, "old-nas") == "os=scan"
    finally:
        srv.kill()


# -- tiers: logins, roles, tenants ------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
    need(shutil.which("ssh-keygen"), "ssh-keygen")
    made = {}
    for name in ("alice", "bob", "rita"):
        path = tmp_path / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(path)], check=True)
        made[name] = path
    return made


def key_server(tmp_path, keys, tier, lines):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    text = ""
    for name, options in lines.items():
        kind, blob = keys[name].with_suffix(".pub").read_text().split()[:2]
        text += f"{name} {options} {kind} {blob}\n"
    (data / "authorized_keys").write_text(text)
    return ServerProcess(data, "--tier", tier, "--login-delay", "0.01").start()


def login(client, alias, key):
    reply = client.cmd(f"login {alias}")
    assert reply[0].startswith("301:"), reply
    signed = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", "pharos", "-f", str(key)],
                            input=reply[0][4:].encode(), capture_output=True, check=True)
    armored = signed.stdout.decode().strip().splitlines()[1:-1]
    assert client.cmd("answer " + "".join(armored)) == [f"200:{alias}:Hi how are you?"]


def test_merge_needs_a_writer(tmp_path, keys):
    srv = key_server(tmp_path, keys, "lab", {"alice": 'role="writer"', "rita": 'role="reader"'})
    try:
        with srv.client() as c:
            assert c.cmd("merge source=scan hostname=x1 ip=10.0.0.1") == \
                ["506:You must be logged in to use this command."]
            login(c, "rita", keys["rita"])
            assert c.cmd("merge source=scan hostname=x1 ip=10.0.0.1") == \
                ["510:You may not merge entries (your key's role is reader)."]
            login(c, "alice", keys["alice"])
            assert c.cmd("merge source=scan hostname=x1 ip=10.0.0.1") == ["200:1 entry added."]
    finally:
        srv.kill()


def test_merge_finds_machines_in_the_callers_tenant_only(tmp_path, keys):
    srv = key_server(tmp_path, keys, "enterprise",
                     {"alice": 'role="writer",tenant="teama"', "bob": 'role="writer",tenant="teamb"'})
    try:
        with srv.client() as a, srv.client() as b:
            login(a, "alice", keys["alice"])
            login(b, "bob", keys["bob"])
            request = "merge source=scan hostname=shared ip=10.0.0.1 mac=00:11:22:33:44:55"
            assert a.cmd(request) == ["200:1 entry added."]
            assert b.cmd(request) == ["200:1 entry added."]    # teama's is not bob's
            assert b.cmd(request) == ["200:No change."]
            assert a.cmd("merge source=scan hostname=moved ip=10.0.0.1 os=Linux") == \
                ["200:2 fields changed."]
            reply = b.cmd("query hostname=shared return hostname os tenant")
            assert reply[1:] == ["-200:1: hostname: shared", "-508:1:       os: Not present in entry.",
                                 "-200:1:   tenant: teamb", "200:Ok."]
    finally:
        srv.kill()


# -- pharos scan through merge -----------------------------------------------------------

def Listener(address, port, greeting):
    """A TCP listener on 127.79.0.x that greets each connection with ``greeting``."""
    return ScanListener(address, port, lambda conn: conn.sendall(greeting))


def scan(server_at, *args, env=None):
    """`pharos.py scan ARGS -n --no-mdns --server SERVER`: (exit, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(PHAROS), "scan", *args, "-n", "--no-mdns",
                           "--timeout", "2", "--server", server_at], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, **(env or {})))
    return done.returncode, done.stdout, done.stderr


def test_a_second_scan_keeps_a_persons_edits_and_updates_its_services(tmp_path):
    ssh = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
    first = [Listener("127.79.0.2", 2222, ssh)]
    srv = ServerProcess(tmp_path / "data").start()
    at = f"127.0.0.1:{srv.port}"
    try:
        code, out, err = scan(at, "127.79.0.2-3", "--ports", "2222,7070", "--json")
        assert code == 0, err
        assert err.splitlines()[-1] == "pharos: scan: 1 added, 0 changed, 0 left alone"
        with srv.client() as c:
            assert c.cmd("change hostname=ip-127-79-0-2 make hostname=pi role=printer") == \
                ["200:1 entry changed."]
        first.append(Listener("127.79.0.2", 7070, b"hello\r\n"))
        code, out, err = scan(at, "127.79.0.2-3", "--ports", "2222,7070", "--dry-run")
        assert code == 0, err
        assert err.splitlines()[-2:] == [
            "pharos: scan: ip-127-79-0-2: 1 field would change: services.",
            "pharos: scan: 0 would be added, 1 would change, 0 would stay as they are"]
        code, out, err = scan(at, "127.79.0.2-3", "--ports", "2222,7070")
        assert code == 0, err
        assert err.splitlines()[-1] == "pharos: scan: 0 added, 1 changed, 0 left alone"
        with srv.client() as c:
            assert c.cmd("query ip=127.79.0.2 return hostname role services sources") == [
                "102:There was 1 match to your request.", "-200:1: hostname: pi",
                "-200:1:     role: printer", "-200:1: services: 2222/ssh OpenSSH_9.2p1",
                "-200:1: services: 7070/tcp hello", "-200:1:  sources: ip=scan services=scan",
                "200:Ok."]
        code, out, err = scan(at, "127.79.0.2", "--ports", "2222,7070")
        assert err.splitlines()[-1] == "pharos: scan: 0 added, 0 changed, 1 left alone"
        shown = subprocess.run([sys.executable, str(PHAROS), "mdb", "show", "pi", "--server", at,
                                "--json"], capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)[0]["sources"] == {"ip": "scan", "services": "scan"}
        shown = subprocess.run([sys.executable, str(PHAROS), "mdb", "show", "pi", "--server", at],
                               capture_output=True, text=True, timeout=60)
        assert "  services  2222/ssh OpenSSH_9.2p1  (scan)" in shown.stdout.splitlines()
        assert "      role  printer" in shown.stdout.splitlines()
    finally:
        for listener in first:
            listener.close()
        srv.kill()


def test_scan_with_no_server_is_one_line_exit_3_and_dry_run_still_prints():
    listener = Listener("127.79.0.4", 2222, b"SSH-2.0-x\r\n")
    with socket.socket() as probe:          # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        free = f"127.0.0.1:{probe.getsockname()[1]}"
    try:
        code, out, err = scan(free, "127.79.0.4", "--ports", "2222")
        assert code == 3 and len(err.splitlines()) == 1, err
        assert err.startswith("pharos: scan: cannot reach 127.0.0.1:"), err
        code, out, err = scan(free, "127.79.0.4", "--ports", "2222", "--dry-run", "--jsonl")
        assert code == 0 and json.loads(out)["hostname"] == "ip-127-79-0-4"
        assert err.startswith("pharos: scan: could not compare with the server: cannot reach")
    finally:
        listener.close()


def test_scan_refused_login_is_one_line_exit_3(tmp_path, keys):
    srv = key_server(tmp_path, keys, "lab", {"alice": 'role="writer"'})
    listener = Listener("127.79.0.5", 2222, b"SSH-2.0-x\r\n")
    try:
        home = tmp_path / "home"
        home.mkdir()
        code, out, err = scan(f"127.0.0.1:{srv.port}", "127.79.0.5", "--ports", "2222", "--as",
                              "alice", "--key", str(keys["bob"]),
                              env={"HOME": str(home), "SSH_AUTH_SOCK": ""})
        assert code == 3 and len(err.splitlines()) == 1, err
        assert err.startswith("pharos: scan: login as alice failed"), err
        code, out, err = scan(f"127.0.0.1:{srv.port}", "127.79.0.5", "--ports", "2222", "--as",
                              "alice", "--key", str(keys["alice"]),
                              env={"HOME": str(home), "SSH_AUTH_SOCK": ""})
        assert code == 0 and err.splitlines()[-1] == "pharos: scan: 1 added, 0 changed, 0 left alone"
    finally:
        listener.close()
        srv.kill()
