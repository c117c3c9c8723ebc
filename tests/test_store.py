"""One storage contract, run against every store; plus the file store's own promises."""

import asyncio
import json
import os
import sys
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pharos  # noqa: E402
from pharos import FileStore, MemoryStore, Schema, parse_selection, tokenize  # noqa: E402

NOW = 1_800_000_000.0


LOOP = None


def run(coro):
    """Run a coroutine on the test's one event loop (a store lives on one loop)."""
    return LOOP.run_until_complete(coro)


@pytest.fixture(params=["memory", "file"])
def make_store(request, tmp_path):
    """A factory for a fresh store of each kind; file stores can be reopened on the same dir."""
    global LOOP
    LOOP = asyncio.new_event_loop()
    opened = []

    def make(**kw):
        if request.param == "memory":
            store = MemoryStore(Schema())
        else:
            store = FileStore(Schema(), tmp_path / "data", **kw).open()
        opened.append(store)
        return store
    make.kind = request.param
    yield make
    for store in opened:
        if store.kind == "file" and store.writer is not None:
            run(store.close())
    LOOP.close()


def commit(store, ops):
    """Commit ``ops`` from inside the test's loop (where a store is used) and wait for it."""
    async def durable():
        return await store.commit(ops)
    return run(durable())


def select(store, text):
    selection, errors = parse_selection(store.schema, tokenize(text))
    assert not errors
    return [store.get(rid) for rid in store.select(selection)]


def add(store, rtype, **fields):
    ops = store.plan_add(rtype, {k: v if isinstance(v, list) else [v] for k, v in fields.items()},
                         NOW)
    commit(store, ops)


def test_add_query_change_delete(make_store):
    store = make_store()
    add(store, "person", alias="jsmith", name="John Smith", email="john@example.org")
    add(store, "machine", hostname="nas", ip=["10.0.0.5", "fd00::5"], mac="AA-BB-CC-DD-EE-FF")
    [john] = select(store, "name=smith")
    assert john["alias"] == "jsmith" and john["source"] == "manual"
    assert john["created"] == pharos.utc_now(NOW)
    [nas] = select(store, "mac=aa:bb:cc:dd:ee:ff")
    assert nas["ip"] == ["10.0.0.5", "fd00::5"] and nas["status"] == "unknown"
    ids = store.select(parse_selection(store.schema, tokenize("alias=jsmith"))[0])
    ops, errors = store.plan_change(ids, {"phone": ["555"], "email": [""]}, NOW + 60)
    assert not errors
    commit(store, ops)
    [john] = select(store, "phone=555")
    assert "email" not in john and john["modified"] == pharos.utc_now(NOW + 60)
    assert select(store, "email=john@example.org") == []
    commit(store, [(rid, None) for rid in ids])
    assert select(store, "name=smith") == []
    assert len(store.directory) == 1


def test_keys_are_unique_per_type_and_case(make_store):
    store = make_store()
    add(store, "person", alias="nas")
    add(store, "machine", hostname="nas")               # same key, other type: fine
    with pytest.raises(pharos.RecordError) as refused:
        add(store, "machine", hostname="NAS")
    assert refused.value.code == 509


def test_a_changed_record_is_a_new_object(make_store):
    store = make_store()
    add(store, "person", alias="a", name="Ann")
    [rid] = store.select(parse_selection(store.schema, tokenize("alias=a"))[0])
    before = store.get(rid)
    ops, _ = store.plan_change([rid], {"name": ["Anne"]}, NOW)
    commit(store, ops)
    assert before["name"] == "Ann" and store.get(rid)["name"] == "Anne"
    assert select(store, "name=ann") == [] and len(select(store, "name=anne")) == 1


