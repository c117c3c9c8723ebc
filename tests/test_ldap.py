"""The LDAP store against a real slapd: mapping, freshness, escaping, faults, and the
store contract and transcripts run on it."""

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import test_store
from conftest import PHAROS, ServerProcess, wait_for
from ldap_fixture import ROOTDN, ROOTPW, SUFFIX, Slapd, need_slapd, providers
from test_store import (  # noqa: F401  (the store contract, run here on LdapStore)
    test_a_changed_record_is_a_new_object, test_add_query_change_delete,
    test_keys_are_unique_per_type_and_case, test_long_postings_agree_with_the_records_through_every_change,
    test_wildcards_see_new_and_removed_keys)
from test_transcripts import CASES, parse_case, replay

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pharos  # noqa: E402

PEOPLE = f"ou=people,{SUFFIX}"
HOSTS = f"ou=hosts,{SUFFIX}"
KEY_1 = "SHA256:LeoukUgI/dn83IUd1HKfsBNMq9xZc5XTGonJvjlY45Y"   # host key fingerprints
KEY_2 = "SHA256:vXGCOSNKh3ybQ1LdCPqWynd+VY2BZrs5iRrth7C2aXg"


@pytest.fixture
def slapd(tmp_path):
    """A fresh slapd for one test, stopped (by pid) at its end."""
    need_slapd()
    server = Slapd(tmp_path / "slapd").start()
    yield server
    server.stop()


def ldap_server(slapd, tmp_path, *extra, metrics=False):
    """A dev-tier Pharos on ``slapd`` (bound as the admin, password from the environment)."""
    return ServerProcess(tmp_path / "data", "--ldap-bind-dn", ROOTDN, *extra,
                         storage=f"{slapd.url}/{SUFFIX}", env={"PHAROS_LDAP_PASSWORD": ROOTPW},
                         metrics=metrics).start()


@pytest.fixture
def pharos_on(slapd, tmp_path):
    srv = ldap_server(slapd, tmp_path)
    yield srv
    srv.kill()


@pytest.fixture
def make_store(slapd):
    """test_store's factory, for LdapStore on a fresh slapd."""
    test_store.LOOP = asyncio.new_event_loop()
    opened = []

    def make(**kw):
        store = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN,
                                 ROOTPW).open()
        opened.append(store)
        return store
    make.kind = "ldap"
    yield make
    for store in opened:
        test_store.run(store.close())
    test_store.LOOP.close()


def values(lines, field):
    """The values of ``field`` in a query reply's lines."""
    out = []
    for line in lines:
        parts = line.split(":", 3)
        if len(parts) == 4 and parts[2].strip() == field:
            out.append(parts[3].strip())
    return out


def query(srv, text):
    with srv.client() as c:
        return c.cmd(f"query {text} return all")


def test_records_written_through_ph_are_entries_with_standard_classes(pharos_on, slapd):
    with pharos_on.client() as c:
        assert c.cmd('add alias=jdoe name="John Q Doe" email=jdoe@example.org phone=555-0100 '
                     'title=SRE department=ops office="B 204" url=https://example.org/jd '
                     'notes="on call"')[-1] == "200:Ok."
        assert c.cmd("add hostname=nas ip=10.0.0.5 mac=AA-BB-CC-DD-EE-01 owner=jdoe "
                     "location=attic serial=S123 os=Debian role=nas tags=backup "
                     f"services=22/ssh hostkey={KEY_1}")[-1] == "200:Ok."
        assert c.cmd("add hostname=bare os=none")[-1] == "200:Ok."
    person = slapd.search(f"uid=jdoe,{PEOPLE}", scope="base")[f"uid=jdoe,{PEOPLE}"]
    assert person["objectClass"] == ["inetOrgPerson"]
    assert (person["cn"], person["sn"], person["givenName"]) == (["John Q Doe"], ["Doe"],
                                                                 ["John Q"])
    assert person["mail"] == ["jdoe@example.org"] and person["telephoneNumber"] == ["555-0100"]
    assert person["title"] == ["SRE"] and person["ou"] == ["ops"]
    assert person["roomNumber"] == ["B 204"] and person["labeledURI"] == ["https://example.org/jd"]
    assert "on call" in person["description"]
    assert any(v.startswith("pharos:created=") for v in person["description"])
    nas = slapd.search(f"cn=nas,{HOSTS}", scope="base")[f"cn=nas,{HOSTS}"]
    assert set(nas["objectClass"]) == {"device", "ipHost", "ieee802Device"}
    assert nas["ipHostNumber"] == ["10.0.0.5"] and nas["macAddress"] == ["aa:bb:cc:dd:ee:01"]
    assert nas["owner"] == [f"uid=jdoe,{PEOPLE}"] and nas["l"] == ["attic"]
    assert nas["serialNumber"] == ["S123"]
    assert {"pharos:os=Debian", "pharos:role=nas", "pharos:tags=backup",
            "pharos:services=22/ssh", "pharos:status=unknown",
            f"pharos:hostkey={KEY_1}"} <= set(nas["description"])
    bare = slapd.search(f"cn=bare,{HOSTS}", scope="base")[f"cn=bare,{HOSTS}"]
    assert bare["objectClass"] == ["device"]
    with pharos_on.client() as c:                 # an IP makes it an ipHost; none, not
        assert c.cmd("change hostname=bare make ip=10.0.0.9")[-1].startswith("200")
        assert set(slapd.search(f"cn=bare,{HOSTS}", scope="base")[f"cn=bare,{HOSTS}"][
            "objectClass"]) == {"device", "ipHost"}
        assert c.cmd('change hostname=bare make ip=""')[-1].startswith("200")
    assert slapd.search(f"cn=bare,{HOSTS}", scope="base")[f"cn=bare,{HOSTS}"][
        "objectClass"] == ["device"]


