"""secret+tls:// for real: secretbusd's TLS listener on a free loopback port, certificates made
here with openssl, and Debian 12's unmodified virsh 9.0 and python3-libvirt 9.0 as clients
(plus secretbus's own client). Refusals show libvirt's client message and serve nothing."""
from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
from fixtures import U1, U2, secret_xml
from harness.events import EventWatch
from harness.ports import free_port
from harness.procs import remove_tree

from secretbus.rpc.tls import dn_string

SENTINEL = b"tls-S3ntinel\x00\x01\xff"
DEBIAN_PYTHON = "/usr/bin/python3"
REPO = Path(__file__).resolve().parents[1]
CA_SUBJ = "/C=GB/ST=London/L=London/O=secretbus test/CN=secretbus test CA"
DN_BASE = "C=GB,ST=London,L=London,O=secretbus test"

pytestmark = pytest.mark.skipif(shutil.which("virsh") is None or shutil.which("openssl") is None,
                                reason="virsh (libvirt-clients) and openssl needed")


# -- a test PKI (openssl), with the extensions libvirt's client sanity checks want -----------------
CA_EXT = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
SERVER_EXT = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
CLIENT_EXT = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=clientAuth\n")


@dataclass
class Pki:
    d: Path

    def run(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.d)

    def ca(self, name: str = "ca") -> Path:
        (self.d / f"{name}.ext").write_text(CA_EXT)
        self.run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
                 "-days", "2", "-subj", CA_SUBJ, "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        (self.d / f"{name}.key").chmod(0o600)
        return self.d / f"{name}.pem"

    def cert(self, name: str, subj: str, ext: str, ca: str = "ca") -> tuple[Path, Path]:
        (self.d / f"{name}.ext").write_text(ext)
        self.run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj)
        self.run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
        (self.d / f"{name}.key").chmod(0o600)
        return self.d / f"{name}.pem", self.d / f"{name}.key"

    def client_dir(self, name: str, cn: str, *, sign_ca: str = "ca", subj: str | None = None) -> Path:
        """A pkipath= directory: cacert.pem (the server's CA, and the one that signed the client
        when another: libvirt's client checks its own certificate too), clientcert.pem, clientkey.pem."""
        cert, key = self.cert(name, subj or f"/C=GB/ST=London/L=London/O=secretbus test/CN={cn}", CLIENT_EXT,
                              ca=sign_ca)
        out = self.d / f"pki-{name}"
        out.mkdir(mode=0o700)
        cas = {"ca", sign_ca}
        (out / "cacert.pem").write_text("".join((self.d / f"{c}.pem").read_text() for c in sorted(cas)))
        shutil.copy(cert, out / "clientcert.pem")
        shutil.copy(key, out / "clientkey.pem")
        return out

    def revoke(self, name: str) -> Path:
        """A CRL of `ca` that revokes `name`'s certificate."""
        db = self.d / "ca-db"
        db.mkdir(exist_ok=True)
        (db / "index.txt").touch()
        (db / "crlnumber").write_text("01\n")
        (self.d / "ca.cnf").write_text(f"""[ ca ]
default_ca = test
[ test ]
database = {db}/index.txt
crlnumber = {db}/crlnumber
certificate = {self.d}/ca.pem
private_key = {self.d}/ca.key
default_md = sha256
default_crl_days = 2
""")
        self.run("ca", "-config", "ca.cnf", "-revoke", f"{name}.pem")
        self.run("ca", "-config", "ca.cnf", "-gencrl", "-out", "cacrl.pem")
        return self.d / "cacrl.pem"


@dataclass
class Tls:
    pki: Pki
    port: int
    conf: Path
    good: Path          # pkipath of a client the grants give rw+values
    daemon: harness.Secretbusd

    @property
    def uri(self) -> str:
        return self.uri_for(self.good)

    def uri_for(self, pkipath: Path, host: str = "127.0.0.1") -> str:
        return f"secret+tls://{host}:{self.port}/system?pkipath={pkipath}"


def conf_text(pki: Pki, port: int, *, dn_list: str = f'"{DN_BASE},CN=*"',
              grants: str = f'"x509:{DN_BASE},CN=ro*=ro", "x509:{DN_BASE},CN=*=rw+values"',
              crl: Path | None = None, listen: int = 1, extra: str = "") -> str:
    return (extra + f'listen_tls = {listen}\ntls_port = "{port}"\nlisten_addr = "127.0.0.1"\n'
            f'key_file = "{pki.d}/server.key"\ncert_file = "{pki.d}/server.pem"\nca_file = "{pki.d}/ca.pem"\n'
            + (f'crl_file = "{crl}"\n' if crl else "")
            + f"tls_allowed_dn_list = [ {dn_list} ]\nremote_access = [ {grants} ]\n")


