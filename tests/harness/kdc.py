"""A private MIT Kerberos KDC on loopback for the secret+tcp:// (SASL GSSAPI) tests.

`Kdc(...).start()` makes its own realm in a fresh directory — krb5.conf (named by KRB5_CONFIG),
kdc.conf (KRB5_KDC_PROFILE), a database made with `kdb5_util create`, principals made with
`kadmin.local` — and runs Debian's `krb5kdc -n` in the foreground on a free 127.0.0.1 port;
`stop()` ends it by PID. Nothing of the machine's Kerberos set-up (/etc/krb5.conf,
/etc/krb5kdc, /etc/krb5.keytab) is read or changed: every command gets `env()`.

krb5.conf turns host-name canonicalisation off (`rdns = false`, `dns_canonicalize_hostname =
false`), so a client asking for `libvirt@localhost` gets a ticket for `libvirt/localhost@REALM`
exactly, the principal `service_keytab()` holds. `clockskew` is small, so that a ticket that
ran out (`kinit(..., lifetime="3s")`) is refused by the KDC and the acceptor a few seconds
later instead of after the default five minutes of tolerance.

Clients: `kinit(user)` gets a ticket into a private credential cache (FILE:, 0600) and returns
the environment that uses it (KRB5_CONFIG, KRB5CCNAME).
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time

from .ports import free_port
from .procs import HarnessError, log_tail, public_tempdir, remove_tree, spawn, stop_process

KRB5KDC = "/usr/sbin/krb5kdc"
KDB5_UTIL = "/usr/sbin/kdb5_util"
KADMIN_LOCAL = "/usr/sbin/kadmin.local"
KINIT = "/usr/bin/kinit"
REALM = "SECRETBUS.TEST"
CLOCKSKEW = 2                   # seconds of tolerance for ticket times (MIT's default is 300)


class Kdc:
    def __init__(self, realm: str = REALM, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")):
        for tool in (KRB5KDC, KDB5_UTIL, KADMIN_LOCAL, KINIT):
            if not os.access(tool, os.X_OK):
                raise HarnessError(f"{tool} is not installed (scripts/setup.sh installs krb5-kdc, "
                                   "krb5-admin-server and krb5-user)")
        self.realm = realm
        self.hosts = hosts            # the host names clients use: libvirt/<host> is made for each
        self.dir = public_tempdir("sb-kdc-")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "kdc.log"
        self.krb5_conf = self.dir / "krb5.conf"
        self.kdc_conf = self.dir / "kdc.conf"
        self.keytab = self.dir / "libvirt.keytab"
        self.passwords: dict[str, str] = {}

    # -- files ------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """os.environ with this realm's configuration (and nothing from /etc/krb5.conf)."""
        env = dict(os.environ)
        env.update(KRB5_CONFIG=str(self.krb5_conf), KRB5_KDC_PROFILE=str(self.kdc_conf),
                   KRB5_TRACE="/dev/null")
        env.pop("KRB5CCNAME", None)
        env.pop("KRB5_KTNAME", None)
        env.update(extra)
        return env

    def _write_conf(self) -> None:
        r = self.realm
        domains = "".join(f"    {h} = {r}\n" for h in self.hosts)
        self.krb5_conf.write_text(
            "[libdefaults]\n"
            f"    default_realm = {r}\n"
            "    dns_lookup_kdc = false\n    dns_lookup_realm = false\n"
            "    rdns = false\n    dns_canonicalize_hostname = false\n"
            f"    clockskew = {CLOCKSKEW}\n"
            "    udp_preference_limit = 1\n"            # TCP only: the KDC listens on TCP only
            "    permitted_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96\n"
            f"[realms]\n    {r} = {{\n        kdc = 127.0.0.1:{self.port}\n    }}\n"
            f"[domain_realm]\n{domains}")
        (self.dir / "kadm5.acl").write_text("")
        self.kdc_conf.write_text(
            f"[kdcdefaults]\n    kdc_listen = 127.0.0.1:{self.port}\n"
            f"    kdc_tcp_listen = 127.0.0.1:{self.port}\n"
            f"[realms]\n    {r} = {{\n"
            f"        database_name = {self.dir / 'principal'}\n"
            f"        key_stash_file = {self.dir / 'stash'}\n"
            f"        acl_file = {self.dir / 'kadm5.acl'}\n"
            "        max_life = 10h 0m 0s\n        max_renewable_life = 0\n"
            "        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal\n"
            "    }\n"
            f"[logging]\n    kdc = FILE:{self.log_path}\n")

    def _run(self, argv: list[str], *, stdin: str | None = None) -> str:
        r = subprocess.run(argv, input=stdin, env=self.env(), capture_output=True, text=True, timeout=60,
                           cwd=self.dir)
        if r.returncode != 0:
            # Never the stdin: it holds a password.
            raise HarnessError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed ({r.returncode}): "
                               f"{r.stderr.strip()[-500:]}")
        return r.stdout

    def kadmin(self, query: str) -> str:
        return self._run([KADMIN_LOCAL, "-r", self.realm, "-q", query])

    # -- running ------------------------------------------------------------------------
    def start(self, timeout: float = 20) -> Kdc:
        for host in self.hosts:     # the clients name the service by host name (libvirt/localhost)
            try:
                socket.getaddrinfo(host, None)
            except OSError as e:
                raise HarnessError(f"{host!r} does not resolve ({e}): the machine needs /etc/hosts "
                                   "with localhost, as Debian's installer writes it") from e
        self.port = free_port()
        self._write_conf()
        self._run([KDB5_UTIL, "create", "-s", "-r", self.realm, "-P", secrets.token_hex(16)])
        for host in self.hosts:
            self.kadmin(f"addprinc -randkey libvirt/{host}")
            self.kadmin(f"ktadd -k {self.keytab} libvirt/{host}")
        self.keytab.chmod(0o600)
        self.proc = spawn([KRB5KDC, "-n", "-r", self.realm], what="krb5kdc", log=self.dir / "krb5kdc.out",
                          env=self.env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"krb5kdc exited with {self.proc.returncode}"
                                   f"{log_tail(self.dir / 'krb5kdc.out')}{log_tail(self.log_path)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"krb5kdc: not listening after {timeout} s{log_tail(self.log_path)}")

    def add_user(self, name: str, password: str | None = None, *, max_life: str | None = None) -> str:
        """A user principal `name` (without the realm) with a password (made up when None)."""
        password = password or secrets.token_urlsafe(12)
        self._run([KADMIN_LOCAL, "-r", self.realm, "-q", f"addprinc {name}"],
                  stdin=f"{password}\n{password}\n")
        if max_life is not None:
            self.kadmin(f"modprinc -maxlife \"{max_life}\" {name}")
        self.passwords[name] = password
        return f"{name}@{self.realm}"

    def kinit(self, name: str, *, lifetime: str | None = None) -> dict[str, str]:
        """A ticket for `name` in its own credential cache; the environment that uses it."""
        cache = self.dir / f"cc-{name.replace('/', '_')}-{secrets.token_hex(4)}"
        argv = [KINIT, "-c", f"FILE:{cache}"]
        if lifetime is not None:
            argv += ["-l", lifetime]
        self._run(argv + [f"{name}@{self.realm}"], stdin=self.passwords[name] + "\n")
        return self.env(KRB5CCNAME=f"FILE:{cache}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        remove_tree(self.dir)

    def __enter__(self) -> Kdc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
