"""Hostile input: regression cases for what fuzzing found, and the seeded fuzz run itself.

The regressions pin each mechanism the fuzzer broke with deterministic inputs; the
fuzz run throws tens of thousands of mutated and generated requests (seeded: the seed
is printed, and PHAROS_FUZZ_SEED replays a run) at a dev-tier memory server and a
lab-tier file server, pipelined over a few connections, and checks that every reply is
well-formed Ph, none is 400:Internal error., the log holds no traceback and the server
still answers afterwards.
"""

import asyncio
import base64
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import IN_CI, ROOT, ServerProcess, need

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


@pytest.mark.parametrize("text", ["日" * 900, "é" * 900, "x" * 2000, "ü\x01" * 450], ids=short)
def test_echo_line_stays_under_the_reply_line_limit(mem_server, text):
    with mem_server.client() as c:
        c.cmd("set echo=on")
        reply = c.cmd(f"id {text}")
        assert reply[0].startswith("-101: id ") and reply[0].endswith("...")
        assert all(len(x.encode()) + 1 <= pharos.MAX_REPLY_LINE for x in reply), reply


@pytest.mark.parametrize("request_text", [
    'add alias=x type="on[a-z] *=alice created=' + "é" * 3000,       # found by the lab fuzz run
    "add hostname=h ip=" + "9" * 5000, "add alias=" + "日" * 3000, "add hostname=h mac=" + "z" * 4000,
    "add hostname=h services=" + "a" * 4000, "add alias=x email=" + "@" * 4000,
], ids=short)
def test_an_error_quoting_a_long_value_stays_under_the_reply_line_limit(mem_server, request_text):
    with mem_server.client() as c:
        reply = c.cmd(request_text)
    assert reply[-1].startswith(("599:", "5")) and len(reply) >= 1
    sizes = [len(x.encode()) + 1 for x in reply]
    assert all(size <= pharos.MAX_REPLY_LINE for size in sizes), sizes


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



# --------------------------------------------------------------------------
# The fuzz run
# --------------------------------------------------------------------------

FUZZ_SEED = int(os.environ.get("PHAROS_FUZZ_SEED", "20261125"))
FUZZ_INPUTS = int(os.environ.get("PHAROS_FUZZ_INPUTS", "10000"))   # per server; two servers
CONNECTIONS = 4
BATCH = 32                     # inputs written ahead of their replies on one connection
REPLY_LINE_RE = re.compile(rb"-?[0-9]{3}:[^\n]*\n\Z")
SENTINEL_END = b"599:Invalid field request.\n"
CLOSE_RE = re.compile(rb"quit|exit|stop")
DISCARDED = b"-523:Expecting answer, clear, or email; login discarded.\n"
CASES_DIR = Path(__file__).parent / "cases"

VERBS = ["query", "ph", "dump", "fields", "status", "siteinfo", "id", "set", "help", "add",
         "change", "delete", "login", "answer", "clear", "email", "logout", "xlogin", "klogin",
         "keys", "quit", "exit", "stop", "frobnicate", "QUERY", '"query"', "query=x", "="]
FIELDS = [f.name for f in pharos.Schema().fields] + ["nosuch", "Name", "ALIAS", "x" * 40, "*", ""]
OPTIONS = list(pharos.SESSION_OPTIONS) + ["language", "LIMIT", "", "echo=", "limit"]
HELP = list(pharos.HELP_TOPICS) + ["native", "../etc", "all", ""]
CLIENTS = ["ph", "mdb", "MDB", "lynx", "1000", "x" * 80]
WORDS = ["smith", "j-smith", "alice", "nas", "nas.example.org", "10.0.0.5", "fd00::5",
         "aa:bb:cc:dd:ee:ff", "22/ssh", "ssh", "person", "machine", "a@b.c", "https://x.y/",
         "Zoë", "日本語", "\u2028", "\u00a0", "NUL\0", "tab\there", "ünïcödé", "-", "all",
         "return", "make", "force", "on", "off", "yes", "0", "1", "2", "1000000", "1000001"]
