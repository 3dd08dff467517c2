"""What the fleet hands the driver: another host's changes, and what a publish did."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from secretbus.core.model import SecretDef


@dataclass(frozen=True)
class RemoteChange:
    """`definition` None: the secret is gone. `value` None: the value did not change.
    `fresh`: the fleet's first word on this secret (start-up, or a new incarnation):
    it has no value unless a later change of the same batch brings one."""
    uuid: str
    definition: SecretDef | None
    value: bytes | None = field(default=None, repr=False)
    fresh: bool = False


class Published(Enum):
    """What `secretbus fleet publish` did with one local secret."""
    PUBLISHED = "published"     # created in etcd from this host's copy
    ALREADY = "already"         # the fleet had it, the same: the local copy was removed
    STAYS_LOCAL = "stays local"  # not for the fleet under this host's conf (not an error)
    REFUSED = "refused"         # nothing changed; `reason` says why


@dataclass(frozen=True)
class PublishResult:
    uuid: str
    outcome: Published
    reason: str = ""
