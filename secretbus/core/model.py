"""The secret model: usage types, definitions, flags and event numbers (libvirt's values)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

VALUE_MAX = 65536  # REMOTE_SECRET_VALUE_MAX: largest value a caller may set
# This package's version (secretbus.__version__): pyproject.toml's, as tests/test_dispatch.py checks.
VERSION = "0.1.0"
# What every front end reports as the library version (virConnectGetLibVersion): the libvirt
# release whose secret driver secretbus reproduces, 12.1.0, in libvirt's encoding
# major * 1,000,000 + minor * 1,000 + micro.
LIBVIRT_COMPAT = 12_001_000


class InstanceKind(enum.Enum):
    """Which instance a connection or a daemon serves (store.paths says where it lives)."""

    SYSTEM = "system"
    SESSION = "session"
    EMBED = "embed"


class UsageType(enum.IntEnum):
    NONE = 0
    VOLUME = 1
    CEPH = 2
    ISCSI = 3
    TLS = 4
    VTPM = 5

    @property
    def xml_name(self) -> str:
        return self.name.lower()

    @property
    def child(self) -> str | None:
        """Element under <usage> that holds the usage id."""
        return _CHILD[self]

    @classmethod
    def from_xml_name(cls, name: str) -> UsageType | None:
        return _BY_XML_NAME.get(name)


_CHILD = {UsageType.NONE: None, UsageType.VOLUME: "volume", UsageType.CEPH: "name",
          UsageType.ISCSI: "target", UsageType.TLS: "name", UsageType.VTPM: "name"}
_BY_XML_NAME = {u.xml_name: u for u in UsageType}


class ListFlags(enum.IntFlag):
    EPHEMERAL = 1
    NO_EPHEMERAL = 2
    PRIVATE = 4
    NO_PRIVATE = 8


LIST_FLAGS_ALL = 0xF
DEFINE_VALIDATE = 1


class EventId(enum.IntEnum):
    LIFECYCLE = 0
    VALUE_CHANGED = 1


class Lifecycle(enum.IntEnum):
    DEFINED = 0
    UNDEFINED = 1


@dataclass(frozen=True, slots=True)
class SecretDef:
    """One secret's definition (everything but the value)."""

    uuid: str                       # lowercase dashed
    ephemeral: bool = False
    private: bool = False
    description: str | None = None
    usage_type: UsageType = UsageType.NONE
    usage_id: str | None = None     # None exactly when usage_type is NONE


@dataclass(frozen=True)
class SecretEvent:
    """What subscribers receive; carries usage data so a handle can be built after undefine."""

    event_id: EventId
    uuid: str
    usage_type: UsageType
    usage_id: str
    lifecycle: Lifecycle | None = None   # set for LIFECYCLE events
    detail: int = 0
    # The definition the event is about (after a define, before an undefine), so a
    # subscriber need not look it up again. The driver always sets it; a client that
    # rebuilds an event from a bus signal, which carries no definition, may not.
    definition: SecretDef | None = None


_EPH, _NO_EPH, _PRIV, _NO_PRIV = 1, 2, 4, 8   # plain ints: this runs per secret per list call


def list_filter(flags: int):
    """libvirt's ListAllSecrets filter for `flags` (OR within a group, AND across groups),
    or None when it lets everything through."""
    eph = flags & (_EPH | _NO_EPH)
    want_eph = None if eph in (0, _EPH | _NO_EPH) else bool(eph & _EPH)
    prv = flags & (_PRIV | _NO_PRIV)
    want_priv = None if prv in (0, _PRIV | _NO_PRIV) else bool(prv & _PRIV)
    if want_eph is None and want_priv is None:
        return None
    return lambda d: ((want_eph is None or d.ephemeral == want_eph)
                      and (want_priv is None or d.private == want_priv))
