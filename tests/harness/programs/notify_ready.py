"""sd_notify READY=1 with a status through systemd-python (the NOTIFY_SOCKET of the environment)."""
from systemd import daemon

assert daemon.notify("READY=1\nSTATUS=up")
