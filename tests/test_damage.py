"""Damage to a data dir's files (issue 11): each kind either stops the start with one
clear line naming the file (and line), or the server starts with every acknowledged
write. Never a silent start with acknowledged writes missing.

The data dir holds a snapshot (seq 10) with its image, and three journal segments after
it (seqs 11-20, 21-30, 31-40), as a compaction that could not finish leaves them.
"""

import json
import os
import re
import shutil
import signal
import zlib

import pytest

from conftest import LISTEN_RE, ServerProcess, wait_for

SNAPSHOT, IMAGE = "snapshot.jsonl", "snapshot.image"
SEGMENTS = [f"journal-{seq:016d}.jsonl" for seq in (11, 21, 31)]
FILL = bytes(4096)                      # the zero fill after a segment's data


def start(data, ready=True):
    return ServerProcess(data).start(expect_ready=ready)


def aliases(srv):
    """Every person's alias, over the wire."""
    with srv.client() as c:
        reply = c.cmd("query type=person return alias")
    assert reply[-1] == "200:Ok.", reply
    return {m.group(1) for m in map(re.compile(r"-200:\d+:\s*alias: (\S+)").match, reply) if m}


def add_people(srv, names):
    with srv.client() as c:
        for name in names:
            assert c.cmd(f"add type=person alias={name} name=Person") == ["200:Ok."], name


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The undamaged data dir and the 40 aliases acknowledged in it."""
    data = tmp_path_factory.mktemp("base") / "data"
    srv = start(data)
    add_people(srv, [f"a{n}" for n in range(10)])
    assert srv.stop()[0] == 0                   # a snapshot at seq 10 and its image
    srv = start(data)
    add_people(srv, [f"a{n}" for n in range(10, 40)])
    srv.proc.send_signal(signal.SIGKILL)        # the journal keeps seqs 11-40
    srv.finish()
    journal = (data / SEGMENTS[0]).read_bytes().rstrip(b"\0").splitlines(keepends=True)
    assert len(journal) == 30
    for n, name in enumerate(SEGMENTS):
        (data / name).write_bytes(b"".join(journal[10 * n:10 * n + 10]) + FILL)
    srv = start(data)
    assert aliases(srv) == {f"a{n}" for n in range(40)}, "the split journal does not load"
    srv.kill()
    return data, {f"a{n}" for n in range(40)}


def retie_image(data):
    """Tie the copied image to the copied snapshot (a copy is a new file), as if written
    beside it: the image names the snapshot file it was made from."""
    st = (data / SNAPSHOT).stat()
    raw = (data / IMAGE).read_bytes()
    header, body = raw.split(b"\n", 1)
    checked = header[:1] != b"{"                # version 1 images had no header checksum
    item = json.dumps(dict(json.loads(header[9:] if checked else header),
                           snapshot=[st.st_ino, st.st_size, st.st_mtime_ns])).encode()
    crc = b"%08x " % zlib.crc32(item) if checked else b""
    (data / IMAGE).write_bytes(crc + item + b"\n" + body)


def lines(path):
    return path.read_bytes().rstrip(b"\0").splitlines(keepends=True)


def rewrite(path, lineno, fn):
    """Replace line ``lineno`` of ``path`` by fn(line), keeping the zero fill."""
    body, fill = lines(path), b"\0" * (len(path.read_bytes()) - len(path.read_bytes().rstrip(b"\0")))
    body[lineno - 1] = fn(body[lineno - 1])
    path.write_bytes(b"".join(body) + fill)


def flip(raw, at=None):
    at = len(raw) // 2 if at is None else at
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


def edit_json(raw, **changes):
    """The line with its JSON changed and its old checksum (if any) kept."""
    crc, body = (raw[:9], raw[9:]) if raw[:1] != b"{" else (b"", raw)
    return crc + json.dumps(dict(json.loads(body), **changes)).encode() + b"\n"


def cut(path, length):
    path.write_bytes(path.read_bytes()[:length])


def line_end(path, n):
    return len(b"".join(lines(path)[:n]))


def zero_from(path, at):
    raw = path.read_bytes()
    path.write_bytes(raw[:at] + bytes(len(raw) - at))


def tear(path):
    """Half a new line over the zero fill, as a crash in mid-write leaves it."""
    raw, end = path.read_bytes(), line_end(path, 10)
    path.write_bytes(raw[:end] + lines(path)[0][:40] + raw[end + 40:])


SEG1, SEG2, SEG3 = SEGMENTS
# name: (damage(data dir), file it names and line ("" when none), or None: starts whole)
DAMAGE = {
    "snapshot header seq edited": (lambda d: rewrite(d / SNAPSHOT, 1, lambda r: edit_json(r, seq=40)),
                                   (SNAPSHOT, 1)),
    "snapshot header byte flipped": (lambda d: rewrite(d / SNAPSHOT, 1, flip), (SNAPSHOT, 1)),
    "snapshot record byte flipped": (lambda d: rewrite(d / SNAPSHOT, 5, flip), (SNAPSHOT, 5)),
    "snapshot trailer byte flipped": (lambda d: rewrite(d / SNAPSHOT, 12, flip), (SNAPSHOT, 12)),
    "snapshot empty": (lambda d: (d / SNAPSHOT).write_bytes(b""), (SNAPSHOT, 1)),
    "snapshot deleted": (lambda d: (d / SNAPSHOT).unlink(), (SNAPSHOT, "")),
    "snapshot and image deleted": (lambda d: [(d / SNAPSHOT).unlink(), (d / IMAGE).unlink()],
                                   (SEG1, "")),
    "image header seq edited": (lambda d: rewrite(d / IMAGE, 1, lambda r: edit_json(r, seq=40)),
                                None),
    "image header byte flipped": (lambda d: rewrite(d / IMAGE, 1, flip), None),
    "image body byte flipped": (lambda d: (d / IMAGE).write_bytes(flip((d / IMAGE).read_bytes(),
                                                                       -100)), None),
    "image deleted": (lambda d: (d / IMAGE).unlink(), None),
    "image replaced by a FIFO": (lambda d: [(d / IMAGE).unlink(), os.mkfifo(d / IMAGE)], None),
    "journal record byte flipped": (lambda d: rewrite(d / SEG2, 4, flip), (SEG2, 4)),
    "middle segment missing": (lambda d: (d / SEG2).unlink(), (SEG3, "")),
    "segment duplicated": (lambda d: shutil.copy(d / SEG2, d / "journal-0000000000000041.jsonl"),
                           ("journal-0000000000000041.jsonl", 1)),
    "segment renamed later": (lambda d: (d / SEG3).rename(d / "journal-0000000000000035.jsonl"),
                              ("journal-0000000000000035.jsonl", "")),
    "segment renamed earlier": (lambda d: (d / SEG2).rename(d / "journal-0000000000000019.jsonl"),
                                ("journal-0000000000000019.jsonl", "")),
    "newest segment cut at a line end": (lambda d: cut(d / SEG3, line_end(d / SEG3, 4)), (SEG3, 4)),
    "newest segment cut mid-line": (lambda d: cut(d / SEG3, line_end(d / SEG3, 4) + 30), (SEG3, 5)),
    "older segment cut at a line end": (lambda d: cut(d / SEG2, line_end(d / SEG2, 4)), (SEG3, "")),
    "older segment zeroed from a line end": (lambda d: zero_from(d / SEG2, line_end(d / SEG2, 4)),
                                             (SEG3, "")),
    "torn write over the zero fill": (lambda d: tear(d / SEG3), None),
    "none (the control)": (lambda d: None, None),
}


@pytest.mark.parametrize("damage, refusal", DAMAGE.values(), ids=list(DAMAGE))
def test_damage_is_refused_by_name_or_loses_nothing(base, tmp_path, request, damage, refusal):
    damage_id = request.node.callspec.id
    data = tmp_path / "data"
    shutil.copytree(base[0], data)
    retie_image(data)
    damage(data)
    srv = start(data, ready=refusal is None)
    try:
        if refusal is None:
            assert aliases(srv) == base[1], srv.read_stderr()
            assert "Traceback" not in srv.read_stderr()
            if damage_id.startswith("none"):      # the image is used: image damage is real
                assert "not using" not in srv.read_stderr(), srv.read_stderr()
            return
        wait_for(lambda: not srv.alive() or LISTEN_RE.search(srv.stderr), timeout=30,
                 what="the server to exit")
        code, err = srv.finish()
        assert code == 3 and not LISTEN_RE.search(srv.stderr), f"started: {err}"
        name, lineno = refusal
        where = rf"{re.escape(name)}\b" + (rf".*\bline {lineno}\b" if lineno else "")
        assert re.search(where, err.strip().splitlines()[-1]), err    # the last line says why
        assert "Traceback" not in err, err
    finally:
        srv.kill()
