"""SSH-key login, the lab and enterprise tiers, tenants, the audit log and key management.

Everything end to end runs against real ``pharos.py serve`` processes, a real
``ssh-agent`` started here (its own socket, stopped by its pid) and real ``ssh-keygen``:

* logins through the agent (``pharos.AgentClient``) and through key files
  (``ssh-keygen -Y sign``) for ed25519, RSA 3072 and ECDSA P-256/384/521, with
  ``--crypto pure`` and (asyncssh installed) ``--crypto auto``;
* refusals: replayed answers, a challenge from another connection, wrong namespace,
  SHA-1 ``ssh-rsa``, a key not in the list, keys outside valid-before/valid-after,
  tampered signatures, ed25519 S+L, a small-order ed25519 key, a key used for another
  user; an expired challenge is tested in-process (time cannot be moved in a server);
* tiers: lab (anonymous reads, logged-in writes, reader role), enterprise (everything
  needs login, tenants never see each other, admin ``*`` sees all), the audit log;
* the ``keys`` extension (list/add/remove, last admin, non-admins, tenant admins),
  unknown options, SIGHUP and on-change reloads, first-start bootstrap, Net::PH reads.

The SSHSIG encoding used to build forged and mangled signatures is written here from
PROTOCOL.sshsig, independently of pharos.py, so that a bug there cannot hide itself.
"""

import asyncio
import base64
import hashlib
import importlib.util
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, ServerProcess, need, wait_for

sys.path.insert(0, str(ROOT))
import pharos  # noqa: E402

HAVE_TOOLS = bool(shutil.which("ssh-keygen") and shutil.which("ssh-agent") and shutil.which("ssh-add"))
HAVE_ASYNCSSH = importlib.util.find_spec("asyncssh") is not None

ED_L = 2 ** 252 + 27742317777372353535851937790883648493
LOGIN_OK_KEYS = ("ed25519", "rsa", "ecdsa256", "ecdsa384", "ecdsa521")
KEYGEN = {   # name -> ssh-keygen arguments
    "ed25519": ["-t", "ed25519"], "rsa": ["-t", "rsa", "-b", "3072"],
    "ecdsa256": ["-t", "ecdsa", "-b", "256"], "ecdsa384": ["-t", "ecdsa", "-b", "384"],
    "ecdsa521": ["-t", "ecdsa", "-b", "521"],
    "rsa1024": ["-t", "rsa", "-b", "1024"],
    # more ed25519 keys, one per person or purpose
    "stranger": ["-t", "ed25519"], "expired": ["-t", "ed25519"], "future": ["-t", "ed25519"],
    "reader": ["-t", "ed25519"], "admin": ["-t", "ed25519"], "bob": ["-t", "ed25519"],
    "late": ["-t", "ed25519"], "ta": ["-t", "ed25519"], "tb": ["-t", "ed25519"],
    "ra": ["-t", "ed25519"], "aa": ["-t", "ed25519"], "root": ["-t", "ed25519"],
    "home": ["-t", "ed25519"],
}
# The Ed25519 identity point (y = 1): small order, so [k]A is the identity for every k.
SMALL_ORDER_RAW = b"\x01" + b"\x00" * 31


# --------------------------------------------------------------------------
# SSH wire helpers (independent of pharos.py)
# --------------------------------------------------------------------------

def sstr(data):
    return struct.pack(">I", len(data)) + data


def read_strings(data, count):
    out, pos = [], 0
    for _ in range(count):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(data), "trailing bytes"
    return out


def sshsig_encode(pubkey, namespace, hashalg, sigalg, raw):
    """An SSHSIG blob (PROTOCOL.sshsig) with signature (string sigalg, string raw)."""
    return (b"SSHSIG" + struct.pack(">I", 1) + sstr(pubkey) + sstr(namespace.encode()) + sstr(b"")
            + sstr(hashalg.encode()) + sstr(sstr(sigalg.encode()) + sstr(raw)))


def sshsig_decode(blob):
    """(pubkey, namespace, hashalg, sigalg, raw signature) of an SSHSIG blob."""
    assert blob[:6] == b"SSHSIG" and struct.unpack(">I", blob[6:10])[0] == 1
    pub, ns, reserved, hashalg, sig = read_strings(blob[10:], 5)
    assert reserved == b""
    sigalg, raw = read_strings(sig, 2)
    return pub, ns.decode(), hashalg.decode(), sigalg.decode(), raw


def signed_data(namespace, message, hashalg):
    return (b"SSHSIG" + sstr(namespace.encode()) + sstr(b"") + sstr(hashalg.encode())
            + sstr(hashlib.new(hashalg, message).digest()))


def b64(blob):
    return base64.b64encode(blob).decode()


def unarmor(text):
    lines = text.strip().splitlines()
    assert lines[0] == "-----BEGIN SSH SIGNATURE-----" and lines[-1] == "-----END SSH SIGNATURE-----"
    return "".join(x.strip() for x in lines[1:-1])


def keygen_sign(key_path, message, namespace="pharos"):
    """The one-line base64 answer `printf %s MSG | ssh-keygen -q -Y sign -n NS -f KEY` gives."""
    proc = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", namespace, "-f", str(key_path)],
                          input=message, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return unarmor(proc.stdout.decode())


def agent_sign(sock, blob, message):
    agent = pharos.AgentClient(str(sock), timeout=10)
    try:
        return b64(agent.sshsig(blob, message))
    finally:
        agent.close()


def agent_raw_sign(sock, blob, data, flags):
    """A raw SSH_AGENTC_SIGN_REQUEST with the given flags: the (sigalg, raw) signature."""
    agent = pharos.AgentClient(str(sock), timeout=10)
    try:
        kind, reader = agent.request(13, sstr(blob) + sstr(data) + struct.pack(">I", flags))
        assert kind == 14, f"agent refused to sign (reply {kind})"
        sigalg, raw = read_strings(reader.string(16384), 2)
        return sigalg.decode(), raw
    finally:
        agent.close()


class Key:
    def __init__(self, name, path):
        self.name, self.path = name, path
        self.pub_line = Path(str(path) + ".pub").read_text().strip()
        self.keytype, data = self.pub_line.split()[:2]
        self.blob = base64.b64decode(data)
        fp = subprocess.run(["ssh-keygen", "-lf", str(path) + ".pub"], capture_output=True,
                            text=True, check=True).stdout.split()
        self.fingerprint = fp[1]
        assert self.fingerprint.startswith("SHA256:")

    def material(self):
        """`keytype base64` without the comment."""
        return " ".join(self.pub_line.split()[:2])


