"""The in-memory secret table (libvirt's virSecretObjList): secrets by UUID and by usage,
the sorted snapshot, wiping of values, and which UUIDs and usages are taken.

Not thread-safe by itself: the driver serialises mutations with its lock. Reads may run
concurrently with a mutation; they see the old or the new state of one dict.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter

from secretbus.core.model import SecretDef, UsageType
from secretbus.store.filestore import LoadedSecret, Skipped

UsageKey = tuple[UsageType, str]


@dataclass(slots=True)
class Entry:
    definition: SecretDef
    value: bytearray | None = None   # wiped in place when replaced or removed


def usage_key(d: SecretDef) -> UsageKey | None:
    """What must be unique; secrets without a usage never clash."""
    return None if d.usage_type == UsageType.NONE else (d.usage_type, d.usage_id or "")


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = b"\0" * len(buf)


def _buffer(value: bytes | None) -> bytearray | None:
    return bytearray(value) if value is not None else None


class SecretTable:
    def __init__(self) -> None:
        self._secrets: dict[str, Entry] = {}
        self._by_usage: dict[UsageKey, str] = {}
        # Secrets whose files are in the store but did not load: their UUIDs and usages
        # stay taken, so nothing defined meanwhile overwrites or shadows them.
        self._skipped: dict[str, Skipped] = {}
        self._skipped_usage: dict[UsageKey, str] = {}
        self._skipped_files: list[Skipped] = []     # every file the last load skipped
        self.version = 0                          # bumped on every change
        self._sorted: tuple[int, list[SecretDef]] = (-1, [])

    # -- reading ----------------------------------------------------------------
    def get(self, uuid: str) -> Entry | None:
        return self._secrets.get(uuid)

    def by_usage(self, key: UsageKey) -> Entry | None:
        uuid = self._by_usage.get(key)
        return self._secrets.get(uuid) if uuid is not None else None

    def __len__(self) -> int:
        return len(self._secrets)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._secrets.values()))

    def snapshot(self) -> list[SecretDef]:
        """Definitions sorted by UUID; the sorted list is kept until the table changes."""
        version, defs = self._sorted
        if version != self.version:
            version = self.version    # read before the table: a racing change only marks it stale
            defs = sorted((e.definition for e in list(self._secrets.values())), key=attrgetter("uuid"))
            self._sorted = (version, defs)
        return defs

    def skipped(self, uuid: str) -> Skipped | None:
        """Why the files of `uuid` were not loaded, if they were not."""
        return self._skipped.get(uuid)

    def skipped_files(self) -> list[Skipped]:
        return list(self._skipped_files)

    def usage_holder(self, d: SecretDef) -> str | None:
        """The UUID, other than d's own, that holds d's usage (loaded or skipped)."""
        key = usage_key(d)
        if key is None:
            return None
        for holder in (self._by_usage.get(key), self._skipped_usage.get(key)):
            if holder is not None and holder != d.uuid:
                return holder
        return None

    # -- changing ---------------------------------------------------------------
    def add(self, d: SecretDef) -> Entry:
        entry = self._secrets[d.uuid] = Entry(d)
        self._claim(d)
        self.version += 1
        return entry

    def redefine(self, entry: Entry, new: SecretDef) -> None:
        self._release(entry.definition)
        entry.definition = new
        self._claim(new)
        self.version += 1

    def set_value(self, entry: Entry, value: bytes) -> None:
        old, entry.value = entry.value, bytearray(value)
        _wipe(old)

    def clear_value(self, entry: Entry) -> None:
        old, entry.value = entry.value, None
        _wipe(old)

    def remove(self, uuid: str) -> None:
        entry = self._secrets.pop(uuid)
        self._release(entry.definition)
        _wipe(entry.value)
        self.version += 1

    def clear(self) -> None:
        for e in self._secrets.values():
            _wipe(e.value)
        self._secrets.clear()
        self._by_usage.clear()
        self.version += 1

    def replace(self, loaded: list[LoadedSecret], skipped: list[Skipped]) -> list[Skipped]:
        """Swap in what the store loaded, keeping ephemeral secrets (they live only here).
        Returns the secrets dropped because another file claims their usage."""
        secrets: dict[str, Entry] = {}
        usage: dict[UsageKey, str] = {}
        clashes: list[Skipped] = []
        # Of two files claiming one usage, the older claim wins and the newer is skipped.
        for item in sorted(loaded, key=lambda x: (x.mtime_ns, x.definition.uuid)):
            d = item.definition
            key = usage_key(d)
            if key is not None and key in usage:
                clashes.append(Skipped(f"{d.uuid}.xml", d.uuid, f"a secret with UUID {usage[key]} "
                                       f"already defined for use with {d.usage_id}", d))
                continue
            secrets[d.uuid] = Entry(d, _buffer(item.value))
            if key is not None:
                usage[key] = d.uuid
        for uuid, e in self._secrets.items():
            key = usage_key(e.definition)
            if e.definition.ephemeral and uuid not in secrets and (key is None or key not in usage):
                secrets[uuid] = e
                if key is not None:
                    usage[key] = uuid
        for uuid, e in self._secrets.items():
            if secrets.get(uuid) is not e:
                _wipe(e.value)
        self._secrets, self._by_usage = secrets, usage
        self._set_skipped(skipped + clashes)
        self.version += 1
        return clashes

    def _set_skipped(self, skipped: list[Skipped]) -> None:
        by_uuid: dict[str, Skipped] = {}
        by_usage: dict[UsageKey, str] = {}
        for s in skipped:
            uuid = s.file_uuid
            if uuid is None or uuid in self._secrets:
                continue
            by_uuid[uuid] = s
            key = usage_key(s.definition) if s.definition is not None else None
            if key is not None and key not in self._by_usage:
                by_usage.setdefault(key, uuid)
        self._skipped, self._skipped_usage, self._skipped_files = by_uuid, by_usage, list(skipped)

    def _claim(self, d: SecretDef) -> None:
        key = usage_key(d)
        if key is not None:
            self._by_usage[key] = d.uuid

    def _release(self, d: SecretDef) -> None:
        key = usage_key(d)
        if key is not None and self._by_usage.get(key) == d.uuid:
            del self._by_usage[key]
