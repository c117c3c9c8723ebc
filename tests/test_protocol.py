"""Pure pieces of the protocol and schema, table-driven: no sockets, no files."""

import pytest

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pharos  # noqa: E402
from pharos import Term, tokenize  # noqa: E402


def toks(text):
    return [(t.field, t.value, t.quoted, t.sep) for t in tokenize(text)]


@pytest.mark.parametrize("text, expected", [
    ("query smith", [(None, "query", False, False), (None, "smith", False, False)]),
    ("name=john smith", [("name", "john", False, False), (None, "smith", False, False)]),
    ('name="john smith"', [("name", "john smith", True, False)]),
    ('name=""', [("name", "", True, False)]),
    ("name=", [("name", "", False, False)]),
    ("email=a=b", [("email", "a=b", False, False)]),
    ("x return all", [(None, "x", False, False), (None, "return", False, True),
                      (None, "all", False, False)]),
    ("name=return", [("name", "return", False, False)]),
    ('"return"', [(None, "return", True, False)]),
    ('notes="a\\nb\\tc\\"d\\\\e\\q"', [("notes", 'a\nb\tc"d\\e\\q', True, False)]),
    ('name="unterminated', [("name", "unterminated", True, False)]),
    ('name="ends in backslash\\', [("name", "ends in backslash\\", True, False)]),
    ("\tname=a\t\tb ", [("name", "a", False, False), (None, "b", False, False)]),
    ("=x", [("", "x", False, False)]),
    ("f~v", [("f", "v", False, False)]),
    ('a"b"', [(None, "a", False, False), (None, "b", True, False)]),
    ("MAKE Force", [(None, "MAKE", False, True), (None, "Force", False, True)]),
])
def test_tokenize(text, expected):
    assert toks(text) == expected


@pytest.mark.parametrize("raw, text", [
    (b"status\r\n", "status"),
    (b"st\x00at\rus", "status"),
    (b"\xff\xfb\x01\xff\xf1query x", "query x"),
    (b"  id x \t", "id x"),
    (b"query Z\xc3\xbc", "query Z\u00fc"),
    (b"query Z\xfc", "query Z\u00fc"),            # not UTF-8: read as Latin-1
])
def test_clean_request(raw, text):
    assert pharos.clean_request(raw) == text


@pytest.mark.parametrize("pattern, key, hit", [
    ("smith", "smith", True), ("smith", "smithe", False), ("smi*", "smith", True),
    ("*ith", "smith", True), ("sm?th", "smith", True), ("sm?th", "smth", False),
    ("[a-c]ob", "bob", True), ("[a-c]ob", "rob", False), ("10.0.0.*", "10.0.0.5", True),
    ("10.0.0.*", "10.0.1.5", False), ("AA:BB", "aa:bb", True),
])
def test_term_matches_key(pattern, key, hit):
    assert Term(None, pattern).matches_key(key) is hit


@pytest.mark.parametrize("value, pattern, hit", [
    ("John Smith", "smith", True), ("John Smith", "john smith", True),
    ("John Smith", "smith john", False), ("Chief, Networks", "chief", True),
    ("aa:bb:cc:dd:ee:ff", "aa:bb:cc:dd:ee:ff", True), ("fe80::1", "fe80", True),
    ("22/ssh", "ssh", True), ("22/ssh", "22/ssh", True), ("O'Brien", "brien", False),
])
def test_term_matches_value(value, pattern, hit):
    assert Term(None, pattern).matches_value(value) is hit


@pytest.mark.parametrize("pattern, key", [
    ("ab", True), ("a", False), ("*", False), ("**", False), ("a*", True), ("*ab", True),
    ("??", False), ("[ab]", True),
])
def test_key_rule(pattern, key):
    assert Term(None, pattern).is_key() is key


def test_reply_lines_stay_within_1023_bytes():
    value = "é" * 1500 + "x" * 700
    lines = pharos.field_lines(1, "    notes", value)
    assert len(lines) > 2
    assert all(len(line.encode()) <= 1023 for line in lines)
    assert all(line.startswith("-200:1:    notes: ") for line in lines)
    assert "".join(line[len("-200:1:    notes: "):-1] for line in lines) == value


def test_entry_width_and_508():
    schema = pharos.Schema()
    fields = [schema.field(n) for n in ("alias", "name", "office")]
    record = {"type": "person", "alias": "j", "name": "J", "office": "a\nb"}
    assert pharos.format_entry(3, record, fields, pharos.Schema.width(fields), True) == [
        "-200:3:    alias: j\n", "-200:3:     name: J\n",
        "-200:3:   office: a\n", "-200:3:   office: b\n"]
    record.pop("office")
    assert pharos.format_entry(3, record, fields, 9, True)[-1] == \
        "-508:3:   office: Not present in entry.\n"
    assert len(pharos.format_entry(3, record, fields, 9, False)) == 2


