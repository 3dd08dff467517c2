"""The fleet cache's writes of other hosts' changes: one by one, or a batch committed together.

A watch response or a resync step can change hundreds of cached secrets at once. Written one
by one, each change is a durable write of its own (a temp file, its fsync, the rename and a
directory fsync), so a resync into an empty cache of 10,000 secrets took about 9 s. Inside
`batch()` the changes are planned instead, in their order, and committed together when the
batch ends (store/commit.py: the new files' data synced in parallel, then the renames and
unlinks in order, then one directory fsync for all), before the changes reach the driver.
Every file still goes from its old to its new content atomically; what a crash can leave is
what it could leave before: some of the batch's files changed and some not, and every start
resyncs the whole cache with etcd.

A change whose files cannot be written is logged, the others go on, and it still reaches the
driver: etcd holds it, and the next start's resync writes it again. (Written one by one, the
failed write raised out of the change, which this host then did not serve until its next
resync, although it counted it as applied.) Outside `batch()`, and for a cache whose writes a
test replaced, the writes are made at once and raise.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from secretbus.core.model import SecretDef
from secretbus.store.commit import Plan, commit_batch
from secretbus.store.filestore import SecretStore

log = logging.getLogger("secretbus.fleet")


class CacheWrites:
    def __init__(self, cache: SecretStore) -> None:
        self.cache = cache
        self._plans: list[tuple[str, Plan]] | None = None     # inside batch(): (uuid, plan)
        self.batches = 0        # batches committed (tests, benchmarks)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The writes made inside are committed together when it ends (also when it ends with
        an exception: the bookkeeping of the changes made so far already counts them)."""
        if self._plans is not None or not self.cache.group_commit:
            yield
            return
        self._plans = []
        try:
            yield
        finally:
            plans, self._plans = self._plans, None
            self._commit(plans)

    def definition(self, d: SecretDef) -> None:
        if self._plans is None:
            self.cache.write_definition(d)
        else:
            self._plans.append((d.uuid, self.cache.plan_definition(d)))

    def value(self, d: SecretDef, value: bytes) -> None:
        if self._plans is None:
            self.cache.write_value(d, value)
        else:
            self._plans.append((d.uuid, self.cache.plan_value(d, value)))

    def delete_values(self, uuid: str) -> None:
        if self._plans is None:
            self.cache.delete_values(uuid)
        else:
            self._plans.append((uuid, self.cache.plan_delete_values(uuid)))

    def drop(self, uuid: str) -> None:
        """The secret's value files, then its definition; a value file that stays keeps the
        definition too (one plan: it stops at its first failure), as one by one."""
        if self._plans is None:
            self.cache.delete_values(uuid)
            self.cache.delete_definition(uuid)
        else:
            self._plans.append((uuid, self.cache.plan_delete_values(uuid).add(self.cache.plan_delete_definition(uuid))))

    def _commit(self, plans: list[tuple[str, Plan]]) -> None:
        todo = [(u, p) for u, p in plans if p]
        if not todo:
            return
        # No spares: the cache has no idle writer to empty them (store/commit.py).
        result = commit_batch([p for _, p in todo], keep_spares=False)
        self.batches += 1
        for (uuid, _), err in zip(todo, result.errors, strict=True):
            if err is not None:
                why = getattr(err, "message", None) or type(err).__name__
                log.error("fleet: cannot cache secret %s: %s", uuid, why, extra={"SECRET_UUID": uuid})
