"""Denial of service from clients that go away or hold on: a client that closes stops
holding its connection slot and its work at once (a refused login's delayed answer, a
search under way), heavy searches are capped per server and per network, and dumps are
capped per network while a full server expires its long-unused ones."""

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import dataset  # noqa: E402
import pharos  # noqa: E402
from pharos import MemoryStore, Schema  # noqa: E402

HEAVY = "query " + " ".join(f"ip=*{n}*" for n in range(15)) + " return hostname"
DEADLINE = 20.0                 # seconds; generous, the conditions come in milliseconds


def machine_store(machines):
    """A memory store with ``machines`` benchmark machines (bulk-loaded, as start-up does)."""
    data = dataset.Dataset(max(machines, 1))
    store = MemoryStore(Schema())
    store.load_records([[rid, data.machine(i)] for rid, i in zip(range(1, machines + 1),
                                                                  range(machines))])
    return store


def small_store():
    """A memory store of a few people, whose searches end in one run."""
    store = MemoryStore(Schema())
    store.load_records([[n, {"type": "person", "alias": f"p{n}", "name": f"Person {n}"}]
                        for n in range(1, 21)])
    return store


def server_on(store, **config):
    """An in-process PhServer (no listener yet) over ``store``."""
    return pharos.PhServer(store, pharos.ServerConfig(tier="lab", **config), lambda m: None)


async def until(condition, deadline=DEADLINE):
    """Wait on the running loop until ``condition()`` holds; whether it did in time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.005)
    return True


def reply_of(outcome):
    """The reply text of an outcome that was ready at once."""
    assert type(outcome) is tuple, outcome
    return outcome[0]


# -- 1. a refused login's delayed answer does not keep the slot of a client gone ------------

def test_failed_logins_of_clients_gone_free_their_slots_at_once():
    """Clients that send a wrong answer and close at once: a new client that finds the
    server full takes the slot of one of them (its delayed answer cancelled), while the
    delays (30 s) still run; twice as many such clients as the cap all get in."""
    async def go():
        server = server_on(small_store(), max_connections=5, login_delay=30.0)
        host, port = await server.start("127.0.0.1", 0)
        for _ in range(10):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"login root\n")
            assert (await reader.readline()).startswith(b"301:")
            writer.write(b"answer U1NIU0lHAAAAAQ==\n")
            await writer.drain()
            writer.close()
        departed = await until(lambda: len(server.departed) == 5)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"status\n")
        probe = await reader.readline()
        writer.close()
        await server.shutdown(1)
        return departed, probe
    departed, probe = asyncio.run(go())
    assert departed
    assert probe == b"200:Database ready.\n"


def test_a_client_that_ends_its_side_still_gets_the_delayed_refusal():
    """A half-close (printf ... | nc) is no hang-up: with room on the server, the refusal
    still comes after its delay, then the requests after it are answered."""
    async def go():
        server = server_on(small_store(), login_delay=0.2)
        host, port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"login root\n")
        await reader.readline()
        writer.write(b"answer U1NIU0lHAAAAAQ==\nstatus\n")
        writer.write_eof()
        replies = await asyncio.wait_for(reader.read(), DEADLINE)
        writer.close()
        await server.shutdown(1)
        return replies
    assert asyncio.run(go()) == b"500:Login failed.\n200:Database ready.\n"


def test_a_client_that_waits_still_gets_the_delayed_refusal():
    async def go():
        server = server_on(small_store(), login_delay=0.2)
        host, port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"login root\n")
        await reader.readline()
        loop = asyncio.get_running_loop()
        sent = loop.time()
        writer.write(b"answer U1NIU0lHAAAAAQ==\n")
        answer = await asyncio.wait_for(reader.readline(), DEADLINE)
        waited = loop.time() - sent
        writer.close()
        await server.shutdown(1)
        return answer, waited
    answer, waited = asyncio.run(go())
    assert answer == b"500:Login failed.\n"
    assert waited >= 0.2


# -- 2. heavy searches: abandoned ones stop, and they are capped ----------------------------

def counted(source, pulled):
    """``source``, counting in ``pulled`` each candidate taken from it."""
    for item in source:
        pulled.append(1)
        yield item


def test_a_search_stops_when_its_client_closes():
    """A long search whose client sent its query and closed: the connection goes, and the
    search makes no step after it."""
    store = machine_store(20000)

    async def go():
        server = server_on(store)
        searches, real = [], server.service.search

        def spied(*args, **kwargs):
            search = real(*args, **kwargs)
            search.pulled = []
            search.source = counted(search.source, search.pulled)
            searches.append(search)
            return search
        server.service.search = spied
        host, port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(HEAVY.encode() + b"\n")
        await writer.drain()
        writer.close()
        gone = await until(lambda: searches and not server.connections)
        steps = len(searches[0].pulled)
        for _ in range(50):
            await asyncio.sleep(0)
        after = len(searches[0].pulled)
        await server.shutdown(1)
        return gone, searches[0], steps, after
    gone, search, steps, after = asyncio.run(go())
    assert gone
    assert not search.done, "the search ran to its end for a client gone"
    assert after == steps
    assert search.pulled


def peer_session(server, address):
    """A PhSession of ``server`` for a client at ``address``."""
    return pharos.PhSession(server, (address, 40000))


def test_searches_over_many_turns_are_capped_per_network_and_per_server():
    store = machine_store(5000)

    async def go():
        server = server_on(store)
        same = [peer_session(server, f"10.1.1.{n}") for n in range(1, 4)]
        pending = [s.begin(HEAVY) for s in same[:2]]
        assert all(type(p) is pharos.Later and not p.settled for p in pending)
        per_network = reply_of(same[2].begin(HEAVY))
        others = [peer_session(server, f"10.2.{n}.1") for n in range(pharos.MAX_SEARCHES)]
        pending += [s.begin(HEAVY) for s in others[:pharos.MAX_SEARCHES - 2]]
        per_server = reply_of(others[-1].begin(HEAVY))
        quick = reply_of(others[-1].begin("query hostname=nosuchhost"))
        for later in pending:
            await later
        after = await others[-1].execute(HEAVY)
        return per_network, per_server, quick, after[0], dict(server.searching)
    per_network, per_server, quick, after, left = asyncio.run(go())
    assert per_network == ("400:Too many searches under way from your network (limit 2); "
                           "try again later.\n")
    assert per_server == "400:Too many searches under way (limit 8); try again later.\n"
    assert quick == "501:No matches to your query.\n"   # one run: never capped
    assert after.startswith(("102:", "501:", "502:"))    # the counts were given back
    assert left == {}


def test_the_search_caps_are_documented_in_help_query():
    session = peer_session(server_on(small_store()), "127.0.0.1")
    text = reply_of(session.begin("help query"))
    assert "400" in text and "try again later" in text


def test_one_run_of_many_terms_makes_a_bounded_number_of_term_checks():
    """Each candidate is checked against every term: a turn's budget counts the checks."""
    store = machine_store(5000)
    session = peer_session(server_on(store), "127.0.0.1")
    selection, _, errors = session.parse_query(pharos.tokenize(HEAVY)[1:])
    assert not errors
    search = store.search(selection, None, None)
    pulled = []
    search.source = counted(search.source, pulled)
    assert not search.run()
    assert len(pulled) * len(search.terms) <= pharos.SEARCH_STEPS + len(search.terms)


