"""`serve --ldap-keys`: OpenSSH-LPK keys in a real slapd log in as their uid, with the role
group membership gives and the tenant of the entry's place; removals in the directory take
effect within the freshness deadline; authorized_keys keeps working beside them."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PHAROS, ServerProcess, need, wait_for
from ldap_fixture import ROOTDN, ROOTPW, SUFFIX, Slapd, need_slapd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pharos  # noqa: E402

PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
WRITERS = f"cn=writers,{GROUPS}"
ADMINS = f"cn=admins,{GROUPS}"
ACME = f"ou=people,ou=acme,ou=tenants,{SUFFIX}"
DEADLINE = 2.0                  # seconds a change in the directory may take to count
NAMES = ("alice", "bob", "carol", "dave", "erin")


@pytest.fixture
def keys(tmp_path):
    need(shutil.which("ssh-keygen"), "ssh-keygen")
    made = {}
    for name in NAMES:
        path = tmp_path / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@laptop",
                        "-f", str(path)], check=True)
        made[name] = path
    return made


def pub(keys, name):
    return keys[name].with_suffix(".pub").read_text().strip()


def person(dn, uid, *key_lines):
    text = (f"dn: {dn}\nobjectClass: inetOrgPerson\nobjectClass: ldapPublicKey\n"
            f"uid: {uid}\ncn: {uid.title()}\nsn: {uid.title()}\n")
    return text + "".join(f"sshPublicKey: {line}\n" for line in key_lines) + "\n"


def fill(slapd, keys):
    """alice a writer (groupOfNames), carol an admin (groupOfUniqueNames), bob in no
    group with two bad values beside his key, dave a writer of tenant acme."""
    ous = [f"ou=people,{SUFFIX}", f"ou=groups,{SUFFIX}", f"ou=tenants,{SUFFIX}",
           f"ou=acme,ou=tenants,{SUFFIX}", ACME]
    ldif = "".join(f"dn: {dn}\nobjectClass: organizationalUnit\nou: {dn[3:].split(',')[0]}\n\n"
                   for dn in ous)
    ldif += person(f"uid=alice,{PEOPLE}", "alice", pub(keys, "alice"))
    ldif += person(f"uid=bob,{PEOPLE}", "bob", "ssh-ed25519 not-base64 bad",
                   f'role="admin" {pub(keys, "bob")}', pub(keys, "bob"))
    ldif += person(f"uid=carol,{PEOPLE}", "carol", pub(keys, "carol"))
    ldif += person(f"uid=dave,{ACME}", "dave", pub(keys, "dave"))
    ldif += (f"dn: {WRITERS}\nobjectClass: groupOfNames\ncn: writers\n"
             f"member: uid=alice,{PEOPLE}\nmember: uid=dave,{ACME}\n\n")
    ldif += (f"dn: {ADMINS}\nobjectClass: groupOfUniqueNames\ncn: admins\n"
             f"uniqueMember: uid=carol,{PEOPLE}\n\n")
    slapd.ldap("ldapadd", input=ldif)


@pytest.fixture
def slapd(tmp_path, keys):
    need_slapd()
    server = Slapd(tmp_path / "slapd").start()
    fill(server, keys)
    yield server
    server.stop()


def key_server(slapd, tmp_path, keys, tier="enterprise", file_lines=""):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "authorized_keys").write_text(file_lines)
    return ServerProcess(data, "--tier", tier, "--login-delay", "0.01", "--ldap-bind-dn",
                         ROOTDN, "--ldap-keys", "--ldap-admin-group", ADMINS,
                         "--ldap-writer-group", WRITERS, storage=f"{slapd.url}/{SUFFIX}",
                         env={"PHAROS_LDAP_PASSWORD": ROOTPW}).start()


@pytest.fixture
def srv(slapd, tmp_path, keys):
    server = key_server(slapd, tmp_path, keys)
    yield server
    server.kill()


def ph(server, tmp_path, name, keys, *args):
    """The ph CLI logging in as ``name`` with its key file."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home))
    for var in ("SSH_AUTH_SOCK", "PHAROS_KEY", "PHAROS_SERVER"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(PHAROS), "ph", "--server",
                           f"127.0.0.1:{server.port}", "--as", name, "--key", str(keys[name]),
                           *args], capture_output=True, text=True, env=env, timeout=60)


def keys_cli(server, name, keys, *args):
    return subprocess.run([sys.executable, str(PHAROS), "keys", *args, "--server",
                           f"127.0.0.1:{server.port}", "--as", name, "--key", str(keys[name])],
                          capture_output=True, text=True, timeout=60)


def login(client, alias, key):
    reply = client.cmd(f"login {alias}")
    assert reply[0].startswith("301:"), reply
    signed = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", "pharos", "-f", str(key)],
                            input=reply[0][4:].encode(), capture_output=True, check=True)
    armored = signed.stdout.decode().strip().splitlines()[1:-1]
    return client.cmd("answer " + "".join(armored))


