"""python3-libvirt (Debian's) against a secret URI: every secret it serves, for the store
tests of tests/test_libvirtd_diff.py. argv: URI. stdout: JSON {uuid: {"xml", "usage",
"value"}}, a value as {"len", "sha256"} (never the value) or the libvirt error of reading it."""
import hashlib
import json
import sys

import libvirt

libvirt.registerErrorHandler(lambda ctx, err: None, None)
conn = libvirt.open(sys.argv[1])
out = {}
for s in conn.listAllSecrets(0):
    try:
        v = s.value(0)
        value = {"len": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    except libvirt.libvirtError as e:
        value = {"err": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]}
    out[s.UUIDString()] = {"xml": s.XMLDesc(0), "usage": [s.usageType(), s.usageID()], "value": value}
conn.close()
print(json.dumps(out, sort_keys=True))