WILD = ["*", "?", "[a-z]", "[", "]", "[!a]", "**", "s*", "*h", "?mith", "[]", "\\*", "[z-a]"]
SPECIAL_BYTES = [b'"', b"\\", b"=", b"~", b"*", b"?", b"[", b"]", b"\r", b"\0", b"\t", b" ",
                 b"\n", b"\\\n", b"\r\n", b"\xff", b"\xff\xfb\x01", b"\xff\xf4", b"\xc3", b"\xe9",
                 b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xfe", b"\x1b[31m", b"%s",
                 b"{}", b"\x85", b"\xe2\x80\xa8", b"return", b"make", b"all"]


def case_inputs():
    """The requests the transcripts send: C: lines as text, B: lines as raw bytes."""
    import ast
    out = []
    for path in sorted(CASES_DIR.glob("*.ph")):
        for text in path.read_text(encoding="utf-8").splitlines():
            if text.startswith("C: "):
                out.append(text[3:].encode())
            elif text.startswith("B: "):
                out.append(ast.literal_eval(text[3:]).rstrip(b"\n"))
    return out


class Fuzzer(random.Random):
    """Seeded inputs: transcript requests mutated byte-wise and by grammar, and fresh ones."""

    def __init__(self, seed):
        super().__init__(seed)
        self.seeds = case_inputs()

    def value(self):
        """One value as a client might write it (or as an attacker would)."""
        kind = self.random()
        if kind < 0.25:
            return self.choice(WORDS)
        if kind < 0.4:
            return self.choice(NOT_ASCII_NUMBERS[:-2] + ["3", "007", "99999999999999999999"])
        if kind < 0.55:
            return self.choice(WORDS) [:self.randrange(1, 6)] + self.choice(WILD)
        if kind < 0.65:
            return "".join(chr(self.randrange(1, 0x3000)) for _ in range(self.randrange(1, 12)))
        if kind < 0.72:
            return self.choice("ab\u00e9\u65e5") * self.randrange(100, 3000)
        return "".join(self.choice("abcdefgh\\\"' \t=~*") for _ in range(self.randrange(0, 10)))

    def quoted(self, text):
        """``text`` bare, quoted with escapes, or with its quote left open."""
        kind = self.random()
        if kind < 0.5:
            return text.replace(" ", "")
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        escaped += self.choice(["", "", "\\", "\\t", "\\x", '\\"'])
        return f'"{escaped}"' if kind < 0.9 else f'"{escaped}'

    def pair(self, fields=FIELDS):
        """field=value (or field~value, or a bare value)."""
        op = self.choice(["=", "=", "=", "~"])
        if self.random() < 0.15:
            return self.quoted(self.value())
        return f"{self.choice(fields)}{op}{self.quoted(self.value())}"

    def pairs(self, low=0, high=5):
        return [self.pair() for _ in range(self.randint(low, high))]

    def returns(self):
        if self.random() < 0.5:
            return []
        names = [self.choice(FIELDS) for _ in range(self.randint(0, 4))]
        return [self.choice(["return", "RETURN", "return"])] + (names or [self.choice(["all", ""])])

    def request(self):
        """A request built from the grammar of one verb, arguments in random order or not."""
        verb = self.choice(VERBS)
        if verb in ("query", "ph", "dump"):
            args = self.pairs(0 if verb == "dump" else 1) + self.returns()
        elif verb == "add":
            key = self.choice(["alias", "hostname", "type", "name"])
            args = [f"{key}={self.quoted(self.choice(WORDS))}"] + self.pairs()
        elif verb == "change":
            args = self.pairs(1, 3) + [self.choice(["make", "force", "make"])] + self.pairs(0, 3)
        elif verb == "delete":
            args = self.pairs(0, 3)
        elif verb == "set":
            args = [self.choice(OPTIONS) + self.choice(["", "="]) + self.quoted(self.value())
                    for _ in range(self.randint(0, 4))]
        elif verb == "fields":
            args = [self.choice(FIELDS) for _ in range(self.randint(0, 4))]
        elif verb == "help":
            args = [self.choice(HELP) for _ in range(self.randint(0, 3))]
        elif verb == "id":
            args = [self.choice(CLIENTS)]
        elif verb == "keys":
            args = self.keys_args()
        elif verb == "answer":
            args = [base64.b64encode(self.randbytes(self.randrange(0, 400))).decode()]
        else:
            args = [self.value() for _ in range(self.randint(0, 2))]
        if self.random() < 0.2:
            self.shuffle(args)
        return " ".join([verb] + args).encode("utf-8", "surrogatepass")

    def keys_args(self):
        options = self.choice(["", 'valid-before="2026010²"', 'valid-after="٢٠٢٦٠١٠١"',
                               'role="admin"', 'role="nobody"', 'tenant="a"', 'frob="x"',
                               'valid-before="20991231Z"', 'valid-before="9' * 30 + '"',
                               'role="reader",tenant=""'])
        action = self.choice(["list", "add", "remove", "", "add", "frob"])
        if action == "add":
            return ["add", ed25519_line(self.choice(["bob", "eve", "x" * 70, ""]), options)]
        if action == "remove":
            return ["remove", self.choice(["bob", "eve", "admin", "SHA256:x", self.value()])]
        return [action]

    def mutate(self, data):
        """A few byte-level edits: flips, special bytes, cuts, copies, splices."""
        data = bytearray(data)
        for _ in range(self.randint(1, 4)):
            at = self.randint(0, len(data))
            kind = self.randrange(6)
            if kind == 0 and data:
                data[min(at, len(data) - 1)] ^= 1 << self.randrange(8)
            elif kind == 1:
                data[at:at] = self.choice(SPECIAL_BYTES)
            elif kind == 2:
                del data[at:at + self.randint(1, 8)]
            elif kind == 3:
                data[at:at] = data[at:at + self.randint(1, 16)] * self.randint(1, 3)
            elif kind == 4:
                data[at:] = self.choice(self.seeds)[self.randint(0, 8):]
            else:
                data[at:at] = self.randbytes(self.randint(1, 4))
        return bytes(data)

    def retoken(self, data):
        """Grammar-aware: one word of a transcript request swapped for a generated one."""
        words = data.split(b" ")
        fresh = self.choice([self.pair(), self.choice(VERBS), self.choice(OPTIONS) + "=" +
                             self.value(), self.choice(FIELDS), self.quoted(self.value())])
        words[self.randrange(len(words))] = fresh.encode("utf-8", "surrogatepass")
        return b" ".join(words)

    def one(self):
        """One fuzz input: the bytes of one or more request lines, without the last line end."""
        kind = self.random()
        if kind < 0.2:
            data = self.mutate(self.choice(self.seeds))
        elif kind < 0.35:
            data = self.retoken(self.choice(self.seeds))
        elif kind < 0.85:
            data = self.request()
            if self.random() < 0.3:
                data = self.mutate(data)
        elif kind < 0.93:
            data = b"\n".join(self.request() for _ in range(self.randint(2, 5)))
            data = data.replace(b"\n", self.choice([b"\n", b"\r\n", b"\\\n", b"\n\r\n"]), 2)
        elif kind < 0.97:
            data = self.request()[:40] + b"x" * self.randint(8100, 20000)
        else:
            data = self.randbytes(self.randint(0, 200))
        return data.replace(b"zzfuzz", b"zzfuz")


def expected_replies(data):
    """How many replies ``data`` must get, when that is plain from its bytes; else None."""
    lines = data.split(b"\n")
    simple = re.compile(rb"[^\\\xff]*[A-Za-z0-9][^\\\xff]*\Z")
    if all(simple.match(x) and len(x) < 8000 for x in lines):
        return len(lines)
    return None


def reply_problems(data, lines, closed):
    """What is wrong with the reply ``lines`` to the input ``data`` (``closed``: it was the
    last on its connection, so the count of replies is not known)."""
    problems = []
    for got in lines:
        if not REPLY_LINE_RE.match(got):
            problems.append(f"malformed reply line {got[:120]!r}")
        elif len(got) > pharos.MAX_REPLY_LINE:
            problems.append(f"reply line of {len(got)} bytes")
        if got.startswith(b"400:Internal error."):
            problems.append("400:Internal error.")
        try:
            got.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"reply line not UTF-8: {got[:120]!r}")
    if lines and (lines[-1].startswith(b"-") or lines[-1] < b"200"):
        problems.append(f"reply ends before its final line: {lines[-1][:120]!r}")
    want = None if closed else expected_replies(data)
    finals = sum(1 for x in lines if x >= b"200")     # 1xx lines without '-' are not final
    if want is not None and finals != want:
        problems.append(f"{finals} replies to {want} requests")
    return problems


