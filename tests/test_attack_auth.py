"""Attacks on the key list and logins, end to end, each fixed at its root:

* the server (``keys`` over the wire) and ``pharos keys --data`` editing authorized_keys
  at the same moment: every acknowledged add stays added and every acknowledged removal
  stays removed (a read-modify-write under DATA/authorized_keys.lock);
* a tenant admin adds keys only for plain user names no other tenant's line admits, and
  its duplicate check (and the reply) sees only its own tenant's lines;
* a from="..." list with a malformed CIDR block is refused when the line is read;
* ``--key`` naming a file that does not exist says so.

Real ``pharos.py serve`` processes and real ``ssh-keygen`` keys, as in test_auth.py.
"""

import subprocess
import sys
import threading

import pytest

from conftest import PHAROS, ROOT
from test_auth import allowed, by_file, entries, keys, login, make_server, ok_login, serving  # noqa: F401

sys.path.insert(0, str(ROOT))
import pharos  # noqa: E402


def logged(srv, alias, key):
    c = srv.client()
    assert login(c, alias, by_file(key)) == ok_login(alias)
    return c


def names_in(path):
    """The user names of the usable lines of the key list at ``path``."""
    ring = pharos.KeyRing(path.read_text())
    assert ring.warnings == []
    return sorted(e.principals for e in ring.entries)


def cli_keys(data, *words):
    """`pharos keys ... --data DATA` in its own process; (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(PHAROS), "keys", *words, "--data", str(data)],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(data), "SSH_AUTH_SOCK": ""})
    return done.returncode, done.stdout, done.stderr


# --------------------------------------------------------------------------
# 1. Concurrent edits of the key list lose nothing
# --------------------------------------------------------------------------

WIRE, LOCAL = 16, 10        # edits over the wire, and CLI processes run at once


@pytest.fixture
def crowded(keys, tmp_path):
    lines = [allowed("root", keys["root"], 'role="admin",tenant="*"')]
    lines += [allowed(f"w{n}", keys["late"], 'role="reader",tenant="a"') for n in range(WIRE)]
    lines += [allowed(f"c{n}", keys["late"], 'role="reader",tenant="a"') for n in range(LOCAL)]
    yield from serving(make_server(tmp_path, "enterprise", lines))


def wire_edits(srv, keys, replies):
    """As the global admin: remove w0.. and add n0.., one after another, keeping replies."""
    with logged(srv, "root", keys["root"]) as root:
        for n in range(WIRE):
            replies.append((f"w{n}", root.cmd(f"keys remove w{n}")))
            line = allowed(f"n{n}", keys["late"], 'role="reader",tenant="a"')
            replies.append((f"n{n}", root.cmd(f"keys add {line}")))


def local_edits(data, keys):
    """Start LOCAL CLI processes at once: even ones remove cN, odd ones add mN."""
    pub = keys["late"].path.with_suffix(".pub")
    words = [("remove", f"c{n}") if n % 2 == 0 else ("add", f"m{n}", str(pub), "--role", "reader",
                                                      "--tenant", "a") for n in range(LOCAL)]
    procs = [subprocess.Popen([sys.executable, str(PHAROS), "keys", *w, "--data", str(data)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(data), "SSH_AUTH_SOCK": ""})
             for w in words]
    return [(w[1], p.wait(timeout=120), p.communicate()) for w, p in zip(words, procs)]


def test_concurrent_wire_and_cli_edits_lose_nothing(crowded, keys):
    path = crowded.data / "authorized_keys"
    expected = set(names_in(path))
    replies = []
    wire = threading.Thread(target=wire_edits, args=(crowded, keys, replies))
    wire.start()
    local = local_edits(crowded.data, keys)
    wire.join(timeout=120)
    assert not wire.is_alive()
    for name, reply in replies:
        assert reply in (["200:1 key removed."], ["200:Ok."]), (name, reply)
        expected ^= {name}                  # a removal takes the name away, an add brings it
    for name, status, (out, err) in local:
        assert status == 0 and err == "", (name, status, err)
        expected ^= {name}
    assert names_in(path) == sorted(expected)
    assert not list(crowded.data.glob("authorized_keys*.tmp"))
    with logged(crowded, "root", keys["root"]) as root:
        listed = sorted(e["user"] for e in entries(root.cmd("keys list")).values())
    assert listed == sorted(expected)
    with crowded.client() as c:         # a removed name stays removed for logins too
        assert login(c, "c0", by_file(keys["late"])) == ["500:Login failed."]


def test_edit_rereads_under_the_lock(keys, tmp_path):
    """A KeyFile's edit works from the file as it is, not from the ring it loaded before."""
    path = tmp_path / "authorized_keys"
    path.write_text(allowed("one", keys["late"]) + "\n")
    server_side = pharos.KeyFile(str(path), log=lambda m: None, fast=False)
    server_side.reload()
    assert cli_keys(tmp_path, "add", "two", str(keys["late"].path) + ".pub")[0] == 0
    server_side.edit(lambda ring: (ring.lines + [allowed("three", keys["late"])], None))
    assert names_in(path) == ["one", "three", "two"]
    assert sorted(e.principals for e in server_side.ring.entries) == ["one", "three", "two"]
    assert (tmp_path / "authorized_keys.lock").exists()