def test_a_restarted_server_reads_back_what_it_wrote(slapd, tmp_path):
    srv = ldap_server(slapd, tmp_path)
    with srv.client() as c:
        c.cmd('add alias=ann name="Ann Lee" email=ann@example.org nickname=annie')
        c.cmd("add hostname=web-1 ip=10.0.0.7 ip=fd00::7 mac=aa:bb:cc:dd:ee:02 tags=a tags=b "
              f'hostkey="ssh-ed25519 {KEY_1}" hostkey={KEY_2}')
        before = c.cmd("query type=person type=machine return all")
    srv.stop()
    srv = ldap_server(slapd, tmp_path)
    try:
        with srv.client() as c:
            assert c.cmd("query type=person type=machine return all") == before
            assert c.cmd(f"query hostkey={KEY_2} return hostkey")[1:] == [
                f"-200:1:  hostkey: {KEY_1}", f"-200:1:  hostkey: {KEY_2}", "200:Ok."]
    finally:
        srv.kill()


@pytest.mark.parametrize("mode", ["auto", "poll"])
def test_changes_made_by_other_tools_show_up_within_two_seconds(slapd, tmp_path, mode):
    pharos_on = ldap_server(slapd, tmp_path, "--ldap-sync", mode)
    try:
        changes_show_up(pharos_on, slapd)
        said = pharos_on.stderr.decode()
        assert ("Content Sync" in said) == (mode == "auto"), said
    finally:
        pharos_on.kill()


def changes_show_up(pharos_on, slapd):
    """ldapadd, ldapmodify, ldapmodrdn and ldapdelete each show over Ph within 2 s."""
    with pharos_on.client() as c:
        assert c.cmd("add alias=seed")[-1] == "200:Ok."      # makes ou=people
    slapd.ldap("ldapadd", input=f"dn: uid=outside,{PEOPLE}\nobjectClass: inetOrgPerson\n"
                                f"uid: outside\ncn: Out Side\nsn: Side\nmail: out@example.org\n")
    wait_for(lambda: values(query(pharos_on, "alias=outside"), "email") == ["out@example.org"],
             timeout=2, what="an ldapadd to show")
    slapd.modify(f"dn: uid=outside,{PEOPLE}\nchangetype: modify\nreplace: mail\n"
                 f"mail: new@example.org\n")
    wait_for(lambda: values(query(pharos_on, "alias=outside"), "email") == ["new@example.org"],
             timeout=2, what="an ldapmodify to show")
    slapd.ldap("ldapmodrdn", f"uid=outside,{PEOPLE}", "uid=inside")
    wait_for(lambda: values(query(pharos_on, "email=new@example.org"), "alias") == ["inside"],
             timeout=2, what="a rename to show")
    slapd.ldap("ldapdelete", f"uid=inside,{PEOPLE}")
    wait_for(lambda: query(pharos_on, "email=new@example.org") == [
        "501:No matches to your query."], timeout=2, what="an ldapdelete to show")


FOREIGN = f"""dn: ou=staff,{SUFFIX}
objectClass: organizationalUnit
ou: staff

dn: uid=mk,ou=staff,{SUFFIX}
objectClass: inetOrgPerson
objectClass: posixAccount
uid: mk
cn: Mary Kay
cn: MK
sn: Kay
mail: mk@example.org
telephoneNumber: +1 555 0101
uidNumber: 1001
gidNumber: 1001
homeDirectory: /home/mk
employeeNumber: 42
description: keeps the keys

dn: ou=machines,{SUFFIX}
objectClass: organizationalUnit
ou: machines

dn: cn=printer,ou=machines,{SUFFIX}
objectClass: device
objectClass: ipHost
objectClass: ieee802Device
cn: printer
cn: lp
ipHostNumber: 10.0.0.20
macAddress: 0:1a:2b:3c:4d:5e
seeAlso: cn=mk,{SUFFIX}
"""