# -- 3. dumps: capped per network; a full server expires the least recently used idle one ---

def open_dump(session, now, text="dump type=person return alias"):
    return reply_of(session.begin(text, now))


def test_dumps_are_capped_per_network():
    server = server_on(small_store())
    mine = [peer_session(server, f"10.3.3.{n}") for n in range(1, 6)]
    for s in mine[:4]:
        assert open_dump(s, 1000.0).startswith("102:")
    assert open_dump(mine[4], 1000.0) == ("400:Too many dumps open from your network "
                                          "(limit 4); try again later.\n")
    assert open_dump(peer_session(server, "10.3.4.1"), 1000.0).startswith("102:")
    assert open_dump(mine[0], 1000.0).startswith("102:")   # a new dump replaces its own


def test_a_full_server_expires_its_least_recently_used_idle_dump():
    """Idle dumps whose connections stay alive (a status now and then) give way to a new
    export once unused for DUMP_IDLE_EVICT; the one expired says so at its next dump."""
    server = server_on(small_store(), max_dumps=3, max_results=5)
    idle = [peer_session(server, f"10.4.{n}.1") for n in range(3)]
    for s, opened in zip(idle, (1000.0, 1000.0, 1005.0)):
        assert open_dump(s, opened).startswith("102:")
    assert open_dump(idle[0], 1020.0, "dump").startswith("102:")   # used again: not oldest
    for s in idle:
        assert reply_of(s.begin("status", 1025.0)).startswith("200:")
    export = peer_session(server, "10.9.9.9")
    assert open_dump(export, 1020.0) == "400:Too many dumps open (limit 3); try again later.\n"
    late = 1000.0 + pharos.DUMP_IDLE_EVICT + 1
    assert open_dump(export, late).startswith("102:")
    expired = reply_of(idle[1].begin("dump", late))
    assert expired.startswith("400:Dump expired") and expired.count("\n") == 1
    assert open_dump(idle[0], late, "dump").startswith("102:")
    assert open_dump(idle[2], late, "dump").startswith("102:")
    assert len(server.dumps) == 3
