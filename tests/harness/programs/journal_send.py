"""Send two journal entries with systemd-python: one with a binary field (a newline in it),
one too large for a datagram (sent as a memfd).  argv: VALUE_HEX"""
import sys

from systemd import journal

v = bytes.fromhex(sys.argv[1])
journal.send("hex " + v.hex(), SECRET_UUID="u1", RAW=v + b"\nwith newline")
journal.send("x" * (12 << 20), BIG="1")
