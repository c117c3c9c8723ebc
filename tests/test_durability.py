"""Durability of file storage against real server processes (DESIGN §7).

Crash safety under SIGKILL (with and without compaction), torn journal tails,
corrupt snapshot and journal lines, the data-dir lock, an unwritable data dir,
a full disk, and a graceful SIGTERM with writes in flight.

The random crash schedule is reproducible: the seed is printed, and
PHAROS_DURABILITY_SEED sets it.
"""

import hashlib
import json
import os
import random
import re
import resource
import signal
import stat
import threading
import time
import zlib

import pytest

from conftest import (LISTEN_RE, PHAROS, PhClient, ServerProcess, python_for_nobody,
                      usable_by_nobody, wait_for)

SEED = int(os.environ.get("PHAROS_DURABILITY_SEED", "2378"))
HOST = "127.0.0.1"
ALL_PEOPLE = "query type=person return alias name email"
MANY = ("--max-results", "1000000")
JOURNAL_NAME_RE = re.compile(r"^journal-\d{16}\.jsonl$")
ENTRY_RE = re.compile(r"^-200:(\d+):\s*([A-Za-z_-]+): ?(.*)$")
COUNT_RE = re.compile(r"^102:There (?:was|were) (\d+) match(?:es)? to your request\.$")
ADD_OK = re.compile(r"^200:Ok\.$")
CHANGE_OK = re.compile(r"^200:1 entr(?:y|ies) changed\.$")
DELETE_OK = re.compile(r"^200:1 entr(?:y|ies) deleted\.$")
NOBODY = 65534


# --------------------------------------------------------------------------
# Servers, records and files
# --------------------------------------------------------------------------

class Server(ServerProcess):
    """A ServerProcess that may also be expected to refuse to start."""

    def refused(self, timeout=30.0):
        """Wait until it exits (failing at once if it starts listening instead);
        return (code, stderr)."""
        wait_for(lambda: not self.alive() or LISTEN_RE.search(self.stderr),
                 timeout=timeout, what="the server to exit")
        started = LISTEN_RE.search(self.stderr) is not None
        assert not started, f"the server started instead of refusing:\n{self.read_stderr()}"
        return self.finish(timeout=10)


@pytest.fixture
def launch():
    """launch(data, *extra, expect_ready=True, preexec_fn=None, python=None) -> a started Server.
    Every server started here is killed at teardown (only these)."""
    started = []

    def _launch(data, *extra, expect_ready=True, preexec_fn=None, python=None):
        srv = Server(data, *extra, storage="file", preexec_fn=preexec_fn)
        if python:
            srv.args[0] = python
        started.append(srv)
        return srv.start(expect_ready=expect_ready)

    yield _launch
    for srv in started:                 # kill them all before anything else can fail
        srv.kill()
    for srv in started:
        if srv.proc and srv.proc.stderr:
            if srv.drainer:
                srv.drainer.join(timeout=10)
            srv.proc.stderr.close()


def parse_entries(lines):
    """A query reply -> list of {field: value} (one dict per entry)."""
    if len(lines) == 1 and lines[0].startswith("501:"):
        return []
    match = COUNT_RE.match(lines[0])
    assert match, f"unexpected query reply: {lines[:3]}"
    assert lines[-1] == "200:Ok.", f"query reply does not end in 200:Ok.: {lines[-3:]}"
    entries = {}
    for line in lines[1:-1]:
        m = ENTRY_RE.match(line)
        assert m, f"bad entry line in query reply: {line!r}"
        entries.setdefault(int(m.group(1)), {})[m.group(2)] = m.group(3)
    assert len(entries) == int(match.group(1)), \
        f"102 line says {match.group(1)} matches, reply has {len(entries)} entries"
    return list(entries.values())


def people(srv):
    """Every person in the directory: alias -> (name, email)."""
    with PhClient(HOST, srv.port, timeout=30) as c:
        lines = c.cmd(ALL_PEOPLE)
    found = {}
    for entry in parse_entries(lines):
        alias = entry.get("alias")
        assert alias, f"entry without alias: {entry}"
        assert alias not in found, f"alias {alias} listed twice"
        found[alias] = (entry.get("name"), entry.get("email"))
    return found


