"""pharos scan: targets, port lists, the DER reader and neighbour parsers, and real scans
of listeners started here on 127.77.0.x (the only addresses a test scans)."""

import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading

import pytest

from conftest import PHAROS, need

sys.path.insert(0, str(PHAROS.parent))
import pharos  # noqa: E402

ip = pharos.ipaddress.ip_address


def scan(*args, timeout=60):
    """`pharos.py scan ARGS -n --no-mdns` in a subprocess: (exit, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(PHAROS), "scan", *args, "-n", "--no-mdns"],
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


# -- pure pieces ---------------------------------------------------------------------

@pytest.mark.parametrize("text, first, last", [
    ("192.168.1.0/24", "192.168.1.0", "192.168.1.255"),
    ("192.168.1.77/30", "192.168.1.76", "192.168.1.79"),
    ("10.0.0.10-50", "10.0.0.10", "10.0.0.50"),
    ("10.0.0.250-10.0.1.5", "10.0.0.250", "10.0.1.5"),
    ("127.0.0.7", "127.0.0.7", "127.0.0.7"),
    ("fd00::1-fd00::3", "fd00::1", "fd00::3"),
    ("fd00::/126", "fd00::", "fd00::3"),
])
def test_parse_target_ranges(text, first, last):
    assert pharos.parse_target(text) == ("range", ip(first), ip(last))


@pytest.mark.parametrize("text", ["localhost", "web-1.example.org", "nas"])
def test_parse_target_names(text):
    assert pharos.parse_target(text) == ("name", text)


@pytest.mark.parametrize("text", ["10.0.0.50-10", "300.1.1.1", "1.2.3.4/33", "10.0.0.1-256",
                                  "bad_host!", "10.0.0.1-fd00::1", "", "-"])
def test_parse_target_refuses(text):
    with pytest.raises(pharos.UsageError, match="bad target"):
        pharos.parse_target(text)


def test_parse_targets_limits_the_size():
    assert len(pharos.parse_targets(["10.0.0.0/16"])) == 1
    with pytest.raises(pharos.UsageError, match="--force"):
        pharos.parse_targets(["10.0.0.0/15"])
    with pytest.raises(pharos.UsageError, match="65,537"):
        pharos.parse_targets(["10.0.0.0/16", "10.1.0.0"])
    assert pharos.parse_targets(["10.0.0.0/15"], force=True)


@pytest.mark.parametrize("text, ports", [
    ("22", [22]), ("22,80,443", [22, 80, 443]), ("8000-8003,22", [22, 8000, 8001, 8002, 8003]),
    ("80,80,79-81", [79, 80, 81]), (" 22 , 23 ", [22, 23]), ("65535", [65535]),
])
def test_parse_ports(text, ports):
    assert pharos.parse_ports(text) == ports


def test_parse_ports_keywords():
    top = pharos.parse_ports("top100")
    assert len(top) == 100 and {22, 80, 443, 3389, 8080} <= set(top)
    assert pharos.parse_ports("all") == list(range(1, 65536))
    assert pharos.parse_ports("top100,65000")[-1] == 65000


@pytest.mark.parametrize("text, bad", [("0", "0"), ("65536", "65536"), ("80-22", "80-22"),
                                       ("22,,80", ""), ("ssh", "ssh"), ("1-2-3", "1-2-3"),
                                       ("22;80", "22;80"), ("top10", "top10")])
def test_parse_ports_refuses(text, bad):
    with pytest.raises(pharos.UsageError, match=f"bad --ports item '{bad}'"):
        pharos.parse_ports(text)


def test_local_networks():
    interfaces = [("lo", "127.0.0.1/255.0.0.0"), ("eth0", "192.168.1.20/255.255.255.0"),
                  ("eth1", "10.3.4.5/255.0.0.0"), ("wlan0", "169.254.3.3/255.255.0.0"),
                  ("eth2", "192.168.1.21/255.255.255.0")]
    networks, notes = pharos.local_networks(interfaces)
    assert [(n, str(net)) for n, net in networks] == [("eth0", "192.168.1.0/24"),
                                                      ("eth1", "10.3.0.0/16")]
    assert notes == ["eth1: 10.0.0.0/8 is larger than a /16; scanning 10.3.0.0/16 "
                     "(--force scans all of it)"]
    forced, notes = pharos.local_networks(interfaces, force=True)
    assert str(forced[1][1]) == "10.0.0.0/8" and not notes


def test_interface_addresses_reads_without_error():
    for name, text in pharos.interface_addresses():
        assert name and pharos.ipaddress.ip_interface(text).version == 4


def test_parse_proc_arp():
    text = ("IP address       HW type     Flags       HW address            Mask     Device\n"
            "192.168.1.1      0x1         0x2         AA:BB:CC:00:11:22     *        eth0\n"
            "192.168.1.9      0x1         0x0         00:00:00:00:00:00     *        eth0\n"
            "192.168.1.7      0x1         0x2         52:54:00:12:34:56     *        br0\n"
            "garbage\n")
    assert pharos.parse_proc_arp(text) == [("192.168.1.1", "aa:bb:cc:00:11:22", "eth0"),
                                           ("192.168.1.7", "52:54:00:12:34:56", "br0")]


def test_parse_ip_neigh():
    text = ("fe80::1 dev eth0 lladdr aa:bb:cc:00:11:22 router REACHABLE\n"
            "fd00::5 dev eth0 lladdr 52:54:00:12:34:56 STALE\n"
            "fd00::1 dev eth0 FAILED\n"
            "fd00::9 dev eth0 lladdr\n")
    assert pharos.parse_ip_neigh(text) == [("fe80::1", "aa:bb:cc:00:11:22", "eth0"),
                                           ("fd00::5", "52:54:00:12:34:56", "eth0")]


@pytest.mark.parametrize("mac, random", [("52:54:00:12:34:56", False), ("0a:00:27:00:00:01", False),
                                         ("aa:bb:cc:00:11:22", True), ("02:fc:00:00:00:05", True),
                                         ("00:1b:21:3a:4f:10", False), ("f4:5c:89:00:00:00", False),
                                         ("de:ad:be:ef:00:01", True)])
def test_random_mac(mac, random):
    assert pharos.is_random_mac(mac) is random


def test_oui_vendors_reads_each_list_format():
    ieee = ["00-1B-21   (hex)\t\tIntel Corporate", "001B21     (base 16)\t\tIntel Corporate"]
    nmap = ["# comment", "525400 QEMU virtual NIC", "F45C89 Apple", "F45C891 Longer Prefix Co"]
    arp_scan = ["001B21\tIntel Corporate", "0050C2\tIEEE Registration Authority"]
    macs = {"00:1b:21:3a:4f:10", "52:54:00:12:34:56", "f4:5c:89:10:00:00", "f4:5c:89:20:00:00",
            "11:22:33:44:55:66"}
    assert pharos.oui_vendors(macs, ieee) == {"00:1b:21:3a:4f:10": "Intel Corporate"}
    assert pharos.oui_vendors(macs, nmap) == {"52:54:00:12:34:56": "QEMU virtual NIC",
                                              "f4:5c:89:10:00:00": "Longer Prefix Co",
                                              "f4:5c:89:20:00:00": "Apple"}
    assert pharos.oui_vendors(macs, arp_scan) == {"00:1b:21:3a:4f:10": "Intel Corporate"}


@pytest.mark.parametrize("data, server, title", [
    (b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\n<html><title>Home Assistant</title>",
     "nginx", "Home Assistant"),
    (b"HTTP/1.0 200 OK\r\nserver:  Caddy \r\n\r\n<TITLE lang=en>\n  A &amp; B\n</TITLE>",
     "Caddy", "A & B"),
    (b"HTTP/1.0 404 Not Found\r\n\r\n", "", ""),
    (b"HTTP/1.0 200 OK\r\nServer: evil\x1b[31m\x07red\r\n\r\n<title>x\x00y\x1b]0;t\x07</title>",
     "evil [31m red", "x y ]0;t"),
    (b"HTTP/1.0 200 OK\r\n\r\n<title>" + b"long " * 100 + b"</title>", "",
     ("long " * 16).strip()),
])
def test_http_details(data, server, title):
    assert pharos.http_details(data) == (server, title)


def test_banner_text_is_cleaned_and_capped():
    assert pharos.clean_text(b"220 mail\x00\x1b[2J ready\r\n") == "220 mail [2J ready"
    assert len(pharos.clean_text(b"x" * 5000)) == pharos.BANNER_TEXT
    assert pharos.first_line(b"\r\n\r\n  \n+OK POP3 ready\r\nmore") == "+OK POP3 ready"
    assert pharos.ssh_software("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u1") == "OpenSSH_9.2p1"
    assert pharos.ssh_software("SSH-2.0-dropbear_2022.83") == "dropbear_2022.83"


@pytest.mark.parametrize("details, value", [
    (["nginx", '"Home Assistant"'], '443/https nginx "Home Assistant"'),
    ([], "22/ssh"), (["", ""], "22/ssh"),
    (["Apache/2.4.57 (Debian)", '"A very long page title that goes on"'],
     '443/https Apache/2.4.57 (Debian) "A ver"'),
])
def test_service_value_fits_the_schema(details, value):
    name = "ssh" if not any(details) else "https"
    port = 22 if name == "ssh" else 443
    assert pharos.service_value(port, name, details) == value
    assert len(value) <= pharos.SERVICE_MAX


def test_address_hostname():
    assert pharos.address_hostname("10.0.0.7") == "ip-10-0-0-7"
    assert pharos.address_hostname("fd00::1") == "ip-fd00--1"
    assert pharos.check_hostname(pharos.address_hostname("fd00::1"))


def test_reverse_dns_of_loopback():
    names = pharos.resolve_names([ip("127.0.0.1")], 5.0)
    assert names.get(ip("127.0.0.1")), names


# -- certificates: a real one from openssl, and broken DER ---------------------------

@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A self-signed EC certificate made by openssl: (cert file, key file)."""
    need(shutil.which("openssl"), "the openssl command")
    where = tmp_path_factory.mktemp("cert")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/O=Pharos Test/CN=scan.test",
                    "-addext", "subjectAltName=DNS:scan.test,DNS:alt.scan.test,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_cert_names_of_an_openssl_certificate(cert):
    der = ssl.PEM_cert_to_DER_cert(cert[0].read_text())
    assert pharos.cert_names(der) == ("scan.test", ["scan.test", "alt.scan.test"])


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x85\x00\x00\x00\x00\x01",
                                 b"\x30\x03\x30\x01", b"\x30\x82\xff\xff\x00",
                                 b"\x30\x02\x30\x00"])