def may_close(data):
    """Whether ``data`` might hold quit, exit or stop once the server drops CR, NUL and
    telnet commands and joins continued lines (erring towards yes)."""
    text = pharos.TELNET_IAC_RE.sub(b"", data)
    for junk in (b"\r", b"\0", b"\\\n"):
        text = text.replace(junk, b"")
    return CLOSE_RE.search(text) is not None


class Driver:
    """Pipelines inputs to one server over one connection at a time; notes every problem."""

    def __init__(self, port, login=None):
        self.port, self.login = port, login
        self.reader = self.writer = None
        self.failures = []

    async def connect(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 limit=1 << 20)
        if self.login:
            await self.login(self)

    async def line(self):
        try:
            got = await asyncio.wait_for(self.reader.readline(), 30)
        except ConnectionError as e:
            self.failures.append(f"connection lost: {e}")
            return b""
        if got and not got.endswith(b"\n"):
            self.failures.append(f"reply line without a line end: {got[:120]!r}")
        return got

    async def segment(self, n):
        """The reply lines to input ``n``, up to its sentinel (or the end, if none comes)."""
        mark, lines = b"-507:zzfuzz%d:unknown field.\n" % n, []
        while True:
            got = await self.line()
            if not got:
                return lines
            if got == mark:
                break
            lines.append(got)
        if await self.line() != SENTINEL_END:
            self.failures.append(f"input {n}: sentinel reply broken")
        if lines and lines[-1] == DISCARDED:
            lines.pop()
        if lines and lines[-1] == b"-101: fields zzfuzz%d\n" % n:
            lines.pop()
        return lines

    async def run(self, inputs):
        """Send each (n, data) with a sentinel after it, in batches.

        An input that may close the connection (quit, exit, stop) ends its batch, goes
        without a sentinel and is followed by our end of file: bytes sent after a quit
        would make the server's close a reset, which can lose the replies before it.
        """
        i = 0
        while i < len(inputs):
            await self.connect()
            closing = False
            while i < len(inputs) and not closing:
                batch = []
                while i < len(inputs) and len(batch) < BATCH and not closing:
                    batch.append(inputs[i])
                    closing = may_close(inputs[i][1])
                    i += 1
                self.writer.write(b"".join(data + b"\n\n" + b"fields zzfuzz%d\n" % n
                                           for n, data in batch[:-1 if closing else None]))
                if closing:
                    self.writer.write(batch[-1][1] + b"\n\n")
                    self.writer.write_eof()
                for n, data in batch:
                    lines = await self.segment(n)
                    end = closing and n == batch[-1][0]
                    for problem in reply_problems(data, lines, end):
                        self.failures.append(f"input {n} {data[:300]!r}: {problem}")
            self.writer.close()


