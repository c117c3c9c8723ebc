"""Regressions from an attack on several corners: a journal's damaged tail taken for a
torn write, IPv6 scan targets, non-ASCII port digits, a failing stdout and client.ini."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pharos  # noqa: E402
from pharos import FileStore, Schema  # noqa: E402

from conftest import ServerProcess  # noqa: E402

PHAROS = Path(pharos.__file__)
SEGMENT = "journal-0000000000000001.jsonl"


def person_line(seq, batch=None):
    return pharos.encode_journal(seq, [(seq, {"type": "person", "alias": f"p{seq}"})],
                                 batch=batch)


def write_segment(data, body):
    data.mkdir(parents=True, exist_ok=True)
    (data / SEGMENT).write_bytes(body)


def open_store(data):
    """Open a file store on ``data``; (aliases, log lines), closing it again."""
    import asyncio
    logged = []
    store = FileStore(Schema(), data, log=logged.append).open()
    try:
        return sorted(r["alias"] for r in store.directory.records.values()), logged
    finally:
        asyncio.run(store.close())


def crlf(line):
    return line[:-1] + b"\r\n"


FOUR = [person_line(seq) for seq in (1, 2, 3, 4)]


@pytest.mark.parametrize("damaged", [(1, 2, 3, 4), (2, 3, 4), (3, 4)],
                         ids=["every-line", "lines-2-4", "lines-3-4"])
def test_crlf_on_several_journal_lines_is_damage_not_a_torn_write(tmp_path, damaged):
    """unix2dos on the journal: the first bad line is followed by more data, so refuse."""
    data = tmp_path / "data"
    body = b"".join(crlf(l) if n in damaged else l for n, l in enumerate(FOUR, 1))
    write_segment(data, body + bytes(4096))
    before = (data / SEGMENT).read_bytes()
    with pytest.raises(pharos.DataError, match=rf"{SEGMENT} line {damaged[0]}: corrupt"):
        open_store(data)
    assert (data / SEGMENT).read_bytes() == before, "the journal was changed"


def test_a_bad_last_line_before_the_fill_is_still_a_torn_write(tmp_path):
    """Nothing but zeros follows it: the last write, cut short; dropped with a warning."""
    data = tmp_path / "data"
    write_segment(data, b"".join(FOUR[:3]) + crlf(FOUR[3]) + bytes(4096))
    aliases, logged = open_store(data)
    assert aliases == ["p1", "p2", "p3"]
    assert any("torn write" in m for m in logged), logged


def test_a_stray_byte_deep_in_the_zero_fill_is_refused_where_it_is(tmp_path):
    """Our writer writes only at the data's end: a byte 2 MB into the fill is damage."""
    data = tmp_path / "data"
    body = b"".join(FOUR)
    fill = bytearray(4 * 1024 * 1024)
    fill[2 * 1024 * 1024] = 0x41
    write_segment(data, body + bytes(fill))
    at = len(body) + 2 * 1024 * 1024
    with pytest.raises(pharos.DataError, match=rf"line 5: .*zero fill at byte {at}\b"):
        open_store(data)


# -- scan: IPv6 targets stay IPv6; ports in ASCII digits only ---------------------

def probed(*texts, ports=(22,)):
    """The (family, address) of every probe the engine would start for ``texts``."""
    pairs = pharos.resolve_targets(pharos.parse_targets(list(texts)))
    return {(f, a) for f, a, _ in pharos.probe_list([a for a, _ in pairs], list(ports))}


def test_ipv6_targets_are_probed_as_ipv6_at_exactly_the_addresses_named():
    v6 = socket.AF_INET6
    assert probed("::1") == {(v6, "::1")}
    assert probed("[::1]") == {(v6, "::1")}
    assert probed("::1/126") == {(v6, "::"), (v6, "::1"), (v6, "::2"), (v6, "::3")}
    assert probed("::1-::2", "127.0.0.1") == {(v6, "::1"), (v6, "::2"),
                                              (socket.AF_INET, "127.0.0.1")}
    assert len(probed("::1/120")) == 256 and all(f == v6 for f, _ in probed("::1/120"))


def test_ipv6_ranges_over_a_112_need_force():
    assert pharos.target_size(pharos.parse_targets(["::/112"])[0]) == 65536
    with pytest.raises(pharos.UsageError, match="65,537 addresses|131,072 addresses"):
        pharos.parse_targets(["::/111"])
    assert pharos.parse_targets(["::/111"], force=True)


