"""SASL SCRAM-SHA-256 over TLS (`auth_tls = "sasl"`) and on the unix sockets (`auth_unix_rw` /
`auth_unix_ro = "sasl"`), with secretbus's own verifier store.

libvirt's flow (research §3.6), as unmodified virsh runs it with Cyrus SASL's SCRAM plugin:
AUTH_LIST → [SASL]; AUTH_SASL_INIT → "SCRAM-SHA-256"; AUTH_SASL_START (client-first) →
server-first; AUTH_SASL_STEP (client-final) → server-final with complete = 1. SCRAM itself is
`scramp`'s (RFC 5802/7677). Only over TLS and unix sockets, which libvirt counts as secure
(no SSF asked of SASL): SCRAM has no security layer, and TLS, or the kernel, protects the exchange.

The verifier store holds, per user, SCRAM's salted keys (salt, StoredKey, ServerKey,
iterations): never a password, and nothing a client could log in with. It is a JSON file,
0600 in a 0700 directory, written atomically (temp, fsync, rename, fsync dir), managed by
`secretbus sasl-passwd USER [--delete]`, and read at each authentication, so a change counts
from the next connection. An unknown user gets a made-up salt and fails like a wrong password
(no user enumeration); a failed exchange ends SASL on that connection (one guess per TCP and
TLS handshake).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# scramp is imported where an exchange or a verifier is made: the RPC server imports this
# module, and scramp (with importlib.metadata) was ~20 ms of every daemon's start-up.
from secretbus.core import errors
from secretbus.rpc import protocol as P
from secretbus.rpc.failures import AUTH_FAILED, AUTH_FAILED_PREFIX, RemoteFailure

log = logging.getLogger("secretbus.rpc.sasl")

MECH = "SCRAM-SHA-256"
ITERATIONS = 4096                # RFC 7677's minimum; Cyrus's default
FILE_NAME = "sasl-verifiers.json"
MAX_SIZE = 4 * 1024 * 1024
_FAKE_KEY = secrets.token_bytes(32)   # per process: an unknown user's salt is stable, never real


@dataclass(frozen=True)
class Verifier:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def to_json(self) -> dict[str, Any]:
        b = base64.b64encode
        return {"salt": b(self.salt).decode(), "stored_key": b(self.stored_key).decode(),
                "server_key": b(self.server_key).decode(), "iterations": self.iterations}

    @classmethod
    def from_json(cls, d: Any) -> Verifier:
        try:
            return cls(base64.b64decode(d["salt"], validate=True), base64.b64decode(d["stored_key"], validate=True),
                       base64.b64decode(d["server_key"], validate=True), int(d["iterations"]))
        except (KeyError, TypeError, ValueError):
            raise errors.ConfigError("malformed entry in the SASL verifier store") from None


def make_verifier(password: str) -> Verifier:
    from scramp import ScramMechanism  # type: ignore[import-untyped]
    salt, stored, server, i = ScramMechanism(MECH).make_auth_info(password, iteration_count=ITERATIONS)
    return Verifier(salt, stored, server, i)


def valid_user(name: str) -> bool:
    return 0 < len(name) <= 256 and name.isprintable() and "," not in name and "=" not in name


# -- the store -----------------------------------------------------------------------------
class VerifierStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, Verifier]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise errors.ConfigError(f"Failed to open file '{self.path}': {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid not in (0, os.geteuid()):
                raise errors.ConfigError(f"'{self.path}' must be a regular file of mode 0600 owned by root "
                                         "or this user")
            data = os.read(fd, MAX_SIZE + 1)
        finally:
            os.close(fd)
        try:
            raw = json.loads(data)
        except ValueError:
            raise errors.ConfigError(f"'{self.path}' is not a SASL verifier store (bad JSON)") from None
        if not isinstance(raw, dict):
            raise errors.ConfigError(f"'{self.path}' is not a SASL verifier store")
        return {str(k): Verifier.from_json(v) for k, v in raw.items()}

    def set(self, user: str, password: str) -> None:
        if not valid_user(user):
            raise errors.InvalidArg(f"invalid SASL user name '{user}'")
        users = self.load()
        users[user] = make_verifier(password)
        self._write(users)

    def delete(self, user: str) -> bool:
        users = self.load()
        if users.pop(user, None) is None:
            return False
        self._write(users)
        return True

    def _write(self, users: dict[str, Verifier]) -> None:
        """temp (O_EXCL, 0600), fsync, rename, fsync the directory (0700)."""
        d = self.path.parent
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps({u: v.to_json() for u, v in sorted(users.items())}, indent=1).encode()
        tmp = d / f".{self.path.name}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


# -- one connection's exchange ---------------------------------------------------------------
def _failed(why: str) -> RemoteFailure:
    return RemoteFailure(AUTH_FAILED, P.FROM_RPC, why, AUTH_FAILED_PREFIX)


class SaslExchange:
    """SCRAM on one connection; `user` once it succeeded (then the caller checks the lists)."""

    def __init__(self, store: VerifierStore):
        self.store = store
        self._server: Any = None
        self._user: str | None = None
        self._done = False
        self.user: str | None = None

    def init(self) -> dict[str, Any]:
        return {"mechlist": MECH}

    def start(self, mech: str, data: bytes | None) -> dict[str, Any]:
        if self._done or self._server is not None:
            raise _failed("SASL authentication already attempted on this connection")
        if mech != MECH:
            self._done = True
            raise _failed(f"unsupported SASL mechanism '{mech}'")
        users = self.store.load()

        def auth_fn(name: str) -> tuple[bytes, bytes, bytes, int]:
            self._user = name
            v = users.get(name)
            if v is None:        # a stable, made-up verifier: fails like a wrong password
                fake = hmac.new(_FAKE_KEY, name.encode(), hashlib.sha256).digest()
                return fake[:16], secrets.token_bytes(32), secrets.token_bytes(32), ITERATIONS
            return v.salt, v.stored_key, v.server_key, v.iterations
        from scramp import ScramException, ScramMechanism
        self._server = ScramMechanism(MECH).make_server(auth_fn)
        try:
            self._server.set_client_first(_text(data))
            first = self._server.get_server_first()
        except ScramException as e:
            self._done = True
            raise _failed(str(e)) from None
        return {"complete": 0, "nil": 0, "data": first.encode()}

    def step(self, data: bytes | None) -> dict[str, Any]:
        if self._server is None or self._done:
            raise _failed("no SASL exchange in progress")
        self._done = True
        from scramp import ScramException
        try:
            self._server.set_client_final(_text(data))
            final = self._server.get_server_final()
        except ScramException as e:
            log.warning("SASL authentication of user '%s' failed: %s", self._user, e)
            raise _failed(str(e)) from None
        self.user = self._user
        return {"complete": 1, "nil": 0, "data": final.encode()}


def _text(data: bytes | str | None) -> str:
    if data is None:
        raise _failed("empty SASL message")
    if isinstance(data, str):
        return data
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise _failed("SASL message is not UTF-8") from None
