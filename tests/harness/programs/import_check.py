"""Import the runtime packages; print where secretbus came from and whether that directory
is writable by us."""
import os

import cryptography  # noqa: F401
import dbus_fast  # noqa: F401
import lxml  # noqa: F401

import secretbus
import systemd  # noqa: F401

print(secretbus.__file__)
print(os.access(os.path.dirname(secretbus.__file__), os.W_OK))