# --------------------------------------------------------------------------
# Fixtures: keys, agents, servers
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    need(HAVE_TOOLS, "OpenSSH's ssh-keygen, ssh-agent and ssh-add (apt install openssh-client)")
    base = tmp_path_factory.mktemp("keys")
    procs = {}
    for name, args in KEYGEN.items():
        procs[name] = subprocess.Popen(["ssh-keygen", "-q", *args, "-N", "", "-C", f"{name}@test",
                                        "-f", str(base / name)], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"ssh-keygen {name}: {err.decode(errors='replace')}"
    return {name: Key(name, base / name) for name in KEYGEN}


class Agent:
    """A real ssh-agent on its own socket, in the foreground (-D), stopped by its pid."""

    def __init__(self, sock):
        self.sock = Path(sock)
        self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(self.sock)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: self.sock.exists() or self.proc.poll() is not None, 10, what="ssh-agent")
        assert self.proc.poll() is None, "ssh-agent exited"

    def add(self, *keys):
        env = dict(os.environ, SSH_AUTH_SOCK=str(self.sock))
        for key in keys:
            subprocess.run(["ssh-add", "-q", str(key.path)], env=env, check=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        return self

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def agent(keys, tmp_path_factory):
    ag = Agent(tmp_path_factory.mktemp("agent") / "agent.sock")
    try:
        ag.add(*(keys[name] for name in LOGIN_OK_KEYS))
        yield ag
    finally:
        ag.stop()


def allowed(principal, key, options=""):
    return f"{principal} {options + ' ' if options else ''}{key.material()} {key.name}@test"


def small_order_line(principal="small"):
    blob = sstr(b"ssh-ed25519") + sstr(SMALL_ORDER_RAW)
    return f"{principal} ssh-ed25519 {b64(blob)} small@test"


def lab_key_lines(keys):
    return [
        "# lab key list",
        allowed("alice", keys["ed25519"]),
        allowed("rsa-user", keys["rsa"]),
        allowed("ec256", keys["ecdsa256"], 'role="writer"'),
        allowed("ec384", keys["ecdsa384"]),
        allowed("ec521", keys["ecdsa521"]),
        allowed("reader", keys["reader"], 'role="reader"'),
        allowed("admin", keys["admin"], 'role="admin"'),
        allowed("expired", keys["expired"], 'valid-before="20200101Z"'),
        allowed("future", keys["future"], 'valid-after="20990101Z"'),
        small_order_line(),
        allowed("bob", keys["bob"], 'frobnicate="yes"'),
    ]


def enterprise_key_lines(keys):
    return [
        allowed("ta", keys["ta"], 'role="writer",tenant="a"'),
        allowed("tb", keys["tb"], 'tenant="b"'),
        allowed("ra", keys["ra"], 'role="reader",tenant="a"'),
        allowed("aa", keys["aa"], 'role="admin",tenant="a"'),
        allowed("root", keys["root"], 'role="admin",tenant="*"'),
    ]


def make_server(base, tier, key_lines, crypto="pure", env=None, start=True):
    """A file-storage server of ``tier`` on ``base``/data with ``key_lines`` (None: no file)."""
    data = Path(base) / "data"
    data.mkdir(parents=True, exist_ok=True)
    if key_lines is not None:
        (data / "authorized_keys").write_text("".join(x + "\n" for x in key_lines))
    home = Path(base) / "home"
    home.mkdir(exist_ok=True)
    srv = ServerProcess(data, "--tier", tier, "--login-delay", "0.01", "--crypto", crypto,
                        env=dict({"HOME": str(home), "SSH_AUTH_SOCK": ""}, **(env or {})))
    return srv.start() if start else srv


def server_log(srv):
    """Everything the server wrote to stderr so far (reads what is waiting, never blocks)."""
    fd = srv.proc.stderr.fileno()
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        srv.stderr += chunk
    return srv.stderr.decode(errors="replace")


def expect_log(srv, text, since=0, timeout=10.0):
    wait_for(lambda: text in server_log(srv)[since:], timeout, what=f"server log line {text!r}")


def assert_no_traceback(srv):
    assert "Traceback" not in server_log(srv)


def serving(srv):
    """A fixture's body: yield the started server, then check its log and kill it."""
    try:
        yield srv
        assert_no_traceback(srv)
    finally:
        srv.kill()


@pytest.fixture(scope="module", params=["pure", "auto"])
def lab(request, keys, tmp_path_factory):
    """A lab-tier server with the lab key list, once per --crypto mode."""
    if request.param == "auto":
        need(HAVE_ASYNCSSH, "asyncssh for --crypto auto (pip install asyncssh)")
    srv = make_server(tmp_path_factory.mktemp(f"lab-{request.param}"), "lab", lab_key_lines(keys),
                      crypto=request.param)
    srv.crypto = request.param
    yield from serving(srv)


# --------------------------------------------------------------------------
# Login helpers
# --------------------------------------------------------------------------

def challenge_of(client, alias):
    reply = client.cmd(f"login {alias}")
    assert len(reply) == 1 and reply[0].startswith("301:"), reply
    challenge = reply[0][4:]
    assert len(challenge) == 42, challenge
    return challenge


def login(client, alias, sign):
    """login + answer; ``sign(challenge bytes)`` gives the base64 answer. Returns the reply."""
    challenge = challenge_of(client, alias)
    return client.cmd("answer " + sign(challenge.encode()))


def ok_login(alias):
    return [f"200:{alias}:Hi how are you?"]


FAILED = ["500:Login failed."]


def by_file(key):
    return lambda msg: keygen_sign(key.path, msg)


def by_agent(agent, key):
    return lambda msg: agent_sign(agent.sock, key.blob, msg)


def refused_for(srv, client, alias, answer, reason):
    """``answer`` to a fresh challenge is refused with 500, and the server logs ``reason``."""
    mark = len(server_log(srv))
    challenge = challenge_of(client, alias)
    reply = client.cmd("answer " + answer(challenge.encode()))
    assert reply == FAILED
    expect_log(srv, f"login as {alias} from 127.0.0.1 refused: {reason}", since=mark)
    # refused means not logged in: a write still needs login
    assert client.cmd("logout") == ["500:Not logged in."]


# --------------------------------------------------------------------------
# Logins that work
# --------------------------------------------------------------------------

LOGINS = {"ed25519": "alice", "rsa": "rsa-user", "ecdsa256": "ec256", "ecdsa384": "ec384",
          "ecdsa521": "ec521"}


@pytest.mark.parametrize("how", ["agent", "ssh-keygen"])
@pytest.mark.parametrize("kind", LOGIN_OK_KEYS)
def test_login_works(lab, keys, agent, kind, how):
    key, alias = keys[kind], LOGINS[kind]
    sign = by_agent(agent, key) if how == "agent" else by_file(key)
    with lab.client() as c:
        assert c.cmd(f"add alias=w-{kind}-{how}-{lab.crypto} name=\"Before Login\"") == \
            ["506:You must be logged in to use this command."]
        assert login(c, alias, sign) == ok_login(alias)
        assert c.cmd(f"add alias=w-{kind}-{how}-{lab.crypto} name=\"Logged In\"") == ["200:Ok."]
        assert c.cmd("logout") == ["200:Ok."]
        assert c.cmd(f"change alias=w-{kind}-{how}-{lab.crypto} make name=x") == \
            ["506:You must be logged in to use this command."]


def test_ssh_keygen_rsa_signature_is_sha2(keys):
    """ssh-keygen signs RSA with rsa-sha2-512 (so the file path is the SHA-2 path)."""
    pub, ns, hashalg, sigalg, _ = sshsig_decode(base64.b64decode(keygen_sign(keys["rsa"].path, b"x")))
    assert (pub, ns, sigalg) == (keys["rsa"].blob, "pharos", "rsa-sha2-512")


def test_challenges_are_random_and_login_replaces_session(lab, keys, agent):
    with lab.client() as c:
        seen = {challenge_of(c, "alice")}
        for _ in range(4):
            # a login while one is outstanding discards the old one (qi's 523)
            reply = c.cmd("login alice")
            assert len(reply) == 2 and reply[0].startswith("-523:") and reply[1].startswith("301:")
            seen.add(reply[1][4:])
        assert len(seen) == 5 and all(len(x) == 42 for x in seen)
        last = reply[1][4:]
        # a command other than answer discards the outstanding login
        reply = c.cmd("status")
        assert reply[0].startswith("-523:") and reply[-1] == "200:Database ready."
        assert c.cmd("answer " + agent_sign(agent.sock, keys["ed25519"].blob, last.encode()))[0] \
            .startswith("599:")
        assert login(c, "alice", by_agent(agent, keys["ed25519"])) == ok_login("alice")
        # a new login drops the old identity until it is answered
        challenge_of(c, "alice")
        assert c.cmd("add alias=nobody-here name=x")[-1].startswith("506:")


def test_siteinfo_advertises_sshsig(lab):
    with lab.client() as c:
        reply = c.cmd("siteinfo")
    assert reply[-1].startswith("200:")
    assert any("1024" in x or "sshsig" in x.lower() for x in reply[:-1]), reply


# --------------------------------------------------------------------------
# Logins refused
# --------------------------------------------------------------------------

def test_replayed_answer_refused(lab, keys, agent):
    key = keys["ed25519"]
    with lab.client() as c:
        challenge = challenge_of(c, "alice")
        answer = agent_sign(agent.sock, key.blob, challenge.encode())
        assert c.cmd("answer " + answer) == ok_login("alice")
        # the same challenge answered twice: there is nothing outstanding any more
        second = c.cmd("answer " + answer)
        assert len(second) == 1 and second[0].startswith("599:"), second
        c.cmd("logout")
        # the old signature on a new challenge
        refused_for(lab, c, "alice", lambda msg: answer, "bad signature")
    with lab.client() as c:
        # ... and on another connection
        refused_for(lab, c, "alice", lambda msg: answer, "bad signature")


def test_failed_answer_uses_up_the_challenge(lab, keys, agent):
    key = keys["ed25519"]
    with lab.client() as c:
        challenge = challenge_of(c, "alice")
        assert c.cmd("answer " + keygen_sign(keys["stranger"].path, challenge.encode())) == FAILED
        good = agent_sign(agent.sock, key.blob, challenge.encode())
        reply = c.cmd("answer " + good)
        assert len(reply) == 1 and reply[0].startswith("599:"), reply
        assert c.cmd("logout") == ["500:Not logged in."]


def test_challenge_from_another_connection_refused(lab, keys, agent):
    key = keys["ed25519"]
    with lab.client() as one, lab.client() as two:
        first = challenge_of(one, "alice")
        mark = len(server_log(lab))
        challenge_of(two, "alice")
        stolen = agent_sign(agent.sock, key.blob, first.encode())
        assert two.cmd("answer " + stolen) == FAILED
        expect_log(lab, "login as alice from 127.0.0.1 refused: bad signature", since=mark)
        # the signature itself was good: on its own connection it logs in
        assert one.cmd("answer " + stolen) == ok_login("alice")


def test_wrong_namespace_refused(lab, keys):
    for kind in ("ed25519", "rsa"):
        key = keys[kind]
        with lab.client() as c:
            refused_for(lab, c, LOGINS[kind], lambda msg: keygen_sign(key.path, msg, "other"),
                        "signature namespace 'other' is not 'pharos'")
            # namespace compared exactly: no prefix or case games
            refused_for(lab, c, LOGINS[kind], lambda msg: keygen_sign(key.path, msg, "pharos2"),
                        "signature namespace")
            refused_for(lab, c, LOGINS[kind], lambda msg: keygen_sign(key.path, msg, "Pharos"),
                        "signature namespace")


def test_sha1_rsa_refused(lab, keys, agent):
    key = keys["rsa"]
    n_e = read_strings(key.blob, 3)
    e, n = int.from_bytes(n_e[1], "big"), int.from_bytes(n_e[2], "big")
    made = []

    def sha1_answer(msg):
        data = signed_data("pharos", msg, "sha512")
        sigalg, raw = agent_raw_sign(agent.sock, key.blob, data, flags=0)
        assert sigalg == "ssh-rsa"
        # a mathematically valid PKCS#1 v1.5 SHA-1 signature: refused for its algorithm alone
        k = (n.bit_length() + 7) // 8
        digest_info = bytes.fromhex("3021300906052b0e03021a05000414") + hashlib.sha1(data).digest()
        block = b"\x00\x01" + b"\xff" * (k - len(digest_info) - 3) + b"\x00" + digest_info
        assert pow(int.from_bytes(raw, "big"), e, n).to_bytes(k, "big") == block
        made.append(raw)
        return b64(sshsig_encode(key.blob, "pharos", "sha512", sigalg, raw))

    with lab.client() as c:
        refused_for(lab, c, "rsa-user", sha1_answer, "bad signature")
        # the same SHA-1 signature relabelled as SHA-2 does not verify either
        refused_for(lab, c, "rsa-user", lambda msg: b64(sshsig_encode(
            key.blob, "pharos", "sha512", "rsa-sha2-512", made[0])), "bad signature")
        # and SSHSIG's own hash must be sha256 or sha512
        refused_for(lab, c, "rsa-user", lambda msg: b64(sshsig_encode(
            key.blob, "pharos", "sha1", "rsa-sha2-512", b"\x00" * 384)), "unsupported hash algorithm")


def test_key_not_in_list_refused(lab, keys, agent):
    stranger = keys["stranger"]
    with lab.client() as c:
        refused_for(lab, c, "alice", by_file(stranger), "the key is not in the key list")
        # a listed key used for another user
        refused_for(lab, c, "admin", by_agent(agent, keys["ed25519"]),
                    "the key is not listed for this user")
        # a line skipped for an unknown option does not authorize its key
        refused_for(lab, c, "bob", by_file(keys["bob"]), "the key is not in the key list")


def test_key_outside_its_validity_refused(lab, keys):
    with lab.client() as c:
        refused_for(lab, c, "expired", by_file(keys["expired"]), "the key has expired")
        refused_for(lab, c, "future", by_file(keys["future"]), "the key is not valid yet")


@pytest.mark.parametrize("kind", LOGIN_OK_KEYS)
def test_tampered_signature_refused(lab, keys, agent, kind):
    key = keys[kind]

    def tampered(where):
        def answer(msg):
            pub, ns, hashalg, sigalg, raw = sshsig_decode(
                base64.b64decode(agent_sign(agent.sock, key.blob, msg)))
            raw = bytearray(raw)
            raw[where] ^= 0x01
            return b64(sshsig_encode(pub, ns, hashalg, sigalg, bytes(raw)))
        return answer

    with lab.client() as c:
        refused_for(lab, c, LOGINS[kind], tampered(-1), "bad signature")
        refused_for(lab, c, LOGINS[kind], tampered(len(key.blob) // 8), "")
        # sanity: the untampered signature still logs in on the same connection
        assert login(c, LOGINS[kind], by_agent(agent, key)) == ok_login(LOGINS[kind])


def test_ed25519_s_plus_l_refused(lab, keys, agent):
    key = keys["ed25519"]

    def malleated(msg):
        pub, ns, hashalg, sigalg, raw = sshsig_decode(
            base64.b64decode(agent_sign(agent.sock, key.blob, msg)))
        s = int.from_bytes(raw[32:], "little")
        assert s < ED_L
        return b64(sshsig_encode(pub, ns, hashalg, sigalg, raw[:32] + (s + ED_L).to_bytes(32, "little")))

    with lab.client() as c:
        refused_for(lab, c, "alice", malleated, "bad signature")


def test_small_order_ed25519_key_skipped_and_forgery_refused(lab):
    log = server_log(lab)
    assert "small-order Ed25519 public key; line skipped" in log
    small_blob = sstr(b"ssh-ed25519") + sstr(SMALL_ORDER_RAW)

    def forged(msg):
        # R = identity, S = 0: [S]B == R + [k]A for every message when A is the identity
        return b64(sshsig_encode(small_blob, "pharos", "sha512", "ssh-ed25519", SMALL_ORDER_RAW + bytes(32)))

    with lab.client() as c:
        refused_for(lab, c, "small", forged, "the key is not in the key list")


def test_malformed_answers_refused(lab):
    with lab.client() as c:
        refused_for(lab, c, "alice", lambda msg: "not*base64!", "malformed signature")
        refused_for(lab, c, "alice", lambda msg: b64(b"SSHSIG\x00\x00\x00\x02"), "malformed signature")
        reply = c.cmd("answer")
        assert reply[0].startswith("599:")


# --------------------------------------------------------------------------
# Expired challenge: in-process (a server's clock cannot be moved from outside)
# --------------------------------------------------------------------------

def in_process_session(tmp_path, key_lines):
    path = tmp_path / "authorized_keys"
    path.write_text("".join(x + "\n" for x in key_lines))
    logged = []
    store = pharos.MemoryStore(pharos.Schema())
    config = pharos.ServerConfig(tier="lab", login_delay=0.001)
    keyfile = pharos.KeyFile(str(path), logged.append, fast=False)
    server = pharos.PhServer(store, config, logged.append, keys=keyfile)
    return pharos.PhSession(server, ("127.0.0.1", 40000)), logged


def test_expired_challenge_refused(tmp_path, keys):
    key = keys["ed25519"]
    session, logged = in_process_session(tmp_path, [allowed("alice", key)])

    async def attempt(age):
        reply, _, _ = await session.execute("login alice")
        assert reply.startswith("301:")
        alias, challenge, issued = session.pending_login
        assert alias == "alice" and reply == f"301:{challenge}\n"
        session.pending_login = (alias, challenge, issued - age)
        answer = keygen_sign(key.path, challenge.encode())
        reply, _, _ = await session.execute("answer " + answer)
        return reply

    assert asyncio.run(attempt(pharos.LOGIN_TTL + 1)) == "500:Login failed.\n"
    assert any("refused: the challenge expired" in x for x in logged), logged
    assert session.user is None
    # just inside the TTL the same steps log in: the age alone made the difference
    assert asyncio.run(attempt(pharos.LOGIN_TTL - 5)) == "200:alice:Hi how are you?\n"
    assert session.user is not None and session.user.alias == "alice"


def test_keyring_verify_directly(keys):
    key = keys["ed25519"]
    ring = pharos.KeyRing(allowed("alice", key, 'valid-before="20300101Z"') + "\n")
    answer = keygen_sign(key.path, b"challenge-bytes")
    who, why = ring.verify("alice", b"challenge-bytes", answer, "127.0.0.1", time.time())
    assert why is None and who.alias == "alice" and who.role == "writer"
    assert who.fingerprint == key.fingerprint
    assert ring.verify("alice", b"other-bytes", answer, "127.0.0.1", time.time()) == (None, "bad signature")
    late = pharos.parse_ssh_time("20300101Z") + 1
    assert ring.verify("alice", b"challenge-bytes", answer, "127.0.0.1", late) == \
        (None, "the key has expired")


# --------------------------------------------------------------------------
# Tiers
# --------------------------------------------------------------------------

def test_lab_tier_anonymous_reads_logged_in_writes(lab, keys, agent):
    tag = lab.crypto
    with lab.client() as c:
        assert c.cmd(f"add alias=lab-{tag} name=\"Lab Person\"") == \
            ["506:You must be logged in to use this command."]
        assert c.cmd(f"delete alias=lab-{tag}") == ["506:Must be logged in to delete."]
        assert login(c, "alice", by_agent(agent, keys["ed25519"])) == ok_login("alice")
        assert c.cmd(f"add alias=lab-{tag} name=\"Lab Person\"") == ["200:Ok."]
    with lab.client() as anon:
        reply = anon.cmd(f"query alias=lab-{tag}")
        assert reply[0] == "102:There was 1 match to your request."
        assert any("Lab Person" in x for x in reply)
        assert anon.cmd(f"change alias=lab-{tag} make name=Anon") == \
            ["506:You must be logged in to use this command."]
    with lab.client() as r:
        assert login(r, "reader", by_file(keys["reader"])) == ok_login("reader")
        assert r.cmd(f"query alias=lab-{tag}")[-1] == "200:Ok."
        assert r.cmd(f"add alias=lab2-{tag} name=x")[0].startswith("511:")
        assert r.cmd(f"change alias=lab-{tag} make name=Reader")[0].startswith("510:")
        assert r.cmd(f"delete alias=lab-{tag}")[0].startswith("510:")
        assert r.cmd("keys list")[0].startswith("510:")
    with lab.client() as anon:
        assert any("Lab Person" in x for x in anon.cmd(f"query alias=lab-{tag}"))
        assert anon.cmd("keys list") == ["506:You must be logged in to use this command."]


@pytest.fixture
def enterprise(keys, tmp_path):
    yield from serving(make_server(tmp_path, "enterprise", enterprise_key_lines(keys)))


def logged_in(srv, keys, who):
    c = srv.client()
    assert login(c, who, by_file(keys[who])) == ok_login(who)
    return c


def entries(reply):
    """{entry number: {field: value}} of a query reply (multi-line values joined)."""
    out = {}
    for x in reply:
        parts = x.split(":", 3)
        if len(parts) == 4 and parts[0] == "-200":
            out.setdefault(int(parts[1]), {})[parts[2].strip()] = parts[3].strip()
    return out


def test_enterprise_anonymous(enterprise):
    with enterprise.client() as c:
        assert c.cmd("query alias=anything") == ["506:You must be logged in to use this command."]
        assert c.cmd("ph alias=anything") == ["506:You must be logged in to use this command."]
        assert c.cmd("dump alias=anything") == ["506:You must be logged in to use this command."]
        assert c.cmd("add alias=x name=y") == ["506:You must be logged in to use this command."]
        assert c.cmd("set limit=5")[0] == "506:You must be logged in to use this command."
        for free in ("status", "siteinfo", "fields", "id tester", "help", "logout"):
            assert not c.cmd(free)[-1].startswith("506:"), free
        assert c.cmd("quit") == ["200:Bye!"]


def test_enterprise_tenants_are_separate(enterprise, keys):
    ta, tb = logged_in(enterprise, keys, "ta"), logged_in(enterprise, keys, "tb")
    try:
        for c, t in ((ta, "A"), (tb, "B")):
            assert c.cmd(f"add alias=shared name=\"{t} Shared\" email={t.lower()}@example.org") == ["200:Ok."]
            assert c.cmd(f"add alias={t.lower()}only name=\"{t} Only\"") == ["200:Ok."]
        assert ta.cmd("set limit=100") != []
        # query: only its own records, and `return all` shows nothing of B
        assert ta.cmd("query alias=bonly") == ["501:No matches to your query."]
        assert ta.cmd("query alias=bonly return all") == ["501:No matches to your query."]
        assert ta.cmd("query name=only") [0] == "102:There was 1 match to your request."
        reply = ta.cmd("query alias=shared return all")
        got = entries(reply)
        assert list(got) == [1] and got[1]["name"] == "A Shared" and got[1]["tenant"] == "a", reply
        assert not any("B " in x or "b@example" in x for x in reply)
        for query in ("query name=shared return all", "query email=b@example.org return all",
                      "query shared return all", "dump name=shared return all"):
            reply = ta.cmd(query)
            assert not any("B Shared" in x or "tenant: b" in x for x in reply), (query, reply)
        # change and delete cannot reach B's records
        assert ta.cmd("change alias=bonly make name=Hacked") == ["501:No matches to specification."]
        assert ta.cmd("delete alias=bonly") == ["501:No entries matched specifications."]
        assert ta.cmd("change alias=shared make name=\"A Changed\"") == ["200:1 entry changed."]
        assert ta.cmd("change name=shared make phone=555") == ["501:No matches to specification."]
        # the tenant field is the server's
        assert ta.cmd("change alias=aonly make tenant=b")[-1].startswith("599:")
        # B's records are untouched
        got = entries(tb.cmd("query alias=shared return all"))
        assert list(got) == [1] and got[1]["name"] == "B Shared" and got[1]["tenant"] == "b"
        assert entries(tb.cmd("query alias=bonly"))[1]["name"] == "B Only"
        assert tb.cmd("query alias=aonly") == ["501:No matches to your query."]
        # an admin of tenant * sees both
        with logged_in(enterprise, keys, "root") as root:
            got = entries(root.cmd("query alias=shared return all"))
            assert sorted((e["name"], e["tenant"]) for e in got.values()) == \
                [("A Changed", "a"), ("B Shared", "b")]
        assert ta.cmd("delete alias=shared") == ["200:1 entries deleted."]
        assert entries(tb.cmd("query alias=shared"))[1]["name"] == "B Shared"
        # a reader of tenant a: reads a, not b, and cannot write
        with logged_in(enterprise, keys, "ra") as ra:
            assert entries(ra.cmd("query alias=aonly"))[1]["name"] == "A Only"
            assert ra.cmd("query alias=bonly") == ["501:No matches to your query."]
            assert ra.cmd("add alias=rnew name=x")[0].startswith("511:")
            assert ra.cmd("change alias=aonly make name=R")[0].startswith("510:")
            assert ra.cmd("delete alias=aonly")[0].startswith("510:")
            assert entries(ra.cmd("query alias=aonly"))[1]["name"] == "A Only"
    finally:
        ta.close()
        tb.close()
    # the separation survives a restart (tenant is stored with the record)
    enterprise.stop()
    again = ServerProcess(enterprise.data, *enterprise.args[enterprise.args.index("--tier", 8):],
                          env=enterprise.env).start()
    try:
        with logged_in(again, keys, "ta") as ta:
            assert ta.cmd("query alias=bonly") == ["501:No matches to your query."]
            assert entries(ta.cmd("query alias=aonly return all"))[1]["tenant"] == "a"
    finally:
        again.kill()


def test_enterprise_audit_log_records_every_write(enterprise, keys):
    audit = enterprise.data / "audit.log"
    writes = []   # (user, request, final reply)
    with enterprise.client() as anon:
        assert anon.cmd("add alias=anon name=x")[0].startswith("506:")
        writes.append((None, "add alias=anon name=x", "506:"))
    with logged_in(enterprise, keys, "ta") as ta:
        for request, reply in (("add alias=audited name=\"Audit Me\"", "200:Ok."),
                               ("change alias=audited make phone=123", "200:1 entry changed."),
                               ("change alias=missing make phone=1", "501:"),
                               ("delete alias=audited", "200:1 entries deleted.")):
            assert ta.cmd(request)[-1].startswith(reply)
            writes.append(("ta", request, reply))
        for request in ("query alias=audited", "fields", "status"):
            ta.cmd(request)
    with logged_in(enterprise, keys, "ra") as ra:
        assert ra.cmd("add alias=rnew name=x")[-1].startswith("511:")
        writes.append(("ra", "add alias=rnew name=x", "511:"))
    with logged_in(enterprise, keys, "root") as root:
        line_ = allowed("late", keys["late"], 'tenant="a"')
        assert root.cmd("keys add " + line_) == ["200:Ok."]
        writes.append(("root", "keys add " + line_, "200:Ok."))
    found = [json.loads(x) for x in audit.read_text().splitlines()]
    assert len(found) == len(writes), found
    fps = {"ta": keys["ta"].fingerprint, "ra": keys["ra"].fingerprint, "root": keys["root"].fingerprint}
    tenants = {"ta": "a", "ra": "a", "root": "*"}
    for entry, (user, request, reply) in zip(found, writes):
        assert set(entry) >= {"time", "user", "key", "tenant", "peer", "request", "reply"}
        assert entry["user"] == user and entry["request"] == request
        assert entry["reply"].startswith(reply), entry
        assert entry["peer"] == "127.0.0.1"
        assert entry["key"] == fps.get(user) and entry["tenant"] == tenants.get(user)
        assert entry["time"][:2] == "20"
    assert "query" not in audit.read_text()


# --------------------------------------------------------------------------
# Key management over the wire
# --------------------------------------------------------------------------

@pytest.fixture
def lab_fresh(keys, tmp_path):
    yield from serving(make_server(tmp_path, "lab", lab_key_lines(keys)))


def test_keys_list_add_remove(lab_fresh, keys, agent):
    srv = lab_fresh
    path = srv.data / "authorized_keys"
    with srv.client() as anon:
        assert anon.cmd("keys list") == ["506:You must be logged in to use this command."]
        assert anon.cmd("keys add " + allowed("x", keys["stranger"]))[0].startswith("506:")
    with logged_in_as(srv, "alice", by_agent(agent, keys["ed25519"])) as writer:
        assert writer.cmd("keys list")[0].startswith("510:")
        assert writer.cmd("keys add " + allowed("x", keys["stranger"], 'role="admin"'))[0].startswith("510:")
        assert writer.cmd("keys remove admin")[0].startswith("510:")
    with logged_in_as(srv, "admin", by_file(keys["admin"])) as admin:
        reply = admin.cmd("keys list")
        assert reply[0] == "102:There were 9 matches to your request." and reply[-1] == "200:Ok."
        got = entries(reply)
        users = {e["user"]: e for e in got.values()}
        assert set(users) == {"alice", "rsa-user", "ec256", "ec384", "ec521", "reader", "admin",
                              "expired", "future"}
        assert users["admin"]["role"] == "admin" and users["reader"]["role"] == "reader"
        assert users["alice"]["role"] == "writer"
        assert users["alice"]["key"] == f"ssh-ed25519 {keys['ed25519'].fingerprint}"
        assert users["rsa-user"]["key"] == f"ssh-rsa {keys['rsa'].fingerprint}"
        # add: the file gets the line and the key logs in at once
        assert admin.cmd("keys add " + allowed("newbie", keys["stranger"])) == ["200:Ok."]
        assert admin.cmd("keys add " + allowed("newbie", keys["stranger"]))[0].startswith("509:")
        assert admin.cmd("keys add " + allowed("weird", keys["stranger"], 'zap="1"'))[0].startswith("512:")
        assert admin.cmd("keys add " + allowed("weak", keys["rsa1024"]))[0].startswith("512:")
        assert allowed("newbie", keys["stranger"]) in path.read_text().splitlines()
        assert "weird" not in path.read_text() and "weak" not in path.read_text()
        with srv.client() as c:
            assert login(c, "newbie", by_file(keys["stranger"])) == ok_login("newbie")
            assert c.cmd("add alias=newbies name=N") == ["200:Ok."]
        # remove by fingerprint
        assert admin.cmd(f"keys remove {keys['stranger'].fingerprint}") == ["200:1 key removed."]
        assert "newbie" not in path.read_text()
        with srv.client() as c:
            refused_for(srv, c, "newbie", by_file(keys["stranger"]), "the key is not in the key list")
        assert admin.cmd("keys remove nobody-like-this") == ["501:No matching keys."]
        # the last admin key stays
        assert admin.cmd("keys remove admin") == ["510:That would remove the last admin key."]
        assert admin.cmd(f"keys remove {keys['admin'].fingerprint}") == \
            ["510:That would remove the last admin key."]
        assert allowed("admin", keys["admin"], 'role="admin"') in path.read_text().splitlines()
        # with a second admin, the first may go; then the second is the last
        assert admin.cmd("keys add " + allowed("admin2", keys["late"], 'role="admin"')) == ["200:Ok."]
        assert admin.cmd("keys remove admin") == ["200:1 key removed."]
        # its key gone, this session is logged out at once; admin2 goes on
        assert admin.cmd("keys list") == ["506:You must be logged in to use this command."]
    with logged_in_as(srv, "admin2", by_file(keys["late"])) as admin2:
        assert admin2.cmd("keys remove admin2") == ["510:That would remove the last admin key."]
        # remove by principal takes every line of that user
        assert admin2.cmd("keys remove alice") == ["200:1 key removed."]
    with srv.client() as c:
        refused_for(srv, c, "admin", by_file(keys["admin"]), "the key is not in the key list")
        assert login(c, "admin2", by_file(keys["late"])) == ok_login("admin2")
        assert entries(c.cmd("keys list"))[1]["user"] != "alice"


def logged_in_as(srv, alias, sign):
    c = srv.client()
    assert login(c, alias, sign) == ok_login(alias)
    return c


def test_tenant_admin_manages_only_its_tenant(enterprise, keys):
    path = enterprise.data / "authorized_keys"
    with logged_in(enterprise, keys, "aa") as aa:
        got = entries(aa.cmd("keys list"))
        assert sorted(e["user"] for e in got.values()) == ["aa", "ra", "ta"]
        assert all(e["tenant"] == "a" for e in got.values())
        assert aa.cmd("keys add " + allowed("late", keys["late"], 'tenant="b"'))[0].startswith("510:")
        assert aa.cmd("keys add " + allowed("late", keys["late"], 'tenant="*"'))[0].startswith("510:")
        assert "late" not in path.read_text()
        assert aa.cmd("keys remove tb") == ["501:No matching keys."]
        assert aa.cmd(f"keys remove {keys['tb'].fingerprint}") == ["501:No matching keys."]
        assert aa.cmd(f"keys remove {keys['root'].fingerprint}") == ["501:No matching keys."]
        assert "tb " in path.read_text() and "root " in path.read_text()
        assert aa.cmd("keys add " + allowed("late", keys["late"], 'tenant="a"')) == ["200:Ok."]
        assert aa.cmd("keys remove ra") == ["200:1 key removed."]
    with logged_in(enterprise, keys, "root") as root:
        users = sorted(e["user"] for e in entries(root.cmd("keys list")).values())
        assert users == ["aa", "late", "root", "ta", "tb"]
    with enterprise.client() as c:
        assert login(c, "late", by_file(keys["late"])) == ok_login("late")
        assert c.cmd("add alias=latecomer name=L") == ["200:Ok."]
        refused_for(enterprise, c, "ra", by_file(keys["ra"]), "the key is not in the key list")
    with logged_in(enterprise, keys, "tb") as tb:
        assert tb.cmd("query alias=latecomer") == ["501:No matches to your query."]


# --------------------------------------------------------------------------
# Key list loading and reloading
# --------------------------------------------------------------------------

def test_unknown_option_line_skipped_with_warning(lab):
    log = server_log(lab)
    assert "line 12: option 'frobnicate' is not supported, so the key is not used; line skipped" in log
    # the lines around it are used
    assert "line 11:" in log and "line 10:" not in log and "line 2:" not in log


def test_one_word_line_skipped_with_warning(keys, tmp_path):
    """A stray one-word line in the key list is skipped like any bad line (server starts)."""
    srv = make_server(tmp_path, "lab", ["garbage", allowed("admin", keys["admin"], 'role="admin"')],
                      start=False)
    try:
        srv.start()
        assert "line 1:" in server_log(srv) and "line skipped" in server_log(srv)
        with srv.client() as c:
            assert login(c, "admin", by_file(keys["admin"])) == ok_login("admin")
    finally:
        srv.kill()
        assert "Traceback" not in srv.read_stderr()


def test_keys_add_one_word_refused(lab_fresh, keys):
    with logged_in_as(lab_fresh, "admin", by_file(keys["admin"])) as admin:
        assert admin.cmd("keys add garbage")[0].startswith("512:")
        assert admin.cmd("keys add garbage") != ["400:Internal error."]


def test_sighup_reload(keys, tmp_path):
    srv = make_server(tmp_path, "lab", [allowed("admin", keys["admin"], 'role="admin"')])
    try:
        path = srv.data / "authorized_keys"
        with srv.client() as c:
            refused_for(srv, c, "late", by_file(keys["late"]), "the key is not in the key list")
        mark = len(server_log(srv))
        with open(path, "a") as f:
            f.write(allowed("late", keys["late"]) + "\n")
            f.write(allowed("broken", keys["bob"], 'nope="x"') + "\n")
        os.kill(srv.proc.pid, signal.SIGHUP)
        # the warning for the new bad line proves the reload happened on the signal alone
        expect_log(srv, "line 3: option 'nope' is not supported", since=mark)
        with srv.client() as c:
            assert login(c, "late", by_file(keys["late"])) == ok_login("late")
        assert srv.proc.poll() is None
        assert_no_traceback(srv)
    finally:
        srv.kill()


def test_reload_when_the_file_changes(keys, tmp_path):
    srv = make_server(tmp_path, "lab", [allowed("admin", keys["admin"], 'role="admin"')])
    try:
        with srv.client() as c:
            refused_for(srv, c, "late", by_file(keys["late"]), "the key is not in the key list")
            with open(srv.data / "authorized_keys", "a") as f:
                f.write(allowed("late", keys["late"]) + "\n")
            # checked at most once a second, on login: keep trying until it is picked up
            wait_for(lambda: login(c, "late", by_file(keys["late"])) == ok_login("late"), 10,
                     interval=0.2, what="the changed key list to be loaded")
    finally:
        srv.kill()


# --------------------------------------------------------------------------
# First start
# --------------------------------------------------------------------------

def test_first_start_authorizes_agent_keys(keys, tmp_path):
    ag = Agent(tmp_path / "boot-agent.sock").add(keys["root"], keys["ecdsa256"])
    try:
        srv = make_server(tmp_path, "lab", None, env={"SSH_AUTH_SOCK": str(ag.sock),
                                                      "LOGNAME": "bootuser", "USER": "bootuser"})
        try:
            path = srv.data / "authorized_keys"
            log = server_log(srv)
            assert f"authorized 2 SSH key(s) of bootuser from ssh-agent as admin in {path}" in log
            lines = path.read_text().splitlines()
            assert len(lines) == 2
            for line_, key in zip(lines, (keys["root"], keys["ecdsa256"])):
                assert line_.startswith('bootuser role="admin",tenant="*" ' + key.material())
            with srv.client() as c:
                assert login(c, "bootuser", by_agent(ag, keys["ecdsa256"])) == ok_login("bootuser")
                assert c.cmd("keys list")[0] == "102:There were 2 matches to your request."
                assert c.cmd("add alias=booted name=B") == ["200:Ok."]
        finally:
            srv.kill()
    finally:
        ag.stop()


def test_first_start_falls_back_to_home_ssh(keys, tmp_path):
    ssh_dir = tmp_path / "home" / ".ssh"
    ssh_dir.mkdir(parents=True)
    shutil.copy(str(keys["home"].path) + ".pub", ssh_dir / "id_ed25519.pub")
    srv = make_server(tmp_path, "lab", None, env={"LOGNAME": "homeuser", "USER": "homeuser"})
    try:
        assert "authorized 1 SSH key(s) of homeuser from ~/.ssh as admin" in server_log(srv)
        with srv.client() as c:
            assert login(c, "homeuser", by_file(keys["home"])) == ok_login("homeuser")
    finally:
        srv.kill()


def test_first_start_without_keys_says_how(keys, tmp_path):
    ag = Agent(tmp_path / "empty-agent.sock")      # an agent holding no key
    try:
        srv = make_server(tmp_path, "lab", None, env={"SSH_AUTH_SOCK": str(ag.sock),
                                                      "LOGNAME": "nokeys", "USER": "nokeys"})
        try:
            log = server_log(srv)
            assert "no key list yet and no SSH keys found" in log
            assert "ssh-keygen -t ed25519" in log and "pharos keys add" in log
            assert not (srv.data / "authorized_keys").exists()
            with srv.client() as c:
                assert c.cmd("add alias=xyz name=y") == ["506:You must be logged in to use this command."]
                assert c.cmd("query alias=xyz") == ["501:No matches to your query."]
        finally:
            srv.kill()
    finally:
        ag.stop()


def test_first_start_without_agent_says_how(tmp_path):
    srv = make_server(tmp_path, "enterprise", None, env={"LOGNAME": "nokeys", "USER": "nokeys"})
    try:
        assert "no key list yet and no SSH keys found" in server_log(srv)
    finally:
        srv.kill()


# --------------------------------------------------------------------------
# Net::PH reads in the lab tier
# --------------------------------------------------------------------------

def test_net_ph_reads_in_lab(lab_fresh, keys, agent):
    need(shutil.which("perl") and subprocess.run(["perl", "-MNet::PH", "-e", "1"],
                                                 capture_output=True).returncode == 0,
         "perl with Net::PH (apt install libnet-ph-perl)")
    with logged_in_as(lab_fresh, "alice", by_agent(agent, keys["ed25519"])) as c:
        assert c.cmd('add alias=perly name="Perl Reader" email=perl@example.org') == ["200:Ok."]
    script = r'''
use strict; use warnings; use Net::PH;
my $ph = Net::PH->new("127.0.0.1", Port => $ARGV[0], Timeout => 20) or die "connect: $@";
my $r = $ph->query({alias => "perly"}, [qw(alias name email)]);
die "query failed: " . $ph->message unless defined $r;
print "COUNT\t", scalar(@$r), "\n";
for my $f (sort keys %{$r->[0]}) { print "F\t$f\t", $r->[0]{$f}->text, "\n"; }
my ($fields, $order) = $ph->fields;
die "fields failed: " . $ph->message unless $fields;
print "FIELD\t$_\n" for sort keys %$fields;
my $bad = $ph->add({alias => "perl2", name => "x"});
print "ADD\t", ($bad ? 1 : 0), "\t", $ph->code, "\n";
$ph->quit;
'''
    proc = subprocess.run(["perl", "-e", script, str(lab_fresh.port)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [x.split("\t") for x in proc.stdout.splitlines()]
    assert ["COUNT", "1"] in rows
    assert ["F", "name", "Perl Reader"] in rows and ["F", "email", "perl@example.org"] in rows
    field_names = {r[1] for r in rows if r[0] == "FIELD"}
    assert {"alias", "name", "email", "tenant"} <= field_names
    assert ["ADD", "0", "506"] in rows


# --------------------------------------------------------------------------
# Units: key lines, RSA size, Ed25519 vectors, small order
# --------------------------------------------------------------------------

RFC8032_PUB = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIG = bytes.fromhex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555f"
                            "b8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def test_rfc8032_test_1():
    key = pharos.Ed25519Key(RFC8032_PUB)
    assert key.verify(RFC8032_SIG, b"") is True
    assert key.verify(RFC8032_SIG, b"x") is False
    s = int.from_bytes(RFC8032_SIG[32:], "little")
    assert key.verify(RFC8032_SIG[:32] + (s + ED_L).to_bytes(32, "little"), b"") is False
    assert key.verify(RFC8032_SIG[:63], b"") is False
    blob = sstr(b"ssh-ed25519") + sstr(RFC8032_PUB)
    pk = pharos.PublicKey(blob)
    assert pk.verify(b"", sstr(b"ssh-ed25519") + sstr(RFC8032_SIG)) is True
    assert pk.verify(b"", sstr(b"ssh-rsa") + sstr(RFC8032_SIG)) is False


def test_rfc8032_through_asyncssh():
    need(HAVE_ASYNCSSH, "asyncssh (pip install asyncssh)")
    pk = pharos.PublicKey(sstr(b"ssh-ed25519") + sstr(RFC8032_PUB))
    assert pk.use_asyncssh() is True
    assert pk.verify(b"", sstr(b"ssh-ed25519") + sstr(RFC8032_SIG)) is True
    s = int.from_bytes(RFC8032_SIG[32:], "little")
    assert pk.verify(b"", sstr(b"ssh-ed25519") + sstr(RFC8032_SIG[:32] + (s + ED_L).to_bytes(32, "little"))) is False


@pytest.mark.parametrize("encoding", [
    SMALL_ORDER_RAW,                                              # identity (order 1)
    (pharos.ED_P - 1).to_bytes(32, "little"),                     # (0, -1), order 2
    bytes(32),                                                    # y = 0: order 4
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),  # order 8
])
def test_small_order_keys_refused(encoding):
    with pytest.raises(pharos.SSHFormatError, match="small-order"):
        pharos.Ed25519Key(encoding)
    line_ = f"x ssh-ed25519 {b64(sstr(b'ssh-ed25519') + sstr(encoding))} c"
    with pytest.raises(pharos.SSHFormatError):
        pharos.parse_key_line(line_)
    ring = pharos.KeyRing(line_ + "\n")
    assert ring.entries == [] and len(ring.warnings) == 1


def test_parse_key_line_forms(keys):
    k = keys["ed25519"]
    entry = pharos.parse_key_line(f'alice,bob role="admin",tenant="a",valid-before="20991231Z" {k.material()} my key')
    assert (entry.principals, entry.role, entry.tenant, entry.comment) == ("alice,bob", "admin", "a", "my key")
    assert entry.key.blob == k.blob and entry.key.fingerprint == k.fingerprint
    entry = pharos.parse_key_line(f"carol {k.material()}")
    assert (entry.principals, entry.role, entry.tenant) == ("carol", "writer", "")
    # plain authorized_keys lines: the principal is the comment's first word
    entry = pharos.parse_key_line(f"{k.material()} dave@laptop work key")
    assert entry.principals == "dave@laptop" and entry.role == "writer"
    entry = pharos.parse_key_line(f"restrict {k.material()} erin")
    assert entry.principals == "erin"
    entry = pharos.parse_key_line(f'role="reader" {k.material()} frank')
    assert entry.principals == "frank" and entry.role == "reader"
    for kind in ("rsa", "ecdsa256", "ecdsa384", "ecdsa521"):
        entry = pharos.parse_key_line(keys[kind].pub_line)
        assert entry.key.keytype == keys[kind].keytype and entry.principals == f"{kind}@test"
    assert pharos.parse_key_line("") is None and pharos.parse_key_line("  # note") is None


def test_parse_key_line_authorized_keys_option_list(keys):
    """An authorized_keys line whose options are a comma list of bare OpenSSH flags."""
    k = keys["ed25519"]
    entry = pharos.parse_key_line(f"no-port-forwarding,no-X11-forwarding,no-pty {k.material()} erin@host")
    assert entry.principals == "erin@host"
    entry = pharos.parse_key_line(f"restrict,no-pty {k.material()} erin")
    assert entry.principals == "erin"


@pytest.mark.parametrize("template", [
    'x frobnicate="1" {key} c',                  # unknown option
    'x role="root" {key} c',                     # unknown role
    'x tenant="a b" {key} c',                    # bad tenant
    'x role=admin {key} c',                      # unquoted value
    'x role="admin {key} c',                     # missing end quote
    'x valid-before="yesterday" {key} c',        # bad time
    'x role {key} c',                            # option without a value
    '{key}',                                     # authorized_keys line without a name
    'x ssh-ed25519 AAAA!!!! c',                  # not base64
    'x ssh-rsa {data} c',                        # type does not match the data
    'x ssh-dss AAAAB3NzaC1kc3MAAACBAP c',        # unsupported type
    'garbage',                                   # one word
    'alice role="admin"',                        # principal and options, no key
])
def test_parse_key_line_refusals(keys, template):
    k = keys["ed25519"]
    with pytest.raises(pharos.SSHFormatError):
        pharos.parse_key_line(template.format(key=k.material(), data=k.pub_line.split()[1]))


def test_rsa_1024_refused(keys):
    k = keys["rsa1024"]
    with pytest.raises(pharos.SSHFormatError, match="1024 bits"):
        pharos.PublicKey(k.blob)
    ring = pharos.KeyRing(allowed("weak", k) + "\n")
    assert ring.entries == [] and "below the 2048-bit minimum" in ring.warnings[0]
    # and RSA 3072 is fine
    assert pharos.PublicKey(keys["rsa"].blob).rsa[0].bit_length() == 3072


def test_sshsig_encoding_matches(keys, agent):
    """The test's SSHSIG encoder agrees with pharos.sshsig_blob and with ssh-keygen -Y verify."""
    key = keys["ed25519"]
    blob = base64.b64decode(agent_sign(agent.sock, key.blob, b"hello"))
    pub, ns, hashalg, sigalg, raw = sshsig_decode(blob)
    assert sshsig_encode(pub, ns, hashalg, sigalg, raw) == blob
    assert pharos.sshsig_blob(pub, ns, hashalg, sstr(sigalg.encode()) + sstr(raw)) == blob
    assert signed_data(ns, b"hello", hashalg) == pharos.sshsig_signed_data(ns, b"hello", hashalg)
    signers = Path(str(key.path) + ".signers")
    signers.write_text(allowed("alice", key) + "\n")
    sig_file = Path(str(key.path) + ".sig")
    sig_file.write_text("-----BEGIN SSH SIGNATURE-----\n" + b64(blob) + "\n-----END SSH SIGNATURE-----\n")
    proc = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", "alice", "-n",
                           "pharos", "-s", str(sig_file)], input=b"hello", capture_output=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("fast", [False, True], ids=["pure", "asyncssh"])
@pytest.mark.parametrize("kind", LOGIN_OK_KEYS)
def test_keyring_checks_same_on_both_paths(keys, agent, kind, fast):
    """The asyncssh fast path keeps pharos's own checks (S < L, no SHA-1, exact match)."""
    if fast:
        need(HAVE_ASYNCSSH, "asyncssh (pip install asyncssh)")
    key = keys[kind]
    ring = pharos.KeyRing(allowed("u", key) + "\n")
    if fast:
        assert ring.speed_up() is True
    msg, now = b"unit-challenge", time.time()
    good = base64.b64decode(keygen_sign(key.path, msg))
    who, why = ring.verify("u", msg, b64(good), "127.0.0.1", now)
    assert why is None and who.fingerprint == key.fingerprint
    via_agent = agent_sign(agent.sock, key.blob, msg)
    assert ring.verify("u", msg, via_agent, "127.0.0.1", now)[1] is None
    pub, ns, hashalg, sigalg, raw = sshsig_decode(good)
    bad = bytearray(raw)
    bad[-1] ^= 1
    assert ring.verify("u", msg, b64(sshsig_encode(pub, ns, hashalg, sigalg, bytes(bad))),
                       "127.0.0.1", now) == (None, "bad signature")
    assert ring.verify("u", msg + b"x", b64(good), "127.0.0.1", now) == (None, "bad signature")
    if kind == "ed25519":
        s = int.from_bytes(raw[32:], "little") + ED_L
        forged = sshsig_encode(pub, ns, hashalg, sigalg, raw[:32] + s.to_bytes(32, "little"))
        assert ring.verify("u", msg, b64(forged), "127.0.0.1", now) == (None, "bad signature")
    if kind == "rsa":
        sigalg1, raw1 = agent_raw_sign(agent.sock, key.blob, signed_data("pharos", msg, "sha512"), 0)
        assert sigalg1 == "ssh-rsa"
        sha1 = sshsig_encode(pub, "pharos", "sha512", sigalg1, raw1)
        assert ring.verify("u", msg, b64(sha1), "127.0.0.1", now) == (None, "bad signature")
    if kind.startswith("ecdsa"):
        # the signature algorithm must be the key's own
        other = "ecdsa-sha2-nistp256" if kind != "ecdsa256" else "ecdsa-sha2-nistp384"
        assert ring.verify("u", msg, b64(sshsig_encode(pub, ns, hashalg, other, raw)),
                           "127.0.0.1", now) == (None, "bad signature")


def test_the_written_out_ed25519_constants_are_the_curves():
    p = pharos.ED_P
    assert pharos.ED_D == -121665 * pow(121666, p - 2, p) % p
    assert pharos.ED_SQRT_M1 == pow(2, (p - 1) // 4, p)
    assert pharos.ED_BASE == pharos.ed_decode((4 * pow(5, p - 2, p) % p).to_bytes(32, "little"))
