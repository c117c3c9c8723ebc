"""MCP with real clients: the official Python SDK over Streamable HTTP and over stdio
(`pharos mcp` logged in with an SSH key), the MCP Inspector CLI, and what /mcp refuses
(tokens, roles, tenants, Origin, Host, sizes, malformed JSON-RPC)."""

import asyncio
import http.client
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PHAROS, ServerProcess, need, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ["search", "get", "add_person", "add_machine", "update", "delete", "stats"]


def pharos(*args, **env):
    """Run the pharos CLI; the CompletedProcess."""
    return subprocess.run([sys.executable, str(PHAROS), *args], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=60)


def make_token(data, name, role="reader", tenant="", ttl=None):
    """A new bearer token's secret, made by `pharos tokens add`."""
    extra = ["--ttl", ttl] if ttl else []
    made = pharos("tokens", "add", name, "--role", role, "--tenant", tenant, "--data", str(data),
                  *extra)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


class Mcp:
    """A running server with /mcp, its data dir and tokens by name."""

    def __init__(self, server, data, tokens):
        self.server, self.data, self.tokens = server, data, tokens
        self.url = f"http://127.0.0.1:{server.metrics_port}/mcp"

    def post(self, body, token=None, **headers):
        """(status, headers, decoded JSON or raw bytes) of one POST /mcp."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.metrics_port, timeout=10)
        sent = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if token:
            sent["Authorization"] = f"Bearer {self.tokens.get(token, token)}"
        sent.update({name.replace("_", "-"): value for name, value in headers.items()})
        conn.request("POST", "/mcp", body if type(body) is bytes else json.dumps(body).encode(), sent)
        answer = conn.getresponse()
        raw = answer.read()
        conn.close()
        try:
            return answer.status, dict(answer.getheaders()), json.loads(raw)
        except ValueError:
            return answer.status, dict(answer.getheaders()), raw

    def call(self, tool, arguments, token=None, ident=1):
        """(status, JSON-RPC reply) of a legacy-era tools/call."""
        status, _, reply = self.post({"jsonrpc": "2.0", "id": ident, "method": "tools/call",
                                      "params": {"name": tool, "arguments": arguments}}, token)
        return status, reply

    def result(self, tool, arguments, token=None):
        """The CallToolResult of a tools/call that must succeed at the JSON-RPC level."""
        status, reply = self.call(tool, arguments, token)
        assert status == 200 and "result" in reply, reply
        return reply["result"]


def start(tmp_path, tier, tokens=(), keys=None, extra=()):
    """A file-storage server of ``tier`` with /mcp on 127.0.0.1:0 and the tokens
    (name, role, tenant) made before it starts."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if keys:
        (data / "authorized_keys").write_text(keys)
    made = {name: make_token(data, name, role, tenant) for name, role, tenant in tokens}
    server = ServerProcess(data, "--tier", tier, "--login-delay", "0.01", *extra,
                           metrics=True).start()
    return Mcp(server, data, made)


@pytest.fixture
def lab(tmp_path):
    """A lab server with a writer token w and a reader token r."""
    mcp = start(tmp_path, "lab", [("w", "writer", ""), ("r", "reader", "")])
    yield mcp
    mcp.server.kill()


@pytest.fixture
def enterprise(tmp_path):
    """An enterprise server: writer tokens of tenants a and b, and an admin of every tenant."""
    mcp = start(tmp_path, "enterprise", [("wa", "writer", "a"), ("wb", "writer", "b"),
                                         ("all", "admin", "*")])
    yield mcp
    mcp.server.kill()


# -- the official Python SDK -------------------------------------------------------

def sdk():
    """The mcp package (the official Python SDK), or a skip (a failure in CI)."""
    need(importlib.util.find_spec("mcp") is not None, "the MCP Python SDK (pip install mcp)")
    import mcp
    return mcp


