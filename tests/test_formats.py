"""The Formats section, table-driven: pure functions, text in and text out."""

import io
import json

import pytest

import pharos

SCHEMA = pharos.Schema()


@pytest.mark.parametrize("text, escaped", [
    ("plain", "plain"),
    ("a,b;c", "a\\,b\\;c"),
    ("back\\slash", "back\\\\slash"),
    ("two\nlines", "two\\nlines"),
    ("", ""),
])
def test_vcard_escape_and_its_inverse(text, escaped):
    assert pharos.vcard_escape(text) == escaped
    assert pharos.vcard_unescape(escaped) == text


@pytest.mark.parametrize("value, sep, parts", [
    ("a;b;c", ";", ["a", "b", "c"]),
    ("a\\;b;c", ";", ["a\\;b", "c"]),
    ("", ";", [""]),
    ("x,,y", ",", ["x", "", "y"]),
    ("end\\", ";", ["end\\"]),
])
def test_vcard_split_keeps_escaped_separators(value, sep, parts):
    assert pharos.vcard_split(value, sep) == parts


@pytest.mark.parametrize("text", ["short", "x" * 75, "y" * 76, "é" * 80, "a" + "€" * 60])
def test_fold_line_stays_within_75_octets_and_unfolds_to_the_same_text(text):
    folded = pharos.fold_line(text)
    assert folded.endswith("\r\n")
    pieces = folded[:-2].split("\r\n")
    assert all(len(p.encode()) <= 75 for p in pieces)
    assert pieces[0] + "".join(p[1:] for p in pieces[1:]) == text


@pytest.mark.parametrize("cells, row", [
    (["a", "b"], "a,b\r\n"),
    (["has,comma", "q\"uote"], '"has,comma","q""uote"\r\n'),
    (["multi\nline"], '"multi\nline"\r\n'),
    ([""], '""\r\n'),
])
def test_csv_line(cells, row):
    assert pharos.csv_line(cells) == row


@pytest.mark.parametrize("name, cell, values", [
    ("ip", "10.0.0.1, 10.0.0.2;fd00::1", ["10.0.0.1", "10.0.0.2", "fd00::1"]),
    ("services", "22/ssh\n80/http", ["22/ssh", "80/http"]),
    ("ssh_key", "ssh-ed25519 AAAA one\nssh-ed25519 BBBB two",
     ["ssh-ed25519 AAAA one", "ssh-ed25519 BBBB two"]),
    ("notes", "a, b; c", ["a, b; c"]),
])
def test_split_cell(name, cell, values):
    assert pharos.split_cell(SCHEMA.by_name[name], cell) == values


@pytest.mark.parametrize("rtype, header, names", [
    (pharos.PERSON, ["uid", "Full Name", "e-mail"], ["alias", "name", "email"]),
    (pharos.MACHINE, ["Name", "IP Address", "MAC"], ["hostname", "ip", "mac"]),
    (pharos.MACHINE, ["host", "tag"], ["hostname", "tags"]),
])
def test_csv_columns_accept_common_spellings(rtype, header, names):
    assert pharos.csv_columns(header, SCHEMA, rtype) == names


@pytest.mark.parametrize("rtype, header, message", [
    (pharos.PERSON, ["name", "email"], "no alias column"),
    (pharos.PERSON, ["alias", "alias"], "appears twice"),
    (pharos.PERSON, ["alias", "ip"], "unknown column"),
    (pharos.MACHINE, ["hostname", "nosuch"], "unknown column"),
])
def test_csv_columns_refuse_unusable_headers(rtype, header, message):
    with pytest.raises(pharos.RecordError, match=message):
        pharos.csv_columns(header, SCHEMA, rtype)


@pytest.mark.parametrize("text, expected", [
    ("alias,name\njs,John Smith\n\n,\nmk,Mary\n",
     [(2, {"alias": ["js"], "name": ["John Smith"]}), (5, {"alias": ["mk"], "name": ["Mary"]})]),
    ("alias,name\njs\n", [(2, "1 cells, but the header has 2 columns")]),
    ('alias,notes\njs,"two\nlines"\nmk,x\n',
     [(2, {"alias": ["js"], "notes": ["two\nlines"]}), (4, {"alias": ["mk"], "notes": ["x"]})]),
])
def test_parse_csv_numbers_each_row_by_its_first_line(text, expected):
    assert list(pharos.parse_csv(io.StringIO(text), SCHEMA, pharos.PERSON)) == expected