# --------------------------------------------------------------------------
# 2. A tenant admin names only plain users of its own tenant
# --------------------------------------------------------------------------

def tenant_key_lines(keys):
    return [
        allowed("adminA", keys["aa"], 'role="admin",tenant="teama"'),
        allowed("adminB", keys["tb"], 'role="admin",tenant="teamb"'),
        allowed("root", keys["root"], 'role="admin",tenant="*"'),
    ]


@pytest.fixture
def tenants(keys, tmp_path):
    yield from serving(make_server(tmp_path, "enterprise", tenant_key_lines(keys)))


@pytest.mark.parametrize("principals", ["*", "x19,root", "*,!adminA", "a?", "!root", "root",
                                        "adminB"])
def test_tenant_admin_cannot_mint_other_names(tenants, keys, principals):
    path = tenants.data / "authorized_keys"
    before = path.read_text()
    with logged(tenants, "adminA", keys["aa"]) as aa:
        reply = aa.cmd(f'keys add {principals} role="reader",tenant="teama" '
                       f'{keys["late"].material()} late@test')
    assert len(reply) == 1 and reply[0].startswith("510:"), reply
    assert path.read_text() == before
    with tenants.client() as c:
        for alias in ("root", "adminB", "zzz"):
            assert login(c, alias, by_file(keys["late"])) == ["500:Login failed."]


def test_tenant_duplicate_check_sees_only_its_tenant(tenants, keys):
    with logged(tenants, "adminA", keys["aa"]) as aa:
        reply = aa.cmd(f'keys add root role="reader" {keys["root"].material()} x')
        assert reply[0].startswith("510:") and "already listed" not in reply[0], reply
        assert aa.cmd(f'keys add plain role="reader" {keys["late"].material()} x') == ["200:Ok."]
        assert aa.cmd(f'keys add plain role="reader" {keys["late"].material()} y') == \
            ["509:That key is already listed for plain."]
    with logged(tenants, "adminB", keys["tb"]) as bb:     # another tenant: not a duplicate
        reply = bb.cmd(f'keys add plain role="reader" {keys["late"].material()} z')
        assert reply[0].startswith("510:") and "teama" not in reply[0], reply
    with tenants.client() as c:
        assert login(c, "plain", by_file(keys["late"])) == ok_login("plain")


def test_global_admin_may_still_add_patterns(tenants, keys):
    with logged(tenants, "root", keys["root"]) as root:
        line = allowed("ops-*,!ops-x", keys["late"], 'role="reader",tenant="teama"')
        assert root.cmd(f"keys add {line}") == ["200:Ok."]
    with tenants.client() as c:
        assert login(c, "ops-1", by_file(keys["late"])) == ok_login("ops-1")


def test_principal_refusal_rules(keys):
    mine = pharos.parse_key_line(allowed("bob", keys["late"], 'tenant="a"'))
    other = pharos.parse_key_line(allowed("b*", keys["root"], 'tenant="b"'))
    assert pharos.principal_refusal(None, mine, [other]) is None
    assert "another tenant" in pharos.principal_refusal("a", mine, [other])
    assert pharos.principal_refusal("a", mine, [mine]) is None


# --------------------------------------------------------------------------
# 3. from="..." is checked when the line is read
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["127.0.0.1/33", "10.0.0.0/x", "::1/129", "1.2.3.4/8/8", "",
                                   "a b", "!300.0.0.0/8", "host,"])
def test_bad_from_refused(keys, value):
    with pytest.raises(pharos.SSHFormatError, match="from: "):
        pharos.parse_key_line(allowed("x", keys["late"], f'from="{value}"'))


@pytest.mark.parametrize("value", ["127.0.0.1", "10.0.0.0/8", "10.1.2.3/8", "*.example.com",
                                   "!192.168.1.?,192.168.1.*", "::1", "fe80::/10", "host-1"])
def test_good_from_accepted(keys, value):
    entry = pharos.parse_key_line(allowed("x", keys["late"], f'from="{value}"'))
    assert entry.options["from"] == value


def test_bad_cidr_refused_over_the_wire(tenants, keys):
    path = tenants.data / "authorized_keys"
    with logged(tenants, "root", keys["root"]) as root:
        reply = root.cmd("keys add " + allowed("x", keys["late"], 'from="127.0.0.1/33"'))
    assert reply == ["512:Illegal key line: from: '127.0.0.1/33' is not a CIDR block."]
    assert "127.0.0.1/33" not in path.read_text()


# --------------------------------------------------------------------------
# 4. --key naming a missing file
# --------------------------------------------------------------------------

def test_missing_key_file_named(tenants, tmp_path):
    done = subprocess.run([sys.executable, str(PHAROS), "ph", "--server", f"127.0.0.1:{tenants.port}",
                           "--key", str(tmp_path / "nonexistent"), "alias=x"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SSH_AUTH_SOCK": ""})
    assert done.returncode == 2, done
    assert done.stderr.strip().splitlines() == [
        f"pharos: --key {tmp_path / 'nonexistent'}: no such file"], done.stderr