def fuzz(port, inputs, login=None):
    """Run ``inputs`` over CONNECTIONS connections at once; the problems found."""
    async def main():
        drivers = [Driver(port, login if k == 0 else None) for k in range(CONNECTIONS)]
        await asyncio.gather(*(d.run(inputs[k::CONNECTIONS]) for k, d in enumerate(drivers)))
        return [f for d in drivers for f in d.failures]
    return asyncio.run(main())


def check_run(srv, failures, seed):
    """The run's verdict: no problems, no traceback in the log, and the server still answers."""
    log = srv.read_stderr()
    assert not failures, f"seed {seed}: {len(failures)} problems, first:\n" + "\n".join(failures[:10])
    assert "Traceback" not in log and "internal error" not in log, f"seed {seed}:\n{log[-4000:]}"
    with srv.client() as c:
        assert c.cmd("status")[-1].startswith(("200:", "201:"))
        assert c.cmd("query alias=fuzz-final-check") == ["501:No matches to your query."]
        assert c.cmd("fields alias")[-1] == "200:Ok."


def inputs_for(seed):
    """The seeded inputs of one run, numbered."""
    print(f"fuzz seed {seed} ({FUZZ_INPUTS} inputs); replay with PHAROS_FUZZ_SEED={seed}")
    fuzzer = Fuzzer(seed)
    return [(n, fuzzer.one()) for n in range(FUZZ_INPUTS)]