@pytest.mark.parametrize("text, line", [("", 1), ("nosuch\n", 1)])
def test_parse_csv_refuses_a_file_without_a_usable_header(text, line):
    with pytest.raises(pharos.FormatError) as caught:
        list(pharos.parse_csv(io.StringIO(text), SCHEMA, pharos.PERSON))
    assert caught.value.line == line


@pytest.mark.parametrize("text, expected", [
    ('{"alias": "js"}\n\n{"alias": "mk", "tags": []}\n',
     [(1, {"alias": ["js"]}), (3, {"alias": ["mk"], "tags": []})]),
    ('{"alias": 5}\n', [(1, "alias must be a string or a list of strings")]),
    ('[1]\n', [(1, "each record must be a JSON object")]),
])
def test_parse_jsonl(text, expected):
    assert list(pharos.parse_jsonl(io.StringIO(text), SCHEMA, pharos.PERSON)) == expected


def test_parse_jsonl_names_a_line_that_is_not_json():
    (line, why), = pharos.parse_jsonl(io.StringIO("{nope\n"), SCHEMA, pharos.PERSON)
    assert line == 1 and why.startswith("not JSON")


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 16])
def test_json_array_items_reads_any_chunking_and_counts_lines(chunk):
    text = '[\n {"a": "1"},\n {"a": "2, ]"}\n,\n{"a": "3"}]'
    items = list(pharos.json_array_items(io.StringIO(text), chunk))
    assert items == [(2, {"a": "1"}), (3, {"a": "2, ]"}), (5, {"a": "3"})]


@pytest.mark.parametrize("text, line, message", [
    ('{"a": 1}', 1, "must be a list"),
    ('[\n{"a": 1}\n{"b": 2}]', 3, "expected ','"),
    ('[{"a": 1},\n]', 2, "before the list's ']'"),
    ('[\n\n{"a": ', 3, "not JSON"),
])
def test_json_array_items_refuses_bad_lists_with_their_line(text, line, message):
    with pytest.raises(pharos.FormatError, match=message) as caught:
        list(pharos.json_array_items(io.StringIO(text), 4))
    assert caught.value.line == line


@pytest.mark.parametrize("fields, alias", [
    ({"email": ["john.smith@example.org"], "name": ["X"]}, "john.smith"),
    ({"email": ["_@x"], "name": ["Zoë Ünal"]}, "zoe.unal"),
    ({"name": ["Émile   Zola!"]}, "emile.zola"),
])
def test_derive_alias(fields, alias):
    assert pharos.derive_alias(fields) == alias


def test_derive_alias_refuses_a_card_with_nothing_to_go_on():
    with pytest.raises(pharos.RecordError):
        pharos.derive_alias({"name": ["😀"]})


@pytest.mark.parametrize("path, head, fmt", [
    ("a.vcf", "", "vcard"), ("a.CSV", "", "csv"), ("a.ndjson", "", "jsonl"),
    ("-", "\ufeffBEGIN:VCARD\r\n", "vcard"), ("-", "  [{", "json"), ("-", "{\"a\"", "jsonl"),
    ("-", "alias,name", "csv"),
])
def test_guess_format(path, head, fmt):
    assert pharos.guess_format(path, head) == fmt


@pytest.mark.parametrize("old, new, changes", [
    ({"alias": "js", "name": "J"}, {"alias": "js", "name": "J"}, {}),
    ({"alias": "js"}, {"alias": "js", "name": "J"}, {"name": ["J"]}),
    ({"hostname": "a", "ip": ["1.1.1.1"]}, {"hostname": "a", "ip": ["1.1.1.2"]},
     {"ip": ["1.1.1.2"]}),
    ({"type": "person", "alias": "js"}, {"type": "machine", "alias": "js"}, {}),
])
def test_record_changes(old, new, changes):
    assert pharos.record_changes(old, new) == changes