def dumped(model):
    """An SDK model as the JSON it stands for (camelCase names)."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


async def sdk_session(target, calls, mode="auto", token=None):
    """Open an SDK Client on ``target`` (a URL or StdioServerParameters), list the tools,
    run ``calls`` [(tool, arguments)]: (era, tools listing, [CallToolResult as JSON])."""
    from contextlib import AsyncExitStack

    from mcp import Client
    async with AsyncExitStack() as stack:
        if token:
            from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client
            http = await stack.enter_async_context(
                create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}))
            target = streamable_http_client(target, http_client=http)
        client = await stack.enter_async_context(Client(target, mode=mode,
                                                        read_timeout_seconds=20))
        era = "modern" if client.session.discover_result is not None else "legacy"
        listing = [dumped(t) for t in (await client.list_tools()).tools]
        results = [dumped(await client.call_tool(name, args)) for name, args in calls]
        return era, client.protocol_version, listing, results


def run_sdk(target, calls, mode="auto", token=None):
    """sdk_session in a fresh event loop, with a deadline."""
    sdk()
    return asyncio.run(asyncio.wait_for(sdk_session(target, calls, mode, token), 90))


def workout(prefix):
    """Calls through every tool, writing records named ``prefix``-…; with what each must do."""
    return [
        ("add_machine", {"hostname": f"{prefix}-web", "ip": ["10.9.0.7"], "role": "web"}),
        ("add_person", {"alias": f"{prefix}jo", "name": "Jo Bloggs", "email": "jo@example.org"}),
        ("search", {"query": f"hostname={prefix}-web"}),
        ("get", {"key": f"{prefix}jo"}),
        ("update", {"selection": f"hostname={prefix}-web", "changes": {"os": "debian",
                                                                       "role": None}}),
        ("stats", {}),
        ("delete", {"selection": f"alias={prefix}jo", "expected_count": 1}),
        ("get", {"key": "nobody-here"}),
        ("delete", {"selection": f"hostname={prefix}-*", "expected_count": 5}),
    ]


def check_workout(results, prefix, ph):
    """The workout's results match what the directory holds, seen over Ph too."""
    ok = [r for r in results[:7]]
    assert all(r.get("isError") is False for r in ok), ok
    added = ok[0]["structuredContent"]["record"]
    assert (added["hostname"], added["ip"], added["role"]) == (f"{prefix}-web", ["10.9.0.7"], "web")
    assert ok[1]["structuredContent"]["record"]["alias"] == f"{prefix}jo"
    found = ok[2]["structuredContent"]
    assert found["total"] == 1 and found["records"][0]["hostname"] == f"{prefix}-web"
    got = ok[3]["structuredContent"]
    assert got["record"]["email"] == "jo@example.org" and got["sources"]["email"] == "manual"
    changed = ok[4]["structuredContent"]
    assert changed["changed"] == 1 and changed["records"][0]["os"] == "debian"
    assert "role" not in changed["records"][0]
    assert ok[5]["structuredContent"]["machines"] >= 1
    assert ok[6]["structuredContent"]["keys"] == [f"{prefix}jo"]
    missing, loose = results[7], results[8]
    assert missing["isError"] is True and "nobody-here" in missing["content"][0]["text"]
    assert loose["isError"] is True and "not 5" in loose["content"][0]["text"]
    assert json.loads(ok[0]["content"][0]["text"]) == ok[0]["structuredContent"]
    with ph as client:
        reply = client.cmd(f"query hostname={prefix}-web return os role")
        assert any(line.endswith("os: debian") for line in reply), reply
        assert any("role: Not present" in line for line in reply), reply
        assert client.cmd(f"query alias={prefix}jo")[-1].startswith("501:")


