"""The command line: usage errors, load, doctor, and ph/mdb against a live server."""

import ast
import json
import subprocess
import sys

import pytest

from conftest import PHAROS, ServerProcess



def run(*args, **kw):
    return subprocess.run([sys.executable, str(PHAROS), *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_source_parses_as_python_3_10():
    ast.parse(PHAROS.read_text(), feature_version=(3, 10))


@pytest.mark.parametrize("args", [
    [], ["serve", "--no-such-flag"], ["serve", "--tier", "dev", "--listen", "0.0.0.0:2378"],
    ["serve", "--listen", "a:b:c"], ["serve", "--tier", "bogus"], ["serve", "--max-results", "0"],
    ["serve", "--idle-timeout", "soon"], ["frobnicate"], ["ph", "--server", "host:port", "x"],
    ["load"], ["serve", "--config", "/nonexistent/pharos.ini"], ["serve", "--busy-poll", "-1"],
    ["serve", "--busy-poll", "10001"], ["serve", "--busy-poll", "0.5"],
])
def test_usage_errors_are_one_line_and_exit_2(args, tmp_path):
    result = run(*args, "--data", str(tmp_path)) if args[:1] in (["serve"], ["load"]) else run(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_load_then_serve(tmp_path):
    data, src = tmp_path / "data", tmp_path / "in.jsonl"
    write_jsonl(src, [{"type": "person", "alias": "zoe", "name": "Zoë Müller"},
                      {"type": "machine", "hostname": "nas", "ip": ["10.0.0.5", "fd00::5"],
                       "status": "online", "created": "2020-01-02T03:04:05Z"}])
    result = run("load", "--data", str(data), str(src))
    assert result.returncode == 0, result.stderr
    assert "loaded 2 records" in result.stdout
    server = ServerProcess(data).start()
    try:
        with server.client() as c:
            assert c.cmd("query name=müller return alias")[1] == "-200:1:    alias: zoe"
            reply = c.cmd("query hostname=nas return ip status created")
            assert reply[1:5] == ["-200:1:       ip: 10.0.0.5", "-200:1:       ip: fd00::5",
                                  "-200:1:   status: online",
                                  "-200:1:  created: 2020-01-02T03:04:05Z"]
    finally:
        assert server.stop()[0] == 0


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2"), ('["a list"]', "line 2: each line must be a JSON object"),
    ('{"type": "robot", "alias": "x"}', "line 2: each record needs type"),
    ('{"type": "person", "alias": "a"}', "line 2: alias a appears twice"),
    ('{"type": "machine", "hostname": "h", "ip": "300.1.1.1"}', "line 2: ip '300.1.1.1'"),
    ('{"type": "person", "alias": "b", "shoe": "42"}', "line 2: unknown field"),
])
def test_load_refuses_a_bad_line_and_writes_nothing(tmp_path, bad, message):
    data, src = tmp_path / "data", tmp_path / "in.jsonl"
    src.write_text('{"type": "person", "alias": "a"}\n' + bad + "\n")
    result = run("load", "--data", str(data), str(src))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    leftovers = [p.name for p in data.iterdir() if p.name != "lock"] if data.exists() else []
    assert all(p.startswith("journal-") and (data / p).stat().st_size == 0 for p in leftovers)


def test_load_refuses_a_running_servers_data_dir(tmp_path):
    server = ServerProcess(tmp_path / "data").start()
    try:
        src = tmp_path / "in.jsonl"
        write_jsonl(src, [{"type": "person", "alias": "a"}])
        result = run("load", "--data", str(tmp_path / "data"), str(src))
        assert result.returncode == 3 and "already in use" in result.stderr
    finally:
        server.kill()


def test_doctor_reports_data_dir_and_server(tmp_path):
    server = ServerProcess(tmp_path / "data").start()
    try:
        result = run("doctor", "--data", str(tmp_path / "data"),
                     "--server", f"127.0.0.1:{server.port}")
    finally:
        server.kill()
    assert result.returncode == 0
    assert "in use by a running server" in result.stdout
    assert "200:Database ready." in result.stdout
    assert f"python     {sys.version.split()[0]}" in result.stdout


def test_ph_and_mdb_against_a_live_server(mem_server):
    where = ["--server", f"127.0.0.1:{mem_server.port}"]
    assert run("ph", *where, "add", "alias=jsmith", "name=John Smith",
               "notes=says \"hi\"\nto all").returncode == 0
    assert run("mdb", *where, "add", "hostname=nas", "ip=10.0.0.5", "ip=fd00::5").returncode == 0
    found = run("ph", *where, "john", "--json")
    assert found.returncode == 0
    [person] = json.loads(found.stdout)
    assert person["name"] == "John Smith" and person["notes"] == 'says "hi"\nto all'
    [machine] = json.loads(run("mdb", *where, "ip=10.0.0.*", "--json").stdout)
    assert machine["ip"] == ["10.0.0.5", "fd00::5"]
    assert run("mdb", *where, "john").returncode == 1          # mdb looks at machines only
    assert run("ph", *where, "nobody").returncode == 1
    refused = run("ph", *where, "add", "alias=x", "email=bad")
    assert refused.returncode == 2 and "email 'bad'" in refused.stderr     # input refused
    assert run("mdb", *where, "change", "hostname=nas", "make", "role=backup").returncode == 0
    assert json.loads(run("mdb", *where, "show", "nas", "--json").stdout)[0]["role"] == "backup"


def test_ph_reports_an_unreachable_server(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                   # bound but not listening: refused
        result = run("ph", "--server", f"127.0.0.1:{port}", "john")
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1 and "cannot reach" in result.stderr


def test_bare_mdb_lists_every_machine_past_the_result_cap():
    server = ServerProcess(None, "--max-results", "2", storage="memory").start()
    try:
        where = ["--server", f"127.0.0.1:{server.port}"]
        for n in range(5):
            assert run("mdb", *where, "add", f"hostname=h{n}", f"ip=10.9.0.{n}").returncode == 0
        assert run("ph", *where, "add", "alias=p1", "name=Not A Machine").returncode == 0
        listed = run("mdb", *where, "--json")
        nobody = run("ph", *where, "--json", "--fields", "alias")
    finally:
        server.kill()
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["hostname"] for r in json.loads(listed.stdout)) == [f"h{n}" for n in range(5)]
    assert [r["alias"] for r in json.loads(nobody.stdout)] == ["p1"]
