"""Hardening of logins and the key list: findings of the security review, end to end.

* a key line that str.splitlines() would split is never checked as one key and read
  back as two (every such character, and every C0 control and DEL, over the wire);
* a tenant admin grants only its own tenant, and no role above its own;
* a change of identity on a connection drops what was held for the old one (dump cursor);
* failed logins are slowed per network prefix and in total, and a correct login is not.

Real ``pharos.py serve`` processes and real ``ssh-keygen`` keys, as in test_auth.py.
"""

import asyncio
import heapq
import sys
import time

import pytest

from conftest import ROOT, wait_for
from test_auth import (allowed, by_file, entries, keys, login, make_server, ok_login,  # noqa: F401
                       serving)

sys.path.insert(0, str(ROOT))
import pharos  # noqa: E402

# Every character str.splitlines() ends a line at, found from all of Unicode, plus the
# C0 controls and DEL: none may smuggle a second key into a line that was checked as one.
SEPARATORS = sorted({chr(c) for c in range(0x110000) if len(("a" + chr(c) + "b").splitlines()) == 2}
                    | {chr(c) for c in range(32)} | {"\x7f"})


def hardening_key_lines(keys):
    return [
        allowed("bb", keys["tb"], 'role="admin",tenant="b"'),
        allowed("bw", keys["ta"], 'role="writer",tenant="b"'),
        allowed("aw", keys["ra"], 'role="writer",tenant="a"'),
        allowed("root", keys["root"], 'role="admin",tenant="*"'),
    ]


@pytest.fixture
def enterprise_b(keys, tmp_path):
    yield from serving(make_server(tmp_path, "enterprise", hardening_key_lines(keys)))


def logged(srv, alias, key):
    c = srv.client()
    assert login(c, alias, by_file(key)) == ok_login(alias)
    return c


def smuggling_line(n, sep, keys):
    """A reader key of tenant b whose comment hides a global admin key behind ``sep``."""
    return (f'name{n} role="reader",tenant="b" {keys["late"].material()} comment{sep}'
            f'mallory role="admin",tenant="*" {keys["stranger"].material()} m')


# --------------------------------------------------------------------------
# 1. A key line is read back exactly as it was checked
# --------------------------------------------------------------------------

def test_separators_cannot_smuggle_a_key(enterprise_b, keys):
    assert {"\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"} <= \
        set(SEPARATORS)
    path = enterprise_b.data / "authorized_keys"
    before = path.read_text()
    accepted = []
    with logged(enterprise_b, "bb", keys["tb"]) as bb:
        for n, sep in enumerate(SEPARATORS):
            request = "keys add " + smuggling_line(n, sep, keys)
            bb.send_raw(request.encode() + b"\n")
            reply = bb.read_reply()
            if sep == "\n":                     # the wire itself ends the request there
                reply += bb.read_reply()
            if reply[0] == "200:Ok.":
                accepted.append(n)
            else:
                assert reply[0].startswith("512:Illegal key line: control"), (repr(sep), reply)
    text = path.read_text()
    # the file means the same to any reader: no line break but \n anywhere in it
    assert text.splitlines() == text.split("\n")[:-1]
    ring = pharos.KeyRing(text)
    assert ring.warnings == []
    added = [e for e in ring.entries if e.text not in before.splitlines()]
    assert sorted(int(e.principals[4:]) for e in added) == accepted
    assert all((e.role, e.tenant, e.key.blob) == ("reader", "b", keys["late"].blob) for e in added)
    assert not any(e.key.blob == keys["stranger"].blob for e in ring.entries)
    with enterprise_b.client() as c:
        assert login(c, "mallory", by_file(keys["stranger"])) == ["500:Login failed."]
    with logged(enterprise_b, "root", keys["root"]) as root:
        users = {e["user"] for e in entries(root.cmd("keys list")).values()}
        assert "mallory" not in users


@pytest.mark.parametrize("sep", ["\x1c", "\x85", "\u2028", "\x0b"])
def test_key_ring_splits_at_newline_only(keys, sep):
    line = smuggling_line(1, sep, keys)
    with pytest.raises(pharos.SSHFormatError, match="control or separator character"):
        pharos.parse_key_line(line)
    ring = pharos.KeyRing(line + "\n" + allowed("ok", keys["late"]) + "\n")
    assert [e.principals for e in ring.entries] == ["ok"] and len(ring.warnings) == 1
    assert ring.lines == [line, allowed("ok", keys["late"])]


