"""python3-libvirt (Debian's, run with /usr/bin/python3) against a secret URI: the calls an
application makes, each result or libvirt error printed as one JSON document on stdout.

argv: URI UUID USAGE_ID VALUE_HEX
"""
import json
import sys

import libvirt

uri, uuid, usage_id, value_hex = sys.argv[1:5]
out = {}


def step(name, fn):
    try:
        out[name] = fn()
    except libvirt.libvirtError as e:
        out[name] = {"error": [e.get_error_code(), e.get_error_domain(), e.get_error_message()]}


libvirt.registerErrorHandler(lambda ctx, err: None, None)   # errors come back as exceptions only
conn = libvirt.open(uri)
xml = (f"<secret ephemeral='no' private='no'><uuid>{uuid}</uuid>"
       f"<usage type='ceph'><name>{usage_id}</name></usage></secret>")
step("type", conn.getType)
step("lib_version", conn.getLibVersion)
step("is_secure", conn.isSecure)
step("is_encrypted", conn.isEncrypted)
step("define", lambda: conn.secretDefineXML(xml).UUIDString())
step("num", conn.numOfSecrets)
step("list", conn.listSecrets)
step("list_all", lambda: [s.UUIDString() for s in conn.listAllSecrets(0)])
PRIVATE = libvirt.VIR_CONNECT_LIST_SECRETS_PRIVATE
step("list_all_private", lambda: [s.UUIDString() for s in conn.listAllSecrets(PRIVATE)])
step("list_all_bad_flags", lambda: conn.listAllSecrets(1 << 10))
step("by_usage", lambda: conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, usage_id).UUIDString())
step("by_usage_missing", lambda: conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, "nope").UUIDString())
sec = conn.secretLookupByUUIDString(uuid)
step("usage", lambda: [sec.usageType(), sec.usageID()])
step("no_value_yet", lambda: sec.value().hex())
step("set_value", lambda: sec.setValue(bytes.fromhex(value_hex)))
step("value", lambda: sec.value().hex())
step("value_bad_flags", lambda: sec.value(1).hex())
step("hostname", conn.getHostname)
step("undefine", sec.undefine)
step("lookup_gone", lambda: conn.secretLookupByUUIDString(uuid).UUIDString())
conn.close()
print(json.dumps(out))