def test_write_requests_split_long_changes_and_keep_each_field_on_one_line():
    changes = {"notes": ["n" * 3000], "tags": [f"t{i}" for i in range(10)],
               "os": ["o" * 3000], "role": ["r" * 3000]}
    requests = pharos.write_requests(pharos.MACHINE, "web", changes, True)
    assert requests[0].startswith("add hostname=web ")
    assert all(r.startswith("change hostname=web make ") for r in requests[1:])
    assert all(len(r.encode()) <= pharos.REQUEST_ROOM for r in requests)
    joined = " ".join(requests)
    assert sum(r.count("tags=") for r in requests if "tags=" in r) == 10
    assert len([r for r in requests if "tags=" in r]) == 1
    assert joined.count("n" * 3000) == 1


@pytest.mark.parametrize("hostname, domain, names", [
    ("nas", "lan", ["nas.lan", "nas"]), ("nas.lan", "home", ["nas.lan"]), ("nas", None, ["nas"]),
])
def test_host_names(hostname, domain, names):
    assert pharos.host_names(hostname, domain) == names


@pytest.mark.parametrize("exporter, text", [
    (pharos.HostsExporter("lan"), "10.0.0.5\tnas.lan nas\nfd00::5\tnas.lan nas\n"),
    (pharos.DnsmasqExporter(None), "host-record=nas,10.0.0.5\nhost-record=nas,fd00::5\n"),
])
def test_host_exporters(exporter, text):
    assert exporter.item({"hostname": "nas", "ip": ["10.0.0.5", "fd00::5"]}) == text


@pytest.mark.parametrize("record, target", [
    ({"hostname": "a", "ip": ["fd00::1", "10.0.0.1"]}, "10.0.0.1:9100"),
    ({"hostname": "a", "ip": ["fd00::1"]}, "[fd00::1]:9100"),
    ({"hostname": "a"}, "a:9100"),
])
def test_prometheus_target_group_prefers_ipv4(record, target):
    group = pharos.prometheus_target_group(dict(record, type="machine", tags=["x", "y"]), 9100)
    assert group["targets"] == [target]
    assert group["labels"]["instance"] == "a"
    assert group["labels"]["__meta_pharos_tags"] == ",x,y,"
    assert "__meta_pharos_type" not in group["labels"]


@pytest.mark.parametrize("text, name", [("Web-Servers", "web_servers"), ("os_Debian 12", "os_debian_12")])
def test_ansible_name(text, name):
    assert pharos.ansible_name(text) == name


def test_ansible_exporter_is_one_json_document():
    exporter = pharos.AnsibleExporter()
    records = [{"type": "machine", "hostname": "a", "role": "nas", "ip": ["fd00::1", "10.0.0.1"]},
               {"type": "machine", "hostname": "b"}]
    text = exporter.head() + "".join(exporter.item(r) for r in records) + exporter.tail()
    inventory = json.loads(text)
    assert inventory["_meta"]["hostvars"]["a"]["ansible_host"] == "10.0.0.1"
    assert inventory["role_nas"]["hosts"] == ["a"]
    assert inventory["ungrouped"]["hosts"] == ["b"]
    assert inventory["all"]["children"] == ["ungrouped", "role_nas"]


def test_vcard_round_trip_through_render_and_parse():
    record = {"type": "person", "alias": "js", "name": "John Smith", "email": "j@example.org",
              "phone": "555 1234", "notes": "line one\nline, two; three",
              "ssh_key": ["ssh-ed25519 AAAA a", "ssh-ed25519 BBBB b"]}
    card = pharos.render_vcard(record)
    (line, fields), = pharos.parse_vcard_file(io.StringIO(card), SCHEMA, pharos.PERSON)
    assert line == 1
    rebuilt = pharos.import_record(SCHEMA, pharos.PERSON, fields)
    assert {k: v for k, v in rebuilt.items() if k != "type"} == \
        {k: v for k, v in record.items() if k != "type"}