def test_a_directory_filled_by_others_is_served_and_keeps_what_pharos_does_not_know(
        slapd, tmp_path):
    slapd.ldap("ldapadd", input=FOREIGN)
    before = slapd.search(SUFFIX)
    srv = ldap_server(slapd, tmp_path)
    try:
        reply = query(srv, "email=mk@example.org")
        assert values(reply, "alias") == ["mk"] and values(reply, "name") == ["Mary Kay"]
        assert values(reply, "notes") == ["keeps the keys"]
        printer = query(srv, "mac=00:1a:2b:3c:4d:5e")
        assert values(printer, "hostname") == ["printer"]
        assert values(printer, "ip") == ["10.0.0.20"]
        assert slapd.search(SUFFIX) == before                   # serving changed nothing
        with srv.client() as c:
            assert c.cmd("change alias=mk make title=Boss")[-1].startswith("200")
            assert c.cmd("change hostname=printer make location=hall")[-1].startswith("200")
        mk = slapd.search(f"uid=mk,ou=staff,{SUFFIX}", scope="base")[f"uid=mk,ou=staff,{SUFFIX}"]
        old = before[f"uid=mk,ou=staff,{SUFFIX}"]
        for attr in ("uidNumber", "homeDirectory", "employeeNumber", "cn", "sn", "objectClass"):
            assert mk[attr] == old[attr], attr
        assert mk["title"] == ["Boss"] and "keeps the keys" in mk["description"]
        lp = slapd.search(f"cn=printer,ou=machines,{SUFFIX}", scope="base")[
            f"cn=printer,ou=machines,{SUFFIX}"]
        assert lp["cn"] == ["printer", "lp"] and lp["seeAlso"] == [f"cn=mk,{SUFFIX}"]
        assert lp["macAddress"] == ["0:1a:2b:3c:4d:5e"] and lp["l"] == ["hall"]
    finally:
        srv.kill()


NASTY = ["*)(uid=*))(|(uid=*", "\\2a", "a\\b", 'Smith, "Jr" + <x>; #1=2', "Mül*ler"]


def test_values_that_look_like_ldap_syntax_match_and_store_exactly(pharos_on, slapd):
    with pharos_on.client() as c:
        for n, text in enumerate(NASTY):
            quoted = text.replace("\\", "\\\\").replace('"', '\\"')
            assert c.cmd(f'add alias=n{n} name="{quoted}" title="{quoted}"')[-1] == "200:Ok.", text
        assert c.cmd("add alias=plain name=Plain")[-1] == "200:Ok."
    people = slapd.search(PEOPLE, "(objectClass=inetOrgPerson)", "uid", "cn", "title")
    stored = {e["uid"][0]: e["cn"][0] for e in people.values()}
    assert stored == {**{f"n{n}": t for n, t in enumerate(NASTY)}, "plain": "Plain"}
    found = slapd.search(PEOPLE, "(cn=Smith\\2c \\22Jr\\22 + <x>; #1=2)", "uid")
    assert [e["uid"] for e in found.values()] == [["n3"]]
    with pharos_on.client() as c:
        for n, text in enumerate(NASTY):
            quoted = text.replace("\\", "\\\\").replace('"', '\\"')
            reply = c.cmd(f'query title="{quoted}" return alias')
            assert values(reply, "alias") == [f"n{n}"] or "*" in text, (text, reply)


def test_a_hostile_key_in_a_dn_and_a_tenant_are_escaped():
    layout = pharos.LdapLayout(pharos.Schema(), "dc=x")
    dn = layout.dn({"type": "machine", "hostname": "a", "tenant": 'ev,il+"t"\\<>;#'})
    assert dn == 'cn=a,ou=hosts,ou=ev\\,il\\+\\"t\\"\\\\\\<\\>\\;#,ou=tenants,dc=x'
    assert pharos.split_dn(dn)[2] == ("ou", 'ev,il+"t"\\<>;#')
    assert layout.tenant_of(pharos.split_dn(dn)) == 'ev,il+"t"\\<>;#'
    assert pharos.escape_dn_value("#a ") == "\\#a\\ " and pharos.escape_dn_value("a\0") == "a\\00"
    assert pharos.escape_filter_value("*)(uid=*\\\0") == "\\2a\\29\\28uid=\\2a\\5c\\00"
    assert pharos.split_dn("cn=Smith\\2C Jane \\2B \\22QA\\22,dc=x")[0] == (
        "cn", 'Smith, Jane + "QA"')


def test_an_add_of_a_key_the_directory_has_is_refused_as_a_duplicate(pharos_on, slapd):
    with pharos_on.client() as c:
        assert c.cmd("add alias=seed")[-1] == "200:Ok."
    # straight into the directory, then at once through Ph: whichever sees it first refuses
    slapd.ldap("ldapadd", input=f"dn: uid=race,{PEOPLE}\nobjectClass: inetOrgPerson\n"
                                f"uid: race\ncn: race\nsn: race\n")
    with pharos_on.client() as c:
        reply = c.cmd("add alias=race name=Second")
    assert reply[-1].startswith(("509", "599")) and "race in use" in "".join(reply), reply
    assert slapd.search(f"uid=race,{PEOPLE}", scope="base")[f"uid=race,{PEOPLE}"]["cn"] == ["race"]


def readyz(srv):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/readyz",
                                    timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_directory_going_away_keeps_reads_fails_writes_fast_and_recovers(slapd, tmp_path):
    srv = ldap_server(slapd, tmp_path, metrics=True)
    try:
        with srv.client() as c:
            assert c.cmd("add alias=kept name=Kept")[-1] == "200:Ok."
            assert readyz(srv)[0] == 200
            slapd.stop()
            started = time.monotonic()
            reply = c.cmd("add alias=lost name=Lost")
            assert time.monotonic() - started < 1.0
            assert reply[-1].startswith("475:Database unavailable"), reply
            assert values(c.cmd("query alias=kept return name"), "name") == ["Kept"]
            wait_for(lambda: readyz(srv)[0] == 503, timeout=5, what="/readyz to say so")
            assert "unreachable" in readyz(srv)[1]
            slapd.start()
            wait_for(lambda: c.cmd("add alias=back name=Back")[-1] == "200:Ok.", timeout=10,
                     interval=0.2, what="writes to come back")
            assert readyz(srv)[0] == 200
        people = slapd.search(PEOPLE, "(objectClass=inetOrgPerson)", "uid")
        assert sorted(e["uid"][0] for e in people.values()) == ["back", "kept"]
    finally:
        srv.kill()


