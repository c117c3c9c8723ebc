"""A write is seen by other connections only once it is durable, and keys stay unique.

The order of events is taken from the kernel, not from the test's threads: every socket
asks for SO_TIMESTAMPNS, so each reply carries the time the server's bytes reached the
loopback device. A server that shows a record before its writer's 200 has left sends
a reader's reply holding it before that 200; threads waking late cannot hide or fake it.
"""

import asyncio
import re
import resource
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

from conftest import need

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pharos  # noqa: E402
from pharos import FileStore, Schema, parse_selection, tokenize  # noqa: E402

SO_TIMESTAMPNS = 35                     # Linux; Python's socket module does not name it
TIMESPEC = struct.Struct("@ll")
ALIAS_RE = re.compile(r"alias: (vis\d+x\d+)")
WRITERS, READERS, SECONDS = 16, 4, 4.0


class StampedClient:
    """A Ph connection whose every reply comes with the kernel's time of its first bytes."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.buf, self.lines = b"", []

    def recv(self):
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(TIMESPEC.size))
        if not data:
            raise EOFError("server closed the connection")
        stamps = [TIMESPEC.unpack(raw[:TIMESPEC.size]) for level, kind, raw in ancillary
                  if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS]
        assert stamps, "the kernel gave no receive timestamp"
        seconds, nanos = stamps[0]
        return data, seconds * 1_000_000_000 + nanos

    def cmd(self, text):
        """(reply text, kernel time its first bytes arrived)."""
        self.sock.sendall(text.encode() + b"\n")
        stamp = None
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                last = raw.decode()
                self.lines.append(last)
                if not last.startswith("-") and int(last[:3]) >= 200:
                    reply, self.lines = "\n".join(self.lines), []
                    return reply, stamp
            data, at = self.recv()
            stamp = at if stamp is None else stamp
            self.buf += data

    def close(self):
        self.sock.close()


class Race:
    """What the writers and readers share: acknowledgement and first-sight times by alias."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked, self.seen = {}, {}
        self.in_flight = [None] * WRITERS
        self.stop = threading.Event()
        self.errors = []

    def write(self, port, k):
        client, n = StampedClient(port), 0
        try:
            while not self.stop.is_set():
                alias = f"vis{k}x{n}"
                self.in_flight[k] = alias
                reply, stamp = client.cmd(f'add type=person alias={alias} name="Vis {k} {n}"')
                if reply != "200:Ok.":
                    self.errors.append(f"add {alias}: {reply!r}")
                    return
                with self.lock:
                    self.acked[alias] = stamp
                n += 1
        finally:
            client.close()

    def read(self, port):
        client = StampedClient(port)
        try:
            while not self.stop.is_set():
                for alias in list(self.in_flight):
                    if alias is None:
                        continue
                    reply, stamp = client.cmd(f"query alias={alias} return alias")
                    with self.lock:
                        for found in ALIAS_RE.findall(reply):
                            self.seen.setdefault(found, stamp)
        finally:
            client.close()

    def run(self, port):
        threads = [threading.Thread(target=self.guard, args=(self.write, port, k))
                   for k in range(WRITERS)]
        threads += [threading.Thread(target=self.guard, args=(self.read, port))
                    for _ in range(READERS)]
        for thread in threads:
            thread.start()
        self.stop.wait(SECONDS)
        self.stop.set()
        for thread in threads:
            thread.join(timeout=60)

    def guard(self, work, *args):
        try:
            work(*args)
        except Exception as e:
            self.errors.append(f"{work.__name__}: {e!r}")
            self.stop.set()

    def early(self):
        """Aliases a reader was sent before their writer was sent the 200."""
        return sorted(a for a, at in self.seen.items()
                      if a not in self.acked or at < self.acked[a])


def test_no_connection_sees_a_write_before_its_writer_is_told_it_is_durable(server):
    need(sys.platform == "linux", "Linux (SO_TIMESTAMPNS receive timestamps)")
    race = Race()
    race.run(server.port)
    assert not race.errors, race.errors[:5]
    assert len(race.acked) > 200 and len(race.seen) > 50, (len(race.acked), len(race.seen))
    early = race.early()
    assert not early, (f"{len(early)} of {len(race.seen)} records seen were shown to a "
                       f"reader before their writer got 200: {early[:5]}")


