"""secret+tls:// against two servers with the same certificates: Debian's libvirtd 9.0 (secret
driver only, `--listen` with listen_tls, its own mount namespace as bench/bench_rpc.py runs it)
is the oracle, secretbusd the server under test. The client is the real virsh 9.0; each case
compares its exit status, its error text (ports, temp paths and the time and pid of libvirt's
log lines normalised) and, where it succeeds, its output. Triage of every divergence: in the
case's docstring and its assertion."""
from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import harness
import pytest
from fixtures import U1, U2, secret_xml
from harness import reference
from harness.procs import remove_tree
from test_remote_tls import Pki, free_port

pytestmark = pytest.mark.skipif(shutil.which("virsh") is None or shutil.which("openssl") is None
                                or shutil.which("unshare") is None,
                                reason="virsh (libvirt-clients), openssl and unshare needed")

DN_BASE = "C=GB,ST=London,L=London,O=secretbus test"
ALLOWED = f"{DN_BASE},CN=allowed*"
# the server's certificate names only its IP: `localhost` reaches it under a name it does not hold
SERVER_EXT = ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n")
VALUE = b"tls-diff-v\x00\x01\xff"
CONFIRM_FAILED = "server verification (of our certificate or IP address) failed"

LIBVIRTD_CONF = """unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:stderr"
listen_tcp = 0
listen_tls = 1
tls_port = "{port}"
listen_addr = "127.0.0.1"
auth_tls = "none"
key_file = "{pki}/server.key"
cert_file = "{pki}/server.pem"
ca_file = "{pki}/ca.pem"
tls_allowed_dn_list = [ "{allowed}" ]
"""
SECRETBUSD_CONF = """listen_tls = 1
tls_port = "{port}"
listen_addr = "127.0.0.1"
key_file = "{pki}/server.key"
cert_file = "{pki}/server.pem"
ca_file = "{pki}/ca.pem"
tls_allowed_dn_list = [ "{allowed}" ]
remote_access = [ "x509:{allowed}=rw" ]
"""


@dataclass
class Server:
    name: str
    port: int
    log: Path
    pid: int


@dataclass
class Setup:
    pki: Pki
    servers: list[Server]
    clients: dict[str, Path]