def test_wildcards_see_new_and_removed_keys(make_store):
    store = make_store()
    for n in range(1500):                                 # enough to rebuild the sorted keys
        add(store, "machine", hostname=f"host-{n:04d}", ip=f"10.1.{n // 256}.{n % 256}")
    assert len(select(store, "hostname=host-00*")) == 100
    add(store, "machine", hostname="host-zz")
    assert [r["hostname"] for r in select(store, "hostname=host-z*")] == ["host-zz"]
    ids = store.select(parse_selection(store.schema, tokenize("hostname=host-00*"))[0])
    commit(store, [(rid, None) for rid in ids])
    assert select(store, "hostname=host-00*") == []
    assert len(select(store, "ip=10.1.5.*")) == 220                 # 10.1.5.0-219 exist


def test_long_postings_agree_with_the_records_through_every_change(make_store):
    """Postings past POSTING_ARRAY_MIN ids become sorted arrays: adds, changes back and
    forth, deletes and a reopen must leave every query agreeing with the records."""
    store = make_store()
    teams = ["ops", "dev", "sales"]
    for n in range(3 * pharos.POSTING_ARRAY_MIN + 7):
        add(store, "person", alias=f"m{n}", name=f"Member {n % 5} Team",
            department=teams[n % 3])

    def check():
        records = [store.get(rid) for rid in store.directory.records]
        for team in teams:
            want = sorted(r["alias"] for r in records if r.get("department") == team)
            assert sorted(r["alias"] for r in select(store, f"department={team}")) == want
            want = sorted(r["alias"] for r in records
                          if r.get("department") == team and r["name"].startswith("Member 2"))
            assert sorted(r["alias"] for r in select(store, f"department={team} name=2")) == want
        assert store.directory.count("person") == len(records)

    check()
    ops = store.select(parse_selection(store.schema, tokenize("department=ops"))[0])
    assert len(ops) > pharos.POSTING_ARRAY_MIN
    for rid in ops[::4]:                            # out of ops, into dev, out of the middle
        commit(store, [(rid, dict(store.get(rid), department="dev"))])
    check()
    for rid in ops[::8]:                            # and back: ids inserted mid-array
        commit(store, [(rid, dict(store.get(rid), department="ops"))])
    check()
    commit(store, [(rid, None) for rid in ops[1::3]])
    check()
    if make_store.kind == "file":
        run(store.close())
        store = make_store()
        check()


@pytest.mark.parametrize("make_store", ["file"], indirect=True)
def test_file_store_survives_reopen_and_compaction(make_store):
    store = make_store(compact_bytes=2000)
    for n in range(60):
        add(store, "person", alias=f"p{n}", name=f"Person {n}")
    ids = store.select(parse_selection(store.schema, tokenize("name=person"))[0])
    kept = {store.get(rid)["alias"] for rid in ids[10:]}
    commit(store, [(rid, None) for rid in ids[:10]])
    run(store.close())
    files = sorted(os.listdir(store.path))
    assert "snapshot.jsonl" in files
    assert len([f for f in files if f.startswith("journal-")]) == 1
    again = make_store()
    assert {r["alias"] for r in select(again, "name=person")} == kept
    add(again, "person", alias="after", name="After Reopen")
    assert max(again.directory.records) == 61                        # ids never reused


def test_a_segment_that_cannot_be_opened_delays_compaction_but_loses_no_write(tmp_path):
    global LOOP
    LOOP = asyncio.new_event_loop()
    logged = []
    data = tmp_path / "data"
    store = FileStore(Schema(), data, compact_bytes=2000, log=logged.append).open()
    try:
        blocked = [data / pharos.journal_name(seq) for seq in range(2, 40)]
        for path in blocked:                        # a directory where a segment should go
            path.mkdir()
        for n in range(30):
            add(store, "person", alias=f"p{n}", name=f"Person {n}")
        refused = [m for m in logged if "cannot start a new journal segment" in m]
        assert refused and len(refused) < 5, logged            # retried later, not per write
        assert store.compacting is None and not (data / "snapshot.jsonl").exists()
        for path in blocked:
            path.rmdir()
        for n in range(30, 60):
            add(store, "person", alias=f"p{n}", name=f"Person {n}")
        run(store.close())
        assert (data / "snapshot.jsonl").exists()
        again = FileStore(Schema(), data).open()
        assert {r["alias"] for r in select(again, "name=person")} == {f"p{n}" for n in range(60)}
        run(again.close())
    finally:
        if store.writer is not None:
            run(store.close())
        LOOP.close()