def add_cmd(alias, name, email):
    return f'add type=person alias={alias} name="{name}" email={email}'


def add_ok(client, alias, name=None, email=None):
    name = name or f"Person {alias}"
    email = email or f"{alias}@example.com"
    reply = client.cmd(add_cmd(alias, name, email))
    assert reply == ["200:Ok."], f"add {alias}: {reply}"
    return alias, (name, email)


def data_files(data):
    """The data files (snapshot and journal segments; not the lock): name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(data.iterdir())
            if p.name == "snapshot.jsonl" or p.name.startswith("journal-")}


def digest(files):
    return {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}


def journal_segments(data):
    segments = sorted(p for p in data.iterdir() if p.name.startswith("journal-"))
    for p in segments:
        assert JOURNAL_NAME_RE.match(p.name), f"journal segment name off contract: {p.name}"
    return segments


def journal_line(payload: bytes) -> bytes:
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def journal_data(path):
    """A segment's data: segments grow in zero-filled steps, so the data ends where the
    zeros that reach the end of the file begin."""
    return path.read_bytes().rstrip(b"\0")


def check_journal_format(path):
    """Every line of a (clean) segment is `<crc32 8 hex> <json>\\n` with a matching CRC."""
    body = journal_data(path)
    assert body == b"" or body.endswith(b"\n"), f"{path.name} does not end in a newline"
    lines = body.splitlines()
    for n, line in enumerate(lines, 1):
        m = re.match(rb"^([0-9a-f]{8}) (.*)$", line)
        assert m, f"{path.name} line {n} not `<crc32> <json>`: {line[:80]!r}"
        assert int(m.group(1), 16) == zlib.crc32(m.group(2)), f"{path.name} line {n}: CRC mismatch"
        json.loads(m.group(2))
    return lines


def stderr_lines(text):
    """Stderr lines with digits normalised, to compare two runs."""
    return {re.sub(r"\d+", "N", line).strip() for line in text.splitlines() if line.strip()}


# --------------------------------------------------------------------------
# Concurrent writers and the model of what the data dir may hold
# --------------------------------------------------------------------------

class Model:
    """alias -> set of states the directory may hold for it; a state is
    (name, email) or None for absent. Acknowledged writes make a state
    certain; a write in flight when the server died leaves {before, after}."""

    def __init__(self):
        self.lock = threading.Lock()
        self.possible = {}
        self.serial = 0
        self.next_n = {}
        self.acked = 0
        self.acked_cond = threading.Condition(self.lock)

    def new_alias(self, slot):
        with self.lock:
            n = self.next_n.get(slot, 0)
            self.next_n[slot] = n + 1
            self.serial += 1
            return f"w{slot}-{n}", self.serial

    def next_serial(self):
        with self.lock:
            self.serial += 1
            return self.serial

    def get(self, alias):
        with self.lock:
            return set(self.possible.get(alias, {None}))

    def put(self, alias, states):
        with self.lock:
            self.possible[alias] = set(states)

    def acknowledge(self, alias, state):
        with self.lock:
            self.possible[alias] = {state}
            self.acked += 1
            self.acked_cond.notify_all()

    def present_of(self, slot):
        """Aliases writer `slot` owns that are certainly present, with their state."""
        prefix = f"w{slot}-"
        with self.lock:
            return {a: next(iter(s)) for a, s in self.possible.items()
                    if a.startswith(prefix) and len(s) == 1 and None not in s}

    def problems(self, observed):
        out = []
        with self.lock:
            for alias, state in sorted(observed.items()):
                if alias not in self.possible:
                    out.append(f"{alias}={state}: no writer ever sent it")
                elif state not in self.possible[alias]:
                    out.append(f"{alias}={state}: expected one of {self.possible[alias]}")
            for alias, states in sorted(self.possible.items()):
                if alias not in observed and None not in states:
                    out.append(f"{alias} missing: expected one of {states}")
        return out

    def uncertain(self):
        """How many aliases had a write in flight when the server died."""
        with self.lock:
            return sum(len(states) > 1 for states in self.possible.values())

    def settle(self, observed):
        """After a verified restart every state is certain again."""
        with self.lock:
            for alias in self.possible:
                self.possible[alias] = {observed.get(alias)}


class Writer(threading.Thread):
    """One connection; adds, and changes and deletes its own earlier records.
    Each op marks its alias uncertain before sending, certain on a 200."""

    def __init__(self, port, model, slot, rng, strict=True):
        super().__init__(daemon=True)
        self.port, self.model, self.slot, self.rng, self.strict = port, model, slot, rng, strict
        self.present = model.present_of(slot)
        self.errors = []
        self.torn_replies = []
        self.stop = threading.Event()
        self.done = 0

    def choose(self):
        r = self.rng.random()
        if not self.present or r < 0.6:
            alias, serial = self.model.new_alias(self.slot)
            after = (f"W{self.slot} {alias} V{serial}", f"{alias}@example.com")
            return alias, add_cmd(alias, *after), after, ADD_OK
        alias = self.rng.choice(sorted(self.present))
        if r < 0.85:
            after = (f"W{self.slot} {alias} V{self.model.next_serial()}", self.present[alias][1])
            return alias, f'change alias={alias} make name="{after[0]}"', after, CHANGE_OK
        return alias, f"delete alias={alias}", None, DELETE_OK

    def run(self):
        try:
            client = PhClient(HOST, self.port, timeout=20)
        except OSError:
            return
        try:
            while not self.stop.is_set():
                alias, line, after, ok = self.choose()
                self.model.put(alias, self.model.get(alias) | {after})
                try:
                    reply = client.cmd(line)
                except (OSError, EOFError, UnicodeDecodeError):
                    if client.buf:      # the server may die mid-reply, not close mid-reply
                        self.torn_replies.append(f"{line!r} -> partial {client.buf[:80]!r}")
                    return      # the server went away: this op stays uncertain
                if ok.match(reply[-1]) and len(reply) == 1:
                    self.model.acknowledge(alias, after)
                    self.done += 1
                    if after is None:
                        del self.present[alias]
                    else:
                        self.present[alias] = after
                    continue
                if self.strict or reply[-1].startswith("200:"):
                    self.errors.append(f"{line!r} -> {reply}")
                return
        finally:
            client.close()


def run_writers(port, model, rng, count, strict=True):
    writers = [Writer(port, model, slot, random.Random(rng.random()), strict)
               for slot in range(count)]
    for w in writers:
        w.start()
    return writers


def wait_acked(model, target, writers, srv, timeout=30.0):
    """Wait until `target` writes in total were acknowledged."""
    deadline = time.monotonic() + timeout
    with model.acked_cond:
        while model.acked < target:
            errors = [e for w in writers for e in w.errors]
            assert not errors, f"writers got unexpected replies: {errors[:5]}"
            assert srv.alive(), f"server died: {srv.read_stderr()}"
            assert any(w.is_alive() for w in writers), "all writers stopped early"
            left = deadline - time.monotonic()
            assert left > 0, f"only {model.acked} of {target} writes acknowledged in {timeout}s"
            model.acked_cond.wait(min(left, 0.2))


def join_writers(writers):
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in writers), "a writer thread hung"


def verify(srv, model, context):
    observed = people(srv)
    problems = model.problems(observed)
    assert not problems, (f"{context} (seed {SEED}): {len(problems)} problems, e.g.\n  "
                          + "\n  ".join(problems[:15]))
    model.settle(observed)
    return observed


# --------------------------------------------------------------------------
# 1. Crash safety
# --------------------------------------------------------------------------

@pytest.mark.parametrize("compact", [None, "4096"], ids=["journal", "compaction"])
def test_sigkill_cycles_lose_no_acknowledged_write(tmp_path, launch, compact):
    cycles = 40
    rng = random.Random(f"{SEED}-{compact}")
    print(f"crash seed {SEED} (PHAROS_DURABILITY_SEED), compact-bytes {compact}")
    data = tmp_path / "data"
    extra = MANY + (("--compact-bytes", compact) if compact else ())
    model = Model()
    started = time.monotonic()
    in_flight = dropped_tails = 0
    for cycle in range(cycles):
        srv = launch(data, *extra)
        assert "Traceback" not in srv.read_stderr()
        dropped_tails += len(srv.read_stderr().strip().splitlines()) > 1
        in_flight += model.uncertain()
        verify(srv, model, f"restart before cycle {cycle}")
        writers = run_writers(srv.port, model, rng, rng.randint(4, 8))
        target = model.acked + rng.randint(0, 200)
        wait_acked(model, target, writers, srv)
        srv.proc.send_signal(signal.SIGKILL)
        srv.finish(timeout=10)
        join_writers(writers)
        errors = [e for w in writers for e in w.errors]
        assert not errors, f"cycle {cycle}: unexpected replies: {errors[:5]}"
    srv = launch(data, *extra)
    in_flight += model.uncertain()
    final = verify(srv, model, "final restart")
    assert model.acked >= cycles * 10, f"too few writes to mean anything: {model.acked}"
    assert final, "nothing survived at all"
    assert in_flight, "no kill ever landed with a write in flight: the test proves little"
    code, err = srv.stop()
    assert code == 0, f"SIGTERM exit {code}: {err}"
    if compact:
        assert (data / "snapshot.jsonl").exists(), "no compaction happened in the compaction run"
    print(f"{cycles} kill cycles, {model.acked} acknowledged writes, {in_flight} in flight "
          f"at a kill, {dropped_tails} restarts with more than the listening line on stderr, "
          f"{len(final)} records, {time.monotonic() - started:.1f}s")


# --------------------------------------------------------------------------
# 2. Torn journal tail
# --------------------------------------------------------------------------

def seeded_data_dir(launch, data, n=10):
    """A data dir with n acknowledged adds in its journal; returns {alias: state}
    and the stderr of a clean restart on it (the baseline to compare with)."""
    srv = launch(data)
    with srv.client() as c:
        expected = dict(add_ok(c, f"t-{i}") for i in range(n))
    srv.proc.send_signal(signal.SIGKILL)
    srv.finish(timeout=10)
    baseline = launch(data)
    assert people(baseline) == expected
    baseline.proc.send_signal(signal.SIGKILL)
    _, baseline_err = baseline.finish(timeout=10)
    return expected, baseline_err


def forged_line(data, old_alias, new_alias):
    """A valid journal line adding `new_alias`, forged from the line that added
    `old_alias`; and the last (highest-seq) segment."""
    segments = journal_segments(data)
    assert segments, f"no journal segments in {sorted(p.name for p in data.iterdir())}"
    for seg in segments:
        check_journal_format(seg)
    for seg in reversed(segments):
        for line in journal_data(seg).splitlines():
            payload = line.split(b" ", 1)[1]
            if f'"{old_alias}"'.encode() in payload:
                forged = payload.replace(f'"{old_alias}"'.encode(), f'"{new_alias}"'.encode())
                return journal_line(forged), segments[-1]
    raise AssertionError(f"no journal line mentions {old_alias}")


@pytest.mark.parametrize("damage", ["partial-line", "bad-crc"])
def test_torn_journal_tail_is_dropped_with_a_warning(tmp_path, launch, damage):
    data = tmp_path / "data"
    expected, baseline_err = seeded_data_dir(launch, data)
    line, last = forged_line(data, "t-9", "torn-1")
    if damage == "partial-line":
        tail = line[: len(line) // 2]
        assert not tail.endswith(b"\n")
    else:
        crc = int(line[:8], 16) ^ 0x1
        tail = b"%08x" % crc + line[8:]
        assert tail.endswith(b"\n")
    with open(last, "r+b") as f:             # where the data ends, over the zero fill
        f.seek(len(journal_data(last)))
        f.write(tail)

    srv = launch(data)
    assert people(srv) == expected, "earlier records lost or torn record applied"
    srv.proc.send_signal(signal.SIGKILL)
    _, err = srv.finish(timeout=10)
    new = stderr_lines(err) - stderr_lines(baseline_err)
    assert new, f"no warning on stderr for the torn tail; stderr:\n{err}"
    assert "Traceback" not in err

    # The tail is really gone: a write after it must not be glued to the torn bytes.
    srv = launch(data)
    with srv.client() as c:
        alias, state = add_ok(c, "after-torn")
    srv.proc.send_signal(signal.SIGKILL)
    srv.finish(timeout=10)
    srv = launch(data)
    assert people(srv) == dict(expected, **{alias: state})
    code, err = srv.stop()
    assert code == 0, err


# --------------------------------------------------------------------------
# 3. Corruption that is not a torn tail stops the server
# --------------------------------------------------------------------------

def flip(line: bytes, positions) -> bytes:
    b = bytearray(line)
    for pos in positions:
        b[pos] ^= 0xFF
    return bytes(b)


def rewrite_line(path, lineno, new_line):
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = new_line
    path.write_bytes(b"\n".join(lines))


def assert_refuses_to_start(launch, data, path, lineno):
    before = data_files(data)
    srv = launch(data, expect_ready=False)
    code, err = srv.refused()
    assert code == 3, f"exit status {code}, expected 3; stderr:\n{err}"
    naming = [l for l in err.splitlines()
              if path.name in l and re.search(rf"\bline {lineno}\b", l)]
    assert naming, f"no stderr line names {path.name} and line {lineno}; stderr:\n{err}"
    assert "Traceback" not in err, err
    after = data_files(data)
    assert digest(after) == digest(before), "the server changed the data files"


def test_corrupt_snapshot_line_stops_the_server(tmp_path, launch):
    data = tmp_path / "data"
    srv = launch(data, "--compact-bytes", "1024")
    with srv.client() as c:
        for i in range(60):
            add_ok(c, f"s-{i}")
    snapshot = data / "snapshot.jsonl"
    wait_for(lambda: snapshot.exists() and len(snapshot.read_bytes().splitlines()) >= 5,
             timeout=15, what="a snapshot with records (compaction at --compact-bytes 1024)")
    code, err = srv.stop()
    assert code == 0, err

    lines = snapshot.read_bytes().splitlines()
    assert len(lines) >= 5, "snapshot has no record lines"
    json.loads(lines[0].split(b" ", 1)[1])           # header and end marker: `<crc32> <json>`
    json.loads(lines[-1].split(b" ", 1)[1])
    lineno = len(lines) // 2 + 1          # a record line, neither header nor trailer
    assert 2 <= lineno <= len(lines) - 1
    line = lines[lineno - 1]
    rewrite_line(snapshot, lineno, flip(line, [0, len(line) // 2]))
    assert_refuses_to_start(launch, data, snapshot, lineno)


def test_corrupt_line_in_the_middle_of_a_journal_stops_the_server(tmp_path, launch):
    data = tmp_path / "data"
    srv = launch(data)
    with srv.client() as c:
        for i in range(10):
            add_ok(c, f"j-{i}")
    srv.proc.send_signal(signal.SIGKILL)
    srv.finish(timeout=10)

    segment = max(journal_segments(data), key=lambda p: len(journal_data(p).splitlines()))
    lines = check_journal_format(segment)
    assert len(lines) >= 3, f"{segment.name} has only {len(lines)} lines"
    lineno = 2
    line = lines[lineno - 1]
    rewrite_line(segment, lineno, flip(line, [len(line) // 2]))
    assert_refuses_to_start(launch, data, segment, lineno)


# --------------------------------------------------------------------------
# 4. The lock
# --------------------------------------------------------------------------

def test_second_server_on_the_same_data_dir_is_refused(tmp_path, launch):
    import fcntl

    data = tmp_path / "data"
    first = launch(data)
    with first.client() as c:
        add_ok(c, "lock-1")
    lock = data / "lock"
    assert lock.exists(), "no lock file"
    assert str(first.proc.pid) in lock.read_text(), "lock file does not hold the server's pid"
    with open(lock, "rb") as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)

    second = launch(data, expect_ready=False)
    code, err = second.refused()
    assert code == 3, f"second server exit {code}; stderr:\n{err}"
    assert "already in use" in err, err
    assert "Traceback" not in err, err

    assert first.alive()
    assert str(first.proc.pid) in lock.read_text(), "the refused server overwrote the lock"
    with first.client() as c:
        add_ok(c, "lock-2")
    assert set(people(first)) == {"lock-1", "lock-2"}
    code, err = first.stop()
    assert code == 0, err


# --------------------------------------------------------------------------
# 5. Unwritable data dir; full disk
# --------------------------------------------------------------------------

@pytest.fixture
def unprivileged(tmp_path):
    """(preexec_fn, python, make_readonly): as root chmod stops nothing, so run
    the server as nobody and make the tmp dirs traversable; otherwise chmod."""
    restore = []
    if os.geteuid() == 0:
        python = python_for_nobody()
        assert usable_by_nobody(PHAROS), f"user nobody cannot read {PHAROS}"
        for d in [tmp_path, *tmp_path.parents]:
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                restore.append((d, stat.S_IMODE(mode)))
                d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

        def demote():
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

        def make_readonly(d):
            d.chmod(0o755)              # owned by root: nobody may read, not write
        yield demote, python, make_readonly
    else:
        def make_readonly(d):
            restore.append((d, 0o755))
            d.chmod(0o555)
        yield None, None, make_readonly
    for d, mode in reversed(restore):
        d.chmod(mode)


def test_unwritable_data_dir_is_refused(tmp_path, launch, unprivileged):
    demote, python, make_readonly = unprivileged
    data = tmp_path / "data"
    data.mkdir()
    make_readonly(data)
    srv = launch(data, expect_ready=False, preexec_fn=demote, python=python)
    code, err = srv.refused()
    assert code == 3, f"exit {code}; stderr:\n{err}"
    assert "cannot write" in err, err
    assert str(data) in err or os.path.realpath(data) in err, f"stderr does not name {data}:\n{err}"
    assert "Traceback" not in err, err
    assert list(data.iterdir()) == []


def test_full_disk_fails_writes_cleanly_and_recovers(tmp_path, launch):
    limit = 16384
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Only the soft limit is lowered: it alone makes writes past `limit` fail
    # with EFBIG, and raising it back later needs no privilege (raising a hard
    # limit needs CAP_SYS_RESOURCE, which sandboxes may deny even to root).

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    data = tmp_path / "data"
    srv = launch(data, *MANY, preexec_fn=small_disk)
    acked, failed = {}, []
    with srv.client() as c:
        for i in range(2000):
            alias = f"df-{i}"
            reply = c.cmd(add_cmd(alias, f"Disk {i}", f"{alias}@example.com"))
            if reply == ["200:Ok."]:
                acked[alias] = (f"Disk {i}", f"{alias}@example.com")
                continue
            assert reply[-1].startswith("400:"), f"add on a full disk answered {reply}"
            failed.append(alias)
            break
        assert failed, f"{len(acked)} adds never hit the {limit}-byte file size limit"
        assert len(acked) >= 5, "the limit hit before any write: test setup is off"
        assert srv.alive(), srv.read_stderr()

        # Still full: another write fails the same way; reads keep working.
        reply = c.cmd(add_cmd("df-x", "Disk x", "df-x@example.com"))
        assert reply[-1].startswith("400:"), f"second add on a full disk answered {reply}"
        failed.append("df-x")
        first = next(iter(acked))
        assert parse_entries(c.cmd(f"query alias={first} return alias name email")) == \
            [{"alias": first, "name": acked[first][0], "email": acked[first][1]}]
        assert c.cmd(f"query alias={failed[0]} return alias") == ["501:No matches to your query."]
        with srv.client() as other:
            assert len(parse_entries(other.cmd("query type=person return alias"))) == len(acked)
        assert people(srv) == acked

        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        for i in range(5):
            acked.update([add_ok(c, f"df-after-{i}")])
    assert people(srv) == acked
    code, err = srv.stop()
    assert code == 0, f"exit {code}: {err}"
    assert "Traceback" not in err, err

    srv = launch(data, *MANY)
    assert people(srv) == acked, "acknowledged writes lost, or failed ones applied, after restart"
    code, err = srv.stop()
    assert code == 0, err


# --------------------------------------------------------------------------
# 6. SIGTERM with writes in flight
# --------------------------------------------------------------------------

def test_sigterm_with_writes_in_flight_exits_0_and_keeps_acknowledged_writes(tmp_path, launch):
    rng = random.Random(f"{SEED}-sigterm")
    print(f"sigterm seed {SEED}")
    data = tmp_path / "data"
    model = Model()
    srv = launch(data, *MANY)
    writers = run_writers(srv.port, model, rng, 6, strict=False)
    wait_acked(model, rng.randint(100, 300), writers, srv)
    srv.proc.send_signal(signal.SIGTERM)
    code, err = srv.finish(timeout=30)
    join_writers(writers)
    assert code == 0, f"SIGTERM exit status {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    errors = [e for w in writers for e in w.errors + w.torn_replies]
    assert not errors, f"unexpected or torn replies: {errors[:5]}"
    with pytest.raises(OSError):
        PhClient(HOST, srv.port, timeout=5).close()

    srv = launch(data, *MANY)
    verify(srv, model, "restart after SIGTERM")
    code, err = srv.stop()
    assert code == 0, err


# --------------------------------------------------------------------------
# 7. The snapshot's image (a quick start after a clean stop)
# --------------------------------------------------------------------------

IMAGE_NOTE = "not using"


def changed_directory(srv, n=30):
    """Adds, changes and deletes through the Ph port; the people it leaves."""
    expected = {}
    with srv.client() as c:
        for i in range(n):
            expected.update([add_ok(c, f"im-{i}")])
        for i in range(0, n, 3):
            assert c.cmd(f'change alias=im-{i} make name="Renamed {i}"') == ["200:1 entry changed."]
            expected[f"im-{i}"] = (f"Renamed {i}", expected[f"im-{i}"][1])
        for i in range(1, n, 5):
            assert c.cmd(f"delete alias=im-{i}") == ["200:1 entries deleted."]
            del expected[f"im-{i}"]
    return expected


def test_a_clean_stop_folds_the_journal_and_the_next_start_loads_the_image(tmp_path, launch):
    data = tmp_path / "data"
    srv = launch(data, *MANY)
    expected = changed_directory(srv)
    code, err = srv.stop()
    assert code == 0, err
    assert (data / "snapshot.image").exists(), sorted(p.name for p in data.iterdir())
    assert all(not journal_data(p) for p in journal_segments(data)), "journal not folded"

    srv = launch(data, *MANY)
    assert people(srv) == expected
    renamed = {a for a, (name, _) in expected.items() if name.startswith("Renamed")}
    assert renamed
    with srv.client() as c:                       # the index came back too, not just records
        found = parse_entries(c.cmd("query name=renamed return alias"))
        assert {e["alias"] for e in found} == renamed
        expected.update([add_ok(c, "after-image")])
    srv.proc.send_signal(signal.SIGKILL)          # no clean stop: the image stays as it was
    srv.finish(timeout=10)
    srv = launch(data, *MANY)
    assert people(srv) == expected, "the journal after the image was not replayed"
    code, err = srv.stop()
    assert code == 0 and IMAGE_NOTE not in err and "Traceback" not in err, err


@pytest.mark.parametrize("damage", ["body", "python", "snapshot"])
def test_an_image_that_does_not_match_is_ignored(tmp_path, launch, damage):
    data = tmp_path / "data"
    srv = launch(data, *MANY)
    expected = changed_directory(srv, 12)
    code, err = srv.stop()
    assert code == 0, err
    image = data / "snapshot.image"
    header, body = image.read_bytes().split(b"\n", 1)
    if damage == "body":
        body = flip(body, [len(body) // 2])
    elif damage == "python":
        header = journal_line(json.dumps(dict(json.loads(header[9:]), python=[2, 7])).encode())[:-1]
    else:                                     # the snapshot was replaced by another one
        snapshot = data / "snapshot.jsonl"
        snapshot.write_bytes(snapshot.read_bytes())
    image.write_bytes(header + b"\n" + body)

    srv = launch(data, *MANY)
    assert people(srv) == expected
    srv.proc.send_signal(signal.SIGKILL)
    _, err = srv.finish(timeout=10)
    assert IMAGE_NOTE in err and "Traceback" not in err, err


def test_compaction_retires_the_image_of_the_snapshot_it_replaces(tmp_path, launch):
    data = tmp_path / "data"
    srv = launch(data, *MANY)
    expected = changed_directory(srv, 6)
    code, err = srv.stop()
    assert code == 0, err
    assert (data / "snapshot.image").exists()
    srv = launch(data, *MANY, "--compact-bytes", "2048")
    with srv.client() as c:
        for i in range(40):
            expected.update([add_ok(c, f"cx-{i}")])
    wait_for(lambda: not (data / "snapshot.image").exists(), timeout=15,
             what="compaction to remove the old snapshot's image")
    srv.proc.send_signal(signal.SIGKILL)
    srv.finish(timeout=10)
    srv = launch(data, *MANY)
    assert people(srv) == expected
    code, err = srv.stop()
    assert code == 0, err
