"""Interop with the real Perl client Net::PH (Debian libnet-ph-perl) against a live server.

Each test starts a memory-storage, dev-tier Pharos (``mem_server``), runs a small
Perl program that drives Net::PH against it, and asserts on what Net::PH parsed.
The Perl side prints one record per line, tab-separated, with ``\\``, newline
and tab escaped as ``\\\\``, ``\\n`` and ``\\t`` (see ``PRELUDE`` / ``_unesc``).

Net::PH's behaviour that these tests lean on (see ph-protocol.md section 7):
* ``query`` returns undef unless the first reply line is the un-negated 102
  count line; a 501 reply gives ``[]``.
* Lines of a multi-line or multi-valued value (blank name or a repeated name)
  are joined with "\\n".
* ``fields`` joins the ``max N ...`` line and the description with "\\n" and,
  in list context, also returns the names in server order.
* ``add``/``change``/``delete`` quote any value with a non-word character and
  send a newline as the two characters ``\\n``.
"""

import re
import shutil
import subprocess

import pytest

from conftest import need

PERL_TIMEOUT = 60

# Property keywords a `fields` line may carry (qi's list, the RFC's additions, Lynx's URL).
KEYWORDS = {"Indexed", "Lookup", "NoMeta", "Public", "LocalPub", "Default", "Always", "Any",
            "Change", "Sacred", "Turn", "Encrypt", "NoPeople", "ForcePub", "Private", "Unique",
            "URL"}

PRELUDE = r'''
use strict;
use warnings;
use Net::PH;
$| = 1;
my $port = shift @ARGV;
our $ph = Net::PH->new("127.0.0.1", Port => $port, Timeout => 20)
    or die "cannot connect to 127.0.0.1:$port: $@\n";
sub esc {
    my $s = shift;
    return "<undef>" unless defined $s;
    $s =~ s/\\/\\\\/g; $s =~ s/\n/\\n/g; $s =~ s/\t/\\t/g; $s =~ s/\r/\\r/g;
    return $s;
}
sub out { print join("\t", map { esc($_) } @_), "\n"; }
# One QUERY line (tag, defined?, count, final code), then one REC line per field.
sub dump_query {
    my ($tag, $res) = @_;
    my $msg = $ph->message; chomp $msg if defined $msg;
    unless (defined $res) { out("QUERY", $tag, "undef", "", $ph->code, $msg); return; }
    out("QUERY", $tag, ref($res), scalar(@$res), $ph->code, $msg);
    for my $i (0 .. $#$res) {
        for my $f (sort keys %{ $res->[$i] }) {
            my $r = $res->[$i]{$f};
            out("REC", $tag, $i + 1, $f, $r->code, $r->value, $r->field, $r->text);
        }
    }
}
sub dump_status {
    my ($tag, $ok) = @_;
    my $msg = $ph->message; chomp $msg if defined $msg;
    out("STATUS", $tag, ($ok ? 1 : 0), $ph->code, $msg);
}
'''


def _unesc(field):
    if field == "<undef>":
        return None
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)),
                  field)


def run_perl(port, body):
    """Run PRELUDE + body with Net::PH against 127.0.0.1:port; return parsed output rows."""
    script = PRELUDE + body
    proc = subprocess.run(["perl", "-e", script, str(port)], capture_output=True,
                          timeout=PERL_TIMEOUT)
    stdout = proc.stdout.decode("utf-8")
    stderr = proc.stderr.decode("utf-8", errors="replace")
    assert proc.returncode == 0, f"perl exited {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    rows = [[_unesc(f) for f in line.split("\t")] for line in stdout.splitlines()]
    return rows


class Result:
    """Parsed output of one Perl run: queries, statuses and free-form rows."""

    def __init__(self, rows):
        self.rows = rows
        self.queries = {}   # tag -> {"type", "count", "code", "message", "entries": [ {field: (code, idx, field, text)} ]}
        self.statuses = {}  # tag -> (ok, code, message)
        for row in rows:
            kind = row[0]
            if kind == "QUERY":
                _, tag, rtype, count, code, msg = row
                self.queries[tag] = {"type": rtype, "count": int(count) if count else None,
                                     "code": code, "message": msg,
                                     "entries": [dict() for _ in range(int(count) if count else 0)]}
            elif kind == "REC":
                _, tag, idx, name, code, value, field, text = row
                self.queries[tag]["entries"][int(idx) - 1][name] = (code, value, field, text)
            elif kind == "STATUS":
                _, tag, ok, code, msg = row
                self.statuses[tag] = (ok == "1", code, msg)

    def of(self, kind):
        return [row[1:] for row in self.rows if row[0] == kind]

    def query(self, tag):
        assert tag in self.queries, f"no query {tag!r} in output: {self.rows}"
        return self.queries[tag]

    def entries(self, tag):
        q = self.query(tag)
        assert q["type"] == "ARRAY", f"query {tag!r} returned undef (code {q['code']}: {q['message']})"
        return q["entries"]

    def texts(self, tag, i=0):
        """{field: text} of entry i (0-based) of query tag."""
        return {name: r[3] for name, r in self.entries(tag)[i].items()}


