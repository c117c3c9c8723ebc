"""ph and mdb: the client core, the command line, imports and exports read by real tools."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, ServerProcess, need

sys.path.insert(0, str(ROOT))
import pharos  # noqa: E402

TRICKY_PEOPLE = [
    {"type": "person", "alias": "jsmith", "name": "John Smith", "email": "john@example.org",
     "phone": "+1 555 0100", "mobile": "+1 555 0199", "title": "Chief, Networks",
     "department": "IT; Ops", "office": "1 Main St\nSpringfield, IL", "url": "https://example.org/~j",
     "notes": 'says "hi", then; leaves\nback\\slash line',
     "ssh_key": ["ssh-ed25519 AAAAC3Nza jsmith@laptop", "ssh-rsa AAAAB3Nza jsmith@desk"]},
    {"type": "person", "alias": "zoe", "name": "Zoë Müller-Lüdenscheidt", "email": "zoe@example.de",
     "phone": "+49 30 1234", "nickname": "Zo"},
    {"type": "person", "alias": "cher", "name": "Cher", "email": "cher@example.org"},
    {"type": "person", "alias": "noname", "phone": "42"},
    {"type": "person", "alias": "long", "name": "Long Notes", "notes": "x" * 1500 + "\n" + "é" * 600},
]
TRICKY_MACHINES = [
    {"type": "machine", "hostname": "nas", "ip": ["10.0.0.5", "fd00::5"],
     "mac": ["aa:bb:cc:dd:ee:ff"], "os": "Debian 12", "role": "nas", "owner": "jsmith",
     "location": "Rack 1, Shelf \"B\"", "services": ["22/ssh", "445/smb"],
     "tags": ["storage", "backup"], "notes": "line one\nline two, with comma"},
    {"type": "machine", "hostname": "pi4.lab", "ip": ["10.0.0.21"], "role": "media",
     "os": "Raspberry Pi OS", "tags": ["arm"]},
    {"type": "machine", "hostname": "printer", "ip": ["10.0.0.30"], "location": "Büro 2"},
    {"type": "machine", "hostname": "bare"},
]


def cli(server, *args, capsys=None):
    """Run pharos.main in-process against ``server``; (status, stdout, stderr)."""
    args = [str(a) for a in args]
    status = pharos.main([args[0], "--server", f"127.0.0.1:{server.port}", *args[1:]])
    out, err = capsys.readouterr()
    return status, out, err


def run(*args, env=None, stdin=None):
    """pharos.py in a subprocess."""
    return subprocess.run([sys.executable, str(ROOT / "pharos.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, input=stdin,
                          env=dict(os.environ, **(env or {})))


def load(server, records, capsys, tmp_path, program):
    path = tmp_path / f"seed-{program}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    status, out, err = cli(server, program, "import", str(path), capsys=capsys)
    assert status == 0, err
    return out


@pytest.fixture
def second_server():
    srv = ServerProcess(None, storage="memory").start()
    yield srv
    srv.kill()


# -- the client core -------------------------------------------------------------

def test_client_core_parses_records_pages_and_errors(mem_server):
    async def go():
        client = pharos.PhClient("127.0.0.1", mem_server.port, client_id="mdb")
        try:
            assert await client.write("add hostname=alpha ip=10.0.0.1 ip=10.0.0.2") == "Ok."
            for n in range(5):
                await client.write(f"add hostname=h{n} notes=\"x\\ny\"")
            [rec] = await client.query("hostname=alpha return all")
            assert rec["ip"] == ["10.0.0.1", "10.0.0.2"] and rec["type"] == "machine"
            pages = [p async for p in client.dump("hostname=h* return hostname notes")]
            assert [r["notes"] for _, recs in pages for r in recs] == ["x\ny"] * 5
            with pytest.raises(pharos.PhError) as e:
                await client.query("shoe=9")
            assert e.value.code == 500 and "shoe" in e.value.text
            with pytest.raises(pharos.PhError) as e:
                await client.write("add hostname=alpha")
            assert e.value.code == 599 and "already taken" in e.value.text
            assert await client.ensure_login() is False
            client.link.writer.transport.abort()         # lost connection: one reconnect
            await asyncio.sleep(0)
            assert len(await client.query("hostname=alpha")) == 1
        finally:
            await client.close()
    asyncio.run(go())


def test_client_core_pages_past_max_results(tmp_path):
    server = ServerProcess(None, "--max-results", "3", storage="memory").start()
    try:
        async def go():
            client = pharos.PhClient("127.0.0.1", server.port, client_id="ph")
            try:
                await client.write_many([f"add alias=p{n:02d}" for n in range(10)])
                with pytest.raises(pharos.PhError) as e:
                    await client.query("alias=p*")
                assert e.value.code == 502
                pages = [(t, [r["alias"] for r in recs])
                         async for t, recs in client.dump("alias=p* return alias")]
                assert [len(r) for _, r in pages] == [3, 3, 3, 1] and {t for t, _ in pages} == {10}
                assert [a for _, r in pages for a in r] == [f"p{n:02d}" for n in range(10)]
            finally:
                await client.close()
        asyncio.run(go())
    finally:
        server.kill()


def test_client_core_times_out_and_reports_unreachable():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()

    async def go():
        client = pharos.PhClient("127.0.0.1", port, timeout=0.3)
        try:
            with pytest.raises(pharos.PhError) as e:
                await client.command("status")
            assert e.value.code == 421 and "no reply" in e.value.text
        finally:
            await client.close()
    try:
        asyncio.run(go())
    finally:
        listener.close()


def test_schema_from_fields_reads_custom_fields(tmp_path):
    config = tmp_path / "pharos.ini"
    config.write_text("[field rack]\ntypes = machine\nmulti = yes\nmax = 16\n")
    server = ServerProcess(None, "--config", str(config), storage="memory").start()
    try:
        async def go():
            client = pharos.PhClient("127.0.0.1", server.port, client_id="mdb")
            try:
                schema = await client.load_schema()
                assert schema.field("rack").multi and schema.field("rack").types == {"machine"}
                await client.write("add hostname=r1 rack=R1 rack=R2")
                [rec] = await client.query("hostname=r1 return rack")
                assert rec["rack"] == ["R1", "R2"]
            finally:
                await client.close()
        asyncio.run(go())
    finally:
        server.kill()


# -- ph and mdb ---------------------------------------------------------------------

def test_query_layouts_and_exit_codes(mem_server, capsys, tmp_path):
    load(mem_server, TRICKY_PEOPLE, capsys, tmp_path, "ph")
    load(mem_server, TRICKY_MACHINES, capsys, tmp_path, "mdb")
    status, out, _ = cli(mem_server, "ph", "john", capsys=capsys)
    assert status == 0 and out.splitlines()[0] == "John Smith (jsmith)"
    assert "  notes  says \"hi\", then; leaves" in out and "\x1b[" not in out
    status, out, _ = cli(mem_server, "ph", "name=john", "return", "email", "phone", capsys=capsys)
    assert out.splitlines() == ["John Smith (jsmith)", "  email  john@example.org",
                                "  phone  +1 555 0100"]
    status, out, _ = cli(mem_server, "mdb", "ip=10.0.0.*", capsys=capsys)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["HOSTNAME", "STATUS", "IP"] and len(lines) == 4
    assert lines[1].split()[:2] == ["nas", "unknown"]
    status, out, _ = cli(mem_server, "mdb", "role=nas", "--json", capsys=capsys)
    [nas] = json.loads(out)
    assert nas["ip"] == ["10.0.0.5", "fd00::5"] and nas["status"] == "unknown"
    status, out, _ = cli(mem_server, "mdb", "ip=10.0.0.*", "--jsonl", "--fields", "hostname,ip",
                         capsys=capsys)
    assert [json.loads(x) for x in out.splitlines()][0] == {"hostname": "nas",
                                                          "ip": ["10.0.0.5", "fd00::5"]}
    status, out, _ = cli(mem_server, "mdb", "show", "nas", capsys=capsys)
    assert status == 0 and out.startswith("nas  [unknown]") and "created" in out
    assert cli(mem_server, "mdb", "john", capsys=capsys)[0] == 1       # mdb: machines only
    assert cli(mem_server, "ph", "nobody", capsys=capsys)[0] == 1
    status, out, _ = cli(mem_server, "ph", "--json", capsys=capsys)      # bare: every person
    assert status == 0 and {r["alias"] for r in json.loads(out)} >= {"jsmith"}
    status, _, err = cli(mem_server, "ph", "export", "--format", "ansible", capsys=capsys)
    assert status == 2 and len(err.splitlines()) == 1
    status, _, err = cli(mem_server, "ph", "shoe=9", capsys=capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "shoe" in err     # input refused
    status, out, _ = cli(mem_server, "mdb", "fields", capsys=capsys)
    assert "hostname" in out and "alias " not in out and "[multi]" in out


def test_colours_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    class Tty:
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert pharos.colour_on(Tty()) and not pharos.colour_on(open(os.devnull, "w"))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not pharos.colour_on(Tty())
    lines = pharos.format_table([{"hostname": "nas", "status": "online"}], ["hostname", "status"],
                                True)
    assert "\x1b[32m" in lines[1]


def test_add_change_delete_with_confirmation(mem_server, capsys):
    for n in range(3):
        assert cli(mem_server, "mdb", "add", f"hostname=web{n}", "role=web", capsys=capsys)[0] == 0
    status, out, _ = cli(mem_server, "mdb", "change", "hostname=web0", "make", "role=backup",
                         capsys=capsys)
    assert status == 0 and out.strip() == "1 entry changed."
    status, _, err = cli(mem_server, "mdb", "change", "role=web", "make", "os=x", capsys=capsys)
    assert status == 2 and "--yes" in err                          # not a terminal: no asking
    status, _, err = cli(mem_server, "mdb", "delete", "hostname=web*", capsys=capsys)
    assert status == 2 and "would touch 3 records" in err
    assert cli(mem_server, "mdb", "delete", "hostname=nothing", capsys=capsys)[0] == 1
    status, out, _ = cli(mem_server, "mdb", "delete", "hostname=web*", "--yes", capsys=capsys)
    assert status == 0 and "3 entries deleted" in out
    assert cli(mem_server, "mdb", "web0", capsys=capsys)[0] == 1


def test_delete_asks_on_a_terminal(mem_server):
    import pty
    for n in range(2):
        assert run("mdb", "--server", f"127.0.0.1:{mem_server.port}", "add",
                   f"hostname=tty{n}").returncode == 0
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, str(ROOT / "pharos.py"), "mdb", "--server",
                                  f"127.0.0.1:{mem_server.port}", "delete", "hostname=tty*"])
    seen = b""
    while b"[y/N]" not in seen:
        seen += os.read(fd, 1024)
    assert b"Delete 2 records (tty0, tty1)?" in seen
    os.write(fd, b"y\n")
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert os.waitpid(pid, 0)[1] == 0 and b"2 entries deleted" in seen


def test_server_address_precedence(mem_server, tmp_path, monkeypatch, capsys):
    conf = tmp_path / "xdg" / "pharos" / "client.ini"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[client]\nserver = 127.0.0.1:{mem_server.port}\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("PHAROS_SERVER", raising=False)
    assert pharos.main(["mdb", "add", "hostname=cfg"]) == 0             # from the config file
    monkeypatch.setenv("PHAROS_SERVER", "127.0.0.1:1")                  # env beats the file
    assert pharos.main(["mdb", "cfg"]) == 3
    assert pharos.main(["mdb", "--server", f"127.0.0.1:{mem_server.port}", "cfg"]) == 0
    conf.write_text("[client\nserver")
    monkeypatch.delenv("PHAROS_SERVER")
    assert pharos.main(["mdb", "cfg"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


# -- imports and exports ----------------------------------------------------------

@pytest.mark.parametrize("program, records, formats", [
    ("ph", TRICKY_PEOPLE, ["vcard", "csv", "json", "jsonl"]),
    ("mdb", TRICKY_MACHINES, ["csv", "json", "jsonl"]),
])
def test_round_trips_are_identical_and_idempotent(mem_server, second_server, capsys, tmp_path,
                                                   program, records, formats):
    summary = load(mem_server, records, capsys, tmp_path, program)
    assert summary.strip() == f"added {len(records)}, changed 0, unchanged 0, rejected 0"
    for fmt in formats:
        first, second = tmp_path / f"first.{fmt}", tmp_path / f"second.{fmt}"
        assert cli(mem_server, program, "export", "--format", fmt, "-o", first,
                   capsys=capsys)[0] == 0
        status, out, err = cli(second_server, program, "import", first, capsys=capsys)
        assert status == 0, err
        again = cli(second_server, program, "import", first, capsys=capsys)
        assert again[1].strip() == f"added 0, changed 0, unchanged {len(records)}, rejected 0"
        assert cli(second_server, program, "export", "--format", fmt, "-o", second,
                   capsys=capsys)[0] == 0
        assert first.read_bytes() == second.read_bytes(), fmt
    status, out, _ = cli(second_server, program, "export", "--format", "jsonl", capsys=capsys)
    exported = [json.loads(x) for x in out.splitlines()]
    key = "alias" if program == "ph" else "hostname"
    assert sorted(exported, key=lambda r: r[key]) == sorted(records, key=lambda r: r[key])


def test_import_changes_only_what_differs(mem_server, capsys, tmp_path):
    load(mem_server, TRICKY_PEOPLE, capsys, tmp_path, "ph")
    edited = tmp_path / "edit.csv"
    edited.write_text("Alias,E-Mail,Phone\r\njsmith,john@example.org,+1 555 0111\r\n"
                      "zoe,zoe@example.de,+49 30 1234\r\nnew1,new1@example.org,\r\n")
    status, out, _ = cli(mem_server, "ph", "import", edited, capsys=capsys)
    assert status == 0 and out.strip() == "added 1, changed 1, unchanged 1, rejected 0"
    [john] = json.loads(cli(mem_server, "ph", "show", "jsmith", "--json", capsys=capsys)[1])
    assert john["phone"] == "+1 555 0111" and john["mobile"] == "+1 555 0199"


BAD_INPUTS = [
    ("ph", "bad.vcf", "BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Good Guy\r\nEMAIL:g@example.org\r\n"
     "END:VCARD\r\nBEGIN:VCARD\r\nVERSION:3.0\r\nFN Broken\r\nEND:VCARD\r\n",
     "line 8: not a vCard property line", 1),
    ("ph", "noend.vcf", "BEGIN:VCARD\nVERSION:4.0\nFN:Good Guy\nEND:VCARD\n"
     "BEGIN:VCARD\nVERSION:4.0\nFN:Lost\n", "line 5: the card has no END:VCARD", 1),
    ("ph", "short.csv", "alias,name,email\ngood,Good Guy,g@example.org\nshort,Short\n",
     "line 3: 2 cells, but the header has 3 columns", 1),
    ("mdb", "nokey.csv", "ip,role\n10.0.0.1,nas\n", "line 1: the header row has no hostname column",
     None),
    ("mdb", "object.json", '{"hostname": "a"}', "line 1: a JSON import must be a list", None),
    ("mdb", "items.json", '[{"hostname": "good"},\n "not a record"]',
     "line 2: each record must be a JSON object", 1),
    ("mdb", "values.jsonl", '{"hostname": "good"}\n{"hostname": "bad", "ip": "300.1.1.1"}\n',
     "line 2: ip '300.1.1.1'", 1),
]


@pytest.mark.parametrize("program, name, text, message, good", BAD_INPUTS,
                         ids=[b[1] for b in BAD_INPUTS])
def test_bad_input_names_the_line_and_imports_nothing(mem_server, capsys, tmp_path,
                                                      program, name, text, message, good):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    status, out, err = cli(mem_server, program, "import", path, capsys=capsys)
    assert status == 2 and message in err and "nothing was imported" in err, err
    assert "Traceback" not in err and all(x.startswith(program) for x in err.splitlines())
    assert cli(mem_server, program, "export", "--format", "jsonl", capsys=capsys)[1] == ""
    if good is not None:
        status, out, err = cli(mem_server, program, "import", path, "--keep-going", capsys=capsys)
        assert status == 2 and f"added {good}," in out and "rejected 1" in out
        assert message in err


def test_vcard_4_and_foreign_cards_import(mem_server, capsys, tmp_path):
    path = tmp_path / "foreign.vcf"
    path.write_text("BEGIN:VCARD\r\nVERSION:4.0\r\nUID:urn:uuid:1234\r\nFN:Ana Lima\r\n"
                    "N:Lima;Ana;;;\r\nEMAIL;TYPE=work:ana.lima@example.com\r\n"
                    "TEL;VALUE=uri;TYPE=\"cell,voice\":tel:+55-11-5555-0100\r\n"
                    "ORG:Example Ltd;IT\r\nNOTE:folded lon\r\n g note\r\nEND:VCARD\r\n")
    assert cli(mem_server, "ph", "import", path, capsys=capsys)[0] == 0
    [ana] = json.loads(cli(mem_server, "ph", "show", "ana.lima", "--json", capsys=capsys)[1])
    assert ana["name"] == "Ana Lima" and ana["mobile"] == "+55-11-5555-0100"
    assert ana["department"] == "Example Ltd, IT" and ana["notes"] == "folded long note"


def test_import_from_stdin_and_export_to_stdout_in_a_subprocess(mem_server):
    where = ["--server", f"127.0.0.1:{mem_server.port}"]
    lines = "".join(json.dumps(r) + "\n" for r in TRICKY_MACHINES)
    result = run("mdb", *where, "import", "-", stdin=lines)
    assert result.returncode == 0 and "added 4" in result.stdout, result.stderr
    assert result.stderr == ""                                    # no progress bar off a terminal
    result = run("mdb", *where, "export", "--format", "hosts", "--domain", "home.lan")
    assert "10.0.0.5\tnas.home.lan nas\n" in result.stdout
    assert "10.0.0.21\tpi4.lab\n" in result.stdout


# -- real consumers ---------------------------------------------------------------

@pytest.fixture
def people_server(mem_server, capsys, tmp_path):
    load(mem_server, TRICKY_PEOPLE, capsys, tmp_path, "ph")
    return mem_server


@pytest.fixture
def machine_server(mem_server, capsys, tmp_path):
    load(mem_server, TRICKY_MACHINES, capsys, tmp_path, "mdb")
    return mem_server


def test_vcard_export_read_by_vobject(people_server, capsys, tmp_path):
    try:
        import vobject
    except ImportError:
        vobject = None
    need(vobject, "the vobject package (pip install vobject)")
    status, out, _ = cli(people_server, "ph", "export", "--format", "vcard", capsys=capsys)
    cards = {c.fn.value: c for c in vobject.readComponents(out)}
    john = cards["John Smith"]
    assert john.email.value == "john@example.org"
    assert sorted(t.value for t in john.contents["tel"]) == ["+1 555 0100", "+1 555 0199"]
    assert john.note.value == 'says "hi", then; leaves\nback\\slash line'
    assert cards["Zoë Müller-Lüdenscheidt"].email.value == "zoe@example.de"
    assert cards["Zoë Müller-Lüdenscheidt"].n.value.family == "Müller-Lüdenscheidt"


def test_vcard_export_read_by_khard(people_server, capsys, tmp_path):
    need(shutil.which("khard"), "khard (pip install khard)")
    vdir = tmp_path / "contacts"
    vdir.mkdir()
    assert cli(people_server, "ph", "export", "--format", "vcard", "-o", vdir,
               capsys=capsys)[0] == 0
    config = tmp_path / "khard.conf"
    config.write_text(f"[addressbooks]\n[[pharos]]\npath = {vdir}\n")
    env = dict(os.environ, HOME=str(tmp_path))

    def khard(*args):
        result = subprocess.run(["khard", "-c", str(config), *args], capture_output=True,
                                text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return [row.split("\t") for row in result.stdout.splitlines() if "\t" in row]
    names = {row[1] for row in khard("list", "--parsable")}
    assert {"John Smith", "Zoë Müller-Lüdenscheidt", "Cher"} <= names
    emails = {(row[1], row[0]) for row in khard("email", "--parsable")}
    assert ("John Smith", "john@example.org") in emails and \
        ("Zoë Müller-Lüdenscheidt", "zoe@example.de") in emails
    phones = {(row[1], row[0]) for row in khard("phone", "--parsable")}
    assert {("John Smith", "+1 555 0100"), ("John Smith", "+1 555 0199"),
            ("Zoë Müller-Lüdenscheidt", "+49 30 1234")} <= phones


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    out = tmp_path_factory.mktemp("zipapp") / "pharos.pyz"
    result = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


def zipapp_env(server):
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, PATH=path, PHAROS_SERVER=f"127.0.0.1:{server.port}")


def test_zipapp_and_symlinks_run_ph_and_mdb(mem_server, pyz, tmp_path):
    env = zipapp_env(mem_server)
    (tmp_path / "ph").symlink_to(pyz)
    (tmp_path / "mdb").symlink_to(pyz)

    def go(*args):
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, timeout=60)
    assert go(tmp_path / "ph", "add", "alias=zed", "name=Zed Zip").returncode == 0
    assert go(pyz, "mdb", "add", "hostname=zip", "ip=10.9.9.9", "role=nas").returncode == 0
    found = go(tmp_path / "ph", "zed", "--json")
    assert found.returncode == 0 and json.loads(found.stdout)[0]["name"] == "Zed Zip"
    table = go(tmp_path / "mdb", "role=nas")
    assert table.stdout.split()[:2] == ["HOSTNAME", "STATUS"] and "\x1b" not in table.stdout
    assert go(tmp_path / "mdb", "nothing").returncode == 1
    exported = go(tmp_path / "ph", "export", "--format", "jsonl")
    assert json.loads(exported.stdout) == {"type": "person", "alias": "zed", "name": "Zed Zip"}
    down = dict(env, PHAROS_SERVER="127.0.0.1:1")
    failed = subprocess.run([str(tmp_path / "ph"), "zed"], capture_output=True, text=True,
                            env=down, timeout=60)
    assert failed.returncode == 3 and len(failed.stderr.splitlines()) == 1


def test_zipapp_is_an_ansible_inventory_script(machine_server, pyz):
    need(shutil.which("ansible-inventory"), "ansible-core (pip install ansible-core)")
    env = zipapp_env(machine_server)
    env.update(ANSIBLE_LOCAL_TEMP=str(pyz.parent / "ansible-tmp"), ANSIBLE_HOME=str(pyz.parent))
    result = subprocess.run(["ansible-inventory", "-i", str(pyz), "--list"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    inventory = json.loads(result.stdout)
    hostvars = inventory["_meta"]["hostvars"]
    assert set(hostvars) == {"nas", "pi4.lab", "printer", "bare"}
    assert hostvars["nas"]["ansible_host"] == "10.0.0.5"
    assert hostvars["nas"]["pharos_tags"] == ["storage", "backup"]
    assert hostvars["nas"]["pharos_owner"] == "jsmith"
    assert inventory["role_nas"]["hosts"] == ["nas"]
    assert inventory["os_debian_12"]["hosts"] == ["nas"]
    assert inventory["tag_arm"]["hosts"] == ["pi4.lab"]
    assert inventory["location_b_ro_2"]["hosts"] == ["printer"]
    assert inventory["ungrouped"]["hosts"] == ["bare"]
    one = subprocess.run([sys.executable, str(pyz), "--host", "nas"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert json.loads(one.stdout)["pharos_role"] == "nas"
    missing = subprocess.run([sys.executable, str(pyz), "--host", "nope"], capture_output=True,
                             text=True, env=env, timeout=60)
    assert missing.returncode == 0 and json.loads(missing.stdout) == {}


def test_dnsmasq_accepts_the_dnsmasq_export(machine_server, capsys, tmp_path):
    dnsmasq = shutil.which("dnsmasq") or (os.path.exists("/usr/sbin/dnsmasq") and "/usr/sbin/dnsmasq")
    need(dnsmasq, "dnsmasq (Debian dnsmasq-base)")
    conf = tmp_path / "pharos.conf"
    assert cli(machine_server, "mdb", "export", "--format", "dnsmasq", "--domain", "home.lan",
               "-o", conf, capsys=capsys)[0] == 0
    text = conf.read_text()
    assert "host-record=nas.home.lan,nas,10.0.0.5\n" in text
    assert "host-record=nas.home.lan,nas,fd00::5\n" in text and "bare" not in text
    result = subprocess.run([dnsmasq, "--test", f"--conf-file={conf}"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "syntax check OK" in result.stderr + result.stdout
    conf.write_text(text + "host-record=\n")
    bad = subprocess.run([dnsmasq, "--test", f"--conf-file={conf}"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0                                       # the check can fail


def test_promtool_accepts_the_prometheus_sd_export(machine_server, capsys, tmp_path):
    need(shutil.which("promtool"), "promtool (Debian prometheus)")
    targets = tmp_path / "pharos.json"
    assert cli(machine_server, "mdb", "export", "--format", "prometheus-sd", "-o", targets,
               capsys=capsys)[0] == 0
    groups = json.loads(targets.read_text())
    nas = next(g for g in groups if g["labels"]["instance"] == "nas")
    assert nas["targets"] == ["10.0.0.5:9100"]
    assert nas["labels"]["__meta_pharos_tags"] == ",storage,backup,"
    assert next(g for g in groups if g["labels"]["instance"] == "bare")["targets"] == ["bare:9100"]
    config = tmp_path / "prometheus.yml"
    config.write_text("scrape_configs:\n  - job_name: node\n    file_sd_configs:\n"
                      f"      - files: ['{tmp_path}/*.json']\n")
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / "broken.json").write_text('[{"targets": ["x:1"], "labels": {"0": "bad"}}]')
    broken = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert broken.returncode != 0                                    # the check can fail