def test_a_key_in_the_writer_group_adds_one_in_no_group_reads_only(srv, tmp_path, keys):
    added = ph(srv, tmp_path, "alice", keys, "add", "alias=new1", "name=New One")
    assert added.returncode == 0, added.stderr
    refused = ph(srv, tmp_path, "bob", keys, "add", "alias=new2", "name=New Two")
    assert refused.returncode != 0 and "role is reader" in refused.stderr, refused.stderr
    found = ph(srv, tmp_path, "bob", keys, "alias=new1", "--json")   # enterprise: reads log in
    assert found.returncode == 0 and '"alias": "new1"' in found.stdout, found.stderr
    with srv.client() as c:
        assert login(c, "bob", keys["alice"]) == ["500:Login failed."]   # a key is its uid's
        assert login(c, "alice", keys["alice"]) == ["200:alice:Hi how are you?"]


def test_the_admin_group_manages_keys_and_tenants_come_from_the_place(srv, tmp_path, keys):
    listed = keys_cli(srv, "carol", keys, "list")
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout and "admin" in listed.stdout
    assert f"(uid=carol,{PEOPLE})" in listed.stdout     # where each key came from
    assert "dave" not in listed.stdout          # carol administers tenant "", not acme
    assert keys_cli(srv, "alice", keys, "list").returncode != 0          # a writer may not
    assert ph(srv, tmp_path, "dave", keys, "add", "alias=acme1", "name=Acme One").returncode == 0
    with srv.client() as c:
        assert login(c, "alice", keys["alice"])[-1].endswith("Hi how are you?")
        assert c.cmd("query alias=acme1 return alias")[-1].startswith("501")  # not her tenant
        assert login(c, "dave", keys["dave"])[-1].endswith("Hi how are you?")
        assert "acme1" in "".join(c.cmd("query alias=acme1 return alias tenant"))
        assert "acme" in "".join(c.cmd("query alias=acme1 return tenant"))


def test_bad_values_are_skipped_with_a_line_each_not_fatal(srv, tmp_path, keys):
    log = srv.read_stderr()
    assert "uid=bob" in log and "value 1: key data is not base64; value skipped" in log, log
    assert "value 2: role and tenant come from the groups" in log
    assert "2 SSH key(s)" not in log and "5 SSH key(s)" not in log
    with srv.client() as c:                    # bob's third value, a good key, still works
        assert login(c, "bob", keys["bob"]) == ["200:bob:Hi how are you?"]
        assert c.cmd("add alias=x name=X")[-1].startswith("511")


def test_a_removed_key_fails_the_next_login_and_logs_a_session_out_in_time(srv, slapd, keys):
    with srv.client() as c:
        assert login(c, "alice", keys["alice"])[-1].endswith("Hi how are you?")
        assert c.cmd("add alias=before name=Before")[-1] == "200:Ok."
        slapd.modify(f"dn: uid=alice,{PEOPLE}\nchangetype: modify\ndelete: sshPublicKey\n")
        removed = time.monotonic()
        wait_for(lambda: c.cmd("add alias=after name=After")[-1].startswith("506"),
                 timeout=DEADLINE, interval=0.05, what="the session to lose the removed key")
        took = time.monotonic() - removed
    with srv.client() as c:
        assert login(c, "alice", keys["alice"]) == ["500:Login failed."]
    assert took < DEADLINE
    print(f"key removal took effect after {took:.2f} s")


def test_a_member_dropped_from_the_group_loses_writes_and_one_added_gains_them(
        srv, slapd, tmp_path, keys):
    with srv.client() as c:
        assert login(c, "alice", keys["alice"])[-1].endswith("Hi how are you?")
        assert c.cmd("add alias=w0 name=W")[-1] == "200:Ok."
        slapd.modify(f"dn: {WRITERS}\nchangetype: modify\ndelete: member\n"
                     f"member: uid=alice,{PEOPLE}\n")
        wait_for(lambda: c.cmd("add alias=w1 name=W")[-1].startswith("511"),
                 timeout=DEADLINE, interval=0.05, what="alice to lose the writer role")
        assert c.cmd("query alias=w0 return alias")[-1] == "200:Ok."     # she still reads
    slapd.modify(f"dn: {WRITERS}\nchangetype: modify\nadd: member\nmember: uid=bob,{PEOPLE}\n")
    wait_for(lambda: ph(srv, tmp_path, "bob", keys, "add", "alias=b1", "name=B").returncode == 0,
             timeout=DEADLINE + 5, interval=0.1, what="bob to become a writer")


