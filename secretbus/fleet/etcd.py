"""A thin etcd v3 client over the gRPC gateway (`etcd3gw` for the HTTP session and its error
mapping): KV ranges, transactions, and a watch stream read here, because etcd3gw's watcher hides
the compaction revision, cancellation and end of stream that a resyncing watch needs.

Every failure to reach etcd is an `EtcdUnavailable`; several endpoints are tried in turn.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

# requests and etcd3gw are imported where an Etcd uses them, not here: every daemon imports
# this module (the fleet store's helpers below), and those two cost a daemon with no fleet
# ~60 ms of its start-up and their share of its memory.
if TYPE_CHECKING:
    from etcd3gw.client import Etcd3Client

log = logging.getLogger("secretbus.fleet")

API_PATH = "/v3/"     # etcd >= 3.4 (Debian 12 has 3.4.23); set explicitly: no discovery round trip
# etcd's default bounds on one transaction: --max-txn-ops 128 (for its compares and each list
# of operations), and --max-request-bytes 1.5 MiB of the request its gateway sends it (the
# bytes, not their base64; measured on 3.4.23: 1.6 MiB refused, 1.4 MiB taken).
TXN_OPS = 128
TXN_BYTES = 1_000_000


class EtcdUnavailable(Exception):
    """etcd cannot be reached (or answers with a server error); the text names why."""


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int

    @classmethod
    def of(cls, j: dict[str, Any]) -> KV:
        return cls(unb64(j["key"]), unb64(j.get("value", "")), int(j.get("create_revision", 0)),
                   int(j.get("mod_revision", 0)))


@dataclass(frozen=True)
class WatchEvent:
    deleted: bool
    kv: KV


@dataclass
class WatchBatch:
    """One watch response: its events (in revision order), or why the watch ended."""
    revision: int
    events: list[WatchEvent] = field(default_factory=list)
    compact_revision: int = 0       # > 0: the start revision was compacted away
    canceled: bool = False


@dataclass(frozen=True)
class TLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Etcd:
    def __init__(self, endpoints: list[str], tls: TLS = TLS(), timeout: float = 3.0):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self._clients = [self._client(e, tls, timeout) for e in endpoints]
        self._current = 0
        self._lock = threading.Lock()
        self.timeout = timeout

    @staticmethod
    def _client(endpoint: str, tls: TLS, timeout: float) -> Etcd3Client:
        import requests
        from etcd3gw.client import Etcd3Client
        u = urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"etcd endpoint '{endpoint}' is not http(s)://host:port")
        session = requests.Session()
        # Not the environment's: REQUESTS_CA_BUNDLE would override fleet_ca_file, and an
        # HTTP(S)_PROXY would route the fleet's traffic through a proxy.
        session.trust_env = False
        session.verify = tls.ca_file if tls.ca_file is not None else True
        if tls.cert_file is not None and tls.key_file is not None:
            session.cert = (tls.cert_file, tls.key_file)
        return Etcd3Client(host=u.hostname, port=u.port or 2379, protocol=u.scheme, timeout=timeout,
                           api_path=API_PATH, session=session)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the current endpoint, moving on to the next ones when it is unreachable."""
        from etcd3gw import exceptions as etcd_exc
        with self._lock:
            start = self._current
        why = ""
        for i in range(len(self._clients)):
            n = (start + i) % len(self._clients)
            c = self._clients[n]
            try:
                out: dict[str, Any] = c.post(c.get_url(path), data=json.dumps(body))
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as e:
                why = f"{c.base_url}: {_short(e)}"
                continue
            except etcd_exc.Etcd3Exception as e:
                # 5xx (no leader, timeouts inside the cluster): another member may do better.
                why = f"{c.base_url}: {_short(e)}"
                continue
            with self._lock:
                self._current = n
            return out
        raise EtcdUnavailable(why)

    # -- KV --------------------------------------------------------------------------
    def range(self, key: bytes, end: bytes | None = None, *, serializable: bool = False) -> tuple[int, list[KV]]:
        """(revision, kvs) of [key, end); linearizable (a quorum read) unless `serializable`."""
        body: dict[str, Any] = {"key": b64(key)}
        if end is not None:
            body["range_end"] = b64(end)
        if serializable:
            body["serializable"] = True
        out = self._post("kv/range", body)
        return int(out["header"]["revision"]), [KV.of(k) for k in out.get("kvs", [])]

    def revision(self) -> int:
        """The cluster's current revision, by a quorum read."""
        rev, _ = self.range(b"\0")
        return rev

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]] | None = None) -> tuple[bool, int, list[dict[str, Any]]]:
        out = self._post("kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        # proto3 JSON leaves out false: no "succeeded" means the compare failed.
        return bool(out.get("succeeded", False)), int(out["header"]["revision"]), out.get("responses", [])

    # -- leases (fleet rotate's lock) ---------------------------------------------------
    def lease_grant(self, ttl: int) -> int:
        return int(self._post("lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """The lease's new TTL (0: it expired)."""
        out = self._post("lease/keepalive", {"ID": lease})
        return int(out.get("result", out).get("TTL", 0))

    def lease_revoke(self, lease: int) -> None:
        self._post("kv/lease/revoke", {"ID": lease})

    def compact(self, revision: int) -> None:
        self._post("kv/compaction", {"revision": revision, "physical": True})

    # -- watch -----------------------------------------------------------------------
    def watch(self, prefix: bytes, start_revision: int) -> WatchStream:
        with self._lock:
            start = self._current
        why = ""
        for i in range(len(self._clients)):
            c = self._clients[(start + i) % len(self._clients)]
            try:
                return WatchStream(c, prefix, start_revision)
            except EtcdUnavailable as e:
                why = str(e)
        raise EtcdUnavailable(why)


class WatchStream:
    """One server-streamed watch; iterate for batches; close() from any thread ends it."""

    def __init__(self, client: Etcd3Client, prefix: bytes, start_revision: int):
        import requests
        req: dict[str, Any] = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                  "start_revision": start_revision}}
        try:
            # (connect timeout only: an idle watch may be quiet for any time)
            self._resp = client.session.post(client.get_url("watch"), json=req, stream=True,
                                             timeout=(client.timeout, None))
        except requests.exceptions.RequestException as e:
            raise EtcdUnavailable(f"{client.base_url}: {_short(e)}") from None
        if self._resp.status_code != 200:
            self._resp.close()
            raise EtcdUnavailable(f"{client.base_url}: watch refused ({self._resp.status_code})")
        self.endpoint = client.base_url

    def __iter__(self) -> Iterator[WatchBatch]:
        import requests
        try:
            for line in self._lines():
                result = json.loads(line).get("result")
                if result is None:
                    raise EtcdUnavailable(f"{self.endpoint}: watch error")
                batch = WatchBatch(int(result.get("header", {}).get("revision", 0)),
                                   compact_revision=int(result.get("compact_revision", 0)),
                                   canceled=bool(result.get("canceled", False)))
                for ev in result.get("events", []):
                    # proto3 JSON leaves out the default type PUT.
                    batch.events.append(WatchEvent(ev.get("type") == "DELETE", KV.of(ev["kv"])))
                if batch.events or batch.compact_revision or batch.canceled:
                    yield batch
        except (requests.exceptions.RequestException, AttributeError, ValueError) as e:
            # (AttributeError/ValueError: the response was closed under us by close())
            raise EtcdUnavailable(f"{self.endpoint}: watch stream: {_short(e)}") from None
        raise EtcdUnavailable(f"{self.endpoint}: watch stream ended")

    def _lines(self) -> Iterator[bytes]:
        """Each JSON message as soon as it arrives (iter_lines would wait for a full chunk)."""
        buf = b""
        for data in self._resp.iter_content(chunk_size=None):
            buf += data
            *lines, buf = buf.split(b"\n")
            yield from (line for line in lines if line.strip())

    def close(self) -> None:
        """End the stream; a thread blocked reading it wakes up (shutdown, as etcd3gw does)."""
        try:
            sock = socket.fromfd(self._resp.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        except Exception:    # noqa: BLE001 - a stream already broken may fail in many ways
            pass
        try:
            self._resp.close()
        except Exception:    # noqa: BLE001
            pass


def _short(e: Exception) -> str:
    """Why, in a few words: requests' texts are long reprs of the connection pool."""
    import requests
    from etcd3gw import exceptions as etcd_exc
    text = getattr(e, "detail_text", None) or str(e) or ""
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    if isinstance(e, (etcd_exc.ConnectionTimeoutError, requests.exceptions.Timeout)):
        return "timed out"
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# Compare and request builders for transactions -----------------------------------------
@dataclass
class TxnPart:
    """What one change adds to a transaction: its compares and its operations."""
    compare: list[dict[str, Any]]
    ops: list[dict[str, Any]]

    @property
    def size(self) -> int:
        """The raw bytes of its operations' keys and values: what etcd's request limit counts
        (measured: not the base64 the gateway carries)."""
        return sum(_raw_len(req[name]) for op in self.ops for req in op.values()
                   for name in ("key", "value") if name in req)


def _raw_len(text: str) -> int:
    """The length of what the base64 `text` holds (each '=' of its padding stands for no byte)."""
    return len(text) * 3 // 4 - (len(text) - len(text.rstrip("=")))


def fits(group: Sequence[TxnPart], part: TxnPart, extra_compares: int = 1) -> bool:
    """Whether `part` may join `group` in one transaction within etcd's bounds (the
    transaction has `extra_compares` of its own: a fence)."""
    if not group:
        return True
    compares = extra_compares + sum(len(p.compare) for p in group) + len(part.compare)
    ops = sum(len(p.ops) for p in group) + len(part.ops)
    size = sum(p.size for p in group) + part.size
    return compares <= TXN_OPS and ops <= TXN_OPS and size <= TXN_BYTES


def absent(key: bytes) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}


def mod_is(key: bytes, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(revision)}


def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def value_is(key: bytes, value: bytes) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "VALUE", "value": b64(value)}


def unchanged_since(prefix: bytes, revision: int) -> dict[str, Any]:
    """No key under `prefix` was changed after `revision` (etcd >= 3.3 compares ranges)."""
    return {"key": b64(prefix), "range_end": b64(prefix_end(prefix)), "result": "LESS", "target": "MOD",
            "mod_revision": str(revision + 1)}


def delete(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def get(key: bytes) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}