def test_a_wrong_password_at_start_is_one_line_and_exit_3(slapd, tmp_path):
    done = subprocess.run([sys.executable, str(PHAROS), "serve", "--tier", "dev", "--listen",
                           "127.0.0.1:0", "--metrics", "off", "--data", str(tmp_path / "d"),
                           "--storage", f"{slapd.url}/{SUFFIX}", "--ldap-bind-dn", ROOTDN],
                          env=dict(os.environ, PHAROS_LDAP_PASSWORD="wrong"),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "invalidCredentials" in done.stderr, done.stderr


def test_two_pharos_servers_over_two_replicating_providers_see_each_others_writes(tmp_path):
    need_slapd()
    first, second = providers(tmp_path)
    started = []
    try:
        for slapd in (first, second):
            started.append(slapd.start())
        a = ldap_server(first, tmp_path / "a")
        b = ldap_server(second, tmp_path / "b")
        started += [a, b]
        with a.client() as c:
            assert c.cmd("add alias=from-a name=Alpha")[-1] == "200:Ok."
        wait_for(lambda: values(query(b, "alias=from-a"), "name") == ["Alpha"], timeout=5,
                 what="a write on A to reach B")
        with b.client() as c:
            assert c.cmd("change alias=from-a make title=Both")[-1].startswith("200")
            assert c.cmd("add hostname=from-b ip=10.9.0.1")[-1] == "200:Ok."
        wait_for(lambda: values(query(a, "alias=from-a"), "title") == ["Both"], timeout=5,
                 what="a change on B to reach A")
        wait_for(lambda: values(query(a, "hostname=from-b"), "ip") == ["10.9.0.1"], timeout=5,
                 what="an add on B to reach A")
    finally:
        for thing in reversed(started):
            thing.kill() if isinstance(thing, ServerProcess) else thing.stop()


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_transcript_on_ldap(path, slapd, tmp_path):
    args, steps = parse_case(path)
    srv = ldap_server(slapd, tmp_path, *args)
    try:
        with srv.client() as client:
            replay(path, client, steps)
    finally:
        srv.kill()


@pytest.mark.parametrize("mode", ["auto", "poll"])
def test_changes_made_while_the_directory_was_out_of_reach_are_caught_up(slapd, mode):
    loop = asyncio.new_event_loop()
    store = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN, ROOTPW,
                             sync=mode).open()
    person = {"type": "person", "alias": "gone", "name": "Gone Soon"}

    def run(coro):
        return loop.run_until_complete(asyncio.wait_for(coro, 10))

    async def write(ops):
        return await store.commit(ops)

    async def until(predicate, what):
        deadline = loop.time() + 5
        while not predicate():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    try:
        run(write([(store.pending.new_id(), person),
                   (store.pending.new_id() + 1, dict(person, alias="kept", name="Kept"))]))
        aliases = lambda: sorted(r["alias"] for r in store.directory.records.values())  # noqa
        assert aliases() == ["gone", "kept"]
        real = store.server_url
        store.server_url = "ldap://127.0.0.1:1"          # nothing listens there
        store.drop_follower()
        store.lost("taken away by the test")
        slapd.ldap("ldapdelete", f"uid=gone,{PEOPLE}")
        slapd.modify(f"dn: uid=kept,{PEOPLE}\nchangetype: modify\nreplace: mail\n"
                     f"mail: kept@example.org\n")
        slapd.ldap("ldapadd", input=f"dn: uid=new,{PEOPLE}\nobjectClass: inetOrgPerson\n"
                                    f"uid: new\ncn: New\nsn: New\n")
        assert aliases() == ["gone", "kept"] and store.down  # nothing came in meanwhile
        store.server_url = real
        run(until(lambda: store.down is None and aliases() == ["kept", "new"],
                  "the catch-up"))
        kept = [r for r in store.directory.records.values() if r["alias"] == "kept"]
        assert kept[0]["email"] == "kept@example.org"
    finally:
        loop.run_until_complete(store.close())
        loop.close()


@pytest.mark.parametrize("text", [
    "(uid=a)", "(&(objectClass=*)(cn=a\\2ab))", "(|(objectClass=inetOrgPerson)(objectClass=device))",
    "(!(sn=x))", "(entryCSN>=20261202)", "(cn=ab*c*d)", "(cn=*x)", "(cn<=z)", "(cn~=q)",
    "(cn=\\00\\28\\29)"])
def test_the_wire_encodes_a_filter_as_ldap3_does(text):
    from ldap3.operation.search import compile_filter, parse_filter
    from pyasn1.codec.ber import encoder
    theirs = encoder.encode(compile_filter(parse_filter(text, None, True, None, False,
                                                        False).elements[0]))
    assert pharos.ldap_filter(text) == theirs


