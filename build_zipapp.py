#!/usr/bin/env python3
"""Build dist/pharos.pyz, a reproducible zipapp of pharos.py.

The same pharos.py always gives the same bytes: members are written in a fixed
order with a fixed timestamp (1980-01-01), fixed permissions and a fixed
compression level, behind a `#!/usr/bin/env python3` line, and the file is made
executable. Usage: python3 build_zipapp.py [--output PATH]
"""

import argparse
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
# to print the message rather than a SyntaxError.
MAIN_PY = b'''\
import sys

if sys.version_info < (3, 10):
    sys.stderr.write("pharos: needs Python 3.10 or newer, this is Python %d.%d\\n"
                     % sys.version_info[:2])
    sys.exit(2)

import pharos

sys.exit(pharos.main())
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
    data = archive_bytes([("__main__.py", MAIN_PY), ("pharos.py", source.read_bytes())])
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