def test_field_names_suit_every_client():
    for field in pharos.Schema().fields:
        assert pharos.FIELD_NAME_RE.match(field.name), field.name   # EUDC: letters, _ and -
    ids = [f.id for f in pharos.Schema().fields]
    assert len(ids) == len(set(ids))                                 # Lynx keys forms by id


@pytest.mark.parametrize("field, value, stored", [
    ("ip", "10.0.0.5", "10.0.0.5"), ("ip", "FD00:0:0::5", "fd00::5"),
    ("mac", "AA-BB-CC-DD-EE-FF", "aa:bb:cc:dd:ee:ff"), ("mac", "aabb.ccdd.eeff", "aa:bb:cc:dd:ee:ff"),
    ("services", "22/SSH", "22/ssh"), ("hostname", "nas.lan.", "nas.lan."),
    ("email", " a@b.c ", "a@b.c"), ("notes", "two\nlines", "two\nlines"),
])
def test_clean_value_normalises(field, value, stored):
    schema = pharos.Schema()
    assert schema.clean_value(schema.field(field), value) == stored


@pytest.mark.parametrize("field, value", [
    ("ip", "10.0.0.256"), ("ip", "nas"), ("mac", "aa:bb:cc:dd:ee"), ("mac", "a:b:c:d:e:f:0"),
    ("services", "ssh"), ("services", "70000/x"), ("hostname", "-bad"), ("hostname", "a b"),
    ("alias", "a b"), ("alias", "x" * 33), ("email", "nobody"), ("name", "a\nb"),
    ("name", "bell\x07"), ("url", "not a url"), ("tags", "two words"), ("type", "robot"),
])
def test_clean_value_refuses(field, value):
    schema = pharos.Schema()
    with pytest.raises(pharos.RecordError):
        schema.clean_value(schema.field(field), value)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:2378", ("127.0.0.1", 2378)), ("[::1]:105", ("::1", 105)), (":99", ("0.0.0.0", 99)),
    ("2379", ("0.0.0.0", 2379)), ("localhost", ("localhost", 2378)), ("[::1]", ("::1", 2378)),
])
def test_parse_hostport(text, expected):
    assert pharos.parse_hostport(text, 2378) == expected


@pytest.mark.parametrize("text", ["a:b:c", "host:99999", "host:port"])
def test_parse_hostport_refuses(text):
    with pytest.raises(pharos.UsageError):
        pharos.parse_hostport(text, 2378)


def test_custom_fields(tmp_path):
    ini = tmp_path / "pharos.ini"
    ini.write_text("[field rack]\ntypes = machine\nmax = 16\ndescription = Rack unit.\n"
                   "[field badge]\ntypes = person\nmulti = yes\ndefault = yes\n")
    schema = pharos.Schema(pharos.parse_custom_fields(str(ini)))
    rack, badge = schema.field("rack"), schema.field("badge")
    assert rack.max == 16 and rack.types == {"machine"} and "NoPeople" in rack.properties()
    assert badge.multi and badge in schema.defaults["person"]
    assert schema.build("machine", {"hostname": ["x"], "rack": ["R1"]})["rack"] == "R1"


@pytest.mark.parametrize("text, message", [
    ("[field alias]\n", "already exists"), ("[field x1]\n", "sections must be"),
    ("[other x]\n", "sections must be"), ("[field x]\ntypes = robot\n", "types must be"),
    ("[field x]\nmax = lots\n", "max must be"), ("[field x]\nmax = 9000\n", "max must be"),
    ("not ini at all", "cannot read config"),
])
def test_custom_fields_refused(tmp_path, text, message):
    ini = tmp_path / "pharos.ini"
    ini.write_text(text)
    with pytest.raises(pharos.UsageError, match=message):
        pharos.parse_custom_fields(str(ini))


def test_client_parses_what_the_server_formats():
    schema = pharos.Schema()
    record = {"type": "machine", "hostname": "nas", "ip": ["10.0.0.5", "fd00::5"],
              "notes": "line one\nline two"}
    lines = [pharos.count_line(1).rstrip("\n")]
    lines += [x.rstrip("\n") for x in pharos.format_entry(1, record, schema.all["machine"],
                                                          schema.all_width, False)]
    lines.append("200:Ok.")
    code, text, body = pharos.parse_reply(lines)
    assert (code, text) == (200, "Ok.")
    assert pharos.records_from_reply(body, schema.multi) == [record]


@pytest.mark.parametrize("value, token", [
    ("plain", "plain"), ("two words", '"two words"'), ("", '""'), ('say "hi"', '"say \\"hi\\""'),
    ("a\nb", '"a\\nb"'), ("back\\slash", '"back\\\\slash"'),
])
def test_quote_value_round_trips(value, token):
    assert pharos.quote_value(value) == token
    assert tokenize(f"x={token}")[0].value == value
