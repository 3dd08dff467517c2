"""What a refusal may tell its caller about other secrets.

A define whose usage another secret holds is refused with libvirt's text, which names that
secret's UUID (errors.UsageClash); a redefine that would change a secret's usage id, with a
text that names the current one (errors.UsageChange); a define of a UUID whose files did not
load, with the reason, which may name another secret (errors.NotLoaded). A caller that may not
getattr that secret must not learn these (DESIGN §12: no caller learns of a secret it may not
getattr): it gets the same refusal without them (errors.NamesSecret.hidden). That the define
cannot happen it learns either way.

The one rule under both front ends (bus/execute.py, rpc/procedures.py); each passes its own
getattr check.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from secretbus.core import errors
from secretbus.core.model import SecretDef

log = logging.getLogger("secretbus.access")


async def disclosed(error: Exception, may_see: Callable[[SecretDef], Awaitable[bool]]) -> Exception:
    """`error`, or, when it names a secret `may_see` does not allow, the same refusal without
    it (also when the check itself fails: closed)."""
    if not isinstance(error, errors.NamesSecret):
        return error
    try:
        ok = await may_see(error.holder)
    except Exception as e:  # noqa: BLE001 - fail closed on anything
        log.error("getattr check of the secret a refusal names failed; not naming it: %s", type(e).__name__)
        ok = False
    return error if ok else error.hidden()
