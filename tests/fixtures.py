"""Test data shared by the test modules: UUIDs, a secret XML builder, a store directory's files."""
from __future__ import annotations

import os

from secretbus.store.fsutil import is_spare_name

U1 = "f52a81b2-424e-490c-823d-6bd4235bc572"
U2 = "1b40a534-8301-45d5-b1aa-11894ebb1735"   # sorts before U1
U1_NEXT = "f52a81b2-424e-490c-823d-6bd4235bc573"   # sorts right after U1

USAGE_CHILD = {"volume": "volume", "ceph": "name", "iscsi": "target", "tls": "name", "vtpm": "name"}


def secret_xml(uuid: str | None = U1, *, eph: str = "no", priv: str = "no", usage: str | None = "ceph",
               uid: str = "client.admin", desc: str | None = None) -> str:
    """A <secret> document; None leaves out the uuid, the description or the usage."""
    parts = [f"<secret ephemeral='{eph}' private='{priv}'>"]
    if uuid:
        parts.append(f"<uuid>{uuid}</uuid>")
    if desc:
        parts.append(f"<description>{desc}</description>")
    if usage:
        child = USAGE_CHILD[usage]
        parts.append(f"<usage type='{usage}'><{child}>{uid}</{child}></usage>")
    parts.append("</secret>")
    return "".join(parts)


def store_files(d) -> list[str]:
    """The names in a store directory that are secrets' files: not spare files (which an
    undefine or a replace leaves until the writer is idle, store/commit.py)."""
    return sorted(n for n in os.listdir(d) if not is_spare_name(n))
