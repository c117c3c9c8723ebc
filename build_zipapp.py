#!/usr/bin/env python3
"""Build dist/pharos.pyz, a reproducible zipapp of pharos.py.

The same pharos.py always gives the same bytes: members are written in a fixed
order with a fixed timestamp (1980-01-01), fixed permissions and a fixed
compression level, behind a `#!/usr/bin/env python3` line, and the file is made
executable. Usage: python3 build_zipapp.py [--output PATH]
"""

import argparse
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "pharos.py"
DEFAULT_OUTPUT = ROOT / "dist" / "pharos.pyz"
SHEBANG = b"#!/usr/bin/env python3\n"
EPOCH = (1980, 1, 1, 0, 0, 0)
MEMBER_MODE = 0o100644
ARCHIVE_MODE = 0o755

# No f-strings or newer syntax here: an old Python must compile this far
# to print the message rather than a SyntaxError.  The compiled module is cached
# (keyed by the source's SHA-256, baked in at build time, and the interpreter's
# cache tag), so a start after the first skips compiling thousands of lines.
MAIN_PY = b'''\
import sys

if sys.version_info < (3, 10):
    sys.stderr.write("pharos: needs Python 3.10 or newer, this is Python %d.%d\\n"
                     % sys.version_info[:2])
    sys.exit(2)

import marshal
import os

SOURCE_SHA256 = "@DIGEST@"


def cache_path():
    """Where this build's compiled module is kept for this interpreter."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = "pharos-%s-%s.bin" % (SOURCE_SHA256[:32], sys.implementation.cache_tag)
    return os.path.join(base, "pharos", name)


def read_cache(path):
    """The cached code object, or None when the cache is missing or not this build's."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    head = SOURCE_SHA256.encode() + b"\\n"
    if not data.startswith(head):
        return None
    try:
        return marshal.loads(data[len(head):])
    except (EOFError, ValueError, TypeError):
        return None


def write_cache(path, code):
    """Keep ``code`` for the next start: written whole or not at all; errors ignored."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(SOURCE_SHA256.encode() + b"\\n" + marshal.dumps(code))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def pharos_code():
    """pharos.py compiled: from the cache when it holds this build, else compiled now."""
    path = cache_path()
    code = read_cache(path)
    if code is None:
        source_path = os.path.join(os.path.dirname(__file__), "pharos.py")
        code = compile(__loader__.get_data(source_path), source_path, "exec")
        write_cache(path, code)
    return code


def load_pharos():
    """The pharos module, run from its (cached) code and registered under its name."""
    module = type(sys)("pharos")
    module.__file__ = os.path.join(os.path.dirname(__file__), "pharos.py")
    sys.modules["pharos"] = module
    exec(pharos_code(), module.__dict__)
    return module


sys.exit(load_pharos().main())
'''


def zip_member(name):
    """A ZipInfo for `name` that carries nothing from the build machine."""
    info = zipfile.ZipInfo(name, date_time=EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3
    info.external_attr = MEMBER_MODE << 16
    return info


def archive_bytes(members):
    """The shebang line followed by a zip of `members`, (name, bytes) in order."""
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(zip_member(name), data, compresslevel=9)
    return buf.getvalue()


def write_executable(path, data):
    """Write `data` to `path` atomically, with mode 0755."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, ARCHIVE_MODE)
    os.replace(tmp, path)


def build(source, output):
    """Build the zipapp at `output` from `source`; return its size in bytes."""
    text = source.read_bytes()
    main_py = MAIN_PY.replace(b"@DIGEST@", hashlib.sha256(text).hexdigest().encode())
    data = archive_bytes([("__main__.py", main_py), ("pharos.py", text)])
    write_executable(output, data)
    return len(data)


def main(argv=None):
    """Parse the command line, build, and print the path and size."""
    parser = argparse.ArgumentParser(description="Build a reproducible pharos.pyz.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the zipapp (default: dist/pharos.pyz)")
    args = parser.parse_args(argv)
    try:
        size = build(SOURCE, args.output)
    except OSError as exc:
        print(f"build_zipapp: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output} {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