@pytest.mark.parametrize("text", ["uid=a", "(uid=a", "(&)", "(!(a=b)(c=d))", "(=x)", "(uid)"])
def test_a_malformed_filter_is_refused(text):
    with pytest.raises(ValueError):
        pharos.ldap_filter(text)


@pytest.mark.parametrize("reply", [
    b"\x30\x84\x7f\xff\xff\xff",                    # a 2 GB message
    b"\x30\x05\x02\x01\x01\x61\x09",                 # a bind reply longer than its message
    b"\x31\x02\x02\x00" * 4,                          # not a SEQUENCE
    b""])                                             # closed at once
def test_a_garbled_or_missing_bind_reply_is_one_clear_store_error(reply):
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(reply)
        conn.close()
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(pharos.StoreError, match="LDAP directory"):
            pharos.LdapWire(f"ldap://127.0.0.1:{listener.getsockname()[1]}", ROOTDN, "pw", 2)
    finally:
        thread.join(5)
        listener.close()


def test_an_entry_cut_short_fails_the_way_the_wire_catches():
    entry = (pharos.ber_str("uid=a,dc=x") + pharos.ber(0x30, pharos.ber(
        0x30, pharos.ber_str("cn") + pharos.ber(0x31, pharos.ber_str("A")))))
    assert pharos.ldap_entry(entry, 0, len(entry)) == ("uid=a,dc=x", {"cn": ["A"]})
    for cut in range(1, len(entry)):
        with pytest.raises((ValueError, IndexError)):
            pharos.ldap_entry(entry[:cut], 0, cut)


def image_store(slapd, data, logs, url=None):
    """An LdapStore on ``slapd`` keeping its image in ``data``, logging into ``logs``."""
    return pharos.LdapStore(pharos.Schema(), url or f"{slapd.url}/{SUFFIX}", ROOTDN, ROOTPW,
                            log=logs.append, image_dir=str(data)).open()


def served(store):
    """(alias or hostname, email, title) of every record the store serves, sorted."""
    return sorted((r.get("alias") or r.get("hostname"), r.get("email"), r.get("title"))
                  for r in store.directory.records.values())


def add_people(slapd, *uids):
    """ldapadd plain inetOrgPerson entries (and ou=people first, if it is missing)."""
    slapd.ldap("ldapadd", "-c", input=f"dn: {PEOPLE}\nobjectClass: organizationalUnit\n"
                                      f"ou: people\n", check=False)
    slapd.ldap("ldapadd", input="".join(
        f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid.title()}\n"
        f"sn: {uid.title()}\n\n" for uid in uids))


def test_a_start_takes_the_image_a_stop_left_and_only_what_changed_since(slapd, tmp_path):
    loop = asyncio.new_event_loop()
    logs, data = [], tmp_path / "data"
    add_people(slapd, "ann", "bob", "cy", "dee")
    try:
        store = image_store(slapd, data, logs)
        assert (data / "ldap.image").exists() and not any("started from" in m for m in logs)
        written = (data / "ldap.image").stat().st_mtime_ns
        loop.run_until_complete(store.close())
        # nothing came since the image was written: the stop leaves it as it is
        assert (data / "ldap.image").stat().st_mtime_ns == written
        assert not any("for a quick start" in m for m in logs), logs
        # other tools change the directory while Pharos is stopped
        slapd.ldap("ldapdelete", f"uid=bob,{PEOPLE}")
        slapd.modify(f"dn: uid=cy,{PEOPLE}\nchangetype: modify\nreplace: mail\n"
                     f"mail: cy@example.org\n")
        add_people(slapd, "eve")
        logs.clear()
        store = image_store(slapd, data, logs)
        assert any("started from" in m and "the 3 changes since" in m for m in logs), logs
        truth = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN,
                                 ROOTPW).open()
        assert served(store) == served(truth)
        assert [a for a, _, _ in served(store)] == ["ann", "cy", "dee", "eve"]
        # the ids go on from the image's: a record added now is not given one in use
        later = store.pending.new_id()
        assert later not in store.directory.records
        loop.run_until_complete(store.close())
        loop.run_until_complete(truth.close())
        # slapd restarted forgets its log of changes: it names every unchanged entry
        # instead (a present phase), and one it does not name is gone
        slapd.stop()
        slapd.start()
        slapd.ldap("ldapdelete", f"uid=dee,{PEOPLE}")
        logs.clear()
        store = image_store(slapd, data, logs)
        assert any("started from" in m for m in logs), logs
        assert [a for a, _, _ in served(store)] == ["ann", "cy", "eve"]
        loop.run_until_complete(store.close())
    finally:
        loop.close()


def test_an_image_that_is_damaged_or_for_another_directory_is_not_used(slapd, tmp_path):
    loop = asyncio.new_event_loop()
    logs, data = [], tmp_path / "data"
    add_people(slapd, "ann", "bob")
    try:
        loop.run_until_complete(image_store(slapd, data, logs).close())
        image = data / "ldap.image"
        blob = bytearray(image.read_bytes())
        blob[-10] ^= 0xFF
        image.write_bytes(bytes(blob))
        logs.clear()
        store = image_store(slapd, data, logs)
        assert any("not using" in m and "damaged" in m for m in logs), logs
        assert [a for a, _, _ in served(store)] == ["ann", "bob"]
        loop.run_until_complete(store.close())   # a good image again
        logs.clear()
        other = f"ldap://localhost:{slapd.port}/{SUFFIX}"
        store = image_store(slapd, data, logs, url=other)
        assert any("not using" in m and "another directory" in m for m in logs), logs
        assert [a for a, _, _ in served(store)] == ["ann", "bob"]
        loop.run_until_complete(store.close())
    finally:
        loop.close()


