"""Transports of the RPC client: something that yields an asyncio stream pair.

The local unix socket and ssh (a child's stdio); TCP and TLS plug in here as other
`Transport`s without the client changing (DESIGN §10). A transport may also have
`async failure() -> str | None` (why the stream ended, asked by the client when it does) and
`async aclose()` (called after the client closed the stream).
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from secretbus.core import errors
from secretbus.rpc.sshcommand import explain, ssh_argv
from secretbus.rpc.sshuri import SshTarget

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
READ_LIMIT = 1024 * 1024        # StreamReader buffer; frames are read with readexactly


class Transport(Protocol):
    def describe(self) -> str:
        """Where it leads, for error messages (never a credential)."""

    async def open(self) -> Streams:
        """A connected stream pair; errors.OperationFailed when it cannot be had."""


@dataclass(frozen=True)
class UnixTransport:
    path: Path

    def describe(self) -> str:
        return str(self.path)

    async def open(self) -> Streams:
        try:
            return await asyncio.open_unix_connection(os.fspath(self.path), limit=READ_LIMIT)
        except OSError as e:
            # libvirt's wording, so that scripts matching virsh's error see the same text.
            raise errors.SystemError(f"Failed to connect socket to '{self.path}': {e.strerror or e}") from None


# -- ssh (secret+ssh://): the RPC stream is an ssh child's stdio ------------------------------
class SshTransport:
    """`ssh … -- host sh -c '<helper>'` (rpc/sshcommand.py) with its stdin and stdout on one end
    of a socketpair, the other end being the client's stream: the client cannot tell it from a
    unix socket. ssh's stderr is kept (the last few KiB) to say which step failed when the
    stream ends (`failure()`); `aclose()` reaps the child."""

    STDERR_KEEP = 8192
    EXIT_WAIT = 3.0            # for ssh to exit once the stream ended, before asking why

    def __init__(self, target: SshTarget, *, readonly: bool = False):
        self.target = target
        self.readonly = readonly
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr = bytearray()
        self._exited = threading.Event()

    def describe(self) -> str:
        return self.target.describe()

    def argv(self) -> list[str]:
        return ssh_argv(self.target, self.readonly)

    async def open(self) -> Streams:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                fd = theirs.fileno()
                self._proc = subprocess.Popen(self.argv(), stdin=fd, stdout=fd, stderr=subprocess.PIPE, close_fds=True)
            except OSError as e:
                raise errors.OperationFailed(f"{self.describe()}: cannot run '{self.target.command}': "
                                             f"{e.strerror or e}") from None
            finally:
                theirs.close()
            threading.Thread(target=self._collect, name="secretbus-ssh-stderr", daemon=True).start()
            return await asyncio.open_unix_connection(sock=ours, limit=READ_LIMIT)
        except BaseException:
            ours.close()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()          # no stream for it to serve: reaped by _collect
            raise

    def _collect(self) -> None:
        """Thread: ssh's stderr until it closes (bounded), then reap ssh."""
        proc = self._proc
        assert proc is not None and proc.stderr is not None
        try:
            while chunk := os.read(proc.stderr.fileno(), 4096):
                self._stderr += chunk
                del self._stderr[:-self.STDERR_KEEP]
        except (OSError, ValueError):
            pass
        finally:
            proc.stderr.close()
            proc.wait()
            self._exited.set()

    async def _wait_exit(self, timeout: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._exited.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        return self._exited.is_set()

    async def failure(self) -> str | None:
        """Why the stream ended, when ssh or the remote helper said so (called by the client)."""
        if self._proc is None or not await self._wait_exit(self.EXIT_WAIT):
            return None
        return explain(self.describe(), self._proc.returncode, self._stderr.decode("utf-8", "replace"))

    async def aclose(self) -> None:
        """After the client closed its end: ssh sees end of input and exits; make sure it does."""
        proc = self._proc
        if proc is None or await self._wait_exit(2.0):
            return
        proc.terminate()
        if not await self._wait_exit(2.0):
            proc.kill()
            await self._wait_exit(2.0)
