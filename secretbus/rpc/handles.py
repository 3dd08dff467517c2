"""Secret handles (`remote_nonnull_secret`) on the wire: UUID text <-> bytes, and each
definition's handle packed once.

Every lookup reply carries a handle and ListAll carries one per secret: packing 10,000 of them
through the generic codec (a UUID object, a struct, an int and a string each) was most of
ListAll's server time. The packed bytes are kept per definition — a `SecretDef` is immutable
and the driver makes a new one on every change, so the entry is valid exactly while it holds
that same object — and a list is one join.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from secretbus.core.model import SecretDef
from secretbus.rpc import protocol as P
from secretbus.rpc.xdr import Encoded, encode

SLACK = 1024          # entries over twice the table's size before the cache starts over


def uuid_text(raw: bytes) -> str:
    """A wire UUID (16 bytes, the codec checked the size) as libvirt's lowercase text."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid_bytes(text: str) -> bytes:
    """A canonical (dashed, lowercase) UUID as its 16 wire bytes."""
    return bytes.fromhex(text.replace("-", ""))


def wire_secret(d: SecretDef) -> dict[str, object]:
    """The handle as the codec's value (for events and anything not worth caching)."""
    return {"uuid": uuid_bytes(d.uuid), "usageType": int(d.usage_type), "usageID": d.usage_id or ""}


class PackedHandles:
    """The packed handle of each definition. Bounded: entries of secrets that are gone are
    dropped all at once when the cache holds more than twice `count()` (the table's size)."""

    def __init__(self, count: Callable[[], int]):
        self._count = count
        self._packed: dict[str, tuple[SecretDef, bytes]] = {}

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self, d: SecretDef) -> bytes:
        hit = self._packed.get(d.uuid)
        if hit is not None and hit[0] is d:
            return hit[1]
        data = encode(P.NONNULL_SECRET, wire_secret(d))
        if len(self._packed) > 2 * self._count() + SLACK:
            self._packed.clear()
        self._packed[d.uuid] = (d, data)
        return data

    def handle(self, d: SecretDef) -> Encoded:
        return Encoded(self.packed(d))

    def array(self, defs: Sequence[SecretDef]) -> Encoded:
        """`remote_nonnull_secret secrets<>` of `defs` (the caller checked the maximum)."""
        packed = self.packed
        return Encoded(len(defs).to_bytes(4, "big") + b"".join([packed(d) for d in defs]))