@pytest.mark.parametrize("rtype,field", [("machine", "hostname"), ("person", "alias")])
def test_concurrent_adds_of_one_key_let_exactly_one_through(server, rtype, field):
    clients = [StampedClient(server.port) for _ in range(32)]
    replies, start = [None] * 32, threading.Barrier(32)

    def add(i):
        start.wait()
        try:
            replies[i] = clients[i].cmd(f"add type={rtype} {field}=same-key-{rtype}")[0]
        except Exception as e:          # shown in the assertion below, not lost in the thread
            replies[i] = f"{type(e).__name__}: {e}"
    threads = [threading.Thread(target=add, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for client in clients:
        client.close()
    ok = [r for r in replies if r == "200:Ok."]
    assert len(ok) == 1, replies
    assert all(r is not None and r.endswith("599:Add command not understood.") and "509:" in r
               for r in replies if r not in ok), replies
    with server.client() as client:
        found = client.cmd(f"query {field}=same-key-{rtype} return {field}")
    assert found[-1] == "200:Ok." and sum(f"{field}: same-key-" in x for x in found) == 1, found


# -- the file store: pending writes are planned on, not shown ------------------------------

NOW = 1_800_000_000.0


def file_store(tmp_path):
    return FileStore(Schema(), tmp_path / "data").open()


def plan_add(store, rtype, **fields):
    return store.plan_add(rtype, {k: [v] for k, v in fields.items()}, NOW)


def planned_ids(store, text):
    selection, errors = parse_selection(store.schema, tokenize(text))
    assert not errors
    return store.select_planned(selection)


def shown(store, text):
    selection, errors = parse_selection(store.schema, tokenize(text))
    assert not errors
    return [store.get(rid) for rid in store.select(selection)]


async def wait(later):
    return await later


def run(store, scenario):
    async def body():
        try:
            await scenario()
        finally:
            await store.close()
    asyncio.run(body())


def test_pending_writes_are_planned_on_but_shown_only_once_durable(tmp_path):
    store = file_store(tmp_path)

    async def scenario():
        first = store.commit(plan_add(store, "machine", hostname="web1"))
        with pytest.raises(pharos.RecordError, match="in use"):
            plan_add(store, "machine", hostname="WEB1")
        [rid] = planned_ids(store, "hostname=web1")
        ops, errors = store.plan_change([rid], {"os": ["linux"]}, NOW)
        second = store.commit(ops)
        ops, errors = store.plan_change([rid], {"location": ["rack 4"]}, NOW)
        third = store.commit(ops)
        assert shown(store, "hostname=web1") == [] and store.get(rid) is None
        await first, await second, await third
        [record] = shown(store, "hostname=web1")
        assert (record["os"], record["location"]) == ("linux", "rack 4")
        assert store.pending.records == {} and store.pending.keys == {}
    run(store, scenario)


def test_a_pending_rename_frees_the_old_key_and_takes_the_new_one(tmp_path):
    store = file_store(tmp_path)

    async def scenario():
        await store.commit(plan_add(store, "machine", hostname="old"))
        [rid] = planned_ids(store, "hostname=old")
        ops, errors = store.plan_change([rid], {"hostname": ["new"]}, NOW)
        renamed = store.commit(ops)
        assert planned_ids(store, "hostname=old") == [] and planned_ids(store, "hostname=new")
        with pytest.raises(pharos.RecordError, match="in use"):
            plan_add(store, "machine", hostname="new")
        again = store.commit(plan_add(store, "machine", hostname="old"))
        gone = store.commit([(rid, None)])
        assert [r["hostname"] for r in shown(store, "hostname=old")] == ["old"]
        await renamed, await again, await gone
        assert [r["hostname"] for r in shown(store, "hostname=old")] == ["old"]
        assert shown(store, "hostname=new") == []
        assert store.pending.records == {} and store.pending.keys == {}
    run(store, scenario)


@pytest.fixture
def journal_size_limit():
    """Set the process's file size limit (RLIMIT_FSIZE) so writes past it fail (EFBIG);
    ``limit(None)`` lifts it again. The test lifts it itself as soon as the writes have
    failed: pytest writes its report before a fixture's teardown, to a file perhaps."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda size: resource.setrlimit(resource.RLIMIT_FSIZE,
                                          (soft if size is None else size, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old)


def test_a_failed_journal_write_leaves_the_directory_as_it_was(tmp_path, journal_size_limit):
    store = file_store(tmp_path)

    async def scenario():
        await store.commit(plan_add(store, "machine", hostname="kept"))
        [rid] = planned_ids(store, "hostname=kept")
        before = store.get(rid)
        journal_size_limit(store.writer.size)
        ops, errors = store.plan_change([rid], {"hostname": ["moved"]}, NOW)
        changed = store.commit(ops)
        added = store.commit(plan_add(store, "machine", hostname="lost"))
        follow = []         # as a client's next request would, once told of the failure
        added.then(lambda _: follow.append(store.commit(plan_add(store, "machine",
                                                                 hostname="after"))))
        for later in (changed, added):
            with pytest.raises(pharos.StoreError, match="Store failed"):
                await later
        with pytest.raises(pharos.StoreError, match="Store failed"):
            await asyncio.wait_for(asyncio.ensure_future(wait(follow[0])), 10)
        journal_size_limit(None)
        assert store.get(rid) is before and shown(store, "hostname=moved") == []
        assert shown(store, "hostname=lost") == [] and planned_ids(store, "hostname=lost") == []
        assert store.pending.records == {} and store.pending.keys == {}
        plan_add(store, "machine", hostname="moved")        # its key was never taken
    try:
        run(store, scenario)
    finally:
        journal_size_limit(None)
