"""The zipapp: a reproducible build, busybox names, and a real server run from it."""

import os
import signal
import socket
import subprocess
import sys
import zipfile

import pytest

from conftest import LISTEN_RE, ROOT, ServerProcess

BUILD = ROOT / "build_zipapp.py"
TIMEOUT = 60


def build(output):
    """Run build_zipapp.py in a subprocess; return the completed process."""
    return subprocess.run([sys.executable, str(BUILD), "--output", str(output)],
                          capture_output=True, text=True, timeout=TIMEOUT)


def run(*args, **env):
    """Run a command (the zipapp or a link to it) with our interpreter first on PATH."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, PATH=path, **env)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def version():
    """pharos.__version__, imported from the repo root."""
    sys.path.insert(0, str(ROOT))
    try:
        import pharos
    finally:
        sys.path.remove(str(ROOT))
    return pharos.__version__


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    """One zipapp built for the module's tests."""
    out = tmp_path_factory.mktemp("zipapp") / "pharos.pyz"
    result = build(out)
    assert result.returncode == 0, result.stderr
    return out


def test_build_prints_path_and_size(tmp_path):
    out = tmp_path / "sub" / "pharos.pyz"
    result = build(out)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert str(out.stat().st_size) in result.stdout


def test_two_builds_give_identical_bytes(tmp_path):
    first, second = tmp_path / "first.pyz", tmp_path / "second.pyz"
    assert build(first).returncode == 0
    assert build(second).returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_archive_holds_main_and_module_with_fixed_metadata(pyz):
    with zipfile.ZipFile(pyz) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["__main__.py", "pharos.py"]
        assert zf.read("pharos.py") == (ROOT / "pharos.py").read_bytes()
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos} == {0o100644}


def test_starts_with_shebang_and_is_executable(pyz):
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(pyz, os.X_OK)
    assert pyz.stat().st_mode & 0o777 == 0o755


def test_version(pyz, version):
    result = run(pyz, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pharos {version}"


def test_bad_argument_is_one_line_and_exit_2(pyz):
    result = run(pyz, "serve", "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_too_old_python_is_refused_with_one_line(pyz):
    code = ("import runpy, sys; sys.version_info = (3, 9, 18, 'final', 0); "
            f"runpy.run_path({str(pyz)!r}, run_name='__main__')")
    result = run(sys.executable, "-c", code)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pharos: needs Python 3.10 or newer, this is Python 3.9"]


@pytest.mark.parametrize("name", ["ph", "mdb"])
def test_busybox_links_run(pyz, version, tmp_path, name):
    link = tmp_path / name
    link.symlink_to(pyz)
    result = run(link, "--version")
    assert result.returncode == 0, result.stderr
    assert version in result.stdout


def test_doctor_names_the_python_version(pyz, tmp_path):
    with socket.socket() as closed:             # bound, not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        where = f"127.0.0.1:{closed.getsockname()[1]}"
        result = run(sys.executable, pyz, "doctor", HOME=str(tmp_path), PHAROS_SERVER=where)
    assert result.returncode == 3, result.stderr   # the server check fails
    assert "Traceback" not in result.stderr, result.stderr
    assert "%d.%d" % sys.version_info[:2] in result.stdout + result.stderr


def test_serves_status_and_exits_0_on_sigterm(pyz):
    srv = ServerProcess(None, storage="memory")
    srv.args = [sys.executable, str(pyz), "serve", "--listen", "127.0.0.1:0",
                "--storage", "memory", "--tier", "dev", "--metrics", "off"]
    try:
        srv.start()
        assert LISTEN_RE.search(srv.stderr).group(1) == b"127.0.0.1"
        with srv.client() as client:
            assert client.cmd("status")[-1] == "200:Database ready."
        returncode, stderr = srv.stop(signal.SIGTERM)
        assert returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        srv.kill()


def cache_file(pyz, cache_home):
    """The compile cache file a zipapp keeps under ``cache_home`` for this interpreter."""
    import hashlib
    with zipfile.ZipFile(pyz) as zf:
        digest = hashlib.sha256(zf.read("pharos.py")).hexdigest()
    tag = sys.implementation.cache_tag
    return cache_home / "pharos" / f"pharos-{digest[:32]}-{tag}.bin", digest


def test_compiled_module_is_cached_and_a_damaged_cache_is_replaced(pyz, version, tmp_path):
    path, digest = cache_file(pyz, tmp_path)
    assert run(pyz, "--version", XDG_CACHE_HOME=str(tmp_path)).stdout.strip() == f"pharos {version}"
    data = path.read_bytes()
    assert data.startswith(digest.encode() + b"\n")
    assert path.parent.stat().st_mode & 0o777 == 0o700
    path.write_bytes(data[:len(data) // 2])
    assert run(pyz, "--version", XDG_CACHE_HOME=str(tmp_path)).returncode == 0
    assert path.read_bytes() == data
    # The cache is what runs: code cached under this build's digest is executed.
    import marshal
    planted = compile("def main():\n    print('from the cache')\n    return 0\n", "x", "exec")
    path.write_bytes(digest.encode() + b"\n" + marshal.dumps(planted))
    assert run(pyz, "--version", XDG_CACHE_HOME=str(tmp_path)).stdout == "from the cache\n"


def test_an_unusable_cache_directory_does_not_stop_the_zipapp(pyz, version, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = run(pyz, "--version", XDG_CACHE_HOME=str(blocker))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pharos {version}" and result.stderr == ""


def test_version_and_lookups_import_no_asyncio_at_start():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pharos; "
            "print(sorted(m for m in ('asyncio', 'ssl', 'http.server', 'csv') if m in sys.modules))")
    result = run(sys.executable, "-c", code, str(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