def test_cert_names_refuses_broken_der(der):
    with pytest.raises(pharos.DerError):
        pharos.cert_names(der)


# -- real scans of listeners on 127.77.0.x -------------------------------------------

class Listener:
    """A TCP listener on a loopback address that answers each connection with ``serve``."""

    def __init__(self, address, port, serve=None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(64)
        self.serve = serve
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5)
                    if self.serve:
                        self.serve(conn)
                except OSError:
                    pass

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def ssh_greeting(conn):
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u1\r\n")
    conn.recv(100)


def http_page(conn):
    conn.recv(4096)
    conn.sendall(b"HTTP/1.0 200 OK\r\nServer: TestServer/1.0\r\nContent-Type: text/html\r\n\r\n"
                 b"<html><head><title>Scan \x1b[1mme</title></head></html>")


def tls_server(cert):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert[0]), str(cert[1]))

    def serve(conn):
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(4096)
            tls.sendall(b"HTTP/1.0 404 Not Found\r\n\r\n")
    return serve


@pytest.fixture
def listeners(cert):
    """Listeners on 127.77.0.2-5: SSH, HTTP, TLS and a silent port; {(ip, port): value}."""
    started = {("127.77.0.2", 2222): (ssh_greeting, "2222/ssh OpenSSH_9.2p1"),
               ("127.77.0.3", 8008): (http_page, '8008/http TestServer/1.0 "Scan [1mme"'),
               ("127.77.0.4", 9443): (tls_server(cert), "9443/https scan.test alt.scan.test"),
               ("127.77.0.5", 7070): (None, "7070/tcp"),
               ("127.77.0.5", 2222): (ssh_greeting, "2222/ssh OpenSSH_9.2p1")}
    socks = [Listener(a, p, serve).sock for (a, p), (serve, _) in started.items()]
    yield {key: value for key, (_, value) in started.items()}
    for sock in socks:
        sock.shutdown(socket.SHUT_RDWR)   # wakes the accept() of its thread
        sock.close()