def test_snapshot_header_and_trailer(tmp_path):
    records = {1: {"type": "person", "alias": "a"}, 7: {"type": "machine", "hostname": "h"}}
    pharos.write_snapshot(str(tmp_path), 12, 8, records)
    lines = (tmp_path / "snapshot.jsonl").read_text().splitlines()
    header, trailer = (pharos.read_checked_line(f"{line}\n".encode()) for line in (lines[0], lines[-1]))
    assert header["seq"] == 12 and header["version"] == 2 and trailer == {"end": 2}
    seq, next_id, pairs = pharos.read_snapshot(str(tmp_path))
    assert (seq, next_id, dict(pairs)) == (12, 8, records)


def test_journal_line_checks_its_crc():
    raw = pharos.encode_journal(5, [(3, {"type": "person", "alias": "a"})])
    assert pharos.decode_journal(raw) == (5, [(3, {"type": "person", "alias": "a"})], None, 5)
    with_audit = pharos.encode_journal(6, [(3, None)], '{"user": "a"}')
    assert pharos.decode_journal(with_audit) == (6, [(3, None)], '{"user": "a"}', 6)
    in_a_batch = pharos.encode_journal(7, [(3, None)], None, batch=4)
    assert pharos.decode_journal(in_a_batch)[3] == 4
    for broken in (raw[:-1], raw.replace(b'"a"', b'"b"'), b"zzzzzzzz " + raw[9:]):
        with pytest.raises(ValueError):
            pharos.decode_journal(broken)


def write_segment(path, lines):
    path.mkdir(parents=True, exist_ok=True)
    (path / "journal-0000000000000001.jsonl").write_bytes(b"".join(lines))


def person_line(seq, batch=None):
    return pharos.encode_journal(seq, [(seq, {"type": "person", "alias": f"p{seq}"})],
                                 batch=batch)


@pytest.mark.parametrize("tail", [
    # The last group commit (seqs 3 and 4) reached the disk with its first line garbled
    # and its second intact.
    [b"\0" * 40 + b"\n", person_line(4, batch=3), bytes(64)],
    # A crash mid-write left part of a line and then the segment's zero fill.
    [person_line(3)[:30], bytes(pharos.JOURNAL_PREALLOC)],
], ids=["blocks-out-of-order", "over-the-zero-fill"])
def test_a_torn_last_write_is_dropped(tmp_path, tail):
    """A torn last write was never acknowledged, so the store starts without it."""
    data, logged = tmp_path / "data", []
    write_segment(data, [person_line(1), person_line(2)] + tail)
    store = FileStore(Schema(), data, log=logged.append).open()
    try:
        assert sorted(r["alias"] for r in store.directory.records.values()) == ["p1", "p2"]
        assert any("torn write" in message for message in logged)
    finally:
        asyncio.run(store.close())
    assert (data / "journal-0000000000000001.jsonl").read_bytes().rstrip(b"\0") == \
        person_line(1) + person_line(2)


def test_damage_before_a_later_write_is_corruption(tmp_path):
    """A garbled line followed by a write that began after it was acknowledged: refuse."""
    data = tmp_path / "data"
    write_segment(data, [person_line(1), b"garbage\n", person_line(3)])
    before = (data / "journal-0000000000000001.jsonl").read_bytes()
    with pytest.raises(pharos.DataError, match="line 2: corrupt journal entry"):
        FileStore(Schema(), data).open()
    assert (data / "journal-0000000000000001.jsonl").read_bytes() == before