@pytest.fixture(scope="module")
def pki():
    d = harness.public_tempdir("sb-pki-")
    d.chmod(0o700)
    p = Pki(d)
    p.ca()
    p.cert("server", "/C=GB/O=secretbus test/CN=127.0.0.1", SERVER_EXT)
    yield p
    remove_tree(d)


def start_tls(bus, make_secretbusd, pki: Pki, tmp_path: Path, *, args: tuple[str, ...] = (), **kw) -> Tls:
    port = free_port()
    conf = tmp_path / "secretbusd.conf"
    conf.write_text(conf_text(pki, port, **kw))
    conf.chmod(0o600)
    rpc_dir = tmp_path / "rpc"
    d = make_secretbusd(bus, system=True, wait=False,
                        args=("--no-dbus", "--rpc-dir", str(rpc_dir), "--config", str(conf), *args))
    harness.wait_until(lambda: "over libvirt RPC only" in d.log(), timeout=20, what="secretbusd's TLS listener",
                       proc=d.proc, log=d.log_path)
    good = pki.d / "pki-good"
    if not good.exists():
        pki.client_dir("good", "client1")
    return Tls(pki, port, conf, good, d)


@pytest.fixture
def tls(session_bus, make_secretbusd, pki, tmp_path):
    return start_tls(session_bus, make_secretbusd, pki, tmp_path)


def virsh(uri: str, *args: str, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=timeout,
                          input=input)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout={r.stdout}\nstderr={r.stderr}"
    return r.stdout


def define_file(tmp_path: Path, uuid: str = U1, **kw) -> str:
    f = tmp_path / f"{uuid}.xml"
    f.write_text(secret_xml(uuid, **kw))
    return str(f)