def netph(port, body):
    return Result(run_perl(port, body))


def _netph_available():
    if not shutil.which("perl"):
        return False
    try:
        proc = subprocess.run(["perl", "-MNet::PH", "-e1"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.fixture(autouse=True)
def _require_netph():
    need(_netph_available(), "Perl Net::PH (libnet-ph-perl)")


def raw_query(srv, line):
    """A query through the raw client: the 102 line, the data lines and the final line."""
    with srv.client() as c:
        reply = c.cmd(line)
        if reply[-1].startswith("102:"):
            reply += c.read_reply()
    return reply


def setup(srv, *commands):
    """Add test data through the raw client; every command must answer 200:Ok."""
    with srv.client() as c:
        for line in commands:
            reply = c.cmd(line)
            assert reply == ["200:Ok."], f"{line!r} -> {reply!r}"
        assert c.cmd("quit") == ["200:Bye!"]


JSMITH = 'add type=person alias=jsmith name="John Smith" email=john@example.org phone="555 1234"'
NAS = "add type=machine hostname=nas ip=10.0.0.5 ip=10.0.0.6"


# --------------------------------------------------------------------------- status / siteinfo


def test_status(mem_server):
    r = netph(mem_server.port, r'''
        my $code = $ph->status;
        out("CODE", $code);
        dump_status("status", 1);
        out("CODE2", $ph->status);          # still in step for a second command
        $ph->quit;
    ''')
    assert r.of("CODE") == [["200"]]
    ok, code, msg = r.statuses["status"]
    assert code == "200"
    assert msg.strip() != ""
    assert r.of("CODE2") == [["200"]]


def test_siteinfo(mem_server):
    r = netph(mem_server.port, r'''
        my $si = $ph->siteinfo;
        if (!defined $si) { out("SITEINFO", "undef"); }
        else {
            out("SITEINFO", ref $si);
            for my $k (sort keys %$si) {
                my $e = $si->{$k};
                out("SI", $k, $e->code, $e->value, $e->field, $e->text);
            }
        }
        out("FINAL", $ph->code);
        out("CODE", $ph->status);           # the connection is still in step
        $ph->quit;
    ''')
    assert r.of("SITEINFO") == [["HASH"]]
    si = {k: (code, value, field, text) for k, code, value, field, text in r.of("SI")}
    for key in ("mailfield", "mailbox", "maildomain"):
        assert key in si, f"siteinfo lacks {key}: {sorted(si)}"
    assert "" not in si, f"a siteinfo line without a key: {si['']}"
    for key, (code, value, field, text) in si.items():
        assert code == "200", (key, code)
        assert value.isdigit(), (key, value)
        assert field == key
        if key != "authenticate":
            assert ":" not in text, (key, text)
    assert r.of("FINAL") == [["200"]]
    assert r.of("CODE") == [["200"]]


# --------------------------------------------------------------------------- fields


def _raw_field_order(srv, line="fields"):
    with srv.client() as c:
        reply = c.cmd(line)
    assert reply[-1].startswith("200:"), reply
    order = []
    for ln in reply[:-1]:
        m = re.match(r"^-200:(\d+):([^:]*):", ln)
        assert m, f"unexpected fields line {ln!r}"
        if m.group(2) not in order:
            order.append(m.group(2))
    return order


def _check_field_text(name, text):
    first, sep, desc = text.partition("\n")
    assert sep, f"field {name}: no description line joined with \\n: {text!r}"
    m = re.fullmatch(r"max (\d+)((?: \S+)*)", first)
    assert m, f"field {name}: first line is not 'max N <props>': {first!r}"
    assert int(m.group(1)) > 0
    props = m.group(2).split()
    unknown = [p for p in props if p not in KEYWORDS]
    assert not unknown, f"field {name}: unknown property keywords {unknown} in {first!r}"
    assert desc.strip(), f"field {name}: empty description"


def test_fields_all(mem_server):
    r = netph(mem_server.port, r'''
        my ($f, $order) = $ph->fields;
        out("FINAL", $ph->code);
        out("ORDER", @$order);
        for my $k (@$order) {
            my $e = $f->{$k};
            out("F", $k, $e->code, $e->value, $e->field, $e->text);
        }
        out("KEYS", sort keys %$f);
        my $scalar = $ph->fields;           # scalar context: a hashref
        out("SCALAR", ref $scalar, scalar(keys %$scalar));
        $ph->quit;
    ''')
    assert r.of("FINAL") == [["200"]]
    order = r.of("ORDER")[0]
    fields = {name: (code, value, field, text) for name, code, value, field, text in r.of("F")}
    assert "" not in fields, f"blank field name (continuation line without a name): {fields.get('')}"
    assert len(order) == len(set(order))
    assert sorted(order) == r.of("KEYS")[0]
    # Net::PH's order is the server's order.
    assert order == _raw_field_order(mem_server)
    for name in ("type", "alias", "name", "nickname", "email", "phone", "notes",
                 "hostname", "ip", "mac", "os", "ssh_key", "services", "tags"):
        assert name in fields, f"fields lacks {name}: {order}"
    ids = set()
    for name, (code, value, field, text) in fields.items():
        assert code == "200", (name, code)
        assert field == name
        assert value.isdigit(), (name, value)
        assert value not in ids, f"field id {value} used twice ({name})"
        ids.add(value)
        _check_field_text(name, text)
    assert r.of("SCALAR") == [["HASH", str(len(order))]]


def test_fields_named(mem_server):
    r = netph(mem_server.port, r'''
        my ($all) = $ph->fields;
        my ($f, $order) = $ph->fields('alias', 'email');
        out("FINAL", $ph->code);
        out("ORDER", @$order);
        for my $k (sort keys %$f) {
            my $e = $f->{$k};
            out("F", $k, $e->code, $e->value, $e->field, $e->text);
            out("ALL", $k, $all->{$k}->value, $all->{$k}->text);
        }
        $ph->quit;
    ''')
    assert r.of("FINAL") == [["200"]]
    assert sorted(r.of("ORDER")[0]) == ["alias", "email"]
    fields = {name: (code, value, field, text) for name, code, value, field, text in r.of("F")}
    assert sorted(fields) == ["alias", "email"]
    all_fields = {name: (value, text) for name, value, text in r.of("ALL")}
    for name, (code, value, field, text) in fields.items():
        assert code == "200"
        assert field == name
        _check_field_text(name, text)
        # The same id and text as in the full listing.
        assert (value, text) == all_fields[name]


# --------------------------------------------------------------------------- query


def test_query_default_fields(mem_server):
    setup(mem_server, JSMITH)
    r = netph(mem_server.port, r'''
        dump_query("alias", $ph->query({ alias => 'jsmith' }));
        dump_query("phrase", $ph->query({ name => 'John Smith' }));
        dump_query("bare", $ph->query('smith'));
        dump_query("bare2", $ph->query('SMITH john'));
        dump_query("emptyret", $ph->query({ alias => 'jsmith' }, []));
        $ph->quit;
    ''')
    q = r.query("alias")
    assert (q["type"], q["count"], q["code"]) == ("ARRAY", 1, "200")
    entry = r.entries("alias")[0]
    # Default fields of a person that are present: type alias name email phone.
    assert sorted(entry) == ["alias", "email", "name", "phone", "type"]
    assert r.texts("alias") == {"type": "person", "alias": "jsmith", "name": "John Smith",
                                "email": "john@example.org", "phone": "555 1234"}
    for name, (code, idx, field, text) in entry.items():
        assert (code, idx, field) == ("200", "1", name)
    for tag in ("phrase", "bare", "bare2", "emptyret"):
        assert r.query(tag)["count"] == 1, (tag, r.query(tag))
        assert r.texts(tag)["alias"] == "jsmith", tag
    # `query alias=jsmith return` (empty list) prints the default fields.
    assert sorted(r.entries("emptyret")[0]) == ["alias", "email", "name", "phone", "type"]


def test_query_return_list(mem_server):
    setup(mem_server, JSMITH)
    r = netph(mem_server.port, r'''
        dump_query("ret", $ph->query({ alias => 'jsmith' }, [qw(email alias title)]));
        dump_query("all", $ph->query({ alias => 'jsmith' }, 'all'));
        dump_query("str", $ph->query('alias=jsmith', 'name phone'));
        $ph->quit;
    ''')
    q = r.query("ret")
    assert (q["type"], q["count"], q["code"]) == ("ARRAY", 1, "200")
    entry = r.entries("ret")[0]
    assert {"email", "alias", "title"} <= set(entry)
    assert "phone" not in entry and "name" not in entry
    assert entry["email"] == ("200", "1", "email", "john@example.org")
    assert entry["alias"] == ("200", "1", "alias", "jsmith")
    # A missing field in an explicit return list: -508:1:<name padded>: Not present in entry.
    assert entry["title"] == ("508", "1", "title", "Not present in entry.")

    all_entry = r.entries("all")[0]
    assert {"type", "alias", "name", "email", "phone"} <= set(all_entry)
    assert all(rec[0] == "200" for rec in all_entry.values()), all_entry
    assert r.texts("all")["name"] == "John Smith"

    assert r.texts("str") == {"name": "John Smith", "phone": "555 1234"}


def test_query_no_match(mem_server):
    setup(mem_server, JSMITH)
    r = netph(mem_server.port, r'''
        dump_query("alias", $ph->query({ alias => 'nosuchuser' }));
        dump_query("name", $ph->query({ name => 'Nobody' }, [qw(alias name)]));
        dump_query("bare", $ph->query('zzyzx'));
        dump_query("after", $ph->query({ alias => 'jsmith' }));   # still in step
        $ph->quit;
    ''')
    for tag in ("alias", "name", "bare"):
        q = r.query(tag)
        # Net::PH maps the 501 reply to [] (defined, empty).
        assert (q["type"], q["count"], q["code"]) == ("ARRAY", 0, "501"), (tag, q)
    assert r.texts("after")["alias"] == "jsmith"


def test_multiline_value(mem_server):
    setup(mem_server,
          'add alias=mline name="Multi Line" notes="first line\\nsecond line\\nthird line"')
    r = netph(mem_server.port, r'''
        dump_query("ret", $ph->query({ alias => 'mline' }, [qw(alias notes)]));
        dump_query("all", $ph->query({ alias => 'mline' }, 'all'));
        $ph->quit;
    ''')
    assert r.texts("ret") == {"alias": "mline",
                              "notes": "first line\nsecond line\nthird line"}
    assert r.texts("all")["notes"] == "first line\nsecond line\nthird line"
    assert r.texts("all")["type"] == "person"


def test_multivalued_value(mem_server):
    setup(mem_server, NAS)
    # On the wire each value is its own line carrying the field name.
    reply = raw_query(mem_server, "query hostname=nas return ip")
    ips = [m.group(1) for m in (re.match(r"^-200:1: *ip: (.*)$", ln) for ln in reply) if m]
    assert ips == ["10.0.0.5", "10.0.0.6"], reply

    r = netph(mem_server.port, r'''
        dump_query("default", $ph->query({ hostname => 'nas' }));
        dump_query("ret", $ph->query({ hostname => 'nas' }, [qw(hostname ip)]));
        dump_query("bare", $ph->query('NAS'));
        $ph->quit;
    ''')
    texts = r.texts("default")
    assert texts["type"] == "machine"
    assert texts["hostname"] == "nas"
    assert texts["ip"] == "10.0.0.5\n10.0.0.6"
    # Default fields for a machine: type hostname ip mac os role owner status (present ones only).
    assert set(texts) <= {"type", "hostname", "ip", "mac", "os", "role", "owner", "status"}
    assert r.texts("ret") == {"hostname": "nas", "ip": "10.0.0.5\n10.0.0.6"}
    assert r.texts("bare")["hostname"] == "nas"


# --------------------------------------------------------------------------- add / change / delete


def test_add_change_delete(mem_server):
    r = netph(mem_server.port, r'''
        dump_status("add", $ph->add({ alias => 'pdoe', name => 'Pat Doe',
                                      email => 'pat@example.org', phone => '555 0000',
                                      notes => "line one\nline two" }));
        dump_query("q1", $ph->query({ alias => 'pdoe' }, [qw(type alias name email phone notes)]));
        dump_status("change", $ph->change({ alias => 'pdoe' },
                                          { phone => '555 9999', notes => "new\nnotes here" }));
        dump_query("q2", $ph->query({ alias => 'pdoe' }, [qw(name phone notes)]));
        dump_status("addm", $ph->add('type=machine hostname=web1 ip=10.1.1.1 ip="10.1.1.2" os=Debian'));
        dump_query("m1", $ph->query({ hostname => 'web1' }));
        dump_status("delete", $ph->delete({ alias => 'pdoe' }));
        dump_query("q3", $ph->query({ alias => 'pdoe' }));
        dump_status("deletem", $ph->delete(hostname => 'web1'));
        dump_query("m2", $ph->query({ hostname => 'web1' }));
        $ph->quit;
    ''')
    assert r.statuses["add"] == (True, "200", "Ok.")
    assert r.texts("q1") == {"type": "person", "alias": "pdoe", "name": "Pat Doe",
                             "email": "pat@example.org", "phone": "555 0000",
                             "notes": "line one\nline two"}

    assert r.statuses["change"] == (True, "200", "1 entry changed.")
    assert r.texts("q2") == {"name": "Pat Doe", "phone": "555 9999", "notes": "new\nnotes here"}

    assert r.statuses["addm"] == (True, "200", "Ok.")
    m1 = r.texts("m1")
    assert (m1["type"], m1["hostname"], m1["ip"], m1["os"]) == ("machine", "web1",
                                                                "10.1.1.1\n10.1.1.2", "Debian")

    assert r.statuses["delete"] == (True, "200", "1 entries deleted.")
    assert (r.query("q3")["type"], r.query("q3")["count"], r.query("q3")["code"]) == ("ARRAY", 0, "501")
    assert r.statuses["deletem"] == (True, "200", "1 entries deleted.")
    assert (r.query("m2")["type"], r.query("m2")["count"], r.query("m2")["code"]) == ("ARRAY", 0, "501")


def test_change_and_delete_no_match(mem_server):
    r = netph(mem_server.port, r'''
        dump_status("change", $ph->change({ alias => 'ghost' }, { phone => '1' }));
        dump_status("delete", $ph->delete({ alias => 'ghost' }));
        out("CODE", $ph->status);
        $ph->quit;
    ''')
    ok, code, _ = r.statuses["change"]
    assert (ok, code) == (False, "501")
    ok, code, _ = r.statuses["delete"]
    assert (ok, code) == (False, "501")
    assert r.of("CODE") == [["200"]]


# --------------------------------------------------------------------------- non-ASCII


def test_non_ascii_name(mem_server):
    # The Perl source is passed as UTF-8 bytes and has no `use utf8`, so Net::PH
    # sends the raw UTF-8 bytes, quoted in hash form since they are \W.
    r = netph(mem_server.port, r'''
        dump_status("add", $ph->add({ alias => 'zmuller', name => 'Zoë Müller',
                                      notes => "Straße 1\nKöln" }));
        dump_query("q", $ph->query({ alias => 'zmuller' }, [qw(name notes)]));
        dump_query("whole", $ph->query({ name => 'Zoë Müller' }, [qw(alias)]));
        dump_query("word", $ph->query('name=Müller', 'alias'));
        dump_query("bare", $ph->query('Zoë', 'alias name'));
        $ph->quit;
    ''')
    assert r.statuses["add"] == (True, "200", "Ok.")
    assert r.texts("q") == {"name": "Zoë Müller", "notes": "Straße 1\nKöln"}
    assert r.texts("whole") == {"alias": "zmuller"}   # quoted: the whole value
    assert r.texts("word") == {"alias": "zmuller"}    # unquoted: one word of it
    assert r.texts("bare") == {"alias": "zmuller", "name": "Zoë Müller"}
    # The raw reply carries the same UTF-8 bytes.
    reply = raw_query(mem_server, "query alias=zmuller return name")
    assert any(ln.endswith(": Zoë Müller") for ln in reply), reply


# --------------------------------------------------------------------------- quit


def test_quit(mem_server):
    r = netph(mem_server.port, r'''
        out("CODE", $ph->status);
        my $ret = $ph->quit;
        my $msg = $ph->message; chomp $msg;
        out("QUIT", $ph->code, $msg, ($ph->opened ? "open" : "closed"));
    ''')
    assert r.of("CODE") == [["200"]]
    # Net::PH closes the socket only after a 2xx reply to quit.
    assert r.of("QUIT") == [["200", "Bye!", "closed"]]
    # On the wire: 200:Bye!, then the server closes the connection.
    with mem_server.client() as c:
        assert c.cmd("quit") == ["200:Bye!"]
        assert c.sock.recv(100) == b""
