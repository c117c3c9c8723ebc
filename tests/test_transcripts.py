"""Replay tests/cases/*.ph against a live server, byte for byte.

A case file is a conversation on one connection:
    C: text          send text and a newline
    B: b'...'        send these raw bytes (a Python bytes literal)
    S: text          the next reply line is exactly text
    S~ regex         the next reply line matches regex (whole line)
    CLOSED           the server has closed the connection
    @args ...        extra `serve` arguments for this file (first lines only)
Lines starting with '#' and blank lines are comments.
"""

import ast
import re
import shlex
from pathlib import Path

import pytest

from conftest import PhClient, ServerProcess

CASES = sorted((Path(__file__).parent / "cases").glob("*.ph"))


def parse_case(path):
    args, steps = [], []
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip() or text.startswith("#"):
            continue
        if text.startswith("@args "):
            args += shlex.split(text[6:])
        elif text == "CLOSED":
            steps.append((lineno, "closed", None))
        elif text[:3] in ("C: ", "S: ", "S~ ", "B: ") or text in ("C:", "S:"):
            kind, body = text[:2], text[3:]
            if kind == "B:":
                body = ast.literal_eval(body)
            steps.append((lineno, kind, body))
        else:
            raise ValueError(f"{path.name}:{lineno}: cannot parse {text!r}")
    return args, steps


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_transcript(path, tmp_path):
    args, steps = parse_case(path)
    server = ServerProcess(tmp_path / "data", *args, storage="memory").start()
    try:
        with PhClient("127.0.0.1", server.port) as client:
            replay(path, client, steps)
    finally:
        server.kill()


def replay(path, client, steps):
    for lineno, kind, body in steps:
        where = f"{path.name}:{lineno}"
        if kind == "C:":
            client.send_raw(body.encode("utf-8") + b"\n")
        elif kind == "B:":
            client.send_raw(body)
        elif kind == "closed":
            with pytest.raises(EOFError):
                got = client.read_line()
                pytest.fail(f"{where}: expected the connection closed, got {got!r}")
        else:
            got = client.read_line().decode("utf-8")
            if kind == "S:":
                assert got == body, f"{where}: expected {body!r}, got {got!r}"
            else:
                assert re.fullmatch(body, got), f"{where}: {got!r} does not match /{body}/"