def check_listing(listing):
    """tools/list: every tool, each with an object inputSchema and an outputSchema."""
    assert [t["name"] for t in listing] == TOOLS
    for tool in listing:
        assert tool["inputSchema"]["type"] == "object" and tool["outputSchema"]["type"] == "object"
        assert set(tool["annotations"]) >= {"readOnlyHint", "destructiveHint", "idempotentHint"}
    by_name = {t["name"]: t for t in listing}
    assert by_name["get"]["inputSchema"]["required"] == ["key"]
    assert by_name["delete"]["annotations"]["destructiveHint"] is True
    assert by_name["search"]["annotations"]["readOnlyHint"] is True


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_sdk_over_http_runs_every_tool(lab, mode):
    era, version, listing, results = run_sdk(lab.url, workout(mode[:3]), mode,
                                             lab.tokens["w"])
    assert (era, version) == (("modern", "2026-07-28") if mode == "auto"
                              else ("legacy", "2025-11-25"))
    check_listing(listing)
    check_workout(results, mode[:3], lab.server.client())


def test_sdk_without_a_token_reads_in_lab_and_a_write_is_refused(lab):
    with pytest.raises(BaseException) as refused:
        run_sdk(lab.url, [("add_person", {"alias": "x1"})], "legacy")
    assert "needs a bearer token" in repr(refused.value)
    _, _, _, results = run_sdk(lab.url, [("stats", {})], "legacy")
    assert results[0]["isError"] is False


@pytest.fixture
def keyed(tmp_path):
    """A lab server that knows alice's SSH key (a writer), and the key file."""
    need(shutil.which("ssh-keygen"), "ssh-keygen")
    key = tmp_path / "id_alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f", str(key)],
                   check=True)
    pub = key.with_suffix(".pub").read_text().split()
    mcp = start(tmp_path, "lab", [("r", "reader", "")],
                keys=f'alice role="writer" {pub[0]} {pub[1]}\n')
    yield mcp, key
    mcp.server.kill()


def stdio_params(server, key, tmp_path, user="alice"):
    """How the SDK launches `pharos mcp` against ``server``, logging in as ``user``."""
    from mcp import StdioServerParameters
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return StdioServerParameters(
        command=sys.executable, args=[str(PHAROS), "mcp", "--server", f"127.0.0.1:{server.port}"],
        env={"PHAROS_USER": user, "PHAROS_KEY": str(key), "HOME": str(home)})


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_sdk_over_stdio_runs_every_tool_with_a_key_login(keyed, tmp_path, mode):
    sdk()
    mcp, key = keyed
    era, _, listing, results = run_sdk(stdio_params(mcp.server, key, tmp_path),
                                       workout("s" + mode[:3]), mode)
    assert era == ("modern" if mode == "auto" else "legacy")
    check_listing(listing)
    check_workout(results, "s" + mode[:3], mcp.server.client())
    audit = [json.loads(line) for line in (mcp.data / "audit.log").read_text().splitlines()]
    assert {entry["user"] for entry in audit} == {"alice"}


def test_stdio_refusals_are_tool_errors_with_the_servers_words(keyed, tmp_path):
    sdk()
    mcp, key = keyed
    stranger = tmp_path / "id_bob"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    calls = [("add_person", {"alias": "bob1"}), ("search", {"query": "alias=zzz"}),
             ("stats", {})]
    _, _, _, results = run_sdk(stdio_params(mcp.server, stranger, tmp_path, "bob"), calls)
    refused, none, stats = results
    assert refused["isError"] is True and "not authorized" in refused["content"][0]["text"]
    assert none["isError"] is False and none["structuredContent"]["total"] == 0
    assert stats["isError"] is False and stats["structuredContent"]["people"] == 0


def test_stdio_update_over_the_limit_changes_nothing(keyed, tmp_path):
    sdk()
    mcp, key = keyed
    calls = [("add_machine", {"hostname": f"lim-{n}"}) for n in range(3)]
    calls += [("update", {"selection": "hostname=lim-*", "changes": {"os": "x"}}),
              ("update", {"selection": "hostname=lim-*", "changes": {"os": "y"}, "limit": 3}),
              ("delete", {"selection": "hostname=lim-*", "expected_count": 3})]
    _, _, _, results = run_sdk(stdio_params(mcp.server, key, tmp_path), calls, "legacy")
    loose, wide, gone = results[3:]
    assert loose["isError"] is True and "limit is 1" in loose["content"][0]["text"]
    assert wide["structuredContent"]["changed"] == 3
    assert {r["os"] for r in wide["structuredContent"]["records"]} == {"y"}
    assert gone["structuredContent"]["deleted"] == 3
    with mcp.server.client() as client:
        assert client.cmd("query hostname=lim-*")[-1].startswith("501:")


