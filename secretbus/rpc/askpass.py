"""SASL credentials asked on the controlling terminal, in virsh's words.

virsh's default auth callback asks "Please enter your authentication name: " (echoed) and
"Please enter your password: " (not echoed). Both are read from /dev/tty, never from stdin (a
pipe into `secretbus -c URI secret-define -` must not be eaten), with echo off for the password
as getpass does it: termios ECHO cleared, restored whatever happens. Unlike getpass there is no
fallback to an echoing stdin: without a terminal the answer is None, and the caller refuses
with a clear authentication error. The password is returned, never logged or put in an
exception; a line is bounded and so is the wait.
"""
from __future__ import annotations

import os
import select
import termios
import time

from secretbus.core import errors
from secretbus.rpc.client import remote_error_class

AUTHNAME_PROMPT = "Please enter your authentication name: "
PASSWORD_PROMPT = "Please enter your password: "
TIMEOUT = 300.0            # seconds for both answers: a forgotten prompt must not hang a script
MAX_LINE = 1024
TTY = "/dev/tty"
AUTH_CANCELLED = 79        # VIR_ERR_AUTH_CANCELLED


def ask_credentials(*, timeout: float = TIMEOUT, tty: str = TTY) -> tuple[str, str] | None:
    """(user, password) typed on the controlling terminal; None when there is none."""
    try:
        fd = os.open(tty, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not os.isatty(fd):
            return None
        deadline = time.monotonic() + timeout
        _write(fd, AUTHNAME_PROMPT)
        user = _read_line(fd, deadline)
        if not user:
            raise _cancelled("no authentication name given")
        password = _read_hidden(fd, deadline)
        if not password:
            raise _cancelled("no password given")
        return user, password
    finally:
        os.close(fd)


def _read_hidden(fd: int, deadline: float) -> str:
    old = termios.tcgetattr(fd)
    quiet = list(old)
    quiet[3] &= ~termios.ECHO            # lflags: what is typed is not shown
    termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
    try:
        _write(fd, PASSWORD_PROMPT)
        return _read_line(fd, deadline)
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)
        _write(fd, "\n")                 # the newline the user typed was not echoed


def _read_line(fd: int, deadline: float) -> str:
    """One line (canonical mode hands it over whole), without its newline; "" at end of input."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise _cancelled("no answer on the terminal in time")
        chunk = os.read(fd, MAX_LINE)
        if not chunk:
            break                        # Ctrl-D on an empty line
        buf += chunk
        if len(buf) > MAX_LINE:
            raise _cancelled(f"answer longer than {MAX_LINE} bytes")
    try:
        return buf.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise _cancelled("the answer is not UTF-8") from None


def _write(fd: int, text: str) -> None:
    os.write(fd, text.encode())


def _cancelled(why: str) -> errors.SecretError:
    # libvirt's VIR_ERR_AUTH_CANCELLED for a prompt that got no answer; the words never
    # quote what was typed.
    return remote_error_class(AUTH_CANCELLED)(f"authentication cancelled: {why}")