def test_while_the_directory_is_away_the_keys_read_last_stay_in_use(srv, slapd, keys):
    slapd.stop()
    try:
        wait_for(lambda: "ldap keys: cannot read the directory" in srv.read_stderr(),
                 timeout=10, interval=0.05, what="the key list to notice")
        with srv.client() as c:
            assert login(c, "alice", keys["alice"]) == ["200:alice:Hi how are you?"]
    finally:
        slapd.start()
    wait_for(lambda: "ldap keys: the directory answers again" in srv.read_stderr(),
             timeout=15, interval=0.05, what="the key list to read the directory again")


def test_authorized_keys_work_beside_and_win_for_a_key_in_both(slapd, tmp_path, keys):
    # bob is a reader in the directory and a writer in the file: the file's line is used
    lines = (f'erin role="writer" {pub(keys, "erin")}\n'
             f'bob role="writer" {pub(keys, "bob")}\n')
    server = key_server(slapd, tmp_path, keys, file_lines=lines)
    try:
        assert ph(server, tmp_path, "erin", keys, "add", "alias=e1", "name=E").returncode == 0
        assert ph(server, tmp_path, "bob", keys, "add", "alias=b2", "name=B").returncode == 0
        assert ph(server, tmp_path, "alice", keys, "add", "alias=a2", "name=A").returncode == 0
    finally:
        server.kill()


def test_the_lab_tier_lets_a_directory_writer_write(slapd, tmp_path, keys):
    server = key_server(slapd, tmp_path, keys, tier="lab")
    try:
        assert ph(server, tmp_path, "alice", keys, "add", "alias=l1", "name=L").returncode == 0
        refused = ph(server, tmp_path, "bob", keys, "add", "alias=l2", "name=L")
        assert refused.returncode != 0 and "reader" in refused.stderr
        assert not (tmp_path / "data" / "authorized_keys").read_text()  # no bootstrap keys
    finally:
        server.kill()


def serve_args(*args, tmp_path):
    return subprocess.run([sys.executable, str(PHAROS), "serve", "--listen", "127.0.0.1:0",
                           "--metrics", "off", "--data", str(tmp_path / "d"), *args],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PHAROS_LDAP_PASSWORD=ROOTPW))


@pytest.mark.parametrize("args", [
    ["--ldap-keys"], ["--storage", "memory", "--ldap-keys"],
    ["--storage", "ldap://127.0.0.1:1/dc=x", "--ldap-admin-group", "cn=a,dc=x"],
    ["--storage", "ldap://127.0.0.1:1/dc=x", "--ldap-keys", "--ldap-writer-group", "nodn"]])
def test_ldap_keys_arguments_that_cannot_work_are_one_line_and_exit_2(args, tmp_path):
    done = serve_args(*args, tmp_path=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "ldap" in done.stderr


def test_a_directory_without_the_lpk_schema_is_one_line_and_exit_3(tmp_path):
    need_slapd()
    bare = Slapd(tmp_path / "bare")
    bare.configure()
    config = next((tmp_path / "bare" / "slapd.d" / "cn=config" / "cn=schema").glob(
        "*openssh-lpk.ldif"))
    config.unlink()                            # the same slapd, without the schema
    bare.start()
    try:
        done = serve_args("--tier", "lab", "--storage", f"{bare.url}/{SUFFIX}",
                          "--ldap-bind-dn", ROOTDN, "--ldap-keys", tmp_path=tmp_path)
    finally:
        bare.stop()
    assert done.returncode == 3 and done.stderr.count("\n") == 1, done.stderr
    assert "openssh-lpk.ldif" in done.stderr


def test_group_members_roles_and_key_values_are_read_with_limits():
    layout = pharos.LdapLayout(pharos.Schema(), SUFFIX)
    key = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
           "x@y")
    groups = {"admin": pharos.ldap_group_members({"memberuid": ["root"]}),
              "writer": pharos.ldap_group_members(
                  {"uniquemember": [f"UID=Pat,ou=People,{SUFFIX}#'0101'B"]})}
    found = [(f"uid=pat,{PEOPLE}", {"sshpublickey": [key, "x" * 20000, "# a comment"]}),
             (f"uid=root,{PEOPLE}", {"sshpublickey": [key] * 40}),
             (f"uid=q,ou=people,ou=*,ou=tenants,{SUFFIX}", {"sshpublickey": [key]}),
             (f"cn=no uid,{PEOPLE}", {"sshpublickey": [key]})]
    keys, complaints = pharos.ldap_key_entries(layout, found, groups, {})
    roles = {(e.principals, e.role, e.tenant) for e in keys.values()}
    assert roles == {("pat", "writer", ""), ("root", "admin", "")}
    assert len(keys) == 2                       # root's 40 copies are one key
    text = "\n".join(complaints)
    assert "longer than 16384 characters" in text and "no key in it" in text
    assert "40 keys; the first 32 are used" in text
    assert text.count("its keys are not used") == 2
    again, _ = pharos.ldap_key_entries(layout, found, groups, keys)
    assert all(again[slot] is keys[slot] for slot in keys)     # not parsed twice