def test_scan_finds_exactly_the_listeners(listeners):
    code, out, err = scan("127.77.0.1-6", "--ports", "2222,7070,8008,9443,22,80,443",
                              "--dry-run", "--json", "--timeout", "2")
    assert code == 0, err
    records = json.loads(out)
    found = {(r["ip"][0], int(s.split("/")[0])): s for r in records for s in r["services"]}
    assert found == listeners
    assert [r["hostname"] for r in records] == ["ip-127-77-0-2", "ip-127-77-0-3",
                                                "ip-127-77-0-4", "ip-127-77-0-5"]
    assert all(r["type"] == "machine" and "mac" not in r for r in records)


def test_scan_jsonl_and_table(listeners):
    code, out, err = scan("127.77.0.5", "--ports", "7070,2222", "--dry-run", "--jsonl")
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == [
        {"type": "machine", "hostname": "ip-127-77-0-5", "ip": ["127.77.0.5"],
         "services": ["2222/ssh OpenSSH_9.2p1", "7070/tcp"]}]
    code, out, err = scan("127.77.0.2", "--ports", "2222", "--dry-run")
    assert code == 0, err
    assert out.splitlines() == ["HOSTNAME       IP          SERVICES",
                                "ip-127-77-0-2  127.77.0.2  2222/ssh OpenSSH_9.2p1"]


