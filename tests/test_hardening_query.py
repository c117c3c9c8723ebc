"""Cheap requests must stay cheap: a too-broad query is refused from the postings' sizes,
a search is done a bounded number of steps per turn of the loop, and a dump cursor costs
a few bytes an entry, lives as long as its connection and is capped per server."""

import asyncio
import gc
import sys
import tracemalloc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import dataset  # noqa: E402
import pharos  # noqa: E402
from pharos import MemoryStore, Schema, parse_selection, tokenize  # noqa: E402


def loaded_store(people, extra=()):
    """A memory store with ``people`` benchmark people (bulk-loaded, as start-up does)."""
    data = dataset.Dataset(max(people, 1))
    records = [data.person(i) for i in range(people)] + list(extra)
    store = MemoryStore(Schema())
    store.load_records([[rid, r] for rid, r in enumerate(records, 1)])
    return store


def session_on(store, **config):
    """A PhSession on an in-process server (no listener) over ``store``."""
    server = pharos.PhServer(store, pharos.ServerConfig(tier="dev", **config), lambda m: None)
    return pharos.PhSession(server, ("127.0.0.1", 40000))


def ask(session, text):
    """The reply to one request, run on a fresh event loop."""
    async def go():
        reply, _, _ = await session.execute(text)
        return reply
    return asyncio.run(go())


def selection(store, text):
    sel, errors = parse_selection(store.schema, tokenize(text))
    assert not errors
    return sel


def counted(source, pulled):
    """``source``, counting in ``pulled`` each candidate taken from it."""
    for item in source:
        pulled.append(1)
        yield item


def test_a_too_broad_query_is_refused_from_posting_sizes_without_a_step():
    store = loaded_store(3000)
    for text in ("type=person", "department=engineering type=person"):
        search = store.search(selection(store, text), None, 100)
        pulled = []
        search.source = counted(search.source, pulled)
        assert search.run() and search.too_many, text
        assert pulled == [] and search.hits == [], text


def test_a_bare_word_refused_from_its_largest_posting():
    """A bare word searches name and nickname: the larger posting alone decides."""
    extra = [{"type": "person", "alias": f"nick{i}", "name": f"Someone {i}", "nickname": "zed"}
             for i in range(6)]
    store = loaded_store(10, extra)
    assert ask(session_on(store, max_results=5), "query zed") == "502:Too many entries to print.\n"
    assert ask(session_on(store, max_results=6), "query zed").startswith("102:There were 6 matches")


def people(n, department, **more):
    return [{"type": "person", "alias": f"{department}{i}", "name": f"Member {i}",
             "department": department, **more} for i in range(n)]


@pytest.mark.parametrize("request_", [
    "department=five", "five", "department=fiv*", "department=five name=member",
    "name=member department=f*e", "department=five type=person"])
def test_the_limit_is_exact_at_max_and_max_plus_one(request_):
    """max matches are answered, max + 1 get 502, whatever the plan (one posting, a bare
    word, a wildcard, terms ANDed) and whatever the bounds the postings give."""
    for n, answered in ((5, True), (6, False)):
        extra = people(n, "five") + people(40, "other")
        if request_ == "five":                  # by nickname, some by name as well: once each
            extra = [{"type": "person", "alias": f"nk{i}", "nickname": "five",
                      "name": "Five Else" if i % 2 else "Someone Else"} for i in range(n)]
        store = loaded_store(30, extra)
        reply = ask(session_on(store, max_results=5), f"query {request_} return alias")
        count = n
        if answered:
            assert reply.startswith(f"102:There were {count} matches"), (request_, reply[:80])
        else:
            assert reply == "502:Too many entries to print.\n", (request_, n)


def test_a_tenant_narrows_the_count_the_postings_give():
    """A tenant's view: the type posting holds more than max, the tenant holds max."""
    extra = people(5, "blue", tenant="blue")
    store = loaded_store(50, extra)
    for limit, answered in ((5, True), (4, False)):
        search = store.search(selection(store, "type=person"), "blue", limit)
        while not search.run(7):
            pass
        assert search.too_many is not answered
        if answered:
            assert sorted(store.get(r)["alias"] for r in search.ordered()) == \
                [f"blue{i}" for i in range(5)]


def test_one_run_examines_a_bounded_number_of_candidates():
    store = loaded_store(5000)
    for text in ("name=*zq*", "department=engineering title=nobody*", "type=person"):
        search = store.search(selection(store, text), None, None)
        pulled, runs = [], 0
        search.source = counted(search.source, pulled)
        while True:
            before = len(pulled)
            done = search.run(50)
            assert len(pulled) - before <= 50, text
            runs += 1
            if done:
                break
        assert runs > 5, text                  # the work really was spread over runs