def scan(*args):
    done = subprocess.run([sys.executable, str(PHAROS), "scan", *args, "-n", "--no-mdns",
                           "--no-arp", "--dry-run", "--jsonl"],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def ipv6_listener():
    """A listening socket on [::1]:0, or None where the machine has no IPv6 loopback."""
    from conftest import need
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.bind(("::1", 0))
    except OSError:
        need(False, "an IPv6 loopback (::1)")
    sock.listen(8)
    return sock


@pytest.mark.parametrize("target", ["::1", "[::1]"])
def test_scan_finds_a_listener_on_ipv6_loopback_as_ipv6(target):
    sock = ipv6_listener()
    try:
        code, out, err = scan("--ports", str(sock.getsockname()[1]), "--timeout", "2", target)
    finally:
        sock.close()
    assert "Traceback" not in err, err
    records = [__import__("json").loads(line) for line in out.splitlines()]
    assert [r["ip"] for r in records] == [["::1"]], (out, err)
    assert records[0]["hostname"] == "ip---1"


@pytest.mark.parametrize("ports", ["٢٢", "２２", "22-٢٥", "+22", "2_2", " 22-"])
def test_scan_ports_must_be_ascii_digits(ports):
    with pytest.raises(pharos.UsageError, match="bad --ports item"):
        pharos.parse_ports(ports)
    code, out, err = scan("--ports", ports, "127.0.0.1")
    assert code == 2 and err.count("\n") == 1 and "bad --ports item" in err, err


# -- a failing stdout: a closed pipe ends quietly, a full disk is one line ---------

@pytest.fixture(scope="module")
def ben_server():
    """A memory server holding person ben and machine nas."""
    srv = ServerProcess(None, storage="memory").start()
    where = ["--server", f"127.0.0.1:{srv.port}"]
    for verb, words in (("ph", ["alias=ben", "name=Ben Bell"]), ("mdb", ["hostname=nas"])):
        done = subprocess.run([sys.executable, str(PHAROS), verb, *where, "add", *words],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    yield where
    srv.kill()


def run_into(stdout, *args):
    done = subprocess.run([sys.executable, str(PHAROS), *args], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    return done.returncode, done.stderr


COMMANDS = [["ph", "name=ben"], ["mdb", "export", "--format", "jsonl"],
            ["mdb", "export", "--format", "csv"], ["ph", "name=ben", "--json"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_closed_pipe_ends_quietly_with_141(ben_server, command):
    read, write = os.pipe()
    os.close(read)                      # the reader is gone before the first write
    try:
        code, err = run_into(write, command[0], *ben_server, *command[1:])
    finally:
        os.close(write)
    assert code == 141 and err == "", (code, err)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_full_disk_under_stdout_is_one_line_and_exit_3(ben_server, command):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        code, err = run_into(full, command[0], *ben_server, *command[1:])
    assert (code, err) == (3, "pharos: cannot write output: No space left on device\n")


# -- client.ini and PHAROS_SERVER: errors say where the setting came from ----------

def ph_with(tmp_path, ini=None, server=None):
    """`pharos ph nobody` with ``ini`` as the client.ini and PHAROS_SERVER ``server``."""
    conf = tmp_path / "xdg" / "pharos" / "client.ini"
    conf.parent.mkdir(parents=True, exist_ok=True)
    if ini is not None:
        conf.write_bytes(ini.encode())
    env = {k: v for k, v in os.environ.items() if k not in ("PHAROS_SERVER", "HOME")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path))
    if server is not None:
        env["PHAROS_SERVER"] = server
    done = subprocess.run([sys.executable, str(PHAROS), "ph", "--timeout", "2", "nobody"],
                          capture_output=True, text=True, timeout=60, env=env)
    return done.returncode, done.stderr, conf


@pytest.mark.parametrize("ini, line, says", [
    ("[client]\nserver = 127.0.0.1:23800 ; comment\n", 2, "server '127.0.0.1:23800 ; comment'"),
    ("[client]\nsrever = 127.0.0.1:1\n", 2, "unknown setting 'srever' in [client]; known: server"),
    ("[client]\nserver = 127.0.0.1:1\nserver = 127.0.0.1:2\n", 3, "server is set a second time"),
    ("[client]\nserver = 127.0.0.1:1\n[other]\nx = 1\n[client]\nserver = 127.0.0.1:2\n", 5,
     "a second [client] section"),
    ("[client]\nserver = 1.2.3.4:5:6\n", 2, "server '1.2.3.4:5:6': expected HOST:PORT"),
], ids=["inline-comment", "misspelled", "duplicate-key", "duplicate-section", "colons"])
def test_a_bad_client_ini_is_refused_naming_file_and_line(tmp_path, ini, line, says):
    code, err, conf = ph_with(tmp_path, ini)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"pharos: {conf} line {line}: ") and says in err, err
    assert "--server" not in err


def test_a_client_ini_with_a_bom_is_read(mem_server, tmp_path):
    code, err, _ = ph_with(tmp_path, f"\ufeff[client]\nserver = 127.0.0.1:{mem_server.port}\n")
    assert (code, err) == (1, "ph: no match\n")


@pytest.mark.parametrize("value", ["127.0.0.1:23800:1", "127.0.0.1:99999", "host:port"])
def test_pharos_server_is_checked_like_the_option(tmp_path, value):
    code, err, _ = ph_with(tmp_path, server=value)
    assert code == 2 and err.count("\n") == 1 and err.startswith("pharos: PHAROS_SERVER "), err