def test_a_segment_grows_in_zero_filled_steps_and_writes_land_where_the_data_ends(tmp_path):
    """Writes overwrite preallocated zeros (fdatasync then leaves the metadata alone); a
    reopened store finds the data's end and writes on from there, never past the zeros."""
    global LOOP
    LOOP = asyncio.new_event_loop()
    data = tmp_path / "data"
    segment = data / "journal-0000000000000001.jsonl"
    store = FileStore(Schema(), data).open()
    for n in range(3):
        add(store, "person", alias=f"z{n}")
    run(store.close())
    body = segment.read_bytes()
    assert len(body) == pharos.JOURNAL_PREALLOC
    text = body.rstrip(b"\0")
    assert len(text.splitlines()) == 3 and text.endswith(b"\n")
    again = FileStore(Schema(), data).open()
    try:
        assert again.writer.size == len(text)
        add(again, "person", alias="z3")
        assert sorted(r["alias"] for r in again.directory.records.values()) == \
            ["z0", "z1", "z2", "z3"]
    finally:
        run(again.close())
    grown = segment.read_bytes()
    assert len(grown) == pharos.JOURNAL_PREALLOC and grown.startswith(text)
    assert [pharos.decode_journal(raw + b"\n")[0] for raw in
            grown.rstrip(b"\0").splitlines()] == [1, 2, 3, 4]
    LOOP.close()


