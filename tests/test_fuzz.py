"""Hostile input: regression cases for what fuzzing found, and the seeded fuzz run itself.

The regressions pin each mechanism the fuzzer broke (numbers parsed by an ASCII rule,
...) with deterministic inputs; the fuzz run throws tens of thousands of mutated and
generated requests at live servers and checks every reply is well-formed Ph.
"""

import base64
import struct
import sys

import pytest

from conftest import ROOT, ServerProcess

sys.path.insert(0, str(ROOT))
import pharos  # noqa: E402

# Characters str.isdigit() or int() accept that are not the ASCII digits 0-9.
NOT_ASCII_NUMBERS = ["³", "²", "¹", "①", "٣", "३", "３", "+3", "-3", "1_0", " 3", "3 ", "3\t",
                     "", "0x10", "1e3", "1" * 5000, "0" * 5000 + "1"]


def short(value):
    """A readable test id for a long or odd parameter."""
    text = ascii(value)
    return text if len(text) < 24 else text[:20] + f"...({len(value)})"


# --------------------------------------------------------------------------
# Regressions: numbers are ASCII digits, everywhere input is parsed
# --------------------------------------------------------------------------

@pytest.mark.parametrize("text", NOT_ASCII_NUMBERS, ids=short)
def test_parse_count_refuses_all_but_ascii_digits(text):
    assert pharos.parse_count(text, 0, 10 ** 30) is None


@pytest.mark.parametrize("text, lo, hi, want", [
    ("3", 1, 5, 3), ("007", 1, 10, 7), ("0", 0, 0, 0), ("0", 1, 5, None), ("6", 1, 5, None),
    ("1000000", 1, 1_000_000, 1_000_000), ("1000001", 1, 1_000_000, None),
])
def test_parse_count_range(text, lo, hi, want):
    assert pharos.parse_count(text, lo, hi) == want


@pytest.mark.parametrize("value", ["³", "²", "¹", "①", "٣", "+3", "1_0", "1" * 5000], ids=short)
def test_set_limit_refuses_non_ascii_numbers(mem_server, value):
    with mem_server.client() as c:
        assert c.cmd(f'set limit="{value}"') == [
            "-512:limit:must be a number from 1 to 1000000", "513:No option recognized."]
        assert c.cmd(f"set limit={value} echo=off") == [
            "-512:limit:must be a number from 1 to 1000000", "200:Done."]
        assert "-200:limit:2" in c.cmd("set")
    assert "Traceback" not in mem_server.read_stderr()


def test_set_limit_still_takes_ascii_numbers(mem_server):
    with mem_server.client() as c:
        assert c.cmd("set limit=007") == ["200:Done."]
        assert "-200:limit:7" in c.cmd("set")


@pytest.mark.parametrize("value", ["٢٢/ssh", "²²/ssh", "0/ssh", "65536/ssh", "+22/ssh"])
def test_service_port_is_ascii(value):
    with pytest.raises(pharos.RecordError):
        pharos.check_service(value)
    assert pharos.check_service("00022/SSH") == "22/ssh"


@pytest.mark.parametrize("value", ["2026010²", "٢٠٢٦٠١٠١", "+2026010", "2026_101", "2" * 5000], ids=short)
def test_ssh_time_is_ascii(value):
    with pytest.raises(pharos.SSHFormatError):
        pharos.parse_ssh_time(value)


def ed25519_line(principal, options=""):
    """An allowed_signers line with a well-formed (not necessarily valid) ed25519 key."""
    blob = b"".join(struct.pack(">I", len(x)) + x for x in (b"ssh-ed25519", bytes(range(32))))
    return f"{principal} {options} ssh-ed25519 {base64.b64encode(blob).decode()} t@test"


def test_keys_add_with_non_ascii_time_is_refused(server):
    with server.client() as c:
        reply = c.cmd("keys add " + ed25519_line("bob", 'valid-before="2026010²"'))
        assert reply[0].startswith("512:Illegal key line:"), reply
    assert "Traceback" not in server.read_stderr()


@pytest.mark.parametrize("text", ["[::1]:" + "9" * 5000, ":٣٣", "127.0.0.1:1_0", "127.0.0.1:+5"],
                         ids=short)
def test_listen_port_is_ascii(text):
    with pytest.raises(pharos.UsageError):
        pharos.parse_hostport(text, 2378)


@pytest.mark.parametrize("props", ["max", "max x Lookup", "max ³ Lookup", "max 1_0", "max 9999"])
def test_client_skips_custom_field_with_a_bad_size(props):
    body = [(200, 30, f"shoe:{props}"), (200, 30, "shoe:Shoe size. (people)")]
    assert pharos.schema_from_fields(body).field("shoe") is None
    body[0] = (200, 30, "shoe:max 8 Lookup Public")
    assert pharos.schema_from_fields(body).field("shoe").max == 8


def test_client_reply_parser_reads_ascii_codes_only():
    with pytest.raises(pharos.PhError):
        pharos.parse_reply(["2٠0:Ok."])
    code, _, body = pharos.parse_reply(["-200:" + "1" * 5000 + ":x", "200:Ok."])
    assert code == 200 and body[0][1] is None
    assert pharos.reply_count([(102, None, "There were " + "9" * 5000 + " matches")]) is None


@pytest.mark.parametrize("args", [["--max-results", "³"], ["--max-results", "٣"],
                                  ["--idle-timeout", "١.٥"], ["--idle-timeout", "inf"],
                                  ["--busy-poll", "1_0"], ["--listen", "127.0.0.1:" + "9" * 5000]], ids=short)
def test_serve_refuses_non_ascii_numbers(args):
    srv = ServerProcess(None, *args, storage="memory")
    code, err = srv.start(expect_ready=False).finish()
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("size", ["³", "٣٢", "+32", "3_2", "0", "4001"])
def test_custom_field_size_is_ascii(tmp_path, size):
    ini = tmp_path / "pharos.ini"
    ini.write_text(f"[field rack]\nmax = {size}\n")
    with pytest.raises(pharos.UsageError, match="max must be a number from 1 to 4000"):
        pharos.parse_custom_fields(str(ini))
