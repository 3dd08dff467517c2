"""A store write recorded as data, for a store that commits several writes together.

The driver's writer plans a write by calling a `Files` (driver/writer.py). A store whose writes
are not files (the fleet store: each one an etcd transaction) has no plans to group, but it can
still commit the writes of one batch together if it gets them as data: each write a list of
`StoreCall`s, in its order, handed over in `SecretStore.write_many`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secretbus.core.model import SecretDef
    from secretbus.store.filestore import SecretStore

WRITE_METHODS = ("write_definition", "write_value", "delete_definition", "delete_values")


@dataclass(frozen=True)
class StoreCall:
    method: str                  # one of WRITE_METHODS
    args: tuple[Any, ...]
    undo_values: bool = False    # write_definition: if it fails, the values written before it go

    def __repr__(self) -> str:     # (a value is among the args: never in a repr)
        return f"StoreCall({self.method})"


def write_definition(store: SecretStore, d: SecretDef, *, undo_values: bool = False) -> None:
    """`store.write_definition(d)`; if it fails and `undo_values`, the values written before it
    go too (a new secret's value, written first, must not outlive its definition)."""
    try:
        store.write_definition(d)
    except BaseException:
        if undo_values:
            store.delete_values(d.uuid)
        raise


def replay(store: SecretStore, calls: Sequence[StoreCall]) -> None:
    """Make the calls of one write at once, in order, as the writer's DirectFiles would."""
    for c in calls:
        if c.method == "write_definition":
            write_definition(store, *c.args, undo_values=c.undo_values)
        else:
            getattr(store, c.method)(*c.args)
