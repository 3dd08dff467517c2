"""Secret handles (`remote_nonnull_secret`) on the wire: UUID text <-> bytes, and each
definition's handle packed once.

Every lookup reply carries a handle and ListAll carries one per secret: packing 10,000 of them
through the generic codec (a UUID object, a struct, an int and a string each) was most of
ListAll's server time. The packed bytes are kept per definition — a `SecretDef` is immutable
and the driver makes a new one on every change, so the entry is valid exactly while it holds
that same object — and a list is one join. GetXMLDesc's reply is kept the same way.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from secretbus.core.model import SecretDef
from secretbus.rpc import protocol as P
from secretbus.rpc.xdr import Encoded, encode

SLACK = 1024          # entries over twice the table's size before the cache starts over
T = TypeVar("T")


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


class PerDefinition(Generic[T]):
    """`make(d)` kept per definition: an entry serves while the driver holds that same
    immutable SecretDef. Bounded: entries of secrets that are gone are dropped all at once when
    the cache holds more than twice `count()` (the table's size). Loop thread only."""

    def __init__(self, count: Callable[[], int], make: Callable[[SecretDef], T]):
        self._count = count
        self._make = make
        self._kept: dict[str, tuple[SecretDef, T]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, d: SecretDef) -> T:
        hit = self._kept.get(d.uuid)
        if hit is not None and hit[0] is d:
            return hit[1]
        value = self._make(d)
        if len(self._kept) > 2 * self._count() + SLACK:
            self._kept.clear()
        self._kept[d.uuid] = (d, value)
        return value


class PackedHandles(PerDefinition[bytes]):
    """The packed handle of each definition."""

    def __init__(self, count: Callable[[], int]):
        super().__init__(count, lambda d: encode(P.NONNULL_SECRET, wire_secret(d)))

    def packed(self, d: SecretDef) -> bytes:
        return self.get(d)

    def handle(self, d: SecretDef) -> Encoded:
        return Encoded(self.get(d))

    def array(self, defs: Sequence[SecretDef]) -> Encoded:
        """`remote_nonnull_secret secrets<>` of `defs` (the caller checked the maximum)."""
        get = self.get
        return Encoded(len(defs).to_bytes(4, "big") + b"".join([get(d) for d in defs]))