# -- tokens, roles and tenants -------------------------------------------------------

def text(result):
    """The text block of a CallToolResult."""
    return result["content"][0]["text"]


def test_lab_writes_need_a_token_with_a_challenge_and_readers_cannot_write(lab):
    status, headers, reply = lab.post({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                       "params": {"name": "add_person",
                                                  "arguments": {"alias": "x1"}}})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert lab.result("search", {"query": "alias=x1"})["structuredContent"]["total"] == 0
    refused = lab.result("add_person", {"alias": "x1"}, token="r")
    assert refused["isError"] is True and "role is reader" in text(refused)
    assert lab.result("add_person", {"alias": "x1"}, token="w")["isError"] is False


def test_enterprise_needs_a_token_for_everything(enterprise):
    for body in ({"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                 {"jsonrpc": "2.0", "id": 2, "method": "initialize",
                  "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                             "clientInfo": {"name": "t", "version": "1"}}}):
        status, headers, _ = enterprise.post(body)
        assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    assert enterprise.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, "wa")[0] == 200


def test_a_tenant_token_sees_and_touches_only_its_tenant(enterprise):
    mcp = enterprise
    for tenant in ("a", "b"):
        for n in range(2):
            assert mcp.result("add_machine", {"hostname": f"h{tenant}{n}"}, f"w{tenant}")[
                "isError"] is False
    found = mcp.result("search", {"query": "hostname=h*"}, "wa")["structuredContent"]
    assert sorted(r["hostname"] for r in found["records"]) == ["ha0", "ha1"]
    assert mcp.result("get", {"key": "hb0"}, "wa")["isError"] is True
    wild = mcp.result("update", {"selection": "hostname=h*", "changes": {"os": "x"},
                                 "limit": 10}, "wa")["structuredContent"]
    assert sorted(r["hostname"] for r in wild["records"]) == ["ha0", "ha1"]
    assert mcp.result("update", {"selection": "hostname=hb0", "changes": {"os": "x"}},
                      "wa")["isError"] is True
    assert mcp.result("delete", {"selection": "hostname=hb*", "expected_count": 2},
                      "wa")["isError"] is True
    stats = mcp.result("stats", {}, "wa")["structuredContent"]
    assert stats["machines"] == 2 and {r["hostname"] for r in stats["recent"]} == {"ha0", "ha1"}
    everyone = mcp.result("search", {"query": "hostname=h*", "fields": "all"}, "all")
    records = everyone["structuredContent"]["records"]
    assert {(r["hostname"], r.get("os")) for r in records} == {
        ("ha0", "x"), ("ha1", "x"), ("hb0", None), ("hb1", None)}


def test_revoked_and_expired_tokens_are_refused(lab):
    assert lab.result("add_person", {"alias": "t1"}, token="w")["isError"] is False
    assert pharos("tokens", "remove", "w", "--data", str(lab.data)).returncode == 0
    assert lab.call("add_person", {"alias": "t2"}, token="w")[0] == 401
    brief = make_token(lab.data, "brief", "writer", ttl="1")
    wait_for(lambda: lab.call("stats", {}, token=brief)[0] == 401,
             timeout=10, interval=0.2, what="the 1 s token to expire")
    assert lab.call("add_person", {"alias": "t3"}, token=brief)[0] == 401
    old = make_token(lab.data, "old", "writer")
    with open(lab.data / "tokens") as f:
        lines = [json.loads(line) for line in f]
    for entry in lines:
        if entry["name"] == "old":
            entry["expires"] = int(time.time()) - 60
    (lab.data / "tokens").write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert lab.call("add_person", {"alias": "t4"}, token=old)[0] == 401
    assert lab.result("search", {"query": "alias=t*"})["structuredContent"][
        "total"] == 1


def test_audit_log_names_the_token_of_every_mcp_write(lab):
    lab.result("add_machine", {"hostname": "aud-1"}, token="w")
    lab.result("update", {"selection": "hostname=aud-1", "changes": {"os": "x"}}, token="w")
    lab.result("delete", {"selection": "hostname=aud-1", "expected_count": 1}, token="w")
    lab.result("add_person", {"alias": "aud2"}, token="r")
    audit = [json.loads(line) for line in (lab.data / "audit.log").read_text().splitlines()]
    assert len(audit) == 4, audit
    assert {(e["user"], e["key"]) for e in audit} == {("w", "token:w"), ("r", "token:r")}
    assert [e["request"].split()[:2] for e in audit] == [
        ["mcp", "add_machine"], ["mcp", "update"], ["mcp", "delete"], ["mcp", "add_person"]]
    assert audit[-1]["reply"].startswith("511:")


# -- the transport's refusals: each an answer, the server unharmed ---------------------

def rpc(method, params=None, ident=1):
    """A JSON-RPC request object."""
    return {"jsonrpc": "2.0", "id": ident, "method": method, "params": params or {}}


def test_foreign_origin_and_host_are_refused(lab):
    assert lab.post(rpc("tools/list"), Origin="http://evil.example")[0] == 403
    assert lab.post(rpc("tools/list"), Host="evil.example")[0] == 421
    port = lab.server.metrics_port
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        assert lab.post(rpc("tools/list"), Origin=origin)[0] == 200
    assert lab.post(rpc("tools/list"), Host=f"localhost:{port}")[0] == 200


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, -32700),
    (b"[]", 400, -32600),
    (json.dumps([rpc("tools/list")]).encode(), 400, -32600),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', 400, -32600),
    (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}', 400, -32600),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": []}', 200, -32602),
    (json.dumps(rpc("resources/list")).encode(), 200, -32601),
    (json.dumps(rpc("tools/call", {"name": "nope", "arguments": {}})).encode(), 200, -32602),
    (json.dumps(rpc("tools/call", {"name": "search", "arguments": []})).encode(), 200, None),
])
def test_malformed_requests_get_json_rpc_errors(lab, body, status, code):
    got, _, reply = lab.post(body)
    assert got == status, reply
    if code is None:
        assert reply["result"]["isError"] is True
    else:
        assert reply["error"]["code"] == code
    assert lab.result("stats", {})["isError"] is False