def test_tab_and_unicode_comments_still_read(keys):
    entry = pharos.parse_key_line(f"al\u00e9 {keys['late'].material()} Jos\u00e9\tlaptop")
    assert (entry.principals, entry.comment) == ("al\u00e9", "Jos\u00e9\tlaptop")


def test_option_twice_refused(keys):
    with pytest.raises(pharos.SSHFormatError, match="more than once"):
        pharos.parse_key_line(allowed("x", keys["late"], 'tenant="b",tenant="*"'))


# --------------------------------------------------------------------------
# 1b. A tenant admin grants only its own tenant
# --------------------------------------------------------------------------

def test_tenant_admin_grants_only_its_tenant(enterprise_b, keys):
    path = enterprise_b.data / "authorized_keys"
    with logged(enterprise_b, "bb", keys["tb"]) as bb:
        for tenant in ("*", "a", "bb"):
            reply = bb.cmd("keys add " + allowed("x", keys["late"], f'role="reader",tenant="{tenant}"'))
            assert reply == ["510:You may only add keys of tenant b."], (tenant, reply)
        assert "x role" not in path.read_text()
        # a line without a tenant gets the admin's own
        assert bb.cmd("keys add " + allowed("newb", keys["late"], 'role="reader"')) == ["200:Ok."]
        [entry] = [e for e in pharos.KeyRing(path.read_text()).entries if e.principals == "newb"]
        assert (entry.tenant, entry.role, entry.comment) == ("b", "reader", "late@test")
        # ... also an authorized_keys line, whose user is the comment's first word
        assert bb.cmd(f"keys add {keys['stranger'].material()} plain@test") == ["200:Ok."]
        [entry] = [e for e in pharos.KeyRing(path.read_text()).entries if e.principals == "plain@test"]
        assert entry.tenant == "b"
        # list and remove reach only tenant b
        users = sorted(e["user"] for e in entries(bb.cmd("keys list")).values())
        assert users == ["bb", "bw", "newb", "plain@test"]
        assert bb.cmd("keys remove aw") == ["501:No matching keys."]
        assert bb.cmd(f"keys remove {keys['root'].fingerprint}") == ["501:No matching keys."]
        assert "aw " in path.read_text() and "root " in path.read_text()
    with enterprise_b.client() as c:
        assert login(c, "newb", by_file(keys["late"])) == ok_login("newb")
        assert c.cmd("keys list")[0].startswith("510:")


def test_grant_refusal_rules():
    def entry(role, tenant):
        options = {"role": role} | ({"tenant": tenant} if tenant else {})
        return pharos.AuthorizedKey("x", None, options, "", 0, "")
    assert pharos.grant_refusal("admin", None, entry("admin", "*")) is None
    assert pharos.grant_refusal("admin", "b", entry("admin", "b")) is None
    assert pharos.grant_refusal("admin", "b", entry("reader", "*")) is not None
    assert pharos.grant_refusal("admin", "b", entry("reader", None)) is not None
    assert pharos.grant_refusal("writer", None, entry("admin", "b")) is not None


# --------------------------------------------------------------------------
# 2. A change of identity drops what the connection held for the old one
# --------------------------------------------------------------------------

@pytest.fixture
def paged(keys, tmp_path):
    srv = make_server(tmp_path, "enterprise", hardening_key_lines(keys), start=False)
    srv.args += ["--max-results", "1"]
    yield from serving(srv.start())


@pytest.mark.parametrize("how", ["logout", "login"])
def test_dump_cursor_does_not_outlive_identity(paged, keys, how):
    with logged(paged, "aw", keys["ra"]) as aw:
        for n in range(3):
            assert aw.cmd(f"add alias=secret{n} name=\"A Secret {n}\"") == ["200:Ok."]
    with logged(paged, "bw", keys["ta"]) as c:
        assert c.cmd("add alias=bself name=\"B Self\"") == ["200:Ok."]
    with logged(paged, "aw", keys["ra"]) as c:
        first = c.cmd("dump name=secret")
        assert first[0] == "102:There were 3 matches to your request.", first
        if how == "logout":
            assert c.cmd("logout") == ["200:Ok."]
        assert login(c, "bw", by_file(keys["ta"])) == ok_login("bw")
        reply = c.cmd("dump")
        assert reply == ["501:No matches to your query."], reply
        assert c.cmd("dump name=self")[0] == "102:There was 1 match to your request."


# --------------------------------------------------------------------------
# 3. Failed logins are slowed per prefix and in total; a correct one is not
# --------------------------------------------------------------------------

