"""python3-libvirt through a remote URI (secret+ssh://…): every step a JSON field on stdout.

argv: URI UUID PRIVATE_UUID VALUE_HEX
define, list, set/get of a non-private value, get of a private one (refused), lifecycle and
value-changed events (libvirt's default event loop on a thread), undefine.
"""
import json
import sys
import threading
import time

import libvirt

uri, uuid, private_uuid, value_hex = sys.argv[1:5]
libvirt.registerErrorHandler(lambda ctx, err: None, None)
libvirt.virEventRegisterDefaultImpl()
threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True).start()
out = {}


def step(name, fn):
    try:
        out[name] = fn()
    except libvirt.libvirtError as e:
        out[name] = {"error": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]}


conn = libvirt.open(uri)
events = []
conn.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE,
                            lambda c, s, ev, detail, opaque: events.append(["lifecycle", s.UUIDString(), ev]), None)
conn.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_VALUE_CHANGED,
                            lambda c, s, opaque: events.append(["value-changed", s.UUIDString()]), None)
xml = ("<secret ephemeral='no' private='{}'><uuid>{}</uuid>"
       "<usage type='ceph'><name>{}</name></usage></secret>")
step("define", lambda: conn.secretDefineXML(xml.format("no", uuid, "client.remote")).UUIDString())
step("define_private", lambda: conn.secretDefineXML(xml.format("yes", private_uuid, "client.private")).UUIDString())
step("list", lambda: sorted(s.UUIDString() for s in conn.listAllSecrets()))
step("set_value", lambda: conn.secretLookupByUUIDString(uuid).setValue(bytes.fromhex(value_hex)))
step("value", lambda: conn.secretLookupByUUIDString(uuid).value().hex())
step("set_private", lambda: conn.secretLookupByUUIDString(private_uuid).setValue(b"p"))
step("private_value", lambda: conn.secretLookupByUUIDString(private_uuid).value().hex())
step("undefine", lambda: conn.secretLookupByUUIDString(uuid).undefine())
deadline = time.monotonic() + 20
while time.monotonic() < deadline and len(events) < 5:
    time.sleep(0.05)
out["events"] = events
conn.close()
print(json.dumps(out))