@pytest.mark.parametrize("arguments, words", [
    ({"query": 5}, "query must be a string"),
    ({"query": "x", "limit": 0}, "limit must be from 1"),
    ({"query": "x", "limit": True}, "limit must be an integer"),
    ({"query": "x", "color": "red"}, "unknown name"),
    ({"query": "x", "type": "cat"}, "type must be one of"),
    ({"cursor": "garbage!"}, "cursor"),
])
def test_bad_arguments_are_tool_errors(lab, arguments, words):
    result = lab.result("search", arguments)
    assert result["isError"] is True and words in text(result), result


def test_bad_update_values_are_tool_errors(lab):
    lab.result("add_machine", {"hostname": "bad-1"}, token="w")
    for value in (5, {"a": 1}, [1]):
        result = lab.result("update", {"selection": "hostname=bad-1",
                                       "changes": {"os": value}}, token="w")
        assert result["isError"] is True and "os" in text(result), result
    assert lab.server.alive() and lab.result("get", {"key": "bad-1"})["isError"] is False


def test_oversized_body_and_wrong_content_type(lab):
    big = json.dumps(rpc("tools/call", {"name": "search",
                                        "arguments": {"query": "x" * 70000}})).encode()
    assert lab.post(big)[0] == 413
    assert lab.post(rpc("tools/list"), Content_Type="text/plain")[0] == 415
    assert lab.result("stats", {})["isError"] is False