def expired_client_dir(pki: Pki, name: str, cn: str) -> Path:
    """A client certificate of the test CA that expired yesterday (openssl 3.0's x509 and req
    cannot date one in the past; cryptography can)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_key = serialization.load_pem_private_key((pki.d / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki.d / "ca.pem").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                         x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "London"),
                         x509.NameAttribute(NameOID.LOCALITY_NAME, "London"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secretbus test"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=3)).not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = pki.d / f"pki-{name}"
    out.mkdir(mode=0o700)
    shutil.copy(pki.d / "ca.pem", out / "cacert.pem")
    (out / "clientcert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "clientkey.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
    (out / "clientkey.pem").chmod(0o600)
    return out




@pytest.fixture(scope="module")
def setup():
    bench_rpc = harness.load_bench("bench_rpc")
    if not bench_rpc.LIBVIRTD.exists() or not (bench_rpc.DRIVER_DIR / "libvirt_driver_secret.so").exists():
        pytest.skip("libvirtd and its secret driver (libvirt-daemon) not installed")
    d = harness.public_tempdir("sb-tlsdiff-")
    d.chmod(0o700)
    pki = Pki(d)
    pki.ca()
    pki.cert("server", "/C=GB/O=secretbus test/CN=127.0.0.1", SERVER_EXT)
    pki.ca("otherca")
    clients = {
        "allowed": pki.client_dir("allowed", "allowed1"),
        "outsider": pki.client_dir("outsider", "outsider1"),                        # same CA, DN not listed
        "foreign": pki.client_dir("foreign", "allowed2", sign_ca="otherca"),        # listed DN, other CA
        "expired": expired_client_dir(pki, "expired", "allowed3"),
    }
    nocert = d / "pki-nocert"
    nocert.mkdir(mode=0o700)
    shutil.copy(d / "ca.pem", nocert / "cacert.pem")
    clients["nocert"] = nocert

    servers: list[Server] = []
    lv_procs = bench_rpc.Procs()
    bus = None
    sbd = None
    try:
        # libvirtd
        port = free_port()
        empty = d / "empty"
        empty.mkdir(mode=0o700)
        conf_lines = LIBVIRTD_CONF.format(port=port, pki=d, allowed=ALLOWED).splitlines()
        lvs = bench_rpc.start_libvirtd(lv_procs, d, empty, 0, conf=conf_lines, listen=True)
        proc, log = lvs.proc, d / "libvirtd.log"
        harness.wait_until(lambda: reference.accepting(port), timeout=15, what="libvirtd's TLS listener",
                           proc=proc, log=log)
        servers.append(Server("libvirtd", port, log, proc.pid))
        # secretbusd
        port = free_port()
        conf = d / "secretbusd.conf"
        conf.write_text(SECRETBUSD_CONF.format(port=port, pki=d, allowed=ALLOWED))
        conf.chmod(0o600)
        bus = harness.PrivateBus("session").start()
        sbd = harness.Secretbusd(bus, system=True, args=("--no-dbus", "--rpc-dir", str(d / "rpc"),
                                                         "--config", str(conf)))
        sbd.start(wait=False)
        harness.wait_until(lambda: "over libvirt RPC only" in sbd.log(), timeout=15, what="secretbusd's TLS listener",
                           proc=sbd.proc, log=sbd.log_path)
        assert sbd.proc is not None
        servers.append(Server("secretbusd", port, sbd.log_path, sbd.proc.pid))
        yield Setup(pki, servers, clients)
    finally:
        if sbd is not None:
            sbd.cleanup()
        if bus is not None:
            bus.stop()
        lv_procs.stop_all()
        remove_tree(d)


B64 = base64.b64encode(VALUE).decode()
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+0000: \d+: ", re.M)


def normalise(text: str, setup: Setup) -> str:
    """Ports, temp paths, and the time and pid of libvirt's client log lines; the value is
    replaced by a marker, so that no assertion message shows it."""
    text = LOG_PREFIX.sub("TIME: PID: ", text.replace(str(setup.pki.d), "PKI").replace(B64, "<VALUE>"))
    for s in setup.servers:
        text = re.sub(rf"\b{s.port}\b", "PORT", text)
    return text


@dataclass(frozen=True)
class Answer:
    rc: int
    out: str
    err: str


def ask(setup: Setup, client: str, *args: str, host: str = "127.0.0.1", params: str = "") -> dict[str, Answer]:
    """The same virsh command against each server; {server name: Answer}."""
    got = {}
    for s in setup.servers:
        uri = f"secret+tls://{host}:{s.port}/system?pkipath={setup.clients[client]}{params}"
        r = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=20)
        got[s.name] = Answer(r.returncode, normalise(r.stdout, setup), normalise(r.stderr, setup))
    return got


def same(got: dict[str, Answer]) -> Answer:
    a, b = got["libvirtd"], got["secretbusd"]
    assert a == b, f"libvirtd: {a}\nsecretbusd: {b}"
    return a


REFUSED = "error: failed to connect to the hypervisor\nerror: "


def test_both_servers_run_this_checkout(setup):
    import secretbus
    repo = Path(__file__).resolve().parents[1]
    assert Path(secretbus.__file__).resolve().is_relative_to(repo)
    sbd = next(s for s in setup.servers if s.name == "secretbusd")
    env = dict(e.split("=", 1) for e in Path(f"/proc/{sbd.pid}/environ").read_text().split("\0") if "=" in e)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(repo)


def test_allowed_client(setup, tmp_path):
    """A certificate whose DN is in tls_allowed_dn_list: the same answers, except GetValue.

    Divergence (deliberate): libvirtd without an access driver lets every authenticated
    client read non-private values; secretbus needs a `rw+values` grant for that
    (docs/remote.md "Who may connect, and what they may do", the rights table; #15 of
    docs/libvirt-differences.md), and the grant here is `rw`."""
    pub = tmp_path / "pub.xml"
    pub.write_text(secret_xml(U1))
    priv = tmp_path / "priv.xml"
    priv.write_text(secret_xml(U2, priv="yes", uid="other"))
    assert same(ask(setup, "allowed", "secret-list")).rc == 0
    assert f"Secret {U1} created" in same(ask(setup, "allowed", "secret-define", str(pub))).out
    assert f"Secret {U2} created" in same(ask(setup, "allowed", "secret-define", str(priv))).out
    for uuid in (U1, U2):
        assert "Secret value set" in same(ask(setup, "allowed", "secret-set-value", uuid, "--base64", B64)).out
    listed = same(ask(setup, "allowed", "secret-list"))
    assert U1 in listed.out and U2 in listed.out
    assert f"<uuid>{U1}</uuid>" in same(ask(setup, "allowed", "secret-dumpxml", U1)).out

    got = ask(setup, "allowed", "secret-get-value", U1)
    assert got["libvirtd"] == Answer(0, "<VALUE>\n", ""), got["libvirtd"]
    assert got["secretbusd"] == Answer(1, "\n", "error: access denied: 'secret' denied access\n"), got["secretbusd"]
    # a private value: refused by both, libvirtd because it is private, secretbus already by the
    # grant (the same divergence: both check access before privacy, as libvirt's secretGetValue)
    got = ask(setup, "allowed", "secret-get-value", U2)
    assert got["libvirtd"] == Answer(1, "\n", "error: Invalid secret: secret is private\n"), got["libvirtd"]
    assert got["secretbusd"] == Answer(1, "\n", "error: access denied: 'secret' denied access\n"), got["secretbusd"]

    for uuid in (U1, U2):
        assert f"Secret {uuid} deleted" in same(ask(setup, "allowed", "secret-undefine", uuid)).out
    assert U1 not in same(ask(setup, "allowed", "secret-list")).out


@pytest.mark.parametrize(("client", "host", "params", "err"), [
    # another CA signed it (its DN is in the list): the handshake fails on both
    ("foreign", "127.0.0.1", "", "Unable to read TLS confirmation: Input/output error\n"),
    # libvirt's client goes on without a certificate; both servers refuse it
    ("nocert", "127.0.0.1", "", "Unable to read TLS confirmation: Input/output error\n"),
    # libvirt's client checks its own certificate first, no_verify=1 or not (see the raw case below)
    ("expired", "127.0.0.1", "", "The client certificate PKI/pki-expired/clientcert.pem has expired\n"),
    ("expired", "127.0.0.1", "&no_verify=1", "The client certificate PKI/pki-expired/clientcert.pem has expired\n"),
    # the server's certificate names 127.0.0.1, not localhost: the client refuses the server
    ("allowed", "localhost", "", "authentication failed: Failed to verify peer's certificate\n"),
], ids=["other-ca", "no-cert", "expired", "expired-no_verify", "wrong-hostname"])
def test_refused_alike(setup, client, host, params, err):
    a = same(ask(setup, client, "secret-list", host=host, params=params))
    assert a.rc == 1 and a.out == "" and a.err.endswith(REFUSED + err), a


def test_no_verify_accepts_the_wrong_hostname(setup):
    """no_verify=1: libvirt's client logs the mismatch and goes on; both servers serve it."""
    a = same(ask(setup, "allowed", "secret-list", host="localhost", params="&no_verify=1"))
    assert a.rc == 0 and "UUID" in a.out
    assert "owner does not match the hostname localhost" in a.err


