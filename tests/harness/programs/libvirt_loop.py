"""python3-libvirt in a loop for SECONDS, as some user; one JSON document on stdout.

argv: MODE URI SECONDS UUIDS_JSON
- flood: a new connection per round, value() of every UUID in it (refusals expected);
  prints {"rounds": n, "calls": n, "errors": {code: count}}
- latency: one connection, value() of the first UUID again and again; prints {"calls": n,
  "p50": s, "max": s}
"""
import json
import sys
import time

import libvirt

mode, uri, seconds, uuids = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
libvirt.registerErrorHandler(lambda ctx, err: None, None)
end = time.monotonic() + seconds
if mode == "flood":
    rounds = calls = 0
    errors = {}
    while time.monotonic() < end:
        conn = libvirt.open(uri)
        for u in uuids:
            calls += 1
            try:
                conn.secretLookupByUUIDString(u).value()
            except libvirt.libvirtError as e:
                errors[e.get_error_code()] = errors.get(e.get_error_code(), 0) + 1
        conn.close()
        rounds += 1
    print(json.dumps({"rounds": rounds, "calls": calls, "errors": errors}))
else:
    conn = libvirt.open(uri)
    secret = conn.secretLookupByUUIDString(uuids[0])
    times = []
    while time.monotonic() < end:
        t0 = time.monotonic()
        secret.value()
        times.append(time.monotonic() - t0)
        time.sleep(0.01)
    conn.close()
    times.sort()
    print(json.dumps({"calls": len(times), "p50": times[len(times) // 2], "max": times[-1]}))
