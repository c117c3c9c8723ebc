"""ph and mdb log in with an SSH key when the server asks: agent, key file, or a clear error."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import PHAROS, ServerProcess, need, wait_for


@pytest.fixture
def keys(tmp_path):
    need(shutil.which("ssh-keygen") and shutil.which("ssh-agent"), "ssh-keygen and ssh-agent")
    made = {}
    for name in ("alice", "mallory"):
        path = tmp_path / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(path)], check=True)
        made[name] = path
    return made


@pytest.fixture
def agent(tmp_path):
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(sock.exists, what="ssh-agent socket")
    yield str(sock)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def lab_server(tmp_path, keys, tier="lab"):
    data = tmp_path / "data"
    data.mkdir()
    pub = (keys["alice"].with_suffix(".pub")).read_text().split()
    (data / "authorized_keys").write_text(f'alice role="writer" {pub[0]} {pub[1]}\n')
    return ServerProcess(data, "--tier", tier, "--login-delay", "0.01").start()


def ph(server, tmp_path, *args, agent=None, **env):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environment = dict(os.environ, HOME=str(home))
    environment.pop("SSH_AUTH_SOCK", None)
    environment.pop("PHAROS_KEY", None)
    environment.update(env)
    if agent:
        environment["SSH_AUTH_SOCK"] = agent
    return subprocess.run([sys.executable, str(PHAROS), "ph", "--server",
                           f"127.0.0.1:{server.port}", *args], capture_output=True, text=True,
                          env=environment, timeout=60)


def test_write_logs_in_through_the_agent(tmp_path, keys, agent):
    subprocess.run(["ssh-add", "-q", str(keys["mallory"]), str(keys["alice"])], check=True,
                   env=dict(os.environ, SSH_AUTH_SOCK=agent))
    server = lab_server(tmp_path, keys)
    try:
        result = ph(server, tmp_path, "--as", "alice", "add", "alias=jsmith", "name=John Smith",
                    agent=agent)
        assert result.returncode == 0, result.stderr
        assert ph(server, tmp_path, "alias=jsmith", "--json").returncode == 0
    finally:
        server.kill()
    log = (tmp_path / "data" / "audit.log").read_text()
    assert '"user": "alice"' in log and "add alias=jsmith" in log


def test_write_logs_in_with_a_key_file(tmp_path, keys):
    server = lab_server(tmp_path, keys)
    try:
        result = ph(server, tmp_path, "add", "alias=a1", "name=A", PHAROS_USER="alice",
                    PHAROS_KEY=str(keys["alice"]))
        assert result.returncode == 0, result.stderr
        result = ph(server, tmp_path, "--as", "alice", "--key", str(keys["alice"]), "change",
                    "alias=a1", "make", "title=Boss")
        assert result.returncode == 0, result.stderr
    finally:
        server.kill()


def test_a_key_the_server_does_not_know_is_one_clear_line(tmp_path, keys):
    server = lab_server(tmp_path, keys)
    try:
        result = ph(server, tmp_path, "--as", "alice", "--key", str(keys["mallory"]), "add",
                    "alias=x", "name=X")
    finally:
        server.kill()
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1 and "login as alice failed" in result.stderr


def test_no_key_at_all_is_one_clear_line(tmp_path, keys):
    server = lab_server(tmp_path, keys)
    try:
        result = ph(server, tmp_path, "--as", "alice", "add", "alias=x", "name=X")
        reads = ph(server, tmp_path, "nobody")
    finally:
        server.kill()
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1 and "no key was found" in result.stderr
    assert reads.returncode == 1                  # lab: reads need no login


def test_enterprise_reads_log_in_first(tmp_path, keys):
    server = lab_server(tmp_path, keys, tier="enterprise")
    try:
        key = ["--as", "alice", "--key", str(keys["alice"])]
        assert ph(server, tmp_path, *key, "add", "alias=e1", "name=Ent One").returncode == 0
        found = ph(server, tmp_path, *key, "ent", "--json")
        anonymous = ph(server, tmp_path, "ent")
    finally:
        server.kill()
    assert found.returncode == 0 and '"alias": "e1"' in found.stdout
    assert anonymous.returncode == 3 and "no key was found" in anonymous.stderr


def pharos(*args, env=None):
    environment = dict(os.environ, **(env or {}))
    environment.pop("PHAROS_SERVER", None)
    return subprocess.run([sys.executable, str(PHAROS), *args], capture_output=True, text=True,
                          env=environment, timeout=60)


def test_keys_cli_edits_the_local_file(tmp_path, keys):
    data = tmp_path / "data"
    data.mkdir()
    pub = str(keys["alice"].with_suffix(".pub"))
    (data / "authorized_keys").write_text("")
    added = pharos("keys", "add", "--data", str(data), "alice", pub, "--role", "admin")
    assert added.returncode == 0, added.stderr
    listed = pharos("keys", "--data", str(data))
    assert listed.returncode == 0 and "alice" in listed.stdout and "admin" in listed.stdout
    refused = pharos("keys", "add", "--data", str(data), "bob", "not a key")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    removed = pharos("keys", "remove", "alice", "--data", str(data))
    assert removed.returncode == 0 and (data / "authorized_keys").read_text() == ""


def test_keys_cli_over_the_wire_as_admin(tmp_path, keys):
    data = tmp_path / "data"
    data.mkdir()
    pub = keys["alice"].with_suffix(".pub").read_text().split()
    (data / "authorized_keys").write_text(f'alice role="admin" {pub[0]} {pub[1]}\n')
    server = ServerProcess(data, "--tier", "lab", "--login-delay", "0.01").start()
    remote = ["--server", f"127.0.0.1:{server.port}", "--as", "alice", "--key",
              str(keys["alice"])]
    try:
        mallory = str(keys["mallory"].with_suffix(".pub"))
        added = pharos("keys", "add", "mallory", mallory, *remote)
        assert added.returncode == 0, added.stderr
        listed = pharos("keys", "list", *remote)
        assert "mallory" in listed.stdout and "writer" in listed.stdout
        assert pharos("keys", "remove", "mallory", *remote).returncode == 0
        last = pharos("keys", "remove", "alice", *remote)
        assert last.returncode == 3 and "last admin key" in last.stderr
    finally:
        server.kill()
    assert "mallory" not in (data / "authorized_keys").read_text()


def test_audit_lines_lost_in_a_crash_come_back_from_the_journal(tmp_path, keys):
    server = lab_server(tmp_path, keys)
    key = ["--as", "alice", "--key", str(keys["alice"])]
    try:
        for n in range(3):
            assert ph(server, tmp_path, *key, "add", f"alias=c{n}", f"name=C {n}").returncode == 0
    finally:
        server.kill()                                   # a crash: no clean shutdown
    log = tmp_path / "data" / "audit.log"
    lines = log.read_text().splitlines()               # refusals (506 before the login) too
    assert [json.loads(x)["seq"] for x in lines if "seq" in json.loads(x)] == [1, 2, 3]
    cut = [n for n, x in enumerate(lines) if json.loads(x).get("seq") == 2][0]
    log.write_text("".join(x + "\n" for x in lines[:cut]))   # the rest never reached the disk
    again = ServerProcess(tmp_path / "data", "--tier", "lab").start()
    try:
        assert "restored 2 audit log line(s) from the journal" in again.read_stderr()
    finally:
        again.kill()
    restored = log.read_text().splitlines()
    assert restored[:cut] == lines[:cut]
    assert [json.loads(x)["seq"] for x in restored[cut:]] == [2, 3]
    assert [json.loads(x) for x in restored[cut:]] == \
        [json.loads(x) for x in lines if json.loads(x).get("seq") in (2, 3)]