def test_serve_starts_again_from_its_image_and_sees_what_changed(slapd, tmp_path):
    srv = ldap_server(slapd, tmp_path)
    try:
        with srv.client() as c:
            assert c.cmd('add alias=jdoe name="Jane Doe" email=jane@example.org')[-1] == "200:Ok."
        code, err = srv.stop()
        assert code == 0 and "ldap.image for a quick start" in err, err
        slapd.modify(f"dn: uid=jdoe,{PEOPLE}\nchangetype: modify\nreplace: mail\n"
                     f"mail: jane@example.net\n")
        srv.port, srv.stderr = None, b""
        srv.start()
        assert "started from" in srv.read_stderr()
        with srv.client() as c:
            reply = c.cmd("query alias=jdoe return email")
        assert any("jane@example.net" in line for line in reply), reply
    finally:
        srv.kill()


def test_sync_info_messages_bring_cookies_phases_and_deletes():
    uuid = bytes(range(16))
    text = pharos.ldap_uuid(uuid)
    cookie = pharos.ber(0x80, b"rid=000,csn=1")
    assert pharos.ldap_sync_info(cookie, 0, len(cookie)) == [("cookie", b"rid=000,csn=1")]
    present = pharos.ber(0xA2, pharos.ber_str(b"c2") + pharos.ber(0x01, b"\x00"))
    assert pharos.ldap_sync_info(present, 0, len(present)) == [("phase", "present"),
                                                               ("cookie", b"c2")]
    done = pharos.ber(0xA1, b"")
    assert pharos.ldap_sync_info(done, 0, len(done)) == [("phase", "delete"), ("done", [])]
    gone = pharos.ber(0xA3, pharos.ber_str(b"c3") + pharos.ber(0x01, b"\xff")
                      + pharos.ber(0x31, pharos.ber_str(uuid)))
    assert pharos.ldap_sync_info(gone, 0, len(gone)) == [("deletes", [text]), ("cookie", b"c3")]
    same = pharos.ber(0xA3, pharos.ber(0x31, pharos.ber_str(uuid) + pharos.ber_str(uuid)))
    assert pharos.ldap_sync_info(same, 0, len(same)) == [("present", [text, text])]


@pytest.mark.parametrize("post_read", [True, False])
def test_a_write_learns_the_entry_it_left_with_or_without_post_read(slapd, post_read):
    loop = asyncio.new_event_loop()
    store = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN, ROOTPW).open()
    try:
        async def write(ops):
            store.attach()
            assert await store.commit(ops) is None
        loop.run_until_complete(loop.run_in_executor(store.executors["write"], store.conn,
                                                     "write"))
        assert store.post_read is True                # slapd offers it
        store.post_read = post_read
        rid = store.pending.new_id()
        person = {"type": "person", "alias": "pat", "name": "Pat Lee", "tags": ["x"]}
        loop.run_until_complete(write([(rid, person)]))
        loop.run_until_complete(write([(rid, dict(person, alias="pat2", email="p@x.org"))]))
        found = slapd.search(SUFFIX, "(uid=pat2)", "entryUUID", "entryCSN", "mail")
        assert list(found) == [f"uid=pat2,{PEOPLE}"]
        entry = found[f"uid=pat2,{PEOPLE}"]
        assert entry["mail"] == ["p@x.org"]
        info = store.info[rid]
        assert info["dn"].lower() == f"uid=pat2,{PEOPLE}".lower()
        assert info["uuid"] == entry["entryUUID"][0]
        assert info["csn"] == entry["entryCSN"][0]
        assert any("tags" in v for v in info["prefixed"] + info["fields"])
    finally:
        loop.run_until_complete(store.close())
        loop.close()


def test_a_write_connection_the_directory_ended_while_idle_is_made_again(slapd):
    done = subprocess.run(["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", slapd.ldapi_url],
                          input="dn: cn=config\nchangetype: modify\nreplace: olcIdleTimeout\n"
                                "olcIdleTimeout: 1\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    loop = asyncio.new_event_loop()
    store = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN, ROOTPW).open()
    try:
        async def write(alias):
            store.attach()
            return await store.commit([(store.pending.new_id(),
                                        {"type": "person", "alias": alias, "name": alias})])
        assert loop.run_until_complete(write("first")) is None
        wire = store.conns["write"]
        wait_for(wire.hung_up, timeout=10, what="slapd ending the idle write connection")
        assert loop.run_until_complete(write("second")) is None
        assert store.conns["write"] is not wire and store.down is None
    finally:
        loop.run_until_complete(store.close())
        loop.close()