def test_dn_not_in_the_list(setup):
    """A certificate of the right CA whose DN is not in tls_allowed_dn_list: refused by both,
    nothing served, but virsh's words differ.

    Divergence (deliberate, docs/remote.md "Who may connect", step 3): libvirtd drops the
    connection without TLS's close_notify ("otherwise the socket is abruptly closed",
    virNetServerClientCheckAccess), so virsh reports an I/O error reading the confirmation;
    secretbusd ends it with close_notify, so virsh reads no confirmation byte and prints its
    own message for exactly this refusal. `raw_outcome` below shows the two endings."""
    got = ask(setup, "outsider", "secret-list")
    assert got["libvirtd"] == Answer(1, "", REFUSED + "Unable to read TLS confirmation: Input/output error\n")
    assert got["secretbusd"] == Answer(1, "", REFUSED + CONFIRM_FAILED + "\n")
    ends = {s.name: raw_outcome(s.port, setup.clients["outsider"]) for s in setup.servers}
    assert ends == {"libvirtd": "eof without close_notify", "secretbusd": "close_notify"}, ends


def raw_outcome(port: int, pkipath: Path) -> str:
    """Python's ssl as the client (no checks of its own certificate): how the server answers
    after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)     # tell an abrupt end from close_notify
    ctx.load_verify_locations(pkipath / "cacert.pem")
    ctx.load_cert_chain(pkipath / "clientcert.pem", pkipath / "clientkey.pem")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                b = s.recv(1)
    except ssl.SSLEOFError:
        return "eof without close_notify"
    except ssl.SSLError as e:
        return "eof without close_notify" if e.reason == "UNEXPECTED_EOF_WHILE_READING" else f"error: {e.reason}"
    except ConnectionError as e:
        return type(e).__name__
    return {b"\x01": "confirmed", b"": "close_notify"}.get(b, repr(b))


def test_expired_certificate_reaches_the_server(setup):
    """The expired certificate that virsh will not send (above), sent by Python's ssl: both
    servers refuse it before the confirmation byte (and an allowed one is confirmed by both)."""
    assert {raw_outcome(s.port, setup.clients["allowed"]) for s in setup.servers} == {"confirmed"}
    ends = {s.name: raw_outcome(s.port, setup.clients["expired"]) for s in setup.servers}
    assert ends == {"libvirtd": "eof without close_notify", "secretbusd": "eof without close_notify"}, ends
