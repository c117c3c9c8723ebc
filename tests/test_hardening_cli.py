"""The command line at its edges: odd bytes, logins on every connection, the first key,
exit codes and their wording, Ph quoting, IPv6 servers, client.ini, and no-match."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import PHAROS, ServerProcess, need


def pharos(*args, env=None, home=None):
    """Run pharos.py with ``args`` (str or bytes) and no ambient server, key or agent."""
    environment = dict(os.environ, **(env or {}))
    for name in ("PHAROS_SERVER", "PHAROS_KEY", "PHAROS_USER", "PHAROS_DATA", "SSH_AUTH_SOCK"):
        if name not in (env or {}):
            environment.pop(name, None)
    if home is not None:
        environment["HOME"] = str(home)
        environment["XDG_CONFIG_HOME"] = str(home / ".config")
    result = subprocess.run([sys.executable, str(PHAROS), *args], capture_output=True,
                            env=environment, timeout=120, stdin=subprocess.DEVNULL)
    result.stdout = result.stdout.decode(errors="replace")
    result.stderr = result.stderr.decode(errors="replace")
    return result


def one_line(result):
    """Whether stderr is exactly one line and no traceback."""
    return len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.fixture
def keys(tmp_path):
    need(shutil.which("ssh-keygen"), "ssh-keygen")
    made = {}
    for name in ("alice", "bob", "mallory"):
        path = tmp_path / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(path)], check=True)
        made[name] = path
    return made


def keyed_server(tmp_path, keys, tier, role="writer", extra=()):
    """A server of ``tier`` whose key list authorizes alice with ``role``."""
    data = tmp_path / "data"
    data.mkdir()
    kind, blob = keys["alice"].with_suffix(".pub").read_text().split()[:2]
    tenant = ',tenant="*"' if tier == "enterprise" else ""
    (data / "authorized_keys").write_text(f'alice role="{role}"{tenant} {kind} {blob}\n')
    return ServerProcess(data, "--tier", tier, "--login-delay", "0.01", *extra).start()


def as_alice(keys):
    return ["--as", "alice", "--key", str(keys["alice"])]


def at(server):
    return ["--server", f"127.0.0.1:{server.port}"]


# 12: a command-line word that is not UTF-8 --------------------------------------

@pytest.mark.parametrize("words", [
    [b"add", b"alias=nu", b"name=Bad\xffByte"], [b"\xff"], [b"show", b"x\xfe"],
])
def test_a_word_that_is_not_utf8_is_one_line_and_exit_2(mem_server, words):
    result = pharos(b"ph", *at(mem_server), *words)
    assert result.returncode == 2, result.stderr
    assert one_line(result) and "not UTF-8" in result.stderr
    assert "\\x" in result.stderr                     # the bad byte is shown, escaped


# 13: an import over many connections logs in on each ----------------------------

@pytest.mark.parametrize("tier", ["lab", "enterprise"])
def test_an_import_of_many_records_logs_in_on_every_connection(tmp_path, keys, tier):
    src = tmp_path / "people.jsonl"
    src.write_text("".join(json.dumps({"type": "person", "alias": f"p{n}", "name": f"P {n}"})
                           + "\n" for n in range(1200)))
    server = keyed_server(tmp_path, keys, tier)
    try:
        result = pharos("ph", *at(server), *as_alice(keys), "import", str(src))
        again = pharos("ph", *at(server), *as_alice(keys), "import", str(src))
    finally:
        server.kill()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "added 1,200, changed 0, unchanged 0, rejected 0"
    assert again.stdout.strip() == "added 0, changed 0, unchanged 1,200, rejected 0"


# 14: the first key --------------------------------------------------------------

def test_keys_add_with_data_writes_that_file_even_before_it_exists(tmp_path, keys):
    server = keyed_server(tmp_path, keys, "lab", role="admin")
    fresh = tmp_path / "fresh" / "data"
    bob = str(keys["bob"].with_suffix(".pub"))
    remote = {"PHAROS_SERVER": f"127.0.0.1:{server.port}", "PHAROS_USER": "alice",
              "PHAROS_KEY": str(keys["alice"])}
    try:
        added = pharos("keys", "add", "--data", str(fresh), "bob", bob, "--role", "admin",
                       env=remote)
        listed = pharos("keys", "list", "--data", str(fresh), env=remote)
    finally:
        server.kill()
    assert added.returncode == 0, added.stderr
    written = fresh / "authorized_keys"
    assert written.read_text().startswith('bob role="admin" ssh-ed25519 ')
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert "bob" not in (tmp_path / "data" / "authorized_keys").read_text()   # not the server's
    assert listed.returncode == 0 and "bob" in listed.stdout and "admin" in listed.stdout


def test_keys_with_data_and_server_is_a_usage_error(tmp_path, keys):
    result = pharos("keys", "list", "--data", str(tmp_path), "--server", "127.0.0.1:1")
    assert result.returncode == 2 and one_line(result) and "say one" in result.stderr


def test_the_first_start_hint_adds_an_admin_key_and_works_as_written(tmp_path, keys):
    home = tmp_path / "empty-home"
    home.mkdir()
    data = tmp_path / "data"
    env = {"HOME": str(home)}
    env_no_agent = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env_no_agent.update(env)
    first = ServerProcess(data, "--tier", "lab", env=env)
    first.env = env_no_agent
    first.start()
    try:
        hint = first.read_stderr()
    finally:
        first.kill()
    assert f"pharos keys add --data {data} --role admin " in hint
    user = hint.split("--role admin ")[1].split()[0]
    added = pharos("keys", "add", "--data", str(data), "--role", "admin", user,
                   str(keys["alice"].with_suffix(".pub")))
    assert added.returncode == 0, added.stderr
    assert (data / "authorized_keys").read_text().startswith(f'{user} role="admin" ')


def test_a_key_the_server_does_not_know_says_what_to_do(tmp_path, keys):
    server = keyed_server(tmp_path, keys, "lab")
    try:
        result = pharos("ph", *at(server), "--as", "mallory", "--key", str(keys["mallory"]),
                        "add", "alias=m", "name=M")
    finally:
        server.kill()
    assert result.returncode == 3 and one_line(result)
    assert "pharos keys add --data DATA_DIR mallory KEY.pub" in result.stderr
    assert "--role admin for the first key" in result.stderr


@pytest.mark.parametrize("key, message", [
    ("missing.pub", "missing.pub: no such file or directory"),
    ("ssh-ed25519 notbase64", "keys add:"),
])
def test_keys_add_names_a_missing_file(tmp_path, key, message):
    result = pharos("keys", "add", "--data", str(tmp_path), "bob", key)
    assert result.returncode == 2 and one_line(result) and message in result.stderr


# 15: exit codes and wording -----------------------------------------------------

@pytest.mark.parametrize("words, message", [
    (["add", "alias=x1", "nosuch=1"], 'ph: unknown field "nosuch"'),
    (["add", "alias=dup", "name=Again"], "ph: alias dup is already taken"),
    (["add", "alias=x2", "name=" + "x" * 300], "ph: name is longer than 64 characters"),
    (["add", "alias=x3", "email=bad"], "ph: email 'bad' is not an address"),
    (["nosuch=x"], 'ph: unknown field "nosuch"'),
    (["change", "alias=dup", "make", "created=now"], "ph: created is set by the server"),
])
def test_input_the_server_refuses_exits_2_in_words_for_people(mem_server, words, message):
    assert pharos("ph", *at(mem_server), "add", "alias=dup", "name=Dup").returncode in (0, 2)
    result = pharos("ph", *at(mem_server), *words)
    assert result.returncode == 2, result.stderr
    assert one_line(result) and result.stderr.startswith(message), result.stderr
    assert "not understood" not in result.stderr


def test_auth_refusals_still_exit_3(tmp_path, keys):
    server = keyed_server(tmp_path, keys, "lab")
    try:
        reader = pharos("keys", "list", *at(server), *as_alice(keys))
    finally:
        server.kill()
    assert reader.returncode == 3 and one_line(reader) and "admin" in reader.stderr


# 16: log in first, not after a refusal ------------------------------------------

def test_a_write_with_a_key_logs_in_first_and_is_never_refused(tmp_path, keys):
    server = keyed_server(tmp_path, keys, "lab")
    try:
        assert pharos("ph", *at(server), *as_alice(keys), "add", "alias=f1",
                      "name=First").returncode == 0
        assert pharos("ph", *at(server), *as_alice(keys), "change", "alias=f1", "make",
                      "title=Boss").returncode == 0
        assert pharos("ph", *at(server), *as_alice(keys), "delete", "alias=f1").returncode == 0
    finally:
        server.kill()
    lines = [json.loads(x) for x in (tmp_path / "data" / "audit.log").read_text().splitlines()]
    assert len(lines) == 3
    assert not [x for x in lines if "506" in json.dumps(x)]


def test_enterprise_reads_log_in_before_the_first_query(tmp_path, keys):
    server = keyed_server(tmp_path, keys, "enterprise", extra=("--metrics", "127.0.0.1:0"))
    try:
        assert pharos("ph", *at(server), *as_alice(keys), "add", "alias=e1",
                      "name=Ent").returncode == 0
        found = pharos("ph", *at(server), *as_alice(keys), "ent", "--json")
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
            metrics = r.read().decode()
    finally:
        server.kill()
    assert found.returncode == 0 and '"alias": "e1"' in found.stdout
    refused = [x for x in metrics.splitlines() if 'class="5xx"' in x and not x.endswith(" 0")
               and not x.startswith("#")]
    assert not refused, refused


# 18: the smaller ones ------------------------------------------------------------

def test_ph_quoting_on_the_command_line_goes_through(mem_server):
    assert pharos("ph", *at(mem_server), "add", "alias=js", "name=John Smith").returncode == 0
    assert pharos("ph", *at(mem_server), "add", "alias=jo", "name=John Other").returncode == 0
    found = pharos("ph", *at(mem_server), 'name="john smith"', "--json")
    word = pharos("ph", *at(mem_server), '"john smith"', "--json")
    assert found.returncode == 0, found.stderr
    assert [r["alias"] for r in json.loads(found.stdout)] == ["js"]
    assert [r["alias"] for r in json.loads(word.stdout)] == ["js"]


def test_export_to_a_directory_that_does_not_exist_yet(mem_server, tmp_path):
    assert pharos("ph", *at(mem_server), "add", "alias=vd", "name=V D").returncode == 0
    target = tmp_path / "new" / "cards"
    result = pharos("ph", *at(mem_server), "export", "--format", "vcard", "-o", f"{target}/")
    assert result.returncode == 0, result.stderr
    assert "FN:V D" in (target / "vd.vcf").read_text()
    other = pharos("ph", *at(mem_server), "export", "--format", "json", "-o", f"{target}2/")
    assert other.returncode == 2 and one_line(other)


@pytest.mark.parametrize("form", ["bare", "bracketed", "bracketed-default"])
def test_ipv6_servers(form):
    server = ServerProcess(None, storage="memory")
    server.args[server.args.index("127.0.0.1:0")] = "[::1]:0"
    try:
        server.start()
    except AssertionError:
        need(False, "an IPv6 loopback")
    try:
        address = {"bare": "::1", "bracketed": f"[::1]:{server.port}",
                   "bracketed-default": "[::1]"}[form]
        port = [] if form == "bracketed" else ["--timeout", "2"]
        result = pharos("ph", "--server", address, *port, "nobody")
    finally:
        server.kill()
    if form == "bracketed":
        assert result.returncode == 1 and result.stderr == "ph: no match\n"
    else:                       # parsed as ::1 port 2378: the error is about reaching it
        assert result.returncode == 3 and "[::1]:2378" in result.stderr, result.stderr


@pytest.mark.parametrize("text, line", [
    ("[client]\nserver 127.0.0.1:1\n", 2),
    ("# mine\n[client]\nserver = 127.0.0.1:1\nport\n", 4),
    ("stray\n", 1),
])
def test_client_ini_line_without_equals_is_refused(tmp_path, text, line):
    home = tmp_path / "home"
    (home / ".config" / "pharos").mkdir(parents=True)
    path = home / ".config" / "pharos" / "client.ini"
    path.write_text(text)
    result = pharos("ph", "john", home=home)
    assert result.returncode == 2 and one_line(result)
    assert f"{path} line {line}:" in result.stderr


def test_client_ini_server_is_used(mem_server, tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "pharos").mkdir(parents=True)
    (home / ".config" / "pharos" / "client.ini").write_text(
        f"; comment\n[client]\nserver = 127.0.0.1:{mem_server.port}\n[other]\nx = y\n")
    result = pharos("ph", "nobody", home=home)
    assert result.returncode == 1 and result.stderr == "ph: no match\n"


@pytest.mark.parametrize("words", [
    ["nobody"], ["nobody", "--json"], ["show", "nobody"], ["change", "alias=nobody", "make",
                                                           "title=x"],
    ["delete", "alias=nobody"],
])
def test_no_match_says_so_in_one_line_and_exits_1(mem_server, words):
    result = pharos("ph", *at(mem_server), *words)
    assert result.returncode == 1 and result.stderr == "ph: no match\n"


def test_bare_mdb_with_no_machines_says_no_match(mem_server):
    result = pharos("mdb", *at(mem_server))
    assert result.returncode == 1 and result.stderr == "mdb: no match\n"


def test_keys_list_of_an_empty_file_says_so(tmp_path):
    (tmp_path / "authorized_keys").write_text("")
    result = pharos("keys", "list", "--data", str(tmp_path))
    assert result.returncode == 1 and one_line(result) and "no keys" in result.stderr


def test_help_marks_what_is_not_in_this_version():
    result = pharos("--help")
    for name in ("pulse", "console"):
        [row] = [x for x in result.stdout.splitlines() if x.split()[:1] == [name]]
        assert "not in this version" in row
    planned = pharos("pulse")
    assert planned.returncode == 2 and "not in pharos" in planned.stderr