@pytest.mark.parametrize("rid", [0, -3, 1 << 32, "7"])
def test_a_snapshot_record_with_an_impossible_id_is_refused(tmp_path, rid):
    records = {1: {"type": "person", "alias": "a"}}
    pharos.write_snapshot(str(tmp_path), 1, 2, records)
    text = (tmp_path / "snapshot.jsonl").read_bytes().replace(b"[1,", b"[%s," % json.dumps(rid).encode())
    lines = text.splitlines(keepends=True)
    body = lines[1][9:-1]
    lines[1] = b"%08x %s\n" % (zlib.crc32(body), body)
    (tmp_path / "snapshot.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(pharos.DataError, match="record 1 is not a valid record"):
        FileStore(Schema(), tmp_path).open()


def test_a_snapshot_that_names_an_id_twice_keeps_the_last(tmp_path):
    """Start-up indexes common values in bulk; a repeated id must still leave one record
    and no stale postings."""
    records = {1: {"type": "person", "alias": "a", "department": "ops"},
               2: {"type": "person", "alias": "b", "department": "ops"}}
    pharos.write_snapshot(str(tmp_path), 1, 3, records)
    lines = (tmp_path / "snapshot.jsonl").read_bytes().splitlines(keepends=True)
    again = json.dumps([1, {"type": "person", "alias": "a", "department": "dev"}],
                       separators=(",", ":")).encode()
    lines.insert(3, b"%08x %s\n" % (zlib.crc32(again), again))
    lines[-1] = pharos.checked_line({"end": 3})
    (tmp_path / "snapshot.jsonl").write_bytes(b"".join(lines))
    (tmp_path / pharos.journal_name(2)).touch()         # a snapshot is written after its segment
    store = FileStore(Schema(), tmp_path).open()
    try:
        assert [store.get(rid)["alias"] for rid in store.select(
            parse_selection(store.schema, tokenize("department=ops"))[0])] == ["b"]
        assert [store.get(rid)["alias"] for rid in store.select(
            parse_selection(store.schema, tokenize("department=dev"))[0])] == ["a"]
        assert len(store.directory) == 2
    finally:
        asyncio.run(store.close())


def normalised_index(directory):
    """A directory's index and unique keys in a comparable form."""
    index = {name: {key: sorted(pharos.as_set(posting)) for key, posting in fidx.postings.items()}
             for name, fidx in directory.index.items()}
    return index, directory.keys, directory.next_id


def test_the_start_up_loader_builds_the_index_put_builds(tmp_path):
    """Start-up indexes a chunk column by column and shares common values in bulk; the
    result must be what inserting the same records one by one gives."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import dataset
    data = dataset.Dataset(1500)
    records = [data.person(i) for i in range(1500)] + [data.machine(i) for i in range(1500)]
    records += [
        {"type": "person", "alias": "Mixed", "name": "Ann-Marie  O'Neil, Jr.", "phone": ""},
        {"type": "person", "alias": "t1", "tenant": "blue", "name": "Tenant One"},
        {"type": "machine", "hostname": "multi", "ip": ["10.9.0.1", "fe80::9"],
         "mac": ["aa:bb:cc:00:00:01", "AA:BB:CC:00:00:02"], "tags": ["x", "y/z"]},
        {"type": "person", "alias": "dup", "name": "First Version", "department": "Ops"},
    ]
    pairs = [[rid, dict(record)] for rid, record in enumerate(records, 1)]
    pairs.append([len(records), dict(records[-1], name="Second Version", department="Dev")])
    one_by_one = pharos.Directory(Schema())
    for rid, record in pairs:
        one_by_one.put(rid, dict(record))
    store = MemoryStore(Schema())
    for start in range(0, len(pairs), 700):                    # chunks, as the snapshot
        store.load_records([[rid, dict(r)] for rid, r in pairs[start:start + 700]], first=start)
    assert store.directory.records == one_by_one.records
    assert normalised_index(store.directory) == normalised_index(one_by_one)


@pytest.mark.parametrize("bad", [{"type": "robot", "alias": "x"}, {"type": "person"},
                                 {"type": "person", "alias": "x", "name": 7},
                                 {"type": "machine", "hostname": "h", "ip": ["10.0.0.1", 5]},
                                 {"type": "person", "alias": "x", "department": ["a"]}, "text"])
def test_the_start_up_loader_names_the_bad_record(bad):
    store = MemoryStore(Schema())
    pairs = [[1, {"type": "person", "alias": "a"}], [2, {"type": "person", "alias": "b"}],
             [3, bad]]
    with pytest.raises(pharos.DataError, match="record 13 is not a valid record"):
        store.load_records(pairs, first=10)


def test_an_image_for_other_fields_is_not_used(tmp_path):
    """The index depends on the fields (custom ones too): an image written under one field
    table is refused under another, and the snapshot is loaded instead."""
    global LOOP
    LOOP = asyncio.new_event_loop()
    store = FileStore(Schema(), tmp_path, image=True).open()
    add(store, "person", alias="a", name="Ann Example")
    run(store.close())
    assert (tmp_path / "snapshot.image").exists()
    custom = pharos.Field(100, "badge", 16, pharos.LOOK + " Change", "Badge.", ("person",))
    logged = []
    again = FileStore(Schema([custom]), tmp_path, log=logged.append).open()
    try:
        assert [r["alias"] for r in select(again, "name=ann")] == ["a"]
        assert any("other fields" in line for line in logged), logged
    finally:
        run(again.close())
    LOOP.close()


def test_an_image_whose_checksum_holds_but_whose_shape_is_wrong_is_not_used(tmp_path):
    import marshal
    directory = pharos.Directory(Schema())
    directory.put(1, {"type": "person", "alias": "a"})
    pharos.write_snapshot(str(tmp_path), 1, 2, directory.records)
    body = marshal.dumps(({1: "not a record"}, {}, 2,
                          {name: {} for name in directory.index}))
    header = pharos.image_header(directory.schema, 1, pharos.snapshot_signature(str(tmp_path)),
                                 body)
    (tmp_path / "snapshot.image").write_bytes(pharos.checked_line(header) + body)
    seq, why = pharos.read_image(str(tmp_path), pharos.Directory(Schema()))
    assert seq is None and why == "it is damaged"
