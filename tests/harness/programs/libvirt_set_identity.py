"""The virtqemud flow with python3-libvirt (Debian's, /usr/bin/python3): open, setIdentity with
`system.token` (and a user's identity), look a private secret up, read its value.

argv: URI UUID TOKEN|- [self|alice|pid:N] ; prints {"value": hex} or {"error": [code, domain,
message]}; a setIdentity failure prints {"set_identity_error": [...]}. The identity is this
process's own (what virtqemud sends for the user who started the VM: name, uid, pid and start
time), process N's (a user's process virtqemud acts for), or, with "alice", a made-up one (uid
1000, pid 4242, no start time) that polkit cannot be asked about.
"""
import json
import os
import pwd
import sys

import libvirt

uri, uuid, token = sys.argv[1:4]
libvirt.registerErrorHandler(lambda ctx, err: None, None)
conn = libvirt.open(uri)
who = sys.argv[4] if len(sys.argv) > 4 else "self"
if who == "alice":
    params = {"user-name": "alice", "unix-user-id": 1000, "process-id": 4242}
else:
    pid = int(who[4:]) if who.startswith("pid:") else os.getpid()
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    start = int(stat[stat.rfind(b")") + 2:].split()[19])      # field 22
    uid = os.stat(f"/proc/{pid}").st_uid
    params = {"user-name": pwd.getpwuid(uid).pw_name, "unix-user-id": uid,
              "process-id": pid, "process-time": start}
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
