"""tests/test_frontends_diff.py: what an RPC user sees for the inputs that never reach the
server as they are (libvirt's client parses a UUID string and checks a value's size before it
sends anything), asked of Debian's python3-libvirt (/usr/bin/python3) against secretbusd.

argv: URI UUID-OF-A-SECRET-WITH-NO-VALUE JSON-LIST-OF-UUID-STRINGS
stdout: one JSON object: {"lookup": [result per string], "set_over_max": result}; a result is
{"ok": UUID} or {"err": [code, domain, message]}. No value is printed.
"""
import json
import sys

import libvirt

uri, target, strings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
libvirt.registerErrorHandler(lambda ctx, err: None, None)


def attempt(fn):
    try:
        return {"ok": fn()}
    except libvirt.libvirtError as e:
        return {"err": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]}


conn = libvirt.open(uri)
out = {"lookup": [attempt(lambda s=s: conn.secretLookupByUUIDString(s).UUIDString()) for s in strings],
       "set_over_max": attempt(lambda: conn.secretLookupByUUIDString(target).setValue(b"o" * 65537, 0))}
conn.close()
print(json.dumps(out))
