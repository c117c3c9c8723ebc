"""Start-up: what a lookup imports, and the two client links (asyncio streams and a
blocking socket) behaving alike: same replies, same PhError codes and words."""

import socket
import subprocess
import sys
import threading

import pytest

from conftest import PHAROS, ROOT, wait_for

sys.path.insert(0, str(ROOT))
import pharos  # noqa: E402

LINKS = [pharos.StreamLink, pharos.SocketLink]


def imported_modules(*args):
    """(exit status, stdout, the packages `python3 -X importtime pharos.py ARGS` imported).

    importtime leaves out a module that importlib.import_module imports (as LazyModule
    does), though not the modules that one imports: so the package of each is counted.
    """
    done = subprocess.run([sys.executable, "-X", "importtime", str(PHAROS), *args],
                          capture_output=True, text=True, timeout=60)
    names = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
             if line.startswith("import time:")}
    return done.returncode, done.stdout, names


def test_a_lookup_imports_neither_asyncio_nor_what_only_servers_and_logins_need(mem_server):
    address = f"127.0.0.1:{mem_server.port}"
    status, _, names = imported_modules("ph", "--server", address, "add", "alias=ada",
                                        "name=Ada Lovelace")
    assert status == 0 and "asyncio" not in names
    for verb, shown in ((["ada"], "Ada Lovelace"), (["show", "ada"], "Ada Lovelace"),
                        (["fields"], "alias"), (["export", "--format", "json"], '"ada"')):
        status, out, names = imported_modules("ph", "--server", address, *verb)
        assert status == 0 and shown in out, (verb, out)
        assert not names & {"asyncio", "_asyncio", "_hashlib"}, (verb, names)
    status, out, names = imported_modules("ph", "--server", address, "nobody-here")
    assert status == 1 and "asyncio" not in names


def test_import_still_runs_its_connections_on_asyncio(mem_server, tmp_path):
    people = tmp_path / "people.jsonl"
    people.write_text('{"alias": "alan", "name": "Alan Turing"}\n', encoding="utf-8")
    status, out, names = imported_modules("ph", "--server", f"127.0.0.1:{mem_server.port}",
                                          "import", str(people))
    assert status == 0 and "added 1" in out and "asyncio" in names


class FakeServer:
    """A listener on 127.0.0.1 that hands its Nth connection to ``behaviour(n, sock)``."""

    def __init__(self, behaviour):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.behaviour, self.accepted, self.open = behaviour, 0, []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.open.append(sock)
            self.accepted += 1
            threading.Thread(target=self.behaviour, args=(self.accepted, sock),
                             daemon=True).start()

    def close(self):
        self.listener.close()
        for sock in self.open:
            sock.close()


def read_line(sock):
    """Read up to and including one newline (b'' if the client or the test went)."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = sock.recv(1)
        except OSError:
            return b""
        if not chunk:
            return data
        data += chunk
    return data


def outcome(link, port, steps, timeout=5.0, host="127.0.0.1"):
    """Run ``steps(client)`` on a PhClient over ``link``; (result or (code, text) of the
    PhError it raised)."""
    async def go():
        client = pharos.PhClient(host, port, timeout=timeout, link=link)
        try:
            return await steps(client)
        except pharos.PhError as e:
            return e.code, e.text
        finally:
            await client.close()
    return link.run(go())


def status_of(client):
    return client.command("status")


def closing(n, sock):
    read_line(sock)
    sock.close()


def silent(n, sock):
    read_line(sock)


def lost_once(n, sock):
    """The first connection goes after one request; the second answers."""
    while read_line(sock):
        if n == 1:
            sock.close()
            return
        sock.sendall(b"200:Ok.\n")


def over_long(n, sock):
    read_line(sock)
    sock.sendall(b"-200:1: name: " + b"x" * (pharos.MAX_REPLY_READ + 10))


@pytest.mark.parametrize("behaviour, timeout, code, words, connections", [
    (closing, 5.0, 421, "connection lost: server closed the connection", 2),
    (silent, 0.3, 421, "no reply within 0.3s", 1),
    (lost_once, 5.0, 200, "Ok.", 2),
    (over_long, 5.0, 400, f"the server sent a reply line over {1 << 20} bytes", 1),
])
def test_both_links_fail_alike(behaviour, timeout, code, words, connections):
    seen = []
    for link in LINKS:
        server = FakeServer(behaviour)
        try:
            got = outcome(link, server.port, status_of, timeout)
            seen.append(got[:2])
            assert wait_for(lambda: server.accepted == connections, what="connections")
        finally:
            server.close()
    assert seen == [(code, words)] * 2


def test_both_links_word_an_unreachable_server_alike():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    seen = [outcome(link, port, status_of) for link in LINKS]
    assert seen == [(421, f"cannot reach 127.0.0.1:{port}: Connection refused")] * 2


def test_a_host_name_with_no_idna_form_is_unreachable_not_a_traceback():
    host = "ü" * 64 + ".example"        # a label over 63 bytes: the idna codec refuses it
    seen = [outcome(link, 2378, status_of, host=host) for link in LINKS]
    assert seen == [(421, f"cannot reach {host}:2378: {host} is not a valid host name")] * 2


def test_both_links_give_the_same_records_and_refusals(mem_server):
    async def steps(client):
        await client.load_schema()
        if not await client.query("alias=grace"):
            await client.write('add alias=grace name="Grace Hopper" email=grace@example.org')
        pages = [r async for _, page in client.dump("alias=g* return all") for r in page]
        try:
            await client.query("shoe=9")
        except pharos.PhError as e:
            refused = (e.code, e.text)
        return await client.query("grace return alias name email"), pages, refused

    stream, blocking = (outcome(link, mem_server.port, steps) for link in LINKS)
    assert stream == blocking
    records, pages, refused = blocking
    assert records == [{"alias": "grace", "name": "Grace Hopper", "email": "grace@example.org"}]
    assert [r["alias"] for r in pages] == ["grace"] and refused[0] == 500


def test_the_blocking_run_refuses_a_coroutine_that_waits_on_a_future():
    async def waits():
        await pharos.asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="waited on a future"):
        pharos.SocketLink.run(waits())
