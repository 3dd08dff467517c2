"""What the fleet hands the driver when another host changed a secret."""
from __future__ import annotations

from dataclasses import dataclass, field

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