def test_modern_requests_need_their_headers(lab):
    meta = {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}}}
    call = rpc("tools/call", dict(meta, name="stats", arguments={}))
    status, _, reply = lab.post(call)
    assert status == 400 and reply["error"]["code"] == -32020
    status, _, reply = lab.post(call, MCP_Protocol_Version="2026-07-28", Mcp_Method="tools/call",
                                Mcp_Name="search")
    assert status == 400 and reply["error"]["code"] == -32020
    status, _, reply = lab.post(call, MCP_Protocol_Version="2026-07-28", Mcp_Method="tools/call",
                                Mcp_Name="stats")
    assert status == 200 and reply["result"]["resultType"] == "complete"
    status, _, reply = lab.post(rpc("nope/nope", meta), MCP_Protocol_Version="2026-07-28",
                                Mcp_Method="nope/nope")
    assert status == 404 and reply["error"]["code"] == -32601


def test_dev_tier_refuses_a_non_loopback_http_listener(tmp_path):
    result = pharos("serve", "--tier", "dev", "--storage", "memory", "--listen", "127.0.0.1:0",
                    "--metrics", "0.0.0.0:0")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "loopback" in result.stderr


@pytest.mark.parametrize("name, code", [("type", 505), ("created", 505), ("nosuch", 507)])
def test_update_refuses_fields_a_change_may_not_set(lab, name, code):
    lab.result("add_machine", {"hostname": "fix-1"}, token="w")
    result = lab.result("update", {"selection": "hostname=fix-1",
                                   "changes": {name: "person"}}, token="w")
    assert result["isError"] is True and f"({code})" in text(result), result
    record = lab.result("get", {"key": "fix-1"})["structuredContent"]["record"]
    assert record["type"] == "machine" and record["created"] != "person"


# -- the MCP Inspector CLI -------------------------------------------------------------

def inspector(tmp_path, *args):
    """Run the MCP Inspector CLI (``mcp-inspector`` on PATH): (exit status, JSON it printed)."""
    binary = os.environ.get("PHAROS_MCP_INSPECTOR") or shutil.which("mcp-inspector")
    need(binary and shutil.which("node"),
         "the MCP Inspector CLI (npm install -g @modelcontextprotocol/inspector)")
    home = tmp_path / "inspector-home"          # it keeps a catalog in ~/.mcp-inspector
    home.mkdir(exist_ok=True)
    done = subprocess.run([binary, "--cli", *args, "--format", "json", "-q"], capture_output=True,
                          text=True, timeout=90, env=dict(os.environ, HOME=str(home)))
    try:
        return done.returncode, json.loads(done.stdout or done.stderr)
    except ValueError:
        return done.returncode, {"raw": done.stdout + done.stderr}


@pytest.mark.parametrize("era", ["legacy", "auto"])
def test_inspector_lists_and_calls_tools_over_http(lab, tmp_path, era):
    status, listed = inspector(tmp_path, lab.url, "--transport", "http", "--protocol-era", era,
                               "--method", "tools/list")
    assert status == 0, listed
    assert [t["name"] for t in listed["result"]["tools"]] == TOOLS
    status, added = inspector(tmp_path, lab.url, "--transport", "http", "--protocol-era", era,
                              "--header", f"Authorization: Bearer {lab.tokens['w']}",
                              "--method", "tools/call", "--tool-name", "add_person",
                              "--tool-arg", f"alias=insp{era[:3]}", "--tool-arg", "name=In Spector")
    assert status == 0, added
    assert added["result"]["structuredContent"]["record"]["name"] == "In Spector"
    status, found = inspector(tmp_path, lab.url, "--transport", "http", "--protocol-era", era,
                              "--method", "tools/call", "--tool-name", "search",
                              "--tool-arg", "query=spector")
    assert status == 0 and found["result"]["structuredContent"]["total"] == 1, found
    status, refused = inspector(tmp_path, lab.url, "--transport", "http", "--protocol-era", era,
                                "--method", "tools/call", "--tool-name", "get",
                                "--tool-arg", "key=nobody")
    assert status == 5, refused                 # the Inspector's exit status for isError


