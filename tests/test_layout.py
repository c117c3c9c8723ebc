"""The module's layout: sections in dependency order, as the docstring lists them.

* the ``# SECTION:`` banners are the module docstring's table, in the same order;
* no top-level function, class or constant uses a name defined in a later section (an AST
  check of the names each one loads, leaving out its own parameters and locals);
* every section has tests: a test file that exercises it is named for it below;
* no backslash line continuations.
"""

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

SOURCE = (ROOT / "pharos.py").read_text()
TREE = ast.parse(SOURCE)
BANNER_RE = re.compile(r"^# SECTION: (.+?) — ", re.M)
BANNERS = [(SOURCE.count("\n", 0, m.start()) + 1, m.group(1)) for m in BANNER_RE.finditer(SOURCE)]

# Where each section is tested (a file may cover several; every section needs one).
SECTION_TESTS = {
    "Constants": ["test_zipapp.py"], "Errors": ["test_cli.py"], "Net": ["test_fuzz.py"],
    "Schema": ["test_protocol.py", "test_provenance.py", "test_hostkey.py"],
    "Protocol": ["test_protocol.py"],
    "Query": ["test_store.py", "test_hardening_query.py"], "Metrics": ["test_metrics.py"],
    "Loop": ["test_robustness.py"], "Storage": ["test_store.py", "test_visibility.py"],
    "File store": ["test_durability.py", "test_damage.py"], "LDAP store": ["test_ldap.py"],
    "SSH": ["test_auth.py"], "Auth": ["test_auth.py", "test_hardening_auth.py", "test_ldap_keys.py"],
    "Service": ["test_service.py", "test_hostkey.py"], "Client": ["test_clients.py"],
    "Formats": ["test_formats.py"], "Discovery": ["test_scan.py", "test_hostkey.py"],
    "Ph server": ["test_transcripts.py", "test_netph.py"], "HTTP": ["test_hardening_http.py"],
    "MCP": ["test_mcp.py"], "Serve": ["test_cli.py"], "CLI": ["test_cli.py", "test_hardening_cli.py"],
}


def section_of(lineno):
    """The section a line of pharos.py is in."""
    current = None
    for start, name in BANNERS:
        if start <= lineno:
            current = name
    return current


def top_level_names():
    """{name: section} of every top-level def, class and assigned name."""
    names = {}
    for node in TREE.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = section_of(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names.setdefault(name.id, section_of(node.lineno))
    return names


def local_names(node):
    """Names bound inside ``node`` (parameters, assignments, loop and with targets, imports,
    comprehension variables, inner defs): these shadow module names."""
    bound = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            bound.add(sub.id)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
            bound.add(sub.name)
    return bound


def upward_uses():
    """(section, definition, name used, its later section) for every use of a later name."""
    names, order = top_level_names(), {name: n for n, (_, name) in enumerate(BANNERS)}
    found = set()
    for node in TREE.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)):
            continue
        here = section_of(node.lineno)
        own = local_names(node) if not isinstance(node, ast.Assign) else set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in own:
                there = names.get(sub.id)
                if there is not None and order[there] > order[here]:
                    found.add((here, getattr(node, "name", "?"), sub.id, there))
    return sorted(found)


def test_banners_are_the_docstring_table_in_order():
    doc = ast.get_docstring(TREE)
    listed = re.findall(r"^    (\S(?:.*?\S)?)\s{2,}— ", doc, re.M)
    assert listed == [name for _, name in BANNERS]


def test_no_definition_uses_one_of_a_later_section():
    assert upward_uses() == []


@pytest.mark.parametrize("section", [name for _, name in BANNERS])
def test_every_section_has_tests(section):
    files = SECTION_TESTS.get(section)
    assert files, f"name the tests of section {section} in SECTION_TESTS"
    for name in files:
        path = ROOT / "tests" / name
        assert path.exists() and "def test_" in path.read_text(), name


def test_no_backslash_continuations():
    cut = [n for n, text in enumerate(SOURCE.splitlines(), 1)
           if text.rstrip().endswith("\\") and not text.lstrip().startswith("#")]
    inside_strings = {n for node in ast.walk(TREE) if isinstance(node, ast.Constant)
                      and isinstance(node.value, str)
                      for n in range(node.lineno, node.end_lineno)}
    assert [n for n in cut if n not in inside_strings] == []


def test_start_up_compiles_no_pattern_and_imports_no_lazy_module():
    """Module-level patterns are LazyRegex (compiled when first used) and the lazy modules
    are not imported at the top: every `ph`, `mdb` and `--version` would pay for them."""
    lazy = {"re", "ipaddress", "fnmatch", "weakref", "zlib", "asyncio", "json", "argparse",
            "socket", "selectors", "hashlib", "base64"}
    for node in TREE.body:
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            names = set()
        assert not names & lazy, f"line {node.lineno}: imports {names & lazy} at the top"
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.Expr)):
            for call in ast.walk(node):
                func = getattr(call, "func", None) if isinstance(call, ast.Call) else None
                if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "re":
                    raise AssertionError(f"line {node.lineno}: re.{func.attr} at the top")