def test_login_prefixes():
    assert pharos.login_prefix("10.1.2.3") == pharos.login_prefix("10.1.2.200") == "10.1.2.0/24"
    assert pharos.login_prefix("::ffff:10.1.2.3") == "10.1.2.0/24"
    assert pharos.login_prefix("2001:db8:0:1:ffff::1") == "2001:db8:0:1::/64"
    assert pharos.login_prefix("10.1.3.1") != pharos.login_prefix("10.1.2.1")


def simulate(guard, addresses, seconds):
    """Failed answers a flood gets in ``seconds`` when every address retries at once."""
    ready = [(0.0, a) for a in addresses]
    answered = 0
    while ready[0][0] <= seconds:
        now, address = heapq.heappop(ready)
        done = now + guard.failed(address, now)
        answered += done <= seconds
        heapq.heappush(ready, (done, address))
    return answered


def test_guard_bounds_one_prefix_and_the_total():
    base, seconds = 1.0, 300.0
    one_prefix = simulate(pharos.LoginGuard(base), [f"10.0.0.{n}" for n in range(200)], seconds)
    assert one_prefix / seconds <= pharos.LOGIN_FAIL_RATE / base + 200 / pharos.LOGIN_MAX_WAIT
    spread = [f"10.{n // 250}.{n % 250}.1" for n in range(1000)]
    total = simulate(pharos.LoginGuard(base), spread, seconds)
    assert total / seconds <= pharos.LOGIN_FAIL_RATE / base + 1000 / pharos.LOGIN_MAX_WAIT
    # one client retrying after each answer is slowed down as before
    single, now, waits = pharos.LoginGuard(base), 0.0, []
    for _ in range(15):
        waits.append(single.failed("10.9.9.9", now))
        now += waits[-1]
    assert waits[:3] == [1.0, 2.0, 3.0] and waits[-3:] == [pharos.LOGIN_MAX_DELAY] * 3


FLOOD_CONNECTIONS = 500
FLOOD_SECONDS = 6.0


async def flood_client(port, address, deadline, times):
    """Log in as nobody with a malformed answer, over and over, from ``address``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    try:
        while time.monotonic() < deadline:
            writer.write(b"login mallory\n")
            if not (await reader.readline()).startswith(b"301:"):
                return
            writer.write(b"answer AAAAnotasignature\n")
            reply = await asyncio.wait_for(reader.readline(), deadline + 1 - time.monotonic())
            assert reply == b"500:Login failed.\n", reply
            times.append(time.monotonic())
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()


async def flood_and_login(port, keys):
    """(failed answers within the window, seconds a correct login took) during a flood."""
    start = time.monotonic()
    deadline, times = start + FLOOD_SECONDS, []
    addresses = [f"127.{1 + n // 250}.{n % 250}.7" for n in range(FLOOD_CONNECTIONS)]
    flood = [asyncio.create_task(flood_client(port, a, deadline, times)) for a in addresses]
    await asyncio.sleep(FLOOD_SECONDS / 2)      # the flood is under way: now a real user
    took = await correct_login(port, keys)
    await asyncio.gather(*flood)
    return len([t for t in times if t <= deadline]), took


async def correct_login(port, keys):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.200.0.1", 0))
    try:
        writer.write(b"login root\n")
        challenge = (await reader.readline()).decode().strip()
        assert challenge.startswith("301:"), challenge
        answer = await asyncio.to_thread(by_file(keys["root"]), challenge[4:].encode())
        sent = time.monotonic()
        writer.write(f"answer {answer}\n".encode())
        reply = await asyncio.wait_for(reader.readline(), 30)
        assert reply == b"200:root:Hi how are you?\n", reply
        return time.monotonic() - sent
    finally:
        writer.close()


def test_flood_from_many_prefixes_is_bounded_and_a_good_login_is_prompt(keys, tmp_path):
    srv = make_server(tmp_path, "enterprise", hardening_key_lines(keys), start=False)
    srv.args += ["--login-delay", "1"]      # the default, over make_server's quick one
    srv.start()
    try:
        answered, took = asyncio.run(flood_and_login(srv.port, keys))
        rate = answered / FLOOD_SECONDS
        assert 0 < rate <= 2 * pharos.LOGIN_FAIL_RATE, (answered, rate)
        assert took < 2.0, took
        wait_for(lambda: srv.read_stderr().count("login as mallory") >= answered, 10,
                 what="the refusals in the log")
        assert "Traceback" not in srv.read_stderr()
    finally:
        srv.kill()