def test_a_slow_query_lets_other_connections_be_served_meanwhile():
    """A sparse wildcard over many keys is answered over several turns of the loop; a
    lookup sent meanwhile on another connection is answered at once."""
    store = loaded_store(20000, [{"type": "person", "alias": "rare", "name": "Qqzzy Person"}])
    slow, quick = session_on(store), session_on(store)

    async def go():
        pending = slow.begin("query name=*qqz* return alias")
        assert type(pending) is not tuple and not pending.settled
        reply, _, _ = quick.begin("query alias=rare return alias")
        assert "rare" in reply and not pending.settled
        reply, _, _ = await pending
        return reply
    reply = asyncio.run(go())
    assert reply.startswith("102:There was 1 match") and "rare" in reply


def test_records_changed_between_runs_are_judged_as_they_are_now():
    extra = people(30, "ops")
    store = loaded_store(0, extra)
    # two terms: a lone exact term whose posting fits in one run is answered as it is made
    search = store.search(selection(store, "type=person department=ops"), None, None)
    assert not search.run(5)
    ids = [rid for rid, r in store.directory.records.items() if r["department"] == "ops"]
    gone, moved, renamed = ids[10], ids[11], ids[12]
    store.apply([(gone, None),
                 (moved, dict(store.get(moved), department="dev")),
                 (renamed, dict(store.get(renamed), name="Renamed Member"))])
    while not search.run(5):
        pass
    found = search.ordered()
    assert gone not in found and moved not in found and renamed in found
    assert len(found) == 28


def held_bytes(action):
    """Bytes allocated by ``action()`` and still held after it (its reply dropped)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_dump_cursor_costs_a_few_bytes_an_entry():
    store = loaded_store(20000)
    session = session_on(store)
    held = held_bytes(lambda: ask(session, "dump type=person return alias"))
    assert session.cursor is not None
    assert held < 20000 * 8 + 64 * 1024, held


def test_a_dump_shows_records_as_they_are_when_their_page_is_sent():
    store = loaded_store(0, people(12, "ops"))
    session = session_on(store, max_results=5)
    first = ask(session, "dump department=ops return alias name")
    assert first.startswith("102:There were 12 matches") and "ops0" in first
    by_alias = {r["alias"]: rid for rid, r in store.directory.records.items()}
    store.apply([(by_alias["ops5"], None),
                 (by_alias["ops6"], dict(store.get(by_alias["ops6"]), name="Now Renamed"))])
    second = ask(session, "dump")
    assert "ops5" not in second and "Now Renamed" in second
    assert "\n-200:10:" in second                     # numbering kept through the gap


def test_dump_cursors_are_capped_per_connection_and_per_server():
    store = loaded_store(50)
    sessions = [session_on(store, max_dumps=2) for _ in range(3)]
    server = sessions[0].server
    for s in sessions[1:]:
        s.server = server
    for s in sessions[:2]:
        assert ask(s, "dump type=person").startswith("102:")
    assert ask(sessions[0], "dump department=engineering").startswith("102:")   # replaces
    assert len(server.dumps) == 2
    assert ask(sessions[2], "dump type=person") == \
        "400:Too many dumps open (limit 2); try again later.\n"
    sessions[0].close()
    assert len(server.dumps) == 1
    assert ask(sessions[2], "dump type=person").startswith("102:")


def test_a_dump_cursor_is_released_when_its_connection_closes():
    store = loaded_store(3000)

    async def go():
        server = pharos.PhServer(store, pharos.ServerConfig(tier="dev"), lambda m: None)
        host, port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"dump type=person return alias\n")
        while not (await reader.readline()).startswith(b"200:"):
            pass
        assert len(server.dumps) == 1
        writer.close()
        await writer.wait_closed()
        for _ in range(500):                   # the server sees the close on a later turn
            if not server.dumps:
                break
            await asyncio.sleep(0.01)
        remaining = len(server.dumps)
        await server.shutdown(1)
        return remaining
    assert asyncio.run(go()) == 0


def test_a_lone_term_is_answered_as_it_is_made_with_types_and_tenants_kept():
    extra = (people(3, "ops") + people(2, "ops", tenant="acme") +
             [{"type": "machine", "hostname": "ops", "role": "ops"}])
    store = loaded_store(0, extra)
    search = store.search(selection(store, "department=ops"), None, None)
    assert search.done and len(search.ordered()) == 5
    search = store.search(selection(store, "department=ops"), "acme", None)
    assert search.done and {store.get(r)["alias"] for r in search.ordered()} == {"ops0", "ops1"}
    assert all(store.get(r)["tenant"] == "acme" for r in search.ordered())
    search = store.search(selection(store, "department=ops"), None, 4)
    assert search.done and search.too_many
    for text in ("department=o*", "department=*p*", "department=?ps"):
        lone = store.search(selection(store, text), "acme", None)
        stepped = store.search(selection(store, "type=person " + text), "acme", None)
        assert lone.done and not stepped.done
        stepped.complete()
        assert lone.ordered() == stepped.ordered() and len(lone.ordered()) == 2
    big = loaded_store(0, people(pharos.SEARCH_STEPS + 1, "big"))
    search = big.search(selection(big, "department=big"), None, None)
    assert not search.done            # past one run's budget: searched a run at a time
    while not search.run():
        pass
    assert len(search.ordered()) == pharos.SEARCH_STEPS + 1