# -- the DN -----------------------------------------------------------------------------------
def test_dn_is_the_string_virt_pki_query_dn_prints(pki):
    """Escaped characters, a multi-valued RDN, certificate order: as libvirt's tools print it."""
    if shutil.which("virt-pki-query-dn") is None:
        pytest.skip("virt-pki-query-dn not installed")
    for name, subj in (("dn1", "/C=GB/ST=London/L=London/O=secretbus test/CN=client1"),
                       ("dn2", "/C=GB/O=secretbus, test;x=y/OU=a+CN=#client\"1 "),
                       ("dn3", "/CN=ünï cödé/O=a\\/b=c")):
        cert, _ = pki.cert(name, subj, CLIENT_EXT)
        if name == "dn2":
            pki.run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "dn2.key", "-out", "dn2.csr",
                    "-multivalue-rdn", "-subj", subj)
            pki.run("x509", "-req", "-in", "dn2.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                    "-out", "dn2.pem", "-days", "2")
        want = subprocess.run(["virt-pki-query-dn", str(cert)], capture_output=True, text=True,
                              check=True).stdout.rstrip("\n")
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        assert dn_string(der) == want


# -- virsh and python3-libvirt over TLS ---------------------------------------------------------
def test_virsh_over_tls(tls, tmp_path):
    u = tls.uri
    assert f"Secret {U1} created" in ok(virsh(u, "secret-define", define_file(tmp_path)))
    assert U1 in ok(virsh(u, "secret-list"))
    assert "Secret value set" in ok(virsh(u, "secret-set-value", U1, "--base64",
                                          base64.b64encode(SENTINEL).decode()))
    assert ok(virsh(u, "secret-get-value", U1)).strip() == base64.b64encode(SENTINEL).decode()
    assert f"<uuid>{U1}</uuid>" in ok(virsh(u, "secret-dumpxml", U1))
    # a private value is never sent over a remote transport, whatever the grant
    ok(virsh(u, "secret-define", define_file(tmp_path, U2, priv="yes", uid="other")))
    ok(virsh(u, "secret-set-value", U2, "--base64", base64.b64encode(SENTINEL).decode()))
    r = virsh(u, "secret-get-value", U2)
    assert r.returncode == 1 and "Invalid secret: secret is private" in r.stderr
    assert base64.b64encode(SENTINEL).decode() not in r.stdout + r.stderr
    # read-only connections (virsh -r: VIR_CONNECT_RO in CONNECT_OPEN) are enforced by the server
    r = subprocess.run(
        [sys.executable, "-m", "secretbus.cli", "-r", "-c", u, "secret-get-value", U1], capture_output=True,
        text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and "read only access prevents virSecretGetValue" in r.stderr, r.stderr
    # secret://host/system is TLS as well, for virsh too
    assert U1 in ok(virsh(f"secret://127.0.0.1:{tls.port}/system?pkipath={tls.good}", "secret-list"))
    assert f"Secret {U1} deleted" in ok(virsh(u, "secret-undefine", U1))
    assert U1 not in ok(virsh(u, "secret-list"))
    log = tls.daemon.log()
    assert f"DN '{DN_BASE},CN=client1'" in log and base64.b64encode(SENTINEL).decode() not in log
    # every remote value read is audited with the DN (the harness's journal receives them)
    entries = [{k: v[0].decode(errors="replace") for k, v in e.items()} for e in list(tls.daemon.journal.entries)]
    records = [r for r in entries if r.get("SECRET_UUID") in (U1, U2)
               and "secret value read" in r.get("MESSAGE", "")]
    assert any(r.get("CALLER_IDENTITY", "").startswith(f"x509 DN '{DN_BASE},CN=client1'")
               and "allowed" in r["MESSAGE"] and r["SECRET_UUID"] == U1 for r in records), records
    assert any("denied (private)" in r["MESSAGE"] and r["SECRET_UUID"] == U2 for r in records), records


def test_virsh_secret_event_over_tls(tls, tmp_path):
    ev = EventWatch(["virsh", "-c", tls.uri, "secret-event", "--event", "lifecycle", "--loop", "--timeout", "20"])
    try:
        time.sleep(1.5)
        ok(virsh(tls.uri, "secret-define", define_file(tmp_path)))
        ok(virsh(tls.uri, "secret-undefine", U1))
        out, err = ev.until(f"secret {U1}: Undefined")
    finally:
        ev.kill()
    assert f"'lifecycle' for secret {U1}: Defined" in out, (out, err)
    assert f"'lifecycle' for secret {U1}: Undefined" in out, (out, err)
    assert out.endswith("events received: 2\n\n"), (out, err)


PY_CLIENT = r'''
import sys, libvirt, threading, time
uri, uuid, xml = sys.argv[1], sys.argv[2], sys.argv[3]
libvirt.virEventRegisterDefaultImpl()
seen = []
def loop():
    while True:
        libvirt.virEventRunDefaultImpl()
threading.Thread(target=loop, daemon=True).start()
c = libvirt.open(uri)
c.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_VALUE_CHANGED,
                         lambda c, s, o: seen.append(s.UUIDString()), None)
s = c.secretDefineXML(xml)
s.setValue(b"python-value")
print("value", s.value().decode())
print("list", [x.UUIDString() for x in c.listAllSecrets()])
for _ in range(50):
    if seen:
        break
    time.sleep(0.1)
print("event", seen)
s.undefine()
print("after", c.numOfSecrets())
'''


def test_python_libvirt_over_tls(tls):
    if not Path(DEBIAN_PYTHON).exists():
        pytest.skip("Debian's python3 not there")
    r = subprocess.run([DEBIAN_PYTHON, "-c", PY_CLIENT, tls.uri, U1, secret_xml(U1)], capture_output=True,
                       text=True, timeout=60)
    if "No module named 'libvirt'" in r.stderr:
        pytest.skip("python3-libvirt not installed")
    out = ok(r)
    assert "value python-value" in out and f"list ['{U1}']" in out
    assert f"event ['{U1}']" in out and "after 0" in out


# -- rights ---------------------------------------------------------------------------------------
def test_a_read_only_grant_lists_but_does_not_change_or_read(tls, tmp_path):
    ok(virsh(tls.uri, "secret-define", define_file(tmp_path)))
    ok(virsh(tls.uri, "secret-set-value", U1, "--base64", base64.b64encode(SENTINEL).decode()))
    ro = tls.uri_for(tls.pki.client_dir("ro", "ro-viewer"))
    assert U1 in ok(virsh(ro, "secret-list"))
    assert f"<uuid>{U1}</uuid>" in ok(virsh(ro, "secret-dumpxml", U1))
    for cmd in (("secret-get-value", U1), ("secret-undefine", U1),
                ("secret-set-value", U1, "--base64", "QUJD"),
                ("secret-define", define_file(tmp_path, U2, uid="other"))):
        r = virsh(ro, *cmd)
        assert r.returncode == 1 and "access denied: 'secret' denied access" in r.stderr, (cmd, r.stderr)
        assert base64.b64encode(SENTINEL).decode() not in r.stdout
    assert ok(virsh(tls.uri, "secret-get-value", U1)).strip() == base64.b64encode(SENTINEL).decode()
    assert U2 not in ok(virsh(tls.uri, "secret-list"))


# -- refusals: libvirt's client message, nothing served --------------------------------------------
CONFIRM_FAILED = "server verification (of our certificate or IP address) failed"


def refused(tls: Tls, pkipath: Path, tmp_path: Path) -> str:
    r = virsh(tls.uri_for(pkipath), "secret-define", define_file(tmp_path, U2, uid="other"))
    assert r.returncode == 1, r.stdout
    assert U2 not in ok(virsh(tls.uri, "secret-list"))          # nothing was served
    return r.stderr


def test_untrusted_client_certificate_is_refused(tls, tmp_path):
    tls.pki.ca("otherca")
    d = tls.pki.client_dir("untrusted", "client1", sign_ca="otherca")
    err = refused(tls, d, tmp_path)
    # the server ends the handshake: GnuTLS's words for it, in libvirt's TLS error line
    assert "Unable to read TLS confirmation" in err or "TLS handshake failed" in err, err
    assert "handshake failed" in tls.daemon.log()


def test_dn_outside_the_list_is_refused(tls, tmp_path):
    d = tls.pki.client_dir("outsider", "x", subj="/C=GB/O=elsewhere/CN=client1")
    err = refused(tls, d, tmp_path)
    assert CONFIRM_FAILED in err, err
    assert "DN 'C=GB,O=elsewhere,CN=client1' is not in tls_allowed_dn_list" in tls.daemon.log()


def test_dn_without_grant_is_refused(session_bus, make_secretbusd, pki, tmp_path):
    t = start_tls(session_bus, make_secretbusd, pki, tmp_path, grants=f'"x509:{DN_BASE},CN=client1=rw"')
    err = refused(t, pki.client_dir("nogrant", "client2"), tmp_path)
    assert CONFIRM_FAILED in err, err
    assert "no remote_access grant matches" in t.daemon.log()


def test_revoked_certificate_is_refused(session_bus, make_secretbusd, pki, tmp_path):
    d = pki.client_dir("revoked", "revoked1")
    crl = pki.revoke("revoked")
    t = start_tls(session_bus, make_secretbusd, pki, tmp_path, crl=crl)
    err = refused(t, d, tmp_path)
    assert "Unable to read TLS confirmation" in err or "TLS handshake failed" in err, err
    assert "certificate revoked" in t.daemon.log()


def test_no_client_certificate_is_refused(tls, tmp_path):
    d = tls.pki.d / "pki-nocert"
    d.mkdir(mode=0o700)
    shutil.copy(tls.pki.d / "ca.pem", d / "cacert.pem")
    r = virsh(tls.uri_for(d), "secret-list")      # libvirt's client goes on without one
    assert r.returncode == 1 and "Unable to read TLS confirmation" in r.stderr, r.stderr
    # a client that sends none (Python's ssl) gets no confirmation and no RPC
    ctx = ssl.create_default_context(cafile=str(tls.pki.d / "ca.pem"))
    with socket.create_connection(("127.0.0.1", tls.port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                assert s.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            pass
    assert "handshake failed" in tls.daemon.log()


def stall(port: int, source: str) -> socket.socket:
    """A TCP connection that sends the start of a ClientHello and never finishes it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(b"\x16\x03\x01\x00\x05")
    return s


def closed_within(s: socket.socket, secs: float) -> bool:
    s.settimeout(secs)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_stalled_handshakes_do_not_block_others(session_bus, make_secretbusd, pki, tmp_path):
    """32 handshakes stalled from one address (the bound per address): a 33rd from there is
    closed at once, a client from another address is served without waiting, and the stalled
    ones are closed after the handshake timeout."""
    t = start_tls(session_bus, make_secretbusd, pki, tmp_path, args=("--tls-handshake-timeout", "3"))
    stalled = [stall(t.port, "127.0.0.2") for _ in range(32)]
    try:
        time.sleep(0.5)
        extra = stall(t.port, "127.0.0.2")
        assert closed_within(extra, 2), "the 33rd pending handshake of one address was not refused"
        extra.close()
        t0 = time.monotonic()
        assert f"Secret {U1} created" in ok(virsh(t.uri, "secret-define", define_file(tmp_path)))
        assert U1 in ok(virsh(t.uri, "secret-list"))
        assert time.monotonic() - t0 < 2.5            # well inside the stalled ones' timeout
        assert all(closed_within(s, 5) for s in stalled), "a stalled handshake outlived its timeout"
        harness.wait_until(lambda: "no handshake within 3 s" in t.daemon.log(), timeout=5,
                           what="the timeout's log line", proc=t.daemon.proc, log=t.daemon.log_path)
        assert "too many handshakes under way" in t.daemon.log()
        for s in stalled:
            s.close()                                 # the server stops lingering on them
        time.sleep(0.5)
        again = stall(t.port, "127.0.0.2")            # the slots came back
        assert not closed_within(again, 1)
        again.close()
    finally:
        for s in stalled:
            s.close()


def test_one_host_holds_at_most_64_connections(tls, tmp_path):
    """A remote host is bounded as one local user (Session.bounds): its 65th connection is
    accepted by TLS and then closed, before any RPC; another address is served meanwhile."""
    ctx = ssl.create_default_context(cafile=str(tls.pki.d / "ca.pem"))
    ctx.load_cert_chain(tls.good / "clientcert.pem", tls.good / "clientkey.pem")
    held = []

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", tls.port), timeout=10, source_address=("127.0.0.3", 0))
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        held.append(s)
        return s
    try:
        for _ in range(64):
            assert connect().recv(1) == b"\x01"          # libvirt's confirmation byte: accepted
        extra = connect()
        assert extra.recv(1) == b"\x01"
        assert closed_within(extra, 5), "a 65th connection of one host was served"
        harness.wait_until(lambda: "connection limit" in tls.daemon.log(), timeout=5, what="the refusal's log line",
                           proc=tls.daemon.proc, log=tls.daemon.log_path)
        assert f"Secret {U1} created" in ok(virsh(tls.uri, "secret-define", define_file(tmp_path)))
        for s in held[:2]:
            s.close()
        time.sleep(0.5)
        again = connect()                                 # a slot came back
        assert again.recv(1) == b"\x01" and not closed_within(again, 1)
    finally:
        for s in held:
            s.close()


def test_no_session_tickets(tls):
    """libvirt's GnuTLS client breaks on TLS 1.3 tickets; TLS 1.2 gets none either."""
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = ssl.create_default_context(cafile=str(tls.good / "cacert.pem"))
        ctx.load_cert_chain(tls.good / "clientcert.pem", tls.good / "clientkey.pem")
        ctx.minimum_version = ctx.maximum_version = version
        with socket.create_connection(("127.0.0.1", tls.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                assert s.version() == {ssl.TLSVersion.TLSv1_3: "TLSv1.3", ssl.TLSVersion.TLSv1_2: "TLSv1.2"}[version]
                assert s.recv(1) == b"\x01"            # the confirmation byte, first thing after the handshake
                assert s.session is None or not s.session.has_ticket


# -- reload ---------------------------------------------------------------------------------------
def test_sighup_moves_the_listener_and_rereads_grants(tls, tmp_path):
    ok(virsh(tls.uri, "secret-list"))
    new_port = free_port()
    tls.conf.write_text(conf_text(tls.pki, new_port, grants=f'"x509:{DN_BASE},CN=*=ro"'))
    tls.daemon.signal(signal.SIGHUP)
    harness.wait_until(lambda: f"TLS listener on port {new_port}" in tls.daemon.log(), timeout=20,
                       what="the reload", proc=tls.daemon.proc, log=tls.daemon.log_path)
    old = tls.port
    tls.port = new_port
    ok(virsh(tls.uri, "secret-list"))
    r = virsh(tls.uri, "secret-define", define_file(tmp_path))       # now ro: refused
    assert r.returncode == 1 and "access denied" in r.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", old), timeout=5).close()
    # a bad file keeps the running state
    tls.conf.write_text("listen_tls = 2\n")
    tls.daemon.signal(signal.SIGHUP)
    harness.wait_until(lambda: "secretbusd.conf:1: 'listen_tls' must be 0 or 1" in tls.daemon.log(), timeout=20,
                       what="the failed reload", proc=tls.daemon.proc, log=tls.daemon.log_path)
    ok(virsh(tls.uri, "secret-list"))
    # listen_tls = 0 removes the listener
    tls.conf.write_text(conf_text(tls.pki, new_port, listen=0))
    tls.daemon.signal(signal.SIGHUP)
    harness.wait_until(lambda: "TLS listener off" in tls.daemon.log(), timeout=20,
                       what="the reload", proc=tls.daemon.proc, log=tls.daemon.log_path)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", new_port), timeout=5).close()
    assert os.path.exists(tls.conf)


def server_serial(port: int, pkipath: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(pkipath / "cacert.pem"))
    ctx.load_cert_chain(pkipath / "clientcert.pem", pkipath / "clientkey.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return int(dict(x[0] for x in s.getpeercert()["subject"]).get("serialNumber", "0")) or \
                int(s.getpeercert()["serialNumber"], 16)


def test_sighup_rereads_certificates_on_the_same_port(tls, tmp_path):
    before = server_serial(tls.port, tls.good)
    cert, key = tls.pki.cert("server", "/C=GB/O=secretbus test/CN=127.0.0.1", SERVER_EXT)   # a new one, same files
    tls.daemon.signal(signal.SIGHUP)
    harness.wait_until(lambda: "reloaded" in tls.daemon.log() and "TLS listener on port" in tls.daemon.log(),
                       timeout=20, what="the reload", proc=tls.daemon.proc, log=tls.daemon.log_path)
    assert server_serial(tls.port, tls.good) != before
    ok(virsh(tls.uri, "secret-list"))


def test_a_reload_that_cannot_listen_changes_nothing(tls, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        tls.conf.write_text(conf_text(tls.pki, busy.getsockname()[1], grants=f'"x509:{DN_BASE},CN=*=ro"'))
        tls.daemon.signal(signal.SIGHUP)
        harness.wait_until(lambda: "reload of the server configuration failed" in tls.daemon.log(), timeout=20,
                           what="the failed reload", proc=tls.daemon.proc, log=tls.daemon.log_path)
        assert "address already in use" in tls.daemon.log().lower()
        # the old listener serves, with the old grants (rw+values)
        assert f"Secret {U1} created" in ok(virsh(tls.uri, "secret-define", define_file(tmp_path)))
    finally:
        busy.close()


def test_bad_config_is_fatal_at_start(session_bus, make_secretbusd, tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("listen_tls = 1\ntls_port = 0\n")
    conf.chmod(0o600)
    d = make_secretbusd(session_bus, system=True, wait=False,
                        args=("--no-dbus", "--rpc-dir", str(tmp_path / "rpc"), "--config", str(conf)))
    assert d.wait(20) == 78
    assert f"{conf}:2: 'tls_port' must be a port number" in d.log()


# -- secretbus's own client: secretbus -c secret+tls://… and secretbus.open() -----------------------
def sb(uri: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", uri, *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, input=input)


def test_secretbus_cli_over_tls(tls, tmp_path):
    u = tls.uri
    assert f"Secret {U1} created" in ok(sb(u, "secret-define", define_file(tmp_path)))
    assert U1 in ok(sb(u, "secret-list"))
    ok(sb(u, "secret-set-value", U1, base64.b64encode(SENTINEL).decode()))
    assert ok(sb(u, "secret-get-value", U1)).strip() == base64.b64encode(SENTINEL).decode()
    assert ok(virsh(u, "secret-get-value", U1)).strip() == base64.b64encode(SENTINEL).decode()   # one server
    ok(sb(u, "secret-define", define_file(tmp_path, U2, priv="yes", uid="other")))
    r = sb(u, "secret-get-value", U2)
    assert r.returncode == 1 and "Invalid secret: secret is private" in r.stderr
    assert f"Secret {U1} deleted" in ok(sb(u, "secret-undefine", U1))
    # secret://host/system is TLS too (libvirt's default transport for a host name); 16514 is not ours
    r = sb(f"secret://127.0.0.1:{tls.port}/system?pkipath={tls.good}", "secret-list")
    assert U2 in ok(r)


def test_secretbus_open_over_tls_with_events(tls):
    import secretbus
    from secretbus.core.model import EventId
    seen: list[str] = []
    with secretbus.open(tls.uri) as conn:
        conn.subscribe(lambda s, ev: seen.append(s.uuid), EventId.LIFECYCLE)
        s = conn.define_xml(secret_xml(U1))
        s.set_value(b"api-value")
        assert s.get_value() == b"api-value"
        harness.wait_until(lambda: U1 in seen, timeout=10, what="the lifecycle event")
        s.undefine()


def test_secretbus_client_errors_name_the_step(tls, tmp_path):
    from secretbus.core import errors
    from secretbus.uri import open_connection
    dead = free_port()
    cases = [
        (f"secret+tls://127.0.0.1:{dead}/system?pkipath={tls.good}", "unable to connect to server at"),
        (f"secret+tls://127.0.0.1:{tls.port}/system?pkipath={tmp_path}/none", "Cannot read CA certificate"),
        (tls.uri_for(tls.good, host="localhost.invalid"), "unable to connect to server"),
        (tls.uri_for(tls.pki.client_dir("cli-outsider", "x", subj="/C=GB/O=elsewhere/CN=c")),
         "server verification (of our certificate or IP address) failed"),
    ]
    other = tls.pki.d / "pki-cli-wrongca"
    other.mkdir(mode=0o700)
    shutil.copy(tls.pki.d / "otherca.pem" if (tls.pki.d / "otherca.pem").exists() else tls.pki.ca("otherca"),
                other / "cacert.pem")
    shutil.copy(tls.good / "clientcert.pem", other / "clientcert.pem")
    shutil.copy(tls.good / "clientkey.pem", other / "clientkey.pem")
    cases.append((tls.uri_for(other), "TLS handshake failed: the server certificate of 127.0.0.1 is not trusted"))
    for u, words in cases:
        with pytest.raises(errors.SecretError) as e:
            open_connection(u, timeout=10).close()
        assert words in errors.display(e.value), (u, errors.display(e.value))
    # no_verify=1 trusts the server blindly (libvirt's meaning), the server still checks us
    with open_connection(tls.uri_for(other) + "&no_verify=1", timeout=10) as conn:
        assert conn.list_secrets() == []
    # access step: a read-only grant
    with open_connection(tls.uri_for(tls.pki.client_dir("cli-ro", "ro-cli")), timeout=10) as conn:
        with pytest.raises(errors.AccessDenied, match="'secret' denied access"):
            conn.define_xml(secret_xml(U1))


# -- SASL SCRAM-SHA-256 over TLS (auth_tls = "sasl") ------------------------------------------------
def sasl_passwd(store: Path, user: str, password: str | None, *, delete: bool = False) -> str:
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "sasl-passwd", user, "--file", str(store),
                        *(["--delete"] if delete else [])], input=None if password is None else password + "\n",
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    return ok(r)


def auth_file(tmp_path: Path, user: str, password: str) -> dict[str, str]:
    f = tmp_path / f"auth-{user}.conf"
    f.write_text(f"[credentials-t]\nauthname={user}\npassword={password}\n\n[auth-libvirt-default]\ncredentials=t\n")
    f.chmod(0o600)
    return {**os.environ, "LIBVIRT_AUTH_FILE": str(f)}


@pytest.fixture
def sasl_tls(session_bus, make_secretbusd, pki, tmp_path):
    t = start_tls(session_bus, make_secretbusd, pki, tmp_path,
                  grants=f'"sasl:fred=rw+values", "sasl:ro*=ro", "x509:{DN_BASE},CN=other=rw"',
                  extra='auth_tls = "sasl"\nsasl_allowed_username_list = [ "fred", "ro*", "nogrant" ]\n')
    store = tmp_path / "sasl-verifiers.json"
    for user, pw in (("fred", "fr3d-pass"), ("roger", "r0ger-pass"), ("nogrant", "n0-pass"), ("bob", "b0b-pass")):
        assert f"SASL user {user} set" in sasl_passwd(store, user, pw)
    return t


def test_sasl_scram_over_tls_with_virsh(sasl_tls, tmp_path):
    t = sasl_tls
    store = tmp_path / "sasl-verifiers.json"
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    text = store.read_text()
    assert "fr3d-pass" not in text and "stored_key" in text          # salted keys, never the password
    env = auth_file(tmp_path, "fred", "fr3d-pass")
    r = subprocess.run(["virsh", "-c", t.uri, "secret-define", define_file(tmp_path)], capture_output=True,
                       text=True, timeout=30, env=env)
    assert f"Secret {U1} created" in ok(r)
    r = subprocess.run(["virsh", "-c", t.uri, "secret-set-value", U1, "--base64", "QUJD"], capture_output=True,
                       text=True, timeout=30, env=env)
    ok(r)
    r = subprocess.run(["virsh", "-c", t.uri, "secret-get-value", U1], capture_output=True, text=True, timeout=30,
                       env=env)
    assert ok(r).strip() == "QUJD"
    assert "SASL user 'fred'" in t.daemon.log()
    # a read-only user by its grant (the client's DN has none of its own)
    env_ro = auth_file(tmp_path, "roger", "r0ger-pass")
    r = subprocess.run(["virsh", "-c", t.uri, "secret-get-value", U1], capture_output=True, text=True, timeout=30,
                       env=env_ro)
    assert r.returncode == 1 and "access denied" in r.stderr and "QUJD" not in r.stdout


@pytest.mark.parametrize("user,password,log_words", [
    ("fred", "wrong-pass", "SASL authentication of user 'fred' failed"),
    ("nobody", "n0b0dy-pass", "SASL authentication of user 'nobody' failed"),          # unknown: as a wrong password
    ("bob", "b0b-pass", "'bob' is not in sasl_allowed_username_list"),
    ("nogrant", "n0-pass", "no remote_access grant matches"),
])
def test_sasl_refusals(sasl_tls, tmp_path, user, password, log_words):
    r = subprocess.run(["virsh", "-c", sasl_tls.uri, "secret-define", define_file(tmp_path, U2, uid="other")],
                       capture_output=True, text=True, timeout=30, env=auth_file(tmp_path, user, password))
    assert r.returncode == 1 and "authentication failed" in r.stderr, r.stderr
    if user in ("fred", "nobody"):                   # the same words for both: no user enumeration
        assert "The client keys don't match" in r.stderr, r.stderr
    assert password not in r.stderr + sasl_tls.daemon.log()
    harness.wait_until(lambda: log_words in sasl_tls.daemon.log(), timeout=10, what=log_words,
                       proc=sasl_tls.daemon.proc, log=sasl_tls.daemon.log_path)
    env = auth_file(tmp_path, "fred", "fr3d-pass")
    out = ok(subprocess.run(["virsh", "-c", sasl_tls.uri, "secret-list"], capture_output=True, text=True,
                            timeout=30, env=env))
    assert U2 not in out                                                    # nothing was served


def test_sasl_passwd_delete(tmp_path):
    store = tmp_path / "v" / "sasl-verifiers.json"
    sasl_passwd(store, "fred", "pw1")
    assert oct(store.parent.stat().st_mode & 0o777) == "0o700"
    assert "SASL user fred deleted" in sasl_passwd(store, "fred", None, delete=True)
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "sasl-passwd", "fred", "--delete", "--file",
                        str(store)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and "no SASL user 'fred'" in r.stderr


def test_sasl_with_secretbus_client(sasl_tls, tmp_path):
    from secretbus.core import errors
    from secretbus.uri import open_connection
    env = auth_file(tmp_path, "fred", "fr3d-pass")
    r = subprocess.run([sys.executable, "-m", "secretbus.cli", "-c", sasl_tls.uri, "secret-define",
                        define_file(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert f"Secret {U1} created" in ok(r)
    with open_connection(sasl_tls.uri + f"&authfile={env['LIBVIRT_AUTH_FILE']}", timeout=10) as conn:
        assert [s.uuid for s in conn.list_secrets()] == [U1]
    bad = auth_file(tmp_path, "fred", "wrong-pass")["LIBVIRT_AUTH_FILE"]
    with pytest.raises(errors.SecretError) as e:
        open_connection(sasl_tls.uri + f"&authfile={bad}", timeout=10).close()
    assert "authentication failed" in errors.display(e.value) and "wrong-pass" not in errors.display(e.value)
    with pytest.raises(errors.SecretError, match="cannot read the auth file .*missing.conf"):
        open_connection(sasl_tls.uri + f"&authfile={tmp_path}/missing.conf", timeout=10).close()


def test_an_unauthenticated_remote_client_is_dropped(tmp_path, monkeypatch):
    """auth_tls = "sasl": a client that never authenticates loses its connection (in-process)."""
    import asyncio

    from test_rpc_server import InProcess

    import secretbus.rpc.server as srv
    from secretbus.rpc.remote import RemoteIdentity
    from secretbus.rpc.sasl import SaslExchange, VerifierStore
    from secretbus.rpc.serverconf import Kind
    monkeypatch.setattr(srv, "REMOTE_AUTH_TIMEOUT", 0.3)
    ip = InProcess(tmp_path)
    ours, theirs = socket.socketpair()
    try:
        async def connect() -> None:
            reader, writer = await asyncio.open_connection(sock=ours)
            who = RemoteIdentity(Kind.X509, "CN=x", "test:1")
            asyncio.ensure_future(ip.server.serve_remote(reader, writer, who,
                                                         SaslExchange(VerifierStore(tmp_path / "v.json"))))
        ip.run(connect())
        theirs.settimeout(5)
        assert theirs.recv(1) == b""                   # closed by the server, nothing sent
        harness.wait_until(lambda: ip.server.clients == 0, timeout=5, what="the slot back")
    finally:
        theirs.close()
        ip.close()
