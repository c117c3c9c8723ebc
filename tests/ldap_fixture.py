"""A throwaway OpenLDAP slapd for the tests: built from contrib/ldap/, run on 127.0.0.1.

``Slapd(dir).start()`` writes a cn=config from contrib/ldap/slapd.ldif.in, loads it and
the base entry with slapadd, starts slapd on a free port (and an ldapi socket in the
dir) and waits until it answers. ``stop()`` ends it by its pid; ``start()`` again brings
it back on the same port with the same data.
"""

import os
import shutil
import signal
import socket
import subprocess
import urllib.parse
from pathlib import Path

from conftest import need, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib" / "ldap"
SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SUFFIX = "dc=pharos,dc=test"
ROOTDN = f"cn=admin,{SUFFIX}"
ROOTPW = "secret"


def need_slapd():
    """Skip without slapd, ldap-utils and ldap3 (fail in CI)."""
    need(os.path.exists(SLAPD) and shutil.which("ldapsearch"),
         "slapd and ldap-utils (apt-get install slapd ldap-utils)")
    try:
        import ldap3  # noqa: F401
    except ImportError:
        need(False, "ldap3 (pip install 'ldap3>=2.9.1,<3')")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slapd:
    """One slapd instance living in ``path``."""

    def __init__(self, path, port=None, server_id=None, replication="", base=True):
        self.path = Path(path)
        self.port = port or free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        sock = str(self.path / "ldapi")
        self.ldapi_url = "ldapi://" + urllib.parse.quote(sock, safe="")
        self.server_id, self.replication = server_id, replication
        self.proc = None
        self.configured, self.base = False, base

    def configure(self):
        """Write and slapadd the cn=config tree and the base entry."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "slapd.d").mkdir()
        (self.path / "data").mkdir()
        pwhash = subprocess.run(["/usr/sbin/slappasswd", "-s", ROOTPW], check=True,
                                capture_output=True, text=True).stdout.strip()
        text = (CONTRIB / "slapd.ldif.in").read_text()
        replication = "".join(line + "\n" for line in self.replication.splitlines()
                              if not line.startswith("#"))
        server_id = f"olcServerID: {self.server_id}\n" if self.server_id else ""
        text = text.replace("@SERVERID@\n", server_id).replace("@REPLICATION@\n", replication)
        for name, value in {"DIR": str(self.path), "SUFFIX": SUFFIX, "ROOTDN": ROOTDN,
                            "ROOTPW": ROOTPW,
                            "PWHASH": pwhash, "UID": str(os.getuid()),
                            "GID": str(os.getgid()), "SCHEMA": "/etc/ldap/schema",
                            "MODULES": "/usr/lib/ldap", "CONTRIB": str(CONTRIB)}.items():
            text = text.replace(f"@{name}@", value)
        (self.path / "config.ldif").write_text(text)
        self.slapadd("-n", "0", "-l", str(self.path / "config.ldif"))
        self.configured = True
        if not self.base:               # a replica: the base entry comes by replication
            return
        base = (f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
                f"dc: pharos\no: pharos\n")
        (self.path / "base.ldif").write_text(base)
        self.slapadd("-b", SUFFIX, "-l", str(self.path / "base.ldif"))

    def slapadd(self, *args):
        done = subprocess.run([SLAPADD, "-F", str(self.path / "slapd.d"), *args],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def start(self):
        """Start slapd (configuring it the first time) and wait until it answers."""
        if not self.configured:
            self.configure()
        log = open(self.path / "slapd.log", "ab")
        self.proc = subprocess.Popen([SLAPD, "-F", str(self.path / "slapd.d"), "-h",
                                      f"{self.url} {self.ldapi_url}", "-d", "0"],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()

        def answers():
            assert self.proc.poll() is None, (self.path / "slapd.log").read_text()
            return self.ldap("ldapsearch", "-s", "base", "-b", SUFFIX, "1.1",
                             check=False).returncode == 0
        wait_for(answers, timeout=20, interval=0.05, what="slapd to answer")
        return self

    def stop(self):
        """SIGTERM slapd (our child, by pid) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def pid(self):
        return self.proc.pid

    def ldap(self, tool, *args, input=None, check=True):
        """Run an ldap-utils tool against this server as the admin."""
        done = subprocess.run([tool, "-x", "-o", "nettimeout=2", "-H", self.url, "-D", ROOTDN,
                               "-w", ROOTPW, *args], input=input, capture_output=True,
                              text=True, timeout=30)
        if check:
            assert done.returncode == 0, f"{tool} {args}: {done.stderr}"
        return done

    def modify(self, ldif):
        """ldapmodify with ``ldif`` (changetype lines included)."""
        return self.ldap("ldapmodify", input=ldif)

    def search(self, base, filt="(objectClass=*)", *attrs, scope="sub"):
        """ldapsearch -LLL as {dn: {attr: [values]}} (values unwrapped, base64 decoded)."""
        out = self.ldap("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-s", scope, "-b", base,
                        filt, *attrs).stdout
        return parse_ldif(out)

    def load_schema(self, name):
        """ldapadd a schema file from contrib/ldap into cn=config over ldapi."""
        done = subprocess.run(["ldapadd", "-Q", "-Y", "EXTERNAL", "-H", self.ldapi_url, "-f",
                               str(CONTRIB / name)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr


def parse_ldif(text):
    """{dn: {attr: [values]}} from unwrapped LDIF (``attr:: base64`` decoded)."""
    import base64
    entries, current = {}, None
    for line in text.splitlines():
        if not line.strip():
            current = None
            continue
        if line.startswith("#"):
            continue
        attr, _, value = line.partition(":")
        if value.startswith(":"):
            value = base64.b64decode(value[1:].strip()).decode("utf-8")
        else:
            value = value[1:] if value.startswith(" ") else value
        if attr == "dn":
            current = entries.setdefault(value, {})
        else:
            current.setdefault(attr, []).append(value)
    return entries


def providers(path):
    """Two slapds in multi-provider replication (configured, not started): the second
    gets the base entry from the first."""
    ports = free_port(), free_port()
    template = (CONTRIB / "replication.ldif.in").read_text()
    out = []
    for n in (0, 1):
        text = template.replace("@PEER@", f"ldap://127.0.0.1:{ports[1 - n]}").replace(
            "@RID@", f"00{n + 1}")
        out.append(Slapd(Path(path) / f"provider{n + 1}", ports[n], server_id=n + 1,
                         replication=text, base=n == 0))
    return out