SEED_RECORDS = [
    'add alias=j-smith name="John Smith" email=j@x.org notes="one\\ntwo" phone="+1 555"',
    'add alias=alice name="Alice Smith" nickname=al office="B 1"',
    "add hostname=nas.example.org ip=10.0.0.5 ip=fd00::5 mac=aa:bb:cc:dd:ee:ff services=22/ssh",
    'add hostname=long.example.org notes="' + "é" * 3000 + '"',
]


def seed_records(client):
    for request in SEED_RECORDS:
        assert client.cmd(request) == ["200:Ok."], request


def test_fuzz_dev_memory():
    seed = FUZZ_SEED
    srv = ServerProcess(None, "--login-delay", "0.00001", storage="memory").start()
    try:
        with srv.client() as c:
            seed_records(c)
        started = time.monotonic()
        failures = fuzz(srv.port, inputs_for(seed))
        print(f"dev tier: {FUZZ_INPUTS} inputs in {time.monotonic() - started:.1f} s")
        check_run(srv, failures, seed)
    finally:
        srv.kill()


def admin_key(base):
    """An ed25519 key made by ssh-keygen, and its allowed_signers line with the admin role."""
    key = base / "admin"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@test", "-f",
                    str(key)], check=True, stdin=subprocess.DEVNULL, capture_output=True)
    material = " ".join(Path(f"{key}.pub").read_text().split()[:2])
    return key, f'admin role="admin" {material} admin@test'


def sign(key, challenge):
    """The answer to a login challenge: ssh-keygen's signature, base64 on one line."""
    proc = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", "pharos", "-f", str(key)],
                          input=challenge, capture_output=True, check=True, timeout=30)
    return "".join(proc.stdout.decode().strip().splitlines()[1:-1])


def admin_login(key):
    """A Driver hook that logs in as admin on each new connection (if the key still works)."""
    async def login(driver):
        driver.writer.write(b"login admin\n")
        challenge = (await driver.line()).decode().strip()
        assert challenge.startswith("301:"), challenge
        driver.writer.write(f"answer {sign(key, challenge[4:].encode())}\n".encode())
        await driver.line()
    return login


def test_fuzz_lab_file(tmp_path):
    seed = FUZZ_SEED + 1
    data = tmp_path / "data"
    data.mkdir()
    have_keygen = shutil.which("ssh-keygen") is not None
    if IN_CI:
        need(have_keygen, "OpenSSH's ssh-keygen (apt install openssh-client)")
    key, entry = admin_key(tmp_path) if have_keygen else (None, ed25519_line("admin", 'role="admin"'))
    (data / "authorized_keys").write_text(entry + "\n")
    srv = ServerProcess(data, "--tier", "lab", "--login-delay", "0.00001").start()
    try:
        login = admin_login(key) if key else None
        if key:
            with srv.client() as c:
                challenge = c.cmd("login admin")[0][4:]
                assert c.cmd("answer " + sign(key, challenge.encode())) == ["200:admin:Hi how are you?"]
                seed_records(c)
        started = time.monotonic()
        failures = fuzz(srv.port, inputs_for(seed), login)
        print(f"lab tier: {FUZZ_INPUTS} inputs in {time.monotonic() - started:.1f} s")
        check_run(srv, failures, seed)
    finally:
        srv.kill()