def test_a_write_the_directory_did_not_confirm_in_time_is_caught_up_after(slapd):
    import signal
    loop = asyncio.new_event_loop()
    store = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN, ROOTPW).open()
    aliases = lambda: sorted(r["alias"] for r in store.directory.records.values())  # noqa

    async def write(alias):
        store.attach()
        return await store.commit([(store.pending.new_id(),
                                    {"type": "person", "alias": alias, "name": alias})])
    try:
        assert loop.run_until_complete(write("before")) is None
        os.kill(slapd.pid(), signal.SIGSTOP)        # the directory stops answering
        try:
            with pytest.raises(pharos.StoreError) as refused:
                loop.run_until_complete(asyncio.wait_for(write("unsure"), 10))
        finally:
            os.kill(slapd.pid(), signal.SIGCONT)    # and then makes the write it was sent
        assert refused.value.code == 475 and store.down
        assert aliases() == ["before"]
        store_until(loop, lambda: store.down is None, "the reconnect")
        store_until(loop, lambda: aliases() == ["before", "unsure"],
                    "the unconfirmed write to show")
        assert loop.run_until_complete(write("after")) is None
        assert aliases() == ["after", "before", "unsure"]
    finally:
        loop.run_until_complete(store.close())
        loop.close()


def start_sync(loop, store):
    """Start the store's sync task on ``loop`` (it starts on the first call from a loop)."""
    async def attach():
        store.attach()
    loop.run_until_complete(attach())


def store_until(loop, predicate, what, timeout=10):
    """Run ``loop`` until ``predicate()`` holds (the store's sync running meanwhile)."""
    async def wait():
        deadline = loop.time() + timeout
        while not predicate():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)
    loop.run_until_complete(wait())


def test_an_entry_deleted_and_added_again_or_renamed_into_a_freed_name_is_served(slapd, tmp_path):
    loop = asyncio.new_event_loop()
    logs, data = [], tmp_path / "data"
    add_people(slapd, "anna", "carl", "dora")
    recreate = (f"dn: uid=anna,{PEOPLE}\nchangetype: delete\n\n"
                f"dn: uid=anna,{PEOPLE}\nchangetype: add\nobjectClass: inetOrgPerson\n"
                f"uid: anna\ncn: Anna\nsn: Anna\nmail: anna@{{}}.org\n")
    try:
        store = image_store(slapd, data, logs)
        start_sync(loop, store)
        slapd.modify(recreate.format("live"))       # one batch of the running sync
        store_until(loop, lambda: ("anna", "anna@live.org", None) in served(store), "anna")
        loop.run_until_complete(store.close())
        slapd.modify(recreate.format("stopped"))     # while Pharos is stopped
        slapd.ldap("ldapmodrdn", f"uid=dora,{PEOPLE}", "uid=dora2")
        slapd.ldap("ldapmodrdn", f"uid=carl,{PEOPLE}", "uid=dora")
        store = image_store(slapd, data, logs)
        truth = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN,
                                 ROOTPW).open()
        assert [a for a, _, _ in served(store)] == ["anna", "dora", "dora2"]
        assert served(store) == served(truth)
        loop.run_until_complete(truth.close())
        # an entry held back because another has its key is served once that one goes
        slapd.ldap("ldapadd", input=f"dn: ou=more,{SUFFIX}\nobjectClass: organizationalUnit\n"
                                    f"ou: more\n\ndn: uid=anna,ou=more,{SUFFIX}\nobjectClass: "
                                    f"inetOrgPerson\nuid: anna\ncn: Anna\nsn: Anna\n"
                                    f"mail: anna@more.org\n")
        start_sync(loop, store)
        store_until(loop, lambda: any("not serving" in m for m in logs), "the clash")
        assert ("anna", "anna@stopped.org", None) in served(store)
        slapd.ldap("ldapdelete", f"uid=anna,{PEOPLE}")
        store_until(loop, lambda: ("anna", "anna@more.org", None) in served(store),
                    "the held-back anna")
        loop.run_until_complete(store.close())
    finally:
        loop.close()


def test_a_directory_restored_from_an_older_backup_is_loaded_whole(slapd, tmp_path):
    loop = asyncio.new_event_loop()
    logs, data = [], tmp_path / "data"
    add_people(slapd, "anna", "bert")
    backup = tmp_path / "backup.ldif"
    slapcat = subprocess.run(["/usr/sbin/slapcat", "-F", str(slapd.path / "slapd.d"), "-b",
                              SUFFIX, "-l", str(backup)], capture_output=True, text=True)
    assert slapcat.returncode == 0, slapcat.stderr

    def restore():
        slapd.stop()
        for name in (slapd.path / "data").iterdir():
            name.unlink()
        slapd.slapadd("-b", SUFFIX, "-l", str(backup))
        slapd.start()
    try:
        store = image_store(slapd, data, logs)

        async def write(ops):
            return await store.commit(ops)
        loop.run_until_complete(write([(store.pending.new_id(),
                                        {"type": "person", "alias": "newer", "name": "N"})]))
        loop.run_until_complete(store.close())      # its image's cookie is past the backup
        restore()
        logs.clear()
        store = image_store(slapd, data, logs)
        assert any("cannot go on from the last cookie" in m for m in logs), logs
        assert [a for a, _, _ in served(store)] == ["anna", "bert"]
        # and while it runs: the sync reconnects to the restored directory, loads it whole,
        # and takes writes again
        loop.run_until_complete(write([(store.pending.new_id(),
                                        {"type": "person", "alias": "newer", "name": "N"})]))
        restore()
        store_until(loop, lambda: store.down is None and [a for a, _, _ in served(store)]
                    == ["anna", "bert"], "the reload of the restored directory")
        assert loop.run_until_complete(write([(store.pending.new_id(), {
            "type": "person", "alias": "after", "name": "A"})])) is None
        loop.run_until_complete(store.close())
    finally:
        loop.close()


