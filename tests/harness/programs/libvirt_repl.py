"""python3-libvirt as some user, one connection kept open: reads JSON lines [name, args...]
from stdin (value UUID, lookup UUID, list_all), answers each with one JSON line (the result or
{"error": [code, domain, message]}). argv: URI. The first line out is {"pid": n} once open.
"""
import json
import os
import sys

import libvirt

libvirt.registerErrorHandler(lambda ctx, err: None, None)
conn = libvirt.open(sys.argv[1])
ACTIONS = {
    "value": lambda u: conn.secretLookupByUUIDString(u).value().hex(),
    "lookup": lambda u: conn.secretLookupByUUIDString(u).UUIDString(),
    "list_all": lambda: sorted(s.UUIDString() for s in conn.listAllSecrets(0)),
}
print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    name, *args = json.loads(line)
    try:
        out = ACTIONS[name](*args)
    except libvirt.libvirtError as e:
        out = {"error": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]}
    print(json.dumps(out), flush=True)
conn.close()