def test_scan_of_nothing_exits_1():
    code, out, err = scan("127.77.1.1-20", "--ports", "1-50", "--dry-run", "--json")
    assert (code, json.loads(out)) == (1, [])


def test_scan_of_a_host_name_keeps_the_name():
    listener = Listener("127.0.0.1", 0, ssh_greeting)
    port = listener.sock.getsockname()[1]
    try:
        code, out, err = scan("localhost", "--ports", str(port), "--dry-run", "--json")
    finally:
        listener.sock.shutdown(socket.SHUT_RDWR)
        listener.sock.close()
    assert code == 0, err
    assert json.loads(out) == [{"type": "machine", "hostname": "localhost", "ip": ["127.0.0.1"],
                                "services": [f"{port}/ssh OpenSSH_9.2p1"]}]


@pytest.mark.parametrize("args, message", [
    (["10.0.0.50-10"], "pharos: scan: bad target '10.0.0.50-10': say a CIDR"),
    (["127.0.0.1", "bad_host!"], "pharos: scan: bad target 'bad_host!'"),
    (["127.0.0.1", "--ports", "22,http"], "pharos: scan: bad --ports item 'http'"),
    (["127.0.0.1", "--ports", "0-10"], "pharos: scan: bad --ports item '0-10'"),
    (["10.0.0.0/8"], "pharos: scan: the targets hold 16,777,216 addresses"),
    (["127.0.0.1", "--timeout", "0"], "pharos scan: argument --timeout"),
    (["no-such-host.invalid"], "pharos: scan: bad target 'no-such-host.invalid': no such host"),
])
def test_bad_scan_arguments_exit_2_with_one_line(args, message):
    code, out, err = scan(*args, "--dry-run")
    assert code == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith(message), err
