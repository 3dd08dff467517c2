"""python3-libvirt (Debian's, /usr/bin/python3) as some user, for the polkit differential test:
open a URI, run steps, record each result or libvirt error; one JSON document on stdout.
Secret values are never printed: a value is reported as its length and SHA-256.

argv: URI STEPS_JSON (URI "readonly:U": openReadOnly(U)), steps being [name, args...] with name one of
num, list, list_all, lookup, lookup_usage, xml, value, set_value (hex), define (xml), undefine,
events (register lifecycle and value-changed callbacks, print {"ready": ...} on a line of its
own, then collect events until the lifecycle event of SENTINEL_UUID or TIMEOUT seconds;
deregister both callbacks), event_cycle (register a lifecycle callback, then deregister it:
"deregistered", or {"deregister_error": ...}), set_identity ("self" or a pid: that process's
identity).
Output: {"open": null | [code, domain, message], "steps": [result...]} where a result is the
value or {"error": [code, domain, message]}.
"""
import hashlib
import json
import os
import pwd
import sys
import time

import libvirt

uri, steps = sys.argv[1], json.loads(sys.argv[2])
libvirt.registerErrorHandler(lambda ctx, err: None, None)
if any(s[0] in ("events", "event_cycle") for s in steps):
    libvirt.virEventRegisterDefaultImpl()
out = {"open": None, "steps": []}


def err(e):
    return [e.get_error_code(), e.get_error_domain(), e.get_error_message()]


try:
    conn = libvirt.openReadOnly(uri[len("readonly:"):]) if uri.startswith("readonly:") else libvirt.open(uri)
except libvirt.libvirtError as e:
    out["open"] = err(e)
    print(json.dumps(out))
    sys.exit(0)


def digest(value):
    return {"len": len(value), "sha256": hashlib.sha256(value).hexdigest()}


def events(sentinel, timeout):
    got = []
    done = []

    def lifecycle(c, secret, event, detail, opaque):
        got.append(["lifecycle", secret.UUIDString(), event, detail])
        if secret.UUIDString() == sentinel:
            done.append(1)

    def value_changed(c, secret, opaque):
        got.append(["value-changed", secret.UUIDString()])

    ids = []
    try:
        ids.append(conn.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE, lifecycle, None))
        ids.append(conn.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_VALUE_CHANGED, value_changed, None))
    except libvirt.libvirtError as e:
        print(json.dumps({"ready": err(e)}), flush=True)
        raise
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + timeout
    while not done and time.monotonic() < deadline:
        libvirt.virEventRunDefaultImpl()
    for i in ids:
        conn.secretEventDeregisterAny(i)
    return {"events": got, "sentinel_seen": bool(done)}


def event_cycle():
    cb = conn.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE, lambda *a: None, None)
    try:
        conn.secretEventDeregisterAny(cb)
    except libvirt.libvirtError as e:
        return {"deregister_error": err(e)}
    return "deregistered"


def set_identity(who):
    """setIdentity to this process ("self") or process `who` (its uid, pid and start time)."""
    pid = os.getpid() if who == "self" else int(who)
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    uid = os.stat(f"/proc/{pid}").st_uid
    conn.setIdentity({"user-name": pwd.getpwuid(uid).pw_name, "unix-user-id": uid, "process-id": pid,
                      "process-time": int(stat[stat.rfind(b")") + 2:].split()[19])})
    return "set"


ACTIONS = {
    "num": lambda: conn.numOfSecrets(),
    "list": lambda: sorted(conn.listSecrets()),
    "list_all": lambda: sorted(s.UUIDString() for s in conn.listAllSecrets(0)),
    "lookup": lambda u: conn.secretLookupByUUIDString(u).UUIDString(),
    "lookup_usage": lambda t, name: conn.secretLookupByUsage(t, name).UUIDString(),
    "xml": lambda u: conn.secretLookupByUUIDString(u).XMLDesc(0),
    "value": lambda u: digest(conn.secretLookupByUUIDString(u).value()),
    "set_value": lambda u, h: conn.secretLookupByUUIDString(u).setValue(bytes.fromhex(h)),
    "define": lambda xml: conn.secretDefineXML(xml).UUIDString(),
    "undefine": lambda u: conn.secretLookupByUUIDString(u).undefine(),
    "events": events,
    "event_cycle": event_cycle,
    "set_identity": set_identity,
}
for name, *args in steps:
    try:
        out["steps"].append(ACTIONS[name](*args))
    except libvirt.libvirtError as e:
        out["steps"].append({"error": err(e)})
conn.close()
print(json.dumps(out))