# -- results stay small: a broad search pages ------------------------------------------

def test_a_broad_search_pages_and_each_page_stays_small(tmp_path):
    data = tmp_path / "data"
    people = [{"type": "person", "alias": f"p{n:05d}", "name": f"Person Number{n}",
               "email": f"p{n}@example.org", "title": "Senior Engineer " * 3,
               "department": "Research and Development"} for n in range(3000)]
    (tmp_path / "people.jsonl").write_text("".join(json.dumps(p) + "\n" for p in people))
    loaded = pharos("load", str(tmp_path / "people.jsonl"), "--data", str(data))
    assert loaded.returncode == 0, loaded.stderr
    mcp = start(tmp_path, "lab", [("r", "reader", "")])
    try:
        # anonymous: as much as a Ph query gives anyone, so a broad one is refused
        anonymous = mcp.result("search", {"query": "alias=p*"})
        assert anonymous["isError"] and "Too many entries" in anonymous["content"][0]["text"]
        seen, cursor, pages = set(), None, 0
        while True:
            args = dict({"cursor": cursor} if cursor else {"query": "alias=p*"}, limit=200)
            status, _, reply = mcp.post(rpc("tools/call", {"name": "search", "arguments": args}),
                                        "r")
            assert status == 200 and len(json.dumps(reply)) < 100_000
            page = reply["result"]["structuredContent"]
            assert page["total"] == 3000 and len(page["records"]) <= 200
            seen |= {r["alias"] for r in page["records"]}
            pages, cursor = pages + 1, page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == 3000 and pages == 15
        status, _, reply = mcp.post(rpc("tools/call", {"name": "search", "arguments": {
            "query": "alias=p*", "fields": "all", "limit": 200}}), "r")
        assert len(json.dumps(reply)) < 100_000, len(json.dumps(reply))
    finally:
        mcp.server.kill()


def test_a_name_given_with_mcp_origin_is_answered_as_a_host(tmp_path):
    mcp = start(tmp_path, "lab", extra=("--mcp-origin", "http://ph.example.test"))
    try:
        port = mcp.server.metrics_port
        for host in ("ph.example.test", f"ph.example.test:{port}"):
            assert mcp.post(rpc("tools/list"), Host=host)[0] == 200
        assert mcp.post(rpc("tools/list"), Origin="http://ph.example.test")[0] == 200
        assert mcp.post(rpc("tools/list"), Host=f"other.example.test:{port}")[0] == 421
    finally:
        mcp.server.kill()


def test_stdio_in_enterprise_logs_in_for_reads_and_keeps_to_the_keys_tenant(tmp_path):
    sdk()
    need(shutil.which("ssh-keygen"), "ssh-keygen")
    key = tmp_path / "id_alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub").read_text().split()
    mcp = start(tmp_path, "enterprise", [("wb", "writer", "b")],
                keys=f'alice role="writer",tenant="a" {pub[0]} {pub[1]}\n')
    try:
        mcp.result("add_machine", {"hostname": "tb-1"}, "wb")
        calls = [("add_machine", {"hostname": "ta-1"}), ("search", {"query": "hostname=t*"}),
                 ("stats", {}), ("delete", {"selection": "hostname=tb-1", "expected_count": 1})]
        _, _, _, results = run_sdk(stdio_params(mcp.server, key, tmp_path), calls, "legacy")
        added, found, stats, refused = results
        assert added["isError"] is False, added
        assert [r["hostname"] for r in found["structuredContent"]["records"]] == ["ta-1"]
        assert stats["structuredContent"]["machines"] == 1
        assert refused["isError"] is True
    finally:
        mcp.server.kill()
