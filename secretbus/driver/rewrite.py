"""Every value written again under the store's current scheme and key, a batch at a time.

A key rotation's reload (docs/security.md §3b), the re-bind of values read from an unbound file
and `rewrite-values` re-write many values while every other write waits (writer.exclusive).
One by one, each value is a durable write of its own (temp file, its sync, the rename, a
directory fsync): about 1,500 a second here. Here they are planned (filestore.plan_value) and
committed REWRITE_BATCH at a time (store/commit.py): each value file still goes from its old
to its new content atomically and is durable before its result is given, and a batch shares
one directory fsync and syncs its files' data in parallel.

The files these writes replace are not kept as spare files: under a rotation they hold the
retiring key's ciphertexts, which must not stay on disk under another name. A store that
does not describe its writes as plans (the fleet store) is written one value at a time.
"""
from __future__ import annotations

from collections.abc import Iterator

from secretbus.core import errors
from secretbus.driver.table import Entry
from secretbus.store.commit import Plan, commit_batch
from secretbus.store.filestore import SecretStore

REWRITE_BATCH = 256


def rewrite(store: SecretStore, entries: list[Entry]) -> Iterator[tuple[str, errors.SecretError | None]]:
    """Each entry's UUID once its value is durable under the current key (None), or with the
    error that kept it from being written. The caller holds the driver's mutex."""
    if not store.group_commit:
        for e in entries:
            assert e.value is not None
            try:
                store.write_value(e.definition, bytes(e.value))
            except errors.SecretError as err:
                yield e.definition.uuid, err
                continue
            yield e.definition.uuid, None
        return
    for start in range(0, len(entries), REWRITE_BATCH):
        planned: list[tuple[str, Plan]] = []
        for e in entries[start:start + REWRITE_BATCH]:
            assert e.value is not None
            try:
                planned.append((e.definition.uuid, store.plan_value(e.definition, bytes(e.value))))
            except errors.SecretError as err:
                yield e.definition.uuid, err
        result = commit_batch([p for _, p in planned], keep_spares=False)
        for (uuid, _), failure in zip(planned, result.errors, strict=True):
            yield uuid, _secret_error(failure)


def _secret_error(e: BaseException | None) -> errors.SecretError | None:
    if e is None or isinstance(e, errors.SecretError):
        return e
    return errors.SystemError(f"the write failed ({type(e).__name__})")
