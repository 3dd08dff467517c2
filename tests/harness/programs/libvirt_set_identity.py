"""The virtqemud flow with python3-libvirt (Debian's, /usr/bin/python3): open, setIdentity with
`system.token` (and a user's identity), look a private secret up, read its value.

argv: URI UUID TOKEN|- ; prints {"value": hex} or {"error": [code, domain, message]}; a
setIdentity failure prints {"set_identity_error": [...]}.
"""
import json
import sys

import libvirt

uri, uuid, token = sys.argv[1:4]
libvirt.registerErrorHandler(lambda ctx, err: None, None)
conn = libvirt.open(uri)
params = {"user-name": "alice", "unix-user-id": 1000, "process-id": 4242}
if token != "-":
    params["system.token"] = token
try:
    conn.setIdentity(params)
except libvirt.libvirtError as e:
    print(json.dumps({"set_identity_error": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]}))
    sys.exit(0)
try:
    print(json.dumps({"value": conn.secretLookupByUUIDString(uuid).value().hex()}))
except libvirt.libvirtError as e:
    print(json.dumps({"error": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]}))
conn.close()
