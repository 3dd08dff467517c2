"""The public record a joining host publishes (etcd `hosts/<id>/pub`): JSON with its X25519
public key, hostname and join time. Nothing in it is secret; everything in it is untrusted
(anyone who can write etcd can write it), so parsing is strict and bounded."""
from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass

from secretbus.fleet.hostkey import PUBLIC_SIZE, fingerprint, host_id

MAX_RECORD = 4096
MAX_HOSTNAME = 255


class RecordError(Exception):
    """A host record that is not one this code writes."""


@dataclass(frozen=True)
class HostRecord:
    public: bytes
    hostname: str
    joined: str        # UTC, ISO 8601, for the operator only

    @property
    def id(self) -> str:
        return host_id(self.public)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    @classmethod
    def new(cls, public: bytes, hostname: str) -> HostRecord:
        return cls(public, _clean(hostname), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "pub": base64.b64encode(self.public).decode(), "hostname": self.hostname,
                           "joined": self.joined}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> HostRecord:
        if len(data) > MAX_RECORD:
            raise RecordError(f"host record of {len(data)} bytes (at most {MAX_RECORD})")
        try:
            j = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise RecordError("host record is not JSON") from None
        if not isinstance(j, dict) or j.get("v") != 1:
            raise RecordError("host record has an unknown format")
        pub, hostname, joined = j.get("pub"), j.get("hostname"), j.get("joined")
        if not isinstance(pub, str) or not isinstance(hostname, str) or not isinstance(joined, str):
            raise RecordError("host record lacks pub, hostname or joined")
        try:
            public = base64.b64decode(pub, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError("host record's public key is not base64") from None
        if len(public) != PUBLIC_SIZE:
            raise RecordError(f"host record's public key has {len(public)} bytes, not {PUBLIC_SIZE}")
        return cls(public, _clean(hostname), _clean(joined)[:40])


def _clean(text: str) -> str:
    """Printable, bounded: a hostname from etcd reaches the operator's terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_HOSTNAME]
