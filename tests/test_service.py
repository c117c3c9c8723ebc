"""The directory service: what holds for every front end, tried through Ph and in process.

* a login lasts only as long as the key line that allowed it: a removed key is logged out
  and a changed role or tenant applies from the next request, on connections already open;
* the whole-request methods (MCP and the console use them) decide, limit and audit as
  the Ph verbs do.
"""

import asyncio
import os
import sys

import pytest

from conftest import ROOT, wait_for
from test_auth import allowed, by_file, keys, login, make_server, ok_login, serving  # noqa: F401

sys.path.insert(0, str(ROOT))
import pharos  # noqa: E402


@pytest.fixture
def lab_two(keys, tmp_path):
    lines = [allowed("root", keys["root"], 'role="admin"'),
             allowed("alice", keys["ta"], 'role="writer"')]
    yield from serving(make_server(tmp_path, "lab", lines))


def rewrite_keys(srv, lines):
    """Replace the key file the way an editor would, and make its change visible at once."""
    path = srv.data / "authorized_keys"
    tmp = path.with_name("authorized_keys.new")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def test_a_removed_key_is_logged_out_on_open_connections(lab_two, keys):
    with lab_two.client() as c:
        assert login(c, "alice", by_file(keys["ta"])) == ok_login("alice")
        assert c.cmd("add alias=before name=Before") == ["200:Ok."]
        rewrite_keys(lab_two, [allowed("root", keys["root"], 'role="admin"')])
        n = [0]

        def refused():
            n[0] += 1
            return c.cmd(f"add alias=after{n[0]} name=After")[-1].startswith("506:")
        wait_for(refused, timeout=10, interval=0.2, what="the removed key to stop working")


def test_a_demoted_key_loses_its_writes_at_the_next_request(lab_two, keys):
    with lab_two.client() as c:
        assert login(c, "alice", by_file(keys["ta"])) == ok_login("alice")
        rewrite_keys(lab_two, [allowed("root", keys["root"], 'role="admin"'),
                               allowed("alice", keys["ta"], 'role="reader"')])
        n = [0]

        def refused():
            n[0] += 1
            return c.cmd(f"add alias=r{n[0]} name=R")[-1].startswith("511:")
        wait_for(refused, timeout=10, interval=0.2, what="the demoted key to lose its writes")
        assert c.cmd("query alias=r1")[-1].startswith(("501:", "200:"))


# -- the whole-request methods, in process --------------------------------------

def service(tier="dev", **config):
    store = pharos.MemoryStore(pharos.Schema())
    return pharos.DirectoryService(store, pharos.ServerConfig(tier=tier, **config))


def run(coro):
    return asyncio.run(coro)


def test_whole_request_methods_add_find_change_and_delete():
    svc, me = service(), pharos.Caller()

    async def story():
        record = await svc.add(me, "machine", {"hostname": ["nas"], "ip": ["10.0.0.5"]}, 0)
        assert record["status"] == "unknown" and record["source"] == "manual"
        assert [r["hostname"] for r in await svc.query(me, "nas", None, 0)] == ["nas"]
        dry = await svc.change(me, "hostname=nas", "machine", {"role": ["backup"]}, 0,
                               dry_run=True)
        assert dry["changed"] == 1 and dry["records"][0]["role"] == "backup"
        assert "role" not in (await svc.get(me, "machine", "nas", 0))
        await svc.change(me, "hostname=nas", "machine", {"role": ["backup"]}, 0)
        assert (await svc.get(me, None, "nas", 0))["role"] == "backup"
        with pytest.raises(pharos.ServiceError) as wrong:
            await svc.delete(me, "hostname=nas", None, 0, expected=2)
        assert wrong.value.code == 518 and await svc.get(me, None, "nas", 0)
        gone = await svc.delete(me, "hostname=nas", None, 0, expected=1)
        assert gone == {"matched": 1, "deleted": 1, "keys": ["nas"]}
        assert await svc.get(me, None, "nas", 0) is None
    run(story())


def test_whole_request_methods_keep_the_change_limit_and_refuse_bad_queries():
    svc, me = service(), pharos.Caller()

    async def story():
        for n in range(3):
            await svc.add(me, "person", {"alias": [f"p{n}"], "name": ["Pat Smith"]}, 0)
        with pytest.raises(pharos.ServiceError) as many:
            await svc.change(me, "smith", None, {"title": ["x"]}, 0, limit=2)
        assert many.value.code == 518
        with pytest.raises(pharos.ServiceError) as bad:
            await svc.query(me, "nosuch=1", None, 0)
        assert bad.value.code == 500 and bad.value.details[0][0] == 507
        narrow = pharos.DirectoryService(svc.store, pharos.ServerConfig(tier="dev", max_results=2))
        with pytest.raises(pharos.ServiceError) as broad:
            await narrow.query(me, "smith", None, 0)
        assert broad.value.code == 502
        assert len(await pharos.DirectoryService(
            svc.store, pharos.ServerConfig(tier="dev", max_results=3)).query(me, "smith", None, 0)) == 3
        stats = await svc.stats(me, 0)
        assert stats["people"] == 3 and stats["machines"] == 0
    run(story())


def test_whole_request_methods_follow_the_tier_and_the_tenant():
    svc = service("enterprise")

    class Who:
        def __init__(self, role, tenant):
            self.alias, self.role, self.tenant, self.fingerprint = "x", role, tenant, "SHA256:x"

    a, b = pharos.Caller(Who("writer", "a")), pharos.Caller(Who("writer", "b"))
    reader = pharos.Caller(Who("reader", "a"))

    async def story():
        with pytest.raises(pharos.ServiceError) as anonymous:
            await svc.query(pharos.Caller(), "x", None, 0)
        assert anonymous.value.code == 506
        await svc.add(a, "machine", {"hostname": ["web"]}, 0)
        await svc.add(b, "machine", {"hostname": ["web"]}, 0)    # the same key, another tenant
        assert [r["tenant"] for r in await svc.query(a, "web", None, 0)] == ["a"]
        with pytest.raises(pharos.ServiceError) as read_only:
            await svc.add(reader, "machine", {"hostname": ["db"]}, 0)
        assert read_only.value.code == 511
        assert (await svc.stats(b, 0))["machines"] == 1
        await svc.delete(b, "hostname=web", None, 0, expected=1)
        assert await svc.get(a, "machine", "web", 0) is not None
    run(story())


def test_stats_over_a_big_directory_lets_the_loop_serve_others_meanwhile():
    svc, me = service(), pharos.Caller()
    for n in range(3 * pharos.SEARCH_STEPS):
        svc.store.add_offline(pharos.new_record(svc.schema, "machine",
                                                {"hostname": [f"h{n}"]}, n))

    async def story():
        order = []

        async def other():
            order.append("other")

        async def counted():
            result = await svc.stats(me, 0)
            order.append("stats")
            return result
        result, _ = await asyncio.gather(counted(), other())
        return result, order
    result, order = run(story())
    assert result["machines"] == 3 * pharos.SEARCH_STEPS
    assert result["recent"][0]["hostname"] == f"h{3 * pharos.SEARCH_STEPS - 1}"
    assert order == ["other", "stats"]              # stats took turns: the other ran first
