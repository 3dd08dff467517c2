"""python3-libvirt (Debian's, /usr/bin/python3) as some user: open a URI, then run steps, each
result or libvirt error recorded; one JSON document on stdout.

argv: URI STEPS_JSON, steps being [name, args...] with name one of
list_all, num, list, lookup, lookup_usage, xml, value, set_value (hex), define (xml), undefine,
type, lib_version, event_cycle (register a lifecycle callback, then deregister it: with such a
step the client registers libvirt's default event loop before it opens, as event users must).
Output: {"pid": this process, "open": null | [code, domain, message], "steps": [result...]}
where a result is the value or {"error": [code, domain, message]}.
"""
import json
import os
import sys

import libvirt

uri, steps = sys.argv[1], json.loads(sys.argv[2])
libvirt.registerErrorHandler(lambda ctx, err: None, None)
if any(s[0] == "event_cycle" for s in steps):
    libvirt.virEventRegisterDefaultImpl()
out = {"pid": os.getpid(), "open": None, "steps": []}


def err(e):
    return [e.get_error_code(), e.get_error_domain(), e.get_error_message()]


try:
    conn = libvirt.open(uri)
except libvirt.libvirtError as e:
    out["open"] = err(e)
    print(json.dumps(out))
    sys.exit(0)

ACTIONS = {
    "list_all": lambda: sorted(s.UUIDString() for s in conn.listAllSecrets(0)),
    "num": lambda: conn.numOfSecrets(),
    "list": lambda: sorted(conn.listSecrets()),
    "lookup": lambda u: conn.secretLookupByUUIDString(u).UUIDString(),
    "lookup_usage": lambda t, name: conn.secretLookupByUsage(t, name).UUIDString(),
    "xml": lambda u: conn.secretLookupByUUIDString(u).XMLDesc(0),
    "value": lambda u: conn.secretLookupByUUIDString(u).value().hex(),
    # A handle comes from a lookup (getattr): the tests grant that where they test a write.
    "set_value": lambda u, h: conn.secretLookupByUUIDString(u).setValue(bytes.fromhex(h)),
    "define": lambda xml: conn.secretDefineXML(xml).UUIDString(),
    "undefine": lambda u: conn.secretLookupByUUIDString(u).undefine(),
    "type": lambda: conn.getType(),
    "lib_version": lambda: conn.getLibVersion(),
    "event_cycle": lambda: conn.secretEventDeregisterAny(
        conn.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE, lambda *a: None, None)),
}
for name, *args in steps:
    try:
        out["steps"].append(ACTIONS[name](*args))
    except libvirt.libvirtError as e:
        out["steps"].append({"error": err(e)})
conn.close()
print(json.dumps(out))
