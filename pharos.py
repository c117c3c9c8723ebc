#!/usr/bin/env python3
"""Pharos: a directory of people and machines that speaks CCSO Ph (RFC 2378).

One stdlib-only module: the server, its storage and every command-line tool.
Run ``python3 pharos.py serve`` for a server, ``python3 pharos.py --help`` for
the rest.  Optional packages (asyncssh, zeroconf) switch on extras.

Sections, in dependency order (``grep -n '^# SECTION:' pharos.py``):

    Constants   — version, limits, defaults; lazy standard modules and optional packages
    Errors      — PharosError and every error class
    Net         — numbers and host:port from outside (ASCII only), loopback, fd limits, BER
    Schema      — fields, properties, record rules (new records, provenance, merge)
    Protocol    — Ph request tokenizer and reply formatting (pure, no I/O)
    Query       — query plans, the inverted index, bounded searches
    Metrics     — counters, histograms, /proc readings and the Prometheus text format
    Loop        — Later, the event loop's selector, error handler and runner
    Storage     — the Store interface; MemoryStore and the writes not yet durable
    File store  — FileStore: journal, snapshot, image, lock
    LDAP store  — LdapStore: layout, mapping, escaping, a BER reader, Content Sync, faults
    SSH         — wire encoding, public keys, SSHSIG, pure-Python verifiers, agent client
    Auth        — the key list, logins, tiers, roles, tenants and the audit log
    Service     — DirectoryService: the directory's rules, for every front end
    Client      — the Ph client core of every command-line tool (asyncio or a blocking socket)
    Formats     — vCard, CSV, JSON and the machine exports (pure: text in, text out)
    Discovery   — scan targets, port lists, the probe engine, banners, neighbours
    Ph server   — PhSession (one ph_<verb> per command), the connection, the listener, its caps
    HTTP        — the one HTTP app: request reader with limits, route table, loop bridge, metrics
    MCP         — the tool table and JSON-RPC for AI agents, over Streamable HTTP and stdio
    Serve       — the wiring that starts the listeners (Ph, HTTP with metrics and MCP)
    CLI         — cmd_<name> handlers, argument parsing and main()
"""

from __future__ import annotations


# SECTION: Constants — version, limits, defaults; lazy standard modules and optional packages

import bisect
import contextlib
import errno
import functools
import itertools
import marshal
import os
import struct
import sys
import time

__version__ = "0.1.0"
__all__ = ["main", "Schema", "MemoryStore", "FileStore", "Directory", "PhSession", "serve"]

PH_PORT = 2378
METRICS_PORT = 9090
MAX_LINE = 8192                 # request bytes accepted on one line (qi's buffer)
READ_BUFFER = 256 * 1024        # the Ph listener's one read buffer, reused by every read
MAX_REPLY_LINE = 1023           # Lynx truncates longer reply lines
MAX_VALUES = 64                 # values one multi-valued field may hold
MAX_QUERY_TERMS = 16
DEFAULT_MAX_RESULTS = 1000      # over this a query gets 502
SEARCH_STEPS = 2048             # term checks (candidates × terms) a search makes per loop turn
DEFAULT_MAX_DUMPS = 64          # dumps open at once on one server (one per connection)
DEFAULT_CHANGE_LIMIT = 2        # qi's `set limit` default for change/delete
MAX_CHANGE_LIMIT = 1_000_000
DEFAULT_IDLE_TIMEOUT = 300.0    # seconds a connection may sit without a full line
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_BUSY_POLL_US = 100      # the event loop looks again this long before it sleeps
MAX_BUSY_POLL_US = 10_000
FD_RESERVE = 32                 # descriptors kept for the journal, metrics and accept()
DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024
INLINE_FSYNC_SECONDS = 0.0005   # a batch whose fsync is quicker is written on the event loop
JOURNAL_PREALLOC = 4 * 1024 * 1024  # journal segments grow by zero-filled steps of this size
LOGIN_TTL = 120.0               # seconds a login challenge stays valid
LOGIN_FAIL_DELAY = 1.0          # qi answers a failed login after one second
CHALLENGE_ALPHABET = "".join(chr(c) for c in range(0x21, 0x61) if chr(c) != ":")
AUTH_SSHSIG = 1024              # siteinfo method flag for SSH signatures (extension)
TIERS = ("dev", "lab", "enterprise")
EXIT_OK, EXIT_NOMATCH, EXIT_USAGE, EXIT_FAIL = 0, 1, 2, 3

OPTIONAL_PACKAGES = {"asyncssh": "ssh", "zeroconf": "mdns"}


class LazyModule:
    """A standard module imported on first use: serving needs asyncio, ``ph --version``
    does not, and every command pays for what the module imports at its top.

    The first attribute read imports the module and puts it in this module's globals
    in place of the stand-in, so later reads cost nothing extra.
    """

    def __init__(self, name):
        self.lazy_name = name

    def __getattr__(self, attr):
        import importlib
        module = importlib.import_module(self.lazy_name)
        globals()[self.lazy_name] = module
        return getattr(module, attr)


asyncio = LazyModule("asyncio")
# Only some commands need these (the server, logins, key lists); a lookup imports none.
array, base64, hashlib = LazyModule("array"), LazyModule("base64"), LazyModule("hashlib")
hmac, secrets, signal = LazyModule("hmac"), LazyModule("secrets"), LazyModule("signal")
argparse, json = LazyModule("argparse"), LazyModule("json")
selectors, socket = LazyModule("selectors"), LazyModule("socket")
# And these, which a lookup does not need either (patterns are compiled lazily: LazyRegex).
fnmatch, ipaddress, re = LazyModule("fnmatch"), LazyModule("ipaddress"), LazyModule("re")
weakref, zlib = LazyModule("weakref"), LazyModule("zlib")


class LazyRegex:
    """A module-level regular expression compiled when first used: start-up (every `ph`,
    `mdb` and `--version`) pays for none of the module's patterns, only for those it uses.

    The first call of a method compiles the pattern and puts the compiled pattern's
    methods on the instance, so later calls find them directly and cost nothing extra.
    Flags are written inline in the pattern (``(?s)``, ``(?i)``, ``(?x)``).
    """

    METHODS = ("match", "fullmatch", "search", "sub", "subn", "split", "findall", "finditer")

    def __init__(self, pattern):
        self.pattern = pattern

    def compiled(self):
        """The pattern compiled, its methods now this instance's."""
        regex = re.compile(self.pattern)
        for name in self.METHODS:
            setattr(self, name, getattr(regex, name))
        return regex

    def match(self, *args):
        return self.compiled().match(*args)

    def fullmatch(self, *args):
        return self.compiled().fullmatch(*args)

    def search(self, *args):
        return self.compiled().search(*args)

    def sub(self, *args):
        return self.compiled().sub(*args)

    def subn(self, *args):
        return self.compiled().subn(*args)

    def split(self, *args):
        return self.compiled().split(*args)

    def findall(self, *args):
        return self.compiled().findall(*args)

    def finditer(self, *args):
        return self.compiled().finditer(*args)


def utc_now(now=None):
    """An RFC 3339 UTC timestamp with seconds, e.g. 2026-11-25T07:50:13Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))


# SECTION: Errors — PharosError and every error class

def optional_import(name):
    """Import an optional package or raise a UsageError naming the pip install."""
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        extra = OPTIONAL_PACKAGES.get(name, name)
        raise UsageError(f"this needs the optional package {name}: "
                         f"pip install {name}  (or: pip install 'pharos[{extra}]')") from None


class PharosError(Exception):
    """Root of every error Pharos raises on purpose."""


class UsageError(PharosError):
    """A bad command-line argument or configuration: exit status 2."""


class DataError(PharosError):
    """A data file that cannot be trusted: corrupt, unreadable or locked."""


class StoreError(PharosError):
    """A write the store could not make durable; ``readonly``, when set, is why the store
    takes no more writes after it; ``code`` is the Ph code to report."""

    def __init__(self, text, readonly=None, code=400):
        super().__init__(text)
        self.readonly, self.code = readonly, code


class PhError(PharosError):
    """A Ph reply carrying an error code, raised by the client side."""

    def __init__(self, code, text):
        super().__init__(f"{code}:{text}")
        self.code, self.text = code, text


class ServiceError(PharosError):
    """A request the directory refuses: the Ph ``code`` and ``text`` of the final reply line,
    and ``details``, the (code, text) lines that go before it. Ph sends them as they are;
    HTTP and MCP turn the code into a status and the text into words."""

    def __init__(self, code, text, details=()):
        super().__init__(text)
        self.code, self.text, self.details = code, text, list(details)


class RecordError(PharosError):
    """A record or value the schema refuses; ``code`` is the Ph code to report."""

    def __init__(self, text, code=512):
        super().__init__(text)
        self.code = code


class SSHFormatError(PharosError):
    """Malformed SSH wire data, key or signature."""


class HttpError(PharosError):
    """A request the HTTP reader refuses: the status code to answer and why."""

    def __init__(self, code, text):
        super().__init__(text)
        self.code, self.text = code, text


class PhRefusal(PhError):
    """An error reply worded for people, with the exit status the command line gives it."""

    def __init__(self, code, text, status):
        super().__init__(code, text)
        self.status = status


class FormatError(PharosError):
    """An import file whose structure cannot be read past ``line``."""

    def __init__(self, line, text):
        super().__init__(f"line {line}: {text}")
        self.line, self.text = line, text


class DerError(PharosError, ValueError):
    """BER or DER that is not well-formed: a certificate, a reply of an LDAP directory."""


class McpError(PharosError):
    """A JSON-RPC error: ``code`` per JSON-RPC, ``status`` the HTTP status of a modern era."""

    def __init__(self, code, message, status=400, data=None):
        super().__init__(message)
        self.code, self.message, self.status, self.data = code, message, status, data


class ToolError(PharosError):
    """A tool that ran and failed: the agent gets ``isError`` and this text to act on."""


class OutputError(PharosError):
    """Standard output cannot be written: its reader went away, or the disk is full."""

    def __init__(self, error):
        super().__init__(error.strerror or str(error))
        self.error = error


# SECTION: Net — numbers and host:port from outside (ASCII only), loopback, fd limits, BER

def parse_count(text, lo, hi):
    """The whole number ``text`` spells in ASCII digits, if from ``lo`` to ``hi``; else None.

    int() alone would also take '+', '_', spaces and other scripts' digits, and
    str.isdigit() takes '³' and '①', which int() then refuses.
    """
    if not 0 < len(text) <= 20 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if lo <= value <= hi else None


def parse_hostport(text, default_port, what="--listen"):
    """(host, port) from HOST:PORT, [V6]:PORT, :PORT or PORT; UsageError if malformed."""
    host, port = text, str(default_port)
    match = re.fullmatch(r"\[([^\]]+)\](?::([0-9]+))?|([^:]*):([0-9]+)|([0-9]+)|([^:]+)", text)
    if not match:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT")
    v6, v6port, h, p, only_port, only_host = match.groups()
    if v6 is not None:
        host, port = v6, v6port or port
    elif p is not None:
        host, port = h or "0.0.0.0", p
    elif only_port is not None:
        host, port = "0.0.0.0", only_port
    else:
        host = only_host
    number = parse_count(port, 0, 65535)
    if number is None:
        raise UsageError(f"{what} {text!r}: port must be 0-65535")
    return host, number


def is_loopback(host):
    """Whether every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


def format_address(host, port):
    """HOST:PORT for messages, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def raise_fd_limit(wanted, log):
    """Lift the soft open-files limit toward the hard one; return the connections it allows."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted + FD_RESERVE))
    if target != soft and (soft != resource.RLIM_INFINITY):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    allowed = wanted if soft == resource.RLIM_INFINITY else max(1, soft - FD_RESERVE)
    if allowed < wanted:
        log(f"--max-connections {wanted} is more than the open-files limit allows; "
            f"using {allowed}")
    return min(wanted, allowed)


# -- BER/DER elements (TLS certificates, LDAP replies) --

def der_item(data, pos, end):
    """(tag, content start, content end) of the DER item at ``pos``."""
    if pos + 2 > end:
        raise DerError("truncated DER item")
    tag, length, pos = data[pos], data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7f
        if not 0 < count <= 4 or pos + count > end:
            raise DerError("bad DER length")
        length, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
    if pos + length > end:
        raise DerError("DER item runs past its container")
    return tag, pos, pos + length


def der_children(data, start, end):
    """The items inside a constructed DER item's content, as (tag, start, end)."""
    out = []
    while start < end:
        item = der_item(data, start, end)
        out.append(item)
        start = item[2]
    return out


# SECTION: Schema — fields, properties, record rules (new records, provenance, merge)

PERSON, MACHINE = "person", "machine"
RECORD_TYPES = (PERSON, MACHINE)
KEY_FIELD = {PERSON: "alias", MACHINE: "hostname"}
TYPE_OF_KEY = {"alias": PERSON, "hostname": MACHINE}
PROPERTY_ORDER = ("Indexed", "Lookup", "NoMeta", "Public", "LocalPub", "Default", "Always",
                  "Any", "Change", "Sacred", "Turn", "Encrypt", "NoPeople")
FIELD_NAME_RE = LazyRegex(r"[A-Za-z_-]{1,32}\Z")
WORD_SPLIT_RE = LazyRegex(r"[\s,;:/]+")         # qi's delimiters, and / so ssh finds 22/ssh
ALIAS_RE = LazyRegex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")
HOSTNAME_RE = LazyRegex(r"(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})"
                         r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?\Z")
MAC_HEX_RE = LazyRegex(r"[0-9a-f]{12}\Z")
EMAIL_RE = LazyRegex(r"[^\s@]+@[^\s@]+\Z")
URL_RE = LazyRegex(r"(?i)[a-z][a-z0-9+.-]*://\S+\Z")
SERVICE_RE = LazyRegex(r"([0-9]{1,5})/([A-Za-z0-9._+-]{1,32})(?: +(\S.*))?\Z")
TAG_RE = LazyRegex(r"[\w.:/+@-]{1,32}\Z")
# An OpenSSH SHA256 fingerprint (32 bytes, unpadded base64), a key type before it optional.
HOSTKEY_RE = LazyRegex(r"(?:[a-z0-9][a-z0-9@.+-]{0,39} +)?(?i:SHA256):([A-Za-z0-9+/]{43})\Z")
CONTROL_RE = LazyRegex(r"[\x00-\x08\x0b-\x1f\x7f]")
STABLE_LAA_PREFIXES = ("52:54:00", "0a:00:27")  # QEMU/KVM and VirtualBox: stable, not random
MANUAL, DISCOVERY_SOURCES = "manual", ("scan", "pulse")
SOURCES_KEY = "sources"         # a record's provenance map; never a field (see record_sources)


class Field:
    """One field of the schema: its id, limits, properties and validator."""

    __slots__ = ("id", "name", "max", "props", "desc", "types", "multi", "multiline",
                 "server", "check", "words")

    def __init__(self, fid, name, max_len, props, desc, types, *, multi=False,
                 multiline=False, server=False, check=None, words=True):
        self.id, self.name, self.max, self.desc = fid, name, max_len, desc
        self.props = frozenset(props.split())
        self.types = frozenset(types)
        self.multi, self.multiline, self.server, self.check = multi, multiline, server, check
        self.words = words                      # False: matched as whole values only

    def properties(self):
        """The property keywords in qi's fixed order."""
        words = [p for p in PROPERTY_ORDER if p in self.props]
        if PERSON not in self.types and "NoPeople" not in words:
            words.append("NoPeople")
        return " ".join(words)


def clip(value, limit=64):
    """A value to quote in an error: its first ``limit`` characters (the reply line that
    carries the error must stay short, whatever the client sent)."""
    return value if len(value) <= limit else value[:limit] + "..."


def check_alias(value):
    """An alias as given; RecordError unless 1-32 letters, digits, '.', '_' or '-'."""
    if not ALIAS_RE.match(value):
        raise RecordError(f"alias {clip(value)!r} must be 1-32 letters, digits, '.', '_' or '-'")
    return value


def check_hostname(value):
    """A host name as given; RecordError unless it is a valid DNS host name."""
    if not HOSTNAME_RE.match(value):
        raise RecordError(f"hostname {clip(value)!r} is not a valid host name")
    return value


def check_ip(value):
    """An IPv4 or IPv6 address in canonical form; RecordError if it is not one."""
    parts = value.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() and len(p) <= 3 and int(p) < 256
                               and (p[0] != "0" or p == "0") for p in parts):
        return value                    # dotted IPv4, canonical already (most addresses)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise RecordError(f"ip {clip(value)!r} is not an IPv4 or IPv6 address") from None


def check_mac(value):
    """A MAC address as lower-case aa:bb:cc:dd:ee:ff; RecordError if it is not one."""
    digits = re.sub(r"[:.-]", "", value.lower())
    if not MAC_HEX_RE.match(digits) or (":" in value and len(value.split(":")) != 6):
        raise RecordError(f"mac {clip(value)!r} is not a MAC address like aa:bb:cc:dd:ee:ff")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def check_email(value):
    """An email address as given; RecordError unless it looks like name@domain."""
    if not EMAIL_RE.match(value):
        raise RecordError(f"email {clip(value)!r} is not an address like name@example.org")
    return value


def check_url(value):
    """A URL as given; RecordError unless it has a scheme, :// and no spaces."""
    if not URL_RE.match(value):
        raise RecordError(f"url {clip(value)!r} is not a URL like https://example.org/")
    return value


def check_service(value):
    """A service as port/name and an optional detail after a space (22/ssh OpenSSH_9.2p1),
    the name lower-cased; RecordError if malformed."""
    match = SERVICE_RE.match(value)
    port = parse_count(match.group(1), 1, 65535) if match else None
    if port is None:
        raise RecordError(f"service {clip(value)!r} must look like 22/ssh (port/name)")
    detail = f" {match.group(3)}" if match.group(3) else ""
    return f"{port}/{match.group(2).lower()}{detail}"


def check_hostkey(value):
    """An SSH host key fingerprint as ``SHA256:`` and 43 base64 characters, the form
    ``ssh-keygen -lf KEY.pub`` prints; a key type before it (``ssh-ed25519 SHA256:...``) is
    accepted and dropped, since the hash already covers the key's type, so one key has one
    value however it was typed. RecordError for anything else (MD5 fingerprints included)."""
    match = HOSTKEY_RE.match(value)
    digest = match and match.group(1)
    if not digest or base64.b64encode(base64.b64decode(digest + "=")).decode() != digest + "=":
        raise RecordError(f"hostkey {clip(value)!r} must be an SSH fingerprint like "
                          f"SHA256:<43 base64 characters> (ssh-keygen -lf KEY.pub)")
    return "SHA256:" + digest


def is_random_mac(mac):
    """Whether a MAC is locally administered (randomized), known stable prefixes aside."""
    return bool(int(mac[:2], 16) & 0x02) and not mac.startswith(STABLE_LAA_PREFIXES)


def check_tag(value):
    """A tag as given; RecordError unless one word of letters, digits or ._:/+@-."""
    if not TAG_RE.match(value):
        raise RecordError(f"tag {clip(value)!r} must be one word of letters, digits or ._:/+@-")
    return value


def check_type(value):
    """A record type, lower-cased; RecordError unless person or machine."""
    value = value.lower()
    if value not in RECORD_TYPES:
        raise RecordError(f"type must be person or machine, not {clip(value)!r}")
    return value


def check_status(value):
    """A machine status, lower-cased; RecordError unless online, offline or unknown."""
    value = value.lower()
    if value not in ("online", "offline", "unknown"):
        raise RecordError(f"status must be online, offline or unknown, not {clip(value)!r}")
    return value


P, M, PM = (PERSON,), (MACHINE,), (PERSON, MACHINE)
LOOK = "Indexed Lookup Public"
BUILTIN_FIELDS = (
    # id, name, max, properties, description, types, options
    (1, "type", 8, LOOK + " Default", "Record type: person or machine.", PM, {"check": check_type}),
    (2, "alias", 32, LOOK + " Default Change", "Unique name of a person.", P, {"check": check_alias}),
    (3, "name", 64, LOOK + " Default Change", "Full name.", P, {}),
    (4, "nickname", 32, LOOK + " Change", "Other name the person goes by.", P, {}),
    (5, "email", 128, LOOK + " Default Change", "Email address.", P, {"check": check_email}),
    (6, "phone", 32, LOOK + " Default Change", "Office telephone number.", P, {}),
    (7, "mobile", 32, LOOK + " Change", "Mobile telephone number.", P, {}),
    (8, "title", 64, LOOK + " Default Change", "Job title.", P, {}),
    (9, "department", 64, LOOK + " Default Change", "Department or team.", P, {}),
    (10, "office", 128, LOOK + " Change", "Office or postal address.", P, {"multiline": True}),
    (11, "url", 256, LOOK + " Change", "Home page.", P, {"check": check_url}),
    (12, "ssh_key", 900, LOOK + " Change", "SSH public key (one per line).", P, {"multi": True}),
    (13, "hostname", 253, LOOK + " Default Change", "Unique host name of a machine.", M,
     {"check": check_hostname}),
    (14, "ip", 45, LOOK + " Default Change", "IP address (one per line).", M,
     {"multi": True, "check": check_ip}),
    (15, "mac", 17, LOOK + " Default Change", "MAC address (one per line).", M,
     {"multi": True, "check": check_mac, "words": False}),
    (16, "os", 64, LOOK + " Default Change", "Operating system.", M, {}),
    (17, "role", 64, LOOK + " Default Change", "What the machine is for (nas, router, ...).", M, {}),
    (18, "owner", 32, LOOK + " Default Change", "Alias of the person responsible.", M,
     {"check": check_alias}),
    (19, "location", 128, LOOK + " Change", "Where the machine is.", M, {}),
    (20, "vendor", 64, LOOK + " Change", "Manufacturer.", M, {}),
    (21, "model", 64, LOOK + " Change", "Model.", M, {}),
    (22, "serial", 64, LOOK + " Change", "Serial number.", M, {}),
    (23, "services", 40, LOOK + " Change", "Service as port/name, e.g. 22/ssh (one per line).", M,
     {"multi": True, "check": check_service}),
    (24, "tags", 32, LOOK + " Change", "Free-form tag (one per line).", M,
     {"multi": True, "check": check_tag}),
    (25, "status", 8, LOOK + " Default", "online, offline or unknown (set by the server).", M,
     {"server": True, "check": check_status}),
    (26, "last_seen", 20, LOOK, "When the machine was last heard from (set by the server).", M,
     {"server": True, "words": False}),
    (27, "notes", 4000, LOOK + " Change", "Free-form notes.", PM, {"multiline": True}),
    (28, "source", 16, LOOK, "Who created the record: manual, scan or pulse (set by the server).",
     PM, {"server": True}),
    (29, "created", 20, LOOK, "When the record was created (set by the server).", PM,
     {"server": True, "words": False}),
    (30, "modified", 20, LOOK, "When the record last changed (set by the server).", PM,
     {"server": True, "words": False}),
    (31, "tenant", 64, LOOK, "Tenant the record belongs to (enterprise tier; set by the server).",
     PM, {"server": True}),
    (32, "hostkey", 96, LOOK + " Change",
     "SSH host key fingerprint, SHA256:... as ssh-keygen -l prints it (one per line).", M,
     {"multi": True, "check": check_hostkey, "words": False}),
)
CUSTOM_FIELD_FIRST_ID = 100


class Schema:
    """The field table: lookups by name, per-type field lists and record validation."""

    def __init__(self, custom=()):
        self.fields = [Field(fid, name, mx, props, desc, types, **opts)
                       for fid, name, mx, props, desc, types, opts in BUILTIN_FIELDS]
        self.fields.extend(custom)
        self.by_name = {f.name: f for f in self.fields}
        self.defaults = {t: [f for f in self.fields if t in f.types and "Default" in f.props]
                         for t in RECORD_TYPES}
        self.all = {t: [f for f in self.fields if t in f.types] for t in RECORD_TYPES}
        self.multi = frozenset(f.name for f in self.fields if f.multi)
        self.default_width = self.width(f for t in RECORD_TYPES for f in self.defaults[t])
        self.all_width = self.width(self.fields)
        self.return_lists = {}                  # parsed `return a b` clauses, by their words

    @staticmethod
    def width(fields):
        """qi's label width: at least 9, else the longest name plus one."""
        return max([9] + [len(f.name) + 1 for f in fields])

    def field(self, name):
        """The field called ``name`` (case-insensitive), or None."""
        return self.by_name.get(name.lower())

    def types_for(self, name):
        """The record types that have field ``name``."""
        field = self.by_name.get(name)
        return field.types if field else frozenset()

    def clean_value(self, field, value):
        """Validate and normalise one value of ``field``; raise RecordError if refused."""
        value = value.strip()
        if CONTROL_RE.search(value) or ("\n" in value and not field.multiline):
            raise RecordError(f"{field.name} may not contain control characters or line breaks")
        if len(value) > field.max:
            raise RecordError(f"{field.name} is longer than {field.max} characters")
        return field.check(value) if field.check and value else value

    def clean_values(self, field, values):
        """Validate a list of values for ``field``: unique, within MAX_VALUES, non-empty."""
        cleaned = []
        for value in values:
            value = self.clean_value(field, value)
            if value and value not in cleaned:
                cleaned.append(value)
        if len(cleaned) > (MAX_VALUES if field.multi else 1):
            raise RecordError(f"{field.name} takes "
                              + (f"at most {MAX_VALUES} values" if field.multi else "one value"))
        return cleaned

    def build(self, rtype, fields, *, allow_server=False):
        """A record dict of ``rtype`` from {name: [values]}; raise RecordError if refused."""
        record = {"type": rtype}
        for name, values in fields.items():
            field = self.by_name[name]
            if name == "type":
                continue
            if rtype not in field.types:
                raise RecordError(f"{name} is not a field of a {rtype}")
            if field.server and not allow_server:
                raise RecordError(f"{name} is set by the server", code=505)
            cleaned = self.clean_values(field, values)
            if cleaned:
                record[name] = cleaned if field.multi else cleaned[0]
        if not record.get(KEY_FIELD[rtype]):
            key = KEY_FIELD[rtype]
            raise RecordError(f"a {rtype} needs {'an' if key[0] in 'aeiou' else 'a'} {key}")
        return record


def new_record(schema, rtype, fields, now, *, source="manual", tenant="", loaded=False):
    """A new record of ``rtype`` from {field: [values]}, with what the server sets filled in
    (created, modified, source; status for machines): the one rule every way in shares
    (add, load, and later scan and pulse). ``loaded`` keeps server-set fields it is given
    (an offline load of an export); otherwise they are refused. RecordError if refused."""
    record = schema.build(rtype, fields, allow_server=loaded)
    if not loaded:
        with_sources(record, [n for n in record if n != "type"], source)
    if tenant:
        record["tenant"] = tenant
    stamp = utc_now(now)
    record.setdefault("created", stamp)
    record.setdefault("modified", record["created"])
    record.setdefault("source", source)
    if rtype == MACHINE:
        record.setdefault("status", "unknown")
    return record


def infer_type(schema, fields, hint=None):
    """The type a new record is: from type=, the fields it uses, else ``hint`` (the client's
    id); RecordError when that leaves no type, or two."""
    candidates = set(RECORD_TYPES)
    for value in fields.get("type", ()):
        candidates &= {check_type(value.strip())}
    for name in fields:
        candidates &= schema.types_for(name)
    if len(candidates) == 2 and hint:
        candidates = {hint}
    if len(candidates) == 1:
        return candidates.pop()
    if not candidates:
        raise RecordError("these fields do not fit one record type (person or machine)")
    raise RecordError("say type=person or type=machine")


# -- provenance: who set each field last --------------------------------------------

def record_sources(record):
    """{field: "scan" | "pulse"} of ``record``: who set each field last.

    Stored in the record itself as ``record["sources"]``, a plain dict of field name to
    source, in every store alike. Only fields a discovery source (scan, pulse) set last
    have an entry; a field without one is ``manual`` (a person: ph, mdb, import, load),
    as is every field of a record written before provenance was kept. A multi-valued
    field's entry covers all its values: discovery owns the whole list it wrote, so it
    replaces that list (adding and removing only its own values); a person's write to
    the field makes the whole list the person's again. The map is never indexed and is
    shown to Ph clients only when they ask (``return all sources``).
    """
    return record.get(SOURCES_KEY) or {}


def with_sources(record, names, source):
    """``record`` (changed in place) with ``names`` now set by ``source``; fields no longer
    present drop their entry, and an empty map goes."""
    sources = dict(record_sources(record))
    for name in names:
        if source == MANUAL or name not in record:
            sources.pop(name, None)
        else:
            sources[name] = source
    if sources:
        record[SOURCES_KEY] = sources
    else:
        record.pop(SOURCES_KEY, None)
    return record


def valid_sources(value):
    """Whether ``value`` is a provenance map as stored: {field name: scan or pulse}."""
    return type(value) is dict and all(
        type(k) is str and FIELD_NAME_RE.match(k) and v in DISCOVERY_SOURCES
        for k, v in value.items())


def format_sources(sources):
    """A provenance map as one line of text: ``ip=scan services=scan`` (names sorted)."""
    return " ".join(f"{name}={source}" for name, source in sorted(sources.items()))


def parse_sources(text):
    """The provenance map of a ``format_sources`` line; pairs that are not one are skipped."""
    pairs = (word.partition("=") for word in text.split())
    return {name: source for name, _, source in pairs if source in DISCOVERY_SOURCES}


def merge_plan(schema, old, fields, source):
    """What a ``source`` (scan or pulse) write of {field: [values]} changes in ``old``:
    {field: [cleaned values]} of the fields that change; RecordError if a value is refused.

    A blank field is filled; a field ``source`` set last is updated (a multi-valued one
    replaced by the values given); a field a person set, or another source, stays.
    Values that are absent or blank change nothing: discovery never removes a field.
    """
    make, owners = {}, record_sources(old)
    for name, values in fields.items():
        field = schema.by_name[name]
        if MACHINE not in field.types:
            raise RecordError(f"{name} is not a field of a machine")
        cleaned = schema.clean_values(field, values)
        current = old.get(name)
        if not cleaned or (current and owners.get(name, MANUAL) != source):
            continue
        if current != (cleaned if field.multi else cleaned[0]):
            make[name] = cleaned
    return make


def read_ini(path):
    """A ConfigParser holding an INI file; UsageError naming the file if it cannot be read."""
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise UsageError(f"cannot read config {path}: {' '.join(str(e).split())}") from None
    return parser


def parse_custom_fields(path):
    """Custom fields from an INI file: one ``[field NAME]`` section each."""
    parser = read_ini(path)
    fields, builtin = [], {row[1] for row in BUILTIN_FIELDS} | {SOURCES_KEY}
    for fid, section in enumerate(parser.sections(), CUSTOM_FIELD_FIRST_ID):
        fields.append(custom_field(path, fid, section, parser[section], builtin))
    return fields


def custom_field(path, fid, section, options, taken):
    """One custom Field from its config section, or a UsageError naming the problem."""
    kind, _, name = section.partition(" ")
    where = f"{path} [{section}]"
    if kind != "field" or not FIELD_NAME_RE.match(name) or name.lower() != name:
        raise UsageError(f"{where}: sections must be [field NAME], NAME lower-case letters, _ or -")
    if name in taken:
        raise UsageError(f"{where}: field {name} already exists")
    taken.add(name)
    types = options.get("types", "person machine").replace(",", " ").split()
    if not types or set(types) - set(RECORD_TYPES):
        raise UsageError(f"{where}: types must be person, machine or both")
    max_len = parse_count(options.get("max", "128"), 1, 4000)
    if max_len is None:
        raise UsageError(f"{where}: max must be a number from 1 to 4000")
    try:
        multi = options.getboolean("multi", False)
        default = options.getboolean("default", False)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None
    props = LOOK + " Change" + (" Default" if default else "")
    return Field(fid, name, max_len, props, options.get("description", f"{name}."), types,
                 multi=multi)


# SECTION: Protocol — Ph request tokenizer and reply formatting (pure, no I/O)

SEPARATORS = frozenset(("return", "make", "force"))
TOKEN_RE = LazyRegex(r"""(?x)[ \t]*(?:
      ([^ \t"=~]*)([=~])(?:(")((?:[^"\\]|\\.?)*)(?:"|\Z)|([^ \t"]*))   # field=value
    | (")((?:[^"\\]|\\.?)*)(?:"|\Z)                                 # "quoted word"
    | ([^ \t"=~]+)                                                   # word
    )""")
ESCAPE_RE = LazyRegex(r"\\(.?)")
ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "": "\\"}
TELNET_IAC_RE = LazyRegex(rb"(?s)\xff[\xfb-\xfe].|\xff[\xf0-\xfa\xff]")


class Token:
    """One request token: a bare word (field None), a field=value pair, or a separator."""

    __slots__ = ("field", "value", "quoted", "sep")

    def __init__(self, field, value, quoted=False):
        self.field, self.value, self.quoted = field, value, quoted
        self.sep = field is None and not quoted and value.lower() in SEPARATORS

    def __repr__(self):
        return f"Token({self.field!r}, {self.value!r}, {self.quoted!r})"

    def text(self):
        """The token roughly as it was written, for error messages."""
        return self.value if self.field is None else f"{self.field}={self.value}"


def unescape(text):
    """Decode the escapes qi allows inside quotes: \\n, \\t, \\" and \\\\."""
    if "\\" not in text:
        return text
    return ESCAPE_RE.sub(lambda m: ESCAPES.get(m.group(1), "\\" + m.group(1)), text)


def tokenize(text):
    """Split a request (without its line end) into Tokens; never fails."""
    if '"' not in text and "\\" not in text and "~" not in text:
        return [Token(*word.partition("=")[::2]) if "=" in word else Token(None, word)
                for word in text.replace("\t", " ").split(" ") if word]
    tokens = []
    for (name, op, quote, quoted_value, value, word_quote, quoted_word,
         word) in TOKEN_RE.findall(text):
        if op:
            tokens.append(Token(name, unescape(quoted_value), True) if quote
                          else Token(name, value))
        elif word_quote:
            tokens.append(Token(None, unescape(quoted_word), True))
        else:
            tokens.append(Token(None, word))
    return tokens


def clean_request(raw):
    """Bytes of one request line to text: telnet commands, CR and NUL dropped."""
    if b"\xff" in raw:
        raw = TELNET_IAC_RE.sub(b"", raw)
    raw = raw.replace(b"\r", b"").replace(b"\0", b"")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip()


def printable(text, limit=64):
    """Text from a client made safe to echo in a reply line: at most ``limit`` bytes of it.

    Bytes, not characters: a reply line must stay under MAX_REPLY_LINE bytes on the wire.
    """
    safe = "".join(c if c.isprintable() else "?" for c in text[:limit])
    cut = safe.encode()[:limit].decode(errors="ignore")
    return cut + ("..." if len(cut) < len(text) else "")


REPLY_TEXT_ROOM = 240              # characters a reply line's text is cut to: under 1023 bytes


def line(code, text):
    """A final reply line (its text cut short if it would pass MAX_REPLY_LINE bytes)."""
    if len(text) > REPLY_TEXT_ROOM:
        text = printable(text, MAX_REPLY_LINE - 16)
    return f"{code}:{text}\n"


def more(code, text):
    """A continuation reply line (leading '-'), cut short like line()."""
    if len(text) > REPLY_TEXT_ROOM:
        text = printable(text, MAX_REPLY_LINE - 16)
    return f"-{code}:{text}\n"


def plural(count, one, many):
    """``count`` and its noun: ``one`` when the count is 1, else ``many``."""
    return f"{count} {one if count == 1 else many}"


def split_for_wire(prefix, value):
    """Reply lines for one value line, each kept within MAX_REPLY_LINE bytes."""
    if len(prefix) + 4 * len(value) < MAX_REPLY_LINE:
        return [f"{prefix}{value}\n"]
    room = MAX_REPLY_LINE - len(prefix.encode()) - 1
    data, out = value.encode(), []
    while data:
        cut = min(room, len(data))
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        out.append(f"{prefix}{data[:cut].decode()}\n")
        data = data[cut:]
    return out


def field_lines(index, label, value):
    """Reply lines of one field of one entry: the label repeated on every line."""
    prefix = f"-200:{index}:{label}: "
    values = value if isinstance(value, list) else [value]
    out = []
    for item in values:
        for part in item.split("\n"):
            out.extend(split_for_wire(prefix, part))
    return out


def format_entry(index, record, fields, width, explicit):
    """Reply lines of one query entry; ``explicit`` adds qi's -508 lines for absent fields."""
    out, get = [], record.get
    for field in fields:
        value = get(field.name)
        if value:
            if type(value) is str and len(value) < 200 and "\n" not in value:
                out.append(f"-200:{index}:{field.name.rjust(width)}: {value}\n")
            else:
                out.extend(field_lines(index, field.name.rjust(width), value))
        elif explicit:
            out.append(f"-508:{index}:{field.name.rjust(width)}: Not present in entry.\n")
    return out


def format_fields(fields):
    """The ``fields`` reply body: two lines per field, id as index, name unpadded."""
    out = []
    for f in fields:
        out.append(f"-200:{f.id}:{f.name}:max {f.max} {f.properties()}\n")
        types = ("people and machines" if len(f.types) == 2
                 else "people" if PERSON in f.types else "machines")
        desc = f"{f.desc} ({types}{', multi-valued' if f.multi else ''})"
        out.extend(f"-200:{f.id}:{f.name}:{part}\n" for part in desc.split("\n"))
    return out


def count_line(count):
    """The 102 line saying how many entries match (was/were agreeing with ``count``)."""
    if count == 1:
        return "102:There was 1 match to your request.\n"
    return f"102:There were {count} matches to your request.\n"


# SECTION: Query — query plans, the inverted index, bounded searches

META_CHARS = frozenset("*?[")


class Term:
    """One selection: a lower-cased pattern on a field (None: the bare-word fields)."""

    __slots__ = ("field", "pattern", "regex", "prefix", "prefix_only")

    def __init__(self, field, pattern):
        self.field = field
        self.pattern = pattern.lower()
        self.regex = None
        self.prefix = self.pattern
        self.prefix_only = False
        if META_CHARS.intersection(self.pattern):
            cut = min(i for i, c in enumerate(self.pattern) if c in META_CHARS)
            self.prefix = self.pattern[:cut]
            self.prefix_only = self.pattern == self.prefix + "*" and bool(self.prefix)
            self.regex = (PrefixMatch(self.prefix) if self.prefix_only
                          else wildcard_regex(self.pattern))

    def is_key(self):
        """qi's rule for a usable key: two or more characters, not all wildcards."""
        return len(self.pattern) >= 2 and bool(set(self.pattern) - META_CHARS)

    def matches_value(self, value, keys_of=None):
        """Whether the pattern matches a stored value as a whole or any word of it."""
        return any(self.matches_key(k) for k in (keys_of or value_keys)(value))

    def matches_key(self, key):
        """Whether the pattern matches one index key (equal, or by its wildcards)."""
        return self.regex.match(key) is not None if self.regex else key == self.pattern


class PrefixMatch:
    """A stand-in for a compiled pattern of the form `prefix*`: no regex needed."""

    __slots__ = ("prefix",)

    def __init__(self, prefix):
        self.prefix = prefix

    def match(self, key):
        """True (like a match object) when ``key`` starts with the prefix, else None."""
        return True if key.startswith(self.prefix) else None


@functools.lru_cache(maxsize=1024)
def wildcard_regex(pattern):
    """The compiled regex of a wildcard pattern (* ? [a-z])."""
    return re.compile(fnmatch.translate(pattern), re.S)


def value_keys(value):
    """The index keys of one stored value: the whole value and each word, lower-cased.

    A value that is lower-case already is its own key (one string, not two).
    """
    lower = value.lower()
    if lower == value:
        lower = value
    words = WORD_SPLIT_RE.split(lower)
    if len(words) == 1:
        return words
    keys = set(words)
    keys.discard("")
    keys.add(lower)
    return keys


def whole_value_key(value):
    """The one index key of a value matched only as a whole (timestamps, MACs); like
    value_keys, a value already lower-case is its own key."""
    lower = value.lower()
    return (value if lower == value else lower,)


class Selection:
    """Parsed selection terms plus the record types they can match."""

    def __init__(self, terms, types):
        self.terms, self.types = terms, types

    def has_key(self):
        """Whether any term is usable as a key (qi's rule, see Term.is_key)."""
        return any(t.is_key() for t in self.terms)


BARE_FIELDS = {PERSON: ("name", "nickname"), MACHINE: ("hostname",)}


def parse_selection(schema, tokens, hint=None):
    """Terms from selection tokens and the types they can match; returns (Selection, errors).

    The fields used decide the record type; only when they do not does ``hint`` (the type
    the client's id names) narrow the search.
    """
    terms, errors, types = [], [], frozenset(RECORD_TYPES)
    for token in tokens:
        if token.field is None:
            terms.append(Term(None, token.value))
            continue
        if not token.field:
            errors.append(more(599, "=:No field or value specified."))
            continue
        field = schema.field(token.field)
        if field is None:
            errors.append(more(507, f"{printable(token.field)}:unknown field."))
            continue
        if "Lookup" not in field.props:
            errors.append(more(504, f"{field.name}:you may not use this field for lookup."))
            continue
        if field.name == "type":
            term = Term(field, token.value)
            types = types & {t for t in RECORD_TYPES if term.matches_key(t)}
        types = types & field.types
        terms.append(Term(field, token.value))
    if len(terms) > MAX_QUERY_TERMS:
        errors.append(more(599, f"Too many terms in query (limit {MAX_QUERY_TERMS})."))
    if hint and len(types) == len(RECORD_TYPES):
        types = frozenset((hint,))
    return Selection(terms, frozenset(types)), errors


POSTING_ARRAY_MIN = 16      # a posting this long becomes a sorted array (4 bytes an id)


def posting_add(postings, key, rid):
    """Post ``rid`` under ``key``."""
    current = postings.get(key)
    if current is None:
        postings[key] = rid
    elif type(current) is int:
        if current != rid:
            postings[key] = {current, rid}
    elif type(current) is set:
        current.add(rid)
        if len(current) >= POSTING_ARRAY_MIN:
            postings[key] = array.array("I", sorted(current))
    elif rid > current[-1]:                     # a new record: the highest id yet
        current.append(rid)
    else:
        at = bisect.bisect_left(current, rid)
        if at == len(current) or current[at] != rid:
            current.insert(at, rid)


def posting_remove(postings, key, rid):
    """Take ``rid`` out of the posting of ``key``; a posting left with one id becomes that int."""
    current = postings.get(key)
    if current is None:
        return
    if type(current) is int:
        if current == rid:
            del postings[key]
        return
    if type(current) is set:
        current.discard(rid)
    else:
        at = bisect.bisect_left(current, rid)
        if at < len(current) and current[at] == rid:
            del current[at]
    if len(current) == 1:
        postings[key] = current[0] if type(current) is array.array else next(iter(current))


def posting_has(posting, rid):
    """Whether a posting (None, int, set or sorted array) holds ``rid``."""
    if posting is None:
        return False
    if type(posting) is int:
        return posting == rid
    if type(posting) is set:
        return rid in posting
    at = bisect.bisect_left(posting, rid)
    return at < len(posting) and posting[at] == rid


def posting_size(posting):
    """How many ids a posting holds (0 for None)."""
    return 0 if posting is None else 1 if type(posting) is int else len(posting)


def intersect(ids, posting):
    """The ids of set ``ids`` that ``posting`` holds too (a new set)."""
    if type(posting) is set:
        return ids & posting
    return {rid for rid in ids if posting_has(posting, rid)}


def as_set(posting):
    """A posting's ids as a set (the live set itself when it is one; do not change it)."""
    if posting is None:
        return set()
    if type(posting) is int:
        return {posting}
    return posting if type(posting) is set else set(posting)


class FieldIndex:
    """Postings of one field: key -> one id (int), a set of ids, or, for long postings, a
    sorted array of ids; and sorted keys for wildcards.

    The sorted key list is built on the first wildcard search; keys added after that wait
    in ``fresh`` until there are enough of them to be worth a rebuild.
    """

    __slots__ = ("postings", "sorted", "fresh", "keys_of")

    def __init__(self, keys_of=value_keys):
        self.postings = {}
        self.sorted = None
        self.fresh = set()
        self.keys_of = keys_of

    def add(self, keys, rid):
        """Post record ``rid`` under each of ``keys``."""
        postings = self.postings
        for key in keys:
            current = postings.get(key)
            if current is None:
                postings[key] = rid
                if self.sorted is not None:
                    self.fresh.add(key)
            elif type(current) is set and len(current) < POSTING_ARRAY_MIN - 1:
                current.add(rid)
            elif type(current) is array.array and rid > current[-1]:
                current.append(rid)
            else:
                posting_add(postings, key, rid)

    def add_ids(self, key, rids):
        """Post each of ``rids`` (a list) under ``key`` at once (the bulk load's way)."""
        postings = self.postings
        current = postings.get(key)
        if current is None and self.sorted is not None:
            self.fresh.add(key)
        if type(current) is array.array and rids[0] > current[-1] and rids == sorted(rids):
            current.extend(rids)
            return
        ids = set(rids)
        if current is not None:
            ids.update(as_set(current))
        if len(ids) == 1:
            postings[key] = rids[0]
        elif len(ids) < POSTING_ARRAY_MIN:
            postings[key] = ids
        else:
            postings[key] = array.array("I", sorted(ids))

    def posting(self, key):
        """The posting of ``key`` as stored: None, an id, a set or a sorted array."""
        return self.postings.get(key)

    def count(self, key):
        """How many records are posted under ``key``."""
        return posting_size(self.postings.get(key))

    def candidates(self, prefix):
        """Keys that start with ``prefix`` (may include keys no longer present)."""
        if self.sorted is None or len(self.fresh) > max(1000, len(self.sorted) >> 3):
            self.sorted = sorted(self.postings)
            self.fresh = set()
        keys = self.sorted
        if prefix:
            start = bisect.bisect_left(keys, prefix)
            stop = bisect.bisect_left(keys, prefix + "\U0010ffff", start)
            yield from keys[start:stop]
        else:
            yield from keys
        yield from [k for k in self.fresh if k.startswith(prefix)]   # a copy: a search may
        # resume on a later turn, after writes changed ``fresh``

    def search(self, term):
        """Ids whose value (or a word of it) matches the term: a posting for an exact term,
        else a new set."""
        if term.regex is None:
            return self.postings.get(term.pattern)
        found, match = set(), None if term.prefix_only else term.regex.match
        for key in self.candidates(term.prefix):
            if match is None or match(key):
                posting = self.postings.get(key)
                if posting is not None:
                    if type(posting) is int:
                        found.add(posting)
                    else:
                        found.update(posting)
        return found


class Directory:
    """Records by id, the unique keys and the inverted index; pure in-memory state."""

    def __init__(self, schema):
        self.schema = schema
        self.records = {}
        self.keys = {}                      # (tenant, type) -> {key lower-cased: id}
        self.index = {f.name: FieldIndex(value_keys if f.words else whole_value_key)
                      for f in schema.fields}
        self.next_id = 1

    def __len__(self):
        return len(self.records)

    def count(self, rtype):
        """How many records of type ``rtype`` there are."""
        return self.index["type"].count(rtype)

    def key_owner(self, rtype, key, tenant=""):
        """The id of the ``rtype`` record keyed ``key`` in ``tenant`` (any case), or None."""
        return self.keys.get((tenant, rtype), {}).get(key.lower())

    def key_slot(self, record):
        """The {key: id} map of a record's tenant and type, and its key lower-cased (the
        record's own string when that is lower-case already)."""
        rtype = record["type"]
        key, scope = record[KEY_FIELD[rtype]], (record.get("tenant", ""), rtype)
        lower = key.lower()
        slots = self.keys.get(scope)
        if slots is None:
            slots = self.keys[scope] = {}
        return slots, key if lower == key else lower

    def put(self, rid, record):
        """Insert or replace record ``rid``; records are never mutated in place."""
        old = self.records.get(rid)
        if old is not None:
            self._unindex(rid, old)
        self.insert(rid, record)
        return old

    def insert(self, rid, record, pending=None, common=None):
        """Store record ``rid`` (not present yet) under its unique key and post it under the
        index keys of its values.

        At start-up, values of the fields in ``pending`` ({field: {value: [ids]}}) become
        one string each via ``common`` and wait there for ``post_many``.
        """
        self.records[rid] = record
        slots, key = self.key_slot(record)
        slots[key] = rid
        index = self.index
        for name, value in record.items():
            if pending is not None:
                by_value = pending.get(name)
                if by_value is not None:
                    value = record[name] = common.setdefault(value, value)
                    rids = by_value.get(value)
                    if rids is None:
                        by_value[value] = [rid]
                    else:
                        rids.append(rid)
                    continue
            fidx = index.get(name)
            if fidx is not None:
                if type(value) is list:
                    for item in value:
                        fidx.add(fidx.keys_of(item), rid)
                else:
                    fidx.add(fidx.keys_of(value), rid)
        if rid >= self.next_id:
            self.next_id = rid + 1

    def post_many(self, pending):
        """Index what ``put`` left out: {field: {value: [ids]}}; empties ``pending``."""
        for name, by_value in pending.items():
            fidx = self.index[name]
            for value, rids in by_value.items():
                for key in fidx.keys_of(value):
                    fidx.add_ids(key, rids)
            by_value.clear()

    def drop(self, rid):
        """Remove record ``rid`` and its index entries; return the old record or None."""
        old = self.records.pop(rid, None)
        if old is not None:
            self._unindex(rid, old)
        return old

    def _unindex(self, rid, record):
        slots, key = self.key_slot(record)
        slots.pop(key, None)
        for name, value in record.items():
            fidx = self.index.get(name)
            if fidx is None:
                continue
            for item in (value if type(value) is list else (value,)):
                for key in fidx.keys_of(item):
                    posting_remove(fidx.postings, key, rid)

    def term_matches(self, term, record):
        """Whether ``record`` itself matches ``term`` (checked on its values, not the index)."""
        if term.field is not None:
            names = (term.field.name,)
        else:
            names = BARE_FIELDS[record["type"]]
        for name in names:
            value, keys_of = record.get(name), self.index[name].keys_of
            for item in (value if type(value) is list else (value,) if value else ()):
                if term.matches_value(item, keys_of):
                    return True
        return False

    def term_holds(self, term, rid, record):
        """Whether record ``rid`` (``record``, as it is now) matches ``term``: by the postings
        for an exact term, by its values for a wildcard."""
        if term.regex is not None:
            return self.term_matches(term, record)
        names = (term.field.name,) if term.field is not None else BARE_FIELDS[record["type"]]
        index = self.index
        return any(posting_has(index[name].postings.get(term.pattern), rid) for name in names)

    @staticmethod
    def sort_key(record):
        """Human order: people before machines, then by key ignoring case."""
        rtype = record["type"]
        return (rtype != PERSON, record[KEY_FIELD[rtype]].lower())


def posting_ids(postings):
    """Each id of ``postings`` in turn, a posting copied when reached (a search may resume on
    a later turn, after writes changed it)."""
    for posting in postings:
        if type(posting) is int:
            yield posting
        elif posting is not None:
            yield from (posting[:] if type(posting) is array.array else tuple(posting))


class Search:
    """The matching of one selection, a bounded number of steps at a time (``run``).

    Posting sizes decide first: a selection surely matching more than ``limit`` records is
    refused with no step taken. Otherwise one source (the smallest exact posting, else the
    keys of one wildcard) yields candidates, each checked against every term on the record
    as it is when its turn comes (a record gone since is skipped), and the search stops at
    ``limit`` + 1 hits; nothing is sorted until the end.
    """

    def __init__(self, directory, selection, tenant=None, limit=None):
        self.directory, self.tenant, self.limit = directory, tenant, limit
        self.types = selection.types
        self.terms = [t for t in selection.terms if t.field is None or t.field.name != "type"]
        self.hits, self.too_many, self.done = [], False, False
        self.driver, self.seen, self.resumed = None, None, False
        self.plain = None               # a lone exact term's postings: the plain lookup
        terms = selection.terms
        if len(terms) == 1 and self.types and self.looked_up(terms[0]):
            self.rest = []
            return
        self.source = self.plan() if self.types and terms else iter(())
        self.rest = [t for t in self.terms if t is not self.driver]   # checked per candidate

    def looked_up(self, term):
        """Whether a lone term was answered at once: an exact one on one field whose
        posting fits in one run (the commonest query: a name, an alias, a host), or one
        that surely matches more than ``limit``. Nothing is planned for either."""
        field = term.field
        if field is None or field.name == "type":
            return False
        if term.regex is not None:
            return self.wildcard_looked_up(term, self.directory.index[field.name])
        posting = self.directory.index[field.name].postings.get(term.pattern)
        size = posting_size(posting)
        if (self.limit is not None and size > self.limit and self.tenant is None
                and field.types <= self.types):
            self.too_many = self.done = True
            self.source = iter(())
            return True
        if size > SEARCH_STEPS:
            return False
        self.driver = term
        self.lookup([posting])
        return True

    def wildcard_looked_up(self, term, fidx):
        """Whether a lone wildcard term on one field was answered at once: the keys it
        matches and their postings fit in one run (a search spends about as much)."""
        keys = list(itertools.islice(fidx.candidates(term.prefix), SEARCH_STEPS + 1))
        if len(keys) > SEARCH_STEPS:
            return False
        match, get = None if term.prefix_only else term.regex.match, fidx.postings.get
        postings = [get(key) for key in keys if match is None or match(key)]
        if sum(map(posting_size, postings)) > SEARCH_STEPS:
            return False
        self.driver = term
        self.lookup(postings)
        return True

    def postings(self, term):
        """(postings, typed) of an exact term (None: the type postings): where its hits
        are, and whether every record posted there is of a type searched for."""
        index, schema = self.directory.index, self.directory.schema
        if term is None:
            return [index["type"].posting(t) for t in self.types], True
        field = term.field
        if field is not None:               # one field: the common case, without the lists
            return [index[field.name].postings.get(term.pattern)], field.types <= self.types
        names = self.field_names(term)
        typed = all(schema.field(n).types <= self.types for n in names)
        return [index[n].posting(term.pattern) for n in names], typed

    def plan(self):
        """The candidates' source; refuses at once (too_many) when the sizes say so."""
        exact = [t for t in self.terms if t.regex is None]
        if exact or not self.terms:
            if len(exact) == 1:             # the common lookup: nothing to choose between
                self.driver, (postings, typed) = exact[0], self.postings(exact[0])
            else:
                found = [(t, *self.postings(t)) for t in exact or (None,)]
                self.driver, postings, typed = min(
                    found, key=lambda f: sum(map(posting_size, f[1])))
            sizes = [posting_size(p) for p in postings]
            sure = max(sizes) if typed and len(self.terms) <= 1 and self.tenant is None else 0
            if self.limit is not None and sure > self.limit:
                self.too_many, self.done = True, True
                return iter(())
            if len(self.terms) == 1 and len(exact) == 1:
                self.plain = (postings, sum(sizes))
            if len(postings) > 1:
                self.seen = set()
            return posting_ids(postings)
        terms = self.terms
        self.driver = terms[0] if len(terms) == 1 else min(terms, key=self.key_count)
        self.seen = set()
        return self.wildcard_ids(self.driver)

    def field_names(self, term):
        """The fields a term searches: its own, or the bare-word fields of the types."""
        if term.field is not None:
            return [term.field.name]
        return [name for rtype in self.types for name in BARE_FIELDS[rtype]]

    def fields_of(self, term):
        """The FieldIndexes a term searches."""
        return [self.directory.index[name] for name in self.field_names(term)]

    def key_count(self, term):
        """About how many index keys a wildcard term's prefix leaves to look at."""
        return sum(sum(1 for _ in itertools.islice(fidx.candidates(term.prefix), 4096))
                   for fidx in self.fields_of(term))

    def wildcard_ids(self, term):
        """Ids posted under the keys ``term`` matches; None for each key looked at (a step)."""
        match = None if term.prefix_only else term.regex.match
        for fidx in self.fields_of(term):
            for key in fidx.candidates(term.prefix):
                yield None
                if match is None or match(key):
                    yield from posting_ids((fidx.postings.get(key),))

    def run(self, steps=SEARCH_STEPS):
        """Spend about ``steps`` term checks (a candidate costs one per term, so a turn of
        many wildcard terms stays short); True once the search is over."""
        if self.done:
            return True
        hits, limit, holds, n = self.hits, self.limit, self.holds, 0
        steps = max(1, steps // max(1, len(self.terms)))
        if self.plain is not None and not self.resumed and self.plain[1] <= steps:
            return self.lookup(self.plain[0])
        for n, rid in enumerate(itertools.islice(self.source, steps), 1):
            if rid is not None and holds(rid):
                hits.append(rid)
                if limit is not None and len(hits) > limit:
                    self.too_many, self.done, self.source = True, True, iter(())
                    return True
        self.resumed, self.rest = True, self.terms    # postings may change before the next run
        self.done = n < steps
        return self.done

    def lookup(self, postings):
        """A plain lookup (one term, whose postings fit in this run) in one go: their ids
        of the types searched and in the tenant, as holds() would pass them."""
        if len(postings) == 1:
            ids = postings[0]
            ids = () if ids is None else (ids,) if type(ids) is int else ids
        else:
            ids = set().union(*(as_set(p) for p in postings if p is not None))
        records, types, tenant = self.directory.records, self.types, self.tenant
        hits = []
        for rid in ids:
            record = records.get(rid)
            if record is not None and record["type"] in types and (
                    tenant is None or record.get("tenant", "") == tenant):
                hits.append(rid)
        if self.limit is not None and len(hits) > self.limit:
            self.too_many, hits = True, []
        self.hits, self.done, self.source = hits, True, iter(())
        return True

    def holds(self, rid):
        """Whether candidate ``rid`` is a hit: there, of a type searched, in the tenant,
        matching every term (its source's too, once records may have changed)."""
        record = self.directory.records.get(rid)
        if record is None or record["type"] not in self.types:
            return False
        seen = self.seen
        if seen is not None:
            if rid in seen:
                return False
            seen.add(rid)
        if self.tenant is not None and record.get("tenant", "") != self.tenant:
            return False
        rest = self.rest
        if not rest:
            return True
        term_holds = self.directory.term_holds
        return all(term_holds(t, rid, record) for t in rest)

    def complete(self):
        """Run to the end in one go (offline work, and writes planned on the pending state);
        the hits in order."""
        while not self.run():
            pass
        return self.ordered()

    def ordered(self):
        """The hits in human order (see Directory.sort_key)."""
        if len(self.hits) < 2:
            return list(self.hits)
        records, sort_key = self.directory.records, Directory.sort_key
        return sorted(self.hits, key=lambda rid: sort_key(records[rid]))


# SECTION: Metrics — counters, histograms, /proc readings and the Prometheus text format

LATENCY_BUCKETS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 1.0)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Counts per bucket (not cumulative, so a reader never sees count < a bucket) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value):
        """Count ``value`` in the first bucket whose bound is at least it; add it to the sum."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Metrics:
    """Everything the server counts; plain numbers updated on the event loop."""

    def __init__(self):
        self.requests = {}                      # (command, class) -> count
        self.latency = {}                       # command -> Histogram
        self.connections_total = 0
        self.connections_refused = 0
        self.logins = {"ok": 0, "failed": 0}

    def observe(self, command, code_class, seconds):
        """Count one request of ``command`` by reply class and record how long it took."""
        key = (command, code_class)
        self.requests[key] = self.requests.get(key, 0) + 1
        histogram = self.latency.get(command)
        if histogram is None:
            histogram = self.latency[command] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)


def prom_escape(value):
    """A label value escaped for the Prometheus text format (backslash, newline, quote)."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prom_number(value):
    """A sample value as Prometheus text, with +Inf, -Inf and NaN spelled its way."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"inf": "+Inf", "-inf": "-Inf"}.get(str(value), "NaN")
        return repr(value)
    return str(value)


def prom_bound(bound):
    """One fixed text per bucket bound: le is a label, so "5" and "5.0" would differ."""
    text = f"{bound:.6f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def prom_labels(labels):
    """The {k="v",...} text of (name, value) label pairs, or "" when there are none."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{prom_escape(v)}"' for k, v in labels) + "}"


def prom_family(out, name, kind, help_text, samples):
    """Append one metric family: HELP, TYPE, then its samples [(labels, value)]."""
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
    for labels, value in samples:
        out.append(f"{name}{prom_labels(labels)} {prom_number(value)}\n")


def prom_histograms(out, name, help_text, series):
    """Append a histogram family from [(labels, Histogram)]."""
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
    for labels, histogram in series:
        counts, total = list(histogram.counts), 0
        for bound, count in zip(histogram.bounds, counts):
            total += count
            out.append(f"{name}_bucket{prom_labels(labels + (('le', prom_bound(bound)),))} "
                       f"{total}\n")
        total += counts[-1]
        out.append(f"{name}_bucket{prom_labels(labels + (('le', '+Inf'),))} {total}\n")
        out.append(f"{name}_sum{prom_labels(labels)} {prom_number(histogram.sum)}\n")
        out.append(f"{name}_count{prom_labels(labels)} {total}\n")


def process_stats():
    """The standard process_* values, from /proc on Linux (os.times elsewhere)."""
    import resource
    stats = {"cpu": sum(os.times()[:2]), "max_fds": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(x.split()[1]) for x in f if x.startswith("btime "))
        ticks = os.sysconf("SC_CLK_TCK")
        stats["cpu"] = (int(fields[11]) + int(fields[12])) / ticks
        stats["start"] = btime + int(fields[19]) / ticks
        stats["rss"] = int(fields[21]) * resource.getpagesize()
        stats["open_fds"] = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    if stats["max_fds"] == resource.RLIM_INFINITY:
        stats["max_fds"] = float("inf")
    return stats


def render_process(out, stats):
    """Append the standard process_* families for the readings present in ``stats``."""
    for key, name, kind, help_text in (
            ("cpu", "process_cpu_seconds_total", "counter",
             "Total user and system CPU time spent in seconds."),
            ("rss", "process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
            ("open_fds", "process_open_fds", "gauge", "Number of open file descriptors."),
            ("max_fds", "process_max_fds", "gauge", "Maximum number of open file descriptors."),
            ("start", "process_start_time_seconds", "gauge",
             "Start time of the process since unix epoch in seconds.")):
        if key in stats:
            prom_family(out, name, kind, help_text, [((), stats[key])])


# SECTION: Loop — Later, the event loop's selector, error handler and runner

class Later:
    """A result not ready yet: a write waiting for its fsync, a refused login waiting out
    its delay. Settling it runs its callbacks at once, in the same turn of the event loop,
    so a write is answered right after its fsync, with no task and no extra turn. A task
    may also await it; an exception as the value is raised there.
    """

    __slots__ = ("settled", "value", "callbacks")

    def __init__(self):
        self.settled, self.value, self.callbacks = False, None, []

    @classmethod
    def now(cls, value):
        """A Later settled already with ``value``."""
        later = cls()
        later.settled, later.value = True, value
        return later

    def then(self, callback):
        """Call ``callback(value)`` once settled (now, if it is)."""
        if self.settled:
            callback(self.value)
        else:
            self.callbacks.append(callback)

    def settle(self, value=None):
        """Set the value and run the callbacks; one that breaks is reported, not spread."""
        self.settled, self.value = True, value
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            try:
                callback(value)
            except Exception as e:
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "a callback of a settled result failed", "exception": e})

    def map(self, fn):
        """A Later of ``fn(value)``; if ``fn`` raises, its value is the exception."""
        later = Later()

        def apply(value):
            try:
                value = fn(value)
            except Exception as e:
                value = e
            later.settle(value)
        self.then(apply)
        return later

    def __await__(self):
        if not self.settled:
            future = asyncio.get_running_loop().create_future()
            self.then(future.set_result)
            yield from future
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class LoopErrors:
    """An event-loop exception handler that logs one line per kind of error per minute."""

    def __init__(self, log):
        self.log, self.last = log, {}

    def __call__(self, loop, context):
        error = context.get("exception")
        kind = type(error).__name__ if error else context.get("message", "error")
        now = time.monotonic()
        if now - self.last.get(kind, -60.0) < 60.0:
            return
        self.last[kind] = now
        detail = f": {error}" if error else ""
        self.log(f"{context.get('message', 'event loop error')}{detail} "
                 f"(repeats of this are not logged for a minute)")


class PollingSelectorCore:
    """The server loop's selector (made by polling_selector_class on the platform's default
    selector): before it sleeps, it keeps looking for ``window`` seconds.

    A CPU that has gone idle takes tens of µs to wake, far more on a virtual machine, and
    a client with one request outstanding (every Ph client) sends its next one a few tens
    of µs after its reply. If it comes within the window the server is still awake, and
    on this kind of traffic the latency falls by a third or more. The loop asks for a
    wait only when it has nothing to run, so the cost is at most one window per wake-up.
    """

    def __init__(self, window):
        super().__init__()
        self.window = window

    def select(self, timeout=None):
        """Ready (key, events) pairs: at once if any, else after polling, else after a wait."""
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        clock = time.perf_counter
        start = clock()
        deadline = start + (self.window if timeout is None else min(self.window, timeout))
        while clock() < deadline:
            ready = super().select(0)
            if ready:
                return ready
        if timeout is not None:
            timeout = max(0.0, timeout - (clock() - start))
        return super().select(timeout)


@functools.cache
def polling_selector_class():
    """PollingSelector: PollingSelectorCore on selectors.DefaultSelector, made on first use."""
    return type("PollingSelector", (PollingSelectorCore, selectors.DefaultSelector), {})


def run_loop(main, busy_poll):
    """Run coroutine ``main`` like asyncio.run, on a loop that polls for ``busy_poll``
    seconds before it sleeps. Polling needs a second CPU (on one it only delays the
    client) and asyncio.Runner (Python 3.11); without either it is a plain loop."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if busy_poll <= 0 or (cpus or 1) < 2 or not hasattr(asyncio, "Runner"):
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(
            polling_selector_class()(busy_poll))) as runner:
        return runner.run(main)


# SECTION: Storage — the Store interface; MemoryStore and the writes not yet durable

# The Store interface: what the service, the Ph server, the HTTP app and the CLI may call.
# The contract suite in tests/test_store.py runs against each store (memory and file there,
# LDAP in tests/test_ldap.py against a real slapd).
#
#   open() -> store            load what is kept (files, a directory) into the index
#   close()                    (async) finish the writes in flight, let go of resources
#   describe() -> text         what the start-up log calls it: memory, file DIR, ldap://…
#   size(), count(type)        how many durable records there are (of a type)
#   unwritable() -> why|None   why a write would fail now (readiness asks this)
#   readonly                   set (to the reason) once the store takes no more writes
#   get(id), records()         a durable record by id; all of them, for counts
#   search(selection, tenant, limit) -> Search   a bounded search, run a turn at a time
#   select(selection, tenant)  the ids a search finds, run to the end
#   key_owner(type, key, tenant)                  the durable record called key
#   planned(id), select_planned(...), planned_owner(...)
#                              the same as the writes not yet durable leave things: what
#                              a change, a delete and a uniqueness check must plan on
#   plan_add(type, fields, now, source, tenant), plan_change(ids, make, now, source)
#                              -> ops: (id, record or None) pairs; RecordError if refused
#   commit(ops, audit) -> Later                 settled with None once durable, else the
#                                                StoreError that says why not
#   attach_audit(log), metrics(out, now), add_offline(record)
#
# How a write travels. A Ph `add` line reaches PhSession.ph_add, which parses the tokens
# and asks the DirectoryService for the ops (it decides, infers the type, applies the
# tenant, checks the key against the pending writes). store.commit(ops) then gives each
# write a sequence number, holds it as pending (planned on, not yet shown), and queues its
# journal line; at the loop's next turn the JournalWriter writes the whole queue as one
# batch and fsyncs it once (on the loop when fsync is quick, else in its thread), then
# reports the batch's one outcome to the store (journal_settled): each write goes into
# the index as its Later settles, and the connection writes `200:Ok.` from that callback,
# in the same turn. So nobody sees a write before its writer is told it is durable, and
# a failed fsync leaves the index as it was and turns the store read-only.

class PendingWrites:
    """What the writes not yet durable will make of the directory: the records they touch,
    the unique keys they take or free, the next id.

    Writes are planned against it, so a second add of a key waits for no fsync to be
    refused and two changes to one record compose; readers see only the directory,
    which takes each write once it is durable.
    """

    def __init__(self, directory):
        self.directory = directory
        self.records = {}       # id -> (seq of the newest pending write to it, record or None)
        self.keys = {}          # (tenant, type, key lower-cased) -> (seq, id or None)
        self.next_id = 0

    def record(self, rid):
        """Record ``rid`` as the pending writes leave it, or None."""
        held = self.records.get(rid)
        return self.directory.records.get(rid) if held is None else held[1]

    def key_owner(self, rtype, key, tenant=""):
        """The id that will own ``key`` once the pending writes are durable, or None."""
        held = self.keys.get((tenant, rtype, key.lower()))
        return self.directory.key_owner(rtype, key, tenant) if held is None else held[1]

    def new_id(self):
        """The id the next add takes."""
        return max(self.directory.next_id, self.next_id)

    def hold(self, seq, ops):
        """Note write ``seq``'s ops (in journal order, after every write held before)."""
        for rid, record in ops:
            old = self.record(rid)
            if old is not None:
                self.keys[key_scope(old)] = (seq, None)
            if record is not None:
                self.keys[key_scope(record)] = (seq, rid)
            self.records[rid] = (seq, record)
            self.next_id = max(self.next_id, rid + 1)

    def release(self, seq, ops, undo):
        """Write ``seq`` is in the directory: forget what no later pending write holds."""
        records, keys = self.records, self.keys
        for rid, record in ops + undo:
            if records.get(rid, (None,))[0] == seq:
                del records[rid]
            if record is not None and keys.get(key_scope(record), (None,))[0] == seq:
                del keys[key_scope(record)]

    def drop(self):
        """Every pending write failed: the directory is what they leave."""
        self.records, self.keys, self.next_id = {}, {}, 0

    def select(self, selection, tenant=None):
        """Ids matching ``selection`` as the pending writes leave the records, in order."""
        ids, held = Search(self.directory, selection, tenant).complete(), self.records
        if not held:
            return ids
        hits = [rid for rid in ids if rid not in held]
        hits += [rid for rid, (_, record) in held.items()
                 if record is not None and self.matches(selection, record, tenant)]
        hits.sort(key=lambda rid: Directory.sort_key(self.record(rid)))
        return hits

    def matches(self, selection, record, tenant):
        """Whether ``record`` is one ``Directory.select`` would find for ``selection``."""
        if record["type"] not in selection.types or not selection.terms or (
                tenant is not None and record.get("tenant", "") != tenant):
            return False
        return all(self.directory.term_matches(term, record) for term in selection.terms
                   if term.field is None or term.field.name != "type")


def key_scope(record):
    """The (tenant, type, key lower-cased) a record's unique key takes."""
    rtype = record["type"]
    return record.get("tenant", ""), rtype, record[KEY_FIELD[rtype]].lower()


SHARED_VALUE_FIELDS = ("type", "source", "status", "created", "modified", "tenant", "title",
                       "department", "os", "role", "location", "vendor", "model")


class MemoryStore:
    """The Store protocol over a Directory; nothing persists (the dev tier's store)."""

    kind = "memory"

    def __init__(self, schema):
        self.schema = schema
        self.directory = Directory(schema)
        self.pending = PendingWrites(self.directory)    # stays empty: a commit is visible at once
        self.readonly = None                    # reason text when writes are refused
        self.audit_log = None
        self.common_values = {}                 # one string for each value many records share

    def open(self):
        """Nothing to open or load; the store itself."""
        return self

    async def close(self):
        """Finish pending writes and release resources."""

    def describe(self):
        """The storage as the start-up log names it: memory."""
        return "memory"

    def unwritable(self):
        """Why writes would fail now, or None."""
        return self.readonly

    def get(self, rid):
        """The record with id ``rid``, or None."""
        return self.directory.records.get(rid)

    def select(self, selection, tenant=None):
        """Ids of the records matching ``selection`` (in ``tenant`` unless None), in order."""
        return Search(self.directory, selection, tenant).complete()

    def search(self, selection, tenant=None, limit=None):
        """A Search of ``selection`` (in ``tenant`` unless None) for at most ``limit`` hits,
        to be run a turn at a time."""
        return Search(self.directory, selection, tenant, limit)

    def size(self):
        """How many durable records there are."""
        return len(self.directory)

    def add_offline(self, record):
        """Put a new record straight in (a bulk load with no server running); RecordError
        when its key is taken."""
        rtype = record["type"]
        key = record[KEY_FIELD[rtype]]
        if self.directory.key_owner(rtype, key, record.get("tenant", "")) is not None:
            raise RecordError(f"{KEY_FIELD[rtype]} {key} appears twice")
        self.apply([(self.directory.next_id, record)])

    def metrics(self, out, now):
        """Append the store's Prometheus families: records, machine status, writable."""
        directory = self.directory
        prom_family(out, "pharos_records", "gauge", "Records stored, by type.",
                    [((("type", t),), directory.count(t)) for t in RECORD_TYPES])
        status = directory.index["status"]
        prom_family(out, "pharos_machines", "gauge", "Machines, by status.",
                    [((("status", v),), status.count(v)) for v in ("online", "offline", "unknown")])
        prom_family(out, "pharos_store_writable", "gauge",
                    "1 when the store accepts writes, else 0.", [((), 0 if self.readonly else 1)])

    def key_owner(self, rtype, key, tenant=""):
        """The id of the durable record of ``rtype`` called ``key`` in ``tenant``, or None."""
        return self.directory.key_owner(rtype, key, tenant)

    def records(self):
        """Every durable record, in no order (for counts; queries go through search)."""
        return self.directory.records.values()

    def count(self, rtype):
        """How many durable records of ``rtype`` there are."""
        return self.directory.count(rtype)

    def planned_owner(self, rtype, key, tenant=""):
        """The id of the record of ``rtype`` called ``key`` as the pending writes leave them."""
        return self.pending.key_owner(rtype, key, tenant)

    def select_planned(self, selection, tenant=None):
        """``select`` as the writes not yet durable leave the records: what a change or
        delete acts on."""
        return self.pending.select(selection, tenant)

    def planned(self, rid):
        """Record ``rid`` as the writes not yet durable leave it, or None."""
        return self.pending.record(rid)

    def apply(self, ops):
        """Apply (id, record-or-None) ops to the directory; return the ops that undo them."""
        directory, undo = self.directory, []
        for rid, record in ops:
            old = directory.put(rid, record) if record is not None else directory.drop(rid)
            undo.append((rid, old))
        undo.reverse()
        return undo

    def commit(self, ops, audit=None):
        """Make ``ops`` visible and durable: a Later of None once they are, or of the
        StoreError that says why they cannot be.

        ``audit`` (a dict) is the write's audit-log entry, written with the write.
        """
        if self.readonly:
            return Later.now(StoreError(self.readonly))
        self.apply(ops)
        if audit is not None and self.audit_log is not None:
            self.audit_log.append(audit_json(audit).encode() + b"\n")
        return Later.now(None)

    def attach_audit(self, log):
        """Write committed writes' audit entries to ``log`` (lab and enterprise tiers)."""
        self.audit_log = log

    def plan_add(self, rtype, fields, now, source="manual", tenant=""):
        """The ops that add one record built from {field: [values]}; RecordError if refused."""
        record = new_record(self.schema, rtype, fields, now, source=source, tenant=tenant)
        key = record[KEY_FIELD[rtype]]
        if self.pending.key_owner(rtype, key, tenant) is not None:
            what = "Alias" if rtype == PERSON else "Hostname"
            raise RecordError(f"{what} {key} in use or is too common a name.", code=509)
        return [(self.pending.new_id(), record)]

    def plan_change(self, rids, make, now, source=MANUAL):
        """Ops changing each record by {field: [values]}, each field then set by ``source``;
        returns (ops, the RecordError of each record refused)."""
        ops, errors, claimed = [], [], set()
        for rid in rids:
            try:
                new = self.changed_record(self.pending.record(rid), make, now, claimed, source)
            except RecordError as e:
                errors.append(e)
                continue
            if new is not None:
                ops.append((rid, new))
        return ops, errors

    def changed_record(self, old, make, now, claimed, source=MANUAL):
        """``old`` with ``make`` applied (a new dict), or None when nothing would change;
        the fields ``make`` names are then set by ``source`` (see record_sources)."""
        rtype, schema = old["type"], self.schema
        new = dict(old)
        for name, values in make.items():
            field = schema.by_name[name]
            if rtype not in field.types:
                raise RecordError(f"{name} is not a field of a {rtype}")
            cleaned = schema.clean_values(field, values)
            if cleaned:
                new[name] = cleaned if field.multi else cleaned[0]
            else:
                new.pop(name, None)
        keyname = KEY_FIELD[rtype]
        key = new.get(keyname)
        if not key:
            raise RecordError(f"{keyname} may not be removed: it is the record's key")
        if key.lower() != old[keyname].lower():
            slot = (old.get("tenant", ""), rtype, key.lower())
            if self.pending.key_owner(rtype, key, slot[0]) is not None or slot in claimed:
                what = "Alias" if rtype == PERSON else "Hostname"
                raise RecordError(f"{what} {key} conflicts with other entries.", code=509)
            claimed.add(slot)
        with_sources(new, make, source)
        if new == old:
            return None
        new["modified"] = utc_now(now)
        return new

    def load_records(self, pairs, source="records", first=0):
        """Put (id, record) pairs straight into the directory (bulk load, start-up);
        ``first`` is how many records of ``source`` came before these.

        The fields most records share a value of (type, created, os, ...) keep one string
        per value and are indexed in bulk, a posting at a time, after the records.
        """
        directory, common = self.directory, self.common_values
        records, insert = directory.records, directory.insert
        pending = {name: {} for name in SHARED_VALUE_FIELDS if name in directory.index}
        for n, pair in enumerate(pairs, first):
            try:
                rid, record = pair
                if type(rid) is not int or not 0 < rid < 1 << 32:
                    raise ValueError("bad id")
                if rid in records:              # given twice: the exact way
                    directory.post_many(pending)
                    directory.put(rid, record)
                    continue
                insert(rid, record, pending, common)
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
                raise DataError(f"{source}: record {n + 1} is not a valid record; "
                                f"refusing to start") from None
        directory.post_many(pending)


@functools.cache
def json_encoder(compact):
    """The JSON encoder of journal and snapshot lines (compact) or of audit lines, made once."""
    separators = (",", ":") if compact else None
    return json.JSONEncoder(ensure_ascii=False, separators=separators).encode


def journal_json(value):
    """``value`` as one compact JSON text, as journal and snapshot lines hold it."""
    return json_encoder(True)(value)


def audit_json(value):
    """``value`` as one JSON text, as the audit log holds it."""
    return json_encoder(False)(value)


# SECTION: File store — FileStore: journal, snapshot, image, lock

SNAPSHOT = "snapshot.jsonl"
SNAPSHOT_FORMAT = "pharos-snapshot"
IMAGE = "snapshot.image"
IMAGE_FORMAT = "pharos-image"
JOURNAL_RE = LazyRegex(r"journal-([0-9]{16})\.jsonl\Z")
LOCK = "lock"


def journal_name(first_seq):
    """The journal segment file name for entries starting at ``first_seq``."""
    return f"journal-{first_seq:016d}.jsonl"


def encode_journal(seq, ops, audit=None, batch=None):
    """One journal line: CRC-32 of the JSON, a space, the JSON, a newline.

    ``audit`` (the write's audit-log line, as text) rides along, so one fsync makes
    both durable and the audit log can be completed from the journal after a crash.
    ``batch`` is the seq that opens the write (group commit) this line goes out in:
    it tells a torn last write from damage to earlier ones.
    """
    entry = {"seq": seq, "ops": ops}
    if batch is not None and batch != seq:
        entry["batch"] = batch
    if audit is not None:
        entry["audit"] = audit
    body = journal_json(entry).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_journal(raw):
    """(seq, ops, audit line or None, batch) of one journal line; ValueError if damaged."""
    if len(raw) < 10 or raw[8:9] != b" " or not raw.endswith(b"\n"):
        raise ValueError("truncated or malformed line")
    body = raw[9:-1]
    if int(raw[:8], 16) != zlib.crc32(body):
        raise ValueError("checksum mismatch")
    entry = json.loads(body)
    seq, ops, audit, batch = entry["seq"], entry["ops"], entry.get("audit"), entry.get("batch")
    if type(seq) is not int or type(ops) is not list or type(audit) not in (str, type(None)):
        raise ValueError("entry lacks seq or ops")
    if type(batch) not in (int, type(None)):
        raise ValueError("bad batch")
    return seq, [check_op(op) for op in ops], audit, seq if batch is None else batch


def check_op(op):
    """One journal op as (id, record or None); ValueError if its shape is wrong."""
    rid, record = op
    if (type(rid) is not int or not 0 < rid < 1 << 32
            or (record is not None and not valid_record(record))):
        raise ValueError(f"bad operation {str(op)[:80]}")
    return rid, record


def valid_record(record):
    """Shape check for a record read from disk (not a full schema validation)."""
    if type(record) is not dict:
        return False
    rtype = record.get("type")
    if rtype not in KEY_FIELD or type(record.get(KEY_FIELD[rtype])) is not str:
        return False
    return all(type(v) is str or (type(v) is list and all(type(x) is str for x in v))
               or (k == SOURCES_KEY and valid_sources(v)) for k, v in record.items())


def fsync_dir(path):
    """fsync the directory ``path``, so files created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checked_line(item):
    """A header or trailer line: the CRC-32 of its JSON, a space, the JSON, a newline."""
    body = json.dumps(item).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def read_checked_line(raw):
    """The JSON object of a line written by checked_line; ValueError if it is damaged."""
    body = raw[9:].rstrip(b"\n")
    if raw[8:9] != b" " or not raw.endswith(b"\n") or int(raw[:8], 16) != zlib.crc32(body):
        raise ValueError("checksum mismatch or truncated line")
    item = json.loads(body)
    if type(item) is not dict:
        raise ValueError("not an object")
    return item


def write_snapshot(path, seq, next_id, records):
    """Write ``records`` ({id: record}) as the snapshot, atomically: temp, fsync, rename.

    Each line, header and end marker included, carries the CRC-32 of its JSON, like a
    journal line, so damage anywhere is found and named by line at start.
    """
    tmp = os.path.join(path, SNAPSHOT + ".tmp")
    with open(tmp, "wb") as f:
        header = {"format": SNAPSHOT_FORMAT, "version": 2, "seq": seq,
                  "next_id": next_id, "count": len(records)}
        f.write(checked_line(header))
        chunk, crc32 = [], zlib.crc32
        for rid, record in records.items():
            body = journal_json([rid, record]).encode()
            chunk.append(b"%08x %s\n" % (crc32(body), body))
            if len(chunk) >= 4096:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))
        f.write(checked_line({"end": len(records)}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, SNAPSHOT))
    fsync_dir(path)


def snapshot_error(name, lineno, reason):
    """The DataError for a corrupt snapshot line, naming the file, line and reason."""
    return DataError(f"{name} line {lineno}: corrupt record ({reason}); "
                     f"refusing to start: restore the file or move it away")


def read_snapshot(path, sink=None):
    """(seq, next_id, [[id, record]]) from the snapshot file; DataError naming the line.

    With ``sink``, each chunk of pairs goes to ``sink`` as it is read and the list comes
    back empty: a large snapshot is loaded without holding all of it twice.
    """
    name = os.path.join(path, SNAPSHOT)
    pairs, count = [], 0
    with open(name, "rb") as f:
        try:
            header = parse_snapshot_header(f.readline())
        except (ValueError, TypeError) as e:
            raise DataError(f"{name} line 1: corrupt header ({e}); refusing to start: "
                            f"restore the file or move it away") from None
        lineno, end, version = 1, None, header["version"]
        while end is None:
            lines = f.readlines(1 << 22)
            if not lines:
                raise DataError(f"{name}: truncated (no end marker); refusing to start")
            if not is_trailer(lines[-1], version):
                bodies = snapshot_bodies(name, lineno, lines)
            else:
                bodies = snapshot_bodies(name, lineno, lines[:-1])
                end = snapshot_trailer(name, lineno + len(lines), lines[-1], f, version)
            lineno += len(lines)
            chunk = json.loads(b"[" + b",".join(bodies) + b"]")
            del lines, bodies
            count += len(chunk)
            if sink is None:
                pairs.extend(chunk)
            else:
                sink(chunk)
    if end != count:
        raise snapshot_error(name, lineno, f"end marker says {end} records, found {count}")
    return header["seq"], header["next_id"], pairs


def is_trailer(raw, version):
    """Whether a snapshot line is the end marker: an object, where records are lists."""
    return raw.startswith(b"{") if version == 1 else raw[9:10] == b"{"


def snapshot_bodies(name, lineno, lines):
    """The JSON of each record line, each checked against its CRC."""
    bodies, crc32 = [], zlib.crc32
    for n, raw in enumerate(lines, lineno + 1):
        body = raw[9:-1]
        try:
            good = raw[8:9] == b" " and raw[-1:] == b"\n" and int(raw[:8], 16) == crc32(body)
        except ValueError:
            good = False
        if not good:
            raise snapshot_error(name, n, "checksum mismatch or truncated line")
        bodies.append(body)
    return bodies


def snapshot_trailer(name, lineno, raw, f, version):
    """The record count in the end marker; nothing may follow it."""
    try:
        end = (json.loads(raw) if version == 1 else read_checked_line(raw))["end"]
    except (ValueError, TypeError, KeyError) as e:
        raise snapshot_error(name, lineno, e) from None
    if f.read(1):
        raise snapshot_error(name, lineno + 1, "data after the end marker")
    return end


def parse_snapshot_header(raw):
    """The snapshot header; ValueError unless it is a checksummed version 2 header, or
    a version 1 header (written before headers had a checksum), with seq and next_id."""
    item = json.loads(raw) if raw.startswith(b"{") else read_checked_line(raw)
    if type(item) is not dict or item.get("format") != SNAPSHOT_FORMAT:
        raise ValueError("not a Pharos snapshot header")
    if item.get("version") != (1 if raw.startswith(b"{") else 2):
        raise ValueError(f"snapshot version {item.get('version')} is not supported "
                         f"{'without' if raw.startswith(b'{') else 'with'} a checksum")
    if type(item.get("seq")) is not int or type(item.get("next_id")) is not int:
        raise ValueError("header lacks seq or next_id")
    return item


def snapshot_signature(path):
    """What tells this snapshot file from any other: [inode, size, mtime in ns], or None.

    A snapshot is only ever replaced by a rename, so a new one has a new inode.
    """
    try:
        st = os.stat(os.path.join(path, SNAPSHOT))
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def image_header(schema, seq, signature, body):
    """The image's first line: what it holds and what it must match to be used."""
    fields = repr([(f.name, f.words, f.multi) for f in schema.fields]).encode()
    return {"format": IMAGE_FORMAT, "version": 3, "python": list(sys.version_info[:2]),
            "marshal": marshal.version, "schema": zlib.crc32(fields), "seq": seq,
            "snapshot": signature, "size": len(body), "crc": zlib.crc32(body)}


def write_image(path, directory, seq):
    """Write the directory (records, unique keys, index) as the image of the snapshot that
    holds it, so the next start loads it whole instead of indexing every record again.

    Only a cache beside the snapshot, which stays the truth: a start that finds the image
    stale, damaged or from another Python ignores it.
    """
    body = image_body(directory)
    header = image_header(directory.schema, seq, snapshot_signature(path), body)
    write_image_file(os.path.join(path, IMAGE), header, body)


def image_body(directory, extra=None):
    """The marshal blob of the directory's records, keys and index (and ``extra``, a
    store's own state). One blob keeps the strings records and index keys share, shared;
    values many records hold (type, created, ...) are made one string first. Long
    postings go in as bytes and come back."""
    common = {}
    for record in directory.records.values():
        for name in SHARED_VALUE_FIELDS:
            value = record.get(name)
            if type(value) is str:
                record[name] = common.setdefault(value, value)     # an equal string
    del common
    arrays = []
    for fidx in directory.index.values():
        postings = fidx.postings
        for key, posting in postings.items():
            if type(posting) is array.array:
                arrays.append((postings, key, posting))
    for postings, key, posting in arrays:
        postings[key] = posting.tobytes()
    try:
        return marshal.dumps((directory.records, directory.keys, directory.next_id,
                              {name: fidx.postings for name, fidx in directory.index.items()},
                              extra))
    finally:
        for postings, key, posting in arrays:
            postings[key] = posting


def write_image_file(name, header, body):
    """Write ``header`` (a checked line) and ``body`` to ``name`` whole or not at all."""
    tmp = name + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(checked_line(header))
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def snapshot_header(path):
    """The snapshot's header, or {} if it has none that can be read."""
    try:
        with open(os.path.join(path, SNAPSHOT), "rb") as f:
            return parse_snapshot_header(f.readline(1024))
    except (OSError, ValueError, TypeError):
        return {}


def read_image_header(path):
    """The image's header if it matches the snapshot and this Python, else None."""
    return image_header_or_why(path)[0]


def image_header_or_why(path):
    """(the image's header, None) if it matches the snapshot (file and seq) and this
    Python, else (None, why not)."""
    if not os.path.isfile(os.path.join(path, IMAGE)):
        return None, "it is not a regular file"
    try:
        with open(os.path.join(path, IMAGE), "rb") as f:
            raw = f.readline(1024)
    except OSError as e:
        return None, f"it cannot be read ({e.strerror})"
    try:
        header = read_checked_line(raw)
    except (ValueError, TypeError):
        return None, "its header is damaged or from an older version"
    if (header.get("format") != IMAGE_FORMAT
            or header != dict(header, version=3, python=list(sys.version_info[:2]),
                              marshal=marshal.version, snapshot=snapshot_signature(path))):
        return None, "it was written for another snapshot or Python"
    if header.get("seq") != snapshot_header(path).get("seq"):
        return None, f"its seq {header.get('seq')} is not the snapshot's"
    return header, None


def read_image(path, directory):
    """Fill ``directory`` from the snapshot's image: (seq, None), or (None, why it was not
    used) when there is none or it does not match the snapshot, this Python and schema."""
    name = os.path.join(path, IMAGE)
    if not os.path.exists(name):
        return None, None
    header, why = image_header_or_why(path)
    if header is None:
        return None, why
    found, why = load_image(name, directory, header)
    return (header["seq"], None) if why is None else (None, why)


def load_image(name, directory, header):
    """Fill ``directory`` from the image ``name`` whose first line is ``header``: (the
    store's own state saved with it, None), or (None, why it was not used)."""
    import mmap
    try:
        f = open(name, "rb")
        blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        return None, f"it cannot be read ({e})"
    with f, blob:
        with memoryview(blob) as view:
            body = view[blob.find(b"\n") + 1:]
            try:
                if header != image_header(directory.schema, header["seq"], header["snapshot"],
                                          body):
                    return None, "it is damaged or was written for other fields"
                try:
                    records, keys, next_id, postings, extra = marshal.loads(body)
                except (ValueError, EOFError, TypeError):
                    return None, "it is damaged"
            finally:
                body.release()
    if (type(records) is not dict or type(keys) is not dict or type(next_id) is not int
            or type(postings) is not dict or postings.keys() != directory.index.keys()
            or any(type(table) is not dict for table in postings.values())
            or set(map(type, records)) - {int} or set(map(type, records.values())) - {dict}):
        return None, "it is damaged"
    for name, fidx in directory.index.items():
        fidx.postings = table = postings[name]
        for key, posting in table.items():
            if type(posting) is bytes:
                table[key] = array.array("I", posting)
    directory.records, directory.keys, directory.next_id = records, keys, next_id
    return extra, None


def journal_segments(path):
    """Journal segment names in order."""
    return sorted(n for n in os.listdir(path) if JOURNAL_RE.match(n))


def read_journal(name, first_seq, newest=True):
    """(entries, good_length, problem) of one segment; problem is (lineno, reason, torn).

    A segment's data is always followed by at least one zero byte of its preallocated
    fill, so the data ends where a run of zeros reaches the end of the file, and a
    newest segment that ends right at a line end was cut. Seqs rise line by line and
    none is below the one in the segment's name. ``torn`` says the damage can be the
    last write, cut short by a crash: nothing valid follows it but lines of the same
    write (its blocks may reach the disk in any order), and the zero fill is still there.
    """
    entries, offset, lineno = [], 0, 0
    with open(name, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw[:1] == b"\0" and not raw.strip(b"\0"):
                return entries, offset, None    # the zero-filled space not yet written
            before = entries[-1][0] if entries else first_seq - 1
            try:
                entry = decode_journal(raw)
            except (ValueError, TypeError, KeyError) as e:
                where, why = not_a_torn_write([raw, *f], lineno, offset, before + 1)
                return entries, offset, (where, f"{e}; {why}" if why else str(e), not why)
            if entry[0] <= before:
                return entries, offset, (lineno, f"seq {entry[0]} after seq {before}", False)
            entries.append(entry)
            offset += len(raw)
    if offset and newest:
        return entries, offset, (lineno, "the file ends right after this line, without the "
                                 "zero fill that follows the data: it was cut short", False)
    return entries, offset, None


def not_a_torn_write(tail, lineno, start, damaged_seq):
    """(line, why not) if bad line ``tail[0]`` (line ``lineno`` at byte ``start``) and
    the lines after it cannot be the last write cut short by a crash, else (lineno, None).

    Our writer writes only where the data ends, so a torn write is the very end of the
    data: after it comes the zero fill, and before that only lines of the same write
    (its blocks may reach the disk in any order) or lines holding its unwritten, still
    zero blocks. A later write, a damaged line with no zeros in it, or non-zero bytes
    inside the fill that reach no line end are damage.
    """
    data = b"".join(tail)
    end = len(data.rstrip(b"\0"))
    if end == len(data):
        return lineno, "the file does not end in its zero fill: not a torn write"
    stray = data.rfind(b"\0", 0, end) + 1
    if stray and data[end - 1:end] != b"\n":
        return (lineno + data.count(b"\n", 0, stray),
                f"non-zero bytes inside the zero fill at byte {start + stray}: "
                f"not a write of ours")
    for n, raw in enumerate(tail[1:], lineno + 1):
        why = later_or_damaged(raw, damaged_seq)
        if why:
            return lineno, f"line {n} after it {why}: not a torn write"
    return lineno, None


def later_or_damaged(raw, damaged_seq):
    """Why journal line ``raw``, after a bad one, cannot be part of the torn write that
    holds seq ``damaged_seq``; None if it can."""
    if b"\0" in raw:
        return None                         # zeros: blocks of the write that never landed
    try:
        seq, _, _, batch = decode_journal(raw)
    except (ValueError, TypeError, KeyError) as e:
        return f"is damaged too ({e})"
    return f"holds a later write (seq {seq})" if batch > damaged_seq else None


class JournalWriter:
    """Appends journal lines; writes that arrive together share one fsync (group commit).

    A write is queued, and the queue is flushed at the loop's next turn, so the writes
    read in one turn go out as one batch. On a disk whose fsync is quick the batch is
    written on the event loop itself: handing it to a thread costs more than the fsync
    (the two threads then fight over the GIL; with 16 writers, inline is a quarter
    faster). A slow fsync goes to the journal thread, so the loop goes on reading and
    planning the next batch while the disk works. No task is involved: whoever waits on
    a write gets its Later settled right after the fsync.

    The segment grows in zero-filled steps ahead of the data (JOURNAL_PREALLOC), so a
    write overwrites blocks the file already has and fdatasync need not touch the
    file's metadata: on ext4 and XFS that makes it a third quicker.
    """

    def __init__(self, store, fd, size=0, audit_log=None):
        self.store = store
        self.audit_log = audit_log              # where the audit lines of a batch go
        self.fd = fd
        self.size = size                        # where the data ends
        self.allocated = os.fstat(fd).st_size   # the file's length, zeros after the data
        self.queue = []                         # (bytes, Later, (seq, ops), audit, batch)
        self.scheduled = False                  # a flush is due at the loop's next turn
        self.writing = False                    # a batch is in the thread, or a segment opening
        self.drained = None                     # a Later for drain(), settled once idle
        self.fsync_seconds = INLINE_FSYNC_SECONDS * 4     # running average; starts threaded
        from concurrent.futures import ThreadPoolExecutor
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pharos-journal")

    def submit(self, data, write, audit=None, batch=None):
        """Queue ``data`` for the next batch; a Later settled once it is durable and
        ``write`` ((seq, ops)) is in the directory."""
        later = Later()
        self.queue.append((data, later, write, audit, batch))
        if not self.scheduled and not self.writing:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return later

    def next_batch(self, default):
        """The batch a write queued now joins: the first queued write's, else ``default``."""
        return self.queue[0][4] if self.queue else default

    def backlog(self):
        """How many writes wait for the next batch."""
        return len(self.queue)

    def flush(self):
        """Write the queue as one batch: on the loop if fsync is quick, else in the
        journal thread."""
        self.scheduled = False
        if self.writing or not self.queue:
            self.idle()
            return
        batch, self.queue = self.queue, []
        data = b"".join(item[0] for item in batch)
        audits = [item[3] for item in batch if item[3]]
        started = time.perf_counter()
        if self.fsync_seconds < INLINE_FSYNC_SECONDS:
            error = problem = None
            try:
                problem = self.write(data, audits)
            except Exception as e:              # as the thread's future would report it
                error = e
            self.written(batch, len(data), started, error, problem)
            return
        self.writing = True
        future = asyncio.get_running_loop().run_in_executor(self.executor, self.write, data,
                                                            audits)
        future.add_done_callback(lambda f: self.written(
            batch, len(data), started, f.exception(), None if f.exception() else f.result()))

    def written(self, batch, nbytes, started, error, problem):
        """A batch is on disk (or failed): tell the store, then go on with the queue."""
        self.writing = False
        if error is not None:
            batch, self.queue = batch + self.queue, []     # a reply may queue a new write
        seconds = time.perf_counter() - started
        self.store.journal_settled(batch, nbytes, seconds, error, problem)
        self.go_on()

    def go_on(self):
        """After a batch or a segment roll: flush what came in meanwhile, or note idleness."""
        if self.queue and not self.scheduled and not self.writing:
            self.flush()
        else:
            self.idle()

    def idle(self):
        """Settle drain()'s Later once nothing is queued or being written."""
        if self.drained is not None and not (self.queue or self.writing or self.scheduled):
            drained, self.drained = self.drained, None
            drained.settle(None)

    def write(self, data, audits=()):
        """Write at the data's end and fdatasync, then the batch's audit lines.

        Runs on the loop or in the journal thread, so it touches nothing of the store's:
        a failed write is zeroed again and raised; the audit lines are in the journal
        too, so they need no fsync of their own, and if they cannot be written the
        problem is returned (the store turns read-only on hearing it).
        """
        start = self.size
        if start + len(data) >= self.allocated:
            self.preallocate(start + len(data))
        try:
            view, at = memoryview(data), start
            while view:
                n = os.pwrite(self.fd, view, at)
                view, at = view[n:], at + n
        except OSError:
            self.erase(start)
            raise
        synced = time.perf_counter()
        try:
            os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)
        except OSError as e:
            raise StoreError(f"Store failed: {e.strerror}.",
                             readonly=f"journal fsync failed: {e.strerror}") from None
        self.fsync_seconds = 0.8 * self.fsync_seconds + 0.2 * (time.perf_counter() - synced)
        self.size = start + len(data)
        self.allocated = max(self.allocated, self.size)
        if audits and self.audit_log is not None:
            try:
                self.audit_log.append(b"".join(audits))
            except OSError as e:
                return f"the audit log cannot be written: {e.strerror}"
        return None

    def preallocate(self, end):
        """Zero-fill the segment past ``end``: by whole steps if there is room, else by
        one byte; OSError, and the file as it was, if not even that fits.

        The data is always followed by a zero, so a start can tell where the data ends
        from a file cut at a line end.
        """
        step = -(-(end + 1) // JOURNAL_PREALLOC) * JOURNAL_PREALLOC
        zeros = bytes(min(step - self.allocated, 1 << 20))
        for target in (step, end + 1):
            at = self.allocated
            try:
                while at < target:
                    at += os.pwrite(self.fd, zeros[:target - at], at)
            except OSError:
                os.ftruncate(self.fd, self.allocated)
                if target == end + 1:
                    raise
                continue
            self.allocated = target
            return

    def erase(self, start):
        """Zero what a failed write left after ``start``, keeping the file's length."""
        try:
            os.ftruncate(self.fd, start)
            os.ftruncate(self.fd, self.allocated)
        except OSError:
            self.allocated = start

    async def drain(self):
        """Wait until every queued write has been written."""
        while self.queue or self.writing or self.scheduled:
            self.drained = self.drained or Later()
            await self.drained

    def roll(self, fd):
        """Switch to a new segment (between batches, so no write is in flight)."""
        os.close(self.fd)
        self.fd, self.size, self.allocated = fd, 0, os.fstat(fd).st_size


class FileStore(MemoryStore):
    """Records in memory, made durable by a journal (fsync'd) and compacted into a snapshot."""

    kind = "file"

    def __init__(self, schema, path, compact_bytes=DEFAULT_COMPACT_BYTES, log=None,
                 image=False):
        super().__init__(schema)
        self.image = image                      # fold the journal and write the image at close
        self.path = os.path.abspath(path)
        self.compact_bytes = compact_bytes
        self.roll_at = compact_bytes            # the segment size that starts a compaction
        self.log = log or (lambda msg: None)
        self.lock_fd = None
        self.writer = None
        self.seq = 0
        self.segment_start = 1
        self.compacting = None
        self.snapshot_time = None
        self.stats = {"fsyncs": 0, "journal_bytes": 0, "entries": 0}
        self.journal_audits = []                # (seq, audit line) seen while replaying
        self.write_latency = Histogram(WRITE_BUCKETS)

    def describe(self):
        """The storage as the start-up log names it: file and the data dir."""
        return f"file {self.path}"

    def open(self):
        """Lock the data dir, load snapshot and journal, open the journal for appends."""
        self.lock()
        try:
            self.load()
        except BaseException:
            self.unlock()
            raise
        return self

    def lock(self):
        """Take the data dir's lock file (flock) and write our pid in it; DataError if held."""
        import fcntl
        try:
            os.makedirs(self.path, exist_ok=True)
            fd = os.open(os.path.join(self.path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(f"cannot write data dir {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataError(f"data dir {self.path} is already in use by another Pharos "
                            f"server (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    def unlock(self):
        """Release the data dir's lock, if held."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def load(self):
        """Load the snapshot (from its image when that matches), replay the journal
        segments, open the newest one for appends."""
        base, must_follow = self.load_snapshot()
        segments, seq, end, size = journal_segments(self.path), base, None, 0
        for position, name in enumerate(segments):
            self.check_follows(name, base, seq, end)
            seq, size, end = self.replay(name, seq, position == len(segments) - 1)
        self.check_newest(segments, base, must_follow)
        self.seq = seq
        current = segments[-1] if segments else journal_name(seq + 1)
        self.segment_start = int(JOURNAL_RE.match(current).group(1))
        self.writer = JournalWriter(self, self.open_segment(current), size)

    def load_snapshot(self):
        """Load the snapshot, from its image when that matches: (its seq, whether a
        journal segment must follow it). Refuse an image whose snapshot is gone."""
        name, loaded = os.path.join(self.path, SNAPSHOT), [0]
        if not os.path.exists(name):
            if os.path.exists(os.path.join(self.path, IMAGE)):
                raise DataError(f"{name} is missing but {IMAGE} is there; refusing to "
                                f"start: restore the snapshot")
            return 0, False

        def load_chunk(pairs):
            self.load_records(pairs, name, loaded[0])
            loaded[0] += len(pairs)
        seq, unused = read_image(self.path, self.directory)
        if unused:
            self.log(f"not using {os.path.join(self.path, IMAGE)}: {unused}; "
                     f"loading {name}")
        if seq is None:
            seq, next_id, _ = read_snapshot(self.path, load_chunk)
            self.directory.next_id = max(self.directory.next_id, next_id)
        self.snapshot_time = os.stat(name).st_mtime
        return seq, snapshot_header(self.path).get("version") != 1  # 1: a clean stop left none

    def check_follows(self, name, base, seq, end):
        """Refuse segment ``name`` unless it goes on where the snapshot (at ``base``) and
        the segments before it (up to ``seq``, the last ending at ``end``) left off."""
        full, start = os.path.join(self.path, name), int(JOURNAL_RE.match(name).group(1))
        if start > seq + 1:
            before = (f"the segment before it ends at seq {end}" if end is not None else
                      f"{SNAPSHOT} ends at seq {base}" if base else f"there is no {SNAPSHOT}")
            raise DataError(f"{full} starts at seq {start} but {before}: the writes between "
                            f"are missing; refusing to start: restore the missing file")
        if end is not None and end >= base and start <= end:
            raise DataError(f"{full} starts at seq {start}, inside the segment before it "
                            f"(which ends at seq {end}): a copied or renamed segment; "
                            f"refusing to start: restore the journal")

    def check_newest(self, segments, base, must_follow):
        """Refuse a journal whose newest segment, the one after the snapshot, is gone."""
        newest = int(JOURNAL_RE.match(segments[-1]).group(1)) if segments else None
        if (newest is None and must_follow) or (newest is not None and newest <= base):
            raise DataError(f"{os.path.join(self.path, journal_name(base + 1))} is missing: "
                            f"{SNAPSHOT} is at seq {base} and no journal segment follows it; "
                            f"refusing to start: restore the journal")

    def replay(self, name, seq, last):
        """Apply one segment's entries newer than ``seq``; (the last seq, the data's
        length, the segment's last seq)."""
        full, start = os.path.join(self.path, name), int(JOURNAL_RE.match(name).group(1))
        entries, good, problem = read_journal(full, start, last)
        for entry_seq, ops, audit, _ in entries:
            if entry_seq > seq:
                self.apply(ops)
                seq = entry_seq
            if audit is not None:
                self.journal_audits.append((entry_seq, audit))
        end = entries[-1][0] if entries else start - 1
        if problem:
            lineno, reason, torn = problem
            if not (last and torn):
                raise DataError(f"{full} line {lineno}: corrupt journal entry ({reason}); "
                                f"refusing to start: restore the file or move it away")
            self.log(f"dropped a torn write: an incomplete last line at byte {good} of "
                     f"{full} (line {lineno}, seq {end + 1}: {reason}); writes after seq "
                     f"{end} were never acknowledged if this was a crash")
            self.erase(full, good)
        return seq, good, end

    def erase(self, full, length):
        """Zero journal segment ``full`` from ``length`` on, keeping its size; fsync it."""
        try:
            with open(full, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                f.truncate(length)
                f.truncate(size)
                os.fsync(f.fileno())
        except OSError as e:
            raise DataError(f"cannot write data dir {self.path}: {e.strerror}") from None

    def open_segment(self, name):
        """The fd of journal segment ``name``, opened (created if new) for writing."""
        full = os.path.join(self.path, name)
        try:
            fd = os.open(full, os.O_WRONLY | os.O_CREAT, 0o644)
            fsync_dir(self.path)
        except OSError as e:
            raise DataError(f"cannot write data dir {self.path}: {e.strerror}") from None
        return fd

    def commit(self, ops, audit=None):
        """Journal ``ops``: a Later of None once their entry is durable and they are in the
        directory, or of the StoreError that refused them (the directory never saw them).

        Until then they are pending: later writes are planned on top of them, readers do
        not see them, so nobody acts on a write a crash could still take back.
        """
        if self.readonly:
            return Later.now(StoreError(self.readonly))
        self.seq += 1
        self.pending.hold(self.seq, ops)
        line_text = None
        if audit is not None and self.audit_log is not None:
            audit["seq"] = self.seq
            line_text = audit_json(audit)
        batch = self.writer.next_batch(self.seq)
        return self.writer.submit(encode_journal(self.seq, ops, line_text, batch),
                                  (self.seq, ops), line_text and (line_text + "\n").encode(),
                                  batch)

    def made_durable(self, seq, ops):
        """Write ``seq`` is on disk: show it to readers, stop holding it as pending."""
        self.pending.release(seq, ops, self.apply(ops))

    def attach_audit(self, log):
        """Also complete ``log`` from the journal: a crash may have lost its newest lines."""
        self.audit_log = log
        if self.writer is not None:
            self.writer.audit_log = log
        last = log.last_seq()
        missing = [text for seq, text in self.journal_audits if seq > last]
        if missing:
            log.append("".join(t + "\n" for t in missing).encode(), sync=True)
            self.log(f"restored {len(missing)} audit log line(s) from the journal")
        self.journal_audits = []

    def metrics(self, out, now):
        """The memory store's families, then the journal's and the snapshot's."""
        super().metrics(out, now)
        prom_histograms(out, "pharos_storage_write_duration_seconds",
                        "Time to append and fsync one batch of journal entries.",
                        [((), self.write_latency)])
        stats = self.stats
        prom_family(out, "pharos_storage_fsyncs_total", "counter",
                    "Journal fsyncs (one per batch).", [((), stats["fsyncs"])])
        prom_family(out, "pharos_storage_journal_entries_total", "counter",
                    "Journal entries written.", [((), stats["entries"])])
        prom_family(out, "pharos_storage_journal_written_bytes_total", "counter",
                    "Bytes appended to the journal.", [((), stats["journal_bytes"])])
        prom_family(out, "pharos_storage_journal_bytes", "gauge",
                    "Size of the journal segment being written.",
                    [((), self.writer.size if self.writer else 0)])
        if self.snapshot_time is not None:
            prom_family(out, "pharos_storage_snapshot_age_seconds", "gauge",
                        "Seconds since the last snapshot was written.",
                        [((), round(max(0.0, now - self.snapshot_time), 3))])

    def release(self):
        """Let go of the data dir without a loop (after an offline load): segment, lock."""
        if self.writer is not None:
            os.close(self.writer.fd)
            self.writer = None
        self.unlock()

    def journal_settled(self, batch, nbytes, seconds, error, problem):
        """What the journal reports of one batch, on the loop: durable, so each write goes
        into the directory as its writer is answered, in order; or failed, so every write
        not yet durable is refused (the directory never saw them)."""
        if problem or getattr(error, "readonly", None):
            self.readonly = problem or error.readonly
        if error is not None:
            reason = error if isinstance(error, StoreError) else StoreError(
                f"Store failed: {getattr(error, 'strerror', None) or error}.")
            self.pending.drop()
            for item in batch:
                item[1].settle(reason)
            return
        stats = self.stats
        stats["fsyncs"] += 1
        stats["entries"] += len(batch)
        stats["journal_bytes"] += nbytes
        self.write_latency.observe(seconds)
        for item in batch:
            self.made_durable(*item[2])
            item[1].settle(None)
        self.maybe_compact(self.writer)

    def unwritable(self):
        """Why the data dir cannot take writes now (a probe file is made and removed), or None."""
        if self.readonly:
            return self.readonly
        probe = os.path.join(self.path, f".probe-{os.getpid()}")
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.unlink(probe)
        except OSError as e:
            return f"data dir {self.path} is not writable: {e.strerror}"
        return None

    def maybe_compact(self, writer):
        """Between batches: once the segment is big, roll it and snapshot in a thread.

        The directory's records (the durable writes) are copied now; new batches wait while
        the journal thread opens the next segment.
        """
        if writer.size < self.roll_at or self.compacting is not None:
            return
        durable_seq = self.seq - writer.backlog()
        records = dict(self.directory.records)      # holds exactly the durable writes
        loop = asyncio.get_running_loop()
        name = journal_name(durable_seq + 1)
        writer.writing = True
        opening = loop.run_in_executor(writer.executor, self.open_segment, name)
        opening.add_done_callback(lambda f: self.rolled(f, name, durable_seq, records))

    def rolled(self, opening, name, durable_seq, records):
        """The next segment is open (or could not be): switch to it, start the snapshot."""
        writer = self.writer
        writer.writing = False
        error = opening.exception()
        if error is None:
            old_segments = [n for n in journal_segments(self.path) if n != name]
            writer.roll(opening.result())
            self.segment_start = durable_seq + 1
            self.roll_at = self.compact_bytes
            self.compacting = asyncio.get_running_loop().run_in_executor(
                None, self.compact, durable_seq, self.directory.next_id, records,
                old_segments)
            self.compacting.add_done_callback(self.compacted)
        else:
            self.log(f"cannot start a new journal segment, the journal keeps growing: {error}")
            self.roll_at = writer.size + self.compact_bytes
        writer.go_on()

    def fold(self):
        """Write everything in memory as the snapshot and its image; the journal goes,
        but for an empty segment after the snapshot, which tells a start none is missing."""
        after = journal_name(self.seq + 1)
        os.close(os.open(os.path.join(self.path, after), os.O_WRONLY | os.O_CREAT, 0o644))
        self.compact(self.seq, self.directory.next_id, self.directory.records,
                     [name for name in journal_segments(self.path) if name != after])
        write_image(self.path, self.directory, self.seq)

    def save_image(self):
        """At a clean stop: fold the journal into a new snapshot if it holds writes, and
        write the snapshot's image unless it has a good one, so the next start is quick."""
        try:
            if self.writer.size or len(journal_segments(self.path)) > 1 or not os.path.exists(
                    os.path.join(self.path, SNAPSHOT)):
                self.fold()
            elif read_image_header(self.path) is None:
                write_image(self.path, self.directory, self.seq)
            else:
                return
            self.log(f"wrote {os.path.join(self.path, IMAGE)} for a quick start")
        except OSError as e:
            self.log(f"could not write the snapshot and its image at stop ({e.strerror}); "
                     f"the journal has every write")

    def compact(self, seq, next_id, records, old_segments):
        """In a thread: write the snapshot, delete the old segments; the time it finished."""
        write_snapshot(self.path, seq, next_id, records)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, IMAGE))   # it was the old snapshot's
        if self.audit_log is not None:
            self.audit_log.sync()           # the journal going away held its lines too
        for name in old_segments:
            os.unlink(os.path.join(self.path, name))
        fsync_dir(self.path)
        return time.time()

    def compacted(self, future):
        """When a compaction ends: log its failure or note the new snapshot's time."""
        self.compacting = None
        if future.cancelled():
            return
        error = future.exception()
        if error:
            self.log(f"snapshot failed, the journal keeps growing: {error}")
        else:
            self.snapshot_time = future.result()

    async def close(self):
        """Finish queued writes and any compaction, close the journal, release the lock."""
        try:
            if self.writer:
                await self.writer.drain()
                if self.compacting is not None:
                    await asyncio.shield(self.compacting)
                if self.image and not self.readonly:
                    self.save_image()
        finally:
            if self.writer:
                os.close(self.writer.fd)
                self.writer.executor.shutdown(wait=True)
                self.writer = None
            self.unlock()


# SECTION: LDAP store — LdapStore: layout, mapping, escaping, a BER reader, Content Sync, faults

LDAP_URL_RE = LazyRegex(r"(ldaps?|ldapi)://([^/]*)/(.+)\Z")
LDAP_PAGE = 500                 # entries per page of a paged search
LDAP_TIMEOUT = 1                # seconds a connect or a reply may take
LDAP_LOAD_TIMEOUT = 60          # seconds one page of the start-up load may take
LDAP_POLL = 0.5                 # seconds between looks for changes made by other tools
LDAP_IMAGE = "ldap.image"       # the image of the index an LDAP store keeps under DATA
LDAP_IMAGE_CHANGES = 1000       # entries changed since the image that make a start write anew
LDAP_RECONCILE_MIN = 1.0        # seconds between full listings that find deletes ...
LDAP_RECONCILE_FACTOR = 10      # ... and at least this many times what a listing took
LDAP_BACKOFF_MAX = 5.0          # seconds between reconnect attempts, at most
LDAP_PREFIX = "pharos:"         # custom values in `description` without the pharos schema
LDAP_ENTRY_FILTER = "(|(objectClass=inetOrgPerson)(objectClass=device)(objectClass=ipHost))"
PAGED_OID = "1.2.840.113556.1.4.319"
LDAP_PERSON_ATTRS = {"email": "mail", "phone": "telephoneNumber", "mobile": "mobile",
                     "title": "title", "department": "ou", "office": "roomNumber",
                     "url": "labeledURI", "nickname": "displayName"}
LDAP_MACHINE_ATTRS = {"ip": "ipHostNumber", "mac": "macAddress", "location": "l",
                      "serial": "serialNumber"}
LDAP_ATTRS = {PERSON: LDAP_PERSON_ATTRS, MACHINE: LDAP_MACHINE_ATTRS}
# What a record is read from (a photo or a certificate an entry also holds is not fetched):
LDAP_READ_ATTRS = ["objectClass", "uid", "cn", "owner", "description", "pharosField",
                   *LDAP_PERSON_ATTRS.values(), *LDAP_MACHINE_ATTRS.values(), "entryUUID",
                   "entryCSN", "createTimestamp", "modifyTimestamp"]
LDAP_OWN_FIELDS = {"type", "tenant", "alias", "hostname", "name", "notes", "owner"}
LDAP_CODES = {68: 509, 19: 512, 21: 512, 65: 512, 20: 512, 16: 400, 32: 501, 50: 506,
              53: 400, 51: 475, 52: 475, 80: 400}


def parse_ldap_url(url):
    """(server URL: scheme://host[:port], base DN) of ldap[s|i]://HOST[:PORT]/BASE-DN;
    UsageError if not."""
    import urllib.parse
    match = LDAP_URL_RE.match(url)
    if not match or (match.group(1) != "ldapi" and not match.group(2)):
        raise UsageError(f"{url!r} is not memory, file or ldap://HOST[:PORT]/BASE-DN "
                         f"(or ldaps://, ldapi://SOCKET/BASE-DN)")
    scheme, host, base = match.groups()
    if scheme == "ldapi" and host and not host.startswith("%2"):
        raise UsageError("ldapi://: the socket path must be URL-encoded "
                         "(ldapi://%2Frun%2Fslapd%2Fldapi/BASE-DN)")
    return f"{scheme}://{host}", urllib.parse.unquote(base)


def escape_dn_value(value):
    """``value`` escaped for an RDN (RFC 4514): , + " \\ < > ; = and NUL, leading # or
    space, trailing space."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\0":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def escape_filter_value(value):
    """``value`` escaped for a search filter (RFC 4515): * ( ) \\ and NUL as \\XX."""
    return "".join(f"\\{ord(ch):02x}" if ch in "*()\\\0" else ch for ch in value)


def split_dn(dn):
    """The RDNs of ``dn`` as [(attribute lower-cased, value unescaped)], first RDN first;
    a multi-valued RDN keeps its first pair."""
    if "\\" not in dn:                  # nothing escaped (most DNs): split, no byte walk
        pairs = [part.split("+", 1)[0].partition("=") for part in dn.split(",")]
        if all(eq for _, eq, _ in pairs):
            return [(attr.strip().lower(), value.strip()) for attr, _, value in pairs]
    rdns, attr, raw, seen_eq, skip = [], [], bytearray(), False, False
    i, data = 0, dn.encode("utf-8")
    while i < len(data):
        ch = data[i:i + 1]
        if ch == b"\\" and i + 1 < len(data):
            pair = data[i + 1:i + 3]
            if re.fullmatch(rb"[0-9a-fA-F]{2}", pair):
                raw.append(int(pair, 16))
                i += 3
                continue
            raw += data[i + 1:i + 2]
            i += 2
            continue
        if ch == b"=" and not seen_eq:
            attr, raw, seen_eq = raw.decode(errors="replace").strip().lower(), bytearray(), True
        elif ch in (b",", b"+"):
            if not skip:
                rdns.append((attr, raw.decode("utf-8", "replace").strip()))
            attr, raw, seen_eq, skip = "", bytearray(), False, ch == b"+"
        else:
            raw += ch
        i += 1
    if not skip:
        rdns.append((attr, raw.decode("utf-8", "replace").strip()))
    return rdns


def rdn_parent(dn):
    """(first RDN as written, the rest) of ``dn``."""
    i = 0
    while i < len(dn):
        if dn[i] == "\\":
            i += 2
            continue
        if dn[i] == ",":
            return dn[:i], dn[i + 1:]
        i += 1
    return dn, ""


def ldap_time(value):
    """RFC 3339 UTC of a GeneralizedTime like 20261125075013Z (or 20261125075013.5Z)."""
    v = value[:14]
    return f"{v[:4]}-{v[4:6]}-{v[6:8]}T{v[8:10]}:{v[10:12]}:{v[12:14]}Z"


def mac_from_ldap(value):
    """A MAC in RFC 2307 form (0:1a:2b:3c:4d:5e, leading zeros dropped) padded to aa:bb:..."""
    parts = value.split(":")
    return ":".join(p.zfill(2) for p in parts) if len(parts) == 6 else value


class LdapFailure(Exception):
    """An LDAP operation the directory answered with an error (inside the worker)."""

    def __init__(self, result, what, done=0):
        super().__init__(what)
        self.result, self.what, self.done = result, what, done


# -- the wire: the store's LDAPv3 in BER (RFC 4511), stdlib only --
#
# A general-purpose client (ldap3) decodes a search reply entry by entry through an ASN.1
# library and copies each response twice; loading 10k+10k entries spent most of its time
# there, and each write took a second round trip to read the entry back. LdapWire is one
# blocking connection that binds, sends a search and decodes the entries as they stream
# in, and writes (add, modify, rename, delete) with the Post-Read control, so the
# directory's reply to a write carries the entry as it left it.

SYNC_REQUEST_OID = "1.3.6.1.4.1.4203.1.9.1.1"  # RFC 4533 Content Sync
SYNC_STATE_OID = "1.3.6.1.4.1.4203.1.9.1.2"
SYNC_INFO_OID = "1.3.6.1.4.1.4203.1.9.1.4"
LDAP_MAX_MESSAGE = 64 * 1024 * 1024     # bytes of one LDAP message from the directory, at most
LDAP_RESULTS = {0: "success", 1: "operationsError", 2: "protocolError", 3: "timeLimitExceeded",
                4: "sizeLimitExceeded", 7: "authMethodNotSupported", 8: "strongerAuthRequired",
                10: "referral", 11: "adminLimitExceeded", 12: "unavailableCriticalExtension",
                13: "confidentialityRequired", 32: "noSuchObject", 34: "invalidDNSyntax",
                48: "inappropriateAuthentication", 49: "invalidCredentials",
                50: "insufficientAccessRights", 51: "busy", 52: "unavailable",
                53: "unwillingToPerform", 80: "other", 4096: "e-syncRefreshRequired"}
LDAP_FILTER_TAGS = {"=": 0xA3, ">=": 0xA5, "<=": 0xA6, "~=": 0xA8}
LDAP_MODIFY_OPS = {"MODIFY_ADD": 0, "MODIFY_DELETE": 1, "MODIFY_REPLACE": 2}
POST_READ_OID = "1.3.6.1.1.13.2"        # RFC 4527: the entry as a write left it, in its reply
# What a write reads back of the entry it leaves (for entry_info):
LDAP_WRITE_READ = ["objectClass", "description", "entryUUID", "entryCSN", "pharosField"]


def ber(tag, body):
    """One BER TLV: a one-byte ``tag``, the definite length, ``body``."""
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def ber_int(n, tag=0x02):
    """A BER INTEGER (or, with ``tag`` 0x0A, ENUMERATED)."""
    return ber(tag, n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True))


def ber_str(text, tag=0x04):
    """A BER OCTET STRING of ``text`` (str as UTF-8, or bytes)."""
    return ber(tag, text.encode("utf-8") if isinstance(text, str) else text)


def ldap_filter(text):
    """The BER of the RFC 4515 filter ``text`` (&, |, !, =, >=, <=, ~=, presence and
    substrings; values escaped as \\XX); ValueError when it is none."""
    try:
        out, end = ldap_filter_at(text, 0)
    except IndexError:
        raise ValueError(f"an unfinished LDAP filter: {text!r}") from None
    if end != len(text):
        raise ValueError(f"text after the LDAP filter: {text!r}")
    return out


def ldap_filter_at(text, i):
    """(BER, index after it) of the filter that starts at text[i]."""
    if text[i] != "(":
        raise ValueError(f"an LDAP filter must start with '(': {text!r}")
    if text[i + 1] in "&|!":
        tag, parts, i = {"&": 0xA0, "|": 0xA1, "!": 0xA2}[text[i + 1]], [], i + 2
        while text[i] == "(":
            part, i = ldap_filter_at(text, i)
            parts.append(part)
        if text[i] != ")" or not parts or (tag == 0xA2 and len(parts) != 1):
            raise ValueError(f"a malformed LDAP filter: {text!r}")
        return ber(tag, b"".join(parts)), i + 1
    close = text.index(")", i)          # a value escapes ')' as \29: the first ')' ends it
    attr, eq, value = text[i + 1:close].partition("=")
    op = attr[-1:] + "=" if attr[-1:] in (">", "<", "~") else "="
    attr = attr[:-1] if op != "=" else attr
    if not eq or not attr:
        raise ValueError(f"a malformed LDAP filter item: {text[i:close + 1]!r}")
    if op == "=" and value == "*":
        return ber(0x87, attr.encode()), close + 1
    if op == "=" and "*" in value:
        pieces = value.split("*")
        subs = [ber(0x80, ldap_unescape(pieces[0]))] if pieces[0] else []
        subs += [ber(0x81, ldap_unescape(p)) for p in pieces[1:-1] if p]
        subs += [ber(0x82, ldap_unescape(pieces[-1]))] if pieces[-1] else []
        return ber(0xA4, ber_str(attr) + ber(0x30, b"".join(subs))), close + 1
    return ber(LDAP_FILTER_TAGS[op], ber_str(attr) + ber_str(ldap_unescape(value))), close + 1


def ldap_unescape(value):
    """The bytes a filter value stands for (\\XX escapes undone)."""
    raw = value.encode("utf-8")
    if b"\\" not in raw:
        return raw
    return re.sub(rb"\\([0-9a-fA-F]{2})", lambda m: bytes((int(m.group(1), 16),)), raw)


def ldap_result(data, pos, end):
    """{"result", "description", "message"} of an LDAPResult's components."""
    items = der_children(data, pos, end)
    if len(items) < 3:
        raise ValueError("an LDAPResult without its three parts")
    code = int.from_bytes(data[items[0][1]:items[0][2]], "big")
    return {"result": code, "description": LDAP_RESULTS.get(code, str(code)),
            "message": bytes(data[items[2][1]:items[2][2]]).decode("utf-8", "replace")}


def ldap_entry(data, pos, end):
    """(DN, {attribute lower-cased: [str]}) of a SearchResultEntry's value."""
    _, s, e = der_item(data, pos, end)
    dn = data[s:e].decode("utf-8", "replace")
    _, pos, end = der_item(data, e, end)
    attrs = {}
    while pos < end:
        n = data[pos + 1]                               # one attribute: its type, its values
        if n < 0x80 and pos + 2 + n <= end and data[pos + 3] < 0x80:
            s, stop = pos + 2, pos + 2 + n
            ts, te = s + 2, s + 2 + data[s + 1]
        else:
            _, s, stop = der_item(data, pos, end)
            _, ts, te = der_item(data, s, stop)
        _, p, vend = der_item(data, te, stop)
        values = []
        while p < vend:
            n = data[p + 1]
            if n < 0x80 and p + 2 + n <= vend:          # most values: a one-byte length
                values.append(data[p + 2:p + 2 + n].decode("utf-8", "replace"))
                p += 2 + n
            else:
                _, vs, p = der_item(data, p, vend)
                values.append(data[vs:p].decode("utf-8", "replace"))
        attrs[data[ts:te].decode("utf-8", "replace").lower()] = values
        pos = stop
    return dn, attrs


def ldap_uuid(raw):
    """The entryUUID text (RFC 4530: lower-case, hyphenated) of its 16 bytes."""
    h = bytes(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def ldap_controls(data, pos, end):
    """{OID: (value start, value end) or None} of a message's controls."""
    out = {}
    for _, s, e in der_children(data, pos, end):
        parts = der_children(data, s, e)
        oid = bytes(data[parts[0][1]:parts[0][2]]).decode("ascii", "replace")
        value = [(vs, ve) for tag, vs, ve in parts[1:] if tag == 0x04]
        out[oid] = value[0] if value else None
    return out


def ldap_sync_info(data, pos, end):
    """The events of a Sync Info Message (RFC 4533 §2.5): ("present" | "deletes", [uuids])
    for entries unchanged or gone; ("phase", "present" | "delete") when a refresh phase
    ends, and ("done", []) when the refresh is over; ("cookie", bytes) after what a new
    cookie covers."""
    tag, s, e = der_item(data, pos, end)
    if tag == 0x80:                                     # newcookie
        return [("cookie", bytes(data[s:e]))]
    if tag not in (0xA1, 0xA2, 0xA3):
        return []
    parts = der_children(data, s, e)
    flags = [data[vs] != 0 for t, vs, ve in parts if t == 0x01]
    if tag == 0xA3:                                     # syncIdSet
        uuids = [ldap_uuid(data[us:ue]) for t, vs, ve in parts if t == 0x31
                 for _, us, ue in der_children(data, vs, ve)]
        events = [("deletes" if flags and flags[0] else "present", uuids)]
    else:                                               # refreshDelete, refreshPresent
        events = [("phase", "delete" if tag == 0xA1 else "present")]
        if not flags or flags[0]:                       # refreshDone (TRUE by default)
            events.append(("done", []))
    return events + [("cookie", bytes(data[vs:ve])) for t, vs, ve in parts if t == 0x04]


class LdapWire:
    """One LDAPv3 connection (ldap://, ldaps://, ldapi://) that binds and searches, in
    the calling thread (an executor's). Failures raise LdapFailure; a connection that
    cannot be made or bound, StoreError."""

    def __init__(self, url, bind_dn, password, timeout):
        self.url, self.msgid, self.buf = url, 0, bytearray()
        self.sock = self.connect(url, timeout)
        try:
            self.bind(bind_dn, password)
        except LdapFailure as e:
            self.close()
            raise StoreError(f"cannot bind to the LDAP directory {url}: "
                             f"{e.result.get('description')} ({e.result.get('message')})",
                             code=475) from None
        except BaseException:
            self.close()
            raise

    @staticmethod
    def connect(url, timeout):
        """A socket to the directory at ``url`` (scheme://host[:port])."""
        import socket
        import urllib.parse
        scheme, _, where = url.partition("://")
        try:
            if scheme == "ldapi":
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(timeout)
                sock.connect(urllib.parse.unquote(where) or "/var/run/slapd/ldapi")
                return sock
            host, port = parse_hostport(where, 636 if scheme == "ldaps" else 389, url)
            sock = socket.create_connection((host, port), timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if scheme == "ldaps":
                import ssl
                context = ssl.create_default_context(cafile=os.environ.get("LDAPTLS_CACERT"))
                sock = context.wrap_socket(sock, server_hostname=host)
            return sock
        except (OSError, ValueError, UsageError) as e:
            raise StoreError(f"cannot reach the LDAP directory {url}: "
                             f"{getattr(e, 'strerror', None) or e}", code=475) from None

    def bind(self, bind_dn, password):
        """A simple bind as ``bind_dn``, SASL EXTERNAL over ldapi:// without one, else
        anonymous; StoreError when the directory says no."""
        if bind_dn:
            auth = ber_str(password or "", 0x80)
        elif self.url.startswith("ldapi"):
            auth = ber(0xA3, ber_str("EXTERNAL"))
        else:
            auth = ber_str("", 0x80)
        msgid = self.send(ber(0x60, ber_int(3) + ber_str(bind_dn or "") + auth))
        _, tag, data, s, e, _ = self.reply(msgid, "binding")
        result = ldap_result(data, s, e) if tag == 0x61 else {"result": -1}
        if result["result"] != 0:
            who = f" as {bind_dn}" if bind_dn else ""
            raise StoreError(f"cannot bind to the LDAP directory {self.url}{who}: "
                             f"{result.get('description')} {result.get('message') or ''}"
                             .rstrip(), code=475)

    def send(self, op, controls=b""):
        """Send one request; its message id."""
        self.msgid += 1
        message = ber_int(self.msgid) + op + (ber(0xA0, controls) if controls else b"")
        try:
            self.sock.sendall(ber(0x30, message))
        except OSError as e:
            raise self.cut(e) from None
        return self.msgid

    def cut(self, error):
        """The LdapFailure for a connection that broke (``lost``: reconnect before the
        next try)."""
        failure = LdapFailure({"description": "connection lost",
                               "message": getattr(error, "strerror", None) or str(error)},
                              f"the LDAP directory {self.url}")
        failure.lost = True
        return failure

    def message(self, wait=True):
        """The next whole message as (id, op tag, data, op start, op end, controls span
        or None), receiving as needed; None when ``wait`` is false and none is in."""
        buf = self.buf
        while True:
            if len(buf) >= 2:
                n, head = buf[1], 2
                if n & 0x80:
                    size = n & 0x7F
                    if buf[0] != 0x30 or not 0 < size <= 4:
                        raise self.garbled(ValueError("not an LDAP message"))
                    n = int.from_bytes(buf[2:2 + size], "big") if len(buf) >= 2 + size else -1
                    head += size
                if n > LDAP_MAX_MESSAGE:
                    raise self.garbled(ValueError(f"a message of {n} bytes"))
                if n >= 0 and len(buf) >= head + n:
                    data = bytes(buf[:head + n])
                    del buf[:head + n]
                    return self.parse(data, head)
            if not wait:
                return None
            try:
                chunk = self.sock.recv(1 << 18)
            except TimeoutError:
                raise
            except OSError as e:
                raise self.cut(e) from None
            if not chunk:
                raise self.cut(OSError("the directory closed the connection"))
            buf += chunk

    def parse(self, data, pos):
        """The parts of one LDAPMessage (``data[pos:]`` its SEQUENCE's contents)."""
        end = len(data)
        try:
            _, s, e = der_item(data, pos, end)
            msgid = int.from_bytes(data[s:e], "big")
            tag, s, op_end = der_item(data, e, end)
            controls = der_item(data, op_end, end)[1:] if op_end < end else None
        except ValueError as e:
            raise self.garbled(e) from None
        return msgid, tag, data, s, op_end, controls

    def garbled(self, error):
        """The LdapFailure for a reply that is not well-formed BER."""
        failure = LdapFailure({"description": "protocolError", "message": str(error)},
                              f"reading a reply of the LDAP directory {self.url}")
        failure.lost = True
        return failure

    def reply(self, msgid, what):
        """The next message of request ``msgid`` (a notice of disconnection: LdapFailure)."""
        while True:
            try:
                message = self.message()
            except TimeoutError as e:
                raise self.cut(e) from None
            if message[0] == msgid:
                return message
            if message[0] == 0 and message[1] == 0x78:      # a notice of disconnection
                raise self.cut(OSError(f"the directory ended the session while {what}"))

    def search_request(self, base, filt, scope, attrs, controls=b""):
        """Send a SearchRequest; its message id."""
        scopes = {"BASE": 0, "LEVEL": 1, "SUBTREE": 2}
        try:
            filter_ber = ldap_filter(filt)
        except ValueError as e:
            raise LdapFailure({"description": "filterError", "message": str(e)}, "a search")
        op = ber(0x63, ber_str(base) + ber_int(scopes[scope], 0x0A) + ber_int(0, 0x0A)
                 + ber_int(0) + ber_int(0) + ber(0x01, b"\x00") + filter_ber
                 + ber(0x30, b"".join(ber_str(a) for a in attrs)))
        return self.send(op, controls)

    def search(self, base, filt, scope="SUBTREE", attrs=("*",), page=LDAP_PAGE):
        """Every entry under ``base`` matching ``filt`` as (DN, {attr lower: [str]}), in
        pages of ``page`` (RFC 2696); LdapFailure when the directory refuses or stops."""
        cookie, out = b"", []
        while True:
            paged = ber(0x30, ber_str(PAGED_OID) + ber_str(ber(0x30, ber_int(page)
                                                             + ber_str(cookie))))
            msgid = self.search_request(base, filt, scope, attrs, paged)
            while True:
                _, tag, data, s, e, controls = self.reply(msgid, "searching")
                try:
                    if tag == 0x64:
                        out.append(ldap_entry(data, s, e))
                        continue
                    if tag != 0x65:                     # a referral: not followed
                        continue
                    result = ldap_result(data, s, e)
                    found = ldap_controls(data, *controls).get(PAGED_OID) if controls else None
                    if found:
                        _, vs, ve = der_item(data, *found)
                        items = der_children(data, vs, ve)
                        cookie = bytes(data[items[1][1]:items[1][2]])
                    else:
                        cookie = b""
                except (ValueError, IndexError) as e:
                    raise self.garbled(e) from None
                break
            if result["result"] == 32:
                return out
            if result["result"] != 0:
                raise LdapFailure(result, "a search (raise its size limit for paged "
                                          "searches: size.prtotal=unlimited)")
            if not cookie:
                return out

    def sync_request(self, base, filt, attrs, cookie=None):
        """Start a Content Sync (RFC 4533) in refreshAndPersist mode: every entry (or, with
        the ``cookie`` of an earlier sync, what changed since), then each change as it is
        made."""
        value = ber_int(3, 0x0A) + (ber_str(cookie) if cookie is not None else b"")
        control = ber(0x30, ber_str(SYNC_REQUEST_OID) + ber(0x01, b"\xff")
                      + ber_str(ber(0x30, value)))
        self.sync_id = self.search_request(base, filt, "SUBTREE", attrs, control)

    def sync_events(self, wait=True):
        """The Content Sync's next events, as many as have come in (waiting for the first
        when ``wait``): ("entry", uuid, DN, attrs), ("delete", uuid, DN),
        ("present" | "deletes", [uuids]), ("phase", "present" | "delete"), ("done", [])
        when the refresh is over and ("cookie", bytes) after what a cookie covers.
        LdapFailure when the directory ends the sync."""
        events, message = [], self.message(wait)
        while message is not None:
            msgid, tag, data, s, e, controls = message
            if msgid == 0 and tag == 0x78:
                raise self.cut(OSError("the directory ended the session"))
            if msgid == self.sync_id:
                try:
                    events += self.sync_event(tag, data, s, e, controls)
                except (ValueError, IndexError) as error:
                    raise self.garbled(error) from None
            message = self.message(wait=False)
        return events

    def sync_event(self, tag, data, s, e, controls):
        """The events of one message of the Content Sync."""
        if tag == 0x64:
            state = ldap_controls(data, *controls).get(SYNC_STATE_OID) if controls else None
            if state is None:
                raise ValueError("an entry of the sync without its state")
            items = der_children(data, *der_item(data, *state)[1:])
            kind = data[items[0][1]]
            uuid = ldap_uuid(data[items[1][1]:items[1][2]])
            cookie = [("cookie", bytes(data[vs:ve])) for t, vs, ve in items[2:] if t == 0x04]
            dn, attrs = ldap_entry(data, s, e)
            if kind == 3:
                return [("delete", uuid, dn), *cookie]
            if kind == 0:
                return [("present", [uuid]), *cookie]
            return [("entry", uuid, dn, attrs), *cookie]
        if tag == 0x79:                                 # an Intermediate Response
            parts = {t: (vs, ve) for t, vs, ve in der_children(data, s, e)}
            name = bytes(data[slice(*parts.get(0x80, (0, 0)))])
            if 0x81 in parts and name == SYNC_INFO_OID.encode():
                return ldap_sync_info(data, *parts[0x81])
            return []
        if tag == 0x65:
            result = ldap_result(data, s, e)
            raise LdapFailure(result, "the Content Sync")
        return []

    def update(self, op, tag, what, read=()):
        """Send the write ``op`` and wait for its response (op tag ``tag``): (the result,
        and with ``read``, those attributes of the entry as the write left it, from the
        Post-Read control (RFC 4527): (DN, {attr lower: [str]}), else None)."""
        controls = ber(0x30, ber_str(POST_READ_OID) + ber(0x01, b"\xff") + ber_str(
            ber(0x30, b"".join(ber_str(a) for a in read)))) if read else b""
        msgid = self.send(op, controls)
        _, got, data, s, e, found = self.reply(msgid, what)
        try:
            if got != tag:
                raise ValueError(f"answered with op {got:#x}")
            result, entry = ldap_result(data, s, e), None
            value = ldap_controls(data, *found).get(POST_READ_OID) if found else None
            if value is not None and result["result"] == 0:
                _, es, ee = der_item(data, *value)
                entry = ldap_entry(data, es, ee)
        except (ValueError, IndexError) as error:
            raise self.garbled(error) from None
        return result, entry

    def add(self, dn, attrs, read=()):
        """AddRequest of ``dn`` with {attribute: [values]} (object classes included)."""
        body = b"".join(ber(0x30, ber_str(a) + ber(0x31, b"".join(map(ber_str, values))))
                        for a, values in attrs.items())
        return self.update(ber(0x68, ber_str(dn) + ber(0x30, body)), 0x69, f"adding {dn}", read)

    def modify(self, dn, changes, read=()):
        """ModifyRequest of ``dn``: {attribute: [(MODIFY_ADD | _DELETE | _REPLACE, values)]}."""
        body = b"".join(ber(0x30, ber_int(LDAP_MODIFY_OPS[op], 0x0A) + ber(
            0x30, ber_str(a) + ber(0x31, b"".join(map(ber_str, values)))))
            for a, ops in changes.items() for op, values in ops)
        return self.update(ber(0x66, ber_str(dn) + ber(0x30, body)), 0x67, f"changing {dn}",
                           read)

    def rename(self, dn, rdn, read=()):
        """ModifyDNRequest: ``dn`` gets the new first RDN ``rdn`` (the old value goes)."""
        op = ber(0x6C, ber_str(dn) + ber_str(rdn) + ber(0x01, b"\xff"))
        return self.update(op, 0x6D, f"renaming {dn}", read)

    def delete(self, dn):
        """DelRequest of ``dn``."""
        return self.update(ber_str(dn, 0x4A), 0x6B, f"deleting {dn}")

    def hung_up(self):
        """Whether the directory has ended this idle connection (slapd's idletimeout, a
        restart): with no request outstanding, anything to read is its end or a notice
        of disconnection."""
        import select
        try:
            return bool(self.buf or getattr(self.sock, "pending", int)()
                        or select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def unbind(self):
        """Say goodbye and close."""
        with contextlib.suppress(OSError, AttributeError):
            self.sock.sendall(ber(0x30, ber_int(self.msgid + 1) + ber(0x42, b"")))
        self.close()

    def close(self):
        """Close the socket (a blocked read in another thread returns)."""
        import socket
        with contextlib.suppress(OSError, AttributeError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError, AttributeError):
            self.sock.close()


class LdapLayout:
    """Where records live in the directory and how their fields map to attributes (pure)."""

    def __init__(self, schema, base, custom=False):
        self.schema, self.base, self.custom = schema, base, custom
        self.base_rdns = split_dn(base)

    def tenant_dn(self, tenant):
        """The DN under which ``tenant``'s people and hosts live."""
        return f"ou={escape_dn_value(tenant)},ou=tenants,{self.base}" if tenant else self.base

    def container(self, rtype, tenant):
        """The DN of the ou that holds records of ``rtype`` in ``tenant``."""
        return f"ou={'people' if rtype == PERSON else 'hosts'},{self.tenant_dn(tenant)}"

    def dn(self, record):
        """The DN a new record gets: uid=ALIAS,ou=people,... or cn=HOST,ou=hosts,..."""
        rtype = record["type"]
        attr = "uid" if rtype == PERSON else "cn"
        return (f"{attr}={escape_dn_value(record[KEY_FIELD[rtype]])},"
                f"{self.container(rtype, record.get('tenant', ''))}")

    def owner_dn(self, alias, tenant):
        """The DN of the person ``alias`` in ``tenant`` (a machine's owner)."""
        return f"uid={escape_dn_value(alias)},{self.container(PERSON, tenant)}"

    def tenant_of(self, rdns):
        """The tenant an entry's DN (as RDNs) puts it in ("" outside ou=tenants)."""
        n = len(self.base_rdns)
        if len(rdns) > n + 2 and [(a, v.lower()) for a, v in rdns[-n:]] == [
                (a, v.lower()) for a, v in self.base_rdns] and rdns[-n - 1] == ("ou", "tenants"):
            return rdns[-n - 2][1]
        return ""

    def extra_values(self, record):
        """Fields with no standard attribute as key=value texts (key:json= for non-text)."""
        out, by_name = [], self.schema.by_name
        for name, value in record.items():
            if name == "notes" and value.startswith(LDAP_PREFIX):
                out.append(f"notes={value}")        # not a plain description: it would
                continue                            # read back as a field
            if name in LDAP_OWN_FIELDS or name in LDAP_ATTRS[record["type"]]:
                continue
            field = by_name.get(name)
            if field is not None and type(value) is list and field.multi:
                out += [f"{name}={v}" for v in value]
            elif field is not None and type(value) is str:
                out.append(f"{name}={value}")
            else:
                out.append(f"{name}:json={journal_json(value)}")
        return out

    def classes(self, record):
        """The object classes a record's entry needs."""
        if record["type"] == PERSON:
            classes = ["inetOrgPerson"]
        else:
            classes = ["device"] + ["ipHost"] * bool(record.get("ip")) + [
                "ieee802Device"] * bool(record.get("mac"))
        return classes + ["pharosRecord"] * (self.custom and bool(self.extra_values(record)))

    def attrs(self, record):
        """{attribute: [values]} of a record's entry (object classes apart)."""
        rtype, out = record["type"], {}
        for name, attr in LDAP_ATTRS[rtype].items():
            if name in record:
                value = record[name]
                out[attr] = value if type(value) is list else [value]
        if rtype == PERSON:
            out.update(self.name_attrs(record), uid=[record["alias"]])
        else:
            out["cn"] = [record["hostname"]]
            if record.get("owner"):
                out["owner"] = [self.owner_dn(record["owner"], record.get("tenant", ""))]
        extra = self.extra_values(record)
        plain = self.plain_notes(record)
        if self.custom:
            if extra:
                out["pharosField"] = extra
        else:
            plain += [LDAP_PREFIX + v for v in extra]
        if plain:
            out["description"] = plain
        return out

    @staticmethod
    def plain_notes(record):
        """The notes as a plain description value: [] when none, or when they begin as a
        prefixed value would (then they are kept as pharos:notes=...)."""
        notes = record.get("notes")
        return [notes] if notes and not notes.startswith(LDAP_PREFIX) else []

    @staticmethod
    def name_attrs(record):
        """cn, sn and givenName of a person: the name, its last word and the rest."""
        name = record.get("name") or record["alias"]
        words = name.split()
        out = {"cn": [name], "sn": [words[-1] if words else name]}
        if len(words) > 1:
            out["givenName"] = [" ".join(words[:-1])]
        return out

    def changes(self, old, new, info):
        """Modify changes turning ``old``'s entry into ``new``'s, touching only the
        attributes whose fields changed (attributes Pharos does not map stay as they are).

        ``info`` is what the entry holds now (``entry_info``); returns
        {attribute: [(operation, values)]}. Replacing with no values removes an attribute
        and is no error when it is absent.
        """
        before, after = self.attrs(old), self.attrs(new)
        skip = {"description", "pharosField", "uid", "cn" if new["type"] == MACHINE else ""}
        if new["type"] == PERSON and not info["uid_rdn"]:
            skip.discard("uid")
        changes = {attr: [("MODIFY_REPLACE", after.get(attr, []))]
                   for attr in set(before) | set(after)
                   if attr not in skip and before.get(attr) != after.get(attr)}
        self.description_changes(old, new, info, changes)
        self.class_changes(new, info["classes"], changes)
        return changes

    def description_changes(self, old, new, info, changes):
        """Value-level description changes (the notes and the prefixed values that moved),
        and pharosField replaced when its values changed."""
        extra = self.extra_values(new)
        notes = list(info["plain"]) if old.get("notes") == new.get("notes") else (
            self.plain_notes(new))
        was = list(info["plain"]) + list(info["prefixed"])
        foreign = [v for v in info["prefixed"] if self.foreign(v[len(LDAP_PREFIX):], old)]
        will = notes + foreign + ([] if self.custom else [LDAP_PREFIX + v for v in extra])
        gone = [v for v in was if v not in will]
        came = [v for v in will if v not in was]
        ops = [("MODIFY_DELETE", gone)] * bool(gone) + [("MODIFY_ADD", came)] * bool(came)
        if ops:
            changes["description"] = ops
        fields = extra if self.custom else []
        fields += [v for v in info["fields"] if self.foreign(v, old) and v not in fields]
        if sorted(fields) != sorted(info["fields"]):
            changes["pharosField"] = [("MODIFY_REPLACE", fields)]

    @staticmethod
    def foreign(text, old):
        """Whether a key=value text of an entry is none Pharos took into ``old`` (a field
        of another type, a field it never reads from there): a change keeps it."""
        key = extra_key(text)
        return key not in old or (key in LDAP_OWN_FIELDS and key != "notes")

    def class_changes(self, new, classes, changes):
        """Object classes to add or drop so the new attributes are allowed (and required)."""
        add, drop = [], []
        if new["type"] == MACHINE:
            if new.get("ip") and "iphost" not in classes:
                add.append("ipHost")
            if not new.get("ip") and "iphost" in classes:
                drop.append("ipHost")
            if new.get("mac") and "ieee802device" not in classes:
                add.append("ieee802Device")
        if self.custom and changes.get("pharosField", [(0, [])])[0][1] and (
                "pharosrecord" not in classes):
            add.append("pharosRecord")
        ops = [("MODIFY_ADD", add)] * bool(add) + [("MODIFY_DELETE", drop)] * bool(drop)
        if ops:
            changes["objectClass"] = ops

    def record(self, dn, attrs):
        """The record an entry ({attr lower-cased: [str]}) is, or None if it is none."""
        classes = {c.lower() for c in attrs.get("objectclass", ())}
        rdns = split_dn(dn)
        if "inetorgperson" in classes:
            rtype, key_attr = PERSON, "uid"
        elif classes & {"device", "iphost"}:
            rtype, key_attr = MACHINE, "cn"
        else:
            return None
        record = {"type": rtype}
        key = self.key_value(rdns, attrs, key_attr, rtype)
        if key is None:
            return None
        record[KEY_FIELD[rtype]] = key
        tenant = self.tenant_of(rdns)
        if tenant:
            record["tenant"] = tenant
        self.read_fields(record, attrs)
        record.setdefault("source", "ldap")
        if rtype == MACHINE:
            record.setdefault("status", "unknown")
        for name, attr in (("created", "createtimestamp"), ("modified", "modifytimestamp")):
            if name not in record and attrs.get(attr):
                record[name] = ldap_time(attrs[attr][0])
        return record

    def key_value(self, rdns, attrs, key_attr, rtype):
        """An entry's key: its RDN value when the RDN is the key attribute, else the first
        valid value of that attribute; None if none is valid."""
        check = check_alias if rtype == PERSON else check_hostname
        candidates = ([rdns[0][1]] if rdns and rdns[0][0] == key_attr else []) + list(
            attrs.get(key_attr, ()))
        for value in candidates:
            try:
                return check(value)
            except RecordError:
                continue
        return None

    def read_fields(self, record, attrs):
        """Fill ``record`` from the entry's attributes."""
        rtype, schema = record["type"], self.schema
        for name, attr in LDAP_ATTRS[rtype].items():
            values = attrs.get(attr.lower())
            if values:
                if name == "mac":
                    values = [mac_from_ldap(v) for v in values]
                elif name == "url":
                    values = [v.split(" ", 1)[0] for v in values]
                self.put_clean(record, schema.by_name[name], values)
        if rtype == PERSON:
            names = attrs.get("cn", ())
            if names and names[0] != record["alias"]:
                self.put_clean(record, schema.by_name["name"], names[:1])
        elif attrs.get("owner"):
            rdns = split_dn(attrs["owner"][0])
            if rdns and rdns[0][0] == "uid":
                self.put_clean(record, schema.by_name["owner"], [rdns[0][1]])
        plain = [v for v in attrs.get("description", ()) if not v.startswith(LDAP_PREFIX)]
        if plain:
            self.put_clean(record, schema.by_name["notes"], ["\n".join(plain)])
        extra = [v[len(LDAP_PREFIX):] for v in attrs.get("description", ())
                 if v.startswith(LDAP_PREFIX)] + list(attrs.get("pharosfield", ()))
        self.read_extra(record, extra)

    def read_extra(self, record, texts):
        """Fill ``record`` from key=value texts (key:json= for values that are not text)."""
        gathered = {}
        for text in texts:
            key, sep, value = text.partition("=")
            if not sep:
                continue
            if key.endswith(":json"):
                key = key[:-5]
                try:
                    value = json.loads(value)
                except ValueError:
                    continue
                if key in self.schema.by_name:      # a field's values are text
                    items = value if type(value) is list else [value]
                    gathered.setdefault(key, []).extend(v for v in items if type(v) is str)
                elif key not in LDAP_OWN_FIELDS:
                    record[key] = value
                continue
            gathered.setdefault(key, []).append(value)
        for key, values in gathered.items():
            field = self.schema.by_name.get(key)
            if field is None:
                if key not in LDAP_OWN_FIELDS:
                    record[key] = values if len(values) > 1 else values[0]
            elif record["type"] in field.types and (key not in LDAP_OWN_FIELDS or (
                    key == "notes" and "notes" not in record)):
                self.put_clean(record, field, values)

    def put_clean(self, record, field, values):
        """Set ``field`` from values the schema accepts (a bad value is left out)."""
        cleaned = []
        for value in values:
            try:
                value = self.schema.clean_value(field, value)
            except RecordError:
                continue
            if value and value not in cleaned:
                cleaned.append(value)
        cleaned = cleaned[:MAX_VALUES if field.multi else 1]
        if cleaned:
            record[field.name] = cleaned if field.multi else cleaned[0]


def extra_key(text):
    """The field a key=value (or key:json=value) text is of."""
    key = text.partition("=")[0]
    return key[:-5] if key.endswith(":json") else key


def entry_info(dn, attrs):
    """What an entry holds that a change must know: object classes, plain and prefixed
    description values, pharosField values, whether its RDN is uid (``attrs``: lower-cased
    names)."""
    description = attrs.get("description", ())
    return {"classes": frozenset(c.lower() for c in attrs.get("objectclass", ())),
            "plain": tuple(v for v in description if not v.startswith(LDAP_PREFIX)),
            "prefixed": tuple(v for v in description if v.startswith(LDAP_PREFIX)),
            "fields": tuple(attrs.get("pharosfield", ())),
            "uid_rdn": split_dn(dn)[0][0] == "uid", "dn": dn,
            "csn": (attrs.get("entrycsn") or [None])[0]}


class LdapStoreImage:
    """The LDAP store's image: its index, the entries behind it and the Content Sync's
    cookie under DATA, so a start loads them whole and asks only for what changed."""

    def image_name(self):
        """Where the image lives (DATA/ldap.image), or None when the store keeps none."""
        return os.path.join(self.image_dir, LDAP_IMAGE) if self.image_dir else None

    def image_source(self):
        """What an image must have been written for to be used: this directory, base and
        bind DN (another bind DN may see other entries)."""
        return ["ldap", self.url, self.bind_dn or ""]

    def read_image(self):
        """Fill the index from the image, if there is one for this directory: the Content
        Sync cookie it is current to, or None (logged when an image was there but could
        not be used: damaged, for another directory or Python, ...)."""
        name = self.image_name()
        if name is None or not os.path.exists(name):
            return None
        extra, why = None, None
        try:
            if not os.path.isfile(name):
                raise IsADirectoryError(0, "not a regular file")
            with open(name, "rb") as f:
                header = read_checked_line(f.readline(1024))
        except OSError as e:
            why = f"it cannot be read ({e.strerror})"
        except (ValueError, TypeError):
            why = "its header is damaged or from an older version"
        else:
            if header.get("format") != IMAGE_FORMAT or header != dict(
                    header, version=3, python=list(sys.version_info[:2]),
                    marshal=marshal.version, snapshot=self.image_source()):
                why = "it was written for another directory, bind DN or Python"
            else:
                extra, why = load_image(name, self.directory, header)
        if why is None:
            try:
                self.image_cookie = self.restore_image_state(extra)
                return self.image_cookie
            except (ValueError, TypeError, KeyError):
                why = "it is damaged"
        self.forget_image_state()
        self.log(f"ldap: not using {name}: {why}; loading every entry")
        return None

    def restore_image_state(self, extra):
        """Take up the store's own state saved with the image; its cookie. ValueError when
        it does not fit the records."""
        ids, info, ignored, cookie = extra["ids"], extra["info"], extra["ignored"], extra["cookie"]
        records = self.directory.records
        if (type(ids) is not dict or type(info) is not dict or type(ignored) is not dict
                or type(cookie) is not bytes or len(ids) != len(records)
                or info.keys() != records.keys() or any(type(i) is not dict for i in info.values())
                or any(type(u) is not str or info[rid]["uuid"] != u for u, rid in ids.items())):
            raise ValueError("the image's entries do not fit its records")
        self.ids, self.info, self.ignored = ids, info, ignored
        self.stamp, self.fresh = extra["stamp"], max(extra["fresh"], self.directory.next_id - 1)
        return cookie

    def forget_image_state(self):
        """Start from an empty index again (an image was found not to be usable)."""
        self.directory = Directory(self.schema)
        self.pending = PendingWrites(self.directory)
        self.ids, self.info, self.ignored, self.stamp, self.fresh = {}, {}, {}, None, 0

    def save_image(self, say=True):
        """Write the index, the entries behind it and the sync's cookie to DATA, so the
        next start loads them whole and asks the directory only for what changed since
        (logged when ``say``). Only a cache: the directory stays the truth."""
        name = self.image_name()
        if name is None or self.cookie is None or self.cookie == self.image_cookie:
            return                              # no sync to go on from, or nothing new
        extra = {"ids": self.ids, "info": self.info, "ignored": self.ignored,
                 "cookie": self.cookie, "stamp": self.stamp, "fresh": self.fresh}
        try:
            body = image_body(self.directory, extra)
            os.makedirs(self.image_dir, mode=0o700, exist_ok=True)
            write_image_file(name, image_header(self.schema, 0, self.image_source(), body),
                             body)
        except OSError as e:
            self.log(f"ldap: could not write {name} ({e.strerror}); the next start loads "
                     f"every entry")
            return
        self.image_cookie = self.cookie
        if say:
            self.log(f"ldap: wrote {name} for a quick start")


class LdapStoreSync:
    """The LDAP store's reads: entries into the index at start, then kept fresh by the
    Content Sync (or a poll), with backoff and a catch-up when the directory was away."""

    def convert(self, found):
        """(entryUUID, record or None, entry_info) of each (dn, attrs); notes the newest
        entryCSN."""
        out = []
        for dn, attrs in found:
            uuid = (attrs.get("entryuuid") or [dn.lower()])[0]
            stamp = (attrs.get("entrycsn") or [None])[0]
            if stamp and (self.stamp is None or stamp > self.stamp):
                self.stamp = stamp
            record = self.layout.record(dn, attrs)
            out.append((uuid, record, entry_info(dn, attrs)))
        return out

    def place(self, uuid, record, info, taken, moving=None):
        """The (id, record) op that puts one entry in the index, or None when it is no
        record or its key belongs to another entry (held back, logged once, until that
        key is free). ``taken``: keys this batch has given out; ``moving``: {id: the key it
        will have, or None} of records this batch changes or deletes."""
        if record is None:
            self.ignored[uuid] = None
            return None
        rid, scope = self.ids.get(uuid), key_scope(record)
        owner = taken.get(scope)
        if owner is None:
            owner = self.directory.key_owner(record["type"], scope[2], scope[0])
            if moving and owner in moving and moving[owner] != scope:
                owner = None                        # it gives the key up in this batch
        if owner is not None and owner != rid:
            if uuid not in self.ignored:
                self.log(f"ldap: not serving {info['dn']}: {record[KEY_FIELD[record['type']]]} "
                         f"is already the key of another entry")
            self.ignored[uuid] = (record, info)
            return None
        self.ignored.pop(uuid, None)
        if rid is None:
            rid = self.fresh = max(self.pending.new_id(), self.fresh + 1)
            self.ids[uuid] = rid
        taken[scope] = rid
        self.info[rid] = dict(info, uuid=uuid)
        return rid, record

    def load_entries(self, found):
        """Put the start-up load's converted entries into the index, ids in the order
        found."""
        pairs = []
        for uuid, record, info in found:
            op = self.place(uuid, record, info, {})
            if op is not None:
                pairs.append(op)
        self.load_records(pairs, f"the LDAP directory {self.url}")

    def refresh(self, wire, cookie=None):
        """Start a Content Sync on ``wire`` (from ``cookie``, when the index is as an
        earlier sync left it) and read its refresh phase: {"found": converted entries,
        "present": uuids said to be unchanged, "cookie": the newest cookie, "full": whether
        an entry the refresh neither brings nor calls unchanged is gone}; None when the
        directory refuses the sync (a size limit, say), which leaves polling."""
        wire.sync_request(self.layout.base, LDAP_ENTRY_FILTER, LDAP_READ_ATTRS, cookie)
        state = {"found": [], "present": set(), "cookie": None, "full": cookie is None}
        deadline = time.monotonic() + LDAP_LOAD_TIMEOUT
        try:
            while True:
                try:
                    events = wire.sync_events()
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise wire.cut(OSError("the Content Sync's refresh stalled")) from None
                    continue
                state["found"] += self.sync_found(events, state)
                if any(event[0] == "done" for event in events):
                    return state
        except LdapFailure as e:
            if getattr(e, "lost", False):
                raise
            if cookie is not None:      # e-syncRefreshRequired, a restored or crashed slapd
                self.log(f"ldap: the directory cannot go on from the last cookie "
                         f"({self.failure_text(e)}); loading every entry")
                return self.refresh(wire)
            hint = (" (let the bind DN search without a size limit to follow changes as "
                    "they are made)") if e.result.get("result") in (4, 11) else ""
            self.log(f"ldap: the directory refused Content Sync ({self.failure_text(e)}); "
                     f"polling for changes instead{hint}")
            return None

    def catch_up(self, refreshed):
        """Bring the index up to a refresh: its entries in, its deletes out, and, after a
        full one, every entry it neither brought nor called unchanged out too."""
        found = refreshed["found"]
        if refreshed["full"]:
            seen = refreshed["present"].union(uuid for uuid, _, _ in found)
            found = found + [(uuid, None, {"dn": self.info[rid]["dn"]}) for uuid, rid in
                             self.ids.items() if uuid not in seen and rid in self.info]
        self.apply_found(found, ())
        self.cookie = refreshed["cookie"] or self.cookie

    def sync_found(self, events, state):
        """The (uuid, record or None, entry_info) changes of Content Sync events; notes in
        ``state`` the uuids said to be unchanged ("present", when it keeps them), the
        newest cookie, and whether a present phase ran (making the refresh a full one)."""
        out, entries = [], []
        for event in events:
            kind = event[0]
            if kind == "entry":
                uuid, dn, attrs = event[1:]
                attrs.setdefault("entryuuid", [uuid])
                entries.append((dn, attrs))
                continue
            if entries:
                out += self.convert(entries)
                entries = []
            if kind == "delete":
                out.append((event[1], None, {"dn": event[2]}))
            elif kind == "deletes":
                out += [(uuid, None, {"dn": ""}) for uuid in event[1]]
            elif kind == "present" and state.get("present") is not None:
                state["present"].update(event[1])
            elif kind == "cookie":
                state["cookie"] = event[1]
            elif event == ("phase", "present"):
                state["full"] = True
        return out + (self.convert(entries) if entries else [])

    def attach(self):
        """Start the sync task the first time the event loop calls in."""
        if self.loop is not None or not self.executors:
            return
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.task = self.loop.create_task(self.sync())

    async def sync(self):
        """Follow the Content Sync (or poll) for changes other tools made; when the
        directory is gone, retry with backoff and catch up once it answers again."""
        backoff = LDAP_POLL
        while True:
            if not self.persist or self.down is not None:
                await asyncio.sleep(LDAP_POLL if self.down is None else backoff)
            try:
                await (self.follow() if self.persist else self.sync_once())
                backoff = LDAP_POLL
            except (StoreError, LdapFailure, OSError) as e:
                self.drop_follower()
                self.lost(self.failure_text(e))
                backoff = min(backoff * 2, LDAP_BACKOFF_MAX)

    async def follow(self):
        """Apply the Content Sync's changes as they come. Without a sync running (the
        connection was lost), start one from the last cookie: its refresh brings what
        changed meanwhile (or every entry again, and what it neither brings nor calls
        unchanged was deleted)."""
        loop, read = self.loop, self.executors["read"]
        if self.follower is None:
            await loop.run_in_executor(self.executors["write"], self.conn, "write")
            wire = await loop.run_in_executor(read, self.connect, self.timeout)
            try:
                refreshed = await loop.run_in_executor(read, self.refresh, wire, self.cookie)
            except BaseException:
                wire.close()
                raise
            if refreshed is None:                   # refused now: poll instead (logged)
                wire.close()
                self.persist = False
                return
            self.follower = wire
            if self.down is not None:
                self.down = None
                self.log(f"ldap: the directory {self.url} answers again; caught up")
            self.catch_up(refreshed)
        while self.follower is not None:            # (dropped: start again)
            found, cookie = await loop.run_in_executor(read, self.follow_batch, self.follower)
            self.touched = set()
            self.apply_found(found, ())
            self.cookie = cookie or self.cookie

    def follow_batch(self, wire):
        """In the read executor: the sync's next changes ([] after a quiet second) and
        the newest cookie among them (or None)."""
        state = {}
        try:
            return self.sync_found(wire.sync_events(), state), state.get("cookie")
        except TimeoutError:
            return [], None

    def drop_follower(self):
        """Stop following the Content Sync (a read blocked on it returns)."""
        wire, self.follower = self.follower, None
        if wire is not None:
            wire.close()

    async def sync_once(self):
        """One look at the directory: changed entries in, deleted ones (when a listing is
        due) out."""
        loop, was_down = self.loop, self.down is not None
        if was_down:
            await loop.run_in_executor(self.executors["write"], self.conn, "write")
        now = time.monotonic()
        listing = was_down or (self.unreconciled and now >= self.next_reconcile)
        known = {uuid: self.info[rid]["dn"].lower() for uuid, rid in self.ids.items()
                 if rid in self.info} if listing else None
        self.touched = set()
        found, context, took = await loop.run_in_executor(
            self.executors["read"], self.poll, self.stamp, self.context, known, self.ignored)
        if context != self.context or context is None:
            self.unreconciled = True
        self.context = context
        if known is not None:
            self.unreconciled = False
            self.next_reconcile = time.monotonic() + max(LDAP_RECONCILE_MIN,
                                                         LDAP_RECONCILE_FACTOR * took)
        if was_down:
            self.down = None
            self.log(f"ldap: the directory {self.url} answers again; caught up")
        self.apply_found(found, self.touched)

    def poll(self, stamp, context, known, ignored):
        """In the read executor: (changed or missed entries, contextCSN, seconds the
        listing took). ``known`` ({uuid: dn}) asks for a full listing that finds deletes."""
        conn = self.conn("read")
        now_context, found, took = self.context_csn(conn), [], 0.0
        if now_context is None or now_context != context or known is not None:
            filt = LDAP_ENTRY_FILTER if stamp is None else (
                f"(&{LDAP_ENTRY_FILTER}(entryCSN>={escape_filter_value(stamp)}))")
            found = self.convert(self.fetch(conn, filt))
        if known is not None:
            started = time.monotonic()
            listed = {(attrs.get("entryuuid") or [dn.lower()])[0]: dn.lower()
                      for dn, attrs in self.fetch(conn, LDAP_ENTRY_FILTER, ["entryUUID"])}
            took = time.monotonic() - started
            seen = {uuid for uuid, _, _ in found}
            missed = [u for u, dn in listed.items()
                      if u not in seen and u not in ignored and known.get(u) != dn]
            found += self.fetch_uuids(conn, missed)
            found += [(uuid, None, {"dn": dn}) for uuid, dn in known.items()
                      if uuid not in listed]
        return found, now_context, took

    def fetch_uuids(self, conn, uuids):
        """The converted entries with these entryUUIDs (fetched 50 at a time)."""
        found = []
        for i in range(0, len(uuids), 50):
            terms = "".join(f"(entryUUID={escape_filter_value(u)})" for u in uuids[i:i + 50])
            found += self.convert(self.fetch(conn, f"(&{LDAP_ENTRY_FILTER}(|{terms}))"))
        return found

    def apply_found(self, found, touched):
        """On the loop: put entries the directory changed into the index, drop the gone;
        then serve entries held back for a key this batch freed.

        Left alone: entries ``touched`` (uuids and DNs a write of ours touched since the
        poll began: the write has put its own, newer version in already), entries with
        writes in flight, and versions no newer (by entryCSN) than the one in the index.
        """
        kept, records = [], self.directory.records
        for uuid, record, info in found:
            dn = info["dn"].lower()
            rid = self.ids.get(uuid)
            if uuid in touched or dn in touched or dn in self.inflight or (
                    rid is not None and rid in self.pending.records):
                continue
            known = self.info.get(rid) if rid is not None else None
            if record is not None and known and info.get("csn") and known.get("csn") and (
                    info["csn"] <= known["csn"]):
                continue
            kept.append((uuid, record, info, rid))
        moving = {rid: record and key_scope(record) for _, record, _, rid in kept
                  if rid is not None}
        freed = {key_scope(records[rid]) for rid, scope in moving.items()
                 if rid in records and key_scope(records[rid]) != scope}
        drops, puts, taken = [], [], {}
        for uuid, record, info, rid in kept:
            if record is None:
                if rid is not None:
                    drops.append(rid)
                    del self.ids[uuid]
                    self.info.pop(rid, None)
                self.ignored.pop(uuid, None)
                continue
            op = self.place(uuid, record, info, taken, moving)
            if op is None and rid is not None:
                drops.append(rid)
                del self.ids[uuid]
                self.info.pop(rid, None)
            elif op is not None and records.get(op[0]) != record:
                puts.append(op)
        # out first, then in: a key another record gives up in this batch is free by then
        self.apply([(rid, None) for rid in drops] + [(rid, None) for rid, _ in puts] + puts)
        waiting = [(uuid, held[0], held[1]) for uuid, held in self.ignored.items()
                   if held is not None and key_scope(held[0]) in freed]
        if waiting:
            self.apply_found(waiting, ())

    def lost(self, reason):
        """The directory stopped answering: refuse writes until the sync reconnects (the
        Content Sync too, so it catches up with what a write left unconfirmed)."""
        if self.down is None:
            self.log(f"ldap: lost the directory {self.url} ({reason}); serving reads from "
                     f"memory, refusing writes until it is back")
        self.down = reason
        self.drop_follower()
        for name, executor in self.executors.items():
            executor.submit(self.drop_conn, name)


class LdapStoreWrites:
    """The LDAP store's writes: a commit's ops as LDAP operations in the write executor,
    into the index once the directory confirms them."""

    def commit(self, ops, audit=None):
        """Make ``ops`` LDAP operations: a Later of None once the directory has confirmed
        them all (and they are in the index), or of the StoreError that says why not."""
        self.attach()
        if self.readonly:
            return Later.now(StoreError(self.readonly))
        if self.down:
            return Later.now(StoreError(f"Database unavailable: the LDAP directory is "
                                        f"unreachable ({self.down}).", code=475))
        actions = [self.action(rid, record) for rid, record in ops]
        self.seq += 1
        seq, later = self.seq, Later()
        self.pending.hold(seq, ops)
        dns = [dn.lower() for action in actions for dn in (action["dn"], action["new_dn"])]
        for dn in dns:
            self.inflight[dn] = self.inflight.get(dn, 0) + 1
        future = self.loop.run_in_executor(self.executors["write"], self.write, actions)
        future.add_done_callback(lambda f: self.settle_write(f, seq, ops, dns, audit, later))
        return later

    def action(self, rid, record):
        """What one (id, record) op asks of the directory: add, change (with a rename when
        the key changes) or delete, with the DNs and attributes it needs."""
        layout, old = self.layout, self.pending.record(rid)
        info = self.info.get(rid)
        if old is not None and info is None:        # an add of ours still in flight
            dn = layout.dn(old)
            info = entry_info(dn, {"objectclass": layout.classes(old),
                                   **{k.lower(): v for k, v in layout.attrs(old).items()}})
        if old is None:
            dn = layout.dn(record)
            return {"kind": "add", "dn": dn, "new_dn": dn, "record": record,
                    "classes": layout.classes(record), "attrs": layout.attrs(record),
                    "parents": self.parents(record)}
        if record is None:
            return {"kind": "delete", "dn": info["dn"], "new_dn": info["dn"], "record": old}
        dn, keyname, rdn = info["dn"], KEY_FIELD[record["type"]], None
        rdn_attr = split_dn(dn)[0][0]
        if record[keyname] != old[keyname] and rdn_attr == ("uid" if keyname == "alias" else "cn"):
            rdn = f"{rdn_attr}={escape_dn_value(record[keyname])}"
        new_dn = dn if rdn is None else f"{rdn},{rdn_parent(dn)[1]}"
        return {"kind": "change", "dn": dn, "new_dn": new_dn, "rdn": rdn, "record": record,
                "changes": layout.changes(old, record, info),
                "unrenamed": dict(record, **{keyname: old[keyname]})}

    def parents(self, record):
        """(DN, ou value) of the containers a new record's entry needs, outermost first."""
        tenant, layout = record.get("tenant", ""), self.layout
        out = []
        if tenant:
            out += [(f"ou=tenants,{layout.base}", "tenants"), (layout.tenant_dn(tenant), tenant)]
        container = layout.container(record["type"], tenant)
        return out + [(container, "people" if record["type"] == PERSON else "hosts")]

    def write(self, actions):
        """In the write executor: perform ``actions`` in order; the entry_info of each.
        LdapFailure (with ``done``) at the first the directory refuses or cannot answer."""
        results = []
        try:
            conn = self.conn("write")
            if conn.hung_up():                      # ended while idle: nothing was lost
                self.drop_conn("write")
                conn = self.conn("write")
            for action in actions:
                results.append(self.perform(conn, action))
        except (LdapFailure, StoreError, OSError) as e:
            if not isinstance(e, LdapFailure):
                self.drop_conn("write")
                e = LdapFailure({}, self.failure_text(e))
                e.lost = True
            e.done, e.results = len(results), results
            raise e from None
        return results

    def perform(self, wire, action):
        """One action on ``wire``; the entry_info (and uuid) of the entry it leaves.

        A change modifies first and renames after, so a refused change leaves the entry
        as it was; a rename refused after the modify leaves the new record under its old
        key (the failure's ``partial``: that record and its entry_info)."""
        dn, kind = action["dn"], action["kind"]
        read = ([a for a in LDAP_WRITE_READ if self.layout.custom or a != "pharosField"]
                if self.post_read else ())
        if kind == "delete":
            result, _ = wire.delete(dn)
            if result["result"] not in (0, 32):         # gone already: so much the better
                raise LdapFailure(result, f"deleting {dn}")
            return None
        entry = None
        if kind == "add":
            attrs = {"objectClass": action["classes"], **action["attrs"]}
            result, entry = wire.add(dn, attrs, read)
            if result["result"] == 32:                  # the container is missing
                for parent, ou in action["parents"]:
                    wire.add(parent, {"objectClass": ["organizationalUnit"], "ou": [ou]})
                result, entry = wire.add(dn, attrs, read)
            if result["result"] != 0:
                raise LdapFailure(result, f"adding {dn}")
            return self.written_entry(wire, dn, entry, read)
        if action["changes"]:
            result, entry = wire.modify(dn, action["changes"], read)
            if result["result"] != 0:
                raise LdapFailure(result, f"changing {dn}")
        if action["rdn"]:
            result, renamed = wire.rename(dn, action["rdn"], read)
            if result["result"] != 0:
                failure = LdapFailure(result, f"renaming {dn}")
                if action["changes"]:
                    failure.partial = (action["unrenamed"],
                                       self.written_entry(wire, dn, entry, read))
                raise failure
            dn, entry = action["new_dn"], renamed
        return self.written_entry(wire, dn, entry, read)

    def written_entry(self, wire, dn, entry, read):
        """The entry_info (and uuid) of the entry a write left: from its Post-Read
        ``entry``, else read back. The bind DN must be able to read entryUUID."""
        if entry is None:
            found = wire.search(dn, "(objectClass=*)", "BASE", read or LDAP_WRITE_READ)
            if not found:
                raise LdapFailure({"description": "noSuchObject"}, f"reading back {dn}")
            entry = found[0]
        dn, attrs = entry
        if not attrs.get("entryuuid"):
            failure = LdapFailure({"description": "insufficientAccessRights"},
                                  f"{dn} was written, but the bind DN may not read its "
                                  f"entryUUID")
            failure.lost = True                         # the sync's catch-up brings it in
            raise failure
        return dict(entry_info(dn, attrs), uuid=attrs["entryuuid"][0])

    def settle_write(self, future, seq, ops, dns, audit, later):
        """``written``, and should it fail (a bug), the write still answered, not left
        waiting."""
        try:
            self.written(future, seq, ops, dns, audit, later)
        except Exception as e:  # noqa: BLE001 - the client must get an answer
            self.log(f"ldap: settling a write failed ({type(e).__name__}: {e})")
            if not later.settled:
                later.settle(StoreError(f"Store failed: {type(e).__name__}: {e}."))

    def written(self, future, seq, ops, dns, audit, later):
        """On the loop, once the directory has answered: the confirmed ops go into the
        index, the write's reply is settled."""
        for dn in dns:
            self.inflight[dn] -= 1
            if not self.inflight[dn]:
                del self.inflight[dn]
            self.touched.add(dn)
        error = future.exception()
        results = future.result() if error is None else getattr(error, "results", [])
        done, confirmed = len(results), ops[:len(results)]
        partial = getattr(error, "partial", None)       # (record, entry_info) as it was left
        if partial is not None:
            confirmed, results = confirmed + [(ops[done][0], partial[0])], results + [partial[1]]
        for (rid, record), info in zip(confirmed, results):
            self.confirmed(rid, record, info)
        undo = self.apply(confirmed)
        undo += [(rid, self.directory.records.get(rid)) for rid, _ in ops[len(confirmed):]]
        self.pending.release(seq, ops + confirmed, undo)
        if error is None:
            if audit is not None and self.audit_log is not None:
                self.audit_log.append(audit_json(audit).encode() + b"\n")
            later.settle(None)
        else:
            later.settle(self.refusal(error, ops, done))

    def confirmed(self, rid, record, info):
        """Note the entry behind record ``rid`` after a confirmed write (None: deleted)."""
        old = self.info.pop(rid, None)
        if old is not None:
            self.ids.pop(old["uuid"], None)
        if info is not None:
            self.ids[info["uuid"]] = rid
            self.info[rid] = info
            self.touched.add(info["uuid"])

    def refusal(self, error, ops, done):
        """The StoreError a failed write is answered with."""
        if not isinstance(error, LdapFailure):
            return StoreError(f"Store failed: {error}.")
        after = f" (after {done} of {len(ops)} records were written)" if done else ""
        if getattr(error, "partial", None) is not None:
            after += " (its other changes were written; it keeps its old name)"
        if getattr(error, "lost", False):
            self.lost(error.what)
            return StoreError(f"Database unavailable: the LDAP directory did not confirm "
                              f"the write{after} ({error.what}).", code=475)
        code = error.result.get("result")
        record = ops[done][1] or {}
        if code == 68 and record:
            what = "Alias" if record["type"] == PERSON else "Hostname"
            return StoreError(f"{what} {record[KEY_FIELD[record['type']]]} in use or is too "
                              f"common a name{after}.", code=509)
        return StoreError(f"{self.failure_text(error)}{after}.", code=LDAP_CODES.get(code, 400))


class LdapStore(LdapStoreImage, LdapStoreSync, LdapStoreWrites, MemoryStore):
    """Records in an LDAP directory, answered from the same in-memory index as the file
    store, written through. When the directory offers Content Sync (RFC 4533: slapd's
    syncprov), one refreshAndPersist search loads every entry at start and then brings
    each change other tools make as it is made; otherwise paged searches load it and a
    poll on entryCSN (with a periodic listing for deletes) keeps it fresh.

    LDAP calls run in two one-thread executors (writes; the sync's reads), each with its
    own LdapWire; the index changes only on the event loop, when the directory has
    confirmed a write or the sync has brought changes. The image, the sync and the writes
    are the mixins before this class.
    """

    kind = "ldap"

    def __init__(self, schema, url, bind_dn=None, password=None, log=None,
                 timeout=LDAP_TIMEOUT, sync="auto", image_dir=None):
        super().__init__(schema)
        self.url = url
        self.server_url, base = parse_ldap_url(url)
        self.layout = LdapLayout(schema, base)
        self.bind_dn, self.password, self.timeout = bind_dn, password, timeout
        self.log = log or (lambda msg: None)
        self.ids = {}               # entryUUID -> record id
        self.info = {}              # record id -> entry_info of its entry, plus its uuid
        self.ignored = {}           # entryUUID -> None (no valid record), or (record,
        #                             entry_info) held back while its key is another's
        self.down = None            # why the directory cannot be reached now, or None
        self.seq = 0
        self.inflight = {}          # DN lower-cased -> writes in flight to it
        self.touched = set()        # DNs and uuids written since the running poll began
        self.stamp = None           # newest entryCSN seen (finer than modifyTimestamp)
        self.context = None         # the base entry's contextCSN when last looked
        self.unreconciled = True    # something may have been deleted since the last listing
        self.next_reconcile = 0.0
        self.fresh = 0              # the last id given to an entry found in the directory
        self.loop = self.task = None
        self.conns = {}             # executor name -> its LdapWire
        self.post_read = None       # whether the directory answers a write with its entry
        self.executors = {}
        self.sync_mode = sync       # "auto": Content Sync when offered; "poll": never
        self.persist = False        # following a Content Sync (else polling)
        self.follower = None        # the LdapWire of the Content Sync, while it runs
        self.cookie = None          # the Content Sync's newest cookie the index is current to
        self.image_dir = image_dir  # where the image of the index is kept (DATA), or None
        self.image_cookie = None    # the cookie of the image read or written last

    def describe(self):
        """The storage as the start-up log names it: ldap, the URL, how it stays fresh."""
        self.attach()
        how = ("following changes through Content Sync" if self.persist else
               f"polling for changes every {LDAP_POLL:g} s")
        return f"ldap {self.url}, {how}"

    def unwritable(self):
        """Why writes would fail now (the directory unreachable), or None."""
        if self.down:
            return (f"the LDAP directory {self.url} is unreachable ({self.down}); "
                    f"answers may be stale")
        return self.readonly

    # -- connections (inside the executors) --

    def connect(self, timeout):
        """A bound LdapWire for reads, or a StoreError saying why not."""
        return LdapWire(self.server_url, self.bind_dn, self.password, timeout)

    def connect_writer(self, timeout):
        """A bound LdapWire for writes (asking once whether the directory offers the
        Post-Read control), or a StoreError saying why not."""
        wire = self.connect(timeout)
        if self.post_read is None:
            try:
                self.post_read = POST_READ_OID in self.root_controls(wire)
            except LdapFailure:
                wire.close()
                raise StoreError(f"cannot read the root DSE of the LDAP directory {self.url}",
                                 code=475) from None
        return wire

    def conn(self, name):
        """The executor ``name``'s connection, connecting first if it has none."""
        conn = self.conns.get(name)
        if conn is None:
            connect = self.connect_writer if name == "write" else self.connect
            conn = self.conns[name] = connect(self.timeout)
        return conn

    def drop_conn(self, name):
        """Forget (and unbind) the executor ``name``'s connection."""
        conn = self.conns.pop(name, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.unbind()

    def fetch(self, wire, filt, attrs=LDAP_READ_ATTRS, base=None, scope="SUBTREE"):
        """Every entry matching ``filt`` as (dn, {attr lower: [str]}), page by page, read
        on ``wire`` (an LdapWire); LdapFailure if the directory refuses or cuts it short."""
        return wire.search(base or self.layout.base, filt, scope, attrs)

    def root_controls(self, wire):
        """The controls the directory's root DSE says it supports."""
        found = wire.search("", "(objectClass=*)", "BASE", ["supportedControl"])
        return set(found[0][1].get("supportedcontrol", ())) if found else set()

    def context_csn(self, conn):
        """The base entry's contextCSN (changes with every write when syncprov runs), or
        None when the directory keeps none."""
        found = self.fetch(conn, "(objectClass=*)", ["contextCSN"], scope="BASE")
        values = found[0][1].get("contextcsn") if found else None
        return "|".join(sorted(values)) if values else None

    def can_read_uuids(self, wire):
        """Whether the bind DN may read the base entry's entryUUID (True when there is no
        base entry to look at)."""
        found = self.fetch(wire, "(objectClass=*)", ["entryUUID"], scope="BASE")
        return not found or bool(found[0][1].get("entryuuid"))

    def has_pharos_schema(self, conn):
        """Whether the directory's subschema has the pharosRecord object class."""
        found = self.fetch(conn, "(objectClass=subschema)", ["objectClasses"],
                           base="cn=subschema", scope="BASE")
        return bool(found) and any("'pharosRecord'" in v
                                   for v in found[0][1].get("objectclasses", ()))

    # -- start-up --

    def open(self):
        """Bind, look for the pharos schema and for Content Sync, load every entry: from
        the image a clean stop left under DATA and what changed since its cookie when
        there is one, else the sync's whole refresh (or paged searches when there is no
        sync to follow)."""
        try:
            wire = self.connect(LDAP_LOAD_TIMEOUT)
        except StoreError as e:
            raise DataError(str(e)) from None
        cookie = None
        try:
            self.layout.custom = self.has_pharos_schema(wire)
            if not self.can_read_uuids(wire):
                wire.close()
                raise DataError(f"the LDAP directory {self.url} does not let "
                                f"{self.bind_dn or 'this client'} read entryUUID, which Pharos "
                                f"needs to follow entries: grant read access to entryUUID and "
                                f"entryCSN")
            refreshed = None
            if self.sync_mode == "auto" and SYNC_REQUEST_OID in self.root_controls(wire):
                cookie = self.read_image()
                refreshed = self.refresh(wire, cookie)
            if refreshed is None:
                if cookie is not None:                  # no sync to go on from after all
                    self.forget_image_state()
                    cookie = None
                self.context = self.context_csn(wire)
                found = self.convert(self.fetch(wire, LDAP_ENTRY_FILTER))
        except LdapFailure as e:
            wire.close()
            raise DataError(f"cannot load from the LDAP directory {self.url}: "
                            f"{self.failure_text(e)}") from None
        self.persist = refreshed is not None
        if self.persist:
            wire.sock.settimeout(self.timeout)
            self.follower = wire
        else:
            wire.unbind()
        if cookie is None:
            self.load_entries(refreshed["found"] if self.persist else found)
            self.cookie = refreshed and refreshed["cookie"]
        else:
            self.catch_up(refreshed)
            changes = plural(len(refreshed["found"]), "change", "changes")
            self.log(f"ldap: started from {self.image_name()} and the {changes} since")
        if self.persist and (cookie is None or len(refreshed["found"]) > LDAP_IMAGE_CHANGES):
            self.save_image(say=False)
        from concurrent.futures import ThreadPoolExecutor
        self.executors = {name: ThreadPoolExecutor(1, thread_name_prefix=f"pharos-ldap-{name}")
                          for name in ("write", "read")}
        return self

    def select(self, selection, tenant=None):
        """``MemoryStore.select`` (and the sync task started, if it is not)."""
        self.attach()
        return super().select(selection, tenant)

    def search(self, selection, tenant=None, limit=None):
        """``MemoryStore.search`` (and the sync task started, if it is not)."""
        self.attach()
        return super().search(selection, tenant, limit)

    def metrics(self, out, now):
        """The memory store's families, and whether the directory answers."""
        super().metrics(out, now)
        prom_family(out, "pharos_ldap_connected", "gauge",
                    "1 while the LDAP directory answers, else 0.", [((), 0 if self.down else 1)])

    def failure_text(self, error):
        """One line saying what went wrong with the directory."""
        if isinstance(error, LdapFailure):
            result = error.result
            return " ".join(f"{error.what}: {result.get('description')} "
                            f"{result.get('message') or ''}".split())
        return " ".join(str(error).split()) or type(error).__name__

    async def close(self):
        """Stop the sync, finish the writes in flight, unbind."""
        self.drop_follower()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        loop = asyncio.get_running_loop()
        for name, executor in self.executors.items():
            await loop.run_in_executor(None, executor.shutdown, True)
            self.drop_conn(name)
        await asyncio.sleep(0)                      # let the last writes settle
        if self.persist and self.down is None:
            self.save_image()


# SECTION: SSH — wire encoding, public keys, SSHSIG, pure-Python verifiers, agent client

SSHSIG_NAMESPACE = "pharos"
SSHSIG_MAGIC = b"SSHSIG"
SSHSIG_HASHES = ("sha256", "sha512")
MAX_SIGNATURE_TEXT = 16 * 1024
RSA_MIN_BITS, RSA_MAX_BITS, RSA_MAX_E_BITS = 2048, 16384, 64
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521")


def ssh_string(data):
    """``data`` as an SSH wire string: a uint32 length, then the bytes."""
    return struct.pack(">I", len(data)) + data


class SSHReader:
    """A strict reader for SSH wire data (RFC 4251 uint32, string, mpint)."""

    __slots__ = ("data", "pos")

    def __init__(self, data):
        self.data, self.pos = bytes(data), 0

    def take(self, n):
        """The next ``n`` bytes; SSHFormatError if fewer are left."""
        if n < 0 or self.pos + n > len(self.data):
            raise SSHFormatError("truncated SSH data")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u32(self):
        """The next big-endian uint32."""
        return struct.unpack(">I", self.take(4))[0]

    def string(self, limit=1 << 16):
        """The next SSH string's bytes; SSHFormatError if longer than ``limit``."""
        n = self.u32()
        if n > limit:
            raise SSHFormatError("SSH string too long")
        return self.take(n)

    def text(self, limit=256):
        """The next SSH string decoded as UTF-8 (at most ``limit`` bytes)."""
        try:
            return self.string(limit).decode("utf-8")
        except UnicodeDecodeError:
            raise SSHFormatError("SSH text is not UTF-8") from None

    def mpint(self, limit=RSA_MAX_BITS // 8 + 1):
        """The next mpint as an int; SSHFormatError if it is negative."""
        raw = self.string(limit)
        if raw and raw[0] & 0x80:
            raise SSHFormatError("negative mpint")
        return int.from_bytes(raw, "big")

    def end(self):
        """Raise SSHFormatError unless every byte has been read."""
        if self.pos != len(self.data):
            raise SSHFormatError("trailing data")


# Ed25519 (RFC 8032), extended twisted-Edwards coordinates; cofactorless like OpenSSH.
ED_P = 2 ** 255 - 19
ED_L = 2 ** 252 + 27742317777372353535851937790883648493
# d = -121665/121666 and sqrt(-1) = 2^((p-1)/4) mod p, written out: start-up skips the pow()s
# (tests/test_auth.py works them out again).
ED_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
ED_D2 = 2 * ED_D % ED_P
ED_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
ED_IDENTITY = (0, 1, 1, 0)


def ed_add(p1, p2):
    """The sum of two Ed25519 points in extended coordinates."""
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    p = ED_P
    a, b = (y1 - x1) * (y2 - x2) % p, (y1 + x1) * (y2 + x2) % p
    c, d = t1 * ED_D2 * t2 % p, 2 * z1 * z2 % p
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % p, g * h % p, f * g % p, e * h % p)


def ed_double(p1):
    """Twice an Ed25519 point in extended coordinates."""
    x1, y1, z1, _ = p1
    p = ED_P
    a, b, c = x1 * x1 % p, y1 * y1 % p, 2 * z1 * z1 % p
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return (e * f % p, g * h % p, f * g % p, e * h % p)


def ed_is_identity(point):
    """Whether an extended-coordinates point is the identity (x = 0, y = z)."""
    x, y, z, _ = point
    return x % ED_P == 0 and (y - z) % ED_P == 0


def ed_encode(point):
    """The 32-byte encoding of a point: y little-endian, the low bit of x on top."""
    x, y, z, _ = point
    zi = pow(z, ED_P - 2, ED_P)
    x, y = x * zi % ED_P, y * zi % ED_P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def ed_decode(data):
    """A point from its 32-byte encoding, or None (non-canonical y, off the curve, -0)."""
    if len(data) != 32:
        return None
    y = int.from_bytes(data, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= ED_P:
        return None
    u, v = (y * y - 1) % ED_P, (ED_D * y * y + 1) % ED_P
    x = u * pow(v, 3, ED_P) * pow(u * pow(v, 7, ED_P), (ED_P - 5) // 8, ED_P) % ED_P
    vx2 = v * x * x % ED_P
    if vx2 == (-u) % ED_P:
        x = x * ED_SQRT_M1 % ED_P
    elif vx2 != u:
        return None
    if x == 0 and sign:
        return None
    if (x & 1) != sign:
        x = ED_P - x
    return (x, y, 1, x * y % ED_P)


def ed_table(point):
    """Fixed-base comb: row i holds [j * 16**i] point for j in 0..15."""
    table, base = [], point
    for _ in range(64):
        row = [ED_IDENTITY, base]
        for _ in range(14):
            row.append(ed_add(row[-1], base))
        table.append(row)
        base = ed_double(ed_double(ed_double(ed_double(base))))
    return table


def ed_mul_table(table, k):
    """``k`` times the point whose comb ``table`` (from ed_table) is given."""
    q, i = ED_IDENTITY, 0
    while k:
        if k & 15:
            q = ed_add(q, table[i][k & 15])
        k >>= 4
        i += 1
    return q


# The base point B (y = 4/5, x positive) in extended coordinates, written out as ED_D is.
ED_BASE = (15112221349535400772501151409588531511454012693041857206046113283949847762202,
           46316835694926478169428394003475163141307993866256225615783033603165251855960, 1,
           46827403850823179245072216630277197565144205554125654976674165829533817101731)
ED_BASE_TABLE = []                      # filled on first use (4 ms)


def ed_mul_base(k):
    """``k`` times the Ed25519 base point (its comb table built on first use)."""
    if not ED_BASE_TABLE:
        ED_BASE_TABLE.extend(ed_table(ED_BASE))
    return ed_mul_table(ED_BASE_TABLE, k)


class Ed25519Key:
    """An Ed25519 public key; small-order keys are refused (they verify any message)."""

    __slots__ = ("raw", "point", "table")

    def __init__(self, raw):
        point = ed_decode(raw)
        if point is None:
            raise SSHFormatError("invalid Ed25519 public key encoding")
        if ed_is_identity(ed_double(ed_double(ed_double(point)))):
            raise SSHFormatError("small-order Ed25519 public key")
        self.raw, self.point, self.table = bytes(raw), point, None

    def verify(self, sig, msg):
        """RFC 8032 verification; S must be below L (OpenSSH does not check that)."""
        if len(sig) != 64:
            return False
        s = int.from_bytes(sig[32:], "little")
        if s >= ED_L:
            return False
        if self.table is None:
            self.table = ed_table(self.point)
        k = int.from_bytes(hashlib.sha512(sig[:32] + self.raw + msg).digest(), "little") % ED_L
        ka = ed_mul_table(self.table, k)
        r = ed_add(ed_mul_base(s), ((-ka[0]) % ED_P, ka[1], ka[2], (-ka[3]) % ED_P))
        return hmac.compare_digest(ed_encode(r), sig[:32])


DIGEST_INFO = {"sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
               "sha512": bytes.fromhex("3051300d060960864801650304020305000440")}
RSA_SIG_HASH = {"rsa-sha2-256": "sha256", "rsa-sha2-512": "sha512"}   # never ssh-rsa (SHA-1)


def rsa_verify(n, e, hashname, data, sig):
    """PKCS#1 v1.5: build the whole expected block and compare it all (no parsing)."""
    k = (n.bit_length() + 7) // 8
    s = int.from_bytes(sig, "big")
    if len(sig) > k or s >= n:
        return False
    t = DIGEST_INFO[hashname] + hashlib.new(hashname, data).digest()
    if k < len(t) + 11:
        return False
    expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return hmac.compare_digest(pow(s, e, n).to_bytes(k, "big"), expected)


class Curve:
    """A NIST prime curve y^2 = x^3 - 3x + b with its generator, order and hash."""

    __slots__ = ("name", "p", "b", "n", "gx", "gy", "hashname", "size")

    def __init__(self, name, p, b, n, gx, gy, hashname):
        self.name, self.p, self.b, self.n, self.gx, self.gy = name, p, b, n, gx, gy
        self.hashname, self.size = hashname, (p.bit_length() + 7) // 8


CURVES = {c.name: c for c in (
    Curve("nistp256", 2 ** 256 - 2 ** 224 + 2 ** 192 + 2 ** 96 - 1,
          0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
          0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
          0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
          0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5, "sha256"),
    Curve("nistp384", 2 ** 384 - 2 ** 128 - 2 ** 96 + 2 ** 32 - 1,
          0xB3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875AC656398D8A2ED19D2A85C8EDD3EC2AEF,
          0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
          0xAA87CA22BE8B05378EB1C71EF320AD746E1D3B628BA79B9859F741E082542A385502F25DBF55296C3A545E3872760AB7,
          0x3617DE4A96262C6F5D9E98BF9292DC29F8F41DBD289A147CE9DA3113B5F0B8C00A60B1CE1D7E819D7A431D7C90EA0E5F,
          "sha384"),
    Curve("nistp521", 2 ** 521 - 1,
          0x0051953EB9618E1C9A1F929A21A0B68540EEA2DA725B99B315F3B8B489918EF109E156193951EC7E937B1652C0BD3BB1BF073573DF883D2C34F1EF451FD46B503F00,
          0x01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409,
          0x00C6858E06B70404E9CD9E3ECB662395B4429C648139053FB521F828AF606B4D3DBAA14B5E77EFE75928FE1DC127A2FFA8DE3348B3C1856A429BF97E7E31C2E5BD66,
          0x011839296A789A3BC0045C8A5FB42C7D1BD998F54449579B446817AFBD17273E662C97EE72995EF42640C550B9013FAD0761353C7086A272C24088BE94769FD16650,
          "sha512"))}
JACOBIAN_INFINITY = (0, 1, 0)


def jacobian_double(p1, p):
    """Twice a Jacobian point on an a = -3 curve modulo ``p``."""
    x1, y1, z1 = p1
    if z1 == 0 or y1 == 0:
        return JACOBIAN_INFINITY
    delta, gamma = z1 * z1 % p, y1 * y1 % p
    beta, alpha = x1 * gamma % p, 3 * (x1 - delta) * (x1 + delta) % p
    x3 = (alpha * alpha - 8 * beta) % p
    z3 = ((y1 + z1) * (y1 + z1) - gamma - delta) % p
    return (x3, (alpha * (4 * beta - x3) - 8 * gamma * gamma) % p, z3)


def jacobian_add(p1, p2, p):
    """The sum of two Jacobian points modulo ``p`` (doubling when they are equal)."""
    x1, y1, z1 = p1
    x2, y2, z2 = p2
    if z1 == 0:
        return p2
    if z2 == 0:
        return p1
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    h, r = (u2 - u1) % p, (s2 - s1) % p
    if h == 0:
        return jacobian_double(p1, p) if r == 0 else JACOBIAN_INFINITY
    hh = h * h % p
    hhh, v = h * hh % p, u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return (x3, (r * (v - x3) - s1 * hhh) % p, z1 * z2 * h % p)


def ec_decode_point(curve, data):
    """(x, y) of an uncompressed point; SSHFormatError unless it lies on ``curve``."""
    if len(data) != 1 + 2 * curve.size or data[0] != 4:
        raise SSHFormatError("ECDSA key must be an uncompressed point")
    x = int.from_bytes(data[1:1 + curve.size], "big")
    y = int.from_bytes(data[1 + curve.size:], "big")
    if not (x < curve.p and y < curve.p and (y * y - (x ** 3 - 3 * x + curve.b)) % curve.p == 0):
        raise SSHFormatError("ECDSA point is not on the curve")
    return x, y


def ecdsa_verify(curve, point, data, r, s):
    """ECDSA verification with Shamir's trick; r and s must lie in [1, n)."""
    n, p = curve.n, curve.p
    if not (1 <= r < n and 1 <= s < n):
        return False
    e = int.from_bytes(hashlib.new(curve.hashname, data).digest(), "big")
    e >>= max(0, hashlib.new(curve.hashname).digest_size * 8 - n.bit_length())
    w = pow(s, -1, n)
    u1, u2 = e * w % n, r * w % n
    g, q = (curve.gx, curve.gy, 1), (point[0], point[1], 1)
    both, acc = jacobian_add(g, q, p), JACOBIAN_INFINITY
    for i in range(max(u1.bit_length(), u2.bit_length()) - 1, -1, -1):
        acc = jacobian_double(acc, p)
        bits = ((u1 >> i) & 1, (u2 >> i) & 1)
        if bits != (0, 0):
            acc = jacobian_add(acc, both if bits == (1, 1) else g if bits[0] else q, p)
    x, _, z = acc
    return z != 0 and x * pow(z * z, -1, p) % p % n == r


class PublicKey:
    """A parsed SSH public key: its exact wire blob (the identity) and what verifies with it."""

    __slots__ = ("keytype", "blob", "ed25519", "rsa", "curve", "point", "fast")

    def __init__(self, blob):
        reader = SSHReader(blob)
        self.keytype, self.blob = reader.text(64), bytes(blob)
        self.ed25519 = self.rsa = self.curve = self.point = self.fast = None
        if self.keytype == "ssh-ed25519":
            raw = reader.string(64)
            if len(raw) != 32:
                raise SSHFormatError("bad Ed25519 key length")
            self.ed25519 = Ed25519Key(raw)
        elif self.keytype == "ssh-rsa":
            e, n = reader.mpint(), reader.mpint()
            if not (0 < n and n & 1 and n.bit_length() <= RSA_MAX_BITS):
                raise SSHFormatError("bad RSA modulus")
            if n.bit_length() < RSA_MIN_BITS:
                raise SSHFormatError(f"RSA key of {n.bit_length()} bits is below the "
                                     f"{RSA_MIN_BITS}-bit minimum")
            if not (e & 1 and 3 <= e < n and e.bit_length() <= RSA_MAX_E_BITS):
                raise SSHFormatError("bad RSA public exponent")
            self.rsa = (n, e)
        elif self.keytype.startswith("ecdsa-sha2-"):
            self.curve = CURVES.get(reader.text(64))
            if self.curve is None or self.keytype != "ecdsa-sha2-" + self.curve.name:
                raise SSHFormatError(f"unsupported ECDSA key {self.keytype}")
            self.point = ec_decode_point(self.curve, reader.string(1 + 2 * 66))
        else:
            raise SSHFormatError(f"unsupported key type {self.keytype!r}")
        reader.end()

    @property
    def fingerprint(self):
        """The OpenSSH fingerprint: SHA256: and the unpadded base64 digest of the blob."""
        digest = base64.b64encode(hashlib.sha256(self.blob).digest()).decode()
        return "SHA256:" + digest.rstrip("=")

    def openssh(self):
        """The key as an OpenSSH public key line without a comment."""
        return f"{self.keytype} {base64.b64encode(self.blob).decode()}"

    def verify(self, data, sigblob):
        """Whether ``sigblob`` (string alg, string sig) signs ``data`` with this key."""
        try:
            reader = SSHReader(sigblob)
            alg = reader.text(64)
            if self.rsa is not None:
                hashname, sig = RSA_SIG_HASH.get(alg), reader.string(RSA_MAX_BITS // 8)
                reader.end()
                return hashname is not None and self.verify_rsa(hashname, data, sig, sigblob)
            if alg != self.keytype:
                return False
            if self.ed25519 is not None:
                sig = reader.string(64)
                reader.end()
                return self.verify_ed25519(data, sig, sigblob)
            inner = SSHReader(reader.string(2 * 70 + 16))
            reader.end()
            r, s = inner.mpint(), inner.mpint()
            inner.end()
            if self.fast is not None:
                return (1 <= r < self.curve.n and 1 <= s < self.curve.n
                        and self.fast.verify(data, sigblob))
            return ecdsa_verify(self.curve, self.point, data, r, s)
        except SSHFormatError:
            return False

    def verify_ed25519(self, data, sig, sigblob):
        """Check an Ed25519 signature: through asyncssh when loaded, else pure Python."""
        if self.fast is not None:
            return (len(sig) == 64 and int.from_bytes(sig[32:], "little") < ED_L
                    and self.fast.verify(data, sigblob))
        return self.ed25519.verify(sig, data)

    def verify_rsa(self, hashname, data, sig, sigblob):
        """Check an RSA signature: through asyncssh when loaded, else pure Python."""
        if self.fast is not None:
            return self.fast.verify(data, sigblob)
        return rsa_verify(*self.rsa, hashname, data, sig)

    def use_asyncssh(self):
        """Verify through asyncssh (OpenSSL) when it is installed; our own checks stay."""
        try:
            from asyncssh.public_key import decode_ssh_public_key
            self.fast = decode_ssh_public_key(self.blob)
        except Exception:
            self.fast = None
        return self.fast is not None


def sshsig_signed_data(namespace, message, hashalg):
    """The bytes an SSHSIG signature covers (PROTOCOL.sshsig)."""
    return (SSHSIG_MAGIC + ssh_string(namespace.encode()) + ssh_string(b"")
            + ssh_string(hashalg.encode()) + ssh_string(hashlib.new(hashalg, message).digest()))


def sshsig_blob(pubkey_blob, namespace, hashalg, signature):
    """An SSHSIG version 1 blob from its parts (the inverse of sshsig_parse)."""
    return (SSHSIG_MAGIC + struct.pack(">I", 1) + ssh_string(pubkey_blob)
            + ssh_string(namespace.encode()) + ssh_string(b"") + ssh_string(hashalg.encode())
            + ssh_string(signature))


def sshsig_parse(blob):
    """(public key blob, namespace, hash algorithm, signature blob); SSHFormatError if bad."""
    reader = SSHReader(blob)
    if reader.take(6) != SSHSIG_MAGIC or reader.u32() != 1:
        raise SSHFormatError("not an SSHSIG version 1 signature")
    pubkey, namespace = reader.string(16384), reader.text(1024)
    reader.string(1024)
    hashalg, signature = reader.text(64), reader.string(16384)
    reader.end()
    return pubkey, namespace, hashalg, signature


def sshsig_from_text(text):
    """The SSHSIG blob from one line of base64, or from ssh-keygen's armored output."""
    if len(text) > MAX_SIGNATURE_TEXT:
        raise SSHFormatError("signature too large")
    body = re.sub(r"-----(BEGIN|END) SSH SIGNATURE-----", "", text)
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        raise SSHFormatError("signature is not base64") from None


def armor_to_line(armored):
    """The base64 between ssh-keygen's armor lines, joined into one line."""
    return "".join(x.strip() for x in armored.splitlines() if x.strip() and "-----" not in x)


SSH_AGENTC_REQUEST_IDENTITIES, SSH_AGENT_IDENTITIES_ANSWER = 11, 12
SSH_AGENTC_SIGN_REQUEST, SSH_AGENT_SIGN_RESPONSE = 13, 14
SSH_AGENT_RSA_SHA2_512 = 0x04
AGENT_MAX_REPLY = 256 * 1024


class AgentClient:
    """A small blocking ssh-agent client over $SSH_AUTH_SOCK: list keys and sign."""

    def __init__(self, path=None, timeout=60.0):
        path = path or os.environ.get("SSH_AUTH_SOCK")
        if not path:
            raise SSHFormatError("no ssh-agent (SSH_AUTH_SOCK is not set)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise SSHFormatError(f"cannot reach ssh-agent at {path}: {e.strerror}") from None

    def close(self):
        """Close the connection to the agent."""
        self.sock.close()

    def request(self, kind, body=b""):
        """Send one agent message; (reply type, SSHReader over the rest of the reply)."""
        payload = bytes([kind]) + body
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)
        size = struct.unpack(">I", self.receive(4))[0]
        if not 0 < size <= AGENT_MAX_REPLY:
            raise SSHFormatError(f"bad ssh-agent reply length {size}")
        reply = self.receive(size)
        return reply[0], SSHReader(reply[1:])

    def receive(self, n):
        """Exactly ``n`` bytes from the agent; SSHFormatError if it closes first."""
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise SSHFormatError("ssh-agent closed the connection")
            data += chunk
        return data

    def identities(self):
        """[(public key blob, comment)] held by the agent."""
        kind, reader = self.request(SSH_AGENTC_REQUEST_IDENTITIES)
        if kind != SSH_AGENT_IDENTITIES_ANSWER:
            raise SSHFormatError(f"unexpected ssh-agent reply {kind}")
        return [(reader.string(16384), reader.text(4096)) for _ in range(reader.u32())]

    def sshsig(self, key_blob, message, namespace=SSHSIG_NAMESPACE):
        """An SSHSIG blob over ``message``; the private key never leaves the agent."""
        keytype = SSHReader(key_blob).text(64)
        flags = SSH_AGENT_RSA_SHA2_512 if keytype == "ssh-rsa" else 0
        data = sshsig_signed_data(namespace, message, "sha512")
        kind, reader = self.request(SSH_AGENTC_SIGN_REQUEST, ssh_string(key_blob)
                                    + ssh_string(data) + struct.pack(">I", flags))
        if kind != SSH_AGENT_SIGN_RESPONSE:
            raise SSHFormatError("ssh-agent refused to sign")
        signature = reader.string(16384)
        return sshsig_blob(key_blob, namespace, "sha512", signature)


def sign_with_ssh_keygen(key_path, message, namespace=SSHSIG_NAMESPACE, timeout=60.0):
    """An SSHSIG blob from `ssh-keygen -Y sign` (it may prompt for a passphrase)."""
    import subprocess
    try:
        result = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", namespace, "-f",
                                 key_path], input=message, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SSHFormatError(f"ssh-keygen could not sign: {e}") from None
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        raise SSHFormatError(f"ssh-keygen could not sign with {key_path}: "
                             f"{reason[-1] if reason else 'failed'}")
    return sshsig_from_text(result.stdout.decode("ascii", "replace"))


def usable_key(blob):
    """Whether ``blob`` is a public key Pharos can verify."""
    try:
        PublicKey(blob)
        return True
    except SSHFormatError:
        return False


def asyncssh_sshsig(key_path, message, namespace=SSHSIG_NAMESPACE):
    """An SSHSIG blob signed by asyncssh from a private key file (no ssh-keygen needed)."""
    asyncssh = optional_import("asyncssh")
    try:
        armored = asyncssh.create_sshsig(asyncssh.read_private_key(key_path), message,
                                         namespace=namespace)
    except (OSError, ValueError, asyncssh.KeyImportError) as e:
        raise SSHFormatError(f"asyncssh could not sign with {key_path}: {e}") from None
    return sshsig_from_text(armored.decode() if isinstance(armored, bytes) else armored)


def client_signers(key_path=None):
    """Ways to sign a login challenge, best first: [(description, sign(message) -> blob)].

    The ssh-agent first (the private key never enters this process), then `ssh-keygen -Y
    sign` on --key/PHAROS_KEY or ~/.ssh/id_*, then asyncssh when ssh-keygen is missing.
    """
    import shutil
    wanted = None
    if key_path and not (os.path.exists(key_path) or os.path.exists(key_path + ".pub")):
        raise UsageError(f"--key {key_path}: no such file")
    if key_path:
        try:
            with open(key_path + ".pub" if not key_path.endswith(".pub") else key_path) as f:
                wanted = base64.b64decode(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            wanted = None
    signers = agent_signers(wanted)
    files = [key_path] if key_path else [os.path.expanduser(f"~/.ssh/id_{kind}")
                                         for kind in ("ed25519", "ecdsa", "rsa")]
    files = [f.removesuffix(".pub") for f in files if os.path.exists(f.removesuffix(".pub"))]
    if shutil.which("ssh-keygen"):
        signers += [(f"ssh-keygen with {f}", lambda m, f=f: sign_with_ssh_keygen(f, m))
                    for f in files]
    else:
        signers += [(f"asyncssh with {f}", lambda m, f=f: asyncssh_sshsig(f, m)) for f in files]
    return signers


def agent_signers(wanted=None):
    """A signer per usable ssh-agent identity (only ``wanted``'s blob when given)."""
    try:
        agent = AgentClient(timeout=60.0)
        identities = agent.identities()
    except (SSHFormatError, OSError):
        return []
    found = [(blob, comment) for blob, comment in identities
             if usable_key(blob) and (wanted is None or blob == wanted)]
    return [(f"ssh-agent key {comment or PublicKey(blob).fingerprint}",
             lambda m, b=blob: agent.sshsig(b, m)) for blob, comment in found]


# SECTION: Auth — the key list, logins, tiers, roles, tenants and the audit log

ROLES = ("reader", "writer", "admin")
KEYS_FILE = "authorized_keys"
MAX_KEYS_FILE = 4 * 1024 * 1024
AUDIT_FILE = "audit.log"
SESSION_ONLY_OPTIONS = frozenset((      # OpenSSH options about shell sessions: no bearing here
    "restrict", "no-agent-forwarding", "no-port-forwarding", "no-pty", "no-user-rc",
    "no-x11-forwarding", "agent-forwarding", "port-forwarding", "pty", "user-rc",
    "x11-forwarding", "no-touch-required", "verify-required"))
KEY_OPTIONS = frozenset(("role", "tenant", "valid-after", "valid-before", "expiry-time", "from",
                         "namespaces"))
TENANT_RE = LazyRegex(r"[A-Za-z0-9._-]{1,64}\Z|\*\Z")
PLAIN_NAME_RE = LazyRegex(r"[^*?!,\s]{1,64}\Z")     # one user name, no pattern
HOST_PATTERN_RE = LazyRegex(r"[A-Za-z0-9.:*?_%-]{1,255}\Z")   # from="..." hosts
FREE_VERBS = frozenset(("status", "siteinfo", "fields", "id", "login", "answer", "clear",
                        "email", "logout", "xlogin", "klogin", "help", "quit", "exit", "stop"))
WRITE_VERBS = frozenset(("add", "change", "delete", "merge"))
LOGIN_FAILURE_MEMORY = 900.0    # seconds a network prefix's failed logins are remembered
LOGIN_MAX_DELAY = 10.0          # the longest one prefix's failed answer waits on its own count
LOGIN_MAX_WAIT = 60.0           # the longest any failed answer waits, however busy the server
LOGIN_FAIL_RATE = 5             # failed answers the whole server sends per base login delay
LOGIN_PREFIX_V4, LOGIN_PREFIX_V6 = 24, 64
LOGIN_MAX_PREFIXES = 10000
LDAP_KEY_FILTER = "(sshPublicKey=*)"
LDAP_MEMBER_ATTRS = ["member", "uniqueMember", "memberUid"]
LDAP_KEYS_POLL = 1.0            # seconds between looks at the directory's keys and groups ...
LDAP_KEYS_SHARE = 3             # ... and at least this many times what the last look took
LDAP_MAX_KEY_ENTRIES = 100_000  # entries with keys read from the directory, at most
LDAP_MAX_ENTRY_KEYS = 32        # sshPublicKey values used of one entry
LDAP_MAX_KEY_TEXT = 16 * 1024   # characters of one sshPublicKey value
LDAP_MAX_MEMBERS = 1_000_000    # values of each member attribute of a group


class AuthorizedKey:
    """One usable line of the key list: who (principals), which key, role, tenant, limits."""

    __slots__ = ("principals", "key", "role", "tenant", "options", "comment", "lineno", "text")

    def __init__(self, principals, key, options, comment, lineno, text):
        self.principals, self.key, self.options = principals, key, dict(options)
        self.comment, self.lineno, self.text = comment, lineno, text
        self.role = self.options.get("role", "writer")
        self.tenant = self.options.get("tenant", "")


class Identity:
    """Who a session is logged in as."""

    __slots__ = ("alias", "role", "tenant", "fingerprint", "blob")

    def __init__(self, alias, entry):
        self.alias, self.role, self.tenant = alias, entry.role, entry.tenant
        self.fingerprint, self.blob = entry.key.fingerprint, entry.key.blob

    def same(self, other):
        """Whether ``other`` is this identity with the same rights."""
        mine = (self.alias, self.role, self.tenant, self.blob)
        return other is not None and mine == (other.alias, other.role, other.tenant, other.blob)


def options_end(text):
    """Index just past an OpenSSH options field (quotes may hold spaces)."""
    i, quoted = 0, False
    while i < len(text) and (quoted or text[i] not in " \t"):
        if text[i] == "\\" and text[i + 1:i + 2] == '"':
            i += 1
        elif text[i] == '"':
            quoted = not quoted
        i += 1
    if quoted:
        raise SSHFormatError("unterminated quote in options")
    return i


def parse_key_options(text):
    """[(name, value or None)] from `a,b="x",c="y z"` as OpenSSH writes them."""
    out, i, n = [], 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in ",=":
            j += 1
        name = text[i:j].lower()
        if not name or any(c in name for c in ' \t"'):
            raise SSHFormatError("bad option name")
        value = None
        if j < n and text[j] == "=":
            if text[j + 1:j + 2] != '"':
                raise SSHFormatError(f"option {name}: the value must be quoted")
            j, chars = j + 2, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and text[j + 1:j + 2] == '"':
                    j += 1
                chars.append(text[j])
                j += 1
            if j >= n:
                raise SSHFormatError(f"option {name}: missing end quote")
            j, value = j + 1, "".join(chars)
        out.append((name, value))
        if j < n:
            if text[j] != "," or j + 1 == n:
                raise SSHFormatError("bad options syntax")
            j += 1
        i = j
    return out


def parse_ssh_time(value):
    """YYYYMMDD[HHMM[SS]][Z] as ssh-keygen reads it: local time unless it ends in Z."""
    import calendar
    utc = value.endswith("Z")
    digits = value[:-1] if utc else value
    if parse_count(digits, 0, 10 ** 14) is None or len(digits) not in (8, 12, 14):
        raise SSHFormatError(f"bad time {value!r}")
    fields = (int(digits[0:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10] or 0),
              int(digits[10:12] or 0), int(digits[12:14] or 0), 0, 0, -1)
    return float(calendar.timegm(fields)) if utc else time.mktime(fields)


def parse_key_line(line, lineno=0, principals=None):
    """An AuthorizedKey from an allowed_signers or authorized_keys line; None for blanks.
    With ``principals`` the line is an authorized_keys line for them (no user name field).

    Raises SSHFormatError naming the problem: a line is used whole or not at all.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if not text.replace("\t", " ").isprintable():
        bad = next(c for c in text if c != "\t" and not c.isprintable())
        raise SSHFormatError(f"control or separator character U+{ord(bad):04X} in the line")
    head_end = options_end(text)
    head = text[:head_end]
    if principals is None and head not in KEY_TYPES and not looks_like_options(head):
        principals, text = head, text[head_end:].lstrip()
        if not text:
            raise SSHFormatError("no key after the user name")
    options = []
    if text.split(None, 1)[0] not in KEY_TYPES:
        end = options_end(text)
        options, text = parse_key_options(text[:end]), text[end:].lstrip()
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise SSHFormatError(f"no supported key ({', '.join(KEY_TYPES)})")
    try:
        key = PublicKey(base64.b64decode(parts[1], validate=True))
    except ValueError:
        raise SSHFormatError("key data is not base64") from None
    if key.keytype != parts[0]:
        raise SSHFormatError("key type does not match the key data")
    comment = parts[2] if len(parts) > 2 else ""
    check_key_options(options)
    if principals is None:
        principals = comment.split()[0] if comment.strip() else ""
        if not principals:
            raise SSHFormatError("an authorized_keys line needs a comment to name its user")
    return AuthorizedKey(principals, key, options, comment, lineno, line.strip())


def key_file_lines(text):
    """The lines of a key list: split at \\n only, the one line ending OpenSSH knows, so a
    line is read back exactly as it was checked and written."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def looks_like_options(head):
    """Whether the first field of a key line is an options list rather than user names."""
    known = KEY_OPTIONS | SESSION_ONLY_OPTIONS
    return "=" in head or all(item.lower() in known for item in head.split(","))


def check_key_options(options):
    """Refuse a line whose options we cannot honour in full."""
    for name, value in options:
        if name in SESSION_ONLY_OPTIONS:
            continue
        if name not in KEY_OPTIONS:
            raise SSHFormatError(f"option {name!r} is not supported, so the key is not used")
        if value is None:
            raise SSHFormatError(f"option {name} needs a value")
        if sum(other == name for other, _ in options) > 1:
            raise SSHFormatError(f"option {name} is given more than once")
        if name == "role" and value not in ROLES:
            raise SSHFormatError(f"role must be one of {', '.join(ROLES)}, not {value!r}")
        if name == "tenant" and not TENANT_RE.match(value):
            raise SSHFormatError(f"tenant {value!r} must be letters, digits, '.', '_', '-' or *")
        if name in ("valid-after", "valid-before", "expiry-time"):
            parse_ssh_time(value)
        if name == "from":
            check_from_patterns(value)


def check_from_patterns(value):
    """Refuse a from="..." list with a pattern OpenSSH would not read: each (after an
    optional !) is a CIDR block ipaddress accepts, or an address or host name pattern."""
    for pattern in value.split(","):
        body = pattern[1:] if pattern.startswith("!") else pattern
        if "/" in body:
            try:
                ipaddress.ip_network(body, strict=False)
            except ValueError:
                raise SSHFormatError(f"from: {body[:64]!r} is not a CIDR block") from None
        elif not HOST_PATTERN_RE.match(body):
            raise SSHFormatError(f"from: {body[:64]!r} is not an address or host name pattern")


def match_pattern(text, pattern):
    """OpenSSH match_pattern: * and ? wildcards, case-sensitive."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*").replace(r"\?", "."), text,
                        re.S) is not None


def match_pattern_list(text, patterns):
    """OpenSSH match_pattern_list: comma-separated, and a matching !negation wins."""
    found = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if match_pattern(text, pattern[1:] if negated else pattern):
            if negated:
                return False
            found = True
    return found


def address_allowed(address, patterns):
    """from="..." for a source address: host or address patterns, CIDR blocks, !negation."""
    found = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        try:
            hit = (ipaddress.ip_address(address) in ipaddress.ip_network(body, strict=False)
                   if "/" in body else match_pattern(address, body))
        except ValueError:
            hit = False
        if hit:
            if negated:
                return False
            found = True
    return found


def key_refusal(entry, alias, peer, now):
    """None when ``entry`` may log in as ``alias`` from ``peer`` at ``now``, else why not."""
    if not match_pattern_list(alias, entry.principals):
        return "the key is not listed for this user"
    options = entry.options
    if "namespaces" in options and not match_pattern_list(SSHSIG_NAMESPACE, options["namespaces"]):
        return "the key is not allowed for the pharos namespace"
    if "valid-after" in options and now < parse_ssh_time(options["valid-after"]):
        return "the key is not valid yet"
    for name in ("valid-before", "expiry-time"):
        if name in options and now > parse_ssh_time(options[name]):
            return "the key has expired"
    if "from" in options and (peer is None or not address_allowed(peer, options["from"])):
        return "the key may not be used from this address"
    return None


class KeyRing:
    """The parsed key list, indexed by the exact key blob; warnings for skipped lines."""

    def __init__(self, text="", source=KEYS_FILE):
        self.by_blob, self.warnings, self.entries = {}, [], []
        self.lines = key_file_lines(text)
        for lineno, line in enumerate(self.lines, 1):
            try:
                entry = parse_key_line(line, lineno)
            except SSHFormatError as e:
                self.warnings.append(f"{source} line {lineno}: {e}; line skipped")
                continue
            if entry is not None:
                self.entries.append(entry)
                self.by_blob.setdefault(entry.key.blob, []).append(entry)

    def with_entries(self, extra):
        """A ring of this one's entries and then ``extra`` (AuthorizedKeys from elsewhere):
        where both admit a login, this ring's entry is the one used."""
        ring = KeyRing()
        ring.lines, ring.warnings, ring.entries = self.lines, self.warnings, self.entries + extra
        for entry in ring.entries:
            ring.by_blob.setdefault(entry.key.blob, []).append(entry)
        return ring

    def recheck(self, identity, peer, now):
        """``identity`` as the key list has it now: the same, with its new rights, or None
        when its key was removed or no longer admits it (a login lasts only as long as the
        line that allowed it)."""
        for entry in self.by_blob.get(identity.blob, ()):
            if key_refusal(entry, identity.alias, peer, now) is None:
                fresh = Identity(identity.alias, entry)
                return identity if identity.same(fresh) else fresh
        return None

    def speed_up(self):
        """Hand the crypto to asyncssh (OpenSSL) when it is installed; True if it is."""
        return all([entry.key.use_asyncssh() for entry in self.entries]) and bool(self.entries)

    def verify(self, alias, message, signature_text, peer, now):
        """(Identity, None) for a good SSHSIG answer to ``message``, else (None, reason)."""
        try:
            pubkey, namespace, hashalg, signature = sshsig_parse(sshsig_from_text(signature_text))
        except SSHFormatError as e:
            return None, f"malformed signature: {e}"
        if namespace != SSHSIG_NAMESPACE:
            return None, f"signature namespace {namespace[:32]!r} is not {SSHSIG_NAMESPACE!r}"
        if hashalg not in SSHSIG_HASHES:
            return None, "unsupported hash algorithm"
        candidates = self.by_blob.get(pubkey)
        if not candidates:
            return None, "the key is not in the key list"
        reason = None
        for entry in candidates:
            reason = key_refusal(entry, alias, peer, now)
            if reason is None:
                data = sshsig_signed_data(SSHSIG_NAMESPACE, message, hashalg)
                if not entry.key.verify(data, signature):
                    return None, "bad signature"
                return Identity(alias, entry), None
        return None, reason


class KeyFile:
    """DATA/authorized_keys: loaded, reloaded when it changes, edited atomically."""

    def __init__(self, path, log, fast=True):
        self.path, self.log, self.fast = path, log, fast
        self.ring, self.stamp, self.checked = KeyRing(), None, 0.0

    def current(self, now=None):
        """The key ring, reloaded first if the file changed (looked at once a second)."""
        now = time.monotonic() if now is None else now
        if now - self.checked >= 1.0:
            self.checked = now
            self.reload_if_changed()
        return self.ring

    def stat(self):
        """The file's (mtime_ns, size, inode), or None when it cannot be stat'd."""
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def reload_if_changed(self):
        """Reload the key ring if the file's stat differs from the last load's."""
        stamp = self.stat()
        if stamp != self.stamp:
            self.reload()

    def reload(self):
        """Read the file into a new KeyRing (on a read error keep the old one); return it."""
        self.stamp = self.stat()
        try:
            text = self.read_text()
        except (OSError, UnicodeDecodeError) as e:
            self.log(f"cannot read {self.path}: {e}; keeping the keys loaded before")
            return self.ring
        return self.load(text)

    def read_text(self):
        """The file's text ("" when there is none); OSError when it cannot be read whole."""
        try:
            with open(self.path, encoding="utf-8", newline="") as f:
                text = f.read(MAX_KEYS_FILE + 1)
        except FileNotFoundError:
            return ""
        if len(text) > MAX_KEYS_FILE:
            raise OSError(errno.EFBIG, f"larger than {MAX_KEYS_FILE} bytes")
        return text

    def load(self, text):
        """Make ``text`` the key ring in use (its skipped lines logged); the ring."""
        ring = KeyRing(text, self.path)
        for warning in ring.warnings:
            self.log(warning)
        if self.fast:
            ring.speed_up()
        self.ring = ring
        return ring

    def edit(self, change):
        """Apply ``change`` to the file as it is now, under an exclusive lock; its result.

        ``change(ring)`` gets a ring read afresh under the lock and returns (the new lines,
        or None to leave the file alone, and a result). The server and `pharos keys --data`
        both edit through here, each holding DATA/authorized_keys.lock from its reading to
        its rename, so neither writes over an edit it did not see: an acknowledged removal
        stays removed and an acknowledged add stays added.
        """
        import fcntl
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.stamp = self.stat()
            lines, result = change(KeyRing(self.read_text(), self.path))
            if lines is not None:
                self.write_locked(lines)
            return result
        finally:
            os.close(fd)            # closing the descriptor releases the lock

    def write_lines(self, lines):
        """Replace the file's lines (under the lock) and load the result."""
        return self.edit(lambda ring: (lines, None))

    def write_locked(self, lines):
        """Replace the file atomically: a temp file of its own, fsync, rename, fsync the
        directory; then load what was written. The caller holds the lock."""
        if any("\n" in x.rstrip("\n") for x in lines):
            raise ValueError("a key list line holds a line break")
        text = "".join(x.rstrip("\n") + "\n" for x in lines)
        tmp = f"{self.path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        mode = os.stat(self.path).st_mode & 0o777 if os.path.exists(self.path) else 0o600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)         # who may read the roles: the owner, unless set wider
            with open(fd, "w", encoding="utf-8", closefd=False) as f:
                f.write(text)
                f.flush()
                os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(self.path) or ".")
        self.stamp = self.stat()
        return self.load(text)


def ldap_dn_key(dn):
    """A DN as a value to compare: its RDNs, attribute names and values lower-cased."""
    return tuple((attr, value.lower()) for attr, value in split_dn(dn))


def ldap_group_members(attrs):
    """(member DNs as ldap_dn_key, memberUid values) of a group entry: groupOfNames
    member, groupOfUniqueNames uniqueMember (its optional #'...'B dropped), posixGroup
    memberUid."""
    dns = attrs.get("member", [])[:LDAP_MAX_MEMBERS] + [
        re.sub(r"#'[01]*'B\Z", "", v) for v in attrs.get("uniquemember", [])[:LDAP_MAX_MEMBERS]]
    return (frozenset(ldap_dn_key(dn) for dn in dns),
            frozenset(attrs.get("memberuid", [])[:LDAP_MAX_MEMBERS]))


def ldap_role(dn_key, uid, groups):
    """The role group membership gives an entry: admin or writer when that role's group
    lists it (by DN, or its uid by memberUid), else reader."""
    for role in ("admin", "writer"):
        dns, uids = groups.get(role, ((), ()))
        if dn_key in dns or uid in uids:
            return role
    return "reader"


def ldap_key_entry(uid, value, role, tenant, dn):
    """The AuthorizedKey one sshPublicKey value (an authorized_keys line) gives ``uid``;
    SSHFormatError unless it is a key line used whole. Role and tenant are the
    directory's to give, so a value that names them is refused (a self-service ACL on
    sshPublicKey must not let a person make themself admin)."""
    if len(value) > LDAP_MAX_KEY_TEXT:
        raise SSHFormatError(f"longer than {LDAP_MAX_KEY_TEXT} characters")
    entry = parse_key_line(value, principals=uid)
    if entry is None:
        raise SSHFormatError("no key in it")
    if "role" in entry.options or "tenant" in entry.options:
        raise SSHFormatError("role and tenant come from the groups and the entry's place, "
                             "not from the key")
    comment = f"{entry.comment} ({printable(dn, 200)})".lstrip()
    return AuthorizedKey(uid, entry.key, dict(entry.options, role=role, tenant=tenant),
                         comment, 0, f"{uid} {value.strip()}")


def ldap_key_entries(layout, found, groups, cache):
    """({(dn, uid, value, role, tenant): AuthorizedKey}, complaints) of the keyed entries
    ``found`` ([(dn, attrs)]): each sshPublicKey value a key of the entry's uid, with the
    role ``groups`` give it and the tenant its place in the tree gives. Entries already in
    ``cache`` (the last listing's result) are not parsed again."""
    keys, complaints = {}, []
    if len(found) > LDAP_MAX_KEY_ENTRIES:
        complaints.append(f"{len(found)} entries have keys; only the first "
                          f"{LDAP_MAX_KEY_ENTRIES} are used")
    for dn, attrs in found[:LDAP_MAX_KEY_ENTRIES]:
        rdns, where = split_dn(dn), printable(dn, 200)
        uid, tenant = layout.key_value(rdns, attrs, "uid", PERSON), layout.tenant_of(rdns)
        if uid is None or (tenant and (tenant == "*" or not TENANT_RE.match(tenant))):
            complaints.append(f"{where}: no uid that is a valid user name, or a tenant ou "
                              f"that is no tenant name; its keys are not used")
            continue
        role, values = ldap_role(ldap_dn_key(dn), uid, groups), attrs.get("sshpublickey", [])
        if len(values) > LDAP_MAX_ENTRY_KEYS:
            complaints.append(f"{where}: {len(values)} keys; the first "
                              f"{LDAP_MAX_ENTRY_KEYS} are used")
        for n, value in enumerate(values[:LDAP_MAX_ENTRY_KEYS], 1):
            slot = (dn, uid, value, role, tenant)
            entry = cache.get(slot)
            if entry is None:
                try:
                    entry = ldap_key_entry(uid, value, role, tenant, dn)
                except SSHFormatError as e:
                    complaints.append(f"{where}: sshPublicKey value {n}: {e}; value skipped")
                    continue
            keys[slot] = entry
    return keys, complaints


class LdapKeyList(KeyFile):
    """DATA/authorized_keys and the directory's sshPublicKey values as one key list
    (``serve --ldap-keys``); where both admit a login, the authorized_keys line is used.

    A one-thread executor with a connection of its own lists the entries with keys and
    reads the admin and writer groups every LDAP_KEYS_POLL seconds (less often when a
    listing is slow), skipping the listing while the suffix's contextCSN is unchanged;
    the keys in use are swapped on the event loop, so a key removed or a member dropped
    in the directory stops working within about a second, at the next request of a
    session already logged in. While the directory is unreachable the keys last read stay
    in use (writes are refused then anyway).
    """

    def __init__(self, path, log, store, admin_group=None, writer_group=None, fast=True):
        super().__init__(path, log, fast)
        self.store, self.group_dns = store, {"admin": admin_group, "writer": writer_group}
        self.keys, self.found, self.merged = {}, [], None
        self.complaints, self.context, self.down = set(), None, None
        self.conn = self.executor = self.task = None

    def open(self):
        """Read the directory's keys once, before the server listens; DataError when the
        directory cannot be read or has no sshPublicKey attribute type."""
        store = self.store
        try:
            conn = store.connect(LDAP_LOAD_TIMEOUT)
        except StoreError as e:
            raise DataError(str(e)) from None
        try:
            if not self.has_lpk_schema(conn):
                raise DataError(f"--ldap-keys: the LDAP directory {store.url} has no "
                                f"sshPublicKey attribute type; load contrib/ldap/"
                                f"openssh-lpk.ldif into its cn=config")
            listed = self.listing(conn)
        except LdapFailure as e:
            raise DataError(f"--ldap-keys: cannot read keys from the LDAP directory "
                            f"{store.url}: {store.failure_text(e)}") from None
        finally:
            with contextlib.suppress(Exception):
                conn.unbind()
        self.take(listed)
        self.log(f"ldap: {len(self.found)} SSH key(s) from the directory's sshPublicKey values")
        from concurrent.futures import ThreadPoolExecutor
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pharos-ldap-keys")
        return self

    def has_lpk_schema(self, conn):
        """Whether the directory's subschema defines the sshPublicKey attribute type."""
        found = self.store.fetch(conn, "(objectClass=subschema)", ["attributeTypes"],
                                 base="cn=subschema", scope="BASE")
        return bool(found) and any("'sshpublickey'" in v.lower()
                                   for v in found[0][1].get("attributetypes", ()))

    def listing(self, conn):
        """(keys, complaints, contextCSN) as the directory has them now, or None when its
        contextCSN says nothing changed since the last listing. The contextCSN is read
        first, so a change made during the listing shows at the next look."""
        store, context = self.store, self.store.context_csn(conn)
        if context is not None and context == self.context:
            return None
        found = store.fetch(conn, LDAP_KEY_FILTER, ["uid", "sshPublicKey"])
        groups, complaints = {}, []
        for role, dn in self.group_dns.items():
            if dn:
                entry = store.fetch(conn, "(objectClass=*)", LDAP_MEMBER_ATTRS, base=dn,
                                    scope="BASE")
                if not entry:
                    complaints.append(f"the {role} group {printable(dn, 200)} does not exist; "
                                      f"nobody is {role} by it")
                groups[role] = ldap_group_members(entry[0][1] if entry else {})
        keys, more = ldap_key_entries(store.layout, found, groups, self.keys)
        if self.fast:
            for slot, entry in keys.items():
                if slot not in self.keys:
                    entry.key.use_asyncssh()
        return keys, complaints + more, context

    def take(self, listed):
        """On the loop: make a listing's keys the ones in use; log complaints that are new."""
        if listed is None:
            return
        keys, complaints, context = listed
        for text in complaints:
            if text not in self.complaints:
                self.log(f"ldap keys: {text}")
        if keys != self.keys:               # same entries: the same ring goes on serving
            self.found = list(keys.values())
        self.keys, self.complaints, self.context = keys, set(complaints), context

    def current(self, now=None):
        """The key ring in use: the file's lines first, then the directory's keys."""
        ring, found, merged = super().current(now), self.found, self.merged
        if merged is None or merged[0] is not ring or merged[1] is not found:
            merged = self.merged = (ring, found, ring.with_entries(found))
        return merged[2]

    def reload(self):
        """Read DATA/authorized_keys again (at start and on SIGHUP); at start, on the loop,
        begin following the directory."""
        self.attach()
        return super().reload()

    def attach(self):
        """Start following the directory the first time the event loop calls in."""
        if self.task is not None or self.executor is None:
            return
        try:
            self.task = asyncio.get_running_loop().create_task(self.follow())
        except RuntimeError:
            return

    async def follow(self):
        """Look at the directory's keys and groups again and again; when it does not
        answer, keep the keys read last and retry with backoff."""
        loop, wait = asyncio.get_running_loop(), LDAP_KEYS_POLL
        errors = (StoreError, LdapFailure, OSError)
        try:
            while True:
                await asyncio.sleep(wait)
                try:
                    listed, took = await loop.run_in_executor(self.executor, self.poll)
                except errors as e:
                    self.lost(self.store.failure_text(e))
                    wait = min(max(wait, LDAP_KEYS_POLL) * 2, LDAP_BACKOFF_MAX)
                    continue
                if self.down is not None:
                    self.down = None
                    self.log("ldap keys: the directory answers again")
                self.take(listed)
                wait = max(LDAP_KEYS_POLL, LDAP_KEYS_SHARE * took)
        finally:
            with contextlib.suppress(RuntimeError):     # the interpreter is going already
                self.executor.submit(self.drop)
            self.executor.shutdown(wait=False)

    def poll(self):
        """In the executor: (a listing or None, seconds it took), connecting first when
        there is no connection; a failure drops the connection."""
        started = time.monotonic()
        try:
            if self.conn is None:
                self.conn = self.store.connect(self.store.timeout)
            return self.listing(self.conn), time.monotonic() - started
        except Exception:
            self.drop()
            raise

    def drop(self):
        """In the executor: unbind and forget the connection."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.unbind()

    def lost(self, reason):
        """The directory did not answer: say so once, keep the keys read last."""
        if self.down is None:
            self.log(f"ldap keys: cannot read the directory ({reason}); keeping the "
                     f"{len(self.found)} key(s) read last until it answers")
        self.down = reason


def starting_users_keys():
    """(source, [OpenSSH public key lines]) of the user running this: ssh-agent, else ~/.ssh."""
    try:
        agent = AgentClient(timeout=5.0)
        try:
            found = [f"{PublicKey(blob).openssh()} {comment}".strip()
                     for blob, comment in agent.identities() if usable_key(blob)]
            found = [x for x in found if key_line_ok(x)]
        finally:
            agent.close()
        if found:
            return "ssh-agent", found
    except (SSHFormatError, OSError):
        pass
    import glob
    found = []
    for path in sorted(glob.glob(os.path.expanduser("~/.ssh/id_*.pub"))):
        try:
            with open(path, encoding="utf-8") as f:
                line = f.readline().strip()
            parse_key_line(line)
            found.append(line)
        except (OSError, UnicodeDecodeError, SSHFormatError):
            continue
    return "~/.ssh", found


def key_line_ok(text):
    """Whether ``text`` is a key line that would be used whole."""
    try:
        return parse_key_line(text) is not None
    except SSHFormatError:
        return False


def bootstrap_keys(path, log):
    """First start without a key list: authorize the starting user's keys as admin."""
    import getpass
    user = re.sub(r"[^A-Za-z0-9._-]", "_", getpass.getuser()) or "admin"
    source, keys = starting_users_keys()
    if not keys:
        log(f"no key list yet and no SSH keys found: make one with `ssh-keygen -t ed25519`, then "
            f"`pharos keys add --data {os.path.dirname(path)} --role admin {user} "
            f"~/.ssh/id_ed25519.pub`; "
            f"until then anyone may read and nobody may write")
        return
    KeyFile(path, log).write_lines([f'{user} role="admin",tenant="*" {k}' for k in keys])
    log(f"authorized {len(keys)} SSH key(s) of {user} from {source} as admin in {path}")


def authorize(tier, verb, user):
    """The decision on ``verb`` for ``user`` (an Identity or None) in ``tier``: None when it is
    allowed, else the ServiceError saying why (each front end words it: Ph as its reply
    line, HTTP as 401 or 403)."""
    if tier == "dev" or verb in FREE_VERBS:
        return None
    writing = verb in WRITE_VERBS or verb in ("keys", "merge")
    if user is None and (writing or tier == "enterprise"):
        if verb == "delete":
            return ServiceError(506, "Must be logged in to delete.")
        return ServiceError(506, "You must be logged in to use this command.")
    if verb == "keys" and user.role != "admin":
        return ServiceError(510, "Only a key with the admin role may manage keys.")
    if writing and user.role == "reader":
        if verb == "add":
            return ServiceError(511, "You may not add NameServer entries "
                                     "(your key's role is reader).")
        return ServiceError(510, f"You may not {verb} entries (your key's role is reader).")
    return None


def grant_refusal(role, tenant, entry):
    """None when an admin of ``role`` in ``tenant`` (None: every tenant) may add ``entry``,
    else why not: never a role above its own, and a tenant admin only its own tenant."""
    if ROLES.index(entry.role) > ROLES.index(role):
        return f"You may not grant role {entry.role} (yours is {role})."
    if tenant is not None and entry.tenant != tenant:
        return f"You may only add keys of tenant {tenant or 'none'}."
    return None


def principal_refusal(tenant, entry, others):
    """None when an admin of ``tenant`` (None: every tenant) may add ``entry`` beside the
    lines ``others``, else why not: a tenant admin names one plain user (no pattern, no
    list) that no other tenant's line admits, so a key it adds logs in only as a name of
    its own tenant. A global admin may give patterns."""
    if tenant is None:
        return None
    if not PLAIN_NAME_RE.match(entry.principals):
        return "A tenant admin adds keys for one plain user name (no *, ?, ! or list)."
    if any(other.tenant != tenant and match_pattern_list(entry.principals, other.principals)
           for other in others):
        return f"The user name {entry.principals} belongs to another tenant."
    return None


def format_key_options(options):
    """An OpenSSH options field from {name: value or None} (a quote in a value escaped)."""
    return ",".join(name if value is None else '%s="%s"' % (name, value.replace('"', '\\"'))
                    for name, value in options.items())


def key_line_with_tenant(entry, tenant):
    """``entry`` with tenant="``tenant``" added to its line; SSHFormatError unless the new
    line reads back as that one key with that one change."""
    options = dict(entry.options, tenant=tenant)
    text = f"{entry.principals} {format_key_options(options)} {entry.key.openssh()} {entry.comment}"
    again = parse_key_line(text.rstrip())
    same = (again.principals, again.key.blob, again.options, again.comment)
    if same != (entry.principals, entry.key.blob, options, entry.comment):
        raise SSHFormatError("the line does not take a tenant option cleanly")
    return again


def session_tenant(tier, user):
    """The tenant a session reads and writes: None means every record."""
    if tier != "enterprise" or user is None or user.tenant == "*":
        return None
    return user.tenant


def login_prefix(address):
    """The network failed logins are counted by: the /24 (IPv4) or /64 (IPv6) of ``address``."""
    try:
        ip = ipaddress.ip_address(address)
    except (TypeError, ValueError):
        return str(address)[:64]                # no address, or a Unix socket's path
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    bits = LOGIN_PREFIX_V4 if ip.version == 4 else LOGIN_PREFIX_V6
    return str(ipaddress.ip_network((ip, bits), strict=False))


class LoginGuard:
    """When to send each failed login's answer: slowed per network prefix and in total.

    A prefix's answer waits longer with each failure it made in the last 15 minutes, and
    a burst from one prefix queues behind itself (both up to LOGIN_MAX_DELAY); the whole
    server's failed answers leave at most LOGIN_FAIL_RATE per base delay, none waiting
    past LOGIN_MAX_WAIT. A correct login is never delayed, from any address.
    """

    def __init__(self, base_delay=LOGIN_FAIL_DELAY):
        self.base_delay = base_delay
        self.prefixes = {}                      # prefix -> (failures, last failure, next slot)
        self.next_slot = 0.0                    # the earliest the next failed answer may go

    def failed(self, address, now):
        """Count a failed login from ``address`` at ``now``; seconds to wait before answering."""
        prefix = login_prefix(address)
        count, last, slot = self.prefixes.get(prefix, (0, 0.0, 0.0))
        if now - last > LOGIN_FAILURE_MEMORY:
            count = 0
        own = min(LOGIN_MAX_DELAY, self.base_delay * (count + 1))
        release = min(max(now + own, slot), now + LOGIN_MAX_DELAY)
        release = min(max(release, self.next_slot), now + LOGIN_MAX_WAIT)
        self.prefixes[prefix] = (count + 1, now, release + self.base_delay)
        self.next_slot = release + self.base_delay / LOGIN_FAIL_RATE
        if len(self.prefixes) > LOGIN_MAX_PREFIXES:
            self.prune(now)
        return release - now

    def prune(self, now):
        """Forget prefixes quiet for 15 minutes; past the cap still, the longest quiet."""
        cutoff = now - LOGIN_FAILURE_MEMORY
        live = sorted((v[1], k) for k, v in self.prefixes.items() if v[1] > cutoff)
        keep = {k for _, k in live[-(LOGIN_MAX_PREFIXES // 2):]}
        self.prefixes = {k: v for k, v in self.prefixes.items() if k in keep}


class AuditLog:
    """Appends one JSON line per write: who, when, from where, what, and the answer."""

    def __init__(self, path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as e:
            raise DataError(f"cannot write the audit log {path}: {e.strerror}") from None

    @staticmethod
    def entry(now, user, peer, request, reply):
        """One audit entry: who, when, from where, what, and the final reply line."""
        return {"time": utc_now(now), "user": user.alias if user else None,
                "key": user.fingerprint if user else None,
                "tenant": user.tenant if user else None, "peer": peer,
                "request": request[:2000], "reply": reply.rstrip("\n").rsplit("\n", 1)[-1]}

    def append(self, data, sync=False):
        """Append audit lines; with ``sync`` they are on disk when this returns."""
        os.write(self.fd, data)
        if sync:
            self.sync()

    def sync(self):
        """Flush the audit log to disk (fdatasync)."""
        os.fdatasync(self.fd) if hasattr(os, "fdatasync") else os.fsync(self.fd)

    def last_seq(self):
        """The journal sequence number of the newest committed write in the log, or 0."""
        size = os.fstat(self.fd).st_size
        with open(self.path, "rb") as f:
            f.seek(max(0, size - 65536))
            for raw in reversed(f.read().splitlines()):
                try:
                    seq = json.loads(raw).get("seq")
                except (ValueError, AttributeError):
                    continue
                if type(seq) is int:
                    return seq
        return 0

    def record(self, now, user, peer, request, reply):
        """Append a refused or failed write (nothing was committed: no fsync needed)."""
        entry = self.entry(now, user, peer, request, reply)
        self.append(audit_json(entry).encode() + b"\n")

    def close(self):
        """Close the audit log file (a second close does nothing)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- bearer tokens (MCP and scripts): each an identity like a key ---------------

TOKENS_FILE = "tokens"
TOKEN_PREFIX = "pharos_"
TOKEN_NAME_RE = LazyRegex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_TOKENS_FILE = 1024 * 1024


class TokenIdentity:
    """Who a request carrying a bearer token is: the token's name, role and tenant."""

    __slots__ = ("alias", "role", "tenant", "fingerprint", "blob")

    def __init__(self, name, role, tenant):
        self.alias, self.role, self.tenant = name, role, tenant
        self.fingerprint, self.blob = f"token:{name}", None


def token_digest(secret):
    """How a token is kept: its SHA-256, never the token itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(text):
    """Seconds in ``30d``, ``12h``, ``90m``, ``3600s`` or ``3600``; None if it is not one."""
    match = re.fullmatch(r"([0-9]{1,9})([smhdw]?)", text)
    if not match:
        return None
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return int(match.group(1)) * scale


class TokenFile:
    """DATA/tokens: one JSON line per token (name, role, tenant, digest, created, expires),
    read again whenever the file changes, written whole and atomically (mode 0600)."""

    def __init__(self, path):
        self.path, self.stamp, self.entries = path, None, {}

    def read(self):
        """{name: entry} as the file holds them now ({} when it does not exist)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.stamp, self.entries = None, {}
            return self.entries
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self.stamp:
            self.entries, self.stamp = self.parse(), stamp
        return self.entries

    def parse(self):
        """The entries of the file; DataError naming the line of one that is not an entry."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_TOKENS_FILE + 1)
        except OSError as e:
            raise DataError(f"cannot read {self.path}: {e.strerror}") from None
        if len(raw) > MAX_TOKENS_FILE:
            raise DataError(f"{self.path} is over {MAX_TOKENS_FILE} bytes")
        entries = {}
        for n, text in enumerate(raw.split(b"\n"), 1):
            if not text.strip():
                continue
            try:
                entry = json.loads(text)
                if not (TOKEN_NAME_RE.match(entry["name"]) and entry["role"] in ROLES
                        and (entry["tenant"] == "" or TENANT_RE.match(entry["tenant"]))
                        and re.fullmatch(r"[0-9a-f]{64}", entry["digest"])):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{self.path} line {n}: not a token entry") from None
            entries[entry["name"]] = entry
        return entries

    def identify(self, secret, now):
        """The TokenIdentity of a presented token, or None (unknown, revoked or expired)."""
        digest = token_digest(secret)
        for entry in self.read().values():
            if hmac.compare_digest(entry["digest"], digest):
                expires = entry.get("expires")
                if expires is not None and now >= expires:
                    return None
                return TokenIdentity(entry["name"], entry["role"], entry["tenant"])
        return None

    def add(self, name, role, tenant, ttl, now):
        """Make a new token; the secret (shown once) and its entry."""
        if not TOKEN_NAME_RE.match(name):
            raise UsageError(f"token name {printable(name, 40)!r}: letters, digits, . _ - only")
        entries = dict(self.read())
        if name in entries:
            raise UsageError(f"there is a token called {name} already (remove it first)")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entries[name] = {"name": name, "role": role, "tenant": tenant,
                         "digest": token_digest(secret), "created": int(now),
                         "expires": None if ttl is None else int(now + ttl)}
        self.write(entries)
        return secret, entries[name]

    def remove(self, name):
        """Revoke the token called ``name``; False if there is none."""
        entries = dict(self.read())
        if entries.pop(name, None) is None:
            return False
        self.write(entries)
        return True

    def write(self, entries):
        """Replace the file with ``entries`` (temp file, fsync, rename)."""
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries.values())
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise DataError(f"cannot write {self.path}: {e.strerror}") from None
        self.stamp = None


# SECTION: Service — DirectoryService: the directory's rules, for every front end

class Caller:
    """Who asks, for decisions and the audit log: an Identity (or None), the peer's address,
    and the request as it came (a Ph line, an MCP tool call)."""

    __slots__ = ("user", "peer", "request")

    def __init__(self, user=None, peer=None, request=""):
        self.user, self.peer, self.request = user, peer, request


# The identities a merge finds its machine by, strongest first. An SSH host key stays with
# the machine's disk whatever its address; an mDNS name (NAME.local) is one the machine
# claims on its own link (mDNS defends it against others); a stable MAC stays with its
# network card, but one machine has several and a VM may get a new one; an address moves
# with DHCP; any other hostname may be one made from an address (ip-10-0-0-7) or a stale
# reverse DNS name. "mdns" is the hostname field, when its value ends in .local.
MATCH_ORDER = ("hostkey", "mdns", "mac", "ip", "hostname")


def is_mdns_name(hostname):
    """Whether a host name is an mDNS one: NAME.local (RFC 6762), as scan records it."""
    return hostname.lower().rstrip(".").endswith(".local")


def identities(schema, fields):
    """(field, value) pairs a merge may find its machine by, in MATCH_ORDER: host keys, an
    mDNS hostname, stable MACs (a randomized one names no machine), IPs, then any other
    hostname; values cleaned."""
    out = []
    for kind in MATCH_ORDER:
        name = "hostname" if kind == "mdns" else kind
        for value in schema.clean_values(schema.by_name[name], fields.get(name, ())):
            if name == "mac" and is_random_mac(value):
                continue
            if name == "hostname" and is_mdns_name(value) != (kind == "mdns"):
                continue
            out.append((name, value))
    return out


def match_machine(store, fields, tenant):
    """The id of the machine (in ``tenant`` unless None) a merge of ``fields`` is about,
    as the pending writes leave the records, or None; RecordError for a bad value."""
    schema = store.schema
    for name, value in identities(schema, fields):
        selection, _ = parse_selection(schema, tokenize(f"type={MACHINE} {name}={value}"))
        for rid in store.select_planned(selection, tenant):
            held = store.planned(rid)[name]
            if value.lower() in [v.lower() for v in (held if type(held) is list else [held])]:
                return rid
    return None


def merge_ops(store, fields, source, tenant, now):
    """(ops, what changed) of a ``source`` merge of one machine's {field: [values]}: the
    ops add it (what is None) or change it (what lists the fields; [] for no change)."""
    rid = match_machine(store, fields, tenant)
    if rid is None:
        return store.plan_add(MACHINE, fields, now, source=source, tenant=tenant or ""), None
    old = store.planned(rid)
    make = merge_plan(store.schema, old, fields, source)
    key = make.get("hostname", [""])[0]
    if key and store.planned_owner(MACHINE, key, old.get("tenant", "")) not in (None, rid):
        del make["hostname"]        # the name is another machine's: keep this one's
    if not make:
        return [], []
    ops, errors = store.plan_change([rid], make, now, source)
    if errors:
        raise errors[0]
    return ops, sorted(make)


class DirectoryService:
    """The directory's rules between the front ends and a Store: type inference, change
    limits, addonly, tenancy, authorization decisions and the audit log.

    The Ph server, the HTTP app and MCP each parse their own wire format, then call one of
    these methods with a Caller and ``now``. Reads answer plain results; writes answer a
    Later of None once durable; a refusal is a ServiceError (a Ph code and text), which
    each front end words in its own way. Everything here runs on the event loop's thread.
    """

    def __init__(self, store, config, auditlog=None, log=None):
        self.store, self.schema, self.config = store, store.schema, config
        self.auditlog, self.log = auditlog, log or (lambda message: None)

    # -- decisions -------------------------------------------------------------

    def decide(self, verb, caller):
        """None when ``caller`` may ``verb`` in this tier, else the ServiceError why not."""
        return authorize(self.config.tier, verb, caller.user)

    def tenant(self, caller):
        """The tenant ``caller`` reads and writes (None: every record)."""
        return session_tenant(self.config.tier, caller.user)

    def check_writable(self):
        """Refuse with 517 while the store takes no writes."""
        if self.store.readonly:
            raise ServiceError(517, "changes not allowed to read-only database.")

    # -- reads -----------------------------------------------------------------

    def search(self, caller, selection, limit=None):
        """A Search of ``selection`` in ``caller``'s tenant, to run a turn at a time."""
        return self.store.search(selection, self.tenant(caller), limit)

    def find(self, caller, selection):
        """Every record ``selection`` matches for ``caller``, in order (at most max_results;
        ServiceError 502 past that), searched in one go."""
        search = self.search(caller, selection, self.config.max_results)
        while not search.run():
            pass
        if search.too_many:
            raise ServiceError(502, "Too many entries to print.")
        return [self.store.get(rid) for rid in search.ordered()]

    def visible(self, caller, rid):
        """Record ``rid`` if ``caller`` may see it now, else None."""
        record, tenant = self.store.get(rid), self.tenant(caller)
        if record is None or (tenant is not None and record.get("tenant", "") != tenant):
            return None
        return record

    def by_key(self, caller, rtype, key):
        """The person (alias) or machine (hostname) called ``key`` in ``caller``'s tenant."""
        tenant = self.tenant(caller) or ""
        for kind in ([rtype] if rtype else RECORD_TYPES):
            rid = self.store.key_owner(kind, key, tenant)
            if rid is not None:
                return self.visible(caller, rid)
        return None

    async def stats(self, caller, now, recent=10):
        """Counts by type and machine status, and the latest changes, in ``caller``'s tenant.

        Every record is looked at, so the work goes a SEARCH_STEPS slice per turn of the
        loop (over a copy of the record list: writes may come between the slices)."""
        import heapq
        self.allowed("query", caller, now)
        tenant, records = self.tenant(caller), list(self.store.records())
        counts, by_status, latest = {PERSON: 0, MACHINE: 0}, {}, []
        for start in range(0, len(records), SEARCH_STEPS):
            if start:
                await asyncio.sleep(0)
            mine = [r for r in records[start:start + SEARCH_STEPS]
                    if tenant is None or r.get("tenant", "") == tenant]
            for record in mine:
                counts[record["type"]] += 1
                if record["type"] == MACHINE:
                    status = record.get("status", "unknown")
                    by_status[status] = by_status.get(status, 0) + 1
            latest = heapq.nlargest(recent, latest + mine, key=lambda r: r.get("modified", ""))
        return {"people": counts[PERSON], "machines": counts[MACHINE], "by_status": by_status,
                "recent": [{"type": r["type"], KEY_FIELD[r["type"]]: r[KEY_FIELD[r["type"]]],
                            "modified": r.get("modified")} for r in latest]}

    # -- writes ----------------------------------------------------------------

    def plan_add(self, caller, fields, now, hint=None, source="manual"):
        """The ops adding one record from {field: [values]}; RecordError when refused."""
        self.check_writable()
        rtype = infer_type(self.schema, fields, hint)
        return self.store.plan_add(rtype, fields, now, source=source,
                                   tenant=self.tenant(caller) or "")

    def select_for_write(self, caller, selection, limit):
        """Ids a change or delete acts on (as the pending writes leave them); ServiceError
        518 when there are more than ``limit``."""
        ids = self.store.select_planned(selection, self.tenant(caller))
        if len(ids) > limit:
            raise ServiceError(518, f"Too many entries ({len(ids)}) selected; limit is {limit}.")
        return ids

    def plan_change(self, ids, make, now, addonly=False):
        """(ops, refusals) changing records ``ids`` by {field: [values]}; each refusal a
        (code, text) for a record left as it is (with ``addonly``: a field it has set)."""
        self.check_writable()
        refusals = []
        if addonly:
            ids, refusals = self.addonly_filter(ids, make)
        ops, refused = self.store.plan_change(ids, make, now)
        return ops, refusals + [(e.code, str(e)) for e in refused]

    def addonly_filter(self, ids, make):
        """(ids to change, refusals): records that have a value being set are left alone."""
        keep, refusals = [], []
        for rid in ids:
            record = self.store.planned(rid)
            if any(record.get(name) for name, values in make.items() if any(values)):
                refusals.append((521, "Field has a value."))
            else:
                keep.append(rid)
        return keep, refusals

    def plan_merge(self, caller, fields, source, now):
        """(ops, what) of a discovery write (see merge_ops) in ``caller``'s tenant."""
        self.check_writable()
        return merge_ops(self.store, fields, source, self.tenant(caller), now)

    def plan_delete(self, ids):
        """The ops deleting records ``ids``."""
        self.check_writable()
        return [(rid, None) for rid in ids]

    def commit(self, caller, ops, outcome, now):
        """Make ``ops`` durable with ``outcome`` (the answer's last line) in the audit log:
        a Later of None once they are, or of the ServiceError (400, or the store's code) why
        they are not."""
        audit = self.audit_entry(caller, outcome, now)

        def settled(error):
            if error is None:
                return None
            if not isinstance(error, StoreError):
                raise error
            return ServiceError(error.code, str(error))
        return self.store.commit(ops, audit).map(settled)

    # -- whole requests, for MCP and the console (Ph goes a verb at a time) ------

    def parse(self, text, rtype=None):
        """The Selection of a Ph query ``text`` (``rtype`` narrows it); ServiceError 500
        with qi's detail lines when it cannot be read."""
        selection, errors = parse_selection(self.schema, tokenize(text))
        if not errors and not selection.has_key():
            errors.append(more(515, "no non-null key field in query."))
        if errors:
            details = [(int(e[1:4]), e[5:].rstrip("\n")) for e in errors]
            raise ServiceError(500, "Did not understand query.", details)
        if rtype:
            selection.types = selection.types & {rtype}
        return selection

    def allowed(self, verb, caller, now):
        """Refuse (and audit a refused write) unless ``caller`` may ``verb``."""
        refusal = self.decide(verb, caller)
        if refusal is not None:
            if verb in WRITE_VERBS:
                self.audit_refusal(caller, line(refusal.code, refusal.text), now)
            raise refusal

    async def query(self, caller, text, rtype, now, most=None):
        """The records a Ph query ``text`` matches for ``caller``, in order; ServiceError 502
        past ``most`` (default max_results: a front end that pages may allow more, to an
        identified caller only; anyone else gets what a Ph query gives anyone, so an
        anonymous client cannot make each call match the whole directory). The search
        yields to the loop between its bounded runs."""
        self.allowed("query", caller, now)
        most = most if most and caller.user is not None else self.config.max_results
        search = self.search(caller, self.parse(text, rtype), most)
        while not search.run():
            await asyncio.sleep(0)
        if search.too_many:
            raise ServiceError(502, "Too many entries to print.")
        return [self.store.get(rid) for rid in search.ordered()]

    async def get(self, caller, rtype, key, now):
        """The person or machine called ``key`` that ``caller`` may see, or None."""
        self.allowed("query", caller, now)
        return self.by_key(caller, rtype, key)

    async def write(self, caller, ops, outcome, now):
        """Commit ``ops``; raise the ServiceError when they could not be made durable."""
        error = await self.commit(caller, ops, outcome, now)
        if error is not None:
            raise error

    async def add(self, caller, rtype, fields, now, dry_run=False):
        """Add one record of ``rtype``; the record as stored (or as it would be)."""
        self.allowed("add", caller, now)
        fields = dict(fields, type=[rtype])
        ops = self.plan_add(caller, fields, now)
        if not dry_run:
            await self.write(caller, ops, line(200, "Ok."), now)
        return ops[0][1]

    async def change(self, caller, text, rtype, make, now, limit=1, dry_run=False):
        """Change what ``text`` selects (at most ``limit`` records, all or none):
        {matched, changed, records as they end up}."""
        self.allowed("change", caller, now)
        self.check_writable()
        make = self.settable(make)
        ids = self.select_for_write(caller, self.parse(text, rtype), limit)
        if not ids:
            raise ServiceError(501, "No matches to specification.")
        ops, refusals = self.plan_change(ids, make, now)
        if refusals:
            raise ServiceError(500, f"{plural(len(ids), 'entry', 'entries')} found, none changed.",
                               refusals)
        if ops and not dry_run:
            await self.write(caller, ops, line(200, f"{plural(len(ops), 'entry', 'entries')} "
                                                   f"changed."), now)
        changed = dict(ops)
        return {"matched": len(ids), "changed": len(ops),
                "records": [changed.get(rid) or self.store.planned(rid) for rid in ids]}

    def settable(self, make):
        """``make`` by the fields' own names; ServiceError 599 with a 507 or 505 line for
        each name that is no field or one a change may not set (as Ph's change refuses)."""
        out, refusals = {}, []
        for name, values in make.items():
            field = self.schema.field(name)
            if field is None:
                refusals.append((507, f"{printable(name, 40)}:unknown field."))
            elif field.server or field.name == "type":
                refusals.append((505, f"{field.name}:you may not change this field."))
            else:
                out.setdefault(field.name, []).extend(values)
        if refusals:
            raise ServiceError(599, "Did not understand change command.", refusals)
        return out

    async def delete(self, caller, text, rtype, now, expected, dry_run=False):
        """Delete what ``text`` selects, only when that is exactly ``expected`` records:
        {matched, deleted, keys}."""
        self.allowed("delete", caller, now)
        self.check_writable()
        ids = self.select_for_write(caller, self.parse(text, rtype), max(expected, 1))
        if len(ids) != expected:
            raise ServiceError(518, f"{plural(len(ids), 'entry', 'entries')} selected, "
                                    f"not {expected}; nothing deleted.")
        keys = [self.store.planned(rid)[KEY_FIELD[self.store.planned(rid)["type"]]] for rid in ids]
        if not dry_run:
            await self.write(caller, self.plan_delete(ids), line(200, f"{len(ids)} entries deleted."),
                             now)
        return {"matched": len(ids), "deleted": 0 if dry_run else len(ids), "keys": keys}

    # -- audit -----------------------------------------------------------------

    def audit_entry(self, caller, outcome, now):
        """The audit entry of ``caller``'s write, or None without an audit log."""
        if self.auditlog is None:
            return None
        return self.auditlog.entry(now, caller.user, caller.peer, caller.request, outcome)

    def audit_refusal(self, caller, outcome, now):
        """Append a refused or failed write (nothing was committed: no fsync needed)."""
        if self.auditlog is None:
            return
        try:
            self.auditlog.record(now, caller.user, caller.peer, caller.request, outcome)
        except OSError as e:
            self.log(f"cannot write the audit log: {e.strerror}")


# SECTION: Client — the Ph client core of every command-line tool (asyncio or a blocking socket)

REPLY_RE = LazyRegex(r"(?s)(-?)([0-9]{3}):(?:([0-9]{1,18}):)?(.*)\Z")
ENTRY_RE = LazyRegex(r"(?s)\s*([A-Za-z_-]*): ?(.*)\Z")
COUNT_RE = LazyRegex(r"There (?:was|were) ([0-9]{1,18}) match")
FIELD_TYPES_RE = LazyRegex(r"\((people and machines|people|machines)(, multi-valued)?\)\s*\Z")
NEEDS_LOGIN = 506               # qi's "you must be logged in" reply code
REQUEST_ROOM = MAX_LINE - 256   # bytes of field=value pairs one add or change carries
PIPELINE_DEPTH = 200            # requests a client sends before reading their replies
PH_QUOTED_RE = LazyRegex(r'(?s)"(?:[^"\\]|\\.)*"')   # a value the user quoted for Ph already


def quote_value(value):
    """A value as a Ph token: bare when safe, else quoted with qi's escapes."""
    if value and not re.search(r'[\s"\\=~]', value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t") + '"'


def arg_value(value):
    """A command-line value as a Ph token: one the user quoted for Ph goes as it is."""
    return value if PH_QUOTED_RE.fullmatch(value) else quote_value(value)


def request_from_args(words):
    """A request tail from command-line words: field=value pairs quoted as needed."""
    out = []
    for word in words:
        field, eq, value = word.partition("=")
        if eq and FIELD_NAME_RE.match(field):
            out.append(f"{field}={arg_value(value)}")
        elif word.lower() in SEPARATORS:
            out.append(word.lower())
        else:
            out.append(arg_value(word))
    return " ".join(out)


def wire_bytes(requests):
    """Requests as the UTF-8 lines Ph carries; UsageError naming a word that is not UTF-8
    (a command line holds any bytes; Python keeps the undecodable ones as surrogates)."""
    try:
        return "".join(r + "\n" for r in requests).encode()
    except UnicodeEncodeError:
        words = [w for r in requests for w in r.split()]
        bad = next((w for w in words if not utf8_text(w)), " ".join(words))
        shown = bad.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
        raise UsageError(f"{shown} is not UTF-8 text") from None


def utf8_text(text):
    """Whether ``text`` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_reply(lines):
    """(final code, final text, [(code, index, text)]) from the lines of one reply."""
    body = []
    for text in lines:
        match = REPLY_RE.match(text)
        if not match:
            raise PhError(400, f"malformed reply line {text[:80]!r}")
        dash, code, index, rest = match.groups()
        if not dash and code >= "200":
            return int(code), rest, body
        body.append((int(code), int(index) if index else None, rest))
    raise PhError(400, "reply ended without a final line")


def records_from_reply(body, multi):
    """Records (dicts; multi-valued fields as lists) from the data lines of a query reply.

    A value line the server cut to keep reply lines under MAX_REPLY_LINE bytes is
    joined back without a line break.
    """
    records, last, cut = {}, {}, {}
    for code, index, text in body:
        match = ENTRY_RE.match(text)
        if code != 200 or index is None or not match:
            continue
        name, value = match.group(1) or last.get(index), match.group(2)
        if not name:
            continue
        record = records.setdefault(index, {})
        if name == SOURCES_KEY:
            record.setdefault(name, {}).update(parse_sources(value))
            continue
        again = name in record and last.get(index) == name
        if again and cut.get(index):
            if name in multi:
                record[name][-1] += value
            else:
                record[name] += value
        elif name in multi:
            record.setdefault(name, []).append(value)
        elif again:
            record[name] += "\n" + value
        else:
            record[name] = value
        last[index] = name
        cut[index] = len(f"-200:{index}:{text}".encode()) >= MAX_REPLY_LINE - 4
    return [records[i] for i in sorted(records)]


def reply_count(body):
    """N from a reply's '102:There were N matches' line, or None."""
    for code, _, text in body:
        match = COUNT_RE.match(text) if code == 102 else None
        if match:
            return int(match.group(1))
    return None


# What an error reply means at the command line: Ph code -> (exit status, wording; None
# keeps the server's text, or its detail lines when it sent some). Input the server refused
# exits 2, like a usage error; auth, server and network trouble exits 3. qi reuses 500 and
# 599 for logins, so a reply to `login` or `answer` is always an auth failure (exit 3).
REPLY_MEANINGS = {
    400: (EXIT_FAIL, "the server failed: {text}"),
    501: (EXIT_NOMATCH, "no match"),    # a write whose selection went away meanwhile
    500: (EXIT_USAGE, None),            # query not understood; change: none changed
    502: (EXIT_USAGE, "more records match than the server prints at once; narrow the query "
                      "(export lists them all)"),
    504: (EXIT_USAGE, None), 505: (EXIT_USAGE, None), 507: (EXIT_USAGE, None),
    509: (EXIT_USAGE, None), 512: (EXIT_USAGE, None), 513: (EXIT_USAGE, None),
    515: (EXIT_USAGE, None), 518: (EXIT_USAGE, None), 521: (EXIT_USAGE, None),
    599: (EXIT_USAGE, None),            # add/change/delete/fields not understood
    506: (EXIT_FAIL, "the server wants a login for this: pass --as USER and --key FILE, "
                     "or add your key to ssh-agent"),
    510: (EXIT_FAIL, None), 511: (EXIT_FAIL, None), 517: (EXIT_FAIL, None),
    598: (EXIT_FAIL, "the server does not know this command (is it a Pharos server?)"),
}
AUTH_CONTEXTS = frozenset(("login", "answer"))
# qi's detail lines (-5xx) in words for people: (code, pattern, wording; None drops a line
# that only repeats another).
DETAIL_WORDING = (
    (507, r"(.*):unknown field\.", 'unknown field "{0}"'),
    (509, r"(\w+) (.*) (?:in use or is too common a name|conflicts with other entries)\.",
     "{0} {1} is already taken"),
    (504, r"(.*):you may not use this field for lookup\.", 'field "{0}" cannot be searched'),
    (505, r"(.*):you may not change this field\.", "{0} is set by the server"),
    (515, r"no non-null key field in query\.", "say a word or field=value to look for"),
    (515, r"Initial metas may be used as qualifiers only\.", None),
    (599, r"=:No field or value specified\.", '"=" needs a field name before it'),
    (599, r"(\d+):argument is not field=value pair\.", "word {0} is not field=value"),
    (599, r"Argument \d+ \(begins (.*)\): must be field=value pair\.", '"{0}" is not field=value'),
    (599, r"Argument (\d+): must be field name\.", "word {0} after return is not a field name"),
    (521, r"Field has a value\.", "the field has a value already (addonly is on)"),
)


def detail_words(code, text):
    """One detail line of an error reply in words for people ('' to drop it)."""
    for known, pattern, wording in DETAIL_WORDING:
        match = re.fullmatch(pattern, text) if known == code else None  # compiled when met
        if match:
            return wording.format(*match.groups()) if wording else ""
    return text


def reply_error(code, text, body, context=""):
    """The PhRefusal for an error reply to a ``context`` request (its verb), worded for
    people from REPLY_MEANINGS and DETAIL_WORDING; the wire text stays qi's."""
    status, wording = REPLY_MEANINGS.get(code, (EXIT_FAIL, None))
    if context in AUTH_CONTEXTS:
        status = EXIT_FAIL
    details = [w for w in (detail_words(c, t) for c, _, t in body if c >= 300) if w]
    message = wording.format(text=text) if wording else "; ".join(details) or text
    return PhRefusal(code, message[:1].lower() + message[1:].rstrip("."), status)


def schema_from_fields(body):
    """A Schema from the body of a `fields` reply: the built-in table plus the server's custom fields."""
    lines, builtin = {}, {row[1] for row in BUILTIN_FIELDS}
    for _, fid, text in body:
        name, _, rest = text.partition(":")
        if fid is not None and FIELD_NAME_RE.match(name):
            lines.setdefault((fid, name), []).append(rest)
    custom = []
    for (fid, name), (props, *desc) in lines.items():
        match = FIELD_TYPES_RE.search(" ".join(desc))
        words = props.split()
        size = parse_count(words[1], 1, 4000) if words[:1] == ["max"] and words[1:] else None
        if name in builtin or not match or size is None:
            continue
        types = {"people": P, "machines": M}.get(match.group(1), PM)
        custom.append(Field(fid, name, size, " ".join(words[2:]), "\n".join(desc),
                            types, multi=bool(match.group(2))))
    return Schema(custom)


def authorize_hint(user):
    """What to do about a key the server does not know, in one clause."""
    return (f"to authorize yours, run on the server: pharos keys add --data DATA_DIR {user} "
            f"KEY.pub (add --role admin for the first key)")


def login_needed(tier, verb):
    """Whether a server of ``tier`` wants a login before ``verb`` (as its authorize() rules)."""
    if tier not in ("lab", "enterprise") or verb in FREE_VERBS:
        return False
    return tier == "enterprise" or verb in WRITE_VERBS or verb == "keys"


BUILTIN_MULTI = frozenset(row[1] for row in BUILTIN_FIELDS if row[6].get("multi"))
MAX_REPLY_READ = 1 << 20        # bytes one reply line may take before the client gives up


def reply_done(text):
    """Whether ``text`` is the final line of a reply (not a -continuation, code >= 200)."""
    return not text.startswith("-") and text[:3] >= "200"


async def reply_lines(readline):
    """The decoded lines of one reply, up to its final line, read with ``readline``."""
    lines = []
    while True:
        raw = await readline()
        if not raw:
            raise ConnectionResetError("server closed the connection")
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text)
        if reply_done(text):
            return lines


def too_long_line():
    """The PhError for a reply line past MAX_REPLY_READ bytes."""
    return PhError(400, f"the server sent a reply line over {MAX_REPLY_READ} bytes")


def resolver_name(host):
    """``host`` as getaddrinfo takes it: IDNA bytes (so an ASCII name skips the idna codec,
    which takes a millisecond to import and raises UnicodeError for an empty label);
    OSError for a name that has no IDNA form."""
    if host.isascii():
        return host.encode()
    try:
        return host.encode("idna")
    except UnicodeError:
        raise OSError(f"{host} is not a valid host name") from None


def unreachable(host, port, error):
    """PhError 421 for a connection that could not be made, worded alike on either link
    (asyncio words a refusal "Connect call failed", the socket module "Connection refused")."""
    if isinstance(error, TimeoutError):
        reason = "timed out"
    elif isinstance(error.errno, int) and error.errno > 0:
        reason = os.strerror(error.errno)
    else:
        reason = error.strerror or str(error)
    return PhError(421, f"cannot reach {format_address(host, port)}: {reason}")


class StreamLink:
    """A Ph connection on asyncio streams, for commands that keep several going at once.

    Like SocketLink it raises ConnectionError for a lost connection and TimeoutError for
    a reply that did not come in time, so PhClient handles both links alike.
    """

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @staticmethod
    def run(main):
        """Run coroutine ``main`` (a command's body) on an event loop; its result."""
        return asyncio.run(main)

    @classmethod
    async def open(cls, host, port, timeout):
        """A link to HOST:PORT within ``timeout`` seconds (OSError if none)."""
        try:
            return cls(*await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=MAX_REPLY_READ), timeout))
        except asyncio.TimeoutError:
            raise TimeoutError("timed out") from None

    def send(self, data):
        """Queue ``data``; it goes out while the replies are read."""
        self.writer.write(data)

    async def read_reply(self, timeout):
        """The lines of one reply, all read within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(reply_lines(self.readline), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError("no reply") from None

    async def readline(self):
        """One line, b'' at the end."""
        try:
            return await self.reader.readline()
        except ValueError:              # asyncio's words for a line past the limit
            raise too_long_line() from None

    async def call(self, function, *args):
        """``function(*args)`` in a thread, so a slow signer does not stall other links."""
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def close(self):
        """Close the connection."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


class SocketLink:
    """A Ph connection on a blocking socket, for commands that use one connection.

    Its coroutines never wait on a future, so SocketLink.run drives them to the end
    without an event loop, and a lookup never imports asyncio (its import is most of the
    start-up time of `ph QUERY`). Timeouts and errors are StreamLink's.
    """

    def __init__(self, sock, timeout):
        self.sock, self.timeout = sock, timeout
        self.buffer, self.start = b"", 0        # bytes read; where the next line starts
        self.deadline = 0.0

    @staticmethod
    def run(main):
        """Run coroutine ``main`` to its end without an event loop; its result."""
        try:
            main.send(None)
        except StopIteration as done:
            return done.value
        main.close()
        raise RuntimeError("SocketLink.run: the coroutine waited on a future")

    @classmethod
    async def open(cls, host, port, timeout):
        """A link to HOST:PORT within ``timeout`` seconds (OSError if none)."""
        return cls(socket.create_connection((host, port), timeout=timeout), timeout)

    def send(self, data):
        """Send ``data`` whole, within the timeout."""
        self.sock.settimeout(self.timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise TimeoutError("no reply") from None

    async def read_reply(self, timeout):
        """The lines of one reply, all read within ``timeout`` seconds."""
        self.deadline = time.monotonic() + timeout
        return await reply_lines(self.readline)

    async def readline(self):
        """One line, b'' at the end; the reply's deadline bounds each wait for data."""
        while (end := self.buffer.find(b"\n", self.start)) < 0:
            if len(self.buffer) - self.start > MAX_REPLY_READ:
                raise too_long_line()
            chunk = self.receive()
            if not chunk:
                line, self.buffer, self.start = self.buffer[self.start:], b"", 0
                return line
            self.buffer, self.start = self.buffer[self.start:] + chunk, 0
        if end - self.start >= MAX_REPLY_READ:
            raise too_long_line()
        line, self.start = self.buffer[self.start:end + 1], end + 1
        return line

    def receive(self):
        """The next bytes from the server (b'' at its end) before the reply's deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply")
        self.sock.settimeout(left)
        return self.sock.recv(1 << 16)

    async def call(self, function, *args):
        """``function(*args)``, here: nothing else waits on this process."""
        return function(*args)

    async def close(self):
        """Close the connection."""
        self.sock.close()


class PhClient:
    """One Ph connection: commands and their parsed replies, timeouts, one reconnect, login.

    Replies are (code, text, body) with body the (code, index, text) of every line before
    the final one; errors the caller should not see as data raise PhError (code 421 for
    an unreachable server, a lost connection or no reply in time). ``link`` is StreamLink
    (asyncio) or SocketLink (a blocking socket; run the coroutines with SocketLink.run).
    """

    def __init__(self, host, port, timeout=10.0, client_id=None, user=None, key_path=None,
                 link=StreamLink):
        self.host, self.port, self.timeout, self.client_id = host, port, timeout, client_id
        self.user, self.key_path, self.link_class = user, key_path, link
        self.link = None                # the open connection
        self.logged_in = False
        self.login_wanted = False       # once logged in, every (re)connection logs in again
        self.tier = None                # the server's tier from siteinfo, once asked
        self.schema = None
        self.multi = BUILTIN_MULTI

    def sibling(self):
        """Another connection to the same server as the same user, sharing what this one
        learnt (schema, tier) and logging in before its first request when this one did."""
        other = PhClient(self.host, self.port, self.timeout, self.client_id, self.user,
                         self.key_path, self.link_class)
        other.login_wanted, other.tier = self.login_wanted, self.tier
        other.schema, other.multi = self.schema, self.multi
        return other

    async def connect(self):
        """Open the connection (PhError 421 if unreachable) and send `id` when set; self."""
        try:
            name = resolver_name(self.host)
            self.link = await self.link_class.open(name, self.port, self.timeout)
        except OSError as e:
            raise unreachable(self.host, self.port, e) from None
        if self.client_id:
            await self.exchange(f"id {self.client_id}")
        if self.login_wanted:
            await self.login()
        return self

    async def read_reply(self):
        """Read one whole reply within the timeout; return (code, text, body)."""
        return parse_reply(await self.link.read_reply(self.timeout))

    async def exchange(self, request):
        """Send one request on the open connection; return (code, text, body)."""
        self.link.send(wire_bytes([request]))
        return await self.read_reply()

    async def pipeline(self, requests):
        """The replies to several requests sent at once, in order; reconnects once if the
        connection is lost (requests already answered are not sent again)."""
        replies = []
        for attempt in (1, 2):
            try:
                if self.link is None:
                    await self.connect()
                self.link.send(wire_bytes(requests[len(replies):]))
                while len(replies) < len(requests):
                    replies.append(await self.read_reply())
                return replies
            except ConnectionError as e:
                await self.close()
                if attempt == 2:
                    raise PhError(421, f"connection lost: {e}") from None
            except TimeoutError:
                await self.close()
                raise PhError(421, f"no reply within {self.timeout:g}s") from None

    async def command(self, request):
        """Send one request, reconnecting once if the connection was lost; (code, text, body)."""
        return (await self.pipeline([request]))[0]

    async def read_command(self, request):
        """Like command, logging in first when the server's tier wants a login for it (for
        reads too in enterprise), or when a server that does not say so refuses it."""
        await self.login_first(request.split(None, 1)[0])
        reply = await self.command(request)
        if reply[0] == NEEDS_LOGIN and await self.ensure_login():
            reply = await self.command(request)
        return reply

    async def server_tier(self):
        """The tier siteinfo names (dev, lab, enterprise), asked for once; '' if it names none."""
        if self.tier is None:
            code, _, body = await self.command("siteinfo")
            items = dict(t.partition(":")[::2] for c, _, t in body if code < 300 and c == 200)
            self.tier = items.get("tier", "")
        return self.tier

    async def login_first(self, verb):
        """Log in before a ``verb`` request when the server's tier says it needs a login
        (rather than send it once to be refused)."""
        if not self.logged_in and self.user and login_needed(await self.server_tier(), verb):
            await self.ensure_login()

    async def load_schema(self):
        """The server's fields (custom ones included) as a Schema, asked for once."""
        if self.schema is None:
            code, text, body = await self.read_command("fields")
            if code >= 300:
                raise reply_error(code, text, body)
            self.schema = schema_from_fields(body)
            self.multi = self.schema.multi
        return self.schema

    async def query(self, request):
        """Records matching ``request`` ('name=x return all'); [] when nothing matches."""
        code, text, body = await self.read_command(f"query {request}")
        if code == 501:
            return []
        if code >= 300:
            raise reply_error(code, text, body)
        return records_from_reply(body, self.multi)

    async def dump(self, request):
        """Yield (total, records) page by page for every record matching ``request``,
        through the server's `dump` extension (no max-results cap)."""
        code, text, body = await self.read_command(f"dump {request}")
        while code != 501:
            if code >= 300:
                raise reply_error(code, text, body)
            total = reply_count(body) or 0
            yield total, records_from_reply(body, self.multi)
            if max((i for _, i, _ in body if i), default=total) >= total:
                return
            code, text, body = await self.command("dump")

    async def write(self, request):
        """Run one add, change or delete; its reply text, or PhError."""
        [(code, text, body)] = await self.write_many([request])
        if code >= 300:
            raise reply_error(code, text, body)
        return text

    async def write_many(self, requests):
        """Replies to writes sent at once, logged in first when the tier asks for it; those a
        server that does not name its tier refuses for want of a login are sent again once
        ensure_login() has logged in."""
        if requests:
            await self.login_first(requests[0].split(None, 1)[0])
        replies = await self.pipeline(requests)
        again = [n for n, reply in enumerate(replies) if reply[0] == NEEDS_LOGIN]
        if again and await self.ensure_login():
            for n, reply in zip(again, await self.pipeline([requests[n] for n in again])):
                replies[n] = reply
        return replies

    async def ensure_login(self):
        """Log in with an SSH key when the server asks for it; True once logged in (now)."""
        if self.logged_in or not self.user:
            return False
        self.login_wanted = True
        if self.link is not None:
            try:
                await self.login()
                return True
            except (ConnectionError, TimeoutError):
                await self.close()
        await self.pipeline([])         # (re)connects, and connect() logs in
        return True

    async def login(self):
        """Log in on the open connection with an SSH key (PhError if none is accepted).

        Keys are tried in client_signers' order (ssh-agent, ssh-keygen, asyncssh); a key
        the server refuses costs a delay there, so the agent's keys come first.
        """
        signers = await self.link.call(client_signers, self.key_path)
        if not signers:
            raise PhError(NEEDS_LOGIN, "the server wants an SSH-key login and no key was found: "
                                       "add one to ssh-agent (ssh-add) or pass --key FILE")
        problem = "no key was accepted"
        for description, sign in signers:
            code, challenge, body = await self.exchange(f"login {self.user}")
            if code != 301:
                raise reply_error(code, challenge, body, "login")
            try:
                blob = await self.link.call(sign, challenge.encode())
            except SSHFormatError as e:
                problem = str(e)
                continue
            code, text, _ = await self.exchange("answer " + base64.b64encode(blob).decode())
            if code == 200:
                self.logged_in = True
                return
            problem = f"{description} is not authorized for {self.user}"
        raise PhError(500, f"login as {self.user} failed: {problem}; {authorize_hint(self.user)}")

    async def close(self):
        """Close the connection, if open; the next command reconnects, logged out."""
        if self.link is not None:
            link, self.link, self.logged_in = self.link, None, False
            await link.close()


# SECTION: Formats — vCard, CSV, JSON and the machine exports (pure: text in, text out)

VCARD_LINE_RE = LazyRegex(r'(?s)(?:[A-Za-z0-9-]+\.)?([A-Za-z0-9-]+)'
                          r'((?:;(?:[^";:]|"[^"]*")*)*):(.*)\Z')
VCARD_PARAM_RE = LazyRegex(r';([^;=:"]*)(?:=((?:[^;:"]|"[^"]*")*))?')
VCARD_TEXT = {"FN": "name", "TITLE": "title", "NOTE": "notes", "URL": "url",
              "X-SSH-KEY": "ssh_key", "X-PHAROS-ALIAS": "alias"}
VCARD_BUILTIN = frozenset(("alias", "name", "nickname", "email", "phone", "mobile", "title",
                           "department", "office", "url", "ssh_key", "notes"))
SPLIT_CELL_RE = LazyRegex(r"[\s,;]+")
CSV_SYNONYMS = {
    "host": "hostname", "host_name": "hostname", "fqdn": "hostname", "ip_address": "ip",
    "ipaddress": "ip", "address": "ip", "mac_address": "mac", "macaddress": "mac",
    "tag": "tags", "service": "services", "operating_system": "os", "uid": "alias",
    "username": "alias", "user": "alias", "full_name": "name", "display_name": "name",
    "fn": "name", "e_mail": "email", "mail": "email", "telephone": "phone", "tel": "phone",
    "mobile_phone": "mobile", "cell": "mobile", "org": "department", "team": "department",
    "ssh_keys": "ssh_key", "note": "notes", "description": "notes", "comment": "notes",
    "comments": "notes",
}
MAX_JSON_ITEM = 4 << 20         # bytes one JSON array element may take


def user_fields(schema, rtype):
    """The fields of ``rtype`` a person sets (not type, not server-set), key first."""
    key = KEY_FIELD[rtype]
    return [key] + [f.name for f in schema.all[rtype]
                    if not f.server and f.name not in ("type", key)]


def export_record(record, names):
    """``record`` cut to ``names``, in that order, absent fields left out."""
    return {name: record[name] for name in names if record.get(name)}


def import_record(schema, rtype, fields):
    """A clean record of ``rtype`` from {name: [values]} read from a file; RecordError if
    refused. Server-set fields are skipped, so a listing can be imported as it is."""
    wanted = {}
    for name, values in fields.items():
        field = schema.field(name)
        if field is None:
            raise RecordError(f"unknown field {name!r}")
        if field.name == "type":
            other = {check_type(v.strip()) for v in values if v.strip()} - {rtype}
            if other:
                raise RecordError(f"this is a {other.pop()} record; import it with "
                                  f"{'mdb' if rtype == PERSON else 'ph'}")
        elif not field.server:
            wanted.setdefault(field.name, []).extend(values)
    return schema.build(rtype, wanted)


def record_changes(old, new):
    """{name: [values]} for every field ``new`` sets that ``old`` lacks or holds otherwise."""
    changes = {}
    for name, value in new.items():
        if name != "type" and old.get(name) != value:
            changes[name] = value if type(value) is list else [value]
    return changes


def write_requests(rtype, key, changes, is_new):
    """The add/change request lines that set ``changes`` on record ``key``.

    Each line stays within REQUEST_ROOM bytes; a field's values stay on one line (a
    change replaces every value of a field it names).
    """
    keyname = KEY_FIELD[rtype]
    more_head = f"change {keyname}={quote_value(key)} make"
    head = f"add {keyname}={quote_value(key)}" if is_new else more_head
    units = [" ".join(f"{name}={quote_value(v)}" for v in values)
             for name, values in changes.items() if not (is_new and name == keyname)]
    requests, current, count = [], head, 0
    for unit in units:
        if count and len(current.encode()) + len(unit.encode()) + 1 > REQUEST_ROOM:
            requests.append(current)
            current, count = more_head, 0
        current, count = f"{current} {unit}", count + 1
    requests.append(current)
    return requests


# -- vCard -------------------------------------------------------------------

def vcard_escape(text):
    """A vCard TEXT value: backslash, comma, semicolon and line breaks escaped."""
    return (text.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
            .replace("\n", "\\n"))


def vcard_unescape(text):
    """The inverse of vcard_escape (\\n and \\N are line breaks)."""
    if "\\" not in text:
        return text
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) in "nN" else m.group(1), text,
                  flags=re.S)


def vcard_split(value, sep):
    """``value`` split at each ``sep`` that is not escaped; parts keep their escapes."""
    parts, start, i = [], 0, 0
    while i < len(value):
        if value[i] == "\\":
            i += 2
            continue
        if value[i] == sep:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    parts.append(value[start:])
    return parts


def fold_line(text, limit=75):
    """A vCard content line folded at ``limit`` octets (never inside a character), CRLF-ended."""
    data = text.encode()
    if len(data) <= limit:
        return text + "\r\n"
    parts, start, room = [], 0, limit
    while start < len(data):
        end = min(start + room, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        parts.append(data[start:end].decode())
        start, room = end, limit - 1
    return "\r\n ".join(parts) + "\r\n"


def vcard_property(schema_field):
    """The X- property that carries a custom field, e.g. X-PHAROS-DESK-PHONE."""
    return "X-PHAROS-" + schema_field.upper().replace("_", "-")


def render_vcard(record, custom=()):
    """One person as a vCard 3.0 card (CRLF lines, folded); ``custom`` names extra fields."""
    alias, name = record["alias"], record.get("name", "")
    given, _, family = name.rpartition(" ")
    esc = vcard_escape
    out = ["BEGIN:VCARD", "VERSION:3.0", "UID:" + esc(f"pharos-person-{alias}"),
           "FN:" + esc(name or alias), "N:" + ";".join(map(esc, (family, given, "", "", "")))]
    simple = (("NICKNAME", "nickname"), ("EMAIL;TYPE=INTERNET", "email"),
              ("TEL;TYPE=WORK,VOICE", "phone"), ("TEL;TYPE=CELL", "mobile"),
              ("TITLE", "title"), ("ORG", "department"))
    out += [f"{prop}:{esc(record[f])}" for prop, f in simple if record.get(f)]
    if record.get("office"):
        out.append(f"ADR;TYPE=WORK:;;{esc(record['office'])};;;;")
    if record.get("url"):
        out.append("URL:" + record["url"])
    if record.get("notes"):
        out.append("NOTE:" + esc(record["notes"]))
    out += ["X-SSH-KEY:" + esc(key) for key in record.get("ssh_key", ())]
    out.append("X-PHAROS-ALIAS:" + esc(alias))
    for fname in custom:
        value = record.get(fname)
        for item in (value if type(value) is list else [value] if value else []):
            out.append(f"{vcard_property(fname)}:{esc(item)}")
    out.append("END:VCARD")
    return "".join(fold_line(text) for text in out)


def vcard_logical_lines(lines):
    """(line number, content line) from the physical lines of a vCard stream, unfolded."""
    pending, start = None, 0
    for n, raw in enumerate(lines, 1):
        text = raw.rstrip("\r\n")
        if text[:1] in (" ", "\t") and pending is not None:
            pending += text[1:]
            continue
        if pending is not None:
            yield start, pending
        pending, start = text, n
    if pending is not None:
        yield start, pending


def vcard_params(text):
    """{NAME: [values]} of a property's parameters; a bare 2.1 parameter counts as a TYPE."""
    params = {}
    for name, value in VCARD_PARAM_RE.findall(text):
        if not value:
            params.setdefault("TYPE", []).append(name.lower())
            continue
        values = value.replace('"', "").lower().split(",")
        params.setdefault(name.upper(), []).extend(v.strip() for v in values if v.strip())
    return params


def parse_vcards(lines):
    """(line, [(NAME, params, value)] or error text) for each card of a vCard stream."""
    card, start, bad = None, 0, None
    for n, text in vcard_logical_lines(lines):
        if not text.strip():
            continue
        match = VCARD_LINE_RE.match(text)
        name = match.group(1).upper() if match else None
        value = match.group(3).strip().upper() if match else ""
        if card is None:
            if name == "BEGIN" and value == "VCARD":
                card, start, bad = [], n, None
            else:
                yield n, f"expected BEGIN:VCARD, found {printable(text, 40)!r}"
            continue
        if name == "BEGIN":
            yield start, f"the card has no END:VCARD before line {n}"
            card, start, bad = [], n, None
        elif name == "END" and value == "VCARD":
            yield bad or (start, card)
            card = None
        elif match is None:
            bad = bad or (n, f"not a vCard property line (NAME:value): {printable(text, 40)!r}")
        else:
            card.append((name, vcard_params(match.group(2)), match.group(3)))
    if card is not None:
        yield start, "the card has no END:VCARD"


def person_from_vcard(props, custom):
    """{field: [values]} of a person from one card's properties; RecordError if unusable.

    ``custom`` maps X-PHAROS-* property names to custom fields.
    """
    version = next((v.strip() for name, _, v in props if name == "VERSION"), None)
    if version not in ("2.1", "3.0", "4.0"):
        raise RecordError(f"vCard version {version} is not supported (3.0 or 4.0)" if version
                          else "the card has no VERSION")
    fields, family_given = {}, ["", ""]
    for name, params, value in props:
        vcard_field(fields, family_given, name, params, value, custom)
    alias = fields.get("alias", [""])[0]
    if not fields.get("name") and any(family_given):
        fields["name"] = [" ".join(p for p in reversed(family_given) if p)]
    if alias and fields.get("name") == [alias] and not any(family_given):
        del fields["name"]
    if not alias:
        fields["alias"] = [derive_alias(fields)]
    return fields


def vcard_field(fields, family_given, name, params, value, custom):
    """Put one vCard property into ``fields`` (single-valued fields keep the first)."""
    types = params.get("TYPE", [])
    one = lambda field, text: fields.setdefault(field, [text])  # noqa: E731
    if name in VCARD_TEXT:
        text = value.strip() if name == "URL" else vcard_unescape(value)
        if name == "X-SSH-KEY":
            fields.setdefault("ssh_key", []).append(text)
        else:
            one(VCARD_TEXT[name], text)
    elif name == "N":
        parts = [vcard_unescape(p).strip() for p in vcard_split(value, ";")] + ["", ""]
        family_given[:] = parts[:2]
    elif name == "NICKNAME":
        one("nickname", vcard_unescape(vcard_split(value, ",")[0]))
    elif name == "EMAIL":
        one("email", re.sub(r"(?i)^mailto:", "", vcard_unescape(value)).strip())
    elif name == "TEL":
        number = re.sub(r"(?i)^tel:", "", vcard_unescape(value)).strip()
        one("mobile" if "cell" in types else "phone", number)
    elif name == "ORG":
        parts = [vcard_unescape(p).strip() for p in vcard_split(value, ";")]
        one("department", ", ".join(p for p in parts if p))
    elif name == "ADR":
        parts = [vcard_unescape(p).strip() for p in vcard_split(value, ";")]
        one("office", "\n".join(p for p in parts if p))
    elif name in custom:
        field = custom[name]
        fields.setdefault(field.name, []).append(vcard_unescape(value))
        if not field.multi:
            del fields[field.name][1:]


def derive_alias(fields):
    """An alias for a card without X-PHAROS-ALIAS: the email's local part, else the name."""
    import unicodedata
    local = fields.get("email", [""])[0].partition("@")[0]
    local = re.sub(r"[^A-Za-z0-9._-]", "", local).lstrip("._-")
    if local:
        return local[:32]
    name = unicodedata.normalize("NFKD", fields.get("name", [""])[0])
    slug = re.sub(r"[^a-z0-9]+", ".", name.encode("ascii", "ignore").decode().lower()).strip(".")
    if slug:
        return slug[:32]
    raise RecordError("the card has no X-PHAROS-ALIAS, email or name to make an alias from")


def parse_vcard_file(f, schema, rtype):
    """(line, fields or error text) per card of a vCard file (people only)."""
    custom = {vcard_property(fl.name): fl for fl in schema.all[PERSON]
              if fl.name not in VCARD_BUILTIN and not fl.server and fl.name != "type"}
    for start, card in parse_vcards(f):
        if type(card) is str:
            yield start, card
            continue
        try:
            yield start, person_from_vcard(card, custom)
        except RecordError as e:
            yield start, str(e)


# -- CSV and JSON --------------------------------------------------------------

def csv_line(cells):
    """One RFC 4180 CSV row (CRLF-ended; quotes only where needed)."""
    import csv
    import io
    buf = io.StringIO()
    csv.writer(buf).writerow(cells)
    return buf.getvalue()


def csv_cell(value):
    """A field's value as a CSV cell: several values one per line."""
    return "\n".join(value) if type(value) is list else (value or "")


def split_cell(field, cell):
    """The values of one CSV cell: one per line for a multi-valued field, and for ip, mac,
    services and tags also split at commas, semicolons and spaces."""
    if not field.multi:
        return [cell]
    lines = cell.splitlines()
    if field.name in ("ip", "mac", "services", "tags"):
        return [v for text in lines for v in SPLIT_CELL_RE.split(text) if v]
    return lines


def csv_columns(header, schema, rtype):
    """Field names for a CSV header row (common spellings accepted); RecordError if unusable."""
    names = []
    for cell in header:
        key = re.sub(r"[\s-]+", "_", cell.strip().lower())
        key = "hostname" if rtype == MACHINE and key == "name" else CSV_SYNONYMS.get(key, key)
        field = schema.field(key) if FIELD_NAME_RE.match(key) else None
        if field is None or (rtype not in field.types):
            raise RecordError(f"unknown column {printable(cell, 40)!r} for a {rtype}")
        if field.name in names:
            raise RecordError(f"column {field.name} appears twice")
        names.append(field.name)
    if KEY_FIELD[rtype] not in names:
        raise RecordError(f"the header row has no {KEY_FIELD[rtype]} column")
    return names


def parse_csv(f, schema, rtype):
    """(line, fields or error text) per row of a CSV file with a header row."""
    import csv
    reader, end = csv.reader(f), 0
    try:
        header = next(reader, None)
        if header is None:
            raise FormatError(1, "the file is empty; a CSV import needs a header row")
        try:
            names = csv_columns(header, schema, rtype)
        except RecordError as e:
            raise FormatError(1, str(e)) from None
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                yield start, f"{len(row)} cells, but the header has {len(names)} columns"
                continue
            yield start, {name: split_cell(schema.by_name[name], cell)
                          for name, cell in zip(names, row) if cell.strip()}
    except csv.Error as e:
        raise FormatError(end + 1, f"not CSV: {e}") from None


def fields_from_json(item):
    """{name: [values]} from one JSON record object; RecordError if it is not one."""
    if type(item) is not dict:
        raise RecordError("each record must be a JSON object")
    fields = {}
    for name, value in item.items():
        if name == SOURCES_KEY:         # `mdb --json` prints it; an import is a person's write
            continue
        values = value if type(value) is list else [value]
        if not all(type(v) is str for v in values):
            raise RecordError(f"{printable(name, 32)} must be a string or a list of strings")
        fields[name] = values
    return fields


def parse_jsonl(f, schema, rtype):
    """(line, fields or error text) per line of a JSON-lines file."""
    for n, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            yield n, fields_from_json(json.loads(text))
        except ValueError as e:
            yield n, f"not JSON: {e}"
        except RecordError as e:
            yield n, str(e)


def parse_json(f, schema, rtype):
    """(line, fields or error text) per element of a JSON file holding one list."""
    for n, item in json_array_items(f):
        try:
            yield n, fields_from_json(item)
        except RecordError as e:
            yield n, str(e)


def json_array_items(f, chunk=1 << 16):
    """(line, element) for each element of the JSON list in text stream ``f``, read
    piece by piece (constant memory); FormatError names the line of a problem."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    state = {"buf": "", "pos": 0, "mark": 0, "line": 1, "eof": False}

    def line_at(p):
        """The line number at buffer offset ``p`` (offsets only move forward)."""
        state["line"] += state["buf"].count("\n", state["mark"], p)
        state["mark"] = p
        return state["line"]

    def fill():
        """Read the next chunk onto the buffer, dropping what has been consumed."""
        line_at(state["pos"])
        data = f.read(chunk)
        state.update(buf=state["buf"][state["pos"]:] + data, pos=0, mark=0, eof=not data)

    def peek():
        """Skip white space and return the next character ("" at the end of the file)."""
        while True:
            state["pos"] = space.match(state["buf"], state["pos"]).end()
            if state["pos"] < len(state["buf"]) or state["eof"]:
                return state["buf"][state["pos"]:state["pos"] + 1]
            fill()

    if peek() != "[":
        raise FormatError(line_at(state["pos"]),
                          "a JSON import must be a list of record objects ([{...}, ...])")
    state["pos"] += 1
    sep = peek()
    while sep != "]":
        while True:
            try:
                item, end = decoder.raw_decode(state["buf"], state["pos"])
                break
            except ValueError as e:
                if state["eof"] or len(state["buf"]) - state["pos"] > MAX_JSON_ITEM:
                    where = max(getattr(e, "pos", state["pos"]), state["pos"])
                    reason = getattr(e, "msg", e)
                    raise FormatError(line_at(where), f"not JSON: {reason}") from None
                fill()
        yield line_at(state["pos"]), item
        state["pos"] = end
        sep = peek()
        if sep not in (",", "]"):
            raise FormatError(line_at(state["pos"]), "expected ',' or ']' in the list")
        if sep == ",":
            state["pos"] += 1
            if peek() == "]":
                raise FormatError(line_at(state["pos"]), "a ',' before the list's ']'")


IMPORT_PARSERS = {"vcard": parse_vcard_file, "csv": parse_csv, "json": parse_json,
                  "jsonl": parse_jsonl}


def import_items(parse, f, schema, rtype):
    """(line, clean record, None) or (line, None, why refused) per record of an import file."""
    for n, item in parse(f, schema, rtype):
        if type(item) is str:
            yield n, None, item
            continue
        try:
            yield n, import_record(schema, rtype, item), None
        except RecordError as e:
            yield n, None, str(e)


def guess_format(path, head):
    """An import file's format from its name, else from its first characters."""
    ext = os.path.splitext(path)[1].lower()
    known = {".vcf": "vcard", ".vcard": "vcard", ".csv": "csv", ".json": "json",
             ".jsonl": "jsonl", ".ndjson": "jsonl"}
    if ext in known:
        return known[ext]
    head = head.lstrip("\ufeff \t\r\n")
    if head[:11].upper() == "BEGIN:VCARD":
        return "vcard"
    return {"[": "json", "{": "jsonl"}.get(head[:1], "csv")


# -- exporters: head(), item(record) and tail(), each returning text ------------

class Exporter:
    """The shape every exporter has: text before, per record, and after the records."""

    def head(self):
        """Text before the first record."""
        return ""

    def item(self, record):
        """Text of one record."""
        raise NotImplementedError

    def tail(self):
        """Text after the last record."""
        return ""


class JsonExporter(Exporter):
    """Records as one JSON list, a record per line."""

    def __init__(self, names):
        self.names, self.count = names, 0

    def head(self):
        """The list's opening bracket."""
        return "["

    def item(self, record):
        """One record as JSON on its own line, a comma before all but the first."""
        self.count += 1
        text = json.dumps(self.shape(record), ensure_ascii=False)
        return ("\n" if self.count == 1 else ",\n") + text

    def shape(self, record):
        """The object written for ``record``: its chosen fields."""
        return export_record(record, self.names)

    def tail(self):
        """The list's closing bracket."""
        return "\n]\n" if self.count else "]\n"


class JsonlExporter(JsonExporter):
    """Records as JSON lines, one object per line."""

    def head(self):
        """Nothing: JSON lines have no header."""
        return ""

    def item(self, record):
        """One record as one line of JSON."""
        return json.dumps(self.shape(record), ensure_ascii=False) + "\n"

    def tail(self):
        """Nothing: JSON lines have no trailer."""
        return ""


class CsvExporter(Exporter):
    """Records as RFC 4180 CSV with a header row; several values in a cell one per line."""

    def __init__(self, names):
        self.names = names

    def head(self):
        """The header row of field names."""
        return csv_line(self.names)

    def item(self, record):
        """One record as a CSV row."""
        return csv_line([csv_cell(record.get(name)) for name in self.names])


class VcardExporter(Exporter):
    """People as vCard 3.0 cards."""

    def __init__(self, custom):
        self.custom = custom

    def item(self, record):
        """One person as a vCard."""
        return render_vcard(record, self.custom)


def host_names(hostname, domain):
    """The names of a hosts or dnsmasq line: the FQDN first when a domain is given."""
    if domain and "." not in hostname.rstrip("."):
        return [f"{hostname}.{domain}", hostname]
    return [hostname]


class HostsExporter(Exporter):
    """/etc/hosts lines: one per address of each machine (also dnsmasq's addn-hosts)."""

    def __init__(self, domain=None):
        self.domain = domain

    def item(self, record):
        """One hosts line per address of the machine."""
        names = " ".join(host_names(record["hostname"], self.domain))
        return "".join(f"{ip}\t{names}\n" for ip in record.get("ip", ()))


class DnsmasqExporter(HostsExporter):
    """dnsmasq host-record lines (A/AAAA and PTR), one per address."""

    def item(self, record):
        """One host-record line per address of the machine."""
        names = ",".join(host_names(record["hostname"], self.domain))
        return "".join(f"host-record={names},{ip}\n" for ip in record.get("ip", ()))


def prometheus_target_group(record, port):
    """One file_sd/http_sd target group: the machine's first address (IPv4 preferred) on
    ``port``, with instance and __meta_pharos_<field> labels."""
    ips = record.get("ip") or []
    v4 = [ip for ip in ips if ":" not in ip]
    host = v4[0] if v4 else f"[{ips[0]}]" if ips else record["hostname"]
    labels = {"instance": record["hostname"]}
    for name, value in record.items():
        if name in ("type", "notes") or not value:
            continue
        if type(value) is list:
            value = f",{','.join(value)}," if name == "tags" else ",".join(value)
        labels["__meta_pharos_" + re.sub(r"[^A-Za-z0-9_]", "_", name)] = value
    return {"targets": [f"{host}:{port}"], "labels": labels}


class PrometheusSdExporter(JsonExporter):
    """Prometheus file_sd (and http_sd) target groups, one per machine."""

    def __init__(self, port):
        super().__init__(())
        self.port = port

    def shape(self, record):
        """The machine as a target group."""
        return prometheus_target_group(record, self.port)


def ansible_name(text):
    """A valid Ansible group name: lower-case, anything but letters, digits and _ as _."""
    return re.sub(r"[^a-z0-9_]", "_", text.lower())


def ansible_hostvars(record):
    """A machine's Ansible host variables: ansible_host and pharos_<field>."""
    hostvars = {}
    ips = record.get("ip") or []
    if ips:
        hostvars["ansible_host"] = next((ip for ip in ips if ":" not in ip), ips[0])
    for name, value in record.items():
        if name != "type" and value:
            hostvars["pharos_" + ansible_name(name)] = value
    return hostvars


def ansible_groups(record):
    """The groups a machine belongs to: role_, os_, location_ and tag_<value>."""
    groups = []
    for field, prefix in (("role", "role_"), ("os", "os_"), ("location", "location_"),
                          ("tags", "tag_")):
        value = record.get(field) or []
        for item in (value if type(value) is list else [value]):
            groups.append(ansible_name(prefix + item))
    return groups


class AnsibleExporter(Exporter):
    """An Ansible dynamic inventory (the script protocol's --list output)."""

    def __init__(self):
        self.groups, self.ungrouped, self.count = {}, [], 0

    def head(self):
        """The opening of the inventory, up to _meta's hostvars."""
        return '{"_meta": {"hostvars": {'

    def item(self, record):
        """One machine's hostvars entry; its groups are kept for the tail."""
        name = record["hostname"]
        groups = ansible_groups(record)
        for group in groups:
            self.groups.setdefault(group, []).append(name)
        if not groups:
            self.ungrouped.append(name)
        self.count += 1
        text = json.dumps({name: ansible_hostvars(record)}, ensure_ascii=False)[1:-1]
        return ("\n" if self.count == 1 else ",\n") + text

    def tail(self):
        """Close the hostvars, then the groups, ungrouped and all."""
        inventory = {name: {"hosts": hosts} for name, hosts in sorted(self.groups.items())}
        inventory["ungrouped"] = {"hosts": self.ungrouped}
        inventory["all"] = {"children": ["ungrouped"] + sorted(self.groups)}
        return "\n}},\n" + json.dumps(inventory, ensure_ascii=False, indent=1)[1:] + "\n"


# SECTION: Discovery — scan targets, port lists, the probe engine, banners, neighbours

# The 100 TCP ports nmap's nmap-services ranks most often open, most common first.
TOP100_PORTS = (
    80, 23, 443, 21, 22, 25, 3389, 110, 445, 139, 143, 53, 135, 3306, 8080, 1723, 111, 995,
    993, 5900, 1025, 587, 8888, 199, 1720, 465, 548, 113, 81, 6001, 10000, 514, 5060, 179,
    1026, 2000, 8443, 8000, 32768, 554, 26, 1433, 49152, 2001, 515, 8008, 49154, 1027, 5666,
    646, 5000, 5631, 631, 49153, 8081, 2049, 88, 79, 5800, 106, 2121, 1110, 49155, 6000, 513,
    990, 5357, 427, 49156, 543, 544, 5101, 144, 7, 389, 8009, 3128, 444, 9999, 5009, 7070,
    5190, 3000, 5432, 3986, 1900, 13, 1029, 9, 6646, 5051, 49157, 1028, 873, 1755, 2717, 4899,
    9100, 119, 37)
PORT_NAMES = {
    7: "echo", 21: "ftp", 22: "ssh", 23: "telnet", 25: "smtp", 53: "domain", 79: "finger",
    80: "http", 81: "http", 88: "kerberos", 110: "pop3", 111: "rpcbind", 119: "nntp",
    135: "msrpc", 139: "netbios-ssn", 143: "imap", 179: "bgp", 389: "ldap", 443: "https",
    445: "microsoft-ds", 465: "smtps", 514: "shell", 515: "printer", 548: "afp", 554: "rtsp",
    587: "submission", 631: "ipp", 636: "ldaps", 873: "rsync", 990: "ftps", 993: "imaps",
    995: "pop3s", 1433: "ms-sql-s", 1723: "pptp", 1883: "mqtt", 2049: "nfs", 2378: "ph",
    3000: "http", 3128: "squid-http", 3306: "mysql", 3389: "ms-wbt-server", 5000: "http",
    5060: "sip", 5432: "postgresql", 5900: "vnc", 6000: "x11", 6379: "redis", 8000: "http",
    8008: "http", 8080: "http-proxy", 8081: "http", 8443: "https", 8888: "http",
    9090: "http", 9100: "jetdirect", 9443: "https", 27017: "mongodb"}
HTTP_PORTS = frozenset((80, 81, 3000, 5000, 8000, 8008, 8080, 8081, 8888, 9090))
TLS_PORTS = frozenset((443, 465, 636, 990, 993, 995, 8443, 9443))
HTTPS_PORTS = frozenset((443, 8443, 9443))
OUI_FILES = ("/usr/share/ieee-data/oui.txt", "/usr/share/nmap/nmap-mac-prefixes",
             "/usr/share/arp-scan/ieee-oui.txt")
SCAN_TIMEOUT = 1.0              # seconds a probe, or a banner read, may take
SCAN_CONCURRENCY = 4096         # probes in flight by default, lowered to the fd limit
SCAN_MAX_ADDRESSES = 65536      # a /16; more needs --force
SCAN_FORCE_MAX_ADDRESSES = 1 << 24
SCAN_BATCH = 1024               # probes started between two looks at the clock
BANNER_BYTES = 16384            # bytes read from one service at most
BANNER_TEXT = 80                # characters of banner text kept
BANNER_WORKERS = 32
RDNS_WORKERS = 16
HOSTKEY_WORKERS = 32            # machines whose SSH host keys are fetched at once
SERVICE_MAX = 40                # the schema's longest services value
RESOURCE_ERRORS = frozenset((errno.EADDRNOTAVAIL, errno.EAGAIN, errno.ENOBUFS, errno.EMFILE,
                             errno.ENFILE, errno.ENOMEM))
TARGET_HELP = "say a CIDR (192.168.1.0/24), a range (10.0.0.10-50), an address or a host name"
TITLE_RE = LazyRegex(rb"(?is)<title[^>]*>(.*?)</title")
OUI_LINE_RE = LazyRegex(r"\s*([0-9A-Fa-f]{2}(?:[-:]?[0-9A-Fa-f]{2}){2}[0-9A-Fa-f]{0,6})\s+"
                         r"(?:\((?:hex|base 16)\)\s+)?(\S.*)")
MAC_RE = LazyRegex(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}\Z")
# The service types home labs announce; more come from the DNS-SD enumeration.
MDNS_TYPES = tuple(f"_{name}._tcp.local." for name in (
    "ssh", "http", "https", "workstation", "smb", "ipp", "printer", "googlecast", "airplay",
    "hap", "device-info"))
MDNS_ENUMERATE = "_services._dns-sd._udp.local."
MDNS_SECONDS = 3.0              # default browse time of a scan
MDNS_MAX_SECONDS = 60.0          # the longest --mdns-seconds
MDNS_RESOLVE = 1.0              # seconds after browsing to ask for what the cache lacks
MDNS_MAX_TYPES = 64             # service types browsed at most, listed and enumerated
MDNS_MAX_SERVICES = 1024        # service instances kept at most
MDNS_MAX_ADDRESSES = 16         # addresses kept of one service
MDNS_NAME = 63                  # characters of a host name kept (one DNS label)
MDNS_MODEL_KEYS = (b"md", b"model", b"ty")
MDNS_VENDOR_KEYS = (b"manufacturer", b"vendor")
# RFC 6335 service names: letters, digits and hyphens, 15 at most.
MDNS_TYPE_RE = LazyRegex(r"_([A-Za-z0-9-]{1,15})\._(?:tcp|udp)\.local\.\Z")


# -- targets and ports -----------------------------------------------------------

def parse_target(text):
    """One TARGET as ("range", first, last) addresses, or ("name", host name)."""
    text = text.strip()
    if text[:1] == "[" and text[-1:] == "]":    # [::1], as in a URL: an IPv6 address only
        text = text[1:-1] if ":" in text else text
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            return ("range", net[0], net[-1])
        if "-" in text:
            return range_target(text)
        address = ipaddress.ip_address(text)
        return ("range", address, address)
    except ValueError:
        pass
    # A name whose last label is all digits is an address or range gone wrong.
    if HOSTNAME_RE.match(text) and not text.rsplit(".", 1)[-1].replace("-", "").isdigit():
        return ("name", text)
    raise UsageError(f"scan: bad target {text!r}: {TARGET_HELP}")


def range_target(text):
    """A range 10.0.0.10-50 (last octet) or 10.0.0.10-10.0.1.5; ValueError if not one."""
    left, right = text.split("-", 1)
    first = ipaddress.ip_address(left)
    if first.version == 4 and right.isdigit() and int(right) < 256:
        last = ipaddress.ip_address(int(first) & ~0xff | int(right))
    else:
        last = ipaddress.ip_address(right)
    if last.version != first.version or last < first:
        raise ValueError(text)
    return ("range", first, last)


def target_size(target):
    """How many addresses a parsed target holds (a name counts as one)."""
    return int(target[2]) - int(target[1]) + 1 if target[0] == "range" else 1


def parse_targets(texts, force=False):
    """Every TARGET parsed; UsageError naming the bad one or saying the total is too large."""
    targets = [parse_target(t) for t in texts]
    total = sum(target_size(t) for t in targets)
    limit = SCAN_FORCE_MAX_ADDRESSES if force else SCAN_MAX_ADDRESSES
    if total > limit:
        more = "" if force else " (a /16, or an IPv6 /112; --force allows up to a /8 or a /104)"
        raise UsageError(f"scan: the targets hold {total:,} addresses, more than {limit:,}{more}")
    return targets


def parse_ports(text):
    """--ports: a sorted list from items like 22,80,8000-8100, top100 or all."""
    ports = set()
    for item in text.split(","):
        item = item.strip().lower()
        first, dash, last = item.partition("-")
        first, last = parse_count(first, 1, 65535), parse_count(last if dash else first, 1, 65535)
        if item in ("top100", "all"):
            ports.update(TOP100_PORTS if item == "top100" else range(1, 65536))
        elif first is not None and last is not None and first <= last:
            ports.update(range(first, last + 1))
        else:
            raise UsageError(f"scan: bad --ports item {item!r}: say ports and ranges from 1 to "
                             f"65535 like 22,80,8000-8100, or top100, or all")
    return sorted(ports)


def local_networks(interfaces, force=False):
    """The IPv4 networks to scan without a target, from (interface, "addr/mask") pairs.

    Loopback and link-local addresses are left out; a network larger than a /16 is cut
    to the /16 around the address unless ``force``.  Returns (networks, notes).
    """
    networks, notes = [], []
    for name, text in interfaces:
        iface = ipaddress.ip_interface(text)
        if iface.version != 4 or iface.is_loopback or iface.is_link_local:
            continue
        net = iface.network
        if net.num_addresses > SCAN_MAX_ADDRESSES and not force:
            cut = ipaddress.ip_interface(f"{iface.ip}/16").network
            notes.append(f"{name}: {net} is larger than a /16; scanning {cut} "
                         f"(--force scans all of it)")
            net = cut
        if all(net != n for _, n in networks):
            networks.append((name, net))
    return networks, notes


def interface_addresses():
    """(interface, "address/netmask") for each IPv4 interface, read with ioctl (Linux)."""
    import fcntl
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                address = fcntl.ioctl(sock.fileno(), 0x8915, request)[20:24]   # SIOCGIFADDR
                netmask = fcntl.ioctl(sock.fileno(), 0x891b, request)[20:24]   # SIOCGIFNETMASK
            except OSError:
                continue
            out.append((name, f"{socket.inet_ntoa(address)}/{socket.inet_ntoa(netmask)}"))
    return out


def resolve_targets(targets):
    """[(address, name or None)] in target order, each address once; names resolved."""
    seen, out = set(), []
    for target in targets:
        if target[0] == "name":
            pairs = [(a, target[1]) for a in resolve_name(target[1])]
        else:
            # first + n keeps the first address's version: ip_address(1) would be 0.0.0.1
            pairs = ((target[1] + n, None) for n in range(target_size(target)))
        for address, name in pairs:
            if address not in seen:
                seen.add(address)
                out.append((address, name))
    return out


def resolve_name(name):
    """The addresses of a host name; UsageError when it has none."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"scan: bad target {name!r}: no such host") from None
    return list(dict.fromkeys(ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos))


# -- the probe engine ------------------------------------------------------------

class ProbeEngine:
    """TCP connect probes on one selectors loop: a bounded number in flight, each with a
    deadline; refused, unreachable and timed-out ports are dropped without a retry."""

    def __init__(self, concurrency, timeout, advance=None):
        import collections
        self.concurrency, self.timeout = concurrency, timeout
        self.advance = advance or (lambda count: None)
        self.selector = selectors.DefaultSelector()
        # Every probe has the same timeout, so deadlines come due in the order they start.
        self.deadlines = collections.deque()
        self.open, self.waiting, self.done = [], 0, 0
        self.held, self.exhausted = None, False

    def run(self, probes):
        """Probe each (family, address, port) of ``probes``; return the open (address, port)."""
        probes = iter(probes)
        try:
            while not (self.exhausted and self.held is None and not self.waiting):
                before = self.done
                self.fill(probes)
                if self.waiting:
                    self.wait()
                self.advance(self.done - before)
        finally:
            for _, sock in self.deadlines:
                sock.close()
            self.selector.close()
        return self.open

    def fill(self, probes):
        """Start probes until the in-flight limit, a resource shortage or a batch's end."""
        for _ in range(SCAN_BATCH):
            if self.waiting >= self.concurrency:
                return
            probe = self.held or next(probes, None)
            if probe is None:
                self.exhausted = True
                return
            self.held = None if self.start(*probe) else probe
            if self.held:
                return

    def start(self, family, address, port):
        """Connect one socket; False when the kernel is short of a resource for now."""
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            if e.errno in RESOURCE_ERRORS and self.waiting:
                return False
            raise
        error = sock.connect_ex((address, port))
        if error == errno.EINPROGRESS:
            # On loopback and near hosts the kernel often has the answer already.
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not error and not connected(sock):
                self.wait_for(sock, address, port)
                return True
        if error in RESOURCE_ERRORS and self.waiting:
            sock.close()
            return False
        self.finish(sock, address, port, error)
        return True

    def wait_for(self, sock, address, port):
        """Watch a connecting socket until it is writable or its deadline passes."""
        self.selector.register(sock, selectors.EVENT_WRITE, (address, port))
        self.deadlines.append((time.monotonic() + self.timeout, sock))
        self.waiting += 1

    def finish(self, sock, address, port, error):
        """Count one probe done; keep it when it connected."""
        if not error:
            self.open.append((address, port))
            # Reset rather than FIN: no TIME_WAIT left behind for each open port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        self.done += 1

    def wait(self):
        """Finish the sockets that became writable, then drop those past their deadline."""
        timeout = max(0.0, self.deadlines[0][0] - time.monotonic()) if self.deadlines else None
        for key, _ in self.selector.select(timeout):
            self.selector.unregister(key.fileobj)
            self.waiting -= 1
            error = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.finish(key.fileobj, *key.data, error)
        now = time.monotonic()
        while self.deadlines and (self.deadlines[0][0] <= now
                                  or self.deadlines[0][1].fileno() == -1):
            _, sock = self.deadlines.popleft()
            if sock.fileno() != -1:
                self.selector.unregister(sock)
                self.waiting -= 1
                sock.close()
                self.done += 1


def connected(sock):
    """Whether a non-blocking connect has completed."""
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


def probe_list(addresses, ports):
    """(family, address, port) for every address and port, one host's ports together."""
    for address in addresses:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        text = str(address)
        for port in ports:
            yield family, text, port


OID_CN = bytes((0x55, 0x04, 0x03))          # 2.5.4.3 commonName
OID_SAN = bytes((0x55, 0x1d, 0x11))         # 2.5.29.17 subjectAltName


def cert_names(der):
    """(subject CN or "", [DNS names]) of an X.509 certificate in DER."""
    der = bytes(der)
    _, start, end = der_item(der, 0, len(der))
    tbs = der_children(der, *der_item(der, start, end)[1:])
    # serial, signature, issuer, validity, subject, key; [0] version and [1]-[3] aside
    plain = [t for t in tbs if t[0] & 0xc0 != 0x80]
    if len(plain) < 6:
        raise DerError("certificate has too few parts")
    cn = subject_cn(der, plain[4])
    extensions = [t for t in tbs if t[0] == 0xa3]
    return cn, (san_names(der, extensions[0]) if extensions else [])


def subject_cn(der, name):
    """The first commonName of an X.501 Name."""
    for _, set_start, set_end in der_children(der, name[1], name[2]):
        for _, start, end in der_children(der, set_start, set_end):
            oid, value = der_children(der, start, end)[:2]
            if der[oid[1]:oid[2]] == OID_CN:
                return der[value[1]:value[2]].decode("utf-8", "replace")
    return ""


def san_names(der, extensions):
    """The dNSName entries of the subjectAltName extension."""
    outer = der_item(der, extensions[1], extensions[2])
    for _, start, end in der_children(der, outer[1], outer[2]):
        parts = der_children(der, start, end)
        if der[parts[0][1]:parts[0][2]] == OID_SAN:
            names = der_item(der, parts[-1][1], parts[-1][2])
            return [der[s:e].decode("ascii", "replace")
                    for tag, s, e in der_children(der, names[1], names[2]) if tag == 0x82]
    return []


# -- banners ---------------------------------------------------------------------

def clean_text(data, cap=BANNER_TEXT):
    """Untrusted bytes as one short printable line: control characters out, length capped."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:cap].strip()


def first_line(data):
    """The first non-empty line of a banner, cleaned."""
    for line in data.splitlines():
        if clean_text(line):
            return clean_text(line)
    return ""


def ssh_software(line):
    """The software of an SSH version line: OpenSSH_9.2p1 from SSH-2.0-OpenSSH_9.2p1 Debian."""
    parts = clean_text(line).split(" ", 1)[0].split("-", 2)
    return parts[2] if len(parts) == 3 else ""


def http_details(data):
    """(Server header, page title) of an HTTP response's first bytes."""
    import html
    head = data.split(b"\r\n\r\n", 1)[0]
    server = ""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"server":
            server = clean_text(value, 40)
    match = TITLE_RE.search(data)
    title = clean_text(html.unescape(match.group(1).decode("utf-8", "replace"))) if match else ""
    return server, title


def service_value(port, name, details):
    """A services value: port/name and as many details as fit the schema's length."""
    value = f"{port}/{name}"
    for detail in filter(None, details):
        room = SERVICE_MAX - len(value) - 1
        if room < 4:
            break
        if detail.startswith('"') and len(detail) > room:
            detail = detail[:room - 1].rstrip() + '"'
        value = f"{value} {detail[:room]}".rstrip()
    return value


def read_until(sock, deadline, stop=None, cap=BANNER_BYTES):
    """Bytes from ``sock`` until EOF, ``cap`` bytes, the deadline, or ``stop`` is seen."""
    data = b""
    while len(data) < cap:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(cap - len(data))
        except (socket.timeout, OSError):
            break
        if not chunk:
            break
        data += chunk
        if stop and stop(data):
            break
    return data


def http_request(host):
    """The GET a banner read sends to an HTTP port."""
    return (f"GET / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: pharos-scan/{__version__}\r\n"
            f"Accept: text/html\r\nConnection: close\r\n\r\n").encode()


def http_stop(data):
    """Whether enough of an HTTP response came for the Server header and title."""
    return b"</title" in data.lower()


def speak_banner(sock, port, deadline):
    """What a service that speaks first says: (name, details)."""
    data = read_until(sock, deadline, lambda d: b"\n" in d, cap=1024)
    if data.startswith(b"SSH-"):
        return "ssh", [ssh_software(first_line(data))]
    return PORT_NAMES.get(port, "tcp"), [first_line(data)]


def http_banner(sock, address, port, deadline, name="http"):
    """Send a GET; (name, [server, "title"]) from the answer."""
    sock.sendall(http_request(format_address(address, port)))
    server, title = http_details(read_until(sock, deadline, http_stop))
    return name, [server, f'"{title}"' if title else ""]


def tls_banner(sock, address, port, deadline):
    """A TLS handshake (no verification): the certificate's names, then HTTP or a greeting."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    with context.wrap_socket(sock) as tls:
        cn, sans = cert_names(tls.getpeercert(binary_form=True) or b"")
        names = list(dict.fromkeys(clean_text(n, 64) for n in [cn] + sans if n))
        if port in HTTPS_PORTS:
            name, details = http_banner(tls, address, port, deadline, "https")
        else:
            name, details = speak_banner(tls, port, deadline)
    return name, (details if any(details) and port in HTTPS_PORTS else names or details)


def read_banner(address, port, timeout):
    """The services value of one open port, from what the service says (never raises)."""
    deadline = time.monotonic() + timeout
    name, details = PORT_NAMES.get(port, "tcp"), []
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            if port in TLS_PORTS:
                name, details = tls_banner(sock, address, port, deadline)
            elif port in HTTP_PORTS:
                name, details = http_banner(sock, address, port, deadline)
            else:
                name, details = speak_banner(sock, port, deadline)
    except (OSError, ValueError, DerError):
        pass
    return service_value(port, name, details)


def read_banners(found, timeout):
    """{(address, port): services value} for every open port, read in a few threads."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=max(1, min(BANNER_WORKERS, len(found)))) as pool:
        values = pool.map(lambda ap: read_banner(ap[0], ap[1], timeout), found)
        return dict(zip(found, values))


# -- neighbours, vendors and names -------------------------------------------------

def parse_proc_arp(text):
    """(ip, mac, device) of the complete entries of /proc/net/arp."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6 and int(parts[2], 16) & 0x2 and MAC_RE.match(parts[3].lower()):
            if parts[3] != "00:00:00:00:00:00":
                out.append((parts[0], parts[3].lower(), parts[5]))
    return out


def parse_ip_neigh(text):
    """(ip, mac, device) of the lines of `ip -6 neigh` that carry a link-layer address."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if "lladdr" in parts and "dev" in parts and parts.index("lladdr") + 1 < len(parts):
            mac = parts[parts.index("lladdr") + 1].lower()
            if MAC_RE.match(mac) and parts[-1] not in ("FAILED", "INCOMPLETE"):
                out.append((parts[0].split("%")[0], mac, parts[parts.index("dev") + 1]))
    return out


def read_neighbours():
    """The kernel's neighbour table: /proc/net/arp, and `ip -6 neigh` when ip exists."""
    import shutil
    import subprocess
    out = []
    with contextlib.suppress(OSError):
        with open("/proc/net/arp", encoding="ascii", errors="replace") as f:
            out += parse_proc_arp(f.read(1 << 20))
    if shutil.which("ip"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(["ip", "-6", "neigh", "show"], capture_output=True,
                                  timeout=2, text=True, errors="replace")
            out += parse_ip_neigh(done.stdout[:1 << 20])
    return out


def oui_vendors(macs, lines):
    """{mac: vendor} for the MACs whose prefix an OUI list (lines of text) names."""
    wanted = {m.replace(":", "").upper(): m for m in macs}
    found = {}
    for line in lines:
        match = OUI_LINE_RE.match(line)
        if not match:
            continue
        prefix = re.sub("[-:]", "", match.group(1)).upper()
        for digits, mac in wanted.items():
            if digits.startswith(prefix) and len(prefix) > len(found.get(mac, ("",))[0]):
                found[mac] = (prefix, clean_text(match.group(2), 64))
    return {mac: vendor for mac, (_, vendor) in found.items()}


def read_oui_vendors(macs):
    """{mac: vendor} from the first OUI list installed on the system (empty when none)."""
    for path in OUI_FILES:
        if macs and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                return oui_vendors(macs, f)
    return {}


def address_hostname(address):
    """A host name made from an address: ip-10-0-0-7, ip-fd00--1."""
    return "ip-" + str(address).replace(".", "-").replace(":", "-")


def resolve_names(addresses, timeout):
    """{address: name} by reverse DNS, in a few daemon threads, all within ``timeout``."""
    import queue
    import threading
    todo, names = queue.Queue(), {}
    for address in addresses:
        todo.put(address)

    def work():
        while True:
            try:
                address = todo.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(OSError, UnicodeError):
                name = socket.gethostbyaddr(str(address))[0].rstrip(".")
                if HOSTNAME_RE.match(name):
                    names[address] = name
    threads = [threading.Thread(target=work, daemon=True)
               for _ in range(min(RDNS_WORKERS, len(addresses)))]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return dict(names)


# -- mDNS ------------------------------------------------------------------------

def mdns_host_name(server):
    """The host name of an SRV target, cleaned (testnas.local from testnas.local.); None
    if bad. The .local stays: it is how merge knows an mDNS name (a name the machine
    claims itself, so it outranks a MAC or an address) and the name that resolves."""
    text = clean_text(server or "", 253).rstrip(".")
    label = text[:-len(".local")] if text.lower().endswith(".local") else text
    text = label + ".local" if label != text else text
    return text if label and len(label) <= MDNS_NAME and HOSTNAME_RE.match(text) else None


def mdns_txt(properties, keys):
    """The first of ``keys`` that the TXT ``properties`` hold a value for, cleaned."""
    for key in keys:
        value = properties.get(key)
        if isinstance(value, bytes) and clean_text(value, 64):
            return clean_text(value, 64)
    return None


def mdns_entry(service_type, server, addresses, port, properties):
    """What one resolved mDNS service says of its machine: name, ip, service, model, vendor."""
    match = MDNS_TYPE_RE.match(service_type)
    ips = []
    for text in list(addresses)[:MDNS_MAX_ADDRESSES]:
        with contextlib.suppress(ValueError):
            ips.append(str(ipaddress.ip_address(str(text).split("%")[0])))
    if not match or not ips:
        return None
    service = f"{port}/{match.group(1).lower()}" if isinstance(port, int) and port > 0 else None
    return {"name": mdns_host_name(server), "ip": list(dict.fromkeys(ips)), "service": service,
            "model": mdns_txt(properties or {}, MDNS_MODEL_KEYS),
            "vendor": mdns_txt(properties or {}, MDNS_VENDOR_KEYS)}


class MdnsListener:
    """Collects the (type, name) of services zeroconf's browsers see, within the caps;
    the enumeration's answers are service types to browse too."""

    def __init__(self, zeroconf):
        import threading
        self.zeroconf, self.lock = zeroconf, threading.Lock()
        self.services, self.types, self.new_types = {}, set(MDNS_TYPES), []
        self.changed = threading.Event()

    def on_change(self, zeroconf, service_type, name, state_change):
        """A browser's handler: note a service added or updated, or a new service type."""
        if state_change is self.zeroconf.ServiceStateChange.Removed:
            return
        with self.lock:
            if service_type != MDNS_ENUMERATE:
                if len(self.services) < MDNS_MAX_SERVICES:
                    self.services[(service_type, name)] = True
            elif MDNS_TYPE_RE.match(name) and name not in self.types:
                if len(self.types) < MDNS_MAX_TYPES:
                    self.types.add(name)
                    self.new_types.append(name)
                    self.changed.set()

    def take_new_types(self):
        """The service types enumerated since the last call."""
        with self.lock:
            self.changed.clear()
            types, self.new_types = self.new_types, []
            return types


def browse_mdns(zeroconf, seconds):
    """mdns_entry of every service heard within ``seconds`` (zeroconf is the module)."""
    listener = MdnsListener(zeroconf)
    zc = zeroconf.Zeroconf()
    try:
        browsers = [zeroconf.ServiceBrowser(zc, list(MDNS_TYPES) + [MDNS_ENUMERATE],
                                            handlers=[listener.on_change])]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            listener.changed.wait(max(0.0, deadline - time.monotonic()))
            types = listener.take_new_types()
            if types:
                browsers.append(zeroconf.ServiceBrowser(zc, types, handlers=[listener.on_change]))
        for browser in browsers:
            browser.cancel()
        with listener.lock:
            services = list(listener.services)
        return mdns_resolve(zeroconf, zc, services, time.monotonic() + MDNS_RESOLVE)
    finally:
        zc.close()


def mdns_resolve(zeroconf, zc, services, deadline):
    """mdns_entry of each (type, name): from the cache, else asked for until ``deadline``."""
    entries = []
    for service_type, name in services:
        left = int((deadline - time.monotonic()) * 1000)
        try:
            info = zeroconf.ServiceInfo(service_type, name)
            if not info.load_from_cache(zc) and (left <= 0 or not info.request(zc, left)):
                continue
        except zeroconf.Error:      # a name zeroconf refuses: that service alone is left out
            continue
        entry = mdns_entry(service_type, info.server, info.parsed_addresses(), info.port,
                           info.properties)
        if entry:
            entries.append(entry)
    return entries


def mdns_heard(heard, zeroconf, note):
    """The entries a browse found; none, and a note, when it failed (no multicast, say)."""
    try:
        return heard.result()
    except (OSError, zeroconf.Error) as e:
        note(f"mDNS browsing failed: {clean_text(str(e)) or type(e).__name__}")
        return []


def merge_mdns(found, entries, pairs):
    """Add what mDNS said to the findings: names, addresses, services, model and vendor of
    the machines inside the targets, a new finding for each machine the probes missed."""
    inside = {str(address) for address, _ in pairs}
    primary = {host["address"] for host in found}
    for entry in entries:
        ips = [ip for ip in entry["ip"] if ip in inside]
        if not ips:
            continue
        host = next((h for h in found if any(ip in h["ip"] for ip in ips)), None)
        if host is None:
            host = {"address": ips[0], "ip": [ips[0]], "name": None, "mac": None, "services": []}
            found.append(host)
            primary.add(ips[0])
        mdns_merge_host(host, entry, [ip for ip in ips if ip not in primary or ip in host["ip"]])
    return found


def mdns_merge_service(services, service):
    """Add an mDNS PORT/name to a finding's services, sorted by port: a banner of the same
    port wins, unless the probe could only say PORT/tcp."""
    port = service.split("/")[0] + "/"
    same = [i for i, value in enumerate(services) if value.startswith(port)]
    if not same:
        services.append(service)
        services.sort(key=lambda value: int(value.split("/")[0]))
    elif services[same[0]] == port + "tcp":
        services[same[0]] = service


def mdns_merge_host(host, entry, ips):
    """Merge one mdns_entry into one finding; what the probes and the targets said wins."""
    host["ip"] += [ip for ip in ips if ip not in host["ip"]]
    host["name"] = host["name"] or entry["name"]
    if entry["service"]:
        mdns_merge_service(host["services"], entry["service"])
    for field in ("model", "vendor"):
        host[field] = host.get(field) or entry[field]


# -- SSH host keys -----------------------------------------------------------------

def ssh_ports(host):
    """The ports of a finding whose services value names ssh (its banner began SSH-, or
    port 22 said nothing that names it otherwise)."""
    return [int(value.split("/")[0]) for value in host["services"]
            if value.split(" ")[0].split("/")[1] == "ssh"]


async def fetch_hostkey(asyncssh, address, port):
    """The SHA256 fingerprint of the host key the SSH server at ``address``:``port`` shows
    in its key exchange, or None. No config file is read (a ProxyCommand there must not
    run in a scan); asyncssh raises many kinds of error on a server that is no SSH server
    or breaks off, and none of them may end a scan, so each is just no key."""
    try:
        key = await asyncssh.get_server_host_key(
            address, port, config=None, client_version=f"pharos-scan_{__version__}")
        return check_hostkey(key.get_fingerprint("sha256")) if key else None
    except Exception:
        return None


async def fetch_hostkeys(asyncssh, targets, timeout):
    """{address: [fingerprints]} of {address: [SSH ports]}: HOSTKEY_WORKERS machines at a
    time, each given ``timeout`` seconds from its turn for all its ports; a port that has
    not answered by then gives nothing."""
    gate = asyncio.Semaphore(HOSTKEY_WORKERS)

    async def one(address, ports):
        async with gate:
            tasks = [asyncio.ensure_future(fetch_hostkey(asyncssh, address, port))
                     for port in ports]
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            keys = [task.result() for task in tasks if task in done]
            return address, list(dict.fromkeys(key for key in keys if key))
    return dict(await asyncio.gather(*(one(a, p) for a, p in targets.items())))


def scan_hostkeys(found, timeout, note):
    """Give each finding with an SSH port its ``hostkey`` fingerprints (asyncssh); without
    asyncssh, ``note`` says what was skipped and which pip install adds it."""
    targets = {host["address"]: ssh_ports(host) for host in found}
    targets = {address: ports for address, ports in targets.items() if ports}
    if not targets:
        return found
    try:
        asyncssh = optional_import("asyncssh")
    except UsageError:
        note("SSH host keys skipped (pip install asyncssh adds them)")
        return found
    keys = asyncio.run(fetch_hostkeys(asyncssh, targets, timeout))
    for host in found:
        if keys.get(host["address"]):
            host["hostkey"] = keys[host["address"]]
    return found


# -- one scan, start to end --------------------------------------------------------

def scan_hosts(pairs, opened, banners, neighbours):
    """One finding per machine: its addresses, name, MAC and services."""
    by_mac = {}
    for ip, mac, _ in neighbours:
        by_mac.setdefault(mac, []).append(ip)
    macs = {ip: mac for ip, mac, _ in neighbours}
    ports = {}
    for address, port in opened:
        ports.setdefault(address, []).append(port)
    found = []
    for address, name in pairs:
        text = str(address)
        mac = macs.get(text)
        if text not in ports and not mac:
            continue
        others = [ip for ip in by_mac.get(mac, []) if ip != text]
        found.append({"address": text, "ip": [text] + others, "name": name, "mac": mac,
                      "services": [banners[(text, p)] for p in sorted(ports.get(text, []))]})
    return found


def scan_records(found):
    """Machine records, in the shape `mdb --json` prints, from scan findings."""
    records = []
    for host in found:
        record = {"type": MACHINE, "hostname": host["name"] or address_hostname(host["address"]),
                  "ip": host["ip"]}
        if host["mac"]:
            record["mac"] = [host["mac"]]
        if host.get("hostkey"):
            record["hostkey"] = host["hostkey"]
        for field in ("vendor", "model"):
            if host.get(field):
                record[field] = host[field]
        if host["services"]:
            record["services"] = host["services"]
        if host["mac"] and is_random_mac(host["mac"]):
            record["tags"] = ["random-mac"]
        records.append(record)
    return records


def run_scan(pairs, ports, concurrency, timeout, advance=None, arp=True, rdns=True,
             mdns=None, note=lambda text: None):
    """Probe (browsing mDNS meanwhile when ``mdns`` is (the zeroconf module, seconds)), read
    banners and SSH host keys, then the neighbour table, vendors and names: the findings;
    ``note`` is told when browsing fails or host keys are skipped."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=1) as pool:
        heard = pool.submit(browse_mdns, *mdns) if mdns else None
        opened = ProbeEngine(concurrency, timeout, advance).run(
            probe_list([address for address, _ in pairs], ports))
        banners = read_banners(opened, timeout) if opened else {}
        found = scan_hosts(pairs, opened, banners, read_neighbours() if arp else [])
        scan_hostkeys(found, timeout, note)
        merge_mdns(found, mdns_heard(heard, mdns[0], note) if heard else [], pairs)
    vendors = read_oui_vendors({host["mac"] for host in found if host["mac"]})
    unnamed = [host["address"] for host in found if not host["name"]]
    names = resolve_names(unnamed, timeout) if rdns and unnamed else {}
    for host in found:
        host["vendor"] = vendors.get(host["mac"]) or host.get("vendor")
        host["name"] = host["name"] or names.get(host["address"])
    return found


# SECTION: Ph server — PhSession (one ph_<verb> per command), the connection, the listener, its caps

MAX_SEARCHES = 8                # searches over one turn of the loop in progress on one server
MAX_SEARCHES_PER_PREFIX = 2     # ... and from one /24 (IPv4) or /64 (IPv6) network
MAX_DUMPS_PER_PREFIX = 4        # dumps open from one network (the server holds max_dumps)
DUMP_IDLE_EVICT = 30.0          # seconds unused after which a dump may give way to a new one
BUSY_CODE = 400                 # qi's "try again later": too many connections, searches, dumps


class ServerConfig:
    """Settings of one server, from the command line; plain attributes."""

    def __init__(self, **settings):
        self.tier = "lab"
        self.max_results = DEFAULT_MAX_RESULTS
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT
        self.max_connections = DEFAULT_MAX_CONNECTIONS
        self.max_dumps = DEFAULT_MAX_DUMPS
        self.login_delay = LOGIN_FAIL_DELAY
        self.crlf = False
        self.admin = "root@localhost"
        self.listen = ("127.0.0.1", PH_PORT)
        self.http = None                        # (host, port) of the HTTP listener, or None
        self.mcp = True                         # serve /mcp on the HTTP listener
        self.mcp_origins = ()                   # Origins /mcp accepts beside its own
        self.metrics_port = None        # the HTTP listener's port, which siteinfo advertises
        self.__dict__.update(settings)


SESSION_OPTIONS = {"echo": "off", "limit": str(DEFAULT_CHANGE_LIMIT), "verbose": "off",
                   "addonly": "off", "nolog": "off", "charset": "utf-8"}
LOGIN_VERBS = frozenset(("answer", "clear", "email"))
CLIENT_TYPES = {"ph": PERSON, "mdb": MACHINE}
AUDITED_VERBS = WRITE_VERBS | {"keys"}

HELP_TOPICS = {
    "query": "query [field=]value ... [return field ... | return all]\n"
             "ph is a synonym. Terms are ANDed; matching ignores case and is word by word;\n"
             "a quoted value may hold spaces; wildcards * ? [a-z]. Bare words search\n"
             "name and nickname (people) and hostname (machines).\n"
             f"A search long enough to take turns is refused with {BUSY_CODE} (try again later)\n"
             f"while {MAX_SEARCHES} are under way, or {MAX_SEARCHES_PER_PREFIX} from your network "
             "(a /24 or /64).",
    "add": "add field=value ...\nAdds a person (alias=...) or a machine (hostname=...).\n"
           "Repeat a multi-valued field (ip, mac, services, tags, ssh_key) for more values.",
    "change": "change selection ... make field=value ...\n"
              "field=\"\" removes a field. At most `limit` entries change (set limit=N).",
    "delete": "delete selection ...\nAt most `limit` entries go (set limit=N).",
    "merge": "merge source=scan|pulse [dry_run] field=value ...\n"
             "Extension: a discovery write of one machine. It is found by its SSH host key\n"
             "(hostkey), then an mDNS name (a hostname ending in .local), then a stable MAC,\n"
             "IP, then any other hostname (randomized MACs never match), else added.\n"
             "Blank fields are filled and fields the source set are updated; fields a\n"
             "person set stay.\n"
             "Answers 1 entry added., N fields changed. or No change.; with dry_run\n"
             "nothing is written and the answer says what would be. Needs a writer login.\n"
             "`return all sources` shows who set each field last (unlisted: manual).",
    "fields": "fields [name ...]\nDescribes every field, or the named ones.",
    "set": "set [option[=value] ...]\nOptions: echo, limit, verbose, addonly, nolog, charset.",
    "login": "login <alias> answers 301:<challenge>. Sign the challenge's bytes with your SSH\n"
             "key: printf %s CHALLENGE | ssh-keygen -Y sign -n pharos -f ~/.ssh/id_ed25519\n"
             "and send the base64 between the armor lines, joined, as: answer <base64>.\n"
             "logout ends the session.",
    "dump": "dump selection [return field ... | return all]\n"
            "Like query, but pages of at most max-results entries numbered through the\n"
            "whole answer (the 102 line gives its size); a bare dump sends the next page.\n"
            f"A network may hold {MAX_DUMPS_PER_PREFIX} dumps open; when the server is full, "
            f"one unused for\n{DUMP_IDLE_EVICT:.0f} s expires ({BUSY_CODE}:Dump expired ...).",
    "keys": "keys [list] | keys add <allowed_signers line> | keys remove <fingerprint|user>\n"
            "Manage the authorized SSH keys (admin keys only). A line looks like:\n"
            "alice role=\"writer\",tenant=\"teama\" ssh-ed25519 AAAA... comment",
    "id": "id <client name>\nSays who the client is; ph and mdb narrow queries to their type.",
    "status": "status\nSays whether the database is ready.",
    "siteinfo": "siteinfo\nDescribes this site.",
    "quit": "quit (or exit, stop)\nEnds the connection.",
}


def merge_answer(what, dry_run):
    """The final line's text of a merge: what it did, or with ``dry_run`` would do."""
    if what is None:
        return "1 entry would be added." if dry_run else "1 entry added."
    if not what:
        return "No change."
    count = plural(len(what), "field", "fields")
    return f"{count} would change: {' '.join(what)}." if dry_run else f"{count} changed."


class PhAuthVerbs:
    """The login and key-management verbs of a PhSession (a mixin: PhSession holds the state)."""

    # -- login ---------------------------------------------------------------

    def ph_login(self, args):
        """login <alias>: 301:<challenge> to sign; logs out whoever was logged in."""
        words = self.raw_args.split()
        if not words:
            return line(599, "login:no name given.")
        if len(words) > 1:
            return line(599, "login:extra arguments.")
        challenge = "".join(secrets.choice(CHALLENGE_ALPHABET) for _ in range(42))
        self.set_identity(None)
        self.pending_login = (words[0][:64], challenge, time.monotonic())
        return line(301, challenge)

    def set_identity(self, user):
        """Become ``user`` (None: nobody). Every change of identity goes through here and
        drops what the connection held for the identity before: a login under way and a
        dump cursor, whose records were chosen with the old identity's tenant."""
        self.user = user
        self.pending_login = None
        self.cursor = None

    def login_problem(self, verb, args):
        """The 599 reply when no login is pending or no argument is given, else None."""
        if not self.pending_login:
            return line(599, f"{verb}:there is no outstanding login.")
        if not args:
            return line(599, f"{verb}:no argument given.")
        return None

    def ph_answer(self, args):
        """answer <base64 SSHSIG>: 200:<alias>:Hi how are you? or, after a delay, 500."""
        problem = self.login_problem("answer", args)
        if problem:
            return problem
        alias, challenge, issued = self.pending_login
        self.pending_login = None
        now = time.monotonic()
        if now - issued > LOGIN_TTL:
            verified, reason = None, "the challenge expired"
        else:
            verified, reason = self.server.verify_login(alias, challenge, self.raw_args, self.peer)
        address = self.peer[0] if self.peer else None
        if verified is None:
            self.server.metrics.logins["failed"] += 1
            self.server.log(f"login as {printable(alias)} from {address} refused: {reason}")
            return self.refuse_later(self.server.guard.failed(address, now))
        self.server.metrics.logins["ok"] += 1
        self.set_identity(verified)
        return line(200, f"{alias}:Hi how are you?")

    def refuse_later(self, delay):
        """A Later of 500:Login failed. settled after ``delay`` seconds; its timer is
        cancelled if the connection goes first (see close)."""
        refused = Later()

        def answer():
            self.timer = None
            refused.settle(line(500, "Login failed."))
        self.timer = asyncio.get_running_loop().call_later(delay, answer)
        return refused

    def ph_clear(self, args):
        """clear <password>: refused with 599 (only signature logins are allowed)."""
        return self.refuse_method("clear", args)

    def ph_email(self, args):
        """email <address>: refused with 599 (only signature logins are allowed)."""
        return self.refuse_method("email", args)

    def refuse_method(self, verb, args):
        """qi's password and email logins: parsed, then refused (only signatures are allowed)."""
        problem = self.login_problem(verb, args)
        if problem:
            return problem
        self.pending_login = None
        return line(599, f"{verb}:Not allowed for challenge type(s) {AUTH_SSHSIG:#x}.")

    def ph_xlogin(self, args):
        """xlogin <method> ...: 529, the authentication method is unavailable."""
        method = args[0].text() if args else "0"
        return line(529, f"xlogin:Authentication method {printable(method, 8)} unavailable.")

    def ph_klogin(self, args):
        """klogin: 529, authentication method 8 (Kerberos) is unavailable."""
        return line(529, "klogin:Authentication method 8 unavailable.")

    def ph_logout(self, args):
        """logout: 200:Ok. (500 when not logged in, 599 with an argument)."""
        if args:
            return line(599, "argument given on logout command.")
        if self.user is None:
            return line(500, "Not logged in.")
        self.set_identity(None)
        return line(200, "Ok.")

    # -- key management (extension) -----------------------------------------

    def ph_keys(self, args):
        """keys [list | add <line> | remove <fingerprint|user>]: manage the key list."""
        words = self.raw_args.split(None, 1)
        action = words[0].lower() if words else "list"
        rest = words[1].strip() if len(words) > 1 else ""
        if self.server.keys is None:
            return line(517, "This server keeps no key list (dev tier with memory storage).")
        if action == "list" and not rest:
            return self.keys_list()
        if action == "add" and rest:
            return self.keys_add(rest)
        if action == "remove" and rest:
            return self.keys_remove(rest)
        return line(599, "keys:say keys list, keys add <line> or keys remove <fingerprint|user>.")

    def visible_keys(self, ring):
        """The entries of ``ring`` this session may manage: all, or its own tenant's."""
        tenant = self.tenant
        return [e for e in ring.entries if tenant is None or e.tenant == tenant]

    def keys_list(self):
        """keys list: 102, -200 lines per visible key, 200:Ok. (501 when there are none)."""
        entries = self.visible_keys(self.server.keys.current())
        if not entries:
            return line(501, "No keys.")
        out = [count_line(len(entries))]
        for n, entry in enumerate(entries, 1):
            fields = [("user", entry.principals), ("role", entry.role), ("tenant", entry.tenant),
                      ("key", f"{entry.key.keytype} {entry.key.fingerprint}"),
                      ("comment", entry.comment)]
            out.extend(f"-200:{n}:{name:>9}: {value}\n" for name, value in fields if value)
        return "".join(out) + line(200, "Ok.")

    def keys_add(self, text):
        """keys add <line>: append an allowed_signers line to the key list; 200:Ok."""
        try:
            entry = parse_key_line(text)
        except SSHFormatError as e:
            return line(512, f"Illegal key line: {e}.")
        if entry is None:
            return line(599, "keys:add needs an allowed_signers line.")
        try:
            if self.tenant and "tenant" not in entry.options:
                entry = key_line_with_tenant(entry, self.tenant)
        except SSHFormatError as e:
            return line(512, f"Illegal key line: {e}.")
        refusal = grant_refusal(self.user.role, self.tenant, entry)
        if refusal:
            return line(510, refusal)
        return self.edit_keys(lambda ring: self.add_to(ring, entry))

    def add_to(self, ring, entry):
        """(new lines, reply) for adding ``entry`` to ``ring``, read under the lock: the
        checks that depend on the other lines are made on this reading."""
        refusal = principal_refusal(self.tenant, entry, ring.entries)
        if refusal:
            return None, line(510, refusal)
        for other in self.visible_keys(ring):
            if other.key.blob == entry.key.blob and other.principals == entry.principals:
                return None, line(509, f"That key is already listed for {entry.principals}.")
        return ring.lines + [entry.text], line(200, "Ok.")

    def keys_remove(self, which):
        """keys remove <fingerprint|user>: drop the matching keys, never the last admin."""
        return self.edit_keys(lambda ring: self.remove_from(ring, which))

    def remove_from(self, ring, which):
        """(new lines, reply) for removing the visible keys ``which`` names from ``ring``."""
        mine = {e.lineno for e in self.visible_keys(ring)
                if which in (e.key.fingerprint, e.principals)}
        if not mine:
            return None, line(501, "No matching keys.")
        if not any(e.role == "admin" for e in ring.entries if e.lineno not in mine):
            return None, line(510, "That would remove the last admin key.")
        kept = [text for n, text in enumerate(ring.lines, 1) if n not in mine]
        return kept, line(200, f"{plural(len(mine), 'key', 'keys')} removed.")

    def edit_keys(self, change):
        """Run ``change`` on the key list under its lock (KeyFile.edit); the reply."""
        try:
            return self.server.keys.edit(change)
        except (OSError, UnicodeDecodeError) as e:
            self.server.log(f"cannot edit {self.server.keys.path}: {e}")
            return line(475, "The key list cannot be edited now; try later.")


class DumpCursor:
    """A dump in progress: the ids of its answer in order (4 bytes each), the next to send,
    the return fields, the network it serves and when it last sent a page. The server
    counts the cursors alive (a weak set of them) and may expire one long unused."""

    __slots__ = ("ids", "next", "returned", "prefix", "used", "expired", "__weakref__")

    def __init__(self, returned, prefix, now):
        self.ids, self.next, self.returned = array.array("I"), 0, returned
        self.prefix, self.used, self.expired = prefix, now, False

    def fill(self, ids):
        """Take the answer's ids; the cursor itself."""
        self.ids = array.array("I", ids)
        return self


class PhWriteVerbs:
    """The write verbs of PhSession (add, change, delete, merge): each parses its pairs,
    has the service plan and commit them, and words the outcome as Ph replies."""

    def parse_pairs(self, tokens, start=1, *, for_change=False):
        """{field: [values]} from field=value tokens, and error lines for the rest."""
        values, errors = {}, []
        for n, token in enumerate(tokens, start):
            if token.field is None or (not token.value and not token.quoted and for_change):
                what = f"Argument {n} (begins {printable(token.text(), 16)})"
                errors.append(more(599, f"{what}: must be field=value pair." if for_change
                                   else f"{n}:argument is not field=value pair."))
                continue
            field = self.schema.field(token.field)
            if field is None:
                errors.append(more(507, f"{printable(token.field)}:unknown field."))
            elif field.server or (for_change and field.name == "type"):
                errors.append(more(505, f"{field.name}:you may not change this field."))
            else:
                values.setdefault(field.name, []).append(token.value)
        return values, errors

    def refused(self, error, failure):
        """The Ph reply for a ServiceError or RecordError: its detail lines, then the final
        line (a RecordError's own code, before ``failure`` as qi words it)."""
        if isinstance(error, RecordError):
            return more(error.code, str(error)) + line(599, failure)
        return "".join(more(c, t) for c, t in error.details) + line(error.code, error.text)

    def commit(self, ops, success):
        """Commit ``ops`` with the audit line of ``success``: a Later of the reply to send."""
        def reply(error):
            if error is not None:
                return line(error.code, error.text)
            self.audited = self.service.auditlog is not None
            return success
        return self.service.commit(self.caller(), ops, success, self.now).map(reply)

    def ph_add(self, args):
        """add field=value ...: 200:Ok. once the new record is durable (599 if refused)."""
        failure = "Add command not understood."
        try:
            self.service.check_writable()
        except ServiceError as e:
            return self.refused(e, failure)
        if not args:
            return line(599, failure)
        fields, errors = self.parse_pairs(args)
        if errors:
            return "".join(errors) + line(599, failure)
        try:
            ops = self.service.plan_add(self.caller(), fields, self.now, self.type_hint)
        except (RecordError, ServiceError) as e:
            return self.refused(e, failure)
        return self.commit(ops, line(200, "Ok."))

    def limited_selection(self, tokens, failure):
        """(ids, None) for a change/delete selection, or (None, reply) when refused."""
        selection, errors = parse_selection(self.schema, tokens, self.type_hint)
        if not errors and not selection.has_key():
            errors.append(more(515, "no non-null key field in query."))
        if errors:
            return None, "".join(errors) + line(599, failure)
        try:
            return self.service.select_for_write(self.caller(), selection,
                                                 int(self.options["limit"])), None
        except ServiceError as e:
            return None, self.refused(e, failure)

    def ph_change(self, args):
        """change selection make field=value ...: 200:N entries changed. (500 if some fail)."""
        failure = "Did not understand change command."
        try:
            self.service.check_writable()
        except ServiceError as e:
            return self.refused(e, failure)
        cut = next((i for i, t in enumerate(args) if t.sep), None)
        if cut is None or cut == len(args) - 1:
            return line(599, failure)
        make, errors = self.parse_pairs(args[cut + 1:], cut + 2, for_change=True)
        if errors:
            return "".join(errors) + line(599, failure)
        ids, reply = self.limited_selection(args[:cut], failure)
        if reply:
            return reply
        if not ids:
            return line(501, "No matches to specification.")
        found = len(ids)
        ops, refusals = self.service.plan_change(ids, make, self.now,
                                                 addonly=self.options["addonly"] == "on")
        errors = "".join(more(code, text) for code, text in refusals)
        ok = found - len(refusals)
        if not errors:
            return self.commit(ops, line(200, f"{plural(ok, 'entry', 'entries')} changed."))
        if ok == 0:
            return errors + line(500, f"{plural(found, 'entry', 'entries')} found, none changed.")
        return self.commit(ops, errors + line(
            500, f"Only {plural(ok, 'entry', 'entries')} changed ({found} found)."))

    def ph_delete(self, args):
        """delete selection: 200:N entries deleted. (501 no match, 518 over the limit)."""
        failure = "Delete command not understood."
        try:
            self.service.check_writable()
        except ServiceError as e:
            return self.refused(e, failure)
        if not args or any(t.sep for t in args):
            return line(599, failure)
        ids, reply = self.limited_selection(args, failure)
        if reply:
            return reply
        if not ids:
            return line(501, "No entries matched specifications.")
        ops = self.service.plan_delete(ids)
        return self.commit(ops, line(200, f"{len(ids)} entries deleted."))

    def ph_merge(self, args):
        """Extension: merge source=scan|pulse [dry_run] field=value ...: one machine found
        by its strongest identity (MATCH_ORDER; else added) changed by the provenance rule
        (merge_plan)."""
        failure = "Merge command not understood."
        try:
            self.service.check_writable()
        except ServiceError as e:
            return self.refused(e, failure)
        source, dry_run, rest, errors = None, False, [], []
        for token in args:
            if token.field is not None and token.field.lower() == "source":
                source = token.value.lower()
            elif token.field is None and token.value.lower() == "dry_run":
                dry_run = True
            else:
                rest.append(token)
        if source not in DISCOVERY_SOURCES:
            errors.append(more(599, "merge needs source=scan or source=pulse."))
        fields, bad = self.parse_pairs(rest)
        if {v.strip().lower() for v in fields.pop("type", ())} - {MACHINE} and not bad:
            bad.append(more(512, "merge writes machines only (type=machine)"))
        if errors or bad or not fields:
            return "".join(errors + bad) + line(599, failure)
        try:
            ops, what = self.service.plan_merge(self.caller(), fields, source, self.now)
        except (RecordError, ServiceError) as e:
            return self.refused(e, failure)
        if dry_run or not ops:
            return line(200, merge_answer(what, dry_run))
        return self.commit(ops, line(200, merge_answer(what, False)))


class PhSession(PhAuthVerbs, PhWriteVerbs):
    """The state of one Ph connection and one handler (ph_<verb>) per command."""

    def __init__(self, server, peer):
        self.server = server
        self.service = server.service
        self.store = server.store
        self.schema = server.store.schema
        self.config = server.config
        self.peer = peer
        self.prefix = login_prefix(peer[0] if peer else None)   # what the caps count by
        self.client_id = None
        self.type_hint = None
        self.options = dict(SESSION_OPTIONS)
        self.pending_login = None               # (alias, challenge, monotonic time)
        self.user = None
        self.raw_args = self.request = ""
        self.now = 0.0                          # the wall clock when the request came in
        self.held_caller = None                 # caller() of the current request
        self.audited = False
        self.verbs = {
            "query": self.ph_query, "ph": self.ph_query, "fields": self.ph_fields,
            "status": self.ph_status, "siteinfo": self.ph_siteinfo, "id": self.ph_id,
            "set": self.ph_set, "help": self.ph_help, "add": self.ph_add,
            "change": self.ph_change, "delete": self.ph_delete, "login": self.ph_login,
            "answer": self.ph_answer, "clear": self.ph_clear, "email": self.ph_email,
            "logout": self.ph_logout, "xlogin": self.ph_xlogin, "klogin": self.ph_klogin,
            "quit": self.ph_quit, "exit": self.ph_quit, "stop": self.ph_quit,
            "keys": self.ph_keys, "dump": self.ph_dump, "merge": self.ph_merge,
        }
        self.cursor = None                      # the one dump in progress: a DumpCursor
        self.search = None                      # a search running over turns of the loop
        self.timer = None                       # the timer of a refused login's answer

    def begin(self, text, now=None):
        """Start one request that came in at ``now``: (reply, close, verb) when the reply is
        ready at once (every read is), else a Later of it (a write waits for its fsync, a
        refused login for its delay)."""
        self.now = time.time() if now is None else now
        tokens = tokenize(text)
        if not tokens or tokens[0].field is not None or tokens[0].quoted:
            return line(598, f"{printable(text.split()[0] if text.split() else text)}:"
                             f"Command not recognized."), False, "unknown"
        verb = tokens[0].value
        handler = self.verbs.get(verb)
        if handler is None:
            return line(598, f"{printable(verb)}:Command not recognized."), False, "unknown"
        prefix = ""
        if self.options["echo"] == "on":
            prefix = more(101, f" {printable(text, 900)}")
        if self.pending_login and verb not in LOGIN_VERBS:
            self.pending_login = None
            prefix += more(523, "Expecting answer, clear, or email; login discarded.")
        self.raw_args, self.request, self.audited = text[len(verb):].strip(), text, False
        if self.user is not None:
            self.recheck_identity()
        refusal = self.service.decide(verb, self.caller())
        if refusal:
            reply = line(refusal.code, refusal.text)
            if verb in AUDITED_VERBS:
                self.service.audit_refusal(self.caller(), reply, self.now)
            return prefix + reply, False, verb
        reply = handler(tokens[1:])
        if type(reply) is not str:
            return reply.map(lambda reply: self.done(prefix, reply, verb, text))
        return self.done(prefix, reply, verb, text)

    def done(self, prefix, reply, verb, text):
        """(reply, close, verb) of a finished request; a write not yet audited is, now."""
        if verb in AUDITED_VERBS and not self.audited:
            self.service.audit_refusal(self.caller(), reply, self.now)
        return prefix + reply, verb in ("quit", "exit", "stop"), verb

    async def execute(self, text):
        """The reply to one request line, and whether to close the connection after it."""
        outcome = self.begin(text)
        return outcome if type(outcome) is tuple else await outcome

    @property
    def tenant(self):
        """The tenant this session sees and writes (None: every record)."""
        return session_tenant(self.config.tier, self.user)

    def recheck_identity(self):
        """Follow the key list: a removed key logs the session out, a changed role or tenant
        takes effect at the next request."""
        keys = self.server.keys
        if keys is None:
            return
        fresh = keys.current().recheck(self.user, self.peer[0] if self.peer else None, self.now)
        if fresh is not self.user:
            self.set_identity(fresh)

    def caller(self):
        """This session's user, peer and current request, as the service takes them (made
        once per request and identity)."""
        held = self.held_caller
        if held is None or held.user is not self.user or held.request is not self.request:
            held = self.held_caller = Caller(self.user, self.peer[0] if self.peer else None,
                                             self.request)
        return held

    # -- reads ---------------------------------------------------------------

    def ph_status(self, args):
        """status: 200:Database ready. (201 when read-only)."""
        if self.store.readonly:
            return line(201, f"Database ready, read only ({self.store.readonly}).")
        return line(200, "Database ready.")

    def ph_siteinfo(self, args):
        """siteinfo: -200 lines of site facts (admin, tier, login, HTTP port), then 200:Ok."""
        items = [("maildomain", ""), ("mailfield", "email"), ("administrator", self.config.admin),
                 ("passwords", self.config.admin), ("mailbox", "email"), ("charset", "UTF-8"),
                 ("server", f"pharos {__version__}"), ("tier", self.config.tier),
                 ("login", f"sshsig namespace {SSHSIG_NAMESPACE}"),
                 ("authenticate", str(AUTH_SSHSIG))]
        if self.config.metrics_port is not None:
            items.append(("metrics", str(self.config.metrics_port)))
        out = [more(200, f"{n}:{key}:{value}") for n, (key, value) in enumerate(items, 1)]
        return "".join(out) + line(200, "Ok.")

    def ph_id(self, args):
        """id <client>: note the client (ph and mdb narrow queries); 200:Thanks."""
        if args:
            self.client_id = args[0].text()[:64]
            self.type_hint = CLIENT_TYPES.get(self.client_id.lower())
        return line(200, "Thanks.")

    def ph_fields(self, args):
        """fields [name ...]: -200 lines per field, then 200:Ok. (599 for unknown names)."""
        if not args:
            return "".join(format_fields(self.schema.fields)) + line(200, "Ok.")
        wanted, errors = [], []
        for n, token in enumerate(args, 1):
            field = self.schema.field(token.value) if token.field is None else None
            if token.field is not None:
                errors.append(more(599, f"argument {n}:is not a field name."))
            elif field is None:
                errors.append(more(507, f"{printable(token.value)}:unknown field."))
            elif field not in wanted:
                wanted.append(field)
        if errors:
            return "".join(errors) + line(599, "Invalid field request.")
        return "".join(format_fields(wanted)) + line(200, "Ok.")

    def ph_help(self, args):
        """help [topic ...]: -200 lines of help (or the topic list), 200:Ok. (500 if none)."""
        words = [t.text() for t in args]
        if words and words[0] in ("native", "client", "ph"):
            words = words[1:]
        if not words:
            out = [more(200, "1: The following topics have help (help <topic>):"),
                   more(200, "1: " + "  ".join(sorted(HELP_TOPICS)))]
            return "".join(out) + line(200, "Ok.")
        out = []
        for n, topic in enumerate(words, 1):
            if "/" in topic:
                out.append(more(524, f"{n}:{printable(topic)}: Valid help topics don't contain /'s."))
            elif topic.lower() in HELP_TOPICS:
                out.append(more(200, f"{n}:{topic.lower()}: "))
                out.extend(more(200, f"{n}: {text}") for text in
                           HELP_TOPICS[topic.lower()].split("\n"))
        if not any(x.startswith("-200") for x in out):
            return "".join(out) + line(500, "No help available.")
        return "".join(out) + line(200, "Ok.")

    def parse_query(self, args):
        """(selection, (fields, width, explicit), error lines) of `selection [return ...]`."""
        cut = len(args)
        for i, token in enumerate(args):
            if token.sep:
                cut = i
                break
        selection, errors = parse_selection(self.schema, args[:cut], self.type_hint)
        wanted = args[cut + 1:]
        shown = bool(wanted) and wanted[-1].field is None and wanted[-1].value.lower() == "sources"
        returned = self.return_fields(wanted[:-1] if shown else wanted, cut < len(args), errors)
        return selection, returned + (shown,), errors

    def format_entries(self, ids, total, first, returned):
        """A query reply: the 102 count of ``total``, entries numbered from ``first``, 200.

        A return clause ending in the word ``sources`` (an extension no classic client
        sends: it was an unknown field) adds a line of who set each field last."""
        fields, width, explicit, shown = returned
        get, alls = self.store.get, (self.schema.defaults if fields == "default" else self.schema.all)
        out = [count_line(total)]
        for n, rid in enumerate(ids, first):
            record = get(rid)
            if record is not None:
                chosen = alls[record["type"]] if type(fields) is str else fields
                out.extend(format_entry(n, record, chosen, width, explicit))
                if shown and record_sources(record):
                    out.extend(field_lines(n, SOURCES_KEY.rjust(width),
                                           format_sources(record_sources(record))))
        out.append("200:Ok.\n")
        return "".join(out)

    def ph_query(self, args):
        """query selection [return ...]: 102, entry lines, 200:Ok. (501 none, 502 too many)."""
        selection, returned, errors = self.parse_query(args)
        if not errors and not selection.has_key():
            errors += [more(515, "no non-null key field in query."),
                       more(515, "Initial metas may be used as qualifiers only.")]
        if errors:
            return "".join(errors) + line(500, "Did not understand query.")
        search = self.service.search(self.caller(), selection, self.config.max_results)
        if search.done:                     # a lookup: answered as the search was made
            return self.query_reply(search, returned)
        return self.searched(search, lambda: self.query_reply(search, returned))

    def query_reply(self, search, returned):
        """The reply to a query once its search is over."""
        if search.too_many:
            return line(502, "Too many entries to print.")
        ids = search.ordered()
        if not ids:
            return line(501, "No matches to your query.")
        return self.format_entries(ids, len(ids), 1, returned)

    def searched(self, search, finish):
        """``finish()`` once ``search`` is over: at once when one run does it, else a Later
        settled on a later turn, so that other connections are served between runs. Such
        searches are capped per server and per network: one over a cap is refused at once."""
        if search.run():
            return finish()
        refusal = self.server.admit_search(self.prefix)
        if refusal:
            return line(BUSY_CODE, refusal)
        self.search, later = search, Later()
        asyncio.get_running_loop().call_soon(self.resume, search, finish, later)
        return later

    def resume(self, search, finish, later):
        """One more run of a search answered later (see searched); none once abandoned."""
        if search is not self.search:
            return
        try:
            if not search.run():
                asyncio.get_running_loop().call_soon(self.resume, search, finish, later)
                return
            value = finish()
        except Exception as e:
            value = e
        self.end_search()
        later.settle(value)

    def end_search(self):
        """Stop this session's search (over or abandoned) and its count against the caps."""
        if self.search is not None:
            self.search = None
            self.server.release_search(self.prefix)

    def ph_dump(self, args):
        """Extension: a query answered in pages of max_results entries, for exports.

        `dump selection [return ...]` answers the first page; each bare `dump` the next.
        Entries are numbered through the whole answer (the 102 line gives its size),
        so the page holding entry N (the last) is the end; after it `dump` gives 501.
        A connection has one dump open (a new one replaces it), a network
        MAX_DUMPS_PER_PREFIX, the server max_dumps (see PhServer.dump_refusal).
        """
        if args:
            selection, returned, errors = self.parse_query(args)
            if errors:
                return "".join(errors) + line(500, "Did not understand query.")
            self.drop_cursor()
            refusal = self.server.dump_refusal(self.prefix, self.now)
            if refusal:
                return line(BUSY_CODE, refusal)
            cursor = self.cursor = DumpCursor(returned, self.prefix, self.now)
            self.server.dumps.add(cursor)
            search = self.service.search(self.caller(), selection)
            reply = self.searched(search, lambda: self.dump_page(cursor.fill(search.ordered())))
            if not search.done and self.search is not search:   # refused: no dump opened
                self.drop_cursor()
            return reply
        return self.dump_page(self.cursor)

    def drop_cursor(self):
        """Close this session's dump, if any, and stop the server counting it."""
        if self.cursor is not None:
            self.server.dumps.discard(self.cursor)
            self.cursor = None

    def dump_page(self, cursor):
        """The next page of ``cursor`` (501 past its end); records gone since are skipped,
        changed ones shown as they are now, none outside the session's tenant."""
        if cursor is not None and cursor.expired:
            self.cursor = None
            return line(BUSY_CODE, f"Dump expired (unused for over {DUMP_IDLE_EVICT:.0f} s "
                                   f"while the server was full); start it again.")
        if cursor is None or cursor is not self.cursor or cursor.next >= len(cursor.ids):
            self.cursor = None
            return line(501, "No matches to your query.")
        start, tenant = cursor.next, self.tenant
        page = cursor.ids[start:start + self.config.max_results]
        cursor.next, cursor.used = start + len(page), self.now
        if tenant is not None:
            get = self.store.get
            # id 0 is no record: an entry not to show is skipped, its number kept
            page = [rid if (get(rid) or {}).get("tenant", "") == tenant else 0 for rid in page]
        return self.format_entries(page, len(cursor.ids), start + 1, cursor.returned)

    def close(self):
        """The connection is gone: release its dump, stop its search, drop the answer of
        a refused login still waiting out its delay."""
        self.drop_cursor()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.end_search()

    def return_fields(self, tokens, has_return, errors):
        """(fields or 'default'/'all', label width, explicit) for a query's return clause."""
        if not tokens:
            return "default", self.schema.default_width, False
        if len(tokens) == 1 and tokens[0].field is None and tokens[0].value.lower() == "all":
            return "all", self.schema.all_width, False
        key = tuple(t.value.lower() if t.field is None else None for t in tokens)
        known = self.schema.return_lists.get(key)
        if known is not None:
            return known
        fields = []
        for n, token in enumerate(tokens, 1):
            field = self.schema.field(token.value) if token.field is None else None
            if token.field is not None:
                errors.append(more(599, f"Argument {n}: must be field name."))
            elif field is None:
                errors.append(more(507, f"{printable(token.value)}:unknown field."))
            elif field not in fields:
                fields.append(field)
        chosen = (fields, Schema.width(fields), True)
        if len(fields) == len(tokens) and len(self.schema.return_lists) < 4096:
            self.schema.return_lists[key] = chosen
        return chosen

    # -- options -------------------------------------------------------------

    def ph_set(self, args):
        """set [option[=value] ...]: list or set session options; 200:Done. (513 if none)."""
        if not args:
            out = [more(200, f"{name}:{value}") for name, value in self.options.items()]
            return "".join(out) + line(200, "Done.")
        out, recognised = [], 0
        for token in args:
            name = (token.field if token.field is not None else token.value).lower()
            value = token.value if token.field is not None else "on"
            if name not in self.options:
                out.append(more(513, f"{printable(name)}:unknown option"))
                continue
            problem = self.set_option(name, value)
            if problem:
                out.append(more(512, f"{name}:{problem}"))
                continue
            recognised += 1
            if self.options["verbose"] == "on":
                out.append(more(100, f"{name}={self.options[name]}"))
        if not recognised:
            return "".join(out) + line(513, "No option recognized.")
        return "".join(out) + line(200, "Done.")

    def set_option(self, name, value):
        """Set one session option; return a problem text if the value is refused."""
        if name == "limit":
            limit = parse_count(value, 1, MAX_CHANGE_LIMIT)
            if limit is None:
                return f"must be a number from 1 to {MAX_CHANGE_LIMIT}"
            self.options[name] = str(limit)
            return None
        value = value.strip().lower()
        if name == "charset":
            if value not in ("utf-8", "utf8", "us-ascii"):
                return "only UTF-8 is supported"
        else:
            value = {"": "off", "on": "on", "off": "off", "yes": "on", "no": "off",
                     "true": "on", "false": "off", "1": "on", "0": "off"}.get(value)
            if value is None:
                return "must be on or off"
        self.options[name] = value
        return None

    def ph_quit(self, args):
        """quit, exit or stop: 200:Bye! (the connection then closes)."""
        return line(200, "Bye!")


class PhConnectionCore:
    """One Ph connection (the class made by ph_connection_class() is the one used): runs each complete request line in turn and writes its reply.

    A reply that is ready at once (every read) is written from the read callback itself.
    One that comes later (a write, after its fsync) is written when its Later settles,
    still with no task; the requests after it wait their turn. Reading pauses once they
    pass MAX_LINE bytes, or while the client is slow to take its replies, so a client
    holds little input and one reply's worth of output.
    """

    __slots__ = ("server", "loop", "transport", "session", "inbox", "start", "parts", "size",
                 "discarding", "last", "busy", "stalled", "eof")

    def __init__(self, server, loop):
        self.server, self.loop = server, loop
        self.transport = self.session = None
        self.inbox, self.start = b"", 0         # received; not yet run from ``start`` on
        self.parts, self.size = [], 0           # a backslash-continued request so far
        self.discarding = False                 # inside a request over MAX_LINE
        self.last = loop.time()
        self.busy = False                       # a request's reply is still to come
        self.stalled = False                    # the client is not taking its replies
        self.eof = False

    def connection_made(self, transport):
        """Take the connection, or answer 400 and close when over the cap."""
        server, cap = self.server, self.server.config.max_connections
        self.transport = transport
        server.metrics.connections_total += 1
        if len(server.connections) >= cap and server.departed:
            server.evict_departed()
        if len(server.connections) >= cap or server.closing:
            server.metrics.connections_refused += 1
            transport.write(line(BUSY_CODE, f"Too many connections (limit {cap}); "
                                            f"try again later.").encode())
            transport.close()
            return
        self.session = PhSession(server, transport.get_extra_info("peername"))
        server.connections.add(self)
        server.idle.clear()

    def connection_lost(self, exc):
        """Forget the connection; the server is idle once the last one is gone."""
        connections = self.server.connections
        connections.discard(self)
        self.server.departed.pop(self, None)
        if self.session is not None:
            self.session.close()
        if not connections:
            self.server.idle.set()

    def get_buffer(self, sizehint):
        """The server's one read buffer: its bytes are copied out before the next read."""
        return self.server.read_buffer

    def buffer_updated(self, nbytes):
        """Bytes arrived: run the requests they complete (a half line is still idle)."""
        if self.session is None:
            return
        data = self.server.read_buffer[:nbytes].tobytes()
        if self.start < len(self.inbox):
            data = self.inbox[self.start:] + data
        self.inbox, self.start = data, 0
        if not self.busy and not self.stalled:
            self.run_requests()
        elif len(data) > MAX_LINE:              # enough waiting; read more once it has run
            self.transport.pause_reading()

    def eof_received(self):
        """The client is done sending: answer what is complete, then close. A search under
        way is abandoned (qi, too, stops at the end of its input); a refused login's delayed
        answer still goes to a client that waits for it, but its slot goes to the next
        client that finds the server full (see PhServer.evict_departed)."""
        self.eof = True
        if self.busy and self.session.search is not None:
            self.transport.abort()
        elif self.busy and self.session.timer is not None:
            self.server.departed[self] = None
        elif not self.busy and not self.stalled:
            self.run_requests()
        return True

    def pause_writing(self):
        """The client is not reading its replies: stop reading its requests."""
        self.stalled = True
        self.transport.pause_reading()

    def resume_writing(self):
        """The replies went out: go on with the requests waiting."""
        self.stalled = False
        if not self.busy:
            self.run_requests()

    def run_requests(self):
        """Run the complete requests received, in order, until one has to wait."""
        transport, server = self.transport, self.server
        while not transport.is_closing():
            if server.closing:
                transport.abort()
                return
            raw = self.next_request()
            if raw is None:
                break
            self.last = self.loop.time()
            if raw is TOO_LONG:
                transport.write(line(599, f"Command too long (limit {MAX_LINE} bytes).").encode())
                continue
            text = clean_request(raw)
            if not text:
                continue
            started = time.perf_counter()
            try:
                outcome = self.session.begin(text, time.time())
            except Exception as e:
                outcome = self.failed(e)
            if type(outcome) is not tuple:
                if not outcome.settled:
                    self.busy = True
                    outcome.then(lambda outcome: self.finish(outcome, started))
                    return
                outcome = outcome.value
                if type(outcome) is not tuple:
                    outcome = self.failed(outcome)
            self.respond(outcome, started)
            if self.stalled:
                return
        if self.eof:
            transport.close()
        else:
            transport.resume_reading()

    def finish(self, outcome, started):
        """A request that could not answer at once has its outcome: reply, go on reading."""
        self.busy = False
        self.respond(outcome if type(outcome) is tuple else self.failed(outcome), started)
        if not self.stalled:
            self.run_requests()

    def failed(self, error):
        """Log the traceback of a request that broke; the outcome the client sees."""
        import traceback
        self.server.log("internal error:\n" + "".join(
            traceback.format_exception(type(error), error, error.__traceback__)).rstrip())
        return line(400, "Internal error."), False, "error"

    def respond(self, outcome, started):
        """Count the request, write its reply; close after quit."""
        reply, close, verb = outcome
        self.server.metrics.observe(verb, reply[reply.rfind("\n", 0, -1) + 1] + "xx",
                                    time.perf_counter() - started)
        self.last = self.loop.time()
        self.transport.write((reply.replace("\n", "\r\n") if self.server.config.crlf
                              else reply).encode())
        if close:
            self.transport.close()

    def next_request(self):
        """The next whole request from the input (continuation lines joined), TOO_LONG for
        one over MAX_LINE (skipped to its end), or None until more input comes."""
        while True:
            inbox, start = self.inbox, self.start
            end = inbox.find(b"\n", start)
            if end < 0:
                if self.discarding or len(inbox) - start > MAX_LINE:
                    self.discarding = True
                    self.inbox = inbox[max(start, len(inbox) - 2):]   # to see a `\` at the end
                    self.start = 0
                return None
            raw, self.start = inbox[start:end + 1], end + 1
            body = raw.rstrip(b"\r\n")
            continued = body.endswith(b"\\")
            if self.discarding:
                if not continued:
                    self.discarding = False
                    return TOO_LONG
                continue
            if not continued and not self.parts:
                return TOO_LONG if len(raw) - 1 > MAX_LINE else raw
            self.size += len(raw)
            if self.size > MAX_LINE:
                self.parts, self.size, self.discarding = [], 0, continued
                if not continued:
                    return TOO_LONG
                continue
            if continued:
                self.parts.append(body[:-1])
                continue
            self.parts.append(body)
            joined = b"".join(self.parts)
            self.parts, self.size = [], 0
            return joined


TOO_LONG = object()


@functools.cache
def ph_connection_class():
    """PhConnection: PhConnectionCore on asyncio's BufferedProtocol, which the loop needs
    to hand it its read buffer; made on first use, so only serving imports asyncio."""
    return type("PhConnection", (PhConnectionCore, asyncio.BufferedProtocol), {"__slots__": ()})


class PhServer:
    """The Ph listener: connection cap, idle timeout, the request loop, graceful stop."""

    def __init__(self, store, config, log, metrics=None, keys=None, audit=None):
        self.store, self.config, self.log = store, config, log
        self.metrics = metrics or Metrics()
        self.keys, self.auditlog = keys, audit
        self.service = DirectoryService(store, config, audit, log)
        self.guard = LoginGuard(config.login_delay)
        self.connections = set()
        self.dumps = weakref.WeakSet()          # the DumpCursors alive (see max_dumps)
        self.searching = {}                     # network prefix -> its searches under way
        self.departed = {}                      # connections at EOF awaiting a login refusal
        self.listener = None
        self.sweeper = None
        self.closing = False
        self.idle = asyncio.Event()
        self.read_buffer = memoryview(bytearray(READ_BUFFER))

    def evict_departed(self):
        """Free the slot of the oldest connection whose client ended its side while a
        refused login waits out its delay: the client has likely gone."""
        conn = next(iter(self.departed))
        del self.departed[conn]
        self.connections.discard(conn)
        conn.session.close()
        conn.transport.abort()

    def admit_search(self, prefix):
        """Count a search from ``prefix`` that needs more turns: None, or the refusal text
        when the server or that network has its most under way already."""
        if sum(self.searching.values()) >= MAX_SEARCHES:
            return f"Too many searches under way (limit {MAX_SEARCHES}); try again later."
        if self.searching.get(prefix, 0) >= MAX_SEARCHES_PER_PREFIX:
            return (f"Too many searches under way from your network "
                    f"(limit {MAX_SEARCHES_PER_PREFIX}); try again later.")
        self.searching[prefix] = self.searching.get(prefix, 0) + 1
        return None

    def release_search(self, prefix):
        """A search admitted by admit_search is over or abandoned."""
        left = self.searching.pop(prefix) - 1
        if left:
            self.searching[prefix] = left

    def dump_refusal(self, prefix, now):
        """None when a dump from ``prefix`` may open at ``now``, else the refusal text. A
        full server expires its least recently used dump if unused for DUMP_IDLE_EVICT, so
        idle dumps never keep an active export out."""
        dumps, cap = self.dumps, self.config.max_dumps
        if sum(1 for c in dumps if c.prefix == prefix) >= MAX_DUMPS_PER_PREFIX:
            return (f"Too many dumps open from your network (limit {MAX_DUMPS_PER_PREFIX}); "
                    f"try again later.")
        if len(dumps) >= cap:
            oldest = min(dumps, key=lambda c: c.used)
            if now - oldest.used <= DUMP_IDLE_EVICT:
                return f"Too many dumps open (limit {cap}); try again later."
            oldest.expired = True
            dumps.discard(oldest)
        return None

    def verify_login(self, alias, challenge, answer, peer):
        """(Identity, None) for a correct signed answer to ``challenge``, else (None, reason)."""
        if self.keys is None:
            return None, "this server keeps no key list"
        ring = self.keys.current()
        return ring.verify(alias, challenge.encode(), answer, peer[0] if peer else None,
                           time.time())

    async def start(self, host, port):
        """Listen on ``host``:``port``, start the idle sweeper; the (host, port) bound."""
        loop, connection = asyncio.get_running_loop(), ph_connection_class()
        self.listener = await loop.create_server(lambda: connection(self, loop), host, port,
                                                 backlog=1024, reuse_address=True)
        self.sweeper = asyncio.ensure_future(self.sweep())
        return self.listener.sockets[0].getsockname()[:2]

    async def sweep(self):
        """Close connections idle longer than the timeout (a half line counts as idle)."""
        timeout = self.config.idle_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, max(0.05, timeout / 4)))
            now = loop.time()
            for conn in [c for c in self.connections if not c.busy and now - c.last > timeout]:
                conn.transport.abort()

    async def shutdown(self, grace=10.0):
        """Stop accepting, let commands in flight finish, close every connection."""
        self.closing = True
        self.listener.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.transport.abort()
        try:
            await asyncio.wait_for(self.idle.wait(), grace) if self.connections else None
        except asyncio.TimeoutError:
            for conn in list(self.connections):
                conn.transport.abort()
        self.sweeper.cancel()


# SECTION: HTTP — the one HTTP app: request reader with limits, route table, loop bridge, metrics

HTTP_DEADLINE = 5.0             # seconds from accept to send a request; again to read its answer
HTTP_MAX_CLIENTS = 64           # connections at once; a new one displaces the oldest idle one
HTTP_MAX_HEAD = 16 * 1024       # bytes of request line and header fields
HTTP_MAX_HEADERS = 64           # header fields in one request
HTTP_MAX_BODY = 64 * 1024       # bytes of request body
HTTP_WORKERS = 4                # threads that turn complete requests into answers
HTTP_LINGER = 2.0               # seconds to read and drop what a client sends after its answer
HTTP_HEAD_END_RE = LazyRegex(rb"\r?\n\r?\n")
HTTP_TOKEN_RE = LazyRegex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
HTTP_TARGET_RE = LazyRegex(r"/[!-~]*\Z")
HTTP_VALUE_RE = LazyRegex(r"[\t\x20-\x7e\x80-\xff]*\Z")


class HttpRequest:
    """One complete HTTP request: method, path, query, version, headers (lower-case names), body."""

    def __init__(self, method, target, version, headers, body):
        self.method, self.target, self.version = method, target, version
        self.path, _, self.query = target.partition("?")
        self.headers, self.body = headers, body


def read_http_request(buffer):
    """The HttpRequest at the front of ``buffer``; None while incomplete, HttpError if refused."""
    end = HTTP_HEAD_END_RE.search(buffer, 0, HTTP_MAX_HEAD + 4)
    if end is None:
        if len(buffer) <= HTTP_MAX_HEAD:
            return None
        if b"\n" not in buffer[:HTTP_MAX_HEAD]:
            raise HttpError(414, "request line too long")
        raise HttpError(431, "request header fields too large")
    method, target, version, headers = parse_http_head(bytes(buffer[:end.start()]))
    length = http_body_length(headers)
    if len(buffer) < end.end() + length:
        return None
    body = bytes(buffer[end.end():end.end() + length])
    return HttpRequest(method, target, version, headers, body)


def parse_http_head(head):
    """(method, target, version, headers) from a request line and its header fields."""
    lines = [raw[:-1] if raw.endswith(b"\r") else raw for raw in head.split(b"\n")]
    if len(lines) - 1 > HTTP_MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    method, target, version = parse_request_line(lines[0])
    headers = {}
    for raw in lines[1:]:
        name, colon, value = raw.decode("latin-1").partition(":")
        value = value.strip(" \t")
        if not colon or not HTTP_TOKEN_RE.match(name) or not HTTP_VALUE_RE.match(value):
            raise HttpError(400, "malformed header field")
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return method, target, version, headers


def parse_request_line(raw):
    """(method, target, version) from ``METHOD /target HTTP/1.x``; HttpError if it is not one."""
    try:
        method, target, version = raw.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "malformed request line") from None
    if not HTTP_TOKEN_RE.match(method) or not HTTP_TARGET_RE.match(target):
        raise HttpError(400, "malformed request line")
    if not re.fullmatch(r"HTTP/[0-9]\.[0-9]", version):
        raise HttpError(400, "malformed request line")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    return method, target, version


def http_body_length(headers):
    """The body's length from Content-Length (0 without one); HttpError when it cannot be read."""
    if "transfer-encoding" in headers:
        raise HttpError(501, "transfer codings are not supported; send Content-Length")
    text = headers.get("content-length", "0")
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise HttpError(400, "malformed Content-Length")
    if int(text) > HTTP_MAX_BODY:
        raise HttpError(413, f"request body over {HTTP_MAX_BODY} bytes")
    return int(text)


def format_http_response(code, content_type, body, now, headers=(), head_only=False):
    """The bytes of one response that closes its connection (headers only when ``head_only``)."""
    import email.utils
    import http
    lines = [f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}", f"Server: pharos/{__version__}",
             f"Date: {email.utils.formatdate(now, usegmt=True)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (b"" if head_only else body)


def http_refusal(error, now):
    """The response to a request the reader refused."""
    return format_http_response(error.code, "text/plain", f"{error.text}\n".encode(), now)


class HttpApp:
    """The one HTTP app: a route table of (method, path) → handler(request, now), shared by
    metrics, health and what comes later (MCP, the console, push URLs).

    A handler runs in a worker thread of the HttpListener and answers (code, content type,
    body) or (code, content type, body, headers). It reaches the directory only through
    the LoopBridge: the index belongs to the event loop's thread. A GET route answers
    HEAD too; a path with no route for the method gets 405 and its Allow list.
    """

    def __init__(self):
        self.routes = {}                        # path → {method: handler}

    def route(self, method, path, handler):
        """Answer ``method`` requests for ``path`` with ``handler``."""
        self.routes.setdefault(path, {})[method] = handler

    def __call__(self, request, now):
        """The response bytes for ``request``."""
        methods = self.routes.get(request.path)
        if methods is None:
            return format_http_response(404, "text/plain", b"not found\n", now)
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            allowed = sorted(methods) + (["HEAD"] if "GET" in methods else [])
            return format_http_response(405, "text/plain", b"method not allowed\n", now,
                                        [("Allow", ", ".join(allowed))])
        code, content_type, body, *headers = handler(request, now)
        return format_http_response(code, content_type, body, now, headers[0] if headers else (),
                                    head_only=request.method == "HEAD")


class LoopBridge:
    """How an HTTP worker thread asks the event loop for something: ``call(fn, *args)``
    runs ``fn(*args)`` on the loop (awaiting it if it is a coroutine or a Later) and gives
    back its result, or raises HttpError 503 when the loop does not answer in time."""

    def __init__(self, loop, timeout=HTTP_DEADLINE):
        self.loop, self.timeout = loop, timeout

    def call(self, fn, *args):
        """``fn(*args)`` run on the loop; its result here."""
        import concurrent.futures
        future = asyncio.run_coroutine_threadsafe(self.on_loop(fn, args), self.loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise HttpError(503, "the server did not answer in time") from None

    @staticmethod
    async def on_loop(fn, args):
        """Run ``fn`` on the loop, waiting for what it gives if that is not ready yet."""
        value = fn(*args)
        if asyncio.iscoroutine(value) or isinstance(value, Later):
            value = await value
        return value


def http_error_answer(error):
    """The answer tuple of an HttpError raised by a handler."""
    return error.code, "text/plain", f"{error.text}\n".encode()


def render_metrics(server, store, stats, now):

    """The whole /metrics page for ``server`` and ``store``."""
    metrics, out = server.metrics, []
    prom_family(out, "pharos_requests_total", "counter",
                "Ph requests handled, by command and result class.",
                [((("command", c), ("class", k)), n) for (c, k), n in sorted(metrics.requests.items())])
    prom_histograms(out, "pharos_request_duration_seconds",
                    "Time to handle one Ph request, by command.",
                    [((("command", c),), h) for c, h in sorted(metrics.latency.items())])
    prom_family(out, "pharos_connections_open", "gauge", "Ph connections open now.",
                [((), len(server.connections))])
    prom_family(out, "pharos_connections_total", "counter", "Ph connections accepted or refused.",
                [((), metrics.connections_total)])
    prom_family(out, "pharos_connections_refused_total", "counter",
                "Ph connections refused because the connection cap was reached.",
                [((), metrics.connections_refused)])
    prom_family(out, "pharos_logins_total", "counter", "Login attempts, by result.",
                [((("result", r),), n) for r, n in sorted(metrics.logins.items())])
    store.metrics(out, now)
    render_process(out, stats)
    prom_family(out, "pharos_build_info", "gauge", "Build information; the value is always 1.",
                [((("version", __version__), ("python", sys.version.split()[0])), 1)])
    return "".join(out)


def readiness(server, store):
    """None when the Ph listener accepts and the store can write, else the reason."""
    listener = server.listener
    if server.closing or listener is None or not listener.is_serving():
        return "the Ph listener is not accepting connections"
    if len(server.connections) >= server.config.max_connections:
        return "the Ph listener is at its connection cap"
    return store.unwritable()


def metrics_routes(app, bridge, server, store):
    """/metrics, /healthz and /readyz on ``app``; each asks the loop through ``bridge``, so
    a loop that is stuck shows as a probe that fails."""
    def metrics(request, now):
        text = bridge.call(render_metrics, server, store, process_stats(), now)
        return 200, PROM_CONTENT_TYPE, text.encode()

    def healthz(request, now):
        bridge.call(lambda: None)
        return 200, "application/json", b'{"status": "ok"}\n'

    def readyz(request, now):
        reason = bridge.call(readiness, server, store)
        body = json.dumps({"status": "not ready", "reason": reason} if reason
                          else {"status": "ready"}).encode() + b"\n"
        return 503 if reason else 200, "application/json", body

    for path, handler in (("/metrics", metrics), ("/healthz", healthz), ("/readyz", readyz)):
        app.route("GET", path, guarded(handler))


def guarded(handler):
    """``handler`` with an HttpError it raises turned into its answer."""
    def answer(request, now):
        try:
            return handler(request, now)
        except HttpError as e:
            return http_error_answer(e)
    return answer


class HttpConnection:
    """One client of an HttpListener: socket, deadline, state, bytes in and bytes out."""

    def __init__(self, sock, now):
        self.sock, self.deadline = sock, now + HTTP_DEADLINE
        self.state = "reading"          # reading → answering → writing → draining
        self.inbox, self.outbox = bytearray(), memoryview(b"")


class HttpListener:
    """An HTTP listener: one selector thread reads whole requests within HTTP_* limits and
    writes the answers; worker threads turn each request into its answer with ``dispatch``.

    No client can hold a worker: a worker sees only complete requests. No client can hold
    the listener: each has HTTP_DEADLINE from accept to send its request (and again to read
    the answer), and at HTTP_MAX_CLIENTS a new connection displaces the oldest one not
    being answered, so a scrape or a probe always gets in.
    """

    def __init__(self, sock, dispatch, log):
        import queue
        self.sock, self.dispatch, self.log = sock, dispatch, log
        self.server_address = sock.getsockname()
        self.selector = selectors.DefaultSelector()
        self.conns = {}                 # socket → HttpConnection, oldest first
        self.requests, self.answers = queue.SimpleQueue(), queue.SimpleQueue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.running, self.thread = True, None

    def start(self):
        """Start the reader thread and the workers; returns self."""
        import threading
        for sock in (self.sock, self.wake_r, self.wake_w):
            sock.setblocking(False)
        self.selector.register(self.sock, selectors.EVENT_READ, self.accept)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.woken)
        for n in range(HTTP_WORKERS):
            threading.Thread(target=self.work, name=f"pharos-http-{n}", daemon=True).start()
        self.thread = threading.Thread(target=self.run, name="pharos-http", daemon=True)
        self.thread.start()
        return self

    def run(self):
        """The reader loop: wait for sockets or the next deadline, then drop the expired."""
        while self.running:
            for key, _ in self.selector.select(self.next_timeout(time.monotonic())):
                key.data(key.fileobj)
            self.expire(time.monotonic())

    def next_timeout(self, now):
        """Seconds to the nearest deadline of a connection not being answered (None: none)."""
        deadlines = [c.deadline for c in self.conns.values() if c.state != "answering"]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def expire(self, now):
        """Close every connection past its deadline, except those a worker is answering."""
        for conn in [c for c in self.conns.values() if c.state != "answering"]:
            if conn.deadline <= now:
                self.close(conn)

    def accept(self, listener):
        """Take every waiting connection, displacing the oldest when at HTTP_MAX_CLIENTS."""
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return                  # out of descriptors or aborted: the next round retries
            if len(self.conns) >= HTTP_MAX_CLIENTS and not self.displace():
                sock.close()
                continue
            sock.setblocking(False)
            self.conns[sock] = HttpConnection(sock, time.monotonic())
            self.selector.register(sock, selectors.EVENT_READ, self.readable)

    def displace(self):
        """Close the oldest connection not being answered; False when every one is."""
        for conn in self.conns.values():
            if conn.state != "answering":
                self.close(conn)
                return True
        return False

    def readable(self, sock):
        """Read what came: add it to the request, or drop it after the answer."""
        conn = self.conns.get(sock)
        if conn is None:                # closed earlier in this round (displaced)
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
        elif conn.state == "reading":
            conn.inbox += data
            self.take_request(conn)

    def take_request(self, conn):
        """Hand a complete request to the workers, or answer a refused one at once."""
        try:
            request = read_http_request(conn.inbox)
        except HttpError as e:
            self.answer(conn, http_refusal(e, time.time()))
            return
        if request is not None:
            conn.state = "answering"
            self.selector.unregister(conn.sock)
            self.requests.put((conn, request))

    def work(self):
        """A worker: answer requests until a None arrives."""
        while (item := self.requests.get()) is not None:
            conn, request = item
            now = time.time()
            try:
                answer = self.dispatch(request, now)
            except Exception as e:      # a bug behind one route must not end the worker
                self.log(f"http: {request.method} {request.path}: {type(e).__name__}: {e}")
                answer = http_refusal(HttpError(500, "internal error"), now)
            self.answers.put((conn, answer))
            self.wake()

    def wake(self):
        """Make the reader loop look up from select."""
        try:
            self.wake_w.send(b"\0")
        except OSError:
            pass                        # full: it is awake already; closed: it has stopped

    def woken(self, sock):
        """Take the answers the workers made and start writing them."""
        try:
            sock.recv(4096)
        except OSError:
            pass
        while not self.answers.empty():
            conn, answer = self.answers.get()
            if self.conns.get(conn.sock) is conn:
                self.answer(conn, answer)

    def answer(self, conn, answer):
        """Start writing ``answer``; the client has HTTP_DEADLINE to take it."""
        conn.state, conn.outbox = "writing", memoryview(answer)
        conn.deadline = time.monotonic() + HTTP_DEADLINE
        self.watch(conn.sock, selectors.EVENT_WRITE, self.writable)
        self.writable(conn.sock)

    def writable(self, sock):
        """Write what the socket takes; once all is out, end our side and linger."""
        conn = self.conns.get(sock)
        if conn is None:                # closed earlier in this round (displaced)
            return
        try:
            conn.outbox = conn.outbox[sock.send(conn.outbox):]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:                 # the client hung up or reset: nothing to say
            self.close(conn)
            return
        if not conn.outbox:
            self.linger(conn)

    def linger(self, conn):
        """Half-close, then read and drop until the client closes (closing now could reset
        the connection and lose the answer)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.state, conn.deadline = "draining", time.monotonic() + HTTP_LINGER
        self.watch(conn.sock, selectors.EVENT_READ, self.readable)

    def watch(self, sock, events, callback):
        """Register ``sock`` for ``events`` or change what it is registered for."""
        try:
            self.selector.modify(sock, events, callback)
        except KeyError:
            self.selector.register(sock, events, callback)

    def close(self, conn):
        """Forget and close one connection."""
        self.conns.pop(conn.sock, None)
        if conn.state != "answering":
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def shutdown(self):
        """Stop the reader thread and the workers."""
        self.running = False
        self.wake()
        if self.thread is not None:
            self.thread.join(timeout=10)
        for _ in range(HTTP_WORKERS):
            self.requests.put(None)

    def server_close(self):
        """Close the listening socket and every connection."""
        for conn in list(self.conns.values()):
            self.close(conn)
        for sock in (self.sock, self.wake_r, self.wake_w):
            sock.close()
        self.selector.close()


def start_http(app, host, port, log):
    """Listen on ``host``:``port`` and serve ``app`` from its own threads; the HttpListener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise DataError(f"cannot listen on {format_address(host, port)} for HTTP: "
                        f"{e.strerror}") from None
    return HttpListener(sock, app, log).start()


# SECTION: MCP — the tool table and JSON-RPC for AI agents, over Streamable HTTP and stdio

MCP_LEGACY_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
MCP_MODERN_VERSIONS = ("2026-07-28",)
MCP_META = "io.modelcontextprotocol/"
MCP_MAX_BODY = 1 << 20              # bytes one JSON-RPC message may take
MCP_PAGE = 50                       # records a search returns by default
MCP_MAX_PAGE = 200                  # and at most: brief records stay far under 25k tokens
MCP_MAX_MATCHES = 100_000           # records one search may match: it pages, so past max_results
MCP_TEXT_LIMIT = 8000               # characters of the text rendering beside the JSON
MCP_BRIEF = {PERSON: ("alias", "name", "email", "phone", "title", "department"),
             MACHINE: ("hostname", "ip", "role", "status", "os", "owner", "location")}
MCP_SERVER_SET = frozenset(("type", "tenant", "created", "modified", "source", "status",
                            "last_seen"))      # fields only the server sets: no source to show
MCP_INSTRUCTIONS = (
    "Pharos is a directory of people and machines. search takes a Ph query: words match "
    "names and host names; field=value matches a field (role=nas, ip=10.0.0.7, "
    "owner=jsmith); * and ? are wildcards; terms are ANDed. get reads one record by alias "
    "or hostname. Writes take dry_run to show what they would do first.")


class McpTool:
    """One row of the tool table: what an agent sees, and the coroutine that runs it."""

    def __init__(self, name, title, description, params, output, run, *, read_only,
                 destructive=False, idempotent=False, required=()):
        self.name, self.title, self.description, self.run = name, title, description, run
        self.input_schema = {"type": "object", "properties": params,
                             "additionalProperties": False}
        if required:
            self.input_schema["required"] = list(required)
        self.output_schema = {"type": "object", "properties": output,
                              "required": list(output)}
        self.annotations = {"title": title, "readOnlyHint": read_only,
                            "destructiveHint": destructive, "idempotentHint": idempotent,
                            "openWorldHint": False}

    def listing(self):
        """The tool as tools/list shows it."""
        return {"name": self.name, "title": self.title, "description": self.description,
                "inputSchema": self.input_schema, "outputSchema": self.output_schema,
                "annotations": self.annotations}


# -- argument checking: the JSON Schema subset the tool table uses --------------

def mcp_check(schema, value, where="arguments"):
    """None when ``value`` fits ``schema`` (a JSON Schema subset), else why not."""
    if "anyOf" in schema:
        return mcp_check_any(schema["anyOf"], value, where)
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool,
              "null": type(None)}
    if kind == "integer":
        if type(value) is not int:
            return f"{where} must be an integer"
        if not schema.get("minimum", value) <= value <= schema.get("maximum", value):
            return f"{where} must be from {schema['minimum']} to {schema['maximum']}"
    elif kind in checks and type(value) is not checks[kind]:
        return f"{where} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(map(str, schema['enum']))}"
    if kind == "string" and len(value) > schema.get("maxLength", len(value)):
        return f"{where} is longer than {schema['maxLength']} characters"
    if kind == "array":
        if len(value) > schema.get("maxItems", len(value)):
            return f"{where} has more than {schema['maxItems']} items"
        for n, item in enumerate(value):
            problem = mcp_check(schema.get("items", {}), item, f"{where}[{n}]")
            if problem:
                return problem
    if kind == "object":
        return mcp_check_object(schema, value, where)
    return None


def mcp_check_any(choices, value, where):
    """mcp_check for anyOf: None when one of ``choices`` fits, else what each wants."""
    problems = [mcp_check(choice, value, where) for choice in choices]
    if None in problems:
        return None
    kinds = [choice.get("type", "?") for choice in choices]
    fitting = [p for p, choice in zip(problems, choices) if choice.get("type") == (
        "array" if type(value) is list else "string" if type(value) is str else None)]
    return fitting[0] if fitting else f"{where} must be one of: {', '.join(kinds)}"


def mcp_check_object(schema, value, where):
    """mcp_check for an object: required names, known names, each property's schema."""
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            return f"{where} needs {name}"
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            problem = mcp_check(properties[name], item, f"{name}")
        elif extra is False:
            problem = f"{where} has an unknown name {printable(name, 40)!r}"
        else:
            problem = mcp_check(extra, item, name) if type(extra) is dict else None
        if problem:
            return problem
    return None


# -- the tools ----------------------------------------------------------------

STRING = {"type": "string", "maxLength": MAX_LINE}
STRINGS = {"type": "array", "items": STRING, "maxItems": MAX_VALUES}
RECORD = {"type": "object", "description": "a record: field names to a string, or to a list "
                                           "of strings for multi-valued fields"}
RECORDS = {"type": "array", "items": RECORD}


def mcp_record_params(schema, rtype):
    """The input schema properties of an add: every field a person may set on ``rtype``."""
    params = {}
    for field in schema.all[rtype]:
        if field.server or field.name == "type":
            continue
        shape = dict(STRINGS if field.multi else STRING)
        if not field.multi:
            shape["maxLength"] = field.max
        params[field.name] = dict(shape, description=field.desc)
    return params


def mcp_changes_param(schema):
    """The `changes` object of update: field → value, list of values, or null to remove."""
    values = {"anyOf": [STRING, STRINGS, {"type": "null"}]}
    return {"type": "object", "description": "field names to new values; null removes a field",
            "additionalProperties": values}


def mcp_brief(record, fields):
    """``record`` cut down for a listing: the brief fields of its type, or ``fields``."""
    names = fields or MCP_BRIEF[record["type"]]
    out = {"type": record["type"]}
    out.update((n, record[n]) for n in names if record.get(n) and n != "type")
    return out


def mcp_cursor(query, rtype, offset):
    """An opaque cursor for the page of ``query`` from ``offset`` on."""
    raw = json.dumps([query, rtype, offset], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def mcp_uncursor(text):
    """(query, type, offset) from a cursor; ToolError if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        query, rtype, offset = json.loads(raw)
        if type(query) is str and rtype in (None, PERSON, MACHINE) and (
                type(offset) is int and offset >= 0):
            return query, rtype, offset
    except (ValueError, TypeError, UnicodeDecodeError):
        pass
    raise ToolError("that cursor is not one this server gave out; search again")


async def tool_search(service, args, caller, now):
    """search: records matching a Ph query or free text, a page at a time."""
    if "cursor" in args:
        query, rtype, offset = mcp_uncursor(args["cursor"])
    else:
        query, rtype, offset = args.get("query", ""), args.get("type"), 0
    if not query.strip():
        raise ToolError("say what to search for: words, or field=value terms")
    limit = args.get("limit", MCP_PAGE)
    records = await service.query(caller, query, rtype, now, most=MCP_MAX_MATCHES)
    page = records[offset:offset + limit]
    fields = None if args.get("fields", "brief") == "brief" else "all"
    shown = [r if fields else mcp_brief(r, None) for r in page]
    end = offset + len(page)
    return {"total": len(records), "records": shown,
            "next_cursor": mcp_cursor(query, rtype, end) if end < len(records) else None}


async def tool_get(service, args, caller, now):
    """get: one record by alias or hostname, with the source of each field."""
    record = await service.get(caller, args.get("type"), args["key"], now)
    if record is None:
        raise ToolError(f"no record with alias or hostname {printable(args['key'], 64)!r}")
    record = dict(record)
    owners = record.pop(SOURCES_KEY, None) or {}
    return {"record": record, "sources": {name: owners.get(name, MANUAL) for name in record
                                          if name not in MCP_SERVER_SET}}


def tool_add(rtype):
    """The add tool for ``rtype``: add_person or add_machine."""
    async def add(service, args, caller, now):
        fields = {name: (value if type(value) is list else [value])
                  for name, value in args.items() if name != "dry_run"}
        record = await service.add(caller, rtype, fields, now, dry_run=args.get("dry_run", False))
        return {"added": not args.get("dry_run", False), "record": record}
    add.__doc__ = f"add_{rtype}: one new {rtype}, or with dry_run what it would be."
    return add


def mcp_make(changes):
    """{field: [values]} for a change from the tool's {field: value | [values] | null}."""
    return {name: [] if value is None else value if type(value) is list else [value]
            for name, value in changes.items()}


async def tool_update(service, args, caller, now):
    """update: change the records a query selects, at most ``limit`` of them."""
    if not args["changes"]:
        raise ToolError("changes is empty: name at least one field to set or remove")
    result = await service.change(caller, args["selection"], args.get("type"),
                                  mcp_make(args["changes"]), now, limit=args.get("limit", 1),
                                  dry_run=args.get("dry_run", False))
    return {"matched": result["matched"], "changed": result["changed"],
            "records": result["records"], "dry_run": args.get("dry_run", False)}


async def tool_delete(service, args, caller, now):
    """delete: remove the records a query selects, only when exactly as many as expected."""
    result = await service.delete(caller, args["selection"], args.get("type"), now,
                                  expected=args["expected_count"],
                                  dry_run=args.get("dry_run", False))
    return {"matched": result["matched"], "deleted": result["deleted"],
            "keys": result["keys"], "dry_run": args.get("dry_run", False)}


async def tool_stats(service, args, caller, now):
    """stats: how many people and machines, machines by status, the latest changes."""
    return await service.stats(caller, now)


def mcp_tools(schema):
    """The tool table, in the order tools/list gives it."""
    kind = {"type": "string", "enum": list(RECORD_TYPES),
            "description": "only people or only machines"}
    dry = {"type": "boolean", "description": "show what would change, change nothing"}
    selection = dict(STRING, description="a Ph query selecting the records, e.g. hostname=web-1")
    written = {"added": {"type": "boolean"}, "record": RECORD}
    return [
        McpTool("search", "Search the directory",
                "Find people and machines. query is a Ph query: bare words match names and "
                "host names, field=value matches a field, * and ? are wildcards, terms are "
                "ANDed. Answers a page of brief records; pass next_cursor back for more.",
                {"query": dict(STRING, description="words and field=value terms"), "type": kind,
                 "limit": {"type": "integer", "minimum": 1, "maximum": MCP_MAX_PAGE,
                           "description": f"records per page (default {MCP_PAGE})"},
                 "fields": {"type": "string", "enum": ["brief", "all"],
                            "description": "brief (default) or every field"},
                 "cursor": dict(STRING, description="next_cursor of the previous page")},
                {"total": {"type": "integer"}, "records": RECORDS,
                 "next_cursor": {"type": ["string", "null"]}},
                tool_search, read_only=True, idempotent=True),
        McpTool("get", "Read one record",
                "One person (by alias) or machine (by hostname) with every field, and which "
                "fields a person set (manual) and which discovery keeps (scan, pulse).",
                {"key": dict(STRING, description="an alias or a hostname"), "type": kind},
                {"record": RECORD, "sources": {"type": "object"}},
                tool_get, read_only=True, idempotent=True, required=("key",)),
        McpTool("add_person", "Add a person", "Add one person; alias is the unique key.",
                dict(mcp_record_params(schema, PERSON), dry_run=dry), written,
                tool_add(PERSON), read_only=False, required=("alias",)),
        McpTool("add_machine", "Add a machine", "Add one machine; hostname is the unique key.",
                dict(mcp_record_params(schema, MACHINE), dry_run=dry), written,
                tool_add(MACHINE), read_only=False, required=("hostname",)),
        McpTool("update", "Change records",
                "Set or remove fields on the records selection matches. Refused when more "
                "than limit records (default 1) match, so a loose query changes nothing.",
                {"selection": selection, "type": kind, "changes": mcp_changes_param(schema),
                 "limit": {"type": "integer", "minimum": 1, "maximum": MAX_CHANGE_LIMIT},
                 "dry_run": dry},
                {"matched": {"type": "integer"}, "changed": {"type": "integer"},
                 "records": RECORDS, "dry_run": {"type": "boolean"}},
                tool_update, read_only=False, idempotent=True, required=("selection", "changes")),
        McpTool("delete", "Delete records",
                "Delete the records selection matches, only if their number is exactly "
                "expected_count (search first).",
                {"selection": selection, "type": kind,
                 "expected_count": {"type": "integer", "minimum": 1, "maximum": MAX_CHANGE_LIMIT},
                 "dry_run": dry},
                {"matched": {"type": "integer"}, "deleted": {"type": "integer"},
                 "keys": {"type": "array", "items": {"type": "string"}},
                 "dry_run": {"type": "boolean"}},
                tool_delete, read_only=False, destructive=True, idempotent=True,
                required=("selection", "expected_count")),
        McpTool("stats", "Directory statistics",
                "How many people and machines there are, machines by status, and the most "
                "recently changed records.", {},
                {"people": {"type": "integer"}, "machines": {"type": "integer"},
                 "by_status": {"type": "object"}, "recent": RECORDS},
                tool_stats, read_only=True, idempotent=True),
    ]


# -- JSON-RPC: one message in, one reply out, either era ------------------------

class McpServer:
    """The MCP method table over a directory service (local or remote) and a caller."""

    def __init__(self, service, schema, log, version=__version__):
        self.service, self.log = service, log
        self.tools = {tool.name: tool for tool in mcp_tools(schema)}
        self.server_info = {"name": "pharos", "version": version}

    async def handle(self, message, caller, now, headers=None):
        """(HTTP status, reply object or None) for one decoded JSON-RPC message."""
        if type(message) is list:
            return 400, mcp_error_reply(None, McpError(-32600, "batches are not supported"))
        if type(message) is not dict or message.get("jsonrpc") != "2.0":
            return 400, mcp_error_reply(None, McpError(-32600, "not a JSON-RPC 2.0 message"))
        if "method" not in message:
            return 202, None                    # a response to us: nothing to answer
        if "id" not in message:
            return 202, None                    # a notification: never answered
        ident = message["id"]
        if type(ident) not in (str, int) or type(ident) is bool:
            return 400, mcp_error_reply(None, McpError(-32600, "the id must be a string or number"))
        params = message.get("params", {})
        modern = type(params) is dict and mcp_modern(params)
        try:
            if type(params) is not dict:
                raise McpError(-32602, "params must be an object")
            if modern:
                mcp_check_modern(params, message["method"], headers or {})
            result = await self.dispatch(message["method"], params, caller, now, modern)
        except McpError as e:
            return (e.status if modern else 200), mcp_error_reply(ident, e)
        except Exception as e:      # a bug must cost one request, not the stdio session
            self.log(f"mcp: {printable(str(message['method']), 64)}: {type(e).__name__}: {e}")
            return (500 if modern else 200), mcp_error_reply(ident, McpError(-32603, "internal error"))
        if modern:
            result = dict(result, resultType="complete")
            result.setdefault("_meta", {})[MCP_META + "serverInfo"] = self.server_info
        return 200, {"jsonrpc": "2.0", "id": ident, "result": result}

    async def dispatch(self, method, params, caller, now, modern):
        """The result of one request; McpError when it cannot have one."""
        if method == "initialize" and not modern:
            return self.initialize(params)
        if method == "ping" and not modern:
            return {}
        if method == "server/discover":
            return {"supportedVersions": list(MCP_MODERN_VERSIONS + MCP_LEGACY_VERSIONS),
                    "capabilities": {"tools": {"listChanged": False}},
                    "instructions": MCP_INSTRUCTIONS, "ttlMs": 0, "cacheScope": "private"}
        if method == "tools/list":
            listing = {"tools": [tool.listing() for tool in self.tools.values()]}
            return dict(listing, ttlMs=0, cacheScope="private") if modern else listing
        if method == "tools/call":
            return await self.call(params, caller, now)
        raise McpError(-32601, f"method not found: {printable(str(method), 64)}", status=404)

    def initialize(self, params):
        """The legacy handshake: the client's version when known, else our newest."""
        asked = params.get("protocolVersion")
        version = asked if asked in MCP_LEGACY_VERSIONS else MCP_LEGACY_VERSIONS[0]
        return {"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": self.server_info, "instructions": MCP_INSTRUCTIONS}

    async def call(self, params, caller, now):
        """tools/call: the tool's result, or an isError result when the tool refuses."""
        tool = self.tools.get(params.get("name"))
        if tool is None:
            raise McpError(-32602, f"unknown tool: {printable(str(params.get('name')), 64)}")
        args = params.get("arguments", {})
        problem = mcp_check(tool.input_schema, args)
        if problem:
            return mcp_tool_error(problem)
        try:
            structured = await tool.run(self.service, args, caller, now)
        except ServiceError as e:
            return mcp_tool_error(service_words(e))
        except (ToolError, RecordError, PhError) as e:
            return mcp_tool_error(str(e))
        text = json.dumps(structured, ensure_ascii=False)
        if len(text) > MCP_TEXT_LIMIT:
            text = text[:MCP_TEXT_LIMIT] + " …(cut; the structured result is whole)"
        return {"content": [{"type": "text", "text": text}], "structuredContent": structured,
                "isError": False}


def service_words(error):
    """A ServiceError as one line for an agent: the reason, then qi's details."""
    details = "; ".join(f"{text} ({code})" for code, text in error.details)
    return f"{error.text} ({error.code})" + (f": {details}" if details else "")


def mcp_tool_error(text):
    """A tool result that failed: the agent reads ``text`` and may try again."""
    return {"content": [{"type": "text", "text": text}], "isError": True}


def mcp_error_reply(ident, error):
    """A JSON-RPC error object for ``error`` (an McpError)."""
    body = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return {"jsonrpc": "2.0", "id": ident, "error": body}


def mcp_modern(params):
    """Whether a request is of the stateless era: its _meta names a protocol version."""
    meta = params.get("_meta")
    return type(meta) is dict and MCP_META + "protocolVersion" in meta


def mcp_check_modern(params, method, headers):
    """Refuse a modern request whose version, _meta or mirrored headers are wrong."""
    meta = params["_meta"]
    version = meta.get(MCP_META + "protocolVersion")
    if version not in MCP_MODERN_VERSIONS:
        raise McpError(-32022, "unsupported protocol version",
                       data={"supported": list(MCP_MODERN_VERSIONS), "requested": version})
    if type(meta.get(MCP_META + "clientCapabilities")) is not dict:
        raise McpError(-32602, "_meta needs io.modelcontextprotocol/clientCapabilities")
    if not headers:
        return                                  # stdio: there are no headers to mirror
    wanted = {"mcp-protocol-version": version, "mcp-method": method}
    if method == "tools/call":
        wanted["mcp-name"] = params.get("name")
    for name, value in wanted.items():
        if headers.get(name) != value:
            raise McpError(-32020, f"the {name} header does not match the request")


# -- Streamable HTTP: POST /mcp on the HTTP app ----------------------------------

class McpHttp:
    """POST /mcp: the transport checks (Host, Origin, content type, bearer token), then the
    message goes over the LoopBridge to McpServer.handle on the loop's thread.

    Tokens are identities like keys: in dev they are optional, in lab reads need none and
    writes need one, in enterprise every request needs one. No sessions are kept.
    """

    def __init__(self, mcp, bridge, tokens, config, log):
        self.mcp, self.bridge, self.tokens, self.tier = mcp, bridge, tokens, config.tier
        self.config, self.log = config, log
        self.bound, self.hosts, self.origins = None, set(), set()

    def names(self):
        """(Hosts, Origins) /mcp answers to, from the address the listener is bound to:
        config.http names port 0 until the listener has one, so they are made late."""
        bound = self.config.http
        if bound != self.bound:
            hosts = mcp_hosts(*bound)
            self.origins = mcp_origins(hosts, self.config.mcp_origins)
            self.hosts = hosts | mcp_origin_hosts(self.config.mcp_origins, bound[1])
            self.bound = bound
        return self.hosts, self.origins

    def post(self, request, now):
        """The answer to one POST /mcp."""
        headers = request.headers
        refusal = self.transport_refusal(headers)
        if refusal:
            return refusal
        try:
            message = json.loads(request.body)
        except ValueError:
            return mcp_http_error(400, None, McpError(-32700, "the body is not JSON"))
        user, refusal = self.identify(headers, message, now)
        if refusal:
            return refusal
        caller = Caller(user, None, mcp_request_text(message))
        try:
            status, reply = self.bridge.call(self.mcp.handle, message, caller, now, headers)
        except HttpError as e:
            return http_error_answer(e)
        if reply is None:
            return status, "application/json", b""
        return status, "application/json", json.dumps(reply, ensure_ascii=False).encode()

    def transport_refusal(self, headers):
        """403/421/415 for a request from a place or in a shape /mcp does not take."""
        hosts, origins = self.names()
        host = headers.get("host", "").lower()
        if host not in hosts:
            return 421, "text/plain", b"this server does not answer for that Host\n"
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in origins:
            return mcp_http_error(403, None, McpError(-32600, "Origin not allowed"))
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return 415, "text/plain", b"send Content-Type: application/json\n"
        return None

    def identify(self, headers, message, now):
        """(identity or None, refusal): the bearer token's identity, 401 when one is needed
        and missing or not valid."""
        auth = headers.get("authorization", "")
        scheme, _, secret = auth.partition(" ")
        user = None
        if auth:
            user = self.tokens.identify(secret.strip(), now) if (
                self.tokens is not None and scheme.lower() == "bearer") else None
            if user is None:
                return None, mcp_unauthorized("the token is not valid (unknown, revoked or expired)")
        elif self.tier == "enterprise" or (self.tier == "lab" and mcp_writes(self.mcp, message)):
            return None, mcp_unauthorized("this needs a bearer token (pharos tokens add NAME)")
        return user, None


def mcp_writes(mcp, message):
    """Whether ``message`` calls a tool that writes."""
    if type(message) is not dict or message.get("method") != "tools/call":
        return False
    params = message.get("params")
    tool = mcp.tools.get(params.get("name")) if type(params) is dict else None
    return tool is not None and not tool.annotations["readOnlyHint"]


def mcp_request_text(message):
    """How an MCP request shows in the audit log: the tool and its arguments."""
    params = message.get("params") if type(message) is dict else None
    if type(params) is dict and message.get("method") == "tools/call":
        return f"mcp {params.get('name')} " + json.dumps(params.get("arguments", {}),
                                                          ensure_ascii=False)[:1800]
    return "mcp " + str(message.get("method") if type(message) is dict else "?")[:64]


def mcp_http_error(status, ident, error):
    """An HTTP answer carrying a JSON-RPC error."""
    return status, "application/json", json.dumps(mcp_error_reply(ident, error)).encode()


def mcp_unauthorized(text):
    """401 with the Bearer challenge MCP clients expect."""
    body = json.dumps(mcp_error_reply(None, McpError(-32001, text))).encode()
    return 401, "application/json", body, [("WWW-Authenticate", 'Bearer realm="pharos"')]


def mcp_hosts(host, port):
    """The Host values /mcp answers to: the listener's own names (DNS rebinding guard)."""
    names = {"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]"}
    if host in ("0.0.0.0", "::"):
        names |= {socket.gethostname().lower()}
    return {f"{name.lower()}:{port}" for name in names} | {name.lower() for name in names}


def mcp_origins(hosts, extra):
    """The Origins /mcp accepts: http(s):// of its own names, and those of --mcp-origin."""
    own = {f"{scheme}://{host}" for host in hosts for scheme in ("http", "https")}
    return own | {origin.lower().rstrip("/") for origin in extra}


def mcp_origin_hosts(origins, port):
    """The Host values --mcp-origin names: a server that agents reach as
    https://ph.example.org is asked for Host ph.example.org (with or without the port)."""
    hosts = set()
    for origin in origins:
        netloc = origin.lower().rstrip("/").partition("://")[2]
        has_port = ":" in netloc.rpartition("]")[2]
        hosts |= {netloc} if has_port else {netloc, f"{netloc}:{port}"}
    return hosts


def mcp_routes(app, mcp_http):
    """POST /mcp on ``app``; GET and DELETE get 405 (no streams, no sessions)."""
    app.route("POST", "/mcp", guarded(mcp_http.post))
    for method in ("GET", "DELETE"):
        app.route(method, "/mcp", lambda request, now: (
            405, "text/plain", b"POST JSON-RPC messages to /mcp\n", [("Allow", "POST")]))


# -- stdio: pharos mcp -----------------------------------------------------------

async def mcp_stdio(mcp, reader, writer, log):
    """Serve MCP over stdio: one JSON-RPC message per line in, one per line out, until EOF.
    ``reader()`` gives the next line (b"" at the end); ``writer(bytes)`` sends one."""
    while True:
        raw = await reader()
        if not raw:
            return
        if len(raw) > MCP_MAX_BODY:
            reply = mcp_error_reply(None, McpError(-32600, "message too large"))
        elif not raw.strip():
            continue
        else:
            try:
                message = json.loads(raw)
            except ValueError:
                reply = mcp_error_reply(None, McpError(-32700, "not JSON"))
            else:
                caller = Caller(None, None, mcp_request_text(message))
                _, reply = await mcp.handle(message, caller, time.time())
        if reply is not None:
            writer(json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")


class RemoteService:
    """The directory service's whole-request methods over a Ph connection: what
    ``pharos mcp`` runs its tools on, logged in with the user's SSH key like ph and mdb.
    The server decides, limits and audits; this only words the requests."""

    def __init__(self, client):
        self.client = client

    async def query(self, caller, text, rtype, now, most=None):
        """Records matching ``text`` (all fields, with sources); the server's max_results
        holds whatever ``most`` asks, as Ph has no paging."""
        narrowed = f"{text} type={rtype}" if rtype else text
        return [mcp_remote_record(r) for r in
                await self.ask(self.client.query(f"{narrowed} return all sources"))]

    async def get(self, caller, rtype, key, now):
        """The person or machine called ``key``, or None."""
        for kind in ([rtype] if rtype else RECORD_TYPES):
            found = await self.query(caller, f"{KEY_FIELD[kind]}={quote_value(key)}", kind, now)
            if found:
                return found[0]
        return None

    async def add(self, caller, rtype, fields, now, dry_run=False):
        """Add one record (dry_run: refused here; the server has no dry add)."""
        key = fields[KEY_FIELD[rtype]][0]
        if dry_run:
            return dict({n: v if len(v) > 1 else v[0] for n, v in fields.items()}, type=rtype)
        changes = {n: v for n, v in fields.items() if n != KEY_FIELD[rtype]}
        for request in write_requests(rtype, key, changes, True):
            await self.ask(self.client.write(request.replace("add ", f"add type={rtype} ", 1)
                                             if request.startswith("add ") else request))
        return await self.get(caller, rtype, key, now)

    async def change(self, caller, text, rtype, make, now, limit=1, dry_run=False):
        """Change what ``text`` selects, at most ``limit`` records."""
        before = await self.query(caller, text, rtype, now)
        if not before:
            raise ServiceError(501, "No matches to specification.")
        if len(before) > limit:
            raise ServiceError(518, f"Too many entries ({len(before)}) selected; limit is {limit}.")
        after = [dict(r, **{n: (v if n in BUILTIN_MULTI else v[0]) for n, v in make.items() if v})
                 for r in before]
        if not dry_run:
            narrowed = f"{text} type={rtype}" if rtype else text
            sets = " ".join(f"{n}={quote_value(v)}" for n, vs in make.items() for v in (vs or [""]))
            await self.ask(self.client.command(f"set limit={limit}"))
            await self.ask(self.client.write(f"change {narrowed} make {sets}"))
            after = await self.query(caller, text, rtype, now) or after
        return {"matched": len(before), "changed": len(before), "records": after}

    async def delete(self, caller, text, rtype, now, expected, dry_run=False):
        """Delete what ``text`` selects, only when that is exactly ``expected`` records."""
        found = await self.query(caller, text, rtype, now)
        if len(found) != expected:
            raise ServiceError(518, f"{plural(len(found), 'entry', 'entries')} selected, "
                                    f"not {expected}; nothing deleted.")
        keys = [r[KEY_FIELD[r["type"]]] for r in found]
        if not dry_run:
            narrowed = f"{text} type={rtype}" if rtype else text
            await self.ask(self.client.command(f"set limit={expected}"))
            await self.ask(self.client.write(f"delete {narrowed}"))
        return {"matched": len(found), "deleted": 0 if dry_run else len(found), "keys": keys}

    async def stats(self, caller, now):
        """Counts by type and machine status, from the dump extension's totals."""
        counts = {}
        for name, request in (("people", "type=person return alias"),
                              ("machines", "type=machine return hostname"),
                              *((s, f"type=machine status={s} return hostname")
                                for s in ("online", "offline", "failing", "unknown"))):
            counts[name] = await self.ask(self.count(request))
        return {"people": counts.pop("people"), "machines": counts.pop("machines"),
                "by_status": {s: n for s, n in counts.items() if n}, "recent": []}

    async def count(self, request):
        """How many records ``request`` matches (the first dump page's count line)."""
        async for total, _ in self.client.dump(request):
            return total
        return 0

    @staticmethod
    async def ask(pending):
        """Await a client call; a Ph refusal becomes a ServiceError in the server's words."""
        try:
            return await pending
        except PhError as e:
            raise ServiceError(e.code, e.text) from None


def mcp_remote_record(record):
    """A record read over Ph, with its sources map in the shape stores keep it."""
    sources = record.get(SOURCES_KEY)
    if not sources:
        record.pop(SOURCES_KEY, None)
    return record


# SECTION: Serve — the wiring that starts the listeners (Ph, HTTP with metrics and MCP)

def http_app(server, store, tokens, config, loop, log):
    """The HTTP app of a server: metrics, health and readiness, and /mcp."""
    app, bridge = HttpApp(), LoopBridge(loop)
    metrics_routes(app, bridge, server, store)
    if config.mcp:
        mcp = McpServer(server.service, store.schema, log)
        mcp_routes(app, McpHttp(mcp, bridge, tokens, config, log))
    return app


async def serve(store, config, log, keys=None, audit=None, tokens=None):
    """Run the Ph server (and the HTTP listener) until SIGTERM or SIGINT, then stop."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrors(log))
    config.max_connections = raise_fd_limit(config.max_connections, log)
    server = PhServer(store, config, log, keys=keys, audit=audit)
    if keys is not None:
        keys.reload()
        loop.add_signal_handler(signal.SIGHUP, keys.reload)
    host, port = config.listen
    try:
        bound = await server.start(host, port)
    except OSError as e:
        raise DataError(f"cannot listen on {format_address(host, port)}: {e.strerror}") from None
    httpd = None
    if config.http:
        httpd = start_http(http_app(server, store, tokens, config, loop, log), *config.http, log)
        config.http = httpd.server_address[:2]
        config.metrics_port = config.http[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if httpd:
        paths = "/metrics /healthz /readyz" + (" /mcp" if config.mcp else "")
        log(f"metrics listening on {format_address(*config.http)} ({paths})")
    log(f"Ph listening on {format_address(*bound)} (tier {config.tier}, "
        f"storage {store.describe()}, {store.size()} records)")
    await stop.wait()
    log("stopping: finishing writes in flight")
    await server.shutdown()
    if httpd:
        httpd.shutdown()
        httpd.server_close()
    await store.close()
    if audit is not None:
        audit.close()
    log("stopped")


# SECTION: CLI — cmd_<name> handlers, argument parsing and main()

def ldap_store_from_args(args, schema):
    """An open LdapStore for `serve --storage ldap://...`; the password from
    --ldap-password-file or $PHAROS_LDAP_PASSWORD, never the command line."""
    password = os.environ.get("PHAROS_LDAP_PASSWORD")
    if args.ldap_password_file:
        try:
            with open(args.ldap_password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --ldap-password-file "
                             f"{args.ldap_password_file}: {getattr(e, 'strerror', e)}") from None
    if args.ldap_bind_dn and password is None:
        raise UsageError("--ldap-bind-dn needs a password: --ldap-password-file FILE or "
                         "$PHAROS_LDAP_PASSWORD")
    return LdapStore(schema, args.storage, args.ldap_bind_dn, password,
                     log=log_to_stderr, sync=args.ldap_sync, image_dir=args.data).open()


class ArgParserCore:
    """What ArgParser adds to argparse: a usage error is one line (UsageError), not an exit."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", help_formatter_class())
        super().__init__(*args, **kwargs)

    def error(self, message):
        """Raise the message as a UsageError instead of printing usage and exiting."""
        raise UsageError(f"{self.prog}: {message}")


def terminal_columns():
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, stdout's
    terminal, else 80), without importing shutil (and the compressors it imports)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isascii() and columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


@functools.cache
def help_formatter_class():
    """argparse's HelpFormatter sized by terminal_columns(): argparse makes one for every
    option it adds, and the stock one imports shutil to ask the width."""
    def init(self, prog, indent_increment=2, max_help_position=24, width=None):
        width = terminal_columns() - 2 if width is None else width
        argparse.HelpFormatter.__init__(self, prog, indent_increment, max_help_position, width)
    return type("HelpFormatter", (argparse.HelpFormatter,), {"__init__": init})


@functools.cache
def arg_parser_class():
    """ArgParser: argparse.ArgumentParser with ArgParserCore's errors, made on first use
    (``--version`` answers without argparse)."""
    return type("ArgParser", (ArgParserCore, argparse.ArgumentParser), {})


def log_to_stderr(message):
    """Print ``message`` on stderr as one line starting "pharos: "."""
    print(f"pharos: {message}", file=sys.stderr, flush=True)


def server_address(args):
    """The server to talk to: --server, PHAROS_SERVER, the client config file, localhost;
    UsageError naming where a malformed one came from."""
    text, what = server_setting(args)
    if not utf8_text(text):
        raise UsageError(f"{what}: not UTF-8 text")
    bare_v6 = text.count(":") > 1 and not text.startswith("[")
    host, port = parse_hostport(f"[{text}]" if bare_v6 else text, PH_PORT, what)
    if ":" in host and not is_ipv6_address(host):     # 1.2.3.4:5:6 is no host name
        raise UsageError(f"{what} {printable(text, 64)!r}: expected HOST:PORT")
    return host, port


def server_setting(args):
    """(the server's HOST:PORT text, what to call it in an error) by precedence."""
    if args.server:
        return args.server, "--server"
    if os.environ.get("PHAROS_SERVER"):
        return os.environ["PHAROS_SERVER"], "PHAROS_SERVER"
    path = client_config_path()
    value, lineno = read_client_config(path).get("server", (None, 0))
    if value is not None:
        return value, f"{path} line {lineno}: server"
    return f"localhost:{PH_PORT}", "--server"


def is_ipv6_address(text):
    """Whether ``text`` is an IPv6 address (a %scope allowed)."""
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def build_schema(args):
    """The Schema with the custom fields of --config (default DATA/pharos.ini, if present)."""
    path = args.config or os.path.join(args.data, "pharos.ini")
    if args.config and not os.path.exists(path):
        raise UsageError(f"--config {path}: no such file")
    return Schema(parse_custom_fields(path) if os.path.exists(path) else ())


@contextlib.contextmanager
def loading():
    """Load millions of records without the cycle collector rescanning them as they come
    (it finds no garbage there), then freeze them out of every later collection."""
    import gc
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def cmd_serve(args):
    """Run the server."""
    default_host = "127.0.0.1" if args.tier == "dev" else "0.0.0.0"
    host, port = parse_hostport(args.listen or f"{default_host}:{PH_PORT}", PH_PORT)
    if args.tier == "dev" and not is_loopback(host):
        raise UsageError(f"--tier dev accepts writes from anyone, so it listens on loopback "
                         f"only; {host} is not a loopback address")
    check_ldap_keys_args(args)
    schema = build_schema(args)
    if args.storage == "memory":
        store = MemoryStore(schema)
    elif args.storage != "file":
        with loading():
            store = ldap_store_from_args(args, schema)
    else:
        with loading():
            store = FileStore(schema, args.data, args.compact_bytes, log=log_to_stderr,
                              image=True).open()
    http = None
    if args.metrics != "off":
        http = parse_hostport(args.metrics or f"{host}:{METRICS_PORT}", METRICS_PORT,
                              "--metrics")
    mcp = args.mcp == "on" and http is not None
    if mcp and args.tier == "dev" and not is_loopback(http[0]):
        raise UsageError(f"in the dev tier /mcp takes writes from anyone, so the HTTP listener "
                         f"must be on loopback, not {http[0]}: say --metrics 127.0.0.1:"
                         f"{METRICS_PORT}, --mcp off or --tier lab")
    config = ServerConfig(tier=args.tier, max_results=args.max_results,
                          idle_timeout=args.idle_timeout, max_connections=args.max_connections,
                          crlf=args.crlf, admin=args.admin, login_delay=args.login_delay,
                          listen=(host, port), http=http, mcp=mcp,
                          mcp_origins=tuple(args.mcp_origin or ()))
    keys, audit = open_keys(args, store)
    if audit is not None:
        store.attach_audit(audit)
    tokens = TokenFile(os.path.join(os.path.abspath(args.data), TOKENS_FILE))
    run_loop(serve(store, config, log_to_stderr, keys, audit, tokens),
             args.busy_poll / 1e6)
    return EXIT_OK


def check_ldap_keys_args(args):
    """Refuse --ldap-keys without LDAP storage, and the groups without --ldap-keys."""
    if args.ldap_keys and args.storage in ("memory", "file"):
        raise UsageError("--ldap-keys needs --storage ldap://HOST[:PORT]/BASE-DN: the keys "
                         "come from that directory")
    for name in ("admin", "writer"):
        if getattr(args, f"ldap_{name}_group") and not args.ldap_keys:
            raise UsageError(f"--ldap-{name}-group needs --ldap-keys")


def open_keys(args, store):
    """The key list and audit log of a server (none for a dev server on memory storage).
    With --ldap-keys the directory's keys join DATA/authorized_keys, and a first start
    authorizes no keys of its own: the directory is where keys are managed."""
    if args.tier == "dev" and args.storage == "memory":
        return None, None
    path = os.path.abspath(args.data)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write data dir {path}: {e.strerror}") from None
    keys_path, fast = os.path.join(path, KEYS_FILE), args.crypto == "auto"
    if args.ldap_keys:
        keys = LdapKeyList(keys_path, log_to_stderr, store, args.ldap_admin_group,
                           args.ldap_writer_group, fast=fast).open()
    else:
        if args.tier != "dev" and not os.path.exists(keys_path):
            bootstrap_keys(keys_path, log_to_stderr)
        keys = KeyFile(keys_path, log_to_stderr, fast=fast)
    audit = AuditLog(os.path.join(path, AUDIT_FILE)) if args.tier != "dev" else None
    return keys, audit


def cmd_load(args):
    """Bulk-load a JSONL file of records into a data dir while no server runs."""
    schema = build_schema(args)
    with loading():
        store = FileStore(schema, args.data, log=log_to_stderr).open()
    try:
        with loading():
            added = load_jsonl(store, args.file)
        store.fold()
    finally:
        store.release()
    print(f"loaded {added} records into {store.path} ({store.size()} in all)")
    return EXIT_OK


def load_jsonl(store, path):
    """Add every record of a JSONL file to ``store`` in memory; UsageError naming a bad line."""
    now, added = time.time(), 0
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                store.add_offline(loaded_record(store.schema, json.loads(raw), now))
            except (ValueError, RecordError) as e:
                raise UsageError(f"{path} line {lineno}: {e}; nothing was loaded") from None
            added += 1
    return added


def loaded_record(schema, item, now):
    """The record one object read by `load` makes, keeping server-set fields it has."""
    if type(item) is not dict:
        raise ValueError("each line must be a JSON object")
    rtype = str(item.get("type", "")).lower()
    if rtype not in RECORD_TYPES:
        raise ValueError("each record needs type person or machine")
    fields, sources = {}, item.get(SOURCES_KEY, {})
    if not valid_sources(sources):
        raise ValueError("sources must map field names to scan or pulse")
    for name, value in item.items():
        if name == SOURCES_KEY:
            continue
        field = schema.field(name)
        if field is None:
            raise ValueError(f"unknown field {name!r}")
        values = value if type(value) is list else [value]
        if not all(type(v) is str for v in values):
            raise ValueError(f"{name} must be a string or a list of strings")
        fields[field.name] = values
    record = new_record(schema, rtype, fields, now, loaded=True)
    kept = {name: source for name, source in sources.items() if name in record}
    if kept:
        record[SOURCES_KEY] = kept
    return record


def cmd_doctor(args):
    """Say what is installed, then check the data dir, the server and its HTTP listener;
    exit 3 when a check fails."""
    import importlib.util
    ok = sys.version_info >= (3, 10)
    print(f"python     {sys.version.split()[0]} ({'ok' if ok else 'too old: need 3.10+'})")
    print(f"pharos     {__version__} ({os.path.abspath(__file__)})")
    for name in OPTIONAL_PACKAGES:
        found = importlib.util.find_spec(name) is not None
        print(f"{name:<10} {'installed' if found else f'not installed (pip install {name})'}")
    host, port = server_address(args)
    answered, text, advertised = doctor_server(host, port)
    checks = [("data dir", *doctor_data_dir(args.data)),
              ("server", answered, f"{format_address(host, port)}: {text}"),
              ("metrics", *doctor_http(args.metrics, host, answered, advertised))]
    for name, _, text in checks:
        print(f"{name:<10} {text}")
    return EXIT_OK if all(passed for _, passed, _ in checks) else EXIT_FAIL


def doctor_http(metrics, host, answered, advertised):
    """(passed, text) for the server's HTTP listener: --metrics, else the port siteinfo
    advertises, else METRICS_PORT on the server's host when the server did not answer."""
    if metrics == "off":
        return True, "not checked (--metrics off)"
    if metrics:
        mhost, mport = parse_hostport(metrics, METRICS_PORT, "--metrics")
    elif answered and advertised is None:
        return True, "none (the server advertises no HTTP listener: serve --metrics off)"
    else:
        mhost, mport = host, advertised or METRICS_PORT
    passed, text = doctor_metrics(mhost, mport)
    return passed, f"{format_address(mhost, mport)}: {text}"


def doctor_metrics(host, port):
    """(passed, text): whether the HTTP listener answers 200 to /healthz and /readyz."""
    import http.client
    answers, passed = [], True
    for path in ("/healthz", "/readyz"):
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read(4096)
        except (OSError, http.client.HTTPException) as e:
            detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
            return False, f"not answering ({detail})"
        finally:
            conn.close()
        passed = passed and response.status == 200
        answers.append(f"{path} {response.status}" + doctor_reason(response.status, body))
    return passed, ", ".join(answers)


def doctor_reason(status, body):
    """' (reason)' from a failed probe's JSON answer, else ''."""
    if status == 200:
        return ""
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return f" ({printable(str(reason), 200)})" if reason else ""


def doctor_data_dir(path):
    """(passed, text): the data dir's state: exists, writable, locked by a server, data size."""
    import fcntl
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return True, f"{path} (does not exist yet; serve creates it)"
    try:
        files = os.listdir(path)
        size = sum(os.path.getsize(os.path.join(path, n)) for n in files
                   if n == SNAPSHOT or JOURNAL_RE.match(n))
    except OSError as e:
        return False, f"{path} (cannot read: {e.strerror})"
    writable = os.access(path, os.W_OK)
    state = "writable" if writable else "NOT writable"
    lock = os.path.join(path, LOCK)
    if os.path.exists(lock):
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                state += ", in use by a running server"
    return writable, f"{path} ({state}, {size} bytes of snapshot and journal)"


def doctor_server(host, port):
    """(answered, the server's answer to `status` or why not, the HTTP port siteinfo advertises)."""
    async def probe():
        """Connect, ask `status` and `siteinfo`."""
        client = PhClient(host, port, timeout=2.0)
        try:
            await client.connect()
            code, text, _ = await client.command("status")
            _, _, site = await client.command("siteinfo")
            return code < 300, f"{code}:{text}", advertised_port(site)
        except PhError as e:
            return False, e.text, None
        finally:
            await client.close()
    return asyncio.run(probe())


def advertised_port(site):
    """The port of the `metrics` line of a siteinfo reply's data lines, else None."""
    for _, _, text in site:
        key, _, value = text.partition(":")
        if key == "metrics" and value.isdigit() and 0 < int(value) < 65536:
            return int(value)
    return None


PROGRAM_KIND = {"ph": PERSON, "mdb": MACHINE}
LOOKUP_VERBS = ("query", "show", "add", "change", "delete", "fields", "import", "export")
CONCURRENT_VERBS = frozenset(("import",))  # several connections at once: asyncio; others block
EXPORT_FORMATS = {PERSON: ("vcard", "csv", "json", "jsonl"),
                  MACHINE: ("ansible", "hosts", "dnsmasq", "prometheus-sd", "csv", "json", "jsonl")}
IMPORT_FORMATS = {PERSON: ("vcard", "csv", "json", "jsonl"), MACHINE: ("csv", "json", "jsonl")}
MACHINE_COLUMNS = ("hostname", "status", "ip", "role", "os", "owner", "location")
STATUS_COLOURS = {"online": "green", "offline": "red", "unknown": "yellow"}
COLOURS = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
IMPORT_WORKERS = 32             # connections an import writes on (their fsyncs are shared)
MAX_REASONS = 20                # rejected records an import names, one line each
MAX_CLIENT_CONFIG = 64 * 1024   # bytes of client.ini read
CARD_HIDES = frozenset(("type", "alias", "name", "hostname", "status", "source", "created",
                        "modified", "last_seen"))


def client_config_path():
    """The per-user client config: $XDG_CONFIG_HOME/pharos/client.ini (~/.config by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "pharos", "client.ini")


CLIENT_CONFIG_KEYS = ("server",)


def read_client_config(path):
    """The [client] settings of an INI file as {name: (value, line)} ({} when there is no
    file); UsageError naming the line that is not a [section], a comment or NAME = VALUE,
    or that repeats [client] or one of its names, or names an unknown setting."""
    try:
        with open(path, encoding="utf-8-sig") as f:     # an editor's BOM is no text
            text = f.read(MAX_CLIENT_CONFIG + 1)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(text) > MAX_CLIENT_CONFIG:
        raise UsageError(f"{path}: larger than {MAX_CLIENT_CONFIG} bytes")
    settings, section, seen = {}, None, set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        where, stripped = f"{path} line {lineno}", raw.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip().lower()
            if section == "client" and section in seen:
                raise UsageError(f"{where}: a second [client] section")
            seen.add(section)
            continue
        name, eq, value = stripped.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise UsageError(f"{where}: expected NAME = VALUE, [SECTION] or a # "
                             f"comment, not {printable(stripped, 40)!r}")
        if section == "client":
            check_client_setting(settings, name, where)
            settings[name] = (value.strip(), lineno)
    return settings


def check_client_setting(settings, name, where):
    """UsageError unless [client] may say ``name`` at ``where``: known, and said once."""
    if name not in CLIENT_CONFIG_KEYS:
        raise UsageError(f"{where}: unknown setting {printable(name, 40)!r} in [client]; "
                         f"known: {', '.join(CLIENT_CONFIG_KEYS)}")
    if name in settings:
        raise UsageError(f"{where}: {name} is set a second time (first on line "
                         f"{settings[name][1]})")


def colour_on(stream):
    """Whether to colour ``stream``: a terminal, NO_COLOR unset and TERM not dumb."""
    return (stream.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


def paint(text, style, on):
    """``text`` in an ANSI style when ``on``."""
    return f"\x1b[{COLOURS[style]}m{text}\x1b[0m" if on and style else text


def progress_text(done, total, elapsed, what, width=30):
    """One progress line: a bar when the total is known, and the rate."""
    rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 else ""
    if not total:
        return f"{done:,} {what} {rate}"
    filled = int(width * min(done, total) / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} {what} {rate}"


class ProgressBar:
    """Progress of long work on stderr, drawn only when stderr is a terminal."""

    def __init__(self, what, stream=None):
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty()
        self.what, self.done, self.total = what, 0, None
        self.started = self.drawn = time.monotonic()

    def advance(self, count):
        """Count ``count`` more done; redraw at most ten times a second."""
        self.done += count
        if self.on and time.monotonic() - self.drawn >= 0.1:
            self.draw()

    def draw(self):
        """Redraw the progress line in place."""
        self.drawn = time.monotonic()
        text = progress_text(self.done, self.total, self.drawn - self.started, self.what)
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()

    def finish(self):
        """Draw the final state and end the line (on a terminal only)."""
        if self.on:
            self.draw()
            self.stream.write("\n")


# -- ph and mdb: output ----------------------------------------------------------

def cell_text(value):
    """A value on one line of a table."""
    text = ", ".join(value) if type(value) is list else value or ""
    return text.replace("\n", " / ")


def format_card(record, names, colour):
    """A record as a card: a title line, then aligned label and value lines."""
    rtype, key = record.get("type"), record.get("alias") or record.get("hostname", "?")
    if rtype == MACHINE or "hostname" in record:
        status = record.get("status")
        title = paint(key, "bold", colour) + (
            f"  [{paint(status, STATUS_COLOURS.get(status), colour)}]" if status else "")
    else:
        name = record.get("name")
        title = (f"{paint(name, 'bold', colour)} ({key})" if name
                 else paint(key, "bold", colour))
    rows = [(n, record[n]) for n in names if record.get(n) and n != SOURCES_KEY]
    width, sources = max((len(n) for n, _ in rows), default=0), record_sources(record)
    out = [title]
    for name, value in rows:
        label = paint(name.rjust(width), "cyan", colour)
        mark = paint(f"  ({sources[name]})", "dim", colour) if name in sources else ""
        for n, item in enumerate(value if type(value) is list else value.split("\n")):
            out.append(f"  {label if n == 0 else ' ' * width}  {item}{mark if n == 0 else ''}")
    return out


def format_table(records, columns, colour):
    """Records as a table, one per row, with a header; status coloured."""
    cells = [[cell_text(r.get(c)) for c in columns] for r in records]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(paint(c.upper().ljust(w), "dim", colour)
                     for c, w in zip(columns, widths)).rstrip()]
    for row in cells:
        parts = []
        for column, text, width in zip(columns, row, widths):
            style = STATUS_COLOURS.get(text) if column == "status" else (
                "bold" if column == "hostname" else None)
            parts.append(paint(text.ljust(width), style, colour))
        out.append("  ".join(parts).rstrip())
    return out


def table_columns(records, wanted):
    """Machine table columns: the fields asked for, else the usual ones that hold a value."""
    if wanted:
        return ["hostname"] + [c for c in wanted if c != "hostname"]
    return [c for c in MACHINE_COLUMNS
            if c in ("hostname", "status") or any(r.get(c) for r in records)]


def format_records(records, wanted, mode, colour, full=False):
    """The lines that print ``records``: JSON, JSON lines, or people as cards and machines
    as a table (as cards too when ``full``)."""
    if wanted and mode != "human":
        records = [export_record(r, wanted) for r in records]
    if mode == "json":
        return [json.dumps(records, indent=2, ensure_ascii=False)]
    if mode == "jsonl":
        return [json.dumps(r, ensure_ascii=False) for r in records]
    out = []
    people = [r for r in records if r.get("type") != MACHINE and "hostname" not in r]
    machines = [r for r in records if r not in people]
    for record in people + (machines if full else []):
        names = wanted or [n for n in record if n != "type" and (full or n not in CARD_HIDES)]
        out += ([""] if out else []) + format_card(record, names, colour)
    if machines and not full:
        out += ([""] if out else []) + format_table(machines, table_columns(machines, wanted),
                                                   colour)
    return out


def output_mode(args):
    """json, jsonl or human, from --json and --jsonl."""
    return "json" if args.json else "jsonl" if args.jsonl else "human"


def field_list(text, schema):
    """The field names of --fields a,b (UsageError naming an unknown one)."""
    names = []
    for name in filter(None, (t.strip() for t in (text or "").split(","))):
        field = schema.field(name)
        if field is None:
            raise UsageError(f"--fields: unknown field {name!r} (see: fields)")
        names.append(field.name)
    return names


# -- ph and mdb: the verbs -------------------------------------------------------

def cmd_lookup(args):
    """ph / mdb: query (the default), show, add, change, delete, fields, import, export."""
    host, port = server_address(args)
    words = list(args.words)
    verb = words.pop(0) if words and words[0] in LOOKUP_VERBS else "query"
    if args.list or args.host:
        if args.command != "mdb":
            raise UsageError(f"{args.command}: --list and --host are for mdb (Ansible inventory)")
        verb, args.format = "export", "ansible"
    link = StreamLink if verb in CONCURRENT_VERBS else SocketLink
    return link.run(run_lookup(args, host, port, verb, words, link))


def login_name(args):
    """Who to log in as: --as, then $PHAROS_USER, then the login name."""
    import getpass
    try:
        return args.login_as or os.environ.get("PHAROS_USER") or getpass.getuser()
    except (KeyError, OSError):
        return None


async def run_lookup(args, host, port, verb, words, link):
    """Run one ph/mdb verb on its own connection (import: several) over ``link``."""
    client = PhClient(host, port, timeout=args.timeout, client_id=args.command,
                      user=login_name(args), key_path=args.key or os.environ.get("PHAROS_KEY"),
                      link=link)
    try:
        return await LOOKUP_HANDLERS[verb](client, args, PROGRAM_KIND[args.command], words)
    finally:
        await client.close()


async def cmd_query(client, args, rtype, words):
    """Look records up and print them; exit 1 when nothing matches."""
    schema = await client.load_schema()
    if not words:                       # everything of this type, page by page
        records = [r async for _, page in client.dump(f"type={rtype} return all sources")
                   for r in page]
        print_lines(format_records(records, field_list(args.fields, schema), output_mode(args),
                                   colour_on(sys.stdout)))
        return found_or_say(args, records)
    tail, wanted = request_from_args(words), field_list(args.fields, schema)
    tokens = tokenize(tail)
    cut = next((i for i, t in enumerate(tokens) if t.sep and t.value.lower() == "return"), None)
    if wanted and cut is not None:
        raise UsageError(f"{args.command}: say return or --fields, not both")
    if cut is not None and [t.value.lower() for t in tokens[cut + 1:]] != ["all"]:
        wanted = [t.value.lower() for t in tokens[cut + 1:]]
        if output_mode(args) == "human":
            tail += " alias name hostname status"
    elif cut is None:
        tail += " return all sources"
    records = await client.query(tail)
    print_lines(format_records(records, wanted, output_mode(args), colour_on(sys.stdout)))
    return found_or_say(args, records)


def found_or_say(args, records):
    """EXIT_OK when there are records, else "no match" on stderr and EXIT_NOMATCH: one
    behaviour for every verb, on a terminal or not."""
    if records:
        return EXIT_OK
    print(f"{args.command}: no match", file=sys.stderr)
    return EXIT_NOMATCH


async def cmd_show(client, args, rtype, words):
    """One record, every field, by its key."""
    if len(words) != 1:
        raise UsageError(f"{args.command}: show takes one {KEY_FIELD[rtype]}")
    await client.load_schema()
    records = await client.query(f"type={rtype} {KEY_FIELD[rtype]}={quote_value(words[0])} "
                                 f"return all sources")
    print_lines(format_records(records, field_list(args.fields, client.schema),
                               output_mode(args), colour_on(sys.stdout), full=True))
    return found_or_say(args, records)


def print_lines(lines):
    """Print each line to stdout."""
    for text in lines:
        print(text)


async def cmd_add(client, args, rtype, words):
    """Add one record from field=value words."""
    if not words:
        raise UsageError(f"{args.command}: add needs field=value words, e.g. "
                         f"{KEY_FIELD[rtype]}=...")
    print(await client.write(f"add {request_from_args(words)}"))
    return EXIT_OK


async def cmd_change(client, args, rtype, words):
    """Change the records a selection picks: change SELECTION make field=value ..."""
    lowered = [w.lower() for w in words]
    if "make" not in lowered or lowered.index("make") in (0, len(words) - 1):
        raise UsageError(f"{args.command}: change SELECTION make field=value ...")
    cut = lowered.index("make")
    if not await confirm_selection(client, args, "change", words[:cut]):
        return EXIT_NOMATCH
    print(await client.write(f"change {request_from_args(words)}"))
    return EXIT_OK


async def cmd_delete(client, args, rtype, words):
    """Delete the records a selection picks, asking first when more than one would go."""
    if not words:
        raise UsageError(f"{args.command}: delete SELECTION, e.g. delete "
                         f"{KEY_FIELD[rtype]}=...")
    if not await confirm_selection(client, args, "delete", words):
        return EXIT_NOMATCH
    print(await client.write(f"delete {request_from_args(words)}"))
    return EXIT_OK


async def confirm_selection(client, args, verb, words):
    """How many records ``words`` select, once the user agreed (on a terminal) when more
    than one would be touched; the session's limit is set to that count so the server
    refuses if more match by the time the write arrives. 0: no match, or declined."""
    total, keys = 0, []
    async for total, records in client.dump(f"{request_from_args(words)} return alias hostname"):
        keys = [r.get("alias") or r.get("hostname") for r in records]
        break
    if total == 0:
        print(f"{args.command}: no match", file=sys.stderr)
        return 0
    if total > 1 and not args.yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise UsageError(f"{args.command}: {verb} would touch {total} records; "
                             f"say --yes to go ahead")
        shown = ", ".join(keys[:8]) + (", ..." if total > 8 else "")
        sys.stderr.write(f"{verb.capitalize()} {total} records ({shown})? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            print(f"{args.command}: nothing done", file=sys.stderr)
            return 0
    code, text, body = await client.command(f"set limit={min(total, MAX_CHANGE_LIMIT)}")
    if code >= 300:
        raise reply_error(code, text, body, "set")
    return total


async def cmd_fields(client, args, rtype, words):
    """The fields of this program's record type (or the named ones) and what they hold."""
    schema = await client.load_schema()
    fields = [f for f in schema.all[rtype] if not words or f.name in words]
    for word in words:
        if schema.field(word) is None:
            raise UsageError(f"{args.command}: unknown field {word!r}")
    if args.json or args.jsonl:
        rows = [{"name": f.name, "max": f.max, "multi": f.multi, "server": f.server,
                 "description": f.desc.split(" (")[0] if f.id >= CUSTOM_FIELD_FIRST_ID
                 else f.desc} for f in fields]
        print_lines([json.dumps(rows, indent=2)] if args.json
                    else [json.dumps(r) for r in rows])
        return EXIT_OK
    width = max(len(f.name) for f in fields)
    for f in fields:
        notes = ", ".join(n for n, on in (("multi", f.multi), ("set by server", f.server)) if on)
        desc = f.desc if f.id < CUSTOM_FIELD_FIRST_ID else f.desc.split(" (")[0]
        print(f"{f.name:<{width}}  {desc}" + (f" [{notes}]" if notes else ""))
    return EXIT_OK


# -- ph and mdb: export -----------------------------------------------------------

class OutputFile:
    """Where an export goes: stdout, or a file put in place atomically when complete."""

    def __init__(self, path):
        self.path = None if path in (None, "-") else path
        self.tmp = self.f = None

    def __enter__(self):
        if self.path is None:
            sys.stdout.flush()
            self.f = sys.stdout.buffer
        else:
            self.tmp = f"{self.path}.tmp-{os.getpid()}"
            try:
                self.f = open(self.tmp, "wb")
            except OSError as e:
                raise UsageError(f"cannot write {self.path}: {e.strerror}") from None
        return self

    def write(self, text):
        """Write ``text`` as UTF-8 (nothing when it is empty)."""
        if text:
            self.f.write(text.encode())

    def __exit__(self, kind, value, tb):
        if self.path is None:
            self.f.flush()
            return
        self.f.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def make_exporter(fmt, schema, rtype, args):
    """The exporter for ``fmt`` with the command line's options."""
    names = field_list(args.fields, schema) or user_fields(schema, rtype)
    if fmt == "vcard":
        return VcardExporter([n for n in user_fields(schema, PERSON) if n not in VCARD_BUILTIN])
    if fmt == "csv":
        return CsvExporter(names)
    if fmt in ("json", "jsonl"):
        return (JsonExporter if fmt == "json" else JsonlExporter)(["type"] + names)
    if fmt == "prometheus-sd":
        return PrometheusSdExporter(args.port)
    if fmt == "ansible":
        return AnsibleExporter()
    return (HostsExporter if fmt == "hosts" else DnsmasqExporter)(args.domain)


async def cmd_export(client, args, rtype, words):
    """Stream every record of this type (or those a selection picks) in a format other
    tools read; constant memory, a page of records at a time."""
    fmt = args.format or "json"
    if fmt not in EXPORT_FORMATS[rtype]:
        raise UsageError(f"{args.command} export: --format must be one of "
                         f"{', '.join(EXPORT_FORMATS[rtype])}")
    schema = await client.load_schema()
    if args.host:
        found = await client.query(f"hostname={quote_value(args.host)} return all")
        print(json.dumps(ansible_hostvars(found[0]) if found else {}, ensure_ascii=False))
        return EXIT_OK
    exporter = make_exporter(fmt, schema, rtype, args)
    request = f"type={rtype} {request_from_args(words)}".strip() + " return all"
    if fmt == "vcard" and args.output and (os.path.isdir(args.output)
                                           or args.output.endswith(os.sep)):
        return await export_vdir(client, exporter, request, args.output)
    if args.output and args.output.endswith(os.sep):
        raise UsageError(f"{args.command} export: -o {args.output}: a directory takes one "
                         f"file per record, which only --format vcard writes")
    progress = ProgressBar("records")
    with OutputFile(args.output) as out:
        out.write(exporter.head())
        async for total, records in client.dump(request):
            progress.total = total
            out.write("".join(exporter.item(r) for r in records))
            progress.advance(len(records))
        out.write(exporter.tail())
    progress.finish()
    return EXIT_OK


async def export_vdir(client, exporter, request, directory):
    """vCards one per file (<alias>.vcf) in ``directory`` (made if missing): a vdir, as khard
    and vdirsyncer read."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make directory {directory}: {e.strerror}") from None
    progress = ProgressBar("cards")
    async for total, records in client.dump(request):
        progress.total = total
        for record in records:
            with OutputFile(os.path.join(directory, record["alias"] + ".vcf")) as out:
                out.write(exporter.item(record))
        progress.advance(len(records))
    progress.finish()
    return EXIT_OK


# -- ph and mdb: import -----------------------------------------------------------

class ImportTally:
    """What an import did: added, changed, unchanged and rejected, and the first reasons."""

    def __init__(self):
        self.counts = dict.fromkeys(("added", "changed", "unchanged", "rejected"), 0)
        self.reasons, self.shown = [], 0

    def count(self, kind):
        """Count one record as ``kind`` (added, changed or unchanged)."""
        self.counts[kind] += 1

    def reject(self, line, why):
        """Count a rejected record, keeping the first MAX_REASONS reasons."""
        self.counts["rejected"] += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append((line, why))

    def summary(self):
        """The counts on one line, e.g. added 3, changed 1, unchanged 0, rejected 0."""
        return ", ".join(f"{kind} {n:,}" for kind, n in self.counts.items())


def open_import(path):
    """A seekable text stream of an import file; stdin ('-') is spooled to a temp file."""
    import io
    import tempfile
    try:
        if path == "-":
            raw = tempfile.TemporaryFile()
            while True:
                data = sys.stdin.buffer.read(1 << 20)
                if not data:
                    break
                raw.write(data)
            raw.seek(0)
        else:
            raw = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def check_import(items, tally, progress):
    """Pass one: read every record, tally the refused ones; the count of good ones."""
    good = 0
    for line, record, why in items:
        if record is None:
            tally.reject(line, why)
        else:
            good += 1
        progress.advance(1)
    return good


async def cmd_import(client, args, rtype, words):
    """Add and update records from a file: checked whole first, then written (so a bad file
    writes nothing unless --keep-going), idempotent, with a summary."""
    if len(words) != 1:
        raise UsageError(f"{args.command} import FILE (- for stdin): say one file")
    path, schema = words[0], await client.load_schema()
    with open_import(path) as source:
        try:
            fmt = args.format or guess_format(path, source.read(4096))
            source.seek(0)
            if fmt not in IMPORT_FORMATS[rtype]:
                raise UsageError(f"{args.command} import: the format must be one of "
                                 f"{', '.join(IMPORT_FORMATS[rtype])}, not {fmt}")
            parse, tally = IMPORT_PARSERS[fmt], ImportTally()
            checking = ProgressBar("records checked")
            good = check_import(import_items(parse, source, schema, rtype), tally, checking)
            checking.finish()
            report_rejects(args, path, tally)
            refused = tally.counts["rejected"]
            if refused and not args.keep_going:
                raise UsageError(f"{args.command} import: {path}: "
                                 f"{plural(refused, 'record', 'records')} refused; nothing was "
                                 f"imported (--keep-going imports the others)")
            source.seek(0)
            writing = ProgressBar("records imported")
            writing.total = good
            items = import_items(parse, source, schema, rtype)
            await write_import(client, rtype, ((n, r) for n, r, _ in items if r), tally, writing)
            writing.finish()
        except FormatError as e:
            raise UsageError(f"{args.command} import: {path} {e}; nothing was imported") from None
        except UnicodeDecodeError:
            raise UsageError(f"{args.command} import: {path} is not UTF-8 text; nothing was "
                             f"imported") from None
    report_rejects(args, path, tally)
    print(tally.summary())
    if tally.counts["rejected"] > refused:
        return EXIT_FAIL
    return EXIT_USAGE if refused else EXIT_OK


def report_rejects(args, path, tally):
    """One stderr line per refused record not yet named (at most MAX_REASONS in all)."""
    for line, why in tally.reasons[tally.shown:]:
        print(f"{args.command} import: {path} line {line}: {why}", file=sys.stderr)
    tally.shown = len(tally.reasons)


async def write_import(first, rtype, items, tally, progress):
    """Pass two: each record looked up by key and added, changed or left alone, over
    IMPORT_WORKERS connections with pipelined requests."""
    batches = batched(items, PIPELINE_DEPTH // 2)
    await first.login_first("add")      # once here, so a missing key is one clear error
    clients = [first] + [first.sibling() for _ in range(IMPORT_WORKERS - 1)]

    async def worker(client):
        """Import batches from the shared iterator on ``client`` until none are left."""
        for batch in batches:
            await import_batch(client, rtype, batch, tally)
            progress.advance(len(batch))
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for client in clients[1:]:
            await client.close()


def batched(items, size):
    """Lists of up to ``size`` items from an iterator."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


async def import_batch(client, rtype, batch, tally):
    """Look a batch of records up by key, then send the adds and changes they need."""
    keyname = KEY_FIELD[rtype]
    found = await client.pipeline([f"query type={rtype} {keyname}={quote_value(r[keyname])} "
                                   f"return all" for _, r in batch])
    plans = []
    for (line, wanted), (code, text, body) in zip(batch, found):
        if code >= 300 and code != 501:
            tally.reject(line, reply_error(code, text, body).text)
            continue
        old = records_from_reply(body, client.multi)[0] if code < 300 else None
        changes = record_changes(old or {}, wanted)
        if old is not None and not changes:
            tally.count("unchanged")
            continue
        plans.append((line, "changed" if old else "added",
                      write_requests(rtype, wanted[keyname], changes, old is None)))
    replies = iter(await client.write_many([r for _, _, requests in plans for r in requests]))
    for line, kind, requests in plans:
        refused = [reply for reply in (next(replies) for _ in requests) if reply[0] >= 300]
        if refused:
            tally.reject(line, reply_error(*refused[0]).text)
        else:
            tally.count(kind)


LOOKUP_HANDLERS = {"query": cmd_query, "show": cmd_show, "add": cmd_add, "change": cmd_change,
                   "delete": cmd_delete, "fields": cmd_fields, "import": cmd_import,
                   "export": cmd_export}


def build_parser(command=None):
    """The argument parser: serve, load, doctor, keys, tokens, mcp, scan, ph and mdb; with
    ``command``, only that one's (each start builds just what it runs: a `ph` lookup
    would otherwise pay for every command's options)."""
    ArgParser = arg_parser_class()
    parser = ArgParser(prog="pharos", description="A directory of people and machines "
                                                  "that speaks CCSO Ph (RFC 2378).")
    parser.add_argument("--version", action="version", version=f"pharos {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgParser)
    for name, add in command_parsers().items():
        if command is None or name == command:
            add(commands)
    return parser


def command_parsers():
    """{command: the function adding its parser}, in the order --help lists them."""
    lookups = {name: functools.partial(add_lookup_parser, name=name, rtype=rtype)
               for name, rtype in PROGRAM_KIND.items()}
    planned = {name: functools.partial(add_planned_parser, name=name)
               for name in ("pulse", "console")}
    return {"serve": add_serve_parser, "load": add_load_parser, "doctor": add_doctor_parser,
            "keys": add_keys_parser, "tokens": add_tokens_parser, "mcp": add_mcp_parser,
            "scan": add_scan_parser, **planned, **lookups}


def add_planned_parser(commands, name):
    """The parser of a command still to come: it says so."""
    planned = commands.add_parser(name, help="(not in this version yet)")
    planned.add_argument("--version", action="version", version=f"pharos {__version__}")


def add_serve_parser(commands):
    """The parser of serve."""
    data_default = os.environ.get("PHAROS_DATA", "./pharos-data")
    serve_p = commands.add_parser("serve", help="run the server")
    serve_p.add_argument("--listen", metavar="HOST:PORT",
                         help="Ph address (default 0.0.0.0:2378; 127.0.0.1:2378 in the dev tier)")
    serve_p.add_argument("--storage", type=storage_kind, default="file",
                         metavar="memory|file|ldap://HOST[:PORT]/BASE-DN",
                         help="where records live (default file; also ldaps:// and ldapi://)")
    serve_p.add_argument("--ldap-bind-dn", metavar="DN",
                         help="bind as DN (password from --ldap-password-file or "
                              "$PHAROS_LDAP_PASSWORD); without it: SASL EXTERNAL on ldapi://, "
                              "else anonymous")
    serve_p.add_argument("--ldap-password-file", metavar="FILE",
                         help="file holding the bind password")
    serve_p.add_argument("--ldap-sync", choices=("auto", "poll"), default="auto",
                         help="follow the directory's changes through Content Sync (RFC "
                              "4533) when it offers it (auto), or poll for them")
    serve_p.add_argument("--ldap-keys", action="store_true",
                         help="also log in the directory's OpenSSH-LPK sshPublicKey values, "
                              "each as its entry's uid (role from the groups below, else "
                              "reader; tenant from where the entry lives)")
    serve_p.add_argument("--ldap-admin-group", type=ldap_dn_arg, metavar="DN",
                         help="with --ldap-keys: this group's members (member, uniqueMember "
                              "or memberUid) log in as admin")
    serve_p.add_argument("--ldap-writer-group", type=ldap_dn_arg, metavar="DN",
                         help="with --ldap-keys: this group's members log in as writer")
    serve_p.add_argument("--data", default=data_default, metavar="DIR",
                         help="data dir (default ./pharos-data or $PHAROS_DATA)")
    serve_p.add_argument("--tier", choices=TIERS, default="lab",
                         help="dev: anyone writes, loopback only; lab (default): reads are "
                              "open, writes need an SSH key; enterprise: everything needs a key")
    serve_p.add_argument("--config", metavar="FILE", help="custom fields (default DATA/pharos.ini)")
    serve_p.add_argument("--metrics", metavar="HOST:PORT|off",
                         help="metrics and health over HTTP (default: the Ph host, port 9090)")
    serve_p.add_argument("--mcp", choices=("on", "off"), default="on",
                         help="serve MCP for AI agents at /mcp on the HTTP listener (default on)")
    serve_p.add_argument("--mcp-origin", action="append", metavar="ORIGIN",
                         help="a browser Origin /mcp accepts besides its own, and the host "
                              "name in it as a Host (repeatable)")
    serve_p.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS)
    serve_p.add_argument("--idle-timeout", type=positive_float, default=DEFAULT_IDLE_TIMEOUT,
                         metavar="SECONDS")
    serve_p.add_argument("--max-results", type=positive_int, default=DEFAULT_MAX_RESULTS)
    serve_p.add_argument("--compact-bytes", type=positive_int, default=DEFAULT_COMPACT_BYTES,
                         help="journal size that triggers a snapshot")
    serve_p.add_argument("--crlf", action="store_true", help="end reply lines with CRLF")
    serve_p.add_argument("--busy-poll", type=busy_poll_us, default=DEFAULT_BUSY_POLL_US,
                         metavar="MICROSECONDS", help="after a request, look for the next "
                         f"one this long before sleeping (default {DEFAULT_BUSY_POLL_US}; "
                         "0: off)")
    serve_p.add_argument("--login-delay", type=positive_float, default=LOGIN_FAIL_DELAY,
                         metavar="SECONDS", help="wait before answering a failed login; it "
                         "grows with each failure from the same address (default 1)")
    serve_p.add_argument("--crypto", choices=("auto", "pure"), default="auto",
                         help="auto: verify signatures with asyncssh when it is installed")
    serve_p.add_argument("--admin", default="root@localhost", type=site_value,
                         help="administrator address shown by siteinfo")


def add_load_parser(commands):
    """The parser of load."""
    data_default = os.environ.get("PHAROS_DATA", "./pharos-data")
    load_p = commands.add_parser("load", help="bulk-load a JSONL file into a stopped data dir")
    load_p.add_argument("file", help="JSONL file, one record object per line ('-': stdin)")
    load_p.add_argument("--data", default=data_default, metavar="DIR")
    load_p.add_argument("--config", metavar="FILE")


def add_doctor_parser(commands):
    """The parser of doctor."""
    data_default = os.environ.get("PHAROS_DATA", "./pharos-data")
    doctor_p = commands.add_parser("doctor", help="check the installation")
    doctor_p.add_argument("--data", default=data_default, metavar="DIR")
    doctor_p.add_argument("--server", metavar="HOST[:PORT]")
    doctor_p.add_argument("--metrics", metavar="HOST[:PORT]|off",
                          help="the HTTP listener to check (default: the one the server "
                               f"advertises, else port {METRICS_PORT} on the server's host)")


def add_keys_parser(commands):
    """The parser of keys."""
    keys_p = commands.add_parser("keys", help="list, add or remove authorized SSH keys")
    keys_p.add_argument("words", nargs="*", metavar="list|add|remove ARG",
                        help="add USER KEY (a .pub file, - or the key text); "
                             "remove FINGERPRINT|USER; list (the default)")
    keys_p.add_argument("--role", choices=ROLES, default="writer", help="add: the key's role")
    keys_p.add_argument("--tenant", help="add: the key's tenant (enterprise tier; * for all)")
    keys_p.add_argument("--data", metavar="DIR",
                        help="edit DIR/authorized_keys (made if missing), never a server's; "
                             "without --data or --server: ./pharos-data or $PHAROS_DATA when "
                             "it has one")
    keys_p.add_argument("--server", metavar="HOST[:PORT]", help="manage a server's keys remotely")
    keys_p.add_argument("--as", dest="login_as", metavar="USER")
    keys_p.add_argument("--key", metavar="FILE")
    keys_p.add_argument("--timeout", type=positive_float, default=10.0, metavar="SECONDS")


def add_tokens_parser(commands):
    """The parser of tokens."""
    data_default = os.environ.get("PHAROS_DATA", "./pharos-data")
    tokens_p = commands.add_parser("tokens", help="list, add or remove bearer tokens (MCP)")
    tokens_p.add_argument("words", nargs="*", metavar="list|add|remove NAME",
                          help="add NAME; remove NAME; list (the default)")
    tokens_p.add_argument("--role", choices=ROLES, default="reader",
                          help="add: the token's role (default reader)")
    tokens_p.add_argument("--tenant", default="", help="add: the token's tenant (enterprise; * for all)")
    tokens_p.add_argument("--ttl", metavar="DURATION", help="add: expire after 90d, 12h, 30m …")
    tokens_p.add_argument("--data", default=data_default, metavar="DIR",
                          help="the server's data dir (default ./pharos-data or $PHAROS_DATA)")


def add_mcp_parser(commands):
    """The parser of mcp."""
    mcp_p = commands.add_parser("mcp", help="MCP over stdio for a local AI agent")
    mcp_p.add_argument("--server", metavar="HOST[:PORT]")
    mcp_p.add_argument("--as", dest="login_as", metavar="USER")
    mcp_p.add_argument("--key", metavar="FILE")
    mcp_p.add_argument("--timeout", type=positive_float, default=10.0, metavar="SECONDS")


def add_scan_parser(commands):
    """The parser of scan."""
    p = commands.add_parser("scan", help="discover machines: TCP probes, banners, MACs")
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="a CIDR (192.168.1.0/24), a range (10.0.0.10-50), an address or a "
                        "host name (default: the local IPv4 subnets)")
    p.add_argument("--version", action="version", version=f"pharos {__version__}")
    p.add_argument("--ports", default="top100", metavar="LIST",
                   help="ports and ranges (22,80,8000-8100), top100 (the default) or all")
    p.add_argument("--concurrency", type=positive_int, metavar="N",
                   help=f"probes in flight (default {SCAN_CONCURRENCY}, or what the open-files "
                        "limit allows)")
    p.add_argument("--timeout", type=positive_float, default=SCAN_TIMEOUT, metavar="SECONDS",
                   help=f"for each probe and banner read (default {SCAN_TIMEOUT:g})")
    p.add_argument("-n", dest="no_dns", action="store_true", help="no reverse DNS")
    p.add_argument("--no-mdns", action="store_true", help="do not browse mDNS")
    p.add_argument("--mdns-seconds", type=positive_float, default=MDNS_SECONDS,
                   metavar="SECONDS", help=f"how long to browse mDNS (default {MDNS_SECONDS:g})")
    p.add_argument("--no-arp", action="store_true", help="do not read the neighbour table")
    p.add_argument("--force", action="store_true",
                   help="allow more than a /16 (up to a /8)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what was found and what merging it would do; write nothing")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON document")
    out.add_argument("--jsonl", action="store_true", help="print one JSON object per line")
    p.add_argument("--server", metavar="HOST[:PORT]",
                   help="the server to merge into (default as for mdb)")
    p.add_argument("--as", dest="login_as", metavar="USER",
                   help="log in as USER (default $PHAROS_USER, your name)")
    p.add_argument("--key", metavar="FILE", help="SSH key to sign the login with (as for mdb)")


def add_lookup_parser(commands, name, rtype):
    """The parser of ph (people) or mdb (machines)."""
    what = "people" if rtype == PERSON else "machines"
    p = commands.add_parser(name, help=f"look up, edit, import and export {what}")
    p.add_argument("words", nargs="*", metavar="[VERB] WORD",
                   help=f"[{'|'.join(LOOKUP_VERBS)}] field=value ... (query is the default)")
    p.add_argument("--version", action="version", version=f"pharos {__version__}")
    p.add_argument("--server", metavar="HOST[:PORT]",
                   help="default $PHAROS_SERVER, then server= in ~/.config/pharos/client.ini")
    p.add_argument("--timeout", type=positive_float, default=10.0, metavar="SECONDS")
    p.add_argument("--as", dest="login_as", metavar="USER",
                   help="log in as USER when a write needs it (default $PHAROS_USER, your name)")
    p.add_argument("--key", metavar="FILE", help="SSH key to sign the login with (default "
                   "$PHAROS_KEY, then ssh-agent's keys, then ~/.ssh/id_*)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON document")
    out.add_argument("--jsonl", action="store_true", help="print one JSON object per line")
    p.add_argument("--fields", metavar="A,B", help="only these fields")
    p.add_argument("--yes", action="store_true",
                   help="change or delete several records without asking")
    p.add_argument("--format", metavar="FORMAT", help="export/import: " + (
        "|".join(EXPORT_FORMATS[rtype])) + " (import guesses from the file)")
    p.add_argument("-o", "--output", metavar="FILE", help="export: write FILE (atomically)"
                   + (", or one .vcf per person into a directory" if rtype == PERSON else ""))
    p.add_argument("--keep-going", action="store_true",
                   help="import: import the good records even if some are refused")
    if rtype == MACHINE:
        p.add_argument("--domain", help="hosts/dnsmasq export: add NAME.DOMAIN names")
        p.add_argument("--port", type=positive_int, default=9100,
                       help="prometheus-sd export: the port of each target (default 9100)")
        p.add_argument("--list", action="store_true",
                       help="Ansible inventory script: the whole inventory")
        p.add_argument("--host", metavar="NAME",
                       help="Ansible inventory script: one host's variables")
    p.set_defaults(list=False, host=None, domain=None, port=9100)


def storage_kind(text):
    """An argparse type: memory, file or an ldap://, ldaps:// or ldapi:// URL."""
    if text in ("memory", "file"):
        return text
    try:
        parse_ldap_url(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def ldap_dn_arg(text):
    """An argparse type: a DN of attr=value RDNs, printable, at most 1024 characters."""
    if not (0 < len(text) <= 1024 and text.isprintable()) or not all(
            attr for attr, _ in split_dn(text)):
        raise argparse.ArgumentTypeError(f"{printable(text, 80)!r} is not a DN "
                                         f"(attr=value,attr=value...)")
    return text


def positive_int(text):
    """An argparse type: a whole number of 1 or more."""
    number = parse_count(text, 1, sys.maxsize)
    if number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return number


def busy_poll_us(text):
    """An argparse type: a whole number of microseconds, 0 to MAX_BUSY_POLL_US."""
    number = parse_count(text, 0, MAX_BUSY_POLL_US)
    if number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of microseconds "
                                         f"from 0 to {MAX_BUSY_POLL_US}")
    return number


DECIMAL_RE = LazyRegex(r"(?=.{1,20}\Z)(?:[0-9]+\.?[0-9]*|\.[0-9]+)\Z")


def positive_float(text):
    """An argparse type: a number greater than 0, in ASCII digits with an optional point."""
    value = float(text) if DECIMAL_RE.match(text) else -1
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def site_value(text):
    """An argparse type: a siteinfo value, without ':' or line breaks."""
    if ":" in text or "\n" in text:
        raise argparse.ArgumentTypeError("may not contain ':' or line breaks")
    return text


def cmd_tokens(args):
    """List, add or remove the bearer tokens in DATA/tokens (agents' identities for /mcp)."""
    action, what = (args.words[0], args.words[1:]) if args.words else ("list", [])
    if action not in ("list", "add", "remove") or (action != "list") != (len(what) == 1):
        raise UsageError("tokens: say list, add NAME or remove NAME")
    if args.tenant and not TENANT_RE.match(args.tenant):
        raise UsageError(f"tokens: --tenant {printable(args.tenant, 40)!r} is not a tenant name")
    ttl = None if args.ttl is None else parse_duration(args.ttl)
    if args.ttl is not None and not ttl:
        raise UsageError(f"tokens: --ttl {printable(args.ttl, 20)!r}: say 90d, 12h, 30m or seconds")
    tokens = TokenFile(os.path.join(args.data, TOKENS_FILE))
    now = time.time()
    if action == "add":
        secret, entry = tokens.add(what[0], args.role, args.tenant, ttl, now)
        print(secret)
        log_to_stderr(f"token {entry['name']} ({entry['role']}"
                      + (f", tenant {entry['tenant']}" if entry["tenant"] else "")
                      + ("" if ttl is None else f", expires {utc_now(entry['expires'])}")
                      + "): shown once; the server keeps only its hash")
        return EXIT_OK
    if action == "remove":
        if not tokens.remove(what[0]):
            print(f"pharos: no token called {printable(what[0], 64)}", file=sys.stderr)
            return EXIT_NOMATCH
        return EXIT_OK
    entries = tokens.read()
    if not entries:
        print("pharos: no tokens", file=sys.stderr)
        return EXIT_NOMATCH
    for entry in entries.values():
        expires = "never" if entry.get("expires") is None else utc_now(entry["expires"])
        print(f"{entry['name']}\t{entry['role']}\t{entry['tenant'] or '-'}\texpires {expires}")
    return EXIT_OK


def cmd_mcp(args):
    """Serve MCP over stdio to a local agent, on a server reached over Ph with the user's key."""
    host, port = server_address(args)
    return asyncio.run(run_mcp_stdio(args, host, port))


async def run_mcp_stdio(args, host, port):
    """The stdio MCP loop; the tools run on a RemoteService over one PhClient."""
    client = PhClient(host, port, timeout=args.timeout, client_id="mcp", user=login_name(args),
                      key_path=args.key or os.environ.get("PHAROS_KEY"))
    try:
        try:
            schema = await client.load_schema()
        except PhError as e:
            log_to_stderr(f"mcp: {e.text}; the tools will say so until it answers")
            schema = Schema()
        mcp = McpServer(RemoteService(client), schema, log_to_stderr)
        loop = asyncio.get_running_loop()

        def send(data):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        await mcp_stdio(mcp, lambda: loop.run_in_executor(None, read_message_line,
                                                          sys.stdin.buffer), send, log_to_stderr)
    finally:
        await client.close()
    return EXIT_OK


def read_message_line(stream):
    """One line of ``stream`` up to MCP_MAX_BODY bytes; a longer one is read past and given
    as MCP_MAX_BODY + 1 bytes, so it is refused as too large, not split into two."""
    raw = stream.readline(MCP_MAX_BODY + 1)
    if len(raw) > MCP_MAX_BODY and not raw.endswith(b"\n"):
        while True:
            more_bytes = stream.readline(1 << 16)
            if not more_bytes or more_bytes.endswith(b"\n"):
                break
    return raw


def cmd_keys(args):
    """List, add or remove authorized SSH keys: in DATA/authorized_keys, or on a server."""
    action, args.what = (args.words[0], args.words[1:]) if args.words else ("list", [])
    if action not in ("list", "add", "remove"):
        raise UsageError(f"keys: say list, add or remove, not {action!r}")
    if action in ("add", "remove") and not args.what:
        raise UsageError(f"keys {action}: say " + ("USER KEY (a .pub file, - or the key text)"
                                                   if action == "add" else "FINGERPRINT|USER"))
    if args.data is not None and args.server:
        raise UsageError("keys: --data edits a local key list and --server a server's; say one")
    line_text = key_line_from_args(args) if action == "add" else None
    local = local_keys_path(args)
    if local:
        return keys_local(KeyFile(local, log_to_stderr, fast=False), action, line_text, args)
    host, port = server_address(args)
    return asyncio.run(keys_remote(args, host, port, action, line_text))


def local_keys_path(args):
    """DATA/authorized_keys when `keys` edits the local file, else None (the network):
    always with --data (made if missing), else when no server is named and the default
    data dir has one."""
    if args.data is not None:
        return os.path.join(args.data, KEYS_FILE)
    if args.server or os.environ.get("PHAROS_SERVER"):
        return None
    path = os.path.join(os.environ.get("PHAROS_DATA", "./pharos-data"), KEYS_FILE)
    return path if os.path.exists(path) else None


def key_line_from_args(args):
    """An allowed_signers line from `keys add USER KEY [--role R] [--tenant T]`."""
    if len(args.what) != 2:
        raise UsageError("keys add: say USER KEY (a .pub file, - for stdin, or the key text)")
    user, key = args.what
    if key == "-":
        key = sys.stdin.readline()
    elif os.path.exists(key) or " " not in key.strip():     # key text is "TYPE BASE64 ..."
        key = read_key_file(key)
    options = [f'role="{args.role}"'] + ([f'tenant="{args.tenant}"'] if args.tenant else [])
    text = f"{user} {','.join(options)} {key.strip()}"
    try:
        parse_key_line(text)
    except SSHFormatError as e:
        raise UsageError(f"keys add: {e}") from None
    return text


def read_key_file(path):
    """The first line of a public key file; UsageError saying why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline(MAX_KEYS_FILE)
    except OSError as e:
        raise UsageError(f"keys add: {path}: {e.strerror.lower()}") from None
    except UnicodeDecodeError:
        raise UsageError(f"keys add: {path} is not a public key file (not UTF-8 text)") from None


def keys_local(keyfile, action, line_text, args):
    """Edit the key list file beside the data dir (a running server reloads it)."""
    ring = keyfile.reload()
    if action == "list":
        if not ring.entries:
            print(f"keys: no keys in {keyfile.path}", file=sys.stderr)
            return EXIT_NOMATCH
        print_key_table([(e.principals, e.role, e.tenant, f"{e.key.keytype} {e.key.fingerprint}",
                          e.comment) for e in ring.entries])
        return EXIT_OK
    which = args.what[0] if action == "remove" else None
    try:
        status, text = keyfile.edit(lambda ring: local_change(ring, action, line_text, which))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"keys {action}: cannot edit {keyfile.path}: "
                        f"{getattr(e, 'strerror', None) or e}") from None
    print(f"{text} {keyfile.path}" if status == EXIT_OK else f"keys: {text}",
          file=sys.stdout if status == EXIT_OK else sys.stderr)
    return status


def local_change(ring, action, line_text, which):
    """(new lines, (exit status, what to say)) for `keys add|remove` on ``ring``, the
    file as read under its lock."""
    if action == "add":
        return ring.lines + [line_text], (EXIT_OK, "added to")
    gone = {e.lineno for e in ring.entries if which in (e.key.fingerprint, e.principals)}
    if not gone:
        return None, (EXIT_NOMATCH, f"no key matches {which}")
    kept = [t for n, t in enumerate(ring.lines, 1) if n not in gone]
    return kept, (EXIT_OK, f"removed {plural(len(gone), 'key', 'keys')} from")


async def keys_remote(args, host, port, action, line_text):
    """The same over the Ph port, with the `keys` extension (admin keys only)."""
    client = PhClient(host, port, timeout=args.timeout, user=login_name(args),
                      key_path=args.key or os.environ.get("PHAROS_KEY"))
    request = {"list": "keys list", "add": f"keys add {line_text}",
               "remove": f"keys remove {args.what[0] if args.what else ''}"}[action]
    try:
        code, text, body = await client.read_command(request)
    finally:
        await client.close()
    if code == 501:
        print(f"keys: {text}", file=sys.stderr)
        return EXIT_NOMATCH
    if code >= 300:
        raise reply_error(code, text, body, "keys")
    if action != "list":
        print(text)
        return EXIT_OK
    rows = records_from_reply(body, frozenset())
    print_key_table([(r.get("user", ""), r.get("role", ""), r.get("tenant", ""), r.get("key", ""),
                      r.get("comment", "")) for r in rows])
    return EXIT_OK


def print_key_table(rows):
    """Print key rows in aligned columns under a header, the comment last."""
    header = ("USER", "ROLE", "TENANT", "KEY", "COMMENT")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) + "  " + row[4])


SCAN_COLUMNS = ("hostname", "ip", "mac", "vendor", "model", "services")


def cmd_scan(args):
    """scan: find machines by TCP probes, banners and the neighbour table; print them and
    merge each into the server (with --dry-run, say what a merge would do)."""
    ports = parse_ports(args.ports)
    targets = parse_targets(args.targets, args.force) if args.targets else None
    host, port = server_address(args)
    pairs = resolve_targets(targets or local_targets(args.force))
    zeroconf = scan_zeroconf(args)
    bar = ProgressBar("probes")
    bar.total = len(pairs) * len(ports)
    found = run_scan(pairs, ports, scan_concurrency(args.concurrency), args.timeout,
                     bar.advance, arp=not args.no_arp, rdns=not args.no_dns,
                     mdns=zeroconf and (zeroconf, args.mdns_seconds),
                     note=lambda text: log_to_stderr(f"scan: {text}"))
    bar.finish()
    records, mode = scan_records(found), output_mode(args)
    if mode != "human":
        print_lines(format_records(records, None, mode, False))
    elif records:
        columns = [c for c in SCAN_COLUMNS if c == "hostname" or any(r.get(c) for r in records)]
        print_lines(format_table(records, columns, colour_on(sys.stdout)))
    else:
        print("scan: no machines found", file=sys.stderr)
    if not records:
        return EXIT_NOMATCH
    return asyncio.run(scan_merge(args, host, port, records))


SCAN_OUTCOMES = (("1 entry added.", "added"), ("1 entry would be added.", "added"),
                 ("No change.", "unchanged"))


def merge_request(record, dry_run):
    """The `merge source=scan` request line of one scanned machine record."""
    words = ["merge source=scan"] + (["dry_run"] if dry_run else [])
    for name, value in record.items():
        if name != "type":
            words += [f"{name}={quote_value(v)}" for v in (value if type(value) is list
                                                            else [value])]
    return " ".join(words)


def merge_outcome(text):
    """added, changed or unchanged, from a merge reply's final text."""
    return next((kind for said, kind in SCAN_OUTCOMES if text == said), "changed")


async def scan_merge(args, host, port, records):
    """Send each record as a merge (dry_run with --dry-run), logged in as ph and mdb are;
    one line per machine for a dry run, then the summary, on stderr."""
    client = PhClient(host, port, timeout=max(args.timeout, 10.0), client_id="mdb",
                      user=login_name(args), key_path=args.key or os.environ.get("PHAROS_KEY"))
    try:
        replies = await client.write_many([merge_request(r, args.dry_run) for r in records])
    except PhError as e:
        if args.dry_run:
            log_to_stderr(f"scan: could not compare with the server: {e.text}")
            return EXIT_OK
        log_to_stderr(f"scan: {e.text}")
        return EXIT_FAIL
    finally:
        await client.close()
    return scan_summary(args, records, replies)


def scan_summary(args, records, replies):
    """Say how each merge went (refusals one line each) and the counts; the exit status."""
    counts = {"added": 0, "changed": 0, "unchanged": 0}
    refused = 0
    for record, (code, text, body) in zip(records, replies):
        if code >= 300:
            refused += 1
            log_to_stderr(f"scan: {record['hostname']}: {reply_error(code, text, body).text}")
            continue
        counts[merge_outcome(text)] += 1
        if args.dry_run:
            log_to_stderr(f"scan: {record['hostname']}: {text[:1].lower()}{text[1:]}")
    verbs = (("would be added", "would change", "would stay as they are") if args.dry_run
             else ("added", "changed", "left alone"))
    summary = ", ".join(f"{counts[kind]} {verb}" for kind, verb in zip(counts, verbs))
    log_to_stderr(f"scan: {summary}" + (f", {refused} refused" if refused else ""))
    return EXIT_FAIL if refused else EXIT_OK


def local_targets(force):
    """The targets of a scan without TARGET: the local IPv4 subnets, said on stderr."""
    networks, notes = local_networks(interface_addresses(), force)
    for note in notes:
        log_to_stderr(f"scan: {note}")
    if not networks:
        raise UsageError("scan: this machine has no IPv4 subnet to scan; name a TARGET")
    log_to_stderr("scan: scanning the local subnets " + ", ".join(
        f"{net} ({name})" for name, net in networks))
    return parse_targets([str(net) for _, net in networks], force)


def scan_zeroconf(args):
    """The zeroconf module to browse mDNS with; None with --no-mdns, or when it is not
    installed (said in one line on stderr)."""
    if args.mdns_seconds > MDNS_MAX_SECONDS:
        raise UsageError(f"scan: --mdns-seconds {args.mdns_seconds:g} is more than "
                         f"{MDNS_MAX_SECONDS:g}")
    if args.no_mdns:
        return None
    try:
        return optional_import("zeroconf")
    except UsageError:
        log_to_stderr("scan: mDNS skipped (pip install zeroconf adds it)")
        return None


def scan_concurrency(wanted):
    """Probes in flight: --concurrency or the default, never past the open-files limit."""
    allowed = raise_fd_limit(wanted or SCAN_CONCURRENCY, lambda message: None)
    if wanted and allowed < wanted:
        log_to_stderr(f"scan: --concurrency {wanted} is more than the open-files limit "
                      f"allows; using {allowed}")
    return allowed


def cmd_planned(args):
    """pulse and console: named by the design, not built into this version yet."""
    raise UsageError(f"{args.command} is not in pharos {__version__} yet")


HANDLERS = {"serve": cmd_serve, "load": cmd_load, "doctor": cmd_doctor, "keys": cmd_keys,
            "tokens": cmd_tokens, "mcp": cmd_mcp,
            "scan": cmd_scan, "pulse": cmd_planned, "console": cmd_planned,
            "ph": cmd_lookup, "mdb": cmd_lookup}
PROGRAM_NAMES = {"ph": "ph", "mdb": "mdb", "pharos-scan": "scan", "pharos-pulse": "pulse",
                 "pharos-console": "console"}


def parse_command_line(argv):
    """Parsed arguments; words after an option still count (`keys add --data D USER KEY`)."""
    named = argv[0] if argv and argv[0] in command_parsers() else None
    parser = build_parser(named)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "words") or any(x.startswith("-") and x != "-" for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.words = list(args.words) + extra
    return args


EXIT_PIPE = 141                     # 128 + SIGPIPE, as a shell reports a closed pipe


class GuardedStream:
    """A command's stdout (or its buffer): a failed write or flush raises OutputError, so
    main() can tell it from the other OSErrors a command meets."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data):
        """Write ``data``; OutputError if the stream fails."""
        return self.guarded(self.stream.write, data)

    def flush(self):
        """Flush; OutputError if the stream fails."""
        return self.guarded(self.stream.flush)

    @property
    def buffer(self):
        """The binary stream below, guarded the same way."""
        return GuardedStream(self.stream.buffer)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    @staticmethod
    def guarded(call, *args):
        """call(*args), with an OSError turned into OutputError."""
        try:
            return call(*args)
        except OSError as e:
            raise OutputError(e) from None


def output_failed(error, stdout):
    """The exit status once stdout failed: quiet for a closed pipe, one line otherwise.

    stdout then points at /dev/null, so the interpreter's last flush of what is still
    buffered cannot fail again and print a complaint of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass                            # not a real file (a test's capture): nothing to flush
    if isinstance(error, BrokenPipeError):
        return EXIT_PIPE
    print(f"pharos: cannot write output: {error.strerror or error}", file=sys.stderr)
    return EXIT_FAIL


def main(argv=None):
    """Run one command; return the exit status (0 ok, 1 no match, 2 usage, 3 failure,
    141 stdout's reader went away)."""
    if argv is None:
        argv = sys.argv[1:]
        program = os.path.basename(sys.argv[0] or "pharos")
        stem, dot, suffix = program.rpartition(".")
        program = stem if dot and suffix in ("py", "pyz") else program
        if program in PROGRAM_NAMES:
            argv = [PROGRAM_NAMES[program]] + argv
    stdout, sys.stdout = sys.stdout, GuardedStream(sys.stdout)
    try:
        status = run_command(argv)
        sys.stdout.flush()
        return status
    except OutputError as e:
        return output_failed(e.error, stdout)
    finally:
        sys.stdout = stdout


def run_command(argv):
    """Parse ``argv`` and run its command's handler; errors become a line and a status."""
    if argv[-1:] == ["--version"] and len(argv) <= 2:
        print(f"pharos {__version__}")          # before the parser: this is all it needs
        return EXIT_OK
    if argv[:1] in (["--list"], ["--host"]):
        argv = ["mdb", "export", "--format", "ansible"] + list(argv)
    try:
        args = parse_command_line(argv)
        if args.command is None:
            raise UsageError("pharos: say a command (serve, ph, mdb, load, doctor); "
                             "see pharos --help")
        return HANDLERS[args.command](args)
    except UsageError as e:
        print(str(e) if str(e).startswith(("ph", "mdb")) else f"pharos: {e}",
              file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        log_to_stderr(str(e))
        return EXIT_FAIL
    except PhRefusal as e:
        print(f"{args.command}: {e.text}", file=sys.stderr)
        return e.status
    except PhError as e:
        print(f"{args.command}: {e.text}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