def test_a_change_whose_rename_is_refused_keeps_what_was_written(slapd, pharos_on):
    with pharos_on.client() as c:
        assert c.cmd('add alias=neu name="Neu Person"')[-1] == "200:Ok."
        assert c.cmd('add alias=taken name="Taken"')[-1] == "200:Ok."
        # a refused change leaves everything as it was (the modify comes first)
        reply = c.cmd('change alias=neu make alias=neu2 phone="\u00fc"')
        assert reply[-1].startswith("5") and "written" not in reply[-1], reply
        assert slapd.search(PEOPLE, "(uid=neu)", "telephoneNumber") == {f"uid=neu,{PEOPLE}": {}}
        # a rename the directory refuses after the modify: the record keeps its old name
        slapd.ldap("ldapadd", input=f"dn: uid=neu3,{PEOPLE}\nobjectClass: account\nuid: neu3\n")
        reply = c.cmd('change alias=neu make alias=neu3 email=neu@example.org')
        assert "its other changes were written" in reply[-1], reply
        shown = c.cmd("query alias=neu return email")
        assert any("neu@example.org" in line for line in shown), shown
        assert slapd.search(PEOPLE, "(uid=neu)", "mail")[f"uid=neu,{PEOPLE}"]["mail"] == [
            "neu@example.org"]


def test_notes_that_look_like_a_field_read_back_as_notes(slapd, tmp_path):
    loop = asyncio.new_event_loop()
    store = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN, ROOTPW).open()
    notes = "pharos:created=1999-01-01T00:00:00Z"
    try:
        async def write(ops):
            return await store.commit(ops)
        loop.run_until_complete(write([(store.pending.new_id(), {
            "type": "person", "alias": "descn", "name": "D", "notes": notes})]))
    finally:
        loop.run_until_complete(store.close())
        loop.close()
    again = pharos.LdapStore(pharos.Schema(), f"{slapd.url}/{SUFFIX}", ROOTDN, ROOTPW).open()
    record = next(r for r in again.directory.records.values() if r["alias"] == "descn")
    assert record["notes"] == notes and record.get("created") != "1999-01-01T00:00:00Z"
    asyncio.new_event_loop().run_until_complete(again.close())


def test_a_change_keeps_prefixed_descriptions_pharos_did_not_take(slapd, pharos_on):
    slapd.ldap("ldapadd", "-c", input=f"dn: {PEOPLE}\nobjectClass: organizationalUnit\n"
                                      f"ou: people\n", check=False)
    slapd.ldap("ldapadd", input=f"dn: uid=ext,{PEOPLE}\nobjectClass: inetOrgPerson\nuid: ext\n"
                                f"cn: Ext\nsn: Ext\ndescription: pharos:role=keep\n"
                                f"description: pharos:alias:json=\"evil\"\n")
    with pharos_on.client() as c:
        wait_for(lambda: c.cmd("query alias=ext")[-1] == "200:Ok.", what="ext")
        assert c.cmd('change alias=ext make notes="new note"')[-1].startswith("200"), "change"
    values = slapd.search(PEOPLE, "(uid=ext)", "description")[f"uid=ext,{PEOPLE}"]["description"]
    assert {"pharos:role=keep", 'pharos:alias:json="evil"', "new note"} <= set(values), values


def test_a_bind_dn_that_may_not_read_entry_uuids_is_one_line_and_exit_3(slapd, tmp_path):
    acl = (f"dn: olcDatabase={{1}}mdb,cn=config\nchangetype: modify\nadd: olcAccess\n"
           f"olcAccess: {{0}}to attrs=entryUUID by dn.exact=cn=blind,{SUFFIX} none by * read\n")
    done = subprocess.run(["ldapmodify", "-Q", "-Y", "EXTERNAL", "-H", slapd.ldapi_url],
                          input=acl, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    slapd.ldap("ldapadd", input=f"dn: cn=blind,{SUFFIX}\nobjectClass: organizationalRole\n"
                                f"objectClass: simpleSecurityObject\ncn: blind\n"
                                f"userPassword: blindpw\n")
    done = subprocess.run([sys.executable, str(PHAROS), "serve", "--tier", "dev", "--listen",
                           "127.0.0.1:0", "--metrics", "off", "--data", str(tmp_path / "d"),
                           "--storage", f"{slapd.url}/{SUFFIX}", "--ldap-bind-dn",
                           f"cn=blind,{SUFFIX}"], env=dict(os.environ, PHAROS_LDAP_PASSWORD="blindpw"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stderr.count("\n") == 1, done.stderr
    assert "entryUUID" in done.stderr


def test_a_fifo_in_place_of_the_image_is_not_read(slapd, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "ldap.image")
    add_people(slapd, "ann")
    logs = []
    store = image_store(slapd, data, logs)
    assert any("not using" in m and "not a regular file" in m for m in logs), logs
    assert [a for a, _, _ in served(store)] == ["ann"]
    asyncio.new_event_loop().run_until_complete(store.close())
